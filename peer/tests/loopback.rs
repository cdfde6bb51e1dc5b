//! Two real `peer` processes and a rendezvous on loopback: the whole user path,
//! from meeting to chatting to leaving, over real kernel TCP.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

use common::*;
use punchline_proto::codec::encode_payload;
use punchline_proto::{FrameCodec, Hello, PeerToServer, ServerToPeer, PROTOCOL_VERSION};

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Starts two peers with fixed ports and waits until both report the direct link.
fn pair(rv: &Rendezvous, code: &str, extra_a: &[&str], extra_b: &[&str]) -> (Peer, Peer, u16, u16) {
    let (pa, pb) = (free_port(), free_port());
    let port_a = pa.to_string();
    let port_b = pb.to_string();
    let mut args_a = vec!["--port", port_a.as_str()];
    args_a.extend_from_slice(extra_a);
    let mut args_b = vec!["--port", port_b.as_str()];
    args_b.extend_from_slice(extra_b);
    let mut a = Peer::spawn(rv.addr, "alice", code, &args_a);
    a.wait_stderr("waiting for the other side");
    let mut b = Peer::spawn(rv.addr, "bob", code, &args_b);
    a.wait_stderr("connected to bob");
    b.wait_stderr("connected to alice");
    (a, b, pa, pb)
}

#[test]
fn two_peers_punch_a_direct_link_and_chat_both_ways() {
    let rv = Rendezvous::start();
    let (mut a, mut b, pa, pb) = pair(&rv, "7-guitar-orbit", &[], &[]);

    // The status line names the other, the address, the candidate, time, attempts.
    let status = a.wait_stderr("connected to bob");
    assert!(
        status.contains(&format!("direct link to 127.0.0.1:{pb} (public address)")),
        "{status}"
    );
    assert!(
        status.contains("ms after go") && status.contains("attempt"),
        "{status}"
    );

    // The link joins the two fixed ports, and nothing listens on either of them.
    let sockets = tcp_sockets();
    let established = |from: u16, to: u16| {
        sockets.iter().any(|s| {
            s.state == TCP_ESTABLISHED && s.local == loopback(from) && s.remote == loopback(to)
        })
    };
    assert!(
        established(pa, pb),
        "no established socket {pa} -> {pb}: {sockets:#?}"
    );
    assert!(established(pb, pa), "no established socket {pb} -> {pa}");
    assert!(
        !sockets
            .iter()
            .any(|s| s.state == TCP_LISTEN && (s.local.port() == pa || s.local.port() == pb)),
        "a socket listens on a peer port: {sockets:#?}"
    );
    // Exactly one connection between the two ports survived the punch.
    let links = sockets
        .iter()
        .filter(|s| s.local.port() == pa && s.remote.port() == pb)
        .count();
    assert_eq!(links, 1, "{sockets:#?}");

    // Lines both ways, in order.
    a.send("hello bob\nhow are you?\n");
    b.send("hi alice\n");
    assert_eq!(b.recv(), "alice: hello bob");
    assert_eq!(b.recv(), "alice: how are you?");
    assert_eq!(a.recv(), "bob: hi alice");
    b.send("fine\n");
    assert_eq!(a.recv(), "bob: fine");

    // Text from the other side cannot drive the terminal.
    a.send("\x1b[2Jcleared?\n");
    assert_eq!(b.recv(), "alice: \u{FFFD}[2Jcleared?");

    // End of input: alice leaves, everything delivered; bob is told and exits too.
    a.close_stdin();
    assert!(a.wait().success(), "alice: {:#?}", a.stderr_seen);
    assert!(b.wait().success(), "bob: {:#?}", b.stderr_seen);
    b.wait_stderr("alice left");
    a.wait_stderr("all delivered");
}

#[test]
fn a_thousand_piped_lines_arrive_complete_and_in_order_each_way() {
    let rv = Rendezvous::start();
    let (mut a, mut b, _, _) = pair(&rv, "thousand", &[], &[]);
    const N: usize = 1000;
    let text = |who: &str| -> String { (0..N).map(|i| format!("{who} line {i}\n")).collect() };
    a.send(&text("a"));
    b.send(&text("b"));
    for i in 0..N {
        assert_eq!(b.recv(), format!("alice: a line {i}"));
    }
    for i in 0..N {
        assert_eq!(a.recv(), format!("bob: b line {i}"));
    }
    b.close_stdin();
    assert!(b.wait().success(), "bob: {:#?}", b.stderr_seen);
    assert!(a.wait().success(), "alice: {:#?}", a.stderr_seen);
    b.wait_stderr(&format!("{N} lines sent, {N} received, all delivered"));
}

