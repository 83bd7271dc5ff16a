//! The etcd v3 adapter.
//!
//! Each node is one key, `/pillion/registry/{service}/{node id}`, whose value is the
//! service with that one node (as micro's etcd registry does). Keys are written under
//! leases: a registration with a TTL gets a lease of that TTL; one without gets this
//! sidecar's own lease ([`SESSION_TTL`]), kept alive every second, so the keys vanish
//! when the sidecar dies. etcd's minimum lease is about 2 s, so shorter TTLs last 2 s.
//!
//! The catalog is a local cache of the prefix: one range read, then a watch from the
//! next revision, re-done from scratch whenever the watch breaks. Writes wait until the
//! watch has seen them, so a client reads its own registration right after `POST`.
//! The watch asks for progress notifications; one that stays silent (no event, no
//! notification) for [`WATCH_SILENCE_LIMIT`] is presumed cut by a partition that
//! closed nothing, and is re-done, so the catalog cannot stay stale unnoticed.
//!
//! This sidecar remembers what it registered. When etcd comes back after an outage, or
//! reports the sidecar's lease gone (etcd restarted without its data), everything still
//! owned is written again: registrations are restored without restarting pillion.
//!
//! etcd is spoken to through its v3 JSON gateway (`/v3/kv/put`, `/v3/watch`, ...) with
//! pillion-http's client (the one every other HTTP call of the sidecar uses), which
//! keeps gRPC code generation and a protobuf compiler out of the build.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use pillion_core::Service;
use pillion_http::pool::{Outgoing, PooledBody};
use pillion_http::{describe, Client};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::{deregisters, per_node, BackendStatus, Catalog, Registry, RegistryError};

/// Where registrations live in etcd's keyspace.
pub const PREFIX: &str = "/pillion/registry/";
/// TTL of the lease that holds registrations made without a TTL.
pub const SESSION_TTL: Duration = Duration::from_secs(10);
/// How often the sidecar's lease is kept alive (and etcd's reachability checked).
const KEEPALIVE_EVERY: Duration = Duration::from_secs(1);
/// Limit for one unary gateway call.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a write waits for the watch to show it before returning anyway.
const READ_YOUR_WRITE_LIMIT: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
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
    tasks: Vec<JoinHandle<()>>,
}

struct Inner {
    backend: String,
    gateway: Gateway,
    /// [`WATCH_SILENCE_LIMIT`], shorter in tests.
    watch_silence: Duration,
    /// key -> registration, as last seen by the watch.
    cache: Mutex<HashMap<String, Service>>,
    catalog: ArcSwap<Catalog>,
    changes: watch::Sender<u64>,
    seen_revision: watch::Sender<i64>,
    health: Mutex<Health>,
    /// What this sidecar wrote. An async mutex: it is held across calls to etcd so a
    /// restore and a registration never interleave.
    owned: tokio::sync::Mutex<Owned>,
}

#[derive(Default)]
struct Owned {
    session_lease: Option<i64>,
    keys: HashMap<String, OwnedKey>,
}

struct OwnedKey {
    value: Vec<u8>,
    /// None: held by the session lease.
    deadline: Option<Instant>,
    lease: i64,
}

struct Health {
    state: Connection,
    error: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Connection {
    Connecting,
    Up,
    Down,
}

impl EtcdRegistry {
    /// Parses `etcd://host:port[,host:port...]` and starts the watch and keep-alive
    /// tasks. Does not wait for etcd: until it answers, the registry reports itself
    /// unhealthy and writes fail with [`RegistryError::Unavailable`].
    pub fn connect(url: &str) -> Result<Self, RegistryError> {
        Self::connect_with(url, WATCH_SILENCE_LIMIT)
    }

