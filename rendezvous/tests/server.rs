//! The rendezvous over real loopback sockets, driven by protocol-level clients.

use std::net::SocketAddr;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use punchline_proto::{ErrorCode, Hello, Mapping, PeerToServer, Role, ServerToPeer};
use punchline_rendezvous::Config;
use punchline_testkit::{error_code, hello, http_get, sample, Client, TestRendezvous, WAIT};
use tokio::net::TcpListener;
use tokio::time::timeout;

/// Connects, says hello with `name` as its key-exchange message (opaque to the
/// server), checks the welcome; returns the client and its observed address.
async fn join(server: SocketAddr, code: &str, name: &str) -> (Client, SocketAddr) {
    let mut c = Client::connect(server).await;
    let local = c.local_addr();
    c.send_hello(code, name.as_bytes()).await;
    let (observed, mapping) = c.welcome().await;
    assert_eq!(observed, local);
    assert_eq!(mapping, Mapping::Unknown);
    (c, local)
}

#[tokio::test]
async fn pairs_two_peers_with_each_others_details_and_opposite_roles() {
    let rv = TestRendezvous::start();
    let server = rv.addr();
    let (mut a, addr_a) = join(server, "7", "alice").await;
    // Let alice wait long enough for the early pings.
    let waiting = tokio::spawn(async move {
        let (g, pings) = a.go().await;
        (a, g, pings)
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (mut b, addr_b) = join(server, "7", "bob").await;
    let (go_b, _) = b.go().await;
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
        .await;
    b.send(PeerToServer::Sealed(b"box from bob".to_vec())).await;
    assert_eq!(
        b.recv_after_pings().await,
        ServerToPeer::Sealed(b"box from alice".to_vec())
    );
    assert_eq!(
        a.recv_after_pings().await,
        ServerToPeer::Sealed(b"box from bob".to_vec())
    );
    // A second box is a protocol violation: the connection ends.
    a.send(PeerToServer::Sealed(vec![1; 10])).await;
    assert!(
        timeout(WAIT, async { while let Some(Ok(_)) = a.next().await {} })
            .await
            .is_ok()
    );
}

/// The alternate port serves the same rooms as the main one: a peer that
/// came in there meets one waiting on the main port.
#[tokio::test]
async fn the_alternate_port_serves_the_same_rooms() {
    let rv = TestRendezvous::start();
    assert_eq!(
        rv.alternate_addr().port(),
        rv.addr().port() + punchline_rendezvous::ALTERNATE_PORT_OFFSET
    );
    let (mut a, addr_a) = join(rv.addr(), "8", "alice").await;
    let waiting = tokio::spawn(async move { a.go().await });
    let (mut b, addr_b) = join(rv.alternate_addr(), "8", "bob").await;
    let (go_b, _) = b.go().await;
    let (go_a, _) = waiting.await.expect("alice task");
    assert_eq!(go_a.peer.observed, addr_b);
    assert_eq!(go_b.peer.observed, addr_a);
    assert_eq!(go_a.session, go_b.session);
}

#[tokio::test]
async fn sessions_differ_between_pairs() {
    let rv = TestRendezvous::start();
    let server = rv.addr();
    let mut sessions = Vec::new();
    for code in ["1", "2"] {
        let (mut a, _) = join(server, code, "a").await;
        let (mut b, _) = join(server, code, "b").await;
        let (ga, _) = a.go().await;
        let (gb, _) = b.go().await;
        assert_eq!(ga.session, gb.session);
        sessions.push(ga.session);
    }
    assert_ne!(sessions[0], sessions[1]);
}

#[tokio::test]
async fn a_third_peer_is_told_the_code_is_in_use() {
    let rv = TestRendezvous::start();
    let server = rv.addr();
    let (mut a, _) = join(server, "3", "a").await;
    let (mut b, _) = join(server, "3", "b").await;
    a.go().await;
    b.go().await;
    let mut c = Client::connect(server).await;
    c.send_hello("3", b"c").await;
    let reply = c.recv().await;
    assert_eq!(error_code(&reply), Some(ErrorCode::CodeInUse), "{reply:?}");
    c.assert_closed().await;
}

#[tokio::test]
async fn a_lonely_peer_is_told_its_wait_expired() {
    let config = Config {
        wait_ttl: Duration::from_secs(1),
        ..Config::default()
    };
    let rv = TestRendezvous::with_config(config);
    let server = rv.addr();
    let (mut a, _) = join(server, "4", "a").await;
    let reply = a.recv_after_pings().await;
    assert_eq!(error_code(&reply), Some(ErrorCode::Expired), "{reply:?}");
    // The code is free again.
    let (_b, _) = join(server, "4", "b").await;
}

#[tokio::test]
async fn a_silent_connection_is_dropped_after_the_hello_timeout() {
    let config = Config {
        hello_timeout: Duration::from_millis(300),
        ..Config::default()
    };
    let rv = TestRendezvous::with_config(config);
    let server = rv.addr();
    let mut c = Client::connect(server).await;
    let reply = c.recv().await;
    assert_eq!(error_code(&reply), Some(ErrorCode::Malformed), "{reply:?}");
    c.assert_closed().await;
}

#[tokio::test]
async fn invalid_hello_fields_are_rejected() {
    let rv = TestRendezvous::start();
    let server = rv.addr();
    for (code, pake_len) in [("bad nameplate!", 1), ("", 1), ("11", 1000)] {
        let mut c = Client::connect(server).await;
        c.send_hello(code, &vec![7; pake_len]).await;
        let reply = c.recv().await;
        assert_eq!(error_code(&reply), Some(ErrorCode::Malformed), "{reply:?}");
    }
}

#[tokio::test]
async fn shutdown_tells_waiting_peers() {
    let rv = TestRendezvous::start();
    let (mut a, _) = join(rv.addr(), "5", "a").await;
    let stopped = tokio::task::spawn_blocking(move || rv.stop());
    let reply = a.recv_after_pings().await;
    assert_eq!(
        error_code(&reply),
        Some(ErrorCode::ShuttingDown),
        "{reply:?}"
    );
    timeout(WAIT, stopped)
        .await
        .expect("server stops in time")
        .expect("stop awaited")
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
    let rv = TestRendezvous::start();
    let server = rv.addr();

    // Same local port to both server ports, as a peer does.
    let main = reusable(0);
    let port = main.local_addr().expect("addr").port();
    let main = main.connect(server).await.expect("connect main");
    let probe = reusable(port)
        .connect(rv.probe_addr())
        .await
        .expect("connect probe");
    let mut probe = Client::new(probe);
    let seen = match probe.recv().await {
        ServerToPeer::Observed { observed, .. } => observed,
        other => panic!("expected the observed address, got {other:?}"),
    };
    assert_eq!(seen, SocketAddr::from(([127, 0, 0, 1], port)));
    probe.assert_closed().await;

    let welcome = |probe_observed| async move {
        let mut c = Client::new(main);
        c.send(PeerToServer::Hello(Hello {
            probe_observed,
            ..hello("6", b"a")
        }))
        .await;
        c.recv().await
    };
    match welcome(Some(seen)).await {
        ServerToPeer::Welcome { mapping, .. } => assert_eq!(mapping, Mapping::Independent),
        other => panic!("expected welcome, got {other:?}"),
    }

    // A probe that saw another port: the NAT maps per destination, and the other
    // peer is told so in its go.
    let mut c = Client::connect(server).await;
    let local = c.local_addr();
    let elsewhere = SocketAddr::new(local.ip(), local.port().wrapping_add(7));
    c.send(PeerToServer::Hello(Hello {
        probe_observed: Some(elsewhere),
        ..hello("8", b"sym")
    }))
    .await;
    let expected = Mapping::DependsOnDestination {
        first: local.port(),
        second: elsewhere.port(),
    };
    match c.recv().await {
        ServerToPeer::Welcome { mapping, .. } => assert_eq!(mapping, expected),
        other => panic!("expected welcome, got {other:?}"),
    }
    let (mut other, _) = join(server, "8", "b").await;
    let (go_other, _) = other.go().await;
    assert_eq!(go_other.peer.mapping, expected);
}

/// A peer that also reaches the rendezvous over the other address family
/// names that probe by a token of its own: the other peer's go carries the
/// address the probe port saw there. A token whose probe came over the same
/// family as the hello gives nothing.
#[tokio::test]
async fn the_other_familys_address_goes_with_the_go() {
    let main = TcpListener::bind("127.0.0.1:0").await.expect("bind main");
    let server = main.local_addr().expect("addr");
    // The probe port on both families (IPv6 loopback must exist here).
    let probe = punchline_rendezvous::bind_default(0).expect("bind the probe port");
    probe.set_nonblocking(true).expect("non-blocking");
    let probe = TcpListener::from_std(probe).expect("probe listener");
    let probe_port = probe.local_addr().expect("addr").port();
    let config = Config::default();
    tokio::spawn(punchline_rendezvous::run_probe(
        probe,
        config.metrics.clone(),
        config.probes.clone(),
        std::future::pending(),
    ));
    tokio::spawn(punchline_rendezvous::run(
        main,
        config,
        std::future::pending(),
    ));

    // Probes over IPv6 and over IPv4, each under its token.
    let sighting = |to: SocketAddr, token| async move {
        let mut probe = Client::connect(to).await;
        let from = probe.local_addr();
        probe.send(PeerToServer::Probe { token }).await;
        assert!(matches!(probe.recv().await, ServerToPeer::Observed { .. }));
        from
    };
    let v6 = sighting(
        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, probe_port)),
        [6; 16],
    )
    .await;
    let v4 = sighting(SocketAddr::from(([127, 0, 0, 1], probe_port)), [4; 16]).await;
    assert!(v4.is_ipv4() && v6.is_ipv6());

    for (nameplate, token, expected) in [("61", [6; 16], Some(v6)), ("62", [4; 16], None)] {
        let mut a = Client::connect(server).await;
        a.send(PeerToServer::Hello(Hello {
            other_family_token: Some(token),
            ..hello(nameplate, b"a")
        }))
        .await;
        a.welcome().await;
        let waiting = tokio::spawn(async move { a.go().await });
        let (mut b, _) = join(server, nameplate, "b").await;
        let (go_b, _) = b.go().await;
        let (go_a, _) = waiting.await.expect("a's task");
        assert_eq!(go_b.peer.other_family, expected, "nameplate {nameplate}");
        assert_eq!(go_a.peer.other_family, None, "b has no other family");
    }
}

