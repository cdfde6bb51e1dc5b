//! A hostile rendezvous, and a stranger who knows only the nameplate.
//!
//! The rendezvous below is the test's own: it speaks the protocol, but it can
//! cut the chat's link whenever the test says so, and it pairs a resuming peer
//! with an impostor of its choosing. With it:
//!
//! - the chat's later links never use the code again: the resuming hellos carry
//!   no key-exchange message, and they meet in a room derived from the chat's
//!   secret (the same for both peers, and not the session token, which the go
//!   carries in clear);
//! - an impostor that does not hold the chat's secret gets no chat, whether it
//!   seals its candidates with another key or knows the code itself; the user is
//!   told at the first failure, and after one more try the chat ends with a clear
//!   message. Nothing typed reaches the impostor.
//!
//! And with the real rendezvous: a stranger who joins a waiting peer's nameplate
//! learns neither its name nor its LAN addresses, and the waiting peer is told
//! plainly that someone joined with a different code.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::fake::{arrive, go, listen, until_both_relay, Arrival, ServerConn, SYMMETRIC};
use common::*;
use futures::{SinkExt, StreamExt};
use punchline_peer::net::LinkStream;
use punchline_peer::punch::link_token;
use punchline_peer::secure::{KeyExchange, Secret, SecureLink};
use punchline_proto::codes::Code;
use punchline_proto::{
    FrameCodec, Hello, Introduction, Mapping, PeerToPeer, PeerToServer, Role, SealedCandidates,
    ServerToPeer, PROTOCOL_VERSION,
};
use punchline_testkit::{Client, TestRendezvous};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::time::timeout;
use tokio_util::codec::Framed;

const LIMIT: Duration = Duration::from_secs(30);

/// Reads from a peer after its go until it asks for the relay (its sealed box,
/// if it sends one, goes to `forward`), and agrees.
async fn until_relay(conn: &mut ServerConn, forward: Option<&mut ServerConn>) {
    let mut forward = forward;
    loop {
        match conn.next().await {
            Some(Ok(PeerToServer::Sealed(b))) => {
                if let Some(to) = forward.as_mut() {
                    to.send(ServerToPeer::Sealed(b)).await.expect("forward box");
                }
            }
            Some(Ok(PeerToServer::Relay)) => {
                conn.send(ServerToPeer::Relaying).await.expect("relaying");
                return;
            }
            Some(Ok(_)) => {}
            other => panic!("peer left before asking for the relay: {other:?}"),
        }
    }
}

/// How an impostor tries to pass for the other peer of a resumed chat.
#[derive(Debug, Clone, Copy)]
enum Impostor {
    /// Seals "its candidates" with a key of its own.
    SealsWithAnotherKey,
    /// Knows the code, and keys the link's handshake with it (as on a first link).
    KnowsTheCode,
}

