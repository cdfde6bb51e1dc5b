//! Benchmark of a chat that survives (`lab bench-resilience`):
//!
//! - **Recovery**: two peers behind home/rst NATs chat directly while each sends a
//!   line every 100 ms; a rule in A's NAT resets their connection and cuts the
//!   path for a few seconds, then goes. Measured: the time from the path coming
//!   back to each side saying its link is back, and to the first line typed after
//!   the cut arriving; lines lost and lines doubled (both must be 0).
//! - **Relay against direct**: the round-trip time of a chat line (a line one way,
//!   its echo back) and the time to carry a burst of lines, over a relayed link
//!   (symmetric/home, where punching cannot work) and over a direct one
//!   (home/home), with the same emulated delays.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::scenario::{punch, start_pair, LabRendezvous, Outcome, PeerProcess, PunchSpec, OURS};
use crate::{Host, Lab, LabConfig, LabError, NatKind, Result, Side, WanConfig};

/// One-way delays (ms) of the links: side A, side B, rendezvous.
pub const DELAYS: (u64, u64, u64) = (5, 10, 5);

fn lab(a: NatKind, b: NatKind) -> Result<Lab> {
    let (da, db, drv) = DELAYS;
    Lab::build(&LabConfig::new(a, b).with_wan(WanConfig::delays_ms(da, db, drv)))
}

fn spec(code: String) -> PunchSpec {
    PunchSpec {
        code,
        port_a: 40000,
        port_b: 40001,
        strategy: OURS,
        punch_timeout: Duration::from_secs(10),
        extra_args: Vec::new(),
    }
}

fn failure(what: impl Into<String>) -> LabError {
    LabError::Scenario(what.into())
}

/// One cut-and-restore round.
#[derive(Debug, Clone)]
pub struct Recovery {
    /// How long each side was without a link, by its own status line (A, B).
    pub link_back: (Duration, Duration),
    /// From the path coming back to the first line sent during the cut arriving
    /// on the other side (the later of the two directions).
    pub flowing: Duration,
    /// Lines sent by both sides.
    pub sent: usize,
    /// Lines that never arrived.
    pub lost: usize,
    /// Lines shown more than once.
    pub doubled: usize,
}

