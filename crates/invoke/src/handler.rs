//! The HTTP surface of invocation:
//!
//! - `--handler rpc` (default): `POST /{path}` is mapped by the micro table to a
//!   service and method and sent as `POST http://{node}/{Method}` (or as JSON-RPC to
//!   a go-micro RPC node, [`crate::jsonrpc`]); a gRPC call keeps its path and goes
//!   as with the proxy handler;
//! - `--handler proxy`: any method on `/{service}/...` goes to a node of the service
//!   with the path unchanged, bodies streamed, websocket upgrades tunnelled;
//! - `POST /rpc` (both handlers): `{"service","method","request","address"?}` as JSON
//!   or form; `endpoint` (go-micro v1's name) may stand for `method`.
//!
//! Callers may set `X-Pillion-Timeout: 2s` (the deadline for the answer's headers),
//! `X-Pillion-Retry: always` (retry even non-idempotent calls on 502/503/504 and
//! resets) and `X-Pillion-Wait: 5s` (wait for a node of a service that has none).
//! They are removed before the call leaves.
//!
//! The call's `traceparent` is kept or started ([`trace::hop`]); only when spans are
//! exported does a call take the [`traced`] path, with its span `call <service>`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::{ready, Either};

use axum::body::Bytes;
use axum::extract::State;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use http::{Request, Response};
use http_body_util::BodyExt;
use pillion_core::error::is_grpc;
use pillion_core::trace::{self, Kind};
use pillion_core::ApiError;
use pillion_http::server::RequestBody;
use serde_json::{Map, Value};

use pillion_http::pool::Outgoing;
use pillion_http::relay::{self, is_upgrade, origin_form, relay, reply, ProxyBody};

use crate::forward::{forward, Call, Tally, ID};
use crate::{jsonrpc, mapping};
use crate::{Handler, Invoker};

pub const TIMEOUT_HEADER: &str = "x-pillion-timeout";
pub const RETRY_HEADER: &str = "x-pillion-retry";
pub const WAIT_HEADER: &str = "x-pillion-wait";
pub const SERVICE_HEADER: &str = "x-pillion-service";
pub const METHOD_HEADER: &str = "x-pillion-method";
/// Marks each sidecar a call went out through; a call that comes back to a sidecar
/// it already went through is a loop (a node registered at the sidecar's own
/// address), answered 508 at once instead of recursing.
pub const HOP_HEADER: &str = "x-pillion-hop";

// The same as header names, for lookups on every call (a `&str` is parsed into a
// name at each lookup).
const TIMEOUT: HeaderName = HeaderName::from_static(TIMEOUT_HEADER);
const RETRY: HeaderName = HeaderName::from_static(RETRY_HEADER);
const WAIT: HeaderName = HeaderName::from_static(WAIT_HEADER);
const HOP: HeaderName = HeaderName::from_static(HOP_HEADER);
const SERVICE: HeaderName = HeaderName::from_static(SERVICE_HEADER);
const METHOD: HeaderName = HeaderName::from_static(METHOD_HEADER);

/// Whether this sidecar already sent the request on (it is looping back).
fn looped(inv: &Invoker, headers: &HeaderMap) -> bool {
    headers.get_all(HOP).iter().any(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|id| id.trim_ascii() == inv.hop.as_bytes())
    })
}

fn loop_detected(inv: &Invoker) -> Response<ProxyBody> {
    bad(
        StatusCode::LOOP_DETECTED,
        format!(
            "loop detected: this call already went out through this sidecar ({}); is a node registered at the sidecar's own address?",
            inv.hop.to_str().unwrap_or_default()
        ),
    )
}

/// Bodies up to this size are read whole before a proxied call, so the call can be
/// retried; larger ones stream and are sent once.
const BUFFER_FOR_RETRY: u64 = 64 * 1024;

/// Headers meant for this sidecar, removed before a call leaves. (A caller's identity
/// headers never got this far: the server removed them.)
const CONTROLS: [HeaderName; 3] = [TIMEOUT, RETRY, WAIT];

fn outbound_headers(headers: HeaderMap, upgrade: bool) -> HeaderMap {
    relay::outbound_headers(headers, upgrade, &CONTROLS)
}

