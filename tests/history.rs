//! Message history over real sockets (PROTOCOL.md §2 `after`, §3, §4):
//! replay without gap or duplicate while publishing continues, polling
//! pagination and long-poll, the resource lists, SSE resume, retention and
//! `recovered:false`, corrupted segments, restarts with another shard
//! count, and a `kill -9` in the middle of publishing.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    create_key, event, http_request, issue, sync, Client, HttpResponse, Received, ServerBuilder,
    TestDir, STEP_TIMEOUT,
};
use serde_json::Value;

// ---------------------------------------------------------------------------
// A server that can be restarted (and killed) over the same data directory.
// ---------------------------------------------------------------------------

/// A `hookstream serve` over a data directory that outlives it.
struct Node {
    child: Child,
    ws: SocketAddr,
    admin: SocketAddr,
    token: String,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Node {
    fn start(dir: &Path, args: &[&str]) -> Node {
        let all: Vec<String> = ["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]
            .iter()
            .chain(args)
            .map(|a| a.to_string())
            .collect();
        let spawned = common::spawn_serve(dir, &all, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("server did not start: {e:?}"));
        let token = std::fs::read_to_string(dir.join("admin-token"))
            .unwrap()
            .trim()
            .to_string();
        Node {
            child: spawned.child,
            ws: spawned.ws_addr,
            admin: spawned.admin_addr,
            token,
            stderr: spawned.stderr,
        }
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    fn publish(&self, body: &str) -> HttpResponse {
        http_request(
            self.admin,
            "POST",
            "/v1/publish",
            &[("Authorization", format!("Bearer {}", self.token))],
            body.as_bytes(),
        )
    }

    fn publish_ok(&self, body: &str) -> Vec<u64> {
        let response = self.publish(body);
        assert_eq!(response.status, 202, "{}", response.text());
        seqs_of(&response)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn seqs_of(response: &HttpResponse) -> Vec<u64> {
    response.json()["seqs"]
        .as_array()
        .expect("seqs")
        .iter()
        .map(|s| s.as_u64().unwrap())
        .collect()
}

fn get(addr: SocketAddr, path: &str) -> HttpResponse {
    http_request(addr, "GET", path, &[], b"")
}

fn get_json(addr: SocketAddr, path: &str) -> Value {
    let response = get(addr, path);
    assert_eq!(response.status, 200, "GET {path}: {}", response.text());
    response.json()
}

/// Every retained message of `channels` above `after`, by paging `/v1/poll`
/// with `limit`; asserts pages are oldest first and never repeat.
fn poll_all(addr: SocketAddr, key: &str, channels: &str, after: u64, limit: usize) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    let mut after = after;
    loop {
        let page = get_json(
            addr,
            &format!("/v1/poll?channels={channels}&after={after}&limit={limit}&token={key}"),
        );
        let messages = page["messages"].as_array().unwrap().clone();
        assert!(messages.len() <= limit.max(2), "{page}");
        let next = page["next_after"].as_u64().unwrap();
        if messages.is_empty() {
            assert!(next >= after);
            return out;
        }
        for m in &messages {
            assert!(
                m["seq"].as_u64().unwrap() > after,
                "{m} repeated (after {after})"
            );
        }
        // Past the last message returned; beyond it only when nothing
        // else matched up to there.
        assert!(next >= messages.last().unwrap()["seq"].as_u64().unwrap());
        after = next;
        out.extend(messages);
    }
}

fn seqs(messages: &[Value]) -> Vec<u64> {
    messages
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect()
}

/// A tiny deterministic generator for the interleavings.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// What a message published by the tests goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    EventS1,
    EventS2,
    Issue,
}

impl Sent {
    fn body(self, org: &str, id: &str) -> String {
        match self {
            Sent::EventS1 => event(org, id, "s1"),
            Sent::EventS2 => event(org, id, "s2"),
            Sent::Issue => issue(org, id),
        }
    }

    fn goes_to(self, channel: &str) -> bool {
        matches!(
            (self, channel),
            (Sent::EventS1 | Sent::EventS2, "events")
                | (Sent::EventS1, "events:s1")
                | (Sent::Issue, "issues")
        )
    }
}

fn kind_for(n: u64) -> Sent {
    match n % 3 {
        0 => Sent::EventS1,
        1 => Sent::EventS2,
        _ => Sent::Issue,
    }
}

// ---------------------------------------------------------------------------
// Replay
// ---------------------------------------------------------------------------

#[test]
fn replay_during_concurrent_publishing_has_no_gap_or_duplicate() {
    let server = ServerBuilder::new().org("org_r").arg("--shards", 2).start();
    let addr = server.ws_addr;
    let key = server.key("org_r").to_string();
    let sent: Arc<Mutex<BTreeMap<u64, Sent>>> = Arc::default();
    // More than the in-memory tail (512) and the replay chunk (512), so
    // replays start on disk and cross into memory.
    let mut n = 0u64;
    for _ in 0..15 {
        let batch: Vec<Sent> = (0..100).map(|i| kind_for(n + i)).collect();
        let body = common::array(
            &batch
                .iter()
                .enumerate()
                .map(|(i, k)| k.body("org_r", &format!("m{}", n + i as u64)))
                .collect::<Vec<_>>(),
        );
        n += 100;
        let seqs = server.publish_ok(&body);
        let mut map = sent.lock().unwrap();
        for (seq, kind) in seqs.into_iter().zip(batch) {
            map.insert(seq, kind);
        }
    }
    let server = Arc::new(server);
    let channels = ["events", "events:s1", "issues"];
    for round in 0..4u64 {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((round + 1) * 0x1234_5678));
        let done = Arc::new(AtomicBool::new(false));
        let publisher = {
            let server = server.clone();
            let sent = sent.clone();
            let done = done.clone();
            let pause_us = [0u64, 200, 1000, 3000][round as usize];
            let mut rng = Rng(round * 77 + 5);
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !done.load(Ordering::Relaxed) || i < 40 {
                    let count = 1 + rng.below(4);
                    let batch: Vec<Sent> = (0..count).map(|j| kind_for(rng.next() + j)).collect();
                    let body = common::array(
                        &batch
                            .iter()
                            .enumerate()
                            .map(|(j, k)| k.body("org_r", &format!("r{round}_{i}_{j}")))
                            .collect::<Vec<_>>(),
                    );
                    let seqs = server.publish_ok(&body);
                    let mut map = sent.lock().unwrap();
                    for (seq, kind) in seqs.into_iter().zip(batch) {
                        map.insert(seq, kind);
                    }
                    drop(map);
                    i += 1;
                    if pause_us > 0 {
                        std::thread::sleep(Duration::from_micros(pause_us));
                    }
                }
            })
        };
        // Subscribers join at different moments with different `after`s.
        let mut subscribers = Vec::new();
        for s in 0..4u64 {
            std::thread::sleep(Duration::from_millis(rng.below(40)));
            let latest = *sent.lock().unwrap().keys().last().unwrap();
            let after = match s {
                0 => 0,
                1 => latest,
                _ => rng.below(latest + 1),
            };
            let channel = channels[rng.below(3) as usize];
            let key = key.clone();
            let sentinel = format!("end{round}");
            subscribers.push((
                channel,
                after,
                std::thread::spawn(move || {
                    let mut client = Client::connect(addr, &format!("/v1/ws?token={key}"));
                    let ack = client.subscribe_after(channel, after);
                    assert_eq!(ack["recovered"], true, "{ack}");
                    let mut got = Vec::new();
                    let deadline = Instant::now() + Duration::from_secs(15);
                    loop {
                        let left = deadline.saturating_duration_since(Instant::now());
                        match client.recv(left) {
                            Received::Json { value, .. } => {
                                assert_eq!(value["channel"], channel, "{value}");
                                got.push(value["seq"].as_u64().unwrap());
                                if value["data"]["id"] == sentinel.as_str() {
                                    return got;
                                }
                            }
                            other => panic!(
                                "{channel} after {after}: {other:?} after {} messages",
                                got.len()
                            ),
                        }
                    }
                }),
            ));
        }
        std::thread::sleep(Duration::from_millis(50 + rng.below(100)));
        done.store(true, Ordering::Relaxed);
        publisher.join().unwrap();
        // A sentinel that reaches every channel of the test.
        let sentinel = format!("end{round}");
        let seqs = server.publish_ok(&common::array(&[
            event("org_r", &sentinel, "s1"),
            issue("org_r", &sentinel),
        ]));
        {
            let mut map = sent.lock().unwrap();
            map.insert(seqs[0], Sent::EventS1);
            map.insert(seqs[1], Sent::Issue);
        }
        for (channel, after, handle) in subscribers {
            let got = handle.join().unwrap();
            let sentinel_seq = if channel == "issues" {
                seqs[1]
            } else {
                seqs[0]
            };
            let expected: Vec<u64> = sent
                .lock()
                .unwrap()
                .iter()
                .filter(|(seq, kind)| {
                    **seq > after && **seq <= sentinel_seq && kind.goes_to(channel)
                })
                .map(|(seq, _)| *seq)
                .collect();
            assert_eq!(
                got.len(),
                expected.len(),
                "round {round}: {channel} after {after}: count differs"
            );
            assert_eq!(got, expected, "round {round}: {channel} after {after}");
        }
    }
}

