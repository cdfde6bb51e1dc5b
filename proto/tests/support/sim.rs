//! A simulated pair: two chat sessions, the links between them, and a stepped
//! clock.
//!
//! A link is a TCP stream: ordered, each direction with its own latency. What
//! goes wrong on a real path is what the simulation can do to a link: cut it (a
//! reset or close each side sees after the latency), or make it go silent in
//! one direction or both (a path that stops carrying, a NAT that forgot the
//! flow) so that only the sessions' timers can find out. A hostile or broken
//! carrier that duplicates or reorders messages inside a link can be switched
//! on too ([`Sim::faults`]), to check that a session never shows a line twice
//! or out of order whatever it is fed.
//!
//! When both sides have lost their link, the "rendezvous" brings them a new one
//! after [`Sim::meet_delay`]; when both ask for a direct link, one comes (or
//! not, per [`Sim::direct_works`]) the same way.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use punchline_proto::session::{ChatEnd, Config, DownReason, Event, Failure, LinkKind, Session};
use punchline_proto::Chat;

/// The two sides.
pub const A: usize = 0;
/// The two sides.
pub const B: usize = 1;

/// How long a background try for a direct link may take before it fails.
pub const TRY_DIRECT_TIMEOUT: Duration = Duration::from_secs(30);

/// One side: its session and what its user saw.
pub struct Side {
    pub session: Session,
    /// Lines shown, in order.
    pub shown: Vec<String>,
    /// Lines typed and taken by the session, in order.
    pub typed: Vec<String>,
    pub ended: Option<Result<ChatEnd, Failure>>,
    pub ended_at: Option<Instant>,
    pub downs: Vec<(Instant, DownReason)>,
    pub renamed: Vec<String>,
    /// How many times the other side said it saved this one.
    pub they_saved: usize,
    /// Every message handed to a link, with when.
    pub sent: Vec<(Instant, Chat)>,
    /// Every [`Event::TryDirect`], with when.
    pub try_direct: Vec<Instant>,
    trying_since: Option<Instant>,
    link: Option<u64>,
}

struct Link {
    id: u64,
    /// Messages toward side `i` vanish.
    silent: [bool; 2],
    /// When the last message toward side `i` arrives (a stream keeps order).
    last_arrival: [Option<Instant>; 2],
}

enum Payload {
    Msg(Chat),
    /// A reset or close, as the driver sees it.
    Closed,
}

struct Packet {
    at: Instant,
    order: u64,
    link: u64,
    to: usize,
    payload: Payload,
}

/// Something done at a given time.
pub enum Action {
    Type(usize, String),
    Quit(usize),
    Interrupt(usize),
    Rename(usize, String),
    /// The side saved the other as a contact.
    Save(usize),
    /// Both sides see the link close (a reset), after its latency.
    Cut,
    /// The link stops carrying toward this side, silently.
    Silence(usize),
    /// The link stops carrying both ways, silently.
    SilenceBoth,
    /// A message that seems to come from the other side, on the current link.
    Inject(usize, Chat),
}

/// Faults of a broken carrier inside one link (a TCP stream never does these).
#[derive(Clone, Copy, Default)]
pub struct Faults {
    /// Chance that a message is delivered twice.
    pub duplicate: f64,
    /// Chance that a message ignores the order of its stream.
    pub reorder: f64,
}

pub struct Sim {
    pub start: Instant,
    pub now: Instant,
    pub sides: [Side; 2],
    /// One-way delay of every link (from the time a message is sent).
    pub latency: Duration,
    pub meet_delay: Duration,
    pub direct_works: bool,
    pub faults: Faults,
    /// Links the sides were given, with when and what kind.
    pub links_made: Vec<(Instant, LinkKind)>,
    leader: usize,
    links: Vec<Link>,
    packets: Vec<Packet>,
    actions: Vec<(Instant, u64, Action)>,
    relink_at: Option<Instant>,
    next_id: u64,
    order: u64,
    rng: u64,
    /// Steps taken: a bound catches a session that keeps asking for the same
    /// instant (a busy loop in a driver).
    pub steps: u64,
}

impl Side {
    fn new(config: Config) -> Side {
        Side {
            session: Session::new(config),
            shown: Vec::new(),
            typed: Vec::new(),
            ended: None,
            ended_at: None,
            downs: Vec::new(),
            renamed: Vec::new(),
            they_saved: 0,
            sent: Vec::new(),
            try_direct: Vec::new(),
            trying_since: None,
            link: None,
        }
    }

    /// Pings handed to a link.
    pub fn pings(&self) -> usize {
        self.sent.iter().filter(|(_, m)| *m == Chat::Ping).count()
    }
}

