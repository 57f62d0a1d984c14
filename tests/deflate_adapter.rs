//! The permessage-deflate adapter of the test client
//! (tests/common/deflate.rs, used by every WebSocket suite when
//! `HOOKSTREAM_TEST_DEFLATE=1`), byte for byte, without a server: frames of
//! every length class, split across reads at every boundary, control frames
//! between a compressed message's fragments, the client's compression, the
//! limits.

mod common;

use std::collections::VecDeque;
use std::io::{self, Read, Write};

use common::deflate::{deflate, frame_header, incompressible, inflate, MAX_MESSAGE};
use common::DeflateStream;
use tungstenite::protocol::{Role, WebSocket};
use tungstenite::Message;

const HEAD: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Extensions: permessage-deflate; \
server_no_context_takeover; client_no_context_takeover\r\n\r\n";

/// An in-memory socket: each read returns the next scripted chunk (then
/// EOF); writes are collected.
#[derive(Default)]
struct Script {
    reads: VecDeque<Vec<u8>>,
    written: Vec<u8>,
}

impl Script {
    /// `bytes` delivered `chunk` bytes per read.
    fn chunked(bytes: &[u8], chunk: usize) -> Script {
        Script {
            reads: bytes.chunks(chunk).map(<[u8]>::to_vec).collect(),
            written: Vec::new(),
        }
    }
}

impl Read for Script {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(mut chunk) = self.reads.pop_front() else {
            return Ok(0);
        };
        let n = buf.len().min(chunk.len());
        buf[..n].copy_from_slice(&chunk[..n]);
        if n < chunk.len() {
            self.reads.push_front(chunk.split_off(n));
        }
        Ok(n)
    }
}

