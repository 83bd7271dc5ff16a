//! Endpoints: the nodes of each service as the data path sees them, with the state
//! that balancing and outlier ejection keep per node (latency, load, failures).
//!
//! The set is a snapshot rebuilt from the registry's catalog on every change and
//! swapped in atomically; requests read it without locks. A rebuild keeps the state
//! (and the connection pool) of every node that is still registered at the same
//! address, so a registry change does not reset what was learnt about the others.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use pillion_core::NodeProtocol;
use pillion_registry::Registry;

use crate::budget::RetryBudget;
use crate::metrics::ServiceMetrics;
use pillion_http::pool::{self, Pool};

/// Where this sidecar runs, from its app's `zone` and `region` metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Locality {
    pub zone: Option<String>,
    pub region: Option<String>,
}

impl Locality {
    /// 0: same zone, 1: same region, 2: elsewhere (or unknown). Everything is tier 0
    /// when this sidecar's locality is unknown.
    fn tier(&self, zone: Option<&str>, region: Option<&str>) -> u8 {
        if self.zone.is_none() && self.region.is_none() {
            return 0;
        }
        let same = |mine: &Option<String>, theirs: Option<&str>| {
            mine.as_deref().is_some_and(|m| Some(m) == theirs)
        };
        let region_ok = self.region.is_none() || same(&self.region, region);
        if same(&self.zone, zone) && region_ok {
            0
        } else if same(&self.region, region) {
            1
        } else {
            2
        }
    }
}

/// How outliers are ejected.
#[derive(Debug, Clone, Copy)]
pub struct EjectionPolicy {
    /// Consecutive failures that eject a node.
    pub consecutive_failures: u32,
    /// First ejection lasts this long; each further one in a row adds as much again.
    pub base_time: Duration,
    /// The longest an ejection lasts.
    pub max_time: Duration,
}

impl Default for EjectionPolicy {
    fn default() -> Self {
        EjectionPolicy {
            consecutive_failures: 5,
            base_time: Duration::from_secs(10),
            max_time: Duration::from_secs(300),
        }
    }
}

/// The mTLS connector to the mesh listeners of a service, presenting this sidecar's
/// identity and checking theirs.
pub type MeshConnect = Arc<dyn Fn(&str) -> pillion_http::stream::Connector + Send + Sync>;

/// One node of a service and what the data path knows about it.
pub struct NodeState {
    pub id: String,
    /// `host:port` to dial: the node's address, or its mesh listener's.
    pub authority: String,
    /// The node's address as a Host header, made once.
    pub host: http::HeaderValue,
    /// Reached through its mesh listener, over mTLS.
    pub meshed: bool,
    /// The node takes calls only over the mesh, and this sidecar has no identity.
    pub needs_identity: bool,
    pub tier: u8,
    /// What the node speaks, from its `protocol` metadata.
    pub protocol: Protocol,
    pub pool: Arc<Pool>,
    /// Peak-EWMA of response latency in nanoseconds (f64 bits).
    ewma_ns: AtomicU64,
    /// When `ewma_ns` was last updated, in ns since [`clock`]'s epoch.
    ewma_at: AtomicU64,
    /// Requests sent and not answered yet.
    pending: AtomicUsize,
    failures: AtomicU32,
    ejections: AtomicU32,
    /// Ejected until this time (ms since [`clock`]'s epoch); 0 when not ejected.
    ejected_until_ms: AtomicU64,
    /// The node's measured latency: an EWMA of the time its answers took (f64 bits,
    /// ns), without the balancer's assumptions and penalties; 0 before the first
    /// answer.
    answered_ns: AtomicU64,
    /// When `answered_ns` was last updated, in ns since [`clock`]'s epoch.
    answered_at: AtomicU64,
    /// When the node last failed an attempt (ms since [`clock`]'s epoch, at least 1);
    /// 0 when it never did.
    failed_at_ms: AtomicU64,
}

/// A node's state as the balancer sees it now, for `/statusz` and the dashboard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeHealth {
    /// Ejected as an outlier for this long yet: no calls go to it meanwhile.
    Ejected(Duration),
    /// It failed its last attempts, the last one within the shortest ejection's time
    /// ([`EjectionPolicy::base_time`]): calls still go to it, as the balancer
    /// chooses.
    Failing,
    /// Neither: it answered since its last failure, or its ejection ended, or its last
    /// failure is older than an ejection would have lasted.
    Healthy,
    /// Never called yet.
    Untried,
}

