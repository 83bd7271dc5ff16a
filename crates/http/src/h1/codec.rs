//! HTTP/1.1 framing shared by both sides: header fields that share the bytes they
//! were read from, the chunked decoder, and the writer of a message (head, then a
//! body framed by its own length, counted, or chunked).
//!
//! Errors here are noun phrases ("an invalid chunk size"); each side says who sent
//! it ("the node sent ...", "the client sent ...").

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http_body::{Body, Frame};
use tokio::io::AsyncWrite;

use crate::{BoxError, SendError};

/// Header fields in a head, as hyper allows.
pub(crate) const MAX_HEADERS: usize = 100;
/// A head (or a chunked body's trailers) larger than this is refused.
pub(crate) const MAX_HEAD: usize = 64 * 1024;
/// Body bytes gathered behind a head before they are written together.
const COALESCE: usize = 16 * 1024;
/// A chunk-size line longer than this is refused.
const MAX_CHUNK_LINE: usize = 1024;

/// Where a parsed field's name and value are, as offsets from `base` (the address
/// of the buffer it was parsed from).
pub(crate) type Span = (usize, usize, usize, usize);

pub(crate) fn field_span(base: usize, f: &httparse::Header<'_>) -> Span {
    let name = f.name.as_ptr() as usize - base;
    let value = f.value.as_ptr() as usize - base;
    (name, name + f.name.len(), value, value + f.value.len())
}

/// Spans kept on the stack; a head with more fields puts them in a `Vec`.
pub(crate) const INLINE_SPANS: usize = 24;

/// The spans of `fields` (parsed from the buffer at `base`), in `inline` for the
/// usual few fields: zeroing room for a hundred on every head cost more than
/// parsing it.
pub(crate) fn spans<'s>(
    base: usize,
    fields: &[httparse::Header<'_>],
    inline: &'s mut [Span; INLINE_SPANS],
    heap: &'s mut Vec<Span>,
) -> &'s [Span] {
    if fields.len() <= INLINE_SPANS {
        for (span, f) in inline.iter_mut().zip(fields) {
            *span = field_span(base, f);
        }
        &inline[..fields.len()]
    } else {
        heap.extend(fields.iter().map(|f| field_span(base, f)));
        heap
    }
}

/// The fields at `spans` of `head`; the values share its bytes instead of copying
/// them.
pub(crate) fn header_map(head: &Bytes, spans: &[Span], room: usize) -> Result<HeaderMap, String> {
    let mut headers = HeaderMap::with_capacity(spans.len() + room);
    for &(ns, ne, vs, ve) in spans {
        let name = HeaderName::from_bytes(&head[ns..ne])
            .map_err(|_| "an invalid header name".to_string())?;
        let value = HeaderValue::from_maybe_shared(head.slice(vs..ve))
            .map_err(|_| format!("an invalid value for {name}"))?;
        headers.append(name, value);
    }
    Ok(headers)
}

/// Where a chunked body's decoder is.
#[derive(Debug)]
pub(crate) enum Chunked {
    Size,
    Data(u64),
    DataEnd,
    /// Reading the trailers; how many of the buffer's bytes were searched for their
    /// end already (trailers that arrive a byte at a time are searched once, not
    /// once per byte).
    Trailers(usize),
    Done,
}

pub(crate) enum Decoded {
    Frame(Frame<Bytes>),
    NeedMore,
    End,
}

