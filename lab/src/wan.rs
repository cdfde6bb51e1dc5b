//! The WAN emulator: per-link one-way delay and loss in the lab's "internet"
//! namespace, done in user space with NFQUEUE because this kernel has no
//! `tc netem`.
//!
//! # Model
//!
//! The internet namespace is a router with one link per attachment: side A,
//! side B, the rendezvous host and the probe host. Each link has a
//! [`LinkShape`] (delay and loss) that applies in **both directions**: a packet
//! crossing the internet from link X to link Y is held `delay(X) + delay(Y)` and
//! is lost with the combined probability of both links. So
//!
//! - one-way delay A→B = dA + dB, and RTT A↔B = 2·(dA + dB);
//! - RTT A↔rv = 2·(dA + dRV); RTT B↔rv = 2·(dB + dRV);
//! - traffic that stays on a LAN (two hosts behind one NAT) never enters the
//!   internet namespace and sees no emulated delay;
//! - optionally, one path between two links gets an extra delay of its own
//!   ([`WanConfig::detour`]), for what per-link delays cannot express: two peers
//!   close to each other while the rendezvous is far from one of them (with
//!   per-link delays alone the difference of the peers' distances to the
//!   rendezvous is always smaller than their distance to each other).
//!
//! # How
//!
//! 1. One iptables rule in the internet namespace's FORWARD chain sends every
//!    forwarded IPv4 packet to NFQUEUE queue [`QUEUE_NUM`] (queue numbers are per
//!    network namespace, so concurrent labs do not collide). In a lab with IPv6
//!    ([`Delayer::start_dual_stack`]) an ip6tables rule sends every forwarded
//!    IPv6 packet to the same queue: a queue is bound by number alone (the
//!    per-family bind commands are ignored since Linux 3.8), so one binding
//!    receives both families, and IPv6 packets are delayed, dropped and counted
//!    exactly like IPv4 ones. Neighbour discovery is never forwarded, so it is
//!    never held.
//! 2. A thread of this process enters the internet namespace, binds the queue
//!    (metadata only, no payload copy) and receives packets.
//! 3. For each packet it looks up the input and output interface indexes,
//!    decides loss, and holds the packet in a FIFO per (input, output) path until
//!    its release time; a delay lowered at run time never lets a packet overtake
//!    an earlier one on the same path.
//! 4. When the time comes it gives the verdict "accept" (the kernel then sends the
//!    packet on) or "drop" for a lost packet, at once.
//!
//! The `nfq` crate exposes no file descriptor to wait on, so the thread polls the
//! non-blocking queue: every [`ACTIVE_POLL`] while packets are in flight or were
//! seen recently, every [`IDLE_POLL`] otherwise. The extra delay this adds is at
//! most one poll interval (typically far less than a millisecond under traffic).
//! Measured cost: about 2% of one core per idle lab, about 8% while traffic
//! flows; pings show the configured RTT + about 0.5 ms.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nfq::{Message, Queue, Verdict};

use crate::cmd::{self, IP6TABLES, IPTABLES};
use crate::error::{LabError, Result};
use crate::netns;

/// The NFQUEUE queue number used in each lab's internet namespace.
pub const QUEUE_NUM: u16 = 0;

/// Kernel-side queue capacity, in packets. Packets beyond it are dropped by the
/// kernel. 4096 packets held for 200 ms is about 20k packets/s, far more than a
/// chat or a punch needs, and bounds kernel memory per lab.
pub const QUEUE_MAX_LEN: u32 = 4096;

/// Poll interval while packets are held or traffic was seen within
/// [`IDLE_AFTER`]: bounds the added delay error to 0.2 ms.
pub const ACTIVE_POLL: Duration = Duration::from_micros(200);

/// Poll interval when the links are idle: keeps an idle lab cheap (1000
/// wake-ups/s) at the price of up to 1 ms on the first packet of a burst.
pub const IDLE_POLL: Duration = Duration::from_millis(1);

