//! Port mapping: asking the router, with PCP (RFC 6887) or NAT-PMP (RFC 6886),
//! to forward our fixed port, so that the other side can reach it from
//! anywhere whatever the router's NAT does.
//!
//! A mapping is endpoint independent both ways: SYNs from the mapped port
//! leave from the mapped address too. Behind a symmetric NAT that is the
//! difference between no direct link and one: the mapped address goes to the
//! other side as a candidate (sealed, like the LAN addresses), and our punch
//! SYNs come from it.
//!
//! One mapping per meeting (a later link after a drop punches from a fresh
//! port): asked for as soon as the rendezvous connection has fixed the port,
//! beside the meeting, never waited for (at the go, the mapping is used if it
//! is there); short leases ([`LEASE`]) renewed while the meeting lasts, and
//! deleted when it ends: a punched connection keeps its translation in the
//! router without it. Deleted on Ctrl-C too ([`release_all`]); a process
//! killed otherwise leaves it to expire with its lease.
//!
//! The gateway is the IPv4 default route's (`/proc/net/route`). `crab_nat` speaks
//! both protocols (PCP first, NAT-PMP when the router answers that it does not
//! speak PCP). UPnP-IGD is not asked.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU16;
use std::sync::Mutex;
use std::time::Duration;

use crab_nat::{InternetProtocol, PortMapping, PortMappingOptions, PortMappingType, TimeoutConfig};
use tokio::sync::{oneshot, watch};

/// Lifetime asked for a mapping: short, so that one left behind by a killed
/// process soon goes; renewed at half of it while the meeting lasts.
pub const LEASE: Duration = Duration::from_secs(120);

/// How long asking may take in all: a router that does not answer by then
/// does not map (a PCP client would otherwise wait 3 s and more per try).
pub const ASK_TIMEOUT: Duration = Duration::from_millis(1500);

/// The timing of requests to the router: first answer within 250 ms (the
/// router is one hop away), then 500 ms, 1 s.
const TIMING: TimeoutConfig = TimeoutConfig {
    initial_timeout: Duration::from_millis(250),
    max_retries: 2,
    max_retry_timeout: Some(Duration::from_secs(1)),
};

/// The UDP port of PCP and NAT-PMP servers.
const GATEWAY_PORT: u16 = 5351;

/// Bound on deleting a mapping.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(1);

/// Which protocol the router answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Port Control Protocol.
    Pcp,
    /// NAT Port Mapping Protocol.
    NatPmp,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Pcp => "PCP",
            Protocol::NatPmp => "NAT-PMP",
        })
    }
}

/// A mapping the router granted.
#[derive(Debug, Clone)]
pub struct Lease {
    mapping: PortMapping,
    /// The router's external address and the external port.
    pub external: SocketAddr,
    /// The protocol that granted it.
    pub protocol: Protocol,
}

/// The IPv4 default gateway, from the kernel's routing table.
pub fn default_gateway() -> Option<Ipv4Addr> {
    let table = std::fs::read_to_string("/proc/net/route").ok()?;
    parse_default_gateway(&table)
}

/// The gateway of the default route in `/proc/net/route`'s text (addresses in
/// hexadecimal, in the host's byte order: little endian here).
fn parse_default_gateway(table: &str) -> Option<Ipv4Addr> {
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (destination, gateway) = (fields.get(1)?, fields.get(2)?);
        if *destination != "00000000" {
            return None;
        }
        let raw = u32::from_str_radix(gateway, 16).ok()?;
        let ip = Ipv4Addr::from(raw.swap_bytes());
        (!ip.is_unspecified()).then_some(ip)
    })
}

/// Our address towards `gateway` (the one it sees our requests come from).
fn local_towards(gateway: Ipv4Addr) -> Option<Ipv4Addr> {
    let socket = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    socket.connect((gateway, GATEWAY_PORT)).ok()?;
    match socket.local_addr().ok()?.ip() {
        IpAddr::V4(ip) => Some(ip),
        IpAddr::V6(_) => None,
    }
}

/// Asks the default gateway to map TCP `port` (the same external port if it
/// can) for [`LEASE`]; `None` if there is no gateway, it does not answer
/// within [`ASK_TIMEOUT`], or it refuses.
pub async fn request(port: u16) -> Option<Lease> {
    let gateway = default_gateway()?;
    let ask = async {
        let client = local_towards(gateway)?;
        let internal = NonZeroU16::new(port)?;
        let mapping = PortMapping::new(
            IpAddr::V4(gateway),
            IpAddr::V4(client),
            InternetProtocol::Tcp,
            internal,
            PortMappingOptions {
                external_port: Some(internal),
                lifetime_seconds: u32::try_from(LEASE.as_secs()).ok(),
                timeout_config: Some(TIMING),
            },
        )
        .await
        .map_err(|e| tracing::debug!(%gateway, error = ?e, "no port mapping"))
        .ok()?;
        let (ip, protocol) = match mapping.mapping_type() {
            PortMappingType::Pcp { external_ip, .. } => (external_ip, Protocol::Pcp),
            PortMappingType::NatPmp => {
                let ip = crab_nat::natpmp::external_address(IpAddr::V4(gateway), Some(TIMING))
                    .await
                    .map_err(|e| tracing::debug!(error = ?e, "no external address"))
                    .ok()?;
                (IpAddr::V4(ip), Protocol::NatPmp)
            }
        };
        let external = SocketAddr::new(ip.to_canonical(), mapping.external_port().get());
        Some(Lease {
            mapping,
            external,
            protocol,
        })
    };
    let lease = tokio::time::timeout(ASK_TIMEOUT, ask)
        .await
        .ok()
        .flatten()?;
    tracing::info!(external = %lease.external, protocol = %lease.protocol, "port mapped");
    Some(lease)
}

