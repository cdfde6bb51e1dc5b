//! The rendezvous server: accept loop, per-connection task, pairing.
//!
//! One connection, step by step:
//! 1. The peer sends [`Hello`] within [`Config::hello_timeout`]. A wrong version, a
//!    malformed frame or a bad field gets an error message and the connection ends.
//! 2. The peer joins the pairing table ([`Rooms`]) under its code, and is answered
//!    [`ServerToPeer::Welcome`] with its observed address.
//!    - First of the code: it waits, answering pings (RTT samples, and traffic that
//!      keeps its NAT mapping alive) until the second peer arrives or the wait
//!      expires.
//!    - Second: the pair is made. The joining task computes both go delays
//!      ([`go_delays`]) and hands the waiting task its go through a channel.
//!    - Third: "code already in use" instead of the welcome.
//! 3. Each task holds its go back by its delay, sends it, then keeps the connection
//!    open while the peers punch (their NAT mappings depend on it), until the peer
//!    reports the outcome or leaves.
//!
//! Every connection, new code and relay counts against its source, per address
//! (an IPv4 address, an IPv6 /64) and per network (an IPv4 /24, an IPv6 /48,
//! with [`Config::network_multiple`] times the limits): see
//! [`punchline_proto::limits`]. Nameplates for new codes are drawn at random.
//!
//! An error on one connection is logged and ends that connection only.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use punchline_proto::limits::{Concurrent, Pace, PerScope, Rate, RateLimit, Refused};
use punchline_proto::pairing::{ConnId, Join, Rooms};
use punchline_proto::timing::{go_delays, RttEstimator};
use punchline_proto::{
    classify_mapping, validate_hello, CodecError, ErrorCode, FrameCodec, Go, Hello, PeerInfo,
    PeerToServer, PunchOutcome, ResumeRoom, Role, ServerToPeer, SessionToken, PROTOCOL_VERSION,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::{sleep, sleep_until, timeout, timeout_at, Instant};
use tokio_util::codec::Framed;
use tracing::{debug, info, warn};

use crate::metrics::{Metrics, Reject};
use punchline_net::kernel_rtt;

/// Port the rendezvous listens on by default (TCP, all interfaces).
pub use punchline_proto::defaults::DEFAULT_PORT;

/// The probe port is the main port plus this, unless configured otherwise.
pub use punchline_proto::defaults::PROBE_PORT_OFFSET;

/// Default time a first peer waits for the second one. Long enough for a user to
/// read a code to a friend over the phone, who then installs and starts the tool.
pub const DEFAULT_WAIT_TTL: Duration = Duration::from_secs(10 * 60);

/// Default time a new connection has to send its hello. A real peer sends it at
/// once; this only bounds connections that never speak.
pub const DEFAULT_HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Default cap on simultaneous connections. Each costs a task and two small
/// buffers; the cap keeps memory bounded under a flood of connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

/// Default cap on pairs relayed at once. A relayed chat costs two connections,
/// two small queues and the bytes it sends; the cap bounds the bandwidth a
/// flood of failed punches can claim.
pub const DEFAULT_MAX_RELAYS: usize = 200;

/// Default allowance of relayed bytes per pair: about 100,000 chat lines.
pub const DEFAULT_RELAY_BYTES: u64 = 16 * 1024 * 1024;

/// Default pace of a relayed pair, bytes a second: about 500 chat lines a second,
/// after a burst of four seconds' worth. With [`DEFAULT_MAX_RELAYS`] pairs that
/// bounds what relaying can take to about 25 MiB/s.
pub const DEFAULT_RELAY_RATE: u64 = 128 * 1024;

/// Default cap on rooms (codes waiting or in use).
pub const DEFAULT_MAX_ROOMS: usize = 10_000;

/// Default cap on open connections from one address (an IPv4 address or an
/// IPv6 /64). Generous: many users can share one address behind a carrier NAT,
/// and each needs one connection while it waits; a single host needs two for the
/// few seconds of a meeting.
pub const DEFAULT_CONNECTIONS_PER_ADDRESS: u32 = 64;

/// Default rate of new connections from one address, per minute (after a burst
/// of [`CONNECTION_BURST`]).
pub const DEFAULT_CONNECTIONS_PER_MINUTE: u32 = 120;

/// New connections one address may open at once before the rate applies.
pub const CONNECTION_BURST: u32 = 30;

/// Default rate of new codes (nameplates allocated, rooms opened) from one
/// address, per minute (after a burst of [`CODE_BURST`]).
pub const DEFAULT_CODES_PER_MINUTE: u32 = 30;

/// New codes one address may open at once before the rate applies.
pub const CODE_BURST: u32 = 10;

/// Default multiple of the per-address limits that applies to a whole network
/// (an IPv4 /24, an IPv6 /48): open connections, relayed connections, new
/// connections and new codes a minute, and their bursts. Four: a /24 can be a
/// carrier NAT's pool or a campus with many users, but a host that holds many
/// addresses of one network (or a whole IPv6 /48) gets four addresses' worth,
/// not one per address it can bind: with the defaults 256 open connections, 2.5%
/// of the server's connections and codes.
pub const DEFAULT_NETWORK_MULTIPLE: u32 = 4;

/// Default cap on relayed connections from one address (each end of a relayed
/// pair is one, counted at its own address): enough for a few chats at once
/// behind one carrier-NAT address, while one address holds at most 2% of the
/// [`DEFAULT_MAX_RELAYS`] pairs' connections.
pub const DEFAULT_RELAYS_PER_ADDRESS: u32 = 8;

/// Default lifetime of a relay. A relayed chat resumes on its own over a new
/// link when its relay ends (and tries for a direct one), so a lifetime costs
/// honest peers one reconnection an hour, while nobody can hold a relay slot
/// forever by trickling a byte a minute.
pub const DEFAULT_RELAY_LIFETIME: Duration = Duration::from_secs(60 * 60);

/// Most addresses (and, apart, networks) each per-source table tracks; beyond it
/// new ones are refused until entries age out (only under a flood from that many
/// addresses).
pub const MAX_TRACKED_ADDRESSES: usize = 100_000;

/// How long a paired room stays reserved (a third peer gets "in use") if its peers
/// never leave. They normally leave within the punch deadline.
pub const PAIRED_HOLD: Duration = Duration::from_secs(60);

/// How long the server keeps a paired connection open for the peer's punch report.
pub use punchline_proto::defaults::REPORT_TIMEOUT;

/// Pings sent quickly after the hello, to get a few RTT samples early.
const EARLY_PINGS: u32 = 3;
/// Spacing of the early pings.
const EARLY_PING_INTERVAL: Duration = Duration::from_millis(200);
/// Spacing of later pings while waiting.
use punchline_proto::defaults::SERVER_PING_INTERVAL as PING_INTERVAL;

/// Default time a waiting peer may leave our pings unanswered before it is taken
/// for gone (its host or NAT mapping died without a reset) and dropped, freeing
/// its code: as long as a peer waits through the server's silence.
pub const DEFAULT_IDLE_TIMEOUT: Duration = punchline_proto::defaults::WAIT_SILENCE_TIMEOUT;

/// Bound on any single write to a peer: a peer that stops reading is dropped.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the pairing table is swept for expired rooms.
const SWEEP_INTERVAL: Duration = Duration::from_millis(500);

/// Time connections get to say goodbye when the server shuts down.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// Server settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// How long a first peer waits for the second.
    pub wait_ttl: Duration,
    /// How long a new connection has to send its hello.
    pub hello_timeout: Duration,
    /// How long a waiting peer may leave pings unanswered.
    pub idle_timeout: Duration,
    /// Most simultaneous connections; more are told the server is busy.
    pub max_connections: usize,
    /// Most rooms (codes) at once.
    pub max_rooms: usize,
    /// Hold the go back for the nearer peer so both receive it together. Off only
    /// for the benchmark baseline, which sends it to both at once.
    pub synchronise_go: bool,
    /// Most open connections from one address (an IPv4 address, an IPv6 /64).
    pub connections_per_address: u32,
    /// New connections per minute from one address.
    pub connections_per_minute: u32,
    /// New codes per minute from one address.
    pub codes_per_minute: u32,
    /// The per-address limits (connections, relays, rates) times this apply to
    /// a whole network: an IPv4 /24, an IPv6 /48.
    pub network_multiple: u32,
    /// Where the server counts what it does (stats line, metrics endpoint).
    pub metrics: Arc<Metrics>,
    /// Relay the traffic of pairs whose punch failed.
    pub relay: bool,
    /// Most pairs relayed at once.
    pub max_relays: usize,
    /// Most bytes relayed for one pair (both directions together).
    pub relay_bytes: u64,
    /// Bytes a second relayed for one pair (both directions together).
    pub relay_rate: u64,
    /// Most relayed connections from one address (each end of a pair is one).
    pub relays_per_address: u32,
    /// How long one relay may last; the peers then reconnect over a new link.
    pub relay_lifetime: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            wait_ttl: DEFAULT_WAIT_TTL,
            hello_timeout: DEFAULT_HELLO_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_rooms: DEFAULT_MAX_ROOMS,
            synchronise_go: true,
            connections_per_address: DEFAULT_CONNECTIONS_PER_ADDRESS,
            connections_per_minute: DEFAULT_CONNECTIONS_PER_MINUTE,
            codes_per_minute: DEFAULT_CODES_PER_MINUTE,
            network_multiple: DEFAULT_NETWORK_MULTIPLE,
            metrics: Arc::default(),
            relay: true,
            max_relays: DEFAULT_MAX_RELAYS,
            relay_bytes: DEFAULT_RELAY_BYTES,
            relay_rate: DEFAULT_RELAY_RATE,
            relays_per_address: DEFAULT_RELAYS_PER_ADDRESS,
            relay_lifetime: DEFAULT_RELAY_LIFETIME,
        }
    }
}

