//! Message history: every org's messages kept in a durable log so a client
//! can resume exactly where it stopped — `subscribe` with `after`,
//! `/v1/poll`, `/v1/sse` and the resource lists.
//!
//! - this file: [`History`], the group commit in front of the log: the
//!   publishers' queue, commit rounds, and the wake-up of readers;
//! - [`log`]: the [`Log`] seam — append a round, read an org's range by
//!   channel, first and last retained seq, retention;
//! - `segmented`: the local segmented log, its first implementation;
//! - `record`: the on-disk record format, pure;
//! - [`query`]: the reads behind the HTTP routes.
//!
//! # Write path
//!
//! [`History::append`] queues a publisher's messages for the shard's
//! committer. Each [`History::commit_next`] takes everything queued as one
//! round and appends it to the log, which gives each message its org's
//! next seq, writes the round (one `write` per org touched) and — with
//! `--durability fsync` — one `fdatasync` per file touched, concurrently.
//! Publishes arriving meanwhile queue up for the next round: one fsync
//! covers all of them (group commit). Only then does the committer (the
//! shard's) stage the round for live subscribers and answer the publishers
//! (202). A subscriber therefore never sees a message the log could lose,
//! the `welcome` seq is always durable, and a seq handed out but never
//! written (crash before the write) was never shown to anyone, so its reuse
//! after a restart is invisible.

mod jetstream;
pub mod log;
pub mod query;
mod record;
mod segmented;

use std::cell::RefCell;
use std::ops::Range;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use self::jetstream::JetStreamLog;
pub use self::log::{Appending, Log, LogCounters};
pub use self::record::{crc32c, RecordError};
pub use self::segmented::SegmentedLog;
pub use crate::message::channel_matches;
use crate::message::{Message, MessageKind};
use crate::notify::Notify;
use crate::shutdown::Shutdown;

/// The log the shards keep their history in: the local segmented log
/// (the embedded default), or JetStream in cluster mode (`--nats-url`).
pub enum Backend {
    /// Segments on local disk.
    Local(SegmentedLog),
    /// One JetStream stream per org, shared by every node.
    Cluster(JetStreamLog),
}

impl Backend {
    /// The JetStream log in cluster mode.
    pub fn cluster(&self) -> Option<&JetStreamLog> {
        match self {
            Backend::Local(_) => None,
            Backend::Cluster(log) => Some(log),
        }
    }
}

impl Log for Backend {
    async fn append(&self, round: &[Appending]) -> Result<Vec<u64>, String> {
        match self {
            Backend::Local(log) => log.append(round).await,
            Backend::Cluster(log) => log.append(round).await,
        }
    }
    fn last_seq(&self, org_id: &str) -> u64 {
        match self {
            Backend::Local(log) => log.last_seq(org_id),
            Backend::Cluster(log) => log.last_seq(org_id),
        }
    }
    fn trimmed_through(&self, org_id: &str) -> u64 {
        match self {
            Backend::Local(log) => log.trimmed_through(org_id),
            Backend::Cluster(log) => log.trimmed_through(org_id),
        }
    }
    fn read_cached(
        &self,
        org_id: &str,
        after: u64,
        upto: u64,
        channels: &[String],
    ) -> Option<Vec<Retained>> {
        match self {
            Backend::Local(log) => log.read_cached(org_id, after, upto, channels),
            Backend::Cluster(log) => log.read_cached(org_id, after, upto, channels),
        }
    }
    async fn read_forward(
        &self,
        org_id: &str,
        after: u64,
        upto: u64,
        limit: usize,
        channels: &[String],
    ) -> (Vec<Retained>, u64) {
        match self {
            Backend::Local(log) => log.read_forward(org_id, after, upto, limit, channels).await,
            Backend::Cluster(log) => log.read_forward(org_id, after, upto, limit, channels).await,
        }
    }
    async fn read_backward(
        &self,
        org_id: &str,
        before: Option<u64>,
        limit: usize,
        channels: &[String],
    ) -> (Vec<Retained>, bool) {
        match self {
            Backend::Local(log) => log.read_backward(org_id, before, limit, channels).await,
            Backend::Cluster(log) => log.read_backward(org_id, before, limit, channels).await,
        }
    }
    async fn retain(&self, now_ms: u64) {
        match self {
            Backend::Local(log) => log.retain(now_ms).await,
            Backend::Cluster(log) => log.retain(now_ms).await,
        }
    }
    fn last_seqs(&self) -> Vec<(String, u64)> {
        match self {
            Backend::Local(log) => log.last_seqs(),
            Backend::Cluster(log) => log.last_seqs(),
        }
    }
    fn counters(&self) -> LogCounters {
        match self {
            Backend::Local(log) => log.counters(),
            Backend::Cluster(log) => log.counters(),
        }
    }
    fn index_arrived(&self, batch: Vec<crate::cluster::Arrival>) -> Vec<(Appending, u64)> {
        match self {
            Backend::Local(log) => log.index_arrived(batch),
            Backend::Cluster(log) => log.index_arrived(batch),
        }
    }
}

