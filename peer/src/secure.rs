//! End-to-end encryption and authentication with the code, once per chat.
//!
//! 1. Key exchange, through the rendezvous: each peer starts SPAKE2 (symmetric
//!    mode) with the whole code as password and sends its message with its hello;
//!    the rendezvous hands it to the other peer with the go ([`KeyExchange`]). Both
//!    derive the same key only if both typed the same code. The rendezvous sees
//!    the messages but cannot test a guess without talking to a peer, so an
//!    attacker gets one online guess per code. This runs **once per chat**.
//! 2. Sealed candidates: right after the go each peer sends its LAN and extra
//!    candidates through the rendezvous, sealed with a key from the exchange
//!    ([`Secret::seal_candidates`]). A stranger who joined the nameplate without
//!    the code learns none of them, and a box that does not open shows at once
//!    that the other side has another key (a wrong code, or a guess).
//! 3. Confirmation, over the punched link: a Noise `NNpsk0` handshake (leader
//!    initiates) whose pre-shared key is derived from the SPAKE2 key with HKDF and
//!    a purpose label ([`Handshake`]). The punch runs it on every candidate link
//!    as it connects, the leader's first message right behind its link hello;
//!    the follower answers on the first link where that message authenticates,
//!    and that answer chooses the link ([`crate::punch`]). Its two payloads carry each
//!    side's [`Introduction`] (name, role in the chat), encrypted. A wrong code, or
//!    a man in the middle that ran SPAKE2 with each side, makes the keys differ
//!    and the handshake fail on both sides; nothing typed has been sent yet.
//! 4. The chat's secret ([`Secret::chat`]) is derived from the SPAKE2 key and the
//!    first handshake's hash. Every later link of the chat (after a drop, a relay,
//!    the switch to a direct link) meets in a room derived from it, seals its
//!    candidates with it and keys its handshake with it: the code is never used
//!    again, so cutting links gives an attacker no new guess at it.
//! 5. Every chat message is then a Noise transport message ([`SecureLink`]): a
//!    sealed [`Chat`] inside a [`PeerToPeer::Sealed`] frame. Lines are at most
//!    [`punchline_proto::MAX_LINE_BYTES`], so one line is always one message
//!    (longer lines are refused by the sender, not split).
//! 6. The chat's verification words (`/verify`), 48 bits, hash the code's key
//!    with a random nonce from each side. Each peer commits to its nonce in its
//!    hello, next to its SPAKE2 message (the rendezvous hands the commitment on
//!    with the go), and reveals it in its handshake payload, where the other
//!    checks it ([`Pledge`]); both commitments are in the first link's Noise
//!    prologue, so one altered on the way fails the handshake on both sides. A
//!    side's words are fixed when its go arrives and hash its own nonce, secret
//!    until then, with the key of its own SPAKE2 run: a man in the middle who
//!    knows the code (two runs, two keys) has nothing left to grind, and the two
//!    sides' words agree by chance only, 1 in 2^48 (`docs/security.md`, item
//!    5). Both sides know the words as soon as the handshake is done; nothing
//!    waits for a later message.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use futures::{SinkExt, StreamExt};
use punchline_proto::codec::{decode_payload, encode_payload};
use punchline_proto::codes::{Code, WORDS};
use punchline_proto::{
    validate_candidates, validate_first_lines, validate_line, validate_name, Chat, CodecError,
    Introduction, PeerToPeer, ResumeRoom, Role, SealedCandidates, SessionToken, MAX_FIRST_LINES,
    MAX_FIRST_LINES_BYTES, MAX_FRAME_SIZE, RESUME_ROOM_LEN,
};
use spake2::{Ed25519Group, Identity, Password, Spake2};
use tokio::sync::mpsc;
use tokio::time::timeout;

use crate::error::{KeyRefusal, PeerError};
use crate::punch::PeerFrames;

/// The Noise protocol of the link: no static keys (the code authenticates), a
/// pre-shared key mixed in before the first message.
pub const NOISE_PARAMS: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";

/// The Noise protocol of a contact's first link: both sides' identity keys,
/// known to each other in advance, and the pairing secret as pre-shared key
/// ([`Secret::contact`]).
pub const CONTACT_NOISE_PARAMS: &str = "Noise_KKpsk0_25519_ChaChaPoly_BLAKE2s";

/// SPAKE2 identity: binds the exchange to this application and protocol.
const SPAKE2_IDENTITY: &[u8] = b"punchline/2 spake2";

/// HKDF purpose label of the first link's Noise pre-shared key (from the code).
const FIRST_PSK_LABEL: &[u8] = b"punchline/2 first link psk";

/// HKDF purpose label of the chat's secret (from the code's key and the first
/// handshake's hash).
const CHAT_LABEL: &[u8] = b"punchline/2 chat secret";

/// HKDF purpose label of a later link's Noise pre-shared key (from the chat's
/// secret).
const LATER_PSK_LABEL: &[u8] = b"punchline/2 later link psk";

/// HKDF purpose label of the verification words' key (from the code's key).
const WORDS_LABEL: &[u8] = b"punchline/5 words key";

/// HKDF purpose label of the key of the follower's sealed first lines (from
/// the code's key).
const FIRST_LINES_LABEL: &[u8] = b"punchline/8 first lines from the follower";

/// HKDF purpose label of a contact's pairing secret (from the chat's secret).
const PAIRING_LABEL: &[u8] = b"punchline/10 contact pairing";

/// HKDF purpose label of a contact's first-link key (from the pairing secret).
const CONTACT_KEY_LABEL: &[u8] = b"punchline/10 contact key";

/// HKDF purpose label of the proof that a side holds the identity key it
/// introduced (from the identities' Diffie-Hellman result, salted with the
/// chat's first handshake hash, with the sender's chat role).
const PROOF_LABEL: &[u8] = b"punchline/10 identity proof";

/// HKDF purpose label of a contact's room (from the pairing secret, with the
/// room epoch).
const CONTACT_ROOM_LABEL: &[u8] = b"punchline/10 contact room";

/// HKDF purpose label of the resume room (from the chat's secret).
const ROOM_LABEL: &[u8] = b"punchline/2 resume room";

/// HKDF purpose labels of the sealed candidates, by the sender's role.
const BOX_LABEL_LEADER: &[u8] = b"punchline/2 candidates from the leader";
const BOX_LABEL_FOLLOWER: &[u8] = b"punchline/2 candidates from the follower";

/// Time allowed for the Noise handshake over the link (two messages).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest Noise message (the Noise specification's limit).
const NOISE_MAX: usize = 65_535;

/// The words of the verification string: 6 words of 8 bits. A man in the
/// middle who knows the code (and so can complete both handshakes) would need
/// the two sides' words to agree by chance: 1 in 2^48 per chat (step 6 of the
/// module docs says why it cannot steer them).
pub const VERIFY_WORDS: usize = 6;

/// What the user is told when the first handshake fails.
pub const WRONG_CODE: &str = "the other side did not prove it knows the code: either one of you \
typed it wrong, or someone tried to intercept the connection. Nothing you typed can be read \
without the code. Start again with a new code.";

/// What the user is told when the other side's sealed candidates do not open
/// with our key: it holds another key, so it typed another code.
pub const WRONG_CODE_BOX: &str = "someone joined with a different code: either the other side \
typed it wrong, or someone is guessing codes. It learned nothing about you but your public \
address, and this code is now used up: start again with a new code.";

/// What the user is told when the other side's handshake does not keep the
/// words commitment of its hello.
pub const WORDS_BROKEN: &str = "the other side proved it knows the code, but its verification \
words do not match the commitment the rendezvous passed on from it: someone who knows the code \
is trying to sit in the middle (the rendezvous, or whoever saw the code). Lines you typed before \
the link was up may have reached it. Start again with a new code, passed on another way.";

/// The first half of SPAKE2, started before the hello, with our commitment to
/// the verification words' nonce.
pub struct KeyExchange {
    state: Spake2<Ed25519Group>,
    /// Our words nonce, revealed in our first handshake.
    nonce: [u8; 32],
    /// Our message, to send with the hello ([`punchline_proto::Hello::pake`]):
    /// the commitment to our words nonce, then the SPAKE2 message.
    pub message: Vec<u8>,
}

/// Length of the words commitment at the start of a key-exchange message.
const COMMITMENT_LEN: usize = 32;

impl KeyExchange {
    /// Starts SPAKE2 with `code` as the password and draws our words nonce.
    pub fn start(code: &Code) -> Result<KeyExchange, PeerError> {
        let (state, spake) = Spake2::<Ed25519Group>::start_symmetric(
            &Password::new(code.password().as_bytes()),
            &Identity::new(SPAKE2_IDENTITY),
        );
        let nonce = random_nonce()?;
        let mut message = commit(&nonce).to_vec();
        message.extend_from_slice(&spake);
        Ok(KeyExchange {
            state,
            nonce,
            message,
        })
    }

