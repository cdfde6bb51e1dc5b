//! A router that grants port mappings: a small NAT-PMP (RFC 6886), PCP
//! (RFC 6887) and UPnP-IGD (v1) responder for the lab, run as threads in a
//! router's namespace.
//!
//! Why our own: Debian's `miniupnpd-nftables` (which speaks all three) refuses
//! to map when the router's external address is in a documentation or other
//! reserved range, and every "public" address of the lab is in one (and must
//! stay so: the lab never touches real internet addresses). This responder
//! keeps every address inside the lab's ranges.
//!
//! # What it does
//!
//! With NAT-PMP or PCP on, it listens on UDP port [`PORT`] of the router's LAN
//! address and answers:
//!
//! - NAT-PMP "external address" (opcode 0) with the router's WAN address;
//! - NAT-PMP TCP mappings (opcode 2) and PCP MAP requests for TCP: it grants
//!   the suggested external port when free (else the internal port, else the
//!   next free one), for the lifetime asked (at most [`MAX_LIFETIME`]), and
//!   deletes a mapping asked with lifetime 0;
//! - anything else with the protocol's error code (unsupported version or
//!   opcode, malformed request, address mismatch).
//!
//! With UPnP on, it is an Internet Gateway Device (see the `upnp` submodule
//! for the flow): it answers SSDP searches on UDP port [`SSDP_PORT`], serves
//! its device and service descriptions over HTTP on port [`UPNP_HTTP_PORT`] of
//! the LAN address, and takes the SOAP actions `AddPortMapping` (TCP, the
//! external port asked or an error; lease 0 is permanent),
//! `DeletePortMapping` and `GetExternalIPAddress`. Like many home routers it
//! can be told to grant permanent leases only
//! ([`Responder::only_permanent_leases`]).
//!
//! A mapping is two nftables rules in the router's table [`TABLE`]: inbound TCP
//! to the WAN address and external port is forwarded to the host's internal
//! address and port (`dnat`), and the host's outbound TCP from that internal
//! port leaves from the external port (`snat`), before the router's own
//! masquerade. So a mapping is *endpoint independent both ways*, as RFC 6886
//! (section 3.3) and RFC 6887 (section 11.1) ask, whichever protocol granted
//! it: even behind a symmetric NAT, the host's SYNs from its mapped port leave
//! from the mapped address, and a simultaneous open with a peer told that
//! address works. The router's filter must let forwarded connections it
//! translated in (`ct status dnat`).
//!
//! Mappings expire at the end of their lifetime (checked twice a second); the
//! state of every mapping is readable for tests ([`Responder::mappings`]).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::cmd::{self, NFT};
use crate::error::{LabError, Result};
use crate::netns;

mod upnp;

/// The UDP port of NAT-PMP and PCP servers.
pub const PORT: u16 = 5351;

/// The nftables table the responder's rules live in (`ip` family).
pub const TABLE: &str = "portmap";

/// Longest lifetime granted, in seconds.
pub const MAX_LIFETIME: u32 = 3600;

/// The UDP port SSDP (UPnP discovery) listens on, for multicast searches to
/// [`SSDP_GROUP`] and unicast ones to the LAN address.
pub const SSDP_PORT: u16 = 1900;

/// The multicast group of SSDP searches.
pub const SSDP_GROUP: Ipv4Addr = Ipv4Addr::new(239, 255, 255, 250);

/// The TCP port of the UPnP-IGD HTTP server (device description, service
/// description, SOAP control) on the router's LAN address. Routers pick their
/// own (miniupnpd a random one); a fixed one keeps the lab's logs readable.
pub const UPNP_HTTP_PORT: u16 = 5000;

/// How often expired mappings are removed, and how long a blocked socket
/// read lasts before the responder's threads look at the stop flag again.
const EXPIRY_CHECK: Duration = Duration::from_millis(500);

/// How long a permanent (UPnP lease 0) mapping lasts: longer than any lab
/// runs; it ends when the responder stops.
const PERMANENT: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Which protocols the responder speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Protocols {
    /// NAT-PMP (version 0).
    pub nat_pmp: bool,
    /// PCP (version 2).
    pub pcp: bool,
    /// UPnP-IGD v1 (SSDP discovery, HTTP descriptions, SOAP control of a
    /// `WANIPConnection:1` service).
    pub upnp: bool,
}

