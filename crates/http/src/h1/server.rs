//! HTTP/1.1 on a listener's connection, served on the connection's own task.
//!
//! One pass over the read buffer: httparse finds the fields, the head is checked,
//! the values share the buffer, and a body that came with its head is a slice of it.
//! The answer's head and the body bytes it has ready leave in one write. The framing
//! rules are [`super::codec`]'s, shared with the client.
//!
//! Refused with an answer in the JSON error shape (after the answers to the requests
//! before it), then the connection closes:
//! - a line ended by a bare LF (RFC 9112 2.2): 400;
//! - `Transfer-Encoding` with `Content-Length` too, or in HTTP/1.0 (6.1, 6.3: the
//!   framing of a smuggling attempt, which Envoy refuses too): 400; a coding other
//!   than one `chunked`: 501;
//! - a `Content-Length` that is not digits, or several that differ: 400;
//! - a head over 64 KiB or with over 100 fields: 431.
//!
//! - `CONNECT`: 405 (pillion is no forward proxy).
//!
//! `Expect: 100-continue` is answered here, when the handler first reads the body.
//! Handed to hyper, with every byte read so far, and only then: the h2c preface (the
//! connection is HTTP/2), and a request with `Upgrade` and no body, checked here
//! first, which hyper answers alone (a websocket's 101 hands the connection to it;
//! any other answer closes it). An `Upgrade` with a body is served here, the upgrade
//! ignored (RFC 9110 7.8).
//!
//! Keep-alive follows RFC 9112 9.3. When the handler left part of a request body
//! unread, the connection ends after its answer with a lingering close (the rest is
//! read and dropped for a moment), so that the answer is not lost to a reset.

use std::future::{poll_fn, Future};
use std::io;
use std::mem::MaybeUninit;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::codec::{
    bare_lf, header_map, spans, Length, Writer, INLINE_SPANS, MAX_HEAD, MAX_HEADERS,
};
use super::framing::{self, BodyReader, Framing, Role, Step};
use crate::drain::Drain;
use crate::idle::{Idlers, Keepalive};
use crate::BoxError;

/// Bytes read per system call for heads, at least.
const READ_SIZE: usize = 4 * 1024;
/// ... and for a request body being streamed.
const BODY_READ_SIZE: usize = 16 * 1024;
/// A lingering close reads and drops at most this much, for at most this long.
const LINGER_BYTES: usize = 1 << 20;
const LINGER_TIME: Duration = Duration::from_secs(1);
/// What an HTTP/2 client sends first (RFC 9113 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A listener's connection, plain or TLS.
pub(crate) enum Socket {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// In memory, for tests on a paused clock.
    #[cfg(test)]
    Mem(tokio::io::DuplexStream),
}

/// The reading half of a [`Socket`].
pub(crate) enum ReadSide {
    Tcp(tokio::net::tcp::OwnedReadHalf),
    Tls(tokio::io::ReadHalf<tokio_rustls::server::TlsStream<TcpStream>>),
    #[cfg(test)]
    Mem(tokio::io::ReadHalf<tokio::io::DuplexStream>),
}

/// The writing half of a [`Socket`].
pub(crate) enum WriteSide {
    Tcp(tokio::net::tcp::OwnedWriteHalf),
    Tls(tokio::io::WriteHalf<tokio_rustls::server::TlsStream<TcpStream>>),
    #[cfg(test)]
    Mem(tokio::io::WriteHalf<tokio::io::DuplexStream>),
}

impl Socket {
    /// The two halves: a streamed request body reads while the answer is written.
    /// A TCP stream splits for free; a TLS stream behind a lock nobody contends.
    fn split(self) -> (ReadSide, WriteSide) {
        match self {
            Socket::Tcp(s) => {
                let (r, w) = s.into_split();
                (ReadSide::Tcp(r), WriteSide::Tcp(w))
            }
            Socket::Tls(s) => {
                let (r, w) = tokio::io::split(*s);
                (ReadSide::Tls(r), WriteSide::Tls(w))
            }
            #[cfg(test)]
            Socket::Mem(s) => {
                let (r, w) = tokio::io::split(s);
                (ReadSide::Mem(r), WriteSide::Mem(w))
            }
        }
    }
}

crate::stream::delegate_read!(ReadSide {
    Tcp,
    Tls,
    #[cfg(test)]
    Mem,
});
crate::stream::delegate_write!(WriteSide {
    Tcp,
    Tls,
    #[cfg(test)]
    Mem,
});

