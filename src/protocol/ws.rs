//! RFC 6455 frame codec: pure, no I/O, no runtime.
//!
//! # Layout
//!
//! - this file: opcodes, the frame header (parse and encode), the error enum
//!   with its close codes, and close payloads;
//! - `close`: the [`CloseCode`] type, every code's one name, which codes
//!   may go on the wire, and the server's reason texts;
//! - `mask`: XOR masking, a word-at-a-time fast path checked against a
//!   byte-by-byte one;
//! - `decoder`: the per-connection [`Decoder`] that turns bytes of the
//!   caller's read buffer into [`Message`]s, enforcing every rule of the RFC
//!   with its close code.
//!
//! Decoding never allocates for a message that arrives in one frame (it is
//! unmasked in place and borrowed from the read buffer); only fragmented
//! messages are assembled into a buffer owned by the decoder. Encoding writes
//! a frame header into a stack `[u8; 14]` so the payload, which the server
//! serializes once and shares between subscribers, is never copied.

mod close;
mod decoder;
mod mask;

pub use close::{is_valid_close_code, CloseCode};
pub use decoder::{Decoded, Decoder, DecoderConfig, Message};
pub use mask::{unmask, unmask_bytewise};

use crate::limits::{CONTROL_PAYLOAD_BYTES_MAX, FRAME_HEADER_BYTES_MAX};

/// Bytes of the close code at the start of a close payload.
const CLOSE_CODE_BYTES: usize = 2;

/// Largest close reason in bytes: a control payload less its close code.
pub const CLOSE_REASON_BYTES_MAX: usize = CONTROL_PAYLOAD_BYTES_MAX - CLOSE_CODE_BYTES;

/// Size of the buffer [`encode_close_frame`] writes into: the longest
/// unmasked header of a control frame (2 bytes, since its payload is at most
/// 125 bytes) plus the payload, rounded up to the size the server API fixed.
pub const CLOSE_FRAME_BYTES_MAX: usize = 129;

const _: () = assert!(FRAME_HEADER_BYTES_MAX == 14);
const _: () = assert!(CONTROL_PAYLOAD_BYTES_MAX == 125);
const _: () = assert!(CLOSE_FRAME_BYTES_MAX >= 2 + CONTROL_PAYLOAD_BYTES_MAX);

/// A frame opcode (RFC 6455 §5.2). Reserved opcodes (3-7, 11-15) have no
/// variant: [`FrameHeader::parse`] rejects them, so code past the parser never
/// has to consider them.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opcode {
    /// A later fragment of a text or binary message.
    Continuation = 0,
    /// The first (or only) frame of a UTF-8 text message.
    Text = 1,
    /// The first (or only) frame of a binary message.
    Binary = 2,
    /// Starts or answers the close handshake.
    Close = 8,
    /// Asks the peer for a pong with the same payload.
    Ping = 9,
    /// Answers a ping (or is an unsolicited heartbeat).
    Pong = 10,
}

impl Opcode {
    /// The opcode for the low four bits of a frame's first byte, or `None`
    /// for a reserved value.
    pub fn from_u8(value: u8) -> Option<Opcode> {
        match value {
            0 => Some(Opcode::Continuation),
            1 => Some(Opcode::Text),
            2 => Some(Opcode::Binary),
            8 => Some(Opcode::Close),
            9 => Some(Opcode::Ping),
            10 => Some(Opcode::Pong),
            _ => None,
        }
    }

    /// Control frames (close, ping, pong) have opcodes with the high bit set;
    /// they may not be fragmented and carry at most 125 bytes.
    pub fn is_control(self) -> bool {
        (self as u8) & 0x8 != 0
    }
}