/// Plays `impostor` against a resuming peer, as the other side with `role`
/// towards it; returns every byte the peer sent it on the link.
async fn impersonate(mut victim: Arrival, impostor: Impostor, code: &Code) -> Vec<u8> {
    let session = [0x5a; 16];
    // The victim leads the link with the first impostor and follows with the
    // second, so both sides of the handshake are tried.
    let (victim_role, impostor_role) = match impostor {
        Impostor::SealsWithAnotherKey => (Role::Leader, Role::Follower),
        Impostor::KnowsTheCode => (Role::Follower, Role::Leader),
    };
    let theirs = KeyExchange::start(code).expect("randomness");
    let pake = theirs.message.clone();
    victim
        .conn
        .send(go(
            "127.0.0.1:9".parse().expect("addr"),
            pake.clone(),
            victim_role,
            session,
        ))
        .await
        .expect("go");
    let secret = match impostor {
        Impostor::SealsWithAnotherKey => {
            let other = Secret::from_key([0x42; 32]);
            let sealed = other
                .seal_candidates(
                    impostor_role,
                    &session,
                    &SealedCandidates { candidates: vec![] },
                )
                .expect("seal");
            victim
                .conn
                .send(ServerToPeer::Sealed(sealed))
                .await
                .expect("box");
            // The victim must refuse it and leave: nothing more to do.
            let mut seen = Vec::new();
            while let Ok(Some(Ok(m))) = timeout(LIMIT, victim.conn.next()).await {
                if let PeerToServer::Relayed(x) = m {
                    seen.extend(x);
                }
            }
            return seen;
        }
        // The code's key, as a rendezvous that knows the code and answers a
        // first meeting's key exchange would have it.
        Impostor::KnowsTheCode => theirs
            .finish(&KeyExchange::start(code).expect("randomness").message)
            .expect("spake2"),
    };
    // No box: the victim's punch (to its LAN candidates only) fails at once,
    // and it asks for the relay, which the impostor then plays.
    until_relay(&mut victim.conn, None).await;
    let (ours, relay_end) = tokio::io::duplex(64 * 1024);
    let handshake = async move {
        let link = Framed::new(LinkStream::Relayed(ours, None), FrameCodec::new());
        let intro = Introduction {
            name: "bob".into(),
            chat_role: Role::Follower,
            words_nonce: [0; 32],
            first_lines: Vec::new(),
            identity: [0; 32],
        };
        SecureLink::handshake(
            link,
            impostor_role,
            &secret,
            &intro,
            None,
            &link_token(&session),
        )
        .await
    };
    let pump = async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut from_impostor, mut to_impostor) = tokio::io::split(relay_end);
        let mut seen = Vec::new();
        let mut buf = vec![0u8; 8192];
        loop {
            tokio::select! {
                n = from_impostor.read(&mut buf) => match n {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if victim.conn.send(ServerToPeer::Relayed(buf[..n].to_vec())).await.is_err() {
                            break;
                        }
                    }
                },
                m = victim.conn.next() => match m {
                    Some(Ok(PeerToServer::Relayed(x))) => {
                        seen.extend_from_slice(&x);
                        if to_impostor.write_all(&x).await.is_err() {
                            break;
                        }
                    }
                    Some(Ok(_)) => {}
                    _ => break,
                },
            }
        }
        seen
    };
    let (shook, seen) = tokio::join!(timeout(LIMIT, handshake), timeout(LIMIT, pump));
    assert!(
        !matches!(shook, Ok(Ok(_))),
        "the impostor completed a handshake with the victim"
    );
    seen.unwrap_or_default()
}

/// What the test rendezvous saw of the resumed meetings.
#[derive(Debug, Default)]
struct Seen {
    session: [u8; 16],
    /// Hellos of resuming peers: (the victim's?, the hello).
    resumes: Vec<(bool, Hello)>,
    /// Bytes the impostors received from the victim.
    impostor_got: Vec<u8>,
}

