//! The raw punch baseline: what common TCP hole-punching tools do, with nothing
//! more, so the bench can measure punchline against it in the same run.
//!
//! The rendezvous ([`serve`]):
//!
//! 1. accepts TCP connections and reads one name line from each;
//! 2. when two connections with the same name are present, sends each the
//!    other's observed (public) address as `IP:PORT\n`;
//! 3. keeps both connections open until their clients close them (so the NAT
//!    mappings of the clients' ports stay alive while they punch).
//!
//! The client ([`punch`]):
//!
//! 1. binds a fixed local port with `SO_REUSEADDR` and `SO_REUSEPORT` and
//!    connects from it to the rendezvous, sends its name and reads the other's
//!    public address;
//! 2. `listen()`s on the same port, and `connect()`s to the other from a fresh
//!    socket on that port every [`ATTEMPT_INTERVAL`] (or, when an attempt is
//!    left unanswered, as soon as it times out), until one connection,
//!    accepted or connected, is up;
//! 3. writes its one line, reads the first line from the other ([`RawLink`]).
//!
//! No encryption, no probe of the NAT, no LAN candidates, no check of who is at
//! the other end: at most one TCP connection can exist between the two fixed
//! ports, so both sides necessarily end up on the same one.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use socket2::{Domain, Protocol, Socket, Type};

/// Pause between the starts of two connection attempts (the common tools'
/// cadence).
pub const ATTEMPT_INTERVAL: Duration = Duration::from_millis(100);

/// How long one attempt may stay unanswered (the kernel retransmits its SYN
/// after 1 s) before it is closed and a fresh one made. Not
/// [`ATTEMPT_INTERVAL`]: a socket closed while halfway through a simultaneous
/// open (SYN_RECV) sends a FIN, which ends the connection the other side has
/// just seen established; with 3% loss that cut a run in four.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);

/// Longest name or address line either side accepts: a name is a short label,
/// an address at most `255.255.255.255:65535`.
pub const MAX_LINE: u64 = 256;

/// Longest chat line the client reads from the other side.
pub const MAX_CHAT_LINE: u64 = 8192;

/// How long the rendezvous waits for a client's name line.
pub const NAME_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the rendezvous keeps a paired connection open, at most, waiting for
/// its client to close it: far longer than any punch.
pub const HOLD_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a first client may wait at the rendezvous for the second before its
/// name is forgotten.
pub const WAIT_TIMEOUT: Duration = Duration::from_secs(120);

/// Connections the rendezvous serves at once (one thread each); more are closed
/// at once.
pub const MAX_CONNECTIONS: usize = 512;

/// How long the client waits for the other side's line after the link is up
/// (and after it has closed its side, for the other side's close).
pub const LINE_TIMEOUT: Duration = Duration::from_secs(10);

/// What can go wrong in the raw punch.
#[derive(Debug, thiserror::Error)]
pub enum RawError {
    /// A socket call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The system's error.
        source: io::Error,
    },
    /// The rendezvous sent something that is not an address.
    #[error("the rendezvous sent {0:?}, not an address")]
    BadAddress(String),
    /// The rendezvous or the other side closed before sending a line.
    #[error("{0} closed the connection before sending a line")]
    Closed(&'static str),
    /// No connection to the other side before the deadline.
    #[error("no connection to {peer} within {after:?} ({attempts} attempts)")]
    NoLink {
        /// The other's public address.
        peer: SocketAddr,
        /// The time spent trying.
        after: Duration,
        /// Connection attempts made.
        attempts: u32,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> RawError {
    let what = what.into();
    move |source| RawError::Io { what, source }
}

/// A TCP socket bound to `0.0.0.0:port` with `SO_REUSEADDR` and `SO_REUSEPORT`.
pub fn reusable_socket(port: u16) -> io::Result<Socket> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port).into())?;
    Ok(socket)
}

