//! First lines (lines given before the link is up) against whoever carries
//! the link, a rendezvous that knows the code, a hostile go timing, and input
//! piped in full before the link: real `peer` processes against fake
//! rendezvous servers.
//!
//! The follower's box of first lines (`PeerToPeer::FirstLines`) is a frame of
//! its own beside the Noise handshake, so whoever carries the link (a relaying
//! rendezvous, anyone on the path between the peers) can drop it or flip a bit
//! of it and the handshake still succeeds. The box is therefore only a
//! preview: the follower sends its first lines again after the handshake, and
//! the leader skips those it already showed, so a dropped or altered box loses
//! nothing and ends nothing.
//!
//! The fake rendezvous below needs no code: it passes both SPAKE2 messages on
//! untouched, relays the first link (both peers are told the other's NAT is
//! symmetric, so neither punches) and tampers only with the box.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use common::fake::{arrive, go, listen, pose, punch, until_both_relay, ServerConn};

/// The session token the fake rendezvous gives its pairs.
const SESSION_77: [u8; 16] = [0x77; 16];
use common::*;
use futures::{SinkExt, StreamExt};
use punchline_proto::{
    FrameCodec, Go, Mapping, PeerInfo, PeerToPeer, PeerToServer, Role, ServerToPeer,
};
use tokio::net::TcpListener;
use tokio::time::timeout;
use tokio_util::codec::{Decoder, Encoder};

const LIMIT: Duration = Duration::from_secs(30);

/// What the rendezvous does to the follower's box of first lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tamper {
    /// Nothing: an honest relay (the control).
    None,
    /// The box never reaches the leader.
    Drop,
    /// One bit of the box's ciphertext is flipped.
    Flip,
    /// The box is passed on, then the relay ends (the follower's handshake
    /// answer never reaches the leader).
    CutAfterBox,
}

