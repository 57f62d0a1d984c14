//! The admin listener: `POST /v1/publish`, `GET /metrics` (both with the
//! admin token), and the `GET /healthz` / `GET /readyz` probes. HTTP/1.1
//! with keep-alive; every request bounded in head size, body size and time.
//! A publish body comes with `Content-Length` or chunked, and is read only
//! once the admin token was checked; HTTP/1.0 is answered for the probes.

use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;

use super::Shard;
use crate::auth::keys::constant_time_eq;
use crate::limits::{HEADERS_MAX, HEAD_TIMEOUT_MS};
use crate::protocol::chunked::ChunkedDecoder;
use crate::protocol::http;

/// Time a client has to send a whole body once its head arrived.
const BODY_TIMEOUT_MS: u64 = 30_000;
/// An idle keep-alive connection is closed after this long.
const KEEP_ALIVE_IDLE_MS: u64 = 60_000;

/// Starts serving a connection accepted on the admin listener
/// (`upgrade::accept_loop` accepts).
pub fn on_accept(shard: &Rc<Shard>, stream: TcpStream) {
    match (&shard.tls, shard.config.admin_tls) {
        (Some(tls), true) => {
            // Counted from the accept, before the handshake, under the
            // client's own address (the plaintext side sees a socketpair);
            // past the address's share, closed at once and unread.
            let peer = stream.peer_addr().ok();
            let side = super::tls::Side::Admin;
            let Some(place) = super::tls::Place::take(shard, side, peer.map(|p| p.ip())) else {
                return;
            };
            let config = tls.server_config();
            glommio::spawn_local(super::tls::terminate(
                shard.clone(),
                stream,
                side,
                config,
                peer,
                place,
            ))
            .detach();
        }
        _ => {
            glommio::spawn_local(serve(shard.clone(), stream, None)).detach();
        }
    }
}

/// Counts an admin request from its complete head to its answer, so a
/// retiring shard (hot upgrade) knows when every publish it took was
/// answered.
struct InFlight<'a>(&'a Shard);

impl<'a> InFlight<'a> {
    fn enter(shard: &'a Shard) -> InFlight<'a> {
        let count = &shard.handover.admin_requests;
        count.set(count.get() + 1);
        InFlight(shard)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let count = &self.0.handover.admin_requests;
        count.set(count.get() - 1);
    }
}

/// What the router needs of a request, owned so the read buffer can move.
struct Request {
    method: String,
    path: String,
    authorized: bool,
    ndjson: bool,
    close: bool,
    expects_continue: bool,
    head_len: usize,
    content_length: usize,
    framing: http::Framing,
}

impl Request {
    /// True when the request announces a body (of any length or chunked).
    fn has_body(&self) -> bool {
        self.framing == http::Framing::Chunked || self.content_length > 0
    }

    /// True for the one request whose body is read: an authorized publish.
    /// Every other request is answered without reading its body (PROTOCOL.md
    /// §3: a bad token costs the server nothing), and its connection closes
    /// when it announced one, since where the next request starts is then
    /// unknown.
    fn body_wanted(&self) -> bool {
        self.authorized && self.method == "POST" && self.path == "/v1/publish"
    }
}

/// What the admin listener accepts beyond strict HTTP/1.1: chunked publish
/// bodies, and HTTP/1.0 health probes.
const ADMIN_HEAD_RULES: http::HeadRules = http::HeadRules {
    chunked: true,
    http10_paths: http::PROBE_PATHS,
};

enum ReadError {
    /// Closed, failed or idle: drop silently.
    Gone,
    /// Answer this status, then close.
    Status(u16, Option<http::HttpError>),
}

async fn read_more(
    stream: &mut TcpStream,
    buffer: &mut Vec<u8>,
    deadline: Instant,
) -> Result<(), ReadError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(ReadError::Status(408, None));
    }
    let _ = stream.set_read_timeout(Some(left));
    let start = buffer.len();
    let want = (start + 16 * 1024).max(buffer.capacity());
    buffer.resize(want, 0);
    match stream.read(&mut buffer[start..]).await {
        Ok(0) => {
            buffer.truncate(start);
            Err(ReadError::Gone)
        }
        Ok(read) => {
            buffer.truncate(start + read);
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
            buffer.truncate(start);
            Err(if start > 0 {
                ReadError::Status(408, None)
            } else {
                ReadError::Gone
            })
        }
        Err(_) => {
            buffer.truncate(start);
            Err(ReadError::Gone)
        }
    }
}

