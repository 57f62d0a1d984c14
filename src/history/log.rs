//! The seam between the history and where its messages are kept: one
//! small interface, [`Log`], that the group commit, replay, polling and SSE
//! go through. The local segmented log (`history::segmented`) is its first
//! implementation; a clustered one (NATS JetStream, a stream per org or a
//! subject per channel) implements the same methods and plugs in through
//! the one alias `history::Backend`, without touching the shard, replay,
//! poll or SSE code.
//!
//! The contract every implementation keeps:
//!
//! - [`Log::append`] makes a whole round durable (per `--durability`)
//!   before it returns, and gives each message its org's next seq: seqs of
//!   an org only grow, and a seq is never shown before its message is
//!   durable.
//! - When `append` returns `Ok`, the round is already readable: its last
//!   seq is [`Log::last_seq`] and reads see it. Nothing awaits between the
//!   indexing and the return, so a caller can stage the round for live
//!   delivery in the same synchronous step (no gap, no duplicate between a
//!   replay and live delivery).
//! - Reads are by org and channel set, in seq order, and never return a
//!   message retention dropped.

use super::Retained;
use crate::message::Message;

/// A message handed to [`Log::append`], with its publish time.
#[derive(Debug)]
pub struct Appending {
    /// The validated message.
    pub message: Message,
    /// When it was published (ms since the Unix epoch), for retention by age.
    pub time_ms: u64,
}

/// What a log did, for `/metrics` and the benchmarks.
#[derive(Debug, Default, Clone, Copy)]
pub struct LogCounters {
    /// Commit rounds.
    pub commits: u64,
    /// `fdatasync` calls (or their equivalent: acknowledged durable writes).
    pub fsyncs: u64,
    /// Records written.
    pub records: u64,
    /// Bytes written.
    pub bytes: u64,
}

/// Where the history's messages are kept. One per shard, holding the orgs
/// that shard owns; single-threaded (the shard's executor), so its futures
/// need not be `Send`.
// `async fn` in a public trait cannot promise `Send` futures; nothing in a
// shard is `Send` (thread-per-core), and the trait is used by static
// dispatch only (`History<L: Log>`).
#[allow(async_fn_in_trait)]
pub trait Log {
    /// Appends one round, in order, and makes it durable and readable;
    /// returns the seq given to each message, in round order.
    async fn append(&self, round: &[Appending]) -> Result<Vec<u64>, String>;

    /// The org's last durable seq (0 when it never published).
    fn last_seq(&self, org_id: &str) -> u64;

    /// Highest seq retention dropped (0 when nothing was dropped): the first
    /// retained seq is above it, and an `after` below it may have missed
    /// messages.
    fn trimmed_through(&self, org_id: &str) -> u64;

    /// Retained messages of `org_id` with seq in `(after, upto]` on any of
    /// `channels`, oldest first, when every one of them is in memory (no
    /// I/O); `None` when some are not.
    fn read_cached(
        &self,
        org_id: &str,
        after: u64,
        upto: u64,
        channels: &[String],
    ) -> Option<Vec<Retained>>;

    /// Retained messages of `org_id` with seq in `(after, upto]` on any of
    /// `channels`, oldest first, at most `limit` and at most
    /// [`super::READ_BYTES_MAX`] of them (at least one); also the seq up to
    /// which the log was looked at: `upto` when all that matched were
    /// taken, otherwise the last one returned.
    async fn read_forward(
        &self,
        org_id: &str,
        after: u64,
        upto: u64,
        limit: usize,
        channels: &[String],
    ) -> (Vec<Retained>, u64);

    /// Retained messages of `org_id` with seq below `before` (all when
    /// `None`) on any of `channels`, newest first, at most `limit` and at
    /// most [`super::READ_BYTES_MAX`] of them (at least one), and whether
    /// older ones exist.
    async fn read_backward(
        &self,
        org_id: &str,
        before: Option<u64>,
        limit: usize,
        channels: &[String],
    ) -> (Vec<Retained>, bool);

    /// Applies retention by count and age as of `now_ms` (and lets idle
    /// orgs' resources go).
    async fn retain(&self, now_ms: u64);

    /// Every org with a message and its last seq, for the registry at
    /// startup.
    fn last_seqs(&self) -> Vec<(String, u64)>;

    /// What the log did so far.
    fn counters(&self) -> LogCounters;

    /// Messages other writers put in the log (the other nodes of a
    /// cluster, which publish to the shared stream), in seq order: indexes
    /// those it had not seen (seq above [`Log::last_seq`]) and returns
    /// them with their seqs, so that the caller stages them in the same
    /// synchronous step, as a round of its own. A log only its shard
    /// writes has none.
    fn index_arrived(&self, _batch: Vec<crate::cluster::Arrival>) -> Vec<(Appending, u64)> {
        Vec::new()
    }
}
