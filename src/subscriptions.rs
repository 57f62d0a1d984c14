//! A connection's subscriptions: a set of its org's channel bits whose
//! size does not grow with the org's channel count.
//!
//! A plain bitmask is as wide as the highest bit set: in an org with many
//! route channels (one `deliveries:<id>` per dashboard user is normal) a
//! connection subscribed to the newest of them carried a mask of thousands
//! of words, and every connection cost memory in proportion to the org's
//! channels. Here the first 64 bits are one inline word — the fixed
//! channels `events`, `deliveries`, `issues` are bits 0–2 and the first
//! 61 route channels of an org come next, so the fan-out's test stays one
//! AND for the common channels — and the bits above are a sorted list
//! (a binary search of at most the connection's own few), present only
//! when there are some: its length is bounded by the connection's own
//! subscriptions (256 by default), never by the org.

/// Bits of an org's channel table that a connection subscribed to.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ChannelSet {
    /// Bits 0 to 63.
    low: u64,
    /// Bits 64 and up, sorted, without duplicates; `None` when empty, so
    /// a connection of the common channels only allocates nothing. Boxed
    /// on purpose: one pointer in every connection record instead of a
    /// `Vec`'s three words; the extra allocation is paid only by
    /// connections with high bits.
    #[allow(clippy::box_collection)]
    high: Option<Box<Vec<u32>>>,
}

impl ChannelSet {
    /// An empty set.
    pub const fn new() -> ChannelSet {
        ChannelSet { low: 0, high: None }
    }

    /// True when `bit` is in the set.
    #[inline]
    pub fn has(&self, bit: u32) -> bool {
        if bit < 64 {
            return self.low & (1u64 << bit) != 0;
        }
        self.high
            .as_ref()
            .is_some_and(|high| high.binary_search(&bit).is_ok())
    }

    /// Adds `bit`.
    pub fn set(&mut self, bit: u32) {
        if bit < 64 {
            self.low |= 1u64 << bit;
            return;
        }
        let high = self.high.get_or_insert_with(Box::default);
        if let Err(at) = high.binary_search(&bit) {
            high.insert(at, bit);
        }
    }

    /// Removes `bit`.
    pub fn clear(&mut self, bit: u32) {
        if bit < 64 {
            self.low &= !(1u64 << bit);
            return;
        }
        let Some(high) = self.high.as_mut() else {
            return;
        };
        if let Ok(at) = high.binary_search(&bit) {
            high.remove(at);
        }
        if high.is_empty() {
            self.high = None;
        }
    }

    /// Every bit in the set, ascending.
    pub fn bits(&self) -> impl Iterator<Item = u32> + '_ {
        (0..64u32)
            .filter(move |bit| self.low & (1u64 << bit) != 0)
            .chain(self.high.iter().flat_map(|high| high.iter().copied()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agrees_with_a_plain_set_for_low_and_high_bits() {
        let mut set = ChannelSet::new();
        let mut plain = std::collections::BTreeSet::new();
        // A deterministic mix of sets and clears over bits below and far
        // above the inline word.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let bit = if state % 3 == 0 {
                (state >> 8) as u32 % 64
            } else {
                (state >> 8) as u32 % 100_000
            };
            if state % 5 < 3 {
                set.set(bit);
                plain.insert(bit);
            } else {
                set.clear(bit);
                plain.remove(&bit);
            }
            assert_eq!(set.has(bit), plain.contains(&bit));
        }
        assert!(set.bits().eq(plain.iter().copied()));
        for bit in plain.clone() {
            set.clear(bit);
        }
        assert_eq!(set, ChannelSet::new(), "emptied: nothing allocated");
    }

    #[test]
    fn costs_two_words_whatever_the_bits() {
        assert_eq!(std::mem::size_of::<ChannelSet>(), 16);
        let mut set = ChannelSet::new();
        set.set(99_999);
        assert!(set.has(99_999));
        assert!(!set.has(99_998));
        assert_eq!(set.high.as_ref().map(|h| h.len()), Some(1));
    }
}