    /// Finishes with the other peer's message: the key of the code, with the
    /// words' pledges of both sides.
    pub fn finish(self, theirs: &[u8]) -> Result<Secret, PeerError> {
        if theirs.len() < COMMITMENT_LEN {
            return Err(PeerError::Protocol(format!(
                "the other side's key-exchange message is too short ({} bytes)",
                theirs.len()
            )));
        }
        let (commitment, theirs) = theirs.split_at(COMMITMENT_LEN);
        let mut their_commitment = [0u8; COMMITMENT_LEN];
        their_commitment.copy_from_slice(commitment);
        let key = self.state.finish(theirs).map_err(|e| {
            tracing::info!(error = ?e, "SPAKE2 refused the other side's message");
            PeerError::Protocol(format!(
                "the other side's key-exchange message is not a valid SPAKE2 message ({} bytes)",
                theirs.len()
            ))
        })?;
        let mut secret = [0u8; 32];
        hkdf::Hkdf::<sha2::Sha256>::new(None, &key)
            .expand(b"punchline/2 code key", &mut secret)
            .map_err(|_| PeerError::Protocol("key derivation failed".into()))?;
        Ok(Secret {
            key: secret,
            kind: Kind::Code(Pledge {
                ours: self.nonce,
                our_commitment: commit(&self.nonce),
                their_commitment,
            }),
        })
    }
}

/// The verification words' nonces of a first meeting: ours (revealed in our
/// handshake payload) and the other side's commitment (from its hello, which
/// its handshake payload must keep).
#[derive(Clone)]
pub struct Pledge {
    ours: [u8; 32],
    /// The commitment to `ours`, as our hello sent it.
    our_commitment: [u8; 32],
    their_commitment: [u8; 32],
}

impl Pledge {
    /// Both commitments, the leader's first, as this side saw them: the
    /// first link's Noise prologue mixes them in (see [`prologue`]).
    fn commitments(&self, role: Role) -> [&[u8; 32]; 2] {
        match role {
            Role::Leader => [&self.our_commitment, &self.their_commitment],
            Role::Follower => [&self.their_commitment, &self.our_commitment],
        }
    }
}

/// A secret the two peers share: what a chat's first link is keyed with (the
/// key of the code, from SPAKE2; or a contact's pairing secret, with both
/// identity keys), or the chat's secret (for every later link).
#[derive(Clone)]
pub struct Secret {
    key: [u8; 32],
    kind: Kind,
}

/// What a [`Secret`] keys.
#[derive(Clone)]
enum Kind {
    /// A code chat's first link: the words' nonces come with it.
    Code(Pledge),
    /// A contact chat's first link (Noise `KKpsk0`).
    Contact(Arc<Statics>),
    /// Every later link of a chat.
    Chat,
}

/// The identity keys of a contact's first link.
struct Statics {
    /// Our identity's secret key.
    ours: [u8; 32],
    /// The contact's public key.
    theirs: [u8; 32],
    /// What the user calls the contact.
    name: String,
}

/// Why an identity key someone introduced cannot be a contact's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadIdentity {
    /// A point whose Diffie-Hellman result with ours is zero (of low order):
    /// it would prove nothing.
    Invalid,
    /// Our own key.
    Ours,
}

/// The two identities' Diffie-Hellman result, unless it proves nothing.
fn identity_dh(
    ours: &crate::contacts::Identity,
    theirs: &[u8; 32],
) -> Result<[u8; 32], BadIdentity> {
    if *theirs == ours.public() {
        return Err(BadIdentity::Ours);
    }
    let shared = curve25519_dalek::MontgomeryPoint(*theirs)
        .mul_clamped(*ours.secret())
        .to_bytes();
    if shared == [0; 32] {
        return Err(BadIdentity::Invalid);
    }
    Ok(shared)
}

/// The proof ([`punchline_proto::Chat::Proof`]) that the side with chat role
/// `sender` holds its identity key, in the chat whose first handshake hash
/// is `first_hash`, between identity `ours` and the other's key `theirs`:
/// both sides compute the same value (the Diffie-Hellman result is
/// symmetric), and only holders of one of the two secret keys can.
pub fn identity_proof(
    ours: &crate::contacts::Identity,
    theirs: &[u8; 32],
    first_hash: &[u8],
    sender: Role,
) -> Result<[u8; 32], BadIdentity> {
    let shared = identity_dh(ours, theirs)?;
    let mut label = PROOF_LABEL.to_vec();
    label.push(match sender {
        Role::Leader => 0,
        Role::Follower => 1,
    });
    let mut mac = [0u8; 32];
    hkdf::Hkdf::<sha2::Sha256>::new(Some(first_hash), &shared)
        .expand(&label, &mut mac)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    Ok(mac)
}

/// Whether two MACs are equal, in time independent of where they differ.
pub fn same_mac(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The room at the rendezvous where two contacts with `pairing` meet during
/// the room epoch `epoch` ([`crate::contacts::room_epoch`]): the rendezvous
/// cannot tie it to the pairing or the names, and it changes every epoch.
pub fn contact_room(pairing: &[u8; 32], epoch: u64) -> ResumeRoom {
    let mut label = CONTACT_ROOM_LABEL.to_vec();
    label.extend_from_slice(&epoch.to_be_bytes());
    let mut full = [0u8; 32];
    hkdf::Hkdf::<sha2::Sha256>::new(None, pairing)
        .expand(&label, &mut full)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    let mut room = [0u8; RESUME_ROOM_LEN];
    room.copy_from_slice(&full[..RESUME_ROOM_LEN]);
    room
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    fn derive(&self, salt: Option<&[u8]>, label: &[u8]) -> [u8; 32] {
        let mut out = [0u8; 32];
        hkdf::Hkdf::<sha2::Sha256>::new(salt, &self.key)
            .expand(label, &mut out)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        out
    }

    /// A chat's secret from raw key bytes (for tests and benchmarks; a real
    /// chat's secret comes from [`Secret::chat`]).
    pub fn from_key(key: [u8; 32]) -> Secret {
        Secret {
            key,
            kind: Kind::Chat,
        }
    }

    /// The key of a contact chat's first link: the `contact`'s pairing
    /// secret, with our `identity` and the contact's public key as the
    /// handshake's static keys.
    ///
    /// The key itself mixes the two identities' Diffie-Hellman result in with
    /// the pairing: so the candidates' boxes and the follower's box of first
    /// lines, which travel before the handshake, are as hard to seal as the
    /// handshake is to complete. Whoever holds a copy of the pairing without
    /// one of the two identity keys (a contacts file stolen alone) can seal
    /// nothing either side would open.
    ///
    /// A saved key that proves nothing (see [`BadIdentity`]) is refused.
    pub fn contact(
        contact: &crate::contacts::Contact,
        identity: &crate::contacts::Identity,
    ) -> Result<Secret, PeerError> {
        let shared = identity_dh(identity, &contact.key).map_err(|_| {
            PeerError::Contacts(format!(
                "the key saved for contact {0:?} is not one a contact can have (it would prove \
                 nothing): forget it (`peer contacts forget {0}`) and pair again with a code",
                contact.name
            ))
        })?;
        let pairing = Secret::from_key(contact.pairing);
        Ok(Secret {
            key: pairing.derive(Some(&shared), CONTACT_KEY_LABEL),
            kind: Kind::Contact(Arc::new(Statics {
                ours: *identity.secret(),
                theirs: contact.key,
                name: contact.name.clone(),
            })),
        })
    }

    /// True for the key of the code, false for a contact's or a chat's secret.
    pub fn is_code_key(&self) -> bool {
        matches!(self.kind, Kind::Code(_))
    }

    /// True for what keys a chat's first link (the code's key, a contact's
    /// pairing), false for a chat's secret.
    pub fn opens_chat(&self) -> bool {
        !matches!(self.kind, Kind::Chat)
    }

    /// The contact's name, for a contact chat's first link.
    pub fn contact_name(&self) -> Option<&str> {
        match &self.kind {
            Kind::Contact(statics) => Some(&statics.name),
            _ => None,
        }
    }

    fn pledge(&self) -> Option<&Pledge> {
        match &self.kind {
            Kind::Code(pledge) => Some(pledge),
            _ => None,
        }
    }

    /// The Noise pre-shared key of a link keyed by this secret.
    pub fn psk(&self) -> [u8; 32] {
        if self.opens_chat() {
            self.derive(None, FIRST_PSK_LABEL)
        } else {
            self.derive(None, LATER_PSK_LABEL)
        }
    }

    /// The pairing secret a contact saved from this chat holds: the same on
    /// both sides, derived from the chat's secret (never from the code).
    pub fn pairing(&self) -> [u8; 32] {
        self.derive(None, PAIRING_LABEL)
    }

    /// The chat's secret, from the code's key and the first link's handshake
    /// hash: it binds every later link to the first one (and so to the words
    /// both users may have compared).
    pub fn chat(&self, handshake_hash: &[u8]) -> Secret {
        Secret {
            key: self.derive(Some(handshake_hash), CHAT_LABEL),
            kind: Kind::Chat,
        }
    }

    /// What the user is told when the other end of a meeting keyed by this
    /// secret fails to prove it holds it.
    pub fn refused(&self, how: KeyRefusal) -> PeerError {
        match &self.kind {
            Kind::Code(_) => PeerError::BadCode(how),
            Kind::Contact(statics) => PeerError::ContactRefused {
                name: statics.name.clone(),
                how,
            },
            Kind::Chat => PeerError::NotAuthenticated(how),
        }
    }

    /// The room where the two peers of the chat meet again.
    pub fn resume_room(&self) -> ResumeRoom {
        let full = self.derive(None, ROOM_LABEL);
        let mut room = [0u8; RESUME_ROOM_LEN];
        room.copy_from_slice(&full[..RESUME_ROOM_LEN]);
        room
    }

    fn box_cipher(&self, sender: Role) -> XChaCha20Poly1305 {
        let label = match sender {
            Role::Leader => BOX_LABEL_LEADER,
            Role::Follower => BOX_LABEL_FOLLOWER,
        };
        XChaCha20Poly1305::new(&self.derive(None, label).into())
    }

    /// Seals our candidates for the other peer of the meeting `session`, sent by
    /// the peer with role `sender`. A random nonce: the same secret seals a box
    /// at every meeting of the chat.
    pub fn seal_candidates(
        &self,
        sender: Role,
        session: &SessionToken,
        candidates: &SealedCandidates,
    ) -> Result<Vec<u8>, PeerError> {
        let plain = encode_payload(candidates)
            .map_err(|e| PeerError::Protocol(format!("encoding our candidates: {e}")))?;
        let mut nonce = [0u8; 24];
        getrandom::fill(&mut nonce)
            .map_err(|e| PeerError::io("no randomness for a nonce", std::io::Error::other(e)))?;
        let sealed = self
            .box_cipher(sender)
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &plain,
                    aad: session,
                },
            )
            .map_err(|_| PeerError::Protocol("sealing our candidates failed".into()))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Opens the other peer's box (sent by the peer with role `sender` for the
    /// meeting `session`). `None` if it does not open: it was sealed with
    /// another key, or altered.
    pub fn open_candidates(
        &self,
        sender: Role,
        session: &SessionToken,
        sealed: &[u8],
    ) -> Option<SealedCandidates> {
        if sealed.len() < 24 {
            return None;
        }
        let (nonce, body) = sealed.split_at(24);
        let plain = self
            .box_cipher(sender)
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: body,
                    aad: session,
                },
            )
            .ok()?;
        let opened: SealedCandidates = decode_payload(&plain).ok()?;
        validate_candidates(&opened).ok()?;
        Some(opened)
    }
}

