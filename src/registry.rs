//! One shard's connections, orgs, channel tables and send queues. Pure data:
//! no runtime, no sockets (sending goes through a caller-supplied function),
//! so it is testable and benchable over a million records.
//!
//! Connections live in a `slab` of compact records; a [`ConnKey`] carries a
//! generation so a stale key can never reach a reused slot. Each org interns
//! the channel names its connections subscribe to into bit positions, and a
//! connection's subscriptions are a bitmask, so matching a message to a
//! connection is one AND. A published message is rendered once per target
//! channel into one complete WebSocket frame held by an `Rc<[u8]>`, and that
//! same buffer is queued to every matching connection.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::os::unix::io::RawFd;
use std::rc::Rc;
use std::task::Waker;

use ahash::AHashMap;
use slab::Slab;
use smallvec::SmallVec;

use crate::protocol::ws;

/// A complete server frame (or, once, the 101 answer), shared by every
/// connection it is queued to.
pub type Frame = Rc<[u8]>;

/// Typed key of a connection: slab index plus the generation of the record
/// that was there when the key was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Slot in the slab.
    pub index: u32,
    /// Generation of the record; a reused slot has a different one.
    pub generation: u32,
}

/// Why the server is closing a connection (the close code to send).
pub type CloseCode = u16;

/// Where a connection is in its life (the close handshake of RFC 6455 §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Upgraded; messages flow both ways.
    Open,
    /// We sent a close frame and wait (bounded) for the peer's close or EOF.
    ClosingByUs,
    /// The peer sent a close frame; we answered and close the socket once
    /// the answer is written (bounded).
    ClosingByPeer,
}

/// Unwritten frames of one connection. Boxed and present only while bytes
/// are pending, so an idle connection pays 8 bytes for it.
#[derive(Debug, Default)]
pub struct SendQueue {
    /// Frames waiting to be written, oldest first.
    pub frames: VecDeque<Frame>,
    /// Bytes of the front frame already written.
    pub front_sent: u32,
    /// Unwritten bytes in `frames`.
    pub bytes: u32,
}

/// Read state carried between two reads: a partly received frame or a
/// partly assembled fragmented message. Boxed and present only then.
#[derive(Debug)]
pub struct Partial {
    /// The decoder holding the assembly state.
    pub decoder: ws::Decoder,
    /// Bytes of an incomplete frame.
    pub bytes: Vec<u8>,
}

/// One connection's record: what an idle connection costs in user space.
#[derive(Debug)]
pub struct Connection {
    /// Generation of this record (see [`ConnKey`]).
    pub generation: u32,
    /// The socket; the record owns it (closed when the record is removed).
    pub fd: RawFd,
    /// Index of the org in the registry's org slab.
    pub org: u32,
    /// Position of this connection in its org's connection list, for O(1) removal.
    pub org_position: u32,
    /// Index of the API key in the registry's key-id table (for revocation).
    pub key: u32,
    /// Number of bits set in `subscriptions`.
    pub subscription_count: u16,
    /// Bad client messages in a row (closed with 1008 at the limit).
    pub bad_messages_in_row: u8,
    /// Pings sent without any frame received since.
    pub missed_pongs: u8,
    /// True while the socket refused more bytes: the reactor then waits for
    /// writability (EPOLLOUT) and the fan-out only queues.
    pub write_blocked: bool,
    /// Close handshake state.
    pub state: ConnState,
    /// Set when the server decided to close; the reactor sends the close frame.
    pub close: Option<CloseCode>,
    /// Subscriptions as bits of the org's channel table (two words
    /// whatever the org's channel count; see `subscriptions`).
    pub subscriptions: crate::subscriptions::ChannelSet,
    /// Pending output, only while there is some.
    pub send: Option<Box<SendQueue>>,
    /// Pending input state, only while there is some.
    pub partial: Option<Box<Partial>>,
}

impl Connection {
    /// True when subscribed to channel `bit`.
    #[inline]
    pub fn has(&self, bit: u32) -> bool {
        self.subscriptions.has(bit)
    }

    fn set(&mut self, bit: u32) {
        self.subscriptions.set(bit);
    }

    fn clear(&mut self, bit: u32) {
        self.subscriptions.clear(bit);
    }

    /// Unwritten bytes.
    pub fn queued_bytes(&self) -> usize {
        self.send.as_ref().map_or(0, |q| q.bytes as usize)
    }

    /// Unwritten bytes behind the frame being written: what the send queue
    /// limit bounds. The front frame is not counted, so one message larger
    /// than the limit still reaches a reader that keeps up.
    pub fn backlog_bytes(&self) -> usize {
        self.send.as_ref().map_or(0, |q| {
            let front = q
                .frames
                .front()
                .map_or(0, |f| f.len() - q.front_sent as usize);
            q.bytes as usize - front
        })
    }

    /// True when nothing waits to be written.
    pub fn queue_is_empty(&self) -> bool {
        self.send.is_none()
    }
}

/// The fixed channels every org has; their bits are never freed.
pub const FIXED_CHANNELS: [&str; 3] = ["events", "deliveries", "issues"];

/// An org's channel names interned to bit positions.
#[derive(Debug, Default)]
pub struct ChannelTable {
    /// Name → bit.
    by_name: AHashMap<Box<str>, u32>,
    /// Bit → name (None for a free bit).
    names: Vec<Option<Box<str>>>,
    /// Bit → number of subscribed connections.
    subscribers: Vec<u32>,
    /// Freed bits, reused first so masks stay short.
    free: Vec<u32>,
    /// Bits freed while a broadcast of the org was being walked: its
    /// frames still name them, so they are not reused until the walk ends
    /// (a connection subscribing meanwhile to another channel would get
    /// frames of the old one).
    held: Vec<u32>,
}

impl ChannelTable {
    fn new() -> ChannelTable {
        let mut table = ChannelTable::default();
        for name in FIXED_CHANNELS {
            table.intern(name);
        }
        table
    }

    /// The bit of `name`, if any connection of the org ever needed it.
    pub fn lookup(&self, name: &str) -> Option<u32> {
        self.by_name.get(name).copied()
    }

    /// Number of connections subscribed to `bit`.
    pub fn subscribers(&self, bit: u32) -> u32 {
        self.subscribers.get(bit as usize).copied().unwrap_or(0)
    }

    /// Name of `bit`.
    pub fn name(&self, bit: u32) -> Option<&str> {
        self.names.get(bit as usize).and_then(|n| n.as_deref())
    }

