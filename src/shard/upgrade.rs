//! The hot upgrade, one shard's part (docs/ARCHITECTURE.md, "Hot
//! upgrade"): the phase the shard is in, freezing it and writing out its
//! connections, thawing it when the upgrade fails, retiring it when the new
//! process took over; and, in the new process, adopting the connections
//! written out by the old one.
//!
//! The process's part (spawning the new binary, the control channel, the
//! outcome) is `upgrade_process`.

use std::cell::{Cell, RefCell};
use std::os::unix::io::RawFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::{reactor, Handoff, Shard};
use crate::handoff::{ConnRecord, OpenMessage};
use crate::message::render_frame;
use crate::notify::Notify;
use crate::protocol::ws::CloseCode;
use crate::registry::{ConnKey, ConnState, Frame, Partial, Registry};

/// Where a shard is in a hot upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Phase {
    /// Serving as usual.
    #[default]
    Serving,
    /// Frozen: no accept, no read, no write, no commit; the connections
    /// were written out for a new process, which may still fail.
    Frozen,
    /// The new process read the state: still no accept, read or write on
    /// a WebSocket connection, but the committer commits what publishes
    /// wait (their frames are queued to the frozen connections, for a
    /// thaw) and the admin connections close once answered, so that the
    /// log can be handed over. Everything can still be taken back.
    Handing,
    /// The new process took the connections: this shard lets go of its
    /// listeners, commits what publishes it has, and drains.
    Retiring,
}

/// A shard's hot-upgrade state.
#[derive(Default)]
pub struct Handover {
    phase: Cell<Phase>,
    /// Notified at every phase change.
    pub changed: Notify,
    /// True while the committer waits for work (not in a round).
    pub committer_at_rest: Cell<bool>,
    /// The connections written out at the freeze.
    handed: RefCell<Vec<ConnKey>>,
    /// The connections whose sockets the new process was given ahead of
    /// the freeze (state version 2): closing one of them meanwhile shuts
    /// the socket down first, since the new process's copy keeps it open.
    /// Each with its channels as passed (a connection still subscribed
    /// to exactly those travels short at the freeze).
    early: RefCell<std::collections::HashMap<ConnKey, Vec<String>>>,
    /// Room for the freeze's records and list of handed connections,
    /// taken and touched after the early pass (not inside the pause).
    room: RefCell<(Vec<u8>, Vec<ConnKey>)>,
    /// Admin requests between their first byte and their answer.
    pub admin_requests: Cell<usize>,
    /// Upgrades authenticated while frozen, adopted at the thaw.
    deferred: RefCell<Vec<Handoff>>,
    /// This process's descriptors of the connections the new process
    /// took: out of the registry and the epoll set at the retirement, but
    /// closed only at the drain, so ten thousand `close` calls are not on
    /// the pause's path. (They send nothing: the new process holds the
    /// sockets.)
    let_go: RefCell<Vec<RawFd>>,
}

impl Handover {
    /// The phase.
    pub fn phase(&self) -> Phase {
        self.phase.get()
    }

    /// True while serving as usual.
    pub fn serving(&self) -> bool {
        self.phase.get() == Phase::Serving
    }

    /// True while no WebSocket connection is read from or written to
    /// (frozen or handing over).
    pub fn frozen(&self) -> bool {
        matches!(self.phase.get(), Phase::Frozen | Phase::Handing)
    }

    /// True while admin connections close once answered (handing over or
    /// retiring): a publish is taken only when it can be committed.
    pub fn closing_admin(&self) -> bool {
        matches!(self.phase.get(), Phase::Handing | Phase::Retiring)
    }

    fn set(&self, phase: Phase) {
        self.phase.set(phase);
        super::writer::hold_writes(matches!(phase, Phase::Frozen | Phase::Handing));
        self.changed.notify();
    }

    /// Resolves at the next phase change.
    pub async fn wait_change(&self) {
        let seen = self.changed.generation();
        self.changed.wait(seen).await;
    }

