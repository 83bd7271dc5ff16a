//! How an HTTP/1.1 message's body is delimited (RFC 9112 6), decided once for both
//! roles, and the one reader that follows that decision.
//!
//! pillion's server (requests) and client (answers from nodes) read the framing
//! fields with [`Fields`], ask [`Fields::decide`] for the body's [`Framing`], and read
//! the body with a [`BodyReader`]. The roles differ only where RFC 9112 says they do,
//! and each difference is written here:
//! - `Transfer-Encoding` together with `Content-Length`, or in HTTP/1.0: a request is
//!   refused (the shape of a smuggling attempt, as Envoy refuses it); an answer is
//!   read as chunked and its connection closed after it (6.1, 6.3).
//! - No length at all: a request has no body; an answer runs until the node closes.
//!
//! Refused in both roles: a coding other than one `chunked` (501 for a request), an
//! empty element in `Transfer-Encoding`, a `Content-Length` that is not digits, and
//! several that differ.

use bytes::{Bytes, BytesMut};
use http::{StatusCode, Version};
use http_body::{Frame, SizeHint};

use super::codec::{content_length, take, BadLength, Chunked, Decoded};

/// Whose message is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// A client's request, read by pillion's server.
    Request,
    /// A node's answer, read by pillion's client.
    Response,
}

/// How a body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    Length(u64),
    Chunked,
    /// Until the connection closes (answers only).
    Close,
}

/// Why a message's framing is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FramingError {
    #[error("an invalid Content-Length {0:?}")]
    InvalidLength(String),
    #[error("different Content-Length values")]
    DifferentLengths,
    #[error("an empty element in Transfer-Encoding")]
    EmptyCoding,
    #[error("the transfer coding {0:?}; only one chunked is supported")]
    Coding(String),
    #[error("both Transfer-Encoding and Content-Length; send one")]
    LengthAndChunked,
    #[error("Transfer-Encoding in HTTP/1.0, which cannot use it")]
    ChunkedInHttp10,
}

