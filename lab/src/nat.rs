//! The kinds of NAT (and non-NAT) edges a side of the lab can have, and the
//! nftables rulesets that make a router namespace behave like each of them.
//!
//! All behaviour comes from the real kernel: conntrack and nf_nat decide the
//! mappings. What each ruleset relies on:
//!
//! - plain `masquerade` keeps the source port when it is free (port preserving)
//!   and, while a mapping for a source address and port exists, reuses it for new
//!   destinations (endpoint-independent mapping);
//! - `masquerade to :LO-HI` keeps that reuse but picks the first port from the
//!   range, so the public port differs from the private one;
//! - `masquerade random` skips the reuse: every new destination gets its own
//!   random port (destination-dependent, "symmetric");
//! - `ct state new drop` on the WAN side drops unsolicited inbound silently; the
//!   SYN of a simultaneous open passes because conntrack sees it as the reply
//!   direction of the entry the router's own outgoing SYN created;
//! - without that rule, a stray SYN to the router's public address reaches the
//!   router's own TCP stack, which answers RST.
//!
//! IPv6 (in a lab built with it, see [`crate::topology::Ipv6Mode`]) is never
//! translated: every host has its own global address. What a router does with
//! it is an [`Ipv6Filter`], kept in a table of its own (family `ip6`) so the
//! IPv4 rules above stay exactly as they are: a side's router either forwards
//! everything ([`Ipv6Filter::Open`]) or is a stateful firewall dropping
//! unsolicited inbound ([`Ipv6Filter::Stateful`]), like the IPv6 firewall of a
//! home router. Neighbour discovery is not affected: conntrack leaves those
//! ICMPv6 messages untracked, so they are never `ct state new`.

use std::fmt;
use std::str::FromStr;

/// Name of the nftables table the lab installs in a router namespace. The chain
/// names avoid `fwd`, which nftables parses as a keyword.
pub const TABLE: &str = "punchline";

/// Interface name of a router's upstream (towards the internet) link.
pub const WAN_IF: &str = "wan";

/// First port of the `range` kind's masquerade range.
pub const RANGE_FIRST_PORT: u16 = 20000;
/// Last port of the `range` kind's masquerade range.
pub const RANGE_LAST_PORT: u16 = 20999;

/// What stands between a side's host and the internet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NatKind {
    /// Typical home router: port-preserving, endpoint-independent `masquerade`,
    /// unsolicited inbound dropped (`ct state new drop` on the WAN side).
    Home,
    /// `masquerade` with no filter: the router's own stack answers a stray SYN
    /// with RST (against RFC 5382 REQ-4, but common).
    Rst,
    /// `masquerade` to a port range: endpoint-independent mapping, but not port
    /// preserving; unsolicited inbound dropped like [`NatKind::Home`].
    Range,
    /// `masquerade random`: destination-dependent ("symmetric") mapping, so a
    /// punch goes out with a port the rendezvous never saw; inbound dropped.
    Symmetric,
    /// No NAT and no filter: the host has a public address on the internet.
    Public,
    /// No NAT, but a stateful firewall router dropping unsolicited inbound; the
    /// host has a public address behind it.
    Firewall,
    /// Carrier-grade NAT: a [`NatKind::Home`] router behind a carrier's
    /// masquerading router (shared address space 100.64.0.0/10 between them).
    Cgnat,
}

impl NatKind {
    /// Every kind, in a stable order.
    pub const ALL: [NatKind; 7] = [
        NatKind::Home,
        NatKind::Rst,
        NatKind::Range,
        NatKind::Symmetric,
        NatKind::Public,
        NatKind::Firewall,
        NatKind::Cgnat,
    ];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            NatKind::Home => "home",
            NatKind::Rst => "rst",
            NatKind::Range => "range",
            NatKind::Symmetric => "symmetric",
            NatKind::Public => "public",
            NatKind::Firewall => "firewall",
            NatKind::Cgnat => "cgnat",
        }
    }

    /// Whether the host's address is translated on the way out.
    pub fn translates(self) -> bool {
        !matches!(self, NatKind::Public | NatKind::Firewall)
    }

    /// Whether the host sits on a LAN behind a router (everything but
    /// [`NatKind::Public`]); only such kinds can host a second peer on that LAN.
    pub fn has_lan(self) -> bool {
        self != NatKind::Public
    }

    /// Whether a punch through this edge can be expected to succeed when the
    /// other side cooperates: false only for destination-dependent mapping.
    pub fn punchable(self) -> bool {
        self != NatKind::Symmetric
    }
}

