//! What each request becomes: a WebSocket upgrade (carried out by [`crate::upgrade`],
//! then relayed by [`crate::relay`]) or a forwarded HTTP exchange
//! ([`crate::proxy`]). Both ways are counted and recorded: an upgrade whose client leaves
//! before the backend answered is an ending too ([`PendingUpgrade`]).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response};

use crate::client::{Busy, ClientConn};
use crate::error::ProxyError;
use crate::frame::Negotiated;
use crate::gate::Gate;
use crate::proxy::{self, Body};
use crate::record::{Counters, Details, ExchangeInfo, Outcome, Record, WebSocketDetails};
use crate::relay::{self, Handoff, Leg};
use crate::report::{self, Written};
use crate::stream::Stream;
use crate::upgrade::{self, Upgrade};

/// The service of a hyper connection: every request through [`route`], except that the
/// first gets `first` when it is given (the answer already decided for a request read
/// before hyper took over).
pub fn service(
    gate: Arc<Gate>,
    conn: Arc<ClientConn>,
    first: Option<Response<Body>>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<Body>,
    Error = Infallible,
    Future = Routed,
> + Clone
+ Send
+ 'static {
    let first = Arc::new(Mutex::new(first.map(Box::new)));
    service_fn(move |req| {
        // From here until its response ends, the exchange keeps its connection busy.
        let busy = Busy::new(conn.clone());
        match first.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(answer) => Routed::Answer(Some(answer)),
            None => route(gate.clone(), busy, req),
        }
    })
}

/// What a request became: an answer decided already, a forwarded exchange, or a
/// WebSocket upgrade. Small (the larger states are boxed): hyper moves it a few times.
pub enum Routed {
    Answer(Option<Box<Response<Body>>>),
    Forward(proxy::Forwarding),
    Upgrade(Pin<Box<dyn Future<Output = Response<Body>> + Send>>),
}

impl Future for Routed {
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let response = match self.get_mut() {
            Routed::Answer(answer) => match answer.take() {
                Some(answer) => *answer,
                // Polled again after its answer: a bug of the caller's; answer anyway.
                None => proxy::error_response(ProxyError::BackendFailed, "answered already"),
            },
            Routed::Forward(forwarding) => std::task::ready!(Pin::new(forwarding).poll(cx)),
            Routed::Upgrade(upgrading) => std::task::ready!(upgrading.as_mut().poll(cx)),
        };
        Poll::Ready(Ok(response))
    }
}

/// A request hyper read: a WebSocket upgrade (its relay spawned once hyper hands the
/// client's stream over), a `CONNECT` refused, or plain HTTP forwarded to the backend.
fn route(gate: Arc<Gate>, busy: Busy, req: Request<Incoming>) -> Routed {
    if upgrade::is_websocket_upgrade(&req) {
        Routed::Upgrade(Box::pin(route_upgrade(gate, busy, req)))
    } else if req.method() == Method::CONNECT {
        // Its target is an authority, not a path of the backend's, and a 2xx would turn
        // the connection into a tunnel: nothing to forward.
        tracing::debug!(peer = %busy.peer, target = %req.uri(), "CONNECT refused");
        let e = ProxyError::TunnelRefused;
        Routed::Answer(Some(Box::new(proxy::error_response(e, e.message()))))
    } else {
        Routed::Forward(proxy::forward(gate, busy, req))
    }
}

/// A WebSocket upgrade hyper read.
async fn route_upgrade(gate: Arc<Gate>, busy: Busy, mut req: Request<Incoming>) -> Response<Body> {
    let client = hyper::upgrade::on(&mut req);
    let over_h2 = upgrade::is_extended_connect(&req);
    let mut pending = PendingUpgrade::new(&gate, &busy, &req);
    match upgrade(&gate, &busy, req, &mut pending).await {
        Ok(accepted) => {
            let handoff = Handoff {
                client: upgrade::client_stream(client, over_h2),
                backend: accepted.backend,
                negotiated: accepted.negotiated,
                info: accepted.info,
            };
            relay::spawn(
                &gate.tasks.tracker,
                handoff,
                &gate.live,
                &gate.metrics,
                busy.keep(over_h2),
            );
            accepted.response
        }
        Err(response) => response,
    }
}

