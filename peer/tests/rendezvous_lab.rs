//! The connection to the rendezvous when its first SYN or SYN-ACK is lost, in
//! the NAT lab: the rendezvous host drops exactly one of them (nftables, in its
//! namespace), and the peer, behind a NAT that does not keep its ports, must
//! connect with a second connection from the same port to the server's
//! alternate port rather than wait for the kernel's retransmission, and that
//! connection must keep the public port the probe saw (else the rendezvous
//! would call the NAT symmetric).
//!
//! Needs root and the lab's tools; skips loudly otherwise (fails instead when
//! `PUNCHLINE_REQUIRE_LAB=1`, as in CI).

use punchline_lab::cmd::ip_netns_exec_with_stdin;
use punchline_lab::prereq::available_or_skip;
use punchline_lab::scenario::LabRendezvous;
use punchline_lab::{Host, Lab, LabConfig, NatKind, WanConfig};
use punchline_peer::client::RendezvousConn;
use punchline_rendezvous::{Config, ALTERNATE_PORT_OFFSET, PROBE_PORT_OFFSET};

/// Which segment of the handshake the rendezvous host drops, once.
#[derive(Clone, Copy)]
enum Drop {
    /// The peer's first SYN, on its way in.
    Syn,
    /// The server's first SYN-ACK, on its way out.
    SynAck,
}

/// An nftables table in the rendezvous namespace that drops the first segment
/// of `what` for the server's main port (a quota of one SYN's worth of bytes:
/// the first matches and is dropped, later ones pass), counting every segment
/// of that kind there (`seen`) and on the alternate port (`alternate`).
fn drop_once(lab: &Lab, port: u16, what: Drop) {
    let alternate = port + ALTERNATE_PORT_OFFSET;
    let (hook, rule, other) = match what {
        Drop::Syn => (
            "input",
            format!("tcp dport {port} tcp flags & (syn | ack) == syn"),
            format!("tcp dport {alternate} tcp flags & (syn | ack) == syn"),
        ),
        Drop::SynAck => (
            "output",
            format!("tcp sport {port} tcp flags & (syn | ack) == syn | ack"),
            format!("tcp sport {alternate} tcp flags & (syn | ack) == syn | ack"),
        ),
    };
    let script = format!(
        "table inet lossonce {{
            chain c {{
                type filter hook {hook} priority -10; policy accept;
                {rule} counter name seen
                {rule} quota until 100 bytes counter name dropped drop
                {other} counter name alternate
            }}
            counter seen {{ }}
            counter dropped {{ }}
            counter alternate {{ }}
        }}\n"
    );
    ip_netns_exec_with_stdin(lab.netns(Host::Rv), "nft", &["-f", "-"], Some(&script))
        .unwrap_or_else(|e| panic!("installing the drop: {e}"));
}

/// Packets counted by the named counter of [`drop_once`]'s table.
fn counted(lab: &Lab, name: &str) -> u64 {
    let out = punchline_lab::cmd::ip_netns_exec(
        lab.netns(Host::Rv),
        "nft",
        &["list", "counter", "inet", "lossonce", name],
    )
    .unwrap_or_else(|e| panic!("reading counter {name}: {e}"));
    out.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no packet count in {out:?}"))
}

fn lost_and_raced(name: &str, what: Drop) {
    if !available_or_skip(name) {
        return;
    }
    // Side A's NAT maps into a port range: a new mapping would get another
    // public port, so a fresh connection that kept the probe's port shows it
    // reused the mapping.
    let config =
        LabConfig::new(NatKind::Range, NatKind::Home).with_wan(WanConfig::delays_ms(5, 40, 20));
    let lab = Lab::build(&config).unwrap_or_else(|e| panic!("building the lab: {e}"));
    let rv = LabRendezvous::start(&lab, Config::default()).expect("rendezvous starts");
    drop_once(&lab, rv.addr.port(), what);
    let server = rv.addr.to_string();
    let probe_port = rv.addr.port() + PROBE_PORT_OFFSET;
    let (fresh, seen_by_main, seen_by_probe) = lab
        .run_in(Host::A, move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let mut conn = RendezvousConn::connect_probing(&server, 0, None, false)
                    .await
                    .unwrap_or_else(|e| panic!("connecting: {e}"));
                let fresh = conn.via_alternate();
                let main = conn.reflect().await.expect("the server says what it sees");
                let probe = conn
                    .probe(probe_port)
                    .await
                    .expect("the probe port answers");
                (fresh, main, probe)
            })
        })
        .expect("running in side A");
    assert_eq!(
        counted(&lab, "dropped"),
        1,
        "{name}: exactly one segment dropped"
    );
    assert!(
        fresh,
        "{name}: the connection that won is not the alternate one (the kernel's retransmission got through first)"
    );
    assert_eq!(
        counted(&lab, "alternate"),
        1,
        "{name}: one segment of the kind on the alternate port"
    );
    assert_eq!(
        seen_by_main, seen_by_probe,
        "{name}: the second connection kept the public address and port of the mapping"
    );
    assert!(
        (20000..=20999).contains(&seen_by_main.port()),
        "{name}: the range NAT mapped the port ({seen_by_main})"
    );
}

#[test]
fn a_lost_syn_to_the_rendezvous_is_raced_by_the_alternate_port() {
    lost_and_raced("rendezvous_lab::lost_syn", Drop::Syn);
}

#[test]
fn a_lost_syn_ack_from_the_rendezvous_is_raced_by_the_alternate_port() {
    lost_and_raced("rendezvous_lab::lost_syn_ack", Drop::SynAck);
}
