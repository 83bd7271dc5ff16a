//! Connections to one node, kept alive and reused.
//!
//! HTTP/1.1 connections ([`h1`], spoken on the caller's task) sit in an idle list; a
//! connection goes back to the list when the response body that used it has been read
//! to its end, so a slow streaming response never blocks another request behind it.
//! An idle connection the node closed is noticed at checkout and dropped. HTTP/2 (h2c,
//! for gRPC, and the mesh's h2 over mTLS) uses one shared, multiplexed connection per
//! node ([`crate::http2`]).
//!
//! A connection is made *before* the request is handed over, so a failed dial leaves
//! the request with the caller, who can send it elsewhere even when its body is a
//! stream.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::{Either, FutureExt};
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};

use crate::stream::{Carry, Connector, Stream};
use crate::{describe, BoxError, SendError};
use crate::{h1, http2};

/// TCP keep-alive on every connection to a node: a peer gone without a word (a
/// partition, a host that lost power) is noticed after about a minute of silence
/// (30 s, then 3 probes 10 s apart) instead of never, by idle pooled connections and
/// long-lived streams alike (an etcd watch, a push subscription).
const KEEPALIVE: socket2::TcpKeepalive = socket2::TcpKeepalive::new()
    .with_time(Duration::from_secs(30))
    .with_interval(Duration::from_secs(10))
    .with_retries(3);

/// At most this many idle HTTP/1.1 connections are kept per node.
const MAX_IDLE: usize = 256;

/// Edits the trailers of a streamed body before they are sent on, by either client
/// (the inbound proxy strips session headers from them).
#[derive(Clone)]
pub struct TrailerFilter(pub Arc<dyn Fn(&mut http::HeaderMap) + Send + Sync>);

/// A request body: whole (and so replayable for retries) or a stream (sent once),
/// whose trailers may be filtered.
pub enum Outgoing {
    Full(Option<Bytes>),
    Stream(
        http_body_util::Limited<crate::server::RequestBody>,
        Option<TrailerFilter>,
    ),
}

impl Outgoing {
    pub fn full(bytes: Bytes) -> Outgoing {
        Outgoing::Full((!bytes.is_empty()).then_some(bytes))
    }

    /// Whether the request goes without a `Content-Length: 0`: it has no body, and its
    /// method is not one whose requests carry one (a node may insist on the length
    /// for POST, PUT and PATCH). The same for both clients.
    pub(crate) fn omits_empty_length(&self, method: &http::Method) -> bool {
        use http::Method;
        matches!(self, Outgoing::Full(None))
            && !matches!(*method, Method::POST | Method::PUT | Method::PATCH)
    }
}

impl Body for Outgoing {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Outgoing::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            // Typed here, so that whichever client sends it (h1 or hyper's h2) the
            // failure is known to be the caller's.
            Outgoing::Stream(body, filter) => {
                let frame = std::task::ready!(Pin::new(body).poll_frame(cx))
                    .map(|f| f.map_err(|e| BoxError::from(SendError::from_body(e))));
                Poll::Ready(match (frame, filter.as_ref()) {
                    (Some(Ok(frame)), Some(TrailerFilter(filter))) if frame.is_trailers() => {
                        let mut trailers = frame.into_trailers().unwrap_or_default();
                        filter(&mut trailers);
                        Some(Ok(Frame::trailers(trailers)))
                    }
                    (frame, _) => frame,
                })
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Outgoing::Full(bytes) => bytes.is_none(),
            Outgoing::Stream(body, _) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Outgoing::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            Outgoing::Stream(body, _) => body.size_hint(),
        }
    }
}

/// A node's answer, or why there is none and the request if it never left.
pub type Sent = Result<Response<PooledBody>, (SendError, Option<Request<Outgoing>>)>;

#[allow(clippy::result_large_err)] // the error hands the request back
fn h1_result(r: Result<Response<h1::ResponseBody>, SendError>) -> Sent {
    match r {
        Ok(res) => Ok(res.map(|b| PooledBody::new(Answer::H1(b)))),
        Err(e) => Err((e, None)),
    }
}

