//! The end, from outside, of the task an HTTP exchange runs in — the task of its
//! HTTP/1.1 connection, or of its HTTP/2 stream — and the task's deadlines: whether its
//! client keeps taking the response, and when the backend's response head is due.
//!
//! hyper polls a response body only when it can send what the body gives, so a body
//! cannot notice by itself that its client stopped reading, nor end itself while it is
//! not polled. The task's own future (in `crate::server`) polls its [`Abort`] and a
//! [`Watch`] beside hyper's future and, once asked, drops what it serves: the HTTP/1.1
//! connection closes, the HTTP/2 stream is reset (RST_STREAM CANCEL). The exchange
//! reads [`Abort::cause`] when it is dropped.
//!
//! The deadlines are watched lazily, with one timer per task that is moved only when a
//! deadline comes earlier than the one it is set to: a keep-alive connection's
//! requests each have a response deadline a minute ahead, and resetting a timer for
//! each cost more than the rest of the exchange's bookkeeping; instead the timer fires
//! at the first deadline, finds the current one later, and is set once more.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use atomic_waker::AtomicWaker;
use tokio::time::Sleep;

use crate::record::Outcome;

/// "Not set" in the atomics below.
const NONE: u64 = u64::MAX;

/// One task's end from outside, and what its exchange's body says of its client.
#[derive(Debug)]
pub struct Abort {
    /// `Outcome::idx() + 1` of the first request; 0 while none.
    cause: AtomicU8,
    waker: AtomicWaker,
    /// Where the microseconds below count from.
    created: Instant,
    /// When the body handed hyper a part that hyper has not asked past since; `NONE`
    /// while hyper keeps asking. hyper asks again as soon as it has passed a part on,
    /// so this only ages while the client takes nothing.
    handed_over_us: AtomicU64,
    /// How long a handed-over part may wait (`http.write_timeout`), in microseconds;
    /// `NONE`: no limit.
    limit_us: AtomicU64,
    /// When the backend's response head is due (`http.response_timeout`), in
    /// microseconds after `created`; `NONE`: none is awaited.
    head_due_us: AtomicU64,
    /// The task's watch found the head overdue: the exchange checks this flag, not the
    /// clock, each time it is polled.
    head_overdue: AtomicBool,
}

impl Default for Abort {
    fn default() -> Self {
        Abort {
            cause: AtomicU8::new(0),
            waker: AtomicWaker::new(),
            created: Instant::now(),
            handed_over_us: AtomicU64::new(NONE),
            limit_us: AtomicU64::new(NONE),
            head_due_us: AtomicU64::new(NONE),
            head_overdue: AtomicBool::new(false),
        }
    }
}

