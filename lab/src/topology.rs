//! The topology builder: creates the namespaces, veth links, addresses, routes
//! and NAT rules of one lab, starts its WAN emulator, and removes all of it on
//! drop (also while a test unwinds from a panic).
//!
//! # Shape
//!
//! ```text
//!  host A ─ [A's NAT / firewall] ─┐                 ┌─ [B's NAT / firewall] ─ host B
//!                         side-a  │    "internet"   │  side-b
//!                                 ├─ (router, WAN ──┤
//!                         side-rv │    emulator)    │  side-probe
//!              rendezvous host ───┘                 └─── probe host
//! ```
//!
//! Addresses (all "public" ones are documentation ranges):
//!
//! | what | address |
//! |---|---|
//! | rendezvous host | 203.0.113.10 (internet side 203.0.113.1) |
//! | probe host (a second public host for tests) | 198.18.0.10 |
//! | side A's public edge (router WAN or public host) | 192.0.2.2 (internet side 192.0.2.1) |
//! | side B's public edge | 198.51.100.2 (internet side 198.51.100.1) |
//! | LAN behind a NAT | 10.0.1.0/24 (A), 10.0.2.0/24 (B, or A's range with `overlapping_lans`); router .1, host .10, same-LAN B .11 |
//! | carrier (CGNAT) segment | 100.64.1.0/24 (A), 100.64.2.0/24 (B); carrier .1, home router .2 |
//! | public LAN behind a firewall | 198.18.1.0/24 (A), 198.18.2.0/24 (B); router .1, host .10 |
//!
//! # IPv6
//!
//! A lab built with [`LabConfig::with_ipv6`] (dual stack) or
//! [`LabConfig::with_ipv6_only`] also carries IPv6, from the documentation
//! prefix 2001:db8::/32, one /64 per link. IPv6 is never translated: each host
//! has one global address, every router on its path forwards IPv6, and the
//! router nearest the host applies the side's [`Ipv6Filter`] (a stateful
//! firewall for every kind but [`NatKind::Public`]; a CGNAT's carrier router only
//! forwards). With [`Ipv6Mode::Only`] hosts A and B have no IPv4 address or route
//! at all (loopback aside); their routers, the rendezvous and the probe host keep
//! both families.
//!
//! | what | IPv6 address |
//! |---|---|
//! | rendezvous host | 2001:db8:0:10::10 (internet side ::1) |
//! | probe host | 2001:db8:0:18::10 (internet side ::1) |
//! | side A's uplink | 2001:db8:a::/64: internet router ::1, edge (router WAN or public host) ::2 |
//! | side A's LAN (behind a NAT or a firewall) | 2001:db8:a:1::/64: router ::1, host ::10, same-LAN B ::11 |
//! | side A's carrier (CGNAT) segment | 2001:db8:a:64::/64: carrier ::1, home router ::2 |
//! | side B | the same with `b` for `a`: 2001:db8:b::/64, 2001:db8:b:1::/64, 2001:db8:b:64::/64 |
//!
//! Global addresses stay distinct with `overlapping_lans`. Duplicate address
//! detection is off in every namespace, so addresses are usable as soon as the
//! lab is built.
//!
//! # Names
//!
//! Programs started with [`Lab::command`] in any of the four hosts resolve
//! [`RV_NAME`] to the rendezvous host's addresses (IPv4, and IPv6 when the lab
//! has it), as a deployment's A and AAAA records would: the lab writes
//! `/etc/netns/NAMESPACE/hosts`, which `ip netns exec` mounts over `/etc/hosts`,
//! and removes it with the namespace.
//!
//! Every interface is created directly inside its namespace (`ip link add ...
//! netns X type veth peer ... netns Y`), so nothing ever appears in the root
//! namespace and interface names can be fixed: hosts have `eth0`, routers `wan`
//! and `lan`, the internet router `side-a`, `side-b`, `side-rv`, `side-probe`.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::process::Command;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::cmd::{self, NFT};

/// The nftables table of [`Lab::cut_path`].
const CUT_TABLE: &str = "cut";
use crate::error::{LabError, Result};
use crate::names;
use crate::nat::{Ipv6Filter, NatKind, RouterRules, WAN_IF};
use crate::netns;
use crate::wan::{Delayer, DelayerStats, Link, WanConfig};

/// Address of the rendezvous host.
pub const RV_ADDR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// Address of the probe host, a second public host for tests.
pub const PROBE_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
/// IPv6 address of the rendezvous host, in a lab with IPv6.
pub const RV_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0x10, 0, 0, 0, 0x10);
/// IPv6 address of the probe host, in a lab with IPv6.
pub const PROBE_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0x18, 0, 0, 0, 0x10);
/// The rendezvous host's name in the hosts file of programs run in the lab's
/// hosts ([`Lab::command`]): it resolves to [`RV_ADDR`] and, in a lab with
/// IPv6, also to [`RV_ADDR6`].
pub const RV_NAME: &str = "rendezvous.lab";

/// Prefix length of every lab subnet.
const PREFIX_LEN: u8 = 24;
/// Host octet of the internet router on a link, and of a router on its LAN.
const GATEWAY: u8 = 1;
/// Host octet of the edge device (router WAN or public host) on a link.
const EDGE: u8 = 2;
/// Host octet of side hosts, rendezvous and probe.
const HOST: u8 = 10;
/// Host octet of side B's host when it shares A's LAN.
const SECOND_HOST: u8 = 11;
/// Prefix length of every IPv6 link.
const PREFIX_LEN6: u8 = 64;
/// Where `/proc/sys` shows IPv6 settings; missing if the kernel has no IPv6.
const IPV6_SYSCTL_DIR: &str = "/proc/sys/net/ipv6";

/// One of the two peers' sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// Side A.
    A,
    /// Side B.
    B,
}

/// A host of the lab on which programs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Host {
    /// The peer host of side A.
    A,
    /// The peer host of side B.
    B,
    /// The rendezvous host (public).
    Rv,
    /// The probe host (public), a second destination for tests.
    Probe,
}

impl From<Side> for Host {
    fn from(side: Side) -> Host {
        match side {
            Side::A => Host::A,
            Side::B => Host::B,
        }
    }
}

/// How the two sides are placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Each side has its own edge of the given kind.
    Separate {
        /// Side A's edge.
        a: NatKind,
        /// Side B's edge.
        b: NatKind,
    },
    /// Both hosts on one LAN behind one edge of the given kind (which must have
    /// a LAN, i.e. not [`NatKind::Public`]). The NAT does not hairpin.
    SameLan(NatKind),
}