impl fmt::Display for NatKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Error for a NAT kind name that is not one of [`NatKind::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown NAT kind {0:?} (expected one of home, rst, range, symmetric, public, firewall, cgnat)"
)]
pub struct UnknownNatKind(pub String);

impl FromStr for NatKind {
    type Err = UnknownNatKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NatKind::ALL
            .into_iter()
            .find(|kind| kind.name() == s)
            .ok_or_else(|| UnknownNatKind(s.to_owned()))
    }
}

/// How one router namespace translates and filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouterRules {
    /// Masquerade mode on the WAN interface, or `None` for no translation.
    pub masquerade: Option<Masquerade>,
    /// Drop unsolicited inbound (`ct state new`) arriving on the WAN interface.
    pub drop_unsolicited: bool,
}

/// The masquerade variants the lab uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Masquerade {
    /// `masquerade`: port preserving, endpoint-independent.
    Preserving,
    /// `masquerade to :LO-HI`: endpoint-independent, ports from the range.
    PortRange(u16, u16),
    /// `masquerade random`: a random port per destination.
    Random,
}

impl RouterRules {
    /// Rules of the router directly in front of a host of `kind` (for
    /// [`NatKind::Cgnat`], the home router; see [`RouterRules::carrier`]).
    /// `None` for [`NatKind::Public`], which has no router.
    pub fn for_kind(kind: NatKind) -> Option<RouterRules> {
        let (masquerade, drop_unsolicited) = match kind {
            NatKind::Public => return None,
            NatKind::Home | NatKind::Cgnat => (Some(Masquerade::Preserving), true),
            NatKind::Rst => (Some(Masquerade::Preserving), false),
            NatKind::Range => (
                Some(Masquerade::PortRange(RANGE_FIRST_PORT, RANGE_LAST_PORT)),
                true,
            ),
            NatKind::Symmetric => (Some(Masquerade::Random), true),
            NatKind::Firewall => (None, true),
        };
        Some(RouterRules {
            masquerade,
            drop_unsolicited,
        })
    }

    /// Rules of the carrier router of a [`NatKind::Cgnat`] side: another
    /// port-preserving masquerade that drops unsolicited inbound.
    pub fn carrier() -> RouterRules {
        RouterRules {
            masquerade: Some(Masquerade::Preserving),
            drop_unsolicited: true,
        }
    }

    /// The nftables ruleset text (for `nft -f -`).
    pub fn ruleset(&self) -> String {
        let mut text = format!("table ip {TABLE} {{\n");
        if let Some(masquerade) = self.masquerade {
            let statement = match masquerade {
                Masquerade::Preserving => "masquerade".to_owned(),
                // A port range needs a protocol with ports; other traffic
                // (ICMP) falls through to the plain masquerade below it.
                Masquerade::PortRange(lo, hi) => format!(
                    "meta l4proto {{ tcp, udp }} masquerade to :{lo}-{hi}\n        oifname \"{WAN_IF}\" masquerade"
                ),
                Masquerade::Random => "masquerade random".to_owned(),
            };
            // An empty prerouting NAT chain makes the reply-direction (de-NAT)
            // hook explicit; the translation itself is done by conntrack.
            text.push_str(
                "    chain prerouting {\n        type nat hook prerouting priority dstnat; policy accept;\n    }\n",
            );
            text.push_str(&format!(
                "    chain postrouting {{\n        type nat hook postrouting priority srcnat; policy accept;\n        oifname \"{WAN_IF}\" {statement}\n    }}\n"
            ));
        }
        if self.drop_unsolicited {
            for (chain, hook) in [("forward_filter", "forward"), ("input_filter", "input")] {
                // A connection the router forwards in on purpose (a port
                // mapping it granted, see `crate::portmap`) is solicited.
                let mapped = if hook == "forward" {
                    format!("        iifname \"{WAN_IF}\" ct status dnat accept\n")
                } else {
                    String::new()
                };
                text.push_str(&format!(
                    "    chain {chain} {{\n        type filter hook {hook} priority filter; policy accept;\n{mapped}        iifname \"{WAN_IF}\" ct state new drop\n    }}\n"
                ));
            }
        }
        text.push_str("}\n");
        text
    }
}

/// What a router does with IPv6 traffic, which the lab never translates (no
/// NAT66): the router of a side either forwards it untouched or filters it like
/// the IPv6 firewall of a home router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ipv6Filter {
    /// Forward everything, no filter: a carrier's router, or no router at all.
    Open,
    /// Stateful firewall: unsolicited inbound (`ct state new` arriving on the
    /// WAN interface) is dropped silently, both forwarded to the LAN and to the
    /// router itself; replies, and the crossing SYN of a simultaneous open (the
    /// reply direction of the entry the host's own SYN created), pass.
    Stateful,
}

impl Ipv6Filter {
    /// The IPv6 policy of the router nearest the host of a side of `kind`:
    /// [`Ipv6Filter::Open`] for [`NatKind::Public`] (which has no router; its
    /// host is reachable as over IPv4), [`Ipv6Filter::Stateful`] for every other
    /// kind. For [`NatKind::Cgnat`] this is the home router's policy; the
    /// carrier router only forwards ([`Ipv6Filter::carrier`]).
    ///
    /// [`NatKind::Rst`] drops as well: its reset is the IPv4 NAT's own stack
    /// answering a SYN for the public address it shares with the hosts behind
    /// it. Over IPv6 the SYN is addressed to the host itself, and a home
    /// router's IPv6 firewall drops it.
    pub fn for_kind(kind: NatKind) -> Ipv6Filter {
        match kind {
            NatKind::Public => Ipv6Filter::Open,
            NatKind::Home
            | NatKind::Rst
            | NatKind::Range
            | NatKind::Symmetric
            | NatKind::Firewall
            | NatKind::Cgnat => Ipv6Filter::Stateful,
        }
    }

    /// The IPv6 policy of a [`NatKind::Cgnat`] side's carrier router: it only
    /// forwards; the home router behind it filters.
    pub fn carrier() -> Ipv6Filter {
        Ipv6Filter::Open
    }

    /// The nftables ruleset text (for `nft -f -`): a table [`TABLE`] of family
    /// `ip6`, or `None` when nothing needs to be installed.
    pub fn ruleset(self) -> Option<String> {
        match self {
            Ipv6Filter::Open => None,
            Ipv6Filter::Stateful => {
                let mut text = format!("table ip6 {TABLE} {{\n");
                for (chain, hook) in [("forward_filter", "forward"), ("input_filter", "input")] {
                    text.push_str(&format!(
                        "    chain {chain} {{\n        type filter hook {hook} priority filter; policy accept;\n        iifname \"{WAN_IF}\" ct state new drop\n    }}\n"
                    ));
                }
                text.push_str("}\n");
                Some(text)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for kind in NatKind::ALL {
            assert_eq!(kind.name().parse::<NatKind>(), Ok(kind));
        }
        assert!("fullcone".parse::<NatKind>().is_err());
    }

    #[test]
    fn home_ruleset_masquerades_and_drops() {
        let text = RouterRules::for_kind(NatKind::Home)
            .expect("home has a router")
            .ruleset();
        assert!(text.contains("oifname \"wan\" masquerade\n"), "{text}");
        assert!(text.contains("ct state new drop"), "{text}");
        assert!(!text.contains("chain fwd"), "{text}");
    }

    #[test]
    fn rst_has_no_filter_and_firewall_no_nat() {
        let rst = RouterRules::for_kind(NatKind::Rst)
            .expect("router")
            .ruleset();
        assert!(!rst.contains("drop"), "{rst}");
        let fw = RouterRules::for_kind(NatKind::Firewall)
            .expect("router")
            .ruleset();
        assert!(!fw.contains("masquerade"), "{fw}");
        assert!(fw.contains("ct state new drop"), "{fw}");
        assert!(RouterRules::for_kind(NatKind::Public).is_none());
    }

    #[test]
    fn range_and_symmetric_statements() {
        let range = RouterRules::for_kind(NatKind::Range)
            .expect("router")
            .ruleset();
        assert!(range.contains("masquerade to :20000-20999"), "{range}");
        let sym = RouterRules::for_kind(NatKind::Symmetric)
            .expect("router")
            .ruleset();
        assert!(sym.contains("masquerade random"), "{sym}");
    }

    #[test]
    fn ipv6_is_filtered_by_every_router_kind_but_never_translated() {
        for kind in NatKind::ALL {
            let filter = Ipv6Filter::for_kind(kind);
            let expected = if kind == NatKind::Public {
                Ipv6Filter::Open
            } else {
                Ipv6Filter::Stateful
            };
            assert_eq!(filter, expected, "{kind}");
            if let Some(text) = filter.ruleset() {
                assert!(text.starts_with("table ip6 punchline {\n"), "{text}");
                assert!(!text.contains("masquerade"), "{kind}: {text}");
                assert!(!text.contains("type nat"), "{kind}: {text}");
                assert!(!text.contains("chain fwd"), "{text}");
            }
        }
        assert_eq!(Ipv6Filter::carrier(), Ipv6Filter::Open);
        assert_eq!(Ipv6Filter::Open.ruleset(), None);
    }

    #[test]
    fn ipv6_firewall_drops_new_inbound_on_the_wan_only() {
        let text = Ipv6Filter::Stateful
            .ruleset()
            .expect("a stateful filter has rules");
        let expected = "table ip6 punchline {
    chain forward_filter {
        type filter hook forward priority filter; policy accept;
        iifname \"wan\" ct state new drop
    }
    chain input_filter {
        type filter hook input priority filter; policy accept;
        iifname \"wan\" ct state new drop
    }
}
";
        assert_eq!(text, expected);
    }

    #[test]
    fn ipv4_rulesets_stay_in_the_ip_family() {
        for kind in NatKind::ALL {
            if let Some(rules) = RouterRules::for_kind(kind) {
                let text = rules.ruleset();
                assert!(text.starts_with("table ip punchline {\n"), "{kind}: {text}");
                assert!(!text.contains("ip6"), "{kind}: {text}");
            }
        }
    }
}