/// How long closing a relayed link waits for the relay to pass on what was
/// written last (the goodbye).
const RELAY_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a message could not be received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecvError {
    /// The connection failed (reset, timeout): the link is down, the chat can go
    /// on over a new one.
    Link(String),
    /// A message failed authentication or is not what the protocol allows: the
    /// other side (or someone on the path) misbehaves.
    Sealed(String),
}

/// The link after the handshake: sealed chat messages.
pub struct SecureLink {
    link: PeerFrames,
    noise: snow::TransportState,
    verification: Option<String>,
    hash: Vec<u8>,
    /// How many of the chat's first lines our first handshake message carried.
    carried: u64,
    their: Introduction,
    /// Sealed bytes sent and received (ciphertext with its tags).
    bytes: (u64, u64),
}

/// The other side's name as we show it: as it is if valid, else sanitised
/// and cut to the longest valid length.
fn shown_name(name: &str) -> String {
    if validate_name(name).is_ok() {
        return name.to_owned();
    }
    punchline_proto::sanitize_for_terminal(name)
        .chars()
        .take(punchline_proto::MAX_NAME_CHARS)
        .collect()
}

fn noise_error(e: snow::Error) -> PeerError {
    PeerError::Protocol(format!("encryption: {e}"))
}

/// What the user is told when the other end closes during the first
/// handshake.
pub const WRONG_CODE_CLOSED: &str = "the other side did not prove it knows the code: it closed \
the connection during the key confirmation (one of you typed the code wrong, someone tried to \
intercept the connection, or the connection broke). Nothing you typed can be read without the code. Start again with a \
new code.";

/// The commitment to a words nonce.
fn commit(nonce: &[u8; 32]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::new()
        .chain_update(b"punchline/2 words commitment")
        .chain_update(nonce)
        .finalize()
        .into()
}

/// The verification words of a chat: the code's key (its words key, derived
/// for nothing else) with both nonces.
fn words_of(secret: &Secret, leader_nonce: &[u8; 32], follower_nonce: &[u8; 32]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::new()
        .chain_update(b"punchline/2 verification words")
        .chain_update(secret.derive(None, WORDS_LABEL))
        .chain_update(leader_nonce)
        .chain_update(follower_nonce)
        .finalize();
    verification_words(&digest)
}

fn random_nonce() -> Result<[u8; 32], PeerError> {
    let mut nonce = [0u8; 32];
    getrandom::fill(&mut nonce)
        .map_err(|e| PeerError::io("no randomness for a nonce", std::io::Error::other(e)))?;
    Ok(nonce)
}

/// What every link's handshake is keyed with: the punch runs one on each
/// candidate link as it connects.
pub struct LinkKeys {
    /// The code's key on a first link, the chat's secret on a later one.
    pub secret: Secret,
    /// How we introduce ourselves (name, chat role).
    pub ours: Introduction,
    /// The chat's verification words, on a later link (the first link's
    /// handshake makes them).
    pub words: Option<String>,
    /// What the user typed before the first link was up: the leader's first
    /// handshake message on a first link carries it, the follower's box of
    /// first lines too.
    pub first_lines: FirstLines,
    /// Where the leader of a first link hands the follower's first lines as
    /// they come, to be shown before the handshake ends.
    pub shows_first_lines: Option<mpsc::Sender<Introduction>>,
}

/// The chat's first lines, typed before its first link is up, as the leader's
/// first handshake message carries them ([`Introduction::first_lines`]): the
/// lines typed first, up to the first thing that is not a line (or a line
/// that is not valid, or one past the limits). Shared between what reads the
/// user's input and the handshakes, which take what is there when each writes
/// its first message.
/// The first lines of a chat's first meeting, both ways: ours, as typed, and
/// where the other side's go as their box opens (we lead).
#[derive(Clone)]
pub struct EarlyLines {
    /// Ours.
    pub ours: FirstLines,
    /// Theirs, with the name they came under.
    pub theirs: mpsc::Sender<Introduction>,
}

/// What the user typed first ([`EarlyLines::ours`]).
#[derive(Clone, Default)]
pub struct FirstLines(Arc<Mutex<FirstLinesState>>);

#[derive(Default)]
struct FirstLinesState {
    lines: Vec<String>,
    bytes: usize,
    /// Something other than a line that fits came: the first lines end.
    closed: bool,
}

impl FirstLines {
    /// The next thing typed: a line (`Some`) extends the first lines while it
    /// fits; anything else ends them.
    pub fn typed(&self, line: Option<&str>) {
        let mut state = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if state.closed {
            return;
        }
        match line {
            Some(text)
                if validate_line(text).is_ok()
                    && state.lines.len() < MAX_FIRST_LINES
                    && state.bytes + text.len() <= MAX_FIRST_LINES_BYTES =>
            {
                state.bytes += text.len();
                state.lines.push(text.to_owned());
            }
            _ => state.closed = true,
        }
    }

    /// The first lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .lines
            .clone()
    }
}

impl LinkKeys {
    /// A fresh handshake for one link of the meeting `session`, in the given
    /// link role.
    pub fn handshake(&self, role: Role, session: &SessionToken) -> Result<Handshake, PeerError> {
        let mut hs = Handshake::new(
            role,
            &self.secret,
            &self.ours,
            self.words.as_deref(),
            session,
        )?;
        if self.secret.opens_chat() {
            match role {
                Role::Leader => {
                    hs.carry_first_lines(self.first_lines.lines())?;
                    hs.shows_first_lines = self.shows_first_lines.clone();
                }
                Role::Follower => hs.seal_first_lines(self.first_lines.lines())?,
            }
        }
        Ok(hs)
    }
}

