//! Nothing of a lab outlives it: dropping (also while unwinding from a panic)
//! kills its processes and deletes its namespaces; `lab cleanup` removes what a
//! dead run left; `lab up` tears down on a signal.
//!
//! Needs root; skips loudly otherwise (see `common::lab_available`).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use punchline_lab::{netns, Host, LabConfig, NatKind};

/// A PID above the kernel's maximum (2^22), so its owner is surely dead.
const DEAD_PID: u32 = 4_000_000_000;

/// How long `lab up` may take to build and to tear down.
const LAB_UP_TIMEOUT: Duration = Duration::from_secs(20);

fn assert_gone(names: &[String]) {
    let existing = netns::list().expect("list namespaces");
    for name in names {
        assert!(!existing.contains(name), "namespace {name} survived");
    }
}

#[test]
fn drop_kills_processes_and_deletes_namespaces() {
    if !common::lab_available("drop_kills_processes_and_deletes_namespaces") {
        return;
    }
    let lab = common::build(&LabConfig::new(NatKind::Cgnat, NatKind::Firewall));
    let names = lab.namespaces().to_vec();
    assert_eq!(names.len(), 8, "{names:?}");
    let mut child = lab
        .command(Host::A, "sleep")
        .arg("600")
        .spawn()
        .expect("spawn sleep in A");
    // Let `ip netns exec` enter the namespace and exec sleep.
    std::thread::sleep(Duration::from_millis(200));
    drop(lab);
    let status = child.wait().expect("wait for sleep");
    assert!(!status.success(), "sleep was not killed: {status}");
    assert_gone(&names);
}

#[test]
fn panic_inside_a_test_still_tears_down() {
    if !common::lab_available("panic_inside_a_test_still_tears_down") {
        return;
    }
    let names = Mutex::new(Vec::new());
    let result = std::panic::catch_unwind(|| {
        let lab = common::build(&LabConfig::same_lan(NatKind::Rst));
        *names.lock().unwrap_or_else(|e| e.into_inner()) = lab.namespaces().to_vec();
        panic!("deliberate panic with a lab alive (expected by this test)");
    });
    assert!(result.is_err());
    let names = names.into_inner().unwrap_or_else(|e| e.into_inner());
    assert!(!names.is_empty());
    assert_gone(&names);
}

#[test]
fn lab_cleanup_removes_namespaces_of_dead_runs() {
    if !common::lab_available("lab_cleanup_removes_namespaces_of_dead_runs") {
        return;
    }
    let stale = format!("pl-{DEAD_PID}-0-stale");
    // Only `ip netns add`: a lab built concurrently by another test removes stale
    // namespaces and kills the processes inside them, which would include an
    // `ip -n` still configuring this one.
    let added = Command::new("ip")
        .args(["netns", "add", &stale])
        .status()
        .expect("run ip");
    assert!(added.success(), "create a stale-looking namespace");
    let output = Command::new(env!("CARGO_BIN_EXE_lab"))
        .arg("cleanup")
        .output()
        .expect("run lab cleanup");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{text}");
    // A lab built concurrently by another test may have removed it first.
    assert!(
        text.contains(&format!("removed {stale}")) || text.contains("no stale"),
        "{text}"
    );
    assert_gone(&[stale]);
}

#[test]
fn lab_cleanup_removes_hosts_files_of_dead_runs() {
    if !common::lab_available("lab_cleanup_removes_hosts_files_of_dead_runs") {
        return;
    }
    // What a run killed between deleting a namespace and removing its hosts
    // file leaves: the file without the namespace.
    let stale = format!("pl-{DEAD_PID}-1-a");
    netns::write_etc(&stale, "hosts", "127.0.0.1\tlocalhost\n").expect("write a stale file");
    let output = Command::new(env!("CARGO_BIN_EXE_lab"))
        .arg("cleanup")
        .output()
        .expect("run lab cleanup");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{text}");
    // A lab built concurrently by another test may have removed it first.
    assert!(
        text.contains(&format!("removed {stale}")) || text.contains("no stale"),
        "{text}"
    );
    assert!(!netns::etc_dir(&stale).exists(), "{text}");
}

#[test]
fn hosts_files_go_with_the_lab() {
    if !common::lab_available("hosts_files_go_with_the_lab") {
        return;
    }
    let lab = common::build(&LabConfig::new(NatKind::Home, NatKind::Public));
    let dirs: Vec<_> = [Host::A, Host::B, Host::Rv, Host::Probe]
        .into_iter()
        .map(|host| netns::etc_dir(lab.netns(host)))
        .collect();
    assert!(dirs.iter().all(|d| d.join("hosts").is_file()), "{dirs:?}");
    drop(lab);
    assert!(dirs.iter().all(|d| !d.exists()), "{dirs:?}");
}

#[test]
fn lab_up_prints_and_tears_down_on_sigint() {
    if !common::lab_available("lab_up_prints_and_tears_down_on_sigint") {
        return;
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_lab"))
        .args(["up", "--a", "public", "--b", "range", "--delay-a", "3"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("run lab up");
    let stdout = child.stdout.take().expect("piped stdout");
    let deadline = Instant::now() + LAB_UP_TIMEOUT;
    let mut names = Vec::new();
    let mut ready = false;
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("read lab up output");
        if let Some(name) = line.split_whitespace().find(|w| w.starts_with("pl-")) {
            names.push(name.trim_end_matches(',').to_owned());
        }
        if line.contains("Ctrl-C") {
            ready = true;
            break;
        }
        assert!(Instant::now() < deadline, "lab up is too slow");
    }
    assert!(ready, "lab up ended early");
    assert!(names.iter().any(|n| n.ends_with("-rv")), "{names:?}");
    let existing = netns::list().expect("list");
    assert!(names.iter().all(|n| existing.contains(n)), "{names:?}");

    let pid = i32::try_from(child.id()).expect("pid fits");
    kill(Pid::from_raw(pid), Signal::SIGINT).expect("send SIGINT");
    let status = child.wait().expect("wait for lab up");
    assert!(status.success(), "lab up exited with {status}");
    assert_gone(&names);
}
