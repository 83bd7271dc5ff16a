//! The HTTP layer as a user meets it: whose fault a failure is, the timers on every
//! listener and towards the app, and `/healthz` naming each backend that is down.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::{eventually, failures, inbound, register, statuses, BothListeners, Sidecar};
use pillion_testkit::http::get;
use pillion_testkit::{Server, TestApp};

/// Sends raw bytes on a fresh connection and reads the answer until the sidecar
/// closes it or 5 s pass.
fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        if out.windows(4).any(|w| w == b"\r\n\r\n") && out.ends_with(b"}") {
            break;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Writes `bytes` and reads until the server closes the connection (5 s at most).
fn raw_to_end(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out)
        .expect("the server closes the connection");
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_upload_is_the_callers_fault_and_leaves_the_node_unblamed() {
    let app = TestApp::start("healthy").await;
    let sc = Sidecar::start(&["--handler", "proxy"]);
    register(&sc, "up", "up-1", &app.addr().to_string(), &[]).await;

    // More broken uploads than would eject the node (5) if they counted against it.
    for _ in 0..6 {
        let answer = raw(
            sc.addr,
            b"POST /up/items HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
        );
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains("not sent whole"), "{answer}");
    }
    assert_eq!(failures(&sc, "up").await, 0, "the node was blamed");

    // Over the limit while streaming: 413, and still not the node's fault.
    let sc2 = Sidecar::start(&["--handler", "proxy", "--max-body-size", "1KiB"]);
    register(&sc2, "up", "up-1", &app.addr().to_string(), &[]).await;
    let mut upload =
        b"POST /up/items HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n800\r\n"
            .to_vec();
    upload.extend_from_slice(&[b'x'; 0x800]);
    upload.extend_from_slice(b"\r\n0\r\n\r\n");
    let answer = raw(sc2.addr, &upload);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert_eq!(failures(&sc2, "up").await, 0, "the node was blamed");

    // The node still answers calls.
    let ok = get(&sc.url("/up/items")).await.unwrap();
    assert_eq!(ok.status, 200, "{}", ok.text());
}