    /// True when the new process holds a copy of this connection's socket
    /// (passed ahead of the freeze) and the upgrade is not over.
    pub fn passed_early(&self, key: ConnKey) -> bool {
        let early = self.early.borrow();
        !early.is_empty() && early.contains_key(&key)
    }

    /// The upgrade failed or is over: no new process holds an early copy.
    pub fn forget_early(&self) {
        self.early.borrow_mut().clear();
        *self.room.borrow_mut() = Default::default();
    }

    /// Keeps an upgrade that arrived while frozen for the thaw; false when
    /// not frozen.
    pub fn defer(&self, handoff: Handoff) -> Result<(), Handoff> {
        if self.frozen() {
            self.deferred.borrow_mut().push(handoff);
            Ok(())
        } else {
            Err(handoff)
        }
    }
}

/// One shard's connections written out: their sockets (still owned by the
/// shard) and their records, one after the other.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// The sockets not passed ahead of the freeze, in record order.
    pub fds: Vec<RawFd>,
    /// The records ([`ConnRecord::encode_version`]).
    pub records: Vec<u8>,
    /// How many records.
    pub count: usize,
}

/// A connection's id in this process, which names it to the new process
/// (state version 2): its slab index and generation, which no other
/// connection of this process has.
pub fn conn_id(key: ConnKey) -> u64 {
    (u64::from(key.generation) << 32) | u64::from(key.index)
}

/// What every record of connection `key` says of it, whatever it carries
/// besides: its id, its credential (org, key, session) and its deflate
/// window.
fn record_of(
    registry: &crate::registry::Registry,
    key: ConnKey,
    conn: &crate::registry::Connection,
) -> ConnRecord {
    ConnRecord {
        org_id: registry
            .org_id_of(key)
            .map(|o| o.to_string())
            .unwrap_or_default(),
        key_id: registry.key_id_of(key).unwrap_or_default().to_string(),
        session: registry.session_of(key),
        deflate_window_bits: conn.deflate_window_bits,
        id: conn_id(key),
        ..ConnRecord::default()
    }
}

/// True for a connection that can be carried over: open and plaintext.
fn carriable(conn: &crate::registry::Connection, key: ConnKey) -> bool {
    conn.state == ConnState::Open && !super::tls_wire::is_tls(key)
}

/// Before the freeze (state version 2): passes every carriable connection's
/// socket and what it is now to the new process, on the control channel
/// `channel`, [`handoff::FDS_PER_MESSAGE`] at a time. Each message is built
/// and sent in one synchronous step, so every descriptor in it is the
/// connection its record names (none closes, and no number is reused, in
/// between); the shard serves on between messages. A full channel is tried
/// again shortly (a shard never blocks); returns how many were passed.
pub async fn pass_early(shard: &Shard, channel: &std::os::fd::OwnedFd) -> Result<usize, String> {
    use crate::handoff::{self, kind};
    use std::os::fd::AsRawFd;
    let channel = channel.as_raw_fd();
    shard.handover.forget_early();
    let keys = shard.registry.borrow().keys();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut at = 0;
    let mut passed = 0;
    while at < keys.len() {
        let mut fds = Vec::new();
        let mut taken = Vec::new();
        let mut body = Vec::new();
        let mut next = at;
        {
            let registry = shard.registry.borrow();
            while next < keys.len() && fds.len() < handoff::FDS_PER_MESSAGE {
                let key = keys[next];
                let Some(conn) = registry.get(key).filter(|c| carriable(c, key)) else {
                    next += 1;
                    continue;
                };
                let before = body.len();
                let names = registry.channel_names_of(key);
                let record = ConnRecord {
                    channels: names.iter().map(|name| (name.clone(), 0)).collect(),
                    ..record_of(&registry, key, conn)
                };
                record.encode_version(2, &mut body);
                if body.len() > handoff::DATA_PER_MESSAGE {
                    body.truncate(before);
                    if fds.is_empty() {
                        // Too big alone: its socket travels at the freeze.
                        next += 1;
                        continue;
                    }
                    break;
                }
                fds.push(conn.fd);
                taken.push((key, names));
                next += 1;
            }
        }
        if fds.is_empty() {
            at = next;
            continue;
        }
        match handoff::send_on(channel, kind::EARLY, &body, &fds, libc::MSG_DONTWAIT) {
            Ok(()) => {
                passed += taken.len();
                shard.handover.early.borrow_mut().extend(taken);
                at = next;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err("the new binary did not take the sockets within 10 s".into());
                }
                glommio::timer::sleep(Duration::from_millis(1)).await;
                continue;
            }
            Err(e) => return Err(format!("cannot pass the sockets to the new binary: {e}")),
        }
        glommio::yield_if_needed().await;
    }
    let count = shard.registry.borrow().len();
    *shard.handover.room.borrow_mut() = (
        super::upgrade_process::touched(count * 32 + 4096, || 0u8),
        super::upgrade_process::touched(count + 64, || ConnKey {
            index: 0,
            generation: 0,
        }),
    );
    Ok(passed)
}

