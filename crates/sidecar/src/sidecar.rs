//! Wiring: open the registry, start the app's registration, serve the HTTP API, and
//! take it all down in order on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use http::StatusCode;
use pillion_broker::metrics::BrokerMetrics;
use pillion_broker::Broker;
use pillion_http::server::{Limits, OkMap};
use pillion_invoke::Invoker;
use pillion_registry::health::AppRegistration;
use pillion_registry::Registry;
use pillion_session::inbound::Inbound;
use pillion_tcp::TcpProxy;
use serde_json::json;

use crate::settings::Settings;
use crate::shutdown::{Shutdown, Stopper};

/// Where TCP tiers that name services connect: their nodes' mesh listeners.
struct MeshRoutes {
    registry: Arc<dyn Registry>,
    identity: Arc<pillion_mesh::identity::Identity>,
}

impl pillion_tcp::MeshNodes for MeshRoutes {
    fn listeners(&self, service: &str) -> Vec<String> {
        let catalog = self.registry.catalog();
        let versions = catalog.get(service).unwrap_or_default();
        versions
            .iter()
            .flat_map(|v| v.nodes.iter())
            .filter_map(|n| n.mesh().map(str::to_string))
            .collect()
    }

    fn connector(&self, service: &str) -> pillion_http::stream::Connector {
        self.identity.connector(service)
    }
}

/// HTTPS on the API's `--address`: from files (`--api-tls-cert`), or from the ACME CA
/// (`--api-acme-domain`), or none.
#[derive(Clone, Default)]
struct ApiTls {
    files: Option<Arc<pillion_http::tls::Certificates>>,
    acme: Option<Arc<pillion_mesh::acme::Acme>>,
    /// The ACME names (the files' names are read from what they serve).
    domains: Vec<String>,
}

impl ApiTls {
    fn start(settings: &Settings) -> Result<ApiTls, String> {
        let files = match &settings.api_tls {
            Some(files) => Some(
                files
                    .watch(settings.reload_period)
                    .map_err(|e| e.to_string())?,
            ),
            None => None,
        };
        let acme = match settings.api_acme.clone() {
            Some(config) => Some(pillion_mesh::acme::Acme::new(config).map_err(|e| e.to_string())?),
            None => None,
        };
        let domains = settings
            .api_acme
            .as_ref()
            .map(|c| c.domains.clone())
            .unwrap_or_default();
        Ok(ApiTls {
            files,
            acme,
            domains,
        })
    }

    fn is_none(&self) -> bool {
        self.files.is_none() && self.acme.is_none()
    }

    fn server_config(&self) -> Option<Arc<rustls::ServerConfig>> {
        match (&self.files, &self.acme) {
            (Some(files), _) => Some(pillion_http::tls::server_config(files.clone())),
            (None, Some(acme)) => Some(acme.server_config()),
            (None, None) => None,
        }
    }

    /// The names the API's certificate is for, now: the door takes them as the API's
    /// own host names.
    fn names(&self) -> crate::door::Names {
        let files = self.files.clone();
        let domains = self.domains.clone();
        Arc::new(move || match &files {
            Some(files) => files.status().names,
            None => domains.clone(),
        })
    }

    fn status(&self) -> serde_json::Value {
        match (&self.files, &self.acme) {
            (Some(files), _) => json!({ "files": tls_status(&files.status()) }),
            (None, Some(acme)) => json!({ "acme": acme.status() }),
            (None, None) => serde_json::Value::Null,
        }
    }
}

/// What `/healthz` and `/statusz` read.
struct Status {
    started: Instant,
    address: String,
    registry: Arc<dyn Registry>,
    app: Option<Arc<AppRegistration>>,
    invoker: Arc<Invoker>,
    inbound: Option<Arc<Inbound>>,
    broker: Arc<dyn Broker>,
    broker_metrics: Arc<BrokerMetrics>,
    tcp: Arc<TcpProxy>,
    identity: Option<Arc<pillion_mesh::identity::Identity>>,
    acme: Option<Arc<pillion_mesh::acme::Acme>>,
    /// HTTPS on --listen from --tls-cert/--tls-key.
    certificates: Option<Arc<pillion_http::tls::Certificates>>,
    /// HTTPS on the API's --address.
    api_tls: ApiTls,
    mesh_inbound: Option<Arc<pillion_mesh::inbound::MeshInbound>>,
    /// The rate limits of --listen.
    listen_limits: Option<Arc<pillion_mesh::policy::Limits>>,
    dashboard: Arc<crate::dashboard::Recorder>,
    spans: Option<Arc<crate::otlp::ExportMetrics>>,
}

