//! The telemetry endpoint (`[telemetry] listen`): plain HTTP on an operator-chosen address,
//! serving `GET /healthz` (the process is alive: `ok`), `GET /readyz` (200 when the driver
//! leases work: HSM, database and API usable and registered; 503 otherwise, with one line per
//! component saying why) and `GET /metrics` (Prometheus text), 404 for anything else.
//!
//! ```text
//! driver-core ── instruments ──▶ Meter ◀── SdkMeterProvider ── reader: Prometheus exporter
//!                                                                    │ (pull, on each scrape)
//!           GET /metrics ──▶ prometheus::Registry::gather() ──▶ text ◀┘
//! ```
//!
//! The provider is built here and handed to the engine as a `Meter`; nothing is global. Labels
//! stay low-cardinality (kind, outcome, driver id, version): never key ids, job ids or
//! secrets. The server has no TLS and no authentication: bind it to a loopback or management
//! address.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;

use anyhow::Context;
use bytes::Bytes;
use driver_core::{Component, ComponentState, Health, HealthReport};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Gauge, Meter, MeterProvider as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use prometheus::{Encoder as _, TextEncoder};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

/// Content type of the Prometheus text exposition format.
const PROMETHEUS_TEXT: &str = prometheus::TEXT_FORMAT;

/// The meter provider, its Prometheus registry and the process-level gauges.
pub(crate) struct Telemetry {
    provider: SdkMeterProvider,
    registry: prometheus::Registry,
    // Held for the life of the process: the gauges were recorded once, at start-up.
    _info: Gauge<u64>,
    _up: Gauge<u64>,
}

impl Telemetry {
    /// Builds the provider with the Prometheus exporter as its reader and records
    /// `hsm_driver_info{version, driver_id} = 1` and `hsm_driver_up = 1`. The registry also
    /// holds Prometheus's standard process metrics on Linux (`process_resident_memory_bytes`,
    /// `process_cpu_seconds_total`, `process_open_fds`, `process_threads`…), read from
    /// `/proc/self` at each scrape: the driver's memory includes what a PKCS#11 library in its
    /// process keeps (`docs/operations.md`, Sizing), which an alert watches.
    ///
    /// # Errors
    /// If the exporter cannot be built or the process metrics cannot be registered.
    pub(crate) fn new(driver_id: &str) -> anyhow::Result<Self> {
        let registry = prometheus::Registry::new();
        // Prometheus's process collector reads procfs: Linux only.
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .context("registering the process metrics")?;
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .build()
            .context("building the Prometheus exporter")?;
        let provider = SdkMeterProvider::builder()
            .with_resource(Resource::builder().with_service_name("hsm-driver").build())
            .with_reader(exporter)
            .build();
        let meter = provider.meter("hsm-driver");
        let info = meter
            .u64_gauge("hsm_driver_info")
            .with_description("Always 1; labels name this driver and its version")
            .build();
        info.record(
            1,
            &[
                KeyValue::new("version", env!("CARGO_PKG_VERSION")),
                KeyValue::new("driver_id", driver_id.to_owned()),
            ],
        );
        let up = meter
            .u64_gauge("hsm_driver_up")
            .with_description("1 while the driver process runs")
            .build();
        up.record(1, &[]);
        Ok(Self {
            provider,
            registry,
            _info: info,
            _up: up,
        })
    }

    /// Exports the HSM's hot-key counters as `hsm_driver_hot_key_{hits,misses,evictions}_total`,
    /// read at each scrape.
    pub(crate) fn observe_hot_keys(
        &self,
        read: Box<dyn Fn() -> hsm_pkcs11::HotKeyStats + Send + Sync>,
    ) {
        let read: std::sync::Arc<dyn Fn() -> hsm_pkcs11::HotKeyStats + Send + Sync> =
            std::sync::Arc::from(read);
        let meter = self.provider.meter("hsm-driver");
        for (name, description, pick) in [
            (
                "hsm_driver_hot_key_hits",
                "Signatures made with a key already unwrapped (hot-key path)",
                (|s: &hsm_pkcs11::HotKeyStats| s.hits) as fn(&hsm_pkcs11::HotKeyStats) -> u64,
            ),
            (
                "hsm_driver_hot_key_misses",
                "Signatures that unwrapped their key and kept it (hot-key path)",
                |s: &hsm_pkcs11::HotKeyStats| s.misses,
            ),
            (
                "hsm_driver_hot_key_evictions",
                "Hot keys destroyed: expired, evicted when full, after errors, on shutdown",
                |s: &hsm_pkcs11::HotKeyStats| s.evictions,
            ),
        ] {
            let read = std::sync::Arc::clone(&read);
            meter
                .u64_observable_counter(name)
                .with_description(description)
                .with_callback(move |observer| observer.observe(pick(&read()), &[]))
                .build();
        }
    }

