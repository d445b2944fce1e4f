//! The wake-ups of the backend side of an HTTP exchange, kept apart from the task's.
//!
//! An exchange drives its backend connection in its own task (see [`crate::backend`]):
//! hyper's connection future and the response (its head, then its body) are polled
//! one after the other in the same poll. Given the task's own waker, they wake the
//! task for what that same poll is about to see: the connection hands the response
//! a body part and wakes the response's reader; the reader takes it and wakes the
//! connection. The task then runs once more for nothing — under a thousand event
//! streams that was half of the task polls, and the body was polled again and again
//! in each (a connection polled for the first time hands over the bytes it read with
//! the head only once the body has asked).
//!
//! [`Wakeups`] gives the backend side a waker of its own. A wake-up marks the side
//! woken; it reaches the task only when it comes from outside a poll of that side (the
//! socket became readable, the client sent more of the request body). A poll of the
//! side runs only when it was woken since the last, and runs again, a few times at
//! most, while its own polls woke it: what a part handed over made possible is done in
//! the same poll, and a quiet side costs nothing to ask.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use atomic_waker::AtomicWaker;

/// Rounds of one poll at most; beyond them the task is woken and runs again (tokio's
/// cooperative budget, once spent, wakes at once whatever is polled: the rounds must
/// end).
const ROUNDS: usize = 4;

/// One backend side's waker and what it has seen.
pub struct Wakeups {
    shared: Arc<Shared>,
    /// `shared` as a waker, made once.
    waker: Waker,
}

struct Shared {
    /// The task to wake, while one polls the side.
    task: AtomicWaker,
    /// Woken since the last round began.
    woken: AtomicBool,
    /// A round is under way: a wake-up now is for the task already running.
    polling: AtomicBool,
}

impl Wake for Shared {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // SeqCst with the poller's `polling` store and `woken` swap: either the poller
        // sees `woken` after its round, or this sees `polling` false and wakes the task.
        self.woken.store(true, Ordering::SeqCst);
        if !self.polling.load(Ordering::SeqCst) {
            self.task.wake();
        }
    }
}

impl Default for Wakeups {
    fn default() -> Self {
        let shared = Arc::new(Shared {
            task: AtomicWaker::new(),
            // The first poll always runs.
            woken: AtomicBool::new(true),
            polling: AtomicBool::new(false),
        });
        Wakeups {
            waker: Waker::from(shared.clone()),
            shared,
        }
    }
}

