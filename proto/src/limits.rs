//! Per-source-address limits, as plain state with time passed in.
//!
//! A rendezvous on the internet must not let one address exhaust what everyone
//! shares. Two kinds of limit apply per IP address:
//!
//! - a count of open connections ([`Concurrent`]), taken on accept and given back
//!   when the connection ends;
//! - rates of events (new connections, new codes) as token buckets ([`Rate`]): a
//!   burst of `burst` events, refilled at `per_minute` a minute.
//!
//! Both tables are bounded: an address with nothing open, or whose bucket is full
//! again, carries no information and is forgotten, and a table at its limit
//! refuses new addresses rather than grow (that only happens under a flood from
//! more distinct addresses than the limit, when refusing is the right answer).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

/// Open connections per address.
pub struct Concurrent {
    open: HashMap<IpAddr, u32>,
    per_address: u32,
    max_addresses: usize,
}

impl Concurrent {
    /// At most `per_address` open connections per address, tracking at most
    /// `max_addresses` addresses.
    pub fn new(per_address: u32, max_addresses: usize) -> Self {
        Concurrent {
            open: HashMap::new(),
            per_address,
            max_addresses,
        }
    }

    /// Takes one connection for `ip`; false if `ip` is at its limit (or the
    /// table is full).
    pub fn acquire(&mut self, ip: IpAddr) -> bool {
        let full = self.open.len() >= self.max_addresses;
        match self.open.get_mut(&ip) {
            Some(n) if *n >= self.per_address => false,
            Some(n) => {
                *n += 1;
                true
            }
            None if full => false,
            None => {
                self.open.insert(ip, 1);
                true
            }
        }
    }

    /// Gives back one connection of `ip`.
    pub fn release(&mut self, ip: IpAddr) {
        if let Some(n) = self.open.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.open.remove(&ip);
            }
        }
    }

    /// Open connections of `ip`.
    pub fn open(&self, ip: IpAddr) -> u32 {
        self.open.get(&ip).copied().unwrap_or(0)
    }

    /// Addresses with open connections.
    pub fn addresses(&self) -> usize {
        self.open.len()
    }
}

/// A token bucket per address.
pub struct Rate {
    buckets: HashMap<IpAddr, (f64, Instant)>,
    burst: f64,
    per_second: f64,
    max_addresses: usize,
}

impl Rate {
    /// Bursts of `burst` events per address, refilled at `per_minute` a minute;
    /// at most `max_addresses` addresses tracked.
    pub fn new(burst: u32, per_minute: u32, max_addresses: usize) -> Self {
        Rate {
            buckets: HashMap::new(),
            burst: f64::from(burst.max(1)),
            per_second: f64::from(per_minute) / 60.0,
            max_addresses,
        }
    }

    /// Counts one event of `ip` at `now`; false if over the rate.
    pub fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        if !self.buckets.contains_key(&ip) && self.buckets.len() >= self.max_addresses {
            self.forget_full(now);
            if self.buckets.len() >= self.max_addresses {
                return false;
            }
        }
        let (burst, rate) = (self.burst, self.per_second);
        let (tokens, last) = self.buckets.entry(ip).or_insert((burst, now));
        let elapsed = now.saturating_duration_since(*last).as_secs_f64();
        *tokens = (*tokens + elapsed * rate).min(burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Forgets buckets that have refilled by `now` (they hold no information).
    pub fn forget_full(&mut self, now: Instant) {
        let (burst, rate) = (self.burst, self.per_second);
        self.buckets.retain(|_, (tokens, last)| {
            let elapsed = now.saturating_duration_since(*last).as_secs_f64();
            *tokens + elapsed * rate < burst
        });
    }

    /// Addresses tracked.
    pub fn addresses(&self) -> usize {
        self.buckets.len()
    }
}

/// A pace for a stream of bytes: a bucket of `burst` bytes refilled at
/// `per_sec`. Instead of refusing, it says how long to wait before sending, so a
/// sender held to it slows down (and TCP's flow control passes that on).
#[derive(Debug, Clone)]
pub struct Pace {
    per_sec: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Pace {
    /// A full bucket of `burst` bytes, refilled at `per_sec` bytes a second.
    pub fn new(per_sec: u64, burst: u64, now: Instant) -> Self {
        let burst = burst.max(1) as f64;
        Pace {
            per_sec: per_sec.max(1) as f64,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes `n` bytes; returns how long to wait before sending them (zero if
    /// the bucket held enough).
    pub fn take(&mut self, n: usize, now: Instant) -> std::time::Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.burst);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            std::time::Duration::ZERO
        } else {
            std::time::Duration::from_secs_f64(-self.tokens / self.per_sec)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, n])
    }

    #[test]
    fn concurrent_connections_are_capped_per_address() {
        let mut c = Concurrent::new(2, 10);
        assert!(c.acquire(ip(1)));
        assert!(c.acquire(ip(1)));
        assert!(!c.acquire(ip(1)), "third connection of the same address");
        assert!(c.acquire(ip(2)), "other addresses are not affected");
        c.release(ip(1));
        assert!(c.acquire(ip(1)));
        c.release(ip(1));
        c.release(ip(1));
        c.release(ip(2));
        assert_eq!(c.addresses(), 0, "nothing open, nothing kept");
    }

    #[test]
    fn concurrent_table_is_bounded() {
        let mut c = Concurrent::new(5, 2);
        assert!(c.acquire(ip(1)));
        assert!(c.acquire(ip(2)));
        assert!(!c.acquire(ip(3)));
        assert!(c.acquire(ip(1)), "known addresses still count");
    }

    #[test]
    fn rate_allows_a_burst_then_refills() {
        let t0 = Instant::now();
        let mut r = Rate::new(3, 60, 100);
        for _ in 0..3 {
            assert!(r.allow(ip(1), t0));
        }
        assert!(!r.allow(ip(1), t0), "burst used up");
        assert!(r.allow(ip(2), t0), "per address");
        assert!(!r.allow(ip(1), t0 + Duration::from_millis(500)));
        assert!(
            r.allow(ip(1), t0 + Duration::from_millis(1600)),
            "one a second"
        );
    }

    #[test]
    fn full_buckets_are_forgotten_and_the_table_is_bounded() {
        let t0 = Instant::now();
        let mut r = Rate::new(2, 60, 2);
        assert!(r.allow(ip(1), t0));
        assert!(r.allow(ip(2), t0));
        assert!(!r.allow(ip(3), t0), "table full of live buckets");
        // Two seconds later both buckets are full again: forgotten, room for more.
        assert!(r.allow(ip(3), t0 + Duration::from_secs(2)));
        assert!(r.addresses() <= 2);
    }

    #[test]
    fn a_pace_lets_a_burst_through_then_spaces_the_rest() {
        let t0 = Instant::now();
        let mut pace = Pace::new(1000, 500, t0);
        assert_eq!(pace.take(500, t0), Duration::ZERO);
        // 250 bytes more: a quarter of a second at 1000 B/s.
        assert_eq!(pace.take(250, t0), Duration::from_millis(250));
        // Once that time has passed the debt is paid, and the next 100 bytes
        // wait a tenth of a second again.
        let t1 = t0 + Duration::from_millis(250);
        assert_eq!(pace.take(100, t1), Duration::from_millis(100));
        // A long pause refills the bucket, but only up to the burst.
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!(pace.take(500, t2), Duration::ZERO);
        assert!(pace.take(1, t2) > Duration::ZERO);
    }
}
