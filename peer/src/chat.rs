//! The chat over the punched link, independent of how lines are typed or shown.
//!
//! Lines typed arrive as [`Input`] on a channel; lines received go to an
//! [`Output`]. Leaving is a two-way goodbye so nothing typed is lost:
//! 1. The side that leaves (end of input, `/quit`, Ctrl-C) sends `Bye` after its
//!    last line and keeps reading.
//! 2. The other side, reading `Bye`, has by then received every line before it (the
//!    link is one ordered TCP stream); it reports the departure, answers `Bye`, and
//!    ends.
//! 3. The answering `Bye` proves to the leaving side that everything it sent was
//!    received; only then does it end successfully.
//!
//! Lines are numbered and acknowledged ([`Reliable`]), so a chat outlives its
//! link: when no acknowledgement comes within [`ACK_TIMEOUT`] (a keepalive goes
//! out after [`HEARTBEAT_INTERVAL`] of quiet), [`chat`] returns
//! [`LinkEnd::Down`]; the caller gets a new link and calls [`chat`] again with
//! `resuming`, and the two sides resend what the other missed.

use std::collections::VecDeque;
use std::time::Duration;

use punchline_proto::{sanitize_for_terminal, validate_line, validate_name, Chat};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep_until, timeout, Instant};

use crate::error::PeerError;
use crate::secure::{RecvError, SecureLink};

/// How long the leaving side waits for the other's answering goodbye.
pub const BYE_TIMEOUT: Duration = Duration::from_secs(10);

/// Bound on one write to the other peer: a link that takes no data for this long
/// is down.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// A side that has sent nothing for this long sends a keepalive ([`Chat::Ping`]),
/// which the other answers at once (the rendezvous' relay counts on it too).
pub use punchline_proto::defaults::HEARTBEAT_INTERVAL;

/// A line or keepalive not acknowledged within this long means the link is dead.
pub use punchline_proto::defaults::ACK_TIMEOUT;

/// What the user did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A line to send.
    Line(String),
    /// `/nick NAME`: go by another name.
    Nick(String),
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

/// How the chat ended (without error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatEnd {
    /// We left; the other side confirmed it received everything.
    WeLeft,
    /// We were interrupted; the other side confirmed it received everything.
    Interrupted,
    /// The other side left.
    TheyLeft,
}

/// Counters for the end of the chat and `/info`.
#[derive(Debug, Default, Clone, Copy)]
pub struct ChatStats {
    /// Lines sent.
    pub sent: u64,
    /// Lines received.
    pub received: u64,
}

/// The chat's state beside the link: who is who, what `/info` tells, counters.
#[derive(Debug, Clone, Default)]
pub struct ChatContext {
    /// The other side's name, sanitised for display; changes with their `/nick`.
    pub their_name: String,
    /// Our name; changes with our `/nick`.
    pub our_name: String,
    /// What `/info` shows beside the live numbers: (label, value).
    pub facts: Vec<(String, String)>,
    /// Lines each way.
    pub stats: ChatStats,
    /// Numbered lines, across links.
    pub reliable: Reliable,
    /// The last round trip measured by the chat itself (a line or keepalive
    /// and its acknowledgement).
    pub rtt: Option<Duration>,
    /// The first link's verification words.
    pub words: Option<String>,
}

impl ChatContext {
    /// Shows the verification words, or that they are not known yet.
    pub fn show_words(&self, output: &mut dyn Output) {
        match &self.words {
            Some(words) => output.status(&format!(
                "verification: {words}  (the other side must see the same words)"
            )),
            None => output.status("verification: none for this chat"),
        }
    }
}

/// The line that tells the user the link is encrypted and which words to
/// compare.
pub fn confirmed(their_name: &str, words: &str) -> String {
    format!(
        "encrypted; code confirmed (to rule out an interception, compare with {their_name}: {words})"
    )
}

