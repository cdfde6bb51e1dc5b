//! The punch: simultaneous TCP open on every candidate address at once.
//!
//! 1. Candidates: the other's observed (public) address first, then its LAN
//!    addresses (two hosts behind the same NAT meet there; most NATs do not hairpin).
//! 2. One task per candidate connects from our fixed port and retries on refusal,
//!    silence or a busy 4-tuple, with the cadence of [`punchline_proto::punch`],
//!    until the deadline. Our SYN opens our NAT for the other's SYN; when the two
//!    cross, both sockets, still in SYN_SENT, complete the handshake.
//! 3. On a connected socket both ends send a link hello and check the other's
//!    ([`punchline_proto::link`]): a wrong host or a self-connect is dropped, and
//!    that candidate is not tried again.
//! 4. The leader keeps the first verified link and says so with `Select`; the
//!    follower keeps the link on which `Select` arrives. Every other link and task
//!    is dropped, so exactly one TCP connection survives on both ends.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::{SinkExt, StreamExt};
use punchline_proto::link::{link_hello, verify_link_hello, LinkRejected};
use punchline_proto::punch::{AttemptFailure, RetryPolicy, ATTEMPT_TIMEOUT};
use punchline_proto::{FrameCodec, Go, Mapping, PeerToPeer, Role, SessionToken, MAX_CANDIDATES};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{sleep, sleep_until, timeout, timeout_at, Instant};
use tokio_util::codec::Framed;
use tracing::debug;

use crate::error::PeerError;
use crate::net::{fixed_port_socket, LinkStream};

/// The framed link between the two peers.
pub type Link = Framed<LinkStream, FrameCodec<PeerToPeer, PeerToPeer>>;

/// Time the far end of a fresh link has to send its link hello. The real peer
/// sends it at once; anything slower is some other program.
pub const LINK_HELLO_TIMEOUT: Duration = Duration::from_secs(3);

/// Deadline of the punch when a NAT on either side is known to give each
/// destination its own port: only LAN candidates can work then, and on a LAN an
/// answer comes within milliseconds.
pub const LAN_ONLY_DEADLINE: Duration = Duration::from_secs(2);

/// Extra time the follower waits for the leader's `Select` after the deadline:
/// a link the leader verified just in time still needs to carry it over.
pub const SELECT_GRACE: Duration = Duration::from_secs(2);

/// Where a candidate address came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CandidateKind {
    /// The other's address as the rendezvous observed it.
    Public,
    /// One of the other's own interface addresses (or one it announced by hand).
    Lan,
}

impl CandidateKind {
    /// Words for the status line.
    pub fn describe(self) -> &'static str {
        match self {
            CandidateKind::Public => "public address",
            CandidateKind::Lan => "LAN address",
        }
    }
}

/// A successful punch.
pub struct Punched {
    /// The one link both peers kept.
    pub link: Link,
    /// The other's address on that link.
    pub remote: SocketAddr,
    /// Which candidate it was.
    pub kind: CandidateKind,
    /// Connection attempts made, on all candidates.
    pub attempts: u32,
    /// Time from the go to the TCP connection being established.
    pub elapsed: Duration,
}

/// What the punch needs besides the go.
pub struct PunchParams {
    /// Our fixed local port.
    pub local_port: u16,
    /// How long to keep trying.
    pub deadline: Duration,
    /// Our address as the rendezvous saw it.
    pub our_observed: SocketAddr,
    /// How our NAT maps our port.
    pub our_mapping: Mapping,
    /// How attempts are paced.
    pub policy: RetryPolicy,
}

/// The candidate addresses to try, public first, without duplicates. At most
/// [`MAX_CANDIDATES`] LAN candidates are taken, as many as a hello may carry: a
/// hostile rendezvous cannot make us send SYNs to a long list of addresses.
pub fn candidates(go: &Go) -> Vec<(SocketAddr, CandidateKind)> {
    let mut out = vec![(go.peer.observed, CandidateKind::Public)];
    for &addr in go.peer.candidates.iter().take(MAX_CANDIDATES) {
        if !out.iter().any(|(a, _)| *a == addr) {
            out.push((addr, CandidateKind::Lan));
        }
    }
    out
}

/// What happened on one candidate, for the diagnosis when everything fails.
#[derive(Debug, Default, Clone)]
struct Tally {
    attempts: u32,
    refused: u32,
    no_answer: u32,
    other: u32,
    rejected: Option<LinkRejected>,
    last_error: Option<String>,
}

type Tallies = Arc<Mutex<Vec<Tally>>>;

fn with_tally<R>(tallies: &Tallies, i: usize, f: impl FnOnce(&mut Tally) -> R) -> R {
    let mut t = tallies.lock().unwrap_or_else(|e| e.into_inner());
    f(&mut t[i])
}

