//! The chat session in a simulated pair: resume, keepalive, dead links, goodbye
//! and the switch to direct, on a stepped clock (minutes of chat in
//! milliseconds, no sockets, no root). The lab keeps one end-to-end test of
//! each over real NATs.

mod support {
    pub mod sim;
}

use std::time::Duration;

use proptest::prelude::*;
use punchline_proto::defaults::{ACK_TIMEOUT, HEARTBEAT_INTERVAL};
use punchline_proto::session::{ChatEnd, Config, DownReason, Failure, BYE_TIMEOUT};
use punchline_proto::Chat;
use support::sim::{Action, Faults, Sim, A, B};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn lines(prefix: &str, n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("{prefix} {i}")).collect()
}

/// Each side showed exactly what the other typed, and both ended well.
fn assert_all_delivered(sim: &Sim) {
    assert_eq!(sim.sides[B].shown, sim.sides[A].typed, "B shows A's lines");
    assert_eq!(sim.sides[A].shown, sim.sides[B].typed, "A shows B's lines");
    for side in &sim.sides {
        assert_eq!(side.session.unacked(), 0);
    }
}

#[test]
fn lines_flow_both_ways_and_the_goodbye_confirms_delivery() {
    let mut sim = Sim::new(Config::default(), false);
    for (i, text) in lines("a", 3).into_iter().enumerate() {
        sim.at(ms(10 * i as u64), Action::Type(A, text));
    }
    sim.at(ms(5), Action::Type(B, "b 1".into()));
    sim.at(ms(50), Action::Quit(A));
    sim.run(secs(60));
    assert_eq!(sim.sides[A].ended, Some(Ok(ChatEnd::WeLeft)));
    assert_eq!(sim.sides[B].ended, Some(Ok(ChatEnd::TheyLeft)));
    assert_all_delivered(&sim);
    // The leaving side ends once the answer is back: one round trip after its
    // goodbye.
    let ended = sim.sides[A].ended_at.expect("ended") - sim.start;
    assert_eq!(ended, ms(50) + sim.latency * 2);
    assert_eq!(sim.sides[A].session.stats().sent, 3);
    assert_eq!(sim.sides[A].session.stats().received, 1);
    assert!(sim.sides[A].session.rtt().is_some());
}

#[test]
fn an_interrupted_side_still_says_goodbye() {
    let mut sim = Sim::new(Config::default(), false);
    sim.at(ms(0), Action::Type(B, "last words".into()));
    sim.at(ms(1), Action::Interrupt(B));
    sim.run(secs(60));
    assert_eq!(sim.sides[B].ended, Some(Ok(ChatEnd::Interrupted)));
    assert_eq!(sim.sides[A].ended, Some(Ok(ChatEnd::TheyLeft)));
    assert_all_delivered(&sim);
}

#[test]
fn a_reset_link_resumes_and_no_line_is_lost_or_shown_twice() {
    let mut sim = Sim::new(Config::default(), false);
    // Lines in flight both ways when the link is cut, and some typed while no
    // link carries them.
    for (i, text) in lines("a", 20).into_iter().enumerate() {
        sim.at(ms(990 + 2 * i as u64), Action::Type(A, text));
    }
    for (i, text) in lines("b", 5).into_iter().enumerate() {
        sim.at(ms(1000 + 3 * i as u64), Action::Type(B, text));
    }
    sim.at(ms(1010), Action::Cut);
    sim.at(ms(1200), Action::Type(A, "typed while down".into()));
    sim.at(secs(5), Action::Quit(B));
    sim.run(secs(120));
    assert_eq!(sim.sides[A].downs.len(), 1);
    assert_eq!(sim.sides[B].downs.len(), 1);
    assert_eq!(sim.links_made.len(), 2, "one new link");
    assert_all_delivered(&sim);
    assert_eq!(sim.sides[B].ended, Some(Ok(ChatEnd::WeLeft)));
    // Lines were sent again: the session resent what had not been
    // acknowledged, and the receiver dropped the copies it already had.
    let line_sends = sim.sides[A]
        .sent
        .iter()
        .filter(|(_, m)| matches!(m, Chat::Line { .. }))
        .count();
    assert!(line_sends > 21, "{line_sends} sends of 21 lines");
}

