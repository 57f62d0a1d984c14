//! The RFC 6455 frame codec (`protocol::ws`) from the outside: one table row
//! per protocol rule with its exact close code, property tests of round trips
//! and chunked input, and cross-checks against tungstenite as an independent
//! implementation in both directions.

use std::io::{self, Cursor, Read, Write};

use hookstream::limits::{CLIENT_MESSAGE_BYTES_MAX, FRAME_HEADER_BYTES_MAX};
use hookstream::protocol::ws::{
    encode_close_frame, encode_close_payload, encode_header, header_len, is_valid_close_code,
    unmask, unmask_bytewise, Decoder, DecoderConfig, FrameHeader, Message, Opcode, WsError,
};
use proptest::prelude::*;
use tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tungstenite::protocol::frame::Frame;
use tungstenite::protocol::{CloseFrame as TungsteniteCloseFrame, Role, WebSocket};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A decoded message copied out of the decoder's borrow, so a test can keep
/// it after the next `decode`.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Owned {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<(u16, String)>),
}

impl From<Message<'_>> for Owned {
    fn from(message: Message<'_>) -> Self {
        match message {
            Message::Text(text) => Owned::Text(text.to_owned()),
            Message::Binary(bytes) => Owned::Binary(bytes.to_vec()),
            Message::Ping(bytes) => Owned::Ping(bytes.to_vec()),
            Message::Pong(bytes) => Owned::Pong(bytes.to_vec()),
            Message::Close(close) => {
                Owned::Close(close.map(|frame| (frame.code, frame.reason.to_owned())))
            }
            Message::Compressed { .. } => {
                unreachable!("these decoders never negotiate permessage-deflate")
            }
        }
    }
}

fn from_tungstenite(message: tungstenite::Message) -> Owned {
    match message {
        tungstenite::Message::Text(text) => Owned::Text(text.as_str().to_owned()),
        tungstenite::Message::Binary(bytes) => Owned::Binary(bytes.to_vec()),
        tungstenite::Message::Ping(bytes) => Owned::Ping(bytes.to_vec()),
        tungstenite::Message::Pong(bytes) => Owned::Pong(bytes.to_vec()),
        tungstenite::Message::Close(close) => Owned::Close(
            close.map(|frame| (u16::from(frame.code), frame.reason.as_str().to_owned())),
        ),
        tungstenite::Message::Frame(_) => panic!("tungstenite never reads a raw frame"),
    }
}

fn to_tungstenite(message: &Owned) -> tungstenite::Message {
    match message {
        Owned::Text(text) => tungstenite::Message::text(text.clone()),
        Owned::Binary(bytes) => tungstenite::Message::binary(bytes.clone()),
        Owned::Ping(bytes) => tungstenite::Message::Ping(bytes.clone().into()),
        Owned::Pong(bytes) => tungstenite::Message::Pong(bytes.clone().into()),
        Owned::Close(close) => tungstenite::Message::Close(close.as_ref().map(|(code, reason)| {
            TungsteniteCloseFrame {
                code: CloseCode::from(*code),
                reason: reason.clone().into(),
            }
        })),
    }
}

fn server_config() -> DecoderConfig {
    DecoderConfig::default()
}

/// Decodes frames as a client would, from an unmasking server.
fn client_side_config() -> DecoderConfig {
    DecoderConfig {
        message_bytes_max: usize::MAX,
        require_mask: false,
    }
}

/// Fixed mask used where the mask is not the point of the test.
const MASK: [u8; 4] = [0x37, 0xFA, 0x21, 0x3D];

/// A frame built byte by byte, so that tests can also write frames the
/// encoder refuses (reserved bits and opcodes, long control frames,
/// non-minimal lengths, ...).
struct Raw {
    fin: bool,
    rsv: u8,
    opcode: u8,
    mask: Option<[u8; 4]>,
    /// Force the 16-bit (126) or 64-bit (127) length form; `None` = minimal.
    length_form: Option<u8>,
    payload: Vec<u8>,
}

impl Raw {
    fn new(opcode: u8, payload: &[u8]) -> Raw {
        Raw {
            fin: true,
            rsv: 0,
            opcode,
            mask: Some(MASK),
            length_form: None,
            payload: payload.to_vec(),
        }
    }

    fn fin(mut self, fin: bool) -> Raw {
        self.fin = fin;
        self
    }

    fn rsv(mut self, rsv: u8) -> Raw {
        self.rsv = rsv;
        self
    }

    fn unmasked(mut self) -> Raw {
        self.mask = None;
        self
    }

