//! Property tests of the response parser and framing, against hyper's HTTP/1.1
//! client reading the same bytes.
//!
//! - Every well-formed answer (any status with a body, headers, `Content-Length`,
//!   chunked with extensions and trailers, close-delimited, after interim answers),
//!   arriving in any split, reads back exactly: same status, headers, body and
//!   trailers as hyper reads.
//! - The same answers with one byte changed, inserted or removed: pillion may refuse
//!   what hyper accepts (it is stricter), but when both accept, both read the same.
//!
//! `H1_PROP_CASES` sets the cases per property (50 000 each by default, so 10^5 in the
//! suite); `scripts/h1-props` runs 10^7.

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, StatusCode};
use http_body_util::BodyExt;
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{accept_head, next_head, Framing};
use crate::h1::framing::Step;

/// What a reader made of an answer.
#[derive(Debug, PartialEq)]
struct Read {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
    trailers: Option<HeaderMap>,
}

/// pillion's parser on `input`, delivered in pieces cut at `cuts`, then the end of
/// the connection.
fn ours(input: &[u8], cuts: &[usize]) -> Result<Read, String> {
    let mut pieces = Vec::new();
    let mut at = 0;
    for p in crate::testing::cut_points(input.len(), cuts) {
        pieces.push(&input[at..p]);
        at = p;
    }
    let mut pieces = pieces.into_iter();
    let mut buf = BytesMut::new();
    let mut interim = 0;
    // The head.
    let mut head = loop {
        if let Some(head) = next_head(&mut buf, &mut interim)? {
            break head;
        }
        match pieces.next() {
            Some(p) => buf.extend_from_slice(p),
            None => return Err("closed before the head".into()),
        }
    };
    let (framing, _) = accept_head(&mut head, &buf, false, false)?;
    let Framing::Body(mut reader) = framing else {
        return Err("an upgrade, not asked for".into());
    };
    // The client's own body reader, fed the pieces as its connection would be.
    let mut body = Vec::new();
    let mut trailers = None;
    loop {
        match reader.step(&mut buf)? {
            Step::Frame(f) => match f.into_data() {
                Ok(d) => body.extend_from_slice(&d),
                Err(f) => trailers = f.into_trailers().ok(),
            },
            Step::End => break,
            Step::NeedMore => match pieces.next() {
                Some(p) => buf.extend_from_slice(p),
                None => {
                    reader.closed()?;
                    break;
                }
            },
        }
    }
    Ok(Read {
        status: head.status,
        headers: head.headers,
        body,
        trailers,
    })
}

/// hyper's client on the same bytes, then the end of the connection.
async fn hypers(input: Vec<u8>) -> Result<Read, String> {
    let (client, mut node) = tokio::io::duplex(1 << 20);
    // The node answers once it has the request, then closes its side.
    let answer = tokio::spawn(async move {
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
            match node.read(&mut buf).await {
                Ok(0) | Err(_) => return node,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
        let _ = node.write_all(&input).await;
        let _ = node.shutdown().await;
        node
    });
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(client))
            .await
            .map_err(|e| e.to_string())?;
    let conn = tokio::spawn(conn);
    let req = http::Request::get("/")
        .header(http::header::HOST, "node")
        .body(http_body_util::Empty::<Bytes>::new())
        .expect("request");
    let read = async {
        let res = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let (parts, body) = res.into_parts();
        let collected = body.collect().await.map_err(|e| e.to_string())?;
        let trailers = collected.trailers().cloned();
        Ok(Read {
            status: parts.status,
            headers: parts.headers,
            body: collected.to_bytes().to_vec(),
            trailers,
        })
    };
    let out = read.await;
    conn.abort();
    let _ = answer.await;
    out
}

/// A header name that is neither framing nor hop-by-hop.
fn name() -> impl Strategy<Value = String> {
    "x-[a-z]{1,10}"
}

fn value() -> impl Strategy<Value = String> {
    "[!-~]([ -~]{0,20}[!-~])?"
}

#[derive(Debug, Clone)]
enum Frame {
    Length,
    /// Chunk sizes (cycled over the body), whether each size line has an extension,
    /// and trailers.
    Chunked(Vec<usize>, bool, Vec<(String, String)>),
    Close,
}

