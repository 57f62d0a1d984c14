//! The local segmented log: the first implementation of the history's
//! [`Log`] seam. One directory per org under `<data-dir>/history`, each
//! holding that org's segment files named by the seq of their first record
//! (20 digits, so names sort); the in-memory index of every retained
//! message, the newest messages' data kept in memory, retention by count
//! and age that deletes whole segments, and the scan that rebuilds it all
//! at startup, dropping a torn or corrupt tail.
//!
//! Only the org's owner shard (`shard_for(org, shards)`) ever opens an
//! org's files, so with any `--shards` a shard finds its orgs by listing
//! the directory and keeping the names that hash to it; nothing is
//! rewritten when the shard count changes.
//!
//! - this file: [`SegmentedLog`] and its [`Log`] methods (opening, reads,
//!   retention);
//! - `org`: one org's log (segments, index, in-memory tail, trimming);
//! - `files`: segment file I/O and the startup scan;
//! - `commit`: writing, syncing and indexing one round.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::rc::Rc;

use ahash::AHashMap;
use glommio::io::BufferedFile;

mod commit;
mod files;
mod org;
mod writers;

use self::commit::{commit, Numbered};
use self::files::{load_org, read_span, Span};
use self::org::{org_dir_name, org_of_dir_name, IndexEntry, OrgLog};
use super::log::{Appending, Log, LogCounters};
use super::{now_ms, record, HistoryConfig, Retained, READ_BYTES_MAX};
use crate::message::ChannelFilter;
use crate::placement::shard_for;

/// Index entries a history read looks at between chances for the shard's
/// other work to run (when the read has had its time slice).
const SCAN_STEP: usize = 4096;
/// The index entries a read takes: at most `limit`, and at most
/// `READ_BYTES_MAX` of records by their indexed length (at least one).
struct Page {
    selected: Vec<IndexEntry>,
    bytes: usize,
    limit: usize,
}

impl Page {
    fn new(limit: usize) -> Page {
        Page {
            selected: Vec::new(),
            bytes: 0,
            limit,
        }
    }

    /// Takes `entry`; false when the page is full (it is not taken).
    fn take(&mut self, entry: &IndexEntry) -> bool {
        let len = entry.len as usize;
        let full = self.selected.len() == self.limit
            || (!self.selected.is_empty() && self.bytes + len > READ_BYTES_MAX);
        if !full {
            self.bytes += len;
            self.selected.push(entry.clone());
        }
        !full
    }
}

/// Largest single read of a segment when serving history.
const READ_CHUNK_BYTES: usize = 4 << 20;
/// An org's open segment is closed after this long without a write, so
/// idle orgs hold no file descriptor.
const WRITER_IDLE_MS: u64 = 30_000;

/// One shard's segmented log: the logs of the orgs it owns.
pub struct SegmentedLog {
    /// Settings.
    config: HistoryConfig,
    /// Logs of the orgs this shard owns.
    orgs: RefCell<AHashMap<Rc<str>, OrgLog>>,
    /// What the log did, for `/metrics`.
    counters: Cell<LogCounters>,
}

