//! permessage-deflate for the test [`Client`](super::Client), which is
//! tungstenite 0.30 and cannot negotiate it: with `HOOKSTREAM_TEST_DEFLATE=1`
//! every client the helpers open offers
//! `permessage-deflate; client_no_context_takeover; server_no_context_takeover`,
//! the upgrade fails unless the server accepted it, and tungstenite reads and
//! writes through a [`DeflateStream`] that turns the extension into plain
//! WebSocket on the way in and back on the way out:
//!
//! - server → client: after the `101` head, frames are parsed (unmasked); a
//!   message whose first frame has RSV1 (fragmented or not) is inflated (raw
//!   deflate + `00 00 ff ff`, a fresh inflater per message: no context
//!   takeover) and handed on as one plain unfragmented frame; control frames
//!   and plain messages pass through byte for byte, in order.
//! - client → server: each unfragmented text or binary frame tungstenite
//!   writes is compressed (raw deflate, sync flush, tail stripped, RSV1 set,
//!   re-masked with its own key), so the server's inflater sees the whole
//!   suite's client traffic; control frames pass unchanged.
//!
//! tungstenite 0.30 does not look at the 101's `Sec-WebSocket-Extensions`
//! (its client handshake leaves that check as a TODO), so the header needs no
//! hiding; it does reject RSV1 on any frame, which is why the adapter exists.
//! Everything is bounded: a frame or inflated message over
//! [`MAX_MESSAGE`] is an `InvalidData` error, never an allocation.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};

use flate2::write::DeflateEncoder;
use flate2::{Compression, Decompress, FlushDecompress, Status};

/// The extension offer sent by every client in deflate mode.
pub const OFFER: &str =
    "permessage-deflate; client_no_context_takeover; server_no_context_takeover";

/// Largest frame payload or inflated message the adapter accepts: 64 MiB,
/// tungstenite's own default message limit.
pub const MAX_MESSAGE: usize = 64 << 20;

/// The deflate tail that RFC 7692 strips from each compressed message.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Compressed messages inflated by every adapter of this test process.
pub static INFLATED: AtomicU64 = AtomicU64::new(0);
/// Client messages compressed by every adapter of this test process.
pub static DEFLATED: AtomicU64 = AtomicU64::new(0);

/// Whether this run is in deflate mode (`HOOKSTREAM_TEST_DEFLATE=1`).
pub fn enabled() -> bool {
    std::env::var("HOOKSTREAM_TEST_DEFLATE").is_ok_and(|v| v == "1")
}

/// Panics unless the 101's `Sec-WebSocket-Extensions` accepts the offer.
pub fn assert_accepted(header: Option<&str>) {
    let header = header.unwrap_or_else(|| {
        panic!("HOOKSTREAM_TEST_DEFLATE=1 but the server did not accept permessage-deflate")
    });
    let params: Vec<&str> = header.split(';').map(str::trim).collect();
    assert_eq!(
        params[0], "permessage-deflate",
        "accepted extension: {header:?}"
    );
    for needed in ["server_no_context_takeover", "client_no_context_takeover"] {
        assert!(params.contains(&needed), "{needed} missing in {header:?}");
    }
}

/// Where the read side is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Before the end of the HTTP response head: bytes pass through.
    Head,
    /// After a `101` head: WebSocket frames, inflated where compressed.
    Frames,
    /// Plain mode, or a non-101 answer: everything passes through.
    Plain,
}

/// A `Read + Write` stream between tungstenite and the socket; see the
/// module documentation.
pub struct DeflateStream<S> {
    inner: S,
    phase: Phase,
    /// Bytes read from `inner` not yet turned into output.
    raw: Vec<u8>,
    /// Bytes ready for tungstenite, from `out_at` on.
    out: Vec<u8>,
    out_at: usize,
    /// The opcode and compressed payload so far of a fragmented compressed
    /// message.
    partial: Option<(u8, Vec<u8>)>,
    /// Bytes written by tungstenite not yet a complete frame.
    pending: Vec<u8>,
    /// Bytes for the wire that the socket has not taken yet (a write that
    /// timed out); sent before anything else, also by `flush`.
    unsent: Vec<u8>,
    /// Compressed messages this stream inflated.
    pub inflated: u64,
    /// Client messages this stream compressed.
    pub deflated: u64,
}

impl<S> DeflateStream<S> {
    /// No extension: every byte passes through unchanged.
    pub fn plain(inner: S) -> DeflateStream<S> {
        DeflateStream::new(inner, Phase::Plain)
    }

    /// Passes the HTTP response head through, then (after a `101`) turns
    /// compressed messages into plain ones and compresses the client's.
    pub fn deflate(inner: S) -> DeflateStream<S> {
        DeflateStream::new(inner, Phase::Head)
    }

