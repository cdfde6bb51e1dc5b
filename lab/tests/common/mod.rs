//! Helpers shared by the lab's integration tests: the skip-or-fail decision on
//! missing prerequisites, TCP probes run inside lab namespaces, and ping.
//!
//! Every address used here belongs to a namespace the test's own lab created.

#![allow(dead_code)]

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use punchline_lab::prereq;
use punchline_lab::{Host, Lab, LabConfig};
use socket2::{Domain, Protocol, Socket, Type};

/// How long an accept waits for a connection that should come.
pub const ACCEPT_TIMEOUT: Duration = Duration::from_secs(5);

/// Poll interval of the non-blocking accept loop.
const ACCEPT_POLL: Duration = Duration::from_millis(5);

/// How long a probe connect waits before calling the target silent. The first
/// SYN retransmission comes after 1 s, so 1.5 s is one unanswered retry.
pub const SILENT_TIMEOUT: Duration = Duration::from_millis(1500);

/// Whether the lab can run here (see [`prereq::available_or_skip`]).
pub fn lab_available(test: &str) -> bool {
    prereq::available_or_skip(test)
}

/// Whether a lab with IPv6 can run here (see
/// [`prereq::available_ipv6_or_skip`]).
pub fn lab6_available(test: &str) -> bool {
    prereq::available_ipv6_or_skip(test)
}

/// Builds a lab or fails the test with the reason.
pub fn build(config: &LabConfig) -> Lab {
    match Lab::build(config) {
        Ok(lab) => lab,
        Err(err) => panic!("building lab {config:?} failed: {err}"),
    }
}

/// A listener on `0.0.0.0:port` inside `host`'s namespace.
pub fn listen(lab: &Lab, host: Host, port: u16) -> TcpListener {
    lab.run_in(host, move || {
        TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
    })
    .expect("enter namespace")
    .expect("bind listener")
}

/// A listener on `addr` (either family; an IPv6 one takes IPv6 only) inside
/// `host`'s namespace.
pub fn listen_at(lab: &Lab, host: Host, addr: SocketAddr) -> TcpListener {
    lab.run_in(host, move || -> io::Result<TcpListener> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        if addr.is_ipv6() {
            socket.set_only_v6(true)?;
        }
        socket.set_reuse_address(true)?;
        socket.bind(&addr.into())?;
        socket.listen(16)?;
        Ok(socket.into())
    })
    .expect("enter namespace")
    .unwrap_or_else(|err| panic!("bind listener on {addr}: {err}"))
}

/// Accepts one connection within [`ACCEPT_TIMEOUT`] and returns it with the
/// peer address the listener observed.
pub fn accept(listener: &TcpListener) -> io::Result<(TcpStream, SocketAddr)> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + ACCEPT_TIMEOUT;
    loop {
        match listener.accept() {
            Ok(pair) => return Ok(pair),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no connection came",
                    ));
                }
                std::thread::sleep(ACCEPT_POLL);
            }
            Err(err) => return Err(err),
        }
    }
}

/// A TCP socket bound to `local_port` with `SO_REUSEADDR` and `SO_REUSEPORT`,
/// as the peer binds its fixed port.
pub fn reusable_socket(local_port: u16) -> io::Result<Socket> {
    reusable_socket_for(Ipv4Addr::UNSPECIFIED.into(), local_port)
}

/// Like [`reusable_socket`], of the family of `ip` (an IPv6 socket takes IPv6
/// only, so it never competes with an IPv4 one for the port).
pub fn reusable_socket_for(ip: IpAddr, local_port: u16) -> io::Result<Socket> {
    let local = match ip {
        IpAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, local_port)),
        IpAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, local_port)),
    };
    let socket = Socket::new(
        Domain::for_address(local),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    if local.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&local.into())?;
    Ok(socket)
}

/// Connects from `host` to `dest` within `timeout`, from `local_port` (0 for
/// any) with the reuse options.
pub fn connect_from(
    lab: &Lab,
    host: Host,
    local_port: u16,
    dest: SocketAddrV4,
    timeout: Duration,
) -> io::Result<TcpStream> {
    connect_to(lab, host, local_port, dest.into(), timeout)
}

/// Like [`connect_from`], to a destination of either family.
pub fn connect_to(
    lab: &Lab,
    host: Host,
    local_port: u16,
    dest: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    lab.run_in(host, move || {
        let socket = reusable_socket_for(dest.ip(), local_port)?;
        socket.connect_timeout(&dest.into(), timeout)?;
        Ok(socket.into())
    })
    .expect("enter namespace")
}

/// Median ping RTT from `host` to `dest` over `count` pings, in milliseconds.
pub fn ping_median_ms(lab: &Lab, host: Host, dest: impl Into<IpAddr>, count: u32) -> f64 {
    let dest = dest.into();
    let output = lab
        .command(host, "ping")
        .args(["-n", "-c"])
        .arg(count.to_string())
        .args(["-i", "0.2", "-W", "2"])
        .arg(dest.to_string())
        .output()
        .expect("run ping");
    let text = String::from_utf8_lossy(&output.stdout);
    let mut times: Vec<f64> = text
        .lines()
        .filter_map(|line| line.split("time=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter_map(|ms| ms.parse().ok())
        .collect();
    assert!(
        !times.is_empty(),
        "no ping replies from {dest} (host {host:?}): {text}\n{}\n{}",
        String::from_utf8_lossy(&output.stderr),
        lab.diagnostics()
    );
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}
