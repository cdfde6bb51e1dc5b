//! Network namespaces: creating and deleting them, running Rust code inside one
//! (a thread that `setns`es into it), finding and ending the processes left in
//! one, giving the programs run in one their own `/etc/hosts`, and removing the
//! namespaces that a dead lab run left behind.
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

/// Where `ip netns exec NAME` looks for files to bind-mount over `/etc` for the
/// program it starts: each file in `/etc/netns/NAME/` hides its namesake in
/// `/etc` (in a mount namespace of that program's own, so nothing else sees it).
pub const ETC_NETNS_DIR: &str = "/etc/netns";

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

/// Deletes namespace `netns` (its interfaces, veth peers and rules go with it),
/// then its files for `ip netns exec` (see [`write_etc`]) if it has any.
pub fn delete(netns: &str) -> Result<()> {
    cmd::run(IP, &["netns", "del", netns])?;
    remove_etc(netns)
}

/// Directory of the files `ip netns exec` mounts over `/etc` for programs in
/// `netns`.
pub fn etc_dir(netns: &str) -> PathBuf {
    PathBuf::from(ETC_NETNS_DIR).join(netns)
}

/// Writes `/etc/netns/NETNS/FILE` (e.g. `hosts`), which `ip netns exec` mounts
/// over `/etc/FILE` for the programs it starts in `netns`. Threads entering the
/// namespace with [`run_in`] do not see it: they share this process's mounts.
pub fn write_etc(netns: &str, file: &str, text: &str) -> Result<()> {
    let dir = etc_dir(netns);
    let path = dir.join(file);
    std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(&path, text))
        .map_err(|source| LabError::Io {
            what: format!("writing {}", path.display()),
            source,
        })
}

/// Removes `/etc/netns/NETNS` and the files in it; nothing to do if it does
/// not exist.
pub fn remove_etc(netns: &str) -> Result<()> {
    let dir = etc_dir(netns);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(LabError::Io {
            what: format!("removing {}", dir.display()),
            source,
        }),
    }
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

/// Whether the process that created lab namespace `netns` is gone (`None` for
/// a name that is not one of the lab's).
fn owner_dead(netns: &str) -> Option<bool> {
    let pid = names::owner_pid(netns)?;
    Some(!PathBuf::from(format!("/proc/{pid}")).exists())
}

/// Removes lab namespaces (names starting with [`names::PREFIX`]) whose creating
/// process is no longer alive, or all of them when `all` is set; kills the
/// processes still inside first. Also removes the `/etc/netns` directories of
/// such namespaces that are already gone (a run killed during teardown).
/// Returns the names removed.
pub fn cleanup_stale(all: bool) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for netns in list()? {
        let Some(dead) = owner_dead(&netns) else {
            continue;
        };
        if !dead && !all {
            continue;
        }
        match kill_all(&netns).and_then(|()| delete(&netns)) {
            Ok(()) => removed.push(netns),
            // Another cleanup (a concurrent lab build) was quicker: fine.
            Err(_) if !path(&netns).exists() => {}
            Err(err) => return Err(err),
        }
    }
    // No /etc/netns yet is the usual case, not an error.
    let Ok(entries) = std::fs::read_dir(ETC_NETNS_DIR) else {
        return Ok(removed);
    };
    for entry in entries.flatten() {
        let Ok(netns) = entry.file_name().into_string() else {
            continue;
        };
        let Some(dead) = owner_dead(&netns) else {
            continue;
        };
        // A live namespace's files stay (they belong to a running lab, or to
        // one being built right now).
        if (!dead && !all) || path(&netns).exists() {
            continue;
        }
        remove_etc(&netns)?;
        if !removed.contains(&netns) {
            removed.push(netns);
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

    #[test]
    fn etc_dir_is_where_ip_netns_exec_looks() {
        assert_eq!(etc_dir("pl-1-0-a"), PathBuf::from("/etc/netns/pl-1-0-a"));
    }

    #[test]
    fn owner_of_foreign_names_is_unknown() {
        assert_eq!(owner_dead("not-ours"), None);
        assert_eq!(owner_dead("pl-4000000000-0-a"), Some(true));
        assert_eq!(
            owner_dead(&format!("pl-{}-0-a", std::process::id())),
            Some(false)
        );
    }
}