/// How long after the last packet the emulator falls back to [`IDLE_POLL`].
pub const IDLE_AFTER: Duration = Duration::from_secs(1);

/// Largest one-way delay accepted per link; a longer one is surely a typo (and
/// would make packets pile up in the kernel queue).
pub const MAX_LINK_DELAY: Duration = Duration::from_secs(10);

/// Timer slack asked for the emulator thread, in nanoseconds, so its sleeps end
/// close to the release time (the default slack is 50 µs).
const TIMER_SLACK_NS: std::os::raw::c_ulong = 1_000;

/// Delay and loss of one link between an attachment and the internet, applied
/// to packets in both directions.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LinkShape {
    /// One-way delay added to each packet crossing this link.
    pub delay: Duration,
    /// Probability in `[0, 1]` that a packet crossing this link is lost.
    pub loss: f64,
}

impl LinkShape {
    /// A link with no delay and no loss.
    pub const NONE: LinkShape = LinkShape {
        delay: Duration::ZERO,
        loss: 0.0,
    };

    /// A link with `ms` milliseconds of one-way delay and no loss.
    pub fn delay_ms(ms: u64) -> LinkShape {
        LinkShape {
            delay: Duration::from_millis(ms),
            loss: 0.0,
        }
    }

    /// This link with loss probability `loss` (0..=1).
    pub fn with_loss(self, loss: f64) -> LinkShape {
        LinkShape { loss, ..self }
    }

    fn validate(&self, link: Link) -> Result<()> {
        if !(0.0..=1.0).contains(&self.loss) {
            return Err(LabError::InvalidConfig(format!(
                "loss of link {link:?} must be within 0..=1, got {}",
                self.loss
            )));
        }
        if self.delay > MAX_LINK_DELAY {
            return Err(LabError::InvalidConfig(format!(
                "delay of link {link:?} is {:?}, more than the limit {MAX_LINK_DELAY:?}",
                self.delay
            )));
        }
        Ok(())
    }
}

/// The links of the internet namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Link {
    /// Side A's uplink (for a same-LAN layout, also side B's).
    A,
    /// Side B's uplink (absent in a same-LAN layout).
    B,
    /// The rendezvous host's link.
    Rv,
    /// The probe host's link (a second public host, for tests).
    Probe,
}

/// Shape of every link of the emulated WAN.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct WanConfig {
    /// Side A's link.
    pub a: LinkShape,
    /// Side B's link (ignored in a same-LAN layout: B shares A's uplink).
    pub b: LinkShape,
    /// The rendezvous host's link.
    pub rv: LinkShape,
    /// The probe host's link.
    pub probe: LinkShape,
    /// An extra one-way delay on one path only, both directions.
    pub detour: Option<Detour>,
}

/// An extra delay on the path between two links (both directions), on top of
/// the links' own delays.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Detour {
    /// One end of the path.
    pub from: Link,
    /// The other end.
    pub to: Link,
    /// Added one-way delay.
    pub delay: Duration,
}

impl Detour {
    fn applies(&self, x: Link, y: Link) -> bool {
        (self.from, self.to) == (x, y) || (self.from, self.to) == (y, x)
    }
}

impl WanConfig {
    /// Delays only, in milliseconds, for side A, side B and the rendezvous.
    pub fn delays_ms(a: u64, b: u64, rv: u64) -> WanConfig {
        WanConfig {
            a: LinkShape::delay_ms(a),
            b: LinkShape::delay_ms(b),
            rv: LinkShape::delay_ms(rv),
            probe: LinkShape::NONE,
            detour: None,
        }
    }

    /// The shape of `link`.
    pub fn link(&self, link: Link) -> LinkShape {
        match link {
            Link::A => self.a,
            Link::B => self.b,
            Link::Rv => self.rv,
            Link::Probe => self.probe,
        }
    }

