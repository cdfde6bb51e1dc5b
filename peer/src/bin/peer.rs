//! `peer`: chat with another peer over a direct TCP link punched through NATs.
//!
//! Whatever it prints that may hold text from elsewhere (an error that quotes the
//! rendezvous, the doctor's report) goes through [`shown`] first: the library
//! sanitises such text where it comes in, and this is the last line of defence.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use punchline_peer::config::FileConfig;
use punchline_peer::ui::sanitize_lines;
use punchline_peer::{default_name, run, ChatEnd, Mode, Options};
use punchline_proto::pacing::RetryPolicy;

/// Chat directly with another host, even when both are behind NATs.
///
/// One user runs `peer` without a code and passes the printed code to the other,
/// who runs `peer CODE`. The rendezvous server introduces the two peers; then both
/// connect to each other at the same moment from a fixed local port, so a direct
/// TCP link forms through both NATs (TCP simultaneous open), and the chat runs over
/// it, end-to-end encrypted with a key only holders of the code can derive. If no
/// direct link forms, the rendezvous relays the encrypted chat instead; if the link
/// drops, both sides reconnect and resume without losing a line.
///
/// After a chat, either side can keep the other as a contact (`/save NAME`, or
/// `--save NAME`); from then on `peer @NAME` on both hosts meets with no code,
/// authenticated by both sides' identity keys. `peer contacts` lists, renames
/// and forgets them.
///
/// Lines typed are sent; lines received are shown as `NAME: TEXT`. When stdin is
/// not a terminal, each input line is one message and the peer exits once all of
/// them are delivered. `peer doctor` checks whether direct chats will work from
/// this host.
#[derive(Parser, Debug)]
#[command(version, about, long_about, args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,

    /// Rendezvous server, HOST[:PORT] (default port 7425) [default: `server` in
    /// ~/.config/punchline/config.toml; with none, this peer runs a rendezvous
    /// itself and prints the command for the other host]
    #[arg(long, env = "PUNCHLINE_SERVER", value_name = "HOST:PORT")]
    server: Option<String>,

    /// With no server given: the port of the rendezvous this peer runs itself
    /// (and its probe port, one above)
    #[arg(long, value_name = "N", default_value_t = punchline_peer::hosted::HOSTED_PORT)]
    serve_port: u16,

    /// Fixed local port for the rendezvous connection and every punch attempt
    /// [default: one the OS picks, then kept for everything]
    #[arg(long, value_name = "N")]
    port: Option<u16>,

    /// Name shown to the other side [default: `name` in
    /// ~/.config/punchline/config.toml, else your login name]
    #[arg(long, value_name = "NAME")]
    name: Option<String>,

    /// Seconds to keep trying to connect directly before giving up (1 to 30:
    /// the rendezvous waits 60 s for the outcome)
    #[arg(long, value_name = "SECS", default_value_t = punchline_proto::pacing::PUNCH_DEADLINE.as_secs())]
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

    /// Words in a new code: each adds 8 bits against guessing (2 words: an
    /// attacker gets one guess with a 1 in 65,536 chance, for the whole chat)
    #[arg(long, value_name = "N", default_value_t = punchline_proto::codes::DEFAULT_WORDS)]
    words: usize,

    /// Prefix every shown line with the local time
    #[arg(long)]
    timestamps: bool,

    /// If no direct link forms, give up rather than chat through the rendezvous
    /// (a relayed chat is still end-to-end encrypted: the rendezvous sees only
    /// ciphertext, and when, and how much)
    #[arg(long)]
    no_relay: bool,

    /// Do not ask the router to forward the local port (PCP, NAT-PMP or
    /// UPnP-IGD). By
    /// default the peer asks, beside the meeting and without waiting for it,
    /// for a short lease that it deletes once the link is up (or on exit)
    #[arg(long)]
    no_port_mapping: bool,

    /// While relayed, seconds between tries for a direct link
    #[arg(long, value_name = "SECS", default_value_t = punchline_peer::UPGRADE_INTERVAL.as_secs(), hide = true)]
    upgrade_interval: u64,

    /// Once the chat is up, keep the other side as a contact under NAME (as
    /// `/save NAME` does): later, `peer @NAME` meets them with no code
    #[arg(long, value_name = "NAME")]
    save: Option<String>,

    /// Do not keep typed lines in the history file (by default they are kept in
    /// $XDG_DATA_HOME/punchline/history, readable by you only)
    #[arg(long)]
    no_history: bool,

    /// The code the other side gave you, e.g. 7-guitar-orbit, or @NAME to meet
    /// a saved contact; without it, a new code is made and printed for you to
    /// pass on
    #[arg(value_name = "CODE | @NAME")]
    code: Option<String>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Check whether direct chats will work from this host, and why not: public
    /// address, NAT mapping, what happens to unsolicited connections, the kernel's
    /// simultaneous open, IPv6
    Doctor {
        /// Rendezvous server, HOST[:PORT] (default port 7425)
        #[arg(long, env = "PUNCHLINE_SERVER", value_name = "HOST:PORT")]
        server: Option<String>,

        /// Local port to test from [default: one the OS picks]
        #[arg(long, value_name = "N")]
        port: Option<u16>,

        /// The rendezvous' probe port [default: its port + 1]
        #[arg(long, value_name = "N")]
        probe_port: Option<u16>,
    },
    /// List your contacts (the other sides saved with `/save` or `--save`),
    /// rename or forget one. They live in $XDG_CONFIG_HOME/punchline
    /// (default ~/.config/punchline), readable by you only
    Contacts {
        #[command(subcommand)]
        action: Option<ContactsAction>,
    },
}

