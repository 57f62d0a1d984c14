//! The checks behind the fuzz targets, one public function per target. They
//! panic on any broken property, which libFuzzer reports as a crash.
//!
//! This file is also compiled into `tests/fuzz_corpus.rs` (through
//! `#[path]`), which replays every saved input in `tools/fuzz/corpus/` under
//! a plain `cargo test`: the corpus is a regression suite that needs neither
//! libFuzzer nor a nightly compiler. So it depends only on `hookstream` and
//! `httparse`, which the main crate's tests can use too.

use hookstream::limits::{
    CLIENT_MESSAGE_BYTES_MAX, CONTROL_PAYLOAD_BYTES_MAX, HEADERS_MAX, HEAD_BYTES_MAX,
    PUBLISH_BODY_BYTES_MAX,
};
use hookstream::protocol::http::{
    accept_key, parse_head, validate_upgrade, write_http_error, write_switching_protocols,
    HttpError, ACCEPT_KEY_LEN, SWITCHING_PROTOCOLS_LEN_MAX,
};
use hookstream::protocol::ws::{
    is_valid_close_code, unmask, unmask_bytewise, Decoder, DecoderConfig, Message, WsError,
    CLOSE_REASON_BYTES_MAX,
};

/// Length of a `Sec-WebSocket-Key`: base64 of 16 bytes, padded.
const WEBSOCKET_KEY_LEN: usize = 24;

/// `request_head`: the whole input is the bytes a client sent.
///
/// Parses it at once, then again growing one byte at a time the way a server
/// sees a slow client, and checks that the first answer that is not "need
/// more" is the same answer (the same head, or the same error), and that
/// `validate_upgrade` agrees on both. Every answer is then written out (the
/// 101 or the error response) and read back with httparse.
pub fn check_request_head(data: &[u8]) {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let whole = parse_head(data, &mut headers, PUBLISH_BODY_BYTES_MAX);
    let whole_upgrade = match &whole {
        Ok(Some(head)) => {
            assert!(head.head_len <= data.len());
            assert!(head.head_len <= HEAD_BYTES_MAX);
            assert!(data[..head.head_len].ends_with(b"\n"));
            assert!(head.headers.len() <= HEADERS_MAX);
            assert!(!head.host.is_empty());
            assert!(head.content_length <= PUBLISH_BODY_BYTES_MAX);
            // The helpers a server calls on any head must not panic.
            let _ = head.query_param("token");
            let _ = head.expects_continue();
            let _ = head.connection_close();
            check_deflate_negotiation(head);
            Some(validate_upgrade(head))
        }
        Ok(None) => {
            assert!(data.len() < HEAD_BYTES_MAX);
            None
        }
        Err(error) => {
            check_error_response(*error);
            None
        }
    };
    match &whole_upgrade {
        Some(Ok(upgrade)) => {
            assert_eq!(upgrade.key.len(), WEBSOCKET_KEY_LEN);
            check_switching_protocols(upgrade.key);
        }
        Some(Err(error)) => check_error_response(*error),
        None => {}
    }

    // Past HEAD_BYTES_MAX the parser looks at the same window whatever the
    // length, so the prefixes up to the limit cover every distinct answer.
    let prefix_len_max = data.len().min(HEAD_BYTES_MAX);
    for prefix_len in 0..=prefix_len_max {
        let mut prefix_headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
        let partial = parse_head(
            &data[..prefix_len],
            &mut prefix_headers,
            PUBLISH_BODY_BYTES_MAX,
        );
        if partial == Ok(None) {
            continue;
        }
        assert_eq!(
            partial, whole,
            "the first answer at {prefix_len} bytes differs from the answer for all bytes"
        );
        if let Ok(Some(head)) = &partial {
            assert_eq!(Some(validate_upgrade(head)), whole_upgrade);
        }
        return;
    }
    assert_eq!(whole, Ok(None), "no prefix gave the answer for all bytes");
}