fn bad(status: StatusCode, detail: impl Into<String>) -> Response<ProxyBody> {
    reply(ApiError::new(ID, status, detail))
}

/// `/{service}/{method}` (rpc) or `/{service}/...` (proxy), for a request straight
/// from the server: no router on the way.
///
/// What needs no waiting is checked before any future is made, and a call's futures
/// stay small: every layer that holds a future moves it, and the attempts' future,
/// a couple of kilobytes, is boxed where it is made (see [`finish`]).
pub fn service_call(
    inv: Arc<Invoker>,
    mut req: Request<RequestBody>,
) -> impl Future<Output = Response<ProxyBody>> + Send {
    // Not an async fn: that would hold the request twice and both handlers' futures.
    if looped(&inv, req.headers()) {
        return Either::Left(ready(loop_detected(&inv)));
    }
    // A REST call by name, the name out of the path, under either handler.
    let invoked = req
        .uri()
        .path_and_query()
        .and_then(|pq| mapping::invoke_route(&inv.config.namespace, pq.as_str()));
    if let Some((service, path)) = invoked {
        match path.parse() {
            Ok(uri) => *req.uri_mut() = uri,
            Err(_) => {
                return Either::Left(ready(bad(
                    StatusCode::BAD_REQUEST,
                    format!("{path:?} is not a path the app can be called with"),
                )))
            }
        }
        return Either::Right(Either::Right(proxy(inv, req, Some(service))));
    }
    if matches!(req.uri().path(), "/invoke" | "/invoke/") {
        return Either::Left(ready(bad(
            StatusCode::NOT_FOUND,
            "name the service: /invoke/{service}/{path}",
        )));
    }
    // gRPC keeps its path (`/{package.Service}/{Method}`) under either handler: its
    // first segment names the service, as with the proxy handler.
    match inv.config.handler {
        Handler::Rpc if !is_grpc(req.headers()) => Either::Right(Either::Left(rpc_path(inv, req))),
        Handler::Rpc | Handler::Proxy => Either::Right(Either::Right(proxy(inv, req, None))),
    }
}

fn rpc_path(
    inv: Arc<Invoker>,
    req: Request<RequestBody>,
) -> impl Future<Output = Response<ProxyBody>> + Send {
    let Some(route) = mapping::rpc_route(&inv.config.namespace, req.uri().path()) else {
        return Either::Left(ready(bad(
            StatusCode::NOT_FOUND,
            "no service in the path: call /{service}/{method}",
        )));
    };
    if req.method() != Method::POST {
        return Either::Left(ready(bad(
            StatusCode::METHOD_NOT_ALLOWED,
            format!(
                "the rpc handler takes POST, not {}; run pillion with --handler proxy to pass other methods through",
                req.method()
            ),
        )));
    }
    let (parts, mut body) = req.into_parts();
    let controls = match controls(&parts.headers, &inv.config) {
        Ok(c) => c,
        Err(e) => return Either::Left(ready(reply(e))),
    };
    let uri = match method_uri(&route.method) {
        Ok(u) => u,
        Err(e) => return Either::Left(ready(reply(e))),
    };
    let prepare = move |body: Bytes| {
        let mut headers = outbound_headers(parts.headers, false);
        insert(&mut headers, SERVICE, &route.service);
        insert(&mut headers, METHOD, &route.method);
        Call {
            uri,
            service: route.service,
            method: Method::POST,
            headers,
            body: Outgoing::full(body),
            grpc: false,
            rpc: true,
            pin: None,
            timeout: controls.timeout,
            wait: controls.wait,
            retry_any_method: controls.retry_any,
        }
    };
    let max = inv.config.max_body;
    match body.take_whole() {
        Some(whole) if whole.len() as u64 > max => Either::Left(ready(reply(too_large(max)))),
        Some(whole) => Either::Right(Either::Left(finish(inv, prepare(whole), None))),
        None => Either::Right(Either::Right(Box::pin(async move {
            match read_body(body, max).await {
                Ok(whole) => finish(inv, prepare(whole), None).await,
                Err(e) => reply(e),
            }
        }))),
    }
}

