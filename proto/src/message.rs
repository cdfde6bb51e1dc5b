//! Message types of both connections, named by direction.
//!
//! - [`PeerToServer`] / [`ServerToPeer`]: a peer and the rendezvous.
//! - [`PeerToPeer`]: the two peers over the punched link.
//!
//! Compatibility rule: variant 0 of every enum (the hellos and the error) keeps its
//! layout across protocol versions, so a program can always read the other side's
//! version, or its error, even when the rest of the protocol changed.

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::{
    MAX_CANDIDATES, MAX_FIRST_LINES, MAX_FIRST_LINES_BYTES, MAX_LINE_BYTES, MAX_NAMEPLATE_LEN,
    MAX_NAME_CHARS, MAX_PAKE_LEN, MAX_SEALED_LEN, RESUME_ROOM_LEN, SESSION_LEN,
};

/// Random token the rendezvous gives both peers of one pair; each punched link
/// proves it reaches the expected peer by showing it. It travels in clear (the
/// rendezvous and anyone on the path to it know it): it tells links apart, it
/// authenticates nothing.
pub type SessionToken = [u8; SESSION_LEN];

/// The room in which the two peers of a chat meet again after their link
/// dropped. Derived from the chat's secret (which only the two peers hold), so
/// nobody else can compute it in advance; it is not the session token.
pub type ResumeRoom = [u8; RESUME_ROOM_LEN];

/// Which side leads the asymmetric steps after the punch (choosing the one link
/// both keep). Assigned by the rendezvous: the two ends of a simultaneous open are
/// both "clients", so nothing on the link itself can break the tie.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Initiates the encryption handshake on every candidate link, and keeps
    /// the link on which the follower answers.
    Leader,
    /// Answers the leader's handshake on the first link where it
    /// authenticates, and keeps that link.
    Follower,
}

impl Role {
    /// The role of the other peer of the pair.
    pub fn other(self) -> Role {
        match self {
            Role::Leader => Role::Follower,
            Role::Follower => Role::Leader,
        }
    }
}

/// How a peer's NAT maps its fixed port, as seen from two ports of the
/// rendezvous: the peer connects from its fixed port to the probe port too,
/// beside its hello, and names that connection in its hello
/// ([`Hello::probe_token`]; or it reports what the probe saw,
/// [`Hello::probe_observed`]); the server compares that with what its main port
/// sees ([`classify_mapping`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Mapping {
    /// Not measured (the rendezvous' probe port did not answer).
    Unknown,
    /// Both destinations saw the same public port: the mapping does not depend on
    /// the destination, so the punch can use the port the rendezvous saw.
    Independent,
    /// The two destinations saw different public ports (a "symmetric" NAT): the
    /// punch would come from a port nobody was told about.
    DependsOnDestination {
        /// The public port the rendezvous' main port saw.
        first: u16,
        /// The public port its probe port saw.
        second: u16,
    },
}

/// The mapping behaviour shown by the same local port reaching the rendezvous'
/// main port (`main`) and its probe port (`probe`, if the probe answered).
pub fn classify_mapping(main: SocketAddr, probe: Option<SocketAddr>) -> Mapping {
    match probe {
        None => Mapping::Unknown,
        Some(p) if p == main => Mapping::Independent,
        Some(p) => Mapping::DependsOnDestination {
            first: main.port(),
            second: p.port(),
        },
    }
}

impl Mapping {
    /// True if the mapping is known to change with the destination.
    pub fn is_symmetric(self) -> bool {
        matches!(self, Mapping::DependsOnDestination { .. })
    }
}

