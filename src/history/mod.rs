//! Message history: a durable, segmented, append-only log per org, the
//! in-memory index over it, group commit, retention, and the reads behind
//! `subscribe` with `after`, `/v1/poll`, `/v1/sse` and the resource lists.
//!
//! # Layout on disk
//!
//! `<data-dir>/history/<org>/<first_seq>.log`: one directory per org, each
//! holding that org's segments named by the seq of their first record
//! (20 digits, so names sort). Only the org's owner shard
//! (`shard_for(org, shards)`) ever opens them, so with any `--shards` a shard
//! finds its orgs by listing the directory and keeping the names that hash
//! to it; nothing is rewritten when the shard count changes.
//!
//! # Write path
//!
//! [`History::append`] gives each message the org's next seq and queues the
//! encoded record for the shard's committer task. The committer writes every
//! queued record (one `write` per org touched), then — with
//! `--durability fsync` — one `fdatasync` per file touched, concurrently.
//! Publishes arriving meanwhile queue up for the next round: one fsync covers
//! all of them (group commit). Only then does the committer index the
//! records, fan them out to live subscribers and answer the publishers
//! (202). A subscriber therefore never sees a message the log could lose,
//! the `welcome` seq is always durable, and a seq handed out but never
//! written (crash before the write) was never shown to anyone, so its reuse
//! after a restart is invisible.

mod log;
pub mod query;
pub mod replay;
mod writers;

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ahash::{AHashMap, AHashSet};
use glommio::io::{BufferedFile, OpenOptions};

pub use self::log::{crc32c, RecordError};
use crate::registry::{MessageKind, Outgoing};
use crate::shard::{shard_for, Shard};

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

/// Largest segment file before a new one is started.
const SEGMENT_BYTES_MAX: u64 = 64 << 20;
/// Newest messages of each org kept in memory, so replay can finish and
/// long-polls answer without touching the disk. Dropped when the org has
/// been idle for `WRITER_IDLE_MS`, so memory follows the orgs publishing now.
const RECENT_MESSAGES_MAX: usize = 512;
/// Bytes of `data` kept in memory per org for those messages.
const RECENT_BYTES_MAX: usize = 512 << 10;
/// Most bytes of messages one history read loads (a page of `/v1/poll`,
/// an SSE round, a list page, a replay step), at least one message
/// whatever its size: what a reader costs the server is bounded by this
/// (and its send queue), not by how much history it asks for
/// (PROTOCOL.md §6).
pub const READ_BYTES_MAX: usize = 1 << 20;
/// Largest single read of a segment when serving history.
const READ_CHUNK_BYTES: usize = 4 << 20;
/// An org's open segment is closed after this long without a write, so
/// idle orgs hold no file descriptor.
const WRITER_IDLE_MS: u64 = 30_000;
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

impl HistoryConfig {
    /// Records per segment: a tenth of what an org keeps, so retention by
    /// count deletes files in steps of about 10 %.
    fn segment_records_max(&self) -> u64 {
        (self.messages_max / 10).clamp(1, 1 << 20)
    }

    /// Age of a segment's first record past which a new segment starts, so
    /// retention by age also deletes files in steps of about 10 %.
    fn segment_age_ms(&self) -> u64 {
        (self.age_ms / 10).max(1)
    }
}