/// Reads one line of at most `max` bytes from `stream`, before `deadline`.
/// `Ok(None)` when the stream closes first.
fn read_line(
    reader: &mut BufReader<&TcpStream>,
    max: u64,
    deadline: Instant,
) -> io::Result<Option<String>> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::ErrorKind::TimedOut.into());
    }
    reader.get_ref().set_read_timeout(Some(left))?;
    let mut line = Vec::new();
    let n = reader.by_ref().take(max).read_until(b'\n', &mut line)?;
    if n == 0 || line.last() != Some(&b'\n') {
        return if n as u64 >= max {
            Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"))
        } else {
            Ok(None)
        };
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Some(String::from_utf8_lossy(&line).into_owned()))
}

/// A client waiting at the rendezvous for the other with its name.
struct Waiting {
    stream: TcpStream,
    observed: SocketAddr,
    since: Instant,
}

/// Serves the raw rendezvous on `listener` until accepting fails for good.
pub fn serve(listener: TcpListener) -> io::Result<()> {
    let waiting: Arc<Mutex<HashMap<String, Waiting>>> = Arc::default();
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let (stream, observed) = match listener.accept() {
            Ok(conn) => conn,
            // Transient: the other end gave up before the accept, or the
            // process is out of descriptors for a moment.
            Err(e) if e.raw_os_error() == Some(Errno::ECONNABORTED as i32) => continue,
            Err(e)
                if e.raw_os_error() == Some(Errno::EMFILE as i32)
                    || e.raw_os_error() == Some(Errno::ENFILE as i32) =>
            {
                tracing::warn!(error = %e, "raw rendezvous: out of descriptors");
                thread::sleep(Duration::from_millis(100));
                continue;
            }
            Err(e) => return Err(e),
        };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(%observed, "raw rendezvous: connection cap reached");
            continue;
        }
        let (waiting, active) = (waiting.clone(), active.clone());
        let spawned = thread::Builder::new().name("raw-rv".into()).spawn(move || {
            if let Err(e) = serve_one(stream, observed, &waiting) {
                tracing::debug!(%observed, error = %e, "raw rendezvous: client");
            }
            active.fetch_sub(1, Ordering::SeqCst);
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "raw rendezvous: no thread for a client");
        }
    }
}

/// One client: its name, then either waiting or pairing with the waiting one.
fn serve_one(
    stream: TcpStream,
    observed: SocketAddr,
    waiting: &Mutex<HashMap<String, Waiting>>,
) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let name = {
        let mut reader = BufReader::new(&stream);
        match read_line(&mut reader, MAX_LINE, Instant::now() + NAME_TIMEOUT)? {
            Some(name) if !name.is_empty() => name,
            _ => return Ok(()),
        }
    };
    let other = {
        let mut table = waiting.lock().unwrap_or_else(PoisonError::into_inner);
        table.retain(|_, w| w.since.elapsed() < WAIT_TIMEOUT);
        match table.remove(&name) {
            Some(other) => other,
            None => {
                let clone = stream.try_clone()?;
                table.insert(
                    name.clone(),
                    Waiting {
                        stream: clone,
                        observed,
                        since: Instant::now(),
                    },
                );
                drop(table);
                // Hold the connection until the client closes it (its pairing
                // is sent by the second client's thread, on the clone); a
                // client that leaves unpaired is forgotten at once.
                let held = hold(&stream);
                let mut table = waiting.lock().unwrap_or_else(PoisonError::into_inner);
                if table.get(&name).is_some_and(|w| w.observed == observed) {
                    table.remove(&name);
                }
                return held;
            }
        }
    };
    tracing::info!(a = %other.observed, b = %observed, "raw rendezvous: pair made");
    // Both at once, in one write each: neither side is favoured by more than
    // the time of one write.
    (&other.stream).write_all(format!("{observed}\n").as_bytes())?;
    (&stream).write_all(format!("{}\n", other.observed).as_bytes())?;
    drop(other);
    hold(&stream)
}