/// The first message a peer sends the rendezvous.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`crate::PROTOCOL_VERSION`] of the sender. First field: see the module docs.
    pub version: u16,
    /// The nameplate of the code (see [`validate_nameplate`]): the room to meet
    /// in. The rest of the code never leaves the peer. Ignored with `resume`.
    pub nameplate: String,
    /// What the rendezvous' probe port saw as this peer's address, if the peer
    /// probed before its hello and the probe answered.
    pub probe_observed: Option<SocketAddr>,
    /// The peer's key-exchange message, opaque to the rendezvous, handed to
    /// the other peer with the go: its commitment to its verification words'
    /// nonce (32 bytes, see [`Introduction::words_nonce`]), then its SPAKE2
    /// message. Empty with `resume` (the code is used once per chat).
    pub pake: Vec<u8>,
    /// Set when the two peers already chatted and lost their link: the room of
    /// that chat, derived from its secret. The rendezvous then pairs this peer
    /// with the other one in the same room (not by nameplate, which may have been
    /// reused since), so both can punch again and resume.
    pub resume: Option<ResumeRoom>,
    /// Set when the peer probes beside its hello rather than before it: the
    /// token it sends on its probe connection ([`PeerToServer::Probe`]), by which
    /// the server finds what its probe port saw of this peer.
    pub probe_token: Option<ProbeToken>,
    /// Set when the peer also reaches the rendezvous over the other address
    /// family (IPv6 beside an IPv4 hello, or the reverse): the token it sends
    /// on a probe connection of that family, by which the server finds its
    /// address there ([`PeerInfo::other_family`]).
    pub other_family_token: Option<ProbeToken>,
    /// The peer's port as its router forwards it (a port mapping it asked
    /// for with PCP, NAT-PMP or UPnP-IGD), if granted by the time of the
    /// hello. The server passes it on as [`PeerInfo::mapped`] only when it is
    /// at the address it saw this connection come from.
    pub mapped: Option<SocketAddr>,
}

/// Length of a [`ProbeToken`].
pub const PROBE_TOKEN_LEN: usize = 16;

/// A random token that ties a probe connection to its hello.
pub type ProbeToken = [u8; PROBE_TOKEN_LEN];

/// What one peer learns about the other when the pair is made. Only what the
/// punch to the public address needs: the other's name and LAN candidates travel
/// later, sealed with the key of the code ([`PeerToServer::Sealed`]), so a
/// stranger who joins a nameplate without the code learns neither.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// The other's address as the rendezvous saw it (its NAT's public mapping).
    pub observed: SocketAddr,
    /// How the other's NAT maps its port.
    pub mapping: Mapping,
    /// The other's key-exchange message, as it sent it in [`Hello::pake`]
    /// (empty when resuming a chat).
    pub pake: Vec<u8>,
    /// The other's address in the other address family, as the rendezvous'
    /// probe port saw it ([`Hello::other_family_token`]): an IPv6 address
    /// beside an IPv4 `observed`, or the reverse. Always of the other family
    /// than `observed`. IPv6 is rarely translated: this is usually the other
    /// host's own global address, behind a stateful firewall that a
    /// simultaneous open passes like a NAT.
    pub other_family: Option<SocketAddr>,
    /// The other's port as its router forwards it ([`Hello::mapped`]): always
    /// at `observed`'s address, where the other's SYNs from its fixed port
    /// leave from too, whatever its NAT does with other connections (even a
    /// symmetric one). A public candidate from the go, as `observed`.
    pub mapped: Option<SocketAddr>,
}

/// The synchronised "go": punch now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Go {
    /// The other peer.
    pub peer: PeerInfo,
    /// This peer's role.
    pub role: Role,
    /// Token both peers show on each punched link to recognise each other.
    pub session: SessionToken,
    /// How long after this go the other peer gets its own, in microseconds
    /// (0 for the farther peer). The rendezvous sends both goes at once; from
    /// its RTTs to both peers it knows that the nearer peer's arrives sooner
    /// by half their difference ([`crate::timing::go_delays`]), and the other
    /// peer's SYN leaves only then. The nearer peer punches at once anyway:
    /// its SYN usually reaches the other's NAT after the other's own SYN went
    /// out (the path through the rendezvous is rarely shorter than the direct
    /// one), and the link is up sooner. An attempt refused before this instant
    /// (the SYN came too early to a NAT that answers with a reset) is retried
    /// from this instant, when the two SYNs cross as they would have.
    pub others_go_after_us: u32,
}

/// How a punch ended, as a peer reports it to the rendezvous (for its logs and
/// statistics; the rendezvous takes no decision on it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PunchOutcome {
    /// A direct link is up.
    Direct {
        /// The winning candidate was the other's observed (public) address.
        public: bool,
        /// Connection attempts made, on all candidates.
        attempts: u32,
        /// Time from go to the verified link, in milliseconds.
        elapsed_ms: u32,
    },
    /// No candidate answered before the deadline.
    Failed {
        /// Connection attempts made, on all candidates.
        attempts: u32,
    },
}

