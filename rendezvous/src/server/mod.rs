//! The rendezvous server: its settings ([`Config`] and the defaults it starts
//! from), the state every connection's task shares, and [`run`], the entry point.
//!
//! Every connection, new code and relay counts against its source, per address
//! (an IPv4 address, an IPv6 /64) and per network (an IPv4 /24, an IPv6 /48,
//! with [`Config::network_multiple`] times the limits): see
//! [`punchline_proto::limits`]. Nameplates for new codes are drawn at random.
//!
//! An error on one connection is logged and ends that connection only.
//!
//! The parts, by what each owns:
//! - this module: the settings, the defaults and limits they start from, the
//!   shared state (pairing table, relay count, per-source limits) and [`run`];
//! - `accept`: the listening socket ([`bind_default`]), the accept loop and the
//!   sweep that expires waiting peers;
//! - `admission`: the per-source limits and the decision on a new connection;
//! - `connection`: one connection's exchange, step by step (hello, pairing, the
//!   synchronised go, the punch report), and what the peer is told when refused;
//! - `relay`: relaying a pair whose punch failed, within its allowance;
//! - `probe`: the probe port ([`run_probe`]) and the dial-back.

mod accept;
mod admission;
mod connection;
mod probe;
mod relay;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use punchline_proto::pairing::{ConnId, Rooms};
use punchline_proto::{Go, PeerInfo};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::timeout;
use tracing::info;

use crate::metrics::Metrics;
use accept::{accept_until, sweep};
use admission::Limits;
use connection::connection;
use relay::RelayEnd;

pub use accept::bind_default;
pub use probe::{run_probe, ProbeSightings, PROBE_WAIT};

/// Port the rendezvous listens on by default (TCP, all interfaces).
pub use punchline_proto::defaults::DEFAULT_PORT;

/// The probe port is the main port plus this, unless configured otherwise.
pub use punchline_proto::defaults::{ALTERNATE_PORT_OFFSET, PROBE_PORT_OFFSET};

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

/// Default time a waiting peer may leave our pings unanswered before it is taken
/// for gone (its host or NAT mapping died without a reset) and dropped, freeing
/// its code: as long as a peer waits through the server's silence.
pub const DEFAULT_IDLE_TIMEOUT: Duration = punchline_proto::defaults::WAIT_SILENCE_TIMEOUT;

/// A relay with no traffic either way for this long is closed.
pub use punchline_proto::defaults::RELAY_IDLE_TIMEOUT;

/// How long a dial-back waits for its SYN to be answered: long enough for one
/// retransmission (after 1 s), so a single lost SYN does not read as "dropped".
pub const DIAL_BACK_TIMEOUT: Duration = Duration::from_millis(2500);

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
    /// Tell the nearer peer, in its go, how much later the other gets its own
    /// ([`punchline_proto::Go::others_go_after_us`]), so that a SYN of its
    /// reset for coming too early is tried again when the two cross. Off only
    /// for the benchmark baseline (both goes say 0). Either way both goes are
    /// sent at once.
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
    /// What the probe port saw, by token, for the hellos of peers that probe
    /// beside them: give the same to [`run_probe`].
    pub probes: ProbeSightings,
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
            probes: ProbeSightings::default(),
        }
    }
}

/// A waiting peer, as the pairing table holds it.
struct Waiting {
    events: oneshot::Sender<Event>,
    rtt_us: Arc<AtomicU64>,
    info: PeerInfo,
}

/// What reaches a waiting peer's task from elsewhere (once).
enum Event {
    /// Paired: send this go after this delay.
    Go {
        go: Box<Go>,
        delay: Duration,
        relay: RelayEnd,
    },
    /// Nobody came in time.
    Expired,
}

/// What the tasks of all connections share: the pairing table, the count of
/// connections relaying, the per-source limits and the settings.
struct Shared {
    rooms: Mutex<Rooms<Waiting>>,
    /// Connections relaying now.
    relaying: std::sync::atomic::AtomicUsize,
    limits: Mutex<Limits>,
    config: Config,
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
}

/// Serves peers on `listener` until `shutdown` completes, then tells connected
/// peers the server is going away and returns.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    run_on(vec![listener], config, shutdown).await
}

/// [`run`] on several listeners at once, all serving the same peers and
/// rooms: the main port and the alternate port
/// ([`ALTERNATE_PORT_OFFSET`]), where a peer whose first connection stayed
/// silent connects again.
pub async fn run_on(
    listeners: Vec<TcpListener>,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let limits = Limits::new(&config);
    // The second listener is the alternate port: told to peers with their
    // observed address.
    config.probes.set_alternate_port(
        listeners
            .get(1)
            .and_then(|l| l.local_addr().ok())
            .map(|a| a.port()),
    );
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
        &listeners,
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

/// IPv4 peers reaching a dual-stack socket appear as `::ffff:a.b.c.d`; report them
/// as plain IPv4, which is what the other peer must connect to.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
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
