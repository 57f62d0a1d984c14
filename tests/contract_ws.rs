//! PROTOCOL.md §2 client → server messages over real sockets against a real
//! server: `subscribe` with `after` on a channel the connection already has
//! (live or being replayed) means what it means on a fresh connection, and
//! fields of the wrong type are answered with the error code and text that
//! name the actual problem.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use common::{issue, sync, Client, Received, Server, ServerBuilder, STEP_TIMEOUT};
use serde_json::json;

/// Sends `subscribe` with `after` to a connection already receiving
/// `channel` and returns the seqs that arrive before the reply, which must
/// be `{"type":"subscribed","channel":…,"recovered":true}`.
fn seqs_until_recovered_reply(client: &mut Client, channel: &str, after: u64) -> Vec<u64> {
    client.send_text(&format!(
        r#"{{"type":"subscribe","channel":"{channel}","after":{after}}}"#
    ));
    let mut seqs = Vec::new();
    loop {
        let m = client.next_json(STEP_TIMEOUT);
        if m["type"] == "subscribed" {
            assert_eq!(
                m,
                json!({"type":"subscribed","channel":channel,"recovered":true})
            );
            return seqs;
        }
        seqs.push(m["seq"].as_u64().unwrap_or_else(|| panic!("no seq: {m}")));
    }
}

/// The seqs of the next `count` messages, each checked to be of `channel`.
fn next_seqs(client: &mut Client, channel: &str, count: usize) -> Vec<u64> {
    (0..count)
        .map(|_| {
            let m = client.next_json(STEP_TIMEOUT);
            assert_eq!(m["channel"], channel, "{m}");
            m["seq"].as_u64().unwrap_or_else(|| panic!("no seq: {m}"))
        })
        .collect()
}

fn issues(org: &str, count: usize, tag: &str) -> String {
    common::array(
        &(0..count)
            .map(|i| issue(org, &format!("{tag}{i}")))
            .collect::<Vec<_>>(),
    )
}

/// The reported bug: a live subscriber re-sending `subscribe` with `after`
/// got `subscribed` and nothing else, while a fresh connection got the
/// retained messages. Both must get the same: the replay, then live.
#[test]
fn subscribe_with_after_on_a_live_channel_replays_like_a_fresh_subscribe() {
    let server = Server::start(&["org_r"]);
    let seqs = server.publish_ok(&issues("org_r", 3, "old"));
    let mut live = server.connect("org_r");
    live.subscribe("issues");
    let newer = server.publish_ok(&issue("org_r", "live1"))[0];
    assert_eq!(next_seqs(&mut live, "issues", 1), vec![newer]);

    let after = seqs[0];
    let ack = live.subscribe_after("issues", after);
    let mut fresh = server.connect("org_r");
    let fresh_ack = fresh.subscribe_after("issues", after);
    assert_eq!(
        ack,
        json!({"type":"subscribed","channel":"issues","recovered":true})
    );
    assert_eq!(ack, fresh_ack);
    let expected = vec![seqs[1], seqs[2], newer];
    assert_eq!(next_seqs(&mut fresh, "issues", 3), expected);
    assert_eq!(next_seqs(&mut live, "issues", 3), expected);

    // Then live, once each, and nothing else.
    let next = server.publish_ok(&issue("org_r", "live2"))[0];
    assert_eq!(next_seqs(&mut live, "issues", 1), vec![next]);
    assert_eq!(next_seqs(&mut fresh, "issues", 1), vec![next]);
    live.ping_pong();
    fresh.ping_pong();

    // A plain subscribe of the subscribed channel stays harmless: the
    // acknowledgement alone, and live delivery goes on once.
    live.subscribe("issues");
    let last = server.publish_ok(&issue("org_r", "live3"))[0];
    assert_eq!(next_seqs(&mut live, "issues", 1), vec![last]);
    live.ping_pong();
}

/// While issues are published continuously, a live subscriber asks again
/// with an `after` in the past: after the `subscribed` reply comes every
/// issue above `after`, in order, with no gap and no duplicate across the
/// switch back to live.
#[test]
fn resubscribe_with_after_while_publishing_has_no_gap_and_no_duplicate() {
    let server = Server::start(&["org_p"]);
    let first = server.publish_ok(&issues("org_p", 50, "pre"))[0];
    let mut client = server.connect("org_p");
    client.subscribe("issues");
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let publisher = scope.spawn(|| {
            let mut published = 0;
            while !stop.load(Ordering::Relaxed) && published < 20_000 {
                server.publish_ok(&issues("org_p", 5, "p"));
                published += 5;
            }
        });
        // Some live messages first.
        let before: Vec<u64> = next_seqs(&mut client, "issues", 20);
        for pair in before.windows(2) {
            assert_eq!(pair[1], pair[0] + 1, "live stream: {before:?}");
        }
        let after = first + 10;
        // Live messages may still arrive before the reply, in order.
        let mut last_live = *before.last().unwrap();
        for seq in seqs_until_recovered_reply(&mut client, "issues", after) {
            assert_eq!(seq, last_live + 1, "live stream before the reply: {seq}");
            last_live = seq;
        }
        // After the reply: after+1, after+2, … well past the switch.
        let target = last_live + 200;
        let mut expect = after + 1;
        while expect <= target {
            let m = client.next_json(STEP_TIMEOUT);
            assert_eq!(m["channel"], "issues", "{m}");
            assert_eq!(m["seq"].as_u64(), Some(expect), "after {after}: {m}");
            expect += 1;
        }
        stop.store(true, Ordering::Relaxed);
        publisher.join().unwrap();
        // Whatever else was published follows in order, then nothing more.
        let last = server.publish_ok(&issue("org_p", "end"))[0];
        while expect <= last {
            let m = client.next_json(STEP_TIMEOUT);
            assert_eq!(m["seq"].as_u64(), Some(expect), "{m}");
            expect += 1;
        }
    });
    client.ping_pong();
}

