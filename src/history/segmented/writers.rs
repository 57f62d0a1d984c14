//! A bound on the segment files a shard keeps open for appending.
//!
//! An org's active segment stays open between commits and is closed after
//! `WRITER_IDLE_MS` without a write, so a shard's descriptors follow the
//! orgs publishing now. But "now" may be thousands of orgs: one publish
//! request naming 3,000 new orgs held 3,000 descriptors for 30 s, and a
//! few such requests ran the process out of files for every connection.
//! So after each commit round (`SegmentedLog::append`) at most
//! [`WRITERS_OPEN_MAX`] writers stay open: the least recently written are
//! closed (their next commit reopens the segment, one `open` per round, as
//! after an idle spell), and their
//! in-memory tail of recent messages goes with them, as when idle, so the
//! memory of those tails is bounded the same way.

use std::collections::VecDeque;

use super::SegmentedLog;

/// Segment files a shard keeps open for appending between commit rounds.
pub const WRITERS_OPEN_MAX: usize = 256;

impl SegmentedLog {
    /// Closes the least recently written orgs' segment files beyond
    /// [`WRITERS_OPEN_MAX`]. Returns how many it closed.
    pub(crate) fn bound_open_writers(&self) -> usize {
        let mut orgs = self.orgs.borrow_mut();
        let open = orgs.values().filter(|org| org.writer.is_some()).count();
        if open <= WRITERS_OPEN_MAX {
            return 0;
        }
        let mut by_age: Vec<(u64, std::rc::Rc<str>)> = orgs
            .values()
            .filter(|org| org.writer.is_some())
            .map(|org| (org.last_write_ms, org.id.clone()))
            .collect();
        by_age.sort_unstable_by_key(|(last_write_ms, _)| *last_write_ms);
        let excess = open - WRITERS_OPEN_MAX;
        for (_, id) in by_age.into_iter().take(excess) {
            let org = orgs.get_mut(&*id).expect("listed above");
            // Dropping closes the file (asynchronously): every record
            // written to it was made durable by its own commit.
            org.writer = None;
            org.recent = VecDeque::new();
            org.recent_bytes = 0;
        }
        excess
    }
}