/// The hostile rendezvous: pairs alice (from `alice_port`) and bob honestly
/// over its relay, cuts their link when `cut` fires, then meets alice's resume
/// hellos with impostors (first one that seals with another key, then one that
/// knows the code) while bob's wait unanswered.
async fn hostile_rendezvous(
    listener: TcpListener,
    alice_port: u16,
    code: Code,
    cut: oneshot::Receiver<Tamper>,
) -> Seen {
    let mapping = move |observed: SocketAddr| {
        // Alice's NAT "is symmetric", so she keeps her port on every new link
        // and the test can tell her connections from bob's.
        if observed.port() == alice_port {
            SYMMETRIC
        } else {
            Mapping::Independent
        }
    };
    let mut seen = Seen::default();
    let mut alice = arrive(&listener, mapping).await;
    let mut bob = arrive(&listener, mapping).await;
    if alice.observed.port() != alice_port {
        std::mem::swap(&mut alice, &mut bob);
    }
    seen.session = [0x11; 16];
    let go_alice = go(
        bob.observed,
        bob.hello.pake.clone(),
        Role::Leader,
        seen.session,
    );
    let go_bob = go(
        alice.observed,
        alice.hello.pake.clone(),
        Role::Follower,
        seen.session,
    );
    alice.conn.send(go_alice).await.expect("go");
    bob.conn.send(go_bob).await.expect("go");
    let (a, b) = timeout(LIMIT, until_both_relay(alice.conn, bob.conn))
        .await
        .expect("both ask for the relay");
    relay(a, b, cut).await;

    // The cut: both come back in the chat's room.
    let mut waiting = Vec::new();
    let mut impostors = [Impostor::SealsWithAnotherKey, Impostor::KnowsTheCode].into_iter();
    let mut played = 0;
    loop {
        // Once both impostors played, a third try of alice's would come within
        // her pause between tries (1 s); wait a few times that.
        let wait = if played < 2 {
            LIMIT
        } else {
            Duration::from_secs(5)
        };
        let arrival = match timeout(wait, arrive(&listener, mapping)).await {
            Ok(a) => a,
            Err(_) => break,
        };
        let is_alice = arrival.observed.port() == alice_port;
        seen.resumes.push((is_alice, arrival.hello.clone()));
        if !is_alice {
            waiting.push(arrival);
            continue;
        }
        match impostors.next() {
            Some(impostor) => {
                played += 1;
                let got = impersonate(arrival, impostor, &code).await;
                seen.impostor_got.extend(got);
            }
            // A third try from alice: the test fails on it.
            None => waiting.push(arrival),
        }
    }
    drop(waiting);
    seen
}

#[test]
fn after_a_cut_impostors_get_no_chat_and_the_user_is_told() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (listener, server) = listen(&rt);
    let code_text = "3-right-code";
    let code = Code::parse(code_text).expect("code");
    let alice_port = free_port();
    let (cut_tx, cut_rx) = oneshot::channel();
    let rv = rt.spawn(hostile_rendezvous(listener, alice_port, code, cut_rx));
    // The probe port (the next one up) is closed: the probe fails at once.
    let port = alice_port.to_string();
    let mut alice = Peer::spawn(
        server,
        "alice",
        code_text,
        &["--port", &port, "--punch-timeout", "2"],
    );
    alice.wait_stderr("waiting for the other side");
    let mut bob = Peer::spawn(server, "bob", code_text, &["--punch-timeout", "2"]);
    alice.wait_stderr("connected to bob: relayed");
    bob.wait_stderr("connected to alice: relayed");
    alice.send(
        "hello bob
",
    );
    assert_eq!(bob.recv(), "alice: hello bob");
    bob.send(
        "hello alice
",
    );
    assert_eq!(alice.recv(), "bob: hello alice");

    cut_tx.send(Tamper::Cut).expect("cut");
    alice.wait_stderr("reconnecting");
    alice.send("a secret typed after the cut\n");
    alice.wait_stderr("warning: a new link failed authentication");
    assert!(!alice.wait().success(), "alice must end the chat");
    let last = alice.wait_stderr("failed authentication 2 times");
    assert!(
        last.starts_with("peer: ") && last.contains("1 line not confirmed"),
        "{last}"
    );
    drop(bob);

    let seen = rt.block_on(rv).expect("rendezvous task");
    let alice_tries: Vec<&Hello> = seen
        .resumes
        .iter()
        .filter(|(is_alice, _)| *is_alice)
        .map(|(_, h)| h)
        .collect();
    assert_eq!(
        alice_tries.len(),
        2,
        "one try, then one more after the warning, then no more"
    );
    let bob_tries: Vec<&Hello> = seen
        .resumes
        .iter()
        .filter(|(is_alice, _)| !*is_alice)
        .map(|(_, h)| h)
        .collect();
    assert!(!bob_tries.is_empty(), "bob tried to resume as well");
    for hello in alice_tries.iter().chain(&bob_tries) {
        assert_eq!(hello.version, PROTOCOL_VERSION);
        assert!(hello.pake.is_empty(), "the code is not used again");
        let room = hello
            .resume
            .expect("a resuming hello names the chat's room");
        assert_eq!(Some(room), alice_tries[0].resume, "both derive one room");
        assert_ne!(
            &room[..],
            &seen.session[..],
            "the room is not the session token"
        );
    }
    let contains = |needle: &[u8]| seen.impostor_got.windows(needle.len()).any(|w| w == needle);
    assert!(!contains(b"secret"), "a typed line reached an impostor");
}