impl Protocols {
    /// NAT-PMP and PCP (no UPnP): the two protocols of UDP port [`PORT`].
    pub const BOTH: Protocols = Protocols {
        nat_pmp: true,
        pcp: true,
        upnp: false,
    };

    /// NAT-PMP, PCP and UPnP-IGD, as a miniupnpd router offers them.
    pub const ALL: Protocols = Protocols {
        nat_pmp: true,
        pcp: true,
        upnp: true,
    };

    /// UPnP-IGD only (nothing listens on UDP port [`PORT`]), as on many
    /// consumer routers.
    pub const UPNP: Protocols = Protocols {
        nat_pmp: false,
        pcp: false,
        upnp: true,
    };
}

/// The protocol a mapping was asked with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// NAT-PMP (RFC 6886).
    NatPmp,
    /// PCP (RFC 6887).
    Pcp,
    /// UPnP-IGD's `AddPortMapping`.
    Upnp,
}

/// One granted mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Granted {
    /// The host's address and port.
    pub internal: SocketAddr,
    /// The router's WAN address and the external port.
    pub external: SocketAddr,
    /// Which protocol asked for it.
    pub via: Via,
    /// When it expires (far in the future for a permanent UPnP lease).
    pub expires: Instant,
}

/// Shared state of a running responder.
#[derive(Debug)]
struct State {
    netns: String,
    wan: Ipv4Addr,
    wan_if: String,
    /// The router's LAN address, where the responder answers.
    lan: Ipv4Addr,
    protocols: Protocols,
    started: Instant,
    /// By external port.
    mappings: Mutex<HashMap<u16, Granted>>,
    /// UPnP: refuse leases other than 0 (permanent).
    only_permanent: AtomicBool,
    /// UPnP: how long an answer to a multicast SSDP search waits
    /// (milliseconds), as a device honouring the search's MX does.
    search_delay_ms: AtomicU64,
    /// UPnP: how long each SOAP action takes before it is done and answered
    /// (milliseconds; a slow router).
    action_delay_ms: AtomicU64,
    stop: AtomicBool,
}

/// A running responder; stopping it (or dropping it) ends its threads and
/// removes its rules.
pub struct Responder {
    state: Arc<State>,
    threads: Vec<JoinHandle<Result<()>>>,
    halted: bool,
}

impl Responder {
    /// Starts answering inside the router namespace `netns` on its LAN
    /// address `lan` (UDP [`PORT`] for NAT-PMP and PCP; UDP [`SSDP_PORT`] and
    /// TCP [`UPNP_HTTP_PORT`] for UPnP), mapping onto its WAN address `wan`
    /// (interface `wan_if`).
    pub fn start(
        netns: &str,
        lan: Ipv4Addr,
        wan: Ipv4Addr,
        wan_if: &str,
        protocols: Protocols,
    ) -> Result<Responder> {
        let ruleset = format!(
            "table ip {TABLE} {{\n  chain pre {{\n    type nat hook prerouting priority dstnat - 1; policy accept;\n  }}\n  \
             chain post {{\n    type nat hook postrouting priority srcnat - 1; policy accept;\n  }}\n}}\n"
        );
        cmd::ip_netns_exec_with_stdin(netns, NFT, &["-f", "-"], Some(&ruleset))?;
        // From here on, dropping the responder (also on an error below) ends
        // the threads started so far and removes the table.
        let mut responder = Responder {
            state: Arc::new(State {
                netns: netns.to_owned(),
                wan,
                wan_if: wan_if.to_owned(),
                lan,
                protocols,
                started: Instant::now(),
                mappings: Mutex::new(HashMap::new()),
                only_permanent: AtomicBool::new(false),
                search_delay_ms: AtomicU64::new(0),
                action_delay_ms: AtomicU64::new(0),
                stop: AtomicBool::new(false),
            }),
            threads: Vec::new(),
            halted: false,
        };
        // NAT-PMP and PCP share the port; a router speaking neither leaves it
        // closed, so a client's request meets a port unreachable.
        let socket = if protocols.nat_pmp || protocols.pcp {
            let socket =
                netns::run_in(netns, || UdpSocket::bind((lan, PORT)))?.map_err(|source| {
                    LabError::Io {
                        what: format!("binding the port-mapping responder to {lan}:{PORT}"),
                        source,
                    }
                })?;
            socket
                .set_read_timeout(Some(EXPIRY_CHECK))
                .map_err(|source| LabError::Io {
                    what: "setting the responder's read timeout".into(),
                    source,
                })?;
            Some(socket)
        } else {
            None
        };
        responder.spawn("portmap", move |state| serve(state, socket.as_ref()))?;
        if protocols.upnp {
            let (ssdp, http) = upnp::bind(netns, lan)?;
            responder.spawn("portmap-ssdp", move |state| upnp::serve_ssdp(state, &ssdp))?;
            responder.spawn("portmap-http", move |state| upnp::serve_http(state, &http))?;
        }
        Ok(responder)
    }

