//! Types every pillion crate shares, and nothing that does I/O.
//!
//! - [`service`]: a registered [`Service`] and its [`Node`]s, with the micro-sidecar
//!   compatible JSON codec (keys in any case in, lower case out) and its validation.
//! - [`duration`]: Go/humantime style durations (`10s`, `1m30s`, `250ms`) used by flags,
//!   the config file and query strings alike.
//! - [`size`]: byte sizes (`4MiB`, `512KiB`) for limits.
//! - [`error`]: the JSON error shape (`{"id","code","detail","status"}`) that every
//!   error made by the sidecar itself uses.
//! - [`json`]: JSON request bodies read strictly: a key given twice (or twice in
//!   different case, where keys are case-insensitive) is refused, never a silent pick.
//! - [`id`]: random identifiers from the OS CSPRNG.
//! - [`secret`]: URLs with their passwords hidden, for logs and errors.
//! - [`metrics`]: counters and latency histograms in Prometheus text format.
//! - [`trace`]: W3C Trace Context on every hop, and the queue of spans to export.
#![forbid(unsafe_code)]

pub mod duration;
pub mod error;
pub mod id;
pub mod json;
pub mod metrics;
pub mod secret;
pub mod service;
pub mod size;
pub mod trace;
pub mod url;

/// The header naming the calling service to an app. Only a mesh listener sets it,
/// from the caller's verified certificate.
pub const CALLER_HEADER: &str = "x-pillion-caller";

/// The header giving an app the subject (`sub`) of the caller's verified JWT. Only a
/// JWT verifier sets it.
pub const SUBJECT_HEADER: &str = "x-pillion-subject";

/// The headers that tell an app who is calling. An app trusts them because only
/// pillion sets them, so every request pillion's server receives, on every listener,
/// and every message the broker pushes to an app, has a sender's copy removed
/// ([`remove_identity`]) before pillion sets its own.
pub const IDENTITY_HEADERS: [&str; 2] = [CALLER_HEADER, SUBJECT_HEADER];

/// Removes every identity header (all their values) from `headers`.
pub fn remove_identity(headers: &mut http::HeaderMap) {
    // Parsed once, not on every request.
    const NAMES: [http::HeaderName; 2] = [
        http::HeaderName::from_static(CALLER_HEADER),
        http::HeaderName::from_static(SUBJECT_HEADER),
    ];
    for name in &NAMES {
        headers.remove(name);
    }
}

pub use duration::Dur;
pub use error::ApiError;
pub use service::{Node, NodeProtocol, Service, ServiceError};
pub use size::Size;
