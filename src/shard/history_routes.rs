//! History on the public listener (PROTOCOL.md §4): `GET /v1/poll` (with
//! `wait_ms` long-poll), `GET /v1/sse` (Server-Sent Events resuming from
//! `Last-Event-ID`), and the resource lists `GET /v1/events`,
//! `/v1/deliveries`, `/v1/issues`, `/v1/collections/<id>/sync`.
//!
//! Requests are authenticated where they land; the read itself runs on the
//! org's owner shard (over the mesh when that is another shard), which
//! holds the org's log and index.
//!
//! CORS: every answer of these routes carries `Access-Control-Allow-Origin:
//! *`, and `OPTIONS` is the preflight (204), so a page of any origin holding
//! a key (`?token=` or `Authorization: Bearer`) can read what that key may
//! read, as it already can over the WebSocket. Never with
//! `Access-Control-Allow-Credentials` nor a reflected `Origin`: browsers
//! then refuse a cross-origin page the answer to a request that carried the
//! session cookie, so the cookie (the one credential a browser attaches by
//! itself) still reads nothing cross-origin.

use std::rc::Rc;

use futures_lite::AsyncWriteExt;
use glommio::net::TcpStream;

use super::routes::{respond, respond_error, After, Request};
use super::{shard_for, Shard, ShardMessage};
use crate::history::query::{Answer, Envelope, Query, Range};
use crate::message::push_u64;

/// Default `limit` of polls and lists.
pub const LIMIT_DEFAULT: usize = 100;
/// Largest `limit`.
pub const LIMIT_MAX: usize = 1000;
/// Largest `wait_ms` of a long-poll.
pub const WAIT_MS_MAX: u64 = 30_000;
/// How long one SSE round waits before sending a keep-alive comment.
const SSE_KEEPALIVE_MS: u64 = 15_000;

const JSON: &str = "application/json";

/// On every answer of these routes (see the module comment).
pub const CORS_ORIGIN: (&str, &str) = ("Access-Control-Allow-Origin", "*");
/// The methods these routes take (their 405s' `Allow`).
pub const ALLOW: &str = "GET, OPTIONS";
/// How long a browser may cache the preflight (Chromium caps it at 7200).
const CORS_MAX_AGE_SECS: &str = "7200";

/// The route `path` names: `Some(None)` for `/v1/poll` and `/v1/sse`, the
/// list's resource for the others, `None` when it is no history route.
fn route_of(path: &str) -> Option<Option<Resource>> {
    match path {
        "/v1/poll" | "/v1/sse" => Some(None),
        "/v1/events" => Some(Some(Resource::Events)),
        "/v1/deliveries" => Some(Some(Resource::Deliveries)),
        "/v1/issues" => Some(Some(Resource::Issues)),
        _ => path
            .strip_prefix("/v1/collections/")
            .and_then(|rest| rest.strip_suffix("/sync"))
            .map(|id| Some(Resource::Sync(id.to_string()))),
    }
}

/// Whether `path` is a history route (whatever its method).
pub fn is_route(path: &str) -> bool {
    route_of(path).is_some()
}

/// Serves the request when its path is a history route; `None` otherwise.
pub async fn handle(shard: &Rc<Shard>, request: &Request, stream: &mut TcpStream) -> Option<After> {
    let path = request.path.as_str();
    let resource = route_of(path)?;
    if request.method == "OPTIONS" {
        return Some(preflight(stream).await);
    }
    if request.method != "GET" {
        return Some(respond_error(stream, 405, &[("Allow", ALLOW), CORS_ORIGIN]).await);
    }
    let principal = match super::access::authenticate_request(shard, request) {
        Ok(principal) => principal,
        Err(status) => return Some(respond_error(stream, status, &[CORS_ORIGIN]).await),
    };
    let org_id = principal.org_id.clone();
    Some(match (path, resource) {
        ("/v1/poll", _) => poll(shard, request, stream, org_id, &principal).await,
        ("/v1/sse", _) => sse(shard, request, stream, org_id, &principal).await,
        (_, Some(resource)) => list(shard, request, stream, org_id, resource).await,
        (_, None) => unreachable!("every other path has a resource"),
    })
}