/// Lines, numbered and acknowledged, that outlive any one link.
///
/// Each direction numbers its lines from 1. The sender keeps a line until the
/// other side acknowledges it; the receiver shows a line only if it is the next
/// one expected, so a line resent after a new link is never shown twice.
#[derive(Debug, Clone)]
pub struct Reliable {
    next_seq: u64,
    unacked: VecDeque<Pending>,
    next_expected: u64,
}

#[derive(Debug, Clone)]
struct Pending {
    seq: u64,
    text: String,
    /// When it last went out on a link; `None` while no link carries it.
    sent: Option<Instant>,
}

impl Default for Reliable {
    fn default() -> Self {
        Reliable {
            next_seq: 1,
            unacked: VecDeque::new(),
            next_expected: 1,
        }
    }
}

impl Reliable {
    /// Takes a typed line: numbers it and keeps it until acknowledged.
    pub fn push(&mut self, text: String) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.unacked.push_back(Pending {
            seq,
            text,
            sent: None,
        });
        seq
    }

    /// Lines not yet acknowledged.
    pub fn unacked(&self) -> usize {
        self.unacked.len()
    }

    fn ack(&mut self, upto: u64) {
        while self.unacked.front().is_some_and(|p| p.seq <= upto) {
            self.unacked.pop_front();
        }
    }

    /// A received line: `true` if it is new and in order (to be shown).
    fn receive(&mut self, seq: u64) -> Result<bool, String> {
        if seq == self.next_expected {
            self.next_expected += 1;
            Ok(true)
        } else if seq < self.next_expected {
            Ok(false)
        } else {
            Err(format!(
                "line {seq} arrived while line {} was expected",
                self.next_expected
            ))
        }
    }

    fn received_upto(&self) -> u64 {
        self.next_expected - 1
    }

    /// When the oldest line on the link went out.
    fn oldest_sent(&self) -> Option<Instant> {
        self.unacked.iter().filter_map(|p| p.sent).min()
    }
}

/// How the chat on one link ended (for now).
#[derive(Debug)]
pub enum LinkEnd<T> {
    /// The chat is over.
    Chat(ChatEnd),
    /// The link failed (reset, silence, a path that stopped carrying): the chat
    /// can go on over a new link, resumed with [`chat`]'s `resuming`.
    Down(String),
    /// Time to try for a direct link (`upgrade_at` came, or the other side asked
    /// with [`Chat::TryDirect`]); the chat goes on over this link meanwhile.
    TryDirect,
    /// The replacement link came ([`chat`]'s `replacement`): switch to it.
    Replaced(T),
}

