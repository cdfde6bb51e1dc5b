//! Golden bytes: the wire format, pinned byte for byte.
//!
//! For every variant of the frame enums ([`PeerToServer`], [`ServerToPeer`],
//! [`PeerToPeer`]) one example message and its whole frame as [`FrameCodec`]
//! writes it; for [`Chat`] (the plaintext of a sealed [`PeerToPeer::Sealed`]) and
//! the structs that travel inside a sealed box or a handshake message
//! ([`SealedCandidates`], [`Introduction`]), the payload as
//! [`codec::encode_payload`] writes it; and every variant of the enums nested in
//! messages ([`Mapping`], [`Role`], [`PunchOutcome`], [`DialBackResult`]). Each case
//! is checked both ways: the message encodes to exactly these bytes, and these
//! bytes decode to exactly the message.
//!
//! **The rule: a failing test here means the wire format changed.** Reordering
//! variants or fields, changing a field's type, adding a field: programs built
//! before and after no longer understand each other, and nothing else would say
//! so. If the change is deliberate, bump [`PROTOCOL_VERSION`] (`proto/src/lib.rs`,
//! pinned by [`protocol_version_is_pinned`]) and update the bytes here by hand,
//! checking them against the layout below. Variant 0 of each frame enum (the
//! hellos, the error) must keep its layout across versions: see
//! [`the_hello_version_stays_readable`].
//!
//! The layout (bincode 2, `config::standard()`, through `serde`):
//! - frame: a 4-byte big-endian payload length, then the payload;
//! - integers (`u16`, `u32`, `u64`) as varints: a value up to 250 is one byte; a
//!   larger one is a marker byte (`fb` = u16, `fc` = u32, `fd` = u64 follows)
//!   then the value little-endian in the smallest of those widths that holds it;
//!   a `u8` is always one raw byte, a `bool` one byte `00` or `01`;
//! - enum: the variant index (declaration order, from 0) as a varint, then the
//!   variant's fields in declaration order; a struct is its fields in order,
//!   with no header;
//! - `String` and `Vec<u8>`: the length as a varint, then the bytes (UTF-8 for a
//!   string);
//! - fixed arrays (`[u8; N]`: session token, resume room, nonce): the N bytes,
//!   no length;
//! - `Option`: `00` for none, `01` then the value;
//! - `SocketAddr`: an enum, `00` = V4 then the 4 address bytes, `01` = V6 then
//!   the 16 address bytes; then the port as a varint. An IPv6 address' flow
//!   label and scope id are not sent ([`ipv6_scope_and_flow_label_are_not_sent`]).
//!
//! Below, hex strings group the bytes of one field between `|`; the comment
//! above each case names the groups in the same order.
//!
//! Exhaustive by construction: each enum has a table of its wire variant
//! indices written as a `match` with no wildcard arm (a new variant does not
//! compile until it has an index here), and each test checks that its examples
//! are exactly one per variant, in order, against the variant list of the
//! enum's own `serde` derive (a variant without a golden case fails the test).

#[path = "support/variants.rs"]
mod variants;

use std::fmt::Debug;
use std::net::SocketAddr;

use bytes::BytesMut;
use punchline_proto::codec::{self, decode_payload, encode_payload, peek_hello_version};
use punchline_proto::{
    Chat, DialBackResult, ErrorCode, FrameCodec, Go, Hello, Introduction, Mapping, PeerInfo,
    PeerToPeer, PeerToServer, PunchOutcome, Role, SealedCandidates, ServerToPeer, PROTOCOL_VERSION,
    RESUME_ROOM_LEN, SESSION_LEN,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_util::codec::{Decoder, Encoder};
use variants::{variant_name, variant_names};

/// One message and its exact encoding (hex, whitespace and `|` ignored).
struct Golden<T> {
    msg: T,
    hex: &'static str,
}

fn golden<T>(msg: T, hex: &'static str) -> Golden<T> {
    Golden { msg, hex }
}

fn from_hex(hex: &str) -> Vec<u8> {
    let digits: Vec<u8> = hex
        .bytes()
        .filter(|b| !b.is_ascii_whitespace() && *b != b'|')
        .collect();
    assert!(digits.len() % 2 == 0, "odd number of hex digits in {hex:?}");
    digits
        .chunks(2)
        .map(|pair| {
            let pair = std::str::from_utf8(pair).expect("ASCII");
            u8::from_str_radix(pair, 16).unwrap_or_else(|_| panic!("bad hex {pair:?} in {hex:?}"))
        })
        .collect()
}

fn to_hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("a valid address")
}

