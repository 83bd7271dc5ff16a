//! The HTTP/2 client: one multiplexed connection per node (h2c, or h2 over TLS in the
//! mesh), spoken with the `h2` crate.
//!
//! A request is sent and its answer awaited on the caller's task, as HTTP/1.1's are:
//! hyper's client handed each request over a channel to a dispatch task, which
//! spawned a task per request to await the answer and send it back over a oneshot
//! (a third of pillion's per-request work on h2c, by `perf`). Only a request body
//! still streaming when the answer arrives gets a task of its own, so that the upload
//! goes on while the caller reads the answer (gRPC's bidirectional streams).
//!
//! The connection itself runs on its own task; it ends when the node closes it or when
//! the pool is dropped and its last stream ends.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use ::h2::client::{ResponseFuture, SendRequest};
use ::h2::{Reason, RecvStream, SendStream};
use bytes::{Buf, Bytes};
use http::{header, HeaderMap, HeaderName, HeaderValue, Request, Response};
use http_body::{Body, Frame, SizeHint};

use crate::pool::Outgoing;
use crate::stream::Stream;
use crate::{describe, BoxError, SendError};

/// Flow-control windows and limits: hyper's client defaults, which pillion used
/// before, so nodes see the same settings.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
const MAX_FRAME_SIZE: u32 = 16 * 1024;
const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
const MAX_SEND_BUFFER: usize = 1024 * 1024;
const INITIAL_MAX_SEND_STREAMS: usize = 100;

/// Headers HTTP/2 forbids (RFC 9113 8.2.2); `h2` refuses a request that has one.
const CONNECTION_SPECIFIC: [HeaderName; 5] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// A failure of the connection or the stream, at `stage` of the exchange.
fn failed(stage: &str, e: &::h2::Error) -> SendError {
    let what = match e.reason() {
        Some(reason) if e.is_reset() => format!("the node reset the stream ({reason:?})"),
        Some(reason) if e.is_go_away() => format!("the node closed the connection ({reason:?})"),
        _ => describe(e),
    };
    SendError::H2(format!("HTTP/2, {stage}: {what}"))
}

/// An open connection: what a call needs to send on it. The pool keeps one; when the
/// last handle goes, `h2` wakes the connection's task, which closes it once its
/// streams have ended.
#[derive(Clone)]
pub(crate) struct Handle {
    send: SendRequest<Bytes>,
    /// Set once the connection cannot take new requests.
    closed: Arc<AtomicBool>,
}

impl Handle {
    /// The HTTP/2 handshake on `io`; the connection then runs on a task of its own.
    pub(crate) async fn handshake(io: Stream) -> Result<Handle, ::h2::Error> {
        let (send, connection) = ::h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME_SIZE)
            .max_header_list_size(MAX_HEADER_LIST_SIZE)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .initial_max_send_streams(INITIAL_MAX_SEND_STREAMS)
            .enable_push(false)
            .handshake::<_, Bytes>(io)
            .await?;
        let closed = Arc::new(AtomicBool::new(false));
        let ended = closed.clone();
        tokio::spawn(async move {
            let outcome = connection.await;
            ended.store(true, Ordering::Release);
            if let Err(e) = outcome {
                tracing::debug!(error = %e, "upstream h2 connection ended");
            }
        });
        Ok(Handle { send, closed })
    }

    /// Whether the connection still takes new requests.
    pub(crate) fn is_open(&self) -> bool {
        !self.closed.load(Ordering::Acquire)
    }
}

/// Why a request got no answer.
pub(crate) enum Failure {
    /// The connection could not take it (it closed or is going away): the request
    /// never left and is handed back.
    NotSent(::h2::Error, Box<Request<Outgoing>>),
    /// It left; the node may have seen it.
    Sent(SendError),
}

