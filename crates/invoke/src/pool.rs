//! Connections to one node, kept alive and reused.
//!
//! HTTP/1.1 connections sit in an idle list; a connection goes back to the list when
//! the response body that used it has been read (or dropped), so a slow streaming
//! response never blocks another request behind it. HTTP/2 (h2c, for gRPC) uses one
//! shared, multiplexed connection per node.
//!
//! A connection is made *before* the request is handed over, so a failed dial leaves
//! the request with the caller, who can send it elsewhere even when its body is a
//! stream. A pooled connection found closed at send time gives the request back too
//! (hyper's `try_send_request`), and a fresh connection is tried.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};

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
    idle: Mutex<Vec<http1::SendRequest<Outgoing>>>,
    h2: Mutex<Option<http2::SendRequest<Outgoing>>>,
    limit: Arc<Limit>,
}

/// At most [`MAX_OPEN`] HTTP/1.1 connections per node: beyond it a request waits for
/// one to come back rather than opening more, so a burst of callers cannot make the
/// sidecar (and the node) hold thousands of connections and their buffers.
struct Limit {
    open: std::sync::atomic::AtomicUsize,
    returned: tokio::sync::Notify,
}

/// Open HTTP/1.1 connections per node.
pub const MAX_OPEN: usize = 128;

impl Limit {
    /// Takes a slot for a new connection, if one is free.
    fn reserve(&self) -> bool {
        self.open
            .fetch_update(
                std::sync::atomic::Ordering::AcqRel,
                std::sync::atomic::Ordering::Acquire,
                |n| (n < MAX_OPEN).then_some(n + 1),
            )
            .is_ok()
    }

    /// Gives a slot back (a connection closed, or was never made).
    fn release(&self) {
        self.open.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        self.returned.notify_one();
    }
}

impl Pool {
    pub fn new(authority: String) -> Pool {
        Pool {
            authority,
            idle: Mutex::new(Vec::new()),
            h2: Mutex::new(None),
            limit: Arc::new(Limit {
                open: std::sync::atomic::AtomicUsize::new(0),
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
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<Outgoing>,
        h2: bool,
        connect_timeout: Duration,
    ) -> Result<Response<PooledBody>, (SendFailure, Option<Request<Outgoing>>)> {
        if h2 {
            return self.send_h2(req, connect_timeout).await;
        }
        loop {
            let (mut sender, fresh) = match self.checkout() {
                Some(s) => (s, false),
                None if !self.limit.reserve() => {
                    // Full: wait for a connection to come back (the caller's deadline
                    // bounds the wait), then look again.
                    self.limit.returned.notified().await;
                    continue;
                }
                None => match self.connect_h1(connect_timeout).await {
                    Ok(s) => (s, true),
                    Err(e) => return Err((SendFailure::Connect(e), Some(req))),
                },
            };
            match sender.try_send_request(req).await {
                Ok(res) => {
                    let (parts, body) = res.into_parts();
                    let body = PooledBody {
                        inner: body,
                        sender: Some(sender),
                        pool: self.clone(),
                    };
                    return Ok(Response::from_parts(parts, body));
                }
                Err(mut e) => match e.take_message() {
                    // A pooled connection that closed meanwhile: try a new one.
                    Some(r) if !fresh => req = r,
                    Some(r) => return Err((SendFailure::Connect(describe(e.error())), Some(r))),
                    None => return Err((SendFailure::Sent(describe(e.error())), None)),
                },
            }
        }
    }

    async fn send_h2(
        self: &Arc<Self>,
        req: Request<Outgoing>,
        connect_timeout: Duration,
    ) -> Result<Response<PooledBody>, (SendFailure, Option<Request<Outgoing>>)> {
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
            Ok(res) => {
                let (parts, body) = res.into_parts();
                Ok(Response::from_parts(
                    parts,
                    PooledBody {
                        inner: body,
                        sender: None,
                        pool: self.clone(),
                    },
                ))
            }
            Err(mut e) => {
                let msg = describe(e.error());
                match e.take_message() {
                    Some(r) => Err((SendFailure::Connect(msg), Some(r))),
                    None => Err((SendFailure::Sent(msg), None)),
                }
            }
        }
    }

    fn checkout(&self) -> Option<http1::SendRequest<Outgoing>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let mut busy = Vec::new();
        let mut found = None;
        while let Some(s) = idle.pop() {
            if s.is_closed() {
                continue;
            }
            if s.is_ready() {
                found = Some(s);
                break;
            }
            busy.push(s); // finishing its previous response; keep it for later
        }
        idle.extend(busy);
        found
    }

    fn checkin(&self, sender: http1::SendRequest<Outgoing>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(sender);
        }
        drop(idle);
        self.limit.returned.notify_one();
    }

    async fn dial(
        &self,
        connect_timeout: Duration,
    ) -> Result<TokioIo<tokio::net::TcpStream>, String> {
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
        Ok(TokioIo::new(stream))
    }

    async fn connect_h1(
        &self,
        connect_timeout: Duration,
    ) -> Result<http1::SendRequest<Outgoing>, String> {
        // Called with a slot reserved: give it back unless a connection takes it over.
        let io = match self.dial(connect_timeout).await {
            Ok(io) => io,
            Err(e) => {
                self.limit.release();
                return Err(e);
            }
        };
        let (mut sender, conn) = match http1::Builder::new().handshake(io).await {
            Ok(pair) => pair,
            Err(e) => {
                self.limit.release();
                return Err(format!(
                    "handshake with {}: {}",
                    self.authority,
                    describe(&e)
                ));
            }
        };
        // The slot the caller reserved is given back when the connection ends.
        let limit = self.limit.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
            limit.release();
        });
        sender
            .ready()
            .await
            .map_err(|e| format!("connection to {}: {}", self.authority, describe(&e)))?;
        Ok(sender)
    }

    async fn connect_h2(
        &self,
        connect_timeout: Duration,
    ) -> Result<http2::SendRequest<Outgoing>, String> {
        let io = self.dial(connect_timeout).await?;
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

/// A response body that returns its HTTP/1.1 connection to the pool once read or
/// dropped.
pub struct PooledBody {
    inner: Incoming,
    sender: Option<http1::SendRequest<Outgoing>>,
    pool: Arc<Pool>,
}

impl PooledBody {
    fn release(&mut self) {
        if let Some(sender) = self.sender.take() {
            self.pool.checkin(sender);
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(None) = res {
            this.release();
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // A body dropped before its end leaves the connection mid-response; hyper
        // closes it then, and checkout skips closed connections.
        self.release();
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
