//! The etcd v3 adapter.
//!
//! Each node is one key whose value is the JSON of the service with that one node, in
//! one of two layouts (the URL's `layout=`, see [`Target`]):
//!
//! - `pillion` (the default): `/pillion/registry/{service}/{node id}`;
//! - `go-micro`: go-micro's etcd registry, so Go services on go-micro and apps behind
//!   pillion share one registry. It follows go-micro's `registry/etcd/etcd.go`, the
//!   same from v1.18.0 to v5: keys `/micro/registry/{service}/{node id}` with `/`
//!   replaced by `-` in both (`nodePath`), the value `json.Marshal` of a
//!   `registry.Service` holding that one node, whose `address` is `host:port`
//!   (go-micro's `Node` has had no `port` since v1.10). A value is read with the same
//!   leniency as the API's input (`null` fields, upper-case keys, a separate `port`),
//!   so what Go marshals is taken as it is.
//!
//! Every write is an event in every sidecar's watch, so with n sidecars a write per
//! renewal would make watch traffic grow as n². Writes are therefore kept to changes:
//!
//! - each sidecar holds one lease ([`LEASE_TTL`]), kept alive over one gRPC
//!   `LeaseKeepAlive` stream, and writes every key under it: when the sidecar dies,
//!   its keys vanish within [`LEASE_TTL`], whatever their own TTL;
//! - a registration equal to what etcd already holds under that lease (a renewal)
//!   writes nothing;
//! - a registration's own TTL is a deadline kept by this sidecar, which deletes the
//!   key when it lapses.
//!
//! The catalog is a local cache of the prefix: one range read, then a watch from the
//! next revision, re-done from scratch whenever the watch breaks; each watch event
//! rebuilds only the services it names ([`Catalog::with_service`]). Writes wait until
//! the watch has seen them, so a client reads its own registration right after `POST`.
//! The watch asks for progress notifications; one that stays silent (no event, no
//! notification) for [`WATCH_SILENCE_LIMIT`] is presumed cut by a partition that
//! closed nothing, and is re-done, so the catalog cannot stay stale unnoticed.
//!
//! This sidecar remembers what it registered. When etcd says the lease is gone (etcd
//! restarted without its data, or the lease expired while this sidecar was cut off),
//! a new lease is granted and everything still owned is written again under it:
//! registrations are restored without restarting pillion.
//!
//! etcd is spoken to through its v3 JSON gateway (`/v3/kv/put`, `/v3/watch`, ...) with
//! pillion-http's client (the one every other HTTP call of the sidecar uses), except
//! the keep-alive: the gateway cannot carry a stream of requests, so that one call is
//! gRPC over h2c, its two small messages encoded by hand. That keeps gRPC code
//! generation and a protobuf compiler out of the build.

use std::collections::{BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Frame;
use pillion_core::Service;
use pillion_http::pool::{Outgoing, PooledBody};
use pillion_http::{describe, Client};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{
    deregisters, per_node, BackendStatus, Catalog, Deadlines, Registry, RegistryError, Tasks,
};

/// Where registrations live in etcd's keyspace, in pillion's layout.
pub const PREFIX: &str = "/pillion/registry/";
/// Where go-micro's etcd registry keeps services (`prefix` in go-micro's
/// `registry/etcd/etcd.go`, v1.18.0 to v5; `/micro-registry/` before, in go-plugins).
pub const GO_MICRO_PREFIX: &str = "/micro/registry/";

/// How registrations are laid out in etcd's keyspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Pillion,
    GoMicro,
}

impl Layout {
    /// Its name in a URL's `layout=`.
    fn name(self) -> &'static str {
        match self {
            Layout::Pillion => "pillion",
            Layout::GoMicro => "go-micro",
        }
    }

    fn default_prefix(self) -> &'static str {
        match self {
            Layout::Pillion => PREFIX,
            Layout::GoMicro => GO_MICRO_PREFIX,
        }
    }
}

/// What an etcd registry URL names:
/// `etcd://host:port[,host:port...][?layout=pillion|go-micro][&prefix=/key/prefix/]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub endpoints: Vec<String>,
    pub layout: Layout,
    /// Ends with `/`.
    pub prefix: String,
}

impl Target {
    /// The key of node `id` of service `name`.
    fn key(&self, name: &str, id: &str) -> String {
        match self.layout {
            Layout::Pillion => format!("{}{name}/{id}", self.prefix),
            // go-micro's nodePath: path.Join(prefix, service, node), '/' made '-'.
            Layout::GoMicro => format!(
                "{}{}/{}",
                self.prefix,
                name.replace('/', "-"),
                id.replace('/', "-")
            ),
        }
    }

    /// A one-node registration as this layout stores it: in go-micro's, the port goes
    /// into `address`, where go-micro reads it.
    fn stored(&self, mut reg: Service) -> Service {
        if self.layout == Layout::GoMicro {
            for node in &mut reg.nodes {
                node.address = node.endpoint();
                node.port = 0;
            }
        }
        reg
    }

    /// The URL's query, as the backend is shown (empty for the defaults).
    fn query(&self) -> String {
        let mut query = Vec::new();
        if self.layout != Layout::Pillion {
            query.push(format!("layout={}", self.layout.name()));
        }
        if self.prefix != self.layout.default_prefix() {
            query.push(format!("prefix={}", self.prefix));
        }
        if query.is_empty() {
            String::new()
        } else {
            format!("?{}", query.join("&"))
        }
    }
}
/// TTL of the sidecar's lease, which holds every key the sidecar writes: how long its
/// registrations outlive it when it dies without closing (plus etcd's expiry check,
/// half a second). etcd's own minimum lease is 3 s.
pub const LEASE_TTL: Duration = Duration::from_secs(5);
/// How often the lease is kept alive: a keep-alive may be lost or late several
/// times before the lease lapses.
const KEEPALIVE_EVERY: Duration = Duration::from_secs(1);
/// Limit for one unary gateway call, and for one keep-alive's answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a write waits for the watch to show it before returning anyway.
const READ_YOUR_WRITE_LIMIT: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How long close waits for the tasks to finish the call to etcd in hand.
const STOP_WAIT: Duration = Duration::from_secs(2 * CALL_TIMEOUT.as_secs());
/// How long a watch may go without any message (event or progress notification)
/// before it is re-done from a range read. etcd sends progress notifications every
/// 10 min by default (`--experimental-watch-progress-notify-interval`), so on a quiet
/// prefix the watch is re-done once a minute (one range read); with an etcd interval
/// under a minute, only a partition triggers it. Either way a cut that closed no
/// connection is caught within a minute.
pub const WATCH_SILENCE_LIMIT: Duration = Duration::from_secs(60);
/// gRPC status NOT_FOUND, the `code` etcd's gateway answers for a lease it does not have.
const GRPC_NOT_FOUND: i64 = 5;

pub struct EtcdRegistry {
    inner: Arc<Inner>,
    tasks: Tasks,
}

