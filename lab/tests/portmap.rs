//! The lab's port-mapping router ([`punchline_lab::portmap`]) against real
//! clients (the `crab_nat` crate, PCP then NAT-PMP; the `igd-next` crate,
//! UPnP-IGD): behind a symmetric NAT, a mapping forwards inbound TCP to the
//! host and makes the host's outbound TCP from the mapped port leave from the
//! mapped address; deleting it closes it. For UPnP also: the router's rules on
//! conflicts, strangers and permanent-only leases, and its resistance to
//! garbage.
//!
//! Needs root and the lab's tools; skips loudly otherwise (fails instead when
//! `PUNCHLINE_REQUIRE_LAB=1`, as in CI).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::num::NonZeroU16;
use std::time::{Duration, Instant};

use crab_nat::{InternetProtocol, PortMapping, PortMappingOptions, PortMappingType};
use igd_next::aio::tokio::{search_gateway, Tokio};
use igd_next::aio::Gateway;
use igd_next::{AddPortError, PortMappingProtocol, RemovePortError, SearchOptions};
use punchline_lab::portmap::{
    Protocols, Responder, Via, MAX_LIFETIME, SSDP_GROUP, SSDP_PORT, UPNP_HTTP_PORT,
};
use punchline_lab::prereq::available_or_skip;
use punchline_lab::{Host, Lab, LabConfig, NatKind, Side};

const PORT: u16 = 40000;

/// Runs `f` on a current-thread runtime inside `host`'s namespace.
fn in_host<T: Send>(lab: &Lab, host: Host, f: impl std::future::Future<Output = T> + Send) -> T {
    lab.run_in(host, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(f)
    })
    .expect("in a lab host")
}