/// The session token of the examples: 10 11 … 1f.
fn session() -> [u8; SESSION_LEN] {
    std::array::from_fn(|i| 0x10 + i as u8)
}

/// The resume room of the examples: 80 81 … 8f.
fn room() -> [u8; RESUME_ROOM_LEN] {
    std::array::from_fn(|i| 0x80 + i as u8)
}

/// A probe token: bytes a0 to af.
fn token() -> [u8; 16] {
    std::array::from_fn(|i| 0xa0 + i as u8)
}

/// The nonce of the examples: 00 01 … 1f.
fn nonce() -> [u8; 32] {
    std::array::from_fn(|i| i as u8)
}

/// Checks one frame both ways through [`FrameCodec`]: the message encodes to
/// the golden bytes, and the golden bytes decode to the message, whole.
fn check_frame<T>(case: &Golden<T>)
where
    T: Serialize + DeserializeOwned + Clone + PartialEq + Debug,
{
    let want = from_hex(case.hex);
    let mut wire = BytesMut::new();
    FrameCodec::<T, T>::new()
        .encode(case.msg.clone(), &mut wire)
        .expect("encodes");
    assert_eq!(
        to_hex(&wire),
        to_hex(&want),
        "the frame of {:?} changed: the wire format changed (see the module docs)",
        case.msg
    );
    let mut buf = BytesMut::from(&want[..]);
    let back = FrameCodec::<T, T>::new()
        .decode(&mut buf)
        .expect("the golden frame decodes")
        .expect("the golden frame is whole");
    assert!(buf.is_empty(), "bytes left after {:?}", case.msg);
    assert_eq!(
        back, case.msg,
        "the golden frame decodes to another message"
    );
}

/// Checks one payload both ways through [`encode_payload`] and
/// [`decode_payload`].
fn check_payload<T>(case: &Golden<T>)
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let want = from_hex(case.hex);
    let bytes = encode_payload(&case.msg).expect("encodes");
    assert_eq!(
        to_hex(&bytes),
        to_hex(&want),
        "the encoding of {:?} changed: the wire format changed (see the module docs)",
        case.msg
    );
    let back: T = decode_payload(&want).expect("the golden payload decodes");
    assert_eq!(
        back, case.msg,
        "the golden payload decodes to another message"
    );
}

/// Checks that `cases` hold exactly one example per variant of `T`, in
/// declaration order (as the enum's `serde` derive lists them), and that each
/// example's encoding starts with the variant index the pinned table `index`
/// gives it.
fn check_one_case_per_variant<T>(cases: &[Golden<T>], index: fn(&T) -> u32)
where
    T: Serialize + DeserializeOwned + Debug,
{
    let declared = variant_names::<T>();
    let covered: Vec<&str> = cases.iter().map(|c| variant_name(&c.msg)).collect();
    assert_eq!(
        covered,
        declared,
        "{}: one golden case per variant, in declaration order",
        std::any::type_name::<T>()
    );
    for (i, case) in cases.iter().enumerate() {
        let i = u32::try_from(i).expect("few variants");
        assert_eq!(index(&case.msg), i, "pinned index of {:?}", case.msg);
    }
}

// ---------------------------------------------------------------- PeerToServer

/// The wire index of each [`PeerToServer`] variant.
fn peer_to_server_index(msg: &PeerToServer) -> u32 {
    match msg {
        PeerToServer::Hello(_) => 0,
        PeerToServer::Pong { .. } => 1,
        PeerToServer::Report(_) => 2,
        PeerToServer::Allocate => 3,
        PeerToServer::Reflect => 4,
        PeerToServer::DialBack => 5,
        PeerToServer::Relay => 6,
        PeerToServer::Relayed(_) => 7,
        PeerToServer::Sealed(_) => 8,
        PeerToServer::Probe { .. } => 9,
    }
}