/// One violation of RFC 6455 by the peer. Each maps to exactly one close code
/// through [`WsError::close_code`]; the connection is then failed with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WsError {
    /// A client frame without a mask (RFC 6455 §5.1: the server must fail it).
    #[error("client frame is not masked")]
    Unmasked,
    /// A reserved bit where it is not allowed: RSV2-3 ever, RSV1 without
    /// permessage-deflate, on a control frame or on a continuation.
    #[error("reserved bits set without a negotiated extension")]
    ReservedBits,
    /// Opcode 3-7 or 11-15.
    #[error("reserved opcode")]
    ReservedOpcode,
    /// A 64-bit payload length with the most significant bit set.
    #[error("64-bit payload length with the top bit set")]
    InvalidPayloadLength,
    /// A control frame with more than 125 bytes of payload.
    #[error("control frame payload over 125 bytes")]
    ControlTooLong,
    /// A control frame without FIN.
    #[error("fragmented control frame")]
    ControlFragmented,
    /// A continuation frame while no fragmented message is open.
    #[error("continuation frame without a started message")]
    UnexpectedContinuation,
    /// A new text or binary frame while a fragmented message is still open.
    #[error("new data frame inside a fragmented message")]
    ExpectedContinuation,
    /// A text message or close reason that is not UTF-8.
    #[error("text is not valid UTF-8")]
    InvalidUtf8,
    /// A close code that may not be sent on the wire.
    #[error("invalid close code")]
    InvalidCloseCode,
    /// A close payload of exactly one byte (half a close code).
    #[error("close payload of one byte")]
    ClosePayloadOneByte,
    /// A frame or assembled message larger than the configured limit.
    #[error("message over the size limit")]
    MessageTooBig,
}

impl WsError {
    /// The close code to fail the connection with (RFC 6455 §7.4.1): 1007
    /// for bad UTF-8, 1009 for an oversized message, 1002 for everything else.
    pub fn close_code(self) -> CloseCode {
        match self {
            WsError::Unmasked
            | WsError::ReservedBits
            | WsError::ReservedOpcode
            | WsError::InvalidPayloadLength
            | WsError::ControlTooLong
            | WsError::ControlFragmented
            | WsError::UnexpectedContinuation
            | WsError::ExpectedContinuation
            | WsError::InvalidCloseCode
            | WsError::ClosePayloadOneByte => CloseCode::PROTOCOL_ERROR,
            WsError::InvalidUtf8 => CloseCode::INVALID_PAYLOAD,
            WsError::MessageTooBig => CloseCode::MESSAGE_TOO_BIG,
        }
    }
}

/// A parsed frame header (RFC 6455 §5.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Whether this is the final frame of its message.
    pub fin: bool,
    /// RSV1-3 as the low three bits (RSV1 is 0b100); zero unless
    /// permessage-deflate set RSV1 on a message's first frame, which the
    /// decoder enforces (the parser only reports them).
    pub rsv: u8,
    /// What the payload is.
    pub opcode: Opcode,
    /// The masking key; clients must send one, servers must not.
    pub mask: Option<[u8; 4]>,
    /// Payload bytes following the header, as announced (below 2^63).
    pub payload_len: u64,
}

impl FrameHeader {
    /// Parses the header at the front of `buf`.
    ///
    /// `Ok(None)`: more bytes are needed. `Ok(Some((header, header_len)))`:
    /// the header took `header_len` bytes (2..=14); the payload follows.
    /// Reserved opcodes and 64-bit lengths with the top bit set are errors
    /// here; everything that depends on the connection (masking, RSV bits,
    /// fragmentation, limits) is checked by the [`Decoder`]. Non-minimal
    /// length encodings are accepted, as the RFC does not forbid them to a
    /// receiver.
    pub fn parse(buf: &[u8]) -> Result<Option<(FrameHeader, usize)>, WsError> {
        // The opcode is in the first byte: reject a reserved one as early as
        // possible rather than waiting for the rest of the header.
        let Some(&byte0) = buf.first() else {
            return Ok(None);
        };
        let opcode = Opcode::from_u8(byte0 & 0x0F).ok_or(WsError::ReservedOpcode)?;
        let fin = byte0 & 0x80 != 0;
        let rsv = (byte0 >> 4) & 0x07;

        let Some(&byte1) = buf.get(1) else {
            return Ok(None);
        };
        let masked = byte1 & 0x80 != 0;
        let (payload_len, length_end) = match byte1 & 0x7F {
            126 => {
                let Some(bytes) = buf.get(2..4) else {
                    return Ok(None);
                };
                (u64::from(u16::from_be_bytes([bytes[0], bytes[1]])), 4)
            }
            127 => {
                let Some(bytes) = buf.get(2..10) else {
                    return Ok(None);
                };
                let mut word = [0u8; 8];
                word.copy_from_slice(bytes);
                let payload_len = u64::from_be_bytes(word);
                if payload_len >> 63 != 0 {
                    return Err(WsError::InvalidPayloadLength);
                }
                (payload_len, 10)
            }
            short => (u64::from(short), 2),
        };

        let (mask, header_len) = if masked {
            let Some(bytes) = buf.get(length_end..length_end + 4) else {
                return Ok(None);
            };
            (
                Some([bytes[0], bytes[1], bytes[2], bytes[3]]),
                length_end + 4,
            )
        } else {
            (None, length_end)
        };
        debug_assert!(header_len >= 2);
        debug_assert!(header_len <= FRAME_HEADER_BYTES_MAX);

        let header = FrameHeader {
            fin,
            rsv,
            opcode,
            mask,
            payload_len,
        };
        Ok(Some((header, header_len)))
    }
}