/// `POST /rpc`.
pub async fn rpc_endpoint(
    State(inv): State<Arc<Invoker>>,
    req: Request<axum::body::Body>,
) -> axum::response::Response {
    rpc_call(inv, req).await.map(axum::body::Body::new)
}

async fn rpc_call(inv: Arc<Invoker>, req: Request<axum::body::Body>) -> Response<ProxyBody> {
    if looped(&inv, req.headers()) {
        return loop_detected(&inv);
    }
    let (parts, body) = req.into_parts();
    let (controls, body) = match controls_and_body(&inv, &parts.headers, body).await {
        Ok(c) => c,
        Err(e) => return reply(e),
    };
    let asked = rpc_fields(&body, is_form(&parts.headers)).and_then(|f| rpc_request(&f));
    let RpcRequest {
        service,
        method,
        request,
        address,
    } = match asked {
        Ok(asked) => asked,
        Err(e) => return reply(e),
    };
    let uri = match method_uri(&method) {
        Ok(u) => u,
        Err(e) => return reply(e),
    };
    let mut headers = outbound_headers(parts.headers, false);
    headers.remove(header::CONTENT_LENGTH);
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    insert(&mut headers, SERVICE, &service);
    insert(&mut headers, METHOD, &method);
    let call = Call {
        uri,
        service,
        method: Method::POST,
        headers,
        body: Outgoing::full(request),
        grpc: false,
        rpc: true,
        pin: address,
        timeout: controls.timeout,
        wait: controls.wait,
        retry_any_method: controls.retry_any,
    };
    finish(inv, call, None).await
}

/// What a call to `POST /rpc` asks for.
#[derive(Debug, PartialEq)]
struct RpcRequest {
    service: String,
    method: String,
    /// The method's request: a JSON value's text, or a string's content.
    request: Bytes,
    /// The node to call, by address or id.
    address: Option<String>,
}

/// Whether a body is a form (`application/x-www-form-urlencoded`), not JSON.
fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/x-www-form-urlencoded"))
}

/// The fields of `/rpc`'s body, a JSON object or a `form`, their keys lower-cased
/// (micro's clients send `Service` or `service`), each given once.
fn rpc_fields(body: &[u8], form: bool) -> Result<Map<String, Value>, ApiError> {
    let entries = if form {
        let pairs = std::str::from_utf8(body)
            .map_err(|_| "the form body is not UTF-8".to_string())
            .and_then(|text| pillion_core::url::decode_pairs(text).map_err(|e| e.to_string()));
        match pairs {
            Ok(pairs) => pairs
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect(),
            Err(e) => return Err(invalid(format!("form body: {e}"))),
        }
    } else {
        match pillion_core::json::parse(body) {
            Ok(Value::Object(m)) => m,
            Ok(_) => {
                return Err(invalid(
                    "expected a JSON object {\"service\",\"method\",\"request\"}".into(),
                ))
            }
            Err(e) => {
                return Err(invalid(format!(
                    "{e}; expected {{\"service\",\"method\",\"request\"}}"
                )))
            }
        }
    };
    pillion_core::json::fold_keys(entries, "").map_err(|e| invalid(e.to_string()))
}

/// What `/rpc`'s fields ask for: `service`, `method` (or `endpoint`), `request`
/// (absent or null: none) and `address` (a node's address or id).
fn rpc_request(fields: &Map<String, Value>) -> Result<RpcRequest, ApiError> {
    let text = |name: &str| {
        fields
            .get(name)
            .and_then(Value::as_str)
            .map(str::to_string)
            .filter(|s| !s.is_empty())
    };
    // `endpoint` is go-micro v1's name for the method; micro v1.0's `/rpc`
    // (`internal/handler/rpc.go`) reads either. Two different ones are a mistake, not
    // a silent pick.
    let method = match (text("method"), text("endpoint")) {
        (Some(method), Some(endpoint)) if method != endpoint => {
            return Err(invalid(format!(
                "method {method:?} and endpoint {endpoint:?} differ: endpoint is another \
                 name for method; give one of them"
            )))
        }
        (method, endpoint) => method.or(endpoint),
    };
    let (Some(service), Some(method)) = (text("service"), method) else {
        return Err(invalid("service and method (or endpoint) are required, e.g. {\"service\":\"greeter\",\"method\":\"Greeter.Hello\",\"request\":{}}".into()));
    };
    let request = match fields.get("request") {
        None | Some(Value::Null) => Bytes::new(),
        Some(Value::String(s)) => Bytes::from(s.clone()),
        Some(v) => Bytes::from(v.to_string()),
    };
    Ok(RpcRequest {
        service,
        method,
        request,
        address: text("address"),
    })
}

