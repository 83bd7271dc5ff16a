//! The NATS adapter.
//!
//! Plain topics use core NATS: a publish returns once the server has the message
//! (publish, then a flush that waits for the server's answer), subscribers and queue
//! groups map to NATS subscriptions and queue subscriptions. At-most-once.
//!
//! Topics matching a `--broker-durable` pattern are stored in JetStream, one stream per
//! pattern (`PILLION_<PATTERN>`): a publish returns once JetStream acknowledged it.
//! A queue group on a durable topic is a durable pull consumer named after the group:
//! its members share the messages, a message is delivered again until acknowledged
//! (after `ack_wait`, or sooner when the subscriber asks), and after `max_deliver`
//! deliveries it is published to `{dead_letter_prefix}.{topic}` and dropped from the
//! consumer. Members that were offline get what they missed when they come back.
//!
//! The client reconnects by itself for ever; while NATS is away, publishes fail after
//! a deadline with [`BrokerError::Unavailable`] rather than piling up.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, stream};
use async_nats::{HeaderMap, ServerAddr};
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};

use crate::metrics::BrokerMetrics;
use crate::{Acknowledge, Broker, BrokerError, Delivery, Message, NatsSettings, Subscription};

/// Deadline of a publish (and of stream and consumer set-up).
const DEADLINE: Duration = Duration::from_secs(5);
/// How long [`NatsBroker::connect`] waits for the first connection before it returns
/// anyway (the client goes on trying).
const FIRST_CONNECT_WAIT: Duration = Duration::from_secs(2);

pub struct NatsBroker {
    client: async_nats::Client,
    js: jetstream::Context,
    settings: NatsSettings,
    streams: Mutex<HashSet<String>>,
    backend: String,
    metrics: Arc<BrokerMetrics>,
}

/// Parses `nats://host:port[,host:port...]`, or `tls://...` for servers that must
/// speak TLS.
pub fn parse(url: &str) -> Result<Vec<ServerAddr>, BrokerError> {
    let shown = pillion_core::secret::redact_url(url);
    let (scheme, rest) = url
        .split_once("://")
        .filter(|(s, _)| *s == "nats" || *s == "tls")
        .ok_or_else(|| {
            BrokerError::Invalid(format!(
                "broker URL {shown:?} must start with nats:// (or tls:// for TLS)"
            ))
        })?;
    rest.split(',')
        .map(|host| {
            format!("{scheme}://{}", host.trim())
                .parse::<ServerAddr>()
                .map_err(|e| {
                    BrokerError::Invalid(format!(
                        "broker URL {shown:?}: {e}; write {scheme}://host:port[,host:port]"
                    ))
                })
        })
        .collect()
}

/// Whether `url` names a NATS broker (`nats://` or `tls://`).
pub fn is_nats(url: &str) -> bool {
    url.starts_with("nats://") || url.starts_with("tls://")
}

fn stream_name(pattern: &str) -> String {
    let mut name = String::from("PILLION_");
    for token in pattern.split('.') {
        match token {
            "*" => name.push_str("STAR_"),
            ">" => name.push_str("REST_"),
            t => {
                name.extend(t.chars().map(|c| {
                    if c.is_ascii_alphanumeric() {
                        c.to_ascii_uppercase()
                    } else {
                        '_'
                    }
                }));
                name.push('_');
            }
        }
    }
    name.pop();
    name
}

fn consumer_name(queue: &str, pattern: &str) -> String {
    format!(
        "{queue}_{}",
        stream_name(pattern).trim_start_matches("PILLION_")
    )
}

/// go-micro's `broker.Message` as its NATS broker marshals it (go-micro v1.18.0,
/// `broker/nats/nats.go` with the default JSON codec, `codec/json`): Go's
/// encoding/json of `{Header map[string]string; Body []byte}`.
#[derive(serde::Serialize, serde::Deserialize)]
struct GoMicroMessage {
    #[serde(rename = "Header", default)]
    header: Option<std::collections::BTreeMap<String, String>>,
    #[serde(rename = "Body", default)]
    body: Option<String>,
}

/// A message as it goes on the wire: NATS headers and the body, or go-micro's
/// envelope.
fn outgoing(go_micro: bool, message: &Message) -> (HeaderMap, bytes::Bytes) {
    if !go_micro {
        return (to_nats(&message.header), message.body.clone());
    }
    use base64::Engine;
    let envelope = GoMicroMessage {
        header: Some(message.header.clone()),
        body: Some(base64::engine::general_purpose::STANDARD.encode(&message.body)),
    };
    let json = serde_json::to_vec(&envelope).expect("a message serializes");
    (HeaderMap::new(), json.into())
}