fn peer_to_server_cases() -> Vec<Golden<PeerToServer>> {
    vec![
        // length 67 | 00 = Hello | 0c = version 12 | nameplate "17": length 2,
        // "1" "7" | probe_observed: 00 = none | pake: length 0 (resuming) |
        // resume: 01 = some, then the 16 bytes of the room (no length) |
        // probe_token: 01 = some, then its 16 bytes | other_family_token: 01 =
        // some, then its 16 bytes | mapped: 01 = some, 00 = V4, 198.51.100.9,
        // port 40000 = 0x9c40: fb + LE
        golden(
            PeerToServer::Hello(Hello {
                version: PROTOCOL_VERSION,
                nameplate: "17".into(),
                probe_observed: None,
                pake: vec![],
                resume: Some(room()),
                probe_token: Some(token()),
                other_family_token: Some([0xc0; 16]),
                mapped: Some(addr("198.51.100.9:40000")),
            }),
            "00000043 | 00 | 0c | 02 3137 | 00 | 00 | 01 808182838485868788898a8b8c8d8e8f | 01 a0a1a2a3a4a5a6a7a8a9aaabacadaeaf | 01 c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0 | 01 00 c6336409 fb409c",
        ),
        // length 4 | 01 = Pong | seq 300 = 0x012c > 250: fb = u16 follows, LE
        golden(PeerToServer::Pong { seq: 300 }, "00000004 | 01 | fb 2c01"),
        // length 9 | 02 = Report | 00 = PunchOutcome::Direct | public: 01 = true |
        // attempts 3 | elapsed_ms 70000 = 0x11170 > u16: fc = u32 follows, LE
        golden(
            PeerToServer::Report(PunchOutcome::Direct {
                public: true,
                attempts: 3,
                elapsed_ms: 70_000,
            }),
            "00000009 | 02 | 00 | 01 | 03 | fc 70110100",
        ),
        // length 1 | 03 = Allocate
        golden(PeerToServer::Allocate, "00000001 | 03"),
        // length 1 | 04 = Reflect
        golden(PeerToServer::Reflect, "00000001 | 04"),
        // length 1 | 05 = DialBack
        golden(PeerToServer::DialBack, "00000001 | 05"),
        // length 1 | 06 = Relay
        golden(PeerToServer::Relay, "00000001 | 06"),
        // length 5 | 07 = Relayed | length 3, the bytes
        golden(
            PeerToServer::Relayed(vec![1, 2, 3]),
            "00000005 | 07 | 03 010203",
        ),
        // length 4 | 08 = Sealed | length 2, the bytes
        golden(
            PeerToServer::Sealed(vec![0xde, 0xad]),
            "00000004 | 08 | 02 dead",
        ),
        // length 17 | 09 = Probe | token: the 16 bytes (no length)
        golden(
            PeerToServer::Probe { token: token() },
            "00000011 | 09 | a0a1a2a3a4a5a6a7a8a9aaabacadaeaf",
        ),
    ]
}

#[test]
fn peer_to_server_frames_are_pinned() {
    let cases = peer_to_server_cases();
    check_one_case_per_variant(&cases, peer_to_server_index);
    cases.iter().for_each(check_frame);
}

// ---------------------------------------------------------------- ServerToPeer

/// The wire index of each [`ServerToPeer`] variant.
fn server_to_peer_index(msg: &ServerToPeer) -> u32 {
    match msg {
        ServerToPeer::Error { .. } => 0,
        ServerToPeer::Welcome { .. } => 1,
        ServerToPeer::Ping { .. } => 2,
        ServerToPeer::Go(_) => 3,
        ServerToPeer::Allocated { .. } => 4,
        ServerToPeer::Observed { .. } => 5,
        ServerToPeer::Relaying => 6,
        ServerToPeer::Relayed(_) => 7,
        ServerToPeer::DialedBack { .. } => 8,
        ServerToPeer::Sealed(_) => 9,
    }
}

