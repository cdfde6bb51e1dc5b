//! The first-line benchmark's parts in a real lab: the raw punch baseline
//! (`rawpunch`) connects two homes that share one private range and each side
//! prints the other's line; `lab bench --first-line` runs one run per program on
//! one pair and prints its table with every column.
//!
//! Needs root; skips loudly otherwise (see `common::lab_available`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use punchline_lab::bench::first_line::COLUMNS;
use punchline_lab::scenario::{PeerProcess, WAIT};
use punchline_lab::{Host, LabConfig, NatKind, WanConfig};

const RAWPUNCH: &str = env!("CARGO_BIN_EXE_rawpunch");
const LAB: &str = env!("CARGO_BIN_EXE_lab");

#[test]
fn raw_baseline_connects_two_homes() {
    if !common::lab_available("raw_baseline_connects_two_homes") {
        return;
    }
    let lab = common::build(
        &LabConfig::new(NatKind::Home, NatKind::Home)
            .with_overlapping_lans()
            .with_wan(WanConfig::delays_ms(5, 40, 20)),
    );
    let server = format!("{}:7445", lab.addr(Host::Rv));
    let mut rv = lab.command(Host::Rv, RAWPUNCH);
    rv.args(["serve", "--listen", &server]);
    let mut rv = PeerProcess::spawn(rv, "raw rendezvous").expect("start the raw rendezvous");
    rv.wait_stderr("rawpunch: listening on")
        .expect("the raw rendezvous listens");

    let client = |host: Host, port: &str, line: &str| {
        let mut cmd = lab.command(host, RAWPUNCH);
        cmd.args([
            "connect", "--server", &server, "--port", port, "--name", "test", line,
        ]);
        PeerProcess::spawn(cmd, &format!("raw {host:?}")).expect("start a raw client")
    };
    let mut a = client(Host::A, "31000", "line from a");
    let mut b = client(Host::B, "31001", "line from b");
    let deadline = Instant::now() + WAIT;
    let got_a = a.wait_line_until("line from b", deadline);
    let got_b = b.wait_line_until("line from a", deadline);
    let status_a = a.wait().expect("a exits");
    let status_b = b.wait().expect("b exits");
    assert!(
        got_a.is_some() && got_b.is_some() && status_a.success() && status_b.success(),
        "a: line {got_a:?}, {status_a}, stderr {:?}\nb: line {got_b:?}, {status_b}, stderr {:?}",
        a.drain_stderr(),
        b.drain_stderr()
    );
    // The link was direct: each linked to the other's public address.
    for (p, other) in [(&mut a, Host::B), (&mut b, Host::A)] {
        let want = format!("rawpunch: linked to {}:", lab.public_addr(other));
        assert!(
            p.drain_stderr().iter().any(|l| l.starts_with(&want)),
            "{}: no {want:?} in {:?}",
            p.name,
            p.stderr_seen
        );
    }
}

/// Builds the workspace's `peer` binary in the profile of this test's binaries
/// and returns its path.
fn peer_binary() -> PathBuf {
    let dir = Path::new(LAB).parent().expect("binary directory");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build.args(["build", "-p", "punchline-peer", "--bin", "peer"]);
    if dir.ends_with("release") {
        build.arg("--release");
    }
    let status = build.status().expect("run cargo build");
    assert!(status.success(), "cargo build of peer failed: {status}");
    dir.join("peer")
}

#[test]
fn first_line_bench_prints_its_table() {
    if !common::lab_available("first_line_bench_prints_its_table") {
        return;
    }
    let peer = peer_binary();
    let out = Command::new(LAB)
        .args([
            "bench",
            "--first-line",
            "--runs",
            "1",
            "--pairs",
            "home/home",
            "--profiles",
            "asymmetric",
            "--loss",
            "0",
        ])
        .arg("--peer")
        .arg(&peer)
        .arg("--raw")
        .arg(RAWPUNCH)
        .output()
        .expect("run lab bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}\n{stdout}\n{stderr}", out.status);
    assert!(
        stdout.contains(&format!("| {} |", COLUMNS.join(" | "))),
        "no header row:\n{stdout}"
    );
    let row = stdout
        .lines()
        .find(|l| l.starts_with("| home/home | asymmetric | 0% |"))
        .unwrap_or_else(|| panic!("no home/home row:\n{stdout}\n{stderr}"));
    let cells: Vec<&str> = row.trim_matches('|').split(" | ").map(str::trim).collect();
    assert_eq!(cells.len(), COLUMNS.len(), "{row}");
    // One run each, both sides showed the other's line, so every figure is a
    // number and both ratios are there.
    assert_eq!(cells[9], "2/2, 2/2", "{row}");
    for cell in &cells[3..7] {
        assert!(cell.parse::<u64>().is_ok(), "{cell:?} in {row}");
    }
    for cell in &cells[7..9] {
        assert!(cell.ends_with('x'), "{cell:?} in {row}");
    }
}
