//! What a connection handed to hyper reads, before hyper parses it (pillion's own
//! HTTP/1.1 server, [`crate::h1::server`], makes the same checks as it parses; hyper
//! serves only what it hands over, and HTTP/2): the connection's HTTP/1.1 framing is
//! followed (heads, `Content-Length` and chunked bodies, trailers) so that every
//! request head can be checked and its request line made acceptable to hyper.
//!
//! - A line of a request head, a chunk-size line or a trailer that ends in a bare LF
//!   is refused (RFC 9112 2.2: a recipient may accept it, but a proxy in front of
//!   pillion may not, and the two would see different headers). A refused head
//!   reaches hyper as a marked request that the server answers with a 400 in the JSON
//!   error shape, after the answers to the requests before it, and the connection
//!   closes; in a chunked body, the upload is broken off.
//! - Printable bytes that RFC 3986 wants percent-encoded but clients send raw in the
//!   request-target (curl sends `?topic=events.>` as typed) are encoded (`>` ->
//!   `%3E`), so the request reaches pillion's handlers, which decode them.
//!
//! What this reader cannot follow (the h2c preface, `CONNECT`, an upgrade, a framing
//! hyper will refuse anyway) ends the checks: the rest of the connection passes as it
//! came. Body bytes are read straight into hyper's buffer, never copied.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A head longer than this is passed on and no longer followed: hyper refuses it.
const MAX_HEAD: usize = 512 * 1024;
/// A chunk-size line or trailer line longer than this ends the connection.
const MAX_LINE: usize = 4096;

/// Where the reader is in the connection's byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading a request head (into `line` / `head`).
    Head,
    /// This many bytes of a `Content-Length` body are left.
    Body(u64),
    /// Reading a chunk-size line.
    ChunkSize,
    /// This many bytes of chunk data are left, then CRLF.
    ChunkData(u64),
    /// The CRLF after chunk data; how many of its two bytes were seen.
    ChunkEnd(u8),
    /// Reading trailer lines, up to the empty line that ends the message.
    Trailers,
    /// Nothing more is checked.
    Opaque,
}

/// Why a request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    BareLf,
    LongLine,
}

impl Refusal {
    fn code(self) -> &'static str {
        match self {
            Refusal::BareLf => "bare-lf",
            Refusal::LongLine => "long-line",
        }
    }

    pub(crate) fn detail(self) -> &'static str {
        match self {
            Refusal::BareLf => BARE_LF,
            Refusal::LongLine => "a chunk-size or trailer line of the request is too long",
        }
    }
}

/// Why a head with a bare LF is refused.
pub(crate) const BARE_LF: &str =
    "a line of the request ends in a bare LF; HTTP/1.1 lines end in CRLF";

/// The header by which a refused head is marked for [`crate::server`]. A client that
/// sends it itself only gets its own request refused.
pub(crate) const REFUSED: &str = "x-pillion-refused";

/// The head hyper is given in place of a refused one.
fn refused_head(why: Refusal) -> String {
    format!(
        "GET / HTTP/1.1\r\nhost: pillion\r\nconnection: close\r\n{REFUSED}: {}\r\n\r\n",
        why.code()
    )
}

/// Why the request marked with [`REFUSED`] was refused, for its 400.
pub(crate) fn refusal(value: &http::HeaderValue) -> &'static str {
    match value.as_bytes() {
        b"long-line" => Refusal::LongLine.detail(),
        _ => Refusal::BareLf.detail(),
    }
}

pub(crate) struct Heads<T> {
    io: T,
    phase: Phase,
    /// Bytes read but not yet followed.
    pending: Vec<u8>,
    /// The head (or line) being gathered, and where its last, unfinished line starts.
    head: Vec<u8>,
    line_at: usize,
    /// Followed bytes, ready for hyper, and how much of them it has taken.
    out: Vec<u8>,
    sent: usize,
    /// How long a request head may take to arrive, from its first byte (from the
    /// connection's start for the first head), and when the one being read began.
    header_timeout: Option<Duration>,
    head_started: Option<tokio::time::Instant>,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A refused head was handed on: nothing more is read, hyper closes the
    /// connection once it has answered.
    stalled: bool,
    /// The connection is broken off, for this reason: every read fails.
    failed: Option<Refusal>,
}

