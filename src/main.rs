//! The `wsgate` binary: command line, logging, configuration, then [`wsgate::run`].

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use wsgate::config::{BackendUrl, Config, MaxConnections, Source};
use wsgate::demo::{DemoBackend, Links};
use wsgate::logging::Logging;
use wsgate::{Listeners, Process};

/// mimalloc rather than glibc's malloc. A proxied request allocates and frees several
/// small blocks (header maps, the exchange's record, futures), and a new connection also
/// tokio's cache-line-aligned task cell and I/O registration, which glibc serves through
/// its slow `memalign` path (~900 instructions each). With glibc, allocation cost ~1,200
/// instructions per keep-alive GET and ~7,000 per new connection, a sixth of the
/// latter's user time (callgrind, bench/README.md). Only the binary: the library leaves
/// the choice to whoever embeds it. Version 2, without huge pages (Cargo.toml: both
/// keep the resident set where glibc kept it).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for configuration errors (EX_USAGE), as linkerd does.
const EXIT_CONFIG: u8 = 64;
/// Exit code when the admin listener cannot be reached (EX_UNAVAILABLE).
const EXIT_UNAVAILABLE: u8 = 69;

/// A transparent WebSocket-aware reverse proxy sidecar that ends every connection
/// properly.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Configuration file (TOML); without it the defaults apply.
    #[arg(long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// Check a configuration file, print every problem, and exit.
    #[arg(long, value_name = "FILE", conflicts_with = "config")]
    check_config: Option<PathBuf>,
    /// Listen address; overrides `listen` in the file.
    #[arg(long, value_name = "ADDR", global = true)]
    listen: Option<String>,
    /// Backend URL (http://host:port); overrides `backend` in the file.
    #[arg(long, value_name = "URL")]
    backend: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start wsgate in front of a built-in demo backend (a dashboard whose queries
    /// stream over WebSockets) and print the URLs of the demo and of the admin page.
    /// Without --config it listens on 127.0.0.1:8080 (admin 127.0.0.1:9090), pings
    /// silent peers after 5 s and lets the admin page close connections.
    Demo,
    /// Ask a running wsgate to drain (its admin `POST /drain`), as a Kubernetes
    /// `preStop` hook does: readiness fails, new WebSockets are refused, open ones get
    /// their Close spread over `shutdown.spread`.
    Drain {
        /// The admin listener; default: `admin.listen` of --config, else 127.0.0.1:9090.
        #[arg(long, value_name = "ADDR")]
        admin: Option<SocketAddr>,
        /// Wait until no WebSocket is left or the drain deadline passed, then say how
        /// they ended.
        #[arg(long)]
        wait: bool,
    },
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
    if let Some(Command::Drain { admin, wait }) = cli.command {
        return drain(admin, cli.config.as_deref(), wait);
    }
    let source = Source {
        path: cli.config.clone(),
        listen: cli.listen.clone(),
        backend: cli.backend.clone(),
    };
    let loaded = source
        .read()
        .and_then(|content| Ok((source.parse(&content)?, content)));
    let (config, content) = match loaded {
        Ok(loaded) => loaded,
        Err(e) => {
            match &source.path {
                Some(path) => eprintln!("wsgate: {}: {e}", path.display()),
                None => eprintln!("wsgate: {e}"),
            }
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match cli.command {
        Some(Command::Demo) => demo(config, source, content),
        Some(Command::Drain { .. }) | None => {
            let logging = Logging::init(config.log.format);
            match bind(&config) {
                Some(listeners) => serve(config, listeners, source, content, logging),
                None => ExitCode::FAILURE,
            }
        }
    }
}

/// Raises the open-file limit, then binds the proxy and admin addresses.
fn bind(config: &Config) -> Option<Listeners> {
    raise_fd_limit(config.max_connections, config.workers.count());
    Listeners::bind(config)
        .map_err(|e| tracing::error!("{e}"))
        .ok()
}

/// `wsgate demo`: wsgate in front of the built-in demo backend, on the same code path as
/// in production; only the backend is built in.
fn demo(mut config: Config, mut source: Source, content: Vec<u8>) -> ExitCode {
    if source.path.is_none() {
        // A first run on a laptop: loopback only, liveness pings quick enough to watch,
        // and the admin page's close buttons on (its listener is loopback too).
        if source.listen.is_none() {
            config.listen = (Ipv4Addr::LOCALHOST, 8080).into();
        }
        config.websocket.ping_interval = Some(Duration::from_secs(5));
        config.websocket.pong_timeout = Duration::from_secs(3);
        config.admin.allow_close = true;
    }
    let logging = Logging::init(config.log.format);
    let Some(listeners) = bind(&config) else {
        return ExitCode::FAILURE;
    };
    let proxy = match listeners.local_addr() {
        Ok(addr) => reachable(addr),
        Err(e) => {
            tracing::error!(error = %e, "the proxy listener has no address");
            return ExitCode::FAILURE;
        }
    };
    let admin = listeners
        .admin
        .as_ref()
        .and_then(|l| l.local_addr().ok())
        .map(reachable);
    let backend = match DemoBackend::start(Links {
        proxy,
        admin_page: admin.map(|a| format!("http://{a}/")),
    }) {
        Ok(backend) => backend,
        Err(e) => {
            tracing::error!(error = %e, "the demo backend cannot start");
            return ExitCode::FAILURE;
        }
    };
    let url = format!("http://{}", backend.addr());
    // A reload of the file keeps the demo backend, as the command line keeps its own.
    source.backend = Some(url.clone());
    config.backend = match BackendUrl::parse(&url) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "the demo backend's address");
            return ExitCode::FAILURE;
        }
    };
    println!("demo:  http://{proxy}/");
    match admin {
        Some(admin) => println!("admin: http://{admin}/"),
        None => println!("admin: off (admin.listen = \"\")"),
    }
    let _ = std::io::stdout().flush();
    let served = serve(config, listeners, source, content, logging);
    drop(backend);
    served
}

