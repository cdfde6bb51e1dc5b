//! RTT estimation and the timing of the synchronised go.
//!
//! A punch never fails when both peers' SYNs leave at the same instant: then each
//! SYN finds the other's NAT already holding a mapping, whatever that NAT does to
//! unsolicited packets. The rendezvous cannot make the peers act together, but it
//! knows its RTT to each: the nearer peer's go arrives sooner by half the
//! difference of the RTTs ([`go_delays`]). The rendezvous sends both goes at once
//! and tells the nearer peer that difference
//! ([`crate::Go::others_go_after_us`]). The nearer peer's SYN leaves at once: it
//! reaches the other's NAT one A-B one-way delay later, and that is after the
//! other's SYN left (so a mapping is there) whenever the direct path is not
//! shorter than the detour through the rendezvous, which is the usual case; its
//! link is then up half the RTT difference sooner. When it is shorter (a
//! rendezvous far from one peer, the peers close together), a NAT that drops the
//! early SYN costs nothing (the other's SYN still finds this peer's socket
//! waiting in SYN_SENT), and one that answers it with a reset gets a new SYN
//! from this peer at the other's go, when the two cross as if the go had been
//! held back.

use std::collections::VecDeque;
use std::time::Duration;

/// Samples an [`RttEstimator`] keeps.
pub const RTT_WINDOW: usize = 8;

/// Largest delay the go is held back for one peer. RTTs of a few seconds mean a
/// broken path more than a far one; the hold must stay bounded either way.
pub const MAX_GO_DELAY: Duration = Duration::from_secs(2);

/// Shortest hold worth making: below it the go is sent at once. Timers do not
/// resolve finer (tokio's wheel ticks every millisecond, so a 50 µs sleep lasts
/// up to a millisecond and costs a timer), and sending at once is then at least as
/// close to the ideal instant.
pub const MIN_GO_DELAY: Duration = Duration::from_millis(1);

/// Round-trip time estimate: the minimum of the last [`RTT_WINDOW`] samples.
///
/// The minimum, not the mean: a sample can only be inflated (by scheduling,
/// queueing, delayed ACKs), never shortened, so the smallest recent one is the best
/// estimate of the path's propagation delay, which is what the go timing needs.
#[derive(Debug, Clone, Default)]
pub struct RttEstimator {
    samples: VecDeque<Duration>,
}

impl RttEstimator {
    /// An estimator with no samples.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one measured round trip.
    pub fn add(&mut self, sample: Duration) {
        if self.samples.len() == RTT_WINDOW {
            self.samples.pop_front();
        }
        self.samples.push_back(sample);
    }

    /// The current estimate, if any sample exists.
    pub fn estimate(&self) -> Option<Duration> {
        self.samples.iter().min().copied()
    }
}

/// How long to hold back the go to each of two peers whose RTTs to the server are
/// `rtt_a` and `rtt_b`, so both receive it at the same moment. The farther peer gets
/// it at once; the nearer one later by half the difference (capped at
/// [`MAX_GO_DELAY`], and none below [`MIN_GO_DELAY`]).
pub fn go_delays(rtt_a: Duration, rtt_b: Duration) -> (Duration, Duration) {
    let half_diff = |far: Duration, near: Duration| {
        let d = ((far - near) / 2).min(MAX_GO_DELAY);
        if d < MIN_GO_DELAY {
            Duration::ZERO
        } else {
            d
        }
    };
    if rtt_a >= rtt_b {
        (Duration::ZERO, half_diff(rtt_a, rtt_b))
    } else {
        (half_diff(rtt_b, rtt_a), Duration::ZERO)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn nearer_peer_waits_half_the_difference() {
        // A 40 ms away (one way), B 5 ms: RTTs 80 and 10.
        let (a, b) = go_delays(ms(80), ms(10));
        assert_eq!((a, b), (ms(0), ms(35)));
        // Both receive it at the same instant: delay + one-way delay.
        assert_eq!(a + ms(40), b + ms(5));
        assert_eq!(go_delays(ms(10), ms(80)), (ms(35), ms(0)));
        assert_eq!(go_delays(ms(20), ms(20)), (ms(0), ms(0)));
    }

    #[test]
    fn delay_is_capped() {
        assert_eq!(go_delays(Duration::from_secs(30), ms(1)).1, MAX_GO_DELAY);
    }

    #[test]
    fn delays_below_a_millisecond_are_not_held() {
        let us = Duration::from_micros;
        assert_eq!(go_delays(us(1900), us(100)), (ms(0), ms(0)));
        assert_eq!(go_delays(us(100), us(2100)), (ms(1), ms(0)));
    }

    #[test]
    fn estimate_is_recent_minimum() {
        let mut e = RttEstimator::new();
        assert_eq!(e.estimate(), None);
        e.add(ms(30));
        e.add(ms(12));
        e.add(ms(50));
        assert_eq!(e.estimate(), Some(ms(12)));
        // The 12 ms sample ages out of the window.
        for _ in 0..RTT_WINDOW {
            e.add(ms(20));
        }
        assert_eq!(e.estimate(), Some(ms(20)));
    }
}
