//! Port mapping through the NAT lab: side A sits behind a symmetric NAT whose
//! router grants mappings (the lab's PCP, NAT-PMP and UPnP-IGD responder), side B behind
//! a home NAT. Without the mapping no direct link can form (`nat_lab.rs`,
//! `symmetric_home_fails…`); with it the chat is direct, B's side names the
//! forwarded port it reached, and the router holds no mapping once the link is
//! up, nor after Ctrl-C on a waiting peer.
//!
//! Needs root and the lab's tools; skips loudly otherwise (fails instead when
//! `PUNCHLINE_REQUIRE_LAB=1`, as in CI).

mod common;

use std::time::{Duration, Instant};

use punchline_lab::portmap::{Protocols, Responder, Via};
use punchline_lab::prereq::available_or_skip;
use punchline_lab::scenario::{leave, LabRendezvous, PeerProcess};
use punchline_lab::{Host, Lab, LabConfig, NatKind, WanConfig};
use punchline_rendezvous::Config;

use common::{lab_doctor, lab_peer};

/// The lab, its side A's router granting mappings in `protocols`.
fn lab(protocols: Protocols) -> Lab {
    let config = LabConfig::new(NatKind::Symmetric, NatKind::Home)
        .with_wan(WanConfig::delays_ms(5, 40, 20))
        .with_port_mapping(protocols);
    Lab::build(&config).unwrap_or_else(|e| panic!("building the lab: {e}"))
}

/// Side A's router's responder.
fn responder(lab: &Lab) -> &Responder {
    lab.portmap().expect("the lab's router grants mappings")
}

fn peer(lab: &Lab, rv: &LabRendezvous, test: &str, host: Host, name: &str) -> PeerProcess {
    lab_peer(lab, rv, test, host, name, &["--no-relay"])
}

