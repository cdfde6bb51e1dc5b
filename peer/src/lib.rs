//! The punchline peer: meets the other peer through the rendezvous, punches a
//! direct TCP link by simultaneous open from one fixed local port, and chats.
//!
//! 1. Bind the fixed port and connect to the rendezvous from it ([`client`]).
//! 2. Say hello (nameplate, name, LAN candidates, SPAKE2 message); learn our
//!    public address; wait for the other peer and the synchronised go.
//! 3. Punch on all candidates at once; keep the one link both sides agree on
//!    ([`punch`]). The rendezvous connection stays open until then. If no link
//!    forms, ask the rendezvous to relay instead ([`client::Rendezvous::relay`]).
//! 4. Confirm the code and encrypt with Noise over the link ([`secure`]).
//! 5. Chat over the link ([`chat`]), typed and shown by [`ui`]. When the link
//!    drops, steps 2 to 4 run again by the chat's session and the chat resumes;
//!    while relayed, the peers try for a direct link now and then.
//!
//! [`doctor`] checks a host's NAT and kernel against a rendezvous, without a chat.

pub mod chat;
pub mod client;
pub mod doctor;
pub mod error;
pub mod net;
pub mod punch;
pub mod secure;
pub mod ui;

use std::net::SocketAddr;
use std::time::Duration;

use punchline_proto::{
    codes::Code, sanitize_for_terminal, validate_name, Chat, Hello, Introduction, Mapping,
    PunchOutcome, Role, SealedCandidates, MAX_CANDIDATES, PROTOCOL_VERSION,
};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

pub use chat::ChatEnd;
pub use error::PeerError;

/// Port of the rendezvous when the server address names none.
pub use punchline_proto::defaults::DEFAULT_PORT as DEFAULT_SERVER_PORT;

/// The rendezvous' probe port is its main port plus this.
pub use punchline_proto::defaults::PROBE_PORT_OFFSET;

/// How the user talks to the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// stdin is a terminal: line editor, history, commands.
    Terminal,
    /// stdin is a pipe or file: one message per line.
    Lines,
}

/// Everything the user chose.
#[derive(Debug, Clone)]
pub struct Options {
    /// Rendezvous `HOST[:PORT]`.
    pub server: String,
    /// Fixed local port (0: the OS picks one, kept for the meeting and the
    /// punch; a new link after a drop then gets a fresh one).
    pub port: u16,
    /// Name shown to the other side.
    pub name: String,
    /// The code as typed; `None` to start a new one.
    pub code: Option<String>,
    /// Words in a new code.
    pub words: usize,
    /// How long to try punching.
    pub punch_timeout: Duration,
    /// Offer this host's interface addresses as candidates.
    pub lan_candidates: bool,
    /// More addresses to offer (e.g. a port forwarded on the router).
    pub extra_candidates: Vec<SocketAddr>,
    /// How punch attempts are paced.
    pub retry: punchline_proto::punch::RetryPolicy,
    /// The rendezvous' probe port (default: its port + 1).
    pub probe_port: Option<u16>,
    /// Prefix shown lines with the local time.
    pub timestamps: bool,
    /// Where the terminal keeps typed lines between chats (`None`: nowhere).
    pub history: Option<std::path::PathBuf>,
    /// When no direct link forms, chat through the rendezvous (still end-to-end
    /// encrypted) if it relays.
    pub relay: bool,
    /// While relayed, how often to try for a direct link again.
    pub upgrade_interval: Duration,
}

/// Parses a code as typed.
pub fn parse_code(typed: &str) -> Result<Code, PeerError> {
    Code::parse(typed)
        .map_err(|e| PeerError::Usage(format!("invalid code {:?}: {e}", typed.trim())))
}

/// A display name from the login name, made valid (the login name may be long or
/// odd); "anonymous" when there is none.
pub fn default_name() -> String {
    let login = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_default();
    let name: String = login
        .chars()
        .filter(|c| !c.is_control())
        .take(punchline_proto::MAX_NAME_CHARS)
        .collect();
    if validate_name(&name).is_ok() {
        name
    } else {
        "anonymous".to_owned()
    }
}

