//! go-micro's RPC, as micro's sidecar called nodes "using the go-micro RPC client":
//! a call by service and method (`/{service}/{method}`, `/rpc`) to a node registered
//! with `protocol=jsonrpc` or go-micro's `mucp` (or any node without a protocol, with
//! `--rpc-codec jsonrpc`) goes as go-micro's HTTP transport sent it
//! (`transport/http_transport.go`): `POST /` with the JSON-RPC request of go-micro's
//! codec (`codec/jsonrpc/client.go`) as the body,
//!
//! ```text
//! {"method":"Say.Hello","params":[{"name":"John"}],"id":7}
//! ```
//!
//! and the answer's `result` is what the caller gets, as micro's `/rpc` unwrapped it.
//! An `error` becomes micro's error JSON: a string that is a go-micro error keeps its
//! code, any other string is a 500 (micro's "error during request: ..."), and a
//! JSON-RPC 2.0 error object is mapped by its code (method not found: 404, invalid
//! params: 400, the node not understanding the request: 502, others: 500).
//!
//! proto-rpc (`application/protobuf`, `application/proto-rpc`) is not spoken: such a
//! call is a 415 that says to send JSON.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use pillion_core::ApiError;
use pillion_http::pool::{Outgoing, PooledBody};
use pillion_http::relay::{reply, ProxyBody};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::endpoints::Dialect;
use crate::forward::ID;

/// Marks a node's answer to a JSON-RPC request: the handler unwraps it
/// ([`answer`]) before the caller sees it.
#[derive(Debug, Clone, Copy)]
pub struct Enveloped {
    /// The call's deadline, for reading the answer's body.
    pub deadline: Instant,
}

/// go-micro v1's server reads the service and method from these (v0's from the body).
const MICRO_SERVICE: HeaderName = HeaderName::from_static("micro-service");
const MICRO_ENDPOINT: HeaderName = HeaderName::from_static("micro-endpoint");
const MICRO_METHOD: HeaderName = HeaderName::from_static("micro-method");
/// go-micro's client sends its timeout in nanoseconds; its server takes it as the
/// handler's deadline.
const TIMEOUT: HeaderName = HeaderName::from_static("timeout");

fn error(status: StatusCode, detail: String) -> ApiError {
    ApiError::new(ID, status, detail)
}

/// The JSON-RPC request for a call of `method` on `service` with the caller's
/// `body` (a JSON value; empty is `null`, as micro sent a missing request), to be
/// sent to a node as `POST /`. `headers` are the caller's, sent on as go-micro sent
/// the caller's metadata.
pub fn request(
    service: &str,
    method: &str,
    dialect: Dialect,
    mut headers: HeaderMap,
    body: &Bytes,
    timeout: Duration,
) -> Result<Request<Outgoing>, ApiError> {
    check_content_type(&headers)?;
    let envelope = envelope(method, body)?;
    let content_type = HeaderValue::from_static(match dialect {
        Dialect::JsonRpc => "application/json",
        Dialect::Mucp => "application/json-rpc",
    });
    headers.remove(header::CONTENT_LENGTH);
    headers.insert(header::CONTENT_TYPE, content_type.clone());
    headers.insert(header::ACCEPT, content_type);
    headers.insert(TIMEOUT, HeaderValue::from(timeout.as_nanos() as u64));
    if dialect == Dialect::Mucp {
        for (name, value) in [
            (MICRO_SERVICE, service),
            (MICRO_ENDPOINT, method),
            (MICRO_METHOD, method),
        ] {
            if let Ok(value) = HeaderValue::from_str(value) {
                headers.insert(name, value);
            }
        }
    }
    let mut req = Request::new(Outgoing::full(envelope));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = http::Uri::from_static("/");
    *req.headers_mut() = headers;
    Ok(req)
}

