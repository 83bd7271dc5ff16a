//! HTTP/1.1 to a node, spoken on the caller's task.
//!
//! hyper's client runs every connection in a task of its own and hands the request,
//! the response and each body chunk across channels; for the small requests a
//! sidecar mostly carries, those hand-offs cost more than HTTP itself. Here the task
//! that makes the call writes the request and reads the answer's head; the response
//! body, polled by whoever relays it to the caller, reads the rest from the socket
//! and, once it has ended, puts the connection back in the pool.
//!
//! The request body is written by the same polls that read the answer, so a node
//! that answers while it still reads (an echo, an early 413) neither deadlocks nor
//! loses its answer.
//!
//! Framing follows RFC 9112: a response to HEAD, 1xx, 204 and 304 has no body;
//! `Transfer-Encoding: chunked` wins over `Content-Length`; otherwise the body runs
//! to the end of the connection, which is then not reused. Interim 1xx answers are
//! skipped; 101 hands the connection over as a tunnel when an upgrade was asked for.

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice, Write as _};
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWrite};

use crate::pool::{Outgoing, Pool, Slot};
use crate::stream::Stream;
use crate::{BoxError, SendError};

/// Header fields in a response head, as hyper allows.
const MAX_HEADERS: usize = 100;
/// A response head (or a chunk's trailers) larger than this is refused.
const MAX_HEAD: usize = 64 * 1024;
/// Bytes read per system call, at least.
const READ_SIZE: usize = 8 * 1024;
/// A request body up to this size goes out in the same write as the head.
const COALESCE: usize = 16 * 1024;

/// An open connection to a node, with what was read from it and not yet used.
pub struct Conn {
    io: Stream,
    buf: BytesMut,
    _slot: Slot,
}

impl Conn {
    pub(crate) fn new(io: Stream, slot: Slot) -> Conn {
        Conn {
            io,
            buf: BytesMut::new(),
            _slot: slot,
        }
    }

    /// Whether an idle connection can take a request: still open, nothing unasked
    /// for waiting on it. Costs no system call unless the socket became readable.
    /// (A close the node sends while the request is on its way cannot be seen here;
    /// that request fails as sent, and is retried if it may be.)
    pub(crate) fn is_usable(&mut self) -> bool {
        self.io.is_idle_open()
    }

    /// Reads more from the node into the buffer; `Ok(0)` is the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < READ_SIZE / 4 {
            self.buf.reserve(READ_SIZE);
        }
        // tokio's read clears the socket's readiness after a short read, so the
        // usability check of an idle connection stays free.
        pin!(self.io.read_buf(&mut self.buf)).poll(cx)
    }
}

/// A connection handed over after `101 Switching Protocols`, with any bytes the node
/// sent after its answer.
pub struct Upgraded {
    pub io: Stream,
    pub read_ahead: Bytes,
}

/// Sends `req` on `conn` and waits for the answer's head. Every error here may come
/// after the node saw (part of) the request.
pub(crate) fn send(
    conn: Conn,
    req: Request<Outgoing>,
    pool: Arc<Pool>,
) -> impl Future<Output = Result<Response<ResponseBody>, SendError>> + Send {
    // The request is encoded before the future is made, so the future holds only
    // the exchange (it is moved with every call).
    let (parts, body) = req.into_parts();
    let head_only = parts.method == Method::HEAD;
    let upgrade = parts.headers.contains_key(header::UPGRADE);
    let writer = Writer::new(&parts, body);
    drop(parts);
    let mut exchange = Exchange {
        conn,
        write: Write::Writing(writer),
        framing: Framing::Empty,
        keep_alive: false,
        pool,
        interim: 0,
    };
    async move {
        // Let the other connections with a request ready read theirs first, so the
        // node gets them in a burst and wakes up once for several (haproxy defers
        // its sends to the end of its loop for the same reason). Measured with wrk
        // -c32: about 0.5 us less CPU per request for pillion, and as much for the
        // node and for the caller each.
        tokio::task::yield_now().await;
        let mut head = std::future::poll_fn(|cx| exchange.poll_head(cx)).await?;
        let (framing, keep_alive) = accept_head(&mut head, &exchange.conn.buf, head_only, upgrade)
            .map_err(SendError::Protocol)?;
        exchange.framing = framing;
        exchange.keep_alive = keep_alive;
        let mut body = ResponseBody {
            exchange: Some(exchange),
        };
        body.settle();
        let mut res = Response::new(body);
        *res.status_mut() = head.status;
        *res.version_mut() = head.version;
        *res.headers_mut() = head.headers;
        Ok(res)
    }
}

struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
}

enum Write {
    Writing(Writer),
    Done,
    /// The node stopped taking the request (it may have answered already).
    Failed(io::Error),
}

struct Exchange {
    conn: Conn,
    write: Write,
    framing: Framing,
    keep_alive: bool,
    pool: Arc<Pool>,
    /// Interim (1xx) answers skipped so far.
    interim: u32,
}

/// Interim answers (100 Continue, 103 Early Hints) allowed before the answer.
const MAX_INTERIM: u32 = 16;

impl Exchange {
    /// Moves the request body along; an error of the body itself is returned, a
    /// write error only recorded (the answer may still be there to read).
    fn poll_write_side(&mut self, cx: &mut Context<'_>) -> Result<(), SendError> {
        if let Write::Writing(w) = &mut self.write {
            match w.poll_write(&mut self.conn.io, cx) {
                Poll::Pending => {}
                Poll::Ready(Ok(())) => self.write = Write::Done,
                Poll::Ready(Err(WriteError::Io(e))) => self.write = Write::Failed(e),
                Poll::Ready(Err(WriteError::Body(e))) => return Err(e),
            }
        }
        Ok(())
    }

    fn poll_head(&mut self, cx: &mut Context<'_>) -> Poll<Result<Head, SendError>> {
        loop {
            self.poll_write_side(cx)?;
            if let Some(head) =
                next_head(&mut self.conn.buf, &mut self.interim).map_err(SendError::Protocol)?
            {
                return Poll::Ready(Ok(head));
            }
            match ready!(self.conn.poll_fill(cx)) {
                Ok(0) => {
                    let write = std::mem::replace(&mut self.write, Write::Done);
                    return Poll::Ready(Err(match write {
                        Write::Failed(e) => SendError::Write(e),
                        _ => SendError::Closed,
                    }));
                }
                Ok(_) => {}
                Err(e) => return Poll::Ready(Err(SendError::Read(e))),
            }
        }
    }
}

/// The answer's head from the front of `buf`, skipping interim answers (100
/// Continue and the like, counted in `interim`); a node that sends them without end
/// is refused rather than read until the deadline. `None` until a whole head is there.
fn next_head(buf: &mut BytesMut, interim: &mut u32) -> Result<Option<Head>, String> {
    loop {
        match parse_head(buf)? {
            Some(head) if head.status.is_informational() && head.status.as_u16() != 101 => {
                *interim += 1;
                if *interim > MAX_INTERIM {
                    return Err(format!(
                        "the node sent more than {MAX_INTERIM} interim (1xx) answers"
                    ));
                }
            }
            other => return Ok(other),
        }
    }
}

/// The framing of the answer whose `head` was read, with what follows it in `buf`.
/// Chunked framing wins over a Content-Length (RFC 9112 6.3), which is then removed:
/// it is not the body's and must not reach the caller. A first chunk size that came
/// with the head is checked now, so a broken one is a 502 rather than a 200 whose
/// body breaks at once.
fn accept_head(
    head: &mut Head,
    buf: &[u8],
    head_only: bool,
    upgrade: bool,
) -> Result<(Framing, bool), String> {
    let (framing, keep_alive) = framing(head, head_only, upgrade)?;
    if matches!(framing, Framing::Chunked(_)) {
        head.headers.remove(header::CONTENT_LENGTH);
        if let Some(end) = line_end(buf)? {
            chunk_size(&buf[..end])?;
        }
    }
    Ok((framing, keep_alive))
}

/// How the response body is delimited.
enum Framing {
    Empty,
    Length(u64),
    Chunked(Chunked),
    /// Until the node closes the connection.
    Close,
    /// `101 Switching Protocols`: the connection is the caller's now.
    Upgrade,
}

