//! `loadgen`: load benchmark of the rendezvous server.
//!
//! `loadgen bench` starts the real `rendezvous` binary as a child process on
//! loopback and drives it from this process, spreading connections over several
//! source addresses (127.0.0.2, 127.0.0.3, …). Three phases, each against a fresh
//! child process:
//!
//! 1. **Ceiling**: the raw rate of TCP connect + accept + close on loopback,
//!    against a trivial accept-and-close server (`loadgen sink`, also a child
//!    process), with the same concurrency and source addresses as phase 2.
//! 2. **Pairs**: pairs per second sustained, each pair being two connections,
//!    two hellos, the go to both, and the close; with the latency of pairing
//!    (second hello sent → both gos received) at p50/p99. The server's own
//!    `/metrics` must agree on the count.
//! 3. **Hold**: first peers that wait (each its own connection, hello, welcome,
//!    answering pings), in steps up to the target; the server's resident memory at
//!    each step, and its CPU use while it holds them all idle.
//!
//! It prints Markdown tables. The results kept in the repo are in `bench/load.md`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use punchline_proto::{PeerToServer, ServerToPeer};
use punchline_testkit::{connect_from, hello, http_get, sample, Client};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio::time::timeout;

/// Load benchmark of the punchline rendezvous (see `bench/load.md`).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run all phases against a `rendezvous` child process and print the tables
    Bench(BenchArgs),
    /// The ceiling's server: accept, wait for the client's close, close; prints
    /// its port on the first line of stdout
    #[command(hide = true)]
    Sink,
}

#[derive(Parser, Debug)]
struct BenchArgs {
    /// The rendezvous binary [default: `rendezvous` beside this program]
    #[arg(long, value_name = "PATH")]
    rendezvous: Option<PathBuf>,

    /// Waiting peers to hold in the last step of the hold phase
    #[arg(long, default_value_t = 18_000)]
    peers: usize,

    /// Steps of the hold phase before the last, in peers
    #[arg(long, value_delimiter = ',', default_values_t = [1_000, 5_000, 10_000])]
    steps: Vec<usize>,

    /// Seconds each rate phase (ceiling, pairs) runs
    #[arg(long, default_value_t = 10)]
    seconds: u64,

    /// Pairs (or ceiling connections) in flight at once
    #[arg(long, default_value_t = 32)]
    concurrency: usize,

    /// Source addresses to spread load over: 127.0.0.2 onwards
    #[arg(long, default_value_t = 8)]
    sources: u8,

    /// Seconds the held peers sit idle while the server's CPU is measured
    #[arg(long, default_value_t = 20)]
    idle_seconds: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match args.cmd {
        Cmd::Sink => rt.block_on(sink()),
        Cmd::Bench(b) => rt.block_on(bench(b)),
    }
}