/// JSON (`application/json`, go-micro's `application/json-rpc`) or none.
fn check_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(given) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let given = given.to_str().unwrap_or("");
    let essence = given.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("application/json")
        || essence.eq_ignore_ascii_case("application/json-rpc")
    {
        return Ok(());
    }
    Err(error(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        format!(
            "the node speaks go-micro's JSON-RPC, and pillion sends it JSON only: send the request as \
             Content-Type: application/json, not {given:?} (proto-rpc is not supported)"
        ),
    ))
}

/// `{"method":M,"params":[BODY],"id":N}`, with `BODY` checked to be one JSON value
/// (spliced in as it came, so that numbers keep every digit).
fn envelope(method: &str, body: &Bytes) -> Result<Bytes, ApiError> {
    static NEXT_ID: AtomicU64 = AtomicU64::new(1);
    let params: &[u8] = if body.trim_ascii().is_empty() {
        b"null"
    } else {
        serde_json::from_slice::<serde::de::IgnoredAny>(body).map_err(|e| {
            error(
                StatusCode::BAD_REQUEST,
                format!("the request is not JSON ({e}); a JSON-RPC node takes a JSON request"),
            )
        })?;
        body
    };
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let mut out = Vec::with_capacity(params.len() + method.len() + 48);
    out.extend_from_slice(b"{\"method\":");
    serde_json::to_writer(&mut out, method).expect("a string serializes");
    out.extend_from_slice(b",\"params\":[");
    out.extend_from_slice(params);
    out.extend_from_slice(b"],\"id\":");
    out.extend_from_slice(id.to_string().as_bytes());
    out.push(b'}');
    Ok(Bytes::from(out))
}

/// A JSON-RPC 2.0 error object.
#[derive(Deserialize)]
struct ErrorObject<'a> {
    code: i64,
    #[serde(default)]
    message: String,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

/// A go-micro error (`errors.Error`), as its server puts it in a JSON-RPC `error`.
#[derive(Deserialize)]
struct MicroError {
    code: u16,
}

/// The caller's answer from a node's answer to a JSON-RPC request: its `result`
/// (200, `application/json`), or its `error` as micro's error JSON. The body is read
/// whole, up to `limit` bytes and until the call's deadline.
pub async fn answer(
    res: Response<PooledBody>,
    limit: u64,
    deadline: Instant,
) -> Response<ProxyBody> {
    let status = res.status();
    let read = http_body_util::Limited::new(res.into_body(), limit as usize).collect();
    let body = match tokio::time::timeout_at(deadline.into(), read).await {
        Ok(Ok(body)) => body.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return reply(error(
                StatusCode::BAD_GATEWAY,
                format!(
                    "the node's JSON-RPC answer is larger than {} (--max-body-size)",
                    pillion_core::size::format(limit)
                ),
            ))
        }
        Ok(Err(e)) => {
            return reply(error(
                StatusCode::BAD_GATEWAY,
                format!("the node's JSON-RPC answer broke off: {e}"),
            ))
        }
        Err(_) => {
            return reply(error(
                StatusCode::GATEWAY_TIMEOUT,
                "the node's JSON-RPC answer did not arrive whole before the call's deadline"
                    .to_string(),
            ))
        }
    };
    match unwrap(status, &body) {
        Ok(result) => json(StatusCode::OK, result),
        Err(Refused::Micro(code, text)) => json(code, Bytes::from(text)),
        Err(Refused::Pillion(e)) => reply(e),
    }
}

/// Why an answer is not a result.
#[derive(Debug)]
enum Refused {
    /// A go-micro error, sent on as it came.
    Micro(StatusCode, String),
    Pillion(ApiError),
}

