//! pillion's HTTP/2 client towards h2c nodes, against a node written with the `h2`
//! crate's server: bodies larger than every flow-control window both ways with their
//! trailers, an answer before the body is read, a caller that stops mid-body, a node
//! that never opens its window, and a node that closes its connection gracefully.

mod common;

use std::future::poll_fn;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{eventually, failures, register, Sidecar};
use h2::{RecvStream, SendStream};
use http::Response;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An h2c node: `/echo` reads the whole body and its trailers, then answers with the
/// body, its length and the caller's `x-checksum` trailer; `/early` answers before
/// reading; `/refuse` resets the stream unanswered; `/cut` resets its answer half way; `/stall` never gives its window back nor
/// answers; `/bye` answers, then closes its connection gracefully. What each body
/// read ended with is in `ends`.
struct Node {
    addr: String,
    accepted: Arc<AtomicUsize>,
    ends: Arc<Mutex<Vec<String>>>,
}

async fn node() -> Node {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let accepted = Arc::new(AtomicUsize::new(0));
    let ends = Arc::new(Mutex::new(Vec::new()));
    let (count, log) = (accepted.clone(), ends.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let log = log.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((req, respond))) = conn.accept().await {
                    let bye = req.uri().path().ends_with("/bye");
                    tokio::spawn(answer(req, respond, log.clone()));
                    if bye {
                        conn.graceful_shutdown();
                    }
                }
            });
        }
    });
    Node {
        addr,
        accepted,
        ends,
    }
}

async fn answer(
    req: http::Request<RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    ends: Arc<Mutex<Vec<String>>>,
) {
    let path = req.uri().path().to_string();
    let mut body = req.into_body();
    if path.ends_with("/early") {
        let res = Response::builder()
            .header("content-length", 5)
            .body(())
            .unwrap();
        let mut stream = respond.send_response(res, false).expect("answer");
        stream
            .send_data(Bytes::from_static(b"early"), true)
            .unwrap();
        return;
    }
    if path.ends_with("/refuse") {
        respond.send_reset(h2::Reason::REFUSED_STREAM);
        return;
    }
    if path.ends_with("/cut") {
        // Part of an answer of no declared length, then a reset.
        let mut stream = respond
            .send_response(Response::new(()), false)
            .expect("answer");
        stream
            .send_data(Bytes::from_static(b"partial"), false)
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        stream.send_reset(h2::Reason::NO_ERROR);
        return;
    }
    if path.ends_with("/stall") {
        // Reads what arrives without giving the window back, and never answers.
        let end = loop {
            match body.data().await {
                Some(Ok(_)) => {}
                Some(Err(e)) => break format!("reset: {e}"),
                None => break "ended".to_string(),
            }
        };
        ends.lock().unwrap().push(end);
        return;
    }
    let mut got = Vec::new();
    let end = loop {
        match body.data().await {
            Some(Ok(chunk)) => {
                let _ = body.flow_control().release_capacity(chunk.len());
                got.extend_from_slice(&chunk);
            }
            Some(Err(e)) => break format!("reset: {e}"),
            None => break "ended".to_string(),
        }
    };
    let trailers = body.trailers().await.ok().flatten().unwrap_or_default();
    ends.lock().unwrap().push(end);
    let res = Response::builder()
        .header("content-length", got.len())
        .header("x-len", got.len())
        .header(
            "x-checksum",
            trailers
                .get("x-checksum")
                .cloned()
                .unwrap_or("none".parse().unwrap()),
        )
        .body(())
        .unwrap();
    let Ok(mut stream) = respond.send_response(res, got.is_empty()) else {
        return;
    };
    send_all(&mut stream, Bytes::from(got)).await;
}