#[test]
fn a_stranger_with_the_nameplate_learns_nothing_and_the_waiting_peer_is_told() {
    use bytes::BytesMut;
    use tokio::io::AsyncReadExt;
    use tokio_util::codec::Decoder;

    let rv = TestRendezvous::start();
    // Besides its LAN addresses (none here: the harness runs peers with
    // --no-lan), a candidate offered by hand must stay hidden too.
    let mut alice = Peer::spawn(
        rv.addr(),
        "alice-the-waiting-one",
        "5-right-code",
        &["--candidate", "10.99.88.77:4242"],
    );
    alice.wait_stderr("waiting for the other side");

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (raw, opened) = rt.block_on(async {
        let mut stranger = Client::connect(rv.addr()).await;
        let guess =
            KeyExchange::start(&Code::parse("5-wrong-guess").expect("code")).expect("randomness");
        stranger.send_hello("5", &guess.message).await;
        // Every byte the stranger receives is kept, read from the connection
        // as it comes; the frames are read from a copy.
        let mut codec = FrameCodec::<ServerToPeer, PeerToServer>::new();
        let mut raw = Vec::new();
        let mut pending = BytesMut::new();
        let mut guess = Some(guess);
        let mut theirs = None;
        let mut buf = vec![0u8; 4096];
        loop {
            let n =
                match timeout(Duration::from_secs(3), stranger.stream_mut().read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => n,
                    _ => break,
                };
            raw.extend_from_slice(&buf[..n]);
            pending.extend_from_slice(&buf[..n]);
            while let Ok(Some(msg)) = codec.decode(&mut pending) {
                match msg {
                    ServerToPeer::Go(go) => {
                        // Seal "our candidates" with the key of the guess.
                        let key = guess
                            .take()
                            .expect("one go")
                            .finish(&go.peer.pake)
                            .expect("spake2");
                        let sealed = key
                            .seal_candidates(
                                go.role,
                                &go.session,
                                &SealedCandidates { candidates: vec![] },
                            )
                            .expect("seal");
                        stranger.send(PeerToServer::Sealed(sealed)).await;
                        theirs = Some((key, go));
                    }
                    ServerToPeer::Sealed(b) => {
                        let (key, go) = theirs.as_ref().expect("the box comes after the go");
                        return (
                            raw,
                            Some(key.open_candidates(go.role.other(), &go.session, &b)),
                        );
                    }
                    ServerToPeer::Ping { seq } => {
                        stranger.send(PeerToServer::Pong { seq }).await;
                    }
                    _ => {}
                }
            }
        }
        (raw, None)
    });
    let opened = opened.expect("the waiting peer's sealed box reached the stranger");
    assert_eq!(opened, None, "the stranger opened the waiting peer's box");
    let contains = |needle: &[u8]| raw.windows(needle.len()).any(|w| w == needle);
    assert!(
        !contains(b"alice-the-waiting-one"),
        "the name reached the stranger"
    );
    assert!(
        !contains(&[10, 99, 88, 77]),
        "the candidate reached the stranger"
    );
    assert!(
        !contains(b"10.99.88.77"),
        "the candidate reached the stranger"
    );

    let told = alice.wait_stderr("someone joined with a different code");
    assert!(told.contains("start again with a new code"), "{told}");
    assert!(!alice.wait().success());
}