    fn intern(&mut self, name: &str) -> u32 {
        if let Some(bit) = self.by_name.get(name) {
            return *bit;
        }
        let bit = match self.free.pop() {
            Some(bit) => {
                self.names[bit as usize] = Some(name.into());
                bit
            }
            None => {
                self.names.push(Some(name.into()));
                self.subscribers.push(0);
                (self.names.len() - 1) as u32
            }
        };
        self.by_name.insert(name.into(), bit);
        bit
    }

    /// One subscriber fewer on `bit`; a route channel's bit is freed with
    /// its last one, for reuse at once or, with `hold` (a broadcast of the
    /// org is being walked), once [`ChannelTable::unhold`] runs.
    fn release(&mut self, bit: u32, hold: bool) {
        let count = &mut self.subscribers[bit as usize];
        assert!(*count > 0, "channel subscriber count underflow");
        *count -= 1;
        if *count == 0 && bit as usize >= FIXED_CHANNELS.len() {
            if let Some(name) = self.names[bit as usize].take() {
                self.by_name.remove(&name);
            }
            if hold {
                self.held.push(bit);
            } else {
                self.free.push(bit);
            }
        }
    }

    /// Makes the bits freed during walks reusable (no walk is running).
    fn unhold(&mut self) {
        self.free.append(&mut self.held);
    }
}

/// One org on this shard.
#[derive(Debug)]
pub struct Org {
    /// The org id.
    pub id: Rc<str>,
    /// Latest sequence number given to a message of this org.
    pub seq: u64,
    /// Slab indexes of its connections.
    pub connections: Vec<u32>,
    /// Its channel names.
    pub channels: ChannelTable,
    /// Broadcasts of this org being delivered (staged, not yet finished).
    /// While one is, a removed connection leaves a [`VACANT`] in
    /// `connections` instead of moving the last one into its place, so the
    /// positions a delivery walks stay put across its yields.
    pub delivering: u32,
    /// Positions left [`VACANT`] while delivering, filled when it ends.
    vacant: Vec<u32>,
}

/// A position in an org's connection list whose connection left while a
/// broadcast was being delivered.
pub const VACANT: u32 = u32::MAX;

/// One commit round's messages for one org, rendered once, ready to be
/// written to every subscriber by [`Registry::deliver`].
#[derive(Debug)]
pub struct Broadcast {
    /// The org's slab index.
    pub org: u32,
    /// (channel bit, frame) in seq order.
    pub targets: Vec<(u32, Frame)>,
    /// Positions of the org's connection list to walk: the connections that
    /// were there when it was staged (later ones are not subscribed yet).
    pub positions: usize,
}

/// What writing a broadcast left for the caller to act on.
#[derive(Debug, Default)]
pub struct Delivered {
    /// Connections whose socket refused bytes: the rest is queued and they
    /// need writability (EPOLLOUT) to go on.
    pub blocked: Vec<(ConnKey, RawFd)>,
    /// Connections whose socket failed: to close without a close frame.
    pub failed: Vec<ConnKey>,
}

/// Message types of the contract and the channel prefix each routes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    /// `event` → `events`, `events:<source_id>`.
    Event,
    /// `delivery` → `deliveries`, `deliveries:<destination_id>`.
    Delivery,
    /// `issue` → `issues`.
    Issue,
    /// `sync` → `collections:<collection_id>`.
    Sync,
}

impl MessageKind {
    /// The `type` string.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageKind::Event => "event",
            MessageKind::Delivery => "delivery",
            MessageKind::Issue => "issue",
            MessageKind::Sync => "sync",
        }
    }

    /// Parses the `type` string.
    pub fn parse(text: &str) -> Option<MessageKind> {
        match text {
            "event" => Some(MessageKind::Event),
            "delivery" => Some(MessageKind::Delivery),
            "issue" => Some(MessageKind::Issue),
            "sync" => Some(MessageKind::Sync),
            _ => None,
        }
    }
}

/// A validated message ready to be sequenced and fanned out.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Org it belongs to.
    pub org_id: String,
    /// Its type.
    pub kind: MessageKind,
    /// `source_id`, `destination_id` or `collection_id`, by kind.
    pub route_id: Option<String>,
    /// The publisher's `data` JSON text, forwarded as is.
    pub data: Box<str>,
}

impl Outgoing {
    /// The channels this message goes to, broadest first.
    pub fn channels(&self) -> SmallVec<[String; 2]> {
        let mut out = SmallVec::new();
        match self.kind {
            MessageKind::Event => {
                out.push("events".to_string());
                if let Some(id) = &self.route_id {
                    out.push(format!("events:{id}"));
                }
            }
            MessageKind::Delivery => {
                out.push("deliveries".to_string());
                if let Some(id) = &self.route_id {
                    out.push(format!("deliveries:{id}"));
                }
            }
            MessageKind::Issue => out.push("issues".to_string()),
            MessageKind::Sync => {
                if let Some(id) = &self.route_id {
                    out.push(format!("collections:{id}"));
                }
            }
        }
        out
    }
}

/// Registry-level errors when adding a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddError {
    /// The org already holds its maximum of connections (503).
    OrgFull,
    /// The shard holds its maximum of connections (503).
    ShardFull,
}

/// Subscription outcomes, mapped to the contract's replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeError {
    /// `too_many_subscriptions`.
    TooMany,
}

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

/// Counters the registry updates; the shard copies them into metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counters {
    /// Frames queued to connections (deliveries).
    pub delivered: u64,
    /// Bytes written to sockets.
    pub bytes_sent: u64,
    /// Connections closed for passing their queue limit.
    pub slow_consumer_closes: u64,
    /// Messages sequenced (published) on this shard.
    pub published: u64,
    /// `send` calls made.
    pub sends: u64,
}

/// Limits the registry enforces.
#[derive(Debug, Clone, Copy)]
pub struct RegistryLimits {
    /// Most connections per org.
    pub connections_per_org: usize,
    /// Most connections on this shard.
    pub connections_max: usize,
    /// Most subscriptions per connection.
    pub subscriptions_max: usize,
    /// Most unwritten bytes per connection.
    pub send_queue_bytes: usize,
}

/// Most connection records reserved up front per shard (80 MB of address
/// space); past it the slab grows as usual.
const CONNECTIONS_RESERVED_MAX: usize = 1 << 20;

/// How many positions ahead [`Registry::deliver`] prefetches records.
const PREFETCH_AHEAD: usize = 16;