/// What ended a connection abnormally.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("timed out: {0}")]
    Timeout(&'static str),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("rejected: {0}")]
    Rejected(String),
}

/// A waiting peer, as the pairing table holds it.
struct Waiting {
    events: oneshot::Sender<Event>,
    rtt_us: Arc<AtomicU64>,
    info: PeerInfo,
}

/// Where a peer stands once it joined its code.
enum Joined {
    /// Second of the code: send this go after this delay.
    Paired(Go, Duration, RelayEnd),
    /// First: wait for the one event the pairing table will send.
    Waiting(oneshot::Receiver<Event>),
}

/// What reaches a waiting peer's task from elsewhere (once).
enum Event {
    /// Paired: send this go after this delay.
    Go {
        go: Go,
        delay: Duration,
        relay: RelayEnd,
    },
    /// Nobody came in time.
    Expired,
}

struct Shared {
    rooms: Mutex<Rooms<Waiting>>,
    /// Connections relaying now.
    relaying: std::sync::atomic::AtomicUsize,
    limits: Mutex<Limits>,
    config: Config,
}

/// The per-source limits of the server, each per address and per network.
struct Limits {
    open: PerScope<Concurrent>,
    connects: PerScope<Rate>,
    codes: PerScope<Rate>,
    relays: PerScope<Concurrent>,
}

impl Limits {
    fn new(config: &Config) -> Self {
        let times = config.network_multiple.max(1);
        let concurrent = |per_address: u32| {
            PerScope::<Concurrent>::new(
                per_address,
                per_address.saturating_mul(times),
                MAX_TRACKED_ADDRESSES,
            )
        };
        let rate = |burst, per_minute| {
            let per_address = RateLimit { burst, per_minute };
            PerScope::<Rate>::new(per_address, per_address.times(times), MAX_TRACKED_ADDRESSES)
        };
        Limits {
            open: concurrent(config.connections_per_address),
            connects: rate(CONNECTION_BURST, config.connections_per_minute),
            codes: rate(CODE_BURST, config.codes_per_minute),
            relays: concurrent(config.relays_per_address),
        }
    }
}

