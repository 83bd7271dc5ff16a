//! The HTTP servers: accept connections, speak HTTP/1.1 and h2c, drain on shutdown.
//!
//! On `--address`, each request goes either to the API router (the fixed paths) or
//! straight to the invocation data path (every other path), so a call to a service
//! pays for no router and no boxed body. On `--listen`, every request goes to the
//! inbound (session) proxy.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use futures_util::future;
use http::{Request, Response};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use pillion_invoke::handler::ProxyBody;
use pillion_invoke::Invoker;
use tokio::net::TcpListener;
use tower::ServiceExt;

use crate::drain::Drain;
use crate::shutdown::Shutdown;

/// Paths the API router answers; everything else is a call to a service.
const API_PATHS: [&str; 7] = [
    "/registry",
    "/rpc",
    "/broker",
    "/broker/deliver",
    "/healthz",
    "/statusz",
    "/metrics",
];

type Body = Either<ProxyBody, axum::body::Body>;

/// The API server: fixed paths to the router, the rest to the invocation data path.
pub async fn serve_api(
    listener: TcpListener,
    api: Router,
    invoker: Arc<Invoker>,
    shutdown: Shutdown,
    grace: Duration,
) {
    serve(listener, shutdown, grace, move |req, _peer| {
        route(api.clone(), invoker.clone(), req)
    })
    .await
}

/// Serves `handle` on every connection until shutdown begins, then lets open
/// connections finish their requests for up to `grace`.
pub async fn serve<F, Fut, B>(
    listener: TcpListener,
    mut shutdown: Shutdown,
    grace: Duration,
    handle: F,
) where
    F: Fn(Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let drain = Drain::new();
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
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
        let handle = handle.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| handle(req, peer));
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        tokio::spawn(drain.watch(conn, |c| c.graceful_shutdown()));
    }
    drop(listener);
    if tokio::time::timeout(grace, drain.drain()).await.is_err() {
        tracing::warn!(
            grace_period = %pillion_core::duration::format(grace),
            "in-flight requests did not finish within the grace period"
        );
    }
}

pin_project_lite::pin_project! {
    /// `fut.map(f)` for futures that are never in error, without moving `fut`:
    /// futures-util's `Map` moves the whole inner future out when it completes, and
    /// a call's future is kilobytes.
    pub struct OkMap<F, G> {
        #[pin]
        fut: F,
        f: G,
    }
}

impl<F, G> OkMap<F, G> {
    pub fn new(fut: F, f: G) -> Self {
        OkMap { fut, f }
    }
}

impl<F: Future, G: FnMut(F::Output) -> T, T> Future for OkMap<F, G> {
    type Output = Result<T, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        this.fut.poll(cx).map(|out| Ok((this.f)(out)))
    }
}

/// The API router for its fixed paths (boxed: off the data path, and its future would
/// make every call's future larger), the data path for the rest.
fn route(
    api: Router,
    invoker: Arc<Invoker>,
    req: Request<Incoming>,
) -> impl Future<Output = Result<Response<Body>, Infallible>> + Send {
    if API_PATHS.contains(&req.uri().path()) {
        future::Either::Left(Box::pin(async move {
            api.oneshot(req).await.map(|res| res.map(Either::Right))
        }))
    } else {
        future::Either::Right(OkMap::new(
            pillion_invoke::handler::service_call(invoker, req),
            |res: Response<ProxyBody>| res.map(Either::Left),
        ))
    }
}
