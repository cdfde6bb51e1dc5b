//! The punch: simultaneous TCP open on every candidate address at once.
//!
//! 1. Candidates: the other's observed (public) address first, then its LAN
//!    addresses (two hosts behind the same NAT meet there; most NATs do not hairpin).
//! 2. One task per candidate connects from our fixed port and retries on refusal,
//!    silence or a busy 4-tuple, with the cadence of [`punchline_proto::pacing`],
//!    until the deadline. Our SYN opens our NAT for the other's SYN; when the two
//!    cross, both sockets, still in SYN_SENT, complete the handshake.
//! 3. On a connected socket both ends send a link hello and check the other's
//!    ([`punchline_proto::link_check`]): a wrong host or a self-connect is dropped, and
//!    that candidate is not tried again. The leader sends the first message of
//!    the encryption handshake ([`crate::secure::Handshake`]) right behind its
//!    link hello, on every link, so that the check and the handshake cost one
//!    round trip between them.
//! 4. The follower keeps the first link whose handshake message authenticates
//!    and answers on it alone; the leader keeps the link on which that answer
//!    arrives. Every other link and task is dropped, so exactly one TCP
//!    connection survives on both ends, already encrypted.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::{SinkExt, StreamExt};
use punchline_proto::link_check::{link_hello, verify_link_hello, LinkRejected};
use punchline_proto::pacing::{
    fresh_attempt_after, AttemptFailure, Pacer, RetryPolicy, ATTEMPT_TIMEOUT,
};
use punchline_proto::{FrameCodec, Go, Mapping, PeerToPeer, Role, SessionToken, MAX_CANDIDATES};
use socket2::{SockFilter, SockRef};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::{sleep_until, timeout, timeout_at, Instant};
use tokio_util::codec::Framed;
use tracing::debug;

use crate::error::{KeyRefusal, PeerError};
use crate::net::{fixed_port_socket_from, LinkStream};
use crate::secure::{handshake_frame, Handshake, LinkKeys, SecureLink};

/// The framed link between the two peers.
pub type PeerFrames = Framed<LinkStream, FrameCodec<PeerToPeer, PeerToPeer>>;

/// Time the far end of a fresh link has to send its link hello. The real peer
/// sends it at once; anything slower is some other program.
pub const LINK_HELLO_TIMEOUT: Duration = Duration::from_secs(3);

/// Deadline of the punch when a NAT on either side is known to give each
/// destination its own port: only LAN candidates can work then, and on a LAN an
/// answer comes within milliseconds.
pub const LAN_ONLY_DEADLINE: Duration = Duration::from_secs(2);

/// Extra time after the deadline for the handshake on a link that connected
/// just in time: the follower waits for the leader's first message, the
/// leader for the answer.
pub const HANDSHAKE_GRACE: Duration = Duration::from_secs(2);

/// How long a refusal on one link (a handshake message that does not
/// authenticate, or the other end closing in the middle of the handshake)
/// waits for another link to bring an authentic one before it ends the
/// punch. Someone else at a candidate address (a host on a LAN that shares
/// the other side's range) can refuse one link; the other peer, if it holds
/// another key, refuses every link, and the user hears of it this soon.
pub const REFUSAL_GRACE: Duration = Duration::from_secs(1);

/// Where a candidate address came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CandidateKind {
    /// The other's address as the rendezvous observed it.
    Public,
    /// One of the other's own interface addresses (or one it announced by hand).
    Lan,
    /// A port the other's router forwards at its public address, as the
    /// rendezvous passed it on with the go ([`punchline_proto::PeerInfo::mapped`]).
    Forwarded,
}

impl CandidateKind {
    /// Words for the status line.
    pub fn describe(self) -> &'static str {
        match self {
            CandidateKind::Public => "public address",
            CandidateKind::Lan => "LAN address",
            CandidateKind::Forwarded => "a port its router forwards",
        }
    }

    /// Whether the address is where the rendezvous saw the other peer (its
    /// public address, or a port its router forwards there).
    pub fn is_public(self) -> bool {
        matches!(self, CandidateKind::Public | CandidateKind::Forwarded)
    }
}

/// A successful punch.
pub struct Punched {
    /// The one link both peers kept, encrypted.
    pub link: SecureLink,
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
    /// The rendezvous' address, as we connected to it.
    pub server: SocketAddr,
    /// How our NAT maps our port.
    pub our_mapping: Mapping,
    /// How attempts are paced.
    pub policy: RetryPolicy,
    /// Our round trip to the rendezvous (the kernel's estimate), which sets
    /// how soon a silent attempt is replaced
    /// ([`punchline_proto::pacing::fresh_attempt_after`]).
    pub server_rtt: Option<Duration>,
    /// Our address in the other address family (IPv6 beside IPv4, or the
    /// reverse), as the rendezvous' probe port saw it: the address the other
    /// side was told. Attempts of that family leave from it when it is one
    /// of this host's own (not translated), so that they cross the other's
    /// SYNs even on a host with several IPv6 addresses.
    pub our_other_family: Option<SocketAddr>,
    /// Our port as the router forwards it ([`crate::portmap`]), if it does:
    /// our SYNs of that family then leave from that address, whatever the
    /// NAT does with other connections, so a symmetric NAT rules nothing out.
    pub mapped: Option<SocketAddr>,
}

/// Whether `addr`, offered by the other side (or by the rendezvous), is worth a
/// SYN from this host. A hostile rendezvous or stranger could otherwise make us
/// send SYNs wherever it likes (and our link hello to a service of this host),
/// and an honest one's LAN candidates often point into our own LAN (most homes
/// use the same private range). Dropped:
///
/// - port 0, unspecified (0.0.0.0/8 and `::`), reserved (240.0.0.0/4),
///   multicast and broadcast addresses: nothing answers there, or everybody does;
/// - link-local addresses (169.254.0.0/16, fe80::/10): an IPv6 one needs a scope
///   the other host cannot know, and an IPv4 one is where cloud hosts keep
///   their metadata service (over IPv6: fd00:ec2::254, fd20:ce::254, also
///   dropped);
/// - loopback and this host's own addresses, unless the rendezvous runs on
///   this host (reached over loopback or at one of this host's addresses: a
///   try on one machine, or a rendezvous run inside the peer, where the other
///   peer may be on this host too). The address of the rendezvous connection
///   decides, not what the rendezvous says: it could claim anything;
/// - a family this host has no address of.
pub fn sane_candidate(addr: SocketAddr, here: &Here) -> bool {
    /// The IPv6 addresses of cloud hosts' metadata services (AWS, GCE), as
    /// 169.254.169.254 is in IPv4.
    const CLOUD_METADATA_V6: [std::net::Ipv6Addr; 2] = [
        std::net::Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254),
        std::net::Ipv6Addr::new(0xfd20, 0xce, 0, 0, 0, 0, 0, 0x254),
    ];
    let ip = addr.ip().to_canonical();
    if addr.port() == 0 || ip.is_unspecified() || ip.is_multicast() {
        return false;
    }
    match ip {
        IpAddr::V4(v4) => {
            let first = v4.octets()[0];
            if first == 0 || first >= 240 || v4.is_link_local() {
                return false;
            }
        }
        IpAddr::V6(v6) => {
            if v6.is_unicast_link_local() || CLOUD_METADATA_V6.contains(&v6) {
                return false;
            }
            // An IPv4 address through the network's NAT64 is that address.
            if let Some(v4) = nat64_embedded(v6) {
                let first = v4.octets()[0];
                if first == 0
                    || first >= 240
                    || v4.is_link_local()
                    || v4.is_loopback()
                    || v4.is_multicast()
                {
                    return false;
                }
            }
        }
    }
    if ip.is_loopback() || here.own.contains(&ip) {
        return here.local_trial;
    }
    here.own.iter().any(|own| own.is_ipv4() == ip.is_ipv4())
}

