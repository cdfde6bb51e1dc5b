//! Naming of lab namespaces, so that concurrent runs (several test binaries, tests
//! in parallel threads, a `lab up` in another terminal) never collide, and so that
//! `lab cleanup` can recognise what a dead run left behind.
//!
//! A lab's id is `pl-PID-N` (PID of the creating process, N a per-process
//! counter); each namespace of that lab is `pl-PID-N-ROLE`. Interfaces are created
//! directly inside their namespaces (never in the root namespace), so their names
//! only need to be unique per namespace and can stay short and fixed.

use std::sync::atomic::{AtomicU32, Ordering};

/// Prefix of every namespace the lab creates.
pub const PREFIX: &str = "pl-";

/// Per-process counter making lab ids unique within one process.
static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// Returns a fresh lab id, `pl-PID-N`, unique on this machine while this
/// process lives.
pub fn next_lab_id() -> String {
    let n = NEXT_LAB.fetch_add(1, Ordering::Relaxed);
    format!("{PREFIX}{}-{n}", std::process::id())
}

/// Parses a lab namespace name `pl-PID-N-ROLE` and returns the PID of the process
/// that created it, or `None` if the name is not one of the lab's.
pub fn owner_pid(netns: &str) -> Option<u32> {
    let rest = netns.strip_prefix(PREFIX)?;
    let mut parts = rest.splitn(3, '-');
    let pid = parts.next()?.parse().ok()?;
    let _counter: u32 = parts.next()?.parse().ok()?;
    let role = parts.next()?;
    if role.is_empty() {
        return None;
    }
    Some(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_parse_back() {
        let a = next_lab_id();
        let b = next_lab_id();
        assert_ne!(a, b);
        let name = format!("{a}-inet");
        assert_eq!(owner_pid(&name), Some(std::process::id()));
    }

    #[test]
    fn foreign_names_are_not_ours() {
        assert_eq!(owner_pid("pl-12-3"), None);
        assert_eq!(owner_pid("pl-x-3-inet"), None);
        assert_eq!(owner_pid("plain-1-2-inet"), None);
        assert_eq!(owner_pid("pl-12-3-"), None);
        assert_eq!(owner_pid("pl-12-3-a-nat"), Some(12));
    }
}
