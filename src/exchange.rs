//! An HTTP exchange, from its request to its end, observed where its bytes end.
//!
//! [`Exchange`] is made when a request arrives and lives as long as the exchange: in the
//! request's future until the response head comes, then in the response body that
//! wsgate hands hyper ([`ForwardedBody`]). It owns the backend connection it borrowed,
//! so however the exchange ends — the body's end, the backend's error, a timer, the
//! drain, an operator, or hyper dropping it because the client left — the backend's
//! side is released in one place and the ending is recorded exactly once, through
//! [`crate::report`], in the same record, log line and history as a WebSocket's.
//!
//! An exchange is a *stream* once its response is a `text/event-stream`, or its body
//! is still open `http.stream_after` after its head: then it enters the live table
//! (`/connections`, the admin page, the drain, an operator's close) and is logged and
//! kept in the history when it ends. A short request that completes adds one counter
//! and nothing else: no allocation beyond forwarding's own, no lock.
//!
//! Outcomes: `completed`; `client_aborted` (hyper dropped the exchange: the client
//! closed, reset, or sent RST_STREAM); `client_unresponsive` and `client_stalled` (the
//! client connection says why it ended, or the stall watch cut the stream);
//! `backend_aborted` (the backend failed before or during the body: the client sees
//! a 502 or a truncation, never a clean end); `backend_unreachable`, `backend_timeout`;
//! `stream_idle_timeout`; `shutdown` (the drain ended an event stream at an event
//! boundary, or its deadline cut the rest); `admin_close`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap};
use hyper::{Method, Request, Response, Version};
use tokio::time::Sleep;

use crate::abort::Abort;
use crate::backend::Lease;
use crate::body::{Progress, RequestBody};
use crate::boxed::boxed;
use crate::client::Busy;
use crate::config::HttpLog;
use crate::error::ProxyError;
use crate::gate::{Gate, HttpTimers};
use crate::h1;
use crate::live::{LiveDetail, LiveHttp, Registration};
use crate::record::{Counters, Details, ExchangeInfo, Framing, HttpDetails, Outcome, Record};
use crate::report::{self, Written};
use crate::side::Side;
use crate::sse;

/// One HTTP exchange. Dropped before it ended, it records how: see [`Exchange::cause`].
pub struct Exchange {
    gate: Arc<Gate>,
    /// The client connection, kept busy until the exchange ends (an HTTP/2 connection
    /// is idle only when no exchange is open on it).
    busy: Busy,
    /// How the task the exchange runs in is ended from outside.
    abort: Arc<Abort>,
    id: u64,
    started: Instant,
    method: Method,
    /// The request's path, for the record: a copy, not the request's own bytes, which
    /// share the client connection's read buffer — shared, hyper cannot reuse that
    /// buffer and allocated a new one for every request.
    path: Arc<str>,
    head: Option<Head>,
    /// The backend connection, while the exchange uses it.
    lease: Option<Lease>,
    /// The request body's progress, if it has a body.
    request: Option<Arc<Progress>>,
    /// In the live table, once a stream (boxed: most exchanges never are, and the
    /// exchange is moved with every response).
    registration: Option<Box<Registration>>,
    /// Body bytes passed to the client.
    sent: u64,
    heartbeats: u64,
    ended: bool,
}

/// The response head as the client got it.
struct Head {
    status: u16,
    at: Instant,
    framing: Framing,
    event_stream: bool,
}

impl Exchange {
    /// A request has arrived on `busy`'s connection.
    pub fn begin<B>(gate: Arc<Gate>, busy: Busy, req: &Request<B>) -> Exchange {
        // An HTTP/1.1 exchange is ended with its connection; an HTTP/2 exchange takes
        // its stream task's abort when that task first polls it (see `send`).
        let abort = busy.abort.clone();
        Exchange {
            id: gate.next_id(),
            gate,
            busy,
            abort,
            started: Instant::now(),
            method: req.method().clone(),
            path: req.uri().path().into(),
            head: None,
            lease: None,
            request: None,
            registration: None,
            sent: 0,
            heartbeats: 0,
            ended: false,
        }
    }

