//! A wake-up for tasks of one shard waiting on something that changes
//! (new commits, new pending records, revocations, a delivered broadcast):
//! a generation counter and the wakers of the waiters. A leaf, used by the
//! history, the shard runtime and the shutdown signal.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::task::{Poll, Waker};

/// A wake-up for tasks waiting on something that changes (new commits,
/// new pending records, revocations): a generation counter and the wakers
/// of the waiters. A waiter that is dropped before it is woken (a
/// long-poll that got its answer another way) takes its waker out, so the
/// list holds live waiters only, however long between two notifications.
#[derive(Debug, Default)]
pub struct Notify {
    generation: Cell<u64>,
    /// Wakers of the current generation; emptied by [`Notify::notify`].
    wakers: RefCell<slab::Slab<Waker>>,
}

impl Notify {
    /// The current generation, to wait for a change from.
    pub fn generation(&self) -> u64 {
        self.generation.get()
    }

    /// Wakes every waiter.
    pub fn notify(&self) {
        self.generation.set(self.generation.get() + 1);
        let wakers = std::mem::take(&mut *self.wakers.borrow_mut());
        for (_, waker) in wakers {
            waker.wake();
        }
    }

    /// Resolves once the generation differs from `seen`.
    pub fn wait(&self, seen: u64) -> NotifyWait<'_> {
        NotifyWait {
            notify: self,
            seen,
            slot: None,
        }
    }

    /// Waiters registered now (for tests).
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.wakers.borrow().len()
    }
}

/// The future of [`Notify::wait`].
#[derive(Debug)]
pub struct NotifyWait<'a> {
    notify: &'a Notify,
    seen: u64,
    /// Its waker's slot, valid while the generation is still `seen` (a
    /// notification bumps it and empties the slab).
    slot: Option<usize>,
}

impl Future for NotifyWait<'_> {
    type Output = ();

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<()> {
        if self.notify.generation.get() != self.seen {
            self.slot = None;
            return Poll::Ready(());
        }
        let mut wakers = self.notify.wakers.borrow_mut();
        match self.slot {
            Some(slot) => {
                if !wakers[slot].will_wake(cx.waker()) {
                    wakers[slot] = cx.waker().clone();
                }
            }
            None => {
                let slot = wakers.insert(cx.waker().clone());
                drop(wakers);
                self.slot = Some(slot);
            }
        }
        Poll::Pending
    }
}

impl Drop for NotifyWait<'_> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            if self.notify.generation.get() == self.seen {
                self.notify.wakers.borrow_mut().remove(slot);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn poll_once(wait: &mut NotifyWait<'_>) -> Poll<()> {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        std::pin::Pin::new(wait).poll(&mut cx)
    }

    #[test]
    fn notify_keeps_only_live_waiters_however_many() {
        let notify = Notify::default();
        let seen = notify.generation();
        let mut waits: Vec<NotifyWait<'_>> = (0..5_000).map(|_| notify.wait(seen)).collect();
        for wait in &mut waits {
            assert!(poll_once(wait).is_pending());
        }
        // No cap wakes them early; polling again registers nothing new.
        assert_eq!(notify.waiting(), 5_000);
        assert!(poll_once(&mut waits[0]).is_pending());
        assert_eq!(notify.waiting(), 5_000);
        // Waiters that end without being woken take their wakers along.
        let mut last = waits.pop().unwrap();
        drop(waits);
        assert_eq!(notify.waiting(), 1);
        notify.notify();
        assert_eq!(notify.waiting(), 0);
        assert!(poll_once(&mut last).is_ready());
    }

    #[test]
    fn a_waiter_from_before_a_notification_leaves_newer_ones_alone() {
        let notify = Notify::default();
        let mut old = notify.wait(notify.generation());
        assert!(poll_once(&mut old).is_pending());
        notify.notify();
        // A new waiter may get the slot the old one had.
        let mut new = notify.wait(notify.generation());
        assert!(poll_once(&mut new).is_pending());
        drop(old);
        assert_eq!(notify.waiting(), 1);
        notify.notify();
        assert!(poll_once(&mut new).is_ready());
    }
}
