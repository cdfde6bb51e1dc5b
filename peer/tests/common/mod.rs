//! Test harness: real `peer` processes (the rendezvous they meet at is the
//! test kit's, `punchline_testkit::Rendezvous`).

#![allow(dead_code)]

pub mod fake;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use punchline_lab::scenario::PeerProcess;

/// How long a test waits for any one expected event.
pub const WAIT: Duration = Duration::from_secs(20);

/// A free loopback port (bound and released: nothing else here races for it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A running `peer` process (the lab's process wrapper, with test-failing
/// versions of its calls); killed when dropped.
pub struct Peer {
    inner: PeerProcess,
    /// Every stderr line seen so far.
    pub stderr_seen: Vec<String>,
}

pub fn peer_command(server: SocketAddr, name: &str, code: &str, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_peer"));
    cmd.arg("--server")
        .arg(server.to_string())
        .arg("--name")
        .arg(name)
        .arg("--no-lan")
        .args(extra)
        .args((!code.is_empty()).then_some(code))
        .env_remove("PUNCHLINE_SERVER");
    cmd
}

impl Peer {
    /// Spawns `peer`; an empty `code` starts a new code.
    pub fn spawn(server: SocketAddr, name: &str, code: &str, extra: &[&str]) -> Peer {
        Self::spawn_command(peer_command(server, name, code, extra), name)
    }

    pub fn spawn_command(cmd: Command, name: &str) -> Peer {
        Peer {
            inner: PeerProcess::spawn(cmd, name).expect("spawn peer"),
            stderr_seen: Vec::new(),
        }
    }

    fn sync(&mut self) {
        self.stderr_seen = self.inner.drain_stderr().to_vec();
    }

    /// Writes lines to the peer's stdin.
    pub fn send(&mut self, text: &str) {
        self.inner.send(text).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Closes stdin (end of input).
    pub fn close_stdin(&mut self) {
        self.inner.close_stdin();
    }

    /// The next stdout line.
    pub fn recv(&mut self) -> String {
        self.inner.recv().unwrap_or_else(|e| panic!("{e}"))
    }

    /// The next stdout line within `wait`, if one comes.
    pub fn try_recv(&mut self, wait: Duration) -> Option<String> {
        self.inner.try_recv(wait)
    }

    /// Waits for a stderr line containing `needle`; returns it.
    pub fn wait_stderr(&mut self, needle: &str) -> String {
        let line = self
            .inner
            .wait_stderr(needle)
            .unwrap_or_else(|e| panic!("{e}"));
        self.sync();
        line
    }

    /// The peer's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Remaining stdout lines once the process has exited.
    pub fn rest_of_stdout(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(line) = self.inner.try_recv(Duration::from_millis(200)) {
            out.push(line);
        }
        out
    }

    /// Waits for the process to exit.
    pub fn wait(&mut self) -> ExitStatus {
        let status = self.inner.wait().unwrap_or_else(|e| panic!("{e}"));
        self.sync();
        status
    }
}

/// One TCP socket of this host, from /proc/net/tcp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpEntry {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: u8,
}

/// `st` values of /proc/net/tcp.
pub const TCP_ESTABLISHED: u8 = 0x01;
pub const TCP_LISTEN: u8 = 0x0A;

/// IPv4 TCP sockets of this network namespace.
pub fn tcp_sockets() -> Vec<TcpEntry> {
    let text = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            Some(TcpEntry {
                local: parse_v4(f.get(1)?)?,
                remote: parse_v4(f.get(2)?)?,
                state: u8::from_str_radix(f.get(3)?, 16).ok()?,
            })
        })
        .collect()
}

fn parse_v4(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let ip = u32::from_str_radix(ip, 16).ok()?;
    let port = u16::from_str_radix(port, 16).ok()?;
    // The kernel prints the network-order address bytes read as a native u32.
    let ip = Ipv4Addr::from(ip.to_ne_bytes());
    Some(SocketAddr::V4(SocketAddrV4::new(ip, port)))
}
