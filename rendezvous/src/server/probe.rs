//! The probe port and the dial-back: the two ways a peer learns how its NAT
//! treats it. The probe port tells a connection the address it came from, for
//! comparison with what the main port saw; the dial-back (asked on the main
//! port, before the hello) opens a connection to the peer's own address and
//! reports what the SYN met.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
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

/// How long a hello that names a probe token waits for the probe connection
/// to show it, when the hello comes first. The peer opens both connections at
/// once, so they arrive together; a probe later than this (a lost SYN) leaves
/// the mapping unknown rather than holding up the meeting.
pub const PROBE_WAIT: Duration = Duration::from_millis(500);

/// How long a probe token is kept for its hello.
const SIGHTING_TTL: Duration = Duration::from_secs(10);

/// Most probe tokens kept at once (beyond, new ones are not kept: their
/// hellos see an unknown mapping).
const MAX_SIGHTINGS: usize = 16_384;

/// What the probe port saw, by the token each connection sent
/// ([`PeerToServer::Probe`]): the main port looks up a hello's
/// [`punchline_proto::Hello::probe_token`] here. Shared by [`run_probe`] and
/// [`super::run`] through [`super::Config::probes`].
#[derive(Debug, Clone, Default)]
pub struct ProbeSightings(Arc<Sightings>);

#[derive(Debug, Default)]
struct Sightings {
    table: Mutex<HashMap<ProbeToken, (SocketAddr, Instant)>>,
    /// Woken at each new token, for the hellos waiting for theirs.
    recorded: Notify,
    /// A probe port records here ([`run_probe`] runs): without one
    /// (`--no-probe`), a hello's token never shows and is not waited for.
    serving: AtomicBool,
}

impl ProbeSightings {
    fn record(&self, token: ProbeToken, seen: SocketAddr) {
        let now = Instant::now();
        {
            let mut table = self.0.table.lock().unwrap_or_else(|e| e.into_inner());
            if table.len() >= MAX_SIGHTINGS {
                table.retain(|_, (_, at)| now.duration_since(*at) < SIGHTING_TTL);
            }
            if table.len() >= MAX_SIGHTINGS {
                return;
            }
            table.insert(token, (seen, now));
        }
        self.0.recorded.notify_waiters();
    }

    fn take(&self, token: &ProbeToken) -> Option<SocketAddr> {
        let mut table = self.0.table.lock().unwrap_or_else(|e| e.into_inner());
        let (seen, at) = table.remove(token)?;
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
        &listener,
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
                    conn.send(ServerToPeer::Observed { observed: seen }).await?;
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
