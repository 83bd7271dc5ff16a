//! Service invocation: the local app calls any registered service through its
//! sidecar by name, and pillion picks a healthy node, forwards the call, retries
//! safely when a node fails and answers within a deadline.
//!
//! The data path is a composition of small parts, each in its module and tested alone:
//!
//! - [`mapping`]: URL path -> (service, method), micro's table.
//! - [`endpoints`]: the nodes of every service, a lock-free snapshot rebuilt from
//!   registry watches, with per-node state (peak-EWMA latency, load, failures,
//!   ejection) and locality tiers (zone, then region, then anywhere).
//! - [`balance`]: which node for the next attempt (p2c over peak-EWMA, round-robin).
//! - [`budget`]: the retry budget (20% of requests + 10/s).
//! - [`retry`]: whether a failed attempt may go again, decided from who is to blame.
//! - [`attempt`]: the steps of one attempt, each a decision tested alone: how the
//!   call reaches the node, what it sends, how long it may take, what its outcome
//!   tells the node's record and the caller, how long to wait before the next.
//! - [`forward`]: one call across attempts: admission, pinning, the attempts in a
//!   loop, the service's metrics.
//! - [`handler`]: the HTTP surface: `/{service}/{method}`, `/rpc`, the proxy handler.
//! - [`metrics`]: per-service counters and latency histograms.
//!
//! Connections to nodes (pools, HTTP/1.1 and h2c) are `pillion-http`'s.
//!
//! It must never hold a lock across a request, nor buffer a body it was told to
//! stream.
#![forbid(unsafe_code)]

pub mod attempt;
pub mod balance;
pub mod budget;
pub mod endpoints;
pub mod forward;
pub mod handler;
pub mod jsonrpc;
pub mod mapping;
pub mod metrics;
pub mod retry;

use std::sync::Arc;
use std::time::Duration;

use axum::routing::post;
use axum::Router;
use pillion_registry::Registry;
use serde_json::json;

pub use balance::Strategy;
pub use endpoints::{Dialect, EjectionPolicy, Locality, Protocol};
pub use forward::Policy;

/// How `/{service}/...` is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Handler {
    /// `POST /{service}/{method}` -> `POST http://{node}/{Method}`.
    #[default]
    Rpc,
    /// Any method, path unchanged, streamed.
    Proxy,
}

impl std::str::FromStr for Handler {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "rpc" => Ok(Handler::Rpc),
            "proxy" => Ok(Handler::Proxy),
            _ => Err(format!("unknown handler {s:?}: use rpc or proxy")),
        }
    }
}

/// How a node that names no `protocol` in its metadata is called (`--rpc-codec`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RpcCodec {
    /// Calls by service and method are `POST /{Method}` with the body as it came.
    #[default]
    Http,
    /// As micro's sidecar called every node: JSON-RPC over go-micro's HTTP transport.
    JsonRpc,
}

impl RpcCodec {
    fn unset(self) -> Protocol {
        match self {
            RpcCodec::Http => Protocol::Unset,
            RpcCodec::JsonRpc => Protocol::GoMicro(Dialect::JsonRpc),
        }
    }
}

impl std::str::FromStr for RpcCodec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "http" => Ok(RpcCodec::Http),
            "jsonrpc" => Ok(RpcCodec::JsonRpc),
            _ => Err(format!("unknown rpc codec {s:?}: use http or jsonrpc")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub handler: Handler,
    /// How nodes with no `protocol` metadata are called.
    pub rpc_codec: RpcCodec,
    pub namespace: String,
    /// Default deadline for the answer's headers (`X-Pillion-Timeout` overrides it).
    pub timeout: Duration,
    /// How long a call to a service without a node waits for one (`X-Pillion-Wait`
    /// overrides it); zero: not at all.
    pub wait_for_node: Duration,
    pub max_body: u64,
    pub policy: Policy,
    /// How connections to nodes are kept.
    pub pool: pillion_http::pool::Settings,
    /// Whether a sidecar in the mesh may call, in clear text, a node without a mesh
    /// listener of a service that has nodes with one (`--mesh-permissive`, for a
    /// migration). Otherwise such nodes are never selected.
    pub mesh_permissive: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            handler: Handler::Rpc,
            rpc_codec: RpcCodec::Http,
            namespace: String::new(),
            timeout: Duration::from_secs(15),
            wait_for_node: Duration::ZERO,
            max_body: 10 << 20,
            policy: Policy {
                strategy: Strategy::PeakEwma,
                connect_timeout: Duration::from_secs(1),
                per_try_timeout: Duration::from_secs(5),
                retries: 2,
                max_pending: 1024,
                ejection: EjectionPolicy::default(),
            },
            pool: Default::default(),
            mesh_permissive: false,
        }
    }
}

