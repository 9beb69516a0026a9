//! A small OTLP/HTTP receiver: what a collector would get from the driver's
//! `[telemetry.traces]`. It answers every export with 200 and keeps the requests; JSON exports
//! (`protocol = "http/json"`) are read back as spans.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// One export request as it arrived.
#[derive(Debug, Clone)]
pub struct OtlpExport {
    /// The request's path (`/v1/traces` for the driver's configuration in the tests).
    pub path: String,
    /// Its `Content-Type`.
    pub content_type: String,
    /// Its body: protobuf or JSON, as the content type says.
    pub body: Bytes,
}

/// A span read from a JSON export, with its resource's attributes.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// Hex trace id.
    pub trace_id: String,
    /// Hex span id.
    pub span_id: String,
    /// Hex id of the parent span; `None` for a root span.
    pub parent_span_id: Option<String>,
    /// The span's name (`job`, `lease`, `hsm`, ...).
    pub name: String,
    /// Start, in nanoseconds since the Unix epoch.
    pub start_ns: u64,
    /// End, in nanoseconds since the Unix epoch.
    pub end_ns: u64,
    /// Attributes, each value as text (strings unquoted).
    pub attributes: BTreeMap<String, String>,
    /// The status code: 0 unset, 1 ok, 2 error.
    pub status_code: i64,
    /// The status message (set with an error status).
    pub status_message: String,
    /// The span events' names (log events inside the span).
    pub events: Vec<String>,
    /// The resource's attributes (`service.name`, `service.instance.id`, ...).
    pub resource: BTreeMap<String, String>,
}

impl ReceivedSpan {
    /// An attribute's value, if the span has it.
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

/// A running receiver; dropping it stops it.
pub struct OtlpReceiver {
    addr: SocketAddr,
    exports: Arc<Mutex<Vec<OtlpExport>>>,
    /// How many exports have arrived: a waiter wakes on each.
    arrived: watch::Receiver<usize>,
    server: tokio::task::JoinHandle<()>,
}

impl OtlpReceiver {
    /// Listens on a free loopback port.
    ///
    /// # Errors
    /// If no port can be bound.
    pub async fn start() -> anyhow::Result<OtlpReceiver> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the OTLP receiver")?;
        let addr = listener.local_addr()?;
        let exports = Arc::new(Mutex::new(Vec::new()));
        let (count, arrived) = watch::channel(0);
        let count = Arc::new(count);
        let kept = Arc::clone(&exports);
        let server = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (kept, count) = (Arc::clone(&kept), Arc::clone(&count));
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        receive(Arc::clone(&kept), Arc::clone(&count), request)
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(OtlpReceiver {
            addr,
            exports,
            arrived,
            server,
        })
    }

    /// The traces URL to configure (`[telemetry.traces] endpoint`).
    pub fn endpoint(&self) -> String {
        format!("http://{}/v1/traces", self.addr)
    }