/// True when a message of `kind` with route id `route` goes to `channel`
/// (the routing of PROTOCOL.md §3).
pub fn channel_matches(channel: &str, kind: MessageKind, route: Option<&str>) -> bool {
    match channel {
        "events" => kind == MessageKind::Event,
        "deliveries" => kind == MessageKind::Delivery,
        "issues" => kind == MessageKind::Issue,
        _ => match channel.split_once(':') {
            Some(("events", id)) => kind == MessageKind::Event && route == Some(id),
            Some(("deliveries", id)) => kind == MessageKind::Delivery && route == Some(id),
            Some(("collections", id)) => kind == MessageKind::Sync && route == Some(id),
            _ => false,
        },
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One segment file of an org.
#[derive(Debug)]
struct Segment {
    /// Seq of its first record: its name and its key in the index.
    first_seq: u64,
    /// Its path.
    path: PathBuf,
    /// Bytes written (and, after the next commit, durable).
    size: u64,
    /// Records in it.
    records: u64,
    /// Seq of its last record.
    last_seq: u64,
    /// Publish time of its first record.
    first_time_ms: u64,
}

/// Where one retained message is, and what it matches.
#[derive(Debug, Clone)]
struct Entry {
    /// Its seq.
    seq: u64,
    /// Publish time, for retention by age.
    time_ms: u64,
    /// `first_seq` of the segment holding it.
    segment: u64,
    /// Byte offset of the record in the segment.
    offset: u64,
    /// Encoded length of the record.
    len: u32,
    /// Message type (which channels it goes to).
    kind: MessageKind,
    /// Route id (interned per org).
    route: Option<Rc<str>>,
}

/// A retained message as read back.
#[derive(Debug, Clone)]
pub struct Item {
    /// Its seq.
    pub seq: u64,
    /// Message type.
    pub kind: MessageKind,
    /// Route id.
    pub route: Option<Rc<str>>,
    /// The publisher's JSON text.
    pub data: Arc<str>,
}

/// One org's log on its owner shard.
#[derive(Debug)]
struct OrgLog {
    /// The org id.
    id: Rc<str>,
    /// `<history>/<org>`.
    dir: PathBuf,
    /// False until the directory is known to exist.
    dir_ready: bool,
    /// Segments, oldest first; the last is the one appended to.
    segments: VecDeque<Segment>,
    /// The active segment, open for appending.
    writer: Option<Rc<BufferedFile>>,
    /// When `writer` was last written.
    last_write_ms: u64,
    /// Retained messages, oldest first.
    entries: VecDeque<Entry>,
    /// Last seq handed out (maybe not yet durable).
    assigned: u64,
    /// Last seq committed: durable, indexed and fanned out.
    committed: u64,
    /// Highest seq dropped by retention (0: nothing ever dropped).
    trimmed_through: u64,
    /// The newest messages' data, a suffix of `entries`.
    recent: VecDeque<(u64, Arc<str>)>,
    /// Bytes of data in `recent`.
    recent_bytes: usize,
    /// Route ids seen, interned.
    routes: AHashSet<Rc<str>>,
}

impl OrgLog {
    fn new(id: Rc<str>, dir: PathBuf) -> OrgLog {
        OrgLog {
            id,
            dir,
            dir_ready: false,
            segments: VecDeque::new(),
            writer: None,
            last_write_ms: 0,
            entries: VecDeque::new(),
            assigned: 0,
            committed: 0,
            trimmed_through: 0,
            recent: VecDeque::new(),
            recent_bytes: 0,
            routes: AHashSet::new(),
        }
    }

    fn intern_route(&mut self, route: Option<&str>) -> Option<Rc<str>> {
        let route = route?;
        if let Some(existing) = self.routes.get(route) {
            return Some(existing.clone());
        }
        let interned: Rc<str> = route.into();
        self.routes.insert(interned.clone());
        Some(interned)
    }

    /// Index of the first entry with a seq above `seq`.
    fn first_after(&self, seq: u64) -> usize {
        self.entries.partition_point(|e| e.seq <= seq)
    }

    /// True when every retained entry above `after` has its data in memory.
    fn cached_after(&self, after: u64) -> bool {
        match self.entries.get(self.first_after(after)) {
            None => true,
            Some(entry) => self
                .recent
                .front()
                .is_some_and(|(seq, _)| *seq <= entry.seq),
        }
    }

    fn cached_data(&self, seq: u64) -> Option<Arc<str>> {
        let front = self.recent.front()?.0;
        if seq < front {
            return None;
        }
        let at = self.recent.partition_point(|(s, _)| *s < seq);
        self.recent
            .get(at)
            .filter(|(s, _)| *s == seq)
            .map(|(_, d)| d.clone())
    }

    fn remember(&mut self, seq: u64, data: Arc<str>) {
        self.recent_bytes += data.len();
        self.recent.push_back((seq, data));
        while self.recent.len() > RECENT_MESSAGES_MAX
            || (self.recent_bytes > RECENT_BYTES_MAX && self.recent.len() > 1)
        {
            let (_, dropped) = self.recent.pop_front().expect("not empty");
            self.recent_bytes -= dropped.len();
        }
    }

    /// Drops entries past the count and age limits; returns the paths of
    /// segments that no longer hold a retained message (never the last one,
    /// whose records also carry the org's seq across restarts).
    fn trim(&mut self, config: &HistoryConfig, now_ms: u64) -> Vec<PathBuf> {
        let oldest_ms = now_ms.saturating_sub(config.age_ms);
        while let Some(front) = self.entries.front() {
            if self.entries.len() as u64 > config.messages_max || front.time_ms < oldest_ms {
                self.trimmed_through = front.seq;
                self.entries.pop_front();
            } else {
                break;
            }
        }
        while let Some((seq, data)) = self.recent.front() {
            if *seq > self.trimmed_through {
                break;
            }
            self.recent_bytes -= data.len();
            self.recent.pop_front();
        }
        let mut deleted = Vec::new();
        while self.segments.len() > 1 && self.segments[0].last_seq <= self.trimmed_through {
            let segment = self.segments.pop_front().expect("len > 1");
            deleted.push(segment.path);
        }
        deleted
    }

    fn segment_path(&self, first_seq: u64) -> PathBuf {
        self.dir.join(format!("{first_seq:020}.log"))
    }
}

/// Directory name of an org: the id itself when it is `[A-Za-z0-9_-]`
/// (as org ids are), otherwise `~` and its bytes in hex.
pub fn org_dir_name(org_id: &str) -> String {
    if !org_id.is_empty()
        && org_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return org_id.to_string();
    }
    let mut name = String::from("~");
    for byte in org_id.bytes() {
        name.push_str(&format!("{byte:02x}"));
    }
    name
}

/// The org id of a directory name made by [`org_dir_name`].
pub fn org_of_dir_name(name: &str) -> Option<String> {
    match name.strip_prefix('~') {
        None => (!name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'))
        .then(|| name.to_string()),
        Some(hex) => {
            if hex.is_empty() || hex.len() % 2 != 0 {
                return None;
            }
            let bytes: Option<Vec<u8>> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
                .collect();
            String::from_utf8(bytes?).ok()
        }
    }
}

/// A wake-up for tasks waiting on something that changes (new commits,
/// new pending records, revocations): a generation counter and the wakers
/// of the waiters. A waiter that is dropped before it is woken (a
/// long-poll that got its answer another way) takes its waker out, so the
/// list holds live waiters only, however long between two notifications.
#[derive(Debug, Default)]
pub struct Notify {
    generation: Cell<u64>,
    /// Wakers of the current generation; emptied by [`Notify::notify`].
    wakers: RefCell<slab::Slab<Waker>>,
}

impl Notify {
    /// The current generation, to wait for a change from.
    pub fn generation(&self) -> u64 {
        self.generation.get()
    }

    /// Wakes every waiter.
    pub fn notify(&self) {
        self.generation.set(self.generation.get() + 1);
        let wakers = std::mem::take(&mut *self.wakers.borrow_mut());
        for (_, waker) in wakers {
            waker.wake();
        }
    }

    /// Resolves once the generation differs from `seen`.
    pub fn wait(&self, seen: u64) -> NotifyWait<'_> {
        NotifyWait {
            notify: self,
            seen,
            slot: None,
        }
    }

    /// Waiters registered now (for tests).
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.wakers.borrow().len()
    }
}

