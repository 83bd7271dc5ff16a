//! The service registry: who serves what, and where.
//!
//! - [`Registry`] is the port: register and deregister nodes, read a [`Catalog`]
//!   snapshot without locks, and be told when it changes. A change makes a new
//!   snapshot that rebuilds only the service it names ([`Catalog::with_service`]), so
//!   one registration costs the same at 50 services as at 50,000.
//! - [`cluster`] is the default: sidecars find each other by gossip (no server), each
//!   one's registrations living as long as it does.
//! - [`memory`] is the embedded adapter for one process: TTLs honoured.
//! - [`etcd`] keeps registrations in etcd v3 under one lease per sidecar, so they
//!   vanish soon after the sidecar that made them dies; it enforces their own TTLs
//!   itself, writes nothing for a renewal, and watches the registry prefix so every
//!   sidecar's catalog follows within milliseconds.
//! - [`mdns`] is go-micro's mDNS registry: no server, each sidecar answering for its
//!   own registrations and browsing the LAN for the rest, go-micro services included.
//! - [`api`] is the micro-sidecar compatible `/registry` HTTP API over any adapter,
//!   and `GET /health/{service}`.
//! - [`health`] registers the local app, checks its health URL and takes it out of the
//!   registry while it is unhealthy; and checks a service's nodes on demand.
//!
//! Nothing here sits on the request data path except [`Registry::catalog`], which is a
//! lock-free `ArcSwap` load.
#![forbid(unsafe_code)]

pub mod api;
mod catalog;
pub mod cluster;
pub mod etcd;
pub mod health;
pub mod mdns;
pub mod memory;

use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use pillion_core::Service;
use tokio::time::Instant;

pub use catalog::Catalog;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The backend cannot be reached; nothing was changed.
    #[error("registry {backend} is unreachable: {detail}")]
    Unavailable { backend: String, detail: String },
    /// A deregistration named nodes that are not registered.
    #[error("{0}")]
    NotFound(String),
    /// The registry URL or a registration is unusable.
    #[error("{0}")]
    Invalid(String),
}

/// The health of a registry backend, for `/healthz` and `/statusz`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BackendStatus {
    /// `memory` or `etcd://host:port,...` (never with credentials).
    pub backend: String,
    pub healthy: bool,
    /// Why it is unhealthy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The registry port. Adapters pass the same contract suite (`tests/contract.rs`).
#[async_trait::async_trait]
pub trait Registry: Send + Sync + 'static {
    /// Adds the service's nodes, replacing nodes with the same id (an upsert).
    /// With a `ttl` the nodes vanish when it lapses unless registered again; without
    /// one they stay until deregistered (memory) or until this sidecar dies (etcd).
    /// When this returns `Ok`, [`Registry::catalog`] shows the nodes.
    async fn register(&self, service: &Service, ttl: Option<Duration>)
        -> Result<(), RegistryError>;

    /// Removes the listed nodes of the service, or all of its nodes (of that version)
    /// when none are listed. Returns how many nodes were removed.
    async fn deregister(&self, service: &Service) -> Result<usize, RegistryError>;

    /// The current view of every registered service, read without locks.
    fn catalog(&self) -> Arc<Catalog>;

    /// A receiver whose value changes each time the catalog does.
    fn changes(&self) -> tokio::sync::watch::Receiver<u64>;

    /// Whether the backend is reachable.
    fn status(&self) -> BackendStatus;

    /// Graceful shutdown: release what this sidecar holds (etcd: revoke its leases, so
    /// its registrations vanish now rather than when they time out).
    async fn close(&self);

    /// The cluster as this sidecar sees it, for the cluster registry.
    fn cluster(&self) -> Option<cluster::ClusterStatus> {
        None
    }

    /// The sidecars of the cluster, for the cluster registry (`pillion members`).
    async fn members(&self) -> Vec<cluster::Member> {
        Vec::new()
    }
}

/// Opens the registry named by `url`: `cluster` (gossiping as `cluster` says),
/// `memory` or `etcd://host:port[,host:port...]`.
///
/// An etcd that is down is not an error here: the adapter keeps retrying in the
/// background and reports itself unhealthy until it connects.
pub async fn open(
    url: &str,
    cluster: &cluster::ClusterOptions,
) -> Result<Arc<dyn Registry>, RegistryError> {
    check_url(url)?;
    if url.starts_with("etcd://") || url.starts_with(etcd::TLS_SCHEME) {
        Ok(Arc::new(etcd::EtcdRegistry::connect(url)?))
    } else if url.starts_with("memory") {
        Ok(Arc::new(memory::MemoryRegistry::new()))
    } else if url.starts_with("mdns") {
        Ok(Arc::new(mdns::MdnsRegistry::start(url)?))
    } else {
        Ok(Arc::new(
            cluster::ClusterRegistry::start(cluster.clone()).await?,
        ))
    }
}

