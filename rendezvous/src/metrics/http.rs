//! The metrics endpoint: a minimal HTTP/1.x server that answers `GET /metrics`
//! with [`Metrics::render`], bounded in the scrapes it serves at once and in how
//! long each may take.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::timeout;
use tracing::{debug, warn};

use super::Metrics;

/// Most scrapes served at once. A Prometheus server scrapes one at a time; a
/// few more leave room for a curl by hand, and bound what idle clients can hold.
const MAX_SCRAPES: usize = 8;
/// Bound on receiving a request's head: a scraper sends it at once, so this only
/// bounds clients that connect and send nothing, or a byte now and then.
const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on reading a request and writing the answer, in all.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest request head read; the rest is ignored.
const MAX_REQUEST: usize = 4096;
/// Pause after a failed accept (out of file descriptors and the like) before
/// accepting again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// A scrape being served: its task, and whether it still waits for its
/// request's head (only those are evicted for a newcomer).
struct Scrape {
    task: AbortHandle,
    reading: Arc<AtomicBool>,
}

/// Serves `GET /metrics` on `listener` until `shutdown` completes. Anything else
/// gets 404. Meant for a loopback or private address: it has no authentication.
///
/// Idle or slow clients cannot block the scrapes: each has `HEADER_TIMEOUT`
/// to send its request, and when `MAX_SCRAPES` are being served a new
/// connection evicts the oldest one still waiting for its request (a scraper
/// sends its request as soon as it connects, so it is answered before it can
/// become the oldest of a full set). A new connection is closed unanswered only
/// when every slot is busy writing an answer, which takes moments.
pub async fn serve_metrics(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let mut tasks = JoinSet::new();
    // Oldest first.
    let mut scrapes: VecDeque<Scrape> = VecDeque::with_capacity(MAX_SCRAPES);
    tokio::pin!(shutdown);
    loop {
        let (stream, addr) = tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = tasks.join_next() => continue,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(listener = "metrics", error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        scrapes.retain(|s| !s.task.is_finished());
        if scrapes.len() >= MAX_SCRAPES {
            match scrapes
                .iter()
                .position(|s| s.reading.load(Ordering::Relaxed))
            {
                Some(oldest) => {
                    if let Some(evicted) = scrapes.remove(oldest) {
                        evicted.task.abort();
                        debug!(%addr, "metrics: evicted an idle request for a new one");
                    }
                }
                None => {
                    debug!(%addr, "metrics: all slots answering; connection closed");
                    continue;
                }
            }
        }
        let reading = Arc::new(AtomicBool::new(true));
        let metrics = metrics.clone();
        let flag = reading.clone();
        let task = tasks.spawn(async move {
            let served = timeout(SCRAPE_TIMEOUT, scrape(stream, &metrics, &flag)).await;
            if let Err(e) = served.unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into())) {
                debug!(%addr, error = %e, "metrics request failed");
            }
        });
        scrapes.push_back(Scrape { task, reading });
    }
    tasks.abort_all();
    Ok(())
}

/// Answers one HTTP/1.x request and closes the connection; `reading` is
/// cleared once the request's head is in.
async fn scrape(mut stream: TcpStream, metrics: &Metrics, reading: &AtomicBool) -> io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    let read_head = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        io::Result::Ok(())
    };
    timeout(HEADER_TIMEOUT, read_head)
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))?;
    reading.store(false, Ordering::Relaxed);
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (parts.next(), parts.next());
    let (status, kind, body) = match (method, path) {
        (Some(b"GET"), Some(b"/metrics")) => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.render(),
        ),
        _ => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "only GET /metrics is served here\n".to_owned(),
        ),
    };
    let answer = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(answer.as_bytes()).await?;
    stream.shutdown().await
}