/// A WebSocket upgrade carried out: what goes to the client and what to the relay.
pub struct Accepted {
    pub response: Response<Body>,
    pub backend: Leg<Stream>,
    pub negotiated: Negotiated,
    pub info: ExchangeInfo,
}

/// A WebSocket upgrade request, whichever way it came: refused while draining, else
/// carried out by [`upgrade::handle`]; counted. `Err` is the response to send instead.
pub async fn upgrade<B>(
    gate: &Gate,
    conn: &ClientConn,
    req: Request<B>,
    pending: &mut PendingUpgrade<'_>,
) -> Result<Accepted, Response<Body>> {
    let failed = |e: ProxyError, why: &str| {
        tracing::debug!(why, fault = e.fault().as_str(), "upgrade failed");
        gate.metrics.upgrade_failed(e);
        proxy::error_response(e, why)
    };
    if gate.drain.is_begun() {
        pending.settled();
        let e = ProxyError::Draining;
        return Err(failed(e, e.message()));
    }
    let settings = gate.settings();
    let handled = upgrade::handle(
        &settings,
        &gate.tasks,
        &conn.forwarded_for,
        req,
        &mut pending.backend,
    )
    .await;
    let Some(info) = pending.settled() else {
        return Err(failed(ProxyError::BackendFailed, "upgrade already settled"));
    };
    match handled {
        Ok(Upgrade::Accepted {
            response,
            backend,
            negotiated,
        }) => {
            gate.metrics.upgrade_relayed();
            Ok(Accepted {
                response,
                backend,
                negotiated,
                info,
            })
        }
        Ok(Upgrade::Refused(response)) => {
            gate.metrics.upgrade_refused();
            Err(response)
        }
        Err(e) => Err(failed(e.error, e.why)),
    }
}

/// A WebSocket upgrade while wsgate waits for the backend's answer. The backend's
/// connection is kept here; if the upgrade is dropped before it settles (the client
/// closed or reset its connection, or its HTTP/2 stream), the backend's connection is
/// closed at once and the ending recorded as `client_gone`, with how long closing it
/// took.
pub struct PendingUpgrade<'a> {
    gate: &'a Gate,
    info: Option<ExchangeInfo>,
    started: Instant,
    /// The backend's connection, while the handshake with it runs.
    pub backend: Option<Stream>,
}

impl<'a> PendingUpgrade<'a> {
    pub fn new<B>(gate: &'a Gate, conn: &ClientConn, req: &Request<B>) -> Self {
        PendingUpgrade {
            gate,
            info: Some(ExchangeInfo {
                id: gate.next_id(),
                connection: conn.id,
                client: conn.peer,
                worker: conn.worker,
                path: req.uri().path().into(),
            }),
            started: Instant::now(),
            backend: None,
        }
    }

    /// The upgrade has its answer (a relay, a refusal, an error): nothing to record
    /// here. Returns what is known of it, once.
    pub fn settled(&mut self) -> Option<ExchangeInfo> {
        self.info.take()
    }

    /// The client left before the backend answered.
    fn client_left(&mut self) {
        let Some(info) = self.info.take() else {
            return;
        };
        let releasing = Instant::now();
        drop(self.backend.take());
        let release = releasing.elapsed();
        let gate = self.gate;
        gate.metrics.upgrade_client_gone();
        let record = Record {
            info,
            outcome: Outcome::ClientGone,
            duration: self.started.elapsed(),
            release,
            client_to_backend: Counters::default(),
            backend_to_client: Counters::default(),
            details: Details::WebSocket(WebSocketDetails::default()),
        };
        report::exchange_ended(
            &gate.metrics,
            &gate.live,
            None,
            &record,
            Written {
                listed: true,
                logged: true,
            },
        );
    }
}

impl Drop for PendingUpgrade<'_> {
    fn drop(&mut self) {
        self.client_left();
    }
}