/// Runs `f` on a current-thread runtime inside host A's namespace.
fn in_a<T: Send>(lab: &Lab, f: impl std::future::Future<Output = T> + Send) -> T {
    in_host(lab, Host::A, f)
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

/// The router's LAN address on `host`'s LAN: the lab's gateway octet.
fn gateway_of(lab: &Lab, host: Host) -> Ipv4Addr {
    let [a, b, c, _] = lab.addr(host).octets();
    Ipv4Addr::new(a, b, c, 1)
}

/// Checks that `external` (the router's WAN address and a port mapped to
/// host A's port [`PORT`]) forwards both ways: the probe host reaches a
/// listener on A there, and A's outbound TCP from [`PORT`] leaves from it,
/// though the NAT gives every other connection a random port.
fn forwarded_both_ways(name: &str, lab: &Lab, external: SocketAddr) {
    let listener = lab
        .run_in(Host::A, || TcpListener::bind(("0.0.0.0", PORT)))
        .expect("in A")
        .expect("listen on A");

    // Inbound: the probe host reaches A's listener at the mapped address.
    let mut inbound = reach(lab, external)
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

    // Outbound from the mapped port leaves from the mapped address.
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
}

/// Checks that a deleted mapping is gone: the router has none, and inbound
/// to `external` is dropped again.
fn closed(name: &str, lab: &Lab, responder: &Responder, external: SocketAddr) {
    assert!(responder.mappings().is_empty(), "{name}");
    assert!(
        reach(lab, external).is_err(),
        "{name}: inbound still passes after the mapping was deleted"
    );
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
    let gateway = gateway_of(&lab, Host::A);
    let wan = lab.public_addr(Host::A);
    let responder = Responder::start(&router, gateway, wan, "wan", protocols)
        .unwrap_or_else(|e| panic!("{name}: starting the responder: {e}"));

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
    let granted = responder.mappings();
    assert_eq!(granted.len(), 1, "{name}");
    assert_eq!(
        granted[0].via,
        if pcp { Via::Pcp } else { Via::NatPmp },
        "{name}"
    );

    forwarded_both_ways(name, &lab, external);

    // Deleted: inbound is dropped again, and the router has no mapping.
    if let Err((e, _)) = in_a(&lab, mapping.try_drop()) {
        panic!("{name}: deleting the mapping: {e:?}");
    }
    closed(name, &lab, &responder, external);
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

/// A lab whose side A router speaks UPnP-IGD only (started by the topology),
/// or `None` when the lab cannot run here.
fn upnp_lab(name: &str, config: LabConfig) -> Option<Lab> {
    if !available_or_skip(name) {
        return None;
    }
    let lab = Lab::build(&config.with_port_mapping(Protocols::UPNP))
        .unwrap_or_else(|e| panic!("{name}: building the lab: {e}"));
    Some(lab)
}

/// The UPnP gateway `host` discovers from its own address (SSDP multicast on
/// its LAN, then the descriptions over HTTP).
fn discover(name: &str, lab: &Lab, host: Host) -> Gateway<Tokio> {
    let mut options = SearchOptions::default();
    options.bind_addr = SocketAddr::new(IpAddr::V4(lab.addr(host)), 0);
    options.timeout = Some(Duration::from_secs(2));
    options.single_search_timeout = Some(Duration::from_secs(2));
    in_host(lab, host, search_gateway(options))
        .unwrap_or_else(|e| panic!("{name}: no UPnP gateway found from {host:?}: {e}"))
}

/// Maps external `port` to `host`'s `internal` port with `lease` seconds.
fn add(
    lab: &Lab,
    host: Host,
    gateway: &Gateway<Tokio>,
    port: u16,
    internal: SocketAddr,
    lease: u32,
) -> Result<(), AddPortError> {
    in_host(
        lab,
        host,
        gateway.add_port(PortMappingProtocol::TCP, port, internal, lease, "punchline"),
    )
}

#[test]
fn a_upnp_mapping_forwards_both_ways_behind_a_symmetric_nat() {
    let name = "portmap-upnp";
    let Some(lab) = upnp_lab(name, LabConfig::new(NatKind::Symmetric, NatKind::Home)) else {
        return;
    };
    let responder = lab.portmap().expect("the lab's router grants mappings");
    let a = lab.addr(Host::A);
    let wan = lab.public_addr(Host::A);

    let gateway = discover(name, &lab, Host::A);
    assert_eq!(
        gateway.addr,
        SocketAddr::from((gateway_of(&lab, Host::A), UPNP_HTTP_PORT)),
        "{name}"
    );
    let external_ip = in_host(&lab, Host::A, gateway.get_external_ip())
        .unwrap_or_else(|e| panic!("{name}: no external address: {e}"));
    assert_eq!(external_ip, IpAddr::V4(wan), "{name}");

    add(
        &lab,
        Host::A,
        &gateway,
        PORT,
        SocketAddr::from((a, PORT)),
        60,
    )
    .unwrap_or_else(|e| panic!("{name}: no mapping: {e}"));
    let external = SocketAddr::from((wan, PORT));
    let granted = responder.mappings();
    assert_eq!(granted.len(), 1, "{name}: {granted:?}");
    assert_eq!(granted[0].via, Via::Upnp, "{name}");
    assert_eq!(granted[0].internal, SocketAddr::from((a, PORT)), "{name}");
    assert_eq!(granted[0].external, external, "{name}");
    let left = granted[0].expires - Instant::now();
    assert!(
        left > Duration::from_secs(50) && left <= Duration::from_secs(60),
        "{name}: {left:?}"
    );

    forwarded_both_ways(name, &lab, external);

    in_host(
        &lab,
        Host::A,
        gateway.remove_port(PortMappingProtocol::TCP, PORT),
    )
    .unwrap_or_else(|e| panic!("{name}: deleting the mapping: {e}"));
    closed(name, &lab, responder, external);
    lab.shutdown().expect("the lab tears down cleanly");
}

#[test]
fn upnp_refuses_conflicts_and_strangers_and_can_insist_on_permanent_leases() {
    let name = "portmap-upnp-rules";
    // B shares A's LAN, so it is a second client of the same router.
    let Some(lab) = upnp_lab(name, LabConfig::same_lan(NatKind::Home)) else {
        return;
    };
    let responder = lab.portmap().expect("the lab's router grants mappings");
    let (a, b) = (lab.addr(Host::A), lab.addr(Host::B));
    let wan = lab.public_addr(Host::A);
    let gateway_a = discover(name, &lab, Host::A);
    let gateway_b = discover(name, &lab, Host::B);

    add(
        &lab,
        Host::A,
        &gateway_a,
        PORT,
        SocketAddr::from((a, PORT)),
        60,
    )
    .unwrap_or_else(|e| panic!("{name}: no mapping: {e}"));
    // The external port is taken: for another internal port, or another host.
    let taken = add(
        &lab,
        Host::A,
        &gateway_a,
        PORT,
        SocketAddr::from((a, PORT + 1)),
        60,
    );
    assert!(
        matches!(taken, Err(AddPortError::PortInUse)),
        "{name}: {taken:?}"
    );
    let taken = add(
        &lab,
        Host::B,
        &gateway_b,
        PORT,
        SocketAddr::from((b, PORT)),
        60,
    );
    assert!(
        matches!(taken, Err(AddPortError::PortInUse)),
        "{name}: {taken:?}"
    );
    // One mapping per internal port.
    let twice = add(
        &lab,
        Host::A,
        &gateway_a,
        PORT + 2,
        SocketAddr::from((a, PORT)),
        60,
    );
    assert!(
        matches!(twice, Err(AddPortError::PortInUse)),
        "{name}: {twice:?}"
    );
    // A host maps to itself only, and deletes its own mappings only.
    let stranger = add(
        &lab,
        Host::B,
        &gateway_b,
        PORT + 1,
        SocketAddr::from((a, PORT + 1)),
        60,
    );
    assert!(
        matches!(stranger, Err(AddPortError::ActionNotAuthorized)),
        "{name}: {stranger:?}"
    );
    let removed = in_host(
        &lab,
        Host::B,
        gateway_b.remove_port(PortMappingProtocol::TCP, PORT),
    );
    assert!(
        matches!(removed, Err(RemovePortError::ActionNotAuthorized)),
        "{name}: {removed:?}"
    );
    let removed = in_host(
        &lab,
        Host::A,
        gateway_a.remove_port(PortMappingProtocol::TCP, PORT + 5),
    );
    assert!(
        matches!(removed, Err(RemovePortError::NoSuchPortMapping)),
        "{name}: {removed:?}"
    );
    // Asking again renews.
    add(
        &lab,
        Host::A,
        &gateway_a,
        PORT,
        SocketAddr::from((a, PORT)),
        120,
    )
    .unwrap_or_else(|e| panic!("{name}: renewing: {e}"));
    let granted = responder.mappings();
    assert_eq!(granted.len(), 1, "{name}: {granted:?}");
    assert!(
        granted[0].expires - Instant::now() > Duration::from_secs(100),
        "{name}"
    );

    // A router granting permanent leases only: 60 s is refused, 0 works and
    // forwards until deleted.
    responder.only_permanent_leases(true);
    let internal_b = SocketAddr::from((b, PORT + 1));
    let leased = add(&lab, Host::B, &gateway_b, PORT + 1, internal_b, 60);
    assert!(
        matches!(leased, Err(AddPortError::OnlyPermanentLeasesSupported)),
        "{name}: {leased:?}"
    );
    add(&lab, Host::B, &gateway_b, PORT + 1, internal_b, 0)
        .unwrap_or_else(|e| panic!("{name}: no permanent mapping: {e}"));
    let permanent = responder
        .mappings()
        .into_iter()
        .find(|g| g.internal == internal_b)
        .unwrap_or_else(|| panic!("{name}: B's mapping is not listed"));
    assert!(
        permanent.expires - Instant::now() > Duration::from_secs(MAX_LIFETIME.into()),
        "{name}: a permanent lease expires"
    );
    let listener = lab
        .run_in(Host::B, || TcpListener::bind(internal_b))
        .expect("in B")
        .expect("listen on B");
    let external_b = SocketAddr::from((wan, PORT + 1));
    reach(&lab, external_b).unwrap_or_else(|e| {
        panic!(
            "{name}: inbound to {external_b}: {e}\n{}",
            lab.diagnostics()
        )
    });
    let (_, from) = listener.accept().expect("accept");
    assert_eq!(from.ip(), IpAddr::V4(punchline_lab::PROBE_ADDR), "{name}");

    for (host, gateway, port) in [(Host::A, &gateway_a, PORT), (Host::B, &gateway_b, PORT + 1)] {
        in_host(
            &lab,
            host,
            gateway.remove_port(PortMappingProtocol::TCP, port),
        )
        .unwrap_or_else(|e| panic!("{name}: deleting {port}: {e}"));
    }
    assert!(responder.mappings().is_empty(), "{name}");
    lab.shutdown().expect("the lab tears down cleanly");
}

/// Sends `request` to the router's UPnP HTTP port from host A and returns
/// what came back before the router closed (or within 3 s).
fn http(lab: &Lab, request: &[u8]) -> String {
    let to = SocketAddr::from((gateway_of(lab, Host::A), UPNP_HTTP_PORT));
    lab.run_in(Host::A, || {
        let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(1)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        let _ = stream.write_all(request);
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).into_owned()
    })
    .expect("in A")
}

#[test]
fn garbage_on_ssdp_and_http_leaves_the_upnp_router_serving() {
    let name = "portmap-upnp-garbage";
    if !available_or_skip(name) {
        return;
    }
    let lab = Lab::build(&LabConfig::new(NatKind::Home, NatKind::Home))
        .unwrap_or_else(|e| panic!("{name}: building the lab: {e}"));
    let router = lab.routers(Side::A)[0].clone();
    // All three protocols at once: they share the mappings.
    let responder = Responder::start(
        &router,
        gateway_of(&lab, Host::A),
        lab.public_addr(Host::A),
        "wan",
        Protocols::ALL,
    )
    .unwrap_or_else(|e| panic!("{name}: starting the responder: {e}"));
    let gateway_ip = gateway_of(&lab, Host::A);
    let a = lab.addr(Host::A);

    // SSDP: noise, responses, searches without MAN or for other devices, an
    // oversized datagram; to the group and to the router. None is answered.
    let silent = lab
        .run_in(Host::A, || -> std::io::Result<usize> {
            let socket = UdpSocket::bind((a, 0))?;
            socket.set_read_timeout(Some(Duration::from_millis(500)))?;
            let datagrams: [&[u8]; 6] = [
                b"\xff\x00garbage",
                b"HTTP/1.1 200 OK\r\nST: ssdp:all\r\nLOCATION: http://10.0.1.10:1/\r\n\r\n",
                b"M-SEARCH * HTTP/1.1\r\nST: ssdp:all\r\n\r\n",
                b"M-SEARCH * HTTP/1.1\r\nMAN: \"ssdp:discover\"\r\nST: urn:other\r\n\r\n",
                b"NOTIFY * HTTP/1.1\r\nNT: upnp:rootdevice\r\n\r\n",
                &[b'M'; 9000],
            ];
            for datagram in datagrams {
                socket.send_to(datagram, (SSDP_GROUP, SSDP_PORT))?;
                socket.send_to(datagram, (gateway_ip, SSDP_PORT))?;
            }
            let mut buf = [0u8; 2048];
            let mut answers = 0;
            while socket.recv_from(&mut buf).is_ok() {
                answers += 1;
            }
            Ok(answers)
        })
        .expect("in A")
        .expect("SSDP garbage sent");
    assert_eq!(silent, 0, "{name}: garbage was answered");

    // HTTP: a request that never ends is held open meanwhile.
    let stalled = lab
        .run_in(Host::A, || -> std::io::Result<TcpStream> {
            let mut s = TcpStream::connect((gateway_ip, UPNP_HTTP_PORT))?;
            s.write_all(b"POST /ctl/IPConn HTTP/1.1\r\nContent-Length: 100\r\n\r\n<s:Env")?;
            Ok(s)
        })
        .expect("in A")
        .expect("a stalled request");
    let mut huge = b"GET /rootDesc.xml HTTP/1.1\r\nX-Huge: ".to_vec();
    // Exactly the router's bound on a request: it reads it all, then refuses.
    huge.resize(64 * 1024, b'a');
    for (request, status) in [
        (&huge[..], "431"),
        (b"DELETE /rootDesc.xml HTTP/1.1\r\n\r\n", "405"),
        (b"GET /nothing HTTP/1.1\r\n\r\n", "404"),
        (b"GET / HTTP/9.9\r\n\r\n", "505"),
        (
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
            "400",
        ),
        (
            b"POST /ctl/IPConn HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n",
            "413",
        ),
    ] {
        let answer = http(&lab, request);
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status} ")),
            "{name}: {:?} got {answer:?}",
            String::from_utf8_lossy(&request[..request.len().min(40)])
        );
    }
    // A SOAP action the service does not have, and one without SOAPAction.
    let body = "<s:Envelope><s:Body><u:Reboot xmlns:u=\"urn:schemas-upnp-org:service:WANIPConnection:1\"/></s:Body></s:Envelope>";
    for action in [
        "SOAPAction: \"urn:schemas-upnp-org:service:WANIPConnection:1#Reboot\"\r\n",
        "",
    ] {
        let answer = http(
            &lab,
            format!(
                "POST /ctl/IPConn HTTP/1.1\r\n{action}Content-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
        assert!(
            answer.starts_with("HTTP/1.1 500 ") && answer.contains("<errorCode>401</errorCode>"),
            "{name}: got {answer:?}"
        );
    }
    // A connection closed at once.
    drop(lab.run_in(Host::A, || TcpStream::connect((gateway_ip, UPNP_HTTP_PORT))));

    // Still serving: discovery and a mapping work.
    let gateway = discover(name, &lab, Host::A);
    add(
        &lab,
        Host::A,
        &gateway,
        PORT,
        SocketAddr::from((a, PORT)),
        60,
    )
    .unwrap_or_else(|e| panic!("{name}: no mapping after garbage: {e}"));
    assert_eq!(responder.mappings().len(), 1, "{name}");

    // The stalled connection does not hold up stopping the responder.
    let started = Instant::now();
    responder.stop().expect("the responder stops cleanly");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{name}: stopping took {:?}",
        started.elapsed()
    );
    drop(stalled);
}
