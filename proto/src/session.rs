//! The chat session, with no I/O and no clock: everything a chat does over its
//! links except moving bytes.
//!
//! A [`Session`] lives as long as the chat; links come and go under it. The
//! program that drives it (the peer's async code, or a simulation in a test)
//! tells it what happened and does what it asks:
//!
//! - in: [`Session::link_up`] and [`Session::link_down`] (a link was secured, or
//!   failed), [`Session::handle`] (a message arrived), [`Session::send_line`],
//!   [`Session::rename`] and [`Session::quit`] (the user), [`Session::handle_timeout`]
//!   (the time from [`Session::poll_timeout`] came), and
//!   [`Session::direct_attempt_failed`];
//! - out: [`Session::poll_transmit`] (messages for the current link, in order),
//!   [`Session::poll_event`] (what the user sees and what the driver must do) and
//!   [`Session::poll_timeout`] (when to call [`Session::handle_timeout`]).
//!
//! Time is passed in with every call, so tests step a clock instead of waiting.
//!
//! # What it owns
//!
//! **Numbering and acknowledgement.** Each direction numbers its lines from 1.
//! The sender keeps a line until the other side acknowledges it (cumulatively,
//! [`Chat::Ack`]); the receiver shows a line only if it is the next expected, so
//! a line sent again on a new link is never shown twice.
//!
//! **Keepalive and dead links.** A side quiet for [`Config::heartbeat`] sends
//! [`Chat::Ping`], answered at once with an acknowledgement. A line or keepalive
//! unacknowledged for [`Config::ack_timeout`] means the link is dead
//! ([`Event::LinkDown`]).
//!
//! **Resume.** Every link after the first starts with [`Chat::Resume`] both
//! ways: the next line each side expects. Each side drops what the other has and
//! sends the rest again. Lines typed while no link carries them are kept.
//!
//! **Goodbye.** Leaving is a two-way goodbye so nothing typed is lost:
//! 1. the side that leaves sends [`Chat::Bye`] after its last line and keeps
//!    reading (lines still arriving are shown and acknowledged);
//! 2. the other side, reading `Bye`, has by then received every line before it
//!    (a link is one ordered stream); it answers `Bye` and ends;
//! 3. the answering `Bye`, once every line is acknowledged, proves to the
//!    leaving side that everything it sent was received; only then does it end
//!    successfully. (When both leave at once, each `Bye` crosses the other; the
//!    acknowledgements that follow still settle every line.)
//!
//! **The switch to direct.** On a relayed link, the side the rendezvous named
//! leader asks every [`Config::upgrade_interval`] to try for a direct link
//! ([`Chat::TryDirect`]); both sides then get [`Event::TryDirect`] and try in the
//! background while the relay carries on. A direct link that comes replaces the
//! relayed one through [`Session::link_up`], with a resume.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use crate::defaults::{ACK_TIMEOUT, HEARTBEAT_INTERVAL};
use crate::{validate_line, validate_name, Chat, InvalidField};

/// How long the leaving side waits for the other's answering goodbye.
pub const BYE_TIMEOUT: Duration = Duration::from_secs(10);

/// While relayed, how often the peers try again for a direct link (a NAT's
/// behaviour or the network can change: a laptop moves, a firewall rule goes).
pub const UPGRADE_INTERVAL: Duration = Duration::from_secs(60);

/// A session's timings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Quiet for this long, a side sends a keepalive.
    pub heartbeat: Duration,
    /// A line or keepalive unacknowledged for this long means the link is
    /// dead; so does a new link whose resume does not come within it.
    pub ack_timeout: Duration,
    /// How long the leaving side waits for the answering goodbye.
    pub bye_timeout: Duration,
    /// While relayed, the leader asks for a direct link this often.
    pub upgrade_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            heartbeat: HEARTBEAT_INTERVAL,
            ack_timeout: ACK_TIMEOUT,
            bye_timeout: BYE_TIMEOUT,
            upgrade_interval: UPGRADE_INTERVAL,
        }
    }
}

/// What kind of link [`Session::link_up`] brings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkKind {
    /// Through the rendezvous' relay rather than punched.
    pub relayed: bool,
    /// The rendezvous named this side leader for this link's meeting: on a
    /// relayed link, it is the side that asks for a direct one.
    pub leads: bool,
}

