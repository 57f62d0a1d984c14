//! A broadcast to more subscribers than one part of the fan-out walk (2,048)
//! is written in parts with yields between them. These tests hold enough
//! idle subscribers for that and check through real sockets that
//! subscriptions replaying history switch to live without gap or duplicate
//! while such walks are in progress, and that connections leaving in the
//! middle of a walk cost nobody else a message.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{event, Client, Received, Server, ServerBuilder, STEP_TIMEOUT};

/// Subscribers beyond one part of the walk, so every broadcast yields.
const BYSTANDERS: usize = 2_600;

/// Opens `count` connections of `org`, each subscribed to `events`.
fn subscribers(addr: std::net::SocketAddr, key: &str, count: usize) -> Vec<Client> {
    let mut clients = Vec::with_capacity(count);
    for _ in 0..count {
        let mut client = Client::connect(addr, &format!("/v1/ws?token={key}"));
        client.send_text(r#"{"type":"subscribe","channel":"events"}"#);
        clients.push(client);
    }
    for client in &mut clients {
        let ack = client.next_json(STEP_TIMEOUT);
        assert_eq!(ack["type"], "subscribed", "{ack}");
    }
    clients
}

/// Reads events until the one whose data id is `sentinel`; returns seqs.
fn events_until(client: &mut Client, sentinel: &str) -> Vec<u64> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.recv(left) {
            Received::Json { value, .. } => {
                assert_eq!(value["channel"], "events", "{value}");
                got.push(value["seq"].as_u64().expect("seq"));
                if value["data"]["id"] == sentinel {
                    return got;
                }
            }
            other => panic!("{other:?} after {} events", got.len()),
        }
    }
}

/// One shard (every broadcast walks the whole org on one core), org
/// `org_big`, no upgrade rate limit for the many subscribers.
fn big_org_server() -> Server {
    ServerBuilder::new()
        .org("org_big")
        .arg("--shards", 1)
        .arg("--upgrades-per-ip-per-sec", 0)
        .start()
}

#[test]
fn replays_switch_to_live_without_gap_or_duplicate_while_big_broadcasts_are_walked() {
    let server = Arc::new(big_org_server());
    let addr = server.ws_addr;
    let key = server.key("org_big").to_string();
    let _bystanders = subscribers(addr, &key, BYSTANDERS);

    let sent: Arc<Mutex<Vec<u64>>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (server, sent, done) = (server.clone(), sent.clone(), done.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !done.load(Ordering::Relaxed) {
                let seqs = server.publish_ok(&event("org_big", &format!("m{i}"), "s1"));
                sent.lock().unwrap().extend(seqs);
                i += 1;
            }
        })
    };
    // Each replaying subscriber is the newest connection, so it sits in the
    // last part of the walk: switching to live while an earlier part is
    // being written would hand it that broadcast a second time. (In runs
    // here the switch always came between two walks: glommio ran the
    // reactor only then. The replay's wait for the walk to end guards the
    // case where it doesn't; this test checks the outcome either way.)
    let mut replays = Vec::new();
    for round in 0..8u64 {
        std::thread::sleep(Duration::from_millis(20 + round * 13));
        let latest = sent.lock().unwrap().last().copied().unwrap_or(0);
        let after = latest.saturating_sub(round % 3);
        let mut client = Client::connect(addr, &format!("/v1/ws?token={key}"));
        client.send_text(&format!(
            r#"{{"type":"subscribe","channel":"events","after":{after}}}"#
        ));
        replays.push((after, client));
    }
    // Publishing goes on until a few broadcasts were walked after the last
    // replay started, and at least 10 in all: counted, not timed, so a
    // loaded machine (each walk slower) tests the same overlap.
    let wanted = (sent.lock().unwrap().len() + 3).max(10);
    let deadline = Instant::now() + Duration::from_secs(60);
    while sent.lock().unwrap().len() < wanted {
        assert!(
            Instant::now() < deadline,
            "the publisher got only {} of {wanted} messages through in 60 s",
            sent.lock().unwrap().len()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    done.store(true, Ordering::Relaxed);
    publisher.join().unwrap();
    let sentinel = server.publish_ok(&event("org_big", "end", "s1"))[0];
    let sent = sent.lock().unwrap().clone();
    for (after, mut client) in replays {
        let ack = client.next_json(STEP_TIMEOUT);
        assert_eq!(ack["type"], "subscribed", "{ack}");
        let got = events_until(&mut client, "end");
        let expected: Vec<u64> = sent
            .iter()
            .copied()
            .filter(|seq| *seq > after)
            .chain([sentinel])
            .collect();
        assert_eq!(got, expected, "subscribed with after={after}");
    }
}

#[test]
fn connections_leaving_during_big_broadcasts_cost_no_one_a_message() {
    let server = Arc::new(big_org_server());
    let addr = server.ws_addr;
    let key = server.key("org_big").to_string();
    let mut clients = subscribers(addr, &key, BYSTANDERS);
    let publisher = {
        let server = server.clone();
        std::thread::spawn(move || {
            let mut seqs = Vec::new();
            for i in 0..30 {
                seqs.extend(server.publish_ok(&event("org_big", &format!("m{i}"), "s1")));
            }
            seqs
        })
    };
    // While those broadcasts are walked, connections from the front leave:
    // their positions are in the first part, the ones a swap would refill
    // with a connection from the last part that is still to be written.
    let mut left = 0;
    while !publisher.is_finished() && left < 1_200 {
        for _ in 0..20 {
            drop(clients.remove(left % 7));
            left += 1;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut seqs = publisher.join().unwrap();
    assert!(
        left >= 100,
        "only {left} connections left during the broadcasts"
    );
    seqs.push(server.publish_ok(&event("org_big", "end", "s1"))[0]);
    // Every connection still open got every message, in order, once.
    for client in clients.iter_mut() {
        assert_eq!(events_until(client, "end"), seqs);
    }
}