/// When a publish is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// After `fdatasync` of its record (the default): survives power loss.
    Fsync,
    /// After the `write` of its record, without fsync: fast; survives a
    /// crash of the process (`kill -9`) but not of the machine.
    None,
}

impl Durability {
    /// Parses `fsync` or `none`.
    pub fn parse(text: &str) -> Option<Durability> {
        match text {
            "fsync" => Some(Durability::Fsync),
            "none" => Some(Durability::None),
            _ => None,
        }
    }
}

/// Default `--history-messages`: messages kept per org.
pub const HISTORY_MESSAGES_DEFAULT: u64 = 100_000;
/// Default `--history-age`: 24 hours.
pub const HISTORY_AGE_MS_DEFAULT: u64 = 24 * 60 * 60 * 1000;
/// Most bytes of messages one history read loads (a page of `/v1/poll`,
/// an SSE round, a list page, a replay step), at least one message
/// whatever its size: what a reader costs the server is bounded by this
/// (and its send queue), not by how much history it asks for
/// (PROTOCOL.md §6). Every [`Log`] keeps it in `read_forward` and
/// `read_backward`.
pub const READ_BYTES_MAX: usize = 1 << 20;
/// How often retention by age runs.
const RETENTION_INTERVAL_MS: u64 = 1000;

/// The history settings of a shard.
#[derive(Debug, Clone)]
pub struct HistoryConfig {
    /// `<data-dir>/history`.
    pub dir: PathBuf,
    /// When a publish is acknowledged.
    pub durability: Durability,
    /// Messages kept per org.
    pub messages_max: u64,
    /// Longest a message is kept.
    pub age_ms: u64,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A retained message as read back.
#[derive(Debug, Clone)]
pub struct Retained {
    /// Its seq.
    pub seq: u64,
    /// Message type.
    pub kind: MessageKind,
    /// Route id.
    pub route: Option<Rc<str>>,
    /// The publisher's JSON text.
    pub data: Arc<str>,
}

/// A publisher waiting for the committer: where its messages are in the
/// round, and where their seqs go.
struct Waiter {
    /// Its messages' positions in the round.
    range: Range<usize>,
    /// Where their seqs (or why the log could not keep them) go.
    reply: futures_channel::oneshot::Sender<Result<Vec<u64>, String>>,
}

/// Publishes waiting for the committer.
#[derive(Default)]
struct Pending {
    records: Vec<Appending>,
    waiters: Vec<Waiter>,
}

/// One commit round: the messages the committer took in one go, how the
/// commit went (their seqs, or why not), and the publishers waiting for it.
pub struct Round {
    /// The messages committed in this round (to stage), with their seqs
    /// in `outcome` (retries of an idempotency key are not among them).
    records: Vec<Appending>,
    waiters: Vec<Waiter>,
    outcome: Result<Vec<u64>, String>,
    /// The seq of each publisher's message, by its position in the
    /// publishers' queue (a retry's is the original seq).
    answers: Result<Vec<u64>, String>,
}

impl Round {
    /// How the commit went: `Ok` (with the seqs) when every message is
    /// durable and readable.
    pub fn outcome(&self) -> Result<(), &str> {
        self.outcome.as_ref().map(|_| ()).map_err(String::as_str)
    }

    /// The committed messages with their seqs, in commit order (none when
    /// the commit failed).
    pub fn messages(&self) -> impl Iterator<Item = (&Message, u64)> {
        let seqs = self.outcome.as_deref().unwrap_or(&[]);
        self.records
            .iter()
            .map(|r| &r.message)
            .zip(seqs.iter().copied())
    }

