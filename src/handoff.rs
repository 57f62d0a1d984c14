//! The hot upgrade's wire: what a live connection is, written out for a
//! new process to adopt (its socket travels beside it with `SCM_RIGHTS`),
//! and the control channel between the old and the new process — a
//! `SOCK_SEQPACKET` socketpair whose one end the new process inherits.
//! Pure format and plain syscalls: the process choreography is
//! `shard::upgrade` (docs/ARCHITECTURE.md, "Hot upgrade").
//!
//! The state format is versioned: the old process writes its own
//! [`VERSION`]; the new one says which versions it reads ([`READS`]: its
//! own and the previous one) before anything is frozen, so a binary that
//! cannot read the state is refused without any client noticing.

use std::os::unix::io::RawFd;
use std::time::{Duration, Instant};

/// The version of the state this binary writes. Version 2 passes the
/// sockets (and what a connection is that does not change) ahead of the
/// freeze, each connection named by its id, and at the freeze only the
/// records, with the sockets of the connections accepted since; version 1
/// passed every socket and record at the freeze. An old process writes the
/// newest version the new binary reads ([`choose`]).
pub const VERSION: u16 = 2;
/// The versions this binary reads: its own and the previous one.
pub const READS: &[u16] = &[2, 1];

/// The version an old process writes for a new binary that reads `reads`:
/// the newest this binary writes too, if any.
pub fn choose(reads: &[u16]) -> Option<u16> {
    READS.iter().copied().find(|v| reads.contains(v))
}

/// The environment variable naming the inherited control socket.
pub const FD_ENV: &str = "HOOKSTREAM_HANDOFF_FD";

/// Most descriptors per `SCM_RIGHTS` message (the kernel's `SCM_MAX_FD` is
/// 253).
pub const FDS_PER_MESSAGE: usize = 250;
/// Most record bytes per data message (a seqpacket message must fit the
/// socket's send buffer).
pub const DATA_PER_MESSAGE: usize = 32 * 1024;

/// A fragmented client message open when the connection was written out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenMessage {
    /// 1 text, 2 binary, 3 compressed text, 4 compressed binary.
    pub kind: u8,
    /// Text only: bytes of `bytes` known to be valid UTF-8.
    pub utf8_valid_bytes: u32,
    /// The unmasked payload assembled so far.
    pub bytes: Vec<u8>,
}

/// Everything a live WebSocket connection is, apart from its socket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnRecord {
    /// The org.
    pub org_id: String,
    /// The API key id it was accepted with.
    pub key_id: String,
    /// The session id and expiry (Unix seconds) when a cookie signed it in.
    pub session: Option<(u128, u64)>,
    /// Subscriptions by channel name, each with the seq of the last
    /// message of the org delivered (sent or queued) to it: the new
    /// process delivers what the log holds above it.
    pub channels: Vec<(String, u64)>,
    /// Bytes of a client frame not yet complete (still masked).
    pub partial: Vec<u8>,
    /// A fragmented client message in assembly.
    pub open_message: Option<OpenMessage>,
    /// Bytes queued for the client and not yet written, from the first
    /// unwritten byte (possibly inside a frame).
    pub queued: Vec<u8>,
    /// Heartbeat: pings sent without any frame received since.
    pub missed_pongs: u8,
    /// Bad client messages in a row.
    pub bad_messages_in_row: u8,
    /// permessage-deflate window bits (0: not negotiated).
    pub deflate_window_bits: u8,
    /// Version 2 on: the connection's id in the old process (the same
    /// connection has the same id in the early pass and at the freeze; no
    /// other connection of that process ever has it).
    pub id: u64,
    /// Version 2 on, at the freeze: the socket was passed ahead of the
    /// freeze (named by `id`) rather than with this record.
    pub early: bool,
    /// Version 2 on, at the freeze: passed early, and nothing of it but
    /// its position and counters changed since (same channels, nothing
    /// queued, no partial input). The record is then short — id,
    /// `position`, `missed_pongs`, `bad_messages_in_row` — and the rest is
    /// the early pass's record (`org_id`, `key_id`, `channels`… are empty
    /// here).
    pub same_as_early: bool,
    /// With `same_as_early`: the seq of the last message of the org
    /// delivered (sent or queued) to it, on every channel.
    pub position: u64,
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Reads a record's fields from the front of a byte slice.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.bytes.len() < n {
            return Err("connection record cut short".to_string());
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn u128(&mut self) -> Result<u128, String> {
        Ok(u128::from_le_bytes(
            self.take(16)?.try_into().expect("16 bytes"),
        ))
    }
    fn bytes(&mut self) -> Result<Vec<u8>, String> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    fn string(&mut self) -> Result<String, String> {
        String::from_utf8(self.bytes()?).map_err(|_| "connection record: bad text".to_string())
    }
}

