//! The log of cluster mode: every org's messages are a JetStream stream
//! shared by all gateway nodes (`crate::cluster`), and this shard keeps,
//! per org it follows, only the last seq it delivered, the highest seq
//! retention dropped, and a short tail of recent messages in memory.
//!
//! Nothing is appended through this log: a publish goes to the stream
//! through the bridge on whichever node received it, and every node that
//! follows the org receives it back from the stream. The follower's
//! messages come to the committer as arrivals ([`Log::index_arrived`]):
//! indexed (the org's seq moves) and staged for live delivery in one
//! synchronous step, exactly as a local round — so replay's switch to live
//! keeps its no-gap, no-duplicate rule. Reads the tail cannot answer go to
//! the stream.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use super::log::{Appending, Log, LogCounters};
use super::{Retained, READ_BYTES_MAX};
use crate::cluster::{Arrival, Bridge};
use crate::message::ChannelFilter;

/// Newest messages kept in memory per followed org.
const TAIL_MESSAGES: usize = 512;
/// Most bytes of data kept in memory per followed org.
const TAIL_BYTES: usize = 512 << 10;
/// Tries of a read before it gives up (250 ms apart).
const READ_TRIES: usize = 8;
/// Messages per backward window.
const BACKWARD_WINDOW: u64 = 256;
/// Most messages a backward read looks at.
const BACKWARD_SCAN_MAX: u64 = 10_000;

/// One followed org.
struct OrgState {
    /// The last seq delivered (staged) on this node.
    last: u64,
    /// The highest seq retention dropped.
    trimmed: u64,
    /// The newest messages, contiguous up to `last`, with their times.
    tail: VecDeque<(Retained, u64)>,
    /// Data bytes in `tail`.
    tail_bytes: usize,
}

/// The JetStream log of one shard: the orgs it follows.
pub struct JetStreamLog {
    bridge: Arc<Bridge>,
    messages_max: u64,
    orgs: RefCell<HashMap<String, OrgState>>,
    counters: Cell<LogCounters>,
}

fn retained(arrival: &Arrival) -> Retained {
    Retained {
        seq: arrival.seq,
        kind: arrival.message.kind,
        route: arrival.message.route_id.as_deref().map(Rc::from),
        data: Arc::from(&*arrival.message.data),
    }
}

impl JetStreamLog {
    /// The log over `bridge`; `messages_max` is `--history-messages`.
    pub fn new(bridge: Arc<Bridge>, messages_max: u64) -> JetStreamLog {
        JetStreamLog {
            bridge,
            messages_max,
            orgs: RefCell::new(HashMap::new()),
            counters: Cell::new(LogCounters::default()),
        }
    }

    /// The bridge.
    pub fn bridge(&self) -> &Arc<Bridge> {
        &self.bridge
    }

    /// True when this shard follows `org` (its seq is known).
    pub fn is_followed(&self, org: &str) -> bool {
        self.orgs.borrow().contains_key(org)
    }

    /// The follow of `org` started with the stream at `(first, last)`.
    pub fn followed(&self, org: &str, first: u64, last: u64) {
        let trimmed = if first > last {
            last
        } else {
            first.saturating_sub(1)
        };
        self.orgs.borrow_mut().insert(
            org.to_string(),
            OrgState {
                last,
                trimmed,
                tail: VecDeque::new(),
                tail_bytes: 0,
            },
        );
    }

    /// Retention dropped the stream's messages up to `through`.
    pub fn trimmed(&self, org: &str, through: u64) {
        if let Some(state) = self.orgs.borrow_mut().get_mut(org) {
            state.trimmed = state.trimmed.max(through);
            while state.tail.front().is_some_and(|(r, _)| r.seq <= through) {
                let (r, _) = state.tail.pop_front().expect("front exists");
                state.tail_bytes -= r.data.len();
            }
        }
    }

    /// The org is no longer followed: its state goes.
    pub fn forget(&self, org: &str) {
        self.orgs.borrow_mut().remove(org);
    }

