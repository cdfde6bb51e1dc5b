//! Admission: the per-source limits (open connections, new connections and new
//! codes a minute, each per address and per network) and the decision on each
//! new connection, with the reason and wording of a refusal.

use std::net::IpAddr;

use punchline_proto::limits::{Concurrent, PerScope, Rate, RateLimit, Refused};
use tokio::time::Instant;

use super::{Config, Shared, CODE_BURST, CONNECTION_BURST, MAX_TRACKED_ADDRESSES};
use crate::reject::Reject;

/// The per-source limits of the server, each per address and per network.
pub(super) struct Limits {
    pub(super) open: PerScope<Concurrent>,
    pub(super) connects: PerScope<Rate>,
    pub(super) codes: PerScope<Rate>,
    pub(super) relays: PerScope<Concurrent>,
}

impl Limits {
    pub(super) fn new(config: &Config) -> Self {
        let times = config.network_multiple.max(1);
        let concurrent = |per_address: u32| {
            PerScope::<Concurrent>::new(
                per_address,
                per_address.saturating_mul(times),
                MAX_TRACKED_ADDRESSES,
            )
        };
        let rate = |burst, per_minute| {
            let per_address = RateLimit { burst, per_minute };
            PerScope::<Rate>::new(per_address, per_address.times(times), MAX_TRACKED_ADDRESSES)
        };
        Limits {
            open: concurrent(config.connections_per_address),
            connects: rate(CONNECTION_BURST, config.connections_per_minute),
            codes: rate(CODE_BURST, config.codes_per_minute),
            relays: concurrent(config.relays_per_address),
        }
    }
}

/// Whether a new connection may be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Admission {
    Admitted,
    /// The server is at its total connection cap.
    Busy,
    /// This address or network has too many connections open.
    TooManyOpen(Refused),
    /// This address or network opens connections too fast.
    TooFast(Refused),
}

impl Admission {
    /// What a refused connection counts as, and the message its peer is sent;
    /// `None` when it is admitted.
    pub(super) fn refusal(self) -> Option<(Reject, String)> {
        match self {
            Admission::Admitted => None,
            Admission::Busy => Some((
                Reject::server_full,
                "the server is at its connection limit; try again in a minute".to_owned(),
            )),
            Admission::TooManyOpen(refused) => Some((
                Reject::for_open(refused.scope),
                format!(
                    "too many connections from {} (at most {}); close some and try again",
                    refused.whose(),
                    refused.limit
                ),
            )),
            Admission::TooFast(refused) => Some((
                Reject::for_connection_rate(refused.scope),
                format!(
                    "{} opens connections too fast (at most {} a minute); try again in a minute",
                    refused.whose(),
                    refused.limit
                ),
            )),
        }
    }
}

impl Shared {
    /// Decides on a new connection from `ip` while `serving` are open; an
    /// admitted connection holds one of the open slots of `ip`'s address and
    /// network until [`Self::release`].
    pub(super) fn admit(&self, ip: IpAddr, serving: usize) -> Admission {
        if serving >= self.config.max_connections {
            return Admission::Busy;
        }
        let mut limits = self.limits();
        if let Err(refused) = limits.connects.allow(ip, Instant::now().into_std()) {
            return Admission::TooFast(refused);
        }
        if let Err(refused) = limits.open.acquire(ip) {
            return Admission::TooManyOpen(refused);
        }
        Admission::Admitted
    }

    pub(super) fn release(&self, ip: IpAddr) {
        self.limits().open.release(ip);
    }

    /// Counts a new code from `ip`; refused if its address or network opens
    /// codes too fast.
    pub(super) fn new_code(&self, ip: IpAddr) -> Result<(), Refused> {
        self.limits().codes.allow(ip, Instant::now().into_std())
    }
}