impl Chunked {
    /// Decodes what `buf` holds, consuming it.
    pub(crate) fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, String> {
        loop {
            match self {
                Chunked::Size => {
                    let Some(end) = line_end(buf)? else {
                        if buf.len() > MAX_CHUNK_LINE {
                            return Err("a chunk size line over 1 KiB".into());
                        }
                        return Ok(Decoded::NeedMore);
                    };
                    let size = chunk_size(&buf[..end])?;
                    buf.advance(end + 2);
                    *self = if size == 0 {
                        Chunked::Trailers(0)
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
                        return Err("a chunk longer than its size".into());
                    }
                    buf.advance(2);
                    *self = Chunked::Size;
                }
                Chunked::Done => return Ok(Decoded::End),
                Chunked::Trailers(scanned) => {
                    if buf.starts_with(b"\r\n") {
                        buf.advance(2);
                        *self = Chunked::Done;
                        return Ok(Decoded::End);
                    }
                    // Only what came since the last search, and the three bytes
                    // before it that may begin the empty line.
                    let from = scanned.saturating_sub(3);
                    let end = buf[from..]
                        .windows(4)
                        .position(|w| w == b"\r\n\r\n")
                        .map(|i| from + i);
                    let searched = end.map_or(buf.len(), |e| e + 4);
                    let bare = (*scanned..searched)
                        .any(|i| buf[i] == b'\n' && (i == 0 || buf[i - 1] != b'\r'));
                    if bare {
                        return Err("a trailer line ended by a bare LF".into());
                    }
                    let Some(end) = end else {
                        if buf.len() > MAX_HEAD {
                            return Err("trailers over 64 KiB".into());
                        }
                        *scanned = buf.len();
                        return Ok(Decoded::NeedMore);
                    };
                    let block = buf.split_to(end + 4).freeze();
                    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    let parsed = match httparse::parse_headers(&block, &mut fields) {
                        Ok(httparse::Status::Complete((_, parsed))) => parsed,
                        _ => return Err("invalid trailers".into()),
                    };
                    let base = block.as_ptr() as usize;
                    let spans: Vec<_> = parsed.iter().map(|f| field_span(base, f)).collect();
                    let mut trailers = header_map(&block, &spans, 0)?;
                    drop_forbidden_trailers(&mut trailers);
                    *self = Chunked::Done;
                    return Ok(Decoded::Frame(Frame::trailers(trailers)));
                }
            }
        }
    }
}

/// Why a head with a bare LF is refused.
pub(crate) const BARE_LF: &str =
    "a line of the request ends in a bare LF; HTTP/1.1 lines end in CRLF";

/// Printable bytes that RFC 3986 wants percent-encoded and the `http` crate refuses
/// in a URI, but that clients send raw (curl sends `?topic=events.>` as typed).
fn needs_encoding(b: u8) -> bool {
    matches!(
        b,
        b'"' | b'<' | b'>' | b'\\' | b'^' | b'`' | b'{' | b'|' | b'}'
    )
}

/// `target` percent-encoded where it holds such bytes (`>` -> `%3E`), so that the
/// request reaches pillion's handlers, which decode them; `None` when it holds none.
pub(crate) fn encode_target(target: &[u8]) -> Option<Vec<u8>> {
    if !target.iter().any(|&b| needs_encoding(b)) {
        return None;
    }
    let mut out = Vec::with_capacity(target.len() + 16);
    for &b in target {
        if needs_encoding(b) {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        } else {
            out.push(b);
        }
    }
    Some(out)
}

/// Fields a sender must not put in trailers (RFC 9110 6.5.1: framing, routing,
/// connection control, authentication, the content's own description): a recipient
/// that merged them into the head could be made to reframe or reroute a message
/// after it was checked, so they are dropped, both ways, never forwarded.
const FORBIDDEN_TRAILERS: [&str; 20] = [
    "content-length",
    "transfer-encoding",
    "host",
    "trailer",
    "te",
    "connection",
    "keep-alive",
    "proxy-connection",
    "upgrade",
    "expect",
    "max-forwards",
    "authorization",
    "proxy-authorization",
    "www-authenticate",
    "proxy-authenticate",
    "cookie",
    "set-cookie",
    "content-encoding",
    "content-type",
    "content-range",
];

fn drop_forbidden_trailers(trailers: &mut HeaderMap) {
    for name in FORBIDDEN_TRAILERS {
        trailers.remove(name);
    }
}

/// Up to `left` bytes of body from the front of `buf`, counted off `left`.
pub(crate) fn take(buf: &mut BytesMut, left: &mut u64) -> Bytes {
    let n = (*left).min(buf.len() as u64) as usize;
    *left -= n as u64;
    buf.split_to(n).freeze()
}

/// The end of the first line of `buf` (the index of its CR), once a whole line is
/// there; a line ended by a bare LF is an error (a reader accepting it would frame
/// the body differently from one that does not).
pub(crate) fn line_end(buf: &[u8]) -> Result<Option<usize>, String> {
    match buf.iter().position(|&b| b == b'\n') {
        None => Ok(None),
        Some(i) if i > 0 && buf[i - 1] == b'\r' => Ok(Some(i - 1)),
        Some(_) => Err("a chunk size line ended by a bare LF".into()),
    }
}

/// The first LF of `buf` that has no CR before it.
pub(crate) fn bare_lf(buf: &[u8]) -> Option<usize> {
    buf.iter()
        .enumerate()
        .position(|(i, &b)| b == b'\n' && (i == 0 || buf[i - 1] != b'\r'))
}

