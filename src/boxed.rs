//! Futures built straight into their box.
//!
//! An async fn's future holds every value that may still need its storage at one of
//! its `.await`s. rustc counts a temporary moved away before an `.await` among them:
//! `Box::pin(serve(..)).await` makes the caller's future as large as `serve`'s own,
//! box or not, and so does a future built into a local first. Built inside a plain
//! function instead, the callee's future lives on that function's stack until it moves
//! into the box, and the caller keeps only the box's pointer.
//!
//! It matters where a future is created for every connection or request: a task's
//! future is copied whole into a fresh allocation when it is spawned or boxed, so its
//! size is paid in bytes copied and in cache lines written each time (a client's task
//! was 6 KiB this way, 1.8 KiB built with [`boxed`]).

use std::future::Future;
use std::pin::Pin;

/// `Box::pin(make())`, with the future built here rather than in the caller's state.
pub fn boxed<F: Future>(make: impl FnOnce() -> F) -> Pin<Box<F>> {
    Box::pin(make())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A future with a large state: the buffer lives across its `.await`.
    async fn large() -> u8 {
        let buf = [1u8; 4096];
        tokio::task::yield_now().await;
        buf[4095]
    }

    /// Awaits [`large`] boxed: its state is the box's pointer and little else.
    async fn boxed_caller() -> u8 {
        boxed(large).await
    }

    #[test]
    fn a_future_built_by_boxed_stays_out_of_its_callers_state() {
        let large_size = std::mem::size_of_val(&large());
        let caller_size = std::mem::size_of_val(&boxed_caller());
        assert!(large_size >= 4096, "{large_size}");
        assert!(
            caller_size < 64,
            "the caller's future is {caller_size} bytes"
        );
    }

    #[tokio::test]
    async fn the_boxed_future_runs_to_its_end() {
        let out = tokio::time::timeout(std::time::Duration::from_secs(5), boxed_caller()).await;
        assert_eq!(out.ok(), Some(1));
    }
}