/// What the test rendezvous does to a relayed link when told.
#[derive(Debug, Clone, Copy)]
enum Tamper {
    /// Drop both connections: the link is cut.
    Cut,
    /// Slip a forged sealed frame into what goes to the first peer.
    Inject,
}

/// Relays between two peers, tampering as `tamper` says when it fires; ends
/// (dropping both connections) on a cut or when either side closes.
async fn relay(mut a: ServerConn, mut b: ServerConn, tamper: oneshot::Receiver<Tamper>) {
    use tokio_util::codec::Encoder;
    let mut tamper = Some(tamper);
    loop {
        let told = async {
            match tamper.as_mut() {
                Some(rx) => rx.await.ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            what = told => {
                tamper = None;
                match what {
                    Some(Tamper::Cut) => return,
                    Some(Tamper::Inject) => {
                        let mut frame = bytes::BytesMut::new();
                        FrameCodec::<PeerToPeer, PeerToPeer>::new()
                            .encode(PeerToPeer::Sealed(vec![0x66; 48]), &mut frame)
                            .expect("encode");
                        a.send(ServerToPeer::Relayed(frame.to_vec())).await.expect("inject");
                    }
                    None => {}
                }
            }
            m = a.next() => match m {
                Some(Ok(PeerToServer::Relayed(x))) => b.send(ServerToPeer::Relayed(x)).await.expect("to b"),
                Some(Ok(_)) => {}
                _ => return,
            },
            m = b.next() => match m {
                Some(Ok(PeerToServer::Relayed(x))) => a.send(ServerToPeer::Relayed(x)).await.expect("to a"),
                Some(Ok(_)) => {}
                _ => return,
            },
        }
    }
}

/// Meets the next two peers to arrive, the first as leader, with `session`
/// (handing each the other's SPAKE2 message, which is empty on a resumed
/// chat's meeting), and waits until both ask for the relay. Returns their
/// connections and their hellos.
async fn meet_for_the_relay(
    listener: &TcpListener,
    session: [u8; 16],
) -> (ServerConn, ServerConn, [Hello; 2]) {
    meet_for_the_relay_passing(listener, session, |pake| pake).await
}

/// [`meet_for_the_relay`], handing the leader what `to_leader` makes of the
/// follower's key-exchange message.
async fn meet_for_the_relay_passing(
    listener: &TcpListener,
    session: [u8; 16],
    to_leader: impl FnOnce(Vec<u8>) -> Vec<u8>,
) -> (ServerConn, ServerConn, [Hello; 2]) {
    let independent = |_| Mapping::Independent;
    let mut a = arrive(listener, independent).await;
    let mut b = arrive(listener, independent).await;
    let go_a = go(
        b.observed,
        to_leader(b.hello.pake.clone()),
        Role::Leader,
        session,
    );
    let go_b = go(a.observed, a.hello.pake.clone(), Role::Follower, session);
    a.conn.send(go_a).await.expect("go");
    b.conn.send(go_b).await.expect("go");
    let hellos = [a.hello, b.hello];
    let (ca, cb) = timeout(LIMIT, until_both_relay(a.conn, b.conn))
        .await
        .expect("both ask for the relay");
    (ca, cb, hellos)
}

/// Pairs the first two peers, relays their link and injects a forged frame
/// towards the leader when told; then pairs them again, honestly, when both
/// come back to the chat's room. Returns the hellos of the second meeting.
async fn injecting_rendezvous(
    listener: TcpListener,
    inject: oneshot::Receiver<Tamper>,
    hellos: std::sync::mpsc::Sender<Vec<Hello>>,
) {
    let (ca, cb, _) = meet_for_the_relay(&listener, [0x22; 16]).await;
    relay(ca, cb, inject).await;
    // Both come back; meet them again in their room, honestly.
    let (ca, cb, again) = meet_for_the_relay(&listener, [0x33; 16]).await;
    let _ = hellos.send(again.to_vec());
    let (_never, quiet) = oneshot::channel();
    relay(ca, cb, quiet).await;
}

#[test]
fn a_forged_frame_drops_the_link_and_the_chat_resumes() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (listener, server) = listen(&rt);
    let (inject_tx, inject_rx) = oneshot::channel();
    let (hellos_tx, hellos_rx) = std::sync::mpsc::channel();
    rt.spawn(injecting_rendezvous(listener, inject_rx, hellos_tx));
    let code = "6-right-code";
    let mut alice = Peer::spawn(server, "alice", code, &["--punch-timeout", "2"]);
    alice.wait_stderr("waiting for the other side");
    let mut bob = Peer::spawn(server, "bob", code, &["--punch-timeout", "2"]);
    alice.wait_stderr("connected to bob: relayed");
    bob.wait_stderr("connected to alice: relayed");
    alice.send("one\n");
    assert_eq!(bob.recv(), "alice: one");
    bob.send("two\n");
    assert_eq!(alice.recv(), "bob: two");

    // A forged frame towards alice (the leader): her link drops, not her chat.
    inject_tx.send(Tamper::Inject).expect("inject");
    let dropped = alice.wait_stderr("dropped");
    assert!(dropped.contains("failed authentication"), "{dropped}");
    bob.send("three, typed while the link is down\n");
    alice.wait_stderr("link back");
    bob.wait_stderr("link back");
    assert_eq!(alice.recv(), "bob: three, typed while the link is down");
    alice.send("four\n");
    assert_eq!(bob.recv(), "alice: four");
    let hellos = hellos_rx.recv_timeout(LIMIT).expect("second meeting");
    assert!(hellos
        .iter()
        .all(|h| h.pake.is_empty() && h.resume.is_some()));
    assert_eq!(hellos[0].resume, hellos[1].resume);
    alice.close_stdin();
    assert!(alice.wait().success());
    assert!(bob.wait().success());
    assert!(!alice.stderr_seen.iter().any(|l| l.contains("warning")));
}

