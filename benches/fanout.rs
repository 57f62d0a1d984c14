//! Fan-out of one message over 1,000,000 connection records (issue 6, item 4).
//!
//! One box can open only about 19,900 sockets, so the loopback load generator
//! (`tools/loadgen`) cannot show what the fan-out costs at a million
//! connections. This bench can: it fills one [`Registry`] with 1,000,000
//! records (fd -1, every one subscribed to `events`), then measures one
//! broadcast as the server makes it: stage (render the frame once), then
//! deliver (walk the org's connections, bitmask test, one vectored write of
//! the shared frame per subscriber) into a null sink that accepts every
//! byte. Sockets are out of the picture: what remains is the walk, the
//! filter and the write bookkeeping. (A socket that refuses bytes gets the
//! rest queued; the null sink never refuses, as an idle subscriber's socket
//! with room in its buffer doesn't.)
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
use hookstream::message::{render_frame, Frame, Message, MessageKind};
use hookstream::protocol::ws::{encode_header, Opcode};
use hookstream::registry::{Connection, Delivered, Registry, RegistryLimits};

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
fn message() -> Message {
    let head = "{\"source_id\":\"s\",\"t\":1,\"pad\":\"";
    let tail = "\"}";
    let pad = "x".repeat(PAYLOAD_BYTES - head.len() - tail.len());
    let data = format!("{head}{pad}{tail}");
    assert_eq!(data.len(), PAYLOAD_BYTES);
    Message {
        org_id: "bench".to_string(),
        kind: MessageKind::Event,
        route_id: Some("s".to_string()),
        data: data.into(),
        idempotency_key: None,
    }
}

/// One broadcast of `message` as the next seq, staged and delivered in the
/// parts the server walks it in; returns the time staging took and the
/// number of deliveries.
fn broadcast(registry: &mut Registry, message: &Message) -> (std::time::Duration, u64) {
    const PART: usize = 2048;
    let delivered_before = registry.counters.delivered;
    let start = Instant::now();
    let seq = registry.org_seq("bench") + 1;
    let mut staged = Vec::new();
    registry.stage(message, seq, &mut staged);
    let staging = start.elapsed();
    let mut outcome = Delivered::default();
    let mut send = null_send;
    for b in &staged {
        let mut from = 0;
        while from < b.positions {
            let to = (from + PART).min(b.positions);
            registry.deliver(b, from..to, &mut send, &mut outcome);
            from = to;
        }
        registry.finish(b);
    }
    debug_assert!(outcome.blocked.is_empty() && outcome.failed.is_empty());
    black_box(&outcome);
    (staging, registry.counters.delivered - delivered_before)
}

fn fanout(c: &mut Criterion) {
    let mut registry = registry();
    let message = message();
    assert_eq!(broadcast(&mut registry, &message).1, CONNECTIONS as u64);

    let mut group = c.benchmark_group("fanout");
    group.throughput(Throughput::Elements(CONNECTIONS as u64));
    group.sample_size(10);
    group.bench_function("broadcast_1m_records", |b| {
        b.iter(|| broadcast(&mut registry, black_box(&message)))
    });
    group.finish();

    // A plain timed run, printed in one line that tools/bench reads, with
    // staging (render once) and delivery (walk, filter, write) timed apart.
    const ROUNDS: u32 = 20;
    let mut stage_ns = 0u128;
    let mut total_ns = 0u128;
    let mut delivered = 0u64;
    for _ in 0..ROUNDS {
        let start = Instant::now();
        let (staging, count) = broadcast(&mut registry, &message);
        total_ns += start.elapsed().as_nanos();
        stage_ns += staging.as_nanos();
        delivered += count;
    }
    assert_eq!(delivered, CONNECTIONS as u64 * ROUNDS as u64);
    let per = |ns: u128| ns as f64 / delivered as f64;
    println!(
        "fanout: {:.2} ns per delivery (stage {:.2} + deliver {:.2}; {} records of {} bytes, {} rounds, {} deliveries)",
        per(total_ns),
        per(stage_ns),
        per(total_ns - stage_ns),
        CONNECTIONS,
        std::mem::size_of::<Connection>(),
        ROUNDS,
        delivered
    );
}

/// Staging alone: one event with a route id, rendered for its two target
/// channels (`events`, `events:s`), both with subscribers — what the
/// committer does per message before any walk (finding the target
/// channels, rendering each frame once, sharing it).
fn stage(c: &mut Criterion) {
    let mut registry = Registry::new(RegistryLimits {
        connections_per_org: 16,
        connections_max: 16,
        subscriptions_max: 4,
        send_queue_bytes: 1 << 20,
    });
    let (key, _) = registry.add("bench", "key_bench", -1).expect("fits");
    assert_eq!(registry.subscribe(key, "events"), Ok(true));
    assert_eq!(registry.subscribe(key, "events:s"), Ok(true));
    let message = message();
    let mut group = c.benchmark_group("stage");
    group.throughput(Throughput::Elements(1));
    group.bench_function("event_two_channels_256b", |b| {
        b.iter(|| {
            let seq = registry.org_seq("bench") + 1;
            let mut staged = Vec::with_capacity(1);
            registry.stage(black_box(&message), seq, &mut staged);
            for broadcast in &staged {
                registry.finish(broadcast);
            }
            black_box(staged)
        })
    });
    group.finish();
}

/// How staging rendered before issue 12, kept here as the reference the
/// `render` group compares against in the same run: the target channel
/// names built as `String`s, then per channel the JSON in one `Vec`, the
/// frame in a second, and a copy of it into the shared `Rc<[u8]>`.
fn render_before(message: &Message, seq: u64) -> Vec<Frame> {
    let mut names: Vec<String> = vec!["events".to_string()];
    if let Some(id) = &message.route_id {
        names.push(format!("events:{id}"));
    }
    let mut frames = Vec::with_capacity(2);
    for channel in &names {
        let mut json = Vec::with_capacity(64 + channel.len() + message.data.len());
        json.extend_from_slice(b"{\"type\":\"event\",\"channel\":\"");
        json.extend_from_slice(channel.as_bytes());
        json.extend_from_slice(b"\",\"seq\":");
        json.extend_from_slice(seq.to_string().as_bytes());
        json.extend_from_slice(b",\"data\":");
        json.extend_from_slice(message.data.as_bytes());
        json.push(b'}');
        let mut header = [0u8; 14];
        let header_len = encode_header(&mut header, true, Opcode::Text, json.len() as u64, None);
        let mut frame = Vec::with_capacity(header_len + json.len());
        frame.extend_from_slice(&header[..header_len]);
        frame.extend_from_slice(&json);
        frames.push(Frame::from(frame));
    }
    frames
}

/// The render step of staging, before and after issue 12, side by side in
/// one run (the machine is shared: only a same-run comparison means much).
fn render(c: &mut Criterion) {
    let message = message();
    let now = |seq| {
        let mut frames = Vec::with_capacity(2);
        message.for_each_channel(|channel| {
            frames.push(render_frame(message.kind, channel, seq, &message.data))
        });
        frames
    };
    assert_eq!(render_before(&message, 77), now(77));
    let mut group = c.benchmark_group("render");
    group.throughput(Throughput::Elements(2));
    group.bench_function("before_strings_vec_vec_rc", |b| {
        b.iter(|| render_before(black_box(&message), black_box(12_345)))
    });
    group.bench_function("now_one_allocation_per_frame", |b| {
        b.iter(|| now(black_box(12_345)))
    });
    group.finish();
}

criterion_group!(benches, fanout, stage, render);
criterion_main!(benches);
