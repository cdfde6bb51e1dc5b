//! Network namespaces: creating and deleting them, running Rust code inside one
//! (a thread that `setns`es into it), finding and ending the processes left in
//! one, and removing the namespaces that a dead lab run left behind.
//!
//! Why a thread and not the whole process: the network namespace is a
//! per-thread attribute, and a socket stays in the namespace it was created in
//! for its whole life. So a test can create a listener "in rv" on a short-lived
//! thread and then accept on it from anywhere.

use std::fs::File;
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::cmd::{self, IP};
use crate::error::{LabError, Result};
use crate::names;

/// Where iproute2 keeps the bind mounts of named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// How long teardown waits for killed processes to disappear before deleting
/// their namespace anyway (the namespace then lingers until they exit).
pub const KILL_WAIT: Duration = Duration::from_secs(2);

/// Poll interval while waiting for killed processes to exit.
const KILL_POLL: Duration = Duration::from_millis(10);

/// Path of the bind mount that names namespace `netns`.
pub fn path(netns: &str) -> PathBuf {
    PathBuf::from(NETNS_DIR).join(netns)
}

/// Creates namespace `netns` and brings its loopback up.
pub fn create(netns: &str) -> Result<()> {
    cmd::run(IP, &["netns", "add", netns])?;
    cmd::ip_in(netns, &["link", "set", "dev", "lo", "up"])?;
    Ok(())
}

/// Deletes namespace `netns` (its interfaces, veth peers and rules go with it).
pub fn delete(netns: &str) -> Result<()> {
    cmd::run(IP, &["netns", "del", netns]).map(drop)
}

/// Lists all named network namespaces on the machine.
pub fn list() -> Result<Vec<String>> {
    let out = cmd::run(IP, &["netns", "list"])?;
    // Lines look like "name" or "name (id: 3)".
    Ok(out
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// PIDs of the processes whose network namespace is `netns`.
pub fn pids(netns: &str) -> Result<Vec<i32>> {
    let out = cmd::run(IP, &["netns", "pids", netns])?;
    Ok(out
        .split_whitespace()
        .filter_map(|pid| pid.parse().ok())
        .collect())
}

/// Kills (SIGKILL) every process inside `netns`, except this process itself,
/// and waits up to [`KILL_WAIT`] for them to go.
pub fn kill_all(netns: &str) -> Result<()> {
    let own = i32::try_from(std::process::id()).unwrap_or(i32::MAX);
    let victims: Vec<i32> = pids(netns)?.into_iter().filter(|&p| p != own).collect();
    for &pid in &victims {
        tracing::debug!(netns, pid, "lab: killing leftover process");
        // ESRCH (already gone) is fine.
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let deadline = Instant::now() + KILL_WAIT;
    while Instant::now() < deadline {
        let alive = victims
            .iter()
            .any(|pid| PathBuf::from(format!("/proc/{pid}")).exists());
        if !alive {
            break;
        }
        std::thread::sleep(KILL_POLL);
    }
    Ok(())
}

/// Moves the calling thread into namespace `netns`.
fn enter(netns: &str) -> Result<()> {
    let file = File::open(path(netns)).map_err(|source| LabError::EnterNetns {
        netns: netns.to_owned(),
        source,
    })?;
    setns(&file, CloneFlags::CLONE_NEWNET).map_err(|errno| LabError::EnterNetns {
        netns: netns.to_owned(),
        source: errno.into(),
    })
}

/// Runs `f` on a fresh thread inside namespace `netns` and returns its result.
/// Sockets that `f` creates belong to `netns` for their whole life, wherever
/// they are used afterwards. A panic in `f` is passed on to the caller.
pub fn run_in<T, F>(netns: &str, f: F) -> Result<T>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    std::thread::scope(|scope| {
        let handle = scope.spawn(|| enter(netns).map(|()| f()));
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Spawns a named thread that enters `netns` and then runs `f`; for servers and
/// other long-lived work. Joining gives `Err` if entering the namespace failed.
pub fn spawn_in<T, F>(netns: &str, name: &str, f: F) -> Result<JoinHandle<Result<T>>>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let netns = netns.to_owned();
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || enter(&netns).map(|()| f()))
        .map_err(|source| LabError::Spawn {
            command: format!("thread {name}"),
            source,
        })
}

/// Removes lab namespaces (names starting with [`names::PREFIX`]) whose creating
/// process is no longer alive, or all of them when `all` is set; kills the
/// processes still inside first. Returns the names removed.
pub fn cleanup_stale(all: bool) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for netns in list()? {
        let Some(pid) = names::owner_pid(&netns) else {
            continue;
        };
        let owner_alive = PathBuf::from(format!("/proc/{pid}")).exists();
        if owner_alive && !all {
            continue;
        }
        match kill_all(&netns).and_then(|()| delete(&netns)) {
            Ok(()) => removed.push(netns),
            // Another cleanup (a concurrent lab build) was quicker: fine.
            Err(_) if !path(&netns).exists() => {}
            Err(err) => return Err(err),
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_is_under_run_netns() {
        assert_eq!(path("pl-1-0-rv"), PathBuf::from("/run/netns/pl-1-0-rv"));
    }
}
