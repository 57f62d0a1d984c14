//! The public listener: read a request head (bounded in size and time),
//! authenticate, and hand the socket to the shard that owns its org, which
//! answers 101 and the welcome and keeps the connection for its life.

use std::os::unix::io::{AsRawFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};

use super::{shard_for, Handoff, Shard, ShardMessage};
use crate::limits::{HEADERS_MAX, HEAD_BYTES_MAX, HEAD_TIMEOUT_MS, WRITE_TIMEOUT_MS};
use crate::metrics::HandshakeFailure;
use crate::protocol::http::{self, HttpError};

/// First read buffer of a handshake; grown up to `HEAD_BYTES_MAX`.
const HANDSHAKE_BUFFER_BYTES: usize = 1024;

/// Accepts forever; on running out of file descriptors it waits and retries
/// instead of failing, so existing connections keep working.
pub async fn accept_loop(shard: Rc<Shard>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok(stream) => match &shard.tls {
                Some(tls) => {
                    let config = tls.server_config();
                    glommio::spawn_local(super::tls::terminate(
                        shard.clone(),
                        stream,
                        super::tls::Side::Public,
                        config,
                    ))
                    .detach();
                }
                None => {
                    let peer = stream.peer_addr().ok();
                    glommio::spawn_local(handshake(shard.clone(), stream, peer)).detach();
                }
            },
            Err(e) => {
                let raw = match &e {
                    glommio::GlommioError::IoError(io) => io.raw_os_error(),
                    _ => None,
                };
                if raw == Some(libc::EMFILE) || raw == Some(libc::ENFILE) {
                    glommio::timer::sleep(Duration::from_millis(50)).await;
                } else {
                    glommio::timer::sleep(Duration::from_millis(1)).await;
                }
            }
        }
    }
}

/// Writes an error answer and counts the failure; the socket is dropped
/// by the caller.
async fn refuse(shard: &Shard, stream: &mut TcpStream, status: u16, error: Option<HttpError>) {
    shard
        .metrics
        .handshake_failed(HandshakeFailure::from_status(status));
    let mut out = Vec::with_capacity(256);
    match error {
        Some(error) => http::write_http_error(&mut out, error),
        None => http::write_error(&mut out, status, &[("Connection", "close")]),
    }
    let _ = stream.write_all(&out).await;
}

/// Reads one request head within the deadline. `Ok(filled)` when complete.
async fn read_head(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Result<usize, Option<u16>> {
    let deadline = Instant::now() + Duration::from_millis(HEAD_TIMEOUT_MS);
    let mut filled = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(if filled > 0 { Some(408) } else { None });
        }
        if filled == buffer.len() {
            // Only a head still incomplete below the limit gets here
            // (parse_head refuses one that reached it).
            let grown = (buffer.len() * 2).clamp(HANDSHAKE_BUFFER_BYTES, HEAD_BYTES_MAX);
            buffer.resize(grown, 0);
        }
        let _ = stream.set_read_timeout(Some(left));
        let read = match stream.read(&mut buffer[filled..]).await {
            Ok(0) => return Err(None),
            Ok(read) => read,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                return Err(if filled > 0 { Some(408) } else { None })
            }
            Err(_) => return Err(None),
        };
        filled += read;
        let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
        match http::parse_head_with(
            &buffer[..filled],
            &mut headers,
            super::routes::PUBLIC_BODY_BYTES_MAX,
            super::routes::PUBLIC_HEAD_RULES,
        ) {
            Ok(None) => continue,
            Ok(Some(_)) | Err(_) => {
                let _ = stream.set_read_timeout(None);
                return Ok(filled);
            }
        }
    }
}

