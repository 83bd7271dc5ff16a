//! The HTTP server on `--address`: accepts connections, speaks HTTP/1.1 and h2c, and
//! sends each request either to the API router (the fixed paths) or straight to the
//! invocation data path (every other path), so a call to a service pays for no router
//! and no boxed body.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use http::{Request, Response};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::GracefulShutdown;
use pillion_invoke::handler::ProxyBody;
use pillion_invoke::Invoker;
use tokio::net::TcpListener;
use tower::ServiceExt;

use crate::shutdown::Shutdown;

/// Paths the API router answers; everything else is a call to a service.
const API_PATHS: [&str; 5] = ["/registry", "/rpc", "/healthz", "/statusz", "/metrics"];

type Body = Either<ProxyBody, axum::body::Body>;

/// Serves until shutdown begins, then lets open connections finish their requests
/// for up to `grace`.
pub async fn serve(
    listener: TcpListener,
    api: Router,
    invoker: Arc<Invoker>,
    mut shutdown: Shutdown,
    grace: Duration,
) {
    let graceful = GracefulShutdown::new();
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.wait() => break,
        };
        let _ = stream.set_nodelay(true);
        let api = api.clone();
        let invoker = invoker.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let api = api.clone();
            let invoker = invoker.clone();
            async move { Ok::<_, Infallible>(route(api, invoker, req).await) }
        });
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        tokio::spawn(graceful.watch(conn));
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_period = %pillion_core::duration::format(grace),
            "in-flight requests did not finish within the grace period"
        );
    }
}

async fn route(api: Router, invoker: Arc<Invoker>, req: Request<Incoming>) -> Response<Body> {
    if API_PATHS.contains(&req.uri().path()) {
        match api.oneshot(req).await {
            Ok(res) => res.map(Either::Right),
            Err(never) => match never {},
        }
    } else {
        pillion_invoke::handler::service_call(invoker, req)
            .await
            .map(Either::Left)
    }
}
