//! Addresses a go's `other_family` (or public address) may name that the
//! punch's sanity filter lets through although they are services of the
//! cloud host the peer runs on, not another peer: the IPv6 metadata
//! endpoints. `sane_candidate` drops 169.254.0.0/16 "where cloud hosts keep
//! their metadata service", but AWS serves the same at `[fd00:ec2::254]:80`
//! (Nitro, IPv6 instance metadata) and Google Compute Engine at
//! `[fd20:ce::254]:80`; a hostile rendezvous naming one as the other peer's
//! other-family address gets our SYNs and link hello sent there.

use std::net::{IpAddr, SocketAddr};

use punchline_peer::punch::{sane_candidate, Here};

#[test]
fn cloud_metadata_endpoints_over_ipv6_are_not_candidates() {
    // A dual-stack host with a global IPv6 address, meeting through a
    // rendezvous elsewhere.
    let here = Here {
        own: vec![
            "10.0.0.5".parse::<IpAddr>().expect("ip"),
            "2600:1f18::5".parse::<IpAddr>().expect("ip"),
        ],
        local_trial: false,
        private_rendezvous: false,
    };
    // Control: the IPv4 metadata address is dropped, an ordinary IPv6 peer kept.
    assert!(!sane_candidate(
        "169.254.169.254:80".parse().expect("addr"),
        &here
    ));
    assert!(sane_candidate(
        "[2001:db8::7]:4000".parse().expect("addr"),
        &here
    ));
    for bad in ["[fd00:ec2::254]:80", "[fd20:ce::254]:80"] {
        let addr: SocketAddr = bad.parse().expect("addr");
        assert!(
            !sane_candidate(addr, &here),
            "{bad} (a cloud metadata service over IPv6) would be dialled as a peer"
        );
    }
}