/// A stranger who joins, learns from the go whether its guess was right (the
/// waiting peer's box opens or not) and then says nothing more: the waiting
/// peer cannot tell a wrong code from a network failure, so it says the code
/// is used up and must not be tried again (each try would be another guess).
#[test]
fn a_silent_stranger_still_uses_up_the_code() {
    use tokio::io::AsyncWriteExt;

    let rv = TestRendezvous::start();
    let mut alice = Peer::spawn(
        rv.addr(),
        "alice",
        "8-right-code",
        &["--punch-timeout", "2"],
    );
    alice.wait_stderr("waiting for the other side");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut stranger = Client::connect(rv.addr()).await;
        let guess =
            KeyExchange::start(&Code::parse("8-wrong-guess").expect("code")).expect("randomness");
        stranger.send_hello("8", &guess.message).await;
        // Wait for the go (and the box), then leave without a word.
        while let Ok(Some(Ok(msg))) = timeout(LIMIT, stranger.next()).await {
            if matches!(msg, ServerToPeer::Sealed(_)) {
                break;
            }
        }
        let mut stream = stranger.into_inner().into_inner();
        let _ = stream.shutdown().await;
    });
    assert!(!alice.wait().success());
    // The relay she then asks for closes at once (the stranger is gone),
    // which reads as a refusal of the code: either way, a new code.
    let said = alice.wait_stderr("peer: ");
    let told = alice.stderr_seen.join("\n").to_lowercase();
    assert!(
        told.contains("start again with a new code"),
        "{said}\n{told}"
    );
}

