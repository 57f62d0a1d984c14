//! The write path: the [`Wire`] seam (how a connection's frames become
//! bytes on its socket), direct writes of matched frames, and the send
//! queue that holds what the socket refused.

use std::io::IoSlice;
use std::os::unix::io::RawFd;

use smallvec::SmallVec;

use super::{CloseCode, ConnKey, Connection, Delivered, Frame, Registry, SendQueue};

/// What a flush attempt ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flush {
    /// Everything queued was written.
    Drained,
    /// The socket would block; the rest stays queued.
    Blocked,
    /// The socket failed; the connection is done.
    Failed,
}

/// The write seam: how a connection's frames become bytes on its socket.
///
/// The fan-out walk and the send queue hand a wire complete WebSocket
/// frames — shared by every subscriber, the first possibly partly written
/// already — and learn how many of those frame bytes the socket took; they
/// never see what went on the wire. Today's wire is plaintext: the frames
/// themselves in one vectored, non-blocking `sendmsg`, and any
/// `FnMut(RawFd, &[IoSlice]) -> io::Result<usize>` is such a wire (the
/// server's `shard::send_vectored`, the tests' and benches' fake sockets).
/// A TLS wire would encrypt the frames into that connection's records
/// (finding its session by `key`) and count the frame bytes it sealed,
/// keeping a record the socket took only part of for the next call; a
/// compressing one would send a shared compressed frame instead. Neither
/// changes the walk, the queue or its limit, which stay in frame bytes.
pub trait Wire {
    /// Offers `frames`, in order, to connection `key`'s socket `fd` without
    /// blocking; returns how many bytes of them it took (a prefix), or the
    /// socket's error: `WouldBlock` when it takes nothing now.
    fn write<'a>(
        &mut self,
        key: ConnKey,
        fd: RawFd,
        frames: impl Iterator<Item = &'a [u8]>,
    ) -> std::io::Result<usize>;
}