/// The 101 answer for `key` must be a complete response that httparse
/// reads back with the right `Sec-WebSocket-Accept` and nothing after it.
fn check_switching_protocols(key: &[u8]) {
    let mut out = [0u8; SWITCHING_PROTOCOLS_LEN_MAX];
    let written = write_switching_protocols(&mut out, key);
    assert_eq!(written, SWITCHING_PROTOCOLS_LEN_MAX);
    let mut headers = [httparse::EMPTY_HEADER; 8];
    let mut response = httparse::Response::new(&mut headers);
    assert_eq!(
        response.parse(&out[..written]),
        Ok(httparse::Status::Complete(written))
    );
    assert_eq!(response.code, Some(101));
    let accept = response
        .headers
        .iter()
        .find(|header| header.name.eq_ignore_ascii_case("sec-websocket-accept"))
        .map(|header| header.value);
    let expected: [u8; ACCEPT_KEY_LEN] = accept_key(key);
    assert_eq!(accept, Some(expected.as_slice()));
}

/// Whatever the `Sec-WebSocket-Extensions` headers hold, negotiation never
/// panics, and an accepted offer is answered with a line that a client
/// reading it back accepts the same way.
fn check_deflate_negotiation(head: &hookstream::protocol::http::Head<'_, '_>) {
    use hookstream::protocol::deflate::{negotiate, RESPONSE_LINE_LEN_MAX};
    if let Some(agreement) = negotiate(head.headers_named("sec-websocket-extensions")) {
        let mut line = [0u8; RESPONSE_LINE_LEN_MAX];
        let len = agreement.write_response_line(&mut line);
        let value = line[..len]
            .strip_prefix(b"Sec-WebSocket-Extensions: ".as_slice())
            .and_then(|v| v.strip_suffix(b"\r\n".as_slice()))
            .expect("a header line");
        assert_eq!(negotiate([value]), Some(agreement));
    }
}

/// The error answer for `error` must be a complete response with its status
/// and a body exactly as long as its `Content-Length`.
fn check_error_response(error: HttpError) {
    let status = error.status();
    assert!(
        [400, 405, 411, 413, 426, 431, 505].contains(&status),
        "unexpected status {status} for {error:?}"
    );
    let mut out = Vec::new();
    write_http_error(&mut out, error);
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut response = httparse::Response::new(&mut headers);
    let Ok(httparse::Status::Complete(head_len)) = response.parse(&out) else {
        panic!("the {status} answer is not a complete response: {out:?}");
    };
    assert_eq!(response.code, Some(status));
    let content_length = response
        .headers
        .iter()
        .find(|header| header.name.eq_ignore_ascii_case("content-length"))
        .and_then(|header| std::str::from_utf8(header.value).ok())
        .and_then(|value| value.parse::<usize>().ok());
    assert_eq!(content_length, Some(out.len() - head_len));
}

/// Message limits the frame decoder is tried with: the default, the range
/// the configuration allows (125 bytes to 16 MiB) with small ones that short
/// inputs can exceed, and the "no limit" the server uses while draining a
/// closing connection.
const MESSAGE_BYTES_MAX_CHOICES: [usize; 6] = [
    CLIENT_MESSAGE_BYTES_MAX,
    CONTROL_PAYLOAD_BYTES_MAX,
    CONTROL_PAYLOAD_BYTES_MAX + 1,
    1000,
    16 * 1024 * 1024,
    usize::MAX / 2,
];

/// Most distinct chunk sizes an input can ask for; they repeat in turn.
const CHUNK_SIZES_MAX: usize = 8;

/// `frame_decoder`: byte 0 picks the message limit, byte 1 the number of
/// chunk sizes that follow (1 to 8, one byte each: a size of 1 to 256), and
/// the rest is the stream of frame bytes.
///
/// The stream is decoded by a server-style read loop (append a chunk, decode
/// frames until "need more", drop what they consumed), once with clients
/// required to mask and once without. Each run must give exactly the same
/// messages, in the same order, ending in the same error or with the same
/// bytes left over, as decoding the whole stream at once; every step is
/// checked against the decoder's documented contract.
pub fn check_frame_decoder(data: &[u8]) {
    let (&limit_byte, rest) = data.split_first().unwrap_or((&0, &[]));
    let (&count_byte, rest) = rest.split_first().unwrap_or((&0, &[]));
    let chunk_size_count = usize::from(count_byte) % CHUNK_SIZES_MAX + 1;
    let (size_bytes, stream) = rest.split_at(chunk_size_count.min(rest.len()));
    let mut chunk_sizes: Vec<usize> = size_bytes.iter().map(|&b| usize::from(b) + 1).collect();
    if chunk_sizes.is_empty() {
        chunk_sizes.push(1);
    }
    let message_bytes_max =
        MESSAGE_BYTES_MAX_CHOICES[usize::from(limit_byte) % MESSAGE_BYTES_MAX_CHOICES.len()];

    for require_mask in [true, false] {
        let config = DecoderConfig {
            message_bytes_max,
            require_mask,
        };
        let at_once = run_decoder(config, stream, &[stream.len().max(1)]);
        let chunked = run_decoder(config, stream, &chunk_sizes);
        assert_eq!(
            chunked, at_once,
            "chunks of {chunk_sizes:?} decode differently from the whole stream"
        );
    }
}