#[test]
fn a_dead_silent_link_is_found_by_the_keepalive_within_heartbeat_and_ack() {
    let mut sim = Sim::new(Config::default(), false);
    sim.at(secs(1), Action::SilenceBoth);
    sim.at(secs(100), Action::Type(A, "after".into()));
    sim.at(secs(101), Action::Quit(A));
    sim.run(secs(300));
    for side in &sim.sides {
        let (at, why) = side.downs.first().expect("the dead link is found");
        let found = *at - sim.start;
        assert_eq!(why, &DownReason::Unacknowledged(ACK_TIMEOUT));
        assert!(
            found <= HEARTBEAT_INTERVAL + ACK_TIMEOUT,
            "found after {found:?}"
        );
    }
    assert_all_delivered(&sim);
    assert_eq!(sim.sides[A].ended, Some(Ok(ChatEnd::WeLeft)));
}

#[test]
fn a_line_unacknowledged_marks_the_link_dead_within_the_ack_timeout() {
    let mut sim = Sim::new(Config::default(), false);
    sim.at(secs(3), Action::Silence(B));
    sim.at(secs(4), Action::Type(A, "into the void".into()));
    sim.at(secs(60), Action::Quit(A));
    sim.run(secs(300));
    let (at, why) = sim.sides[A].downs.first().expect("found");
    assert_eq!(*at - sim.start, secs(4) + ACK_TIMEOUT);
    assert_eq!(why, &DownReason::Unacknowledged(ACK_TIMEOUT));
    // B hears nothing more; its own keepalive finds the link dead too, and
    // the line arrives over the new link.
    assert_eq!(sim.sides[B].shown, vec!["into the void".to_owned()]);
    assert_all_delivered(&sim);
}

#[test]
fn an_idle_live_link_stays_up_on_keepalives() {
    let mut sim = Sim::new(Config::default(), false);
    sim.at(secs(600), Action::Quit(A));
    sim.run(secs(700));
    for side in &sim.sides {
        assert!(side.downs.is_empty(), "{:?}", side.downs);
    }
    // Every interval a side has been quiet, it pings; each ping's ack (and
    // the other's pings) keep both sides' links alive.
    let pings = sim.sides[A].pings() + sim.sides[B].pings();
    let expected = (600 / HEARTBEAT_INTERVAL.as_secs()) as usize;
    assert!(
        (expected..=2 * expected).contains(&pings),
        "{pings} pings in 600 s"
    );
    assert_eq!(sim.sides[A].ended, Some(Ok(ChatEnd::WeLeft)));
}

#[test]
fn lines_typed_while_no_link_are_kept_and_go_out_on_the_next() {
    let mut sim = Sim::new(Config::default(), false);
    sim.meet_delay = secs(20);
    sim.at(secs(1), Action::Cut);
    for (i, text) in lines("kept", 4).into_iter().enumerate() {
        sim.at(secs(2 + i as u64), Action::Type(B, text));
    }
    sim.at(secs(40), Action::Quit(A));
    sim.run(secs(120));
    assert!(sim.sides[A].shown.is_empty() || sim.sides[A].shown == lines("kept", 4));
    assert_all_delivered(&sim);
    // Nothing was sent while no link carried it.
    let during: Vec<_> = sim.sides[B]
        .sent
        .iter()
        .filter(|(at, _)| *at > sim.start + secs(1) && *at < sim.start + secs(21))
        .collect();
    assert!(during.is_empty(), "{during:?}");
}