fn parse_request(shard: &Shard, buffer: &[u8]) -> Result<Option<Request>, ReadError> {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    match http::parse_head_with(
        buffer,
        &mut headers,
        shard.config.publish_body_bytes,
        ADMIN_HEAD_RULES,
    ) {
        Ok(None) => Ok(None),
        Err(error) => Err(ReadError::Status(error.status(), Some(error))),
        Ok(Some(head)) => {
            let authorized = head
                .header("authorization")
                .and_then(http::bearer_token)
                .is_some_and(|token| {
                    constant_time_eq(token.as_bytes(), shard.admin_token.as_bytes())
                });
            let ndjson = head
                .header("content-type")
                .is_some_and(crate::publish::is_ndjson);
            Ok(Some(Request {
                method: head.method.to_string(),
                path: head.path.to_string(),
                authorized,
                ndjson,
                close: head.connection_close(),
                expects_continue: head.expects_continue(),
                head_len: head.head_len,
                content_length: head.content_length,
                framing: head.framing,
            }))
        }
    }
}

/// Where a publish body ended up.
enum Body {
    /// The first this many bytes of the read buffer (`Content-Length`).
    InBuffer(usize),
    /// Decoded from chunks; the read buffer holds only what follows it.
    Decoded(Vec<u8>),
}