    /// Runs `f` on a thread of the responder, which [`Responder::stop`] joins.
    fn spawn(
        &mut self,
        name: &str,
        f: impl FnOnce(&State) -> Result<()> + Send + 'static,
    ) -> Result<()> {
        let state = self.state.clone();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || f(&state))
            .map_err(|source| LabError::Io {
                what: format!("starting the port-mapping responder's thread {name}"),
                source,
            })?;
        self.threads.push(thread);
        Ok(())
    }

    /// The mappings in force.
    pub fn mappings(&self) -> Vec<Granted> {
        let now = Instant::now();
        lock(&self.state.mappings)
            .values()
            .filter(|g| g.expires > now)
            .copied()
            .collect()
    }

    /// UPnP: whether to grant permanent leases only, as many home routers
    /// do: `AddPortMapping` with a lease duration other than 0 is then refused
    /// with error 725 (OnlyPermanentLeasesSupported), and the client is
    /// expected to ask again with 0. NAT-PMP and PCP are not affected.
    pub fn only_permanent_leases(&self, only: bool) {
        self.state.only_permanent.store(only, Ordering::Relaxed);
    }

    /// UPnP: makes every SOAP action (`AddPortMapping`, ...) take `delay`
    /// before it is done and answered, as on a slow router.
    pub fn delay_actions(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.state.action_delay_ms.store(ms, Ordering::Relaxed);
    }

    /// UPnP: makes the answers to multicast SSDP searches wait `delay`, as
    /// a device does that spreads its answers over the search's MX seconds
    /// (UPnP Device Architecture; miniupnpd does). A search sent to the
    /// router's own address (unicast) is answered at once.
    pub fn delay_multicast_search_answers(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.state.search_delay_ms.store(ms, Ordering::Relaxed);
    }

    /// Stops the threads and removes the rules.
    pub fn stop(mut self) -> Result<()> {
        self.halt()
    }

    fn halt(&mut self) -> Result<()> {
        self.halted = true;
        self.state.stop.store(true, Ordering::Relaxed);
        let mut served = Ok(());
        for thread in self.threads.drain(..) {
            let result = thread
                .join()
                .unwrap_or_else(|_| Err(LabError::Thread("the responder panicked".into())));
            served = served.and(result);
        }
        let removed =
            cmd::ip_netns_exec(&self.state.netns, NFT, &["delete", "table", "ip", TABLE]).map(drop);
        served.and(removed)
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if !self.halted {
            if let Err(e) = self.halt() {
                tracing::warn!(error = %e, "lab: port-mapping responder");
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Whether a socket error only means "nothing arrived in time".
fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// Expires mappings, and answers NAT-PMP and PCP on `socket` when the router
/// speaks either.
fn serve(state: &State, socket: Option<&UdpSocket>) -> Result<()> {
    let mut buf = [0u8; 1100];
    while !state.stop.load(Ordering::Relaxed) {
        expire(state);
        let Some(socket) = socket else {
            std::thread::sleep(EXPIRY_CHECK);
            continue;
        };
        let (len, from) = match socket.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e) if timed_out(&e) => continue,
            Err(source) => {
                return Err(LabError::Io {
                    what: "the port-mapping responder's socket".into(),
                    source,
                })
            }
        };
        let SocketAddr::V4(from) = from else { continue };
        if let Some(answer) = answer(state, &buf[..len], *from.ip()) {
            let _ = socket.send_to(&answer, from);
        }
    }
    Ok(())
}

/// Seconds since the responder started (both protocols' epoch).
fn epoch(state: &State) -> u32 {
    u32::try_from(state.started.elapsed().as_secs()).unwrap_or(u32::MAX)
}

/// The answer to one request from `client`, or `None` to stay silent (a
/// datagram too short to answer, or a response).
fn answer(state: &State, req: &[u8], client: Ipv4Addr) -> Option<Vec<u8>> {
    // A response (opcode with its high bit set) is never answered.
    if req.get(1).is_some_and(|op| op & 0x80 != 0) {
        return None;
    }
    match *req.first()? {
        0 if state.protocols.nat_pmp => Some(nat_pmp(state, req, client)),
        2 if state.protocols.pcp => Some(pcp(state, req, client)),
        // A version we do not speak: NAT-PMP's "unsupported version" (RFC
        // 6887 section 9 has a PCP client fall back on it), in the form of
        // the highest version we do speak.
        _ if req.len() >= 2 => {
            if state.protocols.pcp {
                let mut r = pcp_header(state, req[1] & 0x7f, PCP_UNSUPP_VERSION, 0);
                r[0] = 2;
                Some(r)
            } else {
                Some(nat_pmp_header(state, req[1], NAT_PMP_UNSUPPORTED_VERSION))
            }
        }
        _ => None,
    }
}

const NAT_PMP_UNSUPPORTED_VERSION: u16 = 1;
const NAT_PMP_OUT_OF_RESOURCES: u16 = 4;
const NAT_PMP_UNSUPPORTED_OPCODE: u16 = 5;

fn nat_pmp_header(state: &State, op: u8, result: u16) -> Vec<u8> {
    let mut r = vec![0, op | 0x80];
    r.extend_from_slice(&result.to_be_bytes());
    r.extend_from_slice(&epoch(state).to_be_bytes());
    r
}

fn nat_pmp(state: &State, req: &[u8], client: Ipv4Addr) -> Vec<u8> {
    let op = req.get(1).copied().unwrap_or(0);
    match (op, req.len()) {
        (0, 2..) => {
            let mut r = nat_pmp_header(state, 0, 0);
            r.extend_from_slice(&state.wan.octets());
            r
        }
        (2, 12..) => {
            let internal = u16::from_be_bytes([req[4], req[5]]);
            let suggested = u16::from_be_bytes([req[6], req[7]]);
            let lifetime = u32::from_be_bytes([req[8], req[9], req[10], req[11]]);
            let granted = map(state, client, internal, suggested, lifetime, Via::NatPmp);
            match granted {
                Some((port, lifetime)) => {
                    // A deletion is answered with external port 0 (RFC 6886
                    // section 3.4).
                    let port = if lifetime == 0 { 0 } else { port };
                    let mut r = nat_pmp_header(state, op, 0);
                    r.extend_from_slice(&internal.to_be_bytes());
                    r.extend_from_slice(&port.to_be_bytes());
                    r.extend_from_slice(&lifetime.to_be_bytes());
                    r
                }
                None => nat_pmp_header(state, op, NAT_PMP_OUT_OF_RESOURCES),
            }
        }
        _ => nat_pmp_header(state, op, NAT_PMP_UNSUPPORTED_OPCODE),
    }
}

const PCP_UNSUPP_VERSION: u8 = 1;
const PCP_MALFORMED_REQUEST: u8 = 3;
const PCP_UNSUPP_OPCODE: u8 = 4;
const PCP_NO_RESOURCES: u8 = 8;
const PCP_UNSUPP_PROTOCOL: u8 = 9;
const PCP_ADDRESS_MISMATCH: u8 = 12;
const PCP_MAP: u8 = 1;
const TCP: u8 = 6;

/// The 24-byte PCP response header.
fn pcp_header(state: &State, opcode: u8, result: u8, lifetime: u32) -> Vec<u8> {
    let mut r = vec![2, opcode | 0x80, 0, result];
    r.extend_from_slice(&lifetime.to_be_bytes());
    r.extend_from_slice(&epoch(state).to_be_bytes());
    r.extend_from_slice(&[0; 12]);
    r
}

/// An IPv4 address as PCP writes it (IPv4-mapped IPv6).
fn mapped(ip: Ipv4Addr) -> [u8; 16] {
    ip.to_ipv6_mapped().octets()
}

fn pcp(state: &State, req: &[u8], client: Ipv4Addr) -> Vec<u8> {
    let opcode = req.get(1).copied().unwrap_or(0) & 0x7f;
    if req.len() < 24 || req.len() % 4 != 0 {
        return pcp_header(state, opcode, PCP_MALFORMED_REQUEST, 0);
    }
    if opcode != PCP_MAP {
        return pcp_header(state, opcode, PCP_UNSUPP_OPCODE, 0);
    }
    if req.len() < 60 {
        return pcp_header(state, opcode, PCP_MALFORMED_REQUEST, 0);
    }
    let lifetime = u32::from_be_bytes([req[4], req[5], req[6], req[7]]);
    let claimed: [u8; 16] = req[8..24].try_into().unwrap_or([0; 16]);
    let body = &req[24..60];
    let mut answer_body = body.to_vec();
    if claimed != mapped(client) {
        let mut r = pcp_header(state, opcode, PCP_ADDRESS_MISMATCH, 0);
        r.extend_from_slice(&answer_body);
        return r;
    }
    if body[12] != TCP {
        let mut r = pcp_header(state, opcode, PCP_UNSUPP_PROTOCOL, 0);
        r.extend_from_slice(&answer_body);
        return r;
    }
    let internal = u16::from_be_bytes([body[16], body[17]]);
    let suggested = u16::from_be_bytes([body[18], body[19]]);
    match map(state, client, internal, suggested, lifetime, Via::Pcp) {
        Some((port, lifetime)) => {
            answer_body[18..20].copy_from_slice(&port.to_be_bytes());
            answer_body[20..36].copy_from_slice(&mapped(state.wan));
            let mut r = pcp_header(state, opcode, 0, lifetime);
            r.extend_from_slice(&answer_body);
            r
        }
        None => {
            let mut r = pcp_header(state, opcode, PCP_NO_RESOURCES, 0);
            r.extend_from_slice(&answer_body);
            r
        }
    }
}

/// Grants (or with `lifetime` 0, deletes) the mapping of `client:internal`;
/// the external port and lifetime granted, or `None` if it could not be.
fn map(
    state: &State,
    client: Ipv4Addr,
    internal: u16,
    suggested: u16,
    lifetime: u32,
    via: Via,
) -> Option<(u16, u32)> {
    if internal == 0 {
        return None;
    }
    let host = SocketAddr::new(IpAddr::V4(client), internal);
    let mut mappings = lock(&state.mappings);
    let existing = mappings
        .iter()
        .find(|(_, g)| g.internal == host)
        .map(|(port, _)| *port);
    if lifetime == 0 {
        if let Some(port) = existing {
            mappings.remove(&port);
            drop(mappings);
            apply(state);
        }
        return Some((internal, 0));
    }
    let lifetime = lifetime.min(MAX_LIFETIME);
    let free = |p: u16| p != 0 && p != PORT && !mappings.contains_key(&p);
    let port = existing
        .or_else(|| [suggested, internal].into_iter().find(|&p| free(p)))
        .or_else(|| (1024..=u16::MAX).find(|&p| free(p)))?;
    mappings.insert(
        port,
        Granted {
            internal: host,
            external: SocketAddr::new(IpAddr::V4(state.wan), port),
            via,
            expires: Instant::now() + Duration::from_secs(lifetime.into()),
        },
    );
    drop(mappings);
    apply(state);
    Some((port, lifetime))
}

/// Removes the mappings whose lifetime ended.
fn expire(state: &State) {
    let now = Instant::now();
    let mut mappings = lock(&state.mappings);
    let before = mappings.len();
    mappings.retain(|_, g| g.expires > now);
    let changed = mappings.len() != before;
    drop(mappings);
    if changed {
        apply(state);
    }
}

/// Rewrites the table's two chains from the mappings in force.
fn apply(state: &State) {
    let mut text = format!("flush chain ip {TABLE} pre\nflush chain ip {TABLE} post\n");
    for g in lock(&state.mappings).values() {
        let (IpAddr::V4(host), port) = (g.internal.ip(), g.internal.port()) else {
            continue;
        };
        let external = g.external.port();
        let _ = writeln!(
            text,
            "add rule ip {TABLE} pre iifname \"{}\" ip daddr {} tcp dport {external} dnat to {host}:{port}",
            state.wan_if, state.wan
        );
        let _ = writeln!(
            text,
            "add rule ip {TABLE} post oifname \"{}\" ip saddr {host} tcp sport {port} snat to {}:{external}",
            state.wan_if, state.wan
        );
    }
    if let Err(e) = cmd::ip_netns_exec_with_stdin(&state.netns, NFT, &["-f", "-"], Some(&text)) {
        tracing::warn!(error = %e, "lab: port-mapping rules not applied");
    }
}