    /// The export requests received so far.
    pub fn exports(&self) -> Vec<OtlpExport> {
        self.exports
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Every span of the JSON exports received so far.
    ///
    /// # Errors
    /// If an export is not OTLP JSON.
    pub fn spans(&self) -> anyhow::Result<Vec<ReceivedSpan>> {
        let mut spans = Vec::new();
        for export in self.exports() {
            spans.extend(parse_export(&export.body)?);
        }
        Ok(spans)
    }

    /// Waits until the spans received satisfy `done` (looked at again as each export
    /// arrives), at most `timeout`.
    ///
    /// # Errors
    /// On timeout (naming what arrived), or if an export is not OTLP JSON.
    pub async fn wait_for_spans(
        &self,
        timeout: Duration,
        done: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> anyhow::Result<Vec<ReceivedSpan>> {
        let deadline = Instant::now() + timeout;
        let mut arrived = self.arrived.clone();
        loop {
            arrived.borrow_and_update();
            let spans = self.spans()?;
            if done(&spans) {
                return Ok(spans);
            }
            let next = tokio::time::timeout_at(deadline.into(), arrived.changed()).await;
            if !matches!(next, Ok(Ok(()))) {
                let names: BTreeMap<&str, usize> =
                    spans.iter().fold(BTreeMap::new(), |mut count, span| {
                        *count.entry(span.name.as_str()).or_default() += 1;
                        count
                    });
                bail!(
                    "the spans expected did not arrive within {timeout:?}; {} exports, spans by name: {names:?}",
                    self.exports().len()
                );
            }
        }
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn receive(
    exports: Arc<Mutex<Vec<OtlpExport>>>,
    count: Arc<watch::Sender<usize>>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = request.uri().path().to_owned();
    let content_type = request
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let Ok(body) = request.into_body().collect().await else {
        return Ok(Response::builder()
            .status(400)
            .body(Full::new(Bytes::new()))
            .expect("a static response"));
    };
    let json = content_type.starts_with("application/json");
    exports
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(OtlpExport {
            path,
            content_type: content_type.clone(),
            body: body.to_bytes(),
        });
    count.send_modify(|n| *n += 1);
    // An empty ExportTraceServiceResponse: full success.
    let answer = if json { "{}" } else { "" };
    Ok(Response::builder()
        .status(200)
        .header(hyper::header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(answer)))
        .expect("a static response"))
}

/// The spans of one OTLP JSON export (`ExportTraceServiceRequest`).
fn parse_export(body: &[u8]) -> anyhow::Result<Vec<ReceivedSpan>> {
    let request: Value = serde_json::from_slice(body).context("an OTLP export that is not JSON")?;
    let mut spans = Vec::new();
    for resource_spans in array(&request, "resourceSpans")? {
        let resource = attributes(resource_spans.get("resource").unwrap_or(&Value::Null));
        for scope_spans in array(resource_spans, "scopeSpans")? {
            for span in array(scope_spans, "spans")? {
                let text = |key: &str| {
                    span.get(key)
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned()
                };
                let nanos = |key: &str| match span.get(key) {
                    Some(Value::String(s)) => s.parse().unwrap_or(0),
                    Some(Value::Number(n)) => n.as_u64().unwrap_or(0),
                    _ => 0,
                };
                let parent = text("parentSpanId");
                let status = span.get("status").unwrap_or(&Value::Null);
                spans.push(ReceivedSpan {
                    trace_id: text("traceId"),
                    span_id: text("spanId"),
                    parent_span_id: (!parent.is_empty()).then_some(parent),
                    name: text("name"),
                    start_ns: nanos("startTimeUnixNano"),
                    end_ns: nanos("endTimeUnixNano"),
                    attributes: attributes(span),
                    status_code: status.get("code").and_then(Value::as_i64).unwrap_or(0),
                    status_message: status
                        .get("message")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned(),
                    events: span
                        .get("events")
                        .and_then(Value::as_array)
                        .map(|events| {
                            events
                                .iter()
                                .filter_map(|e| e.get("name").and_then(Value::as_str))
                                .map(str::to_owned)
                                .collect()
                        })
                        .unwrap_or_default(),
                    resource: resource.clone(),
                });
            }
        }
    }
    Ok(spans)
}

fn array<'a>(value: &'a Value, key: &str) -> anyhow::Result<&'a [Value]> {
    match value.get(key) {
        Some(Value::Array(items)) => Ok(items),
        None => Ok(&[]),
        Some(other) => bail!("OTLP JSON: `{key}` is not an array: {other}"),
    }
}

/// `attributes: [{key, value: {stringValue | intValue | doubleValue | boolValue: …}}]`, each
/// value as text.
fn attributes(holder: &Value) -> BTreeMap<String, String> {
    let Some(Value::Array(items)) = holder.get("attributes") else {
        return BTreeMap::new();
    };
    items
        .iter()
        .filter_map(|item| {
            let key = item.get("key")?.as_str()?.to_owned();
            let value = match item.get("value")?.as_object()?.values().next()? {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            Some((key, value))
        })
        .collect()
}