/// A link that reached the expected peer.
struct Verified {
    link: Link,
    remote: SocketAddr,
    kind: CandidateKind,
    elapsed: Duration,
}

/// Punches a direct link to the peer of `go`. `start` is when the go arrived.
pub async fn punch(go: &Go, params: &PunchParams, start: Instant) -> Result<Punched, PeerError> {
    let mut candidates = candidates(go);
    let mut deadline = start + params.deadline;
    if params.our_mapping.is_symmetric() || go.peer.mapping.is_symmetric() {
        // Our SYNs would leave from a port the other side was not told about, or
        // go to a port its NAT never opened for us: fail fast, unless the other
        // side is on one of our LANs.
        candidates.retain(|(_, kind)| *kind == CandidateKind::Lan);
        deadline = start + params.deadline.min(LAN_ONLY_DEADLINE);
    }
    let tallies: Tallies = Arc::new(Mutex::new(vec![Tally::default(); candidates.len()]));
    let (tx, mut rx) = mpsc::channel(candidates.len());
    let mut tasks = JoinSet::new();
    for (i, &(addr, kind)) in candidates.iter().enumerate() {
        tasks.spawn(try_candidate(Candidate {
            index: i,
            addr,
            kind,
            port: params.local_port,
            session: go.session,
            role: go.role,
            start,
            deadline,
            policy: params.policy,
            tallies: tallies.clone(),
            found: tx.clone(),
        }));
    }
    drop(tx);

    let chosen = match go.role {
        Role::Leader => lead(&mut rx, deadline).await,
        Role::Follower => follow(&mut rx, deadline + SELECT_GRACE).await,
    };
    tasks.abort_all();
    let tallies = tallies.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let attempts = tallies.iter().map(|t| t.attempts).sum();
    match chosen {
        Some(v) => Ok(Punched {
            link: v.link,
            remote: v.remote,
            kind: v.kind,
            attempts,
            elapsed: v.elapsed,
        }),
        None => Err(PeerError::PunchFailed {
            name: go.peer.name.clone(),
            attempts,
            secs: start.elapsed().as_secs_f64(),
            diagnosis: diagnose(go, params, &candidates, &tallies),
        }),
    }
}

/// Leader: the first verified link wins; tell the follower.
async fn lead(rx: &mut mpsc::Receiver<Verified>, deadline: Instant) -> Option<Verified> {
    loop {
        let mut v = timeout_at(deadline, rx.recv()).await.ok()??;
        match timeout(LINK_HELLO_TIMEOUT, v.link.send(PeerToPeer::Select)).await {
            Ok(Ok(())) => return Some(v),
            // That link broke at once; another candidate may still come.
            _ => debug!(remote = %v.remote, "link failed while selecting it"),
        }
    }
}

/// Follower: keep the verified link on which the leader's `Select` arrives.
async fn follow(rx: &mut mpsc::Receiver<Verified>, deadline: Instant) -> Option<Verified> {
    let mut pending = FuturesUnordered::new();
    let mut open = true;
    loop {
        tokio::select! {
            v = rx.recv(), if open => match v {
                Some(mut v) => pending.push(async move {
                    let first = timeout_at(deadline, v.link.next()).await;
                    (v, matches!(first, Ok(Some(Ok(PeerToPeer::Select)))))
                }),
                None => open = false,
            },
            Some((v, selected)) = pending.next(), if !pending.is_empty() => {
                if selected {
                    return Some(v);
                }
                debug!(remote = %v.remote, "leader did not select this link");
            }
            _ = sleep_until(deadline) => return None,
        }
        if !open && pending.is_empty() {
            return None;
        }
    }
}

struct Candidate {
    index: usize,
    addr: SocketAddr,
    kind: CandidateKind,
    port: u16,
    session: SessionToken,
    role: Role,
    start: Instant,
    deadline: Instant,
    policy: RetryPolicy,
    tallies: Tallies,
    found: mpsc::Sender<Verified>,
}

