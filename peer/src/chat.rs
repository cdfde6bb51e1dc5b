//! The session driver: runs the chat's [`Session`] (numbering, acknowledgement,
//! keepalive, dead links, resume, goodbye and the switch to direct, all in
//! `punchline_proto::session`, with no I/O) over whatever link the chat has,
//! and gets it a new link when one drops.
//!
//! Lines typed arrive as [`Input`] on a channel; what the user sees goes to an
//! [`Output`]. `converse` owns the chat from its first link to its end:
//! - it carries the session over one secured link (`carry`): messages the
//!   session asks for go out, messages that arrive go in, its timer is slept on;
//! - when the session says the link is down, it meets the other peer again in
//!   the chat's room (`relink`) and hands the session the new link, which
//!   resumes the chat;
//! - when the session says to try for a direct link (relayed chats only), a try
//!   runs in the background (`try_direct`) and its link replaces the relay.

use std::time::Duration;

use punchline_proto::session::{
    ChatEnd, Config, DownReason, Event, Failure, LineRefused, Queued, RenameRefused, Session,
};
use punchline_proto::{sanitize_for_terminal, Chat};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep_until, timeout, Instant};

use crate::error::PeerError;
use crate::meet::{meet, ChatKeys, Keying, Met};
use crate::secure::{RecvError, SecureLink};
use crate::{client, render, with_default_port, Options};

pub use punchline_proto::session::BYE_TIMEOUT;

/// Bound on one write to the other peer: a link that takes no data for this long
/// is down.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// A side that has sent nothing for this long sends a keepalive ([`Chat::Ping`]),
/// which the other answers at once (the rendezvous' relay counts on it too).
pub use punchline_proto::defaults::HEARTBEAT_INTERVAL;

/// A line or keepalive not acknowledged within this long means the link is dead.
pub use punchline_proto::defaults::ACK_TIMEOUT;

/// How long a peer whose link dropped keeps trying to get a new one before it
/// gives up (and says which lines were not delivered).
pub const RESUME_DEADLINE: Duration = Duration::from_secs(120);

/// Pause between two attempts to re-establish a link.
const RESUME_RETRY_PAUSE: Duration = Duration::from_secs(1);

/// How many later links may fail to authenticate before the chat ends: the
/// first failure is shown and one more try is made; a second means someone keeps
/// answering in the other peer's place.
pub const MAX_AUTH_FAILURES: u32 = 2;

/// Longest a background try for a direct link may take: the meeting at the
/// rendezvous (the other side asks at the same moment) and the punch.
const TRY_DIRECT_TIMEOUT: Duration = Duration::from_secs(30);

/// What the user did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A line to send.
    Line(String),
    /// `/nick NAME`: go by another name.
    Nick(String),
    /// `/save NAME`: keep the other side as a contact.
    Save(String),
    /// `/info`: show the link's details.
    Info,
    /// `/verify`: show the verification words.
    Verify,
    /// End of input or `/quit`: say goodbye and leave.
    Quit,
    /// Ctrl-C: say goodbye and leave.
    Interrupted,
}

/// Where the chat shows things.
pub trait Output {
    /// A line from the other peer (not yet sanitised).
    fn incoming(&mut self, name: &str, text: &str);
    /// A status message for the user.
    fn status(&mut self, message: &str);
}

/// The chat's presentation beside the session: who is who, and what `/info`
/// and `/verify` tell.
#[derive(Debug, Clone, Default)]
pub struct ChatContext {
    /// The other side's name, sanitised for display; changes with their `/nick`.
    pub their_name: String,
    /// Our name; changes with our `/nick`.
    pub our_name: String,
    /// What `/info` shows beside the live numbers: (label, value).
    pub facts: Vec<(String, String)>,
    /// The first link's verification words.
    pub words: Option<String>,
    /// What `/save` keeps of the other side.
    pub offer: Option<crate::contacts::Offer>,
    /// Whether the other side's identity key may be saved.
    pub identity: IdentityCheck,
    /// The other side is a saved contact: it is shown under the name it was
    /// saved as, whatever it calls itself.
    pub pinned_name: bool,
}

