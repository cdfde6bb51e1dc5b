//! The rendezvous over real loopback sockets, driven by protocol-level clients.

use std::net::SocketAddr;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use punchline_proto::{
    ErrorCode, FrameCodec, Go, Hello, Mapping, PeerToServer, Role, ServerToPeer, PROTOCOL_VERSION,
};
use punchline_rendezvous::{run, run_probe, Config};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::time::timeout;
use tokio_util::codec::Framed;

type Client = Framed<TcpStream, FrameCodec<ServerToPeer, PeerToServer>>;

const WAIT: Duration = Duration::from_secs(10);

async fn start(config: Config) -> (SocketAddr, oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        run(listener, config, async {
            let _ = stopped.await;
        })
        .await
        .expect("server runs");
    });
    (addr, stop, task)
}

async fn next(c: &mut Client) -> ServerToPeer {
    timeout(WAIT, c.next())
        .await
        .expect("message in time")
        .expect("connection open")
        .expect("valid frame")
}

/// Sends a hello of the current version.
async fn send_hello(
    c: &mut Client,
    nameplate: &str,
    name: &str,
    candidates: Vec<SocketAddr>,
    probe_observed: Option<SocketAddr>,
) {
    // Candidates no longer travel in the hello (they go sealed after the go).
    let _ = candidates;
    c.send(PeerToServer::Hello(Hello {
        version: PROTOCOL_VERSION,
        nameplate: nameplate.into(),
        probe_observed,
        // Opaque to the server: the peer's name stands in for a SPAKE2 message.
        pake: name.as_bytes().to_vec(),
        resume: None,
    }))
    .await
    .expect("send hello");
}

/// The next message that is not a ping (pings are answered).
async fn next_after_pings(c: &mut Client) -> ServerToPeer {
    loop {
        match next(c).await {
            ServerToPeer::Ping { seq } => c.send(PeerToServer::Pong { seq }).await.expect("pong"),
            other => return other,
        }
    }
}

/// Checks the server closes the connection.
async fn assert_closed(c: &mut Client) {
    assert!(timeout(WAIT, c.next())
        .await
        .expect("closed in time")
        .is_none());
}

/// Connects, says hello, returns the client and its observed address.
async fn hello(
    server: SocketAddr,
    code: &str,
    name: &str,
    candidates: Vec<SocketAddr>,
) -> (Client, SocketAddr) {
    let stream = TcpStream::connect(server).await.expect("connect");
    let local = stream.local_addr().expect("local");
    let mut c = Framed::new(stream, FrameCodec::new());
    send_hello(&mut c, code, name, candidates, None).await;
    match next(&mut c).await {
        ServerToPeer::Welcome { observed, mapping } => {
            assert_eq!(observed, local);
            assert_eq!(mapping, Mapping::Unknown);
        }
        other => panic!("expected welcome, got {other:?}"),
    }
    (c, local)
}

/// Answers pings until the go; returns it and how many pings were answered.
async fn go(c: &mut Client) -> (Go, u32) {
    let mut pings = 0;
    loop {
        match next(c).await {
            ServerToPeer::Ping { seq } => {
                pings += 1;
                c.send(PeerToServer::Pong { seq }).await.expect("pong");
            }
            ServerToPeer::Go(go) => return (go, pings),
            other => panic!("expected go, got {other:?}"),
        }
    }
}

fn error_code(msg: &ServerToPeer) -> Option<ErrorCode> {
    match msg {
        ServerToPeer::Error { code, .. } => Some(ErrorCode::from_u16(*code)),
        _ => None,
    }
}

