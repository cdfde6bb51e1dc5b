//! The rendezvous under abuse, on loopback: per-address and per-network limits
//! refuse the abuser and only the abuser, relays are shared out and end, floods
//! of hostile clients do not stop a fresh pair from another address from
//! meeting, and idle clients do not block the metrics endpoint.
//!
//! Abusers and the honest pair use different loopback addresses (127.0.0.x), as
//! they would be different hosts on the internet; 127.0.1.x and up stand for
//! other /24 networks. IPv6 prefixes (/64, /48) need many addresses of one /64:
//! that test runs in a network namespace of its own, so it needs root and skips
//! loudly otherwise (fails instead when `PUNCHLINE_REQUIRE_LAB=1`, as in CI).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use punchline_proto::{ErrorCode, PeerToServer, PunchOutcome, ServerToPeer};
use punchline_rendezvous::metrics::Reject;
use punchline_rendezvous::{serve_metrics, Config, Metrics};
use punchline_testkit::{connect_from, http_get, refusal, Client, TestRendezvous, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{sleep, timeout};

fn from(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// Loopback address 127.0.`net`.`last`: another /24 for each `net`.
fn from_net(net: u8, last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, net, last))
}

/// A TCP connection to `server` from local address `ip`.
async fn connect(ip: IpAddr, server: SocketAddr) -> TcpStream {
    connect_from(ip, server).await.expect("connect")
}

/// Connects from `ip` and says hello for `nameplate`.
async fn hello_from(ip: IpAddr, server: SocketAddr, nameplate: &str) -> Client {
    let mut c = Client::connect_from(ip, server).await;
    c.send_hello(nameplate, b"").await;
    c
}

/// Peers from `a` and `b` meet on `nameplate`: both are welcomed, then both
/// get the go.
async fn pair_from(a: IpAddr, b: IpAddr, server: SocketAddr, nameplate: &str) -> (Client, Client) {
    let mut ca = hello_from(a, server, nameplate).await;
    ca.welcome().await;
    let mut cb = hello_from(b, server, nameplate).await;
    cb.welcome().await;
    tokio::join!(ca.go(), cb.go());
    (ca, cb)
}

/// An honest pair from `ip` meets on `nameplate`; returns how long it took.
async fn honest_pair(ip: IpAddr, server: SocketAddr, nameplate: &str) -> Duration {
    let start = Instant::now();
    pair_from(ip, ip, server, nameplate).await;
    start.elapsed()
}

#[tokio::test]
async fn the_connection_cap_per_address_refuses_only_that_address() {
    let config = Config {
        connections_per_address: 5,
        ..Config::default()
    };
    let rv = TestRendezvous::with_config(config);
    let server = rv.addr();
    let abuser = from(2);
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(connect(abuser, server).await);
    }
    let mut sixth = Client::connect_from(abuser, server).await;
    let (code, message) = refusal(&sixth.recv().await).expect("refused");
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
    let mut again = hello_from(abuser, server, "2").await;
    assert!(matches!(again.recv().await, ServerToPeer::Welcome { .. }));
}