/// Whether and how a lab carries IPv6 (see the module doc for the plan).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Ipv6Mode {
    /// IPv4 only: no IPv6 address, route or rule beyond the link-local
    /// addresses the kernel gives every interface.
    #[default]
    Off,
    /// Dual stack: every host has its IPv4 address (translated behind a NAT)
    /// and one global IPv6 address (never translated, filtered per the side's
    /// [`Ipv6Filter`]).
    DualStack,
    /// Like [`Ipv6Mode::DualStack`], but hosts A and B have no IPv4 address and
    /// no IPv4 route; the rendezvous and probe hosts keep both families.
    Only,
}

impl Ipv6Mode {
    /// Whether the lab carries IPv6 at all.
    pub fn enabled(self) -> bool {
        self != Ipv6Mode::Off
    }
}

/// What to build.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LabConfig {
    /// Placement and NAT kinds of the sides.
    pub layout: Layout,
    /// Link shapes of the emulated WAN.
    pub wan: WanConfig,
    /// Give B's NAT LAN the same private range as A's (both hosts 10.0.1.10),
    /// as two home networks often have. IPv6 prefixes stay distinct.
    pub overlapping_lans: bool,
    /// Whether the lab carries IPv6.
    pub ipv6: Ipv6Mode,
    /// Side A's router grants port mappings in these protocols (the lab's
    /// own NAT-PMP, PCP and UPnP-IGD responder, [`crate::portmap`]: stock
    /// routers refuse the lab's reserved "public" addresses); A's edge must
    /// be a single NAT router.
    pub port_mapping: Option<crate::portmap::Protocols>,
}

impl LabConfig {
    /// Separate sides of kinds `a` and `b`, no delay.
    pub fn new(a: NatKind, b: NatKind) -> LabConfig {
        LabConfig {
            layout: Layout::Separate { a, b },
            wan: WanConfig::default(),
            overlapping_lans: false,
            ipv6: Ipv6Mode::Off,
            port_mapping: None,
        }
    }

    /// Both hosts behind one edge of kind `kind`, no delay.
    pub fn same_lan(kind: NatKind) -> LabConfig {
        LabConfig {
            layout: Layout::SameLan(kind),
            wan: WanConfig::default(),
            overlapping_lans: false,
            ipv6: Ipv6Mode::Off,
            port_mapping: None,
        }
    }

    /// This config with the given WAN link shapes.
    pub fn with_wan(self, wan: WanConfig) -> LabConfig {
        LabConfig { wan, ..self }
    }

    /// This config with B's LAN in the same private range as A's.
    pub fn with_overlapping_lans(self) -> LabConfig {
        LabConfig {
            overlapping_lans: true,
            ..self
        }
    }

    /// This config with IPv6 next to IPv4 ([`Ipv6Mode::DualStack`]).
    pub fn with_ipv6(self) -> LabConfig {
        LabConfig {
            ipv6: Ipv6Mode::DualStack,
            ..self
        }
    }

    /// This config with hosts A and B on IPv6 only ([`Ipv6Mode::Only`]).
    pub fn with_ipv6_only(self) -> LabConfig {
        LabConfig {
            ipv6: Ipv6Mode::Only,
            ..self
        }
    }

    /// This config with side A's router granting port mappings in
    /// `protocols` (e.g. [`crate::portmap::Protocols::BOTH`] for NAT-PMP and
    /// PCP, [`crate::portmap::Protocols::UPNP`] for UPnP-IGD alone).
    pub fn with_port_mapping(self, protocols: crate::portmap::Protocols) -> LabConfig {
        LabConfig {
            port_mapping: Some(protocols),
            ..self
        }
    }

    /// Checks that the config can be built.
    pub fn validate(&self) -> Result<()> {
        if self.port_mapping.is_some() {
            let a = match self.layout {
                Layout::Separate { a, .. } | Layout::SameLan(a) => a,
            };
            if !a.translates() || a == NatKind::Cgnat {
                return Err(LabError::InvalidConfig(format!(
                    "port mapping needs side A behind one NAT router, not {a}"
                )));
            }
        }
        if let Layout::SameLan(kind) = self.layout {
            if !kind.has_lan() {
                return Err(LabError::InvalidConfig(format!(
                    "a same-LAN layout needs an edge with a LAN, not {kind}"
                )));
            }
        }
        self.wan.validate()
    }
}

/// A host's namespace and addresses.
#[derive(Debug, Clone)]
struct HostInfo {
    netns: String,
    /// The planned IPv4 address (not assigned when `has_v4` is false).
    addr: Ipv4Addr,
    has_v4: bool,
    addr6: Option<Ipv6Addr>,
}

/// What was built for one side.
#[derive(Debug, Clone)]
struct SideInfo {
    kind: NatKind,
    host: HostInfo,
    public: Ipv4Addr,
    link: Link,
    /// Router namespaces, the one nearest the host first.
    routers: Vec<String>,
}

/// The first 64 bits of an IPv6 /64 prefix.
type Net6 = [u16; 4];

/// Address plan of one side.
struct SidePlan {
    /// Link to the internet.
    uplink: [u8; 3],
    /// Private LAN behind a NAT.
    lan: [u8; 3],
    /// Carrier segment between a CGNAT and the home router.
    carrier: [u8; 3],
    /// Public LAN behind a firewall.
    firewall_lan: [u8; 3],
    /// IPv6 prefix of the link to the internet.
    uplink6: Net6,
    /// IPv6 prefix of the LAN behind the router (NAT or firewall).
    lan6: Net6,
    /// IPv6 prefix of the carrier segment.
    carrier6: Net6,
    /// Interface name of this side's link in the internet namespace.
    inet_if: &'static str,
    link: Link,
}

const PLAN_A: SidePlan = SidePlan {
    uplink: [192, 0, 2],
    lan: [10, 0, 1],
    carrier: [100, 64, 1],
    firewall_lan: [198, 18, 1],
    uplink6: [0x2001, 0xdb8, 0xa, 0],
    lan6: [0x2001, 0xdb8, 0xa, 0x1],
    carrier6: [0x2001, 0xdb8, 0xa, 0x64],
    inet_if: "side-a",
    link: Link::A,
};

const PLAN_B: SidePlan = SidePlan {
    uplink: [198, 51, 100],
    lan: [10, 0, 2],
    carrier: [100, 64, 2],
    firewall_lan: [198, 18, 2],
    uplink6: [0x2001, 0xdb8, 0xb, 0],
    lan6: [0x2001, 0xdb8, 0xb, 0x1],
    carrier6: [0x2001, 0xdb8, 0xb, 0x64],
    inet_if: "side-b",
    link: Link::B,
};