/// `pillion mesh serve`: the issuer, until SIGTERM or SIGINT.
pub async fn mesh_issuer(config: pillion_mesh::issuer::IssuerConfig) -> Result<(), String> {
    let shutdown = crate::shutdown::Shutdown::on_signals().map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("--listen {}: {e}", config.listen))?;
    tracing::info!(listen = %config.listen, ca = %config.ca_cert.display(), "mesh issuer listening");
    pillion_mesh::issuer::serve(config, listener, shutdown.begun())
        .await
        .map_err(|e| e.to_string())
}

/// `pillion run`: [`start`], then a graceful stop on the first SIGTERM or SIGINT (a
/// second one exits at once).
pub async fn run(settings: Settings) -> Result<(), StartError> {
    let running = start(settings).await?;
    crate::shutdown::on_signals(running.stopper())
        .map_err(|e| StartError::Other(format!("installing signal handlers: {e}")))?;
    running.stopped().await
}

/// Why a sidecar did not start (or did not stop cleanly).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound: the port is taken, or the address is not this
    /// host's.
    #[error("cannot listen on {addr} ({flag}): {source}{hint}")]
    Bind {
        flag: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
        hint: &'static str,
    },
    /// A backend, a certificate, a file: the message says which and why.
    #[error("{0}")]
    Other(String),
}

impl From<String> for StartError {
    fn from(message: String) -> Self {
        StartError::Other(message)
    }
}

/// A sidecar that serves: its addresses, and the way to stop it.
pub struct Running {
    address: SocketAddr,
    listen: Option<SocketAddr>,
    stopper: Stopper,
    stopping: tokio::task::JoinHandle<Result<(), StartError>>,
}

impl Running {
    /// The API's address (`--address`, its port picked by the kernel if it was 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.address
    }

    /// The inbound proxy's address (`--listen`), if it has one.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.listen
    }

    /// A handle that starts the graceful stop (signals use one).
    pub fn stopper(&self) -> Stopper {
        self.stopper.clone()
    }

    /// Stops gracefully: the app out of the registry, calls in flight finished
    /// within the settings' grace period, every backend released.
    pub async fn shutdown(self) -> Result<(), StartError> {
        self.stopper.stop();
        self.stopped().await
    }

    /// Waits until the sidecar has stopped (after [`Stopper::stop`]).
    pub async fn stopped(self) -> Result<(), StartError> {
        self.stopping
            .await
            .map_err(|e| StartError::Other(format!("the sidecar's stop failed: {e}")))?
    }
}

