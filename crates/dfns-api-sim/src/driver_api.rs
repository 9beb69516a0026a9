//! The driver listener's routes: register, heartbeat, lease (long-poll), extend, complete,
//! fail, reports (a batch of completions and failures), ping, and the ledger checkpoints kept
//! from heartbeats.
//!
//! Requests reach this module only over mutual TLS with a client certificate issued by the
//! configured client CA; the handshake refuses anything else (see [`crate::tls`]).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use dfns_api_client::protocol::{
    FailureCode, JobFailure, JobId, LeaseId, LeaseRequest, MAX_LEASE_BATCH, MAX_REPORT_BATCH,
    ReportOutcome,
};
use dfns_api_client::wire::{
    self, CompleteRequest, DeregisterRequest, ErrorDetail, ExtendRequest, ExtendResponse,
    FailRequest, HeartbeatRequest, LeaseResponse, LedgerCheckpointsResponse, PingResponse,
    RegisterRequest, ReportsRequest, ReportsResponse, StatusResponse, WireReportBody,
    WireReportOutcome,
};
use http::{Method, Request, StatusCode};
use hyper::body::Incoming;

use crate::respond::{self, HttpResponse, read_json};
use crate::state::{Refusal, SimState};

/// Serves one driver request. `client_subject` is the subject of the verified client certificate.
pub(crate) async fn handle(
    state: Arc<SimState>,
    client_subject: Option<Arc<str>>,
    request: Request<Incoming>,
) -> Result<HttpResponse, Infallible> {
    state.count_driver_request();
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_owned();
    let method = &parts.method;
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let answer = match (method, segments.as_slice()) {
        (&Method::GET, ["driver", "v1", "ping"]) => Ok(respond::json(
            StatusCode::OK,
            &PingResponse {
                status: "ok".to_owned(),
                client_subject: client_subject.map(|s| s.to_string()),
            },
        )),
        (&Method::GET, ["driver", "v1", "ledger", "checkpoints"]) => Ok(respond::json(
            StatusCode::OK,
            &LedgerCheckpointsResponse {
                checkpoints: state
                    .ledger_checkpoints()
                    .iter()
                    .map(wire::encode_ledger_checkpoint)
                    .collect(),
            },
        )),
        (&Method::POST, ["driver", "v1", "drivers", "register"]) => register(&state, body).await,
        (&Method::POST, ["driver", "v1", "drivers", "heartbeat"]) => heartbeat(&state, body).await,
        (&Method::POST, ["driver", "v1", "drivers", "deregister"]) => {
            deregister(&state, body).await
        }
        (&Method::POST, ["driver", "v1", "jobs", "lease"]) => lease(&state, body).await,
        (&Method::POST, ["driver", "v1", "jobs", "reports"]) => reports(&state, body).await,
        (&Method::POST, ["driver", "v1", "jobs", job_id, "extend"]) => {
            extend(&state, job_id, body).await
        }
        (&Method::POST, ["driver", "v1", "jobs", job_id, "complete"]) => {
            complete(&state, job_id, body).await
        }
        (&Method::POST, ["driver", "v1", "jobs", job_id, "fail"]) => {
            fail(&state, job_id, body).await
        }
        (
            _,
            ["driver", "v1", "ping"]
            | ["driver", "v1", "ledger", "checkpoints"]
            | [
                "driver",
                "v1",
                "drivers",
                "register" | "heartbeat" | "deregister",
            ]
            | ["driver", "v1", "jobs", "lease" | "reports"]
            | ["driver", "v1", "jobs", _, "complete" | "fail" | "extend"],
        ) => Ok(respond::wrong_method(method, &path)),
        _ => Ok(respond::no_route(method, &path)),
    };
    Ok(answer.unwrap_or_else(|refusal| respond::refusal(&refusal)))
}

async fn lease(state: &SimState, body: Incoming) -> Result<HttpResponse, Refusal> {
    let request: LeaseRequest = read_json(body).await?;
    if request.max_jobs == 0 || request.max_jobs > MAX_LEASE_BATCH {
        return Err(Refusal::bad_request(format!(
            "maxJobs must be between 1 and {MAX_LEASE_BATCH}"
        )));
    }
    wire::check_driver_id(&request.driver_id).map_err(|e| Refusal::bad_request(e.to_string()))?;
    let max = usize::try_from(request.max_jobs).unwrap_or(usize::MAX);
    let jobs = state
        .lease(
            &request.driver_id,
            max,
            Duration::from_millis(request.wait_ms),
        )
        .await?;
    if !jobs.is_empty() {
        tracing::debug!(driver_id = %request.driver_id, jobs = jobs.len(), "lease answered");
    }
    Ok(respond::json(StatusCode::OK, &LeaseResponse { jobs }))
}

async fn register(state: &SimState, body: Incoming) -> Result<HttpResponse, Refusal> {
    let request: RegisterRequest = read_json(body).await?;
    let registration = crate::codec::decode_registration(&request)
        .map_err(|e| Refusal::bad_request(e.to_string()))?;
    let terms = state.register(registration);
    Ok(respond::json(
        StatusCode::OK,
        &crate::codec::encode_presence_terms(&terms),
    ))
}