/// Waits until `responder` holds `count` mappings (within 5 s).
fn wait_for_mappings(responder: &Responder, count: usize) -> bool {
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        if responder.mappings().len() == count {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Alice (behind the symmetric NAT, her router mapping) and Bob (home NAT)
/// chat direct through the mapping; `alice_first`: she waits for him, else
/// he for her. Either way her hello names the mapping (granted by the
/// router before the rendezvous answers her connection), so it reaches Bob
/// with the go, as a port her router forwards.
fn direct_through_the_mapping(test: &str, protocols: Protocols, alice_first: bool) {
    if !available_or_skip(test) {
        return;
    }
    let lab = lab(protocols);
    let responder = responder(&lab);
    let rv = LabRendezvous::start(&lab, Config::default()).expect("rendezvous starts");
    let waiting = |p: &mut PeerProcess| {
        p.wait_stderr("waiting for the other side")
            .unwrap_or_else(|e| panic!("{test}: {e}\n{}", lab.diagnostics()));
    };
    let mut b = None;
    if !alice_first {
        let mut bob = peer(&lab, &rv, test, Host::B, "bob");
        waiting(&mut bob);
        b = Some(bob);
    }
    let mut a = peer(&lab, &rv, test, Host::A, "alice");
    if alice_first {
        waiting(&mut a);
    }
    assert!(
        wait_for_mappings(responder, 1),
        "{test}: alice's router holds no mapping while she meets"
    );
    let granted = responder.mappings()[0];
    let mapped = granted.external;
    assert_eq!(
        mapped.port(),
        40000,
        "{test}: the same external port, as asked"
    );
    let via = if protocols.pcp {
        Via::Pcp
    } else if protocols.nat_pmp {
        Via::NatPmp
    } else {
        Via::Upnp
    };
    assert_eq!(granted.via, via, "{test}");
    let mut b = b.unwrap_or_else(|| peer(&lab, &rv, test, Host::B, "bob"));
    let a_up = a
        .wait_stderr_starting(&["connected to ", "peer: "])
        .unwrap_or_else(|e| panic!("{test}: {e}\n{}", lab.diagnostics()));
    let b_up = b
        .wait_stderr_starting(&["connected to ", "peer: "])
        .unwrap_or_else(|e| panic!("{test}: {e}\n{}", lab.diagnostics()));
    assert!(a_up.contains("direct link"), "{test}: alice: {a_up}");
    assert!(
        b_up.contains(&format!(
            "direct link to {mapped} (IPv4, a port its router forwards)"
        )),
        "{test}: bob: {b_up}"
    );
    // The link keeps its translation; the mapping itself goes.
    assert!(
        wait_for_mappings(responder, 0),
        "{test}: the mapping outlived the meeting: {:?}",
        responder.mappings()
    );
    a.send("through the mapping\n").expect("send");
    assert_eq!(b.recv().expect("line"), "alice: through the mapping");
    b.send("and back\n").expect("send");
    assert_eq!(a.recv().expect("line"), "bob: and back");
    leave(&mut a, &mut b).unwrap_or_else(|e| panic!("{test}: {e}"));
}

#[test]
fn a_symmetric_nat_with_pcp_goes_direct() {
    direct_through_the_mapping("portmap-pcp-direct", Protocols::BOTH, true);
}

#[test]
fn a_symmetric_nat_with_pcp_joining_second_goes_direct() {
    direct_through_the_mapping("portmap-pcp-second", Protocols::BOTH, false);
}

#[test]
fn a_symmetric_nat_with_nat_pmp_goes_direct() {
    direct_through_the_mapping(
        "portmap-natpmp-direct",
        Protocols {
            nat_pmp: true,
            pcp: false,
            upnp: false,
        },
        true,
    );
}

#[test]
fn a_symmetric_nat_with_upnp_goes_direct() {
    direct_through_the_mapping("portmap-upnp-direct", Protocols::UPNP, true);
}

/// Ctrl-C on a peer waiting for the other: it leaves with status 130 and its
/// router holds no mapping after.
#[test]
fn ctrl_c_while_waiting_deletes_the_mapping() {
    ctrl_c_deletes("portmap-ctrl-c", Protocols::BOTH, false);
}

/// The same with a UPnP-IGD router that grants only permanent leases (as
/// many do): the peer takes one, and deletes it all the same.
#[test]
fn ctrl_c_deletes_a_permanent_upnp_mapping() {
    ctrl_c_deletes("portmap-ctrl-c-upnp", Protocols::UPNP, true);
}

fn ctrl_c_deletes(test: &str, protocols: Protocols, only_permanent: bool) {
    if !available_or_skip(test) {
        return;
    }
    let lab = lab(protocols);
    let responder = responder(&lab);
    responder.only_permanent_leases(only_permanent);
    let rv = LabRendezvous::start(&lab, Config::default()).expect("rendezvous starts");
    let mut a = peer(&lab, &rv, test, Host::A, "alice");
    a.wait_stderr("waiting for the other side")
        .unwrap_or_else(|e| panic!("{test}: {e}\n{}", lab.diagnostics()));
    assert!(wait_for_mappings(responder, 1), "{test}: no mapping");
    if only_permanent {
        let lease = responder.mappings()[0].expires - Instant::now();
        assert!(
            lease > Duration::from_secs(86_400),
            "{test}: not a permanent lease: {lease:?}"
        );
    }
    a.interrupt().expect("SIGINT");
    let status = a.wait().expect("alice exits");
    let said = a.drain_stderr().join("\n");
    assert_eq!(status.code(), Some(130), "{test}: {status:?}\n{said}");
    assert!(
        responder.mappings().is_empty(),
        "{test}: the mapping outlived Ctrl-C: {:?}\n{said}",
        responder.mappings()
    );
}

/// The doctor behind the symmetric NAT whose router maps (in PCP and
/// UPnP-IGD: NAT-PMP is not asked once PCP answers): it names the protocols
/// and the forwarded address, calls direct chats workable (exit status 0),
/// and leaves no mapping behind.
#[test]
fn the_doctor_finds_the_routers_port_mapping() {
    let test = "portmap-doctor";
    if !available_or_skip(test) {
        return;
    }
    let lab = lab(Protocols::ALL);
    let responder = responder(&lab);
    let rv = LabRendezvous::start(&lab, Config::default()).expect("rendezvous starts");
    let (status, report, stderr) = lab_doctor(&lab, &rv.addr.to_string());
    let context = format!("{report}\n{stderr}");
    let wan = lab.public_addr(Host::A);
    assert!(
        report.contains(&format!(
            "offered by the router (PCP, UPnP-IGD): it forwarded {wan}:40000 to this host's port 40000"
        )),
        "{context}"
    );
    assert!(report.contains("forwards the port on request"), "{context}");
    assert!(status.success(), "{context}");
    assert!(responder.mappings().is_empty(), "{context}");
}

/// A peer that ends on an error while it waits (the rendezvous goes away)
/// deletes its mapping on the way out too, not only on Ctrl-C.
#[test]
fn an_error_exit_deletes_the_mapping() {
    let test = "portmap-error-exit";
    if !available_or_skip(test) {
        return;
    }
    let lab = lab(Protocols::BOTH);
    let responder = responder(&lab);
    let rv = LabRendezvous::start(&lab, Config::default()).expect("rendezvous starts");
    let mut a = peer(&lab, &rv, test, Host::A, "alice");
    a.wait_stderr("waiting for the other side")
        .unwrap_or_else(|e| panic!("{test}: {e}\n{}", lab.diagnostics()));
    assert!(wait_for_mappings(responder, 1), "{test}: no mapping");
    // The rendezvous shuts down: it tells the waiting peer, which ends.
    drop(rv);
    let status = a.wait().expect("alice exits");
    assert!(!status.success(), "{test}: {status:?}");
    assert!(
        responder.mappings().is_empty(),
        "{test}: the mapping outlived the error exit: {:?}",
        responder.mappings()
    );
}

/// A peer that ends soon after it starts (here: its rendezvous refuses the
/// connection) while a slow UPnP-IGD router (each action takes 0.95 s,
/// permanent leases only) is still being asked. The ask goes on past the
/// end of the search: 725 at 0.95 s, the permanent mapping made at 1.9 s,
/// its external address at 2.85 s, past the 2.5 s that `release_all` waits
/// for asks under way. So the program ends with the permanent mapping in
/// the router, where it stays for good. An ask must stop asking once the
/// program ends, and delete what the request under way made.
#[test]
fn a_slow_upnp_router_keeps_no_mapping_of_a_peer_that_ended() {
    let test = "portmap-slow-upnp-end";
    if !available_or_skip(test) {
        return;
    }
    let lab = lab(Protocols::UPNP);
    let responder = responder(&lab);
    responder.only_permanent_leases(true);
    responder.delay_actions(Duration::from_millis(950));
    let mut rv = LabRendezvous::start(&lab, Config::default()).expect("rendezvous starts");
    // A port of the rendezvous host where nothing listens: refused at once.
    rv.addr.set_port(rv.addr.port().wrapping_add(50));
    let mut a = peer(&lab, &rv, test, Host::A, "alice");
    let status = a.wait().expect("alice exits");
    let said = a.drain_stderr().join("\n");
    assert_ne!(status.code(), Some(0), "{test}: {status:?}\n{said}");
    // What the router was asked before alice ended is done by now.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        responder.mappings().is_empty(),
        "{test}: a mapping outlived the program: {:?}\n{said}",
        responder.mappings()
    );
}

/// Another UPnP-IGD device on the LAN (here on alice's own host: a second
/// router in access-point mode, a host sharing its connection, or a hostile
/// one) answers the SSDP search before the router. It is rightly not asked
/// (it is not the gateway), but the router is not asked either: the search
/// ends with the first device found, so alice gets no mapping, and behind
/// her symmetric NAT no direct link. The gateway should still be asked
/// (a search sent to it alone).
#[test]
fn another_upnp_device_on_the_lan_does_not_hide_the_router() {
    let test = "portmap-upnp-decoy";
    if !available_or_skip(test) {
        return;
    }
    let lab = lab(Protocols::UPNP);
    let responder = responder(&lab);
    // The router spreads its answers to multicast searches over their MX
    // seconds, as real ones do: here it answers after 300 ms.
    responder.delay_multicast_search_answers(Duration::from_millis(300));
    // A UPnP-IGD device on alice's host, answering searches from there (at
    // once: it is nearer than the router).
    let decoy = Responder::start(
        lab.netns(Host::A),
        lab.addr(Host::A),
        lab.public_addr(Host::A),
        "lo",
        Protocols::UPNP,
    )
    .expect("the decoy starts");
    let rv = LabRendezvous::start(&lab, Config::default()).expect("rendezvous starts");
    let mut a = peer(&lab, &rv, test, Host::A, "alice");
    a.wait_stderr("waiting for the other side")
        .unwrap_or_else(|e| panic!("{test}: {e}\n{}", lab.diagnostics()));
    let mapped = wait_for_mappings(responder, 1);
    let decoys = decoy.mappings();
    a.interrupt().expect("SIGINT");
    let _ = a.wait();
    let said = a.drain_stderr().join("\n");
    assert!(decoys.is_empty(), "{test}: the decoy was asked: {decoys:?}");
    assert!(
        mapped,
        "{test}: the router was not asked for a mapping\n{said}"
    );
}
