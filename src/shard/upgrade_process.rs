//! The hot upgrade, the process's part (docs/ARCHITECTURE.md, "Hot
//! upgrade"): in the serving process, on SIGUSR2, start the binary now at
//! its own path with one end of a control channel, freeze the shards, pass
//! the listeners and the connections, hand the log over, and either commit
//! (once the new process is ready to serve: this one retires) or thaw (it
//! failed, died or went silent before: it is stopped, this process takes
//! the log back and serves on; nothing noticed); in the new process, take
//! the state before anything else. The outcome is written to
//! `<data-dir>/hookstream.upgrade` for `hookstream upgrade`.

use std::collections::HashMap;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::mesh::Mesh;
use super::upgrade::Snapshot;
use super::ShardMessage;
use crate::handoff::{self, kind, Channel, ConnRecord};

/// How long the new binary has to say which state versions it reads.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the new binary has to read the state.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the new binary has, once the log is released, to open it,
/// start its shards and register the connections (PREPARED). Past it, it
/// is stopped and this process serves on.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the new binary waits, once PREPARED, for the commit.
pub const COMMIT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the new binary has, once committed, to say it serves (it
/// serves already: this only bounds the wait for its pid).
const SERVING_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the new binary of the previous handshake (no commit) has,
/// once the log is released, to serve.
const RELEASED_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a shard has to answer a step.
const SHARD_TIMEOUT: Duration = Duration::from_secs(15);

/// The name of the serving process's pid file in the data directory.
pub const PID_FILE: &str = "hookstream.pid";
/// The name of the last upgrade's outcome in the data directory.
pub const OUTCOME_FILE: &str = "hookstream.upgrade";

/// How an upgrade ended, for the old process.
pub enum Outcome {
    /// The new process serves; this one drains and exits.
    Serving {
        /// The new process.
        pid: u32,
        /// Connections handed over.
        connections: usize,
        /// From the freeze to the new process's SERVING: how long no
        /// client was served.
        frozen: Duration,
    },
    /// Nothing was handed over: this process serves on, unchanged (a new
    /// process that had been handed the log was stopped first).
    Failed(String),
    /// The new process failed after the commit: this process let go of
    /// the connections and cannot serve them any more, and exits (a
    /// supervisor restarts it; clients reconnect and resume).
    Lost(String),
}

/// What the old process needs to upgrade.
pub struct Old<'a> {
    /// The shards' inboxes.
    pub mesh: &'a Mesh,
    /// How many shards.
    pub shards: usize,
    /// Each shard's (public, admin) listener.
    pub listeners: &'a [(RawFd, RawFd)],
    /// The data directory's lock, let go of with the log.
    pub lock: &'a mut Option<std::fs::File>,
}

/// The path of the binary this process runs, as a path name (not the
/// inode it started from): when the file was replaced, the new file.
pub fn own_exe() -> Result<PathBuf, String> {
    let link = std::fs::read_link("/proc/self/exe")
        .map_err(|e| format!("cannot read /proc/self/exe: {e}"))?;
    let text = link.to_string_lossy();
    Ok(PathBuf::from(
        text.strip_suffix(" (deleted)").unwrap_or(&text).to_string(),
    ))
}

fn spawn(exe: &Path, theirs: &Channel) -> Result<Child, String> {
    let fd = theirs.raw();
    let mut command = std::process::Command::new(exe);
    command
        .args(std::env::args_os().skip(1))
        .env(handoff::FD_ENV, fd.to_string());
    // SAFETY: only async-signal-safe calls between fork and exec: the
    // control socket loses close-on-exec, every other descriptor above
    // stderr gets it (the sockets of this process's clients must not
    // live on in the new process behind our back: a close here would not
    // reach the client while a stray copy is open).
    unsafe {
        command.pre_exec(move || {
            if fd > 3 {
                libc::syscall(libc::SYS_close_range, 3u32, (fd - 1) as u32, 4u32);
            }
            libc::syscall(libc::SYS_close_range, (fd + 1) as u32, u32::MAX, 4u32);
            if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // A file being installed is "busy" until the last writer closes it
    // (or a process forked meanwhile by the installer execs): try again
    // for up to a second.
    let mut tries = 0;
    loop {
        match command.spawn() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 100 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            spawned => return spawned.map_err(|e| format!("cannot start {}: {e}", exe.display())),
        }
    }
}

/// Waits for a message of kind `want` from the new process; `what` is
/// the step in the past and in the infinitive ("answered", "answer").
fn expect(
    channel: &Channel,
    child: &mut Child,
    want: u8,
    (what, to_do): (&str, &str),
    timeout: Duration,
) -> Result<Vec<u8>, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // What it sent before it exited is read first: a message already
        // sent counts, whatever the process did next.
        match channel.receive(left.min(Duration::from_millis(100))) {
            Ok(None) => {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!("the new binary exited ({status}) before it {what}"));
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "the new binary did not {to_do} within {} s",
                        timeout.as_secs()
                    ));
                }
            }
            Ok(Some((kind, body, fds))) => {
                close_all(&fds);
                if kind == want {
                    return Ok(body);
                }
                if kind == kind::FAILED {
                    return Err(format!(
                        "the new binary refused: {}",
                        String::from_utf8_lossy(&body)
                    ));
                }
                return Err(format!(
                    "the new binary sent message {kind} before it {what}"
                ));
            }
            Err(_) => {
                return Err(gone(
                    child,
                    what,
                    format!("the new binary closed the channel before it {what}"),
                ))
            }
        }
    }
}

