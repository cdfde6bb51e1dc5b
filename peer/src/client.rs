//! The peer's side of the rendezvous protocol.
//!
//! 1. Connect from the fixed port (the first connection fixes it when the user did
//!    not choose one).
//! 2. Ask the probe port (server port + 1) what address it sees, then send the
//!    hello with that; receive the observed address and the mapping verdict.
//! 3. Answer pings until the go arrives.
//! 4. Keep the connection open during the punch (the NAT mapping the other peer was
//!    told about belongs to it), then report the outcome and close.
//!
//! Every wait has a deadline: resolving the name, connecting, the first answer
//! (short: something that is not a rendezvous is told apart within seconds),
//! each later answer, each silence while waiting for the go and the whole wait,
//! and the relay request. Text the server sends (its error messages, and what a
//! program that is not a rendezvous sent instead) is sanitised here, where it
//! comes in, before it reaches any error shown to the user.

use std::net::SocketAddr;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use punchline_proto::defaults::{ALTERNATE_PORT_OFFSET, PROBE_PORT_OFFSET};
use punchline_proto::pacing::rendezvous_silence;
use punchline_proto::{
    sanitize_for_terminal, CodecError, DialBackResult, ErrorCode, FrameCodec, Go, Hello, Mapping,
    PeerToServer, PunchOutcome, ServerToPeer, MAX_RELAY_CHUNK,
};
use punchline_proto::{ProbeToken, PROBE_TOKEN_LEN};
use tokio::net::{lookup_host, TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio::time::{timeout, timeout_at, Instant};
use tokio_util::codec::Framed;

use crate::error::{describe_attempts, PeerError};
use crate::net::{fixed_port_socket, LinkStream};

/// Time allowed to resolve the rendezvous' name. The system resolver gives up
/// by itself (typically 5 s per name server and attempt), but nothing promises
/// it: a broken resolver configuration must not leave the peer hanging.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(15);

/// Time allowed to open the TCP connection to one rendezvous address.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Time allowed for the first answer on a connection (to the allocation, the
/// hello or the reflection). A rendezvous answers at once; a program that is not
/// one (a web server waiting for a request, a closed-off port that swallows
/// bytes) is told apart after this long, with a clear error rather than a long
/// silence. Three seconds leave room for a slow path and a busy server.
pub const FIRST_ANSWER_TIMEOUT: Duration = Duration::from_secs(3);

/// Time allowed for the rendezvous to answer the hello.
pub const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);

/// Time allowed for the rendezvous' probe port to answer. Short: the probe only
/// tells whether our NAT changes ports per destination, and a missing probe (an
/// older or differently configured server, a firewall) must not hold up the chat.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long after the connection to the rendezvous its probe connection, from
/// the same port, is opened. A NAT keeps one public port for a local port
/// (whatever the destination) by reusing the mapping the first connection
/// made; two SYNs from the port that cross the NAT at the same instant (on
/// two cores) can both find no mapping yet and get a public port each, and the
/// rendezvous then takes an ordinary NAT for a "symmetric" one. Seen in the
/// lab with a Linux NAT that maps into a port range, under load: 1 to 4 of 5
/// runs; with 2 ms, none in 80. The probe's token then reaches the rendezvous
/// that much after the hello, which waits for it: the pairing comes about
/// 3 ms later (5 ms cost 8).
pub const PROBE_STAGGER: Duration = Duration::from_millis(2);

/// Longest silence from the rendezvous while waiting for the other peer.
pub use punchline_proto::defaults::WAIT_SILENCE_TIMEOUT;

/// Longest wait for the other peer to join (for the go), however lively the
/// rendezvous. The server ends the wait itself, by default after 10 minutes (a
/// code nobody used is then free again); this bound is for a server configured
/// to wait longer, or one that keeps pinging and never pairs: one hour, beyond
/// which nobody is still waiting in front of the screen.
pub const GO_WAIT_LIMIT: Duration = Duration::from_secs(60 * 60);

/// Time allowed for the rendezvous to agree to relay, from the request on, pings
/// or not. It answers at once: it needs nothing from the other peer to say yes.
pub const RELAY_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Most characters of a server's error message shown to the user. Its messages
/// are one sentence; a longer one is cut rather than allowed to fill the screen.
const MAX_SHOWN_MESSAGE: usize = 300;

/// Most bytes shown of what a program that is not a rendezvous sent: enough to
/// recognise a banner ("SSH-2.0-OpenSSH_9.6p1 Ubuntu-3") or a status line
/// ("HTTP/1.1 400 Bad Request").
const MAX_SHOWN_GREETING: usize = 48;

/// How long the server has to close after our punch report.
const FINISH_TIMEOUT: Duration = Duration::from_secs(2);

/// Bound on one write to the rendezvous.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Connection to the rendezvous.
pub struct RendezvousConn {
    conn: Framed<TcpStream, FrameCodec<ServerToPeer, PeerToServer>>,
    /// The rendezvous address actually connected to.
    pub server: SocketAddr,
    /// Our fixed local port.
    pub local_port: u16,
    /// The probe started beside the connection ([`RendezvousConn::connect_probing`]).
    probe: Option<Probe>,
    /// Whether the server has answered once with a message of the protocol
    /// (until then, it may be some other program).
    answered: bool,
    /// The probe over the other address family, started with the connection
    /// when the server has an address of that family.
    other_family: Option<Probe>,
    /// What that probe saw, once it has answered.
    other_family_result: Option<SocketAddr>,
    /// Whether this connection is the one to the server's alternate port that
    /// raced a silent first one ([`rendezvous_silence`]).
    via_alternate: bool,
    /// The router's forward of our port, asked for as soon as the port was
    /// bound ([`RendezvousConn::connect_probing`]), for the meeting to keep.
    mapper: Option<crate::portmap::Mapper>,
}