/// How a pool keeps its connections.
#[derive(Debug, Clone)]
pub struct Settings {
    /// An idle connection unused for this long is closed (`--pool-idle-timeout`).
    pub idle_timeout: Duration,
    /// Open HTTP/1.1 connections at most; more requests wait for one to come back.
    pub max_open: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            idle_timeout: Duration::from_secs(90),
            max_open: MAX_OPEN,
        }
    }
}

pub struct Pool {
    authority: String,
    /// TLS over every connection, when set.
    tls: Option<Connector>,
    settings: Settings,
    idle: Mutex<Idle>,
    h2: Mutex<Option<http2::Handle>>,
    limit: Arc<Limit>,
}

/// Idle HTTP/1.1 connections, the most recently used last, each with the time it
/// came back.
#[derive(Default)]
struct Idle {
    /// Each with the sweep during which it came back: a connection comes back after
    /// every request, and the sweeps' count costs no clock read.
    conns: Vec<(h1::Conn, u64)>,
    /// Whether a sweeper task is closing the expired ones.
    sweeping: bool,
    /// Sweeps so far.
    sweeps: u64,
}

/// At most [`Settings::max_open`] HTTP/1.1 connections per node: beyond it a request waits for
/// one to come back rather than opening more, so a burst of callers cannot make the
/// sidecar (and the node) hold thousands of connections and their buffers.
struct Limit {
    open: AtomicUsize,
    max: usize,
    returned: tokio::sync::Notify,
}

/// Open HTTP/1.1 connections per node, by default.
pub const MAX_OPEN: usize = 128;

/// One open connection's share of the [`Limit`], given back when dropped.
pub(crate) struct Slot(Arc<Limit>);

impl Slot {
    fn reserve(limit: &Arc<Limit>) -> Option<Slot> {
        limit
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit.max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(limit.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.returned.notify_one();
    }
}

impl Pool {
    pub fn new(authority: String) -> Pool {
        Pool::with_settings(authority, Settings::default())
    }

    pub fn with_settings(authority: String, settings: Settings) -> Pool {
        Pool::with_tls(authority, settings, None)
    }

    /// A pool whose connections are TLS (made by `tls`) when it is given.
    pub fn with_tls(authority: String, settings: Settings, tls: Option<Connector>) -> Pool {
        Pool {
            authority,
            tls,
            limit: Arc::new(Limit {
                open: AtomicUsize::new(0),
                max: settings.max_open.max(1),
                returned: tokio::sync::Notify::new(),
            }),
            settings,
            idle: Mutex::new(Idle::default()),
            h2: Mutex::new(None),
        }
    }

    /// Idle HTTP/1.1 connections, for `/statusz`.
    pub fn idle(&self) -> usize {
        self.lock_idle().conns.len()
    }

    /// Sends `req` (origin-form URI for HTTP/1.1, absolute for HTTP/2). On a failure
    /// before the request left, it is handed back for another attempt.
    pub fn send(
        self: &Arc<Self>,
        req: Request<Outgoing>,
        h2: bool,
        connect_timeout: Duration,
    ) -> impl Future<Output = Sent> + Send + 'static {
        // The common case, an idle HTTP/1.1 connection, is a small future; waiting,
        // dialling and HTTP/2 are boxed (their futures are kilobytes).
        if !h2 {
            if let Some(conn) = self.checkout() {
                return Either::Left(h1::send(conn, req, self.clone()).map(h1_result));
            }
        }
        let pool = self.clone();
        Either::Right(Box::pin(async move {
            if h2 {
                pool.send_h2(req, connect_timeout).await
            } else {
                pool.send_new_h1(req, connect_timeout).await
            }
        }))
    }

