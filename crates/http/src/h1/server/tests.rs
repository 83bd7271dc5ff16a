//! pillion's HTTP/1.1 server against a client that writes bytes, well-formed or not,
//! in any split, on a paused clock: what the handler is given, what the client reads
//! back, and how the connection ends.

use std::convert::Infallible;

use http::{HeaderMap, HeaderValue};
use http_body_util::BodyExt;
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::h1::codec::{Chunked, Decoded};

const CLOCKS: Clocks = Clocks {
    head: Duration::from_secs(10),
    body: Duration::from_secs(60),
    idle: Duration::from_secs(60),
};

/// The request as the handler got it: `METHOD target VERSION`, its fields sorted by
/// name, an empty line, the body, and its trailers if any.
fn summary(
    method: &str,
    target: &str,
    version: &str,
    fields: &[(String, String)],
    body: &[u8],
    trailers: &[(String, String)],
) -> Vec<u8> {
    let mut fields = fields.to_vec();
    fields.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = format!("{method} {target} {version}\n").into_bytes();
    for (k, v) in fields {
        out.extend_from_slice(format!("{k}: {v}\n").as_bytes());
    }
    out.push(b'\n');
    out.extend_from_slice(body);
    for (k, v) in trailers {
        out.extend_from_slice(format!("\ntrailer {k}: {v}").as_bytes());
    }
    out
}

fn pairs(map: &HeaderMap) -> Vec<(String, String)> {
    map.iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

/// The test handler: answers with [`summary`] of the request, or 400 naming why its
/// body could not be read; `/early` answers at once without reading the body.
async fn echo(req: Request<RequestBody>) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() == "/early" {
        let mut res = Response::new(Full::new(Bytes::from_static(b"early")));
        *res.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
        return Ok(res);
    }
    let (parts, body) = req.into_parts();
    let version = match parts.version {
        Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    };
    match body.collect().await {
        Ok(collected) => {
            let trailers = collected.trailers().map(pairs).unwrap_or_default();
            let body = collected.to_bytes();
            Ok(Response::new(Full::new(Bytes::from(summary(
                parts.method.as_str(),
                &parts.uri.to_string(),
                version,
                &pairs(&parts.headers),
                &body,
                &trailers,
            )))))
        }
        Err(e) => {
            let mut res = Response::new(Full::new(Bytes::from(format!("body failed: {e}"))));
            *res.status_mut() = StatusCode::BAD_REQUEST;
            Ok(res)
        }
    }
}

/// How the server's side of a connection ended.
#[derive(Debug, PartialEq)]
enum End {
    Closed,
    /// Handed to hyper, with these bytes read ahead.
    Handover(Vec<u8>),
}

/// A client that writes `input` in pieces cut at `cuts`, then (if `close`) ends its
/// side; what it read back until the server closed, and how the server ended. A
/// server that neither answers nor closes is caught by a deadline that fires only
/// when nothing else can run (the clock is paused).
fn exchange(input: &[u8], cuts: &[usize], close: bool) -> (Vec<u8>, End) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        let (client, server) = tokio::io::duplex(1 << 16);
        let (mut from_server, mut to_server) = tokio::io::split(client);
        let served = tokio::spawn(async move {
            let drain = Drain::new();
            let settings = Settings {
                clocks: CLOCKS,
                drain: &drain,
                idlers: &Idlers::new(),
            };
            match serve(Socket::Mem(server), settings, echo).await {
                Served::Closed => End::Closed,
                Served::Handover(mut joined, _) => {
                    let ahead = joined.read_ahead.to_vec();
                    // Like hyper, which answers and closes: the client sees an end.
                    let _ = joined.shutdown().await;
                    End::Handover(ahead)
                }
            }
        });
        let (input, cuts) = (input.to_vec(), cuts.to_vec());
        let writer = tokio::spawn(async move {
            if !crate::testing::write_in_pieces(&mut to_server, &input, &cuts).await {
                return;
            }
            if !close {
                // Held open past every clock of the server, then closed.
                tokio::time::sleep(Duration::from_secs(120)).await;
            }
            let _ = to_server.shutdown().await;
            std::future::pending::<()>().await;
        });
        let mut answers = Vec::new();
        let read = tokio::time::timeout(
            Duration::from_secs(3600),
            from_server.read_to_end(&mut answers),
        )
        .await;
        writer.abort();
        assert!(
            read.is_ok(),
            "the server neither answered nor closed; it sent {:?}",
            String::from_utf8_lossy(&answers)
        );
        let end = tokio::time::timeout(Duration::from_secs(3600), served)
            .await
            .expect("the server's side ended")
            .expect("the server did not panic");
        (answers, end)
    })
}