/// Reads and answers a public connection's first request. `peer` is the
/// client's address (the stream is a socketpair end behind TLS).
pub async fn handshake(
    shard: Rc<Shard>,
    mut stream: TcpStream,
    peer: Option<std::net::SocketAddr>,
) {
    if shard.shutdown.is_stopping() {
        return;
    }
    // Counted until the connection is a WebSocket (handed to the reactor)
    // or closed; past the address's share, refused without reading.
    let counting = shard.clone();
    let peer_ip = peer.map(|peer| peer.ip());
    let Some(_counted) = counting.access.http_connections.enter(peer_ip) else {
        let _ = stream.set_write_timeout(Some(Duration::from_millis(WRITE_TIMEOUT_MS)));
        refuse(&shard, &mut stream, 429, None).await;
        return;
    };
    let _ = stream.set_nodelay(true);
    // Every answer written on this stream (refusals, plain-HTTP routes,
    // SSE) fails after this long without progress, and the connection is
    // closed: a client that never reads is not held forever.
    let _ = stream.set_write_timeout(Some(Duration::from_millis(WRITE_TIMEOUT_MS)));
    // Most upgrade requests are a few hundred bytes: start small and grow
    // to the 8 KiB limit only for a long head, so a connect storm does not
    // park 8 KiB per handshake in flight.
    let mut buffer = vec![0u8; HANDSHAKE_BUFFER_BYTES];
    let mut filled = match read_head(&mut stream, &mut buffer).await {
        Ok(filled) => filled,
        Err(status) => {
            if let Some(status) = status {
                refuse(&shard, &mut stream, status, None).await;
            } else {
                shard.metrics.handshake_failed(HandshakeFailure::Timeout);
            }
            shard.return_buffer(buffer);
            return;
        }
    };
    let decision = loop {
        let decision = {
            let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
            match http::parse_head_with(
                &buffer[..filled],
                &mut headers,
                super::routes::PUBLIC_BODY_BYTES_MAX,
                super::routes::PUBLIC_HEAD_RULES,
            ) {
                Err(error) => Err((error.status(), Some(error))),
                Ok(None) => Err((400, None)),
                Ok(Some(head)) if head.path != "/v1/ws" => {
                    super::fault::panic_if_asked(head.path);
                    Ok(None)
                }
                Ok(Some(head)) => route(&shard, &head, peer).map(Some),
            }
        };
        if decision != Ok(None) {
            break decision;
        }
        // Plain HTTP (sessions, polling, SSE, pages): served here, on the
        // accepting shard; history reads cross to the owner shard. It ends
        // with the connection, or with an upgrade sent as a later request
        // (whose head is then at the start of the buffer), taken here.
        if buffer.len() < super::READ_BUFFER_BYTES {
            buffer.resize(super::READ_BUFFER_BYTES, 0);
        }
        super::stall::bound_http_answers(&stream);
        match super::routes::serve(shard.clone(), stream, peer, buffer, filled).await {
            None => return,
            Some(later) => {
                // A WebSocket's slow consumers are the send queue's
                // business (1013), not the HTTP write timeout's.
                super::stall::unbound_for_websocket(&later.stream);
                stream = later.stream;
                buffer = later.buffer;
                filled = later.filled;
            }
        }
    };
    match decision {
        Err((status, error)) => refuse(&shard, &mut stream, status, error).await,
        Ok(None) => unreachable!("plain HTTP is served above"),
        Ok(Some(accepted)) => {
            // The connection's life is spent in the owner's reactor on a raw
            // descriptor: take a duplicate and let glommio's stream go.
            // SAFETY: dup of a socket we own; the handoff owns the copy.
            let fd = unsafe { libc::dup(stream.as_raw_fd()) };
            if fd < 0 {
                refuse(&shard, &mut stream, 503, None).await;
            } else {
                drop(stream);
                let leftover = buffer[accepted.head_len..filled].to_vec();
                hand_off(&shard, fd, accepted, leftover, None);
            }
        }
    }
    shard.return_buffer(buffer);
}

/// Sends an accepted upgrade's socket (owned `fd`) to the org's owner
/// shard, or adopts it here; `tls` is the TLS session of a wss connection
/// that hibernates (see `tls_wire`).
pub(super) fn hand_off(
    shard: &Shard,
    fd: i32,
    accepted: Accepted,
    leftover: Vec<u8>,
    tls: Option<Box<super::tls_wire::Session>>,
) {
    let handoff = Handoff {
        fd,
        leftover,
        org_id: accepted.org_id,
        key_id: accepted.key_id,
        session: accepted.session.map(Box::new),
        ws_key: accepted.ws_key,
        deflate: accepted.deflate,
        tls,
    };
    let owner = shard_for(&handoff.org_id, shard.count);
    if owner == shard.id {
        adopt(shard, handoff);
    } else {
        let mesh = shard.mesh.as_ref().expect("several shards have a mesh");
        // A stopped owner drops the handoff, closing the socket.
        let _ = mesh.send_to(owner, ShardMessage::Adopt(handoff));
    }
}