    /// Counts the request body `body` as it goes to the backend.
    pub fn request_body(&mut self, body: Incoming) -> RequestBody {
        let (body, progress) = RequestBody::new(body, self.started);
        self.request = progress;
        body
    }

    /// A request body that came whole with its head.
    pub fn whole_request_body(&mut self, body: Bytes) -> RequestBody {
        let (body, progress) = RequestBody::whole(body, self.started);
        self.request = progress;
        body
    }

    /// Sends `req` to the backend and waits for the response head, at most until
    /// `deadline`: the response for a client speaking `client_version`, with a body
    /// that carries the exchange on (see [`Exchange::respond`]), or the error wsgate
    /// answers with, recorded. A request a reused connection turned out unable to take
    /// (the backend closed it meanwhile) goes once more, on a new connection.
    // One async block, and no async fn: an async fn keeps a second copy of its
    // arguments (the request, the exchange) in its future, and each level of nesting
    // more. This future is boxed per request: nested, it was 2 KiB, past the
    // allocator's fast sizes, and its parts were copied two dozen times.
    #[allow(clippy::manual_async_fn)]
    pub fn forward(
        mut self,
        mut outgoing: h1::Outgoing,
        deadline: Option<tokio::time::Instant>,
        client_version: Version,
    ) -> impl Future<Output = Result<Response<Option<ForwardedBody>>, ProxyError>> + Send + 'static
    {
        async move {
            // The first poll: on an HTTP/2 stream, inside its task's first poll, which
            // hands the task's abort over (hyper makes a stream's request future in the
            // connection's task, before it spawns the stream's).
            if let Some(abort) = Abort::take_current() {
                self.abort = abort;
            }
            // The task's watch wakes it by the deadline and marks the head overdue (see
            // `crate::abort::Watch`): each poll below checks a flag, not a clock, and the
            // exchange has no timer of its own.
            let due = deadline.is_some();
            self.abort
                .set_head_due(deadline.map(tokio::time::Instant::into_std));
            let worker = self.busy.worker;
            let answer = loop {
                let overdue = || due && self.abort.head_overdue();
                let pooled = std::future::poll_fn(|cx| {
                    Poll::Ready(self.gate.settings().backend.take(worker, cx))
                })
                .await;
                let lease = match pooled {
                    Some(lease) => lease,
                    None => {
                        let settings = self.gate.settings_full();
                        // Boxed: a connect's future is large, and most requests reuse a
                        // connection; inline (or boxed in place, see `crate::boxed`) it
                        // would make every request's future larger.
                        let mut fresh = boxed(|| settings.backend.fresh());
                        let fresh = std::future::poll_fn(|cx| match fresh.as_mut().poll(cx) {
                            Poll::Ready(lease) => Poll::Ready(lease),
                            Poll::Pending if overdue() => {
                                Poll::Ready(Err(ProxyError::BackendTimeout))
                            }
                            Poll::Pending => Poll::Pending,
                        })
                        .await;
                        match fresh {
                            Ok(lease) => lease,
                            Err(e) => break Err(e),
                        }
                    }
                };
                let abort = &self.abort;
                let lease = self.lease.insert(lease);
                lease.start(outgoing);
                let answer = std::future::poll_fn(|cx| {
                    // The connection writes the request and reads the answer as it is
                    // polled here, in the exchange's task.
                    match lease.poll_head(cx) {
                        Poll::Ready(answer) => Poll::Ready(Some(answer)),
                        Poll::Pending if due && abort.head_overdue() => Poll::Ready(None),
                        Poll::Pending => Poll::Pending,
                    }
                })
                .await;
                match answer {
                    None => break Err(ProxyError::BackendTimeout),
                    Some(Ok(resp)) => break Ok(resp),
                    Some(Err(failed)) => {
                        let reused = lease.is_reused();
                        self.lease = None;
                        match failed.unsent {
                            Some(unsent) if reused => outgoing = unsent,
                            _ => {
                                tracing::debug!(error = %failed.error, "backend request failed");
                                break Err(ProxyError::BackendFailed);
                            }
                        }
                    }
                }
            };
            self.abort.set_head_due(None);
            // Answered here, in the future, rather than by its caller: the exchange and
            // the answer are not copied out of it first.
            match answer {
                Ok(resp) => Ok(self.respond(resp, client_version)),
                Err(e) => {
                    self.refuse(e);
                    Err(e)
                }
            }
        }
    }

