//! The load benchmark, in miniature: every phase runs against the real
//! rendezvous binary and the numbers it prints are checked for shape and
//! consistency (not speed: timing belongs to the benchmark itself).

use std::path::PathBuf;
use std::process::Command;

#[test]
fn a_small_bench_runs_every_phase_and_agrees_with_the_server() {
    let loadgen = PathBuf::from(env!("CARGO_BIN_EXE_loadgen"));
    let rendezvous = loadgen.with_file_name("rendezvous");
    assert!(
        rendezvous.exists(),
        "{} is missing: build the workspace (cargo test --workspace builds it)",
        rendezvous.display()
    );
    let out = Command::new(&loadgen)
        .args([
            "bench",
            "--seconds",
            "1",
            "--concurrency",
            "4",
            "--sources",
            "3",
        ])
        .args(["--peers", "300", "--steps", "100", "--idle-seconds", "1"])
        .arg("--rendezvous")
        .arg(&rendezvous)
        .output()
        .expect("run loadgen");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "loadgen failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("| raw connect+accept+close (ceiling) |"),
        "{stdout}"
    );
    assert!(stdout.contains("| rendezvous pairs"), "{stdout}");
    // The server's own count of pairs matched and nothing was refused.
    assert!(stdout.contains(" 0 rejects"), "{stdout}");
    // Both hold steps, and the server saw every waiting peer.
    for row in ["| 100 |", "| 300 |"] {
        assert!(stdout.contains(row), "no {row} row:\n{stdout}");
    }
    assert!(
        stdout.contains("the server reports 300 waiting"),
        "{stdout}"
    );
}