#[test]
fn leaving_during_a_resume_says_goodbye_after_it() {
    let mut sim = Sim::new(Config::default(), false);
    sim.latency = ms(300);
    sim.at(ms(100), Action::Type(A, "before".into()));
    sim.at(ms(200), Action::Cut);
    // The new link comes at 0.5 + 0.5 s; the resume is under way until
    // 1.3 s: quitting then waits for it.
    sim.at(ms(1100), Action::Quit(A));
    sim.run(secs(60));
    assert_eq!(sim.sides[A].ended, Some(Ok(ChatEnd::WeLeft)));
    assert_eq!(sim.sides[B].ended, Some(Ok(ChatEnd::TheyLeft)));
    assert_all_delivered(&sim);
    let bye = sim.sides[A]
        .sent
        .iter()
        .position(|(_, m)| *m == Chat::Bye)
        .expect("goodbye sent");
    let last_resume = sim.sides[A]
        .sent
        .iter()
        .rposition(|(_, m)| matches!(m, Chat::Resume { .. }))
        .expect("resumed");
    assert!(bye > last_resume);
}

#[test]
fn leaving_with_no_link_ends_the_chat_saying_what_was_not_delivered() {
    let mut sim = Sim::new(Config::default(), false);
    sim.meet_delay = secs(100);
    sim.at(secs(1), Action::Cut);
    sim.at(secs(2), Action::Type(A, "never delivered".into()));
    sim.at(secs(3), Action::Quit(A));
    sim.run(secs(10));
    assert_eq!(
        sim.sides[A].ended,
        Some(Err(Failure::LeftWhileReconnecting))
    );
    assert_eq!(sim.sides[A].session.unacked(), 1);
}

#[test]
fn an_unanswered_goodbye_ends_with_delivery_unconfirmed() {
    let mut sim = Sim::new(Config::default(), false);
    sim.at(secs(1), Action::Silence(A));
    sim.at(secs(2), Action::Quit(A));
    sim.run(secs(60));
    assert_eq!(
        sim.sides[A].ended,
        Some(Err(Failure::ByeUnanswered(BYE_TIMEOUT)))
    );
    assert_eq!(
        sim.sides[A].ended_at.expect("ended") - sim.start,
        secs(2) + BYE_TIMEOUT
    );
}

#[test]
fn a_link_lost_while_leaving_ends_the_chat_as_lost() {
    let mut sim = Sim::new(Config::default(), false);
    sim.latency = ms(200);
    sim.at(ms(100), Action::Quit(A));
    // B's reset crosses A's goodbye: B resumes, A does not wait for it.
    sim.at(ms(150), Action::Cut);
    sim.run(secs(60));
    assert!(matches!(
        sim.sides[A].ended,
        Some(Err(Failure::LostWhileLeaving(_)))
    ));
}

#[test]
fn both_leaving_at_once_still_confirm_every_line() {
    let mut sim = Sim::new(Config::default(), false);
    sim.latency = ms(100);
    // Each side's last line and goodbye cross the other's.
    sim.at(ms(1000), Action::Type(A, "a last".into()));
    sim.at(ms(1000), Action::Type(B, "b last".into()));
    sim.at(ms(1001), Action::Quit(A));
    sim.at(ms(1001), Action::Quit(B));
    sim.run(secs(60));
    assert_eq!(sim.sides[A].ended, Some(Ok(ChatEnd::WeLeft)));
    assert_eq!(sim.sides[B].ended, Some(Ok(ChatEnd::WeLeft)));
    assert_all_delivered(&sim);
}

#[test]
fn a_relayed_chat_switches_to_direct_when_the_leader_asks() {
    let config = Config::default();
    let mut sim = Sim::new(config, true);
    for (i, text) in lines("a", 30).into_iter().enumerate() {
        sim.at(secs(2 * i as u64), Action::Type(A, text));
    }
    for (i, text) in lines("b", 30).into_iter().enumerate() {
        sim.at(secs(2 * i as u64 + 1), Action::Type(B, text));
    }
    sim.at(secs(120), Action::Quit(B));
    sim.run(secs(300));
    // Only the leader asks, once the interval has passed; the follower tries
    // when asked.
    assert_eq!(
        sim.sides[A].try_direct.first().map(|t| *t - sim.start),
        Some(config.upgrade_interval)
    );
    assert_eq!(sim.sides[B].try_direct.len(), 1);
    let asks: usize = sim
        .sides
        .iter()
        .map(|s| s.sent.iter().filter(|(_, m)| *m == Chat::TryDirect).count())
        .sum();
    assert_eq!(asks, 1, "the leader asked once");
    assert_eq!(sim.links_made.len(), 2);
    assert!(sim.links_made[0].1.relayed && !sim.links_made[1].1.relayed);
    // The switch is not a drop, and nothing was lost or doubled across it.
    assert!(sim.sides.iter().all(|s| s.downs.is_empty()));
    assert_all_delivered(&sim);
}