/// The future of [`Notify::wait`].
#[derive(Debug)]
pub struct NotifyWait<'a> {
    notify: &'a Notify,
    seen: u64,
    /// Its waker's slot, valid while the generation is still `seen` (a
    /// notification bumps it and empties the slab).
    slot: Option<usize>,
}

impl Future for NotifyWait<'_> {
    type Output = ();

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<()> {
        if self.notify.generation.get() != self.seen {
            self.slot = None;
            return Poll::Ready(());
        }
        let mut wakers = self.notify.wakers.borrow_mut();
        match self.slot {
            Some(slot) => {
                if !wakers[slot].will_wake(cx.waker()) {
                    wakers[slot] = cx.waker().clone();
                }
            }
            None => {
                let slot = wakers.insert(cx.waker().clone());
                drop(wakers);
                self.slot = Some(slot);
            }
        }
        Poll::Pending
    }
}

impl Drop for NotifyWait<'_> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            if self.notify.generation.get() == self.seen {
                self.notify.wakers.borrow_mut().remove(slot);
            }
        }
    }
}

/// A record waiting for the committer.
struct PendingRecord {
    message: Outgoing,
    seq: u64,
    time_ms: u64,
}

/// Publishers waiting for the committer.
#[derive(Default)]
struct Pending {
    records: Vec<PendingRecord>,
    waiters: Vec<futures_channel::oneshot::Sender<Result<(), String>>>,
}

/// Counters of the history, for `/metrics` and the benchmarks.
#[derive(Debug, Default, Clone, Copy)]
pub struct HistoryCounters {
    /// Commit rounds (one write per org touched, then the fsyncs).
    pub commits: u64,
    /// `fdatasync` calls.
    pub fsyncs: u64,
    /// Records written.
    pub records: u64,
    /// Bytes written.
    pub bytes: u64,
}

/// A request to replay a channel to a connection (see [`replay`]).
pub struct ReplayJob {
    /// The connection.
    pub key: crate::registry::ConnKey,
    /// Its org.
    pub org_id: Rc<str>,
    /// The channel.
    pub channel: String,
    /// Replay messages with a larger seq.
    pub after: u64,
    /// Set by [`History::start_replay`]: tells this replay from a later one
    /// of the same connection and channel that replaced it.
    pub id: u64,
}

/// One shard's history.
pub struct History {
    /// Settings.
    pub config: HistoryConfig,
    /// Logs of the orgs this shard owns.
    orgs: RefCell<AHashMap<Rc<str>, OrgLog>>,
    /// Records and publishers waiting for the committer.
    pending: RefCell<Pending>,
    /// Wakes the committer.
    pending_notify: Notify,
    /// Wakes readers after each commit.
    pub committed_notify: Notify,
    /// Wakes replays waiting for a broadcast to be delivered.
    pub delivered_notify: Notify,
    /// Replays waiting for the replay worker.
    replay_jobs: RefCell<VecDeque<ReplayJob>>,
    /// Wakes the replay worker.
    replay_notify: Notify,
    /// (connection, channel) pairs being replayed, with the id of the
    /// replay in charge (a later subscribe with `after` replaces it).
    replaying: RefCell<AHashMap<(crate::registry::ConnKey, String), u64>>,
    /// Id of the next replay.
    next_replay_id: Cell<u64>,
    /// Counters.
    pub counters: Cell<HistoryCounters>,
    /// Set when the shard drains: long-polls stop waiting.
    waits_stopped: Cell<bool>,
}

/// What [`History::open`] found: the history and every org's latest seq.
pub struct Opened {
    /// The shard's history.
    pub history: History,
    /// (org, latest seq) for the registry.
    pub seqs: Vec<(String, u64)>,
}

async fn read_whole(file: &BufferedFile, size: u64) -> Result<Vec<u8>, String> {
    let mut bytes = Vec::with_capacity(size as usize);
    while (bytes.len() as u64) < size {
        let want = ((size - bytes.len() as u64) as usize).min(READ_CHUNK_BYTES);
        let read = file
            .read_at(bytes.len() as u64, want)
            .await
            .map_err(|e| e.to_string())?;
        if read.is_empty() {
            break;
        }
        bytes.extend_from_slice(&read);
    }
    Ok(bytes)
}

/// Bytes read from a segment: the reactor's buffer itself when one read
/// returned them all (the usual case: no copy), else the pieces joined.
enum Span {
    Whole(glommio::io::ReadResult),
    Pieces(Vec<u8>),
}

impl Span {
    fn bytes(&self) -> &[u8] {
        match self {
            Span::Whole(read) => read,
            Span::Pieces(bytes) => bytes,
        }
    }
}

async fn read_span(file: &BufferedFile, start: u64, span: usize) -> Span {
    let mut bytes = Vec::new();
    while bytes.len() < span {
        match file
            .read_at(start + bytes.len() as u64, span - bytes.len())
            .await
        {
            Ok(read) if read.len() == span => return Span::Whole(read),
            Ok(read) if !read.is_empty() => bytes.extend_from_slice(&read),
            _ => break,
        }
    }
    Span::Pieces(bytes)
}

async fn open_rw(path: &Path, create: bool) -> Result<BufferedFile, String> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .buffered_open(path)
        .await
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// fsyncs a directory, so a file created (or removed) in it survives a crash.
async fn sync_dir(path: &Path) -> Result<(), String> {
    let dir = glommio::io::Directory::open(path)
        .await
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let synced = dir
        .sync()
        .await
        .map_err(|e| format!("{}: {e}", path.display()));
    let _ = dir.close().await;
    synced
}

