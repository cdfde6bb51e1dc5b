//! A raw client of the rendezvous protocol: a framed TCP connection that sends
//! any [`PeerToServer`] message and hands back each [`ServerToPeer`] message.
//!
//! Test calls (`send`, `recv`, `go`, …) panic, within [`WAIT`], when the
//! server does not do what they expect. The load generator, which reports
//! failures rather than panics, uses the fallible [`connect_from`],
//! [`Client::try_send`] and [`Client::next_message`].

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{SinkExt, Stream, StreamExt};
use punchline_proto::{
    CodecError, ErrorCode, FrameCodec, Go, Hello, Mapping, PeerToServer, ServerToPeer,
    PROTOCOL_VERSION,
};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::timeout;
use tokio_util::codec::Framed;

/// How long a test waits for the server's next message, or for its close.
/// Loopback answers in microseconds; the rest is slack for a busy machine.
pub const WAIT: Duration = Duration::from_secs(10);

/// A peer's framed connection to the rendezvous.
pub type Conn = Framed<TcpStream, FrameCodec<ServerToPeer, PeerToServer>>;

/// Why a fallible call of [`Client`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The connection failed, or the server sent something that is no message.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The server closed the connection.
    #[error("the rendezvous closed the connection")]
    Closed,
}

/// A TCP connection from local address `source` (any port) to `server`.
///
/// The port is left to `connect()` (`IP_BIND_ADDRESS_NO_PORT`): a plain bind
/// to port 0 must find a port no socket holds, TIME_WAIT ones included, and
/// at tens of thousands of connections a second (the load generator) that
/// search costs more than the connection. Chosen at connect, the port need
/// only make the 4-tuple unique.
pub async fn connect_from(source: IpAddr, server: SocketAddr) -> io::Result<TcpStream> {
    use std::os::fd::AsRawFd;
    let socket = match source {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    let one: libc::c_int = 1;
    // SAFETY: a valid socket descriptor and a c_int option value of the given size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    socket.bind(SocketAddr::new(source, 0))?;
    let stream = socket.connect(server).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A first hello of the current protocol version for `nameplate`, carrying
/// `pake` (opaque to the server) and no probe result.
pub fn hello(nameplate: &str, pake: &[u8]) -> Hello {
    Hello {
        version: PROTOCOL_VERSION,
        nameplate: nameplate.into(),
        probe_observed: None,
        probe_token: None,
        pake: pake.to_vec(),
        resume: None,
        other_family_token: None,
        mapped: None,
    }
}

/// The error code and message of `msg`, if it is an error.
pub fn refusal(msg: &ServerToPeer) -> Option<(ErrorCode, String)> {
    match msg {
        ServerToPeer::Error { code, message } => {
            Some((ErrorCode::from_u16(*code), message.clone()))
        }
        _ => None,
    }
}

/// The error code of `msg`, if it is an error.
pub fn error_code(msg: &ServerToPeer) -> Option<ErrorCode> {
    refusal(msg).map(|(code, _)| code)
}

/// A connection to the rendezvous, speaking its protocol on command. As a
/// [`Stream`] it yields every message as it comes, pings included.
pub struct Client {
    conn: Conn,
}

impl Client {
    /// Speaks the protocol over `stream`, already connected.
    pub fn new(stream: TcpStream) -> Client {
        Client {
            conn: Framed::new(stream, FrameCodec::new()),
        }
    }

    /// Connects to `server`.
    pub async fn connect(server: SocketAddr) -> Client {
        let stream = TcpStream::connect(server)
            .await
            .unwrap_or_else(|e| panic!("connect to {server}: {e}"));
        Client::new(stream)
    }

    /// Connects to `server` from local address `source` (see [`connect_from`]).
    pub async fn connect_from(source: IpAddr, server: SocketAddr) -> Client {
        let stream = connect_from(source, server)
            .await
            .unwrap_or_else(|e| panic!("connect from {source} to {server}: {e}"));
        Client::new(stream)
    }

    /// This end's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.conn.get_ref().local_addr().expect("local address")
    }

    /// The connection, for test bytes that are no message.
    pub fn stream_mut(&mut self) -> &mut TcpStream {
        self.conn.get_mut()
    }

    /// The framed connection, to split it or to shut it down.
    pub fn into_inner(self) -> Conn {
        self.conn
    }

    /// Sends `msg`.
    pub async fn try_send(&mut self, msg: PeerToServer) -> Result<(), ClientError> {
        Ok(self.conn.send(msg).await?)
    }

    /// The next message that is not a ping; pings are answered, as a peer
    /// does. No time limit: the caller sets its own.
    pub async fn next_message(&mut self) -> Result<ServerToPeer, ClientError> {
        loop {
            match self.conn.next().await.ok_or(ClientError::Closed)?? {
                ServerToPeer::Ping { seq } => self.try_send(PeerToServer::Pong { seq }).await?,
                other => return Ok(other),
            }
        }
    }

    /// Sends `msg`.
    pub async fn send(&mut self, msg: PeerToServer) {
        self.try_send(msg).await.expect("send to the rendezvous");
    }

    /// Sends [`hello`]`(nameplate, pake)`.
    pub async fn send_hello(&mut self, nameplate: &str, pake: &[u8]) {
        self.send(PeerToServer::Hello(hello(nameplate, pake))).await;
    }

    /// Writes `bytes` as they are: garbage, or a frame of another protocol.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream_mut()
            .write_all(bytes)
            .await
            .expect("write to the rendezvous");
    }

    /// The next message, pings included.
    pub async fn recv(&mut self) -> ServerToPeer {
        timeout(WAIT, self.conn.next())
            .await
            .expect("message in time")
            .expect("connection open")
            .expect("valid frame")
    }

    /// The next message that is not a ping; pings are answered.
    pub async fn recv_after_pings(&mut self) -> ServerToPeer {
        timeout(WAIT, self.next_message())
            .await
            .expect("message in time")
            .expect("a message")
    }

    /// Sends `msg` and returns the next message.
    pub async fn ask(&mut self, msg: PeerToServer) -> ServerToPeer {
        self.send(msg).await;
        self.recv().await
    }

    /// The welcome, which must come next: the observed address and mapping.
    pub async fn welcome(&mut self) -> (SocketAddr, Mapping) {
        match self.recv().await {
            ServerToPeer::Welcome { observed, mapping } => (observed, mapping),
            other => panic!("expected a welcome, got {other:?}"),
        }
    }

    /// Answers pings until the go, which must come next; returns it and how
    /// many pings were answered.
    pub async fn go(&mut self) -> (Go, u32) {
        let mut pings = 0;
        loop {
            match self.recv().await {
                ServerToPeer::Ping { seq } => {
                    pings += 1;
                    self.send(PeerToServer::Pong { seq }).await;
                }
                ServerToPeer::Go(go) => return (go, pings),
                other => panic!("expected the go, got {other:?}"),
            }
        }
    }

    /// Asks for a new nameplate; returns it.
    pub async fn allocate(&mut self) -> String {
        match self.ask(PeerToServer::Allocate).await {
            ServerToPeer::Allocated { nameplate } => nameplate,
            other => panic!("expected a nameplate, got {other:?}"),
        }
    }

    /// Checks the server closes the connection next.
    pub async fn assert_closed(&mut self) {
        let next = timeout(WAIT, self.conn.next())
            .await
            .expect("closed in time");
        assert!(next.is_none(), "expected the close, got {next:?}");
    }
}

impl Stream for Client {
    type Item = Result<ServerToPeer, CodecError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.conn).poll_next(cx)
    }
}
