//! Logging: `tracing` to stderr, as text or JSON lines (`log.format`), filtered by
//! `RUST_LOG` (default `info`). The format can change on a configuration reload.
//!
//! Lines do not go to stderr from the thread that logs them: each becomes one message
//! to a writer thread, which writes whatever has queued up with one system call. A
//! worker thread never waits on a slow log pipe, and a busy wsgate writes many lines
//! per `write`. The queue is bounded ([`QUEUE`] lines): when the log cannot keep up,
//! lines are dropped and counted (`wsgate_log_lines_dropped_total`) rather than
//! stalling connections. [`Logging::flush`] ([`flush`]) empties it before the process exits.
//!
//! The one line per ended WebSocket is formatted by [`crate::report`] itself, straight
//! into its bytes (in the same format as `tracing`'s), because through `tracing`'s
//! generic field visitor it cost about a quarter of wsgate's user-space work per
//! short-lived connection.

use std::io::{IsTerminal, Write};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::prelude::*;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

use crate::config::LogFormat;

type Formatter = Box<dyn Layer<Registry> + Send + Sync>;

/// Lines that may wait for the writer thread.
pub const QUEUE: usize = 65_536;

/// How long [`Logging::flush`] waits for the writer thread.
const FLUSH_WAIT: Duration = Duration::from_secs(2);

/// The installed logger, whose format a reload may change.
pub struct Logging {
    format: reload::Handle<Formatter, Registry>,
}

/// The process-wide queue to the writer thread, once [`Logging::init`] ran.
static SINK: OnceLock<Sink> = OnceLock::new();

struct Sink {
    queue: SyncSender<Message>,
    /// Lines dropped because the queue was full.
    dropped: AtomicU64,
    /// The format in force, for lines formatted outside `tracing`.
    format: AtomicU8,
}

enum Message {
    Line(Vec<u8>),
    /// Everything before it is written: answer.
    Flush(SyncSender<()>),
}

impl Logging {
    /// Installs the process-wide logger and its writer thread. Call once, before
    /// anything logs.
    pub fn init(format: LogFormat) -> Logging {
        let (queue, lines) = sync_channel(QUEUE);
        let ansi = std::io::stderr().is_terminal();
        let started = std::thread::Builder::new()
            .name("wsgate-log".into())
            .spawn(move || write_lines(lines));
        if started.is_ok() {
            let _ = SINK.set(Sink {
                queue,
                dropped: AtomicU64::new(0),
                format: AtomicU8::new(format as u8),
            });
        }
        let (layer, handle) = reload::Layer::new(formatter(format, ansi));
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
        tracing_subscriber::registry()
            .with(layer)
            .with(filter)
            .init();
        Logging { format: handle }
    }

    /// Switches the format of the lines written from now on.
    pub fn set_format(&self, format: LogFormat) -> Result<(), String> {
        if let Some(sink) = SINK.get() {
            sink.format.store(format as u8, Ordering::Relaxed);
        }
        self.format
            .reload(formatter(format, std::io::stderr().is_terminal()))
            .map_err(|e| e.to_string())
    }
}

/// Waits until every line logged so far is written (at exit).
pub fn flush() {
    let Some(sink) = SINK.get() else {
        return;
    };
    let (done, written) = sync_channel(1);
    if sink.queue.send(Message::Flush(done)).is_ok() {
        let _ = written.recv_timeout(FLUSH_WAIT);
    }
}

/// The format of lines formatted outside `tracing`, if the logger is installed (in
/// tests that serve in-process it is not: they log through `tracing` alone).
pub fn format() -> Option<LogFormat> {
    let sink = SINK.get()?;
    Some(match sink.format.load(Ordering::Relaxed) {
        f if f == LogFormat::Json as u8 => LogFormat::Json,
        _ => LogFormat::Text,
    })
}

/// Queues a whole line (ending in `\n`) for the log; false if it was dropped.
pub fn write_line(line: Vec<u8>) -> bool {
    let Some(sink) = SINK.get() else {
        return false;
    };
    match sink.queue.try_send(Message::Line(line)) {
        Ok(()) => true,
        Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
            sink.dropped.fetch_add(1, Ordering::Relaxed);
            false
        }
    }
}

/// Lines dropped since start because the log could not keep up.
pub fn dropped() -> u64 {
    SINK.get()
        .map_or(0, |sink| sink.dropped.load(Ordering::Relaxed))
}

/// The writer thread: writes what has queued up, then waits for more.
fn write_lines(lines: Receiver<Message>) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, std::io::stderr());
    let mut flushed = Vec::new();
    while let Ok(first) = lines.recv() {
        let mut next = Some(first);
        while let Some(message) = next {
            match message {
                // A log that cannot be written has nowhere to say so.
                Message::Line(line) => {
                    let _ = out.write_all(&line);
                }
                Message::Flush(done) => flushed.push(done),
            }
            next = lines.try_recv().ok();
        }
        let _ = out.flush();
        for done in flushed.drain(..) {
            let _ = done.send(());
        }
    }
}

/// `tracing`'s writer: each event's bytes, queued as one line when the event is done.
#[derive(Clone, Copy)]
struct ToQueue;

/// One event's line being formatted.
struct QueuedLine(Vec<u8>);

impl Write for QueuedLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for QueuedLine {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            write_line(std::mem::take(&mut self.0));
        }
    }
}

impl<'a> MakeWriter<'a> for ToQueue {
    type Writer = Box<dyn Write + 'a>;

    fn make_writer(&'a self) -> Self::Writer {
        if SINK.get().is_some() {
            Box::new(QueuedLine(Vec::with_capacity(256)))
        } else {
            Box::new(std::io::stderr())
        }
    }
}

fn formatter(format: LogFormat, ansi: bool) -> Formatter {
    let lines = tracing_subscriber::fmt::layer()
        // Colour codes only for a person at a terminal, never in collected logs.
        .with_ansi(ansi)
        .with_writer(ToQueue);
    match format {
        LogFormat::Text => Box::new(lines),
        LogFormat::Json => Box::new(lines.json().flatten_event(true)),
    }
}