/// Starts a sidecar: binds every listener, opens the registry, the broker and the
/// session store, registers the app, and serves; returns once it serves.
pub async fn start(settings: Settings) -> Result<Running, StartError> {
    let (stopper, mut shutdown) = Shutdown::new();
    // Before anything serves: from here on every hop records its span.
    let exporter = settings.trace.otlp_traces_url.as_ref().map(|url| {
        let exporter =
            crate::otlp::Exporter::install(url.clone(), settings.trace.service_name.clone());
        let metrics = exporter.metrics.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(exporter.run(async move {
            let _ = stopped.await;
        }));
        (task, stop, metrics)
    });
    let listener = tokio::net::TcpListener::bind(settings.address)
        .await
        .map_err(|source| StartError::Bind {
            flag: "--address",
            addr: settings.address,
            source,
            hint: " (is another pillion running? choose another --address)",
        })?;
    let address = listener.local_addr().map_err(|e| e.to_string())?;
    // The peers' `pillion members` show the API's bound address (--address may say :0).
    let cluster = pillion_registry::cluster::ClusterOptions {
        member_api: Some(address.to_string()),
        ..settings.cluster.clone()
    };
    let registry = pillion_registry::open(&settings.registry, &cluster)
        .await
        .map_err(|e| e.to_string())?;
    let inbound = match &settings.inbound {
        None => None,
        Some(cfg) => {
            let store = pillion_session::open(&cfg.store, cfg.bailiff.clone())
                .map_err(|e| e.to_string())?;
            let listener = tokio::net::TcpListener::bind(cfg.listen)
                .await
                .map_err(|source| StartError::Bind {
                    flag: "--listen",
                    addr: cfg.listen,
                    source,
                    hint: "",
                })?;
            tracing::info!(
                listen = %cfg.listen,
                app = %cfg.proxy.app_url,
                store = %store.backend(),
                "inbound session proxy listening"
            );
            let inbound = Inbound::new(store, cfg.proxy.clone());
            let checked = inbound.clone();
            tokio::spawn(async move { checked.check_store_at_start(STORE_CHECK_TIMEOUT).await });
            Some((inbound, listener))
        }
    };

    let acme = match settings.inbound.as_ref().and_then(|i| i.acme.clone()) {
        Some(config) => Some(pillion_mesh::acme::Acme::new(config).map_err(|e| e.to_string())?),
        None => None,
    };
    let certificates = match settings.inbound.as_ref().and_then(|i| i.tls.as_ref()) {
        Some(files) => Some(
            files
                .watch(settings.reload_period)
                .map_err(|e| e.to_string())?,
        ),
        None => None,
    };
    let api_tls = ApiTls::start(&settings)?;
    let identity = match &settings.mesh {
        Some(mesh) => Some(
            pillion_mesh::identity::Identity::start(&mesh.identity)
                .await
                .map_err(|e| e.to_string())?,
        ),
        None => None,
    };
    if settings.invoke.mesh_permissive {
        tracing::warn!(
            "--mesh-permissive: clear text is allowed beside the mesh (calls to meshed services may go to nodes without a mesh listener, such nodes are registered, an app other hosts reach may sit behind --mesh-listen); for a migration only"
        );
    }
    let tcp = TcpProxy::new(pillion_tcp::resolver(&settings.dns_servers));
    if let Some(identity) = &identity {
        tcp.set_mesh(Arc::new(MeshRoutes {
            registry: registry.clone(),
            identity: identity.clone(),
        }));
    }
    tcp.apply(&settings.tcp).await?;
    let reloader = settings.config_file.clone().map(|file| {
        // Read as the start read it: TOML, or iaido's YAML.
        let read = file.read_tcp.clone();
        tokio::spawn(pillion_tcp::reload::follow(
            file.path,
            settings.reload_period,
            tcp.clone(),
            move |text| read(text),
        ))
    });
    let broker_metrics = Arc::new(BrokerMetrics::default());
    let (broker, embedded): (Arc<dyn Broker>, _) = if pillion_broker::nats::is_nats(
        &settings.broker.url,
    ) {
        let nats = pillion_broker::nats::NatsBroker::connect(
            &settings.broker.url,
            settings.broker.nats.clone(),
            broker_metrics.clone(),
        )
        .await
        .map_err(|e| e.to_string())?;
        (nats, None)
    } else {
        if !api_tls.is_none() {
            tracing::warn!("the embedded broker's streams between sidecars are plain HTTP to each sidecar's --address, which is HTTPS here: other sidecars cannot deliver to this one's subscribers; use --broker nats://HOST:PORT across sidecars");
        }
        let advertise = settings
            .broker
            .advertise
            .clone()
            .unwrap_or_else(|| address.to_string());
        let embedded = pillion_broker::embedded::EmbeddedBroker::with_settings(
            registry.clone(),
            advertise,
            broker_metrics.clone(),
            pillion_broker::link::LinkSettings {
                api_token: settings.api_token.clone(),
                ..Default::default()
            },
        );
        (embedded.clone() as Arc<dyn Broker>, Some(embedded))
    };
    let broker_api = Arc::new(pillion_broker::api::BrokerApi {
        broker: broker.clone(),
        embedded,
        config: settings.broker.api.clone(),
        metrics: broker_metrics.clone(),
        stopping: Default::default(),
        sockets: Default::default(),
    });
    {
        // Subscribers hear that the sidecar stops as soon as it begins to.
        let stopping = broker_api.stopping.clone();
        let begun = shutdown.clone().begun();
        tokio::spawn(async move {
            begun.await;
            stopping.cancel();
        });
    }
    let pushes = match &settings.broker.push_to {
        Some(app) if !settings.broker.push.is_empty() => Some(pillion_broker::push::start(
            broker.clone(),
            settings.broker.push.clone(),
            app.clone(),
            settings.broker.push_queue.clone(),
            broker_metrics.clone(),
        )),
        _ => None,
    };

    let app = settings
        .app
        .clone()
        .map(|cfg| Arc::new(AppRegistration::start(registry.clone(), cfg)));
    let invoker = Invoker::new(
        registry.clone(),
        settings.locality.clone(),
        settings.invoke.clone(),
        identity.clone().map(|identity| {
            Arc::new(move |service: &str| identity.connector(service))
                as pillion_invoke::endpoints::MeshConnect
        }),
    );
    let mesh_inbound = match settings.mesh.as_ref().and_then(|m| m.listen.as_ref()) {
        Some(cfg) => {
            let listener = tokio::net::TcpListener::bind(cfg.addr)
                .await
                .map_err(|source| StartError::Bind {
                    flag: "--mesh-listen",
                    addr: cfg.addr,
                    source,
                    hint: "",
                })?;
            let jwt = match cfg.jwt.clone() {
                Some(config) => Some(pillion_mesh::jwt::Verifier::new(config).await?),
                None => None,
            };
            let inbound = pillion_mesh::inbound::MeshInbound::new(
                settings
                    .app
                    .as_ref()
                    .map(|a| a.name.clone())
                    .unwrap_or_default(),
                cfg.app.clone(),
                cfg.allow.clone(),
                cfg.rules.clone(),
                cfg.limits.clone(),
                identity.as_ref().map(|i| i.revoked()).unwrap_or_default(),
                jwt,
                settings.invoke.timeout,
                settings.invoke.policy.connect_timeout,
            );
            tracing::info!(listen = %cfg.addr, app = %cfg.app, "mesh listener listening");
            Some((inbound, listener))
        }
        None => None,
    };
    let status = Arc::new(Status {
        started: Instant::now(),
        address: address.to_string(),
        registry: registry.clone(),
        app: app.clone(),
        invoker: invoker.clone(),
        inbound: inbound.as_ref().map(|(i, _)| i.clone()),
        broker: broker.clone(),
        dashboard: crate::dashboard::Recorder::start(invoker.clone(), broker_metrics.clone()),
        broker_metrics,
        tcp: tcp.clone(),
        identity: identity.clone(),
        acme: acme.clone(),
        certificates: certificates.clone(),
        api_tls: api_tls.clone(),
        mesh_inbound: mesh_inbound.as_ref().map(|(m, _)| m.clone()),
        listen_limits: settings.inbound.as_ref().map(|i| i.limits.clone()),
        spans: exporter.as_ref().map(|(_, _, m)| m.clone()),
    });
    // Fixed routes first; every other path is a call to a service (the invoker's
    // fallback), so a service cannot be named registry, rpc, healthz, statusz, metrics
    // or stats.
    let router = Router::new()
        .route("/healthz", get(healthz))
        .route("/statusz", get(statusz))
        .route("/metrics", get(metrics))
        .route("/dashboard", get(crate::dashboard::page))
        .route("/dashboard/app.js", get(crate::dashboard::script))
        .route("/dashboard/style.css", get(crate::dashboard::style))
        .route("/dashboard/data", get(dashboard_data))
        .route("/stats", get(stats))
        .with_state(status)
        .merge(pillion_registry::api::router(
            registry.clone(),
            settings.invoke.mesh_permissive,
        ))
        .merge(pillion_broker::api::router(broker_api.clone()))
        .merge(invoker.router());

    let listen = inbound
        .as_ref()
        .and_then(|(_, listener)| listener.local_addr().ok());
    if let Some(path) = &settings.ready_file {
        write_ready_file(path, address, listen)?;
    }
    tracing::info!(
        %address,
        registry = %registry.status().backend,
        app = settings.app.as_ref().map(|a| a.name.as_str()).unwrap_or("-"),
        "pillion listening"
    );
    let limits = Limits {
        read_header_timeout: settings.read_header_timeout,
        read_body_timeout: settings.read_body_timeout,
        idle_timeout: settings.idle_timeout,
        max_connections: Some(settings.api_max_connections),
        grace: settings.grace_period,
        tls: None,
        identify: None,
        tunnel: None,
    };
    if api_tls.is_none() && !address.ip().is_loopback() {
        tracing::warn!(%address, "the API is plain HTTP off loopback (--api-plaintext): its token and data cross the network in clear");
    }
    let door =
        crate::door::Door::new(settings.api_token.clone(), address).with_names(api_tls.names());
    let mut servers = vec![tokio::spawn(crate::api::serve_api(
        listener,
        router,
        invoker,
        Arc::new(door),
        Limits {
            tls: api_tls.server_config(),
            ..limits.clone()
        },
        shutdown.clone().begun(),
    ))];
    let api_orders = api_tls
        .acme
        .clone()
        .map(|acme| tokio::spawn(acme.run(shutdown.clone().begun())));
    if let Some((inbound, listener)) = inbound {
        let tls = match (&certificates, &acme) {
            (Some(certificates), _) => Some(pillion_http::tls::server_config(certificates.clone())),
            (None, Some(acme)) => Some(acme.server_config()),
            (None, None) => None,
        };
        let limits = Limits {
            max_connections: Some(settings.listen_max_connections),
            tls,
            ..limits.clone()
        };
        let jwt = match settings.inbound.as_ref().and_then(|i| i.jwt.clone()) {
            Some(config) => Some(pillion_mesh::jwt::Verifier::new(config).await?),
            None => None,
        };
        let rate = settings
            .inbound
            .as_ref()
            .map(|i| i.limits.clone())
            .filter(|l| !l.is_empty());
        servers.push(tokio::spawn(pillion_http::server::serve(
            listener,
            limits,
            shutdown.clone().begun(),
            move |mut req, peer| {
                use futures_util::future::Either;
                use pillion_http::relay::{reply, to_caller};
                let inbound = inbound.clone();
                let grpc = pillion_core::error::is_grpc(req.headers());
                // A bucket per client address; a path spelt another way would walk
                // around a limit's prefix.
                if rate.is_some() && !pillion_mesh::policy::canonical(req.uri().path()) {
                    let why = format!("the path {:?} is not canonical", req.uri().path());
                    let res = pillion_http::relay::reply(pillion_core::ApiError::new(
                        pillion_mesh::inbound::ID,
                        http::StatusCode::BAD_REQUEST,
                        why,
                    ));
                    return Either::Right(Either::Left(std::future::ready(Ok(to_caller(
                        grpc, res,
                    )))));
                }
                if let Some(Err((limit, wait))) = rate
                    .as_ref()
                    .map(|r| r.take(&peer.ip().to_string(), req.uri().path()))
                {
                    let why = format!("{} is over the rate limit {limit:?}", peer.ip());
                    let res = pillion_mesh::inbound::too_many(&why, wait);
                    return Either::Right(Either::Left(std::future::ready(Ok(to_caller(
                        grpc, res,
                    )))));
                }
                match jwt.clone() {
                    None => Either::Left(OkMap::new(inbound.handle(req, peer), move |r| {
                        to_caller(grpc, r)
                    })),
                    Some(jwt) => Either::Right(Either::Right(async move {
                        if let Err(e) = jwt.admit(req.headers_mut()).await {
                            return Ok(to_caller(grpc, reply(e.to_api_error())));
                        }
                        let res = inbound.handle(req, peer).await;
                        Ok::<_, std::convert::Infallible>(to_caller(grpc, res))
                    })),
                }
            },
        )));
    }
    // Orders start once --listen accepts: the CA validates the names through it.
    let orders = acme.map(|acme| tokio::spawn(acme.run(shutdown.clone().begun())));
    if let (Some((inbound, listener)), Some(identity)) = (mesh_inbound, &identity) {
        let tunnels = inbound.clone();
        let limits = Limits {
            tls: Some(identity.server_config().map_err(|e| e.to_string())?),
            identify: Some(pillion_mesh::identity::caller),
            tunnel: Some(Arc::new(move |tls, peer, client| {
                Box::pin(tunnels.clone().tunnel(tls, peer, client))
            })),
            max_connections: Some(settings.listen_max_connections),
            ..limits.clone()
        };
        servers.push(tokio::spawn(pillion_http::server::serve(
            listener,
            limits,
            shutdown.clone().begun(),
            move |req, peer| {
                let grpc = pillion_core::error::is_grpc(req.headers());
                OkMap::new(inbound.clone().handle(req, peer), move |r| {
                    pillion_http::relay::to_caller(grpc, r)
                })
            },
        )));
    }
    let stopping = tokio::spawn(async move {
        shutdown.wait().await;
        // Take the app out of the registry first, so callers stop choosing it while
        // in-flight requests finish.
        if let Some(app) = &app {
            app.stop().await;
        }
        if let Some(pushes) = pushes {
            pushes.stop(settings.grace_period).await;
        }
        if let Some(r) = reloader {
            r.abort();
        }
        let (_, _) = tokio::join!(
            async {
                for server in servers {
                    let _ = server.await;
                }
                for orders in [orders, api_orders].into_iter().flatten() {
                    let _ = orders.await;
                }
            },
            tcp.shutdown(settings.grace_period),
        );
        // The last spans, of the requests that finished above.
        if let Some((task, stop, _)) = exporter {
            let _ = stop.send(());
            let _ = task.await;
        }
        // The subscribers' sockets, told to close when the shutdown began.
        broker_api.sockets.close();
        let _ = tokio::time::timeout(settings.grace_period, broker_api.sockets.wait()).await;
        broker.close().await;
        registry.close().await;
        tracing::info!("pillion stopped");
        Ok(())
    });
    Ok(Running {
        address,
        listen,
        stopper,
        stopping,
    })
}

