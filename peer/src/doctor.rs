//! `peer doctor`: will direct chats work from this host, and why not?
//!
//! It asks the rendezvous, from one fixed local port, what it sees, and tests
//! the host itself:
//! 1. **Public address** and whether the NAT kept the local port: the main port
//!    reflects the connection's address ([`RendezvousConn::reflect`]).
//! 2. **Mapping**: the probe port (main port + 1) reflects a second connection from
//!    the same local port. The same public port means the NAT maps independently of
//!    the destination (punching works); another port means a "symmetric" NAT, whose
//!    step between the two ports is reported.
//! 3. **Unsolicited inbound SYNs**: the rendezvous dials our public address back
//!    ([`RendezvousConn::dial_back`]): a reset, silence (dropped), or a connection.
//! 4. **Simultaneous open in this kernel**: a socket connects to its own address
//!    and port, sends a line and reads it back (the SYN meets its own SYN_SENT
//!    socket, as two crossing SYNs do).
//! 5. **IPv6**: whether the rendezvous has an IPv6 address and answers on it,
//!    the address it sees there, and what an unsolicited SYN to that address
//!    meets (a stateful firewall drops it: a simultaneous open still passes,
//!    so chats with peers that have IPv6 can be direct whatever the IPv4 NAT).
//!
//! 6. **Port mapping**: whether the router grants a forward of the port, and in
//!    which protocols (PCP, NAT-PMP, UPnP-IGD, [`crate::portmap`]): a short
//!    mapping is asked for in each at once and deleted again. Not asked when
//!    the rendezvous runs on this host.
//!
//! Then a verdict in plain words, with what to do about it.
//!
//! Every step has a deadline (the rendezvous' requests through
//! [`RendezvousConn`]'s bounds, the local tests 3 s each), and a
//! `--server` that is not a punchline rendezvous is named as such within
//! seconds, with what it sent; text from the server reaches the report only
//! sanitised.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use punchline_proto::{classify_mapping, DialBackResult, Mapping};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio::time::timeout;

use crate::client::RendezvousConn;
use crate::error::PeerError;
use crate::{with_default_port, PROBE_PORT_OFFSET};

/// Bound on the self-connect test and on the IPv6 connection.
const LOCAL_TEST_TIMEOUT: Duration = Duration::from_secs(3);

/// What the doctor found.
#[derive(Debug, Clone)]
pub struct Findings {
    /// The rendezvous address used (IPv4 when it has one).
    pub server: SocketAddr,
    /// Our side of the connection to it: local address and the fixed port.
    pub local: SocketAddr,
    /// Our address as the main port saw it.
    pub public: SocketAddr,
    /// Our address as the probe port saw it, if the probe answered.
    pub probe: Option<SocketAddr>,
    /// Whether the public address is one of this host's own (no NAT).
    pub behind_nat: bool,
    /// The mapping, from the two reflections.
    pub mapping: Mapping,
    /// What an unsolicited SYN to our public address met, if the server could say.
    pub inbound: Option<DialBackResult>,
    /// The self-connect test: the round trip of a line, or why it failed.
    pub simultaneous_open: Result<Duration, String>,
    /// IPv6 towards the rendezvous.
    pub ipv6: Ipv6Finding,
    /// What the router said to a request for a port mapping.
    pub port_mapping: PortMappingFinding,
}

/// Whether the router forwards a port on request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortMappingFinding {
    /// Not asked (the rendezvous runs on this host).
    NotAsked,
    /// No default gateway (IPv4) to ask.
    NoGateway,
    /// The gateway did not grant one (no answer, or a refusal).
    NotOffered {
        /// The gateway asked.
        gateway: std::net::Ipv4Addr,
    },
    /// Granted (and deleted again), in one protocol or more.
    Offered {
        /// Each protocol that granted one, and the address it forwarded.
        grants: Vec<(crate::portmap::Protocol, SocketAddr)>,
    },
}

/// IPv6 towards the rendezvous.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ipv6Finding {
    /// The rendezvous' name has no IPv6 address.
    NoAddress,
    /// Connected; our IPv6 address as the rendezvous saw it (if it said).
    Reachable {
        /// The rendezvous' IPv6 address.
        server: SocketAddr,
        /// Our address as it saw it.
        public: Option<SocketAddr>,
        /// What its SYN to that address met, if it could say.
        inbound: Option<DialBackResult>,
    },
    /// It has one, but it did not answer.
    Unreachable {
        /// The rendezvous' IPv6 address.
        server: SocketAddr,
        /// The error.
        error: String,
    },
}