/// Why the new binary is gone: its exit status when it has one (within
/// half a second), else `otherwise`.
fn gone(child: &mut Child, what: &str, otherwise: String) -> String {
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return format!("the new binary exited ({status}) before it {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    otherwise
}

fn close_all(fds: &[RawFd]) {
    for fd in fds {
        // SAFETY: received descriptors we own.
        unsafe { libc::close(*fd) };
    }
}

fn stop_child(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Sends `make(reply)` to every shard and collects their answers.
fn ask_shards<T: Send + 'static>(
    old: &Old<'_>,
    make: impl Fn(mpsc::Sender<(usize, T)>) -> ShardMessage,
) -> Result<Vec<T>, String> {
    let (tx, rx) = mpsc::channel();
    for id in 0..old.shards {
        old.mesh
            .send_to(id, make(tx.clone()))
            .map_err(|_| format!("shard {id} stopped"))?;
    }
    drop(tx);
    let deadline = Instant::now() + SHARD_TIMEOUT;
    let mut answers: Vec<Option<T>> = (0..old.shards).map(|_| None).collect();
    for _ in 0..old.shards {
        let left = deadline.saturating_duration_since(Instant::now());
        let (id, answer) = rx
            .recv_timeout(left)
            .map_err(|_| "a shard did not answer".to_string())?;
        answers[id] = Some(answer);
    }
    Ok(answers
        .into_iter()
        .map(|a| a.expect("every shard answered"))
        .collect())
}

fn thaw_all(old: &Old<'_>) {
    for id in 0..old.shards {
        let _ = old.mesh.send_to(id, ShardMessage::Thaw);
    }
}

/// The new process did not get to serve: it is stopped (and reaped, so
/// that no copy of a socket or of the log is left with it) before this
/// process takes the log back and serves on.
fn fail_back(old: &Old<'_>, channel: &Channel, child: &mut Child, reason: String) -> Outcome {
    // Said first, for a process that outlives its stopped parent (a
    // wrapper that did not exec): it exits without serving.
    let _ = channel.send(kind::FAILED, reason.as_bytes(), &[]);
    stop_child(child);
    thaw_all(old);
    Outcome::Failed(reason)
}

/// How long to wait for PREPARED: [`PREPARE_TIMEOUT`], or in debug builds
/// what `HOOKSTREAM_DEBUG_HANDOFF_WAIT_MS` says (tests of a silent new
/// process).
fn prepare_timeout() -> Duration {
    super::fault::handoff_wait().unwrap_or(PREPARE_TIMEOUT)
}

/// The upgrade, in the old process's main thread (see the module doc).
pub fn perform(old: Old<'_>) -> Outcome {
    handoff::trace("old: upgrade starts");
    let exe = match own_exe() {
        Ok(exe) => exe,
        Err(e) => return Outcome::Failed(e),
    };
    let (ours, theirs) = match Channel::pair() {
        Ok(pair) => pair,
        Err(e) => return Outcome::Failed(format!("cannot create the handoff channel: {e}")),
    };
    let mut child = match spawn(&exe, &theirs) {
        Ok(child) => child,
        Err(e) => return Outcome::Failed(e),
    };
    drop(theirs);
    let hello = match expect(
        &ours,
        &mut child,
        kind::HELLO,
        ("answered", "answer"),
        HELLO_TIMEOUT,
    ) {
        Ok(body) => body,
        Err(e) => {
            stop_child(&mut child);
            return Outcome::Failed(e);
        }
    };
    let reads = handoff::versions_of(&hello);
    let Some(version) = handoff::choose(&reads) else {
        let reason = format!(
            "the new binary reads state versions {reads:?}, this process writes versions {:?}",
            handoff::READS
        );
        let _ = ours.send(kind::FAILED, reason.as_bytes(), &[]);
        stop_child(&mut child);
        return Outcome::Failed(reason);
    };
    // Version 2: the sockets go ahead of the freeze, and the new process
    // registers them while this one serves on.
    if version >= 2 {
        if let Err(e) = pass_early(&old, &ours, &mut child) {
            // Nothing is frozen: each shard forgets what it passed once
            // the new process (and its copies of the sockets) is gone.
            return fail_back(&old, &ours, &mut child, e);
        }
    }

    // Freeze: from here until the thaw or the retirement, no shard
    // accepts, reads, writes or commits.
    handoff::trace("old: freezing");
    let frozen_at = handoff::monotonic_ns();
    let snapshots: Vec<Snapshot> =
        match ask_shards(&old, |reply| ShardMessage::Freeze { version, reply }) {
            Ok(snapshots) => snapshots,
            Err(e) => {
                thaw_all(&old);
                stop_child(&mut child);
                return Outcome::Failed(format!("cannot freeze the shards: {e}"));
            }
        };
    handoff::trace("old: frozen, records written out");
    let sent = send_state(&ours, &old, &snapshots, version);
    handoff::trace("old: state sent");
    let ready = sent.and_then(|()| {
        expect(
            &ours,
            &mut child,
            kind::READY,
            ("read the state", "read the state"),
            READY_TIMEOUT,
        )
        .map(|_| ())
    });
    if let Err(e) = ready {
        // It never served: once it is gone, nothing but this process
        // touches the connections.
        stop_child(&mut child);
        thaw_all(&old);
        return Outcome::Failed(e);
    }

    // Hand over: every shard commits what waits (queued to its frozen
    // connections), closes its admin connections once answered, and stops
    // appending. It still holds every connection, and the data
    // directory's lock, which the new process shares from here.
    handoff::trace("old: READY received");
    if let Err(e) = ask_shards(&old, |reply| ShardMessage::Hand { reply }) {
        return fail_back(
            &old,
            &ours,
            &mut child,
            format!("a shard did not hand over: {e}"),
        );
    }
    if let Err(e) = ask_shards(&old, |reply| ShardMessage::Release { reply }) {
        return fail_back(
            &old,
            &ours,
            &mut child,
            format!("a shard did not release the log: {e}"),
        );
    }
    handoff::trace("old: log released");
    let lock_fd: Vec<RawFd> = old.lock.iter().map(|file| file.as_raw_fd()).collect();
    if let Err(e) = ours.send(kind::RELEASED, b"", &lock_fd) {
        let reason = gone(
            &mut child,
            "was ready to serve",
            format!("cannot hand the log over to the new binary: {e}"),
        );
        return fail_back(&old, &ours, &mut child, reason);
    }
    if let Err(e) = expect(
        &ours,
        &mut child,
        kind::PREPARED,
        ("was ready to serve", "get ready to serve"),
        prepare_timeout(),
    ) {
        return fail_back(&old, &ours, &mut child, e);
    }

    // The commit point: from the COMMIT on, the connections are the new
    // process's (a send that fails never reached it: it is gone).
    handoff::trace("old: PREPARED received");
    if let Err(e) = ours.send(kind::COMMIT, b"", &[]) {
        let reason = gone(
            &mut child,
            "was ready to serve",
            format!("the new binary went away before the commit: {e}"),
        );
        return fail_back(&old, &ours, &mut child, reason);
    }
    handoff::trace("old: COMMIT sent");
    // The shards stay in `Phase::Handing` (touching no connection) while
    // the new process starts serving; their retirement (ten thousand
    // records and epoll registrations dropped) would only compete with it
    // for a core.
    let serving = expect(
        &ours,
        &mut child,
        kind::SERVING,
        ("served", "serve"),
        SERVING_TIMEOUT,
    );
    handoff::trace("old: SERVING received");
    let retired = ask_shards(&old, |reply| ShardMessage::Retire { reply });
    handoff::trace("old: retired");
    drop(old.lock.take());
    let connections = snapshots.iter().map(|s| s.count).sum();
    if let Err(e) = &retired {
        // The new process serves: only this one's cleanup is cut short
        // (it exits anyway).
        crate::log::warn(format_args!(
            "hookstream: upgrade: a shard did not retire: {e}"
        ));
    }
    match serving {
        Ok(body) => Outcome::Serving {
            pid: match body.get(..4) {
                Some(bytes) => u32::from_le_bytes(bytes.try_into().expect("4 bytes")),
                None => child.id(),
            },
            connections,
            frozen: Duration::from_nanos(
                match body.get(4..12) {
                    Some(bytes) => u64::from_le_bytes(bytes.try_into().expect("8 bytes")),
                    None => handoff::monotonic_ns(),
                }
                .saturating_sub(frozen_at),
            ),
        },
        Err(e) => Outcome::Lost(e),
    }
}

/// Before the freeze (state version 2): the listeners, then every shard's
/// live sockets (each shard sends its own, `upgrade::pass_early`), then
/// EARLY_END; waits for the new process to have registered them
/// (EARLY_READY).
fn pass_early(old: &Old<'_>, channel: &Channel, child: &mut Child) -> Result<(), String> {
    handoff::trace("old: passing the sockets ahead of the freeze");
    let failed = |e: std::io::Error| format!("cannot pass the state to the new binary: {e}");
    let listeners = listener_fds(old);
    for chunk in listeners.chunks(handoff::FDS_PER_MESSAGE) {
        channel
            .send(
                kind::LISTENERS,
                &(listeners.len() as u32).to_le_bytes(),
                chunk,
            )
            .map_err(failed)?;
    }
    // SAFETY: the channel's descriptor stays open for this borrow.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(channel.raw()) };
    let copies = (0..old.shards)
        .map(|_| borrowed.try_clone_to_owned())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("cannot pass the state to the new binary: {e}"))?;
    let copies = std::sync::Mutex::new(copies);
    let passed = ask_shards(old, |reply| ShardMessage::PassEarly {
        channel: copies
            .lock()
            .expect("not poisoned")
            .pop()
            .expect("one copy per shard"),
        reply,
    })?;
    let mut total = 0;
    for count in passed {
        total += count?;
    }
    channel
        .send(kind::EARLY_END, &(total as u32).to_le_bytes(), &[])
        .map_err(failed)?;
    handoff::trace(&format!("old: {total} sockets passed ahead of the freeze"));
    expect(
        channel,
        child,
        kind::EARLY_READY,
        ("registered the connections", "register the connections"),
        prepare_timeout(),
    )?;
    handoff::trace("old: EARLY_READY received");
    Ok(())
}

