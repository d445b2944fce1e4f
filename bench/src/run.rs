//! `run`: the orchestrator. Starts the echo backend, then for every round, every
//! measurement and every target (in an order rotated each round) starts a fresh proxy,
//! runs a load generator process against it, samples the CPU time of the proxy and of
//! its peers (the echo backend, the load generator) and the proxy's memory from /proc,
//! stops the proxy; finally prints the table.

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::http::{self, Origin, Row};
use crate::load::LoadResult;
use crate::procfs;
use crate::report::{self, Metric, Results};
use crate::sse;
use crate::targets::{self, Proxy, Setup, Target, TlsFiles, Tools};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Measurement {
    Echo,
    Bulk,
    Latency,
    Churn,
    Release,
    Idle,
    /// Plain HTTP through each proxy to an nginx origin: wrk (keep-alive GET of 100 B
    /// and 16 KiB, POST of 4 KiB, a new connection per request) and h2load (HTTP/2
    /// over TLS).
    Http,
    /// Event streams aborted by the client (FIN, RST): until the backend learns it.
    SseRelease,
    /// Many event streams at once: events delivered per second, CPU per event, RSS.
    SseLoad,
}

impl Measurement {
    fn name(self) -> &'static str {
        match self {
            Measurement::Echo => "echo",
            Measurement::Bulk => "bulk",
            Measurement::Latency => "latency",
            Measurement::Churn => "churn",
            Measurement::Release => "release",
            Measurement::Idle => "idle",
            Measurement::Http => "http",
            Measurement::SseRelease => "sse-release",
            Measurement::SseLoad => "sse-load",
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Rounds; every measurement runs once per target per round, targets interleaved.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Measured time of each echo, bulk, latency and churn run.
    #[arg(long, value_parser = crate::parse_duration, default_value = "5s")]
    duration: Duration,
    /// Unmeasured traffic before each timed run.
    #[arg(long, value_parser = crate::parse_duration, default_value = "500ms")]
    warmup: Duration,
    /// Targets, in the order of the table (missing nginx/HAProxy are skipped). The
    /// headline is `wsgate` (its default configuration) against nginx and HAProxy, one
    /// worker per CPU each; `wsgate-1` (one thread) is also read against `nginx-1` and
    /// `haproxy-1` (one worker, one thread); `wsgate-lean` (pings, admin listener and
    /// per-connection log lines off) is an extra column.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "direct,wsgate,wsgate-1,nginx,haproxy,nginx-1,haproxy-1,wsgate-lean"
    )]
    targets: Vec<Target>,
    /// Measurements to run.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "echo,bulk,latency,churn,release,idle,http,sse-release,sse-load"
    )]
    measurements: Vec<Measurement>,
    /// Idle WebSockets held open at once. Through a proxy each needs two descriptors
    /// in the proxy; with the usual hard limit of 20,000 open files, 9,900 fit.
    #[arg(long, default_value_t = 9900)]
    idle_connections: usize,
    /// Connections of the echo measurement (64 B messages, closed loop).
    #[arg(long, default_value_t = 50)]
    echo_connections: usize,
    /// Connections of the bulk measurement (64 KiB messages, closed loop).
    #[arg(long, default_value_t = 8)]
    bulk_connections: usize,
    /// Concurrent connect-echo-close cycles of the churn measurement.
    #[arg(long, default_value_t = 20)]
    churn_concurrency: usize,
    /// Connections per kind of ending (client Close, client FIN) in the release
    /// measurement.
    #[arg(long, default_value_t = 200)]
    release_count: usize,
    /// Connections of wrk in the http measurement (one wrk thread).
    #[arg(long, default_value_t = 50)]
    http_connections: usize,
    /// HTTP/2 connections of h2load in the http measurement.
    #[arg(long, default_value_t = 10)]
    h2_connections: usize,
    /// Concurrent streams per HTTP/2 connection (h2load -m).
    #[arg(long, default_value_t = 10)]
    h2_streams: usize,
    /// Event streams per kind of abort (FIN, RST) in the sse-release measurement.
    #[arg(long, default_value_t = 50)]
    sse_release_count: usize,
    /// Event streams open at once in the sse-load measurement (two descriptors each
    /// in a proxy).
    #[arg(long, default_value_t = 1000)]
    sse_streams: usize,
    /// Time between two events of a stream (sse-release, sse-load).
    #[arg(long, value_parser = crate::parse_duration, default_value = "100ms")]
    sse_interval: Duration,
    /// Also write the report (markdown) to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Install nginx, HAProxy, wrk and h2load (nghttp2-client) with apt-get first
    /// (Debian/Ubuntu, as root).
    #[arg(long)]
    install_anchors: bool,
    /// The wsgate binary (default: `wsgate` next to this program).
    #[arg(long)]
    wsgate: Option<PathBuf>,
    /// Another wsgate binary to compare builds (e.g. one built from the previous
    /// commit): measured as the target `wsgate-base`, added to the targets, with the
    /// default configuration, interleaved with the rest like any baseline.
    #[arg(long, value_name = "PATH")]
    wsgate_base: Option<PathBuf>,
    /// Keep the temporary directory (configurations and proxy logs).
    #[arg(long)]
    keep_tmp: bool,
}

/// Everything a measurement needs.
struct Ctx<'a> {
    args: &'a RunArgs,
    exe: PathBuf,
    tools: Tools,
    tmp: PathBuf,
    backend: SocketAddr,
    /// The echo backend's process, whose CPU time is sampled with the proxy's.
    backend_pid: u32,
    ticks_per_second: f64,
    runs: usize,
    /// What the http measurement needs; `None` when it does not run.
    http: Option<HttpCtx>,
}

/// The http measurement's origin and tools.
struct HttpCtx {
    origin: Origin,
    /// wrk, for the HTTP/1.1 rows; `None`: those rows are skipped.
    wrk: Option<PathBuf>,
    /// h2load, for the HTTP/2 row; `None`: skipped.
    h2load: Option<PathBuf>,
    /// The certificate of the HTTP/2 row; `None`: skipped.
    tls: Option<TlsFiles>,
    /// wrk's Lua script of the POST row.
    post_script: PathBuf,
}

