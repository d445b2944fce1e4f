//! Process signals: SIGTERM (Kubernetes) and SIGINT (Ctrl-C) start a graceful shutdown
//! (the drain itself is in [`crate::server::serve`]); SIGHUP re-reads the TLS
//! certificate.

use std::sync::Arc;
use std::time::Duration;

use crate::tls::ServerCert;

/// Completes when SIGTERM or SIGINT arrives.
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
                }
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM; only SIGINT stops wsgate")
            }
        }
    }
    if let Err(e) = tokio::signal::ctrl_c().await {
        tracing::error!(error = %e, "cannot listen for SIGINT");
        std::future::pending::<()>().await;
    }
    tracing::info!("SIGINT received");
}

/// Re-reads the TLS certificate every `interval` (if set) and on SIGHUP, until aborted.
pub async fn reload_certificates(cert: Arc<ServerCert>, interval: Option<Duration>) {
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| tracing::warn!(error = %e, "cannot listen for SIGHUP"))
        .ok();
    let mut tick = interval.map(|d| {
        let mut t = tokio::time::interval(d);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    loop {
        let ticked = async {
            match &mut tick {
                Some(t) => {
                    t.tick().await;
                }
                None => std::future::pending().await,
            }
        };
        #[cfg(unix)]
        let hangup = async {
            match &mut hup {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hangup = std::future::pending::<()>();
        tokio::select! {
            () = ticked => {}
            () = hangup => tracing::info!("SIGHUP received: re-reading the TLS certificate"),
        }
        match cert.reload() {
            Ok(true) => tracing::info!("TLS certificate reloaded"),
            Ok(false) => {}
            Err(e) => {
                tracing::error!(error = %e, "new TLS certificate rejected; keeping the current one")
            }
        }
    }
}
