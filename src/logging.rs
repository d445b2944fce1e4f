//! Logging: `tracing` to stderr, as text or JSON lines (`log.format`), filtered by
//! `RUST_LOG` (default `info`). The format can change on a configuration reload.

use std::io::IsTerminal;

use tracing_subscriber::prelude::*;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

use crate::config::LogFormat;

type Formatter = Box<dyn Layer<Registry> + Send + Sync>;

/// The installed logger, whose format a reload may change.
pub struct Logging {
    format: reload::Handle<Formatter, Registry>,
}

impl Logging {
    /// Installs the process-wide logger. Call once, before anything logs.
    pub fn init(format: LogFormat) -> Logging {
        let (layer, handle) = reload::Layer::new(formatter(format));
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
        tracing_subscriber::registry()
            .with(layer)
            .with(filter)
            .init();
        Logging { format: handle }
    }

    /// Switches the format of the lines written from now on.
    pub fn set_format(&self, format: LogFormat) -> Result<(), String> {
        self.format
            .reload(formatter(format))
            .map_err(|e| e.to_string())
    }
}

fn formatter(format: LogFormat) -> Formatter {
    let lines = tracing_subscriber::fmt::layer()
        // Colour codes only for a person at a terminal, never in collected logs.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => Box::new(lines),
        LogFormat::Json => Box::new(lines.json().flatten_event(true)),
    }
}