impl History {
    /// Opens the history of shard `shard` of `shards`: scans the segments
    /// of every org it owns, drops a bad record and the rest of its segment
    /// (with a warning on stderr), and rebuilds the index and the seqs.
    pub async fn open(
        config: HistoryConfig,
        shard: usize,
        shards: usize,
    ) -> Result<Opened, String> {
        std::fs::create_dir_all(&config.dir)
            .map_err(|e| format!("history directory {}: {e}", config.dir.display()))?;
        let mut orgs = AHashMap::new();
        let listing = std::fs::read_dir(&config.dir)
            .map_err(|e| format!("history directory {}: {e}", config.dir.display()))?;
        let mut names: Vec<String> = listing
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        let now = now_ms();
        for name in names {
            let Some(org_id) = org_of_dir_name(&name) else {
                continue;
            };
            if shard_for(&org_id, shards) != shard {
                continue;
            }
            let mut org = load_org(&org_id, config.dir.join(&name)).await?;
            for path in org.trim(&config, now) {
                let _ = std::fs::remove_file(path);
            }
            orgs.insert(org.id.clone(), org);
        }
        let seqs = orgs
            .values()
            .filter(|o| o.committed > 0)
            .map(|o| (o.id.to_string(), o.committed))
            .collect();
        Ok(Opened {
            history: History {
                config,
                orgs: RefCell::new(orgs),
                pending: RefCell::new(Pending::default()),
                pending_notify: Notify::default(),
                committed_notify: Notify::default(),
                delivered_notify: Notify::default(),
                replay_jobs: RefCell::new(VecDeque::new()),
                replay_notify: Notify::default(),
                replaying: RefCell::new(AHashMap::new()),
                next_replay_id: Cell::new(0),
                counters: Cell::new(HistoryCounters::default()),
                waits_stopped: Cell::new(false),
            },
            seqs,
        })
    }

