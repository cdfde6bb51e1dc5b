//! The punch's retry cadence: when an attempt on one candidate may start, how
//! long it waits, and when the candidate is given up, as pure functions of what
//! happened ([`Pacer`]; time and randomness come from the caller).
//!
//! Each candidate address is tried by its own loop: connect from the fixed port; on
//! failure close the socket, pause, and connect again from the same port, until the
//! deadline or the end of the candidate's budget. Whatever the far end does, two
//! attempts on one candidate start at least [`ATTEMPT_FLOOR`] apart (plus a
//! random jitter), and one go makes at most [`MAX_ATTEMPTS`] on it: a hostile
//! rendezvous or peer cannot turn a peer into a SYN flood, and neither can a
//! host next door that resets. Why each pause has its length:
//!
//! 1. Refused (an RST came back: the far NAT or host had no mapping or socket
//!    yet, we were early) after at least [`ATTEMPT_FLOOR`], as across the
//!    internet: the other side's SYN is on its way or about to leave, and the
//!    RST closed the NAT entry our SYN made, so a fresh SYN must follow at once.
//!    The rate is clocked by the round trip. After [`FAST_WINDOW`] or
//!    [`FAST_ATTEMPTS`] the other side is evidently not answering yet: slow down
//!    to [`RETRY_REFUSED_SLOW`].
//! 2. Refused faster than [`ATTEMPT_FLOOR`] (loopback, a LAN, a host next
//!    door): the two sides' SYN_SENT windows last microseconds there, so only a
//!    storm of attempts made them overlap (thousands a second). Instead the
//!    candidate becomes *near*: each further attempt ignores resets and stays
//!    in SYN_SENT for [`NEAR_HOLD`], and the other's SYN, whenever it comes,
//!    finds it. No NAT between the two needs a fresh SYN after a reset here.
//! 3. No answer within [`ATTEMPT_TIMEOUT`] (or the hold): the SYN was dropped
//!    (a NAT filtering unsolicited inbound) and no SYN of the other side
//!    arrived either. Start over at once: a new SYN re-opens our NAT's mapping.
//! 4. Address not available (`EADDRNOTAVAIL`): the same 4-tuple is still held by
//!    our previous socket for a moment. Retry after [`RETRY_ADDR_BUSY`].

use std::time::Duration;

/// How long the punch goes on before the peer gives up, by default.
pub const PUNCH_DEADLINE: Duration = Duration::from_secs(10);

/// How long one connection attempt waits for an answer. Linux retransmits a SYN
/// after 1 s and again after 3 s; 2.5 s lets the first retransmission work and
/// replaces the late second one with a fresh attempt.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(2500);

/// Least time an attempt that has heard nothing waits before a fresh one
/// replaces it (see [`fresh_attempt_after`]).
pub const FRESH_ATTEMPT_MIN: Duration = Duration::from_millis(150);

/// How long an attempt that has heard nothing at all from the other side (its
/// socket still in SYN_SENT: no SYN, no SYN-ACK, no reset) waits before a fresh
/// attempt replaces it, rather than for the kernel's SYN retransmission after
/// 1 s. The two sides receive the go together, so the other's SYN, or the
/// answer to ours, comes within about one round trip between the peers; a lost
/// SYN costs this instead of a second. The peers' round trip is not known
/// before the punch: four times our round trip to the rendezvous covers it
/// where the rendezvous is not much farther from the other peer than from us
/// (the usual case), never less than [`FRESH_ATTEMPT_MIN`] and never more
/// than [`ATTEMPT_TIMEOUT`]. Without an estimate, only [`ATTEMPT_TIMEOUT`].
/// An attempt that has heard from the other side (SYN_RECV: a simultaneous
/// open under way) is never replaced early: closing it would reset the
/// connection the other side is completing. The peer uses this on the nearer
/// peer only (whose go comes first): the farther one's silence is as often a
/// lost SYN-ACK of the other's, whose NAT then holds our first SYN's sequence
/// number and refuses a fresh one (`punchline_peer::punch`, `fresh_after`).
pub fn fresh_attempt_after(server_rtt: Option<Duration>) -> Duration {
    match server_rtt {
        Some(rtt) => (rtt * 4).clamp(FRESH_ATTEMPT_MIN, ATTEMPT_TIMEOUT),
        None => ATTEMPT_TIMEOUT,
    }
}