/// The reading half with what was read from it and not yet used.
pub(crate) struct Reader {
    io: ReadSide,
    buf: BytesMut,
}

impl Reader {
    /// Reads more into the buffer ([`super::codec::poll_fill`]).
    fn poll_fill(&mut self, cx: &mut Context<'_>, size: usize) -> Poll<io::Result<usize>> {
        super::codec::poll_fill(&mut self.io, &mut self.buf, size, cx)
    }
}

/// The connection after the part pillion served: hyper's now, with the bytes already
/// read given back first.
pub(crate) struct Joined {
    read_ahead: Bytes,
    read: ReadSide,
    write: WriteSide,
}

impl AsyncRead for Joined {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.read_ahead.is_empty() {
            let n = buf.remaining().min(self.read_ahead.len());
            let given = self.read_ahead.split_to(n);
            buf.put_slice(&given);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.read).poll_read(cx, buf)
    }
}

impl AsyncWrite for Joined {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.write).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.write).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.write.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.write).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.write).poll_shutdown(cx)
    }
}

/// How a connection pillion served ended.
pub(crate) enum Served {
    Closed,
    /// hyper is to serve the rest.
    Handover(Joined, Handover),
}

/// What hyper is given a connection for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Handover {
    /// It began with the HTTP/2 preface.
    Http2,
    /// Its next request (checked, and without a body) asks for an upgrade: hyper
    /// answers it alone, then the connection is the upgrade's (101) or closes.
    Upgrade,
}

/// A request body, whichever server read it.
pub struct RequestBody {
    kind: Kind,
}

enum Kind {
    /// No body, or all of it already given.
    Empty,
    /// The whole body, which came with its head.
    Whole(Bytes),
    /// Read from the connection as it is polled (boxed: a request is moved through
    /// every layer of a call, and most have no body to stream).
    Upload(Box<Upload>),
    /// HTTP/2, or a connection handed to hyper (boxed, as `Upload`).
    Hyper(Box<(hyper::body::Incoming, Stall)>),
}

impl RequestBody {
    pub(crate) fn empty() -> RequestBody {
        RequestBody { kind: Kind::Empty }
    }

    /// The whole body, when it is all here already (it came with its head, or there
    /// is none): taken at once, with no future to wait on.
    pub fn take_whole(&mut self) -> Option<Bytes> {
        match &self.kind {
            Kind::Empty => Some(Bytes::new()),
            Kind::Whole(_) => match std::mem::replace(&mut self.kind, Kind::Empty) {
                Kind::Whole(bytes) => Some(bytes),
                _ => unreachable!("matched above"),
            },
            Kind::Hyper(h) if h.0.is_end_stream() => Some(Bytes::new()),
            Kind::Upload(_) | Kind::Hyper(_) => None,
        }
    }
}

impl RequestBody {
    /// A body hyper reads, which may stall for `stall_limit` at most, as one
    /// pillion's own server reads.
    pub(crate) fn from_hyper(body: hyper::body::Incoming, stall_limit: Duration) -> RequestBody {
        RequestBody {
            kind: Kind::Hyper(Box::new((body, Stall::new(stall_limit)))),
        }
    }
}

impl std::fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.kind {
            Kind::Empty => "empty",
            Kind::Whole(_) => "whole",
            Kind::Upload(_) => "upload",
            Kind::Hyper(_) => "hyper",
        };
        f.debug_struct("RequestBody").field("kind", &kind).finish()
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match &mut this.kind {
            Kind::Empty => Poll::Ready(None),
            Kind::Whole(_) => {
                let Kind::Whole(bytes) = std::mem::replace(&mut this.kind, Kind::Empty) else {
                    unreachable!()
                };
                Poll::Ready(Some(Ok(Frame::data(bytes))))
            }
            Kind::Upload(upload) => upload.poll_frame(cx),
            Kind::Hyper(h) => {
                let (body, stall) = &mut **h;
                match Pin::new(body).poll_frame(cx) {
                    Poll::Ready(frame) => {
                        stall.progressed();
                        Poll::Ready(frame.map(|r| r.map_err(BoxError::from)))
                    }
                    Poll::Pending => stall.poll_expired(cx).map(|why| Some(Err(why.into()))),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Empty => true,
            Kind::Whole(_) => false,
            Kind::Upload(upload) => upload.is_end_stream(),
            Kind::Hyper(h) => h.0.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Whole(b) => SizeHint::with_exact(b.len() as u64),
            Kind::Upload(upload) => upload.size_hint(),
            Kind::Hyper(h) => h.0.size_hint(),
        }
    }
}

