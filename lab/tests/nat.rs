//! Each NAT kind of the lab checked for the behaviour it stands for, with small
//! TCP programs run inside the lab's namespaces:
//!
//! - an unsolicited SYN from the probe host to the side's public address is
//!   silently dropped (connect times out) or refused (RST), per kind;
//! - two connections from one local port to two destinations (rendezvous and
//!   probe) are seen with the same or different public ports, per kind;
//! - two hosts behind one NAT meet on their LAN, not through the NAT;
//! - a TCP simultaneous open passes two home NATs and fails against a
//!   symmetric one.
//!
//! Needs root; skips loudly otherwise (see `common::lab_available`).

mod common;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use punchline_lab::nat::{RANGE_FIRST_PORT, RANGE_LAST_PORT};
use punchline_lab::{Host, Lab, LabConfig, NatKind, Side, WanConfig};

/// Port probed by unsolicited SYNs; nothing listens on it anywhere.
const CLOSED_PORT: u16 = 9;

/// The peers' fixed local port, outside the `range` kind's port range so a
/// translation is visible.
const PEER_PORT: u16 = 40000;

/// Ports of the reflecting listeners on rv and probe (per side, so the two
/// sides' checks can run at once).
fn reflector_port(side: Side) -> u16 {
    match side {
        Side::A => 7001,
        Side::B => 7002,
    }
}

/// What an unsolicited SYN to a side of `kind` must end in.
fn expected_unsolicited(kind: NatKind) -> io::ErrorKind {
    match kind {
        // Nothing filters: the router's (rst) or host's (public) stack sends RST.
        NatKind::Rst | NatKind::Public => io::ErrorKind::ConnectionRefused,
        NatKind::Home
        | NatKind::Range
        | NatKind::Symmetric
        | NatKind::Firewall
        | NatKind::Cgnat => io::ErrorKind::TimedOut,
    }
}

/// Sends an unsolicited SYN from the probe host to `side`'s public address and
/// checks the outcome for its kind.
fn check_unsolicited(lab: &Lab, side: Side) -> String {
    let kind = lab.nat_kind(side);
    let target = SocketAddrV4::new(lab.public_addr(side.into()), CLOSED_PORT);
    let started = Instant::now();
    let result = common::connect_from(lab, Host::Probe, 0, target, common::SILENT_TIMEOUT);
    let elapsed = started.elapsed();
    let got = match &result {
        Ok(_) => panic!("{kind}: unsolicited connect to {target} succeeded"),
        Err(err) => err.kind(),
    };
    assert_eq!(
        got,
        expected_unsolicited(kind),
        "{kind}: unsolicited SYN to {target}: {result:?}\n{}",
        lab.diagnostics()
    );
    format!(
        "{kind:<9} unsolicited SYN to {target}: {got:?} after {} ms",
        elapsed.as_millis()
    )
}

/// Connects from `side`'s host, local port [`PEER_PORT`], to reflectors on rv
/// and probe at once; returns the two source addresses they observed.
fn observe_mappings(lab: &Lab, side: Side) -> (SocketAddr, SocketAddr) {
    let port = reflector_port(side);
    let rv = common::listen(lab, Host::Rv, port);
    let probe = common::listen(lab, Host::Probe, port);
    let host = Host::from(side);
    let to_rv = SocketAddrV4::new(lab.addr(Host::Rv), port);
    let to_probe = SocketAddrV4::new(lab.addr(Host::Probe), port);
    // Both connections stay open while the second is made, as a peer keeps
    // its rendezvous connection open while punching.
    let first = common::connect_from(lab, host, PEER_PORT, to_rv, common::ACCEPT_TIMEOUT)
        .unwrap_or_else(|err| panic!("{side:?} -> rv: {err}\n{}", lab.diagnostics()));
    let second = common::connect_from(lab, host, PEER_PORT, to_probe, common::ACCEPT_TIMEOUT)
        .unwrap_or_else(|err| panic!("{side:?} -> probe: {err}\n{}", lab.diagnostics()));
    let (_, seen_rv) = common::accept(&rv).expect("rv accepts");
    let (_, seen_probe) = common::accept(&probe).expect("probe accepts");
    drop((first, second));
    (seen_rv, seen_probe)
}