fn listener_fds(old: &Old<'_>) -> Vec<RawFd> {
    old.listeners
        .iter()
        .flat_map(|(public, admin)| [*public, *admin])
        .collect()
}

fn send_state(
    channel: &Channel,
    old: &Old<'_>,
    snapshots: &[Snapshot],
    version: u16,
) -> Result<(), String> {
    let failed = |e: std::io::Error| format!("cannot pass the state to the new binary: {e}");
    let fd_count: usize = snapshots.iter().map(|s| s.fds.len()).sum();
    let records: usize = snapshots.iter().map(|s| s.count).sum();
    // Version 2 passed the listeners ahead of the freeze.
    let listeners = if version >= 2 {
        Vec::new()
    } else {
        listener_fds(old)
    };
    let mut start = Vec::new();
    start.extend_from_slice(&version.to_le_bytes());
    start.extend_from_slice(&(listeners.len() as u32).to_le_bytes());
    start.extend_from_slice(&(fd_count as u32).to_le_bytes());
    if version >= 2 {
        start.extend_from_slice(&(records as u32).to_le_bytes());
    }
    channel.send(kind::START, &start, &[]).map_err(failed)?;
    for chunk in listeners.chunks(handoff::FDS_PER_MESSAGE) {
        channel.send(kind::FDS, b"", chunk).map_err(failed)?;
    }
    for snapshot in snapshots {
        for chunk in snapshot.fds.chunks(handoff::FDS_PER_MESSAGE) {
            channel.send(kind::FDS, b"", chunk).map_err(failed)?;
        }
        for chunk in snapshot.records.chunks(handoff::DATA_PER_MESSAGE) {
            channel.send(kind::DATA, chunk, &[]).map_err(failed)?;
        }
    }
    channel.send(kind::END, b"", &[]).map_err(failed)
}