    /// Exports a counter read at each scrape, as `<name>_total`: the HSM's and the store's own
    /// counts (`hsm_driver_hsm_requests`, `hsm_driver_store_statements`).
    pub(crate) fn observe_counter(
        &self,
        name: &'static str,
        description: &'static str,
        read: impl Fn() -> u64 + Send + Sync + 'static,
    ) {
        self.provider
            .meter("hsm-driver")
            .u64_observable_counter(name)
            .with_description(description)
            .with_callback(move |observer| observer.observe(read(), &[]))
            .build();
    }

    /// The meter to hand to the engine (`Driver::builder().meter(…)`).
    pub(crate) fn meter(&self) -> Meter {
        self.provider.meter("hsm-driver")
    }

    /// Every metric, in Prometheus text format.
    ///
    /// # Errors
    /// If the encoder fails (it does not, for the families the exporter produces).
    pub(crate) fn render(&self) -> anyhow::Result<Vec<u8>> {
        let mut text = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut text)
            .context("encoding metrics")?;
        Ok(text)
    }

    /// Answers one request: the whole HTTP surface, without a socket. `/readyz` answers 503
    /// until the engine's health is known.
    pub(crate) fn respond<B>(
        &self,
        health: Option<&Health>,
        request: &Request<B>,
    ) -> Response<Full<Bytes>> {
        match (request.method(), request.uri().path()) {
            (&Method::GET, "/healthz") => reply(StatusCode::OK, "text/plain", "ok\n".into()),
            (&Method::GET, "/readyz") => match health {
                Some(health) => readiness(&health.report()),
                None => reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "not ready\nstarting\n".into(),
                ),
            },
            (&Method::GET, "/metrics") => match self.render() {
                Ok(text) => reply(StatusCode::OK, PROMETHEUS_TEXT, text.into()),
                Err(e) => {
                    warn!(error = format!("{e:#}"), "cannot render metrics");
                    reply(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "text/plain",
                        "cannot render metrics\n".into(),
                    )
                }
            },
            _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        }
    }

    /// Binds `addr` (port 0 picks a free port) and logs
    /// `telemetry endpoint listening addr=…` with the bound address.
    ///
    /// # Errors
    /// If the address cannot be bound.
    pub(crate) async fn bind(self, addr: SocketAddr) -> anyhow::Result<Endpoint> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("telemetry.listen: cannot bind {addr}"))?;
        let local = listener
            .local_addr()
            .context("telemetry.listen: bound address")?;
        info!(addr = %local, "telemetry endpoint listening");
        Ok(Endpoint {
            telemetry: std::sync::Arc::new(self),
            health: None,
            listener,
            limits: ConnectionLimits::default(),
        })
    }

    /// Flushes nothing (pull only) but stops the provider's reader cleanly.
    fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            debug!(error = %e, "meter provider shutdown");
        }
    }
}

/// `/readyz`: `ready` or `not ready`, then one line per component and the time since the last
/// successful poll, so an operator sees at a glance which dependency is at fault.
fn readiness(report: &HealthReport) -> Response<Full<Bytes>> {
    use std::fmt::Write as _;
    let ready = report.is_ready();
    let mut text = String::from(if ready { "ready\n" } else { "not ready\n" });
    for component in Component::ALL {
        match report.component(component) {
            ComponentState::Up => {
                let _ = writeln!(text, "{component}: up");
            }
            ComponentState::Down { reason, since } => {
                let _ = writeln!(
                    text,
                    "{component}: down for {:.1}s: {reason}",
                    since.elapsed().as_secs_f64()
                );
            }
        }
    }
    let _ = writeln!(
        text,
        "registered: {}",
        if report.registered { "yes" } else { "no" }
    );
    if report.draining {
        text.push_str("draining: shutting down\n");
    }
    match report.since_last_successful_poll() {
        Some(elapsed) => {
            let _ = writeln!(
                text,
                "last successful poll: {:.1}s ago",
                elapsed.as_secs_f64()
            );
        }
        None => text.push_str("last successful poll: never\n"),
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    reply(status, "text/plain", text.into())
}

fn reply(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// What one client may hold of the endpoint: it answers scrapes and probes, so nothing a
/// client does (many idle connections, headers sent a byte a minute) may tie it up.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnectionLimits {
    /// Connections served at once; one more is closed at once.
    pub(crate) max_connections: usize,
    /// How long a request's headers may take to arrive.
    pub(crate) header_timeout: std::time::Duration,
    /// How long one connection may stay open, keep-alive included.
    pub(crate) max_lifetime: std::time::Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: 64,
            header_timeout: std::time::Duration::from_secs(5),
            max_lifetime: std::time::Duration::from_secs(60),
        }
    }
}

