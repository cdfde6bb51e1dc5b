//! Meeting the other peer: probe, hello and wait at the rendezvous, then the
//! punch (or the relay) and the encryption handshake — steps 2 to 4 of a
//! session. A chat's first meeting authenticates with the code; every later
//! one (a resume, the switch to direct) with the chat's secret, in the chat's
//! own room at the rendezvous.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use punchline_proto::session::LinkKind;
use punchline_proto::{
    codes::Code, Hello, Introduction, Mapping, PunchOutcome, Role, SealedCandidates,
    MAX_CANDIDATES, PROTOCOL_VERSION,
};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::chat::Output;
use crate::contacts::{self, Contact, Identity};
use crate::error::{KeyRefusal, PeerError};
use crate::secure::LinkKeys;
use crate::{client, net, portmap, punch, secure, Options, PROBE_PORT_OFFSET};

/// How the link of a met peer runs.
pub(crate) enum Path {
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
pub(crate) enum Keying<'a> {
    /// The chat's first meeting: the code, by SPAKE2 through the rendezvous;
    /// the leader's first handshake message carries the lines typed so far.
    Code(&'a Code, &'a FirstMeeting),
    /// The chat's first meeting, with a contact: in the room of its pairing
    /// for the current hour, authenticated by both identity keys and the
    /// pairing ([`secure::Secret::contact`]); first lines as with a code.
    Contact(&'a Contact, &'a FirstMeeting),
    /// A later meeting of the chat: its secret.
    Chat(&'a ChatKeys),
}

/// What a chat's first meeting brings besides its key.
pub(crate) struct FirstMeeting {
    /// The first lines, both ways.
    pub(crate) early: secure::EarlyLines,
    /// Our identity, introduced to the other side (and, with a contact, the
    /// handshake's static key).
    pub(crate) identity: Identity,
}

/// What a chat keeps from its first link for every later one.
#[derive(Clone)]
pub(crate) struct ChatKeys {
    /// The chat's secret (from the code's key and the first handshake).
    pub(crate) secret: secure::Secret,
    /// Our role on the first link, fixed for the chat.
    pub(crate) role: Role,
    /// The chat's verification words, from its first link.
    pub(crate) words: Option<String>,
    /// Our identity's public key, which every link's introduction names.
    pub(crate) identity: [u8; 32],
    /// The first link met a saved contact (else it was keyed by a code).
    pub(crate) by_contact: bool,
}

/// A met peer: the go and our view of the meeting, and the secured link.
pub(crate) struct Met {
    pub(crate) go: punchline_proto::Go,
    pub(crate) observed: SocketAddr,
    /// Our address in the other address family, as the rendezvous saw it.
    pub(crate) other_family: Option<SocketAddr>,
    pub(crate) mapping: Mapping,
    pub(crate) local_port: u16,
    pub(crate) path: Path,
    pub(crate) link: secure::SecureLink,
    pub(crate) chat: ChatKeys,
}

impl Met {
    /// Whether the link goes through the rendezvous' relay.
    pub(crate) fn is_relayed(&self) -> bool {
        matches!(self.path, Path::Relayed { .. })
    }

