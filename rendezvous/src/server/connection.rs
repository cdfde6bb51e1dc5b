//! One connection's exchange with a peer, from the accept to its end.
//!
//! One connection, step by step:
//! 1. The peer sends [`Hello`] within [`Config::hello_timeout`]. A wrong version, a
//!    malformed frame or a bad field gets an error message and the connection ends.
//! 2. The peer joins the pairing table ([`Rooms`]) under its code, and is answered
//!    [`ServerToPeer::Welcome`] with its observed address.
//!    - First of the code: it waits, answering pings (RTT samples, and traffic that
//!      keeps its NAT mapping alive) until the second peer arrives or the wait
//!      expires.
//!    - Second: the pair is made. The joining task computes both go delays
//!      ([`go_delays`]) and hands the waiting task its go through a channel.
//!    - Third: "code already in use" instead of the welcome.
//! 3. Each task sends its go at once, with its delay in it (how much later the
//!    other peer gets its go), then keeps the connection
//!    open while the peers punch (their NAT mappings depend on it), until the peer
//!    reports the outcome or leaves (or asks for a relay: see `relay`).
//!
//! Also the connection's framing, its bounded writes, and the errors it is sent.
//!
//! [`Config::hello_timeout`]: super::Config::hello_timeout
//! [`Rooms`]: punchline_proto::pairing::Rooms

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use punchline_net::kernel_rtt;
use punchline_proto::limits::Refused;
use punchline_proto::pairing::{ConnId, Join};
use punchline_proto::timing::{go_delays, RttEstimator};
use punchline_proto::{
    classify_mapping, validate_hello, CodecError, ErrorCode, FrameCodec, Go, Hello, PeerInfo,
    PeerToServer, PunchOutcome, ResumeRoom, Role, ServerToPeer, SessionToken, PROTOCOL_VERSION,
};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch};
use tokio::time::{sleep_until, timeout, timeout_at, Instant};
use tokio_util::codec::Framed;
use tracing::{debug, info};

use super::admission::Admission;
use super::probe::{dial_back, probe_wait};
use super::relay::{relay_ends, relay_for, RelayEnd};
use super::{canonical, Event, Shared, Waiting, REPORT_TIMEOUT};
use crate::metrics::Metrics;
use crate::reject::Reject;

/// Pings sent quickly after the hello, to get a few RTT samples early.
const EARLY_PINGS: u32 = 3;
/// Spacing of the early pings.
const EARLY_PING_INTERVAL: Duration = Duration::from_millis(200);
/// Spacing of later pings while waiting.
use punchline_proto::defaults::SERVER_PING_INTERVAL as PING_INTERVAL;

/// Bound on any single write to a peer: a peer that stops reading is dropped.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// What ended a connection abnormally.
#[derive(Debug, thiserror::Error)]
pub(super) enum ConnError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("timed out: {0}")]
    Timeout(&'static str),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("rejected: {0}")]
    Rejected(String),
}

/// Where a peer stands once it joined its code.
enum Joined {
    /// Second of the code: send this go after this delay.
    Paired(Box<Go>, Duration, RelayEnd),
    /// First: wait for the one event the pairing table will send.
    Waiting(oneshot::Receiver<Event>),
}

/// A peer's connection: its TCP stream, framed by the protocol's codec.
pub(super) type Conn = Framed<TcpStream, FrameCodec<PeerToServer, ServerToPeer>>;

/// Starting size of a connection's read and write buffers. Every message to and
/// from the server but a hello fits in it, and the buffers grow on demand up to
/// one frame; the codec's default (8 KiB each) would be most of what a waiting
/// peer costs.
const CONN_BUFFER: usize = 256;

/// Frames a peer's stream, with [`CONN_BUFFER`] buffers.
pub(super) fn framed(stream: TcpStream) -> Conn {
    Framed::with_capacity(stream, FrameCodec::new(), CONN_BUFFER)
}

