//! Waiting HTTP requests (long-polls with `wait_ms`, SSE streams): a bound
//! per source address, and noticing a client that left.
//!
//! A waiting request holds a socket and a task for up to 30 s. Without a
//! bound per address, one client opening and dropping polls quickly could
//! pin thousands of descriptors until no org can connect; without noticing
//! its client leave, each abandoned wait kept its socket until the wait
//! ended. So a shard counts the waits of each address (IPv6 per /64, as the
//! rate limits) and answers 429 past its share of `--http-waits-per-ip`
//! (the limit divided by the shards, rounded up: the kernel spreads one
//! client's connections over the shards), and every wait also watches its
//! socket and ends, giving the socket back, as soon as the client closed
//! it.
//!
//! The same per-address count bounds the public listener's connections
//! that are not WebSockets (yet): those reading a request head, plain-HTTP
//! keep-alive connections, polls and streams (`--http-connections-per-ip`).
//! Without it, a client with no key at all could hold every descriptor of
//! the process by connecting and sending nothing, again every 10 s.
//!
//! The table holds an entry only while an address has something counted,
//! so it is bounded by the open sockets.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::IpAddr;
use std::os::unix::io::AsRawFd;
use std::time::Duration;

use glommio::net::TcpStream;

use super::ratelimit::bucket_key;

/// How often a wait whose client already sent more bytes (a pipelined
/// request, which a peek would keep returning) checks for the client's
/// FIN instead.
const GONE_CHECK_MS: u64 = 500;

/// Things in progress (waits, connections) per source address on one
/// shard, with a limit.
#[derive(Debug)]
pub struct AddressLimit {
    /// This shard's share of the limit; `None` = unlimited.
    per_address_max: Option<u32>,
    /// Waits in progress per address (entries with zero are removed).
    waiting: RefCell<HashMap<IpAddr, u32, ahash::RandomState>>,
}

/// One counted wait or connection; uncounted when dropped.
#[derive(Debug)]
pub struct Counted<'a> {
    limit: &'a AddressLimit,
    key: Option<IpAddr>,
}

impl AddressLimit {
    /// This shard's share of `per_ip` (0 = unlimited) over `shards`.
    pub fn new(per_ip: u32, shards: usize) -> AddressLimit {
        assert!(shards >= 1);
        AddressLimit {
            per_address_max: (per_ip > 0).then(|| per_ip.div_ceil(shards as u32).max(1)),
            waiting: RefCell::new(HashMap::default()),
        }
    }

    /// Counts a wait of `peer`; `None` when the address is at its limit
    /// (answer 429). A request without a known peer is not counted.
    pub fn enter(&self, peer: Option<IpAddr>) -> Option<Counted<'_>> {
        let Some(ip) = peer else {
            return Some(Counted {
                limit: self,
                key: None,
            });
        };
        let key = bucket_key(ip);
        let mut waiting = self.waiting.borrow_mut();
        let count = waiting.entry(key).or_insert(0);
        if self.per_address_max.is_some_and(|max| *count >= max) {
            if *count == 0 {
                waiting.remove(&key);
            }
            return None;
        }
        *count += 1;
        Some(Counted {
            limit: self,
            key: Some(key),
        })
    }

    /// The guard of a count kept by [`Counted::keep`] (`key` is what it
    /// returned), to hold or drop again.
    pub fn enter_kept(&self, key: Option<IpAddr>) -> Counted<'_> {
        Counted { limit: self, key }
    }

    /// Ends a count kept by [`Counted::keep`] (`key` is what it returned).
    pub fn release(&self, key: Option<IpAddr>) {
        drop(Counted { limit: self, key });
    }

    /// Waits of `ip` in progress on this shard.
    pub fn count(&self, ip: IpAddr) -> u32 {
        let waiting = self.waiting.borrow();
        waiting.get(&bucket_key(ip)).copied().unwrap_or(0)
    }
}

impl Counted<'_> {
    /// Keeps the count past this guard (for a connection parked in the
    /// reactor, which holds no borrow); [`AddressLimit::release`] with the
    /// returned key ends it.
    pub fn keep(self) -> Option<IpAddr> {
        let key = self.key;
        std::mem::forget(self);
        key
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        let Some(key) = self.key else { return };
        let mut waiting = self.limit.waiting.borrow_mut();
        let count = waiting.get_mut(&key).expect("a counted wait has its entry");
        assert!(*count > 0);
        *count -= 1;
        if *count == 0 {
            waiting.remove(&key);
        }
    }
}

/// Resolves when the client of `stream` has gone: it closed the connection
/// (EOF, also a half-close: a waiting answer has nobody to read it) or it
/// was reset. Event-driven (a pending peek) until the client sends bytes
/// of a next request; from then on a check for the peer's FIN
/// (`POLLRDHUP`) every [`GONE_CHECK_MS`].
pub async fn client_gone(stream: &TcpStream) {
    let mut byte = [0u8; 1];
    match stream.peek(&mut byte).await {
        Ok(0) | Err(_) => return,
        Ok(_) => {}
    }
    loop {
        glommio::timer::sleep(Duration::from_millis(GONE_CHECK_MS)).await;
        let mut poll = libc::pollfd {
            fd: stream.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: a non-blocking poll of one descriptor the stream owns.
        let ready = unsafe { libc::poll(&mut poll, 1, 0) };
        if ready < 0 {
            continue;
        }
        if poll.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_gets_its_share_and_dropped_waits_free_it() {
        let limit = AddressLimit::new(5, 2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let held: Vec<_> = (0..3).map(|_| limit.enter(Some(a)).unwrap()).collect();
        assert!(limit.enter(Some(a)).is_none(), "3 of 5 over 2 shards");
        assert!(limit.enter(Some(b)).is_some(), "another address is apart");
        drop(held);
        assert_eq!(limit.count(a), 0);
        assert!(limit.waiting.borrow().is_empty(), "no entry without waits");
        assert!(limit.enter(Some(a)).is_some());
    }

    #[test]
    fn ipv6_is_counted_per_64_and_zero_is_unlimited() {
        let limit = AddressLimit::new(1, 1);
        let one: IpAddr = "2001:db8::1".parse().unwrap();
        let other: IpAddr = "2001:db8::2".parse().unwrap();
        let _held = limit.enter(Some(one)).unwrap();
        assert!(limit.enter(Some(other)).is_none());
        let unlimited = AddressLimit::new(0, 4);
        let held: Vec<_> = (0..1000).map(|_| unlimited.enter(Some(one))).collect();
        assert!(held.iter().all(Option::is_some));
    }
}
