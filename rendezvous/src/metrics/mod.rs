//! What the server counts: for the periodic stats line in the log ([`log_stats`])
//! and for the optional metrics endpoint (`--metrics ADDR`, [`serve_metrics`], in
//! `http`), which answers `GET /metrics` in the Prometheus/OpenMetrics text format.
//! A leaf: it imports nothing of the server.
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

mod http;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use punchline_proto::PunchOutcome;

use crate::reject::ALL_REJECTS;

pub use crate::reject::Reject;
pub use http::serve_metrics;

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

/// The resident memory of this process, from `/proc/self/statm`.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions; it only reads a system constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
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
