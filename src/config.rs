//! Configuration: one TOML file, every key optional with a documented default.
//!
//! The file is read in two steps: TOML syntax first, then every key by hand against the
//! schema below. Doing the second step by hand (rather than with serde) lets wsgate report
//! *every* problem at once, each with its key path, and reject unknown keys, so a typo is
//! never silently ignored. `config.example.toml` documents every key and is parsed by a
//! test, so it cannot drift from this file.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::{Table, Value};

use crate::session::Timers;

/// The whole configuration, with defaults filled in.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Where clients connect. Default `0.0.0.0:8080`.
    pub listen: SocketAddr,
    /// The one backend everything is forwarded to. Default `http://127.0.0.1:5080`.
    pub backend: BackendUrl,
    /// Client TCP connections (HTTP and WebSocket) served at once; the next one gets a
    /// 503. Each WebSocket also holds a backend socket, so the file descriptors used are
    /// about twice this. Default [`MaxConnections::Auto`].
    pub max_connections: MaxConnections,
    /// Worker threads, each with its own listening socket and runtime (see
    /// [`crate::worker`]). Default [`Workers::Auto`].
    pub workers: Workers,
    /// How often the configuration file is checked for new content, which is then
    /// reloaded (as on SIGHUP); `None` ("0s") reloads only on SIGHUP. Default 10s.
    pub reload_interval: Option<Duration>,
    pub http: HttpConfig,
    pub websocket: WebSocketConfig,
    pub shutdown: ShutdownConfig,
    pub admin: AdminConfig,
    pub log: LogConfig,
    /// `[tls]`: terminate TLS for clients; `None` (the default) serves plain HTTP.
    pub tls: Option<TlsConfig>,
    pub backend_tls: BackendTlsConfig,
}

/// How many worker threads serve connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workers {
    /// One per CPU the process may use: its CPU affinity and its cgroup CPU quota (a
    /// container's `resources.limits.cpu`), so a sidecar limited to one CPU or less runs
    /// single-threaded.
    Auto,
    /// This many (1 to [`Workers::MAX`]).
    Count(usize),
}

impl Workers {
    pub const MAX: usize = 1024;

    /// The thread count this resolves to on this machine, now.
    pub fn count(self) -> usize {
        match self {
            Workers::Auto => std::thread::available_parallelism().map_or(1, |n| n.get()),
            Workers::Count(n) => n,
        }
    }
}

/// How many client connections may be open at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaxConnections {
    /// As many as the open-file limit allows (two descriptors per WebSocket, after
    /// wsgate's own), at most [`MaxConnections::AUTO_CAP`].
    Auto,
    /// This many (at least 1).
    Count(usize),
}

impl MaxConnections {
    /// The most [`MaxConnections::Auto`] resolves to.
    pub const AUTO_CAP: usize = 10_000;

    /// The number in force, given how many WebSockets the open-file limit allows
    /// (`None`: unknown).
    pub fn resolve(self, capacity: Option<usize>) -> usize {
        match self {
            MaxConnections::Auto => capacity.map_or(Self::AUTO_CAP, |c| c.clamp(1, Self::AUTO_CAP)),
            MaxConnections::Count(n) => n,
        }
    }
}

/// `[tls]`: TLS toward clients.
#[derive(Clone, Debug, PartialEq)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first (`tls.crt` of a Kubernetes Secret).
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// A client must finish the TLS handshake within this. Default 10s.
    pub handshake_timeout: Duration,
    /// How often the files are checked for a new certificate; `None` ("0s") checks only
    /// on SIGHUP. Default 10s.
    pub reload_interval: Option<Duration>,
    /// Offer HTTP/2 (ALPN `h2`), WebSocket included (RFC 8441). Default true.
    pub http2: bool,
}

/// `[backend_tls]`: TLS toward an `https://` backend.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BackendTlsConfig {
    /// PEM CA bundle to verify the backend with; `None` uses the system roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain and key for mutual TLS; both or neither.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// The name to verify the backend's certificate against; `None` uses the URL's host.
    pub server_name: Option<String>,
}