#[test]
fn a_failed_try_for_a_direct_link_is_repeated_after_the_interval() {
    let config = Config::default();
    let mut sim = Sim::new(config, true);
    sim.direct_works = false;
    sim.at(secs(200), Action::Quit(A));
    sim.run(secs(300));
    let asked: Vec<Duration> = sim.sides[A]
        .try_direct
        .iter()
        .map(|t| *t - sim.start)
        .collect();
    let i = config.upgrade_interval;
    assert_eq!(asked, vec![i, 2 * i, 3 * i]);
    assert_eq!(sim.links_made.len(), 1, "still relayed");
    assert_eq!(sim.sides[A].ended, Some(Ok(ChatEnd::WeLeft)));
}

#[test]
fn a_direct_link_asks_for_nothing() {
    let mut sim = Sim::new(Config::default(), false);
    sim.at(secs(300), Action::Quit(A));
    sim.run(secs(400));
    assert!(sim.sides.iter().all(|s| s.try_direct.is_empty()));
}

#[test]
fn names_change_over_the_link_and_bad_ones_are_refused() {
    let mut sim = Sim::new(Config::default(), false);
    sim.at(ms(1), Action::Rename(A, "Ada".into()));
    sim.at(
        ms(2),
        Action::Inject(
            B,
            Chat::Nick {
                name: "\u{202E}x".into(),
            },
        ),
    );
    sim.at(ms(3), Action::Quit(A));
    sim.run(secs(60));
    assert_eq!(sim.sides[B].renamed, vec!["Ada".to_owned()]);
}

#[test]
fn a_skipped_line_ends_the_chat_as_a_protocol_error() {
    let mut sim = Sim::new(Config::default(), false);
    sim.at(
        ms(1),
        Action::Inject(
            B,
            Chat::Line {
                seq: 5,
                text: "from nowhere".into(),
            },
        ),
    );
    sim.run(secs(60));
    assert_eq!(
        sim.sides[B].ended,
        Some(Err(Failure::LineOutOfOrder {
            got: 5,
            expected: 1
        }))
    );
    assert!(sim.sides[B].shown.is_empty());
}

#[test]
fn a_resume_that_claims_unsent_lines_is_refused() {
    let mut sim = Sim::new(Config::default(), false);
    sim.latency = ms(300);
    sim.at(ms(10), Action::Cut);
    // The new link comes at 0.31 + 0.5 s; before B's resume can arrive, a
    // forged one claims that line 7 arrived.
    sim.at(ms(850), Action::Inject(A, Chat::Resume { next: 8 }));
    sim.run(secs(60));
    assert_eq!(
        sim.sides[A].ended,
        Some(Err(Failure::ResumeBeyondSent {
            claimed: 7,
            sent: 0
        }))
    );
}

#[test]
fn a_resumed_link_must_open_with_the_resume() {
    let mut sim = Sim::new(Config::default(), false);
    sim.latency = ms(300);
    sim.at(ms(10), Action::Cut);
    sim.at(ms(850), Action::Inject(A, Chat::Ping));
    sim.run(secs(60));
    assert_eq!(
        sim.sides[A].ended,
        Some(Err(Failure::NotResume(Chat::Ping)))
    );
}

#[test]
fn a_resume_that_never_comes_drops_the_new_link_too() {
    let mut sim = Sim::new(Config::default(), false);
    sim.latency = ms(300);
    sim.at(ms(10), Action::Cut);
    // The new link (at 0.81 s) carries nothing toward A.
    sim.at(ms(850), Action::Silence(A));
    sim.at(secs(30), Action::Quit(A));
    sim.run(secs(120));
    let reasons: Vec<&DownReason> = sim.sides[A].downs.iter().map(|(_, r)| r).collect();
    assert_eq!(reasons[1], &DownReason::NoResume);
    assert_eq!(sim.sides[A].ended, Some(Ok(ChatEnd::WeLeft)));
}

