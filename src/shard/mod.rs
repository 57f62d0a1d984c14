//! The shard runtime: one glommio executor pinned per CPU, each with its own
//! public and admin listener (SO_REUSEPORT), registry, history, key index
//! and metrics, joined by per-shard inboxes over which sockets, publishes
//! and history reads travel to the shard that owns their org.
//!
//! - this file: the [`Shard`] state its tasks share, what shards send each
//!   other ([`ShardMessage`], [`Handoff`]), publish routing;
//! - `run`: the process (checks, executors, signals) and one shard's life
//!   (tasks, shutdown, drain); `startup`: the checks before any shard
//!   starts and the listeners;
//! - `public`, `access`, `ratelimit`: accepting, authenticating and handing
//!   off upgrades; `routes`, `history_routes`, `admin`, `web`: plain HTTP;
//! - `reactor`: the epoll set of upgraded connections (reads, closes);
//!   `connection`: what a client message means; `replay`: `subscribe` with
//!   `after`;
//! - `writer`: the committer, the fan-out walk in parts, flushes, and the
//!   one [`wire`]; `heartbeat`, `key_reload`: the periodic tasks;
//! - `mesh`: the inboxes.

pub mod access;
mod admin;
mod cluster;
mod connection;
mod fault;
mod heartbeat;
pub mod history_routes;
mod key_reload;
mod mesh;
mod public;
pub mod ratelimit;
pub mod reactor;
pub mod replay;
pub mod routes;
mod run;
mod stall;
mod startup;
pub mod tls;
mod tls_wire;
pub mod upgrade;
mod upgrade_process;
pub mod waits;
mod web;
mod writer;

use std::cell::{Cell, RefCell};
use std::os::unix::io::RawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crate::config::Config;
use crate::message::Message;
use crate::metrics::ShardMetrics;
use crate::registry::{ConnKey, Registry};

/// Size of a pooled read buffer: a request head fits, and most client
/// messages; bigger frames grow a buffer that is then not pooled.
pub const READ_BUFFER_BYTES: usize = crate::limits::HEAD_BYTES_MAX;

/// Pooled buffers kept per shard beyond which returned ones are freed.
const POOL_BUFFERS_MAX: usize = 32;

pub use self::run::run;
pub use self::startup::lock_data_dir;
pub use self::upgrade_process::{read_pid, OUTCOME_FILE, PID_FILE};
pub use self::writer::{flush_one, send_vectored, wire};
pub use crate::placement::shard_for;

/// What shards send each other.
pub enum ShardMessage {
    /// A WebSocket upgrade authenticated elsewhere, for the owner to answer.
    Adopt(Handoff),
    /// Messages for orgs this shard owns; the reply carries their seqs.
    Publish {
        /// The messages, in request order.
        messages: Vec<Message>,
        /// Where the seqs go (or why the history could not keep them).
        reply: futures_channel::oneshot::Sender<Result<Vec<u64>, String>>,
    },
    /// From the main thread: drain and stop (SIGTERM, SIGINT, or another
    /// shard died).
    Stop,
    /// From the main thread, in a hot upgrade: freeze and write out the
    /// connections (`upgrade::freeze`); the reply carries the shard's id.
    Freeze {
        /// The state version to write.
        version: u16,
        /// Where the snapshot goes.
        reply: std::sync::mpsc::Sender<(usize, upgrade::Snapshot)>,
    },
    /// From the main thread, in a hot upgrade (state version 2), before
    /// the freeze: pass the sockets of the live connections to the new
    /// process on the control channel (`upgrade::pass_early`).
    PassEarly {
        /// A copy of the control channel's descriptor, the shard's to
        /// close (a shard that answers late writes to a live socket).
        channel: std::os::fd::OwnedFd,
        /// How many were passed, or why it failed.
        reply: std::sync::mpsc::Sender<(usize, Result<usize, String>)>,
    },
    /// In the new process (state version 2): the log is the new process's
    /// to open; the connections' records from the freeze are in
    /// `Shared::adopted` (the shard waits for it once it registered the
    /// connections passed early).
    Prepare,
    /// The upgrade failed: take the log back if it was handed over and
    /// serve again (`upgrade::thaw`).
    Thaw,
    /// The new process read the state: commit what waits, close the admin
    /// connections once answered (`upgrade::hand`).
    Hand {
        /// Answered once no admin request is in progress.
        reply: std::sync::mpsc::Sender<(usize, ())>,
    },
    /// The new process took over: let go (`upgrade::retire`).
    Retire {
        /// Answered once no admin request is in progress.
        reply: std::sync::mpsc::Sender<(usize, ())>,
    },
    /// Cluster mode: the cluster's session secret, read after startup;
    /// sign with it from now on (`AccessState::adopt_signer`).
    SessionSigner(crate::auth::sessions::SessionSigner),
    /// In the new process: the old one committed the handover; start
    /// serving (the shard waits for it after its startup).
    Go,
    /// Every shard hands over: commit what is queued and hand the log over
    /// (`upgrade::release`).
    Release {
        /// Answered once the log is released.
        reply: std::sync::mpsc::Sender<(usize, ())>,
    },
    /// From the NATS bridge (cluster mode): a followed org's follow
    /// started, its new messages, its retention.
    Cluster(crate::cluster::FollowEvent),
    /// A history read (poll, SSE, lists) for an org this shard owns.
    History {
        /// What to read.
        query: crate::history::query::Query,
        /// Where the answer goes.
        reply: futures_channel::oneshot::Sender<crate::history::query::Answer>,
    },
}