impl SegmentedLog {
    /// Opens the log of shard `shard` of `shards`: scans the segments of
    /// every org it owns, drops a bad record and the rest of its segment
    /// (with a warning on stderr), and rebuilds the index and the seqs.
    pub async fn open(
        config: HistoryConfig,
        shard: usize,
        shards: usize,
    ) -> Result<SegmentedLog, String> {
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
        Ok(SegmentedLog {
            config,
            orgs: RefCell::new(orgs),
            counters: Cell::new(LogCounters::default()),
        })
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

    fn bump(&self, f: impl FnOnce(&mut LogCounters)) {
        let mut counters = self.counters.get();
        f(&mut counters);
        self.counters.set(counters);
    }

    /// Reads the data of `entries` (in seq order): from memory when
    /// recent, otherwise from the segments, one read per run of nearby
    /// records. Entries whose segment retention deleted meanwhile are left out.
    async fn load(&self, org_id: &str, entries: Vec<IndexEntry>) -> Vec<Retained> {
        let mut items: Vec<Option<Retained>> = Vec::with_capacity(entries.len());
        // (index in items, segment path, offset, len) of what is on disk only.
        let mut missing: Vec<(usize, PathBuf, u64, u32)> = Vec::new();
        {
            let orgs = self.orgs.borrow();
            let Some(org) = orgs.get(org_id) else {
                return Vec::new();
            };
            for entry in &entries {
                match org.cached_data(entry.seq) {
                    Some(data) => items.push(Some(Retained {
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
                match record::decode(&bytes[from..to], true) {
                    Ok((record, _)) => {
                        let entry = &entries[*index];
                        debug_assert_eq!(record.seq, entry.seq);
                        items[*index] = Some(Retained {
                            seq: entry.seq,
                            kind: entry.kind,
                            route: entry.route.clone(),
                            data: record.data.into(),
                        });
                    }
                    Err(error) => crate::log::warn(format_args!(
                        "hookstream: history: {}: {} at offset {offset} while reading; record skipped",
                        path.display(),
                        error.describe()
                    )),
                }
            }
            at = end_index;
        }
        items.into_iter().flatten().collect()
    }
}

impl Log for SegmentedLog {
    async fn append(&self, round: &[Appending]) -> Result<Vec<u64>, String> {
        // Seqs are handed out before the write: a round that fails leaves
        // its seqs unused (never shown to anyone), as a crash would.
        let numbered: Vec<Numbered<'_>> = {
            let mut orgs = self.orgs.borrow_mut();
            round
                .iter()
                .map(|appending| {
                    let org = self.org_entry(&mut orgs, &appending.message.org_id);
                    org.assigned += 1;
                    Numbered {
                        message: &appending.message,
                        seq: org.assigned,
                        time_ms: appending.time_ms,
                    }
                })
                .collect()
        };
        let outcome = commit(self, &numbered).await;
        // Synchronous, after the last await: the caller still stages the
        // round in the same step.
        self.bound_open_writers();
        outcome?;
        Ok(numbered.iter().map(|n| n.seq).collect())
    }

    /// The org's last committed seq.
    fn last_seq(&self, org_id: &str) -> u64 {
        self.orgs.borrow().get(org_id).map_or(0, |o| o.committed)
    }

    /// Highest seq retention dropped (0 when nothing was dropped): an
    /// `after` below it may have missed messages.
    fn trimmed_through(&self, org_id: &str) -> u64 {
        self.orgs
            .borrow()
            .get(org_id)
            .map_or(0, |o| o.trimmed_through)
    }

    /// Retained messages of `org_id` with seq in `(after, upto]` that
    /// `filter` accepts, oldest first, at most `limit`, read only from
    /// memory; `None` when some of them are not in memory.
    fn read_cached(
        &self,
        org_id: &str,
        after: u64,
        upto: u64,
        channels: &[String],
    ) -> Option<Vec<Retained>> {
        let filter = ChannelFilter::new(channels);
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
            if filter.matches(entry.kind, entry.route.as_deref()) {
                items.push(Retained {
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
    /// `filter` accepts, oldest first, at most `limit`. Also returns the
    /// seq up to which the log was looked at: `upto` when fewer than
    /// `limit` matched, otherwise the last one returned.
    async fn read_forward(
        &self,
        org_id: &str,
        after: u64,
        upto: u64,
        limit: usize,
        channels: &[String],
    ) -> (Vec<Retained>, u64) {
        let filter = ChannelFilter::new(channels);
        let mut page = Page::new(limit);
        let mut scanned = upto.max(after);
        // Looked at SCAN_STEP entries at a time, letting the shard's other
        // work run in between when this read has had its share: with few
        // matches a read may look at every retained entry.
        let mut from = after;
        loop {
            let mut more = false;
            {
                let orgs = self.orgs.borrow();
                let Some(org) = orgs.get(org_id) else {
                    break;
                };
                let entries = org.entries.range(org.first_after(from)..);
                for (looked, entry) in entries.enumerate() {
                    if entry.seq > upto {
                        break;
                    }
                    if looked == SCAN_STEP {
                        more = true;
                        break;
                    }
                    from = entry.seq;
                    if filter.matches(entry.kind, entry.route.as_deref()) && !page.take(entry) {
                        scanned = page.selected.last().map_or(after, |e| e.seq);
                        break;
                    }
                }
            }
            if !more {
                break;
            }
            glommio::yield_if_needed().await;
        }
        (self.load(org_id, page.selected).await, scanned)
    }

    /// Retained messages of `org_id` with seq below `before` (all when
    /// `None`) that `filter` accepts, newest first, at most `limit`, and
    /// whether older ones exist.
    async fn read_backward(
        &self,
        org_id: &str,
        before: Option<u64>,
        limit: usize,
        channels: &[String],
    ) -> (Vec<Retained>, bool) {
        let filter = ChannelFilter::new(channels);
        let mut page = Page::new(limit);
        let mut has_more = false;
        // SCAN_STEP entries at a time, as in `read_forward`.
        let mut below = before;
        loop {
            let mut more = false;
            {
                let orgs = self.orgs.borrow();
                let Some(org) = orgs.get(org_id) else {
                    break;
                };
                let end = match below {
                    Some(below) => org.entries.partition_point(|e| e.seq < below),
                    None => org.entries.len(),
                };
                for (looked, entry) in org.entries.range(..end).rev().enumerate() {
                    if looked == SCAN_STEP {
                        more = true;
                        break;
                    }
                    below = Some(entry.seq);
                    if filter.matches(entry.kind, entry.route.as_deref()) && !page.take(entry) {
                        has_more = true;
                        break;
                    }
                }
            }
            if !more {
                break;
            }
            glommio::yield_if_needed().await;
        }
        page.selected.reverse();
        let mut items = self.load(org_id, page.selected).await;
        items.reverse();
        (items, has_more)
    }

    async fn retain(&self, now: u64) {
        let deleted: Vec<PathBuf> = {
            let mut orgs = self.orgs.borrow_mut();
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
                .flat_map(|org| org.trim(&self.config, now))
                .collect()
        };
        for path in deleted {
            let _ = std::fs::remove_file(path);
        }
    }

    fn last_seqs(&self) -> Vec<(String, u64)> {
        self.orgs
            .borrow()
            .values()
            .filter(|o| o.committed > 0)
            .map(|o| (o.id.to_string(), o.committed))
            .collect()
    }

    fn counters(&self) -> LogCounters {
        self.counters.get()
    }
}