impl Lease {
    /// Deletes the mapping on the router (within [`RELEASE_TIMEOUT`]).
    pub async fn release(self) {
        let external = self.external;
        match tokio::time::timeout(RELEASE_TIMEOUT, self.mapping.try_drop()).await {
            Ok(Ok(())) => tracing::debug!(%external, "port mapping deleted"),
            Ok(Err((e, _))) => tracing::debug!(%external, error = ?e, "port mapping not deleted"),
            Err(_) => tracing::debug!(%external, "port mapping deletion unanswered"),
        }
    }
}

/// Mappings held now, by meeting, for [`release_all`].
static HELD: Mutex<Vec<(u64, PortMapping)>> = Mutex::new(Vec::new());

/// The next meeting's key in [`HELD`].
static NEXT_MEETING: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn held() -> std::sync::MutexGuard<'static, Vec<(u64, PortMapping)>> {
    HELD.lock().unwrap_or_else(|e| e.into_inner())
}

/// Requests to the router not answered yet: a mapping may still come of
/// them, which [`release_all`] must wait for.
static ASKING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Deletes every mapping this process holds (on Ctrl-C, and when the
/// program ends), once the requests still out have been answered (at most
/// [`ASK_TIMEOUT`]): one granted just as the program ends is deleted too.
pub async fn release_all() {
    let until = tokio::time::Instant::now() + ASK_TIMEOUT;
    while ASKING.load(std::sync::atomic::Ordering::Acquire) > 0
        && tokio::time::Instant::now() < until
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let leases = std::mem::take(&mut *held());
    tracing::debug!(held = leases.len(), "deleting the port mappings held");
    for (_, mapping) in leases {
        let external = mapping.external_port();
        match tokio::time::timeout(RELEASE_TIMEOUT, mapping.try_drop()).await {
            Ok(Ok(())) => tracing::debug!(%external, "port mapping deleted"),
            Ok(Err((e, _))) => tracing::debug!(%external, error = ?e, "port mapping not deleted"),
            Err(_) => tracing::debug!(%external, "port mapping deletion unanswered"),
        }
    }
}

/// A mapping kept for one meeting: asked for at once, renewed at half its
/// lease, deleted when this is dropped.
pub struct Mapper {
    external: watch::Receiver<Option<Lease>>,
    stop: Option<oneshot::Sender<()>>,
}

impl Mapper {
    /// Starts asking for a mapping of `port`, in the background.
    pub fn start(port: u16) -> Mapper {
        let (tx, external) = watch::channel(None);
        let (stop, stopped) = oneshot::channel::<()>();
        let meeting = NEXT_MEETING.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ASKING.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        tokio::spawn(async move {
            let asked = request(port).await;
            // Held before the request counts as answered.
            if let Some(lease) = &asked {
                held().push((meeting, lease.mapping.clone()));
            }
            ASKING.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
            let Some(mut lease) = asked else {
                return;
            };
            let _ = tx.send(Some(lease.clone()));
            tokio::pin!(stopped);
            loop {
                // At half the lifetime the router granted (it may grant
                // less than asked).
                let renew = Duration::from_secs(u64::from(lease.mapping.lifetime().max(2)) / 2);
                tokio::select! {
                    _ = &mut stopped => break,
                    () = tokio::time::sleep(renew) => {
                        if let Err(e) = lease.mapping.renew().await {
                            tracing::debug!(error = ?e, "port mapping not renewed");
                            continue;
                        }
                        // The router may move the mapping: keep what is held
                        // and told in step.
                        lease.external.set_port(lease.mapping.external_port().get());
                        for (m, held) in held().iter_mut() {
                            if *m == meeting {
                                *held = lease.mapping.clone();
                            }
                        }
                        let _ = tx.send(Some(lease.clone()));
                    }
                }
            }
            // Held until deleted: a program ending meanwhile (its runtime
            // may stop this task) deletes it itself ([`release_all`]).
            lease.release().await;
            held().retain(|(m, _)| *m != meeting);
        });
        Mapper {
            external,
            stop: Some(stop),
        }
    }

    /// The mapping, if the router has granted one by now (never waits).
    pub fn lease(&self) -> Option<Lease> {
        self.external.borrow().clone()
    }
}

impl Drop for Mapper {
    /// Ends the meeting's mapping: its task deletes it in the background (if
    /// the runtime ends first, the lease expires on its own).
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_route_gives_the_gateway() {
        let table =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     eth0\t0001000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                     eth0\t00000000\t0101000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n";
        assert_eq!(
            parse_default_gateway(table),
            Some(Ipv4Addr::new(10, 0, 1, 1))
        );
        let none = "Iface\tDestination\tGateway\n eth0\t0001000A\t00000000\n";
        assert_eq!(parse_default_gateway(none), None);
    }
}
