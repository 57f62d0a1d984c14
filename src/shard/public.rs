//! The public listener: read a request head (bounded in size and time),
//! authenticate, and hand the socket to the shard that owns its org, which
//! answers 101 and the welcome and keeps the connection for its life.

use std::cell::{Cell, RefCell};
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;

use super::{shard_for, Handoff, Shard, ShardMessage};
use crate::limits::{HEADERS_MAX, HEAD_BYTES_MAX, HEAD_TIMEOUT_MS, WRITE_TIMEOUT_MS};
use crate::metrics::HandshakeFailure;
use crate::protocol::http::{self, HttpError};

/// First read buffer of a handshake; grown up to `HEAD_BYTES_MAX`.
const HANDSHAKE_BUFFER_BYTES: usize = 1024;

/// Most connections taken per accept round before the task lets others
/// run (then it goes on without waiting: the listener is edge-triggered).
const ACCEPTS_PER_ROUND: usize = 64;

/// Accepts forever, several connections per wake-up: the listener is in
/// the shard's epoll set (see `Reactor::add_listener`) and the reactor
/// wakes this task; it accepts with `accept4` until the queue is empty.
/// On running out of file descriptors it waits and retries instead of
/// failing, so existing connections keep working. The listener is the
/// process's (handed to the next process in a hot upgrade): this task
/// never closes it. A frozen shard accepts nothing (what the kernel queues
/// stays queued for whoever accepts next, see `upgrade`); the task ends
/// when the shard retires or drains.
pub async fn accept_loop(shard: Rc<Shard>, listener: RawFd) {
    use super::upgrade::Phase;
    let fd = listener;
    // Without the epoll registration (it cannot fail short of memory), the
    // task waits on the listener itself.
    let registered = shard.reactor.add_listener(fd).is_ok();
    let _deregister = Deregister {
        shard: &shard,
        fd: registered.then_some(fd),
    };
    loop {
        match shard.handover.phase() {
            Phase::Retiring => return,
            Phase::Frozen | Phase::Handing => {
                shard.handover.wait_change().await;
                continue;
            }
            Phase::Serving => {}
        }
        let seen = shard.accept_wake.generation();
        let round = accept_round(&shard, fd);
        serve_parked(&shard);
        match round {
            // No timer here: arming and cancelling one per wake-up cost
            // more than the accept (io_uring timeout + cancel); the parked
            // connections' deadlines are watched by `expire_parked`.
            Round::Drained if registered => {
                futures_lite::future::or(shard.accept_wake.wait(seen), shard.handover.wait_change())
                    .await
            }
            Round::Drained => {
                futures_lite::future::or(
                    super::reactor::wait_readable(fd),
                    shard.handover.wait_change(),
                )
                .await
            }
            Round::More => glommio::yield_if_needed().await,
            Round::OutOfFiles => glommio::timer::sleep(Duration::from_millis(50)).await,
            Round::Failed => glommio::timer::sleep(Duration::from_millis(1)).await,
        }
    }
}

/// Wakes the accept task when the earliest parked connection's head
/// timeout passes (it closes the expired ones), looking at least once a
/// second: one timer a second at most, not one per accept wake-up.
pub async fn expire_parked(shard: Rc<Shard>) {
    loop {
        let wait = shard
            .parked
            .next_deadline()
            .map_or(Duration::from_secs(1), |deadline| {
                // At least 1 ms: an expired deadline waits for the accept
                // task to run, not in a loop here.
                deadline
                    .saturating_duration_since(Instant::now())
                    .clamp(Duration::from_millis(1), Duration::from_secs(1))
            });
        glommio::timer::sleep(wait).await;
        if shard
            .parked
            .next_deadline()
            .is_some_and(|deadline| deadline <= Instant::now())
        {
            shard.accept_wake.notify();
        }
    }
}