fn server_to_peer_cases() -> Vec<Golden<ServerToPeer>> {
    vec![
        // length 11 | 00 = Error | code 7 (RelayUnavailable) | message: length 8,
        // "no relay"
        golden(
            ServerToPeer::error(ErrorCode::RelayUnavailable, "no relay"),
            "0000000b | 00 | 07 | 08 6e6f2072656c6179",
        ),
        // length 16 | 01 = Welcome | observed: 00 = V4, 203.0.113.5, port 51000 =
        // 0xc738: fb + LE | mapping: 02 = DependsOnDestination, first 51000,
        // second 51002 = 0xc73a
        golden(
            ServerToPeer::Welcome {
                observed: addr("203.0.113.5:51000"),
                mapping: Mapping::DependsOnDestination {
                    first: 51000,
                    second: 51002,
                },
            },
            "00000010 | 01 | 00 cb007105 fb38c7 | 02 fb38c7 fb3ac7",
        ),
        // length 2 | 02 = Ping | seq 5
        golden(ServerToPeer::Ping { seq: 5 }, "00000002 | 02 | 05"),
        // length 64 | 03 = Go | peer.observed: 00 = V4, 198.51.100.7, port 40000
        // = 0x9c40 | peer.mapping: 01 = Independent | peer.pake: length 3, the
        // bytes | peer.other_family: 01 = Some, 01 = V6, the 16 bytes, port
        // 40001 | peer.mapped: 01 = Some, 00 = V4, 198.51.100.7, port 40002 |
        // role: 01 = Follower | session: the 16 bytes (no length) |
        // others_go_after_us: 35000 = 0x88b8, fb = u16 follows, LE
        golden(
            ServerToPeer::Go(Go {
                peer: PeerInfo {
                    observed: addr("198.51.100.7:40000"),
                    mapping: Mapping::Independent,
                    pake: vec![0xaa, 0xbb, 0xcc],
                    other_family: Some(addr("[2001:db8::7]:40001")),
                    mapped: Some(addr("198.51.100.7:40002")),
                },
                role: Role::Follower,
                session: session(),
                others_go_after_us: 35_000,
            }),
            "00000040 | 03 | 00 c6336407 fb409c | 01 | 03 aabbcc \
             | 01 01 20010db8000000000000000000000007 fb419c | 01 00 c6336407 fb429c | 01 \
             | 101112131415161718191a1b1c1d1e1f | fb b888",
        ),
        // length 6 | 04 = Allocated | nameplate: length 4, "4821"
        golden(
            ServerToPeer::Allocated {
                nameplate: "4821".into(),
            },
            "00000006 | 04 | 04 34383231",
        ),
        // length 25 | 05 = Observed | 01 = V6, 2001:db8::1, port 443 = 0x01bb |
        // alternate_port: 01 = some, 7427 = 0x1d03
        golden(
            ServerToPeer::Observed {
                observed: addr("[2001:db8::1]:443"),
                alternate_port: Some(7427),
            },
            "00000019 | 05 | 01 20010db8000000000000000000000001 fbbb01 | 01 fb031d",
        ),
        // length 1 | 06 = Relaying
        golden(ServerToPeer::Relaying, "00000001 | 06"),
        // length 3 | 07 = Relayed | length 1, the byte
        golden(ServerToPeer::Relayed(vec![0x42]), "00000003 | 07 | 01 42"),
        // length 13 | 08 = DialedBack | target: 00 = V4, 198.51.100.7, port
        // 40000 | result: 01 = NoAnswer | elapsed_ms 2500 = 0x09c4
        golden(
            ServerToPeer::DialedBack {
                target: addr("198.51.100.7:40000"),
                result: DialBackResult::NoAnswer,
                elapsed_ms: 2500,
            },
            "0000000d | 08 | 00 c6336407 fb409c | 01 | fbc409",
        ),
        // length 4 | 09 = Sealed | length 2, the bytes
        golden(
            ServerToPeer::Sealed(vec![0xca, 0xfe]),
            "00000004 | 09 | 02 cafe",
        ),
    ]
}

#[test]
fn server_to_peer_frames_are_pinned() {
    let cases = server_to_peer_cases();
    check_one_case_per_variant(&cases, server_to_peer_index);
    cases.iter().for_each(check_frame);
}

// ------------------------------------------------------------------ PeerToPeer

