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

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Duration;

use ahash::AHashMap;

use super::Shard;
use crate::history::{History, Retained};
use crate::message::{render_frame, text_frame};
use crate::notify::Notify;
use crate::registry::{ConnKey, Frame, SubscribeError};

/// A request to replay a channel to a connection.
pub struct ReplayJob {
    /// The connection.
    pub key: ConnKey,
    /// Its org.
    pub org_id: Rc<str>,
    /// The channel.
    pub channel: String,
    /// Replay messages with a larger seq.
    pub after: u64,
    /// Set by [`Replays::start`]: tells this replay from a later one of the
    /// same connection and channel that replaced it.
    pub id: u64,
}

/// The replays of one shard: which (connection, channel) pairs are being
/// replayed, the jobs waiting for the worker, and the wake-up of replays
/// waiting for a broadcast to be delivered.
#[derive(Default)]
pub struct Replays {
    /// Replays waiting for the replay worker.
    jobs: RefCell<VecDeque<ReplayJob>>,
    /// Wakes the replay worker.
    jobs_notify: Notify,
    /// (connection, channel) pairs being replayed, with the id of the
    /// replay in charge (a later subscribe with `after` replaces it).
    replaying: RefCell<AHashMap<(ConnKey, String), u64>>,
    /// Id of the next replay.
    next_id: Cell<u64>,
    /// Notified each time the committer finished delivering a round: a
    /// replay waiting for its org's broadcast to end looks again.
    pub delivered_notify: Notify,
    /// Connections one of whose replays holds a step read from disk that
    /// it has not queued yet: one at a time per connection, so a
    /// connection replaying many channels to a reader that does not read
    /// holds one step (up to `READ_BYTES_MAX`) beside its send queue, not
    /// one per channel.
    stepping: RefCell<ahash::AHashSet<ConnKey>>,
    /// Notified when a connection's step was queued or given up.
    stepped: Notify,
}

/// A connection's turn to hold a step read from disk (see
/// [`Replays::stepping`]); the turn ends when this is dropped.
struct StepTurn<'a> {
    replays: &'a Replays,
    key: ConnKey,
}

impl Drop for StepTurn<'_> {
    fn drop(&mut self) {
        self.replays.stepping.borrow_mut().remove(&self.key);
        self.replays.stepped.notify();
    }
}

impl Replays {
    /// Queues a replay for the replay worker and marks it in progress; a
    /// replay of the same connection and channel still in progress is
    /// replaced (it stops at its next step, see [`Replays::is_current`]).
    pub fn start(&self, mut job: ReplayJob) {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        job.id = id;
        self.replaying
            .borrow_mut()
            .insert((job.key, job.channel.clone()), id);
        self.jobs.borrow_mut().push_back(job);
        self.jobs_notify.notify();
    }

    /// True while `channel` is being replayed to `key`.
    pub fn is_replaying(&self, key: ConnKey, channel: &str) -> bool {
        self.replaying
            .borrow()
            .contains_key(&(key, channel.to_string()))
    }

    /// True while `job` is the replay in charge of its connection and
    /// channel: not cancelled, not replaced by a later one.
    pub fn is_current(&self, job: &ReplayJob) -> bool {
        self.replaying.borrow().get(&(job.key, job.channel.clone())) == Some(&job.id)
    }

    /// Ends `job`'s replay, unless a later one replaced it.
    pub fn end(&self, job: &ReplayJob) {
        if self.is_current(job) {
            self.replaying
                .borrow_mut()
                .remove(&(job.key, job.channel.clone()));
        }
    }

    /// Replays in progress for `key` (they count as subscriptions).
    pub fn of(&self, key: ConnKey) -> usize {
        self.replaying
            .borrow()
            .keys()
            .filter(|(k, _)| *k == key)
            .count()
    }