/// The addresses of `server` (`HOST:PORT`), within [`RESOLVE_TIMEOUT`].
pub async fn resolve(server: &str) -> Result<Vec<SocketAddr>, PeerError> {
    let failed = |source| PeerError::Resolve {
        server: server.to_owned(),
        source,
    };
    match timeout(RESOLVE_TIMEOUT, lookup_host(server)).await {
        Ok(Ok(addrs)) => Ok(addrs.collect()),
        Ok(Err(e)) => Err(failed(e)),
        Err(_) => Err(failed(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer within {} s", RESOLVE_TIMEOUT.as_secs()),
        ))),
    }
}

/// A probe running beside the connection, named by `token` in the hello;
/// dropping it stops it.
struct Probe {
    token: ProbeToken,
    task: tokio::task::JoinHandle<Option<SocketAddr>>,
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts a probe from local `port` to the probe port at `addr`, of the other
/// address family than the connection to the rendezvous, named by a token of
/// its own for the hello.
fn other_family_probe(addr: SocketAddr, port: u16) -> Result<Probe, PeerError> {
    let mut token = [0u8; PROBE_TOKEN_LEN];
    getrandom::fill(&mut token)
        .map_err(|e| PeerError::io("no randomness for the probe", std::io::Error::other(e)))?;
    let task = tokio::spawn(probe(addr, port, Some(token), None, None));
    Ok(Probe { token, task })
}

/// Connects from local `port` to the probe port at `addr`, which answers with
/// the address it saw; with `token`, first names the hello it goes with
/// ([`PeerToServer::Probe`]). `None` if it does not answer in time. The time
/// its TCP connection took goes to `connected` (a round trip to the server).
async fn probe(
    addr: SocketAddr,
    port: u16,
    token: Option<ProbeToken>,
    connected: Option<oneshot::Sender<Duration>>,
    alternate: Option<oneshot::Sender<u16>>,
) -> Option<SocketAddr> {
    let ask = async {
        let socket = fixed_port_socket(addr, port).ok()?;
        let started = Instant::now();
        let stream = socket.connect(addr).await.ok()?;
        if let Some(connected) = connected {
            let _ = connected.send(started.elapsed());
        }
        let mut conn = Framed::new(stream, FrameCodec::<ServerToPeer, PeerToServer>::new());
        if let Some(token) = token {
            conn.send(PeerToServer::Probe { token }).await.ok()?;
        }
        match conn.next().await {
            Some(Ok(ServerToPeer::Observed {
                observed,
                alternate_port,
            })) => {
                if let (Some(tx), Some(port)) = (alternate, alternate_port) {
                    let _ = tx.send(port);
                }
                Some(observed)
            }
            _ => None,
        }
    };
    let seen = timeout(PROBE_TIMEOUT, ask).await.ok().flatten();
    tracing::debug!(%addr, ?seen, "probe");
    seen
}

/// Connects `socket` to `addr`. With `probe`, the time the probe's own
/// connection to the same server took (when it comes), a connection that has
/// heard nothing [`rendezvous_silence`] after its SYN is raced by a second one
/// from the same local port to the server's alternate port
/// (the port the server named in the probe's answer, usually main + 2:
/// [`punchline_proto::defaults::ALTERNATE_PORT_OFFSET`]; none named, no
/// race), instead of waiting a second for the kernel to
/// send the SYN again: a lost SYN or SYN-ACK on the way to the rendezvous
/// delays both peers' meeting. The first to connect is returned, with whether
/// it is the second one; the other is closed. A second connection refused
/// leaves the first to go on alone.
async fn connect_racing_silence(
    socket: TcpSocket,
    addr: SocketAddr,
    probe: Option<(oneshot::Receiver<Duration>, oneshot::Receiver<u16>)>,
) -> std::io::Result<(TcpStream, bool)> {
    let port = socket.local_addr()?.port();
    let started = Instant::now();
    let mut first = Box::pin(socket.connect(addr));
    let Some((mut probe_rtt, mut named)) = probe else {
        return Ok((first.await?, false));
    };
    let silence = tokio::select! {
        done = &mut first => return Ok((done?, false)),
        rtt = &mut probe_rtt => match rtt {
            Ok(rtt) => rendezvous_silence(rtt),
            // The probe did not connect: no estimate, the kernel's timing.
            Err(_) => return Ok((first.await?, false)),
        },
    };
    tokio::select! {
        done = &mut first => return Ok((done?, false)),
        _ = tokio::time::sleep_until(started + silence) => {}
    }
    // Only to the alternate port the server named in the probe's answer
    // (due about now: the probe went 2 ms after our SYN, and its answer
    // follows its handshake): a port it did not name may be another
    // program, which would get our hello. And only to the usual one (main
    // + 2): whatever answered at the probe port could be some other program
    // too, naming a port of its choice.
    let usual = addr.port().checked_add(ALTERNATE_PORT_OFFSET);
    let alternate = tokio::select! {
        done = &mut first => return Ok((done?, false)),
        named = &mut named => match named {
            Ok(port) if Some(port) == usual => SocketAddr::new(addr.ip(), port),
            _ => return Ok((first.await?, false)),
        },
        _ = tokio::time::sleep_until(started + silence * 2) => return Ok((first.await?, false)),
    };
    let second = match fixed_port_socket(alternate, port) {
        Ok(second) => second,
        Err(e) => {
            tracing::debug!(%alternate, error = %e, "no socket for the alternate port");
            return Ok((first.await?, false));
        }
    };
    tracing::debug!(%alternate, ?silence, "no answer from the rendezvous yet: trying its alternate port too");
    let mut second = Box::pin(second.connect(alternate));
    tokio::select! {
        done = &mut first => match done {
            Ok(stream) => Ok((stream, false)),
            Err(e) => second.await.map(|stream| (stream, true)).map_err(|_| e),
        },
        done = &mut second => match done {
            Ok(stream) => Ok((stream, true)),
            Err(e) => {
                tracing::debug!(%alternate, error = %e, "the alternate port did not connect");
                Ok((first.await?, false))
            }
        },
    }
}

impl RendezvousConn {
    /// Connects to `server` (`HOST:PORT`) from local `port` (0: the OS picks one,
    /// which then stays ours).
    ///
    /// A `port` that another program holds (without sharing it) is reported as
    /// [`PeerError::PortInUse`], not as an unreachable server.
    pub async fn connect(server: &str, port: u16) -> Result<Self, PeerError> {
        Self::open(server, port, None, false).await
    }