/// What [`sane_candidate`] knows of this host.
#[derive(Debug, Clone)]
pub struct Here {
    /// This host's own interface addresses (loopback excluded).
    pub own: Vec<IpAddr>,
    /// The rendezvous runs on this host (reached over loopback or at one of
    /// this host's addresses): the other peer may be on this host too.
    pub local_trial: bool,
    /// The rendezvous is at a private address ([`in_private_range`]): it
    /// may see peers at private addresses too.
    pub private_rendezvous: bool,
}

impl Here {
    /// This host, meeting through the rendezvous at `server`.
    pub fn new(server: SocketAddr) -> Here {
        let own = crate::net::own_addresses();
        let server = server.ip().to_canonical();
        Here {
            local_trial: server.is_loopback() || own.contains(&server),
            private_rendezvous: in_private_range(server),
            own,
        }
    }
}

/// Whether `ip` is in a private range: RFC 1918, the carriers' shared range
/// 100.64.0.0/10, IPv6 unique-local fc00::/7.
pub fn in_private_range(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_private() || (a == 100 && (64..128).contains(&b))
        }
        IpAddr::V6(v6) => match nat64_embedded(v6) {
            Some(v4) => in_private_range(IpAddr::V4(v4)),
            None => (v6.segments()[0] & 0xfe00) == 0xfc00,
        },
    }
}

/// The IPv4 address an IPv6 address of a NAT64 prefix stands for: the
/// well-known 64:ff9b::/96 (RFC 6052) or the local-use 64:ff9b:1::/48
/// (RFC 8215, taken with its IPv4 address in the last 32 bits, as a /96).
/// On an IPv6-only network with NAT64 (home routers with DNS64, cloud
/// networks), the translator dials it in IPv4, private ones included.
fn nat64_embedded(v6: std::net::Ipv6Addr) -> Option<std::net::Ipv4Addr> {
    let s = v6.segments();
    let well_known = s[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
    let local_use = s[..3] == [0x64, 0xff9b, 1];
    let [.., a, b, c, d] = v6.octets();
    (well_known || local_use).then(|| std::net::Ipv4Addr::new(a, b, c, d))
}

/// Whether a rendezvous can have seen a peer at `addr`, a public candidate
/// of the go. One at a public address sees peers at public addresses only
/// (their NAT's): a private one named there would be a hostile rendezvous
/// aiming our SYNs and link hello at a host of our own LAN (the router's
/// admin page, say). The other side's private addresses come in its sealed
/// box, which only it can make.
fn seen_by_rendezvous(addr: SocketAddr, here: &Here) -> bool {
    here.local_trial || here.private_rendezvous || !in_private_range(addr.ip())
}

/// Most candidates of one IP address: the public address and a port forwarded
/// by hand on the same router are two; more would only multiply the SYNs one
/// address receives.
pub const MAX_CANDIDATES_PER_IP: usize = 2;

/// Adds the sane ones among `offered` to `list` as `kind`, without duplicates,
/// at most [`MAX_CANDIDATES`] + 1 in all and [`MAX_CANDIDATES_PER_IP`] per IP:
/// a hostile party cannot make us send SYNs to a long list of addresses.
pub fn add_candidates(
    list: &mut Vec<(SocketAddr, CandidateKind)>,
    offered: &[SocketAddr],
    kind: CandidateKind,
    here: &Here,
) {
    for &addr in offered {
        if list.len() > MAX_CANDIDATES {
            break;
        }
        // One form per address, so that `::ffff:a.b.c.d` and `a.b.c.d` count
        // as the same address.
        let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
        let same_ip = list.iter().filter(|(a, _)| a.ip() == addr.ip()).count();
        if sane_candidate(addr, here)
            && (kind == CandidateKind::Lan || seen_by_rendezvous(addr, here))
            && !list.iter().any(|(a, _)| *a == addr)
            && same_ip < MAX_CANDIDATES_PER_IP
        {
            list.push((addr, kind));
        }
    }
}

/// What happened on one candidate, for the diagnosis when everything fails.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    /// Connection attempts made.
    pub attempts: u32,
    /// Attempts answered with a reset.
    pub refused: u32,
    /// Attempts that got no answer in time.
    pub no_answer: u32,
    /// Attempts that failed otherwise.
    pub other: u32,
    /// A link that formed but did not reach the expected peer, and why.
    pub rejected: Option<LinkRejected>,
    /// The last error other than a reset or silence, in the system's words.
    pub last_error: Option<String>,
}

/// One candidate tried, and what happened on it.
#[derive(Debug, Clone)]
pub struct Tried {
    /// The address.
    pub addr: SocketAddr,
    /// Where it came from.
    pub kind: CandidateKind,
    /// What happened.
    pub tally: Tally,
}

/// Why no direct link formed: what the two sides' NATs showed and what
/// happened on every candidate. Worded by [`crate::render::punch_diagnosis`].
#[derive(Debug, Clone)]
pub struct PunchFailure {
    /// Attempts on all candidates.
    pub attempts: u32,
    /// From the go to the end of the punch.
    pub elapsed: Duration,
    /// Our fixed local port.
    pub local_port: u16,
    /// Our public address, as the rendezvous saw it.
    pub our_observed: SocketAddr,
    /// Our NAT's mapping, as measured.
    pub our_mapping: Mapping,
    /// The other side's public address.
    pub their_observed: SocketAddr,
    /// The other side's NAT's mapping, as measured.
    pub their_mapping: Mapping,
    /// Every candidate tried.
    pub tried: Vec<Tried>,
}

/// Every candidate tried so far, with what happened on it.
type Tallies = Arc<Mutex<Vec<(SocketAddr, CandidateKind, Tally)>>>;

fn with_tally<R>(tallies: &Tallies, i: usize, f: impl FnOnce(&mut Tally) -> R) -> R {
    let mut t = tallies.lock().unwrap_or_else(|e| e.into_inner());
    f(&mut t[i].2)
}

/// A link that reached the expected peer, with its handshake so far: at the
/// leader, its first message sent; at the follower, the leader's first message
/// read and authentic.
struct Verified {
    link: PeerFrames,
    hs: Handshake,
    remote: SocketAddr,
    kind: CandidateKind,
    elapsed: Duration,
}