/// Peer → rendezvous.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerToServer {
    /// First message on the connection. Variant 0: stable across versions.
    Hello(Hello),
    /// Answer to [`ServerToPeer::Ping`], sent at once (the rendezvous measures RTT).
    Pong {
        /// The ping's sequence number.
        seq: u32,
    },
    /// How the punch ended.
    Report(PunchOutcome),
    /// Before the hello: asks for a free nameplate for a new code.
    Allocate,
    /// Asks for the address this connection came from, answered with
    /// [`ServerToPeer::Observed`] (as the probe port does on accept). Used by
    /// `peer doctor`, which needs no code; a hello may still follow.
    Reflect,
    /// Asks the server to open a TCP connection to the address this connection came
    /// from, as an unsolicited inbound SYN would arrive, and say what happened
    /// ([`ServerToPeer::DialedBack`]). Once per connection; the server dials only
    /// the requesting address, never another.
    DialBack,
    /// After a failed punch: carry this pair's traffic through the server. Answered
    /// with [`ServerToPeer::Relaying`], or an error if the server does not relay
    /// (or not now).
    Relay,
    /// Relayed bytes for the other peer (a piece of its link's byte stream: the
    /// server neither reads nor cuts it, and sees only ciphertext).
    Relayed(Vec<u8>),
    /// After the go, once: a box for the other peer of the pair, sealed with a key
    /// only a holder of the code (or of the chat's secret) derives. It holds the
    /// sender's LAN and extra candidates ([`SealedCandidates`]). The server passes
    /// it on as [`ServerToPeer::Sealed`]; at most [`MAX_SEALED_LEN`] bytes.
    Sealed(Vec<u8>),
    /// On the probe port, from a peer that probes beside its hello: the
    /// [`Hello::probe_token`] of that hello. The server keeps the address this
    /// connection came from under the token for a few seconds, for the hello.
    Probe {
        /// The token.
        token: ProbeToken,
    },
}

/// What an unsolicited SYN from the rendezvous to a peer's public address met.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DialBackResult {
    /// A reset: the NAT, a firewall or the host's own stack refused it at once.
    Refused,
    /// No answer in time: dropped silently on the way.
    NoAnswer,
    /// It connected: something listens at that address (a port forwarded to a
    /// listening program, or no NAT or firewall in the way of a listener).
    Connected,
    /// The server could not try (another error on its side).
    Unknown,
}

/// Why the rendezvous refused or dropped a peer. Sent as a number so that a code
/// added later still reaches an older peer as "other", with its message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The two sides speak different protocol versions.
    VersionMismatch,
    /// Two peers already use this code.
    CodeInUse,
    /// Nobody joined with this code before the waiting time ran out.
    Expired,
    /// The message was not understood (bad frame, bad field).
    Malformed,
    /// The server is at a resource limit; try again later.
    Busy,
    /// The server is shutting down.
    ShuttingDown,
    /// The server does not relay, or not this much, or not now.
    RelayUnavailable,
    /// A code this version does not know.
    Other(u16),
}

impl ErrorCode {
    /// The number sent on the wire.
    pub fn to_u16(self) -> u16 {
        match self {
            ErrorCode::VersionMismatch => 1,
            ErrorCode::CodeInUse => 2,
            ErrorCode::Expired => 3,
            ErrorCode::Malformed => 4,
            ErrorCode::Busy => 5,
            ErrorCode::ShuttingDown => 6,
            ErrorCode::RelayUnavailable => 7,
            ErrorCode::Other(n) => n,
        }
    }

    /// The code for a number received on the wire.
    pub fn from_u16(n: u16) -> ErrorCode {
        match n {
            1 => ErrorCode::VersionMismatch,
            2 => ErrorCode::CodeInUse,
            3 => ErrorCode::Expired,
            4 => ErrorCode::Malformed,
            5 => ErrorCode::Busy,
            6 => ErrorCode::ShuttingDown,
            7 => ErrorCode::RelayUnavailable,
            n => ErrorCode::Other(n),
        }
    }
}