/// A chunk size line (RFC 9112 7.1): hex digits, then optional whitespace and
/// extensions.
pub(crate) fn chunk_size(line: &[u8]) -> Result<u64, String> {
    let digits = line
        .split(|&b| b == b';' || b == b' ' || b == b'\t')
        .next()
        .unwrap_or(b"");
    std::str::from_utf8(digits)
        .ok()
        .filter(|s| !s.is_empty() && s.len() <= 16 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .and_then(|s| u64::from_str_radix(s, 16).ok())
        .ok_or_else(|| "an invalid chunk size".to_string())
}

/// Reads more from `io` into `buf`, with at least a quarter of `size` bytes of room
/// (`size` more when less is left); `Ok(0)` is the end of the stream. tokio clears
/// the socket's readiness after a short read, so the next poll of an idle connection
/// costs no system call. Both sides read this way.
pub(crate) fn poll_fill<R: tokio::io::AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    size: usize,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < size / 4 {
        buf.reserve(size);
    }
    std::future::Future::poll(
        std::pin::pin!(tokio::io::AsyncReadExt::read_buf(io, buf)),
        cx,
    )
}

/// What is wrong with a message's `Content-Length` fields.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum BadLength {
    /// Not a list of decimal numbers of at most 19 digits.
    Invalid,
    /// Two different lengths, in one field or two.
    Differ,
}

/// Adds a `Content-Length` field's value to what the message's earlier ones said: a
/// comma list of the same length is that length (RFC 9110 8.6); anything else that
/// could frame the body two ways is refused. The same rule for requests and answers.
pub(crate) fn content_length(value: &[u8], length: &mut Option<u64>) -> Result<(), BadLength> {
    for part in value.split(|&b| b == b',') {
        let part = part.trim_ascii();
        let n = (!part.is_empty() && part.len() <= 19 && part.iter().all(u8::is_ascii_digit))
            .then(|| std::str::from_utf8(part).ok()?.parse::<u64>().ok())
            .flatten()
            .ok_or(BadLength::Invalid)?;
        if length.is_some_and(|l| l != n) {
            return Err(BadLength::Differ);
        }
        *length = Some(n);
    }
    Ok(())
}

/// How the body after a head is delimited, as the writer sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Length {
    /// No body, and no framing field written (a request without one, a response to
    /// HEAD, a 204 or a 304, whose head says what it says).
    None,
    /// `content-length: n`, and exactly n bytes.
    Exact(u64),
    /// `transfer-encoding: chunked`.
    Chunked,
    /// Raw bytes until the connection closes (a response to HTTP/1.0 of unknown
    /// length).
    Close,
}

pub(crate) enum WriteError {
    Io(io::Error),
    /// The body failed or had the wrong length.
    Body(SendError),
}

/// Writes a message: the head, then the body as it comes. The length sent is the
/// body's own (given as [`Length`], from its size hint), never a header's, and the
/// bytes written are counted against it: a body that turns out longer or shorter
/// aborts the message instead of desynchronising the connection. What the body has
/// ready goes out with the head in one write; small frames are copied behind the
/// head, so that a small message is one buffer and one `send` (a `writev` of two
/// costs the kernel about 0.2 us more).
pub(crate) struct Writer<B> {
    /// Bytes that go first: the head and the small frames copied behind it, from
    /// `at` on.
    first: Vec<u8>,
    at: usize,
    /// Larger frames, after `first`.
    queue: VecDeque<Bytes>,
    /// Bytes not yet written, in both.
    queued: usize,
    body: Option<B>,
    chunked: bool,
    /// For a body with a length: the length sent and the bytes so far.
    counted: bool,
    declared: u64,
    written: u64,
}

/// Frames up to this size are copied behind the head rather than queued.
const COPY: usize = 2048;
/// A head buffer up to this size is kept for the connection's next message.
const KEEP_BUFFER: usize = 4096;