const RV_NET: [u8; 3] = [203, 0, 113];
const PROBE_NET: [u8; 3] = [198, 18, 0];
const RV_NET6: Net6 = [0x2001, 0xdb8, 0, 0x10];
const PROBE_NET6: Net6 = [0x2001, 0xdb8, 0, 0x18];
const RV_IF: &str = "side-rv";
const PROBE_IF: &str = "side-probe";
/// Interface name of hosts.
const HOST_IF: &str = "eth0";
/// Interface (or bridge) name of a router's LAN side.
const LAN_IF: &str = "lan";

fn v4(net: [u8; 3], host: u8) -> Ipv4Addr {
    Ipv4Addr::new(net[0], net[1], net[2], host)
}

fn cidr(net: [u8; 3], host: u8) -> String {
    format!("{}/{PREFIX_LEN}", v4(net, host))
}

fn subnet(net: [u8; 3]) -> String {
    format!("{}/{PREFIX_LEN}", v4(net, 0))
}

/// The interface identifier of the device with IPv4 host octet `octet`: the
/// same digits, read as hex (10 → `::10`), so the two plans look alike.
fn iid(octet: u8) -> u16 {
    u16::from(octet / 100) * 0x100 + u16::from(octet / 10 % 10) * 0x10 + u16::from(octet % 10)
}

/// The IPv6 address of the device with host octet `octet` on `net`.
fn v6(net: Net6, octet: u8) -> Ipv6Addr {
    Ipv6Addr::new(net[0], net[1], net[2], net[3], 0, 0, 0, iid(octet))
}

fn cidr6(net: Net6, octet: u8) -> String {
    format!("{}/{PREFIX_LEN6}", v6(net, octet))
}

fn subnet6(net: Net6) -> String {
    format!(
        "{}/{PREFIX_LEN6}",
        Ipv6Addr::new(net[0], net[1], net[2], net[3], 0, 0, 0, 0)
    )
}

/// The hosts file of the lab's hosts: localhost, and [`RV_NAME`] for the
/// rendezvous host's addresses.
fn hosts_file(rv: Ipv4Addr, rv6: Option<Ipv6Addr>) -> String {
    let mut text = format!(
        "# written by the punchline NAT lab\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{rv}\t{RV_NAME}\n"
    );
    if let Some(rv6) = rv6 {
        let _ = writeln!(text, "{rv6}\t{RV_NAME}");
    }
    text
}

/// The namespaces of a lab, deleted (after killing what runs in them) when
/// this is dropped, newest first.
struct Namespaces {
    names: Vec<String>,
}

impl Namespaces {
    fn create(&mut self, name: String) -> Result<String> {
        netns::create(&name)?;
        self.names.push(name.clone());
        Ok(name)
    }

