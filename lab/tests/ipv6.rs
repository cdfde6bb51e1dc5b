//! The lab with IPv6, checked with small TCP programs (and ping, getent) run
//! inside its namespaces:
//!
//! - dual stack: hosts reach the rendezvous over IPv6 with their own global
//!   address as the source (no translation), next to translated IPv4;
//! - each side's IPv6 policy: an unsolicited SYN from the probe host to a host
//!   behind any router is dropped (even with a server listening), to a public
//!   host it connects;
//! - a TCP simultaneous open over IPv6 passes both stateful firewalls, also
//!   next to a symmetric NAT, which defeats the same punch over IPv4;
//! - IPv6 only: hosts A and B have no IPv4 address or route, and reach the
//!   rendezvous over IPv6;
//! - the WAN emulator delays and drops IPv6 like IPv4;
//! - the hosts file names the rendezvous in both families;
//! - a path can be cut and restored over IPv6;
//! - two hosts on one LAN meet there over IPv6; overlapping IPv4 LANs keep
//!   distinct IPv6 addresses;
//! - `lab up --ipv6-only` shows the addresses and tears everything down.
//!
//! Needs root, ip6tables and a kernel with IPv6; skips loudly otherwise (see
//! `common::lab6_available`).

mod common;

use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use punchline_lab::{
    netns, Host, Ipv6Mode, Lab, LabConfig, LinkShape, NatKind, Side, WanConfig, RV_ADDR, RV_ADDR6,
    RV_NAME,
};

/// The peers' fixed local port.
const PEER_PORT: u16 = 40000;

/// Port of the servers that unsolicited SYNs are sent to.
const SERVER_PORT: u16 = 7300;

/// Deadline for the IPv6 simultaneous open: covers one 1 s SYN retransmission.
const PUNCH_DEADLINE: Duration = Duration::from_secs(4);

/// How long `lab up` may take to build and to tear down.
const LAB_UP_TIMEOUT: Duration = Duration::from_secs(20);

/// Allowed relative error of a median ping RTT against the model.
const TOLERANCE: f64 = 0.10;

fn addr6(lab: &Lab, host: Host) -> Ipv6Addr {
    lab.addr6(host)
        .unwrap_or_else(|| panic!("{host:?} has no IPv6 address in {:?}", lab.ipv6()))
}

fn sock6(lab: &Lab, host: Host, port: u16) -> SocketAddr {
    SocketAddr::from((addr6(lab, host), port))
}

/// Connects from `host`, port [`PEER_PORT`], to a listener on the rendezvous
/// host's address `rv` and returns the source address the rendezvous saw.
fn seen_by_rv(lab: &Lab, host: Host, rv: SocketAddr) -> SocketAddr {
    let listener = common::listen_at(lab, Host::Rv, rv);
    let _stream = common::connect_to(lab, host, PEER_PORT, rv, common::ACCEPT_TIMEOUT)
        .unwrap_or_else(|err| panic!("{host:?} -> {rv}: {err}\n{}", lab.diagnostics()));
    let (_, seen) = common::accept(&listener).expect("rv accepts");
    seen
}