/// What the new process was handed.
pub struct Inherited {
    /// The control channel, to say PREPARED and SERVING on (state version
    /// 2: and to read the freeze's state on, see [`Inherited::early`]).
    pub channel: Channel,
    /// The data directory's lock, shared with the old process until it
    /// commits; `None` from an old process of the previous handshake,
    /// which let go of it (and of the connections) already, and, state
    /// version 2, until the freeze's state was read ([`confirm_freeze`]).
    pub lock: Option<std::fs::File>,
    /// (public, admin) listeners, one pair per shard of the old process.
    pub listeners: Vec<(RawFd, RawFd)>,
    /// The connections: their sockets (owned; `None`: passed ahead of the
    /// freeze, found by the record's id) and records. State version 2:
    /// empty until the freeze ([`receive_freeze`]).
    pub connections: Vec<(Option<RawFd>, ConnRecord)>,
    /// State version 2: the connections passed ahead of the freeze, their
    /// sockets (owned) and records as they were then; the old process
    /// freezes once they are registered (EARLY_READY).
    pub early: Option<Vec<(RawFd, ConnRecord)>>,
}

/// The state read from the old process, not confirmed yet: nothing is
/// served with it until [`Received::confirm`] (version 1) or
/// [`confirm_freeze`] (version 2).
pub struct Received {
    channel: Channel,
    listeners: Vec<(RawFd, RawFd)>,
    connections: Vec<(Option<RawFd>, ConnRecord)>,
    early: Option<Vec<(RawFd, ConnRecord)>>,
}

