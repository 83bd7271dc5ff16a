//! pillion's one HTTP layer: every HTTP connection the sidecar makes or accepts goes
//! through this crate.
//!
//! - [`pool`]: keep-alive connections per node (HTTP/1.1 and h2c), idle expiry, a cap
//!   on open connections, and [`pool::Outgoing`], a request body that is whole
//!   (replayable) or a stream (sent once).
//! - [`h1`]: pillion's own HTTP/1.1, both ways: the client, spoken on the caller's
//!   task, and the server side of every listener, on the connection's task.
//! - [`http2`]: the HTTP/2 client to nodes (h2c, and h2 in the mesh), on `h2`
//!   directly: a request is sent and answered on the caller's task.
//! - [`error`]: [`SendError`], why a send failed: whose fault it was, and whether the
//!   node may have seen the request. Policy code matches on it, never on text.
//! - [`relay`]: hop-by-hop header removal and the upgrade tunnel.
//! - [`client`]: one-shot requests to a URL (health checks, etcd, peer sidecars) over
//!   the same pools.
//! - [`server`]: the accept loop of every listener: HTTP/1.1 by [`h1`], HTTP/2 and
//!   the one upgrade request `h1` hands over by hyper; header-, body-read and idle
//!   timeouts, a bound on open connections (the longest-idle closed to make room),
//!   graceful drain.
//! - [`stream`]: a connection to a node, plain or TLS (mTLS in the mesh), and the
//!   [`stream::Connector`] that makes the TLS ones.
//! - [`tls`]: HTTPS certificates for listeners, from files that are followed; a
//!   renewal is checked with [`x509`] (its names, its validity) before it is served.
//! - [`drain`]: the drain primitive that every connection registers with.
//!
//! It knows nothing of services, sessions or the registry: those crates use it.
#![forbid(unsafe_code)]

pub mod client;
pub mod drain;
pub mod error;
pub mod h1;
pub mod http2;
mod idle;
pub mod pool;
pub mod relay;
pub mod server;
pub mod stream;
#[cfg(test)]
mod testing;
pub mod tls;
pub mod x509;

pub use client::Client;
pub use error::{Blame, SendError};

/// The error type of request and response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An error with its causes: `outer: inner: root`.
pub fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        src = inner.source();
    }
    s
}

/// Methods whose effect is the same however many times they are sent (RFC 9110 9.2.2):
/// a failed one may be sent again after the node may have seen it.
pub fn idempotent(m: &http::Method) -> bool {
    use http::Method;
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}