/// Rendezvous → peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerToPeer {
    /// The request failed; the server closes the connection after sending this.
    /// Variant 0: stable across versions.
    Error {
        /// [`ErrorCode::to_u16`].
        code: u16,
        /// A sentence for the user.
        message: String,
    },
    /// Hello accepted; the peer waits for the other side.
    Welcome {
        /// The peer's address as the server sees it (its public NAT mapping).
        observed: SocketAddr,
        /// How the peer's NAT maps its port ([`classify_mapping`]).
        mapping: Mapping,
    },
    /// RTT probe; answer with [`PeerToServer::Pong`] at once.
    Ping {
        /// Sequence number to echo.
        seq: u32,
    },
    /// Punch now.
    Go(Go),
    /// The answer to [`PeerToServer::Allocate`]: a nameplate nobody uses now.
    Allocated {
        /// The nameplate.
        nameplate: String,
    },
    /// The answer of the rendezvous' probe port: the address this connection came
    /// from. Sent at once on accept, then the probe connection is closed.
    Observed {
        /// The connection's source address as the server sees it.
        observed: SocketAddr,
        /// The server's alternate port, if it has one (it serves the same
        /// rooms there, see [`crate::defaults::ALTERNATE_PORT_OFFSET`]): a
        /// peer races a second connection to the rendezvous only to a port
        /// the server named, never to a port that may be another program.
        alternate_port: Option<u16>,
    },
    /// The relay is on: [`PeerToServer::Relayed`] bytes now reach the other peer.
    Relaying,
    /// Relayed bytes from the other peer.
    Relayed(Vec<u8>),
    /// The answer to [`PeerToServer::DialBack`].
    DialedBack {
        /// The address the server dialled.
        target: SocketAddr,
        /// What the SYN met.
        result: DialBackResult,
        /// How long until the result, in milliseconds.
        elapsed_ms: u32,
    },
    /// The other peer's [`PeerToServer::Sealed`] box, passed on unread.
    Sealed(Vec<u8>),
}

impl ServerToPeer {
    /// An error message with its code.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        ServerToPeer::Error {
            code: code.to_u16(),
            message: message.into(),
        }
    }
}

/// Peer ↔ peer, over the punched link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerToPeer {
    /// First message on every candidate link, from both ends. Variant 0: stable.
    LinkHello {
        /// Sender's [`crate::PROTOCOL_VERSION`].
        version: u16,
        /// The session token the rendezvous gave the pair.
        session: SessionToken,
        /// The sender's role.
        role: Role,
    },
    /// A Noise handshake message (the leader initiates, right behind its link
    /// hello; the follower answers on the one link it keeps).
    Handshake(Vec<u8>),
    /// A Noise transport message; its plaintext is a bincode [`Chat`].
    Sealed(Vec<u8>),
    /// From the follower of a chat's first link, right behind its link hello:
    /// a sealed box (XChaCha20-Poly1305 under a key from the code's key, the
    /// meeting's link token as associated data) holding an [`Introduction`]
    /// whose `first_lines` are the chat's first lines from the follower, so
    /// that the leader shows them half a round trip after the link is up
    /// instead of after the handshake. Only when it has such lines.
    FirstLines(Vec<u8>),
}

/// What the sealed box of [`PeerToServer::Sealed`] holds, once opened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedCandidates {
    /// The sender's own interface addresses with its fixed port, and any it
    /// announced by hand. At most [`MAX_CANDIDATES`].
    pub candidates: Vec<SocketAddr>,
}

/// The payload of each side's Noise handshake message: who the sender is.
/// Encrypted (the pre-shared key is mixed in before the first message), so only
/// the other peer reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Introduction {
    /// The sender's display name (see [`validate_name`]).
    pub name: String,
    /// The role the sender had on the chat's first link. Fixed for the whole
    /// chat, unlike the role of each link: the two sides always differ, so a
    /// peer that meets itself (two of its own meetings paired by the rendezvous)
    /// notices.
    pub chat_role: Role,
    /// On the chat's first link: the sender's verification words nonce, the
    /// one its hello committed to ([`Hello::pake`]). The words hash both
    /// sides' nonces with the code's key; since each side committed before
    /// anything was revealed, no one — not a man in the middle playing both
    /// sides — can choose a message late to make two sets of words agree.
    /// Zero on later links.
    pub words_nonce: [u8; 32],
    /// From the leader, on the chat's first link only: the chat's first lines
    /// (sequence numbers 1, 2, …), typed before the link was up, so that they
    /// are shown as soon as the handshake's first message arrives rather than
    /// one round trip later (see [`validate_first_lines`]). They are sealed
    /// under the pre-shared key like the rest of the payload. Empty otherwise.
    pub first_lines: Vec<String>,
    /// The sender's long-term identity key (X25519 public key): what the
    /// other side keeps if it saves the sender as a contact, and checks
    /// (Noise `KKpsk0`) when the two meet as contacts. Sealed like the rest,
    /// so the rendezvous never sees it.
    pub identity: [u8; 32],
}