impl Write for Script {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.written.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A server frame (unmasked), with RSV1 when `rsv1`.
fn server_frame(fin: bool, rsv1: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = frame_header(fin, opcode, payload.len(), None);
    if rsv1 {
        frame[0] |= 0x40;
    }
    frame.extend_from_slice(payload);
    frame
}

/// Everything the adapter hands on when `wire` arrives `chunk` bytes per
/// read, read with a small buffer so its output is split too.
fn read_all(wire: &[u8], chunk: usize) -> io::Result<Vec<u8>> {
    let mut stream = DeflateStream::deflate(Script::chunked(wire, chunk));
    let mut out = Vec::new();
    let mut buf = [0u8; 1000];
    loop {
        match stream.read(&mut buf)? {
            0 => return Ok(out),
            n => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Texts whose plain and compressed sizes cover every length form
/// (7-bit, 16-bit and 64-bit lengths), and the empty message.
fn texts() -> Vec<Vec<u8>> {
    let mut texts = vec![Vec::new(), b"x".to_vec(), br#"{"type":"pong"}"#.to_vec()];
    for len in [125, 126, 127, 1000, 65_535, 65_536, 100_000] {
        texts.push(incompressible(len).into_bytes());
    }
    texts.push("p".repeat(200_000).into_bytes());
    texts
}

#[test]
fn inflate_undoes_deflate() {
    for text in texts() {
        assert_eq!(
            inflate(&deflate(&text)).unwrap(),
            text,
            "length {}",
            text.len()
        );
    }
    let compressed_sizes: Vec<usize> = texts().iter().map(|t| deflate(t).len()).collect();
    assert!(compressed_sizes.iter().any(|&n| n < 126));
    assert!(compressed_sizes
        .iter()
        .any(|&n| (126..=65_535).contains(&n)));
    assert!(
        compressed_sizes.iter().any(|&n| n > 65_535),
        "{compressed_sizes:?}"
    );
}

#[test]
fn compressed_messages_become_plain_frames_at_any_read_boundary() {
    let mut wire = HEAD.to_vec();
    let mut expected = HEAD.to_vec();
    for text in texts() {
        wire.extend(server_frame(true, true, 1, &deflate(&text)));
        expected.extend(frame_header(true, 1, text.len(), None));
        expected.extend_from_slice(&text);
        // A plain frame between them passes as it is.
        let plain = server_frame(true, false, 1, br#"{"type":"plain"}"#);
        wire.extend_from_slice(&plain);
        expected.extend(plain);
    }
    for chunk in [3, 1000, 4096, wire.len()] {
        assert!(read_all(&wire, chunk).unwrap() == expected, "chunk {chunk}");
    }
    // Every split of the head and a short compressed message.
    let mut wire = HEAD.to_vec();
    wire.extend(server_frame(true, true, 1, &deflate(b"hello hello hello")));
    let mut expected = HEAD.to_vec();
    expected.extend(frame_header(true, 1, 17, None));
    expected.extend_from_slice(b"hello hello hello");
    assert_eq!(read_all(&wire, 1).unwrap(), expected);
}

#[test]
fn control_frames_between_compressed_fragments_come_first_and_the_message_whole() {
    let text = incompressible(70_000).into_bytes();
    let compressed = deflate(&text);
    let (a, rest) = compressed.split_at(10);
    let (b, c) = rest.split_at(rest.len() / 2);
    let ping = server_frame(true, false, 9, b"ping-1");
    let close = server_frame(true, false, 8, &[0x03, 0xe8]);
    let mut wire = HEAD.to_vec();
    wire.extend(server_frame(false, true, 1, a));
    wire.extend_from_slice(&ping);
    wire.extend(server_frame(false, false, 0, b));
    wire.extend(server_frame(true, false, 0, c));
    // A plain fragmented message after it passes frame by frame.
    let plain_fragments = [
        server_frame(false, false, 1, b"{\"a\":"),
        server_frame(true, false, 0, b"1}"),
    ];
    for fragment in &plain_fragments {
        wire.extend_from_slice(fragment);
    }
    wire.extend_from_slice(&close);

    let mut expected = HEAD.to_vec();
    expected.extend_from_slice(&ping);
    expected.extend(frame_header(true, 1, text.len(), None));
    expected.extend_from_slice(&text);
    for fragment in &plain_fragments {
        expected.extend_from_slice(fragment);
    }
    expected.extend_from_slice(&close);
    for chunk in [1, 2, 5, 333, wire.len()] {
        assert!(read_all(&wire, chunk).unwrap() == expected, "chunk {chunk}");
    }
}

#[test]
fn tungstenite_reads_the_adapted_stream() {
    let texts = texts();
    let mut wire = Vec::new();
    for text in &texts {
        wire.extend(server_frame(true, true, 1, &deflate(text)));
        wire.extend(server_frame(true, false, 10, b"pong"));
    }
    let mut script = Script::chunked(HEAD, HEAD.len());
    script.reads.extend(wire.chunks(777).map(<[u8]>::to_vec));
    let mut stream = DeflateStream::deflate(script);
    let mut head = vec![0u8; HEAD.len()];
    stream.read_exact(&mut head).unwrap();
    assert_eq!(head, HEAD);
    let mut ws = WebSocket::from_raw_socket(stream, Role::Client, None);
    for text in &texts {
        match ws.read().unwrap() {
            Message::Text(got) => assert!(got.as_bytes() == &text[..], "length {}", text.len()),
            other => panic!("expected text, got {other:?}"),
        }
        assert!(matches!(ws.read().unwrap(), Message::Pong(_)));
    }
    assert_eq!(ws.get_ref().inflated, texts.len() as u64);
}

#[test]
fn client_messages_are_compressed_masked_and_control_frames_pass() {
    let mut stream = DeflateStream::deflate(Script::chunked(HEAD, HEAD.len()));
    let mut head = vec![0u8; HEAD.len()];
    stream.read_exact(&mut head).unwrap();
    let mut ws = WebSocket::from_raw_socket(stream, Role::Client, None);
    let texts = texts();
    for text in &texts {
        ws.send(Message::text(String::from_utf8(text.clone()).unwrap()))
            .unwrap();
        ws.send(Message::Ping(b"p".to_vec().into())).unwrap();
    }
    ws.send(Message::binary(b"\x00\x01binary".to_vec()))
        .unwrap();
    assert_eq!(ws.get_ref().deflated, texts.len() as u64 + 1);

    // Parse what reached the socket.
    let mut wire = &ws.get_ref().get_ref().written[..];
    let mut next = || {
        let (b0, b1) = (wire[0], wire[1]);
        assert!(b1 & 0x80 != 0, "client frames are masked");
        let (len, mut at) = match b1 & 0x7f {
            126 => (u16::from_be_bytes([wire[2], wire[3]]) as usize, 4),
            127 => (
                u64::from_be_bytes(wire[2..10].try_into().unwrap()) as usize,
                10,
            ),
            n => (n as usize, 2),
        };
        let key = [wire[at], wire[at + 1], wire[at + 2], wire[at + 3]];
        at += 4;
        let payload: Vec<u8> = wire[at..at + len]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ key[i % 4])
            .collect();
        wire = &wire[at + len..];
        (b0, payload)
    };
    for text in &texts {
        let (b0, payload) = next();
        assert_eq!(b0, 0x80 | 0x40 | 1, "FIN, RSV1, text");
        assert!(inflate(&payload).unwrap() == *text, "length {}", text.len());
        assert_eq!(next(), (0x80 | 9, b"p".to_vec()), "a ping passes as it is");
    }
    let (b0, payload) = next();
    assert_eq!(b0, 0x80 | 0x40 | 2);
    assert_eq!(inflate(&payload).unwrap(), b"\x00\x01binary");
    assert!(wire.is_empty());
}

#[test]
fn writes_split_anywhere_give_the_same_wire() {
    let text = incompressible(300);
    let mut whole = DeflateStream::deflate(Script::chunked(HEAD, HEAD.len()));
    let mut split = DeflateStream::deflate(Script::chunked(HEAD, HEAD.len()));
    for stream in [&mut whole, &mut split] {
        let mut head = vec![0u8; HEAD.len()];
        stream.read_exact(&mut head).unwrap();
    }
    let mut frame = frame_header(true, 1, text.len(), Some([1, 2, 3, 4]));
    frame.extend(
        text.bytes()
            .enumerate()
            .map(|(i, b)| b ^ [1, 2, 3, 4][i % 4]),
    );
    whole.write_all(&frame).unwrap();
    for byte in &frame {
        split.write_all(std::slice::from_ref(byte)).unwrap();
    }
    assert!(!whole.get_ref().written.is_empty());
    assert_eq!(whole.get_ref().written, split.get_ref().written);
}

#[test]
fn a_refused_upgrade_and_plain_mode_pass_everything_through() {
    let mut refused = b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 5\r\n\r\n".to_vec();
    refused.extend(server_frame(true, true, 1, b"abc"));
    assert_eq!(read_all(&refused, 7).unwrap(), refused);

    let mut wire = HEAD.to_vec();
    wire.extend(server_frame(true, true, 1, &deflate(b"kept compressed")));
    let mut plain = DeflateStream::plain(Script::chunked(&wire, 5));
    let mut out = Vec::new();
    plain.read_to_end(&mut out).unwrap();
    assert_eq!(out, wire);
}

#[test]
fn frames_and_messages_over_the_limit_are_errors() {
    let mut huge = HEAD.to_vec();
    huge.extend(frame_header(true, 1, MAX_MESSAGE + 1, None));
    huge[HEAD.len()] |= 0x40;
    let err = read_all(&huge, 64).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");

    let bomb = deflate(&vec![0u8; MAX_MESSAGE + 1]);
    assert!(bomb.len() < 1 << 20, "{} compressed bytes", bomb.len());
    let err = inflate(&bomb).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");

    let err = inflate(b"\xff\xff\xff not deflate").unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
}

/// A socket that takes at most 5 bytes a write and refuses every other
/// write (as a socket with a write timeout does when the peer is slow).
struct Stingy {
    inner: Script,
    refuse: bool,
}

impl Read for Stingy {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

impl Write for Stingy {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.refuse = !self.refuse;
        if self.refuse {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.inner.write(&buf[..buf.len().min(5)])
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_socket_that_takes_little_gets_every_byte_once() {
    let text = incompressible(300);
    let mut frame = frame_header(true, 1, text.len(), Some([9, 8, 7, 6]));
    frame.extend(
        text.bytes()
            .enumerate()
            .map(|(i, b)| b ^ [9, 8, 7, 6][i % 4]),
    );

    let mut roomy = DeflateStream::deflate(Script::chunked(HEAD, HEAD.len()));
    let mut stingy = DeflateStream::deflate(Stingy {
        inner: Script::chunked(HEAD, HEAD.len()),
        refuse: false,
    });
    let mut head = vec![0u8; HEAD.len()];
    roomy.read_exact(&mut head).unwrap();
    stingy.read_exact(&mut head).unwrap();
    roomy.write_all(&frame).unwrap();
    assert_eq!(stingy.write(&frame).unwrap(), frame.len(), "accepted whole");
    let mut flushes = 0;
    while let Err(e) = stingy.flush() {
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        flushes += 1;
        assert!(flushes < 1000);
    }
    assert!(flushes > 1);
    assert_eq!(stingy.get_ref().inner.written, roomy.get_ref().written);
}