/// A peer that probes beside its hello names the probe by a token: the
/// server finds what its probe port saw by itself, whichever connection comes
/// first, and classifies the mapping as when the peer reported it.
#[tokio::test]
async fn a_probe_named_by_its_token_classifies_the_mapping() {
    let rv = TestRendezvous::start();
    let server = rv.addr();
    let hello_with = |token| Hello {
        probe_token: Some(token),
        ..hello("4", b"t")
    };

    // Same local port to both server ports; the hello goes first.
    let main = reusable(0);
    let port = main.local_addr().expect("addr").port();
    let mut main = Client::new(main.connect(server).await.expect("connect main"));
    main.send(PeerToServer::Hello(hello_with([1; 16]))).await;
    let mut probe = Client::new(
        reusable(port)
            .connect(rv.probe_addr())
            .await
            .expect("connect probe"),
    );
    probe.send(PeerToServer::Probe { token: [1; 16] }).await;
    assert!(matches!(probe.recv().await, ServerToPeer::Observed { .. }));
    let (_, mapping) = main.welcome().await;
    assert_eq!(mapping, Mapping::Independent);

    // The probe from another port (as through a NAT that maps each
    // destination apart), and first this time.
    let mut probe = Client::connect(rv.probe_addr()).await;
    let elsewhere = probe.local_addr();
    probe.send(PeerToServer::Probe { token: [2; 16] }).await;
    assert!(matches!(probe.recv().await, ServerToPeer::Observed { .. }));
    let mut main = Client::connect(server).await;
    let here = main.local_addr();
    main.send(PeerToServer::Hello(Hello {
        nameplate: "5".into(),
        ..hello_with([2; 16])
    }))
    .await;
    let (_, mapping) = main.welcome().await;
    assert_eq!(
        mapping,
        Mapping::DependsOnDestination {
            first: here.port(),
            second: elsewhere.port()
        }
    );

    // A token no probe connection sent (the probe port unreachable, say): the
    // mapping is unknown, after a short wait, and a token is good once only.
    for (nameplate, token) in [("6", [3; 16]), ("7", [2; 16])] {
        let mut main = Client::connect(server).await;
        main.send(PeerToServer::Hello(Hello {
            nameplate: nameplate.into(),
            ..hello_with(token)
        }))
        .await;
        let (_, mapping) = main.welcome().await;
        assert_eq!(mapping, Mapping::Unknown);
    }
}

