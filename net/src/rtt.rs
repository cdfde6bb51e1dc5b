//! The kernel's RTT estimate for a TCP connection.
//!
//! At accept time the kernel has already timed the handshake (SYN-ACK sent, ACK
//! received), so a freshly arrived peer's RTT is known without a ping round trip.
//! That matters for the synchronised go: the second peer of a pair is paired the
//! moment its hello arrives, and pinging it first would delay every punch by a few
//! of its RTTs.

use std::os::fd::AsRawFd;
use std::time::Duration;

/// The smoothed RTT the kernel keeps for `socket`, if it has one.
pub fn kernel_rtt(socket: &impl AsRawFd) -> Option<Duration> {
    // SAFETY: tcp_info is plain old data, valid when zeroed; getsockopt writes at
    // most `len` bytes into it and reports how many.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the pointers are valid for the sizes passed, for the whole call.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 || info.tcpi_rtt == 0 {
        return None;
    }
    Some(Duration::from_micros(u64::from(info.tcpi_rtt)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_connection_has_a_small_rtt() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let client =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        let rtt = kernel_rtt(&server).expect("kernel has an RTT after the handshake");
        assert!(rtt < Duration::from_secs(1), "{rtt:?}");
        assert!(kernel_rtt(&client).is_some());
    }
}
