//! Proves the WebSocket hot path does not allocate: decoding a complete frame
//! that fits the read buffer, and encoding frame headers and close frames.
//!
//! This is its own test binary because it installs a counting global
//! allocator. The count is per thread, so tests running in parallel (and
//! the harness's own threads) do not disturb each other's counts.

mod counting_alloc;

use hookstream::limits::FRAME_HEADER_BYTES_MAX;
use hookstream::protocol::ws::{
    encode_close_frame, encode_close_payload, encode_header, unmask, Decoder, DecoderConfig,
    Message, Opcode,
};

use counting_alloc::allocations_during;

const MASK: [u8; 4] = [0x37, 0xFA, 0x21, 0x3D];

/// A masked client frame, built before any measurement starts.
fn client_frame(fin: bool, opcode: Opcode, payload: &[u8]) -> Vec<u8> {
    let mut header = [0u8; FRAME_HEADER_BYTES_MAX];
    let header_len = encode_header(&mut header, fin, opcode, payload.len() as u64, Some(MASK));
    let mut frame = header[..header_len].to_vec();
    frame.extend_from_slice(payload);
    unmask(&mut frame[header_len..], MASK, 0);
    frame
}

#[test]
fn the_counter_sees_allocations() {
    let (vec, allocations) = allocations_during(|| vec![1u8; 100]);
    assert_eq!(vec.len(), 100);
    assert!(allocations >= 1);
}

#[test]
fn decoding_a_complete_text_frame_allocates_nothing() {
    let payload = r#"{"type":"subscribe","channel":"events","after":1041}"#;
    let mut frame = client_frame(true, Opcode::Text, payload.as_bytes());
    let frame_len = frame.len();
    // Room after the frame, as in a real read buffer.
    frame.resize(4096, 0);

    let (outcome, allocations) = allocations_during(|| {
        let mut decoder = Decoder::new(DecoderConfig::default());
        let decoded = decoder.decode(&mut frame).map(|decoded| {
            decoded.map(|decoded| {
                let text_ok = decoded.message == Some(Message::Text(payload));
                (decoded.consumed, text_ok)
            })
        });
        let hint = Decoder::frame_len_hint(&frame);
        (decoded, hint)
    });
    assert_eq!(allocations, 0);
    assert_eq!(outcome.0, Ok(Some((frame_len, true))));
    assert_eq!(outcome.1, Some(frame_len));
}

#[test]
fn decoding_a_large_frame_that_fits_allocates_nothing() {
    let payload = vec![b'a'; 60_000];
    let mut frame = client_frame(true, Opcode::Text, &payload);
    let frame_len = frame.len();

    let (consumed, allocations) = allocations_during(|| {
        let mut decoder = Decoder::new(DecoderConfig::default());
        decoder
            .decode(&mut frame)
            .ok()
            .flatten()
            .map(|decoded| decoded.consumed)
    });
    assert_eq!(allocations, 0);
    assert_eq!(consumed, Some(frame_len));
}

#[test]
fn decoding_control_frames_allocates_nothing() {
    let mut ping = client_frame(true, Opcode::Ping, b"heartbeat");
    let mut pong = client_frame(true, Opcode::Pong, b"heartbeat");
    let mut close = client_frame(true, Opcode::Close, b"\x03\xE8bye");
    let mut partial = client_frame(true, Opcode::Text, b"not yet complete");
    partial.truncate(10);

    let (results, allocations) = allocations_during(|| {
        let mut decoder = Decoder::new(DecoderConfig::default());
        let ping_ok = matches!(
            decoder.decode(&mut ping),
            Ok(Some(decoded)) if decoded.message == Some(Message::Ping(b"heartbeat"))
        );
        let pong_ok = matches!(
            decoder.decode(&mut pong),
            Ok(Some(decoded)) if decoded.message == Some(Message::Pong(b"heartbeat"))
        );
        let close_ok = matches!(
            decoder.decode(&mut close),
            Ok(Some(decoded)) if matches!(
                decoded.message,
                Some(Message::Close(Some(frame))) if frame.code == 1000 && frame.reason == "bye"
            )
        );
        let partial_ok = matches!(decoder.decode(&mut partial), Ok(None));
        [ping_ok, pong_ok, close_ok, partial_ok]
    });
    assert_eq!(allocations, 0);
    assert_eq!(results, [true; 4]);
}

#[test]
fn errors_allocate_nothing() {
    let mut unmasked = b"\x81\x02hi".to_vec();
    let (error, allocations) = allocations_during(|| {
        let mut decoder = Decoder::new(DecoderConfig::default());
        decoder
            .decode(&mut unmasked)
            .err()
            .map(|error| error.close_code().get())
    });
    assert_eq!(allocations, 0);
    assert_eq!(error, Some(1002));
}

#[test]
fn a_second_fragmented_message_reuses_the_assembly_buffer() {
    // The first fragmented message sizes the buffer; later ones of that size
    // assemble without allocating, until `reset_assembly` frees it.
    let first = client_frame(false, Opcode::Text, b"hello, ");
    let last = client_frame(true, Opcode::Continuation, b"world");
    let mut decoder = Decoder::new(DecoderConfig::default());
    let (mut warm_first, mut warm_last) = (first.clone(), last.clone());
    decoder.decode(&mut warm_first).unwrap().unwrap();
    decoder.decode(&mut warm_last).unwrap().unwrap();

    let (mut again_first, mut again_last) = (first, last);
    let (text_ok, allocations) = allocations_during(|| {
        let first_ok = decoder.decode(&mut again_first).is_ok();
        let last_ok = matches!(
            decoder.decode(&mut again_last),
            Ok(Some(decoded)) if decoded.message == Some(Message::Text("hello, world"))
        );
        first_ok && last_ok
    });
    assert_eq!(allocations, 0);
    assert!(text_ok);
}

#[test]
fn encoding_allocates_nothing() {
    let payload = vec![b'x'; 70_000];
    let (lengths, allocations) = allocations_during(|| {
        let mut header = [0u8; FRAME_HEADER_BYTES_MAX];
        let small = encode_header(&mut header, true, Opcode::Text, 10, None);
        let medium = encode_header(&mut header, true, Opcode::Text, 1000, None);
        let large = encode_header(
            &mut header,
            false,
            Opcode::Binary,
            payload.len() as u64,
            None,
        );
        let masked = encode_header(&mut header, true, Opcode::Ping, 4, Some(MASK));
        let mut close_payload = [0u8; 125];
        let close_payload_len = encode_close_payload(&mut close_payload, 1001, "going away");
        let mut close = [0u8; 129];
        let close_len = encode_close_frame(&mut close, 1013, "slow consumer");
        [small, medium, large, masked, close_payload_len, close_len]
    });
    assert_eq!(allocations, 0);
    assert_eq!(lengths, [2, 4, 10, 6, 12, 17]);
}
