//! Writes the seed corpus of the fuzz targets: one well-formed input per kind of
//! message each target reads, so the fuzzer starts from inside the format.
//!
//! `cargo run -p punchline-proto --example fuzz_seeds -- fuzz/corpus`

use std::fs;
use std::path::{Path, PathBuf};

use punchline_proto::codec::encode_payload;
use punchline_proto::link_check::link_hello;
use punchline_proto::{
    Chat, ErrorCode, Go, Hello, Mapping, PeerInfo, PeerToPeer, PeerToServer, PunchOutcome, Role,
    ServerToPeer, PROTOCOL_VERSION,
};
use serde::Serialize;

fn main() -> std::io::Result<()> {
    let root = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "fuzz/corpus".into()),
    );
    let hello = Hello {
        version: PROTOCOL_VERSION,
        nameplate: "17".into(),
        probe_observed: Some("198.51.100.7:40000".parse().expect("addr")),
        pake: vec![0x42; 65],
        resume: Some([5; 16]),
        probe_token: Some([6; 16]),
        other_family_token: Some([7; 16]),
        mapped: Some("198.51.100.7:51000".parse().expect("addr")),
    };
    let to_server = [
        PeerToServer::Hello(hello.clone()),
        PeerToServer::Pong { seq: 3 },
        PeerToServer::Probe { token: [6; 16] },
        PeerToServer::Report(PunchOutcome::Direct {
            public: true,
            attempts: 2,
            elapsed_ms: 95,
        }),
        PeerToServer::Report(PunchOutcome::Failed { attempts: 40 }),
        PeerToServer::Allocate,
        PeerToServer::Reflect,
        PeerToServer::DialBack,
        PeerToServer::Relay,
        PeerToServer::Relayed(vec![0xee; 120]),
        PeerToServer::Sealed(vec![0xab; 90]),
    ];
    // A whole conversation in one stream, too, as the server reads it.
    write_stream(&root.join("rendezvous_input"), &to_server)?;

    let info = PeerInfo {
        observed: "203.0.113.9:51000".parse().expect("addr"),
        mapping: Mapping::DependsOnDestination {
            first: 51000,
            second: 51007,
        },
        pake: vec![0x17; 33],
        other_family: Some("[2001:db8:b:1::10]:51000".parse().expect("addr")),
        mapped: Some("198.51.100.20:51000".parse().expect("addr")),
    };
    let to_peer = [
        ServerToPeer::error(ErrorCode::CodeInUse, "code 17-… is already in use"),
        ServerToPeer::Welcome {
            observed: info.observed,
            mapping: Mapping::Independent,
        },
        ServerToPeer::Ping { seq: 1 },
        ServerToPeer::Go(Go {
            peer: info,
            role: Role::Leader,
            session: [9; 16],
            others_go_after_us: 35_000,
        }),
        ServerToPeer::Allocated {
            nameplate: "4".into(),
        },
        ServerToPeer::Observed {
            observed: "198.51.100.7:40000".parse().expect("addr"),
            alternate_port: Some(7427),
        },
        ServerToPeer::DialedBack {
            target: "198.51.100.7:40000".parse().expect("addr"),
            result: punchline_proto::DialBackResult::NoAnswer,
            elapsed_ms: 2500,
        },
        ServerToPeer::Relaying,
        ServerToPeer::Relayed(vec![0xdd; 120]),
        ServerToPeer::Sealed(vec![0xcd; 90]),
    ];
    write_stream(&root.join("peer_from_rendezvous"), &to_peer)?;

    let link = [
        link_hello([7; 16], Role::Follower),
        PeerToPeer::Handshake(vec![1; 48]),
        PeerToPeer::Sealed(vec![2; 40]),
        PeerToPeer::FirstLines(vec![3; 60]),
    ];
    write_stream(&root.join("peer_link"), &link)?;

    let dir = root.join("chat_payload");
    fs::create_dir_all(&dir)?;
    for (i, msg) in [
        Chat::Line {
            seq: 1,
            text: "hello there".into(),
        },
        Chat::Line {
            seq: 2,
            text: "tab\tand \u{1b}[31mescape".into(),
        },
        Chat::Bye,
        Chat::Nick { name: "ada".into() },
        Chat::Ack { upto: 7 },
        Chat::Ping,
        Chat::Resume { next: 3 },
        Chat::TryDirect,
    ]
    .iter()
    .enumerate()
    {
        fs::write(dir.join(format!("seed-{i}")), payload(msg))?;
    }

    let dir = root.join("typed_code");
    fs::create_dir_all(&dir)?;
    for (i, typed) in ["7-guitar-orbit", " 123-Alpha-bravo-charlie ", "7-", "x-y-z"]
        .iter()
        .enumerate()
    {
        fs::write(dir.join(format!("seed-{i}")), typed)?;
    }
    Ok(())
}

fn payload<T: Serialize>(msg: &T) -> Vec<u8> {
    encode_payload(msg).expect("seed encodes")
}

/// One seed per message (chunk-size byte, then the frame), and one with all of
/// them in a row.
fn write_stream<T: Serialize>(dir: &Path, msgs: &[T]) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    let frame = |msg: &T| {
        let p = payload(msg);
        let mut f = (p.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(&p);
        f
    };
    let mut all = vec![255u8];
    for (i, msg) in msgs.iter().enumerate() {
        let mut one = vec![255u8];
        one.extend(frame(msg));
        fs::write(dir.join(format!("seed-{i}")), one)?;
        all.extend(frame(msg));
    }
    // The whole stream again in 1-byte chunks.
    fs::write(dir.join("seed-all"), &all)?;
    all[0] = 0;
    fs::write(dir.join("seed-all-bytewise"), &all)
}
