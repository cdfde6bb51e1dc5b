//! `peer doctor` behind every kind of NAT in the lab: what it reports about the
//! NAT, the mapping and unsolicited SYNs, and its verdict, must match how the
//! lab built that NAT.
//!
//! Needs root and the lab's tools; skips loudly otherwise (fails instead when
//! `PUNCHLINE_REQUIRE_LAB=1`, as in CI).

mod common;

use punchline_lab::prereq::available_or_skip;
use punchline_lab::scenario::LabRendezvous;
use punchline_lab::{Host, Lab, LabConfig, NatKind};
use punchline_rendezvous::Config;

use common::lab_doctor;

/// What the doctor must find behind one kind of NAT.
struct Expected {
    nat: &'static str,
    mapping: &'static str,
    inbound: &'static str,
    verdict: &'static str,
    success: bool,
}

fn expected(kind: NatKind) -> Expected {
    const NAT: &str = "yes (the rendezvous sees";
    const NO_NAT: &str = "no: this host has a public address";
    const EIM: &str = "endpoint-independent";
    const DROPPED: &str = "dropped silently";
    const RESET: &str = "reset at once";
    const GOOD: &str =
        "direct chats should work: your NAT keeps one public port for every destination and drops";
    match kind {
        NatKind::Home | NatKind::Range | NatKind::Cgnat => Expected {
            nat: NAT,
            mapping: EIM,
            inbound: DROPPED,
            verdict: GOOD,
            success: true,
        },
        NatKind::Rst => Expected {
            nat: NAT,
            mapping: EIM,
            inbound: RESET,
            verdict: "direct chats should work: your NAT keeps one public port for every destination; it answers unsolicited SYNs with a reset",
            success: true,
        },
        NatKind::Symmetric => Expected {
            nat: NAT,
            mapping: "depends on the destination (\"symmetric\")",
            inbound: DROPPED,
            verdict: "direct chats will only work with a peer on your own LAN",
            success: false,
        },
        NatKind::Public => Expected {
            nat: NO_NAT,
            mapping: EIM,
            inbound: RESET,
            verdict: "direct chats should work: this host has a public address",
            success: true,
        },
        NatKind::Firewall => Expected {
            nat: NO_NAT,
            mapping: EIM,
            inbound: DROPPED,
            verdict: "direct chats should work: this host has a public address",
            success: true,
        },
    }
}

/// The value of a report line, by its label.
fn field<'a>(report: &'a str, label: &str) -> &'a str {
    report
        .lines()
        .find_map(|l| l.strip_prefix(label))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {label:?} line in\n{report}"))
}

fn diagnose(kind: NatKind) {
    let name = format!("doctor-{kind}");
    if !available_or_skip(&name) {
        return;
    }
    let lab = Lab::build(&LabConfig::new(kind, NatKind::Home))
        .unwrap_or_else(|e| panic!("building the {kind} lab: {e}"));
    let rv = LabRendezvous::start(&lab, Config::default()).expect("rendezvous starts");
    let (status, report, stderr) = lab_doctor(&lab, &rv.addr.to_string());
    let want = expected(kind);
    eprintln!("{kind}:\n{report}");
    let context = format!("{kind}:\n{report}\n{stderr}\n{}", lab.diagnostics());
    assert_eq!(status.success(), want.success, "{context}");
    assert!(field(&report, "NAT").starts_with(want.nat), "{context}");
    assert!(
        field(&report, "mapping").starts_with(want.mapping),
        "{context}"
    );
    assert!(
        field(&report, "unsolicited inbound SYN").starts_with(want.inbound),
        "{context}"
    );
    assert!(
        field(&report, "verdict:").starts_with(want.verdict),
        "{context}"
    );
    assert!(
        field(&report, "simultaneous open").starts_with("works"),
        "{context}"
    );
    // The public address the doctor reports is the lab's: the NAT's outside
    // address, or the host's own when nothing translates.
    let public = field(&report, "public address");
    let outside = lab.public_addr(Host::A);
    assert!(public.starts_with(&format!("{outside}:")), "{context}");
    let kept = public.ends_with(":40000");
    match kind {
        NatKind::Range => {
            assert!(!kept, "{context}");
            assert!(
                field(&report, "port preserved").starts_with("no"),
                "{context}"
            );
        }
        NatKind::Home | NatKind::Rst | NatKind::Cgnat => {
            assert!(
                field(&report, "port preserved").starts_with("yes"),
                "{context}"
            )
        }
        _ => {}
    }
}

#[test]
fn doctor_home() {
    diagnose(NatKind::Home);
}

#[test]
fn doctor_rst() {
    diagnose(NatKind::Rst);
}

#[test]
fn doctor_range() {
    diagnose(NatKind::Range);
}

#[test]
fn doctor_symmetric() {
    diagnose(NatKind::Symmetric);
}

#[test]
fn doctor_public() {
    diagnose(NatKind::Public);
}

#[test]
fn doctor_firewall() {
    diagnose(NatKind::Firewall);
}

#[test]
fn doctor_cgnat() {
    diagnose(NatKind::Cgnat);
}