/// How a chat ended well.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatEnd {
    /// We left; the other side confirmed it received everything.
    WeLeft,
    /// We were interrupted; the other side confirmed it received everything.
    Interrupted,
    /// The other side left.
    TheyLeft,
}

/// Why a link stopped carrying the chat (which goes on over a new one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DownReason {
    /// A line or keepalive went unacknowledged this long.
    Unacknowledged(Duration),
    /// The new link's resume did not come from the other side in time.
    NoResume,
    /// The driver saw the link fail (reset, closed, a write that did not
    /// complete, a message refused): in its words.
    Link(String),
}

impl fmt::Display for DownReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DownReason::Unacknowledged(d) => {
                write!(f, "no acknowledgement for {} s", d.as_secs())
            }
            DownReason::NoResume => f.write_str("no resume from the other side in time"),
            DownReason::Link(why) => f.write_str(why),
        }
    }
}

/// Why a chat ended badly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The other side sent a line out of order (lines are never skipped).
    LineOutOfOrder {
        /// The line's number.
        got: u64,
        /// The number expected.
        expected: u64,
    },
    /// The first message on a resumed link was not the resume.
    NotResume(Chat),
    /// The other side's resume acknowledges lines never sent.
    ResumeBeyondSent {
        /// The last line it claims to have.
        claimed: u64,
        /// The last line sent.
        sent: u64,
    },
    /// We left, and the answering goodbye did not come in this time.
    ByeUnanswered(Duration),
    /// We left, and the link went down before the answering goodbye.
    LostWhileLeaving(DownReason),
    /// We left while no link carried the chat.
    LeftWhileReconnecting,
}

impl Failure {
    /// Whether the other side broke the protocol (rather than the link or the
    /// user ending the chat).
    pub fn is_protocol(&self) -> bool {
        matches!(
            self,
            Failure::LineOutOfOrder { .. }
                | Failure::NotResume(_)
                | Failure::ResumeBeyondSent { .. }
        )
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::LineOutOfOrder { got, expected } => {
                write!(f, "line {got} arrived while line {expected} was expected")
            }
            Failure::NotResume(other) => {
                write!(f, "expected the resume on the new link, got {other:?}")
            }
            Failure::ResumeBeyondSent { claimed, sent } => write!(
                f,
                "the other side claims line {claimed} arrived, but only {sent} were sent"
            ),
            Failure::ByeUnanswered(d) => write!(
                f,
                "no answer to our goodbye within {} s: delivery of the last lines is not confirmed",
                d.as_secs()
            ),
            Failure::LostWhileLeaving(why) => write!(f, "{why}"),
            Failure::LeftWhileReconnecting => f.write_str("you left while reconnecting"),
        }
    }
}

/// What the user sees, and what the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A new line from the other side (not sanitised: the display does that).
    Line(String),
    /// The other side now goes by this (valid, not sanitised) name.
    Renamed(String),
    /// The other side sent a name that is not valid; it keeps its old one.
    UnusableName(InvalidField),
    /// The other side saved us as a contact.
    TheySaved,
    /// The other side's proof that it holds the identity key it introduced
    /// (the driver checks it).
    Proof([u8; 32]),
    /// The link no longer carries the chat: get a new one and call
    /// [`Session::link_up`]. Lines typed meanwhile are kept.
    LinkDown(DownReason),
    /// Try for a direct link in the background (the relay carries on); call
    /// [`Session::direct_attempt_failed`] if none comes, or
    /// [`Session::link_up`] with it.
    TryDirect,
    /// The chat is over; nothing more comes from the session. On
    /// [`ChatEnd::TheyLeft`], send what [`Session::poll_transmit`] still gives
    /// (the answering goodbye) before closing the link.
    Ended(Result<ChatEnd, Failure>),
}

/// What became of a typed line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queued {
    /// It goes out on the current link.
    OnLink,
    /// No link carries the chat right now: it goes out on the next one.
    Kept,
}

/// Why a typed line was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineRefused {
    /// The line is not valid (too long).
    #[error(transparent)]
    Invalid(#[from] InvalidField),
    /// We are leaving, or the chat is over.
    #[error("the chat is ending")]
    Ending,
}