/// Punches a direct link to the peer of `go` and secures it with `keys`.
/// `start` is when the go arrived. The other side's public address is tried at
/// once; its LAN and extra candidates come later on `late` (they travel
/// sealed, so that only a holder of the code learns them) and are tried as
/// they come.
///
/// A handshake message that does not authenticate ends the punch at once with
/// the refusal (the other side holds another key); so does a link the other
/// side closed in the middle of its handshake, if no other link brings the
/// answer soon after.
pub async fn punch(
    go: &Go,
    params: &PunchParams,
    keys: Arc<LinkKeys>,
    start: Instant,
    late: oneshot::Receiver<Vec<SocketAddr>>,
) -> Result<Punched, PeerError> {
    let here = Here::new(params.server);
    let mut first = Vec::new();
    let mut deadline = start + params.deadline;
    // A mapping is measured in the family of a peer's connection to the
    // rendezvous (IPv4 where there is a NAT at all). Through a NAT that gives
    // each destination its own port, our SYNs of that family leave from a
    // port the other side was not told about; the other's NAT of that kind
    // never opened its told port to us.
    // A port mapping makes our SYNs leave from one address whatever the NAT
    // does, but only one at the address the rendezvous saw is the outer NAT's
    // (a home router behind a carrier's NAT maps at an inner address; a
    // hostile answer on the LAN can name any).
    let observed_ip = params.our_observed.ip().to_canonical();
    let our_symmetric = params.our_mapping.is_symmetric()
        && params
            .mapped
            .is_none_or(|m| m.ip().to_canonical() != observed_ip);
    let ours_symmetric = |addr: &SocketAddr| {
        our_symmetric && addr.ip().to_canonical().is_ipv4() == observed_ip.is_ipv4()
    };
    let lan_only = our_symmetric || go.peer.mapping.is_symmetric();
    if !go.peer.mapping.is_symmetric() && !ours_symmetric(&go.peer.observed) {
        add_candidates(
            &mut first,
            &[go.peer.observed],
            CandidateKind::Public,
            &here,
        );
    }
    // A port the other's router forwards: SYNs to it reach the other host
    // from anywhere, and its own SYNs from that port leave from it, whatever
    // its NAT does otherwise (even a symmetric one). Only at the other's
    // public address (the server passes no other; checked again against a
    // hostile one). Our own symmetric NAT still rules it out: the other side
    // would see our SYNs come from a port it was not told.
    if let Some(mapped) = go.peer.mapped {
        if mapped.ip().to_canonical() == go.peer.observed.ip().to_canonical()
            && !ours_symmetric(&mapped)
        {
            add_candidates(&mut first, &[mapped], CandidateKind::Forwarded, &here);
        }
    }
    // The other's address in the other family: IPv6 is rarely translated,
    // and a stateful firewall lets a simultaneous open through like a NAT
    // that keeps its mapping, whatever the IPv4 NAT does.
    if let Some(other) = go.peer.other_family {
        // Compared canonical: `::ffff:a.b.c.d` is IPv4.
        let (other_v4, observed_v4) = (
            other.ip().to_canonical().is_ipv4(),
            go.peer.observed.ip().to_canonical().is_ipv4(),
        );
        if other_v4 != observed_v4 && !ours_symmetric(&other) {
            add_candidates(&mut first, &[other], CandidateKind::Public, &here);
        }
    }
    if lan_only && first.is_empty() {
        // Our SYNs would leave from a port the other side was not told about, or
        // go to a port its NAT never opened for us: fail fast, unless the other
        // side is on one of our LANs.
        deadline = start + params.deadline.min(LAN_ONLY_DEADLINE);
    }
    // Where attempts of the other family leave from: our address there, if
    // the rendezvous saw it untranslated.
    let other_source = params
        .our_other_family
        .map(|a| a.ip().to_canonical())
        .filter(|ip| here.own.contains(ip));
    let tallies: Tallies = Arc::new(Mutex::new(Vec::new()));
    // Room for every candidate's one verified link, so no task ever waits.
    let (tx, mut rx) = mpsc::channel(MAX_CANDIDATES + 1);
    let template = Candidate {
        index: 0,
        addr: go.peer.observed,
        kind: CandidateKind::Public,
        port: params.local_port,
        source: None,
        other_source,
        session: link_token(&go.session),
        role: go.role,
        start,
        deadline,
        others_go: start
            + Duration::from_micros(go.others_go_after_us.into())
                .min(punchline_proto::timing::MAX_GO_DELAY),
        policy: params.policy,
        fresh_after: fresh_after(go, params.server_rtt),
        tallies: tallies.clone(),
        keys,
        found: tx,
    };
    let mut tasks = JoinSet::new();
    for &(addr, kind) in &first {
        tasks.spawn(try_candidate(template.for_candidate(addr, kind)));
    }
    // The late candidates get their own tasks, under one that owns them (and
    // with them a sender of `rx`, so `rx` stays open until they are known).
    let late_tasks = AbortOnDrop(tokio::spawn(async move {
        let mut set = JoinSet::new();
        if let Ok(offered) = late.await {
            let mut known = first;
            let before = known.len();
            add_candidates(&mut known, &offered, CandidateKind::Lan, &here);
            debug!(
                offered = offered.len(),
                kept = known.len() - before,
                "late candidates"
            );
            for &(addr, kind) in &known[before..] {
                set.spawn(try_candidate(template.for_candidate(addr, kind)));
            }
        }
        drop(template);
        while set.join_next().await.is_some() {}
    }));

    let chosen = match go.role {
        Role::Leader => lead(&mut rx, deadline + HANDSHAKE_GRACE).await,
        Role::Follower => follow(&mut rx, deadline + HANDSHAKE_GRACE).await,
    };
    tasks.abort_all();
    drop(late_tasks);
    let tried = tallies.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let attempts = tried.iter().map(|(_, _, t)| t.attempts).sum();
    match chosen? {
        Some(v) => Ok(Punched {
            link: v.hs.finish(v.link)?,
            remote: v.remote,
            kind: v.kind,
            attempts,
            elapsed: v.elapsed,
        }),
        None => Err(PeerError::PunchFailed {
            name: THE_OTHER_SIDE.to_owned(),
            failure: Box::new(failure(go, params, start.elapsed(), tried)),
            relay_refused: None,
        }),
    }
}

/// What the peers show each other in their link hellos: a hash of the session
/// token, not the token itself. The rendezvous chooses the token, and a link
/// hello is the first thing a peer sends to a candidate address: raw, its
/// bytes could be a command to whatever service listens there.
pub fn link_token(session: &SessionToken) -> SessionToken {
    use sha2::Digest;
    let digest = sha2::Sha256::new()
        .chain_update(b"punchline/2 link token")
        .chain_update(session)
        .finalize();
    let mut token = [0u8; punchline_proto::SESSION_LEN];
    token.copy_from_slice(&digest[..punchline_proto::SESSION_LEN]);
    token
}

/// How the other peer is named before its name is known (it comes with the
/// encryption handshake).
pub const THE_OTHER_SIDE: &str = "the other side";

/// Aborts a spawned task when dropped (a punch whose future is dropped must
/// not leave tasks dialling).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Whether a refusal on a link to a candidate of this kind says something
/// about the other side's key. The public address is where the rendezvous
/// saw the other peer; a LAN candidate is often some other host (two homes
/// sharing a private range), which could refuse every link there and make
/// a right code look wrong, or end a relayed chat's tries for a direct link
/// as failed authentications. A refusal there only drops that link; if no
/// link forms, the punch fails plainly and the relay's handshake decides.
fn refusal_counts(kind: CandidateKind) -> bool {
    kind.is_public()
}

/// The first refusal seen on some link, and when.
type Refused = Option<(PeerError, Instant)>;

fn note_refusal(refused: &mut Refused, e: PeerError) {
    if refused.is_none() {
        *refused = Some((e, Instant::now()));
    }
}

/// When to stop waiting: the deadline, or [`REFUSAL_GRACE`] after a refusal.
fn wait_until(refused: &Refused, deadline: Instant) -> Instant {
    match refused {
        Some((_, at)) => deadline.min(*at + REFUSAL_GRACE),
        None => deadline,
    }
}

/// What a punch without an authentic link ends with: the refusal seen, if it
/// says something about the other side's key; else a plain failure (which
/// may still be relayed).
fn without_link(refused: Refused) -> Result<Option<Verified>, PeerError> {
    match refused {
        Some((PeerError::LinkLost { .. }, _)) | None => Ok(None),
        Some((e, _)) => Err(e),
    }
}