/// In the new process, before anything else: say which versions this
/// binary reads and take the state (version 1), or what comes ahead of
/// the freeze (version 2: the listeners and the live connections). Every
/// failure is told to the old process (which serves on) and ends this
/// one.
pub fn receive(channel: Channel) -> Result<Received, String> {
    let fault = super::fault::handoff_fault();
    handoff::trace("new: sending HELLO");
    let hello = match fault.as_deref() {
        Some("reads-9") => 9u16.to_le_bytes().to_vec(),
        Some("reads-1") => 1u16.to_le_bytes().to_vec(),
        _ => handoff::hello_body(),
    };
    channel
        .send(kind::HELLO, &hello, &[])
        .map_err(|e| format!("handoff: cannot reach the old process: {e}"))?;
    let first = channel
        .receive(READY_TIMEOUT)
        .map_err(|e| format!("reading the state: {e}"))
        .and_then(|m| m.ok_or_else(|| "the old process sent no state".to_string()));
    let state = first.and_then(|first| {
        if first.0 == kind::LISTENERS {
            receive_early(&channel, first)
                .map(|(listeners, early)| (listeners, Vec::new(), Some(early)))
        } else {
            let buffers = Buffers {
                lists: vec![Vec::new()],
                data: Vec::new(),
            };
            receive_state(&channel, first, &HashMap::new(), 1, buffers).map(
                |(listeners, mut connections)| {
                    (listeners, connections.pop().unwrap_or_default(), None)
                },
            )
        }
    });
    handoff::trace("new: state received");
    match state {
        // Version 2 plays it once the freeze's state is read.
        Ok((_, _, None)) if fault.as_deref() == Some("exit-after-state") => std::process::exit(3),
        Ok((listeners, connections, early)) => Ok(Received {
            channel,
            listeners,
            connections,
            early,
        }),
        Err(e) => {
            let _ = channel.send(kind::FAILED, e.as_bytes(), &[]);
            Err(format!("handoff: {e}"))
        }
    }
}

impl Received {
    fn give_back(&self) {
        for (a, b) in &self.listeners {
            close_all(&[*a, *b]);
        }
        for (fd, _) in &self.connections {
            close_all(fd.as_slice());
        }
        for (fd, _) in self.early.iter().flatten() {
            close_all(&[*fd]);
        }
    }

    /// State version 2: what came ahead of the freeze; the rest is read
    /// once the early connections are registered ([`receive_freeze`]).
    /// `None` for version 1 (use [`Received::confirm`]).
    pub fn early(self) -> Result<Inherited, Received> {
        if self.early.is_none() {
            return Err(self);
        }
        Ok(Inherited {
            channel: self.channel,
            lock: None,
            listeners: self.listeners,
            connections: self.connections,
            early: self.early,
        })
    }

    /// Says READY and waits until the old process stopped appending to
    /// the log. The connections are not this process's yet: the old one
    /// still holds them (and the data directory's lock, whose descriptor
    /// comes with RELEASED) until it commits (see `run::await_commit`).
    pub fn confirm(self) -> Result<Inherited, String> {
        match confirm_freeze(&self.channel) {
            Ok(lock) => Ok(Inherited {
                channel: self.channel,
                lock,
                listeners: self.listeners,
                connections: self.connections,
                early: None,
            }),
            Err(e) => {
                self.give_back();
                Err(e)
            }
        }
    }
}