/// Why a new name was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenameRefused {
    /// The name is not valid.
    #[error(transparent)]
    Invalid(#[from] InvalidField),
    /// No link carries the chat right now.
    #[error("no link right now")]
    NoLink,
}

/// Lines each way.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Lines sent (taken from the user).
    pub sent: u64,
    /// Lines received and shown.
    pub received: u64,
}

/// A chat across links; see the [module](self) documentation.
#[derive(Debug)]
pub struct Session {
    config: Config,
    numbering: Numbering,
    /// Links brought so far: every one after the first resumes.
    links: u64,
    link: Option<LinkState>,
    /// We are leaving, and how.
    leaving: Option<ChatEnd>,
    /// When our goodbye went out: the answer is due by this plus the timeout.
    bye_sent: Option<Instant>,
    /// The other side's goodbye came while we were leaving too.
    their_bye: bool,
    ended: bool,
    /// A try for a direct link is running.
    attempting: bool,
    next_upgrade: Option<Instant>,
    transmit: VecDeque<Chat>,
    /// Messages held until a link is open for them (a new name typed during
    /// a resume goes out after it, on this link or the next).
    after_resume: Vec<Chat>,
    events: VecDeque<Event>,
    stats: Stats,
    rtt: Option<Duration>,
}

#[derive(Debug)]
struct LinkState {
    kind: LinkKind,
    last_sent: Instant,
    ping_sent: Option<Instant>,
    /// Set while the other side's resume is awaited: by when it must come.
    resume_due: Option<Instant>,
}

impl Session {
    /// A chat with no link yet: call [`Session::link_up`] with the first.
    pub fn new(config: Config) -> Session {
        Session {
            config,
            numbering: Numbering::default(),
            links: 0,
            link: None,
            leaving: None,
            bye_sent: None,
            their_bye: false,
            ended: false,
            attempting: false,
            next_upgrade: None,
            transmit: VecDeque::new(),
            after_resume: Vec::new(),
            events: VecDeque::new(),
            stats: Stats::default(),
            rtt: None,
        }
    }

    /// A new link carries the chat from now on (replacing the current one, if
    /// any). Every link after the first begins with the resume exchange.
    pub fn link_up(&mut self, now: Instant, kind: LinkKind) {
        self.link_up_carrying(now, kind, 0);
    }

    /// [`Session::link_up`] for a first link whose handshake already carried
    /// our lines up to `carried` (typed before the link was up, in the
    /// leader's first handshake message): they count as sent on it, awaiting
    /// acknowledgement like any other. Ignored on later links (they begin with
    /// the resume exchange).
    pub fn link_up_carrying(&mut self, now: Instant, kind: LinkKind, carried: u64) {
        if self.ended {
            return;
        }
        let resuming = self.links > 0;
        self.links += 1;
        self.transmit.clear();
        self.numbering.unsend();
        if !resuming {
            self.numbering.mark_sent(carried, now);
        }
        // A goodbye that went out on the old link may never have been read
        // (the other side switched links first): it goes again after the
        // resume, and its answer is awaited from then.
        self.bye_sent = None;
        self.attempting = false;
        self.next_upgrade = Some(now + self.config.upgrade_interval);
        self.link = Some(LinkState {
            kind,
            last_sent: now,
            ping_sent: None,
            resume_due: resuming.then_some(now + self.config.ack_timeout),
        });
        if resuming {
            let next = self.numbering.next_expected;
            self.queue(now, Chat::Resume { next });
        } else {
            self.opened(now);
        }
    }

    /// The other side's lines up to `upto` were shown before the first link
    /// was up (they came on the way to it, with the handshake): they count as
    /// received, and are acknowledged on the link. Ignored unless the first
    /// link is up and nothing was received yet.
    pub fn received_early(&mut self, now: Instant, upto: u64) {
        if self.ended || self.links != 1 || self.link.is_none() || upto == 0 {
            return;
        }
        if self.numbering.next_expected != 1 {
            return;
        }
        self.numbering.next_expected = upto + 1;
        self.stats.received += upto;
        self.queue(now, Chat::Ack { upto });
    }

