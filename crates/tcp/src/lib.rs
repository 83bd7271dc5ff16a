//! The L4 TCP proxy (iaido's job): the app connects to a local port and pillion
//! forwards the stream to the best available backend, nearest tier first, spilling
//! to the next tier when the nearer one is down or full, moving back when it recovers.
//!
//! - [`config`]: the `[[tcp]]` sections of the config file, and `pillion bootstrap`.
//! - [`listener`]: one listener: backend choice, dialing, failover, failback, DNS
//!   expansion and re-resolution, health probes.
//! - [`backend`]: one backend address and its counters.
//! - [`copy`]: bytes both ways with splice(2) on Linux, half-close kept.
//! - [`fd_limit`]: the open-file limit, raised to the hard limit at start.
//! - [`TcpProxy`]: the set of listeners, changed in place when the file is reloaded.
//! - [`reload`]: following the config file (polling and SIGHUP); an emptied or
//!   invalid file keeps the running listeners.
//!
//! A reload never cuts a connection unless its target was removed from the file.
//! [`TcpProxy::shutdown`] lets connections finish (returning when the last one ends,
//! or at the grace), then stops every listener's tasks and waits for them.
//! Only [`copy`] and [`fd_limit`] have `unsafe` code: system calls.
#![deny(unsafe_code)]

pub mod backend;
pub mod config;
pub mod copy;
pub mod fd_limit;
pub mod listener;
pub mod reload;

use std::collections::BTreeMap;
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use hickory_resolver::config::{LookupIpStrategy, NameServerConfig, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::TokioResolver;

pub use config::{Binding, ListenerConfig, TierConfig};
use listener::Listener;

/// How long [`TcpProxy::shutdown`] waits for the listeners' tasks to finish what they
/// have in hand (a DNS lookup, a probe: each bounded by its own timeout).
pub const STOP_WAIT: Duration = Duration::from_secs(5);

/// Time since the process's first call: cheap, monotonic, shared by every listener.
pub fn clock() -> Duration {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed()
}

/// A DNS resolver: the system's (`/etc/resolv.conf`, `/etc/hosts`), or the given
/// name servers.
pub fn resolver(servers: &[SocketAddr]) -> TokioResolver {
    let mut builder = None;
    if servers.is_empty() {
        match TokioResolver::builder_tokio() {
            Ok(b) => builder = Some(b),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the system DNS configuration; names will not resolve")
            }
        }
    }
    let mut builder = builder.unwrap_or_else(|| {
        let mut config = ResolverConfig::new();
        for addr in servers {
            config.add_name_server(NameServerConfig::new(*addr, Protocol::Udp));
        }
        TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
    });
    // Every A and every AAAA record becomes a backend, not just the first family.
    builder.options_mut().ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    builder.build()
}

/// Every TCP listener of the sidecar.
/// How tiers that name services reach them: through their nodes' mesh listeners.
pub trait MeshNodes: Send + Sync {
    /// `host:port` of the mesh listeners of `service`'s nodes.
    fn listeners(&self, service: &str) -> Vec<String>;
    /// The mTLS connector to them (this sidecar's identity, theirs checked).
    fn connector(&self, service: &str) -> pillion_http::stream::Connector;
}

pub struct TcpProxy {
    resolver: Arc<TokioResolver>,
    mesh: std::sync::OnceLock<Arc<dyn MeshNodes>>,
    listeners: tokio::sync::Mutex<BTreeMap<SocketAddr, Arc<Listener>>>,
    /// Listeners removed by a reload, still carrying connections.
    retired: std::sync::Mutex<Vec<Arc<Listener>>>,
    /// The configurations of the listeners that run, as last applied.
    running: std::sync::Mutex<Vec<ListenerConfig>>,
    /// Listeners of the last applied configuration that could not bind, and why: the
    /// sidecar is unhealthy until a later reload binds them.
    unbound: std::sync::Mutex<BTreeMap<SocketAddr, String>>,
}

impl TcpProxy {
    /// The proxy, without listeners. Raises the process's open-file limit to the hard
    /// limit first (see [`fd_limit`]), for the proxy and every other listener.
    pub fn new(resolver: TokioResolver) -> Arc<TcpProxy> {
        let _ = fd_limit::raise_to_hard_limit();
        Arc::new(TcpProxy {
            resolver: Arc::new(resolver),
            mesh: std::sync::OnceLock::new(),
            listeners: tokio::sync::Mutex::new(BTreeMap::new()),
            retired: std::sync::Mutex::new(Vec::new()),
            running: std::sync::Mutex::new(Vec::new()),
            unbound: std::sync::Mutex::new(BTreeMap::new()),
        })
    }

