//! A request body on its way to the backend, counted: how many bytes the client sent and
//! when it last sent some, for the exchange's record and its idle timer. The backend's
//! connection reads the body in the exchange's task, so the count is shared through one
//! [`Progress`], made only for requests that have a body at all.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

/// How far a request body has come.
#[derive(Debug)]
pub struct Progress {
    /// When the exchange started; `last_us` counts from it.
    started: Instant,
    bytes: AtomicU64,
    /// Microseconds after `started` when body bytes last came; 0 before any.
    last_us: AtomicU64,
}

impl Progress {
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// When body bytes last came, if any did.
    pub fn last(&self) -> Option<Instant> {
        match self.last_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(self.started + std::time::Duration::from_micros(us)),
        }
    }
}

/// The client's request body as the backend's connection reads it.
#[derive(Debug)]
pub struct RequestBody {
    /// `None`: no body at all.
    inner: Option<Inner>,
    /// `None` for a request without a body: nothing to count.
    progress: Option<Arc<Progress>>,
}

/// Where a request body comes from.
#[derive(Debug)]
enum Inner {
    /// hyper's server reads it.
    Incoming(Incoming),
    /// It came whole with its head (see [`crate::h1_server`]); taken when sent.
    Whole(Option<Bytes>),
}

impl RequestBody {
    /// Counts `inner` (unless it is empty) from `started`; the progress is shared with
    /// the caller.
    pub fn new(inner: Incoming, started: Instant) -> (RequestBody, Option<Arc<Progress>>) {
        let progress = (!inner.is_end_stream()).then(|| {
            Arc::new(Progress {
                started,
                bytes: AtomicU64::new(0),
                last_us: AtomicU64::new(0),
            })
        });
        let shared = progress.clone();
        let inner = Some(Inner::Incoming(inner));
        (RequestBody { inner, progress }, shared)
    }

    /// A body that came whole, at `started` (with its head).
    pub fn whole(body: Bytes, started: Instant) -> (RequestBody, Option<Arc<Progress>>) {
        let progress = Arc::new(Progress {
            started,
            bytes: AtomicU64::new(body.len() as u64),
            last_us: AtomicU64::new(1),
        });
        let body = RequestBody {
            inner: Some(Inner::Whole(Some(body))),
            progress: Some(progress.clone()),
        };
        (body, Some(progress))
    }

    /// No body.
    pub fn empty() -> RequestBody {
        RequestBody {
            inner: None,
            progress: None,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let inner = match &mut this.inner {
            None => return Poll::Ready(None),
            Some(Inner::Whole(body)) => {
                return Poll::Ready(body.take().map(|b| Ok(Frame::data(b))));
            }
            Some(Inner::Incoming(inner)) => inner,
        };
        let polled = Pin::new(inner).poll_frame(cx);
        if let (Poll::Ready(Some(Ok(frame))), Some(p)) = (&polled, &this.progress)
            && let Some(data) = frame.data_ref()
            && !data.is_empty()
        {
            p.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
            let us = (p.started.elapsed().as_micros() as u64).max(1);
            p.last_us.store(us, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            None | Some(Inner::Whole(None)) => true,
            Some(Inner::Whole(Some(_))) => false,
            Some(Inner::Incoming(inner)) => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            None | Some(Inner::Whole(None)) => SizeHint::with_exact(0),
            Some(Inner::Whole(Some(body))) => SizeHint::with_exact(body.len() as u64),
            Some(Inner::Incoming(inner)) => inner.size_hint(),
        }
    }
}