    /// [`RendezvousConn::connect`], with the probe of our NAT's mapping
    /// ([`RendezvousConn::probe`]) to the server's probe port (its port plus
    /// [`PROBE_PORT_OFFSET`] unless `probe_port` says otherwise) started at the
    /// same moment from the same port, instead of after: the hello goes as soon
    /// as the connection is up and names the probe by its token
    /// ([`RendezvousConn::probe_token`]), by which the server pairs the two
    /// connections itself. Two round trips to the server are saved before the
    /// hello (the probe's connection and its answer).
    ///
    /// With `port_mapping`, the router is asked to forward the port as soon
    /// as it is bound ([`crate::portmap::Mapper`]), beside the connection:
    /// the router is nearer than the rendezvous, so the mapping is usually
    /// granted by the time the hello goes, which then names it
    /// ([`punchline_proto::Hello::mapped`]). Not asked of a rendezvous on
    /// this host.
    pub async fn connect_probing(
        server: &str,
        port: u16,
        probe_port: Option<u16>,
        port_mapping: bool,
    ) -> Result<Self, PeerError> {
        Self::open(server, port, Some(probe_port), port_mapping).await
    }

    /// Connects, probing if `probe` says so (`Some(None)`: the default probe
    /// port).
    async fn open(
        server: &str,
        port: u16,
        probe_port: Option<Option<u16>>,
        port_mapping: bool,
    ) -> Result<Self, PeerError> {
        let mut addrs = resolve(server).await?;
        // IPv4 first: where a NAT is, it is on IPv4, and the probe beside the
        // connection classifies the NAT of the connection's family. IPv6, when
        // the server has it too, is seen by a probe of its own
        // ([`RendezvousConn::other_family_token`]).
        addrs.sort_by_key(|a| a.is_ipv6());
        // A family this host has no address of cannot carry the connection
        // nor its probe (an IPv6-only host, say): not tried, unless that
        // leaves nothing (a rendezvous on this host, over loopback).
        let (v4, v6) = crate::net::families();
        let usable = |a: &SocketAddr| if a.is_ipv4() { v4 } else { v6 };
        if addrs.iter().any(usable) {
            addrs.retain(usable);
        }
        let mut tried = Vec::new();
        // The router's forward of the port bound, and that port.
        let mut mapper: Option<(u16, crate::portmap::Mapper)> = None;
        // Addresses for which binding the port failed because it is taken.
        let mut taken = 0;
        for &addr in &addrs {
            let socket = match fixed_port_socket(addr, port) {
                Ok(s) => s,
                Err(e) => {
                    if e.kind() == std::io::ErrorKind::AddrInUse {
                        taken += 1;
                    }
                    tried.push((addr, e));
                    continue;
                }
            };
            // The port is bound now (the system's choice, if 0): the probe
            // can go from it beside the connection.
            let probe = match (probe_port, socket.local_addr()) {
                (Some(probe_port), Ok(local)) => {
                    let probe_port =
                        probe_port.unwrap_or_else(|| addr.port().wrapping_add(PROBE_PORT_OFFSET));
                    let target = SocketAddr::new(addr.ip(), probe_port);
                    let mut token = [0u8; PROBE_TOKEN_LEN];
                    getrandom::fill(&mut token).map_err(|e| {
                        PeerError::io("no randomness for the probe", std::io::Error::other(e))
                    })?;
                    let port = local.port();
                    let (connected, probe_rtt) = oneshot::channel();
                    let (named, alternate) = oneshot::channel();
                    let task = tokio::spawn(async move {
                        tokio::time::sleep(PROBE_STAGGER).await;
                        probe(target, port, Some(token), Some(connected), Some(named)).await
                    });
                    Some((Probe { token, task }, (probe_rtt, alternate)))
                }
                _ => None,
            };
            let (probe, probe_rtt) = probe.unzip();
            // One mapping per port: a second address tried from the same
            // port keeps the first's (a fresh request would be the same
            // entry in the router, which the first's deletion would take).
            match socket.local_addr() {
                Ok(local) if port_mapping && !crate::punch::Here::new(addr).local_trial => {
                    if mapper.as_ref().map(|(port, _)| *port) != Some(local.port()) {
                        mapper = Some((local.port(), crate::portmap::Mapper::start(local.port())));
                    }
                }
                _ => mapper = None,
            }
            // The server's address in the other family, if it has one: a
            // probe there, from the same port, shows our address in that
            // family (for IPv6, usually our own global address) to the
            // server, which hands it to the other peer with ours.
            let other_family = match (probe_port, socket.local_addr()) {
                (Some(probe_port), Ok(local)) => addrs
                    .iter()
                    .find(|a| a.is_ipv4() != addr.is_ipv4())
                    .map(|other| {
                        let probe_port = probe_port
                            .unwrap_or_else(|| other.port().wrapping_add(PROBE_PORT_OFFSET));
                        other_family_probe(SocketAddr::new(other.ip(), probe_port), local.port())
                    })
                    .transpose()?,
                _ => None,
            };
            match timeout(
                CONNECT_TIMEOUT,
                connect_racing_silence(socket, addr, probe_rtt),
            )
            .await
            {
                Ok(Ok((stream, via_alternate))) => {
                    let local_port = stream
                        .local_addr()
                        .map_err(|e| PeerError::io("reading the local port", e))?
                        .port();
                    return Ok(RendezvousConn {
                        conn: Framed::new(stream, FrameCodec::new()),
                        server: addr,
                        local_port,
                        answered: false,
                        probe,
                        other_family,
                        other_family_result: None,
                        via_alternate,
                        mapper: mapper.map(|(_, m)| m),
                    });
                }
                Ok(Err(e)) => tried.push((addr, e)),
                Err(_) => tried.push((
                    addr,
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"),
                )),
            }
        }
        // Binding the port failed for every address: another program holds it
        // without sharing (with one address family free, the other would have
        // been used). Not a connect() error: that is about the server's side.
        if port != 0 && taken > 0 && taken == tried.len() {
            return Err(PeerError::PortInUse { port });
        }
        if tried.is_empty() {
            return Err(PeerError::Resolve {
                server: server.to_owned(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no address found"),
            });
        }
        Err(PeerError::Unreachable {
            server: server.to_owned(),
            tried: describe_attempts(&tried),
        })
    }

    /// The mapping of our port asked for with the connection, for the
    /// meeting to keep (dropping it deletes the mapping).
    pub fn take_mapper(&mut self) -> Option<crate::portmap::Mapper> {
        self.mapper.take()
    }

    /// Whether this connection went to the server's alternate port because
    /// the first one stayed silent (a lost SYN or SYN-ACK).
    pub fn via_alternate(&self) -> bool {
        self.via_alternate
    }

    /// The kernel's estimate of our round trip to the rendezvous.
    pub fn rtt(&self) -> Option<Duration> {
        punchline_net::kernel_rtt(self.conn.get_ref())
    }

    /// Our end of the connection: local address and the fixed port.
    pub fn local_addr(&self) -> Result<SocketAddr, PeerError> {
        self.conn
            .get_ref()
            .local_addr()
            .map_err(|e| PeerError::io("reading the local address", e))
    }

    /// Connects from our fixed port to the rendezvous' probe port, which answers
    /// with the address it saw. `None` if it does not answer in time.
    pub async fn probe(&self, probe_port: u16) -> Option<SocketAddr> {
        probe(
            SocketAddr::new(self.server.ip(), probe_port),
            self.local_port,
            None,
            None,
            None,
        )
        .await
    }

    /// The token of the probe started with the connection
    /// ([`RendezvousConn::connect_probing`]), for the hello: the server then
    /// finds what its probe port saw by itself, and the hello need not wait
    /// for the probe's answer.
    pub fn probe_token(&self) -> Option<ProbeToken> {
        self.probe.as_ref().map(|p| p.token)
    }

    /// The token of the probe over the other address family, for the hello
    /// ([`punchline_proto::Hello::other_family_token`]); `None` if there is
    /// none, or it has already failed (a host with no route of that family
    /// fails at once: the server must not wait for its token).
    pub async fn other_family_token(&mut self) -> Option<ProbeToken> {
        let probe = self.other_family.as_mut()?;
        if probe.task.is_finished() {
            let seen = (&mut probe.task).await.ok().flatten();
            if seen.is_none() {
                self.other_family = None;
                return None;
            }
            self.other_family_result = seen;
        }
        self.other_family.as_ref().map(|p| p.token)
    }

    /// Our address in the other address family, as the server's probe port
    /// saw it, if that probe has answered by now (`None` if it has not, or
    /// none was started): never waits, the punch must not.
    pub async fn other_family_seen(&mut self) -> Option<SocketAddr> {
        if self.other_family_result.is_some() {
            return self.other_family_result;
        }
        let probe = self.other_family.as_mut()?;
        if !probe.task.is_finished() {
            return None;
        }
        self.other_family_result = (&mut probe.task).await.ok().flatten();
        self.other_family_result
    }

    /// Asks for a free nameplate for a new code.
    pub async fn allocate(&mut self) -> Result<String, PeerError> {
        match self
            .request(PeerToServer::Allocate, "the allocation", WELCOME_TIMEOUT)
            .await?
        {
            ServerToPeer::Allocated { nameplate } => {
                punchline_proto::validate_nameplate(&nameplate)
                    .map_err(|e| PeerError::Protocol(format!("the rendezvous allocated an {e}")))?;
                Ok(nameplate)
            }
            other => Err(unexpected(Some(Ok(other)), "a nameplate")),
        }
    }

    /// Sends the hello; returns our observed (public) address and how our NAT
    /// maps our port.
    pub async fn hello(&mut self, hello: Hello) -> Result<(SocketAddr, Mapping), PeerError> {
        let hello = PeerToServer::Hello(hello);
        match self.request(hello, "the hello", WELCOME_TIMEOUT).await? {
            ServerToPeer::Welcome { observed, mapping } => Ok((observed, mapping)),
            other => Err(unexpected(Some(Ok(other)), "a welcome")),
        }
    }

    /// Asks which address this connection comes from (our public address and
    /// port as the main port sees them).
    pub async fn reflect(&mut self) -> Result<SocketAddr, PeerError> {
        match self
            .request(PeerToServer::Reflect, "the reflection", WELCOME_TIMEOUT)
            .await?
        {
            ServerToPeer::Observed { observed, .. } => Ok(observed),
            other => Err(unexpected(Some(Ok(other)), "our observed address")),
        }
    }

    /// Asks the server to connect back to our public address, as an unsolicited
    /// SYN would arrive; returns the address it dialled, what the SYN met, and
    /// how long the answer took (ms).
    pub async fn dial_back(&mut self) -> Result<(SocketAddr, DialBackResult, u32), PeerError> {
        // The server waits up to 2.5 s for its SYN to be answered.
        let limit = WELCOME_TIMEOUT;
        match self
            .request(PeerToServer::DialBack, "the dial-back", limit)
            .await?
        {
            ServerToPeer::DialedBack {
                target,
                result,
                elapsed_ms,
            } => Ok((target, result, elapsed_ms)),
            other => Err(unexpected(Some(Ok(other)), "the dial-back result")),
        }
    }

    /// Sends `msg` and reads the answer (an error answer becomes an error).
    ///
    /// The first answer on the connection also tells whether the server is a
    /// punchline rendezvous at all: it must come within
    /// [`FIRST_ANSWER_TIMEOUT`] and be a message of the protocol, else the error
    /// says what answered instead ([`PeerError::NotRendezvous`]).
    async fn request(
        &mut self,
        msg: PeerToServer,
        what: &str,
        limit: Duration,
    ) -> Result<ServerToPeer, PeerError> {
        let first = !self.answered;
        let full = limit;
        let mut limit = if first {
            limit.min(FIRST_ANSWER_TIMEOUT)
        } else {
            limit
        };
        self.send(msg).await?;
        let sent = tokio::time::Instant::now();
        let reply = loop {
            match tokio::time::timeout_at(sent + limit, self.conn.next()).await {
                Ok(reply) => break Ok(reply),
                // Our request has not even reached the server's TCP yet (it
                // is being retransmitted: a lossy path): silence says
                // nothing about what listens there, so wait the request's
                // full time.
                Err(_)
                    if first
                        && limit < full
                        && punchline_net::unacked_segments(self.conn.get_ref())
                            .is_some_and(|n| n > 0) =>
                {
                    tracing::debug!("request not yet acknowledged; waiting longer");
                    limit = full;
                }
                Err(e) => break Err(e),
            }
        };
        let reply = match reply {
            Ok(reply) => reply,
            Err(_) if first => {
                let silent = format!("no answer within {}", in_words(limit));
                return Err(self
                    .not_rendezvous(None)
                    .unwrap_or(PeerError::NotRendezvous {
                        server: self.server.to_string(),
                        detail: silent,
                    }));
            }
            Err(_) => {
                return Err(PeerError::Timeout(format!(
                    "the rendezvous did not answer {what} within {}",
                    in_words(limit)
                )))
            }
        };
        match reply {
            Some(Ok(ServerToPeer::Error { .. })) => {
                self.answered = true;
                Err(unexpected(reply, what))
            }
            Some(Ok(answer)) => {
                self.answered = true;
                Ok(answer)
            }
            Some(Err(_)) | None if first => {
                let e = unexpected(reply, what);
                Err(self.not_rendezvous(Some(&e)).unwrap_or(e))
            }
            Some(Err(_)) | None => Err(unexpected(reply, what)),
        }
    }

    /// The error for a server that did not answer its first request like a
    /// rendezvous, from what it sent (undecoded, still in the read buffer) or
    /// how it failed (`failure`); `None` if neither shows it is something else
    /// (a connection reset, say).
    fn not_rendezvous(&self, failure: Option<&PeerError>) -> Option<PeerError> {
        let detail = match (describe_greeting(self.conn.read_buffer()), failure) {
            (Some(sent), _) => format!("it sent {sent}"),
            (None, Some(PeerError::ServerClosed)) => {
                "it closed the connection without answering".to_owned()
            }
            (
                None,
                Some(PeerError::Codec(CodecError::FrameTooLarge | CodecError::Decode { .. })),
            ) => "its answer is not a message of the protocol".to_owned(),
            (None, _) => return None,
        };
        Some(PeerError::NotRendezvous {
            server: self.server.to_string(),
            detail,
        })
    }

    /// Leaves the rendezvous at once with a reset rather than a goodbye, so
    /// that no TIME_WAIT holds our port towards it: a peer moving to a new
    /// room reconnects from the same port right away.
    pub fn abort(self) {
        let _ = socket2::SockRef::from(self.conn.get_ref()).set_linger(Some(Duration::ZERO));
    }

    /// Waits for the go, answering pings. Bounded by [`WAIT_SILENCE_TIMEOUT`]
    /// should the server go quiet, and by [`GO_WAIT_LIMIT`] in all (the server
    /// normally ends the wait sooner, with an error saying nobody joined).
    pub async fn wait_for_go(&mut self) -> Result<Go, PeerError> {
        self.wait_for_go_within(WAIT_SILENCE_TIMEOUT, GO_WAIT_LIMIT)
            .await
    }

    /// [`Self::wait_for_go`] with its two bounds: the longest `silence`, and the
    /// whole wait (`limit`).
    async fn wait_for_go_within(
        &mut self,
        silence: Duration,
        limit: Duration,
    ) -> Result<Go, PeerError> {
        let overall = Instant::now() + limit;
        loop {
            let quiet_until = Instant::now() + silence;
            let Ok(next) = timeout_at(quiet_until.min(overall), self.conn.next()).await else {
                return Err(PeerError::Timeout(if Instant::now() >= overall {
                    format!(
                        "the other side did not join within {}; start again when both of you are ready",
                        in_words(limit)
                    )
                } else {
                    format!(
                        "the rendezvous went silent for {} while we waited for the other side: it, or the network path to it, is gone",
                        in_words(silence)
                    )
                }));
            };
            match next {
                Some(Ok(ServerToPeer::Ping { seq })) => {
                    self.send(PeerToServer::Pong { seq }).await?
                }
                Some(Ok(ServerToPeer::Go(go))) => return Ok(go),
                other => return Err(unexpected(other, "the go")),
            }
        }
    }

    /// After the go: sends our sealed box (our candidates) for the other peer.
    pub async fn send_sealed(&mut self, sealed: Vec<u8>) -> Result<(), PeerError> {
        self.send(PeerToServer::Sealed(sealed)).await
    }

    /// After the go: the other peer's sealed box, as the rendezvous passes it on
    /// (answering pings meanwhile). The caller bounds the wait (the punch's
    /// deadline); `Err` if the server closes or says something else.
    pub async fn receive_sealed(&mut self) -> Result<Vec<u8>, PeerError> {
        loop {
            match self.conn.next().await {
                Some(Ok(ServerToPeer::Sealed(sealed))) => return Ok(sealed),
                Some(Ok(ServerToPeer::Ping { seq })) => {
                    self.send(PeerToServer::Pong { seq }).await?
                }
                other => return Err(unexpected(other, "the other side's sealed candidates")),
            }
        }
    }

    /// Reports the punch outcome and closes the connection (best effort: the
    /// report only feeds the server's statistics).
    ///
    /// The server closes first once it has the report, so the TIME_WAIT of this
    /// connection stays on its side: our fixed port can reach the same server
    /// again at once (a new link after a drop). Should it not close in time, the
    /// connection is reset instead, which leaves no TIME_WAIT either.
    pub async fn finish(mut self, outcome: PunchOutcome) {
        let direct = matches!(outcome, PunchOutcome::Direct { .. });
        let _ = self.send(PeerToServer::Report(outcome)).await;
        if !direct {
            // Nothing follows a failure: no new link will reuse this port.
            return;
        }
        let closed = timeout(FINISH_TIMEOUT, async {
            while let Some(Ok(_)) = self.conn.next().await {}
        })
        .await;
        if closed.is_err() {
            let _ = socket2::SockRef::from(self.conn.get_ref()).set_linger(Some(Duration::ZERO));
        }
    }

    /// After a failed punch: reports it and asks the server to relay. Once it
    /// agrees, returns the local end of a byte stream it carries to the other
    /// peer; a task bridges the two until either side closes, and the link over
    /// it is encrypted end to end like a direct one.
    ///
    /// The whole request, pings or not, is bounded by [`RELAY_ANSWER_TIMEOUT`].
    pub async fn relay(mut self, attempts: u32) -> Result<LinkStream, PeerError> {
        self.ask_relay(attempts, RELAY_ANSWER_TIMEOUT).await?;
        let (ours, theirs) = tokio::io::duplex(RELAY_BUFFER);
        let (done_tx, done) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            bridge(self.conn, theirs).await;
            let _ = done_tx.send(());
        });
        Ok(LinkStream::Relayed(ours, Some(done)))
    }