/// Takes the listener out of the epoll set when the accept task ends (the
/// socket stays open: the process owns it), and closes the parked
/// connections.
struct Deregister<'a> {
    shard: &'a Shard,
    fd: Option<RawFd>,
}

impl Drop for Deregister<'_> {
    fn drop(&mut self) {
        if let Some(fd) = self.fd {
            self.shard.reactor.remove(fd);
        }
        self.shard.parked.close_all(self.shard);
    }
}

/// How an accept round ended.
enum Round {
    /// The accept queue is empty.
    Drained,
    /// `ACCEPTS_PER_ROUND` taken; there may be more.
    More,
    /// EMFILE, ENFILE or out of memory.
    OutOfFiles,
    /// Another error.
    Failed,
}

fn accept_round(shard: &Rc<Shard>, listener: RawFd) -> Round {
    for _ in 0..ACCEPTS_PER_ROUND {
        // SAFETY: zeroed sockaddr_storage is a valid value to fill.
        let mut address: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut length = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // A blocking socket, as glommio's accept made them: every later
        // read and write on it says MSG_DONTWAIT or goes through glommio.
        // SAFETY: accept4 into our stack address; we own the new descriptor.
        let fd = unsafe {
            libc::accept4(
                listener,
                std::ptr::addr_of_mut!(address).cast(),
                &mut length,
                libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            let error = std::io::Error::last_os_error();
            match error.raw_os_error() {
                Some(libc::EAGAIN) => return Round::Drained,
                Some(libc::EINTR | libc::ECONNABORTED | libc::EPROTO) => continue,
                Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                    return Round::OutOfFiles
                }
                _ => return Round::Failed,
            }
        }
        take_connection(shard, fd, socket_address(&address));
    }
    Round::More
}

