//! The first-line benchmark: what a user feels, from starting the program to
//! the other side's first line on the screen, for punchline and for a raw punch
//! baseline ([`crate::rawpunch`]) measured side by side in the same run.
//!
//! 1. For every pair of NAT kinds one lab is built, with punchline's rendezvous
//!    (in this process, the server code of the `rendezvous` binary) and the raw
//!    rendezvous (`rawpunch serve`) both in the rendezvous namespace.
//! 2. For every WAN profile and loss setting the lab's WAN is reshaped (the
//!    loss applies to each peer's link; a packet between the two peers crosses
//!    both), then runs alternate between punchline and the baseline, the first
//!    of the two alternating too, so both see the same machine load.
//! 3. A run starts both sides at the same instant: punchline as `peer --server
//!    RV CODE` with the same typed code on both sides and one line on stdin each;
//!    the baseline as `rawpunch connect` with the line on its command line. Each
//!    run uses fresh ports.
//! 4. Per side, the time from just before that side's process was spawned to
//!    the other side's line on its stdout (stamped by the thread reading the
//!    pipe) is one sample. Medians and p90 are over both sides of every run.
//!
//! Where punchline's time goes comes from its log (wall clock, this machine):
//! from each side's start to its go, to its TCP link up and to the end of its
//! encryption handshake. The raw baseline has no LAN candidates, so it cannot
//! work for two hosts on one LAN (the NAT does not hairpin): there only
//! punchline runs.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use punchline_rendezvous::Config;

use super::{pair_name, percentile};
use crate::error::{LabError, Result};
use crate::scenario::{
    after_go, log_time, peer_command, LabRendezvous, PeerProcess, PunchSpec, ENCRYPTED_LOG, GO_LOG,
    OURS, RV_PORT,
};
use crate::topology::{Host, Lab, LabConfig, Layout};
use crate::wan::WanConfig;

/// Port of the raw rendezvous in the rendezvous namespace.
pub const RAW_RV_PORT: u16 = RV_PORT + 20;

/// First local port of the peers' fixed ports; every run takes the next two.
const FIRST_PORT: u16 = 30000;

/// How long a run may take beyond the punch deadline before its missing lines
/// count as failures.
const RUN_SLACK: Duration = Duration::from_secs(10);

/// What to measure.
#[derive(Debug, Clone)]
pub struct FirstLineSpec {
    /// The pairs (without WAN shapes).
    pub pairs: Vec<LabConfig>,
    /// The WAN profiles, by name.
    pub profiles: Vec<(String, WanConfig)>,
    /// Loss probabilities (0..=1) put on each peer's WAN link, one setting after
    /// the other.
    pub losses: Vec<f64>,
    /// Runs per pair, profile, loss and program.
    pub runs: u32,
    /// Both programs' punch deadline.
    pub punch_timeout: Duration,
}

/// Samples of one program in one setting.
#[derive(Debug, Clone, Default)]
pub struct Times {
    /// Runs made.
    pub runs: u32,
    /// Start to the other's line shown, one per side that showed it.
    pub shown: Vec<Duration>,
    /// Sides that did not show the other's line in time.
    pub missed: u32,
    /// The first few reasons of misses (the side's last stderr line).
    pub why: Vec<String>,
}

/// Where punchline's time went, from each side's start (wall clock, log).
#[derive(Debug, Clone, Default)]
pub struct Phases {
    /// To the go from the rendezvous.
    pub go: Vec<Duration>,
    /// To TCP established on the punched link.
    pub link: Vec<Duration>,
    /// To the end of the encryption handshake.
    pub encrypted: Vec<Duration>,
    /// Sides whose chat was relayed instead of direct.
    pub relayed: u32,
}

/// One row of the table.
#[derive(Debug, Clone)]
pub struct Row {
    /// The pair's name.
    pub pair: String,
    /// The WAN profile's name.
    pub profile: String,
    /// Loss on each peer's link.
    pub loss: f64,
    /// Packets the WAN emulator dropped as loss during these runs, and packets
    /// it saw.
    pub lost: (u64, u64),
    /// punchline.
    pub punchline: Times,
    /// Its phases.
    pub phases: Phases,
    /// The raw baseline; `None` where it cannot work (same LAN).
    pub baseline: Option<Times>,
}