impl NodeHealth {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeHealth::Ejected(_) => "ejected",
            NodeHealth::Failing => "failing",
            NodeHealth::Healthy => "ok",
            NodeHealth::Untried => "untried",
        }
    }
}

/// How calls reach a node, from its (or its service's) `protocol` metadata. pillion
/// translates between the caller's protocol and the node's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `protocol=http1` or go-micro's `http`: HTTP/1.1 only; a gRPC call to it is
    /// refused with 502.
    Http1,
    /// `protocol=h2c` or go-micro's `grpc` (gRPC needs HTTP/2): HTTP/2 with prior
    /// knowledge, for every call.
    H2c,
    /// No `protocol` metadata: gRPC calls go as h2c (gRPC needs HTTP/2), the rest as
    /// HTTP/1.1.
    Unset,
    /// go-micro's RPC, as micro's sidecar called nodes: a call by service and method
    /// goes as a JSON-RPC request over go-micro's HTTP transport ([`crate::jsonrpc`]).
    /// `protocol=jsonrpc` (any JSON-RPC server: micro's Python and Go examples) or
    /// go-micro v1's `mucp` (the same, with the content type and `Micro-*` headers
    /// its server reads).
    GoMicro(Dialect),
}

/// The two ways [`Protocol::GoMicro`] is spoken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// `protocol=jsonrpc`: `Content-Type: application/json`, as micro's sidecar sent.
    JsonRpc,
    /// `protocol=mucp`: `Content-Type: application/json-rpc` (the JSON-RPC codec in
    /// go-micro v0 and v1 alike) and go-micro v1's `Micro-Service`/`Micro-Endpoint`.
    Mucp,
}

impl Protocol {
    /// From the metadata value; `unset` when there is none (`--rpc-codec`). An
    /// unknown value is reported.
    pub fn from_metadata(value: Option<&str>, unset: Protocol) -> Result<Protocol, String> {
        let Some(value) = value else {
            return Ok(unset);
        };
        match NodeProtocol::parse(value) {
            Some(NodeProtocol::Http1 | NodeProtocol::Http) => Ok(Protocol::Http1),
            Some(NodeProtocol::H2c | NodeProtocol::Grpc) => Ok(Protocol::H2c),
            Some(NodeProtocol::Mucp) => Ok(Protocol::GoMicro(Dialect::Mucp)),
            Some(NodeProtocol::JsonRpc) => Ok(Protocol::GoMicro(Dialect::JsonRpc)),
            None => Err(format!(
                "unknown protocol {value:?} in the node's metadata: use {}",
                NodeProtocol::VALUES
            )),
        }
    }

    /// Whether a call goes to the node as h2c; `Err` when it cannot be carried.
    pub fn h2_for(self, grpc: bool) -> Result<bool, &'static str> {
        match (self, grpc) {
            (Protocol::H2c, _) | (Protocol::Unset, true) => Ok(true),
            (Protocol::Http1, true) => {
                Err("gRPC needs HTTP/2 but the node is registered with protocol=http1")
            }
            (Protocol::GoMicro(_), true) => Err(
                "gRPC cannot be carried to a go-micro RPC node (protocol=jsonrpc or mucp): call it with JSON",
            ),
            (Protocol::Http1 | Protocol::Unset | Protocol::GoMicro(_), false) => Ok(false),
        }
    }
}

/// Latency assumed for a node before the first answer (linkerd's default).
const DEFAULT_RTT_NS: f64 = 30e6;
/// The EWMA's decay time.
const DECAY_NS: f64 = 10e9;

/// Milliseconds and nanoseconds since the process's first call; cheap and monotonic.
pub fn clock() -> Duration {
    since_epoch(Instant::now())
}

/// [`clock`] at `at`, an instant already read: a call reads the clock once for its
/// start and once for its end, and the balancer's arithmetic reuses those.
#[inline]
pub fn since_epoch(at: Instant) -> Duration {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    at.saturating_duration_since(*EPOCH.get_or_init(Instant::now))
}

/// Where a node is dialled and how.
struct Route {
    authority: String,
    host: String,
    tls: Option<pillion_http::stream::Connector>,
    needs_identity: bool,
}

#[cfg(test)]
impl Route {
    fn plain(authority: String) -> Route {
        Route {
            host: authority.clone(),
            authority,
            tls: None,
            needs_identity: false,
        }
    }
}

