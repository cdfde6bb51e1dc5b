//! `peer` pointed at things that are not a punchline rendezvous, or at a hostile
//! one, on loopback: a server that greets with an SSH banner, one that answers
//! like a web server, one that stays silent, one whose error message carries
//! escape sequences and bidi characters; and a local `--port` another program
//! holds. Each time the peer must say clearly what is wrong, within seconds, and
//! print nothing a terminal would act on.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::*;
use punchline_proto::{is_hidden_or_control, FrameCodec, PeerToServer, ServerToPeer};
use punchline_testkit::TestRendezvous;
use tokio_util::codec::Encoder;

/// How long the peer may take to give a clear error. The first answer is
/// allowed 3 s, the probe before a hello 2 s; the rest is slack for a busy
/// machine.
const CLEAR_ERROR_WITHIN: Duration = Duration::from_secs(10);

/// A fake server on loopback: each connection accepted is handed to `serve` in
/// a thread of its own. Runs until the test process ends.
fn fake_server(serve: fn(TcpStream)) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake server");
    let addr = listener.local_addr().expect("addr");
    thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            thread::spawn(move || serve(conn));
        }
    });
    addr
}

/// Holds the connection open, reading and ignoring, until the peer closes it.
fn drain(mut conn: TcpStream) {
    let mut buf = [0u8; 1024];
    while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
}

/// One frame of the rendezvous protocol, as the wire carries it.
fn frame(msg: ServerToPeer) -> Vec<u8> {
    let mut wire = BytesMut::new();
    FrameCodec::<PeerToServer, ServerToPeer>::new()
        .encode(msg, &mut wire)
        .expect("encode");
    wire.to_vec()
}

