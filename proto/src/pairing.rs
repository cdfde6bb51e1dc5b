//! The rendezvous' pairing table, as a plain state machine with time passed in.
//!
//! 1. The first peer to join with a code waits in a room (with a value the server
//!    needs to reach it later, e.g. a channel).
//! 2. The second peer with that code pairs with it: the room turns `Paired` and the
//!    waiting peer's value is handed to the caller.
//! 3. A third peer with the code is told it is in use, until both paired peers have
//!    left the room (or [`Rooms::expire`] clears it after its hold time).
//! 4. A waiting peer nobody joins is expired after its time-to-live.
//!
//! A peer starting a new code asks the server for a nameplate first: a free
//! number drawn at random ([`Rooms::random_free_number`]) from a space many times
//! larger than the rooms in use, so nameplates cannot be predicted or found by
//! trying small numbers.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::codes::MAX_NAMEPLATE_DIGITS;

/// Numbers a nameplate is drawn from, at least, per room in use: a stranger
/// trying nameplates at random hits a room (and gets one online guess at its
/// words) at most once in this many tries, and the rate limits on new codes make
/// each try cost a connection.
pub const NAMEPLATE_SPACE_PER_ROOM: u64 = 64;

/// Fewest digits of a nameplate's space: 1 to 999 under light use, short to read
/// out, and still a thousand numbers to guess from.
pub const MIN_NAMEPLATE_DIGITS: u32 = 3;

/// Random draws for a free nameplate before taking the next free number after
/// the last one. With at most one number in 64 in use, 16 draws all hitting a
/// room happens about once in 10^28.
const NAMEPLATE_DRAWS: usize = 16;

/// Identifies one connection to the server.
pub type ConnId = u64;

/// What [`Rooms::join`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Join<V> {
    /// First with this code: wait for the other peer.
    Waiting,
    /// Paired with the peer that was waiting; here is its id and value.
    Paired {
        /// The waiting peer's connection.
        other: ConnId,
        /// The value it stored when it joined.
        value: V,
    },
    /// Two peers already use this code.
    InUse,
    /// The table holds its maximum number of rooms.
    Full,
}

enum Room<V> {
    Waiting {
        id: ConnId,
        value: V,
        expires: Instant,
    },
    Paired {
        remaining: Vec<ConnId>,
        expires: Instant,
    },
}

/// Rooms by code.
pub struct Rooms<V> {
    rooms: HashMap<String, Room<V>>,
    max_rooms: usize,
    wait_ttl: Duration,
    paired_hold: Duration,
}

impl<V> Rooms<V> {
    /// An empty table holding at most `max_rooms` rooms. A waiting peer expires after
    /// `wait_ttl`; a paired room stays reserved for at most `paired_hold` even if its
    /// peers never leave it.
    pub fn new(max_rooms: usize, wait_ttl: Duration, paired_hold: Duration) -> Self {
        Rooms {
            rooms: HashMap::new(),
            max_rooms,
            wait_ttl,
            paired_hold,
        }
    }

    /// Peer `id` joins `code` at `now`.
    pub fn join(&mut self, code: &str, id: ConnId, value: V, now: Instant) -> Join<V> {
        match self.rooms.remove(code) {
            None => {
                if self.rooms.len() >= self.max_rooms {
                    return Join::Full;
                }
                self.rooms.insert(
                    code.to_owned(),
                    Room::Waiting {
                        id,
                        value,
                        expires: now + self.wait_ttl,
                    },
                );
                Join::Waiting
            }
            Some(Room::Waiting {
                id: other, value, ..
            }) => {
                self.rooms.insert(
                    code.to_owned(),
                    Room::Paired {
                        remaining: vec![other, id],
                        expires: now + self.paired_hold,
                    },
                );
                Join::Paired { other, value }
            }
            Some(paired @ Room::Paired { .. }) => {
                self.rooms.insert(code.to_owned(), paired);
                Join::InUse
            }
        }
    }

    /// Peer `id` is done with `code` (disconnected, or finished after the go).
    /// Returns true if it was waiting there (and so was never paired).
    pub fn leave(&mut self, code: &str, id: ConnId) -> bool {
        let Some(room) = self.rooms.get_mut(code) else {
            return false;
        };
        match room {
            Room::Waiting { id: waiting, .. } if *waiting == id => {
                self.rooms.remove(code);
                true
            }
            Room::Waiting { .. } => false,
            Room::Paired { remaining, .. } => {
                remaining.retain(|&r| r != id);
                if remaining.is_empty() {
                    self.rooms.remove(code);
                }
                false
            }
        }
    }