    /// The backend's response body has ended (or there is no connection to read it from).
    fn body_ended(&self) -> bool {
        self.lease.as_ref().is_none_or(Lease::is_end_stream)
    }

    /// wsgate answers the request itself because of `error` (the caller writes the
    /// answer): recorded with its outcome.
    fn refuse(mut self, error: ProxyError) {
        self.head = Some(Head {
            status: error.status().as_u16(),
            at: Instant::now(),
            framing: Framing::Length,
            event_stream: false,
        });
        self.note_head();
        let outcome = match error {
            ProxyError::BackendUnreachable => Outcome::BackendUnreachable,
            ProxyError::BackendTimeout => Outcome::BackendTimeout,
            _ => Outcome::BackendAborted,
        };
        self.finish(outcome);
    }

    /// The backend's response head arrived: the client gets it, with a body that carries
    /// the exchange on (`None`: there is no body, and the exchange is over).
    fn respond(
        mut self,
        resp: Response<()>,
        client_version: Version,
    ) -> Response<Option<ForwardedBody>> {
        // Without its hop-by-hop fields already: the backend's client reads and drops them.
        let (parts, ()) = resp.into_parts();
        let headers = &parts.headers;
        let event_stream = is_event_stream(headers);
        let framing = if client_version == Version::HTTP_2 {
            Framing::Http2
        } else if headers.contains_key(header::CONTENT_LENGTH) {
            Framing::Length
        } else if client_version < Version::HTTP_11 {
            Framing::Close
        } else {
            Framing::Chunked
        };
        self.head = Some(Head {
            status: parts.status.as_u16(),
            at: Instant::now(),
            framing,
            event_stream,
        });
        self.note_head();
        if self.body_ended() {
            // No body (HEAD, 204, 304, an empty one): done with the head.
            self.finish(Outcome::Completed);
            return Response::from_parts(parts, None);
        }
        // wsgate writes into an event stream only where it can find event boundaries:
        // not into a compressed one, nor one whose length is fixed.
        let scanner = (event_stream
            && !headers.contains_key(header::CONTENT_ENCODING)
            && !headers.contains_key(header::CONTENT_LENGTH))
        .then(sse::Scanner::new);
        let timers = self.gate.settings().http_timers;
        self.abort.set_limit(timers.write_timeout);
        if event_stream {
            self.register();
        }
        let now = Instant::now();
        let forwarded = ForwardedBody {
            ex: self,
            scanner,
            timers,
            draining: false,
            end_now: false,
            timer: None,
            last_sent: now,
            last_data: now,
            handed: false,
            request_published: 0,
        };
        Response::from_parts(parts, Some(forwarded))
    }

    /// Counts the response head.
    fn note_head(&self) {
        if let Some(head) = &self.head {
            self.gate.metrics.http_request(
                &self.method,
                hyper::StatusCode::from_u16(head.status).unwrap_or(hyper::StatusCode::BAD_GATEWAY),
                head.at - self.started,
            );
        }
    }

    /// Enters the live table: the exchange is a stream.
    fn register(&mut self) {
        if self.registration.is_some() {
            return;
        }
        let head = self.head.as_ref();
        let detail = LiveDetail::Http(LiveHttp::new(
            self.method.clone(),
            head.map_or(0, |h| h.status),
            head.is_some_and(|h| h.event_stream),
            self.abort.clone(),
        ));
        let registration = self.gate.live.register(self.info(), detail);
        registration.entry.update_counters(
            Side::Backend,
            Counters {
                frames: 0,
                bytes: self.sent,
            },
        );
        self.registration = Some(Box::new(registration));
    }

