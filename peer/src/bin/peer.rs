//! `peer`: chat with another peer over a direct TCP link punched through NATs.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use punchline_peer::{default_name, run, ChatEnd, Mode, Options};
use punchline_proto::punch::RetryPolicy;

/// Chat directly with another host, even when both are behind NATs.
///
/// One user runs `peer` without a code and passes the printed code to the other,
/// who runs `peer CODE`. The rendezvous server introduces the two peers; then both
/// connect to each other at the same moment from a fixed local port, so a direct
/// TCP link forms through both NATs (TCP simultaneous open), and the chat runs over
/// it, end-to-end encrypted with a key only holders of the code can derive. Lines typed are sent; lines received are shown as
/// `NAME: TEXT`. When stdin is not a terminal, each input line is one message and
/// the peer exits once all of them are delivered.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    /// Rendezvous server, HOST[:PORT] (default port 7425)
    #[arg(long, env = "PUNCHLINE_SERVER", value_name = "HOST:PORT")]
    server: Option<String>,

    /// Fixed local port for the rendezvous connection and every punch attempt
    /// [default: one the OS picks, then kept for everything]
    #[arg(long, value_name = "N")]
    port: Option<u16>,

    /// Name shown to the other side [default: your login name]
    #[arg(long, value_name = "NAME")]
    name: Option<String>,

    /// Seconds to keep trying to connect directly before giving up
    #[arg(long, value_name = "SECS", default_value_t = punchline_proto::punch::PUNCH_DEADLINE.as_secs())]
    punch_timeout: u64,

    /// Do not tell the other side this host's own (LAN) addresses; you can then
    /// only meet through your public address
    #[arg(long)]
    no_lan: bool,

    /// Also offer this address to the other side (e.g. a port forwarded on your
    /// router, or a VPN address); may be repeated
    #[arg(long, value_name = "ADDR:PORT")]
    candidate: Vec<SocketAddr>,

    /// The rendezvous' probe port [default: its port + 1]
    #[arg(long, value_name = "N")]
    probe_port: Option<u16>,

    /// Benchmark baseline: retry every punch attempt after this fixed pause (ms)
    /// instead of the adaptive cadence
    #[arg(long, value_name = "MS", hide = true)]
    naive_retry_ms: Option<u64>,

    /// Words in a new code: each adds 8 bits against guessing (2 words: a 1 in
    /// 65,536 chance per attempt)
    #[arg(long, value_name = "N", default_value_t = punchline_proto::codes::DEFAULT_WORDS)]
    words: usize,

    /// The code the other side gave you, e.g. 7-guitar-orbit; without it, a new
    /// code is made and printed for you to pass on
    code: Option<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let Some(server) = args.server else {
        eprintln!(
            "peer: no rendezvous server given: use --server HOST:PORT or set PUNCHLINE_SERVER"
        );
        return ExitCode::from(2);
    };
    let opts = Options {
        server,
        port: args.port.unwrap_or(0),
        name: args.name.unwrap_or_else(default_name),
        code: args.code,
        words: args.words,
        punch_timeout: Duration::from_secs(args.punch_timeout),
        lan_candidates: !args.no_lan,
        extra_candidates: args.candidate,
        probe_port: args.probe_port,
        retry: match args.naive_retry_ms {
            Some(ms) => RetryPolicy::Fixed(Duration::from_millis(ms)),
            None => RetryPolicy::Adaptive,
        },
    };
    let mode = if std::io::stdin().is_terminal() {
        Mode::Terminal
    } else {
        Mode::Lines
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("peer: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(opts, mode));
    // The input thread may still be blocked reading stdin: do not wait for it.
    runtime.shutdown_timeout(Duration::from_millis(100));
    match result {
        Ok(ChatEnd::WeLeft | ChatEnd::TheyLeft) => ExitCode::SUCCESS,
        Ok(ChatEnd::Interrupted) => ExitCode::from(130),
        Err(e) => {
            eprintln!("peer: {e:#}");
            ExitCode::FAILURE
        }
    }
}
