//! When punching cannot work, the chat goes through the rendezvous as a relay,
//! still encrypted end to end; and a direct chat does not depend on the
//! rendezvous once it runs.
//!
//! Needs root and the lab's tools; skips loudly otherwise (fails instead when
//! `PUNCHLINE_REQUIRE_LAB=1`, as in CI).

use std::path::Path;
use std::time::Duration;

use punchline_lab::prereq::available_or_skip;
use punchline_lab::scenario::{
    leave, punch, start_pair, LabRendezvous, Outcome, PeerProcess, PunchSpec, OURS,
};
use punchline_lab::{Host, Lab, LabConfig, NatKind, WanConfig};
use punchline_rendezvous::Config;

fn lab(a: NatKind, b: NatKind) -> Lab {
    Lab::build(&LabConfig::new(a, b).with_wan(WanConfig::delays_ms(5, 10, 5))).expect("lab")
}

fn spec(code: &str) -> PunchSpec {
    PunchSpec {
        code: code.into(),
        port_a: 40000,
        port_b: 40001,
        strategy: OURS,
        punch_timeout: Duration::from_secs(5),
        extra_args: Vec::new(),
    }
}

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_peer"))
}

/// Both peers report a relayed link, and 50 lines each way arrive in order.
fn chat_through_the_relay(name: &str, a: NatKind, b: NatKind) {
    chat_through_the_relay_with(name, a, b, &[]);
}

/// Starts alice (with `extra_a` too) and, once she waits, bob, as
/// [`start_pair`] does.
fn start_pair_with(
    lab: &Lab,
    rv: &LabRendezvous,
    spec: &PunchSpec,
    extra_a: &[&str],
) -> (PeerProcess, PeerProcess) {
    let command = |host: Host, name: &str, port: u16, extra: &[&str]| {
        let mut cmd = lab.command(host, bin());
        cmd.args([
            "--server",
            &rv.addr.to_string(),
            "--port",
            &port.to_string(),
        ])
        .args(["--name", name, "--punch-timeout"])
        .arg(spec.punch_timeout.as_secs().to_string())
        .args(extra)
        .arg(&spec.code)
        .env("RUST_LOG", "punchline_peer=info")
        .env_remove("PUNCHLINE_SERVER");
        PeerProcess::spawn(cmd, name).expect("spawn")
    };
    let mut alice = command(Host::A, "alice", spec.port_a, extra_a);
    alice
        .wait_stderr("waiting for the other side")
        .expect("alice waits");
    let bob = command(Host::B, "bob", spec.port_b, &[]);
    (alice, bob)
}

fn chat_through_the_relay_with(name: &str, a: NatKind, b: NatKind, extra_a: &[&str]) {
    if !available_or_skip(name) {
        return;
    }
    let lab = lab(a, b);
    let rv = LabRendezvous::start(&lab, Config::default()).expect("rendezvous");
    let (mut alice, mut bob) = start_pair_with(&lab, &rv, &spec("3-relay-chat"), extra_a);
    for p in [&mut alice, &mut bob] {
        let line = p
            .wait_stderr_starting(&["connected to ", "peer: "])
            .unwrap_or_else(|e| panic!("{e}\n{}", lab.diagnostics()));
        assert!(
            line.contains("relayed via the rendezvous") && line.contains("failed because"),
            "{}: {line}",
            p.name
        );
        eprintln!("{}: {line}", p.name);
        p.wait_stderr("encrypted; code confirmed")
            .expect("encrypted");
    }
    for i in 0..50 {
        alice.send(&format!("to bob {i}\n")).expect("send");
        bob.send(&format!("to alice {i}\n")).expect("send");
    }
    for i in 0..50 {
        assert_eq!(bob.recv().expect("line"), format!("alice: to bob {i}"));
        assert_eq!(alice.recv().expect("line"), format!("bob: to alice {i}"));
    }
    leave(&mut alice, &mut bob).expect("both leave cleanly");
}

/// A symmetric NAT on a side that offers no LAN candidate: the other side has
/// nothing at all to punch (this used to crash it on an empty candidate
/// list); both chat through the relay.
#[test]
fn symmetric_without_lan_candidates_and_home_chat_through_the_relay() {
    chat_through_the_relay_with(
        "relay-symmetric-no-lan-home",
        NatKind::Symmetric,
        NatKind::Home,
        &["--no-lan"],
    );
}