    /// Tells each publisher of the round how its commit went.
    pub fn answer(&mut self) {
        for waiter in self.waiters.drain(..) {
            let answer = match &self.answers {
                Ok(seqs) => Ok(seqs[waiter.range].to_vec()),
                Err(e) => Err(e.clone()),
            };
            let _ = waiter.reply.send(answer);
        }
    }
}

/// One shard's history: the group commit in front of its log.
pub struct History<L: Log = Backend> {
    /// The log.
    log: L,
    /// Messages and publishers waiting for the committer.
    pending: RefCell<Pending>,
    /// Wakes the committer.
    pending_notify: Notify,
    /// Wakes readers after each commit.
    pub committed_notify: Notify,
    /// The shard's shutdown signal: once it is triggered, long-polls stop
    /// waiting and answer with what they have.
    shutdown: Shutdown,
    /// Set when a hot upgrade hands the log to a new process: nothing is
    /// appended; a publish waits until the upgrade failed (the log is
    /// taken back) or committed (`handed_off`: it is answered 503).
    released: std::cell::Cell<bool>,
    /// Set when the hot upgrade committed: the log is the new process's
    /// for good.
    handed_off: std::cell::Cell<bool>,
    /// Notified when `released` or `handed_off` changes.
    release_changed: Notify,
    /// Messages other nodes put in the log (cluster mode), for the
    /// committer.
    arrived: RefCell<Vec<crate::cluster::Arrival>>,
    /// Recent idempotency keys of local publishes.
    dedupe: RefCell<Dedupe>,
}

/// How long a local publish's `idempotency_key` is remembered (the same
/// window as JetStream's duplicate window in cluster mode).
pub const IDEMPOTENCY_WINDOW_MS: u64 = 120_000;
/// Most idempotency keys a shard remembers; past it the oldest are
/// forgotten before their window ends.
pub const IDEMPOTENCY_KEYS_MAX: usize = 100_000;

/// The idempotency keys of recent local publishes: (org, key) → seq.
#[derive(Default)]
struct Dedupe {
    seqs: std::collections::HashMap<(String, Box<str>), u64>,
    /// Keys oldest first, with when they were committed.
    order: std::collections::VecDeque<(u64, String, Box<str>)>,
}

impl Dedupe {
    fn expire(&mut self, now_ms: u64) {
        while let Some((time, _, _)) = self.order.front() {
            if now_ms.saturating_sub(*time) < IDEMPOTENCY_WINDOW_MS
                && self.order.len() <= IDEMPOTENCY_KEYS_MAX
            {
                break;
            }
            let (_, org, key) = self.order.pop_front().expect("front exists");
            self.seqs.remove(&(org, key));
        }
    }
}

impl History<Backend> {
    /// Opens the history of shard `shard` of `shards` (see
    /// [`SegmentedLog::open`]).
    pub async fn open(
        config: HistoryConfig,
        shard: usize,
        shards: usize,
        shutdown: Shutdown,
    ) -> Result<History, String> {
        let log = SegmentedLog::open(config, shard, shards).await?;
        Ok(History::new(Backend::Local(log), shutdown))
    }
}

impl<L: Log> History<L> {
    /// The history in front of `log`, for the shard whose shutdown
    /// signal is `shutdown`.
    pub fn new(log: L, shutdown: Shutdown) -> History<L> {
        History {
            log,
            pending: RefCell::new(Pending::default()),
            pending_notify: Notify::default(),
            committed_notify: Notify::default(),
            shutdown,
            released: std::cell::Cell::new(false),
            handed_off: std::cell::Cell::new(false),
            release_changed: Notify::default(),
            arrived: RefCell::new(Vec::new()),
            dedupe: RefCell::new(Dedupe::default()),
        }
    }

    /// The log.
    pub fn log(&self) -> &L {
        &self.log
    }

    /// Messages another node put in the log (cluster mode), for the
    /// committer: it indexes and stages them as a round.
    pub fn arrive(&self, batch: Vec<crate::cluster::Arrival>) {
        self.arrived.borrow_mut().extend(batch);
        self.pending_notify.notify();
    }

