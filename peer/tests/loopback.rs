//! Two real `peer` processes and a rendezvous on loopback: the whole user path,
//! from meeting to chatting to leaving, over real kernel TCP.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::thread;
use std::time::Duration;

use common::*;
use punchline_proto::codec::encode_payload;
use punchline_proto::{ErrorCode, Hello, PeerToServer, PROTOCOL_VERSION};
use punchline_testkit::{hello, refusal, Client, TestRendezvous};

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Starts two peers with fixed ports and waits until both report the direct link.
fn pair(
    rv: &TestRendezvous,
    code: &str,
    extra_a: &[&str],
    extra_b: &[&str],
) -> (Peer, Peer, u16, u16) {
    let (pa, pb) = (free_port(), free_port());
    let port_a = pa.to_string();
    let port_b = pb.to_string();
    let mut args_a = vec!["--port", port_a.as_str()];
    args_a.extend_from_slice(extra_a);
    let mut args_b = vec!["--port", port_b.as_str()];
    args_b.extend_from_slice(extra_b);
    let mut a = Peer::spawn(rv.addr(), "alice", code, &args_a);
    a.wait_stderr("waiting for the other side");
    let mut b = Peer::spawn(rv.addr(), "bob", code, &args_b);
    a.wait_stderr("connected to bob");
    b.wait_stderr("connected to alice");
    (a, b, pa, pb)
}