    /// Removes rooms whose time is up at `now`; returns the waiting peers that
    /// expired, so the server can tell them.
    pub fn expire(&mut self, now: Instant) -> Vec<(ConnId, V)> {
        let due: Vec<String> = self
            .rooms
            .iter()
            .filter(|(_, room)| match room {
                Room::Waiting { expires, .. } | Room::Paired { expires, .. } => *expires <= now,
            })
            .map(|(code, _)| code.clone())
            .collect();
        let mut expired = Vec::new();
        for code in due {
            if let Some(Room::Waiting { id, value, .. }) = self.rooms.remove(&code) {
                expired.push((id, value));
            }
        }
        expired
    }

    /// The earliest instant at which [`Rooms::expire`] has something to do.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.rooms
            .values()
            .map(|room| match room {
                Room::Waiting { expires, .. } | Room::Paired { expires, .. } => *expires,
            })
            .min()
    }

    /// The numbers a new nameplate is drawn from now, `1..space`: `space` is the
    /// smallest power of ten at least [`NAMEPLATE_SPACE_PER_ROOM`] times the rooms
    /// in use (counting the new one), never below `10^`[`MIN_NAMEPLATE_DIGITS`],
    /// never above the longest nameplate a hello may carry. So nameplates stay as
    /// short as the guessing odds allow, and grow a digit as use grows.
    pub fn nameplate_space(&self) -> u64 {
        let wanted = NAMEPLATE_SPACE_PER_ROOM.saturating_mul(self.rooms.len() as u64 + 1);
        let mut space = 10u64.pow(MIN_NAMEPLATE_DIGITS);
        let most = 10u64.pow(MAX_NAMEPLATE_DIGITS as u32);
        while space < wanted && space < most {
            space *= 10;
        }
        space
    }

    /// A nameplate for a new code: a number drawn at random from
    /// [`Rooms::nameplate_space`] that is not a room's name, so a stranger can
    /// neither predict it nor expect to hit a room by guessing (at most one
    /// number in [`NAMEPLATE_SPACE_PER_ROOM`] is in use). `below(n)` must draw a
    /// uniform number in `0..n` (the caller owns the randomness, so this stays
    /// free of I/O and testable). `None` when the table is full.
    pub fn random_free_number(&self, mut below: impl FnMut(u64) -> u64) -> Option<String> {
        if self.rooms.len() >= self.max_rooms {
            return None;
        }
        // 1..space: no leading zeros, no "0".
        let numbers = self.nameplate_space() - 1;
        let mut n = 0;
        for _ in 0..NAMEPLATE_DRAWS {
            n = below(numbers) % numbers;
            let name = (n + 1).to_string();
            if !self.rooms.contains_key(&name) {
                return Some(name);
            }
        }
        // Only with a broken `below` or a space crowded beyond the longest
        // nameplate: the next free number after the last draw. Among `len + 1`
        // consecutive numbers at least one is free.
        (1..=self.rooms.len() as u64 + 1)
            .map(|step| ((n + step) % numbers + 1).to_string())
            .find(|name| !self.rooms.contains_key(name))
    }

    /// Number of peers waiting for the other side.
    pub fn waiting(&self) -> usize {
        self.rooms
            .values()
            .filter(|r| matches!(r, Room::Waiting { .. }))
            .count()
    }

    /// Number of rooms (waiting or paired).
    pub fn len(&self) -> usize {
        self.rooms.len()
    }

    /// True if no room exists.
    pub fn is_empty(&self) -> bool {
        self.rooms.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(60);
    const HOLD: Duration = Duration::from_secs(30);

    fn rooms() -> Rooms<&'static str> {
        Rooms::new(3, TTL, HOLD)
    }

    #[test]
    fn second_pairs_third_is_refused() {
        let t0 = Instant::now();
        let mut r = rooms();
        assert_eq!(r.join("7-a-b", 1, "one", t0), Join::Waiting);
        assert_eq!(r.waiting(), 1);
        assert_eq!(
            r.join("7-a-b", 2, "two", t0),
            Join::Paired {
                other: 1,
                value: "one"
            }
        );
        assert_eq!(r.waiting(), 0);
        assert_eq!(r.join("7-a-b", 3, "three", t0), Join::InUse);
        // Other codes are unaffected.
        assert_eq!(r.join("8-c-d", 4, "four", t0), Join::Waiting);
    }

    #[test]
    fn paired_room_is_released_when_both_leave() {
        let t0 = Instant::now();
        let mut r = rooms();
        r.join("c", 1, "one", t0);
        r.join("c", 2, "two", t0);
        assert!(!r.leave("c", 1));
        assert_eq!(r.join("c", 3, "three", t0), Join::InUse);
        assert!(!r.leave("c", 2));
        assert!(r.is_empty());
        assert_eq!(r.join("c", 3, "three", t0), Join::Waiting);
    }

    #[test]
    fn waiting_peer_leaving_frees_the_code() {
        let t0 = Instant::now();
        let mut r = rooms();
        r.join("c", 1, "one", t0);
        assert!(!r.leave("c", 9), "another id does not free the room");
        assert!(r.leave("c", 1));
        assert_eq!(r.join("c", 2, "two", t0), Join::Waiting);
    }

    #[test]
    fn waiting_expires_after_ttl() {
        let t0 = Instant::now();
        let mut r = rooms();
        r.join("c", 1, "one", t0);
        assert_eq!(r.next_expiry(), Some(t0 + TTL));
        assert!(r.expire(t0 + TTL - Duration::from_millis(1)).is_empty());
        assert_eq!(r.expire(t0 + TTL), vec![(1, "one")]);
        assert!(r.is_empty());
        assert_eq!(r.join("c", 2, "two", t0 + TTL), Join::Waiting);
    }

    #[test]
    fn paired_hold_expires_silently() {
        let t0 = Instant::now();
        let mut r = rooms();
        r.join("c", 1, "one", t0);
        let t1 = t0 + Duration::from_secs(10);
        r.join("c", 2, "two", t1);
        assert_eq!(r.next_expiry(), Some(t1 + HOLD));
        assert!(r.expire(t1 + HOLD).is_empty());
        assert!(r.is_empty());
    }

    /// A small deterministic generator (xorshift) standing in for the server's
    /// randomness.
    fn xorshift(mut state: u64) -> impl FnMut(u64) -> u64 {
        move |n| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        }
    }

    #[test]
    fn nameplates_are_drawn_from_a_space_within_its_bounds() {
        let t0 = Instant::now();
        let mut r: Rooms<()> = Rooms::new(100_000, TTL, HOLD);
        let mut draw = xorshift(0x9e37_79b9_7f4a_7c15);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..2000 {
            let name = r.random_free_number(&mut draw).expect("a nameplate");
            let n: u64 = name.parse().expect("a number");
            assert!((1..1000).contains(&n), "{name} out of 1..1000");
            assert_eq!(name, n.to_string(), "no leading zeros");
            seen.insert(n);
        }
        // Spread over the space, not the lowest numbers: most of 999 are seen.
        assert!(seen.len() > 800, "only {} distinct", seen.len());
        assert!(seen.iter().any(|&n| n > 900));
        // Never an existing room, even while the table fills.
        for id in 0..200 {
            let name = r.random_free_number(&mut draw).expect("a nameplate");
            assert_eq!(r.join(&name, id, (), t0), Join::Waiting, "{name} was free");
        }
    }

    #[test]
    fn the_nameplate_space_grows_with_use() {
        let t0 = Instant::now();
        let mut r: Rooms<()> = Rooms::new(100_000, TTL, HOLD);
        assert_eq!(r.nameplate_space(), 1000, "three digits under light use");
        let mut draw = xorshift(7);
        let mut id = 0;
        for rooms in [15, 16, 156, 157, 1562, 1563] {
            while r.len() < rooms {
                let name = r.random_free_number(&mut draw).expect("a nameplate");
                r.join(&name, id, (), t0);
                id += 1;
            }
            let space = r.nameplate_space();
            assert!(
                space >= NAMEPLATE_SPACE_PER_ROOM * (rooms as u64 + 1),
                "{rooms} rooms in a space of {space}"
            );
            assert!(space / 10 < NAMEPLATE_SPACE_PER_ROOM * (rooms as u64 + 1));
        }
        assert_eq!(r.nameplate_space(), 1_000_000);
        let name = r.random_free_number(&mut draw).expect("a nameplate");
        assert!(name.len() <= 6, "{name}");
    }

    #[test]
    fn a_draw_that_hits_rooms_falls_back_to_a_free_number() {
        let t0 = Instant::now();
        let mut r: Rooms<()> = Rooms::new(100, TTL, HOLD);
        for n in 1..=10 {
            r.join(&n.to_string(), n, (), t0);
        }
        // Always drawing "1": every draw hits a room.
        assert_eq!(r.random_free_number(|_| 0).as_deref(), Some("11"));
        // A draw beyond the range asked for is brought back into it.
        assert_eq!(r.random_free_number(|_| u64::MAX).as_deref(), Some("160"));
    }

    #[test]
    fn a_full_table_gives_no_nameplate() {
        let t0 = Instant::now();
        let mut r = rooms();
        let mut draw = xorshift(3);
        for id in 0..3 {
            let name = r.random_free_number(&mut draw).expect("a nameplate");
            r.join(&name, id, "v", t0);
        }
        assert_eq!(r.random_free_number(&mut draw), None, "full");
    }

    #[test]
    fn table_is_bounded() {
        let t0 = Instant::now();
        let mut r = rooms();
        for (i, code) in ["a", "b", "c"].into_iter().enumerate() {
            assert_eq!(r.join(code, i as u64, "v", t0), Join::Waiting);
        }
        assert_eq!(r.join("d", 9, "v", t0), Join::Full);
        // Pairing into an existing room still works when full.
        assert!(matches!(
            r.join("a", 10, "v", t0),
            Join::Paired { other: 0, .. }
        ));
    }
}