    /// Queues messages for the committer and waits until it made them
    /// durable (per `--durability`) and readable. Returns their seqs in
    /// input order.
    pub async fn append(&self, messages: Vec<Message>) -> Result<Vec<u64>, String> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        while self.released.get() {
            if self.handed_off.get() {
                return Err("the log was handed to a new process".to_string());
            }
            let seen = self.release_changed.generation();
            self.release_changed.wait(seen).await;
        }
        let time_ms = now_ms();
        let answer = {
            let mut pending = self.pending.borrow_mut();
            let start = pending.records.len();
            pending.records.extend(
                messages
                    .into_iter()
                    .map(|message| Appending { message, time_ms }),
            );
            let (reply, answer) = futures_channel::oneshot::channel();
            let range = start..pending.records.len();
            pending.waiters.push(Waiter { range, reply });
            answer
        };
        self.pending_notify.notify();
        match answer.await {
            Ok(answer) => answer,
            Err(_) => Err("history committer stopped".to_string()),
        }
    }

    /// Waits for publishes, then appends everything queued to the log as
    /// one round. Returns the round: on success every message in it is
    /// durable and readable, and the caller stages it for delivery in the
    /// same synchronous step (no await between this returning and the
    /// staging), so at any await point a committed message is either being
    /// delivered or not committed at all (see `shard::replay`). The caller
    /// answers the round's publishers with [`Round::answer`].
    pub async fn commit_next(&self) -> Round {
        loop {
            let seen = self.pending_notify.generation();
            let arrived = std::mem::take(&mut *self.arrived.borrow_mut());
            if !arrived.is_empty() {
                // Indexed here and staged by the caller in the same
                // synchronous step, as a local round is.
                let (records, seqs): (Vec<Appending>, Vec<u64>) =
                    self.log.index_arrived(arrived).into_iter().unzip();
                if records.is_empty() {
                    continue;
                }
                self.committed_notify.notify();
                return Round {
                    records,
                    waiters: Vec::new(),
                    outcome: Ok(seqs.clone()),
                    answers: Ok(seqs),
                };
            }
            let batch = std::mem::take(&mut *self.pending.borrow_mut());
            if batch.records.is_empty() {
                self.pending_notify.wait(seen).await;
                continue;
            }
            return self.commit_local(batch).await;
        }
    }

    /// Appends a batch of local publishes: messages whose idempotency key
    /// was committed within the window (or earlier in the same batch) are
    /// answered with that seq and not appended again.
    async fn commit_local(&self, batch: Pending) -> Round {
        let now = now_ms();
        let count = batch.records.len();
        // Per position: the seq of an earlier commit, or the position of
        // the first message of this batch with the same key.
        let mut known: Vec<Option<Result<u64, usize>>> = vec![None; count];
        let mut fresh = Vec::with_capacity(count);
        let mut fresh_positions = Vec::with_capacity(count);
        {
            let mut dedupe = self.dedupe.borrow_mut();
            dedupe.expire(now);
            let mut in_batch: std::collections::HashMap<(&str, &str), usize> =
                std::collections::HashMap::new();
            for (i, record) in batch.records.iter().enumerate() {
                let Some(key) = record.message.idempotency_key.as_deref() else {
                    continue;
                };
                let org = record.message.org_id.as_str();
                if let Some(seq) = dedupe.seqs.get(&(org.to_string(), Box::from(key))) {
                    known[i] = Some(Ok(*seq));
                } else if let Some(first) = in_batch.get(&(org, key)) {
                    known[i] = Some(Err(*first));
                } else {
                    in_batch.insert((org, key), i);
                }
            }
        }
        for (i, record) in batch.records.into_iter().enumerate() {
            if known[i].is_none() {
                fresh_positions.push(i);
                fresh.push(record);
            }
        }
        let outcome = if self.released.get() {
            Err("the log was handed to a new process".to_string())
        } else if fresh.is_empty() {
            Ok(Vec::new())
        } else {
            self.log.append(&fresh).await
        };
        let answers = match &outcome {
            Err(e) => Err(e.clone()),
            Ok(seqs) => {
                let mut by_position = vec![0u64; count];
                for (position, seq) in fresh_positions.iter().zip(seqs) {
                    by_position[*position] = *seq;
                }
                for i in 0..count {
                    match known[i] {
                        Some(Ok(seq)) => by_position[i] = seq,
                        Some(Err(first)) => by_position[i] = by_position[first],
                        None => {}
                    }
                }
                let mut dedupe = self.dedupe.borrow_mut();
                for (record, seq) in fresh.iter().zip(seqs) {
                    if let Some(key) = &record.message.idempotency_key {
                        let org = record.message.org_id.clone();
                        dedupe.seqs.insert((org.clone(), key.clone()), *seq);
                        dedupe.order.push_back((now, org, key.clone()));
                    }
                }
                dedupe.expire(now);
                Ok(by_position)
            }
        };
        if outcome.is_ok() {
            // Readers waiting for new commits (long-polls, SSE) run
            // after the caller's synchronous step.
            self.committed_notify.notify();
        }
        Round {
            records: fresh,
            waiters: batch.waiters,
            outcome,
            answers,
        }
    }