/// Relays between leader `a` and follower `b`; what `b` sends is cut into
/// frames, and its box of first lines is tampered with as `tamper` says.
/// Counts the boxes seen in `boxes`.
async fn relay(mut a: ServerConn, mut b: ServerConn, tamper: Tamper, boxes: Arc<AtomicUsize>) {
    let mut codec = FrameCodec::<PeerToPeer, PeerToPeer>::new();
    let mut from_b = BytesMut::new();
    loop {
        tokio::select! {
            m = a.next() => match m {
                Some(Ok(PeerToServer::Relayed(x))) => {
                    if b.send(ServerToPeer::Relayed(x)).await.is_err() { return; }
                }
                Some(Ok(_)) => {}
                _ => return,
            },
            m = b.next() => match m {
                Some(Ok(PeerToServer::Relayed(x))) => {
                    from_b.extend_from_slice(&x);
                    let mut out = BytesMut::new();
                    let mut cut = false;
                    while let Ok(Some(frame)) = codec.decode(&mut from_b) {
                        let frame = match frame {
                            PeerToPeer::FirstLines(mut sealed) => {
                                boxes.fetch_add(1, Ordering::SeqCst);
                                match tamper {
                                    Tamper::None => Some(PeerToPeer::FirstLines(sealed)),
                                    Tamper::Drop => None,
                                    Tamper::Flip => {
                                        let last = sealed.len() - 1;
                                        sealed[last] ^= 1;
                                        Some(PeerToPeer::FirstLines(sealed))
                                    }
                                    Tamper::CutAfterBox => {
                                        cut = true;
                                        Some(PeerToPeer::FirstLines(sealed))
                                    }
                                }
                            }
                            other => Some(other),
                        };
                        if let Some(frame) = frame {
                            codec.encode(frame, &mut out).expect("encode");
                        }
                        if cut {
                            break;
                        }
                    }
                    if cut {
                        let _ = a.send(ServerToPeer::Relayed(out.to_vec())).await;
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        return;
                    }
                    if !out.is_empty() && a.send(ServerToPeer::Relayed(out.to_vec())).await.is_err() {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                _ => return,
            },
        }
    }
}

/// The fake rendezvous: the first peer to arrive leads. The go waits a
/// moment so that the follower's piped lines have been read before its
/// link's handshake is made (they are then in its box).
async fn rendezvous(listener: TcpListener, tamper: Tamper, boxes: Arc<AtomicUsize>) {
    let mut a = arrive(&listener, |_| Mapping::Independent).await;
    let mut b = arrive(&listener, |_| Mapping::Independent).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.conn
        .send(go(
            b.observed,
            b.hello.pake.clone(),
            Role::Leader,
            SESSION_77,
        ))
        .await
        .expect("go");
    b.conn
        .send(go(
            a.observed,
            a.hello.pake.clone(),
            Role::Follower,
            SESSION_77,
        ))
        .await
        .expect("go");
    let (ca, cb) = timeout(LIMIT, until_both_relay(a.conn, b.conn))
        .await
        .expect("both ask for the relay");
    relay(ca, cb, tamper, boxes).await;
}

struct Run {
    alice: Peer,
    bob: Peer,
    boxes: Arc<AtomicUsize>,
    _rt: tokio::runtime::Runtime,
}

/// Alice waits (she leads), Bob joins with `bob_early` piped before his
/// link is up.
fn start(tamper: Tamper, code: &str, bob_early: &str) -> Run {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (listener, server) = listen(&rt);
    let boxes = Arc::new(AtomicUsize::new(0));
    rt.spawn(rendezvous(listener, tamper, boxes.clone()));
    let logged = |name: &str| {
        let mut cmd = peer_command(server, name, code, &["--punch-timeout", "2"]);
        cmd.env("RUST_LOG", "punchline_peer=info");
        Peer::spawn_command(cmd, name)
    };
    let mut alice = logged("alice");
    alice.wait_stderr("waiting for the other side");
    let mut bob = logged("bob");
    bob.send(bob_early);
    Run {
        alice,
        bob,
        boxes,
        _rt: rt,
    }
}

/// Control: an honest relay shows Bob's first line to Alice (from his box)
/// and the later one after it, each once.
#[test]
fn control_an_honest_relay_shows_the_followers_first_lines_once() {
    let mut run = start(Tamper::None, "3-early-box", "early from bob\n");
    // The box is a preview: its lines are not counted as carried, and go
    // again after the handshake.
    let secured = run.bob.wait_stderr("relayed and encrypted");
    assert!(secured.contains("carried=0"), "{secured}");
    run.alice.wait_stderr("connected to bob: relayed");
    assert_eq!(run.alice.recv(), "bob: early from bob");
    run.bob.send("later from bob\n");
    assert_eq!(run.alice.recv(), "bob: later from bob");
    run.bob.close_stdin();
    assert!(run.bob.wait().success());
    assert!(run.alice.wait().success());
    assert!(run.alice.rest_of_stdout().is_empty());
    assert_eq!(run.boxes.load(Ordering::SeqCst), 1);
}

/// A rendezvous without the code drops (or alters) Bob's box; Bob then
/// types another line. The first lines come again after the handshake, so
/// Alice shows both, in order, and the chat goes on (counting the boxed
/// line as sent, as an earlier version did, ended Alice's chat with "line 2
/// arrived while line 1 was expected").
fn box_tampered_then_another_line(tamper: Tamper, code: &str) {
    let mut run = start(tamper, code, "early from bob\n");
    // The box is a preview: its lines are not counted as carried, and go
    // again after the handshake.
    let secured = run.bob.wait_stderr("relayed and encrypted");
    assert!(secured.contains("carried=0"), "{secured}");
    run.alice.wait_stderr("connected to bob: relayed");
    run.bob.send("later from bob\n");
    let first = run.alice.try_recv(Duration::from_secs(15));
    let second = run.alice.try_recv(Duration::from_secs(5));
    run.alice.close_stdin();
    let alice_ok = run.alice.wait().success();
    eprintln!(
        "alice exit ok: {alice_ok}, stderr: {:?}",
        run.alice.stderr_seen
    );
    assert_eq!(
        run.boxes.load(Ordering::SeqCst),
        1,
        "the box went through the relay"
    );
    assert_eq!(
        (first.as_deref(), second.as_deref()),
        (Some("bob: early from bob"), Some("bob: later from bob")),
        "alice's stderr: {:?}",
        run.alice.stderr_seen
    );
}

#[test]
fn a_dropped_box_of_first_lines_then_a_line_keeps_the_chat() {
    box_tampered_then_another_line(Tamper::Drop, "4-early-box");
}

#[test]
fn an_altered_box_of_first_lines_then_a_line_keeps_the_chat() {
    box_tampered_then_another_line(Tamper::Flip, "5-early-box");
}

/// A rendezvous without the code passes Bob's box on, then ends the relay
/// before his handshake answer. Alice has shown Bob's line (his box opened
/// under the code's key: he typed the same code), so her error must not
/// blame a wrong code: the link was lost.
#[test]
fn a_relay_cut_after_the_box_does_not_blame_a_wrong_code() {
    let mut run = start(Tamper::CutAfterBox, "7-early-box", "early from bob\n");
    let shown = run.alice.try_recv(Duration::from_secs(15));
    let _ = run.alice.wait();
    let stderr = run.alice.stderr_seen.join("\n");
    eprintln!("alice shown: {shown:?}\nalice stderr: {stderr}");
    assert_eq!(shown.as_deref(), Some("bob: early from bob"));
    assert!(
        !stderr.contains("typed the code wrong") && !stderr.contains("typed it wrong"),
        "alice showed bob's boxed line, then said the code may be wrong: {stderr}"
    );
}

/// `printf 'early\n' | peer CODE`: Bob's only line is in his box and he
/// leaves at once (end of input). The rendezvous drops the box. The line
/// still reaches Alice, after the handshake (an earlier version had Alice
/// answer Bob's goodbye without ever showing it).
#[test]
fn a_dropped_box_of_a_one_line_pipe_is_not_lost_at_the_leader() {
    let mut run = start(Tamper::Drop, "6-early-box", "only line from bob\n");
    run.bob.close_stdin();
    let alice_ok = run.alice.wait().success();
    let shown = run.alice.rest_of_stdout();
    let bob_ok = run.bob.wait().success();
    assert_eq!(
        run.boxes.load(Ordering::SeqCst),
        1,
        "the box went through the relay"
    );
    eprintln!(
        "alice exit ok: {alice_ok}, stderr: {:?}",
        run.alice.stderr_seen
    );
    eprintln!("bob exit ok: {bob_ok}, stderr: {:?}", run.bob.stderr_seen);
    assert_eq!(
        shown,
        vec!["bob: only line from bob".to_owned()],
        "the line bob piped never reached alice's screen"
    );
}

/// The same on a punched (direct) link, with an attacker on the path between
/// the peers rather than a relay: the fake rendezvous (still without the
/// code: both SPAKE2 messages pass untouched) points each peer at a port of
/// the attacker, who completes the simultaneous open with each, answers the
/// link checks (the session token is in the go) and forwards every frame,
/// dropping only Bob's box. Both handshakes succeed, and Bob's lines reach
/// Alice after them, in order.
mod on_path {
    use super::*;
    use common::fake::LinkConn;

    const SESSION: [u8; 16] = [0x31; 16];

    async fn forward(mut alice: LinkConn, mut bob: LinkConn, boxes: Arc<AtomicUsize>) {
        loop {
            tokio::select! {
                m = alice.next() => match m {
                    Some(Ok(m)) => if bob.send(m).await.is_err() { return },
                    _ => return,
                },
                m = bob.next() => match m {
                    Some(Ok(PeerToPeer::FirstLines(_))) => {
                        boxes.fetch_add(1, Ordering::SeqCst);
                    }
                    Some(Ok(m)) => if alice.send(m).await.is_err() { return },
                    _ => return,
                },
            }
        }
    }

    async fn attacker(listener: TcpListener, m1: u16, m2: u16, boxes: Arc<AtomicUsize>) {
        let mut a = arrive(&listener, |_| Mapping::Independent).await;
        let mut b = arrive(&listener, |_| Mapping::Independent).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let here = |port| SocketAddr::from(([127, 0, 0, 1], port));
        let go = |at: u16, pake: Vec<u8>, role| {
            ServerToPeer::Go(Go {
                peer: PeerInfo {
                    observed: here(at),
                    mapping: Mapping::Independent,
                    pake,
                    other_family: None,
                    mapped: None,
                },
                role,
                session: SESSION,
                others_go_after_us: 0,
            })
        };
        a.conn
            .send(go(m1, b.hello.pake.clone(), Role::Leader))
            .await
            .expect("go");
        b.conn
            .send(go(m2, a.hello.pake.clone(), Role::Follower))
            .await
            .expect("go");
        let (to_a, to_b) = tokio::join!(punch(m1, a.observed), punch(m2, b.observed));
        let (to_a, to_b) = tokio::join!(
            pose(to_a, SESSION, Role::Follower),
            pose(to_b, SESSION, Role::Leader)
        );
        // Keep the rendezvous connections open while the chat runs.
        let _keep = (a.conn, b.conn);
        forward(to_a, to_b, boxes).await;
    }

    #[test]
    fn dropping_the_box_on_a_direct_link_loses_no_line() {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let (listener, server) = listen(&rt);
        let (m1, m2) = (free_port(), free_port());
        let boxes = Arc::new(AtomicUsize::new(0));
        rt.spawn(attacker(listener, m1, m2, boxes.clone()));
        let code = "7-early-box";
        let mut alice = Peer::spawn(server, "alice", code, &[]);
        alice.wait_stderr("waiting for the other side");
        let mut bob = Peer::spawn(server, "bob", code, &[]);
        bob.send("early from bob\n");
        alice.wait_stderr("connected to bob: direct link");
        bob.wait_stderr("connected to alice: direct link");
        bob.send("later from bob\n");
        let first = alice.try_recv(Duration::from_secs(15));
        let second = alice.try_recv(Duration::from_secs(5));
        alice.close_stdin();
        let _ = alice.wait();
        assert_eq!(
            boxes.load(Ordering::SeqCst),
            1,
            "the box crossed the attacker"
        );
        assert_eq!(
            (first.as_deref(), second.as_deref()),
            (Some("bob: early from bob"), Some("bob: later from bob")),
            "alice's stderr: {:?}",
            alice.stderr_seen
        );
    }
}

/// A rendezvous that knows the code (the case the verification words are
/// for) answers Alice's SPAKE2 itself, punches to her, reads her first
/// handshake message — which carries what she piped before the link was up —
/// and closes. Alice is told the other side "did not prove it knows the
/// code", and only what holds about her lines: nothing can be read without
/// the code (not "by it", as an earlier message said).
mod code_holder {
    use super::*;
    use punchline_peer::punch::link_token;
    use punchline_peer::secure::{KeyExchange, NOISE_PARAMS};
    use punchline_proto::codec::decode_payload;
    use punchline_proto::codes::Code;
    use punchline_proto::{Introduction, PROTOCOL_VERSION};

    const SESSION: [u8; 16] = [0x41; 16];

    /// Returns the lines read from Alice's first handshake message.
    async fn reader(listener: TcpListener, m1: u16, code: Code) -> Vec<String> {
        let mut a = arrive(&listener, |_| Mapping::Independent).await;
        // Let Alice's piped lines be read before her go.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let kx = KeyExchange::start(&code).expect("randomness");
        let ours = kx.message.clone();
        let secret = kx.finish(&a.hello.pake).expect("her SPAKE2 message");
        a.conn
            .send(ServerToPeer::Go(Go {
                peer: PeerInfo {
                    observed: SocketAddr::from(([127, 0, 0, 1], m1)),
                    mapping: Mapping::Independent,
                    pake: ours.clone(),
                    other_family: None,
                    mapped: None,
                },
                role: Role::Leader,
                session: SESSION,
                others_go_after_us: 0,
            }))
            .await
            .expect("go");
        let token = link_token(&SESSION);
        let mut link = pose(punch(m1, a.observed).await, SESSION, Role::Follower).await;
        let Some(Ok(PeerToPeer::Handshake(msg1))) = link.next().await else {
            panic!("no first handshake message");
        };
        let mut prologue = b"punchline link prologue".to_vec();
        prologue.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        prologue.extend_from_slice(&token);
        prologue.extend_from_slice(&a.hello.pake[..32]);
        prologue.extend_from_slice(&ours[..32]);
        let mut hs = snow::Builder::new(NOISE_PARAMS.parse().expect("params"))
            .psk(0, &secret.psk())
            .expect("psk")
            .prologue(&prologue)
            .expect("prologue")
            .build_responder()
            .expect("responder");
        let mut plain = vec![0u8; 65_535];
        let n = hs
            .read_message(&msg1, &mut plain)
            .expect("her message opens");
        let intro: Introduction = decode_payload(&plain[..n]).expect("introduction");
        // Now refuse, as a wrong code would: close.
        drop(link);
        while let Some(Ok(_)) = a.conn.next().await {}
        intro.first_lines
    }

    #[test]
    fn a_code_holder_reads_the_first_lines_and_the_user_is_told_only_what_holds() {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let (listener, server) = listen(&rt);
        let m1 = free_port();
        let code = "8-known-code";
        let read = rt.spawn(reader(listener, m1, Code::parse(code).expect("code")));
        let mut alice = Peer::spawn(server, "alice", code, &[]);
        alice.send("the secret plan\n");
        assert!(!alice.wait().success());
        let read = rt
            .block_on(async { timeout(LIMIT, read).await })
            .expect("in time")
            .expect("reader");
        assert_eq!(read, ["the secret plan"], "the interceptor read her line");
        let told = alice
            .stderr_seen
            .iter()
            .find(|l| l.contains("did not prove it knows the code"))
            .cloned()
            .unwrap_or_default();
        // She is told only what holds: without the code nothing can be read.
        assert!(
            !told.contains("could be read by it") && told.contains("without the code"),
            "alice is told her line was not readable, yet it was read: {told}"
        );
    }
}

/// Go timing: whatever `others_go_after_us` a hostile rendezvous sends (none,
/// 1.5 s, u32::MAX µs), a punch at an address that resets every SYN (a
/// closed loopback port) stays within the documented budget of 140
/// attempts per candidate per go, over the longest punch a user may ask for.
mod go_timing {
    use super::*;
    use punchline_peer::error::PeerError;
    use punchline_peer::punch::{punch, PunchParams};
    use punchline_peer::secure::{LinkKeys, Secret};
    use punchline_proto::pacing::{RetryPolicy, MAX_ATTEMPTS};
    use punchline_proto::Introduction;
    use tokio::sync::oneshot;
    use tokio::time::Instant;

    async fn attempts_at_a_resetting_address(others_go_after_us: u32) -> u32 {
        let (port, closed) = (free_port(), free_port());
        let keys = Arc::new(LinkKeys {
            secret: Secret::from_key([5; 32]),
            ours: Introduction {
                name: "x".into(),
                chat_role: Role::Leader,
                words_nonce: [0; 32],
                first_lines: Vec::new(),
                identity: [0; 32],
            },
            words: None,
            first_lines: Default::default(),
            shows_first_lines: None,
        });
        let go = Go {
            peer: PeerInfo {
                observed: SocketAddr::from(([127, 0, 0, 1], closed)),
                mapping: Mapping::Independent,
                pake: Vec::new(),
                other_family: None,
                mapped: None,
            },
            role: Role::Leader,
            session: [3; 16],
            others_go_after_us,
        };
        let params = PunchParams {
            local_port: port,
            deadline: punchline_proto::defaults::MAX_PUNCH_DEADLINE,
            our_observed: SocketAddr::from(([127, 0, 0, 1], port)),
            server: "127.0.0.1:7425".parse().expect("addr"),
            our_mapping: Mapping::Independent,
            policy: RetryPolicy::Adaptive,
            server_rtt: Some(Duration::from_millis(1)),
            our_other_family: None,
            mapped: None,
        };
        let (tx, none) = oneshot::channel();
        drop(tx);
        match punch(&go, &params, keys, Instant::now(), none).await {
            Err(PeerError::PunchFailed { failure, .. }) => failure.attempts,
            Err(e) => panic!("unexpected error: {e}"),
            Ok(_) => panic!("a closed port answered"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hostile_others_go_never_raises_the_attempt_budget() {
        let (none, some, huge) = tokio::join!(
            attempts_at_a_resetting_address(0),
            attempts_at_a_resetting_address(1_500_000),
            attempts_at_a_resetting_address(u32::MAX),
        );
        eprintln!("attempts: 0 -> {none}, 1.5 s -> {some}, u32::MAX -> {huge}");
        for n in [none, some, huge] {
            assert!(n <= MAX_ATTEMPTS, "{n} attempts");
        }
    }
}

/// Stdin read before the meeting: both sides pipe many lines (more than the
/// first lines' 16 and the input channel's 64), with a line too long to send
/// and a command-looking line among the first ones, and end their input
/// before the link is up. Every valid line arrives once, in order, on both
/// sides, and both exit 0.
#[test]
fn both_sides_pipe_everything_before_the_link_and_leave() {
    let rv = punchline_testkit::TestRendezvous::start();
    let code = "9-pipe-all";
    let text = |who: &str| -> (String, Vec<String>) {
        let mut input = String::new();
        let mut shown = Vec::new();
        for i in 0..200 {
            let line = match i {
                3 => "x".repeat(punchline_proto::MAX_LINE_BYTES + 1),
                5 => "/quit".to_owned(),
                _ => format!("{who} line {i}"),
            };
            input.push_str(&line);
            input.push('\n');
            if i != 3 {
                shown.push(line);
            }
        }
        (input, shown)
    };
    let (a_in, a_lines) = text("a");
    let (b_in, b_lines) = text("b");
    let mut alice = Peer::spawn(rv.addr(), "alice", code, &[]);
    alice.send(&a_in);
    alice.close_stdin();
    alice.wait_stderr("waiting for the other side");
    let mut bob = Peer::spawn(rv.addr(), "bob", code, &[]);
    bob.send(&b_in);
    bob.close_stdin();
    let mut at_bob = Vec::new();
    while at_bob.len() < a_lines.len() {
        match bob.try_recv(Duration::from_secs(20)) {
            Some(l) => at_bob.push(l),
            None => break,
        }
    }
    let mut at_alice = Vec::new();
    while at_alice.len() < b_lines.len() {
        match alice.try_recv(Duration::from_secs(20)) {
            Some(l) => at_alice.push(l),
            None => break,
        }
    }
    let a_ok = alice.wait().success();
    let b_ok = bob.wait().success();
    let want = |who: &str, lines: &[String]| -> Vec<String> {
        lines.iter().map(|l| format!("{who}: {l}")).collect()
    };
    assert_eq!(
        at_bob,
        want("alice", &a_lines),
        "bob: {:?}",
        bob.stderr_seen
    );
    assert_eq!(
        at_alice,
        want("bob", &b_lines),
        "alice: {:?}",
        alice.stderr_seen
    );
    assert!(alice.rest_of_stdout().is_empty());
    assert!(bob.rest_of_stdout().is_empty());
    assert!(
        a_ok && b_ok,
        "alice {:?} bob {:?}",
        alice.stderr_seen,
        bob.stderr_seen
    );
}