/// Where an [`Upload`] leaves the connection's reading half when it ends or is
/// dropped, for the connection's next request, with whether the body was read to its
/// end (if not, the connection cannot go on).
type Handback = Arc<Mutex<Option<(Reader, bool)>>>;

/// A request body read from the connection as it is polled.
struct Upload {
    reader: Option<Reader>,
    remaining: BodyReader,
    handback: Handback,
    stall: Stall,
    /// `Expect: 100-continue`: set when the body is first read from the connection,
    /// so that the client is told to send it.
    continue_wanted: Option<Arc<AtomicBool>>,
}

/// How long a request body may go without a byte (`--read-body-timeout`), on either
/// server: one timer per body, armed when the body first waits and pushed back only
/// when bytes came in between, so a body read in many pieces costs no timer each.
struct Stall {
    limit: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Whether bytes came since the timer was set.
    progressed: bool,
}

impl Stall {
    fn new(limit: Duration) -> Stall {
        Stall {
            limit,
            timer: None,
            progressed: false,
        }
    }

    fn progressed(&mut self) {
        self.progressed = true;
    }

    /// The body has nothing to read now: ready, with why, once it has had nothing
    /// for the limit.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<String> {
        let limit = self.limit;
        let timer = match &mut self.timer {
            Some(timer) => {
                if std::mem::take(&mut self.progressed) {
                    timer.as_mut().reset(Instant::now() + limit);
                }
                timer
            }
            None => self.timer.insert(Box::pin(tokio::time::sleep(limit))),
        };
        ready!(timer.as_mut().poll(cx));
        Poll::Ready(format!(
            "the request body stalled for {} (--read-body-timeout)",
            pillion_core::duration::format(limit)
        ))
    }
}

impl Upload {
    fn give_back(&mut self, ended: bool) {
        if let Some(reader) = self.reader.take() {
            *self.handback.lock().unwrap_or_else(|e| e.into_inner()) = Some((reader, ended));
        }
    }

    fn fail(&mut self, why: String) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.give_back(false);
        Poll::Ready(Some(Err(why.into())))
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            let Some(reader) = self.reader.as_mut() else {
                return Poll::Ready(None);
            };
            match self.remaining.step(&mut reader.buf) {
                Ok(Step::Frame(f)) => {
                    if self.remaining.is_end() {
                        // The last bytes: the connection can go on to its next
                        // request even if this body is never polled again.
                        self.remaining = BodyReader::Done;
                        self.give_back(true);
                    }
                    return Poll::Ready(Some(Ok(f)));
                }
                Ok(Step::End) => {
                    self.give_back(true);
                    return Poll::Ready(None);
                }
                Ok(Step::NeedMore) => {}
                Err(e) => return self.fail(format!("the client sent {e}")),
            }
            if let Some(wanted) = self.continue_wanted.take() {
                wanted.store(true, Ordering::Release);
            }
            match reader.poll_fill(cx, BODY_READ_SIZE) {
                Poll::Ready(Ok(0)) => {
                    return self.fail(
                        "the client closed the connection before the request body ended".into(),
                    )
                }
                Poll::Ready(Ok(_)) => self.stall.progressed(),
                Poll::Ready(Err(e)) => return self.fail(format!("reading the request body: {e}")),
                Poll::Pending => {
                    let why = ready!(self.stall.poll_expired(cx));
                    return self.fail(why);
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.reader.is_none() || self.remaining.is_end()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.reader {
            Some(_) => self.remaining.size_hint(),
            None => SizeHint::with_exact(0),
        }
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        // Dropped with part of the body unread (an early answer).
        self.give_back(false);
    }
}

/// How long a listener's clients may take.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clocks {
    /// To send a request head, from its first byte (the first head: from the
    /// connection's start).
    pub head: Duration,
    /// Between two reads of a request body.
    pub body: Duration,
    /// Between an answer and the next request's first byte (keep-alive).
    pub idle: Duration,
}

/// The clocks, the drain and the waiting connections of one listener.
pub(crate) struct Settings<'a> {
    pub clocks: Clocks,
    pub drain: &'a Drain,
    pub idlers: &'a Arc<Idlers>,
}