/// One host (or network) flooding the probe port with made-up tokens, more
/// than the server keeps, crowds out only its own: a peer elsewhere that
/// probes beside its hello still gets its mapping.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_probe_token_flood_from_one_network_leaves_other_peers_classified() {
    let rv = TestRendezvous::start();
    let (server, probe_addr) = (rv.addr(), rv.probe_addr());
    let flooded = futures::stream::iter(0u32..16_400)
        .map(|i| async move {
            let mut token = [0xee; 16];
            token[..4].copy_from_slice(&i.to_be_bytes());
            let source = std::net::IpAddr::from([127, 0, 9, 1 + (i % 200) as u8]);
            let Ok(stream) = punchline_testkit::connect_from(source, probe_addr).await else {
                return 0;
            };
            let mut probe = Client::new(stream);
            if probe.try_send(PeerToServer::Probe { token }).await.is_err() {
                return 0;
            }
            u32::from(matches!(
                probe.next_message().await,
                Ok(ServerToPeer::Observed { .. })
            ))
        })
        .buffer_unordered(200)
        .fold(0, |total, one| async move { total + one })
        .await;
    assert!(flooded > 16_000, "{flooded} probe connections answered");

    let main = reusable(0);
    let port = main.local_addr().expect("addr").port();
    let mut main = Client::new(main.connect(server).await.expect("connect main"));
    let mut probe = Client::new(
        reusable(port)
            .connect(probe_addr)
            .await
            .expect("connect probe"),
    );
    probe.send(PeerToServer::Probe { token: [0xa2; 16] }).await;
    main.send(PeerToServer::Hello(Hello {
        probe_token: Some([0xa2; 16]),
        ..hello("12", b"x")
    }))
    .await;
    let (_, mapping) = main.welcome().await;
    assert_eq!(mapping, Mapping::Independent);
}

