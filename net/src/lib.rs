//! Socket helpers both the peer and the rendezvous use, so that neither
//! program's crate depends on the other's: the kernel's view of a TCP
//! connection ([`rtt`]).

pub mod rtt;

pub use rtt::{kernel_rtt, tcp_state, unacked_segments};