/// Serves HTTP/1.1 requests on `socket` with `handle` until the connection closes,
/// or until a request comes that hyper is to serve.
pub(crate) async fn serve<F, Fut, B>(
    socket: Socket,
    settings: Settings<'_>,
    mut handle: F,
) -> Served
where
    F: FnMut(Request<RequestBody>) -> Fut,
    Fut: Future<Output = Result<Response<B>, std::convert::Infallible>>,
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let (read, mut write) = socket.split();
    let mut reader = Some(Reader {
        io: read,
        buf: BytesMut::new(),
    });
    // The first head is timed from the connection's start, the others from their
    // first byte.
    let mut wait = HeadWait {
        since: Some(Instant::now()),
        ..HeadWait::default()
    };
    let mut first = true;
    let mut keepalive = Keepalive::new(settings.clocks.idle, settings.idlers.clone());
    // The buffer the last answer's head was written from, kept for the next.
    let mut scratch = Vec::new();
    loop {
        let Some(r) = reader.as_mut() else {
            return Served::Closed;
        };
        let next =
            poll_fn(|cx| poll_head(r, &mut wait, &mut keepalive, first, &settings, cx)).await;
        let head = match next {
            Next::Head(head) => head,
            Next::Closed => return Served::Closed,
            Next::Idle(why) => {
                tracing::debug!(why, "closing an idle keep-alive connection");
                let _ = tokio::time::timeout(LINGER_TIME, write.shutdown()).await;
                return Served::Closed;
            }
            Next::TimedOut => {
                tracing::debug!(
                    limit = %pillion_core::duration::format(settings.clocks.head),
                    "a request head did not arrive in time; closing the connection"
                );
                return Served::Closed;
            }
            Next::Handover(to) => {
                let Reader { io, buf } = reader.take().expect("the reader is here");
                let joined = Joined {
                    read_ahead: buf.freeze(),
                    read: io,
                    write,
                };
                return Served::Handover(joined, to);
            }
            Next::Refused(status, detail) => {
                let res = pillion_core::ApiError::new(crate::relay::ID, status, detail)
                    .into_response()
                    .map(|s| Full::new(Bytes::from(s)));
                let asked = Asked {
                    head: false,
                    version: Version::HTTP_11,
                    close: true,
                };
                if write_response(&mut write, res, &asked, Vec::new())
                    .await
                    .0
                    .is_ok()
                {
                    if let Some(r) = reader.take() {
                        linger(r, write).await;
                    }
                }
                return Served::Closed;
            }
        };
        first = false;
        wait = HeadWait::default();
        let Head {
            request,
            framing,
            keep_alive,
            expect_continue,
        } = head;
        let mut interim = Interim {
            wanted: expect_continue.then(Arc::default),
            sent: 0,
        };
        let asked = Asked {
            head: request.method() == Method::HEAD,
            version: request.version(),
            close: !keep_alive,
        };
        let r = reader.as_mut().expect("the reader is here");
        let (body, handback) = match framing {
            Framing::Length(0) => (RequestBody::empty(), None),
            Framing::Length(n) if r.buf.len() as u64 >= n => {
                let whole = r.buf.split_to(n as usize).freeze();
                (
                    RequestBody {
                        kind: Kind::Whole(whole),
                    },
                    None,
                )
            }
            framing => {
                let handback = Handback::default();
                let upload = Upload {
                    reader: reader.take(),
                    remaining: BodyReader::new(framing),
                    handback: handback.clone(),
                    stall: Stall::new(settings.clocks.body),
                    continue_wanted: interim.wanted.clone(),
                };
                (
                    RequestBody {
                        kind: Kind::Upload(Box::new(upload)),
                    },
                    Some(handback),
                )
            }
        };
        let answered = unless_gone(
            handle(request.map(|()| body)),
            reader.as_mut(),
            &mut interim,
            &mut write,
        )
        .await;
        let res = match answered {
            Some(Ok(res)) => res,
            Some(Err(never)) => match never {},
            None => {
                tracing::debug!("the client went away before its answer; the call is cancelled");
                return Served::Closed;
            }
        };
        let asked = Asked {
            close: asked.close || settings.drain.is_draining(),
            ..asked
        };
        let buffer = std::mem::take(&mut scratch);
        let (wrote, close) = write_response(&mut write, res, &asked, buffer).await;
        let wrote = wrote.map(|buffer| scratch = buffer);
        if let Err(e) = wrote {
            tracing::debug!(error = %e, "the answer could not be written whole; closing the connection");
            return Served::Closed;
        }
        if let Some(handback) = handback {
            let back = handback.lock().unwrap_or_else(|e| e.into_inner()).take();
            match back {
                Some((r, true)) => reader = Some(r),
                // The handler left part of the body unread (an early answer).
                Some((r, _)) => {
                    linger(r, write).await;
                    return Served::Closed;
                }
                // The body lives on elsewhere, with the connection's reading half.
                None => return Served::Closed,
            }
        }
        if close {
            let _ = tokio::time::timeout(LINGER_TIME, write.shutdown()).await;
            return Served::Closed;
        }
    }
}