    fn remove_all(&mut self) -> Result<()> {
        let mut first_err = None;
        while let Some(name) = self.names.pop() {
            let result = netns::kill_all(&name).and_then(|()| netns::delete(&name));
            if let Err(err) = result {
                tracing::warn!(netns = %name, %err, "lab: teardown failed");
                first_err.get_or_insert(err);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        // Errors were logged; nothing more can be done while dropping.
        let _ = self.remove_all();
    }
}

/// A built lab. Dropping it stops the WAN emulator, kills every process left
/// in its namespaces and deletes the namespaces.
pub struct Lab {
    id: String,
    config: LabConfig,
    inet: String,
    a: SideInfo,
    b: SideInfo,
    rv: HostInfo,
    probe: HostInfo,
    delayer: Option<Delayer>,
    /// Side A's port-mapping responder, if asked for; stopped before the
    /// namespaces go.
    portmap: Option<crate::portmap::Responder>,
    namespaces: Namespaces,
}

/// Builder state while the namespaces are being made.
struct Builder {
    id: String,
    namespaces: Namespaces,
    inet: String,
    ipv6: Ipv6Mode,
}

impl Builder {
    fn ns(&self, role: &str) -> String {
        format!("{}-{role}", self.id)
    }

    /// Creates the namespace of `role`; with IPv6, turns duplicate address
    /// detection off in it before any interface exists, so that every address
    /// (link-local ones included, which neighbour discovery needs as sources)
    /// is usable at once instead of after a second or two of "tentative".
    fn create_ns(&mut self, role: &str) -> Result<String> {
        let ns = self.namespaces.create(self.ns(role))?;
        if self.ipv6.enabled() {
            self.sysctl(
                &ns,
                &[
                    ("net/ipv6/conf/all/accept_dad", "0"),
                    ("net/ipv6/conf/default/accept_dad", "0"),
                ],
            )?;
        }
        Ok(ns)
    }

    /// A veth pair: `if1` in `ns1`, `if2` in `ns2`.
    fn veth(&self, ns1: &str, if1: &str, ns2: &str, if2: &str) -> Result<()> {
        cmd::run(
            cmd::IP,
            &[
                "link", "add", if1, "netns", ns1, "type", "veth", "peer", "name", if2, "netns", ns2,
            ],
        )
        .map(drop)
    }

    fn addr_up(&self, ns: &str, dev: &str, cidr: &str) -> Result<()> {
        cmd::ip_in(ns, &["addr", "add", cidr, "dev", dev])?;
        self.link_up(ns, dev)
    }

    fn link_up(&self, ns: &str, dev: &str) -> Result<()> {
        cmd::ip_in(ns, &["link", "set", "dev", dev, "up"]).map(drop)
    }

    /// Adds an IPv6 address, usable at once (`nodad`).
    fn addr6(&self, ns: &str, dev: &str, cidr: &str) -> Result<()> {
        cmd::ip_in(ns, &["-6", "addr", "add", cidr, "dev", dev, "nodad"]).map(drop)
    }

    fn route(&self, ns: &str, dest: &str, via: Ipv4Addr) -> Result<()> {
        cmd::ip_in(ns, &["route", "add", dest, "via", &via.to_string()]).map(drop)
    }

    fn route6(&self, ns: &str, dest: &str, via: Ipv6Addr) -> Result<()> {
        cmd::ip_in(ns, &["-6", "route", "add", dest, "via", &via.to_string()]).map(drop)
    }

    /// Writes `/proc/sys/KEY` values inside `ns`.
    fn sysctl(&self, ns: &str, settings: &[(&str, &str)]) -> Result<()> {
        // /proc/sys/net is resolved against the namespace of the calling
        // thread, so a thread inside `ns` sets that namespace's switches.
        netns::run_in(ns, || {
            settings.iter().try_for_each(|(key, value)| {
                std::fs::write(format!("/proc/sys/{key}"), value).map_err(|source| LabError::Io {
                    what: format!("writing /proc/sys/{key} in {ns}"),
                    source,
                })
            })
        })?
    }

    fn forwarding(&self, ns: &str) -> Result<()> {
        self.sysctl(ns, &[("net/ipv4/ip_forward", "1")])
    }

    /// Turns IPv6 forwarding on for every interface of `ns` (writing `all`
    /// also sets `default`, so later interfaces forward too).
    fn forwarding6(&self, ns: &str) -> Result<()> {
        self.sysctl(ns, &[("net/ipv6/conf/all/forwarding", "1")])
    }

    fn nft(&self, ns: &str, ruleset: &str) -> Result<()> {
        cmd::ip_netns_exec_with_stdin(ns, NFT, &["-f", "-"], Some(ruleset)).map(drop)
    }

    fn rules(&self, ns: &str, rules: &RouterRules) -> Result<()> {
        self.nft(ns, &rules.ruleset())
    }

    /// A public host on its own internet link, with IPv4 unless `with_v4` is
    /// false.
    fn public_host(
        &mut self,
        role: &str,
        inet_if: &str,
        (net, net6): ([u8; 3], Net6),
        host: u8,
        with_v4: bool,
    ) -> Result<HostInfo> {
        let ns = self.create_ns(role)?;
        self.veth(&self.inet, inet_if, &ns, HOST_IF)?;
        self.addr_up(&self.inet, inet_if, &cidr(net, GATEWAY))?;
        if with_v4 {
            self.addr_up(&ns, HOST_IF, &cidr(net, host))?;
            self.route(&ns, "default", v4(net, GATEWAY))?;
        } else {
            self.link_up(&ns, HOST_IF)?;
        }
        let addr6 = if self.ipv6.enabled() {
            self.addr6(&self.inet, inet_if, &cidr6(net6, GATEWAY))?;
            self.addr6(&ns, HOST_IF, &cidr6(net6, host))?;
            self.route6(&ns, "default", v6(net6, GATEWAY))?;
            Some(v6(net6, host))
        } else {
            None
        };
        Ok(HostInfo {
            netns: ns,
            addr: v4(net, host),
            has_v4: with_v4,
            addr6,
        })
    }

    /// A router whose WAN is `up_net`.EDGE (and `up_net6`::2 with IPv6) behind
    /// `up_if` of `up_ns`, translating and filtering IPv4 per `rules` and
    /// filtering IPv6 per `filter6`.
    fn router(
        &mut self,
        role: &str,
        (up_ns, up_if): (&str, &str),
        (up_net, up_net6): ([u8; 3], Net6),
        rules: &RouterRules,
        filter6: Ipv6Filter,
    ) -> Result<String> {
        let ns = self.create_ns(role)?;
        self.veth(up_ns, up_if, &ns, WAN_IF)?;
        self.addr_up(up_ns, up_if, &cidr(up_net, GATEWAY))?;
        self.addr_up(&ns, WAN_IF, &cidr(up_net, EDGE))?;
        self.route(&ns, "default", v4(up_net, GATEWAY))?;
        self.forwarding(&ns)?;
        self.rules(&ns, rules)?;
        if self.ipv6.enabled() {
            self.addr6(up_ns, up_if, &cidr6(up_net6, GATEWAY))?;
            self.addr6(&ns, WAN_IF, &cidr6(up_net6, EDGE))?;
            self.route6(&ns, "default", v6(up_net6, GATEWAY))?;
            // The filter before forwarding: nothing unsolicited passes even
            // for a moment.
            if let Some(ruleset) = filter6.ruleset() {
                self.nft(&ns, &ruleset)?;
            }
            self.forwarding6(&ns)?;
        }
        Ok(ns)
    }

    /// The LAN of router `router`: one host on a veth, or several on a bridge.
    /// `hosts` are (role, host octet); `with_v4` says whether they get IPv4. Returns
    /// their infos in order.
    fn lan(
        &mut self,
        router: &str,
        (net, net6): ([u8; 3], Net6),
        hosts: &[(&str, u8)],
        with_v4: bool,
    ) -> Result<Vec<HostInfo>> {
        let mut infos = Vec::new();
        if let [(role, octet)] = hosts {
            let ns = self.create_ns(role)?;
            self.veth(router, LAN_IF, &ns, HOST_IF)?;
            self.addr_up(router, LAN_IF, &cidr(net, GATEWAY))?;
            if self.ipv6.enabled() {
                self.addr6(router, LAN_IF, &cidr6(net6, GATEWAY))?;
            }
            infos.push(self.lan_host(ns, (net, net6), *octet, with_v4)?);
        } else {
            cmd::ip_in(router, &["link", "add", "name", LAN_IF, "type", "bridge"])?;
            if self.ipv6.enabled() {
                // Neighbour discovery is multicast: flood it to every port
                // rather than depend on the bridge having learnt MLD reports.
                cmd::ip_in(
                    router,
                    &[
                        "link",
                        "set",
                        "dev",
                        LAN_IF,
                        "type",
                        "bridge",
                        "mcast_snooping",
                        "0",
                    ],
                )?;
            }
            self.addr_up(router, LAN_IF, &cidr(net, GATEWAY))?;
            if self.ipv6.enabled() {
                self.addr6(router, LAN_IF, &cidr6(net6, GATEWAY))?;
            }
            for (i, (role, octet)) in hosts.iter().enumerate() {
                let ns = self.create_ns(role)?;
                let port = format!("port{i}");
                self.veth(router, &port, &ns, HOST_IF)?;
                cmd::ip_in(router, &["link", "set", "dev", &port, "master", LAN_IF])?;
                cmd::ip_in(router, &["link", "set", "dev", &port, "up"])?;
                infos.push(self.lan_host(ns, (net, net6), *octet, with_v4)?);
            }
        }
        Ok(infos)
    }

    fn lan_host(
        &self,
        ns: String,
        (net, net6): ([u8; 3], Net6),
        octet: u8,
        with_v4: bool,
    ) -> Result<HostInfo> {
        if with_v4 {
            self.addr_up(&ns, HOST_IF, &cidr(net, octet))?;
            self.route(&ns, "default", v4(net, GATEWAY))?;
        } else {
            self.link_up(&ns, HOST_IF)?;
        }
        let addr6 = if self.ipv6.enabled() {
            self.addr6(&ns, HOST_IF, &cidr6(net6, octet))?;
            self.route6(&ns, "default", v6(net6, GATEWAY))?;
            Some(v6(net6, octet))
        } else {
            None
        };
        Ok(HostInfo {
            netns: ns,
            addr: v4(net, octet),
            has_v4: with_v4,
            addr6,
        })
    }

    /// Routes IPv6 prefixes `nets` from `ns` via `via` (when the lab has IPv6).
    fn routes6(&self, ns: &str, nets: &[Net6], via: Ipv6Addr) -> Result<()> {
        if self.ipv6.enabled() {
            for &net in nets {
                self.route6(ns, &subnet6(net), via)?;
            }
        }
        Ok(())
    }

    /// Builds one side's edge and LAN; `hosts` are the roles on the LAN (one, or
    /// two for a same-LAN layout). Returns the side infos in the order of `hosts`.
    fn side(
        &mut self,
        kind: NatKind,
        plan: &SidePlan,
        lan_net: [u8; 3],
        hosts: &[(&str, u8)],
    ) -> Result<Vec<SideInfo>> {
        let side_role = hosts.first().map_or("x", |(role, _)| *role);
        let public_edge = v4(plan.uplink, EDGE);
        let edge6 = v6(plan.uplink6, EDGE);
        let inet = self.inet.clone();
        let uplink = (inet.as_str(), plan.inet_if);
        let host_v4 = self.ipv6 != Ipv6Mode::Only;
        let (lan_hosts, routers) = match kind {
            NatKind::Public => {
                let host = self.public_host(
                    side_role,
                    plan.inet_if,
                    (plan.uplink, plan.uplink6),
                    EDGE,
                    host_v4,
                )?;
                (vec![host], Vec::new())
            }
            NatKind::Firewall => {
                let rules = RouterRules::for_kind(kind).expect("firewall has a router");
                let router = self.router(
                    &format!("{side_role}-fw"),
                    uplink,
                    (plan.uplink, plan.uplink6),
                    &rules,
                    Ipv6Filter::for_kind(kind),
                )?;
                self.route(&inet, &subnet(plan.firewall_lan), public_edge)?;
                self.routes6(&inet, &[plan.lan6], edge6)?;
                let hosts = self.lan(&router, (plan.firewall_lan, plan.lan6), hosts, host_v4)?;
                (hosts, vec![router])
            }
            NatKind::Cgnat => {
                let carrier = self.router(
                    &format!("{side_role}-cgn"),
                    uplink,
                    (plan.uplink, plan.uplink6),
                    &RouterRules::carrier(),
                    Ipv6Filter::carrier(),
                )?;
                let rules = RouterRules::for_kind(kind).expect("cgnat has a home router");
                let home = self.router(
                    &format!("{side_role}-nat"),
                    (carrier.as_str(), LAN_IF),
                    (plan.carrier, plan.carrier6),
                    &rules,
                    Ipv6Filter::for_kind(kind),
                )?;
                // IPv6 is routed, not translated: the internet needs a route to
                // the home LAN through the carrier, the carrier one through the
                // home router.
                self.routes6(&inet, &[plan.carrier6, plan.lan6], edge6)?;
                self.routes6(&carrier, &[plan.lan6], v6(plan.carrier6, EDGE))?;
                let hosts = self.lan(&home, (lan_net, plan.lan6), hosts, host_v4)?;
                (hosts, vec![home, carrier])
            }
            NatKind::Home | NatKind::Rst | NatKind::Range | NatKind::Symmetric => {
                let rules = RouterRules::for_kind(kind).expect("NAT kinds have a router");
                let router = self.router(
                    &format!("{side_role}-nat"),
                    uplink,
                    (plan.uplink, plan.uplink6),
                    &rules,
                    Ipv6Filter::for_kind(kind),
                )?;
                self.routes6(&inet, &[plan.lan6], edge6)?;
                let hosts = self.lan(&router, (lan_net, plan.lan6), hosts, host_v4)?;
                (hosts, vec![router])
            }
        };
        Ok(lan_hosts
            .into_iter()
            .map(|host| SideInfo {
                kind,
                // Without NAT the host is reachable at its own address; behind
                // NAT the world sees the outermost router's WAN address.
                public: if kind.translates() {
                    public_edge
                } else {
                    host.addr
                },
                host,
                link: plan.link,
                routers: routers.clone(),
            })
            .collect())
    }
}

impl Lab {
    /// Builds the topology described by `config`. On error everything created
    /// so far is removed again. First removes namespaces left by dead runs
    /// (see [`netns::cleanup_stale`]).
    pub fn build(config: &LabConfig) -> Result<Lab> {
        config.validate()?;
        if config.ipv6.enabled() && !Path::new(IPV6_SYSCTL_DIR).exists() {
            return Err(LabError::Prerequisite(
                "a lab with IPv6 needs a kernel with IPv6".into(),
            ));
        }
        // Best effort: what killed runs left behind (a test binary stopped with
        // Ctrl-C never drops its labs) is removed before adding more.
        match netns::cleanup_stale(false) {
            Ok(removed) if !removed.is_empty() => {
                tracing::info!(?removed, "lab: removed namespaces of dead runs");
            }
            Ok(_) => {}
            Err(err) => tracing::debug!(%err, "lab: stale namespace cleanup failed"),
        }
        let id = names::next_lab_id();
        let mut b = Builder {
            id: id.clone(),
            namespaces: Namespaces { names: Vec::new() },
            inet: String::new(),
            ipv6: config.ipv6,
        };
        let inet = b.create_ns("inet")?;
        b.inet = inet.clone();
        b.forwarding(&inet)?;
        if config.ipv6.enabled() {
            b.forwarding6(&inet)?;
        }
        let rv = b.public_host("rv", RV_IF, (RV_NET, RV_NET6), HOST, true)?;
        let probe = b.public_host("probe", PROBE_IF, (PROBE_NET, PROBE_NET6), HOST, true)?;
        let (a, side_b) = match config.layout {
            Layout::Separate { a, b: kind_b } => {
                let a_info = b.side(a, &PLAN_A, PLAN_A.lan, &[("a", HOST)])?;
                let b_lan = if config.overlapping_lans {
                    PLAN_A.lan
                } else {
                    PLAN_B.lan
                };
                let b_info = b.side(kind_b, &PLAN_B, b_lan, &[("b", HOST)])?;
                (a_info, b_info)
            }
            Layout::SameLan(kind) => {
                let mut both = b.side(
                    kind,
                    &PLAN_A,
                    PLAN_A.lan,
                    &[("a", HOST), ("b", SECOND_HOST)],
                )?;
                let second = both.split_off(1);
                (both, second)
            }
        };
        let (Some(a), Some(side_b)) = (a.into_iter().next(), side_b.into_iter().next()) else {
            return Err(LabError::InvalidConfig(
                "a side was built without a host".into(),
            ));
        };
        // Every host resolves the rendezvous' name (for programs run with
        // `ip netns exec`); removed with the namespace.
        let hosts = hosts_file(rv.addr, rv.addr6);
        for host in [&a.host, &side_b.host, &rv, &probe] {
            netns::write_etc(&host.netns, "hosts", &hosts)?;
        }
        let mut interfaces = vec![
            (PLAN_A.inet_if, Link::A),
            (RV_IF, Link::Rv),
            (PROBE_IF, Link::Probe),
        ];
        if matches!(config.layout, Layout::Separate { .. }) {
            interfaces.push((PLAN_B.inet_if, Link::B));
        }
        let delayer = if config.ipv6.enabled() {
            Delayer::start_dual_stack(&inet, &interfaces, config.wan)?
        } else {
            Delayer::start(&inet, &interfaces, config.wan)?
        };
        let lab = Lab {
            id,
            config: *config,
            inet,
            a,
            b: side_b,
            rv,
            probe,
            delayer: Some(delayer),
            portmap: None,
            namespaces: Namespaces {
                names: std::mem::take(&mut b.namespaces.names),
            },
        };
        let mut lab = lab;
        if let Some(protocols) = config.port_mapping {
            let router = lab.a.routers.first().cloned().ok_or_else(|| {
                LabError::InvalidConfig("port mapping needs side A's router".into())
            })?;
            let [n0, n1, n2, _] = lab.a.host.addr.octets();
            lab.portmap = Some(crate::portmap::Responder::start(
                &router,
                Ipv4Addr::new(n0, n1, n2, GATEWAY),
                lab.a.public,
                WAN_IF,
                protocols,
            )?);
        }
        tracing::info!(id = %lab.id, layout = ?config.layout, ipv6 = ?config.ipv6, "lab: built");
        Ok(lab)
    }

    /// The lab's id (`pl-PID-N`), the prefix of all its namespace names.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Side A's port-mapping responder, when the lab has one
    /// ([`LabConfig::with_port_mapping`]).
    pub fn portmap(&self) -> Option<&crate::portmap::Responder> {
        self.portmap.as_ref()
    }

    /// The configuration the lab was built from (with the WAN shapes as built;
    /// see [`Lab::wan`] for the ones in force).
    pub fn config(&self) -> &LabConfig {
        &self.config
    }

    fn host(&self, host: Host) -> &HostInfo {
        match host {
            Host::A => &self.a.host,
            Host::B => &self.b.host,
            Host::Rv => &self.rv,
            Host::Probe => &self.probe,
        }
    }

    fn side(&self, side: Side) -> &SideInfo {
        match side {
            Side::A => &self.a,
            Side::B => &self.b,
        }
    }

    /// Name of the network namespace of `host`.
    pub fn netns(&self, host: Host) -> &str {
        &self.host(host).netns
    }

    /// IPv4 address of `host` on its own interface (private for a host behind
    /// NAT). Hosts A and B of a lab built with [`Ipv6Mode::Only`] have none
    /// (see [`Lab::has_ipv4`]): for them this is the address the plan would
    /// give them, which nothing answers.
    pub fn addr(&self, host: Host) -> Ipv4Addr {
        self.host(host).addr
    }

    /// The IPv4 address the internet sees for `host`: the outermost NAT's
    /// public address for a host behind NAT, the host's own address otherwise
    /// (planned only, like [`Lab::addr`], for a host without IPv4).
    pub fn public_addr(&self, host: Host) -> Ipv4Addr {
        match host {
            Host::A => self.a.public,
            Host::B => self.b.public,
            Host::Rv | Host::Probe => self.host(host).addr,
        }
    }

    /// Whether `host` has an IPv4 address and route: false only for hosts A
    /// and B of a lab built with [`Ipv6Mode::Only`] (their loopback keeps
    /// 127.0.0.1).
    pub fn has_ipv4(&self, host: Host) -> bool {
        self.host(host).has_v4
    }

    /// How the lab carries IPv6.
    pub fn ipv6(&self) -> Ipv6Mode {
        self.config.ipv6
    }

    /// The global IPv6 address of `host`, or `None` in a lab without IPv6.
    pub fn addr6(&self, host: Host) -> Option<Ipv6Addr> {
        self.host(host).addr6
    }

    /// The IPv6 address the internet sees for `host`: the same as
    /// [`Lab::addr6`], since the lab never translates IPv6 (no NAT66).
    pub fn public_addr6(&self, host: Host) -> Option<Ipv6Addr> {
        self.addr6(host)
    }

    /// The name that resolves to the rendezvous host's addresses for programs
    /// started with [`Lab::command`] ([`RV_NAME`]).
    pub fn rv_name(&self) -> &'static str {
        RV_NAME
    }

    /// The edge kind of `side` (for a same-LAN layout, the shared edge's kind).
    pub fn nat_kind(&self, side: Side) -> NatKind {
        self.side(side).kind
    }

    /// Whether both hosts share one LAN.
    pub fn same_lan(&self) -> bool {
        matches!(self.config.layout, Layout::SameLan(_))
    }

    /// Router namespaces of `side`, the one nearest the host first (empty for a
    /// public host; two for CGNAT). For `conntrack -L` and `nft list ruleset`.
    pub fn routers(&self, side: Side) -> &[String] {
        &self.side(side).routers
    }

    /// Sets the connection tracking of every router of `side`: how long an
    /// established TCP flow is remembered without traffic, and whether a packet
    /// of a flow it does not know (or forgot) may be picked up mid-stream
    /// (`nf_conntrack_tcp_loose`; home routers that forget a flow do not).
    pub fn set_conntrack_tcp(&self, side: Side, established: Duration, loose: bool) -> Result<()> {
        for ns in self.routers(side) {
            // /proc/sys/net is per namespace: a thread inside `ns` sets its values.
            netns::run_in(ns, || -> Result<()> {
                let set = |name: &str, value: String| {
                    let path = format!("/proc/sys/net/netfilter/{name}");
                    std::fs::write(&path, value).map_err(|source| LabError::Io {
                        what: format!("writing {path} in {ns}"),
                        source,
                    })
                };
                set(
                    "nf_conntrack_tcp_timeout_established",
                    established.as_secs().to_string(),
                )?;
                set("nf_conntrack_tcp_loose", u8::from(loose).to_string())
            })??;
        }
        Ok(())
    }

    /// Cuts TCP between the host of `side` and `peer` (an address on the other
    /// side, IPv4 or IPv6) in the router of `side` nearest the host: every
    /// packet either way is answered with a reset, so a connection between them
    /// breaks at once and new ones are refused, until [`Lab::restore_path`].
    /// Cuts add up: a second call cuts a second address too.
    pub fn cut_path(&self, side: Side, peer: impl Into<IpAddr>) -> Result<()> {
        let peer = peer.into();
        // The nftables family and the match keyword are both `ip` or `ip6`.
        let family = nft_family(peer);
        let ruleset = format!(
            "table {family} {CUT_TABLE} {{\n  chain forward {{\n    type filter hook forward priority -10; policy accept;\n    \
             meta l4proto tcp {family} daddr {peer} reject with tcp reset\n    \
             meta l4proto tcp {family} saddr {peer} reject with tcp reset\n  }}\n}}\n"
        );
        cmd::ip_netns_exec_with_stdin(self.edge_router(side)?, NFT, &["-f", "-"], Some(&ruleset))
            .map(drop)
    }

    /// Undoes every [`Lab::cut_path`] of `side`. Fails if nothing was cut.
    pub fn restore_path(&self, side: Side) -> Result<()> {
        let router = self.edge_router(side)?;
        let families: &[&str] = if self.config.ipv6.enabled() {
            &["ip", "ip6"]
        } else {
            &["ip"]
        };
        let mut restored = false;
        let mut first_err = None;
        for family in families {
            match cmd::ip_netns_exec(router, NFT, &["delete", "table", family, CUT_TABLE]) {
                Ok(_) => restored = true,
                Err(err) => {
                    first_err.get_or_insert(err);
                }
            }
        }
        match first_err {
            Some(err) if !restored => Err(err),
            _ => Ok(()),
        }
    }

    fn edge_router(&self, side: Side) -> Result<&str> {
        self.routers(side)
            .first()
            .map(String::as_str)
            .ok_or_else(|| LabError::InvalidConfig(format!("side {side:?} has no router")))
    }

    /// Name of the internet router's namespace (where the WAN emulator runs).
    pub fn inet_netns(&self) -> &str {
        &self.inet
    }

    /// Every namespace of the lab, in creation order.
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces.names
    }