/// A rendezvous that hands one peer another words commitment than the other
/// peer made (flipping a bit of it, the SPAKE2 message after it intact; it
/// need not know the code) wants the two sides' verification words to be
/// decided by something it chose. The commitments are in the first link's
/// Noise prologue, so the two sides' handshakes no longer match: both refuse
/// the link, neither shows words or takes the chat as up, and neither blames a
/// holder of the code.
#[test]
fn a_rendezvous_that_alters_a_words_commitment_gets_no_chat() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (listener, server) = listen(&rt);
    rt.spawn(async move {
        let altered = |mut pake: Vec<u8>| {
            pake[0] ^= 1;
            pake
        };
        let (ca, cb, _) = meet_for_the_relay_passing(&listener, [0x44; 16], altered).await;
        let (_never, quiet) = oneshot::channel();
        relay(ca, cb, quiet).await;
    });
    let code = "7-right-code";
    let mut alice = Peer::spawn(server, "alice", code, &["--punch-timeout", "2"]);
    alice.wait_stderr("waiting for the other side");
    let mut bob = Peer::spawn(server, "bob", code, &["--punch-timeout", "2"]);
    for side in [&mut alice, &mut bob] {
        assert!(
            !side.wait().success(),
            "{} must refuse the link",
            side.name()
        );
        let said = side.wait_stderr("did not prove it knows the code");
        assert!(said.contains("Start again with a new code"), "{said}");
        assert!(
            !side
                .stderr_seen
                .iter()
                .any(|l| l.contains("code confirmed") || l.contains("commitment")),
            "{:?}",
            side.stderr_seen
        );
    }
}

/// Whatever a rendezvous hands on as the other side's key-exchange message —
/// nothing, too short for a commitment, a commitment alone, a corrupt SPAKE2
/// point, an old protocol's bare SPAKE2 message, a long one — the peer ends
/// with an error (the code used up), never a panic or a hang.
#[test]
fn hostile_key_exchange_messages_in_the_go_end_cleanly() {
    let real = KeyExchange::start(&Code::parse("2-right-code").expect("code"))
        .expect("randomness")
        .message;
    let mut corrupt = real.clone();
    corrupt[40] ^= 0xff;
    // Whether the error names the key-exchange message: a corrupt point may
    // still decode as a point (another key, so the punch fails instead).
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("empty", vec![], true),
        ("31 bytes", vec![7; 31], true),
        ("commitment only", real[..32].to_vec(), true),
        ("commitment and a corrupt point", corrupt, false),
        ("no commitment", real[32..].to_vec(), true),
        ("long", vec![0x53; 4000], true),
    ];
    for (what, pake, named) in cases {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let (listener, server) = listen(&rt);
        rt.spawn(async move {
            let mut a = arrive(&listener, |_| Mapping::Independent).await;
            let nowhere = "127.0.0.1:9".parse().expect("addr");
            a.conn
                .send(go(nowhere, pake, Role::Leader, [1; 16]))
                .await
                .expect("go");
            while let Some(Ok(_)) = a.conn.next().await {}
        });
        let mut p = Peer::spawn(server, "alice", "2-right-code", &["--punch-timeout", "2"]);
        assert!(!p.wait().success(), "{what}");
        p.wait_stderr("must not be used again");
        assert!(
            !named
                || p.stderr_seen
                    .iter()
                    .any(|l| l.contains("key-exchange message")),
            "{what}: {:?}",
            p.stderr_seen
        );
        assert!(
            !p.stderr_seen.iter().any(|l| l.contains("panicked")),
            "{what}: {:?}",
            p.stderr_seen
        );
    }
}

/// A hostile peer in a chat with a code introduces an identity key that is
/// not its own (someone else's, which it learned by chatting with them) or
/// one that proves nothing (zero, a point of low order), and sends a proof
/// it cannot make. The victim started with `--save mallory`: nothing is
/// saved, she is told why, and the chat itself goes on.
mod claimed_identity {
    use super::*;
    use punchline_peer::contacts::{Book, Identity};
    use punchline_peer::secure::{FirstLines, LinkKeys};
    use punchline_proto::{Chat, Go, Introduction, Mapping, PeerInfo, PeerToPeer, Role};
    use tokio_util::codec::FramedParts;