    /// Lets tiers name services (before the first [`TcpProxy::apply`]).
    pub fn set_mesh(&self, mesh: Arc<dyn MeshNodes>) {
        let _ = self.mesh.set(mesh);
    }

    /// The configurations of the running listeners (without those that could not
    /// start, so applying the same file again retries them).
    pub fn running(&self) -> Vec<ListenerConfig> {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The listeners of the applied configuration that are not listening, with why.
    pub fn unbound(&self) -> Vec<(SocketAddr, String)> {
        self.unbound
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(addr, why)| (*addr, why.clone()))
            .collect()
    }

    /// Makes the running listeners match `configs`: new ones start, removed ones
    /// stop accepting and drain, changed ones apply to new connections. Returns the
    /// listeners that could not start (their address is taken), the others run.
    pub async fn apply(&self, configs: &[ListenerConfig]) -> Result<(), String> {
        let mut listeners = self.listeners.lock().await;
        let mut errors = Vec::new();
        let mut unbound = BTreeMap::new();
        let wanted: Vec<SocketAddr> = configs.iter().map(|c| c.listen).collect();
        let removed: Vec<SocketAddr> = listeners
            .keys()
            .filter(|a| !wanted.contains(a))
            .copied()
            .collect();
        for addr in removed {
            if let Some(l) = listeners.remove(&addr) {
                l.stop_accepting();
                tracing::info!(listen = %addr, active = l.active(), "tcp listener removed; draining its connections");
                self.retired
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(l);
            }
        }
        let mut running = Vec::new();
        for config in configs {
            match listeners.get(&config.listen) {
                Some(l) => l.update(config.clone()).await,
                None => match Listener::start(
                    config.clone(),
                    self.resolver.clone(),
                    self.mesh.get().cloned(),
                )
                .await
                {
                    Ok(l) => {
                        listeners.insert(config.listen, l);
                    }
                    Err(e) => {
                        errors.push(format!("cannot listen on {} (tcp): {e}", config.listen));
                        unbound.insert(config.listen, format!("cannot listen: {e}"));
                        continue;
                    }
                },
            }
            running.push(config.clone());
        }
        *self.running.lock().unwrap_or_else(|e| e.into_inner()) = running;
        *self.unbound.lock().unwrap_or_else(|e| e.into_inner()) = unbound;
        self.retired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|l| {
                let busy = l.active() > 0;
                if !busy {
                    l.abort();
                }
                busy
            });
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    /// Graceful shutdown: stop accepting, let connections finish for up to `grace`
    /// (returning as soon as the last one ends), then close what is left and wait for
    /// every listener's tasks to end (at most [`STOP_WAIT`]).
    pub async fn shutdown(&self, grace: Duration) {
        let all: Vec<Arc<Listener>> = {
            let listeners = self.listeners.lock().await;
            listeners
                .values()
                .cloned()
                .chain(
                    self.retired
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .iter()
                        .cloned(),
                )
                .collect()
        };
        for l in &all {
            l.stop_accepting();
        }
        let drained = futures_util::future::join_all(all.iter().map(|l| l.drained()));
        if tokio::time::timeout(grace, drained).await.is_err() {
            let left: usize = all.iter().map(|l| l.active()).sum();
            tracing::warn!(
                connections = left,
                "closing tcp connections still open after the grace period"
            );
        }
        for l in &all {
            l.abort();
        }
        let stopped = futures_util::future::join_all(all.iter().map(|l| l.stopped()));
        if tokio::time::timeout(STOP_WAIT, stopped).await.is_err() {
            let left: usize = all.iter().map(|l| l.running_tasks()).sum();
            tracing::warn!(
                tasks = left,
                "tcp listener tasks still finishing a lookup or a probe after {}",
                pillion_core::duration::format(STOP_WAIT)
            );
        }
    }

    /// Every listener of the applied configuration: those that run, and those that
    /// could not bind (`"error"` says why).
    pub async fn status(&self) -> serde_json::Value {
        let listeners = self.listeners.lock().await;
        let unbound = self.unbound().into_iter().map(|(addr, error)| {
            serde_json::json!({
                "listen": addr.to_string(),
                "accepting": false,
                "active": 0,
                "tiers": [],
                "error": error,
            })
        });
        serde_json::Value::Array(
            listeners
                .values()
                .map(|l| l.status())
                .chain(unbound)
                .collect(),
        )
    }