#[tokio::test]
async fn pairs_two_peers_with_each_others_details_and_opposite_roles() {
    let (server, _stop, _task) = start(Config::default()).await;
    let lan_a: SocketAddr = "10.1.2.3:4000".parse().expect("addr");
    let (mut a, addr_a) = hello(server, "7", "alice", vec![lan_a]).await;
    // Let alice wait long enough for the early pings.
    let waiting = tokio::spawn(async move {
        let (g, pings) = go(&mut a).await;
        (a, g, pings)
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (mut b, addr_b) = hello(server, "7", "bob", vec![]).await;
    let (go_b, _) = go(&mut b).await;
    let (_a, go_a, pings) = waiting.await.expect("alice task");

    assert!(
        pings >= 2,
        "the waiting peer is pinged for its RTT ({pings})"
    );
    assert_eq!(go_a.peer.observed, addr_b);
    assert_eq!(go_b.peer.observed, addr_a);
    assert_eq!(go_a.session, go_b.session);
    assert_ne!(go_a.session, [0; 16]);
    assert_eq!(go_a.role, Role::Leader);
    assert_eq!(go_b.role, Role::Follower);
    // Each gets the other's key-exchange message, untouched.
    assert_eq!(go_a.peer.pake, b"bob");
    assert_eq!(go_b.peer.pake, b"alice");

    // Each peer's sealed box reaches the other, untouched, once.
    let mut a = _a;
    a.send(PeerToServer::Sealed(b"box from alice".to_vec()))
        .await
        .expect("send");
    b.send(PeerToServer::Sealed(b"box from bob".to_vec()))
        .await
        .expect("send");
    assert_eq!(
        next_after_pings(&mut b).await,
        ServerToPeer::Sealed(b"box from alice".to_vec())
    );
    assert_eq!(
        next_after_pings(&mut a).await,
        ServerToPeer::Sealed(b"box from bob".to_vec())
    );
    // A second box is a protocol violation: the connection ends.
    a.send(PeerToServer::Sealed(vec![1; 10]))
        .await
        .expect("send");
    assert!(
        timeout(WAIT, async { while let Some(Ok(_)) = a.next().await {} })
            .await
            .is_ok()
    );
    let _ = lan_a;
}

#[tokio::test]
async fn sessions_differ_between_pairs() {
    let (server, _stop, _task) = start(Config::default()).await;
    let mut sessions = Vec::new();
    for code in ["1", "2"] {
        let (mut a, _) = hello(server, code, "a", vec![]).await;
        let (mut b, _) = hello(server, code, "b", vec![]).await;
        let (ga, _) = go(&mut a).await;
        let (gb, _) = go(&mut b).await;
        assert_eq!(ga.session, gb.session);
        sessions.push(ga.session);
    }
    assert_ne!(sessions[0], sessions[1]);
}

#[tokio::test]
async fn a_third_peer_is_told_the_code_is_in_use() {
    let (server, _stop, _task) = start(Config::default()).await;
    let (mut a, _) = hello(server, "3", "a", vec![]).await;
    let (mut b, _) = hello(server, "3", "b", vec![]).await;
    go(&mut a).await;
    go(&mut b).await;
    let stream = TcpStream::connect(server).await.expect("connect");
    let mut c: Client = Framed::new(stream, FrameCodec::new());
    send_hello(&mut c, "3", "c", vec![], None).await;
    let reply = next(&mut c).await;
    assert_eq!(error_code(&reply), Some(ErrorCode::CodeInUse), "{reply:?}");
    assert_closed(&mut c).await;
}

#[tokio::test]
async fn a_lonely_peer_is_told_its_wait_expired() {
    let config = Config {
        wait_ttl: Duration::from_secs(1),
        ..Config::default()
    };
    let (server, _stop, _task) = start(config).await;
    let (mut a, _) = hello(server, "4", "a", vec![]).await;
    let reply = next_after_pings(&mut a).await;
    assert_eq!(error_code(&reply), Some(ErrorCode::Expired), "{reply:?}");
    // The code is free again.
    let (_b, _) = hello(server, "4", "b", vec![]).await;
}

#[tokio::test]
async fn a_silent_connection_is_dropped_after_the_hello_timeout() {
    let config = Config {
        hello_timeout: Duration::from_millis(300),
        ..Config::default()
    };
    let (server, _stop, _task) = start(config).await;
    let stream = TcpStream::connect(server).await.expect("connect");
    let mut c: Client = Framed::new(stream, FrameCodec::new());
    let reply = next(&mut c).await;
    assert_eq!(error_code(&reply), Some(ErrorCode::Malformed), "{reply:?}");
    assert_closed(&mut c).await;
}

#[tokio::test]
async fn invalid_hello_fields_are_rejected() {
    let (server, _stop, _task) = start(Config::default()).await;
    for (code, pake_len) in [("bad nameplate!", 1), ("", 1), ("11", 1000)] {
        let stream = TcpStream::connect(server).await.expect("connect");
        let mut c: Client = Framed::new(stream, FrameCodec::new());
        c.send(PeerToServer::Hello(Hello {
            version: PROTOCOL_VERSION,
            nameplate: code.into(),
            probe_observed: None,
            pake: vec![7; pake_len],
            resume: None,
        }))
        .await
        .expect("send hello");
        let reply = next(&mut c).await;
        assert_eq!(error_code(&reply), Some(ErrorCode::Malformed), "{reply:?}");
    }
}

#[tokio::test]
async fn shutdown_tells_waiting_peers() {
    let (server, stop, task) = start(Config::default()).await;
    let (mut a, _) = hello(server, "5", "a", vec![]).await;
    let _ = stop.send(());
    let reply = next_after_pings(&mut a).await;
    assert_eq!(
        error_code(&reply),
        Some(ErrorCode::ShuttingDown),
        "{reply:?}"
    );
    timeout(WAIT, task)
        .await
        .expect("server stops in time")
        .expect("clean stop");
}

/// A socket bound to `port` (0: any) with address and port reuse, as peers bind.
fn reusable(port: u16) -> tokio::net::TcpSocket {
    let s = tokio::net::TcpSocket::new_v4().expect("socket");
    s.set_reuseaddr(true).expect("reuseaddr");
    s.set_reuseport(true).expect("reuseport");
    s.bind(SocketAddr::from(([127, 0, 0, 1], port)))
        .expect("bind");
    s
}

#[tokio::test]
async fn the_probe_port_reflects_the_address_and_the_mapping_is_classified() {
    let (server, _stop, _task) = start(Config::default()).await;
    let probe_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind probe");
    let probe_addr = probe_listener.local_addr().expect("addr");
    tokio::spawn(run_probe(
        probe_listener,
        Default::default(),
        std::future::pending(),
    ));

    // Same local port to both server ports, as a peer does.
    let main = reusable(0);
    let port = main.local_addr().expect("addr").port();
    let main = main.connect(server).await.expect("connect main");
    let probe = reusable(port)
        .connect(probe_addr)
        .await
        .expect("connect probe");
    let mut probe: Client = Framed::new(probe, FrameCodec::new());
    let seen = match next(&mut probe).await {
        ServerToPeer::Observed { observed } => observed,
        other => panic!("expected the observed address, got {other:?}"),
    };
    assert_eq!(seen, SocketAddr::from(([127, 0, 0, 1], port)));
    assert_closed(&mut probe).await;

    let welcome = |probe_observed| async move {
        let mut c: Client = Framed::new(main, FrameCodec::new());
        send_hello(&mut c, "6", "a", vec![], probe_observed).await;
        next(&mut c).await
    };
    match welcome(Some(seen)).await {
        ServerToPeer::Welcome { mapping, .. } => assert_eq!(mapping, Mapping::Independent),
        other => panic!("expected welcome, got {other:?}"),
    }

    // A probe that saw another port: the NAT maps per destination, and the other
    // peer is told so in its go.
    let stream = TcpStream::connect(server).await.expect("connect");
    let local = stream.local_addr().expect("local");
    let mut c: Client = Framed::new(stream, FrameCodec::new());
    let elsewhere = SocketAddr::new(local.ip(), local.port().wrapping_add(7));
    send_hello(&mut c, "8", "sym", vec![], Some(elsewhere)).await;
    let expected = Mapping::DependsOnDestination {
        first: local.port(),
        second: elsewhere.port(),
    };
    match next(&mut c).await {
        ServerToPeer::Welcome { mapping, .. } => assert_eq!(mapping, expected),
        other => panic!("expected welcome, got {other:?}"),
    }
    let (mut other, _) = hello(server, "8", "b", vec![]).await;
    let (go_other, _) = go(&mut other).await;
    assert_eq!(go_other.peer.mapping, expected);
}

#[tokio::test]
async fn new_codes_get_random_free_nameplates() {
    let (server, _stop, _task) = start(Config::default()).await;
    async fn allocate(server: SocketAddr) -> (Client, String) {
        let stream = TcpStream::connect(server).await.expect("connect");
        let mut c: Client = Framed::new(stream, FrameCodec::new());
        c.send(PeerToServer::Allocate).await.expect("send");
        match next(&mut c).await {
            ServerToPeer::Allocated { nameplate } => (c, nameplate),
            other => panic!("expected a nameplate, got {other:?}"),
        }
    }
    // Each allocated nameplate is taken by a waiting peer before the next one.
    let mut held = Vec::new();
    let mut numbers = Vec::new();
    for name in ["a", "b", "c", "d", "e", "f", "g", "h"] {
        let (mut c, nameplate) = allocate(server).await;
        let n: u32 = nameplate.parse().expect("a number");
        // Three digits under light use.
        assert!((1..1000).contains(&n), "{nameplate}");
        assert!(
            !numbers.contains(&n),
            "{nameplate} is taken by a waiting peer"
        );
        send_hello(&mut c, &nameplate, name, vec![], None).await;
        assert!(matches!(next(&mut c).await, ServerToPeer::Welcome { .. }));
        numbers.push(n);
        held.push(c);
    }
    // Not the lowest free numbers, which a stranger would try first (eight
    // random draws out of 999 are 1 to 8 once in about 10^21).
    numbers.sort_unstable();
    assert_ne!(numbers, (1..=8).collect::<Vec<_>>());
}

/// One HTTP request to the metrics endpoint; the whole answer.
async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.expect("connect metrics");
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    s.write_all(request.as_bytes()).await.expect("request");
    let mut answer = String::new();
    timeout(WAIT, s.read_to_string(&mut answer))
        .await
        .expect("answer in time")
        .expect("read answer");
    answer
}

/// The value of one sample line (`name{labels} value`) of an exposition.
fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn the_metrics_endpoint_counts_pairs_punches_and_rejects() {
    let metrics = std::sync::Arc::new(punchline_rendezvous::Metrics::default());
    let config = Config {
        metrics: metrics.clone(),
        ..Config::default()
    };
    let (server, _stop, _task) = start(config).await;
    let metrics_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let metrics_addr = metrics_listener.local_addr().expect("addr");
    tokio::spawn(punchline_rendezvous::serve_metrics(
        metrics_listener,
        metrics.clone(),
        std::future::pending(),
    ));

    // A pair that reports a direct punch, and one that reports failure.
    for (code, outcome) in [
        (
            "21",
            punchline_proto::PunchOutcome::Direct {
                public: true,
                attempts: 1,
                elapsed_ms: 3,
            },
        ),
        ("22", punchline_proto::PunchOutcome::Failed { attempts: 9 }),
    ] {
        let (mut a, _) = hello(server, code, "a", vec![]).await;
        let (mut b, _) = hello(server, code, "b", vec![]).await;
        go(&mut a).await;
        go(&mut b).await;
        let direct = matches!(outcome, punchline_proto::PunchOutcome::Direct { .. });
        a.send(PeerToServer::Report(outcome.clone()))
            .await
            .expect("report");
        b.send(PeerToServer::Report(outcome)).await.expect("report");
        if direct {
            // After a direct punch the server closes first.
            assert_closed(&mut a).await;
            assert_closed(&mut b).await;
        } else {
            // After a failure it waits for a relay request; peers that want none
            // just leave.
            drop((a, b));
        }
    }
    // A third peer for a paired code, and a malformed hello.
    let (mut a, _) = hello(server, "23", "a", vec![]).await;
    let (mut b, _) = hello(server, "23", "b", vec![]).await;
    let stream = TcpStream::connect(server).await.expect("connect");
    let mut c: Client = Framed::new(stream, FrameCodec::new());
    send_hello(&mut c, "23", "c", vec![], None).await;
    assert_eq!(error_code(&next(&mut c).await), Some(ErrorCode::CodeInUse));
    let stream = TcpStream::connect(server).await.expect("connect");
    let mut d: Client = Framed::new(stream, FrameCodec::new());
    send_hello(&mut d, "not-digits", "d", vec![], None).await;
    assert_eq!(error_code(&next(&mut d).await), Some(ErrorCode::Malformed));
    go(&mut a).await;
    go(&mut b).await;

    let answer = http_get(metrics_addr, "/metrics").await;
    let (head, body) = answer.split_once("\r\n\r\n").expect("http answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("application/openmetrics-text"), "{head}");
    assert!(body.ends_with("# EOF\n"), "{body}");
    let value =
        |series: &str| sample(body, series).unwrap_or_else(|| panic!("{series} in\n{body}"));
    assert_eq!(value("punchline_connections_total"), 8.0);
    assert_eq!(value("punchline_pairs_total"), 3.0);
    assert_eq!(value("punchline_punches_total{outcome=\"direct\"}"), 2.0);
    assert_eq!(value("punchline_punches_total{outcome=\"failed\"}"), 2.0);
    assert_eq!(
        value("punchline_rejects_total{reason=\"code_in_use\"}"),
        1.0
    );
    assert_eq!(value("punchline_rejects_total{reason=\"malformed\"}"), 1.0);
    assert_eq!(
        value("punchline_rejects_total{reason=\"address_rate\"}"),
        0.0
    );
    // Pair 23 is still connected; c and d are gone once their tasks end.
    assert_closed(&mut c).await;
    assert_closed(&mut d).await;
    let mut open = value("punchline_connections_open");
    for _ in 0..50 {
        if open == 2.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let again = http_get(metrics_addr, "/metrics").await;
        open = sample(&again, "punchline_connections_open").expect("open gauge");
    }
    assert_eq!(open, 2.0);
    assert!(value("punchline_resident_memory_bytes") > 0.0);
    let snapshot = metrics.snapshot();
    assert_eq!((snapshot.pairs, snapshot.rejects), (3, 2));

    let other = http_get(metrics_addr, "/").await;
    assert!(other.starts_with("HTTP/1.1 404"), "{other}");
}

#[tokio::test]
async fn a_waiting_peer_that_stops_answering_pings_is_dropped_and_its_code_freed() {
    let config = Config {
        idle_timeout: Duration::from_secs(1),
        ..Config::default()
    };
    let (server, _stop, _task) = start(config).await;
    let (mut silent, _) = hello(server, "31", "a", vec![]).await;
    // Read what the server sends, answer nothing.
    let ended = timeout(WAIT, async {
        loop {
            match silent.next().await {
                Some(Ok(ServerToPeer::Ping { .. })) => {}
                Some(Ok(other)) => return Some(other),
                _ => return None,
            }
        }
    })
    .await
    .expect("dropped in time");
    let reply = ended.expect("an error before the close");
    assert!(
        matches!(&reply, ServerToPeer::Error { message, .. } if message.contains("no answer to pings")),
        "{reply:?}"
    );
    assert_closed(&mut silent).await;
    // The code is free again, and a peer that answers pings stays.
    let (mut a, _) = hello(server, "31", "b", vec![]).await;
    let stays = timeout(Duration::from_millis(2500), next_after_pings(&mut a)).await;
    assert!(
        stays.is_err(),
        "a peer answering pings was dropped: {stays:?}"
    );
}

/// Sends `msg` and reads the answer.
async fn ask(c: &mut Client, msg: PeerToServer) -> ServerToPeer {
    c.send(msg).await.expect("send");
    next(c).await
}

#[tokio::test]
async fn reflect_and_dial_back_answer_the_doctor_then_a_hello_still_works() {
    use punchline_proto::DialBackResult;
    let (server, _stop, _task) = start(Config::default()).await;

    // Nothing listens on the client's port: the dial-back is reset.
    let stream = TcpStream::connect(server).await.expect("connect");
    let local = stream.local_addr().expect("local");
    let mut c: Client = Framed::new(stream, FrameCodec::new());
    assert_eq!(
        ask(&mut c, PeerToServer::Reflect).await,
        ServerToPeer::Observed { observed: local }
    );
    match ask(&mut c, PeerToServer::DialBack).await {
        ServerToPeer::DialedBack { target, result, .. } => {
            assert_eq!(target, local);
            assert_eq!(result, DialBackResult::Refused);
        }
        other => panic!("expected a dial-back result, got {other:?}"),
    }
    // The hello still works after the doctor's questions.
    send_hello(&mut c, "41", "doc", vec![], None).await;
    assert!(
        matches!(next(&mut c).await, ServerToPeer::Welcome { observed, .. } if observed == local)
    );
    drop(c);

    // A listener on the client's own port (a port forward, say) accepts it.
    let listener = reusable(0);
    let port = listener.local_addr().expect("addr").port();
    let listener = listener.listen(8).expect("listen");
    let stream = reusable(port).connect(server).await.expect("connect");
    let mut c: Client = Framed::new(stream, FrameCodec::new());
    match ask(&mut c, PeerToServer::DialBack).await {
        ServerToPeer::DialedBack { result, .. } => assert_eq!(result, DialBackResult::Connected),
        other => panic!("expected a dial-back result, got {other:?}"),
    }
    let (_, from) = timeout(WAIT, listener.accept())
        .await
        .expect("accepted")
        .expect("accept");
    assert_eq!(from.ip(), server.ip());
    // Once per connection.
    let again = ask(&mut c, PeerToServer::DialBack).await;
    assert_eq!(error_code(&again), Some(ErrorCode::Malformed), "{again:?}");
    assert_closed(&mut c).await;
}

/// Pairs two clients and has both ask for the relay after a failed punch.
async fn relayed_pair(
    server: SocketAddr,
    code: &str,
) -> (Client, Client, ServerToPeer, ServerToPeer) {
    let (mut a, _) = hello(server, code, "a", vec![]).await;
    let (mut b, _) = hello(server, code, "b", vec![]).await;
    go(&mut a).await;
    go(&mut b).await;
    let failed = PeerToServer::Report(punchline_proto::PunchOutcome::Failed { attempts: 3 });
    for c in [&mut a, &mut b] {
        c.send(failed.clone()).await.expect("report");
    }
    let ra = ask(&mut a, PeerToServer::Relay).await;
    let rb = ask(&mut b, PeerToServer::Relay).await;
    (a, b, ra, rb)
}

#[tokio::test]
async fn a_failed_pair_is_relayed_both_ways_within_its_allowance() {
    let config = Config {
        relay_bytes: 1000,
        ..Config::default()
    };
    let (server, _stop, _task) = start(config).await;
    let (mut a, mut b, ra, rb) = relayed_pair(server, "51").await;
    assert_eq!((ra, rb), (ServerToPeer::Relaying, ServerToPeer::Relaying));
    a.send(PeerToServer::Relayed(b"to b".to_vec()))
        .await
        .expect("send");
    assert_eq!(next(&mut b).await, ServerToPeer::Relayed(b"to b".to_vec()));
    b.send(PeerToServer::Relayed(b"to a".to_vec()))
        .await
        .expect("send");
    assert_eq!(next(&mut a).await, ServerToPeer::Relayed(b"to a".to_vec()));
    // Past the pair's allowance (1000 bytes, both ways together) the relay ends.
    a.send(PeerToServer::Relayed(vec![0; 995]))
        .await
        .expect("send");
    let refusal = next(&mut a).await;
    assert_eq!(
        error_code(&refusal),
        Some(ErrorCode::RelayUnavailable),
        "{refusal:?}"
    );
    assert_closed(&mut a).await;
    // The other side's relay closes with it.
    assert_closed(&mut b).await;
}

#[tokio::test]
async fn a_server_that_does_not_relay_says_so() {
    let config = Config {
        relay: false,
        ..Config::default()
    };
    let (server, _stop, _task) = start(config).await;
    let (_a, _b, ra, rb) = relayed_pair(server, "52").await;
    for reply in [ra, rb] {
        assert_eq!(
            error_code(&reply),
            Some(ErrorCode::RelayUnavailable),
            "{reply:?}"
        );
        assert!(
            matches!(&reply, ServerToPeer::Error { message, .. } if message.contains("does not relay")),
            "{reply:?}"
        );
    }
}

#[tokio::test]
async fn a_relay_faster_than_its_pace_is_slowed_not_cut_off() {
    let config = Config {
        relay_rate: 2000,
        ..Config::default()
    };
    let (server, _stop, _task) = start(config).await;
    let (mut a, mut b, ra, rb) = relayed_pair(server, "53").await;
    assert_eq!((ra, rb), (ServerToPeer::Relaying, ServerToPeer::Relaying));
    // 12,000 bytes against a burst of 8,000 and 2,000 a second: all of it arrives.
    for _ in 0..12 {
        a.send(PeerToServer::Relayed(vec![7; 1000]))
            .await
            .expect("send");
    }
    let mut got = 0;
    while got < 12_000 {
        match next(&mut b).await {
            ServerToPeer::Relayed(piece) => got += piece.len(),
            other => panic!("expected relayed bytes, got {other:?}"),
        }
    }
    assert_eq!(got, 12_000);
}

/// Both peers send more than the pair's pace lets through at once, at the same
/// time, while reading: neither direction may stall the other, and every byte
/// arrives.
#[tokio::test]
async fn a_relay_carries_both_directions_at_once_beyond_its_pace() {
    let config = Config {
        relay_rate: 4000,
        ..Config::default()
    };
    let (server, _stop, _task) = start(config).await;
    let (a, b, ra, rb) = relayed_pair(server, "54").await;
    assert_eq!((ra, rb), (ServerToPeer::Relaying, ServerToPeer::Relaying));
    const PIECES: usize = 200;
    const SIZE: usize = 100;
    // 20,000 bytes each way, 40,000 in all, against a burst of 16,000.
    let run = |c: Client| {
        tokio::spawn(async move {
            let (mut sink, mut stream) = c.split();
            let writer = async {
                for _ in 0..PIECES {
                    sink.send(PeerToServer::Relayed(vec![1; SIZE]))
                        .await
                        .expect("send");
                }
                sink
            };
            let reader = async {
                let mut got = 0;
                while got < PIECES * SIZE {
                    match timeout(Duration::from_secs(30), stream.next()).await {
                        Ok(Some(Ok(ServerToPeer::Relayed(piece)))) => got += piece.len(),
                        other => panic!("after {got} bytes: {other:?}"),
                    }
                }
                got
            };
            let (_sink, got) = tokio::join!(writer, reader);
            got
        })
    };
    let (got_a, got_b) = tokio::join!(run(a), run(b));
    assert_eq!(got_a.expect("a"), PIECES * SIZE);
    assert_eq!(got_b.expect("b"), PIECES * SIZE);
}
