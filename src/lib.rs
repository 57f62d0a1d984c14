//! hookstream: a self-hosted real-time push gateway. The external contract
//! is `PROTOCOL.md` (copied from the project's shared contract); the design
//! is `docs/ARCHITECTURE.md`.
//!
//! # Layout
//!
//! From the leaves up (docs/ARCHITECTURE.md has the module map of who uses
//! whom, checked by `tests/module_map.rs`):
//!
//! - [`limits`]: every limit and default in one place, with compile-time
//!   checks of how they relate; [`log`]: the log lines on stderr (text,
//!   or one JSON object per line).
//! - [`notify`]: a generation counter with wakers, the wake-up every shard
//!   task waits on; [`placement`]: which shard owns an org (a fixed hash).
//! - [`shutdown`]: a shard's one shutdown signal, held by every task.
//! - [`protocol`]: pure parsers and writers, no I/O: the HTTP/1.1 request
//!   head and WebSocket upgrade (`protocol::http`), chunked request bodies
//!   (`protocol::chunked`), the RFC 6455 frame codec (`protocol::ws`,
//!   with `CloseCode`), and permessage-deflate (`protocol::deflate`: its
//!   negotiation, the shard's one compressor and one inflater). Fuzzed and
//!   property-tested.
//! - [`message`]: what a message is: its kinds, which channels it targets,
//!   valid channel names and ids, and its rendering for subscribers (once,
//!   into one shared frame).
//! - [`auth`]: the API key store (hashes only, atomic writes under a lock),
//!   the admin token, signed session cookies and signed-out sessions.
//! - [`subscriptions`]: a connection's set of channel bits, two words
//!   whatever the org's channel count (one inline word for bits 0–63, a
//!   sorted list above).
//! - [`publish`]: parsing and all-or-nothing validation of publish bodies,
//!   keeping `data` as the publisher's own bytes.
//! - [`config`]: the command line, `HOOKSTREAM_*` environment and TOML file,
//!   merged into one validated `Config`.
//! - [`registry`]: one shard's connections (slab of compact records with
//!   generation-checked keys and one `ConnState`), per-org channel tables
//!   (names interned to bits), the fan-out, and the write seam (`Wire`)
//!   with the send queues behind it. No runtime, so it is benchable over a
//!   million records.
//! - [`history`]: message history: group commit in front of the log seam
//!   (`history::log::Log`: append a round, read by org and channel,
//!   retention), the local segmented log as its first implementation
//!   (checksummed records, one fsync per round, in-memory index), and the
//!   reads behind polling and SSE.
//! - [`handoff`]: the hot upgrade's wire: a live connection's record
//!   (versioned) and the control channel that carries records and
//!   sockets (`SCM_RIGHTS`) to the new process.
//! - [`metrics`]: per-shard counters and their Prometheus rendering.
//! - [`demo`]: `serve --demo`: a demo org, key and synthetic traffic.
//! - [`shard`]: the glommio runtime on top of it all: one pinned executor
//!   per CPU with its own listeners (SO_REUSEPORT); socket handoff to the
//!   org's owner shard through per-shard inboxes (mutex queue + eventfd); an
//!   epoll reactor per shard instead of a task per connection (hibernation:
//!   an idle connection is its slab record); replay of history to a
//!   connection; the committer and the fan-out walk; request
//!   authentication, origin rule and per-IP limits; the plain-HTTP routes
//!   (sessions, polling, SSE, dashboard); heartbeat, key reload, drain.

pub mod auth;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod handoff;
pub mod history;
pub mod limits;
pub mod log;
pub mod message;
pub mod metrics;
pub mod notify;
pub mod placement;
pub mod protocol;
pub mod publish;
pub mod registry;
pub mod shard;
pub mod shutdown;
pub mod subscriptions;