/// One answer as the client reads it.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: HeaderMap,
    body: Vec<u8>,
}

/// Reads every answer in `bytes`; each must be whole and framed as RFC 9112 says.
fn answers(mut bytes: &[u8], head_request: &[bool]) -> Vec<Answer> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let mut fields = [httparse::EMPTY_HEADER; 64];
        let mut res = httparse::Response::new(&mut fields);
        let len = match res.parse(bytes) {
            Ok(httparse::Status::Complete(n)) => n,
            other => panic!(
                "not a whole answer ({other:?}): {:?}",
                String::from_utf8_lossy(bytes)
            ),
        };
        assert_eq!(res.version, Some(1), "answered as HTTP/1.1");
        let status = res.code.unwrap();
        let mut headers = HeaderMap::new();
        for f in res.headers.iter() {
            headers.append(
                http::HeaderName::from_bytes(f.name.as_bytes()).unwrap(),
                HeaderValue::from_bytes(f.value).unwrap(),
            );
        }
        bytes = &bytes[len..];
        let head_only = head_request.get(out.len()).copied().unwrap_or(false);
        let body = if head_only || status == 204 || status == 304 {
            Vec::new()
        } else if headers.get("transfer-encoding").is_some() {
            let mut buf = BytesMut::from(bytes);
            let mut state = Chunked::Size;
            let mut body = Vec::new();
            loop {
                match state.decode(&mut buf).expect("a well-formed chunked body") {
                    Decoded::Frame(f) => body.extend_from_slice(&f.into_data().unwrap()),
                    Decoded::End => break,
                    Decoded::NeedMore => panic!("a chunked body cut short"),
                }
            }
            bytes = &bytes[bytes.len() - buf.len()..];
            body
        } else if let Some(n) = headers.get("content-length") {
            let n: usize = n.to_str().unwrap().parse().unwrap();
            assert!(bytes.len() >= n, "a body cut short");
            let body = bytes[..n].to_vec();
            bytes = &bytes[n..];
            body
        } else {
            let body = bytes.to_vec();
            bytes = &[];
            body
        };
        out.push(Answer {
            status,
            headers,
            body,
        });
    }
    out
}

/// One well-formed request (see [`crate::testing::request`]): its bytes and the
/// summary the handler must see.
fn request() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
    crate::testing::request().prop_map(|r| {
        let expected = summary(
            r.method,
            &r.target,
            "HTTP/1.1",
            &r.fields,
            &r.body,
            &r.trailers,
        );
        (r.bytes, expected)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(crate::testing::framing_cases()))]

    #[test]
    fn well_formed_requests_in_any_split_reach_the_handler_as_sent(
        requests in prop::collection::vec(request(), 1..5),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let input: Vec<u8> = requests.iter().flat_map(|(r, _)| r.clone()).collect();
        let (out, end) = exchange(&input, &cuts, true);
        let got = answers(&out, &[]);
        prop_assert_eq!(got.len(), requests.len(), "{}", String::from_utf8_lossy(&out));
        for (answer, (_, expected)) in got.iter().zip(&requests) {
            prop_assert_eq!(answer.status, 200);
            prop_assert_eq!(
                String::from_utf8_lossy(&answer.body),
                String::from_utf8_lossy(expected)
            );
        }
        prop_assert_eq!(end, End::Closed);
    }

    #[test]
    fn any_bytes_end_in_answers_a_handover_or_a_close_never_a_hang(
        input in prop::collection::vec(
            prop_oneof![
                4 => any::<u8>(),
                2 => Just(b'\r'),
                2 => Just(b'\n'),
                1 => Just(b' '),
                1 => Just(b':'),
            ],
            0..600,
        ),
        prefix in prop::sample::select(vec![
            &b""[..],
            b"GET / HTTP/1.1\r\nHost: x\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /",
        ]),
        cuts in prop::collection::vec(any::<usize>(), 0..6),
        close in any::<bool>(),
    ) {
        let input = [prefix, &input].concat();
        let (out, end) = exchange(&input, &cuts, close);
        // Whatever was answered is whole and well framed; a refusal says why.
        for a in answers(&out, &[]) {
            if a.status >= 400 && a.headers.get("content-type").is_some() {
                let body = String::from_utf8_lossy(&a.body);
                prop_assert!(body.contains("\"detail\""), "{}", body);
            }
        }
        if let End::Handover(ahead) = end {
            // Only a whole head that hyper is to serve, with what followed it.
            prop_assert!(
                ahead.starts_with(H2_PREFACE) || bare_lf(&ahead).is_some()
                    || ahead.windows(2).any(|w| w == b"\r\n"),
                "{:?}", String::from_utf8_lossy(&ahead)
            );
        }
    }
}

