//! The driver's telemetry endpoint as a client sees it: a minimal HTTP GET, `/readyz` answers,
//! and the bound address read from the driver's log.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::process::{log_since, log_tail, strip_ansi};

/// One answer from the telemetry endpoint.
#[derive(Debug, Clone)]
pub struct TelemetryResponse {
    /// The HTTP status code.
    pub status: u16,
    /// The `content-type` header (empty if absent).
    pub content_type: String,
    /// The body, as text.
    pub body: String,
}

/// A `/readyz` answer: `200 ready` or `503 not ready`, with one line per component.
#[derive(Debug, Clone)]
pub struct Readiness {
    /// The HTTP status code.
    pub status: u16,
    /// The body (`ready\n…` or `not ready\n…`).
    pub body: String,
}

impl Readiness {
    /// `200` and a body starting `ready`.
    pub fn is_ready(&self) -> bool {
        self.status == 200 && self.body.starts_with("ready\n")
    }

    /// `503`, a body starting `not ready`, and the line of `component` (`hsm`, `store`, `api`)
    /// saying `down`.
    pub fn is_down(&self, component: &str) -> bool {
        self.status == 503
            && self.body.starts_with("not ready\n")
            && self
                .component_line(component)
                .is_some_and(|line| line.starts_with(&format!("{component}: down")))
    }

    /// The line describing `component` (`hsm: up`, `store: down for 1.2s: …`).
    pub fn component_line(&self, component: &str) -> Option<&str> {
        let prefix = format!("{component}: ");
        self.body.lines().find(|line| line.starts_with(&prefix))
    }
}

/// A minimal HTTP/1.1 GET over a fresh connection (`Connection: close`, so the body ends at
/// end of stream); enough for the driver's fixed-length answers.
pub(crate) async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<TelemetryResponse> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        anyhow::Ok(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .with_context(|| format!("GET http://{addr}{path}: no answer within 10 s"))?
        .with_context(|| format!("GET http://{addr}{path}"))?;
    let text = String::from_utf8(raw).context("telemetry response is not UTF-8")?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("GET {path}: malformed response:\n{text}"))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.strip_prefix("HTTP/1.1 "))
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("GET {path}: no status line:\n{head}"))?;
    let content_type = lines
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("content-type"))
        .map(|(_, value)| value.trim().to_owned())
        .unwrap_or_default();
    Ok(TelemetryResponse {
        status,
        content_type,
        body: body.to_owned(),
    })
}

/// Reads the bound address from the driver's `telemetry endpoint listening addr=…` line, in
/// the part of the log after byte `from` (the current run's).
pub(crate) fn telemetry_addr_from_log(log: &Path, from: u64) -> anyhow::Result<SocketAddr> {
    let text = log_since(log, from);
    let line = text
        .lines()
        .map(strip_ansi)
        .find(|line| line.contains("telemetry endpoint listening"))
        .with_context(|| format!("no `telemetry endpoint listening`:\n{}", log_tail(log)))?;
    line.split_once("addr=")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|addr| addr.parse().ok())
        .with_context(|| format!("no address in `{line}`"))
}

/// Sum of the samples of `metric` (Prometheus text) whose labels include every one of `labels`
/// (each written `name="value"`); 0 when there are none.
pub fn sum_samples(text: &str, metric: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|line| {
            line.strip_prefix(metric)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|line| labels.iter().all(|label| line.contains(label)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