pub fn main(mut args: RunArgs, nofile: u64) -> ExitCode {
    if args.rounds == 0 {
        eprintln!("wsgate-bench run: --rounds must be at least 1");
        return ExitCode::from(2);
    }
    if args.install_anchors {
        install_anchors();
    }
    let exe = std::env::current_exe().expect("cannot find this program's path");
    let wsgate = args
        .wsgate
        .clone()
        .unwrap_or_else(|| exe.with_file_name("wsgate"));
    if args.targets.iter().any(|t| t.is_wsgate()) && !wsgate.is_file() {
        eprintln!(
            "wsgate-bench run: {} not found; build it first:\n  \
             cargo build --release --locked -p wsgate -p wsgate-bench\n\
             or give its path with --wsgate",
            wsgate.display()
        );
        return ExitCode::FAILURE;
    }
    match &args.wsgate_base {
        Some(base) if !base.is_file() => {
            eprintln!(
                "wsgate-bench run: --wsgate-base {} not found",
                base.display()
            );
            return ExitCode::FAILURE;
        }
        Some(_) if !args.targets.contains(&Target::WsgateBase) => {
            args.targets.push(Target::WsgateBase);
        }
        _ => {}
    }
    // A proxy holds two sockets per WebSocket, plus a few of its own.
    let fit = usize::try_from(nofile.saturating_sub(150) / 2).unwrap_or(usize::MAX);
    let mut problems = Vec::new();
    if args.measurements.contains(&Measurement::Idle) && args.idle_connections > fit {
        let msg = format!(
            "--idle-connections {} needs {} descriptors in a proxy but the open-file limit \
             is {nofile}: using {fit}",
            args.idle_connections,
            2 * args.idle_connections + 150
        );
        eprintln!("wsgate-bench run: {msg}");
        problems.push(msg);
        args.idle_connections = fit;
    }
    if args.measurements.contains(&Measurement::SseLoad) && args.sse_streams > fit {
        let msg = format!(
            "--sse-streams {} needs {} descriptors in a proxy but the open-file limit is \
             {nofile}: using {fit}",
            args.sse_streams,
            2 * args.sse_streams + 150
        );
        eprintln!("wsgate-bench run: {msg}");
        problems.push(msg);
        args.sse_streams = fit;
    }
    let tools = Tools {
        wsgate,
        wsgate_base: args.wsgate_base.clone(),
        nginx: targets::find_program("nginx"),
        haproxy: targets::find_program("haproxy"),
        // HAProxy needs two descriptors per connection plus a few (maxconn 20000 asks
        // for 40,017) and refuses to start when the hard limit is lower: keep maxconn
        // within what the limit allows.
        haproxy_maxconn: 20_000u64.min(nofile.saturating_sub(100) / 2),
        nofile,
    };
    let mut run_targets = Vec::new();
    for &t in &args.targets {
        let install = "is not installed: skipped (install with `apt-get install -y nginx-light \
                       haproxy` — or `nginx` where nginx-light does not exist — or run with \
                       --install-anchors)";
        let missing = match t {
            _ if t.is_nginx() && tools.nginx.is_none() => Some(install),
            _ if t.is_haproxy() && tools.haproxy.is_none() => Some(install),
            Target::WsgateBase if tools.wsgate_base.is_none() => {
                Some("needs --wsgate-base PATH: skipped")
            }
            _ => None,
        };
        if let Some(why) = missing {
            let msg = format!("{} {why}", t.name());
            eprintln!("wsgate-bench run: {msg}");
            problems.push(msg);
        } else if !run_targets.contains(&t) {
            run_targets.push(t);
        }
    }
    if run_targets.is_empty() {
        eprintln!("wsgate-bench run: no target to measure");
        return ExitCode::FAILURE;
    }

    let tmp = std::env::temp_dir().join(format!("wsgate-bench-{}", std::process::id()));
    if let Err(e) = fs::create_dir_all(&tmp) {
        eprintln!("wsgate-bench run: cannot create {}: {e}", tmp.display());
        return ExitCode::FAILURE;
    }
    let mut environment = Environment::now(&tools);
    eprintln!("wsgate-bench run: working directory {}", tmp.display());
    let http = if args.measurements.contains(&Measurement::Http) {
        let setup = http_setup(&tools, &tmp, &mut problems);
        if let Some(h) = &setup {
            for (name, program, arg) in [
                ("wrk", &h.wrk, "--version"),
                ("h2load", &h.h2load, "--version"),
            ] {
                if let Some(p) = program {
                    environment
                        .load_tools
                        .push((name.to_string(), http::version(p, arg)));
                }
            }
        } else {
            args.measurements.retain(|m| *m != Measurement::Http);
        }
        setup
    } else {
        None
    };
    if args.measurements.is_empty() {
        eprintln!("wsgate-bench run: no measurement to run");
        return ExitCode::FAILURE;
    }

    let backend_addr = targets::free_port();
    let backend = match EchoBackend::start(&exe, backend_addr, &tmp) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("wsgate-bench run: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut ctx = Ctx {
        args: &args,
        exe,
        tools,
        tmp: tmp.clone(),
        backend: backend_addr,
        backend_pid: backend.child.id(),
        ticks_per_second: procfs::clock_ticks_per_second(),
        runs: 0,
        http,
    };
    let mut results = Results::default();
    results.problems = problems;
    let started = Instant::now();
    for round in 0..args.rounds {
        for &m in &args.measurements {
            let mut order = run_targets.clone();
            let shift = round % order.len();
            order.rotate_left(shift);
            for &t in &order {
                eprintln!(
                    "wsgate-bench run: round {}/{} {} via {} ({:.0} s elapsed)",
                    round + 1,
                    args.rounds,
                    m.name(),
                    t.name(),
                    started.elapsed().as_secs_f64()
                );
                let overflows = procfs::listen_overflows();
                let outcome = measure(&mut ctx, m, t, &mut results);
                if let (Some(before), Some(after)) = (overflows, procfs::listen_overflows())
                    && after > before
                {
                    let msg = format!(
                        "round {} {} via {}: {} connection attempts dropped by a full listen \
                         queue (kernel ListenOverflows, system-wide); each delays its client by \
                         a 1 s SYN retransmission",
                        round + 1,
                        m.name(),
                        t.name(),
                        after - before
                    );
                    eprintln!("wsgate-bench run: {msg}");
                    results.problems.push(msg);
                }
                if let Err(e) = outcome {
                    let msg = format!("round {} {} via {}: {e}", round + 1, m.name(), t.name());
                    eprintln!("wsgate-bench run: {msg}");
                    results.problems.push(msg);
                }
            }
        }
    }
    drop(backend);
    drop(ctx);

    let text = render(
        &args,
        &environment,
        &run_targets,
        &results,
        started.elapsed(),
    );
    println!("{text}");
    let mut code = ExitCode::SUCCESS;
    if let Some(path) = &args.out
        && let Err(e) = fs::write(path, &text)
    {
        eprintln!("wsgate-bench run: cannot write {}: {e}", path.display());
        code = ExitCode::FAILURE;
    }
    if args.keep_tmp {
        eprintln!(
            "wsgate-bench run: configurations and logs kept in {}",
            tmp.display()
        );
    } else {
        let _ = fs::remove_dir_all(&tmp);
    }
    code
}