    /// Reports the failed punch and asks for the relay; `Ok` once the server
    /// agrees, within `limit` in all.
    async fn ask_relay(&mut self, attempts: u32, limit: Duration) -> Result<(), PeerError> {
        let asked = timeout(limit, async {
            self.send(PeerToServer::Report(PunchOutcome::Failed { attempts }))
                .await?;
            self.send(PeerToServer::Relay).await?;
            loop {
                match self.conn.next().await {
                    Some(Ok(ServerToPeer::Relaying)) => return Ok(()),
                    // The other side's box, come after the punch gave up: too late.
                    Some(Ok(ServerToPeer::Sealed(_))) => {}
                    Some(Ok(ServerToPeer::Ping { seq })) => {
                        self.send(PeerToServer::Pong { seq }).await?
                    }
                    other => return Err(unexpected(other, "the relay")),
                }
            }
        })
        .await;
        asked.unwrap_or_else(|_| {
            Err(PeerError::Timeout(format!(
                "the rendezvous did not agree to relay within {}",
                in_words(limit)
            )))
        })
    }

    async fn send(&mut self, msg: PeerToServer) -> Result<(), PeerError> {
        timeout(SEND_TIMEOUT, self.conn.send(msg))
            .await
            .map_err(|_| PeerError::Timeout("the rendezvous is not reading".into()))??;
        Ok(())
    }
}