/// Reads and discards until the client closes, or [`HOLD_TIMEOUT`].
fn hold(stream: &TcpStream) -> io::Result<()> {
    stream.set_read_timeout(Some(HOLD_TIMEOUT))?;
    let mut sink = [0u8; 256];
    let mut s = stream;
    while s.read(&mut sink)? > 0 {}
    Ok(())
}

/// Settings of one client.
#[derive(Debug, Clone)]
pub struct ClientSpec {
    /// The raw rendezvous.
    pub server: SocketAddr,
    /// The fixed local port (0: one the OS picks, then kept).
    pub port: u16,
    /// The name both clients give.
    pub name: String,
    /// How long to try, from the start, before giving up.
    pub timeout: Duration,
}

/// A connection to the other side.
pub struct RawLink {
    stream: TcpStream,
    /// The other's public address.
    pub peer: SocketAddr,
    /// Whether the link came from `accept()` (else from `connect()`).
    pub accepted: bool,
    /// Connection attempts made.
    pub attempts: u32,
}

/// Steps 1 and 2 of the client (see the module docs): returns the link.
pub fn punch(spec: &ClientSpec) -> Result<RawLink, RawError> {
    let start = Instant::now();
    let deadline = start + spec.timeout;
    // 1. The rendezvous, from the fixed port.
    let socket =
        reusable_socket(spec.port).map_err(io_err(format!("binding port {}", spec.port)))?;
    let port = socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .map_or(spec.port, |a| a.port());
    socket
        .connect_timeout(&spec.server.into(), spec.timeout)
        .map_err(io_err(format!(
            "connecting to the rendezvous {}",
            spec.server
        )))?;
    let rv: TcpStream = socket.into();
    let _ = rv.set_nodelay(true);
    (&rv)
        .write_all(format!("{}\n", spec.name).as_bytes())
        .map_err(io_err("sending the name"))?;
    let line = read_line(&mut BufReader::new(&rv), MAX_LINE, deadline)
        .map_err(io_err("waiting for the other's address"))?
        .ok_or(RawError::Closed("the rendezvous"))?;
    let peer: SocketAddr = line
        .trim()
        .parse()
        .map_err(|_| RawError::BadAddress(line))?;
    tracing::debug!(%peer, "raw punch: address received");

    // 2. listen() and connect() on the same port, whichever comes first.
    let listener = reusable_socket(port)
        .and_then(|s| s.listen(16).map(|()| s))
        .map_err(io_err(format!("listening on port {port}")))?;
    let listener: TcpListener = listener.into();
    let (tx, rx) = mpsc::channel::<(TcpStream, bool)>();
    let done = Arc::new(AtomicBool::new(false));
    let attempts = Arc::new(AtomicUsize::new(0));
    {
        let tx = tx.clone();
        // Blocking accept: the thread ends with the process (or with the
        // first connection); the client is a short-lived program.
        thread::Builder::new()
            .name("raw-accept".into())
            .spawn(move || {
                if let Ok((stream, from)) = listener.accept() {
                    tracing::debug!(%from, "raw punch: accepted");
                    let _ = tx.send((stream, true));
                }
            })
            .map_err(io_err("starting the accept thread"))?;
    }
    {
        let (done, attempts) = (done.clone(), attempts.clone());
        thread::Builder::new()
            .name("raw-connect".into())
            .spawn(move || connect_loop(port, peer, deadline, &done, &attempts, &tx))
            .map_err(io_err("starting the connect thread"))?;
    }
    let left = deadline.saturating_duration_since(Instant::now());
    let got = rx.recv_timeout(left);
    done.store(true, Ordering::SeqCst);
    let attempts = u32::try_from(attempts.load(Ordering::SeqCst)).unwrap_or(u32::MAX);
    // The rendezvous connection is no longer needed once the link is up.
    drop(rv);
    match got {
        Ok((stream, accepted)) => {
            let _ = stream.set_nodelay(true);
            Ok(RawLink {
                stream,
                peer,
                accepted,
                attempts,
            })
        }
        Err(_) => Err(RawError::NoLink {
            peer,
            after: start.elapsed(),
            attempts,
        }),
    }
}