/// How well direct chats will work from here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outlook {
    /// Direct chats should work with peers behind most NATs.
    Good,
    /// Direct chats should work, with a caveat (resets, an unmeasured mapping,
    /// or a symmetric NAT on IPv4 beside working IPv6).
    Likely,
    /// Direct chats will only work with a peer on the same LAN.
    LanOnly,
    /// This host cannot do it at all.
    Impossible,
}

/// Runs every check against the rendezvous `server` (`HOST[:PORT]`) from local
/// `port` (0: any). Fails only if the rendezvous cannot be reached at all.
pub async fn examine(
    server: &str,
    port: u16,
    probe_port: Option<u16>,
) -> Result<Findings, PeerError> {
    let server_name = with_default_port(server);
    let addrs = crate::client::resolve(&server_name).await?;
    // The NAT checks over IPv4 when the server has it: IPv4 is where NATs are.
    let v4 = addrs.iter().find(|a| a.is_ipv4()).copied();
    let first = v4.or_else(|| addrs.first().copied());
    let target = first.map_or(server_name.clone(), |a| a.to_string());
    let mut rendezvous = RendezvousConn::connect(&target, port).await?;
    let local = rendezvous.local_addr()?;
    let public = rendezvous.reflect().await?;
    let probe_port =
        probe_port.unwrap_or_else(|| rendezvous.server.port().wrapping_add(PROBE_PORT_OFFSET));
    let probe = rendezvous.probe(probe_port).await;
    let mapping = classify_mapping(public, probe);
    let inbound = match rendezvous.dial_back().await {
        Ok((_, result, _)) => Some(result),
        Err(e) => {
            tracing::debug!(error = %e, "dial-back");
            None
        }
    };
    let server = rendezvous.server;
    drop(rendezvous);
    let own: Vec<IpAddr> = if_addrs::get_if_addrs()
        .map(|ifs| ifs.iter().map(|i| i.ip()).collect())
        .unwrap_or_default();
    let behind_nat = !own.contains(&public.ip());
    let simultaneous_open = self_connect().await;
    let ipv6 = match addrs.iter().find(|a| a.is_ipv6()) {
        None => Ipv6Finding::NoAddress,
        Some(&v6) => ipv6_check(v6).await,
    };
    let port_mapping = if crate::punch::Here::new(server).local_trial {
        PortMappingFinding::NotAsked
    } else {
        match crate::portmap::default_gateway() {
            None => PortMappingFinding::NoGateway,
            Some(gateway) => {
                let leases = crate::portmap::request_each(local.port())
                    .await
                    .unwrap_or_default();
                let mut grants: Vec<_> = leases.iter().map(|l| (l.protocol, l.external)).collect();
                grants.sort_by_key(|(p, _)| p.to_string());
                for lease in leases {
                    lease.release().await;
                }
                if grants.is_empty() {
                    PortMappingFinding::NotOffered { gateway }
                } else {
                    PortMappingFinding::Offered { grants }
                }
            }
        }
    };
    Ok(Findings {
        server,
        local,
        public,
        probe,
        behind_nat,
        mapping,
        inbound,
        simultaneous_open,
        ipv6,
        port_mapping,
    })
}