/// Connects to one candidate from the fixed port until a verified link, a proof
/// that the candidate is the wrong host, or the deadline.
async fn try_candidate(c: Candidate) {
    let mut attempt: u32 = 0;
    loop {
        let now = Instant::now();
        if now >= c.deadline {
            return;
        }
        attempt += 1;
        with_tally(&c.tallies, c.index, |t| t.attempts += 1);
        let failure = match connect_once(&c, c.deadline - now).await {
            Ok(stream) => {
                let elapsed = c.start.elapsed();
                debug!(addr = %c.addr, attempt, ?elapsed, "connected; verifying");
                match verify(stream, &c.session, c.role).await {
                    Ok(link) => {
                        let v = Verified {
                            link,
                            remote: c.addr,
                            kind: c.kind,
                            elapsed,
                        };
                        let _ = c.found.send(v).await;
                        return;
                    }
                    Err(Verify::Rejected(r)) => {
                        debug!(addr = %c.addr, reason = %r, "not the expected peer");
                        with_tally(&c.tallies, c.index, |t| t.rejected = Some(r));
                        return;
                    }
                    Err(Verify::Broken(e)) => {
                        with_tally(&c.tallies, c.index, |t| t.last_error = Some(e.to_string()));
                        AttemptFailure::Other
                    }
                }
            }
            Err(failure) => failure,
        };
        with_tally(&c.tallies, c.index, |t| match failure {
            AttemptFailure::Refused => t.refused += 1,
            AttemptFailure::NoAnswer => t.no_answer += 1,
            AttemptFailure::AddressBusy | AttemptFailure::Other => t.other += 1,
        });
        let pause = c.policy.pause(failure, c.start.elapsed());
        tracing::trace!(addr = %c.addr, attempt, ?failure, ?pause, "attempt failed");
        if pause.is_zero() {
            // A zero-length tokio sleep still waits for the next timer tick (1 ms);
            // an immediate retry must not.
            tokio::task::yield_now().await;
        } else {
            let left = c.deadline.saturating_duration_since(Instant::now());
            sleep(pause.min(left)).await;
        }
    }
}

/// One connection attempt from the fixed port.
async fn connect_once(c: &Candidate, left: Duration) -> Result<TcpStream, AttemptFailure> {
    let socket = fixed_port_socket(c.addr, c.port).map_err(|e| classify(c, &e))?;
    match timeout(ATTEMPT_TIMEOUT.min(left), socket.connect(c.addr)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(classify(c, &e)),
        Err(_) => Err(AttemptFailure::NoAnswer),
    }
}

fn classify(c: &Candidate, e: &io::Error) -> AttemptFailure {
    let failure = match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => AttemptFailure::Refused,
        Some(libc::ETIMEDOUT) => AttemptFailure::NoAnswer,
        Some(libc::EADDRNOTAVAIL) | Some(libc::EADDRINUSE) => AttemptFailure::AddressBusy,
        _ => AttemptFailure::Other,
    };
    if failure != AttemptFailure::Refused {
        with_tally(&c.tallies, c.index, |t| t.last_error = Some(e.to_string()));
    }
    failure
}

enum Verify {
    Rejected(LinkRejected),
    Broken(io::Error),
}

/// Exchanges link hellos on a fresh connection.
async fn verify(stream: TcpStream, session: &SessionToken, role: Role) -> Result<Link, Verify> {
    let mut link = Framed::new(LinkStream::Tcp(stream), FrameCodec::new());
    let exchange = async {
        link.send(link_hello(*session, role)).await?;
        link.next().await.transpose()
    };
    match timeout(LINK_HELLO_TIMEOUT, exchange).await {
        Err(_) => Err(Verify::Rejected(LinkRejected::NotAHello)),
        Ok(Ok(Some(msg))) => match verify_link_hello(session, role, &msg) {
            Ok(()) => Ok(link),
            Err(r) => Err(Verify::Rejected(r)),
        },
        Ok(Ok(None)) => Err(Verify::Broken(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "closed before its link hello",
        ))),
        Ok(Err(punchline_proto::CodecError::Io(e))) => Err(Verify::Broken(e)),
        Ok(Err(_)) => Err(Verify::Rejected(LinkRejected::NotAHello)),
    }
}

