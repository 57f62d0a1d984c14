//! `subscribe` with `after`: replay the retained messages of one channel
//! to one connection, then switch it to live delivery with no gap and no
//! duplicate, even while publishes continue.
//!
//! The switch is the one step without an await: the committer indexes a
//! batch and fans it out in one synchronous step, so at any await point
//! every committed message is either in the index (and `committed` counts
//! it) or not committed at all. The replay reads `(last, committed]` from
//! disk in chunks, paced by the connection's send queue, until what remains
//! is in the in-memory tail of the log; then, synchronously, it queues that
//! rest and sets the subscription bit. Every later commit reaches the
//! connection through the normal fan-out.

use std::rc::Rc;
use std::time::Duration;

use super::{channel_matches, History, Item, ReplayJob};
use crate::registry::{render_message, text_frame, ConnKey, Frame, SubscribeError};
use crate::shard::Shard;

/// Messages read from disk per step.
const REPLAY_CHUNK_MESSAGES: usize = 512;
/// How long a replay waits for its reader to take any byte of a full
/// send queue before closing it as a slow consumer (the HTTP answers'
/// write timeout, PROTOCOL.md §6).
const REPLAY_STALL_MS: u64 = crate::limits::WRITE_TIMEOUT_MS;
/// How long the replay waits between checks of a full send queue.
const DRAIN_POLL_MS: u64 = 1;

fn json_frame(json: &str) -> Frame {
    Frame::from(text_frame(json.as_bytes()))
}