/// The CORS preflight of a history route: GET, with `Authorization` (a
/// key as bearer token) and `Last-Event-ID` (an SSE resume). Needs no
/// credentials (browsers send none on a preflight) and grants none.
async fn preflight(stream: &mut TcpStream) -> After {
    respond(
        stream,
        204,
        "",
        &[
            CORS_ORIGIN,
            ("Access-Control-Allow-Methods", "GET"),
            (
                "Access-Control-Allow-Headers",
                "Authorization, Last-Event-ID",
            ),
            ("Access-Control-Max-Age", CORS_MAX_AGE_SECS),
            ("Allow", "GET, OPTIONS"),
        ],
        b"",
    )
    .await
}

/// Which list a resource route serves.
enum Resource {
    Events,
    Deliveries,
    Issues,
    Sync(String),
}

async fn bad_request(stream: &mut TcpStream, reason: &str) -> After {
    let body = format!(
        r#"{{"error":"invalid_request","reason":{}}}"#,
        serde_json::Value::from(reason)
    );
    respond(stream, 400, JSON, &[CORS_ORIGIN], body.as_bytes()).await
}

fn number(request: &Request, name: &str) -> Result<Option<u64>, String> {
    match request.query_param(name) {
        None => Ok(None),
        Some(text) if text.is_empty() => Ok(None),
        Some(text) => text
            .parse::<u64>()
            .map(Some)
            .map_err(|_| format!("{name} must be a non-negative integer")),
    }
}

fn limit_of(request: &Request) -> Result<usize, String> {
    match number(request, "limit")? {
        None => Ok(LIMIT_DEFAULT),
        Some(0) => Err("limit must be at least 1".to_string()),
        Some(n) => Ok((n as usize).min(LIMIT_MAX)),
    }
}

/// `channels=a,b`: valid, at least one, duplicates dropped.
fn channels_of(shard: &Shard, request: &Request) -> Result<Vec<String>, String> {
    let list = request.query_param("channels").unwrap_or_default();
    let mut channels: Vec<String> = Vec::new();
    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        if !super::connection::is_valid_channel(name) {
            return Err(format!("unknown channel {name:?}"));
        }
        if !channels.iter().any(|c| c == name) {
            channels.push(name.to_string());
        }
    }
    if channels.is_empty() {
        return Err("channels is required (comma-separated)".to_string());
    }
    if channels.len() > shard.config.subscriptions_max {
        return Err(format!(
            "at most {} channels",
            shard.config.subscriptions_max
        ));
    }
    Ok(channels)
}

/// Runs `query` on the org's owner shard.
async fn ask(shard: &Rc<Shard>, query: Query) -> Option<Answer> {
    let owner = shard_for(&query.org_id, shard.count);
    if owner == shard.id {
        return run_query(shard, query).await;
    }
    let (reply, answer) = futures_channel::oneshot::channel();
    let mesh = shard.mesh.as_ref()?;
    mesh.send_to(owner, ShardMessage::History { query, reply })
        .ok()?;
    answer.await.ok()
}

/// Counts an SSE stream or poll in [`Shard::http_streams`] while it is
/// served, so the drain waits for its answer.
struct Serving<'a>(&'a Shard);

impl<'a> Serving<'a> {
    fn new(shard: &'a Shard) -> Serving<'a> {
        shard.http_streams.set(shard.http_streams.get() + 1);
        Serving(shard)
    }
}

impl Drop for Serving<'_> {
    fn drop(&mut self) {
        self.0.http_streams.set(self.0.http_streams.get() - 1);
    }
}

/// Why a stream or long-poll must end before its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Interrupt {
    /// Its key was revoked (PROTOCOL.md §1: a revoked key's open
    /// connections are closed); a session cookie names its key, so a
    /// session's streams end with it too.
    Revoked,
    /// The shard drains for shutdown.
    Stopping,
    /// The client closed its connection: nobody is left to answer.
    Gone,
}

