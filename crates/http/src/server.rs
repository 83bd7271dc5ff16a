//! The server side of every listener: accept connections, speak HTTP/1.1 (pillion's
//! own, [`crate::h1::server`]) and HTTP/2 (hyper's, which also answers the one
//! upgrade request of a connection pillion hands over), time out a request head that
//! does not arrive and a connection that waits too long for its next request, bound
//! the open connections (closing the one that waited longest when a new one needs
//! its slot), drain on shutdown.

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

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::ready;

use crate::drain::Drain;
pub use crate::h1::server::RequestBody;
use crate::h1::server::{Clocks, Handover, Served, Socket};
use crate::idle::{Idlers, Keepalive};

/// The clocks and limits of one listener.
#[derive(Clone)]
pub struct Limits {
    /// A connection whose request head has not arrived within this is closed.
    pub read_header_timeout: Duration,
    /// A request body that stalls this long between two reads is cut off, whichever
    /// protocol it came in (HTTP/1.1, HTTP/2, after `Expect: 100-continue`).
    pub read_body_timeout: Duration,
    /// A keep-alive connection with no request for this long is closed (HTTP/1.1
    /// between requests; HTTP/2 with no stream open, with a GOAWAY).
    pub idle_timeout: Duration,
    /// Connections served at once. One more is accepted and waits for a slot: the
    /// connection that has waited longest for a request is closed to make one.
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
    /// The client's certificate (the leaf), when it showed one and it was verified.
    pub certificate: Option<rustls::pki_types::CertificateDer<'static>>,
}

