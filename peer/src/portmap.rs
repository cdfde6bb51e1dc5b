//! Port mapping: asking the router, with PCP (RFC 6887), NAT-PMP (RFC 6886)
//! or UPnP-IGD, to forward our fixed port, so that the other side can reach
//! it from anywhere whatever the router's NAT does.
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
//! # Which protocol
//!
//! The gateway is the IPv4 default route's (`/proc/net/route`). Two asks run
//! at once, each within [`ASK_TIMEOUT`], and the first mapping granted is the
//! one used:
//!
//! - `crab_nat`: PCP first, NAT-PMP when the router answers that it does not
//!   speak PCP (one UDP round trip to the router when it answers);
//! - `igd-next`: UPnP-IGD, an SSDP search (multicast), the device's
//!   description and service description over HTTP, then `AddPortMapping`
//!   and `GetExternalIPAddress` (five round trips). Only a UPnP device at the
//!   default gateway's address is used: any host on the LAN can answer a
//!   search. A router that grants only permanent leases (UPnP error 725, as
//!   many do) is asked again for one; it is deleted at the end like the
//!   others, but a killed process leaves it in the router.
//!
//! A router speaking both protocols (miniupnpd does) may grant both asks. The
//! later one is deleted, unless it has the same external address as the one
//! kept: then both are the same entry in the router, and deleting one would
//! delete the other.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU16;
use std::sync::Mutex;
use std::time::Duration;

use crab_nat::{InternetProtocol, PortMapping, PortMappingOptions, PortMappingType, TimeoutConfig};
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use igd_next::aio::tokio::Tokio;
use igd_next::{AddPortError, PortMappingProtocol};
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

/// Bound on deleting a mapping, and on each UPnP-IGD request once the
/// router is found.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(1);

/// How a UPnP-IGD mapping is named in the router's table.
const DESCRIPTION: &str = "punchline";

/// Which protocol the router answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Port Control Protocol.
    Pcp,
    /// NAT Port Mapping Protocol.
    NatPmp,
    /// UPnP Internet Gateway Device (`WANIPConnection`).
    Upnp,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Pcp => "PCP",
            Protocol::NatPmp => "NAT-PMP",
            Protocol::Upnp => "UPnP-IGD",
        })
    }
}

/// A mapping in the router, as the protocol that made it keeps it.
#[derive(Debug, Clone)]
enum Mapping {
    /// PCP or NAT-PMP.
    Pmp(PortMapping),
    /// UPnP-IGD.
    Upnp(UpnpMapping),
}

/// A UPnP-IGD mapping: what it takes to renew or delete it.
#[derive(Debug, Clone)]
struct UpnpMapping {
    gateway: igd_next::aio::Gateway<Tokio>,
    internal: SocketAddr,
    external_port: u16,
    /// Seconds; 0 is permanent (the router grants no other).
    lease: u32,
}

impl Mapping {
    fn external_port(&self) -> u16 {
        match self {
            Mapping::Pmp(m) => m.external_port().get(),
            Mapping::Upnp(m) => m.external_port,
        }
    }

    /// When to renew: at half the lifetime the router granted (it may grant
    /// less than asked); never for a permanent one.
    fn renew_after(&self) -> Option<Duration> {
        let seconds = match self {
            Mapping::Pmp(m) => m.lifetime(),
            Mapping::Upnp(m) if m.lease == 0 => return None,
            Mapping::Upnp(m) => m.lease,
        };
        Some(Duration::from_secs(u64::from(seconds.max(2)) / 2))
    }

    async fn renew(&mut self) -> Result<(), String> {
        match self {
            Mapping::Pmp(m) => m.renew().await.map_err(|e| format!("{e:?}")),
            // Asking again for the same mapping renews it (UPnP-IGD 1.0,
            // AddPortMapping).
            Mapping::Upnp(m) => tokio::time::timeout(
                RELEASE_TIMEOUT,
                m.gateway.add_port(
                    PortMappingProtocol::TCP,
                    m.external_port,
                    m.internal,
                    m.lease,
                    DESCRIPTION,
                ),
            )
            .await
            .map_err(|_| "no answer".to_owned())?
            .map_err(|e| e.to_string()),
        }
    }