/// Resolves when the credential `principal` came with is no longer
/// accepted (key revoked, session signed out or expired), or, with `on_stop`, when the
/// shard starts draining (its shutdown signal). The key reload loop (also
/// on sign-outs) notifies [`Shard::http_wake`], so this notices a
/// revocation as fast as the WebSocket path's 4003 close does.
async fn interrupted(
    shard: &Shard,
    principal: &super::access::Principal,
    on_stop: bool,
) -> Interrupt {
    loop {
        let seen = shard.http_wake.generation();
        if !super::access::still_valid(shard, principal) {
            return Interrupt::Revoked;
        }
        if on_stop && shard.shutdown.is_stopping() {
            return Interrupt::Stopping;
        }
        // A session's wait also ends when the session expires.
        let woken = async {
            match principal.session {
                Some((_, expires)) => {
                    let left = expires.saturating_sub(crate::auth::sessions::now_unix_secs());
                    futures_lite::future::or(shard.http_wake.wait(seen), async {
                        glommio::timer::sleep(std::time::Duration::from_secs(left)).await;
                    })
                    .await
                }
                None => shard.http_wake.wait(seen).await,
            }
        };
        if on_stop {
            futures_lite::future::or(woken, shard.shutdown.wait()).await;
        } else {
            woken.await;
        }
    }
}

/// `ask`, unless interrupted first — also by the client leaving, which
/// ends the wait at once (and, through the dropped reply, the owner's).
async fn ask_unless(
    shard: &Rc<Shard>,
    query: Query,
    principal: &super::access::Principal,
    on_stop: bool,
    stream: &TcpStream,
) -> Result<Option<Answer>, Interrupt> {
    let asked = futures_lite::future::or(async { Ok(ask(shard, query).await) }, async {
        Err(interrupted(shard, principal, on_stop).await)
    });
    futures_lite::future::or(asked, async {
        super::waits::client_gone(stream).await;
        Err(Interrupt::Gone)
    })
    .await
}

/// Counts a waiting request of the request's address; `None` past the
/// address's limit (PROTOCOL.md §6), to be answered 429.
fn enter_wait<'a>(shard: &'a Shard, request: &Request) -> Option<super::waits::Counted<'a>> {
    shard.access.waits.enter(request.peer.map(|p| p.ip()))
}

/// `{"type":…,"channel":…,"seq":…,"data":…}`, as on the WebSocket.
fn push_envelope(out: &mut Vec<u8>, envelope: &Envelope) {
    out.extend_from_slice(b"{\"type\":\"");
    out.extend_from_slice(envelope.kind.as_str().as_bytes());
    out.extend_from_slice(b"\",\"channel\":\"");
    out.extend_from_slice(envelope.channel.as_bytes());
    out.extend_from_slice(b"\",\"seq\":");
    push_u64(out, envelope.seq);
    out.extend_from_slice(b",\"data\":");
    out.extend_from_slice(envelope.data.as_bytes());
    out.push(b'}');
}

/// One SSE event per envelope. A message matching several of the listed
/// channels is several events with the same seq, adjacent (an answer never
/// splits a message): only the last of them carries `id:`. An event
/// without `id` leaves the client's last event id as it was, so a
/// connection lost between two events of one seq resumes before that seq
/// and gets all of its events again (at least once) instead of losing the
/// rest, as `Last-Event-ID: seq` would mean "all of seq seen".
fn push_sse_events(out: &mut Vec<u8>, envelopes: &[Envelope]) {
    let mut envelope_text = Vec::new();
    for (i, envelope) in envelopes.iter().enumerate() {
        let last_of_seq = envelopes
            .get(i + 1)
            .is_none_or(|next| next.seq != envelope.seq);
        if last_of_seq {
            out.extend_from_slice(b"id: ");
            push_u64(out, envelope.seq);
            out.push(b'\n');
        }
        envelope_text.clear();
        push_envelope(&mut envelope_text, envelope);
        push_sse_data(out, &envelope_text);
        out.push(b'\n');
    }
}