impl ConnRecord {
    /// Appends the record (length-prefixed) in format [`VERSION`].
    pub fn encode(&self, out: &mut Vec<u8>) {
        self.encode_version(VERSION, out);
    }

    /// Appends the record (length-prefixed) in format `version` (one of
    /// [`READS`]).
    pub fn encode_version(&self, version: u16, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        if version >= 2 {
            // The form: 1 short (the early record's rest), 0 whole.
            if self.same_as_early {
                out.push(1);
                out.extend_from_slice(&self.id.to_le_bytes());
                out.extend_from_slice(&self.position.to_le_bytes());
                out.extend_from_slice(&[self.missed_pongs, self.bad_messages_in_row]);
                let len = (out.len() - start - 4) as u32;
                out[start..start + 4].copy_from_slice(&len.to_le_bytes());
                return;
            }
            out.push(0);
        }
        put_bytes(out, self.org_id.as_bytes());
        put_bytes(out, self.key_id.as_bytes());
        match self.session {
            None => out.push(0),
            Some((id, expires)) => {
                out.push(1);
                out.extend_from_slice(&id.to_le_bytes());
                out.extend_from_slice(&expires.to_le_bytes());
            }
        }
        out.extend_from_slice(&(self.channels.len() as u32).to_le_bytes());
        for (name, seq) in &self.channels {
            put_bytes(out, name.as_bytes());
            out.extend_from_slice(&seq.to_le_bytes());
        }
        put_bytes(out, &self.partial);
        match &self.open_message {
            None => out.push(0),
            Some(open) => {
                out.push(open.kind);
                out.extend_from_slice(&open.utf8_valid_bytes.to_le_bytes());
                put_bytes(out, &open.bytes);
            }
        }
        put_bytes(out, &self.queued);
        out.extend_from_slice(&[
            self.missed_pongs,
            self.bad_messages_in_row,
            self.deflate_window_bits,
        ]);
        if version >= 2 {
            out.extend_from_slice(&self.id.to_le_bytes());
            out.push(u8::from(self.early));
        }
        let len = (out.len() - start - 4) as u32;
        out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    }