#[test]
fn a_bare_lf_is_refused_after_the_answers_before_it() {
    let (out, end) = exchange(
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\nHost: x\n\nGET /c HTTP/1.1\r\nHost: x\r\n\r\n",
        &[],
        false,
    );
    let got = answers(&out, &[]);
    assert_eq!(got.len(), 2, "{}", String::from_utf8_lossy(&out));
    assert_eq!(got[0].status, 200);
    assert!(got[0].body.starts_with(b"GET /a HTTP/1.1"));
    assert_eq!(got[1].status, 400);
    assert!(String::from_utf8_lossy(&got[1].body).contains("bare LF"));
    assert_eq!(got[1].headers["connection"], "close");
    assert_eq!(end, End::Closed);
}

#[test]
fn framings_that_could_smuggle_a_request_are_refused() {
    for (request, status, why) in [
        (
            &b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n"[..],
            400,
            "both Transfer-Encoding and Content-Length",
        ),
        (
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
            "Transfer-Encoding in HTTP/1.0",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            501,
            "only one chunked",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            501,
            "only one chunked",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked,\r\n\r\n0\r\n\r\n",
            400,
            "empty element in Transfer-Encoding",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n",
            400,
            "invalid Content-Length",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
            400,
            "different Content-Length",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\nabc",
            400,
            "invalid Content-Length",
        ),
        (
            b"GET /a\x01b HTTP/1.1\r\nHost: x\r\n\r\n",
            400,
            "not valid HTTP/1.1",
        ),
    ] {
        let (out, end) = exchange(request, &[], false);
        let got = answers(&out, &[]);
        assert_eq!(got.len(), 1, "{}", String::from_utf8_lossy(&out));
        assert_eq!(got[0].status, status, "{}", String::from_utf8_lossy(request));
        let body = String::from_utf8_lossy(&got[0].body);
        assert!(body.contains(why), "{body}");
        assert_eq!(end, End::Closed);
    }
    // The same length twice, in one field or two, is one length.
    let (out, _) = exchange(
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 3\r\nContent-Length: 3\r\n\r\nabc",
        &[],
        true,
    );
    assert_eq!(answers(&out, &[])[0].status, 200);
}

