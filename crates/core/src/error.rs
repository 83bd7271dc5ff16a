//! The JSON error shape of errors made by the sidecar itself (not by an upstream app):
//! `{"id":"pillion.registry","code":404,"detail":"...","status":"Not Found"}`, the shape
//! micro's errors have, so existing micro clients can decode them.

use http::{header, Response, StatusCode};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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
        res
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
            serde_json::json!({"id":"pillion.registry","code":404,"detail":"no service foo","status":"Not Found"})
        );
    }
}