/// The Noise prologue of a link of the meeting `session`: both sides mix it
/// in, so a handshake message recorded in one meeting (the leader's first
/// message goes to every candidate address, whoever answers there) does not
/// authenticate in another, although later links of a chat share a key.
///
/// On a first link it holds the two words commitments too, the leader's
/// first, as this side got them: they travel in clear through the
/// rendezvous, outside what SPAKE2 authenticates, so whoever alters one (with
/// or without the code) makes the two prologues differ and the handshake
/// fail on both sides, like any other tampering. A nonce that then breaks
/// its commitment ([`KeyRefusal::Words`]) can only come from a holder of the
/// code's key.
fn prologue(session: &SessionToken, commitments: Option<[&[u8; 32]; 2]>) -> Vec<u8> {
    let mut p = b"punchline link prologue".to_vec();
    p.extend_from_slice(&punchline_proto::PROTOCOL_VERSION.to_le_bytes());
    p.extend_from_slice(session);
    for c in commitments.into_iter().flatten() {
        p.extend_from_slice(c);
    }
    p
}

/// One side's Noise handshake on one link, in steps, so that the punch can run
/// it on every candidate link as soon as it connects: the leader writes the
/// first message, the follower reads it and answers, the leader reads the
/// answer; then [`Handshake::finish`] makes the [`SecureLink`].
pub struct Handshake {
    state: snow::HandshakeState,
    role: Role,
    ours: Introduction,
    intro: Vec<u8>,
    their: Option<Introduction>,
    /// The secret's words pledge (a first link), to check the other's reveal.
    secret: Secret,
    /// The chat's words: given on a later link, made by a first link's
    /// [`Handshake::read`].
    verification: Option<String>,
    /// The Noise prologue, also the associated data of the follower's sealed
    /// first lines.
    prologue: Vec<u8>,
    /// How many of the chat's first lines our side sent before the handshake
    /// ended (the leader's in its first message, the follower's in its box).
    carried: u64,
    /// The follower's sealed first lines, to send behind its link hello.
    first_lines_box: Option<PeerToPeer>,
    /// Where the leader hands the follower's first lines as their boxes open.
    shows_first_lines: Option<mpsc::Sender<Introduction>>,
    /// A box of the other's first lines opened on this link: it holds the
    /// code's key, so a handshake that then fails was cut or altered on the
    /// way, not refused for another code.
    their_box_opened: bool,
}

impl Handshake {
    /// Starts the handshake of one link, keyed by `secret`: the leader writes
    /// first; each side's payload is its introduction (`ours`, whose
    /// `words_nonce` is filled in here).
    ///
    /// Words: on a first link (keyed by the code) each side reveals the nonce
    /// its hello committed to ([`Introduction::words_nonce`]), and the words
    /// are made when the other's reveal is read; on a later link `words` are
    /// the chat's, made by its first link.
    ///
    /// The handshake is bound to the meeting's session token (see
    /// [`prologue`]).
    pub fn new(
        role: Role,
        secret: &Secret,
        ours: &Introduction,
        words: Option<&str>,
        session: &SessionToken,
    ) -> Result<Handshake, PeerError> {
        let params = match secret.kind {
            Kind::Contact(_) => CONTACT_NOISE_PARAMS,
            _ => NOISE_PARAMS,
        }
        .parse()
        .map_err(|e| PeerError::Protocol(format!("noise parameters: {e}")))?;
        let psk = secret.psk();
        let prologue = prologue(session, secret.pledge().map(|p| p.commitments(role)));
        let mut builder = snow::Builder::new(params)
            .psk(0, &psk)
            .map_err(noise_error)?
            .prologue(&prologue)
            .map_err(noise_error)?;
        if let Kind::Contact(statics) = &secret.kind {
            builder = builder
                .local_private_key(&statics.ours)
                .map_err(noise_error)?
                .remote_public_key(&statics.theirs)
                .map_err(noise_error)?;
        }
        let state = match role {
            Role::Leader => builder.build_initiator(),
            Role::Follower => builder.build_responder(),
        }
        .map_err(noise_error)?;
        let mut ours = ours.clone();
        ours.words_nonce = match secret.pledge() {
            Some(pledge) => pledge.ours,
            None => [0; 32],
        };
        ours.first_lines = Vec::new();
        let intro = encode_payload(&ours)
            .map_err(|e| PeerError::Protocol(format!("encoding our introduction: {e}")))?;
        Ok(Handshake {
            state,
            role,
            ours,
            intro,
            their: None,
            secret: secret.clone(),
            verification: words.map(str::to_owned),
            prologue,
            carried: 0,
            first_lines_box: None,
            shows_first_lines: None,
            their_box_opened: false,
        })
    }

    /// Our first handshake message (we lead a chat's first link) carries
    /// `lines`, the chat's first ones ([`Introduction::first_lines`]).
    pub fn carry_first_lines(&mut self, lines: Vec<String>) -> Result<(), PeerError> {
        validate_first_lines(&lines).map_err(|e| PeerError::Protocol(e.to_string()))?;
        if lines.is_empty() {
            return Ok(());
        }
        self.carried = lines.len() as u64;
        self.ours.first_lines = lines;
        self.intro = encode_payload(&self.ours)
            .map_err(|e| PeerError::Protocol(format!("encoding our introduction: {e}")))?;
        Ok(())
    }

