//! How shards talk: one inbox per shard — a mutex-guarded queue and an
//! eventfd that wakes its owner — reachable from every shard.
//!
//! This replaces glommio's `channel_mesh`, whose `join` handshake could park
//! a shard for good at startup (its shared-channel `connect` does not wake
//! the peer executor; seen as about one start in ten with two shards) and
//! which has an open report of deadlocks under contention (glommio #555).
//! Here nothing needs a handshake: the inboxes exist before any shard
//! starts, a send never waits (the queue is bounded by what feeds it:
//! upgrades, publish requests and history queries, each already limited),
//! and the owner drains everything queued in one lock per wake-up.

use std::collections::VecDeque;
use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::ShardMessage;

/// One shard's inbox.
struct Inbox {
    /// Messages waiting for the owner, oldest first.
    queue: Mutex<VecDeque<ShardMessage>>,
    /// Counts sends since the owner last drained; readable while non-zero.
    eventfd: RawFd,
    /// Set when the owner stops: later sends are refused.
    closed: AtomicBool,
}

impl Drop for Inbox {
    fn drop(&mut self) {
        // SAFETY: the inbox owns its eventfd.
        unsafe { libc::close(self.eventfd) };
    }
}

/// Every shard's inbox; cheap to clone, shared by all shards.
#[derive(Clone)]
pub struct Mesh {
    inboxes: Arc<Vec<Inbox>>,
}

impl Mesh {
    /// Inboxes for `shards` shards.
    pub fn new(shards: usize) -> std::io::Result<Mesh> {
        let mut inboxes = Vec::with_capacity(shards);
        for _ in 0..shards {
            // SAFETY: plain syscall; the descriptor is owned by the inbox.
            let eventfd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
            if eventfd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            inboxes.push(Inbox {
                queue: Mutex::new(VecDeque::new()),
                eventfd,
                closed: AtomicBool::new(false),
            });
        }
        Ok(Mesh {
            inboxes: Arc::new(inboxes),
        })
    }

    /// Queues `message` for shard `to` and wakes it; gives the message back
    /// when that shard has stopped.
    pub fn send_to(&self, to: usize, message: ShardMessage) -> Result<(), ShardMessage> {
        let inbox = &self.inboxes[to];
        {
            let mut queue = inbox.queue.lock().unwrap_or_else(|e| e.into_inner());
            if inbox.closed.load(Ordering::Acquire) {
                return Err(message);
            }
            queue.push_back(message);
        }
        let one: u64 = 1;
        // SAFETY: an 8-byte write to our eventfd; it only fails when the
        // counter would overflow, which a pending wake-up makes harmless.
        unsafe { libc::write(inbox.eventfd, (&one as *const u64).cast(), 8) };
        Ok(())
    }

    /// Waits until shard `me` has messages and takes them all.
    pub async fn receive(&self, me: usize) -> VecDeque<ShardMessage> {
        let inbox = &self.inboxes[me];
        loop {
            let mut count: u64 = 0;
            // SAFETY: an 8-byte read from our non-blocking eventfd resets it.
            unsafe { libc::read(inbox.eventfd, (&mut count as *mut u64).cast(), 8) };
            let taken = std::mem::take(&mut *inbox.queue.lock().unwrap_or_else(|e| e.into_inner()));
            if !taken.is_empty() {
                return taken;
            }
            super::reactor::wait_readable(inbox.eventfd).await;
        }
    }

    /// Refuses further messages to shard `me` and drops what is queued
    /// (handoffs close their sockets; publish and history callers see their
    /// reply channel closed).
    pub fn close(&self, me: usize) {
        let inbox = &self.inboxes[me];
        let dropped = {
            let mut queue = inbox.queue.lock().unwrap_or_else(|e| e.into_inner());
            inbox.closed.store(true, Ordering::Release);
            std::mem::take(&mut *queue)
        };
        drop(dropped);
    }
}
