//! A faithful stand-in for the Dfns API, for tests, benchmarks and the demo.
//!
//! ```text
//!   hsm-driver ×N ──mTLS──▶ driver listener (HTTPS, client certificate required)
//!                          POST /driver/v1/drivers/register      capabilities → presence terms
//!                          POST /driver/v1/drivers/heartbeat     409 once the registration lapsed
//!                          POST /driver/v1/jobs/lease            long-poll, only jobs the driver serves
//!                          POST /driver/v1/jobs/{jobId}/extend   keep the current lease
//!                          POST /driver/v1/jobs/{jobId}/complete first completion wins
//!                          POST /driver/v1/jobs/{jobId}/fail     retryable → requeued
//!                          GET  /driver/v1/ping
//!                               │
//!                          ┌────┴─────────────────────────────┐
//!                          │ state: job queue (a FIFO per capability) + driver registry
//!                          │        + keys + signature requests
//!                          └────┬─────────────────────────────┘
//!   tests, demo ──HTTP──▶ application listener (plain HTTP, loopback; no authentication)
//!                          POST /keys, GET /keys/{keyId}[?waitMs=N]
//!                          POST /keys/{keyId}/signatures
//!                          GET  /keys/{keyId}/signatures/{id}[?waitMs=N]   long-poll until settled
//!                          GET  /jobs/stats, GET /app/v1/drivers
//! ```
//!
//! The driver side speaks exactly the protocol of [`dfns_api_client::wire`]. The application
//! side is shaped like the real API's keys and signatures endpoints but is deliberately
//! unauthenticated: the real API's application authentication is out of scope, and this
//! listener is for tests and demos only.
//!
//! Delivery is at least once: a lease that lapses is handed out again under a new lease id,
//! and the *first* completion of a job wins, even one made under a lease that has since
//! lapsed (`docs/protocol.md`, "Delivery semantics").
//!
//! Several drivers may serve the queue at once (an active-active cluster): each registers the
//! (scheme, curve) pairs it serves and is handed only such jobs; a driver that stops
//! heartbeating is forgotten after the liveness timeout and must register again
//! (`docs/protocol.md`, "Presence" and "Capability routing").
//!
//! - [`start`] runs both listeners and returns a [`RunningSimulator`].
//! - [`app_client::AppClient`] drives the application API.
//! - [`pki::generate_dev_pki`] writes a development PKI (CA, server, client, and a rogue CA).

pub mod app_client;
pub mod pki;

mod app_api;
mod codec;
mod driver_api;
mod error;
mod ids;
mod queue;
mod registry;
mod respond;
mod server;
mod state;
mod tls;

pub use app_api::{DriverView, KeyView, SignatureView};
pub use error::SimError;
pub use server::{RunningSimulator, SimConfig, start};
pub use state::SimStats;
pub use tls::{ServerTlsFiles, load_server_tls};