/// How long any single step may take before the bench gives up on it.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let rendezvous = match &args.rendezvous {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no directory of this program")?
            .join("rendezvous"),
    };
    if !rendezvous.exists() {
        bail!(
            "no rendezvous binary at {} (build it: cargo build --release)",
            rendezvous.display()
        );
    }
    let sources: Vec<Ipv4Addr> = (0..args.sources.max(1))
        .map(|i| Ipv4Addr::new(127, 0, 0, 2 + i))
        .collect();
    println!(
        "loadgen: {} source addresses, concurrency {}, {} s per rate phase, {} cores",
        sources.len(),
        args.concurrency,
        args.seconds,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    // 1. Ceiling.
    let sink = Server::sink()?;
    let ceiling = connect_close_rate(&sink, &sources, &args).await?;
    let sink_cpu = sink.cpu_seconds();
    drop(sink);

    // 2. Pairs.
    let server = Server::rendezvous(&rendezvous)?;
    let pairs = pair_rate(&server, &sources, &args).await?;
    let server_cpu = server.cpu_seconds();
    let scraped = server.scrape().await?;
    drop(server);
    let counted = sample(&scraped, "punchline_pairs_total").unwrap_or(-1.0);
    let rejected: f64 = scraped
        .lines()
        .filter(|l| l.starts_with("punchline_rejects_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    if counted < pairs.count as f64 || rejected > 0.0 {
        bail!(
            "the server counted {counted} pairs and {rejected} rejects; the generator made {}",
            pairs.count
        );
    }

    let ceiling_rate = ceiling.count as f64 / ceiling.elapsed.as_secs_f64();
    let pair_rate = pairs.count as f64 / pairs.elapsed.as_secs_f64();
    println!();
    println!("| phase | per second | server CPU | latency p50 | latency p99 |");
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| raw connect+accept+close (ceiling) | {:.0} connections | {:.0}% | {} | {} |",
        ceiling_rate,
        100.0 * sink_cpu / ceiling.elapsed.as_secs_f64(),
        ms(ceiling.percentile(50.0)),
        ms(ceiling.percentile(99.0)),
    );
    println!(
        "| rendezvous pairs (2 connections, hellos, go, close) | {:.0} pairs = {:.0} connections | {:.0}% | {} | {} |",
        pair_rate,
        2.0 * pair_rate,
        100.0 * server_cpu / pairs.elapsed.as_secs_f64(),
        ms(pairs.percentile(50.0)),
        ms(pairs.percentile(99.0)),
    );
    println!();
    println!(
        "pairs/s against the ceiling in pairs (a pair is two connections, so {:.0} pairs/s): {:.2}×; \
         the server counted {counted} pairs and {rejected} rejects",
        ceiling_rate / 2.0,
        pair_rate / (ceiling_rate / 2.0),
    );

    // 3. Hold.
    let server = Server::rendezvous(&rendezvous)?;
    hold(&server, &sources, &args).await?;
    drop(server);
    Ok(())
}

/// A child process under measurement: the rendezvous or the sink.
struct Server {
    child: Child,
    addr: SocketAddr,
    metrics: Option<SocketAddr>,
}

/// A loopback port free right now (the kernel's choice for port 0).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Server {
    /// The rendezvous, with limits opened up for one host generating the load of
    /// many, and logging at its default level into the void.
    fn rendezvous(bin: &PathBuf) -> anyhow::Result<Server> {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let child = Command::new(bin)
            .args([
                "--listen",
                &addr.to_string(),
                "--no-probe",
                "--no-alternate",
            ])
            .args(["--metrics", &metrics.to_string()])
            .args(["--max-connections", "19900", "--max-rooms", "100000"])
            .args(["--connections-per-address", "100000"])
            .args(["--connections-per-minute", "100000000"])
            .args(["--codes-per-minute", "100000000"])
            .args(["--stats-interval", "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let server = Server {
            child,
            addr,
            metrics: Some(metrics),
        };
        server.wait_listening()?;
        Ok(server)
    }

    fn sink() -> anyhow::Result<Server> {
        let mut child = Command::new(std::env::current_exe()?)
            .arg("sink")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let mut line = String::new();
        let stdout = child.stdout.take().context("sink stdout")?;
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
        let addr = line
            .trim()
            .parse()
            .context("sink did not print its address")?;
        Ok(Server {
            child,
            addr,
            metrics: None,
        })
    }

    fn wait_listening(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(self.addr).is_ok() {
                // That probe connection sends nothing; the server drops it after
                // its hello timeout. Give the listener a moment to settle.
                std::thread::sleep(Duration::from_millis(100));
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("the server did not listen on {} in time", self.addr)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory, from /proc/PID/status.
    fn rss_bytes(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    }

    /// User + system CPU time so far, from /proc/PID/stat.
    fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        // Fields after the command name (which is in parentheses and may hold spaces).
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        // utime and stime are fields 14 and 15 of the line, 12 and 13 after ')'.
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        (ticks(11) + ticks(12)) as f64 / hz
    }

    /// The server's /metrics page.
    async fn scrape(&self) -> anyhow::Result<String> {
        let addr = self.metrics.context("no metrics endpoint")?;
        Ok(http_get(addr, "/metrics", STEP_TIMEOUT).await?)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The sink: accept, read until the client closes, close.
async fn sink() -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    println!("{}", listener.local_addr()?);
    loop {
        let (mut stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        });
    }
}

/// Counted events of a rate phase, with their latencies.
struct Rate {
    count: u64,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Rate {
    fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        if sorted.is_empty() {
            return Duration::ZERO;
        }
        let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
        sorted[i.min(sorted.len() - 1)]
    }
}

/// Runs `concurrency` workers for the phase's duration; each repeats `one`
/// (given its worker number and a unique sequence number) and records its
/// latency. A failed iteration ends the phase with its error.
async fn run_rate<F, Fut>(args: &BenchArgs, one: F) -> anyhow::Result<Rate>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<Duration>> + Send,
{
    let one = Arc::new(one);
    let seq = Arc::new(AtomicU64::new(1));
    let start = Instant::now();
    let deadline = start + Duration::from_secs(args.seconds);
    let mut workers = JoinSet::new();
    for w in 0..args.concurrency {
        let (one, seq) = (one.clone(), seq.clone());
        workers.spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let n = seq.fetch_add(1, Ordering::Relaxed);
                let took = timeout(STEP_TIMEOUT, one(w, n))
                    .await
                    .context("one iteration took over 30 s")??;
                latencies.push(took);
            }
            anyhow::Ok(latencies)
        });
    }
    let mut latencies = Vec::new();
    while let Some(done) = workers.join_next().await {
        latencies.extend(done??);
    }
    Ok(Rate {
        count: latencies.len() as u64,
        elapsed: start.elapsed(),
        latencies,
    })
}