/// Serves `handle` on every connection until shutdown begins, then lets open
/// connections finish their requests for up to `grace`. A request that breaks RFC
/// 9112 3.2 (see [`crate::h1::server::host_rule`]) is answered 400 before any
/// handler sees it, and no handler sees a client's identity headers
/// ([`pillion_core::IDENTITY_HEADERS`]).
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
    // Every way into pillion is a listener served here, so this is where an identity
    // header a client sent is removed: by pillion's HTTP/1.1 parser as it reads the
    // fields, and in `serve_h2` and `serve_upgrade` for what hyper reads.
    let drain = Drain::new();
    let idlers = Idlers::new();
    let hyper = Hyper::new(&limits);
    let permits = limits
        .max_connections
        .map(|n| Arc::new(tokio::sync::Semaphore::new(n)));
    let mut shutdown = std::pin::pin!(shutdown);
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
            _ = &mut shutdown => break,
        };
        // A slot for it: at the limit, the connection that has waited longest for a
        // request is closed to make one; if none waits, this one waits for a slot
        // (and the next visitors in the kernel's backlog).
        let permit = match &permits {
            None => None,
            Some(p) => match p.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    if idlers.evict_oldest() {
                        tracing::debug!(%peer, "listener full: closing its longest-idle connection");
                    }
                    tokio::select! {
                        permit = p.clone().acquire_owned() => permit.ok(),
                        _ = &mut shutdown => break,
                    }
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let handle = handle.clone();
        let (hyper, drain, idlers) = (hyper.clone(), drain.clone(), idlers.clone());
        let clocks = Clocks {
            head: limits.read_header_timeout,
            body: limits.read_body_timeout,
            idle: limits.idle_timeout,
        };
        let head_timeout = clocks.head;
        let Some(config) = limits.tls.clone() else {
            tokio::spawn(async move {
                let handle = move |req| handle(req, peer);
                let on = On {
                    hyper: &hyper,
                    drain: &drain,
                    idlers: &idlers,
                    clocks,
                };
                serve_one(on, Socket::Tcp(stream), handle).await;
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
                certificate: identify
                    .and(conn.peer_certificates())
                    .and_then(|c| c.first())
                    .map(|c| c.clone().into_owned()),
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
            let on = On {
                hyper: &hyper,
                drain: &drain,
                idlers: &idlers,
                clocks,
            };
            if h2 {
                serve_h2(on, tls, handle).await;
            } else {
                serve_one(on, Socket::Tls(Box::new(tls)), handle).await;
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

/// hyper's servers, for what pillion's HTTP/1.1 server does not serve itself.
struct Hyper {
    /// The one upgrade request of a handed-over connection, and nothing after it
    /// (see [`serve_upgrade`]).
    upgrade: hyper::server::conn::http1::Builder,
    http2: hyper::server::conn::http2::Builder<TokioExecutor>,
}

/// How often an HTTP/2 client is sent a PING, at most, and how long its answer may
/// take: a peer that vanished (no FIN, no RST) is found and closed.
const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

impl Hyper {
    fn new(limits: &Limits) -> Arc<Hyper> {
        let mut upgrade = hyper::server::conn::http1::Builder::new();
        upgrade
            .timer(TokioTimer::new())
            .header_read_timeout(limits.read_header_timeout);
        let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(H2_PING_INTERVAL.min(limits.idle_timeout)))
            .keep_alive_timeout(H2_PING_TIMEOUT.min(limits.idle_timeout));
        Arc::new(Hyper { upgrade, http2 })
    }
}

/// What a connection is served with.
#[derive(Clone, Copy)]
struct On<'a> {
    hyper: &'a Hyper,
    drain: &'a Arc<Drain>,
    idlers: &'a Arc<Idlers>,
    clocks: Clocks,
}

/// Serves one connection (plain or TLS) until it closes or drains: HTTP/1.1 by
/// pillion, and what it hands over (HTTP/2, an upgrade) by hyper.
async fn serve_one<H, Fut, B>(on: On<'_>, socket: Socket, handle: H)
where
    H: Fn(Request<RequestBody>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let settings = crate::h1::server::Settings {
        clocks: on.clocks,
        drain: on.drain,
        idlers: on.idlers,
    };
    let served = crate::h1::server::serve(socket, settings, handle.clone());
    // Registered with the drain like any connection; this one checks the drain
    // itself between requests, so it has nothing to be told.
    let mut own = std::pin::pin!(on.drain.watch(served, |_| {}));
    // Watched until hyper's connection is, so the drain never sees none open.
    match own.as_mut().await {
        Served::Closed => {}
        Served::Handover(io, Handover::Http2) => serve_h2(on, io, handle).await,
        Served::Handover(io, Handover::Upgrade) => serve_upgrade(on, io, handle).await,
    }
}

/// Answers the upgrade request at the front of `io` with hyper, which hands the
/// connection to the handler's upgrade after a 101 and closes it otherwise.
async fn serve_upgrade<IO, H, Fut, B>(on: On<'_>, io: IO, handle: H)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<RequestBody>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let body_stall = on.clocks.body;
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        pillion_core::remove_identity(req.headers_mut());
        OkMap::new(
            handle(req.map(|body| RequestBody::from_hyper(body, body_stall))),
            |r: Result<Response<B>, Infallible>| {
                let Ok(mut res) = r;
                // Anything but the upgrade ends the connection: no second request
                // on it is read by hyper. (hyper's own keep-alive switch would put
                // `close` on the 101 too.)
                if res.status() != http::StatusCode::SWITCHING_PROTOCOLS {
                    res.headers_mut().insert(
                        http::header::CONNECTION,
                        http::HeaderValue::from_static("close"),
                    );
                }
                res
            },
        )
    });
    let conn = on
        .hyper
        .upgrade
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    let _ = on.drain.watch(conn, |c| c.graceful_shutdown()).await;
}

/// Serves an HTTP/2 connection with hyper, closing it with a GOAWAY once no stream
/// has been open for the idle timeout (or the listener needs its slot).
async fn serve_h2<IO, H, Fut, B>(on: On<'_>, io: IO, handle: H)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<RequestBody>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use futures_util::future::{ready, Either};
    let streams = Arc::new(Streams::default());
    let counted = streams.clone();
    let body_stall = on.clocks.body;
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        pillion_core::remove_identity(req.headers_mut());
        let open = Open::new(&counted);
        let hosts = req.headers().get_all(http::header::HOST).iter().count();
        match crate::h1::server::host_rule(req.version(), hosts) {
            Some(why) => Either::Left(ready(Ok(crate::relay::reply(pillion_core::ApiError::new(
                crate::relay::ID,
                http::StatusCode::BAD_REQUEST,
                why,
            ))
            .map(|b| Counted::new(http_body_util::Either::Right(b), open))))),
            None => Either::Right(OkMap::new(
                handle(req.map(|body| RequestBody::from_hyper(body, body_stall))),
                move |r: Result<Response<B>, Infallible>| match r {
                    Ok(res) => res.map(|b| Counted::new(http_body_util::Either::Left(b), open)),
                    Err(never) => match never {},
                },
            )),
        }
    });
    let conn = on.hyper.http2.serve_connection(TokioIo::new(io), service);
    let watched = IdleH2 {
        conn,
        streams,
        seen: 0,
        check: Box::pin(tokio::time::sleep(Duration::ZERO)),
        keepalive: Keepalive::new(on.clocks.idle, on.idlers.clone()),
        closing: false,
    };
    let _ = on.drain.watch(watched, IdleH2::graceful_shutdown).await;
}