/// Whether a new connection may be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admission {
    Admitted,
    /// The server is at its total connection cap.
    Busy,
    /// This address or network has too many connections open.
    TooManyOpen(Refused),
    /// This address or network opens connections too fast.
    TooFast(Refused),
}

/// Why a relay was refused.
enum RelayRefusal {
    /// The server relays all it may.
    Full,
    /// This address or network has its share of relays.
    Source(Refused),
}

impl Shared {
    fn rooms(&self) -> MutexGuard<'_, Rooms<Waiting>> {
        // A panic while holding this lock would be a bug in the pure pairing code;
        // the table is still structurally valid, so keep serving.
        self.rooms.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn limits(&self) -> MutexGuard<'_, Limits> {
        self.limits.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Decides on a new connection from `ip` while `serving` are open; an
    /// admitted connection holds one of the open slots of `ip`'s address and
    /// network until [`Self::release`].
    fn admit(&self, ip: IpAddr, serving: usize) -> Admission {
        if serving >= self.config.max_connections {
            return Admission::Busy;
        }
        let mut limits = self.limits();
        if let Err(refused) = limits.connects.allow(ip, Instant::now().into_std()) {
            return Admission::TooFast(refused);
        }
        if let Err(refused) = limits.open.acquire(ip) {
            return Admission::TooManyOpen(refused);
        }
        Admission::Admitted
    }

    fn release(&self, ip: IpAddr) {
        self.limits().open.release(ip);
    }

    /// Counts a new code from `ip`; refused if its address or network opens
    /// codes too fast.
    fn new_code(&self, ip: IpAddr) -> Result<(), Refused> {
        self.limits().codes.allow(ip, Instant::now().into_std())
    }

    /// Takes a relay slot for a connection from `ip`: one of the server's, and
    /// one of its address' and network's. The slot gives them back when dropped.
    fn take_relay(&self, ip: IpAddr) -> Result<RelaySlot<'_>, RelayRefusal> {
        self.limits()
            .relays
            .acquire(ip)
            .map_err(RelayRefusal::Source)?;
        // Two connections a pair.
        let cap = self.config.max_relays.saturating_mul(2);
        if self.relaying.fetch_add(1, Ordering::Relaxed) >= cap {
            self.relaying.fetch_sub(1, Ordering::Relaxed);
            self.limits().relays.release(ip);
            return Err(RelayRefusal::Full);
        }
        self.config.metrics.relaying.inc();
        Ok(RelaySlot { shared: self, ip })
    }
}

type Conn = Framed<TcpStream, FrameCodec<PeerToServer, ServerToPeer>>;

/// Starting size of a connection's read and write buffers. Every message to and
/// from the server but a hello fits in it, and the buffers grow on demand up to
/// one frame; the codec's default (8 KiB each) would be most of what a waiting
/// peer costs.
const CONN_BUFFER: usize = 256;

fn framed(stream: TcpStream) -> Conn {
    Framed::with_capacity(stream, FrameCodec::new(), CONN_BUFFER)
}

/// Binds the default listening socket on `port`: IPv6 and IPv4 on all interfaces
/// (one dual-stack socket), or IPv4 only where IPv6 is unavailable.
pub fn bind_default(port: u16) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let dual = || -> io::Result<std::net::TcpListener> {
        let s = Socket::new(Domain::IPV6, Type::STREAM, None)?;
        s.set_only_v6(false)?;
        s.set_reuse_address(true)?;
        s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
        s.listen(1024)?;
        Ok(s.into())
    };
    dual().or_else(|e| {
        debug!(error = %e, "no dual-stack socket; listening on IPv4 only");
        let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        s.set_reuse_address(true)?;
        s.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
        s.listen(1024)?;
        Ok(s.into())
    })
}

/// Serves peers on `listener` until `shutdown` completes, then tells connected
/// peers the server is going away and returns.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let limits = Limits::new(&config);
    let shared = Arc::new(Shared {
        rooms: Mutex::new(Rooms::new(config.max_rooms, config.wait_ttl, PAIRED_HOLD)),
        relaying: Default::default(),
        limits: Mutex::new(limits),
        config,
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let sweeper = tokio::spawn(sweep(shared.clone()));
    let mut next_id: ConnId = 0;
    accept_until(
        &listener,
        shutdown,
        &mut tasks,
        "main",
        |stream, addr, serving| {
            next_id += 1;
            let admission = shared.admit(canonical(addr).ip(), serving);
            Some(connection(
                next_id,
                stream,
                addr,
                shared.clone(),
                stop_rx.clone(),
                admission,
            ))
        },
    )
    .await;
    info!(connections = tasks.len(), "shutting down");
    let _ = stop_tx.send(true);
    let drained = timeout(SHUTDOWN_GRACE, async {
        while tasks.join_next().await.is_some() {}
    });
    if drained.await.is_err() {
        tasks.abort_all();
    }
    sweeper.abort();
    Ok(())
}

/// Most probe connections being answered at once; more are closed unanswered.
const MAX_PROBE_TASKS: usize = 1024;

/// Bound on answering one probe connection.
const PROBE_SEND_TIMEOUT: Duration = Duration::from_secs(2);

/// Serves the probe port until `shutdown` completes: every connection is told the
/// address it came from ([`ServerToPeer::Observed`]) and closed. A peer connects
/// here from its fixed port before its hello; comparing what this port and the
/// main port saw tells whether its NAT picks a new public port per destination.
pub async fn run_probe(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let mut tasks = JoinSet::new();
    accept_until(
        &listener,
        shutdown,
        &mut tasks,
        "probe",
        |stream, addr, serving| {
            // Past the cap the connection is dropped, which closes it.
            let metrics = metrics.clone();
            (serving < MAX_PROBE_TASKS).then_some(async move {
                let mut conn = framed(stream);
                let answer = async {
                    conn.send(ServerToPeer::Observed {
                        observed: canonical(addr),
                    })
                    .await?;
                    conn.close().await
                };
                match timeout(PROBE_SEND_TIMEOUT, answer).await.unwrap_or(Ok(())) {
                    Ok(()) => {
                        metrics.probes.inc();
                    }
                    Err(e) => debug!(%addr, error = %e, "probe answer failed"),
                }
            })
        },
    )
    .await;
    tasks.abort_all();
    Ok(())
}

/// Pause after a failed accept (out of file descriptors and the like) before
/// accepting again: the condition is usually passing, and spinning would not help.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Accepts connections on `listener` until `shutdown` completes. `handle` gets
/// each connection and the number already being served, and returns the task
/// that serves it (or `None` to drop it); finished tasks are reaped as it goes.
pub(crate) async fn accept_until<F, Fut>(
    listener: &TcpListener,
    shutdown: impl Future<Output = ()>,
    tasks: &mut JoinSet<()>,
    name: &'static str,
    mut handle: F,
) where
    F: FnMut(TcpStream, SocketAddr, usize) -> Option<Fut>,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            Some(_) = tasks.join_next() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, addr)) => {
                    if let Some(task) = handle(stream, addr, tasks.len()) {
                        tasks.spawn(task);
                    }
                }
                Err(e) => {
                    warn!(listener = name, error = %e, "accept failed");
                    sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
        }
    }
}