fn subscribed(channel: &str, recovered: Option<bool>) -> Frame {
    match recovered {
        None => json_frame(&format!(r#"{{"type":"subscribed","channel":"{channel}"}}"#)),
        Some(recovered) => json_frame(&format!(
            r#"{{"type":"subscribed","channel":"{channel}","recovered":{recovered}}}"#
        )),
    }
}

fn too_many(channel: &str, max: usize) -> Frame {
    json_frame(&format!(
        r#"{{"type":"error","code":"too_many_subscriptions","message":"at most {max} subscriptions per connection","channel":"{channel}"}}"#
    ))
}

/// Handles `subscribe` with `after` (or a plain `subscribe` of a channel
/// being replayed) for a connection of this shard. `channel` is valid.
/// `Ok` is the `subscribed` reply (queued before any replayed message),
/// `Err` an error reply.
///
/// `after` means the same whatever the connection's state: every retained
/// message of the channel above it, then live. So on a channel already
/// live, its live delivery to this connection stops here (before any later
/// broadcast is walked) and a replay starts, which switches back to live
/// as a fresh one does; on a channel being replayed, the replay in progress
/// is replaced by one from the new `after`. Neither changes the number of
/// subscriptions. A plain `subscribe` of a subscribed or replayed channel
/// only answers `subscribed`.
pub fn subscribe(
    shard: &Shard,
    key: ConnKey,
    channel: &str,
    after: Option<u64>,
) -> Result<Frame, Frame> {
    let history = &shard.history;
    let mut registry = shard.registry.borrow_mut();
    let Some(conn) = registry.get(key) else {
        return Ok(subscribed(channel, after.map(|_| true)));
    };
    let org = &registry.orgs[conn.org as usize];
    let org_id = org.id.clone();
    let live = org
        .channels
        .lookup(channel)
        .is_some_and(|bit| conn.has(bit));
    let replaying = history.is_replaying(key, channel);
    let Some(after) = after else {
        // Subscribing twice is harmless. (Only reached for a channel being
        // replayed; a plain subscribe of anything else goes to the registry.)
        return Ok(subscribed(channel, None));
    };
    if !live && !replaying {
        let max = registry.limits.subscriptions_max;
        if conn.subscription_count as usize + history.replays_of(key) >= max {
            return Err(too_many(channel, max));
        }
    }
    // An `after` above the org's latest seq (a client of a data directory
    // since reset) cannot be resumed from: the replay starts from the latest
    // seq, so every new message is delivered, and says history was lost.
    let latest = history.committed(&org_id);
    let (after, recovered) = if after > latest {
        (latest, false)
    } else {
        (after, after >= history.trimmed_through(&org_id))
    };
    if live {
        // The replay counts in its place until it switches back to live.
        registry.unsubscribe(key, channel);
    }
    drop(registry);
    history.start_replay(ReplayJob {
        key,
        org_id,
        channel: channel.to_string(),
        after,
        id: 0,
    });
    Ok(subscribed(channel, Some(recovered)))
}

/// Starts a task per replay request, for the life of the shard.
pub async fn worker(shard: Rc<Shard>) {
    loop {
        let seen = shard.history.replay_notify.generation();
        loop {
            let job = shard.history.replay_jobs.borrow_mut().pop_front();
            let Some(job) = job else { break };
            glommio::spawn_local(run(shard.clone(), job)).detach();
        }
        shard.history.replay_notify.wait(seen).await;
    }
}

/// True while the replay should go on (connection open, not unsubscribed,
/// not replaced by a later subscribe with `after`).
fn wanted(shard: &Shard, job: &ReplayJob) -> bool {
    shard.history.is_current_replay(job)
        && shard
            .registry
            .borrow()
            .get(job.key)
            .is_some_and(|c| c.close.is_none())
}

fn frame_of(job: &ReplayJob, item: &Item) -> Frame {
    Frame::from(render_message(
        item.kind,
        &job.channel,
        item.seq,
        &item.data,
    ))
}

/// Queues frames, waiting for the send queue to drain below half its limit
/// whenever the next frame would pass three quarters of it, so a long
/// replay never trips the slow-consumer limit of a reader that keeps up.
/// A reader that takes nothing for [`REPLAY_STALL_MS`] is a slow consumer
/// all the same: it is closed with 1013, and the replay ends, rather than
/// holding its step's messages for as long as it likes. False when the
/// connection went away.
async fn queue_paced(shard: &Shard, job: &ReplayJob, items: &[Item]) -> bool {
    let limit = shard.registry.borrow().limits.send_queue_bytes;
    for item in items {
        let frame = frame_of(job, item);
        // Progress while waiting for this frame's room: the queue going
        // down (nothing of this replay is added meanwhile).
        let mut lowest = usize::MAX;
        let mut progress_at = std::time::Instant::now();
        loop {
            if !wanted(shard, job) {
                return false;
            }
            let queued = shard
                .registry
                .borrow()
                .queued_bytes_of(job.key)
                .unwrap_or(0);
            if queued == 0 || queued + frame.len() <= limit / 4 * 3 {
                break;
            }
            if queued < lowest {
                lowest = queued;
                progress_at = std::time::Instant::now();
            } else if progress_at.elapsed() >= Duration::from_millis(REPLAY_STALL_MS) {
                // Checked open by `wanted` above, with no await since.
                shard
                    .registry
                    .borrow_mut()
                    .close_slow_consumer(job.key.index);
                return false;
            }
            shard.flush_dirty().await;
            let queued = shard
                .registry
                .borrow()
                .queued_bytes_of(job.key)
                .unwrap_or(0);
            // Wait unless there is room now. (Waiting only above half the
            // limit spun without ever yielding when one frame is larger
            // than a quarter of it and the reader had stopped: a client
            // could stall its whole shard that way.)
            if queued != 0 && queued + frame.len() > limit / 4 * 3 {
                glommio::timer::sleep(Duration::from_millis(DRAIN_POLL_MS)).await;
            }
        }
        shard.registry.borrow_mut().enqueue(job.key.index, &frame);
    }
    shard.flush_dirty().await;
    true
}

async fn run(shard: Rc<Shard>, job: ReplayJob) {
    let history: &History = &shard.history;
    let channel = job.channel.clone();
    let filter = move |kind, route: Option<&str>| channel_matches(&channel, kind, route);
    let mut last = job.after;
    loop {
        if !wanted(&shard, &job) {
            history.end_replay(&job);
            return;
        }
        if shard.registry.borrow().is_delivering(&job.org_id) {
            // A committed broadcast is still being written, a part at a
            // time: switching to live now could put this subscription in
            // the part not yet walked (a duplicate) or miss it in the part
            // already walked. Wait until it is done.
            let seen = history.delivered_notify.generation();
            history.delivered_notify.wait(seen).await;
            continue;
        }
        let committed = history.committed(&job.org_id);
        let rest = history.read_cached(&job.org_id, last, committed, &filter);
        if let Some(rest) = rest {
            let queued: usize = rest.iter().map(|i| i.data.len() + 64).sum();
            let room = {
                let registry = shard.registry.borrow();
                let limit = registry.limits.send_queue_bytes;
                registry
                    .queued_bytes_of(job.key)
                    .map_or(0, |queued| limit.saturating_sub(queued))
            };
            if rest.is_empty() || queued <= room / 2 {
                // The switch to live: no await from here to the subscription.
                {
                    let mut registry = shard.registry.borrow_mut();
                    history.end_replay(&job);
                    for item in &rest {
                        registry.enqueue(job.key.index, &frame_of(&job, item));
                    }
                    if let Err(SubscribeError::TooMany) = registry.subscribe(job.key, &job.channel)
                    {
                        let max = registry.limits.subscriptions_max;
                        registry.enqueue(job.key.index, &too_many(&job.channel, max));
                    }
                }
                shard.flush_dirty().await;
                return;
            }
            // Too much to queue at once: send part of it paced, then retry.
            let part = rest.len().min(REPLAY_CHUNK_MESSAGES);
            if !queue_paced(&shard, &job, &rest[..part]).await {
                history.end_replay(&job);
                return;
            }
            last = rest[part - 1].seq;
            continue;
        }
        let (items, scanned) = history
            .read_forward(&job.org_id, last, committed, REPLAY_CHUNK_MESSAGES, &filter)
            .await;
        if !queue_paced(&shard, &job, &items).await {
            history.end_replay(&job);
            return;
        }
        last = scanned;
    }
}