impl NodeState {
    fn new(
        id: String,
        route: Route,
        tier: u8,
        protocol: Protocol,
        pool: &pool::Settings,
    ) -> NodeState {
        let Route {
            authority,
            host,
            tls,
            needs_identity,
        } = route;
        NodeState {
            meshed: tls.is_some(),
            needs_identity,
            pool: Arc::new(Pool::with_tls(authority.clone(), pool.clone(), tls)),
            protocol,
            host: http::HeaderValue::from_str(&host)
                .unwrap_or_else(|_| http::HeaderValue::from_static("localhost")),
            id,
            authority,
            tier,
            ewma_ns: AtomicU64::new(DEFAULT_RTT_NS.to_bits()),
            ewma_at: AtomicU64::new(clock().as_nanos() as u64),
            pending: AtomicUsize::new(0),
            failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            answered_ns: AtomicU64::new(0),
            answered_at: AtomicU64::new(0),
            failed_at_ms: AtomicU64::new(0),
        }
    }

    /// The balancer's cost: latency estimate times (outstanding requests + 1).
    ///
    /// The estimate decays towards zero while a node gets no answers (as tower's
    /// peak-EWMA does), so a node that lost the comparison once is tried again later
    /// instead of being starved by a slightly faster one.
    pub fn cost(&self, now: Duration) -> f64 {
        let now = now.as_nanos() as u64;
        let then = self.ewma_at.load(Ordering::Relaxed);
        let decay = (-(now.saturating_sub(then) as f64) / DECAY_NS).exp();
        f64::from_bits(self.ewma_ns.load(Ordering::Relaxed))
            * decay
            * (self.pending.load(Ordering::Relaxed) + 1) as f64
    }

    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    pub fn ewma(&self) -> Duration {
        Duration::from_nanos(f64::from_bits(self.ewma_ns.load(Ordering::Relaxed)) as u64)
    }

    /// Marks a request as outstanding until the guard drops.
    pub fn start(self: &Arc<Self>) -> PendingGuard {
        self.pending.fetch_add(1, Ordering::Relaxed);
        PendingGuard(self.clone())
    }

    /// Feeds a response latency, measured until `now` ([`clock`]'s), to the
    /// peak-EWMA: a slower sample is taken at once, a faster one decays in over
    /// [`DECAY_NS`].
    pub fn observe(&self, rtt: Duration, now: Duration) {
        let now = now.as_nanos() as u64;
        let rtt = rtt.as_nanos() as f64;
        let prev = f64::from_bits(self.ewma_ns.load(Ordering::Relaxed));
        let then = self.ewma_at.swap(now, Ordering::Relaxed);
        let next = if rtt > prev {
            rtt
        } else {
            let w = (-((now.saturating_sub(then)) as f64) / DECAY_NS).exp();
            prev * w + rtt * (1.0 - w)
        };
        // Races between two updates lose one sample, which an average can afford.
        self.ewma_ns.store(next.to_bits(), Ordering::Relaxed);
    }

    /// Feeds the time an answer of the node took (whatever its status), measured
    /// until `now` ([`clock`]'s), to its measured latency ([`NodeState::latency`]): an
    /// average over [`DECAY_NS`], the first answer taken as it is. The balancer's
    /// estimate is fed separately ([`NodeState::observe`]).
    pub fn measure(&self, rtt: Duration, now: Duration) {
        let now = now.as_nanos() as u64;
        let rtt = (rtt.as_nanos() as f64).max(1.0);
        let prev = f64::from_bits(self.answered_ns.load(Ordering::Relaxed));
        let then = self.answered_at.swap(now, Ordering::Relaxed);
        let next = if prev > 0.0 {
            let w = (-((now.saturating_sub(then)) as f64) / DECAY_NS).exp();
            prev * w + rtt * (1.0 - w)
        } else {
            rtt
        };
        self.answered_ns.store(next.to_bits(), Ordering::Relaxed);
    }

    /// The node's measured latency: how long its answers took, on average over the
    /// last seconds of answers; `None` before it answered at all. Unlike
    /// [`NodeState::ewma`], never an assumed value nor a failure's penalty.
    pub fn latency(&self) -> Option<Duration> {
        let ns = f64::from_bits(self.answered_ns.load(Ordering::Relaxed));
        (ns > 0.0).then(|| Duration::from_nanos(ns as u64))
    }

    /// How long ago (at `now_ms`, [`clock`]'s) the node last failed an attempt.
    pub fn last_failure(&self, now_ms: u64) -> Option<Duration> {
        let at = self.failed_at_ms.load(Ordering::Relaxed);
        (at != 0).then(|| Duration::from_millis(now_ms.saturating_sub(at)))
    }