/// Runs the chat over `link` until one side leaves or the link fails. With
/// `resuming`, the link replaces a lost one: both sides first say what they have,
/// and what the other side missed is sent again.
///
/// `upgrade_at`: when to stop and ask for a direct link ([`LinkEnd::TryDirect`]);
/// `replacement`: a link being prepared, returned as [`LinkEnd::Replaced`] once
/// it comes.
pub async fn chat<T>(
    link: &mut SecureLink,
    ctx: &mut ChatContext,
    input: &mut mpsc::Receiver<Input>,
    output: &mut dyn Output,
    resuming: bool,
    upgrade_at: Option<Instant>,
    mut replacement: Option<&mut oneshot::Receiver<T>>,
) -> Result<LinkEnd<T>, PeerError> {
    let mut link = Carrier::new(link);
    if resuming {
        if let Err(why) = link.resume(&mut ctx.reliable).await? {
            return Ok(LinkEnd::Down(why));
        }
    }
    if let Err(why) = link.flush(&mut ctx.reliable).await {
        return Ok(LinkEnd::Down(why));
    }
    let end = loop {
        let deadline = link.next_deadline(&ctx.reliable);
        let replaced = async {
            match replacement.as_mut() {
                Some(rx) => rx.await.ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            Some(new) = replaced => return Ok(LinkEnd::Replaced(new)),
            _ = sleep_until(upgrade_at.unwrap_or_else(far_future)) => return Ok(LinkEnd::TryDirect),
            typed = input.recv() => match typed {
                Some(Input::Line(text)) => {
                    if let Err(why) = send_line(&mut link, ctx, output, text).await {
                        return Ok(LinkEnd::Down(why));
                    }
                }
                Some(Input::Nick(name)) => {
                    if let Err(e) = validate_name(&name) {
                        output.status(&format!("name not changed: {e}"));
                        continue;
                    }
                    if let Err(why) = link.send(Chat::Nick { name: name.clone() }).await {
                        return Ok(LinkEnd::Down(why));
                    }
                    output.status(&format!("you are now known as {name}"));
                    ctx.our_name = name;
                }
                Some(Input::Info) => {
                    for line in info_lines(link.inner, ctx) {
                        output.status(&line);
                    }
                }
                Some(Input::Verify) => ctx.show_words(output),
                Some(Input::Quit) | None => break ChatEnd::WeLeft,
                Some(Input::Interrupted) => break ChatEnd::Interrupted,
            },
            received = link.inner.recv() => {
                let msg = match received {
                    Some(Ok(msg)) => msg,
                    Some(Err(RecvError::Link(why))) => return Ok(LinkEnd::Down(why)),
                    // A frame that fails authentication was injected or altered on
                    // the way (or replayed): this link is no longer trustworthy,
                    // but the chat is. A new link (keyed by the chat's secret)
                    // carries on from where this one stopped.
                    Some(Err(RecvError::Sealed(why))) => {
                        tracing::info!(why, "a message on the link failed authentication");
                        return Ok(LinkEnd::Down(format!("a message on it was refused: {why}")));
                    }
                    None => return Ok(LinkEnd::Down("closed without a goodbye".into())),
                };
                if msg == Chat::TryDirect {
                    return Ok(LinkEnd::TryDirect);
                }
                if msg == Chat::Bye {
                    // The other side still reads until our answering goodbye: send
                    // the lines already typed first, so none of them is lost.
                    while let Ok(typed) = input.try_recv() {
                        if let Input::Line(text) = typed {
                            let _ = send_line(&mut link, ctx, output, text).await;
                        }
                    }
                    // Answer so the other side knows everything arrived.
                    let _ = timeout(BYE_TIMEOUT, link.inner.send(&Chat::Bye)).await;
                    let _ = timeout(BYE_TIMEOUT, link.inner.close()).await;
                    return Ok(LinkEnd::Chat(ChatEnd::TheyLeft));
                }
                if let Err(why) = link.handle(msg, ctx, output).await? {
                    return Ok(LinkEnd::Down(why));
                }
            }
            _ = sleep_until(deadline) => {
                if let Err(why) = link.tick(&ctx.reliable).await {
                    return Ok(LinkEnd::Down(why));
                }
            }
        }
    };
    if let Err(why) = link.send(Chat::Bye).await {
        return Err(lost(&ctx.their_name, &why));
    }
    // Lines the other side sent before it saw our goodbye still arrive and are shown.
    let answered = timeout(BYE_TIMEOUT, async {
        loop {
            match link.inner.recv().await {
                Some(Ok(Chat::Bye)) => return Ok(()),
                Some(Ok(msg)) => {
                    if let Err(why) = link.handle(msg, ctx, output).await? {
                        return Err(lost(&ctx.their_name, &why));
                    }
                }
                Some(Err(RecvError::Link(e) | RecvError::Sealed(e))) => {
                    return Err(lost(&ctx.their_name, &e))
                }
                None => {
                    return Err(lost(
                        &ctx.their_name,
                        "closed before confirming our last lines",
                    ))
                }
            }
        }
    })
    .await;
    match answered {
        Ok(result) => result?,
        Err(_) => {
            return Err(PeerError::Timeout(format!(
                "{} did not answer our goodbye within {} s: delivery of the last lines is not confirmed",
                ctx.their_name,
                BYE_TIMEOUT.as_secs()
            )))
        }
    }
    let _ = timeout(BYE_TIMEOUT, link.inner.close()).await;
    Ok(LinkEnd::Chat(end))
}

/// An instant that does not come.
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

/// Keeps one link's timers: when we last sent, and an unanswered keepalive.
struct Carrier<'a> {
    inner: &'a mut SecureLink,
    last_sent: Instant,
    ping_sent: Option<Instant>,
}

