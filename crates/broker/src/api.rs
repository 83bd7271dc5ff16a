//! The HTTP surface of the broker, compatible with the micro sidecar's:
//!
//! - `POST /broker?topic=T` publishes the body; the request's headers become the
//!   message's headers (names in `Title-Case`, as micro's Go clients expect), so a
//!   `Timestamp` or `Content-Type` header travels with the message. 200 once the
//!   backend accepted it, 400 for a bad topic, 413 over the size limit, 503 when the
//!   backend is unreachable.
//! - `GET /broker?topic=T[&queue=Q]` as a websocket receives one text frame per
//!   message, `{"Header":{...},"Body":"<base64>","Topic":"<topic>"}` (the topic it was
//!   published to, which a wildcard subscriber needs); frames the client sends are
//!   published to the topic. The sidecar pings every `ping_interval` and closes a
//!   connection that stopped answering, or whose reader is too slow (with the reason).
//! - The same `GET` with `Accept: text/event-stream` streams the messages as
//!   server-sent events, for clients without websockets.
//! - `GET /broker?topic=T&publish=1` as a websocket publishes: each frame the client
//!   sends is one message to `T` (the upgrade request's headers are every message's
//!   headers), and each is answered, in order, by a text frame
//!   `{"seq":N,"status":200}` once the backend accepted it, or
//!   `{"seq":N,"status":4xx|5xx,"id":..,"detail":..}` when it did not: a client can
//!   send many messages without waiting, and knows which were taken.
//! - `GET /broker/deliver` with `Upgrade: pillion-broker/1` takes the stream of
//!   messages another sidecar's embedded broker sends this one ([`crate::intake`]).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{RawQuery, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, StatusCode};
use pillion_core::ApiError;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::embedded::EmbeddedBroker;
use crate::metrics::BrokerMetrics;
use crate::{topic, Broker, BrokerError, Message, Subscription};

const ID: &str = "pillion.broker";
/// Messages a websocket takes from its subscription per write.
const WS_BATCH: usize = 256;

#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Largest message body; larger publishes get 413.
    pub max_message: usize,
    /// Messages a subscriber may have waiting before it is disconnected.
    pub buffer: usize,
    pub ping_interval: Duration,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            max_message: 1 << 20,
            buffer: 1024,
            ping_interval: Duration::from_secs(30),
        }
    }
}

pub struct BrokerApi {
    pub broker: Arc<dyn Broker>,
    /// Set when the broker is the embedded one, to take messages from other sidecars.
    pub embedded: Option<Arc<EmbeddedBroker>>,
    pub config: ApiConfig,
    pub metrics: Arc<BrokerMetrics>,
    /// Cancelled when the sidecar stops: each subscriber and publisher socket is
    /// closed with 1001 "going away", each event stream ends.
    pub stopping: CancellationToken,
    /// The subscriber and publisher sockets, so the sidecar can wait for their ends.
    pub sockets: TaskTracker,
}

/// The close frame's reason when the sidecar stops (with code 1001).
pub const STOPPING: &str = "the sidecar is stopping";

pub fn router(api: Arc<BrokerApi>) -> Router {
    let limit = api.config.max_message;
    Router::new()
        .route("/broker", get(subscribe).post(publish))
        .route("/broker/deliver", axum::routing::any(deliver))
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .with_state(api)
}

fn error(status: StatusCode, detail: impl Into<String>) -> Response {
    ApiError::new(ID, status, detail)
        .into_response()
        .into_response()
}

fn broker_error(e: BrokerError) -> Response {
    broker_api_error(e).into_response().into_response()
}

