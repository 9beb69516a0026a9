//! [`TcpProxy`]: a TCP forwarder that a test cuts and restores to fake a database outage for
//! one client while the database itself keeps running for everyone else.
//!
//! Plain threads and blocking sockets, so it works the same from sync and async tests and needs
//! no runtime: one thread accepts, and each forwarded connection has two threads, one per
//! direction. Every forwarded connection's sockets are also kept in a shared table, so that
//! [`TcpProxy::cut`] can shut them down from the caller's thread: when `cut` returns, every
//! client has been sent its end of stream, whatever the forwarding threads are doing.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long a forwarded connection waits for the upstream server to accept it.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long `drop` waits to connect to its own listener to wake the accepting thread.
const WAKE_TIMEOUT: Duration = Duration::from_secs(1);

/// Forwards TCP connections from `127.0.0.1:<some port>` to an upstream server, and cuts them
/// on demand: a database outage for exactly the clients that connect through it.
///
/// Point one client (a pool, a driver process) at [`local_addr`](Self::local_addr) instead of the
/// server; [`cut`](Self::cut) closes its connections and refuses new ones, as a database that
/// went away would; [`restore`](Self::restore) lets connections through again. Dropping the proxy
/// closes every connection and stops its threads before `drop` returns.
///
/// ```no_run
/// use wrapped_keystore::testing::{PgTestDatabase, TcpProxy};
/// use wrapped_keystore::{DieselKeyStore, PoolOptions};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let db = PgTestDatabase::create()?;
/// let proxy = TcpProxy::start(db.server_addr()?)?;
/// let store = DieselKeyStore::connect_and_migrate(
///     &db.database_url_via(proxy.local_addr()),
///     PoolOptions::default(),
/// )?;
/// proxy.cut(); // `store` now fails with errors that are `is_unavailable()` …
/// proxy.restore(); // … and works again by itself.
/// # Ok(())
/// # }
/// ```
pub struct TcpProxy {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

/// What the proxy's threads and its handle share.
struct Shared {
    upstream: SocketAddr,
    accepted: AtomicU64,
    state: Mutex<State>,
}

struct State {
    cut: bool,
    stopping: bool,
    next_id: u64,
    /// Each open forwarded connection's client and upstream sockets (clones of the ones its
    /// threads use), by connection id.
    open: HashMap<u64, [TcpStream; 2]>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // Every update of the state is a single field or map operation, so a state whose lock
        // was poisoned by a panicking thread is still consistent.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl State {
    /// Shuts down both sockets of every forwarded connection: each client and the upstream
    /// server read end of stream at once, and the forwarding threads finish.
    fn close_all(&mut self) {
        for sockets in self.open.values() {
            for socket in sockets {
                // Already closed by its peer is fine.
                let _ = socket.shutdown(Shutdown::Both);
            }
        }
    }
}

impl TcpProxy {
    /// Listens on `127.0.0.1:0` and forwards every connection to `upstream`. Runs on its own
    /// threads, so it works from sync and async tests alike; dropping it stops it and closes
    /// everything.
    ///
    /// A connection is accepted before `upstream` is tried: if the upstream server refuses,
    /// the client sees its connection closed.
    ///
    /// # Errors
    /// The listener's error if it cannot be bound or its thread cannot be started.
    pub fn start(upstream: SocketAddr) -> io::Result<TcpProxy> {
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))?;
        let local_addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream,
            accepted: AtomicU64::new(0),
            state: Mutex::new(State {
                cut: false,
                stopping: false,
                next_id: 0,
                open: HashMap::new(),
            }),
        });
        let acceptor = std::thread::Builder::new()
            .name(format!("tcp-proxy-{}", local_addr.port()))
            .spawn({
                let shared = shared.clone();
                move || accept_loop(&listener, &shared)
            })?;
        Ok(TcpProxy {
            local_addr,
            shared,
            acceptor: Some(acceptor),
        })
    }

    /// The address clients connect to instead of the upstream server.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The upstream server's address.
    pub fn upstream(&self) -> SocketAddr {
        self.shared.upstream
    }

    /// Closes every forwarded connection now and refuses new ones (accepts, then closes at once)
    /// until [`restore`](Self::restore). When it returns, every client has been sent the end of
    /// its connection. Cutting a cut proxy changes nothing.
    pub fn cut(&self) {
        let mut state = self.shared.state();
        state.cut = true;
        state.close_all();
    }

    /// Forwards new connections again. Connections closed by [`cut`](Self::cut) stay closed;
    /// clients reconnect.
    pub fn restore(&self) {
        self.shared.state().cut = false;
    }

    /// Whether the proxy is [cut](Self::cut).
    pub fn is_cut(&self) -> bool {
        self.shared.state().cut
    }

    /// How many connections the proxy has accepted since it started, whether it forwarded
    /// them or (while cut) closed them at once.
    pub fn connections_accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }
}