    fn new(inner: S, phase: Phase) -> DeflateStream<S> {
        DeflateStream {
            inner,
            phase,
            raw: Vec::new(),
            out: Vec::new(),
            out_at: 0,
            partial: None,
            pending: Vec::new(),
            unsent: Vec::new(),
            inflated: 0,
            deflated: 0,
        }
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Moves what can be handed on from `raw` to `out`.
    fn process(&mut self) -> io::Result<()> {
        if self.phase == Phase::Head {
            let Some(end) = self.raw.windows(4).position(|w| w == b"\r\n\r\n") else {
                return Ok(());
            };
            let head: Vec<u8> = self.raw.drain(..end + 4).collect();
            self.out.extend_from_slice(&head);
            self.phase = if head.starts_with(b"HTTP/1.1 101 ") {
                Phase::Frames
            } else {
                Phase::Plain
            };
        }
        if self.phase == Phase::Plain {
            self.out.append(&mut self.raw);
            return Ok(());
        }
        while let Some(frame) = parse(&self.raw)? {
            let bytes: Vec<u8> = self.raw.drain(..frame.len).collect();
            let payload = &bytes[frame.header..];
            let rsv1 = bytes[0] & 0x40 != 0;
            if frame.opcode >= 8 || frame.masked {
                // Control frames (or a masked frame tungstenite must reject)
                // pass as they are, also between a message's fragments.
                self.out.extend_from_slice(&bytes);
            } else if let Some((opcode, mut compressed)) = self.partial.take() {
                if frame.opcode != 0 || rsv1 {
                    return Err(invalid(
                        "a compressed message was interrupted or had RSV1 twice",
                    ));
                }
                if compressed.len() + payload.len() > MAX_MESSAGE {
                    return Err(invalid("compressed message over the limit"));
                }
                compressed.extend_from_slice(payload);
                if frame.fin {
                    self.emit_inflated(opcode, &compressed)?;
                } else {
                    self.partial = Some((opcode, compressed));
                }
            } else if rsv1 && frame.opcode != 0 {
                if frame.fin {
                    self.emit_inflated(frame.opcode, payload)?;
                } else {
                    self.partial = Some((frame.opcode, payload.to_vec()));
                }
            } else {
                // A plain data frame (or RSV1 on a continuation, which
                // tungstenite then rejects as the protocol error it is).
                self.out.extend_from_slice(&bytes);
            }
        }
        Ok(())
    }

    fn emit_inflated(&mut self, opcode: u8, compressed: &[u8]) -> io::Result<()> {
        let plain = inflate(compressed)?;
        self.out
            .extend_from_slice(&frame_header(true, opcode, plain.len(), None));
        self.out.extend_from_slice(&plain);
        self.inflated += 1;
        INFLATED.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Turns the complete frames of `pending` into what goes on the wire.
    fn outgoing(&mut self) -> io::Result<Vec<u8>> {
        if self.phase != Phase::Frames {
            return Ok(std::mem::take(&mut self.pending));
        }
        let mut wire = Vec::new();
        while let Some(frame) = parse(&self.pending)? {
            let bytes: Vec<u8> = self.pending.drain(..frame.len).collect();
            let compressible =
                frame.fin && matches!(frame.opcode, 1 | 2) && bytes[0] & 0x70 == 0 && frame.masked;
            if !compressible {
                wire.extend_from_slice(&bytes);
                continue;
            }
            let key: [u8; 4] = bytes[frame.header - 4..frame.header].try_into().unwrap();
            let mut payload = bytes[frame.header..].to_vec();
            apply_mask(&mut payload, key);
            let mut compressed = deflate(&payload);
            apply_mask(&mut compressed, key);
            let mut header = frame_header(true, frame.opcode, compressed.len(), Some(key));
            header[0] |= 0x40;
            wire.extend_from_slice(&header);
            wire.extend_from_slice(&compressed);
            self.deflated += 1;
            DEFLATED.fetch_add(1, Ordering::Relaxed);
        }
        Ok(wire)
    }
}

impl<S: Write> DeflateStream<S> {
    fn send_unsent(&mut self) -> io::Result<()> {
        let mut sent = 0;
        let result = loop {
            if sent == self.unsent.len() {
                break Ok(());
            }
            match self.inner.write(&self.unsent[sent..]) {
                Ok(0) => break Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        self.unsent.drain(..sent);
        result
    }
}

impl<S: Read> Read for DeflateStream<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.out_at < self.out.len() {
                let n = buf.len().min(self.out.len() - self.out_at);
                buf[..n].copy_from_slice(&self.out[self.out_at..self.out_at + n]);
                self.out_at += n;
                if self.out_at == self.out.len() {
                    self.out.clear();
                    self.out_at = 0;
                }
                return Ok(n);
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = self.inner.read(&mut chunk)?;
            if n == 0 {
                // EOF; a frame cut short stays unread, as on a plain socket.
                return Ok(0);
            }
            self.raw.extend_from_slice(&chunk[..n]);
            self.process()?;
        }
    }
}

impl<S: Write> Write for DeflateStream<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.phase == Phase::Plain {
            return self.inner.write(buf);
        }
        // Accepted whole: what the socket does not take now stays in
        // `unsent`, so tungstenite never writes a byte twice.
        self.pending.extend_from_slice(buf);
        let wire = self.outgoing()?;
        self.unsent.extend_from_slice(&wire);
        match self.send_unsent() {
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut => {
            }
            other => other?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_unsent()?;
        self.inner.flush()
    }
}

/// Where a complete frame in a buffer ends.
#[derive(Debug)]
struct Frame {
    fin: bool,
    opcode: u8,
    masked: bool,
    /// Header length including any mask key.
    header: usize,
    /// Header plus payload.
    len: usize,
}

/// The frame at the start of `bytes`, or `None` until it is complete.
fn parse(bytes: &[u8]) -> io::Result<Option<Frame>> {
    if bytes.len() < 2 {
        return Ok(None);
    }
    let masked = bytes[1] & 0x80 != 0;
    let (length, mut header) = match bytes[1] & 0x7f {
        126 if bytes.len() < 4 => return Ok(None),
        126 => (u64::from(u16::from_be_bytes([bytes[2], bytes[3]])), 4),
        127 if bytes.len() < 10 => return Ok(None),
        127 => (u64::from_be_bytes(bytes[2..10].try_into().unwrap()), 10),
        short => (u64::from(short), 2),
    };
    if length > MAX_MESSAGE as u64 {
        return Err(invalid("frame over the limit"));
    }
    if masked {
        header += 4;
    }
    let len = header + length as usize;
    if bytes.len() < len {
        return Ok(None);
    }
    Ok(Some(Frame {
        fin: bytes[0] & 0x80 != 0,
        opcode: bytes[0] & 0x0f,
        masked,
        header,
        len,
    }))
}

/// A frame header: FIN as given, no RSV bits, the shortest length form.
pub fn frame_header(fin: bool, opcode: u8, len: usize, mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut header = vec![(u8::from(fin) << 7) | opcode];
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    if len < 126 {
        header.push(mask_bit | len as u8);
    } else if len <= 0xffff {
        header.push(mask_bit | 126);
        header.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        header.push(mask_bit | 127);
        header.extend_from_slice(&(len as u64).to_be_bytes());
    }
    if let Some(key) = mask {
        header.extend_from_slice(&key);
    }
    header
}

fn apply_mask(bytes: &mut [u8], key: [u8; 4]) {
    for (i, b) in bytes.iter_mut().enumerate() {
        *b ^= key[i % 4];
    }
}

/// Inflates one message (raw deflate, tail appended), at most
/// [`MAX_MESSAGE`] bytes.
pub fn inflate(compressed: &[u8]) -> io::Result<Vec<u8>> {
    let mut input = Vec::with_capacity(compressed.len() + TAIL.len());
    input.extend_from_slice(compressed);
    input.extend_from_slice(&TAIL);
    let mut inflater = Decompress::new(false);
    let mut plain = Vec::new();
    loop {
        let room = (plain.len().max(16 * 1024)).min(MAX_MESSAGE + 1 - plain.len());
        if room == 0 {
            return Err(invalid("inflated message over the limit"));
        }
        plain.reserve_exact(room);
        let consumed = inflater.total_in() as usize;
        let produced = plain.len();
        let status = inflater
            .decompress_vec(&input[consumed..], &mut plain, FlushDecompress::Sync)
            .map_err(|e| invalid(&format!("corrupt deflate data: {e}")))?;
        let all_in = inflater.total_in() as usize == input.len();
        if status == Status::StreamEnd || (all_in && plain.len() < plain.capacity()) {
            break;
        }
        if inflater.total_in() as usize == consumed && plain.len() == produced {
            return Err(invalid("corrupt deflate data: no progress"));
        }
    }
    if plain.len() > MAX_MESSAGE {
        return Err(invalid("inflated message over the limit"));
    }
    Ok(plain)
}

/// Compresses one message as RFC 7692 sends it: raw deflate, sync flush,
/// the `00 00 ff ff` tail removed.
pub fn deflate(plain: &[u8]) -> Vec<u8> {
    let mut encoder = DeflateEncoder::new(Vec::new(), Compression::default());
    encoder.write_all(plain).unwrap();
    encoder.flush().unwrap();
    let mut compressed = std::mem::take(encoder.get_mut());
    assert!(
        compressed.ends_with(&TAIL),
        "a sync flush ends with the tail"
    );
    compressed.truncate(compressed.len() - TAIL.len());
    compressed
}

/// `len` pseudo-random characters from a 64-letter JSON-safe alphabet:
/// deflate keeps about three quarters of them.
pub fn incompressible(len: usize) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            // xorshift64
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            char::from(ALPHABET[(state >> 58) as usize])
        })
        .collect()
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}
