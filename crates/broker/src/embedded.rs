//! The embedded broker: in-process fan-out, and fan-out to the other sidecars that
//! have subscribers, found through the registry.
//!
//! Each sidecar with subscribers registers itself as a node of the service
//! `pillion.broker`, with its subscriptions (pattern and queue group) in the node's
//! metadata, and keeps that up to date as subscribers come and go. A publish delivers
//! to local plain subscribers, sends the message on to every other sidecar with a
//! matching plain subscriber, and for each matching queue group picks one sidecar
//! among those that have members (this one included), so each message reaches one
//! member of a group across all sidecars.
//!
//! Messages travel to another sidecar on one ordered stream per sidecar
//! ([`crate::link`] sends, [`crate::intake`] receives, [`crate::frame`] is the wire
//! format). While both sidecars live nothing accepted is lost: a broken stream is
//! opened again and what was not acknowledged is sent again (and skipped by the
//! receiver if it had it). A publish waits for room in the queues it joins, and is
//! refused (nothing published) when one stays full. A sidecar that leaves the
//! registry, or restarts as a new node, loses what was queued for it (logged and
//! counted), as does a subscriber too slow to keep up.
//!
//! A subscribe returns once the registry shows this sidecar with the subscription, so
//! a publish on another sidecar right after it finds it; if the registry does not
//! within [`LinkSettings::advertise_wait`], the subscribe is refused, saying why.
//!
//! The broker's tasks (the advertiser, the sweeper, the links and the intake) stop
//! through cancellation tokens and are tracked: [`Broker::close`] waits for each to
//! finish the work in hand (a registration under way, a frame being written, an ack
//! owed) before the next step, each wait with a deadline. Dropping the broker cancels
//! them all without waiting.
//!
//! Only the [`Registry`] port is used (`catalog`, `changes`, `register`), so any
//! registry adapter carries the brokers' addresses.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pillion_core::{Node, Service};
use pillion_registry::{Catalog, Registry};
use tokio::time::{timeout, timeout_at, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::hub::{Hub, Scope};
use crate::intake::Intake;
use crate::link::{LinkSettings, Links, Peer, Refused};
use crate::metrics::BrokerMetrics;
use crate::{frame, Broker, BrokerError, Message, Subscription};

/// The registry service every embedded broker registers under.
pub const SERVICE: &str = "pillion.broker";
const METADATA_KEY: &str = "subscriptions";
/// How long [`Broker::close`] waits for the other sidecars to acknowledge what is
/// queued for them.
const CLOSE_WAIT: Duration = Duration::from_secs(5);
/// How long [`Broker::close`] waits for a task to finish the work in hand once told
/// to stop (a registration, a write: each has its own deadline, shorter or close).
const STOP_WAIT: Duration = Duration::from_secs(5);
/// How soon a registration the registry refused is tried again.
const ADVERTISE_RETRY: Duration = Duration::from_secs(1);

pub struct EmbeddedBroker {
    hub: Arc<Hub>,
    registry: Arc<dyn Registry>,
    node: Node,
    settings: LinkSettings,
    /// The other sidecars' subscriptions, parsed once per catalog (publishes read it).
    peers: Mutex<PeersOf>,
    links: Arc<Links>,
    intake: Arc<Intake>,
    metrics: Arc<BrokerMetrics>,
    /// Why the last advertisement failed (`None` once one succeeds), for a refused
    /// subscribe.
    advertise_error: Arc<Mutex<Option<String>>>,
    /// Cancelled when the broker is closed or dropped: every task's token descends
    /// from it.
    stop: CancellationToken,
    /// The advertiser's and the sweeper's token, cancelled first by [`Broker::close`].
    following: CancellationToken,
    /// The advertiser and the sweeper.
    tasks: TaskTracker,
}

/// The subscriptions a sidecar advertises: (pattern, queue group).
type Advertised = Vec<(String, Option<String>)>;
/// The other sidecars, and the catalog they were read from.
type PeersOf = (Option<Arc<Catalog>>, Arc<Vec<Peer>>);

impl EmbeddedBroker {
    /// Starts the broker; `advertise` is the `host:port` of this sidecar's API, where
    /// other sidecars open their streams. Must be called within a tokio runtime.
    pub fn new(
        registry: Arc<dyn Registry>,
        advertise: String,
        metrics: Arc<BrokerMetrics>,
    ) -> Arc<EmbeddedBroker> {
        Self::with_settings(registry, advertise, metrics, LinkSettings::default())
    }

    /// [`EmbeddedBroker::new`] with the streams' clocks and bounds.
    pub fn with_settings(
        registry: Arc<dyn Registry>,
        advertise: String,
        metrics: Arc<BrokerMetrics>,
        settings: LinkSettings,
    ) -> Arc<EmbeddedBroker> {
        let hub = Hub::new();
        let node = Node {
            id: format!("broker-{}", pillion_core::id::uuid_v4()),
            address: advertise,
            ..Node::default()
        };
        let stop = CancellationToken::new();
        let following = stop.child_token();
        let links = Arc::new(Links::new(
            node.id.clone(),
            settings.clone(),
            metrics.clone(),
            stop.child_token(),
        ));
        let intake = Arc::new(Intake::new(
            node.id.clone(),
            hub.clone(),
            metrics.clone(),
            settings.clone(),
            stop.child_token(),
        ));
        let advertise_error = Arc::new(Mutex::new(None));
        let tasks = TaskTracker::new();
        tasks.spawn(advertise_loop(
            hub.clone(),
            registry.clone(),
            node.clone(),
            advertise_error.clone(),
            following.clone(),
        ));
        tasks.spawn(sweep_loop(
            links.clone(),
            registry.clone(),
            node.id.clone(),
            following.clone(),
        ));
        Arc::new(EmbeddedBroker {
            hub,
            registry,
            node,
            settings,
            peers: Mutex::new((None, Arc::default())),
            links,
            intake,
            metrics,
            advertise_error,
            stop,
            following,
            tasks,
        })
    }

    /// How many of the broker's tasks run (the advertiser, the sweeper, one per link,
    /// one per stream from another sidecar): none once [`Broker::close`] returned.
    pub fn running_tasks(&self) -> usize {
        self.tasks.len() + self.links.running() + self.intake.running()
    }

    /// This sidecar's node id in the registry.
    pub fn node_id(&self) -> &str {
        &self.node.id
    }

    /// Takes a stream another sidecar opens (`GET /broker/deliver` with an upgrade),
    /// or says why not: the status and detail of the error answer. On `Ok`, answer
    /// `101` with `Upgrade: pillion-broker/1`.
    pub fn open_stream<B>(
        &self,
        req: &mut http::Request<B>,
    ) -> Result<(), (http::StatusCode, String)> {
        self.intake.open(req)
    }

    /// Delivers to the local subscribers in `scope` only.
    fn deliver_local(&self, topic: &str, message: &Message, scope: &Scope) {
        let out = self.hub.deliver(topic, message, scope);
        self.metrics.delivered(topic, out.delivered);
        self.metrics.dropped(topic, out.dropped);
    }

    /// The other sidecars' subscriptions, from the registry.
    fn peers(&self) -> Arc<Vec<Peer>> {
        let catalog = self.registry.catalog();
        let mut cache = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if cache.0.as_ref().is_some_and(|c| Arc::ptr_eq(c, &catalog)) {
            return cache.1.clone();
        }
        let mut parsed: Vec<Peer> = nodes(&catalog, &self.node.id)
            .filter_map(|n| {
                let subs = n.metadata.get(METADATA_KEY)?;
                let subs: Advertised = serde_json::from_str(subs).ok()?;
                Some(Peer {
                    node: n.id.clone(),
                    address: n.endpoint(),
                    subs,
                })
            })
            .collect();
        // Room is reserved in this order, so two publishes never wait on each other.
        parsed.sort_by(|a, b| a.node.cmp(&b.node));
        parsed.dedup_by(|a, b| a.node == b.node);
        *cache = (Some(catalog), Arc::new(parsed));
        cache.1.clone()
    }
}

/// The other brokers' nodes in `catalog`.
fn nodes<'a>(catalog: &'a Catalog, own: &'a str) -> impl Iterator<Item = &'a Node> + 'a {
    catalog
        .get(SERVICE)
        .unwrap_or_default()
        .iter()
        .flat_map(|s| s.nodes.iter())
        .filter(move |n| n.id != own)
}