/// The rendezvous settings of the bench: the real defaults, except rate limits
/// high enough that one lab's back-to-back runs from the same two public
/// addresses are never slowed or refused.
fn rendezvous_config() -> Config {
    Config {
        connections_per_minute: 1_000_000,
        codes_per_minute: 1_000_000,
        ..Config::default()
    }
}

/// Runs the benchmark; `progress` gets one line per setting as it completes.
pub fn run(
    spec: &FirstLineSpec,
    peer_bin: &Path,
    raw_bin: &Path,
    mut progress: impl FnMut(&str),
) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let mut counter: u32 = 0;
    for pair in &spec.pairs {
        let Some((_, first_wan)) = spec.profiles.first() else {
            break;
        };
        let lab = Lab::build(&pair.with_wan(*first_wan))?;
        let rv = LabRendezvous::start_on(&lab, RV_PORT, rendezvous_config())?;
        // The raw tool punches IPv4 with no LAN candidates, no IPv6 and no
        // port mapping: where only those can work, it is not run.
        let raw_rv = match lab.config().layout {
            Layout::Separate { .. } if !pair.ipv6.enabled() && pair.port_mapping.is_none() => {
                Some(RawRendezvous::start(&lab, raw_bin)?)
            }
            _ => None,
        };
        let mut port = FIRST_PORT;
        for (profile, wan) in &spec.profiles {
            for &loss in &spec.losses {
                let mut shaped = *wan;
                shaped.a = shaped.a.with_loss(loss);
                shaped.b = shaped.b.with_loss(loss);
                lab.set_wan(shaped)?;
                let before = lab.wan_stats();
                let mut row = Row {
                    pair: pair_name(pair),
                    profile: profile.clone(),
                    loss,
                    lost: (0, 0),
                    punchline: Times::default(),
                    phases: Phases::default(),
                    baseline: raw_rv.as_ref().map(|_| Times::default()),
                };
                for run in 0..spec.runs {
                    // Alternate which program goes first, too.
                    let baseline_first = run % 2 == 1;
                    for second in [false, true] {
                        counter += 1;
                        let (port_a, port_b) = (port, port + 1);
                        port = port.checked_add(2).ok_or_else(|| {
                            LabError::Scenario("out of ports for the runs".into())
                        })?;
                        if second == baseline_first {
                            let code = format!("{counter}-first-line");
                            punchline_run(
                                &lab,
                                &rv,
                                peer_bin,
                                (port_a, port_b),
                                &code,
                                spec.punch_timeout,
                                &mut row,
                            )?;
                        } else if let (Some(raw_rv), Some(times)) = (&raw_rv, &mut row.baseline) {
                            baseline_run(
                                &lab,
                                raw_rv.addr,
                                raw_bin,
                                (port_a, port_b),
                                &format!("run{counter}"),
                                spec.punch_timeout,
                                times,
                            )?;
                        }
                    }
                }
                let after = lab.wan_stats();
                row.lost = (after.lost - before.lost, after.received - before.received);
                progress(&progress_line(&row));
                rows.push(row);
            }
        }
        drop(raw_rv);
        drop(rv);
    }
    Ok(rows)
}

fn progress_line(row: &Row) -> String {
    let med = |t: &Times| {
        let mut v = t.shown.clone();
        v.sort();
        percentile(&v, 50).map_or("–".into(), |d| format!("{} ms", d.as_millis()))
    };
    let mut line = format!(
        "{} {} loss {:.0}%: punchline {} ({} missed)",
        row.pair,
        row.profile,
        row.loss * 100.0,
        med(&row.punchline),
        row.punchline.missed
    );
    if let Some(b) = &row.baseline {
        let _ = write!(line, ", baseline {} ({} missed)", med(b), b.missed);
    }
    let _ = write!(
        line,
        "; emulator dropped {} of {} packets",
        row.lost.0, row.lost.1
    );
    line
}

/// `rawpunch serve` in the rendezvous namespace.
struct RawRendezvous {
    addr: SocketAddr,
    _process: PeerProcess,
}