    fn first_lines_cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(&self.secret.derive(None, FIRST_LINES_LABEL).into())
    }

    /// We follow a chat's first link: `lines`, the chat's first ones, go in
    /// a sealed box right behind our link hello ([`PeerToPeer::FirstLines`]),
    /// so that the leader shows them before the handshake ends. A preview
    /// only: the session sends them again after the handshake (a box dropped
    /// or altered on the way must not lose them).
    pub fn seal_first_lines(&mut self, lines: Vec<String>) -> Result<(), PeerError> {
        validate_first_lines(&lines).map_err(|e| PeerError::Protocol(e.to_string()))?;
        if lines.is_empty() {
            return Ok(());
        }
        let intro = Introduction {
            words_nonce: [0; 32],
            first_lines: lines,
            ..self.ours.clone()
        };
        let plain = encode_payload(&intro)
            .map_err(|e| PeerError::Protocol(format!("encoding our first lines: {e}")))?;
        let nonce = random_nonce()?;
        let nonce = XNonce::from_slice(&nonce[..24]);
        let sealed = self
            .first_lines_cipher()
            .encrypt(
                nonce,
                Payload {
                    msg: &plain,
                    aad: &self.prologue,
                },
            )
            .map_err(|_| PeerError::Protocol("sealing our first lines failed".into()))?;
        let mut boxed = nonce.to_vec();
        boxed.extend_from_slice(&sealed);
        self.first_lines_box = Some(PeerToPeer::FirstLines(boxed));
        // Not counted as carried: the box is outside the handshake, so whoever
        // carries the link could drop or alter it unseen. The lines go again
        // after the handshake; the leader skips those it already showed.
        Ok(())
    }

    /// The follower's sealed first lines, to send behind its link hello.
    pub fn take_first_lines_box(&mut self) -> Option<PeerToPeer> {
        self.first_lines_box.take()
    }

    /// We lead a chat's first link and the follower's box of first lines
    /// came: opened, checked and handed on to be shown at once. A box that
    /// does not open (another key, another meeting, altered) or does not
    /// hold what it may is dropped: the follower's lines come again after
    /// the handshake anyway.
    pub fn took_first_lines(&mut self, sealed: &[u8]) {
        let Some(shows) = &self.shows_first_lines else {
            return;
        };
        if sealed.len() < 24 {
            return;
        }
        let (nonce, body) = sealed.split_at(24);
        let Ok(plain) = self.first_lines_cipher().decrypt(
            XNonce::from_slice(nonce),
            Payload {
                msg: body,
                aad: &self.prologue,
            },
        ) else {
            tracing::info!("a box of first lines did not open");
            return;
        };
        let Ok(mut their) = decode_payload::<Introduction>(&plain) else {
            return;
        };
        let fits = validate_first_lines(&their.first_lines)
            .and_then(|()| their.first_lines.iter().try_for_each(|l| validate_line(l)));
        if their.chat_role == self.ours.chat_role || fits.is_err() {
            return;
        }
        self.their_box_opened = true;
        their.name = shown_name(&their.name);
        // A preview: when the queue is full (boxes replayed in a flood), one
        // more is dropped, and its lines come after the handshake anyway.
        let _ = shows.try_send(their);
    }

    /// Our next handshake message (the leader's first, the follower's answer),
    /// as a frame.
    pub fn write(&mut self) -> Result<PeerToPeer, PeerError> {
        let mut buf = vec![0u8; NOISE_MAX];
        let n = self
            .state
            .write_message(&self.intro, &mut buf)
            .map_err(noise_error)?;
        buf.truncate(n);
        Ok(PeerToPeer::Handshake(buf))
    }

    /// Reads the other side's handshake message. A wrong key shows here: the
    /// message does not decrypt ([`PeerError::BadCode`] on a first link, else
    /// [`PeerError::NotAuthenticated`]). A message with our own chat role is
    /// our own, come back ([`PeerError::MetItself`]). On a first link, a nonce
    /// that is not the one the other's hello committed to is refused too
    /// ([`KeyRefusal::Words`]): whoever sent it holds the code's key but is not
    /// who the rendezvous said (or the rendezvous changed the commitment).
    pub fn read(&mut self, msg: &[u8]) -> Result<(), PeerError> {
        let mut buf = vec![0u8; NOISE_MAX];
        let n = self
            .state
            .read_message(msg, &mut buf)
            .map_err(|_| self.refused(KeyRefusal::Handshake))?;
        let mut their: Introduction = decode_payload(&buf[..n])
            .map_err(|e| PeerError::Protocol(format!("the other side's introduction: {e}")))?;
        if their.chat_role == self.ours.chat_role {
            return Err(PeerError::MetItself);
        }
        // First lines come only from the leader of a first link, within the
        // limits; anything else is a broken or hostile peer.
        let may_carry = self.role == Role::Follower && self.secret.opens_chat();
        if !their.first_lines.is_empty() && !may_carry {
            return Err(PeerError::Protocol(
                "the other side's handshake carried lines where none may be".into(),
            ));
        }
        validate_first_lines(&their.first_lines)
            .and_then(|()| their.first_lines.iter().try_for_each(|l| validate_line(l)))
            .map_err(|e| PeerError::Protocol(format!("the other side's first lines: {e}")))?;
        // A contact's handshake authenticated the key we saved: the
        // introduction must name that one.
        if let Kind::Contact(statics) = &self.secret.kind {
            if their.identity != statics.theirs {
                return Err(PeerError::Protocol(
                    "the other side's introduction names another identity key than its handshake"
                        .into(),
                ));
            }
        }
        if let Some(pledge) = self.secret.pledge() {
            if commit(&their.words_nonce) != pledge.their_commitment {
                return Err(self.refused(KeyRefusal::Words));
            }
            let (leader, follower) = match self.role {
                Role::Leader => (&pledge.ours, &their.words_nonce),
                Role::Follower => (&their.words_nonce, &pledge.ours),
            };
            self.verification = Some(words_of(&self.secret, leader, follower));
        }
        their.name = shown_name(&their.name);
        self.their = Some(their);
        Ok(())
    }

    /// What a frame other than a handshake message, where one was due, means:
    /// the far end does not hold the key (an impostor, or a broken peer).
    pub fn refused(&self, how: KeyRefusal) -> PeerError {
        if self.their_box_opened && how != KeyRefusal::Words {
            return self.cut_after_box();
        }
        self.secret.refused(how)
    }

    /// The other end closed the link in the middle of the handshake. On the
    /// first link that is how a peer that cannot decrypt our message (another
    /// code) answers; on a later one it is a lost link (the other side may
    /// simply have given up on it), not a failed authentication.
    pub fn closed(&self) -> PeerError {
        if self.their_box_opened {
            return self.cut_after_box();
        }
        if self.secret.opens_chat() {
            self.secret.refused(KeyRefusal::ClosedInHandshake)
        } else {
            PeerError::LinkLost {
                name: crate::punch::THE_OTHER_SIDE.to_owned(),
                why: "closed during the encryption handshake".into(),
            }
        }
    }

    /// The link lost after the other's box of first lines opened (so it
    /// holds the code's key): not a wrong code.
    fn cut_after_box(&self) -> PeerError {
        PeerError::LinkLost {
            name: crate::punch::THE_OTHER_SIDE.to_owned(),
            why: "the link was cut or altered during the encryption handshake, after the other \
                  side's first lines (shown above) proved it holds the key"
                .into(),
        }
    }

    /// The secured link, once both messages have passed.
    pub fn finish(self, link: PeerFrames) -> Result<SecureLink, PeerError> {
        let Handshake {
            state,
            their,
            mut verification,
            carried,
            secret,
            ..
        } = self;
        let (Some(their), true) = (their, state.is_handshake_finished()) else {
            return Err(PeerError::Protocol("the handshake is not finished".into()));
        };
        let hash = state.get_handshake_hash().to_vec();
        // A contact's first link: both identity keys are authenticated; the
        // words, from the handshake's hash, show the two ends saw one
        // handshake.
        if matches!(secret.kind, Kind::Contact(_)) {
            verification = Some(verification_words(&hash));
        }
        let noise = state.into_transport_mode().map_err(noise_error)?;
        Ok(SecureLink {
            link,
            noise,
            verification,
            hash,
            carried,
            their,
            bytes: (0, 0),
        })
    }
}

impl SecureLink {
    /// Runs the whole [`Handshake`] on `link` of the meeting `session` and
    /// returns the secured link (see [`SecureLink::over`]).
    pub async fn handshake(
        link: PeerFrames,
        role: Role,
        secret: &Secret,
        ours: &Introduction,
        words: Option<&str>,
        session: &SessionToken,
    ) -> Result<SecureLink, PeerError> {
        let hs = Handshake::new(role, secret, ours, words, session)?;
        SecureLink::over(link, hs).await
    }

    /// Runs the handshake `hs` to its end on `link` (a relayed link: the
    /// punch runs it on each candidate link itself) and returns the secured
    /// link.
    pub async fn over(mut link: PeerFrames, mut hs: Handshake) -> Result<SecureLink, PeerError> {
        let role = hs.role;
        let exchange = async {
            if role == Role::Leader {
                send_handshake(&mut hs, &mut link).await?;
            }
            if let Some(first_lines) = hs.take_first_lines_box() {
                link.send(first_lines)
                    .await
                    .map_err(|e| PeerError::LinkLost {
                        name: crate::punch::THE_OTHER_SIDE.to_owned(),
                        why: e.to_string(),
                    })?;
            }
            let msg = read_handshake(&mut link, &mut hs).await?;
            hs.read(&msg)?;
            if role == Role::Follower {
                send_handshake(&mut hs, &mut link).await?;
            }
            Ok::<(), PeerError>(())
        };
        timeout(HANDSHAKE_TIMEOUT, exchange).await.map_err(|_| {
            PeerError::Timeout("the other side did not complete the encryption handshake".into())
        })??;
        hs.finish(link)
    }

    /// The handshake's hash (equal on both sides unless someone is in the middle).
    pub fn handshake_hash(&self) -> &[u8] {
        &self.hash
    }

    /// How many of the chat's first lines (from sequence number 1) our first
    /// handshake message on this link carried: they count as sent on it.
    pub fn carried(&self) -> u64 {
        self.carried
    }

    /// What the other side said of itself in the handshake.
    pub fn their_introduction(&self) -> &Introduction {
        &self.their
    }

    /// The chat's verification words, which both users may compare
    /// (`/verify`): equal on both sides unless someone is in the middle.
    /// `None` on links of a chat without words.
    pub fn verification(&self) -> Option<&str> {
        self.verification.as_deref()
    }

    /// The kernel's current RTT estimate for the link, if it is direct.
    pub fn rtt(&self) -> Option<Duration> {
        punchline_net::kernel_rtt(self.link.get_ref().tcp()?)
    }

    /// Sealed bytes sent and received so far.
    pub fn bytes(&self) -> (u64, u64) {
        self.bytes
    }

    /// The link's local and remote addresses, if it is direct.
    pub fn addresses(&self) -> Option<(std::net::SocketAddr, std::net::SocketAddr)> {
        let s = self.link.get_ref().tcp()?;
        Some((s.local_addr().ok()?, s.peer_addr().ok()?))
    }

    /// Seals and sends one message.
    pub async fn send(&mut self, msg: &Chat) -> Result<(), std::io::Error> {
        let plain = encode_payload(msg).map_err(std::io::Error::other)?;
        let mut sealed = vec![0u8; plain.len() + 16];
        let n = self
            .noise
            .write_message(&plain, &mut sealed)
            .map_err(std::io::Error::other)?;
        sealed.truncate(n);
        self.bytes.0 += n as u64;
        self.link
            .send(PeerToPeer::Sealed(sealed))
            .await
            .map_err(std::io::Error::other)
    }