#[derive(clap::Subcommand, Debug)]
enum ContactsAction {
    /// List the contacts and your own key (the default)
    List,
    /// Give a contact another name
    Rename {
        /// Its name now
        old: String,
        /// Its new name
        new: String,
    },
    /// Forget a contact: `peer @NAME` no longer meets it
    Forget {
        /// Its name
        name: String,
    },
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
    match args.command {
        Some(Command::Doctor {
            server,
            port,
            probe_port,
        }) => {
            let server = match server {
                Some(server) => server,
                None => match settings() {
                    Ok(FileConfig {
                        server: Some(server),
                        ..
                    }) => server,
                    Ok(_) => return no_server(),
                    Err(code) => return code,
                },
            };
            return doctor(&server, port.unwrap_or(0), probe_port);
        }
        Some(Command::Contacts { action }) => {
            return contacts(action.unwrap_or(ContactsAction::List))
        }
        None => {}
    }
    let file = match settings() {
        Ok(file) => file,
        Err(code) => return code,
    };
    // The server: the flag (or PUNCHLINE_SERVER), else the settings file,
    // else one run by this peer.
    let (server, host_port) = match args.server.or(file.server) {
        Some(server) => (server, None),
        None => (String::new(), Some(args.serve_port)),
    };
    let opts = Options {
        server,
        host_port,
        port: args.port.unwrap_or(0),
        name: args.name.or(file.name).unwrap_or_else(default_name),
        code: args.code,
        save: args.save,
        words: args.words,
        punch_timeout: Duration::from_secs(args.punch_timeout),
        lan_candidates: !args.no_lan,
        extra_candidates: args.candidate,
        probe_port: args.probe_port,
        retry: match args.naive_retry_ms {
            Some(ms) => RetryPolicy::Fixed(Duration::from_millis(ms)),
            None => RetryPolicy::Adaptive,
        },
        timestamps: args.timestamps,
        relay: !args.no_relay,
        port_mapping: !args.no_port_mapping,
        upgrade_interval: Duration::from_secs(args.upgrade_interval.max(1)),
        history: if args.no_history {
            None
        } else {
            punchline_peer::ui::default_history_path()
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
    let mapping = opts.port_mapping;
    let result = runtime.block_on(async {
        if !mapping {
            return run(opts, mode).await;
        }
        // Ctrl-C before the chat (while waiting, meeting, punching) ends the
        // program here, after deleting the port mapping it holds. In a piped
        // chat the chat handles it (a goodbye); in a terminal chat the line
        // editor reads Ctrl-C as a key, so a signal comes only when it has
        // stopped (the goodbye under way) or from `kill -INT`: it ends the
        // program here too, as it would with no handler at all.
        let piped = mode == Mode::Lines;
        let before_chat = async move {
            loop {
                if tokio::signal::ctrl_c().await.is_err() {
                    std::future::pending::<()>().await;
                }
                if !(piped && punchline_peer::chatting()) {
                    break;
                }
            }
        };
        tokio::select! {
            result = run(opts, mode) => result,
            () = before_chat => {
                punchline_peer::portmap::release_all().await;
                Ok(ChatEnd::Interrupted)
            }
        }
    });
    // Whatever ended the program, the port mappings it still holds go now
    // (a meeting's own deletion may still be under way: a second delete is
    // harmless), rather than with their lease.
    if mapping {
        runtime.block_on(punchline_peer::portmap::release_all());
    }
    // The input thread may still be blocked reading stdin: do not wait for it.
    runtime.shutdown_timeout(Duration::from_millis(100));
    match result {
        Ok(ChatEnd::WeLeft | ChatEnd::TheyLeft) => ExitCode::SUCCESS,
        Ok(ChatEnd::Interrupted) => ExitCode::from(130),
        Err(e) => {
            eprintln!("peer: {}", shown(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error as the user sees it: its whole chain (`{:#}`), sanitised line by
/// line (a diagnosis of several lines keeps its line breaks; no control, bidi or
/// format character reaches the terminal).
fn shown(e: &dyn std::fmt::Display) -> String {
    sanitize_lines(&format!("{e:#}"))
}

fn no_server() -> ExitCode {
    eprintln!(
        "peer: no rendezvous server given: use --server HOST:PORT, set PUNCHLINE_SERVER, or set \
         `server` in ~/.config/punchline/config.toml"
    );
    ExitCode::from(2)
}

/// The settings file, or the exit code of a clear error about it.
fn settings() -> Result<FileConfig, ExitCode> {
    FileConfig::load().map_err(|e| {
        eprintln!("peer: {}", shown(&e));
        ExitCode::from(2)
    })
}

/// `peer contacts`: lists, renames or forgets.
fn contacts(action: ContactsAction) -> ExitCode {
    use punchline_peer::contacts::{config_dir, fingerprint, Book, Identity, IDENTITY_FILE};
    let done = config_dir().and_then(|dir| match action {
        ContactsAction::List => {
            let book = Book::load(&dir)?;
            let identity = if dir.join(IDENTITY_FILE).exists() {
                Some(Identity::load_or_create(&dir)?.0)
            } else {
                None
            };
            match identity {
                Some(identity) => println!("your key: {}", fingerprint(&identity.public())),
                None => println!("your key: none yet (made at your first chat)"),
            }
            if book.contacts.is_empty() {
                println!(
                    "no contacts yet: during a chat with a code, /save NAME keeps the other side"
                );
            }
            for c in &book.contacts {
                println!(
                    "@{:<20} key {}  saved {}",
                    c.name,
                    fingerprint(&c.key),
                    saved_date(c.saved)
                );
            }
            Ok(())
        }
        ContactsAction::Rename { old, new } => {
            Book::update(&dir, |book| {
                book.rename(old.trim_start_matches('@'), new.trim_start_matches('@'))
            })?;
            println!("renamed {old} to {new}");
            Ok(())
        }
        ContactsAction::Forget { name } => {
            let gone = Book::update(&dir, |book| book.forget(name.trim_start_matches('@')))?;
            println!("forgot {} (key {})", gone.name, fingerprint(&gone.key));
            Ok(())
        }
    });
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("peer: {}", shown(&e));
            ExitCode::FAILURE
        }
    }
}

/// A day, `YYYY-MM-DD` (UTC), from seconds since 1970.
fn saved_date(secs: u64) -> String {
    // Days since 1970 to a civil date (the proleptic Gregorian calendar).
    let days = (secs / 86_400) as i64 + 719_468;
    let era = days.div_euclid(146_097);
    let doe = days.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// `peer doctor`: prints the findings and the verdict; exit status 0 when direct
/// chats should work, 1 when they cannot or the rendezvous is unreachable.
fn doctor(server: &str, port: u16, probe_port: Option<u16>) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("peer: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "checking this host against the rendezvous {} (takes a few seconds)…",
        sanitize_lines(server)
    );
    match runtime.block_on(punchline_peer::doctor::examine(server, port, probe_port)) {
        Ok(findings) => {
            print!("{}", sanitize_lines(&findings.report()));
            use punchline_peer::doctor::Outlook;
            match findings.outlook() {
                Outlook::Good | Outlook::Likely => ExitCode::SUCCESS,
                Outlook::LanOnly | Outlook::Impossible => ExitCode::FAILURE,
            }
        }
        Err(e) => {
            eprintln!("peer: {}", shown(&e));
            ExitCode::FAILURE
        }
    }
}