struct Inner {
    backend: String,
    /// Where keys go and how values are written.
    target: Target,
    gateway: Gateway,
    /// [`WATCH_SILENCE_LIMIT`], shorter in tests.
    watch_silence: Duration,
    /// The prefix as last seen by the watch.
    cache: Mutex<Cache>,
    catalog: ArcSwap<Catalog>,
    changes: watch::Sender<u64>,
    seen_revision: watch::Sender<i64>,
    health: Mutex<Health>,
    /// What this sidecar wrote. An async mutex: it is held across calls to etcd so a
    /// restore, a registration and an expiry never interleave.
    owned: tokio::sync::Mutex<Owned>,
    /// The lease of `owned` (0: none yet), for the keep-alive, which must not wait
    /// behind a registration's calls to etcd for the lock.
    lease: AtomicI64,
    /// Woken when a registration sets a deadline, so the expiry task sleeps until the
    /// new first one.
    deadline_set: Notify,
}

#[derive(Default)]
struct Owned {
    /// The sidecar's lease, which holds every key in `keys`.
    lease: Option<i64>,
    /// key -> the value written.
    keys: HashMap<String, Vec<u8>>,
    /// When the keys registered with a TTL lapse.
    deadlines: Deadlines<String>,
}

/// The registry prefix as the watch shows it.
#[derive(Default)]
struct Cache {
    /// key -> the registration and the lease it is held by.
    regs: HashMap<String, (Service, i64)>,
    /// service name -> its keys, so one service's registrations are found without a
    /// scan of every key.
    keys: HashMap<String, BTreeSet<String>>,
}

impl Cache {
    /// Records a put; `touched` gets the names whose entry changed.
    fn put(&mut self, key: String, reg: Service, lease: i64, touched: &mut BTreeSet<String>) {
        let name = reg.name.clone();
        match self.regs.insert(key.clone(), (reg, lease)) {
            // The same registration written again (a restore): the catalog is unchanged.
            Some((old, _)) if old == self.regs[&key].0 => return,
            Some((old, _)) if old.name != name => {
                self.unindex(&old.name, &key);
                touched.insert(old.name);
            }
            _ => {}
        }
        self.keys.entry(name.clone()).or_default().insert(key);
        touched.insert(name);
    }

    fn delete(&mut self, key: &str, touched: &mut BTreeSet<String>) {
        if let Some((old, _)) = self.regs.remove(key) {
            self.unindex(&old.name, key);
            touched.insert(old.name);
        }
    }

    fn unindex(&mut self, name: &str, key: &str) {
        if let Some(keys) = self.keys.get_mut(name) {
            keys.remove(key);
            if keys.is_empty() {
                self.keys.remove(name);
            }
        }
    }

    /// The registrations of `name`, in key order.
    fn registrations<'a>(&'a self, name: &str) -> impl Iterator<Item = &'a Service> + 'a {
        let keys = self.keys.get(name);
        keys.into_iter()
            .flatten()
            .filter_map(|k| self.regs.get(k).map(|(reg, _)| reg))
    }

    /// Whether etcd holds `reg` at `key` under `lease`, as far as the watch shows.
    fn holds(&self, key: &str, reg: &Service, lease: i64) -> bool {
        self.regs
            .get(key)
            .is_some_and(|(r, l)| *l == lease && r == reg)
    }
}

/// Whether etcd is reachable, as both long-lived calls see it: the backend is healthy
/// when the watch and the keep-alive both work.
struct Health {
    state: Connection,
    /// Why the watch, or the keep-alive, does not work; `None` once it does. Both
    /// start as "connecting".
    watch: Option<String>,
    lease: Option<String>,
}

#[derive(Clone, Copy)]
enum Part {
    Watch,
    Lease,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Connection {
    Connecting,
    Up,
    Down,
}

impl EtcdRegistry {
    /// Parses `etcd://host:port[,host:port...]` and starts the watch, keep-alive and
    /// expiry tasks. Does not wait for etcd: until it answers, the registry reports
    /// itself unhealthy and writes fail with [`RegistryError::Unavailable`].
    pub fn connect(url: &str) -> Result<Self, RegistryError> {
        Self::connect_with(url, WATCH_SILENCE_LIMIT)
    }

    fn connect_with(url: &str, watch_silence: Duration) -> Result<Self, RegistryError> {
        let target = parse_url(url)?;
        let tls = url.starts_with(TLS_SCHEME);
        let backend = format!(
            "{}{}{}",
            if tls { TLS_SCHEME } else { "etcd://" },
            target.endpoints.join(","),
            target.query()
        );
        let inner = Arc::new(Inner {
            gateway: Gateway::new(target.endpoints.clone(), tls),
            target,
            backend,
            watch_silence,
            cache: Mutex::new(Cache::default()),
            catalog: ArcSwap::from_pointee(Catalog::default()),
            changes: watch::channel(0).0,
            seen_revision: watch::channel(0).0,
            health: Mutex::new(Health {
                state: Connection::Connecting,
                watch: Some("connecting".into()),
                lease: Some("connecting".into()),
            }),
            owned: tokio::sync::Mutex::new(Owned::default()),
            lease: AtomicI64::new(0),
            deadline_set: Notify::new(),
        });
        let tasks = Tasks::default();
        tasks.spawn(watch_loop(inner.clone(), tasks.token()));
        tasks.spawn(lease_loop(inner.clone(), tasks.token()));
        tasks.spawn(expiry_loop(inner.clone(), tasks.token()));
        Ok(EtcdRegistry { inner, tasks })
    }
}

/// etcd over TLS (https:// to its gateway), checked against the system's roots or
/// the PEM file named by `SSL_CERT_FILE`.
pub const TLS_SCHEME: &str = "etcds://";

pub(crate) fn parse_url(url: &str) -> Result<Target, RegistryError> {
    // Never repeat a password back: show the URL without what precedes an '@'.
    let shown = match url.split_once('@') {
        Some((_, host)) => format!("etcd://***@{host}"),
        None => url.to_string(),
    };
    let invalid = |why: &str| {
        RegistryError::Invalid(format!(
            "registry URL {shown:?} {why}: write etcd://host:port[,host:port...][?layout=go-micro] (etcds:// for TLS)"
        ))
    };
    let rest = url
        .strip_prefix("etcd://")
        .or_else(|| url.strip_prefix(TLS_SCHEME))
        .ok_or_else(|| invalid("is not an etcd URL"))?;
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    if rest.contains('@') {
        return Err(invalid(
            "has credentials, which are not supported (etcd auth is not implemented yet)",
        ));
    }
    let rest = rest.trim_end_matches('/');
    let endpoints: Vec<String> = rest.split(',').map(|s| s.trim().to_string()).collect();
    for e in &endpoints {
        let ok = e
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
        if !ok {
            return Err(invalid(&format!("has an endpoint {e:?} without host:port")));
        }
    }
    let mut layout = Layout::Pillion;
    let mut prefix = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("layout", "pillion")) => layout = Layout::Pillion,
            Some(("layout", "go-micro")) => layout = Layout::GoMicro,
            Some(("layout", other)) => {
                return Err(invalid(&format!(
                    "has layout={other:?}; the layouts are pillion (the default) and go-micro"
                )))
            }
            Some(("prefix", p)) if p.starts_with('/') && p.len() > 1 => {
                prefix = Some(format!("{}/", p.trim_end_matches('/')));
            }
            Some(("prefix", p)) => {
                return Err(invalid(&format!(
                    "has prefix={p:?}; a key prefix starts with '/', such as /micro-registry/"
                )))
            }
            _ => {
                return Err(invalid(&format!(
                    "has an unknown parameter {pair:?}; the parameters are layout and prefix"
                )))
            }
        }
    }
    let prefix = prefix.unwrap_or_else(|| layout.default_prefix().to_string());
    Ok(Target {
        endpoints,
        layout,
        prefix,
    })
}

