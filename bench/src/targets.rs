//! The targets (direct, wsgate, nginx, HAProxy): finding them, writing their
//! configuration from the templates in `bench/`, starting and stopping them.

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::procfs;
use crate::scrape::{Scraper, Scrapes};

const NGINX_TEMPLATE: &str = include_str!("../nginx.conf");
const HAPROXY_TEMPLATE: &str = include_str!("../haproxy.cfg");
const WSGATE_TEMPLATE: &str = include_str!("../wsgate.toml");

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    /// No proxy: the load generator talks to the backend.
    Direct,
    /// wsgate with its default configuration (`workers = "auto"`: one thread per CPU).
    Wsgate,
    /// wsgate with `workers = 1`: everything on one thread, as a sidecar limited to one
    /// CPU or less runs.
    #[value(name = "wsgate-1")]
    Wsgate1,
    /// wsgate without what production adds: liveness pings off, admin listener off,
    /// `RUST_LOG=warn` (no line per connection). An extra row for comparison.
    #[value(name = "wsgate-lean")]
    WsgateLean,
    /// Another wsgate build (`--wsgate-base`, e.g. the previous commit's) with the
    /// default configuration: a baseline, so the table gives each configuration's
    /// ratio to it, measured in the same run.
    #[value(name = "wsgate-base")]
    WsgateBase,
    Nginx,
    Haproxy,
    /// nginx with `worker_processes 1`: the anchor for `wsgate-1`.
    #[value(name = "nginx-1")]
    Nginx1,
    /// HAProxy with `nbthread 1`: the anchor for `wsgate-1`.
    #[value(name = "haproxy-1")]
    Haproxy1,
}

impl Target {
    /// One of wsgate's configurations, as opposed to the baselines.
    pub fn is_wsgate(self) -> bool {
        matches!(self, Target::Wsgate | Target::Wsgate1 | Target::WsgateLean)
    }

    /// An anchor limited to one worker (nginx-1, HAProxy-1): the table compares only
    /// `wsgate-1` with it, one thread against one worker.
    pub fn is_single_worker_anchor(self) -> bool {
        matches!(self, Target::Nginx1 | Target::Haproxy1)
    }

    pub fn is_nginx(self) -> bool {
        matches!(self, Target::Nginx | Target::Nginx1)
    }

    pub fn is_haproxy(self) -> bool {
        matches!(self, Target::Haproxy | Target::Haproxy1)
    }

    /// Runs a wsgate binary (this build's or the base build's).
    fn runs_wsgate(self) -> bool {
        self.is_wsgate() || self == Target::WsgateBase
    }

    /// The name on the command line (`wsgate-lean`), for file names.
    pub fn id(self) -> String {
        use clap::ValueEnum;
        self.to_possible_value()
            .map_or_else(|| format!("{self:?}"), |v| v.get_name().to_string())
    }

    pub fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Wsgate => "wsgate",
            Target::Wsgate1 => "wsgate 1 thread",
            Target::WsgateLean => "wsgate lean (no pings, no log, no admin)",
            Target::WsgateBase => "wsgate base build",
            Target::Nginx => "nginx",
            Target::Haproxy => "HAProxy",
            Target::Nginx1 => "nginx 1 worker",
            Target::Haproxy1 => "HAProxy 1 thread",
        }
    }
}

/// The proxy programs found on this machine.
#[derive(Debug, Clone)]
pub struct Tools {
    pub wsgate: PathBuf,
    /// The baseline build of `--wsgate-base`.
    pub wsgate_base: Option<PathBuf>,
    pub nginx: Option<PathBuf>,
    pub haproxy: Option<PathBuf>,
    /// HAProxy's maxconn, 20000 unless the open-file limit forbids it.
    pub haproxy_maxconn: u64,
    /// The hard open-file limit, which every proxy gets.
    pub nofile: u64,
}

/// Finds an executable on PATH or in the sbin directories (not always on PATH).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// A free TCP port on 127.0.0.1 (the kernel's choice; a race with other programs is
/// possible but unlikely).
pub fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("cannot bind 127.0.0.1:0 to find a free port")
}

