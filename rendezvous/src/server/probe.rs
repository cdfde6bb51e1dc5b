//! The probe port and the dial-back: the two ways a peer learns how its NAT
//! treats it. The probe port tells a connection the address it came from, for
//! comparison with what the main port saw; the dial-back (asked on the main
//! port, before the hello) opens a connection to the peer's own address and
//! reports what the SYN met.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::SinkExt;
use punchline_proto::ServerToPeer;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::{timeout, Instant};
use tracing::debug;

use super::accept::accept_until;
use super::connection::framed;
use super::{canonical, DIAL_BACK_TIMEOUT};
use crate::metrics::Metrics;

/// Most probe connections being answered at once; more are closed unanswered.
const MAX_PROBE_TASKS: usize = 1024;

/// Bound on answering one probe connection.
const PROBE_SEND_TIMEOUT: Duration = Duration::from_secs(2);

/// Serves the probe port until `shutdown` completes: every connection is told the
/// address it came from ([`ServerToPeer::Observed`]) and closed. A peer connects
/// here from its fixed port before its hello; comparing what this port and the
/// main port saw tells whether its NAT picks a new public port per destination.
pub async fn run_probe(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let mut tasks = JoinSet::new();
    accept_until(
        &listener,
        shutdown,
        &mut tasks,
        "probe",
        |stream, addr, serving| {
            // Past the cap the connection is dropped, which closes it.
            let metrics = metrics.clone();
            (serving < MAX_PROBE_TASKS).then_some(async move {
                let mut conn = framed(stream);
                let answer = async {
                    conn.send(ServerToPeer::Observed {
                        observed: canonical(addr),
                    })
                    .await?;
                    conn.close().await
                };
                match timeout(PROBE_SEND_TIMEOUT, answer).await.unwrap_or(Ok(())) {
                    Ok(()) => {
                        metrics.probes.inc();
                    }
                    Err(e) => debug!(%addr, error = %e, "probe answer failed"),
                }
            })
        },
    )
    .await;
    tasks.abort_all();
    Ok(())
}

/// Opens a TCP connection to `target` (the requesting connection's own address)
/// and reports what the SYN met; the connection, if any, is closed at once.
pub(super) async fn dial_back(target: SocketAddr) -> ServerToPeer {
    use punchline_proto::DialBackResult;
    let started = Instant::now();
    let result = match timeout(DIAL_BACK_TIMEOUT, TcpStream::connect(target)).await {
        Ok(Ok(_stream)) => DialBackResult::Connected,
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => DialBackResult::Refused,
        Ok(Err(e)) => {
            debug!(%target, error = %e, "dial-back failed");
            DialBackResult::Unknown
        }
        Err(_) => DialBackResult::NoAnswer,
    };
    let elapsed_ms = started.elapsed().as_millis().try_into().unwrap_or(u32::MAX);
    debug!(%target, ?result, elapsed_ms, "dial-back");
    ServerToPeer::DialedBack {
        target,
        result,
        elapsed_ms,
    }
}
