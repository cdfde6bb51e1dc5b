//! A rendezvous run inside the peer, for a chat started with no server given
//! (none with `--server`, in `PUNCHLINE_SERVER` or in the config file).
//!
//! It is the real server (`punchline_rendezvous`, its defaults) on this host's
//! every address, on [`DEFAULT_PORT`] unless told otherwise, with its probe
//! port beside it; it runs as long as the chat (a resume or a relay needs it
//! too) and stops with the peer. It serves the cases that need no set-up: the
//! other host on the same LAN, or this host being the one with a public
//! address. Our own peer meets it at this host's first address (not loopback),
//! so that the address it observes for us is one the other host can reach.
//!
//! When the port is taken (another peer here already hosts one, or a
//! `rendezvous` runs on this host), that one is used instead.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use punchline_rendezvous::{
    bind_default, Config, ALTERNATE_PORT_OFFSET, DEFAULT_PORT, PROBE_PORT_OFFSET,
};
use tokio::sync::oneshot;

use crate::error::PeerError;

/// A rendezvous running in this process; stops when dropped.
pub struct Hosted {
    /// Where our own peer meets it.
    pub addr: SocketAddr,
    /// This host's addresses the other host may reach it at, the likeliest
    /// first (public IPv4, private IPv4, then IPv6).
    pub advertised: Vec<IpAddr>,
    /// Its port.
    pub port: u16,
    /// False when the port was taken and another rendezvous on this host is
    /// used instead.
    pub ours: bool,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for Hosted {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The port of a rendezvous run inside the peer when none is given.
pub const HOSTED_PORT: u16 = DEFAULT_PORT;

/// Starts a rendezvous on `port` (all addresses, dual stack), and its probe
/// port beside it.
pub async fn start(port: u16) -> Result<Hosted, PeerError> {
    let advertised = advertised(crate::net::own_addresses());
    // Where we meet it ourselves: the address the other host is told first.
    let addr = SocketAddr::new(
        advertised
            .first()
            .copied()
            .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        port,
    );
    let main = match bind_default(port) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            return Ok(Hosted {
                addr,
                advertised,
                port,
                ours: false,
                stop: None,
            })
        }
        Err(e) => {
            return Err(PeerError::io(
                format!("cannot run a rendezvous on port {port}"),
                e,
            ))
        }
    };
    let probe_port = port.wrapping_add(PROBE_PORT_OFFSET);
    let probe = bind_default(probe_port).map_err(|e| {
        PeerError::io(
            format!("cannot open the rendezvous' probe port {probe_port}"),
            e,
        )
    })?;
    let listener = |l: std::net::TcpListener| {
        l.set_nonblocking(true)
            .and_then(|()| tokio::net::TcpListener::from_std(l))
            .map_err(|e| PeerError::io("cannot run a rendezvous", e))
    };
    // The alternate port only saves time under loss: without it, peers wait
    // for their kernel's retransmission.
    let alternate_port = port.wrapping_add(ALTERNATE_PORT_OFFSET);
    let alternate = bind_default(alternate_port)
        .inspect_err(|e| tracing::debug!(port = alternate_port, error = %e, "no alternate port"))
        .ok();
    let (main, probe) = (listener(main)?, listener(probe)?);
    let mut listeners = vec![main];
    if let Some(alternate) = alternate {
        listeners.push(listener(alternate)?);
    }
    let config = Config::default();
    let (stop, stopped) = oneshot::channel::<()>();
    let (stop_probe, probe_stopped) = oneshot::channel::<()>();
    tokio::spawn(punchline_rendezvous::run_probe(
        probe,
        config.metrics.clone(),
        config.probes.clone(),
        async {
            let _ = probe_stopped.await;
        },
    ));
    tokio::spawn(async move {
        let served = punchline_rendezvous::run_on(listeners, config, async {
            let _ = stopped.await;
        })
        .await;
        let _ = stop_probe.send(());
        if let Err(e) = served {
            tracing::warn!(error = %e, "the built-in rendezvous stopped");
        }
    });
    Ok(Hosted {
        addr,
        advertised,
        port,
        ours: true,
        stop: Some(stop),
    })
}

/// `addresses` in the order the other host is likeliest to reach them: public
/// IPv4 first, then private IPv4 (a LAN), then IPv6 (global before unique
/// local); link-local and loopback ones left out (they need a scope, or lead
/// nowhere else).
pub fn advertised(addresses: Vec<IpAddr>) -> Vec<IpAddr> {
    let rank = |ip: &IpAddr| match (ip.is_ipv4(), crate::punch::in_private_range(*ip)) {
        (true, false) => 0,
        (true, true) => 1,
        (false, false) => 2,
        (false, true) => 3,
    };
    let mut out: Vec<IpAddr> = addresses
        .into_iter()
        .filter(|ip| {
            !ip.is_loopback()
                && !ip.is_unspecified()
                && !ip.is_multicast()
                && match ip {
                    IpAddr::V4(v4) => !v4.is_link_local(),
                    IpAddr::V6(v6) => !v6.is_unicast_link_local(),
                }
        })
        .collect();
    out.sort_by_key(|ip| (rank(ip), *ip));
    out.dedup();
    out
}

/// `ip:port` as the other host types it after `--server`: the port left out
/// when it is the default, an IPv6 address in brackets.
pub fn server_arg(ip: IpAddr, port: u16) -> String {
    match (ip, port == DEFAULT_PORT) {
        (IpAddr::V4(v4), true) => v4.to_string(),
        (IpAddr::V6(v6), true) => format!("[{v6}]"),
        (ip, false) => SocketAddr::new(ip, port).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_addresses_first_then_the_lan_then_ipv6() {
        let ips: Vec<IpAddr> = [
            "fe80::1",
            "fd00::5",
            "2001:db8::5",
            "192.168.1.5",
            "127.0.0.1",
            "100.70.0.1",
            "203.0.113.7",
            "169.254.3.3",
        ]
        .iter()
        .map(|s| s.parse().expect("ip"))
        .collect();
        let order: Vec<String> = advertised(ips).iter().map(IpAddr::to_string).collect();
        assert_eq!(
            order,
            [
                "203.0.113.7",
                "100.70.0.1",
                "192.168.1.5",
                "2001:db8::5",
                "fd00::5"
            ]
        );
    }

    #[test]
    fn the_server_argument_names_the_port_only_when_it_is_not_the_default() {
        let v4: IpAddr = "192.0.2.1".parse().expect("ip");
        let v6: IpAddr = "2001:db8::1".parse().expect("ip");
        assert_eq!(server_arg(v4, DEFAULT_PORT), "192.0.2.1");
        assert_eq!(server_arg(v4, 9000), "192.0.2.1:9000");
        assert_eq!(server_arg(v6, DEFAULT_PORT), "[2001:db8::1]");
        assert_eq!(server_arg(v6, 9000), "[2001:db8::1]:9000");
    }
}
