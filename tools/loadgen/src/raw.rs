//! The fan-out subscribers' client stack: a hand-written WebSocket client
//! (RFC 6455, client side only), written here and sharing no code with any
//! server it measures.
//!
//! - [`RawConn::upgrade`] sends the HTTP/1.1 upgrade request and checks the
//!   `101` answer (`Sec-WebSocket-Accept` derived with tungstenite's
//!   `derive_accept_key`); bytes the server sent after the answer's head are
//!   kept and scanned as the first frames;
//! - [`RawConn::send_text`] writes one masked client text frame;
//! - [`RawConn::read`] reads the socket into a buffer shared by every
//!   connection of the worker (large reads into spare capacity: nothing is
//!   zero-filled), scans the frames in it with [`Scanner`], answers pings with
//!   masked pongs and a close with a close, and copies only an incomplete
//!   last frame into the connection's own `tail`.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::io::{self, Read, Write};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

const OP_CONTINUATION: u8 = 0;
const OP_TEXT: u8 = 1;
const OP_BINARY: u8 = 2;
const OP_CLOSE: u8 = 8;
const OP_PING: u8 = 9;
const OP_PONG: u8 = 10;

/// Largest message accepted (a whole frame or a reassembled message).
pub const MESSAGE_MAX: usize = 16 << 20;

/// Largest upgrade answer head accepted.
const HEAD_MAX: usize = 16 * 1024;

/// Why a server's bytes are not valid WebSocket frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// RSV1–3 set although no extension was negotiated (first header byte).
    Reserved(u8),
    /// An opcode RFC 6455 reserves.
    Opcode(u8),
    /// The mask bit set on a server frame.
    Masked,
    /// A control frame without FIN.
    ControlFragmented(u8),
    /// A control frame longer than 125 bytes.
    ControlTooLong(u8, u64),
    /// A 16- or 64-bit length where a shorter encoding was required.
    NonMinimalLength(u64),
    /// A 64-bit length with its most significant bit set.
    LengthMsb,
    /// A frame or message longer than [`MESSAGE_MAX`].
    TooLarge(u64),
    /// A continuation frame with no fragmented message begun.
    UnexpectedContinuation,
    /// A text or binary frame while a fragmented message is unfinished.
    Interleaved,
    /// A close frame with a one-byte payload.
    BadClose,
    /// A compressed message that is not valid deflate.
    Inflate,
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Reserved(b) => write!(f, "reserved bits set (first byte {b:#04x})"),
            FrameError::Opcode(op) => write!(f, "reserved opcode {op:#x}"),
            FrameError::Masked => write!(f, "masked frame from the server"),
            FrameError::ControlFragmented(op) => write!(f, "control frame {op:#x} without FIN"),
            FrameError::ControlTooLong(op, n) => write!(f, "control frame {op:#x} of {n} bytes"),
            FrameError::NonMinimalLength(n) => write!(f, "length {n} not minimally encoded"),
            FrameError::LengthMsb => write!(f, "64-bit length with its top bit set"),
            FrameError::TooLarge(n) => write!(f, "message of {n} bytes (limit {MESSAGE_MAX})"),
            FrameError::UnexpectedContinuation => write!(f, "continuation without a message"),
            FrameError::Interleaved => write!(f, "new message inside a fragmented one"),
            FrameError::BadClose => write!(f, "close frame with a 1-byte payload"),
            FrameError::Inflate => write!(f, "compressed message does not inflate"),
        }
    }
}

/// One frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    /// RSV1: a permessage-deflate compressed message (first frame only).
    pub rsv1: bool,
    pub opcode: u8,
    /// Bytes of the header itself (2, 4 or 10: servers do not mask).
    pub header_len: usize,
    pub payload_len: u64,
}

/// Parses the frame header at the start of `buf`: `Ok(None)` when `buf`
/// does not hold all of it yet.
#[cfg(test)]
pub fn parse_header(buf: &[u8]) -> Result<Option<Header>, FrameError> {
    parse_header_with(buf, false)
}

