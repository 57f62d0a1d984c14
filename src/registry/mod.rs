//! One shard's connections, orgs, channel tables and send queues. Pure data:
//! no runtime, no sockets (bytes reach a socket through a caller-supplied
//! [`Wire`]), so it is testable and benchable over a million records.
//!
//! - this file: the [`Registry`] — the slab of connection records behind
//!   generation-checked [`ConnKey`]s, orgs and their connection lists, API
//!   key and session bookkeeping, subscriptions, close requests;
//! - `connection`: one connection's record and its state;
//! - `channels`: an org's channel names interned to bits;
//! - `fanout`: staging a committed round once per org and walking the
//!   org's connections to write it ([`Broadcast`]);
//! - `wire`: the write seam — how a connection's frames become bytes on
//!   its socket — and the send queue behind it.
//!
//! Connections live in a `slab` of compact records; a [`ConnKey`] carries a
//! generation so a stale key can never reach a reused slot. Each org interns
//! the channel names its connections subscribe to into bit positions, and a
//! connection's subscriptions are a bitmask, so matching a message to a
//! connection is one AND. A published message is rendered once per target
//! channel into one complete WebSocket frame held by an `Rc<[u8]>`, and that
//! same buffer is written (or queued) to every matching connection.

mod channels;
mod connection;
mod fanout;
mod wire;

use std::os::unix::io::RawFd;
use std::rc::Rc;
use std::task::Waker;

use ahash::AHashMap;
use slab::Slab;
use smallvec::SmallVec;

pub use self::channels::{ChannelTable, FIXED_CHANNELS};
pub use self::connection::{CloseCode, ConnState, Connection, Partial, SendQueue};
pub use self::fanout::{Broadcast, Delivered, Target, VACANT};
pub use self::wire::{Flush, Wire};

pub use crate::message::Frame;

/// Typed key of a connection: slab index plus the generation of the record
/// that was there when the key was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Slot in the slab.
    pub index: u32,
    /// Generation of the record; a reused slot has a different one.
    pub generation: u32,
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
    pub(super) vacant: Vec<u32>,
    /// Its connections that negotiated permessage-deflate: its messages
    /// are compressed (once each) only while there is one.
    pub deflating: u32,
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
    /// Frames compressed (once per message and channel, for every
    /// compressing subscriber of it).
    pub frames_compressed: u64,
    /// Deliveries that were the compressed twin of a frame.
    pub delivered_compressed: u64,
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