fn framing(head: &Head, head_only: bool, upgrade: bool) -> Result<(Framing, bool), String> {
    let h = &head.headers;
    let has_token = |token: &str| {
        h.get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    let mut keep_alive = match head.version {
        Version::HTTP_11 => !has_token("close"),
        _ => has_token("keep-alive"),
    };
    if head.status == StatusCode::SWITCHING_PROTOCOLS {
        return if upgrade {
            Ok((Framing::Upgrade, false))
        } else {
            Err("the node switched protocols without being asked to".into())
        };
    }
    if head_only || head.status == StatusCode::NO_CONTENT || head.status == StatusCode::NOT_MODIFIED
    {
        return Ok((Framing::Empty, keep_alive));
    }
    if h.contains_key(header::TRANSFER_ENCODING) {
        let mut codings: Vec<&str> = Vec::new();
        for v in h.get_all(header::TRANSFER_ENCODING) {
            let v = v
                .to_str()
                .map_err(|_| "the node sent an unreadable Transfer-Encoding".to_string())?;
            codings.extend(v.split(',').map(str::trim));
        }
        // An empty element (`chunked,`), or chunked twice, frames the body in a way
        // another reader could take differently: refused.
        if codings.iter().any(|c| c.is_empty()) {
            return Err("the node sent an empty element in Transfer-Encoding".into());
        }
        if codings.len() > 1 {
            return Err(format!(
                "the node sent the transfer codings {codings:?}; only one chunked is supported"
            ));
        }
        // Only `chunked` is undone here; any other coding would reach the caller
        // undecoded and unlabelled (Transfer-Encoding is hop-by-hop).
        if let Some(other) = codings.iter().find(|c| !c.eq_ignore_ascii_case("chunked")) {
            return Err(format!(
                "the node used the transfer coding {other:?}; only chunked is supported"
            ));
        }
        // RFC 9112 6.1 and 6.3: with Content-Length too, or in HTTP/1.0, the framing is
        // suspect: read it as chunked, then close.
        if h.contains_key(header::CONTENT_LENGTH) || head.version != Version::HTTP_11 {
            keep_alive = false;
        }
        return Ok((Framing::Chunked(Chunked::Size), keep_alive));
    }
    let mut length = None;
    for v in h.get_all(header::CONTENT_LENGTH) {
        for part in v.to_str().unwrap_or("x").split(',') {
            let part = part.trim();
            let n: u64 = part
                .bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| part.parse().ok())
                .flatten()
                .ok_or_else(|| format!("the node sent an invalid Content-Length {v:?}"))?;
            if length.is_some_and(|l| l != n) {
                return Err("the node sent different Content-Length values".into());
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(n) => (Framing::Length(n), keep_alive),
        None => (Framing::Close, false),
    })
}

/// Parses a response head at the start of `buf` and removes it; `None` until the
/// head is all there.
fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, String> {
    if buf.is_empty() {
        return Ok(None);
    }
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut fields);
    let len = match res.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err(format!(
                "the node's response head is larger than {} KiB",
                MAX_HEAD / 1024
            ))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("the node sent an invalid response: {e}")),
    };
    let status = StatusCode::from_u16(res.code.unwrap_or(0))
        .map_err(|_| "the node sent an invalid status code".to_string())?;
    let version = if res.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    // Remember where each field is, then share the head's bytes with the values
    // instead of copying them.
    let base = buf.as_ptr() as usize;
    let mut spans = [(0usize, 0usize, 0usize, 0usize); MAX_HEADERS];
    let count = res.headers.len();
    for (span, f) in spans.iter_mut().zip(res.headers.iter()) {
        *span = field_span(base, f);
    }
    let head = buf.split_to(len).freeze();
    let headers = header_map(&head, &spans[..count])?;
    Ok(Some(Head {
        status,
        version,
        headers,
    }))
}

/// Where a parsed field's name and value are, as offsets from `base` (the address
/// of the buffer it was parsed from).
fn field_span(base: usize, f: &httparse::Header<'_>) -> (usize, usize, usize, usize) {
    let name = f.name.as_ptr() as usize - base;
    let value = f.value.as_ptr() as usize - base;
    (name, name + f.name.len(), value, value + f.value.len())
}

fn header_map(head: &Bytes, spans: &[(usize, usize, usize, usize)]) -> Result<HeaderMap, String> {
    let mut headers = HeaderMap::with_capacity(spans.len());
    for &(ns, ne, vs, ve) in spans {
        let name = HeaderName::from_bytes(&head[ns..ne])
            .map_err(|_| "the node sent an invalid header name".to_string())?;
        let value = HeaderValue::from_maybe_shared(head.slice(vs..ve))
            .map_err(|_| format!("the node sent an invalid value for {name}"))?;
        headers.append(name, value);
    }
    Ok(headers)
}

