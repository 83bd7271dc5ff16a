//! Why a send failed, typed: whose fault it was and whether the node may have seen
//! the request. Retries, failure counts and ejection decide on these variants, never
//! on an error's text.

use std::io;
use std::time::Duration;

use crate::BoxError;

/// Whose fault a failed send was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// The caller: its upload broke off, was longer or shorter than it said, or was
    /// over the limit. The node is not to blame and its state must not change.
    Caller,
    /// The node: it refused the connection, closed it, reset it, or answered
    /// something that is not HTTP.
    Node,
    /// pillion itself: out of file descriptors or memory; nobody else is to blame.
    Pillion,
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be made: the node has not seen the request.
    #[error("connect to {authority}: {source}")]
    Connect {
        authority: String,
        #[source]
        source: io::Error,
    },
    #[error("connect to {authority} timed out after {}", pillion_core::duration::format(*.after))]
    ConnectTimeout { authority: String, after: Duration },
    /// pillion could not open a socket (file descriptors exhausted and the like).
    #[error("no socket for {authority}: {source} (pillion is out of resources)")]
    Local {
        authority: String,
        #[source]
        source: io::Error,
    },
    /// The TLS handshake failed (a certificate not trusted, an identity other than
    /// the one expected, a peer that refused ours): the node has not seen the request.
    #[error("TLS handshake with {authority}: {detail}")]
    Tls { authority: String, detail: String },
    /// A new HTTP/2 connection (h2c, or h2 in the mesh) could not take the request:
    /// the node has not seen it.
    #[error("HTTP/2 connection to {authority}: {detail}")]
    Handshake { authority: String, detail: String },
    /// Reading the caller's body failed (the upload broke off).
    #[error("reading the request body: {}", crate::describe(&**.0))]
    CallerBody(BoxError),
    /// The caller's body is larger than the limit.
    #[error("the request body is larger than the limit (--max-body)")]
    BodyTooLarge,
    /// The caller's body did not have the length it declared.
    #[error("the request body had {written} bytes or more, not the {declared} it declared")]
    BodyLength { declared: u64, written: u64 },
    /// Writing to the node failed (it may have answered already).
    #[error("sending the request: {0}")]
    Write(#[source] io::Error),
    /// Reading the node's answer failed.
    #[error("reading the answer: {0}")]
    Read(#[source] io::Error),
    #[error("the node closed the connection before answering")]
    Closed,
    /// The node's answer is not valid HTTP, or frames its body in a way pillion
    /// refuses.
    #[error("{0}")]
    Protocol(String),
    /// An HTTP/2 stream failed.
    #[error("{0}")]
    H2(String),
}

impl SendError {
    pub fn blame(&self) -> Blame {
        match self {
            SendError::CallerBody(_) | SendError::BodyTooLarge | SendError::BodyLength { .. } => {
                Blame::Caller
            }
            SendError::Local { .. } => Blame::Pillion,
            _ => Blame::Node,
        }
    }

    /// The status a caller gets for this failure when it is final: 413 or 400 for
    /// its own, 503 for pillion's, 502 for the node's.
    pub fn status(&self) -> http::StatusCode {
        use http::StatusCode;
        match (self, self.blame()) {
            (SendError::BodyTooLarge, _) => StatusCode::PAYLOAD_TOO_LARGE,
            (_, Blame::Caller) => StatusCode::BAD_REQUEST,
            (_, Blame::Pillion) => StatusCode::SERVICE_UNAVAILABLE,
            (_, Blame::Node) => StatusCode::BAD_GATEWAY,
        }
    }

    /// Whether the node may have seen (part of) the request, so that sending it again
    /// could repeat its effect.
    pub fn may_have_reached_node(&self) -> bool {
        !matches!(
            self,
            SendError::Connect { .. }
                | SendError::ConnectTimeout { .. }
                | SendError::Local { .. }
                | SendError::Handshake { .. }
                | SendError::Tls { .. }
        )
    }

    /// The error reading a caller's body, typed: over the limit or broken off.
    pub fn from_body(e: BoxError) -> SendError {
        let e = match e.downcast::<SendError>() {
            Ok(typed) => return *typed,
            Err(e) => e,
        };
        if e.downcast_ref::<http_body_util::LengthLimitError>()
            .is_some()
        {
            SendError::BodyTooLarge
        } else {
            SendError::CallerBody(e)
        }
    }

    /// A dial error: an fd or memory shortage is pillion's, the rest the node's.
    pub(crate) fn dial(authority: &str, source: io::Error) -> SendError {
        let authority = authority.to_string();
        match source.raw_os_error() {
            Some(errno) if is_resource_shortage(errno) => SendError::Local { authority, source },
            _ => SendError::Connect { authority, source },
        }
    }
}

/// EMFILE, ENFILE, ENOBUFS, ENOMEM on Linux.
fn is_resource_shortage(errno: i32) -> bool {
    matches!(errno, 24 | 23 | 105 | 12)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blame_and_reach_follow_the_variant() {
        let io = || io::Error::from(io::ErrorKind::ConnectionReset);
        let cases: Vec<(SendError, Blame, bool)> = vec![
            (
                SendError::dial("n:1", io::Error::from_raw_os_error(111)),
                Blame::Node,
                false,
            ),
            (
                SendError::dial("n:1", io::Error::from_raw_os_error(24)),
                Blame::Pillion,
                false,
            ),
            (
                SendError::ConnectTimeout {
                    authority: "n:1".into(),
                    after: Duration::from_secs(1),
                },
                Blame::Node,
                false,
            ),
            (SendError::CallerBody("cut".into()), Blame::Caller, true),
            (SendError::BodyTooLarge, Blame::Caller, true),
            (
                SendError::BodyLength {
                    declared: 5,
                    written: 3,
                },
                Blame::Caller,
                true,
            ),
            (SendError::Write(io()), Blame::Node, true),
            (SendError::Read(io()), Blame::Node, true),
            (SendError::Closed, Blame::Node, true),
            (SendError::Protocol("bad".into()), Blame::Node, true),
        ];
        for (e, blame, reached) in cases {
            assert_eq!(e.blame(), blame, "{e}");
            assert_eq!(e.may_have_reached_node(), reached, "{e}");
        }
    }

    #[tokio::test]
    async fn a_limited_body_over_its_limit_is_the_callers_too_large_body() {
        use http_body_util::BodyExt;
        let body = http_body_util::Full::new(bytes::Bytes::from_static(b"abc"));
        let over = http_body_util::Limited::new(body, 1)
            .collect()
            .await
            .unwrap_err();
        assert!(matches!(
            SendError::from_body(over),
            SendError::BodyTooLarge
        ));
        assert!(matches!(
            SendError::from_body("reset".into()),
            SendError::CallerBody(_)
        ));
    }
}