/// A well-formed answer, as bytes.
fn answer() -> impl Strategy<Value = Vec<u8>> {
    let frame = prop_oneof![
        Just(Frame::Length),
        (
            proptest::collection::vec(1usize..40, 1..5),
            any::<bool>(),
            proptest::collection::vec((name(), value()), 0..3)
        )
            .prop_map(|(sizes, ext, trailers)| Frame::Chunked(sizes, ext, trailers)),
        Just(Frame::Close),
    ];
    (
        prop::sample::select(vec![200u16, 201, 203, 206, 301, 400, 404, 500, 503]),
        any::<bool>(),
        0usize..3,
        proptest::collection::vec((name(), value()), 0..5),
        proptest::collection::vec(any::<u8>(), 0..200),
        frame,
    )
        .prop_map(|(status, http10, interim, headers, body, frame)| {
            let mut out = Vec::new();
            let version = if http10 && !matches!(frame, Frame::Chunked(..)) {
                "HTTP/1.0"
            } else {
                "HTTP/1.1"
            };
            for _ in 0..interim {
                out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
            }
            out.extend_from_slice(format!("{version} {status} Something\r\n").as_bytes());
            for (k, v) in &headers {
                out.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
            }
            match &frame {
                Frame::Length => {
                    out.extend_from_slice(
                        format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes(),
                    );
                    out.extend_from_slice(&body);
                }
                Frame::Chunked(sizes, ext, trailers) => {
                    out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
                    let mut rest = &body[..];
                    let mut i = 0;
                    while !rest.is_empty() {
                        let n = sizes[i % sizes.len()].min(rest.len());
                        let ext = if *ext { ";name=\"v\"" } else { "" };
                        out.extend_from_slice(format!("{n:x}{ext}\r\n").as_bytes());
                        out.extend_from_slice(&rest[..n]);
                        out.extend_from_slice(b"\r\n");
                        rest = &rest[n..];
                        i += 1;
                    }
                    out.extend_from_slice(b"0\r\n");
                    for (k, v) in trailers {
                        out.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
                    }
                    out.extend_from_slice(b"\r\n");
                }
                Frame::Close => {
                    out.extend_from_slice(b"Connection: close\r\n\r\n");
                    out.extend_from_slice(&body);
                }
            }
            out
        })
}

fn cases() -> u32 {
    std::env::var("H1_PROP_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000)
}

/// Runs `fut` on this test thread's runtime (one per thread, not per case).
fn block_on<T>(fut: impl std::future::Future<Output = T>) -> T {
    thread_local! {
        static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
    }
    RUNTIME.with(|rt| rt.block_on(fut))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn well_formed_answers_read_as_hyper_reads_them_in_any_split(
        input in answer(),
        cuts in proptest::collection::vec(any::<usize>(), 0..6),
    ) {
        let mine = ours(&input, &cuts);
        let reference = block_on(hypers(input.clone()));
        let reference = match reference {
            Ok(r) => r,
            Err(e) => return Err(TestCaseError::fail(format!("hyper refused it: {e}"))),
        };
        prop_assert_eq!(mine, Ok(reference), "{:?}", String::from_utf8_lossy(&input));
    }

    #[test]
    fn when_both_accept_a_damaged_answer_both_read_the_same(
        input in answer(),
        at in any::<usize>(),
        byte in any::<u8>(),
        how in 0u8..3,
        cuts in proptest::collection::vec(any::<usize>(), 0..4),
    ) {
        let mut input = input;
        let i = at % input.len().max(1);
        match how {
            0 if !input.is_empty() => input[i] = byte,
            1 => input.insert(i.min(input.len()), byte),
            _ if !input.is_empty() => { input.remove(i); }
            _ => {}
        }
        let mine = ours(&input, &cuts);
        let reference = block_on(hypers(input.clone()));
        if let (Ok(mine), Ok(reference)) = (mine, reference) {
            prop_assert_eq!(&mine.status, &reference.status);
            prop_assert_eq!(&mine.body, &reference.body, "{:?}", String::from_utf8_lossy(&input));
            prop_assert_eq!(&mine.trailers, &reference.trailers);
        }
    }
}