/// Where a chunked body's decoder is.
enum Chunked {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
    Done,
}

enum Decoded {
    Frame(Frame<Bytes>),
    NeedMore,
    End,
}

impl Chunked {
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, String> {
        loop {
            match self {
                Chunked::Size => {
                    let Some(end) = line_end(buf)? else {
                        if buf.len() > 1024 {
                            return Err("the node sent a chunk size line over 1 KiB".into());
                        }
                        return Ok(Decoded::NeedMore);
                    };
                    let size = chunk_size(&buf[..end])?;
                    buf.advance(end + 2);
                    *self = if size == 0 {
                        Chunked::Trailers
                    } else {
                        Chunked::Data(size)
                    };
                }
                Chunked::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let data = take(buf, left);
                    if *left == 0 {
                        *self = Chunked::DataEnd;
                    }
                    return Ok(Decoded::Frame(Frame::data(data)));
                }
                Chunked::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err("the node sent a chunk longer than its size".into());
                    }
                    buf.advance(2);
                    *self = Chunked::Size;
                }
                Chunked::Done => return Ok(Decoded::End),
                Chunked::Trailers => {
                    if buf.starts_with(b"\r\n") {
                        buf.advance(2);
                        *self = Chunked::Done;
                        return Ok(Decoded::End);
                    }
                    let end = buf.windows(4).position(|w| w == b"\r\n\r\n");
                    let block = end.map_or(&buf[..], |e| &buf[..e + 4]);
                    if bare_lf(block).is_some() {
                        return Err("the node ended a trailer line with a bare LF".into());
                    }
                    let Some(end) = end else {
                        if buf.len() > MAX_HEAD {
                            return Err("the node's trailers are too large".into());
                        }
                        return Ok(Decoded::NeedMore);
                    };
                    let block = buf.split_to(end + 4).freeze();
                    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    let parsed = match httparse::parse_headers(&block, &mut fields) {
                        Ok(httparse::Status::Complete((_, parsed))) => parsed,
                        _ => return Err("the node sent invalid trailers".into()),
                    };
                    let base = block.as_ptr() as usize;
                    let spans: Vec<_> = parsed.iter().map(|f| field_span(base, f)).collect();
                    let trailers = header_map(&block, &spans)?;
                    *self = Chunked::Done;
                    return Ok(Decoded::Frame(Frame::trailers(trailers)));
                }
            }
        }
    }
}

/// Up to `left` bytes of body from the front of `buf`, counted off `left`.
fn take(buf: &mut BytesMut, left: &mut u64) -> Bytes {
    let n = (*left).min(buf.len() as u64) as usize;
    *left -= n as u64;
    buf.split_to(n).freeze()
}

/// The end of the first line of `buf` (the index of its CR), once a whole line is
/// there; a line ended by a bare LF is an error (a reader accepting it would frame
/// the body differently from one that does not).
fn line_end(buf: &[u8]) -> Result<Option<usize>, String> {
    match buf.iter().position(|&b| b == b'\n') {
        None => Ok(None),
        Some(i) if i > 0 && buf[i - 1] == b'\r' => Ok(Some(i - 1)),
        Some(_) => Err("the node ended a chunk size line with a bare LF".into()),
    }
}

/// The first LF of `buf` that has no CR before it.
fn bare_lf(buf: &[u8]) -> Option<usize> {
    buf.iter()
        .enumerate()
        .position(|(i, &b)| b == b'\n' && (i == 0 || buf[i - 1] != b'\r'))
}