/// The wire index of each [`PeerToPeer`] variant.
fn peer_to_peer_index(msg: &PeerToPeer) -> u32 {
    match msg {
        PeerToPeer::LinkHello { .. } => 0,
        PeerToPeer::Handshake(_) => 1,
        PeerToPeer::Sealed(_) => 2,
        PeerToPeer::FirstLines(_) => 3,
    }
}

fn peer_to_peer_cases() -> Vec<Golden<PeerToPeer>> {
    vec![
        // length 19 | 00 = LinkHello | 0c = version 12 | session: the 16 bytes (no
        // length) | role: 00 = Leader
        golden(
            PeerToPeer::LinkHello {
                version: PROTOCOL_VERSION,
                session: session(),
                role: Role::Leader,
            },
            "00000013 | 00 | 0c | 101112131415161718191a1b1c1d1e1f | 00",
        ),
        // length 4 | 01 = Handshake | length 2, the bytes
        golden(PeerToPeer::Handshake(vec![1, 2]), "00000004 | 01 | 02 0102"),
        // length 3 | 02 = Sealed | length 1, the byte
        golden(PeerToPeer::Sealed(vec![0xff]), "00000003 | 02 | 01 ff"),
        // length 3 | 03 = FirstLines | length 1, the byte
        golden(PeerToPeer::FirstLines(vec![0xfe]), "00000003 | 03 | 01 fe"),
    ]
}

#[test]
fn peer_to_peer_frames_are_pinned() {
    let cases = peer_to_peer_cases();
    check_one_case_per_variant(&cases, peer_to_peer_index);
    cases.iter().for_each(check_frame);
}

// ------------------------------------------------------------------------ Chat

/// The wire index of each [`Chat`] variant.
fn chat_index(msg: &Chat) -> u32 {
    match msg {
        Chat::Line { .. } => 0,
        Chat::Bye => 1,
        Chat::Nick { .. } => 2,
        Chat::Ack { .. } => 3,
        Chat::Ping => 4,
        Chat::Resume { .. } => 5,
        Chat::TryDirect => 6,
        Chat::Saved => 7,
        Chat::Proof { .. } => 8,
    }
}

/// Payloads, not frames: a [`Chat`] is the plaintext of a Noise transport
/// message, which travels framed as a [`PeerToPeer::Sealed`].
fn chat_cases() -> Vec<Golden<Chat>> {
    vec![
        // 00 = Line | seq 1 | text: length 6 (bytes, not characters), "héllo"
        // (é = c3 a9)
        golden(
            Chat::Line {
                seq: 1,
                text: "héllo".into(),
            },
            "00 | 01 | 06 68c3a96c6c6f",
        ),
        // 01 = Bye
        golden(Chat::Bye, "01"),
        // 02 = Nick | name: length 3, "bob"
        golden(Chat::Nick { name: "bob".into() }, "02 | 03 626f62"),
        // 03 = Ack | upto 2^32 > u32: fd = u64 follows, LE
        golden(Chat::Ack { upto: 1 << 32 }, "03 | fd 0000000001000000"),
        // 04 = Ping
        golden(Chat::Ping, "04"),
        // 05 = Resume | next 251, the smallest value past one byte: fb = u16
        // follows, LE
        golden(Chat::Resume { next: 251 }, "05 | fb fb00"),
        // 06 = TryDirect
        golden(Chat::TryDirect, "06"),
        // 07 = Saved
        golden(Chat::Saved, "07"),
        // 08 = Proof | mac: the 32 bytes (no length)
        golden(
            Chat::Proof { mac: [0xab; 32] },
            "08 | abababababababababababababababababababababababababababababababab",
        ),
    ]
}

#[test]
fn chat_payloads_are_pinned() {
    let cases = chat_cases();
    check_one_case_per_variant(&cases, chat_index);
    cases.iter().for_each(check_payload);
}

// ------------------------------------------------------------- payload structs