#[test]
fn dual_stack_hosts_reach_the_rendezvous_untranslated() {
    if !common::lab6_available("dual_stack_hosts_reach_the_rendezvous_untranslated") {
        return;
    }
    let lab = common::build(&LabConfig::new(NatKind::Symmetric, NatKind::Home).with_ipv6());
    assert_eq!(lab.ipv6(), Ipv6Mode::DualStack);
    assert_eq!(lab.addr6(Host::Rv), Some(RV_ADDR6));
    assert_eq!(addr6(&lab, Host::A).to_string(), "2001:db8:a:1::10");
    assert_eq!(addr6(&lab, Host::B).to_string(), "2001:db8:b:1::10");
    assert_eq!(addr6(&lab, Host::Probe).to_string(), "2001:db8:0:18::10");
    assert_eq!(lab.public_addr6(Host::A), lab.addr6(Host::A));
    for host in [Host::A, Host::B, Host::Rv, Host::Probe] {
        assert!(lab.has_ipv4(host), "{host:?}");
    }
    let described = lab.describe();
    assert!(described.contains("2001:db8:a:1::10"), "{described}");

    for (host, port) in [(Host::A, 7801), (Host::B, 7802)] {
        // IPv6: the rendezvous sees the host's own address and port.
        let seen = seen_by_rv(&lab, host, sock6(&lab, Host::Rv, port));
        assert_eq!(seen, sock6(&lab, host, PEER_PORT), "{host:?} over IPv6");
        // IPv4 next to it: still translated by the NAT.
        let seen4 = seen_by_rv(&lab, host, SocketAddr::from((RV_ADDR, port)));
        assert_eq!(seen4.ip(), lab.public_addr(host), "{host:?} over IPv4");
        assert_ne!(seen4.ip(), lab.addr(host), "{host:?} over IPv4");
        eprintln!("{host:?}: rv saw {seen} over IPv6, {seen4} over IPv4");
    }
}

/// Sends an unsolicited SYN from the probe host to `side`'s host over IPv6,
/// where a server listens, and checks the outcome for the side's kind: only a
/// public host answers.
fn check_unsolicited6(lab: &Lab, side: Side) -> String {
    let kind = lab.nat_kind(side);
    let host = Host::from(side);
    let target = sock6(lab, host, SERVER_PORT);
    let listener = common::listen_at(lab, host, target);
    let started = Instant::now();
    let result = common::connect_to(lab, Host::Probe, 0, target, common::SILENT_TIMEOUT);
    let elapsed = started.elapsed();
    if kind == NatKind::Public {
        result.unwrap_or_else(|err| panic!("{kind}: connect to {target}: {err}"));
        let (_, seen) = common::accept(&listener).expect("accept");
        assert_eq!(seen.ip(), IpAddr::V6(addr6(lab, Host::Probe)), "{kind}");
    } else {
        let err = match result {
            Ok(_) => panic!("{kind}: unsolicited IPv6 connect to {target} succeeded"),
            Err(err) => err,
        };
        assert_eq!(
            err.kind(),
            io::ErrorKind::TimedOut,
            "{kind}: unsolicited SYN to {target}: {err}\n{}",
            lab.diagnostics()
        );
        listener.set_nonblocking(true).expect("non-blocking");
        assert!(listener.accept().is_err(), "{kind}: the SYN got through");
    }
    format!(
        "{kind:<9} unsolicited IPv6 SYN to {target}: {} after {} ms",
        if kind == NatKind::Public {
            "connected"
        } else {
            "no answer"
        },
        elapsed.as_millis()
    )
}

