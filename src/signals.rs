//! What reaches wsgate from outside while it runs, besides connections: SIGTERM
//! (Kubernetes) and SIGINT (Ctrl-C) start the exit ([`stop`]); SIGHUP and a changed
//! configuration file reload the configuration, and a changed certificate is picked up
//! ([`watch`]).
//!
//! A reload never ends the process and never drops a connection: a file that does not
//! validate is refused whole, every problem logged with its key, and the running
//! configuration stays.

use std::sync::Arc;

use tokio::time::Instant;

use crate::config::{ConfigError, Source};
use crate::gate::Gate;

/// Listens for SIGTERM and SIGINT from now on (their default action, ending the
/// process, no longer applies); the future completes when one arrives. A listener made
/// after a signal arrived waits for the next one.
pub fn stop() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let listen = |kind: SignalKind, name: &str| {
            signal(kind)
                .map_err(|e| tracing::error!(error = %e, "cannot listen for {name}"))
                .ok()
        };
        let mut term = listen(SignalKind::terminate(), "SIGTERM");
        let mut int = listen(SignalKind::interrupt(), "SIGINT");
        async move {
            tokio::select! {
                Some(_) = recv(&mut term) => tracing::info!("SIGTERM received"),
                Some(_) = recv(&mut int) => tracing::info!("SIGINT received"),
                else => std::future::pending::<()>().await,
            }
        }
    }
    #[cfg(not(unix))]
    async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
        tracing::info!("SIGINT received");
    }
}

/// The next delivery of `signal`, or never if it could not be listened for.
#[cfg(unix)]
async fn recv(signal: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match signal {
        Some(signal) => signal.recv().await,
        None => std::future::pending().await,
    }
}

/// Until aborted: reloads the configuration from `source` on SIGHUP and whenever the
/// file's content differs from what was loaded last (checked every `reload_interval`; a Kubernetes ConfigMap
/// update swaps a symlink, so the content is compared, not the modification time), and
/// re-reads the TLS certificate every `tls.reload_interval` and on SIGHUP. Without a
/// configuration file only the certificate is watched. SIGHUP is listened for from the
/// start, whatever the configuration, so it never ends the process.
pub async fn watch(gate: Arc<Gate>, source: Option<(Source, Vec<u8>)>, mut hangup: Hangup) {
    let (source, mut seen) = match source {
        Some((source, loaded)) => (Some(source), Some(loaded)),
        None => (None, None),
    };
    let mut next_file_check = None;
    let mut next_cert_check = None;
    loop {
        let settings = gate.settings();
        let file_every = source.as_ref().and(settings.config.reload_interval);
        let cert_every = settings.config.tls.as_ref().and_then(|t| t.reload_interval);
        drop(settings);
        let now = Instant::now();
        let file_due = *next_file_check.get_or_insert_with(|| file_every.map(|d| now + d));
        let cert_due = *next_cert_check.get_or_insert_with(|| cert_every.map(|d| now + d));
        let wake = [file_due, cert_due].into_iter().flatten().min();
        tokio::select! {
            () = hangup.recv() => {
                tracing::info!("SIGHUP received: reloading the configuration");
                match &source {
                    Some(source) => {
                        seen = reload(&gate, source, "SIGHUP").or(seen);
                    }
                    None => tracing::info!("no configuration file (--config): nothing to reload"),
                }
                reload_certificate(&gate);
            }
            () = sleep_until(wake) => {
                let now = Instant::now();
                if file_due.is_some_and(|due| due <= now) {
                    next_file_check = None;
                    if let Some(source) = &source {
                        match source.read() {
                            Ok(content) if Some(&content) != seen.as_ref() => {
                                seen = Some(content);
                                reload(&gate, source, "file changed");
                            }
                            Ok(_) => {}
                            Err(e) => tracing::debug!(error = %e, "cannot read the configuration file"),
                        }
                    }
                }
                if cert_due.is_some_and(|due| due <= now) {
                    next_cert_check = None;
                    reload_certificate(&gate);
                }
            }
        }
    }
}

/// Reads and applies `source`; returns the content it read, if it could read it.
fn reload(gate: &Gate, source: &Source, trigger: &str) -> Option<Vec<u8>> {
    let content = match source.read() {
        Ok(content) => content,
        Err(e) => {
            gate.metrics.reload_failed();
            tracing::error!(trigger, error = %e, "configuration reload refused: keeping the running configuration");
            return None;
        }
    };
    let applied = source
        .parse(&content)
        .map_err(|e| match e {
            ConfigError::Invalid(problems) => {
                problems.into_iter().map(|p| (p.key, p.message)).collect()
            }
            e => vec![(String::new(), e.to_string())],
        })
        .and_then(|config| {
            gate.reload(config)
                .map_err(|e| vec![("tls".to_string(), e.to_string())])
        });
    match applied {
        Ok(()) => {
            gate.metrics.reload_succeeded();
            tracing::info!(trigger, "configuration reloaded");
        }
        Err(problems) => {
            gate.metrics.reload_failed();
            for (key, problem) in &problems {
                tracing::error!(trigger, key = %key, problem = %problem, "configuration reload refused: keeping the running configuration");
            }
        }
    }
    Some(content)
}

fn reload_certificate(gate: &Gate) {
    let settings = gate.settings();
    let Some(tls) = &settings.tls else {
        return;
    };
    match tls.cert.reload() {
        Ok(true) => tracing::info!("TLS certificate reloaded"),
        Ok(false) => {}
        Err(e) => {
            tracing::error!(error = %e, "new TLS certificate rejected; keeping the current one")
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// SIGHUP, where there is such a thing.
pub struct Hangup {
    #[cfg(unix)]
    signal: Option<tokio::signal::unix::Signal>,
}

impl Hangup {
    /// Listens from now on: SIGHUP's default action, ending the process, no longer
    /// applies.
    pub fn listen() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let signal = signal(SignalKind::hangup())
                .map_err(|e| tracing::warn!(error = %e, "cannot listen for SIGHUP"))
                .ok();
            Hangup { signal }
        }
        #[cfg(not(unix))]
        Hangup {}
    }

    async fn recv(&mut self) {
        #[cfg(unix)]
        if let Some(signal) = &mut self.signal {
            signal.recv().await;
            return;
        }
        std::future::pending::<()>().await;
    }
}