/// How long a connection to the rendezvous may stay silent (no SYN-ACK) before
/// a second one, from the same port to the server's alternate port
/// ([`crate::defaults::ALTERNATE_PORT_OFFSET`]), races it, given `probe_rtt`,
/// the time the probe connection to the same server, opened at about the same
/// moment, took to connect. Its SYN-ACK came back: ours is late by that much
/// only when one of the two segments was lost, and the kernel would send the
/// SYN again only after 1 s. Twice that round trip plus 20 ms leaves room for
/// jitter; never less than 30 ms and never more than 1 s (the kernel's own
/// retransmission).
///
/// The silent connection is kept, not replaced: when the server's SYN-ACK was
/// lost, the server still holds that attempt and sends its SYN-ACK again after
/// 1 s. Both keep the kernel's retransmissions; whichever connects first
/// carries the hello. One second connection only: both lost is rare (0.4% of
/// starts at 3% loss each way), and then the kernel's retransmissions follow.
pub fn rendezvous_silence(probe_rtt: Duration) -> Duration {
    (probe_rtt * 2 + Duration::from_millis(20))
        .clamp(Duration::from_millis(30), Duration::from_secs(1))
}

/// Least time between the starts of two attempts on one candidate. Without it
/// nothing limits the rate where the reset comes back in microseconds (a host
/// next door, a LAN, loopback): retried at once, a peer sent 3,500 to 33,000
/// SYNs a second to one address in the NAT lab, and 78,000 when a hostile
/// rendezvous aimed it at a host that resets. 2 ms caps that at 500 a second;
/// a refusal faster than this makes the candidate *near* (see
/// [`NEAR_HOLD`]), and then it gets 10 a second.
pub const ATTEMPT_FLOOR: Duration = Duration::from_millis(2);

/// Most random time added to [`ATTEMPT_FLOOR`] before a retry (the caller
/// draws it). Two peers retrying on the same fixed period keep the same phase:
/// if their first attempts missed each other, every later pair would miss too.
pub const ATTEMPT_JITTER: Duration = Duration::from_millis(2);

/// How long an attempt on a near candidate (one that refused faster than
/// [`ATTEMPT_FLOOR`]) waits for the other's SYN, ignoring resets. A path that
/// resets within 2 ms completes a handshake within 2 ms too, so 100 ms is
/// ample; and it is well below the kernel's first SYN retransmission (1 s), so
/// each held attempt sends one SYN. With resets ignored the socket stays in
/// SYN_SENT for the whole hold, and the other's SYN finds it: on loopback two
/// peers met after 1 to 2 attempts each (200 punches), where attempts paced
/// at the floor needed a median of 75 and failed one punch in 8.
pub const NEAR_HOLD: Duration = Duration::from_millis(100);

/// Time after the go during which a refused attempt is retried at the fast
/// pace ([`ATTEMPT_FLOOR`] and the round trip).
pub const FAST_WINDOW: Duration = Duration::from_secs(1);

/// Attempts on one candidate at the fast pace, per go; later refusals wait
/// [`RETRY_REFUSED_SLOW`]. A fast attempt on a far candidate lasts at least
/// its round trip: across the internet (10 ms and more) the fast window holds
/// at most 100 of them, and in the NAT lab every punch between two homes
/// succeeded within 3. A path between 2 and 10 ms is slowed after 100 too.
pub const FAST_ATTEMPTS: u32 = 100;

