//! The API listener (`--address`): each request goes either to the API router (the
//! fixed paths) or straight to the invocation data path (every other path), so a call
//! to a service pays for no router and no boxed body.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use axum::Router;
use futures_util::future;
use http::{Request, Response};
use http_body_util::Either;
use pillion_core::error::{for_grpc, is_grpc};
use pillion_http::relay::{to_caller, ProxyBody};
use pillion_http::server::RequestBody;
use pillion_http::server::{serve, Limits, OkMap};
use pillion_invoke::Invoker;
use tokio::net::TcpListener;
use tower::ServiceExt;

use crate::door::Door;

/// Paths the API router answers; everything else is a call to a service.
const API_PATHS: [&str; 8] = [
    "/registry",
    "/rpc",
    "/broker",
    "/broker/deliver",
    "/healthz",
    "/statusz",
    "/metrics",
    "/stats",
];

/// Paths under this prefix are the API's too: `GET /health/{service}`.
const API_PREFIX: &str = "/health/";

/// Whether the API router answers `path`; a service named `health` cannot be called
/// by path, nor a method of a service named `dashboard` that the page uses.
pub fn is_api(path: &str) -> bool {
    API_PATHS.contains(&path)
        || path.starts_with(API_PREFIX)
        || crate::dashboard::PATHS.contains(&path)
}

type Body = Either<ProxyBody, axum::body::Body>;

/// The API server: fixed paths to the router, the rest to the invocation data path.
pub async fn serve_api(
    listener: TcpListener,
    api: Router,
    invoker: Arc<Invoker>,
    door: Arc<Door>,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    serve(listener, limits, shutdown, move |mut req, _peer| {
        // A gRPC caller gets pillion's own errors as gRPC answers.
        let grpc = is_grpc(req.headers());
        let call = !is_api(req.uri().path());
        // Decided before any future is made, so an admitted call pays for no wrapper.
        match door.refusal(&req, call) {
            None => {
                door.admit(&mut req, call);
                future::Either::Left(route(api.clone(), invoker.clone(), req, call, grpc))
            }
            Some(mut refused) => {
                if grpc {
                    refused = for_grpc(refused, String::new);
                }
                future::Either::Right(future::ready(Ok(
                    refused.map(|b| Either::Right(axum::body::Body::from(b)))
                )))
            }
        }
    })
    .await
}

/// The API router for its fixed paths (boxed: off the data path, and its future would
/// make every call's future larger), the data path for the rest.
fn route(
    api: Router,
    invoker: Arc<Invoker>,
    req: Request<RequestBody>,
    call: bool,
    grpc: bool,
) -> impl Future<Output = Result<Response<Body>, Infallible>> + Send {
    if !call {
        future::Either::Left(Box::pin(async move {
            let res = api.oneshot(req).await?;
            let res = if grpc {
                for_grpc(res, axum::body::Body::empty)
            } else {
                res
            };
            Ok(res.map(Either::Right))
        }))
    } else {
        future::Either::Right(OkMap::new(
            pillion_invoke::handler::service_call(invoker, req),
            move |res: Response<ProxyBody>| to_caller(grpc, res).map(Either::Left),
        ))
    }
}
