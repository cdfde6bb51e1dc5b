//! `lab`: build a NAT lab topology and keep it until Ctrl-C, or clean up
//! namespaces a dead run left behind.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use nix::sys::signal::{SigSet, Signal};
use punchline_lab::{netns, Lab, LabConfig, LinkShape, NatKind, WanConfig};

/// Real kernel NAT topologies in network namespaces, for punchline tests and
/// benchmarks. Needs root.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build a topology, print its namespaces and addresses, keep it until
    /// Ctrl-C (or SIGTERM), then remove it.
    Up(UpArgs),
    /// Benchmark the punch on each pair of NAT kinds against a naive baseline and
    /// print a Markdown table (needs the workspace's `peer` binary built).
    Bench(BenchArgs),
    /// Benchmark a chat that survives: recovery after a reset and a cut (time to
    /// flow again, lines lost or doubled), and a relayed link against a direct
    /// one; print a Markdown report.
    BenchResilience(ResilienceArgs),
    /// Remove lab namespaces whose creating process is gone.
    Cleanup {
        /// Remove every lab namespace, also those of running labs.
        #[arg(long)]
        all: bool,
    },
}

#[derive(clap::Args)]
struct UpArgs {
    /// Edge of side A: home, rst, range, symmetric, public, firewall, cgnat.
    #[arg(long, default_value = "home")]
    a: NatKind,
    /// Edge of side B (ignored with --same-lan).
    #[arg(long, default_value = "home")]
    b: NatKind,
    /// Put B on A's LAN behind A's edge (no hairpin).
    #[arg(long)]
    same_lan: bool,
    /// Give B's LAN the same private range as A's (both hosts 10.0.1.10).
    #[arg(long)]
    overlapping_lans: bool,
    /// One-way delay of side A's link, in ms (applied in both directions).
    #[arg(long, default_value_t = 0)]
    delay_a: u64,
    /// One-way delay of side B's link, in ms.
    #[arg(long, default_value_t = 0)]
    delay_b: u64,
    /// One-way delay of the rendezvous host's link, in ms.
    #[arg(long, default_value_t = 0)]
    delay_rv: u64,
    /// Extra one-way delay on the path between the rendezvous and side B only,
    /// in ms (a rendezvous far from B while A and B are close).
    #[arg(long, default_value_t = 0)]
    delay_rv_b: u64,
    /// Packet loss of side A's link, in percent.
    #[arg(long, default_value_t = 0.0)]
    loss_a: f64,
    /// Packet loss of side B's link, in percent.
    #[arg(long, default_value_t = 0.0)]
    loss_b: f64,
    /// Packet loss of the rendezvous host's link, in percent.
    #[arg(long, default_value_t = 0.0)]
    loss_rv: f64,
    /// Dual stack: every host also gets a global IPv6 address (routed, not
    /// translated; stateful firewall on every side but a public one).
    #[arg(long, conflicts_with = "ipv6_only")]
    ipv6: bool,
    /// Like --ipv6, but hosts A and B get no IPv4 address or route at all.
    #[arg(long)]
    ipv6_only: bool,
    /// Side A's router grants port mappings in these protocols
    /// (comma-separated: nat-pmp, pcp, upnp, all). Needs A behind one NAT
    /// router.
    #[arg(long, value_delimiter = ',')]
    port_mapping: Vec<MappingProtocol>,
}

/// A port-mapping protocol of `lab up --port-mapping`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum MappingProtocol {
    /// NAT-PMP (RFC 6886).
    NatPmp,
    /// PCP (RFC 6887).
    Pcp,
    /// UPnP-IGD v1 (SSDP, HTTP, SOAP).
    Upnp,
    /// All three.
    All,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Measure what a user feels instead: from process start to the other
    /// side's first line shown, punchline against a raw punch tool (`rawpunch`,
    /// listen() + connect() every 100 ms, no encryption), with and without loss.
    #[arg(long)]
    first_line: bool,
    /// Runs per pair and strategy.
    #[arg(long, default_value_t = 20)]
    runs: u32,
    /// With --first-line: packet loss on each peer's WAN link, in percent, one
    /// setting after the other.
    #[arg(long, value_delimiter = ',', default_value = "0,3")]
    loss: Vec<f64>,
    /// With --first-line: the raw punch binary [default: `rawpunch` next to
    /// this executable].
    #[arg(long)]
    raw: Option<std::path::PathBuf>,
    /// WAN profiles to run (asymmetric, far-rendezvous); default: all.
    #[arg(long, value_delimiter = ',')]
    profiles: Vec<String>,
    /// Only these pairs (e.g. home/rst,same-lan); default: the whole matrix.
    #[arg(long, value_delimiter = ',')]
    pairs: Vec<String>,
    /// The peer binary [default: `peer` next to this executable].
    #[arg(long)]
    peer: Option<std::path::PathBuf>,
    /// Also write the table, with a heading, to this file.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    /// A note for the file's heading (what changed since the last results).
    #[arg(long)]
    note: Option<String>,
}

