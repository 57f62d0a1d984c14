//! TLS termination in the process (rustls, ring provider): the pair from
//! `--tls-cert`/`--tls-key`, reloaded for new handshakes on SIGHUP or when a
//! file changes; the handshake; a wss upgrade (TLS 1.3 or 1.2) handed to
//! the reactor with its traffic secrets (`tls_wire` seals and opens its
//! records from then on); and, for everything else (plain-HTTP routes, the
//! admin listener), the terminator that pumps plaintext to the ordinary
//! code over a socketpair (docs/ARCHITECTURE.md, TLS).

use std::io::{Read, Write};
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, RwLock};
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::net::TcpStream;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, ServerConfig, ServerConnection};
use rustls::sign::CertifiedKey;

use super::Shard;
use crate::limits::HEAD_TIMEOUT_MS;
use crate::metrics::TlsFailure;

/// Handshakes in flight on one shard at most; more are closed at once (a
/// ClientHello flood costs a refused socket, not a handshake each). One
/// address holds at most its share of `--http-connections-per-ip` of them
/// (its [`Place`] is taken before): 128 of 1,024 with the default 256 and
/// two shards.
pub const HANDSHAKES_IN_FLIGHT_MAX: usize = 1024;

/// A TLS connection's place in its source address's count of connections
/// that are not WebSockets (`--http-connections-per-ip`, on the listener
/// of its [`Side`]): taken at accept, before a byte is read (past the
/// address's share the connection is closed at once: no handshake, no
/// answer), and held for the TCP connection's life by the terminator and
/// by the plaintext side it feeds. It ends when the last holder goes, or
/// earlier by [`Place::end`] when the connection becomes a WebSocket.
#[derive(Clone)]
pub struct Place(Rc<PlaceInner>);

struct PlaceInner {
    shard: Rc<Shard>,
    side: Side,
    /// The key the count was kept under, until it ends.
    key: std::cell::Cell<Option<Option<std::net::IpAddr>>>,
}

impl Place {
    /// Counts a connection from `peer` on `side`'s listener; `None` when
    /// the address has its share (close the connection unread).
    pub fn take(shard: &Rc<Shard>, side: Side, peer: Option<std::net::IpAddr>) -> Option<Place> {
        let key = limit(shard, side).enter(peer)?.keep();
        Some(Place(Rc::new(PlaceInner {
            shard: shard.clone(),
            side,
            key: std::cell::Cell::new(Some(key)),
        })))
    }

    /// Ends the count now (the connection became a WebSocket); the
    /// holders' drops then do nothing.
    pub fn end(&self) {
        self.0.end();
    }
}

impl PlaceInner {
    fn end(&self) {
        if let Some(key) = self.key.take() {
            limit(&self.shard, self.side).release(key);
        }
    }
}

impl Drop for PlaceInner {
    fn drop(&mut self) {
        self.end();
    }
}

/// The per-address connection count of `side`'s listener.
fn limit(shard: &Shard, side: Side) -> &super::waits::AddressLimit {
    match side {
        Side::Public => &shard.access.http_connections,
        Side::Admin => &shard.access.admin_connections,
    }
}

/// The certificate and key files and the pair loaded from them; shared by
/// every shard, swapped in place by a reload.
#[derive(Debug)]
pub struct Tls {
    /// The certificate chain file.
    pub cert: PathBuf,
    /// The private key file.
    pub key: PathBuf,
    resolver: Arc<Resolver>,
    config: Arc<ServerConfig>,
}

#[derive(Debug)]
struct Resolver {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().ok()?.clone())
    }
}

// ring rather than aws-lc-rs: no C toolchain beyond cc, no cmake; its
// deprecation is only that it offers no post-quantum key exchange.
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads a certificate chain and its key; every error is one line naming
/// the file (never the key's bytes).
pub fn load_pair(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let cert_bytes = std::fs::read(cert)
        .map_err(|e| format!("cannot read TLS certificate {}: {e}", cert.display()))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_bytes)
        .collect::<Result<_, _>>()
        .map_err(|_| format!("TLS certificate {}: not valid PEM", cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "TLS certificate {}: no CERTIFICATE block in the PEM file",
            cert.display()
        ));
    }
    let key_bytes =
        std::fs::read(key).map_err(|e| format!("cannot read TLS key {}: {e}", key.display()))?;
    let private = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|_| {
        format!(
            "TLS key {}: no PKCS#8, PKCS#1 (RSA) or SEC1 (EC) private key in the PEM file",
            key.display()
        )
    })?;
    let signing = provider()
        .key_provider
        .load_private_key(private)
        .map_err(|_| format!("TLS key {}: unsupported private key", key.display()))?;
    let pair = CertifiedKey::new(chain, signing);
    pair.keys_match().map_err(|_| {
        format!(
            "TLS key {} does not match the certificate {}",
            key.display(),
            cert.display()
        )
    })?;
    Ok(pair)
}

