//! One connection's record: what an idle connection costs in user space,
//! its state, and the two boxed-on-demand parts (send queue, partial read).

use std::collections::VecDeque;
use std::os::unix::io::RawFd;

use smallvec::SmallVec;

use super::Frame;
use crate::protocol::ws;

/// Why the server is closing a connection (the close code to send).
pub type CloseCode = u16;

/// Where a connection is in its life (the close handshake of RFC 6455 §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Upgraded; messages flow both ways.
    Open,
    /// We sent a close frame and wait (bounded) for the peer's close or EOF.
    ClosingByUs,
    /// The peer sent a close frame; we answered and close the socket once
    /// the answer is written (bounded).
    ClosingByPeer,
}

/// Unwritten frames of one connection. Boxed and present only while bytes
/// are pending, so an idle connection pays 8 bytes for it.
#[derive(Debug, Default)]
pub struct SendQueue {
    /// Frames waiting to be written, oldest first.
    pub frames: VecDeque<Frame>,
    /// Bytes of the front frame already written.
    pub front_sent: u32,
    /// Unwritten bytes in `frames`.
    pub bytes: u32,
}

/// Read state carried between two reads: a partly received frame or a
/// partly assembled fragmented message. Boxed and present only then.
#[derive(Debug)]
pub struct Partial {
    /// The decoder holding the assembly state.
    pub decoder: ws::Decoder,
    /// Bytes of an incomplete frame.
    pub bytes: Vec<u8>,
}

/// One connection's record: what an idle connection costs in user space.
#[derive(Debug)]
pub struct Connection {
    /// Generation of this record (see [`ConnKey`]).
    pub generation: u32,
    /// The socket; the record owns it (closed when the record is removed).
    pub fd: RawFd,
    /// Index of the org in the registry's org slab.
    pub org: u32,
    /// Position of this connection in its org's connection list, for O(1) removal.
    pub org_position: u32,
    /// Index of the API key in the registry's key-id table (for revocation).
    pub key: u32,
    /// Number of bits set in `subscriptions`.
    pub subscription_count: u16,
    /// Bad client messages in a row (closed with 1008 at the limit).
    pub bad_messages_in_row: u8,
    /// Pings sent without any frame received since.
    pub missed_pongs: u8,
    /// True while the socket refused more bytes: the reactor then waits for
    /// writability (EPOLLOUT) and the fan-out only queues.
    pub write_blocked: bool,
    /// Close handshake state.
    pub state: ConnState,
    /// Set when the server decided to close; the reactor sends the close frame.
    pub close: Option<CloseCode>,
    /// Subscriptions as bits of the org's channel table.
    pub subscriptions: SmallVec<[u64; 1]>,
    /// Pending output, only while there is some.
    pub send: Option<Box<SendQueue>>,
    /// Pending input state, only while there is some.
    pub partial: Option<Box<Partial>>,
}

impl Connection {
    /// True when subscribed to channel `bit`.
    #[inline]
    pub fn has(&self, bit: u32) -> bool {
        let word = (bit / 64) as usize;
        word < self.subscriptions.len() && self.subscriptions[word] & (1u64 << (bit % 64)) != 0
    }

    pub(super) fn set(&mut self, bit: u32) {
        let word = (bit / 64) as usize;
        if word >= self.subscriptions.len() {
            self.subscriptions.resize(word + 1, 0);
        }
        self.subscriptions[word] |= 1u64 << (bit % 64);
    }

    pub(super) fn clear(&mut self, bit: u32) {
        let word = (bit / 64) as usize;
        if word < self.subscriptions.len() {
            self.subscriptions[word] &= !(1u64 << (bit % 64));
        }
    }

    /// Unwritten bytes.
    pub fn queued_bytes(&self) -> usize {
        self.send.as_ref().map_or(0, |q| q.bytes as usize)
    }

    /// Unwritten bytes behind the frame being written: what the send queue
    /// limit bounds. The front frame is not counted, so one message larger
    /// than the limit still reaches a reader that keeps up.
    pub fn backlog_bytes(&self) -> usize {
        self.send.as_ref().map_or(0, |q| {
            let front = q
                .frames
                .front()
                .map_or(0, |f| f.len() - q.front_sent as usize);
            q.bytes as usize - front
        })
    }

    /// True when nothing waits to be written.
    pub fn queue_is_empty(&self) -> bool {
        self.send.is_none()
    }
}