    /// Gives each message its org's next seq and waits until the committer
    /// made them durable (per `--durability`), indexed and fanned out.
    /// Returns the seqs in input order.
    pub async fn append(&self, messages: Vec<Outgoing>) -> Result<Vec<u64>, String> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let time_ms = now_ms();
        let (answer, seqs) = {
            let mut orgs = self.orgs.borrow_mut();
            let mut pending = self.pending.borrow_mut();
            let mut seqs = Vec::with_capacity(messages.len());
            for message in messages {
                let org = self.org_entry(&mut orgs, &message.org_id);
                org.assigned += 1;
                seqs.push(org.assigned);
                pending.records.push(PendingRecord {
                    message,
                    seq: org.assigned,
                    time_ms,
                });
            }
            let (reply, answer) = futures_channel::oneshot::channel();
            pending.waiters.push(reply);
            (answer, seqs)
        };
        self.pending_notify.notify();
        match answer.await {
            Ok(Ok(())) => Ok(seqs),
            Ok(Err(e)) => Err(e),
            Err(_) => Err("history committer stopped".to_string()),
        }
    }

    fn org_entry<'a>(
        &self,
        orgs: &'a mut AHashMap<Rc<str>, OrgLog>,
        org_id: &str,
    ) -> &'a mut OrgLog {
        if !orgs.contains_key(org_id) {
            let id: Rc<str> = org_id.into();
            let dir = self.config.dir.join(org_dir_name(org_id));
            orgs.insert(id.clone(), OrgLog::new(id, dir));
        }
        orgs.get_mut(org_id).expect("inserted above")
    }

    /// Ends the waits of long-polls (the shard is draining): each answers
    /// now with what it has, and later queries do not wait.
    pub fn stop_waits(&self) {
        self.waits_stopped.set(true);
        self.committed_notify.notify();
    }

    /// True once [`History::stop_waits`] was called.
    pub fn waits_stopped(&self) -> bool {
        self.waits_stopped.get()
    }

    /// The org's last committed seq.
    pub fn committed(&self, org_id: &str) -> u64 {
        self.orgs.borrow().get(org_id).map_or(0, |o| o.committed)
    }

    /// Highest seq retention dropped (0 when nothing was dropped): an
    /// `after` below it may have missed messages.
    pub fn trimmed_through(&self, org_id: &str) -> u64 {
        self.orgs
            .borrow()
            .get(org_id)
            .map_or(0, |o| o.trimmed_through)
    }

    fn bump(&self, f: impl FnOnce(&mut HistoryCounters)) {
        let mut counters = self.counters.get();
        f(&mut counters);
        self.counters.set(counters);
    }

    /// Retained messages of `org_id` with seq in `(after, upto]` that
    /// `filter` accepts, oldest first, at most `limit`, read only from
    /// memory; `None` when some of them are not in memory.
    pub fn read_cached(
        &self,
        org_id: &str,
        after: u64,
        upto: u64,
        filter: &dyn Fn(MessageKind, Option<&str>) -> bool,
    ) -> Option<Vec<Item>> {
        let orgs = self.orgs.borrow();
        let Some(org) = orgs.get(org_id) else {
            return Some(Vec::new());
        };
        if !org.cached_after(after) {
            return None;
        }
        let mut items = Vec::new();
        for entry in org.entries.range(org.first_after(after)..) {
            if entry.seq > upto {
                break;
            }
            if filter(entry.kind, entry.route.as_deref()) {
                items.push(Item {
                    seq: entry.seq,
                    kind: entry.kind,
                    route: entry.route.clone(),
                    data: org.cached_data(entry.seq)?,
                });
            }
        }
        Some(items)
    }

    /// Retained messages of `org_id` with seq in `(after, upto]` that
    /// `filter` accepts, oldest first, at most `limit` and at most
    /// [`READ_BYTES_MAX`] of them (at least one). Also returns the seq up
    /// to which the log was looked at: `upto` when all that matched were
    /// taken, otherwise the last one returned.
    pub async fn read_forward(
        &self,
        org_id: &str,
        after: u64,
        upto: u64,
        limit: usize,
        filter: &dyn Fn(MessageKind, Option<&str>) -> bool,
    ) -> (Vec<Item>, u64) {
        let mut selected = Vec::new();
        let mut scanned = upto.max(after);
        let mut bytes = 0usize;
        {
            let orgs = self.orgs.borrow();
            if let Some(org) = orgs.get(org_id) {
                for entry in org.entries.range(org.first_after(after)..) {
                    if entry.seq > upto {
                        break;
                    }
                    if filter(entry.kind, entry.route.as_deref()) {
                        let full = selected.len() == limit
                            || (!selected.is_empty()
                                && bytes + entry.len as usize > READ_BYTES_MAX);
                        if full {
                            scanned = selected.last().map_or(after, |e: &Entry| e.seq);
                            break;
                        }
                        bytes += entry.len as usize;
                        selected.push(entry.clone());
                    }
                }
            }
        }
        (self.load(org_id, selected).await, scanned)
    }

    /// Retained messages of `org_id` with seq below `before` (all when
    /// `None`) that `filter` accepts, newest first, at most `limit` and at
    /// most [`READ_BYTES_MAX`] of them (at least one), and whether older
    /// ones exist.
    pub async fn read_backward(
        &self,
        org_id: &str,
        before: Option<u64>,
        limit: usize,
        filter: &dyn Fn(MessageKind, Option<&str>) -> bool,
    ) -> (Vec<Item>, bool) {
        let mut selected = Vec::new();
        let mut has_more = false;
        {
            let orgs = self.orgs.borrow();
            if let Some(org) = orgs.get(org_id) {
                let end = match before {
                    Some(before) => org.entries.partition_point(|e| e.seq < before),
                    None => org.entries.len(),
                };
                let mut bytes = 0usize;
                for entry in org.entries.range(..end).rev() {
                    if filter(entry.kind, entry.route.as_deref()) {
                        let full = selected.len() == limit
                            || (!selected.is_empty()
                                && bytes + entry.len as usize > READ_BYTES_MAX);
                        if full {
                            has_more = true;
                            break;
                        }
                        bytes += entry.len as usize;
                        selected.push(entry.clone());
                    }
                }
            }
        }
        let mut items = self
            .load(org_id, selected.iter().rev().cloned().collect())
            .await;
        items.reverse();
        (items, has_more)
    }

    /// Reads the data of `entries` (in seq order): from memory when
    /// recent, otherwise from the segments, one read per run of nearby
    /// records. Entries whose segment retention deleted meanwhile are left out.
    async fn load(&self, org_id: &str, entries: Vec<Entry>) -> Vec<Item> {
        let mut items: Vec<Option<Item>> = Vec::with_capacity(entries.len());
        // (index in items, segment path, offset, len) of what is on disk only.
        let mut missing: Vec<(usize, PathBuf, u64, u32)> = Vec::new();
        {
            let orgs = self.orgs.borrow();
            let Some(org) = orgs.get(org_id) else {
                return Vec::new();
            };
            for entry in &entries {
                match org.cached_data(entry.seq) {
                    Some(data) => items.push(Some(Item {
                        seq: entry.seq,
                        kind: entry.kind,
                        route: entry.route.clone(),
                        data,
                    })),
                    None => {
                        missing.push((
                            items.len(),
                            org.segment_path(entry.segment),
                            entry.offset,
                            entry.len,
                        ));
                        items.push(None);
                    }
                }
            }
        }
        let mut at = 0;
        while at < missing.len() {
            // A run: same segment, spanning at most READ_CHUNK_BYTES (or one record).
            let path = missing[at].1.clone();
            let start = missing[at].2;
            let mut end_index = at + 1;
            while end_index < missing.len()
                && missing[end_index].1 == path
                && missing[end_index].2 + missing[end_index].3 as u64 - start
                    <= READ_CHUNK_BYTES as u64
            {
                end_index += 1;
            }
            let last = &missing[end_index - 1];
            let span = (last.2 + last.3 as u64 - start) as usize;
            let read = match BufferedFile::open(&path).await {
                Ok(file) => {
                    let read = read_span(&file, start, span).await;
                    let _ = file.close().await;
                    read
                }
                Err(_) => Span::Pieces(Vec::new()),
            };
            let bytes = read.bytes();
            for (index, _, offset, len) in &missing[at..end_index] {
                let from = (offset - start) as usize;
                let to = from + *len as usize;
                if to > bytes.len() {
                    continue;
                }
                match log::decode(&bytes[from..to], true) {
                    Ok((record, _)) => {
                        let entry = &entries[*index];
                        debug_assert_eq!(record.seq, entry.seq);
                        items[*index] = Some(Item {
                            seq: entry.seq,
                            kind: entry.kind,
                            route: entry.route.clone(),
                            data: record.data.into(),
                        });
                    }
                    Err(error) => eprintln!(
                        "hookstream: history: {}: {} at offset {offset} while reading; record skipped",
                        path.display(),
                        error.describe()
                    ),
                }
            }
            at = end_index;
        }
        items.into_iter().flatten().collect()
    }

    /// Queues a replay for the replay worker and marks it in progress; a
    /// replay of the same connection and channel still in progress is
    /// replaced (it stops at its next step, see [`History::is_current_replay`]).
    pub fn start_replay(&self, mut job: ReplayJob) {
        let id = self.next_replay_id.get();
        self.next_replay_id.set(id + 1);
        job.id = id;
        self.replaying
            .borrow_mut()
            .insert((job.key, job.channel.clone()), id);
        self.replay_jobs.borrow_mut().push_back(job);
        self.replay_notify.notify();
    }

    /// True while `channel` is being replayed to `key`.
    pub fn is_replaying(&self, key: crate::registry::ConnKey, channel: &str) -> bool {
        self.replaying
            .borrow()
            .contains_key(&(key, channel.to_string()))
    }

    /// True while `job` is the replay in charge of its connection and
    /// channel: not cancelled, not replaced by a later one.
    pub fn is_current_replay(&self, job: &ReplayJob) -> bool {
        self.replaying.borrow().get(&(job.key, job.channel.clone())) == Some(&job.id)
    }

    /// Ends `job`'s replay, unless a later one replaced it.
    pub fn end_replay(&self, job: &ReplayJob) {
        if self.is_current_replay(job) {
            self.replaying
                .borrow_mut()
                .remove(&(job.key, job.channel.clone()));
        }
    }

    /// Replays in progress for `key` (they count as subscriptions).
    pub fn replays_of(&self, key: crate::registry::ConnKey) -> usize {
        self.replaying
            .borrow()
            .keys()
            .filter(|(k, _)| *k == key)
            .count()
    }

    /// Stops a replay (unsubscribe during the replay); true if there was one.
    pub fn cancel_replay(&self, key: crate::registry::ConnKey, channel: &str) -> bool {
        self.replaying
            .borrow_mut()
            .remove(&(key, channel.to_string()))
            .is_some()
    }
}

