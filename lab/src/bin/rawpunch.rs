//! `rawpunch`: the raw TCP hole-punch baseline of the NAT-lab bench, the way
//! common punch tools work (see `punchline_lab::rawpunch`): a minimal
//! rendezvous, and a client that punches, sends one line and prints the first
//! line it receives.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use punchline_lab::rawpunch;

/// A raw TCP hole punch: no encryption, no probe, no LAN candidates.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the rendezvous: pair two clients that send the same name, and send
    /// each the other's observed address (`IP:PORT`).
    Serve {
        /// Where to listen.
        #[arg(long, value_name = "ADDR:PORT")]
        listen: SocketAddr,
    },
    /// Meet the other client with the same name, punch a direct connection
    /// (listen() and connect() every 100 ms from the same port), send LINE and
    /// print the first line received.
    Connect {
        /// The rendezvous.
        #[arg(long, value_name = "ADDR:PORT")]
        server: SocketAddr,
        /// Fixed local port for the rendezvous connection, the listener and
        /// every attempt (0: one the OS picks, then kept).
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// The name both clients give the rendezvous.
        #[arg(long)]
        name: String,
        /// Seconds to try, from the start, before giving up.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
        /// The line to send.
        line: String,
    },
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Serve { listen } => {
            let listener = std::net::TcpListener::bind(listen)
                .with_context(|| format!("listening on {listen}"))?;
            eprintln!("rawpunch: listening on {listen}");
            rawpunch::serve(listener).context("accepting")?;
            Ok(())
        }
        Cmd::Connect {
            server,
            port,
            name,
            timeout,
            line,
        } => {
            let spec = rawpunch::ClientSpec {
                server,
                port,
                name,
                timeout: Duration::from_secs(timeout.max(1)),
            };
            let link = rawpunch::punch(&spec)?;
            eprintln!(
                "rawpunch: linked to {} ({}, {} attempts)",
                link.peer,
                if link.accepted {
                    "accepted"
                } else {
                    "connected"
                },
                link.attempts
            );
            let got = link.exchange(&line)?;
            {
                use std::io::Write as _;
                let mut out = std::io::stdout().lock();
                writeln!(out, "{got}").and_then(|()| out.flush())?;
            }
            link.close();
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("rawpunch: {err:#}");
            ExitCode::FAILURE
        }
    }
}