    /// The orgs followed.
    pub fn followed_orgs(&self) -> Vec<String> {
        self.orgs.borrow().keys().cloned().collect()
    }

    /// The tail's answer for `(after, upto]` when it holds all of it.
    fn tail_read(
        &self,
        org: &str,
        after: u64,
        upto: u64,
        limit: usize,
        channels: &[String],
    ) -> Option<(Vec<Retained>, u64)> {
        let orgs = self.orgs.borrow();
        let state = orgs.get(org)?;
        if upto > state.last {
            return None;
        }
        if after >= upto {
            return Some((Vec::new(), upto));
        }
        let first = state.tail.front().map_or(state.last + 1, |(r, _)| r.seq);
        if after + 1 < first {
            return None;
        }
        let filter = ChannelFilter::new(channels);
        let mut out = Vec::new();
        let mut bytes = 0;
        for (item, _) in &state.tail {
            if item.seq <= after
                || item.seq > upto
                || !filter.matches(item.kind, item.route.as_deref())
            {
                continue;
            }
            bytes += item.data.len();
            out.push(item.clone());
            if out.len() >= limit || bytes >= READ_BYTES_MAX {
                return Some((out, item.seq));
            }
        }
        Some((out, upto))
    }

    /// Reads `[from, upto]` from the stream, retrying a failed read a few
    /// times; notes what the stream's first seq says about retention.
    async fn stream_read(
        &self,
        org: &str,
        from: u64,
        upto: u64,
        limit: usize,
        channels: &[String],
        bytes_max: usize,
    ) -> Option<crate::cluster::Read> {
        for attempt in 0..READ_TRIES {
            let answer = self
                .bridge
                .read(org, from, upto, limit, channels.to_vec(), bytes_max)
                .await;
            match answer {
                Ok(Ok(read)) => {
                    let first = read.first_seq.unwrap_or(read.looked_upto + 1);
                    if first > from {
                        if let Some(state) = self.orgs.borrow_mut().get_mut(org) {
                            state.trimmed = state.trimmed.max(first.min(upto + 1) - 1);
                        }
                    }
                    return Some(read);
                }
                Ok(Err(e)) if attempt + 1 == READ_TRIES => {
                    eprintln!("hookstream: cluster: reading {org}: {e}");
                }
                _ => {}
            }
            glommio::timer::sleep(Duration::from_millis(250)).await;
        }
        None
    }
}

impl Log for JetStreamLog {
    async fn append(&self, _round: &[Appending]) -> Result<Vec<u64>, String> {
        // A cluster node publishes to the stream through the bridge
        // (`Shard::publish`); its messages come back as arrivals.
        Err("cluster mode publishes through JetStream".to_string())
    }

    fn last_seq(&self, org_id: &str) -> u64 {
        self.orgs.borrow().get(org_id).map_or(0, |s| s.last)
    }

    fn trimmed_through(&self, org_id: &str) -> u64 {
        self.orgs.borrow().get(org_id).map_or(0, |s| s.trimmed)
    }

    fn read_cached(
        &self,
        org_id: &str,
        after: u64,
        upto: u64,
        channels: &[String],
    ) -> Option<Vec<Retained>> {
        self.tail_read(org_id, after, upto, usize::MAX, channels)
            .map(|(items, _)| items)
    }

    async fn read_forward(
        &self,
        org_id: &str,
        after: u64,
        upto: u64,
        limit: usize,
        channels: &[String],
    ) -> (Vec<Retained>, u64) {
        if let Some(answer) = self.tail_read(org_id, after, upto, limit, channels) {
            return answer;
        }
        match self
            .stream_read(org_id, after + 1, upto, limit, channels, READ_BYTES_MAX)
            .await
        {
            Some(read) => (
                read.messages.iter().map(retained).collect(),
                read.looked_upto,
            ),
            None => (Vec::new(), after),
        }
    }

