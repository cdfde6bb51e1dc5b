//! Sockets bound to the peer's one fixed local port, and the peer's own addresses.
//!
//! Every socket the peer opens — the rendezvous connection and each punch attempt —
//! is bound to the same local port with `SO_REUSEADDR` and `SO_REUSEPORT`, and none
//! ever listens. The rendezvous sees the NAT's mapping of that port; a NAT with
//! endpoint-independent mapping reuses the mapping for the punch, so the address the
//! rendezvous told the other peer is the one our punch SYNs come from.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpSocket;

/// A non-blocking TCP socket for connecting to `dest`, bound to `port` on every
/// local address of `dest`'s family (`port` 0: the OS picks one).
pub fn fixed_port_socket(dest: SocketAddr, port: u16) -> io::Result<TcpSocket> {
    fixed_port_socket_from(dest, None, port)
}

/// [`fixed_port_socket`], bound to the local address `source` if given (of
/// `dest`'s family), rather than to all of them.
pub fn fixed_port_socket_from(
    dest: SocketAddr,
    source: Option<IpAddr>,
    port: u16,
) -> io::Result<TcpSocket> {
    let socket = Socket::new(Domain::for_address(dest), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    let unspecified = match dest {
        SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        SocketAddr::V6(_) => {
            // Keep the IPv6 socket off IPv4 so a port bound for one family does not
            // collide with the other.
            socket.set_only_v6(true)?;
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        }
    };
    socket.set_tcp_nodelay(true)?;
    socket.set_nonblocking(true)?;
    let local = source
        .filter(|ip| ip.is_ipv4() == dest.is_ipv4())
        .unwrap_or(unspecified);
    socket.bind(&SocketAddr::new(local, port).into())?;
    Ok(TcpSocket::from_std_stream(socket.into()))
}

/// This host's addresses worth offering as LAN candidates, with `port`: every
/// interface address except loopback and link-local ones (a link-local IPv6 address
/// needs a scope the other host cannot know).
pub fn lan_candidates(port: u16) -> Vec<SocketAddr> {
    own_addresses()
        .into_iter()
        .filter(|ip| {
            let link_local = match ip {
                IpAddr::V4(v4) => v4.is_link_local(),
                IpAddr::V6(v6) => v6.is_unicast_link_local(),
            };
            !link_local && !ip.is_unspecified() && !ip.is_multicast()
        })
        .map(|ip| SocketAddr::new(ip, port))
        .collect()
}

/// Whether this host has an address of each family (IPv4, IPv6) that can
/// reach beyond its links: not loopback, not link-local.
pub fn families() -> (bool, bool) {
    let own = own_addresses();
    let has = |v4: bool| {
        own.iter().any(|ip| match ip {
            IpAddr::V4(a) => v4 && !a.is_link_local(),
            IpAddr::V6(a) => !v4 && !a.is_unicast_link_local(),
        })
    };
    (has(true), has(false))
}

/// This host's own interface addresses, loopback excluded.
pub fn own_addresses() -> Vec<IpAddr> {
    let Ok(interfaces) = if_addrs::get_if_addrs() else {
        return Vec::new();
    };
    let mut out: Vec<IpAddr> = interfaces
        .iter()
        .filter(|i| !i.is_loopback())
        .map(|i| i.ip())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// What a link between the peers runs on: a direct TCP connection (punched), or
/// a byte stream relayed through the rendezvous ([`crate::client::RendezvousConn::relay`]).
/// Both carry the same frames, encrypted end to end.
pub enum LinkStream {
    /// A direct TCP connection.
    Tcp(tokio::net::TcpStream),
    /// The local end of a stream the rendezvous relays, and the signal that the
    /// task carrying it to the rendezvous has passed on everything and closed.
    Relayed(
        tokio::io::DuplexStream,
        Option<tokio::sync::oneshot::Receiver<()>>,
    ),
}

impl LinkStream {
    /// Once the link is shut down: waits (up to `limit`) until the relay has
    /// passed on everything written, so nothing is lost when the process exits
    /// right after. Nothing to wait for on a direct link: the kernel has it.
    pub async fn drained(&mut self, limit: std::time::Duration) {
        if let LinkStream::Relayed(_, done) = self {
            if let Some(done) = done.take() {
                let _ = tokio::time::timeout(limit, done).await;
            }
        }
    }

    /// The TCP connection, if direct.
    pub fn tcp(&self) -> Option<&tokio::net::TcpStream> {
        match self {
            LinkStream::Tcp(s) => Some(s),
            LinkStream::Relayed(..) => None,
        }
    }
}

impl tokio::io::AsyncRead for LinkStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            LinkStream::Tcp(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            LinkStream::Relayed(s, _) => std::pin::Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for LinkStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        match self.get_mut() {
            LinkStream::Tcp(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            LinkStream::Relayed(s, _) => std::pin::Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            LinkStream::Tcp(s) => std::pin::Pin::new(s).poll_flush(cx),
            LinkStream::Relayed(s, _) => std::pin::Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            LinkStream::Tcp(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            LinkStream::Relayed(s, _) => std::pin::Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_have_the_port_and_no_loopback() {
        for c in lan_candidates(4242) {
            assert_eq!(c.port(), 4242);
            assert!(!c.ip().is_loopback(), "{c}");
        }
    }

    #[tokio::test]
    async fn two_sockets_share_the_fixed_port() {
        let dest: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        let a = fixed_port_socket(dest, 0).expect("first");
        let port = a.local_addr().expect("bound").port();
        let b = fixed_port_socket(dest, port).expect("second on the same port");
        assert_eq!(b.local_addr().expect("bound").port(), port);
    }
}
