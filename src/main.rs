//! The `wsgate` binary: command line, logging, configuration, then [`wsgate::run`].

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use wsgate::config::{Backend, Config, LogFormat};

/// Exit code for configuration errors (EX_USAGE), as linkerd does.
const EXIT_CONFIG: u8 = 64;

/// A transparent WebSocket-aware reverse proxy sidecar that ends every connection
/// properly.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Configuration file (TOML); without it the defaults apply.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Check a configuration file, print every problem, and exit.
    #[arg(long, value_name = "FILE", conflicts_with = "config")]
    check_config: Option<PathBuf>,
    /// Listen address; overrides `listen` in the file.
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Backend URL (http://host:port); overrides `backend` in the file.
    #[arg(long, value_name = "URL")]
    backend: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(path) = &cli.check_config {
        return match Config::load(path) {
            Ok(_) => {
                println!("{}: ok", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {e}", path.display());
                ExitCode::from(EXIT_CONFIG)
            }
        };
    }
    let config = match load(&cli) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("wsgate: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    init_logging(config.log.format);
    raise_fd_limit(config.max_connections, config.workers.count());
    // This thread is worker 0; `wsgate::run` starts the other workers (src/worker.rs),
    // each on a current-thread runtime of its own.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wsgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let served = runtime.block_on(wsgate::run(config));
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn load(cli: &Cli) -> Result<Config, String> {
    let mut config = match &cli.config {
        Some(path) => Config::load(path).map_err(|e| format!("{}: {e}", path.display()))?,
        None => Config::default(),
    };
    if let Some(listen) = &cli.listen {
        config.listen = listen
            .parse()
            .map_err(|_| format!("--listen: {listen:?} is not an address (IP:PORT)"))?;
    }
    if let Some(url) = &cli.backend {
        config.backend = Backend::parse(url).map_err(|e| format!("--backend: {e}"))?;
    }
    Ok(config)
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour codes only for a person at a terminal, never in collected logs.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Raises the soft open-file limit to the hard limit: each WebSocket holds two sockets,
/// and the default soft limit (often 1024) would cap wsgate at a few hundred.
fn raise_fd_limit(max_connections: usize, workers: usize) {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => {
            // Two sockets per relayed connection, plus listeners, pool and headroom, and
            // each worker's splice pipes.
            let reserved = wsgate::reserved_descriptors(workers);
            let capacity = limit.saturating_sub(reserved as u64) / 2;
            tracing::info!(
                open_files = limit,
                websocket_capacity = capacity,
                "file descriptor limit"
            );
            if (capacity as usize) < max_connections {
                tracing::warn!(
                    max_connections,
                    websocket_capacity = capacity,
                    "max_connections exceeds what the open-file limit allows"
                );
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
}
