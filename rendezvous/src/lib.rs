//! The punchline rendezvous: introduces two peers that typed the same code.
//!
//! It tells each peer the address its NAT shows to the world (the observed
//! address) — on its main port and, for comparison, on a probe port ([`run_probe`])
//! — pairs the two peers of a code, measures its RTT to each, and sends both
//! the synchronised "go" with the other's addresses so their SYNs cross. When the
//! punch fails, it can relay the pair's link, which stays end-to-end encrypted
//! (it sees only ciphertext). Entry point: [`run`], which tests call on a listener bound
//! to port 0.
//!
//! The modules, by what each owns:
//! - [`server`]: the server. Its root holds the settings ([`Config`]), the
//!   defaults and limits, the state the connections share, and [`run`]; below it:
//!   - `server::accept`: the listening socket ([`bind_default`]), the accept loop,
//!     the sweep that expires waiting peers;
//!   - `server::admission`: the per-source limits, admitting or refusing a new
//!     connection;
//!   - `server::connection`: one connection's exchange (hello, pairing, the
//!     synchronised go, the punch report) and its errors to the peer;
//!   - `server::relay`: relaying a pair whose punch failed;
//!   - `server::probe`: the probe port ([`run_probe`]) and the dial-back.
//! - [`metrics`]: what the server counts ([`Metrics`]), the stats line, and in
//!   `metrics::http` the endpoint that serves them ([`serve_metrics`]). A leaf: it
//!   imports nothing of the server.
//! - `reject`: why a connection is refused or ended ([`metrics::Reject`]): the
//!   metrics label and the error code the peer is sent; the server and the metrics
//!   both use it.

pub mod metrics;
mod reject;
pub mod server;

pub use metrics::{serve_metrics, Metrics};
pub use server::{
    bind_default, run, run_on, run_probe, Config, ALTERNATE_PORT_OFFSET, DEFAULT_PORT,
    PROBE_PORT_OFFSET,
};
