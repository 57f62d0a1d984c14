//! Token buckets per source address, one table per shard and per limit
//! (upgrades per second, failed authentications per minute).
//!
//! Shards share nothing, and the kernel spreads one client's connections
//! over the shards' SO_REUSEPORT listeners by a hash of the 4-tuple, so each
//! shard enforces its share of a limit: rate and burst divided by the number
//! of shards (see [`Bucket::per_shard`]). Over many connections a client
//! gets the configured rate in total, give or take the unevenness of the hash.
//!
//! IPv6 clients are counted per /64, the smallest block a site is usually
//! given, so one host cannot dodge the limit by cycling its own addresses.
//! The table is bounded: when it is full, buckets that have refilled (and so
//! hold no information) are dropped; if none has, the table is cleared,
//! which fails open — a flood of fresh addresses must not lock out everyone.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

/// A limit: `rate_per_sec` tokens are added per second up to `burst`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    /// Tokens added per second.
    pub rate_per_sec: f64,
    /// Most tokens held; also what a new client starts with.
    pub burst: f64,
}

impl Bucket {
    /// This shard's share of a process-wide limit; at least one token of
    /// burst so that a limit never refuses everything on some shard.
    pub fn per_shard(rate_per_sec: f64, burst: f64, shards: usize) -> Bucket {
        assert!(shards >= 1);
        assert!(rate_per_sec > 0.0);
        let shards = shards as f64;
        Bucket {
            rate_per_sec: rate_per_sec / shards,
            burst: (burst / shards).max(1.0),
        }
    }
}

/// Where one address stands.
#[derive(Debug, Clone, Copy)]
struct State {
    /// Tokens left at `updated`.
    tokens: f64,
    /// When `tokens` was computed.
    updated: Instant,
}

/// Buckets by source address, for one limit on one shard.
#[derive(Debug)]
pub struct IpBuckets {
    /// The limit; `None` disables it (every request passes, nothing is kept).
    limit: Option<Bucket>,
    /// State per address (IPv6 masked to /64).
    table: HashMap<IpAddr, State, ahash::RandomState>,
    /// Most addresses tracked at once.
    entries_max: usize,
}

/// The key an address is counted under.
pub(crate) fn bucket_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(prefix.into())
            }
        },
    }
}

impl IpBuckets {
    /// A table for `limit` (`None`: unlimited) holding at most `entries_max`
    /// addresses.
    pub fn new(limit: Option<Bucket>, entries_max: usize) -> IpBuckets {
        assert!(entries_max >= 1);
        IpBuckets {
            limit,
            table: HashMap::default(),
            entries_max,
        }
    }

    fn refill(limit: Bucket, state: &mut State, now: Instant) {
        let elapsed = now.saturating_duration_since(state.updated).as_secs_f64();
        state.tokens = (state.tokens + elapsed * limit.rate_per_sec).min(limit.burst);
        state.updated = now;
    }

    fn make_room(&mut self, limit: Bucket, now: Instant) {
        if self.table.len() < self.entries_max {
            return;
        }
        self.table.retain(|_, state| {
            let elapsed = now.saturating_duration_since(state.updated).as_secs_f64();
            state.tokens + elapsed * limit.rate_per_sec < limit.burst
        });
        if self.table.len() >= self.entries_max {
            self.table.clear();
        }
    }

    /// Takes one token for `ip`; false when its bucket is empty.
    pub fn take(&mut self, ip: IpAddr, now: Instant) -> bool {
        let Some(limit) = self.limit else {
            return true;
        };
        let key = bucket_key(ip);
        if !self.table.contains_key(&key) {
            self.make_room(limit, now);
        }
        let state = self.table.entry(key).or_insert(State {
            tokens: limit.burst,
            updated: now,
        });
        Self::refill(limit, state, now);
        if state.tokens >= 1.0 {
            state.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Addresses tracked now.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// True when no address is tracked.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn burst_then_refused_then_refilled() {
        let mut buckets = IpBuckets::new(
            Some(Bucket {
                rate_per_sec: 2.0,
                burst: 4.0,
            }),
            16,
        );
        let start = Instant::now();
        for _ in 0..4 {
            assert!(buckets.take(ip("10.0.0.1"), start));
        }
        assert!(!buckets.take(ip("10.0.0.1"), start));
        // Another address has its own bucket.
        assert!(buckets.take(ip("10.0.0.2"), start));
        // Half a second later one token is back, and only one.
        let later = start + Duration::from_millis(500);
        assert!(buckets.take(ip("10.0.0.1"), later));
        assert!(!buckets.take(ip("10.0.0.1"), later));
        // Never more than the burst, however long the wait.
        let much_later = later + Duration::from_secs(3600);
        for _ in 0..4 {
            assert!(buckets.take(ip("10.0.0.1"), much_later));
        }
        assert!(!buckets.take(ip("10.0.0.1"), much_later));
    }

    #[test]
    fn unlimited_keeps_nothing() {
        let mut buckets = IpBuckets::new(None, 1);
        let now = Instant::now();
        for _ in 0..1000 {
            assert!(buckets.take(ip("10.0.0.1"), now));
        }
        assert!(buckets.is_empty());
    }

    #[test]
    fn ipv6_counts_per_64() {
        let mut buckets = IpBuckets::new(
            Some(Bucket {
                rate_per_sec: 1.0,
                burst: 1.0,
            }),
            16,
        );
        let now = Instant::now();
        assert!(buckets.take(ip("2001:db8::1"), now));
        assert!(!buckets.take(ip("2001:db8::ffff:1234"), now));
        assert!(buckets.take(ip("2001:db8:0:1::1"), now));
        // A v4-mapped address counts as the v4 address.
        assert!(buckets.take(ip("192.0.2.1"), now));
        assert!(!buckets.take(ip("::ffff:192.0.2.1"), now));
    }

    #[test]
    fn table_stays_bounded() {
        let mut buckets = IpBuckets::new(
            Some(Bucket {
                rate_per_sec: 1.0,
                burst: 2.0,
            }),
            8,
        );
        let now = Instant::now();
        for n in 0..1000u32 {
            buckets.take(IpAddr::V4(n.into()), now);
            assert!(buckets.len() <= 8);
        }
    }

    #[test]
    fn refilled_entries_are_dropped_first() {
        let limit = Bucket {
            rate_per_sec: 1.0,
            burst: 2.0,
        };
        let mut buckets = IpBuckets::new(Some(limit), 2);
        let start = Instant::now();
        assert!(buckets.take(ip("10.0.0.1"), start));
        assert!(buckets.take(ip("10.0.0.1"), start));
        assert!(buckets.take(ip("10.0.0.2"), start));
        // 10.0.0.2 has refilled after 1 s; 10.0.0.1 has not (1 of 2 tokens).
        let later = start + Duration::from_secs(1);
        assert!(buckets.take(ip("10.0.0.3"), later));
        assert_eq!(buckets.len(), 2);
        assert!(buckets.take(ip("10.0.0.1"), later));
        assert!(!buckets.take(ip("10.0.0.1"), later));
    }

    #[test]
    fn per_shard_share() {
        let bucket = Bucket::per_shard(200.0, 400.0, 2);
        assert_eq!(bucket.rate_per_sec, 100.0);
        assert_eq!(bucket.burst, 200.0);
        assert_eq!(Bucket::per_shard(1.0, 1.0, 4).burst, 1.0);
    }
}
