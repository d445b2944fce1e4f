//! The threads that serve connections (`workers`).
//!
//! Each worker is one thread running a tokio current-thread runtime. It accepts on a
//! listening socket of its own ([`crate::listener`]) and runs every task of the
//! connections it accepted, so a connection's sockets, timers and buffers stay on one
//! thread from accept to close. This is nginx's and Envoy's model rather than tokio's
//! work-stealing runtime: measured on a 2-CPU machine, the work-stealing runtime spent
//! 15–30% more CPU per message and per connection than one thread, in wake-ups of its
//! other thread and in tasks moving between CPUs; independent workers spend about what
//! one thread spends and still use every CPU. The price is that nothing rebalances: a
//! worker busy with one connection's work (a burst of TLS handshakes) delays only its
//! own connections, and the kernel's hash decides how connections spread.
//!
//! Worker 0 is the thread that called [`crate::serve`]; it also runs what exists once
//! per process: the admin listener, the housekeeping, signal handling and the drain.
//! The others are started here. All of them share one [`Gate`]: the drain signal, the
//! task tracker the drain waits on, the connection limit, metrics and the live table.

use std::net::TcpListener as StdListener;
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::gate::Gate;
use crate::server;

/// The workers started besides the calling thread.
pub struct Workers {
    threads: Vec<Worker>,
    /// Cancelled once the drain is over: each worker's runtime then stops, dropping
    /// whatever the force close left.
    stop: CancellationToken,
}

struct Worker {
    thread: JoinHandle<()>,
    /// Completes (with an error: the sender is dropped) when the thread has finished.
    exited: oneshot::Receiver<()>,
}

impl Workers {
    /// Starts one worker thread per listener, numbered from 1, and returns once every
    /// one of them is accepting. Fails if a thread or its runtime cannot be created; the
    /// ones already started are stopped.
    pub async fn start(gate: &Arc<Gate>, listeners: Vec<StdListener>) -> Result<Self, Error> {
        let mut workers = Workers {
            threads: Vec::with_capacity(listeners.len()),
            stop: CancellationToken::new(),
        };
        for (i, listener) in listeners.into_iter().enumerate() {
            let index = i + 1;
            let (started_tx, started) = oneshot::channel();
            let (exited_tx, exited) = oneshot::channel::<()>();
            let gate = gate.clone();
            let stop = workers.stop.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("wsgate-worker-{index}"))
                .spawn(move || {
                    // Dropped when the thread ends, after the runtime and its tasks.
                    let _exited = exited_tx;
                    run(index, gate, listener, stop, started_tx);
                });
            let started = match spawned {
                Ok(thread) => {
                    workers.threads.push(Worker { thread, exited });
                    started.await.unwrap_or_else(|_| {
                        Err("the worker thread ended while starting".to_string())
                    })
                }
                Err(e) => Err(e.to_string()),
            };
            if let Err(why) = started {
                workers.stop().await;
                return Err(Error::Worker { index, why });
            }
        }
        Ok(workers)
    }

    /// Stops every worker's runtime and waits for the threads to finish. Call it once the
    /// drain is over: tasks still running are dropped (their sockets close).
    pub async fn stop(mut self) {
        self.stop.cancel();
        for worker in std::mem::take(&mut self.threads) {
            // The runtime ends as soon as its thread sees `stop`; dropping its tasks
            // only closes sockets.
            let _ = worker.exited.await;
            if worker.thread.join().is_err() {
                tracing::error!("a worker thread panicked");
            }
        }
    }
}

impl Drop for Workers {
    /// A server future dropped without its drain (aborted) still ends its workers, on
    /// their own time.
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A worker thread's body: its own runtime, accepting on `listener` until the drain
/// begins, then running its connections until `stop`.
fn run(
    index: usize,
    gate: Arc<Gate>,
    listener: StdListener,
    stop: CancellationToken,
    started: oneshot::Sender<Result<(), String>>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = started.send(Err(format!("cannot start its runtime: {e}")));
            return;
        }
    };
    runtime.block_on(async move {
        let listener = match TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                let _ = started.send(Err(format!("cannot register its listener: {e}")));
                return;
            }
        };
        let _ = started.send(Ok(()));
        tracing::debug!(worker = index, "worker accepting");
        gate.tasks
            .tracker
            .spawn(server::accept(gate.clone(), index, listener));
        stop.cancelled().await;
    });
}