/// `recovered` means what it means on a fresh connection: false when
/// retention dropped messages above `after`; and what exists is replayed.
#[test]
fn resubscribe_with_after_reports_recovered_false_when_history_was_dropped() {
    let server = ServerBuilder::new()
        .org("org_k")
        .arg("--history-messages", 20)
        .start();
    for chunk in 0..10 {
        server.publish_ok(&issues("org_k", 10, &format!("c{chunk}_")));
    }
    let mut client = server.connect("org_k");
    client.subscribe("issues");
    client.ping_pong();
    let ack = client.subscribe_after("issues", 10);
    let mut fresh = server.connect("org_k");
    let fresh_ack = fresh.subscribe_after("issues", 10);
    assert_eq!(
        ack,
        json!({"type":"subscribed","channel":"issues","recovered":false})
    );
    assert_eq!(ack, fresh_ack);
    let retained: Vec<u64> = next_seqs(&mut fresh, "issues", 20);
    assert_eq!(retained, (81..=100).collect::<Vec<u64>>());
    assert_eq!(next_seqs(&mut client, "issues", 20), retained);
    client.ping_pong();
}

/// A second `subscribe` with `after` while the first one's replay may still
/// be running: whether the first replay was still going or had finished,
/// everything above the second `after` follows the second reply, once.
#[test]
fn a_second_after_replaces_a_replay_in_progress() {
    let server = Server::start(&["org_t"]);
    for chunk in 0..3 {
        server.publish_ok(&issues("org_t", 500, &format!("c{chunk}_")));
    }
    let mut client = server.connect("org_t");
    let ack = client.subscribe_after("issues", 1400);
    assert_eq!(ack["recovered"], true);
    // A smaller `after` right away: the first replay cannot cover it.
    let first = seqs_until_recovered_reply(&mut client, "issues", 100);
    // Before the second reply: a prefix of the first replay.
    assert_eq!(
        first,
        (1401..1401 + first.len() as u64).collect::<Vec<u64>>()
    );
    assert_eq!(
        next_seqs(&mut client, "issues", 1400),
        (101..=1500).collect::<Vec<u64>>()
    );
    let live = server.publish_ok(&issue("org_t", "live"))[0];
    assert_eq!(next_seqs(&mut client, "issues", 1), vec![live]);
    client.ping_pong();
}