/// Runs [`check_unsolicited6`] on both sides of a dual-stack lab at once.
fn check_ipv6_policies(a: NatKind, b: NatKind) -> Lab {
    let lab = common::build(&LabConfig::new(a, b).with_ipv6());
    let report: Vec<String> = std::thread::scope(|scope| {
        let lab = &lab;
        let handles: Vec<_> = [Side::A, Side::B]
            .into_iter()
            .map(|side| scope.spawn(move || check_unsolicited6(lab, side)))
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
    lab
}

#[test]
fn ipv6_firewall_of_symmetric_and_home_drops_unsolicited() {
    if common::lab6_available("ipv6_firewall_of_symmetric_and_home_drops_unsolicited") {
        check_ipv6_policies(NatKind::Symmetric, NatKind::Home);
    }
}

#[test]
fn ipv6_public_host_answers_and_rst_router_drops() {
    if common::lab6_available("ipv6_public_host_answers_and_rst_router_drops") {
        check_ipv6_policies(NatKind::Public, NatKind::Rst);
    }
}

#[test]
fn ipv6_firewall_and_cgnat_drop_unsolicited() {
    if !common::lab6_available("ipv6_firewall_and_cgnat_drop_unsolicited") {
        return;
    }
    let lab = check_ipv6_policies(NatKind::Cgnat, NatKind::Firewall);
    // The carrier only forwards IPv6; the home router filters it.
    let tables = |ns: &str| {
        String::from_utf8_lossy(
            &Command::new("ip")
                .args(["netns", "exec", ns, "nft", "list", "tables"])
                .output()
                .expect("run nft")
                .stdout,
        )
        .into_owned()
    };
    let [home, carrier] = lab.routers(Side::A) else {
        panic!("cgnat has two routers: {:?}", lab.routers(Side::A));
    };
    assert!(
        tables(home).contains("table ip6 punchline"),
        "{}",
        tables(home)
    );
    assert!(!tables(carrier).contains("ip6"), "{}", tables(carrier));
    // IPv6 passes both routers untranslated.
    let seen = seen_by_rv(&lab, Host::A, sock6(&lab, Host::Rv, 7803));
    assert_eq!(seen, sock6(&lab, Host::A, PEER_PORT));
}

/// Both hosts bind [`PEER_PORT`] and connect to each other's IPv6 address and
/// port at once, reconnecting after a refusal until the deadline; nothing
/// listens. Returns each side's outcome (the peer's address) and the time.
fn punch6(lab: &Lab) -> ([io::Result<SocketAddr>; 2], Duration) {
    let started = Instant::now();
    let targets = [
        (Host::A, sock6(lab, Host::B, PEER_PORT)),
        (Host::B, sock6(lab, Host::A, PEER_PORT)),
    ];
    let outcomes = std::thread::scope(|scope| {
        let handles: Vec<_> = targets
            .iter()
            .map(|&(host, target)| {
                scope.spawn(move || {
                    let deadline = Instant::now() + PUNCH_DEADLINE;
                    loop {
                        let left = deadline.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            return Err(io::Error::new(io::ErrorKind::TimedOut, "punch deadline"));
                        }
                        match common::connect_to(lab, host, PEER_PORT, target, left) {
                            Ok(mut stream) => {
                                // Prove the link carries data both ways.
                                stream.write_all(b"x")?;
                                let mut byte = [0u8; 1];
                                stream.read_exact(&mut byte)?;
                                return stream.peer_addr();
                            }
                            // A refusal, or the 4-tuple still taken by the
                            // attempt before: try again.
                            Err(err)
                                if matches!(
                                    err.kind(),
                                    io::ErrorKind::ConnectionRefused
                                        | io::ErrorKind::AddrInUse
                                        | io::ErrorKind::AddrNotAvailable
                                ) =>
                            {
                                std::thread::sleep(Duration::from_millis(20));
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
    (outcomes, started.elapsed())
}

#[test]
fn simultaneous_open_over_ipv6_passes_both_firewalls() {
    if !common::lab6_available("simultaneous_open_over_ipv6_passes_both_firewalls") {
        return;
    }
    // A symmetric NAT defeats this punch over IPv4; over IPv6 it only has a
    // stateful firewall, which a simultaneous open passes.
    let lab = common::build(
        &LabConfig::new(NatKind::Symmetric, NatKind::Home)
            .with_wan(WanConfig::delays_ms(5, 15, 10))
            .with_ipv6(),
    );
    let ([a, b], took) = punch6(&lab);
    let a = a.unwrap_or_else(|err| panic!("A's punch: {err}\n{}", lab.diagnostics()));
    let b = b.unwrap_or_else(|err| panic!("B's punch: {err}\n{}", lab.diagnostics()));
    assert_eq!(a, sock6(&lab, Host::B, PEER_PORT));
    assert_eq!(b, sock6(&lab, Host::A, PEER_PORT));
    eprintln!(
        "IPv6 simultaneous open symmetric/home: {} ms",
        took.as_millis()
    );
}

#[test]
fn ipv6_only_hosts_have_no_ipv4() {
    if !common::lab6_available("ipv6_only_hosts_have_no_ipv4") {
        return;
    }
    let lab = common::build(&LabConfig::new(NatKind::Home, NatKind::Public).with_ipv6_only());
    assert_eq!(lab.ipv6(), Ipv6Mode::Only);
    for host in [Host::A, Host::B] {
        assert!(!lab.has_ipv4(host), "{host:?}");
        // No IPv4 address but loopback's, and no IPv4 route.
        let run = |args: &[&str]| {
            let out = lab.command(host, "ip").args(args).output().expect("run ip");
            assert!(out.status.success(), "ip {args:?}");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let addrs = run(&["-4", "-o", "addr", "show"]);
        assert!(
            addrs.lines().all(|line| line.contains(" lo ")),
            "{host:?}: {addrs}"
        );
        let routes = run(&["-4", "route", "show"]);
        assert!(routes.trim().is_empty(), "{host:?}: {routes}");
        let err = common::connect_to(
            &lab,
            host,
            0,
            SocketAddr::from((RV_ADDR, 7804)),
            common::SILENT_TIMEOUT,
        )
        .expect_err("no IPv4 route");
        assert_eq!(err.kind(), io::ErrorKind::NetworkUnreachable, "{err}");
        // Over IPv6 the rendezvous is there.
        let port = 7805 + u16::from(host == Host::B);
        let seen = seen_by_rv(&lab, host, sock6(&lab, Host::Rv, port));
        assert_eq!(seen, sock6(&lab, host, PEER_PORT));
    }
    assert!(lab.has_ipv4(Host::Rv) && lab.has_ipv4(Host::Probe));
    // The public host B is reachable over IPv6 only.
    let report = check_unsolicited6(&lab, Side::B);
    let described = lab.describe();
    eprintln!("{report}\n{described}");
    assert!(described.contains("2001:db8:b::2"), "{described}");
}

#[test]
fn wan_delay_and_loss_apply_to_ipv6() {
    if !common::lab6_available("wan_delay_and_loss_apply_to_ipv6") {
        return;
    }
    let wan = WanConfig::delays_ms(5, 40, 20);
    let lab = common::build(
        &LabConfig::new(NatKind::Home, NatKind::Home)
            .with_ipv6()
            .with_wan(wan),
    );
    let expected = lab.rtt(Host::A, Host::Rv);
    assert_eq!(expected, Duration::from_millis(50));

    // A TCP handshake over IPv6 takes one emulated round trip.
    let rv = sock6(&lab, Host::Rv, 7806);
    let listener = common::listen_at(&lab, Host::Rv, rv);
    let before = lab.wan_stats();
    let started = Instant::now();
    let _stream = common::connect_to(&lab, Host::A, 0, rv, common::ACCEPT_TIMEOUT)
        .unwrap_or_else(|err| panic!("A -> {rv}: {err}\n{}", lab.diagnostics()));
    let connect = started.elapsed();
    common::accept(&listener).expect("rv accepts");
    assert!(
        connect >= expected && connect < expected * 3,
        "IPv6 connect took {connect:?}, emulated RTT {expected:?}"
    );
    let after = lab.wan_stats();
    assert!(
        after.received >= before.received + 2,
        "the emulator did not see the handshake: {before:?} -> {after:?}"
    );

    // Ping agrees with the model on both paths through the emulator.
    let mut report = format!(
        "IPv6 TCP connect A -> rv: {:.1} ms (RTT {expected:?})\n",
        connect.as_secs_f64() * 1000.0
    );
    for (from, to) in [(Host::A, Host::Rv), (Host::B, Host::Rv)] {
        let expected_ms = lab.rtt(from, to).as_secs_f64() * 1000.0;
        let got = common::ping_median_ms(&lab, from, addr6(&lab, to), 10);
        let _ = writeln!(
            report,
            "ping -6 {from:?} -> {to:?}: expected {expected_ms:.1} ms, median {got:.2} ms"
        );
        assert!(
            (got - expected_ms).abs() / expected_ms <= TOLERANCE,
            "{report}{}",
            lab.diagnostics()
        );
    }
    eprint!("{report}");

    // Loss drops IPv6 and is counted.
    lab.set_wan(WanConfig {
        rv: LinkShape::NONE.with_loss(1.0),
        ..WanConfig::default()
    })
    .expect("set loss");
    let lost = lab
        .command(Host::A, "ping")
        .args(["-n", "-c", "3", "-i", "0.2", "-W", "1"])
        .arg(RV_ADDR6.to_string())
        .output()
        .expect("run ping");
    assert!(
        !lost.status.success(),
        "IPv6 pings passed a link with loss 1.0"
    );
    let stats = lab.wan_stats();
    assert!(stats.lost >= 3, "{stats:?}");
}

/// The addresses `getent ahosts NAME` prints inside `host`.
fn resolve_in(lab: &Lab, host: Host, name: &str) -> Vec<IpAddr> {
    let out = lab
        .command(host, "getent")
        .args(["ahosts", name])
        .output()
        .expect("run getent");
    assert!(
        out.status.success(),
        "getent ahosts {name} in {host:?} failed"
    );
    let mut addrs: Vec<IpAddr> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter_map(|addr| addr.parse().ok())
        .collect();
    addrs.sort();
    addrs.dedup();
    addrs
}

#[test]
fn hosts_file_names_the_rendezvous_in_both_families() {
    if !common::lab6_available("hosts_file_names_the_rendezvous_in_both_families") {
        return;
    }
    let both = vec![IpAddr::V4(RV_ADDR), IpAddr::V6(RV_ADDR6)];
    let dual = common::build(&LabConfig::new(NatKind::Home, NatKind::Cgnat).with_ipv6());
    assert_eq!(dual.rv_name(), RV_NAME);
    for host in [Host::A, Host::B, Host::Rv, Host::Probe] {
        assert_eq!(resolve_in(&dual, host, RV_NAME), both, "{host:?}");
    }
    let v4 = common::build(&LabConfig::new(NatKind::Home, NatKind::Home));
    assert_eq!(resolve_in(&v4, Host::A, RV_NAME), vec![IpAddr::V4(RV_ADDR)]);

    // The files go with the labs.
    let etc: Vec<_> = [&dual, &v4]
        .iter()
        .map(|lab| netns::etc_dir(lab.netns(Host::A)))
        .collect();
    assert!(etc.iter().all(|dir| dir.join("hosts").is_file()), "{etc:?}");
    drop((dual, v4));
    assert!(etc.iter().all(|dir| !dir.exists()), "left behind: {etc:?}");
}

#[test]
fn same_lan_hosts_meet_over_ipv6_on_their_lan() {
    if !common::lab6_available("same_lan_hosts_meet_over_ipv6_on_their_lan") {
        return;
    }
    let lab = common::build(&LabConfig::same_lan(NatKind::Home).with_ipv6());
    assert_eq!(addr6(&lab, Host::A).to_string(), "2001:db8:a:1::10");
    assert_eq!(addr6(&lab, Host::B).to_string(), "2001:db8:a:1::11");
    // B reaches A directly across the bridge: the router's firewall is not on
    // that path.
    let target = sock6(&lab, Host::A, 7808);
    let listener = common::listen_at(&lab, Host::A, target);
    common::connect_to(&lab, Host::B, 0, target, common::ACCEPT_TIMEOUT)
        .unwrap_or_else(|err| panic!("B -> A on the LAN: {err}\n{}", lab.diagnostics()));
    let (_, seen) = common::accept(&listener).expect("accept on the LAN");
    assert_eq!(seen.ip(), IpAddr::V6(addr6(&lab, Host::B)));
}

#[test]
fn overlapping_lans_keep_distinct_ipv6_addresses() {
    if !common::lab6_available("overlapping_lans_keep_distinct_ipv6_addresses") {
        return;
    }
    let lab = common::build(
        &LabConfig::new(NatKind::Home, NatKind::Home)
            .with_overlapping_lans()
            .with_ipv6(),
    );
    assert_eq!(lab.addr(Host::A), lab.addr(Host::B));
    assert_ne!(lab.addr6(Host::A), lab.addr6(Host::B));
    for (host, port) in [(Host::A, 7809), (Host::B, 7810)] {
        let seen = seen_by_rv(&lab, host, sock6(&lab, Host::Rv, port));
        assert_eq!(seen, sock6(&lab, host, PEER_PORT), "{host:?}");
    }
}

#[test]
fn cut_path_cuts_and_restores_ipv6() {
    if !common::lab6_available("cut_path_cuts_and_restores_ipv6") {
        return;
    }
    let lab = common::build(&LabConfig::new(NatKind::Home, NatKind::Public).with_ipv6());
    let target = sock6(&lab, Host::B, 7807);
    let listener = common::listen_at(&lab, Host::B, target);
    let mut stream = common::connect_to(&lab, Host::A, 0, target, common::ACCEPT_TIMEOUT)
        .expect("A -> public B over IPv6");
    // B's end stays open: closing it would end the connection before the cut.
    let (_b_end, seen) = common::accept(&listener).expect("accept");
    assert_eq!(seen.ip(), IpAddr::V6(addr6(&lab, Host::A)));

    lab.cut_path(Side::A, addr6(&lab, Host::B)).expect("cut");
    // The next segment either way is answered with a reset.
    let _ = stream.write_all(b"x");
    stream
        .set_read_timeout(Some(common::ACCEPT_TIMEOUT))
        .expect("timeout");
    let mut buf = [0u8; 1];
    let read = stream.read(&mut buf);
    assert!(
        matches!(&read, Err(err) if err.kind() == io::ErrorKind::ConnectionReset),
        "read after the cut: {read:?}"
    );
    let err = common::connect_to(&lab, Host::A, 0, target, common::SILENT_TIMEOUT)
        .expect_err("refused while cut");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);

    lab.restore_path(Side::A).expect("restore");
    common::connect_to(&lab, Host::A, 0, target, common::ACCEPT_TIMEOUT)
        .expect("connects again after the restore");
    assert!(
        lab.restore_path(Side::A).is_err(),
        "nothing left to restore"
    );
}

#[test]
fn lab_up_ipv6_only_prints_addresses_and_tears_down() {
    if !common::lab6_available("lab_up_ipv6_only_prints_addresses_and_tears_down") {
        return;
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_lab"))
        .args(["up", "--a", "home", "--b", "public", "--ipv6-only"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("run lab up");
    let stdout = child.stdout.take().expect("piped stdout");
    let deadline = Instant::now() + LAB_UP_TIMEOUT;
    let mut names = Vec::new();
    let mut text = String::new();
    let mut ready = false;
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("read lab up output");
        if let Some(name) = line.split_whitespace().find(|w| w.starts_with("pl-")) {
            names.push(name.trim_end_matches(',').to_owned());
        }
        text.push_str(&line);
        text.push('\n');
        if line.contains("Ctrl-C") {
            ready = true;
            break;
        }
        assert!(Instant::now() < deadline, "lab up is too slow");
    }
    assert!(ready, "lab up ended early: {text}");
    let a_line = text
        .lines()
        .find(|line| line.starts_with("a "))
        .unwrap_or_else(|| panic!("no line for host a: {text}"));
    assert!(a_line.contains("2001:db8:a:1::10"), "{text}");
    assert!(a_line.contains(" - "), "A has no IPv4 address: {text}");
    assert!(text.contains(RV_NAME), "{text}");
    let a_ns = names
        .iter()
        .find(|n| n.ends_with("-a"))
        .cloned()
        .unwrap_or_else(|| panic!("no namespace of A: {names:?}"));
    assert!(netns::etc_dir(&a_ns).join("hosts").is_file());

    let pid = i32::try_from(child.id()).expect("pid fits");
    kill(Pid::from_raw(pid), Signal::SIGINT).expect("send SIGINT");
    let status = child.wait().expect("wait for lab up");
    assert!(status.success(), "lab up exited with {status}");
    let existing = netns::list().expect("list");
    for name in &names {
        assert!(!existing.contains(name), "namespace {name} survived");
        assert!(!netns::etc_dir(name).exists(), "/etc/netns/{name} survived");
    }
}