/// Leader: our first handshake message is out on every verified link; keep
/// the link on which the follower's answer comes. A refusal on one link (see
/// [`REFUSAL_GRACE`]) ends the punch only if no other link answers soon.
async fn lead(
    rx: &mut mpsc::Receiver<Found>,
    deadline: Instant,
) -> Result<Option<Verified>, PeerError> {
    let mut pending = FuturesUnordered::new();
    let mut open = true;
    let mut refused: Refused = None;
    loop {
        tokio::select! {
            v = rx.recv(), if open => match v {
                Some(Ok(mut v)) => pending.push(async move {
                    // The follower's first lines may come before its answer.
                    loop {
                        let read = timeout_at(deadline, v.link.next()).await;
                        match read {
                            Ok(Some(Ok(PeerToPeer::FirstLines(sealed)))) => {
                                v.hs.took_first_lines(&sealed);
                            }
                            read => return (v, read),
                        }
                    }
                }),
                Some(Err(e)) => note_refusal(&mut refused, e),
                None => open = false,
            },
            Some((mut v, read)) = pending.next(), if !pending.is_empty() => {
                let Ok(read) = read else {
                    debug!(remote = %v.remote, "no handshake answer on this link");
                    continue;
                };
                match handshake_frame(read, &v.hs).and_then(|msg| v.hs.read(&msg)) {
                    Ok(()) => return Ok(Some(v)),
                    Err(e) => {
                        debug!(remote = %v.remote, error = %e, "no authentic answer on this link");
                        if refusal_counts(v.kind) {
                            note_refusal(&mut refused, e);
                        }
                    }
                }
            }
            _ = sleep_until(wait_until(&refused, deadline)) => break,
        }
        if !open && pending.is_empty() {
            break;
        }
    }
    without_link(refused)
}

/// Follower: the leader's first handshake message came and authenticates on
/// each verified link; answer on the first one and keep it.
async fn follow(
    rx: &mut mpsc::Receiver<Found>,
    deadline: Instant,
) -> Result<Option<Verified>, PeerError> {
    let mut refused: Refused = None;
    loop {
        let mut v = match timeout_at(wait_until(&refused, deadline), rx.recv()).await {
            Ok(Some(Ok(v))) => v,
            Ok(Some(Err(e))) => {
                note_refusal(&mut refused, e);
                continue;
            }
            Ok(None) | Err(_) => break,
        };
        let answer = v.hs.write()?;
        match timeout(LINK_HELLO_TIMEOUT, v.link.send(answer)).await {
            Ok(Ok(())) => return Ok(Some(v)),
            // That link broke at once; another candidate may still come.
            _ => debug!(remote = %v.remote, "link failed while answering on it"),
        }
    }
    without_link(refused)
}

/// What a candidate's task hands over: a verified link, or a refusal that
/// ends the punch (the other side holds another key).
type Found = Result<Verified, PeerError>;

struct Candidate {
    /// Position in the tallies.
    index: usize,
    addr: SocketAddr,
    kind: CandidateKind,
    port: u16,
    /// The local address attempts leave from (`None`: any, the kernel's
    /// choice).
    source: Option<IpAddr>,
    /// Our own address in the family other than the rendezvous connection's,
    /// for the candidates of that family (see [`PunchParams::our_other_family`]).
    other_source: Option<IpAddr>,
    session: SessionToken,
    role: Role,
    start: Instant,
    deadline: Instant,
    /// When the other peer gets its go, and its SYN leaves (see
    /// [`punchline_proto::Go::others_go_after_us`]).
    others_go: Instant,
    policy: RetryPolicy,
    /// A silent attempt is replaced after this long.
    fresh_after: Duration,
    tallies: Tallies,
    keys: Arc<LinkKeys>,
    found: mpsc::Sender<Found>,
}

impl Candidate {
    /// The same punch towards another candidate, registered in the tallies.
    fn for_candidate(&self, addr: SocketAddr, kind: CandidateKind) -> Candidate {
        let index = {
            let mut t = self.tallies.lock().unwrap_or_else(|e| e.into_inner());
            t.push((addr, kind, Tally::default()));
            t.len() - 1
        };
        let source = self
            .other_source
            .filter(|ip| ip.is_ipv4() == addr.ip().to_canonical().is_ipv4());
        Candidate {
            index,
            addr,
            kind,
            source,
            tallies: self.tallies.clone(),
            keys: self.keys.clone(),
            found: self.found.clone(),
            ..*self
        }
    }
}

