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
}

impl Target {
    /// One of wsgate's configurations, as opposed to the baselines.
    pub fn is_wsgate(self) -> bool {
        matches!(self, Target::Wsgate | Target::Wsgate1 | Target::WsgateLean)
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
fn fill(template: &str, values: &[(&str, String)]) -> String {
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

/// A free loopback port other than those of `taken`.
fn another_free_port(taken: &[SocketAddr]) -> SocketAddr {
    loop {
        let addr = free_port();
        if !taken.contains(&addr) {
            return addr;
        }
    }
}

/// Starts `target` in front of `backend` and waits until it accepts connections.
/// `dir` is a fresh directory for its configuration and logs. `None` for direct.
pub fn start(
    target: Target,
    tools: &Tools,
    backend: SocketAddr,
    dir: &Path,
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
        ("THREADS", threads().to_string()),
    ];
    if target.runs_wsgate() {
        values.extend(wsgate_values(target, admin, tools.nofile));
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
        Target::Nginx => {
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
        Target::Haproxy => {
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
        fill(WSGATE_TEMPLATE, &values)
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
        // build rejects keys it does not know, and `--wsgate-base` may be that old.
        let known = [
            "listen",
            "backend",
            "max_connections",
            "workers",
            "ping_interval",
        ];
        for target in [
            Target::Wsgate,
            Target::Wsgate1,
            Target::WsgateLean,
            Target::WsgateBase,
        ] {
            for nofile in [20_000, 1 << 20] {
                let text = wsgate_file(target, Some("127.0.0.1:3".parse().unwrap()), nofile);
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