/// Phase 1: connect, close our side, wait for the server's close.
async fn connect_close_rate(
    sink: &Server,
    sources: &[Ipv4Addr],
    args: &BenchArgs,
) -> anyhow::Result<Rate> {
    let (server, sources) = (sink.addr, sources.to_vec());
    run_rate(args, move |w, _| {
        let source = sources[w % sources.len()];
        async move {
            let t = Instant::now();
            let mut s = connect_from(source.into(), server).await?;
            s.shutdown().await?;
            let mut buf = [0u8; 16];
            while s.read(&mut buf).await? > 0 {}
            Ok(t.elapsed())
        }
    })
    .await
}

/// Connects from `source` and says hello under `nameplate`; returns after the
/// welcome.
async fn say_hello(source: Ipv4Addr, server: SocketAddr, nameplate: u64) -> anyhow::Result<Client> {
    let mut c = Client::new(connect_from(source.into(), server).await?);
    c.try_send(PeerToServer::Hello(hello(&nameplate.to_string(), &[0; 33])))
        .await?;
    match next_message(&mut c).await? {
        ServerToPeer::Welcome { .. } => Ok(c),
        other => bail!("expected a welcome, got {other:?}"),
    }
}

/// The next message that is not a ping (pings are answered); an error from
/// the server is one of the bench's.
async fn next_message(c: &mut Client) -> anyhow::Result<ServerToPeer> {
    match c.next_message().await? {
        ServerToPeer::Error { message, .. } => bail!("server error: {message}"),
        other => Ok(other),
    }
}

/// Phase 2: a pair per iteration, each peer from its own source address.
async fn pair_rate(
    server: &Server,
    sources: &[Ipv4Addr],
    args: &BenchArgs,
) -> anyhow::Result<Rate> {
    let (server, sources) = (server.addr, sources.to_vec());
    run_rate(args, move |w, n| {
        let a_source = sources[w % sources.len()];
        let b_source = sources[(w + 1) % sources.len()];
        async move {
            let mut a = say_hello(a_source, server, n).await?;
            let t = Instant::now();
            let mut b = say_hello(b_source, server, n).await?;
            let (go_a, go_b) = tokio::join!(next_message(&mut a), next_message(&mut b));
            for go in [go_a?, go_b?] {
                if !matches!(go, ServerToPeer::Go(_)) {
                    bail!("expected a go, got {go:?}");
                }
            }
            let took = t.elapsed();
            drop((a, b));
            Ok(took)
        }
    })
    .await
}

