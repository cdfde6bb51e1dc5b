//! Port + 2 as something other than a rendezvous.
//!
//! A peer whose first connection to the rendezvous stays silent races a second
//! one to the server's alternate port, but only to the port the server named
//! in its probe's answer. Here the server has none (it runs one listener), and
//! port + 2 is some other program (as with a server run with `--no-alternate`,
//! or a rendezvous on 443 with 445 open): the peer must not send its hello
//! there, and must wait for the rendezvous that was only slow to answer its
//! first SYN.
//!
//! The silence is made on loopback without root: the main port's accept queue
//! (backlog 0) is held full by one connection nobody accepts, so the kernel
//! drops the peer's first SYN; the real rendezvous starts serving that
//! listener 400 ms later, and the kernel's retransmission (1 s) would connect.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use punchline_rendezvous::{run, run_probe, Config};
use socket2::{Domain, Socket, Type};

/// A loopback port P with P+1 and P+2 free too.
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

/// Runs the scenario; with `ssh`, an SSH server holds port + 2, else nothing
/// does (a reset). The peer's stderr, whether it was still running after 6 s
/// (waiting in its room), and what port + 2 received.
fn scenario(ssh: bool) -> (String, bool, Vec<u8>) {
    let (main_std, probe_std, alt) = three_ports();
    let alt = ssh.then_some(alt);
    let main_addr = main_std.local_addr().expect("addr");
    // The main listener again, with a backlog of 0, its queue held full.
    drop(main_std);
    let main = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    main.set_reuse_address(true).expect("reuse");
    main.bind(&main_addr.into()).expect("bind main");
    main.listen(0).expect("listen");
    let filler = TcpStream::connect(main_addr).expect("filler connects");
    // A second connection is held in the SYN queue or dropped: only the one.
    let main: TcpListener = main.into();

    // Port + 2: an SSH server, recording what it is sent.
    let received = Arc::new(Mutex::new(Vec::<u8>::new()));
    let seen = received.clone();
    thread::spawn(move || {
        let Some(alt) = alt else { return };
        for mut conn in alt.incoming().flatten() {
            let _ = conn.write_all(b"SSH-2.0-OpenSSH_9.6\r\n");
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

    // The real rendezvous on the main port (from 400 ms on) and its probe port.
    thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(async move {
            let config = Config::default();
            probe_std.set_nonblocking(true).expect("nonblocking");
            let probe = tokio::net::TcpListener::from_std(probe_std).expect("probe");
            tokio::spawn(run_probe(
                probe,
                config.metrics.clone(),
                config.probes.clone(),
                std::future::pending(),
            ));
            tokio::time::sleep(Duration::from_millis(400)).await;
            drop(filler);
            main.set_nonblocking(true).expect("nonblocking");
            let main = tokio::net::TcpListener::from_std(main).expect("main");
            let _ = run(main, config, std::future::pending()).await;
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
    // The peer either waits in the room (the rendezvous answered: fine) or
    // fails; after 6 s, stop it.
    let killer = thread::spawn(move || {
        thread::sleep(Duration::from_secs(6));
        // SAFETY: the pid of our own child.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    });
    let output = out.wait_with_output().expect("wait");
    let _ = killer;
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    let elapsed = started.elapsed();
    let got = received.lock().expect("lock").clone();
    eprintln!("peer after {elapsed:?}: {:?}\n{stderr}", output.status);
    eprintln!("port + 2 received {} bytes", got.len());
    use std::os::unix::process::ExitStatusExt;
    (stderr, output.status.signal() == Some(libc::SIGKILL), got)
}

/// Control: with nothing at port + 2, the same slow first SYN costs the
/// kernel's retransmission, and the peer waits in its room.
#[test]
fn with_nothing_at_port_plus_two_a_slow_first_syn_still_reaches_the_room() {
    let (stderr, still_waiting, _) = scenario(false);
    assert!(still_waiting, "the peer should wait in its room: {stderr}");
}

/// No race to a port the server did not name: the hello (nameplate, SPAKE2
/// message, probe tokens) never reaches the program at port + 2, and the
/// peer reaches its room.
#[test]
fn a_slow_first_syn_never_sends_the_hello_to_an_unnamed_port_plus_two() {
    let (stderr, still_waiting, got) = scenario(true);
    assert!(
        !holds(&got, b"4242"),
        "the hello (nameplate 4242, SPAKE2 message, probe tokens) went in clear to the \
         SSH server at port + 2; the peer said: {stderr}"
    );
    assert!(
        still_waiting,
        "the peer gave up on a working rendezvous because port + 2 is another program: {stderr}"
    );
}