/// A bound telemetry endpoint, not yet serving.
pub(crate) struct Endpoint {
    telemetry: std::sync::Arc<Telemetry>,
    health: Option<Health>,
    listener: TcpListener,
    limits: ConnectionLimits,
}

impl Endpoint {
    /// Answers `/readyz` from the engine's health.
    pub(crate) fn with_health(mut self, health: Health) -> Self {
        self.health = Some(health);
        self
    }

    /// The bound address.
    #[cfg(test)]
    pub(crate) fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Other connection limits than the defaults (tests).
    #[cfg(test)]
    pub(crate) fn with_limits(mut self, limits: ConnectionLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Serves connections until `stop` completes, then drops the ones still open.
    pub(crate) async fn serve(self, stop: impl Future<Output = ()>) {
        let mut connections = JoinSet::new();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) if connections.len() >= self.limits.max_connections => {
                        debug!(%peer, "telemetry endpoint: too many connections, closing this one");
                        drop(stream);
                    }
                    Ok((stream, peer)) => {
                        let telemetry = self.telemetry.clone();
                        let health = self.health.clone();
                        let limits = self.limits;
                        connections.spawn(async move {
                            let service = service_fn(move |request: Request<Incoming>| {
                                let response = telemetry.respond(health.as_ref(), &request);
                                async move { Ok::<_, Infallible>(response) }
                            });
                            let connection = hyper::server::conn::http1::Builder::new()
                                .timer(hyper_util::rt::TokioTimer::new())
                                .header_read_timeout(limits.header_timeout)
                                .serve_connection(TokioIo::new(stream), service);
                            match tokio::time::timeout(limits.max_lifetime, connection).await {
                                Ok(Err(e)) => debug!(%peer, error = %e, "telemetry connection"),
                                Err(_) => debug!(%peer, "telemetry connection: lifetime reached"),
                                Ok(Ok(())) => {}
                            }
                        });
                    }
                    // Out of file descriptors and the like: keep serving the others.
                    Err(e) => warn!(error = %e, "telemetry endpoint: accept failed"),
                },
                // Reap finished connections so the set does not grow.
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        connections.shutdown().await;
        self.telemetry.shutdown();
        info!("telemetry endpoint stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    fn get(path: &str) -> Request<()> {
        Request::get(path).body(()).unwrap()
    }

    async fn body(response: Response<Full<Bytes>>) -> String {
        use http_body_util::BodyExt as _;
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn healthz_is_ok_and_unknown_paths_are_404() {
        let telemetry = Telemetry::new("drv-1").unwrap();
        let response = telemetry.respond(None, &get("/healthz"));
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(body(response).await, "ok\n");
        assert_eq!(
            telemetry.respond(None, &get("/nope")).status(),
            StatusCode::NOT_FOUND
        );
        let post = Request::post("/metrics").body(()).unwrap();
        assert_eq!(
            telemetry.respond(None, &post).status(),
            StatusCode::NOT_FOUND
        );
    }

    #[tokio::test]
    async fn hot_key_counters_are_exported_when_configured() {
        let telemetry = Telemetry::new("drv-1").unwrap();
        telemetry.observe_hot_keys(Box::new(|| hsm_pkcs11::HotKeyStats {
            hits: 7,
            misses: 2,
            evictions: 1,
        }));
        let text = body(telemetry.respond(None, &get("/metrics"))).await;
        for (name, value) in [
            ("hsm_driver_hot_key_hits_total", 7),
            ("hsm_driver_hot_key_misses_total", 2),
            ("hsm_driver_hot_key_evictions_total", 1),
        ] {
            assert!(
                text.lines()
                    .any(|l| l.starts_with(name) && l.ends_with(&format!(" {value}"))),
                "{name} = {value} in\n{text}"
            );
        }
    }

    #[tokio::test]
    async fn the_hsm_and_store_counts_are_exported_as_counters() {
        let telemetry = Telemetry::new("drv-1").unwrap();
        let requests = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(3));
        let read = std::sync::Arc::clone(&requests);
        telemetry.observe_counter("hsm_driver_hsm_requests", "requests", move || {
            read.load(std::sync::atomic::Ordering::Relaxed)
        });
        telemetry.observe_counter("hsm_driver_store_statements", "statements", || 11);
        requests.store(5, std::sync::atomic::Ordering::Relaxed);
        let text = body(telemetry.respond(None, &get("/metrics"))).await;
        // Read at the scrape, not at registration.
        for (name, value) in [
            ("hsm_driver_hsm_requests_total", 5),
            ("hsm_driver_store_statements_total", 11),
        ] {
            assert!(
                text.lines()
                    .any(|l| l.starts_with(name) && l.ends_with(&format!(" {value}"))),
                "{name} = {value} in\n{text}"
            );
        }
    }