/// An authenticated upgrade travelling to its org's owner shard.
pub struct Handoff {
    /// A duplicate of the accepted socket, owned by the message.
    pub fd: RawFd,
    /// Bytes read after the request head (a first frame may already be there).
    pub leftover: Vec<u8>,
    /// The org.
    pub org_id: String,
    /// The API key id, for revocation.
    pub key_id: String,
    /// The session id and expiry when the cookie was the credential, for
    /// sign-out (boxed: most handoffs have none, and the mesh's messages
    /// stay small).
    pub session: Option<Box<(u128, u64)>>,
    /// `Sec-WebSocket-Key` of the request, for the 101 answer.
    pub ws_key: String,
    /// The permessage-deflate offer the server accepted, if any.
    pub deflate: Option<crate::protocol::deflate::Agreement>,
    /// The TLS session of a wss connection that hibernates.
    pub tls: Option<Box<tls_wire::Session>>,
}

impl Drop for Handoff {
    fn drop(&mut self) {
        if self.fd >= 0 {
            // SAFETY: the handoff owns this descriptor until adopted (fd = -1).
            unsafe { libc::close(self.fd) };
        }
    }
}

/// State of one shard, shared by its tasks (never across threads).
pub struct Shard {
    /// This shard's index.
    pub id: usize,
    /// Number of shards.
    pub count: usize,
    /// The configuration.
    pub config: Arc<Config>,
    /// Connections, orgs, channels, queues.
    pub registry: RefCell<Registry>,
    /// Active keys: this shard's copy of the process-wide index, which
    /// every shard swaps for all (revocation is one moment everywhere).
    pub keys: crate::auth::current::CachedKeys,
    /// The admin token.
    pub admin_token: Arc<str>,
    /// Inboxes of every shard (None with one shard).
    pub mesh: Option<mesh::Mesh>,
    /// This shard's counters.
    pub metrics: Arc<ShardMetrics>,
    /// Every shard's counters, for `/metrics`.
    pub all_metrics: Arc<Vec<Arc<ShardMetrics>>>,
    /// Parked read buffers.
    pool: RefCell<Vec<Vec<u8>>>,
    /// The shard's one inflater of compressed client messages (reset per
    /// message): no connection keeps a window of its own.
    pub inflater: RefCell<crate::protocol::deflate::Inflater>,
    /// The shard's one shutdown signal (see [`crate::shutdown`]), held by
    /// every task that stops or changes course when the shard drains.
    pub shutdown: crate::shutdown::Shutdown,
    /// Notified when the key index is replaced or a session is signed out,
    /// so SSE streams and long-polls served here (which are not in the
    /// registry) re-check their credential.
    pub http_wake: crate::notify::Notify,
    /// SSE streams and polls being served here; the drain waits for them
    /// to be answered.
    pub http_streams: Cell<usize>,
    /// The history log of the orgs this shard owns.
    pub history: crate::history::History,
    /// Replays of history to this shard's connections in progress.
    pub replays: replay::Replays,
    /// The epoll set of this shard's connections.
    pub reactor: reactor::Reactor,
    /// Closing connections and when their linger ends.
    pub lingering: RefCell<Vec<(ConnKey, Instant)>>,
    /// Notified by the reactor when the public listener (in its epoll set,
    /// edge-triggered) has new connections; the accept task waits on it.
    pub accept_wake: crate::notify::Notify,
    /// Public connections waiting for their request head in the epoll set.
    pub parked: public::Parked,
    /// Session signer, per-address limits, keys used since the last
    /// last-used write.
    pub access: access::AccessState,
    /// The TLS pair when `--tls-cert`/`--tls-key` are given (shared by
    /// every shard; a reload swaps the pair inside).
    pub tls: Option<Arc<tls::Tls>>,
    /// Where the shard is in a hot upgrade.
    pub handover: upgrade::Handover,
    /// Cluster mode (`--nats-url`): the bridge and the orgs followed.
    pub cluster: Option<cluster::ShardCluster>,
}