#[test]
fn two_peers_punch_a_direct_link_and_chat_both_ways() {
    let rv = TestRendezvous::start();
    let (mut a, mut b, pa, pb) = pair(&rv, "7-guitar-orbit", &[], &[]);

    // The status line names the other, the address, the candidate, time, attempts.
    let status = a.wait_stderr("connected to bob");
    assert!(
        status.contains(&format!(
            "direct link to 127.0.0.1:{pb} (IPv4, public address)"
        )),
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
    let rv = TestRendezvous::start();
    let (mut a, mut b, _, _) = pair(&rv, "2-thousand-lines", &[], &[]);
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
    let rv = TestRendezvous::start();
    let (pa, pb) = (free_port().to_string(), free_port().to_string());
    let mut b = Peer::spawn(rv.addr(), "bob", "3-burst-lines", &["--port", &pb]);
    b.wait_stderr("waiting for the other side");
    let mut a = Peer::spawn(rv.addr(), "alice", "3-burst-lines", &["--port", &pa]);
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

/// Lines given before the link is up: the leader's ride in its first
/// handshake message, the follower's in a sealed box behind its link hello;
/// each side shows them as soon as they arrive, and never again when the
/// session sends what follows; all in order, before anything typed later.
#[test]
fn lines_typed_before_the_link_is_up_arrive_once_and_in_order() {
    let rv = TestRendezvous::start();
    let code = "9-early-lines";
    let logged = |name: &str| {
        let mut cmd = peer_command(rv.addr(), name, code, &[]);
        cmd.env("RUST_LOG", "punchline_peer=info");
        Peer::spawn_command(cmd, name)
    };
    let mut a = logged("alice");
    a.send("early one\nearly two\n");
    a.wait_stderr("waiting for the other side");
    let mut b = logged("bob");
    b.send("bob early\n");
    // Alice came first: she leads, and her first message carried both lines.
    let secured = a.wait_stderr("encrypted");
    assert!(secured.contains("carried=2"), "{secured}");
    // Bob's box is a preview (it lies outside the handshake, whoever carries
    // the link could drop it): his lines count as sent only after it.
    let secured = b.wait_stderr("encrypted");
    assert!(secured.contains("carried=0"), "{secured}");
    assert_eq!(b.recv(), "alice: early one");
    assert_eq!(b.recv(), "alice: early two");
    assert_eq!(a.recv(), "bob: bob early");
    a.send("later\n");
    assert_eq!(b.recv(), "alice: later");
    a.close_stdin();
    assert!(a.wait().success());
    assert!(b.wait().success());
    // Nothing shown twice.
    assert!(b.rest_of_stdout().is_empty());
    assert!(a.rest_of_stdout().is_empty());
}

#[test]
fn a_third_peer_on_a_full_code_gets_a_clear_error() {
    // Two peers paired on the code and still punching (protocol-level clients that
    // hold their rendezvous connections open after the go): the code is in use.
    let rv = TestRendezvous::start();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (first, second) = rt.block_on(async {
        let mut first = Client::connect(rv.addr()).await;
        first.send_hello("9", b"").await;
        first.welcome().await;
        let mut second = Client::connect(rv.addr()).await;
        second.send_hello("9", b"").await;
        second.welcome().await;
        first.go().await;
        second.go().await;
        (first, second)
    });
    let mut c = Peer::spawn(rv.addr(), "carol", "9-full-room", &[]);
    let status = c.wait();
    assert!(!status.success());
    c.wait_stderr("already in use");
    // Once the pair is done with the rendezvous, the code is free again.
    drop((first, second));
    let (mut a, mut b, _, _) = pair(&rv, "9-full-room", &[], &[]);
    a.send("our turn\n");
    assert_eq!(b.recv(), "alice: our turn");
}

#[test]
fn wrong_candidates_are_recognised_and_dropped() {
    // Alice announces two extra candidates: bob's own address (bob's attempt there
    // is a self-connect: his SYN loops back onto his own socket, and the link is
    // up in microseconds, long before the real one) and a stranger that answers
    // with garbage. Bob waits first, so he is the leader who picks the link: were
    // the link check not to catch the self-connect, he would pick it.
    let rv = TestRendezvous::start();
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
    let mut b = Peer::spawn(
        rv.addr(),
        "bob",
        "4-decoy-doors",
        &["--port", &pb.to_string()],
    );
    b.wait_stderr("waiting for the other side");
    let mut a = Peer::spawn(
        rv.addr(),
        "alice",
        "4-decoy-doors",
        &[
            "--port",
            &pa.to_string(),
            "--candidate",
            &self_candidate,
            "--candidate",
            &stranger_candidate,
        ],
    );
    let status = b.wait_stderr("connected to alice");
    assert!(
        status.contains(&format!(
            "direct link to 127.0.0.1:{pa} (IPv4, public address)"
        )),
        "{status}"
    );
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
    let rv = TestRendezvous::start();
    let (mut a, mut b, _, _) = pair(&rv, "5-busy-day", &[], &[]);

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        // Garbage: the server answers with an error message and closes.
        let mut garbage = Client::connect(rv.addr()).await;
        garbage.send_raw(&[0, 0, 0, 3, 0xff, 0xfe, 0xfd]).await;
        let (code, message) = refused_then_closed(&mut garbage).await;
        assert_eq!(code, ErrorCode::Malformed, "{message}");

        // A length prefix of 4 GiB: refused without buffering, connection closed.
        let mut huge = Client::connect(rv.addr()).await;
        huge.send_raw(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3]).await;
        let (code, _) = refused_then_closed(&mut huge).await;
        assert_eq!(code, ErrorCode::Malformed);

        // A peer of another protocol version gets a version error it can show.
        let mut other = Client::connect(rv.addr()).await;
        other
            .send(PeerToServer::Hello(Hello {
                version: PROTOCOL_VERSION + 1,
                ..hello("5", b"")
            }))
            .await;
        let (code, message) = refused_then_closed(&mut other).await;
        assert_eq!(code, ErrorCode::VersionMismatch);
        assert!(message.contains("version"), "{message}");

        // A future hello whose fields this version cannot even parse: still a
        // version error.
        let mut future = Client::connect(rv.addr()).await;
        let payload = encode_payload(&(0u32, PROTOCOL_VERSION + 1, [0xffu8; 5])).expect("encode");
        let len = u32::try_from(payload.len()).expect("small").to_be_bytes();
        future.send_raw(&[&len[..], &payload].concat()).await;
        let (code, _) = refused_then_closed(&mut future).await;
        assert_eq!(code, ErrorCode::VersionMismatch);
    });

    // The pair still chats, and a new pair can still meet.
    a.send("unbothered\n");
    assert_eq!(b.recv(), "alice: unbothered");
    let (mut c, mut d, _, _) = pair(&rv, "6-second-pair", &[], &[]);
    c.send("we met too\n");
    assert_eq!(d.recv(), "alice: we met too");
}

#[test]
fn an_unreachable_rendezvous_is_a_clear_error() {
    let closed = loopback(free_port());
    let mut p = Peer::spawn(closed, "alice", "7-nobody-home", &[]);
    assert!(!p.wait().success());
    p.wait_stderr("cannot reach the rendezvous");
    p.wait_stderr(&closed.to_string());
}

#[test]
fn an_invalid_code_is_refused_before_connecting() {
    let rv = TestRendezvous::start();
    let mut p = Peer::spawn(rv.addr(), "alice", "no spaces/allowed", &[]);
    assert!(!p.wait().success());
    p.wait_stderr("invalid code");
}

/// Reads the server's error message, then checks the server closed the
/// connection.
async fn refused_then_closed(c: &mut Client) -> (ErrorCode, String) {
    let msg = c.recv().await;
    let refused = refusal(&msg).unwrap_or_else(|| panic!("expected an error frame, got {msg:?}"));
    c.assert_closed().await;
    refused
}