#[derive(clap::Args)]
struct ResilienceArgs {
    /// Cut-and-restore rounds.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Seconds the path stays cut.
    #[arg(long, default_value_t = 5)]
    cut: u64,
    /// The peer binary [default: `peer` next to this executable].
    #[arg(long)]
    peer: Option<std::path::PathBuf>,
    /// Also write the report, with a heading, to this file.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

fn bench_resilience(args: &ResilienceArgs) -> anyhow::Result<()> {
    let peer = punchline_lab::scenario::peer_binary(args.peer.clone())?;
    let report = punchline_lab::resilience::run(
        &peer,
        args.rounds.max(1),
        std::time::Duration::from_secs(args.cut),
        |line| eprintln!("{line}"),
    )
    .context("running the benchmark")?;
    print!("{report}");
    if let Some(path) = &args.out {
        let text = format!(
            "# Resilience benchmark (NAT lab)\n\nCommand: `sudo target/release/lab bench-resilience --out {}` ({} cores).\n\n{report}",
            path.display(),
            std::thread::available_parallelism().map_or(0, |n| n.get()),
        );
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

impl BenchArgs {
    fn specs(&self) -> anyhow::Result<Vec<punchline_lab::bench::BenchSpec>> {
        let mut profiles = punchline_lab::bench::default_profiles();
        if !self.profiles.is_empty() {
            for want in &self.profiles {
                if !profiles.iter().any(|(name, _)| name == want) {
                    anyhow::bail!("unknown profile {want}");
                }
            }
            profiles.retain(|(name, _)| self.profiles.contains(name));
        }
        let mut all = punchline_lab::bench::default_pairs();
        if self.first_line {
            all.extend(punchline_lab::bench::reach_pairs());
        }
        let pairs = if self.pairs.is_empty() {
            all
        } else {
            self.pairs
                .iter()
                .map(|want| {
                    all.iter()
                        .find(|p| {
                            let name = punchline_lab::bench::pair_name(p);
                            name == *want || name.starts_with(&format!("{want} "))
                        })
                        .cloned()
                        .with_context(|| format!("unknown pair {want}"))
                })
                .collect::<anyhow::Result<_>>()?
        };
        Ok(profiles
            .into_iter()
            .map(|(profile, wan)| punchline_lab::bench::BenchSpec {
                pairs: pairs.clone(),
                profile,
                wan,
                runs: self.runs,
                punch_timeout: Duration::from_secs(10),
                hopeless_timeout: Duration::from_secs(3),
            })
            .collect())
    }
}

/// The command line of a bench, as written into its results file.
fn bench_command(args: &BenchArgs, path: &std::path::Path) -> String {
    let mut cmd = String::from("sudo target/release/lab bench");
    if args.first_line {
        cmd.push_str(" --first-line");
    }
    if args.runs != 20 {
        cmd.push_str(&format!(" --runs {}", args.runs));
    }
    if args.first_line && args.loss != [0.0, 3.0] {
        let loss: Vec<String> = args.loss.iter().map(|l| l.to_string()).collect();
        cmd.push_str(&format!(" --loss {}", loss.join(",")));
    }
    if !args.profiles.is_empty() {
        cmd.push_str(&format!(" --profiles {}", args.profiles.join(",")));
    }
    if !args.pairs.is_empty() {
        cmd.push_str(&format!(" --pairs {}", args.pairs.join(",")));
    }
    cmd.push_str(&format!(" --out {}", path.display()));
    cmd
}

/// The short hash of the checked-out commit, if this runs in a git checkout.
fn git_commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into())
}

fn bench_first_line(args: &BenchArgs) -> anyhow::Result<()> {
    let peer = punchline_lab::scenario::peer_binary(args.peer.clone())?;
    let raw = punchline_lab::scenario::workspace_binary("rawpunch", args.raw.clone())?;
    let specs = args.specs()?;
    let Some(first) = specs.first() else {
        anyhow::bail!("no profile to run");
    };
    for l in &args.loss {
        if !(0.0..=100.0).contains(l) {
            anyhow::bail!("loss {l}% is not within 0..=100");
        }
    }
    let explicit_pairs = !args.pairs.is_empty();
    let spec = punchline_lab::bench::first_line::FirstLineSpec {
        // The pairs where a punch can work (symmetric NATs only measure a
        // failure, not a first line).
        pairs: first
            .pairs
            .iter()
            .filter(|p| {
                explicit_pairs
                    || p.ipv6.enabled()
                    || p.port_mapping.is_some()
                    || match p.layout {
                        punchline_lab::Layout::Separate { a, b } => a.punchable() && b.punchable(),
                        punchline_lab::Layout::SameLan(_) => true,
                    }
            })
            .cloned()
            .collect(),
        profiles: specs.iter().map(|s| (s.profile.clone(), s.wan)).collect(),
        losses: args.loss.iter().map(|l| l / 100.0).collect(),
        runs: args.runs.max(1),
        punch_timeout: first.punch_timeout,
    };
    let started = std::time::SystemTime::now();
    let rows =
        punchline_lab::bench::first_line::run(&spec, &peer, &raw, |line| eprintln!("{line}"))
            .context("running the benchmark")?;
    let table = punchline_lab::bench::first_line::table(&spec, &rows);
    print!("{table}");
    if let Some(path) = &args.out {
        let note = args
            .note
            .as_ref()
            .map_or(String::new(), |n| format!("{n}\n\n"));
        let text = format!(
            "# First-line benchmark (NAT lab)\n\nCommand: `{}` (commit {}, {} cores), started {}, took {} s.\n\n{note}{table}",
            bench_command(args, path),
            git_commit(),
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            humantime::format_rfc3339_seconds(started),
            started.elapsed().map_or(0, |d| d.as_secs()),
        );
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn bench(args: &BenchArgs) -> anyhow::Result<()> {
    if args.first_line {
        return bench_first_line(args);
    }
    let peer = punchline_lab::scenario::peer_binary(args.peer.clone())?;
    let mut tables = String::new();
    for spec in args.specs()? {
        let results = punchline_lab::bench::run(&spec, &peer, |line| eprintln!("{line}"))
            .context("running the benchmark")?;
        let table = punchline_lab::bench::table(&spec, &results);
        print!("{table}");
        tables.push_str(&table);
        tables.push('\n');
    }
    let table = tables;
    if let Some(path) = &args.out {
        let commit = std::process::Command::new("git")
            .args(["rev-parse", "--short", "HEAD"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        let runs = if args.runs == 20 {
            String::new()
        } else {
            format!(" --runs {}", args.runs)
        };
        let note = args
            .note
            .as_ref()
            .map_or(String::new(), |n| format!("{n}\n\n"));
        let text = format!(
            "# Punch benchmark (NAT lab)\n\nCommand: `sudo target/release/lab bench{runs} --out {}` \
             (commit {commit}, {} cores).\n\n{note}{table}",
            path.display(),
            std::thread::available_parallelism().map_or(0, |n| n.get()),
        );
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

impl UpArgs {
    fn config(&self) -> LabConfig {
        let shape = |ms: u64, pct: f64| LinkShape {
            delay: Duration::from_millis(ms),
            loss: pct / 100.0,
        };
        let wan = WanConfig {
            a: shape(self.delay_a, self.loss_a),
            b: shape(self.delay_b, self.loss_b),
            rv: shape(self.delay_rv, self.loss_rv),
            probe: LinkShape::NONE,
            detour: (self.delay_rv_b > 0).then(|| punchline_lab::wan::Detour {
                from: punchline_lab::Link::Rv,
                to: punchline_lab::Link::B,
                delay: Duration::from_millis(self.delay_rv_b),
            }),
        };
        let base = if self.same_lan {
            LabConfig::same_lan(self.a)
        } else {
            LabConfig::new(self.a, self.b)
        };
        let base = base.with_wan(wan);
        let base = if self.overlapping_lans {
            base.with_overlapping_lans()
        } else {
            base
        };
        let base = if self.port_mapping.is_empty() {
            base
        } else {
            let has = |p| {
                self.port_mapping.contains(&p) || self.port_mapping.contains(&MappingProtocol::All)
            };
            base.with_port_mapping(punchline_lab::portmap::Protocols {
                nat_pmp: has(MappingProtocol::NatPmp),
                pcp: has(MappingProtocol::Pcp),
                upnp: has(MappingProtocol::Upnp),
            })
        };
        if self.ipv6_only {
            base.with_ipv6_only()
        } else if self.ipv6 {
            base.with_ipv6()
        } else {
            base
        }
    }
}

fn up(args: &UpArgs) -> anyhow::Result<()> {
    // Block the signals before any thread exists, so every thread inherits the
    // mask and the main thread alone receives them through sigwait.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block().context("blocking SIGINT/SIGTERM")?;

    let lab = Lab::build(&args.config()).context("building the lab")?;
    print!("{}", lab.describe());
    println!(
        "run a program inside a host: ip netns exec {} <program>",
        lab.netns(punchline_lab::Host::A)
    );
    println!("press Ctrl-C to tear down");
    let signal = signals.wait().context("waiting for a signal")?;
    eprintln!("{signal:?}: tearing down {}", lab.id());
    lab.shutdown().context("tearing down the lab")?;
    Ok(())
}

fn cleanup(all: bool) -> anyhow::Result<()> {
    let removed = netns::cleanup_stale(all).context("removing stale namespaces")?;
    if removed.is_empty() {
        println!("no stale lab namespaces");
    }
    for name in removed {
        println!("removed {name}");
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Cmd::Bench(_)) {
        // The benchmark reads pairing instants from the rendezvous' events.
        punchline_lab::scenario::install_pair_clock();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .with_writer(std::io::stderr)
            .init();
    }
    let result = match &cli.command {
        Cmd::Up(args) => up(args),
        Cmd::Bench(args) => bench(args),
        Cmd::BenchResilience(args) => bench_resilience(args),
        Cmd::Cleanup { all } => cleanup(*all),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("lab: {err:#}");
            ExitCode::FAILURE
        }
    }
}