/// Runs one connection and logs how it ended.
pub(super) async fn connection(
    id: ConnId,
    stream: TcpStream,
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
    admission: Admission,
) {
    let addr = canonical(addr);
    let metrics = shared.config.metrics.clone();
    metrics.accepted.inc();
    metrics.open.inc();
    let result = serve(id, stream, addr, &shared, stop, admission).await;
    metrics.open.dec();
    if admission == Admission::Admitted {
        shared.release(addr.ip());
    }
    match result {
        Ok(()) => debug!(id, %addr, "connection closed"),
        Err(e) => info!(id, %addr, error = %e, "connection ended"),
    }
}

/// Removes the connection from the pairing table whatever way it ends.
struct RoomGuard<'a> {
    shared: &'a Shared,
    nameplate: String,
    id: ConnId,
}

impl Drop for RoomGuard<'_> {
    fn drop(&mut self) {
        self.shared.rooms().leave(&self.nameplate, self.id);
    }
}

async fn serve(
    id: ConnId,
    stream: TcpStream,
    observed: SocketAddr,
    shared: &Shared,
    mut stop: watch::Receiver<bool>,
    admission: Admission,
) -> Result<(), ConnError> {
    let _ = stream.set_nodelay(true);
    let mut estimator = RttEstimator::new();
    if let Some(rtt) = kernel_rtt(&stream) {
        estimator.add(rtt);
    }
    let mut conn = framed(stream);
    let metrics = &*shared.config.metrics;
    if let Some((reason, message)) = admission.refusal() {
        return reject(&mut conn, metrics, reason, message).await;
    }

    // 1. Hello, after the requests that may come first: a nameplate allocation
    //    if the peer starts a new code; reflection and dial-back for the doctor.
    let too_many_codes = |refused: Refused| {
        format!(
            "{} opens new codes too fast (at most {} a minute); try again in a minute",
            refused.whose(),
            refused.limit
        )
    };
    // All of it within the hello timeout, counted from the accept.
    let hello_deadline = Instant::now() + shared.config.hello_timeout;
    // An allocation counts as the new code its hello then opens.
    let mut code_counted = false;
    let mut dialed = false;
    let hello = loop {
        let Some(request) = next_request(&mut conn, metrics, hello_deadline).await? else {
            return Ok(());
        };
        match request {
            PeerToServer::Hello(hello) => break hello,
            PeerToServer::Allocate if !code_counted => {
                code_counted = true;
                if let Err(refused) = shared.new_code(observed.ip()) {
                    let reason = Reject::for_code_rate(refused.scope);
                    return reject(&mut conn, metrics, reason, too_many_codes(refused)).await;
                }
                // The nameplate is not reserved between this answer and the hello
                // (one round trip); a peer that joins it by chance in between would
                // pair with this one, and the key exchange would fail for both: a
                // failed guess. Drawn at random, so nobody can aim for it.
                let mut no_randomness = None;
                let drawn = shared.rooms().random_free_number(|n| {
                    // The modulo's bias is below n / 2^64: nothing for n < 10^9.
                    getrandom::u64().unwrap_or_else(|e| {
                        no_randomness = Some(e);
                        0
                    }) % n
                });
                if let Some(e) = no_randomness {
                    return Err(ConnError::Rejected(format!("no randomness: {e}")));
                }
                let Some(nameplate) = drawn else {
                    return reject(
                        &mut conn,
                        metrics,
                        Reject::rooms_full,
                        "no free nameplate; try again later",
                    )
                    .await;
                };
                send(&mut conn, ServerToPeer::Allocated { nameplate }).await?;
            }
            PeerToServer::Reflect => {
                let alternate_port = shared.config.probes.alternate_port();
                send(
                    &mut conn,
                    ServerToPeer::Observed {
                        observed,
                        alternate_port,
                    },
                )
                .await?
            }
            PeerToServer::DialBack if !dialed => {
                dialed = true;
                let answer = dial_back(observed).await;
                send(&mut conn, answer).await?;
            }
            other => {
                let msg = format!("expected a hello, got {}", kind(&other));
                return reject(&mut conn, metrics, Reject::malformed, msg).await;
            }
        }
    };
    if hello.version != PROTOCOL_VERSION {
        return reject(
            &mut conn,
            metrics,
            Reject::version,
            version_message(hello.version),
        )
        .await;
    }
    if let Err(e) = validate_hello(&hello) {
        return reject(&mut conn, metrics, Reject::malformed, e.to_string()).await;
    }

    let Hello {
        nameplate,
        probe_observed,
        pake,
        resume,
        probe_token,
        other_family_token,
        mapped,
        ..
    } = hello;
    // A port the peer's router forwards: passed on only at the address this
    // connection came from. Anywhere else it is nothing of this peer's (a
    // mapping at a router behind a carrier's NAT, or a hostile peer naming a
    // third host for the other peer's SYNs).
    let mapped = mapped
        .map(canonical)
        .filter(|m| m.ip() == observed.ip() && m.port() != 0);
    // What the probe port saw: reported by the peer, or (when it probes beside
    // its hello) found by its token; and what it saw of the peer over the other
    // address family, found the same way. Both come within about the same
    // time, and are waited for together.
    let wait = probe_wait(estimator.estimate());
    let probes = &shared.config.probes;
    let (probe_observed, other_family) = tokio::join!(
        async {
            match (probe_observed, probe_token) {
                (Some(seen), _) => Some(seen),
                (None, Some(token)) => probes.wait_for(&token, wait).await,
                (None, None) => None,
            }
        },
        async {
            match other_family_token {
                Some(token) => probes.wait_for(&token, wait).await,
                None => None,
            }
        }
    );
    // Only an address of the other family: a second sighting of the same
    // family says nothing the main connection did not.
    let other_family = other_family
        .map(canonical)
        .filter(|seen| seen.is_ipv4() != observed.is_ipv4());
    // Peers resuming a chat meet in the room they derived from its secret,
    // apart from the nameplates (which may have been given to someone else
    // since).
    let nameplate = match resume {
        Some(room) => resume_room(&room),
        None => nameplate,
    };
    // What the logs call the room: a resumed chat's room name lets whoever
    // knows it block that chat's next meeting, so it is not written down.
    let room = if resume.is_some() {
        "(resumed chat)"
    } else {
        nameplate.as_str()
    };
    let mapping = classify_mapping(observed, probe_observed.map(canonical));
    let me = PeerInfo {
        observed,
        mapping,
        pake,
        other_family,
        mapped,
    };

    // 2. Pairing.
    let rtt_us = Arc::new(AtomicU64::new(micros(estimator.estimate())));
    let mut joined = None;
    // At most two rounds: a second only if the waiting peer vanished as we joined.
    for _ in 0..2 {
        let (events_tx, events) = oneshot::channel();
        let outcome = shared.rooms().join(
            &nameplate,
            id,
            Waiting {
                events: events_tx,
                rtt_us: rtt_us.clone(),
                info: me.clone(),
            },
            Instant::now().into_std(),
        );
        match outcome {
            Join::Paired { other, value } => {
                let mut session: SessionToken = [0; punchline_proto::SESSION_LEN];
                getrandom::fill(&mut session)
                    .map_err(|e| ConnError::Rejected(format!("no randomness: {e}")))?;
                let their_rtt = Duration::from_micros(value.rtt_us.load(Ordering::Relaxed));
                let my_rtt = estimator.estimate().unwrap_or(Duration::ZERO);
                let (their_delay, my_delay) = if shared.config.synchronise_go {
                    go_delays(their_rtt, my_rtt)
                } else {
                    (Duration::ZERO, Duration::ZERO)
                };
                let theirs = Go {
                    peer: me.clone(),
                    role: Role::Leader,
                    session,
                    others_go_after_us: 0,
                };
                let (relay_mine, relay_theirs) =
                    relay_ends(shared.config.relay_bytes, shared.config.relay_rate);
                let event = Event::Go {
                    go: Box::new(theirs),
                    delay: their_delay,
                    relay: relay_theirs,
                };
                if value.events.send(event).is_err() {
                    // The waiting peer's task ended (it disconnected) just before it
                    // could leave the table. Clear the room and join afresh.
                    let mut rooms = shared.rooms();
                    rooms.leave(&nameplate, other);
                    rooms.leave(&nameplate, id);
                    continue;
                }
                metrics.pairs.inc();
                info!(nameplate = %room, a = %value.info.observed, b = %observed,
                      mapping_a = ?value.info.mapping, mapping_b = ?mapping,
                      other_family_a = ?value.info.other_family, other_family_b = ?other_family,
                      rtt_a_ms = ms(their_rtt), rtt_b_ms = ms(my_rtt),
                      delay_a_ms = ms(their_delay), delay_b_ms = ms(my_delay), "pair made");
                let mine = Go {
                    peer: value.info,
                    role: Role::Follower,
                    session,
                    others_go_after_us: 0,
                };
                joined = Some(Joined::Paired(Box::new(mine), my_delay, relay_mine));
            }
            Join::Waiting => {
                // A new room: counts against the source's rate of new codes.
                if !code_counted {
                    if let Err(refused) = shared.new_code(observed.ip()) {
                        shared.rooms().leave(&nameplate, id);
                        let reason = Reject::for_code_rate(refused.scope);
                        return reject(&mut conn, metrics, reason, too_many_codes(refused)).await;
                    }
                }
                joined = Some(Joined::Waiting(events));
            }
            Join::InUse => {
                let msg = if resume.is_some() {
                    "this chat is already being resumed by two peers".to_owned()
                } else {
                    format!(
                        "code {nameplate}-… is already in use by two peers: start again with a new code"
                    )
                };
                return reject(&mut conn, metrics, Reject::code_in_use, msg).await;
            }
            Join::Full => {
                return reject(
                    &mut conn,
                    metrics,
                    Reject::rooms_full,
                    "the server holds too many codes right now; try again later",
                )
                .await;
            }
        }
        break;
    }
    let Some(joined) = joined else {
        // The code's first peer vanished twice in a row as this one joined.
        return reject(
            &mut conn,
            metrics,
            Reject::rooms_full,
            "could not join the code just now; try again",
        )
        .await;
    };
    let _guard = RoomGuard {
        shared,
        nameplate: nameplate.clone(),
        id,
    };

    // Welcome, once the code is known to be usable.
    send(&mut conn, ServerToPeer::Welcome { observed, mapping }).await?;

    let (go, delay, relay) = match joined {
        Joined::Paired(go, delay, relay) => (*go, delay, relay),
        Joined::Waiting(mut events) => {
            info!(id, nameplate = %room, %observed, ?mapping, "peer waiting");
            match wait_for_pair(
                &mut conn,
                metrics,
                shared.config.idle_timeout,
                &mut events,
                &mut estimator,
                &rtt_us,
                &mut stop,
            )
            .await?
            {
                Some(paired) => paired,
                None => return Ok(()),
            }
        }
    };

    // 3. The go, at once, saying how much later the other peer gets its own
    // (the nearer peer may punch at once, see `Go::others_go_after_us`); then
    // hold the connection during the punch.
    let mut go = go;
    go.others_go_after_us = u32::try_from(delay.as_micros()).unwrap_or(u32::MAX);
    send(&mut conn, ServerToPeer::Go(go)).await?;
    debug!(id, delay_ms = ms(delay), "go sent");
    // The report, or after a failed punch a request to relay; meanwhile each
    // peer's sealed box (its candidates, which only the other peer can open)
    // passes to the other, once each way.
    let mut relay = relay;
    let next = timeout(REPORT_TIMEOUT, async {
        loop {
            let frame = tokio::select! {
                frame = conn.next() => frame,
                sealed = async {
                    match relay.sealed_in.as_mut() {
                        Some(rx) => rx.await,
                        None => std::future::pending().await,
                    }
                } => {
                    relay.sealed_in = None;
                    if let Ok(sealed) = sealed {
                        send(&mut conn, ServerToPeer::Sealed(sealed)).await?;
                    }
                    continue;
                }
            };
            match frame {
                Some(Ok(PeerToServer::Sealed(sealed))) => {
                    if let Err(e) = punchline_proto::validate_sealed(&sealed) {
                        return Err(ConnError::Protocol(e.to_string()));
                    }
                    match relay.sealed_out.take() {
                        Some(tx) => {
                            let _ = tx.send(sealed);
                        }
                        None => return Err(ConnError::Protocol("a second sealed box".into())),
                    }
                }
                None => return Ok(false),
                Some(Ok(PeerToServer::Report(outcome))) => {
                    metrics.punch(&outcome);
                    match outcome {
                        PunchOutcome::Direct {
                            public,
                            attempts,
                            elapsed_ms,
                        } => {
                            info!(id, nameplate = %room, public, attempts, elapsed_ms, "punch succeeded");
                            return Ok(false);
                        }
                        PunchOutcome::Failed { attempts } => {
                            info!(id, nameplate = %room, attempts, "punch failed")
                        }
                    }
                }
                Some(Ok(PeerToServer::Relay)) => return Ok(true),
                Some(Ok(PeerToServer::Pong { .. })) => {}
                Some(Ok(other)) => {
                    return Err(ConnError::Protocol(format!(
                        "unexpected {} after go",
                        kind(&other)
                    )))
                }
                Some(Err(e)) => return Err(e.into()),
            }
        }
    });
    match next.await {
        Ok(Ok(true)) => relay_for(&mut conn, shared, relay, &mut stop, id, observed.ip()).await,
        Ok(Ok(false)) => Ok(()),
        Ok(Err(e)) => Err(e),
        Err(_) => {
            debug!(id, "no punch report in time");
            Ok(())
        }
    }
}