/// One thing that happens in a random chat.
#[derive(Debug, Clone)]
enum Happening {
    Type(usize),
    Cut,
    SilenceBoth,
    Silence(usize),
}

fn happening() -> impl Strategy<Value = (u64, Happening)> {
    let what = prop_oneof![
        6 => (0..2usize).prop_map(Happening::Type),
        1 => Just(Happening::Cut),
        1 => Just(Happening::SilenceBoth),
        1 => (0..2usize).prop_map(Happening::Silence),
    ];
    (0..120_000u64, what)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Whatever happens to the links, every line typed is shown exactly once,
    /// in order, on the other side, and both sides end well.
    #[test]
    fn whatever_the_links_do_every_line_arrives_once_and_in_order(
        happenings in proptest::collection::vec(happening(), 0..40),
        latency in 1..400u64,
        relayed in any::<bool>(),
    ) {
        let mut sim = Sim::new(Config::default(), relayed);
        sim.latency = ms(latency);
        let mut n = [0; 2];
        for (at, what) in happenings {
            let action = match what {
                Happening::Type(i) => {
                    n[i] += 1;
                    Action::Type(i, format!("{i}:{}", n[i]))
                }
                Happening::Cut => Action::Cut,
                Happening::SilenceBoth => Action::SilenceBoth,
                Happening::Silence(i) => Action::Silence(i),
            };
            sim.at(ms(at), action);
        }
        sim.at(secs(200), Action::Quit(A));
        sim.run(secs(3600));
        prop_assert_eq!(&sim.sides[B].shown, &sim.sides[A].typed);
        prop_assert_eq!(&sim.sides[A].shown, &sim.sides[B].typed);
        prop_assert_eq!(&sim.sides[A].ended, &Some(Ok(ChatEnd::WeLeft)));
        prop_assert_eq!(&sim.sides[B].ended, &Some(Ok(ChatEnd::TheyLeft)));
    }

    /// A carrier that duplicates and reorders inside a link (which TCP never
    /// does, but a hostile relay might try) cannot make a session show a line
    /// twice or out of order: what is shown is always the start of what the
    /// other side typed.
    #[test]
    fn a_broken_carrier_never_makes_a_line_show_twice_or_out_of_order(
        count in 1..60usize,
        duplicate in 0.0..0.3f64,
        reorder in 0.0..0.3f64,
        seed in any::<u64>(),
    ) {
        let mut sim = Sim::new(Config::default(), false);
        sim.seed(seed);
        sim.faults = Faults { duplicate, reorder };
        for (i, text) in lines("a", count).into_iter().enumerate() {
            sim.at(ms(3 * i as u64), Action::Type(A, text));
        }
        sim.at(secs(30), Action::Quit(A));
        sim.run(secs(600));
        let shown = &sim.sides[B].shown;
        prop_assert!(sim.sides[A].typed.starts_with(shown), "{:?}", shown);
        if let Some(Ok(_)) = sim.sides[A].ended {
            prop_assert_eq!(shown, &sim.sides[A].typed);
        }
    }
}

#[test]
fn keepalive_timings_follow_the_config() {
    let config = Config {
        heartbeat: secs(5),
        ack_timeout: secs(2),
        ..Config::default()
    };
    let mut sim = Sim::new(config, false);
    sim.at(secs(1), Action::SilenceBoth);
    sim.at(secs(60), Action::Quit(A));
    sim.run(secs(120));
    let (at, _) = sim.sides[A].downs.first().expect("found");
    assert!(*at - sim.start <= secs(7), "{:?}", *at - sim.start);
}

