//! One running wsgate: the state every worker and every connection shares, in one
//! place with one owner ([`crate::serve`] builds it; everything else borrows it).
//!
//! - [`Settings`]: the configuration and what is built from it (the backend connector
//!   and pools, TLS, hyper's settings, the relays' timers), immutable once built;
//! - [`Tasks`]: every task serving a client, and the signals that end them;
//! - the live WebSocket table and the metrics;
//! - the connection limit.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use hyper::server::conn::http1;
use hyper_util::rt::TokioTimer;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::Backend;
use crate::config::Config;
use crate::error::TlsError;
use crate::live::LiveTable;
use crate::metrics::Metrics;
use crate::session::Timers;
use crate::tls::ServerTls;

/// Over-capacity connections answered with 503 at once; past this they are closed
/// without an answer, so a flood cannot use more than this many extra descriptors.
const MAX_REJECTING: usize = 64;

/// The state one wsgate shares across its workers.
pub struct Gate {
    settings: Settings,
    pub tasks: Tasks,
    /// Live WebSocket connections: the admin API's view, the drain's reach.
    pub live: LiveTable,
    pub metrics: Arc<Metrics>,
    /// One permit per client connection (`max_connections`).
    pub slots: Arc<Semaphore>,
    /// Permits for answering over-capacity connections with a 503.
    pub rejecting: Arc<Semaphore>,
    next_id: AtomicU64,
}

impl Gate {
    /// For `workers` workers. Fails when a TLS certificate, key or CA file does not
    /// load.
    pub fn new(config: Config, workers: usize) -> Result<Gate, TlsError> {
        let metrics = Arc::new(Metrics::new(config.max_connections));
        let slots = Arc::new(Semaphore::new(config.max_connections));
        Ok(Gate {
            settings: Settings::new(config, workers)?,
            tasks: Tasks::default(),
            live: LiveTable::default(),
            metrics,
            slots,
            rejecting: Arc::new(Semaphore::new(MAX_REJECTING)),
            next_id: AtomicU64::new(1),
        })
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// A process-unique connection id.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Ready for new connections: serving and not draining (`/readyz`).
    pub fn is_ready(&self) -> bool {
        !self.tasks.shutdown.is_cancelled()
    }
}

/// The configuration and everything built from it.
pub struct Settings {
    pub config: Config,
    pub backend: Backend,
    /// TLS toward clients, when `[tls]` is configured.
    pub tls: Option<ServerTls>,
    /// hyper's HTTP/1.1 server settings, built once: building them per connection
    /// allocated its timer.
    pub http1: http1::Builder,
    /// The relays' timers, shared by every relay: one pointer per connection.
    pub timers: Arc<Timers>,
}

impl Settings {
    fn new(config: Config, workers: usize) -> Result<Settings, TlsError> {
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(config.http.header_read_timeout)
            .max_buf_size(config.http.max_header_size.max(8192))
            // Responses carry the backend's own Date, or none: wsgate adds nothing.
            .auto_date_header(false);
        Ok(Settings {
            backend: Backend::new(&config, workers)?,
            tls: config.tls.as_ref().map(ServerTls::new).transpose()?,
            http1,
            timers: Arc::new(config.websocket.timers()),
            config,
        })
    }
}

/// Every task serving a client, a backend handshake or a relay, and the signals that
/// end them. The drain waits for `tracker`.
#[derive(Debug, Default)]
pub struct Tasks {
    pub tracker: TaskTracker,
    /// Draining started: stop accepting, finish what is in flight.
    pub shutdown: CancellationToken,
    /// The drain deadline passed: abort what is left.
    pub force: CancellationToken,
}
