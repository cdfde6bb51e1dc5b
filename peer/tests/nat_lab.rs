//! The punch through real kernel NATs: the NAT lab's matrix of pairs, each side
//! behind its own kind of NAT, with asymmetric emulated delays (A 5 ms, B 40 ms,
//! rendezvous 20 ms one way). Every punchable pair must connect directly and chat
//! both ways; a symmetric NAT must fail with a clear diagnosis where the
//! rendezvous does not relay (relaying is tested in `relay_lab.rs`).
//!
//! Needs root and the lab's tools; skips loudly otherwise (fails instead when
//! `PUNCHLINE_REQUIRE_LAB=1`, as in CI).

use std::path::Path;
use std::time::Duration;

use punchline_lab::prereq::available_or_skip;
use punchline_lab::scenario::{punch, LabRendezvous, Outcome, PunchSpec, OURS};
use punchline_lab::{Lab, LabConfig, NatKind, WanConfig};
use punchline_rendezvous::Config;

/// One-way delays of the links, in ms: side A, side B, rendezvous.
const DELAYS: (u64, u64, u64) = (5, 40, 20);

fn lab(config: LabConfig) -> Lab {
    let (a, b, rv) = DELAYS;
    let config = config.with_wan(WanConfig::delays_ms(a, b, rv));
    Lab::build(&config).unwrap_or_else(|e| panic!("building {config:?}: {e}"))
}

fn spec(code: &str, punch_timeout: Duration) -> PunchSpec {
    PunchSpec {
        code: format!("1-{code}"),
        port_a: 40000,
        port_b: 40001,
        strategy: OURS,
        punch_timeout,
        extra_args: Vec::new(),
    }
}

/// Builds the lab, punches, proves the link direct, chats both ways, leaves.
fn must_connect(name: &str, config: LabConfig) {
    if !available_or_skip(name) {
        return;
    }
    connect_and_chat(name, &lab(config));
}

fn connect_and_chat(name: &str, lab: &Lab) {
    let rv = LabRendezvous::start(lab, Config::default()).expect("rendezvous starts");
    let bin = Path::new(env!("CARGO_BIN_EXE_peer"));
    let outcome = punch(lab, &rv, bin, &spec(name, Duration::from_secs(10)))
        .unwrap_or_else(|e| panic!("{name}: {e}\n{}", lab.diagnostics()));
    let mut link = match outcome {
        Outcome::Connected(c) => c,
        Outcome::Failed(f) => panic!(
            "{name}: no direct link\nalice: {}\nbob: {}\n{}",
            f.a_error,
            f.b_error,
            lab.diagnostics()
        ),
    };
    let rtt = link
        .verify_direct(lab)
        .unwrap_or_else(|e| panic!("{name}: {e}\n{}", lab.diagnostics()));
    eprintln!(
        "{name}: {} / {}; chat RTT {rtt:?} (emulated A-B {:?})",
        link.a_up.status,
        link.b_up.status,
        lab.rtt(punchline_lab::Host::A, punchline_lab::Host::B)
    );
    link.finish().unwrap_or_else(|e| panic!("{name}: {e}"));
}

#[test]
fn home_home() {
    must_connect("home-home", LabConfig::new(NatKind::Home, NatKind::Home));
}

#[test]
fn rst_rst() {
    must_connect("rst-rst", LabConfig::new(NatKind::Rst, NatKind::Rst));
}

#[test]
fn home_rst() {
    must_connect("home-rst", LabConfig::new(NatKind::Home, NatKind::Rst));
}

#[test]
fn range_home() {
    must_connect("range-home", LabConfig::new(NatKind::Range, NatKind::Home));
}

#[test]
fn range_range() {
    must_connect(
        "range-range",
        LabConfig::new(NatKind::Range, NatKind::Range),
    );
}

#[test]
fn public_home() {
    must_connect(
        "public-home",
        LabConfig::new(NatKind::Public, NatKind::Home),
    );
}

#[test]
fn firewall_home() {
    must_connect(
        "firewall-home",
        LabConfig::new(NatKind::Firewall, NatKind::Home),
    );
}

#[test]
fn cgnat_cgnat() {
    must_connect(
        "cgnat-cgnat",
        LabConfig::new(NatKind::Cgnat, NatKind::Cgnat),
    );
}

#[test]
fn cgnat_rst() {
    must_connect("cgnat-rst", LabConfig::new(NatKind::Cgnat, NatKind::Rst));
}

#[test]
fn same_lan() {
    must_connect("same-lan", LabConfig::same_lan(NatKind::Home));
}

