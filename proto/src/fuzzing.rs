//! What every decoder in this crate must uphold on arbitrary input, written once
//! and run two ways: by the cargo-fuzz targets in `fuzz/` (coverage-guided, for
//! minutes or hours) and, over the kept seed corpus `fuzz/corpus/`, by the
//! ordinary test suite. Each function takes raw bytes as they would arrive and
//! panics only if a property is broken; a decode error is an expected answer.
//!
//! The properties:
//! - no input panics, hangs or allocates past the frame limit (the fuzzer itself
//!   watches for the last two);
//! - whatever decodes re-encodes to a frame that decodes to the same message (the
//!   decoder accepts nothing the encoder could not have produced differently);
//! - the checks a receiver applies after decoding (hello validation, link check,
//!   line validation, terminal sanitising) hold up on anything that decodes.

use bytes::BytesMut;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_util::codec::{Decoder, Encoder};

use crate::codec::{decode_payload, encode_payload, peek_hello_version};
use crate::codes::Code;
use crate::link_check::verify_link_hello;
use crate::{
    classify_mapping, sanitize_for_terminal, validate_hello, validate_line, Chat, FrameCodec,
    PeerToPeer, PeerToServer, Role, ServerToPeer, MAX_FRAME_SIZE,
};

/// A stream of bytes fed to a frame decoder in the chunk sizes the first byte
/// picks (1 to 256), as TCP may deliver them. Every decoded message is checked
/// with `check` and must survive a round trip.
fn frames<T>(data: &[u8], mut check: impl FnMut(&T)) -> usize
where
    T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug,
{
    let Some((&chunk, data)) = data.split_first() else {
        return 0;
    };
    let chunk = usize::from(chunk) + 1;
    let mut decoder = FrameCodec::<T, T>::new();
    let mut buf = BytesMut::new();
    let mut decoded = 0;
    'feed: for piece in data.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(msg)) => {
                    check(&msg);
                    round_trip(&msg);
                    decoded += 1;
                }
                Ok(None) => break,
                // A stream that went bad is closed by every receiver.
                Err(_) => break 'feed,
            }
            assert!(
                buf.capacity() <= 4 * (MAX_FRAME_SIZE + 4 + chunk),
                "decoder buffered {} bytes",
                buf.capacity()
            );
        }
    }
    decoded
}

/// A decoded message encodes into one frame that decodes back to itself.
fn round_trip<T>(msg: &T)
where
    T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug,
{
    let payload = encode_payload(msg).expect("a decoded message re-encodes");
    let again: T = decode_payload(&payload).expect("a re-encoded message decodes");
    assert_eq!(&again, msg, "round trip changed the message");
    let mut wire = BytesMut::new();
    FrameCodec::<T, T>::new()
        .encode(again, &mut wire)
        .expect("a decoded message fits a frame");
}

/// What the rendezvous accepts from a peer: a stream of [`PeerToServer`] frames.
/// A hello that decodes is validated and its mapping classified, as the server
/// does; the version peek runs on every raw payload.
pub fn rendezvous_input(data: &[u8]) -> usize {
    let _ = peek_hello_version(data);
    frames::<PeerToServer>(data, |msg| {
        if let PeerToServer::Sealed(sealed) = msg {
            if crate::validate_sealed(sealed).is_ok() {
                assert!(sealed.len() <= crate::MAX_SEALED_LEN);
            }
        }
        if let PeerToServer::Hello(hello) = msg {
            if validate_hello(hello).is_ok() {
                assert!(hello.pake.len() <= crate::MAX_PAKE_LEN);
            }
            if let Some(probe) = hello.probe_observed {
                let _ = classify_mapping(probe, Some(probe));
            }
        }
    })
}

/// What a peer accepts from the rendezvous: a stream of [`ServerToPeer`] frames.
/// Everything the peer prints from them is sanitised first.
pub fn peer_from_rendezvous(data: &[u8]) -> usize {
    frames::<ServerToPeer>(data, |msg| {
        if let ServerToPeer::Error { message, .. } = msg {
            printable(message);
        }
    })
}

/// What a peer accepts from the other peer on a punched link before encryption:
/// a stream of [`PeerToPeer`] frames, the first checked as a link hello.
pub fn peer_link(data: &[u8]) -> usize {
    const SESSION: [u8; crate::SESSION_LEN] = [7; crate::SESSION_LEN];
    frames::<PeerToPeer>(data, |msg| {
        let verdict = verify_link_hello(&SESSION, Role::Leader, msg);
        if verdict.is_ok() {
            assert!(matches!(
                msg,
                PeerToPeer::LinkHello { session, role: Role::Follower, .. } if *session == SESSION
            ));
        }
    })
}

/// What a peer accepts inside a sealed frame once it is decrypted: one [`Chat`]
/// payload. The other peer holds the key, so this input is as hostile as any.
pub fn chat_payload(data: &[u8]) -> usize {
    let Ok(msg) = decode_payload::<Chat>(data) else {
        return 0;
    };
    round_trip(&msg);
    if let Chat::Line { text, .. } = &msg {
        printable(text);
        let _ = validate_line(text);
    }
    1
}

/// What a user types as a code: it parses, or it does not; a parsed code prints
/// back to a string that parses to the same code.
pub fn typed_code(data: &[u8]) -> usize {
    let Ok(typed) = std::str::from_utf8(data) else {
        return 0;
    };
    let Ok(code) = Code::parse(typed) else {
        return 0;
    };
    assert_eq!(Code::parse(&code.to_string()), Ok(code.clone()));
    assert!(crate::validate_nameplate(&code.nameplate).is_ok());
    1
}

/// Sanitised text has nothing left for a terminal to act on or to hide behind:
/// no control character, no bidi or other format character, no line or
/// paragraph separator ([`crate::is_hidden_or_control`]).
fn printable(text: &str) {
    let shown = sanitize_for_terminal(text);
    assert!(!shown.chars().any(crate::is_hidden_or_control), "{shown:?}");
    // One character for one: nothing of the rest is cut or merged.
    assert_eq!(shown.chars().count(), text.chars().count(), "{shown:?}");
}

/// A fuzz target's check: raw input in, number of messages it held out.
pub type Target = fn(&[u8]) -> usize;

/// The fuzz targets by name (the names of `fuzz/fuzz_targets/*.rs` and of the
/// corpus folders), for running a corpus through them outside the fuzzer.
/// Each returns how many messages (or codes) the input held.
pub const TARGETS: &[(&str, Target)] = &[
    ("rendezvous_input", rendezvous_input),
    ("peer_from_rendezvous", peer_from_rendezvous),
    ("peer_link", peer_link),
    ("chat_payload", chat_payload),
    ("typed_code", typed_code),
];