    /// The internet link `host` reaches the world through.
    pub fn link(&self, host: Host) -> Link {
        match host {
            Host::A => self.a.link,
            Host::B => self.b.link,
            Host::Rv => Link::Rv,
            Host::Probe => Link::Probe,
        }
    }

    /// Emulated one-way delay from `from` to `to` under the WAN shapes in force.
    pub fn one_way_delay(&self, from: Host, to: Host) -> Duration {
        self.wan().one_way(self.link(from), self.link(to))
    }

    /// Emulated round-trip time between `from` and `to`.
    pub fn rtt(&self, from: Host, to: Host) -> Duration {
        self.one_way_delay(from, to) * 2
    }

    /// A [`Command`] running `program` inside the namespace of `host`
    /// (`ip netns exec NS program`); add arguments, then spawn it. The program
    /// sees the lab's hosts file as `/etc/hosts`, so [`RV_NAME`] resolves to
    /// the rendezvous host. Processes still running when the lab is dropped
    /// are killed.
    pub fn command(&self, host: Host, program: impl AsRef<OsStr>) -> Command {
        cmd::netns_command(self.netns(host), program)
    }

    /// Runs `f` on a thread inside the namespace of `host` and returns its
    /// result; sockets it creates stay in that namespace.
    pub fn run_in<T, F>(&self, host: Host, f: F) -> Result<T>
    where
        T: Send,
        F: FnOnce() -> T + Send,
    {
        netns::run_in(self.netns(host), f)
    }