/// Length of the header [`encode_header`] writes for this payload length,
/// so the server can reserve room in front of a payload.
pub fn header_len(payload_len: u64, masked: bool) -> usize {
    let length_bytes = if payload_len < 126 {
        0
    } else if payload_len <= u64::from(u16::MAX) {
        2
    } else {
        8
    };
    2 + length_bytes + if masked { 4 } else { 0 }
}

/// Writes a frame header into `out` and returns its length (2..=14), using
/// the shortest length encoding. `mask` is `None` for server frames; with a
/// mask the caller masks the payload with [`unmask`] (XOR is its own
/// inverse). The payload itself is never touched, so one serialized message
/// can be shared by every subscriber with only this header in front.
///
/// Panics on a caller bug that would put an invalid frame on the wire: a
/// length of 2^63 or more, or a control frame that is fragmented or longer
/// than 125 bytes.
pub fn encode_header(
    out: &mut [u8; FRAME_HEADER_BYTES_MAX],
    fin: bool,
    opcode: Opcode,
    payload_len: u64,
    mask: Option<[u8; 4]>,
) -> usize {
    assert!(payload_len >> 63 == 0);
    if opcode.is_control() {
        assert!(fin);
        assert!(payload_len <= CONTROL_PAYLOAD_BYTES_MAX as u64);
    }

    out[0] = if fin { 0x80 } else { 0 } | opcode as u8;
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    let length_end = if payload_len < 126 {
        out[1] = mask_bit | payload_len as u8;
        2
    } else if payload_len <= u64::from(u16::MAX) {
        out[1] = mask_bit | 126;
        out[2..4].copy_from_slice(&(payload_len as u16).to_be_bytes());
        4
    } else {
        out[1] = mask_bit | 127;
        out[2..10].copy_from_slice(&payload_len.to_be_bytes());
        10
    };
    let written = match mask {
        Some(key) => {
            out[length_end..length_end + 4].copy_from_slice(&key);
            length_end + 4
        }
        None => length_end,
    };
    debug_assert!(written == header_len(payload_len, mask.is_some()));
    written
}

/// A received close frame's payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CloseFrame<'a> {
    /// The peer's close code, already checked with [`is_valid_close_code`].
    pub code: u16,
    /// The peer's reason, already checked to be UTF-8; often empty.
    pub reason: &'a str,
}

/// Writes a close payload into `out`: the 2-byte code, then `reason`
/// truncated to 123 bytes on a char boundary (control payloads are at most
/// 125 bytes and a cut code point would make the peer fail us with 1007).
/// Returns the length written.
///
/// Panics if `code` may not be sent (see [`is_valid_close_code`]): that is a
/// bug in the caller, not something a peer can cause.
pub fn encode_close_payload(
    out: &mut [u8; CONTROL_PAYLOAD_BYTES_MAX],
    code: u16,
    reason: &str,
) -> usize {
    assert!(is_valid_close_code(code));
    let mut reason_len = reason.len().min(CLOSE_REASON_BYTES_MAX);
    // `str::floor_char_boundary` is newer than the crate's rust-version; a
    // boundary is at most three bytes back.
    while !reason.is_char_boundary(reason_len) {
        reason_len -= 1;
    }
    out[..CLOSE_CODE_BYTES].copy_from_slice(&code.to_be_bytes());
    out[CLOSE_CODE_BYTES..CLOSE_CODE_BYTES + reason_len]
        .copy_from_slice(&reason.as_bytes()[..reason_len]);
    let written = CLOSE_CODE_BYTES + reason_len;
    debug_assert!(written <= CONTROL_PAYLOAD_BYTES_MAX);
    written
}