/// Reads the body of an authorized publish; the bytes after the head are
/// already in `buffer` (from which the head was drained), and the rest of
/// the buffer after the body is the next request.
async fn read_body(
    shard: &Shard,
    stream: &mut TcpStream,
    buffer: &mut Vec<u8>,
    request: &Request,
) -> Result<Body, ReadError> {
    let deadline = Instant::now() + Duration::from_millis(BODY_TIMEOUT_MS);
    match request.framing {
        http::Framing::Unframed => Err(ReadError::Status(
            411,
            Some(http::HttpError::LengthRequired),
        )),
        http::Framing::Length => {
            let length = request.content_length;
            if request.expects_continue && buffer.len() < length {
                let _ = stream.write_all(CONTINUE).await;
            }
            while buffer.len() < length {
                read_more(stream, buffer, deadline).await?;
            }
            Ok(Body::InBuffer(length))
        }
        http::Framing::Chunked => {
            if request.expects_continue && buffer.is_empty() {
                let _ = stream.write_all(CONTINUE).await;
            }
            let mut decoder = ChunkedDecoder::new(shard.config.publish_body_bytes);
            let mut body = Vec::new();
            loop {
                let used = decoder
                    .feed(buffer, &mut body)
                    .map_err(|e| ReadError::Status(e.status(), None))?;
                buffer.drain(..used);
                if decoder.is_done() {
                    return Ok(Body::Decoded(body));
                }
                // A body cut short (EOF, reset) is Gone: nothing published.
                read_more(stream, buffer, deadline).await?;
            }
        }
    }
}

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// Serves one admin connection: plain, or the plaintext side behind TLS,
/// whose count (`place`) the terminator took at accept.
pub async fn serve(shard: Rc<Shard>, mut stream: TcpStream, place: Option<super::tls::Place>) {
    let _ = stream.set_nodelay(true);
    // An answer the client takes no byte of for this long fails, and the
    // connection is closed (PROTOCOL.md §6).
    super::stall::bound_http_answers(&stream);
    let mut buffer: Vec<u8> = Vec::new();
    let mut out = Vec::with_capacity(1024);
    // Connections per source address, as on the public listener: the
    // token is checked per request, so until then anyone may connect.
    let counting = shard.clone();
    let _counted = match place {
        // Counted by the TLS terminator for the connection's life.
        Some(_) => None,
        None => {
            let peer_ip = stream.peer_addr().ok().map(|peer| peer.ip());
            let Some(counted) = counting.access.admin_connections.enter(peer_ip) else {
                // Past its address's limit: answered and closed at once,
                // with no linger (that would hold an uncounted descriptor).
                http::write_error(&mut out, 429, &[("Connection", "close")]);
                let _ = stream.write_all(&out).await;
                return;
            };
            Some(counted)
        }
    };
    loop {
        // Head: idle keep-alive connections get longer than a started head.
        let mut deadline = Instant::now() + Duration::from_millis(KEEP_ALIVE_IDLE_MS);
        // A request is in progress from its first byte: a hot upgrade
        // hands the log over only once none is (`upgrade::hand`).
        let mut started: Option<InFlight<'_>> = None;
        let request = loop {
            if !buffer.is_empty() {
                started.get_or_insert_with(|| InFlight::enter(&shard));
                match parse_request(&shard, &buffer) {
                    Ok(Some(request)) => break request,
                    Ok(None) => {}
                    Err(ReadError::Gone) => return,
                    Err(ReadError::Status(status, error)) => {
                        answer_error(&mut stream, &mut out, status, error).await;
                        return;
                    }
                }
                deadline = deadline.min(Instant::now() + Duration::from_millis(HEAD_TIMEOUT_MS));
            }
            if buffer.is_empty() {
                // Between requests: a shard handing over or retiring (hot
                // upgrade) closes
                // the connection rather than take a publish it could no
                // longer commit; the client's next request goes to the
                // listener, which the new process accepts on.
                if shard.handover.closing_admin() {
                    return;
                }
                let read = futures_lite::future::or(
                    async { Some(read_more(&mut stream, &mut buffer, deadline).await) },
                    async {
                        loop {
                            shard.handover.wait_change().await;
                            if shard.handover.closing_admin() {
                                return None;
                            }
                        }
                    },
                )
                .await;
                match read {
                    // The read was given up while waiting (nothing taken
                    // from the socket; the buffer was only made room in).
                    None => return,
                    Some(Ok(())) => continue,
                    Some(Err(error)) => {
                        if let ReadError::Status(status, e) = error {
                            answer_error(&mut stream, &mut out, status, e).await;
                        }
                        return;
                    }
                }
            }
            if let Err(error) = read_more(&mut stream, &mut buffer, deadline).await {
                if let ReadError::Status(status, e) = error {
                    answer_error(&mut stream, &mut out, status, e).await;
                }
                return;
            }
        };
        buffer.drain(..request.head_len);
        out.clear();
        let _in_flight = started.take().unwrap_or_else(|| InFlight::enter(&shard));
        // The body is read only for an authorized publish: anything else
        // is answered from its head alone (an unauthorized publish gets its
        // 401 before a byte of its body is read) and, if it announced a
        // body, its connection is closed unread.
        let mut closing = request.close || shard.handover.closing_admin();
        if request.body_wanted() {
            let body = match read_body(&shard, &mut stream, &mut buffer, &request).await {
                Ok(body) => body,
                Err(ReadError::Gone) => return,
                Err(ReadError::Status(status, e)) => {
                    answer_error(&mut stream, &mut out, status, e).await;
                    return;
                }
            };
            match body {
                Body::InBuffer(length) => {
                    respond(&shard, &request, &buffer[..length], &mut out).await;
                    buffer.drain(..length);
                }
                Body::Decoded(decoded) => respond(&shard, &request, &decoded, &mut out).await,
            }
        } else {
            respond(&shard, &request, b"", &mut out).await;
            // A refused token closes the connection too: whoever holds a
            // wrong one has no reason to keep it open.
            let refused =
                !request.authorized && matches!(request.path.as_str(), "/v1/publish" | "/metrics");
            closing |= request.has_body() || refused;
        }
        if request.method == "HEAD" {
            // The GET answer's head (its Content-Length included), no body.
            http::strip_body(&mut out);
        }
        closing |= shard.handover.closing_admin();
        if closing {
            http::mark_closing(&mut out);
            let _ = stream.write_all(&out).await;
            // Its unread body must not turn the close into a reset.
            super::stall::linger_close(&mut stream).await;
            return;
        }
        if stream.write_all(&out).await.is_err() {
            return;
        }
        if buffer.capacity() > 64 * 1024 && buffer.len() < 64 * 1024 {
            buffer.shrink_to(64 * 1024);
        }
    }
}

