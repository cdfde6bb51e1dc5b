//! `rendezvous`: the punchline rendezvous server.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use punchline_rendezvous::{bind_default, run, Config, DEFAULT_PORT};
use tokio::net::TcpListener;

/// Rendezvous server for punchline: introduces two peers that typed the same code
/// and times their simultaneous connect so a direct TCP link forms through their
/// NATs. It never carries chat traffic.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Address and port to listen on [default: all interfaces, IPv6 and IPv4, port 7425]
    #[arg(long, env = "PUNCHLINE_LISTEN", value_name = "ADDR:PORT")]
    listen: Option<SocketAddr>,

    /// Seconds a first peer waits for the second before it is told the code expired
    #[arg(
        long,
        env = "PUNCHLINE_WAIT_TTL",
        value_name = "SECS",
        default_value_t = 600
    )]
    wait_ttl: u64,

    /// Seconds a new connection has to send its hello
    #[arg(
        long,
        env = "PUNCHLINE_HELLO_TIMEOUT",
        value_name = "SECS",
        default_value_t = 10
    )]
    hello_timeout: u64,

    /// Most simultaneous connections; more are told the server is busy
    #[arg(
        long,
        env = "PUNCHLINE_MAX_CONNECTIONS",
        value_name = "N",
        default_value_t = 10_000
    )]
    max_connections: usize,

    /// Most codes (waiting or paired) at once
    #[arg(
        long,
        env = "PUNCHLINE_MAX_ROOMS",
        value_name = "N",
        default_value_t = 10_000
    )]
    max_rooms: usize,

    /// Benchmark baseline: send the go to both peers at once, without holding it
    /// back for the nearer one
    #[arg(long, hide = true)]
    unsynchronised_go: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match main_inner(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rendezvous: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[tokio::main]
async fn main_inner(args: Args) -> anyhow::Result<()> {
    let listener = match args.listen {
        Some(addr) => TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?,
        None => {
            let std = bind_default(DEFAULT_PORT)
                .with_context(|| format!("cannot listen on port {DEFAULT_PORT}"))?;
            std.set_nonblocking(true)?;
            TcpListener::from_std(std)?
        }
    };
    let config = Config {
        wait_ttl: Duration::from_secs(args.wait_ttl),
        hello_timeout: Duration::from_secs(args.hello_timeout),
        max_connections: args.max_connections,
        max_rooms: args.max_rooms,
        synchronise_go: !args.unsynchronised_go,
    };
    tracing::info!(addr = %listener.local_addr()?, version = env!("CARGO_PKG_VERSION"), "rendezvous listening");
    run(listener, config, shutdown_signal()).await?;
    Ok(())
}

/// Completes on Ctrl-C (SIGINT) or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
