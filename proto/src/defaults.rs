//! Defaults and timings that the rendezvous and the peer must agree on, in one
//! place, with the relations between them checked when the crate compiles.
//!
//! Each program keeps the settings only it uses; what is here spans both: the
//! port a peer assumes when the user names none, where the probe and alternate
//! ports are, how often a waiting peer hears from the server and how long its silence may last,
//! how long the server waits for a punch report, and how quiet a relayed chat
//! may be before the server drops it.

use std::time::Duration;

use crate::pacing::PUNCH_DEADLINE;

/// Port of the rendezvous (TCP) when the user names none.
pub const DEFAULT_PORT: u16 = 7425;

/// The rendezvous' probe port is its main port plus this, unless configured
/// otherwise; peers assume the same.
pub const PROBE_PORT_OFFSET: u16 = 1;

/// The rendezvous also serves its main protocol on its main port plus this:
/// the *alternate port*, unless configured otherwise; peers assume the same.
///
/// A peer whose connection to the main port stays silent (a SYN or SYN-ACK
/// lost) opens a second one, from the same local port, to the alternate port,
/// and keeps whichever answers first (see
/// [`crate::pacing::rendezvous_silence`]). A second connection to the *same*
/// server port would reuse the silent one's address pair, and the resets that
/// stale segments of the first attempt then draw from our kernel leave a Linux
/// NAT's connection tracking in the CLOSE state with the old sequence
/// numbers: the new connection's first segments are taken as invalid and leave
/// untranslated (dropped) for the 10 s that state lasts. Seen in the NAT lab
/// under loss; a different server port has its own tracking entry.
pub const ALTERNATE_PORT_OFFSET: u16 = 2;

/// Spacing of the rendezvous' pings to a waiting peer (after a few quick early
/// ones): RTT refresh, and traffic that keeps the peer's NAT mapping — the one
/// the punch will use — from idling out.
pub const SERVER_PING_INTERVAL: Duration = Duration::from_secs(10);

/// Longest silence a waiting peer accepts from the rendezvous: three missed pings
/// and a half mean the server or the path is gone (a NAT that dropped the
/// mapping, a server that died without closing). The server drops a waiting peer
/// that leaves its pings unanswered as long, by default.
pub const WAIT_SILENCE_TIMEOUT: Duration = Duration::from_millis(35_000);

/// How long the rendezvous keeps a paired connection open for the peer's punch
/// report (or its request to relay): longer than the default punch deadline plus
/// the link checks and the follower's grace that may follow it.
pub const REPORT_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest punch a peer may be told to make (`--punch-timeout`): the
/// rendezvous keeps a paired connection open for [`REPORT_TIMEOUT`], and after
/// the punch the peer still needs that connection to report, or to ask for a
/// relay (link checks and the follower's grace come first: seconds).
pub const MAX_PUNCH_DEADLINE: Duration = Duration::from_secs(30);

/// A chat side that has sent nothing for this long sends a keepalive, which the
/// other answers at once. Home routers forget idle TCP mappings after minutes at
/// the earliest (some after 30 s of a half-open looking flow); traffic every 25 s
/// keeps every mapping on the path alive.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(25);

/// A line or keepalive not acknowledged within this long means the link is dead:
/// within 10 s when a line waits for its acknowledgement, within 35 s (a
/// keepalive interval, then this) when the chat is idle.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// A relay that carries nothing either way for this long is closed by the
/// rendezvous. A live chat is never this quiet: keepalives and their
/// acknowledgements cross it every [`HEARTBEAT_INTERVAL`].
pub const RELAY_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Compile-time checks of the relations above.
const _: () = {
    let ping = SERVER_PING_INTERVAL.as_millis();
    // A waiting peer must hear at least three pings before it gives up.
    assert!(WAIT_SILENCE_TIMEOUT.as_millis() >= 3 * ping);
    // The server must wait for the report past the punch's default deadline and
    // what may follow it (link checks, the follower's grace: seconds).
    assert!(REPORT_TIMEOUT.as_millis() >= PUNCH_DEADLINE.as_millis() + 30_000);
    // The longest punch a user may ask for leaves the same room.
    assert!(REPORT_TIMEOUT.as_millis() >= MAX_PUNCH_DEADLINE.as_millis() + 30_000);
    assert!(PUNCH_DEADLINE.as_millis() <= MAX_PUNCH_DEADLINE.as_millis());
    // A quiet but live relayed chat is never taken for a dead one: two
    // keepalive rounds and their acknowledgement fit in the relay's idle time.
    assert!(
        RELAY_IDLE_TIMEOUT.as_millis()
            > 2 * HEARTBEAT_INTERVAL.as_millis() + ACK_TIMEOUT.as_millis()
    );
    // A link is declared dead only after a keepalive could have been answered.
    assert!(ACK_TIMEOUT.as_millis() < HEARTBEAT_INTERVAL.as_millis());
    assert!(PROBE_PORT_OFFSET != 0);
    assert!(ALTERNATE_PORT_OFFSET != 0 && ALTERNATE_PORT_OFFSET != PROBE_PORT_OFFSET);
};