/// `[http]`: the HTTP side of both legs.
#[derive(Clone, Debug, PartialEq)]
pub struct HttpConfig {
    /// TCP connect to the backend; past it the client gets 502. Default 5s.
    pub connect_timeout: Duration,
    /// A client must send a whole request header within this. Default 10s.
    pub header_read_timeout: Duration,
    /// The backend must answer (response head) within this, else 504; `None` waits
    /// forever ("0s"). Default 60s.
    pub response_timeout: Option<Duration>,
    /// Largest request header section accepted from a client. Default 64 KiB.
    pub max_header_size: usize,
    /// Accept HTTP/2 with prior knowledge (h2c) on a plain listener. Default false.
    pub h2c: bool,
    /// A response body the client takes nothing of for this long ends the exchange
    /// (`client_stalled`): the backend is released, the client's connection (HTTP/1.1)
    /// or stream (HTTP/2) is cut. Also bounds a client connection whose socket accepts
    /// no bytes at all. `None` ("0s") disables it. Default 30s, as for WebSockets.
    pub write_timeout: Option<Duration>,
    /// A response body still open this long after its head makes the exchange a
    /// stream: listed on the admin page and in `/connections`, logged and recorded
    /// when it ends, whatever its outcome. (A `text/event-stream` response is a stream
    /// from its head.) Default 1s.
    pub stream_after: Duration,
    /// No body bytes either way for this long ends a streaming response
    /// (`stream_idle_timeout`; the client sees a truncation). `None` ("0s", the
    /// default) disables it.
    pub stream_idle_timeout: Option<Duration>,
    /// An event stream (`text/event-stream`, not compressed) quiet toward its client
    /// for this long gets an SSE comment line (`:` and a blank line) at an event
    /// boundary, which keeps idle-cutting load balancers in front of wsgate from
    /// closing it and finds a vanished HTTP/1.1 client by the failing write. `None`
    /// ("0s", the default) disables it.
    pub sse_heartbeat: Option<Duration>,
}

/// `[websocket]`: how relayed WebSocket connections are kept alive and ended.
#[derive(Clone, Debug, PartialEq)]
pub struct WebSocketConfig {
    /// wsgate pings a side that sent nothing for this long; `None` ("0s") disables
    /// liveness pings. Default 20s.
    pub ping_interval: Option<Duration>,
    /// A pinged side must send something back within this. Default 10s.
    pub pong_timeout: Duration,
    /// How long to wait for a Close reply, and then for the backend to close TCP (or for
    /// the last bytes to reach a client). Default 5s.
    pub close_timeout: Duration,
    /// No data frame either way for this long ends the connection; `None` ("0s", the
    /// default) disables it.
    pub idle_timeout: Option<Duration>,
    /// Connections end with 1001 at this age; `None` ("0s", the default) disables it.
    pub max_lifetime: Option<Duration>,
    /// Writes toward a side that make no progress for this long end the connection;
    /// `None` ("0s") disables it. Default 30s.
    pub write_timeout: Option<Duration>,
    /// Largest frame payload accepted from either side, else Close 1009; `None` (0, the
    /// default) accepts any size. Frames are streamed, so this bounds no memory.
    pub max_frame_size: Option<u64>,
    /// Origins allowed to open WebSockets (`scheme://host[:port]`, compared without
    /// case); others get 403. Empty (the default) allows every origin. Requests without
    /// an `Origin` header (non-browser clients) are always allowed: the check protects
    /// browsers against cross-site WebSocket hijacking.
    pub allowed_origins: Vec<String>,
}

impl WebSocketConfig {
    pub fn timers(&self) -> Timers {
        Timers {
            ping_interval: self.ping_interval,
            pong_timeout: self.pong_timeout,
            close_timeout: self.close_timeout,
            idle_timeout: self.idle_timeout,
            max_lifetime: self.max_lifetime,
            write_timeout: self.write_timeout,
        }
    }
}

/// `[shutdown]`: the drain, started by `POST /drain` (a Kubernetes `preStop` hook) or
/// by SIGTERM/SIGINT.
#[derive(Clone, Debug, PartialEq)]
pub struct ShutdownConfig {
    /// From the start of the drain to the forced close of whatever is still open. Keep
    /// it below the pod's `terminationGracePeriodSeconds`. Default 25s.
    pub drain_timeout: Duration,
    /// Open WebSockets get their Close at a random moment within this, from the start
    /// of the drain, so that their clients do not all reconnect at once. Must be below
    /// `drain_timeout`; when not set, a fifth of it (5s with the default).
    pub spread: Duration,
    /// The Close code a draining wsgate sends clients: 1012 "service restart" (the
    /// default: reconnect, elsewhere) or 1001 "going away". The backend gets 1001.
    pub client_close_code: u16,
}

/// The Close codes `shutdown.client_close_code` may be.
pub const DRAIN_CLOSE_CODES: [u16; 2] = [1001, 1012];

/// `[admin]`: the operator's listener (`/livez`, `/readyz`).
#[derive(Clone, Debug, PartialEq)]
pub struct AdminConfig {
    /// Address of the admin listener; `None` ("") disables it. Default `127.0.0.1:9090`.
    pub listen: Option<SocketAddr>,
    /// Whether `POST /connections/{id}/close` may close connections. Default false.
    pub allow_close: bool,
    /// How many ended connections the admin page and `/connections/recent` keep, newest
    /// first (0 to [`MAX_RECENT_ENDINGS`]). Default 200.
    pub recent_endings: usize,
}

/// The most ended connections `admin.recent_endings` may keep (a record is a few
/// hundred bytes).
pub const MAX_RECENT_ENDINGS: usize = 10_000;