impl Drop for EmbeddedBroker {
    /// Every task is told to stop; none is waited for (see [`Broker::close`]).
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Keeps this sidecar's registration (and its advertised subscriptions) current,
/// until `stop`; a registration under way is finished first.
async fn advertise_loop(
    hub: Arc<Hub>,
    registry: Arc<dyn Registry>,
    node: Node,
    error: Arc<Mutex<Option<String>>>,
    stop: CancellationToken,
) {
    let mut changes = hub.generation.subscribe();
    let mut last: Option<Advertised> = None;
    let set_error = |e: Option<String>| *error.lock().unwrap_or_else(|e| e.into_inner()) = e;
    loop {
        if stop.is_cancelled() {
            return;
        }
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
                Ok(()) => {
                    last = Some(subs);
                    set_error(None);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not advertise broker subscriptions; retrying");
                    set_error(Some(e.to_string()));
                    tokio::select! {
                        _ = tokio::time::sleep(ADVERTISE_RETRY) => continue,
                        _ = stop.cancelled() => return,
                    }
                }
            }
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            _ = stop.cancelled() => return,
        }
        // Let the other subscribers that are ready run first, so a burst of
        // subscribes is one registration.
        tokio::task::yield_now().await;
        changes.borrow_and_update();
    }
}

/// Follows the registry for the links: on each change, and when the grace of a
/// sidecar that went missing lapses; until `stop`.
async fn sweep_loop(
    links: Arc<Links>,
    registry: Arc<dyn Registry>,
    own: String,
    stop: CancellationToken,
) {
    let mut changes = registry.changes();
    loop {
        changes.borrow_and_update();
        let catalog = registry.catalog();
        let present: BTreeMap<String, String> = nodes(&catalog, &own)
            .map(|n| (n.id.clone(), n.endpoint()))
            .collect();
        let due = links.sweep(&present).await;
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {}
            _ = stop.cancelled() => return,
        }
    }
}