/// Hints the CPU to load connection record `index` into cache.
#[inline]
fn prefetch(connections: &Slab<Connection>, index: u32) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: every index in an org's connection list other than
        // VACANT is an occupied slot (add pushes it, remove takes it out
        // or marks it VACANT before freeing the slot), so `get_unchecked`
        // is in bounds and occupied; only the address is used, for a
        // prefetch, which never faults.
        unsafe {
            let record = connections.get_unchecked(index as usize) as *const Connection;
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                record as *const i8,
            );
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (connections, index);
    }
}

/// Most frames in one vectored send: Linux's UIO_MAXIOV (more fails the
/// call with EMSGSIZE). At high rates a subscriber's frames of one commit
/// round then leave in one `sendmsg`; against 64, this cut the server's CPU
/// per delivery at 10,000 subscribers × 8M deliveries/s offered from about
/// 205 to 115 ns (docs/benchmarks.md).
const SEND_SLICES_MAX: usize = 1024;

/// Close code for a connection that passed its send queue limit.
pub const CLOSE_SLOW_CONSUMER: u16 = 1013;

/// One shard's registry.
#[derive(Debug)]
pub struct Registry {
    /// Connection records.
    pub connections: Slab<Connection>,
    /// Org records.
    pub orgs: Slab<Org>,
    /// Org id → org slab index.
    org_by_id: AHashMap<Rc<str>, u32>,
    /// Key ids of connected clients, interned (index stored per connection).
    key_ids: Vec<Rc<str>>,
    /// Key id → index in `key_ids`.
    key_by_id: AHashMap<Rc<str>, u32>,
    /// The session of each connection that signed in with the session
    /// cookie (`auth::revoked::session_id`), for closing them on sign-out.
    /// Kept beside the records: key connections pay nothing for it.
    sessions: AHashMap<ConnKey, (u128, u64)>,
    /// Next generation to hand out.
    next_generation: u32,
    /// Connections with newly queued frames, to flush after a batch.
    dirty: Vec<u32>,
    /// Connections the server decided to close, for the reactor to act on.
    pub closing: Vec<ConnKey>,
    /// Wakes the reactor when `closing` gets an entry.
    pub reactor_waker: Option<Waker>,
    /// Limits.
    pub limits: RegistryLimits,
    /// Counters.
    pub counters: Counters,
}

impl Registry {
    /// An empty registry.
    pub fn new(limits: RegistryLimits) -> Registry {
        Registry {
            // Reserved once for the shard's whole budget: the pages are
            // touched only as records are written, so an unused reservation
            // costs address space, not memory, and the slab never doubles
            // (a doubling copies every record and, until the allocator
            // gives it back, keeps the old half resident too).
            connections: Slab::with_capacity(limits.connections_max.min(CONNECTIONS_RESERVED_MAX)),
            orgs: Slab::new(),
            org_by_id: AHashMap::new(),
            key_ids: Vec::new(),
            key_by_id: AHashMap::new(),
            sessions: AHashMap::new(),
            next_generation: 1,
            dirty: Vec::new(),
            closing: Vec::new(),
            reactor_waker: None,
            limits,
            counters: Counters::default(),
        }
    }

    /// The org's slab index, created on first use.
    pub fn org_index(&mut self, org_id: &str) -> u32 {
        if let Some(index) = self.org_by_id.get(org_id) {
            return *index;
        }
        let id: Rc<str> = org_id.into();
        let index = self.orgs.insert(Org {
            id: id.clone(),
            seq: 0,
            connections: Vec::new(),
            channels: ChannelTable::new(),
            delivering: 0,
            vacant: Vec::new(),
        }) as u32;
        self.org_by_id.insert(id, index);
        index
    }

    /// The org's latest seq (0 when it never published).
    pub fn org_seq(&self, org_id: &str) -> u64 {
        self.org_by_id
            .get(org_id)
            .map(|i| self.orgs[*i as usize].seq)
            .unwrap_or(0)
    }

    /// Sets the org's latest seq (used when history restores it).
    pub fn set_org_seq(&mut self, org_id: &str, seq: u64) {
        let index = self.org_index(org_id);
        let org = &mut self.orgs[index as usize];
        org.seq = org.seq.max(seq);
    }

    fn key_index(&mut self, key_id: &str) -> u32 {
        if let Some(index) = self.key_by_id.get(key_id) {
            return *index;
        }
        let id: Rc<str> = key_id.into();
        self.key_ids.push(id.clone());
        let index = (self.key_ids.len() - 1) as u32;
        self.key_by_id.insert(id, index);
        index
    }