impl<T> Heads<T> {
    /// `header_timeout`: see [`crate::server::Limits::read_header_timeout`].
    pub(crate) fn new(io: T, header_timeout: Option<Duration>) -> Self {
        Heads {
            io,
            header_timeout,
            head_started: Some(tokio::time::Instant::now()),
            deadline: None,
            phase: Phase::Head,
            pending: Vec::new(),
            head: Vec::new(),
            line_at: 0,
            out: Vec::new(),
            sent: 0,
            stalled: false,
            failed: None,
        }
    }

    /// Refuses what is being read. In a head, hyper is given [`refused_head`] in its
    /// place: it answers the requests before in order, then this one with a 400 (see
    /// [`refusal`]), and closes the connection. In a body, the upload is broken off.
    fn refuse(&mut self, why: Refusal) {
        self.pending.clear();
        self.head.clear();
        self.line_at = 0;
        if self.phase == Phase::Head {
            self.head_started = None;
            self.deadline = None;
            self.out.extend_from_slice(refused_head(why).as_bytes());
            self.stalled = true;
        } else {
            tracing::debug!("{}; breaking the upload off", why.detail());
            self.failed = Some(why);
        }
    }

    /// Follows `pending` as far as it goes, moving what hyper may read into `out`.
    fn follow(&mut self) {
        while !self.pending.is_empty() && self.failed.is_none() && !self.stalled {
            match self.phase {
                Phase::Opaque => self.out.append(&mut self.pending),
                Phase::Body(n) | Phase::ChunkData(n) => {
                    let take = (n as usize).min(self.pending.len());
                    self.out.extend(self.pending.drain(..take));
                    self.advance(take as u64);
                }
                Phase::ChunkEnd(seen) => {
                    let b = self.pending.remove(0);
                    self.out.push(b);
                    self.phase = match (seen, b) {
                        (0, b'\r') => Phase::ChunkEnd(1),
                        (1, b'\n') => Phase::ChunkSize,
                        (_, b'\n') => return self.refuse(Refusal::BareLf),
                        // Not CRLF at all: hyper refuses the body.
                        _ => Phase::Opaque,
                    };
                }
                Phase::Head | Phase::ChunkSize | Phase::Trailers => {
                    if self.phase == Phase::Head && self.head_started.is_none() {
                        self.head_started = Some(tokio::time::Instant::now());
                    }
                    self.gather_line()
                }
            }
        }
    }

    /// While a head is incomplete and nothing can be read: pending until the head's
    /// deadline, then the connection fails (hyper cannot time out a head it has not
    /// been given).
    fn wait_for_head(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let (Phase::Head, Some(started), Some(limit)) =
            (self.phase, self.head_started, self.header_timeout)
        else {
            return Poll::Pending;
        };
        let deadline = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(started + limit)));
        std::task::ready!(deadline.as_mut().poll(cx));
        Poll::Ready(Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "the request head did not arrive within {}",
                pillion_core::duration::format(limit)
            ),
        )))
    }

    /// Passes what was gathered on as it is.
    fn emit_head(&mut self) {
        self.out.append(&mut self.head);
        self.line_at = 0;
    }

    /// After `n` bytes of a body or chunk.
    fn advance(&mut self, n: u64) {
        self.phase = match self.phase {
            Phase::Body(left) if left == n => Phase::Head,
            Phase::Body(left) => Phase::Body(left - n),
            Phase::ChunkData(left) if left == n => Phase::ChunkEnd(0),
            Phase::ChunkData(left) => Phase::ChunkData(left - n),
            other => other,
        }
    }

    /// Moves bytes from `pending` to `head` up to the end of the current line, and
    /// acts on a whole line.
    fn gather_line(&mut self) {
        let Some(lf) = self.pending.iter().position(|&b| b == b'\n') else {
            self.head.append(&mut self.pending);
            let limit = if self.phase == Phase::Head {
                MAX_HEAD
            } else {
                MAX_LINE
            };
            if self.head.len() > limit {
                if self.phase == Phase::Head {
                    self.emit_head();
                    self.phase = Phase::Opaque;
                } else {
                    self.refuse(Refusal::LongLine);
                }
            }
            return;
        };
        let line_start = self.line_at;
        self.head.extend(self.pending.drain(..=lf));
        self.line_at = self.head.len();
        let line = &self.head[line_start..];
        if line.len() < 2 || line[line.len() - 2] != b'\r' {
            // A lone "\n" between messages is as bare as one inside them.
            return self.refuse(Refusal::BareLf);
        }
        let empty = line.len() == 2;
        match self.phase {
            Phase::Head if empty && line_start == 0 => {
                // An empty line before a request line, which servers skip.
                self.emit_head();
            }
            Phase::Head if empty => self.end_head(),
            Phase::Head => {}
            Phase::ChunkSize => {
                let size = crate::h1::codec::chunk_size(&self.head[..self.head.len() - 2]).ok();
                self.emit_head();
                self.phase = match size {
                    Some(0) => Phase::Trailers,
                    Some(n) => Phase::ChunkData(n),
                    None => Phase::Opaque,
                };
            }
            Phase::Trailers => {
                self.emit_head();
                if empty {
                    self.phase = Phase::Head;
                }
            }
            _ => unreachable!("lines are gathered in heads, chunk sizes and trailers"),
        }
    }

    /// A whole head is in `head`: decides the framing of what follows and passes the
    /// head on with its request-target encoded.
    fn end_head(&mut self) {
        let head = std::mem::take(&mut self.head);
        self.line_at = 0;
        self.head_started = None;
        self.deadline = None;
        let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
        if head.starts_with(b"PRI * HTTP/2.0") {
            self.out.extend_from_slice(&head);
            self.phase = Phase::Opaque;
            return;
        }
        self.phase = framing(&head).unwrap_or(Phase::Opaque);
        self.out.extend(encode_request_line(&head[..line_end]));
        self.out.extend_from_slice(&head[line_end..]);
    }
}

