//! Job traces over OTLP/HTTP (`[telemetry.traces]`, off by default).
//!
//! ```text
//!  driver-core: `job` span ─┬─ lease ─ load ─ hsm ─ verify ─ ledger ─ report   (tracing spans)
//!                           ▼
//!  tracing-opentelemetry layer (driver-core's spans only, and the events inside them)
//!                           ▼
//!  batch span processor: its own thread; a full queue drops spans, never blocks a job
//!                           ▼
//!  OTLP/HTTP exporter (protobuf or JSON) ── this module's client: hyper on the driver's
//!                                           runtime, rustls trusting `ca_file` only
//! ```
//!
//! Spans carry what the logs already show (job and key ids, kind, outcome, failure code, HSM
//! operation names, timings), never a payload, key material, signature or PIN: driver-core
//! puts nothing else in them. The resource names the service (`hsm-driver`), its version and
//! the driver id (`service.instance.id`).
//!
//! A collector that is down or slow costs spans, not jobs: exports run off the job path, each
//! bounded by `timeout_ms`, and spans that do not fit the queue are dropped (OpenTelemetry's
//! own diagnostics say so). `OTEL_EXPORTER_OTLP_HEADERS` / `OTEL_EXPORTER_OTLP_TRACES_HEADERS`
//! add request headers (a collector's token) without writing them in the configuration file.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_http::{HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing::{Level, Metadata, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::filter::FilterFn;
use tracing_subscriber::registry::LookupSpan;

use crate::config::{OtlpProtocol, TracesSection};

/// The most of a collector's answer read (it is only checked for its status).
const MAX_ANSWER: usize = 64 * 1024;

/// The span source traced: the engine's job spans and their phases.
const TRACED_TARGET: &str = "driver_core";

/// A running trace pipeline; [`Traces::shutdown`] sends what is queued.
pub(crate) struct Traces {
    provider: SdkTracerProvider,
    /// The most the last export may take at shutdown.
    last_export: Duration,
}

/// The longest the last export may hold a stopping driver, whatever `timeout_ms` says: the
/// service manager's stop timeout also covers draining the jobs in flight.
const LAST_EXPORT_MAX: Duration = Duration::from_secs(5);

impl Traces {
    /// Builds the exporter and the batch processor. Exports run on `runtime` (this module's
    /// client needs it), driven from the processor's own thread.
    ///
    /// # Errors
    /// If `ca_file` cannot be read or the exporter cannot be built.
    pub(crate) fn start(
        section: &TracesSection,
        driver_id: &str,
        runtime: tokio::runtime::Handle,
    ) -> anyhow::Result<Traces> {
        let timeout = Duration::from_millis(section.timeout_ms);
        let client = OtlpClient::new(section, timeout, runtime)?;
        let protocol = match section.protocol {
            OtlpProtocol::HttpProtobuf => Protocol::HttpBinary,
            OtlpProtocol::HttpJson => Protocol::HttpJson,
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_endpoint(section.endpoint.clone())
            .with_protocol(protocol)
            .with_timeout(timeout)
            .build()
            .context("telemetry.traces: building the OTLP exporter")?;
        let resource = Resource::builder()
            .with_service_name("hsm-driver")
            .with_attributes([
                KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
                KeyValue::new("service.instance.id", driver_id.to_owned()),
            ])
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                section.sample_ratio,
            ))))
            .with_resource(resource)
            .build();
        Ok(Traces {
            provider,
            last_export: timeout.min(LAST_EXPORT_MAX),
        })
    }

    /// The `tracing` layer feeding this pipeline: driver-core's spans (the `job` span and its
    /// DEBUG phases) and the log events inside them, whatever the log filter.
    pub(crate) fn layer<S>(&self) -> impl Layer<S> + use<S>
    where
        S: Subscriber + for<'span> LookupSpan<'span>,
    {
        tracing_opentelemetry::layer()
            .with_tracer(self.provider.tracer("hsm-driver"))
            .with_filter(FilterFn::new(traced))
    }

    /// Sends the spans still queued, within the export timeout and at most
    /// [`LAST_EXPORT_MAX`], and stops the pipeline. Call it outside the runtime's threads,
    /// while the runtime still runs.
    pub(crate) fn shutdown(self) {
        if let Err(e) = self.provider.shutdown_with_timeout(self.last_export) {
            tracing::warn!(error = %e, "traces: the last export did not finish");
        }
    }
}