    fn info(&self) -> ExchangeInfo {
        ExchangeInfo {
            id: self.id,
            connection: self.busy.id,
            client: self.busy.peer,
            worker: self.busy.worker,
            path: self.path.clone(),
        }
    }

    /// How an exchange dropped before its end ended: what its task was asked, what its
    /// connection says, the drain deadline, or else the client left.
    fn cause(&self) -> Outcome {
        self.abort
            .cause()
            .or_else(|| self.busy.cause())
            .or_else(|| {
                self.gate
                    .tasks
                    .force
                    .is_cancelled()
                    .then_some(Outcome::Shutdown)
            })
            .unwrap_or(Outcome::ClientAborted)
    }

    /// Ends the exchange as `outcome`: releases the backend's connection (back to the
    /// pool after a completed response it can carry on from, closed otherwise) and
    /// records it. Once.
    fn finish(&mut self, outcome: Outcome) {
        if self.ended {
            return;
        }
        self.ended = true;
        // An HTTP/1.1 connection's abort serves its next exchange too.
        self.abort.handed_over(None);
        let settings = self.gate.settings();
        let stream = self.registration.is_some();
        let listed = stream || outcome != Outcome::Completed;
        let logged = match settings.config.log.http {
            HttpLog::Streams => listed,
            HttpLog::All => true,
            HttpLog::Off => false,
        };
        let release = |lease: Option<Lease>| {
            if let Some(lease) = lease {
                if outcome == Outcome::Completed {
                    settings.backend.put(self.busy.worker, lease);
                } else {
                    drop(lease);
                }
            }
        };
        if !listed && !logged {
            // A short request that completed: its connection back in the pool and one
            // counter, nothing else (not even the clock).
            release(self.lease.take());
            self.gate.metrics.http_completed();
            return;
        }
        let releasing = Instant::now();
        release(self.lease.take());
        let release = releasing.elapsed();
        drop(settings);
        let head = self.head.as_ref();
        let received = self.request.as_ref().map_or(0, |p| p.bytes());
        let record = Record {
            info: self
                .registration
                .as_ref()
                .map_or_else(|| self.info(), |r| r.entry.info.clone()),
            outcome,
            duration: self.started.elapsed(),
            release,
            client_to_backend: Counters {
                frames: 0,
                bytes: received,
            },
            backend_to_client: Counters {
                frames: 0,
                bytes: self.sent,
            },
            details: Details::Http(HttpDetails {
                method: self.method.clone(),
                status: head.map(|h| h.status),
                framing: head.map_or(Framing::None, |h| h.framing),
                event_stream: head.is_some_and(|h| h.event_stream),
                stream,
                time_to_head: head.map(|h| h.at - self.started),
                heartbeats: self.heartbeats,
            }),
        };
        if let Some(registration) = &self.registration {
            registration.entry.ending(outcome);
            registration
                .entry
                .update_counters(Side::Client, record.client_to_backend);
            registration
                .entry
                .update_counters(Side::Backend, record.backend_to_client);
        }
        report::exchange_ended(
            &self.gate.metrics,
            &self.gate.live,
            self.registration.take().map(|r| *r),
            &record,
            Written { listed, logged },
        );
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        if !self.ended {
            let cause = self.cause();
            self.finish(cause);
        }
    }
}

/// The response is a `text/event-stream`.
fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("text/event-stream"))
}

