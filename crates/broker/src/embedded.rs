//! The embedded broker: in-process fan-out, and fan-out to the other sidecars that
//! have subscribers, found through the registry.
//!
//! Each sidecar with subscribers registers itself as a node of the service
//! `pillion.broker`, with its subscriptions (pattern and queue group) in the node's
//! metadata, and keeps that up to date as subscribers come and go. A publish delivers to local plain subscribers,
//! sends the message on to every other sidecar with a matching plain subscriber, and
//! for each matching queue group picks one sidecar among those that have members (this
//! one included), so each message reaches one member of a group across all sidecars.
//!
//! Delivery is at-most-once: a sidecar that cannot be reached, or a subscriber too slow
//! to keep up, loses the message (logged, and counted as dropped).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use pillion_core::url::encode_component;
use pillion_core::{Node, Service};
use pillion_http::pool::Outgoing;
use pillion_http::Client;
use pillion_registry::{Catalog, Registry};

use crate::hub::{Hub, Scope};
use crate::metrics::BrokerMetrics;
use crate::{Broker, BrokerError, Message, Subscription};

/// The registry service every embedded broker registers under.
pub const SERVICE: &str = "pillion.broker";
const METADATA_KEY: &str = "subscriptions";
const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);

pub struct EmbeddedBroker {
    hub: Arc<Hub>,
    registry: Arc<dyn Registry>,
    node: Node,
    client: Client,
    /// The other sidecars' subscriptions, parsed once per catalog (publishes read it).
    peers: Mutex<(Option<Arc<Catalog>>, Arc<Peers>)>,
    metrics: Arc<BrokerMetrics>,
    advertiser: tokio::task::JoinHandle<()>,
}

/// The subscriptions a sidecar advertises: (pattern, queue group).
type Advertised = Vec<(String, Option<String>)>;
/// Other sidecars' addresses and subscriptions.
type Peers = Vec<(String, Advertised)>;

impl EmbeddedBroker {
    /// Starts the broker; `advertise` is the `host:port` of this sidecar's API, where
    /// other sidecars send messages. Must be called within a tokio runtime.
    pub fn new(
        registry: Arc<dyn Registry>,
        advertise: String,
        metrics: Arc<BrokerMetrics>,
    ) -> Arc<EmbeddedBroker> {
        let hub = Hub::new();
        let node = Node {
            id: format!("broker-{}", pillion_core::id::uuid_v4()),
            address: advertise,
            ..Node::default()
        };
        let advertiser = tokio::spawn(advertise_loop(hub.clone(), registry.clone(), node.clone()));
        Arc::new(EmbeddedBroker {
            hub,
            registry,
            node,
            client: Client::new(Default::default(), FORWARD_TIMEOUT),
            peers: Mutex::new((None, Arc::default())),
            metrics,
            advertiser,
        })
    }

    /// Delivers a message another sidecar sent here, to the local subscribers in
    /// `scope` only (never sent on again).
    pub fn deliver_local(&self, topic: &str, message: &Message, scope: &Scope) {
        let out = self.hub.deliver(topic, message, scope);
        self.metrics.delivered(topic, out.delivered);
        self.metrics.dropped(topic, out.dropped);
    }

    /// The other sidecars' subscriptions, from the registry.
    fn peers(&self) -> Arc<Peers> {
        let catalog = self.registry.catalog();
        let mut cache = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if cache.0.as_ref().is_some_and(|c| Arc::ptr_eq(c, &catalog)) {
            return cache.1.clone();
        }
        let parsed: Peers = catalog
            .get(SERVICE)
            .unwrap_or_default()
            .iter()
            .flat_map(|s| s.nodes.iter())
            .filter(|n| n.id != self.node.id)
            .filter_map(|n| {
                let subs = n.metadata.get(METADATA_KEY)?;
                let subs: Advertised = serde_json::from_str(subs).ok()?;
                Some((n.endpoint(), subs))
            })
            .collect();
        *cache = (Some(catalog), Arc::new(parsed));
        cache.1.clone()
    }

    async fn forward(&self, authority: String, topic: String, message: Bytes, scope: Scope) {
        // Topics and groups are the user's: encoded, so `&`, `=`, `#` or `"` in them
        // cannot cut or add parameters.
        let mut url = format!(
            "http://{authority}/broker/deliver?topic={}&plain={}",
            encode_component(&topic),
            scope.plain
        );
        if let Some(groups) = &scope.groups {
            url.push_str("&groups=");
            url.push_str(&encode_component(&groups.join(",")));
        }
        let req = Request::builder()
            .method(Method::POST)
            .uri(url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Outgoing::full(message));
        let sent = match req {
            Ok(req) => self.client.fetch(req, FORWARD_TIMEOUT).await,
            Err(e) => Err(pillion_http::client::ClientError::BadUrl(e.to_string())),
        };
        let ok = matches!(&sent, Ok((status, _)) if status.is_success());
        if !ok {
            self.metrics.dropped(&topic, 1);
            let why = match sent {
                Err(e) => pillion_http::describe(&e),
                Ok((status, _)) => format!("answered {status}"),
            };
            tracing::warn!(%topic, sidecar = %authority, why, "message not delivered to another sidecar (at-most-once)");
        }
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        self.advertiser.abort();
    }
}

