//! `rendezvous`: the punchline rendezvous server.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use punchline_rendezvous::metrics::{log_stats, DEFAULT_STATS_INTERVAL};
use punchline_rendezvous::{
    bind_default, run_on, run_probe, serve_metrics, server, Config, Metrics, ALTERNATE_PORT_OFFSET,
    DEFAULT_PORT, PROBE_PORT_OFFSET,
};
use tokio::net::TcpListener;

/// Rendezvous server for punchline: introduces two peers that typed the same code
/// and times their simultaneous connect so a direct TCP link forms through their
/// NATs. When a punch fails it can relay the pair's end-to-end encrypted traffic.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Address and port to listen on [default: all interfaces, IPv6 and IPv4, port 7425]
    #[arg(long, env = "PUNCHLINE_LISTEN", value_name = "ADDR:PORT")]
    listen: Option<SocketAddr>,

    /// Address and port of the probe port, which tells each connection the address
    /// it came from so peers can see whether their NAT changes ports per
    /// destination [default: the listen address, port + 1]
    #[arg(long, env = "PUNCHLINE_PROBE_LISTEN", value_name = "ADDR:PORT")]
    probe_listen: Option<SocketAddr>,

    /// Do not open the probe port
    #[arg(long, env = "PUNCHLINE_NO_PROBE")]
    no_probe: bool,

    /// Address and port of the alternate port, which serves peers like the main
    /// one: a peer whose first connection gets no answer (a lost SYN or SYN-ACK)
    /// tries it too rather than wait a second for its kernel to retry
    /// [default: the listen address, port + 2]
    #[arg(long, env = "PUNCHLINE_ALTERNATE_LISTEN", value_name = "ADDR:PORT")]
    alternate_listen: Option<SocketAddr>,

    /// Do not open the alternate port (peers then wait for their kernel's
    /// retransmission when a connection's first segments are lost)
    #[arg(long, env = "PUNCHLINE_NO_ALTERNATE")]
    no_alternate: bool,

    /// Seconds a first peer waits for the second before it is told the code expired
    #[arg(
        long,
        env = "PUNCHLINE_WAIT_TTL",
        value_name = "SECS",
        default_value_t = server::DEFAULT_WAIT_TTL.as_secs()
    )]
    wait_ttl: u64,

    /// Seconds a new connection has to send its hello
    #[arg(
        long,
        env = "PUNCHLINE_HELLO_TIMEOUT",
        value_name = "SECS",
        default_value_t = server::DEFAULT_HELLO_TIMEOUT.as_secs()
    )]
    hello_timeout: u64,

    /// Seconds a waiting peer may leave the server's pings unanswered before it is
    /// dropped and its code freed
    #[arg(
        long,
        env = "PUNCHLINE_IDLE_TIMEOUT",
        value_name = "SECS",
        default_value_t = server::DEFAULT_IDLE_TIMEOUT.as_secs()
    )]
    idle_timeout: u64,

    /// Most simultaneous connections; more are told the server is busy
    #[arg(
        long,
        env = "PUNCHLINE_MAX_CONNECTIONS",
        value_name = "N",
        default_value_t = server::DEFAULT_MAX_CONNECTIONS
    )]
    max_connections: usize,

    /// Most open connections from one address (an IPv4 address, an IPv6 /64)
    #[arg(
        long,
        env = "PUNCHLINE_CONNECTIONS_PER_ADDRESS",
        value_name = "N",
        default_value_t = server::DEFAULT_CONNECTIONS_PER_ADDRESS
    )]
    connections_per_address: u32,

    /// New connections per minute from one address (after a burst of 30)
    #[arg(
        long,
        env = "PUNCHLINE_CONNECTIONS_PER_MINUTE",
        value_name = "N",
        default_value_t = server::DEFAULT_CONNECTIONS_PER_MINUTE
    )]
    connections_per_minute: u32,

    /// New codes per minute from one address (after a burst of 10)
    #[arg(
        long,
        env = "PUNCHLINE_CODES_PER_MINUTE",
        value_name = "N",
        default_value_t = server::DEFAULT_CODES_PER_MINUTE
    )]
    codes_per_minute: u32,

    /// A whole network (an IPv4 /24, an IPv6 /48) gets this many times the
    /// per-address limits: open and relayed connections, rates and bursts
    #[arg(
        long,
        env = "PUNCHLINE_NETWORK_MULTIPLE",
        value_name = "N",
        default_value_t = server::DEFAULT_NETWORK_MULTIPLE,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    network_multiple: u32,

    /// Most codes (waiting or paired) at once
    #[arg(
        long,
        env = "PUNCHLINE_MAX_ROOMS",
        value_name = "N",
        default_value_t = server::DEFAULT_MAX_ROOMS
    )]
    max_rooms: usize,

    /// Do not relay: peers whose punch fails get no chat (by default their
    /// encrypted traffic is relayed, which the server cannot read)
    #[arg(long, env = "PUNCHLINE_NO_RELAY")]
    no_relay: bool,

    /// Most pairs relayed at once
    #[arg(
        long,
        env = "PUNCHLINE_MAX_RELAYS",
        value_name = "N",
        default_value_t = server::DEFAULT_MAX_RELAYS
    )]
    max_relays: usize,

    /// Most bytes relayed for one pair, both ways together
    #[arg(
        long,
        env = "PUNCHLINE_RELAY_BYTES",
        value_name = "BYTES",
        default_value_t = server::DEFAULT_RELAY_BYTES
    )]
    relay_bytes: u64,

    /// Bytes a second relayed for one pair, both ways together (after a burst of
    /// four seconds' worth); a faster sender is slowed down, not cut off
    #[arg(
        long,
        env = "PUNCHLINE_RELAY_RATE",
        value_name = "BYTES",
        default_value_t = server::DEFAULT_RELAY_RATE
    )]
    relay_rate: u64,

    /// Most relayed connections from one address (each end of a relayed pair is
    /// one)
    #[arg(
        long,
        env = "PUNCHLINE_RELAYS_PER_ADDRESS",
        value_name = "N",
        default_value_t = server::DEFAULT_RELAYS_PER_ADDRESS
    )]
    relays_per_address: u32,

    /// Seconds one relay may last; the peers' chat then continues over a new link
    #[arg(
        long,
        env = "PUNCHLINE_RELAY_LIFETIME",
        value_name = "SECS",
        default_value_t = server::DEFAULT_RELAY_LIFETIME.as_secs(),
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    relay_lifetime: u64,

    /// Serve metrics (Prometheus text format) at http://ADDR:PORT/metrics; no
    /// authentication, so keep it on loopback or a private address [default: off]
    #[arg(long, env = "PUNCHLINE_METRICS", value_name = "ADDR:PORT")]
    metrics: Option<SocketAddr>,

    /// Seconds between stats lines in the log (0: none)
    #[arg(
        long,
        env = "PUNCHLINE_STATS_INTERVAL",
        value_name = "SECS",
        default_value_t = DEFAULT_STATS_INTERVAL.as_secs()
    )]
    stats_interval: u64,

    /// Benchmark baseline: the go tells neither peer how much later the other
    /// gets its own (both are sent at once either way)
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
        None => default_listener(DEFAULT_PORT)?,
    };
    let main_addr = listener.local_addr()?;
    // A port next to the main one: at `--listen`'s address, or like the default
    // listener.
    let beside = |given: Option<SocketAddr>, offset: u16| {
        let port = main_addr.port().wrapping_add(offset);
        async move {
            match (given, args.listen) {
                (Some(addr), _) => TcpListener::bind(addr).await.map_err(anyhow::Error::from),
                (None, Some(main)) => TcpListener::bind(SocketAddr::new(main.ip(), port))
                    .await
                    .map_err(anyhow::Error::from),
                (None, None) => default_listener(port),
            }
        }
    };
    let probe = if args.no_probe {
        None
    } else {
        Some(beside(args.probe_listen, PROBE_PORT_OFFSET).await.context(
            "cannot open the probe port (choose one with --probe-listen, or --no-probe)",
        )?)
    };
    let alternate = if args.no_alternate {
        None
    } else {
        Some(
            beside(args.alternate_listen, ALTERNATE_PORT_OFFSET)
                .await
                .context("cannot open the alternate port (choose one with --alternate-listen, or --no-alternate)")?,
        )
    };
    let metrics_listener = match args.metrics {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot serve metrics on {addr}"))?,
        ),
        None => None,
    };
    let metrics = std::sync::Arc::new(Metrics::default());
    let config = Config {
        wait_ttl: Duration::from_secs(args.wait_ttl),
        hello_timeout: Duration::from_secs(args.hello_timeout),
        idle_timeout: Duration::from_secs(args.idle_timeout.max(1)),
        max_connections: args.max_connections,
        max_rooms: args.max_rooms,
        synchronise_go: !args.unsynchronised_go,
        connections_per_address: args.connections_per_address,
        connections_per_minute: args.connections_per_minute,
        codes_per_minute: args.codes_per_minute,
        network_multiple: args.network_multiple,
        metrics: metrics.clone(),
        relay: !args.no_relay,
        max_relays: args.max_relays,
        relay_bytes: args.relay_bytes,
        relay_rate: args.relay_rate,
        relays_per_address: args.relays_per_address,
        relay_lifetime: Duration::from_secs(args.relay_lifetime),
        probes: Default::default(),
    };
    check_file_limit(args.max_connections);
    let probe_addr = probe.as_ref().and_then(|p| p.local_addr().ok());
    let alternate_addr = alternate.as_ref().and_then(|p| p.local_addr().ok());
    tracing::info!(addr = %main_addr, probe = ?probe_addr, alternate = ?alternate_addr, version = env!("CARGO_PKG_VERSION"), "rendezvous listening");
    let mut background = Vec::new();
    if let Some(p) = probe {
        background.push(tokio::spawn(run_probe(
            p,
            metrics.clone(),
            config.probes.clone(),
            std::future::pending(),
        )));
    }
    if let Some(l) = metrics_listener {
        tracing::info!(addr = %l.local_addr()?, "metrics at /metrics");
        background.push(tokio::spawn(serve_metrics(
            l,
            metrics.clone(),
            std::future::pending(),
        )));
    }
    if args.stats_interval > 0 {
        let interval = Duration::from_secs(args.stats_interval);
        background.push(tokio::spawn(async move {
            log_stats(metrics, interval).await;
            Ok(())
        }));
    }
    let listeners = std::iter::once(listener).chain(alternate).collect();
    let result = run_on(listeners, config, shutdown_signal()).await;
    for task in background {
        task.abort();
    }
    result?;
    Ok(())
}