    fn length_form(mut self, form: u8) -> Raw {
        self.length_form = Some(form);
        self
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = vec![(u8::from(self.fin) << 7) | (self.rsv << 4) | self.opcode];
        let mask_bit = if self.mask.is_some() { 0x80 } else { 0 };
        let len = self.payload.len();
        let form = self.length_form.unwrap_or(if len < 126 {
            0
        } else if len <= 0xFFFF {
            126
        } else {
            127
        });
        match form {
            126 => {
                out.push(mask_bit | 126);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            127 => {
                out.push(mask_bit | 127);
                out.extend_from_slice(&(len as u64).to_be_bytes());
            }
            _ => out.push(mask_bit | len as u8),
        }
        let start = out.len() + if self.mask.is_some() { 4 } else { 0 };
        if let Some(mask) = self.mask {
            out.extend_from_slice(&mask);
        }
        out.extend_from_slice(&self.payload);
        if let Some(mask) = self.mask {
            unmask_bytewise(&mut out[start..], mask, 0);
        }
        out
    }
}

/// A header alone, announcing `payload_len` bytes that are not sent.
fn header_only(opcode: u8, fin: bool, payload_len: u64, masked: bool) -> Vec<u8> {
    let mut out = vec![(u8::from(fin) << 7) | opcode];
    let mask_bit = if masked { 0x80 } else { 0 };
    if payload_len < 126 {
        out.push(mask_bit | payload_len as u8);
    } else if payload_len <= 0xFFFF {
        out.push(mask_bit | 126);
        out.extend_from_slice(&(payload_len as u16).to_be_bytes());
    } else {
        out.push(mask_bit | 127);
        out.extend_from_slice(&payload_len.to_be_bytes());
    }
    if masked {
        out.extend_from_slice(&MASK);
    }
    out
}

fn concat(frames: &[Vec<u8>]) -> Vec<u8> {
    frames.concat()
}

/// Decodes a whole byte stream in one buffer. Returns the messages and
/// whether bytes were left over as an incomplete frame; stops at the first
/// error.
fn decode_all(config: DecoderConfig, bytes: &[u8]) -> Result<(Vec<Owned>, bool), WsError> {
    let mut decoder = Decoder::new(config);
    let mut buf = bytes.to_vec();
    let mut start = 0;
    let mut messages = Vec::new();
    while start < buf.len() {
        match decoder.decode(&mut buf[start..])? {
            None => return Ok((messages, true)),
            Some(decoded) => {
                assert!(decoded.consumed > 0);
                let consumed = decoded.consumed;
                messages.extend(decoded.message.map(Owned::from));
                start += consumed;
            }
        }
    }
    Ok((messages, false))
}

/// Decodes a complete stream and fails the test on an error or leftovers.
fn decode_ok(config: DecoderConfig, bytes: &[u8]) -> Vec<Owned> {
    let (messages, incomplete) = decode_all(config, bytes).expect("valid stream");
    assert!(!incomplete, "stream ended inside a frame");
    messages
}

/// Decodes a stream fed in the given chunk sizes into a read buffer that
/// drops consumed bytes, as the server does.
fn decode_chunked(config: DecoderConfig, bytes: &[u8], chunk_lens: &[usize]) -> Vec<Owned> {
    let mut decoder = Decoder::new(config);
    let mut buf: Vec<u8> = Vec::new();
    let mut messages = Vec::new();
    let mut fed = 0;
    let mut chunk_index = 0;
    while fed < bytes.len() {
        let chunk_len = chunk_lens
            .get(chunk_index)
            .copied()
            .unwrap_or(bytes.len())
            .clamp(1, bytes.len() - fed);
        chunk_index += 1;
        buf.extend_from_slice(&bytes[fed..fed + chunk_len]);
        fed += chunk_len;
        loop {
            let hint = Decoder::frame_len_hint(&buf);
            match decoder.decode(&mut buf).expect("valid stream") {
                None => {
                    if let Some(frame_len) = hint {
                        assert!(frame_len > buf.len(), "hint says the frame is complete");
                    }
                    break;
                }
                Some(decoded) => {
                    let consumed = decoded.consumed;
                    assert_eq!(hint, Some(consumed));
                    messages.extend(decoded.message.map(Owned::from));
                    buf.drain(..consumed);
                }
            }
        }
    }
    assert!(buf.is_empty(), "stream ended inside a frame");
    messages
}

/// Our encoding of one message: frames split at `splits` (byte offsets
/// modulo the length, may repeat to give empty fragments), masked when
/// `mask` is given (client frames), with a ping between fragments when
/// `pings_between` is set.
fn encode_message(
    opcode: Opcode,
    payload: &[u8],
    splits: &[usize],
    mask: Option<[u8; 4]>,
    pings_between: bool,
) -> Vec<u8> {
    let mut points: Vec<usize> = splits.iter().map(|&s| s % (payload.len() + 1)).collect();
    points.sort_unstable();
    let mut bounds = vec![0];
    bounds.extend(points);
    bounds.push(payload.len());

    let mut out = Vec::new();
    let fragments = bounds.len() - 1;
    for index in 0..fragments {
        let piece = &payload[bounds[index]..bounds[index + 1]];
        let fin = index + 1 == fragments;
        let frame_opcode = if index == 0 {
            opcode
        } else {
            Opcode::Continuation
        };
        // Vary the mask per frame so each frame's unmasking starts afresh.
        let frame_mask = mask.map(|m| [m[0] ^ index as u8, m[1], m[2], m[3]]);
        push_frame(&mut out, fin, frame_opcode, piece, frame_mask);
        if pings_between && !fin {
            push_frame(&mut out, true, Opcode::Ping, &[index as u8], frame_mask);
        }
    }
    out
}

fn push_frame(out: &mut Vec<u8>, fin: bool, opcode: Opcode, payload: &[u8], mask: Option<[u8; 4]>) {
    let mut header = [0u8; FRAME_HEADER_BYTES_MAX];
    let len = encode_header(&mut header, fin, opcode, payload.len() as u64, mask);
    out.extend_from_slice(&header[..len]);
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(mask) = mask {
        unmask(&mut out[start..], mask, 0);
    }
}

// ---------------------------------------------------------------------------
// Table: one row per rule, with its exact close code
// ---------------------------------------------------------------------------

/// What decoding a case must give.
enum Expect {
    /// Fails with this error and close code.
    Error(WsError, u16),
    /// Decodes completely to these messages.
    Messages(Vec<Owned>),
}

struct Case {
    name: String,
    config: DecoderConfig,
    bytes: Vec<u8>,
    expect: Expect,
}

fn case(name: impl Into<String>, bytes: Vec<u8>, expect: Expect) -> Case {
    Case {
        name: name.into(),
        config: server_config(),
        bytes,
        expect,
    }
}

fn text(s: &str) -> Owned {
    Owned::Text(s.to_owned())
}

fn rule_cases() -> Vec<Case> {
    use Expect::{Error, Messages};
    let mut cases = vec![
        // Masking.
        case(
            "unmasked client text",
            Raw::new(1, b"hi").unmasked().bytes(),
            Error(WsError::Unmasked, 1002),
        ),
        case(
            "unmasked client ping",
            Raw::new(9, b"").unmasked().bytes(),
            Error(WsError::Unmasked, 1002),
        ),
        Case {
            config: client_side_config(),
            ..case(
                "unmasked frame accepted when masks are not required",
                Raw::new(1, b"hi").unmasked().bytes(),
                Messages(vec![text("hi")]),
            )
        },
        // Reserved bits.
        case(
            "rsv1 without extension",
            Raw::new(1, b"hi").rsv(0b100).bytes(),
            Error(WsError::ReservedBits, 1002),
        ),
        case(
            "rsv2 without extension",
            Raw::new(2, b"hi").rsv(0b010).bytes(),
            Error(WsError::ReservedBits, 1002),
        ),
        case(
            "rsv3 on a ping",
            Raw::new(9, b"").rsv(0b001).bytes(),
            Error(WsError::ReservedBits, 1002),
        ),
        // Control frames.
        case(
            "ping of 126 bytes",
            Raw::new(9, &[0; 126]).bytes(),
            Error(WsError::ControlTooLong, 1002),
        ),
        case(
            "close of 126 bytes",
            Raw::new(8, &[0x03; 126]).bytes(),
            Error(WsError::ControlTooLong, 1002),
        ),
        case(
            "pong header announcing 64 KiB",
            header_only(10, true, 65_536, true),
            Error(WsError::ControlTooLong, 1002),
        ),
        case(
            "ping of exactly 125 bytes",
            Raw::new(9, &[7; 125]).bytes(),
            Messages(vec![Owned::Ping(vec![7; 125])]),
        ),
        case(
            "fragmented ping",
            Raw::new(9, b"a").fin(false).bytes(),
            Error(WsError::ControlFragmented, 1002),
        ),
        case(
            "fragmented close",
            Raw::new(8, &1000u16.to_be_bytes()).fin(false).bytes(),
            Error(WsError::ControlFragmented, 1002),
        ),
        case(
            "control frames between fragments",
            concat(&[
                Raw::new(1, b"Hel").fin(false).bytes(),
                Raw::new(9, b"p1").bytes(),
                Raw::new(0, b"lo").fin(false).bytes(),
                Raw::new(10, b"p2").bytes(),
                Raw::new(0, b" world").bytes(),
            ]),
            Messages(vec![
                Owned::Ping(b"p1".to_vec()),
                Owned::Pong(b"p2".to_vec()),
                text("Hello world"),
            ]),
        ),
        case(
            "close between fragments is delivered",
            concat(&[
                Raw::new(2, b"ab").fin(false).bytes(),
                Raw::new(8, &[0x03, 0xE8]).bytes(),
            ]),
            Messages(vec![Owned::Close(Some((1000, String::new())))]),
        ),
        // Fragmentation.
        case(
            "continuation without a started message",
            Raw::new(0, b"x").bytes(),
            Error(WsError::UnexpectedContinuation, 1002),
        ),
        case(
            "final continuation without a started message",
            Raw::new(0, b"").bytes(),
            Error(WsError::UnexpectedContinuation, 1002),
        ),
        case(
            "continuation after a finished fragmented message",
            concat(&[
                Raw::new(1, b"a").fin(false).bytes(),
                Raw::new(0, b"b").bytes(),
                Raw::new(0, b"c").bytes(),
            ]),
            Error(WsError::UnexpectedContinuation, 1002),
        ),
        case(
            "text inside a fragmented text",
            concat(&[
                Raw::new(1, b"a").fin(false).bytes(),
                Raw::new(1, b"b").bytes(),
            ]),
            Error(WsError::ExpectedContinuation, 1002),
        ),
        case(
            "binary inside a fragmented text",
            concat(&[
                Raw::new(1, b"a").fin(false).bytes(),
                Raw::new(2, b"b").fin(false).bytes(),
            ]),
            Error(WsError::ExpectedContinuation, 1002),
        ),
        case(
            "text inside a fragmented binary",
            concat(&[
                Raw::new(2, b"a").fin(false).bytes(),
                Raw::new(9, b"").bytes(),
                Raw::new(1, b"b").bytes(),
            ]),
            Error(WsError::ExpectedContinuation, 1002),
        ),
        case(
            "empty fragments",
            concat(&[
                Raw::new(2, b"").fin(false).bytes(),
                Raw::new(0, b"").fin(false).bytes(),
                Raw::new(0, b"").bytes(),
            ]),
            Messages(vec![Owned::Binary(Vec::new())]),
        ),
        // UTF-8.
        case(
            "text not UTF-8",
            Raw::new(1, b"ab\xFFcd").bytes(),
            Error(WsError::InvalidUtf8, 1007),
        ),
        case(
            "overlong encoding",
            Raw::new(1, b"\xC0\x80").bytes(),
            Error(WsError::InvalidUtf8, 1007),
        ),
        case(
            "UTF-16 surrogate",
            Raw::new(1, b"\xED\xA0\x80").bytes(),
            Error(WsError::InvalidUtf8, 1007),
        ),
        case(
            "code point above U+10FFFF",
            Raw::new(1, b"\xF4\x90\x80\x80").bytes(),
            Error(WsError::InvalidUtf8, 1007),
        ),
        case(
            "single text frame ending mid-code-point",
            Raw::new(1, b"caf\xC3").bytes(),
            Error(WsError::InvalidUtf8, 1007),
        ),
        case(
            "code point split across fragments",
            concat(&[
                Raw::new(1, b"caf\xC3").fin(false).bytes(),
                Raw::new(0, b"\xA9 \xF0\x9F").fin(false).bytes(),
                Raw::new(0, b"\x98").fin(false).bytes(),
                Raw::new(0, b"\x80").bytes(),
            ]),
            Messages(vec![text("café 😀")]),
        ),
        case(
            "fragmented message ending mid-code-point",
            concat(&[
                Raw::new(1, b"caf").fin(false).bytes(),
                Raw::new(0, b"\xC3").bytes(),
            ]),
            Error(WsError::InvalidUtf8, 1007),
        ),
        case(
            "invalid continuation byte across fragments",
            concat(&[
                Raw::new(1, b"\xF4").fin(false).bytes(),
                Raw::new(0, b"\x90\x80\x80").bytes(),
            ]),
            Error(WsError::InvalidUtf8, 1007),
        ),
        case(
            "binary is not checked for UTF-8",
            Raw::new(2, b"\xFF\xFE").bytes(),
            Messages(vec![Owned::Binary(b"\xFF\xFE".to_vec())]),
        ),
        // Close frames.
        case(
            "close without payload",
            Raw::new(8, b"").bytes(),
            Messages(vec![Owned::Close(None)]),
        ),
        case(
            "close payload of one byte",
            Raw::new(8, b"\x03").bytes(),
            Error(WsError::ClosePayloadOneByte, 1002),
        ),
        case(
            "close with code and reason",
            Raw::new(8, b"\x0F\xA3bye \xC3\xA9").bytes(),
            Messages(vec![Owned::Close(Some((4003, "bye é".to_owned())))]),
        ),
        case(
            "close reason not UTF-8",
            Raw::new(8, b"\x03\xE8\xFF").bytes(),
            Error(WsError::InvalidUtf8, 1007),
        ),
        // Limits.
        case(
            "single frame one byte over the limit, header only",
            header_only(1, true, CLIENT_MESSAGE_BYTES_MAX as u64 + 1, true),
            Error(WsError::MessageTooBig, 1009),
        ),
        case(
            "binary header announcing 2^62 bytes",
            header_only(2, true, 1 << 62, true),
            Error(WsError::MessageTooBig, 1009),
        ),
        case(
            "first fragment over the limit, header only",
            header_only(2, false, CLIENT_MESSAGE_BYTES_MAX as u64 + 1, true),
            Error(WsError::MessageTooBig, 1009),
        ),
        case(
            "fragments adding up past the limit, last header only",
            concat(&[
                Raw::new(2, &vec![1; CLIENT_MESSAGE_BYTES_MAX - 10])
                    .fin(false)
                    .bytes(),
                Raw::new(0, &[2; 10]).fin(false).bytes(),
                header_only(0, true, 1, true),
            ]),
            Error(WsError::MessageTooBig, 1009),
        ),
        case(
            "message of exactly the limit",
            Raw::new(2, &vec![5; CLIENT_MESSAGE_BYTES_MAX]).bytes(),
            Messages(vec![Owned::Binary(vec![5; CLIENT_MESSAGE_BYTES_MAX])]),
        ),
        case(
            "fragments adding up to exactly the limit",
            concat(&[
                Raw::new(2, &vec![1; CLIENT_MESSAGE_BYTES_MAX - 10])
                    .fin(false)
                    .bytes(),
                Raw::new(0, &[2; 10]).bytes(),
            ]),
            Messages(vec![Owned::Binary(
                [vec![1; CLIENT_MESSAGE_BYTES_MAX - 10], vec![2; 10]].concat(),
            )]),
        ),
        Case {
            config: DecoderConfig {
                message_bytes_max: 4,
                require_mask: true,
            },
            ..case(
                "configured limit",
                Raw::new(1, b"hello").bytes(),
                Error(WsError::MessageTooBig, 1009),
            )
        },
        // Lengths.
        case(
            "64-bit length with the top bit set",
            {
                let mut bytes = vec![0x82, 0x80 | 127];
                bytes.extend_from_slice(&(1u64 << 63).to_be_bytes());
                bytes.extend_from_slice(&MASK);
                bytes
            },
            Error(WsError::InvalidPayloadLength, 1002),
        ),
        case(
            "64-bit length all ones",
            {
                let mut bytes = vec![0x81, 0x80 | 127];
                bytes.extend_from_slice(&u64::MAX.to_be_bytes());
                bytes
            },
            Error(WsError::InvalidPayloadLength, 1002),
        ),
        case(
            "non-minimal 16-bit length",
            Raw::new(1, b"short").length_form(126).bytes(),
            Messages(vec![text("short")]),
        ),
        case(
            "non-minimal 64-bit length",
            Raw::new(1, b"short").length_form(127).bytes(),
            Messages(vec![text("short")]),
        ),
        case(
            "16-bit length boundary",
            Raw::new(2, &[9; 126]).bytes(),
            Messages(vec![Owned::Binary(vec![9; 126])]),
        ),
        Case {
            config: server_config_unlimited(),
            ..case(
                "64-bit length",
                Raw::new(2, &[9; 70_000]).bytes(),
                Messages(vec![Owned::Binary(vec![9; 70_000])]),
            )
        },
    ];

    for opcode in (3..=7).chain(11..=15) {
        cases.push(case(
            format!("reserved opcode {opcode}"),
            Raw::new(opcode, b"").bytes(),
            Error(WsError::ReservedOpcode, 1002),
        ));
        cases.push(case(
            format!("reserved opcode {opcode}, first byte only"),
            vec![0x80 | opcode],
            Error(WsError::ReservedOpcode, 1002),
        ));
    }
    for code in [
        0u16, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65_535,
    ] {
        cases.push(case(
            format!("close code {code}"),
            Raw::new(8, &code.to_be_bytes()).bytes(),
            Error(WsError::InvalidCloseCode, 1002),
        ));
    }
    for code in [1000u16, 1001, 1002, 1003, 1007, 1011, 1014, 3000, 4999] {
        cases.push(case(
            format!("close code {code}"),
            Raw::new(8, &code.to_be_bytes()).bytes(),
            Messages(vec![Owned::Close(Some((code, String::new())))]),
        ));
    }
    cases
}

#[test]
fn every_rule_fails_with_its_close_code() {
    let cases = rule_cases();
    assert!(cases.len() > 60);
    for case in cases {
        let result = decode_all(case.config, &case.bytes);
        match case.expect {
            Expect::Error(error, code) => {
                assert_eq!(result, Err(error), "{}", case.name);
                assert_eq!(error.close_code(), code, "{}", case.name);
            }
            Expect::Messages(messages) => {
                assert_eq!(result, Ok((messages, false)), "{}", case.name);
            }
        }
    }
}

#[test]
fn close_code_mapping_is_total() {
    let all = [
        (WsError::Unmasked, 1002),
        (WsError::ReservedBits, 1002),
        (WsError::ReservedOpcode, 1002),
        (WsError::InvalidPayloadLength, 1002),
        (WsError::ControlTooLong, 1002),
        (WsError::ControlFragmented, 1002),
        (WsError::UnexpectedContinuation, 1002),
        (WsError::ExpectedContinuation, 1002),
        (WsError::InvalidUtf8, 1007),
        (WsError::InvalidCloseCode, 1002),
        (WsError::ClosePayloadOneByte, 1002),
        (WsError::MessageTooBig, 1009),
    ];
    for (error, code) in all {
        assert_eq!(error.close_code(), code, "{error:?}");
        assert!(is_valid_close_code(error.close_code()));
    }
}

#[test]
fn bad_utf8_fails_at_the_fragment_that_carries_it() {
    // The first, non-final fragment is already invalid: the decoder must not
    // wait for the end of the message.
    let mut decoder = Decoder::new(server_config());
    let mut first = Raw::new(1, b"ok \xFF").fin(false).bytes();
    assert_eq!(decoder.decode(&mut first), Err(WsError::InvalidUtf8));

    // Invalid only in combination with the previous fragment's tail.
    let mut decoder = Decoder::new(server_config());
    let mut first = Raw::new(1, b"\xE2\x82").fin(false).bytes();
    let decoded = decoder.decode(&mut first).unwrap().unwrap();
    assert_eq!(decoded.message, None);
    let mut second = Raw::new(0, b"A rest").fin(false).bytes();
    assert_eq!(decoder.decode(&mut second), Err(WsError::InvalidUtf8));
}

#[test]
fn too_big_is_reported_before_the_payload_arrives() {
    let mut decoder = Decoder::new(server_config());
    let mut header = header_only(1, true, CLIENT_MESSAGE_BYTES_MAX as u64 + 1, true);
    assert_eq!(decoder.decode(&mut header), Err(WsError::MessageTooBig));
    // A frame within the limit with its payload missing just needs more.
    let mut decoder = Decoder::new(server_config());
    let mut header = header_only(1, true, CLIENT_MESSAGE_BYTES_MAX as u64, true);
    assert_eq!(decoder.decode(&mut header), Ok(None));
    assert_eq!(
        Decoder::frame_len_hint(&header),
        Some(header.len() + CLIENT_MESSAGE_BYTES_MAX)
    );
}

#[test]
fn reset_assembly_drops_the_open_message() {
    let mut decoder = Decoder::new(server_config());
    let mut first = Raw::new(1, b"part").fin(false).bytes();
    decoder.decode(&mut first).unwrap().unwrap();
    assert!(decoder.is_assembling());
    assert!(decoder.assembly_capacity_bytes() > 0);
    decoder.reset_assembly();
    assert!(!decoder.is_assembling());
    assert_eq!(decoder.assembly_capacity_bytes(), 0);
    let mut rest = Raw::new(0, b"rest").bytes();
    assert_eq!(
        decoder.decode(&mut rest),
        Err(WsError::UnexpectedContinuation)
    );
    // A fresh message decodes normally afterwards.
    // (`first` was unmasked in place by the first decode: build it again.)
    let mut first = Raw::new(1, b"part").fin(false).bytes();
    let mut decoder = Decoder::new(server_config());
    decoder.decode(&mut first).unwrap().unwrap();
    decoder.reset_assembly();
    let mut fresh = Raw::new(1, b"fresh").bytes();
    let decoded = decoder.decode(&mut fresh).unwrap().unwrap();
    assert_eq!(decoded.message, Some(Message::Text("fresh")));
}

#[test]
fn header_parse_reports_lengths_and_needs_more() {
    let frame = Raw::new(2, &[0; 300]).bytes();
    let (header, len) = FrameHeader::parse(&frame).unwrap().unwrap();
    assert_eq!(len, 8);
    assert_eq!(header.payload_len, 300);
    assert_eq!(header.mask, Some(MASK));
    assert_eq!(header.opcode, Opcode::Binary);
    for cut in 0..len {
        assert_eq!(FrameHeader::parse(&frame[..cut]), Ok(None), "cut {cut}");
    }
    assert_eq!(header_len(300, true), 8);
    assert_eq!(header_len(300, false), 4);
}

#[test]
fn close_frame_encoding() {
    let mut out = [0u8; 129];
    let len = encode_close_frame(&mut out, 1001, "server shutting down");
    let messages = decode_ok(client_side_config(), &out[..len]);
    assert_eq!(
        messages,
        vec![Owned::Close(Some((
            1001,
            "server shutting down".to_owned()
        )))]
    );

    // A reason far over 123 bytes is cut to fit, on a char boundary.
    let long = "ü".repeat(200);
    let len = encode_close_frame(&mut out, 4003, &long);
    assert_eq!(len, 2 + 2 + 122);
    let messages = decode_ok(client_side_config(), &out[..len]);
    assert_eq!(messages, vec![Owned::Close(Some((4003, "ü".repeat(61))))]);

    let mut payload = [0u8; 125];
    let len = encode_close_payload(&mut payload, 1000, "");
    assert_eq!(&payload[..len], &[0x03, 0xE8]);
}

// ---------------------------------------------------------------------------
// Unmasking: fast path against the byte-by-byte reference
// ---------------------------------------------------------------------------

#[test]
fn fast_unmask_equals_bytewise_for_every_length_alignment_and_offset() {
    // A small xorshift generator: deterministic, varied bytes and masks.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next_byte = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state as u8
    };
    for len in 0..=257usize {
        for alignment in 0..8usize {
            for offset in 0..4usize {
                let data: Vec<u8> = (0..alignment + len).map(|_| next_byte()).collect();
                let mask = [next_byte(), next_byte(), next_byte(), next_byte()];
                let mut fast = data.clone();
                let mut slow = data.clone();
                unmask(&mut fast[alignment..], mask, offset);
                unmask_bytewise(&mut slow[alignment..], mask, offset);
                assert_eq!(
                    fast, slow,
                    "len {len} alignment {alignment} offset {offset}"
                );
            }
        }
    }
}