/// Freezes the shard and writes out every connection that can be carried
/// over: open, plaintext, with no replay in progress. Waits (bounded) for
/// the committer to finish the round it is delivering, so every
/// connection has been given (sent or queued) every message of its org up
/// to the org's seq, which is what the record says it has.
/// `version` is the state version written: from 2 on, each record carries
/// the connection's id and says whether its socket was passed early (then
/// it is not passed again).
pub async fn freeze(shard: &Shard, version: u16) -> Snapshot {
    crate::handoff::trace(&format!("old: shard {} freezing", shard.id));
    shard.handover.set(Phase::Frozen);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !shard.handover.committer_at_rest.get() && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
    crate::handoff::trace(&format!("old: shard {} committer at rest", shard.id));
    let registry = shard.registry.borrow();
    let (records, mut room) = std::mem::take(&mut *shard.handover.room.borrow_mut());
    let mut snapshot = Snapshot {
        records,
        ..Snapshot::default()
    };
    let mut handed = shard.handover.handed.borrow_mut();
    room.clear();
    *handed = room;
    if !shard.handover.committer_at_rest.get() {
        // A round that does not end in 5 s (a disk that stalls): nothing is
        // carried over; the connections are closed with 1012 if the
        // upgrade goes on.
        return snapshot;
    }
    for key in registry.keys() {
        let Some(conn) = registry.get(key) else {
            continue;
        };
        if !carriable(conn, key) || shard.replays.of(key) > 0 {
            continue;
        }
        let seq = registry.org_seq_of(key);
        let early = version >= 2 && shard.handover.passed_early(key);
        if early
            && conn.queue_is_empty()
            && conn.partial.is_none()
            && shard
                .handover
                .early
                .borrow()
                .get(&key)
                .is_some_and(|names| registry.subscribed_to_exactly(key, names))
        {
            // Nothing but its position and counters changed since it was
            // passed: it travels short.
            ConnRecord {
                id: conn_id(key),
                early: true,
                same_as_early: true,
                position: seq,
                missed_pongs: conn.missed_pongs,
                bad_messages_in_row: conn.bad_messages_in_row,
                ..ConnRecord::default()
            }
            .encode_version(version, &mut snapshot.records);
            snapshot.count += 1;
            handed.push(key);
            continue;
        }
        let mut queued = Vec::new();
        if let Some(queue) = &conn.send {
            for (i, frame) in queue.frames.iter().enumerate() {
                let from = if i == 0 { queue.front_sent as usize } else { 0 };
                queued.extend_from_slice(&frame[from..]);
            }
        }
        let (partial, open_message) = match &conn.partial {
            Some(partial) => (
                partial.bytes.clone(),
                partial
                    .decoder
                    .open_message()
                    .map(|(kind, valid, bytes)| OpenMessage {
                        kind,
                        utf8_valid_bytes: valid as u32,
                        bytes: bytes.to_vec(),
                    }),
            ),
            None => (Vec::new(), None),
        };
        let record = ConnRecord {
            channels: registry
                .channel_names_of(key)
                .into_iter()
                .map(|name| (name, seq))
                .collect(),
            partial,
            open_message,
            queued,
            missed_pongs: conn.missed_pongs,
            bad_messages_in_row: conn.bad_messages_in_row,
            early,
            same_as_early: false,
            position: 0,
            ..record_of(&registry, key, conn)
        };
        record.encode_version(version, &mut snapshot.records);
        if !record.early {
            snapshot.fds.push(conn.fd);
        }
        snapshot.count += 1;
        handed.push(key);
    }
    crate::handoff::trace(&format!(
        "old: shard {} wrote {} records",
        shard.id, snapshot.count
    ));
    snapshot
}