/// The named event that tells a resuming SSE client that messages after
/// its `Last-Event-ID` were lost (dropped by retention, or the id is above
/// the org's latest seq): `event: history_gap`, before any message. Its
/// `id:` is the seq the stream goes on after, so a reconnect before the
/// next message resumes from there and not from the lost position again.
fn push_history_gap(out: &mut Vec<u8>, last_event_id: u64, started_after: u64) {
    out.extend_from_slice(b"event: history_gap\nid: ");
    push_u64(out, started_after);
    out.extend_from_slice(
        b"\ndata: {\"type\":\"history_gap\",\"recovered\":false,\"last_event_id\":",
    );
    push_u64(out, last_event_id);
    out.extend_from_slice(b"}\n\n");
}

/// `payload` as SSE `data:` lines: one per line of it. `data` is the
/// publisher's JSON text forwarded as is, so it may hold line breaks
/// (pretty-printed JSON); a break inside a `data:` line would end the field
/// there (and an empty line the event). The SSE parser splits on CRLF, LF
/// and CR and joins the `data:` lines of an event with LF, so the client
/// gets the text back with each break as LF: the same JSON value, since a
/// raw line break can only be whitespace between JSON tokens (inside a
/// string it must be escaped).
fn push_sse_data(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(b"data: ");
    let mut rest = payload;
    while let Some(at) = rest.iter().position(|&b| b == b'\n' || b == b'\r') {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(b"\ndata: ");
        let crlf = rest[at] == b'\r' && rest.get(at + 1) == Some(&b'\n');
        rest = &rest[at + if crlf { 2 } else { 1 }..];
    }
    out.extend_from_slice(rest);
    out.push(b'\n');
}

/// A poll; with `wait_ms`, a long-poll. One whose key is revoked while it
/// waits is answered 401 like any other request with that key. When the
/// server drains, the shutdown signal the owner shard's history holds ends
/// the wait, and the poll is answered as if its wait had
/// ended: 200, the messages it found (usually none) and `next_after`, which
/// a client polls again with as usual (see `Shard::http_streams`).
async fn poll(
    shard: &Rc<Shard>,
    request: &Request,
    stream: &mut TcpStream,
    org_id: String,
    principal: &super::access::Principal,
) -> After {
    let _serving = Serving::new(shard);
    let parsed = (|| {
        let channels = channels_of(shard, request)?;
        // Without `after` the poll starts from now (an empty page and
        // `next_after`): the lists are for what happened before.
        let after = number(request, "after")?;
        let limit = limit_of(request)?;
        let wait_ms = number(request, "wait_ms")?.unwrap_or(0).min(WAIT_MS_MAX);
        Ok::<_, String>((channels, after, limit, wait_ms))
    })();
    let (channels, after, limit, wait_ms) = match parsed {
        Ok(parsed) => parsed,
        Err(reason) => return bad_request(stream, &reason).await,
    };
    // Only a long-poll waits; a plain poll is answered at once.
    let _waiting = match wait_ms > 0 {
        false => None,
        true => match enter_wait(shard, request) {
            Some(waiting) => Some(waiting),
            None => return respond_error(stream, 429, &[CORS_ORIGIN]).await,
        },
    };
    let query = Query {
        org_id: org_id.clone(),
        channels,
        range: Range::After(after),
        limit,
        wait_ms,
    };
    let answer = match ask_unless(shard, query, principal, false, stream).await {
        Ok(Some(answer)) => answer,
        Ok(None) => return respond_error(stream, 503, &[CORS_ORIGIN]).await,
        Err(Interrupt::Gone) => return After::Close,
        Err(_) => return respond_error(stream, 401, &[CORS_ORIGIN]).await,
    };
    let mut body = Vec::with_capacity(
        64 + answer
            .messages
            .iter()
            .map(|m| m.data.len() + 64)
            .sum::<usize>(),
    );
    body.extend_from_slice(b"{\"org_id\":");
    body.extend_from_slice(serde_json::Value::from(org_id).to_string().as_bytes());
    body.extend_from_slice(b",\"messages\":[");
    for (i, envelope) in answer.messages.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        push_envelope(&mut body, envelope);
    }
    body.extend_from_slice(b"],\"next_after\":");
    push_u64(&mut body, answer.next_after);
    // Only when false (messages after `after` were dropped by retention, or
    // `after` was above the org's latest seq): every other answer keeps the
    // shape clients already parse.
    if !answer.recovered {
        body.extend_from_slice(b",\"recovered\":false");
    }
    body.push(b'}');
    respond(
        stream,
        200,
        JSON,
        &[("Cache-Control", "no-store"), CORS_ORIGIN],
        &body,
    )
    .await
}

