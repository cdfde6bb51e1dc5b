//! The peer's side of the rendezvous protocol.
//!
//! 1. Connect from the fixed port (the first connection fixes it when the user did
//!    not choose one).
//! 2. Ask the probe port (server port + 1) what address it sees, then send the
//!    hello with that; receive the observed address and the mapping verdict.
//! 3. Answer pings until the go arrives.
//! 4. Keep the connection open during the punch (the NAT mapping the other peer was
//!    told about belongs to it), then report the outcome and close.

use std::net::SocketAddr;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use punchline_proto::{
    DialBackResult, ErrorCode, FrameCodec, Go, Hello, Mapping, PeerToServer, PunchOutcome,
    ServerToPeer, MAX_RELAY_CHUNK,
};
use tokio::net::{lookup_host, TcpStream};
use tokio::time::timeout;
use tokio_util::codec::Framed;

use crate::error::{describe_attempts, PeerError};
use crate::net::{fixed_port_socket, LinkStream};

/// Time allowed to open the TCP connection to one rendezvous address.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Time allowed for the rendezvous to answer the hello.
pub const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);

/// Time allowed for the rendezvous' probe port to answer. Short: the probe only
/// tells whether our NAT changes ports per destination, and a missing probe (an
/// older or differently configured server, a firewall) must not hold up the chat.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Longest silence from the rendezvous while waiting for the other peer. The server
/// pings a waiting peer every 10 s; three missed pings mean it or the path is gone
/// (a NAT that dropped the mapping, a server that died without closing).
pub const WAIT_SILENCE_TIMEOUT: Duration = Duration::from_secs(35);

/// How long the server has to close after our punch report.
const FINISH_TIMEOUT: Duration = Duration::from_secs(2);

/// Bound on one write to the rendezvous.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Connection to the rendezvous.
pub struct Rendezvous {
    conn: Framed<TcpStream, FrameCodec<ServerToPeer, PeerToServer>>,
    /// The rendezvous address actually connected to.
    pub server: SocketAddr,
    /// Our fixed local port.
    pub local_port: u16,
}

impl Rendezvous {
    /// Connects to `server` (`HOST:PORT`) from local `port` (0: the OS picks one,
    /// which then stays ours).
    pub async fn connect(server: &str, port: u16) -> Result<Self, PeerError> {
        let addrs: Vec<SocketAddr> = lookup_host(server)
            .await
            .map_err(|source| PeerError::Resolve {
                server: server.to_owned(),
                source,
            })?
            .collect();
        let mut tried = Vec::new();
        for addr in addrs {
            let socket = match fixed_port_socket(addr, port) {
                Ok(s) => s,
                Err(e) => {
                    tried.push((addr, e));
                    continue;
                }
            };
            match timeout(CONNECT_TIMEOUT, socket.connect(addr)).await {
                Ok(Ok(stream)) => {
                    let local_port = stream
                        .local_addr()
                        .map_err(|e| PeerError::io("reading the local port", e))?
                        .port();
                    return Ok(Rendezvous {
                        conn: Framed::new(stream, FrameCodec::new()),
                        server: addr,
                        local_port,
                    });
                }
                Ok(Err(e)) => tried.push((addr, e)),
                Err(_) => tried.push((
                    addr,
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"),
                )),
            }
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
        let addr = SocketAddr::new(self.server.ip(), probe_port);
        let ask = async {
            let socket = fixed_port_socket(addr, self.local_port).ok()?;
            let stream = socket.connect(addr).await.ok()?;
            let mut conn = Framed::new(stream, FrameCodec::<ServerToPeer, PeerToServer>::new());
            match conn.next().await {
                Some(Ok(ServerToPeer::Observed { observed })) => Some(observed),
                _ => None,
            }
        };
        let seen = timeout(PROBE_TIMEOUT, ask).await.ok().flatten();
        tracing::debug!(%addr, ?seen, "probe");
        seen
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
            ServerToPeer::Observed { observed } => Ok(observed),
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
    async fn request(
        &mut self,
        msg: PeerToServer,
        what: &str,
        limit: Duration,
    ) -> Result<ServerToPeer, PeerError> {
        self.send(msg).await?;
        let reply = timeout(limit, self.conn.next())
            .await
            .map_err(|_| PeerError::Timeout(format!("the rendezvous did not answer {what}")))?;
        match reply {
            Some(Ok(ServerToPeer::Error { .. })) | Some(Err(_)) | None => {
                Err(unexpected(reply, what))
            }
            Some(Ok(answer)) => Ok(answer),
        }
    }

    /// Waits for the go, answering pings. Bounded by the server's wait limit, and
    /// by [`WAIT_SILENCE_TIMEOUT`] should the server go quiet.
    pub async fn wait_for_go(&mut self) -> Result<Go, PeerError> {
        loop {
            match self.conn.next().await {
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
    pub async fn relay(mut self, attempts: u32) -> Result<LinkStream, PeerError> {
        self.send(PeerToServer::Report(PunchOutcome::Failed { attempts }))
            .await?;
        self.send(PeerToServer::Relay).await?;
        loop {
            let reply = timeout(WELCOME_TIMEOUT, self.conn.next())
                .await
                .map_err(|_| {
                    PeerError::Timeout("the rendezvous did not answer the relay request".into())
                })?;
            match reply {
                Some(Ok(ServerToPeer::Relaying)) => break,
                // The other side's box, come after the punch gave up: too late.
                Some(Ok(ServerToPeer::Sealed(_))) => {}
                Some(Ok(ServerToPeer::Ping { seq })) => {
                    self.send(PeerToServer::Pong { seq }).await?
                }
                other => return Err(unexpected(other, "the relay")),
            }
        }
        let (ours, theirs) = tokio::io::duplex(RELAY_BUFFER);
        let (done_tx, done) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            bridge(self.conn, theirs).await;
            let _ = done_tx.send(());
        });
        Ok(LinkStream::Relayed(ours, Some(done)))
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
                    let _ = conn.send(PeerToServer::Pong { seq }).await;
                }
                Some(Ok(ServerToPeer::Sealed(_))) => {}
                Some(Ok(ServerToPeer::Error { message, .. })) => {
                    tracing::warn!("the rendezvous ended the relay: {message}");
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

fn unexpected(
    got: Option<Result<ServerToPeer, punchline_proto::CodecError>>,
    wanted: &str,
) -> PeerError {
    match got {
        None => PeerError::ServerClosed,
        Some(Err(e)) => e.into(),
        Some(Ok(ServerToPeer::Error { code, message })) => PeerError::Rejected {
            code: ErrorCode::from_u16(code),
            message,
        },
        Some(Ok(other)) => PeerError::Protocol(format!("expected {wanted}, got {other:?}")),
    }
}
