//! pillion's sidecar as a library: everything `pillion run` does once its settings
//! are resolved, startable in-process (a test, an embedding program) on port 0.
//!
//! - [`settings`]: what a sidecar needs, resolved ([`Settings`]).
//! - [`sidecar`]: wiring: open the registry, start the app's registration, serve the
//!   HTTP API and the other listeners, and take it all down in order on shutdown.
//! - [`api`]: the API listener: fixed routes, and calls to services without a router.
//! - [`door`]: the API's door: the token, foreign web pages, rebinding.
//! - [`dashboard`]: the live page at `/dashboard` and its recorder.
//! - [`otlp`]: the span exporter (`--otlp-endpoint`).
//! - [`shutdown`]: signals to a graceful stop.
#![forbid(unsafe_code)]

pub mod api;
pub mod dashboard;
pub mod door;
pub mod otlp;
pub mod settings;
pub mod shutdown;
pub mod sidecar;

pub use settings::Settings;