/// A message off the wire. With go-micro's envelope, a payload that is not one is
/// delivered as it came (a publisher that is not go-micro's).
fn incoming(go_micro: bool, headers: Option<&HeaderMap>, payload: bytes::Bytes) -> Message {
    if go_micro {
        use base64::Engine;
        if let Ok(m) = serde_json::from_slice::<GoMicroMessage>(&payload) {
            let body = match m.body {
                None => Some(Vec::new()),
                Some(b) => base64::engine::general_purpose::STANDARD.decode(b).ok(),
            };
            if let Some(body) = body {
                return Message {
                    header: m.header.unwrap_or_default(),
                    body: body.into(),
                };
            }
        }
    }
    from_nats(headers, payload)
}

fn to_nats(header: &std::collections::BTreeMap<String, String>) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in header {
        h.insert(k.as_str(), v.as_str());
    }
    h
}

fn from_nats(headers: Option<&HeaderMap>, payload: bytes::Bytes) -> Message {
    let header = headers
        .map(|h| {
            h.iter()
                .filter_map(|(k, vs)| Some((k.to_string(), vs.first()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    Message {
        header,
        body: payload,
    }
}

impl NatsBroker {
    /// Connects in the background: NATS being down at start is not an error, the
    /// client keeps trying, and publishes fail until it is up.
    pub async fn connect(
        url: &str,
        settings: NatsSettings,
        metrics: Arc<BrokerMetrics>,
    ) -> Result<Arc<NatsBroker>, BrokerError> {
        let addrs = parse(url)?;
        let backend = pillion_core::secret::redact_url(url);
        let events_backend = backend.clone();
        // Whether the client is connected, as its events tell it.
        let (connected, mut up) = watch::channel(false);
        let client = async_nats::ConnectOptions::new()
            // tls://: the server's certificate is checked against the system's CAs,
            // or the PEM file named by SSL_CERT_FILE.
            .require_tls(url.starts_with("tls://"))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(2))
            .request_timeout(Some(DEADLINE))
            .event_callback(move |event| {
                let backend = events_backend.clone();
                let connected = connected.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            connected.send_replace(true);
                            tracing::info!(%backend, "broker connected")
                        }
                        async_nats::Event::Disconnected => {
                            connected.send_replace(false);
                            tracing::warn!(%backend, "broker disconnected; reconnecting")
                        }
                        async_nats::Event::SlowConsumer(sid) => tracing::warn!(%backend, sid, "a NATS subscription is too slow; messages were dropped"),
                        other => tracing::debug!(%backend, event = %other, "broker event"),
                    }
                }
            })
            .connect(addrs)
            .await
            .map_err(|e| BrokerError::Unavailable {
                backend: backend.clone(),
                detail: e.to_string(),
            })?;
        // Give a reachable NATS a moment, so the first publishes do not meet a
        // connection still being made; an unreachable one is retried in the background.
        let _ = tokio::time::timeout(FIRST_CONNECT_WAIT, up.wait_for(|c| *c)).await;
        let js = jetstream::new(client.clone());
        Ok(Arc::new(NatsBroker {
            client,
            js,
            settings,
            streams: Mutex::new(HashSet::new()),
            backend,
            metrics,
        }))
    }

    fn unavailable(&self, detail: impl ToString) -> BrokerError {
        BrokerError::Unavailable {
            backend: self.backend.clone(),
            detail: detail.to_string(),
        }
    }

    /// The durable pattern covering `topic_or_pattern`, if any.
    fn durable_for(&self, topic: &str) -> Option<&str> {
        self.settings
            .durable
            .iter()
            .find(|d| crate::topic::matches(d, topic))
            .map(String::as_str)
    }

    async fn ensure_stream(&self, pattern: &str) -> Result<stream::Stream, BrokerError> {
        let name = stream_name(pattern);
        let known = self
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&name);
        let stream = if known {
            tokio::time::timeout(DEADLINE, self.js.get_stream(&name))
                .await
                .map_err(|_| self.unavailable("no answer from JetStream"))?
                .map_err(|e| self.unavailable(e))?
        } else {
            let config = stream::Config {
                name: name.clone(),
                subjects: vec![pattern.to_string()],
                ..Default::default()
            };
            let s = tokio::time::timeout(DEADLINE, self.js.get_or_create_stream(config))
                .await
                .map_err(|_| self.unavailable("no answer from JetStream"))?
                .map_err(|e| self.unavailable(format!("creating stream {name}: {e}")))?;
            self.streams
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(name);
            s
        };
        Ok(stream)
    }

    async fn send(&self, topic: &str, message: &Message) -> Result<(), BrokerError> {
        // While disconnected the client would queue the message and send it after
        // reconnecting, although the caller was told it failed: refuse it instead.
        if !self.healthy() {
            return Err(self.unavailable("not connected to NATS; try again later"));
        }
        let (headers, body) = outgoing(self.settings.go_micro, message);
        if let Some(pattern) = self.durable_for(topic) {
            self.ensure_stream(pattern).await?;
            let stored = async {
                self.js
                    .publish_with_headers(topic.to_string(), headers, body)
                    .await
                    .map_err(|e| self.unavailable(e))?
                    .await
                    .map_err(|e| self.unavailable(e))
            };
            tokio::time::timeout(DEADLINE, stored).await.map_err(|_| {
                self.unavailable("JetStream did not acknowledge the message in time")
            })??;
        } else {
            let sent = async {
                self.client
                    .publish_with_headers(topic.to_string(), headers, body)
                    .await
                    .map_err(|e| self.unavailable(e))?;
                self.client.flush().await.map_err(|e| self.unavailable(e))
            };
            tokio::time::timeout(DEADLINE, sent)
                .await
                .map_err(|_| self.unavailable("NATS did not take the message in time"))??;
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Broker for NatsBroker {
    async fn publish(&self, topic: &str, message: Message) -> Result<(), BrokerError> {
        self.send(topic, &message).await?;
        self.metrics.published(topic);
        Ok(())
    }

    /// Core NATS: every message into the client's buffer, then one flush for all.
    /// JetStream: every message sent, then their acknowledgements awaited in order.
    async fn publish_many(
        &self,
        topic: &str,
        messages: Vec<Message>,
    ) -> Vec<Result<(), BrokerError>> {
        let n = messages.len();
        if !self.healthy() {
            let e = self.unavailable("not connected to NATS; try again later");
            return vec![Err(e); n];
        }
        let results = match self.durable_for(topic) {
            Some(pattern) => {
                if let Err(e) = self.ensure_stream(pattern).await {
                    return vec![Err(e); n];
                }
                let mut acks = Vec::with_capacity(n);
                for m in messages {
                    let (headers, body) = outgoing(self.settings.go_micro, &m);
                    let sent = tokio::time::timeout(
                        DEADLINE,
                        self.js
                            .publish_with_headers(topic.to_string(), headers, body),
                    )
                    .await;
                    acks.push(match sent {
                        Ok(Ok(ack)) => Ok(ack),
                        Ok(Err(e)) => Err(self.unavailable(e)),
                        Err(_) => Err(self.unavailable("NATS did not take the message in time")),
                    });
                }
                let mut out = Vec::with_capacity(n);
                for ack in acks {
                    out.push(match ack {
                        Ok(ack) => match tokio::time::timeout(DEADLINE, ack).await {
                            Ok(Ok(_)) => Ok(()),
                            Ok(Err(e)) => Err(self.unavailable(e)),
                            Err(_) => Err(self
                                .unavailable("JetStream did not acknowledge the message in time")),
                        },
                        Err(e) => Err(e),
                    });
                }
                out
            }
            None => {
                let sent = async {
                    for m in messages {
                        let (headers, body) = outgoing(self.settings.go_micro, &m);
                        self.client
                            .publish_with_headers(topic.to_string(), headers, body)
                            .await
                            .map_err(|e| self.unavailable(e))?;
                    }
                    self.client.flush().await.map_err(|e| self.unavailable(e))
                };
                match tokio::time::timeout(DEADLINE, sent).await {
                    Ok(Ok(())) => vec![Ok(()); n],
                    Ok(Err(e)) => vec![Err(e); n],
                    Err(_) => {
                        vec![Err(self.unavailable("NATS did not take the messages in time")); n]
                    }
                }
            }
        };
        for r in &results {
            if r.is_ok() {
                self.metrics.published(topic);
            }
        }
        results
    }

    async fn subscribe(
        &self,
        pattern: &str,
        queue: Option<&str>,
        buffer: usize,
    ) -> Result<Subscription, BrokerError> {
        let (tx, rx) = mpsc::channel(buffer.max(1));
        let overflowed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let pump = match (self.durable_for(pattern), queue) {
            (Some(durable), Some(queue)) => {
                let stream = self.ensure_stream(durable).await?;
                let name = consumer_name(queue, pattern);
                let config = pull::Config {
                    durable_name: Some(name.clone()),
                    filter_subject: pattern.to_string(),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: self.settings.ack_wait,
                    ..Default::default()
                };
                let consumer =
                    tokio::time::timeout(DEADLINE, stream.get_or_create_consumer(&name, config))
                        .await
                        .map_err(|_| self.unavailable("no answer from JetStream"))?
                        .map_err(|e| self.unavailable(format!("consumer {name}: {e}")))?;
                tokio::spawn(pump_durable(
                    consumer,
                    tx,
                    self.client.clone(),
                    self.settings.clone(),
                    self.metrics.clone(),
                ))
            }
            (_, queue) => {
                let sub = match queue {
                    Some(q) => {
                        self.client
                            .queue_subscribe(pattern.to_string(), q.to_string())
                            .await
                    }
                    None => self.client.subscribe(pattern.to_string()).await,
                }
                .map_err(|e| self.unavailable(e))?;
                // Make sure the server knows the subscription before we return, so a
                // publish right after reaches it.
                let _ = tokio::time::timeout(DEADLINE, self.client.flush()).await;
                tokio::spawn(pump_plain(
                    sub,
                    tx,
                    overflowed.clone(),
                    self.metrics.clone(),
                    self.settings.go_micro,
                ))
            }
        };
        Ok(Subscription::new(
            rx,
            overflowed,
            buffer,
            Box::new(AbortOnDrop(pump)),
        ))
    }

    fn backend(&self) -> String {
        self.backend.clone()
    }

    fn stores(&self, topic: &str) -> bool {
        self.durable_for(topic).is_some()
    }

    fn healthy(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    async fn close(&self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.client.flush()).await;
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn pump_plain(
    mut sub: async_nats::Subscriber,
    tx: mpsc::Sender<Delivery>,
    overflowed: Arc<std::sync::atomic::AtomicBool>,
    metrics: Arc<BrokerMetrics>,
    go_micro: bool,
) {
    while let Some(m) = sub.next().await {
        let topic = m.subject.to_string();
        let message = incoming(go_micro, m.headers.as_ref(), m.payload);
        let delivery = Delivery::new(topic.clone(), message);
        match tx.try_send(delivery) {
            Ok(()) => metrics.delivered(&topic, 1),
            Err(mpsc::error::TrySendError::Full(_)) => {
                overflowed.store(true, std::sync::atomic::Ordering::Relaxed);
                metrics.dropped(&topic, 1);
                return; // dropping `sub` unsubscribes
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return,
        }
    }
}

async fn pump_durable(
    consumer: jetstream::consumer::Consumer<pull::Config>,
    tx: mpsc::Sender<Delivery>,
    client: async_nats::Client,
    settings: NatsSettings,
    metrics: Arc<BrokerMetrics>,
) {
    loop {
        let mut messages = match consumer.messages().await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "durable subscription interrupted; resuming");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        while let Some(next) = messages.next().await {
            let m = match next {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!(error = %e, "durable subscription: transient error");
                    continue;
                }
            };
            let attempt = m.info().map(|i| i.delivered).unwrap_or(1).max(1) as u64;
            let topic = m.subject.to_string();
            if attempt > settings.max_deliver {
                let dead = format!("{}.{topic}", settings.dead_letter_prefix);
                let mut headers = m.headers.clone().unwrap_or_default();
                headers.insert(
                    "Pillion-Dead-Letter-Reason",
                    format!("not acknowledged after {} deliveries", settings.max_deliver).as_str(),
                );
                headers.insert("Pillion-Original-Topic", topic.as_str());
                // A core publish: a stream covering the dead-letter subject stores it too.
                if let Err(e) = client
                    .publish_with_headers(dead.clone(), headers, m.payload.clone())
                    .await
                {
                    tracing::warn!(%topic, error = %e, "could not publish a dead letter; it will be delivered again");
                    continue;
                }
                let _ = client.flush().await;
                tracing::warn!(%topic, dead_letter = %dead, attempts = settings.max_deliver, "message moved to the dead-letter subject");
                metrics.dropped(&topic, 1);
                let _ = m.ack_with(async_nats::jetstream::AckKind::Term).await;
                continue;
            }
            if attempt > 1 {
                metrics.redelivered(&topic);
            }
            let message = incoming(settings.go_micro, m.headers.as_ref(), m.payload.clone());
            let delivery =
                Delivery::durable(topic.clone(), message, attempt, Box::new(JetStreamAck(m)));
            // Back-pressure, not drops: the messages wait in JetStream meanwhile.
            if tx.send(delivery).await.is_err() {
                return;
            }
            metrics.delivered(&topic, 1);
        }
    }
}

/// A JetStream message's acknowledgement, behind the port's [`Acknowledge`].
struct JetStreamAck(async_nats::jetstream::Message);

#[async_trait::async_trait]
impl Acknowledge for JetStreamAck {
    async fn ack(self: Box<Self>) -> Result<(), String> {
        self.0.ack().await.map_err(|e| e.to_string())
    }

    async fn retry_later(self: Box<Self>, delay: Duration) {
        let _ = self
            .0
            .ack_with(async_nats::jetstream::AckKind::Nak(Some(delay)))
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_urls() {
        assert_eq!(stream_name("orders.*"), "PILLION_ORDERS_STAR");
        assert_eq!(stream_name("events.>"), "PILLION_EVENTS_REST");
        assert_eq!(consumer_name("workers", "orders.new"), "workers_ORDERS_NEW");
        assert_eq!(
            parse("nats://127.0.0.1:4222,127.0.0.1:4223").unwrap().len(),
            2
        );
        assert!(parse("http://x:1").is_err());
    }
}
