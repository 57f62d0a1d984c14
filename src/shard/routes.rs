//! Plain HTTP/1.1 requests on the public listener (everything but the
//! WebSocket upgrade, which may still come as a later request of the
//! connection): keep-alive loop, bounded reads, the health probes, and
//! dispatch by path to the handlers of each capability. Handlers write their own answer (so
//! long-polls and Server-Sent Events can stream) and say whether the
//! connection may carry another request.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;

use super::Shard;
use crate::limits::{HEADERS_MAX, HEAD_TIMEOUT_MS};
use crate::protocol::http;

/// Largest body accepted on the public listener (session requests carry
/// none; this bounds what a client can make us buffer).
pub const PUBLIC_BODY_BYTES_MAX: usize = 16 * 1024;
/// An idle keep-alive connection is closed after this long.
const KEEP_ALIVE_IDLE_MS: u64 = 30_000;

/// What the public listener accepts beyond strict HTTP/1.1: HTTP/1.0 health
/// probes (bodies stay `Content-Length` only: no public route takes one).
pub const PUBLIC_HEAD_RULES: http::HeadRules = http::HeadRules {
    chunked: false,
    http10_paths: http::PROBE_PATHS,
};

/// A request, owned, so handlers can await without borrowing the buffer.
#[derive(Debug, Clone)]
pub struct Request {
    /// Method as sent.
    pub method: String,
    /// Path without the query.
    pub path: String,
    /// Raw query (without `?`).
    pub query: String,
    /// Header names (lower-cased) and raw values, in order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body.
    pub body: Vec<u8>,
    /// The client's address.
    pub peer: Option<SocketAddr>,
    /// The `Host` header (empty only for an HTTP/1.0 probe).
    pub host: Vec<u8>,
    /// The connection closes after the answer (`Connection: close`, or
    /// HTTP/1.0).
    pub close: bool,
}

impl Request {
    /// First header called `name` (give it lower-case).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// Percent-decoded query parameter.
    pub fn query_param(&self, name: &str) -> Option<String> {
        for pair in self.query.split('&') {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if http::percent_decode(key).is_some_and(|k| k == name) {
                return http::percent_decode(value).map(|v| v.into_owned());
            }
        }
        None
    }

    fn from_head(head: &http::Head<'_, '_>, body: &[u8], peer: Option<SocketAddr>) -> Request {
        Request {
            method: head.method.to_string(),
            path: head.path.to_string(),
            query: head.query.to_string(),
            headers: head
                .headers
                .iter()
                .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
                .collect(),
            body: body.to_vec(),
            peer,
            host: head.host.to_vec(),
            close: head.connection_close(),
        }
    }
}

/// What a handler leaves the connection in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    /// Another request may follow.
    KeepAlive,
    /// Close the connection.
    Close,
}