    /// Receives and opens one message; `None` when the other side closed.
    /// Cancel-safe: the only await is the frame read.
    pub async fn recv(&mut self) -> Option<Result<Chat, RecvError>> {
        let frame = match self.link.next().await? {
            Ok(PeerToPeer::Sealed(sealed)) => {
                self.bytes.1 += sealed.len() as u64;
                sealed
            }
            Ok(other) => {
                return Some(Err(RecvError::Sealed(format!(
                    "unexpected {}",
                    describe_frame(&other)
                ))))
            }
            Err(CodecError::Io(e)) => return Some(Err(RecvError::Link(e.to_string()))),
            Err(e) => return Some(Err(RecvError::Sealed(e.to_string()))),
        };
        Some(open(&mut self.noise, &frame).map_err(RecvError::Sealed))
    }

    /// Drops the link with a reset rather than a close: no TIME_WAIT is left on
    /// our fixed port, so a new link to the same address can be punched at once.
    pub fn abort(self) {
        if let Some(tcp) = self.link.get_ref().tcp() {
            let _ = socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO));
        }
    }

    /// Closes the sending direction.
    pub async fn close(&mut self) {
        let _ = self.link.close().await;
        self.link.get_mut().drained(RELAY_DRAIN_TIMEOUT).await;
    }
}

/// Writes our next handshake message and sends it.
async fn send_handshake(hs: &mut Handshake, link: &mut PeerFrames) -> Result<(), PeerError> {
    let msg = hs.write()?;
    link.send(msg).await.map_err(|e| match e {
        // The far end closed before our message went: the same as reading
        // its close (which of the two we see first is a race).
        CodecError::Io(io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ) =>
        {
            hs.closed()
        }
        e => PeerError::LinkLost {
            name: crate::punch::THE_OTHER_SIDE.to_owned(),
            why: e.to_string(),
        },
    })
}

/// Reads the other side's next handshake message from `link` (the leader
/// takes the follower's box of first lines on the way).
async fn read_handshake(link: &mut PeerFrames, hs: &mut Handshake) -> Result<Vec<u8>, PeerError> {
    loop {
        match link.next().await {
            Some(Ok(PeerToPeer::FirstLines(sealed))) if hs.role == Role::Leader => {
                hs.took_first_lines(&sealed);
            }
            read => return handshake_frame(read, hs),
        }
    }
}

/// The handshake message in what was read from a link where one was due, or
/// what its absence means.
pub fn handshake_frame(
    read: Option<Result<PeerToPeer, CodecError>>,
    hs: &Handshake,
) -> Result<Vec<u8>, PeerError> {
    match read {
        Some(Ok(PeerToPeer::Handshake(msg))) => Ok(msg),
        // The other side closes when our first message does not decrypt for it.
        None => Err(hs.closed()),
        Some(Err(CodecError::Io(e))) => Err(PeerError::LinkLost {
            name: crate::punch::THE_OTHER_SIDE.to_owned(),
            why: e.to_string(),
        }),
        // Anything else from an end that has not authenticated yet is an
        // impostor's doing (or a broken peer's): it does not hold the key.
        Some(Ok(other)) => {
            tracing::info!(got = describe_frame(&other), "expected a handshake message");
            Err(hs.refused(KeyRefusal::Handshake))
        }
        Some(Err(e)) => {
            tracing::info!(error = %e, "expected a handshake message");
            Err(hs.refused(KeyRefusal::Handshake))
        }
    }
}

/// A frame's kind, for an error message (never its content).
fn describe_frame(frame: &PeerToPeer) -> &'static str {
    match frame {
        PeerToPeer::LinkHello { .. } => "a link hello",
        PeerToPeer::Handshake(_) => "a handshake message",
        PeerToPeer::Sealed(_) => "a sealed message",
        PeerToPeer::FirstLines(_) => "a box of first lines",
    }
}

/// Opens one sealed frame: decrypts and authenticates it, then decodes the chat
/// message. Never panics, whatever the bytes.
fn open(noise: &mut snow::TransportState, sealed: &[u8]) -> Result<Chat, String> {
    if sealed.len() > MAX_FRAME_SIZE {
        return Err("sealed message too large".into());
    }
    let mut plain = vec![0u8; sealed.len()];
    let n = noise.read_message(sealed, &mut plain).map_err(|_| {
        "failed authentication (altered, injected or replayed on the way)".to_owned()
    })?;
    decode_payload(&plain[..n]).map_err(|e| e.to_string())
}