/// The handler's answer, or `None` if the client goes away first (it closes or
/// resets the connection; as hyper's server does by default, a half-closed
/// connection counts as gone): the answer's future is dropped then, which cancels
/// the call it makes to a node. Watched while the connection's reading half is here
/// (not streaming a body to the handler); what arrives meanwhile is the next
/// request, kept in the buffer, up to [`WATCH_LIMIT`].
///
/// `interim`: the `100 Continue` is written here, once the handler reads a body
/// whose client waits for it (the handler's future runs on this task, so it is seen
/// in the same poll).
async fn unless_gone<F: Future>(
    answer: F,
    mut reader: Option<&mut Reader>,
    interim: &mut Interim,
    write: &mut WriteSide,
) -> Option<F::Output> {
    let mut answer = pin!(answer);
    poll_fn(|cx| {
        // A `100 Continue` begun is finished before any other answer.
        if interim.begun() && ready!(interim.poll_write(write, cx)).is_err() {
            return Poll::Ready(None);
        }
        if let Poll::Ready(out) = answer.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        if interim.is_wanted() {
            if let Poll::Ready(Err(_)) = interim.poll_write(write, cx) {
                return Poll::Ready(None);
            }
        }
        if let Some(r) = reader.as_deref_mut() {
            // Costs no system call: tokio knows the socket has nothing to read.
            while r.buf.len() < WATCH_LIMIT {
                match r.poll_fill(cx, READ_SIZE) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(None),
                    Poll::Ready(Ok(_)) => {}
                    Poll::Pending => break,
                }
            }
        }
        Poll::Pending
    })
    .await
}

/// `Expect: 100-continue` (RFC 9110 10.1.1): the interim answer a client waits for
/// before it sends the body, written only when the handler reads it (an early
/// answer, such as a 413, goes without it).
struct Interim {
    /// Set by the body when it is first read; `None` when the client did not ask.
    wanted: Option<Arc<AtomicBool>>,
    /// Bytes of it written.
    sent: usize,
}

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

impl Interim {
    fn is_wanted(&self) -> bool {
        self.sent == 0
            && self
                .wanted
                .as_ref()
                .is_some_and(|w| w.load(Ordering::Acquire))
    }

    /// Partly written.
    fn begun(&self) -> bool {
        self.sent > 0 && self.sent < CONTINUE.len()
    }