    /// Spawns a named thread inside the namespace of `host` running `f`.
    pub fn spawn_in<T, F>(&self, host: Host, name: &str, f: F) -> Result<JoinHandle<Result<T>>>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        netns::spawn_in(self.netns(host), name, f)
    }

    /// Changes the WAN link shapes while the lab runs.
    pub fn set_wan(&self, wan: WanConfig) -> Result<()> {
        match &self.delayer {
            Some(delayer) => delayer.set_config(wan),
            None => Err(LabError::Thread("WAN emulator is not running".into())),
        }
    }

    /// The WAN link shapes in force.
    pub fn wan(&self) -> WanConfig {
        self.delayer
            .as_ref()
            .map_or(self.config.wan, Delayer::config)
    }

    /// Packet counters of the WAN emulator.
    pub fn wan_stats(&self) -> DelayerStats {
        self.delayer
            .as_ref()
            .map(Delayer::stats)
            .unwrap_or_default()
    }

    /// Whether the WAN emulator is still running (if it died, forwarded
    /// packets are dropped by the kernel).
    pub fn wan_running(&self) -> bool {
        self.delayer.as_ref().is_some_and(Delayer::is_running)
    }

    /// Text for diagnosing a failed test: the NAT rulesets and conntrack
    /// tables of every router, and the emulator's counters.
    pub fn diagnostics(&self) -> String {
        let mut text = format!(
            "lab {} ({:?})\nWAN stats: {:?}\n",
            self.id,
            self.config.layout,
            self.wan_stats()
        );
        for side in [Side::A, Side::B] {
            for router in self.routers(side) {
                let rules = cmd::ip_netns_exec(router, NFT, &["list", "ruleset"]);
                let ct = cmd::ip_netns_exec(router, "conntrack", &["-L"]);
                let _ = writeln!(text, "--- {router} ruleset:\n{}", show(rules));
                let _ = writeln!(text, "--- {router} conntrack:\n{}", show(ct));
                if self.config.ipv6.enabled() {
                    // `conntrack -L` lists IPv4 only unless told otherwise.
                    let ct6 = cmd::ip_netns_exec(router, "conntrack", &["-L", "-f", "ipv6"]);
                    let _ = writeln!(text, "--- {router} conntrack (IPv6):\n{}", show(ct6));
                }
            }
        }
        text
    }

    /// A human-readable table of the lab's hosts (namespace, address, public
    /// address, IPv6 address in a lab with IPv6, kind), as `lab up` prints it.
    pub fn describe(&self) -> String {
        let mut text = String::new();
        let rows = [
            (Host::A, Some(Side::A)),
            (Host::B, Some(Side::B)),
            (Host::Rv, None),
            (Host::Probe, None),
        ];
        let ipv6 = self.config.ipv6.enabled();
        let header6 = if ipv6 {
            format!("{:<19} ", "ipv6")
        } else {
            String::new()
        };
        let _ = writeln!(
            text,
            "{:<6} {:<24} {:<15} {:<15} {header6}kind",
            "host", "netns", "address", "public"
        );
        for (host, side) in rows {
            let kind = side.map_or("public".to_owned(), |s| {
                let mut k = self.nat_kind(s).to_string();
                if self.same_lan() {
                    k.push_str(" (same LAN)");
                }
                k
            });
            let name = format!("{host:?}").to_lowercase();
            let (addr, public) = if self.has_ipv4(host) {
                (
                    self.addr(host).to_string(),
                    self.public_addr(host).to_string(),
                )
            } else {
                ("-".to_owned(), "-".to_owned())
            };
            let addr6 = match (ipv6, self.addr6(host)) {
                (false, _) => String::new(),
                (true, Some(addr6)) => format!("{:<19} ", addr6.to_string()),
                (true, None) => format!("{:<19} ", "-"),
            };
            let _ = writeln!(
                text,
                "{name:<6} {:<24} {addr:<15} {public:<15} {addr6}{kind}",
                self.netns(host),
            );
        }
        let _ = writeln!(
            text,
            "rendezvous name: {RV_NAME} (in /etc/hosts of programs run with ip netns exec)"
        );
        let _ = writeln!(text, "internet: {}", self.inet);
        for side in [Side::A, Side::B] {
            let routers = self.routers(side);
            if !routers.is_empty() {
                let _ = writeln!(text, "routers of {side:?}: {}", routers.join(", "));
            }
        }
        if let Some(p) = self.config.port_mapping {
            let [n0, n1, n2, _] = self.a.host.addr.octets();
            let lan = Ipv4Addr::new(n0, n1, n2, GATEWAY);
            let mut speaks = Vec::new();
            if p.nat_pmp || p.pcp {
                let which = match (p.nat_pmp, p.pcp) {
                    (true, true) => "NAT-PMP and PCP",
                    (true, false) => "NAT-PMP",
                    _ => "PCP",
                };
                speaks.push(format!("{which} on {lan}:{}", crate::portmap::PORT));
            }
            if p.upnp {
                speaks.push(format!(
                    "UPnP-IGD at http://{lan}:{}/rootDesc.xml",
                    crate::portmap::UPNP_HTTP_PORT
                ));
            }
            let _ = writeln!(text, "port mapping by A's router: {}", speaks.join(", "));
        }
        let wan = self.wan();
        let _ = writeln!(
            text,
            "one-way link delays: A {:?}, B {:?}, rv {:?}, probe {:?}",
            wan.a.delay, wan.b.delay, wan.rv.delay, wan.probe.delay
        );
        text
    }

    /// Tears the lab down now, reporting the first error (dropping does the
    /// same but can only log errors).
    pub fn shutdown(mut self) -> Result<()> {
        let portmap = self
            .portmap
            .take()
            .map_or(Ok(()), crate::portmap::Responder::stop);
        let delayer = self.delayer.take().map_or(Ok(()), Delayer::stop);
        let namespaces = self.namespaces.remove_all();
        portmap.and(delayer).and(namespaces)
    }
}

