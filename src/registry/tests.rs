//! Unit tests of the registry: routing by bits, removal during a walk,
//! held channel bits, the send queue limit, direct writes and rendering.

use super::*;
use crate::message::{render_message, Message, MessageKind};
use std::io::IoSlice;

fn limits() -> RegistryLimits {
    RegistryLimits {
        connections_per_org: 3,
        connections_max: 100,
        subscriptions_max: 2,
        send_queue_bytes: 4096,
    }
}

/// A socket that never takes a byte: everything published is queued.
fn refuse(_fd: RawFd, _slices: &[IoSlice<'_>]) -> std::io::Result<usize> {
    Err(std::io::ErrorKind::WouldBlock.into())
}

/// Gives `message` the org's next seq and writes it to every subscriber
/// through `send`, as the shard's committer does in parts.
fn publish_with(
    r: &mut Registry,
    message: &Message,
    send: &mut impl FnMut(RawFd, &[IoSlice<'_>]) -> std::io::Result<usize>,
) -> (u64, Delivered) {
    let seq = r.org_seq(&message.org_id) + 1;
    let mut staged = Vec::new();
    r.stage(message, seq, &mut staged);
    let mut outcome = Delivered::default();
    for broadcast in &staged {
        r.deliver(broadcast, 0..broadcast.positions, send, &mut outcome);
        r.finish(broadcast);
    }
    (seq, outcome)
}

fn publish(r: &mut Registry, message: &Message) -> u64 {
    publish_with(r, message, &mut refuse).0
}

/// An event of `org_a` whose frame is over the tests' 4 KiB queue limit.
fn big_event() -> Message {
    Message {
        data: format!("{{\"pad\":\"{}\"}}", "x".repeat(5000)).into(),
        ..event("org_a", "s")
    }
}

/// A socket that takes 100 bytes once, then refuses everything.
/// A socket that takes every byte, noting the descriptor of each send.
fn takes_all_into(
    got: &mut Vec<RawFd>,
) -> impl FnMut(RawFd, &[IoSlice<'_>]) -> std::io::Result<usize> + '_ {
    move |fd, slices| {
        got.push(fd);
        Ok(slices.iter().map(|s| s.len()).sum())
    }
}

fn takes_100_then_blocks() -> impl FnMut(RawFd, &[IoSlice<'_>]) -> std::io::Result<usize> {
    let mut first = true;
    move |_fd, _slices| {
        if std::mem::take(&mut first) {
            Ok(100)
        } else {
            Err(std::io::ErrorKind::WouldBlock.into())
        }
    }
}

fn event(org: &str, source: &str) -> Message {
    Message {
        org_id: org.to_string(),
        kind: MessageKind::Event,
        route_id: Some(source.to_string()),
        data: format!("{{\"source_id\":\"{source}\"}}").into(),
        idempotency_key: None,
    }
}

#[test]
fn subscribe_routes_by_bit_and_counts_twice_for_two_channels() {
    let mut r = Registry::new(limits());
    let (a, _) = r.add("org_a", "k1", -1).unwrap();
    let (b, _) = r.add("org_a", "k1", -1).unwrap();
    assert_eq!(r.subscribe(a, "events"), Ok(true));
    assert_eq!(r.subscribe(a, "events"), Ok(false));
    assert_eq!(r.subscribe(a, "events:src_1"), Ok(true));
    assert_eq!(r.subscribe(a, "issues"), Err(SubscribeError::TooMany));
    assert_eq!(r.subscribe(b, "events:src_2"), Ok(true));
    assert_eq!(publish(&mut r, &event("org_a", "src_1")), 1);
    let frames = |r: &Registry, k| {
        r.get(k)
            .unwrap()
            .send
            .as_ref()
            .map_or(0, |q| q.frames.len())
    };
    assert_eq!(frames(&r, a), 2);
    assert_eq!(frames(&r, b), 0);
    assert_eq!(publish(&mut r, &event("org_b", "src_1")), 1);
    assert_eq!(frames(&r, a), 2);
}

#[test]
fn removed_connection_frees_bits_and_stale_keys_miss() {
    let mut r = Registry::new(limits());
    let (a, _) = r.add("org_a", "k1", -1).unwrap();
    r.subscribe(a, "events:x").unwrap();
    let bit = r.orgs[0].channels.lookup("events:x").unwrap();
    r.remove(a);
    assert!(r.get(a).is_none());
    assert!(r.orgs[0].channels.lookup("events:x").is_none());
    let (b, _) = r.add("org_a", "k1", -1).unwrap();
    assert_eq!(b.index, a.index);
    assert!(
        r.get(a).is_none(),
        "stale key must not reach the reused slot"
    );
    r.subscribe(b, "events:y").unwrap();
    assert_eq!(r.orgs[0].channels.lookup("events:y"), Some(bit));
}

#[test]
fn org_connection_cap() {
    let mut r = Registry::new(limits());
    for _ in 0..3 {
        r.add("org_a", "k", -1).unwrap();
    }
    assert_eq!(r.add("org_a", "k", -1), Err(AddError::OrgFull));
    assert!(r.add("org_b", "k", -1).is_ok());
}

#[test]
fn slow_consumer_is_closed_and_queue_freed() {
    let mut r = Registry::new(limits());
    let (a, _) = r.add("org_a", "k", -1).unwrap();
    r.subscribe(a, "events").unwrap();
    for _ in 0..200 {
        publish(&mut r, &event("org_a", "s"));
    }
    let conn = r.get(a).unwrap();
    assert_eq!(conn.state.close_requested(), Some(CloseCode::SLOW_CONSUMER));
    assert_eq!(conn.queued_bytes(), 0);
    assert!(conn.send.is_none());
    assert_eq!(r.closing, vec![a]);
}

#[test]
fn slow_consumer_keeps_the_rest_of_a_partly_written_frame() {
    let mut r = Registry::new(limits());
    let (a, _) = r.add("org_a", "k", -1).unwrap();
    r.subscribe(a, "events").unwrap();
    publish(&mut r, &event("org_a", "s"));
    let first_len = r.get(a).unwrap().queued_bytes();
    let send = |_fd: RawFd, _slices: &[IoSlice<'_>]| Ok(5);
    let mut once = true;
    let mut send_once = |fd: RawFd, slices: &[IoSlice<'_>]| {
        if once {
            once = false;
            send(fd, slices)
        } else {
            Err(std::io::ErrorKind::WouldBlock.into())
        }
    };
    assert_eq!(r.flush(a, &mut send_once), Flush::Blocked);
    for _ in 0..200 {
        publish(&mut r, &event("org_a", "s"));
    }
    let conn = r.get(a).unwrap();
    assert_eq!(conn.state.close_requested(), Some(CloseCode::SLOW_CONSUMER));
    assert_eq!(conn.queued_bytes(), first_len - 5);
    assert_eq!(conn.send.as_ref().unwrap().frames.len(), 1);
}

#[test]
fn flush_handles_partial_writes_and_would_block() {
    let mut r = Registry::new(limits());
    let (a, _) = r.add("org_a", "k", -1).unwrap();
    r.subscribe(a, "events").unwrap();
    publish(&mut r, &event("org_a", "s"));
    publish(&mut r, &event("org_a", "s"));
    let total = r.get(a).unwrap().queued_bytes();
    let mut sink = Vec::new();
    let mut calls = 0;
    let mut send = |_fd: RawFd, slices: &[IoSlice<'_>]| {
        calls += 1;
        if calls == 2 {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        // Write 7 bytes at a time.
        let mut left = 7;
        for s in slices {
            let n = s.len().min(left);
            sink.extend_from_slice(&s[..n]);
            left -= n;
            if left == 0 {
                break;
            }
        }
        Ok(7 - left)
    };
    assert_eq!(r.flush(a, &mut send), Flush::Blocked);
    assert!(r.get(a).unwrap().write_blocked);
    assert_eq!(r.flush(a, &mut send), Flush::Drained);
    assert_eq!(sink.len(), total);
    let first = render_message(MessageKind::Event, "events", 1, "{\"source_id\":\"s\"}");
    assert_eq!(&sink[..first.len()], &first[..]);
}

#[test]
fn delivery_writes_straight_from_the_shared_frames_and_queues_only_the_rest() {
    let mut r = Registry::new(limits());
    let (a, _) = r.add("org_a", "k", 7).unwrap();
    let (b, _) = r.add("org_a", "k", 8).unwrap();
    r.subscribe(a, "events").unwrap();
    r.subscribe(b, "events").unwrap();
    r.subscribe(b, "events:s").unwrap();
    let mut staged = Vec::new();
    r.stage(&event("org_a", "s"), 1, &mut staged);
    r.stage(&event("org_a", "t"), 2, &mut staged);
    assert_eq!(staged.len(), 1, "one broadcast per org");
    assert_eq!(staged[0].targets.len(), 3);
    let mut written: Vec<(RawFd, Vec<u8>)> = Vec::new();
    // fd 7 takes everything; fd 8 takes 10 bytes, then refuses.
    let mut send = |fd: RawFd, slices: &[IoSlice<'_>]| {
        let all: Vec<u8> = slices.iter().flat_map(|s| s.iter().copied()).collect();
        let n = if fd == 7 { all.len() } else { 10 };
        if fd == 8 && written.iter().any(|(f, _)| *f == 8) {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        written.push((fd, all[..n].to_vec()));
        Ok(n)
    };
    let mut outcome = Delivered::default();
    r.deliver(&staged[0], 0..2, &mut send, &mut outcome);
    r.finish(&staged[0]);
    let frame = |ch: &str, seq, src: &str| {
        render_message(
            MessageKind::Event,
            ch,
            seq,
            &format!("{{\"source_id\":\"{src}\"}}"),
        )
    };
    let mut expected_a = frame("events", 1, "s");
    expected_a.extend(frame("events", 2, "t"));
    assert_eq!(written[0], (7, expected_a));
    assert!(r.get(a).unwrap().send.is_none(), "nothing queued for a");
    let conn_b = r.get(b).unwrap();
    assert!(conn_b.write_blocked);
    assert_eq!(outcome.blocked, vec![(b, 8)]);
    let queue = conn_b.send.as_ref().unwrap();
    assert_eq!(queue.frames.len(), 3, "events:1, events:s:1, events:2");
    assert_eq!(queue.front_sent, 10);
    let total_b = 2 * frame("events", 1, "s").len() + frame("events:s", 1, "s").len();
    assert_eq!(queue.bytes as usize, total_b - 10);
    assert_eq!(r.counters.delivered, 5);
}

#[test]
fn a_connection_leaving_during_a_delivery_moves_no_one_until_it_ends() {
    let mut r = Registry::new(RegistryLimits {
        connections_per_org: 10,
        ..limits()
    });
    let keys: Vec<ConnKey> = (0..4).map(|i| r.add("org_a", "k", i).unwrap().0).collect();
    for k in &keys {
        r.subscribe(*k, "events").unwrap();
    }
    let mut staged = Vec::new();
    r.stage(&event("org_a", "s"), 1, &mut staged);
    let mut got = Vec::new();
    let mut send = takes_all_into(&mut got);
    let mut outcome = Delivered::default();
    r.deliver(&staged[0], 0..2, &mut send, &mut outcome);
    // Connection 0 (walked) and 3 (not yet) leave between two parts.
    r.remove(keys[0]);
    r.remove(keys[3]);
    assert!(r.is_delivering("org_a"));
    r.deliver(&staged[0], 2..4, &mut send, &mut outcome);
    drop(send);
    r.finish(&staged[0]);
    assert!(!r.is_delivering("org_a"));
    assert_eq!(
        got,
        vec![0, 1, 2],
        "each connection still there got it once"
    );
    let org = &r.orgs[0];
    assert_eq!(org.connections.len(), 2);
    for (position, &index) in org.connections.iter().enumerate() {
        assert_eq!(r.connections[index as usize].org_position, position as u32);
    }
    // Removal works as before once nothing is being delivered.
    r.remove(keys[1]);
    assert_eq!(r.orgs[0].connections.len(), 1);
    assert_eq!(r.get(keys[2]).unwrap().org_position, 0);
}

#[test]
fn a_channel_bit_freed_during_a_delivery_is_not_reused_until_it_ends() {
    let mut r = Registry::new(limits());
    let (a, _) = r.add("org_a", "k", 1).unwrap();
    let (b, _) = r.add("org_a", "k", 2).unwrap();
    r.subscribe(a, "events:src_1").unwrap();
    let mut staged = Vec::new();
    r.stage(&event("org_a", "src_1"), 1, &mut staged);
    // Between the stage and the walk (or two parts of it), the last
    // subscriber of events:src_1 leaves and another channel is taken.
    r.unsubscribe(a, "events:src_1");
    r.subscribe(b, "events:src_2").unwrap();
    let mut got = Vec::new();
    let mut send = takes_all_into(&mut got);
    let mut outcome = Delivered::default();
    r.deliver(&staged[0], 0..2, &mut send, &mut outcome);
    drop(send);
    r.finish(&staged[0]);
    assert!(got.is_empty(), "events:src_1 frame went to {got:?}");
    // Once the walk ended the bit is free again.
    r.subscribe(a, "events:src_3").unwrap();
    assert_eq!(r.orgs[0].channels.held.len(), 0);
    assert!(
        r.orgs[0].channels.free.is_empty(),
        "the held bit was reused"
    );
}

#[test]
fn a_direct_write_past_the_queue_limit_closes_on_a_frame_boundary() {
    let mut r = Registry::new(limits());
    let (a, _) = r.add("org_a", "k", 5).unwrap();
    r.subscribe(a, "events").unwrap();
    let big = big_event();
    let mut send = takes_100_then_blocks();
    // Two big messages in one round: the second, behind the partly
    // written first, passes the 4 KiB limit.
    let mut staged = Vec::new();
    r.stage(&big, 1, &mut staged);
    r.stage(&big, 2, &mut staged);
    let mut outcome = Delivered::default();
    r.deliver(&staged[0], 0..staged[0].positions, &mut send, &mut outcome);
    r.finish(&staged[0]);
    let conn = r.get(a).unwrap();
    assert_eq!(conn.state.close_requested(), Some(CloseCode::SLOW_CONSUMER));
    let queue = conn.send.as_ref().unwrap();
    assert_eq!((queue.frames.len(), queue.front_sent), (1, 100));
    assert_eq!(outcome.blocked, vec![(a, 5)]);
    assert_eq!(r.closing, vec![a]);
}

#[test]
fn one_message_larger_than_the_queue_limit_is_not_a_slow_consumer() {
    let mut r = Registry::new(limits());
    let (a, _) = r.add("org_a", "k", 5).unwrap();
    r.subscribe(a, "events").unwrap();
    let big = big_event();
    let mut send = takes_100_then_blocks();
    publish_with(&mut r, &big, &mut send);
    let conn = r.get(a).unwrap();
    assert_eq!(
        conn.state,
        ConnState::Open,
        "the frame being written is not backlog"
    );
    assert!(conn.queued_bytes() > 4096);
    assert_eq!(conn.backlog_bytes(), 0);
    // A small one fits behind it; another big one does not.
    publish(&mut r, &event("org_a", "s"));
    assert_eq!(r.get(a).unwrap().state, ConnState::Open);
    publish(&mut r, &big);
    assert_eq!(
        r.get(a).unwrap().state.close_requested(),
        Some(CloseCode::SLOW_CONSUMER)
    );
}

#[test]
fn render_is_valid_json_with_data_verbatim() {
    let data = r#"{"n":123456789012345678901234567890,"x":1.000000000000000000001}"#;
    let frame = render_message(MessageKind::Issue, "issues", 42, data);
    let json = &frame[2..];
    let text = std::str::from_utf8(json).unwrap();
    assert!(text.contains("123456789012345678901234567890"));
    let value: serde_json::Value = serde_json::from_str(text).unwrap();
    assert_eq!(value["seq"], 42);
    assert_eq!(value["channel"], "issues");
}

/// The front frame queued to `key`.
fn front(r: &Registry, key: ConnKey) -> Frame {
    r.get(key)
        .and_then(|c| c.send.as_ref())
        .and_then(|q| q.frames.back().cloned())
        .expect("a queued frame")
}

fn compressible_event(pad_bytes: usize) -> Message {
    Message {
        data: format!(
            "{{\"source_id\":\"s\",\"text\":\"{}\"}}",
            "hello world ".repeat(pad_bytes / 12)
        )
        .into(),
        ..event("org_a", "s")
    }
}

#[test]
fn compressing_subscribers_share_one_compressed_frame() {
    let mut r = Registry::new(limits());
    r.enable_compression(128);
    let (a, _) = r.add("org_a", "k1", -1).unwrap();
    let (b, _) = r.add("org_a", "k1", -1).unwrap();
    let (plain, _) = r.add("org_a", "k1", -1).unwrap();
    for key in [a, b, plain] {
        r.subscribe(key, "events").unwrap();
    }
    // No compressing connection yet: nothing is compressed.
    publish(&mut r, &compressible_event(600));
    assert_eq!(r.counters.frames_compressed, 0);
    assert_eq!(front(&r, a)[0] & 0x40, 0);

    r.set_deflate(a, 15);
    r.set_deflate(b, 15);
    publish(&mut r, &compressible_event(600));
    // Once per message and channel with subscribers (`events`, not
    // `events:s`), whatever the number of compressing subscribers.
    assert_eq!(r.counters.frames_compressed, 1);
    let (fa, fb, fp) = (front(&r, a), front(&r, b), front(&r, plain));
    assert!(Rc::ptr_eq(&fa, &fb), "one shared compressed frame");
    assert_eq!(fa[0], 0x80 | 0x40 | 0x1, "FIN, RSV1, text");
    assert_eq!(fp[0], 0x80 | 0x1, "plain frame for the plain subscriber");
    assert!(fa.len() < fp.len());
    assert_eq!(r.counters.delivered_compressed, 2);

    // Under the minimum: plain for everyone.
    publish(&mut r, &event("org_a", "s"));
    assert_eq!(r.counters.frames_compressed, 1);
    assert_eq!(front(&r, a)[0] & 0x40, 0);

    // The compressing connections leave: compression stops.
    r.remove(a);
    r.remove(b);
    publish(&mut r, &compressible_event(600));
    assert_eq!(r.counters.frames_compressed, 1);
}

#[test]
fn a_small_window_gets_the_compressed_frame_only_when_it_covers_the_message() {
    let mut r = Registry::new(limits());
    r.enable_compression(64);
    let (small, _) = r.add("org_a", "k1", -1).unwrap();
    let (full, _) = r.add("org_a", "k1", -1).unwrap();
    r.set_deflate(small, 9);
    r.set_deflate(full, 15);
    r.subscribe(small, "events").unwrap();
    r.subscribe(full, "events").unwrap();
    // A payload under 512 bytes: both get the same compressed frame.
    publish(&mut r, &compressible_event(300));
    assert!(Rc::ptr_eq(&front(&r, small), &front(&r, full)));
    assert_ne!(front(&r, small)[0] & 0x40, 0);
    // Over 512 bytes: the 9-bit window gets the plain frame, no second
    // compression is made.
    publish(&mut r, &compressible_event(2000));
    assert_eq!(front(&r, small)[0] & 0x40, 0);
    assert_ne!(front(&r, full)[0] & 0x40, 0);
    assert_eq!(r.counters.frames_compressed, 2);
}