/// A call passed through as it came, to `named` or to the service the path's first
/// segment names.
fn proxy(
    inv: Arc<Invoker>,
    mut req: Request<RequestBody>,
    named: Option<String>,
) -> impl Future<Output = Response<ProxyBody>> + Send {
    let service = named.or_else(|| mapping::proxy_service(&inv.config.namespace, req.uri().path()));
    let Some(service) = service else {
        return Either::Left(ready(bad(
            StatusCode::NOT_FOUND,
            "no service in the path: call /{service}/...",
        )));
    };
    let controls = match controls(req.headers(), &inv.config) {
        Ok(c) => c,
        Err(e) => return Either::Left(ready(reply(e))),
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let max = inv.config.max_body;
    if declared.is_some_and(|n| n > max) {
        return Either::Left(ready(reply(too_large(max))));
    }
    let upgrade = is_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
    let upgrading = upgrade.is_some();
    let (parts, mut body) = req.into_parts();
    let prepare = move |body: Outgoing| Call {
        service,
        method: parts.method.clone(),
        uri: origin_form(parts.uri),
        grpc: is_grpc(&parts.headers),
        rpc: false,
        headers: outbound_headers(parts.headers, upgrading),
        body,
        pin: None,
        timeout: controls.timeout,
        wait: controls.wait,
        retry_any_method: controls.retry_any,
    };
    // A body that came whole with its head (or none) is sent as it is, and can be
    // sent again; a small one still on its way is read first, for the same; a
    // larger one streams, sent once.
    let body = match body.take_whole() {
        Some(whole) => Outgoing::full(whole),
        None if declared.is_some_and(|n| n <= BUFFER_FOR_RETRY) => {
            return Either::Right(Either::Right(Box::pin(async move {
                match read_body(body, max).await {
                    Ok(whole) => finish(inv, prepare(Outgoing::full(whole)), upgrade).await,
                    Err(e) => reply(e),
                }
            })));
        }
        None => Outgoing::Stream(http_body_util::Limited::new(body, max as usize), None),
    };
    Either::Right(Either::Left(finish(inv, prepare(body), upgrade)))
}

/// Forwards the call and turns the node's response into ours.
fn finish(
    inv: Arc<Invoker>,
    mut call: Call,
    upgrade: Option<hyper::upgrade::OnUpgrade>,
) -> impl Future<Output = Response<ProxyBody>> + Send {
    // Not an async fn: that would keep the call twice.
    call.headers.append(HOP, inv.hop.clone());
    let Some(span) = trace::hop(&mut call.headers) else {
        let limit = inv.config.max_body;
        // Boxed here, where it is made: copied once, and every layer above holds
        // and moves only the box.
        let forwarding = Box::pin(forward(inv, call, None));
        return Either::Left(async move {
            let res = match forwarding.await {
                Ok(res) => res,
                Err(e) => return reply(e),
            };
            answer(res, upgrade, limit).await
        });
    };
    // Boxed: only when spans are exported.
    Either::Right(Box::pin(traced(inv, call, upgrade, span)))
}

/// [`finish`] with a span (only when spans are exported): `call <service>`, a
/// client span from the call's start to the answer's headers.
async fn traced(
    inv: Arc<Invoker>,
    call: Call,
    upgrade: Option<hyper::upgrade::OnUpgrade>,
    mut span: trace::Hop,
) -> Response<ProxyBody> {
    let name = format!("call {}", call.service);
    span.set("http.request.method", call.method.as_str());
    span.set("url.path", call.uri.path());
    span.set("pillion.service", call.service.as_str());
    let mut tally = Tally::default();
    let limit = inv.config.max_body;
    let result = forward(inv, call, Some(&mut tally)).await;
    if let Some(node) = &tally.node {
        span.set("server.address", node.authority.as_str());
        span.set("pillion.node", node.id.as_str());
    }
    span.set("pillion.retries", tally.retries as i64);
    span.end_with(name, Kind::Client, &result);
    match result {
        Ok(res) => answer(res, upgrade, limit).await,
        Err(e) => reply(e),
    }
}

/// The node's answer as the caller's: relayed, or unwrapped when it answers a
/// JSON-RPC request (boxed: rare, and its future is large).
async fn answer(
    res: Response<pillion_http::pool::PooledBody>,
    upgrade: Option<hyper::upgrade::OnUpgrade>,
    limit: u64,
) -> Response<ProxyBody> {
    if let Some(enveloped) = res.extensions().get::<jsonrpc::Enveloped>().copied() {
        return Box::pin(jsonrpc::answer(res, limit, enveloped.deadline)).await;
    }
    tokio::task::yield_now().await;
    relay(res, upgrade)
}

/// The caller's controls and the whole body, for calls whose body is read before
/// they are sent (rpc).
async fn controls_and_body<B>(
    inv: &Invoker,
    headers: &HeaderMap,
    body: B,
) -> Result<(Controls, Bytes), ApiError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<pillion_http::BoxError>,
{
    let controls = controls(headers, &inv.config)?;
    let body = read_body(body, inv.config.max_body).await?;
    Ok((controls, body))
}

/// What the caller asked of this call, with the sidecar's defaults.
#[derive(Clone, Copy)]
struct Controls {
    timeout: Duration,
    retry_any: bool,
    wait: Duration,
}

/// Reads `X-Pillion-Timeout`, `X-Pillion-Retry` and `X-Pillion-Wait`.
fn controls(headers: &HeaderMap, config: &crate::Config) -> Result<Controls, ApiError> {
    let duration =
        |name: &HeaderName, shown: &str, zero_ok: bool| -> Result<Option<Duration>, ApiError> {
            let Some(v) = headers.get(name) else {
                return Ok(None);
            };
            match v.to_str().ok().map(pillion_core::duration::parse) {
                Some(Ok(d)) if zero_ok || !d.is_zero() => Ok(Some(d)),
                Some(Ok(_)) => Err(invalid(format!("{shown} must be more than 0"))),
                Some(Err(e)) => Err(invalid(format!("{shown}: {e}"))),
                None => Err(invalid(format!("{shown} is not text"))),
            }
        };
    let timeout = duration(&TIMEOUT, "X-Pillion-Timeout", false)?.unwrap_or(config.timeout);
    let wait = duration(&WAIT, "X-Pillion-Wait", true)?.unwrap_or(config.wait_for_node);
    let retry_any = match headers.get(RETRY).map(|v| v.to_str().unwrap_or("")) {
        None => false,
        Some(v) if v.eq_ignore_ascii_case("always") => true,
        Some(v) => {
            return Err(invalid(format!(
                "X-Pillion-Retry: {v:?} is not understood; the only value is \"always\""
            )))
        }
    };
    Ok(Controls {
        timeout,
        retry_any,
        wait,
    })
}

fn invalid(detail: String) -> ApiError {
    ApiError::new(ID, StatusCode::BAD_REQUEST, detail)
}

fn too_large(limit: u64) -> ApiError {
    ApiError::new(
        ID,
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "request body is larger than {} (--max-body-size)",
            pillion_core::size::format(limit)
        ),
    )
}