/// The framing that follows a request head; `None` where the reader stops following
/// (CONNECT, an upgrade, a framing hyper refuses).
fn framing(head: &[u8]) -> Option<Phase> {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return None,
    }
    if req.method == Some("CONNECT") {
        return None;
    }
    let mut length: Option<u64> = None;
    let mut chunked = false;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("upgrade") {
            return None;
        }
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            let last = h.value.rsplit(|&b| b == b',').next().unwrap_or_default();
            if !last.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                return None;
            }
            chunked = true;
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            let value = h.value.trim_ascii();
            if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
                return None;
            }
            let n: u64 = std::str::from_utf8(value).ok()?.parse().ok()?;
            if length.is_some_and(|l| l != n) {
                return None;
            }
            length = Some(n);
        }
    }
    Some(match (chunked, length) {
        (true, _) => Phase::ChunkSize,
        (false, Some(0) | None) => Phase::Head,
        (false, Some(n)) => Phase::Body(n),
    })
}

/// `line` with the request-target (between the first two spaces) percent-encoded
/// where it holds bytes the `http` crate refuses in a URI.
fn encode_request_line(line: &[u8]) -> Vec<u8> {
    let Some(start) = line.iter().position(|&b| b == b' ') else {
        return line.to_vec();
    };
    let end = line[start + 1..]
        .iter()
        .position(|&b| b == b' ')
        .map_or(line.len(), |i| start + 1 + i);
    let Some(target) = encode_target(&line[start + 1..end]) else {
        return line.to_vec();
    };
    [&line[..=start], &target[..], &line[end..]].concat()
}

/// Printable bytes that RFC 3986 wants percent-encoded and the `http` crate refuses
/// in a URI, but that clients send raw.
fn needs_encoding(b: u8) -> bool {
    matches!(
        b,
        b'"' | b'<' | b'>' | b'\\' | b'^' | b'`' | b'{' | b'|' | b'}'
    )
}

/// `target` percent-encoded where it holds such bytes; `None` when it holds none.
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

