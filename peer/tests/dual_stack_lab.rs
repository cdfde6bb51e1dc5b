//! IPv6 beside IPv4, and IPv6 alone, through the NAT lab: each side's host has
//! a global IPv6 address behind its router's stateful firewall (unsolicited
//! inbound dropped), the rendezvous is dual-stack and the peers are given its
//! name, which resolves to both of its addresses (as a real deployment with A
//! and AAAA records). A chat whose IPv4 NATs cannot be punched (symmetric on
//! both sides) must be direct over IPv6, and say so; so must a chat between
//! two hosts with no IPv4 at all. The doctor must see the IPv6 firewall.
//!
//! Needs root and the lab's tools; skips loudly otherwise (fails instead when
//! `PUNCHLINE_REQUIRE_LAB=1`, as in CI).

mod common;

use punchline_lab::prereq::available_or_skip;
use punchline_lab::scenario::{leave, LabRendezvous, PeerProcess};
use punchline_lab::{Host, Lab, LabConfig, NatKind, WanConfig};
use punchline_rendezvous::Config;

use common::{lab_doctor, lab_peer};

fn lab(config: LabConfig) -> Lab {
    let config = config.with_wan(WanConfig::delays_ms(5, 40, 20));
    Lab::build(&config).unwrap_or_else(|e| panic!("building {config:?}: {e}"))
}

/// A peer on `host` meeting through the rendezvous' name.
fn peer(lab: &Lab, rv: &LabRendezvous, test: &str, host: Host, name: &str) -> PeerProcess {
    lab_peer(lab, rv, test, host, name, &[])
}

/// Both sides meet; each must report a direct link to the other's global
/// IPv6 address, as a public address; then a line goes each way.
fn direct_over_ipv6(test: &str, config: LabConfig) {
    if !available_or_skip(test) {
        return;
    }
    let lab = lab(config);
    let rv = LabRendezvous::start(&lab, Config::default()).expect("rendezvous starts");
    let mut a = peer(&lab, &rv, test, Host::A, "alice");
    a.wait_stderr("waiting for the other side")
        .unwrap_or_else(|e| panic!("{test}: {e}\n{}", lab.diagnostics()));
    let mut b = peer(&lab, &rv, test, Host::B, "bob");
    for (p, other) in [(&mut a, Host::B), (&mut b, Host::A)] {
        let up = p
            .wait_stderr_starting(&["connected to ", "peer: "])
            .unwrap_or_else(|e| panic!("{test}: {e}\n{}", lab.diagnostics()));
        let v6 = lab.addr6(other).expect("the other host has IPv6");
        eprintln!("{test}: {}: {up}", p.name);
        assert!(up.contains("direct link to ["), "{test}: {}: {up}", p.name);
        assert!(
            up.contains(&format!("[{v6}]:")),
            "{test}: {}: not to the other's IPv6 address {v6}: {up}",
            p.name
        );
        assert!(
            up.contains("(IPv6, public address)"),
            "{test}: {}: {up}",
            p.name
        );
    }
    a.send("over IPv6 from alice\n").expect("send");
    assert_eq!(b.recv().expect("line"), "alice: over IPv6 from alice");
    b.send("over IPv6 from bob\n").expect("send");
    assert_eq!(a.recv().expect("line"), "bob: over IPv6 from bob");
    leave(&mut a, &mut b).unwrap_or_else(|e| panic!("{test}: {e}"));
}

/// Symmetric NATs on both sides: no direct IPv4 link is possible (the lab's
/// `symmetric_home_fails…` shows it), but both hosts have IPv6.
#[test]
fn symmetric_ipv4_on_both_sides_goes_direct_over_ipv6() {
    direct_over_ipv6(
        "dual-symmetric-symmetric",
        LabConfig::new(NatKind::Symmetric, NatKind::Symmetric).with_ipv6(),
    );
}

/// A symmetric NAT against a home NAT, IPv6 beside both.
#[test]
fn symmetric_against_home_goes_direct_over_ipv6() {
    direct_over_ipv6(
        "dual-symmetric-home",
        LabConfig::new(NatKind::Symmetric, NatKind::Home).with_ipv6(),
    );
}

/// No IPv4 on either peer: everything, the rendezvous included, over IPv6.
#[test]
fn ipv6_only_hosts_go_direct() {
    direct_over_ipv6(
        "ipv6-only",
        LabConfig::new(NatKind::Home, NatKind::Firewall).with_ipv6_only(),
    );
}

/// The doctor behind a symmetric NAT with IPv6 beside it: the IPv6 line shows
/// the host's own global address and the firewall dropping an unsolicited
/// SYN, and the verdict says chats can be direct over IPv6 (exit status 0).
#[test]
fn the_doctor_sees_the_ipv6_firewall() {
    let test = "doctor-dual-symmetric";
    if !available_or_skip(test) {
        return;
    }
    let lab = lab(LabConfig::new(NatKind::Symmetric, NatKind::Home).with_ipv6());
    let rv = LabRendezvous::start(&lab, Config::default()).expect("rendezvous starts");
    let (status, report, stderr) = lab_doctor(&lab, &rv.by_name());
    let context = format!("{report}\n{stderr}\n{}", lab.diagnostics());
    let v6 = lab.addr6(Host::A).expect("IPv6");
    let line = report
        .lines()
        .find(|l| l.starts_with("IPv6"))
        .unwrap_or_else(|| panic!("no IPv6 line: {context}"));
    assert!(
        line.contains(&format!("sees this host as [{v6}]:")),
        "{context}"
    );
    assert!(line.contains("dropped (a stateful firewall"), "{context}");
    assert!(
        report.contains("chats with peers that have IPv6 can be direct over it"),
        "{context}"
    );
    assert!(status.success(), "{context}");
}