/// Whether the other side holds the identity key it introduced, so that it
/// may be saved as a contact.
#[derive(Debug, Clone, Default)]
pub struct IdentityCheck {
    /// Our proof, told on every link ([`Session::prove`]).
    pub ours: Option<[u8; 32]>,
    /// The proof the other side must tell.
    pub expected: Option<[u8; 32]>,
    /// Proven: by its proof, or (a contact's chat) by the handshake.
    pub proven: bool,
    /// Why its key cannot be a contact's, if so.
    pub bad: Option<String>,
    /// A save waiting for the proof (`/save` or `--save` before it came).
    pub pending_save: Option<String>,
    /// The other side said it saved us (shown once).
    pub they_saved: bool,
}

/// A session with the user's settings.
pub fn new_session(opts: &Options) -> Session {
    Session::new(Config {
        upgrade_interval: opts.upgrade_interval,
        ..Config::default()
    })
}

/// The chat over `met`'s link, and over a new link (met again through the
/// rendezvous, in the chat's own room and keyed by its secret) each time a link
/// drops. Returns how the chat ended.
pub(crate) async fn converse(
    opts: &Options,
    mut met: Met,
    session: &mut Session,
    ctx: &mut ChatContext,
    early: Early,
    input: &mut mpsc::Receiver<Input>,
    output: &mut dyn Output,
) -> Result<ChatEnd, PeerError> {
    let keys = met.chat.clone();
    let mut auth_failures = 0;
    // A direct link being tried for in the background while relayed.
    let mut attempt: Option<Background> = None;
    first_link_up(&met, session, ctx, early, output);
    loop {
        let step = carry(
            &mut met.link,
            session,
            ctx,
            input,
            output,
            attempt.as_mut().map(|a| &mut a.result),
        )
        .await;
        match step {
            Step::Ended(Ok(end)) => return Ok(end),
            Step::Ended(Err(failure)) => {
                return Err(render::failure(failure, &ctx.their_name, session.unacked()))
            }
            Step::TryDirect => {
                if attempt.is_none() {
                    attempt = Some(try_direct(opts, &keys));
                }
            }
            Step::Replaced(Ok(direct)) => {
                // The relayed link goes quiet now, but stays open a little: the
                // other side may still be finishing its switch, and must not see
                // its old link drop meanwhile.
                let old = std::mem::replace(&mut met, direct);
                tokio::spawn(async move {
                    tokio::time::sleep(ACK_TIMEOUT).await;
                    drop(old);
                });
                attempt = None;
                output.status(&format!("switched to a {}", render::describe_link(&met)));
                ctx.facts = render::link_facts(&met);
                session.link_up(now(), met.kind());
                prove(session, ctx);
            }
            Step::Replaced(Err(e)) => {
                attempt = None;
                session.direct_attempt_failed();
                authentication_failed(&e, &mut auth_failures, ctx, session, output)?;
                tracing::info!(error = %e, "still no direct link; staying relayed");
            }
            Step::Down(why) => {
                // The background try must not meet our own reconnect in the
                // chat's room.
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
                    session,
                    ctx,
                    input,
                    output,
                )
                .await?;
                output.status(&format!(
                    "link back after {:.1} s: {}",
                    dropped.elapsed().as_secs_f64(),
                    render::describe_link(&met)
                ));
                ctx.facts = render::link_facts(&met);
                session.link_up(now(), met.kind());
                prove(session, ctx);
            }
        }
    }
}

/// What happened before the chat's first link was up.
pub struct Early {
    /// What the user typed meanwhile, in order.
    pub typed: Vec<Input>,
    /// How many of the other side's first lines were shown meanwhile (they
    /// came in a box on the way to the link).
    pub shown: u64,
}

/// The chat's first link is up. What was typed before it goes to the session
/// first: the lines typed first (some of which the link's handshake may have
/// carried, [`SecureLink::carried`]) before the link counts as up, the rest
/// after. The other side's first lines shown before the link was up count as
/// received, and those its handshake carried, if any, are taken in.
fn first_link_up(
    met: &Met,
    session: &mut Session,
    ctx: &mut ChatContext,
    early: Early,
    output: &mut dyn Output,
) {
    let mut typed = early.typed.into_iter().peekable();
    while let Some(Input::Line(text)) = typed.next_if(|i| matches!(i, Input::Line(_))) {
        if let Err(e) = session.send_line(now(), text) {
            output.status(&format!("not sent: {e}"));
        }
    }
    session.link_up_carrying(now(), met.kind(), met.link.carried());
    session.received_early(now(), early.shown);
    prove(session, ctx);
    if let Some(name) = ctx.identity.pending_save.take() {
        save(name, session, ctx, output);
    }
    for (seq, text) in (1..).zip(&met.link.their_introduction().first_lines) {
        session.handle(
            now(),
            Chat::Line {
                seq,
                text: text.clone(),
            },
        );
    }
    for later in typed {
        typed_on_link(Some(later), &met.link, session, ctx, output);
    }
}