/// Connects to one candidate from the fixed port until a verified link, a proof
/// that the candidate is the wrong host, the end of its attempt budget, or the
/// deadline. Attempts are paced by a [`Pacer`]: at least
/// [`punchline_proto::pacing::ATTEMPT_FLOOR`] plus a random jitter between the
/// starts of two attempts, however fast the far end resets.
async fn try_candidate(c: Candidate) {
    let mut pacer = Pacer::new(c.policy);
    loop {
        let now = Instant::now();
        if now >= c.deadline || !pacer.start(now - c.start) {
            if !pacer.may_start() {
                debug!(addr = %c.addr, attempts = pacer.attempts(), "attempt budget spent; giving up this candidate");
            }
            return;
        }
        let attempt = pacer.attempts();
        with_tally(&c.tallies, c.index, |t| t.attempts += 1);
        let hold = pacer.hold();
        let failure = match connect_once(&c, c.deadline - now, hold).await {
            Ok(stream) => {
                let elapsed = c.start.elapsed();
                debug!(addr = %c.addr, attempt, ?elapsed, "connected; verifying");
                match verify(stream, &c).await {
                    Ok((link, hs)) => {
                        let v = Verified {
                            link,
                            hs,
                            remote: c.addr,
                            kind: c.kind,
                            elapsed,
                        };
                        let _ = c.found.send(Ok(v)).await;
                        return;
                    }
                    Err(Verify::Refused(e)) => {
                        debug!(addr = %c.addr, error = %e, "handshake refused");
                        with_tally(&c.tallies, c.index, |t| t.last_error = Some(e.to_string()));
                        // Only the public address speaks for the other
                        // side: whoever answers at a LAN candidate may be
                        // some other host of ours (see `refusal_counts`).
                        if refusal_counts(c.kind) {
                            let _ = c.found.send(Err(e)).await;
                        }
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
            // A held attempt ignored the resets it surely got.
            AttemptFailure::Refused => t.refused += 1,
            AttemptFailure::NoAnswer if hold.is_some() => t.refused += 1,
            AttemptFailure::NoAnswer => t.no_answer += 1,
            AttemptFailure::AddressBusy | AttemptFailure::Other => t.other += 1,
        });
        let Some(next) = pacer.next_start(failure, c.start.elapsed(), fastrand::f64()) else {
            debug!(addr = %c.addr, attempts = pacer.attempts(), "attempt budget spent; giving up this candidate");
            return;
        };
        let mut next = (c.start + next).min(c.deadline);
        if failure == AttemptFailure::Refused && next < c.others_go {
            // Our SYN came before the other's NAT held a mapping for it (the
            // other's go had not come yet): the next one leaves when the
            // other's SYN does, and they cross.
            next = c.others_go.min(c.deadline);
        }
        tracing::trace!(addr = %c.addr, attempt, ?failure, pause = ?next.saturating_duration_since(Instant::now()), "attempt failed");
        if next <= Instant::now() {
            // A tokio sleep that is already due still waits for the next timer
            // tick (1 ms); a retry that is due must not.
            tokio::task::yield_now().await;
        } else {
            // Tokio's timer rounds up to whole milliseconds: never earlier.
            sleep_until(next).await;
        }
    }
}

/// One connection attempt from the fixed port. With `hold` (a near candidate,
/// see [`punchline_proto::pacing::NEAR_HOLD`]) the socket ignores resets and
/// stays in SYN_SENT for `hold`, waiting for the other's SYN.
async fn connect_once(
    c: &Candidate,
    left: Duration,
    hold: Option<Duration>,
) -> Result<TcpStream, AttemptFailure> {
    let socket = fixed_port_socket_from(c.addr, c.source, c.port).map_err(|e| classify(c, &e))?;
    if hold.is_some() {
        SockRef::from(&socket)
            .attach_filter(&DROP_RESETS)
            .map_err(|e| classify(c, &e))?;
    }
    let wait = hold.unwrap_or(ATTEMPT_TIMEOUT).min(left);
    let fd = socket.as_raw_fd();
    let connecting = socket.connect(c.addr);
    tokio::pin!(connecting);
    let until = Instant::now() + wait;
    // A silent attempt (not a held one) is replaced early if it has heard
    // nothing at all; one that has heard from the other side is left to
    // complete.
    if hold.is_none() && c.fresh_after < wait {
        if let Ok(done) = timeout(c.fresh_after, &mut connecting).await {
            return done.map_err(|e| classify(c, &e));
        }
        if punchline_net::tcp_state(&fd) == Some(TCP_SYN_SENT) {
            return Err(AttemptFailure::NoAnswer);
        }
    }
    match timeout_at(until, &mut connecting).await {
        Ok(Ok(stream)) => {
            if hold.is_some() {
                // The chat must see a reset of its link.
                SockRef::from(&stream)
                    .detach_filter()
                    .map_err(|e| classify(c, &e))?;
            }
            Ok(stream)
        }
        Ok(Err(e)) => Err(classify(c, &e)),
        Err(_) => Err(AttemptFailure::NoAnswer),
    }
}

/// How long a silent attempt waits before a fresh one replaces it. Only the
/// nearer peer (its go comes first: `others_go_after_us` > 0) replaces early
/// ([`fresh_attempt_after`]); the farther one waits for its kernel's own
/// SYN retransmission, which keeps the initial sequence number.
///
/// Why: when the farther peer's go comes, the other's SYN has gone out, so
/// the other's NAT already tracks the connection and lets our SYN through at
/// once; the other host answers it with a SYN-ACK (a simultaneous open).
/// When that SYN-ACK is lost, we hear nothing, but the other's NAT (Linux
/// connection tracking: a home router, or the lab's) now holds the
/// connection half open with our first SYN's sequence number. A fresh SYN,
/// with another number, is invalid there: it is not translated, and the
/// router itself resets it; the other's retransmitted SYN-ACK then meets our
/// fresh socket, which resets it, and the router closes its entry (10 s).
/// From then on every SYN of ours is reset by the router, and both sides'
/// short attempts rarely cross: a 10 s punch was seen to end relayed (lab,
/// 3% loss, 4 runs of 30; a packet capture showed each step). Waiting for
/// the kernel's retransmission costs the farther peer up to a second when
/// its own SYN was lost, but the nearer peer's fresh SYNs, which reach the
/// farther peer's NAT after its SYN has opened it, usually connect first.
fn fresh_after(go: &Go, server_rtt: Option<Duration>) -> Duration {
    if go.others_go_after_us > 0 {
        fresh_attempt_after(server_rtt)
    } else {
        ATTEMPT_TIMEOUT
    }
}

/// `TCP_SYN_SENT` of the kernel's TCP states (`tcpi_state`).
const TCP_SYN_SENT: u8 = 2;

/// A socket filter (classic BPF, run by the kernel on every segment that
/// reaches the socket, with the TCP header at offset 0) that drops segments
/// with RST set and keeps the rest. It lets a held attempt stay in SYN_SENT
/// when the other side's kernel, not connecting yet, resets our SYN.
const DROP_RESETS: [SockFilter; 4] = [
    // A = the byte of TCP flags.
    SockFilter::new(BPF_LD_B_ABS, 0, 0, TCP_FLAGS_OFFSET),
    // RST set: next instruction (drop), else skip it (keep).
    SockFilter::new(BPF_JMP_JSET_K, 0, 1, TCP_FLAG_RST),
    SockFilter::new(BPF_RET_K, 0, 0, 0),
    SockFilter::new(BPF_RET_K, 0, 0, u32::MAX),
];

/// `BPF_LD | BPF_B | BPF_ABS`.
const BPF_LD_B_ABS: u16 = 0x30;
/// `BPF_JMP | BPF_JSET | BPF_K`.
const BPF_JMP_JSET_K: u16 = 0x45;
/// `BPF_RET | BPF_K`: keep that many bytes (0: drop).
const BPF_RET_K: u16 = 0x06;
/// Offset of the flags byte in the TCP header.
const TCP_FLAGS_OFFSET: u32 = 13;
/// The RST bit in it.
const TCP_FLAG_RST: u32 = 0x04;

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
    /// The other peer's handshake message does not authenticate: it holds
    /// another key. Ends the punch.
    Refused(PeerError),
}

/// Exchanges link hellos on a fresh connection, the leader's first handshake
/// message right behind its hello (in the same segment); the follower reads
/// that message too.
async fn verify(stream: TcpStream, c: &Candidate) -> Result<(PeerFrames, Handshake), Verify> {
    let mut hs = c
        .keys
        .handshake(c.role, &c.session)
        .map_err(Verify::Refused)?;
    // A link given up here is reset, not closed: no TIME_WAIT is left on the
    // fixed port's 4-tuple, which the next attempt needs.
    let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    let mut link = Framed::new(LinkStream::Tcp(stream), FrameCodec::new());
    let hello = link_hello(c.session, c.role);
    // Behind the hello: the leader's first handshake message, or the
    // follower's box of first lines if it has any.
    let first = match c.role {
        Role::Leader => Some(hs.write().map_err(Verify::Refused)?),
        Role::Follower => hs.take_first_lines_box(),
    };
    let exchange = async {
        match first {
            Some(first) => {
                link.feed(hello).await?;
                link.send(first).await?;
            }
            None => link.send(hello).await?,
        }
        link.next().await.transpose()
    };
    // The leader has sent its first message and waits as long as the punch
    // lasts: a follower that got it answers on this link, and must not be
    // left with a link the leader gave up (its hello may come late on a lossy
    // path).
    let hello_by = match c.role {
        Role::Leader => (c.deadline + HANDSHAKE_GRACE).max(Instant::now() + LINK_HELLO_TIMEOUT),
        Role::Follower => Instant::now() + LINK_HELLO_TIMEOUT,
    };
    match timeout_at(hello_by, exchange).await {
        Err(_) => return Err(Verify::Rejected(LinkRejected::NotAHello)),
        Ok(Ok(Some(msg))) => {
            verify_link_hello(&c.session, c.role, &msg).map_err(Verify::Rejected)?;
        }
        Ok(Ok(None)) => {
            return Err(Verify::Broken(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before its link hello",
            )))
        }
        Ok(Err(punchline_proto::CodecError::Io(e))) => return Err(Verify::Broken(e)),
        Ok(Err(_)) => return Err(Verify::Rejected(LinkRejected::NotAHello)),
    }
    if c.role == Role::Follower {
        // The leader sent its first handshake message with its hello.
        let read = match timeout(LINK_HELLO_TIMEOUT, link.next()).await {
            Ok(read) => read,
            Err(_) => {
                return Err(Verify::Broken(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no handshake message after its link hello",
                )))
            }
        };
        let msg = match read {
            Some(Ok(PeerToPeer::Handshake(msg))) => msg,
            None => {
                return Err(Verify::Broken(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before its handshake message",
                )))
            }
            Some(Err(punchline_proto::CodecError::Io(e))) => return Err(Verify::Broken(e)),
            // Anything else from an end that passed the link check: it does
            // not hold the key.
            Some(_) => {
                closes_gracefully(&link);
                return Err(Verify::Refused(hs.refused(KeyRefusal::Handshake)));
            }
        };
        match hs.read(&msg) {
            Ok(()) => {}
            // Our own first message, come back: not the other peer.
            Err(PeerError::MetItself) => return Err(Verify::Rejected(LinkRejected::SameRole)),
            Err(e) => {
                closes_gracefully(&link);
                return Err(Verify::Refused(e));
            }
        }
    }
    closes_gracefully(&link);
    Ok((link, hs))
}