    async fn send_new_h1(
        self: &Arc<Self>,
        req: Request<Outgoing>,
        connect_timeout: Duration,
    ) -> Sent {
        let conn = loop {
            // Registered before looking, so a connection or slot freed between the
            // look and the wait still wakes this call (Notify keeps only one permit).
            let returned = self.limit.returned.notified();
            let mut returned = std::pin::pin!(returned);
            returned.as_mut().enable();
            if let Some(conn) = self.checkout() {
                break conn;
            }
            let Some(slot) = Slot::reserve(&self.limit) else {
                // Full: wait for a connection to come back (the caller's deadline
                // bounds the wait), then look again.
                returned.await;
                continue;
            };
            match self.dial(connect_timeout, Carry::Http1).await {
                Ok(io) => break h1::Conn::new(io, slot),
                Err(e) => return Err((e, Some(req))),
            }
        };
        h1_result(h1::send(conn, req, self.clone()).await)
    }

    async fn send_h2(self: &Arc<Self>, req: Request<Outgoing>, connect_timeout: Duration) -> Sent {
        let existing = {
            let h2 = self.h2.lock().unwrap_or_else(|e| e.into_inner());
            h2.as_ref().filter(|h| h.is_open()).cloned()
        };
        let mut req = req;
        let mut handle = existing;
        // A connection that turns out to be going away (a GOAWAY the node sent when
        // it restarts or has served its share) did not take the request: it goes on a
        // new connection, once, without counting against the node.
        for fresh in [false, true] {
            let h = match handle.take() {
                Some(h) => h,
                None => match self.connect_h2(connect_timeout).await {
                    Ok(h) => {
                        *self.h2.lock().unwrap_or_else(|e| e.into_inner()) = Some(h.clone());
                        h
                    }
                    Err(e) => return Err((e, Some(req))),
                },
            };
            match http2::send(h, req).await {
                Ok(res) => return Ok(res.map(|b| PooledBody::new(Answer::H2(b)))),
                Err(http2::Failure::NotSent(e, back)) if fresh => {
                    return Err((
                        SendError::Handshake {
                            authority: self.authority.clone(),
                            detail: describe(&e),
                        },
                        Some(*back),
                    ))
                }
                Err(http2::Failure::NotSent(_, back)) => req = *back,
                Err(http2::Failure::Sent(e)) => return Err((e, None)),
            }
        }
        unreachable!("the second try returns")
    }

    /// An idle connection that is still open; closed ones are dropped on the way.
    fn checkout(&self) -> Option<h1::Conn> {
        let mut idle = self.lock_idle();
        while let Some((mut conn, _)) = idle.conns.pop() {
            if conn.is_usable() {
                return Some(conn);
            }
        }
        None
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Idle> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes back a connection whose exchange ended cleanly.
    pub(crate) fn checkin(self: &Arc<Self>, conn: h1::Conn) {
        let mut idle = self.lock_idle();
        if idle.conns.len() < MAX_IDLE {
            let now = idle.sweeps;
            idle.conns.push((conn, now));
            if !idle.sweeping {
                idle.sweeping = true;
                tokio::spawn(sweep(Arc::downgrade(self)));
            }
        }
        drop(idle);
        self.limit.returned.notify_one();
    }

    /// A new connection, TLS included, within `connect_timeout`.
    async fn dial(&self, connect_timeout: Duration, carry: Carry) -> Result<Stream, SendError> {
        let timed_out = || SendError::ConnectTimeout {
            authority: self.authority.clone(),
            after: connect_timeout,
        };
        let deadline = tokio::time::Instant::now() + connect_timeout;
        let stream =
            tokio::time::timeout_at(deadline, tokio::net::TcpStream::connect(&self.authority))
                .await
                .map_err(|_| timed_out())?
                .map_err(|e| SendError::dial(&self.authority, e))?;
        let _ = stream.set_nodelay(true);
        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&KEEPALIVE);
        let Some(tls) = &self.tls else {
            return Ok(Stream::Plain(stream));
        };
        tokio::time::timeout_at(deadline, tls.connect(stream, carry))
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| SendError::Tls {
                authority: self.authority.clone(),
                detail: crate::tls::certificate_problem(&e).unwrap_or_else(|| describe(&e)),
            })
    }

    /// A connection for a raw TCP tunnel (through a mesh listener: TLS with the
    /// tunnel's ALPN).
    pub async fn connect_tunnel(&self, connect_timeout: Duration) -> Result<Stream, SendError> {
        self.dial(connect_timeout, Carry::Tunnel).await
    }

    async fn connect_h2(&self, connect_timeout: Duration) -> Result<http2::Handle, SendError> {
        let io = self.dial(connect_timeout, Carry::H2).await?;
        http2::Handle::handshake(io)
            .await
            .map_err(|e| SendError::Handshake {
                authority: self.authority.clone(),
                detail: describe(&e),
            })
    }
}