/// A server without a probe port (`--no-probe`) does not wait for a token no
/// probe connection can bring: the hello is welcomed at once, the mapping
/// unknown.
#[tokio::test]
async fn without_a_probe_port_a_probe_token_is_not_waited_for() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let server = listener.local_addr().expect("addr");
    let served = tokio::spawn(punchline_rendezvous::run(
        listener,
        punchline_rendezvous::Config::default(),
        std::future::pending(),
    ));
    let mut main = Client::connect(server).await;
    let started = std::time::Instant::now();
    main.send(PeerToServer::Hello(Hello {
        probe_token: Some([9; 16]),
        ..hello("3", b"n")
    }))
    .await;
    let (_, mapping) = main.welcome().await;
    assert_eq!(mapping, Mapping::Unknown);
    assert!(
        started.elapsed() < punchline_rendezvous::server::PROBE_WAIT,
        "{:?}",
        started.elapsed()
    );
    served.abort();
}

#[tokio::test]
async fn new_codes_get_random_free_nameplates() {
    let rv = TestRendezvous::start();
    let server = rv.addr();
    // Each allocated nameplate is taken by a waiting peer before the next one.
    let mut held = Vec::new();
    let mut numbers = Vec::new();
    for name in ["a", "b", "c", "d", "e", "f", "g", "h"] {
        let mut c = Client::connect(server).await;
        let nameplate = c.allocate().await;
        let n: u32 = nameplate.parse().expect("a number");
        // Three digits under light use.
        assert!((1..1000).contains(&n), "{nameplate}");
        assert!(
            !numbers.contains(&n),
            "{nameplate} is taken by a waiting peer"
        );
        c.send_hello(&nameplate, name.as_bytes()).await;
        assert!(matches!(c.recv().await, ServerToPeer::Welcome { .. }));
        numbers.push(n);
        held.push(c);
    }
    // Not the lowest free numbers, which a stranger would try first (eight
    // random draws out of 999 are 1 to 8 once in about 10^21).
    numbers.sort_unstable();
    assert_ne!(numbers, (1..=8).collect::<Vec<_>>());
}