impl FramingError {
    /// The status a refused request gets.
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            FramingError::Coding(_) => StatusCode::NOT_IMPLEMENTED,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

/// The framing fields of a head, read one field at a time as it is parsed.
#[derive(Debug, Default)]
pub(crate) struct Fields {
    length: Option<u64>,
    chunked: bool,
}

impl Fields {
    /// Reads the field if it is `Content-Length` or `Transfer-Encoding`; whether it
    /// was one of them.
    pub(crate) fn read(&mut self, name: &[u8], value: &[u8]) -> Result<bool, FramingError> {
        match name.len() {
            14 if name.eq_ignore_ascii_case(b"content-length") => {
                content_length(value, &mut self.length).map_err(|bad| match bad {
                    BadLength::Invalid => {
                        FramingError::InvalidLength(String::from_utf8_lossy(value).into_owned())
                    }
                    BadLength::Differ => FramingError::DifferentLengths,
                })?;
                Ok(true)
            }
            17 if name.eq_ignore_ascii_case(b"transfer-encoding") => {
                for coding in value.split(|&b| b == b',') {
                    let coding = coding.trim_ascii();
                    if coding.is_empty() {
                        return Err(FramingError::EmptyCoding);
                    }
                    // Only `chunked` is undone here, and once: any other coding
                    // would reach the other side undecoded and unlabelled.
                    if !coding.eq_ignore_ascii_case(b"chunked") || self.chunked {
                        return Err(FramingError::Coding(
                            String::from_utf8_lossy(value).into_owned(),
                        ));
                    }
                    self.chunked = true;
                }
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// How the body of a message with these fields is delimited, and whether its
    /// connection must close after it. For an answer, a `Content-Length` beside
    /// chunked framing is not the body's: the caller removes it.
    pub(crate) fn decide(
        &self,
        role: Role,
        version: Version,
    ) -> Result<(Framing, bool), FramingError> {
        let http10 = version != Version::HTTP_11;
        match (self.chunked, self.length, role) {
            (true, Some(_), Role::Request) => Err(FramingError::LengthAndChunked),
            (true, None, Role::Request) if http10 => Err(FramingError::ChunkedInHttp10),
            (true, length, Role::Response) => Ok((Framing::Chunked, length.is_some() || http10)),
            (true, _, Role::Request) => Ok((Framing::Chunked, false)),
            (false, Some(n), _) => Ok((Framing::Length(n), false)),
            (false, None, Role::Request) => Ok((Framing::Length(0), false)),
            (false, None, Role::Response) => Ok((Framing::Close, true)),
        }
    }
}

/// What is left of a body on its connection: the one reader of request bodies
/// (server) and answers (client). It works on the connection's read buffer; its
/// owner reads more into the buffer when it asks, and says when the connection ended.
#[derive(Debug)]
pub(crate) enum BodyReader {
    Length(u64),
    Chunked(Chunked),
    Close,
    Done,
}

/// What the buffer gave.
pub(crate) enum Step {
    /// Body bytes, or the trailers.
    Frame(Frame<Bytes>),
    /// The body is whole; what is left in the buffer is the connection's next message.
    End,
    /// Read more into the buffer, then step again (or [`BodyReader::closed`] if the
    /// connection ended).
    NeedMore,
}

impl BodyReader {
    pub(crate) fn new(framing: Framing) -> BodyReader {
        match framing {
            Framing::Length(0) => BodyReader::Done,
            Framing::Length(n) => BodyReader::Length(n),
            Framing::Chunked => BodyReader::Chunked(Chunked::Size),
            Framing::Close => BodyReader::Close,
        }
    }

    /// Takes what the buffer holds of the body.
    pub(crate) fn step(&mut self, buf: &mut BytesMut) -> Result<Step, String> {
        let step = match self {
            BodyReader::Done | BodyReader::Length(0) => Step::End,
            BodyReader::Length(_) | BodyReader::Close if buf.is_empty() => Step::NeedMore,
            BodyReader::Length(left) => Step::Frame(Frame::data(take(buf, left))),
            BodyReader::Close => Step::Frame(Frame::data(buf.split().freeze())),
            BodyReader::Chunked(state) => match state.decode(buf)? {
                Decoded::Frame(f) => Step::Frame(f),
                Decoded::End => Step::End,
                Decoded::NeedMore => Step::NeedMore,
            },
        };
        if let Step::End = step {
            *self = BodyReader::Done;
        }
        Ok(step)
    }

    /// The connection ended with the buffer empty: the body's end if the close
    /// delimits it, else it was cut short.
    pub(crate) fn closed(&mut self) -> Result<(), &'static str> {
        match self {
            BodyReader::Close | BodyReader::Done | BodyReader::Length(0) => {
                *self = BodyReader::Done;
                Ok(())
            }
            _ => Err("the connection closed before the body ended"),
        }
    }

    /// Whether nothing of the body is left to read.
    pub(crate) fn is_end(&self) -> bool {
        matches!(
            self,
            BodyReader::Done | BodyReader::Length(0) | BodyReader::Chunked(Chunked::Done)
        )
    }

    pub(crate) fn size_hint(&self) -> SizeHint {
        match self {
            BodyReader::Done => SizeHint::with_exact(0),
            BodyReader::Length(n) => SizeHint::with_exact(*n),
            BodyReader::Chunked(_) | BodyReader::Close => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decide(
        fields: &[(&str, &str)],
        role: Role,
        version: Version,
    ) -> Result<(Framing, bool), FramingError> {
        let mut f = Fields::default();
        for (k, v) in fields {
            f.read(k.as_bytes(), v.as_bytes())?;
        }
        f.decide(role, version)
    }

    #[test]
    fn both_roles_frame_by_one_table() {
        use Framing::*;
        use Role::*;
        let v11 = Version::HTTP_11;
        let v10 = Version::HTTP_10;
        let te = ("transfer-encoding", "chunked");
        let cl = ("content-length", "5");
        for (fields, role, version, want) in [
            (vec![cl], Request, v11, Ok((Length(5), false))),
            (vec![cl], Response, v11, Ok((Length(5), false))),
            (vec![], Request, v11, Ok((Length(0), false))),
            (vec![], Response, v11, Ok((Close, true))),
            (vec![te], Request, v11, Ok((Chunked, false))),
            (vec![te], Response, v11, Ok((Chunked, false))),
            (
                vec![te, cl],
                Request,
                v11,
                Err(FramingError::LengthAndChunked),
            ),
            (vec![te, cl], Response, v11, Ok((Chunked, true))),
            (vec![te], Request, v10, Err(FramingError::ChunkedInHttp10)),
            (vec![te], Response, v10, Ok((Chunked, true))),
            (
                vec![("content-length", "5"), ("content-length", "5")],
                Request,
                v11,
                Ok((Length(5), false)),
            ),
            (
                vec![("content-length", "5"), ("content-length", "6")],
                Response,
                v11,
                Err(FramingError::DifferentLengths),
            ),
            (
                vec![("content-length", "+5")],
                Request,
                v11,
                Err(FramingError::InvalidLength("+5".into())),
            ),
            (
                vec![("transfer-encoding", "gzip, chunked")],
                Request,
                v11,
                Err(FramingError::Coding("gzip, chunked".into())),
            ),
            (
                vec![("transfer-encoding", "gzip")],
                Response,
                v11,
                Err(FramingError::Coding("gzip".into())),
            ),
            (
                vec![te, te],
                Response,
                v11,
                Err(FramingError::Coding("chunked".into())),
            ),
            (
                vec![("transfer-encoding", "chunked,")],
                Request,
                v11,
                Err(FramingError::EmptyCoding),
            ),
        ] {
            assert_eq!(
                decide(&fields, role, version),
                want,
                "{fields:?} {role:?} {version:?}"
            );
        }
        assert_eq!(FramingError::Coding("gzip".into()).status(), 501);
        assert_eq!(FramingError::EmptyCoding.status(), 400);
    }

    #[test]
    fn the_reader_takes_its_body_and_leaves_the_next_message() {
        let mut buf = BytesMut::from(&b"helloGET /next"[..]);
        let mut body = BodyReader::new(Framing::Length(5));
        assert!(
            matches!(body.step(&mut buf), Ok(Step::Frame(f)) if f.data_ref().unwrap() == "hello")
        );
        assert!(matches!(body.step(&mut buf), Ok(Step::End)));
        assert_eq!(&buf[..], b"GET /next");
        assert!(body.is_end());

        let mut body = BodyReader::new(Framing::Length(5));
        let mut buf = BytesMut::from(&b"hel"[..]);
        assert!(matches!(body.step(&mut buf), Ok(Step::Frame(_))));
        assert!(matches!(body.step(&mut buf), Ok(Step::NeedMore)));
        assert!(body.closed().is_err(), "cut short");

        let mut body = BodyReader::new(Framing::Close);
        assert!(matches!(
            body.step(&mut BytesMut::new()),
            Ok(Step::NeedMore)
        ));
        assert!(body.closed().is_ok(), "the close ends it");
        assert!(body.is_end());
    }
}