impl Tls {
    /// Loads the pair and makes the server configuration: TLS 1.3 and 1.2,
    /// ALPN `http/1.1`, session tickets and a session cache for resumption.
    pub fn load(cert: &Path, key: &Path) -> Result<Tls, String> {
        let pair = load_pair(cert, key)?;
        let resolver = Arc::new(Resolver {
            current: RwLock::new(Arc::new(pair)),
        });
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| format!("TLS configuration: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        // A wss connection's traffic keys go to `tls_wire` after the
        // upgrade (hibernation: no rustls state kept).
        config.enable_secret_extraction = true;
        config.ticketer = rustls::crypto::ring::Ticketer::new()
            .map_err(|e| format!("TLS session tickets: {e}"))?;
        Ok(Tls {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            resolver,
            config: Arc::new(config),
        })
    }

    /// The configuration new handshakes use (its resolver sees reloads).
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.config.clone()
    }

    /// Loads the files again; on success new handshakes use the new pair
    /// (live connections keep theirs), otherwise the old one stays.
    pub fn reload(&self) -> Result<(), String> {
        let pair = load_pair(&self.cert, &self.key)?;
        match self.resolver.current.write() {
            Ok(mut current) => *current = Arc::new(pair),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(pair),
        }
        Ok(())
    }

    /// The files' versions (modification time, size, inode), to notice a
    /// change.
    pub fn stamp(&self) -> Option<[(std::time::SystemTime, u64, u64); 2]> {
        use std::os::unix::fs::MetadataExt;
        let of = |path: &Path| {
            let meta = std::fs::metadata(path).ok()?;
            Some((meta.modified().ok()?, meta.len(), meta.ino()))
        };
        Some([of(&self.cert)?, of(&self.key)?])
    }
}

/// A client that takes no byte of what the pump writes for this long is
/// dropped: the plaintext side's own rules (heartbeat after two intervals,
/// 1013, the HTTP write timeout) have closed it by then, but the pump,
/// blocked on the client, would not see that.
const PUMP_WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the pump still tries to deliver the last bytes (a close frame,
/// close_notify) once the plaintext side is done.
const PUMP_LAST_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes of one read in the pump, from either side.
const PUMP_READ_BYTES: usize = 16 * 1024;

/// A pump's outgoing buffer keeps at most this much capacity once drained,
/// so a connection that was sent a burst does not hold it while idle.
const PUMP_KEEP_BYTES: usize = 4096;

thread_local! {
    static IN_FLIGHT: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// The shard's one read buffer for every pump: glommio's `poll_read`
    /// waits for readiness and then reads synchronously, so no read holds
    /// a buffer while it waits, and one buffer serves every connection.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; PUMP_READ_BYTES]);
}

/// `poll_read` into the shard's scratch buffer, then `take` the bytes read.
fn poll_read_scratch(
    stream: &mut TcpStream,
    cx: &mut std::task::Context<'_>,
    take: impl FnOnce(&[u8]),
) -> Poll<std::io::Result<usize>> {
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        match Pin::new(stream).poll_read(cx, &mut scratch) {
            Poll::Ready(Ok(n)) => {
                take(&scratch[..n]);
                Poll::Ready(Ok(n))
            }
            other => other,
        }
    })
}

/// Empties a drained outgoing buffer, freeing a large one.
fn reset(buffer: &mut Vec<u8>) {
    if buffer.capacity() > PUMP_KEEP_BYTES {
        *buffer = Vec::new();
    } else {
        buffer.clear();
    }
}

struct InFlight;

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT.with(|n| n.set(n.get() - 1));
    }
}

/// Which listener a TLS connection came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The public listener (WebSocket, pages, sessions, poll, SSE).
    Public,
    /// The admin listener (`--admin-tls`).
    Admin,
}