    /// Writes what is left of the interim answer; ready once it is out.
    fn poll_write(&mut self, write: &mut WriteSide, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < CONTINUE.len() {
            let n = ready!(Pin::new(&mut *write).poll_write(cx, &CONTINUE[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        ready!(Pin::new(&mut *write).poll_flush(cx))?;
        Poll::Ready(Ok(()))
    }
}

/// Bytes of pipelined requests read while an answer is prepared, at most.
const WATCH_LIMIT: usize = 64 * 1024;

/// The deadline of the head being read, and how far its bytes were searched for
/// its end.
#[derive(Default)]
struct HeadWait {
    since: Option<Instant>,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    scanned: usize,
}

// The head is what nearly every poll ends with: boxed it would cost an allocation
// per request.
#[allow(clippy::large_enum_variant)]
enum Next {
    Head(Head),
    Closed,
    /// Closed between two requests, for this reason.
    Idle(&'static str),
    TimedOut,
    Handover(Handover),
    Refused(StatusCode, String),
}

/// Reads until a whole head is there and parses it. Between requests a connection
/// waits for `--idle-timeout` at most (and closes at once when the listener drains,
/// or needs its slot); a head that has begun must be whole within the read-header
/// timeout.
fn poll_head(
    reader: &mut Reader,
    wait: &mut HeadWait,
    keepalive: &mut Keepalive,
    first: bool,
    settings: &Settings<'_>,
    cx: &mut Context<'_>,
) -> Poll<Next> {
    loop {
        if !reader.buf.is_empty() {
            match parse(&mut reader.buf, first, wait.scanned) {
                Parse::Incomplete => wait.scanned = reader.buf.len(),
                Parse::Head(head) => return Poll::Ready(Next::Head(head)),
                Parse::Handover(to) => return Poll::Ready(Next::Handover(to)),
                Parse::Refused(status, detail) => {
                    return Poll::Ready(Next::Refused(status, detail))
                }
            }
        } else if settings.drain.is_draining() {
            return Poll::Ready(Next::Closed);
        }
        match reader.poll_fill(cx, READ_SIZE) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Next::Closed),
            Poll::Ready(Ok(_)) => keepalive.busy(),
            Poll::Pending => {
                if reader.buf.is_empty() && !first {
                    return keepalive.poll_wait(cx).map(Next::Idle);
                }
                // The clock is read only here, when a head has to be waited for.
                let since = *wait.since.get_or_insert_with(Instant::now);
                let limit = settings.clocks.head;
                let timer = wait
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(since + limit)));
                ready!(timer.as_mut().poll(cx));
                return Poll::Ready(Next::TimedOut);
            }
        }
    }
}

/// A parsed request head.
struct Head {
    request: Request<()>,
    framing: Framing,
    keep_alive: bool,
    /// The client waits for `100 Continue` before it sends the body.
    expect_continue: bool,
}

#[allow(clippy::large_enum_variant)] // as `Next`
enum Parse {
    Incomplete,
    Head(Head),
    Handover(Handover),
    Refused(StatusCode, String),
}

fn refused(status: StatusCode, detail: impl Into<String>) -> Parse {
    Parse::Refused(status, detail.into())
}

/// Why a head is refused: the status and what it says.
type Refusal = (StatusCode, String);

/// RFC 9112 3.2 wants exactly one `Host` in an HTTP/1.1 request (none is allowed in
/// HTTP/1.0, never two): two could be read differently by pillion and the app
/// behind it. Why a request with `hosts` of them is refused, if it is.
pub(crate) fn host_rule(version: Version, hosts: usize) -> Option<&'static str> {
    match (version, hosts) {
        (_, n) if n > 1 => Some("the request has more than one Host header"),
        (Version::HTTP_11, 0) => Some("the request has no Host header (HTTP/1.1 requires one)"),
        _ => None,
    }
}

/// What the framing fields of a head say.
#[derive(Default)]
struct Fields {
    hosts: usize,
    framing: framing::Fields,
    close: bool,
    keep_alive: bool,
    upgrade: bool,
    /// `Expect: 100-continue`.
    expect_continue: bool,
    /// The client sent an identity header of its own (see [`pillion_core::IDENTITY_HEADERS`]).
    identity: bool,
}

impl Fields {
    fn read(&mut self, name: &[u8], value: &[u8]) -> Result<(), Refusal> {
        if self.framing.read(name, value).map_err(refusal)? {
            return Ok(());
        }
        match name.len() {
            10 if name.eq_ignore_ascii_case(b"connection") => {
                for token in value.split(|&b| b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        self.close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        self.keep_alive = true;
                    }
                }
            }
            4 if name.eq_ignore_ascii_case(b"host") => self.hosts += 1,
            16 | 17
                if pillion_core::IDENTITY_HEADERS
                    .iter()
                    .any(|h| name.eq_ignore_ascii_case(h.as_bytes())) =>
            {
                self.identity = true
            }
            7 if name.eq_ignore_ascii_case(b"upgrade") => self.upgrade = true,
            6 if name.eq_ignore_ascii_case(b"expect")
                && value.trim_ascii().eq_ignore_ascii_case(b"100-continue") =>
            {
                self.expect_continue = true
            }
            _ => {}
        }
        Ok(())
    }
}

/// A request refused for its framing, with the status the rule gives.
fn refusal(e: framing::FramingError) -> Refusal {
    (e.status(), format!("the request has {e}"))
}

/// Whether `buf` may hold the end of a head (an empty line) after its first `from`
/// bytes, which were searched before: a head that arrives a byte at a time is not
/// searched again from its start each time.
fn may_end_head(buf: &[u8], from: usize) -> bool {
    let from = from.saturating_sub(2);
    buf[from..]
        .iter()
        .enumerate()
        .filter(|(_, &b)| b == b'\n')
        .any(|(i, _)| matches!(&buf[from + i + 1..], [b'\n', ..] | [b'\r', b'\n', ..]))
}