    /// Adds a connection of `org_id` authenticated with key `key_id`.
    /// Returns its key and the org's seq at this moment (the welcome's
    /// `seq`: everything published later has a larger one).
    pub fn add(
        &mut self,
        org_id: &str,
        key_id: &str,
        fd: RawFd,
    ) -> Result<(ConnKey, u64), AddError> {
        if self.connections.len() >= self.limits.connections_max {
            return Err(AddError::ShardFull);
        }
        let org = self.org_index(org_id);
        let org_record = &self.orgs[org as usize];
        if org_record.connections.len() - org_record.vacant.len() >= self.limits.connections_per_org
        {
            return Err(AddError::OrgFull);
        }
        let key = self.key_index(key_id);
        let generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1).max(1);
        let org_position = self.orgs[org as usize].connections.len() as u32;
        let index = self.connections.insert(Connection {
            generation,
            fd,
            org,
            org_position,
            key,
            subscription_count: 0,
            bad_messages_in_row: 0,
            missed_pongs: 0,
            write_blocked: false,
            state: ConnState::Open,
            close: None,
            subscriptions: crate::subscriptions::ChannelSet::new(),
            send: None,
            partial: None,
        }) as u32;
        let org_record = &mut self.orgs[org as usize];
        org_record.connections.push(index);
        Ok((ConnKey { index, generation }, org_record.seq))
    }

    /// The record behind `key`, if it is still that connection.
    pub fn get(&self, key: ConnKey) -> Option<&Connection> {
        self.connections
            .get(key.index as usize)
            .filter(|c| c.generation == key.generation)
    }

    /// Mutable record behind `key`, if it is still that connection.
    pub fn get_mut(&mut self, key: ConnKey) -> Option<&mut Connection> {
        self.connections
            .get_mut(key.index as usize)
            .filter(|c| c.generation == key.generation)
    }

    /// Removes a connection and releases its channel bits.
    pub fn remove(&mut self, key: ConnKey) {
        let Some(conn) = self.get(key) else {
            return;
        };
        let org = conn.org;
        let position = conn.org_position as usize;
        let bits: SmallVec<[u32; 8]> = conn.subscriptions.bits().collect();
        let conn = self.connections.remove(key.index as usize);
        drop(conn);
        if !self.sessions.is_empty() {
            self.sessions.remove(&key);
        }
        let org_record = &mut self.orgs[org as usize];
        let hold = org_record.delivering > 0;
        for bit in bits {
            org_record.channels.release(bit, hold);
        }
        assert_eq!(org_record.connections[position], key.index);
        if org_record.delivering > 0 {
            org_record.connections[position] = VACANT;
            org_record.vacant.push(position as u32);
            return;
        }
        org_record.connections.swap_remove(position);
        if let Some(moved) = org_record.connections.get(position).copied() {
            self.connections[moved as usize].org_position = position as u32;
        }
    }

    /// Subscribes; `Ok(false)` when it already was.
    pub fn subscribe(&mut self, key: ConnKey, channel: &str) -> Result<bool, SubscribeError> {
        let limit = self.limits.subscriptions_max;
        let Some(conn) = self.connections.get(key.index as usize) else {
            return Ok(false);
        };
        let org = conn.org as usize;
        if let Some(bit) = self.orgs[org].channels.lookup(channel) {
            if conn.has(bit) {
                return Ok(false);
            }
        }
        if conn.subscription_count as usize >= limit {
            return Err(SubscribeError::TooMany);
        }
        let bit = self.orgs[org].channels.intern(channel);
        self.orgs[org].channels.subscribers[bit as usize] += 1;
        let conn = &mut self.connections[key.index as usize];
        conn.set(bit);
        conn.subscription_count += 1;
        Ok(true)
    }

    /// Unsubscribes; false when it was not subscribed.
    pub fn unsubscribe(&mut self, key: ConnKey, channel: &str) -> bool {
        let Some(conn) = self.get(key) else {
            return false;
        };
        let org = conn.org as usize;
        let Some(bit) = self.orgs[org].channels.lookup(channel) else {
            return false;
        };
        if !conn.has(bit) {
            return false;
        }
        let conn = &mut self.connections[key.index as usize];
        conn.clear(bit);
        conn.subscription_count -= 1;
        let hold = self.orgs[org].delivering > 0;
        self.orgs[org].channels.release(bit, hold);
        true
    }

    /// Queues one frame to one connection, closing it as a slow consumer
    /// when its queue would pass the limit. Marks it for the next flush.
    pub fn enqueue(&mut self, index: u32, frame: &Frame) {
        let limit = self.limits.send_queue_bytes;
        let conn = &mut self.connections[index as usize];
        if conn.close.is_some() || conn.state != ConnState::Open {
            return;
        }
        // Only bytes behind the front frame count (see `backlog_bytes`):
        // a frame that becomes the front is always taken.
        if conn.send.is_some() && conn.backlog_bytes() + frame.len() > limit {
            self.close_slow_consumer(index);
            return;
        }
        self.push_frame(index, frame);
    }

    /// Closes a connection whose backlog passed the queue limit with 1013:
    /// frees its queue but keeps the rest of a frame the socket has already
    /// taken part of, since the close frame that follows must start on a
    /// frame boundary.
    pub fn close_slow_consumer(&mut self, index: u32) {
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
        self.request_close(key, CLOSE_SLOW_CONSUMER);
    }

    /// Queues a frame without the open-state and limit checks: the close
    /// frame itself, which must go out whatever the queue holds.
    pub fn enqueue_final(&mut self, index: u32, frame: &Frame) {
        self.push_frame(index, frame);
    }

    fn push_frame(&mut self, index: u32, frame: &Frame) {
        let conn = &mut self.connections[index as usize];
        let queue = conn.send.get_or_insert_with(Box::default);
        if queue.frames.is_empty() {
            self.dirty.push(index);
        }
        queue.frames.push_back(frame.clone());
        queue.bytes += frame.len() as u32;
    }

    /// Renders `message`, with the seq the history log gave it (and made
    /// durable), once per channel of it that has subscribers, and adds the
    /// frames to its org's broadcast in `staged` (begun here when it has
    /// none yet). The message becomes the org's latest seq. Seqs of one org
    /// arrive here strictly increasing. Every broadcast staged must be
    /// walked by [`Registry::deliver`] and then ended by [`Registry::finish`].
    pub fn stage(&mut self, message: &Outgoing, seq: u64, staged: &mut Vec<Broadcast>) {
        let org = self.org_index(&message.org_id);
        let record = &mut self.orgs[org as usize];
        assert!(seq > record.seq, "seqs of an org only grow");
        record.seq = seq;
        self.counters.published += 1;
        let position = match staged.iter().rposition(|b| b.org == org) {
            Some(position) => position,
            None => {
                record.delivering += 1;
                staged.push(Broadcast {
                    org,
                    targets: Vec::new(),
                    positions: record.connections.len(),
                });
                staged.len() - 1
            }
        };
        for channel in message.channels() {
            if let Some(bit) = record.channels.lookup(&channel) {
                if record.channels.subscribers(bit) > 0 {
                    let frame = render_message(message.kind, &channel, seq, &message.data);
                    staged[position].targets.push((bit, frame.into()));
                }
            }
        }
    }

    /// Writes `broadcast` to the connections at `positions` of its org's
    /// list (a part of `0..broadcast.positions`, so a large broadcast can be
    /// walked in parts with yields between them). Each subscriber gets its
    /// frames in one vectored `send` straight from the shared frames; only
    /// what its socket refuses is queued (and counted against its queue
    /// limit). A connection that already has queued bytes gets the frames
    /// queued behind them. Blocked and failed sockets are added to `outcome`.
    pub fn deliver(
        &mut self,
        broadcast: &Broadcast,
        positions: std::ops::Range<usize>,
        send: &mut impl FnMut(RawFd, &[IoSlice<'_>]) -> std::io::Result<usize>,
        outcome: &mut Delivered,
    ) {
        if broadcast.targets.is_empty() {
            return;
        }
        let org = broadcast.org as usize;
        let mut matched: SmallVec<[&Frame; 16]> = SmallVec::new();
        let end = positions.end;
        for position in positions {
            // The walk is memory-bound over a large org: ask for the record
            // a few positions ahead while this one is handled.
            if let Some(&ahead) = self.orgs[org].connections[..end].get(position + PREFETCH_AHEAD) {
                if ahead != VACANT {
                    prefetch(&self.connections, ahead);
                }
            }
            let index = self.orgs[org].connections[position];
            if index == VACANT {
                continue;
            }
            let conn = &self.connections[index as usize];
            if conn.close.is_some() || conn.state != ConnState::Open {
                continue;
            }
            matched.clear();
            for (bit, frame) in &broadcast.targets {
                if conn.has(*bit) {
                    matched.push(frame);
                }
            }
            if matched.is_empty() {
                continue;
            }
            self.counters.delivered += matched.len() as u64;
            self.write_frames(index, &matched, send, outcome);
        }
    }

    /// Writes `frame` to connection `index` at once when nothing is queued
    /// for it (no queue is allocated for a socket that takes it), else
    /// queues it behind what is; like [`Registry::enqueue`], nothing is
    /// written to a connection being closed.
    pub fn write_or_queue(
        &mut self,
        index: u32,
        frame: &Frame,
        send: &mut impl FnMut(RawFd, &[IoSlice<'_>]) -> std::io::Result<usize>,
        outcome: &mut Delivered,
    ) {
        let conn = &self.connections[index as usize];
        if conn.close.is_some() || conn.state != ConnState::Open {
            return;
        }
        self.write_frames(index, &[frame], send, outcome);
    }

    /// Writes `frames` to an open connection in vectored sends when its
    /// queue is empty, queueing what the socket refuses; a connection with
    /// queued bytes gets them queued behind those.
    fn write_frames(
        &mut self,
        index: u32,
        frames: &[&Frame],
        send: &mut impl FnMut(RawFd, &[IoSlice<'_>]) -> std::io::Result<usize>,
        outcome: &mut Delivered,
    ) {
        if self.connections[index as usize].send.is_some() {
            for frame in frames {
                self.enqueue(index, frame);
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
            let mut slices: SmallVec<[IoSlice<'_>; SEND_SLICES_MAX]> = SmallVec::new();
            for (i, frame) in frames[next..].iter().take(SEND_SLICES_MAX).enumerate() {
                let start = if i == 0 { front_sent } else { 0 };
                slices.push(IoSlice::new(&frame[start..]));
            }
            self.counters.sends += 1;
            match send(conn.fd, &slices) {
                Ok(mut written) => {
                    drop(slices);
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
                        self.close_slow_consumer(index);
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

    /// Ends the delivery of `broadcast`: fills the positions of connections
    /// that left meanwhile.
    pub fn finish(&mut self, broadcast: &Broadcast) {
        let org_record = &mut self.orgs[broadcast.org as usize];
        org_record.delivering -= 1;
        if org_record.delivering > 0 {
            return;
        }
        org_record.channels.unhold();
        let mut vacant = std::mem::take(&mut org_record.vacant);
        // Highest first: every vacancy above the one being filled is gone,
        // so the last entry moved into it is a live connection (or itself).
        vacant.sort_unstable_by(|a, b| b.cmp(a));
        for position in vacant.iter().map(|&p| p as usize) {
            org_record.connections.swap_remove(position);
            if let Some(moved) = org_record.connections.get(position).copied() {
                self.connections[moved as usize].org_position = position as u32;
            }
        }
        vacant.clear();
        org_record.vacant = vacant;
    }

    /// True while a broadcast of org `org_id` is being delivered: a
    /// subscription that replays history waits for it to finish, so the
    /// switch from replayed to live messages has no gap and no duplicate.
    pub fn is_delivering(&self, org_id: &str) -> bool {
        self.org_by_id
            .get(org_id)
            .is_some_and(|i| self.orgs[*i as usize].delivering > 0)
    }

    /// Unwritten bytes of a connection; `None` when it is gone.
    pub fn queued_bytes_of(&self, key: ConnKey) -> Option<usize> {
        self.get(key).map(|c| c.queued_bytes())
    }

    /// Takes the list of connections with newly queued frames.
    pub fn take_dirty(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.dirty)
    }

    /// Gives a drained dirty list back so its allocation is reused.
    pub fn return_dirty(&mut self, mut list: Vec<u32>) {
        if self.dirty.is_empty() {
            list.clear();
            self.dirty = list;
        }
    }

    /// Writes as much of connection `index`'s queue as `send` takes.
    /// `send` is a non-blocking vectored write: Ok(n) bytes written, or an
    /// error whose kind is WouldBlock when the socket is full.
    pub fn flush(
        &mut self,
        index: u32,
        send: &mut impl FnMut(RawFd, &[IoSlice<'_>]) -> std::io::Result<usize>,
    ) -> Flush {
        let Some(conn) = self.connections.get_mut(index as usize) else {
            return Flush::Failed;
        };
        loop {
            let Some(queue) = conn.send.as_mut() else {
                conn.write_blocked = false;
                return Flush::Drained;
            };
            let mut slices: SmallVec<[IoSlice<'_>; SEND_SLICES_MAX]> = SmallVec::new();
            for (i, frame) in queue.frames.iter().take(SEND_SLICES_MAX).enumerate() {
                let start = if i == 0 { queue.front_sent as usize } else { 0 };
                slices.push(IoSlice::new(&frame[start..]));
            }
            self.counters.sends += 1;
            match send(conn.fd, &slices) {
                Ok(written) => {
                    drop(slices);
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

    /// Asks the reactor to close the connection with `code` (the first
    /// request wins).
    pub fn request_close(&mut self, key: ConnKey, code: CloseCode) {
        let Some(conn) = self.get_mut(key) else {
            return;
        };
        if conn.close.is_some() || conn.state != ConnState::Open {
            return;
        }
        conn.close = Some(code);
        self.closing.push(key);
        if let Some(waker) = self.reactor_waker.take() {
            waker.wake();
        }
    }

    /// Keys of every connection, to walk without holding a borrow.
    pub fn keys(&self) -> Vec<ConnKey> {
        self.connections
            .iter()
            .map(|(index, c)| ConnKey {
                index: index as u32,
                generation: c.generation,
            })
            .collect()
    }

    /// Keys of the connections authenticated with API key `key_id`.
    pub fn keys_of_api_key(&self, key_id: &str) -> Vec<ConnKey> {
        let Some(key) = self.key_by_id.get(key_id).copied() else {
            return Vec::new();
        };
        self.connections
            .iter()
            .filter(|(_, c)| c.key == key)
            .map(|(index, c)| ConnKey {
                index: index as u32,
                generation: c.generation,
            })
            .collect()
    }

    /// Notes that connection `key` signed in with session `id`, which
    /// expires at `expires` (Unix seconds).
    pub fn set_session(&mut self, key: ConnKey, id: u128, expires: u64) {
        if self.get(key).is_some() {
            self.sessions.insert(key, (id, expires));
        }
    }

    /// The connections that signed in with a session that `signed_out`
    /// (given key id, session id and expiry) says is signed out.
    pub fn keys_of_sessions(&self, signed_out: impl Fn(&str, u128, u64) -> bool) -> Vec<ConnKey> {
        self.sessions
            .iter()
            .filter(|(key, (id, expires))| {
                self.get(**key)
                    .is_some_and(|conn| signed_out(&self.key_ids[conn.key as usize], *id, *expires))
            })
            .map(|(key, _)| *key)
            .collect()
    }

    /// The API key id connection `key` was accepted with.
    pub fn key_id_of(&self, key: ConnKey) -> Option<&str> {
        self.get(key).map(|conn| &*self.key_ids[conn.key as usize])
    }

    /// Key ids of every open connection.
    pub fn connected_key_ids(&self) -> Vec<Rc<str>> {
        let mut used = vec![false; self.key_ids.len()];
        for (_, c) in self.connections.iter() {
            used[c.key as usize] = true;
        }
        self.key_ids
            .iter()
            .zip(used)
            .filter(|(_, u)| *u)
            .map(|(k, _)| k.clone())
            .collect()
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

/// Appends the decimal digits of `n`.
pub fn push_u64(out: &mut Vec<u8>, n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// A complete server text frame holding `json`.
pub fn text_frame(json: &[u8]) -> Vec<u8> {
    let mut header = [0u8; 14];
    let header_len =
        ws::encode_header(&mut header, true, ws::Opcode::Text, json.len() as u64, None);
    let mut out = Vec::with_capacity(header_len + json.len());
    out.extend_from_slice(&header[..header_len]);
    out.extend_from_slice(json);
    out
}

/// Renders `{"type":…,"channel":…,"seq":…,"data":…}` as one complete text
/// frame. Channel names are restricted to `[A-Za-z0-9_.:-]`, so they need no
/// escaping; `data` is the publisher's JSON text.
pub fn render_message(kind: MessageKind, channel: &str, seq: u64, data: &str) -> Vec<u8> {
    debug_assert!(channel
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b)));
    let mut json = Vec::with_capacity(64 + channel.len() + data.len());
    json.extend_from_slice(b"{\"type\":\"");
    json.extend_from_slice(kind.as_str().as_bytes());
    json.extend_from_slice(b"\",\"channel\":\"");
    json.extend_from_slice(channel.as_bytes());
    json.extend_from_slice(b"\",\"seq\":");
    push_u64(&mut json, seq);
    json.extend_from_slice(b",\"data\":");
    json.extend_from_slice(data.as_bytes());
    json.push(b'}');
    let mut header = [0u8; 14];
    let header_len =
        ws::encode_header(&mut header, true, ws::Opcode::Text, json.len() as u64, None);
    let mut frame = Vec::with_capacity(header_len + json.len());
    frame.extend_from_slice(&header[..header_len]);
    frame.extend_from_slice(&json);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> RegistryLimits {
        RegistryLimits {
            connections_per_org: 3,
            connections_max: 100,
            subscriptions_max: 2,
            send_queue_bytes: 4096,
        }
    }

    /// A socket that never takes a byte: everything published is queued.
    fn refuse(_fd: RawFd, _slices: &[IoSlice<'_>]) -> std::io::Result<usize> {
        Err(std::io::ErrorKind::WouldBlock.into())
    }

    /// Gives `message` the org's next seq and writes it to every subscriber
    /// through `send`, as the shard's committer does in parts.
    fn publish_with(
        r: &mut Registry,
        message: &Outgoing,
        send: &mut impl FnMut(RawFd, &[IoSlice<'_>]) -> std::io::Result<usize>,
    ) -> (u64, Delivered) {
        let seq = r.org_seq(&message.org_id) + 1;
        let mut staged = Vec::new();
        r.stage(message, seq, &mut staged);
        let mut outcome = Delivered::default();
        for broadcast in &staged {
            r.deliver(broadcast, 0..broadcast.positions, send, &mut outcome);
            r.finish(broadcast);
        }
        (seq, outcome)
    }

    fn publish(r: &mut Registry, message: &Outgoing) -> u64 {
        publish_with(r, message, &mut refuse).0
    }

    /// An event of `org_a` whose frame is over the tests' 4 KiB queue limit.
    fn big_event() -> Outgoing {
        Outgoing {
            data: format!("{{\"pad\":\"{}\"}}", "x".repeat(5000)).into(),
            ..event("org_a", "s")
        }
    }

    /// A socket that takes 100 bytes once, then refuses everything.
    /// A socket that takes every byte, noting the descriptor of each send.
    fn takes_all_into(
        got: &mut Vec<RawFd>,
    ) -> impl FnMut(RawFd, &[IoSlice<'_>]) -> std::io::Result<usize> + '_ {
        move |fd, slices| {
            got.push(fd);
            Ok(slices.iter().map(|s| s.len()).sum())
        }
    }

    fn takes_100_then_blocks() -> impl FnMut(RawFd, &[IoSlice<'_>]) -> std::io::Result<usize> {
        let mut first = true;
        move |_fd, _slices| {
            if std::mem::take(&mut first) {
                Ok(100)
            } else {
                Err(std::io::ErrorKind::WouldBlock.into())
            }
        }
    }

    fn event(org: &str, source: &str) -> Outgoing {
        Outgoing {
            org_id: org.to_string(),
            kind: MessageKind::Event,
            route_id: Some(source.to_string()),
            data: format!("{{\"source_id\":\"{source}\"}}").into(),
        }
    }

    #[test]
    fn subscribe_routes_by_bit_and_counts_twice_for_two_channels() {
        let mut r = Registry::new(limits());
        let (a, _) = r.add("org_a", "k1", -1).unwrap();
        let (b, _) = r.add("org_a", "k1", -1).unwrap();
        assert_eq!(r.subscribe(a, "events"), Ok(true));
        assert_eq!(r.subscribe(a, "events"), Ok(false));
        assert_eq!(r.subscribe(a, "events:src_1"), Ok(true));
        assert_eq!(r.subscribe(a, "issues"), Err(SubscribeError::TooMany));
        assert_eq!(r.subscribe(b, "events:src_2"), Ok(true));
        assert_eq!(publish(&mut r, &event("org_a", "src_1")), 1);
        let frames = |r: &Registry, k| {
            r.get(k)
                .unwrap()
                .send
                .as_ref()
                .map_or(0, |q| q.frames.len())
        };
        assert_eq!(frames(&r, a), 2);
        assert_eq!(frames(&r, b), 0);
        assert_eq!(publish(&mut r, &event("org_b", "src_1")), 1);
        assert_eq!(frames(&r, a), 2);
    }

    #[test]
    fn removed_connection_frees_bits_and_stale_keys_miss() {
        let mut r = Registry::new(limits());
        let (a, _) = r.add("org_a", "k1", -1).unwrap();
        r.subscribe(a, "events:x").unwrap();
        let bit = r.orgs[0].channels.lookup("events:x").unwrap();
        r.remove(a);
        assert!(r.get(a).is_none());
        assert!(r.orgs[0].channels.lookup("events:x").is_none());
        let (b, _) = r.add("org_a", "k1", -1).unwrap();
        assert_eq!(b.index, a.index);
        assert!(
            r.get(a).is_none(),
            "stale key must not reach the reused slot"
        );
        r.subscribe(b, "events:y").unwrap();
        assert_eq!(r.orgs[0].channels.lookup("events:y"), Some(bit));
    }

    #[test]
    fn org_connection_cap() {
        let mut r = Registry::new(limits());
        for _ in 0..3 {
            r.add("org_a", "k", -1).unwrap();
        }
        assert_eq!(r.add("org_a", "k", -1), Err(AddError::OrgFull));
        assert!(r.add("org_b", "k", -1).is_ok());
    }

    #[test]
    fn slow_consumer_is_closed_and_queue_freed() {
        let mut r = Registry::new(limits());
        let (a, _) = r.add("org_a", "k", -1).unwrap();
        r.subscribe(a, "events").unwrap();
        for _ in 0..200 {
            publish(&mut r, &event("org_a", "s"));
        }
        let conn = r.get(a).unwrap();
        assert_eq!(conn.close, Some(CLOSE_SLOW_CONSUMER));
        assert_eq!(conn.queued_bytes(), 0);
        assert!(conn.send.is_none());
        assert_eq!(r.closing, vec![a]);
    }

    #[test]
    fn slow_consumer_keeps_the_rest_of_a_partly_written_frame() {
        let mut r = Registry::new(limits());
        let (a, _) = r.add("org_a", "k", -1).unwrap();
        r.subscribe(a, "events").unwrap();
        publish(&mut r, &event("org_a", "s"));
        let first_len = r.get(a).unwrap().queued_bytes();
        let send = |_fd: RawFd, _slices: &[IoSlice<'_>]| Ok(5);
        let mut once = true;
        let mut send_once = |fd: RawFd, slices: &[IoSlice<'_>]| {
            if once {
                once = false;
                send(fd, slices)
            } else {
                Err(std::io::ErrorKind::WouldBlock.into())
            }
        };
        assert_eq!(r.flush(a.index, &mut send_once), Flush::Blocked);
        for _ in 0..200 {
            publish(&mut r, &event("org_a", "s"));
        }
        let conn = r.get(a).unwrap();
        assert_eq!(conn.close, Some(CLOSE_SLOW_CONSUMER));
        assert_eq!(conn.queued_bytes(), first_len - 5);
        assert_eq!(conn.send.as_ref().unwrap().frames.len(), 1);
    }

    #[test]
    fn flush_handles_partial_writes_and_would_block() {
        let mut r = Registry::new(limits());
        let (a, _) = r.add("org_a", "k", -1).unwrap();
        r.subscribe(a, "events").unwrap();
        publish(&mut r, &event("org_a", "s"));
        publish(&mut r, &event("org_a", "s"));
        let total = r.get(a).unwrap().queued_bytes();
        let mut sink = Vec::new();
        let mut calls = 0;
        let mut send = |_fd: RawFd, slices: &[IoSlice<'_>]| {
            calls += 1;
            if calls == 2 {
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            // Write 7 bytes at a time.
            let mut left = 7;
            for s in slices {
                let n = s.len().min(left);
                sink.extend_from_slice(&s[..n]);
                left -= n;
                if left == 0 {
                    break;
                }
            }
            Ok(7 - left)
        };
        assert_eq!(r.flush(a.index, &mut send), Flush::Blocked);
        assert!(r.get(a).unwrap().write_blocked);
        assert_eq!(r.flush(a.index, &mut send), Flush::Drained);
        assert_eq!(sink.len(), total);
        let first = render_message(MessageKind::Event, "events", 1, "{\"source_id\":\"s\"}");
        assert_eq!(&sink[..first.len()], &first[..]);
    }

    #[test]
    fn delivery_writes_straight_from_the_shared_frames_and_queues_only_the_rest() {
        let mut r = Registry::new(limits());
        let (a, _) = r.add("org_a", "k", 7).unwrap();
        let (b, _) = r.add("org_a", "k", 8).unwrap();
        r.subscribe(a, "events").unwrap();
        r.subscribe(b, "events").unwrap();
        r.subscribe(b, "events:s").unwrap();
        let mut staged = Vec::new();
        r.stage(&event("org_a", "s"), 1, &mut staged);
        r.stage(&event("org_a", "t"), 2, &mut staged);
        assert_eq!(staged.len(), 1, "one broadcast per org");
        assert_eq!(staged[0].targets.len(), 3);
        let mut written: Vec<(RawFd, Vec<u8>)> = Vec::new();
        // fd 7 takes everything; fd 8 takes 10 bytes, then refuses.
        let mut send = |fd: RawFd, slices: &[IoSlice<'_>]| {
            let all: Vec<u8> = slices.iter().flat_map(|s| s.iter().copied()).collect();
            let n = if fd == 7 { all.len() } else { 10 };
            if fd == 8 && written.iter().any(|(f, _)| *f == 8) {
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            written.push((fd, all[..n].to_vec()));
            Ok(n)
        };
        let mut outcome = Delivered::default();
        r.deliver(&staged[0], 0..2, &mut send, &mut outcome);
        r.finish(&staged[0]);
        let frame = |ch: &str, seq, src: &str| {
            render_message(
                MessageKind::Event,
                ch,
                seq,
                &format!("{{\"source_id\":\"{src}\"}}"),
            )
        };
        let mut expected_a = frame("events", 1, "s");
        expected_a.extend(frame("events", 2, "t"));
        assert_eq!(written[0], (7, expected_a));
        assert!(r.get(a).unwrap().send.is_none(), "nothing queued for a");
        let conn_b = r.get(b).unwrap();
        assert!(conn_b.write_blocked);
        assert_eq!(outcome.blocked, vec![(b, 8)]);
        let queue = conn_b.send.as_ref().unwrap();
        assert_eq!(queue.frames.len(), 3, "events:1, events:s:1, events:2");
        assert_eq!(queue.front_sent, 10);
        let total_b = 2 * frame("events", 1, "s").len() + frame("events:s", 1, "s").len();
        assert_eq!(queue.bytes as usize, total_b - 10);
        assert_eq!(r.counters.delivered, 5);
    }

    #[test]
    fn a_connection_leaving_during_a_delivery_moves_no_one_until_it_ends() {
        let mut r = Registry::new(RegistryLimits {
            connections_per_org: 10,
            ..limits()
        });
        let keys: Vec<ConnKey> = (0..4).map(|i| r.add("org_a", "k", i).unwrap().0).collect();
        for k in &keys {
            r.subscribe(*k, "events").unwrap();
        }
        let mut staged = Vec::new();
        r.stage(&event("org_a", "s"), 1, &mut staged);
        let mut got = Vec::new();
        let mut send = takes_all_into(&mut got);
        let mut outcome = Delivered::default();
        r.deliver(&staged[0], 0..2, &mut send, &mut outcome);
        // Connection 0 (walked) and 3 (not yet) leave between two parts.
        r.remove(keys[0]);
        r.remove(keys[3]);
        assert!(r.is_delivering("org_a"));
        r.deliver(&staged[0], 2..4, &mut send, &mut outcome);
        drop(send);
        r.finish(&staged[0]);
        assert!(!r.is_delivering("org_a"));
        assert_eq!(
            got,
            vec![0, 1, 2],
            "each connection still there got it once"
        );
        let org = &r.orgs[0];
        assert_eq!(org.connections.len(), 2);
        for (position, &index) in org.connections.iter().enumerate() {
            assert_eq!(r.connections[index as usize].org_position, position as u32);
        }
        // Removal works as before once nothing is being delivered.
        r.remove(keys[1]);
        assert_eq!(r.orgs[0].connections.len(), 1);
        assert_eq!(r.get(keys[2]).unwrap().org_position, 0);
    }

    #[test]
    fn a_channel_bit_freed_during_a_delivery_is_not_reused_until_it_ends() {
        let mut r = Registry::new(limits());
        let (a, _) = r.add("org_a", "k", 1).unwrap();
        let (b, _) = r.add("org_a", "k", 2).unwrap();
        r.subscribe(a, "events:src_1").unwrap();
        let mut staged = Vec::new();
        r.stage(&event("org_a", "src_1"), 1, &mut staged);
        // Between the stage and the walk (or two parts of it), the last
        // subscriber of events:src_1 leaves and another channel is taken.
        r.unsubscribe(a, "events:src_1");
        r.subscribe(b, "events:src_2").unwrap();
        let mut got = Vec::new();
        let mut send = takes_all_into(&mut got);
        let mut outcome = Delivered::default();
        r.deliver(&staged[0], 0..2, &mut send, &mut outcome);
        drop(send);
        r.finish(&staged[0]);
        assert!(got.is_empty(), "events:src_1 frame went to {got:?}");
        // Once the walk ended the bit is free again.
        r.subscribe(a, "events:src_3").unwrap();
        assert_eq!(r.orgs[0].channels.held.len(), 0);
        assert!(
            r.orgs[0].channels.free.is_empty(),
            "the held bit was reused"
        );
    }

    #[test]
    fn a_direct_write_past_the_queue_limit_closes_on_a_frame_boundary() {
        let mut r = Registry::new(limits());
        let (a, _) = r.add("org_a", "k", 5).unwrap();
        r.subscribe(a, "events").unwrap();
        let big = big_event();
        let mut send = takes_100_then_blocks();
        // Two big messages in one round: the second, behind the partly
        // written first, passes the 4 KiB limit.
        let mut staged = Vec::new();
        r.stage(&big, 1, &mut staged);
        r.stage(&big, 2, &mut staged);
        let mut outcome = Delivered::default();
        r.deliver(&staged[0], 0..staged[0].positions, &mut send, &mut outcome);
        r.finish(&staged[0]);
        let conn = r.get(a).unwrap();
        assert_eq!(conn.close, Some(CLOSE_SLOW_CONSUMER));
        let queue = conn.send.as_ref().unwrap();
        assert_eq!((queue.frames.len(), queue.front_sent), (1, 100));
        assert_eq!(outcome.blocked, vec![(a, 5)]);
        assert_eq!(r.closing, vec![a]);
    }

    #[test]
    fn one_message_larger_than_the_queue_limit_is_not_a_slow_consumer() {
        let mut r = Registry::new(limits());
        let (a, _) = r.add("org_a", "k", 5).unwrap();
        r.subscribe(a, "events").unwrap();
        let big = big_event();
        let mut send = takes_100_then_blocks();
        publish_with(&mut r, &big, &mut send);
        let conn = r.get(a).unwrap();
        assert_eq!(conn.close, None, "the frame being written is not backlog");
        assert!(conn.queued_bytes() > 4096);
        assert_eq!(conn.backlog_bytes(), 0);
        // A small one fits behind it; another big one does not.
        publish(&mut r, &event("org_a", "s"));
        assert_eq!(r.get(a).unwrap().close, None);
        publish(&mut r, &big);
        assert_eq!(r.get(a).unwrap().close, Some(CLOSE_SLOW_CONSUMER));
    }

    #[test]
    fn render_is_valid_json_with_data_verbatim() {
        let data = r#"{"n":123456789012345678901234567890,"x":1.000000000000000000001}"#;
        let frame = render_message(MessageKind::Issue, "issues", 42, data);
        let json = &frame[2..];
        let text = std::str::from_utf8(json).unwrap();
        assert!(text.contains("123456789012345678901234567890"));
        let value: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(value["seq"], 42);
        assert_eq!(value["channel"], "issues");
    }
}