#[test]
fn symmetric_home_chats_through_the_relay() {
    chat_through_the_relay("relay-symmetric-home", NatKind::Symmetric, NatKind::Home);
}

#[test]
fn symmetric_symmetric_chats_through_the_relay() {
    chat_through_the_relay(
        "relay-symmetric-symmetric",
        NatKind::Symmetric,
        NatKind::Symmetric,
    );
}

#[test]
fn a_relay_at_its_cap_is_refused_with_a_clear_message() {
    let name = "relay-capped";
    if !available_or_skip(name) {
        return;
    }
    let lab = lab(NatKind::Symmetric, NatKind::Home);
    let config = Config {
        max_relays: 0,
        ..Config::default()
    };
    let rv = LabRendezvous::start(&lab, config).expect("rendezvous");
    let outcome = punch(&lab, &rv, bin(), &spec("4-relay-capped")).expect("peers run");
    let Outcome::Failed(f) = outcome else {
        panic!("connected although the relay is capped at zero");
    };
    for text in [&f.a_error, &f.b_error] {
        assert!(text.contains("No relay either"), "{text}");
        assert!(text.contains("relays as many chats as it may"), "{text}");
    }
}

/// A direct chat does not go through the rendezvous: stopping it, and starting
/// it again, changes nothing for the chat.
#[test]
fn a_direct_chat_carries_on_while_the_rendezvous_restarts() {
    let name = "rendezvous-restart";
    if !available_or_skip(name) {
        return;
    }
    let lab = lab(NatKind::Home, NatKind::Rst);
    let rv = LabRendezvous::start(&lab, Config::default()).expect("rendezvous");
    let Outcome::Connected(mut c) =
        punch(&lab, &rv, bin(), &spec("2-restart-chat")).expect("punch")
    else {
        panic!("no direct link");
    };
    c.a.send("before the restart\n").expect("send");
    assert_eq!(c.b.recv().expect("line"), "alice: before the restart");
    drop(rv);
    c.b.send("while it is down\n").expect("send");
    assert_eq!(c.a.recv().expect("line"), "bob: while it is down");
    let rv = LabRendezvous::start(&lab, Config::default()).expect("rendezvous again");
    c.a.send("after it is back\n").expect("send");
    assert_eq!(c.b.recv().expect("line"), "alice: after it is back");
    for p in [&mut c.a, &mut c.b] {
        let seen = p.drain_stderr().join("\n");
        assert!(!seen.contains("dropped"), "{}: {seen}", p.name);
    }
    c.finish().expect("both leave cleanly");
    drop(rv);
}

/// Relayed while the direct path is cut; once it is back, the peers' background
/// try for a direct link succeeds and the chat switches over to it, with every
/// line typed meanwhile arriving exactly once, in order.
#[test]
fn a_relayed_chat_switches_to_a_direct_link_once_one_is_possible() {
    let name = "relay-upgrade";
    if !available_or_skip(name) {
        return;
    }
    let lab = lab(NatKind::Home, NatKind::Home);
    let b_public = lab.public_addr(punchline_lab::Host::B);
    lab.cut_path(punchline_lab::Side::A, b_public)
        .expect("cut the direct path");
    let rv = LabRendezvous::start(&lab, Config::default()).expect("rendezvous");
    let spec = PunchSpec {
        punch_timeout: Duration::from_secs(2),
        extra_args: vec!["--upgrade-interval".into(), "3".into()],
        ..spec("5-relay-upgrade")
    };
    let (mut alice, mut bob) = start_pair(&lab, &rv, bin(), &spec).expect("peers");
    for p in [&mut alice, &mut bob] {
        let line = p
            .wait_stderr_starting(&["connected to ", "peer: "])
            .expect("an outcome");
        assert!(
            line.contains("relayed via the rendezvous"),
            "{}: {line}",
            p.name
        );
    }
    lines_until_direct(&lab, &mut alice, &mut bob, 40);
    leave(&mut alice, &mut bob).expect("both leave cleanly");
}

