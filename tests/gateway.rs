//! The gateway end to end (issue 3, PROTOCOL.md §1–§3): a real `hookstream
//! serve` process per test, driven over real sockets by tungstenite
//! clients, raw WebSocket bytes and plain HTTP/1.1.
//!
//! "Nothing arrives" is never checked by sleeping: after the message that
//! must not arrive, the test publishes a *barrier* message that must, and
//! asserts that the barrier is the next thing the client reads. Messages to
//! one connection leave in publish order, and a publish is answered only
//! after its frames were handed to the subscribers' sockets, so anything
//! wrongly routed would arrive before the barrier.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    array, delivery, event, http_raw, issue, number_tokens, seq_of, sync, upgrade_request, Client,
    RawClient, Received, Server, ServerBuilder, UpgradeError, STEP_TIMEOUT,
};
use serde_json::{json, Value};
use tungstenite::Message;

/// How long a client waits for a message that must come.
const WAIT: Duration = STEP_TIMEOUT;

/// Publishes a sync on `collections:barrier` and asserts that it is the next
/// message of every client given (all must be subscribed to it).
fn barrier(server: &Server, org: &str, clients: &mut [&mut Client]) {
    let seq = server.publish_ok(&sync(org, "barrier", "b"))[0];
    for client in clients.iter_mut() {
        let message = client.next_json(WAIT);
        assert_eq!(
            (message["channel"].as_str(), message["seq"].as_u64()),
            (Some("collections:barrier"), Some(seq)),
            "expected the barrier, got {message}"
        );
    }
}

/// The `shard` part of a `connection_id` of the form `c_<shard>_<index>_<generation>`.
fn shard_of_connection_id(id: &str) -> u64 {
    let parts: Vec<&str> = id.split('_').collect();
    assert_eq!(parts.len(), 4, "connection_id {id:?}");
    assert_eq!(parts[0], "c", "connection_id {id:?}");
    for part in &parts[1..] {
        part.parse::<u64>()
            .unwrap_or_else(|_| panic!("connection_id {id:?}"));
    }
    parts[1].parse().unwrap()
}

// ---------------------------------------------------------------------------
// Welcome, subscriptions and routing
// ---------------------------------------------------------------------------

#[test]
fn welcome_comes_first_with_org_connection_id_and_seq() {
    let server = Server::start(&["org_a", "org_b"]);
    // Something published before the connection: the welcome's seq is the
    // org's latest seq, so it equals what the publish returned.
    let seqs = server.publish_ok(&array(&[issue("org_a", "i1"), issue("org_a", "i2")]));
    let client = server.connect("org_a");
    let welcome = &client.welcome;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    assert_eq!(welcome["org_id"], "org_a", "{welcome}");
    assert_eq!(welcome["seq"].as_u64(), Some(seqs[1]), "{welcome}");
    assert_eq!(welcome["heartbeat_ms"].as_u64(), Some(30_000), "{welcome}");
    let id = welcome["connection_id"].as_str().expect("connection_id");
    shard_of_connection_id(id);

    let other = server.connect("org_b");
    assert_eq!(other.welcome["type"], "welcome");
    assert_eq!(other.welcome["org_id"], "org_b");
    assert!(other.welcome["seq"].is_u64(), "{}", other.welcome);
    assert_ne!(other.welcome["connection_id"], welcome["connection_id"]);

    // The welcome travels with the 101: a raw client finds it as the first
    // frame right after the answer head.
    let mut raw = RawClient::connect(
        server.ws_addr,
        &format!("/v1/ws?token={}", server.key("org_a")),
    );
    let first = raw.read_frame(WAIT).unwrap().expect("a first frame");
    assert_eq!(first.opcode, 1, "{first:?}");
    assert!(first.fin && !first.masked, "{first:?}");
    let first: Value = serde_json::from_slice(&first.payload).unwrap();
    assert_eq!(first["type"], "welcome");
    assert_eq!(first["org_id"], "org_a");
}

#[test]
fn subscribe_is_acknowledged_and_subscribing_twice_is_harmless() {
    let server = Server::start(&["org_a"]);
    let mut client = server.connect("org_a");
    for channel in [
        "events",
        "events:src_1",
        "deliveries",
        "deliveries:dst_9",
        "issues",
        "collections:col_1",
        "collections:barrier",
    ] {
        client.subscribe(channel);
    }
    // Again: acknowledged again, and messages still arrive once.
    client.subscribe("issues");
    let seq = server.publish_ok(&issue("org_a", "i1"))[0];
    let message = client.next_json(WAIT);
    assert_eq!(message["channel"], "issues");
    assert_eq!(message["seq"].as_u64(), Some(seq));
    barrier(&server, "org_a", &mut [&mut client]);
}