/// Connects to `peer` from `port` with a fresh socket every
/// [`ATTEMPT_INTERVAL`], one attempt at a time (a second socket on the same
/// 4-tuple could not connect while the first waits), until `done` or
/// `deadline`; sends the first connection on `tx`.
fn connect_loop(
    port: u16,
    peer: SocketAddr,
    deadline: Instant,
    done: &AtomicBool,
    attempts: &AtomicUsize,
    tx: &mpsc::Sender<(TcpStream, bool)>,
) {
    while !done.load(Ordering::SeqCst) && Instant::now() < deadline {
        let started = Instant::now();
        attempts.fetch_add(1, Ordering::SeqCst);
        let result = reusable_socket(port).and_then(|s| {
            let left = deadline.saturating_duration_since(Instant::now());
            s.connect_timeout(
                &peer.into(),
                ATTEMPT_TIMEOUT.min(left).max(Duration::from_millis(1)),
            )
            .map(|()| s)
        });
        match result {
            Ok(s) => {
                let _ = tx.send((s.into(), false));
                return;
            }
            // Refused (the other NAT reset it), silence (timed out), or the
            // 4-tuple taken by a connection the listener just accepted: try
            // again on the cadence.
            Err(e) => tracing::debug!(error = %e, "raw punch: attempt failed"),
        }
        thread::sleep(ATTEMPT_INTERVAL.saturating_sub(started.elapsed()));
    }
}

impl RawLink {
    /// Step 3: sends `line`, then returns the first line from the other side.
    pub fn exchange(&self, line: &str) -> Result<String, RawError> {
        (&self.stream)
            .write_all(format!("{line}\n").as_bytes())
            .map_err(io_err("sending the line"))?;
        read_line(
            &mut BufReader::new(&self.stream),
            MAX_CHAT_LINE,
            Instant::now() + LINE_TIMEOUT,
        )
        .map_err(io_err("reading the other's line"))?
        .ok_or(RawError::Closed("the other side"))
    }

    /// Closes the link cleanly: shuts down sending and waits (bounded) for the
    /// other side to close too, so that no reset can cut off a line still on its
    /// way.
    pub fn close(self) {
        let _ = self.stream.shutdown(Shutdown::Write);
        let _ = self.stream.set_read_timeout(Some(LINE_TIMEOUT));
        let mut sink = [0u8; 256];
        let mut s = &self.stream;
        while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two clients on loopback: the rendezvous pairs them by name, and each
    /// gets the other's line (one link, accepted on one side or connected on
    /// both by simultaneous open).
    #[test]
    fn two_clients_meet_on_loopback() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let server = listener.local_addr().expect("addr");
        thread::spawn(move || serve(listener));
        let port_of = || {
            TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("free port")
                .port()
        };
        let clients: Vec<_> = ["from a", "from b"]
            .into_iter()
            .map(|line| {
                let spec = ClientSpec {
                    server,
                    port: port_of(),
                    name: "loopback".into(),
                    timeout: Duration::from_secs(10),
                };
                thread::spawn(move || {
                    let link = punch(&spec)?;
                    let got = link.exchange(line);
                    link.close();
                    got
                })
            })
            .collect();
        let got: Vec<String> = clients
            .into_iter()
            .map(|c| c.join().expect("client thread").expect("client"))
            .collect();
        assert_eq!(got, ["from b", "from a"]);
    }

    #[test]
    fn long_lines_are_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let writer = thread::spawn(move || {
            let mut s = TcpStream::connect(addr).expect("connect");
            s.write_all(&[b'x'; 1000]).expect("write");
        });
        let (stream, _) = listener.accept().expect("accept");
        let mut reader = BufReader::new(&stream);
        let got = read_line(
            &mut reader,
            MAX_LINE,
            Instant::now() + Duration::from_secs(5),
        );
        assert!(got.is_err(), "{got:?}");
        writer.join().expect("writer");
    }
}
