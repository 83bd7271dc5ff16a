//! A hostile client against every listener, on real sockets: it opens connections and
//! goes quiet, fills the connection cap, is refused and stays, and tries to leave
//! pillion's HTTP/1.1 rules behind through `Expect: 100-continue` or an upgrade. What
//! it must see: its idle connections closed, room made for the next visitor, the
//! connection closed after a refusal, and every request on a connection held to the
//! same rules.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{inbound, statuses, BothListeners, Sidecar};
use pillion_testkit::TestApp;

/// A keep-alive connection that made one request and read its whole answer.
fn one_request(addr: SocketAddr, path: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let answer = read_answer(&mut s);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    s
}

/// Reads one answer with a `Content-Length` body.
fn read_answer(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&out).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if out.len() >= end + 4 + length {
                return text;
            }
        }
        match s.read(&mut buf) {
            Ok(0) => return text,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => panic!("reading an answer: {e} after {text:?}"),
        }
    }
}

/// Whether the server closes `s` within `limit` (reading and dropping what comes).
fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// Writes `bytes` on a new connection and reads until the server closes it.
fn to_end(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out)
        .expect("the server closes the connection");
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http1_connection_is_closed_after_idle_timeout_on_every_listener() {
    let app = TestApp::start("app").await;
    let (sc, listen) = inbound(&app.url(), &["--idle-timeout", "1s"]);
    for (addr, path) in [(sc.addr, "/healthz"), (listen, "/page")] {
        let mut s = one_request(addr, path);
        let quiet = Instant::now();
        assert!(
            closed_within(&mut s, Duration::from_secs(15)),
            "{addr}: an idle connection was still open after 15 s"
        );
        assert!(
            quiet.elapsed() >= Duration::from_millis(900),
            "{addr}: closed early"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_h2c_connection_is_sent_a_goaway_and_closed() {
    let app = TestApp::start("app").await;
    let (sc, listen) = inbound(&app.url(), &["--idle-timeout", "1s"]);
    for (addr, path) in [(sc.addr, "/healthz"), (listen, "/page")] {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (client, conn) = h2::client::handshake(tcp).await.unwrap();
        let conn = tokio::spawn(conn);
        let mut client = client.ready().await.unwrap();
        let req = http::Request::get(format!("http://127.0.0.1{path}"))
            .body(())
            .unwrap();
        let (answer, _) = client.send_request(req, true).unwrap();
        assert_eq!(answer.await.unwrap().status(), 200, "{addr}");
        // The client keeps answering PINGs; only the idle clock can end it, and a
        // GOAWAY ends an h2 connection without error.
        let quiet = Instant::now();
        let ended = tokio::time::timeout(Duration::from_secs(15), conn).await;
        assert!(
            matches!(ended, Ok(Ok(Ok(())))),
            "{addr}: the idle h2c connection did not end with a GOAWAY: {ended:?}"
        );
        assert!(
            quiet.elapsed() >= Duration::from_millis(900),
            "{addr}: closed early"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_listener_closes_its_longest_idle_connection_for_a_new_visitor() {
    let app = TestApp::start("app").await;
    let (sc, listen) = inbound(
        &app.url(),
        &[
            "--listen-max-connections",
            "3",
            "--api-max-connections",
            "3",
        ],
    );
    for (addr, path) in [(sc.addr, "/healthz"), (listen, "/page")] {
        let mut idle = Vec::new();
        for _ in 0..3 {
            idle.push(one_request(addr, path));
            std::thread::sleep(Duration::from_millis(50));
        }
        // The fourth visitor is served, at once, not left in the backlog.
        let started = Instant::now();
        let fourth = one_request(addr, path);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{addr}: the visitor waited"
        );
        // The connection that waited longest made room; the others are open.
        assert!(
            closed_within(&mut idle[0], Duration::from_secs(5)),
            "{addr}: the longest-idle connection was not closed"
        );
        for s in &mut idle[1..] {
            assert!(
                !closed_within(s, Duration::from_millis(300)),
                "{addr}: a newer one closed"
            );
        }
        drop(fourth);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_listener_holds_a_visitor_while_every_connection_is_busy() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::start("app").await;
    let (_sc, listen) = inbound(&app.url(), &["--listen-max-connections", "2"]);
    async fn answered(s: &mut tokio::net::TcpStream, limit: Duration) -> bool {
        let mut buf = [0u8; 4096];
        matches!(tokio::time::timeout(limit, s.read(&mut buf)).await, Ok(Ok(n)) if n > 0)
    }
    // Two connections whose requests the app never answers: busy, not idle.
    let mut busy = Vec::new();
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(listen).await.unwrap();
        s.write_all(b"GET /slow/hang HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .unwrap();
        busy.push(s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut third = tokio::net::TcpStream::connect(listen).await.unwrap();
    third
        .write_all(b"GET /page HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    assert!(
        !answered(&mut third, Duration::from_millis(500)).await,
        "a third connection was served beyond --listen-max-connections 2"
    );
    drop(busy.pop());
    assert!(
        answered(&mut third, Duration::from_secs(5)).await,
        "the waiting connection was not served once one closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_client_loses_its_connection() {
    let sc = Sidecar::start(&["--api-token", "s3cret-token-for-tests"]);
    // 401 without the token: answered, then closed (not kept for the next try).
    let answer = to_end(
        sc.addr,
        b"GET /registry HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /registry HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    );
    assert_eq!(statuses(&answer), ["401"], "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
    // 400 for a request pillion refuses in its body too.
    let body = r#"{"name":"#;
    let bad = format!(
        "POST /registry HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer s3cret-token-for-tests\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        body.len()
    );
    let answer = to_end(sc.addr, bad.as_bytes());
    assert_eq!(statuses(&answer), ["400"], "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_is_refused_with_405_on_every_listener() {
    let app = TestApp::start("app").await;
    let (sc, listen) = inbound(&app.url(), &[]);
    for addr in [sc.addr, listen] {
        let answer = to_end(addr, b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n");
        assert!(answer.starts_with("HTTP/1.1 405"), "{addr}: {answer}");
        assert!(answer.contains("not a forward proxy"), "{addr}: {answer}");
    }
    assert_eq!(app.requests(), 0, "CONNECT reached the app");
}

/// After `Expect: 100-continue`, the rest of a connection is still held to pillion's
/// rules: each of these follows a request that expected a 100, and gets pillion's own
/// refusal (JSON, then the connection closes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_expect_100_continue_the_connection_keeps_pillions_rules() {
    let both = BothListeners::start().await;
    let long = format!(
        "GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Long: {}\r\n\r\n",
        "a".repeat(70_000)
    );
    let cases: [(&str, &str, &str); 4] = [
        ("GET /x HTTP/1.1\nHost: 127.0.0.1\r\n\r\n", "400", "bare LF"),
        (
            "POST /x HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
            "400",
            "both Transfer-Encoding and Content-Length",
        ),
        (
            "POST /x HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            "501",
            "transfer coding",
        ),
        (&long, "431", "larger than"),
    ];
    for (addr, path) in both.paths() {
        for (next, status, why) in &cases {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            write!(
                s,
                "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n"
            )
            .unwrap();
            let mut interim = [0u8; 25];
            s.read_exact(&mut interim).unwrap();
            assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n", "{addr}");
            s.write_all(b"abc").unwrap();
            let first = read_answer(&mut s);
            assert!(first.starts_with("HTTP/1.1 200"), "{addr}: {first}");
            assert!(
                first.contains("abc"),
                "{addr}: the body did not reach the app: {first}"
            );
            s.write_all(next.as_bytes()).unwrap();
            let mut rest = Vec::new();
            s.read_to_end(&mut rest)
                .expect("the server closes the connection");
            let rest = String::from_utf8_lossy(&rest);
            assert_eq!(statuses(&rest), [*status], "{addr}, after {why}: {rest}");
            assert!(
                rest.contains(why) && rest.contains("\"detail\""),
                "{addr}: {rest}"
            );
        }
    }
}

/// A request with `Upgrade` that is not answered 101 ends its connection: nothing
/// after it is read by any other parser.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_not_answered_101_closes_the_connection() {
    let both = BothListeners::start().await;
    let app = &both.app;
    for (addr, path) in both.paths() {
        let before = app.requests();
        let answer = to_end(
            addr,
            format!(
                "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n\
                 GET {path} HTTP/1.1\nHost: 127.0.0.1\r\n\r\n"
            )
            .as_bytes(),
        );
        assert_eq!(statuses(&answer), ["200"], "{addr}: {answer}");
        assert_eq!(
            app.requests(),
            before + 1,
            "{addr}: the bare-LF request reached the app"
        );
    }
}

/// A raw HTTP/2 frame: length, type, flags, stream, payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HTTP/2 peer that vanished without closing stops answering PINGs: it is found
/// and closed, though a stream of its is still open (so the idle clock never runs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_peer_that_stops_answering_pings_is_closed() {
    let app = TestApp::start("app").await;
    let (_sc, listen) = inbound(&app.url(), &["--idle-timeout", "2s"]);
    let mut s = TcpStream::connect(listen).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // HPACK: :method GET, :scheme http (static table), :path and :authority
    // literal with an indexed name.
    let path = b"/slow/hang";
    let mut block = vec![0x82, 0x86, 0x04, path.len() as u8];
    block.extend_from_slice(path);
    block.extend_from_slice(&[0x01, 9]);
    block.extend_from_slice(b"127.0.0.1");
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend(h2_frame(0x4, 0, 0, &[]));
    hello.extend(h2_frame(0x1, 0x5, 1, &block)); // END_STREAM | END_HEADERS
    s.write_all(&hello).unwrap();
    let started = Instant::now();
    let (mut buf, mut seen, mut pings, mut settings_acked) = (Vec::new(), [0u8; 4096], 0, false);
    let closed = loop {
        match s.read(&mut seen) {
            Ok(0) => break true,
            Ok(n) => buf.extend_from_slice(&seen[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(e) => panic!("the peer was not closed within 20 s ({pings} PINGs): {e}"),
        }
        // Count the server's frames; acknowledge its SETTINGS, never its PINGs.
        while buf.len() >= 9 {
            let len = (buf[0] as usize) << 16 | (buf[1] as usize) << 8 | buf[2] as usize;
            if buf.len() < 9 + len {
                break;
            }
            let (kind, flags) = (buf[3], buf[4]);
            if kind == 0x6 && flags & 1 == 0 {
                pings += 1;
            }
            if kind == 0x4 && flags & 1 == 0 && !settings_acked {
                s.write_all(&h2_frame(0x4, 1, 0, &[])).unwrap();
                settings_acked = true;
            }
            buf.drain(..9 + len);
        }
    };
    assert!(closed);
    assert!(pings >= 1, "no PING was sent before the close");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "closed before a PING could go unanswered: {:?}",
        started.elapsed()
    );
}