proptest! {
    #[test]
    fn fast_unmask_equals_bytewise_for_any_input(
        data in proptest::collection::vec(any::<u8>(), 0..5000),
        alignment in 0usize..8,
        offset in any::<usize>(),
        mask in any::<[u8; 4]>(),
    ) {
        let alignment = alignment.min(data.len());
        let mut fast = data.clone();
        let mut slow = data;
        unmask(&mut fast[alignment..], mask, offset);
        unmask_bytewise(&mut slow[alignment..], mask, offset);
        prop_assert_eq!(fast, slow);
    }
}

// ---------------------------------------------------------------------------
// Round trips and chunked input
// ---------------------------------------------------------------------------

/// A message for property tests, with how to fragment it.
#[derive(Clone, Debug)]
struct Spec {
    message: Owned,
    splits: Vec<usize>,
    mask: [u8; 4],
    pings_between: bool,
}

fn owned_message() -> impl Strategy<Value = Owned> {
    prop_oneof![
        any::<String>().prop_map(Owned::Text),
        proptest::collection::vec(any::<u8>(), 0..3000).prop_map(Owned::Binary),
        // Long text with multi-byte characters, so splits land inside them.
        proptest::collection::vec(any::<char>(), 0..800)
            .prop_map(|chars| Owned::Text(chars.into_iter().collect())),
        proptest::collection::vec(any::<u8>(), 0..=125).prop_map(Owned::Ping),
        proptest::collection::vec(any::<u8>(), 0..=125).prop_map(Owned::Pong),
    ]
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        owned_message(),
        proptest::collection::vec(any::<usize>(), 0..6),
        any::<[u8; 4]>(),
        any::<bool>(),
    )
        .prop_map(|(message, splits, mask, pings_between)| Spec {
            message,
            splits,
            mask,
            pings_between,
        })
}