/// Keeps this sidecar's registration (and its advertised subscriptions) current.
async fn advertise_loop(hub: Arc<Hub>, registry: Arc<dyn Registry>, node: Node) {
    let mut changes = hub.generation.subscribe();
    let mut last: Option<Advertised> = None;
    loop {
        let subs = hub.subscriptions();
        if last.as_ref() != Some(&subs) {
            let mut node = node.clone();
            node.metadata.insert(
                METADATA_KEY.into(),
                serde_json::to_string(&subs).expect("subscriptions serialize"),
            );
            let service = Service {
                name: SERVICE.into(),
                nodes: vec![node],
                ..Service::default()
            };
            // A sidecar without subscribers stays out of the registry.
            let done = if subs.is_empty() {
                registry.deregister(&service).await.map(|_| ())
            } else {
                registry.register(&service, None).await
            };
            match done {
                Ok(()) => last = Some(subs),
                Err(e) => {
                    tracing::warn!(error = %e, "could not advertise broker subscriptions; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
        }
        // Coalesce bursts of subscribe/unsubscribe into one registration.
        if changes.changed().await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        changes.borrow_and_update();
    }
}

#[async_trait::async_trait]
impl Broker for EmbeddedBroker {
    /// Accepted means: queued for the local subscribers and on its way to the other
    /// sidecars that want it (at-most-once).
    async fn publish(&self, topic: &str, message: Message) -> Result<(), BrokerError> {
        self.metrics.published(topic);
        let peers = self.peers();
        // Queue groups: one sidecar per group, among all that have members.
        let mut chosen: BTreeMap<String, Option<String>> = BTreeMap::new();
        let mut candidates: BTreeMap<String, Vec<Option<String>>> = BTreeMap::new();
        for g in self.hub.groups_for(topic) {
            candidates.entry(g).or_default().push(None);
        }
        for (authority, subs) in peers.iter() {
            let groups: BTreeSet<&String> = subs
                .iter()
                .filter(|(p, q)| q.is_some() && crate::topic::matches(p, topic))
                .filter_map(|(_, q)| q.as_ref())
                .collect();
            for g in groups {
                candidates
                    .entry(g.clone())
                    .or_default()
                    .push(Some(authority.clone()));
            }
        }
        for (group, sidecars) in candidates {
            let pick = crate::pick(sidecars.len());
            chosen.insert(group, sidecars[pick].clone());
        }
        let local_groups: Vec<String> = chosen
            .iter()
            .filter(|(_, s)| s.is_none())
            .map(|(g, _)| g.clone())
            .collect();
        self.deliver_local(
            topic,
            &message,
            &Scope {
                plain: true,
                groups: Some(local_groups),
            },
        );

        let encoded = Bytes::from(message.to_json());
        for (authority, subs) in peers.iter() {
            let plain = subs
                .iter()
                .any(|(p, q)| q.is_none() && crate::topic::matches(p, topic));
            let groups: Vec<String> = chosen
                .iter()
                .filter(|(_, s)| s.as_deref() == Some(authority.as_str()))
                .map(|(g, _)| g.clone())
                .collect();
            if !plain && groups.is_empty() {
                continue;
            }
            let scope = Scope {
                plain,
                groups: Some(groups),
            };
            // Sequential per publish keeps the order of messages to each sidecar.
            self.forward(authority.clone(), topic.to_string(), encoded.clone(), scope)
                .await;
        }
        Ok(())
    }

    async fn subscribe(
        &self,
        pattern: &str,
        queue: Option<&str>,
        buffer: usize,
    ) -> Result<Subscription, BrokerError> {
        let sub = self.hub.subscribe(pattern, queue, buffer);
        // Give the advertisement a moment, so a publish on another sidecar right after
        // this returns finds it (best effort: at-most-once either way).
        let mut tries = 0;
        while tries < 50 && !self.advertised(pattern, queue) {
            tokio::time::sleep(Duration::from_millis(10)).await;
            tries += 1;
        }
        Ok(sub)
    }

    fn backend(&self) -> String {
        "embedded".into()
    }

    fn healthy(&self) -> bool {
        true
    }

    async fn close(&self) {
        self.advertiser.abort();
        let service = Service {
            name: SERVICE.into(),
            nodes: vec![self.node.clone()],
            ..Service::default()
        };
        let _ = self.registry.deregister(&service).await;
    }
}

impl EmbeddedBroker {
    /// Whether the registry shows this sidecar with the subscription.
    fn advertised(&self, pattern: &str, queue: Option<&str>) -> bool {
        let catalog = self.registry.catalog();
        catalog
            .get(SERVICE)
            .into_iter()
            .flatten()
            .flat_map(|s| s.nodes.iter())
            .filter(|n| n.id == self.node.id)
            .filter_map(|n| n.metadata.get(METADATA_KEY))
            .filter_map(|m| serde_json::from_str::<Advertised>(m).ok())
            .any(|subs| {
                subs.iter()
                    .any(|(p, q)| p == pattern && q.as_deref() == queue)
            })
    }
}
