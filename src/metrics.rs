//! Per-shard counters, written by their own shard only (relaxed atomics, so
//! another shard's `/metrics` request can read them without locks), and the
//! Prometheus text rendering of all shards.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Why a handshake (request head or upgrade) failed; one counter each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum HandshakeFailure {
    /// Malformed head or upgrade (400).
    BadRequest,
    /// No or unknown credentials (401).
    Unauthorized,
    /// Cookie from an origin that is not allowed (403).
    Forbidden,
    /// Unknown path (404).
    NotFound,
    /// Wrong method (405).
    MethodNotAllowed,
    /// Head not complete in time (408 or silent close).
    Timeout,
    /// Head or body too large (413, 431).
    TooLarge,
    /// Wrong WebSocket version (426).
    Version,
    /// Upgrade rate limit (429).
    RateLimited,
    /// Org or server connection cap (503).
    Capacity,
    /// Anything else (411, 505, I/O errors).
    Other,
}

impl HandshakeFailure {
    /// Every reason, in label order.
    pub const ALL: [HandshakeFailure; 11] = [
        HandshakeFailure::BadRequest,
        HandshakeFailure::Unauthorized,
        HandshakeFailure::Forbidden,
        HandshakeFailure::NotFound,
        HandshakeFailure::MethodNotAllowed,
        HandshakeFailure::Timeout,
        HandshakeFailure::TooLarge,
        HandshakeFailure::Version,
        HandshakeFailure::RateLimited,
        HandshakeFailure::Capacity,
        HandshakeFailure::Other,
    ];

    /// The `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            HandshakeFailure::BadRequest => "bad_request",
            HandshakeFailure::Unauthorized => "unauthorized",
            HandshakeFailure::Forbidden => "forbidden",
            HandshakeFailure::NotFound => "not_found",
            HandshakeFailure::MethodNotAllowed => "method_not_allowed",
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::TooLarge => "too_large",
            HandshakeFailure::Version => "version",
            HandshakeFailure::RateLimited => "rate_limited",
            HandshakeFailure::Capacity => "capacity",
            HandshakeFailure::Other => "other",
        }
    }

    /// The reason for an HTTP status we answered a handshake with.
    pub fn from_status(status: u16) -> HandshakeFailure {
        match status {
            400 => HandshakeFailure::BadRequest,
            401 => HandshakeFailure::Unauthorized,
            403 => HandshakeFailure::Forbidden,
            404 => HandshakeFailure::NotFound,
            405 => HandshakeFailure::MethodNotAllowed,
            408 => HandshakeFailure::Timeout,
            413 | 431 => HandshakeFailure::TooLarge,
            426 => HandshakeFailure::Version,
            429 => HandshakeFailure::RateLimited,
            503 => HandshakeFailure::Capacity,
            _ => HandshakeFailure::Other,
        }
    }
}

/// Why a TLS connection was closed without being served; one counter each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum TlsFailure {
    /// Plain HTTP (or anything not a TLS handshake) on a TLS port.
    PlainHttp,
    /// A ClientHello nobody can agree with, or a bad handshake message.
    Handshake,
    /// The handshake did not finish within 10 s.
    Timeout,
    /// The client left during the handshake.
    Eof,
    /// A forged, truncated or unexpected record after the handshake.
    BadRecord,
    /// Bytes after the client's close_notify.
    AfterCloseNotify,
    /// Too many handshakes in flight on the shard (a ClientHello flood).
    Busy,
}

impl TlsFailure {
    /// Every reason, in label order.
    pub const ALL: [TlsFailure; 7] = [
        TlsFailure::PlainHttp,
        TlsFailure::Handshake,
        TlsFailure::Timeout,
        TlsFailure::Eof,
        TlsFailure::BadRecord,
        TlsFailure::AfterCloseNotify,
        TlsFailure::Busy,
    ];

    /// The `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            TlsFailure::PlainHttp => "plain_http",
            TlsFailure::Handshake => "handshake",
            TlsFailure::Timeout => "timeout",
            TlsFailure::Eof => "eof",
            TlsFailure::BadRecord => "bad_record",
            TlsFailure::AfterCloseNotify => "after_close_notify",
            TlsFailure::Busy => "busy",
        }
    }
}

/// One shard's counters.
#[derive(Debug, Default)]
pub struct ShardMetrics {
    /// Open WebSocket connections owned by the shard.
    pub connections: AtomicU64,
    /// Messages given a seq on this shard.
    pub published: AtomicU64,
    /// Frames queued to subscribers.
    pub delivered: AtomicU64,
    /// Bytes written to WebSocket sockets.
    pub bytes_sent: AtomicU64,
    /// Vectored send calls.
    pub sends: AtomicU64,
    /// Frames compressed for permessage-deflate (once per message and
    /// channel, shared by every compressing subscriber).
    pub frames_compressed: AtomicU64,
    /// Deliveries that were a compressed frame.
    pub delivered_compressed: AtomicU64,
    /// Connections closed with 1013.
    pub slow_consumer_closes: AtomicU64,
    /// Completed upgrades.
    pub upgrades: AtomicU64,
    /// Failed handshakes, by [`HandshakeFailure`].
    pub handshake_failures: [AtomicU64; 11],
    /// Completed TLS handshakes: `[full, resumed]`.
    pub tls_handshakes: [AtomicU64; 2],
    /// TLS connections closed without being served, by [`TlsFailure`].
    pub tls_failures: [AtomicU64; 7],
    /// History commit rounds (group commits).
    pub history_commits: AtomicU64,
    /// History `fdatasync` calls.
    pub history_fsyncs: AtomicU64,
    /// Bytes appended to the history log.
    pub history_bytes_written: AtomicU64,
}

