//! The JSON error shape of errors made by the sidecar itself (not by an upstream app):
//!
//! ```json
//! {"id":"pillion.registry","code":404,"detail":"...","status":"Not Found",
//!  "name":"NotFound","message":"...","className":"not-found"}
//! ```
//!
//! micro's fields (`id`, `code`, `detail`, `status`), so micro's clients decode it, and
//! Feathers' (`name`, `message`, `className`, `code`), so a Feathers client raises the
//! matching error class (`NotFound`, `Unavailable`, ...) rather than `[object Object]`.

use http::{header, Response, StatusCode};
use serde::ser::{Serialize, SerializeStruct, Serializer};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// Which part of pillion made the error, e.g. `pillion.registry`.
    pub id: String,
    /// The HTTP status code, repeated in the body for clients that only keep the body.
    pub code: u16,
    /// What went wrong and, where it helps, what to do about it.
    pub detail: String,
    /// The status code's reason phrase.
    pub status: String,
}

impl ApiError {
    pub fn new(id: &str, status: StatusCode, detail: impl Into<String>) -> Self {
        ApiError {
            id: id.to_string(),
            code: status.as_u16(),
            detail: detail.into(),
            status: status.canonical_reason().unwrap_or("").to_string(),
        }
    }

    pub fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// The error as an HTTP response with a JSON body. A refusal of the client (400,
    /// 401, 403, 421) also closes its HTTP/1.1 connection: a client that is refused
    /// does not keep a connection slot, and a request that was misread cannot make
    /// the next one misread too.
    pub fn into_response(self) -> Response<String> {
        let body = serde_json::to_string(&self).expect("error body serializes");
        let mut res = Response::new(body);
        let status = self.status_code();
        *res.status_mut() = status;
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
        if matches!(status.as_u16(), 400 | 401 | 403 | 421) {
            res.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
        }
        // Kept with the response, so that a gRPC caller's answer can be made of it
        // ([`for_grpc`]) wherever the request was refused.
        res.extensions_mut().insert(self);
        res
    }

    /// The error as gRPC answers it: a trailers-only response (200, no body) whose
    /// `grpc-status` says what the HTTP status says ([`grpc_code`]) and whose
    /// `grpc-message` is the detail.
    pub fn into_grpc_response(self) -> Response<String> {
        let mut res = Response::new(String::new());
        let headers = res.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/grpc"),
        );
        headers.insert(
            "grpc-status",
            u16::from(grpc_code(self.status_code())).into(),
        );
        if let Ok(message) = header::HeaderValue::from_str(&grpc_message(&self.detail)) {
            headers.insert("grpc-message", message);
        }
        res
    }
}

/// `value` quoted for an error message, cut after `max` characters so that a huge
/// input is not echoed back.
pub fn quoted(value: &str, max: usize) -> String {
    match value.char_indices().nth(max) {
        Some((end, _)) => format!("{:?}...", &value[..end]),
        None => format!("{value:?}"),
    }
}

/// `content-type: application/grpc`, `application/grpc+proto`, ...: a gRPC call.
pub fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// `res` as a gRPC caller must get it: an error pillion made (an [`ApiError`]'s
/// response) becomes a trailers-only gRPC answer with an `empty` body; anything else
/// (an app's answer) is left as it is.
pub fn for_grpc<B>(res: Response<B>, empty: impl FnOnce() -> B) -> Response<B> {
    match res.extensions().get::<ApiError>() {
        Some(e) => e.clone().into_grpc_response().map(|_| empty()),
        None => res,
    }
}

/// The gRPC status code for an error pillion answers with `status`.
pub fn grpc_code(status: StatusCode) -> u8 {
    const INVALID_ARGUMENT: u8 = 3;
    const DEADLINE_EXCEEDED: u8 = 4;
    const NOT_FOUND: u8 = 5;
    const PERMISSION_DENIED: u8 = 7;
    const RESOURCE_EXHAUSTED: u8 = 8;
    const FAILED_PRECONDITION: u8 = 9;
    const UNIMPLEMENTED: u8 = 12;
    const INTERNAL: u8 = 13;
    const UNAVAILABLE: u8 = 14;
    const UNAUTHENTICATED: u8 = 16;
    match status.as_u16() {
        400 | 415 => INVALID_ARGUMENT,
        401 => UNAUTHENTICATED,
        403 => PERMISSION_DENIED,
        404 => NOT_FOUND,
        405 | 501 => UNIMPLEMENTED,
        408 | 504 => DEADLINE_EXCEEDED,
        413 | 429 => RESOURCE_EXHAUSTED,
        421 | 502 | 503 => UNAVAILABLE,
        508 => FAILED_PRECONDITION,
        _ => INTERNAL,
    }
}