    /// The node's state at `now_ms` ([`clock`]'s) under `policy` (see [`NodeHealth`]).
    pub fn health(&self, now_ms: u64, policy: &EjectionPolicy) -> NodeHealth {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        if until > now_ms {
            return NodeHealth::Ejected(Duration::from_millis(until - now_ms));
        }
        match self.last_failure(now_ms) {
            Some(ago) if self.consecutive_failures() > 0 && ago < policy.base_time => {
                NodeHealth::Failing
            }
            None if self.latency().is_none() => NodeHealth::Untried,
            _ => NodeHealth::Healthy,
        }
    }

    pub fn is_ejected(&self, now_ms: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now_ms
    }

    /// Until when the node is ejected, if it is.
    pub fn ejected_for(&self) -> Option<Duration> {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        let now = clock().as_millis() as u64;
        (until > now).then(|| Duration::from_millis(until - now))
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.failures.load(Ordering::Relaxed)
    }

    pub fn record_success(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        if self.ejections.load(Ordering::Relaxed) != 0 {
            self.ejections.store(0, Ordering::Relaxed);
        }
    }
}

pub struct PendingGuard(Arc<NodeState>);

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What survives endpoint rebuilds for one service name: metrics, retry budget, the
/// round-robin cursor and the count of requests waiting.
pub struct ServiceShared {
    pub metrics: ServiceMetrics,
    pub budget: RetryBudget,
    pub cursor: AtomicUsize,
    pub pending: AtomicUsize,
}

/// The nodes of one service (all versions).
pub struct ServiceSet {
    pub name: String,
    pub nodes: Vec<Arc<NodeState>>,
    pub shared: Arc<ServiceShared>,
    /// How its nodes are ejected when an answer's body breaks off.
    pub ejection: EjectionPolicy,
    /// Ids of the nodes left out because they have no mesh listener (warned once).
    pub skipped: Vec<String>,
}

/// A node is credited when its answer's body ends whole, and blamed when it breaks
/// off (the node cut it short after its headers). The set itself is the hook, so a
/// call pays for no allocation.
impl pillion_http::pool::AnswerEnd for ServiceSet {
    fn answer_ended(&self, node: usize, whole: bool) {
        let Some(state) = self.nodes.get(node) else {
            return;
        };
        if whole {
            state.record_success();
        } else {
            self.record_failure(state, &self.ejection);
        }
    }
}

impl ServiceSet {
    /// Records a failed attempt on `node`; ejects it after enough failures in a row,
    /// unless half of the service's nodes are ejected already. True when ejected now.
    pub fn record_failure(&self, node: &NodeState, policy: &EjectionPolicy) -> bool {
        let failures = node.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let now_ms = clock().as_millis() as u64;
        node.failed_at_ms.store(now_ms.max(1), Ordering::Relaxed);
        if failures < policy.consecutive_failures {
            return false;
        }
        if node.is_ejected(now_ms) {
            return false;
        }
        let ejected = self.nodes.iter().filter(|n| n.is_ejected(now_ms)).count();
        if (ejected + 1) * 2 > self.nodes.len() {
            return false; // never more than half: the rest must carry the load
        }
        let round = node.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let time = (policy.base_time * round).min(policy.max_time);
        node.ejected_until_ms
            .store(now_ms + time.as_millis() as u64, Ordering::Relaxed);
        node.failures.store(0, Ordering::Relaxed);
        self.shared
            .metrics
            .ejections
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            service = %self.name,
            node = %node.id,
            address = %node.authority,
            failures,
            seconds = time.as_secs(),
            "node ejected after consecutive failures"
        );
        true
    }
}

/// How many names that are not registered get series of their own in the metrics
/// when they are called ([`Endpoints::unrouted`]): calls to any name are answered
/// (404), so without a bound a caller making names up would add series without end.
pub const UNREGISTERED_NAMES: usize = 64;

/// The service label of the calls to names that are not registered beyond the first
/// [`UNREGISTERED_NAMES`].
pub const UNKNOWN_SERVICE: &str = "(unknown)";

/// The nodes of every service called through this sidecar: the snapshot the data
/// path reads.
#[derive(Default)]
pub struct EndpointSet {
    pub services: HashMap<String, Arc<ServiceSet>>,
}