/// [`parse_header`] that allows RSV1 on a data frame when `deflate`
/// (permessage-deflate was negotiated).
pub fn parse_header_with(buf: &[u8], deflate: bool) -> Result<Option<Header>, FrameError> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    let rsv1 = b0 & 0x40 != 0;
    if b0 & 0x30 != 0 || (rsv1 && !(deflate && matches!(b0 & 0x0f, OP_TEXT | OP_BINARY))) {
        return Err(FrameError::Reserved(b0));
    }
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0f;
    if !matches!(
        opcode,
        OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG
    ) {
        return Err(FrameError::Opcode(opcode));
    }
    if b1 & 0x80 != 0 {
        return Err(FrameError::Masked);
    }
    let (payload_len, header_len) = match b1 & 0x7f {
        126 => {
            let Some(bytes) = buf.get(2..4) else {
                return Ok(None);
            };
            let n = u16::from_be_bytes([bytes[0], bytes[1]]) as u64;
            if n < 126 {
                return Err(FrameError::NonMinimalLength(n));
            }
            (n, 4)
        }
        127 => {
            let Some(bytes) = buf.get(2..10) else {
                return Ok(None);
            };
            let n = u64::from_be_bytes(bytes.try_into().expect("8 bytes"));
            if n >> 63 != 0 {
                return Err(FrameError::LengthMsb);
            }
            if n <= 0xffff {
                return Err(FrameError::NonMinimalLength(n));
            }
            (n, 10)
        }
        n => (n as u64, 2),
    };
    if opcode >= OP_CLOSE {
        if !fin {
            return Err(FrameError::ControlFragmented(opcode));
        }
        if payload_len > 125 {
            return Err(FrameError::ControlTooLong(opcode, payload_len));
        }
    }
    Ok(Some(Header {
        fin,
        rsv1,
        opcode,
        header_len,
        payload_len,
    }))
}

/// A whole message or control frame, as the scanner hands it over.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A text message (not checked to be UTF-8: events are scanned as bytes).
    Text(&'a [u8]),
    Binary(&'a [u8]),
    Ping(&'a [u8]),
    Pong(&'a [u8]),
    /// A close frame: its status code if it carried one.
    Close(Option<u16>),
}

/// What one [`Scanner::scan`] did.
#[derive(Debug, PartialEq, Eq)]
pub struct Scan {
    /// Bytes of `buf` consumed (whole frames only).
    pub consumed: usize,
    /// When the frame after them is incomplete and its header was read:
    /// its total size, so the caller can make room for it.
    pub pending: usize,
    /// The callback asked to stop (the rest of `buf` is not consumed).
    pub stopped: bool,
}

/// Splits a server's byte stream into frames; keeps a fragmented message
/// between calls. Consumed bytes are whole frames: the caller keeps the rest
/// and passes it again, followed by newer bytes, next time.
#[derive(Default)]
pub struct Scanner {
    /// The opcode and data of an unfinished fragmented message.
    partial: Option<(u8, Vec<u8>)>,
    /// Whether that message is compressed.
    partial_compressed: bool,
    /// permessage-deflate was negotiated: RSV1 messages are inflated.
    pub deflate: bool,
    /// The connection's own inflater, when the server keeps its context
    /// between messages (no server_no_context_takeover): its window must
    /// then live as long as the connection. `None`: the worker's shared
    /// one, reset per message.
    pub own_inflater: Option<Box<flate2::Decompress>>,
}

thread_local! {
    /// The worker's one inflater for servers without context takeover
    /// (reset per message) and the output every inflation writes to.
    static INFLATE: RefCell<(flate2::Decompress, Vec<u8>)> =
        RefCell::new((flate2::Decompress::new(false), Vec::with_capacity(64 * 1024)));
}

/// Inflates one permessage-deflate message and hands it to `on`.
fn inflated(
    own: Option<&mut flate2::Decompress>,
    payload: &[u8],
    on: &mut dyn FnMut(Frame<'_>) -> bool,
) -> Result<bool, FrameError> {
    INFLATE.with(|cell| {
        let (shared, out) = &mut *cell.borrow_mut();
        let decompress = match own {
            Some(own) => own,
            None => {
                shared.reset(false);
                shared
            }
        };
        out.clear();
        for input in [payload, &[0, 0, 0xff, 0xff][..]] {
            let mut input = input;
            loop {
                if out.len() == out.capacity() {
                    if out.len() >= MESSAGE_MAX {
                        return Err(FrameError::TooLarge(out.len() as u64));
                    }
                    out.reserve(out.capacity().max(64 * 1024));
                }
                let before = decompress.total_in();
                let status = decompress
                    .decompress_vec(input, out, flate2::FlushDecompress::Sync)
                    .map_err(|_| FrameError::Inflate)?;
                input = &input[(decompress.total_in() - before) as usize..];
                if status == flate2::Status::StreamEnd
                    || (input.is_empty() && out.len() < out.capacity())
                {
                    break;
                }
            }
        }
        Ok(on(Frame::Text(out)))
    })
}

impl Scanner {
    /// Hands every whole message and control frame of `buf` to `on`, in
    /// order, until the bytes run out or `on` returns false.
    pub fn scan(
        &mut self,
        buf: &[u8],
        on: &mut dyn FnMut(Frame<'_>) -> bool,
    ) -> Result<Scan, FrameError> {
        let mut at = 0;
        loop {
            let rest = &buf[at..];
            let Some(h) = parse_header_with(rest, self.deflate)? else {
                return Ok(Scan {
                    consumed: at,
                    pending: 0,
                    stopped: false,
                });
            };
            if h.payload_len > MESSAGE_MAX as u64 {
                return Err(FrameError::TooLarge(h.payload_len));
            }
            let total = h.header_len + h.payload_len as usize;
            if rest.len() < total {
                return Ok(Scan {
                    consumed: at,
                    pending: total,
                    stopped: false,
                });
            }
            let payload = &rest[h.header_len..total];
            at += total;
            let go = match h.opcode {
                OP_TEXT | OP_BINARY if self.partial.is_some() => {
                    return Err(FrameError::Interleaved)
                }
                OP_TEXT | OP_BINARY if !h.fin => {
                    self.partial = Some((h.opcode, payload.to_vec()));
                    self.partial_compressed = h.rsv1;
                    true
                }
                OP_TEXT if h.rsv1 => inflated(self.own_inflater.as_deref_mut(), payload, on)?,
                OP_TEXT => on(Frame::Text(payload)),
                OP_BINARY => on(Frame::Binary(payload)),
                OP_CONTINUATION => {
                    let Some((opcode, mut data)) = self.partial.take() else {
                        return Err(FrameError::UnexpectedContinuation);
                    };
                    let size = data.len() + payload.len();
                    if size > MESSAGE_MAX {
                        return Err(FrameError::TooLarge(size as u64));
                    }
                    data.extend_from_slice(payload);
                    if !h.fin {
                        self.partial = Some((opcode, data));
                        true
                    } else if opcode == OP_TEXT && self.partial_compressed {
                        inflated(self.own_inflater.as_deref_mut(), &data, on)?
                    } else if opcode == OP_TEXT {
                        on(Frame::Text(&data))
                    } else {
                        on(Frame::Binary(&data))
                    }
                }
                OP_CLOSE => match *payload {
                    [] => on(Frame::Close(None)),
                    [_] => return Err(FrameError::BadClose),
                    [hi, lo, ..] => on(Frame::Close(Some(u16::from_be_bytes([hi, lo])))),
                },
                OP_PING => on(Frame::Ping(payload)),
                _ => on(Frame::Pong(payload)),
            };
            if !go {
                return Ok(Scan {
                    consumed: at,
                    pending: 0,
                    stopped: true,
                });
            }
        }
    }
}

thread_local! {
    static MASK_STATE: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom writes at most 8 bytes into the stack array.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), 8, 0) };
    let random = u64::from_ne_bytes(bytes);
    let fallback = crate::stats::monotonic_ns() ^ ((std::process::id() as u64) << 32);
    (if n == 8 { random } else { fallback }) | 1
}

/// A fresh masking key (xorshift64*: masking only has to stop a proxy from
/// recognising the bytes, which nothing on loopback tries to do).
fn mask_key() -> [u8; 4] {
    MASK_STATE.with(|state| {
        let mut x = state.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        state.set(x);
        ((x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) as u32).to_ne_bytes()
    })
}

/// Appends one masked client frame (FIN set) to `out`.
pub fn client_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let key = mask_key();
    out.extend_from_slice(&key);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i & 3]));
}

