//! Test support for punchline: the pieces every test binary and the load
//! generator share, instead of a copy in each.
//!
//! - [`TestRendezvous`]: the real rendezvous server (main and probe port) on a
//!   thread and runtime of its own, on loopback or a given address; it stops
//!   when dropped.
//! - [`Client`]: a raw client of the rendezvous protocol. Unlike the real peer
//!   it sends whatever it is told, in any order, and hands back every message
//!   the server sends, so tests can check the server's answers to anything.
//! - [`http_get`] and [`sample`]: a scrape of the metrics endpoint and one
//!   value out of it.
//!
//! Test calls panic with a message saying what was expected (the test fails
//! there); the few calls the load generator needs return errors instead.

mod client;
mod metrics;
mod server;

pub use client::{connect_from, error_code, hello, refusal, Client, ClientError, Conn, WAIT};
pub use metrics::{http_get, sample};
pub use server::TestRendezvous;