/// Writes what rustls has to send (handshake messages, alerts).
async fn flush(conn: &mut ServerConnection, tcp: &mut TcpStream) -> std::io::Result<()> {
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out)?;
    }
    if !out.is_empty() {
        tcp.write_all(&out).await?;
    }
    Ok(())
}

/// The plain HTTP answer to a plain request on a TLS port.
const PLAIN_ON_TLS: &[u8] = b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n\
Content-Length: 24\r\nConnection: close\r\n\r\n{\"error\":\"tls_required\"}";

/// Serves one TLS connection from `peer` (counted in `place`): the
/// handshake within the head's 10 s, then the plaintext side (`Side`) over
/// a socketpair, pumping bytes both ways until either side ends.
pub async fn terminate(
    shard: Rc<Shard>,
    mut tcp: TcpStream,
    side: Side,
    config: Arc<ServerConfig>,
    peer: Option<std::net::SocketAddr>,
    place: Place,
) {
    if shard.shutdown.is_stopping() {
        return;
    }
    if IN_FLIGHT.with(|n| n.get()) >= HANDSHAKES_IN_FLIGHT_MAX {
        shard.metrics.tls_failed(TlsFailure::Busy);
        return;
    }
    IN_FLIGHT.with(|n| n.set(n.get() + 1));
    let in_flight = InFlight;
    let _ = tcp.set_nodelay(true);
    let Ok(mut conn) = ServerConnection::new(config) else {
        shard.metrics.tls_failed(TlsFailure::Handshake);
        return;
    };
    let deadline = Instant::now() + Duration::from_millis(HEAD_TIMEOUT_MS);
    let _ = tcp.set_write_timeout(Some(Duration::from_millis(HEAD_TIMEOUT_MS)));
    let mut buffer = vec![0u8; 4096];
    // Bytes read but not given to rustls: only whole records are, so that
    // when a wss connection's secrets are taken no record is half inside
    // rustls (the rest is handed on with the secrets).
    let mut raw: Vec<u8> = Vec::new();
    let mut started = false;
    while conn.is_handshaking() {
        if flush(&mut conn, &mut tcp).await.is_err() {
            shard.metrics.tls_failed(TlsFailure::Eof);
            return;
        }
        if !conn.is_handshaking() {
            break;
        }
        if let Err(failure) = read_records(
            &mut conn,
            &mut tcp,
            &mut raw,
            &mut buffer,
            deadline,
            &mut started,
        )
        .await
        {
            if failure == TlsFailure::PlainHttp && raw.first().is_some_and(u8::is_ascii_uppercase) {
                let _ = tcp.write_all(PLAIN_ON_TLS).await;
            } else if failure == TlsFailure::Handshake || failure == TlsFailure::BadRecord {
                // rustls queued the alert that says why; nothing is logged.
                let _ = flush(&mut conn, &mut tcp).await;
            }
            shard.metrics.tls_failed(failure);
            return;
        }
    }
    shard
        .metrics
        .tls_handshake_done(conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed));
    drop(in_flight);

    // The first request, within the head's deadline: an upgrade (TLS 1.3
    // or 1.2) hibernates (the secrets go to the reactor with the socket);
    // anything else is pumped to the plaintext side.
    let mut plain: Vec<u8> = Vec::new();
    let tls12 = conn.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_2);
    if side == Side::Public {
        loop {
            if drain_plaintext(&mut conn, &mut plain) {
                // close_notify before a whole request: answer it and go
                // (whatever follows it is not read).
                if !raw.is_empty() {
                    shard.metrics.tls_failed(TlsFailure::AfterCloseNotify);
                }
                conn.send_close_notify();
                let _ = flush(&mut conn, &mut tcp).await;
                return;
            }
            let next = {
                let mut headers = [httparse::EMPTY_HEADER; crate::limits::HEADERS_MAX];
                match crate::protocol::http::parse_head_with(
                    &plain,
                    &mut headers,
                    super::routes::PUBLIC_BODY_BYTES_MAX,
                    super::routes::PUBLIC_HEAD_RULES,
                ) {
                    Ok(None) if plain.len() < crate::limits::HEAD_BYTES_MAX => First::Incomplete,
                    Ok(Some(head)) if head.path == "/v1/ws" => {
                        match super::public::route(&shard, &head, peer) {
                            Ok(accepted) => First::Upgrade(accepted),
                            Err((status, error)) => First::Refused(status, error),
                        }
                    }
                    _ => First::Plain,
                }
            };
            match next {
                First::Incomplete => {}
                First::Plain => break,
                First::Upgrade(accepted) => {
                    // A WebSocket from here: its place ends with this task.
                    hibernate(&shard, conn, tcp, accepted, plain, raw, tls12).await;
                    return;
                }
                First::Refused(status, error) => {
                    // Answered here, as the plain path answers it, not by
                    // the plaintext side, which would authenticate the
                    // request again (a second upgrade token, a second
                    // failed authentication).
                    shard
                        .metrics
                        .handshake_failed(crate::metrics::HandshakeFailure::from_status(status));
                    let mut out = Vec::with_capacity(256);
                    match error {
                        Some(error) => crate::protocol::http::write_http_error(&mut out, error),
                        None => crate::protocol::http::write_error(
                            &mut out,
                            status,
                            &[("Connection", "close")],
                        ),
                    }
                    let _ = conn.writer().write_all(&out);
                    conn.send_close_notify();
                    let _ = flush(&mut conn, &mut tcp).await;
                    return;
                }
            }
            if flush(&mut conn, &mut tcp).await.is_err() {
                shard.metrics.tls_failed(TlsFailure::Eof);
                return;
            }
            if let Err(failure) = read_records(
                &mut conn,
                &mut tcp,
                &mut raw,
                &mut buffer,
                deadline,
                &mut started,
            )
            .await
            {
                // A record that does not open gets rustls' alert; a client
                // that leaves or stalls before a whole head is counted like
                // one that leaves during the handshake.
                let failure = match failure {
                    TlsFailure::Handshake => {
                        let _ = flush(&mut conn, &mut tcp).await;
                        TlsFailure::BadRecord
                    }
                    other => other,
                };
                shard.metrics.tls_failed(failure);
                return;
            }
        }
    }
    let _ = tcp.set_read_timeout(None);
    drop(buffer);
    // Whatever was read beyond whole records goes to rustls now.
    let mut rest = &raw[..];
    while !rest.is_empty() {
        if conn.read_tls(&mut rest).is_err() || conn.process_new_packets().is_err() {
            let _ = flush(&mut conn, &mut tcp).await;
            shard.metrics.tls_failed(TlsFailure::BadRecord);
            return;
        }
    }
    drop(raw);

    let mut pair = [0i32; 2];
    // SAFETY: socketpair into a stack array.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            pair.as_mut_ptr(),
        )
    } != 0
    {
        conn.send_close_notify();
        let _ = flush(&mut conn, &mut tcp).await;
        return;
    }
    // SAFETY: both descriptors are fresh and owned by the streams from here.
    let (mut inner, other_end) = unsafe {
        (
            TcpStream::from_raw_fd(pair[0]),
            TcpStream::from_raw_fd(pair[1]),
        )
    };
    // The plaintext side holds the connection's place too: it ends it if
    // the connection becomes a WebSocket (an upgrade as a later request).
    match side {
        Side::Public => glommio::spawn_local(super::public::handshake(
            shard.clone(),
            other_end,
            peer,
            place.clone(),
        ))
        .detach(),
        Side::Admin => glommio::spawn_local(super::admin::serve(
            shard.clone(),
            other_end,
            Some(place.clone()),
        ))
        .detach(),
    };
    pump(&shard, &mut conn, &mut tcp, &mut inner, plain).await;
}

