//! The punch benchmark: each pair of NAT kinds, many runs, punchline's strategy
//! against a naive baseline, in one table.
//!
//! For every pair a lab is built once, with two rendezvous servers in it: one
//! synchronising the go (punchline), one sending it to both peers at once (the
//! baseline, whose peers also retry on a fixed 100 ms pause). Runs alternate
//! between the two, so both see the same machine load. Each run uses fresh ports,
//! so no state of an earlier run (TIME_WAIT, NAT entries) is reused.
//!
//! Punch time is measured from the pairing at the rendezvous to the later of the
//! two peers' link-ups, and reported in ms and as a multiple of the bound: the
//! earliest both peers can learn of the pairing (the larger one-way delay from
//! the rendezvous) plus one A-B round trip for the crossing SYNs and their answers.
//! The attempts column counts connection attempts (each one SYN, as a punch
//! attempt never waits for the kernel's retransmission except on a silent
//! path) per peer, the larger of the two, over all runs, failed ones too: what
//! a punch costs the addresses it aims at. The last column is what securing
//! the link adds after the punch (link check, choice of the link, Noise
//! handshake), in ms and in A-B round trips.
//!
//! The two homes of every pair use the same private range (10.0.1.0/24, each
//! host at .10), as most real homes share 192.168.1.0/24: each side's LAN
//! candidate then points into the other's own LAN.
//!
//! [`first_line`] measures what a user feels instead: from the start of the
//! program to the other side's first line, against a raw punch tool.

pub mod first_line;

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use punchline_rendezvous::Config;

use crate::error::Result;
use crate::scenario::{punch, LabRendezvous, Outcome, PunchSpec, NAIVE, OURS, RV_PORT};
use crate::topology::{Host, Lab, LabConfig};
use crate::wan::WanConfig;
use crate::NatKind;

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchSpec {
    /// The pairs, as lab configurations (without WAN shapes).
    pub pairs: Vec<LabConfig>,
    /// A name for the WAN profile, for the table's heading.
    pub profile: String,
    /// The emulated WAN.
    pub wan: WanConfig,
    /// Runs per pair and strategy.
    pub runs: u32,
    /// The peers' punch deadline where a punch is expected to work.
    pub punch_timeout: Duration,
    /// The deadline where it is not (symmetric NATs): only the failure is shown.
    pub hopeless_timeout: Duration,
}

/// The WAN profiles the benchmark runs by default: the asymmetric delays,
/// and a rendezvous far from B while A and B are close to each other (where an
/// unsynchronised go reaches A long before B).
pub fn default_profiles() -> Vec<(String, WanConfig)> {
    vec![
        ("asymmetric".into(), WanConfig::delays_ms(5, 40, 20)),
        (
            "far-rendezvous".into(),
            WanConfig::delays_ms(2, 3, 10).with_detour(
                crate::Link::Rv,
                crate::Link::B,
                Duration::from_millis(80),
            ),
        ),
    ]
}

/// The pairs of the lab matrix, punchable ones first, then symmetric/home; the
/// two homes of each pair share one private range.
pub fn default_pairs() -> Vec<LabConfig> {
    use NatKind::*;
    let mut pairs: Vec<LabConfig> = [
        (Home, Home),
        (Rst, Rst),
        (Home, Rst),
        (Range, Home),
        (Range, Range),
        (Public, Home),
        (Firewall, Home),
        (Cgnat, Cgnat),
        (Cgnat, Rst),
    ]
    .into_iter()
    .map(|(a, b)| LabConfig::new(a, b).with_overlapping_lans())
    .collect();
    pairs.push(LabConfig::same_lan(Home));
    pairs.push(LabConfig::new(Symmetric, Home).with_overlapping_lans());
    pairs
}

/// Pairs that IPv4 punching alone cannot connect, made direct by what the
/// peer reaches for besides: IPv6 beside symmetric NATs on both sides, IPv6
/// alone, and a symmetric NAT whose router grants port mappings (PCP and
/// NAT-PMP, or UPnP-IGD alone). Only the
/// first-line bench runs them (its table shows success and time to the first
/// line; the raw baseline cannot work there).
pub fn reach_pairs() -> Vec<LabConfig> {
    use NatKind::*;
    vec![
        LabConfig::new(Symmetric, Symmetric)
            .with_overlapping_lans()
            .with_ipv6(),
        LabConfig::new(Home, Firewall).with_ipv6_only(),
        LabConfig::new(Symmetric, Home)
            .with_overlapping_lans()
            .with_port_mapping(crate::portmap::Protocols::BOTH),
        LabConfig::new(Symmetric, Home)
            .with_overlapping_lans()
            .with_port_mapping(crate::portmap::Protocols::UPNP),
    ]
}

