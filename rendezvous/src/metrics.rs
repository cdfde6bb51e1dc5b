//! What the server counts: for the periodic stats line in the log and for the
//! optional metrics endpoint (`--metrics ADDR`), which answers `GET /metrics` in
//! the Prometheus/OpenMetrics text format.
//!
//! Counters only ever grow; gauges are the current value. Names:
//!
//! | metric | type | meaning |
//! |---|---|---|
//! | `punchline_connections_total` | counter | connections accepted on the main port |
//! | `punchline_connections_open` | gauge | connections being served |
//! | `punchline_waiting_peers` | gauge | first peers of a code, waiting for the second |
//! | `punchline_rooms` | gauge | codes in the pairing table (waiting or paired) |
//! | `punchline_pairs_total` | counter | pairs made (go sent to both) |
//! | `punchline_expired_total` | counter | first peers whose wait ran out |
//! | `punchline_punches_total{outcome}` | counter | punch reports: `direct`, `failed` |
//! | `punchline_rejects_total{reason}` | counter | connections refused, by [`Reject`] |
//! | `punchline_probes_total` | counter | probe-port connections answered |
//! | `punchline_relaying` | gauge | connections relaying (two a relayed pair) |
//! | `punchline_relayed_bytes_total` | counter | bytes relayed between peers |
//! | `punchline_resident_memory_bytes` | gauge | the process's resident memory |

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use punchline_proto::limits::Scope;
use punchline_proto::{ErrorCode, PunchOutcome};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::timeout;
use tracing::{debug, warn};

/// Why the server refused or ended a connection: the `reason` label of
/// `punchline_rejects_total`, and the error code the peer is sent.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)] // the label values, as they appear in the metrics
pub enum Reject {
    /// The server is at its total connection cap.
    server_full,
    /// The source address (IPv4 address, IPv6 /64) has too many connections
    /// open.
    address_open,
    /// The source network (IPv4 /24, IPv6 /48) has too many connections open.
    network_open,
    /// The source address opens connections too fast.
    address_rate,
    /// The source network opens connections too fast.
    network_rate,
    /// The source address opens new codes too fast.
    code_rate,
    /// The source network opens new codes too fast.
    network_code_rate,
    /// The pairing table is full, or no nameplate is free.
    rooms_full,
    /// Two peers already hold the code.
    code_in_use,
    /// The peer speaks another protocol version.
    version,
    /// A malformed frame, a bad field or an unexpected message.
    malformed,
    /// No hello in time.
    hello_timeout,
    /// A waiting peer stopped answering pings.
    idle,
    /// A relay was asked of a server that does not relay.
    relay_off,
    /// A relay was asked while the server relays all it may.
    relay_full,
    /// A relay was asked from an address that has its share of relays.
    relay_address,
    /// A relay was asked from a network that has its share of relays.
    relay_network,
    /// A relayed pair spent its allowance of bytes.
    relay_budget,
    /// A relay reached its lifetime (the peers reconnect over a new link).
    relay_lifetime,
}

impl Reject {
    /// The error code the peer is told.
    pub fn code(self) -> ErrorCode {
        match self {
            Reject::server_full
            | Reject::address_open
            | Reject::network_open
            | Reject::address_rate
            | Reject::network_rate
            | Reject::code_rate
            | Reject::network_code_rate
            | Reject::rooms_full => ErrorCode::Busy,
            Reject::code_in_use => ErrorCode::CodeInUse,
            Reject::version => ErrorCode::VersionMismatch,
            Reject::malformed | Reject::hello_timeout | Reject::idle => ErrorCode::Malformed,
            Reject::relay_off
            | Reject::relay_full
            | Reject::relay_address
            | Reject::relay_network
            | Reject::relay_budget
            | Reject::relay_lifetime => ErrorCode::RelayUnavailable,
        }
    }

    /// Too many connections open, at `scope`.
    pub fn for_open(scope: Scope) -> Reject {
        match scope {
            Scope::Address => Reject::address_open,
            Scope::Network => Reject::network_open,
        }
    }

    /// New connections too fast, at `scope`.
    pub fn for_connection_rate(scope: Scope) -> Reject {
        match scope {
            Scope::Address => Reject::address_rate,
            Scope::Network => Reject::network_rate,
        }
    }

    /// New codes too fast, at `scope`.
    pub fn for_code_rate(scope: Scope) -> Reject {
        match scope {
            Scope::Address => Reject::code_rate,
            Scope::Network => Reject::network_code_rate,
        }
    }