#[test]
fn subscribe_twice_and_unsubscribe_during_replay_are_harmless() {
    let server = ServerBuilder::new().org("org_t").start();
    let bodies: Vec<String> = (0..1500)
        .map(|i| issue("org_t", &format!("i{i}")))
        .collect();
    for chunk in bodies.chunks(500) {
        server.publish_ok(&common::array(chunk));
    }
    let mut client = server.connect("org_t");
    client.subscribe_after("issues", 0);
    client.unsubscribe_soon();
    // Whatever arrived, the connection works and a new subscription with
    // `after` replays exactly once from the given point.
    client.ping_until_pong();
    let ack = client.subscribe_after("issues", 1490);
    assert_eq!(ack["recovered"], true);
    // A second subscribe with `after`, during the replay or after it, is
    // acknowledged after a prefix of the first replay and followed by
    // everything above its own `after`, once (tests/contract_ws.rs covers
    // the cases in detail).
    client.send_text(r#"{"type":"subscribe","channel":"issues","after":1490}"#);
    let mut before = Vec::new();
    loop {
        let m = client.next_json(STEP_TIMEOUT);
        if m["type"] == "subscribed" {
            assert_eq!(m["recovered"], true, "{m}");
            break;
        }
        before.push(m["seq"].as_u64().unwrap());
    }
    assert_eq!(
        before,
        (1491..1491 + before.len() as u64).collect::<Vec<u64>>()
    );
    let got: Vec<u64> = (0..10)
        .map(|_| client.next_json(STEP_TIMEOUT)["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(got, (1491..=1500).collect::<Vec<u64>>());
    server.publish_ok(&issue("org_t", "live"));
    let live = client.next_json(STEP_TIMEOUT);
    assert_eq!(live["seq"], 1501);
    client.ping_pong();
}

trait ClientExt {
    fn unsubscribe_soon(&mut self);
    fn ping_until_pong(&mut self);
}

impl ClientExt for Client {
    fn unsubscribe_soon(&mut self) {
        self.send_text(r#"{"type":"unsubscribe","channel":"issues"}"#);
    }

    /// Sends a ping and skips replayed messages and the `unsubscribed`
    /// reply until the pong.
    fn ping_until_pong(&mut self) {
        self.send_text(r#"{"type":"ping"}"#);
        loop {
            let m = self.next_json(STEP_TIMEOUT);
            if m["type"] == "pong" {
                return;
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Polling and lists
// ---------------------------------------------------------------------------

#[test]
fn poll_pagination_returns_each_message_exactly_once() {
    let server = ServerBuilder::new().org("org_p").arg("--shards", 2).start();
    let key = server.key("org_p").to_string();
    let addr = server.ws_addr;
    let mut expected: Vec<(u64, &str)> = Vec::new();
    let mut bodies = Vec::new();
    for i in 0..240u64 {
        bodies.push(match i % 4 {
            0 => event("org_p", &format!("e{i}"), "s1"),
            1 => event("org_p", &format!("e{i}"), "s2"),
            2 => issue("org_p", &format!("i{i}")),
            _ => sync("org_p", "col_1", &format!("c{i}")),
        });
    }
    let published = server.publish_ok(&common::array(&bodies));
    for (i, seq) in published.iter().enumerate() {
        match i % 4 {
            0 => {
                expected.push((*seq, "events"));
                expected.push((*seq, "events:s1"));
            }
            1 => expected.push((*seq, "events")),
            2 => expected.push((*seq, "issues")),
            _ => {}
        }
    }
    for limit in [1usize, 7, 100, 1000] {
        let all = poll_all(addr, &key, "events,events:s1,issues", 0, limit);
        let got: Vec<(u64, String)> = all
            .iter()
            .map(|m| {
                (
                    m["seq"].as_u64().unwrap(),
                    m["channel"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let want: Vec<(u64, String)> = expected.iter().map(|(s, c)| (*s, c.to_string())).collect();
        assert_eq!(got, want, "limit {limit}");
        for m in &all {
            assert!(m["type"] == "event" || m["type"] == "issue", "{m}");
        }
    }
    // From the middle.
    let tail = poll_all(addr, &key, "issues", 200, 5);
    assert!(seqs(&tail).iter().all(|s| *s > 200));
    // Errors.
    assert_eq!(get(addr, "/v1/poll?channels=events").status, 401);
    assert_eq!(
        get(addr, &format!("/v1/poll?channels=evnts&token={key}")).status,
        400
    );
    assert_eq!(get(addr, &format!("/v1/poll?token={key}")).status, 400);
    assert_eq!(
        get(
            addr,
            &format!("/v1/poll?channels=events&limit=x&token={key}")
        )
        .status,
        400
    );
    let big = get_json(
        addr,
        &format!("/v1/poll?channels=events&after=0&limit=5000&token={key}"),
    );
    assert_eq!(big["messages"].as_array().unwrap().len(), 120);
    assert_eq!(big["org_id"], "org_p");
}

#[test]
fn long_poll_waits_for_the_next_message() {
    let server = ServerBuilder::new().org("org_l").start();
    let key = server.key("org_l").to_string();
    let addr = server.ws_addr;
    server.publish_ok(&issue("org_l", "first"));
    // Nothing new: returns after about wait_ms with next_after unchanged.
    let started = Instant::now();
    let empty = get_json(
        addr,
        &format!("/v1/poll?channels=issues&after=1&wait_ms=300&token={key}"),
    );
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(280), "{waited:?}");
    assert_eq!(empty["messages"], serde_json::json!([]));
    assert_eq!(empty["next_after"], 1);
    // A message during the wait ends it early.
    let server = Arc::new(server);
    let publisher = {
        let server = server.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            server.publish_ok(&event("org_l", "other", "s9"));
            std::thread::sleep(Duration::from_millis(100));
            server.publish_ok(&issue("org_l", "second"))
        })
    };
    let started = Instant::now();
    let page = get_json(
        addr,
        &format!("/v1/poll?channels=issues&after=1&wait_ms=5000&token={key}"),
    );
    let waited = started.elapsed();
    let seqs_published = publisher.join().unwrap();
    assert!(waited < Duration::from_millis(3000), "{waited:?}");
    assert_eq!(page["messages"][0]["seq"], seqs_published[0]);
    assert_eq!(page["messages"][0]["data"]["id"], "second");
}

#[test]
fn resource_lists_are_newest_first_with_before_and_filters() {
    let server = ServerBuilder::new().org("org_d").start();
    let key = server.key("org_d").to_string();
    let addr = server.ws_addr;
    let mut bodies = Vec::new();
    for i in 0..25 {
        bodies.push(event(
            "org_d",
            &format!("e{i}"),
            if i % 2 == 0 { "a" } else { "b" },
        ));
        bodies.push(common::delivery("org_d", &format!("d{i}"), "dst_1"));
        bodies.push(sync("org_d", "col_9", &format!("c{i}")));
    }
    server.publish_ok(&common::array(&bodies));
    // Page through events, 10 at a time.
    let mut ids = Vec::new();
    let mut before = String::new();
    loop {
        let page = get_json(addr, &format!("/v1/events?limit=10{before}&token={key}"));
        for item in page["data"].as_array().unwrap() {
            ids.push(item["id"].as_str().unwrap().to_string());
        }
        if page["has_more"] == false {
            break;
        }
        before = format!("&before={}", page["next_before"]);
    }
    let want: Vec<String> = (0..25).rev().map(|i| format!("e{i}")).collect();
    assert_eq!(ids, want);
    let filtered = get_json(
        addr,
        &format!("/v1/events?source_id=b&limit=100&token={key}"),
    );
    let filtered: Vec<&str> = filtered["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(filtered.len(), 12);
    assert_eq!(filtered[0], "e23");
    let deliveries = get_json(
        addr,
        &format!("/v1/deliveries?destination_id=dst_1&limit=3&token={key}"),
    );
    assert_eq!(deliveries["data"][0]["id"], "d24");
    assert_eq!(deliveries["has_more"], true);
    let none = get_json(
        addr,
        &format!("/v1/deliveries?destination_id=zzz&token={key}"),
    );
    assert_eq!(none, serde_json::json!({"data":[],"has_more":false}));
    let synced = get_json(
        addr,
        &format!("/v1/collections/col_9/sync?limit=2&token={key}"),
    );
    assert_eq!(synced["data"][0]["id"], "c24");
    assert_eq!(synced["data"][1]["id"], "c23");
    let issues = get_json(addr, &format!("/v1/issues?token={key}"));
    assert_eq!(issues, serde_json::json!({"data":[],"has_more":false}));
    assert_eq!(get(addr, "/v1/issues").status, 401);
    assert_eq!(
        http_request(addr, "POST", &format!("/v1/events?token={key}"), &[], b"").status,
        405
    );
}

/// A read with few matches looks at the org's whole index in steps (4,096
/// entries, the shard's other work running in between): every match is
/// found on either side of each step's edge, forward (`/v1/poll`) and
/// backward (the resource lists), with 201 channels named at once.
#[test]
fn reads_that_look_at_10000_messages_for_a_few_find_every_one() {
    let server = ServerBuilder::new().org("org_r").start();
    let key = server.key("org_r").to_string();
    let addr = server.ws_addr;
    let rare: Vec<u64> = vec![1, 4095, 4096, 4097, 8192, 8193, 10_000];
    for batch in 0..10u64 {
        let bodies: Vec<String> = (1..=1000)
            .map(|i| batch * 1000 + i)
            .map(|seq| {
                if rare.contains(&seq) {
                    event("org_r", &format!("e{seq}"), "rare")
                } else {
                    issue("org_r", &format!("i{seq}"))
                }
            })
            .collect();
        server.publish_ok(&common::array(&bodies));
    }
    let mut channels: Vec<String> = (0..200).map(|i| format!("events:n{i}")).collect();
    channels.push("events:rare".to_string());
    let channels = channels.join(",");
    assert_eq!(seqs(&poll_all(addr, &key, &channels, 0, 100)), rare);
    assert_eq!(seqs(&poll_all(addr, &key, &channels, 4096, 2)), rare[3..]);
    let ids = |path: &str| -> Vec<String> {
        let page = get_json(addr, &format!("{path}&token={key}"));
        page["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["id"].as_str().unwrap().to_string())
            .collect()
    };
    let newest_first: Vec<String> = rare.iter().rev().map(|s| format!("e{s}")).collect();
    assert_eq!(ids("/v1/events?source_id=rare&limit=100"), newest_first);
    assert_eq!(
        ids("/v1/events?source_id=rare&limit=100&before=8193"),
        newest_first[2..]
    );
    let page = get_json(
        addr,
        &format!("/v1/events?source_id=rare&limit=3&before=8193&token={key}"),
    );
    assert_eq!(page["has_more"], true, "{page}");
    assert_eq!(page["next_before"], 4096, "{page}");
}

// ---------------------------------------------------------------------------
// Server-Sent Events
// ---------------------------------------------------------------------------

/// Reads SSE events until `count` arrived; returns each one's seq (from
/// its data) and data. An `id:`, when present, must be the seq.
fn read_sse(stream: &mut TcpStream, buffer: &mut Vec<u8>, count: usize) -> Vec<(u64, Value)> {
    read_sse_events(stream, buffer, count)
        .into_iter()
        .map(|(_, data)| (data["seq"].as_u64().unwrap(), data))
        .collect()
}

/// Reads SSE events (an optional `id`, `data`) until `count` arrived.
fn read_sse_events(
    stream: &mut TcpStream,
    buffer: &mut Vec<u8>,
    count: usize,
) -> Vec<(Option<u64>, Value)> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    let mut events = Vec::new();
    loop {
        while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
            let block = String::from_utf8(buffer[..end].to_vec()).unwrap();
            buffer.drain(..end + 2);
            let mut id = None;
            let mut data = None;
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id: ") {
                    id = Some(v.parse::<u64>().unwrap());
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data = Some(serde_json::from_str::<Value>(v).unwrap());
                }
            }
            if let Some(data) = data {
                if let Some(id) = id {
                    assert_eq!(data["seq"], id);
                }
                events.push((id, data));
                if events.len() == count {
                    return events;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "only {} SSE events",
            events.len()
        );
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk) {
            Ok(0) => panic!("SSE stream ended"),
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("{e}"),
        }
    }
}

fn open_sse(addr: SocketAddr, path: &str, last_event_id: Option<u64>) -> (TcpStream, Vec<u8>) {
    let mut headers = vec![("Accept", "text/event-stream".to_string())];
    if let Some(id) = last_event_id {
        headers.push(("Last-Event-ID", id.to_string()));
    }
    common::open_sse(addr, path, &headers)
}

#[test]
fn sse_resumes_from_last_event_id() {
    let server = ServerBuilder::new().org("org_s").arg("--shards", 2).start();
    let key = server.key("org_s").to_string();
    let addr = server.ws_addr;
    let bodies: Vec<String> = (0..5).map(|i| issue("org_s", &format!("i{i}"))).collect();
    server.publish_ok(&common::array(&bodies));
    let path = format!("/v1/sse?channels=issues,events&token={key}");
    let (mut stream, mut buffer) = open_sse(addr, &path, Some(2));
    let events = read_sse(&mut stream, &mut buffer, 3);
    assert_eq!(
        events.iter().map(|e| e.0).collect::<Vec<_>>(),
        vec![3, 4, 5]
    );
    assert_eq!(events[0].1["data"]["id"], "i2");
    server.publish_ok(&event("org_s", "e5", "s1"));
    let live = read_sse(&mut stream, &mut buffer, 1);
    assert_eq!(live[0].0, 6);
    assert_eq!(live[0].1["channel"], "events");
    drop(stream);
    // Reconnecting with the last id seen continues exactly there.
    server.publish_ok(&issue("org_s", "i6"));
    let (mut stream, mut buffer) = open_sse(addr, &path, Some(6));
    let resumed = read_sse(&mut stream, &mut buffer, 1);
    assert_eq!(resumed[0].0, 7);
    // Without Last-Event-ID only new messages come.
    let (mut stream, mut buffer) = open_sse(addr, &path, None);
    std::thread::sleep(Duration::from_millis(100));
    server.publish_ok(&issue("org_s", "i7"));
    let fresh = read_sse(&mut stream, &mut buffer, 1);
    assert_eq!(fresh[0].0, 8);
    assert_eq!(get(addr, "/v1/sse?channels=issues").status, 401);
}

/// A message matching two listed channels is two events with one seq: only
/// the last carries `id:`, so a connection lost between them resumes (like
/// a browser, from the last id it saw) before that seq and gets both again
/// instead of losing the second.
/// (id, seq, channel) of each SSE event.
fn sse_shape(events: &[(Option<u64>, Value)]) -> Vec<(Option<u64>, u64, &str)> {
    events
        .iter()
        .map(|(id, data)| {
            (
                *id,
                data["seq"].as_u64().unwrap(),
                data["channel"].as_str().unwrap(),
            )
        })
        .collect()
}

#[test]
fn sse_resume_between_two_events_of_one_seq_loses_nothing() {
    let server = ServerBuilder::new().org("org_m").arg("--shards", 2).start();
    let key = server.key("org_m").to_string();
    let addr = server.ws_addr;
    // Each event of source s1 matches both `events` and `events:s1`.
    let bodies: Vec<String> = (0..2)
        .map(|i| event("org_m", &format!("e{i}"), "s1"))
        .collect();
    assert_eq!(server.publish_ok(&common::array(&bodies)), vec![1, 2]);
    let path = format!("/v1/sse?channels=events,events:s1&token={key}");
    let (mut stream, mut buffer) = open_sse(addr, &path, Some(0));
    let events = read_sse_events(&mut stream, &mut buffer, 4);
    let shape = sse_shape(&events);
    assert_eq!(
        shape,
        vec![
            (None, 1, "events"),
            (Some(1), 1, "events:s1"),
            (None, 2, "events"),
            (Some(2), 2, "events:s1"),
        ]
    );
    // The connection drops after the first event of seq 2: a browser's
    // last event id is then the last `id:` it processed before it.
    drop(stream);
    let last_event_id = events[..3].iter().rev().find_map(|(id, _)| *id);
    assert_eq!(last_event_id, Some(1));
    let (mut stream, mut buffer) = open_sse(addr, &path, last_event_id);
    // Something after seq 2, so a stream that lost seq 2 fails the
    // comparison instead of waiting.
    assert_eq!(server.publish_ok(&issue("org_m", "i3")), vec![3]);
    assert_eq!(server.publish_ok(&event("org_m", "e4", "s2")), vec![4]);
    let resumed = read_sse_events(&mut stream, &mut buffer, 3);
    let shape = sse_shape(&resumed);
    assert_eq!(
        shape,
        vec![
            (None, 2, "events"),
            (Some(2), 2, "events:s1"),
            (Some(4), 4, "events"),
        ]
    );
    assert_eq!(resumed[1].1["data"]["id"], "e1");
}

// ---------------------------------------------------------------------------
// Retention
// ---------------------------------------------------------------------------

fn segment_files(data_dir: &Path, org: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(data_dir.join("history").join(org))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    files
}

#[test]
fn retention_drops_whole_segments_and_reports_not_recovered() {
    let server = ServerBuilder::new()
        .org("org_k")
        .arg("--history-messages", 20)
        .start();
    let key = server.key("org_k").to_string();
    let addr = server.ws_addr;
    for i in 0..100 {
        server.publish_ok(&issue("org_k", &format!("i{i}")));
    }
    // Segments of 2 records (a tenth of 20): the oldest whole files went.
    let files = segment_files(server.data_dir(), "org_k");
    assert!(files.len() <= 12, "{files:?}");
    let first = files[0].file_name().unwrap().to_string_lossy().to_string();
    assert!(first.starts_with("000000000000000000"), "{first}");
    assert!(
        first.trim_end_matches(".log").parse::<u64>().unwrap() >= 79,
        "{first}"
    );
    // Exactly the last 20 are served.
    let all = poll_all(addr, &key, "issues", 0, 100);
    assert_eq!(seqs(&all), (81..=100).collect::<Vec<u64>>());
    // `after` older than what is kept: recovered false, and what exists.
    let mut client = server.connect("org_k");
    let ack = client.subscribe_after("issues", 10);
    assert_eq!(ack["recovered"], false, "{ack}");
    let replayed: Vec<u64> = (0..20)
        .map(|_| client.next_json(STEP_TIMEOUT)["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(replayed, (81..=100).collect::<Vec<u64>>());
    let mut client = server.connect("org_k");
    let ack = client.subscribe_after("issues", 95);
    assert_eq!(ack["recovered"], true, "{ack}");
    assert_eq!(client.next_json(STEP_TIMEOUT)["seq"], 96);
}

#[test]
fn retention_by_age_expires_messages_and_keeps_the_seq() {
    let dir = TestDir::new();
    let key = create_key(dir.path(), "org_g");
    let mut node = Node::start(dir.path(), &["--history-age", "2s"]);
    node.publish_ok(&issue("org_g", "old"));
    std::thread::sleep(Duration::from_millis(3200));
    let page = get_json(
        node.ws,
        &format!("/v1/poll?channels=issues&after=0&token={key}"),
    );
    assert_eq!(page["messages"], serde_json::json!([]));
    assert_eq!(page["recovered"], false, "{page}");
    let mut client = Client::connect(node.ws, &format!("/v1/ws?token={key}"));
    assert_eq!(client.welcome["seq"], 1);
    let ack = client.subscribe_after("issues", 0);
    assert_eq!(ack["recovered"], false, "{ack}");
    drop(client);
    node.kill9();
    // The seq survives a restart even though every message expired.
    let node = Node::start(dir.path(), &["--history-age", "2s"]);
    assert_eq!(node.publish_ok(&issue("org_g", "new")), vec![2]);
}

// ---------------------------------------------------------------------------
// Corruption, restarts, crashes
// ---------------------------------------------------------------------------

#[test]
fn flipped_byte_and_torn_tail_are_dropped_with_a_warning() {
    let dir = TestDir::new();
    let key = create_key(dir.path(), "org_c");
    let args = ["--history-messages", "50", "--shards", "1"];
    let mut node = Node::start(dir.path(), &args);
    for i in 0..6 {
        let bodies: Vec<String> = (0..5)
            .map(|j| issue("org_c", &format!("i{}", i * 5 + j)))
            .collect();
        node.publish_ok(&common::array(&bodies));
    }
    node.kill9();
    // Segments of 5 records: seqs 1-5, 6-10, … 26-30.
    let files = segment_files(dir.path(), "org_c");
    assert_eq!(files.len(), 6, "{files:?}");
    // Flip one byte inside the third record (seq 8) of the second segment.
    let mut bytes = std::fs::read(&files[1]).unwrap();
    let record_len = bytes.len() / 5;
    bytes[2 * record_len + record_len / 2] ^= 0x01;
    std::fs::write(&files[1], &bytes).unwrap();
    // Tear the last record of the last segment.
    let last = std::fs::read(&files[5]).unwrap();
    std::fs::write(&files[5], &last[..last.len() - 7]).unwrap();

    let node = Node::start(dir.path(), &args);
    let all = poll_all(node.ws, &key, "issues", 0, 100);
    let want: Vec<u64> = (1..=7).chain(11..=29).collect();
    assert_eq!(seqs(&all), want);
    assert_eq!(all[6]["data"]["id"], "i6");
    let stderr = node.stderr();
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.contains("warning")).collect();
    assert_eq!(warnings.len(), 2, "{stderr}");
    assert!(warnings.iter().any(|w| w.contains("checksum")), "{stderr}");
    assert!(warnings.iter().any(|w| w.contains("truncated")), "{stderr}");
    // The segment files were cut at the bad record.
    assert_eq!(
        std::fs::metadata(&files[1]).unwrap().len() as usize,
        2 * record_len
    );
    // Publishing continues after the last intact record.
    assert_eq!(node.publish_ok(&issue("org_c", "next")), vec![30]);
}

#[test]
fn restart_with_other_shard_counts_serves_everything_and_continues_seq() {
    let dir = TestDir::new();
    let orgs: Vec<String> = (0..6).map(|i| format!("org_{i}")).collect();
    let keys: HashMap<String, String> = orgs
        .iter()
        .map(|o| (o.clone(), create_key(dir.path(), o)))
        .collect();
    let publish_round = |node: &Node, round: usize, count: usize| {
        for org in &orgs {
            let bodies: Vec<String> = (0..count)
                .map(|i| event(org, &format!("{org}_{round}_{i}"), "s1"))
                .collect();
            node.publish_ok(&common::array(&bodies));
        }
    };
    let check = |node: &Node, total: u64| {
        for org in &orgs {
            let all = poll_all(node.ws, &keys[org], "events", 0, 1000);
            assert_eq!(seqs(&all), (1..=total).collect::<Vec<u64>>(), "{org}");
        }
    };
    let mut node = Node::start(dir.path(), &["--shards", "1"]);
    publish_round(&node, 0, 10);
    check(&node, 10);
    node.kill9();
    let mut node = Node::start(dir.path(), &["--shards", "2"]);
    check(&node, 10);
    publish_round(&node, 1, 5);
    check(&node, 15);
    let client = Client::connect(node.ws, &format!("/v1/ws?token={}", keys["org_3"]));
    assert_eq!(client.welcome["seq"], 15);
    drop(client);
    node.kill9();
    let node = Node::start(dir.path(), &["--shards", "1"]);
    check(&node, 15);
    for org in &orgs {
        assert_eq!(
            node.publish_ok(&event(org, "last", "s1")),
            vec![16],
            "{org}"
        );
    }
}

#[test]
fn kill_9_while_publishing_loses_no_acknowledged_message() {
    crash_while_publishing("fsync");
}

/// `--durability none` answers after the write without fsync: a crash of
/// the process (not of the machine) still loses nothing answered.
#[test]
fn kill_9_with_durability_none_loses_no_acknowledged_message() {
    crash_while_publishing("none");
}

fn crash_while_publishing(durability: &str) {
    let dir = TestDir::new();
    let orgs = ["org_x", "org_y"];
    let keys: HashMap<&str, String> = orgs
        .iter()
        .map(|o| (*o, create_key(dir.path(), o)))
        .collect();
    let mut node = Node::start(dir.path(), &["--shards", "2", "--durability", durability]);
    let admin = node.admin;
    let token = node.token.clone();
    // (org, seq) → data id of every answered publish.
    let acked: Arc<Mutex<HashMap<(String, u64), String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let counter = Arc::new(AtomicU64::new(0));
    let mut publishers = Vec::new();
    for p in 0..4usize {
        let acked = acked.clone();
        let stop = stop.clone();
        let token = token.clone();
        let counter = counter.clone();
        publishers.push(std::thread::spawn(move || {
            let mut rng = Rng(p as u64 * 31 + 7);
            while !stop.load(Ordering::Relaxed) {
                let org = orgs[rng.below(2) as usize];
                let count = 1 + rng.below(3) as usize;
                let ids: Vec<String> = (0..count)
                    .map(|_| format!("p{p}_{}", counter.fetch_add(1, Ordering::Relaxed)))
                    .collect();
                let body = common::array(&ids.iter().map(|id| issue(org, id)).collect::<Vec<_>>());
                // The server may die mid-request: only 202 answers count.
                let Ok(mut stream) = TcpStream::connect(admin) else { return };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let request = format!(
                    "POST /v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                if stream.write_all(request.as_bytes()).is_err() {
                    return;
                }
                let mut answer = Vec::new();
                if stream.read_to_end(&mut answer).is_err() {
                    return;
                }
                let text = String::from_utf8_lossy(&answer);
                if !text.starts_with("HTTP/1.1 202") {
                    return;
                }
                let json: Value = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap();
                let mut acked = acked.lock().unwrap();
                for (seq, id) in json["seqs"].as_array().unwrap().iter().zip(&ids) {
                    acked.insert((org.to_string(), seq.as_u64().unwrap()), id.clone());
                }
            }
        }));
    }
    std::thread::sleep(Duration::from_millis(1500));
    node.kill9();
    stop.store(true, Ordering::Relaxed);
    for publisher in publishers {
        publisher.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 50,
        "only {} messages were acknowledged",
        acked.len()
    );
    let node = Node::start(dir.path(), &["--shards", "2", "--durability", durability]);
    for org in orgs {
        let all = poll_all(node.ws, &keys[org], "issues", 0, 1000);
        let stored: HashMap<u64, String> = all
            .iter()
            .map(|m| {
                (
                    m["seq"].as_u64().unwrap(),
                    m["data"]["id"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let mut highest = 0;
        for ((acked_org, seq), id) in &acked {
            if acked_org != org {
                continue;
            }
            highest = highest.max(*seq);
            assert_eq!(
                stored.get(seq),
                Some(id),
                "{org} seq {seq} was answered 202"
            );
        }
        let next = node.publish_ok(&issue(org, "after-crash"));
        assert!(
            next[0] > highest,
            "{org}: new seq {} not above {highest}",
            next[0]
        );
    }
}

#[test]
fn bad_history_flags_stop_the_server_with_one_line() {
    for (flag, value, needle) in [
        ("--durability", "sometimes", "--durability"),
        ("--history-age", "5 parsecs", "--history-age"),
        ("--history-messages", "0", "--history-messages"),
    ] {
        let dir = TestDir::new();
        let output = Command::new(common::binary())
            .arg("serve")
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args([flag, value])
            .stdin(Stdio::null())
            .output()
            .expect("run hookstream serve");
        assert!(!output.status.success(), "{flag} {value} was accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(needle), "{flag} {value}: {stderr}");
    }
}

#[test]
fn metrics_count_commits_and_fsyncs() {
    let server = ServerBuilder::new().org("org_m").start();
    for i in 0..5 {
        server.publish_ok(&issue("org_m", &format!("i{i}")));
    }
    // Each shard refreshes its metrics every 200 ms (a scrape refreshes
    // only the shard that answers it).
    std::thread::sleep(Duration::from_millis(400));
    assert!(server.metric_sum("hookstream_history_commits_total") >= 5);
    assert!(server.metric_sum("hookstream_history_fsyncs_total") >= 5);
    assert!(server.metric_sum("hookstream_history_bytes_written_total") >= 5 * 40);
}

#[test]
fn an_empty_last_segment_still_carries_the_seq() {
    let dir = TestDir::new();
    let key = create_key(dir.path(), "org_e");
    let mut node = Node::start(dir.path(), &["--shards", "1"]);
    let bodies: Vec<String> = (0..10).map(|i| issue("org_e", &format!("i{i}"))).collect();
    assert_eq!(node.publish_ok(&common::array(&bodies)).last(), Some(&10));
    node.kill9();
    // What a crash right after starting segment 11 leaves once retention
    // removed the older segments: one empty file named after seq 11.
    for file in segment_files(dir.path(), "org_e") {
        std::fs::remove_file(file).unwrap();
    }
    let empty = dir.path().join("history/org_e/00000000000000000011.log");
    std::fs::write(&empty, b"").unwrap();
    let node = Node::start(dir.path(), &["--shards", "1"]);
    let client = Client::connect(node.ws, &format!("/v1/ws?token={key}"));
    assert_eq!(client.welcome["seq"], 10);
    assert_eq!(node.publish_ok(&issue("org_e", "next")), vec![11]);
    let all = poll_all(node.ws, &key, "issues", 0, 100);
    assert_eq!(seqs(&all), vec![11]);
}