/// The new process read the state: commit what publishes wait (queued to
/// the frozen connections, written only after a thaw) and wait (bounded)
/// until no admin request is in progress, every admin connection closing
/// once answered. Every WebSocket connection stays this shard's, frozen.
pub async fn hand(shard: &Shard) {
    shard.handover.set(Phase::Handing);
    let deadline = Instant::now() + Duration::from_secs(5);
    while shard.handover.admin_requests.get() > 0 && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
}

/// The upgrade failed: serve everything again as if nothing happened
/// (the written-out connections were never touched by anyone else; a new
/// process that was handed the log was stopped before it wrote to it).
/// Frames the committer queued while handing over are written now: a
/// socket that refused them while writes were held waits for
/// writability, which the reactor sees at once.
pub fn thaw(shard: &Shard) {
    shard.history.unrelease();
    shard.handover.forget_early();
    shard.handover.handed.borrow_mut().clear();
    shard.handover.set(Phase::Serving);
    let deferred = std::mem::take(&mut *shard.handover.deferred.borrow_mut());
    for handoff in deferred {
        super::public::adopt(shard, handoff);
    }
}

/// The new process has the connections: let go of them without a byte
/// (its copies of the sockets keep them open), close the ones that could
/// not be carried over with 1012, let the committer write what publishes
/// are queued, and wait (bounded) until no admin request is in progress,
/// so every publish this process took is answered.
pub async fn retire(shard: &Shard) {
    shard.history.hand_off();
    shard.handover.forget_early();
    let handed = std::mem::take(&mut *shard.handover.handed.borrow_mut());
    {
        let mut registry = shard.registry.borrow_mut();
        for key in handed {
            let Some(conn) = registry.get(key) else {
                continue;
            };
            let fd = conn.fd;
            // Out of the epoll set explicitly: a registration lives as long
            // as the open file, which the new process holds too.
            shard.reactor.remove(fd);
            shard.handover.let_go.borrow_mut().push(fd);
            registry.remove(key);
        }
    }
    shard.handover.set(Phase::Retiring);
    {
        let mut registry = shard.registry.borrow_mut();
        for key in registry.keys() {
            registry.request_close(key, CloseCode::SERVICE_RESTART);
        }
    }
    let deferred = std::mem::take(&mut *shard.handover.deferred.borrow_mut());
    for mut handoff in deferred {
        // Never answered 101: refused like a full server; the client
        // connects again, to the new process.
        let fd = std::mem::replace(&mut handoff.fd, -1);
        let mut out = Vec::with_capacity(160);
        crate::protocol::http::write_error(&mut out, 503, &[("Connection", "close")]);
        // SAFETY: send on and close of a descriptor we own.
        unsafe {
            libc::send(
                fd,
                out.as_ptr().cast(),
                out.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            );
            libc::close(fd);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while shard.handover.admin_requests.get() > 0 && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
}

/// Closes the descriptors the retirement let go of (at the drain).
pub fn close_let_go(shard: &Shard) {
    for fd in std::mem::take(&mut *shard.handover.let_go.borrow_mut()) {
        // SAFETY: descriptors of removed records, owned by the handover
        // since; the new process holds the sockets, so this sends nothing.
        unsafe { libc::close(fd) };
    }
}

/// After every shard retired (no admin request anywhere, so no publish
/// is on its way between shards): wait (bounded) for the committer to
/// write what is queued, then hand the log over.
pub async fn release(shard: &Shard) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while (shard.history.has_pending() || !shard.handover.committer_at_rest.get())
        && Instant::now() < deadline
    {
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
    shard.history.release();
}

/// A connection adopted from the old process, registered and not yet
/// touched: [`start_adopted`] reads and writes it once the old process
/// committed the handover.
pub enum Adopted {
    /// Registered; `has_input`: partial input waits (complete frames may
    /// already be behind it in the socket).
    Registered {
        /// The connection.
        key: ConnKey,
        /// A partial frame or an open message was restored.
        has_input: bool,
    },
    /// Over a limit this process was started with: closed with 1012 at
    /// the start (the client resumes).
    Refused(RawFd),
    /// Gone already (its registration failed).
    Gone,
}

/// In the new process: what the log holds for a channel above a position,
/// as frames, read once per (org, position, channel) for every connection
/// adopted in one step — ten thousand idle subscribers of a channel share
/// one position (the org's seq at the freeze), so the gap is read once,
/// not once each. `None`: not in the log's memory (a replay reads it).
#[derive(Default)]
pub struct Gaps {
    /// By the hash of (org, position, channel): those and the frames.
    read: std::collections::HashMap<u64, Vec<GapEntry>>,
}

/// One gap read: org, position, channel, and the frames (`None`: not in
/// memory).
type GapEntry = (Rc<str>, u64, String, Option<Rc<[Frame]>>);

impl Gaps {
    fn get(
        &mut self,
        shard: &Shard,
        org_id: &str,
        after: u64,
        committed: u64,
        channel: &str,
    ) -> Option<Rc<[Frame]>> {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::hash::DefaultHasher::new();
        (org_id, after, channel).hash(&mut hasher);
        let bucket = self.read.entry(hasher.finish()).or_default();
        if let Some((.., frames)) = bucket
            .iter()
            .find(|(o, a, c, _)| &**o == org_id && *a == after && c == channel)
        {
            return frames.clone();
        }
        let frames: Option<Rc<[Frame]>> = shard
            .history
            .read_cached(org_id, after, committed, &[channel.to_string()])
            .map(|items| {
                items
                    .iter()
                    .map(|item| render_frame(item.kind, channel, item.seq, &item.data))
                    .collect::<Vec<Frame>>()
                    .into()
            });
        bucket.push((org_id.into(), after, channel.to_string(), frames.clone()));
        frames
    }
}

/// In the new process (state version 2): a connection passed ahead of the
/// freeze, registered while the old process still served it.
pub enum Early {
    /// In the registry and the epoll set, subscribed to `channels`.
    Registered {
        /// The connection.
        key: ConnKey,
        /// The channels it is subscribed to here.
        channels: Vec<String>,
        /// Its record as passed (the rest of a short one at the freeze).
        record: Box<ConnRecord>,
    },
    /// Over a limit this process was started with, or not registered.
    Refused(RawFd),
}

/// In the new process, before the old one freezes (state version 2):
/// registers a connection passed early (owned `fd`) in the registry
/// (org, key, session, deflate, subscriptions) and the epoll set
/// (level-triggered: any input that arrives, or is still there, when the
/// reactor first looks is reported then; until `Go` nothing looks). Reads,
/// writes and dispatches nothing: the old process serves it meanwhile.
pub fn register_early(
    registry: &mut Registry,
    reactor: &reactor::Reactor,
    fd: RawFd,
    record: ConnRecord,
) -> Early {
    let Ok((key, _)) = registry.add(&record.org_id, &record.key_id, fd) else {
        return Early::Refused(fd);
    };
    if record.deflate_window_bits != 0 {
        registry.set_deflate(key, record.deflate_window_bits);
    }
    if let Some((id, expires)) = record.session {
        registry.set_session(key, id, expires);
    }
    if reactor.add(fd, key).is_err() {
        registry.remove(key);
        return Early::Refused(fd);
    }
    let mut channels = Vec::with_capacity(record.channels.len());
    for (channel, _) in &record.channels {
        if registry.subscribe(key, channel) == Ok(true) {
            channels.push(channel.clone());
        }
    }
    Early::Registered {
        key,
        channels,
        record: Box::new(record),
    }
}

/// In the new process: a connection passed early that the freeze's state
/// does not name (closed meanwhile, or not carried): out of the epoll set
/// (explicitly: the old process may still hold the socket) and closed.
pub fn discard_early(shard: &Shard, early: Early) {
    match early {
        Early::Registered { key, .. } => reactor::remove_now(shard, key),
        Early::Refused(fd) => {
            // SAFETY: a received descriptor we own.
            unsafe { libc::close(fd) };
        }
    }
}

/// In the new process: registers a connection written out by the old one
/// (owned `fd`), with no 101 and no welcome (it had those), then
/// [`adopt_state`]. Reads and writes nothing: until the old process
/// commits the handover it may still serve the connection itself.
pub fn adopt_record(shard: &Shard, fd: RawFd, record: ConnRecord, gaps: &mut Gaps) -> Adopted {
    let added = shard
        .registry
        .borrow_mut()
        .add(&record.org_id, &record.key_id, fd);
    let Ok((key, _)) = added else {
        return Adopted::Refused(fd);
    };
    {
        let mut registry = shard.registry.borrow_mut();
        if record.deflate_window_bits != 0 {
            registry.set_deflate(key, record.deflate_window_bits);
        }
        if let Some((id, expires)) = record.session {
            registry.set_session(key, id, expires);
        }
    }
    if shard.reactor.add(fd, key).is_err() {
        reactor::remove_now(shard, key);
        return Adopted::Gone;
    }
    adopt_state(shard, key, record, &[], gaps)
}

/// In the new process: a connection passed early and registered
/// ([`register_early`]) takes its state at the freeze ([`adopt_state`]).
/// A short record (`same_as_early`) is the early record with the
/// position and counters it carries.
pub fn adopt_early(
    shard: &Shard,
    early: Early,
    mut record: ConnRecord,
    gaps: &mut Gaps,
) -> Adopted {
    match early {
        Early::Registered {
            key,
            channels,
            record: passed,
        } => {
            if !record.same_as_early {
                return adopt_state(shard, key, record, &channels, gaps);
            }
            // Subscribed here to what it still has (a channel over a limit
            // of this process stays out, as in a whole record).
            record.channels = channels
                .into_iter()
                .map(|name| (name, record.position))
                .collect();
            record.org_id = passed.org_id;
            record.key_id = passed.key_id;
            record.session = passed.session;
            adopt_state(shard, key, record, &[], gaps)
        }
        Early::Refused(fd) => Adopted::Refused(fd),
    }
}

/// The state of a registered connection at the freeze: its queued bytes
/// first, its counters, its partial input restored; its subscriptions
/// (`subscribed`: what it has already, from the early pass) go live at
/// once when the log holds nothing above their position, else after the
/// gap is queued — the publishes the old process committed after it
/// froze, read from the log's memory ([`Gaps`]) — or through a replay from
/// it when that is not in memory; its credential is checked again.
fn adopt_state(
    shard: &Shard,
    key: ConnKey,
    record: ConnRecord,
    subscribed: &[String],
    gaps: &mut Gaps,
) -> Adopted {
    {
        let mut registry = shard.registry.borrow_mut();
        if let Some(conn) = registry.get_mut(key) {
            conn.missed_pongs = record.missed_pongs;
            conn.bad_messages_in_row = record.bad_messages_in_row;
        }
        if !record.queued.is_empty() {
            registry.enqueue(key, &Frame::from(record.queued));
        }
        for channel in subscribed {
            if !record.channels.iter().any(|(name, _)| name == channel) {
                registry.unsubscribe(key, channel);
            }
        }
    }
    let committed = shard.history.committed(&record.org_id);
    for (channel, seq) in record.channels {
        // Nothing above the position: live at once.
        let gap = if committed > seq {
            gaps.get(shard, &record.org_id, seq, committed, &channel)
        } else {
            Some(Rc::from(Vec::new()))
        };
        match gap {
            // What the old process committed after the freeze is in
            // memory: no broadcast is being walked yet (the committer has
            // not started), so queueing it and going live in this step
            // leaves no gap and no duplicate, like a replay's switch.
            Some(frames) => {
                let mut registry = shard.registry.borrow_mut();
                for frame in frames.iter() {
                    registry.enqueue(key, frame);
                }
                let _ = registry.subscribe(key, &channel);
            }
            None => {
                // A replay goes live itself once it caught up.
                shard.registry.borrow_mut().unsubscribe(key, &channel);
                shard.replays.start(super::replay::ReplayJob {
                    key,
                    org_id: record.org_id.as_str().into(),
                    channel,
                    after: seq,
                    id: 0,
                })
            }
        }
    }
    let has_input = !record.partial.is_empty() || record.open_message.is_some();
    if has_input {
        if let Some(conn) = shard.registry.borrow_mut().get_mut(key) {
            let mut decoder = shard.decoder_for(conn);
            if let Some(open) = record.open_message {
                decoder.restore_open_message(open.kind, open.utf8_valid_bytes as usize, open.bytes);
            }
            conn.partial = Some(Box::new(Partial {
                decoder,
                bytes: record.partial,
            }));
        }
    }
    if !super::access::credential_still_valid(shard, &record.key_id, record.session) {
        shard
            .registry
            .borrow_mut()
            .request_close(key, CloseCode::KEY_REVOKED);
    }
    Adopted::Registered { key, has_input }
}

/// In the new process, once the old one committed the handover: writes
/// what the adopted connections have queued, reads what waits behind a
/// partial frame, closes the refused ones with 1012.
pub fn start_adopted(shard: &Shard, adopted: Vec<Adopted>) {
    for adoption in adopted {
        match adoption {
            Adopted::Registered { key, has_input } => {
                super::flush_one(&mut shard.registry.borrow_mut(), &shard.reactor, key);
                if has_input {
                    // Complete frames may already wait behind the partial
                    // bytes.
                    reactor::read_ready(shard, key, false);
                }
            }
            Adopted::Refused(fd) => send_close(fd, CloseCode::SERVICE_RESTART),
            Adopted::Gone => {}
        }
    }
}

/// Closes a socket we own with a close frame (best effort).
fn send_close(fd: RawFd, code: CloseCode) {
    let mut close = [0u8; crate::protocol::ws::CLOSE_FRAME_BYTES_MAX];
    let len = crate::protocol::ws::encode_close_frame(&mut close, code.get(), code.server_reason());
    // SAFETY: send on and close of a descriptor we own.
    unsafe {
        libc::send(
            fd,
            close.as_ptr().cast(),
            len,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        );
        libc::close(fd);
    }
}

/// Accepts on a listening socket shared with the other shards (and, in a
/// hot upgrade, with the next process) while the shard serves: waits for
/// readiness through glommio, then takes connections with a non-blocking
/// `accept4` until none is left. Unlike an io_uring accept in flight,
/// waiting for readiness can be given up at a freeze without losing a
/// connection: what the kernel queued stays queued for whoever accepts
/// next. Ends when the shard retires or shuts down.
pub async fn accept_loop(
    shard: Rc<Shard>,
    listener: RawFd,
    mut on_accept: impl FnMut(&Rc<Shard>, glommio::net::TcpStream),
) {
    use std::os::unix::io::FromRawFd;
    loop {
        match shard.handover.phase() {
            Phase::Retiring => return,
            Phase::Frozen | Phase::Handing => {
                shard.handover.wait_change().await;
                continue;
            }
            Phase::Serving => {}
        }
        // SAFETY: accept4 on the shared listener (non-blocking); the
        // accepted descriptor is ours.
        let fd = unsafe {
            libc::accept4(
                listener,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd >= 0 {
            // SAFETY: a fresh descriptor we own.
            let stream = unsafe { glommio::net::TcpStream::from_raw_fd(fd) };
            on_accept(&shard, stream);
            glommio::yield_if_needed().await;
            continue;
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::EAGAIN) => {
                futures_lite::future::or(
                    reactor::wait_readable(listener),
                    shard.handover.wait_change(),
                )
                .await;
            }
            Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM) => {
                // Out of descriptors: existing connections keep working;
                // try again shortly.
                glommio::timer::sleep(Duration::from_millis(50)).await;
            }
            _ => {
                // ECONNABORTED and the like: that one client is gone.
                glommio::yield_if_needed().await;
            }
        }
    }
}