/// Checks the mapping behaviour of `side`'s kind.
fn check_mapping(lab: &Lab, side: Side) -> String {
    let kind = lab.nat_kind(side);
    let (rv, probe) = observe_mappings(lab, side);
    let public = lab.public_addr(side.into());
    let context = format!("{kind}: rv saw {rv}, probe saw {probe}, public address {public}");
    assert_eq!(rv.ip(), public, "{context}");
    assert_eq!(probe.ip(), public, "{context}");
    match kind {
        NatKind::Home | NatKind::Rst | NatKind::Cgnat | NatKind::Public | NatKind::Firewall => {
            assert_eq!(rv.port(), PEER_PORT, "port not preserved: {context}");
            assert_eq!(probe.port(), PEER_PORT, "port not preserved: {context}");
        }
        NatKind::Range => {
            assert_eq!(
                rv.port(),
                probe.port(),
                "mapping not endpoint-independent: {context}"
            );
            assert!(
                (RANGE_FIRST_PORT..=RANGE_LAST_PORT).contains(&rv.port()),
                "port outside the range: {context}"
            );
        }
        NatKind::Symmetric => {
            assert_ne!(
                rv.port(),
                probe.port(),
                "mapping not destination-dependent: {context}"
            );
        }
    }
    context
}

/// Runs both checks on both sides of a lab with sides `a` and `b`.
fn check_kinds(a: NatKind, b: NatKind) {
    let lab = common::build(&LabConfig::new(a, b));
    let report: Vec<String> = std::thread::scope(|scope| {
        let lab = &lab;
        let handles: Vec<_> = [Side::A, Side::B]
            .into_iter()
            .map(|side| {
                scope.spawn(move || {
                    let unsolicited = check_unsolicited(lab, side);
                    let mapping = check_mapping(lab, side);
                    format!("{unsolicited}\n{mapping}")
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    });
    eprintln!("{}", report.join("\n"));
}

#[test]
fn home_and_rst() {
    if common::lab_available("home_and_rst") {
        check_kinds(NatKind::Home, NatKind::Rst);
    }
}

#[test]
fn range_and_symmetric() {
    if common::lab_available("range_and_symmetric") {
        check_kinds(NatKind::Range, NatKind::Symmetric);
    }
}

#[test]
fn public_and_firewall() {
    if common::lab_available("public_and_firewall") {
        check_kinds(NatKind::Public, NatKind::Firewall);
    }
}

#[test]
fn cgnat_with_delay() {
    if !common::lab_available("cgnat_with_delay") {
        return;
    }
    // Also runs the checks with emulated delay on every link.
    let lab = common::build(
        &LabConfig::new(NatKind::Cgnat, NatKind::Home).with_wan(WanConfig::delays_ms(3, 7, 5)),
    );
    assert_eq!(
        lab.routers(Side::A).len(),
        2,
        "cgnat has home + carrier routers"
    );
    eprintln!("{}", check_unsolicited(&lab, Side::A));
    eprintln!("{}", check_mapping(&lab, Side::A));
}

#[test]
fn public_host_accepts_unsolicited_connections() {
    if !common::lab_available("public_host_accepts_unsolicited_connections") {
        return;
    }
    let lab = common::build(&LabConfig::new(NatKind::Public, NatKind::Firewall));
    let listener = common::listen(&lab, Host::A, 7300);
    let target = SocketAddrV4::new(lab.public_addr(Host::A), 7300);
    common::connect_from(&lab, Host::Probe, 0, target, common::ACCEPT_TIMEOUT)
        .expect("a public host is reachable");
    let (_, seen) = common::accept(&listener).expect("accept");
    assert_eq!(seen.ip(), lab.addr(Host::Probe));

    // The same behind the firewall: silently dropped although a server listens.
    let _listener_b = common::listen(&lab, Host::B, 7300);
    let target_b = SocketAddrV4::new(lab.public_addr(Host::B), 7300);
    let err = common::connect_from(&lab, Host::Probe, 0, target_b, common::SILENT_TIMEOUT)
        .expect_err("firewall drops unsolicited inbound");
    assert_eq!(err.kind(), io::ErrorKind::TimedOut);
}

#[test]
fn same_lan_meets_on_the_lan_without_hairpin() {
    if !common::lab_available("same_lan_meets_on_the_lan_without_hairpin") {
        return;
    }
    let lab =
        common::build(&LabConfig::same_lan(NatKind::Home).with_wan(WanConfig::delays_ms(5, 0, 5)));
    assert!(lab.same_lan());
    assert_eq!(lab.public_addr(Host::A), lab.public_addr(Host::B));
    assert_eq!(lab.one_way_delay(Host::A, Host::B), Duration::ZERO);

    // Both are seen by the rendezvous with the one public address.
    let rv = common::listen(&lab, Host::Rv, 7400);
    let to_rv = SocketAddrV4::new(lab.addr(Host::Rv), 7400);
    let _a = common::connect_from(&lab, Host::A, PEER_PORT, to_rv, common::ACCEPT_TIMEOUT)
        .expect("A -> rv");
    let (_, seen_a) = common::accept(&rv).expect("accept A");
    let _b = common::connect_from(&lab, Host::B, PEER_PORT, to_rv, common::ACCEPT_TIMEOUT)
        .expect("B -> rv");
    let (_, seen_b) = common::accept(&rv).expect("accept B");
    assert_eq!(seen_a.ip(), seen_b.ip());
    assert_eq!(seen_a.ip(), lab.public_addr(Host::A));
    // Same public address and private port: the NAT must pick another port for B.
    assert_ne!(seen_a.port(), seen_b.port());

    // B reaches A directly on the LAN...
    let a_server = common::listen(&lab, Host::A, 7500);
    let lan = SocketAddrV4::new(lab.addr(Host::A), 7500);
    common::connect_from(&lab, Host::B, 0, lan, common::ACCEPT_TIMEOUT).expect("B -> A on LAN");
    let (_, seen) = common::accept(&a_server).expect("accept on LAN");
    assert_eq!(seen.ip(), lab.addr(Host::B));

    // ...but not through the NAT's public address: no hairpin, no port forward.
    let public = SocketAddrV4::new(lab.public_addr(Host::A), 7500);
    let err = common::connect_from(&lab, Host::B, 0, public, common::SILENT_TIMEOUT)
        .expect_err("no hairpin");
    eprintln!(
        "same LAN: B -> A's public address {public}: {:?}",
        err.kind()
    );
}

#[test]
fn overlapping_lans_give_both_hosts_one_address() {
    if !common::lab_available("overlapping_lans_give_both_hosts_one_address") {
        return;
    }
    let lab = common::build(&LabConfig::new(NatKind::Home, NatKind::Home).with_overlapping_lans());
    assert_eq!(lab.addr(Host::A), lab.addr(Host::B));
    assert_ne!(lab.public_addr(Host::A), lab.public_addr(Host::B));
    // A's LAN address, tried from B, is B itself: B's own stack refuses.
    let _a_server = common::listen(&lab, Host::A, 7600);
    let err = common::connect_from(
        &lab,
        Host::B,
        0,
        SocketAddrV4::new(lab.addr(Host::A), 7600),
        common::SILENT_TIMEOUT,
    )
    .expect_err("B's own address has no listener");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
}

/// Deadline for a simultaneous open in the lab (covers the 1 s SYN retransmit
/// of a dropped first SYN, and several RST retries).
const PUNCH_DEADLINE: Duration = Duration::from_secs(4);

/// Pause between punch attempts after a refusal.
const PUNCH_RETRY: Duration = Duration::from_millis(20);

/// Both hosts learn their mapping at rv, then connect to each other's mapped
/// address from the same port at once, retrying refusals until the deadline.
/// Returns each side's outcome.
fn punch(lab: &Lab) -> [io::Result<SocketAddr>; 2] {
    let rv = common::listen(lab, Host::Rv, 7700);
    let to_rv = SocketAddrV4::new(lab.addr(Host::Rv), 7700);
    let keep_a = common::connect_from(lab, Host::A, PEER_PORT, to_rv, common::ACCEPT_TIMEOUT)
        .expect("A -> rv");
    let (_, seen_a) = common::accept(&rv).expect("accept A");
    let keep_b = common::connect_from(lab, Host::B, PEER_PORT, to_rv, common::ACCEPT_TIMEOUT)
        .expect("B -> rv");
    let (_, seen_b) = common::accept(&rv).expect("accept B");
    let targets = [(Host::A, seen_b), (Host::B, seen_a)];
    let outcomes = std::thread::scope(|scope| {
        let handles: Vec<_> = targets
            .iter()
            .map(|&(host, target)| {
                scope.spawn(move || {
                    let SocketAddr::V4(target) = target else {
                        return Err(io::Error::other("not IPv4"));
                    };
                    let deadline = Instant::now() + PUNCH_DEADLINE;
                    loop {
                        let left = deadline.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            return Err(io::Error::new(io::ErrorKind::TimedOut, "punch deadline"));
                        }
                        match common::connect_from(lab, host, PEER_PORT, target, left) {
                            Ok(mut stream) => {
                                // Prove the link carries data both ways.
                                stream.write_all(b"x")?;
                                let mut byte = [0u8; 1];
                                stream.read_exact(&mut byte)?;
                                return stream.peer_addr();
                            }
                            Err(err) if err.kind() == io::ErrorKind::ConnectionRefused => {
                                std::thread::sleep(PUNCH_RETRY);
                            }
                            Err(err) => return Err(err),
                        }
                    }
                })
            })
            .collect();
        let mut results = handles.into_iter().map(|h| {
            h.join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        });
        let first = results
            .next()
            .unwrap_or_else(|| Err(io::Error::other("no result")));
        let second = results
            .next()
            .unwrap_or_else(|| Err(io::Error::other("no result")));
        [first, second]
    });
    drop((keep_a, keep_b));
    outcomes
}

#[test]
fn simultaneous_open_passes_two_home_nats() {
    if !common::lab_available("simultaneous_open_passes_two_home_nats") {
        return;
    }
    let lab = common::build(
        &LabConfig::new(NatKind::Home, NatKind::Home).with_wan(WanConfig::delays_ms(5, 15, 10)),
    );
    let [a, b] = punch(&lab);
    let a = a.unwrap_or_else(|err| panic!("A's punch: {err}\n{}", lab.diagnostics()));
    let b = b.unwrap_or_else(|err| panic!("B's punch: {err}\n{}", lab.diagnostics()));
    assert_eq!(a, SocketAddr::from((lab.public_addr(Host::B), PEER_PORT)));
    assert_eq!(b, SocketAddr::from((lab.public_addr(Host::A), PEER_PORT)));
}

#[test]
fn simultaneous_open_fails_against_symmetric_nat() {
    if !common::lab_available("simultaneous_open_fails_against_symmetric_nat") {
        return;
    }
    let lab = common::build(&LabConfig::new(NatKind::Symmetric, NatKind::Home));
    let [a, b] = punch(&lab);
    assert!(
        a.is_err() && b.is_err(),
        "punch through symmetric NAT: A {a:?}, B {b:?}"
    );
}
