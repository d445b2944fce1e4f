//! Logging: `tracing` to stderr, as text or JSON lines (`log.format`), filtered by
//! `RUST_LOG` (default `info`). The format can change on a configuration reload.
//!
//! Lines do not go to stderr from the thread that logs it: they are appended to a
//! buffer in memory, which a writer thread writes out every [`FLUSH_EVERY`] (or sooner
//! once [`FLUSH_AT`] bytes are waiting) with one system call. A worker never waits on a
//! slow log pipe, never makes a system call per line, and never wakes another thread
//! per line (through a queue that would cost a futex wake and a context switch a line,
//! more than the write it saves). The buffer is bounded ([`MAX_BUFFER`]): when the log
//! cannot keep up, lines are dropped and counted (`wsgate_log_lines_dropped_total`)
//! rather than stalling connections. [`flush`] writes what is waiting before the
//! process exits.
//!
//! The one line per ended WebSocket is formatted by [`crate::report`] itself, straight
//! into its bytes (in the same format as `tracing`'s), because through `tracing`'s
//! generic field visitor it cost about a quarter of wsgate's user-space work per
//! short-lived connection.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::thread::Thread;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::prelude::*;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

use crate::config::LogFormat;

type Formatter = Box<dyn Layer<Registry> + Send + Sync>;

/// How long a line may wait in memory before it is written.
pub const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// Bytes waiting that make the writer thread write at once.
const FLUSH_AT: usize = 256 * 1024;
/// Bytes that may wait at most; lines beyond are dropped.
pub const MAX_BUFFER: usize = 8 * 1024 * 1024;

/// The installed logger, whose format a reload may change.
pub struct Logging {
    format: reload::Handle<Formatter, Registry>,
}

/// The process-wide buffer and its writer thread, once [`Logging::init`] ran.
static SINK: OnceLock<Sink> = OnceLock::new();

struct Sink {
    /// Lines waiting to be written.
    waiting: Mutex<Vec<u8>>,
    /// Held while a batch is taken and written, so batches reach stderr in order.
    writing: Mutex<()>,
    writer: Thread,
    /// Lines dropped because too much was waiting.
    dropped: AtomicU64,
    /// The format in force, for lines formatted outside `tracing`.
    format: AtomicU8,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Sink {
    /// Takes what is waiting and writes it.
    fn write_out(&self, out: &mut dyn Write, batch: &mut Vec<u8>) {
        let _writing = lock(&self.writing);
        std::mem::swap(&mut *lock(&self.waiting), batch);
        if !batch.is_empty() {
            // A log that cannot be written has nowhere to say so.
            let _ = out.write_all(batch);
            let _ = out.flush();
            batch.clear();
        }
    }
}

impl Logging {
    /// Installs the process-wide logger and its writer thread. Call once, before
    /// anything logs.
    pub fn init(format: LogFormat) -> Logging {
        let ansi = std::io::stderr().is_terminal();
        let started = std::thread::Builder::new()
            .name("wsgate-log".into())
            .spawn(write_lines);
        if let Ok(thread) = started {
            let _ = SINK.set(Sink {
                waiting: Mutex::new(Vec::with_capacity(FLUSH_AT)),
                writing: Mutex::new(()),
                writer: thread.thread().clone(),
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

/// Writes every line logged so far (at exit).
pub fn flush() {
    if let Some(sink) = SINK.get() {
        sink.write_out(&mut std::io::stderr().lock(), &mut Vec::new());
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

/// Adds a whole line (ending in `\n`) to what the log writes next; false if it was
/// dropped.
pub fn write_line(line: &[u8]) -> bool {
    let Some(sink) = SINK.get() else {
        return false;
    };
    let mut waiting = lock(&sink.waiting);
    if waiting.len() + line.len() > MAX_BUFFER {
        drop(waiting);
        sink.dropped.fetch_add(1, Ordering::Relaxed);
        return false;
    }
    waiting.extend_from_slice(line);
    let full = waiting.len() >= FLUSH_AT;
    drop(waiting);
    if full {
        sink.writer.unpark();
    }
    true
}

/// Lines dropped since start because the log could not keep up.
pub fn dropped() -> u64 {
    SINK.get()
        .map_or(0, |sink| sink.dropped.load(Ordering::Relaxed))
}

/// The writer thread: every [`FLUSH_EVERY`], or when woken, writes what is waiting.
fn write_lines() {
    let mut batch = Vec::with_capacity(FLUSH_AT);
    let mut out = std::io::stderr();
    loop {
        std::thread::park_timeout(FLUSH_EVERY);
        if let Some(sink) = SINK.get() {
            sink.write_out(&mut out, &mut batch);
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
            write_line(&self.0);
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