/// Runs one measurement against one target and records its figures.
fn measure(ctx: &mut Ctx, m: Measurement, t: Target, results: &mut Results) -> Result<(), String> {
    ctx.runs += 1;
    let dir = ctx
        .tmp
        .join(format!("{:03}-{}-{}", ctx.runs, m.name(), t.id()));
    let a = ctx.args;
    let ms = |d: Duration| format!("{}ms", d.as_millis());
    let timed_limit = a.warmup + a.duration + Duration::from_secs(60);
    match m {
        Measurement::Echo | Measurement::Bulk | Measurement::Latency | Measurement::Churn => {
            let (mode, conns) = match m {
                Measurement::Echo => ("echo", a.echo_connections),
                Measurement::Bulk => ("bulk", a.bulk_connections),
                Measurement::Latency => ("latency", 1),
                _ => ("churn", a.churn_concurrency),
            };
            let mut proxy = targets::start(t, &ctx.tools, ctx.backend, &dir, &Setup::DEFAULT)?;
            let url = format!(
                "ws://{}/bench",
                proxy.as_ref().map_or(ctx.backend, |p| p.listen)
            );
            let load = [
                "load",
                "--mode",
                mode,
                "--url",
                &url,
                "--connections",
                &conns.to_string(),
                "--duration",
                &ms(a.duration),
                "--warmup",
                &ms(a.warmup),
            ];
            let run = run_load(ctx, &load, proxy.as_ref(), timed_limit)?;
            stop(&mut proxy, results, m, t);
            let r = &run.result;
            check_errors(results, m, t, r);
            if r.messages == 0 {
                return Err("no message completed".to_string());
            }
            let key = |suffix: &str| format!("{}.{suffix}", m.name());
            let rate = r.messages as f64 / r.window_s;
            match m {
                Measurement::Bulk => results.record(
                    &key("rate"),
                    t,
                    r.payload_bytes as f64 / r.window_s / (1 << 20) as f64,
                ),
                _ => results.record(&key("rate"), t, rate),
            }
            if let Some(l) = &r.latency_us {
                let scale = if m == Measurement::Churn { 1e-3 } else { 1.0 };
                results.record(&key("p50"), t, l.p50 * scale);
                results.record(&key("p99"), t, l.p99 * scale);
                results.record(&key("max"), t, l.max * scale);
            }
            if let (Some(cpu), Some(wall)) = (run.cpu, run.window_wall_s) {
                // Microseconds of CPU per message (per cycle for churn).
                let per_op_us =
                    |ticks: u64| ticks as f64 / ctx.ticks_per_second * 1e6 / r.messages as f64;
                if proxy.is_some() {
                    let cpu_s = cpu.proxy.total() as f64 / ctx.ticks_per_second;
                    results.record(&key("cpu"), t, per_op_us(cpu.proxy.total()));
                    results.record(&key("cpu_user"), t, per_op_us(cpu.proxy.user));
                    results.record(&key("cpu_kernel"), t, per_op_us(cpu.proxy.system));
                    results.record(&key("cpu_pct"), t, cpu_s / wall * 100.0);
                }
                results.record(&key("peers_cpu"), t, per_op_us(cpu.peers().total()));
                results.record(&key("backend_cpu"), t, per_op_us(cpu.backend.total()));
                results.record(&key("generator_cpu"), t, per_op_us(cpu.generator.total()));
            }
            if m == Measurement::Churn {
                // Memory must not creep with connections that come and go: RSS at the
                // end of the window against RSS after the warm-up.
                results.record("churn.cycles", t, r.messages as f64);
                if let Some((start, end)) = run.rss_window_kib {
                    results.record("churn.rss_growth", t, end as f64 - start as f64);
                }
            }
        }
        Measurement::Release => {
            let scripted = targets::free_port();
            let mut proxy = targets::start(t, &ctx.tools, scripted, &dir, &Setup::DEFAULT)?;
            let url = format!("ws://{}/", proxy.as_ref().map_or(scripted, |p| p.listen));
            let load = [
                "load",
                "--mode",
                "release",
                "--url",
                &url,
                "--backend-listen",
                &scripted.to_string(),
                "--count",
                &a.release_count.to_string(),
            ];
            let limit =
                Duration::from_secs(60) + Duration::from_millis(100) * a.release_count as u32;
            let run = run_load(ctx, &load, proxy.as_ref(), limit)?;
            stop(&mut proxy, results, m, t);
            let r = &run.result;
            check_errors(results, m, t, r);
            if let Some(s) = &r.close_us {
                results.record("release.close_p50", t, s.p50);
                results.record("release.close_p99", t, s.p99);
            }
            if let Some(s) = &r.fin_us {
                results.record("release.fin_p50", t, s.p50);
                results.record("release.fin_p99", t, s.p99);
            }
            let seen = |m: &std::collections::BTreeMap<String, u64>| {
                m.keys().cloned().collect::<Vec<_>>().join(" or ")
            };
            results.observations.insert(format!(
                "release via {}: after the client's Close the backend got {}; after the client's \
                 FIN without Close it got {}",
                t.name(),
                seen(&r.close_seen),
                seen(&r.fin_seen)
            ));
        }
        Measurement::Idle => {
            let mut proxy = targets::start(t, &ctx.tools, ctx.backend, &dir, &Setup::DEFAULT)?;
            let url = format!(
                "ws://{}/idle",
                proxy.as_ref().map_or(ctx.backend, |p| p.listen)
            );
            let before = proxy.as_ref().map(|p| procfs::rss_kib(&p.pids()));
            let n = a.idle_connections;
            let load = [
                "load",
                "--mode",
                "idle",
                "--url",
                &url,
                "--connections",
                &n.to_string(),
            ];
            let limit = Duration::from_secs(120) + Duration::from_millis(10) * n as u32;
            let run = run_load(ctx, &load, proxy.as_ref(), limit)?;
            stop(&mut proxy, results, m, t);
            let r = &run.result;
            check_errors(results, m, t, r);
            if r.opened == 0 {
                return Err("no idle connection opened".to_string());
            }
            results.record("idle.open_s", t, r.open_s);
            if let (Some(before), Some(after)) = (before, run.rss_open_kib) {
                results.record(
                    "idle.kib",
                    t,
                    (after as f64 - before as f64) / r.opened as f64,
                );
                results.record("idle.rss_mib", t, after as f64 / 1024.0);
            }
        }
        // Five runs of their own, each with a fresh proxy.
        Measurement::Http => return measure_http(ctx, t, results),
        Measurement::SseRelease => {
            let listen = targets::free_port();
            let mut proxy = targets::start(t, &ctx.tools, listen, &dir, &Setup::DEFAULT)?;
            let url = format!(
                "http://{}/events",
                proxy.as_ref().map_or(listen, |p| p.listen)
            );
            let k = a.sse_release_count;
            let load = [
                "load",
                "--mode",
                "sse-release",
                "--url",
                &url,
                "--backend-listen",
                &listen.to_string(),
                "--count",
                &k.to_string(),
                "--interval",
                &ms(a.sse_interval),
            ];
            // Each stream is bounded by its open (10 s) and notice (3 s) timeouts.
            let limit = Duration::from_secs(60)
                + (Duration::from_secs(10) + sse::NOTICE_TIMEOUT) * (2 * k) as u32;
            let run = run_load(ctx, &load, proxy.as_ref(), limit)?;
            stop(&mut proxy, results, m, t);
            let r = &run.result;
            check_errors(results, m, t, r);
            if let Some(s) = &r.fin_us {
                results.record("sse_release.fin_p50", t, s.p50);
                results.record("sse_release.fin_p99", t, s.p99);
            }
            if let Some(s) = &r.rst_us {
                results.record("sse_release.rst_p50", t, s.p50);
                results.record("sse_release.rst_p99", t, s.p99);
            }
            results.observations.insert(format!(
                "sse-release via {}: after the client's FIN the backend learned it by {}; after \
                 its RST by {} (per run)",
                t.name(),
                sse::describe_seen(&r.fin_seen),
                sse::describe_seen(&r.rst_seen)
            ));
            if r.unread_at_abort > 0 {
                results.problems.push(format!(
                    "sse-release via {}: {} streams had unread bytes when the client closed \
                     (discarded first, so the close still sent a FIN)",
                    t.name(),
                    r.unread_at_abort
                ));
            }
        }
        Measurement::SseLoad => {
            let listen = targets::free_port();
            let mut proxy = targets::start(t, &ctx.tools, listen, &dir, &Setup::DEFAULT)?;
            let url = format!(
                "http://{}/events",
                proxy.as_ref().map_or(listen, |p| p.listen)
            );
            let before = proxy.as_ref().map(|p| procfs::rss_kib(&p.pids()));
            let n = a.sse_streams;
            let load = [
                "load",
                "--mode",
                "sse-load",
                "--url",
                &url,
                "--backend-listen",
                &listen.to_string(),
                "--connections",
                &n.to_string(),
                "--interval",
                &ms(a.sse_interval),
                "--duration",
                &ms(a.duration),
                "--warmup",
                &ms(a.warmup),
            ];
            let limit =
                timed_limit + Duration::from_secs(60) + Duration::from_millis(10) * n as u32;
            let run = run_load(ctx, &load, proxy.as_ref(), limit)?;
            stop(&mut proxy, results, m, t);
            let r = &run.result;
            check_errors(results, m, t, r);
            if r.messages == 0 {
                return Err("no event delivered in the window".to_string());
            }
            results.record("sse_load.rate", t, r.messages as f64 / r.window_s);
            if let (Some(cpu), true) = (run.cpu, proxy.is_some()) {
                let per_event_us =
                    |ticks: u64| ticks as f64 / ctx.ticks_per_second * 1e6 / r.messages as f64;
                results.record("sse_load.cpu", t, per_event_us(cpu.proxy.total()));
                results.record("sse_load.cpu_user", t, per_event_us(cpu.proxy.user));
            }
            if let (Some(before), Some((_, end))) = (before, run.rss_window_kib) {
                results.record("sse_load.rss_mib", t, end as f64 / 1024.0);
                if r.opened > 0 {
                    results.record(
                        "sse_load.kib",
                        t,
                        (end as f64 - before as f64) / r.opened as f64,
                    );
                }
            }
            if let (Some(min), Some(max)) = (r.stream_min, r.stream_max) {
                results.record("sse_load.stream_min", t, min as f64);
                results.record("sse_load.stream_max", t, max as f64);
            }
            results.observations.insert(format!(
                "sse-load via {}: {} of {n} streams open (per run), every event checked for its \
                 stream and its order",
                t.name(),
                r.opened,
            ));
        }
    }
    Ok(())
}

