//! A fake rendezvous for tests that play a hostile server: it listens on
//! loopback, accepts peers and welcomes them, and the test decides the rest.

use std::net::SocketAddr;

use futures::{SinkExt, StreamExt};
use punchline_proto::{FrameCodec, Hello, Mapping, PeerToServer, ServerToPeer};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Framed;

/// A listener on a free loopback port for a fake rendezvous that runs on
/// `rt`; returns it with its address.
pub fn listen(rt: &tokio::runtime::Runtime) -> (TcpListener, SocketAddr) {
    let listener = rt
        .block_on(TcpListener::bind("127.0.0.1:0"))
        .expect("bind the fake rendezvous");
    let addr = listener.local_addr().expect("address");
    (listener, addr)
}

/// The fake rendezvous' end of a peer's connection.
pub type ServerConn = Framed<TcpStream, FrameCodec<PeerToServer, ServerToPeer>>;

/// A peer that said hello to the test rendezvous.
pub struct Arrival {
    pub conn: ServerConn,
    pub observed: SocketAddr,
    pub hello: Hello,
}

/// Accepts the next connection that says hello (probe connections to the main
/// port do not happen: the probe port is elsewhere), welcomes it with `mapping`.
pub async fn arrive(listener: &TcpListener, mapping: impl Fn(SocketAddr) -> Mapping) -> Arrival {
    loop {
        let (stream, observed) = listener.accept().await.expect("accept");
        let mut conn: ServerConn = Framed::new(stream, FrameCodec::new());
        let Some(Ok(PeerToServer::Hello(hello))) = conn.next().await else {
            continue;
        };
        conn.send(ServerToPeer::Welcome {
            observed,
            mapping: mapping(observed),
        })
        .await
        .expect("welcome");
        return Arrival {
            conn,
            observed,
            hello,
        };
    }
}

/// After the go to both: passes each one's sealed box to the other, as an
/// honest rendezvous does, until both ask for the relay (their punch, to LAN
/// candidates only and with none offered, fails at once); agrees to relay.
pub async fn until_both_relay(mut a: ServerConn, mut b: ServerConn) -> (ServerConn, ServerConn) {
    let (mut a_done, mut b_done) = (false, false);
    while !(a_done && b_done) {
        tokio::select! {
            m = a.next(), if !a_done => match m {
                Some(Ok(PeerToServer::Sealed(x))) => b.send(ServerToPeer::Sealed(x)).await.expect("box to b"),
                Some(Ok(PeerToServer::Relay)) => a_done = true,
                Some(Ok(_)) => {}
                other => panic!("a peer left before asking for the relay: {other:?}"),
            },
            m = b.next(), if !b_done => match m {
                Some(Ok(PeerToServer::Sealed(x))) => a.send(ServerToPeer::Sealed(x)).await.expect("box to a"),
                Some(Ok(PeerToServer::Relay)) => b_done = true,
                Some(Ok(_)) => {}
                other => panic!("a peer left before asking for the relay: {other:?}"),
            },
        }
    }
    a.send(ServerToPeer::Relaying).await.expect("relaying");
    b.send(ServerToPeer::Relaying).await.expect("relaying");
    (a, b)
}

/// A mapping that makes a peer skip the punch to the public address (so the
/// test rendezvous relays the link, and can cut it).
pub const SYMMETRIC: punchline_proto::Mapping = punchline_proto::Mapping::DependsOnDestination {
    first: 1,
    second: 2,
};

/// A go naming the other peer at `other_observed` behind a symmetric NAT
/// (so neither side punches the public address), with its key-exchange
/// message `other_pake`, our `role` and the meeting's `session`.
pub fn go(
    other_observed: SocketAddr,
    other_pake: Vec<u8>,
    role: punchline_proto::Role,
    session: [u8; 16],
) -> ServerToPeer {
    ServerToPeer::Go(punchline_proto::Go {
        peer: punchline_proto::PeerInfo {
            observed: other_observed,
            mapping: SYMMETRIC,
            pake: other_pake,
            other_family: None,
            mapped: None,
        },
        role,
        session,
        others_go_after_us: 0,
    })
}

/// A punched link to a peer, framed as peers frame it.
pub type LinkConn =
    Framed<TcpStream, FrameCodec<punchline_proto::PeerToPeer, punchline_proto::PeerToPeer>>;

/// Connects from `local` to `peer` until the simultaneous open succeeds
/// (within 15 s).
pub async fn punch(local: u16, peer: SocketAddr) -> TcpStream {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let socket = punchline_peer::net::fixed_port_socket(peer, local).expect("socket");
        if let Ok(stream) = socket.connect(peer).await {
            return stream;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "could not punch to {peer}"
        );
        tokio::task::yield_now().await;
    }
}

/// Runs the link checks with a victim, posing as the other peer in `role` of
/// the meeting `session`. Whatever comes next is the caller's.
pub async fn pose(stream: TcpStream, session: [u8; 16], role: punchline_proto::Role) -> LinkConn {
    let mut link: LinkConn = Framed::new(stream, FrameCodec::new());
    link.send(punchline_proto::link_check::link_hello(
        punchline_peer::punch::link_token(&session),
        role,
    ))
    .await
    .expect("link hello");
    assert!(matches!(
        link.next().await,
        Some(Ok(punchline_proto::PeerToPeer::LinkHello { .. }))
    ));
    link
}
