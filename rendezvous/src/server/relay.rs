//! Relaying a pair whose punch failed: the two ends that join the pair's tasks,
//! the relay slots (the server's and each source's share), and the loop that
//! carries each peer's bytes to the other within the pair's allowance, pace,
//! idle timeout and lifetime. The bytes are the peers' encrypted link: the
//! server never looks inside.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use punchline_proto::limits::{Pace, Refused};
use punchline_proto::pairing::ConnId;
use punchline_proto::{ErrorCode, PeerToServer, ServerToPeer};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{sleep_until, Instant};
use tracing::{debug, info};

use super::connection::{kind, reject, send, Conn, ConnError};
use super::{Shared, RELAY_IDLE_TIMEOUT};
use crate::reject::Reject;

/// Queue of relayed pieces between the two tasks of a pair.
const RELAY_QUEUE: usize = 32;

/// One task's end of its pair's relay: pieces for the other peer go out on `tx`,
/// pieces from it come in on `rx`; `budget` is what the pair may still send.
pub(super) struct RelayEnd {
    /// This peer's sealed box, for the other peer (once).
    pub(super) sealed_out: Option<oneshot::Sender<Vec<u8>>>,
    /// The other peer's sealed box, for this peer.
    pub(super) sealed_in: Option<oneshot::Receiver<Vec<u8>>>,
    tx: mpsc::Sender<Vec<u8>>,
    rx: mpsc::Receiver<Vec<u8>>,
    budget: Arc<AtomicU64>,
    /// The pair's pace, both directions together.
    pace: Arc<Mutex<Pace>>,
}

pub(super) fn relay_ends(budget: u64, rate: u64) -> (RelayEnd, RelayEnd) {
    let (to_b, from_a) = mpsc::channel(RELAY_QUEUE);
    let (to_a, from_b) = mpsc::channel(RELAY_QUEUE);
    let (sealed_to_b, sealed_from_a) = oneshot::channel();
    let (sealed_to_a, sealed_from_b) = oneshot::channel();
    let budget = Arc::new(AtomicU64::new(budget));
    let burst = rate.saturating_mul(RELAY_BURST_SECONDS);
    let pace = Arc::new(Mutex::new(Pace::new(
        rate,
        burst,
        Instant::now().into_std(),
    )));
    (
        RelayEnd {
            sealed_out: Some(sealed_to_b),
            sealed_in: Some(sealed_from_b),
            tx: to_b,
            rx: from_b,
            budget: budget.clone(),
            pace: pace.clone(),
        },
        RelayEnd {
            sealed_out: Some(sealed_to_a),
            sealed_in: Some(sealed_from_a),
            tx: to_a,
            rx: from_a,
            budget,
            pace,
        },
    )
}

/// A relayed pair may send this many seconds' worth of its rate at once (a
/// pasted page, say) before the pace applies.
const RELAY_BURST_SECONDS: u64 = 4;

/// Gives back a relay slot (the server's, and its source's) however the relay
/// ends.
struct RelaySlot<'a> {
    shared: &'a Shared,
    ip: IpAddr,
}

impl Drop for RelaySlot<'_> {
    fn drop(&mut self) {
        self.shared.relaying.fetch_sub(1, Ordering::Relaxed);
        self.shared.config.metrics.relaying.dec();
        self.shared.limits().relays.release(self.ip);
    }
}

/// Why a relay was refused.
enum RelayRefusal {
    /// The server relays all it may.
    Full,
    /// This address or network has its share of relays.
    Source(Refused),
}

impl Shared {
    /// Takes a relay slot for a connection from `ip`: one of the server's, and
    /// one of its address' and network's. The slot gives them back when dropped.
    fn take_relay(&self, ip: IpAddr) -> Result<RelaySlot<'_>, RelayRefusal> {
        self.limits()
            .relays
            .acquire(ip)
            .map_err(RelayRefusal::Source)?;
        // Two connections a pair.
        let cap = self.config.max_relays.saturating_mul(2);
        if self.relaying.fetch_add(1, Ordering::Relaxed) >= cap {
            self.relaying.fetch_sub(1, Ordering::Relaxed);
            self.limits().relays.release(ip);
            return Err(RelayRefusal::Full);
        }
        self.config.metrics.relaying.inc();
        Ok(RelaySlot { shared: self, ip })
    }
}