/// Runs one round: chat, cut the path for `cut`, restore it, count.
pub fn recovery_round(bin: &Path, round: u32, cut: Duration) -> Result<Recovery> {
    let lab = lab(NatKind::Home, NatKind::Rst)?;
    let rv = LabRendezvous::start(&lab, rendezvous_config())?;
    let Outcome::Connected(mut c) =
        punch(&lab, &rv, bin, &spec(format!("{}-cut-bench", 10 + round)))?
    else {
        return Err(failure("no direct link to start from"));
    };
    let b_public = lab.public_addr(Host::B);
    const TICK: Duration = Duration::from_millis(100);
    let before = Duration::from_secs(1);
    let after = Duration::from_secs(4);
    let started = Instant::now();
    let mut n = 0usize;
    let mut cut_done = false;
    let mut restored: Option<Instant> = None;
    let mut first_in_cut = None;
    // Every line received, with when it was read (within a few ms of arrival).
    let mut at_a: Vec<(String, Instant)> = Vec::new();
    let mut at_b: Vec<(String, Instant)> = Vec::new();
    while restored.is_none_or(|r| r.elapsed() < after) {
        n += 1;
        c.a.send(&format!("a{n}\n"))?;
        c.b.send(&format!("b{n}\n"))?;
        let t = started.elapsed();
        if !cut_done && t >= before {
            lab.cut_path(Side::A, b_public)?;
            cut_done = true;
            first_in_cut = Some(n + 1);
        }
        if cut_done && restored.is_none() && t >= before + cut {
            lab.restore_path(Side::A)?;
            restored = Some(Instant::now());
        }
        let tick_end = Instant::now() + TICK;
        while Instant::now() < tick_end {
            if let Some(line) = c.a.try_recv(Duration::from_millis(2)) {
                at_a.push((line, Instant::now()));
            }
            if let Some(line) = c.b.try_recv(Duration::from_millis(2)) {
                at_b.push((line, Instant::now()));
            }
        }
    }
    let restored = restored.ok_or_else(|| failure("path never restored"))?;
    let first_in_cut = first_in_cut.unwrap_or(1);
    // The rest of the lines; then which arrived, and when the first line typed
    // in the cut did.
    let collect = |p: &mut PeerProcess, lines: &mut Vec<(String, Instant)>, prefix: &str| {
        let numbers = |lines: &[(String, Instant)]| -> Vec<(usize, Instant)> {
            lines
                .iter()
                .filter_map(|(line, at)| {
                    let i = line
                        .split_once(": ")?
                        .1
                        .strip_prefix(prefix)?
                        .parse()
                        .ok()?;
                    Some((i, *at))
                })
                .collect()
        };
        while numbers(lines).last().map(|(i, _)| *i) != Some(n) {
            match p.try_recv(Duration::from_secs(15)) {
                Some(line) => lines.push((line, Instant::now())),
                None => break,
            }
        }
        let got = numbers(lines);
        let flowing = got
            .iter()
            .find(|(i, _)| *i == first_in_cut)
            .map(|(_, at)| *at);
        (got.into_iter().map(|(i, _)| i).collect::<Vec<_>>(), flowing)
    };
    let (at_b, flow_b) = collect(&mut c.b, &mut at_b, "a");
    let (at_a, flow_a) = collect(&mut c.a, &mut at_a, "b");
    let back_a = down_time(&mut c.a)?;
    let back_b = down_time(&mut c.b)?;
    let count = |got: &[usize]| {
        let mut seen = vec![0usize; n + 1];
        for &i in got {
            if i <= n {
                seen[i] += 1;
            }
        }
        let lost = (1..=n).filter(|&i| seen[i] == 0).count();
        let doubled = (1..=n).filter(|&i| seen[i] > 1).count();
        (lost, doubled)
    };
    let (lost_b, doubled_b) = count(&at_b);
    let (lost_a, doubled_a) = count(&at_a);
    let flowing = match (flow_a, flow_b) {
        (Some(a), Some(b)) => a.max(b).saturating_duration_since(restored),
        _ => Duration::MAX,
    };
    c.finish()?;
    drop(rv);
    Ok(Recovery {
        link_back: (back_a, back_b),
        flowing,
        sent: 2 * n,
        lost: lost_a + lost_b,
        doubled: doubled_a + doubled_b,
    })
}

