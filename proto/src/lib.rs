//! The punchline wire protocol, with no I/O and no clock.
//!
//! This crate owns everything two programs must agree on to talk to each other:
//! the message types of both connections (peer ↔ rendezvous and peer ↔ peer),
//! the framing codec, the shape of codes and their word list ([`codes`]), the
//! protocol version and the named limits. It also holds the
//! pure state machines the rendezvous and the peer drive: the pairing table
//! ([`pairing`]), the per-address limits ([`limits`]), the synchronised-go timing ([`timing`]), the punch retry cadence
//! ([`pacing`]), the check that a punched link reaches the expected peer
//! ([`link_check`]) and the chat session over its links ([`session`]: numbering,
//! acknowledgement, keepalive, dead links, resume, goodbye, the switch to direct). Time is always passed in, so all of it is tested without sockets.

pub mod codec;
pub mod codes;
pub mod defaults;
pub mod fuzzing;
pub mod limits;
pub mod link_check;
pub mod message;
pub mod pacing;
pub mod pairing;
pub mod session;
pub mod timing;

pub use codec::{CodecError, FrameCodec};
pub use message::*;

/// Version of the wire protocol. Both the rendezvous and the other peer must speak
/// exactly this version; a mismatch is reported with a clear error, never guessed at.
pub const PROTOCOL_VERSION: u16 = 12;

/// Largest frame (payload after the 4-byte length prefix) anyone accepts.
///
/// Every message of the protocol fits in a few hundred bytes except a chat line,
/// which is capped at [`MAX_LINE_BYTES`]; 16 KiB leaves room for that line plus
/// encoding overhead while keeping what a hostile sender can make us buffer small.
pub const MAX_FRAME_SIZE: usize = 16 * 1024;

/// Longest chat line, in bytes of UTF-8. Longer lines are refused by the sender with
/// a clear error (not split), so that one typed line is always one received line.
pub const MAX_LINE_BYTES: usize = 8 * 1024;

/// Most chat lines a leader's first handshake message carries
/// ([`Introduction::first_lines`]).
pub const MAX_FIRST_LINES: usize = 16;

/// Most bytes of UTF-8 in all the lines a leader's first handshake message
/// carries together: with the name and the encoding, the message stays well
/// within [`MAX_FRAME_SIZE`].
pub const MAX_FIRST_LINES_BYTES: usize = MAX_LINE_BYTES;

/// Longest nameplate (the part of a code the rendezvous sees), in digits.
pub const MAX_NAMEPLATE_LEN: usize = codes::MAX_NAMEPLATE_DIGITS;

/// Largest key-exchange (SPAKE2) message the rendezvous passes on. A SPAKE2
/// message over Ed25519 is 33 bytes; the rest is room for another group later.
pub const MAX_PAKE_LEN: usize = 128;

/// Largest piece of a relayed byte stream in one [`PeerToServer::Relayed`] or
/// [`ServerToPeer::Relayed`] message.
pub const MAX_RELAY_CHUNK: usize = 8 * 1024;

/// Longest display name, in characters.
pub const MAX_NAME_CHARS: usize = 32;

/// Most candidate addresses a peer may announce. A host has a handful of
/// interfaces; more than this is either a misconfiguration or an attempt to make
/// the other peer send SYNs to many third-party addresses.
pub const MAX_CANDIDATES: usize = 8;

/// Length of the random session token the rendezvous gives both peers of a pair.
pub const SESSION_LEN: usize = 16;

/// Length of a resumed chat's room name (see [`ResumeRoom`]).
pub const RESUME_ROOM_LEN: usize = 16;

/// Largest sealed box ([`PeerToServer::Sealed`]): [`MAX_CANDIDATES`] IPv6
/// addresses with ports, their encoding and the authentication tag fit easily.
pub const MAX_SEALED_LEN: usize = 512;