    /// Emulated one-way delay of a packet from `from` to `to` (zero when both
    /// are the same link, i.e. the traffic stays on one LAN).
    pub fn one_way(&self, from: Link, to: Link) -> Duration {
        if from == to {
            Duration::ZERO
        } else {
            self.link(from).delay + self.link(to).delay + self.detour_delay(from, to)
        }
    }

    /// This configuration with an extra one-way delay on the path `from`-`to`.
    pub fn with_detour(self, from: Link, to: Link, delay: Duration) -> WanConfig {
        WanConfig {
            detour: Some(Detour { from, to, delay }),
            ..self
        }
    }

    /// The detour delay of the path between `x` and `y`, if any.
    fn detour_delay(&self, x: Link, y: Link) -> Duration {
        self.detour
            .filter(|d| d.applies(x, y))
            .map_or(Duration::ZERO, |d| d.delay)
    }

    /// Emulated round-trip time between `from` and `to`.
    pub fn rtt(&self, from: Link, to: Link) -> Duration {
        self.one_way(from, to) * 2
    }

    /// Checks every link's shape against the limits.
    pub fn validate(&self) -> Result<()> {
        for link in [Link::A, Link::B, Link::Rv, Link::Probe] {
            self.link(link).validate(link)?;
        }
        if let Some(d) = self.detour {
            if d.delay > MAX_LINK_DELAY || d.from == d.to {
                return Err(LabError::InvalidConfig(format!(
                    "detour {d:?}: two different links and at most {MAX_LINK_DELAY:?}"
                )));
            }
        }
        Ok(())
    }
}

/// Packet counters of a running emulator.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DelayerStats {
    /// Packets received from the queue.
    pub received: u64,
    /// Packets accepted after their delay.
    pub accepted: u64,
    /// Packets dropped as emulated loss.
    pub lost: u64,
}

#[derive(Default)]
struct Counters {
    received: AtomicU64,
    accepted: AtomicU64,
    lost: AtomicU64,
}

/// A running WAN emulator: a thread in the internet namespace serving the
/// NFQUEUE queue. Stopping it (or dropping it) ends the thread; the lab removes
/// the iptables rule with the namespace.
pub struct Delayer {
    stop: Arc<AtomicBool>,
    config: Arc<Mutex<WanConfig>>,
    counters: Arc<Counters>,
    thread: Option<JoinHandle<Result<Result<()>>>>,
}

impl Delayer {
    /// Starts the emulator in namespace `netns` for the given interfaces of that
    /// namespace (name and the link it belongs to), then installs the iptables
    /// rule sending forwarded IPv4 packets to it. Returns once both are in place.
    pub fn start(netns: &str, interfaces: &[(&str, Link)], config: WanConfig) -> Result<Delayer> {
        Delayer::start_families(netns, interfaces, config, false)
    }

    /// Like [`Delayer::start`], and also installs the ip6tables rule sending
    /// forwarded IPv6 packets to the same queue, so both families cross the
    /// emulated WAN alike.
    pub fn start_dual_stack(
        netns: &str,
        interfaces: &[(&str, Link)],
        config: WanConfig,
    ) -> Result<Delayer> {
        Delayer::start_families(netns, interfaces, config, true)
    }