    /// Prometheus text: connections, bytes and dial failures per backend.
    pub async fn render_metrics(&self, out: &mut String) {
        let listeners = self.listeners.lock().await;
        type Get = fn(&backend::Backend) -> u64;
        let metrics: [(&str, &str, &str, Get); 5] = [
            (
                "pillion_tcp_connections_total",
                "counter",
                "Connections proxied to a backend.",
                |b| b.connections.load(Ordering::Relaxed),
            ),
            (
                "pillion_tcp_active_connections",
                "gauge",
                "Connections open to a backend.",
                |b| b.active.load(Ordering::Relaxed) as u64,
            ),
            (
                "pillion_tcp_dial_failures_total",
                "counter",
                "Dials to a backend that failed or timed out.",
                |b| b.dial_failures.load(Ordering::Relaxed),
            ),
            (
                "pillion_tcp_sent_bytes_total",
                "counter",
                "Bytes from clients to a backend.",
                |b| b.bytes_up.load(Ordering::Relaxed),
            ),
            (
                "pillion_tcp_received_bytes_total",
                "counter",
                "Bytes from a backend to clients.",
                |b| b.bytes_down.load(Ordering::Relaxed),
            ),
        ];
        for (name, kind, help, get) in metrics {
            pillion_core::metrics::header(out, name, kind, help);
            for l in listeners.values() {
                for b in l.backends().iter() {
                    let _ = writeln!(
                        out,
                        "{name}{{listen=\"{}\",backend=\"{}\",tier=\"{}\"}} {}",
                        l.addr,
                        b.addr,
                        b.tier(),
                        get(b)
                    );
                }
            }
        }
        let name = "pillion_tcp_backend_latency_seconds";
        pillion_core::metrics::header(
            out,
            name,
            "gauge",
            "A backend's last measured dial time (listeners with latency_bucket).",
        );
        for l in listeners.values() {
            for b in l.backends().iter() {
                if let Some(latency) = b.latency() {
                    let _ = writeln!(
                        out,
                        "{name}{{listen=\"{}\",backend=\"{}\",tier=\"{}\"}} {}",
                        l.addr,
                        b.addr,
                        b.tier(),
                        latency.as_secs_f64()
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pillion_testkit::tcp::{Reply, TcpBackend};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_carries_the_open_connection_to_its_end_then_leaves_no_task_running() {
        let backend = TcpBackend::start("db", Reply::Echo).await;
        let proxy = TcpProxy::new(resolver(&["127.0.0.1:9".parse().unwrap()]));
        // Every background task busy: health checks, failback, latency tiers.
        let text = format!(
            "listen = \"127.0.0.1:0\"\nfailback_after = \"1s\"\nlatency_bucket = \"50ms\"\n\
             [[tiers]]\ntargets = [\"{}\"]\nhealth_check = \"1s\"\n",
            backend.addr()
        );
        let config: ListenerConfig = toml::from_str(&text).unwrap();
        proxy.apply(&[config]).await.unwrap();
        let listener = proxy
            .listeners
            .lock()
            .await
            .values()
            .next()
            .unwrap()
            .clone();

        let mut client = TcpStream::connect(listener.addr).await.unwrap();
        let mut greeting = [0u8; 3];
        client.read_exact(&mut greeting).await.unwrap();
        assert_eq!(&greeting, b"db\n");

        let shutdown = tokio::spawn({
            let proxy = proxy.clone();
            async move { proxy.shutdown(Duration::from_secs(3600)).await }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while listener.status()["accepting"] != false {
            assert!(Instant::now() < deadline, "the listener kept accepting");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Shutting down, the connection is carried on...
        client.write_all(b"ping").await.unwrap();
        let mut echo = [0u8; 4];
        client.read_exact(&mut echo).await.unwrap();
        assert_eq!(&echo, b"ping");
        assert!(
            !shutdown.is_finished(),
            "shutdown returned with a connection open"
        );
        // ...and its end ends the shutdown, long before the grace.
        drop(client);
        tokio::time::timeout(Duration::from_secs(60), shutdown)
            .await
            .expect("shutdown returned once the connection ended")
            .unwrap();
        assert_eq!(listener.active(), 0);
        assert_eq!(
            listener.running_tasks(),
            0,
            "a task of the listener runs after shutdown"
        );
    }
}