/// `[log]`: what the logs look like.
#[derive(Clone, Debug, PartialEq)]
pub struct LogConfig {
    pub format: LogFormat,
    /// Which HTTP exchanges get a line when they end. Default [`HttpLog::Streams`].
    pub http: HttpLog,
}

/// Which HTTP exchanges are logged (`log.http`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpLog {
    /// Streams (event streams, bodies open past `http.stream_after`) and every exchange
    /// that did not complete: the ones the admin page lists.
    Streams,
    /// Every exchange: an access log.
    All,
    /// None.
    Off,
}

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable text (the default).
    Text,
    /// One JSON object per line.
    Json,
}

/// The backend, from a URL such as `http://127.0.0.1:5080`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendUrl {
    /// `https://`: connect with TLS.
    pub tls: bool,
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    pub port: u16,
    /// `host:port` as it goes into absolute URIs (IPv6 in brackets).
    pub authority: String,
    /// In the same network namespace (the sidecar case): `localhost` or a loopback
    /// address.
    pub loopback: bool,
}

impl BackendUrl {
    /// Parses `http://host[:port][/]` or `https://host[:port][/]`.
    pub fn parse(url: &str) -> Result<BackendUrl, String> {
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            Some(other) => {
                return Err(format!(
                    "scheme {other:?} is not supported: use http://host:port or https://host:port"
                ));
            }
            None => return Err(format!("{url:?} has no scheme: use http://host:port")),
        };
        let authority = uri
            .authority()
            .ok_or_else(|| format!("{url:?} has no host"))?;
        if authority.as_str().contains('@') {
            return Err("user info in the backend URL is not supported".into());
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(format!(
                "{url:?} has a path or query: wsgate forwards paths unchanged, give only http://host:port"
            ));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let loopback = host.eq_ignore_ascii_case("localhost")
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        Ok(BackendUrl {
            tls,
            host: host.to_string(),
            port,
            authority,
            loopback,
        })
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            backend: BackendUrl {
                tls: false,
                host: "127.0.0.1".into(),
                port: 5080,
                authority: "127.0.0.1:5080".into(),
                loopback: true,
            },
            max_connections: MaxConnections::Auto,
            workers: Workers::Auto,
            reload_interval: Some(Duration::from_secs(10)),
            http: HttpConfig {
                connect_timeout: Duration::from_secs(5),
                header_read_timeout: Duration::from_secs(10),
                response_timeout: Some(Duration::from_secs(60)),
                max_header_size: 64 * 1024,
                h2c: false,
                write_timeout: Some(Duration::from_secs(30)),
                stream_after: Duration::from_secs(1),
                stream_idle_timeout: None,
                sse_heartbeat: None,
            },
            websocket: WebSocketConfig {
                ping_interval: Some(Duration::from_secs(20)),
                pong_timeout: Duration::from_secs(10),
                close_timeout: Duration::from_secs(5),
                idle_timeout: None,
                max_lifetime: None,
                write_timeout: Some(Duration::from_secs(30)),
                max_frame_size: None,
                allowed_origins: Vec::new(),
            },
            shutdown: ShutdownConfig {
                drain_timeout: Duration::from_secs(25),
                spread: Duration::from_secs(5),
                client_close_code: 1012,
            },
            admin: AdminConfig {
                listen: Some(SocketAddr::from(([127, 0, 0, 1], 9090))),
                allow_close: false,
                recent_endings: 200,
            },
            log: LogConfig {
                format: LogFormat::Text,
                http: HttpLog::Streams,
            },
            tls: None,
            backend_tls: BackendTlsConfig::default(),
        }
    }
}

/// One problem in the configuration, with the key it concerns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, e.g. `websocket.ping_interval`; empty for the file as a whole.
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

/// Why a configuration could not be loaded: every problem found.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// The file was read but is invalid; fix each problem listed.
    #[error("{} problem(s) in the configuration:\n{}", .0.len(), .0.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
}

/// Where the configuration comes from: a file, or none (the defaults), and the command
/// line's `--listen` and `--backend`, which win over the file. A reload reads the same
/// source again.
#[derive(Clone, Debug, Default)]
pub struct Source {
    pub path: Option<PathBuf>,
    pub listen: Option<String>,
    pub backend: Option<String>,
}

impl Source {
    /// The file's content; empty without a file.
    pub fn read(&self) -> Result<Vec<u8>, ConfigError> {
        match &self.path {
            None => Ok(Vec::new()),
            Some(path) => std::fs::read(path).map_err(|source| ConfigError::Read {
                path: path.display().to_string(),
                source,
            }),
        }
    }