    #[tokio::test]
    async fn readyz_is_503_with_reasons_until_the_driver_can_lease() {
        let telemetry = Telemetry::new("drv-1").unwrap();
        // Tried: before the engine exists, and with an engine not yet registered.
        let response = telemetry.respond(None, &get("/readyz"));
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let health = Health::new();
        let response = telemetry.respond(Some(&health), &get("/readyz"));
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let text = body(response).await;
        assert!(text.starts_with("not ready\n"), "{text}");
        assert!(text.contains("hsm: down for "), "{text}");
        assert!(text.contains("not checked yet"), "{text}");
        assert!(text.contains("api: down for "), "{text}");
        assert!(text.contains("registered: no\n"), "{text}");
        assert!(text.contains("last successful poll: never\n"), "{text}");
    }

    #[tokio::test]
    async fn metrics_are_prometheus_text_with_info_up_and_engine_instruments() {
        let telemetry = Telemetry::new("drv-1").unwrap();
        let counter = telemetry.meter().u64_counter("hsm_driver_jobs").build();
        counter.add(
            3,
            &[
                KeyValue::new("kind", "Signature"),
                KeyValue::new("outcome", "completed"),
            ],
        );
        let response = telemetry.respond(None, &get("/metrics"));
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()[CONTENT_TYPE],
            "text/plain; version=0.0.4"
        );
        let text = body(response).await;
        assert!(text.contains("hsm_driver_up{"), "{text}");
        let info = text
            .lines()
            .find(|l| l.starts_with("hsm_driver_info{"))
            .unwrap_or_else(|| panic!("no hsm_driver_info in\n{text}"));
        assert!(info.contains("driver_id=\"drv-1\""), "{info}");
        assert!(
            info.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))),
            "{info}"
        );
        assert!(info.ends_with(" 1"), "{info}");
        assert!(
            text.lines().any(|l| l.starts_with("hsm_driver_jobs_total{")
                && l.contains("kind=\"Signature\"")
                && l.contains("outcome=\"completed\"")
                && l.ends_with(" 3")),
            "{text}"
        );
    }

    /// `GET /healthz` on a connection of its own; the whole response (empty if the endpoint
    /// closed the connection).
    async fn get_healthz(addr: SocketAddr) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response).await;
        response
    }

    #[tokio::test]
    async fn the_endpoint_serves_on_a_real_port_until_stopped() {
        let endpoint = Telemetry::new("drv-1")
            .unwrap()
            .bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = endpoint.local_addr().unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let server = tokio::spawn(endpoint.serve(stop.clone().cancelled_owned()));

        let response = get_healthz(addr).await;
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(response.ends_with("\r\n\r\nok\n"), "{response}");

        stop.cancel();
        server.await.unwrap();
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }

    #[tokio::test]
    async fn a_client_can_neither_hold_the_endpoint_with_idle_connections_nor_trickle_headers() {
        // Tried: (1) as many idle connections as the cap, then one more: the extra one is
        // closed at once, and the endpoint serves again when the idle ones go; (2) a request
        // whose headers never finish: the connection is closed after the header timeout.
        let endpoint = Telemetry::new("drv-1")
            .unwrap()
            .bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap()
            .with_limits(ConnectionLimits {
                max_connections: 2,
                header_timeout: std::time::Duration::from_millis(1500),
                max_lifetime: std::time::Duration::from_secs(60),
            });
        let addr = endpoint.local_addr().unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let server = tokio::spawn(endpoint.serve(stop.clone().cancelled_owned()));

        let idle_a = tokio::net::TcpStream::connect(addr).await.unwrap();
        let idle_b = tokio::net::TcpStream::connect(addr).await.unwrap();
        // The server has accepted both once a third connection gets an answer: closed.
        let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buffer = Vec::new();
        // Well before the header timeout would close it: it was never served.
        let read = tokio::time::timeout(
            std::time::Duration::from_millis(1000),
            extra.read_to_end(&mut buffer),
        )
        .await
        .expect("the extra connection is closed at once");
        assert_eq!(read.unwrap_or(0), 0, "closed without an answer");

        // A trickle: headers that never end, closed after the header timeout. First the two
        // idle connections go, and the endpoint answers a whole request again (their slots
        // are free: closing them is asynchronous).
        drop((idle_a, idle_b));
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while !get_healthz(addr).await.starts_with("HTTP/1.1 200 OK\r\n") {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the endpoint answers once the idle connections are gone");
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
        let started = std::time::Instant::now();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            slow.read_to_end(&mut rest),
        )
        .await
        .expect("the trickling connection is closed within the bound");
        let waited = started.elapsed();
        assert!(
            waited >= std::time::Duration::from_millis(1200),
            "closed after the header timeout, not before: {waited:?} ({read:?})"
        );

        // And the endpoint still answers.
        let response = get_healthz(addr).await;
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        stop.cancel();
        server.await.unwrap();
    }
}
