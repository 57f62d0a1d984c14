//! History reads for the HTTP routes (`/v1/poll`, `/v1/sse`, the resource
//! lists), run on the org's owner shard. Queries and answers are plain
//! owned data so they can cross the shard mesh.

use std::time::{Duration, Instant};

use super::{History, Log, Retained};
use crate::message::ChannelFilter;
use crate::message::MessageKind;

/// Which messages a query wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    /// Seq above this, oldest first; `None`: only what is published from now.
    After(Option<u64>),
    /// Seq below this (all when `None`), newest first.
    Before(Option<u64>),
}

/// A history query of one org.
#[derive(Debug, Clone)]
pub struct Query {
    /// The org (its owner shard answers).
    pub org_id: String,
    /// Channels, valid and without duplicates.
    pub channels: Vec<String>,
    /// Which messages.
    pub range: Range,
    /// Most envelopes in the answer (a message is never split across
    /// answers, so one message matching more channels than this still
    /// comes whole).
    pub limit: usize,
    /// With [`Range::After`]: wait up to this long for a first match.
    pub wait_ms: u64,
}

/// One message on one channel.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// Its seq.
    pub seq: u64,
    /// Its type.
    pub kind: MessageKind,
    /// The channel it matched.
    pub channel: String,
    /// The publisher's JSON text.
    pub data: std::sync::Arc<str>,
}

/// The answer to a [`Query`].
#[derive(Debug, Clone, Default)]
pub struct Answer {
    /// Envelopes, in the query's order.
    pub messages: Vec<Envelope>,
    /// With [`Range::After`]: where the next query continues (never repeats
    /// a message, never skips one).
    pub next_after: u64,
    /// With [`Range::Before`]: whether older matches exist.
    pub has_more: bool,
    /// With [`Range::After`]: false when messages after the query's `after`
    /// may be missing from the answer: retention dropped some of them, or
    /// `after` was above the org's latest seq (a seq from a data directory
    /// since reset), in which case the answer starts from the latest seq.
    pub recovered: bool,
    /// With [`Range::After`]: the seq the answer really starts after: the
    /// query's `after`, or the org's latest seq when the query had none or
    /// one above it.
    pub started_after: u64,
}

/// Expands messages into one envelope per matching channel, stopping
/// before a message that would pass `limit` (unless nothing was taken
/// yet). Returns the envelopes and the seq of the last message taken, or
/// `None` when every message was taken.
fn expand(items: &[Retained], channels: &[String], limit: usize) -> (Vec<Envelope>, Option<u64>) {
    let filter = ChannelFilter::new(channels);
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let matching = filter.matching(item.kind, item.route.as_deref());
        if !out.is_empty() && out.len() + matching.len() > limit {
            return (out, Some(items[i - 1].seq));
        }
        for channel in matching.iter().filter_map(|&at| channels.get(at as usize)) {
            out.push(Envelope {
                seq: item.seq,
                kind: item.kind,
                channel: channel.clone(),
                data: item.data.clone(),
            });
        }
    }
    (out, None)
}

/// Runs a query on the owner shard's history.
pub async fn run<L: Log>(history: &History<L>, query: Query) -> Answer {
    let limit = query.limit.max(1);
    match query.range {
        Range::Before(before) => {
            let (items, has_more) = history
                .read_backward(&query.org_id, before, limit, &query.channels)
                .await;
            let (messages, cut) = expand(&items, &query.channels, limit);
            Answer {
                messages,
                next_after: 0,
                has_more: has_more || cut.is_some(),
                recovered: true,
                started_after: 0,
            }
        }
        Range::After(after) => {
            let deadline = Instant::now() + Duration::from_millis(query.wait_ms);
            let latest = history.committed(&query.org_id);
            // `None` starts from now. An `after` above the latest seq cannot
            // be one this org gave out (its data directory was reset): going
            // on from it would skip every new message up to it, so the
            // answer starts from the latest seq and says history was lost.
            let (mut after, mut recovered) = match after {
                None => (latest, true),
                Some(after) if after > latest => (latest, false),
                Some(after) => (after, true),
            };
            // Retention may drop messages above `after` while the first
            // read runs; it only ever drops more, so checking once that read
            // is done is the safe order.
            let first_after = after;
            let mut first_read = true;
            loop {
                let seen = history.committed_notify.generation();
                let upto = history.committed(&query.org_id);
                let (items, scanned) = history
                    .read_forward(&query.org_id, after, upto, limit, &query.channels)
                    .await;
                if first_read {
                    first_read = false;
                    recovered &= first_after >= history.trimmed_through(&query.org_id);
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if !items.is_empty() || left.is_zero() || history.shutdown().is_stopping() {
                    let (messages, cut) = expand(&items, &query.channels, limit);
                    return Answer {
                        messages,
                        next_after: cut.unwrap_or(scanned),
                        has_more: false,
                        recovered,
                        started_after: first_after,
                    };
                }
                after = scanned;
                let timeout = async {
                    glommio::timer::sleep(left).await;
                };
                let stop = history.shutdown().wait();
                futures_lite::future::or(
                    history.committed_notify.wait(seen),
                    futures_lite::future::or(timeout, stop),
                )
                .await;
            }
        }
    }
}