/// `HOST:PORT` from what the user typed, adding [`DEFAULT_SERVER_PORT`] when no
/// port is given (`example.org`, `192.0.2.1`, `2001:db8::1`, `[2001:db8::1]`).
pub fn with_default_port(server: &str) -> String {
    let s = server.trim();
    if s.parse::<SocketAddr>().is_ok() {
        return s.to_owned();
    }
    if s.starts_with('[') && s.ends_with(']') {
        return format!("{s}:{DEFAULT_SERVER_PORT}");
    }
    if s.parse::<std::net::Ipv6Addr>().is_ok() {
        return format!("[{s}]:{DEFAULT_SERVER_PORT}");
    }
    match s.rsplit_once(':') {
        Some((_, port)) if port.parse::<u16>().is_ok() => s.to_owned(),
        _ => format!("{s}:{DEFAULT_SERVER_PORT}"),
    }
}

/// How long a peer whose link dropped keeps trying to get a new one before it
/// gives up (and says which lines were not delivered).
pub const RESUME_DEADLINE: Duration = Duration::from_secs(120);

/// While relayed, how often the peers try again for a direct link (a NAT's
/// behaviour or the network can change: a laptop moves, a firewall rule goes).
pub const UPGRADE_INTERVAL: Duration = Duration::from_secs(60);

/// Pause between two attempts to re-establish a link.
const RESUME_RETRY_PAUSE: Duration = Duration::from_secs(1);

/// Runs a whole session: meet, punch, chat; meet and punch again whenever the
/// link drops. Returns how the chat ended.
pub async fn run(opts: Options, mode: Mode) -> Result<ChatEnd, PeerError> {
    let typed_code = opts.code.as_deref().map(parse_code).transpose()?;
    if !(punchline_proto::codes::MIN_WORDS..=punchline_proto::codes::MAX_WORDS)
        .contains(&opts.words)
    {
        return Err(PeerError::Usage(format!(
            "--words must be {} to {}",
            punchline_proto::codes::MIN_WORDS,
            punchline_proto::codes::MAX_WORDS
        )));
    }
    validate_name(&opts.name).map_err(|e| PeerError::Usage(e.to_string()))?;
    let mut status = ui::StderrStatus;
    use chat::Output as _;

    // 1. Rendezvous, from the fixed port.
    let server = with_default_port(&opts.server);
    let mut rendezvous = client::Rendezvous::connect(&server, opts.port).await?;
    let port = rendezvous.local_port;
    tracing::info!(server = %rendezvous.server, port, "connected to the rendezvous");
    let code = match typed_code {
        Some(code) => code,
        None => {
            let nameplate = rendezvous.allocate().await?;
            let mut random = [0u8; punchline_proto::codes::MAX_WORDS];
            getrandom::fill(&mut random).map_err(|e| {
                PeerError::io("no randomness for the code", std::io::Error::other(e))
            })?;
            let code = Code::generate(&nameplate, &random, opts.words);
            status.status(&format!("your code: {code}"));
            status.status(&format!(
                "on the other host, run:  peer --server {} {code}",
                opts.server.trim()
            ));
            code
        }
    };

    // 2.-4. Meet, punch, secure.
    let met = meet(&opts, rendezvous, Keying::Code(&code), &mut status).await?;
    let their_name = sanitize_for_terminal(&met.link.their_introduction().name);
    status.status(&format!("connected to {their_name}: {}", met.describe()));
    let words = met.link.verification().map(str::to_owned);
    if let Some(words) = &words {
        status.status(&chat::confirmed(&their_name, words));
    }

    // 5. Chat, over new links as needed.
    let mut ctx = chat::ChatContext {
        their_name,
        our_name: opts.name.clone(),
        facts: met.facts(),
        stats: chat::ChatStats::default(),
        reliable: chat::Reliable::default(),
        rtt: None,
        words,
    };
    let style = ui::Style::for_stdout(opts.timestamps);
    let (tx, mut rx) = mpsc::channel(ui::INPUT_CHANNEL);
    let mut terminal = None;
    let mut lines_out = ui::LinesOutput { style };
    match mode {
        Mode::Terminal => {
            let term = ui::Terminal::start(tx, style, opts.history.clone())
                .map_err(|e| PeerError::io("cannot start the line editor", e))?;
            terminal = Some(term);
        }
        Mode::Lines => {
            ui::spawn_stdin_lines(tx.clone());
            tokio::spawn(async move {
                if tokio::signal::ctrl_c().await.is_ok() {
                    let _ = tx.send(chat::Input::Interrupted).await;
                }
            });
        }
    }
    let result = {
        let output: &mut dyn chat::Output = match terminal.as_mut() {
            Some(term) => term,
            None => &mut lines_out,
        };
        converse(&opts, met, &mut ctx, &mut rx, output).await
    };
    if let Some(term) = terminal.as_mut() {
        term.restore();
    }
    let end = result?;
    let summary = format!(
        "{} lines sent, {} received",
        ctx.stats.sent, ctx.stats.received
    );
    match end {
        ChatEnd::TheyLeft => status.status(&format!("{} left ({summary})", ctx.their_name)),
        ChatEnd::WeLeft | ChatEnd::Interrupted => {
            status.status(&format!("bye ({summary}, all delivered)"))
        }
    }
    Ok(end)
}