/// A chat between saved contacts (met with `@NAME`, no code) is a chat like
/// any other once its first link is up: relayed while the direct path is
/// cut, it switches to a direct link once the path is back, and every line
/// arrives exactly once.
#[test]
fn a_contacts_chat_is_relayed_and_switches_to_direct_like_any_other() {
    let name = "contacts-relay-upgrade";
    if !available_or_skip(name) {
        return;
    }
    let lab = lab(NatKind::Home, NatKind::Home);
    let rv = LabRendezvous::start(&lab, Config::default()).expect("rendezvous");
    let config = |side: &str| {
        let dir =
            std::env::temp_dir().join(format!("punchline-{name}-{side}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("config dir");
        dir
    };
    let (ca, cb) = (config("a"), config("b"));
    let peer = |host: Host, who: &str, config: &Path, args: &[&str]| {
        let mut cmd = lab.command(host, bin());
        cmd.args(["--server", &rv.addr.to_string(), "--name", who])
            .args(args)
            .env("RUST_LOG", "punchline_peer=info")
            .env("XDG_CONFIG_HOME", config)
            .env_remove("PUNCHLINE_SERVER");
        PeerProcess::spawn(cmd, who).expect("spawn")
    };
    // First, a chat with a code, each saving the other.
    let mut alice = peer(Host::A, "alice", &ca, &["--save", "bob", "6-contact-chat"]);
    alice
        .wait_stderr("waiting for the other side")
        .expect("waits");
    let mut bob = peer(Host::B, "bob", &cb, &["--save", "alice", "6-contact-chat"]);
    alice
        .wait_stderr("saved as contact bob")
        .expect("alice saves");
    bob.wait_stderr("saved as contact alice")
        .expect("bob saves");
    leave(&mut alice, &mut bob).expect("both leave cleanly");

    // Then as contacts, the direct path cut.
    let b_public = lab.public_addr(Host::B);
    lab.cut_path(punchline_lab::Side::A, b_public)
        .expect("cut the direct path");
    let quick = ["--punch-timeout", "2", "--upgrade-interval", "3"];
    let mut alice = peer(Host::A, "alice", &ca, &[&quick[..], &["@bob"]].concat());
    alice.wait_stderr("waiting for bob").expect("waits");
    let mut bob = peer(Host::B, "bob", &cb, &[&quick[..], &["@alice"]].concat());
    for (p, other) in [(&mut alice, "bob"), (&mut bob, "alice")] {
        let line = p
            .wait_stderr_starting(&["connected to ", "peer: "])
            .unwrap_or_else(|e| panic!("{e}\n{}", lab.diagnostics()));
        assert!(
            line.contains("relayed via the rendezvous"),
            "{}: {line}",
            p.name
        );
        p.wait_stderr(&format!("this is {other}: the key you saved"))
            .expect("authenticated as the contact");
    }
    lines_until_direct(&lab, &mut alice, &mut bob, 30);
    leave(&mut alice, &mut bob).expect("both leave cleanly");
    for dir in [ca, cb] {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Both relayed peers type `lines` lines, 200 ms apart; the direct path comes
/// back after the fifth. Both switch to a direct link, and every line arrives
/// exactly once, in order.
fn lines_until_direct(lab: &Lab, alice: &mut PeerProcess, bob: &mut PeerProcess, lines: u32) {
    for i in 1..=lines {
        alice.send(&format!("a{i}\n")).expect("send");
        bob.send(&format!("b{i}\n")).expect("send");
        if i == 5 {
            lab.restore_path(punchline_lab::Side::A)
                .expect("restore the path");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    for p in [&mut *alice, &mut *bob] {
        let line = p
            .wait_stderr("switched to a direct link")
            .unwrap_or_else(|e| panic!("{e}\n{}", lab.diagnostics()));
        eprintln!("{}: {line}", p.name);
    }
    for (p, from, prefix) in [(&mut *bob, "alice", 'a'), (&mut *alice, "bob", 'b')] {
        let got: Vec<String> = (0..lines)
            .map_while(|_| p.try_recv(Duration::from_secs(30)))
            .collect();
        let want: Vec<String> = (1..=lines)
            .map(|i| format!("{from}: {prefix}{i}"))
            .collect();
        assert_eq!(got, want, "{} received", p.name);
        assert!(
            p.try_recv(Duration::from_secs(1)).is_none(),
            "{}: a line came twice",
            p.name
        );
    }
}
