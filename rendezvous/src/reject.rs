//! Why the server refuses or ends a connection: one reason per case, which is
//! both the `reason` label of the rejects counter (see [`crate::metrics`]) and
//! the error code the peer is sent. Imports nothing else of the crate, so the
//! server and the metrics can both use it.

use prometheus_client::encoding::EncodeLabelValue;
use punchline_proto::limits::Scope;
use punchline_proto::ErrorCode;

/// Why the server refused or ended a connection: the `reason` label of
/// `punchline_rejects_total`, and the error code the peer is sent.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)] // the label values, as they appear in the metrics
pub enum Reject {
    /// The server is at its total connection cap.
    server_full,
    /// The source address (IPv4 address, IPv6 /64) has too many connections
    /// open.
    address_open,
    /// The source network (IPv4 /24, IPv6 /48) has too many connections open.
    network_open,
    /// The source address opens connections too fast.
    address_rate,
    /// The source network opens connections too fast.
    network_rate,
    /// The source address opens new codes too fast.
    code_rate,
    /// The source network opens new codes too fast.
    network_code_rate,
    /// The pairing table is full, or no nameplate is free.
    rooms_full,
    /// Two peers already hold the code.
    code_in_use,
    /// The peer speaks another protocol version.
    version,
    /// A malformed frame, a bad field or an unexpected message.
    malformed,
    /// No hello in time.
    hello_timeout,
    /// A waiting peer stopped answering pings.
    idle,
    /// A relay was asked of a server that does not relay.
    relay_off,
    /// A relay was asked while the server relays all it may.
    relay_full,
    /// A relay was asked from an address that has its share of relays.
    relay_address,
    /// A relay was asked from a network that has its share of relays.
    relay_network,
    /// A relayed pair spent its allowance of bytes.
    relay_budget,
    /// A relay reached its lifetime (the peers reconnect over a new link).
    relay_lifetime,
}

impl Reject {
    /// The error code the peer is told.
    pub fn code(self) -> ErrorCode {
        match self {
            Reject::server_full
            | Reject::address_open
            | Reject::network_open
            | Reject::address_rate
            | Reject::network_rate
            | Reject::code_rate
            | Reject::network_code_rate
            | Reject::rooms_full => ErrorCode::Busy,
            Reject::code_in_use => ErrorCode::CodeInUse,
            Reject::version => ErrorCode::VersionMismatch,
            Reject::malformed | Reject::hello_timeout | Reject::idle => ErrorCode::Malformed,
            Reject::relay_off
            | Reject::relay_full
            | Reject::relay_address
            | Reject::relay_network
            | Reject::relay_budget
            | Reject::relay_lifetime => ErrorCode::RelayUnavailable,
        }
    }

    /// Too many connections open, at `scope`.
    pub fn for_open(scope: Scope) -> Reject {
        match scope {
            Scope::Address => Reject::address_open,
            Scope::Network => Reject::network_open,
        }
    }

    /// New connections too fast, at `scope`.
    pub fn for_connection_rate(scope: Scope) -> Reject {
        match scope {
            Scope::Address => Reject::address_rate,
            Scope::Network => Reject::network_rate,
        }
    }

    /// New codes too fast, at `scope`.
    pub fn for_code_rate(scope: Scope) -> Reject {
        match scope {
            Scope::Address => Reject::code_rate,
            Scope::Network => Reject::network_code_rate,
        }
    }

    /// Too many relays, at `scope`.
    pub fn for_relays(scope: Scope) -> Reject {
        match scope {
            Scope::Address => Reject::relay_address,
            Scope::Network => Reject::relay_network,
        }
    }
}

/// Every reason, so that every series exists from the start.
pub(crate) const ALL_REJECTS: [Reject; 19] = [
    Reject::server_full,
    Reject::address_open,
    Reject::network_open,
    Reject::address_rate,
    Reject::network_rate,
    Reject::code_rate,
    Reject::network_code_rate,
    Reject::rooms_full,
    Reject::code_in_use,
    Reject::version,
    Reject::malformed,
    Reject::hello_timeout,
    Reject::idle,
    Reject::relay_off,
    Reject::relay_full,
    Reject::relay_address,
    Reject::relay_network,
    Reject::relay_budget,
    Reject::relay_lifetime,
];