    /// Reads one record of format `version` from the front of `bytes`;
    /// returns it and the bytes it took.
    pub fn decode(version: u16, bytes: &[u8]) -> Result<(ConnRecord, usize), String> {
        if !READS.contains(&version) {
            return Err(format!(
                "state format version {version} is not one this binary reads"
            ));
        }
        let mut outer = Reader { bytes };
        let len = outer.u32()? as usize;
        let body = outer.take(len)?;
        let mut r = Reader { bytes: body };
        if version >= 2 {
            match r.u8()? {
                0 => {}
                1 => {
                    let record = ConnRecord {
                        id: r.u64()?,
                        position: r.u64()?,
                        missed_pongs: r.u8()?,
                        bad_messages_in_row: r.u8()?,
                        early: true,
                        same_as_early: true,
                        ..ConnRecord::default()
                    };
                    if !r.bytes.is_empty() {
                        return Err("connection record: trailing bytes".to_string());
                    }
                    return Ok((record, 4 + len));
                }
                other => return Err(format!("connection record: unknown form {other}")),
            }
        }
        let org_id = r.string()?;
        let key_id = r.string()?;
        let session = match r.u8()? {
            0 => None,
            _ => Some((r.u128()?, r.u64()?)),
        };
        let count = r.u32()? as usize;
        let mut channels = Vec::with_capacity(count.min(1024));
        for _ in 0..count {
            let name = r.string()?;
            channels.push((name, r.u64()?));
        }
        let partial = r.bytes()?;
        let open_message = match r.u8()? {
            0 => None,
            kind @ 1..=4 => Some(OpenMessage {
                kind,
                utf8_valid_bytes: r.u32()?,
                bytes: r.bytes()?,
            }),
            other => return Err(format!("connection record: unknown message kind {other}")),
        };
        let queued = r.bytes()?;
        let missed_pongs = r.u8()?;
        let bad_messages_in_row = r.u8()?;
        let deflate_window_bits = r.u8()?;
        let (id, early) = if version >= 2 {
            (r.u64()?, r.u8()? != 0)
        } else {
            (0, false)
        };
        if !r.bytes.is_empty() {
            return Err("connection record: trailing bytes".to_string());
        }
        Ok((
            ConnRecord {
                org_id,
                key_id,
                session,
                channels,
                partial,
                open_message,
                queued,
                missed_pongs,
                bad_messages_in_row,
                deflate_window_bits,
                id,
                early,
                same_as_early: false,
                position: 0,
            },
            4 + len,
        ))
    }
}

/// Kinds of control messages (the first byte of each seqpacket).
pub mod kind {
    /// New → old: the versions it reads (u16 each).
    pub const HELLO: u8 = b'H';
    /// Old → new (version 2 on), right after HELLO, before anything is
    /// frozen: the listeners (u32 count; the descriptors, public and admin
    /// of each shard).
    pub const LISTENERS: u8 = b'L';
    /// Old → new (version 2 on), before the freeze, from each shard in one
    /// synchronous step (so no descriptor number is reused under it): up to
    /// [`FDS_PER_MESSAGE`] live connections, their sockets and, in the same
    /// order, their records as they are now (`id` set; nothing queued or
    /// partial: only what does not change is used).
    pub const EARLY: u8 = b'A';
    /// Old → new (version 2 on): every shard passed its sockets (u32
    /// count).
    pub const EARLY_END: u8 = b'B';
    /// New → old (version 2 on): the early connections are registered in
    /// the new process's shards (nothing read, written or dispatched); the
    /// old process freezes.
    pub const EARLY_READY: u8 = b'Q';
    /// Old → new: version u16, listener count u32, descriptor count u32;
    /// version 2 on, record count u32 (a record whose socket was passed
    /// early has no descriptor here).
    pub const START: u8 = b'S';
    /// Old → new: descriptors (listeners first, then connections in order).
    pub const FDS: u8 = b'F';
    /// Old → new: a piece of the records' byte stream.
    pub const DATA: u8 = b'D';
    /// Old → new: everything was sent.
    pub const END: u8 = b'E';
    /// New → old: the state was read; nothing is served yet.
    pub const READY: u8 = b'R';
    /// Old → new: the old process stopped appending to the log (it still
    /// holds it, and every connection, until [`COMMIT`]). Carries the
    /// descriptor of the data directory's lock file, whose `flock` the
    /// two processes then share; a process from before the commit
    /// handshake sent none and had let go of the lock and the
    /// connections already (the new process then serves at once).
    pub const RELEASED: u8 = b'G';
    /// New → old: the log is open, the executors run, the connections
    /// are registered — and not a byte was read from or written to any of
    /// them. Only [`COMMIT`] lets it serve.
    pub const PREPARED: u8 = b'P';
    /// Old → new: the commit point. The old process lets go of every
    /// connection; serve. Until it is sent, the old process can take
    /// everything back (it kills the new process first).
    pub const COMMIT: u8 = b'C';
    /// New → old: serving (pid u32, then when it started serving,
    /// [`monotonic_ns`] u64).
    pub const SERVING: u8 = b'K';
    /// Either way: giving up, with the reason as text.
    pub const FAILED: u8 = b'X';
}

/// A received control message: its kind, body and descriptors.
pub type Message = (u8, Vec<u8>, Vec<RawFd>);

