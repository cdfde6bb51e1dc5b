//! Checking that this machine can run the lab (root, the tools, network
//! namespaces), so tests can skip loudly instead of failing obscurely, and
//! the switch that turns such a skip into a failure on machines that must run
//! the lab (CI).

use std::path::Path;

use crate::cmd;
use crate::error::{LabError, Result};

/// Environment variable: when set to `1`, a missing prerequisite makes lab
/// tests fail instead of skip.
pub const REQUIRE_ENV: &str = "PUNCHLINE_REQUIRE_LAB";

/// Programs the lab runs: iproute2, nftables, iptables (for NFQUEUE); `ping`
/// and `conntrack` are used by tests and diagnostics.
pub const TOOLS: [&str; 5] = [cmd::IP, cmd::NFT, cmd::IPTABLES, "ping", "conntrack"];

/// Programs a lab with IPv6 needs besides [`TOOLS`]: ip6tables (for NFQUEUE;
/// Debian package iptables).
pub const TOOLS_IPV6: [&str; 1] = [cmd::IP6TABLES];

/// Directories searched for [`TOOLS`] besides `$PATH` (root's tools live in
/// sbin, which a non-login `$PATH` may lack).
const SBIN_DIRS: [&str; 4] = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"];

/// Whether [`REQUIRE_ENV`] asks for the lab to be mandatory.
pub fn required() -> bool {
    std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1")
}

/// Whether `program` is found on `$PATH` or in the sbin directories.
pub fn have_tool(program: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(SBIN_DIRS.iter().map(Into::into))
        .any(|dir| dir.join(program).is_file())
}

/// Whether the lab can run here, for a test named `test`. Prints `SKIPPED: ...`
/// and returns false when a prerequisite is missing, unless [`required`], in
/// which case it panics (the test fails).
pub fn available_or_skip(test: &str) -> bool {
    skip_unless(test, check())
}

/// Like [`available_or_skip`], for a test of a lab with IPv6: also needs
/// [`TOOLS_IPV6`] and a kernel with IPv6 (see [`check_ipv6`]).
pub fn available_ipv6_or_skip(test: &str) -> bool {
    skip_unless(test, check_ipv6())
}

/// Whether `checked` passed; prints `SKIPPED: ...` for `test` when it did not,
/// or panics if [`required`].
fn skip_unless(test: &str, checked: Result<()>) -> bool {
    match checked {
        Ok(()) => true,
        Err(err) if required() => panic!("{REQUIRE_ENV}=1 but the NAT lab cannot run: {err}"),
        Err(err) => {
            // Written to the stderr handle directly: unlike `eprintln!`, this is
            // not swallowed by the test harness's output capture, so a skip is
            // visible in every `cargo test` run.
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: {test}: {err} (set {REQUIRE_ENV}=1 to fail instead)"
            );
            false
        }
    }
}

/// Checks every prerequisite of the lab; the error says which is missing.
pub fn check() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        return Err(LabError::Prerequisite(
            "not running as root (network namespaces and NAT rules need root)".into(),
        ));
    }
    let missing: Vec<&str> = TOOLS.into_iter().filter(|t| !have_tool(t)).collect();
    if !missing.is_empty() {
        return Err(LabError::Prerequisite(format!(
            "missing tools: {} (Debian packages iproute2, nftables, iptables, iputils-ping, conntrack)",
            missing.join(", ")
        )));
    }
    if !Path::new("/proc/self/ns/net").exists() {
        return Err(LabError::Prerequisite(
            "kernel without network namespaces".into(),
        ));
    }
    Ok(())
}

/// Checks every prerequisite of a lab with IPv6: those of [`check`], the
/// [`TOOLS_IPV6`], and IPv6 in the kernel.
pub fn check_ipv6() -> Result<()> {
    check()?;
    let missing: Vec<&str> = TOOLS_IPV6.into_iter().filter(|t| !have_tool(t)).collect();
    if !missing.is_empty() {
        return Err(LabError::Prerequisite(format!(
            "missing tools: {} (Debian package iptables)",
            missing.join(", ")
        )));
    }
    if !Path::new("/proc/sys/net/ipv6").exists() {
        return Err(LabError::Prerequisite(
            "kernel without IPv6 (or booted with ipv6.disable=1)".into(),
        ));
    }
    Ok(())
}
