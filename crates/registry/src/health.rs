//! Registration of the local app, kept true by a health check.
//!
//! The app is registered at start as node `NAME-<uuid>` with a TTL and registered again
//! every third of that TTL, so it never lapses while the sidecar lives. With a health
//! URL, the URL is fetched every interval: an error, a timeout or a non-2xx answer
//! takes the node out of the registry, and the next success puts it back. On shutdown
//! [`AppRegistration::stop`] deregisters it, after the check or registration under way
//! is done (one cut off mid-way could still land after the deregistration). Each
//! change of state is one log line.
//!
//! [`check_nodes`] checks the nodes of any registered service on demand, for
//! `GET /health/{service}`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use pillion_core::{Node, Service};
use pillion_http::pool::Outgoing;
use pillion_http::Client;
use serde::Serialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Registry;

/// What to register and how to check it.
#[derive(Debug, Clone)]
pub struct AppConfig {
    pub name: String,
    /// `host:port` other services use to reach the app.
    pub address: String,
    pub metadata: BTreeMap<String, String>,
    /// `http://...`; without it the app is registered and never checked.
    pub healthcheck_url: Option<String>,
    pub healthcheck_interval: Duration,
    pub healthcheck_timeout: Duration,
    pub register_ttl: Duration,
}

impl AppConfig {
    /// The app's registration: node `NAME-<uuid>` with host and port apart, as micro's
    /// sidecar registered its app (see [`Node::at`]).
    pub fn service(&self) -> Service {
        let id = format!("{}-{}", self.name, pillion_core::id::uuid_v4());
        Service {
            name: self.name.clone(),
            nodes: vec![Node::at(id, &self.address, self.metadata.clone())],
            ..Service::default()
        }
    }
}

/// What `/statusz` shows of the app's registration.
#[derive(Debug, Clone, Serialize)]
pub struct AppStatus {
    pub name: String,
    pub node_id: String,
    pub address: String,
    pub registered: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_health_check: Option<CheckResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_registry_error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    pub healthy: bool,
    /// `200 OK`, or what went wrong.
    pub detail: String,
    /// Seconds since the Unix epoch.
    pub at: u64,
}

/// The running registration loop of the local app.
pub struct AppRegistration {
    registry: Arc<dyn Registry>,
    service: Service,
    status: Arc<Mutex<AppStatus>>,
    task: JoinHandle<()>,
    /// Tells the task to stop between two checks.
    stop: CancellationToken,
    /// Holds the task, for [`AppRegistration::stop`] to wait for it.
    tasks: TaskTracker,
}

impl Drop for AppRegistration {
    /// The task stops at its next wait; nothing is deregistered (see
    /// [`AppRegistration::stop`]).
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// How long [`AppRegistration::stop`] waits for a check or a registration under way.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// Checks that a health URL is something this checker can fetch.
pub fn validate_health_url(url: &str) -> Result<(), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http"), Some(_)) => Ok(()),
        (Some("https"), _) => Err(format!(
            "{url:?}: https health checks are not supported; use the app's plain http address"
        )),
        _ => Err(format!(
            "{url:?} must look like http://127.0.0.1:9090/health"
        )),
    }
}

impl AppRegistration {
    /// Starts registering and checking the app. The first health check (or, without a
    /// health URL, the first registration) happens at once.
    pub fn start(registry: Arc<dyn Registry>, cfg: AppConfig) -> AppRegistration {
        let service = cfg.service();
        let node_id = service.nodes[0].id.clone();
        let status = Arc::new(Mutex::new(AppStatus {
            name: cfg.name.clone(),
            node_id,
            address: cfg.address.clone(),
            registered: false,
            last_health_check: None,
            last_registry_error: None,
        }));
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let task = tasks.spawn(run(
            registry.clone(),
            cfg,
            service.clone(),
            status.clone(),
            stop.clone(),
        ));
        AppRegistration {
            registry,
            service,
            status,
            task,
            stop,
            tasks,
        }
    }

