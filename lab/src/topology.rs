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
//! Every interface is created directly inside its namespace (`ip link add ...
//! netns X type veth peer ... netns Y`), so nothing ever appears in the root
//! namespace and interface names can be fixed: hosts have `eth0`, routers `wan`
//! and `lan`, the internet router `side-a`, `side-b`, `side-rv`, `side-probe`.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::process::Command;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::cmd::{self, NFT};

/// The nftables table of [`Lab::cut_path`].
const CUT_TABLE: &str = "cut";
use crate::error::{LabError, Result};
use crate::names;
use crate::nat::{NatKind, RouterRules, WAN_IF};
use crate::netns;
use crate::wan::{Delayer, DelayerStats, Link, WanConfig};

/// Address of the rendezvous host.
pub const RV_ADDR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// Address of the probe host, a second public host for tests.
pub const PROBE_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);

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

/// What to build.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LabConfig {
    /// Placement and NAT kinds of the sides.
    pub layout: Layout,
    /// Link shapes of the emulated WAN.
    pub wan: WanConfig,
    /// Give B's NAT LAN the same private range as A's (both hosts 10.0.1.10),
    /// as two home networks often have.
    pub overlapping_lans: bool,
}

impl LabConfig {
    /// Separate sides of kinds `a` and `b`, no delay.
    pub fn new(a: NatKind, b: NatKind) -> LabConfig {
        LabConfig {
            layout: Layout::Separate { a, b },
            wan: WanConfig::default(),
            overlapping_lans: false,
        }
    }

