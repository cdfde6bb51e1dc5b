//! End-to-end encryption and authentication with the code.
//!
//! 1. Key exchange, through the rendezvous: each peer starts SPAKE2 (symmetric
//!    mode) with the whole code as password and sends its message with its hello;
//!    the rendezvous hands it to the other peer with the go ([`KeyExchange`]). Both
//!    derive the same key only if both typed the same code. The rendezvous sees
//!    the messages but cannot test a guess without talking to a peer, so an
//!    attacker gets one online guess per code.
//! 2. Confirmation, over the punched link: a Noise `NNpsk0` handshake (leader
//!    initiates) whose pre-shared key is derived from the SPAKE2 key with HKDF and
//!    a purpose label ([`SecureLink::handshake`]). A wrong code, or a man in the
//!    middle that ran SPAKE2 with each side, makes the keys differ and the
//!    handshake fail on both sides; nothing typed has been sent yet.
//! 3. Every chat message is then a Noise transport message ([`SecureLink`]): a
//!    sealed [`Chat`] inside a [`PeerToPeer::Sealed`] frame. Lines are at most
//!    [`punchline_proto::MAX_LINE_BYTES`], so one line is always one message
//!    (longer lines are refused by the sender, not split).
//! 4. The handshake hash, the same on both sides only without a man in the
//!    middle, gives a short verification string users can compare (`/verify`).

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use punchline_proto::codec::{decode_payload, encode_payload};
use punchline_proto::codes::{Code, WORDS};
use punchline_proto::{Chat, CodecError, PeerToPeer, Role, MAX_FRAME_SIZE};
use spake2::{Ed25519Group, Identity, Password, Spake2};
use tokio::time::timeout;

use crate::error::PeerError;
use crate::punch::Link;

/// The Noise protocol of the link: no static keys (the code authenticates), a
/// pre-shared key mixed in before the first message.
pub const NOISE_PARAMS: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";

/// SPAKE2 identity: binds the exchange to this application and protocol.
const SPAKE2_IDENTITY: &[u8] = b"punchline/1 spake2";

/// HKDF purpose label of the Noise pre-shared key.
const PSK_LABEL: &[u8] = b"punchline/1 noise psk";

/// Time allowed for the Noise handshake over the link (two messages).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest Noise message (the Noise specification's limit).
const NOISE_MAX: usize = 65_535;

/// The words of the verification string.
const VERIFY_WORDS: usize = 4;

/// What the user is told when the handshake fails.
pub const WRONG_CODE: &str = "the other side did not prove it knows the code: either one of you \
typed it wrong, or someone tried to intercept the connection. Nothing you type was sent. Start \
again with a new code.";

/// The first half of SPAKE2, started before the hello.
pub struct KeyExchange {
    state: Spake2<Ed25519Group>,
    /// Our message, to send with the hello.
    pub message: Vec<u8>,
}

impl KeyExchange {
    /// Starts SPAKE2 with `code` as the password.
    pub fn start(code: &Code) -> KeyExchange {
        let (state, message) = Spake2::<Ed25519Group>::start_symmetric(
            &Password::new(code.password().as_bytes()),
            &Identity::new(SPAKE2_IDENTITY),
        );
        KeyExchange { state, message }
    }

