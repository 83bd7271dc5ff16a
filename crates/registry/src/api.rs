//! The `/registry` HTTP API, compatible with the micro sidecar's:
//!
//! - `POST /registry[?ttl=10s]` (a TTL between [`MIN_TTL`] and [`MAX_TTL`]) with `{"name","version"?,"metadata"?,"nodes":[...]}`
//!   registers (keys in any case, `null` for an absent field as go-micro sends it);
//!   A node without a mesh listener (metadata `mesh`) is refused for a service that
//!   has nodes with one, unless `permissive` (`--mesh-permissive`): callers in the
//!   mesh would never call it, and others would reach it in clear text.
//! - `DELETE /registry` with the same body deregisters the listed nodes (all nodes of
//!   the service when none are listed);
//! - `GET /registry?service=NAME` answers a JSON array of the service's versions, 404
//!   when no node serves it;
//! - `GET /registry` answers every service;
//! - `GET /health/{service}` checks every node of the service at once (see
//!   [`crate::health::check_nodes`]): 200 when all are healthy, 503 naming the failing
//!   nodes and why, 404 for a service with no node.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use http::StatusCode;
use pillion_core::url::Query;
use pillion_core::{duration, ApiError, Service, ServiceError};

use crate::health::{check_nodes, NODE_CHECK_TIMEOUT};
use crate::{Registry, RegistryError};

const ID: &str = "pillion.registry";
/// Registration bodies are small; anything larger is a mistake.
pub const MAX_BODY: usize = 1 << 20;
/// The shortest registration TTL: a node renews every third of its TTL, so shorter ones
/// are renewal storms, and etcd's leases last at least about 2 s anyway.
pub const MIN_TTL: Duration = Duration::from_secs(1);
/// The longest registration TTL: a node that stopped renewing must not linger for days.
/// For no expiry at all, register without a TTL.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

/// The routes, over any registry adapter.
pub fn router(registry: Arc<dyn Registry>, permissive: bool) -> Router {
    let health = Checker {
        registry: registry.clone(),
        client: Arc::new(pillion_http::Client::new(
            Default::default(),
            NODE_CHECK_TIMEOUT,
        )),
    };
    Router::new()
        .route(
            "/registry",
            get(lookup)
                .post(move |state, query, body| register(state, query, body, permissive))
                .delete(deregister),
        )
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(registry)
        .merge(
            Router::new()
                .route("/health/", get(health_without_name))
                .route("/health/{*service}", get(service_health))
                .with_state(health),
        )
}

/// What `GET /health/{service}` needs: the catalog, and a client for the checks.
#[derive(Clone)]
struct Checker {
    registry: Arc<dyn Registry>,
    client: Arc<pillion_http::Client>,
}

fn error(status: StatusCode, detail: impl Into<String>) -> Response {
    reply(ApiError::new(ID, status, detail))
}

fn reply(e: ApiError) -> Response {
    e.into_response().into_response()
}

fn registry_error(e: RegistryError) -> Response {
    let status = match e {
        RegistryError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        RegistryError::NotFound(_) => StatusCode::NOT_FOUND,
        RegistryError::Invalid(_) => StatusCode::BAD_REQUEST,
    };
    error(status, e.to_string())
}

fn body_error(e: BytesRejection) -> ApiError {
    let status = e.status();
    let detail = if status == StatusCode::PAYLOAD_TOO_LARGE {
        format!("request body is larger than {MAX_BODY} bytes")
    } else {
        e.body_text()
    };
    ApiError::new(ID, status, detail)
}

fn parse(body: Result<Bytes, BytesRejection>) -> Result<Service, ApiError> {
    let body = body.map_err(body_error)?;
    Service::from_json(&body).map_err(|e| {
        let detail = match &e {
            ServiceError::Json(_) => format!("{e}; expected {{\"name\":...,\"nodes\":[{{\"id\":...,\"address\":\"host:port\"}}]}}"),
            ServiceError::Invalid(_) => e.to_string(),
        };
        ApiError::new(ID, StatusCode::BAD_REQUEST, detail)
    })
}

/// The query string, decoded strictly (see [`pillion_core::url`]).
fn query(raw: Option<&str>) -> Result<Query, ApiError> {
    Query::parse(raw)
        .map_err(|e| ApiError::new(ID, StatusCode::BAD_REQUEST, format!("query string: {e}")))
}