/// Encodes a spec the way a client would, and the messages a receiver must
/// see for it (pings between fragments come first).
fn encode_spec(spec: &Spec, masked: bool) -> (Vec<u8>, Vec<Owned>) {
    let mask = masked.then_some(spec.mask);
    match &spec.message {
        Owned::Text(text) => {
            let bytes = encode_message(
                Opcode::Text,
                text.as_bytes(),
                &spec.splits,
                mask,
                spec.pings_between,
            );
            (bytes, expected_with_pings(spec))
        }
        Owned::Binary(data) => {
            let bytes =
                encode_message(Opcode::Binary, data, &spec.splits, mask, spec.pings_between);
            (bytes, expected_with_pings(spec))
        }
        Owned::Ping(data) => {
            let mut bytes = Vec::new();
            push_frame(&mut bytes, true, Opcode::Ping, data, mask);
            (bytes, vec![spec.message.clone()])
        }
        Owned::Pong(data) => {
            let mut bytes = Vec::new();
            push_frame(&mut bytes, true, Opcode::Pong, data, mask);
            (bytes, vec![spec.message.clone()])
        }
        Owned::Close(_) => unreachable!("specs hold no close"),
    }
}

fn expected_with_pings(spec: &Spec) -> Vec<Owned> {
    // `encode_message` keeps repeated split points, so there is always one
    // fragment more than split points.
    let fragments = spec.splits.len() + 1;
    let mut expected = Vec::new();
    if spec.pings_between {
        for index in 0..fragments - 1 {
            expected.push(Owned::Ping(vec![index as u8]));
        }
    }
    expected.push(spec.message.clone());
    expected
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn client_frames_round_trip_through_the_decoder(spec in spec()) {
        let (bytes, expected) = encode_spec(&spec, true);
        let messages = decode_ok(server_config_unlimited(), &bytes);
        prop_assert_eq!(messages, expected);
    }

    #[test]
    fn server_frames_round_trip_through_the_decoder(spec in spec()) {
        let (bytes, expected) = encode_spec(&spec, false);
        let messages = decode_ok(client_side_config(), &bytes);
        prop_assert_eq!(messages, expected);
    }

    #[test]
    fn chunk_boundaries_do_not_change_the_messages(
        specs in proptest::collection::vec(spec(), 1..6),
        chunk_lens in proptest::collection::vec(1usize..200, 0..200),
    ) {
        let mut bytes = Vec::new();
        for spec in &specs {
            bytes.extend(encode_spec(spec, true).0);
        }
        let whole = decode_ok(server_config_unlimited(), &bytes);
        let chunked = decode_chunked(server_config_unlimited(), &bytes, &chunk_lens);
        prop_assert_eq!(&chunked, &whole);
        // One byte at a time, the hardest split.
        let bytewise = decode_chunked(server_config_unlimited(), &bytes, &vec![1; bytes.len()]);
        prop_assert_eq!(bytewise, whole);
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
        require_mask in any::<bool>(),
    ) {
        let config = DecoderConfig { message_bytes_max: 256, require_mask };
        let _ = decode_all(config, &bytes);
        let _ = Decoder::frame_len_hint(&bytes);
    }
}

