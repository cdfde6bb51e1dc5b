//! The kernel's RTT estimate for a TCP connection.
//!
//! At accept time the kernel has already timed the handshake (SYN-ACK sent, ACK
//! received), so a freshly arrived peer's RTT is known without a ping round trip.
//! That matters for the synchronised go: the second peer of a pair is paired the
//! moment its hello arrives, and pinging it first would delay every punch by a few
//! of its RTTs.

use std::os::fd::AsRawFd;
use std::time::Duration;

/// The kernel's `TCP_INFO` for `socket`, if it can be read.
fn tcp_info(socket: &impl AsRawFd) -> Option<libc::tcp_info> {
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
    (rc == 0 && len > 0).then_some(info)
}

/// The smoothed RTT the kernel keeps for `socket`, if it has one.
pub fn kernel_rtt(socket: &impl AsRawFd) -> Option<Duration> {
    let info = tcp_info(socket)?;
    (info.tcpi_rtt != 0).then(|| Duration::from_micros(u64::from(info.tcpi_rtt)))
}

/// How many segments sent on `socket` the other end's TCP has not yet
/// acknowledged: nonzero while a loss is being repaired (or the path is
/// dead), zero once everything sent has arrived there.
pub fn unacked_segments(socket: &impl AsRawFd) -> Option<u32> {
    Some(tcp_info(socket)?.tcpi_unacked)
}

/// The kernel's TCP state of `socket` (`tcpi_state`: 1 established, 2
/// SYN_SENT, …), if it can be read.
pub fn tcp_state(socket: &impl AsRawFd) -> Option<u8> {
    Some(tcp_info(socket)?.tcpi_state)
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
        assert_eq!(tcp_state(&client), Some(1), "established");
        // What was sent and has arrived is acknowledged.
        std::io::Write::write_all(&mut &client, b"hello").expect("write");
        let mut got = [0u8; 5];
        std::io::Read::read_exact(&mut &server, &mut got).expect("read");
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(unacked_segments(&client), Some(0));
    }
}