#[tokio::test]
async fn the_metrics_endpoint_counts_pairs_punches_and_rejects() {
    let metrics = std::sync::Arc::new(punchline_rendezvous::Metrics::default());
    let config = Config {
        metrics: metrics.clone(),
        ..Config::default()
    };
    let rv = TestRendezvous::with_config(config);
    let server = rv.addr();
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
        let (mut a, _) = join(server, code, "a").await;
        let (mut b, _) = join(server, code, "b").await;
        a.go().await;
        b.go().await;
        let direct = matches!(outcome, punchline_proto::PunchOutcome::Direct { .. });
        a.send(PeerToServer::Report(outcome.clone())).await;
        b.send(PeerToServer::Report(outcome)).await;
        if direct {
            // After a direct punch the server closes first.
            a.assert_closed().await;
            b.assert_closed().await;
        } else {
            // After a failure it waits for a relay request; peers that want none
            // just leave.
            drop((a, b));
        }
    }
    // A third peer for a paired code, and a malformed hello.
    let (mut a, _) = join(server, "23", "a").await;
    let (mut b, _) = join(server, "23", "b").await;
    let mut c = Client::connect(server).await;
    c.send_hello("23", b"c").await;
    assert_eq!(error_code(&c.recv().await), Some(ErrorCode::CodeInUse));
    let mut d = Client::connect(server).await;
    d.send_hello("not-digits", b"d").await;
    assert_eq!(error_code(&d.recv().await), Some(ErrorCode::Malformed));
    a.go().await;
    b.go().await;

    let answer = http_get(metrics_addr, "/metrics", WAIT)
        .await
        .expect("metrics answer");
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
    c.assert_closed().await;
    d.assert_closed().await;
    let mut open = value("punchline_connections_open");
    for _ in 0..50 {
        if open == 2.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let again = http_get(metrics_addr, "/metrics", WAIT)
            .await
            .expect("metrics answer");
        open = sample(&again, "punchline_connections_open").expect("open gauge");
    }
    assert_eq!(open, 2.0);
    assert!(value("punchline_resident_memory_bytes") > 0.0);
    let snapshot = metrics.snapshot();
    assert_eq!((snapshot.pairs, snapshot.rejects), (3, 2));

    let other = http_get(metrics_addr, "/", WAIT)
        .await
        .expect("metrics answer");
    assert!(other.starts_with("HTTP/1.1 404"), "{other}");
}