/// What the first request over TLS on the public listener is.
enum First {
    /// Not a whole head yet.
    Incomplete,
    /// Anything but an upgrade (or a bad head): the plaintext side's.
    Plain,
    /// An authenticated upgrade.
    Upgrade(super::public::Accepted),
    /// A refused upgrade: its status and error answer.
    Refused(u16, Option<crate::protocol::http::HttpError>),
}

/// Whole records at the front of `raw`: their length in bytes.
fn whole_records(raw: &[u8]) -> usize {
    let mut at = 0;
    while raw.len() - at >= 5 {
        let len = 5 + usize::from(u16::from_be_bytes([raw[at + 3], raw[at + 4]]));
        if raw.len() - at < len {
            break;
        }
        at += len;
    }
    at
}

/// Reads once from the client (within `deadline`), keeps the bytes in
/// `raw` and gives rustls the whole records among them.
async fn read_records(
    conn: &mut ServerConnection,
    tcp: &mut TcpStream,
    raw: &mut Vec<u8>,
    buffer: &mut [u8],
    deadline: Instant,
    started: &mut bool,
) -> Result<(), TlsFailure> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(TlsFailure::Timeout);
    }
    let _ = tcp.set_read_timeout(Some(left));
    let read = match tcp.read(buffer).await {
        Ok(0) => return Err(TlsFailure::Eof),
        Ok(read) => read,
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return Err(TlsFailure::Timeout),
        Err(_) => return Err(TlsFailure::Eof),
    };
    let first = raw.is_empty() && conn.is_handshaking() && !conn.wants_write() && !*started;
    *started = true;
    raw.extend_from_slice(&buffer[..read]);
    if first && raw[0] != 0x16 {
        // Not a TLS handshake record: plain HTTP (or anything else).
        return Err(TlsFailure::PlainHttp);
    }
    let whole = whole_records(raw);
    let mut rest = &raw[..whole];
    while !rest.is_empty() {
        if conn.read_tls(&mut rest).is_err() || conn.process_new_packets().is_err() {
            // A record after the handshake's end (maybe in the same read as
            // the client's Finished) is a bad record, not a bad handshake.
            return Err(if conn.is_handshaking() {
                TlsFailure::Handshake
            } else {
                TlsFailure::BadRecord
            });
        }
    }
    raw.drain(..whole);
    if raw.len() > 5 + 16 * 1024 + 256 {
        // Longer than any record can be.
        return Err(TlsFailure::Handshake);
    }
    Ok(())
}