/// How many later links may fail to authenticate before the chat ends: the
/// first failure is shown and one more try is made; a second means someone keeps
/// answering in the other peer's place.
pub const MAX_AUTH_FAILURES: u32 = 2;

/// The chat over `met`'s link, and over a new link (met again through the
/// rendezvous, in the chat's own room and keyed by its secret) each time a link
/// drops.
async fn converse(
    opts: &Options,
    mut met: Met,
    ctx: &mut chat::ChatContext,
    input: &mut mpsc::Receiver<chat::Input>,
    output: &mut dyn chat::Output,
) -> Result<ChatEnd, PeerError> {
    let keys = met.chat.clone();
    let mut resuming = false;
    let mut auth_failures = 0;
    // A direct link being tried for in the background while relayed.
    let mut attempt: Option<Background> = None;
    let mut next_upgrade = Instant::now() + opts.upgrade_interval;
    loop {
        // On a relayed link the leader asks, now and then, to try for a direct one.
        let upgrade_at = (met.is_relayed() && met.go.role == Role::Leader && attempt.is_none())
            .then_some(next_upgrade);
        let ended = chat::chat(
            &mut met.link,
            ctx,
            input,
            output,
            resuming,
            upgrade_at,
            attempt.as_mut().map(|a| &mut a.result),
        )
        .await?;
        resuming = false;
        let why = match ended {
            chat::LinkEnd::Chat(end) => return Ok(end),
            chat::LinkEnd::Down(why) => why,
            chat::LinkEnd::TryDirect => {
                if met.go.role == Role::Leader {
                    let _ = met.link.send(&Chat::TryDirect).await;
                }
                next_upgrade = Instant::now() + opts.upgrade_interval;
                if attempt.is_none() {
                    attempt = Some(try_direct(opts, &keys));
                }
                continue;
            }
            chat::LinkEnd::Replaced(Ok(direct)) => {
                // The relayed link goes quiet now, but stays open a little: the
                // other side may still be finishing its switch, and must not see
                // its old link drop meanwhile.
                let old = std::mem::replace(&mut met, direct);
                tokio::spawn(async move {
                    tokio::time::sleep(chat::ACK_TIMEOUT).await;
                    drop(old);
                });
                attempt = None;
                output.status(&format!("switched to a {}", met.describe()));
                ctx.facts = met.facts();
                resuming = true;
                continue;
            }
            chat::LinkEnd::Replaced(Err(e)) => {
                attempt = None;
                authentication_failed(&e, &mut auth_failures, ctx, output)?;
                tracing::info!(error = %e, "still no direct link; staying relayed");
                continue;
            }
        };
        // The background try must not meet our own reconnect in the chat's room.
        attempt = None;
        met.link.abort();
        let dropped = Instant::now();
        output.status(&format!(
            "link to {} dropped ({why}); reconnecting through the rendezvous…",
            ctx.their_name
        ));
        let symmetric_here = met.mapping.is_symmetric();
        met = relink(
            opts,
            &keys,
            symmetric_here,
            &mut auth_failures,
            ctx,
            input,
            output,
        )
        .await?;
        output.status(&format!(
            "link back after {:.1} s: {}",
            dropped.elapsed().as_secs_f64(),
            met.describe()
        ));
        ctx.facts = met.facts();
        resuming = true;
        next_upgrade = Instant::now() + opts.upgrade_interval;
    }
}