    fn connect_with(url: &str, watch_silence: Duration) -> Result<Self, RegistryError> {
        let endpoints = parse_url(url)?;
        let backend = format!("etcd://{}", endpoints.join(","));
        let inner = Arc::new(Inner {
            gateway: Gateway::new(endpoints),
            backend,
            watch_silence,
            cache: Mutex::new(HashMap::new()),
            catalog: ArcSwap::from_pointee(Catalog::default()),
            changes: watch::channel(0).0,
            seen_revision: watch::channel(0).0,
            health: Mutex::new(Health {
                state: Connection::Connecting,
                error: Some("connecting".into()),
            }),
            owned: tokio::sync::Mutex::new(Owned::default()),
        });
        let tasks = vec![
            tokio::spawn(watch_loop(inner.clone())),
            tokio::spawn(keepalive_loop(inner.clone())),
        ];
        Ok(EtcdRegistry { inner, tasks })
    }
}

impl Drop for EtcdRegistry {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

pub(crate) fn parse_url(url: &str) -> Result<Vec<String>, RegistryError> {
    // Never repeat a password back: show the URL without what precedes an '@'.
    let shown = match url.split_once('@') {
        Some((_, host)) => format!("etcd://***@{host}"),
        None => url.to_string(),
    };
    let invalid = |why: &str| {
        RegistryError::Invalid(format!(
            "registry URL {shown:?} {why}: write etcd://host:port[,host:port...]"
        ))
    };
    let rest = url
        .strip_prefix("etcd://")
        .ok_or_else(|| invalid("is not an etcd URL"))?;
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
    Ok(endpoints)
}

fn key_for(reg: &Service) -> String {
    format!("{PREFIX}{}/{}", reg.name, reg.nodes[0].id)
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

    fn set_health(&self, ok: bool, error: Option<String>) {
        let mut h = self.health.lock().unwrap_or_else(|e| e.into_inner());
        let next = if ok { Connection::Up } else { Connection::Down };
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
        h.error = error;
    }

    fn is_up(&self) -> bool {
        self.health.lock().unwrap_or_else(|e| e.into_inner()).state == Connection::Up
    }

    fn publish(&self, cache: &HashMap<String, Service>) {
        self.catalog.store(Arc::new(Catalog::build(cache.values())));
        self.changes.send_modify(|v| *v += 1);
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

    /// The session lease, granted on first use.
    async fn session_lease(&self, owned: &mut Owned) -> Result<i64, GatewayError> {
        if let Some(id) = owned.session_lease {
            return Ok(id);
        }
        let id = self.grant(SESSION_TTL.as_secs() as i64).await?;
        owned.session_lease = Some(id);
        Ok(id)
    }

    /// Writes every registration this sidecar still owns again, under fresh leases.
    async fn restore(&self, owned: &mut Owned) -> Result<(), GatewayError> {
        let now = Instant::now();
        owned.keys.retain(|_, k| k.deadline.is_none_or(|d| d > now));
        owned.session_lease = None;
        if owned.keys.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = owned.keys.keys().cloned().collect();
        let mut rev = 0;
        for key in keys {
            let (value, deadline) = {
                let k = &owned.keys[&key];
                (k.value.clone(), k.deadline)
            };
            let lease = match deadline {
                None => self.session_lease(owned).await?,
                Some(d) => {
                    self.grant(ttl_secs(d.saturating_duration_since(now)))
                        .await?
                }
            };
            rev = self.put(&key, &value, lease).await?;
            if let Some(k) = owned.keys.get_mut(&key) {
                k.lease = lease;
            }
        }
        tracing::info!(
            backend = %self.backend,
            registrations = owned.keys.len(),
            "registrations restored in the registry backend"
        );
        self.wait_seen(rev).await;
        Ok(())
    }

    async fn wait_seen(&self, revision: i64) {
        let mut rx = self.seen_revision.subscribe();
        let _ = tokio::time::timeout(READ_YOUR_WRITE_LIMIT, rx.wait_for(|s| *s >= revision)).await;
    }
}

/// Keeps the session lease alive, notices outages, and restores registrations after
/// one (or when etcd lost the lease).
async fn keepalive_loop(inner: Arc<Inner>) {
    let mut was_down = false;
    loop {
        tokio::time::sleep(KEEPALIVE_EVERY).await;
        let mut owned = inner.owned.lock().await;
        let now = Instant::now();
        owned.keys.retain(|_, k| k.deadline.is_none_or(|d| d > now));
        let alive = match owned.session_lease {
            Some(id) => inner
                .gateway
                .call("/v3/lease/keepalive", json!({ "ID": id.to_string() }))
                .await
                .map(|res| int(&res["result"]["TTL"]) > 0),
            None => inner
                .gateway
                .call("/v3/maintenance/status", json!({}))
                .await
                .map(|_| true),
        };
        match alive {
            Err(e) => {
                if !was_down {
                    inner.set_health(false, Some(e.to_string()));
                }
                was_down = true;
            }
            Ok(lease_alive) => {
                if was_down || !lease_alive {
                    if !lease_alive {
                        tracing::warn!(backend = %inner.backend, "registry lease lost (etcd restarted without its data?); restoring registrations");
                    }
                    match inner.restore(&mut owned).await {
                        Ok(()) => was_down = false,
                        Err(e) => {
                            inner.set_health(false, Some(e.to_string()));
                            was_down = true;
                        }
                    }
                }
            }
        }
    }
}

/// Keeps the catalog equal to etcd's prefix: range, then watch; again on any break.
async fn watch_loop(inner: Arc<Inner>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match sync_and_watch(&inner, &mut backoff).await {
            // Not an outage (etcd may just be quiet): re-sync at once, health unchanged.
            // If etcd is really cut off, the range read of the re-sync says so.
            Err(GatewayError::Silent(limit)) => {
                tracing::debug!(backend = %inner.backend, "no watch event or progress notification for {limit:?}; watching again");
                continue;
            }
            Err(e) => inner.set_health(false, Some(e.to_string())),
            Ok(never) => match never {},
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// The watch of the whole registry prefix from `revision` on, with progress
/// notifications so that a healthy watch is never silent for long.
fn watch_request(revision: i64) -> Value {
    json!({ "create_request": {
        "key": B64.encode(PREFIX),
        "range_end": B64.encode(prefix_end(PREFIX)),
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
    let end = prefix_end(PREFIX);
    let res = inner
        .gateway
        .call(
            "/v3/kv/range",
            json!({ "key": B64.encode(PREFIX), "range_end": B64.encode(&end) }),
        )
        .await?;
    let revision = int(&res["header"]["revision"]);
    {
        let mut cache = inner.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.clear();
        for kv in res["kvs"].as_array().into_iter().flatten() {
            apply_put(&mut cache, kv);
        }
        inner.publish(&cache);
    }
    inner.seen_revision.send_replace(revision);
    inner.set_health(true, None);
    *backoff = Duration::from_millis(100);

    let mut body = inner
        .gateway
        .stream("/v3/watch", watch_request(revision + 1))
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
                let mut cache = inner.cache.lock().unwrap_or_else(|e| e.into_inner());
                for ev in events {
                    if ev["type"] == "DELETE" {
                        let key = decode(&ev["kv"]["key"]);
                        cache.remove(&String::from_utf8_lossy(&key).into_owned());
                    } else {
                        apply_put(&mut cache, &ev["kv"]);
                    }
                }
                inner.publish(&cache);
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

fn apply_put(cache: &mut HashMap<String, Service>, kv: &Value) {
    let key = String::from_utf8_lossy(&decode(&kv["key"])).into_owned();
    match serde_json::from_slice::<Service>(&decode(&kv["value"])) {
        Ok(reg) if !reg.nodes.is_empty() => {
            cache.insert(key, reg);
        }
        // A value another program wrote under our prefix: ignore it, loudly.
        _ => tracing::warn!(%key, "ignoring a registry key whose value is not a registration"),
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
        let mut owned = inner.owned.lock().await;
        let attempt = async {
            let (lease, deadline) = match ttl {
                Some(t) => (inner.grant(ttl_secs(t)).await?, Some(Instant::now() + t)),
                None => (inner.session_lease(&mut owned).await?, None),
            };
            let mut rev = 0;
            for reg in per_node(service) {
                let key = key_for(&reg);
                let value = serde_json::to_vec(&reg).expect("service serializes");
                rev = inner.put(&key, &value, lease).await?;
                owned.keys.insert(
                    key,
                    OwnedKey {
                        value,
                        deadline,
                        lease,
                    },
                );
            }
            Ok::<i64, GatewayError>(rev)
        };
        let rev = match attempt.await {
            Ok(rev) => rev,
            Err(e) if e.is_lease_not_found() => {
                // The session lease is gone (etcd lost its data): restore everything
                // we own, this registration included.
                drop(owned);
                let mut owned = inner.owned.lock().await;
                owned.session_lease = None;
                for reg in per_node(service) {
                    owned.keys.insert(
                        key_for(&reg),
                        OwnedKey {
                            value: serde_json::to_vec(&reg).expect("service serializes"),
                            deadline: ttl.map(|t| Instant::now() + t),
                            lease: 0,
                        },
                    );
                }
                inner
                    .restore(&mut owned)
                    .await
                    .map_err(|e| inner.unavailable(e))?;
                return Ok(());
            }
            Err(e) => return Err(inner.unavailable(e)),
        };
        drop(owned);
        inner.wait_seen(rev).await;
        Ok(())
    }

    async fn deregister(&self, service: &Service) -> Result<usize, RegistryError> {
        let inner = &self.inner;
        let mut keys: Vec<String> = {
            let cache = inner.cache.lock().unwrap_or_else(|e| e.into_inner());
            cache
                .iter()
                .filter(|(_, reg)| deregisters(service, reg))
                .map(|(k, _)| k.clone())
                .collect()
        };
        let mut owned = inner.owned.lock().await;
        // Also keys we wrote that the watch has not shown yet.
        for key in owned.keys.keys() {
            let named = service
                .nodes
                .iter()
                .any(|n| *key == format!("{PREFIX}{}/{}", service.name, n.id));
            if named && !keys.contains(key) {
                keys.push(key.clone());
            }
        }
        let mut removed = 0;
        let mut rev = 0;
        for key in &keys {
            let res = inner
                .gateway
                .call("/v3/kv/deleterange", json!({ "key": B64.encode(key) }))
                .await
                .map_err(|e| inner.unavailable(e))?;
            removed += int(&res["deleted"]) as usize;
            rev = int(&res["header"]["revision"]);
            owned.keys.remove(key);
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
            error: h.error.clone(),
        }
    }

    async fn close(&self) {
        for t in &self.tasks {
            t.abort();
        }
        let mut owned = self.inner.owned.lock().await;
        let mut leases: Vec<i64> = owned.keys.values().map(|k| k.lease).collect();
        leases.extend(owned.session_lease);
        leases.sort_unstable();
        leases.dedup();
        if self.inner.is_up() {
            for id in leases {
                let _ = self
                    .inner
                    .gateway
                    .call("/v3/lease/revoke", json!({ "ID": id.to_string() }))
                    .await;
            }
        }
        owned.keys.clear();
        owned.session_lease = None;
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
}

impl Gateway {
    fn new(endpoints: Vec<String>) -> Self {
        Gateway {
            endpoints,
            current: AtomicUsize::new(0),
            client: Client::new(Default::default(), Duration::from_secs(1)),
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
            let req = http::Request::post(format!("http://{endpoint}{path}"))
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
            let bytes = res
                .into_body()
                .collect()
                .await
                .map_err(|e| GatewayError::Unreachable(describe(&*e)))?
                .to_bytes();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_endpoint_lists_and_refuses_the_rest() {
        assert_eq!(
            parse_url("etcd://127.0.0.1:2379").unwrap(),
            ["127.0.0.1:2379"]
        );
        assert_eq!(
            parse_url("etcd://a:1, b:2/").unwrap(),
            ["a:1".to_string(), "b:2".to_string()]
        );
        for bad in [
            "etcd://",
            "etcd://a",
            "etcd://a:0",
            "etcd://u:p@a:1",
            "etcd://a:1,,b:2",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
        let err = parse_url("etcd://u:secret@a:1").unwrap_err().to_string();
        assert!(err.contains("credentials"), "{err}");
        assert!(!err.contains("secret"), "the password leaked: {err}");
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
        let req = watch_request(8);
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
    fn prefix_range_covers_the_prefix_only() {
        assert_eq!(prefix_end("/pillion/registry/"), b"/pillion/registry0");
        assert_eq!(ttl_secs(Duration::from_millis(1500)), 2);
        assert_eq!(ttl_secs(Duration::from_millis(10)), 1);
    }
}