    /// The configuration from the file's `content` (as [`Source::read`] gave it) with
    /// the command line's values over it.
    pub fn parse(&self, content: &[u8]) -> Result<Config, ConfigError> {
        let text = std::str::from_utf8(content).map_err(|e| {
            ConfigError::Invalid(vec![Problem {
                key: String::new(),
                message: format!("not UTF-8 text: {e}"),
            }])
        })?;
        let mut problems = Vec::new();
        let mut config = match Config::parse(text) {
            Ok(config) => config,
            Err(ConfigError::Invalid(found)) => {
                problems = found;
                Config::default()
            }
            Err(e) => return Err(e),
        };
        let mut flag = |key: &str, message: String| {
            problems.push(Problem {
                key: key.into(),
                message,
            })
        };
        if let Some(listen) = &self.listen {
            match parse_addr(listen) {
                Ok(addr) => config.listen = addr,
                Err(e) => flag("--listen", e),
            }
        }
        if let Some(url) = &self.backend {
            match BackendUrl::parse(url) {
                Ok(backend) => config.backend = backend,
                Err(e) => flag("--backend", e),
            }
        }
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }
}

/// The `admin.listen` of a configuration text, read alone: for `wsgate drain`, which
/// must reach a running wsgate even when its file no longer validates as a whole (a
/// bad ConfigMap that the running process refused). `Ok(None)`: the admin listener is
/// off.
pub fn admin_listen_of(text: &str) -> Result<Option<SocketAddr>, String> {
    let table: Table = text
        .parse()
        .map_err(|e: toml::de::Error| format!("invalid TOML: {}", e.to_string().trim_end()))?;
    match table.get("admin").and_then(|a| a.get("listen")) {
        None => Ok(Config::default().admin.listen),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => parse_addr(s)
            .map(Some)
            .map_err(|e| format!("admin.listen: {e}")),
        Some(other) => Err(format!(
            "admin.listen: expected a string, found {}",
            other.type_str()
        )),
    }
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&text)
    }

    /// Parses and validates configuration text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let table: Table = text.parse().map_err(|e: toml::de::Error| {
            ConfigError::Invalid(vec![Problem {
                key: String::new(),
                message: format!("invalid TOML: {}", e.to_string().trim_end()),
            }])
        })?;
        let mut problems = Vec::new();
        let config = read(&table, &mut problems);
        config.validate(&mut problems);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// Checks the relations between keys that single values cannot show.
    fn validate(&self, problems: &mut Vec<Problem>) {
        let mut problem = |key: &str, message: &str| {
            problems.push(Problem {
                key: key.into(),
                message: message.into(),
            })
        };
        let ws = &self.websocket;
        if ws.ping_interval.is_some() && ws.pong_timeout.is_zero() {
            problem(
                "websocket.pong_timeout",
                "must be above 0s while ping_interval is on",
            );
        }
        if ws.close_timeout.is_zero() {
            problem(
                "websocket.close_timeout",
                "must be above 0s: every Close handshake needs a bound",
            );
        }
        if self.shutdown.drain_timeout.is_zero() {
            problem("shutdown.drain_timeout", "must be above 0s");
        } else if self.shutdown.spread >= self.shutdown.drain_timeout {
            problem(
                "shutdown.spread",
                "must be below shutdown.drain_timeout: the Closes are spread within the drain",
            );
        }
        if self.http.connect_timeout.is_zero() {
            problem("http.connect_timeout", "must be above 0s");
        }
        if self.http.header_read_timeout.is_zero() {
            problem("http.header_read_timeout", "must be above 0s");
        }
        if self.http.stream_after.is_zero() {
            problem(
                "http.stream_after",
                "must be above 0s: it is how long a body stays open before it counts as a stream",
            );
        }

        if self.admin.recent_endings > MAX_RECENT_ENDINGS {
            problem(
                "admin.recent_endings",
                &format!("must be at most {MAX_RECENT_ENDINGS}"),
            );
        }
        if self.http.max_header_size < 1024 {
            problem("http.max_header_size", "must be at least 1024 bytes");
        }
        let b = &self.backend_tls;
        if b.client_cert.is_some() != b.client_key.is_some() {
            problem(
                "backend_tls.client_cert",
                "client_cert and client_key go together: set both or neither",
            );
        }
        if !self.backend.tls && *b != BackendTlsConfig::default() {
            problem("backend_tls", "is set but the backend URL is not https://");
        }
        if let Some(tls) = &self.tls
            && tls.handshake_timeout.is_zero()
        {
            problem("tls.handshake_timeout", "must be above 0s");
        }
    }
}