/// Buffer of the in-process stream between the chat and the relay bridge.
const RELAY_BUFFER: usize = 64 * 1024;

/// Carries bytes between the chat's end of a relayed link (`stream`) and the
/// rendezvous, cut into pieces of at most [`MAX_RELAY_CHUNK`]. Ends when either
/// side closes or fails; the chat then sees its link close and reconnects.
async fn bridge(
    mut conn: Framed<TcpStream, FrameCodec<ServerToPeer, PeerToServer>>,
    stream: tokio::io::DuplexStream,
) {
    relay_pieces(&mut conn, stream).await;
    // Everything was written with a flush; close our side so the server sees
    // the end after the last piece.
    let _ = timeout(SEND_TIMEOUT, conn.close()).await;
}

async fn relay_pieces(
    conn: &mut Framed<TcpStream, FrameCodec<ServerToPeer, PeerToServer>>,
    stream: tokio::io::DuplexStream,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut from_chat, mut to_chat) = tokio::io::split(stream);
    let mut buf = vec![0u8; MAX_RELAY_CHUNK];
    loop {
        tokio::select! {
            n = from_chat.read(&mut buf) => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let piece = PeerToServer::Relayed(buf[..n].to_vec());
                    if timeout(SEND_TIMEOUT, conn.send(piece)).await.map_or(true, |r| r.is_err()) {
                        break;
                    }
                }
            },
            msg = conn.next() => match msg {
                Some(Ok(ServerToPeer::Relayed(bytes))) => {
                    if to_chat.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
                Some(Ok(ServerToPeer::Ping { seq })) => {
                    let pong = conn.send(PeerToServer::Pong { seq });
                    if timeout(SEND_TIMEOUT, pong).await.map_or(true, |r| r.is_err()) {
                        break;
                    }
                }
                Some(Ok(ServerToPeer::Sealed(_))) => {}
                Some(Ok(ServerToPeer::Error { message, .. })) => {
                    tracing::warn!("the rendezvous ended the relay: {}", shown_message(&message));
                    break;
                }
                other => {
                    tracing::info!(?other, "relay closed");
                    break;
                }
            },
        }
    }
}

