//! The end of the process (README "Drain, exit and reload"), once the drain has begun: wait for what is open
//! to end, stop accepting, let in-flight requests finish, and abort whatever is left at
//! the drain deadline or at a second stop signal.

use std::future::Future;
use std::time::Duration;

use crate::gate::Gate;

/// How long to wait after the forced close for tasks to notice it.
const FORCE_GRACE: Duration = Duration::from_secs(2);

/// The end of the process, once the drain has begun: the open WebSockets and HTTP
/// streams first (the port keeps accepting, and refusing upgrades, while they end),
/// then the listeners and what is in flight, all by the drain deadline.
pub async fn exit(gate: &Gate, abort: impl Future<Output = ()>) {
    let tasks = &gate.tasks;
    let deadline = gate
        .drain
        .deadline()
        .map_or_else(tokio::time::Instant::now, tokio::time::Instant::from_std);
    tracing::info!(
        open_exchanges = gate.live.len(),
        open_tasks = tasks.tracker.len(),
        "stopping: waiting for the drain"
    );
    let finished = async {
        gate.live.emptied().await;
        gate.stop();
        tasks.tracker.close();
        tasks.tracker.wait().await;
    };
    let drained = tokio::select! {
        waited = tokio::time::timeout_at(deadline, finished) => {
            if waited.is_err() {
                tracing::warn!(
                    open_exchanges = gate.live.len(),
                    open_tasks = tasks.tracker.len(),
                    "drain deadline reached: aborting the rest"
                );
            }
            waited.is_ok()
        }
        () = abort => {
            tracing::warn!(
                open_exchanges = gate.live.len(),
                open_tasks = tasks.tracker.len(),
                "second stop signal: aborting the rest"
            );
            false
        }
    };
    if !drained {
        gate.stop();
        tasks.tracker.close();
        gate.force();
        if tokio::time::timeout(FORCE_GRACE, tasks.tracker.wait())
            .await
            .is_err()
        {
            tracing::error!(
                open_tasks = tasks.tracker.len(),
                "tasks still running at exit"
            );
        }
    }
    tracing::info!("shutdown complete");
}
