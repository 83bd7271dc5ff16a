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

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method, Request};
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

/// Starts one delivery task per route.
pub fn start(
    broker: Arc<dyn Broker>,
    routes: Vec<PushRoute>,
    app: String,
    queue: String,
    metrics: Arc<BrokerMetrics>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let client = Arc::new(Client::new(Default::default(), Duration::from_secs(1)));
    routes
        .into_iter()
        .map(|route| {
            tokio::spawn(run(
                broker.clone(),
                route,
                app.clone(),
                client.clone(),
                queue.clone(),
                metrics.clone(),
            ))
        })
        .collect()
}

async fn run(
    broker: Arc<dyn Broker>,
    route: PushRoute,
    app: String,
    client: Arc<Client>,
    queue: String,
    metrics: Arc<BrokerMetrics>,
) {
    loop {
        let mut sub = match broker.subscribe(&route.topic, Some(&queue), 64).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(topic = %route.topic, error = %e, "push subscription failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        tracing::info!(topic = %route.topic, app = %app, path = %route.path, "pushing messages to the app");
        while let Some(delivery) = sub.next().await {
            handle(&client, &app, &route, delivery, &metrics).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
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
    let req = req
        .body(Outgoing::full(delivery.message.body.clone()))
        .map_err(|e| e.to_string())?;
    // The whole answer is read, so the connection can be reused.
    let (status, _) = client
        .fetch(req, TIMEOUT)
        .await
        .map_err(|e| pillion_http::describe(&e))?;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("the app answered {status}"))
    }
}