impl Wakeups {
    /// Polls the side with `round` for the task of `cx`, if something woke it since
    /// the last round: again while the rounds themselves wake it, at most [`ROUNDS`]
    /// times (then the task is woken to come back). Pending at once when nothing did.
    pub fn poll<R>(
        &self,
        cx: &mut Context<'_>,
        mut round: impl FnMut(&mut Context<'_>) -> Poll<R>,
    ) -> Poll<R> {
        let s = &*self.shared;
        s.task.register(cx.waker());
        let mut own = Context::from_waker(&self.waker);
        for _ in 0..ROUNDS {
            if !s.woken.swap(false, Ordering::SeqCst) {
                return Poll::Pending;
            }
            s.polling.store(true, Ordering::SeqCst);
            let polled = round(&mut own);
            s.polling.store(false, Ordering::SeqCst);
            if polled.is_ready() {
                return polled;
            }
        }
        if s.woken.load(Ordering::SeqCst) {
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }

    /// Runs `f`, which is about to be followed by a poll of the side (a request handed
    /// to the connection): what it wakes is left to that poll, not sent to the task.
    pub fn quietly<R>(&self, f: impl FnOnce() -> R) -> R {
        let s = &*self.shared;
        s.polling.store(true, Ordering::SeqCst);
        let r = f();
        s.polling.store(false, Ordering::SeqCst);
        r
    }

    /// The next [`Wakeups::poll`] runs whatever woke or did not: the side changes
    /// hands (a new task), or a reader that has never asked joins it.
    pub fn rouse(&self) {
        self.shared.woken.store(true, Ordering::SeqCst);
    }

    /// No task polls the side any more (its connection waits in the pool): wake-ups
    /// are only marked until one takes it.
    pub fn forget_task(&self) {
        drop(self.shared.task.take());
    }

    /// The side's own waker, for a poll outside [`Wakeups::poll`] (the pool's sweep).
    pub fn waker(&self) -> &Waker {
        &self.waker
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// A task's waker that counts its wake-ups.
    #[derive(Default)]
    struct Task(AtomicUsize);

    impl Wake for Task {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl Task {
        fn new() -> (Arc<Task>, Waker) {
            let task = Arc::new(Task::default());
            (task.clone(), Waker::from(task))
        }

        fn woken(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }
    }

    /// Polls the side for the task of `waker` with rounds that find nothing; how many ran.
    fn quiet_poll(w: &Wakeups, waker: &Waker) -> usize {
        let mut rounds = 0;
        let polled: Poll<()> = w.poll(&mut Context::from_waker(waker), |_| {
            rounds += 1;
            Poll::Pending
        });
        assert!(polled.is_pending());
        rounds
    }

    #[test]
    fn a_quiet_side_is_not_polled_and_a_wake_from_outside_reaches_the_task() {
        let w = Wakeups::default();
        let (task, waker) = Task::new();
        // The first poll runs; nothing woke the side since, so the next does not.
        assert_eq!(quiet_poll(&w, &waker), 1);
        assert_eq!(quiet_poll(&w, &waker), 0);
        // The socket becomes readable: the task is woken, and the side polled again.
        w.waker().wake_by_ref();
        assert_eq!(task.woken(), 1);
        assert_eq!(quiet_poll(&w, &waker), 1);
    }

    #[test]
    fn a_wake_from_within_a_round_runs_another_round_not_the_task() {
        let w = Wakeups::default();
        let (task, waker) = Task::new();
        let mut rounds = 0;
        // Round 1 wakes the side (a body part handed over); round 2 takes it.
        let polled = w.poll(&mut Context::from_waker(&waker), |own| {
            rounds += 1;
            if rounds == 1 {
                own.waker().wake_by_ref();
                Poll::Pending
            } else {
                Poll::Ready("part")
            }
        });
        assert_eq!(polled, Poll::Ready("part"));
        assert_eq!(rounds, 2);
        assert_eq!(task.woken(), 0, "the task was not woken");
    }

    #[test]
    fn a_side_that_keeps_waking_itself_hands_back_to_the_task() {
        let w = Wakeups::default();
        let (task, waker) = Task::new();
        let mut rounds = 0;
        // As tokio's spent budget does: every poll wakes at once.
        let polled: Poll<()> = w.poll(&mut Context::from_waker(&waker), |own| {
            rounds += 1;
            own.waker().wake_by_ref();
            Poll::Pending
        });
        assert!(polled.is_pending());
        assert_eq!(rounds, ROUNDS);
        assert_eq!(task.woken(), 1, "the task runs again");
        // And when it does, the side is polled.
        assert_eq!(quiet_poll(&w, &waker), 1);
    }

    #[test]
    fn what_a_request_handed_over_wakes_is_left_to_the_next_poll() {
        let w = Wakeups::default();
        let (task, waker) = Task::new();
        quiet_poll(&w, &waker);
        w.quietly(|| w.waker().wake_by_ref());
        assert_eq!(task.woken(), 0, "the task was not woken");
        assert_eq!(quiet_poll(&w, &waker), 1, "but the side is polled");
    }

    #[test]
    fn a_side_in_the_pool_wakes_no_task_and_is_polled_when_taken() {
        let w = Wakeups::default();
        let (task, waker) = Task::new();
        quiet_poll(&w, &waker);
        w.forget_task();
        w.waker().wake_by_ref();
        assert_eq!(task.woken(), 0);
        // Another task takes it: the mark is still there.
        let (_, other) = Task::new();
        assert_eq!(quiet_poll(&w, &other), 1);
        // rouse: the next poll runs though nothing woke it.
        w.rouse();
        assert_eq!(quiet_poll(&w, &other), 1);
    }
}
