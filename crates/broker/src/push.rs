//! Push delivery (Dapr style): pillion subscribes on the app's behalf and POSTs each
//! message of a topic to a path of the local app. A 2xx answer acknowledges it.
//!
//! Otherwise, for a durable topic the message is handed back to JetStream, which
//! delivers it again (and dead-letters it after `max_deliver` tries); for a plain
//! topic pillion tries twice more, backing off, then drops it with a log line and the
//! `dropped` metric.
//!
//! The subscription is in a queue group (`push-<service>`), so when the app runs as
//! several instances, each message goes to one of them.
//!
//! The message's `traceparent` (from the publish's headers) reaches the app
//! ([`trace::hop`]); with an exporter each delivery is a consumer span `push <topic>`.
//!
//! On shutdown ([`Pushes::stop`]) no new message is taken, and a delivery under way
//! is finished (within the grace period) rather than cut off mid-request.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method, Request};
use pillion_core::trace::{self, Kind};
use pillion_http::pool::Outgoing;
use pillion_http::Client;

use crate::metrics::BrokerMetrics;
use crate::{Broker, Delivery};

/// One `topic=/path` mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushRoute {
    pub topic: String,
    pub path: String,
}

impl std::str::FromStr for PushRoute {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (topic, path) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?} is not TOPIC=/path (for example orders.new=/orders)"))?;
        crate::topic::check_pattern(topic)?;
        if !path.starts_with('/') || path.parse::<http::Uri>().is_err() {
            return Err(format!(
                "{s:?}: the path must start with / (for example orders.new=/orders)"
            ));
        }
        Ok(PushRoute {
            topic: topic.to_string(),
            path: path.to_string(),
        })
    }
}

const PLAIN_ATTEMPTS: u32 = 3;
const TIMEOUT: Duration = Duration::from_secs(10);

/// The running delivery tasks, one per route.
pub struct Pushes {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Pushes {
    /// Stops taking messages and waits for deliveries under way, at most `grace`;
    /// what is still running then is cut off (a durable message is redelivered).
    pub async fn stop(mut self, grace: Duration) {
        self.stop.send_replace(true);
        let all = futures_util::future::join_all(self.tasks.iter_mut());
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!("push deliveries still running after the grace period; cut off");
            for task in &self.tasks {
                task.abort();
            }
        }
    }
}

/// Starts one delivery task per route.
pub fn start(
    broker: Arc<dyn Broker>,
    routes: Vec<PushRoute>,
    app: String,
    queue: String,
    metrics: Arc<BrokerMetrics>,
) -> Pushes {
    let client = Arc::new(Client::new(Default::default(), Duration::from_secs(1)));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let tasks = routes
        .into_iter()
        .map(|route| {
            tokio::spawn(run(
                broker.clone(),
                route,
                app.clone(),
                client.clone(),
                queue.clone(),
                metrics.clone(),
                stopped.clone(),
            ))
        })
        .collect();
    Pushes { tasks, stop }
}

async fn run(
    broker: Arc<dyn Broker>,
    route: PushRoute,
    app: String,
    client: Arc<Client>,
    queue: String,
    metrics: Arc<BrokerMetrics>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    while !*stop.borrow() {
        let mut sub = match broker.subscribe(&route.topic, Some(&queue), 64).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(topic = %route.topic, error = %e, "push subscription failed; retrying");
                let _ = tokio::time::timeout(Duration::from_secs(1), stop.changed()).await;
                continue;
            }
        };
        tracing::info!(topic = %route.topic, app = %app, path = %route.path, "pushing messages to the app");
        loop {
            let delivery = tokio::select! {
                d = sub.next() => d,
                _ = stop.changed() => return,
            };
            let Some(delivery) = delivery else { break };
            // Not raced against the stop signal: a delivery under way is finished.
            handle(&client, &app, &route, delivery, &metrics).await;
            if *stop.borrow() {
                return;
            }
        }
        let _ = tokio::time::timeout(Duration::from_millis(200), stop.changed()).await;
    }
}

async fn handle(
    client: &Client,
    app: &str,
    route: &PushRoute,
    delivery: Delivery,
    metrics: &BrokerMetrics,
) {
    let attempts = if delivery.is_durable() {
        1
    } else {
        PLAIN_ATTEMPTS
    };
    let mut last = String::new();
    for attempt in 1..=attempts {
        match post(client, app, route, &delivery).await {
            Ok(()) => {
                delivery.ack().await;
                return;
            }
            Err(e) => last = e,
        }
        if attempt < attempts {
            tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
        }
    }
    if delivery.is_durable() {
        let delay = Duration::from_millis((100 * delivery.attempt).min(5_000));
        tracing::warn!(topic = %delivery.topic, attempt = delivery.attempt, error = %last, "push delivery failed; JetStream will deliver it again");
        delivery.retry_later(delay).await;
    } else {
        tracing::warn!(topic = %delivery.topic, attempts, error = %last, "push delivery failed; message dropped (plain topics are at-most-once)");
        metrics.dropped(&delivery.topic, 1);
    }
}

async fn post(
    client: &Client,
    app: &str,
    route: &PushRoute,
    delivery: &Delivery,
) -> Result<(), String> {
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{app}{}", route.path))
        .header("pillion-topic", delivery.topic.as_str())
        .header("pillion-attempt", delivery.attempt.to_string());
    for (k, v) in &delivery.message.header {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            if k != http::header::HOST && k != http::header::CONTENT_LENGTH {
                req = req.header(k, v);
            }
        }
    }
    let mut req = req
        .body(Outgoing::full(delivery.message.body.clone()))
        .map_err(|e| e.to_string())?;
    // A message's headers are its publisher's; the app trusts identity headers only
    // from pillion.
    pillion_core::remove_identity(req.headers_mut());
    // The publisher's trace goes on to the app: the message kept its `traceparent`.
    let span = trace::hop(req.headers_mut()).map(|mut span| {
        span.set("http.request.method", "POST");
        span.set("url.path", route.path.as_str());
        span.set("messaging.destination.name", delivery.topic.as_str());
        span.set("messaging.delivery.attempt", delivery.attempt as i64);
        span.set("server.address", app);
        span
    });
    // The whole answer is read, so the connection can be reused.
    let result = client
        .fetch(req, TIMEOUT)
        .await
        .map_err(|e| pillion_http::describe(&e));
    if let Some(span) = span {
        let name = format!("push {}", delivery.topic);
        match &result {
            Ok((status, _)) => span.end(name, Kind::Consumer, status.as_u16(), None),
            Err(e) => span.end(name, Kind::Consumer, 502, Some(e.clone())),
        }
    }
    match result? {
        (status, _) if status.is_success() => Ok(()),
        (status, _) => Err(format!("the app answered {status}")),
    }
}
