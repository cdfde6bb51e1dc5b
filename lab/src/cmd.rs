//! Running the external tools the lab is built with (`ip`, `nft`, `iptables`,
//! `ip6tables`), checking their exit status and turning a failure into a
//! [`LabError`] that carries the full command line and the tool's stderr.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use crate::error::{LabError, Result};

/// The iproute2 binary.
pub const IP: &str = "ip";
/// The nftables binary, used for NAT and firewall rules in router namespaces.
pub const NFT: &str = "nft";
/// The iptables binary used for the NFQUEUE rule in the internet namespace.
///
/// The kernel lacks the native nftables `queue` expression, so `nft ... queue`
/// fails with ENOENT; `iptables -j NFQUEUE` works with both the nf_tables backend
/// (through the xtables compatibility target) and the legacy backend. The default
/// `iptables` is the nf_tables one on Debian; verified by the ping-RTT test.
pub const IPTABLES: &str = "iptables";
/// The ip6tables binary, for the NFQUEUE rule of IPv6 in a lab built with IPv6
/// (the same reasons as [`IPTABLES`]; it comes in the same package).
pub const IP6TABLES: &str = "ip6tables";

/// Renders a command line for error messages and logs.
pub fn describe(program: &str, args: &[&str]) -> String {
    let mut line = program.to_owned();
    for arg in args {
        line.push(' ');
        line.push_str(arg);
    }
    line
}

/// Runs `program args...`, returns its stdout when it exits with status 0.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    run_with_stdin(program, args, None)
}

/// Runs `program args...` with `stdin` written to its standard input (for
/// `nft -f -`), returns its stdout when it exits with status 0.
pub fn run_with_stdin(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let command = describe(program, args);
    tracing::debug!(%command, "lab: run");
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| LabError::Spawn {
            command: command.clone(),
            source,
        })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(|source| LabError::Spawn {
                command: command.clone(),
                source,
            })?;
        // Dropping the pipe closes it, so the tool sees end of input.
    }
    let output = child.wait_with_output().map_err(|source| LabError::Spawn {
        command: command.clone(),
        source,
    })?;
    check(command, output)
}

/// Turns a finished process into its stdout, or a [`LabError::Command`].
fn check(command: String, output: Output) -> Result<String> {
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(LabError::Command {
            command,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// Runs `ip -n NETNS args...`.
pub fn ip_in(netns: &str, args: &[&str]) -> Result<String> {
    let mut full = vec!["-n", netns];
    full.extend_from_slice(args);
    run(IP, &full)
}

/// Runs `ip netns exec NETNS program args...`, returns its stdout.
pub fn ip_netns_exec(netns: &str, program: &str, args: &[&str]) -> Result<String> {
    ip_netns_exec_with_stdin(netns, program, args, None)
}

/// Runs `ip netns exec NETNS program args...` with `stdin` as its input.
pub fn ip_netns_exec_with_stdin(
    netns: &str,
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String> {
    let mut full = vec!["netns", "exec", netns, program];
    full.extend_from_slice(args);
    run_with_stdin(IP, &full, stdin)
}

/// Builds a [`Command`] that runs `program` inside network namespace `netns`
/// (`ip netns exec NETNS program`). Add arguments with [`Command::arg`] as usual.
pub fn netns_command(netns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new(IP);
    command.args(["netns", "exec", netns]).arg(program);
    command
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_joins_arguments() {
        assert_eq!(describe("ip", &["-n", "x", "link"]), "ip -n x link");
    }

    #[test]
    fn failing_command_reports_stderr() {
        let err = run("sh", &["-c", "echo boom >&2; exit 3"]).expect_err("must fail");
        let text = err.to_string();
        assert!(text.contains("boom"), "{text}");
        assert!(text.contains("sh -c"), "{text}");
    }

    #[test]
    fn stdin_is_passed() {
        let out = run_with_stdin("cat", &[], Some("hello")).expect("cat runs");
        assert_eq!(out, "hello");
    }

    #[test]
    fn netns_command_shape() {
        let command = netns_command("ns1", "ping");
        let args: Vec<_> = command.get_args().collect();
        assert_eq!(command.get_program(), "ip");
        assert_eq!(args, ["netns", "exec", "ns1", "ping"]);
    }
}
