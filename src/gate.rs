//! One running wsgate: the state every worker and every connection shares, in one
//! place with one owner ([`crate::serve`] builds it; everything else borrows it).
//!
//! - [`Settings`]: the configuration and what is built from it (the backend connector
//!   and pools, TLS, hyper's settings), immutable once built and replaced whole by a
//!   reload ([`Gate::reload`]);
//! - [`Tasks`]: every task serving a client, and the signals that end them; the
//!   [`Drain`];
//! - the live table of exchanges (which also holds their configuration) and the
//!   metrics;
//! - the connection limit ([`Slots`]) and every open client connection
//!   ([`Clients`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::{ArcSwap, Guard};
use hyper::server::conn::http1;
use hyper_util::rt::TokioTimer;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::Backend;
use crate::client::{Clients, Signals, Slots};
use crate::config::Config;
use crate::drain::{Drain, Plan};
use crate::error::TlsError;
use crate::live::{ExchangeConfig, LiveTable};
use crate::logging::Logging;
use crate::metrics::Metrics;
use crate::report;
use crate::tls::ServerTls;

/// Over-capacity connections answered with 503 at once; past this they are closed
/// without an answer, so a flood cannot use more than this many extra descriptors.
const MAX_REJECTING: usize = 64;

/// The state one wsgate shares across its workers.
pub struct Gate {
    /// When it started serving.
    pub started: std::time::Instant,
    settings: ArcSwap<Settings>,
    /// Worker threads: each has a keep-alive pool toward the backend.
    workers: usize,
    pub tasks: Tasks,
    pub drain: Drain,
    /// Open WebSockets and HTTP streams: the admin API's view, the drain's and the
    /// reload's reach.
    pub live: LiveTable,
    pub metrics: Arc<Metrics>,
    /// Client connections open, against `max_connections`.
    pub slots: Arc<Slots>,
    /// Every open client connection: what the drain and the exit reach.
    pub clients: Arc<Clients>,
    /// Permits for answering over-capacity connections with a 503.
    pub rejecting: Arc<Semaphore>,
    next_id: AtomicU64,
    /// The process's logger, when wsgate installed it (a reload may change its format).
    logging: Option<Logging>,
}

impl Gate {
    /// For `workers` workers. Fails when a TLS certificate, key or CA file does not
    /// load.
    pub fn new(config: Config, workers: usize, logging: Option<Logging>) -> Result<Gate, TlsError> {
        let settings = Settings::new(config, workers)?;
        let metrics = Arc::new(Metrics::new(settings.max_connections));
        let slots = Arc::new(Slots::new(settings.max_connections));
        let config = &settings.config;
        Ok(Gate {
            started: std::time::Instant::now(),
            live: LiveTable::new(exchange_config(config), config.admin.recent_endings),
            settings: ArcSwap::from_pointee(settings),
            workers,
            tasks: Tasks::default(),
            drain: Drain::default(),
            metrics,
            slots,
            clients: Arc::new(Clients::new(workers)),
            rejecting: Arc::new(Semaphore::new(MAX_REJECTING)),
            next_id: AtomicU64::new(1),
            logging,
        })
    }

    /// The settings in force. Hold the guard for one request or handshake, not for a
    /// connection's life: a reload should reach the next request.
    pub fn settings(&self) -> Guard<Arc<Settings>> {
        self.settings.load()
    }

    /// The settings in force, to hold across an await (a new backend connection).
    pub fn settings_full(&self) -> Arc<Settings> {
        self.settings.load_full()
    }

    /// A process-unique id, for a client connection or an exchange.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Ready for new connections: not draining (`/readyz`).
    pub fn is_ready(&self) -> bool {
        !self.drain.is_begun()
    }

    /// Begins the drain (see [`crate::drain`]); `trigger` says what asked for it. False
    /// if it had begun already.
    pub fn begin_drain(&self, trigger: &'static str) -> bool {
        let shutdown = &self.settings().config.shutdown;
        let plan = Plan {
            drain_timeout: shutdown.drain_timeout,
            spread: shutdown.spread,
            client_close_code: shutdown.client_close_code,
        };
        let begun = self
            .drain
            .begin(trigger, plan, &self.live, &self.tasks.tracker);
        if begun {
            self.metrics.draining.set(1.0);
            self.clients.signal(Signals::DRAIN);
        }
        begun
    }

    /// The exit: stop accepting, and have every connection finish what is open and
    /// close.
    pub fn stop(&self) {
        self.tasks.stop.cancel();
        self.clients.signal(Signals::STOP);
    }

    /// The drain deadline: end whatever is left now.
    pub fn force(&self) {
        self.tasks.force.cancel();
        self.clients.signal(Signals::FORCE);
        self.live.force_all();
    }