/// Says READY (the freeze's state was read) and waits until the old
/// process stopped appending to the log: RELEASED, with the descriptor of
/// the data directory's lock when it has the commit handshake.
pub fn confirm_freeze(channel: &Channel) -> Result<Option<std::fs::File>, String> {
    if let Err(e) = channel.send(kind::READY, b"", &[]) {
        return Err(format!("handoff: the old process went away: {e}"));
    }
    if super::fault::handoff_fault().as_deref() == Some("exit-after-ready") {
        // SAFETY: _exit ends the process at once.
        unsafe { libc::_exit(4) };
    }
    match channel.receive(RELEASED_TIMEOUT) {
        Ok(Some((kind::RELEASED, _, mut fds))) => {
            handoff::trace("new: RELEASED received");
            use std::os::unix::io::FromRawFd;
            let lock = fds.pop().map(|fd| {
                // SAFETY: a received descriptor we own.
                unsafe { std::fs::File::from_raw_fd(fd) }
            });
            close_all(&fds);
            Ok(lock)
        }
        Ok(Some((kind::FAILED, body, _))) => Err(format!(
            "handoff: the old process gave up: {}",
            String::from_utf8_lossy(&body)
        )),
        _ => Err("handoff: the old process did not release the log".to_string()),
    }
}

/// State version 2, once the early connections are registered: says
/// EARLY_READY and reads the freeze's state — the records (a socket passed
/// early named by its id, which must be one of `early_ids`) and the
/// sockets of the connections accepted since. A failure is told to the old
/// process.
pub fn receive_freeze(
    channel: &Channel,
    early_ids: &HashMap<u64, usize>,
    shards: usize,
) -> Result<PerShard, String> {
    // The memory the freeze's state is read into, taken (and touched)
    // now, before the old process freezes: memory a process touches the
    // first time can cost milliseconds per megabyte on a busy host (page
    // clearing, the hypervisor's own faults), and these are megabytes at
    // tens of thousands of connections.
    let mut per_shard = vec![0usize; shards];
    for &shard in early_ids.values() {
        per_shard[shard.min(shards - 1)] += 1;
    }
    let buffers = Buffers {
        lists: per_shard
            .iter()
            .map(|&n| touched(n + n / 8 + 64, || (None, ConnRecord::default())))
            .collect(),
        data: touched(early_ids.len() * 32 + 64 * 1024, || 0u8),
    };
    let fault = super::fault::handoff_fault();
    match fault.as_deref() {
        Some("exit-after-early") => std::process::exit(6),
        // The old process serves on meanwhile: connections close, change
        // and arrive between the early pass and the freeze.
        Some("slow-early") => std::thread::sleep(std::time::Duration::from_millis(1500)),
        _ => {}
    }
    channel
        .send(kind::EARLY_READY, b"", &[])
        .map_err(|e| format!("handoff: the old process went away: {e}"))?;
    let state = channel
        .receive(READY_TIMEOUT)
        .map_err(|e| format!("reading the state: {e}"))
        .and_then(|m| m.ok_or_else(|| "the old process sent no state".to_string()))
        .and_then(|first| receive_state(channel, first, early_ids, shards, buffers));
    handoff::trace("new: freeze state received");
    match state {
        Ok(_) if fault.as_deref() == Some("exit-after-state") => std::process::exit(3),
        Ok((listeners, connections)) if listeners.is_empty() => Ok(connections),
        Ok((listeners, connections)) => {
            for (a, b) in listeners {
                close_all(&[a, b]);
            }
            for (fd, _) in connections.into_iter().flatten() {
                close_all(fd.as_slice());
            }
            let e = "listeners passed twice".to_string();
            let _ = channel.send(kind::FAILED, e.as_bytes(), &[]);
            Err(format!("handoff: {e}"))
        }
        Err(e) => {
            let _ = channel.send(kind::FAILED, e.as_bytes(), &[]);
            Err(format!("handoff: {e}"))
        }
    }
}

type Early = (Vec<(RawFd, RawFd)>, Vec<(RawFd, ConnRecord)>);