/// How a [`RawConn::read`] ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// The callback asked to stop.
    Stopped,
    /// The server closed the WebSocket (close frame; answered).
    Closed(Option<u16>),
    /// The server closed the TCP connection without a close frame.
    Eof,
}

/// Why a [`RawConn::read`] failed.
#[derive(Debug)]
pub enum ReadError {
    Io(io::Error),
    Protocol(FrameError),
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Io(e) => write!(f, "read: {e}"),
            ReadError::Protocol(e) => write!(f, "bad frame: {e}"),
        }
    }
}

/// One client WebSocket over a raw TcpStream, or over TLS (wss) on it.
pub struct RawConn {
    stream: TcpStream,
    /// The TLS session when the connection is wss: every byte read from
    /// `stream` goes through it, every byte written is sealed by it. `None`:
    /// plain ws, the path that reads the socket straight into the buffers.
    tls: Option<Box<rustls::ClientConnection>>,
    /// Bytes received but not consumed: an incomplete frame (usually empty).
    tail: Vec<u8>,
    /// Total size of the frame `tail` begins, when its header is complete.
    pending: usize,
    scanner: Scanner,
    /// Frames to write (pongs, the close answer) before the next read.
    out: Vec<u8>,
}

impl RawConn {
    /// Whether the TLS handshake resumed a session (TLS 1.3 PSK from a
    /// ticket, or a TLS 1.2 session); `None` on plain ws.
    pub fn tls_resumed(&self) -> Option<bool> {
        self.tls
            .as_ref()
            .map(|session| session.handshake_kind() == Some(rustls::HandshakeKind::Resumed))
    }

