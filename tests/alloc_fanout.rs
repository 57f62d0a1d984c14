//! Proves the fan-out's hot path does not allocate: writing a staged
//! broadcast to subscribers whose sockets take the bytes (every idle
//! subscriber) costs no allocation — no queue, no iovec array on the heap,
//! no copy of a frame — and neither does the heartbeat's ping to one.
//! Staging (rendering each frame once) allocates by design and is outside
//! the measured part, as is the registry's setup.
//!
//! Its own test binary because it installs the counting global allocator
//! (tests/counting_alloc); the count is per thread.

mod counting_alloc;

use std::io::IoSlice;
use std::os::unix::io::RawFd;
use std::rc::Rc;

use counting_alloc::allocations_during;
use hookstream::message::{Message, MessageKind};
use hookstream::registry::{ConnKey, Delivered, Registry, RegistryLimits};

/// Subscribers in the registry: more than one walk part of the server, so
/// the walk's prefetching runs ahead of real records.
const SUBSCRIBERS: usize = 1_000;

/// A socket that takes every byte offered, counting them.
fn takes_all(
    taken: &mut usize,
) -> impl FnMut(RawFd, &[IoSlice<'_>]) -> std::io::Result<usize> + '_ {
    move |_fd, slices| {
        let n: usize = slices.iter().map(|s| s.len()).sum();
        *taken += n;
        Ok(n)
    }
}

fn registry() -> (Registry, Vec<ConnKey>) {
    let mut registry = Registry::new(RegistryLimits {
        connections_per_org: SUBSCRIBERS,
        connections_max: SUBSCRIBERS,
        subscriptions_max: 8,
        send_queue_bytes: 1 << 20,
    });
    let mut keys = Vec::new();
    for i in 0..SUBSCRIBERS {
        let (key, _) = registry.add("org_a", "key_a", i as RawFd).expect("fits");
        registry.subscribe(key, "events").expect("fits");
        if i % 2 == 0 {
            registry.subscribe(key, "events:src_1").expect("fits");
        }
        keys.push(key);
    }
    (registry, keys)
}

fn event(seq_hint: usize) -> Message {
    Message {
        org_id: "org_a".to_string(),
        kind: MessageKind::Event,
        route_id: Some("src_1".to_string()),
        data: format!("{{\"source_id\":\"src_1\",\"n\":{seq_hint}}}").into(),
        idempotency_key: None,
    }
}

#[test]
fn delivering_to_subscribers_that_take_the_bytes_allocates_nothing() {
    let (mut registry, keys) = registry();
    // Two messages in one round: three frames per even subscriber, two per
    // odd one, each subscriber's in one vectored write.
    let mut staged = Vec::new();
    registry.stage(&event(1), 1, &mut staged);
    registry.stage(&event(2), 2, &mut staged);
    assert_eq!(staged.len(), 1);
    let broadcast = &staged[0];
    let mut outcome = Delivered::default();
    let mut taken = 0usize;
    let delivered_before = registry.counters.delivered;

    let ((), allocations) = allocations_during(|| {
        let mut wire = takes_all(&mut taken);
        // In the server's parts (256 positions), as `Shard::deliver` walks.
        let mut from = 0;
        while from < broadcast.positions {
            let to = (from + 256).min(broadcast.positions);
            registry.deliver(broadcast, from..to, &mut wire, &mut outcome);
            from = to;
        }
        registry.finish(broadcast);
    });

    assert_eq!(allocations, 0, "the walk allocated");
    let deliveries = registry.counters.delivered - delivered_before;
    assert_eq!(deliveries, (SUBSCRIBERS * 2 + SUBSCRIBERS / 2 * 2) as u64);
    assert!(taken > 0);
    assert!(outcome.blocked.is_empty() && outcome.failed.is_empty());
    for key in keys {
        let conn = registry.get(key).expect("still there");
        assert!(
            conn.queue_is_empty(),
            "nothing queued for a socket that took it all"
        );
    }
}

#[test]
fn a_heartbeat_ping_to_a_socket_that_takes_it_allocates_nothing() {
    let (mut registry, keys) = registry();
    let ping: hookstream::message::Frame = Rc::from(&[0x89u8, 0x00][..]);
    let mut outcome = Delivered::default();
    let mut taken = 0usize;
    let ((), allocations) = allocations_during(|| {
        let mut wire = takes_all(&mut taken);
        registry.for_each_in_slice(0, 1, |registry, key| {
            registry.write_or_queue(key, &ping, &mut wire, &mut outcome);
        });
    });
    assert_eq!(allocations, 0, "the pings allocated");
    assert_eq!(taken, 2 * keys.len());
    assert!(outcome.blocked.is_empty() && outcome.failed.is_empty());
}

#[test]
fn the_counter_sees_a_queue_for_a_socket_that_refuses() {
    // The same walk against a socket that takes nothing must allocate (the
    // queue): the zero above is not the counter missing allocations.
    let (mut registry, _) = registry();
    let mut staged = Vec::new();
    registry.stage(&event(1), 1, &mut staged);
    let mut outcome = Delivered::default();
    let mut refuse = |_fd: RawFd, _slices: &[IoSlice<'_>]| -> std::io::Result<usize> {
        Err(std::io::ErrorKind::WouldBlock.into())
    };
    let ((), allocations) = allocations_during(|| {
        registry.deliver(
            &staged[0],
            0..staged[0].positions,
            &mut refuse,
            &mut outcome,
        );
    });
    registry.finish(&staged[0]);
    assert!(allocations >= SUBSCRIBERS, "{allocations} allocations");
    assert_eq!(outcome.blocked.len(), SUBSCRIBERS);
}

/// With permessage-deflate, the cost of compression is per message, not
/// per subscriber: staging a message for an org whose every subscriber
/// compresses allocates the same whether it has 10 subscribers or 1,000
/// (the frame, its compressed twin, the compressor's buffers), and writing
/// the shared compressed frame to subscribers that take the bytes allocates
/// nothing.
#[test]
fn compression_costs_per_message_not_per_subscriber() {
    let big = |n: usize| Message {
        data: format!(
            "{{\"source_id\":\"src_1\",\"n\":{n},\"text\":\"{}\"}}",
            "a webhook body with repeated words ".repeat(20)
        )
        .into(),
        ..event(n)
    };
    let stage_allocations = |subscribers: usize| {
        let mut registry = Registry::new(RegistryLimits {
            connections_per_org: subscribers,
            connections_max: subscribers,
            subscriptions_max: 8,
            send_queue_bytes: 1 << 20,
        });
        registry.enable_compression(256);
        for i in 0..subscribers {
            let (key, _) = registry.add("org_a", "key_a", i as RawFd).expect("fits");
            registry.set_deflate(key, 15);
            registry.subscribe(key, "events").expect("fits");
        }
        // Warm the compressor (made on first use) and its buffer.
        let mut staged = Vec::new();
        registry.stage(&big(1), 1, &mut staged);
        let mut outcome = Delivered::default();
        let mut taken = 0usize;
        registry.deliver(
            &staged[0],
            0..staged[0].positions,
            &mut takes_all(&mut taken),
            &mut outcome,
        );
        registry.finish(&staged[0]);
        staged.clear();

        let ((), staging) = allocations_during(|| registry.stage(&big(2), 2, &mut staged));
        let compressed_before = registry.counters.delivered_compressed;
        let ((), delivering) = allocations_during(|| {
            let mut wire = takes_all(&mut taken);
            registry.deliver(&staged[0], 0..staged[0].positions, &mut wire, &mut outcome);
        });
        registry.finish(&staged[0]);
        assert_eq!(
            registry.counters.delivered_compressed - compressed_before,
            subscribers as u64
        );
        assert_eq!(registry.counters.frames_compressed, 2);
        (staging, delivering)
    };
    let (staging_10, delivering_10) = stage_allocations(10);
    let (staging_1000, delivering_1000) = stage_allocations(1_000);
    assert_eq!(staging_10, staging_1000, "staging allocates per message");
    assert_eq!(delivering_10, 0);
    assert_eq!(delivering_1000, 0);
}