#[test]
fn lines_typed_before_end_of_input_are_all_delivered() {
    // Alice's whole input is there at once and ends: she exits 0 only after bob
    // confirmed receiving every line.
    let rv = Rendezvous::start();
    let (pa, pb) = (free_port().to_string(), free_port().to_string());
    let mut b = Peer::spawn(rv.addr, "bob", "burst", &["--port", &pb]);
    b.wait_stderr("waiting for the other side");
    let mut a = Peer::spawn(rv.addr, "alice", "burst", &["--port", &pa]);
    let text: String = (0..300).map(|i| format!("burst {i}\n")).collect();
    a.send(&text);
    a.close_stdin();
    assert!(a.wait().success(), "alice: {:#?}", a.stderr_seen);
    let mut got = Vec::new();
    while got.len() < 300 {
        got.push(b.recv());
    }
    let want: Vec<String> = (0..300).map(|i| format!("alice: burst {i}")).collect();
    assert_eq!(got, want);
    assert!(b.wait().success());
    b.wait_stderr("alice left");
}

#[test]
fn a_third_peer_on_a_full_code_gets_a_clear_error() {
    // Two peers paired on the code and still punching (protocol-level clients that
    // hold their rendezvous connections open after the go): the code is in use.
    let rv = Rendezvous::start();
    let mut first = raw_hello(rv.addr, "9-full-room", "alice");
    let mut second = raw_hello(rv.addr, "9-full-room", "bob");
    wait_for_go(&mut first);
    wait_for_go(&mut second);
    let mut c = Peer::spawn(rv.addr, "carol", "9-full-room", &[]);
    let status = c.wait();
    assert!(!status.success());
    let line = c.wait_stderr("already in use");
    assert!(line.contains("9-full-room"), "{line}");
    // Once the pair is done with the rendezvous, the code is free again.
    drop((first, second));
    let (mut a, mut b, _, _) = pair(&rv, "9-full-room", &[], &[]);
    a.send("our turn\n");
    assert_eq!(b.recv(), "alice: our turn");
}

/// Says hello on the protocol directly; returns the connection after the welcome.
fn raw_hello(server: SocketAddr, code: &str, name: &str) -> TcpStream {
    let mut s = TcpStream::connect(server).expect("connect");
    let hello = PeerToServer::Hello(Hello {
        version: PROTOCOL_VERSION,
        code: code.into(),
        name: name.into(),
        candidates: vec![],
        probe_observed: None,
    });
    write_frame(&mut s, &encode_payload(&hello).expect("encode"));
    assert!(matches!(read_frame(&mut s), ServerToPeer::Welcome { .. }));
    s
}

/// Reads frames (ignoring pings) until the go.
fn wait_for_go(s: &mut TcpStream) {
    loop {
        match read_frame(s) {
            ServerToPeer::Ping { .. } => {}
            ServerToPeer::Go(_) => return,
            other => panic!("expected the go, got {other:?}"),
        }
    }
}

fn read_frame(s: &mut TcpStream) -> ServerToPeer {
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut len = [0u8; 4];
    s.read_exact(&mut len).expect("frame length");
    let mut payload = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut payload).expect("frame payload");
    punchline_proto::codec::decode_payload(&payload).expect("valid frame")
}

#[test]
fn wrong_candidates_are_recognised_and_dropped() {
    // Alice announces two extra candidates: bob's own address (bob's attempt there
    // is a self-connect: his SYN loops back onto his own socket) and a stranger
    // that answers with garbage. Bob must end up on alice's real address.
    let rv = Rendezvous::start();
    let stranger = TcpListener::bind("127.0.0.1:0").expect("bind stranger");
    let stranger_addr = stranger.local_addr().expect("addr");
    thread::spawn(move || {
        for conn in stranger.incoming() {
            let Ok(mut conn) = conn else { return };
            let _ = conn.write_all(&[0, 0, 0, 5, 0xde, 0xad, 0xbe, 0xef, 0x99]);
            thread::sleep(Duration::from_millis(500));
        }
    });
    let (pa, pb) = (free_port(), free_port());
    let self_candidate = loopback(pb).to_string();
    let stranger_candidate = stranger_addr.to_string();
    let mut a = Peer::spawn(
        rv.addr,
        "alice",
        "decoys",
        &[
            "--port",
            &pa.to_string(),
            "--candidate",
            &self_candidate,
            "--candidate",
            &stranger_candidate,
        ],
    );
    a.wait_stderr("waiting for the other side");
    let mut cmd = peer_command(rv.addr, "bob", "decoys", &["--port", &pb.to_string()]);
    cmd.env("RUST_LOG", "punchline_peer=debug");
    let mut b = Peer::spawn_command(cmd, "bob");
    let status = b.wait_stderr("connected to alice");
    assert!(
        status.contains(&format!("direct link to 127.0.0.1:{pa} (public address)")),
        "{status}"
    );
    b.wait_stderr("the link loops back to this peer");
    a.send("through the right door\n");
    assert_eq!(b.recv(), "alice: through the right door");
    b.send("indeed\n");
    assert_eq!(a.recv(), "bob: indeed");
    b.close_stdin();
    assert!(b.wait().success());
    assert!(a.wait().success());
}