/// `Err` with the reason: the link is down.
type Sent = Result<(), String>;

impl<'a> Carrier<'a> {
    fn new(inner: &'a mut SecureLink) -> Self {
        Carrier {
            inner,
            last_sent: Instant::now(),
            ping_sent: None,
        }
    }

    async fn send(&mut self, msg: Chat) -> Sent {
        match timeout(SEND_TIMEOUT, self.inner.send(&msg)).await {
            Ok(Ok(())) => {
                self.last_sent = Instant::now();
                Ok(())
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "the other side stopped reading for {} s",
                SEND_TIMEOUT.as_secs()
            )),
        }
    }

    /// Sends every line not yet on this link, in order.
    async fn flush(&mut self, reliable: &mut Reliable) -> Sent {
        let waiting: Vec<(u64, String)> = reliable
            .unacked
            .iter()
            .filter(|p| p.sent.is_none())
            .map(|p| (p.seq, p.text.clone()))
            .collect();
        for (seq, text) in waiting {
            self.send(Chat::Line { seq, text }).await?;
            let now = Instant::now();
            if let Some(p) = reliable.unacked.iter_mut().find(|p| p.seq == seq) {
                p.sent = Some(now);
            }
        }
        Ok(())
    }

    /// The first exchange on a link that replaces a lost one: each side says the
    /// next line it expects; what the other has not got is sent again.
    async fn resume(&mut self, reliable: &mut Reliable) -> Result<Sent, PeerError> {
        if let Err(why) = self
            .send(Chat::Resume {
                next: reliable.next_expected,
            })
            .await
        {
            return Ok(Err(why));
        }
        let theirs = match timeout(ACK_TIMEOUT, self.inner.recv()).await {
            Ok(Some(Ok(Chat::Resume { next }))) => next,
            Ok(Some(Ok(other))) => {
                return Err(PeerError::Protocol(format!(
                    "expected the resume on the new link, got {other:?}"
                )))
            }
            Ok(Some(Err(RecvError::Sealed(e)))) => {
                return Ok(Err(format!("a message on it was refused: {e}")))
            }
            Ok(Some(Err(RecvError::Link(e)))) => return Ok(Err(e)),
            Ok(None) => return Ok(Err("closed during the resume".into())),
            Err(_) => return Ok(Err("no resume from the other side in time".into())),
        };
        if theirs > reliable.next_seq {
            return Err(PeerError::Protocol(format!(
                "the other side claims line {} arrived, but only {} were sent",
                theirs - 1,
                reliable.next_seq - 1
            )));
        }
        reliable.ack(theirs.saturating_sub(1));
        for p in &mut reliable.unacked {
            p.sent = None;
        }
        Ok(Ok(()))
    }

    /// Acts on a received message other than the goodbye.
    async fn handle(
        &mut self,
        msg: Chat,
        ctx: &mut ChatContext,
        output: &mut dyn Output,
    ) -> Result<Sent, PeerError> {
        match msg {
            Chat::Line { seq, text } => {
                let new = ctx.reliable.receive(seq).map_err(PeerError::Protocol)?;
                if new {
                    ctx.stats.received += 1;
                    output.incoming(&ctx.their_name, &text);
                }
                let upto = ctx.reliable.received_upto();
                return Ok(self.send(Chat::Ack { upto }).await);
            }
            Chat::Ack { upto } => {
                let now = Instant::now();
                let line_sent = ctx
                    .reliable
                    .unacked
                    .iter()
                    .find(|p| p.seq == upto)
                    .and_then(|p| p.sent);
                if let Some(sent) = line_sent.or(self.ping_sent) {
                    ctx.rtt = Some(now - sent);
                }
                ctx.reliable.ack(upto);
                self.ping_sent = None;
            }
            Chat::Ping => {
                let upto = ctx.reliable.received_upto();
                return Ok(self.send(Chat::Ack { upto }).await);
            }
            Chat::Nick { name } => match validate_name(&name) {
                Ok(()) => {
                    let name = sanitize_for_terminal(&name);
                    output.status(&format!("{} is now known as {name}", ctx.their_name));
                    ctx.their_name = name;
                }
                Err(e) => output.status(&format!("{} sent an unusable name ({e})", ctx.their_name)),
            },
            // Resume: only the first message of a resumed link; a late one
            // changes nothing. Reveal: taken by the first link's handshake; a
            // late one changes nothing either. The others are handled by the
            // chat loop.
            Chat::Resume { .. } | Chat::Reveal { .. } | Chat::Bye | Chat::TryDirect => {}
        }
        Ok(Ok(()))
    }

    /// When the next timer is due: a keepalive, or an acknowledgement overdue.
    fn next_deadline(&self, reliable: &Reliable) -> Instant {
        let mut due = self.last_sent + HEARTBEAT_INTERVAL;
        for sent in [reliable.oldest_sent(), self.ping_sent]
            .into_iter()
            .flatten()
        {
            due = due.min(sent + ACK_TIMEOUT);
        }
        due
    }

    /// Declares the link down if an acknowledgement is overdue; sends a
    /// keepalive if we have been quiet.
    async fn tick(&mut self, reliable: &Reliable) -> Sent {
        let now = Instant::now();
        let overdue = [reliable.oldest_sent(), self.ping_sent]
            .into_iter()
            .flatten()
            .any(|sent| now >= sent + ACK_TIMEOUT);
        if overdue {
            return Err(format!(
                "no acknowledgement for {} s",
                ACK_TIMEOUT.as_secs()
            ));
        }
        if now >= self.last_sent + HEARTBEAT_INTERVAL {
            self.send(Chat::Ping).await?;
            self.ping_sent.get_or_insert(now);
        }
        Ok(())
    }
}