/// Name of a pair for the table.
pub fn pair_name(config: &LabConfig) -> String {
    let mut name = match config.layout {
        crate::Layout::Separate { a, b } => format!("{}/{}", a.name(), b.name()),
        crate::Layout::SameLan(kind) => format!("same-lan ({})", kind.name()),
    };
    match config.ipv6 {
        crate::Ipv6Mode::Off => {}
        crate::Ipv6Mode::DualStack => name.push_str("+ipv6"),
        crate::Ipv6Mode::Only => name.push_str("+ipv6-only"),
    }
    match config.port_mapping {
        None => {}
        Some(p) if p == crate::portmap::Protocols::UPNP => name.push_str("+upnp"),
        Some(_) => name.push_str("+mapping"),
    }
    name
}

/// Results of one strategy on one pair.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// Runs made.
    pub runs: u32,
    /// Punch times of the successful runs.
    pub times: Vec<Duration>,
    /// Attempts of the peer that made more, every run (failed ones too).
    pub attempts: Vec<u32>,
    /// Link check and encryption handshake after the punch, successful runs.
    pub secure: Vec<Duration>,
    /// Successful runs whose punch time could not be measured.
    pub unmeasured: u32,
}

impl Sample {
    fn successes(&self) -> u32 {
        self.times.len() as u32 + self.unmeasured
    }
}

/// One row pair of the table.
#[derive(Debug, Clone)]
pub struct PairResult {
    /// The pair's name.
    pub name: String,
    /// The bound of the pair (see the module docs).
    pub bound: Duration,
    /// The emulated A-B round trip.
    pub rtt_ab: Duration,
    /// punchline's results.
    pub ours: Sample,
    /// The baseline's results.
    pub naive: Sample,
}

/// Runs the benchmark; `progress` gets one line per pair as it completes.
pub fn run(
    spec: &BenchSpec,
    peer_bin: &Path,
    mut progress: impl FnMut(&str),
) -> Result<Vec<PairResult>> {
    let mut results = Vec::new();
    for (p, pair) in spec.pairs.iter().enumerate() {
        let config = pair.with_wan(spec.wan);
        let lab = Lab::build(&config)?;
        let synced = LabRendezvous::start_on(&lab, RV_PORT, Config::default())?;
        let naive_config = Config {
            synchronise_go: false,
            ..Config::default()
        };
        let unsynced = LabRendezvous::start_on(&lab, RV_PORT + 10, naive_config)?;
        let hopeless = matches!(config.layout, crate::Layout::Separate { a, b } if !a.punchable() || !b.punchable());
        let timeout = if hopeless {
            spec.hopeless_timeout
        } else {
            spec.punch_timeout
        };
        let bound = lab
            .one_way_delay(Host::Rv, Host::A)
            .max(lab.one_way_delay(Host::Rv, Host::B))
            + lab.rtt(Host::A, Host::B);
        let mut ours = Sample::default();
        let mut naive = Sample::default();
        for run in 0..spec.runs {
            for (strategy, rv, sample) in
                [(OURS, &synced, &mut ours), (NAIVE, &unsynced, &mut naive)]
            {
                let index = 2 * run + u32::from(strategy == NAIVE);
                let port = 30000 + 2 * u16::try_from(index).unwrap_or(0);
                let spec = PunchSpec {
                    code: format!(
                        "{}-{}-{}",
                        p * 1000 + run as usize,
                        spec.profile,
                        strategy.name
                    ),
                    port_a: port,
                    port_b: port + 1,
                    strategy,
                    punch_timeout: timeout,
                    // The punch is what is measured: a failure must stay one,
                    // not turn into a relayed chat.
                    extra_args: vec!["--no-relay".into()],
                };
                one_run(&lab, rv, peer_bin, &spec, sample)?;
            }
        }
        let name = pair_name(pair);
        progress(&format!(
            "{}: {name}: punchline {}/{}, naive {}/{}",
            spec.profile,
            ours.successes(),
            ours.runs,
            naive.successes(),
            naive.runs
        ));
        results.push(PairResult {
            name,
            bound,
            rtt_ab: lab.rtt(Host::A, Host::B),
            ours,
            naive,
        });
    }
    Ok(results)
}

