//! Micro-benchmarks of the pure protocol core (issue 2): unmasking next to a
//! plain memcpy of the same size, frame header encoding, and the upgrade
//! path (parse, validate, accept key, 101 answer) on a realistic browser
//! request. Results and the machine they were measured on are recorded in
//! `docs/benchmarks.md`.
//!
//! Run with `cargo bench --bench protocol`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use hookstream::limits::{FRAME_HEADER_BYTES_MAX, HEADERS_MAX, PUBLISH_BODY_BYTES_MAX};
use hookstream::protocol::http::{
    accept_key, parse_head, validate_upgrade, write_switching_protocols,
    SWITCHING_PROTOCOLS_LEN_MAX,
};
use hookstream::protocol::ws::{encode_header, unmask, unmask_bytewise, Opcode};

/// Payload sizes: a short chat message, a typical JSON message, the default
/// client message limit, and a large binary payload.
const UNMASK_SIZES_BYTES: [usize; 4] = [16, 1024, 64 * 1024, 1024 * 1024];

const MASK: [u8; 4] = [0x37, 0xFA, 0x21, 0x3D];

/// What Chrome 126 sends to open a WebSocket, with a token in the query and
/// a session cookie: every credential source the server looks at.
const BROWSER_UPGRADE: &[u8] = b"GET /v1/connect?token=pk_live_3f9a2b HTTP/1.1\r\n\
Host: push.example.com\r\n\
Connection: Upgrade\r\n\
Pragma: no-cache\r\n\
Cache-Control: no-cache\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36\r\n\
Upgrade: websocket\r\n\
Origin: https://app.example.com\r\n\
Sec-WebSocket-Version: 13\r\n\
Accept-Encoding: gzip, deflate, br, zstd\r\n\
Accept-Language: en-US,en;q=0.9\r\n\
Cookie: theme=dark; hs_session=s3ss10n-t0k3n\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n";

/// Unmasking in place, the byte-by-byte reference, and `copy_from_slice`
/// (memcpy) of the same size, in one group so the report shows them side
/// by side in bytes/s.
fn unmasking(c: &mut Criterion) {
    let mut group = c.benchmark_group("unmask");
    for size in UNMASK_SIZES_BYTES {
        group.throughput(Throughput::Bytes(size as u64));
        let source: Vec<u8> = (0..size).map(|index| index as u8).collect();
        let mut buffer = source.clone();
        group.bench_with_input(BenchmarkId::new("unmask", size), &size, |b, _| {
            b.iter(|| unmask(black_box(&mut buffer), black_box(MASK), 0));
        });
        group.bench_with_input(BenchmarkId::new("unmask_bytewise", size), &size, |b, _| {
            b.iter(|| unmask_bytewise(black_box(&mut buffer), black_box(MASK), 0));
        });
        let mut destination = vec![0u8; size];
        group.bench_with_input(BenchmarkId::new("memcpy", size), &size, |b, _| {
            b.iter(|| black_box(&mut destination).copy_from_slice(black_box(&source)));
        });
    }
    group.finish();
}

/// Server frame headers (unmasked) for each of the three length encodings.
fn frame_header_encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame_header_encode");
    for (name, payload_len) in [
        ("7bit_len", 100u64),
        ("16bit_len", 4096),
        ("64bit_len", 1 << 20),
    ] {
        group.bench_function(name, |b| {
            let mut header = [0u8; FRAME_HEADER_BYTES_MAX];
            b.iter(|| {
                encode_header(
                    black_box(&mut header),
                    true,
                    Opcode::Text,
                    black_box(payload_len),
                    None,
                )
            });
        });
    }
    group.finish();
}

/// The whole upgrade path the server runs per new connection, and its
/// parts, on the browser request.
fn upgrade(c: &mut Criterion) {
    let mut group = c.benchmark_group("upgrade");
    group.throughput(Throughput::Bytes(BROWSER_UPGRADE.len() as u64));
    group.bench_function("parse_validate_accept_101", |b| {
        let mut out = [0u8; SWITCHING_PROTOCOLS_LEN_MAX];
        b.iter(|| {
            let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
            let head = parse_head(
                black_box(BROWSER_UPGRADE),
                &mut headers,
                PUBLISH_BODY_BYTES_MAX,
            )
            .expect("valid head")
            .expect("complete head");
            let upgrade = validate_upgrade(&head).expect("valid upgrade");
            write_switching_protocols(black_box(&mut out), upgrade.key)
        });
    });
    group.bench_function("parse_head", |b| {
        b.iter(|| {
            let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
            let head = parse_head(
                black_box(BROWSER_UPGRADE),
                &mut headers,
                PUBLISH_BODY_BYTES_MAX,
            );
            black_box(head.map(|head| head.map(|head| head.head_len)))
        });
    });
    group.bench_function("parse_validate", |b| {
        b.iter(|| {
            let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
            let head = parse_head(
                black_box(BROWSER_UPGRADE),
                &mut headers,
                PUBLISH_BODY_BYTES_MAX,
            )
            .expect("valid head")
            .expect("complete head");
            black_box(validate_upgrade(&head).is_ok())
        });
    });
    group.bench_function("accept_key", |b| {
        b.iter(|| accept_key(black_box(b"dGhlIHNhbXBsZSBub25jZQ==")));
    });
    group.finish();
}

criterion_group! {
    name = benches;
    // Short runs: the whole file takes about a minute and a half, and the
    // figures are stable to a few percent at this length.
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    targets = unmasking, frame_header_encode, upgrade
}
criterion_main!(benches);