fn show(result: Result<String>) -> String {
    result.unwrap_or_else(|err| format!("({err})"))
}

/// The nftables family (and match keyword) of `addr`: `ip` or `ip6`.
fn nft_family(addr: IpAddr) -> &'static str {
    match addr {
        IpAddr::V4(_) => "ip",
        IpAddr::V6(_) => "ip6",
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // The emulator first: its thread lives in the internet namespace.
        if let Some(delayer) = self.delayer.take() {
            if let Err(err) = delayer.stop() {
                tracing::warn!(%err, "lab: WAN emulator ended with an error");
            }
        }
        // The responder before its router's namespace goes.
        drop(self.portmap.take());
        // Then `self.namespaces` drops and removes the namespaces.
        tracing::info!(id = %self.id, "lab: torn down");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_plan_mirrors_the_ipv4_one() {
        assert_eq!(iid(GATEWAY), 0x1);
        assert_eq!(iid(EDGE), 0x2);
        assert_eq!(iid(HOST), 0x10);
        assert_eq!(iid(SECOND_HOST), 0x11);
        assert_eq!(v6(RV_NET6, HOST), RV_ADDR6);
        assert_eq!(v6(PROBE_NET6, HOST), PROBE_ADDR6);
        assert_eq!(RV_ADDR6.to_string(), "2001:db8:0:10::10");
        assert_eq!(PROBE_ADDR6.to_string(), "2001:db8:0:18::10");
        assert_eq!(cidr6(PLAN_A.uplink6, EDGE), "2001:db8:a::2/64");
        assert_eq!(cidr6(PLAN_A.lan6, HOST), "2001:db8:a:1::10/64");
        assert_eq!(cidr6(PLAN_A.lan6, SECOND_HOST), "2001:db8:a:1::11/64");
        assert_eq!(subnet6(PLAN_A.carrier6), "2001:db8:a:64::/64");
        assert_eq!(cidr6(PLAN_B.lan6, HOST), "2001:db8:b:1::10/64");
        assert_eq!(subnet6(PLAN_B.uplink6), "2001:db8:b::/64");
    }

    #[test]
    fn ipv6_addresses_are_documentation_addresses() {
        let doc = |addr: Ipv6Addr| addr.segments()[..2] == [0x2001, 0xdb8];
        for plan in [&PLAN_A, &PLAN_B] {
            for net in [plan.uplink6, plan.lan6, plan.carrier6] {
                assert!(doc(v6(net, HOST)), "{net:x?}");
            }
        }
        assert!(doc(RV_ADDR6) && doc(PROBE_ADDR6));
    }

    #[test]
    fn ipv6_is_off_unless_asked_for() {
        let config = LabConfig::new(NatKind::Home, NatKind::Rst);
        assert_eq!(config.ipv6, Ipv6Mode::Off);
        assert!(!config.ipv6.enabled());
        assert_eq!(LabConfig::same_lan(NatKind::Home).ipv6, Ipv6Mode::Off);
        assert_eq!(config.with_ipv6().ipv6, Ipv6Mode::DualStack);
        assert_eq!(config.with_ipv6_only().ipv6, Ipv6Mode::Only);
        assert!(config.with_ipv6_only().ipv6.enabled());
        let kept = config.with_overlapping_lans().with_ipv6();
        assert!(kept.overlapping_lans);
    }

    #[test]
    fn hosts_file_names_the_rendezvous() {
        let v4_only = hosts_file(RV_ADDR, None);
        assert!(v4_only.contains("127.0.0.1\tlocalhost\n"), "{v4_only}");
        assert!(
            v4_only.contains("203.0.113.10\trendezvous.lab\n"),
            "{v4_only}"
        );
        assert!(!v4_only.contains("2001:db8"), "{v4_only}");
        let dual = hosts_file(RV_ADDR, Some(RV_ADDR6));
        assert!(dual.contains("203.0.113.10\trendezvous.lab\n"), "{dual}");
        assert!(
            dual.contains("2001:db8:0:10::10\trendezvous.lab\n"),
            "{dual}"
        );
    }

    #[test]
    fn nft_family_follows_the_address() {
        assert_eq!(nft_family(IpAddr::V4(RV_ADDR)), "ip");
        assert_eq!(nft_family(IpAddr::V6(RV_ADDR6)), "ip6");
    }
}
