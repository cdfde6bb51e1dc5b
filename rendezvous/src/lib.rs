//! The punchline rendezvous: introduces two peers that typed the same code.
//!
//! It tells each peer the address its NAT shows to the world (the observed
//! address) — on its main port and, for comparison, on a probe port ([`run_probe`])
//! — pairs the two peers of a code, measures its RTT to each, and sends both
//! the synchronised "go" with the other's addresses so their SYNs cross. When the
//! punch fails, it can relay the pair's link, which stays end-to-end encrypted
//! (it sees only ciphertext). Entry point: [`run`], which tests call on a listener bound
//! to port 0.

pub mod metrics;
pub mod server;

pub use metrics::{serve_metrics, Metrics};
pub use server::{bind_default, run, run_probe, Config, DEFAULT_PORT, PROBE_PORT_OFFSET};