#[async_trait::async_trait]
impl Broker for EmbeddedBroker {
    /// Accepted means: handed to the local subscribers and queued, in order, for every
    /// other sidecar that wants it. Refused (`Unavailable`, nothing published) when a
    /// sidecar's queue stays full for `publish_wait`.
    async fn publish(&self, topic: &str, message: Message) -> Result<(), BrokerError> {
        let peers = self.peers();
        // Queue groups: one sidecar per group, among all that have members.
        let mut chosen: BTreeMap<String, Option<&str>> = BTreeMap::new();
        let mut candidates: BTreeMap<String, Vec<Option<&str>>> = BTreeMap::new();
        for g in self.hub.groups_for(topic) {
            candidates.entry(g).or_default().push(None);
        }
        for peer in peers.iter() {
            let groups: BTreeSet<&String> = peer
                .subs
                .iter()
                .filter(|(p, q)| q.is_some() && crate::topic::matches(p, topic))
                .filter_map(|(_, q)| q.as_ref())
                .collect();
            for g in groups {
                candidates
                    .entry(g.clone())
                    .or_default()
                    .push(Some(peer.node.as_str()));
            }
        }
        for (group, sidecars) in candidates {
            let pick = crate::pick(sidecars.len());
            chosen.insert(group, sidecars[pick]);
        }

        let mut targets = Vec::new();
        for peer in peers.iter() {
            let plain = peer
                .subs
                .iter()
                .any(|(p, q)| q.is_none() && crate::topic::matches(p, topic));
            let groups: Vec<String> = chosen
                .iter()
                .filter(|(_, s)| **s == Some(peer.node.as_str()))
                .map(|(g, _)| g.clone())
                .collect();
            if !plain && groups.is_empty() {
                continue;
            }
            let scope = Scope {
                plain,
                groups: Some(groups),
            };
            let frame = frame::encode_message(topic, &scope, &message)
                .map_err(|e| BrokerError::TooLarge(e.to_string()))?;
            if let Some(link) = self.links.get(peer) {
                targets.push((link, frame));
            }
        }
        // Room in every queue first (in node order), so a refused publish went nowhere.
        let deadline = Instant::now() + self.settings.publish_wait;
        let mut reserved = Vec::with_capacity(targets.len());
        for (link, frame) in targets {
            match link.reserve(frame.len(), deadline).await {
                Ok(room) => reserved.push((link, frame, room)),
                Err(Refused::Gone) => self.metrics.dropped(topic, 1),
                Err(Refused::Full) => {
                    return Err(BrokerError::Unavailable {
                        backend: "embedded".into(),
                        detail: link.full(),
                    })
                }
            }
        }
        self.metrics.published(topic);
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
        for (link, frame, room) in reserved {
            if !link.push(frame, room) {
                self.metrics.dropped(topic, 1);
            }
        }
        Ok(())
    }

