//! Server-Sent Events against the contract (PROTOCOL.md §2, §4), over real
//! sockets against a real server process:
//!
//! - `data` is the publisher's JSON text forwarded as is, so it may hold
//!   line breaks; every SSE event must still parse, as a browser's
//!   `EventSource` parses it, into the same envelope as on the WebSocket.
//!
//! Every read has a deadline; no assertion is about speed.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Instant;

use common::{tcp_connect, ServerBuilder, STEP_TIMEOUT};
use serde_json::{json, Value};

/// Sends a GET with extra headers on a fresh connection (kept open).
fn send_get(addr: SocketAddr, path: &str, headers: &[(&str, String)]) -> TcpStream {
    let mut stream = tcp_connect(addr);
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).expect("send request");
    stream
}

/// Reads once into `buffer` within `deadline`: `Some(n)` (0 at EOF, also
/// on a reset), `None` past the deadline.
fn read_until(stream: &mut TcpStream, buffer: &mut Vec<u8>, deadline: Instant) -> Option<usize> {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut chunk) {
            Ok(n) => {
                buffer.extend_from_slice(&chunk[..n]);
                return Some(n);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if Instant::now() >= deadline {
                    return None;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return Some(0),
        }
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
        let mut stream = send_get(addr, path, headers);
        let deadline = Instant::now() + STEP_TIMEOUT;
        let mut buffer = Vec::new();
        let head_end = loop {
            if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            match read_until(&mut stream, &mut buffer, deadline) {
                Some(0) => panic!("closed: {:?}", String::from_utf8_lossy(&buffer)),
                Some(_) => {}
                None => panic!("no SSE answer head"),
            }
        };
        let head = String::from_utf8_lossy(&buffer[..head_end]).to_string();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: text/event-stream"),
            "{head}"
        );
        buffer.drain(..head_end);
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
