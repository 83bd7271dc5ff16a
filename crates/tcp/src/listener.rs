//! One TCP listener: accepts clients and connects each to the best backend.
//!
//! Choice, per new connection: among backends with room (fewer than `max_connections`
//! open or being dialed: a place is taken before the dial, so clients that arrive
//! together cannot exceed it), the lowest tier, then the fewest active connections,
//! then round-robin. When every backend is full the client is closed. A dial that
//! fails (refused, or slower than `dial_timeout`) marks the backend down for
//! `down_for` and the next one is tried, until `connect_timeout`; backends marked down
//! are tried last rather than never, so a client is refused only when no backend
//! answers at all. A dial that fails because pillion itself is out of file
//! descriptors or memory ([`Blame::Local`]) blames no backend: the client is closed.
//!
//! Targets that are names expand to every address they resolve to, re-resolved when
//! their records expire (between 1 s and 60 s); an address that vanishes is drained
//! (no new connections), a failed lookup keeps the last good answer.
//!
//! With `failback_after`, connections on a worse tier are closed gracefully once a
//! better tier has accepted dials for that long, so their clients reconnect to it;
//! better tiers are probed while worse ones carry connections, and every tier with a
//! `health_check` interval is probed on that interval.
//!
//! Each background task sleeps until its next deadline (a DNS answer expiring, a
//! health check or a measurement due, a better tier up long enough) or an event (a
//! configuration update, a connection opening), never on a fixed tick. They and the
//! connections stop through one cancellation token ([`Listener::abort`]), finishing
//! the unit in hand (a lookup, a probe), and are tracked so that
//! [`Listener::stopped`] can wait for them.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hickory_resolver::TokioResolver;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::{assign_tiers, Backend, Blame, Close, Slot};
use crate::clock;
use crate::config::{split_target, ListenerConfig};
use crate::copy::{self, Traffic};

pub struct Listener {
    pub addr: SocketAddr,
    config: ArcSwap<ListenerConfig>,
    backends: ArcSwap<Vec<Arc<Backend>>>,
    /// Last good addresses of each target.
    resolved: Mutex<HashMap<String, Vec<SocketAddr>>>,
    resolver: Arc<TokioResolver>,
    mesh: Option<Arc<dyn crate::MeshNodes>>,
    rr: AtomicUsize,
    /// Open client connections.
    connections: watch::Sender<usize>,
    accepting: watch::Sender<bool>,
    /// Bumped by each [`Listener::update`]: the tasks look at the new configuration.
    updates: watch::Sender<u64>,
    /// Stops every task and connection of the listener.
    stop: CancellationToken,
    /// The background tasks and one task per connection.
    tasks: TaskTracker,
}