impl RawRendezvous {
    fn start(lab: &Lab, raw_bin: &Path) -> Result<RawRendezvous> {
        let addr = SocketAddr::new(lab.addr(Host::Rv).into(), RAW_RV_PORT);
        let mut cmd = lab.command(Host::Rv, raw_bin);
        cmd.args(["serve", "--listen", &addr.to_string()]);
        let mut process = PeerProcess::spawn(cmd, "raw rendezvous")?;
        process.wait_stderr("rawpunch: listening on")?;
        Ok(RawRendezvous {
            addr,
            _process: process,
        })
    }
}

/// The line side `name` types.
fn line_of(name: &str) -> String {
    format!("first line from {name}")
}

/// Both sides at once; returns each side's start-to-shown time, if shown.
fn both(
    mut a: PeerProcess,
    mut b: PeerProcess,
    want: [&str; 2],
    deadline: Instant,
) -> Result<([Option<Duration>; 2], [PeerProcess; 2])> {
    let shown_a = a.wait_line_until(want[0], deadline);
    let shown_b = b.wait_line_until(want[1], deadline);
    a.kill()?;
    b.kill()?;
    let times = [
        shown_a.map(|t| t.saturating_duration_since(a.started)),
        shown_b.map(|t| t.saturating_duration_since(b.started)),
    ];
    Ok((times, [a, b]))
}

/// Records a run's times in `times`, with the reason of a miss.
fn record(times: &mut Times, shown: [Option<Duration>; 2], processes: &mut [PeerProcess; 2]) {
    times.runs += 1;
    for (t, p) in shown.into_iter().zip(processes.iter_mut()) {
        match t {
            Some(t) => times.shown.push(t),
            None => {
                times.missed += 1;
                if times.why.len() < 3 {
                    let last = p.drain_stderr().last().cloned().unwrap_or_default();
                    times.why.push(format!("{}: {last}", p.name));
                }
            }
        }
    }
}

fn punchline_run(
    lab: &Lab,
    rv: &LabRendezvous,
    bin: &Path,
    (port_a, port_b): (u16, u16),
    code: &str,
    punch_timeout: Duration,
    row: &mut Row,
) -> Result<()> {
    let spec = PunchSpec {
        code: code.to_owned(),
        port_a,
        port_b,
        strategy: OURS,
        punch_timeout,
        extra_args: Vec::new(),
    };
    let command = |host, name, port| peer_command(lab, host, bin, rv.addr, name, port, &spec);
    let mut a = PeerProcess::spawn(command(Host::A, "alice", port_a), "alice")?;
    let mut b = PeerProcess::spawn(command(Host::B, "bob", port_b), "bob")?;
    a.send(&format!("{}\n", line_of("alice")))?;
    b.send(&format!("{}\n", line_of("bob")))?;
    let want_a = format!("bob: {}", line_of("bob"));
    let want_b = format!("alice: {}", line_of("alice"));
    let deadline = Instant::now() + punch_timeout + RUN_SLACK;
    let (shown, mut processes) = both(a, b, [&want_a, &want_b], deadline)?;
    for p in &mut processes {
        phases(p, &mut row.phases);
    }
    record(&mut row.punchline, shown, &mut processes);
    Ok(())
}

/// With `LAB_BENCH_LOGS=DIR`, appends a side's log of one run to
/// `DIR/NAME.log` (runs apart by a line of dashes), to look into a slow run
/// (the peer's log level: `PUNCHLINE_PEER_LOG`).
fn keep_log(name: &str, lines: &[String]) {
    let Some(dir) = std::env::var_os("LAB_BENCH_LOGS") else {
        return;
    };
    let path = std::path::Path::new(&dir).join(format!("{name}.log"));
    let text = format!("---- run\n{}\n", lines.join("\n"));
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()));
    if let Err(e) = written {
        tracing::warn!(path = %path.display(), error = %e, "lab bench: log not kept");
    }
}

/// Whether a side's log says its chat was relayed: its status line is
/// "connected to NAME: relayed via the rendezvous …".
fn relayed(lines: &[String]) -> bool {
    lines
        .iter()
        .any(|l| l.starts_with("connected to ") && l.contains(": relayed via the rendezvous"))
}

