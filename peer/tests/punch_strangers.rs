//! The handshake runs inside the punch, on every candidate link: what someone
//! else at a candidate address can do to it. A stranger at one of the other
//! side's LAN addresses (two homes that share a private range) answers the
//! connection, reflects our own link hello with the other role, and sends
//! whatever it likes. It must not end the punch or take the place of the
//! other peer, and a replayed handshake message must not authenticate.
//! Loopback only: the punches dial 127.0.0.1.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use punchline_peer::error::PeerError;
use punchline_peer::punch::{link_token, punch, PunchParams, Punched};
use punchline_peer::secure::{KeyExchange, LinkKeys, Secret};
use punchline_proto::codes::Code;
use punchline_proto::pacing::RetryPolicy;
use punchline_proto::{
    FrameCodec, Go, Introduction, Mapping, PeerInfo, PeerToPeer, Role, SessionToken,
    PROTOCOL_VERSION,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::time::{timeout, Instant};
use tokio_util::codec::Framed;

type Conn = Framed<TcpStream, FrameCodec<PeerToPeer, PeerToPeer>>;

const SESSION: SessionToken = [9; 16];
const LIMIT: Duration = Duration::from_secs(20);

/// Keys of a later link of a chat (its secret, not a code), in `chat_role`.
fn keys(chat_role: Role) -> Arc<LinkKeys> {
    Arc::new(LinkKeys {
        secret: Secret::from_key([5; 32]),
        ours: Introduction {
            name: format!("{chat_role}"),
            chat_role,
            words_nonce: [0; 32],
            first_lines: Vec::new(),
            identity: [0; 32],
        },
        words: None,
        first_lines: Default::default(),
        shows_first_lines: None,
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn params(port: u16) -> PunchParams {
    PunchParams {
        local_port: port,
        deadline: Duration::from_secs(5),
        our_observed: SocketAddr::from(([127, 0, 0, 1], port)),
        server: "127.0.0.1:7425".parse().expect("addr"),
        our_mapping: Mapping::Independent,
        policy: RetryPolicy::Adaptive,
        server_rtt: None,
        our_other_family: None,
        mapped: None,
    }
}

fn go(role: Role, observed: SocketAddr, session: SessionToken) -> Go {
    Go {
        peer: PeerInfo {
            observed,
            mapping: Mapping::Independent,
            pake: Vec::new(),
            other_family: None,
            mapped: None,
        },
        role,
        session,
        others_go_after_us: 0,
    }
}

/// A stranger listening at a candidate address: it learns the link token
/// from the victim's own hello, reflects it with the other role, then sends
/// `then` and holds the connection until the victim drops it.
async fn stranger(listener: TcpListener, then: Vec<PeerToPeer>) -> Vec<PeerToPeer> {
    let (stream, _) = listener.accept().await.expect("accept");
    let mut conn: Conn = Framed::new(stream, FrameCodec::new());
    let Some(Ok(PeerToPeer::LinkHello { session, role, .. })) = conn.next().await else {
        panic!("no link hello from the victim");
    };
    conn.send(PeerToPeer::LinkHello {
        version: PROTOCOL_VERSION,
        session,
        role: role.other(),
    })
    .await
    .expect("hello");
    for frame in then {
        conn.send(frame).await.expect("frame");
    }
    let mut got = Vec::new();
    while let Ok(Some(Ok(frame))) = timeout(LIMIT, conn.next()).await {
        got.push(frame);
    }
    got
}

/// The stranger's extra candidate, given to the victim as the other side's
/// LAN address (it arrives at once).
fn late(addr: SocketAddr) -> oneshot::Receiver<Vec<SocketAddr>> {
    let (tx, rx) = oneshot::channel();
    tx.send(vec![addr]).expect("late");
    rx
}

async fn listening() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let at = listener.local_addr().expect("addr");
    (listener, at)
}

/// Both peers of a meeting punch on loopback, with a stranger (sending
/// `then`) among the `victim`'s candidates; returns both punches and the
/// other peer's address.
async fn meeting_with_a_stranger(
    victim: Role,
    then: Vec<PeerToPeer>,
) -> (
    Result<Punched, PeerError>,
    Result<Punched, PeerError>,
    SocketAddr,
) {
    let (listener, at) = listening().await;
    let strange = tokio::spawn(stranger(listener, then));
    let (pv, po) = (free_port(), free_port());
    let local = |p| SocketAddr::from(([127, 0, 0, 1], p));
    let (none_tx, none) = oneshot::channel();
    drop(none_tx);
    let (go_v, go_o) = (
        go(victim, local(po), SESSION),
        go(victim.other(), local(pv), SESSION),
    );
    let (params_v, params_o) = (params(pv), params(po));
    let ours = punch(&go_v, &params_v, keys(victim), Instant::now(), late(at));
    let theirs = punch(&go_o, &params_o, keys(victim.other()), Instant::now(), none);
    let both = timeout(LIMIT, async { tokio::join!(ours, theirs) })
        .await
        .expect("punches end");
    strange.abort();
    (both.0, both.1, local(po))
}

/// The victim punches, in link role `role`, with the stranger at `at` as the
/// other side's only address (no other peer, no late candidates).
async fn alone_with(role: Role, at: SocketAddr, deadline: Duration) -> Result<Punched, PeerError> {
    let (tx, none) = oneshot::channel();
    drop(tx);
    punch(
        &go(role, at, SESSION),
        &PunchParams {
            deadline,
            ..params(free_port())
        },
        keys(role),
        Instant::now(),
        none,
    )
    .await
}

fn kept(r: &Result<Punched, PeerError>) -> SocketAddr {
    match r {
        Ok(p) => p.remote,
        Err(e) => panic!("no link: {e}"),
    }
}

#[tokio::test]
async fn a_stranger_that_refuses_the_followers_link_does_not_end_the_punch() {
    // Garbage where the leader's first handshake message is due.
    let (victim, leader, other) =
        meeting_with_a_stranger(Role::Follower, vec![PeerToPeer::Handshake(vec![0; 48])]).await;
    assert_eq!(kept(&victim), other, "the victim kept the stranger's link");
    kept(&leader);
    assert_eq!(
        victim.expect("victim").link.their_introduction().chat_role,
        Role::Leader
    );
}

#[tokio::test]
async fn a_stranger_that_refuses_the_leaders_link_does_not_end_the_punch() {
    // Garbage where the follower's answer is due.
    let (victim, follower, other) =
        meeting_with_a_stranger(Role::Leader, vec![PeerToPeer::Handshake(vec![0; 48])]).await;
    assert_eq!(kept(&victim), other, "the victim kept the stranger's link");
    kept(&follower);
    let victim = victim.expect("victim");
    assert_eq!(victim.link.their_introduction().chat_role, Role::Follower);
}

#[tokio::test]
async fn a_first_message_replayed_from_another_meeting_does_not_authenticate() {
    // Recorded where the victim's other side led an earlier meeting of the
    // same chat (same key): it answers nothing in this one.
    let recorded = keys(Role::Leader)
        .handshake(Role::Leader, &link_token(&[1; 16]))
        .expect("handshake")
        .write()
        .expect("message");
    let (listener, at) = listening().await;
    let strange = tokio::spawn(stranger(listener, vec![recorded]));
    let started = Instant::now();
    let r = alone_with(Role::Follower, at, Duration::from_secs(5)).await;
    // The victim kept no link to the stranger, and answered nothing.
    assert!(
        matches!(r, Err(PeerError::NotAuthenticated(_))),
        "{:?}",
        r.map(|p| p.remote)
    );
    assert!(started.elapsed() < Duration::from_secs(4));
    let got = timeout(LIMIT, strange).await.expect("ends").expect("task");
    assert!(
        !got.iter().any(|f| matches!(f, PeerToPeer::Handshake(_))),
        "answered the replay: {got:?}"
    );
}

#[tokio::test]
async fn our_own_first_message_reflected_is_not_a_peer_and_leaves_the_punch_relayable() {
    // What this peer would send as the link's leader in this very meeting,
    // reflected back to it as follower.
    let own = keys(Role::Follower)
        .handshake(Role::Leader, &link_token(&SESSION))
        .expect("handshake")
        .write()
        .expect("message");
    let (listener, at) = listening().await;
    let strange = tokio::spawn(stranger(listener, vec![own]));
    let r = alone_with(Role::Follower, at, Duration::from_secs(5)).await;
    strange.abort();
    let Err(PeerError::PunchFailed { failure, .. }) = r else {
        panic!("not a plain punch failure: {:?}", r.map(|p| p.remote));
    };
    assert!(
        failure.tried.iter().any(|t| t.tally.rejected.is_some()),
        "the reflected link is not counted as rejected"
    );
}

#[tokio::test]
async fn a_link_closed_in_the_handshake_leaves_the_punch_relayable() {
    let (listener, at) = listening().await;
    let strange = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.expect("accept");
        let mut conn: Conn = Framed::new(stream, FrameCodec::new());
        if let Some(Ok(PeerToPeer::LinkHello { session, role, .. })) = conn.next().await {
            let _ = conn
                .send(PeerToPeer::LinkHello {
                    version: PROTOCOL_VERSION,
                    session,
                    role: role.other(),
                })
                .await;
        }
        // Closes before any answer.
    });
    let r = alone_with(Role::Leader, at, Duration::from_secs(2)).await;
    let _ = strange.await;
    assert!(
        matches!(r, Err(PeerError::PunchFailed { .. })),
        "{:?}",
        r.map(|p| p.remote)
    );
}

/// Keys of a first link, from one code, for the two sides.
fn code_keys() -> (Arc<LinkKeys>, Arc<LinkKeys>) {
    let code = Code::parse("7-guitar-orbit").expect("code");
    let (a, b) = (
        KeyExchange::start(&code).expect("randomness"),
        KeyExchange::start(&code).expect("randomness"),
    );
    let (ma, mb) = (a.message.clone(), b.message.clone());
    let side = |secret, chat_role| {
        Arc::new(LinkKeys {
            secret,
            ours: Introduction {
                name: format!("{chat_role}"),
                chat_role,
                words_nonce: [0; 32],
                first_lines: Vec::new(),
                identity: [0; 32],
            },
            words: None,
            first_lines: Default::default(),
            shows_first_lines: None,
        })
    };
    (
        side(a.finish(&mb).expect("a"), Role::Leader),
        side(b.finish(&ma).expect("b"), Role::Follower),
    )
}

#[tokio::test]
async fn on_a_first_link_a_refusal_at_a_lan_candidate_is_no_wrong_code() {
    // The stranger refuses at once; the other peer starts punching 1.5 s
    // later, past the grace a refusal at its public address would get.
    let (listener, at) = listening().await;
    let strange = tokio::spawn(stranger(listener, vec![PeerToPeer::Handshake(vec![0; 48])]));
    let (lead_keys, follow_keys) = code_keys();
    let (pv, po) = (free_port(), free_port());
    let local = |p| SocketAddr::from(([127, 0, 0, 1], p));
    let (go_v, go_o) = (
        go(Role::Follower, local(po), SESSION),
        go(Role::Leader, local(pv), SESSION),
    );
    let (params_v, params_o) = (params(pv), params(po));
    let (tx, none) = oneshot::channel();
    drop(tx);
    let victim = punch(&go_v, &params_v, follow_keys, Instant::now(), late(at));
    let other = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        punch(&go_o, &params_o, lead_keys, Instant::now(), none).await
    };
    let (victim, other) = timeout(LIMIT, async { tokio::join!(victim, other) })
        .await
        .expect("punches end");
    strange.abort();
    assert_eq!(
        kept(&victim),
        local(po),
        "the victim kept no link to its peer"
    );
    kept(&other);
}

#[tokio::test]
async fn on_a_first_link_a_close_at_a_lan_candidate_leaves_the_punch_relayable() {
    let (listener, at) = listening().await;
    let strange = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.expect("accept");
        let mut conn: Conn = Framed::new(stream, FrameCodec::new());
        if let Some(Ok(PeerToPeer::LinkHello { session, role, .. })) = conn.next().await {
            let _ = conn
                .send(PeerToPeer::LinkHello {
                    version: PROTOCOL_VERSION,
                    session,
                    role: role.other(),
                })
                .await;
        }
    });
    let (lead_keys, _) = code_keys();
    // The other side's public address answers nothing (a closed port).
    let nowhere = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let r = punch(
        &go(Role::Leader, nowhere, SESSION),
        &PunchParams {
            deadline: Duration::from_secs(2),
            ..params(free_port())
        },
        lead_keys,
        Instant::now(),
        late(at),
    )
    .await;
    let _ = strange.await;
    assert!(
        matches!(r, Err(PeerError::PunchFailed { .. })),
        "{:?}",
        r.map(|p| p.remote)
    );
}
