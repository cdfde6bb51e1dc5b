//! Per-source limits, as plain state with time passed in.
//!
//! A rendezvous on the internet must not let one source exhaust what everyone
//! shares. Two kinds of limit apply:
//!
//! - a count of things open at once ([`Concurrent`]: connections, relays), taken
//!   when one opens and given back when it ends;
//! - rates of events (new connections, new codes) as token buckets ([`Rate`]): a
//!   burst of `burst` events, refilled at `per_minute` a minute.
//!
//! A "source" is not one exact IP address: whoever holds many addresses of one
//! network would multiply every limit by their number. So each limit counts at two
//! [`Scope`]s at once ([`PerScope`]):
//!
//! 1. The *address*: an IPv4 address, or an IPv6 /64 (one subscriber's LAN
//!    usually gets a whole /64 and its hosts pick addresses in it at will, so for
//!    IPv6 the /64 is what one address is for IPv4).
//! 2. The *network* around it: an IPv4 /24 or an IPv6 /48 (a site), with a larger
//!    limit, since a /24 may hold many users of a carrier NAT or a campus.
//!
//! An event is allowed only if both scopes allow it; a refusal ([`Refused`])
//! says which scope and which prefix hit its limit, so the message can say so.
//!
//! Every table is bounded: an entry with nothing open, or whose bucket is full
//! again, carries no information and is forgotten, and a table at its limit
//! refuses new entries rather than grow (that only happens under a flood from
//! more distinct sources than the limit, when refusing is the right answer).

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Instant;

/// Prefix length of an IPv4 network: a /24 is the smallest block routed on the
/// internet, so a host with many IPv4 addresses usually has them within one.
pub const IPV4_NETWORK_BITS: u8 = 24;

/// Prefix length that stands for one IPv6 "address": a subscriber's LAN is a
/// /64 and any host on it may use any address of it (privacy addresses change
/// daily), so counting exact IPv6 addresses would count nothing.
pub const IPV6_ADDRESS_BITS: u8 = 64;

/// Prefix length of an IPv6 network: a /48 is a site (the largest block an ISP
/// usually hands one customer), the IPv6 counterpart of an IPv4 /24.
pub const IPV6_NETWORK_BITS: u8 = 48;

/// Which share of the internet a limit counts together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// One subscriber: an IPv4 address, or an IPv6 /64.
    Address,
    /// The network around it: an IPv4 /24, or an IPv6 /48.
    Network,
}

impl Scope {
    /// Both scopes, narrowest first.
    pub const ALL: [Scope; 2] = [Scope::Address, Scope::Network];

    /// The prefix length of this scope for an address of `ip`'s family.
    pub fn bits(self, ip: IpAddr) -> u8 {
        match (self, ip) {
            (Scope::Address, IpAddr::V4(_)) => 32,
            (Scope::Network, IpAddr::V4(_)) => IPV4_NETWORK_BITS,
            (Scope::Address, IpAddr::V6(_)) => IPV6_ADDRESS_BITS,
            (Scope::Network, IpAddr::V6(_)) => IPV6_NETWORK_BITS,
        }
    }
}

/// An address or a network prefix: what one entry of a limit's table counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Prefix {
    network: IpAddr,
    bits: u8,
}

impl Prefix {
    /// The prefix of `ip` at `scope`: `ip` with the bits past the scope's length
    /// cleared. An IPv4-mapped IPv6 address counts as the IPv4 address it is.
    pub fn of(ip: IpAddr, scope: Scope) -> Prefix {
        let ip = ip.to_canonical();
        let bits = scope.bits(ip);
        let network = match ip {
            IpAddr::V4(v4) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask))
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
        };
        Prefix { network, bits }
    }

    /// The first address of the prefix.
    pub fn network(&self) -> IpAddr {
        self.network
    }

    /// The prefix length.
    pub fn bits(&self) -> u8 {
        self.bits
    }

    /// Whether the prefix is one single address (an IPv4 /32).
    pub fn is_single_address(&self) -> bool {
        match self.network {
            IpAddr::V4(_) => self.bits == 32,
            IpAddr::V6(_) => self.bits == 128,
        }
    }
}

/// `192.0.2.7` for a single address, `192.0.2.0/24` or `2001:db8::/64` for a
/// network.
impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_single_address() {
            write!(f, "{}", self.network)
        } else {
            write!(f, "{}/{}", self.network, self.bits)
        }
    }
}