    /// Upgrades `stream`: `GET target` with `Host: host`; with `tls`
    /// (wss), after a TLS handshake with that configuration (full, or
    /// resumed when it has a session store holding a ticket), the
    /// server's name being `host` without its port.
    pub async fn upgrade(
        mut stream: TcpStream,
        host: &str,
        target: &str,
        deflate: bool,
        tls: Option<&Arc<rustls::ClientConfig>>,
    ) -> Result<Self, String> {
        let mut tls = match tls {
            Some(config) => {
                let name = host_name(host);
                let name = rustls::pki_types::ServerName::try_from(name.to_string())
                    .map_err(|e| format!("tls: server name {name:?}: {e}"))?;
                let mut session = Box::new(
                    rustls::ClientConnection::new(config.clone(), name)
                        .map_err(|e| format!("tls: {e}"))?,
                );
                tls_handshake(&stream, &mut session)
                    .await
                    .map_err(|e| format!("tls handshake: {e}"))?;
                Some(session)
            }
            None => None,
        };
        let key = generate_key();
        let offer = if deflate {
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
        } else {
            ""
        };
        let request = format!(
            "GET {target} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n"
        );
        send(&mut stream, tls.as_deref_mut(), request.as_bytes())
            .await
            .map_err(|e| format!("send upgrade: {e}"))?;
        let mut buf = Vec::with_capacity(1024);
        let end = loop {
            if let Some(end) = memchr::memmem::find(&buf, b"\r\n\r\n") {
                break end;
            }
            if buf.len() > HEAD_MAX {
                return Err(format!("upgrade answer head over {HEAD_MAX} bytes"));
            }
            buf.reserve(1024);
            let n = match tls.as_deref_mut() {
                None => stream.read_buf(&mut buf).await,
                Some(session) => tls_read(&stream, session, &mut buf).await,
            }
            .map_err(|e| format!("upgrade: read: {e}"))?;
            if n == 0 {
                return Err(format!(
                    "upgrade: eof after {:?}",
                    String::from_utf8_lossy(&buf)
                ));
            }
        };
        let negotiated = check_answer(&buf[..end], &derive_accept_key(key.as_bytes()), deflate)?;
        Ok(RawConn {
            stream,
            tls,
            tail: buf[end + 4..].to_vec(),
            pending: 0,
            scanner: Scanner {
                deflate: negotiated != Deflate::Off,
                own_inflater: (negotiated == Deflate::ContextTakeover)
                    .then(|| Box::new(flate2::Decompress::new(false))),
                ..Scanner::default()
            },
            out: Vec::new(),
        })
    }

    /// True when the server accepted permessage-deflate.
    pub fn deflates(&self) -> bool {
        self.scanner.deflate
    }

    /// Writes one masked text frame.
    pub async fn send_text(&mut self, text: &str) -> io::Result<()> {
        let mut frame = Vec::with_capacity(text.len() + 14);
        client_frame(&mut frame, OP_TEXT, text.as_bytes());
        send(&mut self.stream, self.tls.as_deref_mut(), &frame).await
    }

