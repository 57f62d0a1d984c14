//! Lost history is said on every transport (PROTOCOL.md §2, §4), over real
//! sockets against a real server process:
//!
//! - retention forced small (`--history-messages`), then a poll and an SSE
//!   resume from a dropped position: `"recovered":false` and the
//!   `history_gap` event before the first message, then what is retained;
//! - a poll without `after` on an org with history starts from now;
//! - `after` (or `Last-Event-ID`) above the org's latest seq, a client of a
//!   data directory since reset: `recovered:false` on the WebSocket and the
//!   poll, `history_gap` on SSE, and every new message delivered after.
//!
//! Every read has a deadline; no assertion is about speed.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::time::Instant;

use common::{http_request, issue, read_some, Server, ServerBuilder, STEP_TIMEOUT};
use serde_json::Value;

fn poll(server: &Server, org: &str, query: &str) -> Value {
    let response = http_request(
        server.ws_addr,
        "GET",
        &format!("/v1/poll?channels=issues&{query}&token={}", server.key(org)),
        &[],
        b"",
    );
    assert_eq!(response.status, 200, "{}", response.text());
    response.json()
}

fn seqs(page: &Value) -> Vec<u64> {
    page["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("no messages in {page}"))
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect()
}

/// One SSE event as an `EventSource` sees it.
#[derive(Debug)]
struct SseEvent {
    /// `event:` (None: the default `message`).
    name: Option<String>,
    /// `id:`, when the event set one.
    id: Option<u64>,
    /// `data:` as JSON.
    data: Value,
}

fn open_sse(addr: SocketAddr, path: &str, last_event_id: u64) -> (TcpStream, Vec<u8>) {
    common::open_sse(addr, path, &[("Last-Event-ID", last_event_id.to_string())])
}

/// Reads SSE events until `count` arrived (comments and the `retry:` block
/// carry no data and are skipped).
fn read_events(stream: &mut TcpStream, buffer: &mut Vec<u8>, count: usize) -> Vec<SseEvent> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    let mut events = Vec::new();
    loop {
        while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
            let block = String::from_utf8(buffer[..end].to_vec()).unwrap();
            buffer.drain(..end + 2);
            let mut event = SseEvent {
                name: None,
                id: None,
                data: Value::Null,
            };
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event: ") {
                    event.name = Some(v.to_string());
                } else if let Some(v) = line.strip_prefix("id: ") {
                    event.id = Some(v.parse().unwrap());
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data.push_str(v);
                }
            }
            if data.is_empty() {
                continue;
            }
            event.data = serde_json::from_str(&data).unwrap();
            events.push(event);
            if events.len() == count {
                return events;
            }
        }
        let read = read_some(stream, buffer, deadline)
            .unwrap_or_else(|e| panic!("only {} SSE events: {e}", events.len()));
        assert!(read > 0, "SSE stream ended after {} events", events.len());
    }
}

fn publish_issues(server: &Server, org: &str, count: usize) -> Vec<u64> {
    let bodies: Vec<String> = (0..count).map(|i| issue(org, &format!("i{i}"))).collect();
    server.publish_ok(&common::array(&bodies))
}

#[test]
fn poll_and_sse_from_a_position_retention_dropped_say_so_first() {
    let server = ServerBuilder::new()
        .org("org_r")
        .arg("--history-messages", 20)
        .start();
    for _ in 0..10 {
        publish_issues(&server, "org_r", 10);
    }
    // Poll: the messages after 10 were dropped (only 81..=100 are kept).
    let page = poll(&server, "org_r", "after=10&limit=5");
    assert_eq!(page["recovered"], false, "{page}");
    assert_eq!(seqs(&page), vec![81, 82, 83, 84, 85]);
    assert_eq!(page["next_after"], 85);
    // The next page lost nothing more.
    let next = poll(&server, "org_r", "after=85&limit=100");
    assert_eq!(next.get("recovered"), None, "{next}");
    assert_eq!(seqs(&next), (86..=100).collect::<Vec<u64>>());
    // A position still retained (the oldest kept is 81: after 80 is whole).
    let whole = poll(&server, "org_r", "after=80&limit=1");
    assert_eq!(whole.get("recovered"), None, "{whole}");
    assert_eq!(seqs(&whole), vec![81]);

    // SSE: the gap is told before the first message, then what is kept.
    let path = format!("/v1/sse?channels=issues&token={}", server.key("org_r"));
    let (mut stream, mut buffer) = open_sse(server.ws_addr, &path, 10);
    let events = read_events(&mut stream, &mut buffer, 21);
    assert_eq!(events[0].name.as_deref(), Some("history_gap"), "{events:?}");
    assert_eq!(events[0].data["type"], "history_gap");
    assert_eq!(events[0].data["recovered"], false);
    assert_eq!(events[0].data["last_event_id"], 10);
    let messages: Vec<u64> = events[1..]
        .iter()
        .map(|e| {
            assert_eq!(e.name, None, "{e:?}");
            assert_eq!(e.id, e.data["seq"].as_u64());
            e.data["seq"].as_u64().unwrap()
        })
        .collect();
    assert_eq!(messages, (81..=100).collect::<Vec<u64>>());
    drop(stream);
    // Resuming from a retained position: no notice, the next message first.
    let (mut stream, mut buffer) = open_sse(server.ws_addr, &path, 95);
    let events = read_events(&mut stream, &mut buffer, 1);
    assert_eq!(events[0].name, None, "{events:?}");
    assert_eq!(events[0].data["seq"], 96);
}