#[tokio::test]
async fn a_burst_of_new_codes_from_one_address_is_cut_off() {
    let rv = TestRendezvous::start();
    let server = rv.addr();
    let abuser = from(4);
    let mut accepted: u32 = 0;
    let mut refused = None;
    let mut held = Vec::new();
    for n in 0..20 {
        let mut c = hello_from(abuser, server, &(100 + n).to_string()).await;
        match c.recv().await {
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
    let rv = TestRendezvous::with_config(config);
    let server = rv.addr();
    let normal = honest_pair(from(9), server, "7").await;

    // 1,000 idle connections.
    let mut idle = Vec::new();
    for _ in 0..1_000 {
        idle.push(connect(from(6), server).await);
    }
    // Random bytes, and a length prefix announcing 4 GiB.
    let mut garbage = connect(from(7), server).await;
    garbage
        .write_all(&[0x13, 0x37, 0, 0, 0, 1, 0xff, 0xee])
        .await
        .expect("write");
    let mut huge = connect(from(7), server).await;
    huge.write_all(&[0xff, 0xff, 0xff, 0xff, 0])
        .await
        .expect("write");
    // A client sending one byte a second.
    let mut slow = connect(from(7), server).await;
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
        deaf.push(hello_from(from(8), server, &(500 + n).to_string()).await);
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

/// Says hello from `ip` and returns the server's first answer (a welcome or a
/// refusal) with the connection.
async fn try_hello(ip: IpAddr, server: SocketAddr, nameplate: &str) -> (Client, ServerToPeer) {
    let mut c = hello_from(ip, server, nameplate).await;
    let first = c.recv().await;
    (c, first)
}

/// Asserts `msg` is a refusal with `code` whose message contains `text`.
fn assert_refused(msg: &ServerToPeer, code: ErrorCode, text: &str) {
    let (got, message) = refusal(msg).unwrap_or_else(|| panic!("expected a refusal: {msg:?}"));
    assert_eq!(got, code, "{message}");
    assert!(message.contains(text), "{message:?} lacks {text:?}");
}

#[tokio::test]
async fn a_network_holds_a_multiple_of_an_address_and_other_networks_are_served() {
    // 3 open connections per address, 6 per /24.
    let metrics = Arc::new(Metrics::default());
    let config = Config {
        connections_per_address: 3,
        network_multiple: 2,
        metrics: metrics.clone(),
        ..Config::default()
    };
    let rv = TestRendezvous::with_config(config);
    let server = rv.addr();
    // Six addresses of 127.0.1.0/24, one waiting peer each: each address is far
    // below its own limit, but together they fill their network's.
    let mut held = Vec::new();
    for last in 1..=6 {
        let (c, first) = try_hello(from_net(1, last), server, &format!("10{last}")).await;
        assert!(matches!(first, ServerToPeer::Welcome { .. }), "{first:?}");
        held.push(c);
    }
    let mut seventh = Client::connect_from(from_net(1, 7), server).await;
    assert_refused(
        &seventh.recv().await,
        ErrorCode::Busy,
        "too many connections from your network 127.0.1.0/24 (at most 6)",
    );
    // The address limit still applies within a network that has room.
    let mut three = Vec::new();
    for _ in 0..3 {
        three.push(connect(from_net(2, 1), server).await);
    }
    let mut fourth = Client::connect_from(from_net(2, 1), server).await;
    assert_refused(
        &fourth.recv().await,
        ErrorCode::Busy,
        "too many connections from your address 127.0.2.1 (at most 3)",
    );
    // A well-behaved pair from another network meets as usual.
    honest_pair(from_net(3, 1), server, "7").await;
    assert_eq!(metrics.reject_count(Reject::network_open), 1);
    assert_eq!(metrics.reject_count(Reject::address_open), 1);
    // One connection closing anywhere in the network gives it a slot back.
    drop(held.pop());
    sleep(Duration::from_millis(100)).await;
    let (_again, first) = try_hello(from_net(1, 7), server, "200").await;
    assert!(matches!(first, ServerToPeer::Welcome { .. }), "{first:?}");
}

#[tokio::test]
async fn new_codes_and_connections_are_rate_limited_per_network() {
    // Per /24: bursts of 20 codes and 60 connections (twice the address's); the
    // connection rate is so low that nothing refills during the test.
    let metrics = Arc::new(Metrics::default());
    let config = Config {
        network_multiple: 2,
        connections_per_minute: 1,
        metrics: metrics.clone(),
        ..Config::default()
    };
    let rv = TestRendezvous::with_config(config);
    let server = rv.addr();
    let code_burst = punchline_rendezvous::server::CODE_BURST * 2;
    // Connection n from this network comes from 127.0.4.n: a fresh address
    // every time, each far below its own limits.
    let mut n: u8 = 0;
    let mut next_address = || {
        n += 1;
        from_net(4, n)
    };
    for code in 0..code_burst {
        let (_c, first) = try_hello(next_address(), server, &(300 + code).to_string()).await;
        assert!(matches!(first, ServerToPeer::Welcome { .. }), "{first:?}");
    }
    let (_c, first) = try_hello(next_address(), server, "399").await;
    assert_refused(
        &first,
        ErrorCode::Busy,
        "your network 127.0.4.0/24 opens new codes too fast (at most 60 a minute)",
    );
    // Joining a waiting peer's code is not a new code.
    let (mut waiting, first) = try_hello(from_net(5, 1), server, "400").await;
    assert!(matches!(first, ServerToPeer::Welcome { .. }));
    let (_joined, first) = try_hello(next_address(), server, "400").await;
    assert!(matches!(first, ServerToPeer::Welcome { .. }), "{first:?}");
    assert!(matches!(
        waiting.recv_after_pings().await,
        ServerToPeer::Go(_)
    ));
    // 22 connections so far. Up to the network's burst of new connections they
    // are admitted (the server waits for their hello); then refused.
    let connection_burst = punchline_rendezvous::server::CONNECTION_BURST * 2;
    let mut conns = Vec::new();
    for _ in 22..connection_burst + 5 {
        let c = Client::connect_from(next_address(), server).await;
        conns.push(c);
    }
    let answers = futures::future::join_all(
        conns
            .iter_mut()
            .map(|c| timeout(Duration::from_millis(500), c.next())),
    )
    .await;
    for (i, answer) in answers.iter().enumerate() {
        let nth = 23 + i as u32;
        match answer {
            Err(_) => assert!(nth <= connection_burst, "connection {nth} admitted"),
            Ok(Some(Ok(msg))) => {
                assert!(nth > connection_burst, "connection {nth} refused: {msg:?}");
                assert_refused(
                    msg,
                    ErrorCode::Busy,
                    "your network 127.0.4.0/24 opens connections too fast (at most 2 a minute)",
                );
            }
            Ok(other) => panic!("connection {nth}: {other:?}"),
        }
    }
    // Other networks are unaffected.
    honest_pair(from_net(6, 1), server, "8").await;
    assert_eq!(metrics.reject_count(Reject::network_code_rate), 1);
    assert_eq!(metrics.reject_count(Reject::network_rate), 5);
    assert_eq!(metrics.reject_count(Reject::address_rate), 0);
}

/// Pairs `a` and `b`, reports a failed punch from both and has both ask for the
/// relay; returns the clients and their answers.
async fn relayed_pair_from(
    a: IpAddr,
    b: IpAddr,
    server: SocketAddr,
    nameplate: &str,
) -> (Client, Client, ServerToPeer, ServerToPeer) {
    let (mut ca, mut cb) = pair_from(a, b, server, nameplate).await;
    let failed = PeerToServer::Report(PunchOutcome::Failed { attempts: 3 });
    let mut answers = Vec::new();
    for c in [&mut ca, &mut cb] {
        c.send(failed.clone()).await;
        c.send(PeerToServer::Relay).await;
        answers.push(c.recv().await);
    }
    let rb = answers.pop().expect("two answers");
    let ra = answers.pop().expect("two answers");
    (ca, cb, ra, rb)
}

#[tokio::test]
async fn relays_are_shared_out_per_address_and_per_network() {
    // 2 relayed connections per address, 4 per /24.
    let metrics = Arc::new(Metrics::default());
    let config = Config {
        relays_per_address: 2,
        network_multiple: 2,
        metrics: metrics.clone(),
        ..Config::default()
    };
    let rv = TestRendezvous::with_config(config);
    let server = rv.addr();
    let relaying = (ServerToPeer::Relaying, ServerToPeer::Relaying);
    let one = from_net(7, 1);
    // A pair whose both ends are at one address takes its two slots.
    let (a1, b1, ra, rb) = relayed_pair_from(one, one, server, "11").await;
    assert_eq!((ra, rb), relaying);
    // A second pair from it is refused.
    let (_a, _b, ra, rb) = relayed_pair_from(one, one, server, "12").await;
    for answer in [ra, rb] {
        assert_refused(
            &answer,
            ErrorCode::RelayUnavailable,
            "relays 2 connections for your address 127.0.7.1",
        );
    }
    // Other addresses of the network fill its share, then it is refused too.
    let (_a3, _b3, ra, rb) = relayed_pair_from(from_net(7, 2), from_net(7, 3), server, "13").await;
    assert_eq!((ra, rb), relaying);
    let (_a, _b, ra, _rb) = relayed_pair_from(from_net(7, 4), from_net(7, 5), server, "14").await;
    assert_refused(
        &ra,
        ErrorCode::RelayUnavailable,
        "relays 4 connections for your network 127.0.7.0/24",
    );
    // Another network is relayed as usual.
    let (mut a5, mut b5, ra, rb) =
        relayed_pair_from(from_net(8, 1), from_net(8, 2), server, "15").await;
    assert_eq!((ra, rb), relaying);
    a5.send(PeerToServer::Relayed(b"hi".to_vec())).await;
    assert_eq!(b5.recv().await, ServerToPeer::Relayed(b"hi".to_vec()));
    assert_eq!(metrics.reject_count(Reject::relay_address), 2);
    assert!(metrics.reject_count(Reject::relay_network) >= 1);
    // When a relay ends, its slots come back.
    drop((a1, b1));
    sleep(Duration::from_millis(200)).await;
    let (_a, _b, ra, rb) = relayed_pair_from(one, one, server, "16").await;
    assert_eq!((ra, rb), relaying);
}

/// Reads until the server ends the connection; returns the error it said
/// first, if any (relayed pieces are skipped).
async fn until_closed(c: &mut Client) -> Option<(ErrorCode, String)> {
    loop {
        match timeout(WAIT, c.next()).await.expect("closed in time") {
            Some(Ok(ServerToPeer::Relayed(_))) => {}
            Some(Ok(msg)) => {
                let error = refusal(&msg);
                assert!(error.is_some(), "{msg:?}");
                // The close follows.
                assert!(matches!(
                    timeout(WAIT, c.next()).await,
                    Ok(None | Some(Err(_)))
                ));
                return error;
            }
            None | Some(Err(_)) => return None,
        }
    }
}

#[tokio::test]
async fn a_relay_ends_at_its_lifetime_however_busy_and_frees_its_slots() {
    let metrics = Arc::new(Metrics::default());
    let lifetime = Duration::from_secs(1);
    let config = Config {
        relay_lifetime: lifetime,
        relays_per_address: 2,
        metrics: metrics.clone(),
        ..Config::default()
    };
    let rv = TestRendezvous::with_config(config);
    let server = rv.addr();
    let ip = from_net(9, 1);
    let (mut a, mut b, ra, rb) = relayed_pair_from(ip, ip, server, "21").await;
    let started = Instant::now();
    assert_eq!((ra, rb), (ServerToPeer::Relaying, ServerToPeer::Relaying));
    // Traffic all along: this is not the idle timeout.
    for _ in 0..3 {
        a.send(PeerToServer::Relayed(b".".to_vec())).await;
        assert_eq!(b.recv().await, ServerToPeer::Relayed(b".".to_vec()));
        sleep(Duration::from_millis(200)).await;
    }
    let (ea, eb) = tokio::join!(until_closed(&mut a), until_closed(&mut b));
    let ended = started.elapsed();
    assert!(
        ended >= lifetime - Duration::from_millis(100) && ended < lifetime * 5,
        "ended after {ended:?}"
    );
    // One end or both were told why (the other may just see its relay close).
    let told: Vec<_> = [ea, eb].into_iter().flatten().collect();
    assert!(!told.is_empty(), "nobody was told why the relay ended");
    for (code, message) in told {
        assert_eq!(code, ErrorCode::RelayUnavailable);
        assert!(message.contains("time limit (1 s)"), "{message}");
    }
    assert!(metrics.reject_count(Reject::relay_lifetime) >= 1);
    // The slots are free again: the same address is relayed anew.
    sleep(Duration::from_millis(100)).await;
    let (_a, _b, ra, rb) = relayed_pair_from(ip, ip, server, "22").await;
    assert_eq!((ra, rb), (ServerToPeer::Relaying, ServerToPeer::Relaying));
}

#[tokio::test]
async fn idle_and_slow_clients_do_not_block_a_metrics_scrape() {
    let metrics = Arc::new(Metrics::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(serve_metrics(listener, metrics, std::future::pending()));

    // Clients sending a byte of a request a second, and more that send nothing:
    // together far more than the endpoint serves at once.
    let mut slow = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        slow.push(tokio::spawn(async move {
            for b in b"GET /metrics HTTP/1.1\r\n\r\n" {
                if s.write_all(&[*b]).await.is_err() {
                    return;
                }
                sleep(Duration::from_secs(1)).await;
            }
        }));
    }
    let mut idle = Vec::new();
    for _ in 0..12 {
        idle.push(TcpStream::connect(addr).await.expect("connect"));
    }
    sleep(Duration::from_millis(200)).await;
    for round in 0..3 {
        // Quicker than the request deadline: the scrape does not wait for a
        // slot to time out.
        let started = Instant::now();
        let answer = http_get(addr, "/metrics", WAIT)
            .await
            .expect("metrics answer");
        let took = started.elapsed();
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "round {round}: {answer:?}"
        );
        assert!(took < Duration::from_secs(1), "round {round} took {took:?}");
        // More idle clients, to keep every slot busy.
        for _ in 0..8 {
            idle.push(TcpStream::connect(addr).await.expect("connect"));
        }
        sleep(Duration::from_millis(100)).await;
    }
    // The newest idle client (never evicted) is closed by its request deadline.
    let mut newest = idle.pop().expect("idle clients");
    let mut buf = Vec::new();
    let closed = timeout(Duration::from_secs(5), newest.read_to_end(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    for task in slow {
        task.abort();
    }
}

/// A network namespace of this test's own, deleted when dropped (also when the
/// test fails), named like the lab's so `lab cleanup` knows it.
struct Netns(String);

impl Netns {
    fn create(role: &str) -> Netns {
        let name = format!("{}-{role}", punchline_lab::names::next_lab_id());
        punchline_lab::netns::create(&name).expect("create namespace");
        Netns(name)
    }

    /// Gives the namespace's loopback `addr` (a single address).
    fn add_address(&self, addr: IpAddr) {
        let addr = format!("{addr}/{}", if addr.is_ipv4() { 32 } else { 128 });
        punchline_lab::cmd::ip_in(&self.0, &["addr", "add", &addr, "dev", "lo", "nodad"])
            .expect("add address");
    }

    /// Runs `test` inside the namespace on a runtime of its own: every socket
    /// it creates (server and clients) belongs to the namespace.
    fn run<F: std::future::Future<Output = ()>>(&self, test: impl FnOnce() -> F + Send) {
        punchline_lab::netns::run_in(&self.0, || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(test())
        })
        .expect("enter namespace");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = punchline_lab::netns::delete(&self.0) {
            eprintln!("could not delete namespace {}: {e}", self.0);
        }
    }
}

fn v6(s: &str) -> IpAddr {
    s.parse().expect("IPv6 address")
}

/// Many addresses of one IPv6 /64 are one address to the limits, and many /64s
/// of one /48 one network. Needs root for its network namespace, in which any
/// address of a few documentation prefixes is local.
#[test]
fn ipv6_limits_count_a_64_as_one_address_and_a_48_as_one_network() {
    let name = "ipv6_limits_count_a_64_as_one_address_and_a_48_as_one_network";
    if !punchline_lab::prereq::available_or_skip(name) {
        return;
    }
    let ns = Netns::create("v6");
    let mut addresses = Vec::new();
    // One subscriber's /64 (in 2001:db8:1::/48), two more /64s of that /48, a
    // /64 in another /48 for the new codes, and an honest pair's /48.
    for host in 1..=4 {
        addresses.push(v6(&format!("2001:db8:1:1::{host}")));
    }
    for host in 1..=3 {
        addresses.push(v6(&format!("2001:db8:1:2::{host}")));
    }
    addresses.push(v6("2001:db8:1:3::1"));
    for host in 1..=11 {
        addresses.push(v6(&format!("2001:db8:3:1::{host:x}")));
    }
    addresses.push(v6("2001:db8:2::1"));
    for addr in &addresses {
        ns.add_address(*addr);
    }
    ns.run(|| async {
        // 3 open connections per /64, 6 per /48.
        let metrics = Arc::new(Metrics::default());
        let config = Config {
            connections_per_address: 3,
            network_multiple: 2,
            metrics: metrics.clone(),
            ..Config::default()
        };
        let rv = TestRendezvous::on(Ipv6Addr::LOCALHOST.into(), config);
        let server = rv.addr();

        // Three addresses of one /64 hold its three connections; a fourth
        // address of it is refused, as a fourth connection of one IPv4
        // address would be.
        let mut held = Vec::new();
        for host in 1..=3 {
            let ip = v6(&format!("2001:db8:1:1::{host}"));
            let (c, first) = try_hello(ip, server, &format!("1{host}")).await;
            assert!(matches!(first, ServerToPeer::Welcome { .. }), "{first:?}");
            held.push(c);
        }
        let (_c, first) = try_hello(v6("2001:db8:1:1::4"), server, "14").await;
        assert_refused(
            &first,
            ErrorCode::Busy,
            "too many connections from your network 2001:db8:1:1::/64 (at most 3)",
        );
        // Another /64 of the same /48 fills the /48's six; a third /64 of it is
        // refused for the /48.
        for host in 1..=3 {
            let ip = v6(&format!("2001:db8:1:2::{host}"));
            let (c, first) = try_hello(ip, server, &format!("2{host}")).await;
            assert!(matches!(first, ServerToPeer::Welcome { .. }), "{first:?}");
            held.push(c);
        }
        let (_c, first) = try_hello(v6("2001:db8:1:3::1"), server, "31").await;
        assert_refused(
            &first,
            ErrorCode::Busy,
            "too many connections from your network 2001:db8:1::/48 (at most 6)",
        );
        // New codes from many addresses of one /64: the /64's burst, then
        // refused.
        let burst = punchline_rendezvous::server::CODE_BURST;
        for host in 1..=burst {
            let ip = v6(&format!("2001:db8:3:1::{host:x}"));
            let (_c, first) = try_hello(ip, server, &format!("4{host}")).await;
            assert!(matches!(first, ServerToPeer::Welcome { .. }), "{first:?}");
        }
        let ip = v6(&format!("2001:db8:3:1::{:x}", burst + 1));
        let (_c, first) = try_hello(ip, server, "499").await;
        assert_refused(
            &first,
            ErrorCode::Busy,
            "your network 2001:db8:3:1::/64 opens new codes too fast",
        );
        // A well-behaved pair from another /48 meets as usual.
        honest_pair(v6("2001:db8:2::1"), server, "7").await;
        assert_eq!(metrics.reject_count(Reject::address_open), 1);
        assert_eq!(metrics.reject_count(Reject::network_open), 1);
        assert_eq!(metrics.reject_count(Reject::code_rate), 1);
    });
}