    /// Both hosts behind one edge of kind `kind`, no delay.
    pub fn same_lan(kind: NatKind) -> LabConfig {
        LabConfig {
            layout: Layout::SameLan(kind),
            wan: WanConfig::default(),
            overlapping_lans: false,
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

    /// Checks that the config can be built.
    pub fn validate(&self) -> Result<()> {
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

/// A host's namespace and address.
#[derive(Debug, Clone)]
struct HostInfo {
    netns: String,
    addr: Ipv4Addr,
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
    /// Interface name of this side's link in the internet namespace.
    inet_if: &'static str,
    link: Link,
}

const PLAN_A: SidePlan = SidePlan {
    uplink: [192, 0, 2],
    lan: [10, 0, 1],
    carrier: [100, 64, 1],
    firewall_lan: [198, 18, 1],
    inet_if: "side-a",
    link: Link::A,
};

const PLAN_B: SidePlan = SidePlan {
    uplink: [198, 51, 100],
    lan: [10, 0, 2],
    carrier: [100, 64, 2],
    firewall_lan: [198, 18, 2],
    inet_if: "side-b",
    link: Link::B,
};

const RV_NET: [u8; 3] = [203, 0, 113];
const PROBE_NET: [u8; 3] = [198, 18, 0];
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
    namespaces: Namespaces,
}

/// Builder state while the namespaces are being made.
struct Builder {
    id: String,
    namespaces: Namespaces,
    inet: String,
}

impl Builder {
    fn ns(&self, role: &str) -> String {
        format!("{}-{role}", self.id)
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
        cmd::ip_in(ns, &["link", "set", "dev", dev, "up"])?;
        Ok(())
    }

    fn route(&self, ns: &str, dest: &str, via: Ipv4Addr) -> Result<()> {
        cmd::ip_in(ns, &["route", "add", dest, "via", &via.to_string()]).map(drop)
    }

    fn forwarding(&self, ns: &str) -> Result<()> {
        // /proc/sys/net is resolved against the namespace of the calling
        // thread, so a thread inside `ns` sets that namespace's switch.
        netns::run_in(ns, || {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(|source| LabError::Spawn {
                command: format!("write ip_forward in {ns}"),
                source,
            })
        })?
    }

    fn rules(&self, ns: &str, rules: &RouterRules) -> Result<()> {
        cmd::ip_netns_exec_with_stdin(ns, NFT, &["-f", "-"], Some(&rules.ruleset())).map(drop)
    }

    /// A public host on its own internet link.
    fn public_host(
        &mut self,
        role: &str,
        inet_if: &str,
        net: [u8; 3],
        host: u8,
    ) -> Result<HostInfo> {
        let ns = self.namespaces.create(self.ns(role))?;
        self.veth(&self.inet, inet_if, &ns, HOST_IF)?;
        self.addr_up(&self.inet, inet_if, &cidr(net, GATEWAY))?;
        self.addr_up(&ns, HOST_IF, &cidr(net, host))?;
        self.route(&ns, "default", v4(net, GATEWAY))?;
        Ok(HostInfo {
            netns: ns,
            addr: v4(net, host),
        })
    }

    /// A router whose WAN is `up_net`.EDGE behind `up_if` of `up_ns`.
    fn router(
        &mut self,
        role: &str,
        up_ns: &str,
        up_if: &str,
        up_net: [u8; 3],
        rules: &RouterRules,
    ) -> Result<String> {
        let ns = self.namespaces.create(self.ns(role))?;
        self.veth(up_ns, up_if, &ns, WAN_IF)?;
        self.addr_up(up_ns, up_if, &cidr(up_net, GATEWAY))?;
        self.addr_up(&ns, WAN_IF, &cidr(up_net, EDGE))?;
        self.route(&ns, "default", v4(up_net, GATEWAY))?;
        self.forwarding(&ns)?;
        self.rules(&ns, rules)?;
        Ok(ns)
    }

    /// The LAN of router `router`: one host on a veth, or several on a bridge.
    /// `hosts` are (role, host octet); returns their infos in order.
    fn lan(&mut self, router: &str, net: [u8; 3], hosts: &[(&str, u8)]) -> Result<Vec<HostInfo>> {
        let mut infos = Vec::new();
        if let [(role, octet)] = hosts {
            let ns = self.namespaces.create(self.ns(role))?;
            self.veth(router, LAN_IF, &ns, HOST_IF)?;
            self.addr_up(router, LAN_IF, &cidr(net, GATEWAY))?;
            infos.push(self.lan_host(ns, net, *octet)?);
        } else {
            cmd::ip_in(router, &["link", "add", "name", LAN_IF, "type", "bridge"])?;
            self.addr_up(router, LAN_IF, &cidr(net, GATEWAY))?;
            for (i, (role, octet)) in hosts.iter().enumerate() {
                let ns = self.namespaces.create(self.ns(role))?;
                let port = format!("port{i}");
                self.veth(router, &port, &ns, HOST_IF)?;
                cmd::ip_in(router, &["link", "set", "dev", &port, "master", LAN_IF])?;
                cmd::ip_in(router, &["link", "set", "dev", &port, "up"])?;
                infos.push(self.lan_host(ns, net, *octet)?);
            }
        }
        Ok(infos)
    }

    fn lan_host(&self, ns: String, net: [u8; 3], octet: u8) -> Result<HostInfo> {
        self.addr_up(&ns, HOST_IF, &cidr(net, octet))?;
        self.route(&ns, "default", v4(net, GATEWAY))?;
        Ok(HostInfo {
            netns: ns,
            addr: v4(net, octet),
        })
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
        let inet = self.inet.clone();
        let (lan_hosts, routers) = match kind {
            NatKind::Public => {
                let host = self.public_host(side_role, plan.inet_if, plan.uplink, EDGE)?;
                (vec![host], Vec::new())
            }
            NatKind::Firewall => {
                let rules = RouterRules::for_kind(kind).expect("firewall has a router");
                let router = self.router(
                    &format!("{side_role}-fw"),
                    &inet,
                    plan.inet_if,
                    plan.uplink,
                    &rules,
                )?;
                self.route(&inet, &subnet(plan.firewall_lan), public_edge)?;
                let hosts = self.lan(&router, plan.firewall_lan, hosts)?;
                (hosts, vec![router])
            }
            NatKind::Cgnat => {
                let carrier = self.router(
                    &format!("{side_role}-cgn"),
                    &inet,
                    plan.inet_if,
                    plan.uplink,
                    &RouterRules::carrier(),
                )?;
                let rules = RouterRules::for_kind(kind).expect("cgnat has a home router");
                let home = self.router(
                    &format!("{side_role}-nat"),
                    &carrier,
                    LAN_IF,
                    plan.carrier,
                    &rules,
                )?;
                let hosts = self.lan(&home, lan_net, hosts)?;
                (hosts, vec![home, carrier])
            }
            NatKind::Home | NatKind::Rst | NatKind::Range | NatKind::Symmetric => {
                let rules = RouterRules::for_kind(kind).expect("NAT kinds have a router");
                let router = self.router(
                    &format!("{side_role}-nat"),
                    &inet,
                    plan.inet_if,
                    plan.uplink,
                    &rules,
                )?;
                let hosts = self.lan(&router, lan_net, hosts)?;
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
        let mut namespaces = Namespaces { names: Vec::new() };
        let inet = namespaces.create(format!("{id}-inet"))?;
        let mut b = Builder {
            id: id.clone(),
            namespaces,
            inet: inet.clone(),
        };
        b.forwarding(&inet)?;
        let rv = b.public_host("rv", RV_IF, RV_NET, HOST)?;
        let probe = b.public_host("probe", PROBE_IF, PROBE_NET, HOST)?;
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
        let mut interfaces = vec![
            (PLAN_A.inet_if, Link::A),
            (RV_IF, Link::Rv),
            (PROBE_IF, Link::Probe),
        ];
        if matches!(config.layout, Layout::Separate { .. }) {
            interfaces.push((PLAN_B.inet_if, Link::B));
        }
        let delayer = Delayer::start(&inet, &interfaces, config.wan)?;
        let lab = Lab {
            id,
            config: *config,
            inet,
            a,
            b: side_b,
            rv,
            probe,
            delayer: Some(delayer),
            namespaces: Namespaces {
                names: std::mem::take(&mut b.namespaces.names),
            },
        };
        tracing::info!(id = %lab.id, layout = ?config.layout, "lab: built");
        Ok(lab)
    }

    /// The lab's id (`pl-PID-N`), the prefix of all its namespace names.
    pub fn id(&self) -> &str {
        &self.id
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

    /// Address of `host` on its own interface (private for a host behind NAT).
    pub fn addr(&self, host: Host) -> Ipv4Addr {
        self.host(host).addr
    }

    /// The address the internet sees for `host`: the outermost NAT's public
    /// address for a host behind NAT, the host's own address otherwise.
    pub fn public_addr(&self, host: Host) -> Ipv4Addr {
        match host {
            Host::A => self.a.public,
            Host::B => self.b.public,
            Host::Rv | Host::Probe => self.host(host).addr,
        }
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
    /// side) in the router of `side` nearest the host: every packet either way is
    /// answered with a reset, so a connection between them breaks at once and new
    /// ones are refused, until [`Lab::restore_path`].
    pub fn cut_path(&self, side: Side, peer: Ipv4Addr) -> Result<()> {
        let ruleset = format!(
            "table ip {CUT_TABLE} {{\n  chain forward {{\n    type filter hook forward priority -10; policy accept;\n    \
             meta l4proto tcp ip daddr {peer} reject with tcp reset\n    \
             meta l4proto tcp ip saddr {peer} reject with tcp reset\n  }}\n}}\n"
        );
        cmd::ip_netns_exec_with_stdin(self.edge_router(side)?, NFT, &["-f", "-"], Some(&ruleset))
            .map(drop)
    }

    /// Undoes [`Lab::cut_path`].
    pub fn restore_path(&self, side: Side) -> Result<()> {
        cmd::ip_netns_exec(
            self.edge_router(side)?,
            NFT,
            &["delete", "table", "ip", CUT_TABLE],
        )
        .map(drop)
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
    /// (`ip netns exec NS program`); add arguments, then spawn it. Processes
    /// still running when the lab is dropped are killed.
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
            }
        }
        text
    }

    /// A human-readable table of the lab's hosts (namespace, address, public
    /// address, kind), as `lab up` prints it.
    pub fn describe(&self) -> String {
        let mut text = String::new();
        let rows = [
            (Host::A, Some(Side::A)),
            (Host::B, Some(Side::B)),
            (Host::Rv, None),
            (Host::Probe, None),
        ];
        let _ = writeln!(
            text,
            "{:<6} {:<24} {:<15} {:<15} kind",
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
            let _ = writeln!(
                text,
                "{name:<6} {:<24} {:<15} {:<15} {kind}",
                self.netns(host),
                self.addr(host).to_string(),
                self.public_addr(host).to_string()
            );
        }
        let _ = writeln!(text, "internet: {}", self.inet);
        for side in [Side::A, Side::B] {
            let routers = self.routers(side);
            if !routers.is_empty() {
                let _ = writeln!(text, "routers of {side:?}: {}", routers.join(", "));
            }
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
        let delayer = self.delayer.take().map_or(Ok(()), Delayer::stop);
        let namespaces = self.namespaces.remove_all();
        delayer.and(namespaces)
    }
}

fn show(result: Result<String>) -> String {
    result.unwrap_or_else(|err| format!("({err})"))
}

impl Drop for Lab {
    fn drop(&mut self) {
        // The emulator first: its thread lives in the internet namespace.
        if let Some(delayer) = self.delayer.take() {
            if let Err(err) = delayer.stop() {
                tracing::warn!(%err, "lab: WAN emulator ended with an error");
            }
        }
        // Then `self.namespaces` drops and removes the namespaces.
        tracing::info!(id = %self.id, "lab: torn down");
    }
}
