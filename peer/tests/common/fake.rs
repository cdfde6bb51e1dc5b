//! A fake rendezvous for tests that play a hostile server: it accepts peers
//! and welcomes them, and the test decides the rest.

use std::net::SocketAddr;

use futures::{SinkExt, StreamExt};
use punchline_proto::{FrameCodec, Hello, Mapping, PeerToServer, ServerToPeer};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Framed;

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
