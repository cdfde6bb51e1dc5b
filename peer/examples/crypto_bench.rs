//! What encryption costs the chat: lines per second through a real loopback TCP
//! connection, sealed (Noise transport messages, as the chat sends them) against
//! plain frames, in one run; and the CPU time of the Noise handshake itself.
//!
//! Run: `cargo run --release -p punchline-peer --example crypto_bench`

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use punchline_peer::net::LinkStream;
use punchline_peer::secure::SecureLink;
use punchline_proto::{Chat, FrameCodec, Role};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Framed;

/// Lines per measurement.
const LINES: usize = 200_000;
/// Bytes per line, about a typed sentence.
const LINE_LEN: usize = 80;
/// Measurements per mode; the best is kept (the least disturbed by the machine).
const ROUNDS: usize = 5;

async fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let a = a.expect("connect");
    let b = b.expect("accept").0;
    a.set_nodelay(true).expect("nodelay");
    b.set_nodelay(true).expect("nodelay");
    (a, b)
}

fn line() -> Chat {
    Chat::Line {
        seq: 1_000,
        text: "x".repeat(LINE_LEN),
    }
}

async fn plain_round() -> Duration {
    let (a, b) = pair().await;
    let mut tx = Framed::new(a, FrameCodec::<Chat, Chat>::new());
    let mut rx = Framed::new(b, FrameCodec::<Chat, Chat>::new());
    let start = Instant::now();
    // One write per line, as the chat sends them.
    let send = async {
        for _ in 0..LINES {
            tx.send(line()).await.expect("send");
        }
    };
    let recv = async {
        for _ in 0..LINES {
            rx.next().await.expect("open").expect("frame");
        }
    };
    tokio::join!(send, recv);
    start.elapsed()
}

async fn secure_pair() -> (SecureLink, SecureLink, Duration) {
    let (a, b) = pair().await;
    let psk = punchline_peer::secure::Secret::from_key([9u8; 32]);
    let intro = |name: &str, chat_role| punchline_proto::Introduction {
        name: name.into(),
        chat_role,
        words_nonce: [0; 32],
        first_lines: Vec::new(),
        identity: [0; 32],
    };
    let (ia, ib) = (intro("a", Role::Leader), intro("b", Role::Follower));
    let start = Instant::now();
    let (x, y) = tokio::join!(
        SecureLink::handshake(
            Framed::new(LinkStream::Tcp(a), FrameCodec::new()),
            Role::Leader,
            &psk,
            &ia,
            None,
            &[0; 16],
        ),
        SecureLink::handshake(
            Framed::new(LinkStream::Tcp(b), FrameCodec::new()),
            Role::Follower,
            &psk,
            &ib,
            None,
            &[0; 16],
        ),
    );
    let took = start.elapsed();
    (x.expect("handshake"), y.expect("handshake"), took)
}

async fn sealed_round() -> Duration {
    let (mut tx, mut rx, _) = secure_pair().await;
    let start = Instant::now();
    let send = async {
        for _ in 0..LINES {
            tx.send(&line()).await.expect("send");
        }
    };
    let recv = async {
        for _ in 0..LINES {
            rx.recv().await.expect("open").expect("line");
        }
    };
    tokio::join!(send, recv);
    start.elapsed()
}

fn rate(d: Duration) -> f64 {
    LINES as f64 / d.as_secs_f64()
}

#[tokio::main]
async fn main() {
    let mut plain = Duration::MAX;
    let mut sealed = Duration::MAX;
    let mut handshake = Duration::MAX;
    // Alternate the modes so both see the same machine.
    for _ in 0..ROUNDS {
        plain = plain.min(plain_round().await);
        sealed = sealed.min(sealed_round().await);
        handshake = handshake.min(secure_pair().await.2);
    }
    println!(
        "{LINES} lines of {LINE_LEN} bytes over loopback TCP, best of {ROUNDS} rounds each:\n"
    );
    println!("| mode | lines/s | MB/s of text | time |");
    println!("|---|---:|---:|---:|");
    for (name, d) in [
        ("plain frames", plain),
        ("sealed (Noise ChaChaPoly)", sealed),
    ] {
        println!(
            "| {name} | {:.0} | {:.1} | {:.0} ms |",
            rate(d),
            rate(d) * LINE_LEN as f64 / 1e6,
            d.as_secs_f64() * 1e3
        );
    }
    println!(
        "\nsealed / plain throughput: {:.2}",
        rate(sealed) / rate(plain)
    );
    println!(
        "Noise handshake on loopback (CPU and two messages, no network delay): {:.2} ms",
        handshake.as_secs_f64() * 1e3
    );
}
