//! Framing: a 4-byte big-endian length, then one bincode-encoded message.
//!
//! [`FrameCodec`] plugs into `tokio_util::codec::Framed`; it holds no socket. The
//! length prefix is checked against [`MAX_FRAME_SIZE`] before any payload is
//! buffered, and bincode decodes with the same limit, so a hostile length or a
//! hostile collection length inside a frame cannot make the reader allocate more.
//! A frame must be consumed exactly: trailing bytes are a decode error.

use std::io;
use std::marker::PhantomData;

use bytes::{Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

use crate::MAX_FRAME_SIZE;

/// The bincode configuration of the protocol: variable-length integers, and a
/// decode limit equal to the frame size.
fn config() -> bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_FRAME_SIZE>,
> {
    bincode::config::standard().with_limit::<MAX_FRAME_SIZE>()
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The underlying connection failed.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    /// The length prefix announces more than [`MAX_FRAME_SIZE`].
    #[error("frame larger than {MAX_FRAME_SIZE} bytes")]
    FrameTooLarge,
    /// The frame's payload is not a valid message.
    #[error("malformed message: {reason}")]
    Decode {
        /// What the decoder found wrong.
        reason: String,
        /// The protocol version, if the payload starts like a hello (see
        /// [`peek_hello_version`]): lets a receiver answer a peer of another version
        /// with a version error rather than a generic one.
        hello_version: Option<u16>,
    },
    /// The message does not fit in a frame.
    #[error("message too large to send: {0} bytes, at most {MAX_FRAME_SIZE}")]
    EncodeTooLarge(usize),
    /// The message could not be encoded.
    #[error("cannot encode message: {0}")]
    Encode(String),
}

/// Encodes one message into a frame payload (no length prefix).
pub fn encode_payload<T: Serialize>(msg: &T) -> Result<Vec<u8>, CodecError> {
    let bytes = bincode::serde::encode_to_vec(msg, config())
        .map_err(|e| CodecError::Encode(e.to_string()))?;
    if bytes.len() > MAX_FRAME_SIZE {
        return Err(CodecError::EncodeTooLarge(bytes.len()));
    }
    Ok(bytes)
}

/// Decodes one frame payload (no length prefix) into a message. Never panics.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, CodecError> {
    if payload.len() > MAX_FRAME_SIZE {
        return Err(CodecError::FrameTooLarge);
    }
    let malformed = |reason: String| CodecError::Decode {
        reason,
        hello_version: peek_hello_version(payload),
    };
    let (msg, used) = bincode::serde::decode_from_slice(payload, config())
        .map_err(|e| malformed(e.to_string()))?;
    if used != payload.len() {
        return Err(malformed(format!(
            "{} trailing bytes after the message",
            payload.len() - used
        )));
    }
    Ok(msg)
}

/// Reads the protocol version from a payload whose message is variant 0 of its
/// enum with a `version: u16` first field (the hellos). Works across versions even
/// when the rest of the message does not decode; `None` if it is not such a frame.
pub fn peek_hello_version(payload: &[u8]) -> Option<u16> {
    let ((variant, version), _): ((u32, u16), usize) =
        bincode::serde::decode_from_slice(payload, config()).ok()?;
    (variant == 0).then_some(version)
}

/// A `tokio_util` codec reading `In` messages and writing `Out` messages.
pub struct FrameCodec<In, Out> {
    frames: LengthDelimitedCodec,
    _types: PhantomData<fn(Out) -> In>,
}

impl<In, Out> FrameCodec<In, Out> {
    /// A codec with the protocol's frame limit.
    pub fn new() -> Self {
        FrameCodec {
            frames: LengthDelimitedCodec::builder()
                .length_field_length(4)
                .max_frame_length(MAX_FRAME_SIZE)
                .new_codec(),
            _types: PhantomData,
        }
    }
}

impl<In, Out> Default for FrameCodec<In, Out> {
    fn default() -> Self {
        Self::new()
    }
}