async fn read_body<B>(body: B, limit: u64) -> Result<Bytes, ApiError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<pillion_http::BoxError>,
{
    match http_body_util::Limited::new(body, limit as usize)
        .collect()
        .await
    {
        Ok(c) => Ok(c.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(too_large(limit))
        }
        Err(e) => Err(invalid(format!("reading the request body: {e}"))),
    }
}

/// `/{Method}`, the path an rpc call is sent to.
fn method_uri(method: &str) -> Result<http::Uri, ApiError> {
    format!("/{method}")
        .parse()
        .map_err(|_| invalid(format!("method {method:?} cannot be part of a URL path")))
}

fn insert(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(name, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `/rpc` makes of `body`: the call it asks for, or the error's status and
    /// detail.
    fn asked(body: &str, form: bool) -> Result<RpcRequest, (u16, String)> {
        rpc_fields(body.as_bytes(), form)
            .and_then(|f| rpc_request(&f))
            .map_err(|e| (e.code, e.detail))
    }

    fn request(service: &str, method: &str, request: &str, address: Option<&str>) -> RpcRequest {
        RpcRequest {
            service: service.into(),
            method: method.into(),
            request: Bytes::copy_from_slice(request.as_bytes()),
            address: address.map(str::to_string),
        }
    }

    #[test]
    fn rpc_takes_json_or_a_form_with_keys_in_any_case() {
        let table = [
            (
                r#"{"service":"greeter","method":"Say.Hello","request":{"name":"John"}}"#,
                false,
                request("greeter", "Say.Hello", r#"{"name":"John"}"#, None),
            ),
            (
                r#"{"Service":"greeter","Endpoint":"Say.Hello","Request":"as it is","Address":"10.0.0.1:80"}"#,
                false,
                request("greeter", "Say.Hello", "as it is", Some("10.0.0.1:80")),
            ),
            (
                r#"{"service":"greeter","method":"Say.Hello","endpoint":"Say.Hello","request":null}"#,
                false,
                request("greeter", "Say.Hello", "", None),
            ),
            (
                r#"{"service":"greeter","method":"Say.Hello","request":[1,2],"address":""}"#,
                false,
                request("greeter", "Say.Hello", "[1,2]", None),
            ),
            (
                "service=greeter&Method=Say.Hello&request=%7B%22name%22%3A1%7D",
                true,
                request("greeter", "Say.Hello", r#"{"name":1}"#, None),
            ),
            (
                "service=greeter&endpoint=Say.Hello",
                true,
                request("greeter", "Say.Hello", "", None),
            ),
        ];
        for (body, form, want) in table {
            assert_eq!(asked(body, form), Ok(want), "{body}");
        }
    }

    #[test]
    fn rpc_refuses_what_it_cannot_call_and_says_what_it_takes() {
        let required = "service and method (or endpoint) are required, e.g. {\"service\":\"greeter\",\"method\":\"Greeter.Hello\",\"request\":{}}";
        let table = [
            (r#"{"method":"Say.Hello"}"#, false, required),
            (r#"{"service":"greeter"}"#, false, required),
            (r#"{"service":"","method":"Say.Hello"}"#, false, required),
            (r#"{"service":"greeter","method":7}"#, false, required),
            ("service=greeter", true, required),
            (
                r#"{"service":"greeter","method":"A.B","endpoint":"C.D"}"#,
                false,
                "method \"A.B\" and endpoint \"C.D\" differ: endpoint is another name for method; give one of them",
            ),
            (
                "[1]",
                false,
                "expected a JSON object {\"service\",\"method\",\"request\"}",
            ),
        ];
        for (body, form, detail) in table {
            assert_eq!(asked(body, form), Err((400, detail.to_string())), "{body}");
        }
        // Malformed JSON, keys given twice, a form that is not text.
        for (body, form, end) in [
            (
                "{",
                false,
                "; expected {\"service\",\"method\",\"request\"}",
            ),
            (r#"{"service":"a","Service":"b","method":"M"}"#, false, ""),
            ("service=%ZZ", true, ""),
        ] {
            let Err((400, detail)) = asked(body, form) else {
                panic!("{body}: not a 400")
            };
            assert!(detail.ends_with(end), "{body}: {detail}");
        }
        let not_utf8 = rpc_fields(b"service=\xff", true).unwrap_err();
        assert_eq!(not_utf8.detail, "form body: the form body is not UTF-8");
    }

    #[test]
    fn a_form_is_what_its_content_type_says() {
        for (content_type, form) in [
            (Some("application/x-www-form-urlencoded"), true),
            (
                Some("application/x-www-form-urlencoded; charset=utf-8"),
                true,
            ),
            (Some("application/json"), false),
            (None, false),
        ] {
            let mut headers = HeaderMap::new();
            if let Some(ct) = content_type {
                headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
            }
            assert_eq!(is_form(&headers), form, "{content_type:?}");
        }
    }
}
