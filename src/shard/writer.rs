//! The shard's write side: the committer that stages each committed round
//! and writes it to the subscribers a part at a time, the flush of queued
//! frames, and the one choice of how frames become bytes on a socket
//! ([`wire`]).

use std::io::IoSlice;
use std::os::unix::io::RawFd;
use std::rc::Rc;

use super::{reactor, Shard};
use crate::protocol::ws::CloseCode;
use crate::registry::{Broadcast, ConnKey, Delivered, Flush, Registry};

impl Shard {
    /// Connections written between two turns for the shard's other work
    /// in [`Shard::deliver`] and [`Shard::flush_dirty`]. A send costs the
    /// kernel 6-9 µs on loopback, so a part is about 2 ms: the shard's other
    /// connections (pings, other orgs' subscribers) wait about that long
    /// behind a big broadcast instead of the whole walk (docs/ARCHITECTURE.md).
    const WALK_PART: usize = 256;

    /// Most ready sockets served between two parts of a walk.
    const SERVE_BETWEEN_PARTS: usize = 64;

    /// Writes every connection with newly queued frames, yielding to the
    /// executor between chunks so one big broadcast can't stall the core.
    pub async fn flush_dirty(&self) {
        let dirty = self.registry.borrow_mut().take_dirty();
        for chunk in dirty.chunks(Self::WALK_PART) {
            {
                let mut registry = self.registry.borrow_mut();
                for &key in chunk {
                    flush_one(&mut registry, &self.reactor, key);
                }
            }
            if chunk.len() == Self::WALK_PART {
                glommio::yield_if_needed().await;
            }
        }
        self.registry.borrow_mut().return_dirty(dirty);
    }

    /// Writes staged broadcasts to their subscribers, a part of each org's
    /// connection list at a time with yields between, so one big broadcast
    /// can't stall the core; then ends each (see [`Registry::finish`]).
    pub async fn deliver(&self, staged: Vec<Broadcast>) {
        let mut outcome = Delivered::default();
        let mut ready = [libc::epoll_event { events: 0, u64: 0 }; Self::SERVE_BETWEEN_PARTS];
        for broadcast in &staged {
            let mut from = 0;
            loop {
                let to = (from + Self::WALK_PART).min(broadcast.positions);
                {
                    let mut registry = self.registry.borrow_mut();
                    registry.deliver(broadcast, from..to, &mut wire(), &mut outcome);
                    self.act_on(&mut registry, &mut outcome);
                }
                from = to;
                if from >= broadcast.positions {
                    break;
                }
                // The shard's other connections get a turn at every part.
                reactor::serve_ready(self, &mut ready);
                glommio::yield_if_needed().await;
            }
            self.registry.borrow_mut().finish(broadcast);
        }
        // Connections that had queued bytes got the frames queued.
        self.flush_dirty().await;
    }

    /// Sockets that refused bytes wait for writability; failed ones close.
    pub(super) fn act_on(&self, registry: &mut Registry, outcome: &mut Delivered) {
        for (key, fd) in outcome.blocked.drain(..) {
            self.reactor.want_write(fd, key, true);
        }
        for key in outcome.failed.drain(..) {
            registry.request_close(key, CloseCode::ABNORMAL);
        }
    }
}

/// The committer: takes each round the history commits, stages it for
/// delivery in the same synchronous step, answers its publishers and
/// writes it to the subscribers. Runs for the life of the shard.
pub async fn commit_loop(shard: Rc<Shard>) {
    loop {
        // At rest until publishes wait and no hot upgrade froze the shard:
        // a freeze finds the committer here, between rounds, with every
        // committed message given to every subscriber.
        shard.handover.committer_at_rest.set(true);
        loop {
            let pending = shard.history.pending_generation();
            let phase = shard.handover.changed.generation();
            if shard.handover.phase() != super::upgrade::Phase::Frozen
                && shard.history.has_pending()
            {
                break;
            }
            futures_lite::future::or(
                shard.history.wait_pending(pending),
                shard.handover.changed.wait(phase),
            )
            .await;
        }
        shard.handover.committer_at_rest.set(false);
        let mut round = shard.history.commit_next().await;
        if let Err(e) = round.outcome() {
            crate::log::error(format_args!(
                "hookstream: history: shard {}: commit failed: {e}",
                shard.id
            ));
            round.answer();
            continue;
        }
        // Staged in the same step as the commit (no await since it
        // returned), so every committed record is being delivered.
        let staged = {
            let mut registry = shard.registry.borrow_mut();
            let mut staged = Vec::new();
            for (message, seq) in round.messages() {
                registry.stage(message, seq, &mut staged);
            }
            staged
        };
        // The publishers' answer does not wait for the walk, which takes
        // the kernel ~75 ms per 10,000 subscribers: what was answered is
        // durable and staged. Publishes that arrive meanwhile still wait
        // for it, in the next round.
        round.answer();
        drop(round);
        // Let the publishers' tasks write their answers first.
        futures_lite::future::yield_now().await;
        shard.deliver(staged).await;
        shard.replays.delivered_notify.notify();
    }
}

/// The wire every connection of a shard is written through: the one place
/// that decides how frames become bytes on a socket (see
/// [`crate::registry::Wire`]). Today plaintext frames by `sendmsg`; a TLS
/// listener would answer with a per-connection record writer here, and
/// nothing in the fan-out, the queues, the heartbeat or the reactor changes.
pub fn wire() -> impl crate::registry::Wire {
    super::tls_wire::TlsAwareWire
}

thread_local! {
    /// Set while a hot upgrade has this shard frozen (`shard::upgrade`):
    /// every write of the shard then behaves as if the socket took
    /// nothing, so whatever is queued meanwhile stays in the send queues,
    /// where the snapshot finds it, and no byte reaches a connection the
    /// new process may be serving.
    static WRITES_HELD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Holds (or releases) every write of this shard's thread.
pub fn hold_writes(held: bool) {
    WRITES_HELD.with(|h| h.set(held));
}

/// Non-blocking vectored send on a raw socket: the plaintext wire.
pub fn send_vectored(fd: RawFd, slices: &[IoSlice<'_>]) -> std::io::Result<usize> {
    if WRITES_HELD.with(|h| h.get()) {
        return Err(std::io::ErrorKind::WouldBlock.into());
    }
    // SAFETY: IoSlice is ABI-compatible with iovec on Unix; msghdr is plain
    // data and every pointer in it outlives the call.
    unsafe {
        let mut header: libc::msghdr = std::mem::zeroed();
        header.msg_iov = slices.as_ptr() as *mut libc::iovec;
        header.msg_iovlen = slices.len() as _;
        let written = libc::sendmsg(fd, &header, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL);
        if written < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(written as usize)
        }
    }
}

/// Flushes one connection unless the reactor already waits for it to be
/// writable. A socket that refuses bytes gets EPOLLOUT interest; one that
/// fails is closed without a close frame.
pub fn flush_one(registry: &mut Registry, reactor: &reactor::Reactor, key: ConnKey) {
    let Some(conn) = registry.get(key) else {
        return;
    };
    if conn.write_blocked || conn.queue_is_empty() {
        return;
    }
    let fd = conn.fd;
    match registry.flush(key, &mut wire()) {
        Flush::Drained => {}
        Flush::Blocked => reactor.want_write(fd, key, true),
        Flush::Failed => registry.request_close(key, CloseCode::ABNORMAL),
    }
}
