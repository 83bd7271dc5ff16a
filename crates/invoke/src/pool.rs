//! Connections to one node, kept alive and reused.
//!
//! HTTP/1.1 connections ([`h1`], spoken on the caller's task) sit in an idle list; a
//! connection goes back to the list when the response body that used it has been read
//! to its end, so a slow streaming response never blocks another request behind it.
//! An idle connection the node closed is noticed at checkout and dropped. HTTP/2 (h2c,
//! for gRPC) uses one shared, multiplexed hyper connection per node.
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
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::h1;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// At most this many idle HTTP/1.1 connections are kept per node.
const MAX_IDLE: usize = 256;

/// A request body: whole (and so replayable for retries) or a stream (sent once).
pub enum Outgoing {
    Full(Option<Bytes>),
    Stream(http_body_util::Limited<Incoming>),
}

impl Outgoing {
    pub fn full(bytes: Bytes) -> Outgoing {
        Outgoing::Full((!bytes.is_empty()).then_some(bytes))
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
            Outgoing::Stream(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Outgoing::Full(bytes) => bytes.is_none(),
            Outgoing::Stream(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Outgoing::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            Outgoing::Stream(body) => body.size_hint(),
        }
    }
}

/// A node's answer, or why there is none and the request if it never left.
pub type Sent = Result<Response<PooledBody>, (SendFailure, Option<Request<Outgoing>>)>;

#[allow(clippy::result_large_err)] // the error hands the request back
fn h1_result(r: Result<Response<h1::ResponseBody>, String>) -> Sent {
    match r {
        Ok(res) => Ok(res.map(PooledBody::H1)),
        Err(e) => Err((SendFailure::Sent(e), None)),
    }
}

/// Why a send failed, and whether the node can have seen the request.
#[derive(Debug)]
pub enum SendFailure {
    /// No connection could be made: the node has not seen the request.
    Connect(String),
    /// The request may have reached the node (connection reset, closed mid-way).
    Sent(String),
}

pub struct Pool {
    authority: String,
    idle: Mutex<Vec<h1::Conn>>,
    h2: Mutex<Option<http2::SendRequest<Outgoing>>>,
    limit: Arc<Limit>,
}

/// At most [`MAX_OPEN`] HTTP/1.1 connections per node: beyond it a request waits for
/// one to come back rather than opening more, so a burst of callers cannot make the
/// sidecar (and the node) hold thousands of connections and their buffers.
struct Limit {
    open: AtomicUsize,
    returned: tokio::sync::Notify,
}

/// Open HTTP/1.1 connections per node.
pub const MAX_OPEN: usize = 128;

/// One open connection's share of the [`Limit`], given back when dropped.
pub(crate) struct Slot(Arc<Limit>);

impl Slot {
    fn reserve(limit: &Arc<Limit>) -> Option<Slot> {
        limit
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_OPEN).then_some(n + 1)
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
        Pool {
            authority,
            idle: Mutex::new(Vec::new()),
            h2: Mutex::new(None),
            limit: Arc::new(Limit {
                open: AtomicUsize::new(0),
                returned: tokio::sync::Notify::new(),
            }),
        }
    }

    /// Idle HTTP/1.1 connections, for `/statusz`.
    pub fn idle(&self) -> usize {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).len()
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
            match self.dial(connect_timeout).await {
                Ok(io) => break h1::Conn::new(io, slot),
                Err(e) => return Err((SendFailure::Connect(e), Some(req))),
            }
        };
        h1_result(h1::send(conn, req, self.clone()).await)
    }

    async fn send_h2(self: &Arc<Self>, req: Request<Outgoing>, connect_timeout: Duration) -> Sent {
        let existing = {
            let h2 = self.h2.lock().unwrap_or_else(|e| e.into_inner());
            h2.as_ref().filter(|s| !s.is_closed()).cloned()
        };
        let mut sender = match existing {
            Some(s) => s,
            None => match self.connect_h2(connect_timeout).await {
                Ok(s) => {
                    *self.h2.lock().unwrap_or_else(|e| e.into_inner()) = Some(s.clone());
                    s
                }
                Err(e) => return Err((SendFailure::Connect(e), Some(req))),
            },
        };
        match sender.try_send_request(req).await {
            Ok(res) => Ok(res.map(PooledBody::H2)),
            Err(mut e) => {
                let msg = describe(e.error());
                match e.take_message() {
                    Some(r) => Err((SendFailure::Connect(msg), Some(r))),
                    None => Err((SendFailure::Sent(msg), None)),
                }
            }
        }
    }

    /// An idle connection that is still open; closed ones are dropped on the way.
    fn checkout(&self) -> Option<h1::Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(conn) = idle.pop() {
            if conn.is_usable() {
                return Some(conn);
            }
        }
        None
    }

    /// Takes back a connection whose exchange ended cleanly.
    pub(crate) fn checkin(&self, conn: h1::Conn) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(conn);
        }
        drop(idle);
        self.limit.returned.notify_one();
    }

    async fn dial(&self, connect_timeout: Duration) -> Result<tokio::net::TcpStream, String> {
        let stream = tokio::time::timeout(
            connect_timeout,
            tokio::net::TcpStream::connect(&self.authority),
        )
        .await
        .map_err(|_| {
            format!(
                "connect to {} timed out after {}",
                self.authority,
                pillion_core::duration::format(connect_timeout)
            )
        })?
        .map_err(|e| format!("connect to {}: {e}", self.authority))?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    async fn connect_h2(
        &self,
        connect_timeout: Duration,
    ) -> Result<http2::SendRequest<Outgoing>, String> {
        let io = TokioIo::new(self.dial(connect_timeout).await?);
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .handshake(io)
            .await
            .map_err(|e| format!("h2c handshake with {}: {}", self.authority, describe(&e)))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream h2 connection ended");
            }
        });
        Ok(sender)
    }
}

/// A node's response body. An HTTP/1.1 one returns its connection to the pool once
/// read (a body dropped before its end closes the connection).
pub enum PooledBody {
    H1(h1::ResponseBody),
    H2(Incoming),
}

impl PooledBody {
    /// The node's connection after `101 Switching Protocols`.
    pub fn take_upgrade(&mut self) -> Option<h1::Upgraded> {
        match self {
            PooledBody::H1(body) => body.take_upgrade(),
            PooledBody::H2(_) => None,
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            PooledBody::H1(body) => Pin::new(body).poll_frame(cx),
            PooledBody::H2(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            PooledBody::H1(body) => body.is_end_stream(),
            PooledBody::H2(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            PooledBody::H1(body) => body.size_hint(),
            PooledBody::H2(body) => body.size_hint(),
        }
    }
}

/// An error with its causes: `outer: inner: root`.
pub fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        src = inner.source();
    }
    s
}