/// What the trace layer takes: driver-core's spans, DEBUG and above (its phases), and the
/// INFO-and-above events inside them (they become span events).
fn traced(meta: &Metadata<'_>) -> bool {
    if meta.is_span() {
        meta.target().starts_with(TRACED_TARGET) && *meta.level() <= Level::DEBUG
    } else {
        *meta.level() <= Level::INFO
    }
}

/// The exporter's HTTP client: hyper on the driver's runtime, so that the batch processor's
/// thread (which drives an export with a plain executor) needs no runtime of its own.
#[derive(Debug)]
struct OtlpClient {
    runtime: tokio::runtime::Handle,
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
}

impl OtlpClient {
    fn new(
        section: &TracesSection,
        timeout: Duration,
        runtime: tokio::runtime::Handle,
    ) -> anyhow::Result<OtlpClient> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(timeout));
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let connector = match &section.ca_file {
            // `https://` (the configuration allows a CA file only then): that CA alone.
            Some(ca_file) => builder
                .with_tls_config(tls_trusting(ca_file)?)
                .https_only()
                .enable_http1()
                .wrap_connector(http),
            None => builder
                .with_tls_config(tls_trusting_nothing()?)
                .https_or_http()
                .enable_http1()
                .wrap_connector(http),
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(OtlpClient {
            runtime,
            client,
            timeout,
        })
    }

    async fn send(
        client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
        request: Request<Bytes>,
    ) -> Result<Response<Bytes>, HttpError> {
        let (parts, body) = request.into_parts();
        let response = client
            .request(Request::from_parts(parts, Full::new(body)))
            .await?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, MAX_ANSWER).collect().await?.to_bytes();
        Ok(Response::from_parts(parts, body))
    }
}

impl HttpClient for OtlpClient {
    fn send_bytes<'life0, 'async_trait>(
        &'life0 self,
        request: Request<Bytes>,
    ) -> Pin<Box<dyn Future<Output = Result<Response<Bytes>, HttpError>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        let (client, timeout) = (self.client.clone(), self.timeout);
        // On the runtime: hyper's connections need its reactor and timers; the caller (the
        // batch processor's thread) only waits for the answer.
        let exported = self
            .runtime
            .spawn(async move { tokio::time::timeout(timeout, Self::send(client, request)).await });
        Box::pin(async move {
            match exported.await {
                Ok(Ok(answer)) => answer,
                Ok(Err(_)) => Err(format!("no answer within {timeout:?}").into()),
                Err(e) => Err(Box::new(e) as HttpError),
            }
        })
    }
}

/// TLS trusting only the CA certificates in `ca_file` (also `config check`'s test of it).
pub(crate) fn tls_trusting(ca_file: &std::path::Path) -> anyhow::Result<rustls::ClientConfig> {
    let roots = dfns_api_client::pem::read_roots(ca_file).context("telemetry.traces.ca_file")?;
    client_config(roots)
}

/// TLS for a plain `http://` endpoint: never used (the connector sends plain HTTP), and it
/// trusts nothing should it be.
fn tls_trusting_nothing() -> anyhow::Result<rustls::ClientConfig> {
    client_config(rustls::RootCertStore::empty())
}