    /// Too many relays, at `scope`.
    pub fn for_relays(scope: Scope) -> Reject {
        match scope {
            Scope::Address => Reject::relay_address,
            Scope::Network => Reject::relay_network,
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectLabels {
    reason: Reject,
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum Outcome {
    direct,
    failed,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PunchLabels {
    outcome: Outcome,
}

/// The server's counters. One per server; cheap to update from any task.
pub struct Metrics {
    registry: Registry,
    pub(crate) accepted: Counter,
    pub(crate) open: Gauge,
    pub(crate) waiting: Gauge,
    pub(crate) rooms: Gauge,
    pub(crate) pairs: Counter,
    pub(crate) expired: Counter,
    pub(crate) probes: Counter,
    pub(crate) relaying: Gauge,
    pub(crate) relayed_bytes: Counter,
    punches: Family<PunchLabels, Counter>,
    rejects: Family<RejectLabels, Counter>,
    resident: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut m = Metrics {
            registry: Registry::with_prefix("punchline"),
            accepted: Counter::default(),
            open: Gauge::default(),
            waiting: Gauge::default(),
            rooms: Gauge::default(),
            pairs: Counter::default(),
            expired: Counter::default(),
            probes: Counter::default(),
            relaying: Gauge::default(),
            relayed_bytes: Counter::default(),
            punches: Family::default(),
            rejects: Family::default(),
            resident: Gauge::default(),
        };
        let r = &mut m.registry;
        r.register(
            "connections",
            "Connections accepted on the main port",
            m.accepted.clone(),
        );
        r.register(
            "connections_open",
            "Connections being served",
            m.open.clone(),
        );
        r.register(
            "waiting_peers",
            "First peers of a code waiting for the second",
            m.waiting.clone(),
        );
        r.register(
            "rooms",
            "Codes in the pairing table, waiting or paired",
            m.rooms.clone(),
        );
        r.register("pairs", "Pairs made", m.pairs.clone());
        r.register(
            "expired",
            "First peers whose wait ran out",
            m.expired.clone(),
        );
        r.register(
            "probes",
            "Probe-port connections answered",
            m.probes.clone(),
        );
        r.register(
            "relaying",
            "Connections relaying (two a relayed pair)",
            m.relaying.clone(),
        );
        r.register(
            "relayed_bytes",
            "Bytes relayed between peers whose punch failed",
            m.relayed_bytes.clone(),
        );
        r.register(
            "punches",
            "Punch outcomes reported by peers",
            m.punches.clone(),
        );
        r.register(
            "rejects",
            "Connections refused or ended by the server, by reason",
            m.rejects.clone(),
        );
        r.register(
            "resident_memory_bytes",
            "Resident memory of the process",
            m.resident.clone(),
        );
        // Every series exists from the start, at zero.
        for reason in ALL_REJECTS {
            m.reject_count(reason);
        }
        for outcome in [Outcome::direct, Outcome::failed] {
            let _ = m.punches.get_or_create(&PunchLabels { outcome });
        }
        m
    }
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics")
            .field("snapshot", &self.snapshot())
            .finish()
    }
}

/// The counters at one instant, for the stats line and for tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Connections accepted on the main port.
    pub accepted: u64,
    /// Connections being served.
    pub open: i64,
    /// Peers waiting for their second.
    pub waiting: i64,
    /// Codes in the pairing table.
    pub rooms: i64,
    /// Pairs made.
    pub pairs: u64,
    /// Waits that ran out.
    pub expired: u64,
    /// Punches reported direct.
    pub punches_direct: u64,
    /// Punches reported failed.
    pub punches_failed: u64,
    /// Connections refused, all reasons.
    pub rejects: u64,
}

impl Metrics {
    /// Counts a refused connection.
    pub(crate) fn reject(&self, reason: Reject) {
        self.rejects.get_or_create(&RejectLabels { reason }).inc();
    }

    /// Counts a punch report.
    pub(crate) fn punch(&self, outcome: &PunchOutcome) {
        let outcome = match outcome {
            PunchOutcome::Direct { .. } => Outcome::direct,
            PunchOutcome::Failed { .. } => Outcome::failed,
        };
        self.punches.get_or_create(&PunchLabels { outcome }).inc();
    }

    /// How many connections were refused for `reason`.
    pub fn reject_count(&self, reason: Reject) -> u64 {
        self.rejects.get_or_create(&RejectLabels { reason }).get()
    }

    /// The counters now.
    pub fn snapshot(&self) -> Snapshot {
        let punches = |outcome| self.punches.get_or_create(&PunchLabels { outcome }).get();
        let mut rejects = 0;
        for reason in ALL_REJECTS {
            rejects += self.reject_count(reason);
        }
        Snapshot {
            accepted: self.accepted.get(),
            open: self.open.get(),
            waiting: self.waiting.get(),
            rooms: self.rooms.get(),
            pairs: self.pairs.get(),
            expired: self.expired.get(),
            punches_direct: punches(Outcome::direct),
            punches_failed: punches(Outcome::failed),
            rejects,
        }
    }

    /// The metrics in the OpenMetrics text format.
    pub fn render(&self) -> String {
        if let Some(bytes) = resident_bytes() {
            self.resident.set(bytes.try_into().unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Every reason, so that every series exists from the start.
const ALL_REJECTS: [Reject; 19] = [
    Reject::server_full,
    Reject::address_open,
    Reject::network_open,
    Reject::address_rate,
    Reject::network_rate,
    Reject::code_rate,
    Reject::network_code_rate,
    Reject::rooms_full,
    Reject::code_in_use,
    Reject::version,
    Reject::malformed,
    Reject::hello_timeout,
    Reject::idle,
    Reject::relay_off,
    Reject::relay_full,
    Reject::relay_address,
    Reject::relay_network,
    Reject::relay_budget,
    Reject::relay_lifetime,
];

/// The resident memory of this process, from `/proc/self/statm`.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions; it only reads a system constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

/// Most scrapes served at once. A Prometheus server scrapes one at a time; a
/// few more leave room for a curl by hand, and bound what idle clients can hold.
const MAX_SCRAPES: usize = 8;
/// Bound on receiving a request's head: a scraper sends it at once, so this only
/// bounds clients that connect and send nothing, or a byte now and then.
const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on reading a request and writing the answer, in all.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest request head read; the rest is ignored.
const MAX_REQUEST: usize = 4096;
/// Pause after a failed accept (out of file descriptors and the like) before
/// accepting again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// A scrape being served: its task, and whether it still waits for its
/// request's head (only those are evicted for a newcomer).
struct Scrape {
    task: AbortHandle,
    reading: Arc<AtomicBool>,
}

/// Serves `GET /metrics` on `listener` until `shutdown` completes. Anything else
/// gets 404. Meant for a loopback or private address: it has no authentication.
///
/// Idle or slow clients cannot block the scrapes: each has [`HEADER_TIMEOUT`]
/// to send its request, and when [`MAX_SCRAPES`] are being served a new
/// connection evicts the oldest one still waiting for its request (a scraper
/// sends its request as soon as it connects, so it is answered before it can
/// become the oldest of a full set). A new connection is closed unanswered only
/// when every slot is busy writing an answer, which takes moments.
pub async fn serve_metrics(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let mut tasks = JoinSet::new();
    // Oldest first.
    let mut scrapes: VecDeque<Scrape> = VecDeque::with_capacity(MAX_SCRAPES);
    tokio::pin!(shutdown);
    loop {
        let (stream, addr) = tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = tasks.join_next() => continue,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(listener = "metrics", error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        scrapes.retain(|s| !s.task.is_finished());
        if scrapes.len() >= MAX_SCRAPES {
            match scrapes
                .iter()
                .position(|s| s.reading.load(Ordering::Relaxed))
            {
                Some(oldest) => {
                    if let Some(evicted) = scrapes.remove(oldest) {
                        evicted.task.abort();
                        debug!(%addr, "metrics: evicted an idle request for a new one");
                    }
                }
                None => {
                    debug!(%addr, "metrics: all slots answering; connection closed");
                    continue;
                }
            }
        }
        let reading = Arc::new(AtomicBool::new(true));
        let metrics = metrics.clone();
        let flag = reading.clone();
        let task = tasks.spawn(async move {
            let served = timeout(SCRAPE_TIMEOUT, scrape(stream, &metrics, &flag)).await;
            if let Err(e) = served.unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into())) {
                debug!(%addr, error = %e, "metrics request failed");
            }
        });
        scrapes.push_back(Scrape { task, reading });
    }
    tasks.abort_all();
    Ok(())
}

/// Answers one HTTP/1.x request and closes the connection; `reading` is
/// cleared once the request's head is in.
async fn scrape(mut stream: TcpStream, metrics: &Metrics, reading: &AtomicBool) -> io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    let read_head = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        io::Result::Ok(())
    };
    timeout(HEADER_TIMEOUT, read_head)
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))?;
    reading.store(false, Ordering::Relaxed);
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (parts.next(), parts.next());
    let (status, kind, body) = match (method, path) {
        (Some(b"GET"), Some(b"/metrics")) => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.render(),
        ),
        _ => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "only GET /metrics is served here\n".to_owned(),
        ),
    };
    let answer = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(answer.as_bytes()).await?;
    stream.shutdown().await
}

/// Default spacing of the stats line in the log.
pub const DEFAULT_STATS_INTERVAL: Duration = Duration::from_secs(60);

/// Logs one stats line every `interval`, forever: the gauges now and what the
/// counters did since the last line.
pub async fn log_stats(metrics: Arc<Metrics>, interval: Duration) {
    let mut last = metrics.snapshot();
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    loop {
        ticks.tick().await;
        let now = metrics.snapshot();
        tracing::info!(
            open = now.open,
            waiting = now.waiting,
            rooms = now.rooms,
            accepted = now.accepted - last.accepted,
            pairs = now.pairs - last.pairs,
            expired = now.expired - last.expired,
            punches_direct = now.punches_direct - last.punches_direct,
            punches_failed = now.punches_failed - last.punches_failed,
            rejects = now.rejects - last.rejects,
            rss_kib = resident_bytes().unwrap_or(0) / 1024,
            "stats (counts since the last line)"
        );
        last = now;
    }
}
