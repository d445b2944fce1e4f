//! `wsgate-bench`: the benchmark of wsgate against a direct connection, nginx and
//! HAProxy (see `bench/README.md`).
//!
//! One binary, three roles, each a separate process when `run` orchestrates them:
//!
//! - `echo`: a WebSocket echo backend (the RFC 6455 handshake done by hand, frames parsed
//!   with wsgate's own `wsgate::frame`);
//! - `load`: the load generator, one mode per measurement; it prints `START`/`END`
//!   (or `OPEN`) markers and one `RESULT {json}` line on stdout. The modes `release`,
//!   `sse-release` and `sse-load` host their backend in the same process (a scripted
//!   WebSocket backend, an event stream backend);
//! - `run`: starts the echo backend (and, for the `http` measurement, an nginx origin)
//!   and each proxy on free loopback ports, runs every measurement against every
//!   target, interleaved and repeated, samples the CPU time of the proxy, the echo
//!   backend and the load generator, and the proxy's memory, from `/proc`, scrapes
//!   wsgate's `/metrics` while it runs, and prints a markdown table. The `http` rows
//!   are loaded by wrk and h2load, run as they are.

mod echo;
mod http;
mod load;
mod procfs;
mod report;
mod run;
mod scrape;
mod sse;
mod stats;
mod targets;
mod ws;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// Benchmark wsgate against no proxy, nginx and HAProxy on loopback.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a WebSocket echo backend.
    Echo(echo::EchoArgs),
    /// Generate load against one WebSocket endpoint (one measurement).
    Load(load::LoadArgs),
    /// Run the whole benchmark and print the table.
    Run(run::RunArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Idle connections need many sockets: raise the soft open-file limit to the hard
    // limit in every role (the proxies raise their own).
    let nofile = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("wsgate-bench: cannot raise the open-file limit: {e}");
            1024
        }
    };
    match cli.command {
        Command::Echo(args) => echo::main(args),
        Command::Load(args) => load::main(args),
        Command::Run(args) => run::main(args, nofile),
    }
}

/// Parses a duration with humantime (`"5s"`, `"500ms"`, `"2m"`, `"100us"`, `"1.5s"`,
/// `"1m 30s"`), and a bare number as seconds (`"3"`), which humantime refuses.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let bare = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    let parsed = if bare {
        humantime::parse_duration(&format!("{s}s"))
    } else {
        humantime::parse_duration(s)
    };
    parsed.map_err(|e| format!("{s:?} is not a duration (e.g. 5s, 500ms, 2m): {e}"))
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("100us"), Ok(Duration::from_micros(100)));
        assert_eq!(parse_duration("100µs"), Ok(Duration::from_micros(100)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration(" 3 "), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("0.25"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