/// The http measurement's origin, tools and certificate, or `None` (noted in
/// `problems`) when it cannot run.
fn http_setup(tools: &Tools, tmp: &Path, problems: &mut Vec<String>) -> Option<HttpCtx> {
    let mut note = |msg: String| {
        eprintln!("wsgate-bench run: {msg}");
        problems.push(msg);
    };
    let Some(nginx) = &tools.nginx else {
        note(
            "http: skipped: its origin is an nginx, and nginx is not installed (apt-get \
             install -y nginx-light, or --install-anchors)"
                .to_string(),
        );
        return None;
    };
    let wrk = targets::find_program("wrk");
    let h2load = targets::find_program("h2load");
    if wrk.is_none() {
        note(
            "http: wrk is not installed: the HTTP/1.1 rows are skipped (apt-get install -y \
             wrk, or --install-anchors)"
                .to_string(),
        );
    }
    if h2load.is_none() {
        note(
            "http: h2load is not installed: the HTTP/2 row is skipped (apt-get install -y \
             nghttp2-client, or --install-anchors)"
                .to_string(),
        );
    }
    if wrk.is_none() && h2load.is_none() {
        return None;
    }
    let dir = http::dir(tmp);
    if let Err(e) = fs::create_dir_all(&dir) {
        note(format!(
            "http: skipped: cannot create {}: {e}",
            dir.display()
        ));
        return None;
    }
    let tls = match (&h2load, targets::find_program("openssl")) {
        (None, _) => None,
        (Some(_), None) => {
            note(
                "http: openssl is not installed, so there is no certificate: the HTTP/2 row \
                 is skipped"
                    .to_string(),
            );
            None
        }
        (Some(_), Some(openssl)) => match http::make_certificate(&openssl, &dir) {
            Ok(files) => Some(files),
            Err(e) => {
                note(format!("http: the HTTP/2 row is skipped: {e}"));
                None
            }
        },
    };
    let post_script = dir.join("post.lua");
    if let Err(e) = fs::write(&post_script, http::post_script()) {
        note(format!(
            "http: skipped: cannot write {}: {e}",
            post_script.display()
        ));
        return None;
    }
    match Origin::start(nginx, &dir) {
        Ok(origin) => Some(HttpCtx {
            origin,
            wrk,
            h2load,
            tls,
            post_script,
        }),
        Err(e) => {
            note(format!("http: skipped: {e}"));
            None
        }
    }
}

/// The http measurement against one target: every row with a tool, each with a fresh
/// proxy in front of the origin.
fn measure_http(ctx: &mut Ctx, t: Target, results: &mut Results) -> Result<(), String> {
    let Some(h) = ctx.http.as_ref() else {
        return Err("the http measurement has no origin".to_string());
    };
    let rows: Vec<(Row, PathBuf)> = Row::ALL
        .into_iter()
        .filter_map(|row| {
            let tool = if row.uses_wrk() { &h.wrk } else { &h.h2load };
            // No TLS without a certificate, and the origin speaks none: no `direct`.
            let tls_ok = row.uses_wrk() || (h.tls.is_some() && t != Target::Direct);
            tool.clone().filter(|_| tls_ok).map(|p| (row, p))
        })
        .collect();
    let mut failures = Vec::new();
    for (row, tool) in rows {
        if let Err(e) = http_row(ctx, t, row, &tool, results) {
            failures.push(format!("{} row: {e}", row.key()));
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("; "))
    }
}

