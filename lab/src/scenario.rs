//! Scenario runner: the real rendezvous and two real peers meeting through a lab.
//!
//! 1. The rendezvous runs in this process, in the lab's rendezvous namespace (its
//!    listening socket is created there), with the same server code the
//!    `rendezvous` binary runs ([`LabRendezvous`]).
//! 2. Each peer is the real `peer` binary, started in its host's namespace with
//!    piped stdin and stdout ([`PeerProcess`]), chatting in line mode.
//! 3. [`punch`] starts peer A, waits until it waits, starts peer B, and collects
//!    both outcomes: the status lines, the winning addresses, and the punch time
//!    from the pairing at the rendezvous to the later of the two link-ups.
//! 4. [`Connected::verify_direct`] proves the path is direct: each peer's kernel
//!    socket is connected to the other's public (or LAN) address, and the RTT
//!    measured by chatting over the link matches the emulated A-B path, not the
//!    path through the rendezvous.
//!
//! The punch time needs the instant of pairing, which only the rendezvous knows:
//! [`install_pair_clock`] installs a tracing layer that records the wall-clock
//! time of each "pair made" event by nameplate. The peers log the go with a wall-clock
//! timestamp and print the time from the go to the established connection; both
//! clocks are this machine's. The punch ends when TCP is established; checking
//! that the link reaches the expected peer and agreeing on it take about one more
//! A-B round trip before the first chat line can be read.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use punchline_rendezvous::Config;

use crate::error::{LabError, Result};
use crate::topology::{Host, Lab};

/// Port the in-process rendezvous listens on inside its namespace.
pub const RV_PORT: u16 = 7425;

/// How long a scenario waits for any one expected event (a status line, a chat
/// line, an exit). Generous: the emulated paths are slow and CI machines busy.
pub const WAIT: Duration = Duration::from_secs(30);

/// How the peers and the rendezvous punch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Strategy {
    /// Short name for tables.
    pub name: &'static str,
    /// The rendezvous tells the nearer peer how much later the other gets its
    /// go (`Go::others_go_after_us`), so a reset SYN is tried again when the two
    /// cross.
    pub synchronised_go: bool,
    /// Fixed pause between attempts instead of the adaptive cadence.
    pub fixed_retry: Option<Duration>,
}

/// punchline's strategy: synchronised go, adaptive retry cadence.
pub const OURS: Strategy = Strategy {
    name: "punchline",
    synchronised_go: true,
    fixed_retry: None,
};

/// The naive baseline: both peers connect as soon as they learn the address,
/// retrying every 100 ms.
pub const NAIVE: Strategy = Strategy {
    name: "naive",
    synchronised_go: false,
    fixed_retry: Some(Duration::from_millis(100)),
};

/// The rendezvous server running in the lab's rendezvous namespace.
pub struct LabRendezvous {
    /// Where peers reach it.
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<Result<()>>>,
}

impl LabRendezvous {
    /// Starts serving on [`RV_PORT`] at the lab's rendezvous address.
    pub fn start(lab: &Lab, config: Config) -> Result<LabRendezvous> {
        Self::start_on(lab, RV_PORT, config)
    }