async fn lookup(State(registry): State<Arc<dyn Registry>>, RawQuery(raw): RawQuery) -> Response {
    let query = match query(raw.as_deref()) {
        Ok(q) => q,
        Err(e) => return reply(e),
    };
    let catalog = registry.catalog();
    match query.get("service") {
        None => Json(catalog.services().collect::<Vec<_>>()).into_response(),
        Some(name) => match catalog.get(name) {
            Some(versions) => Json(versions).into_response(),
            None => error(StatusCode::NOT_FOUND, format!("service {name:?} not found")),
        },
    }
}

async fn register(
    State(registry): State<Arc<dyn Registry>>,
    RawQuery(raw): RawQuery,
    body: Result<Bytes, BytesRejection>,
    permissive: bool,
) -> Response {
    let query = match query(raw.as_deref()) {
        Ok(q) => q,
        Err(e) => return reply(e),
    };
    let ttl = match query.get("ttl").map(duration::parse) {
        None => None,
        Some(Ok(t)) if !(MIN_TTL..=MAX_TTL).contains(&t) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "ttl {} is out of range: it must be between {} and {} (omit it for no expiry)",
                    duration::format(t),
                    duration::format(MIN_TTL),
                    duration::format(MAX_TTL),
                ),
            )
        }
        Some(Ok(t)) => Some(t),
        Some(Err(e)) => return error(StatusCode::BAD_REQUEST, format!("ttl: {e}")),
    };
    let service = match parse(body) {
        Ok(s) => s,
        Err(e) => return reply(e),
    };
    if service.nodes.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "nodes: at least one node is needed to register a service",
        );
    }
    if !permissive {
        if let Some(refusal) = plaintext_beside_mesh(&registry.catalog(), &service) {
            return error(StatusCode::BAD_REQUEST, refusal);
        }
    }
    match registry.register(&service, ttl).await {
        Ok(()) => Json(serde_json::json!({})).into_response(),
        Err(e) => registry_error(e),
    }
}

/// Why `service` may not be registered: a node of it without a mesh listener, new
/// to a service that has nodes with one.
fn plaintext_beside_mesh(catalog: &crate::Catalog, service: &Service) -> Option<String> {
    let versions = catalog.get(&service.name)?;
    let nodes = || versions.iter().flat_map(|v| &v.nodes);
    if !nodes().any(|n| n.mesh().is_some()) {
        return None;
    }
    // A renewal of a node already registered changes nothing.
    let node = service
        .nodes
        .iter()
        .find(|n| n.mesh().is_none() && !nodes().any(|m| m.id == n.id && m.mesh().is_none()))?;
    Some(format!(
        "node {:?} has no mesh listener (metadata \"mesh\") and service {:?} is in the mesh: \
         sidecars in the mesh never call such a node, others would call it in clear text. \
         Register it through a sidecar with --mesh-listen, or, during a migration, start \
         this sidecar with --mesh-permissive",
        node.id, service.name
    ))
}

async fn deregister(
    State(registry): State<Arc<dyn Registry>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let service = match parse(body) {
        Ok(s) => s,
        Err(e) => return reply(e),
    };
    match registry.deregister(&service).await {
        Ok(0) => error(
            StatusCode::NOT_FOUND,
            format!("service {:?} has no such node registered", service.name),
        ),
        Ok(_) => Json(serde_json::json!({})).into_response(),
        Err(e) => registry_error(e),
    }
}

async fn health_without_name() -> Response {
    error(
        StatusCode::BAD_REQUEST,
        "name the service to check: GET /health/{service}",
    )
}

async fn service_health(State(checker): State<Checker>, Path(name): Path<String>) -> Response {
    let catalog = checker.registry.catalog();
    let Some(versions) = catalog.get(&name) else {
        return error(StatusCode::NOT_FOUND, format!("service {name:?} not found"));
    };
    let nodes = check_nodes(&checker.client, versions, NODE_CHECK_TIMEOUT).await;
    let failing: Vec<&str> = nodes
        .iter()
        .filter(|n| !n.healthy)
        .map(|n| n.id.as_str())
        .collect();
    let mut body = serde_json::json!({ "service": name, "nodes": nodes });
    if failing.is_empty() {
        return Json(body).into_response();
    }
    body["detail"] = serde_json::json!(format!(
        "{} of {} nodes of {name:?} are unhealthy: {}",
        failing.len(),
        nodes.len(),
        failing.join(", ")
    ));
    body["unhealthy"] = serde_json::json!(failing);
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}