    /// What the chat session needs to know of this link.
    pub(crate) fn kind(&self) -> LinkKind {
        LinkKind {
            relayed: self.is_relayed(),
            leads: self.go.role == Role::Leader,
        }
    }
}

/// Probe, hello and wait on `rendezvous`, then punch and secure the link:
/// steps 2 to 4 of a session. With [`Keying::Chat`], the peers meet again in the
/// chat's room and authenticate with its secret (the code is not used again).
pub(crate) async fn meet(
    opts: &Options,
    mut rendezvous: client::RendezvousConn,
    keying: Keying<'_>,
    status: &mut (dyn Output + Send),
) -> Result<Met, PeerError> {
    let port = rendezvous.local_port;
    // The router's forward of our port, asked for beside the meeting (as
    // soon as the port was bound, when the connection asked for it); named
    // in the hello if granted by then, used at the go if it has come,
    // deleted when the meeting ends. Not with a rendezvous on this host:
    // whoever meets there reaches this host already.
    let here = punch::Here::new(rendezvous.server);
    let mapper = rendezvous
        .take_mapper()
        .or_else(|| (opts.port_mapping && !here.local_trial).then(|| portmap::Mapper::start(port)));
    let probe_port = opts
        .probe_port
        .unwrap_or_else(|| rendezvous.server.port().wrapping_add(PROBE_PORT_OFFSET));
    // The probe started with the connection is found by the server through
    // its token; without one (none was started), probe now and report it.
    let other_family_token = rendezvous.other_family_token().await;
    let (probe_observed, probe_token) = match rendezvous.probe_token() {
        Some(token) => (None, Some(token)),
        None => (rendezvous.probe(probe_port).await, None),
    };
    let mapped = mapper
        .as_ref()
        .and_then(portmap::Mapper::lease)
        .map(|lease| lease.external);
    let (exchange, hello) = match keying {
        Keying::Code(code, _) => {
            let exchange = secure::KeyExchange::start(code)?;
            let hello = Hello {
                version: PROTOCOL_VERSION,
                nameplate: code.nameplate.clone(),
                probe_observed,
                pake: exchange.message.clone(),
                resume: None,
                probe_token,
                other_family_token,
                mapped,
            };
            (Some(exchange), hello)
        }
        Keying::Contact(contact, _) => {
            let hello = Hello {
                version: PROTOCOL_VERSION,
                nameplate: String::new(),
                probe_observed,
                pake: Vec::new(),
                resume: Some(secure::contact_room(
                    &contact.pairing,
                    contacts::room_epoch(SystemTime::now()),
                )),
                probe_token,
                other_family_token,
                mapped,
            };
            (None, hello)
        }
        Keying::Chat(keys) => {
            let hello = Hello {
                version: PROTOCOL_VERSION,
                nameplate: String::new(),
                probe_observed,
                pake: Vec::new(),
                resume: Some(keys.secret.resume_room()),
                probe_token,
                other_family_token,
                mapped,
            };
            (None, hello)
        }
    };
    // A contact's room changes with the hour: a peer still waiting then
    // meets again in the new one, where the other will look.
    let room_changes = contacts::until_next_epoch(SystemTime::now());
    let (observed, mapping) = rendezvous.hello(hello).await?;
    match keying {
        Keying::Code(..) => status.status(&format!(
            "waiting for the other side to join with the code (your public address: {observed}, local port {port})"
        )),
        Keying::Contact(contact, _) => status.status(&format!(
            "waiting for {} (your public address: {observed}, local port {port})",
            contact.name
        )),
        Keying::Chat(_) => {}
    }
    if let Mapping::DependsOnDestination { first, second } = mapping {
        status.status(&format!(
            "warning: your NAT gives each destination its own public port (the rendezvous saw {first} and {second}): \
             a direct connection can only work {}if the other side is on your LAN",
            if other_family_token.is_some() && rendezvous.server.is_ipv4() { "over IPv6 or " } else { "" }
        ));
    }
    let go = match keying {
        Keying::Contact(..) => tokio::select! {
            go = rendezvous.wait_for_go() => go?,
            () = tokio::time::sleep(room_changes) => {
                rendezvous.abort();
                return Err(PeerError::RoomChanged);
            }
        },
        _ => rendezvous.wait_for_go().await?,
    };
    let start = Instant::now();
    // From here on, in a first meeting, the code has been handed to whoever
    // joined: whatever fails now, it must not be used again.
    let after_go = async move {
        let (secret, chat_role) = match (exchange, keying) {
            (Some(exchange), _) => (exchange.finish(&go.peer.pake)?, go.role),
            (None, Keying::Contact(contact, first)) => {
                (secure::Secret::contact(contact, &first.identity)?, go.role)
            }
            (None, Keying::Chat(keys)) => (keys.secret.clone(), keys.role),
            (None, Keying::Code(..)) => unreachable!("a first meeting always starts the exchange"),
        };
        tracing::info!(observed = %go.peer.observed, role = %go.role, "go");

        let our_other_family = rendezvous.other_family_seen().await;
        // Only a mapping at the address the rendezvous saw us at helps: one
        // at another (a router behind a carrier's NAT, or a hostile answer on
        // the LAN naming loopback or some third host) is not offered.
        let mapped = mapper
            .as_ref()
            .and_then(portmap::Mapper::lease)
            .filter(|lease| lease.external.ip().to_canonical() == observed.ip().to_canonical());
        // Our candidates travel sealed: only the other peer can open them.
        // The router's forward first: it works from anywhere.
        let mut candidates = our_candidates(opts, port);
        if let Some(lease) = &mapped {
            candidates.retain(|c| *c != lease.external);
            candidates.insert(0, lease.external);
            candidates.truncate(MAX_CANDIDATES);
        }
        let candidates = SealedCandidates { candidates };
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
            server_rtt: rendezvous.rtt(),
            our_other_family,
            mapped: mapped.as_ref().map(|lease| lease.external),
        };
        let identity = match keying {
            Keying::Code(_, first) | Keying::Contact(_, first) => first.identity.public(),
            Keying::Chat(keys) => keys.identity,
        };
        let keys = Arc::new(LinkKeys {
            secret: secret.clone(),
            ours: Introduction {
                name: opts.name.clone(),
                chat_role,
                // Filled in by the handshake.
                words_nonce: [0; 32],
                first_lines: Vec::new(),
                identity,
            },
            // The words: made by the first link, kept for the others.
            words: match keying {
                Keying::Code(..) | Keying::Contact(..) => None,
                Keying::Chat(keys) => keys.words.clone(),
            },
            first_lines: match keying {
                Keying::Code(_, first) | Keying::Contact(_, first) => first.early.ours.clone(),
                Keying::Chat(_) => secure::FirstLines::default(),
            },
            shows_first_lines: match keying {
                Keying::Code(_, first) | Keying::Contact(_, first) => {
                    Some(first.early.theirs.clone())
                }
                Keying::Chat(_) => None,
            },
        });
        let punched =
            punch_with_their_candidates(&mut rendezvous, &go, &params, keys.clone(), start).await;
        let keep = |link: &secure::SecureLink| match keying {
            Keying::Code(..) | Keying::Contact(..) => ChatKeys {
                secret: secret.chat(link.handshake_hash()),
                role: chat_role,
                words: link.verification().map(str::to_owned),
                identity,
                by_contact: matches!(keying, Keying::Contact(..)),
            },
            Keying::Chat(keys) => keys.clone(),
        };
        let punched = match punched {
            Ok(p) => p,
            Err(PeerError::PunchFailed { name, failure, .. }) if opts.relay => {
                let stream = match rendezvous.relay(failure.attempts).await {
                    Ok(stream) => stream,
                    Err(refused) => {
                        return Err(PeerError::PunchFailed {
                            name,
                            failure,
                            relay_refused: Some(Box::new(refused)),
                        })
                    }
                };
                let link =
                    tokio_util::codec::Framed::new(stream, punchline_proto::FrameCodec::new());
                let hs = keys.handshake(go.role, &punch::link_token(&go.session))?;
                let link = secure::SecureLink::over(link, hs).await?;
                let why = crate::render::punch_cause(&failure);
                tracing::info!(carried = link.carried(), "relayed and encrypted");
                return Ok(Met {
                    observed,
                    other_family: our_other_family,
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
                    PeerError::PunchFailed { failure, .. } => failure.attempts,
                    _ => 0,
                };
                rendezvous.finish(PunchOutcome::Failed { attempts }).await;
                return Err(e);
            }
        };
        let elapsed_ms = punched.elapsed.as_millis();
        tracing::info!(remote = %punched.remote, elapsed_ms, attempts = punched.attempts, "direct link up");
        // How many of our first lines the handshake carried.
        tracing::info!(carried = punched.link.carried(), "encrypted");
        // The report and the closing handshake with the rendezvous (a round
        // trip to it) go on beside the chat, not before it.
        tokio::spawn(rendezvous.finish(PunchOutcome::Direct {
            public: punched.kind.is_public(),
            attempts: punched.attempts,
            elapsed_ms: elapsed_ms.try_into().unwrap_or(u32::MAX),
        }));
        let link = punched.link;
        Ok(Met {
            observed,
            other_family: our_other_family,
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
        Keying::Code(..) => after_go.await.map_err(PeerError::code_used),
        Keying::Contact(..) | Keying::Chat(_) => after_go.await,
    }
}

/// The candidates we offer: this host's addresses (unless the user said not
/// to) and those the user added, with our fixed port.
pub(crate) fn our_candidates(opts: &Options, port: u16) -> Vec<SocketAddr> {
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
pub(crate) async fn punch_with_their_candidates(
    rendezvous: &mut client::RendezvousConn,
    go: &punchline_proto::Go,
    params: &punch::PunchParams,
    keys: Arc<LinkKeys>,
    start: Instant,
) -> Result<punch::Punched, PeerError> {
    let (late_tx, late_rx) = oneshot::channel();
    let secret = keys.secret.clone();
    let punching = punch::punch(go, params, keys, start, late_rx);
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
            None => return Err(secret.refused(KeyRefusal::Candidates)),
        },
        Err(e) => tracing::debug!(error = %e, "no candidates from the other side"),
    }
    punching.await
}