#[test]
fn heads_too_large_or_with_too_many_fields_get_a_431() {
    let mut big = b"GET / HTTP/1.1\r\nHost: x\r\nx-big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', MAX_HEAD + 10));
    let (out, end) = exchange(&big, &[1000, 5000, 40000], false);
    let got = answers(&out, &[]);
    assert_eq!(got[0].status, 431, "{}", String::from_utf8_lossy(&out));
    assert_eq!(end, End::Closed);

    let mut many = b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..MAX_HEADERS {
        many.extend_from_slice(format!("x-{i}: {i}\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    let (out, _) = exchange(&many, &[], false);
    let got = answers(&out, &[]);
    assert_eq!(got[0].status, 431);
    assert!(String::from_utf8_lossy(&got[0].body).contains("more than 100 header fields"));
}

#[test]
fn http_1_0_keeps_the_connection_only_when_asked() {
    let (out, end) = exchange(
        b"GET /a HTTP/1.0\r\n\r\nGET /never HTTP/1.0\r\n\r\n",
        &[],
        false,
    );
    let got = answers(&out, &[]);
    assert_eq!(got.len(), 1, "{}", String::from_utf8_lossy(&out));
    assert!(got[0].body.starts_with(b"GET /a HTTP/1.0"));
    assert_eq!(got[0].headers["connection"], "close");
    assert_eq!(end, End::Closed);

    let (out, _) = exchange(
        b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /b HTTP/1.0\r\n\r\n",
        &[],
        false,
    );
    let got = answers(&out, &[]);
    assert_eq!(got.len(), 2, "{}", String::from_utf8_lossy(&out));
    assert_eq!(got[0].headers["connection"], "keep-alive");
    assert_eq!(got[1].headers["connection"], "close");
}

#[test]
fn connection_close_from_the_client_ends_after_its_answer() {
    let (out, end) = exchange(
        b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n",
        &[],
        false,
    );
    let got = answers(&out, &[]);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].headers["connection"], "close");
    assert_eq!(end, End::Closed);
}

#[test]
fn an_early_answer_reaches_the_client_before_the_connection_closes() {
    // The handler answers without reading a body still arriving: the answer is
    // whole, the rest of the body is read and dropped, and the connection ends.
    let mut upload = b"POST /early HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n".to_vec();
    upload.extend(std::iter::repeat_n(b'x', 100_000));
    upload.extend_from_slice(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n");
    let (out, end) = exchange(&upload, &[70, 9000], false);
    let got = answers(&out, &[]);
    assert_eq!(got.len(), 1, "{}", String::from_utf8_lossy(&out));
    assert_eq!((got[0].status, &got[0].body[..]), (413, &b"early"[..]));
    assert_eq!(end, End::Closed);
}

#[test]
fn what_hyper_serves_is_handed_over_with_the_bytes_read() {
    for input in [
        &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04"[..],
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\nframes",
    ] {
        let (out, end) = exchange(input, &[5], false);
        assert_eq!(out, b"", "{}", String::from_utf8_lossy(input));
        assert_eq!(end, End::Handover(input.to_vec()));
    }
    // After requests pillion served: those are answered first.
    let ws = b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n";
    let input = [&b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"[..], ws].concat();
    let (out, end) = exchange(&input, &[], false);
    assert_eq!(answers(&out, &[]).len(), 1);
    assert_eq!(end, End::Handover(ws.to_vec()));
}

#[test]
fn answers_are_framed_by_the_body_and_the_method() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    // (request, the handler's answer, what the client must read)
    type Make = fn() -> Response<http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>>;
    let stream: Make = || {
        let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![
            Ok(Frame::data(Bytes::from_static(b"hello "))),
            Ok(Frame::data(Bytes::from_static(b"world"))),
        ];
        Response::new(
            http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync(),
        )
    };
    let whole: Make = || {
        let mut res = Response::new(Full::new(Bytes::from_static(b"abc")).boxed_unsync());
        res.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("99"));
        res.headers_mut().insert(
            header::DATE,
            HeaderValue::from_static("Mon, 07 Dec 2026 08:00:00 GMT"),
        );
        res
    };
    let no_content: Make = || {
        let mut res = Response::new(Full::new(Bytes::new()).boxed_unsync());
        *res.status_mut() = StatusCode::NO_CONTENT;
        res.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        res
    };
    let head_of: Make = || {
        let mut res = Response::new(Full::new(Bytes::new()).boxed_unsync());
        res.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("1234"));
        res
    };
    for (request, make, expect) in [
        (
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            stream,
            "HTTP/1.1 200 OK\r\ndate: <date>\r\ntransfer-encoding: chunked\r\n\r\n6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n",
        ),
        (
            b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
            stream,
            "HTTP/1.1 200 OK\r\ndate: <date>\r\nconnection: close\r\n\r\nhello world",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            whole,
            "HTTP/1.1 200 OK\r\ndate: <the handler's>\r\ncontent-length: 3\r\n\r\nabc",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            no_content,
            "HTTP/1.1 204 No Content\r\ndate: <date>\r\n\r\n",
        ),
        (
            b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n",
            head_of,
            "HTTP/1.1 200 OK\r\ncontent-length: 1234\r\ndate: <date>\r\n\r\n",
        ),
    ] {
        let out = rt.block_on(async {
            let (mut client, server) = tokio::io::duplex(1 << 16);
            let drain = Drain::new();
            let task = tokio::spawn(async move {
                let settings = Settings {
                    clocks: CLOCKS,
                    drain: &drain,
                    idlers: &Idlers::new(),
                };
                serve(Socket::Mem(server), settings, move |_req| async move {
                    Ok::<_, Infallible>(make())
                })
                .await;
            });
            client.write_all(request).await.unwrap();
            let mut out = vec![0u8; 4096];
            let n = client.read(&mut out).await.unwrap();
            out.truncate(n);
            drop(client);
            task.await.unwrap();
            String::from_utf8(out).unwrap()
        });
        let dates: Vec<&str> = out.lines().filter_map(|l| l.strip_prefix("date: ")).collect();
        assert_eq!(dates.len(), 1, "one Date: {out}");
        let shown = if dates[0] == "Mon, 07 Dec 2026 08:00:00 GMT" {
            "<the handler's>"
        } else {
            assert!(dates[0].ends_with(" GMT") && dates[0].len() == 29, "{out}");
            "<date>"
        };
        assert_eq!(
            out.replace(dates[0], shown),
            expect,
            "{}",
            String::from_utf8_lossy(request)
        );
    }
}