#[test]
fn each_message_type_reaches_exactly_its_channels() {
    let server = Server::start(&["org_a"]);
    let mut all = server.connect("org_a");
    let mut by_id = server.connect("org_a");
    let mut elsewhere = server.connect("org_a");
    for channel in ["events", "deliveries", "issues", "collections:col_1"] {
        all.subscribe(channel);
    }
    for channel in ["events:src_1", "deliveries:dst_9"] {
        by_id.subscribe(channel);
    }
    for channel in ["events:src_2", "deliveries:dst_8", "collections:col_2"] {
        elsewhere.subscribe(channel);
    }
    for client in [&mut all, &mut by_id, &mut elsewhere] {
        client.subscribe("collections:barrier");
    }

    let messages = [
        event("org_a", "evt_1", "src_1"),
        delivery("org_a", "dlv_1", "dst_9"),
        issue("org_a", "iss_1"),
        sync("org_a", "col_1", "row_1"),
    ];
    let seqs = server.publish_ok(&array(&messages));
    assert_eq!(seqs.len(), 4);

    let expected_all = [
        ("event", "events", json!({"id":"evt_1","source_id":"src_1"})),
        (
            "delivery",
            "deliveries",
            json!({"id":"dlv_1","destination_id":"dst_9"}),
        ),
        ("issue", "issues", json!({"id":"iss_1"})),
        ("sync", "collections:col_1", json!({"id":"row_1"})),
    ];
    for ((kind, channel, data), seq) in expected_all.iter().zip(&seqs) {
        let message = all.next_json(WAIT);
        assert_eq!(
            message,
            json!({"type": kind, "channel": channel, "seq": seq, "data": data})
        );
    }
    let expected_by_id = [
        (
            "event",
            "events:src_1",
            json!({"id":"evt_1","source_id":"src_1"}),
            seqs[0],
        ),
        (
            "delivery",
            "deliveries:dst_9",
            json!({"id":"dlv_1","destination_id":"dst_9"}),
            seqs[1],
        ),
    ];
    for (kind, channel, data, seq) in expected_by_id {
        let message = by_id.next_json(WAIT);
        assert_eq!(
            message,
            json!({"type": kind, "channel": channel, "seq": seq, "data": data})
        );
    }
    barrier(
        &server,
        "org_a",
        &mut [&mut all, &mut by_id, &mut elsewhere],
    );
}

#[test]
fn overlapping_channels_deliver_one_event_twice_with_each_channel_name() {
    let server = Server::start(&["org_a"]);
    let mut client = server.connect("org_a");
    client.subscribe("events");
    client.subscribe("events:src_1");
    client.subscribe("collections:barrier");
    let seq = server.publish_ok(&event("org_a", "evt_1", "src_1"))[0];
    let first = client.next_json(WAIT);
    let second = client.next_json(WAIT);
    let channels: BTreeSet<&str> = [&first, &second]
        .iter()
        .map(|m| m["channel"].as_str().unwrap())
        .collect();
    assert_eq!(channels, BTreeSet::from(["events", "events:src_1"]));
    for message in [&first, &second] {
        assert_eq!(message["type"], "event");
        assert_eq!(message["seq"].as_u64(), Some(seq));
        assert_eq!(message["data"], json!({"id":"evt_1","source_id":"src_1"}));
    }
    // An event of another source matches only `events`: once.
    let seq = server.publish_ok(&event("org_a", "evt_2", "src_2"))[0];
    let only = client.next_json(WAIT);
    assert_eq!(only["channel"], "events");
    assert_eq!(only["seq"].as_u64(), Some(seq));
    barrier(&server, "org_a", &mut [&mut client]);
}

#[test]
fn a_source_channel_gets_nothing_of_another_source() {
    let server = Server::start(&["org_a"]);
    let mut client = server.connect("org_a");
    client.subscribe("events:src_2");
    server.publish_ok(&event("org_a", "evt_1", "src_1"));
    server.publish_ok(&array(&[
        event("org_a", "evt_2", "src_1"),
        event("org_a", "evt_3", "src_10"),
        event("org_a", "evt_4", "src_"),
    ]));
    let seq = server.publish_ok(&event("org_a", "evt_5", "src_2"))[0];
    let message = client.next_json(WAIT);
    assert_eq!(message["channel"], "events:src_2", "{message}");
    assert_eq!(message["seq"].as_u64(), Some(seq), "{message}");
    assert_eq!(message["data"]["id"], "evt_5");
}

#[test]
fn orgs_are_isolated() {
    let server = Server::start(&["org_a", "org_b"]);
    let mut a = server.connect("org_a");
    let mut b = server.connect("org_b");
    let channels = [
        "events",
        "events:src_1",
        "deliveries",
        "deliveries:dst_9",
        "issues",
        "collections:col_1",
        "collections:barrier",
    ];
    for channel in channels {
        a.subscribe(channel);
        b.subscribe(channel);
    }
    let seqs = server.publish_ok(&array(&[
        event("org_a", "evt_1", "src_1"),
        delivery("org_a", "dlv_1", "dst_9"),
        issue("org_a", "iss_1"),
        sync("org_a", "col_1", "row_1"),
    ]));
    // org_a sees six frames (the event and the delivery match two channels).
    let mut seen = Vec::new();
    for _ in 0..6 {
        let message = a.next_json(WAIT);
        seen.push(message["seq"].as_u64().unwrap());
    }
    assert_eq!(
        seen,
        vec![seqs[0], seqs[0], seqs[1], seqs[1], seqs[2], seqs[3]]
    );
    // org_b got none of it: its own barrier is the first thing it reads.
    barrier(&server, "org_b", &mut [&mut b]);
    barrier(&server, "org_a", &mut [&mut a]);
}

#[test]
fn unsubscribe_is_acknowledged_and_stops_delivery() {
    let server = Server::start(&["org_a"]);
    let mut client = server.connect("org_a");
    client.subscribe("events");
    client.subscribe("collections:barrier");
    let seq = server.publish_ok(&event("org_a", "evt_1", "src_1"))[0];
    assert_eq!(client.next_json(WAIT)["seq"].as_u64(), Some(seq));
    client.unsubscribe("events");
    server.publish_ok(&event("org_a", "evt_2", "src_1"));
    barrier(&server, "org_a", &mut [&mut client]);
    // Subscribing again works again.
    client.subscribe("events");
    let seq = server.publish_ok(&event("org_a", "evt_3", "src_1"))[0];
    assert_eq!(client.next_json(WAIT)["seq"].as_u64(), Some(seq));
}