/// Waits until `addr` accepts TCP connections, or `child` exits, or 10 s pass.
pub fn wait_ready(
    addr: SocketAddr,
    child: &mut Child,
    what: &str,
    log: &Path,
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "{what} exited at start ({status}); its log {}:\n{}",
                log.display(),
                tail(log)
            ));
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{what} does not accept connections on {addr} after 10 s; its log {}:\n{}",
                log.display(),
                tail(log)
            ));
        }
        sleep(Duration::from_millis(20));
    }
}

fn tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Sends `signal` to `pid` with kill(1) (the crate forbids unsafe code, so no libc).
pub fn signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// How long a proxy has to exit after SIGTERM before it is killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// A running proxy. Stopped (SIGTERM, then SIGKILL to the whole tree) on drop.
pub struct Proxy {
    pub listen: SocketAddr,
    child: Child,
    /// Scraping wsgate's `/metrics` while it runs (no admin listener: `None`).
    scraper: Option<Scraper>,
}

/// What stopping a proxy found.
#[derive(Debug, Default)]
pub struct Stopped {
    /// How the scrapes of its `/metrics` went, if it was scraped.
    pub scrapes: Option<Scrapes>,
    /// It did not exit within [`STOP_TIMEOUT`] of SIGTERM and was killed.
    pub killed: bool,
}

impl Proxy {
    /// The proxy's processes (nginx: master and workers).
    pub fn pids(&self) -> Vec<u32> {
        procfs::tree(self.child.id())
    }

    /// Stops the scraper, then the proxy. Once: later calls find nothing to stop.
    pub fn stop(&mut self) -> Stopped {
        let mut stopped = Stopped {
            scrapes: self.scraper.take().map(Scraper::stop),
            killed: false,
        };
        if let Ok(Some(_)) = self.child.try_wait() {
            return stopped;
        }
        let pids = self.pids();
        signal(self.child.id(), "TERM");
        let deadline = Instant::now() + STOP_TIMEOUT;
        stopped.killed = true;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                stopped.killed = false;
                break;
            }
            sleep(Duration::from_millis(10));
        }
        for pid in pids.iter().rev() {
            if Path::new(&format!("/proc/{pid}")).exists() && *pid != self.child.id() {
                signal(*pid, "KILL");
            }
        }
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        stopped
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop();
    }
}

/// As many proxy threads as CPUs, like nginx's `worker_processes auto` and tokio's
/// default runtime.
fn threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// Replaces each `{{NAME}}` of `template` with its value.
pub fn fill(template: &str, values: &[(&str, String)]) -> String {
    values
        .iter()
        .fold(template.to_string(), |text, (name, value)| {
            text.replace(&format!("{{{{{name}}}}}"), value)
        })
}

/// What the wsgate template's `{{...}}` become for `target` (see the template's header:
/// wsgate's defaults except what the machine forces; `wsgate-lean` without pings,
/// admin listener and per-connection log lines).
fn wsgate_values(
    target: Target,
    admin: Option<SocketAddr>,
    nofile: u64,
) -> Vec<(&'static str, String)> {
    let defaults = wsgate::config::Config::default();
    let workers = match target {
        Target::Wsgate1 => 1,
        _ => wsgate::config::Workers::Auto.count(),
    };
    // What this build's "auto" resolves to under the same open-file limit (this process
    // raised its own to the hard limit, as wsgate does), written out so that an older
    // base build, whose default was a fixed 10000, runs with the same limit and no
    // start-up warning.
    let cap = wsgate::config::MaxConnections::AUTO_CAP as u64;
    let fit = nofile.saturating_sub(wsgate::reserved_descriptors(workers) as u64) / 2;
    let max_connections = if fit < cap {
        format!("max_connections = {fit}")
    } else {
        format!("# max_connections: the default, \"auto\" ({cap} here)")
    };
    let workers = if target == Target::Wsgate1 {
        "workers = 1".to_string()
    } else {
        "# workers: the default, \"auto\"".to_string()
    };
    let pings = match (target, defaults.websocket.ping_interval) {
        (Target::WsgateLean, _) => "ping_interval = \"0s\"".to_string(),
        (_, Some(every)) => format!(
            "# ping_interval: the default, \"{}\"",
            humantime::format_duration(every)
        ),
        (_, None) => "# ping_interval: the default, off".to_string(),
    };
    vec![
        ("MAX_CONNECTIONS", max_connections),
        ("WORKERS", workers),
        ("PINGS", pings),
        ("ADMIN", admin.map_or_else(String::new, |a| a.to_string())),
    ]
}