impl<T: AsyncRead + Unpin> AsyncRead for Heads<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.sent < this.out.len() {
                let n = buf.remaining().min(this.out.len() - this.sent);
                buf.put_slice(&this.out[this.sent..this.sent + n]);
                this.sent += n;
                if this.sent == this.out.len() {
                    this.out.clear();
                    this.sent = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if let Some(why) = this.failed {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    why.detail(),
                )));
            }
            if this.stalled {
                // Nothing is read any more; hyper closes the connection once it has
                // answered the refused head.
                return Poll::Pending;
            }
            if !this.pending.is_empty() {
                this.follow();
                continue;
            }
            // Body bytes go straight into hyper's buffer, as many as the body has left.
            match this.phase {
                Phase::Opaque => return Pin::new(&mut this.io).poll_read(cx, buf),
                Phase::Body(n) | Phase::ChunkData(n) if n >= buf.remaining() as u64 => {
                    let before = buf.filled().len();
                    std::task::ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
                    this.advance((buf.filled().len() - before) as u64);
                    return Poll::Ready(Ok(()));
                }
                Phase::Body(n) | Phase::ChunkData(n) => {
                    let mut part = ReadBuf::new(buf.initialize_unfilled_to(n as usize));
                    std::task::ready!(Pin::new(&mut this.io).poll_read(cx, &mut part))?;
                    let got = part.filled().len();
                    buf.advance(got);
                    this.advance(got as u64);
                    return Poll::Ready(Ok(()));
                }
                _ => {}
            }
            let mut chunk = [0u8; 4096];
            let mut read = ReadBuf::new(&mut chunk);
            if Pin::new(&mut this.io)
                .poll_read(cx, &mut read)?
                .is_pending()
            {
                return this.wait_for_head(cx);
            }
            if read.filled().is_empty() {
                // End of stream: whatever was gathered goes to hyper, which judges it.
                this.emit_head();
                this.phase = Phase::Opaque;
                if this.out.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            this.pending.extend_from_slice(read.filled());
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Heads<T> {
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
    use proptest::prelude::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// How reading through [`Heads`] ended.
    #[derive(Debug, PartialEq)]
    enum End {
        /// The end of the stream.
        Eof,
        /// A read failed with this message.
        Failed(String),
        /// Nothing more is read although the client is done.
        Stalled,
    }

    /// What hyper would read through [`Heads`] from a client that writes `input` in
    /// pieces cut at `cuts` then closes, with reads of the given sizes, and how it
    /// ended. Heads never writes to the client: that is checked here too.
    fn through(input: &[u8], cuts: &[usize], reads: &[usize]) -> (Vec<u8>, End) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let (mut client, server) = tokio::io::duplex(1 << 20);
            let (input, cuts) = (input.to_vec(), cuts.to_vec());
            let writer = tokio::spawn(async move {
                crate::testing::write_in_pieces(&mut client, &input, &cuts).await;
                let _ = client.shutdown().await;
                let mut back = Vec::new();
                let _ = client.read_to_end(&mut back).await;
                back
            });
            let mut heads = Heads::new(server, None);
            let mut got = Vec::new();
            let mut sizes = reads.iter().cycle();
            let end = loop {
                let mut buf = vec![0u8; *sizes.next().unwrap_or(&4096)];
                // The clock is paused: this fires only when nothing else can run.
                let read = tokio::time::timeout(Duration::from_secs(3600), heads.read(&mut buf));
                match read.await {
                    Err(_) => break End::Stalled,
                    Ok(Ok(0)) => break End::Eof,
                    Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
                    Ok(Err(e)) => break End::Failed(e.to_string()),
                }
            };
            drop(heads);
            assert_eq!(writer.await.unwrap(), b"", "Heads wrote to the client");
            (got, end)
        })
    }

    /// One well-formed request's bytes.
    fn request() -> impl Strategy<Value = Vec<u8>> {
        crate::testing::request().prop_map(|r| r.bytes)
    }

    /// Every CRLF of `bytes` that ends a line of a head, chunk-size line or trailer
    /// of the requests in `requests` (their offsets in the concatenation), with the
    /// index of the request it is in.
    fn line_ends(requests: &[Vec<u8>]) -> Vec<(usize, usize)> {
        let mut ends = Vec::new();
        let mut base = 0;
        for (i, r) in requests.iter().enumerate() {
            // The head's line ends (the body's bytes may hold CRLF that are data).
            let head_end = r.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            for (at, _) in r[..head_end]
                .windows(2)
                .enumerate()
                .filter(|(_, w)| *w == b"\r\n")
            {
                ends.push((base + at, i));
            }
            base += r.len();
        }
        ends
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::testing::framing_cases()))]

        #[test]
        fn well_formed_requests_pass_unchanged_in_any_split(
            requests in prop::collection::vec(request(), 1..4),
            cuts in prop::collection::vec(any::<usize>(), 0..6),
            reads in prop::collection::vec(1usize..5000, 1..4),
        ) {
            let input = requests.concat();
            prop_assert_eq!(through(&input, &cuts, &reads), (input, End::Eof));
        }

        #[test]
        fn a_bare_lf_in_a_head_is_refused(
            requests in prop::collection::vec(request(), 1..4),
            pick in any::<prop::sample::Index>(),
            cuts in prop::collection::vec(any::<usize>(), 0..6),
        ) {
            let ends = line_ends(&requests);
            let (at, which) = ends[pick.index(ends.len())];
            let mut input = requests.concat();
            input.remove(at); // the CR
            let (read, end) = through(&input, &cuts, &[4096]);
            // The requests before it pass as they were, then the marked head in its
            // place, and nothing more is read.
            let before: Vec<u8> = requests[..which].concat();
            let expected = [&before[..], refused_head(Refusal::BareLf).as_bytes()].concat();
            prop_assert_eq!(
                (String::from_utf8_lossy(&read), end),
                (String::from_utf8_lossy(&expected), End::Stalled)
            );
        }

        #[test]
        fn any_bytes_end_in_a_pass_a_refusal_or_a_failure_never_a_hang(
            input in prop::collection::vec(
                prop_oneof![any::<u8>(), Just(b'\r'), Just(b'\n'), Just(b' ')], 0..600),
            prefix in prop::sample::select(vec![
                &b""[..],
                b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n",
            ]),
            cuts in prop::collection::vec(any::<usize>(), 0..6),
        ) {
            let input = [prefix, &input].concat();
            let (read, end) = through(&input, &cuts, &[1, 4096]);
            match end {
                // Passed: only what was sent, apart from the request-target's encoding.
                End::Eof => prop_assert!(read.len() <= input.len() * 3),
                End::Stalled => prop_assert!(
                    read.ends_with(refused_head(Refusal::BareLf).as_bytes()),
                    "{:?}", String::from_utf8_lossy(&read)
                ),
                End::Failed(e) => prop_assert!(
                    e == Refusal::BareLf.detail() || e == Refusal::LongLine.detail(), "{}", e
                ),
            }
        }
    }

    #[test]
    fn a_bare_lf_in_a_chunk_line_or_trailer_fails_the_connection() {
        for input in [
            &b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nx-a: 1\n\r\n",
        ] {
            let (_, end) = through(input, &[], &[4096]);
            assert_eq!(end, End::Failed(Refusal::BareLf.detail().into()), "{input:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_that_does_not_arrive_in_time_fails_the_connection() {
        let (mut client, server) = tokio::io::duplex(4096);
        let mut heads = Heads::new(server, Some(Duration::from_secs(10)));
        // A whole request, then half of the next head, and the client waits.
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHo")
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = heads.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        let started = tokio::time::Instant::now();
        let err = heads.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("within 10s"), "{err}");
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        // An idle connection between requests is not timed out by it.
        let (mut client, server) = tokio::io::duplex(4096);
        let mut heads = Heads::new(server, Some(Duration::from_secs(10)));
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let n = heads.read(&mut buf).await.unwrap();
        assert_eq!(n, 27, "the whole request");
        let idle = tokio::time::timeout(Duration::from_secs(60), heads.read(&mut buf)).await;
        assert!(idle.is_err(), "an idle connection was cut: {idle:?}");
    }

    #[test]
    fn the_request_target_is_encoded_on_every_request_of_a_connection() {
        let input =
            b"GET /broker?topic=events.> HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n<b>\
            GET /a?q=\"x\"&t={1} HTTP/1.1\r\nHost: x\r\n\r\n";
        let (read, end) = through(input, &[7, 30], &[4096]);
        assert_eq!(end, End::Eof);
        assert_eq!(
            String::from_utf8(read).unwrap(),
            "GET /broker?topic=events.%3E HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n<b>\
             GET /a?q=%22x%22&t=%7B1%7D HTTP/1.1\r\nHost: x\r\n\r\n"
        );
    }

    #[test]
    fn what_cannot_be_followed_passes_as_it_came() {
        for input in [
            // h2c prior knowledge.
            &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04\n\n"[..],
            // An upgrade: the tunnel's bytes are not HTTP.
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: ws\r\n\r\nraw\nbytes\n",
            // A framing hyper refuses: it is hyper's to answer.
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nab\ncd",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1x\r\n\r\nab\ncd",
            // A head cut off by the end of the stream.
            b"GET / HTTP/1.1\r\nHost: x\r\n",
        ] {
            let passed = through(input, &[3], &[4096]);
            assert_eq!(
                passed,
                (input.to_vec(), End::Eof),
                "{}",
                String::from_utf8_lossy(input)
            );
        }
    }
}