/// What travels sealed over the link once the Noise handshake is done.
///
/// Lines carry a sequence number per direction, counted from 1 over the whole
/// chat (across links): the receiver acknowledges them, the sender keeps what is
/// not yet acknowledged, and after a new link the two sides tell each other what
/// they have ([`Chat::Resume`]) so that nothing is lost or shown twice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Chat {
    /// One chat line.
    Line {
        /// Its sequence number.
        seq: u64,
        /// The text, without line terminator.
        text: String,
    },
    /// The sender is leaving: no line comes after this (acknowledgements of
    /// lines still arriving do). The side that did not leave answers with its
    /// own `Bye`.
    Bye,
    /// The sender now goes by this name (see [`validate_name`]).
    Nick {
        /// The new name.
        name: String,
    },
    /// Every line up to this sequence number arrived (cumulative).
    Ack {
        /// The highest sequence number received in order.
        upto: u64,
    },
    /// Keepalive: answered at once with an [`Chat::Ack`]. Keeps NAT mappings
    /// from idling out and proves the link still carries traffic.
    Ping,
    /// First message on a new link that replaces a lost one: the next sequence
    /// number the sender expects; the other side resends from there.
    Resume {
        /// The next sequence number expected.
        next: u64,
    },
    /// On a relayed link, from the side the rendezvous named leader: let us both
    /// try for a direct link now (through the rendezvous again, by session); the
    /// relay carries on until one is up.
    TryDirect,
    /// The sender has just saved the other side as a contact (`/save`): the
    /// other may save it too, in this chat, whose pairing the contact holds.
    Saved,
    /// The sender proves it holds the identity key its introduction named
    /// ([`Introduction::identity`]): a MAC of the chat's first handshake hash
    /// under the two identities' Diffie-Hellman result, which only the
    /// holders of the two secret keys can compute. A chat with a code proves
    /// no static key by itself; without this, a peer could introduce someone
    /// else's key, or one that proves nothing, and be saved as that contact.
    Proof {
        /// The MAC.
        mac: [u8; 32],
    },
}

/// Why a field of a message is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidField {
    /// The nameplate is empty, too long, or not a decimal number.
    #[error("invalid nameplate {0:?}: a number of at most {MAX_NAMEPLATE_LEN} digits")]
    Nameplate(String),
    /// The key-exchange message is too long.
    #[error("key-exchange message too long ({0} bytes, at most {MAX_PAKE_LEN})")]
    PakeTooLong(usize),
    /// The name is empty, too long or has control characters.
    #[error("invalid name {0:?}: 1 to {MAX_NAME_CHARS} characters, no control or invisible formatting characters")]
    Name(String),
    /// Too many candidate addresses.
    #[error("too many candidate addresses ({0}, at most {MAX_CANDIDATES})")]
    TooManyCandidates(usize),
    /// A sealed box larger than [`MAX_SEALED_LEN`].
    #[error("sealed box too long ({0} bytes, at most {MAX_SEALED_LEN})")]
    SealedTooLong(usize),
    /// A chat line longer than [`MAX_LINE_BYTES`].
    #[error("line too long ({0} bytes, at most {MAX_LINE_BYTES})")]
    LineTooLong(usize),
    /// More first lines than a handshake message may carry.
    #[error("too many first lines ({0} lines or bytes, at most {MAX_FIRST_LINES} lines of {MAX_FIRST_LINES_BYTES} bytes in all)")]
    FirstLines(usize),
}

/// Checks a nameplate: 1 to [`MAX_NAMEPLATE_LEN`] ASCII digits.
pub fn validate_nameplate(nameplate: &str) -> Result<(), InvalidField> {
    let ok = !nameplate.is_empty()
        && nameplate.len() <= MAX_NAMEPLATE_LEN
        && nameplate.bytes().all(|b| b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(InvalidField::Nameplate(truncate_for_display(nameplate)))
    }
}

/// Checks a display name: 1 to [`MAX_NAME_CHARS`] characters, none of them a
/// character [`is_hidden_or_control`] (a name is printed on the other user's
/// terminal, and must look like what it is: "\u{202E}ecila" would show as "alice").
pub fn validate_name(name: &str) -> Result<(), InvalidField> {
    let n = name.chars().count();
    if (1..=MAX_NAME_CHARS).contains(&n) && !name.chars().any(is_hidden_or_control) {
        Ok(())
    } else {
        Err(InvalidField::Name(truncate_for_display(name)))
    }
}