/// Leaving while the switch to direct is under way: the goodbye went out on
/// the relay, and the switch replaced the link before the other side read it.
/// It goes again on the new link, after the resume.
#[test]
fn a_goodbye_lost_in_the_switch_to_direct_goes_again_on_the_new_link() {
    let mut sim = Sim::new(Config::default(), true);
    sim.latency = ms(300);
    sim.at(secs(1), Action::Type(A, "a 1".into()));
    // A asks at 60 s; B hears at 60.3 s; the direct link comes at 60.8 s. A
    // quits at 60.6 s: its goodbye would reach B at 60.9 s, after the switch.
    sim.at(ms(60_600), Action::Quit(A));
    sim.run(secs(300));
    assert_eq!(sim.links_made.len(), 2);
    assert_eq!(sim.sides[A].ended, Some(Ok(ChatEnd::WeLeft)));
    assert_eq!(sim.sides[B].ended, Some(Ok(ChatEnd::TheyLeft)));
    assert_all_delivered(&sim);
}

/// A new name typed while a resume is under way goes out once a link is open
/// for it, even when that resume fails and another link takes over.
#[test]
fn a_rename_during_a_failed_resume_goes_out_on_the_next_link() {
    let mut sim = Sim::new(Config::default(), false);
    sim.latency = ms(300);
    sim.at(ms(10), Action::Cut);
    // The new link (at 0.81 s) carries nothing toward A: its resume times out.
    sim.at(ms(850), Action::Silence(A));
    sim.at(ms(900), Action::Rename(A, "Ada".into()));
    sim.at(secs(30), Action::Quit(A));
    sim.run(secs(120));
    assert_eq!(sim.sides[A].ended, Some(Ok(ChatEnd::WeLeft)));
    assert_eq!(sim.sides[B].renamed, vec!["Ada".to_owned()]);
}

/// Saving the other side as a contact tells it, once, also when the link
/// was lost just before and the word goes out on the next one.
#[test]
fn a_save_is_told_to_the_other_side_once() {
    let mut sim = Sim::new(Config::default(), false);
    sim.latency = ms(50);
    sim.at(ms(100), Action::Save(A));
    sim.at(ms(1000), Action::Cut);
    // B has seen the link close (after its latency): no link until the next.
    sim.at(ms(1100), Action::Save(B));
    sim.at(secs(20), Action::Quit(A));
    sim.run(secs(60));
    assert_eq!(sim.sides[A].ended, Some(Ok(ChatEnd::WeLeft)));
    assert_eq!((sim.sides[B].they_saved, sim.sides[A].they_saved), (1, 1));
}

/// Quitting while the new link's resume is awaited, and the resume never
/// comes: the chat ends as lost while leaving, with the line not confirmed.
#[test]
fn leaving_during_a_resume_that_fails_keeps_count_of_the_line() {
    let mut sim = Sim::new(Config::default(), false);
    sim.latency = ms(300);
    sim.at(ms(5), Action::Type(A, "maybe lost".into()));
    sim.at(ms(10), Action::Cut);
    sim.at(ms(850), Action::Silence(A));
    sim.at(ms(900), Action::Quit(A));
    sim.run(secs(120));
    assert_eq!(
        sim.sides[A].ended,
        Some(Err(Failure::LostWhileLeaving(DownReason::NoResume)))
    );
    assert_eq!(sim.sides[A].session.unacked(), 1);
}

/// What a user may do at any moment.
#[derive(Debug, Clone)]
enum Awkward {
    Type(usize),
    Cut,
    SilenceBoth,
    Silence(usize),
    Quit(usize),
    Interrupt(usize),
    Rename(usize),
}

fn awkward() -> impl Strategy<Value = (u64, Awkward)> {
    let what = prop_oneof![
        8 => (0..2usize).prop_map(Awkward::Type),
        1 => Just(Awkward::Cut),
        1 => Just(Awkward::SilenceBoth),
        1 => (0..2usize).prop_map(Awkward::Silence),
        1 => (0..2usize).prop_map(Awkward::Quit),
        1 => (0..2usize).prop_map(Awkward::Interrupt),
        1 => (0..2usize).prop_map(Awkward::Rename),
    ];
    (0..200_000u64, what)
}