fn unwrap(status: StatusCode, body: &[u8]) -> Result<Bytes, Refused> {
    let shown = || snippet(body);
    if status != StatusCode::OK {
        return Err(Refused::Pillion(error(
            StatusCode::BAD_GATEWAY,
            format!(
                "the node answered the JSON-RPC request with {status}, not 200: {}",
                shown()
            ),
        )));
    }
    let not_a_reply = |why: String| {
        Refused::Pillion(error(
            StatusCode::BAD_GATEWAY,
            format!(
                "the node's answer is not a JSON-RPC response ({why}): {}",
                shown()
            ),
        ))
    };
    if body.trim_ascii_start().first() != Some(&b'{') {
        return Err(not_a_reply("not a JSON object".into()));
    }
    // 1.0 (go-micro's, Go's `net/rpc/jsonrpc`: `error` a string or null) or 2.0
    // (`error` an object, or absent).
    let reply: BTreeMap<String, &RawValue> =
        serde_json::from_slice(body).map_err(|e| not_a_reply(e.to_string()))?;
    let field = |name: &str| reply.get(name).copied().filter(|v| v.get() != "null");
    if let Some(raw) = field("error") {
        return Err(refusal(raw));
    }
    if !reply.contains_key("result") {
        return Err(not_a_reply("it has neither result nor error".into()));
    }
    Ok(Bytes::copy_from_slice(
        field("result").map_or("null", RawValue::get).as_bytes(),
    ))
}

/// A JSON-RPC `error` as the caller's answer.
fn refusal(raw: &RawValue) -> Refused {
    if let Ok(text) = serde_json::from_str::<String>(raw.get()) {
        // A go-micro server's error is its errors.Error as JSON: kept, with its code.
        if let Ok(micro) = serde_json::from_str::<MicroError>(&text) {
            if let Ok(code) = StatusCode::from_u16(micro.code) {
                if code.is_client_error() || code.is_server_error() {
                    return Refused::Micro(code, text);
                }
            }
        }
        return Refused::Pillion(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("error during request: {text}"),
        ));
    }
    if let Ok(object) = serde_json::from_str::<ErrorObject>(raw.get()) {
        let status = match object.code {
            -32601 => StatusCode::NOT_FOUND,
            -32602 => StatusCode::BAD_REQUEST,
            // The node did not understand the request pillion made.
            -32700 | -32600 => StatusCode::BAD_GATEWAY,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let data = object
            .data
            .map(|d| format!(" ({})", d.get()))
            .unwrap_or_default();
        return Refused::Pillion(error(
            status,
            format!(
                "the node answered JSON-RPC error {}: {}{data}",
                object.code, object.message
            ),
        ));
    }
    Refused::Pillion(error(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("error during request: {}", raw.get()),
    ))
}

fn json(status: StatusCode, body: Bytes) -> Response<ProxyBody> {
    let mut res = Response::new(http_body_util::Either::Right(Full::new(body)));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}