/// Keeps an [`EndpointSet`] equal to the registry's catalog.
pub struct Endpoints {
    current: ArcSwap<EndpointSet>,
    registry: Arc<dyn Registry>,
    /// Held while a snapshot is built, so that an older one never replaces a newer.
    building: Mutex<()>,
    shared: Mutex<HashMap<String, Arc<ServiceShared>>>,
    /// How many of `shared`'s names were made for calls to a name that was not
    /// registered (changed under `shared`'s lock); at most [`UNREGISTERED_NAMES`].
    unregistered: AtomicUsize,
    locality: Locality,
    pool: pool::Settings,
    mesh: Option<MeshConnect>,
    /// In the mesh, and not `--mesh-permissive`: the nodes of a meshed service
    /// without a mesh listener are left out.
    strict: bool,
    /// The services seen with a mesh listener since this sidecar started: they stay
    /// meshed when those nodes go (expired, deregistered), so that a plaintext node
    /// registered elsewhere is never called in clear text in their place.
    meshed: Mutex<std::collections::HashSet<String>>,
    ejection: EjectionPolicy,
    max_retry_percent: f64,
    /// How a node with no `protocol` metadata is called (`--rpc-codec`).
    unset: Protocol,
}

impl Endpoints {
    /// Builds the first snapshot and follows the registry's changes in a task.
    pub fn follow(
        registry: Arc<dyn Registry>,
        locality: Locality,
        pool: pool::Settings,
        mesh: Option<MeshConnect>,
        permissive: bool,
        ejection: EjectionPolicy,
        unset: Protocol,
    ) -> Arc<Endpoints> {
        let endpoints = Arc::new(Endpoints {
            current: ArcSwap::from_pointee(EndpointSet::default()),
            registry: registry.clone(),
            building: Mutex::new(()),
            shared: Mutex::new(HashMap::new()),
            unregistered: AtomicUsize::new(0),
            locality,
            pool,
            strict: mesh.is_some() && !permissive,
            meshed: Mutex::new(Default::default()),
            mesh,
            ejection,
            max_retry_percent: 0.2,
            unset,
        });
        let mut changes = registry.changes();
        endpoints.rebuild(None);
        let weak = Arc::downgrade(&endpoints);
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                let Some(endpoints) = weak.upgrade() else {
                    return;
                };
                endpoints.rebuild(None);
            }
        });
        endpoints
    }

    /// The nodes of `name` once it has one, waiting for registrations until `until`;
    /// `None` when none came in time.
    pub async fn wait_for_node(&self, name: &str, until: Instant) -> Option<Arc<ServiceSet>> {
        // Subscribed before looking, so that a registration in between is not missed.
        let mut changes = self.registry.changes();
        loop {
            if let Some(set) = self.service(name).filter(|s| !s.nodes.is_empty()) {
                return Some(set);
            }
            match tokio::time::timeout_at(until.into(), changes.changed()).await {
                Ok(Ok(())) => continue,
                _ => return None,
            }
        }
    }

    pub fn load(&self) -> arc_swap::Guard<Arc<EndpointSet>> {
        self.current.load()
    }

    /// The nodes of `name`. The snapshot holds only the services called through this
    /// sidecar (a registry of 50,000 services costs nothing here until they are
    /// called); a name missing from it is looked up in the registry's current
    /// catalog, so the first call, even right after a registration through this
    /// sidecar, finds it.
    pub fn service(&self, name: &str) -> Option<Arc<ServiceSet>> {
        if let Some(set) = self.current.load().services.get(name) {
            return Some(set.clone());
        }
        self.registry.catalog().get(name)?;
        self.rebuild(Some(name));
        self.current.load().services.get(name).cloned()
    }

    /// The metrics and budget of `name`, a registered service, created on first use.
    pub fn shared(&self, name: &str) -> Arc<ServiceShared> {
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        shared
            .entry(name.to_string())
            .or_insert_with(|| self.new_shared())
            .clone()
    }

    /// Where a call to `name` is counted when `name` has no nodes here (not
    /// registered, or no longer: its last node went): its own metrics if it has any
    /// (it was called, or registered, since this sidecar started), so the calls to a
    /// service that died show as its errors; new ones for the first
    /// [`UNREGISTERED_NAMES`] other names; beyond those, [`UNKNOWN_SERVICE`]'s, so a
    /// flood of calls to made-up names adds one series, not one per name.
    pub fn unrouted(&self, name: &str) -> Arc<ServiceShared> {
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(known) = shared.get(name) {
            return known.clone();
        }
        let key = if self.unregistered.load(Ordering::Relaxed) < UNREGISTERED_NAMES {
            self.unregistered.fetch_add(1, Ordering::Relaxed);
            name
        } else {
            UNKNOWN_SERVICE
        };
        shared
            .entry(key.to_string())
            .or_insert_with(|| self.new_shared())
            .clone()
    }

    fn new_shared(&self) -> Arc<ServiceShared> {
        Arc::new(ServiceShared {
            metrics: ServiceMetrics::default(),
            budget: RetryBudget::new(self.max_retry_percent, 10),
            cursor: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
        })
    }

    /// Every service's shared state, for `/metrics`.
    pub fn all_shared(&self) -> Vec<(String, Arc<ServiceShared>)> {
        let shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<_> = shared.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Rebuilds the snapshot's services (and `add`) from the current catalog; those
    /// no longer registered leave it.
    fn rebuild(&self, add: Option<&str>) {
        let _building = self.building.lock().unwrap_or_else(|e| e.into_inner());
        let catalog = self.registry.catalog();
        let old = self.current.load_full();
        let names = old.services.keys().map(String::as_str).chain(add);
        let mut services = HashMap::new();
        for name in names {
            if let Some(versions) = catalog.get(name) {
                let set = self.build(name, versions, old.services.get(name));
                services.insert(name.to_string(), set);
            }
        }
        self.current.store(Arc::new(EndpointSet { services }));
    }

    /// The nodes of one service, keeping the state (load, ejection) of nodes that
    /// did not change.
    fn build(
        &self,
        name: &str,
        versions: &[pillion_core::Service],
        previous: Option<&Arc<ServiceSet>>,
    ) -> Arc<ServiceSet> {
        let mut nodes = Vec::new();
        let mut skipped = Vec::new();
        // A meshed service is called over mTLS only: a node of it without a mesh
        // listener (a plaintext registration anyone could make) is never selected.
        // Once seen in the mesh, a service stays meshed for this sidecar: its meshed
        // nodes going away (expired, deregistered) must not turn a plaintext node
        // registered elsewhere into the one called, in clear text.
        let meshed = self.strict && {
            let mut ever = self.meshed.lock().unwrap_or_else(|e| e.into_inner());
            if versions
                .iter()
                .any(|svc| svc.nodes.iter().any(|n| n.mesh().is_some()))
            {
                ever.insert(name.to_string());
            }
            ever.contains(name)
        };
        for svc in versions {
            for node in &svc.nodes {
                if meshed && node.mesh().is_none() {
                    let known = previous.is_some_and(|p| p.skipped.contains(&node.id));
                    if !known {
                        tracing::warn!(service = %name, node = %node.id, address = %node.endpoint(), "left out: a node without a mesh listener of a service in the mesh (calls would go in clear text; --mesh-permissive allows it during a migration)");
                    }
                    skipped.push(node.id.clone());
                    continue;
                }
                let address = node.endpoint();
                let authority = node.mesh().unwrap_or(&address).to_string();
                let meta = |k: &str| {
                    node.metadata
                        .get(k)
                        .or_else(|| svc.metadata.get(k))
                        .map(String::as_str)
                };
                let tier = self.locality.tier(meta("zone"), meta("region"));
                let protocol = Protocol::from_metadata(meta("protocol"), self.unset)
                    .unwrap_or_else(|e| {
                        tracing::warn!(service = %name, node = %node.id, "{e}");
                        self.unset
                    });
                let kept = previous.and_then(|p| {
                    p.nodes.iter().find(|n| {
                        n.id == node.id
                            && n.authority == authority
                            && n.tier == tier
                            && n.protocol == protocol
                    })
                });
                nodes.push(match kept {
                    Some(n) => n.clone(),
                    None => Arc::new(NodeState::new(
                        node.id.clone(),
                        Route {
                            tls: node
                                .mesh()
                                .and_then(|_| self.mesh.as_ref().map(|connect| connect(name))),
                            needs_identity: node.mesh().is_some() && self.mesh.is_none(),
                            authority,
                            host: address,
                        },
                        tier,
                        protocol,
                        &self.pool,
                    )),
                });
            }
        }
        Arc::new(ServiceSet {
            name: name.to_string(),
            nodes,
            shared: self.shared(name),
            ejection: self.ejection,
            skipped,
        })
    }
}