/// The peer address `accept4` wrote.
fn socket_address(address: &libc::sockaddr_storage) -> Option<std::net::SocketAddr> {
    match i32::from(address.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let v4 = unsafe { &*std::ptr::addr_of!(*address).cast::<libc::sockaddr_in>() };
            Some(std::net::SocketAddr::from((
                u32::from_be(v4.sin_addr.s_addr).to_be_bytes(),
                u16::from_be(v4.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let v6 = unsafe { &*std::ptr::addr_of!(*address).cast::<libc::sockaddr_in6>() };
            Some(std::net::SocketAddr::V6(std::net::SocketAddrV6::new(
                v6.sin6_addr.s6_addr.into(),
                u16::from_be(v6.sin6_port),
                v6.sin6_flowinfo,
                v6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// A new public connection (owned `fd`). The fast path, with no task, no
/// glommio stream and no allocation: when the client's whole upgrade
/// request has arrived (it sends it right after connecting), it is read
/// with one `recv`, authenticated and handed off here, or refused with one
/// `send`; when nothing has arrived yet, the socket is parked in the
/// shard's epoll set until it does (see [`Parked`]). A head that is only
/// partly there, plain HTTP, TLS, or a request the fast path does not
/// answer goes to the handshake task as before, with the bytes read so
/// far and what is left of the head timeout.
fn take_connection(shard: &Rc<Shard>, fd: RawFd, peer: Option<std::net::SocketAddr>) {
    if shard.shutdown.is_stopping() {
        // SAFETY: we own `fd`.
        unsafe { libc::close(fd) };
        return;
    }
    if let Some(tls) = &shard.tls {
        // Counted from here, before the handshake, as a plain connection
        // is before its head; past the address's share it is closed at
        // once, unread (no 429 can be sent before a handshake, and making
        // one would cost what the limit saves).
        let side = super::tls::Side::Public;
        let Some(place) = super::tls::Place::take(shard, side, peer.map(|p| p.ip())) else {
            shard
                .metrics
                .handshake_failed(HandshakeFailure::RateLimited);
            // SAFETY: we own `fd`.
            unsafe { libc::close(fd) };
            return;
        };
        let config = tls.server_config();
        // SAFETY: a fresh descriptor we own; the stream owns it from here.
        let stream = unsafe { TcpStream::from_raw_fd(fd) };
        glommio::spawn_local(super::tls::terminate(
            shard.clone(),
            stream,
            side,
            config,
            peer,
            place,
        ))
        .detach();
        return;
    }
    let deadline = Instant::now() + Duration::from_millis(HEAD_TIMEOUT_MS);
    // The address's share of connections in their handshake, checked
    // before reading as the task does (which refuses with 429).
    let Some(counted) = shard.access.http_connections.enter(peer.map(|p| p.ip())) else {
        to_task(shard, fd, peer, &[], deadline);
        return;
    };
    let Some(counted) = upgrade_if_read(shard, fd, peer, counted, deadline) else {
        return;
    };
    let key = counted.keep();
    if !shard.parked.park(shard, fd, peer, key, deadline) {
        shard.access.http_connections.release(key);
        to_task(shard, fd, peer, &[], deadline);
    }
}

/// Reads what the client sent and, for a complete upgrade request,
/// upgrades or refuses it; a head not there yet gives the count back
/// (`Some`, to park the socket). Everything else ends here too: handed to
/// the task, or closed at EOF.
fn upgrade_if_read<'a>(
    shard: &'a Rc<Shard>,
    fd: RawFd,
    peer: Option<std::net::SocketAddr>,
    counted: super::waits::Counted<'a>,
    deadline: Instant,
) -> Option<super::waits::Counted<'a>> {
    let mut buffer = shard.take_buffer();
    // SAFETY: recv into our own buffer, without blocking.
    let received = unsafe {
        libc::recv(
            fd,
            buffer.as_mut_ptr().cast(),
            buffer.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if received <= 0 {
        let error = std::io::Error::last_os_error();
        shard.return_buffer(buffer);
        if received < 0
            && matches!(
                error.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
            )
        {
            return Some(counted);
        }
        // EOF or a failed socket before a head: closed without an answer,
        // counted as the task counts it.
        shard.metrics.handshake_failed(HandshakeFailure::Timeout);
        // SAFETY: we own `fd`.
        unsafe { libc::close(fd) };
        return None;
    }
    let filled = received as usize;
    let decision = {
        let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
        match http::parse_head_with(
            &buffer[..filled],
            &mut headers,
            super::routes::PUBLIC_BODY_BYTES_MAX,
            super::routes::PUBLIC_HEAD_RULES,
        ) {
            Ok(Some(head)) if head.path == "/v1/ws" => Some(route(shard, &head, peer)),
            // Incomplete, plain HTTP, or an error answer (which may need
            // the lingering close of `routes`): the task.
            _ => None,
        }
    };
    drop(counted);
    match decision {
        None => to_task(shard, fd, peer, &buffer[..filled], deadline),
        Some(Ok(accepted)) => {
            let leftover = buffer[accepted.head_len..filled].to_vec();
            hand_off(shard, fd, accepted, leftover, None);
        }
        Some(Err((status, error))) => {
            shard
                .metrics
                .handshake_failed(HandshakeFailure::from_status(status));
            // Refusals are not the storm's path: a heap answer is fine.
            let mut out = Vec::with_capacity(256);
            match error {
                Some(error) => http::write_http_error(&mut out, error),
                None => http::write_error(&mut out, status, &[("Connection", "close")]),
            }
            // A fresh socket's buffer takes a small answer whole.
            send_and_close(fd, &out);
        }
    }
    shard.return_buffer(buffer);
    None
}

/// Hands connection `fd` to a handshake task with the `read` bytes of its
/// request and the head timeout's `deadline`.
fn to_task(
    shard: &Rc<Shard>,
    fd: RawFd,
    peer: Option<std::net::SocketAddr>,
    read: &[u8],
    deadline: Instant,
) {
    // The task's own small buffer (see `handshake`).
    let mut buffer = vec![0u8; read.len().max(HANDSHAKE_BUFFER_BYTES)];
    buffer[..read.len()].copy_from_slice(read);
    // SAFETY: a descriptor we own; the stream owns it from here.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    glommio::spawn_local(handshake_with(
        shard.clone(),
        stream,
        peer,
        buffer,
        read.len(),
        deadline,
        None,
    ))
    .detach();
}

/// Connections accepted before their request head arrived: each waits in
/// the shard's epoll set (edge-triggered, no task, no stream) until bytes
/// or a FIN arrive, or until the head timeout passes (then closed without
/// an answer, as the task closes a silent connection). The reactor queues
/// ready ones and wakes the accept task, which reads them.
#[derive(Debug, Default)]
pub struct Parked {
    slots: RefCell<slab::Slab<ParkedConn>>,
    /// (deadline, slot, serial), in parking order: the timeout is fixed,
    /// so deadlines only grow and expiry looks at the front only.
    deadlines: RefCell<std::collections::VecDeque<(Instant, usize, u64)>>,
    /// Slots the reactor found ready, for the accept task.
    ready: RefCell<Vec<usize>>,
    serial: Cell<u64>,
}

#[derive(Debug)]
struct ParkedConn {
    fd: RawFd,
    peer: Option<std::net::SocketAddr>,
    /// The address it is counted under (`Counted::keep`).
    counted: Option<std::net::IpAddr>,
    deadline: Instant,
    serial: u64,
}

impl Parked {
    /// Parks `fd`; false when it cannot be watched (the caller keeps it).
    fn park(
        &self,
        shard: &Shard,
        fd: RawFd,
        peer: Option<std::net::SocketAddr>,
        counted: Option<std::net::IpAddr>,
        deadline: Instant,
    ) -> bool {
        let serial = self.serial.get() + 1;
        self.serial.set(serial);
        let mut slots = self.slots.borrow_mut();
        let entry = slots.vacant_entry();
        let slot = entry.key();
        if shard.reactor.add_parked(fd, slot).is_err() {
            return false;
        }
        entry.insert(ParkedConn {
            fd,
            peer,
            counted,
            deadline,
            serial,
        });
        self.deadlines
            .borrow_mut()
            .push_back((deadline, slot, serial));
        true
    }

    /// From the reactor: slot `slot` is readable.
    pub fn ready(&self, slot: usize) {
        self.ready.borrow_mut().push(slot);
    }

    /// Takes slot `slot` out of the set and the epoll set.
    fn unpark(&self, shard: &Shard, slot: usize) -> Option<ParkedConn> {
        let conn = self.slots.borrow_mut().try_remove(slot)?;
        shard.reactor.remove(conn.fd);
        Some(conn)
    }

    /// Closes every parked connection (the shard drains).
    fn close_all(&self, shard: &Shard) {
        let slots = std::mem::take(&mut *self.slots.borrow_mut());
        for (_, conn) in slots {
            shard.reactor.remove(conn.fd);
            // SAFETY: the parked connection owns its socket.
            unsafe { libc::close(conn.fd) };
            shard.access.http_connections.release(conn.counted);
        }
        self.deadlines.borrow_mut().clear();
    }

    /// The next head timeout among the parked connections.
    fn next_deadline(&self) -> Option<Instant> {
        self.deadlines
            .borrow()
            .front()
            .map(|(deadline, _, _)| *deadline)
    }
}

/// Reads the parked connections the reactor found ready, and closes those
/// whose head timeout passed.
fn serve_parked(shard: &Rc<Shard>) {
    let ready = std::mem::take(&mut *shard.parked.ready.borrow_mut());
    for slot in ready {
        let Some(conn) = shard.parked.unpark(shard, slot) else {
            continue;
        };
        let counted = shard.access.http_connections.enter_kept(conn.counted);
        if let Some(counted) = upgrade_if_read(shard, conn.fd, conn.peer, counted, conn.deadline) {
            // Nothing to read after all (an event of the slot's previous
            // connection): back to waiting, under its own deadline. Its
            // queue entry now sits behind later deadlines, so it may be
            // closed late, by about one head timeout at most.
            let key = counted.keep();
            if !shard
                .parked
                .park(shard, conn.fd, conn.peer, key, conn.deadline)
            {
                shard.access.http_connections.release(key);
                to_task(shard, conn.fd, conn.peer, &[], conn.deadline);
            }
        }
    }
    // Expired ones are closed; entries of connections no longer parked
    // are dropped on the way, so the queue stays about as long as the set.
    let now = Instant::now();
    loop {
        let front = shard.parked.deadlines.borrow().front().copied();
        let Some((deadline, slot, serial)) = front else {
            break;
        };
        let current = shard
            .parked
            .slots
            .borrow()
            .get(slot)
            .is_some_and(|conn| conn.serial == serial);
        if current && deadline > now {
            break;
        }
        shard.parked.deadlines.borrow_mut().pop_front();
        if current {
            if let Some(conn) = shard.parked.unpark(shard, slot) {
                shard.metrics.handshake_failed(HandshakeFailure::Timeout);
                // SAFETY: the parked connection owns its socket.
                unsafe { libc::close(conn.fd) };
                shard.access.http_connections.release(conn.counted);
            }
        }
    }
}

/// Writes an error answer and counts the failure; the socket is dropped
/// by the caller.
async fn refuse(shard: &Shard, stream: &mut TcpStream, status: u16, error: Option<HttpError>) {
    shard
        .metrics
        .handshake_failed(HandshakeFailure::from_status(status));
    let mut out = Vec::with_capacity(256);
    match error {
        Some(error) => http::write_http_error(&mut out, error),
        None => http::write_error(&mut out, status, &[("Connection", "close")]),
    }
    let _ = stream.write_all(&out).await;
}

/// Reads one request head before `deadline`, after the `filled` bytes
/// already in `buffer`. `Ok(filled)` when complete.
async fn read_head(
    stream: &mut TcpStream,
    buffer: &mut Vec<u8>,
    mut filled: usize,
    deadline: Instant,
) -> Result<usize, Option<u16>> {
    loop {
        if filled > 0 {
            let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
            match http::parse_head_with(
                &buffer[..filled],
                &mut headers,
                super::routes::PUBLIC_BODY_BYTES_MAX,
                super::routes::PUBLIC_HEAD_RULES,
            ) {
                Ok(None) => {}
                Ok(Some(_)) | Err(_) => {
                    let _ = stream.set_read_timeout(None);
                    return Ok(filled);
                }
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(if filled > 0 { Some(408) } else { None });
        }
        if filled == buffer.len() {
            // Only a head still incomplete below the limit gets here
            // (parse_head refuses one that reached it).
            let grown = (buffer.len() * 2).clamp(HANDSHAKE_BUFFER_BYTES, HEAD_BYTES_MAX);
            buffer.resize(grown, 0);
        }
        let _ = stream.set_read_timeout(Some(left));
        let read = match stream.read(&mut buffer[filled..]).await {
            Ok(0) => return Err(None),
            Ok(read) => read,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                return Err(if filled > 0 { Some(408) } else { None })
            }
            Err(_) => return Err(None),
        };
        filled += read;
    }
}

/// Reads and answers the first request of a public connection behind TLS
/// (the stream is a socketpair end): `peer` is the client's address, and
/// `place` its count, taken at accept (ended here if the connection
/// becomes a WebSocket).
pub async fn handshake(
    shard: Rc<Shard>,
    stream: TcpStream,
    peer: Option<std::net::SocketAddr>,
    place: super::tls::Place,
) {
    // Most upgrade requests are a few hundred bytes: start small and grow
    // to the 8 KiB limit only for a long head, so a connect storm does not
    // park 8 KiB per handshake in flight.
    let deadline = Instant::now() + Duration::from_millis(HEAD_TIMEOUT_MS);
    handshake_with(
        shard,
        stream,
        peer,
        vec![0u8; HANDSHAKE_BUFFER_BYTES],
        0,
        deadline,
        Some(place),
    )
    .await;
}

/// [`handshake`] with the first `filled` bytes of the request already in
/// `buffer` (read by the accept's fast path) and the head timeout's
/// `deadline` (counted from the accept). `place` is the count of a
/// connection behind TLS (taken at accept); without one, the connection
/// is counted here.
async fn handshake_with(
    shard: Rc<Shard>,
    mut stream: TcpStream,
    peer: Option<std::net::SocketAddr>,
    mut buffer: Vec<u8>,
    filled: usize,
    deadline: Instant,
    place: Option<super::tls::Place>,
) {
    if shard.shutdown.is_stopping() {
        return;
    }
    // Counted until the connection is a WebSocket (handed to the reactor)
    // or closed; past the address's share, refused without reading.
    let counting = shard.clone();
    let peer_ip = peer.map(|peer| peer.ip());
    let _counted = match place {
        Some(_) => None,
        None => match counting.access.http_connections.enter(peer_ip) {
            Some(counted) => Some(counted),
            None => {
                let _ = stream.set_write_timeout(Some(Duration::from_millis(WRITE_TIMEOUT_MS)));
                refuse(&shard, &mut stream, 429, None).await;
                return;
            }
        },
    };
    let _ = stream.set_nodelay(true);
    // Every answer written on this stream (refusals, plain-HTTP routes,
    // SSE) fails after this long without progress, and the connection is
    // closed: a client that never reads is not held forever.
    let _ = stream.set_write_timeout(Some(Duration::from_millis(WRITE_TIMEOUT_MS)));
    let mut filled = match read_head(&mut stream, &mut buffer, filled, deadline).await {
        Ok(filled) => filled,
        Err(status) => {
            if let Some(status) = status {
                refuse(&shard, &mut stream, status, None).await;
                // The client may still be sending (a head past 8 KiB):
                // closing with unread input would be a reset.
                super::stall::linger_close(&mut stream).await;
            } else {
                shard.metrics.handshake_failed(HandshakeFailure::Timeout);
            }
            shard.return_buffer(buffer);
            return;
        }
    };
    let decision = loop {
        let decision = {
            let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
            match http::parse_head_with(
                &buffer[..filled],
                &mut headers,
                super::routes::PUBLIC_BODY_BYTES_MAX,
                super::routes::PUBLIC_HEAD_RULES,
            ) {
                Err(error) => Err((error.status(), Some(error))),
                Ok(None) => Err((400, None)),
                Ok(Some(head)) if head.path != "/v1/ws" => {
                    super::fault::panic_if_asked(head.path);
                    Ok(None)
                }
                Ok(Some(head)) => route(&shard, &head, peer).map(Some),
            }
        };
        if decision != Ok(None) {
            break decision;
        }
        // Plain HTTP (sessions, polling, SSE, pages): served here, on the
        // accepting shard; history reads cross to the owner shard. It ends
        // with the connection, or with an upgrade sent as a later request
        // (whose head is then at the start of the buffer), taken here.
        if buffer.len() < super::READ_BUFFER_BYTES {
            buffer.resize(super::READ_BUFFER_BYTES, 0);
        }
        super::stall::bound_http_answers(&stream);
        // Boxed: the plain-HTTP routes' state (SSE, polls, history pages)
        // is about 17 KiB, and inline it made every accepted connection's
        // task that large — a WebSocket upgrade too, with the allocator
        // keeping the peak of a connect burst's tasks resident afterwards.
        let served = Box::pin(super::routes::serve(
            shard.clone(),
            stream,
            peer,
            buffer,
            filled,
        ));
        match served.await {
            None => return,
            Some(later) => {
                // A WebSocket's slow consumers are the send queue's
                // business (1013), not the HTTP write timeout's.
                super::stall::unbound_for_websocket(&later.stream);
                stream = later.stream;
                buffer = later.buffer;
                filled = later.filled;
            }
        }
    };
    match decision {
        Err((status, error)) => {
            refuse(&shard, &mut stream, status, error).await;
            // Its body (a 413's, or an upgrade's) may still be coming: read
            // and dropped, so the close is no reset that fails the client's
            // writes or loses the answer (as `routes` does for later
            // requests).
            super::stall::linger_close(&mut stream).await;
        }
        Ok(None) => unreachable!("plain HTTP is served above"),
        Ok(Some(accepted)) => {
            // The connection's life is spent in the owner's reactor on a raw
            // descriptor: take a duplicate and let glommio's stream go.
            // SAFETY: dup of a socket we own; the handoff owns the copy.
            let fd = unsafe { libc::dup(stream.as_raw_fd()) };
            if fd < 0 {
                refuse(&shard, &mut stream, 503, None).await;
            } else {
                drop(stream);
                let leftover = buffer[accepted.head_len..filled].to_vec();
                hand_off(&shard, fd, accepted, leftover, None);
                if let Some(place) = &place {
                    // A WebSocket behind TLS (pumped by the terminator)
                    // no longer counts either.
                    place.end();
                }
            }
        }
    }
    shard.return_buffer(buffer);
}

/// Sends an accepted upgrade's socket (owned `fd`) to the org's owner
/// shard, or adopts it here; `tls` is the TLS session of a wss connection
/// that hibernates (see `tls_wire`).
pub(super) fn hand_off(
    shard: &Shard,
    fd: i32,
    accepted: Accepted,
    leftover: Vec<u8>,
    tls: Option<Box<super::tls_wire::Session>>,
) {
    let handoff = Handoff {
        fd,
        leftover,
        org_id: accepted.org_id,
        key_id: accepted.key_id,
        session: accepted.session.map(Box::new),
        ws_key: accepted.ws_key,
        deflate: accepted.deflate,
        tls,
    };
    let owner = shard_for(&handoff.org_id, shard.count);
    if owner == shard.id {
        adopt(shard, handoff);
    } else {
        let mesh = shard.mesh.as_ref().expect("several shards have a mesh");
        // A stopped owner drops the handoff, closing the socket.
        let _ = mesh.send_to(owner, ShardMessage::Adopt(handoff));
    }
}

/// An authenticated upgrade, owned data only.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Accepted {
    pub(super) head_len: usize,
    org_id: String,
    key_id: String,
    session: Option<(u128, u64)>,
    ws_key: String,
    deflate: Option<crate::protocol::deflate::Agreement>,
}

pub(super) fn route(
    shard: &Shard,
    head: &http::Head<'_, '_>,
    peer: Option<std::net::SocketAddr>,
) -> Result<Accepted, (u16, Option<HttpError>)> {
    let upgrade = http::validate_upgrade(head).map_err(|e| (e.status(), Some(e)))?;
    let principal = super::access::authenticate_upgrade(shard, &upgrade, peer.map(|p| p.ip()))
        .map_err(|status| (status, None))?;
    Ok(Accepted {
        head_len: head.head_len,
        org_id: principal.org_id,
        key_id: principal.key_id,
        session: principal.session,
        ws_key: String::from_utf8_lossy(upgrade.key).into_owned(),
        // The first acceptable permessage-deflate offer; an offer that
        // cannot be accepted leaves the connection plain, never fails it.
        deflate: if shard.config.compression {
            crate::protocol::deflate::negotiate(head.headers_named("sec-websocket-extensions"))
        } else {
            None
        },
    })
}

/// On the owner shard: register the connection with the reactor, which
/// answers 101 and the welcome in one write; 503 when a connection cap is
/// reached.
pub fn adopt(shard: &Shard, handoff: Handoff) {
    // Frozen by a hot upgrade: kept for the thaw (or refused with 503 if
    // the new process takes over).
    let Err(handoff) = shard.handover.defer(handoff) else {
        return;
    };
    // Cluster mode: the welcome's seq is the org's seq on this node, known
    // once the org is followed; the upgrade waits for that.
    let mut handoff = if shard.cluster.is_some() && !shard.shutdown.is_stopping() {
        match super::cluster::adopt_or_wait(shard, handoff) {
            Some(handoff) => handoff,
            None => return,
        }
    } else {
        handoff
    };
    let fd = std::mem::replace(&mut handoff.fd, -1);
    if shard.handover.phase() == super::upgrade::Phase::Retiring {
        let mut out = Vec::with_capacity(160);
        http::write_error(&mut out, 503, &[("Connection", "close")]);
        send_and_close(fd, &out);
        return;
    }
    if shard.shutdown.is_stopping() {
        // SAFETY: we own `fd` (moved out of the handoff).
        unsafe { libc::close(fd) };
        return;
    }
    // Authenticated on another shard a moment ago: if the key was revoked
    // (or the session signed out) since, this shard may already have
    // closed that credential's connections and would never close this
    // one. Checked in the same synchronous step as the registration, so
    // a revocation after it is acted on by the next key-reload turn.
    let session = handoff.session.as_deref().copied();
    if !super::access::credential_still_valid(shard, &handoff.key_id, session) {
        if handoff.tls.is_some() {
            // A TLS client gets no plaintext answer.
            // SAFETY: we own `fd` (moved out of the handoff).
            unsafe { libc::close(fd) };
            return;
        }
        let mut out = Vec::with_capacity(160);
        http::write_error(&mut out, 401, &[("Connection", "close")]);
        send_and_close(fd, &out);
        return;
    }
    let leftover = std::mem::take(&mut handoff.leftover);
    let tls = handoff.tls.take();
    let was_tls = tls.is_some();
    match super::reactor::adopt(shard, fd, &handoff, leftover, tls) {
        Ok(()) => {
            shard
                .metrics
                .upgrades
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Err(fd) if was_tls => {
            shard.metrics.handshake_failed(HandshakeFailure::Capacity);
            // SAFETY: we own `fd`; a TLS client gets no plaintext answer.
            unsafe { libc::close(fd) };
        }
        Err(fd) => {
            shard.metrics.handshake_failed(HandshakeFailure::Capacity);
            let mut out = Vec::with_capacity(160);
            http::write_error(&mut out, 503, &[("Connection", "close")]);
            send_and_close(fd, &out);
        }
    }
}

/// Sends a small answer on a socket we own and closes it. Best effort: a
/// fresh socket's buffer takes a small answer.
pub(super) fn send_and_close(fd: RawFd, out: &[u8]) {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future an async fn returns, without calling it.
    fn future_bytes<Fut>(
        _: impl FnOnce(
            Rc<Shard>,
            TcpStream,
            Option<std::net::SocketAddr>,
            super::super::tls::Place,
        ) -> Fut,
    ) -> usize {
        std::mem::size_of::<Fut>()
    }

    /// Every accepted connection is one task of this size until it is a
    /// WebSocket (then a 64-byte record) or closed. The plain-HTTP routes
    /// stay boxed out of it: inline they made it 17,856 bytes, and a connect
    /// burst's peak of such tasks stayed resident (the idle figure of
    /// docs/benchmarks.md went from about 65 to 150-300 bytes a connection).
    #[test]
    fn an_accepted_connections_task_stays_small() {
        let bytes = future_bytes(handshake);
        assert!(bytes <= 1024, "the handshake task is {bytes} bytes");
    }
}
