//! The driver-facing side of the Dfns API: the job protocol and a mutual-TLS HTTP client.
//!
//! ```text
//!   hsm-driver ──(mTLS, HTTP/1.1, JSON)──▶ Dfns API
//!       POST /driver/v1/drivers/register        who I am, what I serve → presence terms
//!       POST /driver/v1/drivers/heartbeat       alive, ready, in flight (409 if forgotten)
//!       POST /driver/v1/jobs/lease              lease a batch of jobs I can serve, long-poll
//!       POST /driver/v1/jobs/{jobId}/extend     keep the lease of a long job
//!       POST /driver/v1/jobs/{jobId}/complete   public key or signature
//!       POST /driver/v1/jobs/{jobId}/fail       code, message, retryable
//! ```
//!
//! - [`protocol`]: the typed, validated jobs and results the engine works with.
//! - [`wire`]: their JSON encoding: the bodies, the field rules, and the driver's half of the
//!   codec (the API's half is the simulator's).
//! - [`JobSource`]: the trait the engine is generic over.
//! - [`HttpJobSource`]: its hyper + rustls implementation with client certificates,
//!   timeouts and jittered exponential backoff.
//!
//! Everything the real API may differ in is confined to this crate.

pub mod pem;
pub mod protocol;
pub mod wire;

mod client;
mod error;
mod retry;
mod source;
mod tls;

pub use client::{ClientConfig, HttpJobSource};
pub use error::ApiError;
pub use retry::Backoff;
pub use source::JobSource;
pub use tls::{TlsFiles, load_client_tls};
