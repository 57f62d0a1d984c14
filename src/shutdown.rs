//! The one shutdown signal of a shard, held by every task that must stop
//! or change course when the shard drains (after mini-redis's `Shutdown`):
//! accept loops end, the heartbeat and key reload stop, long-polls answer
//! at once, SSE streams end, new handshakes and handoffs are refused.
//!
//! The main thread triggers it through each shard's inbox (on SIGTERM or
//! SIGINT, or when a shard died); the shard's own drain then closes every
//! connection with 1001 and waits, bounded, for them (`shard::drain`).

use std::cell::Cell;
use std::future::Future;
use std::rc::Rc;

use crate::notify::Notify;

/// A cheap handle on one shard's shutdown signal; clones share it.
#[derive(Clone, Debug, Default)]
pub struct Shutdown(Rc<Signal>);

#[derive(Debug, Default)]
struct Signal {
    /// Set once, never cleared.
    stopping: Cell<bool>,
    /// Wakes the tasks waiting in [`Shutdown::wait`].
    notify: Notify,
}

impl Shutdown {
    /// A signal not triggered yet.
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// Starts the shutdown: every holder sees it (idempotent).
    pub fn trigger(&self) {
        if !self.0.stopping.replace(true) {
            self.0.notify.notify();
        }
    }

    /// True once the shutdown started.
    pub fn is_stopping(&self) -> bool {
        self.0.stopping.get()
    }

    /// Resolves once the shutdown started (at once if it has).
    pub async fn wait(&self) {
        loop {
            let seen = self.0.notify.generation();
            if self.is_stopping() {
                return;
            }
            self.0.notify.wait(seen).await;
        }
    }

    /// Runs `task` until it ends or the shutdown starts, whichever comes
    /// first; `None` when the shutdown cut it short.
    pub async fn run_until<F: Future>(&self, task: F) -> Option<F::Output> {
        futures_lite::future::or(async { Some(task.await) }, async {
            self.wait().await;
            None
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    #[test]
    fn waiters_resolve_once_triggered_and_later_ones_at_once() {
        let shutdown = Shutdown::new();
        let held = shutdown.clone();
        let mut cx = Context::from_waker(Waker::noop());
        let mut wait = pin!(held.wait());
        assert!(wait.as_mut().poll(&mut cx).is_pending());
        assert!(!held.is_stopping());
        shutdown.trigger();
        shutdown.trigger();
        assert!(held.is_stopping());
        assert_eq!(wait.as_mut().poll(&mut cx), Poll::Ready(()));
        let mut late = pin!(held.wait());
        assert_eq!(late.as_mut().poll(&mut cx), Poll::Ready(()));
    }

    #[test]
    fn run_until_cuts_a_task_short() {
        let shutdown = Shutdown::new();
        let mut cx = Context::from_waker(Waker::noop());
        let mut forever = pin!(shutdown.run_until(std::future::pending::<()>()));
        assert!(forever.as_mut().poll(&mut cx).is_pending());
        shutdown.trigger();
        assert_eq!(forever.as_mut().poll(&mut cx), Poll::Ready(None));
        let mut done = pin!(shutdown.run_until(async { 7 }));
        // A finished task and a started shutdown: either answer is right;
        // `or` polls the task first.
        assert_eq!(done.as_mut().poll(&mut cx), Poll::Ready(Some(7)));
    }
}