/// An owned copy of a decoded [`Message`], so that runs can be compared.
#[derive(Debug, PartialEq, Eq)]
enum OwnedMessage {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<(u16, String)>),
}

/// Everything one run of the read loop produced.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    /// Per decoded frame: the bytes it consumed and the message it completed.
    frames: Vec<(usize, Option<OwnedMessage>)>,
    /// How the run ended.
    end: End,
}

#[derive(Debug, PartialEq, Eq)]
enum End {
    /// The decoder failed the connection.
    Failed(WsError),
    /// The stream ran out with this many bytes of an incomplete frame left.
    NeedMore(usize),
}

/// One step of the read loop.
enum Step {
    Frame(usize, Option<OwnedMessage>),
    NeedMore,
    Failed(WsError),
}

/// Feeds `stream` to a fresh decoder in chunks of `chunk_sizes` (in turn),
/// decoding after each chunk until the decoder needs more.
fn run_decoder(config: DecoderConfig, stream: &[u8], chunk_sizes: &[usize]) -> Outcome {
    assert!(!chunk_sizes.is_empty());
    let mut decoder = Decoder::new(config);
    let mut buf: Vec<u8> = Vec::new();
    let mut frames = Vec::new();
    let mut fed = 0;
    let mut sizes = chunk_sizes.iter().cycle();
    while fed < stream.len() {
        let size = sizes.next().copied().unwrap_or(1);
        assert!(size > 0);
        let chunk_end = stream.len().min(fed + size);
        buf.extend_from_slice(&stream[fed..chunk_end]);
        fed = chunk_end;
        loop {
            match decode_step(&mut decoder, &mut buf) {
                Step::Frame(consumed, message) => {
                    buf.drain(..consumed);
                    frames.push((consumed, message));
                }
                Step::NeedMore => break,
                Step::Failed(error) => {
                    return Outcome {
                        frames,
                        end: End::Failed(error),
                    }
                }
            }
        }
    }
    Outcome {
        frames,
        end: End::NeedMore(buf.len()),
    }
}

/// One `decode` call, checked against its contract.
fn decode_step(decoder: &mut Decoder, buf: &mut [u8]) -> Step {
    let config = decoder.config();
    let buf_len = buf.len();
    let frame_len_hint = Decoder::frame_len_hint(buf);
    // "Need more" must leave the buffer as it was; keep a copy whenever that
    // answer is possible (the frame is not complete in the buffer).
    let incomplete = frame_len_hint.is_none_or(|frame_len| frame_len > buf_len);
    let snapshot = incomplete.then(|| buf.to_vec());
    let was_assembling = decoder.is_assembling();

    let (consumed, message) = match decoder.decode(buf) {
        Ok(None) => {
            assert!(
                incomplete,
                "need more with a complete frame of {frame_len_hint:?} bytes in {buf_len}"
            );
            assert_eq!(
                snapshot.as_deref(),
                Some(&*buf),
                "need more changed the buffer"
            );
            assert_eq!(decoder.is_assembling(), was_assembling);
            return Step::NeedMore;
        }
        Err(error) => {
            assert!([1002, 1007, 1009].contains(&error.close_code().get()));
            return Step::Failed(error);
        }
        Ok(Some(decoded)) => (decoded.consumed, decoded.message.map(owned)),
    };

    assert_eq!(frame_len_hint, Some(consumed));
    assert!(consumed >= 2);
    assert!(consumed <= buf_len);
    assert!(decoder.assembly_capacity_bytes() <= config.message_bytes_max);
    match &message {
        None => assert!(decoder.is_assembling(), "a fragment left no open message"),
        Some(OwnedMessage::Text(text)) => {
            assert!(text.len() <= config.message_bytes_max);
            assert!(!decoder.is_assembling());
        }
        Some(OwnedMessage::Binary(bytes)) => {
            assert!(bytes.len() <= config.message_bytes_max);
            assert!(!decoder.is_assembling());
        }
        Some(OwnedMessage::Ping(bytes) | OwnedMessage::Pong(bytes)) => {
            assert!(bytes.len() <= CONTROL_PAYLOAD_BYTES_MAX);
            assert_eq!(decoder.is_assembling(), was_assembling);
        }
        Some(OwnedMessage::Close(close)) => {
            if let Some((code, reason)) = close {
                assert!(is_valid_close_code(*code));
                assert!(reason.len() <= CLOSE_REASON_BYTES_MAX);
            }
            assert_eq!(decoder.is_assembling(), was_assembling);
        }
    }
    Step::Frame(consumed, message)
}