fn client_config(roots: rustls::RootCertStore) -> anyhow::Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("telemetry.traces: TLS configuration")?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::path::PathBuf;
    use std::sync::Mutex;

    use hyper::body::Incoming;
    use hyper_util::rt::TokioIo;
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    /// What a collector received: each request's content type and body.
    type Received = Arc<Mutex<Vec<(String, Bytes)>>>;

    /// A collector on a free loopback port, plain or (with `tls`) HTTPS, answering 200.
    async fn collector(tls: Option<Arc<rustls::ServerConfig>>) -> (SocketAddr, Received) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Received::default();
        let kept = Arc::clone(&received);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (kept, tls) = (Arc::clone(&kept), tls.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                        let kept = Arc::clone(&kept);
                        async move {
                            let content_type = request
                                .headers()
                                .get(hyper::header::CONTENT_TYPE)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or_default()
                                .to_owned();
                            let body = request.into_body().collect().await?.to_bytes();
                            kept.lock().unwrap().push((content_type, body));
                            Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::new())))
                        }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    let _ = match tls {
                        Some(tls) => {
                            match tokio_rustls::TlsAcceptor::from(tls).accept(stream).await {
                                Ok(stream) => {
                                    http.serve_connection(TokioIo::new(stream), service).await
                                }
                                Err(_) => return, // a client that does not trust us hangs up
                            }
                        }
                        None => http.serve_connection(TokioIo::new(stream), service).await,
                    };
                });
            }
        });
        (addr, received)
    }

    fn section(
        endpoint: String,
        protocol: OtlpProtocol,
        ca_file: Option<PathBuf>,
    ) -> TracesSection {
        TracesSection {
            endpoint,
            protocol,
            ca_file,
            timeout_ms: 2_000,
            sample_ratio: 1.0,
        }
    }

    /// A job span with a phase, as driver-core makes them, and a span of another crate; then
    /// the pipeline's shutdown sends them (from this thread, outside the runtime).
    fn trace_one_job(traces: Traces) {
        let subscriber = tracing_subscriber::registry().with(traces.layer());
        tracing::subscriber::with_default(subscriber, || {
            let job = tracing::info_span!(target: "driver_core::job", "job", job_id = "job-42");
            job.in_scope(|| {
                tracing::debug_span!(target: "driver_core::job", "hsm", operation = "sign")
                    .in_scope(|| {});
                tracing::info_span!(target: "hyper_like_crate", "not_traced").in_scope(|| {});
            });
        });
        traces.shutdown();
    }

    fn contains(haystack: &[u8], needle: &str) -> bool {
        haystack
            .windows(needle.len())
            .any(|window| window == needle.as_bytes())
    }

    #[test]
    fn spans_go_out_as_otlp_protobuf_and_only_the_engines() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let (addr, received) = runtime.block_on(collector(None));
        let config = section(
            format!("http://{addr}/v1/traces"),
            OtlpProtocol::HttpProtobuf,
            None,
        );
        let traces = Traces::start(&config, "driver-7", runtime.handle().clone()).unwrap();
        trace_one_job(traces);

        let received = received.lock().unwrap();
        assert_eq!(received.len(), 1, "one export at shutdown");
        let (content_type, body) = &received[0];
        assert_eq!(content_type, "application/x-protobuf");
        // Protobuf keeps strings as their bytes: the span names, attributes and resource.
        for expected in ["job", "job-42", "hsm", "sign", "hsm-driver", "driver-7"] {
            assert!(contains(body, expected), "the export lacks {expected:?}");
        }
        assert!(
            !contains(body, "not_traced"),
            "only driver-core's spans are traced"
        );
    }

    #[test]
    fn an_https_collector_is_trusted_only_through_ca_file() {
        // Tried: a collector whose certificate the configured CA signed (delivered), and an
        // impostor with a certificate from another CA (refused: nothing is sent to it).
        let dir = tempfile::tempdir().unwrap();
        let pki = dfns_api_sim::pki::generate_dev_pki(dir.path(), &["localhost"]).unwrap();
        let chain = dfns_api_client::pem::read_certs(&pki.server_cert).unwrap();
        let key = dfns_api_client::pem::read_key(&pki.server_key).unwrap();
        let server = Arc::new(
            rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap(),
        );
        for (ca_file, delivered) in [(&pki.ca_cert, true), (&pki.rogue_ca_cert, false)] {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            let (addr, received) = runtime.block_on(collector(Some(Arc::clone(&server))));
            let config = section(
                format!("https://localhost:{}/v1/traces", addr.port()),
                OtlpProtocol::HttpJson,
                Some(ca_file.clone()),
            );
            let traces = Traces::start(&config, "driver-7", runtime.handle().clone()).unwrap();
            trace_one_job(traces);
            let received = received.lock().unwrap();
            assert_eq!(
                received.len(),
                usize::from(delivered),
                "trusting {}: {received:?}",
                ca_file.display()
            );
            if delivered {
                assert!(received[0].0.starts_with("application/json"));
                assert!(contains(&received[0].1, "job-42"));
            }
        }
    }
}