    /// Deletes it on the router (within [`RELEASE_TIMEOUT`]).
    async fn delete(self) {
        let external = self.external_port();
        let deleted = match self {
            Mapping::Pmp(m) => tokio::time::timeout(RELEASE_TIMEOUT, m.try_drop())
                .await
                .map(|r| r.map_err(|(e, _)| format!("{e:?}"))),
            Mapping::Upnp(m) => tokio::time::timeout(
                RELEASE_TIMEOUT,
                m.gateway
                    .remove_port(PortMappingProtocol::TCP, m.external_port),
            )
            .await
            .map(|r| r.map_err(|e| e.to_string())),
        };
        match deleted {
            Ok(Ok(())) => tracing::debug!(%external, "port mapping deleted"),
            Ok(Err(error)) => tracing::debug!(%external, %error, "port mapping not deleted"),
            Err(_) => tracing::debug!(%external, "port mapping deletion unanswered"),
        }
    }
}

/// A mapping the router granted.
#[derive(Debug, Clone)]
pub struct Lease {
    mapping: Mapping,
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

/// Asks `gateway` with PCP, then NAT-PMP, to map TCP `client:port`.
async fn ask_pmp(gateway: Ipv4Addr, client: Ipv4Addr, port: u16) -> Option<Lease> {
    let ask = async {
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
        .map_err(|e| tracing::debug!(%gateway, error = ?e, "no PCP or NAT-PMP mapping"))
        .ok()?;
        let (ip, protocol) = match mapping.mapping_type() {
            PortMappingType::Pcp { external_ip, .. } => (external_ip, Protocol::Pcp),
            PortMappingType::NatPmp => {
                let ip = crab_nat::natpmp::external_address(IpAddr::V4(gateway), Some(TIMING))
                    .await
                    .map_err(|e| tracing::debug!(error = ?e, "no external address"));
                match ip {
                    Ok(ip) => (IpAddr::V4(ip), Protocol::NatPmp),
                    Err(()) => {
                        Mapping::Pmp(mapping).delete().await;
                        return None;
                    }
                }
            }
        };
        let external = SocketAddr::new(ip.to_canonical(), mapping.external_port().get());
        Some(Lease {
            mapping: Mapping::Pmp(mapping),
            external,
            protocol,
        })
    };
    tokio::time::timeout(ASK_TIMEOUT, ask).await.ok().flatten()
}

/// The UDP port of SSDP (UPnP discovery).
const SSDP_PORT: u16 = 1900;

/// Finds the UPnP-IGD device at `gateway` (within [`ASK_TIMEOUT`]), with two
/// searches at once: one multicast to the whole LAN, as every device
/// answers, and one sent to the gateway alone (UPnP 1.1's unicast search).
/// A device elsewhere is never the one: any host on the LAN may answer the
/// multicast search, and first (a second router in access-point mode, a
/// host sharing its connection, a hostile one); the unicast search still
/// finds the router then. It also answers at once, where a multicast one
/// may wait up to the search's MX seconds (3 in igd-next's) to spread the
/// answers of many devices.
async fn find_upnp(gateway: Ipv4Addr, client: Ipv4Addr) -> Option<igd_next::aio::Gateway<Tokio>> {
    let search = |to: Option<SocketAddr>| {
        let mut options = igd_next::SearchOptions::default();
        options.bind_addr = SocketAddr::new(IpAddr::V4(client), 0);
        options.timeout = Some(ASK_TIMEOUT);
        options.single_search_timeout = Some(ASK_TIMEOUT);
        options.gateway_ip_version = igd_next::GatewayIpVersion::V4;
        if let Some(to) = to {
            options.broadcast_address = to;
        }
        async move {
            let device = igd_next::aio::tokio::search_gateway(options)
                .await
                .map_err(|e| tracing::debug!(error = %e, "no UPnP-IGD device"))
                .ok()?;
            if device.addr.ip() != IpAddr::V4(gateway) {
                tracing::debug!(device = %device.addr, %gateway, "a UPnP-IGD device that is not the gateway: not asked");
                return None;
            }
            Some(device)
        }
        .boxed()
    };
    let mut searches = FuturesUnordered::new();
    searches.push(search(None));
    searches.push(search(Some(SocketAddr::new(
        IpAddr::V4(gateway),
        SSDP_PORT,
    ))));
    let found = async {
        while let Some(found) = searches.next().await {
            if found.is_some() {
                return found;
            }
        }
        None
    };
    // Searching asks nothing of the router yet: a program ending meanwhile
    // stops it rather than wait for it ([`release_all`]).
    tokio::select! {
        found = found => found,
        () = ENDING.cancelled() => None,
    }
}

/// Asks the UPnP-IGD device at `gateway` to map TCP `client:port` (the same
/// external port, else any).
///
/// Once the program ends ([`ENDING`]) it asks nothing more: the request
/// under way is the last, and what it made is deleted. So [`release_all`]
/// waits for at most one request and one deletion
/// (2 × [`RELEASE_TIMEOUT`]), not for the five requests a slow router may
/// take to grant a permanent lease at another port.
async fn ask_upnp(gateway: Ipv4Addr, client: Ipv4Addr, port: u16) -> Option<Lease> {
    let device = find_upnp(gateway, client).await?;
    let internal = SocketAddr::new(IpAddr::V4(client), port);
    let lease = u32::try_from(LEASE.as_secs()).unwrap_or(u32::MAX);
    let add = |external: u16, lease: u32| {
        let device = device.clone();
        async move {
            if ENDING.is_cancelled() {
                return Err(None);
            }
            let added = tokio::time::timeout(
                RELEASE_TIMEOUT,
                device.add_port(
                    PortMappingProtocol::TCP,
                    external,
                    internal,
                    lease,
                    DESCRIPTION,
                ),
            )
            .await;
            match added {
                Ok(Ok(())) => Ok(UpnpMapping {
                    gateway: device,
                    internal,
                    external_port: external,
                    lease,
                }),
                Ok(Err(e)) => Err(Some(e)),
                // Unanswered: it may have been made all the same.
                Err(_) => {
                    let _ = tokio::time::timeout(
                        RELEASE_TIMEOUT,
                        device.remove_port(PortMappingProtocol::TCP, external),
                    )
                    .await;
                    Err(None)
                }
            }
        }
    };
    let mut asked = add(port, lease).await;
    if let Err(Some(AddPortError::OnlyPermanentLeasesSupported)) = asked {
        asked = add(port, 0).await;
    }
    if let Err(Some(AddPortError::PortInUse)) = asked {
        // Someone else has our port there: another one, above the
        // registered ports.
        let other = 49152 + fastrand::u16(..16384);
        asked = add(other, lease).await;
        if let Err(Some(AddPortError::OnlyPermanentLeasesSupported)) = asked {
            asked = add(other, 0).await;
        }
    }
    let mapping = asked
        .map_err(|e| tracing::debug!(error = ?e, "no UPnP-IGD mapping"))
        .ok()?;
    if ENDING.is_cancelled() {
        Mapping::Upnp(mapping).delete().await;
        return None;
    }
    let ip = tokio::time::timeout(RELEASE_TIMEOUT, mapping.gateway.get_external_ip()).await;
    let Ok(Ok(ip)) = ip else {
        tracing::debug!("no external address from the UPnP-IGD device");
        Mapping::Upnp(mapping).delete().await;
        return None;
    };
    let external = SocketAddr::new(ip.to_canonical(), mapping.external_port);
    Some(Lease {
        mapping: Mapping::Upnp(mapping),
        external,
        protocol: Protocol::Upnp,
    })
}

/// Every ask for a mapping of `port` at the default gateway, under way.
fn asks(port: u16) -> Option<FuturesUnordered<futures::future::BoxFuture<'static, Option<Lease>>>> {
    let gateway = default_gateway()?;
    let client = local_towards(gateway)?;
    let asks = FuturesUnordered::new();
    asks.push(ask_pmp(gateway, client, port).boxed());
    asks.push(ask_upnp(gateway, client, port).boxed());
    Some(asks)
}

