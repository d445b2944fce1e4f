//! The targets (direct, wsgate, nginx, HAProxy): finding them, writing their
//! configuration from the templates in `bench/`, starting and stopping them.

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::procfs;

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
        matches!(self, Target::Wsgate | Target::Wsgate1)
    }

    pub fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Wsgate => "wsgate",
            Target::Wsgate1 => "wsgate 1 thread",
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

/// A running proxy. Stopped (SIGTERM, then SIGKILL to the whole tree) on drop.
pub struct Proxy {
    pub listen: SocketAddr,
    child: Child,
}

impl Proxy {
    /// The proxy's processes (nginx: master and workers).
    pub fn pids(&self) -> Vec<u32> {
        procfs::tree(self.child.id())
    }

    pub fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let pids = self.pids();
        signal(self.child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
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

/// What `{{WORKERS}}` becomes in wsgate's configuration for `target`.
fn workers_line(target: Target) -> &'static str {
    if target == Target::Wsgate1 {
        "workers = 1"
    } else {
        "# workers: the default, \"auto\""
    }
}

fn fill(
    template: &str,
    listen: SocketAddr,
    backend: SocketAddr,
    dir: &Path,
    maxconn: u64,
    workers: &str,
) -> String {
    template
        .replace("{{WORKERS}}", workers)
        .replace("{{LISTEN}}", &listen.to_string())
        .replace("{{BACKEND}}", &backend.to_string())
        .replace("{{DIR}}", &dir.display().to_string())
        .replace("{{MAXCONN}}", &maxconn.to_string())
        .replace("{{THREADS}}", &threads().to_string())
}

/// Starts `target` in front of `backend` and waits until it accepts connections.
/// `dir` is a fresh directory for its configuration and logs. `None` for direct.
pub fn start(
    target: Target,
    tools: &Tools,
    backend: SocketAddr,
    dir: &Path,
) -> Result<Option<Proxy>, String> {
    let listen = free_port();
    fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let workers = workers_line(target);
    let write = |name: &str, template: &str| -> Result<PathBuf, String> {
        let path = dir.join(name);
        fs::write(
            &path,
            fill(
                template,
                listen,
                backend,
                dir,
                tools.haproxy_maxconn,
                workers,
            ),
        )
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(path)
    };
    let log = dir.join("output.log");
    let mut command = match target {
        Target::Direct => return Ok(None),
        Target::Wsgate | Target::Wsgate1 | Target::WsgateBase => {
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
    let proxy = Proxy { listen, child };
    // Let worker processes and threads finish starting before anything is sampled.
    sleep(Duration::from_millis(300));
    Ok(Some(proxy))
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

    #[test]
    fn each_wsgate_target_gets_a_valid_configuration_with_its_workers() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        for (target, workers) in [
            (Target::Wsgate, Workers::Auto),
            (Target::Wsgate1, Workers::Count(1)),
            (Target::WsgateBase, Workers::Auto),
        ] {
            let text = fill(
                WSGATE_TEMPLATE,
                addr,
                addr,
                Path::new("/tmp"),
                1,
                workers_line(target),
            );
            let config = Config::parse(&text).unwrap();
            assert_eq!(config.workers, workers, "{target:?}");
            assert_eq!(config.websocket.ping_interval, None);
            // The base build may predate `workers`: its file must not name the key.
            if target == Target::WsgateBase {
                assert!(!text.lines().any(|l| l.starts_with("workers")), "{text}");
            }
        }
    }
}