async fn heartbeat(state: &SimState, body: Incoming) -> Result<HttpResponse, Refusal> {
    let request: HeartbeatRequest = read_json(body).await?;
    let heartbeat = crate::codec::decode_heartbeat(&request)
        .map_err(|e| Refusal::bad_request(e.to_string()))?;
    let terms = state.heartbeat(&heartbeat)?;
    Ok(respond::json(
        StatusCode::OK,
        &crate::codec::encode_presence_terms(&terms),
    ))
}

async fn deregister(state: &SimState, body: Incoming) -> Result<HttpResponse, Refusal> {
    let request: DeregisterRequest = read_json(body).await?;
    wire::check_driver_id(&request.driver_id).map_err(|e| Refusal::bad_request(e.to_string()))?;
    state.deregister(&request.driver_id);
    Ok(respond::json(StatusCode::OK, &serde_json::json!({})))
}

async fn extend(state: &SimState, job_id: &str, body: Incoming) -> Result<HttpResponse, Refusal> {
    let request: ExtendRequest = read_json(body).await?;
    let (job, lease) = ids(job_id, &request.lease_id)?;
    let answer = state.extend(&job, &lease)?;
    // As for reports: 200 when the lease was extended, 409 for every other outcome.
    let status = match answer {
        ExtendResponse::Extended { .. } => StatusCode::OK,
        _ => StatusCode::CONFLICT,
    };
    Ok(respond::json(status, &answer))
}

/// Parses the path's job id (unknown if invalid) and the body's lease id (400 if invalid).
fn ids(job_id: &str, lease_id: &str) -> Result<(JobId, LeaseId), Refusal> {
    let job = JobId::new(job_id).map_err(|_| Refusal::not_found(format!("no job {job_id}")))?;
    let lease = LeaseId::new(lease_id).map_err(|e| Refusal::bad_request(e.to_string()))?;
    Ok((job, lease))
}

fn outcome(outcome: ReportOutcome) -> HttpResponse {
    let status = if outcome == ReportOutcome::Accepted {
        StatusCode::OK
    } else {
        StatusCode::CONFLICT
    };
    respond::json(status, &StatusResponse { status: outcome })
}

async fn complete(state: &SimState, job_id: &str, body: Incoming) -> Result<HttpResponse, Refusal> {
    let request: CompleteRequest = read_json(body).await?;
    let (job, lease) = ids(job_id, &request.lease_id)?;
    let result = crate::codec::decode_job_result(&request.result)
        .map_err(|e| Refusal::bad_request(e.to_string()))?;
    state.complete(&job, &lease, result).map(outcome)
}

async fn fail(state: &SimState, job_id: &str, body: Incoming) -> Result<HttpResponse, Refusal> {
    let request: FailRequest = read_json(body).await?;
    let (job, lease) = ids(job_id, &request.lease_id)?;
    let failure = failure(request.code, request.message, request.retryable);
    state.fail(&job, &lease, &failure).map(outcome)
}

/// A failure as reported, its message cut to 4096 bytes.
fn failure(code: FailureCode, mut message: String, retryable: bool) -> JobFailure {
    if message.len() > 4096 {
        let mut end = 4096;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
    }
    JobFailure {
        code,
        message,
        retryable,
    }
}

/// `POST /driver/v1/jobs/reports`: each report handled as its own `complete` or `fail` would
/// be, its outcome (or its refusal) in the answer, in order. A batch that is not valid JSON,
/// is empty, or is larger than `MAX_REPORT_BATCH` is refused whole (`400`), and changes
/// nothing.
async fn reports(state: &SimState, body: Incoming) -> Result<HttpResponse, Refusal> {
    let request: ReportsRequest = read_json(body).await?;
    if request.reports.is_empty() || request.reports.len() > MAX_REPORT_BATCH {
        return Err(Refusal::bad_request(format!(
            "a batch carries 1 to {MAX_REPORT_BATCH} reports, not {}",
            request.reports.len()
        )));
    }
    let outcomes = request
        .reports
        .into_iter()
        .map(|report| {
            let job_id = report.job_id.clone();
            let answer =
                ids(&report.job_id, &report.lease_id).and_then(|(job, lease)| match report.body {
                    WireReportBody::Complete { result } => {
                        let result = crate::codec::decode_job_result(&result)
                            .map_err(|e| Refusal::bad_request(e.to_string()))?;
                        state.complete(&job, &lease, result)
                    }
                    WireReportBody::Fail {
                        code,
                        message,
                        retryable,
                    } => state.fail(&job, &lease, &failure(code, message, retryable)),
                });
            match answer {
                Ok(status) => WireReportOutcome {
                    job_id,
                    status: Some(status),
                    error: None,
                },
                Err(refusal) => WireReportOutcome {
                    job_id,
                    status: None,
                    error: Some(ErrorDetail {
                        code: refusal.code.to_owned(),
                        message: refusal.message,
                    }),
                },
            }
        })
        .collect();
    Ok(respond::json(StatusCode::OK, &ReportsResponse { outcomes }))
}