impl<B> Writer<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    /// `head` holds the start line and fields; the framing field and the empty line
    /// that ends the head are added here. With [`Length::None`] the body is not sent.
    pub(crate) fn new(mut head: Vec<u8>, body: B, length: Length) -> Writer<B> {
        match length {
            Length::Exact(n) => {
                head.extend_from_slice(b"content-length: ");
                head.extend_from_slice(itoa(n, &mut [0; 20]));
                head.extend_from_slice(b"\r\n");
            }
            Length::Chunked => head.extend_from_slice(b"transfer-encoding: chunked\r\n"),
            Length::None | Length::Close => {}
        }
        head.extend_from_slice(b"\r\n");
        Writer {
            queued: head.len(),
            first: head,
            at: 0,
            queue: VecDeque::new(),
            body: (length != Length::None).then_some(body),
            chunked: length == Length::Chunked,
            counted: matches!(length, Length::Exact(_)),
            declared: match length {
                Length::Exact(n) => n,
                _ => 0,
            },
            written: 0,
        }
    }

    fn length_error(&self) -> WriteError {
        WriteError::Body(SendError::BodyLength {
            declared: self.declared,
            written: self.written,
        })
    }

    fn push(&mut self, b: &[u8]) {
        self.queued += b.len();
        self.first.extend_from_slice(b);
    }

    fn push_bytes(&mut self, b: Bytes) {
        if self.queue.is_empty() && b.len() <= COPY {
            return self.push(&b);
        }
        self.queued += b.len();
        self.queue.push_back(b);
    }

    fn push_static(&mut self, b: &'static [u8]) {
        if self.queue.is_empty() {
            self.push(b)
        } else {
            self.push_bytes(Bytes::from_static(b))
        }
    }

    /// Takes a frame of the body (or its end) into what is to be written.
    fn gather(&mut self, frame: Option<Result<Frame<Bytes>, B::Error>>) -> Result<(), WriteError> {
        match frame {
            None => {
                self.body = None;
                if self.chunked {
                    self.push_static(b"0\r\n\r\n");
                } else if self.counted && self.written != self.declared {
                    return Err(self.length_error());
                }
            }
            Some(Err(e)) => return Err(WriteError::Body(SendError::from_body(e.into()))),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) if data.is_empty() => {}
                Ok(data) if self.chunked => {
                    let mut size = [0u8; 20];
                    let size = hex(data.len() as u64, &mut size);
                    if self.queue.is_empty() {
                        self.push(size);
                        self.push(b"\r\n");
                    } else {
                        self.push_bytes(Bytes::from([size, b"\r\n"].concat()));
                    }
                    self.push_bytes(data);
                    self.push_static(b"\r\n");
                }
                Ok(data) => {
                    self.written += data.len() as u64;
                    if self.counted && self.written > self.declared {
                        return Err(self.length_error());
                    }
                    self.push_bytes(data)
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
                        self.push_bytes(Bytes::from(block));
                        self.chunked = false; // the last chunk is written
                        self.body = None;
                    }
                }
            },
        }
        Ok(())
    }

    /// The buffer the head was written from, empty, for the next message's head (a
    /// large one is let go).
    pub(crate) fn into_buffer(self) -> Vec<u8> {
        let mut buf = self.first;
        if buf.capacity() > KEEP_BUFFER {
            return Vec::new();
        }
        buf.clear();
        buf
    }

    /// Marks `n` bytes written.
    fn advance(&mut self, mut n: usize) {
        self.queued -= n;
        let head = (self.first.len() - self.at).min(n);
        self.at += head;
        n -= head;
        if self.at == self.first.len() {
            self.first.clear();
            self.at = 0;
        }
        while n > 0 {
            let front = &mut self.queue[0];
            if front.len() <= n {
                n -= front.len();
                self.queue.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
    }

    /// Writes until the whole message is out (and flushed), or the body or the
    /// connection has to wait.
    pub(crate) fn poll_write<W: AsyncWrite + Unpin>(
        &mut self,
        io: &mut W,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), WriteError>> {
        loop {
            // What the body has ready joins the queue, so that it leaves with the
            // head (or the bytes before it) in one write.
            while self.queued < COALESCE {
                let Some(body) = self.body.as_mut() else {
                    break;
                };
                match Pin::new(body).poll_frame(cx) {
                    Poll::Ready(frame) => self.gather(frame)?,
                    Poll::Pending => break,
                }
            }
            if self.queued == 0 {
                // Done, or the body waits: what was written must not wait in a TLS
                // buffer meanwhile (a no-op on plain TCP).
                let flushed = Pin::new(&mut *io).poll_flush(cx);
                if self.body.is_some() {
                    if let Poll::Ready(Err(e)) = flushed {
                        return Poll::Ready(Err(WriteError::Io(e)));
                    }
                    return Poll::Pending;
                }
                ready!(flushed).map_err(WriteError::Io)?;
                return Poll::Ready(Ok(()));
            }
            let written = if self.queue.is_empty() {
                ready!(Pin::new(&mut *io).poll_write(cx, &self.first[self.at..]))
            } else {
                let mut slices = [IoSlice::new(&[]); 8];
                let mut n = 0;
                if self.at < self.first.len() {
                    slices[0] = IoSlice::new(&self.first[self.at..]);
                    n = 1;
                }
                for b in self.queue.iter().take(slices.len() - n) {
                    slices[n] = IoSlice::new(b);
                    n += 1;
                }
                ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices[..n]))
            }
            .map_err(WriteError::Io)?;
            if written == 0 {
                return Poll::Ready(Err(WriteError::Io(io::ErrorKind::WriteZero.into())));
            }
            self.advance(written);
        }
    }
}

