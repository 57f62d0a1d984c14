//! Fan-out: a committed round becomes one [`Broadcast`] per org (each
//! message rendered once per target channel that has subscribers), then the
//! org's connection list is walked, in parts, and each subscriber gets its
//! matching frames through the write path (`super::wire`).

use std::os::unix::io::RawFd;

use slab::Slab;
use smallvec::SmallVec;

use super::{ConnKey, Connection, Frame, Registry, Wire};
use crate::message::{render_frame, Message};

/// A position in an org's connection list whose connection left while a
/// broadcast was being delivered.
pub const VACANT: u32 = u32::MAX;

/// One commit round's messages for one org, rendered once, ready to be
/// written to every subscriber by [`Registry::deliver`].
#[derive(Debug)]
pub struct Broadcast {
    /// The org's slab index.
    pub org: u32,
    /// The frames, in seq order.
    pub targets: Vec<Target>,
    /// Positions of the org's connection list to walk: the connections that
    /// were there when it was staged (later ones are not subscribed yet).
    pub positions: usize,
}

/// One message rendered for one channel.
#[derive(Debug)]
pub struct Target {
    /// The channel's bit in the org's table.
    pub bit: u32,
    /// The plain text frame.
    pub frame: Frame,
    /// Its permessage-deflate twin (RSV1 set, compressed once), shared by
    /// every subscriber that negotiated the extension; `None` when nobody
    /// of the org did, the frame is small, or compression did not shrink it.
    pub compressed: Option<Frame>,
    /// Payload bytes of the plain frame: whether a connection's window
    /// covers the message (`Connection::takes_compressed`).
    pub payload_bytes: u32,
}

/// Payload bytes of a complete server frame (its header is 2, 4 or 10
/// bytes, by the length's encoding).
fn payload_bytes(frame: &[u8]) -> u32 {
    let header_bytes = match frame[1] & 0x7f {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    (frame.len() - header_bytes) as u32
}

/// What writing a broadcast left for the caller to act on.
#[derive(Debug, Default)]
pub struct Delivered {
    /// Connections whose socket refused bytes: the rest is queued and they
    /// need writability (EPOLLOUT) to go on.
    pub blocked: Vec<(ConnKey, RawFd)>,
    /// Connections whose socket failed: to close without a close frame.
    pub failed: Vec<ConnKey>,
}

/// How many positions ahead [`Registry::deliver`] prefetches records.
const PREFETCH_AHEAD: usize = 16;

/// Hints the CPU to load connection record `index` into cache.
#[inline]
fn prefetch(connections: &Slab<Connection>, index: u32) {
    debug_assert!(
        connections.contains(index as usize),
        "prefetch of {index}, not an occupied slot"
    );
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: every index in an org's connection list other than
        // VACANT is an occupied slot (add pushes it, remove takes it out
        // or marks it VACANT before freeing the slot), so `get_unchecked`
        // is in bounds and occupied; only the address is used, for a
        // prefetch, which never faults.
        unsafe {
            let record = connections.get_unchecked(index as usize) as *const Connection;
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                record as *const i8,
            );
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (connections, index);
    }
}

impl Registry {
    /// Renders `message`, with the seq the history log gave it (and made
    /// durable), once per channel of it that has subscribers, and adds the
    /// frames to its org's broadcast in `staged` (begun here when it has
    /// none yet). The message becomes the org's latest seq. Seqs of one org
    /// arrive here strictly increasing. Every broadcast staged must be
    /// walked by [`Registry::deliver`] and then ended by [`Registry::finish`].
    pub fn stage(&mut self, message: &Message, seq: u64, staged: &mut Vec<Broadcast>) {
        let org = self.org_index(&message.org_id);
        let record = &mut self.orgs[org as usize];
        assert!(seq > record.seq, "seqs of an org only grow");
        record.seq = seq;
        self.counters.published += 1;
        let position = match staged.iter().rposition(|b| b.org == org) {
            Some(position) => position,
            None => {
                debug_assert!(record.delivering < u32::MAX, "delivering count overflow");
                record.delivering += 1;
                staged.push(Broadcast {
                    org,
                    targets: Vec::new(),
                    positions: record.connections.len(),
                });
                staged.len() - 1
            }
        };
        let targets = &mut staged[position].targets;
        // Compress only for an org with a compressing subscriber: the
        // others pay nothing for the extension.
        let mut compression = match &mut self.compression {
            Some((deflater, min_bytes)) if record.deflating > 0 => {
                Some((deflater.get_or_insert_with(Box::default), *min_bytes))
            }
            _ => None,
        };
        let counters = &mut self.counters;
        message.for_each_channel(|channel| {
            if let Some(bit) = record.channels.lookup(channel) {
                if record.channels.subscribers(bit) > 0 {
                    let frame = render_frame(message.kind, channel, seq, &message.data);
                    let compressed = match &mut compression {
                        Some((deflater, min_bytes)) if frame.len() >= *min_bytes => {
                            let twin = deflater.compress_frame(&frame).map(Frame::from);
                            counters.frames_compressed += u64::from(twin.is_some());
                            twin
                        }
                        _ => None,
                    };
                    targets.push(Target {
                        bit,
                        payload_bytes: payload_bytes(&frame),
                        frame,
                        compressed,
                    });
                }
            }
        });
    }

