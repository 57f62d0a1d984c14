//! Every limit of the gateway in one place, with its default and the reason
//! for it. Runtime-configurable limits live in `Config`; these are the
//! defaults and the compile-time bounds the configuration is checked against.

/// Largest request head (request line + headers + blank line) we read before
/// answering 431. Browsers send well under 2 KiB; 8 KiB leaves room for long
/// cookies without letting a client park large buffers on us.
pub const HEAD_BYTES_MAX: usize = 8 * 1024;

/// Most headers a request may carry; the parser's header array lives on the
/// stack, so this is also its size.
pub const HEADERS_MAX: usize = 64;

/// Time a client has to send a complete request head.
pub const HEAD_TIMEOUT_MS: u64 = 10_000;

/// Longest a client may go without taking any byte of an HTTP answer
/// (the head timeout's counterpart, on both listeners; an SSE stream's
/// events included): past it the connection is closed. Measured between
/// progress, as nginx's `send_timeout`, so a large answer to a slow but
/// reading client is never cut, while one that stops reading costs its
/// socket and its answer for at most this long.
pub const WRITE_TIMEOUT_MS: u64 = 10_000;

/// Default largest client WebSocket message (after reassembly of fragments).
pub const CLIENT_MESSAGE_BYTES_MAX: usize = 64 * 1024;

/// Whether permessage-deflate is negotiated by default (`--compression`):
/// each message is compressed once, whatever the number of subscribers,
/// and a compressing connection keeps no context, so it costs CPU per
/// message, not per delivery or per connection (docs/benchmarks.md).
pub const COMPRESSION: bool = true;

/// Smallest frame compressed by default (`--compression-min-bytes`):
/// below it deflate saves a few bytes at best (docs/benchmarks.md).
pub const COMPRESSION_MIN_BYTES: usize = 256;

/// Largest control frame payload (RFC 6455 §5.5).
pub const CONTROL_PAYLOAD_BYTES_MAX: usize = 125;

/// Largest server frame header: 2 bytes + 8 bytes extended length + 4 bytes mask.
pub const FRAME_HEADER_BYTES_MAX: usize = 14;

/// Bad client messages in a row before the connection is closed with 1008.
pub const BAD_MESSAGES_IN_A_ROW_MAX: u32 = 20;

/// Default subscriptions per connection.
pub const SUBSCRIPTIONS_PER_CONNECTION_MAX: usize = 256;

/// Default bytes queued to one connection before it is closed with 1013.
pub const SEND_QUEUE_BYTES_MAX: usize = 1024 * 1024;

/// Default largest publish request body.
pub const PUBLISH_BODY_BYTES_MAX: usize = 16 * 1024 * 1024;

/// Default connections per org.
pub const CONNECTIONS_PER_ORG_MAX: usize = 100_000;

/// Default WebSocket upgrades per source address per second (token bucket
/// refill rate; PROTOCOL.md §6). 429 past it.
pub const UPGRADES_PER_IP_PER_SEC: u32 = 200;

/// Default burst of upgrades per source address (token bucket size).
pub const UPGRADE_BURST_PER_IP: u32 = 400;

/// Default failed authentications per source address per minute (also the
/// bucket size). Past it every request of that address needing
/// authentication gets 429 until the bucket refills: guessing costs time, and
/// a client stuck on a revoked key reconnecting in a loop costs little.
pub const AUTH_FAILURES_PER_IP_PER_MIN: u32 = 60;

/// Default waiting HTTP requests (long-polls with `wait_ms`, SSE streams)
/// per source address at once (PROTOCOL.md §6): 429 past it. A page has
/// one or two; this leaves room for many users behind one NAT, while one
/// client can no longer pin thousands of sockets.
pub const HTTP_WAITS_PER_IP: u32 = 256;

/// Default connections per source address on the public listener that
/// are not WebSockets: reading a request head, or plain HTTP (keep-alive,
/// polls, streams). Past it a new one is answered 429 and closed without
/// being read. Bounds what a client without any key can hold; WebSockets
/// are not counted once upgraded.
pub const HTTP_CONNECTIONS_PER_IP: u32 = 256;

/// Source addresses each rate-limit table tracks at once, per shard.
pub const RATE_LIMIT_ADDRESSES_MAX: usize = 65_536;

/// Default lifetime of a browser session cookie: one day.
pub const SESSION_TTL_SECS: u64 = 24 * 60 * 60;

/// Longest session lifetime accepted: one year.
pub const SESSION_TTL_SECS_MAX: u64 = 365 * 24 * 60 * 60;

/// How often each shard writes the last-used times of the keys it saw.
pub const KEY_LAST_USED_FLUSH_MS: u64 = 5_000;

/// Default heartbeat interval.
pub const HEARTBEAT_MS: u64 = 30_000;

/// Largest channel or resource id (`[A-Za-z0-9_.-]{1,128}`).
pub const ID_BYTES_MAX: usize = 128;

/// Largest org id (`[A-Za-z0-9_-]{1,64}`).
pub const ORG_ID_BYTES_MAX: usize = 64;

const _: () = assert!(CLIENT_MESSAGE_BYTES_MAX >= CONTROL_PAYLOAD_BYTES_MAX);
const _: () = assert!(SEND_QUEUE_BYTES_MAX >= CLIENT_MESSAGE_BYTES_MAX);
const _: () = assert!(HEAD_BYTES_MAX >= 1024);
const _: () = assert!(UPGRADE_BURST_PER_IP >= UPGRADES_PER_IP_PER_SEC);
const _: () = assert!(SESSION_TTL_SECS <= SESSION_TTL_SECS_MAX);