#[test]
fn a_new_code_is_printed_and_the_other_side_joins_with_it() {
    let rv = TestRendezvous::start();
    let mut a = Peer::spawn(rv.addr(), "alice", "", &[]);
    let line = a.wait_stderr("your code: ");
    let code = line.rsplit(' ').next().expect("code").to_owned();
    let command = a.wait_stderr("on the other host, run:");
    assert!(
        command.ends_with(&format!("peer --server {} {code}", rv.addr())),
        "{command}"
    );
    let parts: Vec<&str> = code.split('-').collect();
    assert_eq!(parts.len(), 3, "nameplate and two words: {code}");
    // Drawn at random, short while few codes are in use: at most three digits.
    assert!(
        (1..=3).contains(&parts[0].len()),
        "nameplate of a lightly used server: {code}"
    );
    assert!(parts[0].bytes().all(|b| b.is_ascii_digit()), "{code}");
    for word in &parts[1..] {
        assert!(punchline_proto::codes::WORDS.contains(word), "{word}");
    }
    let mut b = Peer::spawn(rv.addr(), "bob", &code, &[]);
    let a_says = a.wait_stderr("encrypted; code confirmed");
    let b_says = b.wait_stderr("encrypted; code confirmed");
    // Both sides show the same verification words.
    let words = |s: &str| s.rsplit(": ").next().expect("words").to_owned();
    assert_eq!(words(&a_says), words(&b_says));
    a.send("sealed hello\n");
    assert_eq!(b.recv(), "alice: sealed hello");
    a.close_stdin();
    assert!(a.wait().success());
    assert!(b.wait().success());
}

#[test]
fn a_wrong_code_fails_on_both_sides_and_nothing_is_shown() {
    let rv = TestRendezvous::start();
    let mut a = Peer::spawn(rv.addr(), "alice", "11-apple-river", &[]);
    a.send("this must never be shown\n");
    a.wait_stderr("waiting for the other side");
    let mut b = Peer::spawn(rv.addr(), "bob", "11-apple-tiger", &[]);
    b.send("nor this\n");
    for p in [&mut a, &mut b] {
        assert!(!p.wait().success(), "{} must fail", p.name());
        // Caught by the sealed candidates (which do not open with another
        // code's key) or, should the link come first, by the handshake.
        let said = p.wait_stderr("peer: ");
        assert!(
            said.contains("someone joined with a different code")
                || said.contains("did not prove it knows the code"),
            "{said}"
        );
    }
    assert_eq!(a.rest_of_stdout(), Vec::<String>::new());
    assert_eq!(b.rest_of_stdout(), Vec::<String>::new());
}

#[test]
fn neither_lines_nor_code_words_cross_the_wire_in_clear() {
    let rv = TestRendezvous::start();
    let (pa, pb) = (free_port(), free_port());
    let filter = format!(
        "tcp and (port {pa} or port {pb} or port {} or port {})",
        rv.addr().port(),
        rv.addr().port() + 1
    );
    let Some(capture) = Capture::start(&filter) else {
        return;
    };

    let code = "12-walnut-zebra";
    let mut a = Peer::spawn(rv.addr(), "alice", code, &["--port", &pa.to_string()]);
    // A line given before the link is up rides in the first handshake message.
    a.send("frobnitz early line\n");
    a.wait_stderr("waiting for the other side");
    let mut b = Peer::spawn(rv.addr(), "bob", code, &["--port", &pb.to_string()]);
    // The follower's, in the box behind its link hello.
    b.send("gazump early line\n");
    b.wait_stderr("encrypted");
    assert_eq!(b.recv(), "alice: frobnitz early line");
    assert_eq!(a.recv(), "bob: gazump early line");
    a.send("xyzzy plugh secret line\n");
    assert_eq!(b.recv(), "alice: xyzzy plugh secret line");
    b.send("quux reply\n");
    assert_eq!(a.recv(), "bob: quux reply");
    a.close_stdin();
    assert!(a.wait().success());
    assert!(b.wait().success());
    let captured = capture.finish();
    let contains = |needle: &str| holds(&captured, needle.as_bytes());
    // The capture saw the session: the rendezvous traffic, both punched
    // links' handshakes and the lines (a few KiB of packets with headers).
    let port_bytes = |p: u16| p.to_be_bytes();
    let has = |needle: &[u8]| holds(&captured, needle);
    assert!(
        captured.len() > 4096 && has(&port_bytes(pa)) && has(&port_bytes(pb)),
        "capture is empty ({} bytes)",
        captured.len()
    );
    // Names travel only inside the encrypted handshake now, like the lines.
    for secret in [
        "frobnitz", "gazump", "xyzzy", "plugh", "quux", "walnut", "zebra", "alice", "bob",
    ] {
        assert!(!contains(secret), "{secret:?} crossed the wire in clear");
    }
}

