//! Starting and stopping the simulator: both listeners, their connections, graceful shutdown.
//!
//! Each accepted connection is a task on a [`TaskTracker`]; shutdown cancels a token, which
//! stops the accept loops, ends waiting long-polls (they answer with no jobs), and asks every
//! connection to finish its in-flight request and close; then it waits for all of them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app_api::DriverView;
use crate::error::SimError;
use crate::state::{SimState, SimStats, Timings};
use crate::tls::{ServerTlsFiles, load_server_tls, subject_common_name};
use crate::{app_api, driver_api};

/// How long a client may take to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The simulator's configuration.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The driver listener (HTTPS, mutual TLS); port 0 picks a free port.
    pub driver_listen: SocketAddr,
    /// The application listener (plain HTTP; keep it on loopback); port 0 picks a free port.
    pub app_listen: SocketAddr,
    /// The driver listener's certificate, key and client CA.
    pub tls: ServerTlsFiles,
    /// How long a lease lasts before the job is delivered again.
    pub lease_duration: Duration,
    /// Retryable failures after which a job fails for good.
    pub max_attempts: u32,
    /// Longest long-poll the server grants, whatever the driver asks.
    pub max_long_poll: Duration,
    /// How often registered drivers are asked to heartbeat (at least 1 ms).
    pub heartbeat_interval: Duration,
    /// How long after its last sign of life a driver is forgotten (at least
    /// `heartbeat_interval`).
    pub liveness_timeout: Duration,
}

impl SimConfig {
    /// Both listeners on `127.0.0.1` with free ports, and the default timings: 30 s leases,
    /// 5 attempts, 30 s long-polls, heartbeats every 1 s, drivers forgotten after 5 s.
    pub fn local(tls: ServerTlsFiles) -> Self {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        Self {
            driver_listen: loopback,
            app_listen: loopback,
            tls,
            lease_duration: Duration::from_secs(30),
            max_attempts: 5,
            max_long_poll: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(1),
            liveness_timeout: Duration::from_secs(5),
        }
    }
}

/// A running simulator. Dropping it stops the listeners without waiting;
/// [`RunningSimulator::shutdown`] stops them gracefully.
pub struct RunningSimulator {
    driver_addr: SocketAddr,
    app_addr: SocketAddr,
    state: Arc<SimState>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl std::fmt::Debug for RunningSimulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningSimulator")
            .field("driver_addr", &self.driver_addr)
            .field("app_addr", &self.app_addr)
            .finish_non_exhaustive()
    }
}

/// Binds both listeners and starts serving.
///
/// # Errors
/// [`SimError::Config`] for a heartbeat interval under 1 ms or a liveness timeout shorter
/// than it; [`SimError::Tls`] and friends for unusable TLS files; [`SimError::Io`] if an
/// address cannot be bound.
pub async fn start(config: SimConfig) -> Result<RunningSimulator, SimError> {
    if config.heartbeat_interval < Duration::from_millis(1) {
        return Err(SimError::Config {
            reason: format!(
                "the heartbeat interval must be at least 1 ms, not {:?}",
                config.heartbeat_interval
            ),
        });
    }
    if config.liveness_timeout < config.heartbeat_interval {
        return Err(SimError::Config {
            reason: format!(
                "the liveness timeout ({:?}) is shorter than the heartbeat interval ({:?}): drivers would lapse between heartbeats",
                config.liveness_timeout, config.heartbeat_interval
            ),
        });
    }
    let tls = load_server_tls(&config.tls)?;
    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| SimError::Io {
                context: format!("binding {addr}"),
                source,
            })
    };
    let driver_listener = bind(config.driver_listen).await?;
    let app_listener = bind(config.app_listen).await?;
    let local = |listener: &TcpListener| {
        listener.local_addr().map_err(|source| SimError::Io {
            context: "reading a bound address".to_owned(),
            source,
        })
    };
    let driver_addr = local(&driver_listener)?;
    let app_addr = local(&app_listener)?;

    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    let state = SimState::new(
        Timings {
            lease_duration: config.lease_duration,
            max_attempts: config.max_attempts,
            max_long_poll: config.max_long_poll,
            heartbeat_interval: config.heartbeat_interval,
            liveness_timeout: config.liveness_timeout,
        },
        shutdown.clone(),
    );
    tasks.spawn(accept_driver(
        driver_listener,
        TlsAcceptor::from(tls),
        state.clone(),
        shutdown.clone(),
        tasks.clone(),
    ));
    tasks.spawn(accept_app(
        app_listener,
        state.clone(),
        shutdown.clone(),
        tasks.clone(),
    ));
    tracing::info!(
        %driver_addr,
        %app_addr,
        lease = ?config.lease_duration,
        heartbeat = ?config.heartbeat_interval,
        liveness = ?config.liveness_timeout,
        "simulator listening"
    );
    Ok(RunningSimulator {
        driver_addr,
        app_addr,
        state,
        shutdown,
        tasks,
    })
}