impl Shard {
    /// A read buffer from the pool.
    pub fn take_buffer(&self) -> Vec<u8> {
        self.pool
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| vec![0u8; READ_BUFFER_BYTES])
    }

    /// Parks a read buffer (oversized ones are freed).
    pub fn return_buffer(&self, buffer: Vec<u8>) {
        let mut pool = self.pool.borrow_mut();
        if buffer.len() == READ_BUFFER_BYTES && pool.len() < POOL_BUFFERS_MAX {
            pool.push(buffer);
        }
    }

    /// Decoder limits for client frames.
    pub fn decoder_config(&self) -> crate::protocol::ws::DecoderConfig {
        crate::protocol::ws::DecoderConfig {
            message_bytes_max: self.config.client_message_bytes,
            require_mask: true,
        }
    }

    /// A decoder for connection `conn`'s frames: it accepts compressed
    /// messages when the connection negotiated permessage-deflate.
    pub fn decoder_for(&self, conn: &crate::registry::Connection) -> crate::protocol::ws::Decoder {
        let mut decoder = crate::protocol::ws::Decoder::new(self.decoder_config());
        decoder.set_deflate(conn.deflates());
        decoder
    }

    /// Copies the registry's counters into the shared metrics.
    pub fn sync_metrics(&self) {
        let registry = self.registry.borrow();
        let c = registry.counters;
        let m = &self.metrics;
        m.connections
            .store(registry.len() as u64, Ordering::Relaxed);
        m.published.store(c.published, Ordering::Relaxed);
        m.delivered.store(c.delivered, Ordering::Relaxed);
        m.bytes_sent.store(c.bytes_sent, Ordering::Relaxed);
        m.sends.store(c.sends, Ordering::Relaxed);
        m.frames_compressed
            .store(c.frames_compressed, Ordering::Relaxed);
        m.delivered_compressed
            .store(c.delivered_compressed, Ordering::Relaxed);
        m.slow_consumer_closes
            .store(c.slow_consumer_closes, Ordering::Relaxed);
        let h = self.history.counters();
        m.history_commits.store(h.commits, Ordering::Relaxed);
        m.history_fsyncs.store(h.fsyncs, Ordering::Relaxed);
        m.history_bytes_written.store(h.bytes, Ordering::Relaxed);
    }

    /// Sequences messages this shard owns and returns their seqs once the
    /// history made them durable; the history's committer fans them out.
    pub async fn publish_local(&self, messages: Vec<Message>) -> Result<Vec<u64>, String> {
        self.history.append(messages).await
    }

    /// Routes messages to their owner shards (in cluster mode: to their
    /// orgs' JetStream streams); seqs come back in input order.
    pub async fn publish(&self, messages: Vec<Message>) -> Result<Vec<u64>, String> {
        if let Some(cluster) = &self.cluster {
            return match cluster.bridge.publish(messages).await {
                Ok(Ok(seqs)) => Ok(seqs),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("the NATS bridge stopped".to_string()),
            };
        }
        let mut by_shard: Vec<Vec<(usize, Message)>> =
            (0..self.count).map(|_| Vec::new()).collect();
        for (index, message) in messages.into_iter().enumerate() {
            by_shard[shard_for(&message.org_id, self.count)].push((index, message));
        }
        let total: usize = by_shard.iter().map(Vec::len).sum();
        let mut seqs = vec![0u64; total];
        for (owner, batch) in by_shard.into_iter().enumerate() {
            if batch.is_empty() {
                continue;
            }
            let (indexes, batch): (Vec<usize>, Vec<Message>) = batch.into_iter().unzip();
            let batch_seqs = if owner == self.id {
                self.publish_local(batch).await?
            } else {
                let (reply, answer) = futures_channel::oneshot::channel();
                let mesh = self.mesh.as_ref().expect("several shards have a mesh");
                mesh.send_to(
                    owner,
                    ShardMessage::Publish {
                        messages: batch,
                        reply,
                    },
                )
                .map_err(|_| "owner shard stopped".to_string())?;
                answer
                    .await
                    .map_err(|_| "owner shard stopped".to_string())??
            };
            for (index, seq) in indexes.into_iter().zip(batch_seqs) {
                seqs[index] = seq;
            }
        }
        Ok(seqs)
    }
}
