//! The message broker: apps publish with `POST /broker?topic=T` and subscribe with a
//! websocket (or SSE) on `/broker?topic=T[&queue=Q]`, as with the micro sidecar.
//!
//! - [`Broker`] is the port: publish a [`Message`], subscribe to a topic pattern,
//!   alone or in a queue group (each message to one member of a group, to every plain
//!   subscriber).
//! - [`embedded`] (the default) fans out in process, and to the other sidecars that
//!   have subscribers, found through the registry, on one ordered stream per sidecar
//!   ([`link`] sends, [`intake`] receives, [`frame`] is the wire format): nothing
//!   accepted is lost while both sidecars live.
//! - [`nats`] uses NATS: core NATS for plain topics, JetStream for topics configured
//!   durable (stored, acknowledged, redelivered, dead-lettered after N attempts).
//! - [`hub`]: in-process fan-out with queue groups and bounded buffers, used by the
//!   embedded broker; [`topic`]: subject rules and wildcard matching.
//! - [`api`]: the HTTP surface; [`push`]: delivery to the local app (Dapr style);
//!   [`metrics`]: per-topic counters.
//!
//! A slow subscriber must never make memory grow without bound: its buffer is bounded
//! and it is disconnected with a reason when the buffer is full. Likewise a slow or
//! unreachable sidecar: its queue is bounded and publishers wait, then are refused.
#![forbid(unsafe_code)]

pub mod api;
pub mod embedded;
pub mod frame;
pub mod hub;
mod intake;
pub mod link;
pub mod metrics;
pub mod nats;
pub mod push;
pub mod topic;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// A message, as micro's broker carries it: headers and a body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Message {
    #[serde(rename = "Header", default)]
    pub header: BTreeMap<String, String>,
    #[serde(rename = "Body", with = "base64_body", default)]
    pub body: Bytes,
}

mod base64_body {
    use base64::Engine;
    use bytes::Bytes;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &Bytes, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(b))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .map(Bytes::from)
            .map_err(serde::de::Error::custom)
    }
}

impl Message {
    /// The message as JSON: `{"Header":{...},"Body":"<base64>"}` (subscribers get
    /// [`Delivery::to_json`], which adds the topic).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("message serializes")
    }

    pub fn body_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(&self.body)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    /// The backend cannot take the message or subscription now.
    #[error("broker {backend} is unavailable: {detail}")]
    Unavailable { backend: String, detail: String },
    /// A bad topic, queue or URL.
    #[error("{0}")]
    Invalid(String),
    /// A message too large for the backend.
    #[error("{0}")]
    TooLarge(String),
}

/// How a durable backend learns what became of a delivery. The port knows only this;
/// each adapter implements it for its own message type.
#[async_trait::async_trait]
pub trait Acknowledge: Send + Sync {
    /// The message was handled.
    async fn ack(self: Box<Self>) -> Result<(), String>;
    /// The message was not handled: deliver it again after `delay`.
    async fn retry_later(self: Box<Self>, delay: Duration);
}

/// How a delivery is acknowledged.
enum Ack {
    /// At-most-once: nothing to acknowledge.
    None,
    /// Acknowledged, or not (and then redelivered), to the backend.
    Durable(Box<dyn Acknowledge>),
}

/// One message handed to a subscriber.
pub struct Delivery {
    pub topic: String,
    pub message: Message,
    /// 1 for a first delivery, more for redeliveries (durable topics only).
    pub attempt: u64,
    ack: Ack,
}

/// A delivery as websocket and SSE subscribers get it.
#[derive(Serialize)]
struct Frame<'a> {
    #[serde(rename = "Header")]
    header: &'a BTreeMap<String, String>,
    #[serde(rename = "Body", serialize_with = "base64_ref")]
    body: &'a Bytes,
    #[serde(rename = "Topic")]
    topic: &'a str,
}

fn base64_ref<S: serde::Serializer>(b: &&Bytes, s: S) -> Result<S::Ok, S::Error> {
    base64_body::serialize(b, s)
}

impl Delivery {
    /// The websocket/SSE frame: `{"Header":{...},"Body":"<base64>","Topic":"<topic>"}`,
    /// with the topic the message was published to (a subscriber to `events.todos.*`
    /// tells `events.todos.created` from `events.todos.removed`).
    pub fn to_json(&self) -> String {
        serde_json::to_string(&Frame {
            header: &self.message.header,
            body: &self.message.body,
            topic: &self.topic,
        })
        .expect("a delivery serializes")
    }

    pub fn new(topic: String, message: Message) -> Delivery {
        Delivery {
            topic,
            message,
            attempt: 1,
            ack: Ack::None,
        }
    }

    /// A delivery the backend redelivers until it is acknowledged.
    pub fn durable(
        topic: String,
        message: Message,
        attempt: u64,
        ack: Box<dyn Acknowledge>,
    ) -> Delivery {
        Delivery {
            topic,
            message,
            attempt,
            ack: Ack::Durable(ack),
        }
    }

    /// The message was handled.
    pub async fn ack(self) {
        if let Ack::Durable(m) = self.ack {
            if let Err(e) = m.ack().await {
                tracing::warn!(topic = %self.topic, error = %e, "could not acknowledge a message; it will be delivered again");
            }
        }
    }