impl RunningSimulator {
    /// The driver listener's bound address.
    pub fn driver_addr(&self) -> SocketAddr {
        self.driver_addr
    }

    /// The application listener's bound address.
    pub fn app_addr(&self) -> SocketAddr {
        self.app_addr
    }

    /// `https://127.0.0.1:port` (or the bound IP) of the driver listener.
    pub fn driver_url(&self) -> String {
        format!("https://{}", self.driver_addr)
    }

    /// The queue's counters.
    pub fn stats(&self) -> SimStats {
        self.state.stats()
    }

    /// Every driver that ever registered, by id (as `GET /app/v1/drivers` shows them).
    pub fn drivers(&self) -> Vec<DriverView> {
        self.state.drivers()
    }

    /// The audit ledger checkpoints kept from drivers' heartbeats: per chain, the head with the
    /// highest seq received (also served to drivers at `GET /driver/v1/ledger/checkpoints`).
    pub fn ledger_checkpoints(&self) -> Vec<dfns_api_client::protocol::LedgerCheckpoint> {
        self.state.ledger_checkpoints()
    }

    /// The number of lease requests currently waiting for a job, as a watch: tests await
    /// `wait_for(|n| *n > 0)` to know a driver is long-polling, instead of sleeping.
    pub fn long_polls_waiting(&self) -> watch::Receiver<usize> {
        self.state.waiting_long_polls()
    }

    /// The number of application requests currently waiting for a key or signature to settle
    /// (`GET …?waitMs=N`), as a watch: tests await `wait_for(|n| *n > 0)` to know a wait is
    /// outstanding.
    pub fn result_polls_waiting(&self) -> watch::Receiver<usize> {
        self.state.waiting_result_polls()
    }

    /// Stops accepting connections, answers waiting long-polls with no jobs, lets in-flight
    /// requests finish, and returns when every connection has closed.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        tracing::info!("simulator stopped");
    }
}

impl Drop for RunningSimulator {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn accept_driver(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    state: Arc<SimState>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    while let Some((stream, peer)) = accept(&listener, &shutdown).await {
        let acceptor = acceptor.clone();
        let state = state.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            let tls = tokio::select! {
                handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)) => match handshake {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::info!(%peer, error = %e, "TLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        tracing::info!(%peer, "TLS handshake timed out");
                        return;
                    }
                },
                () = shutdown.cancelled() => return,
            };
            let subject: Option<Arc<str>> = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(subject_common_name)
                .map(Arc::from);
            tracing::debug!(%peer, client = ?subject, "driver connected");
            let service = service_fn(move |request: Request<Incoming>| {
                driver_api::handle(state.clone(), subject.clone(), request)
            });
            serve(TokioIo::new(tls), service, &shutdown, peer).await;
        });
    }
}

async fn accept_app(
    listener: TcpListener,
    state: Arc<SimState>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    while let Some((stream, peer)) = accept(&listener, &shutdown).await {
        let state = state.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                app_api::handle(state.clone(), request)
            });
            serve(TokioIo::new(stream), service, &shutdown, peer).await;
        });
    }
}

/// The next connection, or `None` once shutdown starts.
async fn accept(
    listener: &TcpListener,
    shutdown: &CancellationToken,
) -> Option<(tokio::net::TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return None,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    return Some((stream, peer));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// Serves one HTTP/1.1 connection (keep-alive) until it closes or shutdown asks it to finish.
async fn serve<I, S>(io: I, service: S, shutdown: &CancellationToken, peer: SocketAddr)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response<Full<Bytes>>,
            Error = std::convert::Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    let connection = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(io, service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}