/// One row of the http measurement: a fresh proxy, an unmeasured warm-up run of the
/// tool, then the measured run, the proxy's CPU time sampled just after the tool
/// started and just after it exited.
fn http_row(
    ctx: &mut Ctx,
    t: Target,
    row: Row,
    tool: &Path,
    results: &mut Results,
) -> Result<(), String> {
    ctx.runs += 1;
    let dir = ctx
        .tmp
        .join(format!("{:03}-http-{}-{}", ctx.runs, row.key(), t.id()));
    let a = ctx.args;
    let Some(h) = ctx.http.as_ref() else {
        return Err("no origin".to_string());
    };
    let tls = if row.uses_wrk() { None } else { h.tls.as_ref() };
    let setup = Setup {
        tls,
        access_log: false,
    };
    let mut proxy = targets::start(t, &ctx.tools, h.origin.addr, &dir, &setup)?;
    let addr = proxy.as_ref().map_or(h.origin.addr, |p| p.listen);
    let scheme = if tls.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://{addr}{}", row.path());
    let args = |seconds: u64| {
        if row.uses_wrk() {
            http::wrk_args(row, &url, a.http_connections, seconds, &h.post_script)
        } else {
            http::h2load_args(&url, a.h2_connections, a.h2_streams, seconds)
        }
    };
    let limit = |seconds: u64| Duration::from_secs(seconds + 30);
    let pids = proxy.as_ref().map(|p| p.pids()).unwrap_or_default();
    // The warm-up: connections to the backend opened and pooled, threads awake.
    let warm = http::whole_seconds(a.warmup);
    let seconds = http::whole_seconds(a.duration);
    let run = http::run_tool(tool, &args(warm), &[], limit(warm))
        .and_then(|_| http::run_tool(tool, &args(seconds), &pids, limit(seconds)));
    stop(&mut proxy, results, Measurement::Http, t);
    let run = run?;
    let label = format!("http {} via {}", row.key(), t.name());
    let key = |figure: &str| format!("http.{}.{figure}", row.key());
    let (requests, rate) = if row.uses_wrk() {
        let w = http::parse_wrk(&run.output)?;
        if w.socket_error_count > 0 {
            results.problems.push(format!(
                "{label}: wrk socket errors: {}",
                w.socket_errors.as_deref().unwrap_or("?")
            ));
        }
        if w.non_2xx > 0 {
            results
                .problems
                .push(format!("{label}: {} responses not 2xx or 3xx", w.non_2xx));
        }
        if let Some(p99) = w.p99_us {
            results.record(&key("p99"), t, p99);
        }
        (w.requests, w.rate)
    } else {
        let r = http::parse_h2load(&run.output)?;
        if r.failed > 0 || r.non_2xx > 0 {
            results.problems.push(format!(
                "{label}: {} requests failed, {} responses not 2xx",
                r.failed, r.non_2xx
            ));
        }
        if r.application_protocol.as_deref() != Some("h2") {
            results.problems.push(format!(
                "{label}: ALPN chose {:?}, not h2",
                r.application_protocol
            ));
        }
        results.observations.insert(format!(
            "http h2 via {}: {}, {}, ALPN {}",
            t.name(),
            r.tls_protocol.as_deref().unwrap_or("?"),
            r.cipher.as_deref().unwrap_or("?"),
            r.application_protocol.as_deref().unwrap_or("?")
        ));
        (r.succeeded, r.rate())
    };
    if requests == 0 {
        return Err(format!(
            "no request completed ({} s)",
            run.wall.as_secs_f64()
        ));
    }
    results.record(&key("rate"), t, rate);
    if !pids.is_empty() {
        let per_request_us =
            |ticks: u64| ticks as f64 / ctx.ticks_per_second * 1e6 / requests as f64;
        results.record(&key("cpu"), t, per_request_us(run.cpu.total()));
        results.record(&key("cpu_user"), t, per_request_us(run.cpu.user));
    }
    Ok(())
}

