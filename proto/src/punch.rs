//! The punch's retry cadence, as pure functions of what happened.
//!
//! Each candidate address is tried by its own loop: connect from the fixed port; on
//! failure close the socket, pause, and connect again from the same port, until the
//! deadline. Why each pause has its length:
//!
//! - Refused (an RST came back: the far NAT or host had no mapping or socket yet, we
//!   were early): the other side's SYN is on its way or about to leave, and the RST
//!   closed the NAT entry our SYN made, so a fresh SYN must follow at once. For the
//!   first [`FAST_WINDOW`] after the go, retry immediately: the rate is clocked by
//!   the round trip (each attempt waits for its RST), and on a path with almost no
//!   delay (loopback, a LAN) the two sides' SYN_SENT windows are microseconds long,
//!   so only a fast succession of attempts overlaps them. After the window the other
//!   side is evidently not answering yet: slow down to [`RETRY_REFUSED_SLOW`] to stay
//!   polite towards whatever is at that address.
//! - No answer within [`ATTEMPT_TIMEOUT`]: the SYN was dropped (a NAT filtering
//!   unsolicited inbound) and no SYN of the other side arrived either. Start over at
//!   once: a new SYN re-opens our NAT's mapping.
//! - Address not available (`EADDRNOTAVAIL`): the same 4-tuple is still held by our
//!   previous socket for a moment. Retry after [`RETRY_ADDR_BUSY`].

use std::time::Duration;

/// How long the punch goes on before the peer gives up, by default.
pub const PUNCH_DEADLINE: Duration = Duration::from_secs(10);

/// How long one connection attempt waits for an answer. Linux retransmits a SYN
/// after 1 s and again after 3 s; 2.5 s lets the first retransmission work and
/// replaces the late second one with a fresh attempt.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(2500);

/// Time after the go during which a refused attempt is retried at once.
pub const FAST_WINDOW: Duration = Duration::from_secs(1);

/// Pause after a refused attempt once the fast window is over.
pub const RETRY_REFUSED_SLOW: Duration = Duration::from_millis(250);

/// Pause after `EADDRNOTAVAIL` (the 4-tuple is still held by a closing socket).
pub const RETRY_ADDR_BUSY: Duration = Duration::from_millis(50);

/// How an attempt ended, as far as the retry cadence cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptFailure {
    /// Connection refused (RST).
    Refused,
    /// No answer within [`ATTEMPT_TIMEOUT`].
    NoAnswer,
    /// The 4-tuple is in use (`EADDRNOTAVAIL`, `EADDRINUSE`).
    AddressBusy,
    /// Any other error (unreachable network, permission...).
    Other,
}

/// The pause before the next attempt, after `failure` ended an attempt on one
/// candidate, `since_go` after the go.
pub fn retry_pause(failure: AttemptFailure, since_go: Duration) -> Duration {
    match failure {
        AttemptFailure::Refused if since_go < FAST_WINDOW => Duration::ZERO,
        AttemptFailure::Refused => RETRY_REFUSED_SLOW,
        AttemptFailure::NoAnswer => Duration::ZERO,
        AttemptFailure::AddressBusy => RETRY_ADDR_BUSY,
        // Unreachable and the like rarely heal within seconds; do not spin.
        AttemptFailure::Other => RETRY_REFUSED_SLOW,
    }
}

/// How a peer paces its attempts on one candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RetryPolicy {
    /// The cadence described in the module docs ([`retry_pause`]).
    #[default]
    Adaptive,
    /// The same pause after every failure: the naive baseline that benchmarks
    /// compare the adaptive cadence with.
    Fixed(Duration),
}

impl RetryPolicy {
    /// The pause after `failure`, `since_go` after the go.
    pub fn pause(self, failure: AttemptFailure, since_go: Duration) -> Duration {
        match self {
            RetryPolicy::Adaptive => retry_pause(failure, since_go),
            RetryPolicy::Fixed(pause) => pause,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_slow_down_after_the_fast_window() {
        let early = Duration::from_millis(3);
        assert_eq!(retry_pause(AttemptFailure::Refused, early), Duration::ZERO);
        assert_eq!(
            retry_pause(AttemptFailure::Refused, FAST_WINDOW),
            RETRY_REFUSED_SLOW
        );
        assert_eq!(retry_pause(AttemptFailure::NoAnswer, early), Duration::ZERO);
        assert_eq!(
            retry_pause(AttemptFailure::AddressBusy, early),
            RETRY_ADDR_BUSY
        );
    }

    #[test]
    fn slow_attempts_after_the_window_are_bounded() {
        // Worst case after the fast window: every attempt refused at once.
        let mut t = FAST_WINDOW;
        let mut n = 0;
        while t < PUNCH_DEADLINE {
            n += 1;
            t += retry_pause(AttemptFailure::Refused, t);
        }
        assert!(n <= 40, "{n} slow attempts per candidate is too many");
    }

    #[test]
    fn fixed_policy_ignores_the_failure() {
        let p = RetryPolicy::Fixed(Duration::from_millis(100));
        for f in [
            AttemptFailure::Refused,
            AttemptFailure::NoAnswer,
            AttemptFailure::Other,
        ] {
            assert_eq!(p.pause(f, Duration::ZERO), Duration::from_millis(100));
        }
        assert_eq!(
            RetryPolicy::Adaptive.pause(AttemptFailure::Refused, Duration::ZERO),
            Duration::ZERO
        );
    }
}