    /// The driver saw the current link fail. The chat goes on over the next
    /// link ([`Event::LinkDown`]), unless we were leaving.
    pub fn link_down(&mut self, now: Instant, why: DownReason) {
        let _ = now;
        if self.ended || self.link.take().is_none() {
            return;
        }
        self.transmit.clear();
        self.numbering.unsend();
        if self.leaving.is_some() {
            self.end(Err(Failure::LostWhileLeaving(why)));
        } else {
            self.events.push_back(Event::LinkDown(why));
        }
    }

    /// The try for a direct link ended without one; the leader asks again
    /// after [`Config::upgrade_interval`] from its last request.
    pub fn direct_attempt_failed(&mut self) {
        self.attempting = false;
    }

    /// A message from the other side, on the current link.
    pub fn handle(&mut self, now: Instant, msg: Chat) {
        if self.ended {
            return;
        }
        let Some(link) = self.link.as_mut() else {
            return;
        };
        if link.resume_due.is_some() {
            let Chat::Resume { next } = msg else {
                self.end(Err(Failure::NotResume(msg)));
                return;
            };
            if next > self.numbering.next_seq {
                self.end(Err(Failure::ResumeBeyondSent {
                    claimed: next - 1,
                    sent: self.numbering.next_seq - 1,
                }));
                return;
            }
            link.resume_due = None;
            self.numbering.ack(next.saturating_sub(1));
            self.opened(now);
            self.maybe_done();
            return;
        }
        match msg {
            Chat::Line { seq, text } => {
                match self.numbering.receive(seq) {
                    Ok(true) => {
                        self.stats.received += 1;
                        self.events.push_back(Event::Line(text));
                    }
                    Ok(false) => {}
                    Err(expected) => {
                        self.end(Err(Failure::LineOutOfOrder { got: seq, expected }));
                        return;
                    }
                }
                let upto = self.numbering.received_upto();
                self.queue(now, Chat::Ack { upto });
            }
            Chat::Ack { upto } => {
                let sent = self
                    .numbering
                    .sent_at(upto)
                    .or(link.ping_sent.take())
                    .filter(|&sent| sent <= now);
                if let Some(sent) = sent {
                    self.rtt = Some(now - sent);
                }
                link.ping_sent = None;
                self.numbering.ack(upto);
                self.maybe_done();
            }
            Chat::Ping => {
                let upto = self.numbering.received_upto();
                self.queue(now, Chat::Ack { upto });
            }
            Chat::Nick { name } => match validate_name(&name) {
                Ok(()) => self.events.push_back(Event::Renamed(name)),
                Err(e) => self.events.push_back(Event::UnusableName(e)),
            },
            Chat::Saved => self.events.push_back(Event::TheySaved),
            Chat::Proof { mac } => self.events.push_back(Event::Proof(mac)),
            Chat::Bye => {
                if self.leaving.is_some() {
                    self.their_bye = true;
                    self.maybe_done();
                } else {
                    // Every line typed so far is already on the link, before
                    // this answer.
                    self.queue(now, Chat::Bye);
                    self.end(Ok(ChatEnd::TheyLeft));
                }
            }
            Chat::TryDirect => {
                if !self.attempting && self.leaving.is_none() {
                    self.attempting = true;
                    self.next_upgrade = Some(now + self.config.upgrade_interval);
                    self.events.push_back(Event::TryDirect);
                }
            }
            // A resume only opens a resumed link; a late one changes nothing.
            Chat::Resume { .. } => {}
        }
    }

    /// A line typed by the user.
    pub fn send_line(&mut self, now: Instant, text: String) -> Result<Queued, LineRefused> {
        validate_line(&text)?;
        if self.ended || self.leaving.is_some() {
            return Err(LineRefused::Ending);
        }
        self.numbering.push(text);
        self.stats.sent += 1;
        match &self.link {
            None => Ok(Queued::Kept),
            Some(link) => {
                if link.resume_due.is_none() {
                    self.flush(now);
                }
                Ok(Queued::OnLink)
            }
        }
    }

    /// `/nick NAME`: tell the other side our new name.
    pub fn rename(&mut self, now: Instant, name: &str) -> Result<(), RenameRefused> {
        validate_name(name)?;
        let Some(link) = &self.link else {
            return Err(RenameRefused::NoLink);
        };
        let msg = Chat::Nick {
            name: name.to_owned(),
        };
        if link.resume_due.is_some() {
            self.after_resume.push(msg);
        } else {
            self.queue(now, msg);
        }
        Ok(())
    }

