//! A chat that survives: through the NAT lab, the link outlives an idle spell
//! longer than the NAT remembers an idle flow (keepalive), and a link reset and
//! cut for a while comes back with every line delivered once, in order (resume
//! over a new punch).
//!
//! Needs root and the lab's tools; skips loudly otherwise (fails instead when
//! `PUNCHLINE_REQUIRE_LAB=1`, as in CI).

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use punchline_lab::prereq::available_or_skip;
use punchline_lab::scenario::{punch, Connected, LabRendezvous, Outcome, PunchSpec, OURS};
use punchline_lab::{Host, Lab, LabConfig, NatKind, Side, WanConfig};
use punchline_rendezvous::Config;

fn connect(lab: &Lab, rv: &LabRendezvous, code: &str) -> Box<Connected> {
    let spec = PunchSpec {
        code: code.into(),
        port_a: 40000,
        port_b: 40001,
        strategy: OURS,
        punch_timeout: Duration::from_secs(10),
        extra_args: Vec::new(),
    };
    match punch(lab, rv, Path::new(env!("CARGO_BIN_EXE_peer")), &spec)
        .unwrap_or_else(|e| panic!("{e}\n{}", lab.diagnostics()))
    {
        Outcome::Connected(c) => c,
        Outcome::Failed(f) => panic!("no link: {} / {}", f.a_error, f.b_error),
    }
}

/// Nobody typed for 90 s behind NATs that forget an established flow after
/// 30 s and do not pick up a forgotten one: the keepalive keeps the mappings, so
/// the same link still carries both lines afterwards.
#[test]
fn an_idle_chat_outlives_the_nat_flow_timeout() {
    if !available_or_skip("idle-chat") {
        return;
    }
    let lab = Lab::build(
        &LabConfig::new(NatKind::Home, NatKind::Home).with_wan(WanConfig::delays_ms(5, 10, 5)),
    )
    .expect("lab");
    for side in [Side::A, Side::B] {
        lab.set_conntrack_tcp(side, Duration::from_secs(30), false)
            .expect("conntrack settings");
    }
    let rv = LabRendezvous::start(&lab, Config::default()).expect("rendezvous");
    let mut c = connect(&lab, &rv, "5-idle-chat");
    thread::sleep(Duration::from_secs(90));
    c.a.send("after the silence, from alice\n").expect("send");
    c.b.send("after the silence, from bob\n").expect("send");
    assert_eq!(
        c.b.recv().expect("line"),
        "alice: after the silence, from alice"
    );
    assert_eq!(
        c.a.recv().expect("line"),
        "bob: after the silence, from bob"
    );
    for p in [&mut c.a, &mut c.b] {
        let dropped: Vec<String> = p
            .drain_stderr()
            .iter()
            .filter(|l| l.contains("dropped"))
            .cloned()
            .collect();
        assert!(
            dropped.is_empty(),
            "{}: the link dropped: {dropped:?}",
            p.name
        );
    }
    c.finish().expect("both leave cleanly");
}

/// While both peers send a line every 0.5 s, a rule in A's NAT resets their
/// connection and blocks the path between them for 5 s, then is removed. Both
/// peers meet again through the rendezvous, punch a new link and resume: every
/// line typed on either side arrives exactly once, in order.
#[test]
fn a_reset_and_cut_link_resumes_without_losing_or_doubling_a_line() {
    if !available_or_skip("resume-chat") {
        return;
    }
    let lab = Lab::build(
        &LabConfig::new(NatKind::Home, NatKind::Rst).with_wan(WanConfig::delays_ms(5, 10, 5)),
    )
    .expect("lab");
    let rv = LabRendezvous::start(&lab, Config::default()).expect("rendezvous");
    let mut c = connect(&lab, &rv, "6-cut-chat");
    let b_public = lab.public_addr(Host::B);
    const LINES: u32 = 40;
    let started = Instant::now();
    let mut cut_at = None;
    let mut restored_at = None;
    for i in 1..=LINES {
        c.a.send(&format!("a{i}\n")).expect("alice types");
        c.b.send(&format!("b{i}\n")).expect("bob types");
        if i == 6 {
            lab.cut_path(Side::A, b_public).expect("cut the path");
            cut_at = Some(started.elapsed());
        }
        if i == 16 {
            lab.restore_path(Side::A).expect("restore the path");
            restored_at = Some(started.elapsed());
        }
        thread::sleep(Duration::from_millis(500));
    }
    let expect_all = |p: &mut punchline_lab::scenario::PeerProcess, from: &str, prefix: char| {
        let mut got = Vec::new();
        while got.len() < LINES as usize {
            match p.try_recv(Duration::from_secs(60)) {
                Some(line) => got.push(line),
                None => break,
            }
        }
        let want: Vec<String> = (1..=LINES)
            .map(|i| format!("{from}: {prefix}{i}"))
            .collect();
        let status = p.drain_stderr().join("\n");
        assert_eq!(
            got,
            want,
            "{} received; its status:\n{status}\n{}",
            p.name,
            lab.diagnostics()
        );
    };
    expect_all(&mut c.b, "alice", 'a');
    expect_all(&mut c.a, "bob", 'b');
    // And nothing after them: no line came twice.
    for p in [&mut c.a, &mut c.b] {
        let extra = p.try_recv(Duration::from_secs(1));
        assert!(extra.is_none(), "{} got an extra line {extra:?}", p.name);
    }
    for p in [&mut c.a, &mut c.b] {
        let seen = p.drain_stderr().join("\n");
        assert!(
            seen.contains("dropped"),
            "{}: no drop reported:\n{seen}",
            p.name
        );
        assert!(
            seen.contains("link back after"),
            "{}: no return reported:\n{seen}",
            p.name
        );
        eprintln!("{}:\n{seen}", p.name);
    }
    eprintln!("path cut at {cut_at:?}, restored at {restored_at:?}");
    c.finish().expect("both leave cleanly");
}