/// The message in `next` when there is one (already read), else the next
/// one from the old process within [`READY_TIMEOUT`]; `ended` says that
/// the channel ended instead.
fn next_message(
    channel: &Channel,
    next: &mut Option<handoff::Message>,
    ended: &str,
) -> Result<handoff::Message, String> {
    match next.take() {
        Some(message) => Ok(message),
        None => channel
            .receive(READY_TIMEOUT)
            .map_err(|e| format!("reading the state: {e}"))?
            .ok_or_else(|| ended.to_string()),
    }
}

/// State version 2, ahead of the freeze: the listeners (`first` is the
/// first LISTENERS message), then EARLY messages until EARLY_END.
fn receive_early(channel: &Channel, first: handoff::Message) -> Result<Early, String> {
    let mut listener_fds: Vec<RawFd> = Vec::new();
    let mut listener_count = None;
    let mut connections: Vec<(RawFd, ConnRecord)> = Vec::new();
    let mut next = Some(first);
    let result = (|| loop {
        let (kind, body, received) = next_message(
            channel,
            &mut next,
            "the old process stopped sending the state",
        )?;
        match kind {
            kind::LISTENERS if body.len() >= 4 => {
                listener_fds.extend(received);
                listener_count = Some(u32::from_le_bytes(body[..4].try_into().expect("4")));
            }
            kind::EARLY => {
                let mut at = 0;
                let mut fds = received.into_iter();
                while at < body.len() {
                    let (record, used) = match ConnRecord::decode(2, &body[at..]) {
                        Ok(decoded) => decoded,
                        Err(e) => {
                            close_all(&fds.collect::<Vec<_>>());
                            return Err(e);
                        }
                    };
                    at += used;
                    let Some(fd) = fds.next() else {
                        return Err("an early connection without its socket".to_string());
                    };
                    connections.push((fd, record));
                }
                let extra: Vec<RawFd> = fds.collect();
                if !extra.is_empty() {
                    close_all(&extra);
                    return Err("an early socket without its record".to_string());
                }
            }
            kind::EARLY_END if body.len() >= 4 => {
                let count = u32::from_le_bytes(body[..4].try_into().expect("4")) as usize;
                if count != connections.len() {
                    return Err(format!(
                        "expected {count} early connections, got {}",
                        connections.len()
                    ));
                }
                return Ok(());
            }
            kind::FAILED => {
                close_all(&received);
                return Err(String::from_utf8_lossy(&body).into_owned());
            }
            other => {
                close_all(&received);
                return Err(format!("unexpected message {other}"));
            }
        }
    })();
    let count_ok = listener_count.is_some_and(|n| n as usize == listener_fds.len())
        && listener_fds.len() % 2 == 0;
    if result.is_err() || !count_ok {
        close_all(&listener_fds);
        for (fd, _) in &connections {
            close_all(&[*fd]);
        }
        return Err(result
            .err()
            .unwrap_or_else(|| "the listeners came cut short".to_string()));
    }
    let listeners = listener_fds
        .chunks(2)
        .map(|pair| (pair[0], pair[1]))
        .collect();
    Ok((listeners, connections))
}

/// Connections with their records, one list per shard of this process.
pub type PerShard = Vec<Vec<(Option<RawFd>, ConnRecord)>>;

/// Where the freeze's state is read into: one list per shard and the
/// records' bytes (empty, with room).
struct Buffers {
    lists: PerShard,
    data: Vec<u8>,
}

/// An empty vector with room for `n`, every byte of which was written once
/// (so that filling it later takes no page fault).
pub fn touched<T>(n: usize, fill: impl Fn() -> T) -> Vec<T> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(fill());
    }
    std::hint::black_box(v.as_ptr());
    v.clear();
    v
}

type State = (Vec<(RawFd, RawFd)>, PerShard);