    async fn subscribe(
        &self,
        pattern: &str,
        queue: Option<&str>,
        buffer: usize,
    ) -> Result<Subscription, BrokerError> {
        // Watched before the subscription exists, so no change is missed.
        let mut changes = self.registry.changes();
        let sub = self.hub.subscribe(pattern, queue, buffer);
        // Returns once the registry shows it, so a publish on another sidecar right
        // after this returns finds it.
        let deadline = Instant::now() + self.settings.advertise_wait;
        loop {
            changes.borrow_and_update();
            if self.advertised(pattern, queue) {
                return Ok(sub);
            }
            match timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => break,
            }
        }
        // Dropping `sub` unsubscribes: nothing was subscribed.
        Err(self.not_advertised(pattern, queue))
    }

    fn backend(&self) -> String {
        "embedded".into()
    }

    fn healthy(&self) -> bool {
        true
    }

    /// Stops advertising (a registration under way is finished, then this sidecar
    /// is deregistered), gives the other sidecars up to 5 s to acknowledge what is
    /// queued for them, then ends every stream, each task finishing what it has in
    /// hand. When this returns, no task of the broker runs (unless one overran its
    /// deadline: that is logged).
    async fn close(&self) {
        self.following.cancel();
        self.tasks.close();
        if timeout(STOP_WAIT, self.tasks.wait()).await.is_err() {
            tracing::warn!(
                "the broker's advertiser did not finish its registration within {}; deregistering anyway",
                pillion_core::duration::format(STOP_WAIT)
            );
        }
        let service = Service {
            name: SERVICE.into(),
            nodes: vec![self.node.clone()],
            ..Service::default()
        };
        let _ = self.registry.deregister(&service).await;
        self.links
            .close(Instant::now() + CLOSE_WAIT, STOP_WAIT)
            .await;
        self.intake.close(Duration::from_secs(1)).await;
        self.stop.cancel();
    }
}

impl EmbeddedBroker {
    /// Why a subscription is refused: the registry did not show it in time.
    fn not_advertised(&self, pattern: &str, queue: Option<&str>) -> BrokerError {
        let what = match queue {
            Some(q) => format!("{pattern:?} (queue group {q:?})"),
            None => format!("{pattern:?}"),
        };
        let advertiser = self
            .advertise_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let registry = self.registry.status();
        let why = advertiser
            .or(registry.error)
            .map(|e| format!(" (registry {}: {e})", registry.backend))
            .unwrap_or_default();
        BrokerError::Unavailable {
            backend: "embedded".into(),
            detail: format!(
                "the registry did not show this sidecar's subscription to {what} within {}{why}, so other sidecars would not send it their messages; nothing was subscribed, try again",
                pillion_core::duration::format(self.settings.advertise_wait)
            ),
        }
    }

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