/// The error for an answer that is not the one `wanted`. Nothing of the
/// server's text reaches it unsanitised: an error message is cleaned and cut
/// ([`shown_message`]), any other message is named by its kind only.
fn unexpected(got: Option<Result<ServerToPeer, CodecError>>, wanted: &str) -> PeerError {
    match got {
        None => PeerError::ServerClosed,
        Some(Err(e)) => e.into(),
        Some(Ok(ServerToPeer::Error { code, message })) => PeerError::Rejected {
            code: ErrorCode::from_u16(code),
            message: shown_message(&message),
        },
        Some(Ok(other)) => PeerError::Protocol(format!(
            "expected {wanted}, got {} from the rendezvous",
            kind(&other)
        )),
    }
}

/// A server's message as it may be shown: sanitised for the terminal, at most
/// [`MAX_SHOWN_MESSAGE`] characters.
fn shown_message(message: &str) -> String {
    let mut shown: String = message.chars().take(MAX_SHOWN_MESSAGE).collect();
    if shown.len() < message.len() {
        shown.push('…');
    }
    sanitize_for_terminal(&shown)
}

/// A duration as a user reads it: "3 s", "10 minutes", "250 ms".
fn in_words(d: Duration) -> String {
    let secs = d.as_secs();
    if secs >= 120 && secs % 60 == 0 {
        format!("{} minutes", secs / 60)
    } else if secs >= 1 {
        format!("{secs} s")
    } else {
        format!("{} ms", d.as_millis())
    }
}