/// `peer doctor` against a rendezvous on IPv6 loopback: it reaches it over IPv6,
/// reflects both ports, has the server dial back (reset: nothing listens), and
/// proves the kernel's self-connect.
#[test]
fn the_doctor_checks_a_rendezvous_over_ipv6() {
    let rv = TestRendezvous::on(
        std::net::Ipv6Addr::LOCALHOST.into(),
        punchline_rendezvous::Config::default(),
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_peer"))
        .args(["doctor", "--server", &rv.addr().to_string()])
        .env_remove("PUNCHLINE_SERVER")
        .output()
        .expect("run peer doctor");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "NAT                      no: this host has a public address",
        "mapping                  endpoint-independent",
        "unsolicited inbound SYN  reset at once",
        "simultaneous open        works",
        &format!(
            "IPv6                     reachable at {}; it sees this host as [::1]:",
            rv.addr()
        ),
        "verdict: direct chats should work",
    ] {
        assert!(report.contains(needle), "no {needle:?} in:\n{report}");
    }
}

/// A `peer` command with no server at all (not even from the environment or
/// a settings file): it runs a rendezvous itself, on `serve_port`.
fn serverless(name: &str, config: &std::path::Path, args: &[&str]) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_peer"));
    cmd.args(["--name", name, "--no-lan"])
        .args(args)
        .env_remove("PUNCHLINE_SERVER")
        .env("XDG_CONFIG_HOME", config);
    cmd
}

/// With no server given, the first peer runs a rendezvous itself and prints
/// the exact command for the other host; the other host runs it and they
/// chat. A second peer on the same host with no server either finds the port
/// taken and meets at the one already there; a third takes its server and
/// name from the settings file.
#[test]
fn with_no_server_the_peer_runs_one_and_prints_the_command() {
    let serve_port = free_port().to_string();
    let (ca, cb, cc) = (
        fresh_config("host"),
        fresh_config("joiner"),
        fresh_config("settings"),
    );
    let mut a = Peer::spawn_command(
        serverless("alice", &ca, &["--serve-port", &serve_port]),
        "alice",
    );
    let hosting = a.wait_stderr("no rendezvous given");
    assert!(
        hosting.contains(&format!(
            "this peer runs one itself for this chat, on port {serve_port}"
        )),
        "{hosting}"
    );
    let command = a.wait_stderr("on the other host, run:");
    let args: Vec<&str> = command.split_whitespace().collect();
    let at = args
        .iter()
        .position(|a| *a == "--server")
        .expect("--server");
    let (server, code) = (args[at + 1].to_owned(), args[at + 2].to_owned());
    assert!(server.ends_with(&format!(":{serve_port}")), "{command}");
    a.wait_stderr("it works when the other host can reach this one");
    a.wait_stderr("waiting for the other side");
    // The other host, as told.
    let mut b = Peer::spawn_command(serverless("bob", &cb, &["--server", &server, &code]), "bob");
    a.wait_stderr("connected to bob");
    b.wait_stderr("connected to alice");
    a.send("over the built-in rendezvous\n");
    assert_eq!(b.recv(), "alice: over the built-in rendezvous");
    b.close_stdin();
    assert!(b.wait().success());
    assert!(a.wait().success());

    // The port taken: a peer with no server meets at the rendezvous there.
    let mut a = Peer::spawn_command(
        serverless("alice", &ca, &["--serve-port", &serve_port]),
        "alice",
    );
    let command = a.wait_stderr("on the other host, run:");
    let code = command.rsplit(' ').next().expect("code").to_owned();
    a.wait_stderr("waiting for the other side");
    // The settings file names the server (this host's, as printed) and the
    // name; the flag for the port is all the other needs.
    std::fs::create_dir_all(cc.join("punchline")).expect("dir");
    std::fs::write(
        cc.join("punchline").join("config.toml"),
        format!("server = \"{server}\"\nname = \"carol\"\n"),
    )
    .expect("settings");
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_peer"));
    c.args(["--no-lan", &code])
        .env_remove("PUNCHLINE_SERVER")
        .env("XDG_CONFIG_HOME", &cc);
    let mut c = Peer::spawn_command(c, "carol");
    a.wait_stderr("connected to carol");
    c.wait_stderr("connected to alice");
    // And a second serverless peer here finds the port taken.
    let mut d = Peer::spawn_command(
        serverless("dave", &cb, &["--serve-port", &serve_port]),
        "dave",
    );
    let taken = d.wait_stderr("no rendezvous given");
    assert!(
        taken.contains(&format!("port {serve_port} is taken")),
        "{taken}"
    );
    d.wait_stderr("your code: ");
    drop(d);
    a.close_stdin();
    assert!(a.wait().success());
    assert!(c.wait().success());

    // A broken settings file is an error naming it.
    std::fs::write(cc.join("punchline").join("config.toml"), "sever = \"x\"\n").expect("write");
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_peer"));
    c.arg(&code)
        .env_remove("PUNCHLINE_SERVER")
        .env("XDG_CONFIG_HOME", &cc);
    let out = c.output().expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("config.toml") && err.contains("not understood"),
        "{err}"
    );
}