/// The invocation data path of one sidecar.
pub struct Invoker {
    pub config: Config,
    pub endpoints: Arc<endpoints::Endpoints>,
    /// This sidecar's mark in [`handler::HOP_HEADER`], random per process.
    pub hop: http::HeaderValue,
}

impl Invoker {
    /// Starts following the registry. Must be called within a tokio runtime.
    /// `mesh` reaches nodes registered with a mesh listener (none: this sidecar is
    /// not in the mesh, and calls to such nodes are refused).
    pub fn new(
        registry: Arc<dyn Registry>,
        locality: Locality,
        config: Config,
        mesh: Option<endpoints::MeshConnect>,
    ) -> Arc<Invoker> {
        Arc::new(Invoker {
            endpoints: endpoints::Endpoints::follow(
                registry,
                locality,
                config.pool.clone(),
                mesh,
                config.mesh_permissive,
                config.policy.ejection,
                config.rpc_codec.unset(),
            ),
            // Static (leaked once per invoker): added to every call, and a static
            // value is copied without touching a reference count.
            hop: http::HeaderValue::from_static(Box::leak(
                pillion_core::id::uuid_v4()[..8]
                    .to_string()
                    .into_boxed_str(),
            )),
            config,
        })
    }

    /// `POST /rpc`. Calls to `/{service}/...` do not go through a router: the server
    /// hands them to [`handler::service_call`] directly.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/rpc", post(handler::rpc_endpoint))
            .with_state(self.clone())
    }

    /// For `/statusz`: the nodes of every service called through this sidecar, with
    /// their tier, load, state ([`endpoints::NodeHealth`]: `health`), measured latency
    /// (`latency_ms`, null before the first answer), the balancer's latency estimate
    /// (`ewma_ms`, which counts a failure as a 1 s answer and assumes 30 ms before
    /// the first), failures and ejection.
    pub fn status(&self) -> serde_json::Value {
        let set = self.endpoints.load();
        let now_ms = endpoints::clock().as_millis() as u64;
        let ejection = &self.config.policy.ejection;
        let mut names: Vec<&String> = set.services.keys().collect();
        names.sort();
        let services: Vec<_> = names
            .into_iter()
            .map(|name| {
                let svc = &set.services[name];
                let nodes: Vec<_> = svc
                    .nodes
                    .iter()
                    .map(|n| {
                        let health = n.health(now_ms, ejection);
                        let ejected_for = match health {
                            endpoints::NodeHealth::Ejected(d) => Some(d.as_secs_f64()),
                            _ => None,
                        };
                        let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
                        json!({
                            "id": n.id,
                            "address": n.authority,
                            "tier": n.tier,
                            "health": health.as_str(),
                            "pending": n.pending(),
                            "latency_ms": n.latency().map(ms),
                            "ewma_ms": ms(n.ewma()),
                            "consecutive_failures": n.consecutive_failures(),
                            "last_failure_secs_ago": n.last_failure(now_ms).map(|d| d.as_secs_f64()),
                            "ejected": ejected_for.is_some(),
                            "ejected_for_secs": ejected_for,
                            "idle_connections": n.pool.idle(),
                        })
                    })
                    .collect();
                json!({ "name": name, "nodes": nodes })
            })
            .collect();
        json!({
            "handler": match self.config.handler { Handler::Rpc => "rpc", Handler::Proxy => "proxy" },
            "services": services,
        })
    }

    /// The call counters of every service called through this sidecar, for the
    /// dashboard's windows, with the calls waiting for it now.
    pub fn call_snapshots(&self) -> Vec<(String, metrics::Snapshot, usize)> {
        self.endpoints
            .all_shared()
            .into_iter()
            .map(|(name, s)| {
                let pending = s.pending.load(std::sync::atomic::Ordering::Relaxed);
                (name, s.metrics.snapshot(), pending)
            })
            .collect()
    }

    /// Appends the invocation metrics in Prometheus text format.
    pub fn render_metrics(&self, out: &mut String) {
        let all = self.endpoints.all_shared();
        metrics::render(out, all.iter().map(|(name, s)| (name.as_str(), &s.metrics)));
    }
}