/// Reads one org's segments at startup.
async fn load_org(org_id: &str, dir: PathBuf) -> Result<OrgLog, String> {
    let mut org = OrgLog::new(org_id.into(), dir.clone());
    org.dir_ready = true;
    let mut files: Vec<(u64, PathBuf)> = std::fs::read_dir(&dir)
        .map_err(|e| format!("history directory {}: {e}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let first = name.strip_suffix(".log")?.parse::<u64>().ok()?;
            Some((first, e.path()))
        })
        .collect();
    files.sort();
    let mut previous_seq = 0u64;
    for (first_seq, path) in files {
        let file = open_rw(&path, false).await?;
        let size = file
            .file_size()
            .await
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let bytes = read_whole(&file, size).await?;
        let mut segment = Segment {
            first_seq,
            path: path.clone(),
            size: 0,
            records: 0,
            last_seq: first_seq.saturating_sub(1),
            first_time_ms: 0,
        };
        let mut new_entries = Vec::new();
        let mut routes = Vec::new();
        // A segment is named after the first seq of the batch that created
        // it, so every seq below its name was handed out before: the org's
        // seq never goes below that, even when retention deleted the older
        // segments and this one is empty (a crash right after creating it).
        previous_seq = previous_seq.max(first_seq.saturating_sub(1));
        let stop = log::scan(&bytes, org_id, previous_seq, |record, offset, len| {
            if segment.records == 0 {
                segment.first_time_ms = record.time_ms;
            }
            segment.records += 1;
            segment.last_seq = record.seq;
            segment.size = (offset + len) as u64;
            routes.push(record.route.map(str::to_string));
            new_entries.push(Entry {
                seq: record.seq,
                time_ms: record.time_ms,
                segment: first_seq,
                offset: offset as u64,
                len: len as u32,
                kind: record.kind,
                route: None,
            });
        });
        if let Some(stop) = stop {
            eprintln!(
                "hookstream: warning: history segment {}: {} at offset {}: dropping that record and the {} byte(s) after it in this segment",
                path.display(),
                stop.error.describe(),
                stop.offset,
                bytes.len() - stop.offset
            );
            file.truncate(stop.offset as u64)
                .await
                .map_err(|e| format!("{}: {e}", path.display()))?;
            file.fdatasync()
                .await
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        let _ = file.close().await;
        debug_assert_eq!(
            segment.size as usize,
            stop.map_or(bytes.len(), |s| s.offset)
        );
        for (mut entry, route) in new_entries.into_iter().zip(routes) {
            entry.route = org.intern_route(route.as_deref());
            org.entries.push_back(entry);
        }
        if segment.records > 0 {
            previous_seq = segment.last_seq;
        }
        org.segments.push_back(segment);
    }
    org.assigned = previous_seq;
    org.committed = previous_seq;
    org.trimmed_through = org.entries.front().map_or(previous_seq, |e| e.seq - 1);
    Ok(org)
}

/// The committer: writes what publishers queued, makes it durable, then
/// indexes it, answers the publishers and fans it out. Runs for the life
/// of the shard.
pub async fn commit_loop(shard: Rc<Shard>) {
    let history = &shard.history;
    loop {
        let seen = history.pending_notify.generation();
        let batch = std::mem::take(&mut *history.pending.borrow_mut());
        if batch.records.is_empty() {
            history.pending_notify.wait(seen).await;
            continue;
        }
        let outcome = commit(history, &batch.records).await;
        history.bound_open_writers();
        match &outcome {
            Ok(()) => {
                // Staged in the same step as the commit (no await since it
                // returned), so every committed record is being delivered.
                let staged = {
                    let mut registry = shard.registry.borrow_mut();
                    let mut staged = Vec::new();
                    for record in &batch.records {
                        registry.stage(&record.message, record.seq, &mut staged);
                    }
                    staged
                };
                history.committed_notify.notify();
                // The publishers' answer does not wait for the walk, which
                // takes the kernel ~75 ms per 10,000 subscribers: what was
                // answered is durable and staged. Publishes that arrive
                // meanwhile still wait for it, in the next round.
                answer(batch.waiters, &outcome);
                // Let the publishers' tasks write their answers first.
                futures_lite::future::yield_now().await;
                shard.deliver(staged).await;
                history.delivered_notify.notify();
            }
            Err(e) => {
                eprintln!(
                    "hookstream: history: shard {}: commit failed: {e}",
                    shard.id
                );
                answer(batch.waiters, &outcome);
            }
        }
    }
}

/// Tells each publisher of a round how its commit went.
fn answer(
    waiters: Vec<futures_channel::oneshot::Sender<Result<(), String>>>,
    outcome: &Result<(), String>,
) {
    for waiter in waiters {
        let _ = waiter.send(outcome.clone());
    }
}

/// Writes one batch and makes it durable; on success indexes it.
async fn commit(history: &History, records: &[PendingRecord]) -> Result<(), String> {
    // Group by org, keeping order.
    let mut by_org: Vec<(Rc<str>, Vec<&PendingRecord>)> = Vec::new();
    let mut position: AHashMap<&str, usize> = AHashMap::new();
    for record in records {
        let org_id = record.message.org_id.as_str();
        match position.get(org_id) {
            Some(&at) => by_org[at].1.push(record),
            None => {
                position.insert(org_id, by_org.len());
                by_org.push((org_id.into(), vec![record]));
            }
        }
    }
    let fsync = history.config.durability == Durability::Fsync;
    let mut to_sync: Vec<Rc<BufferedFile>> = Vec::new();
    let mut dirs_to_sync: Vec<PathBuf> = Vec::new();
    // (org, segment first_seq, offset of the batch in the segment)
    let mut written: Vec<(Rc<str>, u64, u64)> = Vec::new();
    let mut bytes_total = 0u64;
    // Prepare and encode every org's part, then write them all at once.
    let mut parts: Vec<(Rc<BufferedFile>, u64, u64)> = Vec::with_capacity(by_org.len());
    let mut writes = Vec::with_capacity(by_org.len());
    for (org_id, list) in &by_org {
        let first_seq = list[0].seq;
        let (writer, offset, segment_first) = prepare_segment(
            history,
            org_id,
            first_seq,
            list[0].time_ms,
            &mut dirs_to_sync,
        )
        .await?;
        let mut buffer = Vec::with_capacity(
            list.iter()
                .map(|r| log::encoded_len(org_id, r.message.route_id.as_deref(), &r.message.data))
                .sum(),
        );
        for record in list {
            log::encode(
                &mut buffer,
                &log::Record {
                    seq: record.seq,
                    time_ms: record.time_ms,
                    kind: record.message.kind,
                    org: org_id,
                    route: record.message.route_id.as_deref(),
                    data: &record.message.data,
                },
            );
        }
        written.push((org_id.clone(), segment_first, offset));
        parts.push((writer.clone(), offset, buffer.len() as u64));
        // Started now, awaited below: the writes of all orgs overlap.
        writes.push(glommio::spawn_local(async move {
            write_all(&writer, buffer, offset).await
        }));
    }
    let mut failure = None;
    for write in writes {
        if let Err(e) = write.await {
            failure = Some(e);
        }
    }
    if let Some(e) = failure {
        // No segment size moved: the next commit writes over the same offsets.
        return Err(format!("writing history: {e}"));
    }
    {
        let now = now_ms();
        let mut orgs = history.orgs.borrow_mut();
        for ((org_id, _), (_, offset, len)) in by_org.iter().zip(&parts) {
            let org = orgs.get_mut(&**org_id).expect("prepared");
            let segment = org.segments.back_mut().expect("prepared");
            segment.size = offset + len;
            org.last_write_ms = now;
            bytes_total += len;
        }
    }
    if fsync {
        to_sync.extend(parts.into_iter().map(|(writer, _, _)| writer));
    }
    if fsync {
        let mut tasks = Vec::new();
        for dir in dirs_to_sync {
            tasks.push(glommio::spawn_local(async move { sync_dir(&dir).await }));
        }
        let fsyncs = to_sync.len() as u64;
        for file in to_sync {
            tasks.push(glommio::spawn_local(async move {
                file.fdatasync().await.map_err(|e| e.to_string())
            }));
        }
        let mut failure = None;
        for task in tasks {
            if let Err(e) = task.await {
                failure = Some(e);
            }
        }
        history.bump(|c| c.fsyncs += fsyncs);
        if let Some(e) = failure {
            return Err(format!("fdatasync of history: {e}"));
        }
    }
    history.bump(|c| {
        c.commits += 1;
        c.records += records.len() as u64;
        c.bytes += bytes_total;
    });
    // Durable: index it.
    let now = now_ms();
    let mut orgs = history.orgs.borrow_mut();
    let mut deleted = Vec::new();
    for ((org_id, list), (_, segment_first, mut offset)) in by_org.iter().zip(written) {
        let org = orgs.get_mut(&**org_id).expect("prepared");
        for record in list {
            let len = log::encoded_len(
                org_id,
                record.message.route_id.as_deref(),
                &record.message.data,
            );
            let route = org.intern_route(record.message.route_id.as_deref());
            org.entries.push_back(Entry {
                seq: record.seq,
                time_ms: record.time_ms,
                segment: segment_first,
                offset,
                len: len as u32,
                kind: record.message.kind,
                route,
            });
            offset += len as u64;
            org.remember(record.seq, record.message.data.as_ref().into());
            org.committed = record.seq;
            let segment = org.segments.back_mut().expect("prepared");
            if segment.records == 0 {
                segment.first_time_ms = record.time_ms;
            }
            segment.records += 1;
            segment.last_seq = record.seq;
        }
        if org.entries.len() as u64 > history.config.messages_max {
            deleted.extend(org.trim(&history.config, now));
        }
    }
    drop(orgs);
    for path in deleted {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

async fn write_all(file: &BufferedFile, buffer: Vec<u8>, offset: u64) -> Result<(), String> {
    let total = buffer.len();
    // A regular file takes the whole write unless the disk is full; a short
    // write fails the commit, and the next one overwrites from `offset`.
    let written = file
        .write_at(buffer, offset)
        .await
        .map_err(|e| e.to_string())?;
    if written < total {
        return Err(format!(
            "short write: {written} of {total} bytes (disk full?)"
        ));
    }
    Ok(())
}

/// Makes sure the org has a directory and an active segment with room,
/// starting a new segment (named `first_seq`) when the last one is full or
/// old. Returns the writer, the offset to write at and the segment's name.
async fn prepare_segment(
    history: &History,
    org_id: &Rc<str>,
    first_seq: u64,
    time_ms: u64,
    dirs_to_sync: &mut Vec<PathBuf>,
) -> Result<(Rc<BufferedFile>, u64, u64), String> {
    let (dir, dir_ready, roll, writer, path) = {
        let mut orgs = history.orgs.borrow_mut();
        let org = history.org_entry(&mut orgs, org_id);
        let roll = match org.segments.back() {
            None => true,
            Some(segment) => {
                segment.size >= SEGMENT_BYTES_MAX
                    || segment.records >= history.config.segment_records_max()
                    || (segment.records > 0
                        && time_ms.saturating_sub(segment.first_time_ms)
                            >= history.config.segment_age_ms())
            }
        };
        let path = if roll {
            org.segment_path(first_seq)
        } else {
            org.segments.back().expect("not rolling").path.clone()
        };
        (
            org.dir.clone(),
            org.dir_ready,
            roll,
            org.writer.clone(),
            path,
        )
    };
    if !dir_ready {
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        dirs_to_sync.push(history.config.dir.clone());
        history
            .orgs
            .borrow_mut()
            .get_mut(&**org_id)
            .expect("created")
            .dir_ready = true;
    }
    if !roll {
        if let Some(writer) = writer {
            let orgs = history.orgs.borrow();
            let org = orgs.get(&**org_id).expect("created");
            let segment = org.segments.back().expect("not rolling");
            return Ok((writer, segment.size, segment.first_seq));
        }
        // Reopen the last segment (after a restart) for appending.
        let file = Rc::new(open_rw(&path, false).await?);
        let mut orgs = history.orgs.borrow_mut();
        let org = orgs.get_mut(&**org_id).expect("created");
        org.writer = Some(file.clone());
        let segment = org.segments.back().expect("not rolling");
        return Ok((file, segment.size, segment.first_seq));
    }
    let file = Rc::new(open_rw(&path, true).await?);
    dirs_to_sync.push(dir);
    let old = {
        let mut orgs = history.orgs.borrow_mut();
        let org = orgs.get_mut(&**org_id).expect("created");
        org.segments.push_back(Segment {
            first_seq,
            path,
            size: 0,
            records: 0,
            last_seq: first_seq - 1,
            first_time_ms: time_ms,
        });
        org.writer.replace(file.clone())
    };
    if let Some(old) = old {
        // Written records of the old segment were synced by their commit.
        if let Ok(old) = Rc::try_unwrap(old) {
            let _ = old.close().await;
        }
    }
    Ok((file, 0, first_seq))
}

/// Applies retention by age every second.
pub async fn retention_loop(shard: Rc<Shard>) {
    loop {
        glommio::timer::sleep(Duration::from_millis(RETENTION_INTERVAL_MS)).await;
        let history = &shard.history;
        let now = now_ms();
        let deleted: Vec<PathBuf> = {
            let mut orgs = history.orgs.borrow_mut();
            for org in orgs.values_mut() {
                if now.saturating_sub(org.last_write_ms) >= WRITER_IDLE_MS {
                    // Dropping closes the file (asynchronously); the next
                    // commit reopens it. The in-memory tail goes too.
                    org.writer = None;
                    org.recent = VecDeque::new();
                    org.recent_bytes = 0;
                }
            }
            orgs.values_mut()
                .flat_map(|org| org.trim(&history.config, now))
                .collect()
        };
        for path in deleted {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn poll_once(wait: &mut NotifyWait<'_>) -> Poll<()> {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        std::pin::Pin::new(wait).poll(&mut cx)
    }

    #[test]
    fn notify_keeps_only_live_waiters_however_many() {
        let notify = Notify::default();
        let seen = notify.generation();
        let mut waits: Vec<NotifyWait<'_>> = (0..5_000).map(|_| notify.wait(seen)).collect();
        for wait in &mut waits {
            assert!(poll_once(wait).is_pending());
        }
        // No cap wakes them early; polling again registers nothing new.
        assert_eq!(notify.waiting(), 5_000);
        assert!(poll_once(&mut waits[0]).is_pending());
        assert_eq!(notify.waiting(), 5_000);
        // Waiters that end without being woken take their wakers along.
        let mut last = waits.pop().unwrap();
        drop(waits);
        assert_eq!(notify.waiting(), 1);
        notify.notify();
        assert_eq!(notify.waiting(), 0);
        assert!(poll_once(&mut last).is_ready());
    }

    #[test]
    fn a_waiter_from_before_a_notification_leaves_newer_ones_alone() {
        let notify = Notify::default();
        let mut old = notify.wait(notify.generation());
        assert!(poll_once(&mut old).is_pending());
        notify.notify();
        // A new waiter may get the slot the old one had.
        let mut new = notify.wait(notify.generation());
        assert!(poll_once(&mut new).is_pending());
        drop(old);
        assert_eq!(notify.waiting(), 1);
        notify.notify();
        assert!(poll_once(&mut new).is_ready());
    }

    #[test]
    fn org_dir_names_round_trip() {
        for org in ["org_a", "A-b_9", "weird/../org", "é", ""] {
            let name = org_dir_name(org);
            assert!(!name.contains('/'));
            if !org.is_empty() {
                assert_eq!(org_of_dir_name(&name).as_deref(), Some(org));
            }
        }
        assert_eq!(org_dir_name("org_a"), "org_a");
        assert_eq!(org_of_dir_name("~zz"), None);
        assert_eq!(org_of_dir_name("a.b"), None);
    }
}