fn map_frame_error(e: io::Error) -> CodecError {
    if e.get_ref()
        .is_some_and(|inner| inner.is::<tokio_util::codec::LengthDelimitedCodecError>())
    {
        CodecError::FrameTooLarge
    } else {
        CodecError::Io(e)
    }
}

impl<In: DeserializeOwned, Out> Decoder for FrameCodec<In, Out> {
    type Item = In;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, CodecError> {
        match self.frames.decode(src).map_err(map_frame_error)? {
            Some(frame) => decode_payload(&frame).map(Some),
            None => Ok(None),
        }
    }
}

impl<In, Out: Serialize> Encoder<Out> for FrameCodec<In, Out> {
    type Error = CodecError;

    fn encode(&mut self, msg: Out, dst: &mut BytesMut) -> Result<(), CodecError> {
        let payload = encode_payload(&msg)?;
        self.frames
            .encode(Bytes::from(payload), dst)
            .map_err(map_frame_error)
    }
}

/// Shared with the golden-byte tests: the variants an enum's `serde` derive
/// declares, to check the strategies below draw every one of them.
#[cfg(test)]
#[path = "../tests/support/variants.rs"]
mod variants;

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::fmt::Debug;
    use std::net::SocketAddr;

    use proptest::prelude::*;
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    use super::variants::{variant_name, variant_names};
    use super::*;
    use crate::*;

    fn addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port))),
            (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port))),
        ]
    }

    fn mapping() -> impl Strategy<Value = Mapping> {
        prop_oneof![
            Just(Mapping::Unknown),
            Just(Mapping::Independent),
            (any::<u16>(), any::<u16>())
                .prop_map(|(first, second)| Mapping::DependsOnDestination { first, second }),
        ]
    }

    fn role() -> impl Strategy<Value = Role> {
        prop_oneof![Just(Role::Leader), Just(Role::Follower)]
    }

    fn punch_outcome() -> impl Strategy<Value = PunchOutcome> {
        prop_oneof![
            (any::<bool>(), any::<u32>(), any::<u32>()).prop_map(|(public, attempts, ms)| {
                PunchOutcome::Direct {
                    public,
                    attempts,
                    elapsed_ms: ms,
                }
            }),
            any::<u32>().prop_map(|attempts| PunchOutcome::Failed { attempts }),
        ]
    }

    fn dial_back_result() -> impl Strategy<Value = DialBackResult> {
        prop_oneof![
            Just(DialBackResult::Refused),
            Just(DialBackResult::NoAnswer),
            Just(DialBackResult::Connected),
            Just(DialBackResult::Unknown),
        ]
    }

    fn peer_to_server() -> impl Strategy<Value = PeerToServer> {
        prop_oneof![
            (
                any::<u16>(),
                "[0-9]{0,12}",
                prop::option::of(addr()),
                prop::collection::vec(any::<u8>(), 0..40),
                prop::option::of(any::<[u8; RESUME_ROOM_LEN]>()),
                prop::option::of(any::<[u8; crate::PROBE_TOKEN_LEN]>()),
            )
                .prop_map(
                    |(version, nameplate, probe_observed, pake, resume, probe_token)| {
                        PeerToServer::Hello(Hello {
                            version,
                            nameplate,
                            probe_observed,
                            pake,
                            resume,
                            probe_token,
                            other_family_token: None,
                            mapped: probe_observed,
                        })
                    },
                ),
            any::<[u8; crate::PROBE_TOKEN_LEN]>().prop_map(|token| PeerToServer::Probe { token }),
            Just(PeerToServer::Relay),
            prop::collection::vec(any::<u8>(), 0..100).prop_map(PeerToServer::Relayed),
            prop::collection::vec(any::<u8>(), 0..100).prop_map(PeerToServer::Sealed),
            Just(PeerToServer::Allocate),
            Just(PeerToServer::Reflect),
            Just(PeerToServer::DialBack),
            any::<u32>().prop_map(|seq| PeerToServer::Pong { seq }),
            punch_outcome().prop_map(PeerToServer::Report),
        ]
    }

    fn server_to_peer() -> impl Strategy<Value = ServerToPeer> {
        prop_oneof![
            (any::<u16>(), ".{0,100}")
                .prop_map(|(code, message)| ServerToPeer::Error { code, message }),
            (addr(), mapping())
                .prop_map(|(observed, mapping)| ServerToPeer::Welcome { observed, mapping }),
            (addr(), any::<Option<u16>>()).prop_map(|(observed, alternate_port)| {
                ServerToPeer::Observed {
                    observed,
                    alternate_port,
                }
            }),
            "[0-9]{1,9}".prop_map(|nameplate| ServerToPeer::Allocated { nameplate }),
            any::<u32>().prop_map(|seq| ServerToPeer::Ping { seq }),
            (
                addr(),
                role(),
                any::<[u8; SESSION_LEN]>(),
                (
                    mapping(),
                    prop::collection::vec(any::<u8>(), 0..40),
                    any::<u32>(),
                ),
            )
                .prop_map(
                    |(observed, role, session, (mapping, pake, others_go_after_us))| {
                        ServerToPeer::Go(Go {
                            peer: PeerInfo {
                                observed,
                                mapping,
                                pake,
                                other_family: None,
                                mapped: Some(observed),
                            },
                            role,
                            session,
                            others_go_after_us,
                        })
                    },
                ),
            Just(ServerToPeer::Relaying),
            prop::collection::vec(any::<u8>(), 0..100).prop_map(ServerToPeer::Relayed),
            (addr(), dial_back_result(), any::<u32>()).prop_map(|(target, result, elapsed_ms)| {
                ServerToPeer::DialedBack {
                    target,
                    result,
                    elapsed_ms,
                }
            }),
            prop::collection::vec(any::<u8>(), 0..100).prop_map(ServerToPeer::Sealed),
        ]
    }

    fn peer_to_peer() -> impl Strategy<Value = PeerToPeer> {
        prop_oneof![
            (any::<u16>(), any::<[u8; SESSION_LEN]>(), role()).prop_map(
                |(version, session, role)| PeerToPeer::LinkHello {
                    version,
                    session,
                    role
                }
            ),
            prop::collection::vec(any::<u8>(), 0..100).prop_map(PeerToPeer::Handshake),
            prop::collection::vec(any::<u8>(), 0..300).prop_map(PeerToPeer::Sealed),
            prop::collection::vec(any::<u8>(), 0..300).prop_map(PeerToPeer::FirstLines),
        ]
    }

    fn chat() -> impl Strategy<Value = Chat> {
        prop_oneof![
            Just(Chat::Bye),
            (any::<u64>(), ".{0,300}").prop_map(|(seq, text)| Chat::Line { seq, text }),
            "\\PC{0,40}".prop_map(|name| Chat::Nick { name }),
            any::<u64>().prop_map(|upto| Chat::Ack { upto }),
            Just(Chat::Ping),
            any::<u64>().prop_map(|next| Chat::Resume { next }),
            Just(Chat::TryDirect),
            Just(Chat::Saved),
            any::<[u8; 32]>().prop_map(|mac| Chat::Proof { mac }),
        ]
    }

    fn sealed_candidates() -> impl Strategy<Value = SealedCandidates> {
        prop::collection::vec(addr(), 0..=MAX_CANDIDATES)
            .prop_map(|candidates| SealedCandidates { candidates })
    }

    fn introduction() -> impl Strategy<Value = Introduction> {
        (
            "\\PC{0,40}",
            role(),
            any::<[u8; 32]>(),
            prop::collection::vec(".{0,40}", 0..4),
            any::<[u8; 32]>(),
        )
            .prop_map(|(name, chat_role, words_nonce, first_lines, identity)| {
                Introduction {
                    name,
                    chat_role,
                    words_nonce,
                    first_lines,
                    identity,
                }
            })
    }

    /// The names of the variants `strategy` drew in a few thousand tries (from a
    /// fixed seed, so the answer is the same on every run).
    fn variants_drawn<T>(strategy: impl Strategy<Value = T>) -> BTreeSet<&'static str>
    where
        T: Serialize + DeserializeOwned + Debug,
    {
        let mut runner = TestRunner::deterministic();
        (0..2000)
            .map(|_| {
                let tree = strategy.new_tree(&mut runner).expect("a strategy draws");
                variant_name(&tree.current())
            })
            .collect()
    }

    /// Checks that `strategy` draws every variant `T` declares, so a variant
    /// added to a message enum fails here until the strategy makes it too.
    fn assert_draws_every_variant<T>(strategy: impl Strategy<Value = T>)
    where
        T: Serialize + DeserializeOwned + Debug,
    {
        let declared: BTreeSet<&str> = variant_names::<T>().iter().copied().collect();
        let drawn = variants_drawn(strategy);
        let missing: Vec<&&str> = declared.difference(&drawn).collect();
        assert!(
            missing.is_empty(),
            "the strategy for {} never draws {missing:?}",
            std::any::type_name::<T>()
        );
    }

    #[test]
    fn strategies_draw_every_variant() {
        assert_draws_every_variant(peer_to_server());
        assert_draws_every_variant(server_to_peer());
        assert_draws_every_variant(peer_to_peer());
        assert_draws_every_variant(chat());
        // The enums inside messages: the strategies above draw them through these.
        assert_draws_every_variant(addr());
        assert_draws_every_variant(mapping());
        assert_draws_every_variant(role());
        assert_draws_every_variant(punch_outcome());
        assert_draws_every_variant(dial_back_result());
    }

    /// Encodes through the real codec, then decodes the bytes fed in small pieces,
    /// as a socket would deliver them.
    fn round_trip<T>(msg: T) -> T
    where
        T: Serialize + DeserializeOwned + Clone,
    {
        let mut enc = FrameCodec::<T, T>::new();
        let mut wire = BytesMut::new();
        enc.encode(msg, &mut wire).expect("encodes");
        let mut dec = FrameCodec::<T, T>::new();
        let mut buf = BytesMut::new();
        let mut out = None;
        for chunk in wire.chunks(3) {
            assert!(out.is_none(), "decoded before the frame was complete");
            buf.extend_from_slice(chunk);
            out = dec.decode(&mut buf).expect("decodes");
        }
        assert!(buf.is_empty());
        out.expect("one whole frame")
    }

    /// Decoding arbitrary bytes as every message type must never panic, whatever
    /// it returns.
    fn decode_all(bytes: &[u8]) {
        let _ = decode_payload::<PeerToServer>(bytes);
        let _ = decode_payload::<ServerToPeer>(bytes);
        let _ = decode_payload::<PeerToPeer>(bytes);
        let _ = decode_payload::<Chat>(bytes);
        let _ = decode_payload::<SealedCandidates>(bytes);
        let _ = decode_payload::<Introduction>(bytes);
        let _ = peek_hello_version(bytes);
        let mut buf = BytesMut::from(bytes);
        let mut dec = FrameCodec::<PeerToServer, ()>::new();
        while let Ok(Some(_)) = dec.decode(&mut buf) {}
        let mut buf = BytesMut::from(bytes);
        let mut dec = FrameCodec::<PeerToPeer, ()>::new();
        while let Ok(Some(_)) = dec.decode(&mut buf) {}
    }

    proptest! {
        #[test]
        fn peer_to_server_round_trips(msg in peer_to_server()) {
            prop_assert_eq!(round_trip(msg.clone()), msg);
        }

        #[test]
        fn server_to_peer_round_trips(msg in server_to_peer()) {
            prop_assert_eq!(round_trip(msg.clone()), msg);
        }

        #[test]
        fn peer_to_peer_round_trips(msg in peer_to_peer()) {
            prop_assert_eq!(round_trip(msg.clone()), msg);
        }

        #[test]
        fn chat_round_trips(msg in chat()) {
            prop_assert_eq!(round_trip(msg.clone()), msg);
        }

        #[test]
        fn sealed_candidates_round_trip(msg in sealed_candidates()) {
            prop_assert_eq!(round_trip(msg.clone()), msg);
        }

        #[test]
        fn introductions_round_trip(msg in introduction()) {
            prop_assert_eq!(round_trip(msg.clone()), msg);
        }

        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
            decode_all(&bytes);
        }

        #[test]
        fn truncated_frames_never_panic(msg in peer_to_server(), cut in any::<prop::sample::Index>()) {
            let payload = encode_payload(&msg).expect("encodes");
            let short = &payload[..cut.index(payload.len())];
            // A strict prefix of a message is never the same message.
            prop_assert_ne!(decode_payload::<PeerToServer>(short).ok(), Some(msg));
            decode_all(short);
        }

        #[test]
        fn bit_flipped_frames_never_panic(
            msg in prop_oneof![
                server_to_peer().prop_map(|m| encode_payload(&m).expect("encodes")),
                peer_to_peer().prop_map(|m| encode_payload(&m).expect("encodes")),
                peer_to_server().prop_map(|m| encode_payload(&m).expect("encodes")),
                chat().prop_map(|m| encode_payload(&m).expect("encodes")),
                sealed_candidates().prop_map(|m| encode_payload(&m).expect("encodes")),
                introduction().prop_map(|m| encode_payload(&m).expect("encodes")),
            ],
            flips in prop::collection::vec((any::<prop::sample::Index>(), 0u8..8), 1..4),
        ) {
            let mut bytes = msg;
            for (at, bit) in flips {
                let i = at.index(bytes.len());
                bytes[i] ^= 1 << bit;
            }
            decode_all(&bytes);
        }
    }

    #[test]
    fn oversized_length_prefix_is_rejected_before_buffering() {
        let mut dec = FrameCodec::<PeerToServer, ()>::new();
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 0, 0][..]);
        assert!(matches!(
            dec.decode(&mut buf),
            Err(CodecError::FrameTooLarge)
        ));
    }

    #[test]
    fn huge_collection_length_inside_a_frame_is_rejected() {
        // Hello with a code whose announced length is 2^60: must fail, not allocate.
        let mut payload = vec![0u8, 1]; // variant 0, version 1
        payload.push(0xfd); // varint: u64 follows
        payload.extend_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(matches!(
            decode_payload::<PeerToServer>(&payload),
            Err(CodecError::Decode { .. })
        ));
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let mut payload = encode_payload(&PeerToPeer::Handshake(vec![1])).expect("encodes");
        payload.push(0);
        assert!(decode_payload::<PeerToPeer>(&payload).is_err());
    }

    #[test]
    fn version_is_readable_from_a_future_hello() {
        // A hello from a later version whose other fields this version cannot parse.
        let payload = encode_payload(&(0u32, 7u16, [0xffu8; 3])).expect("encodes");
        assert!(matches!(
            decode_payload::<PeerToServer>(&payload),
            Err(CodecError::Decode {
                hello_version: Some(7),
                ..
            })
        ));
        assert_eq!(peek_hello_version(&payload), Some(7));
        let pong = encode_payload(&PeerToServer::Pong { seq: 3 }).expect("encodes");
        assert_eq!(peek_hello_version(&pong), None);
    }

    #[test]
    fn longest_line_fits_in_a_frame_when_sealed() {
        let line = Chat::Line {
            seq: u64::MAX,
            text: "é".repeat(MAX_LINE_BYTES / 2),
        };
        let plain = encode_payload(&line).expect("encodes");
        // A Noise transport message adds a 16-byte tag.
        let sealed = PeerToPeer::Sealed(vec![0xa5; plain.len() + 16]);
        assert_eq!(round_trip(sealed.clone()), sealed);
    }
}