/// One shard's registry.
#[derive(Debug)]
pub struct Registry {
    /// Connection records.
    connections: Slab<Connection>,
    /// Org records.
    orgs: Slab<Org>,
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
    /// No session in `sessions` expires before this (Unix seconds; it may
    /// be earlier than the earliest left, never later).
    first_session_expiry: u64,
    /// Next generation to hand out.
    next_generation: u32,
    /// Connections with newly queued frames, to flush after a batch.
    dirty: Vec<ConnKey>,
    /// Connections the server decided to close, for the reactor to act on.
    closing: Vec<ConnKey>,
    /// Wakes the reactor when `closing` gets an entry.
    reactor_waker: Option<Waker>,
    /// Limits.
    pub limits: RegistryLimits,
    /// Counters.
    pub counters: Counters,
    /// The shard's one compressor for permessage-deflate, with the smallest
    /// frame worth compressing; `None` while compression is off. The
    /// compressor is made on first use, so a shard whose clients never
    /// negotiate the extension does not hold its state.
    compression: Option<(Option<Box<crate::protocol::deflate::Deflater>>, usize)>,
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
            first_session_expiry: u64::MAX,
            next_generation: 1,
            dirty: Vec::new(),
            closing: Vec::new(),
            reactor_waker: None,
            limits,
            counters: Counters::default(),
            compression: None,
        }
    }

    /// Turns permessage-deflate on: staged frames of at least `min_bytes`
    /// get a compressed twin, made once, while their org has a connection
    /// that negotiated the extension.
    pub fn enable_compression(&mut self, min_bytes: usize) {
        self.compression = Some((None, min_bytes));
    }

    /// Notes that connection `key` negotiated permessage-deflate with a
    /// server window of `window_bits` (8–15).
    pub fn set_deflate(&mut self, key: ConnKey, window_bits: u8) {
        assert!((crate::protocol::deflate::WINDOW_BITS_MIN
            ..=crate::protocol::deflate::WINDOW_BITS_MAX)
            .contains(&window_bits));
        let Some(conn) = self.get_mut(key) else {
            return;
        };
        if conn.deflate_window_bits == 0 {
            let org = conn.org;
            self.orgs[org as usize].deflating += 1;
        }
        let conn = &mut self.connections[key.index as usize];
        conn.deflate_window_bits = window_bits;
    }

    /// The org's slab index, created on first use.
    pub(crate) fn org_index(&mut self, org_id: &str) -> u32 {
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
            deflating: 0,
        }) as u32;
        self.org_by_id.insert(id, index);
        index
    }

    /// The org's open connections on this shard.
    pub fn org_connection_count(&self, org_id: &str) -> usize {
        self.org_by_id.get(org_id).map_or(0, |i| {
            let org = &self.orgs[*i as usize];
            org.connections.len() - org.vacant.len()
        })
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
            deflate_window_bits: 0,
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
        if conn.deflates() {
            self.orgs[org as usize].deflating -= 1;
        }
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
            debug_assert!(
                !org_record.vacant.contains(&(position as u32)),
                "a position vacated twice"
            );
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

    /// Number of connections.
    pub fn len(&self) -> usize {
        self.connections.len()
    }

    /// True when the shard holds no connection.
    pub fn is_empty(&self) -> bool {
        self.connections.is_empty()
    }

    /// The org id of connection `key`.
    pub fn org_id_of(&self, key: ConnKey) -> Option<&Rc<str>> {
        self.get(key).map(|conn| &self.orgs[conn.org as usize].id)
    }

    /// True when connection `key` is subscribed to `channel` (live).
    pub fn is_subscribed(&self, key: ConnKey, channel: &str) -> bool {
        self.get(key).is_some_and(|conn| {
            self.orgs[conn.org as usize]
                .channels
                .lookup(channel)
                .is_some_and(|bit| conn.has(bit))
        })
    }

    /// Calls `f` with the key of every connection whose slab index is
    /// `slice` modulo `slices` (the heartbeat's share of one tick), without
    /// collecting them: `f` may change the registry, but the connections it
    /// adds are not visited.
    pub fn for_each_in_slice(
        &mut self,
        slice: usize,
        slices: usize,
        mut f: impl FnMut(&mut Registry, ConnKey),
    ) {
        debug_assert!(slice < slices, "slice {slice} of {slices}");
        let end = self.connections.capacity();
        let mut index = slice;
        while index < end {
            if let Some(conn) = self.connections.get(index) {
                let key = ConnKey {
                    index: index as u32,
                    generation: conn.generation,
                };
                f(self, key);
            }
            index += slices;
        }
    }

    /// True when the server decided to close connections the reactor has
    /// not acted on yet; when there are none, `waker` is woken at the next
    /// request.
    pub fn has_close_requests(&mut self, waker: &Waker) -> bool {
        if self.closing.is_empty() {
            self.reactor_waker = Some(waker.clone());
            return false;
        }
        true
    }

    /// Takes the connections the server decided to close, for the reactor
    /// to act on.
    pub fn take_close_requests(&mut self) -> Vec<ConnKey> {
        std::mem::take(&mut self.closing)
    }

    /// Asks the reactor to close the connection with `code` (the first
    /// request wins).
    pub fn request_close(&mut self, key: ConnKey, code: CloseCode) {
        let Some(conn) = self.get_mut(key) else {
            return;
        };
        if !conn.state.can_send() {
            return;
        }
        conn.state = conn.state.on_close_requested(code);
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
            self.first_session_expiry = self.first_session_expiry.min(expires);
        }
    }

    /// The connections whose session has expired at `now` (Unix seconds:
    /// `now >= expiry`, as a cookie stops verifying). Looks at the
    /// sessions only once the earliest expiry among them has come, so it
    /// costs nothing on most calls.
    pub fn keys_of_expired_sessions(&mut self, now: u64) -> Vec<ConnKey> {
        if now < self.first_session_expiry {
            return Vec::new();
        }
        let mut expired = Vec::new();
        let mut first = u64::MAX;
        for (key, (_, expires)) in &self.sessions {
            if now >= *expires {
                expired.push(*key);
            } else {
                first = first.min(*expires);
            }
        }
        self.first_session_expiry = first;
        expired
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

    /// The session connection `key` signed in with (id, expiry), if a
    /// cookie was its credential.
    pub fn session_of(&self, key: ConnKey) -> Option<(u128, u64)> {
        self.sessions.get(&key).copied()
    }

    /// True when connection `key` is subscribed to `names` and nothing
    /// else, in the order [`Registry::channel_names_of`] lists them.
    pub fn subscribed_to_exactly(&self, key: ConnKey, names: &[String]) -> bool {
        let Some(conn) = self.get(key) else {
            return false;
        };
        let table = &self.orgs[conn.org as usize].channels;
        let mut bits = conn.subscriptions.bits();
        for name in names {
            match bits.next().and_then(|bit| table.name(bit)) {
                Some(have) if have == name => {}
                _ => return false,
            }
        }
        bits.next().is_none()
    }

    /// The names of the channels connection `key` is subscribed to (live).
    pub fn channel_names_of(&self, key: ConnKey) -> Vec<String> {
        let Some(conn) = self.get(key) else {
            return Vec::new();
        };
        let table = &self.orgs[conn.org as usize].channels;
        conn.subscriptions
            .bits()
            .filter_map(|bit| table.name(bit).map(str::to_string))
            .collect()
    }

    /// The latest seq of connection `key`'s org: with no broadcast of the
    /// org being walked, every message up to it was written or queued to
    /// each of its subscribers.
    pub fn org_seq_of(&self, key: ConnKey) -> u64 {
        self.get(key)
            .map_or(0, |conn| self.orgs[conn.org as usize].seq)
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

#[cfg(test)]
mod tests;