#[test]
fn symmetric_home_fails_with_a_clear_diagnosis_where_nothing_relays() {
    let name = "symmetric-home";
    if !available_or_skip(name) {
        return;
    }
    let lab = lab(LabConfig::new(NatKind::Symmetric, NatKind::Home));
    let config = Config {
        relay: false,
        ..Config::default()
    };
    let rv = LabRendezvous::start(&lab, config).expect("rendezvous starts");
    let bin = Path::new(env!("CARGO_BIN_EXE_peer"));
    let outcome = punch(&lab, &rv, bin, &spec(name, Duration::from_secs(5)))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let failed = match outcome {
        Outcome::Failed(f) => f,
        Outcome::Connected(c) => panic!(
            "{name}: connected through a symmetric NAT?\n{}\n{}",
            c.a_up.status, c.b_up.status
        ),
    };
    assert!(!failed.a_status.success() && !failed.b_status.success());
    for (who, text) in [("alice", &failed.a_error), ("bob", &failed.b_error)] {
        assert!(text.contains("no direct connection"), "{who}: {text}");
        assert!(
            text.contains("symmetric"),
            "{who} does not name the likely cause: {text}"
        );
        assert!(
            text.contains("No relay either") && text.contains("does not relay"),
            "{who} does not say the relay was refused: {text}"
        );
    }
    eprintln!(
        "{name}: alice says:\n{}\nbob says:\n{}",
        failed.a_error, failed.b_error
    );
}

#[test]
fn rst_rst_with_a_far_rendezvous() {
    // A and B 5 ms apart, the rendezvous 12 ms from A but 93 ms from B: the go,
    // sent to both at once, reaches A 81 ms early, and A's first SYN is reset by
    // B's NAT (B has sent nothing yet). A tries again when B's go comes, which its
    // go told it (`Go::others_go_after_us`), and the two SYNs cross; without
    // that, the two sides' retries rarely cross.
    let name = "rst-rst-far-rendezvous";
    if !available_or_skip(name) {
        return;
    }
    let wan = WanConfig::delays_ms(2, 3, 10).with_detour(
        punchline_lab::Link::Rv,
        punchline_lab::Link::B,
        Duration::from_millis(80),
    );
    let config = LabConfig::new(NatKind::Rst, NatKind::Rst).with_wan(wan);
    let lab = Lab::build(&config).unwrap_or_else(|e| panic!("building {config:?}: {e}"));
    connect_and_chat(name, &lab);
}

/// A peer on a host with a public address, given no rendezvous, runs one
/// itself on the default port and prints the command for the other host; a
/// peer behind a home NAT runs that command, and the two chat over a direct
/// link (the rendezvous inside the first peer saw the second's NAT mapping).
#[test]
fn a_public_host_runs_the_rendezvous_itself() {
    let name = "hosted-public-home";
    if !available_or_skip(name) {
        return;
    }
    let lab = lab(LabConfig::new(NatKind::Public, NatKind::Home));
    let bin = Path::new(env!("CARGO_BIN_EXE_peer"));
    let config = |side: &str| {
        let dir =
            std::env::temp_dir().join(format!("punchline-{name}-{side}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("config dir");
        dir
    };
    let mut a = lab.command(punchline_lab::Host::A, bin);
    a.args(["--name", "alice"])
        .env_remove("PUNCHLINE_SERVER")
        .env("XDG_CONFIG_HOME", config("a"));
    let mut a = punchline_lab::scenario::PeerProcess::spawn(a, "alice").expect("alice");
    let command = a
        .wait_stderr("on the other host, run:")
        .unwrap_or_else(|e| panic!("{e}\n{}", lab.diagnostics()));
    let public = lab.public_addr(punchline_lab::Host::A).to_string();
    let args: Vec<&str> = command.split_whitespace().collect();
    let at = args
        .iter()
        .position(|a| *a == "--server")
        .expect("--server");
    // The host's public address, on the default port (so none is written).
    assert_eq!(args[at + 1], public, "{command}");
    let code = args[at + 2].to_owned();
    a.wait_stderr("waiting for the other side").expect("waits");
    let mut b = lab.command(punchline_lab::Host::B, bin);
    b.args(["--name", "bob", "--server", &public, &code])
        .env_remove("PUNCHLINE_SERVER")
        .env("XDG_CONFIG_HOME", config("b"));
    let mut b = punchline_lab::scenario::PeerProcess::spawn(b, "bob").expect("bob");
    for p in [&mut a, &mut b] {
        let up = p
            .wait_stderr_starting(&["connected to ", "peer: "])
            .unwrap_or_else(|e| panic!("{e}\n{}", lab.diagnostics()));
        assert!(up.contains("direct link"), "{}: {up}", p.name);
    }
    a.send("from the host that serves\n").expect("send");
    assert_eq!(b.recv().expect("line"), "alice: from the host that serves");
    b.send("from behind the NAT\n").expect("send");
    assert_eq!(a.recv().expect("line"), "bob: from behind the NAT");
    punchline_lab::scenario::leave(&mut a, &mut b).expect("both leave cleanly");
    for side in ["a", "b"] {
        let _ = std::fs::remove_dir_all(config(side));
    }
}
