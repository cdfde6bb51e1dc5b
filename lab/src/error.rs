//! The lab's error type: everything that can go wrong while building, driving or
//! tearing down a topology. Failures of the external tools (`ip`, `nft`,
//! `iptables`) keep the command line and the tool's stderr, because that text is
//! what tells a person why the kernel said no.

use std::io;

/// An error from the NAT lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A prerequisite of the lab is missing (not root, a tool not installed, no
    /// network namespace support). Tests skip on this error.
    #[error("lab prerequisite missing: {0}")]
    Prerequisite(String),

    /// The requested topology cannot be built as asked.
    #[error("invalid lab configuration: {0}")]
    InvalidConfig(String),

    /// An external program could not be started at all.
    #[error("cannot run `{command}`")]
    Spawn {
        /// The command line that was attempted.
        command: String,
        /// Why it could not start.
        #[source]
        source: io::Error,
    },

    /// An external program ran and exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line that failed.
        command: String,
        /// Its exit status, as text.
        status: String,
        /// What it printed on stderr, trimmed.
        stderr: String,
    },

    /// Entering a network namespace failed.
    #[error("cannot enter network namespace {netns}")]
    EnterNetns {
        /// The namespace name.
        netns: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// The NFQUEUE delay emulator failed.
    #[error("WAN delay emulator: {context}")]
    Delayer {
        /// What the emulator was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// An I/O operation of the scenario runner failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// A scenario did not go as it must (a peer's output, a check on the link).
    #[error("{0}")]
    Scenario(String),

    /// A lab thread panicked or ended unexpectedly.
    #[error("lab thread failed: {0}")]
    Thread(String),
}

/// Result type of the lab library.
pub type Result<T> = std::result::Result<T, LabError>;