/// One end of the control channel.
#[derive(Debug)]
pub struct Channel {
    fd: RawFd,
}

impl Drop for Channel {
    fn drop(&mut self) {
        // SAFETY: the channel owns its descriptor.
        unsafe { libc::close(self.fd) };
    }
}

impl Channel {
    /// A connected pair: (old process's end, new process's end). Both are
    /// close-on-exec; the spawner clears the flag on the one it passes.
    pub fn pair() -> std::io::Result<(Channel, Channel)> {
        let mut fds = [0; 2];
        // SAFETY: socketpair into a stack array.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok((Channel { fd: fds[0] }, Channel { fd: fds[1] }))
    }

    /// Takes the descriptor named by [`FD_ENV`] (the new process's end).
    pub fn from_env() -> Option<Result<Channel, String>> {
        let value = std::env::var(FD_ENV).ok()?;
        std::env::remove_var(FD_ENV);
        Some(match value.parse::<RawFd>() {
            Ok(fd) if fd > 2 => {
                // SAFETY: F_SETFD on the inherited descriptor.
                unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
                Ok(Channel { fd })
            }
            _ => Err(format!("{FD_ENV}={value} is not a descriptor")),
        })
    }

    /// The descriptor.
    pub fn raw(&self) -> RawFd {
        self.fd
    }

    /// Sends one message: `kind`, `body`, and descriptors (`SCM_RIGHTS`;
    /// the caller keeps its own).
    pub fn send(&self, kind: u8, body: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
        send_on(self.fd, kind, body, fds, 0)
    }

    /// Waits up to `timeout` for the next message; `Ok(None)` on timeout,
    /// an `UnexpectedEof` error when the other end is gone. Received
    /// descriptors are close-on-exec and owned by the caller.
    pub fn receive(&self, timeout: Duration) -> std::io::Result<Option<Message>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut poll = libc::pollfd {
                fd: self.fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll on one stack pollfd.
            let ready =
                unsafe { libc::poll(&mut poll, 1, left.as_millis().min(i32::MAX as u128) as i32) };
            if ready < 0 {
                let error = std::io::Error::last_os_error();
                if error.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(error);
            }
            if ready == 0 {
                return Ok(None);
            }
            return self.receive_now().map(Some);
        }
    }

    fn receive_now(&self) -> std::io::Result<Message> {
        let mut buffer = vec![0u8; DATA_PER_MESSAGE + 64];
        let mut iov = libc::iovec {
            iov_base: buffer.as_mut_ptr().cast(),
            iov_len: buffer.len(),
        };
        // SAFETY: CMSG_SPACE is a pure computation.
        let space =
            unsafe { libc::CMSG_SPACE((FDS_PER_MESSAGE * std::mem::size_of::<RawFd>()) as u32) }
                as usize;
        let mut control = vec![0u8; space];
        // SAFETY: recvmsg into buffers that outlive the call; the control
        // messages are walked with the CMSG macros within msg_controllen.
        unsafe {
            let mut header: libc::msghdr = std::mem::zeroed();
            header.msg_iov = &mut iov;
            header.msg_iovlen = 1;
            header.msg_control = control.as_mut_ptr().cast();
            header.msg_controllen = space as _;
            let received = libc::recvmsg(self.fd, &mut header, libc::MSG_CMSG_CLOEXEC);
            if received < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mut fds = Vec::new();
            let mut cmsg = libc::CMSG_FIRSTHDR(&header);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                    let bytes = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    for i in 0..bytes / std::mem::size_of::<RawFd>() {
                        fds.push(std::ptr::read_unaligned(data.add(i)));
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&header, cmsg);
            }
            if header.msg_flags & libc::MSG_CTRUNC != 0 {
                for fd in fds {
                    libc::close(fd);
                }
                return Err(std::io::Error::other("descriptors cut short"));
            }
            if received == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            buffer.truncate(received as usize);
            let kind = buffer.remove(0);
            Ok((kind, buffer, fds))
        }
    }
}