/// Parses the request head at the front of `buf`, taking it off the buffer when it
/// is whole. `scanned`: see [`may_end_head`].
fn parse(buf: &mut BytesMut, first: bool, scanned: usize) -> Parse {
    if first && buf.starts_with(&H2_PREFACE[..buf.len().min(3)]) {
        // h2c with prior knowledge (or a request whose method starts with "PRI").
        if buf.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(buf) {
            return Parse::Incomplete;
        }
        if buf.starts_with(H2_PREFACE) {
            return Parse::Handover(Handover::Http2);
        }
    }
    parse_head(buf, scanned)
}

fn head_too_large() -> Parse {
    refused(
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        format!("the request head is larger than {} KiB", MAX_HEAD / 1024),
    )
}

fn parse_head(buf: &mut BytesMut, scanned: usize) -> Parse {
    if !may_end_head(buf, scanned) {
        if buf.len() > MAX_HEAD {
            return head_too_large();
        }
        return Parse::Incomplete;
    }
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut fields) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => return head_too_large(),
        Ok(httparse::Status::Partial) => return Parse::Incomplete,
        Err(httparse::Error::TooManyHeaders) => {
            return refused(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                format!("the request has more than {MAX_HEADERS} header fields"),
            )
        }
        Err(e) => {
            return refused(
                StatusCode::BAD_REQUEST,
                format!("the request is not valid HTTP/1.1: {e}"),
            )
        }
    };
    if len > MAX_HEAD {
        return head_too_large();
    }
    if bare_lf(&buf[..len]).is_some() {
        return refused(StatusCode::BAD_REQUEST, super::codec::BARE_LF);
    }
    let method = req.method.unwrap_or_default();
    if method == "CONNECT" {
        return refused(
            StatusCode::METHOD_NOT_ALLOWED,
            "CONNECT is not served: pillion is not a forward proxy",
        );
    }
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return refused(StatusCode::BAD_REQUEST, "the request method is not valid");
    };
    let version = match req.version {
        Some(1) => Version::HTTP_11,
        _ => Version::HTTP_10,
    };
    let mut fields = Fields::default();
    for f in req.headers.iter() {
        if let Err((status, detail)) = fields.read(f.name.as_bytes(), f.value) {
            return Parse::Refused(status, detail);
        }
    }
    let base = buf.as_ptr() as usize;
    if let Some(why) = host_rule(version, fields.hosts) {
        return refused(StatusCode::BAD_REQUEST, why);
    }
    let target = req.path.unwrap_or("/");
    let target_at = target.as_ptr() as usize - base;
    let target_span = (target_at, target_at + target.len());
    let encoded = super::codec::encode_target(target.as_bytes());
    let framing = match fields.framing.decide(Role::Request, version) {
        Ok((framing, _)) => framing,
        Err(e) => {
            let (status, detail) = refusal(e);
            return Parse::Refused(status, detail);
        }
    };
    if fields.upgrade && framing == Framing::Length(0) {
        // Checked like any head, and hyper is given it whole (its target encoded as
        // pillion's own requests' are): its answer decides whether the connection
        // leaves HTTP (101) or closes.
        if let Some(encoded) = encoded {
            let rest = buf.split_off(target_span.1);
            buf.truncate(target_span.0);
            buf.extend_from_slice(&encoded);
            buf.extend_from_slice(&rest);
        }
        return Parse::Handover(Handover::Upgrade);
    }
    let (mut inline, mut heap) = ([(0, 0, 0, 0); INLINE_SPANS], Vec::new());
    let spans = spans(base, req.headers, &mut inline, &mut heap);
    let head = buf.split_to(len).freeze();
    let target = &head[target_span.0..target_span.1];
    let uri = match encoded {
        None => Uri::from_maybe_shared(head.slice(target_span.0..target_span.1)),
        Some(encoded) => Uri::try_from(encoded),
    };
    let Ok(uri) = uri else {
        return refused(
            StatusCode::BAD_REQUEST,
            format!(
                "the request-target {:?} is not a valid URI",
                String::from_utf8_lossy(target)
            ),
        );
    };
    // Room for what a forwarded request gains (the hop, the trace context).
    let headers = match header_map(&head, spans, 4) {
        Ok(h) => h,
        Err(e) => return refused(StatusCode::BAD_REQUEST, format!("the request has {e}")),
    };
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    if fields.identity {
        // Found while the fields were read: most requests pay no lookup for it.
        pillion_core::remove_identity(request.headers_mut());
    }
    if fields.upgrade {
        // An upgrade with a body: ignored (RFC 9110 7.8 lets a server stay), so that
        // no handler answers 101 on a connection whose body pillion is reading.
        request.headers_mut().remove(header::UPGRADE);
    }
    let keep_alive = match version {
        Version::HTTP_11 => !fields.close,
        _ => fields.keep_alive && !fields.close,
    };
    Parse::Head(Head {
        request,
        framing,
        keep_alive,
        expect_continue: fields.expect_continue && version == Version::HTTP_11,
    })
}