/// `n` in decimal, in `buf`.
pub(crate) fn itoa(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[at..];
        }
    }
}

/// `n` in lower-case hexadecimal, in `buf`.
fn hex(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b"0123456789abcdef"[(n & 15) as usize];
        n >>= 4;
        if n == 0 {
            return &buf[at..];
        }
    }
}

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
    fn trailers_lose_framing_and_routing_fields_and_are_searched_once() {
        let input = b"0\r\ngrpc-status: 0\r\nContent-Length: 5\r\nHost: evil\r\nTransfer-Encoding: chunked\r\nTrailer: x\r\nX-Sum: 7\r\n\r\n";
        let (_, trailers, ended) = decode_all(input).unwrap();
        let trailers = trailers.expect("trailers");
        assert!(ended);
        let names: Vec<&str> = trailers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["grpc-status", "x-sum"]);

        // A byte at a time: each decode searches only what came since the last.
        let mut state = Chunked::Size;
        let mut buf = BytesMut::new();
        let mut got = None;
        for &b in input.iter() {
            buf.extend_from_slice(&[b]);
            match state.decode(&mut buf).unwrap() {
                Decoded::Frame(f) => got = f.into_trailers().ok(),
                Decoded::End | Decoded::NeedMore => {}
            }
        }
        assert_eq!(got.as_ref(), Some(&trailers));
        // A bare LF is found wherever the split falls.
        let bare = b"0\r\nX-A: 1\r\nX-B: 2\n\r\n";
        for cut in 1..bare.len() {
            let mut state = Chunked::Size;
            let mut buf = BytesMut::from(&bare[..cut]);
            let first = state.decode(&mut buf);
            buf.extend_from_slice(&bare[cut..]);
            let second = first.and_then(|_| state.decode(&mut buf));
            assert!(second.is_err(), "cut at {cut}");
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
    fn numbers_are_written_in_decimal_and_hex() {
        for n in [0u64, 7, 10, 255, 4096, u64::MAX] {
            assert_eq!(itoa(n, &mut [0; 20]), n.to_string().as_bytes());
            assert_eq!(hex(n, &mut [0; 20]), format!("{n:x}").as_bytes());
        }
    }

    /// Writes `length`-framed `chunks` through a [`Writer`] and returns the bytes.
    fn written(length: Length, chunks: Vec<&'static [u8]>) -> Result<Vec<u8>, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = chunks
                .into_iter()
                .map(|c| Ok(Frame::data(Bytes::from_static(c))))
                .collect();
            let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
            let mut w = Writer::new(b"HTTP/1.1 200 OK\r\n".to_vec(), body, length);
            let mut out = Vec::new();
            let done = std::future::poll_fn(|cx| w.poll_write(&mut out, cx)).await;
            match done {
                Ok(()) => Ok(out),
                Err(WriteError::Body(e)) => Err(e.to_string()),
                Err(WriteError::Io(e)) => Err(e.to_string()),
            }
        })
    }

    #[test]
    fn the_writer_frames_and_counts_the_body() {
        assert_eq!(
            written(Length::Exact(5), vec![b"he", b"llo"]).unwrap(),
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"
        );
        assert_eq!(
            written(Length::Chunked, vec![b"hello", b"", b" world!"]).unwrap(),
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n7\r\n world!\r\n0\r\n\r\n"
        );
        assert_eq!(
            written(Length::None, vec![b"dropped"]).unwrap(),
            b"HTTP/1.1 200 OK\r\n\r\n"
        );
        assert_eq!(
            written(Length::Close, vec![b"raw"]).unwrap(),
            b"HTTP/1.1 200 OK\r\n\r\nraw"
        );
        let long = written(Length::Exact(3), vec![b"toolong"]).unwrap_err();
        assert!(long.contains("not the 3 it declared"), "{long}");
        let short = written(Length::Exact(9), vec![b"short"]).unwrap_err();
        assert!(short.contains("not the 9 it declared"), "{short}");
    }
}