    /// We saved the other side as a contact: tell it, on this link or, with
    /// none right now, on the next one once it has resumed. (A word is not
    /// acknowledged: one put on a link that is already failing unseen is
    /// lost, like a `/nick`.)
    pub fn saved(&mut self, now: Instant) {
        self.tell(now, Chat::Saved);
    }

    /// Our proof that we hold the identity key we introduced: on this link,
    /// or on the next once it has resumed.
    pub fn prove(&mut self, now: Instant, mac: [u8; 32]) {
        self.tell(now, Chat::Proof { mac });
    }

    /// A word for the other side (not a line: not numbered, not
    /// acknowledged), on this link or after the next one's resume.
    fn tell(&mut self, now: Instant, msg: Chat) {
        match &self.link {
            Some(link) if link.resume_due.is_none() => self.queue(now, msg),
            _ => self.after_resume.push(msg),
        }
    }

    /// The user leaves (end of input, `/quit`; Ctrl-C with `interrupted`): the
    /// goodbye goes out after every line typed, once the link carries them.
    pub fn quit(&mut self, now: Instant, interrupted: bool) {
        if self.ended || self.leaving.is_some() {
            return;
        }
        self.leaving = Some(if interrupted {
            ChatEnd::Interrupted
        } else {
            ChatEnd::WeLeft
        });
        match &self.link {
            None => self.end(Err(Failure::LeftWhileReconnecting)),
            Some(link) if link.resume_due.is_some() => {}
            Some(_) => self.send_bye(now),
        }
    }

    /// When [`Session::handle_timeout`] is next due (`None`: not while nothing
    /// is on a link, or after the end).
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.ended {
            return None;
        }
        let link = self.link.as_ref()?;
        if let Some(due) = link.resume_due {
            return Some(due);
        }
        if let Some(sent) = self.bye_sent {
            return Some(sent + self.config.bye_timeout);
        }
        let mut due = link.last_sent + self.config.heartbeat;
        for sent in [self.numbering.oldest_sent(), link.ping_sent]
            .into_iter()
            .flatten()
        {
            due = due.min(sent + self.config.ack_timeout);
        }
        if let Some(upgrade) = self.upgrade_due() {
            due = due.min(upgrade);
        }
        Some(due)
    }

    /// Acts on the timers that are due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.ended {
            return;
        }
        let Some(link) = self.link.as_mut() else {
            return;
        };
        if let Some(due) = link.resume_due {
            if now >= due {
                self.link_down(now, DownReason::NoResume);
            }
            return;
        }
        if let Some(sent) = self.bye_sent {
            if now >= sent + self.config.bye_timeout {
                self.end(Err(Failure::ByeUnanswered(self.config.bye_timeout)));
            }
            return;
        }
        let overdue = [self.numbering.oldest_sent(), link.ping_sent]
            .into_iter()
            .flatten()
            .any(|sent| now >= sent + self.config.ack_timeout);
        if overdue {
            self.link_down(now, DownReason::Unacknowledged(self.config.ack_timeout));
            return;
        }
        if now >= link.last_sent + self.config.heartbeat {
            link.ping_sent.get_or_insert(now);
            self.queue(now, Chat::Ping);
        }
        if self.upgrade_due().is_some_and(|due| now >= due) {
            self.attempting = true;
            self.next_upgrade = Some(now + self.config.upgrade_interval);
            self.queue(now, Chat::TryDirect);
            self.events.push_back(Event::TryDirect);
        }
    }

    /// The next message for the current link.
    pub fn poll_transmit(&mut self) -> Option<Chat> {
        self.transmit.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Lines each way so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Lines sent and not yet acknowledged.
    pub fn unacked(&self) -> usize {
        self.numbering.unacked.len()
    }

    /// The last round trip measured by the chat (a line or keepalive and its
    /// acknowledgement).
    pub fn rtt(&self) -> Option<Duration> {
        self.rtt
    }

    /// Whether a link carries the chat now.
    pub fn has_link(&self) -> bool {
        self.link.is_some()
    }

    /// Whether we are leaving (the goodbye is out or waits for the resume).
    pub fn is_leaving(&self) -> bool {
        self.leaving.is_some()
    }

    /// Whether the chat is over.
    pub fn is_ended(&self) -> bool {
        self.ended
    }

    /// The link is open for the chat (the first, or a resumed one after the
    /// exchange): everything waiting goes out.
    fn opened(&mut self, now: Instant) {
        self.flush(now);
        for msg in std::mem::take(&mut self.after_resume) {
            self.queue(now, msg);
        }
        if self.leaving.is_some() && self.bye_sent.is_none() {
            self.send_bye(now);
        }
    }

    fn send_bye(&mut self, now: Instant) {
        self.queue(now, Chat::Bye);
        self.bye_sent = Some(now);
    }

    /// While leaving: done once the other side said goodbye and has every line.
    fn maybe_done(&mut self) {
        if self.their_bye && self.numbering.unacked.is_empty() {
            if let Some(end) = self.leaving {
                self.end(Ok(end));
            }
        }
    }

    /// Every line not yet on this link goes out, in order.
    fn flush(&mut self, now: Instant) {
        let mut out = Vec::new();
        for p in self
            .numbering
            .unacked
            .iter_mut()
            .filter(|p| p.sent.is_none())
        {
            p.sent = Some(now);
            out.push(Chat::Line {
                seq: p.seq,
                text: p.text.clone(),
            });
        }
        for msg in out {
            self.queue(now, msg);
        }
    }

    fn queue(&mut self, now: Instant, msg: Chat) {
        if let Some(link) = self.link.as_mut() {
            link.last_sent = now;
            self.transmit.push_back(msg);
        }
    }

    fn upgrade_due(&self) -> Option<Instant> {
        let link = self.link.as_ref()?;
        let asks = link.kind.relayed
            && link.kind.leads
            && !self.attempting
            && self.leaving.is_none()
            && link.resume_due.is_none();
        asks.then_some(self.next_upgrade?)
    }

    fn end(&mut self, result: Result<ChatEnd, Failure>) {
        self.ended = true;
        self.events.push_back(Event::Ended(result));
    }
}