/// The likely reason no candidate worked, in words.
fn diagnose(
    go: &Go,
    params: &PunchParams,
    candidates: &[(SocketAddr, CandidateKind)],
    tallies: &[Tally],
) -> String {
    let mut lines = Vec::new();
    if let Mapping::DependsOnDestination { first, second } = params.our_mapping {
        lines.push(format!(
            "This side's NAT gives each destination its own public port (the rendezvous saw \
             {first} on one port and {second} on another): a \"symmetric\" NAT. The other side \
             was told a port our connection attempts do not come from, so a direct connection \
             cannot be punched. Try from another network, or forward a port on your router and \
             offer it with --candidate."
        ));
    }
    if let Mapping::DependsOnDestination { first, second } = go.peer.mapping {
        lines.push(format!(
            "The other side's NAT gives each destination its own public port (the rendezvous saw \
             {first} on one port and {second} on another): a \"symmetric\" NAT. Our attempts \
             would go to a port it never opened for us, so a direct connection cannot be punched."
        ));
    }
    if !lines.is_empty() {
        // The cause is known; only the LAN candidates were tried.
        let lan: Vec<String> = candidates.iter().map(|(a, _)| a.to_string()).collect();
        if !lan.is_empty() {
            lines.push(format!(
                "The other side's LAN addresses ({}) did not answer either: it is not on a network shared with this one.",
                lan.join(", ")
            ));
        }
        return lines.join("\n");
    }
    let their_local_port = go.peer.candidates.first().map(|c| c.port());
    if let (Some(local), Mapping::Unknown) = (their_local_port, go.peer.mapping) {
        if local != go.peer.observed.port() {
            lines.push(format!(
                "The other side's NAT changed its port (local {local}, public {}). If that NAT \
                 picks a new port for every destination (a \"symmetric\" NAT), our attempts \
                 went to a port it never opened for us, and a direct link cannot be punched.",
                go.peer.observed.port()
            ));
        }
    }
    if params.our_mapping == Mapping::Unknown && params.our_observed.port() != params.local_port {
        lines.push(format!(
            "This side's NAT changed our port (local {}, public {}). If it picks a new port \
             for every destination (a \"symmetric\" NAT), the other side aimed at the wrong port.",
            params.local_port,
            params.our_observed.port()
        ));
    }
    let refused: u32 = tallies.iter().map(|t| t.refused).sum();
    let no_answer: u32 = tallies.iter().map(|t| t.no_answer).sum();
    if refused > 0 && refused >= no_answer {
        lines.push(
            "Most attempts were refused (a reset came back): the other side's NAT or firewall \
             rejects connections it did not expect, and the two sides' attempts never crossed. \
             Check that the other side is still running and try again."
                .to_owned(),
        );
    } else if no_answer > 0 {
        lines.push(
            "Most attempts got no answer: a NAT or firewall on the way drops connections it did \
             not expect, and the two sides' attempts never crossed."
                .to_owned(),
        );
    }
    for ((addr, _), t) in candidates.iter().zip(tallies) {
        if let Some(r) = &t.rejected {
            lines.push(format!("{addr}: {r}."));
        } else if let Some(e) = &t.last_error {
            lines.push(format!("{addr}: {e}."));
        }
    }
    if lines.is_empty() {
        lines.push("The cause is unknown: run with RUST_LOG=debug for details.".to_owned());
    }
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use punchline_proto::PeerInfo;

    fn go(observed: &str, candidates: &[&str]) -> Go {
        Go {
            peer: PeerInfo {
                name: "bob".into(),
                observed: observed.parse().expect("addr"),
                candidates: candidates
                    .iter()
                    .map(|c| c.parse().expect("addr"))
                    .collect(),
                mapping: Mapping::Unknown,
                pake: Vec::new(),
            },
            role: Role::Leader,
            session: [1; 16],
        }
    }

    #[test]
    fn public_first_then_lan_without_duplicates() {
        let g = go(
            "198.51.100.7:4000",
            &["192.168.1.9:4000", "198.51.100.7:4000"],
        );
        let c = candidates(&g);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0], (g.peer.observed, CandidateKind::Public));
        assert_eq!(c[1].1, CandidateKind::Lan);
    }

    #[test]
    fn a_long_candidate_list_is_cut() {
        let many: Vec<String> = (0..100).map(|i| format!("10.0.0.{i}:4000")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let c = candidates(&go("198.51.100.7:4000", &many));
        assert_eq!(c.len(), 1 + MAX_CANDIDATES);
    }

    #[test]
    fn diagnosis_names_a_port_changing_nat() {
        let g = go("198.51.100.7:61234", &["192.168.1.9:4000"]);
        let params = PunchParams {
            local_port: 5000,
            deadline: Duration::from_secs(10),
            our_observed: "203.0.113.1:5000".parse().expect("addr"),
            our_mapping: Mapping::Unknown,
            policy: RetryPolicy::Adaptive,
        };
        let c = candidates(&g);
        let tallies = vec![
            Tally {
                attempts: 4,
                no_answer: 4,
                ..Tally::default()
            };
            c.len()
        ];
        let d = diagnose(&g, &params, &c, &tallies);
        assert!(d.contains("symmetric"), "{d}");
        assert!(d.contains("local 4000, public 61234"), "{d}");
        assert!(d.contains("no answer"), "{d}");
    }

    #[test]
    fn diagnosis_names_a_measured_symmetric_nat() {
        let mut g = go("198.51.100.7:61234", &["192.168.1.9:4000"]);
        g.peer.mapping = Mapping::DependsOnDestination {
            first: 61234,
            second: 61240,
        };
        let params = PunchParams {
            local_port: 5000,
            deadline: Duration::from_secs(10),
            our_observed: "203.0.113.1:5000".parse().expect("addr"),
            our_mapping: Mapping::Independent,
            policy: RetryPolicy::Adaptive,
        };
        let c = candidates(&g);
        let d = diagnose(&g, &params, &c, &vec![Tally::default(); c.len()]);
        assert!(d.starts_with("The other side's NAT gives each destination its own public port (the rendezvous saw 61234 on one port and 61240"), "{d}");
        assert!(!d.contains("This side"), "{d}");
    }
}