/// Asks the default gateway to map TCP `port` (the same external port if it
/// can) for [`LEASE`], in every protocol at once; the first mapping granted,
/// or `None` if there is no gateway, or none is granted within
/// [`ASK_TIMEOUT`] (plus the round trips of UPnP-IGD's requests).
///
/// A later grant is deleted in the background (counted in [`ASKING`] until
/// then), unless it is the same entry as the first.
pub async fn request(port: u16) -> Option<Lease> {
    let mut asks = asks(port)?;
    let lease = loop {
        match asks.next().await {
            Some(Some(lease)) => break lease,
            Some(None) => continue,
            None => return None,
        }
    };
    tracing::info!(external = %lease.external, protocol = %lease.protocol, "port mapped");
    if !asks.is_empty() {
        let kept = lease.external;
        ASKING.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        tokio::spawn(async move {
            while let Some(later) = asks.next().await {
                match later {
                    Some(later) if later.external != kept => later.mapping.delete().await,
                    _ => {}
                }
            }
            ASKING.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        });
    }
    Some(lease)
}

/// Asks the default gateway for a mapping of `port` in every protocol, and
/// waits for all the answers (`peer doctor`); each mapping granted, which
/// the caller deletes ([`Lease::release`]). `None` if there is no gateway.
pub async fn request_each(port: u16) -> Option<Vec<Lease>> {
    let asks = asks(port)?;
    Some(asks.filter_map(|l| async { l }).collect().await)
}