async fn answer_error(
    stream: &mut TcpStream,
    out: &mut Vec<u8>,
    status: u16,
    error: Option<http::HttpError>,
) {
    out.clear();
    match error {
        Some(error) => http::write_http_error(out, error),
        None => http::write_error(out, status, &[("Connection", "close")]),
    }
    let _ = stream.write_all(out).await;
    super::stall::linger_close(stream).await;
}

/// The answer to a health probe (`GET`/`HEAD` `/healthz` or `/readyz`,
/// no token, on both listeners); `false` when `path` is not a probe.
pub fn write_probe(shard: &Shard, method: &str, path: &str, out: &mut Vec<u8>) -> bool {
    const JSON: &str = "application/json";
    match (method, path) {
        ("GET" | "HEAD", "/healthz") => {
            http::write_response(out, 200, JSON, &[], br#"{"status":"ok"}"#)
        }
        ("GET" | "HEAD", "/readyz") => {
            if shard.shutdown.is_stopping() {
                // An error answer like every other (`error`), with the
                // probe's own `status` beside it.
                http::write_response(
                    out,
                    503,
                    JSON,
                    &[],
                    br#"{"error":"unavailable","status":"stopping"}"#,
                )
            } else if shard
                .cluster
                .as_ref()
                .is_some_and(|c| !c.bridge.connected())
            {
                http::write_response(
                    out,
                    503,
                    JSON,
                    &[("Retry-After", "1")],
                    br#"{"error":"unavailable","status":"nats_unreachable"}"#,
                )
            } else {
                http::write_response(out, 200, JSON, &[], br#"{"status":"ready"}"#)
            }
        }
        (_, "/healthz" | "/readyz") => http::write_error(out, 405, &[("Allow", "GET, HEAD")]),
        _ => return false,
    }
    true
}

async fn respond(shard: &Shard, request: &Request, body: &[u8], out: &mut Vec<u8>) {
    const JSON: &str = "application/json";
    if write_probe(shard, &request.method, &request.path, out) {
        return;
    }
    match (request.method.as_str(), request.path.as_str()) {
        (_, "/metrics") if request.method != "GET" => {
            http::write_error(out, 405, &[("Allow", "GET")])
        }
        (_, "/metrics" | "/v1/publish") if !request.authorized => http::write_error(out, 401, &[]),
        ("GET", "/metrics") => {
            shard.sync_metrics();
            let text = crate::metrics::render(&shard.all_metrics);
            http::write_response(out, 200, "text/plain; version=0.0.4", &[], text.as_bytes())
        }
        ("POST", "/v1/publish") => match crate::publish::parse_body(body, request.ndjson) {
            Err(error) => http::write_response(out, 400, JSON, &[], error.to_json().as_bytes()),
            Ok(messages) => {
                let count = messages.len();
                match shard.publish(messages).await {
                    Ok(seqs) => {
                        let mut json = Vec::with_capacity(32 + seqs.len() * 8);
                        json.extend_from_slice(b"{\"accepted\":");
                        crate::message::push_u64(&mut json, count as u64);
                        json.extend_from_slice(b",\"seqs\":[");
                        for (i, seq) in seqs.iter().enumerate() {
                            if i > 0 {
                                json.push(b',');
                            }
                            crate::message::push_u64(&mut json, *seq);
                        }
                        json.extend_from_slice(b"]}");
                        http::write_response(out, 202, JSON, &[], &json)
                    }
                    Err(_) if shard.cluster.is_some() => {
                        http::write_error(out, 503, &[("Retry-After", "1")])
                    }
                    Err(_) => http::write_error(out, 503, &[]),
                }
            }
        },
        (_, "/v1/publish") => http::write_error(out, 405, &[("Allow", "POST")]),
        _ => http::write_error(out, 404, &[]),
    }
}
