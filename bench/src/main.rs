//! `wsgate-bench`: the benchmark of wsgate against a direct connection, nginx and
//! HAProxy (see `bench/README.md`).
//!
//! One binary, three roles, each a separate process when `run` orchestrates them:
//!
//! - `echo`: a WebSocket echo backend (the RFC 6455 handshake done by hand, frames parsed
//!   with wsgate's own `wsgate::frame`);
//! - `load`: the load generator, one mode per measurement; it prints `START`/`END`
//!   (or `OPEN`) markers and one `RESULT {json}` line on stdout;
//! - `run`: starts the echo backend and each proxy on free loopback ports, runs every
//!   measurement against every target, interleaved and repeated, samples the proxy's
//!   CPU time and memory from `/proc`, and prints a markdown table.

mod echo;
mod load;
mod procfs;
mod report;
mod run;
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

/// Parses `"5s"`, `"500ms"`, `"2m"`, `"100us"` or a bare number of seconds.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 5s, 500ms, 2m)"))?;
    let seconds = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1e3,
        "us" | "µs" => value / 1e6,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {s:?} (use s, ms, us, m, h)"
            ));
        }
    };
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(format!("{s:?} is not a duration"));
    }
    Ok(Duration::from_secs_f64(seconds))
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
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }
}