/// Schedules `happenings`; with `sound`, the links never fail (cuts and
/// silences are left out).
fn schedule(sim: &mut Sim, happenings: Vec<(u64, Awkward)>, sound: bool) {
    let mut n = [0; 2];
    for (at, what) in happenings {
        let action = match what {
            Awkward::Type(i) => {
                n[i] += 1;
                Action::Type(i, format!("{i}:{}", n[i]))
            }
            Awkward::Quit(i) => Action::Quit(i),
            Awkward::Interrupt(i) => Action::Interrupt(i),
            Awkward::Rename(i) => Action::Rename(i, format!("n{i}")),
            _ if sound => continue,
            Awkward::Cut => Action::Cut,
            Awkward::SilenceBoth => Action::SilenceBoth,
            Awkward::Silence(i) => Action::Silence(i),
        };
        sim.at(ms(at), action);
    }
    sim.at(secs(300), Action::Quit(A));
}

/// A simulated pair for the property tests: the first link relayed or not,
/// direct links that come or not, the leader's upgrade interval, and
/// `happenings` scheduled ([`schedule`]).
fn awkward_sim(
    happenings: Vec<(u64, Awkward)>,
    latency: u64,
    relayed: bool,
    direct_works: bool,
    upgrade: u64,
    sound: bool,
) -> Sim {
    let config = Config {
        upgrade_interval: secs(upgrade),
        ..Config::default()
    };
    let mut sim = Sim::new(config, relayed);
    sim.direct_works = direct_works;
    sim.latency = ms(latency);
    schedule(&mut sim, happenings, sound);
    sim
}