/// Expires waiting peers nobody joined.
async fn sweep(shared: Arc<Shared>) {
    loop {
        sleep(SWEEP_INTERVAL).await;
        let now = Instant::now().into_std();
        {
            let mut limits = shared.limits();
            limits.connects.forget_full(now);
            limits.codes.forget_full(now);
        }
        let expired = {
            let mut rooms = shared.rooms();
            let expired = rooms.expire(now);
            let metrics = &shared.config.metrics;
            metrics.waiting.set(gauge(rooms.waiting()));
            metrics.rooms.set(gauge(rooms.len()));
            metrics.expired.inc_by(expired.len() as u64);
            expired
        };
        for (id, waiting) in expired {
            debug!(id, "wait expired");
            let _ = waiting.events.send(Event::Expired);
        }
    }
}

/// Runs one connection and logs how it ended.
async fn connection(
    id: ConnId,
    stream: TcpStream,
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
    admission: Admission,
) {
    let addr = canonical(addr);
    let metrics = shared.config.metrics.clone();
    metrics.accepted.inc();
    metrics.open.inc();
    let result = serve(id, stream, addr, &shared, stop, admission).await;
    metrics.open.dec();
    if admission == Admission::Admitted {
        shared.release(addr.ip());
    }
    match result {
        Ok(()) => debug!(id, %addr, "connection closed"),
        Err(e) => info!(id, %addr, error = %e, "connection ended"),
    }
}

/// Removes the connection from the pairing table whatever way it ends.
struct RoomGuard<'a> {
    shared: &'a Shared,
    nameplate: String,
    id: ConnId,
}

impl Drop for RoomGuard<'_> {
    fn drop(&mut self) {
        self.shared.rooms().leave(&self.nameplate, self.id);
    }
}

