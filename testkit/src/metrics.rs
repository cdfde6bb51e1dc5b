//! The rendezvous' metrics endpoint, seen from outside: one scrape, and one
//! value out of it.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// One HTTP/1.1 GET of `path` at `addr`: the whole answer, head and body, as
/// the server sends it before closing; an error if that takes over `within`.
pub async fn http_get(addr: SocketAddr, path: &str, within: Duration) -> io::Result<String> {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
        s.write_all(request.as_bytes()).await?;
        let mut answer = String::new();
        s.read_to_string(&mut answer).await?;
        Ok(answer)
    };
    timeout(within, exchange).await.unwrap_or_else(|_| {
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer from {addr} within {within:?}"),
        ))
    })
}

/// The value of one sample line (`name{labels} value`) of an exposition.
pub fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}