/// The classic proof that the kernel does simultaneous open: a socket connects to
/// its own address and port, then a line written comes back on it.
pub async fn self_connect() -> Result<Duration, String> {
    let started = Instant::now();
    let test = async {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let me = socket.local_addr()?;
        let mut stream = socket.connect(me).await?;
        stream.write_all(b"punchline self-connect\n").await?;
        let mut back = [0u8; 23];
        stream.read_exact(&mut back).await?;
        if &back != b"punchline self-connect\n" {
            return Err(std::io::Error::other("the line came back changed"));
        }
        Ok::<(), std::io::Error>(())
    };
    match timeout(LOCAL_TEST_TIMEOUT, test).await {
        Ok(Ok(())) => Ok(started.elapsed()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer in time".to_owned()),
    }
}

async fn ipv6_check(server: SocketAddr) -> Ipv6Finding {
    match timeout(
        LOCAL_TEST_TIMEOUT,
        RendezvousConn::connect(&server.to_string(), 0),
    )
    .await
    {
        Ok(Ok(mut r)) => {
            let public = r.reflect().await.ok();
            let inbound = r.dial_back().await.ok().map(|(_, result, _)| result);
            Ipv6Finding::Reachable {
                server,
                public,
                inbound,
            }
        }
        Ok(Err(e)) => Ipv6Finding::Unreachable {
            server,
            error: e.to_string(),
        },
        Err(_) => Ipv6Finding::Unreachable {
            server,
            error: "no answer in time".to_owned(),
        },
    }
}

impl Findings {
    /// How well direct chats will work.
    pub fn outlook(&self) -> Outlook {
        if self.simultaneous_open.is_err() {
            Outlook::Impossible
        } else if self.mapping.is_symmetric() && !self.ipv6_works() && !self.mapping_offered() {
            Outlook::LanOnly
        } else if self.mapping.is_symmetric()
            || self.mapping == Mapping::Unknown
            || (self.behind_nat && self.inbound == Some(DialBackResult::Refused))
        {
            Outlook::Likely
        } else {
            Outlook::Good
        }
    }

    /// The report: findings one per line, then the verdict and suggestions.
    pub fn report(&self) -> String {
        let mut r = String::new();
        let line = |r: &mut String, label: &str, value: &str| {
            let _ = writeln!(r, "{label:<24} {value}");
        };
        line(&mut r, "rendezvous", &self.server.to_string());
        line(&mut r, "local address", &self.local.to_string());
        line(&mut r, "public address", &self.public.to_string());
        let nat = if self.behind_nat {
            format!(
                "yes (the rendezvous sees {}, not one of this host's addresses)",
                self.public.ip()
            )
        } else {
            "no: this host has a public address".to_owned()
        };
        line(&mut r, "NAT", &nat);
        if self.behind_nat {
            let kept = if self.public.port() == self.local.port() {
                format!(
                    "yes (local port {} is public port {})",
                    self.local.port(),
                    self.public.port()
                )
            } else {
                format!(
                    "no (local port {} became {})",
                    self.local.port(),
                    self.public.port()
                )
            };
            line(&mut r, "port preserved", &kept);
        }
        let mapping = match self.mapping {
            Mapping::Independent => format!(
                "endpoint-independent: the probe port saw the same public port {}",
                self.public.port()
            ),
            Mapping::DependsOnDestination { first, second } => format!(
                "depends on the destination (\"symmetric\"): public port {first} towards the main port, {second} towards the probe port (step {:+})",
                i32::from(second) - i32::from(first)
            ),
            Mapping::Unknown => "not measured: the probe port did not answer".to_owned(),
        };
        line(&mut r, "mapping", &mapping);
        let inbound = match self.inbound {
            Some(DialBackResult::Refused) => "reset at once (by the NAT, a firewall or this host)",
            Some(DialBackResult::NoAnswer) => "dropped silently",
            Some(DialBackResult::Connected) => "accepted: something listens at the public address",
            Some(DialBackResult::Unknown) | None => "could not be tested",
        };
        line(&mut r, "unsolicited inbound SYN", inbound);
        let so = match &self.simultaneous_open {
            Ok(d) => format!(
                "works (a self-connect carried a line in {:.2} ms)",
                d.as_secs_f64() * 1000.0
            ),
            Err(e) => format!("FAILED: {e}"),
        };
        line(&mut r, "simultaneous open", &so);
        let v6 = match &self.ipv6 {
            Ipv6Finding::NoAddress => "the rendezvous has no IPv6 address".to_owned(),
            Ipv6Finding::Reachable {
                server,
                public,
                inbound,
            } => {
                let seen = match public {
                    Some(p) => format!("reachable at {server}; it sees this host as {p}"),
                    None => format!("reachable at {server}"),
                };
                let inbound = match inbound {
                    Some(DialBackResult::NoAnswer) => {
                        "; an unsolicited SYN there is dropped (a stateful firewall: punching works)"
                    }
                    Some(DialBackResult::Refused) => {
                        "; an unsolicited SYN there is reset (punching works if both sides connect at nearly the same moment)"
                    }
                    Some(DialBackResult::Connected) => {
                        "; an unsolicited SYN there is accepted (something listens)"
                    }
                    Some(DialBackResult::Unknown) | None => "",
                };
                format!("{seen}{inbound}")
            }
            Ipv6Finding::Unreachable { server, error } => {
                format!("the rendezvous has {server} but it is unreachable ({error})")
            }
        };
        line(&mut r, "IPv6", &v6);
        let mapping = match &self.port_mapping {
            PortMappingFinding::NotAsked => {
                "not asked (the rendezvous runs on this host)".to_owned()
            }
            PortMappingFinding::NoGateway => "not asked: no IPv4 default gateway".to_owned(),
            PortMappingFinding::NotOffered { gateway } => {
                format!(
                    "not offered: the gateway {gateway} granted no mapping (PCP, NAT-PMP, UPnP-IGD)"
                )
            }
            PortMappingFinding::Offered { grants } => {
                let protocols: Vec<String> = grants.iter().map(|(p, _)| p.to_string()).collect();
                let mut externals: Vec<String> =
                    grants.iter().map(|(_, e)| e.to_string()).collect();
                externals.sort();
                externals.dedup();
                format!(
                    "offered by the router ({}): it forwarded {} to this host's port {} (deleted again); peers reach this host there",
                    protocols.join(", "),
                    externals.join(" and "),
                    self.local.port()
                )
            }
        };
        line(&mut r, "port mapping", &mapping);
        r.push('\n');
        let _ = writeln!(r, "verdict: {}", self.verdict());
        for s in self.suggestions() {
            let _ = writeln!(r, "  - {s}");
        }
        r
    }

    /// Whether the router forwards a port on request.
    pub fn mapping_offered(&self) -> bool {
        matches!(self.port_mapping, PortMappingFinding::Offered { .. })
    }

    /// Whether this host reaches the rendezvous over IPv6 (then the punch
    /// goes over IPv6 too with a peer that has it).
    pub fn ipv6_works(&self) -> bool {
        matches!(self.ipv6, Ipv6Finding::Reachable { .. })
    }

    /// The verdict in one sentence.
    pub fn verdict(&self) -> String {
        match self.outlook() {
            Outlook::Impossible => "direct chats cannot work from this host: its kernel did not complete a TCP simultaneous open".to_owned(),
            Outlook::Likely if self.mapping.is_symmetric() && self.mapping_offered() => "direct chats should work: your NAT gives every destination its own public port, but the router forwards the port on request (a port mapping), and the peer asks for one at each meeting".to_owned(),
            Outlook::Likely if self.mapping.is_symmetric() => "over IPv4, direct chats will only work with a peer on your own LAN (your NAT gives every destination its own public port), but this host has IPv6: chats with peers that have IPv6 can be direct over it".to_owned(),
            Outlook::LanOnly => "direct chats will only work with a peer on your own LAN: your NAT gives every destination its own public port, so the other side cannot know which port to reach".to_owned(),
            Outlook::Likely if self.mapping == Mapping::Unknown => "direct chats will probably work, but the NAT's mapping could not be measured".to_owned(),
            Outlook::Likely => "direct chats should work: your NAT keeps one public port for every destination; it answers unsolicited SYNs with a reset, so both sides must connect at nearly the same moment (punchline times this), and very distant peers may need a second try".to_owned(),
            Outlook::Good if !self.behind_nat => "direct chats should work: this host has a public address, reachable by peers behind most NATs".to_owned(),
            Outlook::Good => "direct chats should work: your NAT keeps one public port for every destination and drops unsolicited SYNs, the friendliest kind for punching".to_owned(),
        }
    }

    /// What the user can do about it.
    pub fn suggestions(&self) -> Vec<String> {
        let mut out = Vec::new();
        match self.outlook() {
            Outlook::Impossible => out.push(
                "check for a firewall or security module on this host that blocks connections to itself (loopback)".to_owned(),
            ),
            Outlook::LanOnly => {
                out.push("if you control the router: look for a setting such as \"endpoint-independent mapping\", \"full-cone\" or a NAT type other than \"strict/symmetric\" (some routers call it \"gaming mode\")".to_owned());
                out.push(format!(
                    "or forward a TCP port on the router to this host (by hand, UPnP or NAT-PMP) and chat with: peer --port PORT --candidate {}:PORT",
                    self.public.ip()
                ));
                out.push("or chat from another network (a phone's hotspot often behaves differently)".to_owned());
            }
            Outlook::Likely if self.mapping == Mapping::Unknown => out.push(format!(
                "the rendezvous' probe port ({}:{}) did not answer: it may be firewalled, or the server runs with another probe port (--probe-port)",
                self.server.ip(),
                self.server.port().wrapping_add(PROBE_PORT_OFFSET)
            )),
            Outlook::Likely | Outlook::Good => {}
        }
        if self.behind_nat
            && self.public.port() != self.local.port()
            && !self.mapping.is_symmetric()
        {
            out.push("your NAT changes the local port: harmless for punching, since the rendezvous tells the other side the public one".to_owned());
        }
        if self.inbound == Some(DialBackResult::Connected) {
            out.push(format!(
                "something accepts connections at {}: if that is a port forward you did not expect, check your router",
                self.public
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn this_kernel_does_a_self_connect() {
        let took = self_connect().await.expect("self-connect works on Linux");
        assert!(took < LOCAL_TEST_TIMEOUT);
    }

    fn findings(mapping: Mapping, nat: bool, inbound: DialBackResult) -> Findings {
        Findings {
            server: "203.0.113.10:7425".parse().expect("addr"),
            local: "192.168.1.2:40000".parse().expect("addr"),
            public: "198.51.100.7:40000".parse().expect("addr"),
            probe: None,
            behind_nat: nat,
            mapping,
            inbound: Some(inbound),
            simultaneous_open: Ok(Duration::from_micros(80)),
            ipv6: Ipv6Finding::NoAddress,
            port_mapping: PortMappingFinding::NotOffered {
                gateway: std::net::Ipv4Addr::new(192, 168, 1, 1),
            },
        }
    }

    #[test]
    fn verdicts_follow_the_findings() {
        use DialBackResult::*;
        let sym = Mapping::DependsOnDestination {
            first: 1,
            second: 5,
        };
        assert_eq!(findings(sym, true, NoAnswer).outlook(), Outlook::LanOnly);
        assert_eq!(
            findings(Mapping::Independent, true, NoAnswer).outlook(),
            Outlook::Good
        );
        assert_eq!(
            findings(Mapping::Independent, true, Refused).outlook(),
            Outlook::Likely
        );
        assert_eq!(
            findings(Mapping::Independent, false, Refused).outlook(),
            Outlook::Good
        );
        assert_eq!(
            findings(Mapping::Unknown, true, NoAnswer).outlook(),
            Outlook::Likely
        );
        let mut broken = findings(Mapping::Independent, true, NoAnswer);
        broken.simultaneous_open = Err("refused".into());
        assert_eq!(broken.outlook(), Outlook::Impossible);
        let report = findings(sym, true, NoAnswer).report();
        assert!(report.contains("step +4"), "{report}");
        assert!(report.contains("--candidate 198.51.100.7:PORT"), "{report}");
        assert!(!report.contains("IPv6 can be direct"), "{report}");
        let mut with_v6 = findings(sym, true, NoAnswer);
        with_v6.ipv6 = Ipv6Finding::Reachable {
            server: "[2001:db8::10]:7425".parse().expect("addr"),
            public: Some("[2001:db8:a:1::10]:40000".parse().expect("addr")),
            inbound: Some(NoAnswer),
        };
        let report = with_v6.report();
        assert!(
            report.contains("peers that have IPv6 can be direct"),
            "{report}"
        );
        assert!(report.contains("dropped (a stateful firewall"), "{report}");
        let mut mapped = findings(sym, true, NoAnswer);
        mapped.port_mapping = PortMappingFinding::Offered {
            grants: vec![
                (
                    crate::portmap::Protocol::Pcp,
                    "198.51.100.7:40000".parse().expect("addr"),
                ),
                (
                    crate::portmap::Protocol::Upnp,
                    "198.51.100.7:40000".parse().expect("addr"),
                ),
            ],
        };
        assert_eq!(mapped.outlook(), Outlook::Likely);
        let report = mapped.report();
        assert!(
            report.contains(
                "offered by the router (PCP, UPnP-IGD): it forwarded 198.51.100.7:40000 to"
            ),
            "{report}"
        );
        assert!(report.contains("forwards the port on request"), "{report}");
    }
}