async fn serve(
    id: ConnId,
    stream: TcpStream,
    observed: SocketAddr,
    shared: &Shared,
    mut stop: watch::Receiver<bool>,
    admission: Admission,
) -> Result<(), ConnError> {
    let _ = stream.set_nodelay(true);
    let mut estimator = RttEstimator::new();
    if let Some(rtt) = kernel_rtt(&stream) {
        estimator.add(rtt);
    }
    let mut conn = framed(stream);
    let metrics = &*shared.config.metrics;
    let refusal = match admission {
        Admission::Admitted => None,
        Admission::Busy => Some((
            Reject::server_full,
            "the server is at its connection limit; try again in a minute".to_owned(),
        )),
        Admission::TooManyOpen(refused) => Some((
            Reject::for_open(refused.scope),
            format!(
                "too many connections from {} (at most {}); close some and try again",
                refused.whose(),
                refused.limit
            ),
        )),
        Admission::TooFast(refused) => Some((
            Reject::for_connection_rate(refused.scope),
            format!(
                "{} opens connections too fast (at most {} a minute); try again in a minute",
                refused.whose(),
                refused.limit
            ),
        )),
    };
    if let Some((reason, message)) = refusal {
        return reject(&mut conn, metrics, reason, message).await;
    }

    // 1. Hello, after the requests that may come first: a nameplate allocation
    //    if the peer starts a new code; reflection and dial-back for the doctor.
    let too_many_codes = |refused: Refused| {
        format!(
            "{} opens new codes too fast (at most {} a minute); try again in a minute",
            refused.whose(),
            refused.limit
        )
    };
    // All of it within the hello timeout, counted from the accept.
    let hello_deadline = Instant::now() + shared.config.hello_timeout;
    // An allocation counts as the new code its hello then opens.
    let mut code_counted = false;
    let mut dialed = false;
    let hello = loop {
        let Some(request) = next_request(&mut conn, metrics, hello_deadline).await? else {
            return Ok(());
        };
        match request {
            PeerToServer::Hello(hello) => break hello,
            PeerToServer::Allocate if !code_counted => {
                code_counted = true;
                if let Err(refused) = shared.new_code(observed.ip()) {
                    let reason = Reject::for_code_rate(refused.scope);
                    return reject(&mut conn, metrics, reason, too_many_codes(refused)).await;
                }
                // The nameplate is not reserved between this answer and the hello
                // (one round trip); a peer that joins it by chance in between would
                // pair with this one, and the key exchange would fail for both: a
                // failed guess. Drawn at random, so nobody can aim for it.
                let mut no_randomness = None;
                let drawn = shared.rooms().random_free_number(|n| {
                    // The modulo's bias is below n / 2^64: nothing for n < 10^9.
                    getrandom::u64().unwrap_or_else(|e| {
                        no_randomness = Some(e);
                        0
                    }) % n
                });
                if let Some(e) = no_randomness {
                    return Err(ConnError::Rejected(format!("no randomness: {e}")));
                }
                let Some(nameplate) = drawn else {
                    return reject(
                        &mut conn,
                        metrics,
                        Reject::rooms_full,
                        "no free nameplate; try again later",
                    )
                    .await;
                };
                send(&mut conn, ServerToPeer::Allocated { nameplate }).await?;
            }
            PeerToServer::Reflect => send(&mut conn, ServerToPeer::Observed { observed }).await?,
            PeerToServer::DialBack if !dialed => {
                dialed = true;
                let answer = dial_back(observed).await;
                send(&mut conn, answer).await?;
            }
            other => {
                let msg = format!("expected a hello, got {}", kind(&other));
                return reject(&mut conn, metrics, Reject::malformed, msg).await;
            }
        }
    };
    if hello.version != PROTOCOL_VERSION {
        return reject(
            &mut conn,
            metrics,
            Reject::version,
            version_message(hello.version),
        )
        .await;
    }
    if let Err(e) = validate_hello(&hello) {
        return reject(&mut conn, metrics, Reject::malformed, e.to_string()).await;
    }

    let Hello {
        nameplate,
        probe_observed,
        pake,
        resume,
        ..
    } = hello;
    // Peers resuming a chat meet in the room they derived from its secret,
    // apart from the nameplates (which may have been given to someone else
    // since).
    let nameplate = match resume {
        Some(room) => resume_room(&room),
        None => nameplate,
    };
    // What the logs call the room: a resumed chat's room name lets whoever
    // knows it block that chat's next meeting, so it is not written down.
    let room = if resume.is_some() {
        "(resumed chat)"
    } else {
        nameplate.as_str()
    };
    let mapping = classify_mapping(observed, probe_observed.map(canonical));
    let me = PeerInfo {
        observed,
        mapping,
        pake,
    };

    // 2. Pairing.
    let rtt_us = Arc::new(AtomicU64::new(micros(estimator.estimate())));
    let mut joined = None;
    // At most two rounds: a second only if the waiting peer vanished as we joined.
    for _ in 0..2 {
        let (events_tx, events) = oneshot::channel();
        let outcome = shared.rooms().join(
            &nameplate,
            id,
            Waiting {
                events: events_tx,
                rtt_us: rtt_us.clone(),
                info: me.clone(),
            },
            Instant::now().into_std(),
        );
        match outcome {
            Join::Paired { other, value } => {
                let mut session: SessionToken = [0; punchline_proto::SESSION_LEN];
                getrandom::fill(&mut session)
                    .map_err(|e| ConnError::Rejected(format!("no randomness: {e}")))?;
                let their_rtt = Duration::from_micros(value.rtt_us.load(Ordering::Relaxed));
                let my_rtt = estimator.estimate().unwrap_or(Duration::ZERO);
                let (their_delay, my_delay) = if shared.config.synchronise_go {
                    go_delays(their_rtt, my_rtt)
                } else {
                    (Duration::ZERO, Duration::ZERO)
                };
                let theirs = Go {
                    peer: me.clone(),
                    role: Role::Leader,
                    session,
                };
                let (relay_mine, relay_theirs) =
                    relay_ends(shared.config.relay_bytes, shared.config.relay_rate);
                let event = Event::Go {
                    go: theirs,
                    delay: their_delay,
                    relay: relay_theirs,
                };
                if value.events.send(event).is_err() {
                    // The waiting peer's task ended (it disconnected) just before it
                    // could leave the table. Clear the room and join afresh.
                    let mut rooms = shared.rooms();
                    rooms.leave(&nameplate, other);
                    rooms.leave(&nameplate, id);
                    continue;
                }
                metrics.pairs.inc();
                info!(nameplate = %room, a = %value.info.observed, b = %observed,
                      mapping_a = ?value.info.mapping, mapping_b = ?mapping,
                      rtt_a_ms = ms(their_rtt), rtt_b_ms = ms(my_rtt),
                      delay_a_ms = ms(their_delay), delay_b_ms = ms(my_delay), "pair made");
                let mine = Go {
                    peer: value.info,
                    role: Role::Follower,
                    session,
                };
                joined = Some(Joined::Paired(mine, my_delay, relay_mine));
            }
            Join::Waiting => {
                // A new room: counts against the source's rate of new codes.
                if !code_counted {
                    if let Err(refused) = shared.new_code(observed.ip()) {
                        shared.rooms().leave(&nameplate, id);
                        let reason = Reject::for_code_rate(refused.scope);
                        return reject(&mut conn, metrics, reason, too_many_codes(refused)).await;
                    }
                }
                joined = Some(Joined::Waiting(events));
            }
            Join::InUse => {
                let msg = if resume.is_some() {
                    "this chat is already being resumed by two peers".to_owned()
                } else {
                    format!(
                        "code {nameplate}-… is already in use by two peers: start again with a new code"
                    )
                };
                return reject(&mut conn, metrics, Reject::code_in_use, msg).await;
            }
            Join::Full => {
                return reject(
                    &mut conn,
                    metrics,
                    Reject::rooms_full,
                    "the server holds too many codes right now; try again later",
                )
                .await;
            }
        }
        break;
    }
    let Some(joined) = joined else {
        // The code's first peer vanished twice in a row as this one joined.
        return reject(
            &mut conn,
            metrics,
            Reject::rooms_full,
            "could not join the code just now; try again",
        )
        .await;
    };
    let _guard = RoomGuard {
        shared,
        nameplate: nameplate.clone(),
        id,
    };

    // Welcome, once the code is known to be usable.
    send(&mut conn, ServerToPeer::Welcome { observed, mapping }).await?;

    let (go, delay, relay) = match joined {
        Joined::Paired(go, delay, relay) => (go, delay, relay),
        Joined::Waiting(mut events) => {
            info!(id, nameplate = %room, %observed, ?mapping, "peer waiting");
            match wait_for_pair(
                &mut conn,
                metrics,
                shared.config.idle_timeout,
                &mut events,
                &mut estimator,
                &rtt_us,
                &mut stop,
            )
            .await?
            {
                Some(paired) => paired,
                None => return Ok(()),
            }
        }
    };

    // 3. The synchronised go, then hold the connection during the punch.
    if !delay.is_zero() {
        sleep(delay).await;
    }
    send(&mut conn, ServerToPeer::Go(go)).await?;
    debug!(id, delay_ms = ms(delay), "go sent");
    // The report, or after a failed punch a request to relay; meanwhile each
    // peer's sealed box (its candidates, which only the other peer can open)
    // passes to the other, once each way.
    let mut relay = relay;
    let next = timeout(REPORT_TIMEOUT, async {
        loop {
            let frame = tokio::select! {
                frame = conn.next() => frame,
                sealed = async {
                    match relay.sealed_in.as_mut() {
                        Some(rx) => rx.await,
                        None => std::future::pending().await,
                    }
                } => {
                    relay.sealed_in = None;
                    if let Ok(sealed) = sealed {
                        send(&mut conn, ServerToPeer::Sealed(sealed)).await?;
                    }
                    continue;
                }
            };
            match frame {
                Some(Ok(PeerToServer::Sealed(sealed))) => {
                    if let Err(e) = punchline_proto::validate_sealed(&sealed) {
                        return Err(ConnError::Protocol(e.to_string()));
                    }
                    match relay.sealed_out.take() {
                        Some(tx) => {
                            let _ = tx.send(sealed);
                        }
                        None => return Err(ConnError::Protocol("a second sealed box".into())),
                    }
                }
                None => return Ok(false),
                Some(Ok(PeerToServer::Report(outcome))) => {
                    metrics.punch(&outcome);
                    match outcome {
                        PunchOutcome::Direct {
                            public,
                            attempts,
                            elapsed_ms,
                        } => {
                            info!(id, nameplate = %room, public, attempts, elapsed_ms, "punch succeeded");
                            return Ok(false);
                        }
                        PunchOutcome::Failed { attempts } => {
                            info!(id, nameplate = %room, attempts, "punch failed")
                        }
                    }
                }
                Some(Ok(PeerToServer::Relay)) => return Ok(true),
                Some(Ok(PeerToServer::Pong { .. })) => {}
                Some(Ok(other)) => {
                    return Err(ConnError::Protocol(format!(
                        "unexpected {} after go",
                        kind(&other)
                    )))
                }
                Some(Err(e)) => return Err(e.into()),
            }
        }
    });
    match next.await {
        Ok(Ok(true)) => relay_for(&mut conn, shared, relay, &mut stop, id, observed.ip()).await,
        Ok(Ok(false)) => Ok(()),
        Ok(Err(e)) => Err(e),
        Err(_) => {
            debug!(id, "no punch report in time");
            Ok(())
        }
    }
}

