//! Errors of the peer, worded for the user who will read them.

use std::io;
use std::net::SocketAddr;

use punchline_proto::{CodecError, ErrorCode};

use crate::punch::PunchFailure;

/// How the other end of a meeting failed to prove it holds our key (the
/// code's, or the chat's secret).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRefusal {
    /// Its handshake message did not decrypt with our key (or was no
    /// handshake message at all).
    Handshake,
    /// It closed the link during the handshake (as a peer does whose key
    /// cannot decrypt ours).
    ClosedInHandshake,
    /// Its sealed candidates did not open with our key.
    Candidates,
    /// Its handshake decrypted, but the words nonce in it is not the one its
    /// hello committed to: whoever answered holds the code's key, and the
    /// rendezvous passed on someone else's commitment (or altered it).
    Words,
}

/// Everything that can end a chat session early.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The server name did not resolve.
    #[error("cannot resolve the rendezvous address {server}: {source}")]
    Resolve {
        /// What the user gave.
        server: String,
        /// Why it failed.
        source: io::Error,
    },
    /// No address of the rendezvous accepted a connection.
    #[error("cannot reach the rendezvous at {server} ({tried}): check the address and port, that the rendezvous is running, and that a firewall lets TCP through")]
    Unreachable {
        /// What the user gave.
        server: String,
        /// Each address tried, with its error.
        tried: String,
    },
    /// What answers at the rendezvous address does not speak punchline's protocol
    /// (a web or SSH server, say): the user gave the wrong address or port.
    #[error("{server} did not answer like a punchline rendezvous: {detail}; check the address and port given with --server")]
    NotRendezvous {
        /// The address tried.
        server: String,
        /// What it did instead, in words (anything it sent is sanitised).
        detail: String,
    },
    /// The local port chosen with `--port` is held by another program that does
    /// not share it.
    #[error("local port {port} is already in use by another program, which does not share it: choose another --port, or leave --port out to let the system pick a free one")]
    PortInUse {
        /// The port.
        port: u16,
    },
    /// The rendezvous refused us, with its reason.
    #[error("the rendezvous refused: {message}")]
    Rejected {
        /// The reason's code.
        code: ErrorCode,
        /// The reason in words.
        message: String,
    },
    /// The rendezvous closed the connection without a reason.
    #[error("the rendezvous closed the connection unexpectedly")]
    ServerClosed,
    /// The rendezvous or the other peer broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A connection failed.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// A local socket operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: io::Error,
    },
    /// No direct link could be made before the deadline (and no relay).
    #[error("{}", crate::render::punch_failed(.name, .failure, .relay_refused.as_deref()))]
    PunchFailed {
        /// The other peer's name.
        name: String,
        /// What was tried and what happened.
        failure: Box<PunchFailure>,
        /// Why the rendezvous did not relay instead, if it was asked.
        relay_refused: Option<Box<PeerError>>,
    },
    /// The link to the other peer broke.
    #[error("connection to {name} lost: {why}")]
    LinkLost {
        /// The other peer's name.
        name: String,
        /// What happened.
        why: String,
    },
    /// Whoever joined with the code did not prove it holds the same key: a
    /// wrong code or an interception.
    #[error("{}", crate::render::bad_code(*.0))]
    BadCode(KeyRefusal),
    /// A later link of the chat failed to prove it holds the chat's secret:
    /// someone other than the other peer answered.
    #[error("{}", crate::render::not_authenticated(*.0))]
    NotAuthenticated(KeyRefusal),
    /// The other side of a contact's meeting did not prove it holds the
    /// contact's identity key and the pairing secret.
    #[error("{}", crate::render::contact_refused(.name, *.how))]
    ContactRefused {
        /// The contact's name.
        name: String,
        /// How it failed.
        how: KeyRefusal,
    },
    /// The contacts or identity file, or the config directory, could not be
    /// used (its path and what to do are in the message).
    #[error("{0}")]
    Contacts(String),
    /// A contact's room at the rendezvous changed ([`crate::contacts::ROOM_EPOCH`])
    /// while we waited there: meet again in the new one.
    #[error("the contact's room changed while waiting")]
    RoomChanged,
    /// Later links failed authentication this many times: the chat ends.
    #[error("{}", crate::render::kept_failing(.name, *.failures, *.last))]
    KeptFailingAuthentication {
        /// The other peer's name.
        name: String,
        /// How many new links failed.
        failures: u32,
        /// How the last one failed.
        last: KeyRefusal,
    },
    /// The rendezvous paired two of this peer's own meetings with each other.
    #[error("the new link led back to this peer itself")]
    MetItself,
    /// A first meeting failed after the go: the code went to whoever joined it
    /// (perhaps not the person meant: someone guessing codes need not say so),
    /// so it must not be used again.
    #[error("{0}\nThis code has been used (it went to whoever joined it) and must not be used again: start again with a new code.")]
    CodeUsed(Box<PeerError>),
    /// A timeout while talking to the rendezvous or the other peer.
    #[error("{0}")]
    Timeout(String),
    /// The user gave an invalid argument.
    #[error("{0}")]
    Usage(String),
}

impl PeerError {
    /// `e`, from a first meeting that failed after the go: it says that the
    /// code is used up, unless it already does.
    pub fn code_used(e: PeerError) -> PeerError {
        match e {
            PeerError::BadCode(_) | PeerError::CodeUsed(_) => e,
            other => PeerError::CodeUsed(Box::new(other)),
        }
    }

    /// An I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        PeerError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Formats "addr: error" pairs for [`PeerError::Unreachable`].
pub fn describe_attempts(tried: &[(SocketAddr, io::Error)]) -> String {
    tried
        .iter()
        .map(|(addr, e)| format!("{addr}: {e}"))
        .collect::<Vec<_>>()
        .join("; ")
}
