//! The per-connection frame decoder: header checks, in-place unmasking,
//! incremental UTF-8 validation and assembly of fragmented messages.

use super::{is_valid_close_code, unmask, CloseFrame, FrameHeader, Opcode, WsError};

/// RSV1 among [`FrameHeader::rsv`]'s three bits.
const RSV1: u8 = 0b100;
use crate::limits::{CLIENT_MESSAGE_BYTES_MAX, CONTROL_PAYLOAD_BYTES_MAX};

/// Limits and role of one [`Decoder`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecoderConfig {
    /// Largest message, one frame or assembled from fragments, in payload
    /// bytes; a larger one fails the connection with 1009 as soon as a
    /// header announces it. Defaults to `CLIENT_MESSAGE_BYTES_MAX`.
    pub message_bytes_max: usize,
    /// Whether frames must be masked: true on the server, which must fail
    /// unmasked client frames; false lets tests decode server frames.
    pub require_mask: bool,
}

impl Default for DecoderConfig {
    fn default() -> Self {
        DecoderConfig {
            message_bytes_max: CLIENT_MESSAGE_BYTES_MAX,
            require_mask: true,
        }
    }
}

/// A complete message (or control frame). Borrows from the caller's read
/// buffer when it arrived in one frame, from the decoder when it was
/// assembled from fragments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// A text message, checked to be UTF-8.
    Text(&'a str),
    /// A binary message.
    Binary(&'a [u8]),
    /// A ping; the caller answers with a pong carrying the same bytes.
    Ping(&'a [u8]),
    /// A pong, answering our heartbeat ping.
    Pong(&'a [u8]),
    /// A close frame; `None` when it carried no payload (no status code).
    Close(Option<CloseFrame<'a>>),
    /// A message compressed under permessage-deflate (RSV1 on its first
    /// frame; only with [`Decoder::set_deflate`]): its payload as received,
    /// to inflate (`protocol::deflate::Inflater`), and whether it is binary.
    /// Text is checked for UTF-8 after inflation, not here.
    Compressed {
        /// True for a binary message, false for text.
        binary: bool,
        /// The compressed payload, without the tail RFC 7692 §7.2.1 removes.
        payload: &'a [u8],
    },
}

/// The result of decoding one complete frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decoded<'a> {
    /// Bytes of the read buffer the frame took (header and payload); the
    /// caller drops them before decoding the next frame.
    pub consumed: usize,
    /// The message the frame completed; `None` after a non-final fragment.
    pub message: Option<Message<'a>>,
}

/// Where the decoder is in a fragmented message. Control frames may come
/// between fragments and do not change it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Assembly {
    /// No fragmented message is open; `assembly` is empty.
    Idle,
    /// A fragmented text message is open. The first `utf8_valid_bytes` of
    /// `assembly` are known to be valid UTF-8; the rest (at most three bytes)
    /// is the start of a code point whose remaining bytes are in the next
    /// fragment.
    Text {
        /// Length of the validated prefix of `assembly`.
        utf8_valid_bytes: usize,
    },
    /// A fragmented binary message is open.
    Binary,
    /// A fragmented compressed message is open (text or binary); its UTF-8
    /// is checked once it is inflated.
    Compressed {
        /// True for a binary message.
        binary: bool,
    },
    /// The last `decode` handed out the assembled message by reference; the
    /// next `decode` clears it (it cannot be cleared while borrowed).
    Delivered,
}

/// Decodes the frames of one connection. Holds only what must survive
/// between frames: the state of a fragmented message and its bytes.
#[derive(Debug)]
pub struct Decoder {
    /// Limits and role, fixed for the connection.
    config: DecoderConfig,
    /// Whether permessage-deflate was negotiated: RSV1 on the first frame
    /// of a data message then means "compressed" instead of an error.
    deflate: bool,
    /// Whether a fragmented message is open, and of which kind.
    state: Assembly,
    /// Payload of the open fragmented message. Empty (and usually without
    /// capacity) for the common unfragmented case; its capacity is kept
    /// after a message for the next one until `reset_assembly` frees it,
    /// and never grows past `config.message_bytes_max`.
    assembly: Vec<u8>,
}

impl Decoder {
    /// A decoder with nothing assembled; allocates nothing.
    pub fn new(config: DecoderConfig) -> Self {
        Decoder {
            config,
            deflate: false,
            state: Assembly::Idle,
            assembly: Vec::new(),
        }
    }

    /// Accepts compressed messages (RSV1 on a message's first frame), for a
    /// connection that negotiated permessage-deflate.
    pub fn set_deflate(&mut self, deflate: bool) {
        self.deflate = deflate;
    }

    /// The configuration the decoder was made with.
    pub fn config(&self) -> DecoderConfig {
        self.config
    }

    /// Whether a fragmented message has been started but not finished.
    pub fn is_assembling(&self) -> bool {
        match self.state {
            Assembly::Text { .. } | Assembly::Binary | Assembly::Compressed { .. } => true,
            Assembly::Idle | Assembly::Delivered => false,
        }
    }

    /// Bytes held for assembling fragmented messages (capacity, not length),
    /// for memory accounting.
    pub fn assembly_capacity_bytes(&self) -> usize {
        self.assembly.capacity()
    }

    /// Decodes at most one frame from the front of `buf` (the caller's read
    /// buffer), unmasking its payload in place.
    ///
    /// - `Ok(None)`: the frame is not complete in `buf` yet; nothing was
    ///   changed, the caller reads more (see [`Decoder::frame_len_hint`]) and
    ///   calls again with the same bytes in front.
    /// - `Ok(Some(decoded))`: `decoded.consumed` bytes were used;
    ///   `decoded.message` is `Some` when a whole message or a control frame
    ///   is complete, `None` after a non-final fragment. A message that came
    ///   in one frame borrows from `buf`: no copy, no allocation.
    /// - `Err(e)`: the peer broke the protocol; fail the connection with
    ///   `e.close_code()`. A header announcing a payload (or an assembled
    ///   message) over `message_bytes_max` is an error at once, before the
    ///   payload arrives.
    pub fn decode<'a>(&'a mut self, buf: &'a mut [u8]) -> Result<Option<Decoded<'a>>, WsError> {
        if self.state == Assembly::Delivered {
            // The previous message's borrow ended when this call began.
            self.assembly.clear();
            self.state = Assembly::Idle;
        }

        let Some((header, header_len)) = FrameHeader::parse(buf)? else {
            return Ok(None);
        };
        self.check_header(&header)?;
        // check_header bounded the length by the message limit (a usize) or
        // by 125 for control frames, so neither conversion can fail.
        let payload_len =
            usize::try_from(header.payload_len).map_err(|_| WsError::MessageTooBig)?;
        let frame_len = header_len
            .checked_add(payload_len)
            .ok_or(WsError::MessageTooBig)?;
        if buf.len() < frame_len {
            return Ok(None);
        }

        let compressed = header.rsv & RSV1 != 0;
        let payload = &mut buf[header_len..frame_len];
        if let Some(mask) = header.mask {
            unmask(payload, mask, 0);
        }
        let payload: &'a [u8] = payload;

        let message = match header.opcode {
            Opcode::Ping => Some(Message::Ping(payload)),
            Opcode::Pong => Some(Message::Pong(payload)),
            Opcode::Close => Some(Message::Close(parse_close_payload(payload)?)),
            Opcode::Text | Opcode::Binary if header.fin && compressed => {
                debug_assert!(self.state == Assembly::Idle);
                Some(Message::Compressed {
                    binary: header.opcode == Opcode::Binary,
                    payload,
                })
            }
            Opcode::Text | Opcode::Binary if header.fin => {
                debug_assert!(self.state == Assembly::Idle);
                Some(single_frame_message(header.opcode, payload)?)
            }
            Opcode::Text | Opcode::Binary | Opcode::Continuation => {
                self.add_fragment(header.opcode, compressed, payload)?;
                if header.fin {
                    Some(self.finish_assembly()?)
                } else {
                    None
                }
            }
        };
        Ok(Some(Decoded {
            consumed: frame_len,
            message,
        }))
    }

    /// Total bytes (header and payload) of the frame starting at `buf[0]`,
    /// once its header is complete, so the caller can size its read buffer.
    /// `None` while the header is incomplete, or when the header is invalid
    /// or too long to address (then `decode` reports the error).
    pub fn frame_len_hint(buf: &[u8]) -> Option<usize> {
        match FrameHeader::parse(buf) {
            Ok(Some((header, header_len))) => usize::try_from(header.payload_len)
                .ok()?
                .checked_add(header_len),
            Ok(None) | Err(_) => None,
        }
    }

    /// The fragmented message open in this decoder, for a hot upgrade
    /// (`handoff::OpenMessage`): its kind (1 text, 2 binary, 3 compressed
    /// text, 4 compressed binary), the bytes of a text known to be valid
    /// UTF-8, and the payload assembled so far.
    pub fn open_message(&self) -> Option<(u8, usize, &[u8])> {
        match self.state {
            Assembly::Text { utf8_valid_bytes } => Some((1, utf8_valid_bytes, &self.assembly)),
            Assembly::Binary => Some((2, 0, &self.assembly)),
            Assembly::Compressed { binary: false } => Some((3, 0, &self.assembly)),
            Assembly::Compressed { binary: true } => Some((4, 0, &self.assembly)),
            Assembly::Idle | Assembly::Delivered => None,
        }
    }

    /// Reopens a fragmented message written out by [`Decoder::open_message`]
    /// in another process; false (nothing changed) for a kind it does not
    /// know or a payload past the message limit.
    pub fn restore_open_message(
        &mut self,
        kind: u8,
        utf8_valid_bytes: usize,
        bytes: Vec<u8>,
    ) -> bool {
        if bytes.len() > self.config.message_bytes_max || utf8_valid_bytes > bytes.len() {
            return false;
        }
        self.state = match kind {
            1 => Assembly::Text { utf8_valid_bytes },
            2 => Assembly::Binary,
            3 => Assembly::Compressed { binary: false },
            4 => Assembly::Compressed { binary: true },
            _ => return false,
        };
        self.assembly = bytes;
        true
    }

    /// Drops a partly assembled message and frees its buffer, e.g. when a
    /// connection goes idle. A continuation of the dropped message that
    /// arrives later is then a protocol error (1002), so call this only
    /// when the caller is willing to fail such a peer.
    pub fn reset_assembly(&mut self) {
        self.assembly = Vec::new();
        self.state = Assembly::Idle;
    }

    /// Every check that needs only the header, so that a bad or oversized
    /// frame fails before its payload arrives.
    fn check_header(&self, header: &FrameHeader) -> Result<(), WsError> {
        // RSV1 is permessage-deflate's, and only on the first frame of a
        // data message (RFC 7692 §6.1): never on a control frame or a
        // continuation, never without the extension. RSV2-3 are never used.
        let rsv1_allowed = self.deflate && matches!(header.opcode, Opcode::Text | Opcode::Binary);
        if header.rsv & !RSV1 != 0 || (header.rsv & RSV1 != 0 && !rsv1_allowed) {
            return Err(WsError::ReservedBits);
        }
        if self.config.require_mask && header.mask.is_none() {
            return Err(WsError::Unmasked);
        }
        if header.opcode.is_control() {
            if !header.fin {
                return Err(WsError::ControlFragmented);
            }
            if header.payload_len > CONTROL_PAYLOAD_BYTES_MAX as u64 {
                return Err(WsError::ControlTooLong);
            }
            return Ok(());
        }

        let assembled_bytes = match (header.opcode, self.state) {
            (Opcode::Continuation, Assembly::Idle | Assembly::Delivered) => {
                return Err(WsError::UnexpectedContinuation);
            }
            (
                Opcode::Text | Opcode::Binary,
                Assembly::Text { .. } | Assembly::Binary | Assembly::Compressed { .. },
            ) => {
                return Err(WsError::ExpectedContinuation);
            }
            (
                Opcode::Continuation,
                Assembly::Text { .. } | Assembly::Binary | Assembly::Compressed { .. },
            ) => self.assembly.len(),
            (Opcode::Text | Opcode::Binary, Assembly::Idle | Assembly::Delivered) => 0,
            (Opcode::Close | Opcode::Ping | Opcode::Pong, _) => {
                unreachable!("control opcodes returned above")
            }
        };
        debug_assert!(assembled_bytes <= self.config.message_bytes_max);
        let room_bytes = self.config.message_bytes_max - assembled_bytes;
        if header.payload_len > room_bytes as u64 {
            return Err(WsError::MessageTooBig);
        }
        Ok(())
    }

    /// Appends a non-final first fragment or a continuation to the open
    /// message, validating text as it arrives so that bad UTF-8 fails the
    /// connection at the fragment that carries it.
    fn add_fragment(
        &mut self,
        opcode: Opcode,
        compressed: bool,
        payload: &[u8],
    ) -> Result<(), WsError> {
        match opcode {
            Opcode::Text | Opcode::Binary if compressed => {
                self.state = Assembly::Compressed {
                    binary: opcode == Opcode::Binary,
                }
            }
            Opcode::Text => {
                self.state = Assembly::Text {
                    utf8_valid_bytes: 0,
                }
            }
            Opcode::Binary => self.state = Assembly::Binary,
            Opcode::Continuation => {}
            Opcode::Close | Opcode::Ping | Opcode::Pong => {
                unreachable!("control frames are never assembled")
            }
        }
        debug_assert!(self.is_assembling());
        self.append(payload);

        if let Assembly::Text { utf8_valid_bytes } = self.state {
            let unchecked = &self.assembly[utf8_valid_bytes..];
            let valid_bytes = match std::str::from_utf8(unchecked) {
                Ok(_) => unchecked.len(),
                // `error_len() == None`: the bytes end inside a code point
                // that may be completed by the next fragment.
                Err(error) if error.error_len().is_none() => error.valid_up_to(),
                Err(_) => return Err(WsError::InvalidUtf8),
            };
            self.state = Assembly::Text {
                utf8_valid_bytes: utf8_valid_bytes + valid_bytes,
            };
        }
        Ok(())
    }

    /// Copies a fragment's payload into the assembly buffer, growing it by
    /// doubling but never past the message limit, so many small fragments
    /// cannot make a connection hold twice the limit.
    fn append(&mut self, payload: &[u8]) {
        let needed_bytes = self.assembly.len() + payload.len();
        debug_assert!(needed_bytes <= self.config.message_bytes_max);
        if needed_bytes > self.assembly.capacity() {
            let target_bytes = needed_bytes
                .max(self.assembly.capacity().saturating_mul(2))
                .min(self.config.message_bytes_max);
            debug_assert!(target_bytes >= needed_bytes);
            self.assembly
                .reserve_exact(target_bytes - self.assembly.len());
        }
        self.assembly.extend_from_slice(payload);
    }

    /// Hands out the assembled message after its final fragment.
    fn finish_assembly(&mut self) -> Result<Message<'_>, WsError> {
        let state = self.state;
        self.state = Assembly::Delivered;
        match state {
            Assembly::Text { utf8_valid_bytes } => {
                if utf8_valid_bytes != self.assembly.len() {
                    // The message ends inside a code point.
                    return Err(WsError::InvalidUtf8);
                }
                // Already validated piece by piece; this second pass keeps
                // the module free of `unsafe` (`from_utf8_unchecked`) and
                // only runs for fragmented messages, which are rare.
                let text = std::str::from_utf8(&self.assembly).map_err(|_| WsError::InvalidUtf8)?;
                Ok(Message::Text(text))
            }
            Assembly::Binary => Ok(Message::Binary(&self.assembly)),
            Assembly::Compressed { binary } => Ok(Message::Compressed {
                binary,
                payload: &self.assembly,
            }),
            Assembly::Idle | Assembly::Delivered => {
                unreachable!("check_header admits a continuation only into an open message")
            }
        }
    }
}

/// A text or binary message that came in one frame, borrowed in place.
fn single_frame_message(opcode: Opcode, payload: &[u8]) -> Result<Message<'_>, WsError> {
    match opcode {
        Opcode::Text => std::str::from_utf8(payload)
            .map(Message::Text)
            .map_err(|_| WsError::InvalidUtf8),
        Opcode::Binary => Ok(Message::Binary(payload)),
        Opcode::Continuation | Opcode::Close | Opcode::Ping | Opcode::Pong => {
            unreachable!("only called for a final text or binary frame")
        }
    }
}

