//! The server side of every listener: accept connections, speak HTTP/1.1 and h2c,
//! time out a request head that does not arrive, bound the open connections, drain
//! on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::drain::Drain;

/// The clocks and limits of one listener.
#[derive(Clone)]
pub struct Limits {
    /// A connection whose request head has not arrived within this is closed.
    pub read_header_timeout: Duration,
    /// Connections served at once; more wait in the kernel's backlog.
    pub max_connections: Option<usize>,
    /// After shutdown begins, how long requests in flight may take to finish.
    pub grace: Duration,
    /// HTTPS: the server config (certificates) of every handshake. The handshake must
    /// finish within `read_header_timeout` too.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// mTLS: names the client from its verified certificate chain; the name is in
    /// every request's extensions as a [`TlsPeer`].
    pub identify: Option<Identify>,
    /// mTLS: takes a connection whose ALPN is [`crate::stream::TUNNEL_ALPN`] (a raw
    /// TCP tunnel) instead of serving HTTP on it.
    pub tunnel: Option<Tunnel>,
}

/// Names a TLS client from its certificate chain (leaf first).
pub type Identify = fn(&[rustls::pki_types::CertificateDer<'_>]) -> Option<Arc<str>>;

/// Serves a tunnel connection after its handshake.
pub type Tunnel = Arc<
    dyn Fn(
            tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
            SocketAddr,
            TlsPeer,
        ) -> Pin<Box<dyn Future<Output = ()> + Send>>
        + Send
        + Sync,
>;

/// Who the client of a TLS connection is, by its certificate.
#[derive(Debug, Clone)]
pub struct TlsPeer {
    pub identity: Option<Arc<str>>,
}

/// Serves `handle` on every connection until shutdown begins, then lets open
/// connections finish their requests for up to `grace`.
pub async fn serve<F, Fut, B>(
    listener: TcpListener,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
    handle: F,
) where
    F: Fn(Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    serve_checked(listener, limits, shutdown, move |req, peer| {
        use futures_util::future::{ready, Either};
        match refuse(&req) {
            Some(why) => Either::Left(ready(Ok(crate::relay::reply(pillion_core::ApiError::new(
                crate::relay::ID,
                http::StatusCode::BAD_REQUEST,
                why,
            ))
            .map(|b| http_body_util::Either::Right(b))))),
            None => Either::Right(OkMap::new(
                handle(req, peer),
                |r: Result<Response<B>, Infallible>| match r {
                    Ok(res) => res.map(http_body_util::Either::Left),
                    Err(never) => match never {},
                },
            )),
        }
    })
    .await
}

/// Why a request is refused before any handler sees it: its head was refused by
/// [`crate::heads`] (a bare LF), or it breaks RFC 9112 3.2, which wants exactly
/// one `Host` in an HTTP/1.1 request (none is allowed in HTTP/1.0, never two); two
/// could be read differently by pillion and the app behind it.
fn refuse<T>(req: &Request<T>) -> Option<&'static str> {
    if let Some(why) = req.headers().get(crate::heads::REFUSED) {
        return Some(crate::heads::refusal(why));
    }
    let hosts = req.headers().get_all(http::header::HOST).iter().count();
    match (req.version(), hosts) {
        (_, n) if n > 1 => Some("the request has more than one Host header"),
        (http::Version::HTTP_11, 0) => {
            Some("the request has no Host header (HTTP/1.1 requires one)")
        }
        _ => None,
    }
}

async fn serve_checked<F, Fut, B>(
    listener: TcpListener,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
    handle: F,
) where
    F: Fn(Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let drain = Drain::new();
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.read_header_timeout);
    builder.http2().timer(TokioTimer::new());
    let permits = limits
        .max_connections
        .map(|n| Arc::new(tokio::sync::Semaphore::new(n)));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        // A permit first: at the limit, new connections wait in the kernel's backlog.
        let permit = match &permits {
            None => None,
            Some(p) => tokio::select! {
                permit = p.clone().acquire_owned() => permit.ok(),
                _ = &mut shutdown => break,
            },
        };
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
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let handle = handle.clone();
        let (builder, drain, head_timeout) =
            (builder.clone(), drain.clone(), limits.read_header_timeout);
        let Some(config) = limits.tls.clone() else {
            let service =
                hyper::service::service_fn(move |req: Request<Incoming>| handle(req, peer));
            tokio::spawn(async move {
                serve_one(&builder, &drain, stream, head_timeout, service, permit).await
            });
            continue;
        };
        let (identify, tunnel) = (limits.identify, limits.tunnel.clone());
        tokio::spawn(async move {
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            let tls = match tokio::time::timeout(head_timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
            };
            let (_, conn) = tls.get_ref();
            if conn.alpn_protocol() == Some(crate::tls::ACME_TLS_ALPN) {
                // A TLS-ALPN-01 validation: the certificate was the answer, and RFC 8737
                // wants no data after the handshake.
                drop(permit);
                return;
            }
            let client = TlsPeer {
                identity: identify.and_then(|f| conn.peer_certificates().and_then(f)),
            };
            if conn.alpn_protocol() == Some(crate::stream::TUNNEL_ALPN) {
                match tunnel {
                    Some(tunnel) => tunnel(tls, peer, client).await,
                    None => tracing::debug!(%peer, "a tunnel asked of a listener without them"),
                }
                drop(permit);
                return;
            }
            let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                if identify.is_some() {
                    req.extensions_mut().insert(client.clone());
                }
                handle(req, peer)
            });
            serve_one(&builder, &drain, tls, head_timeout, service, permit).await
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.grace, drain.drain())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_period = %pillion_core::duration::format(limits.grace),
            "in-flight requests did not finish within the grace period"
        );
    }
}

/// Serves one connection (plain or TLS) until it closes or drains.
async fn serve_one<IO, S, B>(
    builder: &hyper_util::server::conn::auto::Builder<TokioExecutor>,
    drain: &Arc<Drain>,
    io: IO,
    head_timeout: Duration,
    service: S,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = builder
        .serve_connection_with_upgrades(
            TokioIo::new(crate::heads::Heads::new(io, Some(head_timeout))),
            service,
        )
        .into_owned();
    let _ = drain.watch(conn, |c| c.graceful_shutdown()).await;
    drop(permit);
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