/// Why wsgate cut a response short; hyper then ends it as a truncation toward the
/// client (no final chunk and the connection closed, or RST_STREAM), never as a clean
/// end.
#[derive(Debug, thiserror::Error)]
#[error("response cut short: {0}")]
pub struct Cut(&'static str);

/// The backend's response body on its way to the client, carrying its exchange: it
/// drives the backend connection, counts, registers the exchange as a stream when it
/// becomes one, writes heartbeats into quiet event streams, ends an event stream at an
/// event boundary when the drain asks, and ends the exchange with the body.
pub struct ForwardedBody {
    /// The exchange, with the backend connection the body is read from.
    ex: Exchange,
    /// An event stream's boundaries, where wsgate may write into it.
    scanner: Option<sse::Scanner>,
    /// The body's timers as of the head, or of the last reload.
    timers: HttpTimers,
    /// The drain asked this event stream to end at its next boundary.
    draining: bool,
    /// The part just handed over ended at the boundary the drain waited for.
    end_now: bool,
    /// The next deadline of the body's timers, made once the body first had to wait.
    timer: Option<Pin<Box<Sleep>>>,
    /// When body bytes last went to the client (heartbeats included).
    last_sent: Instant,
    /// When body bytes last passed either way.
    last_data: Instant,
    /// A part was handed over and the stall watch waits for hyper to ask again.
    handed: bool,
    /// The request body bytes the live entry shows.
    request_published: u64,
}

impl ForwardedBody {
    /// Ends the exchange cleanly (the final chunk, END_STREAM).
    fn end(&mut self, outcome: Outcome) -> Poll<Option<Result<Frame<Bytes>, Cut>>> {
        self.ex.finish(outcome);
        Poll::Ready(None)
    }

    /// Cuts the response short.
    fn cut(
        &mut self,
        outcome: Outcome,
        why: &'static str,
    ) -> Poll<Option<Result<Frame<Bytes>, Cut>>> {
        self.ex.finish(outcome);
        Poll::Ready(Some(Err(Cut(why))))
    }

    /// A part of the backend's body goes to the client.
    fn hand_over(&mut self, data: Bytes, now: Instant) -> Poll<Option<Result<Frame<Bytes>, Cut>>> {
        self.ex.sent += data.len() as u64;
        self.last_data = now;
        if self.ex.registration.is_none() && now >= self.stream_at() {
            self.ex.register();
        }
        if let Some(r) = &self.ex.registration {
            let sent = Counters {
                frames: 0,
                bytes: self.ex.sent,
            };
            r.entry.update_counters(Side::Backend, sent);
            r.entry.received(Side::Backend, now, true);
        }
        self.give(data, now)
    }

    /// Hands hyper `data` for the client; the stall watch waits for hyper to ask again.
    fn give(&mut self, data: Bytes, now: Instant) -> Poll<Option<Result<Frame<Bytes>, Cut>>> {
        self.last_sent = now;
        self.ex.abort.handed_over(Some(now));
        self.handed = true;
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    /// When a body still open makes the exchange a stream.
    fn stream_at(&self) -> Instant {
        let head = self.ex.head.as_ref().map_or(self.ex.started, |h| h.at);
        head + self.timers.stream_after
    }

    /// hyper asks for more: what was handed over is taken; and what the drain or a
    /// reload asked of this stream.
    fn take_requests(&mut self, cx: &mut Context<'_>) {
        if self.handed {
            self.ex.abort.handed_over(None);
            self.handed = false;
        }
        let Some(r) = &self.ex.registration else {
            return;
        };
        // The request body's progress (an upload streaming beside the response).
        if let Some(progress) = &self.ex.request {
            let bytes = progress.bytes();
            if bytes != self.request_published {
                self.request_published = bytes;
                r.entry
                    .update_counters(Side::Client, Counters { frames: 0, bytes });
                if let Some(at) = progress.last() {
                    r.entry.received(Side::Client, at, true);
                }
            }
        }
        if let Poll::Ready(requests) = r.entry.poll_requests(cx) {
            if requests.reconfigure() {
                self.timers = self.ex.gate.settings().http_timers;
                self.ex.abort.set_limit(self.timers.write_timeout);
                // A deadline may have moved later: start the timer afresh.
                self.timer = None;
            }
            if requests.shutdown() && self.scanner.is_some() {
                // Listed as closing from now on: it ends at its next event boundary.
                self.draining = true;
                r.entry.ending(Outcome::Shutdown);
            }
            // An operator's close and the drain deadline end the task itself.
        }
    }

    /// The body waits for the backend: the timers' turn. Ready with what a timer
    /// decided, or pending until the next deadline.
    fn waiting(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Cut>>> {
        let timers = self.timers;
        let heartbeat = timers.sse_heartbeat.is_some() && self.scanner.is_some();
        if self.ex.registration.is_some() && timers.stream_idle_timeout.is_none() && !heartbeat {
            // No deadline to watch (the common stream): no clock to read either.
            return Poll::Pending;
        }
        loop {
            let now = Instant::now();
            let mut next: Option<Instant> = None;
            let mut soonest = |at: Instant| next = Some(next.map_or(at, |n| n.min(at)));
            if self.ex.registration.is_none() {
                let at = self.stream_at();
                if now >= at {
                    self.ex.register();
                } else {
                    soonest(at);
                }
            }
            if let Some(idle) = timers.stream_idle_timeout {
                let last_request = self.ex.request.as_ref().and_then(|p| p.last());
                let last = last_request.map_or(self.last_data, |r| r.max(self.last_data));
                if now >= last + idle {
                    return self.cut(
                        Outcome::StreamIdleTimeout,
                        "no body bytes for http.stream_idle_timeout",
                    );
                }
                soonest(last + idle);
            }
            if let (Some(beat), Some(scanner)) = (timers.sse_heartbeat, &mut self.scanner)
                && !self.draining
            {
                let at = self.last_sent + beat;
                if now >= at && scanner.at_boundary() {
                    // wsgate's own bytes: counted as heartbeats, not as the backend's.
                    scanner.feed(sse::HEARTBEAT);
                    self.ex.heartbeats += 1;
                    self.ex.gate.metrics.sse_heartbeats.increment(1);
                    return self.give(Bytes::from_static(sse::HEARTBEAT), now);
                }
                if now < at {
                    soonest(at);
                }
            }
            let Some(next) = next else {
                return Poll::Pending;
            };
            let deadline = tokio::time::Instant::from_std(next);
            let timer = self
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            if timer.deadline() != deadline {
                timer.as_mut().reset(deadline);
            }
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            // A deadline passed: decide again with the time of now.
        }
    }
}

impl hyper::body::Body for ForwardedBody {
    type Data = Bytes;
    type Error = Cut;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Cut>>> {
        let this = self.get_mut();
        if this.ex.ended {
            return Poll::Ready(None);
        }
        this.take_requests(cx);
        if this.end_now || (this.draining && this.scanner.is_some_and(|s| s.at_boundary())) {
            return this.end(Outcome::Shutdown);
        }
        let polled = match &mut this.ex.lease {
            Some(lease) => lease.poll_frame(cx),
            None => Poll::Ready(None),
        };
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                let mut data = match frame.into_data() {
                    Ok(data) => data,
                    // Trailers pass as they are.
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                };
                if let Some(scanner) = &mut this.scanner {
                    let boundary = scanner.feed(&data);
                    if this.draining
                        && let Some(at) = boundary
                    {
                        // The rest belongs to the next event, which the client will
                        // not get: the stream ends here.
                        data.truncate(at);
                        this.end_now = true;
                    }
                }
                let polled = this.hand_over(data, Instant::now());
                if this.ex.body_ended() && !this.end_now {
                    // hyper will not ask again: the body is whole.
                    this.ex.finish(Outcome::Completed);
                }
                polled
            }
            Poll::Ready(Some(Err(e))) => {
                tracing::debug!(error = %e, "the backend's response body failed");
                this.cut(
                    Outcome::BackendAborted,
                    "the backend's response ended early",
                )
            }
            Poll::Ready(None) => this.end(Outcome::Completed),
            Poll::Pending => this.waiting(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ex.ended || (self.ex.body_ended() && !self.end_now)
    }

    fn size_hint(&self) -> SizeHint {
        if self.scanner.is_some() {
            // Heartbeats, or an end at a boundary, change the length.
            return SizeHint::default();
        }
        self.ex
            .lease
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Lease::size_hint)
    }
}

/// How long a request may wait for its backend connection and response head.
pub fn deadline(limit: Option<Duration>) -> Option<tokio::time::Instant> {
    limit.map(|l| tokio::time::Instant::now() + l)
}