/// Sends `data` as the window allows, then ends the stream.
async fn send_all(stream: &mut SendStream<Bytes>, mut data: Bytes) {
    while !data.is_empty() {
        stream.reserve_capacity(data.len());
        let Some(Ok(room)) = poll_fn(|cx| stream.poll_capacity(cx)).await else {
            return;
        };
        let piece = data.split_to(room.min(data.len()));
        if stream.send_data(piece, data.is_empty()).is_err() {
            return;
        }
    }
}

/// A sidecar with the node registered as h2c under `svc`.
async fn sidecar_for(node: &Node) -> Sidecar {
    let sc = Sidecar::start(&["--handler", "proxy"]);
    register(&sc, "svc", "n1", &node.addr, &[("protocol", "h2c")]).await;
    sc
}

/// Writes an HTTP/1.1 request with a chunked body of `chunks` pieces and `trailer`,
/// then reads the answer to the connection's end: (head, body).
async fn chunked_call(
    sc: &Sidecar,
    path: &str,
    chunks: &[Bytes],
    trailer: &str,
) -> (String, Vec<u8>) {
    let mut s = TcpStream::connect(sc.addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    for c in chunks {
        s.write_all(format!("{:x}\r\n", c.len()).as_bytes())
            .await
            .unwrap();
        s.write_all(c).await.unwrap();
        s.write_all(b"\r\n").await.unwrap();
    }
    s.write_all(format!("0\r\n{trailer}\r\n").as_bytes())
        .await
        .unwrap();
    let mut answer = read_to_close(&mut s).await;
    let at = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head");
    let body = answer.split_off(at + 4);
    (String::from_utf8_lossy(&answer).to_lowercase(), body)
}

/// What the sidecar sends until it closes the connection (30 s at most).
async fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut answer))
        .await
        .expect("the answer within 30 s")
        .unwrap();
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_larger_than_every_window_and_their_trailers_cross_both_ways() {
    let node = node().await;
    let sc = sidecar_for(&node).await;
    // 6 MiB: beyond the 2 MiB stream and 5 MiB connection windows pillion grants, and
    // the node's 64 KiB ones.
    let chunks: Vec<Bytes> = (0..96u8)
        .map(|i| Bytes::from(vec![b'a' + i % 26; 64 * 1024]))
        .collect();
    let sent: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
    // A trailer HTTP/2 forbids (`keep-alive`) is dropped on the way, not the call.
    let (head, body) = chunked_call(
        &sc,
        "/svc/echo",
        &chunks,
        "x-checksum: 42\r\nkeep-alive: timeout=5\r\n",
    )
    .await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains(&format!("x-len: {}", sent.len())), "{head}");
    assert!(
        head.contains("x-checksum: 42"),
        "the trailer reached the node: {head}"
    );
    assert_eq!(body.len(), sent.len());
    assert!(body == sent, "the answer's body is the request's");
    assert_eq!(*node.ends.lock().unwrap(), ["ended"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_before_the_body_is_read_reaches_the_caller() {
    let node = node().await;
    let sc = sidecar_for(&node).await;
    let chunks = vec![Bytes::from(vec![b'x'; 256 * 1024]); 4];
    let (head, body) = chunked_call(&sc, "/svc/early", &chunks, "").await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(body, b"early");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_stops_mid_body_resets_the_stream_instead_of_ending_it() {
    let node = node().await;
    let sc = sidecar_for(&node).await;
    let mut s = TcpStream::connect(sc.addr).await.unwrap();
    s.write_all(
        b"POST /svc/echo HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    )
    .await
    .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            node.accepted.load(Ordering::SeqCst) == 1
        })
        .await
    );
    drop(s);
    assert!(
        eventually(Duration::from_secs(10), || async {
            !node.ends.lock().unwrap().is_empty()
        })
        .await,
        "the node's read of the body ends"
    );
    let ends = node.ends.lock().unwrap().clone();
    assert!(
        ends[0].starts_with("reset"),
        "a cut body must not look whole to the node: {ends:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_closes_its_connection_gracefully_is_dialled_again() {
    let node = node().await;
    let sc = sidecar_for(&node).await;
    let first = pillion_testkit::http::get(&sc.url("/svc/bye"))
        .await
        .unwrap();
    assert_eq!(first.status, 200, "{}", first.text());
    // The GOAWAY reaches the sidecar; the next calls go over a new connection.
    for i in 0..3 {
        let reply = pillion_testkit::http::get(&sc.url(&format!("/svc/echo/{i}")))
            .await
            .unwrap();
        assert_eq!(reply.status, 200, "call {i}: {}", reply.text());
    }
    assert_eq!(node.accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_never_opens_its_window_costs_the_caller_its_deadline_and_no_more() {
    let node = node().await;
    let sc = sidecar_for(&node).await;
    let started = std::time::Instant::now();
    let stalled = pillion_testkit::http::request(
        http::Method::POST,
        &sc.url("/svc/stall"),
        &[("x-pillion-timeout", "1s")],
        vec![b'x'; 1024 * 1024],
    )
    .await
    .unwrap();
    assert_eq!(stalled.status, 504, "{}", stalled.text());
    assert!(started.elapsed() < Duration::from_secs(10));
    // The stream is reset, so the node is not left waiting for the rest of the body,
    // and the connection still serves other calls.
    assert!(
        eventually(Duration::from_secs(10), || async {
            !node.ends.lock().unwrap().is_empty()
        })
        .await
    );
    assert!(node.ends.lock().unwrap()[0].starts_with("reset"));
    let reply = pillion_testkit::http::get(&sc.url("/svc/echo"))
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(node.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_the_node_resets_half_way_does_not_look_whole_to_the_caller() {
    let node = node().await;
    let sc = sidecar_for(&node).await;
    let (head, body) = chunked_call(&sc, "/svc/cut", &[], "").await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    let body = String::from_utf8_lossy(&body).to_string();
    assert!(body.contains("partial"), "{body:?}");
    assert!(
        !body.ends_with("0\r\n\r\n"),
        "the chunked answer must not be ended as if whole: {body:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_or_oversized_upload_to_an_h2c_node_is_the_callers_fault() {
    let node = node().await;
    let sc = Sidecar::start(&["--handler", "proxy", "--max-body-size", "1KiB"]);
    register(&sc, "svc", "n1", &node.addr, &[("protocol", "h2c")]).await;
    // More than would eject the node (5) if they counted against it.
    for _ in 0..6 {
        let mut s = TcpStream::connect(sc.addr).await.unwrap();
        s.write_all(
            b"POST /svc/echo HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
        )
        .await
        .unwrap();
        let answer = read_to_close(&mut s).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    }
    let big = vec![Bytes::from(vec![b'x'; 16 * 1024]); 4];
    let (head, _) = chunked_call(&sc, "/svc/echo", &big, "").await;
    assert!(head.starts_with("http/1.1 413"), "{head}");
    assert_eq!(failures(&sc, "svc").await, 0, "the node was blamed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_resets_the_stream_unanswered_is_a_502_that_says_so() {
    let node = node().await;
    let sc = sidecar_for(&node).await;
    let reply =
        pillion_testkit::http::request(http::Method::POST, &sc.url("/svc/refuse"), &[], "payload")
            .await
            .unwrap();
    assert_eq!(reply.status, 502, "{}", reply.text());
    assert!(
        reply.text().contains("the node reset the stream"),
        "{}",
        reply.text()
    );
}

/// go-micro v1's gRPC servers register `protocol=grpc` and speak HTTP/2 only, so a
/// call from an HTTP/1.1 caller reaches such a node as h2c.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_go_micro_grpc_node_is_called_over_h2c() {
    let node = node().await;
    let sc = Sidecar::start(&["--handler", "proxy"]);
    register(&sc, "svc", "n1", &node.addr, &[("protocol", "grpc")]).await;
    let (head, body) = chunked_call(&sc, "/svc/early", &[], "").await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(body, b"early");
}