/// What kind of message this is, in words (never its contents).
fn kind(msg: &ServerToPeer) -> &'static str {
    match msg {
        ServerToPeer::Error { .. } => "an error",
        ServerToPeer::Welcome { .. } => "a welcome",
        ServerToPeer::Ping { .. } => "a ping",
        ServerToPeer::Go(_) => "a go",
        ServerToPeer::Allocated { .. } => "a nameplate",
        ServerToPeer::Observed { .. } => "an observed address",
        ServerToPeer::Relaying => "a relay confirmation",
        ServerToPeer::Relayed(_) => "relayed bytes",
        ServerToPeer::DialedBack { .. } => "a dial-back result",
        ServerToPeer::Sealed(_) => "a sealed box",
    }
}

/// What a program that is not a rendezvous sent first, as it may be shown: its
/// first line (up to [`MAX_SHOWN_GREETING`] bytes) in quotes when it is text,
/// sanitised; the first bytes in hex when it is not. `None` if it sent nothing.
fn describe_greeting(sent: &[u8]) -> Option<String> {
    if sent.is_empty() {
        return None;
    }
    let head = &sent[..sent.len().min(MAX_SHOWN_GREETING)];
    let first_line = head
        .split(|&b| b == b'\n' || b == b'\r')
        .next()
        .unwrap_or_default();
    // More than the line's end followed (or the line itself was cut).
    let cut = sent[first_line.len()..]
        .iter()
        .any(|&b| b != b'\n' && b != b'\r');
    // The cut may fall inside a character: keep the text up to it.
    let text = match std::str::from_utf8(first_line) {
        Ok(text) => Some(text),
        Err(e) if e.error_len().is_none() => {
            std::str::from_utf8(&first_line[..e.valid_up_to()]).ok()
        }
        Err(_) => None,
    };
    let text = text
        .filter(|t| !t.is_empty())
        .filter(|t| t.chars().all(|c| !c.is_control() && c != '\u{FFFD}'));
    Some(match text {
        Some(text) => format!(
            "'{}{}'",
            sanitize_for_terminal(text),
            if cut { "…" } else { "" }
        ),
        None => {
            const HEX_SHOWN: usize = 16;
            let hex: Vec<String> = sent
                .iter()
                .take(HEX_SHOWN)
                .map(|b| format!("{b:02x}"))
                .collect();
            format!(
                "binary data ({}{})",
                hex.join(" "),
                if sent.len() > HEX_SHOWN { " …" } else { "" }
            )
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn a_greeting_is_shown_short_and_harmless() {
        assert_eq!(describe_greeting(b""), None);
        assert_eq!(
            describe_greeting(b"SSH-2.0-OpenSSH_9.6\r\n").as_deref(),
            Some("'SSH-2.0-OpenSSH_9.6'")
        );
        assert_eq!(
            describe_greeting(b"HTTP/1.1 400 Bad Request\r\nServer: x\r\n").as_deref(),
            Some("'HTTP/1.1 400 Bad Request…'")
        );
        // A long line is cut, also inside a character.
        let long = format!("{}é and more", "x".repeat(MAX_SHOWN_GREETING - 1));
        assert_eq!(
            describe_greeting(long.as_bytes()),
            Some(format!("'{}…'", "x".repeat(MAX_SHOWN_GREETING - 1)))
        );
        // Escapes or bidi characters in the greeting: shown as U+FFFD or hex,
        // never as they are.
        let hostile = describe_greeting("hi \u{202E}dlrow".as_bytes()).expect("shown");
        assert_eq!(hostile, "'hi \u{FFFD}dlrow'");
        let escape = describe_greeting(b"\x1b]0;title\x07").expect("shown");
        assert_eq!(escape, "binary data (1b 5d 30 3b 74 69 74 6c 65 07)");
        assert_eq!(
            describe_greeting(&[0x16, 3, 1, 0, 0xa5, 1, 0, 0, 0xa1, 3, 3, 0, 1, 2, 3, 4, 5, 6]),
            Some("binary data (16 03 01 00 a5 01 00 00 a1 03 03 00 01 02 03 04 …)".to_owned())
        );
    }

    #[test]
    fn a_server_message_is_shown_short_and_harmless() {
        assert_eq!(
            shown_message("no\x1b[2J\u{2066}x"),
            "no\u{FFFD}[2J\u{FFFD}x"
        );
        let long = "y".repeat(MAX_SHOWN_MESSAGE + 50);
        let shown = shown_message(&long);
        assert_eq!(shown.chars().count(), MAX_SHOWN_MESSAGE + 1);
        assert!(shown.ends_with('…'));
        let err = unexpected(
            Some(Ok(ServerToPeer::Allocated {
                nameplate: "\x1b[2J".into(),
            })),
            "a welcome",
        );
        assert_eq!(
            err.to_string(),
            "protocol error: expected a welcome, got a nameplate from the rendezvous"
        );
    }

    #[test]
    fn durations_in_words() {
        assert_eq!(in_words(GO_WAIT_LIMIT), "60 minutes");
        assert_eq!(in_words(WAIT_SILENCE_TIMEOUT), "35 s");
        assert_eq!(in_words(Duration::from_millis(250)), "250 ms");
    }

    /// A connected [`Rendezvous`] and the server's end of its connection.
    async fn connected() -> (
        RendezvousConn,
        Framed<TcpStream, FrameCodec<PeerToServer, ServerToPeer>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let addr = addr.to_string();
        let (ours, theirs) = tokio::join!(RendezvousConn::connect(&addr, 0), async {
            listener.accept().await.expect("accept").0
        });
        (
            ours.expect("connect"),
            Framed::new(theirs, FrameCodec::new()),
        )
    }

    #[tokio::test]
    async fn waiting_for_the_go_ends_when_the_server_goes_silent() {
        let (mut rv, _server) = connected().await;
        let started = std::time::Instant::now();
        let err = rv
            .wait_for_go_within(Duration::from_millis(200), Duration::from_secs(30))
            .await
            .expect_err("no go");
        assert!(
            err.to_string()
                .starts_with("the rendezvous went silent for 200 ms"),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn waiting_for_the_go_ends_however_lively_the_server() {
        let (mut rv, mut server) = connected().await;
        let pinger = tokio::spawn(async move {
            for seq in 0.. {
                if server.send(ServerToPeer::Ping { seq }).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                // Read the pong, as the server does.
                let _ = server.next().await;
            }
        });
        let started = std::time::Instant::now();
        let err = rv
            .wait_for_go_within(Duration::from_millis(300), Duration::from_millis(800))
            .await
            .expect_err("no go");
        assert!(
            err.to_string()
                .starts_with("the other side did not join within 800 ms"),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        drop(rv);
        let _ = pinger.await;
    }

    #[tokio::test]
    async fn the_relay_request_has_an_absolute_deadline() {
        let (mut rv, mut server) = connected().await;
        // A server that keeps pinging and never agrees.
        let pinger = tokio::spawn(async move {
            for seq in 0.. {
                if server.send(ServerToPeer::Ping { seq }).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let started = std::time::Instant::now();
        let err = rv
            .ask_relay(3, Duration::from_millis(500))
            .await
            .expect_err("no relay");
        assert!(
            err.to_string()
                .starts_with("the rendezvous did not agree to relay within 500 ms"),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        drop(rv);
        pinger.abort();
    }
}