fn owned(message: Message<'_>) -> OwnedMessage {
    match message {
        Message::Text(text) => OwnedMessage::Text(text.to_owned()),
        Message::Binary(bytes) => OwnedMessage::Binary(bytes.to_vec()),
        Message::Ping(bytes) => OwnedMessage::Ping(bytes.to_vec()),
        Message::Pong(bytes) => OwnedMessage::Pong(bytes.to_vec()),
        Message::Close(close) => {
            OwnedMessage::Close(close.map(|frame| (frame.code, frame.reason.to_owned())))
        }
        Message::Compressed { .. } => {
            unreachable!("the fuzzed decoder never negotiates permessage-deflate")
        }
    }
}

/// Bytes at the front of an `unmask` input that are not payload.
const UNMASK_PREFIX_BYTES: usize = 15;

/// `unmask`: bytes 0-3 are the mask, byte 4 the alignment of the payload
/// (0-7 bytes past an 8-byte boundary), bytes 5-12 the payload offset
/// (little-endian u64, any value), bytes 13-14 a split point; the rest is
/// the payload. Missing prefix bytes count as zero.
///
/// Checks that the fast unmask equals the byte-by-byte one, that unmasking
/// twice gives the input back, and that unmasking in two pieces (the second
/// at `offset + split`) equals unmasking at once.
pub fn check_unmask(data: &[u8]) {
    let mut prefix = [0u8; UNMASK_PREFIX_BYTES];
    let prefix_len = data.len().min(UNMASK_PREFIX_BYTES);
    prefix[..prefix_len].copy_from_slice(&data[..prefix_len]);
    let payload = &data[prefix_len..];

    let mask = [prefix[0], prefix[1], prefix[2], prefix[3]];
    let alignment = usize::from(prefix[4] % 8);
    let mut offset_bytes = [0u8; 8];
    offset_bytes.copy_from_slice(&prefix[5..13]);
    // Truncation on a 32-bit target is fine: any usize is a valid offset.
    let offset = u64::from_le_bytes(offset_bytes) as usize;
    let split = usize::from(u16::from_le_bytes([prefix[13], prefix[14]])) % (payload.len() + 1);

    // Place the payload `alignment` bytes past an 8-byte boundary: the
    // address is read, never dereferenced, so no `unsafe` is needed.
    let mut aligned = vec![0u8; payload.len() + 8];
    let start = (alignment + 8 - aligned.as_ptr() as usize % 8) % 8;
    let fast = &mut aligned[start..start + payload.len()];
    debug_assert_eq!(fast.as_ptr() as usize % 8, alignment);
    fast.copy_from_slice(payload);
    unmask(fast, mask, offset);

    let mut slow = payload.to_vec();
    unmask_bytewise(&mut slow, mask, offset);
    assert_eq!(*fast, *slow, "unmask differs from unmask_bytewise");

    let mut twice = fast.to_vec();
    unmask(&mut twice, mask, offset);
    assert_eq!(
        twice, payload,
        "unmasking twice did not give the input back"
    );

    let mut pieces = payload.to_vec();
    let (front, back) = pieces.split_at_mut(split);
    unmask(front, mask, offset);
    unmask(back, mask, offset.wrapping_add(split));
    assert_eq!(pieces, slow, "unmasking in two pieces differs");
}