    /// Reads and scans frames until `on` returns false or the connection
    /// ends, handing `on` every text message and the CLOCK_MONOTONIC time
    /// (ns) of the read that completed it. `shared` is the worker's read
    /// buffer: its capacity is the most one read takes.
    pub async fn read(
        &mut self,
        shared: &RefCell<Vec<u8>>,
        on: &mut dyn FnMut(&[u8], u64) -> bool,
    ) -> Result<End, ReadError> {
        let RawConn {
            stream,
            tls,
            tail,
            pending,
            scanner,
            out,
        } = self;
        // Bytes that came with the upgrade answer (or were left by the last
        // call) first.
        let mut end = None;
        if !tail.is_empty() {
            let scan = scan_into(
                scanner,
                tail,
                out,
                &mut end,
                crate::stats::monotonic_ns(),
                on,
            )
            .map_err(ReadError::Protocol)?;
            tail.drain(..scan.consumed);
            *pending = scan.pending;
        }
        loop {
            if !out.is_empty() {
                send(stream, tls.as_deref_mut(), out)
                    .await
                    .map_err(ReadError::Io)?;
                out.clear();
            }
            if let Some(session) = tls.as_deref_mut() {
                if session.wants_write() {
                    tls_flush(stream, session).await.map_err(ReadError::Io)?;
                }
            }
            if let Some(end) = end {
                return Ok(end);
            }
            stream.readable().await.map_err(ReadError::Io)?;
            let mut guard = shared.borrow_mut();
            // An incomplete frame larger than half the shared buffer grows
            // in the connection's own `tail` instead of being copied back
            // and forth.
            let own = tail.len() >= guard.capacity() / 2;
            let buf: &mut Vec<u8> = if own {
                tail.reserve(pending.saturating_sub(tail.len()).max(64 * 1024));
                &mut *tail
            } else {
                guard.clear();
                guard.extend_from_slice(tail);
                &mut guard
            };
            if let Some(session) = tls.as_deref_mut() {
                // wss: one read of records into the session, then every
                // plaintext byte it opened appended to `buf`.
                let before = buf.len();
                match tls_pull(stream, session, buf) {
                    Ok(true) => {}
                    Ok(false) => return Ok(End::Eof),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(ReadError::Io(e)),
                }
                if buf.len() == before {
                    // Only part of a record yet: `buf` still holds just
                    // what `tail` holds.
                    continue;
                }
                let now = crate::stats::monotonic_ns();
                let scan =
                    scan_into(scanner, buf, out, &mut end, now, on).map_err(ReadError::Protocol)?;
                *pending = scan.pending;
                if own {
                    tail.drain(..scan.consumed);
                } else {
                    tail.clear();
                    tail.extend_from_slice(&guard[scan.consumed..]);
                }
                continue;
            }
            let room = buf.capacity() - buf.len();
            let n = match stream.try_read_buf(buf) {
                Ok(0) => return Ok(End::Eof),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(ReadError::Io(e)),
            };
            if n < room {
                // A short read emptied the socket: forget its readiness now
                // (as tokio's own poll_read does) instead of finding out with
                // one more read that fails with EAGAIN. New data re-arms it.
                let _ = stream.try_io(Interest::READABLE, || {
                    Err::<(), _>(io::ErrorKind::WouldBlock.into())
                });
            }
            let now = crate::stats::monotonic_ns();
            let scan =
                scan_into(scanner, buf, out, &mut end, now, on).map_err(ReadError::Protocol)?;
            *pending = scan.pending;
            if own {
                tail.drain(..scan.consumed);
            } else {
                tail.clear();
                tail.extend_from_slice(&guard[scan.consumed..]);
            }
        }
    }
}

/// `host:port` (or `[v6]:port`) → the name the certificate must carry.
fn host_name(host: &str) -> &str {
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    name.trim_start_matches('[').trim_end_matches(']')
}

/// The socket as blocking-style `Read`/`Write` for rustls: a would-block
/// read or write is `WouldBlock` (and clears the socket's readiness).
struct SocketIo<'a>(&'a TcpStream);

