//! One org's log on its owner shard: its segment files, the index of its
//! retained messages, the newest messages' data kept in memory, retention,
//! and the name of its directory.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;

use ahash::AHashSet;
use glommio::io::BufferedFile;

use super::super::HistoryConfig;
use crate::message::MessageKind;

/// Newest messages of each org kept in memory, so replay can finish and
/// long-polls answer without touching the disk. Dropped when the org has
/// been idle for `WRITER_IDLE_MS`, so memory follows the orgs publishing now.
pub(super) const RECENT_MESSAGES_MAX: usize = 512;

/// Bytes of `data` kept in memory per org for those messages.
pub(super) const RECENT_BYTES_MAX: usize = 512 << 10;

/// One segment file of an org.
#[derive(Debug)]
pub(super) struct Segment {
    /// Seq of its first record: its name and its key in the index.
    pub(super) first_seq: u64,
    /// Its path.
    pub(super) path: PathBuf,
    /// Bytes written (and, after the next commit, durable).
    pub(super) size: u64,
    /// Records in it.
    pub(super) records: u64,
    /// Seq of its last record.
    pub(super) last_seq: u64,
    /// Publish time of its first record.
    pub(super) first_time_ms: u64,
}

/// Where one retained message is, and what it matches.
#[derive(Debug, Clone)]
pub(super) struct IndexEntry {
    /// Its seq.
    pub(super) seq: u64,
    /// Publish time, for retention by age.
    pub(super) time_ms: u64,
    /// `first_seq` of the segment holding it.
    pub(super) segment: u64,
    /// Byte offset of the record in the segment.
    pub(super) offset: u64,
    /// Encoded length of the record.
    pub(super) len: u32,
    /// Message type (which channels it goes to).
    pub(super) kind: MessageKind,
    /// Route id (interned per org).
    pub(super) route: Option<Rc<str>>,
}

/// One org's log on its owner shard.
#[derive(Debug)]
pub(super) struct OrgLog {
    /// The org id.
    pub(super) id: Rc<str>,
    /// `<history>/<org>`.
    pub(super) dir: PathBuf,
    /// False until the directory is known to exist.
    pub(super) dir_ready: bool,
    /// Segments, oldest first; the last is the one appended to.
    pub(super) segments: VecDeque<Segment>,
    /// The active segment, open for appending.
    pub(super) writer: Option<Rc<BufferedFile>>,
    /// When `writer` was last written.
    pub(super) last_write_ms: u64,
    /// Retained messages, oldest first.
    pub(super) entries: VecDeque<IndexEntry>,
    /// Last seq handed out (maybe not yet durable).
    pub(super) assigned: u64,
    /// Last seq committed: durable, indexed and fanned out.
    pub(super) committed: u64,
    /// Highest seq dropped by retention (0: nothing ever dropped).
    pub(super) trimmed_through: u64,
    /// The newest messages' data, a suffix of `entries`.
    pub(super) recent: VecDeque<(u64, Arc<str>)>,
    /// Bytes of data in `recent`.
    pub(super) recent_bytes: usize,
    /// Route ids seen, interned.
    pub(super) routes: AHashSet<Rc<str>>,
}

impl OrgLog {
    pub(super) fn new(id: Rc<str>, dir: PathBuf) -> OrgLog {
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

    pub(super) fn intern_route(&mut self, route: Option<&str>) -> Option<Rc<str>> {
        let route = route?;
        if let Some(existing) = self.routes.get(route) {
            return Some(existing.clone());
        }
        let interned: Rc<str> = route.into();
        self.routes.insert(interned.clone());
        Some(interned)
    }

    /// Index of the first entry with a seq above `seq`.
    pub(super) fn first_after(&self, seq: u64) -> usize {
        self.entries.partition_point(|e| e.seq <= seq)
    }

    /// True when every retained entry above `after` has its data in memory.
    pub(super) fn cached_after(&self, after: u64) -> bool {
        match self.entries.get(self.first_after(after)) {
            None => true,
            Some(entry) => self
                .recent
                .front()
                .is_some_and(|(seq, _)| *seq <= entry.seq),
        }
    }

    pub(super) fn cached_data(&self, seq: u64) -> Option<Arc<str>> {
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

    pub(super) fn remember(&mut self, seq: u64, data: Arc<str>) {
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
    pub(super) fn trim(&mut self, config: &HistoryConfig, now_ms: u64) -> Vec<PathBuf> {
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

    pub(super) fn segment_path(&self, first_seq: u64) -> PathBuf {
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

#[cfg(test)]
mod tests {
    use super::*;

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