/// Sends one message on the channel descriptor `fd`: `kind`, `body`, and
/// descriptors (`SCM_RIGHTS`; the caller keeps its own). `flags` adds to
/// `MSG_NOSIGNAL` (`MSG_DONTWAIT` for a shard, which must not block: it
/// gets `WouldBlock` and tries again later).
pub fn send_on(fd: RawFd, kind: u8, body: &[u8], fds: &[RawFd], flags: i32) -> std::io::Result<()> {
    assert!(fds.len() <= FDS_PER_MESSAGE);
    let mut message = Vec::with_capacity(1 + body.len());
    message.push(kind);
    message.extend_from_slice(body);
    let mut iov = libc::iovec {
        iov_base: message.as_mut_ptr().cast(),
        iov_len: message.len(),
    };
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of_val(fds) as u32) } as usize;
    let mut control = vec![0u8; space.max(1)];
    // SAFETY: msghdr over stack and heap buffers that outlive the call;
    // the control buffer is CMSG_SPACE bytes for `fds`.
    unsafe {
        let mut header: libc::msghdr = std::mem::zeroed();
        header.msg_iov = &mut iov;
        header.msg_iovlen = 1;
        if !fds.is_empty() {
            header.msg_control = control.as_mut_ptr().cast();
            header.msg_controllen = space as _;
            let cmsg = libc::CMSG_FIRSTHDR(&header);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(fds) as u32) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr(),
                libc::CMSG_DATA(cmsg).cast::<RawFd>(),
                fds.len(),
            );
        }
        loop {
            let sent = libc::sendmsg(fd, &header, libc::MSG_NOSIGNAL | flags);
            if sent >= 0 {
                return Ok(());
            }
            let error = std::io::Error::last_os_error();
            if error.kind() != std::io::ErrorKind::Interrupted {
                return Err(error);
            }
        }
    }
}

/// The system's monotonic clock in nanoseconds: the same clock in every
/// process, so the old process can tell how long after its freeze the new
/// one served (SERVING carries it).
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime into a stack value.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// With `HOOKSTREAM_UPGRADE_TRACE=1` in the environment (inherited by the
/// new process), logs `step` with the system's monotonic clock in
/// milliseconds, which both processes share: where a hot upgrade's pause
/// goes (docs/benchmarks.md, "Hot upgrade"). Otherwise nothing.
pub fn trace(step: &str) {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if !*ON.get_or_init(|| std::env::var_os("HOOKSTREAM_UPGRADE_TRACE").is_some_and(|v| v == "1")) {
        return;
    }
    let ms = monotonic_ns() as f64 / 1e6;
    let mut usage = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime into a stack value.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut usage) };
    let cpu = usage.tv_sec as f64 * 1e3 + usage.tv_nsec as f64 / 1e6;
    // SAFETY: getrusage into a zeroed stack value.
    let mut rusage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut rusage) };
    crate::log::info(format_args!(
        "hookstream: upgrade trace: {ms:.3} ms, process {}: {step} (thread CPU {cpu:.3} ms, {} minor faults, sys {:.3} ms)",
        std::process::id(), rusage.ru_minflt, rusage.ru_stime.tv_sec as f64 * 1e3 + rusage.ru_stime.tv_usec as f64 / 1e3
    ));
}

/// The versions a HELLO body names.
pub fn versions_of(body: &[u8]) -> Vec<u16> {
    body.chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect()
}

