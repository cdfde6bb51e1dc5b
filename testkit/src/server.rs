//! The rendezvous under test: the same server code the `rendezvous` binary
//! runs, served by a thread of its own until the handle is dropped.
//!
//! 1. The listeners are bound in the caller's thread, so they belong to the
//!    caller's network namespace (a test may run inside one), and the
//!    addresses are known before the server starts.
//! 2. A thread with its own runtime serves both ports: synchronous tests (that
//!    drive `peer` processes) and async tests use it alike, and a test's
//!    runtime never has to run the server.
//! 3. Dropping the handle (or [`TestRendezvous::stop`]) shuts the server down as
//!    the binary does on a signal, and waits for it.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::thread;

use punchline_rendezvous::{run_on, run_probe, Config, ALTERNATE_PORT_OFFSET, PROBE_PORT_OFFSET};
use tokio::sync::oneshot;

/// Worker threads of the server's runtime: two, so a test flooding it with
/// connections still sees it answer.
const WORKER_THREADS: usize = 2;

/// Free ports tried for a main port whose probe port (the next one up) is free
/// too. A miss means another program took that one port between two binds;
/// many in a row mean something else is wrong.
const BIND_TRIES: usize = 100;

/// The rendezvous server, main port and probe port, served until dropped.
///
/// Dropping it shuts the server down and waits for it, which takes as long as
/// its connections need to say goodbye (a few seconds at most).
pub struct TestRendezvous {
    addr: SocketAddr,
    probe_addr: SocketAddr,
    alternate_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<io::Result<()>>>,
}

impl TestRendezvous {
    /// Serves with the default [`Config`] on 127.0.0.1.
    pub fn start() -> TestRendezvous {
        Self::with_config(Config::default())
    }

    /// Serves with `config` on 127.0.0.1.
    pub fn with_config(config: Config) -> TestRendezvous {
        Self::on(Ipv4Addr::LOCALHOST.into(), config)
    }

    /// Serves with `config` on a free port of `ip`, with the probe port
    /// [`PROBE_PORT_OFFSET`] and the alternate port [`ALTERNATE_PORT_OFFSET`]
    /// above it, where a `peer` looks for them.
    pub fn on(ip: IpAddr, config: Config) -> TestRendezvous {
        let (main, probe, alternate) = bind_ports(ip);
        let addr = main.local_addr().expect("address of the main port");
        let probe_addr = probe.local_addr().expect("address of the probe port");
        let alternate_addr = alternate
            .local_addr()
            .expect("address of the alternate port");
        let (stop, stopped) = oneshot::channel();
        let thread = thread::Builder::new()
            .name(format!("rendezvous {addr}"))
            .spawn(move || serve([main, alternate], probe, config, stopped))
            .expect("start the rendezvous thread");
        TestRendezvous {
            addr,
            probe_addr,
            alternate_addr,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Where peers reach it.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its probe port, which tells each connection the address it came from.
    pub fn probe_addr(&self) -> SocketAddr {
        self.probe_addr
    }

    /// Its alternate port, served like the main one.
    pub fn alternate_addr(&self) -> SocketAddr {
        self.alternate_addr
    }

    /// Shuts the server down (waiting peers are told) and waits for it to
    /// end; returns what the server returned. Blocks: from async code, call
    /// it on a blocking thread.
    pub fn stop(mut self) -> io::Result<()> {
        self.shut_down()
    }

    fn shut_down(&mut self) -> io::Result<()> {
        if let Some(stop) = self.stop.take() {
            // An error means the server has ended already.
            let _ = stop.send(());
        }
        match self.thread.take() {
            Some(thread) => thread
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the rendezvous thread panicked"))),
            None => Ok(()),
        }
    }
}

impl Drop for TestRendezvous {
    fn drop(&mut self) {
        // Not a panic: the test may be unwinding already.
        if let Err(e) = self.shut_down() {
            eprintln!("the rendezvous at {} failed: {e}", self.addr);
        }
    }
}

/// A free port of `ip` with its probe and alternate ports free above it.
fn bind_ports(ip: IpAddr) -> (TcpListener, TcpListener, TcpListener) {
    for _ in 0..BIND_TRIES {
        let main = TcpListener::bind((ip, 0)).expect("bind the rendezvous");
        let port = main.local_addr().expect("address").port();
        let beside = |offset| {
            port.checked_add(offset)
                .and_then(|p| TcpListener::bind((ip, p)).ok())
        };
        if let (Some(probe), Some(alternate)) =
            (beside(PROBE_PORT_OFFSET), beside(ALTERNATE_PORT_OFFSET))
        {
            return (main, probe, alternate);
        }
    }
    panic!(
        "no free port on {ip} with free probe and alternate ports next to it in {BIND_TRIES} tries"
    );
}

/// Runs the server on its ports (main and alternate, and the probe) until
/// `stopped`; the server's own result.
fn serve(
    main: [TcpListener; 2],
    probe: TcpListener,
    config: Config,
    stopped: oneshot::Receiver<()>,
) -> io::Result<()> {
    for listener in main.iter().chain([&probe]) {
        listener.set_nonblocking(true)?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKER_THREADS)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let main = main
            .into_iter()
            .map(tokio::net::TcpListener::from_std)
            .collect::<io::Result<Vec<_>>>()?;
        let probe = tokio::net::TcpListener::from_std(probe)?;
        let probe = tokio::spawn(run_probe(
            probe,
            config.metrics.clone(),
            config.probes.clone(),
            std::future::pending(),
        ));
        let served = run_on(main, config, async {
            let _ = stopped.await;
        })
        .await;
        probe.abort();
        served
    })
}