/// Which limit refused an event: its scope, the prefix that is at its limit, and
/// the limit (a count for [`Concurrent`], events a minute for [`Rate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// The scope whose limit was hit.
    pub scope: Scope,
    /// The address or network at its limit.
    pub prefix: Prefix,
    /// The limit that applies to it.
    pub limit: u32,
}

impl Refused {
    /// Who is refused, for a message: `your address 192.0.2.7` or
    /// `your network 192.0.2.0/24` (an IPv6 /64 is a network too, in words).
    pub fn whose(&self) -> String {
        let noun = if self.prefix.is_single_address() {
            "address"
        } else {
            "network"
        };
        format!("your {noun} {}", self.prefix)
    }
}

/// Things open at once (connections, relays), per address or network.
pub struct Concurrent {
    open: HashMap<Prefix, u32>,
    limit: u32,
    max_entries: usize,
}

impl Concurrent {
    /// At most `limit` open per prefix, tracking at most `max_entries` prefixes.
    pub fn new(limit: u32, max_entries: usize) -> Self {
        Concurrent {
            open: HashMap::new(),
            limit,
            max_entries,
        }
    }

    /// Whether `key` may take one more (it is below its limit, and the table has
    /// room for it if it is new).
    fn has_room(&self, key: &Prefix) -> bool {
        match self.open.get(key) {
            Some(&n) => n < self.limit,
            None => self.limit > 0 && self.open.len() < self.max_entries,
        }
    }

    /// Takes one for `key`; false if `key` is at its limit (or the table is
    /// full).
    pub fn acquire(&mut self, key: Prefix) -> bool {
        if !self.has_room(&key) {
            return false;
        }
        *self.open.entry(key).or_insert(0) += 1;
        true
    }

    /// Gives back one of `key`.
    pub fn release(&mut self, key: Prefix) {
        if let Some(n) = self.open.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.open.remove(&key);
            }
        }
    }

    /// How many `key` holds.
    pub fn open(&self, key: Prefix) -> u32 {
        self.open.get(&key).copied().unwrap_or(0)
    }

    /// Prefixes holding any.
    pub fn entries(&self) -> usize {
        self.open.len()
    }
}

/// A token bucket per address or network.
pub struct Rate {
    buckets: HashMap<Prefix, (f64, Instant)>,
    burst: f64,
    per_minute: u32,
    per_second: f64,
    max_entries: usize,
}

impl Rate {
    /// Bursts of `burst` events per prefix, refilled at `per_minute` a minute; at
    /// most `max_entries` prefixes tracked.
    pub fn new(burst: u32, per_minute: u32, max_entries: usize) -> Self {
        Rate {
            buckets: HashMap::new(),
            burst: f64::from(burst.max(1)),
            per_minute,
            per_second: f64::from(per_minute) / 60.0,
            max_entries,
        }
    }

    /// Refills `key`'s bucket up to `now` and returns it; `None` if `key` is new
    /// and the table is full even after forgetting the full buckets.
    fn bucket(&mut self, key: Prefix, now: Instant) -> Option<&mut f64> {
        if !self.buckets.contains_key(&key) && self.buckets.len() >= self.max_entries {
            self.forget_full(now);
            if self.buckets.len() >= self.max_entries {
                return None;
            }
        }
        let (burst, rate) = (self.burst, self.per_second);
        let (tokens, last) = self.buckets.entry(key).or_insert((burst, now));
        let elapsed = now.saturating_duration_since(*last).as_secs_f64();
        *tokens = (*tokens + elapsed * rate).min(burst);
        *last = now;
        Some(tokens)
    }

    /// Whether `key` has an event left at `now`, without counting one.
    fn has_token(&mut self, key: Prefix, now: Instant) -> bool {
        self.bucket(key, now).is_some_and(|tokens| *tokens >= 1.0)
    }