    /// True while publishes (or, in cluster mode, messages other nodes
    /// published) wait for the committer.
    pub fn has_pending(&self) -> bool {
        !self.pending.borrow().records.is_empty() || !self.arrived.borrow().is_empty()
    }

    /// Resolves once a publish was queued after generation `seen` (see
    /// [`History::pending_generation`]).
    pub async fn wait_pending(&self, seen: u64) {
        self.pending_notify.wait(seen).await
    }

    /// The generation of the pending queue's wake-up.
    pub fn pending_generation(&self) -> u64 {
        self.pending_notify.generation()
    }

    /// Hands the log over (hot upgrade): later publishes wait (see
    /// `released`), and whatever still waits for the committer is answered
    /// with an error by it (the upgrade waits for none to be left first).
    pub fn release(&self) {
        self.released.set(true);
        self.pending_notify.notify();
        self.release_changed.notify();
    }

    /// The hot upgrade committed: publishes waiting for the log are
    /// answered with an error (503), and so are later ones.
    pub fn hand_off(&self) {
        self.handed_off.set(true);
        self.release_changed.notify();
    }

    /// Takes the log back after [`History::release`]: the new process that
    /// was handed it died or gave up before it served (and wrote nothing
    /// to it), so this process appends again from where it stopped.
    pub fn unrelease(&self) {
        self.released.set(false);
        self.pending_notify.notify();
        self.release_changed.notify();
    }

    /// True once the log was handed to a new process.
    pub fn is_released(&self) -> bool {
        self.released.get()
    }

    /// The shard's shutdown signal: a long-poll waiting for new commits
    /// answers at once when it is triggered, and later ones do not wait.
    pub fn shutdown(&self) -> &Shutdown {
        &self.shutdown
    }

    /// The org's last committed seq.
    pub fn committed(&self, org_id: &str) -> u64 {
        self.log.last_seq(org_id)
    }

    /// Highest seq retention dropped (0 when nothing was dropped): an
    /// `after` below it may have missed messages.
    pub fn trimmed_through(&self, org_id: &str) -> u64 {
        self.log.trimmed_through(org_id)
    }

    /// Every org with a message and its last seq (for the registry).
    pub fn last_seqs(&self) -> Vec<(String, u64)> {
        self.log.last_seqs()
    }

    /// What the log did so far.
    pub fn counters(&self) -> LogCounters {
        self.log.counters()
    }

    /// See [`Log::read_cached`].
    pub fn read_cached(
        &self,
        org_id: &str,
        after: u64,
        upto: u64,
        channels: &[String],
    ) -> Option<Vec<Retained>> {
        self.log.read_cached(org_id, after, upto, channels)
    }

    /// See [`Log::read_forward`].
    pub async fn read_forward(
        &self,
        org_id: &str,
        after: u64,
        upto: u64,
        limit: usize,
        channels: &[String],
    ) -> (Vec<Retained>, u64) {
        self.log
            .read_forward(org_id, after, upto, limit, channels)
            .await
    }

    /// See [`Log::read_backward`].
    pub async fn read_backward(
        &self,
        org_id: &str,
        before: Option<u64>,
        limit: usize,
        channels: &[String],
    ) -> (Vec<Retained>, bool) {
        self.log
            .read_backward(org_id, before, limit, channels)
            .await
    }
}

/// Applies retention by age every second, for the life of the shard.
pub async fn retention_loop<L: Log>(history: &History<L>) {
    loop {
        glommio::timer::sleep(Duration::from_millis(RETENTION_INTERVAL_MS)).await;
        // Not while a hot upgrade has handed the log over: the new
        // process trims it, or, when the upgrade fails, this one does
        // again once it took the log back.
        if history.released.get() {
            continue;
        }
        history.log.retain(now_ms()).await;
    }
}
