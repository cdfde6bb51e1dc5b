//! Facts and failures in words: everything the peer tells its user about a
//! link, the chat and how it ended is worded here, from data the other modules
//! hand over.

use std::net::SocketAddr;
use std::time::Duration;

use punchline_proto::session::{Failure, Session};
use punchline_proto::{sanitize_for_terminal, Mapping};

use crate::chat::ChatContext;
use crate::error::{KeyRefusal, PeerError};
use crate::meet::{Met, Path};
use crate::punch::{CandidateKind, PunchFailure};
use crate::secure;

/// The link of a meeting in a few words, for the status line.
pub(crate) fn describe_link(met: &Met) -> String {
    match &met.path {
        Path::Direct {
            remote,
            kind,
            attempts,
            elapsed_ms,
        } => format!(
            "direct link to {remote} ({}), {elapsed_ms} ms after go, {attempts} attempt{}",
            describe_candidate(*kind, *remote),
            if *attempts == 1 { "" } else { "s" },
        ),
        Path::Relayed { why } => format!(
            "relayed via the rendezvous (end-to-end encrypted; it sees only ciphertext): direct connection failed because {why}"
        ),
    }
}

/// What `/info` shows about this link.
pub(crate) fn link_facts(met: &Met) -> Vec<(String, String)> {
    let (path, addresses) = match (&met.path, met.link.addresses()) {
        (
            Path::Direct {
                kind, elapsed_ms, ..
            },
            Some((local, remote)),
        ) => (
            format!(
                "direct TCP link ({}), {elapsed_ms} ms to punch",
                describe_candidate(*kind, remote)
            ),
            format!("{local} (here) <-> {remote} (there)"),
        ),
        (Path::Direct { remote, .. }, None) => ("direct TCP link".to_owned(), remote.to_string()),
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
                "public address {}{}; {}",
                met.observed,
                also_at(met.other_family),
                describe_mapping(met.mapping, Some(met.local_port), met.observed)
            ),
        ),
        (
            "other side".to_owned(),
            format!(
                "public address {}{}; {}",
                met.go.peer.observed,
                also_at(met.go.peer.other_family),
                describe_mapping(met.go.peer.mapping, None, met.go.peer.observed)
            ),
        ),
        (
            "encryption".to_owned(),
            if met.chat.by_contact {
                format!(
                    "{} on the first link (both saved identity keys and your pairing), {} \
                     keyed by the chat's secret on later ones",
                    secure::CONTACT_NOISE_PARAMS,
                    secure::NOISE_PARAMS,
                )
            } else {
                format!(
                    "{} (key from the code by SPAKE2 on the first link, from the chat's secret on later ones)",
                    secure::NOISE_PARAMS,
                )
            },
        ),
    ]
}

/// The kind of candidate a direct link went to, with its address family:
/// "IPv6, public address". A global IPv6 address the other side announced
/// itself (the rendezvous did not see it) is its own address, not a LAN's.
pub(crate) fn describe_candidate(kind: CandidateKind, remote: SocketAddr) -> String {
    let ip = remote.ip().to_canonical();
    let family = if ip.is_ipv4() { "IPv4" } else { "IPv6" };
    let what = match (kind, ip) {
        (CandidateKind::Lan, std::net::IpAddr::V6(v6)) if (v6.segments()[0] & 0xe000) == 0x2000 => {
            "its own global address"
        }
        // A public address the other side announced itself: a port its
        // router forwards (a mapping it asked for, or one set by hand).
        (CandidateKind::Lan, std::net::IpAddr::V4(v4))
            if !(v4.is_private() || v4.is_loopback() || v4.is_link_local()) =>
        {
            "a forwarded port it announced"
        }
        _ => kind.describe(),
    };
    format!("{family}, {what}")
}