#[tokio::test]
async fn a_waiting_peer_that_stops_answering_pings_is_dropped_and_its_code_freed() {
    let config = Config {
        idle_timeout: Duration::from_secs(1),
        ..Config::default()
    };
    let rv = TestRendezvous::with_config(config);
    let server = rv.addr();
    let (mut silent, _) = join(server, "31", "a").await;
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
    silent.assert_closed().await;
    // The code is free again, and a peer that answers pings stays.
    let (mut a, _) = join(server, "31", "b").await;
    let stays = timeout(Duration::from_millis(2500), a.recv_after_pings()).await;
    assert!(
        stays.is_err(),
        "a peer answering pings was dropped: {stays:?}"
    );
}

#[tokio::test]
async fn reflect_and_dial_back_answer_the_doctor_then_a_hello_still_works() {
    use punchline_proto::DialBackResult;
    let rv = TestRendezvous::start();
    let server = rv.addr();

    // Nothing listens on the client's port: the dial-back is reset.
    let mut c = Client::connect(server).await;
    let local = c.local_addr();
    assert_eq!(
        c.ask(PeerToServer::Reflect).await,
        ServerToPeer::Observed {
            observed: local,
            // The server names its alternate port, where a peer may race.
            alternate_port: Some(rv.alternate_addr().port()),
        }
    );
    match c.ask(PeerToServer::DialBack).await {
        ServerToPeer::DialedBack { target, result, .. } => {
            assert_eq!(target, local);
            assert_eq!(result, DialBackResult::Refused);
        }
        other => panic!("expected a dial-back result, got {other:?}"),
    }
    // The hello still works after the doctor's questions.
    c.send_hello("41", b"doc").await;
    assert!(matches!(c.recv().await, ServerToPeer::Welcome { observed, .. } if observed == local));
    drop(c);

    // A listener on the client's own port (a port forward, say) accepts it.
    let listener = reusable(0);
    let port = listener.local_addr().expect("addr").port();
    let listener = listener.listen(8).expect("listen");
    let mut c = Client::new(reusable(port).connect(server).await.expect("connect"));
    match c.ask(PeerToServer::DialBack).await {
        ServerToPeer::DialedBack { result, .. } => assert_eq!(result, DialBackResult::Connected),
        other => panic!("expected a dial-back result, got {other:?}"),
    }
    let (_, from) = timeout(WAIT, listener.accept())
        .await
        .expect("accepted")
        .expect("accept");
    assert_eq!(from.ip(), server.ip());
    // Once per connection.
    let again = c.ask(PeerToServer::DialBack).await;
    assert_eq!(error_code(&again), Some(ErrorCode::Malformed), "{again:?}");
    c.assert_closed().await;
}

/// Pairs two clients and has both ask for the relay after a failed punch.
async fn relayed_pair(
    server: SocketAddr,
    code: &str,
) -> (Client, Client, ServerToPeer, ServerToPeer) {
    let (mut a, _) = join(server, code, "a").await;
    let (mut b, _) = join(server, code, "b").await;
    a.go().await;
    b.go().await;
    let failed = PeerToServer::Report(punchline_proto::PunchOutcome::Failed { attempts: 3 });
    for c in [&mut a, &mut b] {
        c.send(failed.clone()).await;
    }
    let ra = a.ask(PeerToServer::Relay).await;
    let rb = b.ask(PeerToServer::Relay).await;
    (a, b, ra, rb)
}

#[tokio::test]
async fn a_failed_pair_is_relayed_both_ways_within_its_allowance() {
    let config = Config {
        relay_bytes: 1000,
        ..Config::default()
    };
    let rv = TestRendezvous::with_config(config);
    let server = rv.addr();
    let (mut a, mut b, ra, rb) = relayed_pair(server, "51").await;
    assert_eq!((ra, rb), (ServerToPeer::Relaying, ServerToPeer::Relaying));
    a.send(PeerToServer::Relayed(b"to b".to_vec())).await;
    assert_eq!(b.recv().await, ServerToPeer::Relayed(b"to b".to_vec()));
    b.send(PeerToServer::Relayed(b"to a".to_vec())).await;
    assert_eq!(a.recv().await, ServerToPeer::Relayed(b"to a".to_vec()));
    // Past the pair's allowance (1000 bytes, both ways together) the relay ends.
    a.send(PeerToServer::Relayed(vec![0; 995])).await;
    let refusal = a.recv().await;
    assert_eq!(
        error_code(&refusal),
        Some(ErrorCode::RelayUnavailable),
        "{refusal:?}"
    );
    a.assert_closed().await;
    // The other side's relay closes with it.
    b.assert_closed().await;
}

