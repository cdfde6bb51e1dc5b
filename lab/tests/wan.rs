//! The WAN emulator measured with ping: configured one-way link delays must
//! show up as RTT = 2 · (sum of the two links' delays), and loss must drop.
//! Needs root; skips loudly otherwise (see `common::lab_available`).

mod common;

use std::time::Duration;

use punchline_lab::{Host, LabConfig, LinkShape, NatKind, WanConfig};

/// Pings per measured path; the median of these is compared.
const PINGS: u32 = 10;

/// Allowed relative error of a median RTT against the model.
const TOLERANCE: f64 = 0.10;

#[test]
fn ping_rtts_match_configured_delays() {
    if !common::lab_available("ping_rtts_match_configured_delays") {
        return;
    }
    let wan = WanConfig::delays_ms(5, 40, 20);
    let lab = common::build(&LabConfig::new(NatKind::Home, NatKind::Rst).with_wan(wan));

    // A's and B's routers answer pings on the public side only without the
    // inbound filter, so the A→B path targets B's rst router.
    let paths = [
        (
            "A -> rv",
            Host::A,
            lab.addr(Host::Rv),
            lab.rtt(Host::A, Host::Rv),
        ),
        (
            "B -> rv",
            Host::B,
            lab.addr(Host::Rv),
            lab.rtt(Host::B, Host::Rv),
        ),
        (
            "A -> B public",
            Host::A,
            lab.public_addr(Host::B),
            lab.rtt(Host::A, Host::B),
        ),
        (
            "rv -> probe",
            Host::Rv,
            lab.addr(Host::Probe),
            lab.rtt(Host::Rv, Host::Probe),
        ),
    ];
    assert_eq!(paths[0].3, Duration::from_millis(50));
    assert_eq!(paths[1].3, Duration::from_millis(120));
    assert_eq!(paths[2].3, Duration::from_millis(90));
    assert_eq!(paths[3].3, Duration::from_millis(40));

    // All paths at once: keeps the test short and shows the links don't
    // disturb each other.
    let measured: Vec<f64> = std::thread::scope(|scope| {
        let handles: Vec<_> = paths
            .iter()
            .map(|&(_, host, dest, _)| {
                let lab = &lab;
                scope.spawn(move || common::ping_median_ms(lab, host, dest, PINGS))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("ping thread"))
            .collect()
    });

    let mut report = String::new();
    let mut ok = true;
    for ((name, _, _, expected), got) in paths.iter().zip(&measured) {
        let expected_ms = expected.as_secs_f64() * 1000.0;
        let error = (got - expected_ms).abs() / expected_ms;
        report.push_str(&format!(
            "{name:<14} expected {expected_ms:6.1} ms, median {got:7.2} ms ({:+.1}%)\n",
            (got - expected_ms) / expected_ms * 100.0
        ));
        ok &= error <= TOLERANCE;
    }
    eprintln!("{report}");
    assert!(
        ok,
        "RTTs off by more than {TOLERANCE}:\n{report}{}",
        lab.diagnostics()
    );
    assert!(lab.wan_running());
}

#[test]
fn loss_drops_and_can_be_changed_at_run_time() {
    if !common::lab_available("loss_drops_and_can_be_changed_at_run_time") {
        return;
    }
    let lab = common::build(&LabConfig::new(NatKind::Public, NatKind::Public));
    let wan = WanConfig {
        rv: LinkShape::NONE.with_loss(1.0),
        ..WanConfig::default()
    };
    lab.set_wan(wan).expect("set loss");
    let lost = lab
        .command(Host::A, "ping")
        .args(["-n", "-c", "3", "-i", "0.2", "-W", "1"])
        .arg(lab.addr(Host::Rv).to_string())
        .output()
        .expect("run ping");
    assert!(!lost.status.success(), "pings passed a link with loss 1.0");
    let stats = lab.wan_stats();
    assert!(stats.lost >= 3, "{stats:?}");

    lab.set_wan(WanConfig::delays_ms(0, 0, 10))
        .expect("clear loss");
    let median = common::ping_median_ms(&lab, Host::A, lab.addr(Host::Rv), 3);
    assert!(
        (18.0..=24.0).contains(&median),
        "median {median} ms, expected 20"
    );
}