    /// The message was not handled: deliver it again after `delay` (durable topics;
    /// a no-op otherwise).
    pub async fn retry_later(self, delay: Duration) {
        if let Ack::Durable(m) = self.ack {
            m.retry_later(delay).await;
        }
    }

    /// Whether the delivery can be redelivered by the backend if not acknowledged.
    pub fn is_durable(&self) -> bool {
        matches!(self.ack, Ack::Durable(_))
    }
}

/// A live subscription. Messages arrive on [`Subscription::next`]; dropping it
/// unsubscribes.
pub struct Subscription {
    rx: mpsc::Receiver<Delivery>,
    overflowed: Arc<AtomicBool>,
    buffer: usize,
    _guard: Box<dyn Send + Sync>,
}

impl Subscription {
    pub fn new(
        rx: mpsc::Receiver<Delivery>,
        overflowed: Arc<AtomicBool>,
        buffer: usize,
        guard: Box<dyn Send + Sync>,
    ) -> Subscription {
        Subscription {
            rx,
            overflowed,
            buffer,
            _guard: guard,
        }
    }

    /// The next message; `None` when the subscription ended (see
    /// [`Subscription::end_reason`]).
    pub async fn next(&mut self) -> Option<Delivery> {
        self.rx.recv().await
    }

    /// The next message if one is waiting.
    pub fn try_next(&mut self) -> Option<Delivery> {
        self.rx.try_recv().ok()
    }

    /// Why the subscription ended, when the broker ended it.
    pub fn end_reason(&self) -> Option<String> {
        self.overflowed.load(Ordering::Relaxed).then(|| {
            format!(
                "slow consumer: {} messages were waiting; reconnect and read faster",
                self.buffer
            )
        })
    }
}

/// The broker port. Adapters pass the same contract suite (`tests/contract.rs`).
#[async_trait::async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Publishes to `topic` (no wildcards). When this returns `Ok`, the backend has
    /// accepted the message (see each adapter for what that means).
    async fn publish(&self, topic: &str, message: Message) -> Result<(), BrokerError>;

    /// Publishes `messages` to `topic` in their order, with one result each, as
    /// [`Broker::publish`] would. An adapter that can confirm several at once (one
    /// flush, JetStream's acknowledgements awaited together) does so.
    async fn publish_many(
        &self,
        topic: &str,
        messages: Vec<Message>,
    ) -> Vec<Result<(), BrokerError>> {
        let mut out = Vec::with_capacity(messages.len());
        for message in messages {
            out.push(self.publish(topic, message).await);
        }
        out
    }

    /// Subscribes to `pattern` (`*` one token, `>` the rest), in queue group `queue`
    /// if given. Each subscriber buffers at most `buffer` messages.
    async fn subscribe(
        &self,
        pattern: &str,
        queue: Option<&str>,
        buffer: usize,
    ) -> Result<Subscription, BrokerError>;

    /// `embedded` or `nats://host:port,...`.
    fn backend(&self) -> String;

    /// Whether the backend is reachable now.
    fn healthy(&self) -> bool;

    /// Whether a message of `topic` that [`Broker::publish`] accepted is stored until
    /// its subscribers acknowledge it (a durable topic on JetStream).
    fn stores(&self, _topic: &str) -> bool {
        false
    }

    /// Graceful shutdown.
    async fn close(&self);
}

/// Settings of the NATS adapter.
#[derive(Debug, Clone)]
pub struct NatsSettings {
    /// Topic patterns stored in JetStream.
    pub durable: Vec<String>,
    /// Deliveries of one message before it goes to the dead-letter subject.
    pub max_deliver: u64,
    /// How long an unacknowledged message waits before redelivery.
    pub ack_wait: Duration,
    /// Dead letters of topic T go to `{prefix}.T`.
    pub dead_letter_prefix: String,
    /// Messages as go-micro's NATS broker sends them: the payload is the JSON of its
    /// `broker.Message` (`{"Header":{...},"Body":"<base64>"}`), not NATS headers and
    /// the bare body.
    pub go_micro: bool,
}

impl Default for NatsSettings {
    fn default() -> Self {
        NatsSettings {
            durable: Vec::new(),
            max_deliver: 5,
            ack_wait: Duration::from_secs(30),
            dead_letter_prefix: "dead-letter".into(),
            go_micro: false,
        }
    }
}

/// Checks a broker URL without connecting: `embedded` or `nats://host:port[,...]`.
pub fn check_url(url: &str) -> Result<(), BrokerError> {
    match url {
        "embedded" => Ok(()),
        u if nats::is_nats(u) => nats::parse(u).map(|_| ()),
        other => Err(BrokerError::Invalid(format!(
            "unknown broker {:?}: use embedded, nats://host:port[,host:port] or tls://host:port",
            pillion_core::secret::redact_url(other)
        ))),
    }
}

/// A random index below `n` (n > 0), for spreading choices.
fn pick(n: usize) -> usize {
    (pillion_core::id::fast_random() % n.max(1) as u64) as usize
}