/// The certificate and key a proxy terminates TLS with (the HTTP/2 row).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Certificate and key in one file, as HAProxy's `crt` wants them.
    pub combined: PathBuf,
}

/// How a run needs its proxy set up beyond the target's configuration.
#[derive(Debug, Clone, Copy)]
pub struct Setup<'a> {
    /// Terminate TLS (HTTP/2 offered by ALPN) with these files instead of plain HTTP.
    pub tls: Option<&'a TlsFiles>,
    /// nginx's access log and HAProxy's log, one line per request (a WebSocket is one
    /// request). Off for the plain HTTP rows: wsgate writes no line per HTTP request
    /// (it counts them in /metrics), so there the anchors write none either.
    pub access_log: bool,
}

impl Setup<'_> {
    /// As for the WebSocket and event stream measurements: plain TCP, access logs on.
    pub const DEFAULT: Setup<'static> = Setup {
        tls: None,
        access_log: true,
    };
}

/// What the nginx and HAProxy templates' `{{...}}` become for `target` and `setup`.
fn anchor_values(target: Target, setup: &Setup, dir: &Path) -> Vec<(&'static str, String)> {
    let one = target.is_single_worker_anchor();
    let quoted = |p: &Path| format!("\"{}\"", p.display());
    vec![
        ("WORKERS", if one { "1" } else { "auto" }.to_string()),
        ("THREADS", if one { 1 } else { threads() }.to_string()),
        (
            "ACCESS_LOG",
            if setup.access_log {
                format!("access_log {};", quoted(&dir.join("access.log")))
            } else {
                "access_log off;".to_string()
            },
        ),
        (
            "LOG",
            if setup.access_log {
                "log global"
            } else {
                "no log"
            }
            .to_string(),
        ),
        (
            "LISTEN_TLS",
            setup
                .tls
                .map_or_else(String::new, |_| " ssl http2".to_string()),
        ),
        (
            "TLS",
            setup.tls.map_or_else(String::new, |t| {
                // nginx 1.22 offers TLS 1.0-1.2 only unless told: TLS 1.3, as rustls and
                // HAProxy negotiate it.
                format!(
                    "ssl_certificate {}; ssl_certificate_key {}; ssl_protocols TLSv1.2 TLSv1.3;",
                    quoted(&t.cert),
                    quoted(&t.key)
                )
            }),
        ),
        (
            "BIND_TLS",
            setup.tls.map_or_else(String::new, |t| {
                format!(
                    " ssl crt {} alpn h2,http/1.1 prefer-client-ciphers",
                    quoted(&t.combined)
                )
            }),
        ),
    ]
}

/// wsgate's `[tls]` section for `setup` (empty without TLS).
fn wsgate_tls(setup: &Setup) -> String {
    setup.tls.map_or_else(String::new, |t| {
        format!(
            "\n[tls]\ncert = \"{}\"\nkey = \"{}\"",
            t.cert.display(),
            t.key.display()
        )
    })
}

/// A free loopback port other than those of `taken`.
fn another_free_port(taken: &[SocketAddr]) -> SocketAddr {
    loop {
        let addr = free_port();
        if !taken.contains(&addr) {
            return addr;
        }
    }
}