impl Lease {
    /// Deletes the mapping on the router (within [`RELEASE_TIMEOUT`]).
    pub async fn release(self) {
        self.mapping.delete().await;
    }
}

/// Mappings held now, by meeting, for [`release_all`].
static HELD: Mutex<Vec<(u64, Mapping)>> = Mutex::new(Vec::new());

/// The next meeting's key in [`HELD`].
static NEXT_MEETING: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn held() -> std::sync::MutexGuard<'static, Vec<(u64, Mapping)>> {
    HELD.lock().unwrap_or_else(|e| e.into_inner())
}

/// Requests to the router not answered yet: a mapping may still come of
/// them, which [`release_all`] must wait for.
static ASKING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Set when the program ends ([`release_all`]): asks that have not asked
/// the router for anything yet give up, and UPnP-IGD asks ask nothing more.
static ENDING: std::sync::LazyLock<tokio_util::sync::CancellationToken> =
    std::sync::LazyLock::new(tokio_util::sync::CancellationToken::new);

/// Deletes every mapping this process holds (on Ctrl-C, and when the
/// program ends), once the requests still out have been answered (at most
/// [`ASK_TIMEOUT`] and UPnP-IGD's request bound): one granted just as the
/// program ends is deleted too. A UPnP-IGD search still under way is
/// stopped instead.
pub async fn release_all() {
    // Long enough for a UPnP-IGD request under way and the deletion of what
    // it made ([`ask_upnp`]).
    const _: () = assert!(
        ASK_TIMEOUT.as_millis() + RELEASE_TIMEOUT.as_millis() >= 2 * RELEASE_TIMEOUT.as_millis()
    );
    ENDING.cancel();
    let until = tokio::time::Instant::now() + ASK_TIMEOUT + RELEASE_TIMEOUT;
    while ASKING.load(std::sync::atomic::Ordering::Acquire) > 0
        && tokio::time::Instant::now() < until
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let leases = std::mem::take(&mut *held());
    tracing::debug!(held = leases.len(), "deleting the port mappings held");
    for (_, mapping) in leases {
        mapping.delete().await;
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
                let renew = lease.mapping.renew_after();
                tokio::select! {
                    _ = &mut stopped => break,
                    () = sleep_or_forever(renew) => {
                        // Not renewed once the program ends: `release_all`
                        // may have deleted it already.
                        if ENDING.is_cancelled() {
                            break;
                        }
                        if let Err(error) = lease.mapping.renew().await {
                            tracing::debug!(%error, "port mapping not renewed");
                            continue;
                        }
                        // The router may move the mapping: keep what is held
                        // and told in step.
                        lease.external.set_port(lease.mapping.external_port());
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

/// Sleeps for `wait`, or for ever when `None`.
async fn sleep_or_forever(wait: Option<Duration>) {
    match wait {
        Some(wait) => tokio::time::sleep(wait).await,
        None => std::future::pending().await,
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