/// Attempts on one candidate per go, in all; then the candidate is given up.
/// Fits the fast attempts and 40 slow ones (the default ten seconds at
/// [`RETRY_REFUSED_SLOW`]), or a default punch of held attempts; a longer
/// deadline chosen by hand does not add SYNs towards an address that keeps
/// resetting.
pub const MAX_ATTEMPTS: u32 = FAST_ATTEMPTS + 40;

/// Pause after a refused attempt once the fast window or the fast attempts are
/// over: the other side is evidently not answering yet; stay polite towards
/// whatever is at that address.
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

/// How a peer paces its attempts on one candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RetryPolicy {
    /// The cadence described in the module docs.
    #[default]
    Adaptive,
    /// The same pause after every failure: the naive baseline that benchmarks
    /// compare the adaptive cadence with. [`ATTEMPT_FLOOR`] and
    /// [`MAX_ATTEMPTS`] still hold.
    Fixed(Duration),
}

impl RetryPolicy {
    /// The pause after `failure` on a candidate tried `attempts` times,
    /// `since_go` after the go, before [`ATTEMPT_FLOOR`] is applied.
    pub fn pause(self, failure: AttemptFailure, since_go: Duration, attempts: u32) -> Duration {
        let RetryPolicy::Fixed(pause) = self else {
            return retry_pause(failure, since_go, attempts);
        };
        pause
    }
}

/// The adaptive pause after `failure` ended the `attempts`-th attempt on one
/// candidate, `since_go` after the go (before [`ATTEMPT_FLOOR`] is applied).
pub fn retry_pause(failure: AttemptFailure, since_go: Duration, attempts: u32) -> Duration {
    let fast = since_go < FAST_WINDOW && attempts < FAST_ATTEMPTS;
    match failure {
        AttemptFailure::Refused if fast => Duration::ZERO,
        AttemptFailure::Refused => RETRY_REFUSED_SLOW,
        AttemptFailure::NoAnswer => Duration::ZERO,
        AttemptFailure::AddressBusy => RETRY_ADDR_BUSY,
        // Unreachable and the like rarely heal within seconds; do not spin.
        AttemptFailure::Other => RETRY_REFUSED_SLOW,
    }
}

/// The attempts on one candidate during one go: when the next may start, how
/// long it waits, and when the candidate is given up. Times are durations
/// since the go.
#[derive(Debug, Clone)]
pub struct Pacer {
    policy: RetryPolicy,
    attempts: u32,
    last_start: Option<Duration>,
    near: bool,
}

impl Pacer {
    /// No attempt made yet.
    pub fn new(policy: RetryPolicy) -> Pacer {
        Pacer {
            policy,
            attempts: 0,
            last_start: None,
            near: false,
        }
    }

    /// Attempts started so far.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Whether another attempt may start, or the candidate's budget
    /// ([`MAX_ATTEMPTS`]) is spent.
    pub fn may_start(&self) -> bool {
        self.attempts < MAX_ATTEMPTS
    }

    /// Records an attempt starting at `now`, or returns false, recording
    /// nothing, when the budget is spent: the candidate is given up.
    pub fn start(&mut self, now: Duration) -> bool {
        if !self.may_start() {
            return false;
        }
        self.attempts += 1;
        self.last_start = Some(now);
        true
    }

    /// `Some(hold)` when the next attempt must ignore resets and wait `hold`
    /// for the other's SYN (a near candidate, see [`NEAR_HOLD`]); `None` when
    /// it ends on a reset, within [`ATTEMPT_TIMEOUT`].
    pub fn hold(&self) -> Option<Duration> {
        self.near.then_some(NEAR_HOLD)
    }