impl Abort {
    /// Asks the task to stop, because of `outcome`; the first request wins.
    pub fn request(&self, outcome: Outcome) {
        let code = outcome.idx() as u8 + 1;
        let _ = self
            .cause
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire);
        self.waker.wake();
    }

    /// Why the task was asked to stop, if it was.
    pub fn cause(&self) -> Option<Outcome> {
        match self.cause.load(Ordering::Acquire) {
            0 => None,
            code => Outcome::ALL.get(usize::from(code) - 1).copied(),
        }
    }

    /// Ready with the cause once the task is asked to stop.
    pub fn poll(&self, cx: &mut Context<'_>) -> Poll<Outcome> {
        if let Some(cause) = self.cause() {
            return Poll::Ready(cause);
        }
        self.waker.register(cx.waker());
        self.cause().map_or(Poll::Pending, Poll::Ready)
    }

    /// The body handed hyper a part at `at` (`Some`), or hyper asked for the next one
    /// (`None`).
    pub fn handed_over(&self, at: Option<Instant>) {
        self.handed_over_us
            .store(self.micros(at), Ordering::Relaxed);
    }

    /// Since when a part handed over has waited for the client, if one does.
    pub fn waiting_since(&self) -> Option<Instant> {
        self.instant(self.handed_over_us.load(Ordering::Relaxed))
    }

    /// How long a handed-over part may wait before the exchange ends as
    /// `client_stalled`; `None`: as long as it takes.
    pub fn set_limit(&self, limit: Option<Duration>) {
        let us = limit.map_or(NONE, |l| (l.as_micros() as u64).min(NONE - 1));
        self.limit_us.store(us, Ordering::Relaxed);
    }

    fn limit(&self) -> Option<Duration> {
        match self.limit_us.load(Ordering::Relaxed) {
            NONE => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// The response head is due at `at` (`Some`), or no longer awaited (`None`): the
    /// task is woken by then, and the exchange, polled, answers 504 itself.
    pub fn set_head_due(&self, at: Option<Instant>) {
        self.head_overdue.store(false, Ordering::Release);
        self.head_due_us.store(self.micros(at), Ordering::Relaxed);
    }

    /// The response head is overdue (the task's watch found so).
    pub fn head_overdue(&self) -> bool {
        self.head_overdue.load(Ordering::Acquire)
    }

    fn micros(&self, at: Option<Instant>) -> u64 {
        at.map_or(NONE, |at| {
            (at.saturating_duration_since(self.created).as_micros() as u64).min(NONE - 1)
        })
    }

    fn instant(&self, us: u64) -> Option<Instant> {
        (us != NONE).then(|| self.created + Duration::from_micros(us))
    }

    /// When a part handed over will have waited too long, if one waits.
    fn stall_due(&self) -> Option<Instant> {
        Some(self.waiting_since()? + self.limit()?)
    }

    /// When the response head is due, if one is awaited.
    fn head_due(&self) -> Option<Instant> {
        self.instant(self.head_due_us.load(Ordering::Relaxed))
    }

    /// Runs `f` (the first poll of an HTTP/2 stream's task) with `abort` as the one the
    /// exchange it starts takes ([`Abort::take_current`]). hyper makes a stream's
    /// request future before it hands the task to the executor, so the task's abort
    /// reaches the exchange this way.
    pub fn enter<R>(abort: &Arc<Abort>, f: impl FnOnce() -> R) -> R {
        CURRENT.with(|c| *c.borrow_mut() = Some(abort.clone()));
        let r = f();
        CURRENT.with(|c| c.borrow_mut().take());
        r
    }

    /// The abort of the HTTP/2 stream task being polled for the first time, if that is
    /// what runs now; taken once.
    pub fn take_current() -> Option<Arc<Abort>> {
        CURRENT.with(|c| c.borrow_mut().take())
    }
}

thread_local! {
    /// See [`Abort::enter`].
    static CURRENT: std::cell::RefCell<Option<Arc<Abort>>> = const { std::cell::RefCell::new(None) };
}

/// The one timer a task keeps for its deadlines ([`Abort`]'s, and its own): set to the
/// earliest, moved only when a deadline comes earlier than the one it is set to, and
/// made only once a deadline exists.
#[derive(Debug, Default)]
pub struct Watch {
    timer: Option<Pin<Box<Sleep>>>,
    /// Where the timer is set, while it has not fired.
    armed: Option<Instant>,
}

impl Watch {
    /// Checks `abort`'s deadlines and `other` (the task's own: an idle connection's)
    /// after the task's future was polled, and registers `cx` for the earliest. A
    /// part the client did not take in time asks the task to stop
    /// (`client_stalled`); a response head overdue is marked and wakes the task, whose
    /// exchange then answers 504. Returns true when `other` has passed.
    ///
    /// Most calls cost a few atomic loads: while the timer is set no later than the
    /// earliest deadline and has not fired, the clock is not even read.
    pub fn check(&mut self, abort: &Abort, other: Option<Instant>, cx: &mut Context<'_>) -> bool {
        let stall = abort.stall_due();
        let head = abort.head_due();
        let Some(need) = [stall, head, other].into_iter().flatten().min() else {
            return false;
        };
        if let (Some(armed), Some(timer)) = (self.armed, &self.timer)
            && armed <= need
            && !timer.is_elapsed()
        {
            return false;
        }
        // tokio's clock: the same as the system's, except in tests with paused time.
        let now = tokio::time::Instant::now().into_std();
        if now < need {
            self.arm(need, cx);
            return false;
        }
        self.armed = None;
        if stall.is_some_and(|at| now >= at) {
            abort.request(Outcome::ClientStalled);
        }
        if head.is_some_and(|at| now >= at) {
            abort.head_overdue.store(true, Ordering::Release);
        }
        if abort.head_overdue() || abort.cause().is_some() {
            // The task's future runs again at once: the exchange answers, or ends.
            cx.waker().wake_by_ref();
        }
        other.is_some_and(|at| now >= at)
    }

    /// Sets the timer to `need` and registers `cx` with it (the task's waker stays the
    /// same, so one poll after each reset is enough).
    fn arm(&mut self, need: Instant, cx: &mut Context<'_>) {
        let deadline = tokio::time::Instant::from_std(need);
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        timer.as_mut().reset(deadline);
        self.armed = Some(need);
        if timer.as_mut().poll(cx).is_ready() {
            // Already due (the clock moved between the check and now): look again.
            cx.waker().wake_by_ref();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_request_wins_and_is_kept() {
        let abort = Abort::default();
        assert_eq!(abort.cause(), None);
        abort.request(Outcome::AdminClose);
        abort.request(Outcome::Shutdown);
        assert_eq!(abort.cause(), Some(Outcome::AdminClose));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert_eq!(abort.poll(&mut cx), Poll::Ready(Outcome::AdminClose));
    }

    #[test]
    fn a_tasks_abort_reaches_the_exchange_its_first_poll_starts() {
        let abort = Arc::new(Abort::default());
        assert!(Abort::take_current().is_none());
        let taken = Abort::enter(&abort, Abort::take_current);
        assert!(taken.is_some_and(|t| Arc::ptr_eq(&t, &abort)));
        // Taken once, and gone after the poll.
        assert!(
            Abort::enter(&abort, || {
                Abort::take_current();
                Abort::take_current()
            })
            .is_none()
        );
        assert!(Abort::take_current().is_none());
    }

    /// One check of the watch, as the task does after each poll.
    async fn check(watch: &mut Watch, abort: &Abort) {
        std::future::poll_fn(|cx| {
            watch.check(abort, None, cx);
            Poll::Ready(())
        })
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn a_part_the_client_does_not_take_within_the_limit_ends_the_task() {
        let abort = Abort::default();
        abort.set_limit(Some(Duration::from_secs(30)));
        let mut watch = Watch::default();
        // Nothing waits: no timer.
        check(&mut watch, &abort).await;
        assert!(watch.timer.is_none());
        let now = || tokio::time::Instant::now().into_std();
        abort.handed_over(Some(now()));
        check(&mut watch, &abort).await;
        tokio::time::advance(Duration::from_secs(29)).await;
        check(&mut watch, &abort).await;
        assert_eq!(abort.cause(), None);
        // Taken: the watch starts over with the next part.
        abort.handed_over(None);
        tokio::time::advance(Duration::from_secs(10)).await;
        check(&mut watch, &abort).await;
        assert_eq!(abort.cause(), None);
        abort.handed_over(Some(now()));
        check(&mut watch, &abort).await;
        assert_eq!(abort.cause(), None);
        tokio::time::advance(Duration::from_secs(30)).await;
        check(&mut watch, &abort).await;
        assert_eq!(abort.cause(), Some(Outcome::ClientStalled));
    }

    #[tokio::test(start_paused = true)]
    async fn the_timer_is_moved_only_for_an_earlier_deadline() {
        let abort = Abort::default();
        let mut watch = Watch::default();
        let now = || tokio::time::Instant::now().into_std();
        let t0 = now();
        abort.set_head_due(Some(t0 + Duration::from_secs(60)));
        check(&mut watch, &abort).await;
        let first = abort.head_due();
        assert_eq!(watch.armed, first);
        // Later requests have later deadlines: the timer stays where it is.
        tokio::time::advance(Duration::from_secs(1)).await;
        abort.set_head_due(Some(now() + Duration::from_secs(60)));
        check(&mut watch, &abort).await;
        assert_eq!(watch.armed, first);
        // An earlier one moves it.
        abort.set_head_due(Some(now() + Duration::from_secs(5)));
        check(&mut watch, &abort).await;
        assert_eq!(watch.armed, abort.head_due());
        assert!(watch.armed < first);
        // Past the deadline the check wakes the task (the exchange answers 504); the
        // task is not asked to stop.
        tokio::time::advance(Duration::from_secs(6)).await;
        let woken = std::future::poll_fn(|cx| {
            let waker = std::sync::Arc::new(Flag::default());
            let waker_ref = std::task::Waker::from(waker.clone());
            let mut cx2 = Context::from_waker(&waker_ref);
            watch.check(&abort, None, &mut cx2);
            let _ = cx;
            Poll::Ready(waker.0.load(Ordering::SeqCst))
        })
        .await;
        assert!(woken);
        assert_eq!(abort.cause(), None);
    }

    #[derive(Default)]
    struct Flag(std::sync::atomic::AtomicBool);

    impl std::task::Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}