fn hostile_message() -> impl Strategy<Value = Chat> {
    let n = prop_oneof![0..5u64, Just(u64::MAX), Just(u64::MAX - 1), any::<u64>()];
    prop_oneof![
        n.clone().prop_map(|seq| Chat::Line {
            seq,
            text: "x".into()
        }),
        Just(Chat::Bye),
        Just(Chat::Ping),
        Just(Chat::TryDirect),
        Just(Chat::Saved),
        Just(Chat::Proof { mac: [1; 32] }),
        n.clone().prop_map(|upto| Chat::Ack { upto }),
        n.prop_map(|next| Chat::Resume { next }),
        Just(Chat::Nick {
            name: "evil".into()
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Users who quit (one side or both), interrupt, rename and type at
    /// awkward moments, links cut or silent, relayed chats switching: no line
    /// is shown twice or out of order, a side that ends well ("all
    /// delivered") really delivered everything, and honest sides never see a
    /// protocol error.
    #[test]
    fn awkward_users_and_links_never_lose_or_double_a_line(
        happenings in proptest::collection::vec(awkward(), 0..40),
        latency in 1..400u64,
        relayed in any::<bool>(),
        direct_works in any::<bool>(),
        upgrade in 5..90u64,
    ) {
        let mut sim = awkward_sim(happenings, latency, relayed, direct_works, upgrade, false);
        sim.run(secs(3600));
        for (me, other) in [(A, B), (B, A)] {
            prop_assert!(sim.sides[me].typed.starts_with(&sim.sides[other].shown));
            if let Some(Ok(ChatEnd::WeLeft | ChatEnd::Interrupted)) = sim.sides[me].ended {
                prop_assert_eq!(&sim.sides[other].shown, &sim.sides[me].typed);
            }
            if let Some(Err(f)) = &sim.sides[me].ended {
                prop_assert!(!f.is_protocol(), "{:?}", f);
            }
        }
    }

    /// Links that never fail: whoever quits when, relayed or switching to
    /// direct, both sides end well and every line arrives.
    #[test]
    fn on_sound_links_every_chat_ends_well(
        happenings in proptest::collection::vec(awkward(), 0..40),
        latency in 1..400u64,
        relayed in any::<bool>(),
        direct_works in any::<bool>(),
        upgrade in 5..90u64,
    ) {
        let mut sim = awkward_sim(happenings, latency, relayed, direct_works, upgrade, true);
        sim.run(secs(3600));
        prop_assert!(matches!(sim.sides[A].ended, Some(Ok(_))), "A: {:?}", sim.sides[A].ended);
        prop_assert!(matches!(sim.sides[B].ended, Some(Ok(_))), "B: {:?}", sim.sides[B].ended);
        prop_assert_eq!(&sim.sides[B].shown, &sim.sides[A].typed);
        prop_assert_eq!(&sim.sides[A].shown, &sim.sides[B].typed);
    }

    /// A hostile peer's messages at any moment: no panic, no busy loop (the
    /// simulation bounds its steps), and a session holding a link always has
    /// a timer.
    #[test]
    fn hostile_messages_never_panic_or_spin(
        injected in proptest::collection::vec((0..120_000u64, 0..2usize, hostile_message()), 0..30),
        happenings in proptest::collection::vec(awkward(), 0..20),
        latency in 1..400u64,
        relayed in any::<bool>(),
    ) {
        let mut sim = Sim::new(Config { upgrade_interval: secs(20), ..Config::default() }, relayed);
        sim.latency = ms(latency);
        for (at, to, msg) in injected {
            sim.at(ms(at), Action::Inject(to, msg));
        }
        schedule(&mut sim, happenings, false);
        sim.run(secs(3600));
        for side in &sim.sides {
            if side.ended.is_none() && side.session.has_link() {
                prop_assert!(side.session.poll_timeout().is_some());
            }
        }
    }
}

/// Lines the first link's handshake carried (the leader's first lines) count
/// as sent on it: not sent again there, acknowledged like any other, and sent
/// again after a resume if the acknowledgement never came.
#[test]
fn lines_carried_by_the_first_handshake_are_not_sent_again_on_it() {
    use punchline_proto::session::{LinkKind, Session};
    let t0 = std::time::Instant::now();
    let kind = LinkKind {
        relayed: false,
        leads: true,
    };
    let line = |seq: u64, text: &str| Chat::Line {
        seq,
        text: text.into(),
    };
    let mut s = Session::new(Config::default());
    for text in ["one", "two", "three"] {
        s.send_line(t0, text.into()).expect("line");
    }
    s.link_up_carrying(t0, kind, 2);
    let sent: Vec<Chat> = std::iter::from_fn(|| s.poll_transmit()).collect();
    assert_eq!(sent, vec![line(3, "three")]);
    assert_eq!(s.unacked(), 3);
    s.handle(t0 + ms(10), Chat::Ack { upto: 1 });
    assert_eq!(s.unacked(), 2);
    // A new link: what is unacknowledged goes again after the resume (a later
    // link carries no first lines).
    s.link_down(t0 + ms(20), DownReason::Link("cut".into()));
    s.link_up_carrying(t0 + ms(30), kind, 3);
    let sent: Vec<Chat> = std::iter::from_fn(|| s.poll_transmit()).collect();
    assert_eq!(sent, vec![Chat::Resume { next: 1 }]);
    s.handle(t0 + ms(40), Chat::Resume { next: 2 });
    let sent: Vec<Chat> = std::iter::from_fn(|| s.poll_transmit()).collect();
    assert_eq!(sent, vec![line(2, "two"), line(3, "three")]);
}

/// The other side's first lines shown before the first link was up count as
/// received: acknowledged on the link, and the same lines sent again over it
/// are not shown twice.
#[test]
fn first_lines_shown_before_the_link_count_as_received() {
    use punchline_proto::session::{Event, LinkKind, Session};
    let t0 = std::time::Instant::now();
    let kind = LinkKind {
        relayed: false,
        leads: true,
    };
    let mut s = Session::new(Config::default());
    s.link_up(t0, kind);
    s.received_early(t0, 2);
    let sent: Vec<Chat> = std::iter::from_fn(|| s.poll_transmit()).collect();
    assert_eq!(sent, vec![Chat::Ack { upto: 2 }]);
    assert_eq!(s.stats().received, 2);
    for (seq, text) in [(2, "two"), (3, "three")] {
        s.handle(
            t0,
            Chat::Line {
                seq,
                text: text.into(),
            },
        );
    }
    let shown: Vec<String> = std::iter::from_fn(|| s.poll_event())
        .filter_map(|e| match e {
            Event::Line(text) => Some(text),
            _ => None,
        })
        .collect();
    assert_eq!(shown, ["three"]);
    // Only once, and only before anything was received.
    s.received_early(t0, 5);
    assert_eq!(s.stats().received, 3);
}