/// Checks a registry URL without connecting: `cluster`, `memory` or
/// `etcd://host:port[,host:port...]`.
pub fn check_url(url: &str) -> Result<(), RegistryError> {
    match url {
        "cluster" | "memory" | "memory://" => Ok(()),
        u if u.starts_with("etcd://") || u.starts_with(etcd::TLS_SCHEME) => {
            etcd::parse_url(u).map(|_| ())
        }
        u if u.starts_with("mdns") => mdns::parse_url(u).map(|_| ()),
        other => Err(RegistryError::Invalid(format!(
            "unknown registry {other:?}: use cluster, memory, mdns or etcd://host:port[,host:port] (etcds:// for TLS)"
        ))),
    }
}

/// An adapter's background tasks: they select on one token ([`Tasks::token`]) and
/// finish the work in hand when it is cancelled; [`Tasks::stop`] cancels it and waits
/// for them. Dropping the adapter without closing it cuts them off (they must not
/// outlive it).
#[derive(Default)]
struct Tasks {
    stop: tokio_util::sync::CancellationToken,
    tracker: tokio_util::task::TaskTracker,
    running: std::sync::Mutex<Vec<tokio::task::AbortHandle>>,
}

impl Tasks {
    /// What the tasks select on to learn they must stop.
    fn token(&self) -> tokio_util::sync::CancellationToken {
        self.stop.clone()
    }

    fn spawn<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let handle = self.tracker.spawn(task).abort_handle();
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        running.retain(|h| !h.is_finished());
        running.push(handle);
    }

    /// Tells every task to stop and waits for them, at most `within`; a task still
    /// running then is cut off (logged).
    async fn stop(&self, within: Duration) {
        self.stop.cancel();
        self.tracker.close();
        if tokio::time::timeout(within, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                tasks = self.tracker.len(),
                "registry tasks still busy {} after being told to stop; cut off",
                pillion_core::duration::format(within)
            );
            self.abort();
        }
    }

    fn abort(&self) {
        self.stop.cancel();
        for t in self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            t.abort();
        }
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        self.abort();
    }
}

/// Sleeps until the next TTL lapses (`next`) or a registration changes the deadlines
/// (`changed`); false when `stop` is cancelled instead (the registry is gone).
async fn wait_for_expiry(
    next: Option<tokio::time::Instant>,
    changed: &tokio::sync::Notify,
    stop: &tokio_util::sync::CancellationToken,
) -> bool {
    let until = next.unwrap_or_else(tokio::time::Instant::now);
    tokio::select! {
        _ = tokio::time::sleep_until(until), if next.is_some() => true,
        _ = changed.notified() => true,
        _ = stop.cancelled() => false,
    }
}

/// Whether a deregistration request `req` covers the registered single-node
/// registration `reg`: the same name and either one of the listed node ids, or, when
/// no nodes are listed, the same version (any version when `req` names none).
fn deregisters(req: &Service, reg: &Service) -> bool {
    if req.name != reg.name {
        return false;
    }
    if req.nodes.is_empty() {
        return req.version.is_empty() || req.version == reg.version;
    }
    reg.nodes
        .iter()
        .any(|n| req.nodes.iter().any(|r| r.id == n.id))
}

/// One registration per node: the unit both adapters store (an etcd key, a map entry).
fn per_node(service: &Service) -> impl Iterator<Item = Service> + '_ {
    service.nodes.iter().map(move |node| Service {
        nodes: vec![node.clone()],
        ..service.without_nodes()
    })
}

/// When each registration with a TTL lapses, in order, so that finding the lapsed ones
/// costs O(log n) per registration instead of a scan of every registration.
struct Deadlines<K: Ord + Hash + Clone> {
    queue: BTreeSet<(Instant, K)>,
    of: HashMap<K, Instant>,
}

impl<K: Ord + Hash + Clone> Default for Deadlines<K> {
    fn default() -> Self {
        Deadlines {
            queue: BTreeSet::new(),
            of: HashMap::new(),
        }
    }
}

impl<K: Ord + Hash + Clone> Deadlines<K> {
    /// Sets (or, with `None`, clears) the deadline of `key`.
    fn set(&mut self, key: &K, deadline: Option<Instant>) {
        if let Some(old) = self.of.remove(key) {
            self.queue.remove(&(old, key.clone()));
        }
        if let Some(d) = deadline {
            self.of.insert(key.clone(), d);
            self.queue.insert((d, key.clone()));
        }
    }

    /// Removes and returns the keys whose deadline is not after `now`.
    fn lapsed(&mut self, now: Instant) -> Vec<K> {
        let mut out = Vec::new();
        while let Some((d, _)) = self.queue.first() {
            if *d > now {
                break;
            }
            let (_, key) = self.queue.pop_first().expect("checked above");
            self.of.remove(&key);
            out.push(key);
        }
        out
    }

    /// The earliest deadline.
    fn next(&self) -> Option<Instant> {
        self.queue.first().map(|(d, _)| *d)
    }
}