    /// Starts serving on `port` at the lab's rendezvous address, with its probe
    /// port on `port + 1` and its alternate port on `port + 2`. In a lab with
    /// IPv6, on both of the host's addresses (one dual-stack socket per port,
    /// as the `rendezvous` binary listens by default).
    pub fn start_on(lab: &Lab, port: u16, config: Config) -> Result<LabRendezvous> {
        let addr = SocketAddr::new(IpAddr::V4(lab.addr(Host::Rv)), port);
        let dual = lab.addr6(Host::Rv).is_some();
        let on = |port: u16| {
            if dual {
                SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port))
            } else {
                SocketAddr::new(addr.ip(), port)
            }
        };
        let probe_addr = on(port + punchline_rendezvous::PROBE_PORT_OFFSET);
        let bind = |a: SocketAddr| -> Result<std::net::TcpListener> {
            let l = lab
                .run_in(Host::Rv, || listen(a))?
                .map_err(|source| LabError::Io {
                    what: format!("binding the rendezvous to {a}"),
                    source,
                })?;
            l.set_nonblocking(true).map_err(|source| LabError::Io {
                what: "making the rendezvous socket non-blocking".into(),
                source,
            })?;
            Ok(l)
        };
        let alternate_addr = on(port + punchline_rendezvous::ALTERNATE_PORT_OFFSET);
        let listeners = vec![bind(on(port))?, bind(alternate_addr)?];
        let probe = bind(probe_addr)?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        // The server's runtime lives in the rendezvous namespace too, so the
        // connections it opens itself (dial-backs) start there, like its listeners.
        let thread = crate::netns::spawn_in(lab.netns(Host::Rv), "rendezvous", move || {
            serve_rendezvous(listeners, probe, config, stopped)
        })?;
        Ok(LabRendezvous {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The rendezvous by its name in the lab's hosts files
    /// ([`crate::topology::RV_NAME`], both of its addresses when the lab has
    /// IPv6) and its port: what a peer is given to meet it as over DNS.
    pub fn by_name(&self) -> String {
        format!("{}:{}", crate::topology::RV_NAME, self.addr.port())
    }
}

/// A listening socket on `addr`; on the IPv6 unspecified address, for IPv4
/// too (not IPv6 only).
fn listen(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Runs the rendezvous (main and alternate ports, and the probe port) on its
/// own runtime until `stopped`.
pub fn serve_rendezvous(
    listeners: Vec<std::net::TcpListener>,
    probe: std::net::TcpListener,
    config: Config,
    stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "no runtime for the rendezvous");
            return;
        }
    };
    runtime.block_on(async move {
        let listeners = listeners
            .into_iter()
            .map(tokio::net::TcpListener::from_std)
            .collect::<std::io::Result<Vec<_>>>();
        let (listeners, probe) = match (listeners, tokio::net::TcpListener::from_std(probe)) {
            (Ok(l), Ok(p)) => (l, p),
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(error = %e, "rendezvous listeners");
                return;
            }
        };
        let probe = tokio::spawn(punchline_rendezvous::run_probe(
            probe,
            config.metrics.clone(),
            config.probes.clone(),
            std::future::pending(),
        ));
        let shutdown = async {
            let _ = stopped.await;
        };
        if let Err(e) = punchline_rendezvous::run_on(listeners, config, shutdown).await {
            tracing::error!(error = %e, "rendezvous stopped");
        }
        probe.abort();
    });
}

impl Drop for LabRendezvous {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A running `peer` (or any line-oriented program): piped stdin, stdout and
/// stderr read by threads; killed when dropped.
pub struct PeerProcess {
    /// Name for messages.
    pub name: String,
    /// Just before the process was spawned.
    pub started: Instant,
    /// The same instant on the wall clock (to compare with the peer's log).
    pub started_wall: SystemTime,
    child: Child,
    stdin: Option<ChildStdin>,
    /// Stdout lines with the instant the reader thread read each.
    stdout: mpsc::Receiver<(Instant, String)>,
    stderr: mpsc::Receiver<String>,
    /// Every stderr line seen so far.
    pub stderr_seen: Vec<String>,
}

impl PeerProcess {
    /// Spawns `cmd` with piped standard streams.
    pub fn spawn(mut cmd: Command, name: &str) -> Result<PeerProcess> {
        let (started, started_wall) = (Instant::now(), SystemTime::now());
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| LabError::Spawn {
                command: format!("{name}: {cmd:?}"),
                source,
            })?;
        let stdout = child
            .stdout
            .take()
            .map(timed_lines)
            .ok_or_else(|| no_pipe(name))?;
        let stderr = child
            .stderr
            .take()
            .map(lines)
            .ok_or_else(|| no_pipe(name))?;
        Ok(PeerProcess {
            name: name.to_owned(),
            started,
            started_wall,
            stdin: child.stdin.take(),
            child,
            stdout,
            stderr,
            stderr_seen: Vec::new(),
        })
    }