/// The waiting phase: ping, collect RTT samples, until paired (`Some`), or the peer
/// left, the wait expired or the server stops (`None`).
async fn wait_for_pair(
    conn: &mut Conn,
    metrics: &Metrics,
    idle_timeout: Duration,
    events: &mut oneshot::Receiver<Event>,
    estimator: &mut RttEstimator,
    rtt_us: &AtomicU64,
    stop: &mut watch::Receiver<bool>,
) -> Result<Option<(Go, Duration, RelayEnd)>, ConnError> {
    let mut seq: u32 = 0;
    let mut outstanding: Option<(u32, Instant)> = None;
    let mut next_ping = Instant::now();
    let mut last_heard = Instant::now();
    loop {
        tokio::select! {
            event = &mut *events => match event {
                Ok(Event::Go { go, delay, relay }) => return Ok(Some((*go, delay, relay))),
                Ok(Event::Expired) | Err(_) => {
                    let msg = "nobody joined with this code in time; start again and share the code";
                    send(conn, ServerToPeer::error(ErrorCode::Expired, msg)).await?;
                    return Ok(None);
                }
            },
            frame = conn.next() => match frame {
                None => return Ok(None),
                Some(Ok(PeerToServer::Pong { seq: got })) => {
                    last_heard = Instant::now();
                    if let Some((want, sent)) = outstanding {
                        if got == want {
                            estimator.add(sent.elapsed());
                            rtt_us.store(micros(estimator.estimate()), Ordering::Relaxed);
                            outstanding = None;
                        }
                    }
                }
                Some(Ok(other)) => {
                    let msg = format!("unexpected {} while waiting", kind(&other));
                    return reject(conn, metrics, Reject::malformed, msg).await.map(|()| None);
                }
                Some(Err(e)) => return Err(e.into()),
            },
            _ = sleep_until(next_ping) => {
                if last_heard.elapsed() >= idle_timeout {
                    let msg = "no answer to pings for too long";
                    return reject(conn, metrics, Reject::idle, msg).await.map(|()| None);
                }
                seq = seq.wrapping_add(1);
                send(conn, ServerToPeer::Ping { seq }).await?;
                let now = Instant::now();
                outstanding = Some((seq, now));
                // At least three pings within the idle timeout.
                let interval = if seq < EARLY_PINGS { EARLY_PING_INTERVAL } else { PING_INTERVAL };
                next_ping = now + interval.min(idle_timeout / 3);
            }
            _ = stop.changed() => {
                send(conn, ServerToPeer::error(ErrorCode::ShuttingDown, "the rendezvous server is shutting down")).await?;
                return Ok(None);
            }
        }
    }
}