/// Checks a received close payload: empty, or a valid code and a UTF-8
/// reason (RFC 6455 §5.5.1, §7.4).
fn parse_close_payload(payload: &[u8]) -> Result<Option<CloseFrame<'_>>, WsError> {
    match payload {
        [] => Ok(None),
        [_] => Err(WsError::ClosePayloadOneByte),
        [high, low, reason @ ..] => {
            let code = u16::from_be_bytes([*high, *low]);
            if !is_valid_close_code(code) {
                return Err(WsError::InvalidCloseCode);
            }
            let reason = std::str::from_utf8(reason).map_err(|_| WsError::InvalidUtf8)?;
            Ok(Some(CloseFrame { code, reason }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ws::encode_header;

    fn client_frame(fin: bool, opcode: Opcode, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xFA, 0x21, 0x3D];
        let mut header = [0u8; 14];
        let header_len = encode_header(&mut header, fin, opcode, payload.len() as u64, Some(mask));
        let mut frame = header[..header_len].to_vec();
        let start = frame.len();
        frame.extend_from_slice(payload);
        unmask(&mut frame[start..], mask, 0);
        frame
    }

    #[test]
    fn single_frame_text_borrows_from_the_buffer() {
        let mut frame = client_frame(true, Opcode::Text, b"Hello");
        let frame_len = frame.len();
        let buf_start = frame.as_ptr() as usize;
        let mut decoder = Decoder::new(DecoderConfig::default());
        let decoded = decoder.decode(&mut frame).unwrap().unwrap();
        assert_eq!(decoded.consumed, frame_len);
        let Some(Message::Text(text)) = decoded.message else {
            panic!("expected text, got {decoded:?}");
        };
        assert_eq!(text, "Hello");
        let text_start = text.as_ptr() as usize;
        assert!(text_start >= buf_start && text_start < buf_start + frame_len);
        assert_eq!(decoder.assembly_capacity_bytes(), 0);
    }

    #[test]
    fn utf8_split_across_fragments_is_kept_incrementally() {
        // "é" is C3 A9; split between the two fragments.
        let mut decoder = Decoder::new(DecoderConfig::default());
        let mut first = client_frame(false, Opcode::Text, b"caf\xC3");
        let decoded = decoder.decode(&mut first).unwrap().unwrap();
        assert_eq!(decoded.message, None);
        assert_eq!(
            decoder.state,
            Assembly::Text {
                utf8_valid_bytes: 3
            }
        );
        let mut second = client_frame(true, Opcode::Continuation, b"\xA9!");
        let decoded = decoder.decode(&mut second).unwrap().unwrap();
        assert_eq!(decoded.message, Some(Message::Text("café!")));
        // The assembled message is cleared on the next call.
        let mut ping = client_frame(true, Opcode::Ping, b"");
        decoder.decode(&mut ping).unwrap().unwrap();
        assert_eq!(decoder.state, Assembly::Idle);
        assert!(decoder.assembly.is_empty());
    }

    #[test]
    fn assembly_never_grows_past_the_limit() {
        let config = DecoderConfig {
            message_bytes_max: 1000,
            require_mask: true,
        };
        let mut decoder = Decoder::new(config);
        let mut first = client_frame(false, Opcode::Binary, &[1; 600]);
        decoder.decode(&mut first).unwrap().unwrap();
        let mut second = client_frame(true, Opcode::Continuation, &[2; 400]);
        decoder.decode(&mut second).unwrap().unwrap();
        assert_eq!(decoder.assembly_capacity_bytes(), 1000);
        decoder.reset_assembly();
        assert_eq!(decoder.assembly_capacity_bytes(), 0);
    }

    fn with_rsv1(mut frame: Vec<u8>) -> Vec<u8> {
        frame[0] |= 0x40;
        frame
    }

    #[test]
    fn rsv1_is_a_compressed_message_only_with_deflate_and_only_on_a_first_frame() {
        let mut plain = Decoder::new(DecoderConfig::default());
        let mut frame = with_rsv1(client_frame(true, Opcode::Text, b"xyz"));
        assert_eq!(plain.decode(&mut frame), Err(WsError::ReservedBits));

        let mut deflate = Decoder::new(DecoderConfig::default());
        deflate.set_deflate(true);
        let mut frame = with_rsv1(client_frame(true, Opcode::Text, b"\xff\x00"));
        let decoded = deflate.decode(&mut frame).unwrap().unwrap();
        assert_eq!(
            decoded.message,
            Some(Message::Compressed {
                binary: false,
                payload: b"\xff\x00"
            })
        );
        // Fragmented: RSV1 on the first frame, the bytes assembled as they
        // are (no UTF-8 check before inflation).
        let mut first = with_rsv1(client_frame(false, Opcode::Binary, b"\xc3"));
        assert_eq!(deflate.decode(&mut first).unwrap().unwrap().message, None);
        let mut last = client_frame(true, Opcode::Continuation, b"\x28");
        assert_eq!(
            deflate.decode(&mut last).unwrap().unwrap().message,
            Some(Message::Compressed {
                binary: true,
                payload: b"\xc3\x28"
            })
        );
        // Never on a continuation, a control frame, or RSV2/RSV3.
        let mut first = client_frame(false, Opcode::Text, b"a");
        deflate.decode(&mut first).unwrap();
        let mut last = with_rsv1(client_frame(true, Opcode::Continuation, b"b"));
        assert_eq!(deflate.decode(&mut last), Err(WsError::ReservedBits));
        let mut deflate = Decoder::new(DecoderConfig::default());
        deflate.set_deflate(true);
        let mut ping = with_rsv1(client_frame(true, Opcode::Ping, b""));
        assert_eq!(deflate.decode(&mut ping), Err(WsError::ReservedBits));
        let mut rsv2 = client_frame(true, Opcode::Text, b"a");
        rsv2[0] |= 0x20;
        assert_eq!(deflate.decode(&mut rsv2), Err(WsError::ReservedBits));
    }

    #[test]
    fn incomplete_frame_changes_nothing() {
        let frame = client_frame(true, Opcode::Text, b"Hello");
        let mut decoder = Decoder::new(DecoderConfig::default());
        for cut in 0..frame.len() {
            let mut partial = frame[..cut].to_vec();
            assert_eq!(decoder.decode(&mut partial), Ok(None));
            assert_eq!(partial, frame[..cut]);
        }
        assert_eq!(Decoder::frame_len_hint(&frame[..6]), Some(frame.len()));
        assert_eq!(Decoder::frame_len_hint(&frame[..5]), None);
    }
}