/// Runs the proxy until SIGTERM or SIGINT; `content` is the configuration file's, for
/// the reload to compare with.
fn serve(
    config: Config,
    listeners: Listeners,
    source: Source,
    content: Vec<u8>,
    logging: Logging,
) -> ExitCode {
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
    let process = Process {
        source: source.path.is_some().then_some((source, content)),
        logging: Some(logging),
    };
    let served = runtime.block_on(wsgate::run(config, listeners, process));
    if let Err(e) = &served {
        tracing::error!("{e}");
    }
    // Lines still queued for the log are written before the process ends.
    wsgate::logging::flush();
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}

/// `wsgate drain`: starts the drain of the wsgate at `admin` (or the admin address of
/// the configuration file) and, with `wait`, waits for it. Only `admin.listen` is read
/// from the file, so that a file the running wsgate refused (and kept its own
/// configuration) does not stop its drain.
fn drain(admin: Option<SocketAddr>, config: Option<&Path>, wait: bool) -> ExitCode {
    let admin = match (admin, config) {
        (Some(admin), _) => admin,
        (None, None) => default_admin(),
        (None, Some(path)) => {
            let listen = std::fs::read_to_string(path)
                .map_err(|e| e.to_string())
                .and_then(|text| wsgate::config::admin_listen_of(&text));
            match listen {
                Ok(Some(addr)) => reachable(addr),
                Ok(None) => {
                    eprintln!(
                        "wsgate drain: {}: the admin listener is off (admin.listen = \"\"); give --admin",
                        path.display()
                    );
                    return ExitCode::from(EXIT_CONFIG);
                }
                Err(e) => {
                    let admin = default_admin();
                    eprintln!(
                        "wsgate drain: {}: {e}; trying the default admin address {admin}",
                        path.display()
                    );
                    admin
                }
            }
        }
    };
    match wsgate::drain::request(admin, wait) {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("wsgate drain: {e}");
            ExitCode::from(EXIT_UNAVAILABLE)
        }
    }
}

fn default_admin() -> SocketAddr {
    Config::default()
        .admin
        .listen
        .map_or((Ipv4Addr::LOCALHOST, 9090).into(), reachable)
}

/// Where to reach a listener bound to `addr`: loopback for a wildcard address.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, addr.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    }
}

/// Raises the soft open-file limit to the hard limit: each WebSocket holds two sockets,
/// and the default soft limit (often 1024) would cap wsgate at a few hundred. Says what
/// that allows, and warns only when a `max_connections` that was set cannot be honoured.
fn raise_fd_limit(max_connections: MaxConnections, workers: usize) {
    let open_files = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open-file limit");
            return;
        }
    };
    let Some(capacity) = wsgate::websocket_capacity(workers) else {
        return;
    };
    match max_connections {
        MaxConnections::Auto => tracing::info!(
            open_files,
            websocket_capacity = capacity,
            max_connections = max_connections.resolve(Some(capacity)),
            "max_connections from the open-file limit"
        ),
        MaxConnections::Count(n) if n > capacity => tracing::warn!(
            open_files,
            websocket_capacity = capacity,
            max_connections = n,
            "max_connections exceeds what the open-file limit allows"
        ),
        MaxConnections::Count(_) => tracing::info!(
            open_files,
            websocket_capacity = capacity,
            "file descriptor limit"
        ),
    }
}
