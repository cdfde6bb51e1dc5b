//! The rendezvous under abuse, on loopback: per-address limits refuse the abuser
//! and only the abuser, and floods of hostile clients do not stop a fresh pair
//! from another address from meeting.
//!
//! Abusers and the honest pair use different loopback addresses (127.0.0.x), as
//! they would be different hosts on the internet.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use punchline_proto::{ErrorCode, FrameCodec, Hello, PeerToServer, ServerToPeer, PROTOCOL_VERSION};
use punchline_rendezvous::{run, Config};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio::time::{sleep, timeout};
use tokio_util::codec::Framed;

type Client = Framed<TcpStream, FrameCodec<ServerToPeer, PeerToServer>>;

const WAIT: Duration = Duration::from_secs(10);

async fn start(config: Config) -> (SocketAddr, oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        run(listener, config, async {
            let _ = stopped.await;
        })
        .await
        .expect("server runs");
    });
    (addr, stop)
}

fn from(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// A TCP connection to `server` from loopback address `ip`.
async fn connect_from(ip: IpAddr, server: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::new(ip, 0)).expect("bind source");
    socket.connect(server).await.expect("connect")
}

async fn hello_from(ip: IpAddr, server: SocketAddr, nameplate: &str, _name: &str) -> Client {
    let mut c: Client = Framed::new(connect_from(ip, server).await, FrameCodec::new());
    c.send(PeerToServer::Hello(Hello {
        version: PROTOCOL_VERSION,
        nameplate: nameplate.into(),
        probe_observed: None,
        pake: vec![],
        resume: None,
    }))
    .await
    .expect("send hello");
    c
}

async fn next(c: &mut Client) -> ServerToPeer {
    timeout(WAIT, c.next())
        .await
        .expect("message in time")
        .expect("connection open")
        .expect("valid frame")
}

/// Answers pings until something else comes.
async fn next_after_pings(c: &mut Client) -> ServerToPeer {
    loop {
        match next(c).await {
            ServerToPeer::Ping { seq } => c.send(PeerToServer::Pong { seq }).await.expect("pong"),
            other => return other,
        }
    }
}

fn refusal(msg: &ServerToPeer) -> Option<(ErrorCode, String)> {
    match msg {
        ServerToPeer::Error { code, message } => {
            Some((ErrorCode::from_u16(*code), message.clone()))
        }
        _ => None,
    }
}

/// An honest pair from `ip` meets on `nameplate`; returns how long it took.
async fn honest_pair(ip: IpAddr, server: SocketAddr, nameplate: &str) -> Duration {
    let start = Instant::now();
    let mut a = hello_from(ip, server, nameplate, "alice").await;
    assert!(matches!(next(&mut a).await, ServerToPeer::Welcome { .. }));
    let mut b = hello_from(ip, server, nameplate, "bob").await;
    assert!(matches!(next(&mut b).await, ServerToPeer::Welcome { .. }));
    let (ga, gb) = tokio::join!(next_after_pings(&mut a), next_after_pings(&mut b));
    assert!(matches!(ga, ServerToPeer::Go(_)), "{ga:?}");
    assert!(matches!(gb, ServerToPeer::Go(_)), "{gb:?}");
    start.elapsed()
}

#[tokio::test]
async fn the_connection_cap_per_address_refuses_only_that_address() {
    let config = Config {
        connections_per_address: 5,
        ..Config::default()
    };
    let (server, _stop) = start(config).await;
    let abuser = from(2);
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(connect_from(abuser, server).await);
    }
    let mut sixth: Client = Framed::new(connect_from(abuser, server).await, FrameCodec::new());
    let (code, message) = refusal(&next(&mut sixth).await).expect("refused");
    assert_eq!(code, ErrorCode::Busy);
    assert!(
        message.contains("too many connections from your address 127.0.0.2"),
        "{message}"
    );
    // Another address is served as usual.
    honest_pair(from(3), server, "1").await;
    // Closing one gives the abuser its slot back.
    drop(held.pop());
    sleep(Duration::from_millis(100)).await;
    let mut again = hello_from(abuser, server, "2", "x").await;
    assert!(matches!(
        next(&mut again).await,
        ServerToPeer::Welcome { .. }
    ));
}

#[tokio::test]
async fn a_burst_of_new_codes_from_one_address_is_cut_off() {
    let (server, _stop) = start(Config::default()).await;
    let abuser = from(4);
    let mut accepted: u32 = 0;
    let mut refused = None;
    let mut held = Vec::new();
    for n in 0..20 {
        let mut c = hello_from(abuser, server, &(100 + n).to_string(), "spam").await;
        match next(&mut c).await {
            ServerToPeer::Welcome { .. } => accepted += 1,
            other => {
                refused = refusal(&other);
                break;
            }
        }
        held.push(c);
    }
    assert_eq!(accepted, punchline_rendezvous::server::CODE_BURST);
    let (code, message) = refused.expect("the burst is cut off");
    assert_eq!(code, ErrorCode::Busy);
    assert!(message.contains("new codes too fast"), "{message}");
    // Joining an existing code is not a new code; other addresses are unaffected.
    honest_pair(from(5), server, "1").await;
}

#[tokio::test]
async fn floods_do_not_stop_a_fresh_pair_from_another_address() {
    // Limits raised so that the floods below are served, not refused: this test
    // is about the server staying responsive under them.
    let config = Config {
        connections_per_address: 2_000,
        connections_per_minute: 100_000,
        codes_per_minute: 100_000,
        hello_timeout: Duration::from_secs(30),
        ..Config::default()
    };
    let (server, _stop) = start(config).await;
    let normal = honest_pair(from(9), server, "7").await;

    // 1,000 idle connections.
    let mut idle = Vec::new();
    for _ in 0..1_000 {
        idle.push(connect_from(from(6), server).await);
    }
    // Random bytes, and a length prefix announcing 4 GiB.
    let mut garbage = connect_from(from(7), server).await;
    garbage
        .write_all(&[0x13, 0x37, 0, 0, 0, 1, 0xff, 0xee])
        .await
        .expect("write");
    let mut huge = connect_from(from(7), server).await;
    huge.write_all(&[0xff, 0xff, 0xff, 0xff, 0])
        .await
        .expect("write");
    // A client sending one byte a second.
    let mut slow = connect_from(from(7), server).await;
    let slow_task = tokio::spawn(async move {
        for b in [0u8, 0, 0, 40, 0, 1] {
            if slow.write_all(&[b]).await.is_err() {
                return;
            }
            sleep(Duration::from_secs(1)).await;
        }
    });
    // Clients that register and never read again.
    let mut deaf = Vec::new();
    for n in 0..20 {
        deaf.push(hello_from(from(8), server, &(500 + n).to_string(), "deaf").await);
    }

    let flooded = honest_pair(from(10), server, "8").await;
    eprintln!("pairing took {normal:?} before the floods and {flooded:?} during them");
    // The garbage senders were answered and dropped.
    for s in [&mut garbage, &mut huge] {
        let mut buf = Vec::new();
        let read = timeout(WAIT, tokio::io::AsyncReadExt::read_to_end(s, &mut buf)).await;
        assert!(matches!(read, Ok(Ok(_))), "connection closed by the server");
    }
    slow_task.abort();
    drop(idle);
}