/// The end of the key range that holds every key starting with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    *end.last_mut().expect("non-empty prefix") += 1;
    end
}

fn ttl_secs(ttl: Duration) -> i64 {
    (ttl.as_secs_f64().ceil() as i64).max(1)
}

/// The lease id of a `/v3/lease/grant` answer. Anything but a positive integer is an
/// error: lease 0 means "no lease" to etcd, a key that never expires.
fn lease_id(res: &Value) -> Result<i64, GatewayError> {
    let id = match &res["ID"] {
        Value::String(s) => s.parse::<i64>().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    };
    id.filter(|id| *id > 0).ok_or_else(|| GatewayError::Etcd {
        code: None,
        message: format!("lease grant answered without a usable lease id: {res}"),
    })
}

/// etcd's gateway writes 64-bit integers as JSON strings.
fn int(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

impl Inner {
    fn unavailable(&self, e: GatewayError) -> RegistryError {
        RegistryError::Unavailable {
            backend: self.backend.clone(),
            detail: e.to_string(),
        }
    }

    /// Records whether `part` works (`None`) or why not.
    fn set_health(&self, part: Part, result: Option<String>) {
        let mut h = self.health.lock().unwrap_or_else(|e| e.into_inner());
        let failed = result.is_some();
        match part {
            Part::Watch => h.watch = result,
            Part::Lease => h.lease = result,
        }
        let error = h.watch.clone().or_else(|| h.lease.clone());
        let next = if error.is_none() {
            Connection::Up
        } else if h.state == Connection::Connecting && !failed {
            // One part works and the other has not answered yet.
            Connection::Connecting
        } else {
            Connection::Down
        };
        match (h.state, next) {
            (Connection::Connecting, Connection::Up) => {
                tracing::info!(backend = %self.backend, "registry backend connected")
            }
            (Connection::Down, Connection::Up) => {
                tracing::info!(backend = %self.backend, "registry backend reconnected")
            }
            (Connection::Up | Connection::Connecting, Connection::Down) => tracing::warn!(
                backend = %self.backend,
                error = error.as_deref().unwrap_or(""),
                "registry backend unreachable; retrying"
            ),
            _ => {}
        }
        h.state = next;
    }

    fn is_up(&self) -> bool {
        self.health.lock().unwrap_or_else(|e| e.into_inner()).state == Connection::Up
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Swaps in a catalog whose entries for `touched` follow the cache, sharing the
    /// rest. Called with the cache locked, so catalogs never go back in time.
    fn publish(&self, cache: &Cache, touched: &BTreeSet<String>) {
        let current = self.catalog.load_full();
        let mut next: Option<Catalog> = None;
        for name in touched {
            let base = next.as_ref().unwrap_or(&current);
            next = Some(base.with_service(name, cache.registrations(name)));
        }
        if let Some(next) = next {
            self.catalog.store(Arc::new(next));
            self.changes.send_modify(|v| *v += 1);
        }
    }

    /// Swaps in a catalog built from the whole cache, unless it equals the current one.
    fn publish_all(&self, cache: &Cache) {
        let next = Catalog::build(cache.keys.keys().flat_map(|n| cache.registrations(n)));
        if **self.catalog.load() != next {
            self.catalog.store(Arc::new(next));
            self.changes.send_modify(|v| *v += 1);
        }
    }

    async fn grant(&self, ttl: i64) -> Result<i64, GatewayError> {
        let res = self
            .gateway
            .call("/v3/lease/grant", json!({ "TTL": ttl }))
            .await?;
        lease_id(&res)
    }

    async fn put(&self, key: &str, value: &[u8], lease: i64) -> Result<i64, GatewayError> {
        let res = self
            .gateway
            .call(
                "/v3/kv/put",
                json!({ "key": B64.encode(key), "value": B64.encode(value), "lease": lease.to_string() }),
            )
            .await?;
        Ok(int(&res["header"]["revision"]))
    }

    /// Deletes `key`: (keys deleted, revision).
    async fn delete(&self, key: &str) -> Result<(usize, i64), GatewayError> {
        let res = self
            .gateway
            .call("/v3/kv/deleterange", json!({ "key": B64.encode(key) }))
            .await?;
        Ok((
            int(&res["deleted"]) as usize,
            int(&res["header"]["revision"]),
        ))
    }

    /// The sidecar's lease. A new one (the first, or one replacing a lost lease) has
    /// every key this sidecar owns written under it before it is used.
    async fn session_lease(&self, owned: &mut Owned) -> Result<i64, GatewayError> {
        if let Some(id) = owned.lease {
            return Ok(id);
        }
        let id = self.grant(ttl_secs(LEASE_TTL)).await?;
        // A put that fails leaves the keys written so far under a lease nobody keeps
        // alive: they lapse with it, unless the next lease's restore rewrites them first.
        let mut rev = 0;
        for (key, value) in &owned.keys {
            rev = self.put(key, value, id).await?;
        }
        if !owned.keys.is_empty() {
            tracing::info!(
                backend = %self.backend,
                registrations = owned.keys.len(),
                "registrations written again under a new lease"
            );
        }
        owned.lease = Some(id);
        self.lease.store(id, Ordering::Relaxed);
        if rev > 0 {
            self.wait_seen(rev).await;
        }
        Ok(id)
    }

    /// Forgets `lost` (if it is still the lease), so that the next use grants a new
    /// one and restores the keys under it.
    fn lose_lease(&self, owned: &mut Owned, lost: i64) {
        if owned.lease == Some(lost) {
            owned.lease = None;
            self.lease.store(0, Ordering::Relaxed);
        }
    }

    /// The current lease without waiting for the lock, or a new one.
    async fn current_lease(&self) -> Result<i64, GatewayError> {
        match self.lease.load(Ordering::Relaxed) {
            0 => self.session_lease(&mut *self.owned.lock().await).await,
            id => Ok(id),
        }
    }

    /// Writes the per-node registrations `regs` (key, registration, value) that etcd
    /// does not already hold under the lease, and records them as owned with
    /// `deadline`. Returns the revision of the last write (0: nothing written).
    async fn write(
        &self,
        owned: &mut Owned,
        regs: &[(String, Service, Vec<u8>)],
        deadline: Option<Instant>,
    ) -> Result<i64, (GatewayError, i64)> {
        let lease = self.session_lease(owned).await.map_err(|e| (e, 0))?;
        // While etcd is out of reach, nothing is taken as held: the write is tried,
        // and refused, so that no registration is acknowledged that etcd may not have.
        let up = self.is_up();
        let mut rev = 0;
        for (key, reg, value) in regs {
            let held =
                up && owned.keys.get(key) == Some(value) && self.cache().holds(key, reg, lease);
            if !held {
                rev = self.put(key, value, lease).await.map_err(|e| (e, lease))?;
            }
            owned.keys.insert(key.clone(), value.clone());
            owned.deadlines.set(key, deadline);
        }
        Ok(rev)
    }

    async fn wait_seen(&self, revision: i64) {
        let mut rx = self.seen_revision.subscribe();
        let _ = tokio::time::timeout(READ_YOUR_WRITE_LIMIT, rx.wait_for(|s| *s >= revision)).await;
    }
}

/// Keeps the sidecar's lease alive over a keep-alive stream, opened again whenever it
/// breaks. When etcd answers that the lease is gone, a new one is granted and this
/// sidecar's keys are written again under it. Stops at `stop`, once a keep-alive or a
/// new lease under way is done (so that close revokes the lease that holds the keys).
async fn lease_loop(inner: Arc<Inner>, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let e = match keep_lease(&inner, &mut backoff, &stop).await {
            Ok(()) => return,
            Err(e) => e,
        };
        inner.set_health(Part::Lease, Some(e.to_string()));
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.cancelled() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One keep-alive stream, followed until it breaks (an error) or `stop` (`Ok`).
async fn keep_lease(
    inner: &Inner,
    backoff: &mut Duration,
    stop: &CancellationToken,
) -> Result<(), GatewayError> {
    let mut stream = tokio::select! {
        s = KeepAlive::connect(&inner.gateway) => s?,
        _ = stop.cancelled() => return Ok(()),
    };
    loop {
        let id = inner.current_lease().await?;
        let ttl = stream.keep_alive(id).await?;
        *backoff = Duration::from_millis(100);
        inner.set_health(Part::Lease, None);
        if ttl <= 0 {
            tracing::warn!(
                backend = %inner.backend,
                "registry lease lost (etcd restarted without its data, or the lease lapsed while etcd was out of reach); writing this sidecar's registrations again"
            );
            let mut owned = inner.owned.lock().await;
            inner.lose_lease(&mut owned, id);
            inner.session_lease(&mut owned).await?;
            continue;
        }
        tokio::select! {
            _ = tokio::time::sleep(KEEPALIVE_EVERY) => {}
            _ = stop.cancelled() => return Ok(()),
        }
    }
}

/// Deletes this sidecar's registrations whose own TTL lapsed, sleeping until the next
/// deadline; until `stop`, once the deletions under way are done.
async fn expiry_loop(inner: Arc<Inner>, stop: CancellationToken) {
    /// How soon a deletion that etcd did not take is tried again.
    const RETRY: Duration = Duration::from_secs(1);
    loop {
        let next = {
            let mut owned = inner.owned.lock().await;
            let now = Instant::now();
            let mut lapsed = owned.deadlines.lapsed(now).into_iter();
            while let Some(key) = lapsed.next() {
                match inner.delete(&key).await {
                    Ok(_) => {
                        owned.keys.remove(&key);
                    }
                    Err(e) => {
                        // etcd is out of reach: keep these for the next round. (Should
                        // this sidecar die meanwhile, the keys lapse with its lease.)
                        tracing::debug!(backend = %inner.backend, error = %e, "could not delete a lapsed registration; retrying");
                        for key in std::iter::once(key).chain(lapsed.by_ref()) {
                            owned.deadlines.set(&key, Some(now + RETRY));
                        }
                    }
                }
            }
            owned.deadlines.next()
        };
        let until = next.unwrap_or_else(Instant::now);
        tokio::select! {
            _ = tokio::time::sleep_until(until), if next.is_some() => {}
            _ = inner.deadline_set.notified() => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Keeps the catalog equal to etcd's prefix: range, then watch; again on any break.
/// Until `stop`: it only reads, so a read under way is simply dropped.
async fn watch_loop(inner: Arc<Inner>, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let watched = tokio::select! {
            w = sync_and_watch(&inner, &mut backoff) => w,
            _ = stop.cancelled() => return,
        };
        match watched {
            // Not an outage (etcd may just be quiet): re-sync at once, health unchanged.
            // If etcd is really cut off, the range read of the re-sync says so.
            Err(GatewayError::Silent(limit)) => {
                tracing::debug!(backend = %inner.backend, "no watch event or progress notification for {limit:?}; watching again");
                continue;
            }
            Err(e) => inner.set_health(Part::Watch, Some(e.to_string())),
            Ok(never) => match never {},
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.cancelled() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// The watch of the whole registry prefix from `revision` on, with progress
/// notifications so that a healthy watch is never silent for long.
fn watch_request(prefix: &str, revision: i64) -> Value {
    json!({ "create_request": {
        "key": B64.encode(prefix),
        "range_end": B64.encode(prefix_end(prefix)),
        "start_revision": revision.to_string(),
        "progress_notify": true,
    }})
}

/// Waits for the next frame of a watch stream; none within `limit` is
/// [`GatewayError::Silent`].
async fn within_silence<T>(
    limit: Duration,
    next: impl std::future::Future<Output = T>,
) -> Result<T, GatewayError> {
    tokio::time::timeout(limit, next)
        .await
        .map_err(|_| GatewayError::Silent(limit))
}

/// Syncs the cache and follows the watch; returns only when the watch ends.
async fn sync_and_watch(
    inner: &Inner,
    backoff: &mut Duration,
) -> Result<std::convert::Infallible, GatewayError> {
    let prefix = &inner.target.prefix;
    let end = prefix_end(prefix);
    let res = inner
        .gateway
        .call(
            "/v3/kv/range",
            json!({ "key": B64.encode(prefix), "range_end": B64.encode(&end) }),
        )
        .await?;
    let revision = int(&res["header"]["revision"]);
    {
        let mut cache = inner.cache();
        *cache = Cache::default();
        let mut touched = BTreeSet::new();
        for kv in res["kvs"].as_array().into_iter().flatten() {
            apply_put(&mut cache, kv, &mut touched);
        }
        inner.publish_all(&cache);
    }
    inner.seen_revision.send_replace(revision);
    inner.set_health(Part::Watch, None);
    *backoff = Duration::from_millis(100);

    let mut body = inner
        .gateway
        .stream("/v3/watch", watch_request(prefix, revision + 1))
        .await?;
    let mut buf = BytesMut::new();
    while let Some(frame) = within_silence(inner.watch_silence, body.frame()).await? {
        let frame = frame.map_err(|e| GatewayError::Unreachable(describe(&*e)))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        // The gateway streams one JSON object per watch response, back to back.
        let mut stream = serde_json::Deserializer::from_slice(&buf).into_iter::<Value>();
        let mut consumed = 0;
        let mut messages = Vec::new();
        while let Some(item) = stream.next() {
            match item {
                Ok(v) => {
                    messages.push(v);
                    consumed = stream.byte_offset();
                }
                Err(e) if e.is_eof() => break,
                Err(e) => {
                    return Err(GatewayError::Etcd {
                        code: None,
                        message: format!("bad watch message: {e}"),
                    })
                }
            }
        }
        buf.advance(consumed);
        for msg in messages {
            let result = &msg["result"];
            if msg.get("error").is_some() || result["canceled"] == json!(true) {
                return Err(GatewayError::Etcd {
                    code: None,
                    message: format!("watch ended: {msg}"),
                });
            }
            if let Some(events) = result["events"].as_array() {
                let mut cache = inner.cache();
                let mut touched = BTreeSet::new();
                for ev in events {
                    if ev["type"] == "DELETE" {
                        let key = decode(&ev["kv"]["key"]);
                        cache.delete(&String::from_utf8_lossy(&key), &mut touched);
                    } else {
                        apply_put(&mut cache, &ev["kv"], &mut touched);
                    }
                }
                inner.publish(&cache, &touched);
            }
            let rev = int(&result["header"]["revision"]);
            inner.seen_revision.send_if_modified(|s| {
                let newer = rev > *s;
                if newer {
                    *s = rev;
                }
                newer
            });
        }
    }
    Err(GatewayError::Unreachable("watch stream closed".into()))
}

fn decode(v: &Value) -> Vec<u8> {
    v.as_str()
        .and_then(|s| B64.decode(s).ok())
        .unwrap_or_default()
}

fn apply_put(cache: &mut Cache, kv: &Value, touched: &mut BTreeSet<String>) {
    let key = String::from_utf8_lossy(&decode(&kv["key"])).into_owned();
    // Read as the API reads a registration: what Go marshals (nulls, a separate port
    // of old go-micro) is taken, what the API would refuse is left out.
    match Service::from_json(&decode(&kv["value"])) {
        Ok(reg) if !reg.nodes.is_empty() => cache.put(key, reg, int(&kv["lease"]), touched),
        Ok(_) => tracing::warn!(%key, "ignoring a registry key whose service has no node"),
        // A value another program wrote under the prefix: ignore it, loudly.
        Err(e) => {
            tracing::warn!(%key, error = %e, "ignoring a registry key whose value is not a usable registration")
        }
    }
}

#[async_trait::async_trait]
impl Registry for EtcdRegistry {
    async fn register(
        &self,
        service: &Service,
        ttl: Option<Duration>,
    ) -> Result<(), RegistryError> {
        let inner = &self.inner;
        let deadline = ttl.map(|t| Instant::now() + t);
        let target = &inner.target;
        let regs: Vec<(String, Service, Vec<u8>)> = per_node(service)
            .map(|reg| {
                let reg = target.stored(reg);
                let value = serde_json::to_vec(&reg).expect("service serializes");
                (target.key(&reg.name, &reg.nodes[0].id), reg, value)
            })
            .collect();
        let mut owned = inner.owned.lock().await;
        let rev = match inner.write(&mut owned, &regs, deadline).await {
            Ok(rev) => rev,
            Err((e, lease)) if e.is_lease_not_found() => {
                // etcd lost the lease before the keep-alive noticed: take a new one
                // (which restores everything owned) and write this registration again.
                inner.lose_lease(&mut owned, lease);
                inner
                    .write(&mut owned, &regs, deadline)
                    .await
                    .map_err(|(e, _)| inner.unavailable(e))?
            }
            Err((e, _)) => return Err(inner.unavailable(e)),
        };
        drop(owned);
        if deadline.is_some() {
            inner.deadline_set.notify_one();
        }
        if rev > 0 {
            inner.wait_seen(rev).await;
        }
        Ok(())
    }

    async fn deregister(&self, service: &Service) -> Result<usize, RegistryError> {
        let inner = &self.inner;
        let mut keys: Vec<String> = {
            let cache = inner.cache();
            cache
                .keys
                .get(&service.name)
                .into_iter()
                .flatten()
                .filter(|k| {
                    cache
                        .regs
                        .get(*k)
                        .is_some_and(|(reg, _)| deregisters(service, reg))
                })
                .cloned()
                .collect()
        };
        let mut owned = inner.owned.lock().await;
        // Also keys we wrote that the watch has not shown yet.
        for node in &service.nodes {
            let key = inner.target.key(&service.name, &node.id);
            if owned.keys.contains_key(&key) && !keys.contains(&key) {
                keys.push(key);
            }
        }
        let mut removed = 0;
        let mut rev = 0;
        for key in &keys {
            let (deleted, at) = inner.delete(key).await.map_err(|e| inner.unavailable(e))?;
            removed += deleted;
            rev = at;
            owned.keys.remove(key);
            owned.deadlines.set(key, None);
        }
        drop(owned);
        inner.wait_seen(rev).await;
        Ok(removed)
    }

    fn catalog(&self) -> Arc<Catalog> {
        self.inner.catalog.load_full()
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    fn status(&self) -> BackendStatus {
        let h = self.inner.health.lock().unwrap_or_else(|e| e.into_inner());
        BackendStatus {
            backend: self.inner.backend.clone(),
            healthy: h.state == Connection::Up,
            error: h.watch.clone().or_else(|| h.lease.clone()),
        }
    }

    /// Stops the tasks (a keep-alive, a new lease or a deletion under way is finished
    /// first), then revokes the lease.
    async fn close(&self) {
        self.tasks.stop(STOP_WAIT).await;
        let mut owned = self.inner.owned.lock().await;
        if let Some(id) = owned.lease.take() {
            if self.inner.is_up() {
                let _ = self
                    .inner
                    .gateway
                    .call("/v3/lease/revoke", json!({ "ID": id.to_string() }))
                    .await;
            }
        }
        self.inner.lease.store(0, Ordering::Relaxed);
        owned.keys.clear();
        owned.deadlines = Deadlines::default();
    }
}

#[derive(Debug, Clone, thiserror::Error)]
enum GatewayError {
    #[error("{0}")]
    Unreachable(String),
    /// An error etcd reported; `code` is the gRPC status code of the gateway's JSON.
    #[error("etcd answered: {message}")]
    Etcd { code: Option<i64>, message: String },
    /// The watch stream stayed open but carried nothing for this long.
    #[error("the watch was silent for {0:?}")]
    Silent(Duration),
}

impl GatewayError {
    /// The error of a gateway answer that is not a success: the gateway's JSON
    /// (`{"error","message","code"}`), or the status and body when it is not JSON.
    fn from_answer(status: http::StatusCode, body: &[u8]) -> GatewayError {
        let value: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let message = value["message"]
            .as_str()
            .or(value["error"].as_str())
            .map(str::to_string)
            .unwrap_or_else(|| format!("{status}: {}", String::from_utf8_lossy(body)));
        GatewayError::Etcd {
            code: value["code"].as_i64(),
            message,
        }
    }

    /// etcd does not have the lease (it expired, or etcd lost its data). Decided by
    /// the gRPC code, never by the message's wording.
    fn is_lease_not_found(&self) -> bool {
        matches!(
            self,
            GatewayError::Etcd {
                code: Some(GRPC_NOT_FOUND),
                ..
            }
        )
    }
}

/// etcd's v3 JSON gateway on one or more endpoints, failing over between them.
struct Gateway {
    endpoints: Vec<String>,
    current: AtomicUsize,
    client: Client,
    /// `http` or `https`.
    scheme: &'static str,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Gateway {
    fn new(endpoints: Vec<String>, tls: bool) -> Self {
        let tls = tls.then(|| Arc::new(pillion_http::tls::system_client_config()));
        Gateway {
            endpoints,
            current: AtomicUsize::new(0),
            client: Client::with_tls(Default::default(), Duration::from_secs(1), tls.clone()),
            scheme: if tls.is_some() { "https" } else { "http" },
            tls,
        }
    }

    async fn send(
        &self,
        path: &str,
        body: &Value,
    ) -> Result<http::Response<PooledBody>, GatewayError> {
        let n = self.endpoints.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut last = String::new();
        for i in 0..n {
            let idx = (start + i) % n;
            let endpoint = &self.endpoints[idx];
            let req = http::Request::post(format!("{}://{endpoint}{path}", self.scheme))
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Outgoing::full(Bytes::from(body.to_string())))
                .expect("request builds");
            match self.client.send(req, CALL_TIMEOUT).await {
                Ok(res) => {
                    self.current.store(idx, Ordering::Relaxed);
                    return Ok(res);
                }
                Err(e) => last = format!("{endpoint}: {}", describe(&e)),
            }
        }
        Err(GatewayError::Unreachable(last))
    }

    /// A unary call: the response JSON, or the error etcd gave.
    async fn call(&self, path: &str, body: Value) -> Result<Value, GatewayError> {
        let attempt = async {
            let res = self.send(path, &body).await?;
            let status = res.status();
            let bytes = pillion_http::client::read_answer(res.into_body())
                .await
                .map_err(|e| GatewayError::Unreachable(describe(&e)))?;
            if !status.is_success() {
                return Err(GatewayError::from_answer(status, &bytes));
            }
            Ok(serde_json::from_slice(&bytes).unwrap_or(Value::Null))
        };
        tokio::time::timeout(CALL_TIMEOUT, attempt)
            .await
            .map_err(|_| GatewayError::Unreachable(format!("no answer within {CALL_TIMEOUT:?}")))?
    }

    /// A streaming call (watch): the response body, read by the caller.
    async fn stream(&self, path: &str, body: Value) -> Result<PooledBody, GatewayError> {
        let res = tokio::time::timeout(CALL_TIMEOUT, self.send(path, &body))
            .await
            .map_err(|_| {
                GatewayError::Unreachable(format!("no answer within {CALL_TIMEOUT:?}"))
            })??;
        if !res.status().is_success() {
            return Err(GatewayError::Etcd {
                code: None,
                message: format!("watch refused: {}", res.status()),
            });
        }
        Ok(res.into_body())
    }
}

/// etcd's gRPC `Lease/LeaseKeepAlive` stream over h2c: one request message per
/// keep-alive on one long-lived HTTP/2 stream, one answer to each.
///
/// The messages are encoded by hand: the request is `LeaseKeepAliveRequest { int64 ID
/// = 1 }`; of the answer, `LeaseKeepAliveResponse { header = 1; int64 ID = 2; int64 TTL
/// = 3 }`, only the TTL is read (0 or absent: etcd does not have the lease).
struct KeepAlive {
    endpoint: String,
    send: hyper::client::conn::http2::SendRequest<Pings>,
    /// The open call: where requests go, where answers come from.
    call: Option<(mpsc::Sender<Bytes>, hyper::body::Incoming)>,
    buf: BytesMut,
    connection: JoinHandle<()>,
}

/// The request body of the keep-alive call: gRPC messages as they are queued.
struct Pings(mpsc::Receiver<Bytes>);

impl hyper::body::Body for Pings {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.get_mut()
            .0
            .poll_recv(cx)
            .map(|m| m.map(|b| Ok(Frame::data(b))))
    }
}

const KEEPALIVE_PATH: &str = "/etcdserverpb.Lease/LeaseKeepAlive";

impl KeepAlive {
    /// Opens an HTTP/2 connection to the first endpoint that takes one, starting with
    /// the one the gateway uses.
    async fn connect(gateway: &Gateway) -> Result<KeepAlive, GatewayError> {
        let n = gateway.endpoints.len();
        let start = gateway.current.load(Ordering::Relaxed);
        let mut last = String::new();
        for i in 0..n {
            let endpoint = &gateway.endpoints[(start + i) % n];
            match tokio::time::timeout(CALL_TIMEOUT, Self::connect_to(endpoint, &gateway.tls)).await
            {
                Ok(Ok(k)) => return Ok(k),
                Ok(Err(e)) => last = format!("{endpoint}: {e}"),
                Err(_) => last = format!("{endpoint}: no connection within {CALL_TIMEOUT:?}"),
            }
        }
        Err(GatewayError::Unreachable(last))
    }

    async fn connect_to(
        endpoint: &str,
        tls: &Option<Arc<rustls::ClientConfig>>,
    ) -> Result<KeepAlive, String> {
        let tcp = tokio::net::TcpStream::connect(endpoint)
            .await
            .map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        let tcp: pillion_http::stream::Stream = match tls {
            None => tcp.into(),
            Some(config) => {
                let host = endpoint.rsplit_once(':').map_or(endpoint, |(h, _)| h);
                let name = rustls::pki_types::ServerName::try_from(host.to_string())
                    .map_err(|e| format!("{host}: {e}"))?;
                pillion_http::stream::Connector::new((**config).clone(), name)
                    .connect(tcp, pillion_http::stream::Carry::H2)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?
            }
        };
        let (send, connection) =
            hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .map_err(|e| describe(&e))?;
        Ok(KeepAlive {
            endpoint: endpoint.to_string(),
            send,
            call: None,
            buf: BytesMut::new(),
            connection: tokio::spawn(async move {
                let _ = connection.await;
            }),
        })
    }

    /// Keeps `lease` alive once; its remaining TTL in seconds, 0 when etcd does not
    /// have it.
    async fn keep_alive(&mut self, lease: i64) -> Result<i64, GatewayError> {
        let endpoint = self.endpoint.clone();
        tokio::time::timeout(CALL_TIMEOUT, self.exchange(lease))
            .await
            .map_err(|_| {
                GatewayError::Unreachable(format!(
                    "{endpoint}: no keep-alive answer within {CALL_TIMEOUT:?}"
                ))
            })?
    }

    async fn exchange(&mut self, lease: i64) -> Result<i64, GatewayError> {
        let closed = |what: &str| GatewayError::Unreachable(format!("keep-alive stream {what}"));
        let message = keepalive_request(lease);
        match &self.call {
            Some((pings, _)) => pings.send(message).await.map_err(|_| closed("closed"))?,
            None => {
                // etcd answers the call's headers with the first answer, so the first
                // request must be queued before the call is made.
                let (pings, queue) = mpsc::channel(4);
                pings.try_send(message).expect("a new channel has room");
                let req = http::Request::post(format!("http://{}{KEEPALIVE_PATH}", self.endpoint))
                    .header(http::header::CONTENT_TYPE, "application/grpc")
                    .header(http::header::TE, "trailers")
                    .body(Pings(queue))
                    .expect("request builds");
                let res = self
                    .send
                    .send_request(req)
                    .await
                    .map_err(|e| GatewayError::Unreachable(describe(&e)))?;
                if let Some(e) = grpc_error(res.headers()) {
                    return Err(e);
                }
                if !res.status().is_success() {
                    return Err(GatewayError::Etcd {
                        code: None,
                        message: format!("keep-alive refused: {}", res.status()),
                    });
                }
                self.call = Some((pings, res.into_body()));
            }
        }
        loop {
            if let Some(ttl) = self.next_answer()? {
                return Ok(ttl);
            }
            let (_, answers) = self.call.as_mut().expect("the call is open");
            let frame = match answers.frame().await {
                None => return Err(closed("ended")),
                Some(Err(e)) => return Err(GatewayError::Unreachable(describe(&e))),
                Some(Ok(frame)) => frame,
            };
            match frame.into_data() {
                Ok(data) => self.buf.extend_from_slice(&data),
                Err(frame) => {
                    let error = frame.trailers_ref().and_then(grpc_error);
                    return Err(error.unwrap_or_else(|| closed("ended")));
                }
            }
        }
    }

    /// The TTL of the next complete answer in the buffer, if there is one.
    fn next_answer(&mut self) -> Result<Option<i64>, GatewayError> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        if self.buf[0] != 0 {
            return Err(GatewayError::Etcd {
                code: None,
                message: "keep-alive answer is compressed, which was not asked for".into(),
            });
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
        let len = len as usize;
        if self.buf.len() < 5 + len {
            return Ok(None);
        }
        let message = self.buf.split_to(5 + len);
        keepalive_ttl(&message[5..]).map(Some)
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

/// A gRPC error in the `grpc-status` of headers or trailers (None for status 0).
fn grpc_error(headers: &http::HeaderMap) -> Option<GatewayError> {
    let code: i64 = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    (code != 0).then(|| GatewayError::Etcd {
        code: Some(code),
        message: headers
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .unwrap_or("keep-alive failed")
            .to_string(),
    })
}

/// A framed `LeaseKeepAliveRequest { ID: lease }`.
fn keepalive_request(lease: i64) -> Bytes {
    let mut message = vec![0x08]; // field 1, varint
    let mut v = lease as u64;
    while v >= 0x80 {
        message.push((v as u8) | 0x80);
        v >>= 7;
    }
    message.push(v as u8);
    let mut framed = Vec::with_capacity(5 + message.len());
    framed.push(0); // not compressed
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    Bytes::from(framed)
}

fn varint(buf: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = buf.split_first()?;
        *buf = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Some(v);
        }
    }
    None
}

/// The TTL (field 3) of a `LeaseKeepAliveResponse`; 0 when absent, as protobuf
/// leaves out zero values.
fn keepalive_ttl(mut message: &[u8]) -> Result<i64, GatewayError> {
    let bad = || GatewayError::Etcd {
        code: None,
        message: "malformed keep-alive answer".into(),
    };
    let mut ttl = 0;
    while !message.is_empty() {
        let tag = varint(&mut message).ok_or_else(bad)?;
        let skip = match tag & 7 {
            0 => {
                let v = varint(&mut message).ok_or_else(bad)?;
                if tag >> 3 == 3 {
                    ttl = v as i64;
                }
                0
            }
            1 => 8,
            2 => varint(&mut message).ok_or_else(bad)? as usize,
            5 => 4,
            _ => return Err(bad()),
        };
        message = message.get(skip..).ok_or_else(bad)?;
    }
    Ok(ttl)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_endpoint_lists_and_refuses_the_rest() {
        let default = parse_url("etcd://127.0.0.1:2379").unwrap();
        assert_eq!(default.endpoints, ["127.0.0.1:2379"]);
        assert_eq!(
            (default.layout, default.prefix.as_str()),
            (Layout::Pillion, PREFIX)
        );
        assert_eq!(
            parse_url("etcd://a:1, b:2/").unwrap().endpoints,
            ["a:1".to_string(), "b:2".to_string()]
        );
        for bad in [
            "etcd://",
            "etcd://a",
            "etcd://a:0",
            "etcd://u:p@a:1",
            "etcd://a:1,,b:2",
            "etcd://a:1?layout=consul",
            "etcd://a:1?prefix=micro",
            "etcd://a:1?layout",
            "etcd://a:1?ttl=3",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
        let err = parse_url("etcd://u:secret@a:1").unwrap_err().to_string();
        assert!(err.contains("credentials"), "{err}");
        assert!(!err.contains("secret"), "the password leaked: {err}");
        let err = parse_url("etcd://a:1?layout=consul")
            .unwrap_err()
            .to_string();
        assert!(err.contains("pillion (the default) and go-micro"), "{err}");
    }

    #[test]
    fn go_micro_s_layout_is_its_prefix_and_its_node_path() {
        let t = parse_url("etcd://a:1/?layout=go-micro").unwrap();
        assert_eq!(
            (t.layout, t.prefix.as_str()),
            (Layout::GoMicro, GO_MICRO_PREFIX)
        );
        assert_eq!(t.query(), "?layout=go-micro");
        // go-micro's nodePath replaces '/' in both segments.
        assert_eq!(
            t.key("go.micro/srv", "n/1"),
            "/micro/registry/go.micro-srv/n-1"
        );
        let old = parse_url("etcd://a:1?layout=go-micro&prefix=/micro-registry").unwrap();
        assert_eq!(old.prefix, "/micro-registry/");
        assert_eq!(old.key("s", "n"), "/micro-registry/s/n");
        assert_eq!(old.query(), "?layout=go-micro&prefix=/micro-registry/");
        // A node registered with its port apart is stored with it in `address`.
        let reg = Service {
            name: "s".into(),
            nodes: vec![pillion_core::Node {
                id: "n".into(),
                address: "10.0.0.1".into(),
                port: 8080,
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(t.stored(reg.clone()).nodes[0].address, "10.0.0.1:8080");
        assert_eq!(t.stored(reg.clone()).nodes[0].port, 0);
        let pillion = parse_url("etcd://a:1").unwrap();
        assert_eq!(pillion.stored(reg.clone()), reg);
        assert_eq!(pillion.query(), "");
    }

    #[test]
    fn a_lease_id_that_is_not_a_positive_integer_is_an_error_not_lease_0() {
        assert_eq!(
            lease_id(&json!({"ID": "7587899321681467910"})).unwrap(),
            7587899321681467910
        );
        assert_eq!(lease_id(&json!({"ID": 42})).unwrap(), 42);
        for bad in [
            json!({"ID": "abc"}),
            json!({"ID": ""}),
            json!({"ID": "0"}),
            json!({"ID": "-3"}),
            json!({"ID": "99999999999999999999"}),
            json!({"TTL": "5"}),
            json!(null),
        ] {
            let err = lease_id(&bad).unwrap_err().to_string();
            assert!(err.contains("without a usable lease id"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_lost_lease_is_known_by_its_grpc_code_not_its_message() {
        let answer = |status: u16, body: &str| {
            GatewayError::from_answer(http::StatusCode::from_u16(status).unwrap(), body.as_bytes())
        };
        // What etcd 3.4's gateway answers to a put under a lease it does not have.
        let lost = answer(
            404,
            r#"{"error":"etcdserver: requested lease not found","message":"etcdserver: requested lease not found","code":5}"#,
        );
        assert!(lost.is_lease_not_found());
        assert_eq!(
            lost.to_string(),
            "etcd answered: etcdserver: requested lease not found"
        );
        // Another wording with the same code is the same condition...
        assert!(answer(404, r#"{"message":"lease gone","code":5}"#).is_lease_not_found());
        // ...and the wording without the code is not.
        for other in [
            answer(400, r#"{"message":"requested lease not found","code":3}"#),
            answer(404, "lease not found"),
            answer(
                503,
                r#"{"error":"etcdserver: request timed out","code":14}"#,
            ),
            GatewayError::Unreachable("lease not found".into()),
        ] {
            assert!(!other.is_lease_not_found(), "{other}");
        }
        assert_eq!(
            answer(502, "bad gateway").to_string(),
            "etcd answered: 502 Bad Gateway: bad gateway"
        );
    }

    #[test]
    fn the_watch_asks_for_progress_notifications() {
        let req = watch_request(PREFIX, 8);
        assert_eq!(req["create_request"]["progress_notify"], true);
        assert_eq!(req["create_request"]["start_revision"], "8");
    }

    #[tokio::test]
    async fn a_silent_watch_stream_is_an_error_and_a_talking_one_is_not() {
        let limit = Duration::from_millis(50);
        let silent = within_silence(limit, std::future::pending::<()>()).await;
        assert!(matches!(silent, Err(GatewayError::Silent(l)) if l == limit));
        assert_eq!(within_silence(limit, async { 7 }).await.unwrap(), 7);
    }

    /// A TCP relay to `to` that can cut its open connections the way a partition does:
    /// nothing is closed, bytes just stop arriving. New connections pass.
    struct Relay {
        addr: std::net::SocketAddr,
        generation: Arc<std::sync::atomic::AtomicU64>,
    }

    impl Relay {
        async fn start(to: std::net::SocketAddr) -> Relay {
            use std::sync::atomic::AtomicU64;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let generation = Arc::new(AtomicU64::new(0));
            let g = generation.clone();
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let born = g.load(Ordering::SeqCst);
                    let g = g.clone();
                    tokio::spawn(async move {
                        let Ok(server) = tokio::net::TcpStream::connect(to).await else {
                            return;
                        };
                        let (cr, cw) = client.into_split();
                        let (sr, sw) = server.into_split();
                        tokio::join!(
                            Self::pipe(cr, sw, born, g.clone()),
                            Self::pipe(sr, cw, born, g)
                        );
                    });
                }
            });
            Relay { addr, generation }
        }

        async fn pipe(
            mut from: tokio::net::tcp::OwnedReadHalf,
            mut to: tokio::net::tcp::OwnedWriteHalf,
            born: u64,
            generation: Arc<std::sync::atomic::AtomicU64>,
        ) {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let cut = || generation.load(Ordering::SeqCst) != born;
            let mut buf = vec![0u8; 16 << 10];
            loop {
                let n = match from.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if cut() {
                    continue; // swallowed
                }
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            if cut() {
                // Not even the close gets through.
                std::future::pending::<()>().await;
            }
        }

        /// Every connection open now stops carrying bytes, both ways, for good.
        fn cut_open_connections(&self) {
            self.generation.fetch_add(1, Ordering::SeqCst);
        }
    }

    async fn healthy(reg: &EtcdRegistry) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !reg.status().healthy {
            assert!(Instant::now() < deadline, "{:?}", reg.status());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_watch_cut_without_a_close_is_watched_again_and_catches_up() {
        let etcd = pillion_testkit::Server::etcd();
        let relay = Relay::start(etcd.addr()).await;
        let silence = Duration::from_millis(500);
        let behind_relay =
            EtcdRegistry::connect_with(&format!("etcd://{}", relay.addr), silence).unwrap();
        let direct = EtcdRegistry::connect(&etcd.url()).unwrap();
        healthy(&behind_relay).await;
        healthy(&direct).await;

        relay.cut_open_connections();
        let service = Service {
            name: "late".into(),
            nodes: vec![pillion_core::Node {
                id: "late-1".into(),
                address: "127.0.0.1:1".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        direct.register(&service, None).await.unwrap();

        let deadline = Instant::now() + Duration::from_secs(20);
        while behind_relay.catalog().get("late").is_none() {
            assert!(
                Instant::now() < deadline,
                "the cut watch never saw the registration: the catalog stayed stale"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        direct.close().await;
    }

    #[test]
    fn keepalive_messages_are_grpc_framed_protobuf() {
        // LeaseKeepAliveRequest{ID: 300}: field 1 varint 300 = 0x08 0xac 0x02.
        assert_eq!(
            &keepalive_request(300)[..],
            [0, 0, 0, 0, 3, 0x08, 0xac, 0x02]
        );
        let big = keepalive_request(7587899321681467910);
        assert_eq!(big[4] as usize, big.len() - 5);
        // An answer with a header (field 1, bytes), ID (2) and TTL (3) = 5.
        let answer = [0x0a, 0x02, 0x08, 0x01, 0x10, 0xac, 0x02, 0x18, 0x05];
        assert_eq!(keepalive_ttl(&answer).unwrap(), 5);
        // No TTL field: protobuf's zero, the lease is gone.
        assert_eq!(keepalive_ttl(&[0x10, 0x01]).unwrap(), 0);
        for bad in [&[0x0a, 0x09, 0x01][..], &[0x18][..], &[0x0f][..]] {
            assert!(keepalive_ttl(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn prefix_range_covers_the_prefix_only() {
        assert_eq!(prefix_end("/pillion/registry/"), b"/pillion/registry0");
        assert_eq!(ttl_secs(Duration::from_millis(1500)), 2);
        assert_eq!(ttl_secs(Duration::from_millis(10)), 1);
    }
}