/// Lines, numbered and acknowledged, that outlive any one link.
#[derive(Debug)]
struct Numbering {
    next_seq: u64,
    unacked: VecDeque<Pending>,
    next_expected: u64,
}

#[derive(Debug)]
struct Pending {
    seq: u64,
    text: String,
    /// When it went out on the current link; `None` while no link carries it.
    sent: Option<Instant>,
}

impl Default for Numbering {
    fn default() -> Self {
        Numbering {
            next_seq: 1,
            unacked: VecDeque::new(),
            next_expected: 1,
        }
    }
}

impl Numbering {
    fn push(&mut self, text: String) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.unacked.push_back(Pending {
            seq,
            text,
            sent: None,
        });
    }

    fn ack(&mut self, upto: u64) {
        while self.unacked.front().is_some_and(|p| p.seq <= upto) {
            self.unacked.pop_front();
        }
    }

    /// Lines up to `upto` went out at `now` (on a link's handshake).
    fn mark_sent(&mut self, upto: u64, now: Instant) {
        for p in self.unacked.iter_mut().filter(|p| p.seq <= upto) {
            p.sent = Some(now);
        }
    }

    /// No line is on a link any more (it went down, or a new one came).
    fn unsend(&mut self) {
        for p in &mut self.unacked {
            p.sent = None;
        }
    }

    /// A received line: `Ok(true)` if it is new and in order (to be shown),
    /// `Ok(false)` if already had, `Err(expected)` if it skips ahead.
    fn receive(&mut self, seq: u64) -> Result<bool, u64> {
        if seq == self.next_expected {
            self.next_expected += 1;
            Ok(true)
        } else if seq < self.next_expected {
            Ok(false)
        } else {
            Err(self.next_expected)
        }
    }

    fn received_upto(&self) -> u64 {
        self.next_expected - 1
    }

    fn sent_at(&self, seq: u64) -> Option<Instant> {
        self.unacked
            .iter()
            .find(|p| p.seq == seq)
            .and_then(|p| p.sent)
    }

    /// When the oldest line on the link went out.
    fn oldest_sent(&self) -> Option<Instant> {
        self.unacked.iter().filter_map(|p| p.sent).min()
    }
}
