//! The lab's port-mapping router ([`punchline_lab::portmap`]) against a real
//! client (the `crab_nat` crate, PCP then NAT-PMP): behind a symmetric NAT, a
//! mapping forwards inbound TCP to the host and makes the host's outbound TCP
//! from the mapped port leave from the mapped address; deleting it closes it.
//!
//! Needs root and the lab's tools; skips loudly otherwise (fails instead when
//! `PUNCHLINE_REQUIRE_LAB=1`, as in CI).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::num::NonZeroU16;
use std::time::Duration;

use crab_nat::{InternetProtocol, PortMapping, PortMappingOptions, PortMappingType};
use punchline_lab::portmap::{Protocols, Responder};
use punchline_lab::prereq::available_or_skip;
use punchline_lab::{Host, Lab, LabConfig, NatKind, Side};

const PORT: u16 = 40000;

/// Runs `f` on a current-thread runtime inside host A's namespace.
fn in_a<T: Send>(lab: &Lab, f: impl std::future::Future<Output = T> + Send) -> T {
    lab.run_in(Host::A, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(f)
    })
    .expect("in host A")
}

/// Asks host A's router for a mapping of port [`PORT`].
fn map(lab: &Lab, gateway: Ipv4Addr) -> Result<PortMapping, String> {
    let client = lab.addr(Host::A);
    in_a(lab, async move {
        PortMapping::new(
            IpAddr::V4(gateway),
            IpAddr::V4(client),
            InternetProtocol::Tcp,
            NonZeroU16::new(PORT).expect("nonzero"),
            PortMappingOptions {
                external_port: NonZeroU16::new(PORT),
                lifetime_seconds: Some(60),
                timeout_config: None,
            },
        )
        .await
        .map_err(|e| format!("{e:?}"))
    })
}

/// A connection from the probe host to `to`, within a second.
fn reach(lab: &Lab, to: SocketAddr) -> std::io::Result<TcpStream> {
    lab.run_in(Host::Probe, || {
        TcpStream::connect_timeout(&to, Duration::from_secs(1))
    })
    .expect("in the probe host")
}

fn mapped_both_ways(name: &str, protocols: Protocols) {
    // The client asks with PCP first: it answers when the router speaks it.
    let pcp = protocols.pcp;
    if !available_or_skip(name) {
        return;
    }
    let lab = Lab::build(&LabConfig::new(NatKind::Symmetric, NatKind::Home))
        .unwrap_or_else(|e| panic!("{name}: building the lab: {e}"));
    let router = lab.routers(Side::A)[0].clone();
    // The router's LAN address: the lab's gateway octet on A's LAN.
    let gateway = {
        let [a, b, c, _] = lab.addr(Host::A).octets();
        Ipv4Addr::new(a, b, c, 1)
    };
    let wan = lab.public_addr(Host::A);
    let responder = Responder::start(&router, gateway, wan, "wan", protocols)
        .unwrap_or_else(|e| panic!("{name}: starting the responder: {e}"));
    let listener = lab
        .run_in(Host::A, || TcpListener::bind(("0.0.0.0", PORT)))
        .expect("in A")
        .expect("listen on A");

    let mapping = map(&lab, gateway).unwrap_or_else(|e| panic!("{name}: no mapping: {e}"));
    let external_ip = match mapping.mapping_type() {
        PortMappingType::Pcp { external_ip, .. } => {
            assert!(pcp, "{name}: mapped by PCP");
            external_ip
        }
        PortMappingType::NatPmp => {
            assert!(!pcp, "{name}: mapped by NAT-PMP");
            in_a(
                &lab,
                crab_nat::natpmp::external_address(IpAddr::V4(gateway), None),
            )
            .map(IpAddr::V4)
            .unwrap_or_else(|e| panic!("{name}: no external address: {e:?}"))
        }
    };
    assert_eq!(external_ip, IpAddr::V4(wan), "{name}");
    let external = SocketAddr::new(IpAddr::V4(wan), mapping.external_port().get());
    assert_eq!(responder.mappings().len(), 1, "{name}");

    // Inbound: the probe host reaches A's listener at the mapped address.
    let mut inbound = reach(&lab, external)
        .unwrap_or_else(|e| panic!("{name}: inbound to {external}: {e}\n{}", lab.diagnostics()));
    let (mut accepted, from) = listener.accept().expect("accept");
    assert_eq!(from.ip(), IpAddr::V4(punchline_lab::PROBE_ADDR), "{name}");
    inbound.write_all(b"in\n").expect("write");
    let mut got = [0u8; 3];
    accepted.read_exact(&mut got).expect("read");
    assert_eq!(&got, b"in\n");
    // A's side ends with a reset, not a FIN: when it closed first (a busy
    // machine), it stayed in TIME-WAIT on port PORT, and the bind below
    // failed with "address in use" despite SO_REUSEADDR.
    socket2::SockRef::from(&accepted)
        .set_linger(Some(Duration::ZERO))
        .expect("linger");
    drop((inbound, accepted, listener));

    // Outbound from the mapped port leaves from the mapped address, though
    // the NAT gives every other connection a random port.
    let seen = lab
        .run_in(Host::Probe, || {
            TcpListener::bind((punchline_lab::PROBE_ADDR, 41000))
        })
        .expect("in probe")
        .expect("listen on the probe host");
    let socket = lab
        .run_in(Host::A, || -> std::io::Result<TcpStream> {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            s.set_reuse_address(true)?;
            s.bind(&SocketAddr::from(([0, 0, 0, 0], PORT)).into())?;
            s.connect(&SocketAddr::from((punchline_lab::PROBE_ADDR, 41000)).into())?;
            Ok(s.into())
        })
        .expect("in A")
        .expect("connect out from the mapped port");
    let (_, from) = seen.accept().expect("accept");
    assert_eq!(from, external, "{name}: outbound left from another address");
    drop(socket);

    // Deleted: inbound is dropped again, and the router has no mapping.
    if let Err((e, _)) = in_a(&lab, mapping.try_drop()) {
        panic!("{name}: deleting the mapping: {e:?}");
    }
    assert!(responder.mappings().is_empty(), "{name}");
    assert!(
        reach(&lab, external).is_err(),
        "{name}: inbound still passes after the mapping was deleted"
    );
    responder.stop().expect("the responder stops cleanly");
}

#[test]
fn a_pcp_mapping_forwards_both_ways_behind_a_symmetric_nat() {
    mapped_both_ways("portmap-pcp", Protocols::BOTH);
}

#[test]
fn a_nat_pmp_router_is_used_when_pcp_is_not_spoken() {
    mapped_both_ways(
        "portmap-nat-pmp",
        Protocols {
            nat_pmp: true,
            pcp: false,
            upnp: false,
        },
    );
}