#[test]
fn bad_clients_are_rejected_while_another_pair_chats() {
    let rv = Rendezvous::start();
    let (mut a, mut b, _, _) = pair(&rv, "busy-day", &[], &[]);

    // Garbage: the server answers with an error message and closes.
    let mut garbage = TcpStream::connect(rv.addr).expect("connect");
    garbage
        .write_all(&[0, 0, 0, 3, 0xff, 0xfe, 0xfd])
        .expect("write");
    let (code, message) = read_error(&mut garbage);
    assert_eq!(
        code,
        punchline_proto::ErrorCode::Malformed.to_u16(),
        "{message}"
    );

    // A length prefix of 4 GiB: refused without buffering, connection closed.
    let mut huge = TcpStream::connect(rv.addr).expect("connect");
    huge.write_all(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3])
        .expect("write");
    let (code, _) = read_error(&mut huge);
    assert_eq!(code, punchline_proto::ErrorCode::Malformed.to_u16());

    // A peer of another protocol version gets a version error it can show.
    let mut other = TcpStream::connect(rv.addr).expect("connect");
    let hello = PeerToServer::Hello(Hello {
        version: PROTOCOL_VERSION + 1,
        code: "busy-day".into(),
        name: "mallory".into(),
        candidates: vec![],
        probe_observed: None,
    });
    write_frame(&mut other, &encode_payload(&hello).expect("encode"));
    let (code, message) = read_error(&mut other);
    assert_eq!(code, punchline_proto::ErrorCode::VersionMismatch.to_u16());
    assert!(message.contains("version"), "{message}");

    // A future hello whose fields this version cannot even parse: still a version error.
    let mut future = TcpStream::connect(rv.addr).expect("connect");
    write_frame(
        &mut future,
        &encode_payload(&(0u32, 9u16, [0xffu8; 5])).expect("encode"),
    );
    let (code, _) = read_error(&mut future);
    assert_eq!(code, punchline_proto::ErrorCode::VersionMismatch.to_u16());

    // The pair still chats, and a new pair can still meet.
    a.send("unbothered\n");
    assert_eq!(b.recv(), "alice: unbothered");
    let (mut c, mut d, _, _) = pair(&rv, "second-pair", &[], &[]);
    c.send("we met too\n");
    assert_eq!(d.recv(), "alice: we met too");
}

#[test]
fn an_unreachable_rendezvous_is_a_clear_error() {
    let closed = loopback(free_port());
    let mut p = Peer::spawn(closed, "alice", "nobody-home", &[]);
    assert!(!p.wait().success());
    p.wait_stderr("cannot reach the rendezvous");
    p.wait_stderr(&closed.to_string());
}

#[test]
fn an_invalid_code_is_refused_before_connecting() {
    let rv = Rendezvous::start();
    let mut p = Peer::spawn(rv.addr, "alice", "no spaces/allowed", &[]);
    assert!(!p.wait().success());
    p.wait_stderr("invalid code");
}

fn write_frame(s: &mut TcpStream, payload: &[u8]) {
    let len = u32::try_from(payload.len()).expect("small");
    s.write_all(&len.to_be_bytes()).expect("write");
    s.write_all(payload).expect("write");
}

/// Reads the server's error frame, then checks the server closed the connection.
fn read_error(s: &mut TcpStream) -> (u16, String) {
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut all = Vec::new();
    s.read_to_end(&mut all)
        .expect("server closes the connection");
    let mut buf = bytes::BytesMut::from(&all[..]);
    let mut codec = FrameCodec::<ServerToPeer, ()>::new();
    use tokio_util::codec::Decoder;
    match codec.decode(&mut buf) {
        Ok(Some(ServerToPeer::Error { code, message })) => (code, message),
        other => panic!("expected an error frame, got {other:?} from {all:?}"),
    }
}