    /// Writes `text` to stdin.
    pub fn send(&mut self, text: &str) -> Result<()> {
        let Some(stdin) = self.stdin.as_mut() else {
            return Err(self.failure("stdin already closed"));
        };
        stdin
            .write_all(text.as_bytes())
            .and_then(|()| stdin.flush())
            .map_err(|source| LabError::Io {
                what: format!("writing to {}", self.name),
                source,
            })
    }

    /// Closes stdin: end of input.
    pub fn close_stdin(&mut self) {
        self.stdin.take();
    }

    /// The next stdout line, waiting up to [`WAIT`].
    pub fn recv(&mut self) -> Result<String> {
        match self.stdout.recv_timeout(WAIT) {
            Ok((_, line)) => Ok(line),
            Err(_) => Err(self.failure("no line on stdout")),
        }
    }

    /// The next stdout line if one comes within `wait`.
    pub fn try_recv(&mut self, wait: Duration) -> Option<String> {
        self.stdout.recv_timeout(wait).ok().map(|(_, line)| line)
    }

    /// Waits until `deadline` for a stdout line equal to `want`, skipping
    /// others; returns the instant it was read (its reader thread's clock, so
    /// not delayed by the caller waiting on something else meanwhile).
    pub fn wait_line_until(&mut self, want: &str, deadline: Instant) -> Option<Instant> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok((at, line)) if line == want => return Some(at),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    /// Sends the process SIGINT (what Ctrl-C in its terminal would).
    pub fn interrupt(&mut self) -> Result<()> {
        let pid = i32::try_from(self.child.id())
            .map_err(|_| LabError::Scenario(format!("{}: pid out of range", self.name)))?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGINT,
        )
        .map_err(|e| LabError::Scenario(format!("{}: SIGINT: {e}", self.name)))
    }

    /// Kills the process, waits for it and collects its last stderr lines.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        let _ = self.child.kill();
        self.wait()
    }

    /// Waits for a stderr line containing `needle`; returns it.
    pub fn wait_stderr(&mut self, needle: &str) -> Result<String> {
        self.wait_stderr_matching(&format!("a line with {needle:?}"), |l| l.contains(needle))
    }

    /// Waits for a stderr line starting with any of `prefixes` (status lines, not
    /// log lines that merely mention the words); returns it.
    pub fn wait_stderr_starting(&mut self, prefixes: &[&str]) -> Result<String> {
        self.wait_stderr_matching(&format!("a line starting with one of {prefixes:?}"), |l| {
            prefixes.iter().any(|p| l.starts_with(p))
        })
    }

    fn wait_stderr_matching(&mut self, what: &str, want: impl Fn(&str) -> bool) -> Result<String> {
        if let Some(l) = self.stderr_seen.iter().find(|l| want(l)) {
            return Ok(l.clone());
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => {
                    self.stderr_seen.push(line.clone());
                    if want(&line) {
                        return Ok(line);
                    }
                }
                Err(_) => return Err(self.failure(&format!("no stderr line: wanted {what}"))),
            }
        }
    }

    /// Collects the stderr lines available now; returns all seen so far.
    pub fn drain_stderr(&mut self) -> &[String] {
        while let Ok(l) = self.stderr.try_recv() {
            self.stderr_seen.push(l);
        }
        &self.stderr_seen
    }

    /// Waits up to [`WAIT`] for the process to exit.
    pub fn wait(&mut self) -> Result<ExitStatus> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().map_err(|source| LabError::Io {
                what: format!("waiting for {}", self.name),
                source,
            })? {
                // Let the reader threads pass on the last lines.
                thread::sleep(Duration::from_millis(50));
                self.drain_stderr();
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(self.failure("did not exit"));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// An error naming this process, with the stderr seen so far.
    pub fn failure(&mut self, what: &str) -> LabError {
        let name = self.name.clone();
        let seen = self.drain_stderr().join("\n  ");
        LabError::Scenario(format!("{name}: {what}; its stderr:\n  {seen}"))
    }
}

impl Drop for PeerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn no_pipe(name: &str) -> LabError {
    LabError::Scenario(format!("{name}: standard stream not piped"))
}

/// Like [`lines`], each line with the instant it was read.
fn timed_lines(r: impl std::io::Read + Send + 'static) -> mpsc::Receiver<(Instant, String)> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { return };
            if tx.send((Instant::now(), line)).is_err() {
                return;
            }
        }
    });
    rx
}