#[test]
fn sealed_candidates_payload_is_pinned() {
    // candidates: length 2 | 00 = V4, 192.168.1.20, port 40000 = 0x9c40 |
    // 01 = V6, 2001:db8::20, port 40000
    check_payload(&golden(
        SealedCandidates {
            candidates: vec![addr("192.168.1.20:40000"), addr("[2001:db8::20]:40000")],
        },
        "02 | 00 c0a80114 fb409c | 01 20010db8000000000000000000000020 fb409c",
    ));
}

#[test]
fn introduction_payload_is_pinned() {
    // name: length 5, "alice" | chat_role: 00 = Leader | words_nonce: the 32
    // bytes (no length) | first_lines: 2 lines, "hi" (length 2) and "" (length 0)
    // | identity: the 32 bytes (no length)
    check_payload(&golden(
        Introduction {
            name: "alice".into(),
            chat_role: Role::Leader,
            words_nonce: nonce(),
            first_lines: vec!["hi".into(), String::new()],
            identity: [0xee; 32],
        },
        "05 616c696365 | 00 | 000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f | 02 02 6869 00 \
         | eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee",
    ));
}

// ------------------------------------------------------- enums inside messages

/// The wire index of each [`Mapping`] variant.
fn mapping_index(m: &Mapping) -> u32 {
    match m {
        Mapping::Unknown => 0,
        Mapping::Independent => 1,
        Mapping::DependsOnDestination { .. } => 2,
    }
}

#[test]
fn mapping_encodings_are_pinned() {
    let cases = vec![
        // 00 = Unknown
        golden(Mapping::Unknown, "00"),
        // 01 = Independent
        golden(Mapping::Independent, "01"),
        // 02 = DependsOnDestination | first 40000 = 0x9c40 | second 7
        golden(
            Mapping::DependsOnDestination {
                first: 40000,
                second: 7,
            },
            "02 | fb409c | 07",
        ),
    ];
    check_one_case_per_variant(&cases, mapping_index);
    cases.iter().for_each(check_payload);
}

/// The wire index of each [`Role`] variant.
fn role_index(r: &Role) -> u32 {
    match r {
        Role::Leader => 0,
        Role::Follower => 1,
    }
}

#[test]
fn role_encodings_are_pinned() {
    let cases = vec![golden(Role::Leader, "00"), golden(Role::Follower, "01")];
    check_one_case_per_variant(&cases, role_index);
    cases.iter().for_each(check_payload);
}

/// The wire index of each [`PunchOutcome`] variant.
fn punch_outcome_index(o: &PunchOutcome) -> u32 {
    match o {
        PunchOutcome::Direct { .. } => 0,
        PunchOutcome::Failed { .. } => 1,
    }
}

#[test]
fn punch_outcome_encodings_are_pinned() {
    let cases = vec![
        // 00 = Direct | public: 00 = false | attempts 1 | elapsed_ms 250, the
        // largest one-byte value
        golden(
            PunchOutcome::Direct {
                public: false,
                attempts: 1,
                elapsed_ms: 250,
            },
            "00 | 00 | 01 | fa",
        ),
        // 01 = Failed | attempts 12
        golden(PunchOutcome::Failed { attempts: 12 }, "01 | 0c"),
    ];
    check_one_case_per_variant(&cases, punch_outcome_index);
    cases.iter().for_each(check_payload);
}

/// The wire index of each [`DialBackResult`] variant.
fn dial_back_result_index(r: &DialBackResult) -> u32 {
    match r {
        DialBackResult::Refused => 0,
        DialBackResult::NoAnswer => 1,
        DialBackResult::Connected => 2,
        DialBackResult::Unknown => 3,
    }
}

#[test]
fn dial_back_result_encodings_are_pinned() {
    let cases = vec![
        golden(DialBackResult::Refused, "00"),
        golden(DialBackResult::NoAnswer, "01"),
        golden(DialBackResult::Connected, "02"),
        golden(DialBackResult::Unknown, "03"),
    ];
    check_one_case_per_variant(&cases, dial_back_result_index);
    cases.iter().for_each(check_payload);
}

// ------------------------------------------------------ numbers and the hellos

/// Both sides refuse a peer of another version, so changing this is a
/// deliberate act: the golden hellos above change with it.
#[test]
fn protocol_version_is_pinned() {
    assert_eq!(PROTOCOL_VERSION, 12);
}