/// Phase 3: waiting peers held in steps; memory at each step, CPU when idle.
async fn hold(server: &Server, sources: &[Ipv4Addr], args: &BenchArgs) -> anyhow::Result<()> {
    let mut steps: Vec<usize> = args
        .steps
        .iter()
        .copied()
        .filter(|&s| s < args.peers)
        .collect();
    steps.push(args.peers);
    settle().await;
    let base = server.rss_bytes();
    let kernel_base = kernel_tcp_bytes();
    let mut held = JoinSet::new();
    let (welcomed_tx, mut welcomed) = tokio::sync::mpsc::channel::<anyhow::Result<()>>(1024);
    let mut opened = 0usize;
    println!();
    println!(
        "| waiting peers | server RSS | RSS per waiting peer (over the empty server's {:.1} MiB) | kernel slab per socket (both ends are on this host) |",
        mib(base)
    );
    println!("|---:|---:|---:|---:|");
    let mut nameplate = 1_000_000u64;
    const OPENING_AT_ONCE: usize = 256;
    for &target in &steps {
        let mut in_flight = 0usize;
        while opened < target || in_flight > 0 {
            while opened < target && in_flight < OPENING_AT_ONCE {
                let source = sources[opened % sources.len()];
                let (addr, tx) = (server.addr, welcomed_tx.clone());
                nameplate += 1;
                let np = nameplate;
                held.spawn(async move {
                    match say_hello(source, addr, np).await {
                        Ok(mut c) => {
                            let _ = tx.send(Ok(())).await;
                            // Wait, answering pings, until the bench ends.
                            let _ = next_message(&mut c).await;
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e)).await;
                        }
                    }
                });
                opened += 1;
                in_flight += 1;
            }
            let got = timeout(STEP_TIMEOUT, welcomed.recv())
                .await
                .context("a waiting peer got no welcome in 30 s")?
                .context("welcome channel closed")?;
            got.with_context(|| format!("waiting peer {opened}"))?;
            in_flight -= 1;
        }
        settle().await;
        let rss = server.rss_bytes();
        // Both ends of every connection are on this host: two sockets a peer.
        let kernel = kernel_tcp_bytes().saturating_sub(kernel_base);
        println!(
            "| {target} | {:.1} MiB | {:.2} KiB | {:.2} KiB |",
            mib(rss),
            (rss.saturating_sub(base)) as f64 / 1024.0 / target as f64,
            kernel as f64 / 1024.0 / (2 * target) as f64
        );
    }
    let page = server.scrape().await?;
    let waiting = sample(&page, "punchline_waiting_peers").unwrap_or(-1.0);
    if waiting != args.peers as f64 {
        bail!(
            "the server reports {waiting} waiting peers, not {}",
            args.peers
        );
    }
    let cpu0 = server.cpu_seconds();
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.idle_seconds)).await;
    let cpu = (server.cpu_seconds() - cpu0) / t.elapsed().as_secs_f64();
    println!();
    println!(
        "holding {} waiting peers idle for {} s (each pinged every 10 s): server CPU {:.2}% of one core; the server reports {waiting} waiting",
        args.peers,
        args.idle_seconds,
        100.0 * cpu
    );
    held.abort_all();
    Ok(())
}

/// The kernel's slab memory (`Slab` of /proc/meminfo): where socket structures,
/// their files and inodes live. Host-wide, so only its growth over a step says
/// something, and only roughly (other work on the host moves it too).
fn kernel_tcp_bytes() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("Slab:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// Lets the server's sweeper (500 ms) and allocator settle before a reading.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(1500)).await;
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}
