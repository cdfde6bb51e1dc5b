//! The punchline peer: meets the other peer through the rendezvous, punches a
//! direct TCP link by simultaneous open from one fixed local port, and chats.
//!
//! A session, and the module that owns each step:
//! 1. Bind the fixed port and connect to the rendezvous from it ([`client`]).
//! 2. Probe, say hello (nameplate and SPAKE2 message, or the chat's room), learn
//!    our public address, wait for the other peer and the synchronised go
//!    ([`meet`]).
//! 3. Punch on all candidates at once; keep the one link both sides agree on
//!    ([`punch`], socket helpers in [`net`]). If no link forms, ask the
//!    rendezvous to relay instead ([`client::RendezvousConn::relay`]).
//! 4. Confirm the code (or the chat's secret) and encrypt with Noise over the
//!    link ([`secure`]).
//! 5. Chat ([`chat`], the session driver): the chat itself — numbering,
//!    acknowledgement, keepalive, dead links, resume, goodbye, the switch to
//!    direct — is `punchline_proto::session`, with no I/O; [`chat`] carries it
//!    over the link, and when the link drops it meets the other peer again
//!    (steps 1 to 4, keyed by the chat's secret) and the session resumes. Lines
//!    are typed and shown by [`ui`].
//!
//! Everything the user reads about links, the chat and failures is worded in
//! [`render`]; errors are [`error::PeerError`]. [`doctor`] checks a host's NAT
//! and kernel against a rendezvous, without a chat.

pub mod chat;
pub mod client;
pub mod config;
pub mod contacts;
pub mod doctor;
pub mod error;
pub mod hosted;
pub mod meet;
pub mod net;
pub mod portmap;
pub mod punch;
pub mod render;
pub mod secure;
pub mod ui;

use std::net::SocketAddr;
use std::time::Duration;

use punchline_proto::{codes::Code, sanitize_for_terminal, validate_name};
use tokio::sync::mpsc;

pub use error::PeerError;
pub use punchline_proto::session::ChatEnd;

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
    /// Rendezvous `HOST[:PORT]` (ignored with `host_port`).
    pub server: String,
    /// No rendezvous was given: run one inside this peer on this port
    /// ([`hosted`]) and meet there.
    pub host_port: Option<u16>,
    /// Fixed local port (0: the OS picks one, kept for the meeting and the
    /// punch; a new link after a drop then gets a fresh one).
    pub port: u16,
    /// Name shown to the other side.
    pub name: String,
    /// The code as typed, or `@NAME` to meet a contact; `None` to start a
    /// new code.
    pub code: Option<String>,
    /// Save the other side as a contact under this name once the chat is up.
    pub save: Option<String>,
    /// Words in a new code.
    pub words: usize,
    /// How long to try punching.
    pub punch_timeout: Duration,
    /// Offer this host's interface addresses as candidates.
    pub lan_candidates: bool,
    /// More addresses to offer (e.g. a port forwarded on the router).
    pub extra_candidates: Vec<SocketAddr>,
    /// How punch attempts are paced.
    pub retry: punchline_proto::pacing::RetryPolicy,
    /// The rendezvous' probe port (default: its port + 1).
    pub probe_port: Option<u16>,
    /// Prefix shown lines with the local time.
    pub timestamps: bool,
    /// Where the terminal keeps typed lines between chats (`None`: nowhere).
    pub history: Option<std::path::PathBuf>,
    /// When no direct link forms, chat through the rendezvous (still end-to-end
    /// encrypted) if it relays.
    pub relay: bool,
    /// Ask the router to forward the fixed port of each meeting
    /// ([`portmap`]).
    pub port_mapping: bool,
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