/// Words from the start of a hash.
fn verification_words(hash: &[u8]) -> String {
    hash.iter()
        .take(VERIFY_WORDS)
        .map(|&b| WORDS[usize::from(b)])
        .collect::<Vec<_>>()
        .join("-")
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn start(code: &Code) -> KeyExchange {
        KeyExchange::start(code).expect("randomness")
    }

    /// Both ends of a finished handshake, in memory.
    fn transport_pair() -> (snow::TransportState, snow::TransportState) {
        let psk = [7u8; 32];
        let params: snow::params::NoiseParams = NOISE_PARAMS.parse().expect("params");
        let build = || {
            snow::Builder::new(params.clone())
                .psk(0, &psk)
                .expect("psk")
        };
        let mut i = build().build_initiator().expect("initiator");
        let mut r = build().build_responder().expect("responder");
        let (mut m, mut p) = (vec![0u8; NOISE_MAX], vec![0u8; NOISE_MAX]);
        let n = i.write_message(&[], &mut m).expect("msg1");
        r.read_message(&m[..n], &mut p).expect("read msg1");
        let n = r.write_message(&[], &mut m).expect("msg2");
        i.read_message(&m[..n], &mut p).expect("read msg2");
        (
            i.into_transport_mode().expect("transport"),
            r.into_transport_mode().expect("transport"),
        )
    }

    fn seal(noise: &mut snow::TransportState, plain: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; plain.len() + 16];
        let n = noise.write_message(plain, &mut out).expect("seal");
        out.truncate(n);
        out
    }

    #[test]
    fn sealed_lines_open_on_the_other_side() {
        let (mut a, mut b) = transport_pair();
        let msg = Chat::Line {
            seq: 1,
            text: "hello".into(),
        };
        let sealed = seal(&mut a, &encode_payload(&msg).expect("encode"));
        assert!(!sealed.windows(5).any(|w| w == b"hello"));
        assert_eq!(open(&mut b, &sealed), Ok(msg));
    }

    #[test]
    fn an_altered_message_is_refused() {
        let (mut a, mut b) = transport_pair();
        let mut sealed = seal(&mut a, &encode_payload(&Chat::Bye).expect("encode"));
        sealed[0] ^= 1;
        assert!(open(&mut b, &sealed).is_err());
    }

    proptest! {
        // Each case runs a real handshake: fewer cases keep the suite quick.
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn opening_random_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
            let (_, mut b) = transport_pair();
            prop_assert!(open(&mut b, &bytes).is_err());
        }

        #[test]
        fn sealed_garbage_and_truncations_never_panic(
            plain in prop::collection::vec(any::<u8>(), 0..512),
            cut in any::<prop::sample::Index>(),
        ) {
            let (mut a, mut b) = transport_pair();
            let sealed = seal(&mut a, &plain);
            // Authentic but arbitrary plaintext: decoding may fail, never panics.
            let _ = open(&mut b, &sealed);
            let (mut a, mut b) = transport_pair();
            let sealed = seal(&mut a, &plain);
            let short = &sealed[..cut.index(sealed.len())];
            prop_assert!(open(&mut b, short).is_err());
        }
    }

    #[test]
    fn same_code_same_key_other_code_other_key() {
        let code = Code::parse("7-guitar-orbit").expect("code");
        let wrong = Code::parse("7-guitar-orchid").expect("code");
        let (a, b, c) = (start(&code), start(&code), start(&wrong));
        let (ma, mb) = (a.message.clone(), b.message.clone());
        let ka = a.finish(&mb).expect("a");
        let kb = b.finish(&ma).expect("b");
        assert_eq!(ka.psk(), kb.psk());
        // The wrong code's side derives another key from the same message.
        let kc = c.finish(&ma).expect("c");
        assert_ne!(ka.psk(), kc.psk());
        assert!(start(&code).finish(&[1, 2, 3]).is_err());
        // The chat's secret differs from the code's key in every use.
        let chat = ka.chat(&[1; 32]);
        assert_ne!(chat.psk(), ka.psk());
        assert_ne!(chat.resume_room(), ka.chat(&[2; 32]).resume_room());
        assert_eq!(chat.resume_room(), kb.chat(&[1; 32]).resume_room());
    }

    #[test]
    fn sealed_candidates_open_only_with_the_key_role_and_session() {
        let code = Code::parse("7-guitar-orbit").expect("code");
        let (a, b) = (start(&code), start(&code));
        let (ma, mb) = (a.message.clone(), b.message.clone());
        let (ka, kb) = (a.finish(&mb).expect("a"), b.finish(&ma).expect("b"));
        let c = SealedCandidates {
            candidates: vec!["192.168.1.9:4000".parse().expect("addr")],
        };
        let sealed = ka
            .seal_candidates(Role::Leader, &[3; 16], &c)
            .expect("seal");
        assert!(!sealed.windows(4).any(|w| w == [192, 168, 1, 9]));
        assert_eq!(kb.open_candidates(Role::Leader, &[3; 16], &sealed), Some(c));
        // Reflected back as if from the other role, or replayed into another
        // meeting, or altered: it does not open.
        assert_eq!(kb.open_candidates(Role::Follower, &[3; 16], &sealed), None);
        assert_eq!(kb.open_candidates(Role::Leader, &[4; 16], &sealed), None);
        let mut altered = sealed.clone();
        altered[30] ^= 1;
        assert_eq!(kb.open_candidates(Role::Leader, &[3; 16], &altered), None);
        // Another code's key does not open it.
        let wrong = Code::parse("7-guitar-orchid").expect("code");
        let kc = start(&wrong).finish(&ma).expect("c");
        assert_eq!(kc.open_candidates(Role::Leader, &[3; 16], &sealed), None);
        assert_eq!(kb.open_candidates(Role::Leader, &[3; 16], &[]), None);
    }

    /// Both ends of a link over an in-memory stream, handshaken with `secrets`
    /// and introduced with the given chat roles.
    async fn linked(
        secrets: (&Secret, &Secret),
        chat_roles: (Role, Role),
    ) -> (Result<SecureLink, PeerError>, Result<SecureLink, PeerError>) {
        linked_with_words(secrets, chat_roles, (None, None)).await
    }

    /// [`linked`], for a later link of a chat whose first link left `words`.
    async fn linked_with_words(
        secrets: (&Secret, &Secret),
        chat_roles: (Role, Role),
        words: (Option<&str>, Option<&str>),
    ) -> (Result<SecureLink, PeerError>, Result<SecureLink, PeerError>) {
        use crate::net::LinkStream;
        use punchline_proto::FrameCodec;
        use tokio_util::codec::Framed;
        let (x, y) = tokio::io::duplex(64 * 1024);
        // A contact's link introduces the identity whose key it holds.
        let intro = |chat_role, secret: &Secret| Introduction {
            name: "n".into(),
            chat_role,
            words_nonce: [0; 32],
            first_lines: Vec::new(),
            identity: match &secret.kind {
                Kind::Contact(statics) => {
                    crate::contacts::Identity::from_secret(statics.ours).public()
                }
                _ => [0; 32],
            },
        };
        let (ia, ib) = (
            intro(chat_roles.0, secrets.0),
            intro(chat_roles.1, secrets.1),
        );
        tokio::join!(
            SecureLink::handshake(
                Framed::new(LinkStream::Relayed(x, None), FrameCodec::new()),
                Role::Leader,
                secrets.0,
                &ia,
                words.0,
                &[3; 16],
            ),
            SecureLink::handshake(
                Framed::new(LinkStream::Relayed(y, None), FrameCodec::new()),
                Role::Follower,
                secrets.1,
                &ib,
                words.1,
                &[3; 16],
            ),
        )
    }

    /// A contact as `owner` keeps it: `them`'s key and the `pairing`.
    fn contact_secret(
        owner: &crate::contacts::Identity,
        them: &crate::contacts::Identity,
        pairing: u8,
    ) -> Secret {
        let contact = crate::contacts::Contact {
            name: "them".into(),
            key: them.public(),
            pairing: [pairing; 32],
            saved: 0,
        };
        Secret::contact(&contact, owner).expect("a valid key")
    }

    #[tokio::test]
    async fn contacts_meet_with_both_identity_keys_and_the_pairing() {
        use crate::contacts::Identity;
        let (alice, bob, carol) = (
            Identity::from_secret([1; 32]),
            Identity::from_secret([2; 32]),
            Identity::from_secret([3; 32]),
        );
        let (ka, kb) = (
            contact_secret(&alice, &bob, 7),
            contact_secret(&bob, &alice, 7),
        );
        assert!(ka.opens_chat() && !ka.is_code_key());
        let (a, b) = linked((&ka, &kb), (Role::Leader, Role::Follower)).await;
        let (a, b) = (a.expect("alice"), b.expect("bob"));
        assert_eq!(a.handshake_hash(), b.handshake_hash());
        assert!(a.verification().is_some());
        assert_eq!(a.verification(), b.verification());
        // Both sides derive the same pairing from the chat they then have.
        let (ca, cb) = (ka.chat(a.handshake_hash()), kb.chat(b.handshake_hash()));
        assert_eq!(ca.pairing(), cb.pairing());
        assert_ne!(ca.pairing(), [7; 32]);

        // Carol holds the pairing (a stolen contacts file) but not Bob's key:
        // refused on both sides, as the contact each expected.
        let kc = contact_secret(&carol, &alice, 7);
        for (x, y) in [(&ka, &kc), (&kc, &ka)] {
            let (a, b) = linked((x, y), (Role::Leader, Role::Follower)).await;
            for side in [a, b] {
                assert!(
                    matches!(side, Err(PeerError::ContactRefused { .. })),
                    "{:?}",
                    side.err()
                );
            }
        }
        // Bob's key, another pairing: refused too.
        let other = contact_secret(&bob, &alice, 8);
        let (a, b) = linked((&ka, &other), (Role::Leader, Role::Follower)).await;
        assert!(matches!(a, Err(PeerError::ContactRefused { .. })));
        assert!(matches!(b, Err(PeerError::ContactRefused { .. })));
        // The candidates' box needs the identity keys as well as the pairing.
        let opens = |sealer: &Secret| {
            let sealed = sealer
                .seal_candidates(
                    Role::Follower,
                    &[5; 16],
                    &SealedCandidates { candidates: vec![] },
                )
                .expect("sealed");
            ka.open_candidates(Role::Follower, &[5; 16], &sealed)
                .is_some()
        };
        assert!(opens(&kb));
        assert!(!opens(&kc), "carol's box opened");
    }

    #[test]
    fn contact_rooms_hide_the_pairing_and_change_every_epoch() {
        let (a, b) = (contact_room(&[7; 32], 100), contact_room(&[7; 32], 101));
        assert_ne!(a, b);
        assert_eq!(a, contact_room(&[7; 32], 100));
        assert_ne!(a, contact_room(&[8; 32], 100));
        assert_ne!(&a[..], &[7u8; 32][..RESUME_ROOM_LEN]);
    }

    #[tokio::test]
    async fn later_links_need_the_chats_secret_and_the_other_chat_role() {
        let chat = Secret::from_key([1; 32]);
        let (a, b) = linked((&chat, &chat), (Role::Leader, Role::Follower)).await;
        let (a, b) = (a.expect("leader"), b.expect("follower"));
        assert_eq!(a.handshake_hash(), b.handshake_hash());
        assert_eq!(a.their_introduction().chat_role, Role::Follower);
        // Another secret: the follower cannot decrypt the leader's message and
        // refuses it as an impostor's; the leader sees the link close, which on
        // a later link counts as a lost link, not as an impostor.
        let other = Secret::from_key([2; 32]);
        let (a, b) = linked((&chat, &other), (Role::Leader, Role::Follower)).await;
        assert!(
            matches!(a, Err(PeerError::LinkLost { .. })),
            "{:?}",
            a.err()
        );
        assert!(
            matches!(b, Err(PeerError::NotAuthenticated(_))),
            "{:?}",
            b.err()
        );
        // Two meetings of one peer paired with each other: same secret, same
        // chat role. The follower sees it in the first message and answers
        // nothing, so the leader sees the link close.
        let (a, b) = linked((&chat, &chat), (Role::Leader, Role::Leader)).await;
        assert!(matches!(b, Err(PeerError::MetItself)), "{:?}", b.err());
        assert!(
            matches!(a, Err(PeerError::LinkLost { .. })),
            "{:?}",
            a.err()
        );
    }

    #[tokio::test]
    async fn first_link_words_agree_and_depend_on_both_nonces() {
        let code = Code::parse("7-guitar-orbit").expect("code");
        let keys = || {
            let (x, y) = (start(&code), start(&code));
            let (mx, my) = (x.message.clone(), y.message.clone());
            (x.finish(&my).expect("x"), y.finish(&mx).expect("y"))
        };
        let (kx, ky) = keys();
        let (a, b) = linked((&kx, &ky), (Role::Leader, Role::Follower)).await;
        let (a, b) = (a.expect("leader"), b.expect("follower"));
        // Both sides know the words when the handshake is done.
        let words = a.verification().expect("the leader's words");
        assert_eq!(Some(words), b.verification());
        assert_eq!(words.split('-').count(), VERIFY_WORDS);
        // Another run (other nonces), other words.
        let (kx2, ky2) = keys();
        let (c, _) = linked((&kx2, &ky2), (Role::Leader, Role::Follower)).await;
        assert_ne!(c.expect("leader").verification(), a.verification());

        // A later link of the chat carries the first link's words.
        let chat = kx.chat(a.handshake_hash());
        let (f, l) = linked_with_words(
            (&chat, &chat),
            (Role::Follower, Role::Leader),
            (Some(words), Some(words)),
        )
        .await;
        assert_eq!(f.expect("follower").verification(), Some(words));
        assert_eq!(l.expect("leader").verification(), Some(words));
        // The commitment binds the nonce.
        assert_ne!(commit(&[1; 32]), commit(&[2; 32]));
    }

    #[tokio::test]
    async fn an_altered_commitment_fails_both_sides_and_a_broken_one_is_refused() {
        let code = Code::parse("7-guitar-orbit").expect("code");
        // The rendezvous hands one side another commitment than the other
        // side made (the SPAKE2 message, after it, is intact): the key is the
        // same, but the prologues differ, so neither side completes the
        // handshake, whichever side got the altered one.
        let altered = |leader_sees_altered: bool| {
            let (x, y) = (start(&code), start(&code));
            let (mut mx, mut my) = (x.message.clone(), y.message.clone());
            if leader_sees_altered {
                my[0] ^= 1;
            } else {
                mx[0] ^= 1;
            }
            (x.finish(&my).expect("x"), y.finish(&mx).expect("y"))
        };
        for leader_sees_altered in [false, true] {
            let (kx, ky) = altered(leader_sees_altered);
            assert_eq!(kx.psk(), ky.psk());
            let (a, b) = linked((&kx, &ky), (Role::Leader, Role::Follower)).await;
            assert!(
                matches!(b, Err(PeerError::BadCode(KeyRefusal::Handshake))),
                "{:?}",
                b.err()
            );
            assert!(
                matches!(a, Err(PeerError::BadCode(KeyRefusal::ClosedInHandshake))),
                "{:?}",
                a.err()
            );
        }
        // A holder of the code's key that reveals another nonce than it
        // committed to (the commitments themselves intact) is refused for it.
        let (x, y) = (start(&code), start(&code));
        let (mx, my) = (x.message.clone(), y.message.clone());
        let (mut kx, ky) = (x.finish(&my).expect("x"), y.finish(&mx).expect("y"));
        if let Kind::Code(pledge) = &mut kx.kind {
            pledge.ours = [9; 32];
        }
        let (_, b) = linked((&kx, &ky), (Role::Leader, Role::Follower)).await;
        assert!(
            matches!(b, Err(PeerError::BadCode(KeyRefusal::Words))),
            "{:?}",
            b.err()
        );
        // A message too short to hold a commitment is refused.
        assert!(start(&code).finish(&[7; 31]).is_err());
    }

    /// Both ends of a link over an in-memory stream, the leader's handshake
    /// made by `leader`, the follower's keyed like it.
    async fn linked_from(
        leader: Handshake,
        follower: Handshake,
    ) -> (Result<SecureLink, PeerError>, Result<SecureLink, PeerError>) {
        use crate::net::LinkStream;
        use punchline_proto::FrameCodec;
        use tokio_util::codec::Framed;
        let (x, y) = tokio::io::duplex(64 * 1024);
        tokio::join!(
            SecureLink::over(
                Framed::new(LinkStream::Relayed(x, None), FrameCodec::new()),
                leader
            ),
            SecureLink::over(
                Framed::new(LinkStream::Relayed(y, None), FrameCodec::new()),
                follower
            ),
        )
    }

    #[tokio::test]
    async fn first_lines_ride_with_the_first_links_handshake_only() {
        let code = Code::parse("7-guitar-orbit").expect("code");
        let (x, y) = (start(&code), start(&code));
        let (mx, my) = (x.message.clone(), y.message.clone());
        let (kx, ky) = (x.finish(&my).expect("x"), y.finish(&mx).expect("y"));
        let typed = FirstLines::default();
        for line in ["one", "two"] {
            typed.typed(Some(line));
        }
        typed.typed(None);
        typed.typed(Some("after a command: not a first line"));
        let keys = |secret: Secret, chat_role, first_lines: FirstLines| LinkKeys {
            secret,
            ours: Introduction {
                name: "n".into(),
                chat_role,
                words_nonce: [0; 32],
                first_lines: Vec::new(),
                identity: [0; 32],
            },
            words: None,
            first_lines,
            shows_first_lines: None,
        };
        let session = [5; 16];
        let (shows, mut shown) = mpsc::channel(8);
        let leader = LinkKeys {
            shows_first_lines: Some(shows),
            ..keys(kx.clone(), Role::Leader, typed.clone())
        };
        let theirs = FirstLines::default();
        theirs.typed(Some("from the follower"));
        let follower = keys(ky.clone(), Role::Follower, theirs.clone());
        let (a, b) = linked_from(
            leader.handshake(Role::Leader, &session).expect("hs"),
            follower.handshake(Role::Follower, &session).expect("hs"),
        )
        .await;
        let (a, b) = (a.expect("leader"), b.expect("follower"));
        // The leader's ride in its first message, the follower's in its box
        // (a preview: they go again after the handshake, not carried).
        assert_eq!(a.carried(), 2);
        assert_eq!(b.carried(), 0);
        assert_eq!(b.their_introduction().first_lines, ["one", "two"]);
        assert!(a.their_introduction().first_lines.is_empty());
        let boxed = shown.try_recv().expect("the follower's box was shown");
        assert_eq!(boxed.first_lines, ["from the follower"]);
        assert_eq!(boxed.name, "n");
        // A box from another meeting, or altered, is not shown.
        let mut elsewhere = follower.handshake(Role::Follower, &[6; 16]).expect("hs");
        let Some(PeerToPeer::FirstLines(sealed)) = elsewhere.take_first_lines_box() else {
            panic!("no box");
        };
        let mut hs = leader.handshake(Role::Leader, &session).expect("hs");
        hs.took_first_lines(&sealed);
        let mut here = follower.handshake(Role::Follower, &session).expect("hs");
        let Some(PeerToPeer::FirstLines(mut sealed)) = here.take_first_lines_box() else {
            panic!("no box");
        };
        sealed[30] ^= 1;
        hs.took_first_lines(&sealed);
        hs.took_first_lines(&sealed[..10]);
        assert!(
            shown.try_recv().is_err(),
            "a box that must not open was shown"
        );

        // A later link carries none, and refuses any.
        let chat = kx.chat(a.handshake_hash());
        let leader = keys(chat.clone(), Role::Leader, typed.clone());
        let follower = keys(chat, Role::Follower, FirstLines::default());
        let (a, b) = linked_from(
            leader.handshake(Role::Leader, &session).expect("hs"),
            follower.handshake(Role::Follower, &session).expect("hs"),
        )
        .await;
        assert_eq!(a.expect("leader").carried(), 0);
        assert!(b
            .expect("follower")
            .their_introduction()
            .first_lines
            .is_empty());
        let mut forced = leader.handshake(Role::Leader, &session).expect("hs");
        forced
            .carry_first_lines(vec!["x".into()])
            .expect("within limits");
        let (_, b) = linked_from(
            forced,
            follower.handshake(Role::Follower, &session).expect("hs"),
        )
        .await;
        assert!(matches!(b, Err(PeerError::Protocol(_))), "{:?}", b.err());

        // The limits: lines past them stay for the session to send.
        let many = FirstLines::default();
        for i in 0..MAX_FIRST_LINES + 3 {
            many.typed(Some(&format!("line {i}")));
        }
        assert_eq!(many.lines().len(), MAX_FIRST_LINES);
        let big = FirstLines::default();
        big.typed(Some(&"x".repeat(MAX_FIRST_LINES_BYTES - 1)));
        big.typed(Some("yy"));
        big.typed(Some("z"));
        assert_eq!(big.lines().len(), 1, "a line past the byte limit ends them");
        let mut hs = leader.handshake(Role::Leader, &session).expect("hs");
        let too_many = vec![String::new(); MAX_FIRST_LINES + 1];
        assert!(hs.carry_first_lines(too_many).is_err());
    }

    #[test]
    fn verification_uses_the_word_list() {
        let v = verification_words(&[0, 1, 2, 255, 9, 10, 11]);
        assert_eq!(
            v,
            format!(
                "{}-{}-{}-{}-{}-{}",
                WORDS[0], WORDS[1], WORDS[2], WORDS[255], WORDS[9], WORDS[10]
            )
        );
    }
}