impl fmt::Debug for TcpProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.shared.state();
        f.debug_struct("TcpProxy")
            .field("local_addr", &self.local_addr)
            .field("upstream", &self.shared.upstream)
            .field("cut", &state.cut)
            .field("open_connections", &state.open.len())
            .field("connections_accepted", &self.connections_accepted())
            .finish()
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        {
            let mut state = self.shared.state();
            state.stopping = true;
            state.close_all();
        }
        // The accepting thread is blocked in `accept`: wake it with a connection of our own, and
        // it sees `stopping`, joins the forwarding threads (whose sockets are shut down) and ends.
        let woken = TcpStream::connect_timeout(&self.local_addr, WAKE_TIMEOUT).is_ok();
        if let Some(acceptor) = self.acceptor.take() {
            if woken {
                let _ = acceptor.join();
            } else {
                // Joining would wait for a connection that may never come. The thread still
                // ends at its next accept, and it forwards nothing more: every socket is shut
                // down and new connections are closed as soon as they arrive.
                tracing::warn!(
                    proxy = %self.local_addr,
                    "could not wake the TCP proxy's accepting thread; leaving it to end by itself"
                );
            }
        }
    }
}

/// Accepts connections until the proxy is dropped, then waits for the forwarding threads.
fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    let mut forwarders: Vec<JoinHandle<()>> = Vec::new();
    loop {
        let client = match listener.accept() {
            Ok((client, _)) => client,
            Err(error) => {
                if shared.state().stopping {
                    break;
                }
                // Out of file descriptors, or the client gave up before we accepted: not the
                // test's business. Pause so that a persistent error does not spin the CPU.
                tracing::debug!(
                    error = &error as &dyn std::error::Error,
                    "TCP proxy accept failed"
                );
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        {
            let state = shared.state();
            if state.stopping {
                break;
            }
            shared.accepted.fetch_add(1, Ordering::SeqCst);
            if state.cut {
                // Refused: dropping the socket closes it.
                continue;
            }
        }
        forwarders.retain(|forwarder| !forwarder.is_finished());
        let spawned = std::thread::Builder::new()
            .name("tcp-proxy-forward".to_owned())
            .spawn({
                let shared = shared.clone();
                move || forward(client, &shared)
            });
        match spawned {
            Ok(forwarder) => forwarders.push(forwarder),
            Err(error) => {
                tracing::warn!(
                    error = &error as &dyn std::error::Error,
                    "TCP proxy could not start a forwarding thread; connection closed"
                );
            }
        }
    }
    for forwarder in forwarders {
        let _ = forwarder.join();
    }
}

/// Connects `client` to the upstream server and copies bytes both ways until either side closes
/// or the proxy is cut. Any failure closes the client's connection (by dropping it).
fn forward(client: TcpStream, shared: &Shared) {
    let Ok(upstream) = TcpStream::connect_timeout(&shared.upstream, UPSTREAM_CONNECT_TIMEOUT)
    else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let Ok(sockets) = clones(&client, &upstream) else {
        return;
    };
    let Ok(reverse) = clones(&upstream, &client) else {
        return;
    };
    let id = {
        let mut state = shared.state();
        // Checked under the lock `cut` takes: a connection is either registered before a cut
        // (and closed by it) or refused after it.
        if state.cut || state.stopping {
            return;
        }
        let id = state.next_id;
        state.next_id += 1;
        state.open.insert(id, sockets);
        id
    };
    let [from_upstream, to_client] = reverse;
    let back = std::thread::Builder::new()
        .name("tcp-proxy-back".to_owned())
        .spawn(move || pipe(from_upstream, to_client));
    pipe(client, upstream);
    if let Ok(back) = back {
        let _ = back.join();
    }
    shared.state().open.remove(&id);
}

/// Clones of `a` and `b`, in that order.
fn clones(a: &TcpStream, b: &TcpStream) -> io::Result<[TcpStream; 2]> {
    Ok([a.try_clone()?, b.try_clone()?])
}

/// Copies `from` to `to` until either ends, then shuts both down so the other direction's
/// thread ends too.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let _ = io::copy(&mut from, &mut to);
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use std::io::{ErrorKind, Read, Write};

    use super::*;

    /// Upper bound for every read: a broken proxy fails the test instead of hanging it.
    const READ_TIMEOUT: Duration = Duration::from_secs(10);

    /// An echo server on its own thread (left running: the test process ends it).
    fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).expect("bind echo");
        let addr = listener.local_addr().expect("echo address");
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                std::thread::spawn(move || {
                    let mut reader = stream.try_clone().expect("clone echo socket");
                    let _ = io::copy(&mut reader, &mut stream);
                });
            }
        });
        addr
    }

    fn connect(proxy: &TcpProxy) -> TcpStream {
        let stream = TcpStream::connect(proxy.local_addr()).expect("connect to the proxy");
        stream
            .set_read_timeout(Some(READ_TIMEOUT))
            .expect("read timeout");
        stream
    }

    /// Sends `message` and reads the echo.
    fn round_trip(stream: &mut TcpStream, message: &[u8]) -> io::Result<Vec<u8>> {
        stream.write_all(message)?;
        let mut echoed = vec![0; message.len()];
        stream.read_exact(&mut echoed)?;
        Ok(echoed)
    }

    /// Whether the peer has closed `stream`: a read ends the stream or fails with a reset (not a
    /// timeout, which would mean the connection is still open).
    fn is_closed(stream: &mut TcpStream) -> bool {
        let mut byte = [0];
        match stream.read(&mut byte) {
            Ok(0) => true,
            Ok(_) => false,
            Err(error) => !matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        }
    }

    #[test]
    fn forwards_until_cut_refuses_while_cut_and_forwards_after_restore() {
        let proxy = TcpProxy::start(echo_server()).expect("start the proxy");
        assert!(!proxy.is_cut(), "a new proxy forwards");
        let mut first = connect(&proxy);
        let mut second = connect(&proxy);
        assert_eq!(
            round_trip(&mut first, b"hello").expect("echo through the proxy"),
            b"hello"
        );
        assert_eq!(
            round_trip(&mut second, b"again").expect("echo on a second connection"),
            b"again"
        );
        assert_eq!(proxy.connections_accepted(), 2, "two connections accepted");

        proxy.cut();
        assert!(proxy.is_cut(), "cut");
        assert!(
            is_closed(&mut first),
            "cut closes the first open connection"
        );
        assert!(
            is_closed(&mut second),
            "cut closes the second open connection"
        );

        let mut refused = connect(&proxy);
        assert!(
            is_closed(&mut refused),
            "a connection made while cut is closed at once"
        );
        assert_eq!(
            proxy.connections_accepted(),
            3,
            "a refused connection is still accepted"
        );

        proxy.restore();
        assert!(!proxy.is_cut(), "restored");
        let mut after = connect(&proxy);
        assert_eq!(
            round_trip(&mut after, b"back").expect("echo after restore"),
            b"back",
            "a new connection is forwarded after restore"
        );
        assert_eq!(proxy.connections_accepted(), 4);
    }

    #[test]
    fn dropping_the_proxy_closes_its_connections_and_its_port() {
        let proxy = TcpProxy::start(echo_server()).expect("start the proxy");
        let addr = proxy.local_addr();
        let mut open = connect(&proxy);
        assert_eq!(round_trip(&mut open, b"x").expect("echo"), b"x");
        drop(proxy);
        assert!(
            is_closed(&mut open),
            "dropping the proxy closes its connections"
        );
        assert!(
            TcpStream::connect(addr).is_err(),
            "nothing listens on the proxy's port after drop"
        );
    }

    #[test]
    fn an_unreachable_upstream_closes_the_client() {
        // Port 1 on the loopback interface refuses connections at once.
        let proxy =
            TcpProxy::start(SocketAddr::from(([127, 0, 0, 1], 1))).expect("start the proxy");
        let mut client = connect(&proxy);
        assert!(
            is_closed(&mut client),
            "a client whose upstream refuses is closed"
        );
    }
}