    /// Counts one event of `key` at `now`; false if over the rate.
    pub fn allow(&mut self, key: Prefix, now: Instant) -> bool {
        match self.bucket(key, now) {
            Some(tokens) if *tokens >= 1.0 => {
                *tokens -= 1.0;
                true
            }
            _ => false,
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

    /// Prefixes tracked.
    pub fn entries(&self) -> usize {
        self.buckets.len()
    }
}

/// One limit applied at both [`Scope`]s of a source: a table per address and a
/// table per network, each with its own limit.
pub struct PerScope<L> {
    address: L,
    network: L,
}

impl<L> PerScope<L> {
    fn at(&mut self, scope: Scope) -> &mut L {
        match scope {
            Scope::Address => &mut self.address,
            Scope::Network => &mut self.network,
        }
    }
}

impl PerScope<Concurrent> {
    /// At most `per_address` open per address and `per_network` per network;
    /// each table tracks at most `max_entries` prefixes.
    pub fn new(per_address: u32, per_network: u32, max_entries: usize) -> Self {
        PerScope {
            address: Concurrent::new(per_address, max_entries),
            network: Concurrent::new(per_network, max_entries),
        }
    }

    /// Takes one for `ip` at both scopes, or at neither if either is at its
    /// limit (the narrowest such scope is the refusal).
    pub fn acquire(&mut self, ip: IpAddr) -> Result<(), Refused> {
        for scope in Scope::ALL {
            let table = self.at(scope);
            let prefix = Prefix::of(ip, scope);
            if !table.has_room(&prefix) {
                let limit = table.limit;
                return Err(Refused {
                    scope,
                    prefix,
                    limit,
                });
            }
        }
        for scope in Scope::ALL {
            self.at(scope).acquire(Prefix::of(ip, scope));
        }
        Ok(())
    }

    /// Gives back one of `ip` at both scopes.
    pub fn release(&mut self, ip: IpAddr) {
        for scope in Scope::ALL {
            self.at(scope).release(Prefix::of(ip, scope));
        }
    }

    /// How many are open for `ip`'s prefix at `scope`.
    pub fn open(&self, ip: IpAddr, scope: Scope) -> u32 {
        let table = match scope {
            Scope::Address => &self.address,
            Scope::Network => &self.network,
        };
        table.open(Prefix::of(ip, scope))
    }

    /// Prefixes tracked, both scopes together.
    pub fn entries(&self) -> usize {
        self.address.entries() + self.network.entries()
    }
}

/// A rate limit's settings at one scope: a burst, then so many a minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Events allowed at once before the rate applies.
    pub burst: u32,
    /// Events a minute after the burst.
    pub per_minute: u32,
}

impl RateLimit {
    /// This limit multiplied by `n` (burst and rate), saturating.
    pub fn times(self, n: u32) -> RateLimit {
        RateLimit {
            burst: self.burst.saturating_mul(n),
            per_minute: self.per_minute.saturating_mul(n),
        }
    }
}

impl PerScope<Rate> {
    /// Rates `per_address` per address and `per_network` per network; each table
    /// tracks at most `max_entries` prefixes.
    pub fn new(per_address: RateLimit, per_network: RateLimit, max_entries: usize) -> Self {
        let rate = |l: RateLimit| Rate::new(l.burst, l.per_minute, max_entries);
        PerScope {
            address: rate(per_address),
            network: rate(per_network),
        }
    }

    /// Counts one event of `ip` at `now` at both scopes, or at neither if either
    /// is over its rate (the narrowest such scope is the refusal).
    pub fn allow(&mut self, ip: IpAddr, now: Instant) -> Result<(), Refused> {
        for scope in Scope::ALL {
            let table = self.at(scope);
            let prefix = Prefix::of(ip, scope);
            if !table.has_token(prefix, now) {
                let limit = table.per_minute;
                return Err(Refused {
                    scope,
                    prefix,
                    limit,
                });
            }
        }
        for scope in Scope::ALL {
            self.at(scope).allow(Prefix::of(ip, scope), now);
        }
        Ok(())
    }

    /// Forgets the buckets that have refilled by `now`, at both scopes.
    pub fn forget_full(&mut self, now: Instant) {
        self.address.forget_full(now);
        self.network.forget_full(now);
    }

    /// Prefixes tracked, both scopes together.
    pub fn entries(&self) -> usize {
        self.address.entries() + self.network.entries()
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

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    fn v4(n: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, n])
    }

    fn key(n: u8) -> Prefix {
        Prefix::of(v4(n), Scope::Address)
    }