fn lines(r: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Wall-clock instants of "pair made" events by nameplate (see the module docs).
static PAIR_TIMES: OnceLock<Mutex<HashMap<String, SystemTime>>> = OnceLock::new();

/// Installs the global tracing subscriber that records pairing instants (plus
/// warnings and errors to stderr). Returns false if another subscriber was already
/// installed, in which case punch times are not available.
pub fn install_pair_clock() -> bool {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    PAIR_TIMES.get_or_init(Default::default);
    tracing_subscriber::registry()
        .with(PairClock)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(tracing_subscriber::filter::LevelFilter::WARN),
        )
        .try_init()
        .is_ok()
}

use tracing_subscriber::Layer as _;

struct PairClock;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for PairClock {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if !event
            .metadata()
            .target()
            .starts_with("punchline_rendezvous")
        {
            return;
        }
        let now = SystemTime::now();
        let mut fields = Fields::default();
        event.record(&mut fields);
        if fields.message.as_deref() == Some("pair made") {
            if let (Some(nameplate), Some(times)) = (fields.nameplate, PAIR_TIMES.get()) {
                times
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(nameplate, now);
            }
        }
    }
}

#[derive(Default)]
struct Fields {
    message: Option<String>,
    nameplate: Option<String>,
}

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => self.message = Some(format!("{value:?}")),
            "nameplate" => self.nameplate = Some(format!("{value:?}")),
            _ => {}
        }
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        match field.name() {
            "message" => self.message = Some(value.to_owned()),
            "nameplate" => self.nameplate = Some(value.to_owned()),
            _ => {}
        }
    }
}

fn pair_time(nameplate: &str) -> Option<SystemTime> {
    PAIR_TIMES
        .get()?
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(nameplate)
        .copied()
}

/// The `peer` binary next to the running executable (as `cargo build` places
/// the workspace's binaries), or `explicit` when given.
pub fn peer_binary(explicit: Option<PathBuf>) -> Result<PathBuf> {
    workspace_binary("peer", explicit)
}

/// The workspace's binary `name` next to the running executable, or `explicit`
/// when given.
pub fn workspace_binary(name: &str, explicit: Option<PathBuf>) -> Result<PathBuf> {
    let path = match explicit {
        Some(p) => p,
        None => std::env::current_exe()
            .map_err(|source| LabError::Io {
                what: "locating this executable".into(),
                source,
            })?
            .parent()
            .map(|dir| dir.join(name))
            .ok_or_else(|| LabError::Scenario("executable has no directory".into()))?,
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(LabError::Scenario(format!(
            "no {name} binary at {}: build the workspace first (cargo build --release)",
            path.display()
        )))
    }
}

/// One side's view of a successful punch.
#[derive(Debug, Clone)]
pub struct LinkUp {
    /// The status line.
    pub status: String,
    /// The other peer's address on the link, from the status line.
    pub remote: SocketAddr,
    /// "public address" or "LAN address".
    pub candidate: String,
    /// Connection attempts this peer made.
    pub attempts: u32,
    /// Wall-clock instant the TCP connection was established, from the peer's
    /// log (the go's timestamp plus the time after go of the status line).
    pub at: Option<SystemTime>,
    /// Wall-clock instant the link was checked and the encryption handshake done
    /// (the peer's "encrypted" log line).
    pub secured_at: Option<SystemTime>,
}

/// Two peers with a direct link, still chatting.
pub struct Connected {
    /// Peer A ("alice").
    pub a: PeerProcess,
    /// Peer B ("bob").
    pub b: PeerProcess,
    /// A's view.
    pub a_up: LinkUp,
    /// B's view.
    pub b_up: LinkUp,
    /// From pairing to the later link-up, if the pairing instant is known.
    pub punch_time: Option<Duration>,
    /// From the later link-up to the later end of the encryption handshake.
    pub secure_time: Option<Duration>,
    /// A's fixed port.
    pub port_a: u16,
    /// B's fixed port.
    pub port_b: u16,
}