    /// Finishes with the other peer's message; returns the Noise pre-shared key.
    pub fn finish(self, theirs: &[u8]) -> Result<[u8; 32], PeerError> {
        let key = self.state.finish(theirs).map_err(|e| {
            PeerError::Protocol(format!(
                "the other side's key-exchange message is invalid: {e:?}"
            ))
        })?;
        let mut psk = [0u8; 32];
        hkdf::Hkdf::<sha2::Sha256>::new(None, &key)
            .expand(PSK_LABEL, &mut psk)
            .map_err(|_| PeerError::Protocol("key derivation failed".into()))?;
        Ok(psk)
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
    link: Link,
    noise: snow::TransportState,
    verification: String,
    /// Sealed bytes sent and received (ciphertext with its tags).
    bytes: (u64, u64),
}

fn noise_error(e: snow::Error) -> PeerError {
    PeerError::Protocol(format!("encryption: {e}"))
}

impl SecureLink {
    /// Runs the Noise handshake on `link`: the leader writes first.
    pub async fn handshake(
        mut link: Link,
        role: Role,
        psk: &[u8; 32],
        their_name: &str,
    ) -> Result<SecureLink, PeerError> {
        let params = NOISE_PARAMS
            .parse()
            .map_err(|e| PeerError::Protocol(format!("noise parameters: {e}")))?;
        let builder = snow::Builder::new(params)
            .psk(0, psk)
            .map_err(noise_error)?;
        let mut state = match role {
            Role::Leader => builder.build_initiator(),
            Role::Follower => builder.build_responder(),
        }
        .map_err(noise_error)?;
        let mut buf = vec![0u8; NOISE_MAX];
        let exchange = async {
            if role == Role::Leader {
                send_handshake(&mut state, &mut buf, &mut link, their_name).await?;
            }
            let msg = read_handshake(&mut link, their_name).await?;
            // A wrong key shows here: the other's message does not decrypt.
            state
                .read_message(&msg, &mut buf)
                .map_err(|_| PeerError::BadCode(WRONG_CODE.into()))?;
            if role == Role::Follower {
                send_handshake(&mut state, &mut buf, &mut link, their_name).await?;
            }
            Ok::<(), PeerError>(())
        };
        timeout(HANDSHAKE_TIMEOUT, exchange).await.map_err(|_| {
            PeerError::Timeout(format!(
                "{their_name} did not complete the encryption handshake"
            ))
        })??;
        let verification = verification_words(state.get_handshake_hash());
        let noise = state.into_transport_mode().map_err(noise_error)?;
        Ok(SecureLink {
            link,
            noise,
            verification,
            bytes: (0, 0),
        })
    }

    /// The short string both users see with `/verify`: equal on both sides
    /// unless someone is in the middle.
    pub fn verification(&self) -> &str {
        &self.verification
    }

    /// The kernel's current RTT estimate for the link, if it is direct.
    pub fn rtt(&self) -> Option<Duration> {
        punchline_rendezvous::rtt::kernel_rtt(self.link.get_ref().tcp()?)
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
                    "unexpected message {other:?}"
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
async fn send_handshake(
    state: &mut snow::HandshakeState,
    buf: &mut [u8],
    link: &mut Link,
    their_name: &str,
) -> Result<(), PeerError> {
    let n = state.write_message(&[], buf).map_err(noise_error)?;
    let msg = PeerToPeer::Handshake(buf[..n].to_vec());
    link.send(msg).await.map_err(|e| PeerError::LinkLost {
        name: their_name.to_owned(),
        why: e.to_string(),
    })
}

async fn read_handshake(link: &mut Link, their_name: &str) -> Result<Vec<u8>, PeerError> {
    match link.next().await {
        Some(Ok(PeerToPeer::Handshake(msg))) => Ok(msg),
        // The other side closes when our first message does not decrypt for it.
        None => Err(PeerError::BadCode(WRONG_CODE.into())),
        Some(Ok(other)) => Err(PeerError::Protocol(format!(
            "expected the encryption handshake from {their_name}, got {other:?}"
        ))),
        Some(Err(e)) => Err(PeerError::LinkLost {
            name: their_name.to_owned(),
            why: e.to_string(),
        }),
    }
}

/// Opens one sealed frame: decrypts and authenticates it, then decodes the chat
/// message. Never panics, whatever the bytes.
fn open(noise: &mut snow::TransportState, sealed: &[u8]) -> Result<Chat, String> {
    if sealed.len() > MAX_FRAME_SIZE {
        return Err("sealed message too large".into());
    }
    let mut plain = vec![0u8; sealed.len()];
    let n = noise
        .read_message(sealed, &mut plain)
        .map_err(|_| "a message failed authentication (altered on the way?)".to_owned())?;
    decode_payload(&plain[..n]).map_err(|e| e.to_string())
}

/// Words from the start of the handshake hash.
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
        let (a, b, c) = (
            KeyExchange::start(&code),
            KeyExchange::start(&code),
            KeyExchange::start(&wrong),
        );
        let (ma, mb) = (a.message.clone(), b.message.clone());
        let ka = a.finish(&mb).expect("a");
        let kb = b.finish(&ma).expect("b");
        assert_eq!(ka, kb);
        // The wrong code's side derives another key from the same message.
        let kc = c.finish(&ma).expect("c");
        assert_ne!(ka, kc);
        assert!(KeyExchange::start(&code).finish(&[1, 2, 3]).is_err());
    }

    #[test]
    fn verification_uses_the_word_list() {
        let v = verification_words(&[0, 1, 2, 255, 9]);
        assert_eq!(
            v,
            format!("{}-{}-{}-{}", WORDS[0], WORDS[1], WORDS[2], WORDS[255])
        );
    }
}
