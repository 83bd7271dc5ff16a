//! pillion's own HTTP/1.1 client towards nodes, against a node that writes raw bytes:
//! each framing RFC 9112 allows, interim answers, a node that closes idle
//! connections, a node that answers before reading the body, and one that does not
//! speak HTTP.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{register, Sidecar};
use pillion_testkit::http::request;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A node that answers by the last path segment with fixed bytes; counts the
/// connections it accepted.
async fn scripted_node() -> (String, Arc<AtomicUsize>) {
    let (addr, accepted, _) = counting_node().await;
    (addr, accepted)
}

/// [`scripted_node`], also counting the connections that ended.
async fn counting_node() -> (String, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let accepted = Arc::new(AtomicUsize::new(0));
    let ended = Arc::new(AtomicUsize::new(0));
    let (count, end) = (accepted.clone(), ended.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let end = end.clone();
            tokio::spawn(async move {
                serve(stream).await;
                end.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, accepted, ended)
}

async fn serve(mut s: TcpStream) {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        buf.drain(..head_end);
        let path = head.split(' ').nth(1).unwrap_or("").to_string();
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        if path.ends_with("/endless-continue") {
            // 100 Continue without end, as a broken node might.
            while s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.is_ok() {
                tokio::task::yield_now().await;
            }
            return;
        }
        if path.ends_with("/bare-lf-late") {
            // The head, then (in a later packet) chunks with bare-LF line ends, and
            // the connection left open.
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                .await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = s.write_all(b"5\nhello\n0\n\n").await;
            std::future::pending::<()>().await;
        }
        if path.ends_with("/oversized") {
            // A head that never ends within any sane limit.
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\n").await;
            for i in 0..20_000 {
                let line = format!("x-filler-{i}: {}\r\n", "f".repeat(40));
                if s.write_all(line.as_bytes()).await.is_err() {
                    return;
                }
            }
            return;
        }
        if path.ends_with("/cut") {
            // Promises 10 bytes, sends 3, closes.
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
                .await;
            return;
        }
        if path.ends_with("/extra") {
            // Bytes after the body, in a later packet: not the head of any answer.
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
                .await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL")
                .await;
            std::future::pending::<()>().await;
        }
        if path.ends_with("/switch-early") {
            // Switches protocols without reading the request's body.
            let _ = s
                .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n")
                .await;
            std::future::pending::<()>().await;
        }
        if path.ends_with("/early") {
            // Refuse before reading the body, then drain it as servers do.
            let _ = s
                .write_all(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntoo big!")
                .await;
            while let Ok(n) = s.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
            }
            return;
        }
        while buf.len() < length {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..length);
        let (reply, close): (&[u8], bool) = match path.rsplit('/').next().unwrap_or("") {
            "chunked" => (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;x=1\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
                false,
            ),
            // Both lengths: chunked wins, and the 3 must not reach the caller.
            "both-lengths" => (
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                false,
            ),
            // Bare-LF chunk lines in the same packet as the head; the connection stays
            // open, so only refusing the framing ends the call.
            "bare-lf" => (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\n0\n\n",
                false,
            ),
            "bad-chunk-size" => (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
                false,
            ),
            "eof" => (
                b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end",
                true,
            ),
            "head" => (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", false),
            "continue" => (
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                false,
            ),
            // Answers, then closes the connection as an idle keep-alive timeout would.
            "bye" => (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbye", true),
            "garbage" => (b"NOT HTTP AT ALL\r\n\r\n", true),
            _ => (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nplain", false),
        };
        if path.ends_with("/big") {
            // 4 MiB with a length, written in pieces as a node streaming a file would.
            let _ = s
                .write_all(
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", 4 << 20).as_bytes(),
                )
                .await;
            for _ in 0..64 {
                if s.write_all(&[b'b'; 64 * 1024]).await.is_err() {
                    return;
                }
            }
            continue;
        }
        if s.write_all(reply).await.is_err() || close {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_framing_reaches_the_caller_and_connections_are_reused() {
    let (node, accepted) = scripted_node().await;
    let sc = Sidecar::start(&["--handler", "proxy"]);
    register(&sc, "raw", "raw-1", &node, &[]).await;
    let call = |method: http::Method, path: &str| {
        let url = sc.url(&format!("/raw/{path}"));
        async move { request(method, &url, &[], "").await.unwrap() }
    };

    let r = call(http::Method::GET, "plain").await;
    assert_eq!((r.status.as_u16(), r.text()), (200, "plain".to_string()));
    let r = call(http::Method::GET, "chunked").await;
    assert_eq!(r.text(), "hello world", "chunked, with a chunk extension");
    let r = call(http::Method::HEAD, "head").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-length"], "100", "HEAD keeps the length");
    assert!(r.body.is_empty(), "and has no body");
    let r = call(http::Method::GET, "continue").await;
    assert_eq!(
        (r.status.as_u16(), r.text()),
        (200, "ok".to_string()),
        "100 Continue is skipped"
    );
    let before_eof = accepted.load(Ordering::SeqCst);
    assert_eq!(
        before_eof, 1,
        "plain, chunked, HEAD and 100-continue answers all left the connection reusable"
    );

    let r = call(http::Method::GET, "eof").await;
    assert_eq!(
        r.text(),
        "until the end",
        "a body delimited by the end of the connection"
    );
    let r = call(http::Method::GET, "plain").await;
    assert_eq!(r.text(), "plain");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "a connection that ended its body by closing is not reused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_both_ways() {
    let (node, accepted) = scripted_node().await;
    let app = pillion_testkit::TestApp::start("echo").await;
    let sc = Sidecar::start(&["--handler", "proxy"]);
    register(&sc, "raw", "raw-1", &node, &[]).await;
    register(&sc, "echo", "echo-1", &app.addr().to_string(), &[]).await;

    let r = request(http::Method::GET, &sc.url("/raw/big"), &[], "")
        .await
        .unwrap();
    assert_eq!(r.body.len(), 4 << 20);
    assert!(r.body.iter().all(|&b| b == b'b'));
    let r = request(http::Method::GET, &sc.url("/raw/plain"), &[], "")
        .await
        .unwrap();
    assert_eq!(r.text(), "plain");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "read to its end, the connection is reused"
    );

    // A chunked upload of unknown length is sent on chunked, and arrives whole.
    let mut s = TcpStream::connect(sc.addr).await.unwrap();
    let mut raw = b"POST /echo/up HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    let piece = "u".repeat(100_000);
    for _ in 0..3 {
        raw.extend_from_slice(format!("{:x}\r\n{piece}\r\n", piece.len()).as_bytes());
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    s.write_all(&raw).await.unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut reply))
        .await
        .expect("an answer within 10 s")
        .unwrap();
    let reply = String::from_utf8_lossy(&reply);
    assert!(
        reply.starts_with("HTTP/1.1 200"),
        "{}",
        &reply[..reply.len().min(200)]
    );
    let (head, body) = reply.split_once("\r\n\r\n").unwrap();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(seen["body"].as_str().unwrap().len(), 300_000);
}

/// The body of a chunked message (for a test reading raw HTTP).
fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = s.split_once("\r\n").unwrap();
        let n = usize::from_str_radix(size, 16).unwrap();
        if n == 0 {
            return out;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_node_closed_while_idle_is_not_used_again() {
    let (node, accepted) = scripted_node().await;
    let sc = Sidecar::start(&["--handler", "proxy"]);
    register(&sc, "raw", "raw-1", &node, &[]).await;
    let url = |p: &str| sc.url(&format!("/raw/{p}"));

    let r = request(http::Method::GET, &url("bye"), &[], "")
        .await
        .unwrap();
    assert_eq!(r.text(), "bye");
    tokio::time::sleep(Duration::from_millis(200)).await; // the node's FIN arrives
                                                          // A POST is never retried once sent: it succeeds only if the closed connection
                                                          // was noticed before sending.
    for _ in 0..3 {
        let r = request(http::Method::POST, &url("plain"), &[], "x")
            .await
            .unwrap();
        assert_eq!((r.status.as_u16(), r.text()), (200, "plain".to_string()));
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_before_the_body_is_read_reaches_the_caller() {
    let (node, _) = scripted_node().await;
    let sc = Sidecar::start(&["--handler", "proxy"]);
    register(&sc, "raw", "raw-1", &node, &[]).await;
    // 4 MiB declared (streamed: over the retry buffer), sent while the answer is
    // read, as an uploading client does. pillion may close once it has answered (the
    // rest of the body is not wanted), so the caller's writes may fail: only the
    // answer counts.
    let (mut client, mut upload) = TcpStream::connect(sc.addr).await.unwrap().into_split();
    let head = format!(
        "POST /raw/early HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n",
        4 << 20
    );
    upload.write_all(head.as_bytes()).await.unwrap();
    tokio::spawn(async move {
        for _ in 0..64 {
            if upload.write_all(&[b'x'; 64 * 1024]).await.is_err() {
                return;
            }
        }
        let _ = upload; // held open until the answer is read or the test ends
        std::future::pending::<()>().await;
    });
    let mut reply = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        while !reply.ends_with(b"too big!") {
            match client.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => reply.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "an answer within 10 s");
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert!(reply.ends_with("too big!"), "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_does_not_speak_http_gets_a_502_that_says_so() {
    let (node, _) = scripted_node().await;
    let sc = Sidecar::start(&["--handler", "proxy"]);
    register(&sc, "raw", "raw-1", &node, &[]).await;
    let r = request(http::Method::GET, &sc.url("/raw/garbage"), &[], "")
        .await
        .unwrap();
    assert_eq!(r.status, 502);
    assert!(r.text().contains("invalid response"), "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_switching_protocols_before_the_request_is_sent_gets_a_502() {
    let (node, _) = scripted_node().await;
    let sc = Sidecar::start(&["--handler", "proxy"]);
    register(&sc, "raw", "raw-1", &node, &[]).await;
    // An upgrade request with a 4 MiB body of which only the head and a little go
    // out: the node's 101 comes while pillion still has body to send, and was not
    // asked for.
    let mut client = TcpStream::connect(sc.addr).await.unwrap();
    let head = format!(
        "POST /raw/switch-early HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: upgrade\r\nUpgrade: echo\r\nContent-Length: {}\r\n\r\n",
        4 << 20
    );
    client.write_all(head.as_bytes()).await.unwrap();
    client.write_all(&[b'x'; 1024]).await.unwrap();
    let mut reply = Vec::new();
    let mut chunk = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while !reply.windows(4).any(|w| w == b"\r\n\r\n") || !reply.ends_with(b"}") {
            match client.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => reply.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    let reply = String::from_utf8_lossy(&reply);
    // An upgrade on a request with a body is not asked of the node (RFC 9110 7.8:
    // pillion serves it as a plain request), so the 101 is one it never asked for.
    assert!(reply.starts_with("HTTP/1.1 502"), "{reply}");
    assert!(
        reply.contains("switched protocols without being asked"),
        "{reply}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_sending_both_lengths_is_read_as_chunked_and_its_length_is_not_relayed() {
    let (node, accepted) = scripted_node().await;
    let sc = Sidecar::start(&["--handler", "proxy"]);
    register(&sc, "raw", "raw-1", &node, &[]).await;
    let r = request(http::Method::GET, &sc.url("/raw/both-lengths"), &[], "")
        .await
        .unwrap();
    assert_eq!((r.status.as_u16(), r.text()), (200, "hello".to_string()));
    assert_ne!(
        r.headers.get("content-length").map(|v| v.as_bytes()),
        Some(&b"3"[..]),
        "the node's Content-Length: 3 was relayed with a 5-byte body"
    );
    let r = request(http::Method::GET, &sc.url("/raw/plain"), &[], "")
        .await
        .unwrap();
    assert_eq!(r.text(), "plain");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "a connection with suspect framing is closed, not reused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_to_a_node_are_closed_after_the_pool_idle_timeout() {
    let (node, accepted, ended) = counting_node().await;
    let sc = Sidecar::start(&["--handler", "proxy", "--pool-idle-timeout", "300ms"]);
    register(&sc, "raw", "raw-1", &node, &[]).await;
    let r = request(http::Method::GET, &sc.url("/raw/plain"), &[], "")
        .await
        .unwrap();
    assert_eq!(r.text(), "plain");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    assert!(
        common::eventually(Duration::from_secs(5), || async {
            ended.load(Ordering::SeqCst) == 1
        })
        .await,
        "the idle connection was kept past --pool-idle-timeout"
    );
    // The next call opens a new connection and succeeds.
    let r = request(http::Method::GET, &sc.url("/raw/plain"), &[], "")
        .await
        .unwrap();
    assert_eq!(r.text(), "plain");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

/// An h2c (prior knowledge) connection to the sidecar, as `curl --http2-prior-knowledge`
/// and gRPC clients open it.
async fn h2c(
    addr: std::net::SocketAddr,
) -> hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

async fn h2_call(
    sender: &mut hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>,
    req: http::Request<http_body_util::Full<bytes::Bytes>>,
) -> (http::StatusCode, String) {
    let res = sender.send_request(req).await.unwrap();
    let status = res.status();
    let body = http_body_util::BodyExt::collect(res.into_body())
        .await
        .unwrap()
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_caller_reaches_an_http1_node_and_grpc_to_it_is_refused_by_name() {
    let (node, _) = scripted_node().await;
    let sc = Sidecar::start(&["--handler", "proxy"]);
    register(&sc, "plain", "p-1", &node, &[]).await;
    register(&sc, "old", "o-1", &node, &[("protocol", "http1")]).await;
    let mut sender = h2c(sc.addr).await;

    for service in ["plain", "old"] {
        let req = http::Request::get(format!("http://{}/{service}/plain", sc.addr))
            .body(Default::default())
            .unwrap();
        let (status, body) = h2_call(&mut sender, req).await;
        assert_eq!(
            (status.as_u16(), body.as_str()),
            (200, "plain"),
            "h2c caller to the HTTP/1.1 node of {service}"
        );
    }

    let req = http::Request::post(format!("http://{}/old/grpc.Svc/Call", sc.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            b"\0\0\0\0\0",
        )))
        .unwrap();
    // Refused as gRPC refuses: a trailers-only answer, UNAVAILABLE, naming why.
    let res = sender.send_request(req).await.unwrap();
    let headers = res.headers().clone();
    assert_eq!(res.status(), 200);
    assert_eq!(headers["grpc-status"], "14", "{headers:?}");
    let message = headers["grpc-message"].to_str().unwrap();
    assert!(message.contains("protocol=http1"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_chunked_framing_and_endless_interim_answers_are_a_502_not_a_hang() {
    let (node, _) = scripted_node().await;
    let sc = Sidecar::start(&["--handler", "proxy"]);
    register(&sc, "raw", "raw-1", &node, &[]).await;
    for (path, says) in [
        ("bare-lf", "bare LF"),
        ("bad-chunk-size", "invalid chunk size"),
        ("endless-continue", "interim"),
    ] {
        let r = request(http::Method::GET, &sc.url(&format!("/raw/{path}")), &[], "")
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(r.status, 502, "{path}: {}", r.text());
        assert!(r.text().contains(says), "{path}: {}", r.text());
    }
    // Bare LFs after the head went out: the body breaks off instead of hanging.
    let late = request(http::Method::GET, &sc.url("/raw/bare-lf-late"), &[], "").await;
    match late {
        Ok(r) => assert_ne!(r.text(), "hello", "a bare-LF body was accepted"),
        Err(e) => assert!(!e.contains("within 10s"), "the call hung: {e}"),
    }
    // The node's other answers still pass.
    let r = request(http::Method::GET, &sc.url("/raw/plain"), &[], "")
        .await
        .unwrap();
    assert_eq!(r.text(), "plain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_heads_cut_bodies_and_bytes_after_the_body_do_not_reach_other_callers() {
    let (node, accepted) = scripted_node().await;
    let sc = Sidecar::start(&["--handler", "proxy"]);
    register(&sc, "raw", "raw-1", &node, &[]).await;
    let r = request(http::Method::GET, &sc.url("/raw/oversized"), &[], "")
        .await
        .unwrap();
    assert_eq!(r.status, 502, "{}", r.text());

    let cut = request(http::Method::GET, &sc.url("/raw/cut"), &[], "").await;
    if let Ok(r) = &cut {
        assert_ne!(r.body.len(), 10, "a cut body was passed off as whole");
    }

    let r = request(http::Method::GET, &sc.url("/raw/extra"), &[], "")
        .await
        .unwrap();
    assert_eq!(r.text(), "hello");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = accepted.load(Ordering::SeqCst);
    for _ in 0..3 {
        let r = request(http::Method::GET, &sc.url("/raw/plain"), &[], "")
            .await
            .unwrap();
        assert_eq!(
            r.text(),
            "plain",
            "the bytes after a body were read as an answer"
        );
    }
    assert!(
        accepted.load(Ordering::SeqCst) > before,
        "the connection with bytes after its body was used again"
    );
}