/// Reads the known keys of `root`, recording a problem for each bad or unknown one.
fn read(root: &Table, problems: &mut Vec<Problem>) -> Config {
    let d = Config::default();
    let mut top = Section::new(root, "", problems);
    let listen = top.parsed("listen", d.listen, parse_addr);
    let backend = top.parsed("backend", d.backend, BackendUrl::parse);
    let max_connections = top.max_connections("max_connections", d.max_connections);
    let workers = top.workers("workers", d.workers);
    let reload_interval = top.optional_duration("reload_interval", d.reload_interval);
    let http = top.table("http");
    let websocket = top.table("websocket");
    let shutdown = top.table("shutdown");
    let admin = top.table("admin");
    let log = top.table("log");
    let tls = top.table("tls");
    let tls_present = top.table.contains_key("tls");
    let backend_tls = top.table("backend_tls");
    top.finish();

    let mut s = Section::new(&http, "http", problems);
    let http = HttpConfig {
        connect_timeout: s.duration("connect_timeout", d.http.connect_timeout),
        header_read_timeout: s.duration("header_read_timeout", d.http.header_read_timeout),
        response_timeout: s.optional_duration("response_timeout", d.http.response_timeout),
        max_header_size: s.integer("max_header_size", d.http.max_header_size as u64) as usize,
        h2c: s.boolean("h2c", d.http.h2c),
        write_timeout: s.optional_duration("write_timeout", d.http.write_timeout),
        stream_after: s.duration("stream_after", d.http.stream_after),
        stream_idle_timeout: s.optional_duration("stream_idle_timeout", d.http.stream_idle_timeout),
        sse_heartbeat: s.optional_duration("sse_heartbeat", d.http.sse_heartbeat),
    };
    s.finish();

    let w = d.websocket;
    let mut s = Section::new(&websocket, "websocket", problems);
    let websocket = WebSocketConfig {
        ping_interval: s.optional_duration("ping_interval", w.ping_interval),
        pong_timeout: s.duration("pong_timeout", w.pong_timeout),
        close_timeout: s.duration("close_timeout", w.close_timeout),
        idle_timeout: s.optional_duration("idle_timeout", w.idle_timeout),
        max_lifetime: s.optional_duration("max_lifetime", w.max_lifetime),
        write_timeout: s.optional_duration("write_timeout", w.write_timeout),
        max_frame_size: Some(s.integer("max_frame_size", w.max_frame_size.unwrap_or(0)))
            .filter(|n| *n > 0),
        allowed_origins: s.strings("allowed_origins", w.allowed_origins),
    };
    s.finish();

    let mut s = Section::new(&shutdown, "shutdown", problems);
    let drain_timeout = s.duration("drain_timeout", d.shutdown.drain_timeout);
    let shutdown = ShutdownConfig {
        drain_timeout,
        spread: s.duration("spread", drain_timeout / 5),
        client_close_code: s
            .integer("client_close_code", d.shutdown.client_close_code.into())
            .try_into()
            .ok()
            .filter(|c| DRAIN_CLOSE_CODES.contains(c))
            .unwrap_or_else(|| {
                s.problem(
                    "client_close_code",
                    "must be 1012 (service restart) or 1001 (going away)".into(),
                );
                d.shutdown.client_close_code
            }),
    };
    s.finish();

    let mut s = Section::new(&admin, "admin", problems);
    let admin = AdminConfig {
        listen: s.parsed("listen", d.admin.listen, |v| {
            if v.is_empty() {
                Ok(None)
            } else {
                parse_addr(v).map(Some)
            }
        }),
        allow_close: s.boolean("allow_close", d.admin.allow_close),
        recent_endings: s.integer("recent_endings", d.admin.recent_endings as u64) as usize,
    };
    s.finish();

    let mut s = Section::new(&log, "log", problems);
    let log = LogConfig {
        format: s.parsed("format", d.log.format, |v| match v {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!(
                "{v:?} is not a log format: use \"text\" or \"json\""
            )),
        }),
        http: s.parsed("http", d.log.http, |v| match v {
            "streams" => Ok(HttpLog::Streams),
            "all" => Ok(HttpLog::All),
            "off" => Ok(HttpLog::Off),
            _ => Err(format!(
                "{v:?} is not an HTTP log setting: use \"streams\", \"all\" or \"off\""
            )),
        }),
    };
    s.finish();

    let mut s = Section::new(&tls, "tls", problems);
    let cert = s.parsed("cert", None, |v| Ok(Some(PathBuf::from(v))));
    let key = s.parsed("key", None, |v| Ok(Some(PathBuf::from(v))));
    let handshake_timeout = s.duration("handshake_timeout", Duration::from_secs(10));
    let cert_reload_interval =
        s.optional_duration("reload_interval", Some(Duration::from_secs(10)));
    let http2 = s.boolean("http2", true);
    let tls = match (cert, key) {
        (Some(cert), Some(key)) => Some(TlsConfig {
            cert,
            key,
            handshake_timeout,
            reload_interval: cert_reload_interval,
            http2,
        }),
        (None, None) if !tls_present => None,
        _ => {
            s.problem("cert", "tls needs both cert and key".into());
            None
        }
    };
    s.finish();

    let mut s = Section::new(&backend_tls, "backend_tls", problems);
    let path = |v: &str| Ok(Some(PathBuf::from(v)));
    let backend_tls = BackendTlsConfig {
        ca_file: s.parsed("ca_file", None, path),
        client_cert: s.parsed("client_cert", None, path),
        client_key: s.parsed("client_key", None, path),
        server_name: s.parsed("server_name", None, |v| Ok(Some(v.to_string()))),
    };
    s.finish();

    Config {
        listen,
        backend,
        max_connections,
        workers,
        reload_interval,
        http,
        websocket,
        shutdown,
        admin,
        log,
        tls,
        backend_tls,
    }
}