    fn start_families(
        netns: &str,
        interfaces: &[(&str, Link)],
        config: WanConfig,
        ipv6: bool,
    ) -> Result<Delayer> {
        config.validate()?;
        let stop = Arc::new(AtomicBool::new(false));
        let config = Arc::new(Mutex::new(config));
        let counters = Arc::new(Counters::default());
        let names: Vec<(String, Link)> = interfaces
            .iter()
            .map(|&(name, link)| (name.to_owned(), link))
            .collect();
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = {
            let (stop, config, counters) = (stop.clone(), config.clone(), counters.clone());
            netns::spawn_in(netns, "lab-delayer", move || {
                serve(&names, &stop, &config, &counters, ready_tx)
            })?
        };
        let mut delayer = Delayer {
            stop,
            config,
            counters,
            thread: Some(thread),
        };
        // Wait until the queue is bound (or the thread failed), so that the rule
        // below never sends packets to a queue nobody listens on.
        match ready_rx.recv() {
            Ok(()) => {}
            Err(mpsc::RecvError) => {
                return Err(delayer
                    .join()
                    .err()
                    .unwrap_or_else(|| LabError::Thread("delayer ended before binding".into())));
            }
        }
        let programs: &[&str] = if ipv6 {
            &[IPTABLES, IP6TABLES]
        } else {
            &[IPTABLES]
        };
        for program in programs {
            cmd::ip_netns_exec(
                netns,
                program,
                &[
                    "-w",
                    "-A",
                    "FORWARD",
                    "-j",
                    "NFQUEUE",
                    "--queue-num",
                    &QUEUE_NUM.to_string(),
                ],
            )?;
        }
        Ok(delayer)
    }

    /// Replaces the link shapes; takes effect for packets arriving from now on.
    pub fn set_config(&self, config: WanConfig) -> Result<()> {
        config.validate()?;
        *self.config.lock().unwrap_or_else(PoisonError::into_inner) = config;
        Ok(())
    }

    /// The link shapes in force.
    pub fn config(&self) -> WanConfig {
        *self.config.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Packet counters so far.
    pub fn stats(&self) -> DelayerStats {
        DelayerStats {
            received: self.counters.received.load(Ordering::Relaxed),
            accepted: self.counters.accepted.load(Ordering::Relaxed),
            lost: self.counters.lost.load(Ordering::Relaxed),
        }
    }

    /// Whether the emulator thread is still serving the queue.
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stops the thread and returns how it ended.
    pub fn stop(mut self) -> Result<()> {
        self.join()
    }

    fn join(&mut self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take() {
            None => Ok(()),
            Some(thread) => thread
                .join()
                .map_err(|_| LabError::Thread("delayer thread panicked".into()))?
                .and_then(|entered| entered),
        }
    }
}

impl Drop for Delayer {
    fn drop(&mut self) {
        if let Err(err) = self.join() {
            tracing::warn!(%err, "lab: WAN emulator ended with an error");
        }
    }
}

/// A packet held until its release time.
struct Held {
    release: Instant,
    message: Message,
}

fn delayer_err(context: &str) -> impl FnOnce(io::Error) -> LabError + '_ {
    move |source| LabError::Delayer {
        context: context.to_owned(),
        source,
    }
}