/// Queue of relayed pieces between the two tasks of a pair.
const RELAY_QUEUE: usize = 32;

/// A relay with no traffic either way for this long is closed.
pub use punchline_proto::defaults::RELAY_IDLE_TIMEOUT;

/// One task's end of its pair's relay: pieces for the other peer go out on `tx`,
/// pieces from it come in on `rx`; `budget` is what the pair may still send.
struct RelayEnd {
    /// This peer's sealed box, for the other peer (once).
    sealed_out: Option<oneshot::Sender<Vec<u8>>>,
    /// The other peer's sealed box, for this peer.
    sealed_in: Option<oneshot::Receiver<Vec<u8>>>,
    tx: mpsc::Sender<Vec<u8>>,
    rx: mpsc::Receiver<Vec<u8>>,
    budget: Arc<AtomicU64>,
    /// The pair's pace, both directions together.
    pace: Arc<Mutex<Pace>>,
}

fn relay_ends(budget: u64, rate: u64) -> (RelayEnd, RelayEnd) {
    let (to_b, from_a) = mpsc::channel(RELAY_QUEUE);
    let (to_a, from_b) = mpsc::channel(RELAY_QUEUE);
    let (sealed_to_b, sealed_from_a) = oneshot::channel();
    let (sealed_to_a, sealed_from_b) = oneshot::channel();
    let budget = Arc::new(AtomicU64::new(budget));
    let burst = rate.saturating_mul(RELAY_BURST_SECONDS);
    let pace = Arc::new(Mutex::new(Pace::new(
        rate,
        burst,
        Instant::now().into_std(),
    )));
    (
        RelayEnd {
            sealed_out: Some(sealed_to_b),
            sealed_in: Some(sealed_from_b),
            tx: to_b,
            rx: from_b,
            budget: budget.clone(),
            pace: pace.clone(),
        },
        RelayEnd {
            sealed_out: Some(sealed_to_a),
            sealed_in: Some(sealed_from_a),
            tx: to_a,
            rx: from_a,
            budget,
            pace,
        },
    )
}

/// A relayed pair may send this many seconds' worth of its rate at once (a
/// pasted page, say) before the pace applies.
const RELAY_BURST_SECONDS: u64 = 4;

/// Gives back a relay slot (the server's, and its source's) however the relay
/// ends.
struct RelaySlot<'a> {
    shared: &'a Shared,
    ip: IpAddr,
}

impl Drop for RelaySlot<'_> {
    fn drop(&mut self) {
        self.shared.relaying.fetch_sub(1, Ordering::Relaxed);
        self.shared.config.metrics.relaying.dec();
        self.shared.limits().relays.release(self.ip);
    }
}