    pub fn status(&self) -> AppStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Stops checking (the check or registration under way is finished first, for at
    /// most 10 s) and takes the app out of the registry.
    pub async fn stop(&self) {
        self.stop.cancel();
        self.tasks.close();
        if tokio::time::timeout(STOP_WAIT, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(service = %self.service.name, "the app's health check or registration did not finish within {}; cut off", pillion_core::duration::format(STOP_WAIT));
            self.task.abort();
        }
        let was_registered = self.status().registered;
        match self.registry.deregister(&self.service).await {
            Ok(_) if was_registered => tracing::info!(
                service = %self.service.name,
                node = %self.service.nodes[0].id,
                "app deregistered (shutdown)"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not deregister the app at shutdown"),
        }
    }
}

async fn run(
    registry: Arc<dyn Registry>,
    cfg: AppConfig,
    service: Service,
    status: Arc<Mutex<AppStatus>>,
    stop: CancellationToken,
) {
    let client = Client::new(Default::default(), cfg.healthcheck_timeout);
    let node = service.nodes[0].id.clone();
    let update =
        |f: &dyn Fn(&mut AppStatus)| f(&mut status.lock().unwrap_or_else(|e| e.into_inner()));
    let mut healthy = cfg.healthcheck_url.is_none();
    let mut registered = false;
    // What the last logged failure said: the first failure is logged (an app that is
    // not up yet, a wrong URL), then each change of reason, not every check.
    let mut logged_failure: Option<String> = None;
    let mut health_tick = tokio::time::interval(cfg.healthcheck_interval);
    let mut register_tick =
        tokio::time::interval((cfg.register_ttl / 3).max(Duration::from_millis(100)));
    for tick in [&mut health_tick, &mut register_tick] {
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    loop {
        let check_now = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = health_tick.tick(), if cfg.healthcheck_url.is_some() => true,
            _ = register_tick.tick() => false,
        };
        if check_now {
            let url = cfg.healthcheck_url.as_deref().unwrap_or_default();
            let result = check(&client, url, cfg.healthcheck_timeout).await;
            healthy = result.healthy;
            if healthy {
                if logged_failure.take().is_some() {
                    tracing::info!(service = %cfg.name, %node, url, "app health check passes again");
                }
            } else if logged_failure.as_deref() != Some(result.detail.as_str()) {
                tracing::warn!(service = %cfg.name, %node, url, detail = %result.detail, "app health check failed");
                logged_failure = Some(result.detail.clone());
            }
            update(&|s| s.last_health_check = Some(result.clone()));
            if !healthy && registered {
                match registry.deregister(&service).await {
                    Ok(_) => {
                        registered = false;
                        tracing::info!(service = %cfg.name, %node, "app deregistered (unhealthy)");
                    }
                    Err(e) => {
                        tracing::warn!(service = %cfg.name, error = %e, "could not deregister the unhealthy app; will retry")
                    }
                }
            }
        }
        // Register on the first success and refresh on every re-register tick.
        if healthy && (!registered || !check_now) {
            match registry.register(&service, Some(cfg.register_ttl)).await {
                Ok(()) => {
                    if !registered {
                        tracing::info!(service = %cfg.name, %node, address = %cfg.address, "app registered");
                    }
                    registered = true;
                    update(&|s| s.last_registry_error = None);
                }
                Err(e) => {
                    if registered
                        || status
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .last_registry_error
                            .is_none()
                    {
                        tracing::warn!(service = %cfg.name, error = %e, "app registration failed; will retry");
                    }
                    registered = false;
                    let msg = e.to_string();
                    update(&|s| s.last_registry_error = Some(msg.clone()));
                }
            }
        }
        update(&|s| s.registered = registered);
    }
}

async fn check(client: &Client, url: &str, timeout: Duration) -> CheckResult {
    let at = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let req = http::Request::get(url)
        .header(http::header::USER_AGENT, "pillion-healthcheck")
        .body(Outgoing::Full(None));
    let attempt = async {
        let req = req.map_err(|e| e.to_string())?;
        // The whole answer is read so the connection can be reused.
        let (status, _) = client
            .fetch(req, timeout)
            .await
            .map_err(|e| pillion_http::describe(&e))?;
        Ok::<_, String>(status)
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(status)) => CheckResult {
            healthy: status.is_success(),
            detail: status.to_string(),
            at,
        },
        Ok(Err(e)) => CheckResult {
            healthy: false,
            detail: e,
            at,
        },
        Err(_) => CheckResult {
            healthy: false,
            detail: format!(
                "no answer within {}",
                pillion_core::duration::format(timeout)
            ),
            at,
        },
    }
}

/// How long one node's check may take in [`check_nodes`].
pub const NODE_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// One node's health as `GET /health/{service}` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeHealth {
    pub id: String,
    /// `host:port` that was checked.
    pub address: String,
    pub healthy: bool,
    /// Why the node is unhealthy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Checks every node of `versions` at once, each within `timeout`: a GET of the path
/// in the node's `health` metadata (or its service's), where a 2xx answer is healthy;
/// without one, a TCP connect to the node. The answer lists the nodes in order.
pub async fn check_nodes(
    client: &Arc<Client>,
    versions: &[Service],
    timeout: Duration,
) -> Vec<NodeHealth> {
    let mut checks = tokio::task::JoinSet::new();
    let mut order = Vec::new();
    for service in versions {
        for node in &service.nodes {
            let address = node.endpoint();
            let path = node
                .metadata
                .get("health")
                .or_else(|| service.metadata.get("health"))
                .cloned();
            let client = client.clone();
            let i = order.len();
            order.push((node.id.clone(), address.clone()));
            checks.spawn(async move { (i, check_node(&client, &address, path, timeout).await) });
        }
    }
    let mut results: Vec<Option<Result<(), String>>> = vec![None; order.len()];
    while let Some(done) = checks.join_next().await {
        if let Ok((i, result)) = done {
            results[i] = Some(result);
        }
    }
    order
        .into_iter()
        .zip(results)
        .map(|((id, address), result)| {
            let result = result.unwrap_or_else(|| Err("the check did not finish".into()));
            NodeHealth {
                id,
                address,
                healthy: result.is_ok(),
                error: result.err(),
            }
        })
        .collect()
}

async fn check_node(
    client: &Client,
    address: &str,
    path: Option<String>,
    timeout: Duration,
) -> Result<(), String> {
    let within = pillion_core::duration::format(timeout);
    let Some(path) = path else {
        return match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(address)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("TCP connect to {address}: {e}")),
            Err(_) => Err(format!(
                "TCP connect to {address}: no answer within {within}"
            )),
        };
    };
    let slash = if path.starts_with('/') { "" } else { "/" };
    let url = format!("http://{address}{slash}{path}");
    let req = http::Request::get(&url)
        .header(http::header::USER_AGENT, "pillion-healthcheck")
        .body(Outgoing::Full(None))
        .map_err(|e| format!("health path {path:?} does not make a URL: {e}"))?;
    match tokio::time::timeout(timeout, client.fetch(req, timeout)).await {
        Ok(Ok((status, _))) if status.is_success() => Ok(()),
        Ok(Ok((status, _))) => Err(format!("GET {url} answered {status}")),
        Ok(Err(e)) => Err(format!("GET {url}: {}", pillion_http::describe(&e))),
        Err(_) => Err(format!("GET {url}: no answer within {within}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryRegistry;
    use crate::{BackendStatus, Catalog, RegistryError};
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A registry across a slow network: a registration lands a moment after it is
    /// sent, even if the sender stops waiting for the answer; a deregistration is quick.
    struct Remote {
        server: Arc<MemoryRegistry>,
        sent: Arc<AtomicU64>,
        landed: Arc<AtomicU64>,
    }

    #[async_trait::async_trait]
    impl Registry for Remote {
        async fn register(
            &self,
            service: &Service,
            ttl: Option<Duration>,
        ) -> Result<(), RegistryError> {
            self.sent.fetch_add(1, Ordering::SeqCst);
            let (server, landed, service) =
                (self.server.clone(), self.landed.clone(), service.clone());
            let request = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let done = server.register(&service, ttl).await;
                landed.fetch_add(1, Ordering::SeqCst);
                done
            });
            request.await.expect("the request ran")
        }

        async fn deregister(&self, service: &Service) -> Result<usize, RegistryError> {
            self.server.deregister(service).await
        }

        fn catalog(&self) -> Arc<Catalog> {
            self.server.catalog()
        }

        fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
            self.server.changes()
        }

        fn status(&self) -> BackendStatus {
            self.server.status()
        }

        async fn close(&self) {}
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stop_deregisters_after_the_registration_under_way_not_before_it_lands() {
        let server = Arc::new(MemoryRegistry::new());
        let (sent, landed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let remote = Arc::new(Remote {
            server: server.clone(),
            sent: sent.clone(),
            landed: landed.clone(),
        });
        let app = AppRegistration::start(
            remote,
            AppConfig {
                name: "orders".into(),
                address: "127.0.0.1:9".into(),
                metadata: BTreeMap::new(),
                healthcheck_url: None,
                healthcheck_interval: Duration::from_secs(3600),
                healthcheck_timeout: Duration::from_secs(1),
                register_ttl: Duration::from_secs(3600),
            },
        );
        // The first registration is sent at once; stop while it is on its way.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while sent.load(Ordering::SeqCst) == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the registration was never sent"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        app.stop().await;

        while landed.load(Ordering::SeqCst) == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the registration never landed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            server
                .catalog()
                .get("orders")
                .unwrap_or_default()
                .is_empty(),
            "the app is registered after stop"
        );
    }
}