/// `--ready-file`: the bound addresses as JSON, written to a temporary file renamed
/// over `path`, so a reader never sees half of it.
fn write_ready_file(
    path: &std::path::Path,
    address: SocketAddr,
    listen: Option<SocketAddr>,
) -> Result<(), String> {
    let text = json!({ "address": address, "listen": listen }).to_string();
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    std::fs::write(&partial, text)
        .and_then(|()| std::fs::rename(&partial, path))
        .map_err(|e| format!("cannot write --ready-file {}: {e}", path.display()))
}

/// `GET /healthz[?exclude=CHECK,...]`: see [`health`].
async fn healthz(State(status): State<Arc<Status>>, RawQuery(query): RawQuery) -> Response {
    let exclude = match Excluded::parse(query.as_deref()) {
        Ok(exclude) => exclude,
        Err(e) => {
            return pillion_core::ApiError::new("pillion.healthz", StatusCode::BAD_REQUEST, e)
                .into_response()
                .into_response()
        }
    };
    let (code, _, body) = health(&status, &exclude).await;
    (code, Json(body)).into_response()
}

/// The checks `/healthz?exclude=...` leaves out of its verdict (Kubernetes' own
/// `/readyz?exclude=etcd`): a readiness probe that a registry outage does not fail.
#[derive(Debug, Default, PartialEq)]
struct Excluded(Vec<&'static str>);

impl Excluded {
    const CHECKS: [&'static str; 4] = ["registry", "broker", "session_store", "tcp"];

    /// `exclude=registry,broker` (or `exclude` given several times); other
    /// parameters are refused, as is a check that does not exist.
    fn parse(query: Option<&str>) -> Result<Excluded, String> {
        let mut excluded = Vec::new();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if key != "exclude" {
                return Err(format!(
                    "unknown parameter {key:?}: /healthz takes only exclude={}",
                    Self::CHECKS.join(",")
                ));
            }
            for name in value.split(',') {
                let check = Self::CHECKS.iter().find(|c| **c == name).ok_or_else(|| {
                    format!(
                        "exclude={name:?} is not a check: give some of {}",
                        Self::CHECKS.join(",")
                    )
                })?;
                excluded.push(*check);
            }
        }
        Ok(Excluded(excluded))
    }

    fn counts(&self, check: &str) -> bool {
        !self.0.contains(&check)
    }
}

/// `/healthz`'s verdict and body: 200 while the sidecar serves, every backend it
/// depends on is reachable (the registry, the broker, the session store), the
/// registry's state reaches its peers, and every configured TCP listener listens;
/// 503 otherwise, naming each problem. Excluded checks are shown, not counted.
/// Returns the code, the problems (which the body's `error` joins) and the body.
async fn health(
    status: &Status,
    exclude: &Excluded,
) -> (StatusCode, Vec<String>, serde_json::Value) {
    let registry = status.registry.status();
    let mut problems = Vec::new();
    if !registry.healthy && exclude.counts("registry") {
        let why = registry.error.as_deref().unwrap_or("unreachable");
        problems.push(format!("registry: {why}"));
    }
    let broker_healthy = status.broker.healthy();
    if !broker_healthy && exclude.counts("broker") {
        problems.push("broker: unreachable".to_string());
    }
    let sessions = match &status.inbound {
        None => serde_json::Value::Null,
        Some(inbound) => match inbound.check_store(STORE_CHECK_TIMEOUT).await {
            Ok(()) => json!({ "healthy": true }),
            Err(e) => {
                if exclude.counts("session_store") {
                    problems.push(format!("session store: {e}"));
                }
                json!({ "healthy": false, "error": e })
            }
        },
    };
    let unbound = status.tcp.unbound();
    if exclude.counts("tcp") {
        for (listen, why) in &unbound {
            problems.push(format!("tcp listener {listen}: {why}"));
        }
    }
    let code = if problems.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = json!({
        "status": if problems.is_empty() { "ok" } else { "unavailable" },
        "registry": registry,
        "broker": { "backend": status.broker.backend(), "healthy": broker_healthy },
    });
    if !sessions.is_null() {
        body["session_store"] = sessions;
    }
    if !unbound.is_empty() {
        body["tcp"] = unbound
            .iter()
            .map(|(listen, why)| json!({ "listen": listen.to_string(), "error": why }))
            .collect();
    }
    if !exclude.0.is_empty() {
        body["excluded"] = json!(exclude.0);
    }
    if !problems.is_empty() {
        body["error"] = json!(problems.join("; "));
    }
    (code, problems, body)
}

/// How long `/healthz` waits for the session store's answer.
const STORE_CHECK_TIMEOUT: Duration = Duration::from_secs(1);

async fn statusz(State(status): State<Arc<Status>>) -> Response {
    Json(status_json(&status).await).into_response()
}

/// What `/dashboard` shows: `/statusz`, with `/healthz`'s verdict (`health`: its
/// status, code and each problem it names), the services' nodes and 5-second windows
/// of calls, broker topics with subscribers and rates, and session counters.
async fn dashboard_data(State(status): State<Arc<Status>>) -> Response {
    let all = Excluded::default();
    let (mut data, (code, problems, verdict)) =
        tokio::join!(status_json(&status), health(&status, &all));
    data["health"] = json!({
        "status": verdict["status"],
        "code": code.as_u16(),
        "problems": problems,
    });
    data["dashboard"] = status.dashboard.data(&status.registry.catalog());
    if let Some(inbound) = &status.inbound {
        // The store as /healthz found it now, not as the last request did.
        let store = &verdict["session_store"];
        data["sessions"]["store_healthy"] = store["healthy"].clone();
        data["sessions"]["store_error"] = store["error"].clone();
        let m = &inbound.metrics;
        let n = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        data["sessions"]["counts"] = json!({
            "created": n(&m.created),
            "destroyed": n(&m.destroyed),
            "rotated": n(&m.rotated),
            "store_errors": n(&m.store_errors),
        });
    }
    ([(http::header::CACHE_CONTROL, "no-store")], Json(data)).into_response()
}

/// micro's `/stats` (see [`crate::dashboard::stats`]).
async fn stats(State(status): State<Arc<Status>>, headers: http::HeaderMap) -> Response {
    crate::dashboard::stats::answer(&headers, status.started.elapsed(), &status.dashboard)
}

/// The certificate --listen serves from its files, and why a renewal of them was
/// refused (`last_error`, until one is served).
fn tls_status(status: &pillion_http::tls::CertificateStatus) -> serde_json::Value {
    json!({
        "cert": status.cert.display().to_string(),
        "names": status.names,
        "not_after_unix": status.not_after.and_then(|t| {
            t.duration_since(std::time::UNIX_EPOCH).ok().map(|d| d.as_secs())
        }),
        "last_error": status.refused,
    })
}

async fn status_json(status: &Status) -> serde_json::Value {
    let catalog = status.registry.catalog();
    let services: Vec<_> = catalog
        .names()
        .map(|name| {
            let versions = catalog.get(name).unwrap_or_default();
            json!({
                "name": name,
                "versions": versions.iter().map(|s| s.version.as_str()).collect::<Vec<_>>(),
                "nodes": versions.iter().map(|s| s.nodes.len()).sum::<usize>(),
            })
        })
        .collect();
    let mut cluster = status.registry.cluster();
    if let Some(cluster) = &mut cluster {
        cluster.members = status.registry.members().await;
    }
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_secs": status.started.elapsed().as_secs(),
        "address": status.address,
        "registry": status.registry.status(),
        "cluster": cluster,
        "services": services,
        "app": status.app.as_ref().map(|a| a.status()),
        "invoke": status.invoker.status(),
        "sessions": status.inbound.as_ref().map(|i| i.status()),
        "broker": {
            "backend": status.broker.backend(),
            "healthy": status.broker.healthy(),
        },
        "tcp": status.tcp.status().await,
        "acme": status.acme.as_ref().map(|acme| acme.status()),
        "tls": status.certificates.as_ref().map(|c| tls_status(&c.status())),
        "api_tls": status.api_tls.status(),
        "mesh": status.identity.as_ref().map(|identity| {
            let mut mesh = identity.status();
            if let Some(inbound) = &status.mesh_inbound {
                mesh["listener"] = inbound.status();
            }
            mesh
        }),
    })
}