/// Reads a side's phases from its log.
fn phases(p: &mut PeerProcess, phases: &mut Phases) {
    let started = p.started_wall;
    let name = p.name.clone();
    let lines = p.drain_stderr();
    keep_log(&name, lines);
    let since = |t: SystemTime| t.duration_since(started).ok();
    if relayed(lines) {
        phases.relayed += 1;
    }
    let go = lines
        .iter()
        .find(|l| l.contains(GO_LOG))
        .and_then(|l| log_time(l));
    let status = lines.iter().find(|l| l.starts_with("connected to "));
    let encrypted = lines
        .iter()
        .find(|l| l.contains(ENCRYPTED_LOG))
        .and_then(|l| log_time(l));
    if let Some(d) = go.and_then(since) {
        phases.go.push(d);
    }
    if let (Some(go), Some(elapsed)) = (go, status.and_then(|s| after_go(s))) {
        phases.link.extend(since(go + elapsed));
    }
    if let Some(d) = encrypted.and_then(since) {
        phases.encrypted.push(d);
    }
}

fn baseline_run(
    lab: &Lab,
    server: SocketAddr,
    bin: &Path,
    (port_a, port_b): (u16, u16),
    name: &str,
    punch_timeout: Duration,
    times: &mut Times,
) -> Result<()> {
    let command = |host, port: u16, line: String| -> Command {
        let mut cmd = lab.command(host, bin);
        cmd.args([
            "connect".to_owned(),
            "--server".into(),
            server.to_string(),
            "--port".into(),
            port.to_string(),
            "--name".into(),
            name.to_owned(),
            "--timeout".into(),
            punch_timeout.as_secs().max(1).to_string(),
            line,
        ]);
        cmd
    };
    let a = PeerProcess::spawn(command(Host::A, port_a, line_of("alice")), "raw a")?;
    let b = PeerProcess::spawn(command(Host::B, port_b, line_of("bob")), "raw b")?;
    let deadline = Instant::now() + punch_timeout + RUN_SLACK;
    let (want_a, want_b) = (line_of("bob"), line_of("alice"));
    let (shown, mut processes) = both(a, b, [&want_a, &want_b], deadline)?;
    record(times, shown, &mut processes);
    Ok(())
}

fn sorted(v: &[Duration]) -> Vec<Duration> {
    let mut v = v.to_vec();
    v.sort();
    v
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("–".to_owned(), |d| {
        format!("{:.0}", d.as_secs_f64() * 1e3)
    })
}

fn ratio(a: Option<Duration>, b: Option<Duration>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if !b.is_zero() => {
            format!("{:.2}x", a.as_secs_f64() / b.as_secs_f64())
        }
        _ => "–".to_owned(),
    }
}

/// The table's column headings, in order.
pub const COLUMNS: [&str; 12] = [
    "pair",
    "profile",
    "loss",
    "punchline median ms",
    "punchline p90 ms",
    "baseline median ms",
    "baseline p90 ms",
    "ratio median",
    "ratio p90",
    "shown (punchline, baseline)",
    "punchline: go / link / encrypted, median (p90) ms",
    "emulator lost packets",
];