/// Shows a later link's failed authentication (`e`) to the user at once, and
/// ends the chat (`Err`) when it is the [`MAX_AUTH_FAILURES`]th. Any other error
/// passes as `Ok`.
fn authentication_failed(
    e: &PeerError,
    failures: &mut u32,
    ctx: &chat::ChatContext,
    output: &mut dyn chat::Output,
) -> Result<(), PeerError> {
    let PeerError::NotAuthenticated(why) = e else {
        return Ok(());
    };
    *failures += 1;
    tracing::info!(
        failures = *failures,
        why,
        "a new link failed authentication"
    );
    if *failures >= MAX_AUTH_FAILURES {
        return Err(undelivered(
            PeerError::NotAuthenticated(format!(
                "a new link failed authentication {failures} times ({why}): someone who does not \
                 hold this chat's secret keeps answering in {}'s place — the rendezvous, or someone \
                 on the path to it, is interfering. The chat ends here; start a new one with a new \
                 code, and compare the /verify words",
                ctx.their_name
            )),
            ctx,
        ));
    }
    output.status(&format!(
        "warning: a new link failed authentication ({why}): someone who does not hold this \
         chat's secret answered in {}'s place — the rendezvous, or someone on the path to it, may \
         be interfering. Nothing was sent to it. One more try; a second failure ends the chat.",
        ctx.their_name
    ));
    Ok(())
}

/// Longest a background try for a direct link may take: the meeting at the
/// rendezvous (the other side asks at the same moment) and the punch.
const TRY_DIRECT_TIMEOUT: Duration = Duration::from_secs(30);

