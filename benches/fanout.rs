//! Fan-out of one message over 1,000,000 connection records (issue 6, item 4).
//!
//! One box can open only about 19,900 sockets, so the loopback load generator
//! (`tools/loadgen`) cannot show what the fan-out costs at a million
//! connections. This bench can: it fills one [`Registry`] with 1,000,000
//! records (fd -1, every one subscribed to `events`), then measures one
//! publish (render the frame once, walk the org's connections, bitmask test,
//! queue push of the shared frame) followed by a flush of every dirty
//! connection into a null sink that accepts every byte. Sockets are out of
//! the picture: what remains is the slab walk, the filter and the queues.
//!
//! Criterion reports the time per iteration; with 1,000,000 deliveries per
//! iteration, milliseconds per iteration read directly as nanoseconds per
//! delivery. The bench also prints one `fanout: … ns per delivery` line of
//! its own (mean of a separate timed run) for `tools/bench` to pick up.
//! Target (issue 6): at most 20 ns per delivery.

use std::hint::black_box;
use std::io::IoSlice;
use std::os::unix::io::RawFd;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hookstream::registry::{Connection, Flush, MessageKind, Outgoing, Registry, RegistryLimits};

/// The server's allocator (src/main.rs), so queue allocations cost here what
/// they cost in production.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Connection records in the registry.
const CONNECTIONS: usize = 1_000_000;

/// Bytes of the message's `data` JSON, as in the loopback fan-out scenario.
const PAYLOAD_BYTES: usize = 256;

/// A null sink: every byte offered is taken.
fn null_send(_fd: RawFd, slices: &[IoSlice<'_>]) -> std::io::Result<usize> {
    Ok(slices.iter().map(|s| s.len()).sum())
}

/// A registry holding `CONNECTIONS` records of one org, each subscribed to
/// `events`.
fn registry() -> Registry {
    let mut registry = Registry::new(RegistryLimits {
        connections_per_org: CONNECTIONS,
        connections_max: CONNECTIONS,
        subscriptions_max: 256,
        send_queue_bytes: 1 << 20,
    });
    for _ in 0..CONNECTIONS {
        let (key, _) = registry
            .add("bench", "key_bench", -1)
            .expect("limits are set to fit every record");
        assert_eq!(registry.subscribe(key, "events"), Ok(true));
    }
    registry
}

/// An event whose `data` is exactly `PAYLOAD_BYTES` long.
fn message() -> Outgoing {
    let head = "{\"source_id\":\"s\",\"t\":1,\"pad\":\"";
    let tail = "\"}";
    let pad = "x".repeat(PAYLOAD_BYTES - head.len() - tail.len());
    let data = format!("{head}{pad}{tail}");
    assert_eq!(data.len(), PAYLOAD_BYTES);
    Outgoing {
        org_id: "bench".to_string(),
        kind: MessageKind::Event,
        route_id: Some("s".to_string()),
        data: data.into(),
    }
}

/// One publish and a flush of every connection it made dirty; returns the
/// number of deliveries.
fn publish_and_flush(registry: &mut Registry, message: &Outgoing) -> u64 {
    let delivered_before = registry.counters.delivered;
    registry.publish(message);
    let dirty = registry.take_dirty();
    let mut send = null_send;
    for &index in &dirty {
        let outcome = registry.flush(index, &mut send);
        debug_assert_eq!(outcome, Flush::Drained);
        black_box(outcome);
    }
    registry.return_dirty(dirty);
    registry.counters.delivered - delivered_before
}

fn fanout(c: &mut Criterion) {
    let mut registry = registry();
    let message = message();
    // Warm the queues once so every record holds its steady-state allocation.
    assert_eq!(
        publish_and_flush(&mut registry, &message),
        CONNECTIONS as u64
    );

    let mut group = c.benchmark_group("fanout");
    group.throughput(Throughput::Elements(CONNECTIONS as u64));
    group.sample_size(10);
    group.bench_function("publish_flush_1m_records", |b| {
        b.iter(|| publish_and_flush(&mut registry, black_box(&message)))
    });
    group.finish();

    // A plain timed run, printed in one line that tools/bench reads, with
    // the publish (walk + filter + queue push) and flush (queue drain into
    // the null sink) phases timed apart.
    const ROUNDS: u32 = 20;
    let mut publish_ns = 0u128;
    let mut flush_ns = 0u128;
    let mut delivered = 0u64;
    let mut send = null_send;
    for _ in 0..ROUNDS {
        let before = registry.counters.delivered;
        let start = Instant::now();
        registry.publish(&message);
        let published = Instant::now();
        let dirty = registry.take_dirty();
        for &index in &dirty {
            black_box(registry.flush(index, &mut send));
        }
        registry.return_dirty(dirty);
        flush_ns += published.elapsed().as_nanos();
        publish_ns += (published - start).as_nanos();
        delivered += registry.counters.delivered - before;
    }
    assert_eq!(delivered, CONNECTIONS as u64 * ROUNDS as u64);
    let per = |ns: u128| ns as f64 / delivered as f64;
    println!(
        "fanout: {:.2} ns per delivery (publish {:.2} + flush {:.2}; {} records of {} bytes, {} rounds, {} deliveries)",
        per(publish_ns + flush_ns),
        per(publish_ns),
        per(flush_ns),
        CONNECTIONS,
        std::mem::size_of::<Connection>(),
        ROUNDS,
        delivered
    );
}

criterion_group!(benches, fanout);
criterion_main!(benches);
