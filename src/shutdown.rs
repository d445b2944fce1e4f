//! The signals that start a graceful shutdown: SIGTERM (Kubernetes) and SIGINT (Ctrl-C).
//! The drain itself is in [`crate::server::serve`].

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