/// The plaintext wire: a non-blocking vectored send of the frames as they
/// are, at most `SEND_SLICES_MAX` (1,024) per call.
impl<F> Wire for F
where
    F: FnMut(RawFd, &[IoSlice<'_>]) -> std::io::Result<usize>,
{
    #[inline]
    fn write<'a>(
        &mut self,
        _key: ConnKey,
        fd: RawFd,
        frames: impl Iterator<Item = &'a [u8]>,
    ) -> std::io::Result<usize> {
        // Filled in place: collecting would build the 16 KiB array and
        // then move it (a copy per subscriber on the fan-out's hot path).
        let mut slices: SmallVec<[IoSlice<'_>; SEND_SLICES_MAX]> = SmallVec::new();
        for frame in frames.take(SEND_SLICES_MAX) {
            slices.push(IoSlice::new(frame));
        }
        self(fd, &slices)
    }
}

/// Most frames in one vectored send: Linux's UIO_MAXIOV (more fails the
/// call with EMSGSIZE). At high rates a subscriber's frames of one commit
/// round then leave in one `sendmsg`; against 64, this cut the server's CPU
/// per delivery at 10,000 subscribers × 8M deliveries/s offered from about
/// 205 to 115 ns (docs/benchmarks.md).
const SEND_SLICES_MAX: usize = 1024;

impl Registry {
    /// Queues one frame to one connection, closing it as a slow consumer
    /// when its queue would pass the limit. Marks it for the next flush.
    pub fn enqueue(&mut self, key: ConnKey, frame: &Frame) {
        if self.get(key).is_some() {
            self.enqueue_at(key.index, frame);
        }
    }

    /// [`Registry::enqueue`] by slab index, for the walk (which holds
    /// indexes of live records).
    pub(super) fn enqueue_at(&mut self, index: u32, frame: &Frame) {
        let limit = self.limits.send_queue_bytes;
        let conn = &mut self.connections[index as usize];
        if !conn.state.can_send() {
            return;
        }
        // Only bytes behind the front frame count (see `backlog_bytes`):
        // a frame that becomes the front is always taken.
        if conn.send.is_some() && conn.backlog_bytes() + frame.len() > limit {
            self.close_slow_consumer_at(index);
            return;
        }
        self.push_frame(index, frame);
    }

    /// Closes connection `key` as a slow consumer (1013) now, as if its
    /// backlog had passed the queue limit: a reader that takes nothing at
    /// all (a stalled replay) is one as well.
    pub fn close_slow_consumer(&mut self, key: ConnKey) {
        if self.get(key).is_some() {
            self.close_slow_consumer_at(key.index);
        }
    }

    /// Closes a connection whose backlog passed the queue limit with 1013:
    /// frees its queue but keeps the rest of a frame the socket has already
    /// taken part of, since the close frame that follows must start on a
    /// frame boundary.
    pub(super) fn close_slow_consumer_at(&mut self, index: u32) {
        let conn = &mut self.connections[index as usize];
        if let Some(queue) = conn.send.as_mut() {
            if queue.front_sent > 0 {
                queue.frames.truncate(1);
                queue.frames.shrink_to_fit();
                let front = queue.frames.front().map_or(0, |f| f.len());
                queue.bytes = (front - queue.front_sent as usize) as u32;
            } else {
                conn.send = None;
            }
        }
        self.counters.slow_consumer_closes += 1;
        let key = ConnKey {
            index,
            generation: conn.generation,
        };
        self.request_close(key, CloseCode::SLOW_CONSUMER);
    }

    /// Queues a frame without the open-state and limit checks: the close
    /// frame itself, which must go out whatever the queue holds.
    pub fn enqueue_final(&mut self, key: ConnKey, frame: &Frame) {
        if self.get(key).is_some() {
            self.push_frame(key.index, frame);
        }
    }

    pub(super) fn push_frame(&mut self, index: u32, frame: &Frame) {
        let conn = &mut self.connections[index as usize];
        let queue = conn.send.get_or_insert_with(Box::default);
        if queue.frames.is_empty() {
            self.dirty.push(ConnKey {
                index,
                generation: conn.generation,
            });
        }
        queue.frames.push_back(frame.clone());
        queue.bytes += frame.len() as u32;
    }

    /// Writes `frame` to connection `index` at once when nothing is queued
    /// for it (no queue is allocated for a socket that takes it), else
    /// queues it behind what is; like [`Registry::enqueue`], nothing is
    /// written to a connection being closed.
    pub fn write_or_queue(
        &mut self,
        key: ConnKey,
        frame: &Frame,
        wire: &mut impl Wire,
        outcome: &mut Delivered,
    ) {
        let Some(conn) = self.get(key) else {
            return;
        };
        if !conn.state.can_send() {
            return;
        }
        self.write_frames(key.index, &[frame], wire, outcome);
    }

    /// Writes `bytes` to connection `key`, whose queue is empty (a fresh
    /// connection's first answer), straight from the caller's buffer: no
    /// frame or queue is allocated unless the socket refuses part of it,
    /// which is then queued. `Blocked` means that part waits for EPOLLOUT
    /// (the caller arms it); `Failed`, that the socket failed.
    pub fn write_first(&mut self, key: ConnKey, bytes: &[u8], wire: &mut impl Wire) -> Flush {
        let Some(conn) = self.get(key) else {
            return Flush::Failed;
        };
        if conn.send.is_some() || !conn.state.can_send() {
            // Not a fresh connection: behind what is queued, as `enqueue`.
            self.enqueue(key, &Frame::from(bytes));
            return self.flush(key, wire);
        }
        let fd = conn.fd;
        let mut sent = 0;
        while sent < bytes.len() {
            self.counters.sends += 1;
            match wire.write(key, fd, std::iter::once(&bytes[sent..])) {
                Ok(0) => break,
                Ok(written) => {
                    self.counters.bytes_sent += written as u64;
                    sent += written;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => return Flush::Failed,
            }
        }
        if sent == bytes.len() {
            return Flush::Drained;
        }
        self.push_frame(key.index, &Frame::from(&bytes[sent..]));
        if let Some(conn) = self.get_mut(key) {
            conn.write_blocked = true;
        }
        Flush::Blocked
    }

    /// Writes `frames` to an open connection in vectored sends when its
    /// queue is empty, queueing what the socket refuses; a connection with
    /// queued bytes gets them queued behind those.
    pub(super) fn write_frames(
        &mut self,
        index: u32,
        frames: &[&Frame],
        wire: &mut impl Wire,
        outcome: &mut Delivered,
    ) {
        if self.connections[index as usize].send.is_some() {
            for frame in frames {
                self.enqueue_at(index, frame);
            }
            return;
        }
        let conn = &mut self.connections[index as usize];
        let key = ConnKey {
            index,
            generation: conn.generation,
        };
        // Next frame to write, and bytes of it already written.
        let mut next = 0usize;
        let mut front_sent = 0usize;
        while next < frames.len() {
            let unwritten = frames[next..].iter().enumerate().map(|(i, frame)| {
                let start = if i == 0 { front_sent } else { 0 };
                &frame[start..]
            });
            self.counters.sends += 1;
            match wire.write(key, conn.fd, unwritten) {
                Ok(mut written) => {
                    self.counters.bytes_sent += written as u64;
                    while written > 0 {
                        let left = frames[next].len() - front_sent;
                        if written >= left {
                            written -= left;
                            front_sent = 0;
                            next += 1;
                        } else {
                            front_sent += written;
                            written = 0;
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let behind = frames[next + 1..].iter().map(|f| f.len()).sum::<usize>();
                    let mut queue = Box::<SendQueue>::default();
                    queue
                        .frames
                        .extend(frames[next..].iter().map(|f| (*f).clone()));
                    queue.front_sent = front_sent as u32;
                    queue.bytes = (frames[next].len() - front_sent + behind) as u32;
                    conn.send = Some(queue);
                    conn.write_blocked = true;
                    outcome.blocked.push((key, conn.fd));
                    if behind > self.limits.send_queue_bytes {
                        self.close_slow_consumer_at(index);
                    }
                    return;
                }
                Err(_) => {
                    outcome.failed.push(key);
                    return;
                }
            }
        }
    }

    /// Unwritten bytes of a connection; `None` when it is gone.
    pub fn queued_bytes_of(&self, key: ConnKey) -> Option<usize> {
        self.get(key).map(|c| c.queued_bytes())
    }

    /// Takes the list of connections with newly queued frames.
    pub fn take_dirty(&mut self) -> Vec<ConnKey> {
        std::mem::take(&mut self.dirty)
    }

    /// Gives a drained dirty list back so its allocation is reused.
    pub fn return_dirty(&mut self, mut list: Vec<ConnKey>) {
        if self.dirty.is_empty() {
            list.clear();
            self.dirty = list;
        }
    }

    /// Writes as much of connection `key`'s queue as its socket takes,
    /// through `wire`.
    pub fn flush(&mut self, key: ConnKey, wire: &mut impl Wire) -> Flush {
        let Some(conn) = self
            .connections
            .get_mut(key.index as usize)
            .filter(|c| c.generation == key.generation)
        else {
            return Flush::Failed;
        };
        loop {
            let Some(queue) = conn.send.as_mut() else {
                conn.write_blocked = false;
                return Flush::Drained;
            };
            let front_sent = queue.front_sent as usize;
            let unwritten = queue.frames.iter().enumerate().map(|(i, frame)| {
                let start = if i == 0 { front_sent } else { 0 };
                &frame[start..]
            });
            self.counters.sends += 1;
            match wire.write(key, conn.fd, unwritten) {
                Ok(written) => {
                    self.counters.bytes_sent += written as u64;
                    advance(conn, written);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    conn.write_blocked = true;
                    return Flush::Blocked;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return Flush::Failed,
            }
        }
    }
}

/// Drops `written` bytes from the front of a connection's queue; frees the
/// queue when it empties.
fn advance(conn: &mut Connection, mut written: usize) {
    let queue = conn
        .send
        .as_mut()
        .expect("written bytes came from the queue");
    assert!(written <= queue.bytes as usize);
    queue.bytes -= written as u32;
    while written > 0 {
        let front = queue
            .frames
            .front()
            .expect("written bytes came from the queue");
        let left = front.len() - queue.front_sent as usize;
        if written >= left {
            written -= left;
            queue.front_sent = 0;
            queue.frames.pop_front();
        } else {
            queue.front_sent += written as u32;
            written = 0;
        }
    }
    if queue.frames.is_empty() {
        // An idle connection keeps no queue allocation.
        conn.send = None;
    }
}