/// Moves the plaintext rustls has decrypted into `plain`; true when the
/// client's close_notify came.
fn drain_plaintext(conn: &mut ServerConnection, plain: &mut Vec<u8>) -> bool {
    let mut scratch = [0u8; 1024];
    loop {
        match conn.reader().read(&mut scratch) {
            Ok(0) => return true,
            Ok(n) => plain.extend_from_slice(&scratch[..n]),
            Err(_) => return false,
        }
    }
}

/// An accepted wss upgrade (TLS 1.3, or 1.2 when `tls12`): rustls' last
/// handshake bytes (TLS 1.3's session tickets) are written, the traffic secrets taken, and the socket
/// goes to the owner's reactor with them, like a plain upgrade; from then on
/// `tls_wire` seals and opens its records and no TLS buffer is held.
async fn hibernate(
    shard: &Shard,
    mut conn: ServerConnection,
    mut tcp: TcpStream,
    accepted: super::public::Accepted,
    plain: Vec<u8>,
    raw: Vec<u8>,
    tls12: bool,
) {
    if flush(&mut conn, &mut tcp).await.is_err() {
        return;
    }
    let leftover = plain[accepted.head_len..].to_vec();
    let session = match conn.dangerous_extract_secrets() {
        Ok(secrets) => super::tls_wire::Session::new(secrets, tls12),
        Err(_) => None,
    };
    let Some(mut session) = session else {
        shard.metrics.tls_failed(TlsFailure::Handshake);
        return;
    };
    session.set_partial(raw);
    let _ = tcp.set_read_timeout(None);
    // SAFETY: dup of a socket we own; the handoff owns the copy.
    let fd = unsafe { libc::dup(tcp.as_raw_fd()) };
    if fd < 0 {
        return;
    }
    drop(tcp);
    super::public::hand_off(shard, fd, accepted, leftover, Some(Box::new(session)));
}