    /// Puts a new configuration in force: new connections and requests use it, open
    /// WebSockets adopt its timers. The keys that belong to what was made at start (the
    /// listening sockets, the worker threads) keep their running values, each with a
    /// warning. Fails, changing nothing, if its TLS material does not load.
    pub fn reload(&self, mut config: Config) -> Result<(), TlsError> {
        let running = self.settings();
        let old = &running.config;
        for (key, changed) in [
            ("listen", config.listen != old.listen),
            ("admin.listen", config.admin.listen != old.admin.listen),
            ("workers", config.workers != old.workers),
        ] {
            if changed {
                tracing::warn!(
                    key,
                    "configuration reload: this key changes only at the next start; keeping the running value"
                );
            }
        }
        config.listen = old.listen;
        config.admin.listen = old.admin.listen;
        config.workers = old.workers;
        let settings = Settings::new(config, self.workers)?;
        let new = &settings.config;
        if new.log.format != old.log.format
            && let Some(logging) = &self.logging
            && let Err(e) = logging.set_format(new.log.format)
        {
            tracing::warn!(error = %e, "cannot switch the log format");
        }
        self.slots.set_max(settings.max_connections);
        self.metrics
            .connections_max
            .set(settings.max_connections as f64);
        let (exchanges, recent) = (exchange_config(new), new.admin.recent_endings);
        drop(running);
        // The settings first: an exchange told to reconfigure reads them.
        self.settings.store(Arc::new(settings));
        self.live.reconfigure(exchanges, recent);
        Ok(())
    }
}

/// Every [`report::SWEEP_INTERVAL`], until aborted: adds open exchanges' traffic to the
/// process-wide counters and folds histogram samples into their buckets, and closes the
/// idle backend connections that expired or that the backend closed.
pub async fn housekeeping(gate: Arc<Gate>) {
    let mut every = tokio::time::interval(report::SWEEP_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        report::sweep(&gate.live, &gate.metrics);
        gate.settings().backend.sweep();
    }
}

/// What exchanges run with, from the configuration.
fn exchange_config(config: &Config) -> ExchangeConfig {
    ExchangeConfig {
        timers: Arc::new(config.websocket.timers()),
        max_frame_size: config.websocket.max_frame_size,
        drain_close_code: config.shutdown.client_close_code,
    }
}

/// The timers of an HTTP exchange's body (`[http]`), read per part of the body from [`Settings`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpTimers {
    /// A response body the client has not asked for more of for this long ends the
    /// exchange (`client_stalled`); `None`: never.
    pub write_timeout: Option<Duration>,
    /// No body bytes either way for this long ends the exchange
    /// (`stream_idle_timeout`); `None`: never.
    pub stream_idle_timeout: Option<Duration>,
    /// A quiet event stream gets an SSE comment line after this long; `None`: never.
    pub sse_heartbeat: Option<Duration>,
    /// A body still open this long after its head makes the exchange a stream.
    pub stream_after: Duration,
}

/// The timers of an HTTP exchange's body, from the configuration.
fn http_timers(config: &Config) -> HttpTimers {
    let http = &config.http;
    HttpTimers {
        write_timeout: http.write_timeout,
        stream_idle_timeout: http.stream_idle_timeout,
        sse_heartbeat: http.sse_heartbeat,
        stream_after: http.stream_after,
    }
}

/// The configuration and everything built from it.
pub struct Settings {
    pub config: Config,
    /// `max_connections`, resolved against the open-file limit.
    pub max_connections: usize,
    pub backend: Backend,
    /// TLS toward clients, when `[tls]` is configured.
    pub tls: Option<ServerTls>,
    /// hyper's HTTP/1.1 server settings, built once: building them per connection
    /// allocated its timer.
    pub http1: http1::Builder,
    /// What an HTTP exchange's body runs with: read per request from here, not from the
    /// live table (whose lock every worker shares).
    pub http_timers: HttpTimers,
}

impl Settings {
    fn new(config: Config, workers: usize) -> Result<Settings, TlsError> {
        let mut http1 = http1::Builder::new();
        tune_http1(&mut http1, config.http.max_header_size);
        Ok(Settings {
            max_connections: config
                .max_connections
                .resolve(crate::listener::websocket_capacity(workers)),
            backend: Backend::new(&config, workers)?,
            tls: config.tls.as_ref().map(ServerTls::new).transpose()?,
            http1,
            http_timers: http_timers(&config),
            config,
        })
    }
}

/// hyper's HTTP/1.1 server as wsgate runs it (and as [`crate::h1_server`] writes
/// responses).
pub(crate) fn tune_http1(http1: &mut http1::Builder, max_header_size: usize) {
    http1
        .timer(TokioTimer::new())
        // hyper's head timer is a timer made and dropped per request; the connection's
        // task closes one idle for `header_read_timeout` instead (a keep-alive
        // connection left idle, a head that does not come whole), with one timer moved
        // only as needed (see `crate::abort::Watch`).
        .header_read_timeout(None)
        .max_buf_size(max_header_size.max(8192))
        // Responses carry the backend's own Date, or none: wsgate adds nothing.
        .auto_date_header(false);
}

/// Every task serving a client, a backend handshake or a relay, and the signals that
/// end them. The exit waits for `tracker`.
#[derive(Debug, Default)]
pub struct Tasks {
    pub tracker: TaskTracker,
    /// The exit began: stop accepting, finish what is in flight.
    pub stop: CancellationToken,
    /// The drain deadline passed: abort what is left.
    pub force: CancellationToken,
}