    /// Writes `broadcast` to the connections at `positions` of its org's
    /// list (a part of `0..broadcast.positions`, so a large broadcast can be
    /// walked in parts with yields between them). Each subscriber gets its
    /// frames in one vectored `send` straight from the shared frames; only
    /// what its socket refuses is queued (and counted against its queue
    /// limit). A connection that already has queued bytes gets the frames
    /// queued behind them. Blocked and failed sockets are added to `outcome`.
    pub fn deliver(
        &mut self,
        broadcast: &Broadcast,
        positions: std::ops::Range<usize>,
        wire: &mut impl Wire,
        outcome: &mut Delivered,
    ) {
        if broadcast.targets.is_empty() {
            return;
        }
        let org = broadcast.org as usize;
        // The walked positions stay put until `finish`: only a broadcast
        // being delivered may be walked, and only within what was there
        // when it was staged.
        debug_assert!(
            self.orgs[org].delivering > 0,
            "walk of a finished broadcast"
        );
        debug_assert!(
            positions.end <= broadcast.positions,
            "walk past the staged range"
        );
        debug_assert!(
            broadcast.positions <= self.orgs[org].connections.len(),
            "positions removed during a walk"
        );
        let mut matched: SmallVec<[&Frame; 16]> = SmallVec::new();
        let end = positions.end;
        for position in positions {
            // The walk is memory-bound over a large org: ask for the record
            // a few positions ahead while this one is handled.
            if let Some(&ahead) = self.orgs[org].connections[..end].get(position + PREFETCH_AHEAD) {
                if ahead != VACANT {
                    prefetch(&self.connections, ahead);
                }
            }
            let index = self.orgs[org].connections[position];
            if index == VACANT {
                continue;
            }
            let conn = &self.connections[index as usize];
            debug_assert_eq!(conn.org, broadcast.org, "a record in another org's list");
            debug_assert_eq!(
                conn.org_position as usize, position,
                "a record moved during a walk"
            );
            if !conn.state.can_send() {
                continue;
            }
            matched.clear();
            let mut compressed = 0u64;
            for target in &broadcast.targets {
                if conn.has(target.bit) {
                    match &target.compressed {
                        Some(twin) if conn.takes_compressed(target.payload_bytes as usize) => {
                            compressed += 1;
                            matched.push(twin);
                        }
                        _ => matched.push(&target.frame),
                    }
                }
            }
            self.counters.delivered_compressed += compressed;
            if matched.is_empty() {
                continue;
            }
            self.counters.delivered += matched.len() as u64;
            self.write_frames(index, &matched, wire, outcome);
        }
    }

    /// Ends the delivery of `broadcast`: fills the positions of connections
    /// that left meanwhile.
    pub fn finish(&mut self, broadcast: &Broadcast) {
        let org_record = &mut self.orgs[broadcast.org as usize];
        assert!(org_record.delivering > 0, "finish without a stage");
        org_record.delivering -= 1;
        if org_record.delivering > 0 {
            return;
        }
        debug_assert!(
            org_record.vacant.len() <= org_record.connections.len(),
            "more vacancies than positions"
        );
        org_record.channels.unhold();
        let mut vacant = std::mem::take(&mut org_record.vacant);
        // Highest first: every vacancy above the one being filled is gone,
        // so the last entry moved into it is a live connection (or itself).
        vacant.sort_unstable_by(|a, b| b.cmp(a));
        for position in vacant.iter().map(|&p| p as usize) {
            org_record.connections.swap_remove(position);
            if let Some(moved) = org_record.connections.get(position).copied() {
                self.connections[moved as usize].org_position = position as u32;
            }
        }
        vacant.clear();
        org_record.vacant = vacant;
        debug_assert!(
            !org_record.connections.contains(&VACANT),
            "a vacancy left after the walk"
        );
        debug_assert!(org_record
            .connections
            .iter()
            .enumerate()
            .all(
                |(position, &index)| self.connections[index as usize].org_position as usize
                    == position
            ));
    }

    /// True while a broadcast of org `org_id` is being delivered: a
    /// subscription that replays history waits for it to finish, so the
    /// switch from replayed to live messages has no gap and no duplicate.
    pub fn is_delivering(&self, org_id: &str) -> bool {
        self.org_by_id
            .get(org_id)
            .is_some_and(|i| self.orgs[*i as usize].delivering > 0)
    }
}