/// Moves bytes between the client (TLS) and the plaintext side until both
/// are done: decrypted bytes are written to `inner`, `inner`'s bytes are
/// sealed and written to `tcp`. Each direction holds at most one read's
/// worth of bytes; a side that does not take them stops the other's reads.
async fn pump(
    shard: &Shard,
    conn: &mut ServerConnection,
    tcp: &mut TcpStream,
    inner: &mut TcpStream,
    initial: Vec<u8>,
) {
    let mut tls_out: Vec<u8> = Vec::new();
    let mut tls_sent = 0usize;
    let mut plain_out: Vec<u8> = initial;
    let mut plain_sent = 0usize;
    let mut tcp_done = false;
    let mut inner_done = false;
    let inner_fd = inner.as_raw_fd();
    let mut failed = None;
    let _ = tcp.set_write_timeout(Some(PUMP_WRITE_TIMEOUT));
    let mut last_writes = false;
    std::future::poll_fn(|cx| loop {
        let mut progress = false;
        // Sealed bytes to the client.
        if tls_sent == tls_out.len() {
            reset(&mut tls_out);
            tls_sent = 0;
            while conn.wants_write() {
                if conn.write_tls(&mut tls_out).is_err() {
                    break;
                }
            }
        }
        if tls_sent < tls_out.len() {
            match Pin::new(&mut *tcp).poll_write(cx, &tls_out[tls_sent..]) {
                Poll::Ready(Ok(n)) if n > 0 => {
                    tls_sent += n;
                    progress = true;
                }
                Poll::Ready(_) => return Poll::Ready(()),
                Poll::Pending => {}
            }
        }
        // Decrypted bytes to the plaintext side.
        if plain_sent < plain_out.len() {
            match Pin::new(&mut *inner).poll_write(cx, &plain_out[plain_sent..]) {
                Poll::Ready(Ok(n)) if n > 0 => {
                    plain_sent += n;
                    progress = true;
                }
                Poll::Ready(_) => {
                    // The plaintext side is gone: say goodbye.
                    plain_out.clear();
                    plain_sent = 0;
                    tcp_done = true;
                    if !inner_done {
                        inner_done = true;
                        conn.send_close_notify();
                    }
                    progress = true;
                }
                Poll::Pending => {}
            }
        }
        if plain_sent == plain_out.len() {
            reset(&mut plain_out);
            plain_sent = 0;
        }
        // Plaintext that arrived with the handshake's last flight (a client
        // may send its request right behind its Finished).
        if plain_out.is_empty() {
            let mut scratch = [0u8; 1024];
            while let Ok(n @ 1..) = conn.reader().read(&mut scratch) {
                plain_out.extend_from_slice(&scratch[..n]);
                progress = true;
            }
        }
        // Plaintext side's bytes, sealed once the previous ones are written.
        if !inner_done && tls_out.is_empty() {
            let mut sealed = true;
            match poll_read_scratch(inner, cx, |bytes| {
                sealed = conn.writer().write_all(bytes).is_ok();
            }) {
                Poll::Ready(Ok(n)) if n > 0 => {
                    if !sealed {
                        return Poll::Ready(());
                    }
                    progress = true;
                }
                Poll::Ready(_) => {
                    inner_done = true;
                    conn.send_close_notify();
                    progress = true;
                }
                Poll::Pending => {}
            }
        }
        // The client's records, once the last plaintext was taken.
        if !tcp_done && plain_out.is_empty() {
            let mut records = Vec::new();
            let polled = poll_read_scratch(tcp, cx, |bytes| records.extend_from_slice(bytes));
            match polled {
                Poll::Ready(Ok(n)) if n > 0 => {
                    progress = true;
                    let mut rest = &records[..];
                    while !rest.is_empty() {
                        let state = match conn.read_tls(&mut rest) {
                            Ok(_) => conn.process_new_packets(),
                            Err(e) => Err(rustls::Error::General(e.to_string())),
                        };
                        match state {
                            Err(_) => {
                                // A forged, truncated or unexpected record:
                                // rustls queued the alert; end both sides.
                                failed = Some(TlsFailure::BadRecord);
                                tcp_done = true;
                                break;
                            }
                            Ok(state) => {
                                if state.peer_has_closed() {
                                    if !rest.is_empty() {
                                        failed = Some(TlsFailure::AfterCloseNotify);
                                    }
                                    tcp_done = true;
                                    break;
                                }
                            }
                        }
                    }
                    if tcp_done {
                        // SAFETY: half-close of our own socketpair end: the
                        // plaintext side reads EOF.
                        unsafe { libc::shutdown(inner_fd, libc::SHUT_WR) };
                    }
                }
                Poll::Ready(_) => {
                    tcp_done = true;
                    // SAFETY: as above.
                    unsafe { libc::shutdown(inner_fd, libc::SHUT_WR) };
                    progress = true;
                }
                Poll::Pending => {}
            }
        }
        if failed.is_some() && plain_out.is_empty() {
            // Flush the alert below, then end.
            inner_done = true;
        }
        if inner_done && !last_writes {
            last_writes = true;
            let _ = tcp.set_write_timeout(Some(PUMP_LAST_WRITE_TIMEOUT));
        }
        let flushed = tls_sent == tls_out.len() && !conn.wants_write();
        if inner_done && flushed {
            return Poll::Ready(());
        }
        if !progress {
            return Poll::Pending;
        }
    })
    .await;
    if let Some(failure) = failed {
        shard.metrics.tls_failed(failure);
    }
    let _ = tcp.close().await;
}