/// An authenticated upgrade, owned data only.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Accepted {
    pub(super) head_len: usize,
    org_id: String,
    key_id: String,
    session: Option<(u128, u64)>,
    ws_key: String,
    deflate: Option<crate::protocol::deflate::Agreement>,
}

pub(super) fn route(
    shard: &Shard,
    head: &http::Head<'_, '_>,
    peer: Option<std::net::SocketAddr>,
) -> Result<Accepted, (u16, Option<HttpError>)> {
    let upgrade = http::validate_upgrade(head).map_err(|e| (e.status(), Some(e)))?;
    let principal = super::access::authenticate_upgrade(shard, &upgrade, peer.map(|p| p.ip()))
        .map_err(|status| (status, None))?;
    Ok(Accepted {
        head_len: head.head_len,
        org_id: principal.org_id,
        key_id: principal.key_id,
        session: principal.session,
        ws_key: String::from_utf8_lossy(upgrade.key).into_owned(),
        // The first acceptable permessage-deflate offer; an offer that
        // cannot be accepted leaves the connection plain, never fails it.
        deflate: if shard.config.compression {
            crate::protocol::deflate::negotiate(head.headers_named("sec-websocket-extensions"))
        } else {
            None
        },
    })
}

/// On the owner shard: register the connection with the reactor, which
/// answers 101 and the welcome in one write; 503 when a connection cap is
/// reached.
pub fn adopt(shard: &Shard, handoff: Handoff) {
    // Cluster mode: the welcome's seq is the org's seq on this node, known
    // once the org is followed; the upgrade waits for that.
    let mut handoff = if shard.cluster.is_some() && !shard.shutdown.is_stopping() {
        match super::cluster::adopt_or_wait(shard, handoff) {
            Some(handoff) => handoff,
            None => return,
        }
    } else {
        handoff
    };
    let fd = std::mem::replace(&mut handoff.fd, -1);
    if shard.shutdown.is_stopping() {
        // SAFETY: we own `fd` (moved out of the handoff).
        unsafe { libc::close(fd) };
        return;
    }
    // Authenticated on another shard a moment ago: if the key was revoked
    // (or the session signed out) since, this shard may already have
    // closed that credential's connections and would never close this
    // one. Checked in the same synchronous step as the registration, so
    // a revocation after it is acted on by the next key-reload turn.
    let session = handoff.session.as_deref().copied();
    if !super::access::credential_still_valid(shard, &handoff.key_id, session) {
        if handoff.tls.is_some() {
            // A TLS client gets no plaintext answer.
            // SAFETY: we own `fd` (moved out of the handoff).
            unsafe { libc::close(fd) };
            return;
        }
        let mut out = Vec::with_capacity(160);
        http::write_error(&mut out, 401, &[("Connection", "close")]);
        send_and_close(fd, &out);
        return;
    }
    let leftover = std::mem::take(&mut handoff.leftover);
    let tls = handoff.tls.take();
    let was_tls = tls.is_some();
    match super::reactor::adopt(shard, fd, &handoff, leftover, tls) {
        Ok(()) => {
            shard
                .metrics
                .upgrades
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Err(fd) if was_tls => {
            shard.metrics.handshake_failed(HandshakeFailure::Capacity);
            // SAFETY: we own `fd`; a TLS client gets no plaintext answer.
            unsafe { libc::close(fd) };
        }
        Err(fd) => {
            shard.metrics.handshake_failed(HandshakeFailure::Capacity);
            let mut out = Vec::with_capacity(160);
            http::write_error(&mut out, 503, &[("Connection", "close")]);
            send_and_close(fd, &out);
        }
    }
}

/// Sends a small answer on a socket we own and closes it. Best effort: a
/// fresh socket's buffer takes a small answer.
pub(super) fn send_and_close(fd: RawFd, out: &[u8]) {
    // SAFETY: send on and close of a descriptor we own.
    unsafe {
        libc::send(
            fd,
            out.as_ptr().cast(),
            out.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        );
        libc::close(fd);
    }
}