/// The streams of an HTTP/2 connection: how many are open (a request whose answer
/// has not been sent whole) and how many were ever opened.
#[derive(Default)]
struct Streams {
    open: AtomicUsize,
    opened: AtomicU64,
}

/// One open stream, counted until dropped with its answer's body.
struct Open(Arc<Streams>);

impl Open {
    fn new(streams: &Arc<Streams>) -> Open {
        streams.open.fetch_add(1, Ordering::AcqRel);
        streams.opened.fetch_add(1, Ordering::Relaxed);
        Open(streams.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

pin_project_lite::pin_project! {
    /// An answer's body that keeps its stream counted as open.
    struct Counted<B> {
        #[pin]
        body: B,
        open: Open,
    }
}

impl<B> Counted<B> {
    fn new(body: B, open: Open) -> Self {
        Counted { body, open }
    }
}

impl<B: http_body::Body> http_body::Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// hyper's HTTP/2 connection, with the clock it lacks: idle (no stream open) for
    /// the idle timeout, it is shut down gracefully (GOAWAY, then close).
    ///
    /// A stream ends on a task of hyper's own, which does not wake this one: while
    /// streams come and go, this task looks at the counts every quarter of the idle
    /// timeout instead of being woken per stream, so the idle clock starts at most
    /// that late.
    struct IdleH2<C> {
        #[pin]
        conn: C,
        streams: Arc<Streams>,
        // Streams opened as of the last look.
        seen: u64,
        check: Pin<Box<tokio::time::Sleep>>,
        keepalive: Keepalive,
        closing: bool,
    }
}

/// hyper's HTTP/2 server connection, whichever service it runs.
trait GracefulShutdown {
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<I, S, E, B> GracefulShutdown for hyper::server::conn::http2::Connection<I, S, E>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        hyper::server::conn::http2::Connection::graceful_shutdown(self)
    }
}

impl<C: GracefulShutdown> IdleH2<C> {
    fn graceful_shutdown(self: Pin<&mut Self>) {
        let this = self.project();
        if !std::mem::replace(this.closing, true) {
            this.conn.graceful_shutdown();
        }
    }
}

impl<C: Future + GracefulShutdown> Future for IdleH2<C> {
    type Output = C::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        loop {
            let this = self.as_mut().project();
            if let Poll::Ready(out) = this.conn.poll(cx) {
                return Poll::Ready(out);
            }
            if *this.closing {
                return Poll::Pending;
            }
            let opened = this.streams.opened.load(Ordering::Relaxed);
            if this.streams.open.load(Ordering::Acquire) > 0 || opened != *this.seen {
                *this.seen = opened;
                this.keepalive.busy();
                while this.check.as_mut().poll(cx).is_ready() {
                    let look = tokio::time::Instant::now() + this.keepalive.limit() / 4;
                    this.check.as_mut().reset(look);
                }
                return Poll::Pending;
            }
            let why = ready!(this.keepalive.poll_wait(cx));
            tracing::debug!(why, "closing an idle HTTP/2 connection");
            self.as_mut().graceful_shutdown();
        }
    }
}

pin_project_lite::pin_project! {
    /// `fut.map(f)` for futures that are never in error, without moving `fut`:
    /// futures-util's `Map` moves the whole inner future out when it completes, and
    /// a call's future is kilobytes.
    pub struct OkMap<F, G> {
        #[pin]
        fut: F,
        f: Option<G>,
    }
}

impl<F, G> OkMap<F, G> {
    pub fn new(fut: F, f: G) -> Self {
        OkMap { fut, f: Some(f) }
    }
}

impl<F: Future, G: FnOnce(F::Output) -> T, T> Future for OkMap<F, G> {
    type Output = Result<T, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = ready!(this.fut.poll(cx));
        let f = this.f.take().expect("an OkMap polled after it completed");
        Poll::Ready(Ok(f(out)))
    }
}