fn broker_api_error(e: BrokerError) -> ApiError {
    match e {
        BrokerError::Unavailable { .. } => {
            ApiError::new(ID, StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
        BrokerError::Invalid(m) => ApiError::new(ID, StatusCode::BAD_REQUEST, m),
        BrokerError::TooLarge(m) => ApiError::new(ID, StatusCode::PAYLOAD_TOO_LARGE, m),
    }
}

struct TopicQuery {
    topic: Option<String>,
    queue: Option<String>,
    /// `1` (or `true`): the websocket publishes instead of subscribing.
    publish: Option<String>,
}

impl TopicQuery {
    /// Reads `?topic=T&queue=Q&publish=1`; a value that is not UTF-8 once
    /// percent-decoded (`%ff`) is a 400, not a topic with a replacement character.
    fn parse(raw: Option<&str>) -> Result<TopicQuery, ApiError> {
        let query = pillion_core::url::Query::parse(raw).map_err(|e| {
            ApiError::new(ID, StatusCode::BAD_REQUEST, format!("query string: {e}"))
        })?;
        let get = |name: &str| query.get(name).map(str::to_string);
        Ok(TopicQuery {
            topic: get("topic"),
            queue: get("queue"),
            publish: get("publish"),
        })
    }
}

/// Messages of a publishing websocket read before their acknowledgements are written
/// in one flush.
const ACK_BATCH: usize = 256;

/// `content-type` -> `Content-Type`, as Go's canonical header names.
fn canonical(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut upper = true;
    for c in name.chars() {
        out.push(if upper { c.to_ascii_uppercase() } else { c });
        upper = c == '-';
    }
    out
}

const NOT_MESSAGE_HEADERS: [&str; 13] = [
    "host",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-extensions",
    "sec-websocket-protocol",
    "content-length",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "upgrade",
    "expect",
    "proxy-connection",
];

/// The request's headers as the message's: a header given several times keeps every
/// value, joined with `, ` (as Go's `Header.Get` callers of micro expect).
fn message_headers(headers: &HeaderMap) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    for name in headers.keys() {
        if NOT_MESSAGE_HEADERS.contains(&name.as_str()) {
            continue;
        }
        let values: Vec<_> = headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()))
            .collect();
        out.insert(canonical(name.as_str()), values.join(", "));
    }
    out
}

async fn publish(
    State(api): State<Arc<BrokerApi>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let query = match TopicQuery::parse(query.as_deref()) {
        Ok(q) => q,
        Err(e) => return e.into_response().into_response(),
    };
    let topic = query.topic.unwrap_or_default();
    if let Err(e) = topic::check_publish(&topic) {
        return error(StatusCode::BAD_REQUEST, e);
    }
    let body = match body {
        Ok(b) => b,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "message is larger than {} (--broker-max-message-size)",
                    pillion_core::size::format(api.config.max_message as u64)
                ),
            )
        }
        Err(e) => return error(e.status(), e.body_text()),
    };
    let bytes = body.len();
    let message = Message {
        header: message_headers(&headers),
        body,
    };
    match api.broker.publish(&topic, message).await {
        // The acknowledgement: what was accepted, by which backend, and whether it is
        // stored until acknowledged (micro's clients read the status only).
        Ok(()) => Json(serde_json::json!({
            "topic": topic,
            "bytes": bytes,
            "backend": api.broker.backend(),
            "stored": api.broker.stores(&topic),
        }))
        .into_response(),
        Err(e) => broker_error(e),
    }
}

async fn subscribe(
    State(api): State<Arc<BrokerApi>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let query = match TopicQuery::parse(query.as_deref()) {
        Ok(q) => q,
        Err(e) => return e.into_response().into_response(),
    };
    let pattern = query.topic.unwrap_or_default();
    match query.publish.as_deref() {
        None | Some("0" | "false") => {}
        Some("1" | "true") => return open_publisher(api, pattern, &headers, ws),
        Some(other) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("publish={other:?}: give publish=1 to publish over this websocket"),
            )
        }
    }
    if let Err(e) = topic::check_pattern(&pattern) {
        return error(StatusCode::BAD_REQUEST, e);
    }
    if let Some(q) = &query.queue {
        if let Err(e) = topic::check_queue(q) {
            return error(StatusCode::BAD_REQUEST, e);
        }
    }
    let sse = headers
        .get(http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/event-stream"));
    if ws.is_err() && !sse {
        return error(
            StatusCode::BAD_REQUEST,
            "to subscribe, open a websocket on this URL, or send Accept: text/event-stream",
        );
    }
    let sub = match api
        .broker
        .subscribe(&pattern, query.queue.as_deref(), api.config.buffer)
        .await
    {
        Ok(s) => s,
        Err(e) => return broker_error(e),
    };
    let counted = api.metrics.subscriber(&pattern);
    match ws {
        Ok(ws) => {
            let sockets = api.sockets.clone();
            ws.on_upgrade(move |socket| {
                sockets.track_future(async move {
                    serve_websocket(api, socket, sub, pattern).await;
                    drop(counted);
                })
            })
            .into_response()
        }
        Err(_) => serve_sse(sub, counted, api.stopping.clone()).into_response(),
    }
}