/// [`ServerToPeer::Error`] carries its code as a number
/// ([`ErrorCode::to_u16`]): the numbers are wire format too. The `match` has no
/// wildcard, so a new code does not compile until it has its number here.
#[test]
fn error_code_numbers_are_pinned() {
    for n in 0..=u16::MAX {
        let code = ErrorCode::from_u16(n);
        assert_eq!(code.to_u16(), n, "{code:?}");
        let pinned = match code {
            ErrorCode::VersionMismatch => Some(1),
            ErrorCode::CodeInUse => Some(2),
            ErrorCode::Expired => Some(3),
            ErrorCode::Malformed => Some(4),
            ErrorCode::Busy => Some(5),
            ErrorCode::ShuttingDown => Some(6),
            ErrorCode::RelayUnavailable => Some(7),
            ErrorCode::Other(m) => {
                assert_eq!(m, n);
                None
            }
        };
        match pinned {
            Some(p) => assert_eq!(n, p, "{code:?}"),
            // Every pinned number is known: none of them reads as Other.
            None => assert!(!(1..=7).contains(&n), "{n} read as {code:?}"),
        }
    }
}

/// The payload of a golden frame (without its length prefix).
fn payload_of(hex: &str) -> Vec<u8> {
    from_hex(hex)[4..].to_vec()
}

/// A program must read another version's hello version, even when nothing
/// else of the hello decodes: variant index `00` first, then the version as a
/// varint ([`peek_hello_version`]); everything after is free to change.
#[test]
fn the_hello_version_stays_readable() {
    // The hellos of this version.
    assert_eq!(
        peek_hello_version(&payload_of(peer_to_server_cases()[0].hex)),
        Some(PROTOCOL_VERSION)
    );
    assert_eq!(
        peek_hello_version(&payload_of(peer_to_peer_cases()[0].hex)),
        Some(PROTOCOL_VERSION)
    );
    // No other message reads as a hello.
    for case in &peer_to_server_cases()[1..] {
        assert_eq!(
            peek_hello_version(&payload_of(case.hex)),
            None,
            "{:?}",
            case.msg
        );
    }
    for case in &peer_to_peer_cases()[1..] {
        assert_eq!(
            peek_hello_version(&payload_of(case.hex)),
            None,
            "{:?}",
            case.msg
        );
    }
    // A later version's hello whose fields this version does not know:
    // 00 = hello | version 300 (fb 2c01) | then anything.
    let future = from_hex("00 | fb 2c01 | ffffffff");
    assert_eq!(peek_hello_version(&future), Some(300));
    let err = decode_payload::<PeerToServer>(&future).expect_err("not a hello of this version");
    assert!(
        matches!(
            err,
            codec::CodecError::Decode {
                hello_version: Some(300),
                ..
            }
        ),
        "{err:?}"
    );
    // Too short to hold a version: nothing to read.
    assert_eq!(peek_hello_version(&from_hex("00")), None);
    assert_eq!(peek_hello_version(&from_hex("00 fb2c")), None);
    // The peek does not know which enum it reads: the error's code sits where
    // a hello's version does (variant 0, then a u16), so it reads as one. Only
    // the rendezvous peeks, and only at what peers send it.
    assert_eq!(
        peek_hello_version(&payload_of(server_to_peer_cases()[0].hex)),
        Some(7)
    );
}

/// Serde writes an IPv6 socket address as address and port only: the flow
/// label and the scope id (which a link-local address needs) are lost on the
/// way. Peers never announce link-local candidates for that reason.
#[test]
fn ipv6_scope_and_flow_label_are_not_sent() {
    let scoped = SocketAddr::V6(std::net::SocketAddrV6::new(
        "fe80::1".parse().expect("address"),
        40000,
        7,
        3,
    ));
    let bytes = encode_payload(&scoped).expect("encodes");
    // 01 = V6 | the 16 address bytes | port 40000, and nothing else
    assert_eq!(
        to_hex(&bytes),
        to_hex(&from_hex("01 | fe800000000000000000000000000001 | fb409c"))
    );
    let back: SocketAddr = decode_payload(&bytes).expect("decodes");
    assert_eq!(back, addr("[fe80::1]:40000"));
}
