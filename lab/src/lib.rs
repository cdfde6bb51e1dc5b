//! The punchline NAT lab: real kernel NAT topologies built from Linux network
//! namespaces, veth links and nftables, with an emulated WAN (per-link delay and
//! loss through NFQUEUE), for tests and benchmarks that need what only a real
//! network shows.
//!
//! A scenario starts the rendezvous server in [`Host::Rv`] and the two peers in
//! [`Host::A`] and [`Host::B`]:
//!
//! ```no_run
//! use punchline_lab::{Host, Lab, LabConfig, NatKind, WanConfig};
//!
//! # fn main() -> Result<(), punchline_lab::LabError> {
//! let lab = Lab::build(
//!     &LabConfig::new(NatKind::Home, NatKind::Rst).with_wan(WanConfig::delays_ms(5, 40, 20)),
//! )?;
//! let rv = format!("{}:7000", lab.addr(Host::Rv));
//! let mut server = lab.command(Host::Rv, "target/debug/rendezvous").spawn();
//! let mut peer_a = lab.command(Host::A, "target/debug/peer").arg(&rv).spawn();
//! // ... when `lab` is dropped, every process still in its namespaces is killed
//! // and the namespaces are deleted.
//! # Ok(()) }
//! ```
//!
//! A lab can carry IPv6 next to IPv4 ([`LabConfig::with_ipv6`]) or give the
//! peers IPv6 only ([`LabConfig::with_ipv6_only`]); IPv6 is routed, never
//! translated, behind each side's stateful firewall.
//!
//! Modules: [`topology`] builds and tears down a lab, [`nat`] owns the NAT
//! kinds and their rulesets, [`wan`] the delay emulator, [`netns`] namespace
//! plumbing, [`cmd`] running the tools, [`names`] unique naming, [`prereq`] the
//! checks tests use to skip, [`scenario`] the rendezvous and two peers meeting in
//! a lab, [`bench`](mod@bench) the punch benchmark, [`rawpunch`] the raw punch baseline.

pub mod bench;
pub mod cmd;
mod error;
pub mod names;
pub mod nat;
pub mod netns;
pub mod portmap;
pub mod prereq;
pub mod rawpunch;
pub mod resilience;
pub mod scenario;
pub mod topology;
pub mod wan;

pub use error::{LabError, Result};
pub use nat::NatKind;
pub use topology::{
    Host, Ipv6Mode, Lab, LabConfig, Layout, Side, PROBE_ADDR, PROBE_ADDR6, RV_ADDR, RV_ADDR6,
    RV_NAME,
};
pub use wan::{DelayerStats, Detour, Link, LinkShape, WanConfig};