/// The table's rows, in order; keys are `measurement.figure`.
fn metrics(a: &RunArgs) -> Vec<Metric> {
    let row = |key: &str, label: String, higher_is_better: bool| Metric {
        key: key.to_string(),
        label,
        better: Some(higher_is_better),
        ratios: true,
    };
    let info = |key: &str, label: String| Metric {
        key: key.to_string(),
        label,
        better: None,
        ratios: true,
    };
    let absolute = |key: &str, label: String| Metric {
        key: key.to_string(),
        label,
        better: None,
        ratios: false,
    };
    let e = a.echo_connections;
    let b = a.bulk_connections;
    let c = a.churn_concurrency;
    let n = a.idle_connections;
    let k = a.release_count;
    let hc = a.http_connections;
    let sk = a.sse_release_count;
    let ss = a.sse_streams;
    let per_second = 1.0 / a.sse_interval.as_secs_f64();
    let mut rows = vec![
        row(
            "echo.rate",
            format!("echo, 64 B, {e} conns: messages/s"),
            true,
        ),
        row("echo.p50", "echo: round trip p50 (µs)".into(), false),
        row("echo.p99", "echo: round trip p99 (µs)".into(), false),
        row(
            "echo.cpu",
            "echo: proxy CPU per round trip (µs)".into(),
            false,
        ),
        row(
            "echo.cpu_user",
            "echo: of that CPU, in user space (µs)".into(),
            false,
        ),
        info(
            "echo.cpu_kernel",
            "echo: of that CPU, in the kernel (µs)".into(),
        ),
        info("echo.cpu_pct", "echo: proxy CPU (% of one core)".into()),
        row(
            "echo.peers_cpu",
            "echo: peers' CPU per round trip, echo backend + load generator (µs)".into(),
            false,
        ),
        info(
            "echo.backend_cpu",
            "echo: of the peers' CPU, the echo backend's (µs)".into(),
        ),
        info(
            "echo.generator_cpu",
            "echo: of the peers' CPU, the load generator's (µs)".into(),
        ),
        row(
            "bulk.rate",
            format!("bulk, 64 KiB, {b} conns: MiB/s echoed"),
            true,
        ),
        row("bulk.p50", "bulk: round trip p50 (µs)".into(), false),
        row(
            "bulk.cpu",
            "bulk: proxy CPU per 64 KiB round trip (µs)".into(),
            false,
        ),
        info("bulk.cpu_pct", "bulk: proxy CPU (% of one core)".into()),
        row(
            "latency.p50",
            "latency, 64 B, 1 conn: round trip p50 (µs)".into(),
            false,
        ),
        row("latency.p99", "latency: round trip p99 (µs)".into(), false),
        row("latency.max", "latency: round trip max (µs)".into(), false),
        row(
            "latency.cpu",
            "latency: proxy CPU per round trip (µs)".into(),
            false,
        ),
        row(
            "churn.rate",
            format!("churn, {c} concurrent: cycles/s"),
            true,
        ),
        row("churn.p50", "churn: cycle p50 (ms)".into(), false),
        row("churn.p99", "churn: cycle p99 (ms)".into(), false),
        row("churn.cpu", "churn: proxy CPU per cycle (µs)".into(), false),
        row(
            "churn.cpu_user",
            "churn: of that CPU, in user space (µs)".into(),
            false,
        ),
        info(
            "churn.cpu_kernel",
            "churn: of that CPU, in the kernel (µs)".into(),
        ),
        info(
            "churn.peers_cpu",
            "churn: peers' CPU per cycle, echo backend + load generator (µs)".into(),
        ),
        info("churn.cycles", "churn: cycles in the window".into()),
        absolute(
            "churn.rss_growth",
            "churn: proxy RSS growth over the window (KiB)".into(),
        ),
        row(
            "release.close_p50",
            format!("release, {k}×: client Close → backend gets Close, p50 (µs)"),
            false,
        ),
        row(
            "release.close_p99",
            "release: client Close → backend, p99 (µs)".into(),
            false,
        ),
        row(
            "release.fin_p50",
            "release: client FIN (no Close) → backend notified, p50 (µs)".into(),
            false,
        ),
        row(
            "release.fin_p99",
            "release: client FIN → backend, p99 (µs)".into(),
            false,
        ),
        row(
            "idle.kib",
            format!("idle, {n} WebSockets: proxy RSS per WebSocket (KiB)"),
            false,
        ),
        info("idle.rss_mib", "idle: proxy RSS with all open (MiB)".into()),
        row("idle.open_s", "idle: time to open all (s)".into(), false),
    ];
    // The http rows: rate, p99 (keep-alive rows), CPU per request and its user part.
    for (r, what) in [
        ("small", format!("http GET 100 B, keep-alive, {hc} conns")),
        ("large", "http GET 16 KiB, keep-alive".to_string()),
        ("post", "http POST 4 KiB, keep-alive".to_string()),
        (
            "close",
            "http GET 100 B, new connection per request".to_string(),
        ),
        (
            "h2",
            format!(
                "http/2 over TLS, GET 100 B, {} conns × {} streams",
                a.h2_connections, a.h2_streams
            ),
        ),
    ] {
        let key = |figure: &str| format!("http.{r}.{figure}");
        rows.push(row(&key("rate"), format!("{what}: requests/s"), true));
        if !matches!(r, "close" | "h2") {
            rows.push(row(&key("p99"), format!("{what}: latency p99 (µs)"), false));
        }
        rows.push(row(
            &key("cpu"),
            format!("{what}: proxy CPU per request (µs)"),
            false,
        ));
        rows.push(row(
            &key("cpu_user"),
            format!("{what}: of that CPU, in user space (µs)"),
            false,
        ));
    }
    rows.extend([
        row(
            "sse_release.fin_p50",
            format!("sse-release, {sk}× each: client FIN → backend notified, p50 (µs)"),
            false,
        ),
        row(
            "sse_release.fin_p99",
            "sse-release: client FIN → backend, p99 (µs)".into(),
            false,
        ),
        row(
            "sse_release.rst_p50",
            "sse-release: client RST → backend notified, p50 (µs)".into(),
            false,
        ),
        row(
            "sse_release.rst_p99",
            "sse-release: client RST → backend, p99 (µs)".into(),
            false,
        ),
        row(
            "sse_load.rate",
            format!("sse-load, {ss} streams × {per_second:.0} events/s: events delivered/s"),
            true,
        ),
        row(
            "sse_load.cpu",
            "sse-load: proxy CPU per event (µs)".into(),
            false,
        ),
        row(
            "sse_load.cpu_user",
            "sse-load: of that CPU, in user space (µs)".into(),
            false,
        ),
        absolute(
            "sse_load.stream_min",
            format!(
                "sse-load: events in the window of the stream that got the fewest (expected \
                 ~{:.0})",
                a.duration.as_secs_f64() * per_second
            ),
        ),
        absolute(
            "sse_load.stream_max",
            "sse-load: events in the window of the stream that got the most".into(),
        ),
        row(
            "sse_load.kib",
            "sse-load: proxy RSS per open stream (KiB)".into(),
            false,
        ),
        info(
            "sse_load.rss_mib",
            "sse-load: proxy RSS with all streams open (MiB)".into(),
        ),
    ]);
    rows
}

/// Stops the proxy (if any) and notes what its stop found: failed scrapes of wsgate's
/// `/metrics`, a proxy that had to be killed.
fn stop(proxy: &mut Option<Proxy>, results: &mut Results, m: Measurement, t: Target) {
    let Some(stopped) = proxy.as_mut().map(Proxy::stop) else {
        return;
    };
    if let Some(s) = stopped.scrapes {
        if s.failed > 0 {
            results.problems.push(format!(
                "{} via {}: {} of {} scrapes of /metrics failed (first: {})",
                m.name(),
                t.name(),
                s.failed,
                s.ok + s.failed,
                s.first_error.as_deref().unwrap_or("?")
            ));
        }
        let all = results.scrapes.entry(t).or_default();
        all.ok += s.ok;
        all.failed += s.failed;
    }
    if stopped.killed {
        results.problems.push(format!(
            "{} via {}: the proxy did not exit within {:?} of SIGTERM and was killed",
            m.name(),
            t.name(),
            targets::STOP_TIMEOUT
        ));
    }
}

fn check_errors(results: &mut Results, m: Measurement, t: Target, r: &LoadResult) {
    if r.errors > 0 {
        results.problems.push(format!(
            "{} via {}: {} errors (first: {})",
            m.name(),
            t.name(),
            r.errors,
            r.first_error.as_deref().unwrap_or("?")
        ));
    }
}

/// CPU time of the processes of a run, sampled together.
#[derive(Clone, Copy, Debug, Default)]
struct RunCpu {
    /// The proxy's processes (none for `direct`).
    proxy: procfs::CpuTicks,
    /// The echo backend.
    backend: procfs::CpuTicks,
    /// The load generator.
    generator: procfs::CpuTicks,
}

impl RunCpu {
    fn sample(proxy: &[u32], backend: u32, generator: u32) -> RunCpu {
        RunCpu {
            proxy: procfs::cpu_ticks(proxy),
            backend: procfs::cpu_ticks(&[backend]),
            generator: procfs::cpu_ticks(&[generator]),
        }
    }

    fn since(self, earlier: RunCpu) -> RunCpu {
        RunCpu {
            proxy: self.proxy.since(earlier.proxy),
            backend: self.backend.since(earlier.backend),
            generator: self.generator.since(earlier.generator),
        }
    }

    /// The peers of the proxy: the echo backend and the load generator together.
    fn peers(self) -> procfs::CpuTicks {
        procfs::CpuTicks {
            user: self.backend.user + self.generator.user,
            system: self.backend.system + self.generator.system,
        }
    }
}