/// Takes one typed line: numbered, kept until acknowledged, and sent; or the
/// user is told why not.
async fn send_line(
    link: &mut Carrier<'_>,
    ctx: &mut ChatContext,
    output: &mut dyn Output,
    text: String,
) -> Sent {
    if let Err(e) = validate_line(&text) {
        output.status(&format!("not sent: {e}"));
        return Ok(());
    }
    ctx.reliable.push(text);
    ctx.stats.sent += 1;
    link.flush(&mut ctx.reliable).await
}

/// What `/info` prints: the fixed facts, then the live numbers.
fn info_lines(link: &SecureLink, ctx: &ChatContext) -> Vec<String> {
    let mut lines: Vec<String> = ctx
        .facts
        .iter()
        .map(|(label, value)| format!("{label:<12} {value}"))
        .collect();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let rtt = match (link.rtt(), ctx.rtt) {
        (Some(kernel), _) => format!("{:.1} ms (the kernel's estimate)", ms(kernel)),
        (None, Some(chat)) => format!(
            "{:.1} ms (the last line or keepalive and its acknowledgement)",
            ms(chat)
        ),
        (None, None) => "not measured yet (after the first line or keepalive)".to_owned(),
    };
    lines.push(format!("{:<12} {rtt}", "rtt"));
    let (sent, received) = link.bytes();
    lines.push(format!(
        "{:<12} {} lines and {sent} bytes sent, {} lines and {received} bytes received (encrypted, this link); {} awaiting acknowledgement",
        "traffic", ctx.stats.sent, ctx.stats.received, ctx.reliable.unacked()
    ));
    lines.push(format!(
        "{:<12} you are {}, the other side is {}",
        "names", ctx.our_name, ctx.their_name
    ));
    lines.push(format!(
        "{:<12} {}",
        "verification",
        ctx.words.as_deref().unwrap_or("none")
    ));
    lines
}

fn lost(their_name: &str, why: &str) -> PeerError {
    PeerError::LinkLost {
        name: their_name.to_owned(),
        why: why.to_owned(),
    }
}