/// Two peers that gave up.
pub struct Failed {
    /// Peer A's error output.
    pub a_error: String,
    /// Peer B's error output.
    pub b_error: String,
    /// A's exit status.
    pub a_status: ExitStatus,
    /// B's exit status.
    pub b_status: ExitStatus,
}

/// What a punch came to.
pub enum Outcome {
    /// Both peers report the direct link.
    Connected(Box<Connected>),
    /// Both peers failed.
    Failed(Box<Failed>),
}

/// Settings of one punch.
#[derive(Debug, Clone)]
pub struct PunchSpec {
    /// The code (unique per run).
    pub code: String,
    /// A's fixed port.
    pub port_a: u16,
    /// B's fixed port.
    pub port_b: u16,
    /// How they punch.
    pub strategy: Strategy,
    /// The peers' punch deadline.
    pub punch_timeout: Duration,
    /// More arguments for both peers.
    pub extra_args: Vec<String>,
}

/// The command running the `peer` binary `bin` in `host` as `name`, from
/// `port`, with the code and settings of `spec`.
pub fn peer_command(
    lab: &Lab,
    host: Host,
    bin: &Path,
    rv: SocketAddr,
    name: &str,
    port: u16,
    spec: &PunchSpec,
) -> Command {
    let mut cmd = lab.command(host, bin);
    // With IPv6, by the name that resolves to both of the rendezvous'
    // addresses, as a real deployment's would.
    let server = if lab.ipv6().enabled() {
        format!("{}:{}", crate::topology::RV_NAME, rv.port())
    } else {
        rv.to_string()
    };
    let mut args: Vec<OsString> = vec![
        "--server".into(),
        server.into(),
        "--port".into(),
        port.to_string().into(),
        "--name".into(),
        name.into(),
        "--punch-timeout".into(),
        spec.punch_timeout.as_secs().max(1).to_string().into(),
    ];
    if let Some(pause) = spec.strategy.fixed_retry {
        args.push("--naive-retry-ms".into());
        args.push(pause.as_millis().to_string().into());
    }
    args.extend(spec.extra_args.iter().map(OsString::from));
    args.push(spec.code.clone().into());
    cmd.args(args)
        .env(
            "RUST_LOG",
            std::env::var("PUNCHLINE_PEER_LOG").unwrap_or_else(|_| "punchline_peer=info".into()),
        )
        .env_remove("PUNCHLINE_SERVER");
    cmd
}

/// A ends its input (its goodbye); both must then exit successfully.
pub fn leave(a: &mut PeerProcess, b: &mut PeerProcess) -> Result<()> {
    a.close_stdin();
    let sa = a.wait()?;
    let sb = b.wait()?;
    if sa.success() && sb.success() {
        Ok(())
    } else {
        let (err_a, err_b) = (a.drain_stderr().to_vec(), b.drain_stderr().to_vec());
        Err(LabError::Scenario(format!(
            "exit statuses: {} {sa}, {} {sb}\n{}: {err_a:?}\n{}: {err_b:?}",
            a.name, b.name, a.name, b.name
        )))
    }
}

/// Starts A ("alice"), waits until it waits for the other side, then starts B
/// ("bob"); returns both, their outcome still to come.
pub fn start_pair(
    lab: &Lab,
    rv: &LabRendezvous,
    bin: &Path,
    spec: &PunchSpec,
) -> Result<(PeerProcess, PeerProcess)> {
    let mut a = PeerProcess::spawn(
        peer_command(lab, Host::A, bin, rv.addr, "alice", spec.port_a, spec),
        "alice",
    )?;
    a.wait_stderr("waiting for the other side")?;
    let b = PeerProcess::spawn(
        peer_command(lab, Host::B, bin, rv.addr, "bob", spec.port_b, spec),
        "bob",
    )?;
    Ok((a, b))
}