/// The freeze's state, `first` being its first message (START): the
/// listeners (version 1), the records, and the sockets of every record not
/// passed early (version 2: an early one names one of `early_ids`, which
/// says its shard), each in the list of its org's shard of `shards`.
fn receive_state(
    channel: &Channel,
    first: handoff::Message,
    early_ids: &HashMap<u64, usize>,
    shards: usize,
    buffers: Buffers,
) -> Result<State, String> {
    let mut fds: Vec<RawFd> = Vec::new();
    let Buffers {
        lists: mut connections,
        mut data,
    } = buffers;
    let mut start: Option<(u16, usize, usize, usize)> = None;
    let mut next = Some(first);
    let result = (|| loop {
        let (kind, body, received) =
            next_message(channel, &mut next, "the old process sent no state")?;
        fds.extend(received);
        match kind {
            kind::START if body.len() >= 10 => {
                let version = u16::from_le_bytes([body[0], body[1]]);
                if !handoff::READS.contains(&version) {
                    return Err(format!(
                        "state format version {version} is not one this binary reads ({:?})",
                        handoff::READS
                    ));
                }
                let listeners = u32::from_le_bytes(body[2..6].try_into().expect("4")) as usize;
                let sockets = u32::from_le_bytes(body[6..10].try_into().expect("4")) as usize;
                let records = match body.get(10..14) {
                    Some(n) if version >= 2 => {
                        u32::from_le_bytes(n.try_into().expect("4")) as usize
                    }
                    None if version < 2 => sockets,
                    _ => return Err("the state header was cut short".to_string()),
                };
                start = Some((version, listeners, sockets, records));
            }
            kind::FDS => {}
            kind::DATA => data.extend_from_slice(&body),
            kind::END => return Ok(()),
            kind::FAILED => return Err(String::from_utf8_lossy(&body).into_owned()),
            other => return Err(format!("unexpected message {other}")),
        }
    })();
    let fail = |e: String, fds: &[RawFd]| {
        close_all(fds);
        Err(e)
    };
    if let Err(e) = result {
        return fail(e, &fds);
    }
    let Some((version, listener_count, socket_count, record_count)) = start else {
        return fail("the state had no header".to_string(), &fds);
    };
    if fds.len() != listener_count + socket_count || listener_count % 2 != 0 {
        return fail(
            format!(
                "expected {} descriptors, got {}",
                listener_count + socket_count,
                fds.len()
            ),
            &fds,
        );
    }
    connections.resize_with(shards, Vec::new);
    let mut read = 0;
    let mut sockets = fds[listener_count..].iter().copied();
    let mut at = 0;
    while at < data.len() {
        match ConnRecord::decode(version, &data[at..]) {
            Ok((record, used)) => {
                at += used;
                read += 1;
                if record.early {
                    let Some(&shard) = early_ids.get(&record.id).filter(|s| **s < shards) else {
                        return fail(
                            format!("connection {} was not passed early", record.id),
                            &fds,
                        );
                    };
                    connections[shard].push((None, record));
                } else {
                    let shard = super::shard_for(&record.org_id, shards);
                    match sockets.next() {
                        Some(fd) => connections[shard].push((Some(fd), record)),
                        None => return fail("a record without its socket".to_string(), &fds),
                    }
                }
            }
            Err(e) => return fail(e, &fds),
        }
    }
    if read != record_count || sockets.next().is_some() {
        return fail(
            format!(
                "expected {record_count} records and {socket_count} sockets, got {read} records"
            ),
            &fds,
        );
    }
    let listeners = fds[..listener_count]
        .chunks(2)
        .map(|pair| (pair[0], pair[1]))
        .collect();
    Ok((listeners, connections))
}

/// Writes `<data-dir>/hookstream.pid` with this process's pid (replacing
/// it atomically).
pub fn write_pid_file(data_dir: &Path) -> Result<(), String> {
    let path = data_dir.join(PID_FILE);
    let temporary = data_dir.join(format!("{PID_FILE}.{}", std::process::id()));
    std::fs::write(&temporary, format!("{}\n", std::process::id()))
        .and_then(|()| std::fs::rename(&temporary, &path))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Removes the pid file when it still names this process (after an
/// upgrade it names the new one).
pub fn remove_pid_file(data_dir: &Path) {
    let path = data_dir.join(PID_FILE);
    if read_pid(&path) == Some(std::process::id()) {
        let _ = std::fs::remove_file(path);
    }
}

/// The pid a pid file names.
pub fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Writes the outcome of an upgrade for `hookstream upgrade` (atomically).
pub fn write_outcome(data_dir: &Path, line: &str) {
    let path = data_dir.join(OUTCOME_FILE);
    let temporary = data_dir.join(format!("{OUTCOME_FILE}.{}", std::process::id()));
    let _ = std::fs::write(&temporary, format!("{line}\n"))
        .and_then(|()| std::fs::rename(&temporary, &path));
}

/// Tells systemd (`Type=notify`, `NotifyAccess=all`) which process serves,
/// when `NOTIFY_SOCKET` is set; best effort.
pub fn notify_systemd(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let socket = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(socket) => socket,
        Err(_) => return,
    };
    let bytes = path.as_encoded_bytes();
    if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        if let Ok(addr) = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name) {
            let _ = socket.send_to_addr(state.as_bytes(), &addr);
        }
    } else {
        let _ = socket.send_to(state.as_bytes(), Path::new(&path));
    }
}