/// The body of this binary's HELLO.
pub fn hello_body() -> Vec<u8> {
    READS.iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ConnRecord {
        ConnRecord {
            org_id: "org_a".into(),
            key_id: "key_1".into(),
            session: Some((0xdead_beef_u128 << 64 | 7, 1_900_000_000)),
            channels: vec![("events".into(), 41), ("deliveries:r_1".into(), 41)],
            partial: vec![0x81, 0x85, 1, 2],
            open_message: Some(OpenMessage {
                kind: 1,
                utf8_valid_bytes: 3,
                bytes: b"abc\xe2".to_vec(),
            }),
            queued: vec![9; 300],
            missed_pongs: 1,
            bad_messages_in_row: 2,
            deflate_window_bits: 15,
            id: 7 << 32 | 41,
            early: true,
            same_as_early: false,
            position: 0,
        }
    }

    #[test]
    fn the_previous_version_is_read_and_written_without_the_id() {
        let mut out = Vec::new();
        sample().encode_version(1, &mut out);
        let (read, used) = ConnRecord::decode(1, &out).unwrap();
        assert_eq!(used, out.len());
        assert_eq!(
            read,
            ConnRecord {
                id: 0,
                early: false,
                ..sample()
            }
        );
        // A version-1 record is not a version-2 one, nor the other way.
        assert!(ConnRecord::decode(2, &out).is_err());
        let mut newer = Vec::new();
        sample().encode_version(2, &mut newer);
        assert!(ConnRecord::decode(1, &newer).is_err());
        // The newest version both sides know is written.
        assert_eq!(choose(&[1, 2]), Some(2));
        assert_eq!(choose(&[1]), Some(1));
        assert_eq!(choose(&[3, 2]), Some(2));
        assert_eq!(choose(&[9]), None);
    }

    #[test]
    fn a_connection_unchanged_since_the_early_pass_travels_short() {
        let short = ConnRecord {
            id: 3 << 32 | 9,
            early: true,
            same_as_early: true,
            position: 77,
            missed_pongs: 1,
            bad_messages_in_row: 2,
            ..ConnRecord::default()
        };
        let mut out = Vec::new();
        short.encode_version(2, &mut out);
        assert_eq!(out.len(), 4 + 1 + 8 + 8 + 2);
        sample().encode_version(2, &mut out);
        let (first, used) = ConnRecord::decode(2, &out).unwrap();
        assert_eq!(first, short);
        let (second, _) = ConnRecord::decode(2, &out[used..]).unwrap();
        assert_eq!(second, sample());
        for cut in 0..used {
            assert!(ConnRecord::decode(2, &out[..cut]).is_err(), "cut {cut}");
        }
    }

    #[test]
    fn a_record_round_trips_and_reports_its_length() {
        let mut out = Vec::new();
        sample().encode(&mut out);
        ConnRecord::default().encode(&mut out);
        let (first, used) = ConnRecord::decode(VERSION, &out).unwrap();
        assert_eq!(first, sample());
        let (second, used2) = ConnRecord::decode(VERSION, &out[used..]).unwrap();
        assert_eq!(second, ConnRecord::default());
        assert_eq!(used + used2, out.len());
    }

    #[test]
    fn an_unknown_version_or_a_cut_record_is_refused() {
        let mut out = Vec::new();
        sample().encode(&mut out);
        assert!(ConnRecord::decode(VERSION + 1, &out)
            .unwrap_err()
            .contains("version"));
        for cut in 0..out.len() {
            assert!(
                ConnRecord::decode(VERSION, &out[..cut]).is_err(),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn descriptors_and_bytes_cross_the_channel() {
        let (old, new) = Channel::pair().unwrap();
        let (a, b) = Channel::pair().unwrap();
        old.send(kind::FDS, b"xy", &[a.raw(), b.raw()]).unwrap();
        let (k, body, fds) = new.receive(Duration::from_secs(5)).unwrap().unwrap();
        assert_eq!((k, body.as_slice(), fds.len()), (kind::FDS, &b"xy"[..], 2));
        // The received descriptors are the same sockets: a message sent on
        // the first arrives at `b`.
        let copy = Channel { fd: fds[0] };
        copy.send(kind::DATA, b"z", &[]).unwrap();
        let (k, body, _) = b.receive(Duration::from_secs(5)).unwrap().unwrap();
        assert_eq!((k, body.as_slice()), (kind::DATA, &b"z"[..]));
        // SAFETY: closing the second received descriptor, which we own.
        unsafe { libc::close(fds[1]) };
        drop(old);
        let gone = new.receive(Duration::from_secs(5)).unwrap_err();
        assert_eq!(gone.kind(), std::io::ErrorKind::UnexpectedEof);
        assert_eq!(versions_of(&hello_body()), READS);
    }
}