/// A punch deadline the rendezvous can wait for: at least a second, at most
/// [`MAX_PUNCH_DEADLINE`](punchline_proto::defaults::MAX_PUNCH_DEADLINE) (after
/// a longer one, the rendezvous would have closed the connection the peer
/// needs to report or to ask for a relay).
pub fn check_punch_timeout(deadline: Duration) -> Result<(), PeerError> {
    let max = punchline_proto::defaults::MAX_PUNCH_DEADLINE;
    if deadline < Duration::from_secs(1) || deadline > max {
        return Err(PeerError::Usage(format!(
            "--punch-timeout must be 1 to {} seconds (the rendezvous waits {} s for the outcome of a punch)",
            max.as_secs(),
            punchline_proto::defaults::REPORT_TIMEOUT.as_secs()
        )));
    }
    Ok(())
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

pub use chat::{MAX_AUTH_FAILURES, RESUME_DEADLINE};
pub use punchline_proto::session::UPGRADE_INTERVAL;
pub use render::describe_mapping;

/// Whether a chat is under way in this process (the link was up once):
/// Ctrl-C is then the chat's to handle.
pub fn chatting() -> bool {
    CHATTING.load(std::sync::atomic::Ordering::Relaxed)
}

static CHATTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Runs a whole session: meet, punch, chat; meet and punch again whenever the
/// link drops. Returns how the chat ended.
pub async fn run(opts: Options, mode: Mode) -> Result<ChatEnd, PeerError> {
    let (typed_code, contact) = match opts.code.as_deref().map(str::trim) {
        Some(typed) if typed.starts_with('@') => {
            let name = &typed[1..];
            contacts::validate_contact_name(name)?;
            let book = contacts::Book::load(&contacts::config_dir()?)?;
            let contact = book
                .get(name)
                .cloned()
                .ok_or_else(|| contacts::no_such_contact(name))?;
            (None, Some(contact))
        }
        Some(typed) => (Some(parse_code(typed)?), None),
        None => (None, None),
    };
    if let Some(name) = &opts.save {
        contacts::validate_contact_name(name)?;
    }
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
    check_punch_timeout(opts.punch_timeout)?;
    let mut status = ui::StderrStatus;
    use chat::Output as _;
    let identity = our_identity(contact.is_some(), &mut status)?;
    if let Some(contact) = &contact {
        // A saved key that proves nothing is refused before meeting.
        secure::Secret::contact(contact, &identity)?;
    }

    // 0. No rendezvous given: one runs in this process, for the whole chat.
    let mut opts = opts;
    let hosted = match opts.host_port {
        Some(port) => {
            let hosted = hosted::start(port).await?;
            opts.server = hosted.addr.to_string();
            status.status(&render::hosting(&hosted));
            Some(hosted)
        }
        None => None,
    };
    // What the other host passes with --server.
    let their_server = match &hosted {
        Some(h) => render::hosted_server_arg(h),
        None => opts.server.trim().to_owned(),
    };

    // 1. Rendezvous, from the fixed port.
    let server = with_default_port(&opts.server);
    let mut rendezvous = client::RendezvousConn::connect_probing(
        &server,
        opts.port,
        opts.probe_port,
        opts.port_mapping,
    )
    .await?;
    let port = rendezvous.local_port;
    tracing::info!(server = %rendezvous.server, port, "connected to the rendezvous");
    let code = match typed_code {
        Some(code) => Some(code),
        None if contact.is_some() => None,
        None => {
            let nameplate = rendezvous.allocate().await?;
            let mut random = [0u8; punchline_proto::codes::MAX_WORDS];
            getrandom::fill(&mut random).map_err(|e| {
                PeerError::io("no randomness for the code", std::io::Error::other(e))
            })?;
            let code = Code::generate(&nameplate, &random, opts.words);
            status.status(&format!("your code: {code}"));
            status.status(&format!(
                "on the other host, run:  peer --server {their_server} {code}"
            ));
            Some(code)
        }
    };
    if let Some(h) = &hosted {
        match (&code, &contact) {
            (Some(_), None) if typed_code_given(&opts) => status.status(&format!(
                "on the other host, give the same code with --server {their_server}"
            )),
            (None, Some(_)) => status.status(&format!(
                "on the other host, run:  peer --server {their_server} @NAME (the name it saved you as)"
            )),
            _ => {}
        }
        if let Some(hint) = render::hosted_hint(h) {
            status.status(&hint);
        }
    }

    // Lines given on stdin are read from now on: those that come before the
    // link is up go with the first link's handshake (a terminal's line editor
    // starts once the link is up), and the other side's, if it sends any that
    // way, are shown as they come.
    let (tx, mut rx) = mpsc::channel(ui::INPUT_CHANNEL);
    if mode == Mode::Lines {
        ui::spawn_stdin_lines(tx.clone());
    }
    let (shows_tx, mut shows_rx) = mpsc::channel(SHOWN_EARLY_QUEUE);
    let first = meet::FirstMeeting {
        early: secure::EarlyLines {
            ours: secure::FirstLines::default(),
            theirs: shows_tx,
        },
        identity,
    };
    let mut typed_early = Vec::new();
    let style = ui::Style::for_stdout(opts.timestamps);
    let mut lines_out = ui::LinesOutput { style };
    let mut shown_early = 0;

    // 2.-4. Meet, punch, secure.
    let met = loop {
        let keying = match (&code, &contact) {
            (Some(code), _) => meet::Keying::Code(code, &first),
            (None, Some(contact)) => meet::Keying::Contact(contact, &first),
            (None, None) => unreachable!("a code is made when none is given"),
        };
        let meeting = meet::meet(&opts, rendezvous, keying, &mut status);
        tokio::pin!(meeting);
        let met = loop {
            tokio::select! {
                met = &mut meeting => break met,
                // Kept for the chat; no more than the channel would hold.
                Some(typed) = rx.recv(), if typed_early.len() < ui::INPUT_CHANNEL => {
                    first.early.ours.typed(match &typed {
                        chat::Input::Line(text) => Some(text.as_str()),
                        _ => None,
                    });
                    typed_early.push(typed);
                }
                Some(theirs) = shows_rx.recv() => {
                    show_first_lines(&theirs, contact.as_ref(), &mut shown_early, &mut lines_out);
                }
            }
        };
        match met {
            // The contact's room changed with the hour while we waited:
            // wait in the new one.
            Err(PeerError::RoomChanged) => {
                rendezvous = client::RendezvousConn::connect_probing(
                    &server,
                    port,
                    opts.probe_port,
                    opts.port_mapping,
                )
                .await?;
            }
            met => break met?,
        }
    };
    while let Ok(theirs) = shows_rx.try_recv() {
        show_first_lines(&theirs, contact.as_ref(), &mut shown_early, &mut lines_out);
    }
    // A contact is shown under the name it was saved as, whatever it calls
    // itself (said once if that differs).
    let their_name = match &contact {
        Some(contact) => sanitize_for_terminal(&contact.name),
        None => sanitize_for_terminal(&met.link.their_introduction().name),
    };
    status.status(&format!(
        "connected to {their_name}: {}",
        render::describe_link(&met)
    ));
    let calls_itself = sanitize_for_terminal(&met.link.their_introduction().name);
    if contact.is_some() && calls_itself != their_name {
        status.status(&format!("({their_name} calls itself {calls_itself})"));
    }
    let words = met.link.verification().map(str::to_owned);
    match (&contact, &words) {
        (Some(contact), _) => status.status(&format!(
            "this is {}: the key you saved, and your pairing",
            sanitize_for_terminal(&contact.name)
        )),
        (None, Some(words)) => status.status(&render::confirmed(&their_name, words)),
        (None, None) => {}
    }
    // What saving the other side as a contact keeps: in a contact's chat,
    // the key its handshake proved; else the key it introduced itself with.
    let offer = contacts::Offer {
        key: match &contact {
            Some(contact) => contact.key,
            None => met.link.their_introduction().identity,
        },
        pairing: met.chat.secret.pairing(),
    };
    // Whether that key may be saved: a contact's was proven by the
    // handshake; in a chat with a code, each side proves it holds the key it
    // introduced with a word on the link (`Chat::Proof`).
    let identity_check = match &contact {
        Some(_) => chat::IdentityCheck {
            proven: true,
            pending_save: opts.save.clone(),
            ..Default::default()
        },
        None => {
            let hash = met.link.handshake_hash();
            let ours = secure::identity_proof(&first.identity, &offer.key, hash, met.chat.role);
            let expected =
                secure::identity_proof(&first.identity, &offer.key, hash, met.chat.role.other());
            chat::IdentityCheck {
                ours: ours.ok(),
                expected: expected.ok(),
                proven: false,
                bad: match ours {
                    Ok(_) => None,
                    Err(secure::BadIdentity::Ours) => Some(format!(
                        "{their_name} introduced your own identity key: it cannot be saved as a contact"
                    )),
                    Err(secure::BadIdentity::Invalid) => Some(format!(
                        "{their_name} introduced an identity key that proves nothing: it cannot be saved as a contact"
                    )),
                },
                pending_save: opts.save.clone(),
                they_saved: false,
            }
        }
    };

    // 5. Chat, over new links as needed.
    let mut ctx = chat::ChatContext {
        their_name,
        our_name: opts.name.clone(),
        facts: render::link_facts(&met),
        words,
        offer: Some(offer),
        identity: identity_check,
        pinned_name: contact.is_some(),
    };
    let mut session = chat::new_session(&opts);
    CHATTING.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut terminal = None;
    match mode {
        Mode::Terminal => {
            let term = ui::Terminal::start(tx, style, opts.history.clone())
                .map_err(|e| PeerError::io("cannot start the line editor", e))?;
            terminal = Some(term);
        }
        Mode::Lines => {
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
        chat::converse(
            &opts,
            met,
            &mut session,
            &mut ctx,
            chat::Early {
                typed: typed_early,
                shown: shown_early,
            },
            &mut rx,
            output,
        )
        .await
    };
    if let Some(term) = terminal.as_mut() {
        term.restore();
    }
    let end = result?;
    let stats = session.stats();
    let summary = format!("{} lines sent, {} received", stats.sent, stats.received);
    match end {
        ChatEnd::TheyLeft => status.status(&format!("{} left ({summary})", ctx.their_name)),
        ChatEnd::WeLeft | ChatEnd::Interrupted => {
            status.status(&format!("bye ({summary}, all delivered)"))
        }
    }
    Ok(end)
}

/// Our identity, made on first use. Where it cannot be kept (no config
/// directory, a read-only home), a chat with a code still runs, with an
/// identity for this chat only (the other side cannot save us then), and
/// the user is told; a contact's chat needs the real one.
fn our_identity(
    for_contact: bool,
    status: &mut dyn chat::Output,
) -> Result<contacts::Identity, PeerError> {
    let kept = contacts::config_dir().and_then(|dir| {
        let (identity, made) = contacts::Identity::load_or_create(&dir)?;
        if made && !contacts::Book::load(&dir)?.contacts.is_empty() {
            status.status(&format!(
                "warning: {} was missing, so a new identity key was made: your contacts know \
                 the old one and will refuse this one until you pair with them again",
                dir.join(contacts::IDENTITY_FILE).display()
            ));
        }
        Ok(identity)
    });
    match kept {
        Ok(identity) => Ok(identity),
        Err(e) if !for_contact => {
            status.status(&format!(
                "warning: {e}\n(this chat runs with a passing identity: the other side cannot save you as a contact)"
            ));
            contacts::Identity::generate()
        }
        Err(e) => Err(e),
    }
}

/// Saves the other side as the contact `name`; what to tell the user, and
/// whether it was saved.
pub(crate) fn save_contact(name: &str, offer: &contacts::Offer) -> (String, bool) {
    let saved = contacts::config_dir().and_then(|dir| {
        contacts::Book::update(&dir, |book| {
            book.save(name, offer, std::time::SystemTime::now())
        })
    });
    let told = match &saved {
        Ok(contacts::Saved::New) => format!(
            "saved as contact {name} (key {}): next time, `peer @{name}` meets them with no code, \
             once they have saved you too, in this chat (the pairing is this chat's)",
            contacts::fingerprint(&offer.key)
        ),
        Err(e) => format!("not saved: {e}"),
    };
    (told, saved.is_ok())
}

/// Whether the user typed a code (rather than having one made).
fn typed_code_given(opts: &Options) -> bool {
    opts.code
        .as_deref()
        .is_some_and(|c| !c.trim_start().starts_with('@'))
}

/// Boxes of the other side's first lines waiting to be shown (each holds all
/// of them so far, so one dropped when the queue is full loses nothing).
const SHOWN_EARLY_QUEUE: usize = 8;

/// Shows the other side's first lines that came in a box on the way to the
/// first link (each box holds all its first lines so far), past the `shown`
/// ones; a contact's under the name it was saved as.
fn show_first_lines(
    theirs: &punchline_proto::Introduction,
    contact: Option<&contacts::Contact>,
    shown: &mut u64,
    output: &mut dyn chat::Output,
) {
    let already = usize::try_from(*shown).unwrap_or(usize::MAX);
    let name = contact.map_or(theirs.name.as_str(), |c| c.name.as_str());
    for text in theirs.first_lines.iter().skip(already) {
        output.incoming(name, text);
        *shown += 1;
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
    fn punch_timeouts_past_the_servers_wait_are_refused() {
        use punchline_proto::defaults::{MAX_PUNCH_DEADLINE, REPORT_TIMEOUT};
        assert!(check_punch_timeout(punchline_proto::pacing::PUNCH_DEADLINE).is_ok());
        assert!(check_punch_timeout(MAX_PUNCH_DEADLINE).is_ok());
        for bad in [
            Duration::ZERO,
            MAX_PUNCH_DEADLINE + Duration::from_secs(1),
            REPORT_TIMEOUT,
        ] {
            let Err(PeerError::Usage(text)) = check_punch_timeout(bad) else {
                panic!("{bad:?} accepted");
            };
            assert!(text.contains("1 to 30 seconds"), "{text}");
        }
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