    #[test]
    fn prefixes_are_the_address_or_its_network() {
        let cases = [
            ("192.0.2.77", Scope::Address, "192.0.2.77"),
            ("192.0.2.77", Scope::Network, "192.0.2.0/24"),
            ("::ffff:192.0.2.77", Scope::Network, "192.0.2.0/24"),
            ("2001:db8:1:2:3:4:5:6", Scope::Address, "2001:db8:1:2::/64"),
            ("2001:db8:1:2:3:4:5:6", Scope::Network, "2001:db8:1::/48"),
        ];
        for (addr, scope, shown) in cases {
            assert_eq!(Prefix::of(ip(addr), scope).to_string(), shown, "{addr}");
        }
        // Two addresses of one /64 are one "address"; of one /48, one network.
        let a = ip("2001:db8:1:2::1");
        let b = ip("2001:db8:1:2:ffff::9");
        let c = ip("2001:db8:1:3::1");
        assert_eq!(Prefix::of(a, Scope::Address), Prefix::of(b, Scope::Address));
        assert_ne!(Prefix::of(a, Scope::Address), Prefix::of(c, Scope::Address));
        assert_eq!(Prefix::of(a, Scope::Network), Prefix::of(c, Scope::Network));
        assert_ne!(
            Prefix::of(v4(1), Scope::Address),
            Prefix::of(v4(2), Scope::Address)
        );
        assert_eq!(
            Prefix::of(v4(1), Scope::Network),
            Prefix::of(v4(2), Scope::Network)
        );
        assert_eq!(Prefix::of(v4(1), Scope::Network).bits(), 24);
    }

    #[test]
    fn refusals_say_whose_limit() {
        let refused = |addr: &str, scope| Refused {
            scope,
            prefix: Prefix::of(ip(addr), scope),
            limit: 1,
        };
        assert_eq!(
            refused("192.0.2.7", Scope::Address).whose(),
            "your address 192.0.2.7"
        );
        assert_eq!(
            refused("192.0.2.7", Scope::Network).whose(),
            "your network 192.0.2.0/24"
        );
        assert_eq!(
            refused("2001:db8::7", Scope::Address).whose(),
            "your network 2001:db8::/64"
        );
    }

    #[test]
    fn concurrent_connections_are_capped_per_key() {
        let mut c = Concurrent::new(2, 10);
        assert!(c.acquire(key(1)));
        assert!(c.acquire(key(1)));
        assert!(!c.acquire(key(1)), "third connection of the same address");
        assert!(c.acquire(key(2)), "other addresses are not affected");
        c.release(key(1));
        assert!(c.acquire(key(1)));
        c.release(key(1));
        c.release(key(1));
        c.release(key(2));
        assert_eq!(c.entries(), 0, "nothing open, nothing kept");
    }

    #[test]
    fn concurrent_table_is_bounded() {
        let mut c = Concurrent::new(5, 2);
        assert!(c.acquire(key(1)));
        assert!(c.acquire(key(2)));
        assert!(!c.acquire(key(3)));
        assert!(c.acquire(key(1)), "known addresses still count");
    }

    #[test]
    fn a_zero_limit_refuses_everything() {
        let mut c = Concurrent::new(0, 10);
        assert!(!c.acquire(key(1)));
        assert_eq!(c.entries(), 0);
    }

    #[test]
    fn rate_allows_a_burst_then_refills() {
        let t0 = Instant::now();
        let mut r = Rate::new(3, 60, 100);
        for _ in 0..3 {
            assert!(r.allow(key(1), t0));
        }
        assert!(!r.allow(key(1), t0), "burst used up");
        assert!(r.allow(key(2), t0), "per address");
        assert!(!r.allow(key(1), t0 + Duration::from_millis(500)));
        assert!(
            r.allow(key(1), t0 + Duration::from_millis(1600)),
            "one a second"
        );
    }

    #[test]
    fn full_buckets_are_forgotten_and_the_table_is_bounded() {
        let t0 = Instant::now();
        let mut r = Rate::new(2, 60, 2);
        assert!(r.allow(key(1), t0));
        assert!(r.allow(key(2), t0));
        assert!(!r.allow(key(3), t0), "table full of live buckets");
        // Two seconds later both buckets are full again: forgotten, room for more.
        assert!(r.allow(key(3), t0 + Duration::from_secs(2)));
        assert!(r.entries() <= 2);
    }