fn one_run(
    lab: &Lab,
    rv: &LabRendezvous,
    bin: &Path,
    spec: &PunchSpec,
    sample: &mut Sample,
) -> Result<()> {
    sample.runs += 1;
    match punch(lab, rv, bin, spec)? {
        Outcome::Connected(c) => {
            match c.punch_time {
                Some(t) => sample.times.push(t),
                None => sample.unmeasured += 1,
            }
            sample.attempts.push(c.a_up.attempts.max(c.b_up.attempts));
            sample.secure.extend(c.secure_time);
            c.finish()?;
        }
        Outcome::Failed(f) => {
            if let Some(n) = failed_attempts(&f.a_error).max(failed_attempts(&f.b_error)) {
                sample.attempts.push(n);
            }
        }
    }
    Ok(())
}

/// The attempt count of a peer's punch failure ("no direct connection to ...
/// (N attempts in S s)").
fn failed_attempts(error: &str) -> Option<u32> {
    let (before, _) = error.split_once(" attempts in ")?;
    before.rsplit_once('(')?.1.trim().parse().ok()
}

/// Nearest-rank percentile of sorted `values` (`q` in 0..=100).
fn percentile<T: Copy>(sorted: &[T], q: usize) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len()).div_ceil(100).max(1);
    sorted.get(rank - 1).copied()
}

/// The results as a Markdown table.
pub fn table(spec: &BenchSpec, results: &[PairResult]) -> String {
    let ms = |d: Duration| d.as_millis();
    let w = &spec.wan;
    let mut out = String::new();
    let _ = write!(
        out,
        "## Profile `{}`\n\nOne-way link delays: A {} ms, B {} ms, rendezvous {} ms",
        spec.profile,
        ms(w.a.delay),
        ms(w.b.delay),
        ms(w.rv.delay)
    );
    if let Some(d) = w.detour {
        let _ = write!(
            out,
            ", plus {} ms on the path {:?}-{:?} only",
            ms(d.delay),
            d.from,
            d.to
        );
    }
    let _ = writeln!(
        out,
        ". {} runs per pair and strategy. Bound = larger one-way delay rendezvous→peer + one A-B RTT. The homes of each pair share one private range.\n",
        spec.runs
    );
    let _ = writeln!(
        out,
        "| pair | bound ms | strategy | success | median ms | p95 ms | median ×bound | p95 ×bound | attempts/peer, all runs: median (max) | then secured, ms (×A-B RTT) |"
    );
    let _ = writeln!(out, "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in results {
        for (name, s) in [(OURS.name, &r.ours), (NAIVE.name, &r.naive)] {
            let mut times = s.times.clone();
            times.sort();
            let mut attempts = s.attempts.clone();
            attempts.sort();
            let ms = |d: Option<Duration>| {
                d.map_or("–".to_owned(), |d| {
                    format!("{:.1}", d.as_secs_f64() * 1e3)
                })
            };
            let ratio = |d: Option<Duration>| {
                d.filter(|_| !r.bound.is_zero())
                    .map_or("–".to_owned(), |d| {
                        format!("{:.2}", d.as_secs_f64() / r.bound.as_secs_f64())
                    })
            };
            let (p50, p95) = (percentile(&times, 50), percentile(&times, 95));
            let mut secure = s.secure.clone();
            secure.sort();
            let secured = percentile(&secure, 50).map_or("–".to_owned(), |d| {
                let rtts = if r.rtt_ab.is_zero() {
                    "LAN".to_owned()
                } else {
                    format!("{:.2}", d.as_secs_f64() / r.rtt_ab.as_secs_f64())
                };
                format!("{:.1} ({rtts})", d.as_secs_f64() * 1e3)
            });
            let _ = writeln!(
                out,
                "| {} | {} | {name} | {}/{} ({:.0}%) | {} | {} | {} | {} | {} | {secured} |",
                r.name,
                r.bound.as_millis(),
                s.successes(),
                s.runs,
                100.0 * f64::from(s.successes()) / f64::from(s.runs.max(1)),
                ms(p50),
                ms(p95),
                ratio(p50),
                ratio(p95),
                percentile(&attempts, 50).map_or("–".to_owned(), |a| format!(
                    "{a} ({})",
                    attempts.last().copied().unwrap_or(a)
                )),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u32> = (1..=20).collect();
        assert_eq!(percentile(&v, 50), Some(10));
        assert_eq!(percentile(&v, 95), Some(19));
        assert_eq!(percentile(&v, 100), Some(20));
        assert_eq!(percentile(&[7u32], 95), Some(7));
        assert_eq!(percentile::<u32>(&[], 50), None);
    }

    #[test]
    fn attempts_are_read_from_a_punch_failure() {
        let e =
            "peer: no direct connection to the other side (37 attempts in 3.0 s).\nThe cause...";
        assert_eq!(failed_attempts(e), Some(37));
        assert_eq!(failed_attempts("peer: cannot reach the rendezvous"), None);
    }
}