    /// Waits for `job`'s connection's turn to hold a step read from disk;
    /// `None` when the replay is no longer wanted meanwhile.
    async fn step_turn(&self, shard: &Shard, job: &ReplayJob) -> Option<StepTurn<'_>> {
        loop {
            if !wanted(shard, job) {
                return None;
            }
            let seen = self.stepped.generation();
            if self.stepping.borrow_mut().insert(job.key) {
                return Some(StepTurn {
                    replays: self,
                    key: job.key,
                });
            }
            // The other replay's step ends in its queueing, or in its
            // connection's close (a slow consumer within REPLAY_STALL_MS).
            self.stepped.wait(seen).await;
        }
    }

    /// Stops a replay (unsubscribe during the replay); true if there was one.
    pub fn cancel(&self, key: ConnKey, channel: &str) -> bool {
        self.replaying
            .borrow_mut()
            .remove(&(key, channel.to_string()))
            .is_some()
    }
}

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
    let replays = &shard.replays;
    let mut registry = shard.registry.borrow_mut();
    let Some(org_id) = registry.org_id_of(key).cloned() else {
        return Ok(subscribed(channel, after.map(|_| true)));
    };
    let live = registry.is_subscribed(key, channel);
    let replaying = replays.is_replaying(key, channel);
    let Some(after) = after else {
        // Subscribing twice is harmless. (Only reached for a channel being
        // replayed; a plain subscribe of anything else goes to the registry.)
        return Ok(subscribed(channel, None));
    };
    if !live && !replaying {
        let max = registry.limits.subscriptions_max;
        let subscriptions = registry
            .get(key)
            .map_or(0, |c| c.subscription_count as usize);
        if subscriptions + replays.of(key) >= max {
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
    replays.start(ReplayJob {
        key,
        org_id,
        channel: channel.to_string(),
        after,
        id: 0,
    });
    Ok(subscribed(channel, Some(recovered)))
}

/// Queues what is left of `job` — `rest`, all of it in the log's
/// in-memory tail — and switches the connection to live, in one synchronous
/// step, when it fits in half the room left in its send queue; false (and
/// nothing done) otherwise. Ends the replay.
fn switch_to_live(shard: &Shard, job: &ReplayJob, rest: &[Retained]) -> bool {
    let queued: usize = rest.iter().map(|i| i.data.len() + 64).sum();
    let mut registry = shard.registry.borrow_mut();
    let limit = registry.limits.send_queue_bytes;
    let room = registry
        .queued_bytes_of(job.key)
        .map_or(0, |queued| limit.saturating_sub(queued));
    if !rest.is_empty() && queued > room / 2 {
        return false;
    }
    // The switch to live: no await from here to the subscription.
    shard.replays.end(job);
    for item in rest {
        registry.enqueue(job.key, &frame_of(job, item));
    }
    if let Err(SubscribeError::TooMany) = registry.subscribe(job.key, &job.channel) {
        let max = registry.limits.subscriptions_max;
        registry.enqueue(job.key, &too_many(&job.channel, max));
    }
    true
}

/// Carries out at once the queued replays that need nothing but the log's
/// in-memory tail (a client a few messages behind, the common resume):
/// their messages are queued right behind the `subscribed` reply and leave
/// with it in one write, instead of a task's write a turn later. Called
/// after a client message was answered; the others stay for the worker.
pub fn run_cached(shard: &Shard) {
    if shard.replays.jobs.borrow().is_empty() {
        return;
    }
    let jobs = std::mem::take(&mut *shard.replays.jobs.borrow_mut());
    let mut left = VecDeque::new();
    for job in jobs {
        let done = wanted(shard, &job)
            && !shard.registry.borrow().is_delivering(&job.org_id)
            && shard
                .history
                .read_cached(
                    &job.org_id,
                    job.after,
                    shard.history.committed(&job.org_id),
                    std::slice::from_ref(&job.channel),
                )
                .is_some_and(|rest| switch_to_live(shard, &job, &rest));
        if !done {
            left.push_back(job);
        }
    }
    // Nothing was queued meanwhile (all of this is synchronous).
    *shard.replays.jobs.borrow_mut() = left;
}

/// Starts a task per replay request, for the life of the shard.
pub async fn worker(shard: Rc<Shard>) {
    loop {
        let seen = shard.replays.jobs_notify.generation();
        loop {
            let job = shard.replays.jobs.borrow_mut().pop_front();
            let Some(job) = job else { break };
            glommio::spawn_local(run(shard.clone(), job)).detach();
        }
        shard.replays.jobs_notify.wait(seen).await;
    }
}

/// True while the replay should go on (connection open, not unsubscribed,
/// not replaced by a later subscribe with `after`).
fn wanted(shard: &Shard, job: &ReplayJob) -> bool {
    shard.replays.is_current(job)
        && shard
            .registry
            .borrow()
            .get(job.key)
            .is_some_and(|c| c.state.can_send())
}

fn frame_of(job: &ReplayJob, item: &Retained) -> Frame {
    render_frame(item.kind, &job.channel, item.seq, &item.data)
}

/// Queues frames, waiting for the send queue to drain below half its limit
/// whenever the next frame would pass three quarters of it, so a long
/// replay never trips the slow-consumer limit of a reader that keeps up.
/// A reader that takes nothing for [`REPLAY_STALL_MS`] is a slow consumer
/// all the same: it is closed with 1013, and the replay ends, rather than
/// holding its step's messages for as long as it likes. False when the
/// connection went away.
async fn queue_paced(shard: &Shard, job: &ReplayJob, items: &[Retained]) -> bool {
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
                shard.registry.borrow_mut().close_slow_consumer(job.key);
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
        shard.registry.borrow_mut().enqueue(job.key, &frame);
    }
    shard.flush_dirty().await;
    true
}

async fn run(shard: Rc<Shard>, job: ReplayJob) {
    let history: &History = &shard.history;
    let channels = std::slice::from_ref(&job.channel);
    let mut last = job.after;
    loop {
        if !wanted(&shard, &job) {
            shard.replays.end(&job);
            return;
        }
        if shard.registry.borrow().is_delivering(&job.org_id) {
            // A committed broadcast is still being written, a part at a
            // time: switching to live now could put this subscription in
            // the part not yet walked (a duplicate) or miss it in the part
            // already walked. Wait until it is done.
            let seen = shard.replays.delivered_notify.generation();
            shard.replays.delivered_notify.wait(seen).await;
            continue;
        }
        let committed = history.committed(&job.org_id);
        let rest = history.read_cached(&job.org_id, last, committed, channels);
        if let Some(rest) = rest {
            if switch_to_live(&shard, &job, &rest) {
                shard.flush_dirty().await;
                return;
            }
            // Too much to queue at once: send part of it paced, then retry.
            let part = rest.len().min(REPLAY_CHUNK_MESSAGES);
            if !queue_paced(&shard, &job, &rest[..part]).await {
                shard.replays.end(&job);
                return;
            }
            last = rest[part - 1].seq;
            continue;
        }
        let Some(turn) = shard.replays.step_turn(&shard, &job).await else {
            shard.replays.end(&job);
            return;
        };
        let (items, scanned) = history
            .read_forward(
                &job.org_id,
                last,
                committed,
                REPLAY_CHUNK_MESSAGES,
                channels,
            )
            .await;
        let queued = queue_paced(&shard, &job, &items).await;
        drop(items);
        drop(turn);
        if !queued {
            shard.replays.end(&job);
            return;
        }
        last = scanned;
    }
}