/// What the request said that shapes its answer.
struct Asked {
    /// A HEAD request: the answer has no body.
    head: bool,
    version: Version,
    /// The connection closes after this answer.
    close: bool,
}

/// Writes the answer (its head from `buffer`); whether it was written whole (then
/// the buffer, for the next), and whether the connection is to close after it.
async fn write_response<B>(
    write: &mut WriteSide,
    res: Response<B>,
    asked: &Asked,
    buffer: Vec<u8>,
) -> (Result<Vec<u8>, String>, bool)
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let (parts, body) = res.into_parts();
    let (head, length, close) = response_head(&parts, body.size_hint(), asked, buffer);
    drop(parts);
    let mut writer = Writer::new(head, body, length);
    let wrote = poll_fn(|cx| writer.poll_write(write, cx)).await;
    let wrote = wrote.map(|()| writer.into_buffer()).map_err(|e| match e {
        super::codec::WriteError::Io(e) => format!("writing the answer: {e}"),
        super::codec::WriteError::Body(e) => format!("the answer's body failed: {e}"),
    });
    (wrote, close)
}

/// The answer's head, how its body is framed, and whether the connection closes
/// after it. The framing fields are pillion's (from the body's own length); the
/// handler's `Connection` is read for `close` and replaced.
fn response_head(
    parts: &http::response::Parts,
    hint: SizeHint,
    asked: &Asked,
    mut head: Vec<u8>,
) -> (Vec<u8>, Length, bool) {
    let status = parts.status;
    let mut close = asked.close;
    let no_body = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let length = if asked.head || no_body {
        Length::None
    } else if let Some(n) = hint.exact() {
        Length::Exact(n)
    } else if asked.version == Version::HTTP_11 {
        Length::Chunked
    } else {
        close = true;
        Length::Close
    };
    // A HEAD or 304 answer keeps the length the body would have had; a 204 and a
    // 1xx have none.
    let own_framing = length != Length::None || no_body && status != StatusCode::NOT_MODIFIED;
    head.reserve(96 + 40 * parts.headers.len());
    if status == StatusCode::OK {
        head.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        head.extend_from_slice(b"HTTP/1.1 ");
        head.extend_from_slice(status.as_str().as_bytes());
        head.push(b' ');
        head.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    let mut dated = false;
    for (name, value) in &parts.headers {
        if name == header::CONNECTION {
            close |= value
                .as_bytes()
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
            continue;
        }
        if own_framing && (name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING) {
            continue;
        }
        dated |= name == header::DATE;
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    if !dated {
        head.extend_from_slice(b"date: ");
        date::now(&mut head);
        head.extend_from_slice(b"\r\n");
    }
    if close {
        head.extend_from_slice(b"connection: close\r\n");
    } else if asked.version == Version::HTTP_10 {
        head.extend_from_slice(b"connection: keep-alive\r\n");
    }
    (head, length, close)
}

/// Ends a connection whose client may still be sending: the answer is out, the
/// writing side is shut, and what arrives is read and dropped for a moment, so that
/// closing with unread bytes does not reset the connection before the client has
/// read the answer.
async fn linger(mut reader: Reader, mut write: WriteSide) {
    let _ = tokio::time::timeout(LINGER_TIME, async move {
        let _ = write.shutdown().await;
        let mut dropped = 0;
        while dropped < LINGER_BYTES {
            reader.buf.clear();
            match poll_fn(|cx| reader.poll_fill(cx, BODY_READ_SIZE)).await {
                Ok(0) | Err(_) => break,
                Ok(n) => dropped += n,
            }
        }
    })
    .await;
}

/// The `Date` of answers that have none, formatted once a second per thread.
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }

    pub(super) fn now(out: &mut Vec<u8>) {
        let now = SystemTime::now();
        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        CACHED.with(|c| {
            let mut c = c.borrow_mut();
            if c.0 != secs {
                *c = (secs, httpdate::fmt_http_date(now));
            }
            out.extend_from_slice(c.1.as_bytes());
        });
    }
}

#[cfg(test)]
mod tests;