/// Starts A, waits until it waits for the other side, starts B, and returns when
/// both report the link or both gave up.
pub fn punch(lab: &Lab, rv: &LabRendezvous, bin: &Path, spec: &PunchSpec) -> Result<Outcome> {
    let (mut a, mut b) = start_pair(lab, rv, bin, spec)?;
    let ends = ["connected to ", "peer: "];
    let a_line = a.wait_stderr_starting(&ends)?;
    let b_line = b.wait_stderr_starting(&ends)?;
    if a_line.starts_with("connected to") && b_line.starts_with("connected to") {
        let a_up = link_up(&mut a, &a_line)?;
        let b_up = link_up(&mut b, &b_line)?;
        // The rendezvous knows (and logs) only the nameplate of the code.
        let nameplate = spec.code.split('-').next().unwrap_or_default();
        let punch_time = match (pair_time(nameplate), a_up.at, b_up.at) {
            (Some(paired), Some(ta), Some(tb)) => ta.max(tb).duration_since(paired).ok(),
            _ => None,
        };
        let secure_time = match (a_up.at, b_up.at, a_up.secured_at, b_up.secured_at) {
            (Some(ta), Some(tb), Some(sa), Some(sb)) => sa.max(sb).duration_since(ta.max(tb)).ok(),
            _ => None,
        };
        return Ok(Outcome::Connected(Box::new(Connected {
            a,
            b,
            a_up,
            b_up,
            punch_time,
            secure_time,
            port_a: spec.port_a,
            port_b: spec.port_b,
        })));
    }
    let a_status = a.wait()?;
    let b_status = b.wait()?;
    Ok(Outcome::Failed(Box::new(Failed {
        a_error: a.drain_stderr().join("\n"),
        b_error: b.drain_stderr().join("\n"),
        a_status,
        b_status,
    })))
}

/// The peer's log line of the go (with `punchline_peer=info`).
pub const GO_LOG: &str = "punchline_peer::meet: go ";

/// The peer's log line of the end of the encryption handshake.
pub const ENCRYPTED_LOG: &str = "punchline_peer::meet: encrypted";

/// The wall-clock timestamp at the start of a peer's log line.
pub fn log_time(line: &str) -> Option<SystemTime> {
    line.split_whitespace()
        .next()
        .and_then(|ts| humantime::parse_rfc3339(ts).ok())
}

/// The "N ms after go" of a status line.
pub fn after_go(status: &str) -> Option<Duration> {
    status
        .split(", ")
        .find_map(|part| part.strip_suffix(" ms after go"))
        .and_then(|n| n.trim().parse().ok())
        .map(Duration::from_millis)
}

/// Parses a status line "connected to NAME: direct link to ADDR (FAMILY,
/// KIND), N ms after go, M attempts" and finds the link-up instant in the peer's log.
fn link_up(p: &mut PeerProcess, status: &str) -> Result<LinkUp> {
    let bad = |what: &str| LabError::Scenario(format!("{what} in status line {status:?}"));
    let rest = status
        .split_once("direct link to ")
        .ok_or_else(|| bad("no address"))?
        .1;
    let (addr, rest) = rest
        .split_once(" (")
        .ok_or_else(|| bad("no candidate kind"))?;
    let remote: SocketAddr = addr.parse().map_err(|_| bad("bad address"))?;
    let (candidate, rest) = rest
        .split_once(')')
        .ok_or_else(|| bad("no candidate kind"))?;
    // "IPv4, public address": the family is in the address already.
    let candidate = candidate
        .split_once(", ")
        .map_or(candidate, |(_, kind)| kind);
    let attempts = rest
        .rsplit_once(", ")
        .and_then(|(_, a)| a.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| bad("no attempt count"))?;
    // The instant the TCP connection was established: the go's log timestamp
    // plus the status line's time after go.
    let elapsed = after_go(rest).ok_or_else(|| bad("no time after go"))?;
    let go = p.wait_stderr(GO_LOG)?;
    let at = log_time(&go).map(|t| t + elapsed);
    let secured = p.wait_stderr(ENCRYPTED_LOG)?;
    let secured_at = log_time(&secured);
    Ok(LinkUp {
        secured_at,
        status: status.to_owned(),
        remote,
        candidate: candidate.to_owned(),
        attempts,
        at,
    })
}