fn server_config_unlimited() -> DecoderConfig {
    DecoderConfig {
        message_bytes_max: 1 << 20,
        require_mask: true,
    }
}

// ---------------------------------------------------------------------------
// tungstenite cross-checks
// ---------------------------------------------------------------------------

/// An in-memory stream: reads from `input`, writes to `output`, so that
/// tungstenite's automatic replies (pong, close) do not overwrite unread
/// input as they would with a single `Cursor`.
struct Duplex {
    input: Cursor<Vec<u8>>,
    output: Vec<u8>,
}

impl Read for Duplex {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Duplex {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The bytes tungstenite, as a client, writes for these messages.
fn tungstenite_client_bytes(messages: &[Owned]) -> Vec<u8> {
    let stream = Duplex {
        input: Cursor::new(Vec::new()),
        output: Vec::new(),
    };
    let mut socket = WebSocket::from_raw_socket(stream, Role::Client, None);
    for message in messages {
        socket
            .send(to_tungstenite(message))
            .expect("in-memory send");
    }
    socket.get_ref().output.clone()
}

/// Reads `count` messages with tungstenite as a client from our bytes.
fn tungstenite_client_reads(bytes: Vec<u8>, count: usize) -> Vec<Owned> {
    let stream = Duplex {
        input: Cursor::new(bytes),
        output: Vec::new(),
    };
    let mut socket = WebSocket::from_raw_socket(stream, Role::Client, None);
    let mut messages = Vec::new();
    for _ in 0..count {
        let message = socket.read().expect("tungstenite accepts our frames");
        messages.push(from_tungstenite(message));
    }
    // Nothing is left over.
    assert_eq!(
        socket.get_ref().input.position() as usize,
        socket.get_ref().input.get_ref().len()
    );
    messages
}

/// A tungstenite frame, masked as a client sends it.
fn tungstenite_frame(opcode: OpCode, fin: bool, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut frame = Frame::message(payload.to_vec(), opcode, fin);
    frame.header_mut().mask = Some(mask);
    let mut out = Vec::new();
    frame.format(&mut out).expect("in-memory format");
    out
}

#[test]
fn tungstenite_client_messages_decode_to_the_same_messages() {
    let messages = vec![
        text("hello"),
        text(""),
        text("ünïcödé 😀 across a frame"),
        Owned::Binary(vec![0, 1, 2, 255]),
        Owned::Ping(b"are you there".to_vec()),
        Owned::Pong(vec![]),
        text(&"x".repeat(126)),
        text(&"y".repeat(65_535)),
        Owned::Binary(vec![7; 40_000]),
        Owned::Close(Some((1000, "done".to_owned()))),
    ];
    let bytes = tungstenite_client_bytes(&messages);
    assert_eq!(decode_ok(server_config(), &bytes), messages);
    assert_eq!(
        decode_chunked(server_config(), &bytes, &[1, 2, 3, 5, 8, 13, 1000]),
        messages
    );
}

#[test]
fn tungstenite_close_without_code_decodes() {
    let bytes = tungstenite_client_bytes(&[Owned::Close(None)]);
    assert_eq!(decode_ok(server_config(), &bytes), vec![Owned::Close(None)]);
}

#[test]
fn tungstenite_fragmented_frames_decode_to_the_same_message() {
    let mask = [1, 2, 3, 4];
    let text_bytes = "Grüße, 世界! 😀".as_bytes();
    // Split inside "ü" (bytes 2..4) and inside "😀".
    let bytes = concat(&[
        tungstenite_frame(OpCode::Data(Data::Text), false, &text_bytes[..3], mask),
        {
            let mut ping = Frame::ping(b"mid".to_vec());
            ping.header_mut().mask = Some(mask);
            let mut out = Vec::new();
            ping.format(&mut out).unwrap();
            out
        },
        tungstenite_frame(
            OpCode::Data(Data::Continue),
            false,
            &text_bytes[3..text_bytes.len() - 2],
            mask,
        ),
        tungstenite_frame(
            OpCode::Data(Data::Continue),
            true,
            &text_bytes[text_bytes.len() - 2..],
            mask,
        ),
    ]);
    assert_eq!(
        decode_ok(server_config(), &bytes),
        vec![Owned::Ping(b"mid".to_vec()), text("Grüße, 世界! 😀")]
    );
}

#[test]
fn tungstenite_client_message_over_the_limit_fails_with_1009() {
    let bytes = tungstenite_client_bytes(&[Owned::Binary(vec![1; CLIENT_MESSAGE_BYTES_MAX + 1])]);
    // Only the header is needed to refuse it.
    let error = decode_all(server_config(), &bytes[..14]).unwrap_err();
    assert_eq!(error, WsError::MessageTooBig);
    assert_eq!(error.close_code(), 1009);
    // With a larger configured limit it decodes.
    let config = DecoderConfig {
        message_bytes_max: 1 << 20,
        require_mask: true,
    };
    assert_eq!(
        decode_ok(config, &bytes),
        vec![Owned::Binary(vec![1; CLIENT_MESSAGE_BYTES_MAX + 1])]
    );
}

#[test]
fn tungstenite_reads_our_server_frames() {
    let big_text: String = "0123456789abcdé".chars().cycle().take(70_000).collect();
    let mut bytes = Vec::new();
    let mut expected = Vec::new();
    for payload_len in [0usize, 1, 125, 126, 65_535, 65_536, 300_000] {
        let payload: Vec<u8> = (0..payload_len).map(|i| i as u8).collect();
        push_frame(&mut bytes, true, Opcode::Binary, &payload, None);
        expected.push(Owned::Binary(payload));
    }
    push_frame(&mut bytes, true, Opcode::Text, br#"{"type":"pong"}"#, None);
    expected.push(text(r#"{"type":"pong"}"#));
    // A fragmented text over 64 KiB, split inside code points.
    bytes.extend(encode_message(
        Opcode::Text,
        big_text.as_bytes(),
        &[13, 40_001, 65_537],
        None,
        true,
    ));
    expected.extend([
        Owned::Ping(vec![0]),
        Owned::Ping(vec![1]),
        Owned::Ping(vec![2]),
        Owned::Text(big_text.clone()),
    ]);
    push_frame(&mut bytes, true, Opcode::Pong, b"hb", None);
    expected.push(Owned::Pong(b"hb".to_vec()));
    let mut close = [0u8; 129];
    let close_len = encode_close_frame(&mut close, 1013, "slow consumer");
    bytes.extend_from_slice(&close[..close_len]);
    expected.push(Owned::Close(Some((1013, "slow consumer".to_owned()))));

    let count = expected.len();
    assert_eq!(tungstenite_client_reads(bytes.clone(), count), expected);
    // Our own decoder, as a client, agrees.
    assert_eq!(decode_ok(client_side_config(), &bytes), expected);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn tungstenite_reads_any_fragmentation_we_encode(spec in spec()) {
        let (bytes, expected) = encode_spec(&spec, false);
        let count = expected.len();
        prop_assert_eq!(tungstenite_client_reads(bytes, count), expected);
    }

    #[test]
    fn we_decode_any_message_tungstenite_sends(
        messages in proptest::collection::vec(owned_message(), 1..8),
        chunk_lens in proptest::collection::vec(1usize..300, 0..100),
    ) {
        let bytes = tungstenite_client_bytes(&messages);
        prop_assert_eq!(&decode_ok(server_config(), &bytes), &messages);
        prop_assert_eq!(&decode_chunked(server_config(), &bytes, &chunk_lens), &messages);
    }

    #[test]
    fn we_decode_any_fragmentation_tungstenite_formats(
        text in proptest::collection::vec(any::<char>(), 0..300)
            .prop_map(|chars| chars.into_iter().collect::<String>()),
        splits in proptest::collection::vec(any::<usize>(), 0..6),
        mask in any::<[u8; 4]>(),
    ) {
        let payload = text.as_bytes();
        let mut points: Vec<usize> = splits.iter().map(|&s| s % (payload.len() + 1)).collect();
        points.sort_unstable();
        let mut bounds = vec![0];
        bounds.extend(points);
        bounds.push(payload.len());
        let mut bytes = Vec::new();
        let fragments = bounds.len() - 1;
        for index in 0..fragments {
            let opcode = if index == 0 {
                OpCode::Data(Data::Text)
            } else {
                OpCode::Data(Data::Continue)
            };
            let fin = index + 1 == fragments;
            bytes.extend(tungstenite_frame(opcode, fin, &payload[bounds[index]..bounds[index + 1]], mask));
        }
        prop_assert_eq!(decode_ok(server_config(), &bytes), vec![Owned::Text(text)]);
    }
}