/// Whether the peer closes the connection after a half-sent request head, within
/// `limit`.
fn closes_a_half_sent_head(addr: std::net::SocketAddr, limit: Duration) -> bool {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(limit)).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .unwrap();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            // A 408 before closing is fine too; keep reading to the close.
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_sent_request_head_is_cut_off_on_every_listener() {
    let app = TestApp::start("app").await;
    let (sc, listen) = inbound(&app.url(), &["--read-header-timeout", "300ms"]);
    for addr in [sc.addr, listen] {
        let started = Instant::now();
        assert!(
            closes_a_half_sent_head(addr, Duration::from_secs(5)),
            "{addr} kept a half-sent head open"
        );
        assert!(started.elapsed() >= Duration::from_millis(250));
    }
    // A complete request on a fresh connection is served as usual.
    assert_eq!(get(&sc.url("/healthz")).await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_slower_than_app_timeout_gets_the_client_a_504_that_says_so() {
    let app = TestApp::start("slow").await;
    let (_sc, listen) = inbound(&app.url(), &["--app-timeout", "300ms"]);
    let reply = get(&format!("http://{listen}/page?delay=3000"))
        .await
        .unwrap();
    assert_eq!(reply.status, 504, "{}", reply.text());
    let body = reply.json();
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("--app-timeout"),
        "{body}"
    );
    // A prompt answer still passes.
    let reply = get(&format!("http://{listen}/page")).await.unwrap();
    assert_eq!(reply.status, 200);
}

/// Polls `/healthz` for 10 s until it answers 503 naming `backend`; the last answer.
async fn healthz_reports(sc: &Sidecar, backend: &str) -> (bool, String) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = get(&sc.url("/healthz")).await.unwrap();
        let named = r.status == 503
            && r.json()["error"]
                .as_str()
                .unwrap_or_default()
                .contains(backend);
        if named || Instant::now() > deadline {
            return (named, r.text());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_names_the_session_store_while_it_is_down() {
    let mut redis = Server::redis();
    let app = TestApp::start("app").await;
    let (sc, _listen) = inbound(&app.url(), &["--session-store", &redis.url()]);
    let health = get(&sc.url("/healthz")).await.unwrap();
    assert_eq!(health.status, 200, "{}", health.text());

    redis.kill();
    let (down, last) = healthz_reports(&sc, "session store").await;
    assert!(down, "healthz did not report the store: {last}");

    redis.restart();
    assert!(
        eventually(Duration::from_secs(15), || async {
            get(&sc.url("/healthz")).await.unwrap().status == 200
        })
        .await,
        "healthz did not recover with the store"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_names_the_broker_while_nats_is_down() {
    let mut nats = Server::nats();
    let sc = Sidecar::start(&["--broker", &nats.url()]);
    assert!(
        eventually(Duration::from_secs(10), || async {
            get(&sc.url("/healthz")).await.unwrap().status == 200
        })
        .await
    );
    nats.kill();
    let (down, last) = healthz_reports(&sc, "broker").await;
    assert!(down, "healthz did not report the broker: {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_registered_at_the_sidecars_own_address_is_a_508_not_a_recursion() {
    let sc = Sidecar::start(&["--handler", "proxy"]);
    register(&sc, "me", "me-1", &sc.addr.to_string(), &[]).await;
    let reply = get(&sc.url("/me/anything")).await.unwrap();
    assert_eq!(reply.status, 508, "{}", reply.text());
    assert!(reply.text().contains("loop detected"), "{}", reply.text());
    // The rpc handler too.
    let rpc = Sidecar::start(&[]);
    register(&rpc, "me", "me-1", &rpc.addr.to_string(), &[]).await;
    let reply = pillion_testkit::http::post_json(&rpc.url("/me/call"), "{}")
        .await
        .unwrap();
    assert_eq!(reply.status, 508, "{}", reply.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_a_host_with_two_or_with_bare_lf_lines_are_refused() {
    let app = TestApp::start("app").await;
    let (sc, listen) = inbound(&app.url(), &[]);
    for addr in [sc.addr, listen] {
        let none = raw(addr, b"GET /healthz HTTP/1.1\r\n\r\n");
        assert!(none.starts_with("HTTP/1.1 400"), "{addr}: {none}");
        assert!(none.contains("no Host header"), "{addr}: {none}");
        let two = raw(addr, b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n");
        assert!(two.starts_with("HTTP/1.1 400"), "{addr}: {two}");
        assert!(two.contains("more than one Host"), "{addr}: {two}");
        let bare = raw(addr, b"GET /healthz HTTP/1.1\nHost: a\n\n");
        assert!(bare.starts_with("HTTP/1.1 400"), "{addr}: {bare}");
        assert!(
            bare.contains("\"code\":400") && bare.contains("bare LF"),
            "{addr}: {bare}"
        );
        // After a good request on the same connection: the good one is answered,
        // then the bare-LF one is refused, and the connection closes.
        let after = raw_to_end(
            addr,
            b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\nGET /healthz HTTP/1.1\nHost: a\n\n",
        );
        let statuses: Vec<&str> = after
            .match_indices("HTTP/1.1 ")
            .map(|(i, _)| &after[i + 9..i + 12])
            .filter(|code| code.bytes().all(|b| b.is_ascii_digit()))
            .collect();
        assert_eq!(statuses, ["200", "400"], "{addr}: {after}");
        assert!(
            after.ends_with("}") && after.contains("bare LF"),
            "{addr}: {after}"
        );
    }
    assert_eq!(app.requests(), 1, "only the good request reached the app");
    // HTTP/1.0 without Host is fine.
    let old = raw(sc.addr, b"GET /healthz HTTP/1.0\r\n\r\n");
    assert!(
        old.starts_with("HTTP/1.0 200") || old.starts_with("HTTP/1.1 200"),
        "{old}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_framed_two_ways_is_refused_before_it_reaches_the_app() {
    let both = BothListeners::start().await;
    let app = &both.app;
    // Each could be read as one request by pillion and as two by the app (or the
    // other way round): a smuggled request. Refused on both listeners.
    for (addr, path) in both.paths() {
        for (framing, status, why) in [
            (
                "Transfer-Encoding: chunked\r\nContent-Length: 4",
                "400",
                "both Transfer-Encoding and Content-Length",
            ),
            (
                "Content-Length: 4\r\nContent-Length: 40",
                "400",
                "different Content-Length",
            ),
            (
                "Transfer-Encoding: chunked, identity",
                "501",
                "only one chunked",
            ),
        ] {
            let request = format!(
                "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{framing}\r\n\r\n0\r\n\r\nGET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            );
            let answer = raw_to_end(addr, request.as_bytes());
            assert_eq!(statuses(&answer), [status], "{addr} {framing:?}: {answer}");
            assert!(answer.contains(why), "{addr}: {answer}");
            assert!(answer.contains("connection: close"), "{addr}: {answer}");
        }
    }
    assert_eq!(app.requests(), 0, "a refused request reached the app");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order_on_both_listeners() {
    let both = BothListeners::start().await;
    for (addr, prefix) in [(both.sc.addr, "/app"), (both.listen, "")] {
        // Three requests in one write, one with a body, the last asking to close.
        let request = format!(
            "GET {prefix}/one HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n\
             POST {prefix}/two HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n\r\nhello\
             GET {prefix}/three HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        );
        let answer = raw_to_end(addr, request.as_bytes());
        assert_eq!(statuses(&answer), ["200", "200", "200"], "{addr}: {answer}");
        let one = answer.find("/one").expect("the first answer");
        let two = answer
            .find("\"body\":\"hello\"")
            .expect("the second, with its body");
        let three = answer.find("/three").expect("the third");
        assert!(one < two && two < three, "{addr}: out of order: {answer}");
    }
    assert_eq!(both.app.requests(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_that_stalls_is_cut_off_after_read_body_timeout() {
    let app = TestApp::start("app").await;
    let (sc, listen) = inbound(
        &app.url(),
        &["--handler", "proxy", "--read-body-timeout", "300ms"],
    );
    register(&sc, "app", "app-1", &app.addr().to_string(), &[]).await;
    for (addr, path) in [(sc.addr, "/app/x"), (listen, "/x")] {
        let started = Instant::now();
        // Three of the ten bytes announced, then nothing, the connection held open.
        let answer = raw(
            addr,
            format!("POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10\r\n\r\nabc")
                .as_bytes(),
        );
        assert!(answer.starts_with("HTTP/1.1 400"), "{addr}: {answer}");
        assert!(
            answer.contains("stalled") && answer.contains("--read-body-timeout"),
            "{addr}: {answer}"
        );
        assert!(started.elapsed() >= Duration::from_millis(250), "{addr}");
    }
    // A small body is read whole before a call by name leaves (so it can be
    // retried): that request never left. The inbound proxy streams bodies to the
    // app as they come: the app saw the start of the other one, broken off.
    assert_eq!(app.requests(), 1);

    // With `Expect: 100-continue` (curl's way for large uploads) the body is read by
    // hyper, after the interim answer: the same limit holds.
    for (addr, path) in [(sc.addr, "/app/x"), (listen, "/x")] {
        let started = Instant::now();
        let answer = raw(
            addr,
            format!(
                "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\nabc"
            )
            .as_bytes(),
        );
        assert!(
            answer.starts_with("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 400"),
            "{addr}: {answer}"
        );
        assert!(
            answer.contains("stalled") && answer.contains("--read-body-timeout"),
            "{addr}: {answer}"
        );
        assert!(started.elapsed() >= Duration::from_millis(250), "{addr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_cuts_its_answer_short_after_the_headers_is_blamed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A node that promises 100 bytes, sends 10, and closes.
    let node = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let node_addr = node.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = node.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
                    .await;
            });
        }
    });
    let sc = Sidecar::start(&["--handler", "proxy"]);
    register(&sc, "short", "short-1", &node_addr.to_string(), &[]).await;
    for _ in 0..2 {
        let answer = raw_to_end(
            sc.addr,
            b"GET /short/x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        );
        // The caller never gets the 100 bytes it was promised: the connection ends
        // first (with or without the head, as the node's bytes and close race).
        let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        assert!(body.len() < 100, "a cut answer looked whole: {answer}");
    }
    assert!(
        eventually(Duration::from_secs(5), || async {
            failures(&sc, "short").await == 2
        })
        .await,
        "the node was not blamed for its cut answers: {} failures",
        failures(&sc, "short").await
    );
}