impl Connected {
    /// Proves the link is direct and returns the RTT measured over it: both kernels
    /// hold an established socket between the two addresses the peers name, and
    /// chatting round trips take the emulated A-B time, clearly less than the path
    /// through the rendezvous.
    pub fn verify_direct(&mut self, lab: &Lab) -> Result<Duration> {
        let expect_b = if lab.same_lan() {
            lab.addr(Host::B)
        } else {
            lab.public_addr(Host::B)
        };
        let expect_a = if lab.same_lan() {
            lab.addr(Host::A)
        } else {
            lab.public_addr(Host::A)
        };
        let want_kind = if lab.same_lan() {
            "LAN address"
        } else {
            "public address"
        };
        for (who, up, ip) in [
            ("alice", &self.a_up, expect_b),
            ("bob", &self.b_up, expect_a),
        ] {
            if up.remote.ip() != IpAddr::V4(ip) || up.candidate != want_kind {
                return Err(LabError::Scenario(format!(
                    "{who} linked to {} ({}), expected {ip} ({want_kind})",
                    up.remote, up.candidate
                )));
            }
        }
        established(lab, Host::A, self.port_a, self.a_up.remote)?;
        established(lab, Host::B, self.port_b, self.b_up.remote)?;

        let rtt = self.chat_rtt(3)?;
        let direct = lab.rtt(Host::A, Host::B);
        let via_rendezvous = lab.rtt(Host::A, Host::Rv) + lab.rtt(Host::Rv, Host::B);
        // Direct: within the emulated A-B RTT plus processing slack; and closer to
        // it than to the path through the rendezvous.
        let slack = Duration::from_millis(15) + direct / 5;
        if rtt > direct + slack || (via_rendezvous > direct && rtt >= (direct + via_rendezvous) / 2)
        {
            return Err(LabError::Scenario(format!(
                "chat RTT {rtt:?} does not match the direct path ({direct:?}); via the rendezvous it would be {via_rendezvous:?}"
            )));
        }
        if rtt + Duration::from_millis(2) < direct {
            return Err(LabError::Scenario(format!(
                "chat RTT {rtt:?} is shorter than the emulated path ({direct:?}): is the WAN emulator running?"
            )));
        }
        Ok(rtt)
    }

    /// The smallest of `rounds` chat round trips A → B → A.
    pub fn chat_rtt(&mut self, rounds: u32) -> Result<Duration> {
        let mut best = Duration::MAX;
        for i in 0..rounds {
            let start = Instant::now();
            self.a.send(&format!("rtt probe {i}\n"))?;
            expect_line(&mut self.b, &format!("alice: rtt probe {i}"))?;
            self.b.send(&format!("rtt echo {i}\n"))?;
            expect_line(&mut self.a, &format!("bob: rtt echo {i}"))?;
            best = best.min(start.elapsed());
        }
        Ok(best)
    }

    /// A leaves (end of input); both must exit successfully.
    pub fn finish(mut self) -> Result<()> {
        leave(&mut self.a, &mut self.b)
    }
}

/// Reads the next stdout line of `p` and checks it.
pub fn expect_line(p: &mut PeerProcess, want: &str) -> Result<()> {
    let got = p.recv()?;
    if got == want {
        Ok(())
    } else {
        Err(LabError::Scenario(format!(
            "{}: expected {want:?}, got {got:?}",
            p.name
        )))
    }
}

/// Checks with `ss` in `host`'s namespace that a socket from local `port` to
/// `remote` is established, and that nothing listens on `port`.
fn established(lab: &Lab, host: Host, port: u16, remote: SocketAddr) -> Result<()> {
    let out = lab
        .command(host, "ss")
        .args(["-Htan"])
        .output()
        .map_err(|source| LabError::Spawn {
            command: "ss -Htan".into(),
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let local_suffix = format!(":{port}");
    let mut found = false;
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 5 || !f[3].ends_with(&local_suffix) {
            continue;
        }
        if f[0] == "LISTEN" {
            return Err(LabError::Scenario(format!(
                "a socket listens on port {port}: {line}"
            )));
        }
        if f[0] == "ESTAB" && f[4] == remote.to_string() {
            found = true;
        }
    }
    if found {
        Ok(())
    } else {
        Err(LabError::Scenario(format!(
            "no established socket :{port} -> {remote} in {host:?}'s namespace:\n{text}"
        )))
    }
}