impl ShardMetrics {
    /// Counts one completed TLS handshake.
    pub fn tls_handshake_done(&self, resumed: bool) {
        self.tls_handshakes[resumed as usize].fetch_add(1, Relaxed);
    }

    /// Counts one TLS connection closed without being served.
    pub fn tls_failed(&self, reason: TlsFailure) {
        self.tls_failures[reason as usize].fetch_add(1, Relaxed);
    }

    /// Counts one failed handshake.
    pub fn handshake_failed(&self, reason: HandshakeFailure) {
        self.handshake_failures[reason as usize].fetch_add(1, Relaxed);
    }
}

/// Renders every shard's counters in the Prometheus text format.
pub fn render(shards: &[std::sync::Arc<ShardMetrics>]) -> String {
    let mut out = String::with_capacity(2048);
    type Field = fn(&ShardMetrics) -> &AtomicU64;
    let simple: [(&str, &str, &str, Field); 12] = [
        (
            "hookstream_connections",
            "gauge",
            "Open WebSocket connections.",
            |m| &m.connections,
        ),
        (
            "hookstream_messages_published_total",
            "counter",
            "Messages given a seq.",
            |m| &m.published,
        ),
        (
            "hookstream_messages_delivered_total",
            "counter",
            "Frames queued to subscribers.",
            |m| &m.delivered,
        ),
        (
            "hookstream_bytes_sent_total",
            "counter",
            "Bytes written to WebSocket sockets.",
            |m| &m.bytes_sent,
        ),
        (
            "hookstream_sends_total",
            "counter",
            "Vectored socket send calls.",
            |m| &m.sends,
        ),
        (
            "hookstream_frames_compressed_total",
            "counter",
            "Frames compressed for permessage-deflate, once per message and channel.",
            |m| &m.frames_compressed,
        ),
        (
            "hookstream_messages_delivered_compressed_total",
            "counter",
            "Deliveries that were a permessage-deflate compressed frame.",
            |m| &m.delivered_compressed,
        ),
        (
            "hookstream_slow_consumer_closes_total",
            "counter",
            "Connections closed with 1013.",
            |m| &m.slow_consumer_closes,
        ),
        (
            "hookstream_upgrades_total",
            "counter",
            "Completed WebSocket upgrades.",
            |m| &m.upgrades,
        ),
        (
            "hookstream_history_commits_total",
            "counter",
            "History group commits (one write per org, then the fsyncs).",
            |m| &m.history_commits,
        ),
        (
            "hookstream_history_fsyncs_total",
            "counter",
            "History fdatasync calls.",
            |m| &m.history_fsyncs,
        ),
        (
            "hookstream_history_bytes_written_total",
            "counter",
            "Bytes appended to the history log.",
            |m| &m.history_bytes_written,
        ),
    ];
    for (name, kind, help, field) in simple {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (shard, metrics) in shards.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}{{shard=\"{shard}\"}} {}",
                field(metrics).load(Relaxed)
            );
        }
    }
    let name = "hookstream_handshake_failures_total";
    let _ = writeln!(
        out,
        "# HELP {name} Refused handshakes by reason.\n# TYPE {name} counter"
    );
    for (shard, metrics) in shards.iter().enumerate() {
        for reason in HandshakeFailure::ALL {
            let _ = writeln!(
                out,
                "{name}{{shard=\"{shard}\",reason=\"{}\"}} {}",
                reason.label(),
                metrics.handshake_failures[reason as usize].load(Relaxed)
            );
        }
    }
    let name = "hookstream_tls_handshakes_total";
    let _ = writeln!(
        out,
        "# HELP {name} Completed TLS handshakes, full or resumed.\n# TYPE {name} counter"
    );
    for (shard, metrics) in shards.iter().enumerate() {
        for (index, resumed) in ["false", "true"].into_iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}{{shard=\"{shard}\",resumed=\"{resumed}\"}} {}",
                metrics.tls_handshakes[index].load(Relaxed)
            );
        }
    }
    let name = "hookstream_tls_failures_total";
    let _ = writeln!(
        out,
        "# HELP {name} TLS connections closed without being served, by reason.\n# TYPE {name} counter"
    );
    for (shard, metrics) in shards.iter().enumerate() {
        for reason in TlsFailure::ALL {
            let _ = writeln!(
                out,
                "{name}{{shard=\"{shard}\",reason=\"{}\"}} {}",
                reason.label(),
                metrics.tls_failures[reason as usize].load(Relaxed)
            );
        }
    }
    out
}