/// Checks the fields of a hello other than the version.
pub fn validate_hello(hello: &Hello) -> Result<(), InvalidField> {
    if hello.resume.is_none() {
        validate_nameplate(&hello.nameplate)?;
    }
    if hello.pake.len() > MAX_PAKE_LEN {
        return Err(InvalidField::PakeTooLong(hello.pake.len()));
    }
    Ok(())
}

/// Checks the size of a sealed box.
pub fn validate_sealed(sealed: &[u8]) -> Result<(), InvalidField> {
    if sealed.len() > MAX_SEALED_LEN {
        Err(InvalidField::SealedTooLong(sealed.len()))
    } else {
        Ok(())
    }
}

/// Checks opened candidates.
pub fn validate_candidates(c: &SealedCandidates) -> Result<(), InvalidField> {
    if c.candidates.len() > MAX_CANDIDATES {
        Err(InvalidField::TooManyCandidates(c.candidates.len()))
    } else {
        Ok(())
    }
}

/// Checks the first lines of a handshake message
/// ([`Introduction::first_lines`]): at most [`MAX_FIRST_LINES`], of at most
/// [`MAX_FIRST_LINES_BYTES`] in all.
pub fn validate_first_lines(lines: &[String]) -> Result<(), InvalidField> {
    if lines.len() > MAX_FIRST_LINES {
        return Err(InvalidField::FirstLines(lines.len()));
    }
    let bytes: usize = lines.iter().map(String::len).sum();
    if bytes > MAX_FIRST_LINES_BYTES {
        return Err(InvalidField::FirstLines(bytes));
    }
    Ok(())
}

/// Checks a chat line before it is sent.
pub fn validate_line(text: &str) -> Result<(), InvalidField> {
    if text.len() > MAX_LINE_BYTES {
        Err(InvalidField::LineTooLong(text.len()))
    } else {
        Ok(())
    }
}

/// Text from elsewhere made safe to print on a terminal: every character
/// [`is_hidden_or_control`] is replaced by U+FFFD, except tab which becomes a
/// space. Control characters start escape sequences (which could move the cursor,
/// retitle the window, clear the screen, or fake a line from someone else);
/// format characters reorder or hide what is shown ("\u{202E}ecila" shows as
/// "alice"). One character in, one character out.
pub fn sanitize_for_terminal(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '\t' => ' ',
            c if is_hidden_or_control(c) => '\u{FFFD}',
            c => c,
        })
        .collect()
}

/// True for a character that must not reach a terminal from elsewhere:
/// - a control character (Unicode category Cc: C0, DEL, C1), which a terminal
///   acts on instead of showing;
/// - a format character (category Cf, [`FORMAT_CHARACTERS`]): bidirectional
///   embeddings, overrides and isolates, zero-width characters, the byte order
///   mark, tag characters, the soft hyphen… invisible, and able to reorder or
///   hide the text around them;
/// - the line and paragraph separators U+2028 and U+2029 (categories Zl, Zp),
///   which some terminals and programs take for a line break.
pub fn is_hidden_or_control(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}')
        || FORMAT_CHARACTERS
            .binary_search_by(|&(first, last)| {
                if last < c {
                    std::cmp::Ordering::Less
                } else if first > c {
                    std::cmp::Ordering::Greater
                } else {
                    std::cmp::Ordering::Equal
                }
            })
            .is_ok()
}

/// Unicode general category Cf ("format"), as ranges of characters in order:
/// `DerivedGeneralCategory.txt` of Unicode 15.0 (Unicode 15.1 and 16.0 add
/// none). Written out here rather than taken from a crate: the standard library
/// does not expose the category, and the table is short and changes rarely (a
/// Cf character added later passes through until this table is updated).
pub const FORMAT_CHARACTERS: &[(char, char)] = &[
    ('\u{00AD}', '\u{00AD}'),   // soft hyphen
    ('\u{0600}', '\u{0605}'),   // Arabic number signs
    ('\u{061C}', '\u{061C}'),   // Arabic letter mark (bidi)
    ('\u{06DD}', '\u{06DD}'),   // Arabic end of ayah
    ('\u{070F}', '\u{070F}'),   // Syriac abbreviation mark
    ('\u{0890}', '\u{0891}'),   // Arabic pound and piastre marks above
    ('\u{08E2}', '\u{08E2}'),   // Arabic disputed end of ayah
    ('\u{180E}', '\u{180E}'),   // Mongolian vowel separator
    ('\u{200B}', '\u{200F}'),   // zero width space, (non-)joiner, LRM, RLM
    ('\u{202A}', '\u{202E}'),   // bidi embeddings and overrides
    ('\u{2060}', '\u{2064}'),   // word joiner, invisible operators
    ('\u{2066}', '\u{206F}'),   // bidi isolates, deprecated format characters
    ('\u{FEFF}', '\u{FEFF}'),   // byte order mark / zero width no-break space
    ('\u{FFF9}', '\u{FFFB}'),   // interlinear annotation
    ('\u{110BD}', '\u{110BD}'), // Kaithi number sign
    ('\u{110CD}', '\u{110CD}'), // Kaithi number sign above
    ('\u{13430}', '\u{1343F}'), // Egyptian hieroglyph format controls
    ('\u{1BCA0}', '\u{1BCA3}'), // shorthand format controls
    ('\u{1D173}', '\u{1D17A}'), // musical symbol beams, ties, slurs, phrases
    ('\u{E0001}', '\u{E0001}'), // language tag
    ('\u{E0020}', '\u{E007F}'), // tag characters
];

