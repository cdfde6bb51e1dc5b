//! How connections come in: the default listening socket, the accept loop that
//! the main port and the probe port share, and the sweep that expires waiting
//! peers nobody joined (and lets the per-source rates forget old sources).

use std::future::Future;
use std::io;
use std::net::{Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::{sleep, Instant};
use tracing::{debug, warn};

use super::{Event, Shared};

/// How often the pairing table is swept for expired rooms.
const SWEEP_INTERVAL: Duration = Duration::from_millis(500);

/// Binds the default listening socket on `port`: IPv6 and IPv4 on all interfaces
/// (one dual-stack socket), or IPv4 only where IPv6 is unavailable.
pub fn bind_default(port: u16) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let dual = || -> io::Result<std::net::TcpListener> {
        let s = Socket::new(Domain::IPV6, Type::STREAM, None)?;
        s.set_only_v6(false)?;
        s.set_reuse_address(true)?;
        s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
        s.listen(1024)?;
        Ok(s.into())
    };
    dual().or_else(|e| {
        debug!(error = %e, "no dual-stack socket; listening on IPv4 only");
        let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        s.set_reuse_address(true)?;
        s.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
        s.listen(1024)?;
        Ok(s.into())
    })
}

/// Pause after a failed accept (out of file descriptors and the like) before
/// accepting again: the condition is usually passing, and spinning would not help.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Accepts connections on `listeners` (all serving the same thing) until
/// `shutdown` completes. `handle` gets each connection and the number already
/// being served, and returns the task that serves it (or `None` to drop it);
/// finished tasks are reaped as it goes.
pub(super) async fn accept_until<F, Fut>(
    listeners: &[TcpListener],
    shutdown: impl Future<Output = ()>,
    tasks: &mut JoinSet<()>,
    name: &'static str,
    mut handle: F,
) where
    F: FnMut(TcpStream, SocketAddr, usize) -> Option<Fut>,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::pin!(shutdown);
    // Listeners are polled from a rotating start, so that a busy one never
    // starves the others.
    let mut start = 0;
    loop {
        start = (start + 1) % listeners.len().max(1);
        let accepted = std::future::poll_fn(|cx| {
            for i in 0..listeners.len() {
                if let Poll::Ready(r) = listeners[(start + i) % listeners.len()].poll_accept(cx) {
                    return Poll::Ready(r);
                }
            }
            Poll::Pending
        });
        tokio::select! {
            _ = &mut shutdown => return,
            Some(_) = tasks.join_next() => {}
            accepted = accepted => match accepted {
                Ok((stream, addr)) => {
                    if let Some(task) = handle(stream, addr, tasks.len()) {
                        tasks.spawn(task);
                    }
                }
                Err(e) => {
                    warn!(listener = name, error = %e, "accept failed");
                    sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
        }
    }
}

/// Expires waiting peers nobody joined.
pub(super) async fn sweep(shared: Arc<Shared>) {
    loop {
        sleep(SWEEP_INTERVAL).await;
        let now = Instant::now().into_std();
        {
            let mut limits = shared.limits();
            limits.connects.forget_full(now);
            limits.codes.forget_full(now);
        }
        let expired = {
            let mut rooms = shared.rooms();
            let expired = rooms.expire(now);
            let metrics = &shared.config.metrics;
            metrics.waiting.set(gauge(rooms.waiting()));
            metrics.rooms.set(gauge(rooms.len()));
            metrics.expired.inc_by(expired.len() as u64);
            expired
        };
        for (id, waiting) in expired {
            debug!(id, "wait expired");
            let _ = waiting.events.send(Event::Expired);
        }
    }
}

fn gauge(n: usize) -> i64 {
    n.try_into().unwrap_or(i64::MAX)
}