    /// When the next attempt may start, after `failure` ended the last one at
    /// `now`. `jitter` is a random number in 0..=1 the caller draws for every
    /// retry (others are clamped into it); it adds up to [`ATTEMPT_JITTER`] to
    /// [`ATTEMPT_FLOOR`]. A refusal faster than the floor makes the candidate
    /// near. `None`: the budget is spent, the candidate is given up.
    pub fn next_start(
        &mut self,
        failure: AttemptFailure,
        now: Duration,
        jitter: f64,
    ) -> Option<Duration> {
        if !self.may_start() {
            return None;
        }
        let last = self.last_start.unwrap_or(now);
        if failure == AttemptFailure::Refused
            && self.policy == RetryPolicy::Adaptive
            && now.saturating_sub(last) < ATTEMPT_FLOOR
        {
            self.near = true;
        }
        let jitter = if jitter.is_nan() {
            0.0
        } else {
            jitter.clamp(0.0, 1.0)
        };
        let pause = self.policy.pause(failure, now, self.attempts);
        let floor = last + ATTEMPT_FLOOR + ATTEMPT_JITTER.mul_f64(jitter);
        Some((now + pause).max(floor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    /// Drives a pacer against a far end that always fails the same way,
    /// `lasting` after each start; returns the start times.
    fn starts(
        policy: RetryPolicy,
        failure: AttemptFailure,
        lasting: Duration,
        jitter: f64,
        until: Duration,
    ) -> Vec<Duration> {
        let mut p = Pacer::new(policy);
        let mut t = Duration::ZERO;
        let mut out = Vec::new();
        while t < until && p.start(t) {
            out.push(t);
            // A held attempt lasts its hold, however fast the far end resets.
            let end = t + p.hold().unwrap_or(lasting);
            match p.next_start(failure, end, jitter) {
                Some(next) => t = next,
                None => break,
            }
        }
        out
    }

    fn in_first_second(starts: &[Duration]) -> usize {
        starts.iter().filter(|t| **t < SECOND).count()
    }

    #[test]
    fn a_resetting_address_gets_a_bounded_number_of_attempts() {
        let floor_rate = (SECOND.as_nanos() / ATTEMPT_FLOOR.as_nanos()) as usize + 1;
        for policy in [RetryPolicy::Adaptive, RetryPolicy::Fixed(Duration::ZERO)] {
            for lasting in [
                Duration::ZERO,
                Duration::from_micros(20),
                ATTEMPT_FLOOR,
                Duration::from_millis(5),
            ] {
                for jitter in [0.0, 1.0, -3.0, f64::NAN] {
                    let s = starts(
                        policy,
                        AttemptFailure::Refused,
                        lasting,
                        jitter,
                        3600 * SECOND,
                    );
                    assert!(
                        s.len() <= MAX_ATTEMPTS as usize,
                        "{policy:?} {lasting:?}: {}",
                        s.len()
                    );
                    assert!(in_first_second(&s) <= floor_rate, "{policy:?} {lasting:?}");
                    for pair in s.windows(2) {
                        assert!(
                            pair[1] - pair[0] >= ATTEMPT_FLOOR,
                            "{policy:?} {lasting:?} {pair:?}"
                        );
                    }
                }
            }
        }
        // The total per go: every candidate at its worst.
        let per_go = (crate::MAX_CANDIDATES + 1) * MAX_ATTEMPTS as usize;
        assert!(per_go <= 1300, "{per_go}");
    }

    #[test]
    fn a_near_refusal_holds_each_attempt() {
        // Loopback: the reset comes back in microseconds.
        let s = starts(
            RetryPolicy::Adaptive,
            AttemptFailure::Refused,
            Duration::from_micros(20),
            0.5,
            10 * SECOND,
        );
        // One quick attempt, then one per hold.
        assert!(in_first_second(&s) <= 1 + (SECOND.as_millis() / NEAR_HOLD.as_millis()) as usize);
        assert!(s[1] - s[0] < NEAR_HOLD, "{s:?}");
        assert!(
            s.windows(2).skip(1).all(|w| w[1] - w[0] >= NEAR_HOLD),
            "{s:?}"
        );
        let mut p = Pacer::new(RetryPolicy::Adaptive);
        assert!(p.start(Duration::ZERO));
        assert_eq!(p.hold(), None);
        p.next_start(AttemptFailure::Refused, Duration::from_micros(20), 0.0);
        assert_eq!(p.hold(), Some(NEAR_HOLD));
        // The naive baseline stays naive.
        let mut p = Pacer::new(RetryPolicy::Fixed(Duration::from_millis(100)));
        p.start(Duration::ZERO);
        p.next_start(AttemptFailure::Refused, Duration::from_micros(20), 0.0);
        assert_eq!(p.hold(), None);
    }

    #[test]
    fn far_refusals_are_retried_fast_then_slowly() {
        let rtt = Duration::from_millis(30);
        let mut p = Pacer::new(RetryPolicy::Adaptive);
        p.start(Duration::ZERO);
        // Refused after a round trip: the floor has passed, retry at once.
        assert_eq!(p.next_start(AttemptFailure::Refused, rtt, 1.0), Some(rtt));
        assert_eq!(p.hold(), None);
        // After the fast window: the slow pace.
        p.start(SECOND);
        assert_eq!(
            p.next_start(AttemptFailure::Refused, SECOND + rtt, 0.0),
            Some(SECOND + rtt + RETRY_REFUSED_SLOW)
        );
        // After the fast attempts: the slow pace too, even inside the window.
        let s = starts(
            RetryPolicy::Adaptive,
            AttemptFailure::Refused,
            Duration::from_millis(3),
            0.0,
            SECOND,
        );
        let slow = (SECOND.as_millis() / RETRY_REFUSED_SLOW.as_millis()) as usize;
        assert!(s.len() <= FAST_ATTEMPTS as usize + slow, "{}", s.len());
        assert_eq!(
            retry_pause(AttemptFailure::NoAnswer, Duration::ZERO, 0),
            Duration::ZERO
        );
        assert_eq!(
            retry_pause(AttemptFailure::AddressBusy, Duration::ZERO, 0),
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
            t += retry_pause(AttemptFailure::Refused, t, 0);
        }
        assert!(n <= 40, "{n} slow attempts per candidate is too many");
    }

    #[test]
    fn fixed_policy_ignores_the_failure_but_keeps_the_floor() {
        let p = RetryPolicy::Fixed(Duration::from_millis(100));
        for f in [
            AttemptFailure::Refused,
            AttemptFailure::NoAnswer,
            AttemptFailure::Other,
        ] {
            assert_eq!(p.pause(f, Duration::ZERO, 0), Duration::from_millis(100));
        }
        let mut pacer = Pacer::new(RetryPolicy::Fixed(Duration::ZERO));
        pacer.start(Duration::ZERO);
        assert_eq!(
            pacer.next_start(AttemptFailure::Refused, Duration::ZERO, 0.0),
            Some(ATTEMPT_FLOOR)
        );
    }

    #[test]
    fn a_silent_connection_to_the_rendezvous_is_raced_after_twice_the_probes_round_trip() {
        let ms = Duration::from_millis;
        assert_eq!(rendezvous_silence(ms(120)), ms(260));
        assert_eq!(rendezvous_silence(ms(1)), ms(30));
        assert_eq!(rendezvous_silence(ms(800)), ms(1000));
    }

    #[test]
    fn a_silent_attempt_is_replaced_after_a_few_round_trips_to_the_rendezvous() {
        let ms = Duration::from_millis;
        assert_eq!(fresh_attempt_after(Some(ms(120))), ms(480));
        assert_eq!(fresh_attempt_after(Some(ms(5))), FRESH_ATTEMPT_MIN);
        assert_eq!(fresh_attempt_after(Some(ms(2000))), ATTEMPT_TIMEOUT);
        assert_eq!(fresh_attempt_after(None), ATTEMPT_TIMEOUT);
        assert!(fresh_attempt_after(Some(ms(200))) < Duration::from_secs(1));
    }
}