/// The next request before the hello, within `limit`. A frame of another
/// protocol version is answered with a version error; a malformed one with a
/// malformed error; both end the connection. `None`: the peer closed.
async fn next_request(
    conn: &mut Conn,
    metrics: &Metrics,
    deadline: Instant,
) -> Result<Option<PeerToServer>, ConnError> {
    match timeout_at(deadline, conn.next()).await {
        Err(_) => {
            let _ = reject(
                conn,
                metrics,
                Reject::hello_timeout,
                "no hello received in time",
            )
            .await;
            Err(ConnError::Timeout("waiting for hello"))
        }
        Ok(None) => Ok(None),
        Ok(Some(Ok(msg))) => Ok(Some(msg)),
        Ok(Some(Err(CodecError::Decode {
            hello_version: Some(v),
            ..
        }))) if v != PROTOCOL_VERSION => reject(conn, metrics, Reject::version, version_message(v))
            .await
            .map(|()| None),
        Ok(Some(Err(CodecError::Io(e)))) => Err(CodecError::Io(e).into()),
        Ok(Some(Err(e))) => reject(conn, metrics, Reject::malformed, format!("bad hello: {e}"))
            .await
            .map(|()| None),
    }
}

/// Sends an error to the peer (best effort), then ends the connection with it.
pub(super) async fn reject(
    conn: &mut Conn,
    metrics: &Metrics,
    reason: Reject,
    message: impl Into<String>,
) -> Result<(), ConnError> {
    let message = message.into();
    metrics.reject(reason);
    let _ = send(conn, ServerToPeer::error(reason.code(), message.clone())).await;
    Err(ConnError::Rejected(message))
}