impl Listener {
    /// Binds, resolves the targets and starts accepting.
    pub async fn start(
        config: ListenerConfig,
        resolver: Arc<TokioResolver>,
        mesh: Option<Arc<dyn crate::MeshNodes>>,
    ) -> std::io::Result<Arc<Listener>> {
        let socket = TcpListener::bind(config.listen).await?;
        let listener = Arc::new(Listener {
            // The port bound, when the configuration says 0.
            addr: socket.local_addr()?,
            config: ArcSwap::from_pointee(config),
            backends: ArcSwap::from_pointee(Vec::new()),
            resolved: Mutex::new(HashMap::new()),
            resolver,
            mesh,
            rr: AtomicUsize::new(0),
            connections: watch::channel(0).0,
            accepting: watch::channel(true).0,
            updates: watch::channel(0).0,
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        listener.resolve_all().await;
        let tasks = &listener.tasks;
        tasks.spawn(listener.clone().accept_loop(socket));
        tasks.spawn(listener.clone().refresh_loop());
        tasks.spawn(listener.clone().failback_loop());
        tasks.spawn(listener.clone().health_loop());
        tasks.spawn(listener.clone().latency_loop());
        tracing::info!(listen = %listener.addr, "tcp listener started");
        Ok(listener)
    }

    /// Applies a reloaded configuration: new connections follow it at once; only the
    /// connections of targets no longer configured are closed.
    pub async fn update(&self, config: ListenerConfig) {
        self.config.store(Arc::new(config));
        self.resolve_all().await;
        self.updates.send_modify(|n| *n += 1);
    }

    /// Stops accepting; open connections go on.
    pub fn stop_accepting(&self) {
        let _ = self.accepting.send(false);
    }

    /// Tells every task to stop and closes every connection, without waiting: a task
    /// busy with a lookup or a probe finishes it, a connection being dialed is given
    /// up. [`Listener::stopped`] waits for them.
    pub fn abort(&self) {
        self.stop_accepting();
        self.stop.cancel();
    }

    /// Waits until every task and connection of the listener ended (after
    /// [`Listener::abort`]).
    pub async fn stopped(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// How many of the listener's tasks run (background tasks and connections).
    pub fn running_tasks(&self) -> usize {
        self.tasks.len()
    }

    pub fn active(&self) -> usize {
        *self.connections.borrow()
    }

    /// Waits until no client connection is open.
    pub async fn drained(&self) {
        let mut connections = self.connections.subscribe();
        let _ = connections.wait_for(|n| *n == 0).await;
    }

    pub fn backends(&self) -> Arc<Vec<Arc<Backend>>> {
        self.backends.load_full()
    }

    pub fn status(&self) -> serde_json::Value {
        let config = self.config.load();
        let backends = self.backends.load();
        let by_latency = !config.latency_bucket.0.is_zero();
        // The tiers connections are ordered by: as written, or as latency made them
        // (then each backend shows its written tier and latency).
        let count = backends
            .iter()
            .map(|b| b.tier() + 1)
            .max()
            .unwrap_or(0)
            .max(if by_latency { 0 } else { config.tiers.len() });
        let tiers: Vec<_> = (0..count)
            .map(|t| {
                let list: Vec<_> = backends.iter().filter(|b| b.tier() == t).map(|b| b.status()).collect();
                match config.tiers.get(t).filter(|_| !by_latency) {
                    Some(written) => serde_json::json!({ "tier": t, "targets": written.targets, "services": written.services, "backends": list }),
                    None => serde_json::json!({ "tier": t, "backends": list }),
                }
            })
            .collect();
        let format = |d: Duration| pillion_core::duration::format(d);
        serde_json::json!({
            "listen": self.addr.to_string(),
            "accepting": *self.accepting.borrow(),
            "active": self.active(),
            "failback_after": format(config.failback_after.0),
            "latency_bucket": format(config.latency_bucket.0),
            "rebalance_every": by_latency.then(|| format(config.rebalance_every.0)),
            "tiers": tiers,
        })
    }

    async fn resolve(&self, target: &str) -> Result<(Vec<SocketAddr>, Option<Instant>), String> {
        let (host, port) = split_target(target)?;
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok((vec![SocketAddr::new(ip, port)], None));
        }
        let lookup = self
            .resolver
            .lookup_ip(host.as_str())
            .await
            .map_err(|e| format!("resolving {host}: {e}"))?;
        let mut addrs: Vec<SocketAddr> =
            lookup.iter().map(|ip| SocketAddr::new(ip, port)).collect();
        addrs.sort();
        addrs.dedup();
        Ok((addrs, Some(lookup.valid_until())))
    }

    /// Resolves every target and rebuilds the backend set; returns when the answers
    /// expire next.
    async fn resolve_all(&self) -> Option<Instant> {
        let config = self.config.load_full();
        let mut next: Option<Instant> = None;
        for tier in &config.tiers {
            for target in &tier.targets {
                match self.resolve(target).await {
                    Ok((addrs, valid_until)) => {
                        if addrs.is_empty() {
                            tracing::warn!(%target, "target resolved to no address; keeping the last good ones");
                            continue;
                        }
                        self.resolved
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(target.clone(), addrs);
                        if let Some(v) = valid_until {
                            next = Some(next.map_or(v, |n| n.min(v)));
                        }
                    }
                    Err(e) => {
                        tracing::warn!(%target, error = %e, "DNS lookup failed; keeping the last good addresses");
                        next = Some(Instant::now() + Duration::from_secs(1));
                    }
                }
            }
        }
        for tier in &config.tiers {
            for service in &tier.services {
                let Some(mesh) = &self.mesh else {
                    tracing::warn!(%service, "a tcp tier names a service, but this sidecar is not in the mesh (--mesh-ca-cert)");
                    continue;
                };
                let mut addrs = Vec::new();
                for listener in mesh.listeners(service) {
                    match self.resolve(&listener).await {
                        Ok((found, _)) => addrs.extend(found),
                        Err(e) => {
                            tracing::warn!(%service, %listener, error = %e, "mesh listener not resolved")
                        }
                    }
                }
                addrs.sort();
                addrs.dedup();
                self.resolved
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(service_target(service), addrs);
            }
            // The registry changes without a TTL: look again soon.
            if !tier.services.is_empty() {
                let soon = Instant::now() + Duration::from_secs(1);
                next = Some(next.map_or(soon, |n| n.min(soon)));
            }
        }
        self.rebuild(&config);
        next
    }

    fn rebuild(&self, config: &ListenerConfig) {
        let by_latency = !config.latency_bucket.0.is_zero();
        let old = self.backends.load_full();
        let resolved = self
            .resolved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut new: Vec<Arc<Backend>> = Vec::new();
        for (t, tier) in config.tiers.iter().enumerate() {
            let services: Vec<String> = tier.services.iter().map(|s| service_target(s)).collect();
            for target in tier.targets.iter().chain(&services) {
                for addr in resolved.get(target).into_iter().flatten() {
                    if new.iter().any(|b| b.target == *target && b.addr == *addr) {
                        continue; // the same target twice: one backend
                    }
                    let backend = match old.iter().find(|b| b.target == *target && b.addr == *addr)
                    {
                        Some(b) => {
                            b.reconfigure(t, tier.max_connections, tier.dial_timeout.0, by_latency);
                            b.draining.store(false, Ordering::Relaxed);
                            b.clone()
                        }
                        None => Arc::new(Backend::new(
                            *addr,
                            target.clone(),
                            t,
                            tier.max_connections,
                            tier.dial_timeout.0,
                        )),
                    };
                    new.push(backend);
                }
            }
        }
        let configured: Vec<String> = config
            .tiers
            .iter()
            .flat_map(|t| {
                t.targets
                    .iter()
                    .cloned()
                    .chain(t.services.iter().map(|s| service_target(s)))
            })
            .collect();
        for b in old.iter() {
            if new.iter().any(|n| Arc::ptr_eq(n, b)) {
                continue;
            }
            if configured.contains(&b.target) {
                // Gone from DNS (or from the registry): drained, its open connections finish on their own.
                b.draining.store(true, Ordering::Relaxed);
                tracing::info!(target = %b.target, address = %b.addr, "address vanished from DNS; draining");
            } else {
                b.close_all(Close::Now);
                if b.active.load(Ordering::Relaxed) > 0 {
                    tracing::info!(target = %b.target, address = %b.addr, "target removed from the configuration; closing its connections");
                }
            }
        }
        self.backends.store(Arc::new(new));
    }

    /// Resolves the targets again when their answers expire, or the configuration
    /// changes.
    async fn refresh_loop(self: Arc<Self>) {
        let mut updates = self.updates.subscribe();
        let mut next = Instant::now() + Duration::from_secs(1);
        loop {
            let wait = next
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_secs(1), Duration::from_secs(60));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = updates.changed() => {}
                _ = self.stop.cancelled() => return,
            }
            next = self
                .resolve_all()
                .await
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(60));
        }
    }

    /// Backends in the order to try them.
    fn order(&self) -> Vec<Arc<Backend>> {
        let backends = self.backends.load();
        let now = clock().as_millis() as u64;
        let start = self.rr.fetch_add(1, Ordering::Relaxed);
        let n = backends.len().max(1);
        let mut order: Vec<(usize, Arc<Backend>)> = backends
            .iter()
            .enumerate()
            .filter(|(_, b)| !b.draining.load(Ordering::Relaxed))
            .map(|(i, b)| (i, b.clone()))
            .collect();
        order.sort_by_key(|(i, b)| {
            (
                b.is_down(now),
                b.overloaded(),
                b.tier(),
                b.active.load(Ordering::Relaxed),
                (i + n - start % n) % n,
            )
        });
        order.into_iter().map(|(_, b)| b).collect()
    }

    /// Dials `backend` (and, for a service's node, makes the mTLS handshake with its
    /// mesh listener); a failure it is to blame for marks it down.
    async fn dial(&self, backend: &Backend, limit: Duration) -> Result<Upstream, Blame> {
        let started = Instant::now();
        let down_for = self.config.load().down_for.0;
        let deadline = tokio::time::Instant::now() + limit;
        let tls = backend
            .target
            .strip_prefix(SERVICE_PREFIX)
            .and_then(|service| self.mesh.as_ref().map(|m| m.connector(service)));
        match tokio::time::timeout_at(deadline, TcpStream::connect(backend.addr)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                let upstream = match tls {
                    None => Upstream::Plain(stream),
                    Some(tls) => {
                        let carry = pillion_http::stream::Carry::Tunnel;
                        match tokio::time::timeout_at(deadline, tls.connect(stream, carry)).await {
                            Ok(Ok(s)) => Upstream::Mesh(Box::new(s)),
                            Ok(Err(e)) => {
                                tracing::warn!(address = %backend.addr, error = %e, "mesh handshake failed");
                                backend.dial_failed(down_for);
                                return Err(Blame::Backend);
                            }
                            Err(_) => {
                                tracing::debug!(address = %backend.addr, "mesh handshake timed out");
                                backend.dial_failed(down_for);
                                return Err(Blame::Backend);
                            }
                        }
                    }
                };
                backend.dial_succeeded(started.elapsed());
                Ok(upstream)
            }
            Ok(Err(e)) => match Blame::of(&e) {
                Blame::Local => {
                    tracing::debug!(address = %backend.addr, error = %e, "dial failed for want of local resources");
                    Err(Blame::Local)
                }
                Blame::Backend => {
                    tracing::debug!(address = %backend.addr, error = %e, "dial failed");
                    backend.dial_failed(down_for);
                    Err(Blame::Backend)
                }
            },
            Err(_) => {
                tracing::debug!(address = %backend.addr, "dial timed out");
                backend.dial_failed(down_for);
                Err(Blame::Backend)
            }
        }
    }

    /// The first backend with room that accepts, dialed in a place taken on it first
    /// (see [`Backend::reserve`]). Stops at a [`Blame::Local`] failure: every other
    /// backend would fail the same way, and be marked down for nothing.
    async fn connect(&self) -> Result<(Slot, Upstream), Unserved> {
        let deadline = Instant::now() + self.config.load().connect_timeout.0;
        let mut dialed = false;
        for backend in self.order() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let Some(slot) = backend.reserve() else {
                continue; // full
            };
            dialed = true;
            match self.dial(&backend, backend.dial_timeout().min(left)).await {
                Ok(stream) => return Ok((slot, stream)),
                Err(Blame::Local) => return Err(Unserved::Failed(Blame::Local)),
                Err(Blame::Backend) => {}
            }
        }
        Err(if dialed {
            Unserved::Failed(Blame::Backend)
        } else {
            Unserved::Full
        })
    }

    async fn accept_loop(self: Arc<Self>, socket: TcpListener) {
        let mut accepting = self.accepting.subscribe();
        loop {
            let (client, peer) = tokio::select! {
                accepted = socket.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        if Blame::of(&e) == Blame::Local {
                            tracing::warn!(listen = %self.addr, error = %e, "accept failed: pillion is out of file descriptors or memory (raise `ulimit -n`)");
                        } else {
                            tracing::warn!(listen = %self.addr, error = %e, "accept failed");
                        }
                        // Some room may come back (connections closing): try again soon.
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
                            _ = self.stop.cancelled() => break,
                        }
                    }
                },
                changed = accepting.changed() => {
                    if changed.is_err() || !*accepting.borrow() {
                        break;
                    }
                    continue;
                }
                _ = self.stop.cancelled() => break,
            };
            let _ = client.set_nodelay(true);
            self.tasks.spawn(self.clone().serve(client, peer));
        }
        tracing::info!(listen = %self.addr, "tcp listener stopped accepting");
    }

    async fn serve(self: Arc<Self>, mut client: TcpStream, peer: SocketAddr) {
        let connected = tokio::select! {
            c = self.connect() => c,
            // No byte was carried yet: the client is closed.
            _ = self.stop.cancelled() => return,
        };
        let (slot, mut server) = match connected {
            Ok(pair) => pair,
            Err(Unserved::Full) => {
                tracing::warn!(listen = %self.addr, %peer, "every backend has its max_connections open; closing the connection");
                return;
            }
            Err(Unserved::Failed(Blame::Backend)) => {
                tracing::warn!(listen = %self.addr, %peer, "no backend accepted the connection; closing it");
                return;
            }
            Err(Unserved::Failed(Blame::Local)) => {
                tracing::warn!(listen = %self.addr, %peer, "cannot dial a backend: pillion is out of file descriptors or memory (raise `ulimit -n`); closing the connection, no backend is blamed");
                return;
            }
        };
        self.connections.send_modify(|n| *n += 1);
        let backend = slot.backend().clone();
        let (id, mut close) = backend.open(&slot);
        let (client_fd, server_fd) = (client.as_raw_fd(), server.as_raw_fd());
        use futures_util::FutureExt;
        let idle = self.config.load().idle_timeout.0;
        let traffic = Traffic {
            up: &backend.bytes_up,
            down: &backend.bytes_down,
            last_ms: (clock().as_millis() as u64).into(),
        };
        {
            let copying = match &mut server {
                Upstream::Plain(server) => futures_util::future::Either::Left(copy::both_ways(
                    &mut client,
                    server,
                    &traffic,
                )),
                // Through TLS: no splice; the bytes are counted as they go.
                Upstream::Mesh(server) => futures_util::future::Either::Right(
                    tokio::io::copy_bidirectional(&mut client, server.as_mut()).map(|r| {
                        r.map(|(up, down)| {
                            traffic.up.fetch_add(up, Ordering::Relaxed);
                            traffic.down.fetch_add(down, Ordering::Relaxed);
                        })
                    }),
                ),
            };
            tokio::pin!(copying);
            let idle_ms = idle.as_millis() as u64;
            loop {
                // Idle once `idle` passed since the last byte: the wait ends then, and
                // starts again from the last byte if bytes went meanwhile.
                let quiet_ms = (clock().as_millis() as u64)
                    .saturating_sub(traffic.last_ms.load(Ordering::Relaxed));
                let idle_in = Duration::from_millis(idle_ms.saturating_sub(quiet_ms));
                tokio::select! {
                    _ = &mut copying => break,
                    _ = self.stop.cancelled() => break,
                    changed = close.changed() => {
                        let how = if changed.is_ok() { *close.borrow() } else { Close::Now };
                        match how {
                            Close::Open => continue,
                            Close::Now => break,
                            Close::Graceful => {
                                copy::shutdown_write_fd(client_fd);
                                copy::shutdown_write_fd(server_fd);
                                let _ = tokio::time::timeout(Duration::from_secs(5), &mut copying).await;
                                break;
                            }
                        }
                    }
                    _ = tokio::time::sleep(idle_in), if !idle.is_zero() => {
                        let last = traffic.last_ms.load(Ordering::Relaxed);
                        if (clock().as_millis() as u64).saturating_sub(last) >= idle_ms {
                            tracing::debug!(%peer, "closing an idle connection");
                            break;
                        }
                    }
                }
            }
        }
        backend.closed(id);
        drop(slot);
        self.connections.send_modify(|n| *n -= 1);
    }

    /// Dials a backend only to learn whether it is up.
    async fn probe(&self, backend: &Backend) {
        let limit = backend.dial_timeout();
        let _ = self.dial(backend, limit).await;
    }

    /// With `failback_after`: while connections are open on a tier worse than the
    /// best, probes the better tiers once a second (what nothing has proved up yet)
    /// and closes the worse tier's connections gracefully once a better tier has been
    /// up for `failback_after`. Without connections on a worse tier it waits for one
    /// to open; without `failback_after`, for a configuration update.
    async fn failback_loop(self: Arc<Self>) {
        let mut updates = self.updates.subscribe();
        let mut connections = self.connections.subscribe();
        let mut warned: Vec<SocketAddr> = Vec::new();
        let mut last_probe: Option<Instant> = None;
        loop {
            let next = self.fail_back(&mut warned, &mut last_probe).await;
            tokio::select! {
                changed = updates.changed() => if changed.is_err() { return },
                changed = connections.changed(), if next.is_none() => if changed.is_err() { return },
                _ = tokio::time::sleep(next.unwrap_or_default()), if next.is_some() => {}
                _ = self.stop.cancelled() => return,
            }
        }
    }

    /// One look of [`Listener::failback_loop`]; when to look again (`None`: when a
    /// connection opens or the configuration changes).
    async fn fail_back(
        &self,
        warned: &mut Vec<SocketAddr>,
        last_probe: &mut Option<Instant>,
    ) -> Option<Duration> {
        const PROBE_EVERY: Duration = Duration::from_secs(1);
        let after = self.config.load().failback_after.0;
        if after.is_zero() {
            return None;
        }
        let backends = self.backends.load_full();
        let worst_busy = backends
            .iter()
            .filter(|b| b.active.load(Ordering::Relaxed) > 0)
            .map(|b| b.tier())
            .max()?;
        // Probe better tiers that nothing has proved up yet, once a second.
        if last_probe.is_none_or(|at| at.elapsed() >= PROBE_EVERY) {
            *last_probe = Some(Instant::now());
            let now = clock().as_millis() as u64;
            for b in backends.iter().filter(|b| b.tier() < worst_busy) {
                if b.up_since_ms.load(Ordering::Relaxed) == 0 && !b.is_down(now) {
                    self.probe(b).await;
                }
            }
        }
        let now = clock().as_millis() as u64;
        let after_ms = after.as_millis() as u64;
        // When each better backend that is up will have been up for `after`.
        let up_long_enough = |b: &Arc<Backend>| {
            let up = b.up_since_ms.load(Ordering::Relaxed);
            (!b.draining.load(Ordering::Relaxed) && !b.is_down(now) && up > 0)
                .then(|| (up + after_ms).saturating_sub(now))
        };
        let ready = (0..worst_busy).find(|t| {
            backends
                .iter()
                .filter(|b| b.tier() == *t)
                .any(|b| up_long_enough(b) == Some(0))
        });
        if let Some(ready) = ready {
            for b in backends
                .iter()
                .filter(|b| b.tier() > ready && b.active.load(Ordering::Relaxed) > 0)
            {
                if !warned.contains(&b.addr) {
                    tracing::info!(listen = %self.addr, backend = %b.addr, tier = b.tier(), better = ready, "failing back: closing connections on a worse tier");
                    warned.push(b.addr);
                }
                b.close_all(Close::Graceful);
            }
        }
        warned.retain(|a| {
            backends
                .iter()
                .any(|b| b.addr == *a && b.active.load(Ordering::Relaxed) > 0)
        });
        let next_probe = last_probe.map_or(Duration::ZERO, |at| {
            PROBE_EVERY.saturating_sub(at.elapsed())
        });
        let next_ready = backends
            .iter()
            .filter(|b| b.tier() < worst_busy)
            .filter_map(up_long_enough)
            .filter(|ms| *ms > 0)
            .min()
            .map(Duration::from_millis);
        Some(next_ready.map_or(next_probe, |r| r.min(next_probe)))
    }

    /// Probes each tier with a `health_check` interval on that interval (the first
    /// time at once), and looks again when the configuration changes.
    async fn health_loop(self: Arc<Self>) {
        let mut updates = self.updates.subscribe();
        let mut last: HashMap<usize, Instant> = HashMap::new();
        loop {
            let config = self.config.load_full();
            let mut next: Option<Duration> = None;
            for (t, tier) in config.tiers.iter().enumerate() {
                let every = tier.health_check.0;
                if every.is_zero() {
                    continue;
                }
                if last.get(&t).is_none_or(|at| at.elapsed() >= every) {
                    last.insert(t, Instant::now());
                    let backends = self.backends.load_full();
                    for b in backends.iter().filter(|b| b.written_tier() == t) {
                        self.probe(b).await;
                    }
                }
                let due = last
                    .get(&t)
                    .map_or(every, |at| every.saturating_sub(at.elapsed()));
                next = Some(next.map_or(due, |n| n.min(due)));
            }
            tokio::select! {
                changed = updates.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(next.unwrap_or_default()), if next.is_some() => {}
                _ = self.stop.cancelled() => return,
            }
        }
    }
}