/// What a load generator process reported, with the figures sampled at its markers.
struct LoadRun {
    result: LoadResult,
    /// CPU ticks between START and END.
    cpu: Option<RunCpu>,
    window_wall_s: Option<f64>,
    /// Proxy RSS once every idle connection was open.
    rss_open_kib: Option<u64>,
    /// Proxy RSS at START and at END.
    rss_window_kib: Option<(u64, u64)>,
}

/// Runs `wsgate-bench load ARGS`, killing it after `limit`.
fn run_load(
    ctx: &Ctx,
    args: &[&str],
    proxy: Option<&Proxy>,
    limit: Duration,
) -> Result<LoadRun, String> {
    let mut child = Command::new(&ctx.exe)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start the load generator: {e}"))?;
    let pid = child.id();
    let done = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let done = done.clone();
        std::thread::spawn(move || {
            let began = Instant::now();
            while !done.load(Ordering::Relaxed) {
                if began.elapsed() > limit {
                    eprintln!(
                        "wsgate-bench run: load generator still running after {limit:?}: killed"
                    );
                    targets::signal(pid, "KILL");
                    return;
                }
                sleep(Duration::from_millis(50));
            }
        })
    };
    let pids = proxy.map(|p| p.pids()).unwrap_or_default();
    let mut stdin = child.stdin.take();
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut run = LoadRun {
        result: LoadResult::default(),
        cpu: None,
        window_wall_s: None,
        rss_open_kib: None,
        rss_window_kib: None,
    };
    let mut got_result = false;
    let cpu = || RunCpu::sample(&pids, ctx.backend_pid, pid);
    let mut start: Option<(RunCpu, u64, Instant)> = None;
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        let (word, rest) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        match word {
            "START" => start = Some((cpu(), procfs::rss_kib(&pids), Instant::now())),
            "END" => {
                if let Some((ticks, rss, at)) = start {
                    run.cpu = Some(cpu().since(ticks));
                    run.window_wall_s = Some(at.elapsed().as_secs_f64());
                    if !pids.is_empty() {
                        run.rss_window_kib = Some((rss, procfs::rss_kib(&pids)));
                    }
                }
            }
            "OPEN" => {
                // Let the proxy finish whatever allocation follows the last handshake.
                sleep(Duration::from_secs(1));
                if !pids.is_empty() {
                    run.rss_open_kib = Some(procfs::rss_kib(&pids));
                }
                // End of file on its stdin releases the idle connections.
                drop(stdin.take());
            }
            "RESULT" => match serde_json::from_str(rest) {
                Ok(r) => {
                    run.result = r;
                    got_result = true;
                }
                Err(e) => eprintln!("wsgate-bench run: bad RESULT line ({e}): {rest}"),
            },
            _ => eprintln!("load: {line}"),
        }
    }
    let status = child.wait();
    done.store(true, Ordering::Relaxed);
    let _ = watchdog.join();
    if !got_result {
        return Err(format!(
            "the load generator ended without a result ({status:?})"
        ));
    }
    Ok(run)
}

/// The echo backend process, for the whole run. It exits when its stdin closes.
struct EchoBackend {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl EchoBackend {
    fn start(exe: &Path, addr: SocketAddr, tmp: &Path) -> Result<EchoBackend, String> {
        let log_path = tmp.join("echo-backend.log");
        let log = fs::File::create(&log_path)
            .map_err(|e| format!("cannot create the backend log: {e}"))?;
        let mut child = Command::new(exe)
            .args(["echo", "--exit-on-stdin-eof", "--listen", &addr.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start the echo backend: {e}"))?;
        let stdin = child.stdin.take();
        targets::wait_ready(addr, &mut child, "echo backend", &log_path)?;
        Ok(EchoBackend { child, stdin })
    }
}

impl Drop for EchoBackend {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The machine and versions, for the report header.
struct Environment {
    date: String,
    kernel: String,
    cpus: usize,
    cpu_model: String,
    load_before: String,
    versions: Vec<(String, String)>,
    git: Option<String>,
    /// A source file newer than the wsgate binary, if any (the binary may be stale).
    stale: Option<String>,
    haproxy_maxconn: Option<u64>,
    /// Versions of the load tools the run uses besides its own (wrk, h2load).
    load_tools: Vec<(String, String)>,
}

impl Environment {
    fn now(tools: &Tools) -> Environment {
        let command = |program: &str, args: &[&str]| -> Option<String> {
            let o = Command::new(program).args(args).output().ok()?;
            o.status
                .success()
                .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
        };
        let repo = repository();
        let manifest = repo.to_str().unwrap_or(".");
        let git = command("git", &["-C", manifest, "rev-parse", "--short", "HEAD"]).map(|rev| {
            match command(
                "git",
                &[
                    "-C",
                    manifest,
                    "status",
                    "--porcelain",
                    "--untracked-files=no",
                ],
            ) {
                Some(s) if !s.is_empty() => format!("{rev} + uncommitted changes"),
                _ => rev,
            }
        });
        Environment {
            date: command("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
                .unwrap_or_else(|| "unknown".into()),
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "unknown".into()),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model: fs::read_to_string("/proc/cpuinfo")
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find(|l| l.starts_with("model name"))
                        .and_then(|l| l.split_once(':'))
                        .map(|(_, v)| v.trim().to_string())
                })
                .unwrap_or_else(|| "unknown CPU".into()),
            load_before: load_average(),
            versions: targets::versions(tools),
            git,
            stale: newer_source(&tools.wsgate, repo),
            haproxy_maxconn: tools.haproxy.as_ref().map(|_| tools.haproxy_maxconn),
            load_tools: Vec::new(),
        }
    }
}

/// The repository root: the workspace this benchmark belongs to, which holds wsgate's
/// sources (the benchmark's own are in `bench/`, this package).
fn repository() -> &'static Path {
    let bench = Path::new(env!("CARGO_MANIFEST_DIR"));
    bench.parent().unwrap_or(bench)
}

/// The first file of wsgate's sources (src/, Cargo.toml, Cargo.lock under `repo`; not
/// this benchmark, which lives in bench/) modified after the binary was built.
fn newer_source(binary: &Path, repo: &Path) -> Option<String> {
    let built = fs::metadata(binary).and_then(|m| m.modified()).ok()?;
    let mut stack = vec![
        repo.join("src"),
        repo.join("Cargo.toml"),
        repo.join("Cargo.lock"),
    ];
    while let Some(path) = stack.pop() {
        let Ok(meta) = fs::metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            if let Ok(entries) = fs::read_dir(&path) {
                stack.extend(entries.flatten().map(|e| e.path()));
            }
        } else if meta.modified().is_ok_and(|m| m > built) {
            return Some(
                path.strip_prefix(repo)
                    .unwrap_or(&path)
                    .display()
                    .to_string(),
            );
        }
    }
    None
}

fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn render(
    a: &RunArgs,
    env: &Environment,
    targets: &[Target],
    results: &Results,
    took: Duration,
) -> String {
    let mut s = String::new();
    s.push_str("## wsgate benchmark\n\n");
    s.push_str(&format!("- date: {}\n", env.date));
    s.push_str(&format!(
        "- machine: Linux {}, {} CPUs ({}); load average before {}, after {}\n",
        env.kernel,
        env.cpus,
        env.cpu_model,
        env.load_before,
        load_average()
    ));
    for (name, version) in &env.versions {
        if !targets.iter().any(|t| t.name().starts_with(name.as_str())) {
            continue;
        }
        let extra = match (name.as_str(), &env.git) {
            ("wsgate", Some(rev)) => format!(" (git {rev})"),
            _ => String::new(),
        };
        s.push_str(&format!("- {name}: {version}{extra}\n"));
    }
    for (name, version) in &env.load_tools {
        s.push_str(&format!("- {name}: {version}\n"));
    }
    if let Some(file) = &env.stale {
        s.push_str(&format!(
            "- **warning: {file} changed after the wsgate binary was built; rebuild with \
             `cargo build --release --locked -p wsgate -p wsgate-bench`**\n"
        ));
    }
    s.push_str(&format!(
        "- settings: {} round(s), targets interleaved in a rotating order, {} s measured per \
         run after {} s warm-up; a fresh proxy process for every run; all on 127.0.0.1; \
         took {:.0} s\n",
        a.rounds,
        a.duration.as_secs_f64(),
        a.warmup.as_secs_f64(),
        took.as_secs_f64()
    ));
    let load: Vec<String> = a
        .measurements
        .iter()
        .map(|m| match m {
            Measurement::Echo => format!("echo {} connections × 64 B", a.echo_connections),
            Measurement::Bulk => format!("bulk {} × 64 KiB", a.bulk_connections),
            Measurement::Latency => "latency 1 × 64 B".to_string(),
            Measurement::Churn => format!("churn {} concurrent cycles", a.churn_concurrency),
            Measurement::Release => format!("release {} connections per ending", a.release_count),
            Measurement::Idle => format!("idle {} WebSockets", a.idle_connections),
            Measurement::Http => format!(
                "http: wrk -t1 -c{} (GET 100 B, GET 16 KiB, POST 4 KiB, Connection: close) and \
                 h2load -c{} -m{} over TLS, {} s each after a {} s warm-up run, to an nginx \
                 origin (one worker)",
                a.http_connections,
                a.h2_connections,
                a.h2_streams,
                http::whole_seconds(a.duration),
                http::whole_seconds(a.warmup)
            ),
            Measurement::SseRelease => format!(
                "sse-release {} event streams per abort (FIN, RST)",
                a.sse_release_count
            ),
            Measurement::SseLoad => format!(
                "sse-load {} event streams, an event each every {} ms",
                a.sse_streams,
                a.sse_interval.as_millis()
            ),
        })
        .collect();
    s.push_str(&format!("- load: {}\n", load.join(", ")));
    s.push_str(
        "- proxies: wsgate with bench/wsgate.toml, its defaults (liveness pings every 20 s, \
         the admin listener on loopback with /metrics scraped once per second, INFO log with \
         one line per connection to a file; `wsgate`: workers \"auto\", one thread per CPU; \
         `wsgate 1 thread`: workers = 1)",
    );
    if targets.contains(&Target::WsgateLean) {
        s.push_str(&format!(
            "; `{}`: the same with ping_interval \"0s\", no admin listener and RUST_LOG=warn",
            Target::WsgateLean.name()
        ));
    }
    if targets.contains(&Target::WsgateBase) {
        s.push_str(
            "; `wsgate base build`: the --wsgate-base binary with the configuration of `wsgate`",
        );
    }
    s.push_str(
        "; nginx with bench/nginx.conf (worker_processes auto; `nginx 1 worker`: 1), HAProxy \
         with bench/haproxy.cfg (nbthread = CPUs; `HAProxy 1 thread`: 1); the one-worker \
         anchors are compared with `wsgate 1 thread` only; all three log one line per \
         connection to a file, except in the http rows, where nginx's and HAProxy's \
         per-request logs are off (wsgate writes no line per HTTP request); plain requests \
         reuse backend connections (nginx upstream keepalive 64, HAProxy http-reuse always, \
         wsgate's pool); the HTTP/2 row terminates TLS in every proxy with one self-signed \
         ECDSA P-256 certificate",
    );
    if let Some(maxconn) = env.haproxy_maxconn.filter(|m| *m < 20_000) {
        s.push_str(&format!(
            "; HAProxy maxconn {maxconn}, not 20000: it needs two descriptors per connection \
             and the open-file limit here is lower than the 40,017 that 20000 asks for"
        ));
    }
    s.push('\n');
    s.push_str(
        "- cells: median over rounds (min–max); ratios: a wsgate configuration's median ÷ a baseline's median \
         (↑: higher is better, ↓: lower is better, ·: for information)\n\n",
    );
    s.push_str(&report::table(&metrics(a), targets, results));
    let mut observed: Vec<String> = results.observations.iter().cloned().collect();
    for (t, scrapes) in &results.scrapes {
        observed.push(format!(
            "{}: /metrics scraped {} times, once per second while it ran ({} failed)",
            t.name(),
            scrapes.ok + scrapes.failed,
            scrapes.failed
        ));
    }
    if !observed.is_empty() {
        s.push_str("\nObserved:\n");
        for o in &observed {
            s.push_str(&format!("- {o}\n"));
        }
    }
    if !results.problems.is_empty() {
        s.push_str("\nProblems:\n");
        for p in &results.problems {
            s.push_str(&format!("- {p}\n"));
        }
    }
    s
}

/// `--install-anchors`: installs nginx, HAProxy, wrk and h2load (nghttp2-client) with
/// apt-get.
fn install_anchors() {
    let root = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false);
    if !root {
        eprintln!(
            "wsgate-bench run: --install-anchors needs root; run \
             `sudo apt-get install -y nginx-light haproxy wrk nghttp2-client` instead"
        );
        return;
    }
    let apt = |args: &[&str]| -> bool {
        eprintln!("wsgate-bench run: apt-get {}", args.join(" "));
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    if !apt(&["update", "-qq"]) {
        eprintln!("wsgate-bench run: apt-get update failed");
    }
    let base = ["install", "-y", "-qq", "--no-install-recommends"];
    let with = |pkgs: &[&'static str]| -> Vec<&'static str> {
        base.iter().chain(pkgs.iter()).copied().collect()
    };
    let tools = ["haproxy", "wrk", "nghttp2-client"];
    let light: Vec<&'static str> = std::iter::once("nginx-light").chain(tools).collect();
    let full: Vec<&'static str> = std::iter::once("nginx").chain(tools).collect();
    if !apt(&with(&light)) && !apt(&with(&full)) {
        eprintln!(
            "wsgate-bench run: could not install nginx, HAProxy, wrk and h2load; the missing \
             ones are skipped"
        );
    }
}