/// Writes a whole unmasked (server) close frame, header and payload, into a
/// stack buffer and returns its length. The reason is truncated as in
/// [`encode_close_payload`].
pub fn encode_close_frame(out: &mut [u8; CLOSE_FRAME_BYTES_MAX], code: u16, reason: &str) -> usize {
    let mut payload = [0u8; CONTROL_PAYLOAD_BYTES_MAX];
    let payload_len = encode_close_payload(&mut payload, code, reason);
    let mut header = [0u8; FRAME_HEADER_BYTES_MAX];
    let header_len = encode_header(&mut header, true, Opcode::Close, payload_len as u64, None);
    debug_assert!(header_len == 2);
    out[..header_len].copy_from_slice(&header[..header_len]);
    out[header_len..header_len + payload_len].copy_from_slice(&payload[..payload_len]);
    header_len + payload_len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_len_matches_encode_header_at_every_length_boundary() {
        let lengths = [
            0u64,
            1,
            125,
            126,
            127,
            65_535,
            65_536,
            1 << 32,
            (1 << 63) - 1,
        ];
        for &payload_len in &lengths {
            for mask in [None, Some([1, 2, 3, 4])] {
                let mut out = [0u8; FRAME_HEADER_BYTES_MAX];
                let written = encode_header(&mut out, true, Opcode::Binary, payload_len, mask);
                assert_eq!(written, header_len(payload_len, mask.is_some()));
                let (header, parsed_len) = FrameHeader::parse(&out[..written]).unwrap().unwrap();
                assert_eq!(parsed_len, written);
                assert_eq!(header.payload_len, payload_len);
                assert_eq!(header.mask, mask);
                assert!(header.fin);
                assert_eq!(header.rsv, 0);
                assert_eq!(header.opcode, Opcode::Binary);
                // Every strict prefix needs more bytes.
                for cut in 0..written {
                    assert_eq!(FrameHeader::parse(&out[..cut]), Ok(None));
                }
            }
        }
    }

    #[test]
    fn every_reserved_opcode_is_rejected_from_the_first_byte() {
        for value in 0u8..16 {
            let expected_known = matches!(value, 0 | 1 | 2 | 8 | 9 | 10);
            assert_eq!(Opcode::from_u8(value).is_some(), expected_known);
            if !expected_known {
                assert_eq!(
                    FrameHeader::parse(&[0x80 | value]),
                    Err(WsError::ReservedOpcode)
                );
            }
        }
    }

    #[test]
    fn close_codes_follow_the_registry() {
        let valid = (0..=u16::MAX)
            .filter(|&code| is_valid_close_code(code))
            .count();
        // 4 + 8 + 2000 codes.
        assert_eq!(valid, 2012);
        for code in [1004, 1005, 1006, 1015, 999, 1016, 2999, 5000, 0, u16::MAX] {
            assert!(!is_valid_close_code(code), "{code}");
        }
    }

    #[test]
    fn close_payload_is_truncated_on_a_char_boundary() {
        // 61 two-byte chars = 122 bytes, then a 4-byte char that would end
        // at byte 126 and must be dropped whole.
        let reason = format!("{}{}", "é".repeat(61), "😀");
        let mut out = [0u8; CONTROL_PAYLOAD_BYTES_MAX];
        let written = encode_close_payload(&mut out, 1000, &reason);
        assert_eq!(written, 2 + 122);
        assert!(std::str::from_utf8(&out[2..written]).is_ok());
    }
}