/// Undoes the reset-on-close of [`verify`]: a link kept, or one whose
/// handshake we refuse, closes with a FIN. The other end of a refused one
/// then reads a close in its handshake, which it takes as our refusal of its
/// key, not as a lost link.
fn closes_gracefully(link: &PeerFrames) {
    if let Some(tcp) = link.get_ref().tcp() {
        let _ = SockRef::from(tcp).set_linger(None);
    }
}

/// The facts of a punch that found no link.
fn failure(
    go: &Go,
    params: &PunchParams,
    elapsed: Duration,
    tried: Vec<(SocketAddr, CandidateKind, Tally)>,
) -> PunchFailure {
    PunchFailure {
        attempts: tried.iter().map(|(_, _, t)| t.attempts).sum(),
        elapsed,
        local_port: params.local_port,
        our_observed: params.our_observed,
        our_mapping: params.our_mapping,
        their_observed: go.peer.observed,
        their_mapping: go.peer.mapping,
        tried: tried
            .into_iter()
            .map(|(addr, kind, tally)| Tried { addr, kind, tally })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use punchline_proto::{Introduction, PeerInfo};

    /// Handshake keys of a later link, for punches that never get that far.
    fn keys() -> Arc<LinkKeys> {
        Arc::new(LinkKeys {
            secret: crate::secure::Secret::from_key([5; 32]),
            ours: Introduction {
                name: "n".into(),
                chat_role: Role::Leader,
                words_nonce: [0; 32],
                first_lines: Vec::new(),
                identity: [0; 32],
            },
            words: None,
            first_lines: Default::default(),
            shows_first_lines: None,
        })
    }

    /// The punch's parameters in these tests: from port 0, seen at
    /// 203.0.113.1:5000, meeting through `server`, behind a NAT that maps
    /// as `ours`; the adaptive policy, nothing else known.
    fn params(server: SocketAddr, ours: Mapping, deadline: Duration) -> PunchParams {
        PunchParams {
            local_port: 0,
            deadline,
            our_observed: "203.0.113.1:5000".parse().expect("addr"),
            server,
            our_mapping: ours,
            policy: RetryPolicy::Adaptive,
            server_rtt: None,
            our_other_family: None,
            mapped: None,
        }
    }

    /// A NAT that maps each destination to its own port.
    fn symmetric() -> Mapping {
        Mapping::DependsOnDestination {
            first: 5000,
            second: 5006,
        }
    }

    fn go(observed: &str) -> Go {
        Go {
            peer: PeerInfo {
                observed: observed.parse().expect("addr"),
                mapping: Mapping::Unknown,
                pake: Vec::new(),
                other_family: None,
                mapped: None,
            },
            role: Role::Leader,
            session: [1; 16],
            others_go_after_us: 0,
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    fn here() -> Here {
        Here {
            own: vec!["192.168.1.2".parse().expect("ip")],
            local_trial: false,
            private_rendezvous: false,
        }
    }

    fn tried(
        list: &[(&str, CandidateKind)],
        tally: Tally,
    ) -> Vec<(SocketAddr, CandidateKind, Tally)> {
        list.iter()
            .map(|(a, k)| (addr(a), *k, tally.clone()))
            .collect()
    }

    #[test]
    fn only_sane_candidates_are_dialled() {
        let h = here();
        for ok in ["198.51.100.7:4000", "192.168.1.9:4000", "10.0.0.1:1"] {
            assert!(sane_candidate(addr(ok), &h), "{ok}");
        }
        for bad in [
            "198.51.100.7:0",
            "0.0.0.0:4000",
            "127.0.0.1:4000",
            "224.0.0.1:4000",
            "255.255.255.255:4000",
            "[::1]:4000",
            "[::]:4000",
            "[fe80::1]:4000",
            "[ff02::1]:4000",
            "[2001:db8::1]:4000", // no IPv6 here
            "[::ffff:127.0.0.1]:4000",
            "192.168.1.2:4001", // our own address
            "169.254.169.254:80",
            "0.1.2.3:4000",
            "240.0.0.1:4000",
        ] {
            assert!(!sane_candidate(addr(bad), &h), "{bad}");
        }
        // Both peers on this host (a try on one machine): loopback and our own
        // addresses are the other peer.
        let local = Here {
            own: h.own.clone(),
            local_trial: true,
            private_rendezvous: false,
        };
        assert!(sane_candidate(addr("127.0.0.1:4000"), &local));
        assert!(sane_candidate(addr("192.168.1.2:4001"), &local));
    }

    /// A rendezvous at a public address names only public addresses as the
    /// other's (its own view of the other peer); private ones it names are
    /// not dialled: 192.168.1.1:80 would be our router's admin page. In the
    /// sealed box (the other peer's own word) they are LAN candidates. A
    /// rendezvous at a private address, or on this host, may name them.
    #[test]
    fn a_public_rendezvous_cannot_name_private_addresses() {
        let h = here();
        let private = [
            "192.168.1.1:80",
            "10.0.0.1:4000",
            "172.16.5.5:4000",
            "100.64.0.1:4000",
            "[::ffff:10.0.0.1]:4000",
        ];
        for kind in [CandidateKind::Public, CandidateKind::Forwarded] {
            let mut list = Vec::new();
            add_candidates(&mut list, &private.map(addr), kind, &h);
            assert_eq!(list, Vec::new(), "{kind:?}");
        }
        let mut list = Vec::new();
        add_candidates(
            &mut list,
            &[addr("198.51.100.7:4000")],
            CandidateKind::Public,
            &h,
        );
        assert_eq!(list.len(), 1, "a public address is named");
        let mut list = Vec::new();
        add_candidates(&mut list, &private.map(addr), CandidateKind::Lan, &h);
        // The IPv4-mapped form is the same address as 10.0.0.1.
        assert_eq!(list.len(), 4, "sealed LAN candidates: {list:?}");
        for trusted in [
            Here {
                private_rendezvous: true,
                ..h.clone()
            },
            Here {
                local_trial: true,
                ..h.clone()
            },
        ] {
            let mut list = Vec::new();
            add_candidates(
                &mut list,
                &private.map(addr),
                CandidateKind::Public,
                &trusted,
            );
            assert_eq!(list.len(), 4, "{trusted:?}: {list:?}");
        }
        assert!(in_private_range("fd12::1".parse().expect("ip")));
        assert!(!in_private_range("2001:db8::1".parse().expect("ip")));
        assert!(!in_private_range("100.128.0.1".parse().expect("ip")));
    }

    /// The same through NAT64: on an IPv6-only host whose network
    /// translates 64:ff9b::/96 (or the local-use 64:ff9b:1::/48) to IPv4, as
    /// home routers with DNS64 and cloud networks do, `[64:ff9b::c0a8:101]`
    /// is 192.168.1.1, reached through the translator. A rendezvous at a
    /// public address naming it as the other's address in the other family
    /// aims our SYNs and link hello at a host of our own network all the
    /// same; and `[64:ff9b::a9fe:a9fe]` is 169.254.169.254. A public IPv4
    /// address behind the prefix stays a fair candidate.
    #[test]
    fn a_public_rendezvous_cannot_name_private_addresses_through_nat64() {
        let h = Here {
            own: vec!["2001:db8::2".parse().expect("ip")],
            local_trial: false,
            private_rendezvous: false,
        };
        let private = [
            "[64:ff9b::c0a8:101]:80",
            "[64:ff9b::a00:5]:4000",
            "[64:ff9b::6440:1]:4000",
            "[64:ff9b:1::a00:5]:4000",
        ];
        let mut list = Vec::new();
        add_candidates(&mut list, &private.map(addr), CandidateKind::Public, &h);
        assert_eq!(list, Vec::new(), "private IPv4 through NAT64");
        assert!(
            !sane_candidate(addr("[64:ff9b::a9fe:a9fe]:80"), &h),
            "169.254.169.254 through NAT64"
        );
        let mut list = Vec::new();
        add_candidates(
            &mut list,
            &[addr("[64:ff9b::c633:6407]:4000")],
            CandidateKind::Public,
            &h,
        );
        assert_eq!(list.len(), 1, "198.51.100.7 through NAT64 is public");
    }

    #[test]
    fn candidates_are_capped_in_number_and_per_address() {
        let h = here();
        let mut list = Vec::new();
        add_candidates(
            &mut list,
            &[addr("198.51.100.7:4000")],
            CandidateKind::Public,
            &h,
        );
        let same_ip: Vec<SocketAddr> = (1..10)
            .map(|p| SocketAddr::new("198.51.100.7".parse().expect("ip"), p))
            .collect();
        add_candidates(&mut list, &same_ip, CandidateKind::Lan, &h);
        assert_eq!(list.len(), MAX_CANDIDATES_PER_IP);
        let many: Vec<SocketAddr> = (0..100)
            .map(|i| addr(&format!("10.0.0.{i}:4000")))
            .collect();
        add_candidates(&mut list, &many, CandidateKind::Lan, &h);
        assert_eq!(list.len(), MAX_CANDIDATES + 1);
        add_candidates(&mut list, &many, CandidateKind::Lan, &h);
        assert_eq!(list.len(), MAX_CANDIDATES + 1, "no duplicates, no growth");
    }

    #[test]
    fn diagnosis_names_a_port_changing_nat() {
        let g = go("198.51.100.7:61234");
        let params = PunchParams {
            local_port: 5000,
            ..params(
                addr("198.51.100.1:7425"),
                Mapping::Unknown,
                Duration::from_secs(10),
            )
        };
        let t = tried(
            &[
                ("198.51.100.7:61234", CandidateKind::Public),
                ("192.168.1.9:4000", CandidateKind::Lan),
            ],
            Tally {
                attempts: 4,
                no_answer: 4,
                ..Tally::default()
            },
        );
        let d = crate::render::punch_diagnosis(&failure(&g, &params, Duration::ZERO, t));
        assert!(d.contains("symmetric"), "{d}");
        assert!(d.contains("local 4000, public 61234"), "{d}");
        assert!(d.contains("no answer"), "{d}");
    }

    #[test]
    fn diagnosis_names_a_measured_symmetric_nat() {
        let mut g = go("198.51.100.7:61234");
        g.peer.mapping = Mapping::DependsOnDestination {
            first: 61234,
            second: 61240,
        };
        let params = PunchParams {
            local_port: 5000,
            ..params(
                addr("198.51.100.1:7425"),
                Mapping::Independent,
                Duration::from_secs(10),
            )
        };
        let d = crate::render::punch_diagnosis(&failure(&g, &params, Duration::ZERO, Vec::new()));
        assert!(d.starts_with("The other side's NAT gives each destination its own public port (the rendezvous saw 61234 on one port and 61240"), "{d}");
        assert!(d.contains("offered no LAN address"), "{d}");
        assert!(!d.contains("This side"), "{d}");
    }

    /// Behind a symmetric IPv4 NAT, the other's IPv6 address (from the go) is
    /// still tried, at once and until the deadline, while its IPv4 address is
    /// not; and the deadline is not cut short as for a LAN-only punch.
    #[tokio::test]
    async fn a_symmetric_ipv4_nat_leaves_the_ipv6_candidate() {
        // Nothing listens there: every attempt is refused.
        let closed = std::net::TcpListener::bind("[::1]:0").expect("bind ::1");
        let v6 = closed.local_addr().expect("addr");
        drop(closed);
        let mut g = go("198.51.100.7:61234");
        g.peer.other_family = Some(v6);
        // On this host: its loopback addresses are fair candidates.
        let params = params(
            addr("[::1]:7425"),
            symmetric(),
            LAN_ONLY_DEADLINE + Duration::from_millis(500),
        );
        let (tx, rx) = oneshot::channel();
        tx.send(Vec::new()).expect("send");
        let started = Instant::now();
        let Err(PeerError::PunchFailed { failure, .. }) =
            punch(&g, &params, keys(), started, rx).await
        else {
            panic!("a punch at a closed port succeeded");
        };
        assert!(
            started.elapsed() >= LAN_ONLY_DEADLINE,
            "cut short like a LAN-only punch: {:?}",
            started.elapsed()
        );
        let tried: Vec<_> = failure.tried.iter().map(|t| (t.addr, t.kind)).collect();
        assert_eq!(tried, vec![(v6, CandidateKind::Public)]);
        assert!(failure.tried[0].tally.attempts > 1, "{:?}", failure.tried);
    }

    /// A go whose "other family" address is the IPv4 address of the
    /// observed one in IPv4-mapped IPv6 form (`::ffff:a.b.c.d`, which only a
    /// hostile rendezvous sends: the server canonicalises) passes the "other
    /// family" test uncanonicalised, and is then tried as an IPv4 public
    /// candidate although our IPv4 NAT is symmetric (ruled out for the
    /// observed address itself), at the full deadline instead of the
    /// LAN-only one.
    #[tokio::test]
    async fn an_ipv4_mapped_other_family_is_not_another_family() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let v4 = closed.local_addr().expect("addr");
        drop(closed);
        let mut g = go(&v4.to_string());
        let mapped: SocketAddr = format!("[::ffff:127.0.0.1]:{}", v4.port() + 1)
            .parse()
            .expect("addr");
        g.peer.other_family = Some(mapped);
        let params = params(
            addr("127.0.0.1:7425"),
            symmetric(),
            LAN_ONLY_DEADLINE + Duration::from_millis(500),
        );
        let (tx, rx) = oneshot::channel();
        tx.send(Vec::new()).expect("send");
        let started = Instant::now();
        let Err(PeerError::PunchFailed { failure, .. }) =
            punch(&g, &params, keys(), started, rx).await
        else {
            panic!("a punch at a closed port succeeded");
        };
        let tried: Vec<_> = failure.tried.iter().map(|t| (t.addr, t.kind)).collect();
        assert_eq!(
            tried,
            Vec::new(),
            "an IPv4 candidate tried from behind our symmetric IPv4 NAT, after {:?}",
            started.elapsed()
        );
    }

    /// A port mapping whose external address is not the public address the
    /// rendezvous saw (a home router behind a carrier's NAT grants one at its
    /// own WAN address, 100.64.0.0/10 here; or a hostile host on the LAN
    /// answers PCP/NAT-PMP with any address) does not get us past the NAT
    /// the rendezvous measured as symmetric, yet it makes the punch try the
    /// other's IPv4 public address until the full deadline rather than fail
    /// fast as LAN-only.
    #[tokio::test]
    async fn a_mapping_at_another_address_than_the_observed_one_does_not_beat_a_symmetric_nat() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let v4 = closed.local_addr().expect("addr");
        drop(closed);
        let g = go(&v4.to_string());
        let params = PunchParams {
            mapped: Some("100.64.0.7:5000".parse().expect("addr")),
            ..params(
                addr("127.0.0.1:7425"),
                symmetric(),
                LAN_ONLY_DEADLINE + Duration::from_millis(500),
            )
        };
        let (tx, rx) = oneshot::channel();
        tx.send(Vec::new()).expect("send");
        let started = Instant::now();
        let Err(PeerError::PunchFailed { failure, .. }) =
            punch(&g, &params, keys(), started, rx).await
        else {
            panic!("a punch at a closed port succeeded");
        };
        let tried: Vec<_> = failure.tried.iter().map(|t| (t.addr, t.kind)).collect();
        assert_eq!(
            tried,
            Vec::new(),
            "the other's public address tried from behind our symmetric NAT, after {:?}",
            started.elapsed()
        );
    }

    /// The other's forwarded port from the go ([`PeerInfo::mapped`]) is
    /// tried at once, even though the other's NAT is symmetric (which rules
    /// out its observed address), but only at the address the rendezvous
    /// saw it at (a hostile rendezvous naming a third host gets no SYN), and
    /// not from behind our own symmetric NAT.
    #[tokio::test]
    async fn the_others_forwarded_port_is_tried_only_at_its_public_address() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let observed = closed.local_addr().expect("addr");
        drop(closed);
        let forwarded = SocketAddr::new(observed.ip(), observed.port().wrapping_add(1));
        let elsewhere: SocketAddr = format!("127.0.0.2:{}", forwarded.port())
            .parse()
            .expect("addr");
        let tried = |mapped: SocketAddr, ours: Mapping| {
            let mut g = go(&observed.to_string());
            g.peer.mapping = Mapping::DependsOnDestination {
                first: observed.port(),
                second: observed.port().wrapping_add(4),
            };
            g.peer.mapped = Some(mapped);
            // On this host: its loopback addresses are fair candidates.
            let params = params(addr("127.0.0.1:7425"), ours, Duration::from_millis(300));
            async move {
                let (tx, rx) = oneshot::channel();
                tx.send(Vec::new()).expect("send");
                let Err(PeerError::PunchFailed { failure, .. }) =
                    punch(&g, &params, keys(), Instant::now(), rx).await
                else {
                    panic!("a punch at a closed port succeeded");
                };
                failure
                    .tried
                    .iter()
                    .map(|t| (t.addr, t.kind))
                    .collect::<Vec<_>>()
            }
        };
        assert_eq!(
            tried(forwarded, Mapping::Independent).await,
            vec![(forwarded, CandidateKind::Forwarded)]
        );
        assert_eq!(tried(elsewhere, Mapping::Independent).await, Vec::new());
        let symmetric = Mapping::DependsOnDestination {
            first: 5000,
            second: 5006,
        };
        assert_eq!(tried(forwarded, symmetric).await, Vec::new());
    }

    /// The crash of a punch with no candidate at all (a symmetric NAT on one
    /// side, no LAN candidates on the other): it fails at once, with the cause.
    #[tokio::test]
    async fn no_candidate_at_all_fails_at_once() {
        let mut g = go("198.51.100.7:61234");
        g.peer.mapping = Mapping::DependsOnDestination {
            first: 61234,
            second: 61240,
        };
        let params = params(
            addr("198.51.100.1:7425"),
            Mapping::Independent,
            Duration::from_secs(10),
        );
        let (tx, rx) = oneshot::channel();
        tx.send(Vec::new()).expect("send");
        let started = Instant::now();
        let Err(PeerError::PunchFailed { failure, .. }) =
            punch(&g, &params, keys(), started, rx).await
        else {
            panic!("a punch with no candidate succeeded");
        };
        assert!(
            started.elapsed() < LAN_ONLY_DEADLINE,
            "it waited for the deadline"
        );
        let diagnosis = crate::render::punch_diagnosis(&failure);
        assert!(diagnosis.contains("symmetric"), "{diagnosis}");
        // The late candidates never come (the other side sent no box): the
        // deadline ends it.
        let (tx, rx) = oneshot::channel::<Vec<SocketAddr>>();
        drop(tx);
        assert!(punch(&g, &params, keys(), Instant::now(), rx)
            .await
            .is_err());
    }

    fn refused(r: Result<Punched, PeerError>) -> (u32, f64) {
        match r {
            Err(PeerError::PunchFailed { failure, .. }) => {
                (failure.attempts, failure.elapsed.as_secs_f64())
            }
            Err(e) => panic!("unexpected error: {e}"),
            Ok(p) => panic!("punched {}", p.remote),
        }
    }

    /// A loopback port nothing listens on: every SYN to it is reset at once.
    fn closed_port() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    }

    /// The storm of the review: a go naming an address that resets at once
    /// got tens of thousands of SYNs a second. Now it gets one quick attempt,
    /// then one per hold.
    #[tokio::test]
    async fn a_resetting_target_gets_a_bounded_number_of_attempts() {
        use punchline_proto::pacing::{ATTEMPT_FLOOR, MAX_ATTEMPTS, NEAR_HOLD};
        let target = closed_port();
        let g = go(&target.to_string());
        let deadline = Duration::from_secs(2);
        let params = PunchParams {
            local_port: closed_port().port(),
            our_observed: addr("127.0.0.1:5000"),
            ..params(addr("127.0.0.1:7425"), Mapping::Independent, deadline)
        };
        let (tx, rx) = oneshot::channel();
        tx.send(Vec::new()).expect("send");
        let (attempts, secs) = refused(punch(&g, &params, keys(), Instant::now(), rx).await);
        let most = 2 + (deadline.as_millis() / NEAR_HOLD.as_millis()) as u32;
        assert!(attempts >= 2, "it did not try: {attempts}");
        assert!(
            attempts <= most && attempts <= MAX_ATTEMPTS,
            "{attempts} attempts in {secs:.2} s"
        );
        assert!(
            f64::from(attempts) / secs < 1.0 / ATTEMPT_FLOOR.as_secs_f64(),
            "{attempts} attempts in {secs:.2} s"
        );
        // The naive baseline with no pause is held to the floor too.
        let params = PunchParams {
            policy: RetryPolicy::Fixed(Duration::ZERO),
            deadline: Duration::from_millis(500),
            ..params
        };
        let (tx, rx) = oneshot::channel();
        tx.send(Vec::new()).expect("send");
        let (attempts, secs) = refused(punch(&g, &params, keys(), Instant::now(), rx).await);
        assert!(
            f64::from(attempts) <= 1.0 + secs / ATTEMPT_FLOOR.as_secs_f64(),
            "{attempts} attempts in {secs:.2} s"
        );
    }

    /// A hostile go (or peer) naming addresses this host must not flood:
    /// none of them gets a single SYN.
    #[tokio::test]
    async fn a_hostile_gos_candidates_are_not_dialled() {
        let lo = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        lo.set_nonblocking(true).expect("nonblocking");
        let mut listeners = vec![lo];
        if let Some(own) = crate::net::own_addresses()
            .into_iter()
            .find(|ip| ip.is_ipv4())
        {
            let l = std::net::TcpListener::bind((own, 0)).expect("bind own address");
            l.set_nonblocking(true).expect("nonblocking");
            listeners.push(l);
        }
        let g = go("224.0.0.1:4000");
        let params = PunchParams {
            local_port: closed_port().port(),
            our_observed: addr("203.0.113.1:5000"),
            ..params(
                addr("198.51.100.1:7425"),
                Mapping::Independent,
                Duration::from_secs(2),
            )
        };
        let mut late: Vec<SocketAddr> = listeners
            .iter()
            .map(|l| l.local_addr().expect("addr"))
            .collect();
        late.extend(
            [
                "0.0.0.0:4000",
                "198.51.100.7:0",
                "255.255.255.255:4000",
                "239.1.2.3:4000",
                "[::1]:4000",
                "[fe80::1]:4000",
            ]
            .map(addr),
        );
        let (tx, rx) = oneshot::channel();
        tx.send(late).expect("send");
        let started = Instant::now();
        let (attempts, _) = refused(punch(&g, &params, keys(), started, rx).await);
        assert_eq!(attempts, 0);
        assert!(
            started.elapsed() < params.deadline,
            "it waited for the deadline"
        );
        for l in &listeners {
            assert_eq!(
                l.accept().map(|_| ()).map_err(|e| e.kind()),
                Err(io::ErrorKind::WouldBlock),
                "{:?} was dialled",
                l.local_addr()
            );
        }
    }
}
