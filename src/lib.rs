//! hookstream: a self-hosted real-time push gateway. The external contract
//! is `PROTOCOL.md` (copied from the project's shared contract); the design
//! is `docs/ARCHITECTURE.md`.
//!
//! # Layout
//!
//! - [`limits`]: every limit and default in one place, with compile-time
//!   checks of how they relate.
//! - [`config`]: the command line, `HOOKSTREAM_*` environment and TOML file,
//!   merged into one validated `Config`.
//! - [`protocol`]: pure parsers and writers, no I/O: the HTTP/1.1 request
//!   head and WebSocket upgrade (`protocol::http`), chunked request bodies
//!   (`protocol::chunked`), and the RFC 6455 frame codec (`protocol::ws`).
//!   Fuzzed and property-tested.
//! - [`registry`]: one shard's connections (slab of compact records with
//!   generation-checked keys), per-org channel tables (names interned to
//!   bits), send queues of shared pre-rendered frames, and the fan-out. No
//!   runtime, so it is benchable over a million records.
//! - [`subscriptions`]: a connection's set of channel bits, two words
//!   whatever the org's channel count (one inline word for bits 0–63, a
//!   sorted list above).
//! - [`publish`]: parsing and all-or-nothing validation of publish bodies,
//!   keeping `data` as the publisher's own bytes.
//! - [`auth`]: the API key store (hashes only, atomic writes under a lock),
//!   the admin token, and signed session cookies.
//! - [`shard`]: the glommio runtime: one pinned executor per CPU with its own
//!   listeners (SO_REUSEPORT); socket handoff to the org's owner shard through
//!   per-shard inboxes (mutex queue + eventfd); an epoll reactor per shard
//!   instead of a task per connection (hibernation: an idle connection is its
//!   slab record); request authentication, origin rule and per-IP limits;
//!   the plain-HTTP routes (sessions, polling, SSE, dashboard); heartbeat,
//!   key reload, graceful drain.
//! - [`history`]: message history: a checksummed, segmented log per org on
//!   disk, group commit (one fsync per round), the in-memory index,
//!   retention, and the reads behind `subscribe` with `after`, polling, SSE.
//! - [`metrics`]: per-shard counters and their Prometheus rendering.
//! - [`demo`]: `serve --demo`: a demo org, key and synthetic traffic.

pub mod auth;
pub mod config;
pub mod demo;
pub mod history;
pub mod limits;
pub mod metrics;
pub mod protocol;
pub mod publish;
pub mod registry;
pub mod shard;
pub mod subscriptions;