/// Sends `req` (an absolute URI) and waits for the answer's head.
pub(crate) async fn send(
    handle: Handle,
    req: Request<Outgoing>,
) -> Result<Response<ResponseBody>, Failure> {
    let Handle { mut send, closed } = handle;
    if let Err(e) = poll_fn(|cx| send.poll_ready(cx)).await {
        closed.store(true, Ordering::Release);
        return Err(Failure::NotSent(e, Box::new(req)));
    }
    let (mut head, body) = req.into_parts();
    make_legal(&mut head.headers);
    if let Some(len) = body.size_hint().exact() {
        let omitted = len == 0 && body.omits_empty_length(&head.method);
        if !omitted && !head.headers.contains_key(header::CONTENT_LENGTH) {
            head.headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        }
    }
    let done = body.is_end_stream();
    let (answer, stream) = send
        .send_request(Request::from_parts(head, ()), done)
        .map_err(|e| {
            if e.is_go_away() {
                closed.store(true, Ordering::Release);
            }
            Failure::Sent(failed("sending the request", &e))
        })?;
    let (res, uploading) = if done {
        (answer.await, None)
    } else {
        await_while_uploading(answer, Upload::new(body, stream)).await?
    };
    let res = res.map_err(|e| Failure::Sent(failed("awaiting the answer", &e)))?;
    // An answer whose HEADERS ended the stream is empty, whatever it declares.
    let remaining = if res.body().is_end_stream() {
        Some(0)
    } else {
        res.headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok())
    };
    let upload = uploading.map(|upload| {
        let (answer_here, answer_gone) = tokio::sync::oneshot::channel();
        tokio::spawn(upload_while_read(upload, answer_gone));
        answer_here
    });
    Ok(res.map(|recv| ResponseBody {
        recv,
        data_done: false,
        remaining,
        _upload: upload,
    }))
}

/// An upload that goes on after the answer came, until its end or until the answer's
/// body is dropped (the caller went away): then the stream is reset, so that the node
/// does not wait for the rest of a body that will not come.
async fn upload_while_read(
    mut upload: Upload,
    mut answer_gone: tokio::sync::oneshot::Receiver<()>,
) {
    let sent = poll_fn(|cx| {
        if Pin::new(&mut answer_gone).poll(cx).is_ready() {
            upload.stream.send_reset(Reason::CANCEL);
            return Poll::Ready(Ok(()));
        }
        upload.poll_send(cx)
    })
    .await;
    if let Err(e) = sent {
        tracing::debug!(error = %describe(&e), "the request's body was cut short");
    }
}

/// The answer, while the request's body is sent; an upload still going when the
/// answer comes is given back, to go on on a task of its own.
async fn await_while_uploading(
    mut answer: ResponseFuture,
    upload: Upload,
) -> Result<(Result<Response<RecvStream>, ::h2::Error>, Option<Upload>), Failure> {
    let mut upload = Some(upload);
    let res = poll_fn(|cx| {
        if let Poll::Ready(res) = Pin::new(&mut answer).poll(cx) {
            return Poll::Ready(Ok(res));
        }
        if let Some(up) = upload.as_mut() {
            if let Poll::Ready(sent) = up.poll_send(cx) {
                upload = None;
                if let Err(e) = sent {
                    // A node may answer whole and then reset the rest of the upload
                    // (NO_ERROR, RFC 9113 8.1). Its frames are read in order, so when
                    // the reset is seen its answer is here too, even if it came
                    // after the answer was last looked at: the answer wins.
                    if let Poll::Ready(Ok(res)) = Pin::new(&mut answer).poll(cx) {
                        return Poll::Ready(Ok(Ok(res)));
                    }
                    return Poll::Ready(Err(Failure::Sent(e)));
                }
            }
        }
        Poll::Pending
    })
    .await?;
    Ok((res, upload))
}