/// A chunk size line (RFC 9112 7.1): hex digits, then optional whitespace and
/// extensions.
fn chunk_size(line: &[u8]) -> Result<u64, String> {
    let digits = line
        .split(|&b| b == b';' || b == b' ' || b == b'\t')
        .next()
        .unwrap_or(b"");
    std::str::from_utf8(digits)
        .ok()
        .filter(|s| !s.is_empty() && s.len() <= 16 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .and_then(|s| u64::from_str_radix(s, 16).ok())
        .ok_or_else(|| "the node sent an invalid chunk size".to_string())
}

/// The node's response body; it owns the connection until the body ends, then gives
/// it back to the pool (or closes it, when it cannot carry another request).
pub struct ResponseBody {
    exchange: Option<Exchange>,
}

impl ResponseBody {
    /// Ends the exchange now if nothing is left to read, so the connection is free
    /// for the next request as early as possible.
    fn settle(&mut self) {
        if self.is_end_stream() {
            self.finish();
        }
    }

    fn finish(&mut self) {
        let Some(ex) = self.exchange.take() else {
            return;
        };
        let reusable = ex.keep_alive && matches!(ex.write, Write::Done) && ex.conn.buf.is_empty();
        if reusable {
            ex.pool.checkin(ex.conn);
        }
    }

    /// The connection, after `101 Switching Protocols`.
    pub fn take_upgrade(&mut self) -> Option<Upgraded> {
        match &self.exchange {
            // The whole request must have gone before the tunnel takes over.
            Some(Exchange {
                framing: Framing::Upgrade,
                write: Write::Done,
                ..
            }) => {}
            _ => return None,
        }
        let ex = self.exchange.take()?;
        let Conn { io, buf, .. } = ex.conn;
        Some(Upgraded {
            io,
            read_ahead: buf.freeze(),
        })
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let Some(ex) = this.exchange.as_mut() else {
            return Poll::Ready(None);
        };
        if let Err(e) = ex.poll_write_side(cx) {
            this.exchange = None;
            return Poll::Ready(Some(Err(e.into())));
        }
        loop {
            let buf = &mut ex.conn.buf;
            let frame = match &mut ex.framing {
                Framing::Empty | Framing::Upgrade | Framing::Length(0) => None,
                Framing::Length(left) if !buf.is_empty() => Some(Frame::data(take(buf, left))),
                Framing::Close if !buf.is_empty() => Some(Frame::data(buf.split().freeze())),
                Framing::Chunked(state) => match state.decode(buf) {
                    Ok(Decoded::Frame(f)) => Some(f),
                    Ok(Decoded::End) => None,
                    Ok(Decoded::NeedMore) => Some(Frame::data(Bytes::new())), // read below
                    Err(e) => {
                        this.exchange = None;
                        return Poll::Ready(Some(Err(e.into())));
                    }
                },
                Framing::Length(_) | Framing::Close => Some(Frame::data(Bytes::new())),
            };
            match frame {
                None => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Some(f) if f.data_ref().is_none_or(|d| !d.is_empty()) => {
                    this.settle();
                    return Poll::Ready(Some(Ok(f)));
                }
                Some(_) => {}
            }
            // Nothing buffered: read more.
            match ready!(ex.conn.poll_fill(cx)) {
                Ok(0) if matches!(ex.framing, Framing::Close) => {
                    ex.keep_alive = false;
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    this.exchange = None;
                    return Poll::Ready(Some(Err(
                        "the node closed the connection before the response body ended".into(),
                    )));
                }
                Ok(_) => {}
                Err(e) => {
                    this.exchange = None;
                    return Poll::Ready(Some(
                        Err(format!("reading the response body: {e}").into()),
                    ));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.exchange {
            None => true,
            Some(ex) => matches!(
                ex.framing,
                Framing::Empty | Framing::Length(0) | Framing::Chunked(Chunked::Done)
            ),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.exchange {
            None => SizeHint::with_exact(0),
            Some(ex) => match ex.framing {
                Framing::Empty | Framing::Upgrade => SizeHint::with_exact(0),
                Framing::Length(n) => SizeHint::with_exact(n),
                _ => SizeHint::default(),
            },
        }
    }
}

enum WriteError {
    Io(io::Error),
    /// The caller's body failed or had the wrong length.
    Body(SendError),
}

/// Writes a request: the head, then the body as it comes (chunked when its length
/// is not known). The length sent is the body's own (its size hint), never a
/// header's, and the bytes written are counted against it: a body that turns out
/// longer or shorter aborts the exchange instead of desynchronising the connection.
struct Writer {
    queue: VecDeque<Bytes>,
    body: Option<Outgoing>,
    chunked: bool,
    /// For a streamed body with a length: the length sent and the bytes so far.
    declared: u64,
    written: u64,
}

impl Writer {
    fn new(parts: &http::request::Parts, body: Outgoing) -> Writer {
        let mut head = Vec::with_capacity(256);
        head.extend_from_slice(parts.method.as_str().as_bytes());
        head.push(b' ');
        head.extend_from_slice(
            parts
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .as_bytes(),
        );
        head.extend_from_slice(b" HTTP/1.1\r\n");
        for (name, value) in &parts.headers {
            if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
                continue;
            }
            head.extend_from_slice(name.as_str().as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        let mut queue = VecDeque::with_capacity(4);
        let mut chunked = false;
        let mut declared = 0;
        let body = match body {
            Outgoing::Full(bytes) => {
                let len = bytes.as_ref().map_or(0, |b| b.len());
                if len > 0 || matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) {
                    let _ = write!(head, "content-length: {len}\r\n");
                }
                head.extend_from_slice(b"\r\n");
                match bytes {
                    Some(b) if b.len() <= COALESCE => head.extend_from_slice(&b),
                    Some(b) => {
                        queue.push_back(Bytes::from(std::mem::take(&mut head)));
                        queue.push_back(b);
                    }
                    None => {}
                }
                None
            }
            Outgoing::Stream(stream, filter) => {
                match stream.size_hint().exact() {
                    Some(n) => {
                        declared = n;
                        let _ = write!(head, "content-length: {n}\r\n");
                    }
                    None => {
                        chunked = true;
                        head.extend_from_slice(b"transfer-encoding: chunked\r\n");
                    }
                }
                head.extend_from_slice(b"\r\n");
                Some(Outgoing::Stream(stream, filter))
            }
        };
        if !head.is_empty() {
            queue.push_front(Bytes::from(head));
        }
        Writer {
            queue,
            body,
            chunked,
            declared,
            written: 0,
        }
    }

    fn length_error(&self) -> WriteError {
        WriteError::Body(SendError::BodyLength {
            declared: self.declared,
            written: self.written,
        })
    }

    fn poll_write(
        &mut self,
        io: &mut Stream,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), WriteError>> {
        loop {
            while !self.queue.is_empty() {
                let mut slices = [IoSlice::new(&[]); 4];
                let n = slices.len().min(self.queue.len());
                for (slice, b) in slices.iter_mut().zip(self.queue.iter()) {
                    *slice = IoSlice::new(b);
                }
                let written = ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices[..n]))
                    .map_err(WriteError::Io)?;
                if written == 0 {
                    return Poll::Ready(Err(WriteError::Io(io::ErrorKind::WriteZero.into())));
                }
                let mut left = written;
                while left > 0 {
                    let front = &mut self.queue[0];
                    if front.len() <= left {
                        left -= front.len();
                        self.queue.pop_front();
                    } else {
                        front.advance(left);
                        left = 0;
                    }
                }
            }
            let Some(body) = self.body.as_mut() else {
                // What TLS still holds goes out too (a no-op on plain TCP).
                ready!(Pin::new(&mut *io).poll_flush(cx)).map_err(WriteError::Io)?;
                return Poll::Ready(Ok(()));
            };
            let frame = match Pin::new(body).poll_frame(cx) {
                Poll::Ready(frame) => frame,
                Poll::Pending => {
                    // The body waits for its caller: what was written must not wait
                    // in a TLS buffer meanwhile.
                    if let Poll::Ready(Err(e)) = Pin::new(&mut *io).poll_flush(cx) {
                        return Poll::Ready(Err(WriteError::Io(e)));
                    }
                    return Poll::Pending;
                }
            };
            match frame {
                None => {
                    self.body = None;
                    if self.chunked {
                        self.queue.push_back(Bytes::from_static(b"0\r\n\r\n"));
                    } else if self.written != self.declared {
                        return Poll::Ready(Err(self.length_error()));
                    }
                }
                Some(Err(e)) => return Poll::Ready(Err(WriteError::Body(SendError::from_body(e)))),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if data.is_empty() => {}
                    Ok(data) if self.chunked => {
                        self.queue
                            .push_back(Bytes::from(format!("{:x}\r\n", data.len())));
                        self.queue.push_back(data);
                        self.queue.push_back(Bytes::from_static(b"\r\n"));
                    }
                    Ok(data) => {
                        self.written += data.len() as u64;
                        if self.written > self.declared {
                            return Poll::Ready(Err(self.length_error()));
                        }
                        self.queue.push_back(data)
                    }
                    Err(frame) => {
                        if let (Ok(trailers), true) = (frame.into_trailers(), self.chunked) {
                            let mut block = b"0\r\n".to_vec();
                            for (name, value) in &trailers {
                                block.extend_from_slice(name.as_str().as_bytes());
                                block.extend_from_slice(b": ");
                                block.extend_from_slice(value.as_bytes());
                                block.extend_from_slice(b"\r\n");
                            }
                            block.extend_from_slice(b"\r\n");
                            self.queue.push_back(Bytes::from(block));
                            self.chunked = false; // the last chunk is written
                            self.body = None;
                        }
                    }
                },
            }
        }
    }
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8]) -> Result<(Vec<u8>, Option<HeaderMap>, bool), String> {
        let mut buf = BytesMut::from(input);
        let mut state = Chunked::Size;
        let mut data = Vec::new();
        let mut trailers = None;
        loop {
            match state.decode(&mut buf)? {
                Decoded::Frame(f) => match f.into_data() {
                    Ok(d) => data.extend_from_slice(&d),
                    Err(f) => trailers = f.into_trailers().ok(),
                },
                Decoded::End => return Ok((data, trailers, true)),
                Decoded::NeedMore => return Ok((data, trailers, false)),
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_with_extensions_and_trailers() {
        let (data, trailers, ended) =
            decode_all(b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\n\r\n").unwrap();
        assert_eq!(data, b"hello world");
        assert!(trailers.is_none() && ended);

        let (data, trailers, ended) =
            decode_all(b"3\r\nabc\r\n0\r\ngrpc-status: 0\r\n\r\n").unwrap();
        assert_eq!(data, b"abc");
        assert_eq!(trailers.unwrap()["grpc-status"], "0");
        assert!(ended);

        let (data, _, ended) = decode_all(b"a\r\n0123").unwrap();
        assert_eq!(data, b"0123", "a partial chunk is passed on");
        assert!(!ended, "and more is awaited");

        assert!(decode_all(b"zz\r\n").is_err(), "bad size");
        assert!(
            decode_all(b"+2\r\nab\r\n").is_err(),
            "a sign is not a hex digit"
        );
        let (data, _, ended) = decode_all(b"2 ;x\r\nab\r\n0\r\n\r\n").unwrap();
        assert_eq!(
            (data.as_slice(), ended),
            (&b"ab"[..], true),
            "whitespace before ;"
        );
        assert!(
            decode_all(b"2\r\nabc\r\n").is_err(),
            "chunk longer than its size"
        );
    }

    #[test]
    fn response_heads_parse_and_frame_like_rfc_9112() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\nX-A: 2\r\n\r\nhello"[..],
        );
        let head = parse_head(&mut buf).unwrap().unwrap();
        assert_eq!(head.status, 200);
        assert_eq!(head.headers.get_all("x-a").iter().count(), 2);
        assert_eq!(&buf[..], b"hello", "the body stays in the buffer");
        assert!(matches!(
            framing(&head, false, false).unwrap(),
            (Framing::Length(5), true)
        ));
        assert!(matches!(
            framing(&head, true, false).unwrap(),
            (Framing::Empty, true)
        ));

        let mut partial = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Le"[..]);
        assert!(parse_head(&mut partial).unwrap().is_none());
        assert!(parse_head(&mut BytesMut::from(&b"HTTX/1.1 200\r\n\r\n"[..])).is_err());

        let frame_of = |raw: &[u8]| {
            let head = parse_head(&mut BytesMut::from(raw)).unwrap().unwrap();
            framing(&head, false, false)
        };
        assert!(matches!(
            frame_of(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"),
            Ok((Framing::Chunked(_), false))
        ));
        assert!(matches!(
            frame_of(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\n"),
            Ok((Framing::Length(3), false))
        ));
        assert!(matches!(
            frame_of(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"),
            Ok((Framing::Close, false))
        ));
        assert!(matches!(
            frame_of(b"HTTP/1.1 204 No Content\r\n\r\n"),
            Ok((Framing::Empty, true))
        ));
        assert!(
            frame_of(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n").is_err()
        );
        assert!(frame_of(b"HTTP/1.1 101 Switching Protocols\r\n\r\n").is_err());
        assert!(frame_of(b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\n").is_err());
        assert!(
            frame_of(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n").is_err(),
            "a coding pillion cannot undo is refused"
        );
        assert!(matches!(
            frame_of(
                b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n"
            ),
            Ok((Framing::Chunked(_), false))
        ));
        // Found by the property tests: hyper reads these until the connection closes,
        // so accepting them as chunked would frame the body differently.
        assert!(frame_of(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked,\r\n\r\n").is_err());
        assert!(frame_of(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: \xffchunked\r\n\r\n").is_err());
        assert!(
            frame_of(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n").is_err()
        );
    }
}
