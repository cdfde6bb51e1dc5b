//! Whoever answers at port + 1 names the alternate port.
//!
//! The peer probes the rendezvous' port + 1 by default (no `--probe-port`). A
//! rendezvous run with `--no-probe` (or with `--probe-listen` elsewhere) leaves
//! port + 1 to any other program on its host, for example another user's on a
//! shared machine, which can answer the probe with `Observed {
//! alternate_port: Some(its own port) }`. A peer whose first SYN to the
//! rendezvous is lost must not send its hello (nameplate, SPAKE2 message,
//! probe tokens) there: it races only to main + 2, and only when named.
//! Not covered: a program holding both port + 1 and port + 2 beside a
//! rendezvous run without either still gets the hello.
//!
//! The silence is made as in `alternate_port.rs`: the main port's accept
//! queue (backlog 0) is held full for 400 ms.

mod common;

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::fake::ServerConn;
use common::*;
use futures::{SinkExt, StreamExt};
use punchline_proto::{FrameCodec, ServerToPeer};
use punchline_rendezvous::{run, Config};
use socket2::{Domain, Socket, Type};
use tokio_util::codec::Framed;

fn three_ports() -> (TcpListener, TcpListener, TcpListener) {
    for _ in 0..200 {
        let main = TcpListener::bind("127.0.0.1:0").expect("bind");
        let p = main.local_addr().expect("addr").port();
        if p > 65000 {
            continue;
        }
        let (Ok(probe), Ok(alt)) = (
            TcpListener::bind(("127.0.0.1", p + 1)),
            TcpListener::bind(("127.0.0.1", p + 2)),
        ) else {
            continue;
        };
        return (main, probe, alt);
    }
    panic!("no three free ports in a row");
}

/// Runs the scenario with port + 1 naming `named(main, trap)` as the
/// alternate port: the peer's stderr, whether it was still waiting in its
/// room after 6 s, and what the trap port received.
fn scenario(named: fn(u16, u16) -> u16) -> (String, bool, Vec<u8>) {
    let (main_std, impostor_std, _plus_two) = three_ports();
    // The impostor's own port, anywhere but port + 2 (a program holding both
    // port + 1 and port + 2 beside a rendezvous run without either is not
    // covered: see the module docs).
    let trap = TcpListener::bind("127.0.0.1:0").expect("bind the trap");
    let main_addr = main_std.local_addr().expect("addr");
    let trap_port = named(main_addr.port(), trap.local_addr().expect("addr").port());
    drop(main_std);
    let main = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    main.set_reuse_address(true).expect("reuse");
    main.bind(&main_addr.into()).expect("bind main");
    main.listen(0).expect("listen");
    let filler = TcpStream::connect(main_addr).expect("filler connects");
    let main: TcpListener = main.into();

    // The port the impostor names: records what it is sent.
    let received = Arc::new(Mutex::new(Vec::<u8>::new()));
    let seen = received.clone();
    thread::spawn(move || {
        for mut conn in trap.incoming().flatten() {
            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = [0u8; 4096];
            while let Ok(n) = conn.read(&mut buf) {
                if n == 0 {
                    break;
                }
                seen.lock().expect("lock").extend_from_slice(&buf[..n]);
            }
        }
    });

    // Port + 1: not the rendezvous' (it runs without a probe port), another
    // program answering like one and naming its own port as the alternate.
    thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(async move {
            impostor_std.set_nonblocking(true).expect("nonblocking");
            let l = tokio::net::TcpListener::from_std(impostor_std).expect("impostor");
            loop {
                let Ok((stream, from)) = l.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut conn: ServerConn = Framed::new(stream, FrameCodec::new());
                    let _ = conn
                        .send(ServerToPeer::Observed {
                            observed: from,
                            alternate_port: Some(trap_port),
                        })
                        .await;
                    while let Some(Ok(_)) = conn.next().await {}
                });
            }
        });
    });

    // The real rendezvous on the main port, from 400 ms on, without a probe port.
    thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(async move {
            tokio::time::sleep(Duration::from_millis(400)).await;
            drop(filler);
            main.set_nonblocking(true).expect("nonblocking");
            let main = tokio::net::TcpListener::from_std(main).expect("main");
            let _ = run(main, Config::default(), std::future::pending()).await;
        });
    });

    let started = Instant::now();
    let out = peer_command(
        main_addr,
        "alice",
        "4242-guitar-orbit",
        &["--no-port-mapping"],
    )
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawn peer");
    let pid = out.id();
    let killer = thread::spawn(move || {
        thread::sleep(Duration::from_secs(6));
        // SAFETY: the pid of our own child.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    });
    let output = out.wait_with_output().expect("wait");
    let _ = killer;
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    let got = received.lock().expect("lock").clone();
    eprintln!(
        "peer after {:?}: {:?}\n{stderr}",
        started.elapsed(),
        output.status
    );
    eprintln!("the named port received {} bytes", got.len());
    use std::os::unix::process::ExitStatusExt;
    let still_waiting = output.status.signal() == Some(libc::SIGKILL);
    (stderr, still_waiting, got)
}

#[test]
fn a_program_at_port_plus_one_cannot_steer_the_hello_to_a_port_of_its_choice() {
    let (stderr, still_waiting, got) = scenario(|_, trap| trap);
    assert!(
        !holds(&got, b"4242"),
        "the hello (nameplate 4242, SPAKE2 message, probe tokens) went in clear to the \
         port named by whatever answered at port + 1; the peer said: {stderr}"
    );
    assert!(
        still_waiting,
        "the peer did not reach its room on the real rendezvous: {stderr}"
    );
}

/// An alternate port of 0, the main port itself or port + 1: no panic, and
/// the peer still reaches its room on the main port.
#[test]
fn a_nonsense_alternate_port_leaves_the_first_connection_to_go_on() {
    for (what, named) in [
        ("0", (|_, _| 0) as fn(u16, u16) -> u16),
        ("the main port", |main, _| main),
        ("port + 1", |main, _| main + 1),
    ] {
        let (stderr, still_waiting, _) = scenario(named);
        assert!(still_waiting, "alternate port {what}: {stderr}");
    }
}
