//! A man-in-the-middle rendezvous cannot read or alter the chat.
//!
//! The fake rendezvous below does everything a malicious operator could: it tells
//! each peer that the other is at an address of its own, answers each peer's
//! SPAKE2 message with its own (made with a guessed code), punches a link to each
//! peer, passes the link checks (it issued the session tokens and roles), and
//! relays between the two links. Both peers must refuse to chat, with the
//! wrong-code message, and nothing typed may reach the man in the middle.

mod common;

use std::net::SocketAddr;
use std::thread;
use std::time::Duration;

use common::fake::{arrive, listen, pose, punch, LinkConn};
use common::*;
use futures::{SinkExt, StreamExt};
use punchline_peer::secure::KeyExchange;
use punchline_proto::codes::Code;
use punchline_proto::{Go, Mapping, PeerInfo, PeerToPeer, Role, ServerToPeer};
use tokio::net::TcpListener;
use tokio::time::timeout;

const LIMIT: Duration = Duration::from_secs(15);

/// Relays frames both ways until either side closes; returns every payload byte
/// that came from `a`.
async fn relay(mut a: LinkConn, mut b: LinkConn) -> Vec<u8> {
    let mut from_a = Vec::new();
    loop {
        tokio::select! {
            msg = a.next() => match msg {
                Some(Ok(m)) => {
                    if let PeerToPeer::Handshake(bytes) | PeerToPeer::Sealed(bytes) = &m {
                        from_a.extend_from_slice(bytes);
                    }
                    if b.send(m).await.is_err() { break; }
                }
                _ => break,
            },
            msg = b.next() => match msg {
                Some(Ok(m)) => if a.send(m).await.is_err() { break; },
                _ => break,
            },
        }
    }
    from_a
}

async fn man_in_the_middle(listener: TcpListener, m1: u16, m2: u16) -> Vec<u8> {
    let mut alice = arrive(&listener, |_| Mapping::Unknown).await;
    let mut bob = arrive(&listener, |_| Mapping::Unknown).await;
    // SPAKE2 with each side under a guessed code.
    let guess = Code::parse("1-guess-wrong").expect("code");
    let here = |port| SocketAddr::from(([127, 0, 0, 1], port));
    let go = |_name: &str, at: u16, role, session| {
        ServerToPeer::Go(Go {
            peer: PeerInfo {
                observed: here(at),
                mapping: Mapping::Independent,
                pake: KeyExchange::start(&guess).expect("randomness").message,
                other_family: None,
                mapped: None,
            },
            role,
            session,
            others_go_after_us: 0,
        })
    };
    let (s1, s2) = ([1u8; 16], [2u8; 16]);
    alice
        .conn
        .send(go("bob", m1, Role::Leader, s1))
        .await
        .expect("go");
    bob.conn
        .send(go("alice", m2, Role::Follower, s2))
        .await
        .expect("go");
    let (to_alice, to_bob) = tokio::join!(punch(m1, alice.observed), punch(m2, bob.observed));
    let (to_alice, to_bob) = tokio::join!(
        pose(to_alice, s1, Role::Follower),
        pose(to_bob, s2, Role::Leader)
    );
    relay(to_alice, to_bob).await
}

#[test]
fn a_man_in_the_middle_cannot_read_or_join_the_chat() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (listener, server) = listen(&rt);
    let (m1, m2) = (free_port(), free_port());
    let mitm =
        rt.spawn(async move { timeout(LIMIT * 2, man_in_the_middle(listener, m1, m2)).await });

    let code = "1-right-code";
    let mut alice = Peer::spawn(server, "alice", code, &[]);
    alice.send("top secret line\n");
    alice.wait_stderr("waiting for the other side");
    thread::sleep(Duration::from_millis(100));
    let mut bob = Peer::spawn(server, "bob", code, &[]);
    bob.send("another secret\n");
    for p in [&mut alice, &mut bob] {
        assert!(!p.wait().success(), "{} must refuse the link", p.name());
        p.wait_stderr("did not prove it knows the code");
    }
    assert_eq!(alice.rest_of_stdout(), Vec::<String>::new());
    assert_eq!(bob.rest_of_stdout(), Vec::<String>::new());

    let seen = rt
        .block_on(mitm)
        .expect("mitm task")
        .expect("mitm finished in time");
    assert!(!seen.is_empty(), "the relay carried the handshake");
    let contains = |needle: &[u8]| seen.windows(needle.len()).any(|w| w == needle);
    assert!(
        !contains(b"secret"),
        "a typed line reached the man in the middle"
    );
}