/// Starts `target` in front of `backend`, set up as `setup` says, and waits until it
/// accepts connections. `dir` is a fresh directory for its configuration and logs.
/// `None` for direct.
pub fn start(
    target: Target,
    tools: &Tools,
    backend: SocketAddr,
    dir: &Path,
    setup: &Setup,
) -> Result<Option<Proxy>, String> {
    let listen = another_free_port(&[backend]);
    // wsgate's admin listener, scraped while it runs; none for the lean variant (and
    // the other proxies have no equivalent in their configuration here).
    let admin = (target.runs_wsgate() && target != Target::WsgateLean)
        .then(|| another_free_port(&[backend, listen]));
    fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut values = vec![
        ("LISTEN", listen.to_string()),
        ("BACKEND", backend.to_string()),
        ("DIR", dir.display().to_string()),
        ("MAXCONN", tools.haproxy_maxconn.to_string()),
    ];
    if target.runs_wsgate() {
        values.extend(wsgate_values(target, admin, tools.nofile));
        values.push(("TLS", wsgate_tls(setup)));
    } else {
        values.extend(anchor_values(target, setup, dir));
    }
    let write = |name: &str, template: &str| -> Result<PathBuf, String> {
        let path = dir.join(name);
        fs::write(&path, fill(template, &values))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(path)
    };
    let log = dir.join("output.log");
    let mut command = match target {
        Target::Direct => return Ok(None),
        Target::Wsgate | Target::Wsgate1 | Target::WsgateLean | Target::WsgateBase => {
            let config = write("wsgate.toml", WSGATE_TEMPLATE)?;
            let binary = match target {
                Target::WsgateBase => tools
                    .wsgate_base
                    .as_ref()
                    .ok_or("no --wsgate-base binary given")?,
                _ => &tools.wsgate,
            };
            let mut c = Command::new(binary);
            c.arg("--config").arg(config).env("NO_COLOR", "1");
            // The default level, INFO (one line per connection), whatever the caller's
            // RUST_LOG says; WARN for the lean variant.
            match target {
                Target::WsgateLean => c.env("RUST_LOG", "warn"),
                _ => c.env_remove("RUST_LOG"),
            };
            c
        }
        Target::Nginx | Target::Nginx1 => {
            let config = write("nginx.conf", NGINX_TEMPLATE)?;
            let nginx = tools.nginx.as_ref().ok_or("nginx is not installed")?;
            let mut c = Command::new(nginx);
            c.arg("-e")
                .arg(dir.join("error.log"))
                .arg("-p")
                .arg(dir)
                .arg("-c")
                .arg(config);
            c
        }
        Target::Haproxy | Target::Haproxy1 => {
            let config = write("haproxy.cfg", HAPROXY_TEMPLATE)?;
            let haproxy = tools.haproxy.as_ref().ok_or("HAProxy is not installed")?;
            let mut c = Command::new(haproxy);
            c.arg("-db").arg("-f").arg(config);
            c
        }
    };
    let out =
        fs::File::create(&log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
    let err = out
        .try_clone()
        .map_err(|e| format!("cannot reopen {}: {e}", log.display()))?;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", target.name()))?;
    if let Err(e) = wait_ready(listen, &mut child, target.name(), &log) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    // Let worker processes and threads finish starting before anything is sampled.
    sleep(Duration::from_millis(300));
    Ok(Some(Proxy {
        listen,
        child,
        scraper: admin.map(Scraper::start),
    }))
}

/// The version line of each program, for the report.
pub fn versions(tools: &Tools) -> Vec<(String, String)> {
    let first_line = |program: &Path, arg: &str| -> String {
        Command::new(program)
            .arg(arg)
            .output()
            .map(|o| {
                let text = format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                );
                text.lines().next().unwrap_or("").trim().to_string()
            })
            .unwrap_or_else(|e| format!("unknown ({e})"))
    };
    let mut v = vec![("wsgate".to_string(), first_line(&tools.wsgate, "--version"))];
    if let Some(base) = &tools.wsgate_base {
        v.push((
            "wsgate base build".to_string(),
            format!("{} ({})", first_line(base, "--version"), base.display()),
        ));
    }
    if let Some(nginx) = &tools.nginx {
        v.push(("nginx".to_string(), first_line(nginx, "-v")));
    }
    if let Some(haproxy) = &tools.haproxy {
        v.push(("HAProxy".to_string(), first_line(haproxy, "-v")));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use wsgate::config::{Config, Workers};

    /// wsgate's configuration file for `target`, as `start` writes it.
    fn wsgate_file(target: Target, admin: Option<SocketAddr>, nofile: u64) -> String {
        let mut values = vec![
            ("LISTEN", "127.0.0.1:1".to_string()),
            ("BACKEND", "127.0.0.1:2".to_string()),
        ];
        values.extend(wsgate_values(target, admin, nofile));
        values.push(("TLS", String::new()));
        fill(WSGATE_TEMPLATE, &values)
    }

    fn tls_files() -> TlsFiles {
        TlsFiles {
            cert: "/tmp/b/cert.pem".into(),
            key: "/tmp/b/key.pem".into(),
            combined: "/tmp/b/combined.pem".into(),
        }
    }

    #[test]
    fn wsgate_terminates_tls_with_the_runs_certificate_when_asked() {
        let tls = tls_files();
        let setup = Setup {
            tls: Some(&tls),
            access_log: false,
        };
        for target in [Target::Wsgate, Target::Wsgate1, Target::WsgateLean] {
            let mut values = vec![
                ("LISTEN", "127.0.0.1:1".to_string()),
                ("BACKEND", "127.0.0.1:2".to_string()),
            ];
            values.extend(wsgate_values(target, None, 1 << 20));
            values.push(("TLS", wsgate_tls(&setup)));
            let text = fill(WSGATE_TEMPLATE, &values);
            assert!(!text.contains("{{"), "{text}");
            let config = Config::parse(&text).unwrap();
            let t = config.tls.expect("a [tls] section");
            assert_eq!(t.cert, tls.cert);
            assert_eq!(t.key, tls.key);
            assert!(t.http2, "HTTP/2 by ALPN is the default");
        }
    }

    /// nginx's and HAProxy's files for `target` and `setup`, as `start` writes them.
    fn anchor_files(target: Target, setup: &Setup) -> (String, String) {
        let mut values = vec![
            ("LISTEN", "127.0.0.1:1".to_string()),
            ("BACKEND", "127.0.0.1:2".to_string()),
            ("DIR", "/tmp/b".to_string()),
            ("MAXCONN", "9950".to_string()),
        ];
        values.extend(anchor_values(target, setup, Path::new("/tmp/b")));
        (
            fill(NGINX_TEMPLATE, &values),
            fill(HAPROXY_TEMPLATE, &values),
        )
    }

    #[test]
    fn anchors_keep_the_websocket_setup_and_add_the_http_one() {
        for target in [Target::Nginx, Target::Haproxy] {
            let (nginx, haproxy) = anchor_files(target, &Setup::DEFAULT);
            for text in [&nginx, &haproxy] {
                assert!(!text.contains("{{"), "{text}");
            }
            // Whatever a placeholder became, it stayed on its line.
            assert_eq!(nginx.lines().count(), NGINX_TEMPLATE.lines().count());
            assert_eq!(haproxy.lines().count(), HAPROXY_TEMPLATE.lines().count());
            // WebSockets: the handshake still goes out with `Connection: upgrade`, the
            // relay's timeouts are unchanged, and every request is logged.
            assert!(nginx.contains("default upgrade;"), "{nginx}");
            assert!(nginx.contains("proxy_set_header Upgrade $http_upgrade;"));
            assert!(nginx.contains("proxy_read_timeout 3600s;"));
            assert!(
                nginx.contains("access_log \"/tmp/b/access.log\";"),
                "{nginx}"
            );
            assert!(nginx.contains("worker_processes auto;"));
            assert!(nginx.contains("listen 127.0.0.1:1;"), "{nginx}");
            assert!(haproxy.contains("timeout tunnel 1h"));
            assert!(haproxy.contains("\n    log global\n"), "{haproxy}");
            assert!(haproxy.contains(&format!("nbthread {}\n", threads())));
            assert!(haproxy.contains("bind 127.0.0.1:1\n"), "{haproxy}");
            // Plain HTTP: keep-alive to the backend; event streams unbuffered.
            assert!(nginx.contains("keepalive 64;"));
            assert!(
                nginx.contains("''      '';"),
                "no Connection header for plain requests"
            );
            assert!(nginx.contains("proxy_buffering off;"));
            assert!(haproxy.contains("http-reuse always"));
        }
        let tls = tls_files();
        let http2 = Setup {
            tls: Some(&tls),
            access_log: false,
        };
        let (nginx, haproxy) = anchor_files(Target::Nginx1, &http2);
        assert!(nginx.contains("worker_processes 1;"));
        assert!(nginx.contains("access_log off;"));
        assert!(nginx.contains("listen 127.0.0.1:1 ssl http2;"), "{nginx}");
        assert!(
            nginx.contains("ssl_certificate \"/tmp/b/cert.pem\";"),
            "{nginx}"
        );
        assert!(nginx.contains("ssl_protocols TLSv1.2 TLSv1.3;"));
        assert_eq!(nginx.lines().count(), NGINX_TEMPLATE.lines().count());
        let (_, haproxy1) = anchor_files(Target::Haproxy1, &http2);
        for text in [&haproxy, &haproxy1] {
            assert!(text.contains("\n    no log\n"), "{text}");
            assert!(
                text.contains(
                    "bind 127.0.0.1:1 ssl crt \"/tmp/b/combined.pem\" alpn h2,http/1.1 \
                     prefer-client-ciphers\n"
                ),
                "{text}"
            );
        }
        assert!(haproxy1.contains("nbthread 1\n"));
    }

    #[test]
    fn each_wsgate_target_gets_the_defaults_but_what_the_machine_forces() {
        let defaults = Config::default();
        let admin: SocketAddr = "127.0.0.1:3".parse().unwrap();
        for (target, workers, admin) in [
            (Target::Wsgate, Workers::Auto, Some(admin)),
            (Target::Wsgate1, Workers::Count(1), Some(admin)),
            (Target::WsgateLean, Workers::Auto, None),
            (Target::WsgateBase, Workers::Auto, Some(admin)),
        ] {
            let text = wsgate_file(target, admin, 1 << 20);
            assert!(!text.contains("{{"), "{text}");
            let mut config = Config::parse(&text).unwrap();
            assert_eq!(config.listen, "127.0.0.1:1".parse().unwrap());
            assert_eq!(config.workers, workers, "{target:?}");
            assert_eq!(config.admin.listen, admin, "{target:?}");
            let pings = match target {
                Target::WsgateLean => None,
                _ => defaults.websocket.ping_interval,
            };
            assert_eq!(config.websocket.ping_interval, pings, "{target:?}");
            // Everything else is the default.
            config.listen = defaults.listen;
            config.backend = defaults.backend.clone();
            config.workers = defaults.workers;
            config.admin.listen = defaults.admin.listen;
            config.websocket.ping_interval = defaults.websocket.ping_interval;
            assert_eq!(config, defaults, "{target:?}");
            // The base build may predate `workers`: its file must not name the key.
            if target == Target::WsgateBase {
                assert!(!text.lines().any(|l| l.starts_with("workers")), "{text}");
            }
        }
    }

    #[test]
    fn max_connections_is_what_the_open_file_limit_allows_when_below_the_default() {
        for (target, workers) in [
            (Target::Wsgate, Workers::Auto.count()),
            (Target::Wsgate1, 1),
        ] {
            let config = Config::parse(&wsgate_file(target, None, 20_000)).unwrap();
            let fit = (20_000 - wsgate::reserved_descriptors(workers)) / 2;
            assert_eq!(
                config.max_connections,
                wsgate::config::MaxConnections::Count(fit),
                "{target:?}"
            );
        }
    }

    #[test]
    fn wsgate_files_use_only_keys_an_older_build_knows() {
        // The keys of commit 79f4792's configuration that the template may write: a
        // build rejects keys it does not know, and `--wsgate-base` may be that old
        // (its `[tls]` has `cert` and `key`, and offers HTTP/2 by default).
        let known = [
            "listen",
            "backend",
            "max_connections",
            "workers",
            "ping_interval",
            "cert",
            "key",
        ];
        let tls = tls_files();
        let http2 = Setup {
            tls: Some(&tls),
            access_log: false,
        };
        for target in [
            Target::Wsgate,
            Target::Wsgate1,
            Target::WsgateLean,
            Target::WsgateBase,
        ] {
            for (nofile, setup) in [(20_000, Setup::DEFAULT), (1 << 20, http2)] {
                let mut text = wsgate_file(target, Some("127.0.0.1:3".parse().unwrap()), nofile);
                text.push_str(&wsgate_tls(&setup));
                for line in text.lines().map(str::trim) {
                    if line.starts_with('#') || line.starts_with('[') || line.is_empty() {
                        continue;
                    }
                    let key = line.split('=').next().unwrap_or("").trim();
                    assert!(known.contains(&key), "{target:?} writes {key}:\n{text}");
                }
            }
        }
    }
}
