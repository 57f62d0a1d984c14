//! Chooses the permessage-deflate library and settings by measurement
//! (issue 17): for each sample object (`assets/samples`, the same as
//! `../shared/samples`), rendered into the frame the server sends
//! (`{"type","channel","seq","data"}`), it prints the plain and compressed
//! frame sizes — the bytes on the wire per delivery — and the time to
//! compress (once per message) and to inflate, for:
//!
//! - flate2 with the zlib-rs backend (what the server uses: its own
//!   `protocol::deflate::Deflater`, raw deflate, sync flush, tail removed),
//!   at levels 1, 6 and 9;
//! - miniz_oxide (flate2's default backend), raw deflate, level 6;
//! - libdeflater (libdeflate, whole-buffer only), raw deflate, level 6.
//!
//! ```sh
//! cargo run --release --example deflate_bench
//! ```

use std::hint::black_box;
use std::time::Instant;

use flate2::{Compress, Compression, FlushCompress};
use hookstream::message::{render_message, MessageKind};
use hookstream::protocol::deflate::{Deflater, Inflater};

/// Nanoseconds per call of `f`, the median of 7 rounds of `iterations`.
fn time_ns(iterations: u32, mut f: impl FnMut()) -> f64 {
    let mut rounds: Vec<f64> = (0..7)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..iterations {
                f();
            }
            start.elapsed().as_nanos() as f64 / f64::from(iterations)
        })
        .collect();
    rounds.sort_by(|a, b| a.partial_cmp(b).unwrap());
    rounds[3]
}

fn flate2_zlib_rs(level: u32, payload: &[u8]) -> Vec<u8> {
    let mut compress = Compress::new(Compression::new(level), false);
    let mut out = Vec::with_capacity(payload.len() + 64);
    compress
        .compress_vec(payload, &mut out, FlushCompress::Sync)
        .unwrap();
    out.truncate(out.len() - 4);
    out
}

fn main() {
    let samples = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/samples");
    let cases = [
        ("event", MessageKind::Event, "events"),
        ("delivery", MessageKind::Delivery, "deliveries"),
        ("issue", MessageKind::Issue, "issues"),
        ("sync", MessageKind::Sync, "collections:col_1"),
    ];
    println!("| sample | plain frame B | library (level) | compressed frame B | saved | compress ns | inflate ns |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (name, kind, channel) in cases {
        let data = std::fs::read_to_string(format!("{samples}/{name}.json")).unwrap();
        let data = data.trim();
        let frame = render_message(kind, channel, 1_041_234, data);
        let header = frame.len() - (frame.len() - if frame[1] & 0x7f == 126 { 4 } else { 2 });
        let payload = &frame[header..];
        let row = |library: &str, compressed_payload: usize, compress_ns: f64, inflate_ns: f64| {
            // The compressed frame's header: 2 bytes below 126, else 4.
            let frame_bytes = compressed_payload + if compressed_payload < 126 { 2 } else { 4 };
            println!(
                "| {name} | {} | {library} | {frame_bytes} | {:.0}% | {compress_ns:.0} | {inflate_ns:.0} |",
                frame.len(),
                100.0 * (1.0 - frame_bytes as f64 / frame.len() as f64)
            );
        };

        // The server's own compressor (zlib-rs, level 6) and inflater.
        let mut deflater = Deflater::new();
        let mut inflater = Inflater::new();
        let ours = deflater
            .compress(payload)
            .map(<[u8]>::to_vec)
            .unwrap_or_default();
        let compress_ns = time_ns(2000, || {
            black_box(deflater.compress(black_box(payload)));
        });
        let inflate_ns = time_ns(2000, || {
            black_box(inflater.inflate(black_box(&ours), 1 << 16).unwrap());
        });
        assert_eq!(inflater.inflate(&ours, 1 << 16).unwrap(), payload);
        row(
            "flate2 + zlib-rs (6), server's Deflater",
            ours.len(),
            compress_ns,
            inflate_ns,
        );

        for level in [1, 9] {
            let out = flate2_zlib_rs(level, payload);
            let ns = time_ns(2000, || {
                black_box(flate2_zlib_rs(level, black_box(payload)));
            });
            row(
                &format!("flate2 + zlib-rs ({level})"),
                out.len(),
                ns,
                f64::NAN,
            );
        }

        let out = miniz_oxide::deflate::compress_to_vec(payload, 6);
        let ns = time_ns(2000, || {
            black_box(miniz_oxide::deflate::compress_to_vec(black_box(payload), 6));
        });
        let inflate_ns = time_ns(2000, || {
            black_box(miniz_oxide::inflate::decompress_to_vec(black_box(&out)).unwrap());
        });
        row("miniz_oxide (6)", out.len(), ns, inflate_ns);

        let mut compressor =
            libdeflater::Compressor::new(libdeflater::CompressionLvl::new(6).unwrap());
        let mut decompressor = libdeflater::Decompressor::new();
        let mut out = vec![0u8; compressor.deflate_compress_bound(payload.len())];
        let len = compressor.deflate_compress(payload, &mut out).unwrap();
        let ns = time_ns(2000, || {
            black_box(
                compressor
                    .deflate_compress(black_box(payload), &mut out)
                    .unwrap(),
            );
        });
        let compressed = out[..len].to_vec();
        let mut inflated = vec![0u8; payload.len()];
        let inflate_ns = time_ns(2000, || {
            black_box(
                decompressor
                    .deflate_decompress(black_box(&compressed), &mut inflated)
                    .unwrap(),
            );
        });
        row("libdeflater (6)", len, ns, inflate_ns);
    }

    // The smallest frame worth compressing: every sample cut to its first
    // k fields (keys in sorted order), so frames from ~60 to ~550 bytes of
    // the same kinds of JSON, smallest first.
    println!();
    println!("| sample, fields | frame B | compressed frame B | saved B | compress ns |");
    println!("| --- | --- | --- | --- | --- |");
    let mut deflater = Deflater::new();
    let mut rows = Vec::new();
    for (name, kind, channel) in cases {
        let text = std::fs::read_to_string(format!("{samples}/{name}.json")).unwrap();
        let fields: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&text).unwrap();
        for k in 1..=fields.len() {
            let data: serde_json::Map<String, serde_json::Value> = fields
                .iter()
                .take(k)
                .map(|(a, b)| (a.clone(), b.clone()))
                .collect();
            let data = serde_json::Value::Object(data).to_string();
            let frame = render_message(kind, channel, 1_041_234, &data);
            let compressed = deflater
                .compress_frame(&frame)
                .map_or(frame.len(), |c| c.len());
            let ns = time_ns(500, || {
                black_box(deflater.compress_frame(black_box(&frame)));
            });
            rows.push((frame.len(), format!("{name}, {k}"), compressed, ns));
        }
    }
    rows.sort_by_key(|r| r.0);
    for (frame_bytes, label, compressed, ns) in rows {
        println!(
            "| {label} | {frame_bytes} | {compressed} | {} | {ns:.0} |",
            frame_bytes as i64 - compressed as i64
        );
    }
}