impl Sim {
    /// Two sessions with `config`, joined by a first link (direct unless
    /// `relayed`), A leading.
    pub fn new(config: Config, relayed: bool) -> Sim {
        let start = Instant::now();
        let mut sim = Sim {
            start,
            now: start,
            sides: [Side::new(config), Side::new(config)],
            latency: Duration::from_millis(40),
            meet_delay: Duration::from_millis(500),
            direct_works: true,
            faults: Faults::default(),
            links_made: Vec::new(),
            leader: A,
            links: Vec::new(),
            packets: Vec::new(),
            actions: Vec::new(),
            relink_at: None,
            next_id: 0,
            order: 0,
            rng: 0x9E37_79B9_7F4A_7C15,
            steps: 0,
        };
        sim.connect(relayed);
        sim
    }

    /// Seeds the carrier's faults.
    pub fn seed(&mut self, seed: u64) {
        self.rng = seed | 1;
    }

    /// Schedules `action` at `at` after the start.
    pub fn at(&mut self, at: Duration, action: Action) {
        self.order += 1;
        self.actions.push((self.start + at, self.order, action));
    }

    /// Time since the start.
    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// Runs until nothing is left to happen, or `limit` after the start.
    pub fn run(&mut self, limit: Duration) {
        let limit = self.start + limit;
        while let Some(t) = self.next_time() {
            if t > limit {
                self.now = limit;
                return;
            }
            self.now = self.now.max(t);
            self.steps += 1;
            assert!(
                self.steps < 2_000_000,
                "busy loop at {:?}",
                self.now - self.start
            );
            self.step();
        }
    }

    /// Both sides ended.
    pub fn both_ended(&self) -> bool {
        self.sides.iter().all(|s| s.ended.is_some())
    }

    fn next_time(&self) -> Option<Instant> {
        let mut times: Vec<Instant> = Vec::new();
        times.extend(self.actions.iter().map(|a| a.0));
        times.extend(self.packets.iter().map(|p| p.at));
        for side in &self.sides {
            times.extend(side.session.poll_timeout());
            times.extend(side.trying_since.map(|t| t + TRY_DIRECT_TIMEOUT));
        }
        times.extend(self.relink_at);
        if let Some(t) = self.direct_at() {
            times.push(t);
        }
        times.into_iter().min()
    }

    /// When both sides try for a direct link, it comes a meeting later.
    fn direct_at(&self) -> Option<Instant> {
        let a = self.sides[A].trying_since?;
        let b = self.sides[B].trying_since?;
        Some(a.max(b) + self.meet_delay)
    }

    fn step(&mut self) {
        let now = self.now;
        // Actions due, in the order scheduled.
        self.actions.sort_by_key(|a| (a.0, a.1));
        while self.actions.first().is_some_and(|a| a.0 <= now) {
            let (_, _, action) = self.actions.remove(0);
            self.act(action);
        }
        // Messages due, in arrival order.
        self.packets.sort_by_key(|p| (p.at, p.order));
        while self.packets.first().is_some_and(|p| p.at <= now) {
            let p = self.packets.remove(0);
            self.deliver(p);
        }
        for i in [A, B] {
            if self.sides[i]
                .session
                .poll_timeout()
                .is_some_and(|t| t <= now)
            {
                self.sides[i].session.handle_timeout(now);
                self.pump(i);
            }
        }
        if self.direct_at().is_some_and(|t| t <= now) {
            for i in [A, B] {
                self.sides[i].trying_since = None;
            }
            if self.direct_works {
                self.connect(false);
            } else {
                for i in [A, B] {
                    self.sides[i].session.direct_attempt_failed();
                }
            }
        }
        for i in [A, B] {
            if self.sides[i]
                .trying_since
                .is_some_and(|t| t + TRY_DIRECT_TIMEOUT <= now)
            {
                self.sides[i].trying_since = None;
                self.sides[i].session.direct_attempt_failed();
                self.pump(i);
            }
        }
        if self.relink_at.is_some_and(|t| t <= now) {
            self.relink_at = None;
            if self
                .sides
                .iter()
                .all(|s| s.link.is_none() && s.ended.is_none())
            {
                self.connect(false);
            }
        }
        self.plan_relink();
    }

    fn plan_relink(&mut self) {
        let both_looking = self
            .sides
            .iter()
            .all(|s| s.link.is_none() && s.ended.is_none());
        if both_looking && self.relink_at.is_none() {
            self.relink_at = Some(self.now + self.meet_delay);
        }
    }

    /// A new link for both sides (replacing whatever they had).
    fn connect(&mut self, relayed: bool) {
        self.next_id += 1;
        let id = self.next_id;
        self.links.push(Link {
            id,
            silent: [false; 2],
            last_arrival: [None; 2],
        });
        for i in [A, B] {
            let kind = LinkKind {
                relayed,
                leads: i == self.leader,
            };
            if i == A {
                self.links_made.push((self.now, kind));
            }
            let side = &mut self.sides[i];
            side.link = Some(id);
            side.trying_since = None;
            side.session.link_up(self.now, kind);
        }
        for i in [A, B] {
            self.pump(i);
        }
    }

    fn current_link(&mut self) -> Option<&mut Link> {
        let id = self.sides[A].link.or(self.sides[B].link)?;
        self.links.iter_mut().find(|l| l.id == id)
    }

