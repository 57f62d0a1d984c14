//! One connection's record: what an idle connection costs in user space,
//! its state, and the two boxed-on-demand parts (send queue, partial read).

use std::collections::VecDeque;
use std::os::unix::io::RawFd;

use super::Frame;
use crate::protocol::ws;

pub use crate::protocol::ws::CloseCode;

/// Where a connection is in its life: the server's close decision and the
/// close handshake of RFC 6455 §7. The one state of a connection; every
/// question about it is a method here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Upgraded; messages flow both ways.
    Open,
    /// The server decided to close with this code (slow consumer, revoked
    /// key, heartbeat, shutdown, a failed socket); the reactor sends the
    /// close frame next. Nothing more is written to it meanwhile.
    CloseRequested(CloseCode),
    /// We sent a close frame with this code and wait (bounded) for the
    /// peer's close or EOF; frames the peer sent before seeing ours are
    /// still read, and dropped.
    ClosingByUs(CloseCode),
    /// The peer sent a close frame; we owe it ours.
    ClosingByPeer,
    /// Both close frames are through (ours maybe still queued): the socket
    /// closes once the queue drains (bounded).
    Closed,
}

impl ConnState {
    /// Whether messages may still be queued to the connection: only while
    /// it is open and nobody decided to close it.
    #[inline]
    pub fn can_send(self) -> bool {
        self == ConnState::Open
    }

    /// Whether the client's messages are still acted on: until a close
    /// frame went either way (a requested close is not sent yet).
    pub fn handles_messages(self) -> bool {
        matches!(self, ConnState::Open | ConnState::CloseRequested(_))
    }

    /// Whether frames from the peer are still expected.
    pub fn can_read(self) -> bool {
        matches!(
            self,
            ConnState::Open | ConnState::CloseRequested(_) | ConnState::ClosingByUs(_)
        )
    }

    /// Whether we still have to send a close frame.
    pub fn must_send_close(self) -> bool {
        matches!(
            self,
            ConnState::Open | ConnState::CloseRequested(_) | ConnState::ClosingByPeer
        )
    }

    /// The code of a close the server requested and has not sent yet.
    pub fn close_requested(self) -> Option<CloseCode> {
        match self {
            ConnState::CloseRequested(code) => Some(code),
            _ => None,
        }
    }

    /// The state after the server decided to close with `code`; the first
    /// decision wins, and a connection already closing stays as it is.
    pub fn on_close_requested(self, code: CloseCode) -> ConnState {
        match self {
            ConnState::Open => ConnState::CloseRequested(code),
            other => other,
        }
    }

    /// The state after we sent (queued) a close frame with `code`.
    pub fn on_close_sent(self, code: CloseCode) -> ConnState {
        match self {
            ConnState::Open | ConnState::CloseRequested(_) => ConnState::ClosingByUs(code),
            ConnState::ClosingByPeer => ConnState::Closed,
            other => other,
        }
    }

    /// The state after a close frame arrived from the peer.
    pub fn on_close_received(self) -> ConnState {
        match self {
            ConnState::Open | ConnState::CloseRequested(_) => ConnState::ClosingByPeer,
            ConnState::ClosingByUs(_) => ConnState::Closed,
            other => other,
        }
    }
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
    /// Generation of this record (see [`super::ConnKey`]).
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
    /// Where it is in its life (see [`ConnState`]).
    pub state: ConnState,
    /// permessage-deflate: 0 when not negotiated, else the largest window
    /// (in bits, 8–15) the client lets the server's compressed messages
    /// use. A byte of what was padding: the record does not grow.
    pub deflate_window_bits: u8,
    /// Subscriptions as bits of the org's channel table (two words
    /// whatever the org's channel count; see `subscriptions`).
    pub subscriptions: crate::subscriptions::ChannelSet,
    /// Pending output, only while there is some.
    pub send: Option<Box<SendQueue>>,
    /// Pending input state, only while there is some.
    pub partial: Option<Box<Partial>>,
}

impl Connection {
    /// True when subscribed to channel `bit`.
    #[inline]
    pub fn has(&self, bit: u32) -> bool {
        self.subscriptions.has(bit)
    }

    pub(super) fn set(&mut self, bit: u32) {
        self.subscriptions.set(bit);
    }

    pub(super) fn clear(&mut self, bit: u32) {
        self.subscriptions.clear(bit);
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

    /// True when the connection negotiated permessage-deflate.
    #[inline]
    pub fn deflates(&self) -> bool {
        self.deflate_window_bits != 0
    }

    /// True when this connection may be sent `frame`'s compressed twin:
    /// it negotiated the extension, and the window it allows covers the
    /// message (a message no longer than the window cannot refer back
    /// further than the window, whatever window compressed it).
    #[inline]
    pub fn takes_compressed(&self, plain_payload_bytes: usize) -> bool {
        self.deflate_window_bits >= crate::protocol::deflate::WINDOW_BITS_MAX
            || (self.deflate_window_bits != 0
                && plain_payload_bytes <= 1usize << self.deflate_window_bits)
    }

    /// True when nothing waits to be written.
    pub fn queue_is_empty(&self) -> bool {
        self.send.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_stays_64_bytes() {
        // What an idle connection costs (ARCHITECTURE.md): the deflate byte
        // lives in what was padding (72 bytes before the two-word
        // ChannelSet, 64 with it).
        assert_eq!(std::mem::size_of::<Connection>(), 64);
    }

    #[test]
    fn close_state_transitions() {
        let code = CloseCode::GOING_AWAY;
        let by_us = ConnState::Open.on_close_sent(code);
        assert_eq!(by_us, ConnState::ClosingByUs(code));
        assert!(by_us.can_read());
        assert!(!by_us.can_send());
        assert!(!by_us.must_send_close());
        assert_eq!(by_us.on_close_received(), ConnState::Closed);

        let by_peer = ConnState::Open.on_close_received();
        assert_eq!(by_peer, ConnState::ClosingByPeer);
        assert!(!by_peer.can_read());
        assert!(!by_peer.can_send());
        assert!(by_peer.must_send_close());
        assert_eq!(by_peer.on_close_sent(code), ConnState::Closed);

        assert!(!ConnState::Closed.can_read());
        assert!(ConnState::Open.can_read());
        assert!(ConnState::Open.can_send());
    }

    #[test]
    fn a_requested_close_stops_sending_but_not_reading_and_the_first_wins() {
        let requested = ConnState::Open.on_close_requested(CloseCode::SLOW_CONSUMER);
        assert_eq!(requested.close_requested(), Some(CloseCode::SLOW_CONSUMER));
        assert!(!requested.can_send());
        assert!(requested.handles_messages());
        assert!(requested.must_send_close());
        assert_eq!(
            requested.on_close_requested(CloseCode::GOING_AWAY),
            requested
        );
        assert_eq!(
            requested.on_close_sent(CloseCode::SLOW_CONSUMER),
            ConnState::ClosingByUs(CloseCode::SLOW_CONSUMER)
        );
        assert_eq!(
            ConnState::ClosingByPeer.on_close_requested(CloseCode::GOING_AWAY),
            ConnState::ClosingByPeer
        );
    }
}