    #[test]
    fn open_counts_per_address_and_per_network() {
        // 2 per address, 5 per network.
        let mut c = PerScope::<Concurrent>::new(2, 5, 100);
        assert!(c.acquire(v4(1)).is_ok());
        assert!(c.acquire(v4(1)).is_ok());
        let refused = c.acquire(v4(1)).expect_err("address at its limit");
        assert_eq!(refused.scope, Scope::Address);
        assert_eq!(refused.prefix.to_string(), "192.0.2.1");
        assert_eq!(refused.limit, 2);
        // Other addresses of the network fill it up to its own limit.
        assert!(c.acquire(v4(2)).is_ok());
        assert!(c.acquire(v4(2)).is_ok());
        assert!(c.acquire(v4(3)).is_ok());
        let refused = c.acquire(v4(4)).expect_err("network at its limit");
        assert_eq!(refused.scope, Scope::Network);
        assert_eq!(refused.prefix.to_string(), "192.0.2.0/24");
        assert_eq!(refused.limit, 5);
        assert_eq!(c.open(v4(4), Scope::Address), 0, "a refusal takes nothing");
        assert_eq!(c.open(v4(4), Scope::Network), 5);
        // Another network is not affected.
        assert!(c.acquire(ip("198.51.100.1")).is_ok());
        // Giving one back anywhere in the network frees a slot for any address.
        c.release(v4(2));
        assert!(c.acquire(v4(4)).is_ok());
        for n in [1, 1, 2, 3, 4] {
            c.release(v4(n));
        }
        c.release(ip("198.51.100.1"));
        assert_eq!(c.entries(), 0, "nothing open, nothing kept");
    }

    #[test]
    fn ipv6_addresses_of_one_subscriber_count_as_one() {
        // 2 per /64, 3 per /48.
        let mut c = PerScope::<Concurrent>::new(2, 3, 100);
        assert!(c.acquire(ip("2001:db8:1:1::1")).is_ok());
        assert!(c.acquire(ip("2001:db8:1:1::2")).is_ok());
        let refused = c
            .acquire(ip("2001:db8:1:1:aaaa::3"))
            .expect_err("a new address of the same /64");
        assert_eq!(refused.scope, Scope::Address);
        assert_eq!(refused.prefix.to_string(), "2001:db8:1:1::/64");
        assert!(c.acquire(ip("2001:db8:1:2::1")).is_ok(), "another /64");
        let refused = c
            .acquire(ip("2001:db8:1:3::1"))
            .expect_err("a third /64 of the same /48");
        assert_eq!(refused.scope, Scope::Network);
        assert_eq!(refused.prefix.to_string(), "2001:db8:1::/48");
        assert!(c.acquire(ip("2001:db8:2::1")).is_ok(), "another /48");
    }

    #[test]
    fn rates_count_per_address_and_per_network_with_time_passed_in() {
        let t0 = Instant::now();
        let address = RateLimit {
            burst: 2,
            per_minute: 60,
        };
        let mut r = PerScope::<Rate>::new(address, address.times(2), 100);
        assert!(r.allow(v4(1), t0).is_ok());
        assert!(r.allow(v4(1), t0).is_ok());
        let refused = r.allow(v4(1), t0).expect_err("address burst used up");
        assert_eq!((refused.scope, refused.limit), (Scope::Address, 60));
        assert!(r.allow(v4(2), t0).is_ok());
        assert!(r.allow(v4(3), t0).is_ok());
        let refused = r.allow(v4(4), t0).expect_err("network burst used up");
        assert_eq!((refused.scope, refused.limit), (Scope::Network, 120));
        assert_eq!(refused.prefix.to_string(), "192.0.2.0/24");
        // The network refills at two a second, each address at one a second.
        let t1 = t0 + Duration::from_millis(1100);
        assert!(r.allow(v4(4), t1).is_ok());
        assert!(r.allow(v4(5), t1).is_ok());
        assert!(r.allow(v4(6), t1).is_err());
        assert!(r.allow(ip("198.51.100.1"), t1).is_ok(), "another network");
        // A refusal at the network takes no token from the address: address 7
        // still has its whole burst once the network has refilled.
        let t2 = t1 + Duration::from_secs(60);
        r.forget_full(t2);
        assert_eq!(r.entries(), 0, "all buckets full again, all forgotten");
        assert!(r.allow(v4(7), t2).is_ok());
        assert!(r.allow(v4(7), t2).is_ok());
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
