//! Reading size-limited JSON request bodies and writing JSON responses, for both listeners.

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Serialize;
use serde::de::DeserializeOwned;

use dfns_api_client::wire::{ErrorDetail, ErrorResponse};

use crate::state::Refusal;

/// Largest request body accepted (larger → 413).
pub(crate) const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// The response type of both services.
pub(crate) type HttpResponse = Response<Full<Bytes>>;

/// Reads and parses a JSON body: 413 if it is too large, 400 if it is not the expected JSON.
pub(crate) async fn read_json<T: DeserializeOwned>(body: Incoming) -> Result<T, Refusal> {
    let bytes = Limited::new(body, MAX_REQUEST_BYTES)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                Refusal::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "PayloadTooLarge",
                    format!("request body larger than {MAX_REQUEST_BYTES} bytes"),
                )
            } else {
                Refusal::bad_request("cannot read the request body")
            }
        })?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| {
        let mut message = format!("malformed JSON body: {e}");
        message.truncate(300);
        Refusal::bad_request(message)
    })
}

/// A JSON response.
pub(crate) fn json<T: Serialize>(status: StatusCode, value: &T) -> HttpResponse {
    match serde_json::to_vec(value) {
        Ok(body) => with_body(status, Bytes::from(body)),
        Err(e) => refusal(&Refusal::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Internal",
            format!("cannot encode the response: {e}"),
        )),
    }
}

/// An error response `{"error":{"code","message"}}`.
pub(crate) fn refusal(refusal: &Refusal) -> HttpResponse {
    let body = ErrorResponse {
        error: ErrorDetail {
            code: refusal.code.to_owned(),
            message: refusal.message.clone(),
        },
    };
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    with_body(refusal.status, Bytes::from(bytes))
}

/// 404 for an unknown route.
pub(crate) fn no_route(method: &http::Method, path: &str) -> HttpResponse {
    refusal(&Refusal::not_found(format!("no route {method} {path}")))
}

/// 405 for a known route with the wrong method.
pub(crate) fn wrong_method(method: &http::Method, path: &str) -> HttpResponse {
    refusal(&Refusal::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "MethodNotAllowed",
        format!("{method} is not allowed on {path}"),
    ))
}

fn with_body(status: StatusCode, body: Bytes) -> HttpResponse {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}