fn default_listener(port: u16) -> anyhow::Result<TcpListener> {
    let std = bind_default(port).with_context(|| format!("cannot listen on port {port}"))?;
    std.set_nonblocking(true)?;
    Ok(TcpListener::from_std(std)?)
}

/// Descriptors the server needs beyond one per connection: listeners, the
/// metrics endpoint and its scrapes, probe answers in flight, the runtime's own.
const SPARE_FILES: u64 = 1100;

/// Raises the soft limit on open files to the hard limit (every connection is a
/// descriptor) and warns if even that is too low for `max_connections`, in which
/// case accepts fail with "too many open files" before the cap is reached.
fn check_file_limit(max_connections: usize) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct passed, nothing else.
    let raised = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return;
        }
        if limit.rlim_cur >= limit.rlim_max {
            false
        } else {
            let raise = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &raise) == 0
        }
    };
    let usable = if raised {
        limit.rlim_max
    } else {
        limit.rlim_cur
    };
    let needed = max_connections as u64 + SPARE_FILES;
    if usable < needed {
        tracing::warn!(
            open_files = usable,
            max_connections,
            "the open-file limit is below --max-connections plus {SPARE_FILES}; raise it (LimitNOFILE= in the systemd unit, ulimit -n) or lower --max-connections"
        );
    } else {
        tracing::debug!(open_files = usable, "open-file limit");
    }
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
