//! The shard's connection reactor: hibernation without a task per
//! connection.
//!
//! Every upgraded socket of the shard sits in one level-triggered epoll set,
//! keyed by its slab key. One task per shard waits for that set to become
//! ready — through glommio's io_uring poll on a duplicate of the epoll
//! descriptor, so the shard thread never blocks — then takes the ready
//! sockets with a non-blocking `epoll_wait` and reads each once into a
//! pooled buffer. An idle connection therefore costs its slab record and the
//! kernel's socket and epoll entry: no task, no future, no buffer.
//!
//! Writes happen where frames are queued (the fan-out's non-blocking
//! `sendmsg`); only a socket that refused bytes gets EPOLLOUT interest until
//! it drains. Closing follows RFC 6455 §7 with a bounded linger.

use std::future::poll_fn;
use std::os::unix::io::{FromRawFd, RawFd};
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_lite::AsyncReadExt;

use super::connection::{self, Outcome};
use super::Shard;
use crate::protocol::ws::{self, CloseCode, Decoder};
use crate::registry::{ConnKey, ConnState, Flush, Frame, Partial, Registry};

/// Most events taken per `epoll_wait`.
const EVENTS_MAX: usize = 512;
/// How long a closing connection may take to finish the close handshake.
pub const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// How long a slow consumer's socket is kept for its close frame: its
/// queue is already freed, so waiting costs only the socket, and a client
/// that resumes reading then learns why it was cut off (1013).
pub const CLOSE_LINGER_SLOW_CONSUMER: Duration = Duration::from_secs(30);

/// The epoll set of one shard.
#[derive(Debug)]
pub struct Reactor {
    epoll: RawFd,
}

/// The epoll data of the public listener; no connection key has it (a
/// slab index never reaches `u32::MAX`).
const LISTENER: u64 = u64::MAX;
/// The epoll data of a parked connection is this with its slot in the low
/// 31 bits: an index with the top bit set, which no connection key has.
const PARKED: u64 = 0xffff_ffff_8000_0000;

fn key_data(key: ConnKey) -> u64 {
    (u64::from(key.generation) << 32) | u64::from(key.index)
}

fn key_of(data: u64) -> ConnKey {
    ConnKey {
        index: data as u32,
        generation: (data >> 32) as u32,
    }
}

impl Reactor {
    /// A new, empty epoll set.
    pub fn new() -> std::io::Result<Reactor> {
        // SAFETY: plain syscall; the descriptor is owned by the Reactor.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epoll < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Reactor { epoll })
    }