/// Why [`carry`] stopped carrying the session over its link.
enum Step<T> {
    /// The chat is over.
    Ended(Result<ChatEnd, Failure>),
    /// The link no longer carries the chat.
    Down(DownReason),
    /// Try for a direct link (the chat goes on over this link meanwhile).
    TryDirect,
    /// The replacement link came: switch to it.
    Replaced(T),
}

/// The session's clock: the driver's time, as the session takes it.
fn now() -> std::time::Instant {
    Instant::now().into_std()
}

/// Carries `session` over `link` until the session says what to do next (or
/// `replacement`, a link being prepared, comes).
async fn carry<T>(
    link: &mut SecureLink,
    session: &mut Session,
    ctx: &mut ChatContext,
    input: &mut mpsc::Receiver<Input>,
    output: &mut dyn Output,
    mut replacement: Option<&mut oneshot::Receiver<T>>,
) -> Step<T> {
    loop {
        while let Some(msg) = session.poll_transmit() {
            if let Err(why) = send(link, &msg).await {
                session.link_down(now(), DownReason::Link(why));
            }
        }
        while let Some(event) = session.poll_event() {
            match event {
                Event::Line(text) => output.incoming(&ctx.their_name, &text),
                Event::Renamed(name) if ctx.pinned_name => {
                    let name = sanitize_for_terminal(&name);
                    output.status(&format!("{} now calls itself {name}", ctx.their_name));
                }
                Event::Renamed(name) => {
                    let name = sanitize_for_terminal(&name);
                    output.status(&format!("{} is now known as {name}", ctx.their_name));
                    ctx.their_name = name;
                }
                Event::UnusableName(e) => {
                    output.status(&format!("{} sent an unusable name ({e})", ctx.their_name))
                }
                Event::Proof(mac) => proof_came(&mac, session, ctx, output),
                // Told once: the word may come again on a later link, or
                // from a peer repeating it to fill the screen.
                Event::TheySaved if ctx.identity.they_saved => {}
                Event::TheySaved => {
                    ctx.identity.they_saved = true;
                    output.status(&format!(
                    "{0} saved you as a contact: to keep {0} too, /save NAME now, in this chat \
                     (or start a chat with --save NAME); then `peer @NAME` on both sides meets \
                     with no code",
                    ctx.their_name
                ));
                }
                Event::LinkDown(why) => return Step::Down(why),
                Event::TryDirect => return Step::TryDirect,
                Event::Ended(result) => {
                    // The answering goodbye (after the last acknowledgements),
                    // then a clean close.
                    if result.is_ok() {
                        while let Some(msg) = session.poll_transmit() {
                            let _ = timeout(BYE_TIMEOUT, link.send(&msg)).await;
                        }
                        let _ = timeout(BYE_TIMEOUT, link.close()).await;
                    }
                    return Step::Ended(result);
                }
            }
        }
        let deadline = session.poll_timeout().map(Instant::from_std);
        let replaced = async {
            match replacement.as_mut() {
                Some(rx) => rx.await.ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            Some(new) = replaced => return Step::Replaced(new),
            // Once leaving, nothing more is typed into this chat.
            typed = input.recv(), if !session.is_leaving() => {
                typed_on_link(typed, link, session, ctx, output);
            }
            received = link.recv() => match received {
                Some(Ok(msg)) => {
                    if msg == Chat::Bye {
                        // The other side still reads until our answering
                        // goodbye: the lines already typed go out first, so
                        // none of them is lost.
                        while let Ok(typed) = input.try_recv() {
                            if let Input::Line(text) = typed {
                                take_line(session, output, text);
                            }
                        }
                    }
                    session.handle(now(), msg);
                }
                Some(Err(RecvError::Link(why))) => session.link_down(now(), DownReason::Link(why)),
                // A frame that fails authentication was injected or altered on
                // the way (or replayed): this link is no longer trustworthy,
                // but the chat is. A new link (keyed by the chat's secret)
                // carries on from where this one stopped.
                Some(Err(RecvError::Sealed(why))) => {
                    tracing::info!(why, "a message on the link failed authentication");
                    session.link_down(
                        now(),
                        DownReason::Link(format!("a message on it was refused: {why}")),
                    );
                }
                None => session.link_down(now(), DownReason::Link("closed without a goodbye".into())),
            },
            _ = sleep_until(deadline.unwrap_or_else(far_future)), if deadline.is_some() => {
                session.handle_timeout(now());
            }
        }
    }
}

/// Writes one message, within [`SEND_TIMEOUT`]; `Err` says why the link is down.
async fn send(link: &mut SecureLink, msg: &Chat) -> Result<(), String> {
    match timeout(SEND_TIMEOUT, link.send(msg)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "the other side stopped reading for {} s",
            SEND_TIMEOUT.as_secs()
        )),
    }
}