/// Carries this peer's relayed bytes to the other peer of the pair and back,
/// until either leaves, the pair's allowance is spent, the relay idles or
/// reaches its lifetime, or the server stops. The server never looks inside: it
/// is the peers' encrypted link. `ip` is this peer's address, whose share of
/// relays the relay takes.
async fn relay_for(
    conn: &mut Conn,
    shared: &Shared,
    end: RelayEnd,
    stop: &mut watch::Receiver<bool>,
    id: ConnId,
    ip: IpAddr,
) -> Result<(), ConnError> {
    let metrics = &*shared.config.metrics;
    if !shared.config.relay {
        let msg = "this rendezvous does not relay; a direct connection is the only way through it";
        return reject(conn, metrics, Reject::relay_off, msg).await;
    }
    let _slot = match shared.take_relay(ip) {
        Ok(slot) => slot,
        Err(RelayRefusal::Full) => {
            let msg = format!(
                "the rendezvous already relays as many chats as it may ({}); try again later",
                shared.config.max_relays
            );
            return reject(conn, metrics, Reject::relay_full, msg).await;
        }
        Err(RelayRefusal::Source(refused)) => {
            let msg = format!(
                "the rendezvous already relays {} connections for {}, as many as it may; try again later",
                refused.limit,
                refused.whose()
            );
            return reject(conn, metrics, Reject::for_relays(refused.scope), msg).await;
        }
    };
    send(conn, ServerToPeer::Relaying).await?;
    info!(id, "relaying");
    let ends_at = Instant::now() + shared.config.relay_lifetime;
    let mut last = Instant::now();
    // A piece read from this peer, waiting for its time (the pair's pace) and for
    // room in the other task's queue. While one waits, nothing more is read from
    // this peer (TCP's flow control slows it down), but pieces for it are still
    // passed on: two tasks each waiting for the other to make room cannot stall.
    let mut pending: Option<(Vec<u8>, Instant)> = None;
    let RelayEnd {
        tx,
        mut rx,
        budget,
        pace,
        ..
    } = end;
    loop {
        let due = pending.as_ref().map(|(_, at)| *at);
        tokio::select! {
            frame = conn.next(), if pending.is_none() => match frame {
                Some(Ok(PeerToServer::Relayed(bytes))) => {
                    last = Instant::now();
                    if bytes.len() > punchline_proto::MAX_RELAY_CHUNK {
                        return Err(ConnError::Protocol(format!("relayed piece of {} bytes", bytes.len())));
                    }
                    let n = bytes.len() as u64;
                    let spent = budget.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| left.checked_sub(n));
                    if spent.is_err() {
                        let msg = format!(
                            "this chat used up what the rendezvous relays for one chat ({} bytes); a direct connection has no such limit",
                            shared.config.relay_bytes
                        );
                        return reject(conn, metrics, Reject::relay_budget, msg).await;
                    }
                    metrics.relayed_bytes.inc_by(n);
                    let wait = pace
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .take(bytes.len(), Instant::now().into_std());
                    pending = Some((bytes, Instant::now() + wait));
                }
                Some(Ok(PeerToServer::Pong { .. } | PeerToServer::Report(_) | PeerToServer::Sealed(_))) => {}
                None => return Ok(()),
                Some(Ok(other)) => {
                    return Err(ConnError::Protocol(format!("unexpected {} while relaying", kind(&other))))
                }
                Some(Err(e)) => return Err(e.into()),
            },
            permit = async {
                if let Some(at) = due {
                    sleep_until(at).await;
                }
                tx.reserve().await
            }, if due.is_some() => match (permit, pending.take()) {
                (Ok(permit), Some((bytes, _))) => permit.send(bytes),
                // The other peer's side is gone: closing tells this peer its link
                // dropped.
                _ => return Ok(()),
            },
            piece = rx.recv() => match piece {
                Some(bytes) => {
                    last = Instant::now();
                    send(conn, ServerToPeer::Relayed(bytes)).await?;
                }
                None => return Ok(()),
            },
            _ = sleep_until(last + RELAY_IDLE_TIMEOUT) => {
                debug!(id, "relay idle");
                return Ok(());
            }
            _ = sleep_until(ends_at) => {
                let msg = format!(
                    "this relay reached its time limit ({}); the chat continues over a new link",
                    human(shared.config.relay_lifetime)
                );
                return reject(conn, metrics, Reject::relay_lifetime, msg).await;
            }
            _ = stop.changed() => {
                send(conn, ServerToPeer::error(ErrorCode::ShuttingDown, "the rendezvous server is shutting down")).await?;
                return Ok(());
            }
        }
    }
}

/// The waiting phase: ping, collect RTT samples, until paired (`Some`), or the peer
/// left, the wait expired or the server stops (`None`).
async fn wait_for_pair(
    conn: &mut Conn,
    metrics: &Metrics,
    idle_timeout: Duration,
    events: &mut oneshot::Receiver<Event>,
    estimator: &mut RttEstimator,
    rtt_us: &AtomicU64,
    stop: &mut watch::Receiver<bool>,
) -> Result<Option<(Go, Duration, RelayEnd)>, ConnError> {
    let mut seq: u32 = 0;
    let mut outstanding: Option<(u32, Instant)> = None;
    let mut next_ping = Instant::now();
    let mut last_heard = Instant::now();
    loop {
        tokio::select! {
            event = &mut *events => match event {
                Ok(Event::Go { go, delay, relay }) => return Ok(Some((go, delay, relay))),
                Ok(Event::Expired) | Err(_) => {
                    let msg = "nobody joined with this code in time; start again and share the code";
                    send(conn, ServerToPeer::error(ErrorCode::Expired, msg)).await?;
                    return Ok(None);
                }
            },
            frame = conn.next() => match frame {
                None => return Ok(None),
                Some(Ok(PeerToServer::Pong { seq: got })) => {
                    last_heard = Instant::now();
                    if let Some((want, sent)) = outstanding {
                        if got == want {
                            estimator.add(sent.elapsed());
                            rtt_us.store(micros(estimator.estimate()), Ordering::Relaxed);
                            outstanding = None;
                        }
                    }
                }
                Some(Ok(other)) => {
                    let msg = format!("unexpected {} while waiting", kind(&other));
                    return reject(conn, metrics, Reject::malformed, msg).await.map(|()| None);
                }
                Some(Err(e)) => return Err(e.into()),
            },
            _ = sleep_until(next_ping) => {
                if last_heard.elapsed() >= idle_timeout {
                    let msg = "no answer to pings for too long";
                    return reject(conn, metrics, Reject::idle, msg).await.map(|()| None);
                }
                seq = seq.wrapping_add(1);
                send(conn, ServerToPeer::Ping { seq }).await?;
                let now = Instant::now();
                outstanding = Some((seq, now));
                // At least three pings within the idle timeout.
                let interval = if seq < EARLY_PINGS { EARLY_PING_INTERVAL } else { PING_INTERVAL };
                next_ping = now + interval.min(idle_timeout / 3);
            }
            _ = stop.changed() => {
                send(conn, ServerToPeer::error(ErrorCode::ShuttingDown, "the rendezvous server is shutting down")).await?;
                return Ok(None);
            }
        }
    }
}