/// A try for a direct link running in the background; dropping it stops it
/// (so it can never meet our own reconnect in the chat's room).
struct Background {
    result: oneshot::Receiver<Result<Met, PeerError>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Background {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts a try for a direct link in the background: meet the other peer again
/// in the chat's room, from a fresh port, punch, secure; no relay this time.
fn try_direct(opts: &Options, keys: &ChatKeys) -> Background {
    let (tx, rx) = oneshot::channel();
    let opts = Options {
        relay: false,
        ..opts.clone()
    };
    let keys = keys.clone();
    let task = tokio::spawn(async move {
        let tried = tokio::time::timeout(TRY_DIRECT_TIMEOUT, async {
            let server = with_default_port(&opts.server);
            let rendezvous = client::Rendezvous::connect(&server, 0).await?;
            meet(&opts, rendezvous, Keying::Chat(&keys), &mut QuietStatus).await
        })
        .await
        .unwrap_or_else(|_| Err(PeerError::Timeout("no direct link in time".into())));
        let _ = tx.send(tried);
    });
    Background { result: rx, task }
}

/// Meets the other peer again in the chat's room until a new link is up, for at
/// most [`RESUME_DEADLINE`]. Lines typed meanwhile are kept for the new link;
/// leaving meanwhile ends the chat with the count of lines not delivered. A new
/// link that fails to authenticate is shown at once, and ends the chat at the
/// [`MAX_AUTH_FAILURES`]th.
async fn relink(
    opts: &Options,
    keys: &ChatKeys,
    symmetric_here: bool,
    auth_failures: &mut u32,
    ctx: &mut chat::ChatContext,
    input: &mut mpsc::Receiver<chat::Input>,
    output: &mut dyn chat::Output,
) -> Result<Met, PeerError> {
    let server = with_default_port(&opts.server);
    // A new link gets a new local port: the old link's addresses still have
    // state on the path. A NAT keeps the old flow's entry in its CLOSE state as
    // long as resets keep coming, and Linux conntrack takes a SYN from outside
    // for such an entry as invalid, so it never reaches the host; each side's
    // router answers the other's SYNs with resets, which keep the entries
    // alive, and the two sides never meet on those ports again. Only when our
    // NAT gives every destination its own port does the user's chosen port (a
    // forwarded one) matter more; then it is kept.
    let port = if symmetric_here { opts.port } else { 0 };
    let deadline = Instant::now() + RESUME_DEADLINE;
    let (mut tries, mut last) = (0u32, None::<String>);
    loop {
        let tried = async {
            let rendezvous = client::Rendezvous::connect(&server, port).await?;
            meet(opts, rendezvous, Keying::Chat(keys), &mut QuietStatus).await
        };
        let tried = tokio::time::timeout_at(deadline, tried);
        tokio::pin!(tried);
        // Lines typed while no link carries them.
        let result = loop {
            tokio::select! {
                result = &mut tried => break result,
                typed = input.recv() => match typed {
                    Some(chat::Input::Line(text)) => {
                        if let Err(e) = punchline_proto::validate_line(&text) {
                            output.status(&format!("not sent: {e}"));
                        } else {
                            ctx.reliable.push(text);
                            ctx.stats.sent += 1;
                            output.status("(kept; it goes out once the link is back)");
                        }
                    }
                    Some(chat::Input::Info) => output.status("no link right now: reconnecting"),
                    Some(chat::Input::Verify) => ctx.show_words(output),
                    Some(chat::Input::Nick(_)) => output.status("name not changed: no link right now"),
                    Some(chat::Input::Quit | chat::Input::Interrupted) | None => {
                        return Err(undelivered(
                            PeerError::LinkLost {
                                name: ctx.their_name.clone(),
                                why: "you left while reconnecting".into(),
                            },
                            ctx,
                        ));
                    }
                },
            }
        };
        match result {
            Ok(Ok(met)) => return Ok(met),
            Ok(Err(e)) => {
                authentication_failed(&e, auth_failures, ctx, output)?;
                tracing::info!(error = %e, "no new link yet");
                tries += 1;
                last = Some(e.to_string());
                tokio::time::sleep(RESUME_RETRY_PAUSE).await;
            }
            Err(_) => {
                // What the tries met tells a vanished peer (the rendezvous
                // waits in vain) from meetings that went wrong (someone in the
                // chat's room that never completes a handshake, say).
                let detail = match &last {
                    Some(last) => format!(
                        " ({tries} tr{} failed; the last: {last})",
                        if tries == 1 { "y" } else { "ies" }
                    ),
                    None => String::new(),
                };
                return Err(undelivered(
                    PeerError::Timeout(format!(
                        "no new link within {} s{detail}",
                        RESUME_DEADLINE.as_secs()
                    )),
                    ctx,
                ));
            }
        }
    }
}

/// `e`, with the count of lines the other side did not confirm.
fn undelivered(e: PeerError, ctx: &chat::ChatContext) -> PeerError {
    match ctx.reliable.unacked() {
        0 => e,
        n => PeerError::LinkLost {
            name: ctx.their_name.clone(),
            why: format!(
                "{e}; {n} line{} not confirmed as delivered",
                if n == 1 { "" } else { "s" }
            ),
        },
    }
}

/// Status messages of a meeting that are not worth showing during a reconnect.
struct QuietStatus;

impl chat::Output for QuietStatus {
    fn incoming(&mut self, _: &str, _: &str) {}
    fn status(&mut self, message: &str) {
        tracing::info!(message, "reconnect");
    }
}

/// How the link of a met peer runs.
enum Path {
    /// Punched.
    Direct {
        remote: SocketAddr,
        kind: punch::CandidateKind,
        attempts: u32,
        elapsed_ms: u128,
    },
    /// Through the rendezvous, because the punch failed for this reason.
    Relayed { why: String },
}

/// What a meeting authenticates with.
#[derive(Clone, Copy)]
enum Keying<'a> {
    /// The chat's first meeting: the code, by SPAKE2 through the rendezvous.
    Code(&'a Code),
    /// A later meeting of the chat: its secret.
    Chat(&'a ChatKeys),
}

/// What a chat keeps from its first link for every later one.
#[derive(Clone)]
struct ChatKeys {
    /// The chat's secret (from the code's key and the first handshake).
    secret: secure::Secret,
    /// Our role on the first link, fixed for the chat.
    role: Role,
}

/// A met peer: the go and our view of the meeting, and the secured link.
struct Met {
    go: punchline_proto::Go,
    observed: SocketAddr,
    mapping: Mapping,
    local_port: u16,
    path: Path,
    link: secure::SecureLink,
    chat: ChatKeys,
}

impl Met {
    fn is_relayed(&self) -> bool {
        matches!(self.path, Path::Relayed { .. })
    }

    fn describe(&self) -> String {
        match &self.path {
            Path::Direct {
                remote,
                kind,
                attempts,
                elapsed_ms,
            } => format!(
                "direct link to {remote} ({}), {elapsed_ms} ms after go, {attempts} attempt{}",
                kind.describe(),
                if *attempts == 1 { "" } else { "s" },
            ),
            Path::Relayed { why } => format!(
                "relayed via the rendezvous (end-to-end encrypted; it sees only ciphertext): direct connection failed because {why}"
            ),
        }
    }

    /// What `/info` shows about this link.
    fn facts(&self) -> Vec<(String, String)> {
        let (path, addresses) = match (&self.path, self.link.addresses()) {
            (
                Path::Direct {
                    kind, elapsed_ms, ..
                },
                Some((local, remote)),
            ) => (
                format!(
                    "direct TCP link ({}), {elapsed_ms} ms to punch",
                    kind.describe()
                ),
                format!("{local} (here) <-> {remote} (there)"),
            ),
            (Path::Direct { remote, .. }, None) => {
                ("direct TCP link".to_owned(), remote.to_string())
            }
            (Path::Relayed { why }, _) => (
                format!("relayed via the rendezvous (direct connection failed because {why})"),
                "through the rendezvous; the other side's public address is below".to_owned(),
            ),
        };
        vec![
            ("path".to_owned(), path),
            ("addresses".to_owned(), addresses),
            (
                "you".to_owned(),
                format!(
                    "public address {}; {}",
                    self.observed,
                    describe_mapping(self.mapping, Some(self.local_port), self.observed)
                ),
            ),
            (
                "other side".to_owned(),
                format!(
                    "public address {}; {}",
                    self.go.peer.observed,
                    describe_mapping(self.go.peer.mapping, None, self.go.peer.observed)
                ),
            ),
            (
                "encryption".to_owned(),
                format!(
                    "{} (key from the code by SPAKE2 on the first link, from the chat's secret on later ones)",
                    secure::NOISE_PARAMS,
                ),
            ),
        ]
    }
}

/// Probe, hello and wait on `rendezvous`, then punch and secure the link:
/// steps 2 to 4 of a session. With [`Keying::Chat`], the peers meet again in the
/// chat's room and authenticate with its secret (the code is not used again).
async fn meet(
    opts: &Options,
    mut rendezvous: client::Rendezvous,
    keying: Keying<'_>,
    status: &mut (dyn chat::Output + Send),
) -> Result<Met, PeerError> {
    let port = rendezvous.local_port;
    let probe_port = opts
        .probe_port
        .unwrap_or_else(|| rendezvous.server.port().wrapping_add(PROBE_PORT_OFFSET));
    let probe_observed = rendezvous.probe(probe_port).await;
    let (exchange, hello) = match keying {
        Keying::Code(code) => {
            let exchange = secure::KeyExchange::start(code);
            let hello = Hello {
                version: PROTOCOL_VERSION,
                nameplate: code.nameplate.clone(),
                probe_observed,
                pake: exchange.message.clone(),
                resume: None,
            };
            (Some(exchange), hello)
        }
        Keying::Chat(keys) => {
            let hello = Hello {
                version: PROTOCOL_VERSION,
                nameplate: String::new(),
                probe_observed,
                pake: Vec::new(),
                resume: Some(keys.secret.resume_room()),
            };
            (None, hello)
        }
    };
    let (observed, mapping) = rendezvous.hello(hello).await?;
    if exchange.is_some() {
        status.status(&format!(
            "waiting for the other side to join with the code (your public address: {observed}, local port {port})"
        ));
    }
    if let Mapping::DependsOnDestination { first, second } = mapping {
        status.status(&format!(
            "warning: your NAT gives each destination its own public port (the rendezvous saw {first} and {second}): \
             a direct connection can only work if the other side is on your LAN"
        ));
    }
    let go = rendezvous.wait_for_go().await?;
    let start = Instant::now();
    // From here on, in a first meeting, the code has been handed to whoever
    // joined: whatever fails now, it must not be used again.
    let after_go = async move {
        let (secret, chat_role) = match (exchange, keying) {
            (Some(exchange), _) => (exchange.finish(&go.peer.pake)?, go.role),
            (None, Keying::Chat(keys)) => (keys.secret.clone(), keys.role),
            (None, Keying::Code(_)) => unreachable!("a first meeting always starts the exchange"),
        };
        tracing::info!(observed = %go.peer.observed, role = %go.role, "go");

        // Our candidates travel sealed: only the other peer can open them.
        let candidates = SealedCandidates {
            candidates: our_candidates(opts, port),
        };
        let sealed = secret.seal_candidates(go.role, &go.session, &candidates)?;
        if let Err(e) = rendezvous.send_sealed(sealed).await {
            tracing::debug!(error = %e, "could not send our candidates");
        }

        let params = punch::PunchParams {
            local_port: port,
            deadline: opts.punch_timeout,
            our_observed: observed,
            server: rendezvous.server,
            our_mapping: mapping,
            policy: opts.retry,
        };
        let punched =
            punch_with_their_candidates(&mut rendezvous, &go, &params, start, &secret).await;
        let ours = Introduction {
            name: opts.name.clone(),
            chat_role,
            // Filled in by the handshake.
            words_nonce: [0; 32],
        };
        let keep = |link: &secure::SecureLink| match keying {
            Keying::Code(_) => ChatKeys {
                secret: secret.chat(link.handshake_hash()),
                role: chat_role,
            },
            Keying::Chat(keys) => keys.clone(),
        };
        let punched = match punched {
            Ok(p) => p,
            Err(PeerError::PunchFailed {
                name,
                attempts,
                secs,
                diagnosis,
            }) if opts.relay => {
                let stream = match rendezvous.relay(attempts).await {
                    Ok(stream) => stream,
                    Err(refused) => {
                        return Err(PeerError::PunchFailed {
                            name,
                            attempts,
                            secs,
                            diagnosis: format!("{diagnosis}\nNo relay either: {refused}."),
                        })
                    }
                };
                let link =
                    tokio_util::codec::Framed::new(stream, punchline_proto::FrameCodec::new());
                let link = secure::SecureLink::handshake(link, go.role, &secret, &ours).await?;
                let why = first_sentence(&diagnosis);
                tracing::info!("relayed and encrypted");
                return Ok(Met {
                    observed,
                    mapping,
                    local_port: port,
                    path: Path::Relayed { why },
                    chat: keep(&link),
                    link,
                    go,
                });
            }
            Err(e) => {
                let attempts = match &e {
                    PeerError::PunchFailed { attempts, .. } => *attempts,
                    _ => 0,
                };
                rendezvous.finish(PunchOutcome::Failed { attempts }).await;
                return Err(e);
            }
        };
        let elapsed_ms = punched.elapsed.as_millis();
        tracing::info!(remote = %punched.remote, elapsed_ms, attempts = punched.attempts, "direct link up");
        // The report and the closing handshake with the rendezvous (a round trip to
        // it) go on beside the encryption handshake, not before it.
        tokio::spawn(rendezvous.finish(PunchOutcome::Direct {
            public: punched.kind == punch::CandidateKind::Public,
            attempts: punched.attempts,
            elapsed_ms: elapsed_ms.try_into().unwrap_or(u32::MAX),
        }));
        let link = secure::SecureLink::handshake(punched.link, go.role, &secret, &ours).await?;
        tracing::info!("encrypted");
        Ok(Met {
            observed,
            mapping,
            local_port: port,
            path: Path::Direct {
                remote: punched.remote,
                kind: punched.kind,
                attempts: punched.attempts,
                elapsed_ms,
            },
            chat: keep(&link),
            link,
            go,
        })
    };
    match keying {
        Keying::Code(_) => after_go.await.map_err(PeerError::code_used),
        Keying::Chat(_) => after_go.await,
    }
}

/// The candidates we offer: this host's addresses (unless the user said not
/// to) and those the user added, with our fixed port.
fn our_candidates(opts: &Options, port: u16) -> Vec<SocketAddr> {
    let mut candidates = if opts.lan_candidates {
        net::lan_candidates(port)
    } else {
        Vec::new()
    };
    for &extra in &opts.extra_candidates {
        if !candidates.contains(&extra) {
            candidates.push(extra);
        }
    }
    candidates.truncate(MAX_CANDIDATES);
    candidates
}

/// The punch, with the other side's candidates tried as soon as its sealed box
/// arrives through the rendezvous (the public address is tried at once). A
/// box that does not open with `secret` ends it: whoever joined holds another
/// key ([`PeerError::BadCode`] on a first meeting, else
/// [`PeerError::NotAuthenticated`]). No box (the server or the other side
/// went away) only means no candidates besides the public address.
async fn punch_with_their_candidates(
    rendezvous: &mut client::Rendezvous,
    go: &punchline_proto::Go,
    params: &punch::PunchParams,
    start: Instant,
    secret: &secure::Secret,
) -> Result<punch::Punched, PeerError> {
    let (late_tx, late_rx) = oneshot::channel();
    let punching = punch::punch(go, params, start, late_rx);
    tokio::pin!(punching);
    let opened = tokio::select! {
        punched = &mut punching => return punched,
        opened = rendezvous.receive_sealed() => opened,
    };
    match opened {
        Ok(sealed) => match secret.open_candidates(go.role.other(), &go.session, &sealed) {
            Some(theirs) => {
                let _ = late_tx.send(theirs.candidates);
            }
            None if secret.is_code_key() => {
                return Err(PeerError::BadCode(secure::WRONG_CODE_BOX.into()))
            }
            None => {
                return Err(PeerError::NotAuthenticated(
                    "the other side's candidates were not sealed with this chat's secret".into(),
                ))
            }
        },
        Err(e) => tracing::debug!(error = %e, "no candidates from the other side"),
    }
    punching.await
}

/// The first sentence of a diagnosis, lower-cased at the start, for "because …".
fn first_sentence(text: &str) -> String {
    let first = text
        .split_terminator(['.', '\n'])
        .next()
        .unwrap_or(text)
        .trim();
    let mut chars = first.chars();
    match chars.next() {
        Some(c) => c.to_lowercase().chain(chars).collect(),
        None => "no candidate answered".to_owned(),
    }
}

/// A NAT's mapping in words, for `/info`: `local_port` is the port the host used
/// (if known), `public` what the world saw.
pub fn describe_mapping(mapping: Mapping, local_port: Option<u16>, public: SocketAddr) -> String {
    let port = match local_port {
        Some(p) if p == public.port() => ", local port kept",
        Some(_) => ", local port changed",
        None => "",
    };
    match mapping {
        Mapping::Independent => format!("one public port for every destination{port}"),
        Mapping::DependsOnDestination { first, second } => format!(
            "a new public port per destination ({first}, then {second}): a \"symmetric\" NAT"
        ),
        Mapping::Unknown => "mapping not measured (the probe port did not answer)".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_ports() {
        assert_eq!(with_default_port("example.org"), "example.org:7425");
        assert_eq!(with_default_port("example.org:99"), "example.org:99");
        assert_eq!(with_default_port("192.0.2.1"), "192.0.2.1:7425");
        assert_eq!(with_default_port("2001:db8::1"), "[2001:db8::1]:7425");
        assert_eq!(with_default_port("[2001:db8::1]"), "[2001:db8::1]:7425");
        assert_eq!(with_default_port("[2001:db8::1]:5"), "[2001:db8::1]:5");
    }

    #[test]
    fn codes_are_parsed() {
        assert_eq!(
            parse_code(" 7-Guitar-Orbit ").expect("valid").to_string(),
            "7-guitar-orbit"
        );
        assert!(matches!(parse_code("7 guitar"), Err(PeerError::Usage(_))));
    }
}