/// Sends `msg` to the peer within [`SEND_TIMEOUT`].
pub(super) async fn send(conn: &mut Conn, msg: ServerToPeer) -> Result<(), ConnError> {
    match timeout(SEND_TIMEOUT, conn.send(msg)).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(ConnError::Timeout("peer not reading")),
    }
}

fn version_message(theirs: u16) -> String {
    format!(
        "this rendezvous speaks protocol version {PROTOCOL_VERSION}, your peer speaks version {theirs}: use matching versions of punchline"
    )
}

/// What `msg` is, in words, for an error message.
pub(super) fn kind(msg: &PeerToServer) -> &'static str {
    match msg {
        PeerToServer::Hello(_) => "hello",
        PeerToServer::Pong { .. } => "pong",
        PeerToServer::Report(_) => "report",
        PeerToServer::Allocate => "allocate",
        PeerToServer::Reflect => "reflect",
        PeerToServer::DialBack => "dial-back",
        PeerToServer::Relay => "relay request",
        PeerToServer::Relayed(_) => "relayed data",
        PeerToServer::Sealed(_) => "sealed box",
        PeerToServer::Probe { .. } => "probe token",
    }
}

fn micros(d: Option<Duration>) -> u64 {
    d.map_or(0, |d| d.as_micros().try_into().unwrap_or(u64::MAX))
}

/// The room of a resumed chat: `r` and the room the peers derived, in hex (never
/// a valid nameplate, which is all digits).
fn resume_room(derived: &ResumeRoom) -> String {
    let mut room = String::with_capacity(1 + 2 * derived.len());
    room.push('r');
    for b in derived {
        room.push_str(&format!("{b:02x}"));
    }
    room
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