/// An SSE stream: long-polls of up to 15 s in a loop. It ends (the
/// connection is closed) when its key is revoked or its session signed
/// out, and when the server drains.
async fn sse(
    shard: &Rc<Shard>,
    request: &Request,
    stream: &mut TcpStream,
    org_id: String,
    principal: &super::access::Principal,
) -> After {
    let _serving = Serving::new(shard);
    let channels = match channels_of(shard, request) {
        Ok(channels) => channels,
        Err(reason) => return bad_request(stream, &reason).await,
    };
    let resume = request
        .header("last-event-id")
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(|v| v.trim().to_string())
        .or_else(|| request.query_param("last_event_id"))
        .filter(|v| !v.is_empty());
    let mut after = match resume.map(|v| v.parse::<u64>()) {
        None => None,
        Some(Ok(seq)) => Some(seq),
        Some(Err(_)) => return bad_request(stream, "Last-Event-ID must be a seq").await,
    };
    let Some(_waiting) = enter_wait(shard, request) else {
        return respond_error(stream, 429, &[CORS_ORIGIN]).await;
    };
    // A resumed stream has its own position (taken as it is by the first
    // round). A fresh one means "from now", where now is the 200: the
    // position is fixed on the owner before the head is written, so a
    // message published once the client has the head is never missed.
    let resuming = after.is_some();
    if after.is_none() {
        let query = Query {
            org_id: org_id.clone(),
            channels: channels.clone(),
            range: Range::After(None),
            limit: 1,
            wait_ms: 0,
        };
        after = match ask_unless(shard, query, principal, true, stream).await {
            Ok(Some(answer)) => Some(answer.started_after),
            Ok(None) => return respond_error(stream, 503, &[CORS_ORIGIN]).await,
            Err(Interrupt::Revoked) => return respond_error(stream, 401, &[CORS_ORIGIN]).await,
            Err(Interrupt::Stopping) => return respond_error(stream, 503, &[CORS_ORIGIN]).await,
            Err(Interrupt::Gone) => return After::Close,
        };
    }
    let head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\nConnection: close\r\nX-Accel-Buffering: no\r\nAccess-Control-Allow-Origin: *\r\n\r\nretry: 1000\n\n";
    if stream.write_all(head).await.is_err() {
        return After::Close;
    }
    let mut out = Vec::new();
    // A resumed stream's first answer comes at once, so that a lost history
    // is told before the first message, not after a wait for one.
    let mut resuming = resuming;
    while !shard.shutdown.is_stopping() {
        let query = Query {
            org_id: org_id.clone(),
            channels: channels.clone(),
            range: Range::After(after),
            limit: LIMIT_MAX,
            wait_ms: if resuming { 0 } else { SSE_KEEPALIVE_MS },
        };
        let Ok(Some(answer)) = ask_unless(shard, query, principal, true, stream).await else {
            break;
        };
        if !super::access::still_valid(shard, principal) {
            break;
        }
        out.clear();
        if std::mem::take(&mut resuming) && !answer.recovered {
            push_history_gap(&mut out, after.unwrap_or(0), answer.started_after);
        }
        push_sse_events(&mut out, &answer.messages);
        if answer.messages.is_empty() {
            out.extend_from_slice(b": keep-alive\n\n");
        }
        if stream.write_all(&out).await.is_err() || stream.flush().await.is_err() {
            break;
        }
        after = Some(answer.next_after);
    }
    After::Close
}

