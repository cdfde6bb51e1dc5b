//! The rendezvous' pairing table, as a plain state machine with time passed in.
//!
//! 1. The first peer to join with a code waits in a room (with a value the server
//!    needs to reach it later, e.g. a channel).
//! 2. The second peer with that code pairs with it: the room turns `Paired` and the
//!    waiting peer's value is handed to the caller.
//! 3. A third peer with the code is told it is in use, until both paired peers have
//!    left the room (or [`Rooms::expire`] clears it after its hold time).
//! 4. A waiting peer nobody joins is expired after its time-to-live.

use std::collections::HashMap;
use std::time::{Duration, Instant};

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

    /// The smallest positive number that is not a room's name, for a new code's
    /// nameplate (short numbers are easy to read out); `None` when the table is
    /// full.
    pub fn lowest_free_number(&self) -> Option<String> {
        if self.rooms.len() >= self.max_rooms {
            return None;
        }
        // Among max_rooms + 1 numbers at least one is free.
        (1..=self.max_rooms + 1)
            .map(|n| n.to_string())
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

    #[test]
    fn nameplates_are_the_lowest_free_numbers() {
        let t0 = Instant::now();
        let mut r = rooms();
        assert_eq!(r.lowest_free_number().as_deref(), Some("1"));
        r.join("1", 1, "one", t0);
        r.join("2", 2, "two", t0);
        assert_eq!(r.lowest_free_number().as_deref(), Some("3"));
        r.leave("1", 1);
        assert_eq!(r.lowest_free_number().as_deref(), Some("1"));
        r.join("1", 3, "three", t0);
        r.join("9", 4, "four", t0);
        assert_eq!(r.lowest_free_number(), None, "full");
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