#[tokio::test]
async fn a_server_that_does_not_relay_says_so() {
    let config = Config {
        relay: false,
        ..Config::default()
    };
    let rv = TestRendezvous::with_config(config);
    let server = rv.addr();
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
    let rv = TestRendezvous::with_config(config);
    let server = rv.addr();
    let (mut a, mut b, ra, rb) = relayed_pair(server, "53").await;
    assert_eq!((ra, rb), (ServerToPeer::Relaying, ServerToPeer::Relaying));
    // 12,000 bytes against a burst of 8,000 and 2,000 a second: all of it arrives.
    for _ in 0..12 {
        a.send(PeerToServer::Relayed(vec![7; 1000])).await;
    }
    let mut got = 0;
    while got < 12_000 {
        match b.recv().await {
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
    let rv = TestRendezvous::with_config(config);
    let server = rv.addr();
    let (a, b, ra, rb) = relayed_pair(server, "54").await;
    assert_eq!((ra, rb), (ServerToPeer::Relaying, ServerToPeer::Relaying));
    const PIECES: usize = 200;
    const SIZE: usize = 100;
    // 20,000 bytes each way, 40,000 in all, against a burst of 16,000.
    let run = |c: Client| {
        tokio::spawn(async move {
            let (mut sink, mut stream) = c.into_inner().split();
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

/// A peer's forwarded port ([`Hello::mapped`]) reaches the other peer with
/// the go, canonical, only at the address the server saw the peer come from:
/// one elsewhere (a router behind a carrier's NAT, or a hostile peer naming
/// a third host for the other's SYNs) is dropped, and so is port 0.
#[tokio::test]
async fn a_forwarded_port_is_passed_on_only_at_the_observed_address() {
    let rv = TestRendezvous::start();
    let server = rv.addr();
    /// The address announced, from the one the server sees.
    type Announce = fn(SocketAddr) -> SocketAddr;
    let cases: [(&str, Announce, bool); 4] = [
        ("71", |seen| SocketAddr::new(seen.ip(), 40000), true),
        (
            "72",
            |_| SocketAddr::new(std::net::Ipv4Addr::new(127, 0, 0, 2).into(), 40000),
            false,
        ),
        ("73", |seen| SocketAddr::new(seen.ip(), 0), false),
        (
            "74",
            |seen| match seen.ip() {
                std::net::IpAddr::V4(v4) => SocketAddr::new(v4.to_ipv6_mapped().into(), 40000),
                std::net::IpAddr::V6(_) => seen,
            },
            true,
        ),
    ];
    for (nameplate, mapped, passed) in cases {
        let mut a = Client::connect(server).await;
        let seen = a.local_addr();
        let announced = mapped(seen);
        a.send(PeerToServer::Hello(Hello {
            mapped: Some(announced),
            ..hello(nameplate, b"a")
        }))
        .await;
        a.welcome().await;
        let waiting = tokio::spawn(async move { a.go().await });
        let (mut b, _) = join(server, nameplate, "b").await;
        let (go_b, _) = b.go().await;
        let (go_a, _) = waiting.await.expect("a's task");
        let expected = passed.then(|| SocketAddr::new(seen.ip(), 40000));
        assert_eq!(
            go_b.peer.mapped, expected,
            "{announced} (nameplate {nameplate})"
        );
        assert_eq!(go_a.peer.mapped, None, "b announced none");
    }
}