/// ", and [ADDR] over IPv6" for an address in the other family, if any.
fn also_at(other: Option<SocketAddr>) -> String {
    match other {
        Some(a) if a.is_ipv6() => format!(", and {a} over IPv6"),
        Some(a) => format!(", and {a} over IPv4"),
        None => String::new(),
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

/// The line that tells the user the link is encrypted and which words to
/// compare.
pub fn confirmed(their_name: &str, words: &str) -> String {
    format!(
        "encrypted; code confirmed (to rule out an interception, compare with {their_name}: {words})"
    )
}

/// The verification words, or that the chat has none.
pub(crate) fn words(words: Option<&str>) -> String {
    match words {
        Some(words) => {
            format!("verification: {words}  (the other side must see the same words)")
        }
        None => format!("verification: {WORDS_NOT_YET}"),
    }
}

/// What `/verify` and `/info` say of a chat without words (a code chat always
/// has them, from its first handshake).
const WORDS_NOT_YET: &str = "none for this chat";

/// What `/info` prints: the fixed facts, then the live numbers.
pub(crate) fn info_lines(
    link: &secure::SecureLink,
    ctx: &ChatContext,
    session: &Session,
) -> Vec<String> {
    let mut lines: Vec<String> = ctx
        .facts
        .iter()
        .map(|(label, value)| format!("{label:<12} {value}"))
        .collect();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let rtt = match (link.rtt(), session.rtt()) {
        (Some(kernel), _) => format!("{:.1} ms (the kernel's estimate)", ms(kernel)),
        (None, Some(chat)) => format!(
            "{:.1} ms (the last line or keepalive and its acknowledgement)",
            ms(chat)
        ),
        (None, None) => "not measured yet (after the first line or keepalive)".to_owned(),
    };
    lines.push(format!("{:<12} {rtt}", "rtt"));
    let (sent, received) = link.bytes();
    let stats = session.stats();
    lines.push(format!(
        "{:<12} {} lines and {sent} bytes sent, {} lines and {received} bytes received (encrypted, this link); {} awaiting acknowledgement",
        "traffic", stats.sent, stats.received, session.unacked()
    ));
    lines.push(format!(
        "{:<12} you are {}, the other side is {}",
        "names", ctx.our_name, ctx.their_name
    ));
    lines.push(format!(
        "{:<12} {}",
        "verification",
        ctx.words.as_deref().unwrap_or(WORDS_NOT_YET)
    ));
    lines
}

/// Why whoever joined with the code was refused, for the user.
pub fn bad_code(why: KeyRefusal) -> &'static str {
    match why {
        KeyRefusal::Handshake => secure::WRONG_CODE,
        KeyRefusal::ClosedInHandshake => secure::WRONG_CODE_CLOSED,
        KeyRefusal::Candidates => secure::WRONG_CODE_BOX,
        KeyRefusal::Words => secure::WORDS_BROKEN,
    }
}

/// What the user is told when no rendezvous was given and this peer runs
/// one ([`crate::hosted`]).
pub fn hosting(h: &crate::hosted::Hosted) -> String {
    if !h.ours {
        return format!(
            "no rendezvous given, and port {} is taken on this host: meeting at the rendezvous \
             already there ({})",
            h.port, h.addr
        );
    }
    let at = if h.advertised.is_empty() {
        "loopback only: this host has no other address".to_owned()
    } else {
        h.advertised
            .iter()
            .map(std::net::IpAddr::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "no rendezvous given: this peer runs one itself for this chat, on port {} ({at})",
        h.port
    )
}

/// What the other host gives with `--server` to reach a rendezvous this peer
/// runs: this host's likeliest address.
pub fn hosted_server_arg(h: &crate::hosted::Hosted) -> String {
    let ip = h
        .advertised
        .first()
        .copied()
        .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
    crate::hosted::server_arg(ip, h.port)
}

/// What to do if the other host cannot reach the rendezvous this peer runs.
pub fn hosted_hint(h: &crate::hosted::Hosted) -> Option<String> {
    if !h.ours {
        return None;
    }
    let others: Vec<String> = h
        .advertised
        .iter()
        .skip(1)
        .map(|ip| crate::hosted::server_arg(*ip, h.port))
        .collect();
    let alternatives = if others.is_empty() {
        String::new()
    } else {
        format!(
            " (or --server {}, whichever it reaches)",
            others.join(" or ")
        )
    };
    Some(format!(
        "it works when the other host can reach this one{alternatives}: on the same LAN, or \
         this host has a public address. If it cannot (it says it cannot reach the \
         rendezvous: a NAT or firewall lies between), run `rendezvous` on a host both can \
         reach, such as a small VPS, and give its address with --server on both sides, or \
         set `server` in ~/.config/punchline/config.toml."
    ))
}

/// What the user is told when the other side of a meeting with the contact
/// `name` does not prove it holds that contact's identity key and the
/// pairing secret: loudly, with what to do.
pub fn contact_refused(name: &str, why: KeyRefusal) -> String {
    let name = sanitize_for_terminal(name);
    let how = match why {
        KeyRefusal::Handshake | KeyRefusal::Words => "its handshake did not prove it",
        KeyRefusal::ClosedInHandshake => "it closed the link during the handshake",
        KeyRefusal::Candidates => "its candidates were not sealed with your pairing",
    };
    format!(
        "REFUSED: whoever answered as {name} is not the {name} you saved ({how}): it does not hold \
         both {name}'s identity key and your pairing. Either {name} set up punchline again (a new \
         identity key) or forgot you, or someone else is answering in {name}'s place. Nothing you \
         typed can be read by it. If {name} set up again, forget the old contact (`peer contacts \
         forget {name}`), chat once more with a code and save {name} again; otherwise do not \
         trust this meeting."
    )
}

/// Why a later link was refused, in a few words.
pub fn not_authenticated(why: KeyRefusal) -> &'static str {
    match why {
        KeyRefusal::Handshake => "the far end of the new link does not hold this chat's secret",
        KeyRefusal::ClosedInHandshake => {
            "the far end of the new link closed it during the encryption handshake"
        }
        KeyRefusal::Candidates => {
            "the other side's candidates were not sealed with this chat's secret"
        }
        // Only a first link checks the words' commitments.
        KeyRefusal::Words => "the far end of the new link broke its words commitment",
    }
}

/// The warning shown when a later link fails authentication and one more try
/// is made.
pub(crate) fn auth_warning(why: KeyRefusal, their_name: &str) -> String {
    let why = not_authenticated(why);
    format!(
        "warning: a new link failed authentication ({why}): someone who does not hold this \
         chat's secret answered in {their_name}'s place — the rendezvous, or someone on the path to it, may \
         be interfering. Nothing was sent to it. One more try; a second failure ends the chat."
    )
}

/// The error that ends a chat whose later links failed authentication
/// `failures` times, the last for `why`.
pub fn kept_failing(their_name: &str, failures: u32, why: KeyRefusal) -> String {
    let why = not_authenticated(why);
    format!(
        "a new link failed authentication {failures} times ({why}): someone who does not \
         hold this chat's secret keeps answering in {their_name}'s place — the rendezvous, or someone \
         on the path to it, is interfering. The chat ends here; start a new one with a new \
         code, and compare the /verify words"
    )
}

/// The error for a chat that ended with `failure`; `unacked` lines were not
/// confirmed as delivered.
pub(crate) fn failure(failure: Failure, their_name: &str, unacked: usize) -> PeerError {
    let lost = |why: String| PeerError::LinkLost {
        name: their_name.to_owned(),
        why,
    };
    match failure {
        f if f.is_protocol() => PeerError::Protocol(f.to_string()),
        Failure::ByeUnanswered(d) => PeerError::Timeout(format!(
            "{their_name} did not answer our goodbye within {} s: delivery of the last lines is not confirmed",
            d.as_secs()
        )),
        Failure::LostWhileLeaving(why) => undelivered(lost(why.to_string()), their_name, unacked),
        f => undelivered(lost(f.to_string()), their_name, unacked),
    }
}

/// `e`, with the count of lines the other side did not confirm.
pub(crate) fn undelivered(e: PeerError, their_name: &str, unacked: usize) -> PeerError {
    if unacked == 0 {
        return e;
    }
    let count = format!(
        "{unacked} line{} not confirmed as delivered",
        if unacked == 1 { "" } else { "s" }
    );
    match e {
        PeerError::LinkLost { name, why } => PeerError::LinkLost {
            name,
            why: format!("{why}; {count}"),
        },
        e => PeerError::LinkLost {
            name: their_name.to_owned(),
            why: format!("{e}; {count}"),
        },
    }
}

/// The first sentence of a diagnosis, lower-cased at the start, for "because …".
pub(crate) fn first_sentence(text: &str) -> String {
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

/// A punch that found no link (and, if asked, no relay either), for the user.
pub fn punch_failed(name: &str, f: &PunchFailure, relay_refused: Option<&PeerError>) -> String {
    let mut text = format!(
        "no direct connection to {name} ({} attempts in {:.1} s).\n{}",
        f.attempts,
        f.elapsed.as_secs_f64(),
        punch_diagnosis(f)
    );
    if let Some(refused) = relay_refused {
        text.push_str(&format!("\nNo relay either: {refused}."));
    }
    text
}

/// Why a punch failed, in a few words, for "… because {cause}".
pub(crate) fn punch_cause(f: &PunchFailure) -> String {
    first_sentence(&punch_diagnosis(f))
}

/// The likely reason no candidate of a punch worked, in words: one sentence
/// or more per line.
pub fn punch_diagnosis(f: &PunchFailure) -> String {
    let mut lines = Vec::new();
    if let Mapping::DependsOnDestination { first, second } = f.our_mapping {
        lines.push(format!(
            "This side's NAT gives each destination its own public port (the rendezvous saw \
             {first} on one port and {second} on another): a \"symmetric\" NAT. The other side \
             was told a port our connection attempts do not come from, so a direct connection \
             cannot be punched. Try from another network, or forward a port on your router and \
             offer it with --candidate."
        ));
    }
    if let Mapping::DependsOnDestination { first, second } = f.their_mapping {
        lines.push(format!(
            "The other side's NAT gives each destination its own public port (the rendezvous saw \
             {first} on one port and {second} on another): a \"symmetric\" NAT. Our attempts \
             would go to a port it never opened for us, so a direct connection cannot be punched."
        ));
    }
    if !lines.is_empty() {
        // The cause is known; only the LAN candidates were tried.
        let lan: Vec<String> = f.tried.iter().map(|t| t.addr.to_string()).collect();
        if lan.is_empty() {
            lines.push(
                "The other side offered no LAN address this host could try, so it cannot be on a network shared with this one."
                    .to_owned(),
            );
        } else {
            lines.push(format!(
                "The other side's LAN addresses ({}) did not answer either: it is not on a network shared with this one.",
                lan.join(", ")
            ));
        }
        return lines.join("\n");
    }
    let their_local_port = f
        .tried
        .iter()
        .find(|t| t.kind == CandidateKind::Lan)
        .map(|t| t.addr.port());
    if let (Some(local), Mapping::Unknown) = (their_local_port, f.their_mapping) {
        if local != f.their_observed.port() {
            lines.push(format!(
                "The other side's NAT changed its port (local {local}, public {}). If that NAT \
                 picks a new port for every destination (a \"symmetric\" NAT), our attempts \
                 went to a port it never opened for us, and a direct link cannot be punched.",
                f.their_observed.port()
            ));
        }
    }
    if f.our_mapping == Mapping::Unknown && f.our_observed.port() != f.local_port {
        lines.push(format!(
            "This side's NAT changed our port (local {}, public {}). If it picks a new port \
             for every destination (a \"symmetric\" NAT), the other side aimed at the wrong port.",
            f.local_port,
            f.our_observed.port()
        ));
    }
    let refused: u32 = f.tried.iter().map(|t| t.tally.refused).sum();
    let no_answer: u32 = f.tried.iter().map(|t| t.tally.no_answer).sum();
    if refused > 0 && refused >= no_answer {
        lines.push(
            "Most attempts were refused (a reset came back): the other side's NAT or firewall \
             rejects connections it did not expect, and the two sides' attempts never crossed. \
             Check that the other side is still running."
                .to_owned(),
        );
    } else if no_answer > 0 {
        lines.push(
            "Most attempts got no answer: a NAT or firewall on the way drops connections it did \
             not expect, and the two sides' attempts never crossed."
                .to_owned(),
        );
    }
    for t in &f.tried {
        if let Some(r) = &t.tally.rejected {
            lines.push(format!("{}: {r}.", t.addr));
        } else if let Some(e) = &t.tally.last_error {
            lines.push(format!("{}: {e}.", t.addr));
        }
    }
    if lines.is_empty() {
        lines.push("The cause is unknown: run with RUST_LOG=debug for details.".to_owned());
    }
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use punchline_proto::session::DownReason;

    #[test]
    fn a_chat_lost_while_leaving_counts_its_unconfirmed_lines_once() {
        let e = failure(Failure::LostWhileLeaving(DownReason::NoResume), "bob", 2);
        assert_eq!(
            e.to_string(),
            "connection to bob lost: no resume from the other side in time; 2 lines not confirmed as delivered"
        );
        let e = failure(Failure::LeftWhileReconnecting, "bob", 1);
        assert_eq!(
            e.to_string(),
            "connection to bob lost: you left while reconnecting; 1 line not confirmed as delivered"
        );
        let e = failure(Failure::LeftWhileReconnecting, "bob", 0);
        assert_eq!(
            e.to_string(),
            "connection to bob lost: you left while reconnecting"
        );
    }
}