    fn control(
        &self,
        op: libc::c_int,
        fd: RawFd,
        key: ConnKey,
        write: bool,
    ) -> std::io::Result<()> {
        let mut events = (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
        if write {
            events |= libc::EPOLLOUT as u32;
        }
        let mut event = libc::epoll_event {
            events,
            u64: key_data(key),
        };
        // SAFETY: epoll_ctl on descriptors we own, with a stack event.
        if unsafe { libc::epoll_ctl(self.epoll, op, fd, &mut event) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Watches a new connection for input.
    pub fn add(&self, fd: RawFd, key: ConnKey) -> std::io::Result<()> {
        self.control(libc::EPOLL_CTL_ADD, fd, key, false)
    }

    /// Starts or stops waiting for writability.
    pub fn want_write(&self, fd: RawFd, key: ConnKey, write: bool) {
        let _ = self.control(libc::EPOLL_CTL_MOD, fd, key, write);
    }

    /// Watches the public listener, edge-triggered: an event means new
    /// connections arrived since the last one, and the accept task (woken
    /// through [`super::Shard::accept_wake`]) accepts until the queue is
    /// empty. Edge-triggered so the reactor does not see the listener again
    /// and again until that task has run.
    pub fn add_listener(&self, fd: RawFd) -> std::io::Result<()> {
        let mut event = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLET) as u32,
            u64: LISTENER,
        };
        // SAFETY: epoll_ctl on descriptors we own, with a stack event.
        if unsafe { libc::epoll_ctl(self.epoll, libc::EPOLL_CTL_ADD, fd, &mut event) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Watches a connection parked before its request head arrived
    /// (`public::Parked`), edge-triggered: one event when bytes or a FIN
    /// arrive, for the accept task to act on.
    pub fn add_parked(&self, fd: RawFd, slot: usize) -> std::io::Result<()> {
        let mut event = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
            u64: PARKED | slot as u64,
        };
        // SAFETY: epoll_ctl on descriptors we own, with a stack event.
        if unsafe { libc::epoll_ctl(self.epoll, libc::EPOLL_CTL_ADD, fd, &mut event) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Stops watching a socket (before it is closed).
    pub fn remove(&self, fd: RawFd) {
        let mut event = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: as above.
        unsafe { libc::epoll_ctl(self.epoll, libc::EPOLL_CTL_DEL, fd, &mut event) };
    }
}

impl Drop for Reactor {
    fn drop(&mut self) {
        // SAFETY: we own the epoll descriptor.
        unsafe { libc::close(self.epoll) };
    }
}

/// Resolves once `fd` is readable. glommio offers no readiness wait on
/// arbitrary descriptors, but a `TcpStream` built on a descriptor registers
/// an io_uring poll for readability at once; on an epoll set or an eventfd
/// that poll fires when it is ready (the `recv` glommio then tries fails
/// with ENOTSOCK, which is the signal). A duplicate is used so dropping the
/// stream closes only the duplicate.
///
/// So each wait costs a `dup` and a `close`. Keeping one stream instead
/// does not work: glommio 0.9 arms a stream's readiness poll only when the
/// stream is made (`init`, crate-private); a second read of the same stream
/// tries `recv` at once, gets ENOTSOCK again and would spin. The reactor
/// waits only when no socket of the shard is ready, so this is paid once
/// per idle turn, never per event.
pub async fn wait_readable(fd: RawFd) {
    // SAFETY: dup of a descriptor the caller keeps open; the stream owns the
    // duplicate.
    let duplicate = unsafe { libc::dup(fd) };
    if duplicate < 0 {
        // Out of descriptors: look again shortly instead of spinning.
        glommio::timer::sleep(Duration::from_millis(5)).await;
        return;
    }
    // SAFETY: `duplicate` is a fresh descriptor we own.
    let mut stream = unsafe { glommio::net::TcpStream::from_raw_fd(duplicate) };
    let mut byte = [0u8; 1];
    let _ = stream.read(&mut byte).await;
}

/// Resolves when the registry has connections to close.
async fn close_requested(shard: &Shard) {
    poll_fn(|cx| {
        if shard.registry.borrow_mut().has_close_requests(cx.waker()) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await
}

/// The shard's reactor task.
pub async fn run(shard: Rc<Shard>) {
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS_MAX];
    loop {
        if shard.handover.frozen() {
            // A hot upgrade froze the shard: nothing is read (what the
            // clients send stays in the sockets for whichever process
            // serves next) and nothing is closed.
            shard.handover.wait_change().await;
            continue;
        }
        handle_close_requests(&shard);
        let next_deadline = sweep_lingering(&shard);
        if serve_ready(&shard, &mut events) == 0 {
            shard.flush_dirty().await;
            let linger = async {
                match next_deadline {
                    Some(deadline) => {
                        glommio::timer::sleep(deadline.saturating_duration_since(Instant::now()))
                            .await
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            futures_lite::future::or(
                wait_readable(shard.reactor.epoll),
                futures_lite::future::or(close_requested(&shard), linger),
            )
            .await;
            continue;
        }
        shard.flush_dirty().await;
        glommio::yield_if_needed().await;
    }
}

/// Handles the shard's connections that are ready right now (as many as
/// `events` holds), without waiting; returns how many there were. The
/// reactor task calls it when glommio reports the epoll set readable, and a
/// long broadcast walk between its parts (`Shard::deliver`): glommio reaps
/// the readiness poll only when it gets control back and submits the next
/// one a turn later, so a ping arriving mid-walk would otherwise wait two
/// or three preemption periods (10-15 ms) instead of one part (about 2 ms).
pub fn serve_ready(shard: &Shard, events: &mut [libc::epoll_event]) -> usize {
    if shard.handover.frozen() {
        return 0;
    }
    // SAFETY: epoll_wait into the caller's buffer, without blocking.
    let ready = unsafe {
        libc::epoll_wait(
            shard.reactor.epoll,
            events.as_mut_ptr(),
            events.len().min(libc::c_int::MAX as usize) as libc::c_int,
            0,
        )
    };
    let ready = ready.max(0) as usize;
    for event in &events[..ready] {
        if event.u64 == LISTENER {
            shard.accept_wake.notify();
            continue;
        }
        if event.u64 & PARKED == PARKED {
            shard.parked.ready((event.u64 & 0x7fff_ffff) as usize);
            shard.accept_wake.notify();
            continue;
        }
        on_event(shard, event.events, key_of(event.u64));
    }
    ready
}

fn on_event(shard: &Shard, events: u32, key: ConnKey) {
    let writable = events & libc::EPOLLOUT as u32 != 0;
    let readable =
        events & (libc::EPOLLIN | libc::EPOLLHUP | libc::EPOLLERR | libc::EPOLLRDHUP) as u32 != 0;
    if writable {
        let mut registry = shard.registry.borrow_mut();
        let Some(conn) = registry.get(key) else {
            return;
        };
        if conn.write_blocked {
            let fd = conn.fd;
            match registry.flush(key, &mut super::wire()) {
                Flush::Blocked => {}
                Flush::Failed => {
                    drop(registry);
                    remove_now(shard, key);
                    return;
                }
                Flush::Drained => {
                    shard.reactor.want_write(fd, key, false);
                    if registry
                        .get(key)
                        .is_some_and(|c| c.state == ConnState::Closed)
                    {
                        drop(registry);
                        remove_now(shard, key);
                        return;
                    }
                }
            }
        }
    }
    if readable {
        read_ready(shard, key, true);
    }
}

/// Reads once (when `receive`) and handles every complete frame buffered
/// for the connection.
pub fn read_ready(shard: &Shard, key: ConnKey, receive: bool) {
    let (fd, partial, deflates) = {
        let mut registry = shard.registry.borrow_mut();
        let Some(conn) = registry.get_mut(key) else {
            return;
        };
        (conn.fd, conn.partial.take(), conn.deflates())
    };
    let (mut decoder, mut buffer, mut filled) = match partial {
        Some(partial) => {
            let Partial { decoder, bytes } = *partial;
            let filled = bytes.len();
            let mut buffer = shard.take_buffer();
            if buffer.len() < filled {
                buffer.resize(filled, 0);
            }
            buffer[..filled].copy_from_slice(&bytes);
            (decoder, buffer, filled)
        }
        None => {
            let mut decoder = Decoder::new(shard.decoder_config());
            decoder.set_deflate(deflates);
            (decoder, shard.take_buffer(), 0)
        }
    };
    let mut opened = super::tls_wire::Opened::Data;
    if receive {
        if filled == buffer.len() {
            let needed = Decoder::frame_len_hint(&buffer[..filled]).unwrap_or(filled * 2);
            buffer.resize(needed.max(filled + 1), 0);
        }
        // SAFETY: recv into the unfilled part of our own buffer.
        let received = unsafe {
            libc::recv(
                fd,
                buffer[filled..].as_mut_ptr().cast(),
                buffer.len() - filled,
                libc::MSG_DONTWAIT,
            )
        };
        if received == 0 {
            shard.return_buffer(buffer);
            remove_now(shard, key);
            return;
        }
        if received < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() != std::io::ErrorKind::WouldBlock
                && error.kind() != std::io::ErrorKind::Interrupted
            {
                shard.return_buffer(buffer);
                remove_now(shard, key);
                return;
            }
        } else if super::tls_wire::is_tls(key) {
            // Open the records: their application data replaces the
            // ciphertext (a record completed now may give more bytes than
            // this read brought).
            let ciphertext = buffer[filled..filled + received as usize].to_vec();
            let mut plaintext = Vec::new();
            opened = super::tls_wire::open(key, &ciphertext, &mut plaintext);
            if buffer.len() < filled + plaintext.len() {
                buffer.resize(filled + plaintext.len(), 0);
            }
            buffer[filled..filled + plaintext.len()].copy_from_slice(&plaintext);
            filled += plaintext.len();
        } else {
            filled += received as usize;
        }
    }
    match opened {
        super::tls_wire::Opened::Data | super::tls_wire::Opened::KeyUpdate => {}
        super::tls_wire::Opened::CloseNotify | super::tls_wire::Opened::Bad => {
            if opened == super::tls_wire::Opened::Bad {
                shard
                    .metrics
                    .tls_failed(crate::metrics::TlsFailure::BadRecord);
            }
            shard.return_buffer(buffer);
            remove_now(shard, key);
            return;
        }
    }
    let mut outcome = process_frames(shard, key, &mut decoder, &mut buffer, &mut filled);
    if opened == super::tls_wire::Opened::KeyUpdate && outcome.is_none() {
        // The client renewed its keys; this server does not follow: close
        // with 1001 and let the client resume with `after`.
        outcome = Some(Outcome::CloseByUs(CloseCode::GOING_AWAY, "tls key update"));
    }
    if filled > 0 || decoder.is_assembling() {
        let partial = Partial {
            decoder,
            bytes: buffer[..filled].to_vec(),
        };
        if let Some(conn) = shard.registry.borrow_mut().get_mut(key) {
            conn.partial = Some(Box::new(partial));
        }
    }
    shard.return_buffer(buffer);
    match outcome {
        Some(outcome) => act(shard, key, outcome),
        // Replies leave at once (adopt calls this outside the reactor loop,
        // whose own flush would otherwise wait for the next event).
        None => super::flush_one(&mut shard.registry.borrow_mut(), &shard.reactor, key),
    }
}

/// Decodes and handles the complete frames in `buffer[..filled]`, leaving
/// the bytes of an incomplete frame at its front.
fn process_frames(
    shard: &Shard,
    key: ConnKey,
    decoder: &mut Decoder,
    buffer: &mut [u8],
    filled: &mut usize,
) -> Option<Outcome> {
    let mut start = 0;
    let mut outcome = None;
    while start < *filled {
        match decoder.decode(&mut buffer[start..*filled]) {
            Ok(None) => break,
            Ok(Some(decoded)) => {
                start += decoded.consumed;
                let Some(message) = decoded.message else {
                    continue;
                };
                let state = shard.registry.borrow().get(key).map(|c| c.state);
                let result = match state {
                    None => Some(Outcome::Abort),
                    Some(state) if state.handles_messages() => {
                        connection::handle(shard, key, message)
                    }
                    // Closing: only the peer's close (or EOF) matters now.
                    Some(_) => match message {
                        ws::Message::Close(_) => Some(Outcome::Abort),
                        _ => None,
                    },
                };
                if result.is_some() {
                    outcome = result;
                    break;
                }
            }
            Err(error) => {
                outcome = Some(Outcome::CloseByUs(
                    error.close_code(),
                    connection::error_reason(error),
                ));
                break;
            }
        }
    }
    buffer.copy_within(start..*filled, 0);
    *filled -= start;
    if outcome.is_some() {
        *filled = 0;
    }
    outcome
}

/// Carries out how a connection ends.
pub fn act(shard: &Shard, key: ConnKey, outcome: Outcome) {
    match outcome {
        Outcome::Abort => remove_now(shard, key),
        Outcome::CloseByUs(code, reason) => start_close(shard, key, code, reason, false),
        Outcome::CloseByPeer(code) => {
            let code = if ws::is_valid_close_code(code) {
                CloseCode::new(code)
            } else {
                CloseCode::NORMAL
            };
            start_close(shard, key, code, "", true);
        }
    }
}

/// Queues the close frame — ours, or the answer to the peer's when
/// `by_peer` — moves the state on, and lingers (bounded).
fn start_close(shard: &Shard, key: ConnKey, code: CloseCode, reason: &str, by_peer: bool) {
    let drained = {
        let mut registry = shard.registry.borrow_mut();
        let Some(conn) = registry.get_mut(key) else {
            return;
        };
        if !conn.state.handles_messages() {
            return;
        }
        if by_peer {
            conn.state = conn.state.on_close_received();
        }
        conn.state = conn.state.on_close_sent(code);
        conn.partial = None;
        let mut close = [0u8; ws::CLOSE_FRAME_BYTES_MAX];
        let len = ws::encode_close_frame(&mut close, code.get(), reason);
        registry.enqueue_final(key, &Frame::from(&close[..len]));
        flush_now(shard, &mut registry, key)
    };
    if drained == Some(true) && by_peer {
        remove_now(shard, key);
        return;
    }
    if drained.is_none() {
        remove_now(shard, key);
        return;
    }
    let linger = if code == CloseCode::SLOW_CONSUMER {
        CLOSE_LINGER_SLOW_CONSUMER
    } else {
        CLOSE_LINGER
    };
    shard
        .lingering
        .borrow_mut()
        .push((key, Instant::now() + linger));
}

/// Flushes one connection now; Some(true) when drained, Some(false) when
/// blocked (EPOLLOUT armed), None when the socket failed.
fn flush_now(shard: &Shard, registry: &mut Registry, key: ConnKey) -> Option<bool> {
    let fd = registry.get(key)?.fd;
    let was_blocked = registry.get(key)?.write_blocked;
    match registry.flush(key, &mut super::wire()) {
        Flush::Drained => Some(true),
        Flush::Blocked => {
            if !was_blocked {
                shard.reactor.want_write(fd, key, true);
            }
            Some(false)
        }
        Flush::Failed => None,
    }
}

/// Acts on the registry's close requests (slow consumers, revoked keys,
/// heartbeat, shutdown).
fn handle_close_requests(shard: &Shard) {
    let requests = shard.registry.borrow_mut().take_close_requests();
    for key in requests {
        let code = match shard.registry.borrow().get(key) {
            Some(conn) => match conn.state.close_requested() {
                Some(code) => code,
                None => continue,
            },
            None => continue,
        };
        // A socket that failed gets no close frame; every other code does.
        if code == CloseCode::ABNORMAL {
            remove_now(shard, key);
        } else {
            let reason = if code == CloseCode::KEY_REVOKED && key_still_active(shard, key) {
                // 4003 for a key that is still active: its session was
                // signed out, or has expired. The reason tells a client
                // which (PROTOCOL.md §2), so a page can say "signed out",
                // not "key revoked".
                if session_expired(shard, key) {
                    connection::CLOSE_SESSION_EXPIRED_REASON
                } else {
                    connection::CLOSE_SIGNED_OUT_REASON
                }
            } else {
                code.server_reason()
            };
            start_close(shard, key, code, reason, false);
        }
    }
}

/// True when connection `key` signed in with a session that has expired.
fn session_expired(shard: &Shard, key: ConnKey) -> bool {
    let now = crate::auth::sessions::now_unix_secs();
    shard
        .registry
        .borrow()
        .session_of(key)
        .is_some_and(|(_, expires)| now >= expires)
}

/// True when the API key connection `key` was accepted with is still
/// active.
fn key_still_active(shard: &Shard, key: ConnKey) -> bool {
    let registry = shard.registry.borrow();
    registry
        .key_id_of(key)
        .is_some_and(|key_id| shard.keys.get().is_active(key_id))
}

/// Removes connections whose linger ran out; returns the next deadline.
fn sweep_lingering(shard: &Shard) -> Option<Instant> {
    let now = Instant::now();
    let mut expired = Vec::new();
    let next = {
        let mut lingering = shard.lingering.borrow_mut();
        let registry = shard.registry.borrow();
        lingering.retain(|(key, deadline)| {
            if registry.get(*key).is_none() {
                return false;
            }
            if *deadline <= now {
                expired.push(*key);
                return false;
            }
            true
        });
        lingering.iter().map(|(_, deadline)| *deadline).min()
    };
    for key in expired {
        remove_now(shard, key);
    }
    next
}

/// Closes the socket and removes the record.
pub fn remove_now(shard: &Shard, key: ConnKey) {
    let mut registry = shard.registry.borrow_mut();
    let Some(conn) = registry.get(key) else {
        return;
    };
    let fd = conn.fd;
    shard.reactor.remove(fd);
    super::tls_wire::detach(key, fd);
    if shard.handover.passed_early(key) {
        // A hot upgrade's new process holds a copy of the socket (passed
        // ahead of the freeze): without this the client would see its end
        // only once that copy is closed.
        // SAFETY: shutdown of a socket the record owns.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    }
    // SAFETY: the record owns its socket; it is removed right after.
    unsafe { libc::close(fd) };
    registry.remove(key);
}

/// Longest node id in a connection id (cluster mode; `config` takes
/// `--node-id`, at most 128 bytes, or makes it from at most 100 bytes of
/// the host name and the port).
const NODE_ID_BYTES_MAX: usize = 128;

/// Longest welcome frame: its fixed text, an org id, a node id and its
/// `_`, the connection id's three numbers, a seq and the heartbeat (a
/// 4-byte frame header: the payload is over 125 bytes only for long ids).
const WELCOME_FRAME_BYTES_MAX: usize = 4
    + r#"{"type":"welcome","org_id":"","connection_id":"c___","seq":,"heartbeat_ms":}"#.len()
    + crate::limits::ORG_ID_BYTES_MAX
    + NODE_ID_BYTES_MAX
    + 1
    + 5 * 20;

/// The 101 (with a permessage-deflate line) and the welcome.
const FIRST_ANSWER_BYTES_MAX: usize =
    crate::protocol::http::SWITCHING_PROTOCOLS_DEFLATE_LEN_MAX + WELCOME_FRAME_BYTES_MAX;

/// Writes the welcome text frame into `out`; returns its length.
fn write_welcome(
    out: &mut [u8],
    org_id: &str,
    node: &str,
    shard_id: usize,
    key: ConnKey,
    seq: u64,
    heartbeat_ms: u64,
) -> usize {
    use std::io::Write;
    // The payload first, after room for the longest header it can need.
    let mut payload = [0u8; WELCOME_FRAME_BYTES_MAX - 4];
    let mut cursor = std::io::Cursor::new(&mut payload[..]);
    write!(
        cursor,
        r#"{{"type":"welcome","org_id":"{}","connection_id":"c_{}{}{}_{}_{}","seq":{},"heartbeat_ms":{}}}"#,
        org_id,
        node,
        if node.is_empty() { "" } else { "_" },
        shard_id,
        key.index,
        key.generation,
        seq,
        heartbeat_ms
    )
    .expect("WELCOME_FRAME_BYTES_MAX holds every welcome");
    let payload_len = cursor.position() as usize;
    let mut header = [0u8; crate::limits::FRAME_HEADER_BYTES_MAX];
    let header_len = ws::encode_header(
        &mut header,
        true,
        ws::Opcode::Text,
        payload_len as u64,
        None,
    );
    out[..header_len].copy_from_slice(&header[..header_len]);
    out[header_len..header_len + payload_len].copy_from_slice(&payload[..payload_len]);
    header_len + payload_len
}

/// Registers an upgraded socket (owned `fd`) of `org_id`: queues `101` and
/// the welcome as its first bytes, watches it, and handles any bytes the
/// client sent right after its request head.
pub fn adopt(
    shard: &Shard,
    fd: RawFd,
    handoff: &super::Handoff,
    leftover: Vec<u8>,
    tls: Option<Box<super::tls_wire::Session>>,
) -> Result<(), RawFd> {
    let org_id = handoff.org_id.as_str();
    let key_id = handoff.key_id.as_str();
    let session = handoff.session.as_deref().copied();
    let added = shard.registry.borrow_mut().add(org_id, key_id, fd);
    let Ok((key, seq)) = added else {
        return Err(fd);
    };
    if let Some(session) = tls {
        super::tls_wire::attach(key, session);
    }
    if let Some(agreement) = handoff.deflate {
        shard
            .registry
            .borrow_mut()
            .set_deflate(key, agreement.server_window_bits());
    }
    if let Some((id, expires)) = session {
        shard.registry.borrow_mut().set_session(key, id, expires);
    }
    if shard.reactor.add(fd, key).is_err() {
        shard.registry.borrow_mut().remove(key);
        super::tls_wire::forget(key);
        return Err(fd);
    }
    let mut extension = [0u8; crate::protocol::deflate::RESPONSE_LINE_LEN_MAX];
    let extension_len = handoff
        .deflate
        .map_or(0, |agreement| agreement.write_response_line(&mut extension));
    let mut answer = [0u8; crate::protocol::http::SWITCHING_PROTOCOLS_DEFLATE_LEN_MAX];
    let answer_len = crate::protocol::http::write_switching_protocols_with(
        &mut answer,
        handoff.ws_key.as_bytes(),
        &extension[..extension_len],
    );
    // The 101 and the welcome leave in one write, built on the stack. In
    // cluster mode the node id keeps connection ids unique across nodes.
    let node = shard.cluster.as_ref().map_or("", |c| c.node_id.as_str());
    let mut first = [0u8; FIRST_ANSWER_BYTES_MAX];
    first[..answer_len].copy_from_slice(&answer[..answer_len]);
    let len = answer_len
        + write_welcome(
            &mut first[answer_len..],
            org_id,
            node,
            shard.id,
            key,
            seq,
            shard.config.heartbeat_ms,
        );
    {
        let mut registry = shard.registry.borrow_mut();
        match registry.write_first(key, &first[..len], &mut super::wire()) {
            Flush::Drained => {}
            Flush::Blocked => shard.reactor.want_write(fd, key, true),
            Flush::Failed => {
                drop(registry);
                remove_now(shard, key);
                return Ok(());
            }
        }
    }
    if !leftover.is_empty() {
        if let Some(conn) = shard.registry.borrow_mut().get_mut(key) {
            conn.partial = Some(Box::new(Partial {
                decoder: shard.decoder_for(conn),
                bytes: leftover,
            }));
        }
        read_ready(shard, key, false);
    }
    if let Some((id, expires)) = session {
        // Signed out between the check on the accepting shard and now: the
        // sign-out's sweep may have run before this record existed.
        if shard.access.revoked.is_revoked(id, key_id, expires) {
            let mut registry = shard.registry.borrow_mut();
            if registry.get(key).is_some() {
                registry.request_close(key, CloseCode::KEY_REVOKED);
            }
        }
    }
    Ok(())
}
