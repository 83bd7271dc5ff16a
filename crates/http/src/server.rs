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
#[derive(Debug, Clone)]
pub struct Limits {
    /// A connection whose request head has not arrived within this is closed.
    pub read_header_timeout: Duration,
    /// Connections served at once; more wait in the kernel's backlog.
    pub max_connections: Option<usize>,
    /// After shutdown begins, how long requests in flight may take to finish.
    pub grace: Duration,
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

/// Why a request is refused before any handler sees it: RFC 9112 3.2 wants exactly
/// one `Host` in an HTTP/1.1 request (none is allowed in HTTP/1.0, never two); two
/// could be read differently by pillion and the app behind it.
fn refuse<T>(req: &Request<T>) -> Option<&'static str> {
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
        let service = hyper::service::service_fn(move |req: Request<Incoming>| handle(req, peer));
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(FirstLine::new(stream)), service)
            .into_owned();
        let conn = drain.watch(conn, |c| c.graceful_shutdown());
        tokio::spawn(async move {
            let _ = conn.await;
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

/// A connection whose first request line has its request-target made acceptable to
/// hyper: printable bytes that RFC 3986 wants percent-encoded but clients send raw
/// (curl sends `?topic=events.>` as typed) are encoded (`>` -> `%3E`), so the request
/// reaches pillion's handlers, which decode them. Only the first line of a
/// connection is touched, where no framing can be misread; the rest passes as is.
struct FirstLine<T> {
    io: T,
    /// The first line as read so far, until it is whole.
    line: Vec<u8>,
    /// The rewritten line, and how much of it was handed out.
    out: Vec<u8>,
    sent: usize,
    done: bool,
}

/// A request line longer than this is passed on untouched (hyper refuses it).
const MAX_FIRST_LINE: usize = 16 * 1024;

impl<T> FirstLine<T> {
    fn new(io: T) -> Self {
        FirstLine {
            io,
            line: Vec::new(),
            out: Vec::new(),
            sent: 0,
            done: false,
        }
    }
}

/// `line` with the request-target (between the first two spaces) percent-encoded
/// where it holds bytes the `http` crate refuses in a URI.
fn encode_target(line: &[u8]) -> Vec<u8> {
    let Some(start) = line.iter().position(|&b| b == b' ') else {
        return line.to_vec();
    };
    let end = line[start + 1..]
        .iter()
        .position(|&b| b == b' ')
        .map_or(line.len(), |i| start + 1 + i);
    let mut out = Vec::with_capacity(line.len() + 16);
    out.extend_from_slice(&line[..=start]);
    for &b in &line[start + 1..end] {
        if matches!(
            b,
            b'"' | b'<' | b'>' | b'\\' | b'^' | b'`' | b'{' | b'|' | b'}'
        ) {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        } else {
            out.push(b);
        }
    }
    out.extend_from_slice(&line[end..]);
    out
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for FirstLine<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.sent < this.out.len() {
                let n = buf.remaining().min(this.out.len() - this.sent);
                buf.put_slice(&this.out[this.sent..this.sent + n]);
                this.sent += n;
                if this.sent == this.out.len() {
                    this.out = Vec::new();
                    this.sent = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.done {
                return Pin::new(&mut this.io).poll_read(cx, buf);
            }
            let mut chunk = [0u8; 2048];
            let mut read = tokio::io::ReadBuf::new(&mut chunk);
            std::task::ready!(Pin::new(&mut this.io).poll_read(cx, &mut read))?;
            let got = read.filled();
            let eof = got.is_empty();
            this.line.extend_from_slice(got);
            let newline = this.line.iter().position(|&b| b == b'\n');
            if newline.is_none() && !eof && this.line.len() < MAX_FIRST_LINE {
                continue;
            }
            this.done = true;
            let line = std::mem::take(&mut this.line);
            this.out = match newline {
                Some(i) => {
                    let mut out = encode_target(&line[..i]);
                    out.extend_from_slice(&line[i..]);
                    out
                }
                None => line,
            };
            if this.out.is_empty() {
                return Poll::Ready(Ok(())); // end of stream
            }
        }
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for FirstLine<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_request_target_of_the_first_line_is_encoded() {
        assert_eq!(
            encode_target(b"GET /broker?topic=events.> HTTP/1.1\r"),
            b"GET /broker?topic=events.%3E HTTP/1.1\r".to_vec()
        );
        assert_eq!(
            encode_target(b"GET /a?q=\"x\"&t={1} HTTP/1.1\r"),
            b"GET /a?q=%22x%22&t=%7B1%7D HTTP/1.1\r".to_vec()
        );
        let plain = b"GET /healthz HTTP/1.1\r";
        assert_eq!(encode_target(plain), plain.to_vec());
        assert_eq!(
            encode_target(b"PRI * HTTP/2.0\r"),
            b"PRI * HTTP/2.0\r".to_vec()
        );
    }

    #[tokio::test]
    async fn the_rest_of_the_connection_passes_unchanged() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(64);
        let mut server = FirstLine::new(server);
        let sent = b"POST /p?t=<a> HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n<b>".to_vec();
        let writer = tokio::spawn(async move {
            for piece in sent.chunks(5) {
                client.write_all(piece).await.unwrap();
            }
            client.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert_eq!(
            String::from_utf8(got).unwrap(),
            "POST /p?t=%3Ca%3E HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n<b>"
        );
    }
}
