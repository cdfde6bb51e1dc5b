//! Recognising the other peer on a punched link.
//!
//! A candidate address can lead somewhere unexpected: two home LANs often share a
//! private range, so the other's LAN address may be a different host here, or this
//! very host; with the same port a socket can even connect to itself (the SYN loops
//! back onto the SYN_SENT socket and the kernel completes a "self-connect"). So both
//! ends of every candidate link first send a [`crate::PeerToPeer::LinkHello`] and
//! accept the link only if the other's hello carries the pair's session token and
//! the opposite role.

use crate::{PeerToPeer, Role, SessionToken, PROTOCOL_VERSION};

/// Why a candidate link is not the expected peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkRejected {
    /// The far end speaks another protocol version.
    #[error("the other peer speaks protocol version {0}, this one speaks {PROTOCOL_VERSION}")]
    Version(u16),
    /// The far end belongs to another session: some other host answered.
    #[error("the far end is not the expected peer (wrong session)")]
    WrongSession,
    /// The far end has our own role: most likely we connected to ourselves.
    #[error("the far end has our own role: the link loops back to this peer")]
    SameRole,
    /// The first message was not a link hello.
    #[error("the far end did not start with a link hello")]
    NotAHello,
}

/// The hello this peer sends on each candidate link.
pub fn link_hello(session: SessionToken, role: Role) -> PeerToPeer {
    PeerToPeer::LinkHello {
        version: PROTOCOL_VERSION,
        session,
        role,
    }
}

/// Checks the first message received on a candidate link.
pub fn verify_link_hello(
    ours: &SessionToken,
    our_role: Role,
    received: &PeerToPeer,
) -> Result<(), LinkRejected> {
    match received {
        PeerToPeer::LinkHello {
            version,
            session,
            role,
        } => {
            if *version != PROTOCOL_VERSION {
                Err(LinkRejected::Version(*version))
            } else if session != ours {
                Err(LinkRejected::WrongSession)
            } else if *role == our_role {
                Err(LinkRejected::SameRole)
            } else {
                Ok(())
            }
        }
        _ => Err(LinkRejected::NotAHello),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: SessionToken = [7; 16];

    #[test]
    fn the_other_role_with_our_session_is_accepted() {
        assert_eq!(
            verify_link_hello(&S, Role::Leader, &link_hello(S, Role::Follower)),
            Ok(())
        );
        assert_eq!(
            verify_link_hello(&S, Role::Follower, &link_hello(S, Role::Leader)),
            Ok(())
        );
    }

    #[test]
    fn a_self_connect_is_rejected() {
        // Our own hello looped back.
        assert_eq!(
            verify_link_hello(&S, Role::Leader, &link_hello(S, Role::Leader)),
            Err(LinkRejected::SameRole)
        );
    }

    #[test]
    fn strangers_are_rejected() {
        assert_eq!(
            verify_link_hello(&S, Role::Leader, &link_hello([8; 16], Role::Follower)),
            Err(LinkRejected::WrongSession)
        );
        let old = PeerToPeer::LinkHello {
            version: PROTOCOL_VERSION + 1,
            session: S,
            role: Role::Follower,
        };
        assert_eq!(
            verify_link_hello(&S, Role::Leader, &old),
            Err(LinkRejected::Version(PROTOCOL_VERSION + 1))
        );
        assert_eq!(
            verify_link_hello(&S, Role::Leader, &PeerToPeer::Handshake(vec![0; 32])),
            Err(LinkRejected::NotAHello)
        );
    }
}