async fn serve_websocket(
    api: Arc<BrokerApi>,
    socket: WebSocket,
    mut sub: Subscription,
    pattern: String,
) {
    let (mut tx, mut rx) = socket.split();
    let mut ping = tokio::time::interval(api.config.ping_interval);
    ping.tick().await;
    let mut last_seen = Instant::now();
    let can_publish = topic::check_publish(&pattern).is_ok();
    let close = |code: u16, reason: String| {
        WsMessage::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        }))
    };
    loop {
        tokio::select! {
            delivery = sub.next() => {
                let Some(delivery) = delivery else {
                    let reason = sub.end_reason().unwrap_or_else(|| "subscription ended".into());
                    let _ = tx.send(close(1013, reason)).await;
                    return;
                };
                // What is waiting goes out in one write.
                let mut sent = vec![delivery];
                while sent.len() < WS_BATCH {
                    match sub.try_next() {
                        Some(d) => sent.push(d),
                        None => break,
                    }
                }
                for d in &sent {
                    if tx.feed(WsMessage::Text(d.to_json().into())).await.is_err() {
                        return; // not acknowledged: a durable message comes again
                    }
                }
                if tx.flush().await.is_err() {
                    return;
                }
                for d in sent {
                    d.ack().await;
                }
            }
            frame = rx.next() => {
                last_seen = Instant::now();
                let body = match frame {
                    Some(Ok(WsMessage::Text(t))) => Bytes::from(t),
                    Some(Ok(WsMessage::Binary(b))) => b,
                    Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => return,
                    Some(Ok(_)) => continue, // ping/pong: answered by the library
                };
                if !can_publish {
                    let _ = tx.send(close(1008, format!("cannot publish to the wildcard topic {pattern:?}"))).await;
                    return;
                }
                if body.len() > api.config.max_message {
                    let _ = tx.send(close(1009, "message too large".into())).await;
                    return;
                }
                let message = Message { header: Default::default(), body };
                if let Err(e) = api.broker.publish(&pattern, message).await {
                    let _ = tx.send(close(1011, e.to_string())).await;
                    return;
                }
            }
            _ = api.stopping.cancelled() => {
                let _ = tx.send(close(1001, STOPPING.into())).await;
                return;
            }
            _ = ping.tick() => {
                if last_seen.elapsed() > api.config.ping_interval * 2 {
                    let _ = tx.send(close(1001, "no answer to pings".into())).await;
                    return;
                }
                if tx.send(WsMessage::Ping(Bytes::new())).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// `GET /broker?topic=T&publish=1`: checked before the upgrade, so a bad topic is a
/// plain 400 the client can read.
fn open_publisher(
    api: Arc<BrokerApi>,
    topic: String,
    headers: &HeaderMap,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    if let Err(e) = topic::check_publish(&topic) {
        return error(StatusCode::BAD_REQUEST, e);
    }
    let Ok(ws) = ws else {
        return error(
            StatusCode::BAD_REQUEST,
            "publish=1 takes a websocket; to publish one message, POST it to /broker?topic=T",
        );
    };
    let header = message_headers(headers);
    let sockets = api.sockets.clone();
    ws.max_message_size(api.config.max_message)
        .on_upgrade(move |socket| sockets.track_future(serve_publisher(api, socket, topic, header)))
        .into_response()
}

/// The acknowledgement of message `seq`: its status, and the error's id and detail.
fn ack_frame(seq: u64, result: Result<(), ApiError>) -> WsMessage {
    let text = match result {
        Ok(()) => format!(r#"{{"seq":{seq},"status":200}}"#),
        Err(e) => serde_json::json!({
            "seq": seq, "status": e.code, "id": e.id, "detail": e.detail,
        })
        .to_string(),
    };
    WsMessage::Text(text.into())
}

/// Publishes each frame in the order it came and acknowledges it in that order. The
/// frames already waiting are published together (one flush to NATS for all of them)
/// and their acknowledgements go out in one write.
async fn serve_publisher(
    api: Arc<BrokerApi>,
    socket: WebSocket,
    topic: String,
    header: std::collections::BTreeMap<String, String>,
) {
    use futures_util::FutureExt;
    let (mut tx, mut rx) = socket.split();
    let mut ping = tokio::time::interval(api.config.ping_interval);
    ping.tick().await;
    let mut last_seen = Instant::now();
    let mut seq: u64 = 0;
    loop {
        let frame = tokio::select! {
            frame = rx.next() => frame,
            // Every frame read so far was published and acknowledged.
            _ = api.stopping.cancelled() => {
                let _ = tx.send(close_frame(1001, STOPPING)).await;
                return;
            }
            _ = ping.tick() => {
                if last_seen.elapsed() > api.config.ping_interval * 2 {
                    let _ = tx.send(close_frame(1001, "no answer to pings")).await;
                    return;
                }
                if tx.send(WsMessage::Ping(Bytes::new())).await.is_err() {
                    return;
                }
                continue;
            }
        };
        // This frame and every one already read, up to a batch; what ended the batch
        // early: the client closing, or a frame the library refused.
        let mut bodies = Vec::new();
        let mut closed = false;
        let mut refused = None;
        let mut next = Some(frame);
        last_seen = Instant::now();
        while let Some(frame) = next.take() {
            match frame {
                Some(Ok(WsMessage::Text(t))) => bodies.push(Bytes::from(t)),
                Some(Ok(WsMessage::Binary(b))) => bodies.push(b),
                Some(Ok(WsMessage::Close(_))) | None => {
                    closed = true;
                    break;
                }
                // Over the size limit, or broken.
                Some(Err(e)) => {
                    refused = Some(e.to_string());
                    break;
                }
                Some(Ok(_)) => {} // ping/pong: answered by the library
            }
            if bodies.len() < ACK_BATCH {
                next = rx.next().now_or_never();
            }
        }
        if !bodies.is_empty() {
            let messages = bodies
                .into_iter()
                .map(|body| Message {
                    header: header.clone(),
                    body,
                })
                .collect();
            for result in api.broker.publish_many(&topic, messages).await {
                seq += 1;
                let ack = ack_frame(seq, result.map_err(broker_api_error));
                if tx.feed(ack).await.is_err() {
                    return;
                }
            }
        }
        if let Some(e) = refused {
            seq += 1;
            let detail = format!(
                "message {seq} not taken: {e} (largest message: {}, --broker-max-message-size)",
                pillion_core::size::format(api.config.max_message as u64)
            );
            let refused = ApiError::new(ID, StatusCode::PAYLOAD_TOO_LARGE, detail);
            let _ = tx.feed(ack_frame(seq, Err(refused))).await;
            let _ = tx
                .send(close_frame(1009, "message too large or malformed frame"))
                .await;
            return;
        }
        if tx.flush().await.is_err() || closed {
            return;
        }
    }
}

fn close_frame(code: u16, reason: &str) -> WsMessage {
    WsMessage::Close(Some(CloseFrame {
        code,
        reason: reason.to_string().into(),
    }))
}

fn serve_sse(
    sub: Subscription,
    counted: crate::metrics::Subscriber,
    stopping: CancellationToken,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let state = (sub, counted, stopping);
    let events = futures_util::stream::unfold(state, |(mut sub, counted, stopping)| async move {
        // The stream ends (the response is complete) when the sidecar stops.
        let delivery = tokio::select! {
            delivery = sub.next() => delivery?,
            _ = stopping.cancelled() => return None,
        };
        let event = Event::default().data(delivery.to_json());
        delivery.ack().await;
        Some((Ok(event), (sub, counted, stopping)))
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}

/// Streams opened by other sidecars' embedded brokers.
async fn deliver(State(api): State<Arc<BrokerApi>>, mut req: axum::extract::Request) -> Response {
    let Some(embedded) = &api.embedded else {
        return error(
            StatusCode::NOT_FOUND,
            "this sidecar's broker is not the embedded one",
        );
    };
    match embedded.open_stream(&mut req) {
        Ok(()) => Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(http::header::CONNECTION, "upgrade")
            .header(http::header::UPGRADE, crate::frame::PROTOCOL)
            .body(axum::body::Body::empty())
            .expect("a valid 101"),
        Err((status, detail)) => {
            let mut res = error(status, detail);
            if status == StatusCode::UPGRADE_REQUIRED {
                res.headers_mut().insert(
                    http::header::UPGRADE,
                    http::HeaderValue::from_static(crate::frame::PROTOCOL),
                );
            }
            res
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_names_are_canonical_and_transport_headers_stay_out() {
        assert_eq!(canonical("timestamp"), "Timestamp");
        assert_eq!(canonical("x-request-id"), "X-Request-Id");
        let mut h = HeaderMap::new();
        h.insert("timestamp", "1499951537".parse().unwrap());
        h.insert("content-type", "text/plain".parse().unwrap());
        h.insert("host", "127.0.0.1:8081".parse().unwrap());
        h.insert("content-length", "12".parse().unwrap());
        let m = message_headers(&h);
        assert_eq!(m.keys().collect::<Vec<_>>(), ["Content-Type", "Timestamp"]);
    }

    #[test]
    fn a_repeated_header_keeps_every_value() {
        let mut h = HeaderMap::new();
        h.append("x-tag", "a".parse().unwrap());
        h.append("x-tag", "b".parse().unwrap());
        h.append("x-tag", "c".parse().unwrap());
        assert_eq!(message_headers(&h)["X-Tag"], "a, b, c");
    }
}
