//! The server side of every listener: accept connections, speak HTTP/1.1 (pillion's
//! own, [`crate::h1::server`]) and h2c (hyper's, which also takes the HTTP/1.1
//! connections pillion hands over: upgrades, `Expect: 100-continue`), time out a
//! request head that does not arrive, bound the open connections, drain on shutdown.

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
pub use crate::h1::server::RequestBody;
use crate::h1::server::{Clocks, Served, Socket};

/// The clocks and limits of one listener.
#[derive(Clone)]
pub struct Limits {
    /// A connection whose request head has not arrived within this is closed.
    pub read_header_timeout: Duration,
    /// A request body that stalls this long between two reads is cut off, whichever
    /// protocol it came in (HTTP/1.1, HTTP/2, after `Expect: 100-continue`).
    pub read_body_timeout: Duration,
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
/// connections finish their requests for up to `grace`. A request that breaks RFC
/// 9112 3.2 (see [`refuse`]) is answered 400 before any handler sees it, and no
/// handler sees a client's identity headers ([`pillion_core::IDENTITY_HEADERS`]).
pub async fn serve<F, Fut, B>(
    listener: TcpListener,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
    handle: F,
) where
    F: Fn(Request<RequestBody>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // Every way into pillion is a listener served here, so this is the one place that
    // makes sure an identity header an app sees was set by pillion.
    let handle = move |mut req: Request<RequestBody>, peer| {
        pillion_core::remove_identity(req.headers_mut());
        handle(req, peer)
    };
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
        let (builder, drain) = (builder.clone(), drain.clone());
        let clocks = Clocks {
            head: limits.read_header_timeout,
            body: limits.read_body_timeout,
        };
        let head_timeout = clocks.head;
        let Some(config) = limits.tls.clone() else {
            tokio::spawn(async move {
                let handle = move |req| handle(req, peer);
                serve_one(&builder, &drain, Socket::Tcp(stream), clocks, handle).await;
                drop(permit);
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
            let h2 = conn.alpn_protocol() == Some(b"h2");
            let handle = move |mut req: Request<RequestBody>| {
                if identify.is_some() {
                    req.extensions_mut().insert(client.clone());
                }
                handle(req, peer)
            };
            if h2 {
                serve_hyper(&builder, &drain, tls, clocks, handle).await;
            } else {
                let socket = Socket::Tls(Box::new(tls));
                serve_one(&builder, &drain, socket, clocks, handle).await;
            }
            drop(permit);
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

/// Serves one connection (plain or TLS) until it closes or drains: HTTP/1.1 by
/// pillion, and whatever it hands over by hyper.
async fn serve_one<H, Fut, B>(
    builder: &hyper_util::server::conn::auto::Builder<TokioExecutor>,
    drain: &Arc<Drain>,
    socket: Socket,
    clocks: Clocks,
    handle: H,
) where
    H: Fn(Request<RequestBody>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let settings = crate::h1::server::Settings { clocks, drain };
    let served = crate::h1::server::serve(socket, settings, handle.clone());
    // Registered with the drain like any connection; this one checks the drain
    // itself between requests, so it has nothing to be told.
    let mut own = std::pin::pin!(drain.watch(served, |_| {}));
    if let Served::Handover(io) = own.as_mut().await {
        // Watched until hyper's connection is, so the drain never sees none open.
        serve_hyper(builder, drain, io, clocks, handle).await;
    }
}

/// Serves a connection with hyper (h2, and what pillion's HTTP/1.1 handed over).
/// Requests are checked here as pillion's own server checks them while parsing.
async fn serve_hyper<IO, H, Fut, B>(
    builder: &hyper_util::server::conn::auto::Builder<TokioExecutor>,
    drain: &Arc<Drain>,
    io: IO,
    clocks: Clocks,
    handle: H,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<RequestBody>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use futures_util::future::{ready, Either};
    let service = hyper::service::service_fn(move |req: Request<Incoming>| match refuse(&req) {
        Some(why) => Either::Left(ready(Ok(crate::relay::reply(pillion_core::ApiError::new(
            crate::relay::ID,
            http::StatusCode::BAD_REQUEST,
            why,
        ))
        .map(http_body_util::Either::Right)))),
        None => Either::Right(OkMap::new(
            handle(req.map(|body| RequestBody::from_hyper(body, clocks.body))),
            |r: Result<Response<B>, Infallible>| match r {
                Ok(res) => res.map(http_body_util::Either::Left),
                Err(never) => match never {},
            },
        )),
    });
    let conn = builder
        .serve_connection_with_upgrades(
            TokioIo::new(crate::heads::Heads::new(io, Some(clocks.head))),
            service,
        )
        .into_owned();
    let _ = drain.watch(conn, |c| c.graceful_shutdown()).await;
}

/// Why hyper's request is refused before any handler sees it: its head was refused
/// by [`crate::heads`] (a bare LF), or it breaks RFC 9112 3.2 (see
/// [`crate::h1::server::host_rule`]).
fn refuse<T>(req: &Request<T>) -> Option<&'static str> {
    if let Some(why) = req.headers().get(crate::heads::REFUSED) {
        return Some(crate::heads::refusal(why));
    }
    let hosts = req.headers().get_all(http::header::HOST).iter().count();
    crate::h1::server::host_rule(req.version(), hosts)
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