#[cfg(test)]
impl NodeState {
    pub(crate) fn test(id: String, tier: u8) -> NodeState {
        NodeState::new(
            id,
            Route::plain("127.0.0.1:9".into()),
            tier,
            Protocol::Unset,
            &pool::Settings::default(),
        )
    }

    /// A node of tier 0 at `authority` that speaks `protocol`.
    pub(crate) fn test_at(id: &str, authority: &str, protocol: Protocol) -> NodeState {
        NodeState::new(
            id.into(),
            Route::plain(authority.into()),
            0,
            protocol,
            &pool::Settings::default(),
        )
    }
}

#[cfg(test)]
impl ServiceSet {
    /// The service `s` with `nodes` and the default ejection.
    pub(crate) fn test(nodes: Vec<Arc<NodeState>>) -> ServiceSet {
        ServiceSet {
            name: "s".into(),
            nodes,
            shared: Arc::new(ServiceShared::test()),
            ejection: EjectionPolicy::default(),
            skipped: Vec::new(),
        }
    }
}

#[cfg(test)]
impl ServiceShared {
    pub(crate) fn test() -> ServiceShared {
        ServiceShared {
            metrics: ServiceMetrics::default(),
            budget: RetryBudget::new(0.2, 10),
            cursor: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_micro_s_protocols_are_called_over_what_they_serve() {
        let cases = [
            (None, Protocol::Unset),
            (Some("http1"), Protocol::Http1),
            (Some("http"), Protocol::Http1),
            (Some("h2c"), Protocol::H2c),
            (Some("GRPC"), Protocol::H2c),
            (Some("mucp"), Protocol::GoMicro(Dialect::Mucp)),
            (Some("jsonrpc"), Protocol::GoMicro(Dialect::JsonRpc)),
        ];
        for (value, want) in cases {
            assert_eq!(
                Protocol::from_metadata(value, Protocol::Unset),
                Ok(want),
                "{value:?}"
            );
        }
        // --rpc-codec jsonrpc: a node that names no protocol is a JSON-RPC server; one
        // that names its protocol keeps it.
        let jsonrpc = Protocol::GoMicro(Dialect::JsonRpc);
        assert_eq!(Protocol::from_metadata(None, jsonrpc), Ok(jsonrpc));
        assert_eq!(
            Protocol::from_metadata(Some("h2c"), jsonrpc),
            Ok(Protocol::H2c)
        );
        assert_eq!(
            Protocol::from_metadata(Some("http3"), Protocol::Unset),
            Err("unknown protocol \"http3\" in the node's metadata: use http1, h2c, jsonrpc, http, grpc or mucp".into())
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_service_registered_a_moment_ago_is_found_before_the_snapshot_follows() {
        let registry: Arc<dyn Registry> = Arc::new(pillion_registry::memory::MemoryRegistry::new());
        let endpoints = Endpoints::follow(
            registry.clone(),
            Locality::default(),
            Default::default(),
            None,
            false,
            EjectionPolicy::default(),
            Protocol::Unset,
        );
        assert!(endpoints.service("fresh").is_none());
        let svc = pillion_core::service::Service::from_json(
            br#"{"name":"fresh","nodes":[{"id":"fresh-1","address":"127.0.0.1:9"}]}"#,
        )
        .unwrap();
        registry.register(&svc, None).await.unwrap();
        // On a current-thread runtime the following task has not run yet.
        assert!(!endpoints.load().services.contains_key("fresh"));
        let set = endpoints
            .service("fresh")
            .expect("found in the current catalog");
        assert_eq!(set.nodes[0].id, "fresh-1");
    }

    #[test]
    fn tiers_prefer_zone_then_region() {
        let here = Locality {
            zone: Some("eu-1a".into()),
            region: Some("eu-1".into()),
        };
        assert_eq!(here.tier(Some("eu-1a"), Some("eu-1")), 0);
        assert_eq!(here.tier(Some("eu-1b"), Some("eu-1")), 1);
        assert_eq!(here.tier(Some("us-1a"), Some("us-1")), 2);
        assert_eq!(here.tier(None, None), 2);
        assert_eq!(Locality::default().tier(Some("x"), Some("y")), 0);
    }

    #[test]
    fn peak_ewma_takes_peaks_at_once_and_decays_towards_fast_samples() {
        let n = NodeState::new(
            "n".into(),
            Route::plain("127.0.0.1:1".into()),
            0,
            Protocol::Unset,
            &pool::Settings::default(),
        );
        n.observe(Duration::from_millis(100), clock());
        assert_eq!(n.ewma(), Duration::from_millis(100));
        n.observe(Duration::from_millis(1), clock());
        let after = n.ewma();
        assert!(
            after <= Duration::from_millis(100) && after > Duration::from_millis(1),
            "{after:?}"
        );
    }

    #[test]
    fn the_measured_latency_is_only_answers() {
        let n = NodeState::test("n".into(), 0);
        assert_eq!(n.latency(), None, "no answer yet: nothing measured");
        // A refused attempt: the balancer's penalty, not a measurement.
        n.observe(Duration::from_secs(1), clock());
        assert_eq!(n.latency(), None);
        assert_eq!(n.ewma(), Duration::from_secs(1));
        n.measure(Duration::from_millis(4), clock());
        assert_eq!(n.latency(), Some(Duration::from_millis(4)));
        n.measure(Duration::from_millis(8), clock());
        let l = n.latency().unwrap();
        assert!(
            l >= Duration::from_millis(4) && l <= Duration::from_millis(8),
            "{l:?}"
        );
    }

    #[test]
    fn a_node_is_failing_briefly_ejected_while_ejected_and_then_healthy() {
        let policy = EjectionPolicy::default();
        let nodes: Vec<_> = (0..3)
            .map(|i| Arc::new(NodeState::test(format!("n{i}"), 0)))
            .collect();
        let set = ServiceSet {
            name: "s".into(),
            nodes: nodes.clone(),
            shared: Arc::new(ServiceShared::test()),
            ejection: policy,
            skipped: Vec::new(),
        };
        let n = &nodes[0];
        let now = || clock().as_millis() as u64;
        assert_eq!(n.health(now(), &policy), NodeHealth::Untried);
        set.record_failure(n, &policy);
        assert_eq!(n.health(now(), &policy), NodeHealth::Failing);
        // One failure, and the node not called since: failing no longer once an
        // ejection would have ended.
        // (A failure is stamped at 1 ms at least: 0 means none.)
        let later = now().max(1) + policy.base_time.as_millis() as u64;
        assert_eq!(n.health(later, &policy), NodeHealth::Healthy);
        assert_eq!(
            n.consecutive_failures(),
            1,
            "still counted towards ejection"
        );
        // It answers: healthy at once.
        set.record_failure(n, &policy);
        n.measure(Duration::from_millis(2), clock());
        n.record_success();
        assert_eq!(n.health(now(), &policy), NodeHealth::Healthy);
        // Ejected: for as long as the ejection lasts, then healthy again.
        for _ in 0..policy.consecutive_failures {
            set.record_failure(n, &policy);
        }
        let NodeHealth::Ejected(left) = n.health(now(), &policy) else {
            panic!("{:?}", n.health(now(), &policy));
        };
        assert!(
            left > Duration::from_secs(9) && left <= policy.base_time,
            "{left:?}"
        );
        let after = now() + policy.base_time.as_millis() as u64 + 1;
        assert_eq!(n.health(after, &policy), NodeHealth::Healthy);
        assert_eq!(NodeHealth::Healthy.as_str(), "ok");
    }

    #[test]
    fn ejection_never_takes_more_than_half_and_grows() {
        let shared = Arc::new(ServiceShared {
            metrics: ServiceMetrics::default(),
            budget: RetryBudget::new(0.2, 10),
            cursor: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
        });
        let nodes: Vec<_> = (0..3)
            .map(|i| {
                Arc::new(NodeState::new(
                    format!("n{i}"),
                    Route::plain(format!("127.0.0.1:{i}")),
                    0,
                    Protocol::Unset,
                    &pool::Settings::default(),
                ))
            })
            .collect();
        let set = ServiceSet {
            name: "s".into(),
            nodes: nodes.clone(),
            shared,
            ejection: EjectionPolicy::default(),
            skipped: Vec::new(),
        };
        let policy = EjectionPolicy::default();
        for _ in 0..4 {
            assert!(!set.record_failure(&nodes[0], &policy));
        }
        assert!(set.record_failure(&nodes[0], &policy), "5th failure ejects");
        let first = nodes[0].ejected_for().unwrap();
        assert!(first > Duration::from_secs(9) && first <= Duration::from_secs(10));
        for _ in 0..5 {
            assert!(
                !set.record_failure(&nodes[1], &policy),
                "a second of three would be more than half"
            );
        }
        assert_eq!(set.shared.metrics.ejections.load(Ordering::Relaxed), 1);
        // The same node failing again after its ejection lapses is ejected longer.
        nodes[0].ejected_until_ms.store(0, Ordering::Relaxed);
        for _ in 0..5 {
            set.record_failure(&nodes[0], &policy);
        }
        assert!(nodes[0].ejected_for().unwrap() > Duration::from_secs(19));
    }
}