    async fn read_backward(
        &self,
        org_id: &str,
        before: Option<u64>,
        limit: usize,
        channels: &[String],
    ) -> (Vec<Retained>, bool) {
        let last = self.last_seq(org_id);
        let mut hi = before.map_or(last, |b| b.saturating_sub(1).min(last));
        let mut out: Vec<Retained> = Vec::new();
        let mut scanned = 0;
        let mut bytes = 0;
        // Windows are read oldest first, so a window's matches are loaded
        // whole (at most READ_BYTES_MAX of them, and one more): one whose
        // matches are more than that is read again narrower, ending at the
        // same seq, as wide as the part that fit (so a page of large
        // messages never loads 256 of them at once).
        let mut window = BACKWARD_WINDOW;
        loop {
            let floor = self.trimmed_through(org_id) + 1;
            if hi < floor || out.len() > limit || scanned >= BACKWARD_SCAN_MAX {
                break;
            }
            let lo = floor.max(hi.saturating_sub(window - 1));
            let Some(read) = self
                .stream_read(org_id, lo, hi, usize::MAX, channels, READ_BYTES_MAX)
                .await
            else {
                break;
            };
            if read.looked_upto < hi {
                // Cut by the byte bound: strictly narrower, down to one seq
                // (which is never cut).
                window = (read.looked_upto.max(lo) - lo + 1).min(hi - lo).max(1);
                continue;
            }
            for arrival in read.messages.iter().rev() {
                out.push(retained(arrival));
                bytes += arrival.message.data.len();
                if out.len() > limit || bytes >= READ_BYTES_MAX {
                    break;
                }
            }
            scanned += hi - lo + 1;
            if lo <= 1 {
                hi = 0;
                break;
            }
            hi = lo - 1;
            if bytes >= READ_BYTES_MAX {
                break;
            }
        }
        let mut more = out.len() > limit || (hi > self.trimmed_through(org_id) && !out.is_empty());
        if out.len() > limit {
            out.truncate(limit);
        }
        // The byte bound: at least one message.
        let mut total = 0;
        let mut keep = out.len();
        for (i, item) in out.iter().enumerate() {
            total += item.data.len();
            if total >= READ_BYTES_MAX {
                keep = i + 1;
                break;
            }
        }
        if keep < out.len() {
            out.truncate(keep);
            more = true;
        }
        (out, more)
    }

    async fn retain(&self, _now_ms: u64) {
        // The stream's limits apply retention (JetStream's own).
    }

    fn last_seqs(&self) -> Vec<(String, u64)> {
        // Nothing is known before an org is followed.
        Vec::new()
    }

    fn counters(&self) -> LogCounters {
        self.counters.get()
    }

    fn index_arrived(&self, batch: Vec<Arrival>) -> Vec<(Appending, u64)> {
        let mut out = Vec::with_capacity(batch.len());
        let mut orgs = self.orgs.borrow_mut();
        let mut counters = self.counters.get();
        for arrival in batch {
            let Some(state) = orgs.get_mut(&arrival.message.org_id) else {
                continue;
            };
            if arrival.seq <= state.last {
                continue;
            }
            if arrival.seq != state.last + 1 {
                // The follower backfills jumps; what it could not find
                // retention dropped.
                state.trimmed = state.trimmed.max(arrival.seq - 1);
                state.tail.clear();
                state.tail_bytes = 0;
            }
            state.last = arrival.seq;
            state.trimmed = state
                .trimmed
                .max(arrival.seq.saturating_sub(self.messages_max));
            let item = retained(&arrival);
            state.tail_bytes += item.data.len();
            state.tail.push_back((item, arrival.time_ms));
            while state.tail.len() > TAIL_MESSAGES
                || (state.tail_bytes > TAIL_BYTES && state.tail.len() > 1)
            {
                let (r, _) = state.tail.pop_front().expect("not empty");
                state.tail_bytes -= r.data.len();
            }
            counters.records += 1;
            counters.bytes += arrival.message.data.len() as u64;
            out.push((
                Appending {
                    message: arrival.message,
                    time_ms: arrival.time_ms,
                },
                arrival.seq,
            ));
        }
        if !out.is_empty() {
            counters.commits += 1;
        }
        self.counters.set(counters);
        out
    }
}