impl Listener {
    /// With `latency_bucket`: measures every backend's dial time each
    /// `rebalance_every` (and at once when the configuration changes) and puts the
    /// backends in tiers by it ([`assign_tiers`]).
    async fn latency_loop(self: Arc<Self>) {
        let mut updates = self.updates.subscribe();
        let mut last: Option<Instant> = None;
        loop {
            let config = self.config.load_full();
            let bucket = config.latency_bucket.0;
            let every = config.rebalance_every.0;
            let mut next = None;
            if !bucket.is_zero() {
                let due = last.is_none_or(|at| at.elapsed() >= every);
                if due {
                    self.measure(bucket, config.down_for.0).await;
                    last = Some(Instant::now());
                }
                // A zero `rebalance_every` (refused by validation): on updates only.
                if !every.is_zero() {
                    next = last.map(|at| every.saturating_sub(at.elapsed()));
                }
            }
            tokio::select! {
                changed = updates.changed() => match changed {
                    Ok(()) => last = None,
                    Err(_) => return,
                },
                _ = tokio::time::sleep(next.unwrap_or_default()), if next.is_some() => {}
                _ = self.stop.cancelled() => return,
            }
        }
    }

    /// Dials every backend at once, as iaido does each rebalance: a dial's time is
    /// the backend's latency; a backend that cannot be dialled is marked down as on
    /// a failed dial, and keeps its tier until it is measured again.
    async fn measure(&self, bucket: Duration, down_for: Duration) {
        let backends = self.backends.load_full();
        let dials = backends
            .iter()
            .filter(|b| !b.draining.load(Ordering::Relaxed))
            .map(|b| async move {
                let started = Instant::now();
                match tokio::time::timeout(b.dial_timeout(), TcpStream::connect(b.addr)).await {
                    Ok(Ok(_)) => {
                        let took = started.elapsed();
                        b.dial_succeeded(took);
                        Some((b.clone(), took))
                    }
                    Ok(Err(e)) if Blame::of(&e) == Blame::Local => None,
                    Ok(Err(_)) | Err(_) => {
                        tracing::debug!(listen = %self.addr, backend = %b.addr, "latency dial failed");
                        b.dial_failed(down_for);
                        None
                    }
                }
            });
        let mut samples: Vec<_> = futures_util::future::join_all(dials)
            .await
            .into_iter()
            .flatten()
            .collect();
        assign_tiers(&mut samples, bucket);
    }
}

/// Why a client got no backend.
enum Unserved {
    /// Every backend has its `max_connections` open (or being dialed).
    Full,
    /// Dials failed; the last one was this side's fault or the backends'.
    Failed(Blame),
}

/// The target name under which a service's mesh listeners are kept.
const SERVICE_PREFIX: &str = "service:";

fn service_target(service: &str) -> String {
    format!("{SERVICE_PREFIX}{service}")
}

/// A connection to a backend: plain (spliced), or mTLS to a mesh listener.
enum Upstream {
    Plain(TcpStream),
    Mesh(Box<pillion_http::stream::Stream>),
}

impl Upstream {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        match self {
            Upstream::Plain(s) => s.as_raw_fd(),
            Upstream::Mesh(s) => s.raw_fd(),
        }
    }
}