/// The next request before the hello, within `limit`. A frame of another
/// protocol version is answered with a version error; a malformed one with a
/// malformed error; both end the connection. `None`: the peer closed.
async fn next_request(
    conn: &mut Conn,
    metrics: &Metrics,
    deadline: Instant,
) -> Result<Option<PeerToServer>, ConnError> {
    match timeout_at(deadline, conn.next()).await {
        Err(_) => {
            let _ = reject(
                conn,
                metrics,
                Reject::hello_timeout,
                "no hello received in time",
            )
            .await;
            Err(ConnError::Timeout("waiting for hello"))
        }
        Ok(None) => Ok(None),
        Ok(Some(Ok(msg))) => Ok(Some(msg)),
        Ok(Some(Err(CodecError::Decode {
            hello_version: Some(v),
            ..
        }))) if v != PROTOCOL_VERSION => reject(conn, metrics, Reject::version, version_message(v))
            .await
            .map(|()| None),
        Ok(Some(Err(CodecError::Io(e)))) => Err(CodecError::Io(e).into()),
        Ok(Some(Err(e))) => reject(conn, metrics, Reject::malformed, format!("bad hello: {e}"))
            .await
            .map(|()| None),
    }
}

/// How long a dial-back waits for its SYN to be answered: long enough for one
/// retransmission (after 1 s), so a single lost SYN does not read as "dropped".
pub const DIAL_BACK_TIMEOUT: Duration = Duration::from_millis(2500);

/// Opens a TCP connection to `target` (the requesting connection's own address)
/// and reports what the SYN met; the connection, if any, is closed at once.
async fn dial_back(target: SocketAddr) -> ServerToPeer {
    use punchline_proto::DialBackResult;
    let started = Instant::now();
    let result = match timeout(DIAL_BACK_TIMEOUT, TcpStream::connect(target)).await {
        Ok(Ok(_stream)) => DialBackResult::Connected,
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => DialBackResult::Refused,
        Ok(Err(e)) => {
            debug!(%target, error = %e, "dial-back failed");
            DialBackResult::Unknown
        }
        Err(_) => DialBackResult::NoAnswer,
    };
    let elapsed_ms = started.elapsed().as_millis().try_into().unwrap_or(u32::MAX);
    debug!(%target, ?result, elapsed_ms, "dial-back");
    ServerToPeer::DialedBack {
        target,
        result,
        elapsed_ms,
    }
}

/// Sends an error to the peer (best effort), then ends the connection with it.
async fn reject(
    conn: &mut Conn,
    metrics: &Metrics,
    reason: Reject,
    message: impl Into<String>,
) -> Result<(), ConnError> {
    let message = message.into();
    metrics.reject(reason);
    let _ = send(conn, ServerToPeer::error(reason.code(), message.clone())).await;
    Err(ConnError::Rejected(message))
}

async fn send(conn: &mut Conn, msg: ServerToPeer) -> Result<(), ConnError> {
    match timeout(SEND_TIMEOUT, conn.send(msg)).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(ConnError::Timeout("peer not reading")),
    }
}

fn version_message(theirs: u16) -> String {
    format!(
        "this rendezvous speaks protocol version {PROTOCOL_VERSION}, your peer speaks version {theirs}: use matching versions of punchline"
    )
}

fn kind(msg: &PeerToServer) -> &'static str {
    match msg {
        PeerToServer::Hello(_) => "hello",
        PeerToServer::Pong { .. } => "pong",
        PeerToServer::Report(_) => "report",
        PeerToServer::Allocate => "allocate",
        PeerToServer::Reflect => "reflect",
        PeerToServer::DialBack => "dial-back",
        PeerToServer::Relay => "relay request",
        PeerToServer::Relayed(_) => "relayed data",
        PeerToServer::Sealed(_) => "sealed box",
    }
}

/// IPv4 peers reaching a dual-stack socket appear as `::ffff:a.b.c.d`; report them
/// as plain IPv4, which is what the other peer must connect to.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

fn micros(d: Option<Duration>) -> u64 {
    d.map_or(0, |d| d.as_micros().try_into().unwrap_or(u64::MAX))
}

/// The room of a resumed chat: `r` and the room the peers derived, in hex (never
/// a valid nameplate, which is all digits).
fn resume_room(derived: &ResumeRoom) -> String {
    let mut room = String::with_capacity(1 + 2 * derived.len());
    room.push('r');
    for b in derived {
        room.push_str(&format!("{b:02x}"));
    }
    room
}

fn gauge(n: usize) -> i64 {
    n.try_into().unwrap_or(i64::MAX)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A duration for a message: `1 h`, `30 min`, `90 s`.
fn human(d: Duration) -> String {
    if d.subsec_nanos() != 0 {
        return format!("{d:?}");
    }
    match d.as_secs() {
        s if s >= 3600 && s % 3600 == 0 => format!("{} h", s / 3600),
        s if s >= 60 && s % 60 == 0 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_addresses_become_ipv4() {
        let mapped: SocketAddr = "[::ffff:192.0.2.7]:4000".parse().expect("addr");
        assert_eq!(
            canonical(mapped),
            "192.0.2.7:4000".parse::<SocketAddr>().expect("addr")
        );
        let v6: SocketAddr = "[2001:db8::1]:4000".parse().expect("addr");
        assert_eq!(canonical(v6), v6);
    }
}