/// The `[mesh]` rules' denials and the rate limits' refusals.
fn render_policy(status: &Status, out: &mut String) {
    use std::fmt::Write;
    if let Some(inbound) = &status.mesh_inbound {
        let counts = inbound.rules.counts();
        if counts.len() > 1 {
            let _ = writeln!(out, "# HELP pillion_mesh_denied_total Mesh calls a rule denied (in audit mode: would have), by rule; default: no rule matched.\n# TYPE pillion_mesh_denied_total counter");
            let audit = inbound.rules.audit();
            for (rule, n) in counts {
                let _ = writeln!(
                    out,
                    "pillion_mesh_denied_total{{rule=\"{rule}\",audit=\"{audit}\"}} {n}"
                );
            }
        }
    }
    let limits = [
        (
            "mesh",
            status.mesh_inbound.as_ref().map(|m| m.limits.clone()),
        ),
        ("listen", status.listen_limits.clone()),
    ];
    let mut header = false;
    for (listener, limits) in limits {
        for (limit, n) in limits.iter().flat_map(|l| l.counts()) {
            if !header {
                header = true;
                let _ = writeln!(out, "# HELP pillion_rate_limited_total Calls answered 429 by a rate limit.\n# TYPE pillion_rate_limited_total counter");
            }
            let _ = writeln!(
                out,
                "pillion_rate_limited_total{{listener=\"{listener}\",limit=\"{limit}\"}} {n}"
            );
        }
    }
}

/// Prometheus text format.
async fn metrics(State(status): State<Arc<Status>>) -> Response {
    let mut out = String::with_capacity(4096);
    status.invoker.render_metrics(&mut out);
    if let Some(inbound) = &status.inbound {
        inbound.metrics.render(&mut out);
    }
    status.broker_metrics.render(&mut out);
    status.tcp.render_metrics(&mut out).await;
    if let Some(cluster) = status.registry.cluster() {
        cluster.render_metrics(&mut out);
    }
    if let Some(spans) = &status.spans {
        spans.render(&mut out);
    }
    render_policy(&status, &mut out);
    (
        [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        out,
    )
        .into_response()
}