/// Carries this peer's relayed bytes to the other peer of the pair and back,
/// until either leaves, the pair's allowance is spent, the relay idles or
/// reaches its lifetime, or the server stops. The server never looks inside: it
/// is the peers' encrypted link. `ip` is this peer's address, whose share of
/// relays the relay takes.
pub(super) async fn relay_for(
    conn: &mut Conn,
    shared: &Shared,
    end: RelayEnd,
    stop: &mut watch::Receiver<bool>,
    id: ConnId,
    ip: IpAddr,
) -> Result<(), ConnError> {
    let metrics = &*shared.config.metrics;
    if !shared.config.relay {
        let msg = "this rendezvous does not relay; a direct connection is the only way through it";
        return reject(conn, metrics, Reject::relay_off, msg).await;
    }
    let _slot = match shared.take_relay(ip) {
        Ok(slot) => slot,
        Err(RelayRefusal::Full) => {
            let msg = format!(
                "the rendezvous already relays as many chats as it may ({}); try again later",
                shared.config.max_relays
            );
            return reject(conn, metrics, Reject::relay_full, msg).await;
        }
        Err(RelayRefusal::Source(refused)) => {
            let msg = format!(
                "the rendezvous already relays {} connections for {}, as many as it may; try again later",
                refused.limit,
                refused.whose()
            );
            return reject(conn, metrics, Reject::for_relays(refused.scope), msg).await;
        }
    };
    send(conn, ServerToPeer::Relaying).await?;
    info!(id, "relaying");
    let ends_at = Instant::now() + shared.config.relay_lifetime;
    let mut last = Instant::now();
    // A piece read from this peer, waiting for its time (the pair's pace) and for
    // room in the other task's queue. While one waits, nothing more is read from
    // this peer (TCP's flow control slows it down), but pieces for it are still
    // passed on: two tasks each waiting for the other to make room cannot stall.
    let mut pending: Option<(Vec<u8>, Instant)> = None;
    let RelayEnd {
        tx,
        mut rx,
        budget,
        pace,
        ..
    } = end;
    loop {
        let due = pending.as_ref().map(|(_, at)| *at);
        tokio::select! {
            frame = conn.next(), if pending.is_none() => match frame {
                Some(Ok(PeerToServer::Relayed(bytes))) => {
                    last = Instant::now();
                    if bytes.len() > punchline_proto::MAX_RELAY_CHUNK {
                        return Err(ConnError::Protocol(format!("relayed piece of {} bytes", bytes.len())));
                    }
                    let n = bytes.len() as u64;
                    let spent = budget.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| left.checked_sub(n));
                    if spent.is_err() {
                        let msg = format!(
                            "this chat used up what the rendezvous relays for one chat ({} bytes); a direct connection has no such limit",
                            shared.config.relay_bytes
                        );
                        return reject(conn, metrics, Reject::relay_budget, msg).await;
                    }
                    metrics.relayed_bytes.inc_by(n);
                    let wait = pace
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .take(bytes.len(), Instant::now().into_std());
                    pending = Some((bytes, Instant::now() + wait));
                }
                Some(Ok(PeerToServer::Pong { .. } | PeerToServer::Report(_) | PeerToServer::Sealed(_))) => {}
                None => return Ok(()),
                Some(Ok(other)) => {
                    return Err(ConnError::Protocol(format!("unexpected {} while relaying", kind(&other))))
                }
                Some(Err(e)) => return Err(e.into()),
            },
            permit = async {
                if let Some(at) = due {
                    sleep_until(at).await;
                }
                tx.reserve().await
            }, if due.is_some() => match (permit, pending.take()) {
                (Ok(permit), Some((bytes, _))) => permit.send(bytes),
                // The other peer's side is gone: closing tells this peer its link
                // dropped.
                _ => return Ok(()),
            },
            piece = rx.recv() => match piece {
                Some(bytes) => {
                    last = Instant::now();
                    send(conn, ServerToPeer::Relayed(bytes)).await?;
                }
                None => return Ok(()),
            },
            _ = sleep_until(last + RELAY_IDLE_TIMEOUT) => {
                debug!(id, "relay idle");
                return Ok(());
            }
            _ = sleep_until(ends_at) => {
                let msg = format!(
                    "this relay reached its time limit ({}); the chat continues over a new link",
                    human(shared.config.relay_lifetime)
                );
                return reject(conn, metrics, Reject::relay_lifetime, msg).await;
            }
            _ = stop.changed() => {
                send(conn, ServerToPeer::error(ErrorCode::ShuttingDown, "the rendezvous server is shutting down")).await?;
                return Ok(());
            }
        }
    }
}

/// A duration for a message: `1 h`, `30 min`, `90 s`.
fn human(d: Duration) -> String {
    if d.subsec_nanos() != 0 {
        return format!("{d:?}");
    }
    match d.as_secs() {
        s if s >= 3600 && s % 3600 == 0 => format!("{} h", s / 3600),
        s if s >= 60 && s % 60 == 0 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}
