//! Test harness: an in-process rendezvous on loopback and real `peer` processes.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use punchline_rendezvous::Config;

/// How long a test waits for any one expected event.
pub const WAIT: Duration = Duration::from_secs(20);

/// A rendezvous served by a background runtime until dropped.
pub struct Rendezvous {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Rendezvous {
    pub fn start() -> Rendezvous {
        Self::with_config(Config::default())
    }

    pub fn with_config(config: Config) -> Rendezvous {
        let std_listener = TcpListener::bind("127.0.0.1:0").expect("bind rendezvous");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener).expect("listener");
                punchline_rendezvous::run(listener, config, async {
                    let _ = stopped.await;
                })
                .await
                .expect("rendezvous runs");
            });
        });
        Rendezvous {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Rendezvous {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A free loopback port (bound and released: nothing else here races for it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A running `peer` process; killed when dropped.
pub struct Peer {
    pub name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
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
        .arg(code)
        .env_remove("PUNCHLINE_SERVER");
    cmd
}

impl Peer {
    pub fn spawn(server: SocketAddr, name: &str, code: &str, extra: &[&str]) -> Peer {
        Self::spawn_command(peer_command(server, name, code, extra), name)
    }

    pub fn spawn_command(mut cmd: Command, name: &str) -> Peer {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn peer");
        let stdout = lines(child.stdout.take().expect("stdout"));
        let stderr = lines(child.stderr.take().expect("stderr"));
        Peer {
            name: name.to_owned(),
            stdin: child.stdin.take(),
            child,
            stdout,
            stderr,
            stderr_seen: Vec::new(),
        }
    }

    /// Writes lines to the peer's stdin.
    pub fn send(&mut self, text: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(text.as_bytes()).expect("write stdin");
        stdin.flush().expect("flush stdin");
    }

    /// Closes stdin (end of input).
    pub fn close_stdin(&mut self) {
        self.stdin.take();
    }

    /// The next stdout line.
    pub fn recv(&mut self) -> String {
        match self.stdout.recv_timeout(WAIT) {
            Ok(line) => line,
            Err(e) => {
                let seen = self.drain_stderr();
                panic!("{}: no stdout line ({e}); stderr: {seen:#?}", self.name)
            }
        }
    }

    /// Waits for a stderr line containing `needle`; returns it.
    pub fn wait_stderr(&mut self, needle: &str) -> String {
        if let Some(l) = self.stderr_seen.iter().find(|l| l.contains(needle)) {
            return l.clone();
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => {
                    self.stderr_seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "{}: no stderr line with {needle:?}; seen: {:#?}",
                    self.name, self.stderr_seen
                ),
            }
        }
    }

    /// Collects the stderr lines available now.
    pub fn drain_stderr(&mut self) -> Vec<String> {
        while let Ok(l) = self.stderr.try_recv() {
            self.stderr_seen.push(l);
        }
        self.stderr_seen.clone()
    }

    /// Waits for the process to exit.
    pub fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // Let the reader threads finish collecting output.
                thread::sleep(Duration::from_millis(50));
                self.drain_stderr();
                return status;
            }
            if Instant::now() >= deadline {
                let seen = self.drain_stderr();
                panic!("{} did not exit; stderr: {seen:#?}", self.name);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Remaining stdout lines once the process has exited.
    pub fn rest_of_stdout(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(l) = self.stdout.recv_timeout(Duration::from_millis(200)) {
            out.push(l);
        }
        out
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn lines(r: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            match line {
                Ok(l) => {
                    if tx.send(l).is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    });
    rx
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
