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
        .env_remove("PUNCHLINE_SERVER")
        // The identity every chat introduces is made on first use: in the
        // tests' own directory, not the user's (a test may give another).
        .env(
            "XDG_CONFIG_HOME",
            std::env::temp_dir().join("punchline-test-config"),
        );
    cmd
}

/// A fresh, empty config directory (`XDG_CONFIG_HOME`) for one side of a
/// test, under the system's temporary directory.
pub fn fresh_config(tag: &str) -> std::path::PathBuf {
    let mut r = [0u8; 6];
    getrandom::fill(&mut r).expect("randomness");
    let hex: String = r.iter().map(|b| format!("{b:02x}")).collect();
    let dir = std::env::temp_dir().join(format!("punchline-test-{tag}-{hex}"));
    std::fs::create_dir_all(&dir).expect("config dir");
    dir
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

/// Whether the tests run as root (a capture needs it).
pub fn running_as_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Sends SIGINT with the `kill` command.
pub fn interrupt(pid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status();
}

/// A packet capture on loopback (`tcpdump`, as root).
pub struct Capture {
    child: std::process::Child,
    path: std::path::PathBuf,
}

impl Capture {
    /// Starts capturing what `filter` matches on `lo`; `None` (after saying
    /// so) when not root, which CI (`PUNCHLINE_REQUIRE_LAB`) does not allow.
    pub fn start(filter: &str) -> Option<Capture> {
        if !running_as_root() {
            assert!(
                std::env::var_os("PUNCHLINE_REQUIRE_LAB").is_none(),
                "capturing needs root"
            );
            eprintln!("SKIPPED: capture test needs root for tcpdump");
            return None;
        }
        let path = std::env::temp_dir().join(format!(
            "punchline-capture-{}-{}.pcap",
            std::process::id(),
            free_port()
        ));
        let mut child = std::process::Command::new("tcpdump")
            // Immediate mode: without it packets wait in the kernel ring
            // buffer and a short capture can end with none written.
            .args(["-i", "lo", "-U", "--immediate-mode", "-n", "-w"])
            .arg(&path)
            .arg(filter)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run tcpdump (apt-get install tcpdump)");
        // tcpdump says "listening on" once it captures.
        let mut err = std::io::BufReader::new(child.stderr.take().expect("stderr"));
        let mut first = String::new();
        std::io::BufRead::read_line(&mut err, &mut first).expect("tcpdump starts");
        assert!(first.contains("listening"), "{first}");
        Some(Capture { child, path })
    }

    /// Stops the capture; what it wrote.
    pub fn finish(mut self) -> Vec<u8> {
        std::thread::sleep(Duration::from_millis(300));
        // SIGINT: tcpdump flushes and exits.
        interrupt(self.child.id());
        let _ = self.child.wait();
        let captured = std::fs::read(&self.path).expect("read capture");
        let _ = std::fs::remove_file(&self.path);
        captured
    }
}

impl Drop for Capture {
    /// A test that fails mid-capture must not leave tcpdump running.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether `haystack` holds `needle`.
pub fn holds(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A `peer` in `host` of a NAT lab (A on port 40000, B on 40001) meeting with
/// code `5-TEST` through `rv` (by name when the lab has IPv6), with `extra`
/// arguments, a settings directory of its own, and its debug log on stderr.
pub fn lab_peer(
    lab: &punchline_lab::Lab,
    rv: &punchline_lab::scenario::LabRendezvous,
    test: &str,
    host: punchline_lab::Host,
    name: &str,
    extra: &[&str],
) -> PeerProcess {
    use punchline_lab::scenario::{peer_command, PunchSpec, OURS};
    let spec = PunchSpec {
        code: format!("5-{test}"),
        port_a: 40000,
        port_b: 40001,
        strategy: OURS,
        punch_timeout: Duration::from_secs(10),
        extra_args: extra.iter().map(|&a| a.to_owned()).collect(),
    };
    let port = if host == punchline_lab::Host::A {
        spec.port_a
    } else {
        spec.port_b
    };
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_peer"));
    let mut cmd = peer_command(lab, host, bin, rv.addr, name, port, &spec);
    cmd.env("RUST_LOG", "punchline_peer=debug")
        .env("XDG_CONFIG_HOME", fresh_config(&format!("{test}-{name}")));
    PeerProcess::spawn(cmd, name).unwrap_or_else(|e| panic!("{test}: {name}: {e}"))
}

/// `peer doctor --server SERVER --port 40000` run in host A of a NAT lab:
/// its exit status, its report (stdout) and its stderr.
pub fn lab_doctor(lab: &punchline_lab::Lab, server: &str) -> (ExitStatus, String, String) {
    let out = lab
        .command(
            punchline_lab::Host::A,
            std::path::Path::new(env!("CARGO_BIN_EXE_peer")),
        )
        .args(["doctor", "--server", server, "--port", "40000"])
        .output()
        .expect("run peer doctor");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