/// gRPC's percent-encoding of `grpc-message`: bytes outside printable ASCII, and
/// `%`, as `%XX`.
fn grpc_message(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Serialize for ApiError {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (name, class) = feathers_class(self.code);
        let mut e = s.serialize_struct("ApiError", 7)?;
        e.serialize_field("id", &self.id)?;
        e.serialize_field("code", &self.code)?;
        e.serialize_field("detail", &self.detail)?;
        e.serialize_field("status", &self.status)?;
        e.serialize_field("name", name)?;
        e.serialize_field("message", &self.detail)?;
        e.serialize_field("className", class)?;
        e.end()
    }
}

/// The Feathers error class (`@feathersjs/errors`) for an HTTP status: its `name`
/// and `className`. A status Feathers has no class for gets the nearest one (a
/// client error `BadRequest`, a gateway timeout `Timeout`, others `GeneralError`).
pub fn feathers_class(code: u16) -> (&'static str, &'static str) {
    match code {
        400 | 413 | 414 | 415 | 421 | 431 => ("BadRequest", "bad-request"),
        401 => ("NotAuthenticated", "not-authenticated"),
        402 => ("PaymentError", "payment-error"),
        403 => ("Forbidden", "forbidden"),
        404 => ("NotFound", "not-found"),
        405 => ("MethodNotAllowed", "method-not-allowed"),
        406 => ("NotAcceptable", "not-acceptable"),
        408 | 504 => ("Timeout", "timeout"),
        409 => ("Conflict", "conflict"),
        410 => ("Gone", "gone"),
        411 => ("LengthRequired", "length-required"),
        422 => ("Unprocessable", "unprocessable"),
        429 => ("TooManyRequests", "too-many-requests"),
        501 => ("NotImplemented", "not-implemented"),
        502 => ("BadGateway", "bad-gateway"),
        503 => ("Unavailable", "unavailable"),
        400..=499 => ("BadRequest", "bad-request"),
        _ => ("GeneralError", "general-error"),
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.code, self.status, self.detail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_has_the_micro_shape() {
        let res = ApiError::new("pillion.registry", StatusCode::NOT_FOUND, "no service foo")
            .into_response();
        assert_eq!(res.status(), StatusCode::NOT_FOUND);
        let v: serde_json::Value = serde_json::from_str(res.body()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "id": "pillion.registry", "code": 404, "detail": "no service foo", "status": "Not Found",
                "name": "NotFound", "message": "no service foo", "className": "not-found",
            })
        );
    }

    #[test]
    fn a_grpc_caller_gets_a_trailers_only_answer_with_a_fitting_code() {
        let e = ApiError::new(
            "pillion.invoke",
            StatusCode::SERVICE_UNAVAILABLE,
            "service \"a\" has no node: 100% gone, café",
        );
        let res = for_grpc(e.into_response(), String::new);
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()["content-type"], "application/grpc");
        assert_eq!(res.headers()["grpc-status"], "14");
        assert_eq!(
            res.headers()["grpc-message"],
            "service \"a\" has no node: 100%25 gone, caf%C3%A9"
        );
        assert!(res.body().is_empty());
        // An app's answer is not touched.
        let app = Response::new("app".to_string());
        assert_eq!(for_grpc(app, String::new).body(), "app");
        for (status, code) in [
            (401, 16),
            (403, 7),
            (404, 5),
            (504, 4),
            (413, 8),
            (502, 14),
            (400, 3),
        ] {
            assert_eq!(
                grpc_code(StatusCode::from_u16(status).unwrap()),
                code,
                "{status}"
            );
        }
    }
}