    fn act(&mut self, action: Action) {
        let now = self.now;
        match action {
            Action::Type(i, text) => {
                if self.sides[i].session.send_line(now, text.clone()).is_ok() {
                    self.sides[i].typed.push(text);
                }
                self.pump(i);
            }
            Action::Quit(i) => {
                self.sides[i].session.quit(now, false);
                self.pump(i);
            }
            Action::Interrupt(i) => {
                self.sides[i].session.quit(now, true);
                self.pump(i);
            }
            Action::Rename(i, name) => {
                let _ = self.sides[i].session.rename(now, &name);
                self.pump(i);
            }
            Action::Save(i) => {
                self.sides[i].session.saved(now);
                self.pump(i);
            }
            Action::Cut => {
                for i in [A, B] {
                    if let Some(id) = self.sides[i].link {
                        self.send(id, i, Payload::Closed);
                    }
                }
            }
            Action::Silence(toward) => {
                if let Some(link) = self.current_link() {
                    link.silent[toward] = true;
                }
            }
            Action::SilenceBoth => {
                if let Some(link) = self.current_link() {
                    link.silent = [true, true];
                }
            }
            Action::Inject(to, msg) => {
                if self.sides[to].link.is_some() {
                    self.sides[to].session.handle(now, msg);
                    self.pump(to);
                }
            }
        }
    }

    fn deliver(&mut self, p: Packet) {
        let now = self.now;
        let silent = self
            .links
            .iter()
            .find(|l| l.id == p.link)
            .is_some_and(|l| l.silent[p.to]);
        let side = &mut self.sides[p.to];
        if side.link != Some(p.link) || silent {
            return;
        }
        match p.payload {
            Payload::Msg(msg) => side.session.handle(now, msg),
            Payload::Closed => side
                .session
                .link_down(now, DownReason::Link("reset by the other side".into())),
        }
        self.pump(p.to);
    }

    /// Puts a message from side `from` on link `id`, toward the other side.
    fn send(&mut self, id: u64, from: usize, payload: Payload) {
        let to = 1 - from;
        let now = self.now;
        let (duplicate, reorder) = (
            self.chance(self.faults.duplicate),
            self.chance(self.faults.reorder),
        );
        let jitter = Duration::from_micros(self.random() % 20_000);
        let latency = self.latency;
        let Some(link) = self.links.iter_mut().find(|l| l.id == id) else {
            return;
        };
        let mut at = now + latency;
        if reorder {
            at += jitter;
        } else if let Some(last) = link.last_arrival[to] {
            at = at.max(last);
        }
        link.last_arrival[to] = Some(link.last_arrival[to].map_or(at, |l| l.max(at)));
        let copies = if duplicate { 2 } else { 1 };
        for _ in 0..copies {
            self.order += 1;
            let payload = match &payload {
                Payload::Msg(m) => Payload::Msg(m.clone()),
                Payload::Closed => Payload::Closed,
            };
            self.packets.push(Packet {
                at,
                order: self.order,
                link: id,
                to,
                payload,
            });
        }
    }

    /// Does what side `i`'s session asks: messages out, events recorded.
    fn pump(&mut self, i: usize) {
        let now = self.now;
        loop {
            while let Some(msg) = self.sides[i].session.poll_transmit() {
                self.sides[i].sent.push((now, msg.clone()));
                if let Some(id) = self.sides[i].link {
                    self.send(id, i, Payload::Msg(msg));
                }
            }
            let Some(event) = self.sides[i].session.poll_event() else {
                break;
            };
            let side = &mut self.sides[i];
            match event {
                Event::Line(text) => side.shown.push(text),
                Event::Renamed(name) => side.renamed.push(name),
                Event::UnusableName(_) => {}
                Event::TheySaved => side.they_saved += 1,
                Event::Proof(_) => {}
                Event::LinkDown(why) => {
                    side.downs.push((now, why));
                    side.trying_since = None;
                    if let Some(id) = side.link.take() {
                        // The driver drops the link: the other side sees it
                        // closed, if the path still carries.
                        self.send(id, i, Payload::Closed);
                    }
                }
                Event::TryDirect => {
                    side.try_direct.push(now);
                    side.trying_since.get_or_insert(now);
                }
                Event::Ended(result) => {
                    let ok = result.is_ok();
                    side.ended = Some(result);
                    side.ended_at = Some(now);
                    side.trying_since = None;
                    if ok {
                        // The answering goodbye, then the close.
                        let link = side.link;
                        while let Some(msg) = self.sides[i].session.poll_transmit() {
                            self.sides[i].sent.push((now, msg.clone()));
                            if let Some(id) = link {
                                self.send(id, i, Payload::Msg(msg));
                            }
                        }
                    }
                    if let Some(id) = self.sides[i].link.take() {
                        self.send(id, i, Payload::Closed);
                    }
                }
            }
        }
        self.plan_relink();
    }

    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && (self.random() % 1_000_000) as f64 / 1_000_000.0 < p
    }

    fn random(&mut self) -> u64 {
        // xorshift64
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }
}