/// Runs `cmd` (stdin closed) to its end; kills it after `limit`. Returns its
/// exit status, its stderr as raw bytes, and how long it ran.
fn run(mut cmd: Command, limit: Duration) -> (ExitStatus, Vec<u8>, Duration) {
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("spawn peer");
    let mut stderr = child.stderr.take().expect("stderr");
    let reader = thread::spawn(move || {
        let mut out = Vec::new();
        let _ = stderr.read_to_end(&mut out);
        out
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("peer still running after {limit:?}");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let took = started.elapsed();
    (status, reader.join().expect("stderr reader"), took)
}

/// The peer's stderr holds nothing a terminal acts on or that reorders or hides
/// text: no escape, no other control character but the line break, no bidi or
/// other format character. Returns it as text.
fn assert_harmless(stderr: &[u8]) -> String {
    let text = std::str::from_utf8(stderr).expect("stderr is UTF-8");
    for c in text.chars() {
        assert!(
            c == '\n' || !is_hidden_or_control(c),
            "U+{:04X} reached the terminal: {text:?}",
            u32::from(c)
        );
    }
    text.to_owned()
}

/// A `peer` with a new code (so its first request is the allocation) against
/// `server`, its probe port pointed at a port nothing listens on.
fn new_code(server: SocketAddr) -> Command {
    let probe = free_port().to_string();
    peer_command(server, "alice", "", &["--probe-port", &probe])
}

/// A `peer` joining with a code (so its first request is the hello).
fn join(server: SocketAddr) -> Command {
    let probe = free_port().to_string();
    peer_command(server, "bob", "7-guitar-orbit", &["--probe-port", &probe])
}

#[test]
fn an_ssh_server_is_named_by_its_banner() {
    let ssh = fake_server(|mut conn| {
        let _ = conn.write_all(b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13.5\r\n");
        drain(conn);
    });
    for cmd in [new_code(ssh), join(ssh)] {
        let (status, stderr, took) = run(cmd, CLEAR_ERROR_WITHIN * 2);
        let text = assert_harmless(&stderr);
        assert!(!status.success(), "{text}");
        assert!(
            text.contains(&format!(
                "{ssh} did not answer like a punchline rendezvous: it sent 'SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13.5'"
            )),
            "{text}"
        );
        assert!(!text.contains("frame larger"), "{text}");
        assert!(took < CLEAR_ERROR_WITHIN, "took {took:?}: {text}");
    }
}

#[test]
fn a_web_server_is_named_by_its_status_line() {
    let web = fake_server(|mut conn| {
        let mut buf = [0u8; 64];
        let _ = conn.read(&mut buf);
        let _ = conn.write_all(
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
    });
    let (status, stderr, took) = run(new_code(web), CLEAR_ERROR_WITHIN * 2);
    let text = assert_harmless(&stderr);
    assert!(!status.success(), "{text}");
    assert!(
        text.contains(
            "did not answer like a punchline rendezvous: it sent 'HTTP/1.1 400 Bad Request…'"
        ),
        "{text}"
    );
    assert!(took < CLEAR_ERROR_WITHIN, "took {took:?}: {text}");
}

#[test]
fn a_silent_server_is_given_up_on_within_seconds() {
    // Like a web server waiting for a request it understands.
    let silent = fake_server(drain);
    for cmd in [new_code(silent), join(silent)] {
        let (status, stderr, took) = run(cmd, CLEAR_ERROR_WITHIN * 2);
        let text = assert_harmless(&stderr);
        assert!(!status.success(), "{text}");
        assert!(
            text.contains(&format!(
                "{silent} did not answer like a punchline rendezvous: no answer within 3 s"
            )),
            "{text}"
        );
        assert!(took < CLEAR_ERROR_WITHIN, "took {took:?}: {text}");
    }
}

#[test]
fn the_doctor_names_what_answered_too() {
    let ssh = fake_server(|mut conn| {
        let _ = conn.write_all(b"SSH-2.0-dropbear\r\n");
        drain(conn);
    });
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_peer"));
    cmd.args(["doctor", "--server", &ssh.to_string()])
        .env_remove("PUNCHLINE_SERVER");
    let (status, stderr, took) = run(cmd, CLEAR_ERROR_WITHIN * 2);
    let text = assert_harmless(&stderr);
    assert!(!status.success(), "{text}");
    assert!(
        text.contains("did not answer like a punchline rendezvous: it sent 'SSH-2.0-dropbear'"),
        "{text}"
    );
    assert!(took < CLEAR_ERROR_WITHIN, "took {took:?}: {text}");
}

/// What a hostile rendezvous puts in its error message: a window title (OSC),
/// a screen clear, a bell, a C1 control sequence introducer, a right-to-left
/// override, an isolate, a zero-width space, a tag character, a line separator.
const HOSTILE: &str = "go away\x1b]0;pwned\x07\x1b[2J\u{9b}31m \u{202E}ecila\u{2066}x\u{2069}\u{200B}\u{E0041}\u{2028}end";

#[test]
fn a_hostile_rendezvous_cannot_drive_the_terminal_with_its_error() {
    let hostile = fake_server(|mut conn| {
        let mut buf = [0u8; 256];
        let _ = conn.read(&mut buf);
        let _ = conn.write_all(&frame(ServerToPeer::Error {
            code: 99,
            message: HOSTILE.to_owned(),
        }));
        drain(conn);
    });
    for cmd in [new_code(hostile), join(hostile)] {
        let (status, stderr, took) = run(cmd, CLEAR_ERROR_WITHIN * 2);
        let text = assert_harmless(&stderr);
        assert!(!status.success(), "{text}");
        assert!(
            text.contains("the rendezvous refused: go away\u{FFFD}]0;pwned"),
            "{text}"
        );
        assert!(text.contains("\u{FFFD}ecila\u{FFFD}x"), "{text}");
        assert!(took < CLEAR_ERROR_WITHIN, "took {took:?}: {text}");
    }
}

#[test]
fn a_hostile_rendezvous_cannot_drive_the_terminal_with_other_answers() {
    // A nameplate full of escapes, then (to the hello) a message of the wrong
    // kind: neither reaches the terminal as sent.
    let hostile = fake_server(|mut conn| {
        let mut buf = [0u8; 256];
        let _ = conn.read(&mut buf);
        let _ = conn.write_all(&frame(ServerToPeer::Allocated {
            nameplate: HOSTILE.to_owned(),
        }));
        drain(conn);
    });
    let (status, stderr, _) = run(new_code(hostile), CLEAR_ERROR_WITHIN * 2);
    let text = assert_harmless(&stderr);
    assert!(!status.success(), "{text}");
    assert!(text.contains("invalid nameplate"), "{text}");

    let wrong = fake_server(|mut conn| {
        let mut buf = [0u8; 256];
        let _ = conn.read(&mut buf);
        let _ = conn.write_all(&frame(ServerToPeer::Sealed(HOSTILE.as_bytes().to_vec())));
        drain(conn);
    });
    let (status, stderr, _) = run(join(wrong), CLEAR_ERROR_WITHIN * 2);
    let text = assert_harmless(&stderr);
    assert!(!status.success(), "{text}");
    assert!(
        text.contains("expected a welcome, got a sealed box from the rendezvous"),
        "{text}"
    );
}

#[test]
fn a_local_port_in_use_is_named_with_what_to_do() {
    let rv = TestRendezvous::start();
    // Another program's listener, which does not share its port.
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let cmd = peer_command(rv.addr(), "alice", "", &["--port", &port.to_string()]);
    let (status, stderr, took) = run(cmd, CLEAR_ERROR_WITHIN * 2);
    let text = assert_harmless(&stderr);
    assert!(!status.success(), "{text}");
    assert!(
        text.contains(&format!(
            "local port {port} is already in use by another program"
        )),
        "{text}"
    );
    assert!(text.contains("choose another --port"), "{text}");
    assert!(!text.contains("cannot reach the rendezvous"), "{text}");
    assert!(took < CLEAR_ERROR_WITHIN, "took {took:?}: {text}");
    drop(taken);
}