async fn list(
    shard: &Rc<Shard>,
    request: &Request,
    stream: &mut TcpStream,
    org_id: String,
    resource: Resource,
) -> After {
    let filter_id = |name: &str| -> Result<Option<String>, String> {
        match request.query_param(name).filter(|v| !v.is_empty()) {
            None => Ok(None),
            Some(id) if crate::publish::is_valid_id(&id) => Ok(Some(id)),
            Some(_) => Err(format!("{name} must match [A-Za-z0-9_.-]{{1,128}}")),
        }
    };
    let parsed = (|| {
        let channel = match &resource {
            Resource::Events => match filter_id("source_id")? {
                Some(id) => format!("events:{id}"),
                None => "events".to_string(),
            },
            Resource::Deliveries => match filter_id("destination_id")? {
                Some(id) => format!("deliveries:{id}"),
                None => "deliveries".to_string(),
            },
            Resource::Issues => "issues".to_string(),
            Resource::Sync(id) if crate::publish::is_valid_id(id) => format!("collections:{id}"),
            Resource::Sync(_) => {
                return Err("collection id must match [A-Za-z0-9_.-]{1,128}".to_string())
            }
        };
        Ok::<_, String>((channel, number(request, "before")?, limit_of(request)?))
    })();
    let (channel, before, limit) = match parsed {
        Ok(parsed) => parsed,
        Err(reason) => return bad_request(stream, &reason).await,
    };
    let query = Query {
        org_id,
        channels: vec![channel],
        range: Range::Before(before),
        limit,
        wait_ms: 0,
    };
    let Some(answer) = ask(shard, query).await else {
        return respond_error(stream, 503, &[CORS_ORIGIN]).await;
    };
    let mut body = Vec::with_capacity(
        32 + answer
            .messages
            .iter()
            .map(|m| m.data.len() + 1)
            .sum::<usize>(),
    );
    body.extend_from_slice(b"{\"data\":[");
    for (i, envelope) in answer.messages.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(envelope.data.as_bytes());
    }
    body.extend_from_slice(b"],\"has_more\":");
    body.extend_from_slice(if answer.has_more { b"true" } else { b"false" });
    if let (true, Some(oldest)) = (answer.has_more, answer.messages.last()) {
        // The `before` of the next page (an addition to the contract's
        // shape: the resources themselves carry no seq).
        body.extend_from_slice(b",\"next_before\":");
        push_u64(&mut body, oldest.seq);
    }
    body.push(b'}');
    respond(
        stream,
        200,
        JSON,
        &[("Cache-Control", "no-store"), CORS_ORIGIN],
        &body,
    )
    .await
}

/// Runs a history query on the org's owner shard; in cluster mode, once
/// the org is followed here (its seq known), or answers 503.
pub async fn run_query(
    shard: &Shard,
    query: crate::history::query::Query,
) -> Option<crate::history::query::Answer> {
    if shard.cluster.is_some() && !super::cluster::ensure_followed(shard, &query.org_id).await {
        return None;
    }
    Some(crate::history::query::run(&shard.history, query).await)
}

#[cfg(test)]
mod tests {
    use super::push_sse_data;

    fn sse(payload: &str) -> String {
        let mut out = Vec::new();
        push_sse_data(&mut out, payload.as_bytes());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn every_line_of_the_payload_is_its_own_data_line() {
        assert_eq!(sse(r#"{"a":1}"#), "data: {\"a\":1}\n");
        assert_eq!(
            sse("{\n  \"a\": 1\n}"),
            "data: {\ndata:   \"a\": 1\ndata: }\n"
        );
        assert_eq!(sse("{\r\n\r\n1\r}"), "data: {\ndata: \ndata: 1\ndata: }\n");
        assert_eq!(sse("{\n\r}"), "data: {\ndata: \ndata: }\n");
        assert_eq!(sse(""), "data: \n");
    }
}