fn truncate_for_display(s: &str) -> String {
    const SHOWN: usize = 80;
    if s.chars().count() <= SHOWN {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(SHOWN).collect();
        t.push('…');
        t
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Leader => "leader",
            Role::Follower => "follower",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nameplates() {
        for ok in ["7", "123", "000000001"] {
            assert_eq!(validate_nameplate(ok), Ok(()), "{ok}");
        }
        let long = "1".repeat(MAX_NAMEPLATE_LEN + 1);
        for bad in ["", "-1", "7-a", "a", "1 2", "٣", long.as_str()] {
            assert!(validate_nameplate(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn names() {
        assert!(validate_name("alice").is_ok());
        assert!(validate_name("Zoë Ωmega").is_ok());
        assert!(validate_name("مريم").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("a\x1b[2Jb").is_err());
        assert!(validate_name(&"n".repeat(MAX_NAME_CHARS + 1)).is_err());
        // Shown as "alice", but it is not.
        assert!(validate_name("\u{202E}ecila").is_err());
        assert!(validate_name("al\u{200B}ice").is_err());
        assert!(validate_name("alice\u{E0041}").is_err());
    }

    #[test]
    fn sanitize_removes_escapes() {
        assert_eq!(sanitize_for_terminal("a\x1b[31mb\tc"), "a\u{FFFD}[31mb c");
        assert_eq!(sanitize_for_terminal("fine ✓"), "fine ✓");
        assert_eq!(sanitize_for_terminal("a\u{9b}2Jb"), "a\u{FFFD}2Jb");
    }

    #[test]
    fn sanitize_removes_bidi_and_format_characters() {
        assert_eq!(sanitize_for_terminal("\u{202E}ecila"), "\u{FFFD}ecila");
        assert_eq!(
            sanitize_for_terminal("a\u{2066}b\u{2069}c\u{FEFF}d\u{AD}e"),
            "a\u{FFFD}b\u{FFFD}c\u{FFFD}d\u{FFFD}e"
        );
        assert_eq!(sanitize_for_terminal("1\u{2028}2"), "1\u{FFFD}2");
        // Joiners inside emoji sequences are format characters too: the pieces
        // stay, side by side.
        assert_eq!(sanitize_for_terminal("👩\u{200D}💻"), "👩\u{FFFD}💻");
    }

    /// The characters the terminal must never receive, each range written out
    /// from the Unicode tables, independently of [`FORMAT_CHARACTERS`].
    const NEVER_SHOWN: &[(u32, u32)] = &[
        (0x00, 0x1F),
        (0x7F, 0x9F),
        (0xAD, 0xAD),
        (0x600, 0x605),
        (0x61C, 0x61C),
        (0x6DD, 0x6DD),
        (0x70F, 0x70F),
        (0x180E, 0x180E),
        (0x200B, 0x200F),
        (0x2028, 0x202E),
        (0x2060, 0x2064),
        (0x2066, 0x206F),
        (0xFEFF, 0xFEFF),
        (0xFFF9, 0xFFFB),
        (0xE0001, 0xE0001),
        (0xE0020, 0xE007F),
    ];

    fn never_shown(c: char) -> bool {
        let c = u32::from(c);
        NEVER_SHOWN.iter().any(|&(a, b)| (a..=b).contains(&c))
    }

    /// Any character, with the dangerous ones much more likely than chance.
    fn risky_char() -> impl Strategy<Value = char> {
        let listed = prop::sample::select(
            NEVER_SHOWN
                .iter()
                .chain(
                    FORMAT_CHARACTERS
                        .iter()
                        .map(|&(a, b)| (u32::from(a), u32::from(b)))
                        .collect::<Vec<_>>()
                        .iter(),
                )
                .flat_map(|&(a, b)| [a, b, a + (b - a) / 2])
                .filter_map(char::from_u32)
                .collect::<Vec<_>>(),
        );
        prop_oneof![any::<char>(), listed, Just('\t'), Just('a')]
    }

    fn risky_text() -> impl Strategy<Value = String> {
        prop::collection::vec(risky_char(), 0..64).prop_map(|v| v.into_iter().collect())
    }

    #[test]
    fn the_format_table_is_sorted_and_disjoint() {
        for pair in FORMAT_CHARACTERS.windows(2) {
            assert!(pair[0].0 <= pair[0].1 && pair[0].1 < pair[1].0, "{pair:?}");
        }
        for &(a, b) in FORMAT_CHARACTERS {
            assert!(is_hidden_or_control(a) && is_hidden_or_control(b));
        }
    }

    #[test]
    fn every_listed_character_is_caught() {
        for &(a, b) in NEVER_SHOWN {
            for c in (a..=b).filter_map(char::from_u32) {
                assert!(is_hidden_or_control(c), "U+{:04X}", u32::from(c));
            }
        }
    }

    use proptest::prelude::*;

    proptest! {
        #[test]
        fn sanitised_text_has_nothing_a_terminal_acts_on(text in risky_text()) {
            let shown = sanitize_for_terminal(&text);
            prop_assert!(!shown.chars().any(is_hidden_or_control), "{:?}", shown);
            prop_assert!(!shown.chars().any(never_shown), "{:?}", shown);
            // One character for one: nothing is cut or merged, so the rest of
            // the line reads as it was written.
            prop_assert_eq!(shown.chars().count(), text.chars().count());
            for (before, after) in text.chars().zip(shown.chars()) {
                if !is_hidden_or_control(before) {
                    prop_assert_eq!(before, after);
                }
            }
        }

        #[test]
        fn arbitrary_strings_sanitise_too(text in any::<String>()) {
            let shown = sanitize_for_terminal(&text);
            prop_assert!(!shown.chars().any(never_shown), "{:?}", shown);
            prop_assert!(!shown.chars().any(is_hidden_or_control), "{:?}", shown);
        }

        #[test]
        fn names_are_refused_with_any_hidden_character(
            before in "[a-z]{0,10}",
            hidden in risky_char().prop_filter("hidden", |&c| is_hidden_or_control(c)),
            after in "[a-z]{0,10}",
        ) {
            let name = format!("{before}{hidden}{after}");
            prop_assert!(validate_name(&name).is_err(), "{:?}", name);
        }

        #[test]
        fn accepted_names_show_as_they_are(name in risky_text()) {
            if validate_name(&name).is_ok() {
                prop_assert!(!name.chars().any(never_shown), "{:?}", name);
                prop_assert_eq!(sanitize_for_terminal(&name), name);
            }
        }
    }

    #[test]
    fn mappings() {
        let main: SocketAddr = "192.0.2.2:40000".parse().expect("addr");
        assert_eq!(classify_mapping(main, None), Mapping::Unknown);
        assert_eq!(classify_mapping(main, Some(main)), Mapping::Independent);
        let other: SocketAddr = "192.0.2.2:51234".parse().expect("addr");
        let m = classify_mapping(main, Some(other));
        assert_eq!(
            m,
            Mapping::DependsOnDestination {
                first: 40000,
                second: 51234
            }
        );
        assert!(m.is_symmetric());
        let other_ip: SocketAddr = "192.0.2.3:40000".parse().expect("addr");
        assert!(classify_mapping(main, Some(other_ip)).is_symmetric());
    }

    #[test]
    fn error_codes_round_trip() {
        for n in 0..20 {
            assert_eq!(ErrorCode::from_u16(n).to_u16(), n);
        }
    }

    #[test]
    fn lines() {
        assert!(validate_line(&"x".repeat(MAX_LINE_BYTES)).is_ok());
        assert_eq!(
            validate_line(&"x".repeat(MAX_LINE_BYTES + 1)),
            Err(InvalidField::LineTooLong(MAX_LINE_BYTES + 1))
        );
    }
}
