//! An org's channel names interned to bit positions: the fixed channels at
//! bits 0-2, the others allocated on first subscribe and freed with their
//! last subscriber (held, not reused, while a broadcast of the org is being
//! walked).

use ahash::AHashMap;

/// The fixed channels every org has; their bits are never freed.
pub const FIXED_CHANNELS: [&str; 3] = ["events", "deliveries", "issues"];

/// An org's channel names interned to bit positions.
#[derive(Debug, Default)]
pub struct ChannelTable {
    /// Name → bit.
    pub(super) by_name: AHashMap<Box<str>, u32>,
    /// Bit → name (None for a free bit).
    pub(super) names: Vec<Option<Box<str>>>,
    /// Bit → number of subscribed connections.
    pub(super) subscribers: Vec<u32>,
    /// Freed bits, reused first so masks stay short.
    pub(super) free: Vec<u32>,
    /// Bits freed while a broadcast of the org was being walked: its
    /// frames still name them, so they are not reused until the walk ends
    /// (a connection subscribing meanwhile to another channel would get
    /// frames of the old one).
    pub(super) held: Vec<u32>,
}

impl ChannelTable {
    pub(super) fn new() -> ChannelTable {
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

    pub(super) fn intern(&mut self, name: &str) -> u32 {
        if let Some(bit) = self.by_name.get(name) {
            return *bit;
        }
        let bit = match self.free.pop() {
            Some(bit) => {
                debug_assert_eq!(self.subscribers[bit as usize], 0, "a free bit in use");
                debug_assert!(!self.held.contains(&bit), "a held bit reused");
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
    pub(super) fn release(&mut self, bit: u32, hold: bool) {
        let count = &mut self.subscribers[bit as usize];
        assert!(*count > 0, "channel subscriber count underflow");
        *count -= 1;
        if *count == 0 && bit as usize >= FIXED_CHANNELS.len() {
            if let Some(name) = self.names[bit as usize].take() {
                self.by_name.remove(&name);
            }
            debug_assert!(
                !self.held.contains(&bit) && !self.free.contains(&bit),
                "bit {bit} freed twice"
            );
            if hold {
                self.held.push(bit);
            } else {
                self.free.push(bit);
            }
        }
    }

    /// Makes the bits freed during walks reusable (no walk is running).
    pub(super) fn unhold(&mut self) {
        self.free.append(&mut self.held);
    }
}