/// An instant that does not come.
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

/// Acts on what the user did while a link carries the chat.
fn typed_on_link(
    typed: Option<Input>,
    link: &SecureLink,
    session: &mut Session,
    ctx: &mut ChatContext,
    output: &mut dyn Output,
) {
    match typed {
        Some(Input::Info) => {
            for line in render::info_lines(link, ctx, session) {
                output.status(&line);
            }
        }
        other => typed_any(other, session, ctx, output),
    }
}

/// Acts on what the user did (with or without a link), `/info` aside.
fn typed_any(
    typed: Option<Input>,
    session: &mut Session,
    ctx: &mut ChatContext,
    output: &mut dyn Output,
) {
    match typed {
        Some(Input::Line(text)) => take_line(session, output, text),
        Some(Input::Nick(name)) => match session.rename(now(), &name) {
            Ok(()) => {
                output.status(&format!("you are now known as {name}"));
                ctx.our_name = name;
            }
            Err(RenameRefused::Invalid(e)) => output.status(&format!("name not changed: {e}")),
            Err(RenameRefused::NoLink) => output.status("name not changed: no link right now"),
        },
        Some(Input::Info) => output.status("no link right now: reconnecting"),
        Some(Input::Verify) => output.status(&render::words(ctx.words.as_deref())),
        Some(Input::Save(name)) => save(name, session, ctx, output),
        Some(Input::Quit) | None => session.quit(now(), false),
        Some(Input::Interrupted) => session.quit(now(), true),
    }
}

/// Tells our identity proof on a new link (the word is not acknowledged: a
/// link lost with it unread must not leave the other side without it).
fn prove(session: &mut Session, ctx: &ChatContext) {
    if let Some(mac) = ctx.identity.ours {
        session.prove(now(), mac);
    }
}

/// `/save NAME` (or `--save NAME`): keeps the other side as a contact once
/// it has proven its identity key, and tells it.
fn save(name: String, session: &mut Session, ctx: &mut ChatContext, output: &mut dyn Output) {
    let Some(offer) = &ctx.offer else {
        return output.status("not saved: nothing to save yet");
    };
    if let Some(bad) = &ctx.identity.bad {
        return output.status(&format!("not saved: {bad}"));
    }
    if !ctx.identity.proven {
        output.status(&format!(
            "{} has not yet proven it holds the identity key it introduced: saving as {name} \
             once it has",
            ctx.their_name
        ));
        ctx.identity.pending_save = Some(name);
        return;
    }
    let (told, saved) = crate::save_contact(&name, offer);
    output.status(&told);
    if saved {
        session.saved(now());
    }
}

/// The other side's identity proof came: checked once; a save waiting for it
/// goes ahead, or is refused.
fn proof_came(
    mac: &[u8; 32],
    session: &mut Session,
    ctx: &mut ChatContext,
    output: &mut dyn Output,
) {
    if ctx.identity.proven || ctx.identity.bad.is_some() {
        return;
    }
    match &ctx.identity.expected {
        Some(expected) if crate::secure::same_mac(expected, mac) => ctx.identity.proven = true,
        _ => {
            ctx.identity.bad = Some(format!(
                "{} could not prove it holds the identity key it introduced (it may have \
                 introduced someone else's): it cannot be saved as a contact",
                ctx.their_name
            ));
        }
    }
    if let Some(name) = ctx.identity.pending_save.take() {
        save(name, session, ctx, output);
    }
}

