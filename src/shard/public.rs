//! The public listener: read a request head (bounded in size and time),
//! authenticate, and hand the socket to the shard that owns its org, which
//! answers 101 and the welcome and keeps the connection for its life.

use std::os::unix::io::AsRawFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};

use super::{shard_for, Handoff, Shard, ShardMessage};
use crate::limits::{HEADERS_MAX, HEAD_BYTES_MAX, HEAD_TIMEOUT_MS};
use crate::metrics::HandshakeFailure;
use crate::protocol::http::{self, HttpError};
use crate::registry::{AddError, Frame};

/// Accepts forever; on running out of file descriptors it waits and retries
/// instead of failing, so existing connections keep working.
pub async fn accept_loop(shard: Rc<Shard>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok(stream) => {
                glommio::spawn_local(handshake(shard.clone(), stream)).detach();
            }
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
async fn read_head(stream: &mut TcpStream, buffer: &mut [u8]) -> Result<usize, Option<u16>> {
    let deadline = Instant::now() + Duration::from_millis(HEAD_TIMEOUT_MS);
    let mut filled = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(if filled > 0 { Some(408) } else { None });
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
        match http::parse_head(
            &buffer[..filled],
            &mut headers,
            super::routes::PUBLIC_BODY_BYTES_MAX,
        ) {
            Ok(None) => continue,
            Ok(Some(_)) | Err(_) => {
                let _ = stream.set_read_timeout(None);
                return Ok(filled);
            }
        }
    }
}

async fn handshake(shard: Rc<Shard>, mut stream: TcpStream) {
    if shard.stopping.get() {
        return;
    }
    let _ = stream.set_nodelay(true);
    let mut buffer = shard.take_buffer();
    debug_assert!(buffer.len() >= HEAD_BYTES_MAX);
    let filled = match read_head(&mut stream, &mut buffer).await {
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
    let decision = {
        let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
        match http::parse_head(
            &buffer[..filled],
            &mut headers,
            super::routes::PUBLIC_BODY_BYTES_MAX,
        ) {
            Err(error) => Err((error.status(), Some(error))),
            Ok(None) => Err((400, None)),
            Ok(Some(head)) if head.path != "/v1/ws" => Ok(None),
            Ok(Some(head)) => route(&shard, &head, stream.peer_addr().ok()).map(Some),
        }
    };
    match decision {
        Err((status, error)) => refuse(&shard, &mut stream, status, error).await,
        Ok(None) => {
            // Plain HTTP (sessions, polling, SSE, pages): served here, on
            // the accepting shard; history reads cross to the owner shard.
            super::routes::serve(shard, stream, buffer, filled).await;
            return;
        }
        Ok(Some(accepted)) => {
            let leftover = buffer[accepted.head_len..filled].to_vec();
            let owner = shard_for(&accepted.org_id, shard.count);
            if owner == shard.id {
                let handoff = Handoff {
                    fd: -1,
                    leftover,
                    org_id: accepted.org_id,
                    key_id: accepted.key_id,
                    ws_key: accepted.ws_key,
                };
                adopt(shard.clone(), stream, &handoff);
            } else {
                // SAFETY: dup of a socket we own; the handoff owns the copy
                // and our stream (closing the original) is dropped below.
                let fd = unsafe { libc::dup(stream.as_raw_fd()) };
                if fd < 0 {
                    refuse(&shard, &mut stream, 503, None).await;
                } else {
                    let handoff = Handoff {
                        fd,
                        leftover,
                        org_id: accepted.org_id,
                        key_id: accepted.key_id,
                        ws_key: accepted.ws_key,
                    };
                    drop(stream);
                    let mesh = shard.mesh.as_ref().expect("several shards have a mesh");
                    let _ = mesh.send_to(owner, ShardMessage::Adopt(handoff)).await;
                }
            }
        }
    }
    shard.return_buffer(buffer);
}

/// An authenticated upgrade, owned data only.
struct Accepted {
    head_len: usize,
    org_id: String,
    key_id: String,
    ws_key: String,
}

fn route(
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
        ws_key: String::from_utf8_lossy(upgrade.key).into_owned(),
    })
}

/// On the owner shard: register the connection, answer 101 and the welcome
/// in one write, and start its task.
pub fn adopt(shard: Rc<Shard>, mut stream: TcpStream, handoff: &Handoff) {
    if shard.stopping.get() {
        return;
    }
    let added =
        shard
            .registry
            .borrow_mut()
            .add(&handoff.org_id, &handoff.key_id, stream.as_raw_fd());
    let (key, seq) = match added {
        Ok(pair) => pair,
        Err(AddError::OrgFull) | Err(AddError::ShardFull) => {
            glommio::spawn_local(async move {
                refuse(&shard, &mut stream, 503, None).await;
            })
            .detach();
            return;
        }
    };
    let mut answer = [0u8; http::SWITCHING_PROTOCOLS_LEN_MAX];
    let answer_len = http::write_switching_protocols(&mut answer, handoff.ws_key.as_bytes());
    let mut first = Vec::with_capacity(answer_len + 160);
    first.extend_from_slice(&answer[..answer_len]);
    let welcome = format!(
        r#"{{"type":"welcome","org_id":"{}","connection_id":"c_{}_{}_{}","seq":{},"heartbeat_ms":{}}}"#,
        handoff.org_id, shard.id, key.index, key.generation, seq, shard.config.heartbeat_ms
    );
    first.extend_from_slice(&crate::registry::text_frame(welcome.as_bytes()));
    {
        let mut registry = shard.registry.borrow_mut();
        registry.enqueue(key.index, &Frame::from(first));
        super::flush_one(&mut registry, key.index);
    }
    shard
        .metrics
        .upgrades
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    glommio::spawn_local(super::connection::run(
        shard.clone(),
        key,
        stream,
        handoff.leftover.clone(),
    ))
    .detach();
}