/// Writes a complete response and keeps the connection.
pub async fn respond(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> After {
    let mut out = Vec::with_capacity(256 + body.len());
    http::write_response(&mut out, status, content_type, headers, body);
    match stream.write_all(&out).await {
        Ok(()) => After::KeepAlive,
        Err(_) => After::Close,
    }
}

/// Writes a JSON error `{"error":…}` and keeps the connection.
pub async fn respond_error(stream: &mut TcpStream, status: u16, headers: &[(&str, &str)]) -> After {
    let mut out = Vec::with_capacity(256);
    http::write_error(&mut out, status, headers);
    match stream.write_all(&out).await {
        Ok(()) => After::KeepAlive,
        Err(_) => After::Close,
    }
}

/// A WebSocket upgrade that arrived as a later request of a kept-alive
/// connection (RFC 7230 allows it): its head is at the start of
/// `buffer[..filled]`, and the public listener's upgrade path takes it.
pub struct LaterUpgrade {
    /// The connection.
    pub stream: TcpStream,
    /// The read buffer, the upgrade's head at its start.
    pub buffer: Vec<u8>,
    /// Bytes of `buffer` read.
    pub filled: usize,
}

/// Serves plain HTTP requests on a public connection whose first request
/// head is already in `buffer[..filled]`, until the connection closes
/// (`None`) or a request is a WebSocket upgrade (`Some`).
pub async fn serve(
    shard: Rc<Shard>,
    mut stream: TcpStream,
    peer: Option<std::net::SocketAddr>,
    mut buffer: Vec<u8>,
    mut filled: usize,
) -> Option<LaterUpgrade> {
    loop {
        // Complete the head (the first one is complete on entry). An idle
        // keep-alive connection may wait 30 s for its next request; once a
        // byte of it arrived, the request has 10 s like any head
        // (PROTOCOL.md §6), and running out of it is answered 408.
        let head_timeout = Duration::from_millis(HEAD_TIMEOUT_MS);
        let mut deadline = Instant::now()
            + if filled == 0 {
                Duration::from_millis(KEEP_ALIVE_IDLE_MS)
            } else {
                head_timeout
            };
        let (request, used) = loop {
            let parsed = {
                let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
                match http::parse_head_with(
                    &buffer[..filled],
                    &mut headers,
                    PUBLIC_BODY_BYTES_MAX,
                    PUBLIC_HEAD_RULES,
                ) {
                    Err(error) => Err(error),
                    Ok(None) => Ok(None),
                    // The upgrade path validates it (a body is refused
                    // there, so none is waited for here).
                    Ok(Some(head)) if head.path == "/v1/ws" => Ok(Some(None)),
                    Ok(Some(head)) => {
                        let end = head.head_len + head.content_length;
                        if end <= filled {
                            Ok(Some(Some((
                                Request::from_head(&head, &buffer[head.head_len..end], peer),
                                end,
                            ))))
                        } else {
                            if end > buffer.len() {
                                buffer.resize(end, 0);
                            }
                            Ok(None)
                        }
                    }
                }
            };
            match parsed {
                Err(error) => {
                    let mut out = Vec::new();
                    http::write_http_error(&mut out, error);
                    let _ = stream.write_all(&out).await;
                    super::stall::linger_close(&mut stream).await;
                    return None;
                }
                Ok(Some(Some(done))) => break done,
                Ok(Some(None)) => {
                    let _ = stream.set_read_timeout(None);
                    return Some(LaterUpgrade {
                        stream,
                        buffer,
                        filled,
                    });
                }
                Ok(None) => {}
            }
            if filled == buffer.len() {
                let mut out = Vec::new();
                http::write_http_error(&mut out, http::HttpError::HeadTooLarge);
                let _ = stream.write_all(&out).await;
                super::stall::linger_close(&mut stream).await;
                return None;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                request_timeout(&mut stream, filled).await;
                return None;
            }
            let _ = stream.set_read_timeout(Some(left));
            match stream.read(&mut buffer[filled..]).await {
                Ok(0) => return None,
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    request_timeout(&mut stream, filled).await;
                    return None;
                }
                Err(_) => return None,
                Ok(read) => {
                    if filled == 0 {
                        deadline = deadline.min(Instant::now() + head_timeout);
                    }
                    filled += read;
                }
            }
        };
        let _ = stream.set_read_timeout(None);
        let close_requested = request.close
            || request.header("connection").is_some_and(|v| {
                String::from_utf8_lossy(v)
                    .to_ascii_lowercase()
                    .contains("close")
            });
        let after = dispatch(&shard, &request, &mut stream).await;
        if after == After::Close || close_requested || shard.shutdown.is_stopping() {
            return None;
        }
        buffer.copy_within(used..filled, 0);
        filled -= used;
        if buffer.len() > super::READ_BUFFER_BYTES && filled <= super::READ_BUFFER_BYTES {
            buffer.truncate(super::READ_BUFFER_BYTES);
        }
    }
}

/// A request that did not arrive whole in time: 408 when any of it came
/// (PROTOCOL.md §6); a connection that sent nothing is just closed.
async fn request_timeout(stream: &mut TcpStream, filled: usize) {
    if filled > 0 {
        let mut out = Vec::new();
        http::write_error(&mut out, 408, &[("Connection", "close")]);
        let _ = stream.write_all(&out).await;
    }
}

/// Picks the handler for a path.
async fn dispatch(shard: &Rc<Shard>, request: &Request, stream: &mut TcpStream) -> After {
    let mut out = Vec::new();
    if super::admin::write_probe(shard, &request.method, &request.path, &mut out) {
        // The same probes as on the admin listener, without a token: a load
        // balancer in front of the public port checks them there.
        if request.method == "HEAD" {
            http::strip_body(&mut out);
        }
        if request.close {
            http::mark_closing(&mut out);
        }
        return match stream.write_all(&out).await {
            Ok(()) => After::KeepAlive,
            Err(_) => After::Close,
        };
    }
    if request.method == "HEAD" {
        return refuse_head(request, stream).await;
    }
    match request.path.as_str() {
        "/v1/sessions" => super::access::sessions_route(shard, request, stream).await,
        path if super::web::is_asset_path(path) => super::web::serve(request, stream).await,
        _ => match super::history_routes::handle(shard, request, stream).await {
            Some(after) => after,
            None => respond_error(stream, 404, &[]).await,
        },
    }
}

/// The answer to a `HEAD` of any public path but the probes: no other
/// route serves HEAD, so it is the refusal that route gives any method it
/// does not take (405 with its `Allow`, or 404 for no route), without the
/// body (RFC 9110 §9.3.2: a client reads none, so on a kept-alive
/// connection it would be taken for the start of the next answer).
async fn refuse_head(request: &Request, stream: &mut TcpStream) -> After {
    let path = request.path.as_str();
    let mut out = Vec::with_capacity(256);
    if path == "/v1/sessions" {
        http::write_error(&mut out, 405, &[("Allow", super::access::SESSIONS_ALLOW)]);
    } else if super::web::is_asset_path(path) {
        http::write_error(&mut out, 405, &[("Allow", super::web::ALLOW)]);
    } else if super::history_routes::is_route(path) {
        let cors = super::history_routes::CORS_ORIGIN;
        http::write_error(
            &mut out,
            405,
            &[("Allow", super::history_routes::ALLOW), cors],
        );
    } else {
        http::write_error(&mut out, 404, &[]);
    }
    http::strip_body(&mut out);
    match stream.write_all(&out).await {
        Ok(()) => After::KeepAlive,
        Err(_) => After::Close,
    }
}