/// The results as a Markdown table, with a legend of the profiles.
pub fn table(spec: &FirstLineSpec, rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Time from a side's process start to the other side's line shown on its stdout, \
         every side of {} run(s) per program and setting (medians and p90 over both sides). \
         Ratios are punchline / baseline. The homes of each pair share one private range. \
         Profiles (one-way link delays):",
        spec.runs
    );
    for (name, w) in &spec.profiles {
        let _ = write!(
            out,
            "\n- `{name}`: A {} ms, B {} ms, rendezvous {} ms",
            w.a.delay.as_millis(),
            w.b.delay.as_millis(),
            w.rv.delay.as_millis()
        );
        if let Some(d) = w.detour {
            let _ = write!(
                out,
                ", plus {} ms on the path {:?}-{:?} only",
                d.delay.as_millis(),
                d.from,
                d.to
            );
        }
    }
    let _ = writeln!(
        out,
        "\n\nLoss is put on each peer's link (a packet between the peers crosses two).\n"
    );
    let _ = writeln!(out, "| {} |", COLUMNS.join(" | "));
    let _ = writeln!(
        out,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in rows {
        let p = sorted(&r.punchline.shown);
        let (p50, p90) = (percentile(&p, 50), percentile(&p, 90));
        let shown = |t: &Times| format!("{}/{}", t.shown.len(), 2 * t.runs);
        let (b50, b90, b_shown) = match &r.baseline {
            Some(b) => {
                let v = sorted(&b.shown);
                (percentile(&v, 50), percentile(&v, 90), shown(b))
            }
            None => (
                None,
                None,
                "not run (it has no LAN candidates, IPv6 or port mapping)".to_owned(),
            ),
        };
        let phase = |v: &[Duration]| {
            let v = sorted(v);
            format!("{} ({})", ms(percentile(&v, 50)), ms(percentile(&v, 90)))
        };
        let relayed = if r.phases.relayed > 0 {
            format!(", {} side(s) relayed", r.phases.relayed)
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "| {} | {} | {:.0}% | {} | {} | {} | {} | {} | {} | {}, {} | {} / {} / {}{relayed} | {} of {} |",
            r.pair,
            r.profile,
            r.loss * 100.0,
            ms(p50),
            ms(p90),
            ms(b50),
            ms(b90),
            ratio(p50, b50),
            ratio(p90, b90),
            shown(&r.punchline),
            b_shown,
            phase(&r.phases.go),
            phase(&r.phases.link),
            phase(&r.phases.encrypted),
            r.lost.0,
            r.lost.1,
        );
    }
    let misses: Vec<String> = rows
        .iter()
        .flat_map(|r| {
            let mut v: Vec<String> = r
                .punchline
                .why
                .iter()
                .map(|w| {
                    format!(
                        "{} {} {:.0}%, punchline: {w}",
                        r.pair,
                        r.profile,
                        r.loss * 100.0
                    )
                })
                .collect();
            if let Some(b) = &r.baseline {
                v.extend(b.why.iter().map(|w| {
                    format!(
                        "{} {} {:.0}%, baseline: {w}",
                        r.pair,
                        r.profile,
                        r.loss * 100.0
                    )
                }));
            }
            v
        })
        .collect();
    if !misses.is_empty() {
        let _ = writeln!(out, "\nLines not shown (last stderr line of the side):\n");
        for m in misses {
            let _ = writeln!(out, "- {m}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relayed_chat_is_counted() {
        let log = |s: &str| {
            vec!["2026-12-03T15:37:37.519922Z  INFO punchline_peer::meet: relayed and encrypted carried=1".to_owned(), s.to_owned()]
        };
        assert!(relayed(&log(
            "connected to bob: relayed via the rendezvous (end-to-end encrypted; it sees only ciphertext): direct connection failed because …"
        )));
        assert!(!relayed(&log(
            "connected to bob: direct link to 198.51.100.2:30033 (IPv4, public address), 90 ms after go, 2 attempts"
        )));
    }

    #[test]
    fn table_has_every_column_and_ratio() {
        let spec = FirstLineSpec {
            pairs: Vec::new(),
            profiles: vec![("asymmetric".into(), WanConfig::delays_ms(5, 40, 20))],
            losses: vec![0.0],
            runs: 1,
            punch_timeout: Duration::from_secs(10),
        };
        let ms = Duration::from_millis;
        let row = Row {
            pair: "home/home".into(),
            profile: "asymmetric".into(),
            loss: 0.03,
            lost: (3, 100),
            punchline: Times {
                runs: 1,
                shown: vec![ms(400), ms(600)],
                ..Times::default()
            },
            phases: Phases::default(),
            baseline: Some(Times {
                runs: 1,
                shown: vec![ms(200), ms(300)],
                ..Times::default()
            }),
        };
        let text = table(&spec, &[row]);
        assert!(text.contains(&COLUMNS.join(" | ")), "{text}");
        assert!(
            text.contains("| home/home | asymmetric | 3% | 400 | 600 | 200 | 300 | 2.00x | 2.00x | 2/2, 2/2 |"),
            "{text}"
        );
    }
}