#[test]
fn seq_strictly_increases_across_publishes_and_body_forms() {
    let server = Server::start(&["org_a"]);
    let mut client = server.connect("org_a");
    let welcome_seq = client.welcome["seq"].as_u64().unwrap();
    client.subscribe("issues");
    let mut published = Vec::new();
    published.extend(server.publish_ok(&issue("org_a", "i1")));
    published.extend(server.publish_ok(&array(&[
        issue("org_a", "i2"),
        issue("org_a", "i3"),
        issue("org_a", "i4"),
    ])));
    let ndjson = format!("{}\n{}\n", issue("org_a", "i5"), issue("org_a", "i6"));
    let response = server.publish_with(&ndjson, Some(&server.admin_token), "application/x-ndjson");
    assert_eq!(response.status, 202, "{}", response.text());
    assert_eq!(response.json()["accepted"], 2);
    published.extend(
        response.json()["seqs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_u64().unwrap()),
    );
    assert_eq!(published.len(), 6);
    assert!(
        published[0] > welcome_seq,
        "{published:?} vs welcome {welcome_seq}"
    );
    assert!(
        published.windows(2).all(|w| w[0] < w[1]),
        "seqs not strictly increasing: {published:?}"
    );
    for (i, seq) in published.iter().enumerate() {
        let message = client.next_json(WAIT);
        assert_eq!(message["seq"].as_u64(), Some(*seq), "{message}");
        assert_eq!(message["data"]["id"], format!("i{}", i + 1));
    }
    // A later connection's welcome carries the latest seq.
    let later = server.connect("org_a");
    assert_eq!(later.welcome["seq"].as_u64(), published.last().copied());
}

/// The suite runs twice (tools/test): plain, and with every client
/// negotiating permessage-deflate (`HOOKSTREAM_TEST_DEFLATE=1`). This checks
/// each run is what it says: compressed frames both ways exactly when the
/// extension was negotiated, plain frames otherwise.
#[test]
fn fanout_frames_are_compressed_exactly_when_the_run_negotiates_deflate() {
    let server = Server::start(&["org_a"]);
    let mut client = server.connect("org_a");
    client.subscribe("events");
    // Over the default --compression-min-bytes (256).
    let pad = "x".repeat(2000);
    let message = format!(
        r#"{{"org_id":"org_a","type":"event","data":{{"id":"evt_1","source_id":"src_1","pad":"{pad}"}}}}"#
    );
    let seq = server.publish_ok(&message)[0];
    let got = client.next_json(WAIT);
    assert_eq!(got["seq"].as_u64(), Some(seq));
    assert_eq!(got["data"]["pad"], pad.as_str());
    let (received, sent) = client.compressed_counts();
    if common::deflate::enabled() {
        assert_eq!(received, 1, "the fan-out message arrives compressed");
        assert_eq!(sent, 1, "the subscribe was sent compressed and understood");
    } else {
        assert_eq!((received, sent), (0, 0));
    }
}

#[test]
fn data_arrives_with_every_digit_of_every_number() {
    let server = Server::start(&["org_a"]);
    let mut client = server.connect("org_a");
    client.subscribe("events");
    let data = concat!(
        r#"{ "id" : "evt_big", "source_id":"src_1","#,
        r#""big":123456789012345678901234567890,"#,
        r#""negative":-987654321098765432109876543210,"#,
        r#""decimal":3.14159265358979323846264338327950288419716939937510,"#,
        r#""tiny":1.000000000000000000000000000001e-310,"#,
        r#""trailing":2.50,"#,
        r#""nested":{"list":[1,2.0,"3",null,true,false,{"deep":[[0.1]]}]},"#,
        r#""text":"quote \" backslash \\ unicode \u00e9 é ✓ digits 12345678901234567890""#,
        "}"
    );
    let message = format!(r#"{{"org_id":"org_a","type":"event","data":{data}}}"#);
    let seq = server.publish_ok(&message)[0];
    let (value, raw) = client.next_raw(WAIT);
    assert_eq!(value["seq"].as_u64(), Some(seq));
    let sent: Value = serde_json::from_str(data).unwrap();
    assert_eq!(value["data"], sent, "data must be equal as a JSON value");
    let tokens = number_tokens(&raw);
    for number in [
        "123456789012345678901234567890",
        "-987654321098765432109876543210",
        "3.14159265358979323846264338327950288419716939937510",
        "1.000000000000000000000000000001e-310",
        "2.50",
        "2.0",
        "0.1",
    ] {
        assert!(
            tokens.iter().any(|t| t == number),
            "{number} not in the message as sent; numbers received: {tokens:?}\n{raw}"
        );
    }
    assert!(raw.contains("digits 12345678901234567890"), "{raw}");
}

// ---------------------------------------------------------------------------
// Authentication and the public listener's HTTP answers
// ---------------------------------------------------------------------------

/// Sends a raw upgrade request and returns the answer; asserts the server
/// then closes the connection (no upgrade happened).
fn refused_upgrade(server: &Server, path_and_query: &str, extra: &[&str]) -> common::HttpResponse {
    let request = upgrade_request(server.ws_addr, path_and_query, extra);
    let response = http_raw(server.ws_addr, request.as_bytes());
    assert_ne!(response.status, 101);
    assert!(
        response.header("sec-websocket-accept").is_none(),
        "{response:?}"
    );
    response
}

#[test]
fn bad_or_missing_credentials_get_401_without_upgrade() {
    let server = Server::start(&["org_a"]);
    let good = server.key("org_a").to_string();
    let wrong = format!("{}x", &good[..good.len() - 1]);
    let cases: Vec<(String, Vec<String>)> = vec![
        (format!("/v1/ws?token={wrong}"), vec![]),
        ("/v1/ws?token=".to_string(), vec![]),
        ("/v1/ws?token=not-a-key".to_string(), vec![]),
        (
            "/v1/ws".to_string(),
            vec![format!("Authorization: Bearer {wrong}")],
        ),
        (
            // The admin token is not an API key.
            "/v1/ws".to_string(),
            vec![format!("Authorization: Bearer {}", server.admin_token)],
        ),
        ("/v1/ws".to_string(), vec![]),
    ];
    for (path, extra) in &cases {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let response = refused_upgrade(&server, path, &extra);
        assert_eq!(response.status, 401, "{path} {extra:?}: {response:?}");
        assert_eq!(
            response.json(),
            json!({"error":"unauthorized"}),
            "{path} {extra:?}"
        );
    }
    // tungstenite sees the refusal as an HTTP error, not a WebSocket.
    match Client::try_upgrade(server.ws_addr, &format!("/v1/ws?token={wrong}")) {
        Err(UpgradeError::Status(401)) => {}
        Err(other) => panic!("expected 401, got {other:?}"),
        Ok(_) => panic!("expected 401, got an upgrade"),
    }
    // Both accepted forms of the right key work.
    let by_query = server.connect("org_a");
    assert_eq!(by_query.welcome["org_id"], "org_a");
    let by_bearer = Client::connect_with(
        server.ws_addr,
        "/v1/ws",
        &[("Authorization", &format!("Bearer {good}"))],
    );
    assert_eq!(by_bearer.welcome["org_id"], "org_a");
}

#[test]
fn public_listener_answers_404_400_and_426() {
    let server = Server::start(&["org_a"]);
    let key = server.key("org_a");
    let response = common::http_request(server.ws_addr, "GET", "/nope", &[], b"");
    assert_eq!(response.status, 404, "{response:?}");

    // A plain GET of the WebSocket path, no upgrade headers, valid key.
    let response = common::http_request(
        server.ws_addr,
        "GET",
        &format!("/v1/ws?token={key}"),
        &[],
        b"",
    );
    assert_eq!(response.status, 400, "{response:?}");

    // Wrong WebSocket version: 426 naming the supported one.
    let request = upgrade_request(server.ws_addr, &format!("/v1/ws?token={key}"), &[])
        .replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8");
    let response = http_raw(server.ws_addr, request.as_bytes());
    assert_eq!(response.status, 426, "{response:?}");
    assert_eq!(response.header("sec-websocket-version"), Some("13"));
}

#[test]
fn long_request_heads_upgrade_and_heads_over_8_kib_get_431() {
    let server = Server::start(&["org_a"]);
    let key = server.key("org_a");
    // A 6 KiB cookie: the head outgrows the first read buffer (1 KiB) but
    // stays under the 8 KiB limit.
    let cookie = format!("big={}", "c".repeat(6 * 1024));
    let mut client = Client::connect_with(
        server.ws_addr,
        &format!("/v1/ws?token={key}"),
        &[("Cookie", &cookie)],
    );
    assert_eq!(client.welcome["type"], "welcome");
    client.subscribe("events");

    // Over the limit: 431 and no upgrade.
    let huge = format!("Cookie: big={}", "c".repeat(9 * 1024));
    let response = refused_upgrade(&server, &format!("/v1/ws?token={key}"), &[&huge]);
    assert_eq!(response.status, 431, "{response:?}");
}

// ---------------------------------------------------------------------------
// Client messages: error replies and close codes
// ---------------------------------------------------------------------------

/// Reads an `error` reply and checks its code (and `channel` when given).
fn expect_error(client: &mut Client, code: &str, channel: Option<&str>) {
    let reply = client.next_json(WAIT);
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["code"], code, "{reply}");
    assert!(
        reply["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error without a message: {reply}"
    );
    if let Some(channel) = channel {
        assert_eq!(reply["channel"], channel, "{reply}");
    }
}

#[test]
fn every_client_error_is_answered_and_the_connection_stays_open() {
    let server = ServerBuilder::new()
        .org("org_a")
        .arg("--subscriptions-max", 2)
        .start();
    let mut client = server.connect("org_a");

    // JSON that is not an object is not a message either, even when an
    // array's elements line up with a message's fields.
    for text in [
        "not json",
        "{",
        "",
        "42",
        "\"subscribe\"",
        "{\"type\":\"ping\"} x",
        "[\"subscribe\",\"events\",null]",
        "[{\"type\":\"ping\"}]",
    ] {
        client.send_text(text);
        expect_error(&mut client, "invalid_json", None);
        client.ping_pong();
    }
    for text in [
        r#"{"type":"dance"}"#,
        r#"{"type":"SUBSCRIBE","channel":"events"}"#,
        r#"{"channel":"events"}"#,
    ] {
        client.send_text(text);
        expect_error(&mut client, "unknown_type", None);
        client.ping_pong();
    }
    for channel in [
        "evnts",
        "events:",
        "events:bad id",
        "collections",
        "issues:iss_1",
        "Events",
    ] {
        client.send_text(&json!({"type":"subscribe","channel":channel}).to_string());
        expect_error(&mut client, "unknown_channel", Some(channel));
        client.ping_pong();
    }
    let too_long = format!("events:{}", "a".repeat(129));
    client.send_text(&json!({"type":"subscribe","channel":too_long}).to_string());
    expect_error(&mut client, "unknown_channel", Some(&too_long));

    // --subscriptions-max 2: the third distinct channel is refused, the
    // first two keep working.
    client.subscribe("issues");
    client.subscribe("events:src_1");
    client.send_text(r#"{"type":"subscribe","channel":"deliveries"}"#);
    expect_error(&mut client, "too_many_subscriptions", None);
    client.ping_pong();
    let seq = server.publish_ok(&issue("org_a", "i1"))[0];
    assert_eq!(client.next_json(WAIT)["seq"].as_u64(), Some(seq));
    // Freeing one makes room again.
    client.unsubscribe("events:src_1");
    client.subscribe("deliveries");
}

#[test]
fn twenty_bad_messages_in_a_row_close_with_1008() {
    let server = Server::start(&["org_a"]);
    let mut client = server.connect("org_a");
    // 19 in a row are answered; a good message resets the count.
    for _ in 0..19 {
        client.send_text("bad");
        expect_error(&mut client, "invalid_json", None);
    }
    client.ping_pong();
    for _ in 0..19 {
        client.send_text("bad");
        expect_error(&mut client, "invalid_json", None);
    }
    client.send_text("bad");
    let mut errors = 0;
    let code = loop {
        match client.recv(WAIT) {
            Received::Json { value, .. } => {
                assert_eq!(value["code"], "invalid_json", "{value}");
                errors += 1;
            }
            Received::Close(code) => break code,
            other => panic!("expected a close, got {other:?}"),
        }
    };
    assert_eq!(code, 1008);
    assert!(errors <= 1, "{errors} replies after the 20th bad message");
}

#[test]
fn oversize_client_message_closes_with_1009_and_the_server_still_serves() {
    let server = Server::start(&["org_a"]);
    let mut client = server.connect("org_a");
    // Exactly 64 KiB is allowed.
    let prefix = r#"{"type":"ping","pad":""#;
    let pad = "x".repeat(64 * 1024 - prefix.len() - 2);
    let at_limit = format!("{prefix}{pad}\"}}");
    assert_eq!(at_limit.len(), 64 * 1024);
    client.send_text(&at_limit);
    assert_eq!(client.next_json(WAIT), json!({"type":"pong"}));
    // One byte more closes the connection.
    let over = format!("{prefix}{pad}x\"}}");
    client.send_text(&over);
    assert_eq!(client.expect_close(WAIT), Some(1009));

    let mut fresh = server.connect("org_a");
    fresh.subscribe("issues");
    let seq = server.publish_ok(&issue("org_a", "i1"))[0];
    assert_eq!(fresh.next_json(WAIT)["seq"].as_u64(), Some(seq));
}

#[test]
fn unmasked_client_frame_closes_with_1002() {
    let server = Server::start(&["org_a"]);
    let mut raw = RawClient::connect(
        server.ws_addr,
        &format!("/v1/ws?token={}", server.key("org_a")),
    );
    assert_eq!(raw.next_json(WAIT)["type"], "welcome");
    // A masked ping is answered; the same unmasked is a protocol error.
    raw.send_frame(true, 1, br#"{"type":"ping"}"#, true);
    assert_eq!(raw.next_json(WAIT), json!({"type":"pong"}));
    raw.send_frame(true, 1, br#"{"type":"ping"}"#, false);
    let close = loop {
        let frame = raw.read_frame(WAIT).unwrap().expect("a close frame");
        if frame.opcode != 9 {
            break frame;
        }
    };
    assert_eq!(close.opcode, 8, "{close:?}");
    assert_eq!(close.close_code(), 1002);
}

#[test]
fn binary_message_closes_with_1003() {
    let server = Server::start(&["org_a"]);
    let mut client = server.connect("org_a");
    client
        .ws
        .send(Message::binary(&br#"{"type":"ping"}"#[..]))
        .unwrap();
    assert_eq!(client.expect_close(WAIT), Some(1003));
}

#[test]
fn websocket_ping_gets_a_pong_with_the_same_payload() {
    let server = Server::start(&["org_a"]);
    let mut client = server.connect("org_a");
    let long = [0xa5u8; 125];
    for payload in [&b"hello-123"[..], &b""[..], &long[..]] {
        client
            .ws
            .send(Message::Ping(payload.to_vec().into()))
            .unwrap();
        let deadline = Instant::now() + WAIT;
        loop {
            match client.ws.read() {
                Ok(Message::Pong(got)) => {
                    assert_eq!(&got[..], payload);
                    break;
                }
                Ok(Message::Ping(_)) => {}
                Ok(other) => panic!("expected a pong, got {other:?}"),
                Err(tungstenite::Error::Io(e))
                    if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {}
                Err(e) => panic!("expected a pong, got {e}"),
            }
        }
    }
    client.ping_pong();
}

// ---------------------------------------------------------------------------
// Slow consumer
// ---------------------------------------------------------------------------

#[test]
fn slow_consumer_is_closed_with_1013_memory_stays_bounded_and_others_get_everything() {
    const BATCHES: u64 = 512;
    const PER_BATCH: u64 = 100;
    const TOTAL: u64 = BATCHES * PER_BATCH;
    // The fast reader may lag this many messages behind the publisher
    // (about 550 KiB, plus one batch in flight: under the 1 MiB send queue
    // even before the kernel's socket buffers have grown). It reads all the
    // time, but on a 2-core box the scheduler decides how often; the pacing
    // keeps it a fast reader by definition, so only the slow one is cut.
    const LAG_MAX: u64 = 500;
    const RSS_MAX_KIB: u64 = 200 * 1024;

    let server = Server::start(&["org_a"]);
    let mut slow = server.connect("org_a");
    slow.subscribe("events");
    let mut fast = server.connect("org_a");
    fast.subscribe("events");
    let rss_before = server.rss_kib();

    let received = Arc::new(AtomicU64::new(0));
    let reader = {
        let received = received.clone();
        std::thread::spawn(move || {
            let mut first = None;
            let mut previous = 0;
            let deadline = Instant::now() + Duration::from_secs(120);
            while received.load(Ordering::Relaxed) < TOTAL {
                assert!(Instant::now() < deadline, "fast reader timed out");
                match fast.recv(Duration::from_secs(20)) {
                    Received::Json { raw, .. } => {
                        let seq = seq_of(&raw);
                        if first.is_none() {
                            first = Some(seq);
                        } else {
                            assert_eq!(seq, previous + 1, "fast reader: gap or duplicate");
                        }
                        previous = seq;
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                    other => panic!(
                        "fast reader: {other:?} after {}",
                        received.load(Ordering::Relaxed)
                    ),
                }
            }
            (first.unwrap(), previous, fast)
        })
    };

    let pad = if common::deflate::enabled() {
        // Compressed, 1,000 'p's are a few bytes and the slow client would
        // never be over its send queue: pad that deflate cannot shrink much
        // (no context takeover, so each message is compressed on its own).
        common::deflate::incompressible(1000)
    } else {
        "p".repeat(1000)
    };
    let mut published = Vec::with_capacity(TOTAL as usize);
    let mut rss_max = 0;
    let mut body_bytes = 0usize;
    for batch in 0..BATCHES {
        let messages: Vec<String> = (0..PER_BATCH)
            .map(|i| {
                format!(
                    r#"{{"org_id":"org_a","type":"event","data":{{"id":"evt_{batch}_{i}","source_id":"src_1","pad":"{pad}"}}}}"#
                )
            })
            .collect();
        let body = array(&messages);
        body_bytes += body.len();
        let pace_deadline = Instant::now() + Duration::from_secs(30);
        while published.len() as u64 > received.load(Ordering::Relaxed) + LAG_MAX {
            assert!(
                Instant::now() < pace_deadline,
                "fast reader stuck at {}",
                received.load(Ordering::Relaxed)
            );
            assert!(!reader.is_finished(), "fast reader failed");
            std::thread::sleep(Duration::from_millis(1));
        }
        published.extend(server.publish_ok(&body));
        if batch % 8 == 0 {
            rss_max = rss_max.max(server.rss_kib());
        }
    }
    rss_max = rss_max.max(server.rss_kib());
    assert!(body_bytes >= 50 << 20, "published only {body_bytes} bytes");

    let (first, last, _fast) = reader.join().expect("fast reader");
    assert_eq!((first, last), (published[0], *published.last().unwrap()));
    assert!(published.windows(2).all(|w| w[1] == w[0] + 1));

    // The slow client reads now: the frames the kernel buffered, then the
    // close frame (never a torn frame), within the linger time.
    let mut slow_messages = 0u64;
    let mut previous = None;
    let ending = loop {
        match slow.recv(Duration::from_secs(10)) {
            Received::Json { raw, .. } => {
                let seq = seq_of(&raw);
                if let Some(previous) = previous {
                    assert_eq!(seq, previous + 1, "slow reader: gap");
                }
                previous = Some(seq);
                slow_messages += 1;
            }
            other => break other,
        }
    };
    eprintln!(
        "slow consumer: {slow_messages} messages then {ending:?}; RSS {rss_before} KiB before, \
         {rss_max} KiB max; {body_bytes} bytes published"
    );
    assert!(
        slow_messages < TOTAL / 2,
        "the slow client got {slow_messages} messages: it was not cut off"
    );
    server.wait_for_metric("hookstream_slow_consumer_closes_total", 1);
    assert!(
        matches!(ending, Received::Close(1013)),
        "slow consumer ended with {ending:?}, expected close 1013"
    );
    assert!(
        rss_max < RSS_MAX_KIB,
        "server RSS reached {rss_max} KiB (limit {RSS_MAX_KIB} KiB)"
    );
}

// ---------------------------------------------------------------------------
// Publishing
// ---------------------------------------------------------------------------

#[test]
fn publish_with_one_bad_message_is_refused_whole_and_publishes_nothing() {
    let server = Server::start(&["org_a"]);
    let mut client = server.connect("org_a");
    for channel in ["events", "issues", "collections:barrier"] {
        client.subscribe(channel);
    }
    let before = server.publish_ok(&issue("org_a", "i0"))[0];
    assert_eq!(client.next_json(WAIT)["seq"].as_u64(), Some(before));

    // Each body has its bad message at a different index.
    let bad_bodies = [
        // An event without data.source_id.
        (
            array(&[
                issue("org_a", "i1"),
                r#"{"org_id":"org_a","type":"event","data":{"id":"e"}}"#.to_string(),
                issue("org_a", "i2"),
            ]),
            1,
        ),
        // data that is not an object.
        (
            array(&[
                issue("org_a", "i1"),
                issue("org_a", "i2"),
                r#"{"org_id":"org_a","type":"issue","data":[1]}"#.to_string(),
            ]),
            2,
        ),
        // An unknown type first.
        (
            array(&[
                r#"{"org_id":"org_a","type":"note","data":{}}"#.to_string(),
                issue("org_a", "i1"),
            ]),
            0,
        ),
        // A sync without collection_id, a delivery with a bad destination id,
        // an org id that is not one.
        (
            array(&[
                event("org_a", "e1", "src_1"),
                r#"{"org_id":"org_a","type":"sync","data":{}}"#.to_string(),
            ]),
            1,
        ),
        (
            array(&[
                event("org_a", "e1", "src_1"),
                delivery("org_a", "d1", "dst 9"),
            ]),
            1,
        ),
        (
            array(&[
                event("org_a", "e1", "src_1"),
                event("org_a", "e2", "src_1"),
                event("org a", "e3", "src_1"),
            ]),
            2,
        ),
    ];
    for (body, index) in &bad_bodies {
        let response = server.publish(body);
        assert_eq!(response.status, 400, "{body}: {}", response.text());
        let json = response.json();
        assert_eq!(json["error"], "invalid_message", "{json}");
        assert_eq!(
            json["index"].as_u64(),
            Some(*index as u64),
            "{body}: {json}"
        );
        assert!(
            json["reason"].as_str().is_some_and(|r| !r.is_empty()),
            "{json}"
        );
    }
    // Not JSON at all.
    let response = server.publish("[{");
    assert_eq!(response.status, 400);
    assert_eq!(response.json()["error"], "invalid_message");

    // Nothing of those requests was published or took a seq: the barrier
    // is the next message and has the next seq.
    let seq = server.publish_ok(&sync("org_a", "barrier", "b"))[0];
    assert_eq!(seq, before + 1);
    let message = client.next_json(WAIT);
    assert_eq!(message["channel"], "collections:barrier", "{message}");
    assert_eq!(message["seq"].as_u64(), Some(seq));
}

#[test]
fn publish_needs_the_admin_token() {
    let server = Server::start(&["org_a"]);
    let mut client = server.connect("org_a");
    client.subscribe("issues");
    client.subscribe("collections:barrier");
    let body = issue("org_a", "i1");
    let api_key = server.key("org_a").to_string();
    let wrong = format!("{}x", server.admin_token);
    for token in [None, Some(wrong.as_str()), Some(api_key.as_str()), Some("")] {
        let response = server.publish_with(&body, token, "application/json");
        assert_eq!(response.status, 401, "token {token:?}: {}", response.text());
    }
    // Basic auth or a bare token is not a bearer token either.
    for authorization in [
        format!("Basic {}", server.admin_token),
        server.admin_token.clone(),
    ] {
        let response = common::http_request(
            server.admin_addr,
            "POST",
            "/v1/publish",
            &[("Authorization", authorization)],
            body.as_bytes(),
        );
        assert_eq!(response.status, 401);
    }
    barrier(&server, "org_a", &mut [&mut client]);
}

#[test]
fn publish_body_over_the_limit_gets_413() {
    let server = ServerBuilder::new()
        .org("org_a")
        .arg("--publish-body-bytes", 1024)
        .start();
    let mut client = server.connect("org_a");
    client.subscribe("events");
    client.subscribe("collections:barrier");
    let message = |pad: usize| {
        format!(
            r#"{{"org_id":"org_a","type":"event","data":{{"id":"e","source_id":"src_1","pad":"{}"}}}}"#,
            "x".repeat(pad)
        )
    };
    let base = message(0).len();
    let at_limit = message(1024 - base);
    assert_eq!(at_limit.len(), 1024);
    let seq = server.publish_ok(&at_limit)[0];
    assert_eq!(client.next_json(WAIT)["seq"].as_u64(), Some(seq));

    let over = message(1025 - base);
    let response = server.publish(&over);
    assert_eq!(response.status, 413, "{}", response.text());
    // Also when only the head has arrived: Content-Length alone decides.
    let head = format!(
        "POST /v1/publish HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        server.admin_addr,
        server.admin_token,
        16 << 20
    );
    let response = http_raw(server.admin_addr, head.as_bytes());
    assert_eq!(response.status, 413);
    barrier(&server, "org_a", &mut [&mut client]);
}

// ---------------------------------------------------------------------------
// Shards and scale
// ---------------------------------------------------------------------------

#[test]
fn with_two_shards_an_org_lives_on_one_shard_whichever_accepted() {
    const CONNECTIONS: usize = 20;
    // Two orgs owned by different shards, so both shards own connections
    // and each accepts (SO_REUSEPORT spreads by address) for the other.
    let org_b = (0..)
        .map(|i| format!("org_{i}"))
        .find(|org| {
            hookstream::shard::shard_for(org, 2) != hookstream::shard::shard_for("org_a", 2)
        })
        .unwrap();
    let server = ServerBuilder::new()
        .org("org_a")
        .org(&org_b)
        .arg("--shards", 2)
        .start();
    assert_eq!(server.shards, 2);
    let mut shards_of_org = Vec::new();
    let mut all_clients = Vec::new();
    for org in ["org_a", org_b.as_str()] {
        let mut clients: Vec<Client> = (0..CONNECTIONS).map(|_| server.connect(org)).collect();
        let ids: BTreeSet<String> = clients
            .iter()
            .map(|c| c.welcome["connection_id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(ids.len(), CONNECTIONS, "connection ids must be unique");
        let shards: BTreeSet<u64> = ids.iter().map(|id| shard_of_connection_id(id)).collect();
        assert_eq!(shards.len(), 1, "{org} is on several shards: {ids:?}");
        shards_of_org.push(*shards.first().unwrap());
        for client in &mut clients {
            client.subscribe("events");
        }
        all_clients.push(clients);
    }
    assert_ne!(shards_of_org[0], shards_of_org[1]);

    for (org, clients) in ["org_a", org_b.as_str()].iter().zip(&mut all_clients) {
        let seq = server.publish_ok(&event(org, "evt_1", "src_1"))[0];
        for client in clients.iter_mut() {
            let message = client.next_json(WAIT);
            assert_eq!(message["seq"].as_u64(), Some(seq));
            assert_eq!(message["data"]["id"], "evt_1");
        }
    }
    // Publishing for both orgs in one request (whichever shard serves the
    // admin connection forwards to the owners) keeps the request order.
    let seqs = server.publish_ok(&array(&[
        issue("org_a", "i1"),
        event(&org_b, "evt_2", "src_1"),
        event("org_a", "evt_3", "src_1"),
    ]));
    for client in all_clients[0].iter_mut() {
        assert_eq!(client.next_json(WAIT)["seq"].as_u64(), Some(seqs[2]));
    }
    for client in all_clients[1].iter_mut() {
        assert_eq!(client.next_json(WAIT)["seq"].as_u64(), Some(seqs[1]));
    }
}

#[test]
fn a_thousand_concurrent_clients_all_receive_a_broadcast() {
    const CLIENTS: usize = 1000;
    const THREADS: usize = 4;
    let server = Server::start(&["org_a"]);
    let started = Instant::now();
    // Connect and subscribe from a few threads; each client is only read
    // once everything is set up.
    let addr = server.ws_addr;
    let path = format!("/v1/ws?token={}", server.key("org_a"));
    let mut clients: Vec<Client> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..THREADS)
            .map(|_| {
                let path = &path;
                scope.spawn(move || {
                    let mut mine: Vec<Client> = (0..CLIENTS / THREADS)
                        .map(|_| Client::connect(addr, path))
                        .collect();
                    // Pipelined: every subscribe first, then every ack.
                    for client in &mut mine {
                        client.send_text(r#"{"type":"subscribe","channel":"events"}"#);
                    }
                    for client in &mut mine {
                        let ack = client.next_json(WAIT);
                        assert_eq!(ack["type"], "subscribed", "{ack}");
                    }
                    mine
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("connecting thread"))
            .collect()
    });
    assert_eq!(clients.len(), CLIENTS);
    let connected = started.elapsed();
    server.wait_for_metric("hookstream_connections", CLIENTS as u64);

    let seq = server.publish_ok(&event("org_a", "evt_all", "src_1"))[0];
    for (i, client) in clients.iter_mut().enumerate() {
        let message = client.next_json(WAIT);
        assert_eq!(message["seq"].as_u64(), Some(seq), "client {i}");
        assert_eq!(message["data"]["id"], "evt_all", "client {i}");
    }
    eprintln!(
        "{CLIENTS} clients connected and subscribed in {connected:?}, broadcast read by all after {:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------
// Lifecycle, probes, heartbeat
// ---------------------------------------------------------------------------

#[test]
fn sigterm_closes_every_client_with_1001_and_exits_0() {
    let mut server = ServerBuilder::new()
        .org("org_a")
        .org("org_b")
        .arg("--shards", 2)
        .start();
    let mut clients = vec![
        server.connect("org_a"),
        server.connect("org_a"),
        server.connect("org_b"),
    ];
    clients[0].subscribe("events");
    server.signal(libc::SIGTERM);
    for client in &mut clients {
        assert_eq!(client.expect_close(WAIT), Some(1001));
    }
    let status = server
        .wait_exit(Duration::from_secs(10))
        .expect("the server exits after SIGTERM");
    assert_eq!(
        status.code(),
        Some(0),
        "{status:?}; stderr:\n{}",
        server.stderr()
    );
}

#[test]
fn probes_need_no_token_and_metrics_need_the_admin_token() {
    let server = Server::start(&["org_a"]);
    let _client = server.connect("org_a");
    for path in ["/healthz", "/readyz"] {
        let response = server.admin_get(path, false);
        assert_eq!(response.status, 200, "{path}: {}", response.text());
    }
    let response = server.admin_get("/metrics", true);
    assert_eq!(response.status, 200);
    let text = response.text();
    assert!(
        text.lines()
            .any(|l| l.starts_with("hookstream_connections")),
        "{text}"
    );
    server.wait_for_metric("hookstream_connections", 1);
    assert_eq!(server.admin_get("/metrics", false).status, 401);
}

#[test]
fn heartbeat_closes_a_client_that_never_answers_pings_but_not_one_that_reads() {
    let server = ServerBuilder::new()
        .org("org_a")
        .arg("--heartbeat-ms", 200)
        .start();
    let path = format!("/v1/ws?token={}", server.key("org_a"));
    let mut reading = Client::connect(server.ws_addr, &path);
    assert_eq!(reading.welcome["heartbeat_ms"].as_u64(), Some(200));
    // This client reads all the time (tungstenite answers each ping from
    // inside `read`) for as long as the silent one is being watched.
    let reader = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_millis(2000);
        while Instant::now() < deadline {
            match reading.recv(deadline.saturating_duration_since(Instant::now())) {
                Received::Timeout => {}
                other => panic!("reading client: {other:?}"),
            }
        }
        reading
    });

    let mut silent = RawClient::connect(server.ws_addr, &path);
    let connected = Instant::now();
    let mut pings = 0;
    let ending = loop {
        match silent.read_frame(Duration::from_secs(3)) {
            Ok(Some(frame)) if frame.opcode == 9 => pings += 1,
            Ok(Some(frame)) if frame.opcode == 1 => {}
            Ok(Some(frame)) => {
                assert_eq!(frame.opcode, 8, "{frame:?}");
                break Some(frame.close_code());
            }
            Ok(None) => break None,
            Err(e) => panic!("no close within 3 s: {e}"),
        }
    };
    let closed_after = connected.elapsed();
    assert!(pings >= 1, "the server never pinged");
    assert!(
        closed_after < Duration::from_millis(1500),
        "closed only after {closed_after:?}"
    );
    eprintln!("silent client: {pings} pings, then {ending:?} after {closed_after:?}");

    let mut reading = reader.join().expect("reading client");
    assert!(reading.pings >= 5, "only {} pings", reading.pings);
    reading.ping_pong();
}

#[test]
fn a_message_larger_than_the_send_queue_limit_reaches_a_reader_that_keeps_up() {
    // 12 MiB of data against the default 1 MiB send queue: a reader that
    // keeps reading is not a slow consumer just because one message is big.
    let server = Server::start(&["org_a"]);
    let mut client = server.connect("org_a");
    client.subscribe("events");
    let pad = "b".repeat(12 << 20);
    let body = format!(
        r#"{{"org_id":"org_a","type":"event","data":{{"id":"evt_big","source_id":"src_1","pad":"{pad}"}}}}"#
    );
    let seqs = server.publish_ok(&body);
    match client.recv(Duration::from_secs(20)) {
        Received::Json { value, .. } => {
            assert_eq!(value["seq"], seqs[0]);
            assert_eq!(value["data"]["pad"].as_str().map(str::len), Some(12 << 20));
        }
        other => panic!("expected the big event, got {other:?}"),
    }
    // And the connection is still open for the next one.
    let seqs = server.publish_ok(&common::event("org_a", "evt_small", "src_1"));
    match client.recv(Duration::from_secs(10)) {
        Received::Json { value, .. } => assert_eq!(value["seq"], seqs[0]),
        other => panic!("expected the next event, got {other:?}"),
    }
}