/// How long a side was without a link, as its status line tells the user:
/// "link back after X s", counted from when it saw the link drop.
fn down_time(p: &mut PeerProcess) -> Result<Duration> {
    let line = p.wait_stderr("link back after")?;
    let secs: f64 = line
        .split_once("link back after ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| failure(format!("unreadable status line {line:?}")))?;
    Ok(Duration::from_secs_f64(secs))
}

fn rendezvous_config() -> punchline_rendezvous::Config {
    punchline_rendezvous::Config::default()
}

/// Line round trips and a burst over one link.
#[derive(Debug, Clone)]
pub struct Carriage {
    /// The best round trip of a line and its echo.
    pub rtt_best: Duration,
    /// The median round trip.
    pub rtt_median: Duration,
    /// Lines per second of a burst of [`BURST`] lines one way.
    pub lines_per_sec: f64,
}

/// Lines in the throughput burst.
pub const BURST: usize = 2000;

/// Measures a link between two started peers.
fn carriage(a: &mut PeerProcess, b: &mut PeerProcess, rounds: u32) -> Result<Carriage> {
    let mut rtts = Vec::new();
    for i in 0..rounds {
        let t = Instant::now();
        a.send(&format!("ping {i}\n"))?;
        expect(b, &format!("alice: ping {i}"))?;
        b.send(&format!("pong {i}\n"))?;
        expect(a, &format!("bob: pong {i}"))?;
        rtts.push(t.elapsed());
    }
    rtts.sort();
    let mut burst = String::new();
    for i in 0..BURST {
        let _ = writeln!(burst, "burst {i}");
    }
    let t = Instant::now();
    a.send(&burst)?;
    for i in 0..BURST {
        expect(b, &format!("alice: burst {i}"))?;
    }
    let took = t.elapsed();
    Ok(Carriage {
        rtt_best: rtts[0],
        rtt_median: rtts[rtts.len() / 2],
        lines_per_sec: BURST as f64 / took.as_secs_f64(),
    })
}

fn expect(p: &mut PeerProcess, want: &str) -> Result<()> {
    let got = p.recv()?;
    if got == want {
        Ok(())
    } else {
        Err(failure(format!(
            "{} got {got:?}, expected {want:?}",
            p.name
        )))
    }
}

/// Relayed (symmetric/home) and direct (home/home) carriage, same delays.
pub fn relay_against_direct(bin: &Path, rounds: u32) -> Result<(Carriage, Carriage)> {
    let relayed = {
        let lab = lab(NatKind::Symmetric, NatKind::Home)?;
        let rv = LabRendezvous::start(&lab, rendezvous_config())?;
        let (mut a, mut b) = start_pair(&lab, &rv, bin, &spec("20-relay-bench".into()))?;
        for p in [&mut a, &mut b] {
            let line = p.wait_stderr_starting(&["connected to ", "peer: "])?;
            if !line.contains("relayed via the rendezvous") {
                return Err(failure(format!("{}: not relayed: {line}", p.name)));
            }
        }
        let m = carriage(&mut a, &mut b, rounds)?;
        a.close_stdin();
        a.wait()?;
        b.wait()?;
        m
    };
    let direct = {
        let lab = lab(NatKind::Home, NatKind::Home)?;
        let rv = LabRendezvous::start(&lab, rendezvous_config())?;
        let Outcome::Connected(mut c) = punch(&lab, &rv, bin, &spec("21-direct-bench".into()))?
        else {
            return Err(failure("no direct link"));
        };
        let m = carriage(&mut c.a, &mut c.b, rounds)?;
        c.finish()?;
        m
    };
    Ok((relayed, direct))
}

/// Runs the whole benchmark and returns its Markdown.
pub fn run(bin: &Path, rounds: u32, cut: Duration, progress: impl Fn(&str)) -> Result<String> {
    let (da, db, drv) = DELAYS;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "One-way delays: A {da} ms, B {db} ms, rendezvous {drv} ms (A-B round trip {} ms).\n",
        2 * (da + db)
    );
    let _ = writeln!(
        out,
        "## Recovery after a reset and a {:.0} s cut (home/rst)\n",
        cut.as_secs_f64()
    );
    let _ = writeln!(out, "| round | A without a link | B without a link | path back → first line typed in the cut arrives | lines sent | lost | doubled |");
    let _ = writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|");
    let mut backs = Vec::new();
    let (mut lost, mut doubled) = (0, 0);
    for round in 1..=rounds {
        progress(&format!("recovery round {round}/{rounds}"));
        let r = recovery_round(bin, round, cut)?;
        let _ = writeln!(
            out,
            "| {round} | {} | {} | {} | {} | {} | {} |",
            ms(r.link_back.0),
            ms(r.link_back.1),
            ms(r.flowing),
            r.sent,
            r.lost,
            r.doubled
        );
        backs.push(r.flowing);
        lost += r.lost;
        doubled += r.doubled;
    }
    backs.sort();
    let _ = writeln!(
        out,
        "\nMedian from the path's return to the chat flowing again: {}; lines lost in all rounds: {lost}; doubled: {doubled}.\n",
        ms(backs[backs.len() / 2])
    );
    progress("relay against direct");
    let (relayed, direct) = relay_against_direct(bin, 20)?;
    let _ = writeln!(out, "## Relayed against direct\n");
    let _ = writeln!(
        out,
        "| link | line round trip, best | median | burst of {BURST} lines |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|");
    for (name, m) in [
        ("relayed (symmetric/home)", &relayed),
        ("direct (home/home)", &direct),
    ] {
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {:.0} lines/s |",
            ms(m.rtt_best),
            ms(m.rtt_median),
            m.lines_per_sec
        );
    }
    let _ = writeln!(
        out,
        "\nThe relay adds {} to a line's round trip (median; the path through the rendezvous is {} ms against {} ms direct) and carries a burst at {:.2}× the direct rate.",
        ms(relayed.rtt_median.saturating_sub(direct.rtt_median)),
        2 * (da + drv) + 2 * (db + drv),
        2 * (da + db),
        relayed.lines_per_sec / direct.lines_per_sec
    );
    Ok(out)
}

fn ms(d: Duration) -> String {
    if d == Duration::MAX {
        "never".to_owned()
    } else {
        format!("{:.0} ms", d.as_secs_f64() * 1000.0)
    }
}