/// Removes what HTTP/2 forbids; most requests carry none of it, and the one pass
/// over the names costs no lookup.
fn make_legal(headers: &mut HeaderMap) {
    let (mut forbidden, mut te) = (false, false);
    for name in headers.keys() {
        if name == header::TE {
            te = true;
        } else if CONNECTION_SPECIFIC.contains(name) {
            forbidden = true;
        }
    }
    // `TE: trailers` (gRPC) is the one TE value HTTP/2 allows.
    let trailers_only = te && headers.get_all(header::TE).iter().all(|v| v == "trailers");
    if forbidden {
        // The hop-by-hop headers and those `Connection` lists; TE among them.
        crate::relay::strip_hop_by_hop(headers);
        headers.remove(header::UPGRADE);
        if trailers_only {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
    } else if te && !trailers_only {
        headers.remove(header::TE);
    }
}

/// A request body on its way to the node, as HTTP/2 flow control lets it.
struct Upload {
    body: Outgoing,
    stream: SendStream<Bytes>,
    /// A chunk read from the body and waiting for the node's window.
    waiting: Option<(Bytes, bool)>,
}

impl Upload {
    fn new(body: Outgoing, stream: SendStream<Bytes>) -> Upload {
        Upload {
            body,
            stream,
            waiting: None,
        }
    }

    /// Sends the body to its end. A failure of the caller's body is the caller's, one
    /// of the stream the node's; either way the stream is reset, never left open.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), SendError>> {
        let sent = ready!(self.poll_send_inner(cx));
        if sent.is_err() {
            self.stream.send_reset(Reason::CANCEL);
        }
        Poll::Ready(sent)
    }

    fn poll_send_inner(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), SendError>> {
        let node = |e: ::h2::Error| failed("sending the request's body", &e);
        loop {
            // Woken if the node resets the stream while this waits.
            if let Poll::Ready(reason) = self.stream.poll_reset(cx) {
                return Poll::Ready(Err(match reason {
                    Ok(reason) => SendError::H2(format!(
                        "HTTP/2, sending the request's body: the node reset the stream ({reason:?})"
                    )),
                    Err(e) => node(e),
                }));
            }
            if let Some((chunk, last)) = self.waiting.take() {
                if self.stream.capacity() == 0 {
                    self.waiting = Some((chunk, last));
                    match ready!(self.stream.poll_capacity(cx)) {
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => return Poll::Ready(Err(node(e))),
                        None => {
                            return Poll::Ready(Err(SendError::H2(
                                "the node closed the stream before the request's body was sent"
                                    .into(),
                            )))
                        }
                    }
                }
                self.stream.send_data(chunk, last).map_err(node)?;
                if last {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            // The next frame is read before any window is claimed: a claim for a
            // body that has nothing yet would hold the connection's window.
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(chunk) => {
                        let last = self.body.is_end_stream();
                        if chunk.has_remaining() {
                            // A claim of one byte: `h2` raises it to what is buffered
                            // when the chunk is sent; a claim of the whole chunk per
                            // stream would starve the others of the window (hyper's
                            // #4003).
                            self.stream.reserve_capacity(1);
                            self.waiting = Some((chunk, last));
                        } else if last {
                            self.stream.send_data(chunk, true).map_err(node)?;
                            return Poll::Ready(Ok(()));
                        }
                    }
                    Err(frame) => {
                        if let Ok(mut trailers) = frame.into_trailers() {
                            make_legal(&mut trailers);
                            self.stream.reserve_capacity(0);
                            self.stream.send_trailers(trailers).map_err(node)?;
                            return Poll::Ready(Ok(()));
                        }
                    }
                },
                Some(Err(e)) => return Poll::Ready(Err(SendError::from_body(e))),
                None => {
                    self.stream.send_data(Bytes::new(), true).map_err(node)?;
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

/// A node's answer body; what is read is given back to the node's window at once.
pub struct ResponseBody {
    recv: RecvStream,
    data_done: bool,
    /// What is left of a declared `Content-Length` (`h2` checks the length).
    remaining: Option<u64>,
    /// Held while the request's body is still being sent on another task: dropped
    /// with this body, it tells that task to reset the stream.
    _upload: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let me = self.get_mut();
        if !me.data_done {
            match ready!(me.recv.poll_data(cx)) {
                Some(Ok(chunk)) => {
                    let _ = me.recv.flow_control().release_capacity(chunk.len());
                    if let Some(left) = me.remaining.as_mut() {
                        *left = left.saturating_sub(chunk.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(chunk))));
                }
                // A reset after the answer's end (NO_ERROR, RFC 9113 8.1: the node
                // did not need the rest of the request) is an end for `h2`; any
                // reset before it cuts the answer short.
                Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                None => me.data_done = true,
            }
        }
        match ready!(me.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e.into()))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.remaining.map(SizeHint::with_exact).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_headers_and_the_connections_listed_ones_go() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("x-hop, close"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        make_legal(&mut h);
        assert_eq!(h.keys().collect::<Vec<_>>(), ["x-kept"]);
    }

    #[test]
    fn te_trailers_is_kept_for_grpc() {
        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        make_legal(&mut h);
        assert_eq!(h[header::TE], "trailers");
    }
}