fn parse_addr(v: &str) -> Result<SocketAddr, String> {
    v.parse()
        .map_err(|_| format!("{v:?} is not an address: use IP:PORT, e.g. \"0.0.0.0:8080\""))
}

/// Parses a duration such as "15s", "2m" or "1h 30m".
pub fn parse_duration(v: &str) -> Result<Duration, String> {
    humantime::parse_duration(v)
        .map_err(|e| format!("{v:?} is not a duration ({e}): use e.g. \"15s\", \"2m\", \"0s\""))
}

/// Reads the keys of one table, remembering which were read so the rest can be
/// reported as unknown.
struct Section<'a> {
    table: &'a Table,
    path: &'static str,
    seen: Vec<&'static str>,
    problems: &'a mut Vec<Problem>,
}

impl<'a> Section<'a> {
    fn new(table: &'a Table, path: &'static str, problems: &'a mut Vec<Problem>) -> Self {
        Section {
            table,
            path,
            seen: Vec::new(),
            problems,
        }
    }

    fn key_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn problem(&mut self, key: &str, message: String) {
        let key = self.key_path(key);
        self.problems.push(Problem { key, message });
    }

    fn get(&mut self, key: &'static str) -> Option<&'a Value> {
        self.seen.push(key);
        self.table.get(key)
    }

    /// A string value turned into `T` by `parse`.
    fn parsed<T>(
        &mut self,
        key: &'static str,
        default: T,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> T {
        match self.get(key) {
            None => default,
            Some(Value::String(s)) => parse(s).unwrap_or_else(|e| {
                self.problem(key, e);
                default
            }),
            Some(other) => {
                self.problem(
                    key,
                    format!("expected a string, found {}", other.type_str()),
                );
                default
            }
        }
    }

    fn duration(&mut self, key: &'static str, default: Duration) -> Duration {
        self.parsed(key, default, parse_duration)
    }

    /// A duration where "0s" means off.
    fn optional_duration(
        &mut self,
        key: &'static str,
        default: Option<Duration>,
    ) -> Option<Duration> {
        self.parsed(key, default, |v| {
            parse_duration(v).map(|d| Some(d).filter(|d| !d.is_zero()))
        })
    }

    fn integer(&mut self, key: &'static str, default: u64) -> u64 {
        match self.get(key) {
            None => default,
            Some(Value::Integer(n)) if *n >= 0 => *n as u64,
            Some(Value::Integer(n)) => {
                self.problem(key, format!("must not be negative, found {n}"));
                default
            }
            Some(other) => {
                self.problem(
                    key,
                    format!("expected an integer, found {}", other.type_str()),
                );
                default
            }
        }
    }

    fn max_connections(&mut self, key: &'static str, default: MaxConnections) -> MaxConnections {
        match self.get(key) {
            None => default,
            Some(Value::String(s)) if s == "auto" => MaxConnections::Auto,
            Some(Value::Integer(n)) if *n >= 1 => {
                MaxConnections::Count(usize::try_from(*n).unwrap_or(usize::MAX))
            }
            Some(other) => {
                self.problem(
                    key,
                    format!("expected \"auto\" or a number of at least 1, found {other}"),
                );
                default
            }
        }
    }

    fn workers(&mut self, key: &'static str, default: Workers) -> Workers {
        match self.get(key) {
            None => default,
            Some(Value::String(s)) if s == "auto" => Workers::Auto,
            Some(Value::Integer(n)) if (1..=Workers::MAX as i64).contains(n) => {
                Workers::Count(*n as usize)
            }
            Some(other) => {
                self.problem(
                    key,
                    format!(
                        "expected \"auto\" or a thread count from 1 to {}, found {other}",
                        Workers::MAX
                    ),
                );
                default
            }
        }
    }

    fn strings(&mut self, key: &'static str, default: Vec<String>) -> Vec<String> {
        match self.get(key) {
            None => default,
            Some(Value::Array(items)) => {
                let strings: Vec<String> = items
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect();
                if strings.len() != items.len() {
                    self.problem(key, "expected an array of strings".into());
                }
                strings
            }
            Some(other) => {
                self.problem(
                    key,
                    format!("expected an array of strings, found {}", other.type_str()),
                );
                default
            }
        }
    }

    fn boolean(&mut self, key: &'static str, default: bool) -> bool {
        match self.get(key) {
            None => default,
            Some(Value::Boolean(b)) => *b,
            Some(other) => {
                self.problem(
                    key,
                    format!("expected true or false, found {}", other.type_str()),
                );
                default
            }
        }
    }

    fn table(&mut self, key: &'static str) -> Table {
        match self.get(key) {
            None => Table::new(),
            Some(Value::Table(t)) => t.clone(),
            Some(other) => {
                self.problem(key, format!("expected a table, found {}", other.type_str()));
                Table::new()
            }
        }
    }

    /// Reports every key that was not read.
    fn finish(self) {
        for key in self.table.keys() {
            if !self.seen.contains(&key.as_str()) {
                let mut known = self.seen.clone();
                known.sort_unstable();
                let key_path = self.key_path(key);
                self.problems.push(Problem {
                    key: key_path,
                    message: format!("unknown key (known here: {})", known.join(", ")),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<String> {
        match Config::parse(text) {
            Ok(_) => vec![],
            Err(ConfigError::Invalid(p)) => p.iter().map(|p| p.to_string()).collect(),
            Err(e) => vec![e.to_string()],
        }
    }

    #[test]
    fn empty_file_gives_the_defaults() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn the_example_config_parses_and_documents_every_default() {
        let text = include_str!("../config.example.toml");
        // Every key is present in the example with its default value.
        assert_eq!(Config::parse(text).unwrap(), Config::default());
        for key in [
            "listen",
            "backend",
            "max_connections",
            "workers",
            "connect_timeout",
            "header_read_timeout",
            "response_timeout",
            "max_header_size",
            "ping_interval",
            "pong_timeout",
            "close_timeout",
            "idle_timeout",
            "max_lifetime",
            "write_timeout",
            "max_frame_size",
            "allowed_origins",
            "drain_timeout",
            "spread",
            "client_close_code",
            "reload_interval",
            "allow_close",
            "recent_endings",
            "format",
            "h2c",
        ] {
            assert!(
                text.lines()
                    .any(|l| l.trim_start().starts_with(&format!("{key} "))),
                "config.example.toml does not set {key}"
            );
        }
        // The optional sections are documented commented out (they have no default).
        for key in [
            "[tls]",
            "cert",
            "key",
            "handshake_timeout",
            "reload_interval",
            "http2",
            "[backend_tls]",
            "ca_file",
            "client_cert",
            "client_key",
            "server_name",
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(&format!("# {key}"))),
                "config.example.toml does not document {key}"
            );
        }
        // Uncommented, the optional sections parse.
        let uncommented: String = text
            .lines()
            .map(|l| {
                l.strip_prefix("# ")
                    .filter(|r| {
                        let key = r.split(" = ").next().unwrap_or("");
                        r.starts_with('[')
                            || (r.contains(" = ")
                                && key.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
                    })
                    .unwrap_or(l)
            })
            .collect::<Vec<_>>()
            .join("\n")
            .replace("backend = \"http://", "backend = \"https://");
        let c = Config::parse(&uncommented).unwrap();
        let tls = c.tls.unwrap();
        assert_eq!(tls.cert, PathBuf::from("/etc/wsgate/tls/tls.crt"));
        assert!(tls.http2);
        assert_eq!(
            c.backend_tls.server_name.as_deref(),
            Some("backend.internal")
        );

        // The README's configuration table names every key of the example.
        let readme = include_str!("../README.md");
        let table: Table = uncommented.parse().unwrap();
        for (name, value) in &table {
            let keys: Vec<String> = match value {
                Value::Table(section) => section.keys().map(|k| format!("{name}.{k}")).collect(),
                _ => vec![name.clone()],
            };
            for key in keys {
                assert!(
                    readme.contains(&format!("| `{key}`"))
                        || readme.contains(&format!(", `{key}`")),
                    "README.md's configuration table does not list {key}"
                );
            }
        }
    }

    #[test]
    fn values_are_read() {
        let c = Config::parse(
            r#"
            listen = "127.0.0.1:1"
            backend = "http://[::1]:81/"
            max_connections = 5
            [websocket]
            ping_interval = "0s"
            idle_timeout = "2m"
            max_frame_size = 1024
            allowed_origins = ["https://dash.example"]
            [admin]
            listen = ""
            [log]
            format = "json"
            "#,
        )
        .unwrap();
        assert_eq!(c.listen, "127.0.0.1:1".parse().unwrap());
        assert_eq!(c.backend.authority, "[::1]:81");
        assert_eq!(c.backend.host, "::1");
        assert_eq!(c.max_connections, MaxConnections::Count(5));
        assert_eq!(c.websocket.ping_interval, None);
        assert_eq!(c.websocket.idle_timeout, Some(Duration::from_secs(120)));
        assert_eq!(c.websocket.max_frame_size, Some(1024));
        assert_eq!(c.websocket.allowed_origins, vec!["https://dash.example"]);
        assert_eq!(c.admin.listen, None);
        assert_eq!(c.log.format, LogFormat::Json);
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let p = problems(
            r#"
            listen = "nowhere"
            backend = "ftp://x"
            max_connections = -1
            colour = "blue"
            [websocket]
            ping_interval = 20
            close_timeout = "0s"
            pong_timout = "1s"
            [shutdown]
            drain_timeout = "soon"
            "#,
        );
        let keys: Vec<&str> = p.iter().map(|l| l.split(':').next().unwrap()).collect();
        assert_eq!(
            keys,
            vec![
                "listen",
                "backend",
                "max_connections",
                "colour",
                "websocket.ping_interval",
                "websocket.pong_timout",
                "shutdown.drain_timeout",
                "websocket.close_timeout",
            ],
            "{p:#?}"
        );
        assert!(p[5].contains("unknown key"), "{}", p[5]);
        assert!(
            p[4].contains("expected a string, found integer"),
            "{}",
            p[4]
        );
    }

    #[test]
    fn max_connections_is_auto_or_a_count_and_auto_follows_the_file_limit() {
        let max = |v: &str| {
            Config::parse(&format!("max_connections = {v}"))
                .ok()
                .map(|c| c.max_connections)
        };
        assert_eq!(Config::default().max_connections, MaxConnections::Auto);
        assert_eq!(max("\"auto\""), Some(MaxConnections::Auto));
        assert_eq!(max("20000"), Some(MaxConnections::Count(20_000)));
        for bad in ["0", "-1", "\"many\""] {
            let p = problems(&format!("max_connections = {bad}"));
            assert!(
                p[0].starts_with("max_connections: expected \"auto\""),
                "{p:?}"
            );
        }
        assert_eq!(MaxConnections::Auto.resolve(Some(9_936)), 9_936);
        assert_eq!(MaxConnections::Auto.resolve(Some(400_000)), 10_000);
        assert_eq!(MaxConnections::Auto.resolve(None), 10_000);
        assert_eq!(MaxConnections::Count(20_000).resolve(Some(9_936)), 20_000);
    }

    #[test]
    fn workers_are_auto_or_a_count() {
        let workers = |v: &str| {
            Config::parse(&format!("workers = {v}"))
                .ok()
                .map(|c| c.workers)
        };
        assert_eq!(Config::default().workers, Workers::Auto);
        assert_eq!(workers("\"auto\""), Some(Workers::Auto));
        assert_eq!(workers("1"), Some(Workers::Count(1)));
        assert_eq!(workers("16"), Some(Workers::Count(16)));
        assert!(Workers::Auto.count() >= 1);
        for bad in ["0", "1025", "-2", "\"all\"", "2.5"] {
            let p = problems(&format!("workers = {bad}"));
            assert_eq!(p.len(), 1, "{bad}: {p:?}");
            assert!(
                p[0].starts_with("workers: expected \"auto\" or a thread count from 1 to 1024"),
                "{bad}: {p:?}"
            );
        }
    }

    #[test]
    fn the_admin_address_is_read_alone_from_a_file_that_does_not_validate() {
        let broken = "max_connections = -1\n[admin]\nlisten = \"127.0.0.1:7000\"\n";
        assert!(Config::parse(broken).is_err());
        assert_eq!(
            admin_listen_of(broken),
            Ok(Some("127.0.0.1:7000".parse().unwrap()))
        );
        assert_eq!(
            admin_listen_of("listen = \"x\""),
            Ok(Config::default().admin.listen)
        );
        assert_eq!(admin_listen_of("[admin]\nlisten = \"\""), Ok(None));
        assert!(admin_listen_of("[admin]\nlisten = 9").is_err());
        assert!(admin_listen_of("[admin").is_err());
    }

    #[test]
    fn syntax_errors_are_reported() {
        let p = problems("listen = ");
        assert_eq!(p.len(), 1);
        assert!(p[0].starts_with("invalid TOML"), "{p:?}");
    }

    #[test]
    fn backend_urls() {
        assert_eq!(
            BackendUrl::parse("http://backend.default.svc:8080")
                .unwrap()
                .authority,
            "backend.default.svc:8080"
        );
        assert_eq!(BackendUrl::parse("http://localhost").unwrap().port, 80);
        assert!(BackendUrl::parse("http://x/api").is_err());
        let tls = BackendUrl::parse("https://x").unwrap();
        assert_eq!((tls.tls, tls.port), (true, 443));
        assert!(BackendUrl::parse("ws://x").is_err());
        assert!(BackendUrl::parse("127.0.0.1:80").is_err());
    }

    #[test]
    fn loopback_backends_are_recognised() {
        let lo = |url| BackendUrl::parse(url).unwrap().loopback;
        assert!(lo("http://localhost:5080"));
        assert!(lo("http://127.0.0.1:5080"));
        assert!(lo("http://127.8.9.10"));
        assert!(lo("http://[::1]:5080"));
        assert!(!lo("http://10.0.0.1:5080"));
        assert!(!lo("http://backend.default.svc:8080"));
    }
}
