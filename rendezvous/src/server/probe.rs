//! The probe port and the dial-back: the two ways a peer learns how its NAT
//! treats it. The probe port tells a connection the address it came from, for
//! comparison with what the main port saw; the dial-back (asked on the main
//! port, before the hello) opens a connection to the peer's own address and
//! reports what the SYN met.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use punchline_proto::limits::{Prefix, Scope};
use punchline_proto::{PeerToServer, ProbeToken, ServerToPeer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::{timeout, Instant};
use tracing::debug;

use super::accept::accept_until;
use super::connection::framed;
use super::{canonical, DIAL_BACK_TIMEOUT};
use crate::metrics::Metrics;

/// Most probe connections being answered at once; more are closed unanswered.
const MAX_PROBE_TASKS: usize = 1024;

/// Bound on answering one probe connection (and on reading its token).
const PROBE_SEND_TIMEOUT: Duration = Duration::from_secs(2);

/// Longest a hello that names a probe token waits for the probe connection
/// to show it, when the hello comes first (see [`probe_wait`]).
pub const PROBE_WAIT: Duration = Duration::from_millis(500);

/// Slack over the expected skew between a hello and its probe's token.
const PROBE_SLACK: Duration = Duration::from_millis(50);

/// How long a hello waits for its probe's token, given the RTT of the hello's
/// connection (if known). The peer opens the probe connection 2 ms after the
/// main one, over the same path, so the token normally comes within a few
/// milliseconds of the hello; a probe that has not come within half a round
/// trip and [`PROBE_SLACK`] lost a packet, and the retransmission (a second
/// for a SYN) would come far too late to be worth waiting for: the mapping is
/// then unknown rather than the meeting held up. At most [`PROBE_WAIT`].
pub fn probe_wait(rtt: Option<Duration>) -> Duration {
    match rtt {
        Some(rtt) => (rtt / 2 + PROBE_SLACK).min(PROBE_WAIT),
        None => PROBE_WAIT,
    }
}

/// How long a probe token is kept for its hello.
const SIGHTING_TTL: Duration = Duration::from_secs(10);

/// Most probe tokens kept at once (beyond, new ones are not kept: their
/// hellos see an unknown mapping).
const MAX_SIGHTINGS: usize = 16_384;

/// Most probe tokens kept for one address (an IPv4 address, an IPv6 /64): a
/// host probes once per meeting. Beyond, its oldest are forgotten.
const TOKENS_PER_ADDRESS: usize = 64;

/// Most probe tokens kept for one network (an IPv4 /24, an IPv6 /48), as
/// above: filling the table takes 64 networks.
const TOKENS_PER_NETWORK: usize = 256;

/// What the probe port saw, by the token each connection sent
/// ([`PeerToServer::Probe`]): the main port looks up a hello's
/// [`punchline_proto::Hello::probe_token`] here. Shared by [`run_probe`] and
/// [`super::run`] through [`super::Config::probes`].
#[derive(Debug, Clone, Default)]
pub struct ProbeSightings(Arc<Sightings>);

#[derive(Debug, Default)]
struct Sightings {
    table: Mutex<Table>,
    /// Woken at each new token, for the hellos waiting for theirs.
    recorded: Notify,
    /// A probe port records here ([`run_probe`] runs): without one
    /// (`--no-probe`), a hello's token never shows and is not waited for.
    serving: AtomicBool,
    /// The server's alternate port (0: none), told to every probe.
    alternate: std::sync::atomic::AtomicU32,
}

/// The tokens kept, and each source's, oldest first.
#[derive(Debug, Default)]
struct Table {
    seen: HashMap<ProbeToken, (SocketAddr, Instant)>,
    /// Per address and per network ([`Scope`]): its tokens in the order they
    /// came (some may have been taken since: they are skipped).
    by_source: HashMap<Prefix, VecDeque<ProbeToken>>,
}

impl Table {
    /// Keeps `token`, making room within its source's quotas by forgetting
    /// that source's oldest tokens: one host (or network) flooding the probe
    /// port with made-up tokens only ever crowds out its own.
    fn insert(&mut self, token: ProbeToken, seen: SocketAddr, now: Instant) {
        if self.seen.len() >= MAX_SIGHTINGS || self.by_source.len() >= 2 * MAX_SIGHTINGS {
            self.forget_expired(now);
        }
        if self.seen.len() >= MAX_SIGHTINGS {
            return;
        }
        for scope in Scope::ALL {
            let quota = match scope {
                Scope::Address => TOKENS_PER_ADDRESS,
                Scope::Network => TOKENS_PER_NETWORK,
            };
            let queue = self
                .by_source
                .entry(Prefix::of(seen.ip(), scope))
                .or_default();
            while queue.len() >= quota {
                if let Some(oldest) = queue.pop_front() {
                    self.seen.remove(&oldest);
                }
            }
            queue.push_back(token);
        }
        self.seen.insert(token, (seen, now));
    }

    fn forget_expired(&mut self, now: Instant) {
        self.seen
            .retain(|_, (_, at)| now.duration_since(*at) < SIGHTING_TTL);
        let seen = &self.seen;
        self.by_source.retain(|_, queue| {
            queue.retain(|t| seen.contains_key(t));
            !queue.is_empty()
        });
    }
}

impl ProbeSightings {
    /// Sets the alternate port told to peers ([`super::run_on`] does, when
    /// it serves more than one listener).
    pub fn set_alternate_port(&self, port: Option<u16>) {
        self.0
            .alternate
            .store(port.map_or(0, u32::from), Ordering::Relaxed);
    }

    /// The alternate port told to peers, if any.
    pub fn alternate_port(&self) -> Option<u16> {
        u16::try_from(self.0.alternate.load(Ordering::Relaxed))
            .ok()
            .filter(|&p| p != 0)
    }

    fn record(&self, token: ProbeToken, seen: SocketAddr) {
        {
            let mut table = self.0.table.lock().unwrap_or_else(|e| e.into_inner());
            table.insert(token, seen, Instant::now());
        }
        self.0.recorded.notify_waiters();
    }

    fn take(&self, token: &ProbeToken) -> Option<SocketAddr> {
        let mut table = self.0.table.lock().unwrap_or_else(|e| e.into_inner());
        let (seen, at) = table.seen.remove(token)?;
        (at.elapsed() < SIGHTING_TTL).then_some(seen)
    }

    /// What the probe port saw of the connection that sent `token`, waiting up
    /// to `within` for it to arrive (woken as soon as it does).
    pub(super) async fn wait_for(
        &self,
        token: &ProbeToken,
        within: Duration,
    ) -> Option<SocketAddr> {
        if !self.0.serving.load(Ordering::Relaxed) {
            return None;
        }
        let deadline = Instant::now() + within;
        loop {
            // Registered before the look, so a token recorded in between
            // still wakes us.
            let recorded = self.0.recorded.notified();
            tokio::pin!(recorded);
            recorded.as_mut().enable();
            if let Some(seen) = self.take(token) {
                return Some(seen);
            }
            if tokio::time::timeout_at(deadline, recorded).await.is_err() {
                return self.take(token);
            }
        }
    }
}

/// Serves the probe port until `shutdown` completes: every connection is told the
/// address it came from ([`ServerToPeer::Observed`]); one that then sends a
/// token ([`PeerToServer::Probe`]) has that address kept under it in
/// `sightings` for its hello on the main port. A peer connects here from its
/// fixed port beside its hello; comparing what this port and the main port saw
/// tells whether its NAT picks a new public port per destination.
pub async fn run_probe(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    sightings: ProbeSightings,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    sightings.0.serving.store(true, Ordering::Relaxed);
    let mut tasks = JoinSet::new();
    accept_until(
        std::slice::from_ref(&listener),
        shutdown,
        &mut tasks,
        "probe",
        |stream, addr, serving| {
            // Past the cap the connection is dropped, which closes it.
            let metrics = metrics.clone();
            let sightings = sightings.clone();
            (serving < MAX_PROBE_TASKS).then_some(async move {
                let mut conn = framed(stream);
                let seen = canonical(addr);
                let answer = async {
                    conn.send(ServerToPeer::Observed {
                        observed: seen,
                        alternate_port: sightings.alternate_port(),
                    })
                    .await?;
                    // A peer probing beside its hello names it; `peer doctor`
                    // just reads the answer and closes.
                    if let Some(Ok(PeerToServer::Probe { token })) = conn.next().await {
                        sightings.record(token, seen);
                    }
                    conn.close().await
                };
                match timeout(PROBE_SEND_TIMEOUT, answer).await.unwrap_or(Ok(())) {
                    Ok(()) => {
                        metrics.probes.inc();
                    }
                    Err(e) => debug!(%addr, error = %e, "probe answer failed"),
                }
            })
        },
    )
    .await;
    tasks.abort_all();
    Ok(())
}

/// Opens a TCP connection to `target` (the requesting connection's own address)
/// and reports what the SYN met; the connection, if any, is closed at once.
pub(super) async fn dial_back(target: SocketAddr) -> ServerToPeer {
    use punchline_proto::DialBackResult;
    let started = Instant::now();
    let result = match timeout(DIAL_BACK_TIMEOUT, TcpStream::connect(target)).await {
        Ok(Ok(_stream)) => DialBackResult::Connected,
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => DialBackResult::Refused,
        Ok(Err(e)) => {
            debug!(%target, error = %e, "dial-back failed");
            DialBackResult::Unknown
        }
        Err(_) => DialBackResult::NoAnswer,
    };
    let elapsed_ms = started.elapsed().as_millis().try_into().unwrap_or(u32::MAX);
    debug!(%target, ?result, elapsed_ms, "dial-back");
    ServerToPeer::DialedBack {
        target,
        result,
        elapsed_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hello_waits_for_its_probe_about_half_a_round_trip() {
        let ms = Duration::from_millis;
        assert_eq!(probe_wait(Some(ms(120))), ms(60) + PROBE_SLACK);
        assert_eq!(probe_wait(Some(ms(2))), ms(1) + PROBE_SLACK);
        assert_eq!(probe_wait(Some(Duration::from_secs(5))), PROBE_WAIT);
        assert_eq!(probe_wait(None), PROBE_WAIT);
    }

    fn token(n: usize) -> ProbeToken {
        let mut t = [0; 16];
        t[..8].copy_from_slice(&(n as u64).to_le_bytes());
        t
    }

    #[test]
    fn a_flooding_source_crowds_out_only_its_own_tokens() {
        let sightings = ProbeSightings::default();
        let honest: SocketAddr = "198.51.100.7:4000".parse().expect("addr");
        sightings.record(token(0), honest);
        // One host, then its whole /24, send far more tokens than the table
        // holds.
        for n in 1..=MAX_SIGHTINGS * 2 {
            let host = 1 + (n % 250) as u8;
            let flood = SocketAddr::from(([203, 0, 113, host], 5000));
            sightings.record(token(n), flood);
        }
        let table = sightings.0.table.lock().expect("lock");
        assert!(
            table.seen.len() <= TOKENS_PER_NETWORK + 1,
            "{}",
            table.seen.len()
        );
        assert!(table
            .by_source
            .values()
            .all(|q| q.len() <= TOKENS_PER_NETWORK));
        drop(table);
        assert_eq!(sightings.take(&token(0)), Some(honest));
        // The flood's newest tokens are kept, its oldest forgotten.
        let newest = SocketAddr::from(([203, 0, 113, 1 + ((MAX_SIGHTINGS * 2) % 250) as u8], 5000));
        assert_eq!(sightings.take(&token(MAX_SIGHTINGS * 2)), Some(newest));
        assert_eq!(sightings.take(&token(1)), None);
    }
}