    const SESSION: [u8; 16] = [0x51; 16];

    /// Meets Alice with `code` as the follower, introducing `claimed`, and
    /// says: a proof it made up, a line, goodbye.
    async fn mallory(listener: TcpListener, m1: u16, code: Code, claimed: [u8; 32]) {
        let mut a = arrive(&listener, |_| Mapping::Independent).await;
        let kx = KeyExchange::start(&code).expect("randomness");
        let ours = kx.message.clone();
        let secret = kx.finish(&a.hello.pake).expect("her SPAKE2 message");
        a.conn
            .send(punchline_proto::ServerToPeer::Go(Go {
                peer: PeerInfo {
                    observed: SocketAddr::from(([127, 0, 0, 1], m1)),
                    mapping: Mapping::Independent,
                    pake: ours,
                    other_family: None,
                    mapped: None,
                },
                role: Role::Leader,
                session: SESSION,
                others_go_after_us: 0,
            }))
            .await
            .expect("go");
        let keys = LinkKeys {
            secret,
            ours: Introduction {
                name: "mallory".into(),
                chat_role: Role::Follower,
                words_nonce: [0; 32],
                first_lines: Vec::new(),
                identity: claimed,
            },
            words: None,
            first_lines: FirstLines::default(),
            shows_first_lines: None,
        };
        let hs = keys
            .handshake(Role::Follower, &link_token(&SESSION))
            .expect("handshake");
        let link = common::fake::pose(
            common::fake::punch(m1, a.observed).await,
            SESSION,
            Role::Follower,
        )
        .await;
        // The same frames, over the stream type the library's link takes
        // (keeping whatever was read ahead).
        let parts = link.into_parts();
        let mut moved = FramedParts::new::<PeerToPeer>(LinkStream::Tcp(parts.io), parts.codec);
        moved.read_buf = parts.read_buf;
        moved.write_buf = parts.write_buf;
        let mut link = SecureLink::over(Framed::from_parts(moved), hs)
            .await
            .expect("the handshake passes: the code is right");
        for msg in [
            Chat::Proof { mac: [0x77; 32] },
            Chat::Line {
                seq: 1,
                text: "trust me".into(),
            },
            Chat::Bye,
        ] {
            link.send(&msg).await.expect("send");
        }
        // Until Alice answers the goodbye and closes.
        while link.recv().await.is_some() {}
        while let Some(Ok(_)) = a.conn.next().await {}
    }

    fn claims(claimed: [u8; 32], told: &str) {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let (listener, server) = listen(&rt);
        let m1 = free_port();
        let code = "8-claimed-key";
        let run = rt.spawn(mallory(
            listener,
            m1,
            Code::parse(code).expect("code"),
            claimed,
        ));
        let config = fresh_config("claimed");
        let mut cmd = peer_command(server, "alice", code, &["--save", "mallory"]);
        cmd.env("XDG_CONFIG_HOME", &config);
        let mut alice = Peer::spawn_command(cmd, "alice");
        assert_eq!(alice.recv(), "mallory: trust me", "the chat goes on");
        let said = alice.wait_stderr("not saved: ");
        assert!(said.contains(told), "{said}");
        assert!(alice.wait().success());
        rt.block_on(async { timeout(LIMIT, run).await })
            .expect("in time")
            .expect("mallory");
        assert!(
            Book::load(&config.join("punchline"))
                .expect("contacts")
                .contacts
                .is_empty(),
            "mallory was saved"
        );
        assert!(!alice
            .stderr_seen
            .iter()
            .any(|l| l.contains("saved as contact")));
    }

    #[test]
    fn someone_elses_key_is_not_saved() {
        let bob = Identity::generate().expect("bob").public();
        claims(
            bob,
            "could not prove it holds the identity key it introduced",
        );
    }

    #[test]
    fn a_key_that_proves_nothing_is_not_saved() {
        claims([0; 32], "introduced an identity key that proves nothing");
    }
}