/// Takes one typed line into the session, or tells the user why not.
fn take_line(session: &mut Session, output: &mut dyn Output, text: String) {
    match session.send_line(now(), text) {
        Ok(Queued::OnLink) => {}
        Ok(Queued::Kept) => output.status("(kept; it goes out once the link is back)"),
        Err(LineRefused::Invalid(e)) => output.status(&format!("not sent: {e}")),
        Err(LineRefused::Ending) => output.status("not sent: the chat is ending"),
    }
}

/// Shows a later link's failed authentication (`e`) to the user at once, and
/// ends the chat (`Err`) when it is the [`MAX_AUTH_FAILURES`]th. Any other error
/// passes as `Ok`.
fn authentication_failed(
    e: &PeerError,
    failures: &mut u32,
    ctx: &ChatContext,
    session: &Session,
    output: &mut dyn Output,
) -> Result<(), PeerError> {
    let PeerError::NotAuthenticated(why) = *e else {
        return Ok(());
    };
    *failures += 1;
    tracing::info!(
        failures = *failures,
        ?why,
        "a new link failed authentication"
    );
    if *failures >= MAX_AUTH_FAILURES {
        return Err(render::undelivered(
            PeerError::KeptFailingAuthentication {
                name: ctx.their_name.clone(),
                failures: *failures,
                last: why,
            },
            &ctx.their_name,
            session.unacked(),
        ));
    }
    output.status(&render::auth_warning(why, &ctx.their_name));
    Ok(())
}

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
            let rendezvous = client::RendezvousConn::connect_probing(
                &server,
                0,
                opts.probe_port,
                opts.port_mapping,
            )
            .await?;
            meet(&opts, rendezvous, Keying::Chat(&keys), &mut QuietStatus).await
        })
        .await
        .unwrap_or_else(|_| Err(PeerError::Timeout("no direct link in time".into())));
        let _ = tx.send(tried);
    });
    Background { result: rx, task }
}

/// Status messages of a meeting that are not worth showing during a reconnect.
struct QuietStatus;

impl Output for QuietStatus {
    fn incoming(&mut self, _: &str, _: &str) {}
    fn status(&mut self, message: &str) {
        tracing::info!(message, "reconnect");
    }
}

/// Meets the other peer again in the chat's room until a new link is up, for at
/// most [`RESUME_DEADLINE`]. Lines typed meanwhile are kept by the session for
/// the new link; leaving meanwhile ends the chat with the count of lines not
/// delivered. A new link that fails to authenticate is shown at once, and ends
/// the chat at the [`MAX_AUTH_FAILURES`]th.
#[allow(clippy::too_many_arguments)]
async fn relink(
    opts: &Options,
    keys: &ChatKeys,
    symmetric_here: bool,
    auth_failures: &mut u32,
    session: &mut Session,
    ctx: &mut ChatContext,
    input: &mut mpsc::Receiver<Input>,
    output: &mut dyn Output,
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
            let rendezvous = client::RendezvousConn::connect_probing(
                &server,
                port,
                opts.probe_port,
                opts.port_mapping,
            )
            .await?;
            meet(opts, rendezvous, Keying::Chat(keys), &mut QuietStatus).await
        };
        let tried = tokio::time::timeout_at(deadline, tried);
        tokio::pin!(tried);
        // Lines typed while no link carries them.
        let result = loop {
            tokio::select! {
                result = &mut tried => break result,
                typed = input.recv() => {
                    typed_any(typed, session, ctx, output);
                    if let Some(Event::Ended(Err(failure))) = session.poll_event() {
                        return Err(render::failure(failure, &ctx.their_name, session.unacked()));
                    }
                }
            }
        };
        match result {
            Ok(Ok(met)) => return Ok(met),
            Ok(Err(e)) => {
                authentication_failed(&e, auth_failures, ctx, session, output)?;
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
                return Err(render::undelivered(
                    PeerError::Timeout(format!(
                        "no new link within {} s{detail}",
                        RESUME_DEADLINE.as_secs()
                    )),
                    &ctx.their_name,
                    session.unacked(),
                ));
            }
        }
    }
}