#[test]
fn the_request_target_is_encoded_where_clients_send_it_raw() {
    let (out, _) = exchange(
        b"GET /broker?topic=events.> HTTP/1.1\r\nHost: x\r\n\r\nGET /a?q=\"x\"&t={1} HTTP/1.1\r\nHost: x\r\n\r\n",
        &[7, 30],
        true,
    );
    let got = answers(&out, &[]);
    assert!(got[0]
        .body
        .starts_with(b"GET /broker?topic=events.%3E HTTP/1.1"));
    assert!(got[1]
        .body
        .starts_with(b"GET /a?q=%22x%22&t=%7B1%7D HTTP/1.1"));
}

#[tokio::test(start_paused = true)]
async fn a_head_that_does_not_arrive_in_time_ends_the_connection_and_so_does_a_long_idle() {
    let serve_on = |server| spawn_echo(server, Idlers::new());
    // Half a head after a whole request: cut off 10 s after its first byte.
    let (mut client, server) = tokio::io::duplex(4096);
    let task = serve_on(server);
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHo")
        .await
        .unwrap();
    let started = Instant::now();
    let mut out = Vec::new();
    client.read_to_end(&mut out).await.unwrap();
    assert_eq!(answers(&out, &[]).len(), 1);
    assert!(task.await.unwrap());
    assert_eq!(started.elapsed(), Duration::from_secs(10));

    // A connection that never sends its first head is cut off too.
    let (mut client, server) = tokio::io::duplex(4096);
    let task = serve_on(server);
    let started = Instant::now();
    client.read_to_end(&mut out).await.unwrap();
    assert!(task.await.unwrap());
    assert_eq!(started.elapsed(), Duration::from_secs(10));

    // An idle connection between requests is closed after the idle timeout (60 s),
    // not the head's (10 s).
    let (mut client, server) = tokio::io::duplex(4096);
    let task = serve_on(server);
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    assert!(client.read(&mut buf).await.unwrap() > 0);
    let waited = Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(600), client.read(&mut buf)).await;
    assert!(
        matches!(end, Ok(Ok(0))),
        "the idle connection was not closed: {end:?}"
    );
    assert_eq!(waited.elapsed(), Duration::from_secs(60));
    assert!(task.await.unwrap());
}