#[test]
fn a_poll_without_after_starts_from_now() {
    let server = Server::start(&["org_n"]);
    publish_issues(&server, "org_n", 50);
    let page = poll(&server, "org_n", "limit=1000");
    assert_eq!(seqs(&page), Vec::<u64>::new(), "{page}");
    assert_eq!(page["next_after"], 50);
    // Nothing was lost: the answer has the shape it always had.
    assert_eq!(
        page.as_object().unwrap().keys().collect::<Vec<_>>(),
        vec!["messages", "next_after", "org_id"]
    );
    // Polling on from there gets what is published next, and only that.
    let later = publish_issues(&server, "org_n", 2);
    let next = poll(&server, "org_n", "after=50");
    assert_eq!(seqs(&next), later);
    assert_eq!(next["next_after"], 52);
    // The history is still there for whoever asks for it.
    let all = poll(&server, "org_n", "after=0&limit=1000");
    assert_eq!(seqs(&all), (1..=52).collect::<Vec<u64>>());
    assert_eq!(all.get("recovered"), None);
}

#[test]
fn after_above_the_latest_seq_is_lost_history_then_live_on_every_transport() {
    let server = ServerBuilder::new().org("org_z").arg("--shards", 2).start();
    publish_issues(&server, "org_z", 5);
    let far = 5 + 1000;

    // WebSocket: recovered false, then every new message (6, 7, 8), none
    // dropped on the way up to 1005.
    let mut client = server.connect("org_z");
    let ack = client.subscribe_after("issues", far);
    assert_eq!(ack["recovered"], false, "{ack}");
    // The latest seq itself is a position like any other.
    let mut exact = server.connect("org_z");
    let exact_ack = exact.subscribe_after("issues", 5);
    assert_eq!(exact_ack["recovered"], true, "{exact_ack}");

    // Poll: recovered false and next_after is the org's current seq.
    let page = poll(&server, "org_z", &format!("after={far}"));
    assert_eq!(page["recovered"], false, "{page}");
    assert_eq!(page["next_after"], 5);
    assert_eq!(seqs(&page), Vec::<u64>::new());

    // SSE: the notice at once (no message is waited for), with the id the
    // stream goes on from.
    let path = format!("/v1/sse?channels=issues&token={}", server.key("org_z"));
    let (mut stream, mut buffer) = open_sse(server.ws_addr, &path, far);
    let notice = read_events(&mut stream, &mut buffer, 1);
    assert_eq!(notice[0].name.as_deref(), Some("history_gap"), "{notice:?}");
    assert_eq!(notice[0].id, Some(5));
    assert_eq!(notice[0].data["last_event_id"], far);

    let new = publish_issues(&server, "org_z", 3);
    assert_eq!(new, vec![6, 7, 8]);
    for expected in &new {
        assert_eq!(client.next_json(STEP_TIMEOUT)["seq"], *expected);
        assert_eq!(exact.next_json(STEP_TIMEOUT)["seq"], *expected);
    }
    let live: Vec<u64> = read_events(&mut stream, &mut buffer, 3)
        .iter()
        .map(|e| e.data["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(live, new);
    let next = poll(&server, "org_z", "after=5");
    assert_eq!(seqs(&next), new);
    assert_eq!(next.get("recovered"), None);
}