/// Closes the pool's idle connections once they have been idle for its idle timeout,
/// checking a few times per timeout; ends when none is left (the next check-in starts
/// another) or the pool is gone.
async fn sweep(pool: std::sync::Weak<Pool>) {
    loop {
        let period = match pool.upgrade() {
            Some(p) => (p.settings.idle_timeout / 4).max(Duration::from_millis(100)),
            None => return,
        };
        tokio::time::sleep(period).await;
        let Some(pool) = pool.upgrade() else { return };
        // A connection back during sweep `g` has been idle at least `(now - g - 1)`
        // periods; closed once that reaches the idle timeout (so it was idle between
        // the timeout and the timeout and a period, as with a clock read).
        let periods = pool
            .settings
            .idle_timeout
            .as_nanos()
            .div_ceil(period.as_nanos()) as u64;
        let mut idle = pool.lock_idle();
        idle.sweeps += 1;
        let now = idle.sweeps;
        idle.conns.retain(|(_, back)| now - back <= periods);
        if idle.conns.is_empty() {
            idle.sweeping = false;
            return;
        }
    }
}

/// A node's response body. An HTTP/1.1 one returns its connection to the pool once
/// read (a body dropped before its end closes the connection).
/// Who learns how an answer's body ended (see [`PooledBody::on_end`]).
pub trait AnswerEnd: Send + Sync {
    fn answer_ended(&self, node: usize, whole: bool);
}

pub struct PooledBody {
    answer: Answer,
    /// Told once whether the body ended whole or broke off (see [`Self::on_end`]).
    on_end: Option<(Arc<dyn AnswerEnd>, usize)>,
}

enum Answer {
    H1(h1::ResponseBody),
    H2(http2::ResponseBody),
}

impl PooledBody {
    fn new(answer: Answer) -> PooledBody {
        PooledBody {
            answer,
            on_end: None,
        }
    }

    /// The node's connection after `101 Switching Protocols`.
    pub fn take_upgrade(&mut self) -> Option<h1::Upgraded> {
        match &mut self.answer {
            Answer::H1(body) => body.take_upgrade(),
            Answer::H2(_) => None,
        }
    }

    /// Tells `hook` about `node` once: whole when the body has ended, not whole if
    /// it breaks off first (a node that answers its headers and then cuts the body
    /// short has failed the call, though its status looked like success). Not told
    /// when the body is dropped before its end (the caller went away).
    pub fn on_end(&mut self, hook: Arc<dyn AnswerEnd>, node: usize) {
        self.on_end = Some((hook, node));
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let frame = match &mut this.answer {
            Answer::H1(body) => Pin::new(body).poll_frame(cx),
            Answer::H2(body) => Pin::new(body).poll_frame(cx),
        };
        if this.on_end.is_some() {
            let ended = match &frame {
                Poll::Ready(Some(Err(_))) => Some(false),
                Poll::Ready(None) => Some(true),
                Poll::Ready(Some(Ok(_))) if this.is_end_stream() => Some(true),
                _ => None,
            };
            if let Some(whole) = ended {
                if let Some((hook, node)) = this.on_end.take() {
                    hook.answer_ended(node, whole);
                }
            }
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        match &self.answer {
            Answer::H1(body) => body.is_end_stream(),
            Answer::H2(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.answer {
            Answer::H1(body) => body.size_hint(),
            Answer::H2(body) => body.size_hint(),
        }
    }
}
