//! pillion's own HTTP/1.1, both ways, spoken on the task that needs it.
//!
//! - [`client`]: to a node. The caller's task writes the request and reads the answer;
//!   the response body, polled by whoever relays it, reads the rest and puts the
//!   connection back in its pool.
//! - [`server`]: on a listener's connections. The connection's task parses each
//!   request head once, in its read buffer, calls the handler, and writes the answer;
//!   what it does not serve itself (h2c, and the one upgrade request it has checked)
//!   it hands to hyper with the bytes it has read.
//! - [`framing`]: how a body is delimited, decided once for both roles, and the one
//!   body reader both use.
//! - [`codec`]: what both share besides: header fields that share the buffer they
//!   were read from, chunked decoding, and the writer that frames and counts a body.

pub mod client;
pub(crate) mod codec;
pub(crate) mod framing;
pub(crate) mod server;

pub(crate) use client::send;
pub use client::{Conn, ResponseBody, Upgraded};