/// Re-subscribing with `after` neither counts a second subscription nor
/// loses one: the limit, the unsubscribe and a channel whose bit is freed
/// with its last subscriber all keep working.
#[test]
fn resubscribe_with_after_keeps_the_subscription_count_and_channel_bits() {
    let server = ServerBuilder::new()
        .org("org_l")
        .arg("--subscriptions-max", 2)
        .start();
    let old = server.publish_ok(&common::array(&[
        issue("org_l", "i0"),
        sync("org_l", "col_1", "s0"),
        issue("org_l", "i1"),
        sync("org_l", "col_1", "s1"),
    ]));
    let mut client = server.connect("org_l");
    client.subscribe("issues");
    client.subscribe("collections:col_1");

    // At the limit, a re-subscribe with `after` is not a third subscription.
    let ack = client.subscribe_after("collections:col_1", 0);
    assert_eq!(ack["recovered"], true, "{ack}");
    assert_eq!(
        next_seqs(&mut client, "collections:col_1", 2),
        vec![old[1], old[3]]
    );
    let ack = client.subscribe_after("issues", old[0]);
    assert_eq!(ack["recovered"], true, "{ack}");
    assert_eq!(next_seqs(&mut client, "issues", 1), vec![old[2]]);
    client.send_text(r#"{"type":"subscribe","channel":"deliveries"}"#);
    let error = client.next_json(STEP_TIMEOUT);
    assert_eq!(error["code"], "too_many_subscriptions", "{error}");

    // Both are live again, once each (the collection's channel bit was
    // freed with its only subscriber and interned again at the switch).
    let live = server.publish_ok(&common::array(&[
        sync("org_l", "col_1", "s2"),
        issue("org_l", "i2"),
    ]));
    assert_eq!(
        next_seqs(&mut client, "collections:col_1", 1),
        vec![live[0]]
    );
    assert_eq!(next_seqs(&mut client, "issues", 1), vec![live[1]]);
    client.ping_pong();

    // Unsubscribing works and frees a place.
    client.unsubscribe("collections:col_1");
    client.subscribe("deliveries");
    let next = server.publish_ok(&common::array(&[
        sync("org_l", "col_1", "s3"),
        issue("org_l", "i3"),
    ]));
    assert_eq!(next_seqs(&mut client, "issues", 1), vec![next[1]]);
    client.ping_pong();
}

fn expect_error(client: &mut Client, text: &str, code: &str, message: &str, channel: Option<&str>) {
    client.send_text(text);
    let reply = client.next_json(STEP_TIMEOUT);
    let mut expected = json!({"type":"error","code":code,"message":message});
    if let Some(channel) = channel {
        expected["channel"] = json!(channel);
    }
    assert_eq!(reply, expected, "answer to {text}");
}

const AFTER_MESSAGE: &str = "after must be a seq: an integer from 0 to 18446744073709551615";

/// Valid JSON objects whose fields have the wrong type are not "not a JSON
/// object": the code and message name the field.
#[test]
fn wrong_typed_fields_get_the_error_that_names_them() {
    let server = Server::start(&["org_e"]);
    let mut client = server.connect("org_e");
    let types = "type must be a string: subscribe, unsubscribe or ping";
    for text in [
        r#"{"type":5}"#,
        r#"{"type":true,"channel":"events"}"#,
        r#"{"type":{"subscribe":1},"channel":"events"}"#,
        r#"{"type":["subscribe"],"channel":"events"}"#,
    ] {
        expect_error(&mut client, text, "unknown_type", types, None);
    }
    // An unknown type wins over a bad field: the type decides the fields.
    expect_error(
        &mut client,
        r#"{"type":"dance","channel":5,"after":"x"}"#,
        "unknown_type",
        "type must be subscribe, unsubscribe or ping",
        None,
    );
    for text in [
        r#"{"type":"subscribe","channel":5}"#,
        r#"{"type":"subscribe","channel":["events"]}"#,
        r#"{"type":"unsubscribe","channel":{"name":"events"}}"#,
        r#"{"type":"subscribe","channel":5,"after":"10"}"#,
    ] {
        expect_error(
            &mut client,
            text,
            "unknown_channel",
            "channel must be a string",
            None,
        );
    }
    for after in [
        r#""10""#,
        "-1",
        "1.5",
        "1e3",
        "18446744073709551616",
        "true",
        "[10]",
    ] {
        let text = format!(r#"{{"type":"subscribe","channel":"issues","after":{after}}}"#);
        expect_error(
            &mut client,
            &text,
            "invalid_json",
            AFTER_MESSAGE,
            Some("issues"),
        );
    }
    // None of them subscribed anything, and the connection is open.
    client.ping_pong();
    let seq = server.publish_ok(&issue("org_e", "i"))[0];
    client.subscribe("issues");
    let later = server.publish_ok(&issue("org_e", "j"))[0];
    assert!(later > seq);
    assert_eq!(next_seqs(&mut client, "issues", 1), vec![later]);
    // The largest seq is a valid `after`; being above the org's latest seq
    // it is lost history (PROTOCOL.md §2), and live delivery goes on.
    let ack = client.subscribe_after("issues", u64::MAX);
    assert_eq!(ack["recovered"], false, "{ack}");
    client.ping_pong();
    let last = server.publish_ok(&issue("org_e", "k"))[0];
    assert_eq!(next_seqs(&mut client, "issues", 1), vec![last]);
}

/// The new answers still count as bad messages: 20 in a row close with 1008.
#[test]
fn twenty_wrong_typed_messages_in_a_row_close_with_1008() {
    let server = Server::start(&["org_e"]);
    let mut client = server.connect("org_e");
    let bad = [
        r#"{"type":5}"#,
        r#"{"type":"subscribe","channel":5}"#,
        r#"{"type":"subscribe","channel":"issues","after":"10"}"#,
        r#"{"type":"subscribe","channel":"issues","after":-1}"#,
    ];
    // 19 in a row are answered; a good message resets the count.
    for i in 0..19 {
        client.send_text(bad[i % bad.len()]);
        let reply = client.next_json(STEP_TIMEOUT);
        assert_eq!(reply["type"], "error", "{reply}");
        assert_ne!(reply["message"], "message is not a JSON object", "{reply}");
    }
    client.ping_pong();
    for i in 0..20 {
        client.send_text(bad[i % bad.len()]);
    }
    let deadline = Instant::now() + STEP_TIMEOUT;
    let mut errors = 0;
    let code = loop {
        match client.recv(deadline.saturating_duration_since(Instant::now())) {
            Received::Json { value, .. } => {
                assert_eq!(value["type"], "error", "{value}");
                assert_ne!(value["message"], "message is not a JSON object", "{value}");
                errors += 1;
            }
            Received::Close(code) => break code,
            other => panic!("expected a close, got {other:?}"),
        }
    };
    assert_eq!(code, 1008);
    // The 20th may or may not be answered before the close.
    assert!(
        (19..=20).contains(&errors),
        "{errors} answers before the close"
    );
}
