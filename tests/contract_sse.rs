//! Server-Sent Events and long-polls against the contract (PROTOCOL.md §1,
//! §2, §4), over real sockets against a real server process:
//!
//! - `data` is the publisher's JSON text forwarded as is, so it may hold
//!   line breaks; every SSE event must still parse, as a browser's
//!   `EventSource` parses it, into the same envelope as on the WebSocket;
//! - a revoked key's open connections are closed: its SSE streams end and
//!   its waiting long-polls are answered 401, while other keys' go on;
//! - SIGTERM answers a waiting long-poll (200 with `next_after`) instead of
//!   dropping its connection.
//!
//! Every read has a deadline; no assertion is about speed.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{
    cli, issue, read_http_response, send_get, HttpResponse, Server, ServerBuilder, STEP_TIMEOUT,
};
use serde_json::{json, Value};

/// Creates a key for `org` while the server runs and waits until the
/// server accepts it (it is loaded within 2 s, PROTOCOL.md §1; until then
/// it gets 401): (id, key).
fn create_key(server: &Server, org: &str) -> (String, String) {
    let text = cli(
        &[
            "api-keys", "create", "--name", "sse", "--org", org, "--json",
        ],
        server.data_dir(),
    );
    let created: Value = serde_json::from_str(&text).expect("create --json prints JSON");
    let id = created["id"].as_str().unwrap().to_string();
    let key = created["key"].as_str().unwrap().to_string();
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let probe = common::http_request(
            server.ws_addr,
            "GET",
            &format!("/v1/poll?channels=issues&token={key}"),
            &[],
            b"",
        );
        if probe.status == 200 {
            return (id, key);
        }
        assert_eq!(probe.status, 401, "{}", probe.text());
        assert!(Instant::now() < deadline, "the new key never worked");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Reads once into `buffer` within `deadline`: `Some(n)` (0 at EOF, also
/// on a reset), `None` past the deadline.
fn read_until(stream: &mut TcpStream, buffer: &mut Vec<u8>, deadline: Instant) -> Option<usize> {
    match common::read_some(stream, buffer, deadline) {
        Ok(n) => Some(n),
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => None,
        Err(_) => Some(0),
    }
}

/// An SSE stream: the answer head checked, then an `EventSource`-style
/// parser over the body.
struct Sse {
    stream: TcpStream,
    /// Body bytes not yet parsed.
    buffer: Vec<u8>,
    /// The `data` lines of the event being read.
    data: Vec<String>,
    /// Its `id`, if it had one.
    id: Option<String>,
    /// A CR ended the last line: an LF right after it belongs to it.
    after_cr: bool,
}

/// One dispatched SSE event.
#[derive(Debug, Clone)]
struct SseEvent {
    /// The `id:` field of the event, if any.
    id: Option<u64>,
    /// The event's data: its `data:` lines joined with LF.
    data: String,
}

impl Sse {
    fn open(addr: SocketAddr, path: &str, headers: &[(&str, String)]) -> Sse {
        let (stream, buffer) = common::open_sse(addr, path, headers);
        Sse {
            stream,
            buffer,
            data: Vec::new(),
            id: None,
            after_cr: false,
        }
    }

    /// Parses the complete lines buffered so far the way the HTML
    /// standard's `EventSource` does (lines end with CRLF, LF or CR; a
    /// blank line dispatches the event), pushing dispatched events.
    fn parse(&mut self, events: &mut Vec<SseEvent>) {
        loop {
            if self.after_cr && self.buffer.first() == Some(&b'\n') {
                self.buffer.remove(0);
            }
            self.after_cr = false;
            let Some(end) = self.buffer.iter().position(|&b| b == b'\n' || b == b'\r') else {
                return;
            };
            self.after_cr = self.buffer[end] == b'\r';
            let line = String::from_utf8(self.buffer[..end].to_vec()).expect("SSE is UTF-8");
            self.buffer.drain(..=end);
            if line.is_empty() {
                if !self.data.is_empty() {
                    events.push(SseEvent {
                        id: self.id.take().map(|id| id.parse().expect("id is a seq")),
                        data: self.data.join("\n"),
                    });
                }
                self.data.clear();
                self.id = None;
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((&line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "data" => self.data.push(value.to_string()),
                "id" => self.id = Some(value.to_string()),
                // `retry`, `event`; any other name is ignored by browsers,
                // which is exactly how a broken event loses its data.
                _ => {}
            }
        }
    }

    /// Reads until `count` events arrived.
    fn events(&mut self, count: usize) -> Vec<SseEvent> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        let mut events = Vec::new();
        loop {
            self.parse(&mut events);
            if events.len() >= count {
                assert_eq!(events.len(), count, "more events than expected: {events:?}");
                return events;
            }
            match read_until(&mut self.stream, &mut self.buffer, deadline) {
                Some(0) => panic!("SSE stream ended after {events:?}"),
                Some(_) => {}
                None => panic!("only {} SSE events: {events:?}", events.len()),
            }
        }
    }

    /// Reads until the server closes the stream; returns the events that
    /// came before the end. Panics when it stays open `STEP_TIMEOUT`.
    fn until_end(&mut self) -> Vec<SseEvent> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        let mut events = Vec::new();
        loop {
            match read_until(&mut self.stream, &mut self.buffer, deadline) {
                Some(0) => {
                    self.parse(&mut events);
                    return events;
                }
                Some(_) => self.parse(&mut events),
                None => panic!(
                    "the SSE stream was still open after {STEP_TIMEOUT:?}; events: {events:?}"
                ),
            }
        }
    }
}

/// The envelope in an event's data, which must be one JSON value.
fn envelope(event: &SseEvent) -> Value {
    serde_json::from_str(&event.data)
        .unwrap_or_else(|e| panic!("event data is not JSON ({e}): {:?}", event.data))
}

#[test]
fn sse_events_with_line_breaks_in_data_reach_event_source_whole() {
    let server = ServerBuilder::new().org("org_s").arg("--shards", 2).start();
    let key = server.key("org_s").to_string();
    // Pretty-printed data, with every kind of line break an SSE parser
    // knows (LF, CRLF, CR) and blank lines, around and between tokens; an
    // escaped line break inside a string stays two characters.
    let pretty = [
        "{\"org_id\":\"org_s\",\"type\":\"issue\",\"data\":{\n  \"id\": \"iss_lf\",\n  \"n\": 1\n}}",
        "{\"org_id\":\"org_s\",\"type\":\"issue\",\"data\":{\r\n  \"id\": \"iss_crlf\",\r\n\r\n  \"text\": \"a\\nb\"\r\n}}",
        "{\"org_id\":\"org_s\",\"type\":\"issue\",\"data\":{\r\"id\":\r\"iss_cr\",\"big\":\n123456789012345678901234567890\r}\n}",
        // An event of source s1 matches `events` and `events:s1`: two SSE
        // events of one seq, only the second with `id:`.
        "{\"org_id\":\"org_s\",\"type\":\"event\",\"data\":{\n\"id\": \"evt_1\",\n\n\"source_id\": \"s1\"\n}}",
        "{\"org_id\":\"org_s\",\"type\":\"issue\",\"data\":{\"id\":\"iss_flat\"}}",
    ];
    let seqs = server.publish_ok(&format!("[{}]", pretty.join(",")));
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);

    let mut sse = Sse::open(
        server.ws_addr,
        &format!("/v1/sse?channels=issues,events,events:s1&token={key}"),
        &[("Last-Event-ID", "0".to_string())],
    );
    let events = sse.events(6);
    // Parsed as here, without arbitrary precision; the digits are checked
    // on the text below.
    let big: Value = serde_json::from_str("123456789012345678901234567890").unwrap();
    let got: Vec<(Option<u64>, Value)> = events.iter().map(|e| (e.id, envelope(e))).collect();
    let want = vec![
        (
            Some(1),
            json!({"type":"issue","channel":"issues","seq":1,"data":{"id":"iss_lf","n":1}}),
        ),
        (
            Some(2),
            json!({"type":"issue","channel":"issues","seq":2,"data":{"id":"iss_crlf","text":"a\nb"}}),
        ),
        (
            Some(3),
            json!({"type":"issue","channel":"issues","seq":3,"data":{"id":"iss_cr","big":big}}),
        ),
        (
            None,
            json!({"type":"event","channel":"events","seq":4,"data":{"id":"evt_1","source_id":"s1"}}),
        ),
        (
            Some(4),
            json!({"type":"event","channel":"events:s1","seq":4,"data":{"id":"evt_1","source_id":"s1"}}),
        ),
        (
            Some(5),
            json!({"type":"issue","channel":"issues","seq":5,"data":{"id":"iss_flat"}}),
        ),
    ];
    assert_eq!(got, want);
    // Every digit of the big number arrives as written.
    assert!(
        events[2].data.contains("123456789012345678901234567890"),
        "{:?}",
        events[2].data
    );

    // Live, too: a pretty-printed message published while streaming.
    let live = server.publish_ok(
        "{\"org_id\":\"org_s\",\"type\":\"issue\",\"data\":{\n  \"id\": \"iss_live\"\r\n}}",
    );
    let events = sse.events(1);
    assert_eq!(events[0].id, Some(live[0]));
    assert_eq!(
        envelope(&events[0]),
        json!({"type":"issue","channel":"issues","seq":live[0],"data":{"id":"iss_live"}})
    );
}

#[test]
fn sse_streams_of_a_revoked_key_end_and_other_keys_stream_on() {
    let server = ServerBuilder::new().org("org_r").arg("--shards", 2).start();
    let kept = server.key("org_r").to_string();
    let (id, revoked) = create_key(&server, "org_r");
    let path = "/v1/sse?channels=issues";
    let mut by_token = Sse::open(server.ws_addr, &format!("{path}&token={revoked}"), &[]);
    let mut by_bearer = Sse::open(
        server.ws_addr,
        path,
        &[("Authorization", format!("Bearer {revoked}"))],
    );
    // A session names its key: its stream ends with the key too.
    let session = common::http_request(
        server.ws_addr,
        "POST",
        "/v1/sessions",
        &[("Authorization", format!("Bearer {revoked}"))],
        b"",
    );
    assert_eq!(session.status, 200, "{}", session.text());
    let cookie = session
        .header("set-cookie")
        .expect("Set-Cookie")
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let mut by_cookie = Sse::open(server.ws_addr, path, &[("Cookie", cookie)]);
    let mut other = Sse::open(server.ws_addr, &format!("{path}&token={kept}"), &[]);

    // Each stream works before the revocation.
    let before = server.publish_ok(&issue("org_r", "before"));
    for sse in [&mut by_token, &mut by_bearer, &mut by_cookie, &mut other] {
        assert_eq!(sse.events(1)[0].id, Some(before[0]));
    }

    cli(&["api-keys", "revoke", &id], server.data_dir());
    // The revoked key's streams end: the server closes them (without the
    // fix they stay open, silent until the next message or keep-alive).
    for sse in [&mut by_token, &mut by_bearer, &mut by_cookie] {
        let late = sse.until_end();
        assert!(late.is_empty(), "nothing was published: {late:?}");
    }
    // Reconnecting with the revoked key is refused like any bad key.
    let refused = common::http_request(
        server.ws_addr,
        "GET",
        &format!("{path}&token={revoked}"),
        &[],
        b"",
    );
    assert_eq!(refused.status, 401);
    assert_eq!(refused.json(), json!({"error":"unauthorized"}));
    // The other key's stream goes on.
    let after = server.publish_ok(&issue("org_r", "after"));
    let events = other.events(1);
    assert_eq!(events[0].id, Some(after[0]));
    assert_eq!(envelope(&events[0])["data"]["id"], "after");
}

/// Sends a long-poll (the answer is read later with `read_http_response`).
fn start_long_poll(addr: SocketAddr, query: &str, headers: &[(&str, String)]) -> TcpStream {
    let stream = send_get(addr, &format!("/v1/poll?{query}"), headers);
    // The head is read at once; this only gives the server a moment to
    // start waiting, the outcome does not depend on it.
    std::thread::sleep(Duration::from_millis(500));
    stream
}

#[test]
fn waiting_long_poll_of_a_revoked_key_gets_401() {
    let server = ServerBuilder::new().org("org_p").arg("--shards", 2).start();
    let kept = server.key("org_p").to_string();
    let (id, revoked) = create_key(&server, "org_p");
    let seq = server.publish_ok(&issue("org_p", "first"))[0];
    // Both wait up to 30 s, far past the read deadline of this test.
    let query = format!("channels=issues&after={seq}&wait_ms=30000");
    let mut waiting = start_long_poll(
        server.ws_addr,
        &query,
        &[("Authorization", format!("Bearer {revoked}"))],
    );
    let mut other = start_long_poll(server.ws_addr, &format!("{query}&token={kept}"), &[]);

    cli(&["api-keys", "revoke", &id], server.data_dir());
    let answer: HttpResponse = read_http_response(&mut waiting);
    assert_eq!(answer.status, 401, "{}", answer.text());
    assert_eq!(answer.json(), json!({"error":"unauthorized"}));
    assert_eq!(answer.header("access-control-allow-origin"), Some("*"));

    // The other key's long-poll still waits, and gets the next message.
    let next = server.publish_ok(&issue("org_p", "next"))[0];
    let answer = read_http_response(&mut other);
    assert_eq!(answer.status, 200, "{}", answer.text());
    let body = answer.json();
    assert_eq!(body["messages"][0]["seq"], next, "{body}");
    assert_eq!(body["messages"][0]["data"]["id"], "next", "{body}");
    assert_eq!(body["next_after"], next, "{body}");
}

#[test]
fn sigterm_answers_a_waiting_long_poll_and_ends_sse() {
    let mut server = ServerBuilder::new().org("org_t").arg("--shards", 2).start();
    let key = server.key("org_t").to_string();
    let seq = server.publish_ok(&issue("org_t", "only"))[0];
    let mut sse = Sse::open(
        server.ws_addr,
        &format!("/v1/sse?channels=issues&token={key}"),
        &[],
    );
    let mut waiting = start_long_poll(
        server.ws_addr,
        &format!("channels=issues&after={seq}&wait_ms=30000&token={key}"),
        &[],
    );

    server.signal(libc::SIGTERM);
    // Answered as a wait that ended with nothing new: the client polls
    // again from `next_after` (here, after the server is back).
    let answer = read_http_response(&mut waiting);
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(
        answer.json(),
        json!({"org_id":"org_t","messages":[],"next_after":seq})
    );
    assert!(sse.until_end().is_empty());
    let status = server.wait_exit(STEP_TIMEOUT).expect("the server exits");
    assert!(status.success(), "{status:?}");
}