/// The emulator thread's body; runs inside the internet namespace.
fn serve(
    interfaces: &[(String, Link)],
    stop: &AtomicBool,
    config: &Mutex<WanConfig>,
    counters: &Counters,
    ready: mpsc::Sender<()>,
) -> Result<()> {
    if let Err(errno) = nix::sys::prctl::set_timerslack(TIMER_SLACK_NS) {
        tracing::debug!(%errno, "lab: cannot lower timer slack");
    }
    let mut links: HashMap<u32, Link> = HashMap::new();
    for (name, link) in interfaces {
        let index = nix::net::if_::if_nametoindex(name.as_str())
            .map_err(|errno| delayer_err("interface lookup")(errno.into()))?;
        links.insert(index, *link);
    }
    let mut queue = Queue::open().map_err(delayer_err("open NFQUEUE socket"))?;
    queue.bind(QUEUE_NUM).map_err(delayer_err("bind queue"))?;
    // Only metadata: the verdict never changes the payload.
    queue
        .set_copy_range(QUEUE_NUM, 0)
        .map_err(delayer_err("set copy range"))?;
    queue
        .set_queue_max_len(QUEUE_NUM, QUEUE_MAX_LEN)
        .map_err(delayer_err("set queue length"))?;
    queue.set_nonblocking(true);
    // The receiver only fails if start() gave up waiting; nothing to do then.
    let _ = ready.send(());

    let mut rng = fastrand::Rng::new();
    let mut paths: HashMap<(u32, u32), VecDeque<Held>> = HashMap::new();
    let mut last_packet: Option<Instant> = None;
    while !stop.load(Ordering::Relaxed) {
        // 1. Take every packet the kernel has queued.
        let shape = *config.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let mut message = match queue.recv() {
                Ok(message) => message,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(delayer_err("receive")(err)),
            };
            let now = Instant::now();
            last_packet = Some(now);
            counters.received.fetch_add(1, Ordering::Relaxed);
            let path = (message.get_indev(), message.get_outdev());
            let shapes: Vec<LinkShape> = [path.0, path.1]
                .iter()
                .filter_map(|index| links.get(index))
                .map(|&link| shape.link(link))
                .collect();
            // 2. Loss: each crossed link loses independently.
            if shapes.iter().any(|s| s.loss > 0.0 && rng.f64() < s.loss) {
                message.set_verdict(Verdict::Drop);
                queue.verdict(message).map_err(delayer_err("verdict"))?;
                counters.lost.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let detour = match (links.get(&path.0), links.get(&path.1)) {
                (Some(&x), Some(&y)) => shape.detour_delay(x, y),
                _ => Duration::ZERO,
            };
            let hold: Duration = shapes.iter().map(|s| s.delay).sum::<Duration>() + detour;
            let fifo = paths.entry(path).or_default();
            // 3. Never overtake an earlier packet on the same path.
            let release = fifo
                .back()
                .map_or(now + hold, |last| (now + hold).max(last.release));
            fifo.push_back(Held { release, message });
        }

        // 4. Accept everything whose time has come.
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        for fifo in paths.values_mut() {
            while let Some(front) = fifo.front() {
                if front.release > now {
                    next = Some(next.map_or(front.release, |n| n.min(front.release)));
                    break;
                }
                if let Some(held) = fifo.pop_front() {
                    queue
                        .verdict(held.message)
                        .map_err(delayer_err("verdict"))?;
                    counters.accepted.fetch_add(1, Ordering::Relaxed);
                }
            }
        }

        let recent = last_packet.is_some_and(|at| now.duration_since(at) < IDLE_AFTER);
        let poll = if next.is_some() || recent {
            ACTIVE_POLL
        } else {
            IDLE_POLL
        };
        let sleep = next.map_or(poll, |n| n.saturating_duration_since(now).min(poll));
        std::thread::sleep(sleep);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_adds_both_links() {
        let wan = WanConfig::delays_ms(5, 40, 20);
        assert_eq!(wan.one_way(Link::A, Link::B), Duration::from_millis(45));
        assert_eq!(wan.rtt(Link::A, Link::Rv), Duration::from_millis(50));
        assert_eq!(wan.rtt(Link::B, Link::Rv), Duration::from_millis(120));
        assert_eq!(wan.rtt(Link::A, Link::A), Duration::ZERO);
    }

    #[test]
    fn detour_adds_to_one_path_only() {
        let wan = WanConfig::delays_ms(2, 3, 10).with_detour(
            Link::Rv,
            Link::B,
            Duration::from_millis(80),
        );
        assert_eq!(wan.one_way(Link::B, Link::Rv), Duration::from_millis(93));
        assert_eq!(wan.one_way(Link::Rv, Link::B), Duration::from_millis(93));
        assert_eq!(wan.one_way(Link::A, Link::Rv), Duration::from_millis(12));
        assert_eq!(wan.one_way(Link::A, Link::B), Duration::from_millis(5));
    }

    #[test]
    fn validate_rejects_bad_shapes() {
        let mut wan = WanConfig::default();
        assert!(wan.validate().is_ok());
        wan.a = LinkShape::delay_ms(1).with_loss(1.5);
        assert!(wan.validate().is_err());
        wan.a = LinkShape::delay_ms(60_000);
        assert!(wan.validate().is_err());
    }
}