/// The start of a body, for an error message.
fn snippet(body: &[u8]) -> String {
    // Only the start is decoded: a body can be as large as --max-body-size.
    const MAX: usize = 200;
    let start = String::from_utf8_lossy(&body[..body.len().min(MAX * 4)]);
    pillion_core::error::quoted(&start, MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(method: &str, body: &str) -> serde_json::Value {
        let bytes = envelope(method, &Bytes::from(body.to_string())).unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[test]
    fn the_envelope_is_go_micro_s() {
        let v = sent("Say.Hello", r#"{"name":"John"}"#);
        assert_eq!(v["method"], "Say.Hello");
        assert_eq!(v["params"], serde_json::json!([{"name":"John"}]));
        assert!(v["id"].as_u64().is_some(), "{v}");
        // No request is a null parameter, as micro sent it.
        assert_eq!(sent("A.B", "")["params"], serde_json::json!([null]));
        // Numbers keep their digits; a method is escaped.
        let raw = envelope(
            "A\"B",
            &Bytes::from_static(b"123456789012345678901234567890"),
        )
        .unwrap();
        let text = std::str::from_utf8(&raw).unwrap();
        assert!(text.contains("[123456789012345678901234567890]"), "{text}");
        assert!(text.starts_with(r#"{"method":"A\"B""#), "{text}");
    }

    #[test]
    fn a_body_that_is_not_one_json_value_is_refused_not_spliced() {
        for body in [
            r#"{"a":1"#,
            r#"1],"method":"Other.Method"#,
            "{} {}",
            "not json",
        ] {
            let e = envelope("A.B", &Bytes::from(body)).unwrap_err();
            assert_eq!(e.code, 400, "{body}");
            assert!(e.detail.contains("not JSON"), "{}", e.detail);
        }
    }

    #[test]
    fn proto_rpc_is_a_415_that_says_to_send_json() {
        for ct in [
            "application/protobuf",
            "application/proto-rpc",
            "text/plain",
        ] {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
            let e = check_content_type(&h).unwrap_err();
            assert_eq!(e.code, 415);
            assert!(e.detail.contains("application/json"), "{}", e.detail);
        }
        for ct in [
            "application/json",
            "application/json; charset=utf-8",
            "application/json-rpc",
        ] {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
            check_content_type(&h).unwrap();
        }
        check_content_type(&HeaderMap::new()).unwrap();
    }

    fn status_of(r: Result<Bytes, Refused>) -> u16 {
        match r {
            Ok(_) => 200,
            Err(Refused::Micro(s, _)) => s.as_u16(),
            Err(Refused::Pillion(e)) => e.code,
        }
    }

    #[test]
    fn results_are_unwrapped_and_errors_mapped() {
        let ok = |b: &str| unwrap(StatusCode::OK, b.as_bytes());
        assert_eq!(
            ok(r#"{"id":1,"result":{"msg":"hi"},"error":null}"#).unwrap(),
            Bytes::from_static(br#"{"msg":"hi"}"#)
        );
        assert_eq!(
            ok(r#"{"jsonrpc":"2.0","id":1,"result":"hello John"}"#).unwrap(),
            "\"hello John\""
        );
        assert_eq!(
            ok(r#"{"id":1,"result":null,"error":null}"#).unwrap(),
            "null"
        );
        let cases = [
            (r#"{"id":1,"result":null,"error":"boom"}"#, 500),
            (
                r#"{"id":1,"result":null,"error":"{\"id\":\"go.micro.srv.x\",\"code\":404,\"detail\":\"no such user\",\"status\":\"Not Found\"}"}"#,
                404,
            ),
            (
                r#"{"id":1,"error":{"code":-32601,"message":"Method not found"}}"#,
                404,
            ),
            (
                r#"{"id":1,"error":{"code":-32602,"message":"Invalid params"}}"#,
                400,
            ),
            (
                r#"{"id":1,"error":{"code":-32600,"message":"Invalid Request"}}"#,
                502,
            ),
            (
                r#"{"id":1,"error":{"code":-32000,"message":"Server error","data":{"x":1}}}"#,
                500,
            ),
            (r#"{"id":1,"error":42}"#, 500),
            ("<html>", 502),
            ("[1,2]", 502),
            (r#"{"method":"POST","path":"/"}"#, 502),
        ];
        for (body, want) in cases {
            assert_eq!(status_of(ok(body)), want, "{body}");
        }
        assert_eq!(
            status_of(unwrap(StatusCode::NOT_FOUND, b"404 page not found")),
            502
        );
        match ok(r#"{"id":1,"error":"boom"}"#) {
            Err(Refused::Pillion(e)) => assert_eq!(e.detail, "error during request: boom"),
            other => panic!("{other:?}"),
        }
        match ok(r#"{"id":1,"error":{"code":-32000,"message":"Server error","data":{"x":1}}}"#) {
            Err(Refused::Pillion(e)) => {
                assert_eq!(
                    e.detail,
                    r#"the node answered JSON-RPC error -32000: Server error ({"x":1})"#
                )
            }
            other => panic!("{other:?}"),
        }
    }
}