impl Read for SocketIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl Write for SocketIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes every record the session has sealed to the socket.
async fn tls_flush(stream: &TcpStream, session: &mut rustls::ClientConnection) -> io::Result<()> {
    while session.wants_write() {
        match session.write_tls(&mut SocketIo(stream)) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => stream.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A TLS handshake on `stream`.
async fn tls_handshake(
    stream: &TcpStream,
    session: &mut rustls::ClientConnection,
) -> io::Result<()> {
    while session.is_handshaking() {
        tls_flush(stream, session).await?;
        if !session.is_handshaking() {
            break;
        }
        if session.wants_read() {
            stream.readable().await?;
            match session.read_tls(&mut SocketIo(stream)) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
            if let Err(e) = session.process_new_packets() {
                // Send the alert that says why before giving up.
                let _ = tls_flush(stream, session).await;
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
        }
    }
    tls_flush(stream, session).await
}

/// Reads records from the socket once (it must be readable) and appends the
/// plaintext they open to `buf`: `Ok(false)` at the end of the stream (TCP
/// EOF or the server's close_notify), `WouldBlock` when nothing was there.
fn tls_pull(
    stream: &TcpStream,
    session: &mut rustls::ClientConnection,
    buf: &mut Vec<u8>,
) -> io::Result<bool> {
    if session.read_tls(&mut SocketIo(stream))? == 0 {
        return Ok(false);
    }
    let state = session
        .process_new_packets()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let start = buf.len();
    let mut available = state.plaintext_bytes_to_read();
    if available > 0 {
        let at = buf.len();
        buf.resize(at + available, 0);
        let mut filled = at;
        while available > 0 {
            let n = session.reader().read(&mut buf[filled..])?;
            if n == 0 {
                break;
            }
            filled += n;
            available -= n;
        }
        buf.truncate(filled);
    }
    Ok(buf.len() > start || !state.peer_has_closed())
}

/// Reads some plaintext into `buf` (waiting for the socket): the number of
/// bytes added, 0 at the end of the stream.
async fn tls_read(
    stream: &TcpStream,
    session: &mut rustls::ClientConnection,
    buf: &mut Vec<u8>,
) -> io::Result<usize> {
    loop {
        stream.readable().await?;
        let before = buf.len();
        match tls_pull(stream, session, buf) {
            Ok(false) if buf.len() == before => return Ok(0),
            Ok(_) if buf.len() > before => return Ok(buf.len() - before),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        if session.wants_write() {
            tls_flush(stream, session).await?;
        }
    }
}

/// Writes `bytes` to the socket, sealed by `tls` when the connection is wss.
async fn send(
    stream: &mut TcpStream,
    tls: Option<&mut rustls::ClientConnection>,
    bytes: &[u8],
) -> io::Result<()> {
    match tls {
        None => stream.write_all(bytes).await,
        Some(session) => {
            session.writer().write_all(bytes)?;
            tls_flush(stream, session).await
        }
    }
}

/// Scans `buf`: text messages to `on`, pings answered into `out`, a close
/// answered into `out` and recorded in `end`.
fn scan_into(
    scanner: &mut Scanner,
    buf: &[u8],
    out: &mut Vec<u8>,
    end: &mut Option<End>,
    now: u64,
    on: &mut dyn FnMut(&[u8], u64) -> bool,
) -> Result<Scan, FrameError> {
    scanner.scan(buf, &mut |frame| match frame {
        Frame::Text(text) => {
            let go = on(text, now);
            if !go {
                *end = Some(End::Stopped);
            }
            go
        }
        Frame::Binary(_) | Frame::Pong(_) => true,
        Frame::Ping(payload) => {
            client_frame(out, OP_PONG, payload);
            true
        }
        Frame::Close(code) => {
            let echo = code.map(u16::to_be_bytes);
            client_frame(out, OP_CLOSE, echo.as_ref().map_or(&[][..], |c| &c[..]));
            *end = Some(End::Closed(code));
            false
        }
    })
}

/// What the server answered to a permessage-deflate offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deflate {
    /// Declined (or not offered).
    Off,
    /// Accepted with server_no_context_takeover: the worker's one inflater
    /// serves the connection, reset per message.
    NoContextTakeover,
    /// Accepted with the server keeping its context: the connection needs
    /// an inflater of its own.
    ContextTakeover,
}

/// Checks the head of the upgrade answer (up to, without, its blank line)
/// and what it says about permessage-deflate (accepted only when `offered`).
fn check_answer(head: &[u8], accept: &str, offered: bool) -> Result<Deflate, String> {
    let head = String::from_utf8_lossy(head);
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or("");
    if !status.starts_with("HTTP/1.1 101") {
        return Err(format!("upgrade refused: {status}"));
    }
    let mut upgrade = false;
    let mut connection = false;
    let mut accepted = false;
    let mut deflate = Deflate::Off;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(format!("upgrade: bad header line {line:?}"));
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "upgrade" => upgrade = value.eq_ignore_ascii_case("websocket"),
            "connection" => {
                connection = value
                    .split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            }
            "sec-websocket-accept" => accepted = value == accept,
            "sec-websocket-extensions" if offered && value.starts_with("permessage-deflate") => {
                deflate = if value.contains("server_no_context_takeover") {
                    Deflate::NoContextTakeover
                } else {
                    Deflate::ContextTakeover
                }
            }
            "sec-websocket-extensions" => {
                return Err(format!("upgrade: unrequested extension {value}"))
            }
            _ => {}
        }
    }
    if !(upgrade && connection && accepted) {
        return Err(format!(
            "upgrade: bad answer (upgrade {upgrade}, connection {connection}, accept {accepted})"
        ));
    }
    Ok(deflate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_name_is_the_host_without_its_port() {
        assert_eq!(host_name("127.0.0.1:8443"), "127.0.0.1");
        assert_eq!(host_name("localhost:1"), "localhost");
        assert_eq!(host_name("localhost"), "localhost");
        assert_eq!(host_name("[::1]:8443"), "::1");
    }

    fn server_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![(u8::from(fin) << 7) | opcode];
        match payload.len() {
            n if n < 126 => out.push(n as u8),
            n if n <= 0xffff => {
                out.push(126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(payload);
        out
    }

    #[derive(Debug, PartialEq, Eq)]
    enum Owned {
        Text(Vec<u8>),
        Binary(Vec<u8>),
        Ping(Vec<u8>),
        Pong(Vec<u8>),
        Close(Option<u16>),
    }

    fn owned(frame: Frame<'_>) -> Owned {
        match frame {
            Frame::Text(t) => Owned::Text(t.to_vec()),
            Frame::Binary(b) => Owned::Binary(b.to_vec()),
            Frame::Ping(p) => Owned::Ping(p.to_vec()),
            Frame::Pong(p) => Owned::Pong(p.to_vec()),
            Frame::Close(c) => Owned::Close(c),
        }
    }

    /// Feeds `stream` to a scanner in pieces of `step` bytes, keeping the
    /// unconsumed tail as the connection does.
    fn scan_in_steps(stream: &[u8], step: usize) -> Result<Vec<Owned>, FrameError> {
        let mut scanner = Scanner::default();
        let mut got = Vec::new();
        let mut tail = Vec::new();
        for piece in stream.chunks(step) {
            tail.extend_from_slice(piece);
            let scan = scanner.scan(&tail, &mut |f| {
                got.push(owned(f));
                true
            })?;
            tail.drain(..scan.consumed);
        }
        assert!(tail.is_empty(), "{} bytes left over", tail.len());
        Ok(got)
    }

    #[test]
    fn frames_split_anywhere() {
        let mut stream = Vec::new();
        stream.extend(server_frame(true, OP_TEXT, br#"{"seq":1}"#));
        stream.extend(server_frame(true, OP_PING, b"hb"));
        stream.extend(server_frame(true, OP_TEXT, &[b'a'; 300]));
        stream.extend(server_frame(true, OP_BINARY, &[7; 3]));
        stream.extend(server_frame(true, OP_PONG, b""));
        let want = vec![
            Owned::Text(br#"{"seq":1}"#.to_vec()),
            Owned::Ping(b"hb".to_vec()),
            Owned::Text(vec![b'a'; 300]),
            Owned::Binary(vec![7; 3]),
            Owned::Pong(Vec::new()),
        ];
        for step in 1..=stream.len() {
            assert_eq!(scan_in_steps(&stream, step).unwrap(), want, "step {step}");
        }
    }

    #[test]
    fn lengths_7_16_and_64_bit() {
        for len in [0usize, 125, 126, 65_535, 65_536, 200_000] {
            let frame = server_frame(true, OP_TEXT, &vec![b'x'; len]);
            let h = parse_header(&frame).unwrap().unwrap();
            assert_eq!(h.payload_len, len as u64);
            assert_eq!(
                h.header_len,
                match len {
                    0..=125 => 2,
                    126..=65_535 => 4,
                    _ => 10,
                }
            );
            // Every proper prefix of the header is "incomplete", not an error.
            for cut in 0..h.header_len {
                assert_eq!(parse_header(&frame[..cut]), Ok(None));
            }
            let got = scan_in_steps(&frame, 4096).unwrap();
            assert_eq!(got, vec![Owned::Text(vec![b'x'; len])]);
        }
    }

    #[test]
    fn incomplete_frame_reports_its_size() {
        let frame = server_frame(true, OP_TEXT, &[b'y'; 1000]);
        let scan = Scanner::default()
            .scan(&frame[..10], &mut |_| panic!("no frame yet"))
            .unwrap();
        assert_eq!(
            scan,
            Scan {
                consumed: 0,
                pending: 1004,
                stopped: false
            }
        );
    }

    #[test]
    fn close_and_stop() {
        let mut stream = server_frame(true, OP_TEXT, b"a");
        stream.extend(server_frame(true, OP_CLOSE, &1001u16.to_be_bytes()));
        stream.extend(server_frame(true, OP_TEXT, b"after"));
        let mut got = Vec::new();
        let scan = Scanner::default()
            .scan(&stream, &mut |f| {
                let go = !matches!(f, Frame::Close(_));
                got.push(owned(f));
                go
            })
            .unwrap();
        assert_eq!(
            got,
            vec![Owned::Text(b"a".to_vec()), Owned::Close(Some(1001))]
        );
        assert!(scan.stopped);
        assert_eq!(scan.consumed, stream.len() - 7);
        assert_eq!(
            scan_in_steps(&server_frame(true, OP_CLOSE, b""), 1).unwrap(),
            vec![Owned::Close(None)]
        );
        assert_eq!(
            scan_in_steps(&server_frame(true, OP_CLOSE, b"x"), 1),
            Err(FrameError::BadClose)
        );
    }

    #[test]
    fn fragmented_text_with_a_ping_inside() {
        let mut stream = server_frame(false, OP_TEXT, b"hel");
        stream.extend(server_frame(true, OP_PING, b"p"));
        stream.extend(server_frame(false, OP_CONTINUATION, b"lo "));
        stream.extend(server_frame(true, OP_CONTINUATION, b"world"));
        assert_eq!(
            scan_in_steps(&stream, 3).unwrap(),
            vec![
                Owned::Ping(b"p".to_vec()),
                Owned::Text(b"hello world".to_vec())
            ]
        );
    }

    #[test]
    fn bad_frames_are_errors() {
        let check = |bytes: &[u8], want: FrameError| {
            assert_eq!(
                Scanner::default().scan(bytes, &mut |_| true),
                Err(want),
                "{bytes:?}"
            )
        };
        check(&[0x83, 0x00], FrameError::Opcode(3));
        check(&[0x8b, 0x00], FrameError::Opcode(0xb));
        check(&[0xc1, 0x00], FrameError::Reserved(0xc1));
        check(&[0x81, 0x81, 1, 2, 3, 4, b'x'], FrameError::Masked);
        check(&[0x09, 0x00], FrameError::ControlFragmented(OP_PING));
        check(
            &[0x89, 126, 0, 126],
            FrameError::ControlTooLong(OP_PING, 126),
        );
        check(&[0x81, 126, 0, 125], FrameError::NonMinimalLength(125));
        let mut long = vec![0x81, 127];
        long.extend_from_slice(&65_535u64.to_be_bytes());
        check(&long, FrameError::NonMinimalLength(65_535));
        let mut msb = vec![0x81, 127];
        msb.extend_from_slice(&(1u64 << 63).to_be_bytes());
        check(&msb, FrameError::LengthMsb);
        let mut huge = vec![0x82, 127];
        huge.extend_from_slice(&(MESSAGE_MAX as u64 + 1).to_be_bytes());
        check(&huge, FrameError::TooLarge(MESSAGE_MAX as u64 + 1));
        check(&[0x80, 0x01, b'x'], FrameError::UnexpectedContinuation);
        let mut nested = server_frame(false, OP_TEXT, b"a");
        nested.extend(server_frame(true, OP_TEXT, b"b"));
        check(&nested, FrameError::Interleaved);
    }

    #[test]
    fn client_frames_are_masked() {
        for len in [0usize, 5, 125, 126, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut out = Vec::new();
            client_frame(&mut out, OP_PONG, &payload);
            assert_eq!(out[0], 0x80 | OP_PONG);
            assert_ne!(out[1] & 0x80, 0, "mask bit");
            let (len_bytes, header) = match out[1] & 0x7f {
                126 => (2, 4),
                127 => (8, 10),
                n => {
                    assert_eq!(n as usize, len);
                    (0, 2)
                }
            };
            let n = out[2..2 + len_bytes]
                .iter()
                .fold(0usize, |n, &b| (n << 8) | b as usize);
            if len_bytes > 0 {
                assert_eq!(n, len);
            }
            let key = &out[header..header + 4];
            let unmasked: Vec<u8> = out[header + 4..]
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ key[i & 3])
                .collect();
            assert_eq!(unmasked, payload);
        }
    }

    #[test]
    fn upgrade_answer_checks() {
        let accept = derive_accept_key(b"dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        let good = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}"
        );
        assert_eq!(
            check_answer(good.as_bytes(), &accept, false),
            Ok(Deflate::Off)
        );
        assert!(check_answer(
            b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0",
            &accept,
            false
        )
        .is_err());
        let wrong = good.replace(&accept, "AAAA");
        assert!(check_answer(wrong.as_bytes(), &accept, false).is_err());
        let deflate = format!("{good}\r\nSec-WebSocket-Extensions: permessage-deflate");
        assert!(check_answer(deflate.as_bytes(), &accept, false).is_err());
        let takeover = format!("{good}\r\nSec-WebSocket-Extensions: permessage-deflate");
        assert_eq!(
            check_answer(takeover.as_bytes(), &accept, true),
            Ok(Deflate::ContextTakeover)
        );
        let accepted = format!(
            "{good}\r\nSec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        );
        assert_eq!(
            check_answer(accepted.as_bytes(), &accept, true),
            Ok(Deflate::NoContextTakeover)
        );
        assert_eq!(
            check_answer(good.as_bytes(), &accept, true),
            Ok(Deflate::Off)
        );
    }

    #[test]
    fn compressed_messages_are_inflated_when_negotiated() {
        let text = br#"{"type":"event","seq":7,"data":{"pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}}"#;
        let mut compress = flate2::Compress::new(flate2::Compression::default(), false);
        let mut deflated = Vec::with_capacity(256);
        compress
            .compress_vec(text, &mut deflated, flate2::FlushCompress::Sync)
            .unwrap();
        deflated.truncate(deflated.len() - 4);
        let mut frame = server_frame(true, OP_TEXT, &deflated);
        frame[0] |= 0x40;
        let mut plain = Scanner::default();
        assert!(plain.scan(&frame, &mut |_| true).is_err());
        let mut scanner = Scanner {
            deflate: true,
            ..Scanner::default()
        };
        let mut got = Vec::new();
        scanner
            .scan(&frame, &mut |f| {
                got.push(owned(f));
                true
            })
            .unwrap();
        assert_eq!(got, vec![Owned::Text(text.to_vec())]);
    }
}