#[tokio::test(start_paused = true)]
async fn a_drain_closes_idle_connections_and_lets_a_request_in_flight_finish() {
    let drain = Drain::new();
    let (mut client, server) = tokio::io::duplex(4096);
    let (gate, opened) = tokio::sync::oneshot::channel::<()>();
    let opened = Arc::new(Mutex::new(Some(opened)));
    let d = drain.clone();
    let task = tokio::spawn(async move {
        let settings = Settings {
            clocks: CLOCKS,
            drain: &d,
            idlers: &Idlers::new(),
        };
        let conn = serve(Socket::Mem(server), settings, move |_req| {
            let opened = opened.lock().unwrap().take();
            async move {
                if let Some(o) = opened {
                    let _ = o.await;
                }
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"done"))))
            }
        });
        d.watch(conn, |_| {}).await;
    });
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    let draining = tokio::spawn({
        let drain = drain.clone();
        async move { drain.drain().await }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(
        !draining.is_finished(),
        "the request in flight was not waited for"
    );
    gate.send(()).unwrap();
    let mut out = Vec::new();
    client.read_to_end(&mut out).await.unwrap();
    let got = answers(&out, &[]);
    assert_eq!((got.len(), &got[0].body[..]), (1, &b"done"[..]));
    assert_eq!(got[0].headers["connection"], "close");
    draining.await.unwrap();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_client_that_goes_away_cancels_the_answer_being_prepared() {
    /// Set when the handler's future is dropped before it answered.
    struct Cancelled(Arc<std::sync::atomic::AtomicBool>);
    impl Drop for Cancelled {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
    let cancelled = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (mut client, server) = tokio::io::duplex(4096);
    let flag = cancelled.clone();
    let task = tokio::spawn(async move {
        let drain = Drain::new();
        let settings = Settings {
            clocks: CLOCKS,
            drain: &drain,
            idlers: &Idlers::new(),
        };
        let served = serve(Socket::Mem(server), settings, move |_req| {
            let guard = Cancelled(flag.clone());
            async move {
                std::future::pending::<()>().await;
                drop(guard);
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
            }
        });
        matches!(served.await, Served::Closed)
    });
    client
        .write_all(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(!cancelled.load(std::sync::atomic::Ordering::SeqCst));
    drop(client);
    assert!(task.await.unwrap(), "the connection ended");
    assert!(
        cancelled.load(std::sync::atomic::Ordering::SeqCst),
        "the answer's future was dropped"
    );
}

#[test]
fn connect_is_refused_with_405_and_the_connection_closes() {
    let (out, end) = exchange(
        b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n",
        &[],
        false,
    );
    let got = answers(&out, &[]);
    assert_eq!(got.len(), 1, "{}", String::from_utf8_lossy(&out));
    assert_eq!(got[0].status, 405);
    assert!(String::from_utf8_lossy(&got[0].body).contains("not a forward proxy"));
    assert_eq!(end, End::Closed);
}

#[test]
fn an_upgrade_is_checked_before_it_is_handed_over() {
    for (input, status) in [
        (
            &b"GET /ws HTTP/1.1\nHost: x\r\nUpgrade: websocket\r\n\r\n"[..],
            400,
        ),
        (
            b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            400,
        ),
        (
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            501,
        ),
        (
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
        ),
    ] {
        let (out, end) = exchange(input, &[], false);
        let got = answers(&out, &[]);
        assert_eq!(got.len(), 1, "{}", String::from_utf8_lossy(input));
        assert_eq!(got[0].status, status, "{}", String::from_utf8_lossy(input));
        assert_eq!(end, End::Closed);
    }
    // A raw `>` in its target is encoded, as in every request pillion serves.
    let (_, end) = exchange(
        b"GET /broker?topic=a.> HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n",
        &[],
        false,
    );
    assert_eq!(
        end,
        End::Handover(
            b"GET /broker?topic=a.%3E HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n".to_vec()
        )
    );
}

#[test]
fn an_upgrade_with_a_body_is_served_here_without_the_upgrade() {
    let input =
        b"POST /up HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nContent-Length: 3\r\n\r\nabc";
    let (out, end) = exchange(input, &[], true);
    let got = answers(&out, &[]);
    assert_eq!(got.len(), 1, "{}", String::from_utf8_lossy(&out));
    let body = String::from_utf8_lossy(&got[0].body).into_owned();
    assert!(body.starts_with("POST /up HTTP/1.1\n"), "{body}");
    assert!(!body.contains("upgrade:"), "{body}");
    assert!(body.ends_with("\n\nabc"), "{body}");
    assert_eq!(end, End::Closed);
}

/// The echo server on `server`, among `idlers`' connections; whether it ended by
/// closing (not by a hand-over).
fn spawn_echo(
    server: tokio::io::DuplexStream,
    idlers: Arc<Idlers>,
) -> tokio::task::JoinHandle<bool> {
    tokio::spawn(async move {
        let drain = Drain::new();
        let settings = Settings {
            clocks: CLOCKS,
            drain: &drain,
            idlers: &idlers,
        };
        matches!(
            serve(Socket::Mem(server), settings, echo).await,
            Served::Closed
        )
    })
}

/// Reads from `client` until `want` has come (10 s of the paused clock at most).
async fn read_until(client: &mut tokio::io::DuplexStream, want: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !out.windows(want.len()).any(|w| w == want) {
        match tokio::time::timeout(Duration::from_secs(10), client.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            other => panic!(
                "{other:?} before {:?}: {:?}",
                String::from_utf8_lossy(want),
                String::from_utf8_lossy(&out)
            ),
        }
    }
    out
}

#[tokio::test(start_paused = true)]
async fn expect_100_continue_is_answered_here_and_the_connection_stays_pillions() {
    let (mut client, server) = tokio::io::duplex(1 << 16);
    let task = spawn_echo(server, Idlers::new());
    client
        .write_all(
            b"POST /u HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
        )
        .await
        .unwrap();
    let interim = read_until(&mut client, b"\r\n\r\n").await;
    assert_eq!(interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    client.write_all(b"abc").await.unwrap();
    let answer = read_until(&mut client, b"\n\nabc").await;
    assert!(
        answer.starts_with(b"HTTP/1.1 200 OK\r\n"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    // The next request is still parsed by pillion: a bare LF is refused.
    client
        .write_all(b"GET / HTTP/1.1\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).await.unwrap();
    let got = answers(&rest, &[]);
    assert_eq!(got.len(), 1, "{}", String::from_utf8_lossy(&rest));
    assert_eq!(got[0].status, 400);
    assert!(task.await.unwrap());
}

#[test]
fn an_early_answer_to_expect_100_continue_goes_without_the_100() {
    let (out, end) = exchange(
        b"POST /early HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
        &[],
        false,
    );
    assert!(
        out.starts_with(b"HTTP/1.1 413"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(end, End::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_full_listener_closes_its_longest_idle_connection() {
    let idlers = Idlers::new();
    let mut clients = Vec::new();
    for _ in 0..3 {
        let (mut client, server) = tokio::io::duplex(4096);
        spawn_echo(server, idlers.clone());
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        read_until(&mut client, b"\r\n\r\n").await;
        tokio::time::sleep(Duration::from_millis(10)).await;
        clients.push(client);
    }
    assert_eq!(idlers.len(), 3);
    assert!(idlers.evict_oldest());
    let mut buf = [0u8; 16];
    let first = tokio::time::timeout(Duration::from_secs(1), clients[0].read(&mut buf)).await;
    assert!(matches!(first, Ok(Ok(0))), "{first:?}");
    let second = tokio::time::timeout(Duration::from_secs(1), clients[1].read(&mut buf)).await;
    assert!(second.is_err(), "the second is still open: {second:?}");
    assert_eq!(idlers.len(), 2);
}

#[test]
fn a_clients_identity_headers_never_reach_the_handler() {
    let (out, _) = exchange(
        b"GET / HTTP/1.1\r\nHost: x\r\nX-PILLION-CALLER: admin\r\nx-pillion-subject: root\r\nX-Pillion-Subject: root2\r\nX-Other: 1\r\n\r\n",
        &[],
        true,
    );
    let got = answers(&out, &[]);
    assert_eq!(got.len(), 1, "{}", String::from_utf8_lossy(&out));
    let seen = String::from_utf8_lossy(&got[0].body).into_owned();
    assert!(!seen.contains("x-pillion-"), "{seen}");
    assert!(seen.contains("x-other: 1"), "{seen}");
}
