//! Distributed sessions through the inbound proxy, with real apps and a real Redis:
//! bailiff's login/todo/logout flow across two sidecars, and everything a client or
//! an app could get wrong.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{inbound, issued, run_to_end};
use pillion_testkit::http::{request, Reply};
use pillion_testkit::{free_port, Server, TestApp};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// GET `path` on the inbound proxy at `at`, with an optional session cookie.
async fn visit(at: SocketAddr, path: &str, cookie: Option<&str>, extra: &[(&str, &str)]) -> Reply {
    let cookie_header = cookie.map(|c| format!("theme=dark; session={c}"));
    let mut headers: Vec<(&str, &str)> = extra.to_vec();
    if let Some(c) = &cookie_header {
        headers.push(("cookie", c));
    }
    request(
        http::Method::GET,
        &format!("http://{at}{path}"),
        &headers,
        "",
    )
    .await
    .unwrap()
}

fn session_headers_seen(reply: &Reply) -> Vec<(String, String)> {
    let seen = reply.json();
    let mut out: Vec<(String, String)> = seen["headers"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.starts_with("x-session-"))
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
        .collect();
    out.sort();
    out
}

fn no_control_headers(reply: &Reply) {
    let leaked: Vec<_> = reply
        .headers
        .keys()
        .filter(|k| k.as_str().starts_with("x-session-"))
        .collect();
    assert!(
        leaked.is_empty(),
        "control headers reached the client: {leaked:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_on_one_service_is_seen_by_another_and_logout_ends_it() {
    let redis = Server::redis();
    let users = TestApp::start("users").await;
    let todo = TestApp::start("todo").await;
    let store = ["--session-store", &redis.url(), "--session-max-age", "120"];
    let (_a, users_at) = inbound(&users.url(), &store);
    let (_b, todo_at) = inbound(&todo.url(), &store);

    // A first visit that keeps nothing gets no session.
    assert!(issued(&visit(users_at, "/", None, &[]).await).is_none());
    // Something put in the cart: a session is issued.
    let first = visit(users_at, "/?h=X-Session-Set-Cart:1", None, &[]).await;
    let id = issued(&first).expect("a session cookie");
    assert!(first.headers["set-cookie"]
        .to_str()
        .unwrap()
        .contains("HttpOnly"));

    // Login on the users service stores User-Id (and rotates the id, as at login).
    let login = visit(
        users_at,
        "/login?h=X-Session-Set-User-Id:42&h=X-Session-Rotate:1",
        Some(&id),
        &[],
    )
    .await;
    assert_eq!(login.status, 200);
    no_control_headers(&login);
    let id = issued(&login).expect("rotation issues a new id");

    // The todo service, behind another sidecar, sees it.
    let todos = visit(todo_at, "/todos", Some(&id), &[]).await;
    assert_eq!(
        session_headers_seen(&todos),
        [
            ("x-session-cart".to_string(), "1".to_string()),
            ("x-session-user-id".to_string(), "42".to_string())
        ]
    );
    assert_eq!(todos.json()["app"], "todo");
    let cookie_seen = todos.json()["headers"]["cookie"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert_eq!(
        cookie_seen, "theme=dark",
        "other cookies pass, the session id does not"
    );

    // The TTL in Redis is the max-age.
    let direct = pillion_session::open(&redis.url().parse().unwrap(), Default::default()).unwrap();
    let ttl = direct.ttl(&id).await.unwrap().unwrap();
    assert!(
        ttl > Duration::from_secs(115) && ttl <= Duration::from_secs(120),
        "{ttl:?}"
    );

    // Logout deletes it; the todo service no longer sees a user.
    let logout = visit(
        users_at,
        "/logout?h=X-Session-Del-User-Id:1",
        Some(&id),
        &[],
    )
    .await;
    no_control_headers(&logout);
    let todos = visit(todo_at, "/todos", Some(&id), &[]).await;
    assert_eq!(
        session_headers_seen(&todos),
        [("x-session-cart".to_string(), "1".to_string())]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_cannot_forge_session_data_or_pick_their_session_id() {
    let app = TestApp::start("app").await;
    let (_sc, at) = inbound(&app.url(), &[]);

    let forged = visit(
        at,
        "/",
        None,
        &[
            ("X-Session-User-Id", "admin"),
            ("x-session-set-role", "root"),
        ],
    )
    .await;
    assert!(
        session_headers_seen(&forged).is_empty(),
        "a client's X-Session-* never reaches the app"
    );

    // An id the store does not know is never adopted: keeping nothing, the visit
    // gets no session; setting data, it gets a fresh id.
    let offered = pillion_session::new_id();
    let reply = visit(at, "/", Some(&offered), &[]).await;
    assert!(session_headers_seen(&reply).is_empty());
    assert!(issued(&reply).is_none(), "{:?}", reply.headers);
    let reply = visit(at, "/?h=X-Session-Set-User-Id:7", Some(&offered), &[]).await;
    let other = issued(&reply).unwrap();
    assert_ne!(
        other, offered,
        "setting data on an unknown id still gets a fresh id"
    );
    assert_eq!(
        session_headers_seen(&visit(at, "/", Some(&other), &[]).await),
        [("x-session-user-id".into(), "7".into())]
    );
    assert!(session_headers_seen(&visit(at, "/", Some(&offered), &[]).await).is_empty());

    // A malformed cookie is ignored the same way.
    let reply = visit(at, "/?h=X-Session-Set-A:1", Some("../../etc/passwd"), &[]).await;
    assert!(issued(&reply).is_some_and(|id| pillion_session::is_valid_id(&id)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_moves_the_data_and_destroy_ends_the_session() {
    let redis = Server::redis();
    let app = TestApp::start("app").await;
    let (_sc, at) = inbound(&app.url(), &["--session-store", &redis.url()]);
    let old = issued(&visit(at, "/?h=X-Session-Set-Cart:3", None, &[]).await).unwrap();
    let rotated = visit(at, "/?h=X-Session-Rotate:1", Some(&old), &[]).await;
    let new = issued(&rotated).unwrap();
    assert_ne!(new, old);
    let direct = pillion_session::open(&redis.url().parse().unwrap(), Default::default()).unwrap();
    assert_eq!(direct.load(&old).await.unwrap(), None, "the old id is gone");
    assert_eq!(
        session_headers_seen(&visit(at, "/", Some(&new), &[]).await),
        [("x-session-cart".into(), "3".into())]
    );

    let destroyed = visit(at, "/?h=X-Session-Destroy:1", Some(&new), &[]).await;
    no_control_headers(&destroyed);
    let cookie = destroyed.headers["set-cookie"].to_str().unwrap();
    assert!(
        cookie.starts_with("session=;") && cookie.contains("Max-Age=0"),
        "{cookie}"
    );
    assert_eq!(direct.load(&new).await.unwrap(), None);
    let metrics = pillion_testkit::http::get(&_sc.url("/metrics"))
        .await
        .unwrap()
        .text();
    assert!(
        metrics.contains("pillion_session_destroyed_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("pillion_session_rotated_total 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_responses_setting_different_keys_both_survive() {
    let redis = Server::redis();
    let app = TestApp::start("app").await;
    let (_sc, at) = inbound(&app.url(), &["--session-store", &redis.url()]);
    let id = issued(&visit(at, "/?h=X-Session-Set-C:0", None, &[]).await).unwrap();
    let (a, b) = tokio::join!(
        visit(at, "/a?delay=300&h=X-Session-Set-A:1", Some(&id), &[]),
        visit(at, "/b?delay=300&h=X-Session-Set-B:2", Some(&id), &[]),
    );
    assert_eq!(
        (a.status, b.status),
        (http::StatusCode::OK, http::StatusCode::OK)
    );
    let seen = session_headers_seen(&visit(at, "/", Some(&id), &[]).await);
    assert_eq!(
        seen,
        [
            ("x-session-a".into(), "1".into()),
            ("x-session-b".into(), "2".into()),
            ("x-session-c".into(), "0".into())
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_mid_run() {
    let mut redis = Server::redis();
    let app = TestApp::start("app").await;
    let (sc, at) = inbound(&app.url(), &["--session-store", &redis.url()]);
    let (_strict, strict_at) = inbound(
        &app.url(),
        &[
            "--session-store",
            &redis.url(),
            "--session-store-down",
            "fail",
        ],
    );
    let id = issued(&visit(at, "/?h=X-Session-Set-User-Id:9", None, &[]).await).unwrap();

    redis.kill();
    // Reads go on without the session, and the app is told why.
    let reply = visit(at, "/", Some(&id), &[]).await;
    assert_eq!(reply.status, 200);
    let seen = reply.json();
    assert!(
        seen["headers"]["x-session-error"]
            .as_str()
            .unwrap()
            .contains("unavailable"),
        "{seen}"
    );
    assert!(seen["headers"].get("x-session-user-id").is_none());
    assert!(
        issued(&reply).is_none(),
        "the client's cookie is left alone while the store is down"
    );
    // A change the app asks for cannot be stored: the client is told, not misled.
    let reply = visit(at, "/?h=X-Session-Set-User-Id:10", Some(&id), &[]).await;
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert!(reply.json()["detail"]
        .as_str()
        .unwrap()
        .contains("nothing could be stored"));
    no_control_headers(&reply);
    // With --session-store-down fail, requests with a session get 503 at once.
    let reply = visit(strict_at, "/", Some(&id), &[]).await;
    assert_eq!(reply.status, 503);
    let status = pillion_testkit::http::get(&sc.url("/statusz"))
        .await
        .unwrap()
        .json();
    assert_eq!(status["sessions"]["store_healthy"], false, "{status}");

    redis.restart();
    let mut back = false;
    for _ in 0..50 {
        let reply = visit(at, "/?h=X-Session-Set-User-Id:11", None, &[]).await;
        if reply.status == 200 && issued(&reply).is_some() {
            let id = issued(&reply).unwrap();
            back = session_headers_seen(&visit(at, "/", Some(&id), &[]).await)
                == [("x-session-user-id".into(), "11".into())];
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        back,
        "sessions work again once Redis is back, without restarting pillion"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_values_and_bad_keys_are_refused_with_a_clear_error() {
    let app = TestApp::start("app").await;
    let (_sc, at) = inbound(&app.url(), &["--session-max-value-size", "8"]);
    let id = issued(&visit(at, "/?h=X-Session-Set-Name:ok", None, &[]).await).unwrap();
    let reply = visit(
        at,
        "/?h=X-Session-Set-Name:far-too-long-value",
        Some(&id),
        &[],
    )
    .await;
    assert_eq!(reply.status, 500);
    let detail = reply.json()["detail"].as_str().unwrap().to_string();
    assert!(
        detail.contains("\"name\"") && detail.contains("limit is 8"),
        "{detail}"
    );
    no_control_headers(&reply);
    assert_eq!(
        session_headers_seen(&visit(at, "/", Some(&id), &[]).await),
        [("x-session-name".into(), "ok".into())],
        "unchanged"
    );
    let reply = visit(at, "/?h=X-Session-Set-Set-X:1", Some(&id), &[]).await;
    assert_eq!(reply.status, 500);
    assert!(reply.json()["detail"]
        .as_str()
        .unwrap()
        .contains("reserved"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_forwards_like_a_proxy_should() {
    let app = TestApp::start("app").await;
    let (_sc, at) = inbound(
        &app.url(),
        &[
            "--session-rolling",
            "--session-cookie-secure",
            "--session-max-age",
            "1h",
        ],
    );
    let reply = visit(at, "/page?q=1", None, &[("x-forwarded-for", "203.0.113.9")]).await;
    let seen = reply.json();
    assert_eq!(seen["path"], "/page?q=1");
    assert_eq!(seen["headers"]["host"], at.to_string(), "Host is kept");
    assert_eq!(seen["headers"]["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(seen["headers"]["x-forwarded-proto"], "http");
    assert_eq!(seen["headers"]["x-forwarded-host"], at.to_string());
    let id = issued(&visit(at, "/?h=X-Session-Set-Cart:1", None, &[]).await).unwrap();
    // Rolling: every response refreshes the cookie, with its attributes.
    let again = visit(at, "/", Some(&id), &[]).await;
    let cookie = again.headers["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.contains(&id) && cookie.contains("Max-Age=3600") && cookie.contains("Secure"),
        "{cookie}"
    );

    // A POST body streams to the app.
    let body = "b".repeat(200_000);
    let reply = request(
        http::Method::POST,
        &format!("http://{at}/upload"),
        &[],
        body.clone(),
    )
    .await
    .unwrap();
    assert_eq!(reply.json()["body"].as_str().unwrap().len(), body.len());

    // The app down: 502 with a message. (A kept-alive connection to the app may
    // learn of the kill only when used: then it says the app closed it.)
    app.kill();
    let reply = visit(at, "/", None, &[]).await;
    assert_eq!(reply.status, 502);
    let detail = reply.json()["detail"].as_str().unwrap().to_string();
    assert!(
        detail.contains("unreachable") || detail.contains("closed the connection before answering"),
        "{detail}"
    );
}

#[test]
fn bad_session_settings_stop_the_start() {
    let app = "http://127.0.0.1:1";
    let listen = format!("127.0.0.1:{}", free_port());
    let cases: [(&[&str], &str); 5] = [
        (&["--session-max-age", "0"], "would disable sessions"),
        (&["--session-max-age", "-60"], "would disable sessions"),
        (
            &["--session-cookie-same-site", "none"],
            "needs --session-cookie-secure",
        ),
        (
            &["--session-store", "mongodb://127.0.0.1:1"],
            "memory or redis[s]://",
        ),
        (&["--session-header-prefix", "X-Session"], "ending with '-'"),
    ];
    for (args, want) in cases {
        let mut all = vec!["run", "--listen", &listen, "--app", app];
        all.extend_from_slice(args);
        let (code, _, err) = run_to_end(&all, &[]);
        assert_ne!(code, 0, "{args:?}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let (code, _, err) = run_to_end(&["run", "--session-store", "memory"], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("needs --listen and --app"), "{err}");
    let (code, _, err) = run_to_end(&["run", "--listen", &listen], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("needs --app"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_environment_example_starts() {
    let redis = Server::redis();
    let app = TestApp::start("app").await;
    let listen = format!("127.0.0.1:{}", free_port());
    let sc = common::Sidecar::start_with_env(
        &[],
        &[
            ("PILLION_LISTEN", &listen),
            ("PILLION_APP", &app.url()),
            ("PILLION_SESSION_STORE", &redis.url()),
            ("PILLION_SESSION_MAX_AGE", "3600"),
        ],
    );
    assert!(pillion_testkit::wait_for_port(
        listen.parse().unwrap(),
        Duration::from_secs(10)
    ));
    let reply = visit(
        listen.parse().unwrap(),
        "/?h=X-Session-Set-User-Id:1",
        None,
        &[],
    )
    .await;
    assert!(issued(&reply).is_some());
    let status = pillion_testkit::http::get(&sc.url("/statusz"))
        .await
        .unwrap()
        .json();
    assert_eq!(status["sessions"]["store"], redis.url());
}

/// How many keys the Redis at `addr` holds (`DBSIZE`, spoken over a raw connection).
async fn redis_keys(addr: SocketAddr) -> u64 {
    let exchange = async {
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        conn.write_all(b"*1\r\n$6\r\nDBSIZE\r\n").await.unwrap();
        let mut answer = Vec::new();
        while !answer.ends_with(b"\r\n") {
            let mut buf = [0u8; 64];
            let n = conn.read(&mut buf).await.unwrap();
            assert!(n > 0, "redis closed the connection");
            answer.extend_from_slice(&buf[..n]);
        }
        answer
    };
    let answer = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .expect("DBSIZE within 5 s");
    let text = String::from_utf8_lossy(&answer);
    text.trim()
        .strip_prefix(':')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("DBSIZE answered {text:?}"))
}

/// Writes `raw` to `at` on a new connection and reads until the server closes it (the
/// request should say `Connection: close`).
async fn raw_exchange(at: SocketAddr, raw: &[u8]) -> String {
    let exchange = async {
        let mut conn = tokio::net::TcpStream::connect(at).await.unwrap();
        conn.write_all(raw).await.unwrap();
        let mut answer = Vec::new();
        conn.read_to_end(&mut answer).await.unwrap();
        String::from_utf8_lossy(&answer).into_owned()
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("an answer within 10 s")
}

/// An app that keeps every request exactly as its bytes arrived (head, chunked body and
/// trailers), for what no HTTP library would show, and answers `200 ok`.
struct RawApp {
    addr: SocketAddr,
    received: tokio::sync::mpsc::UnboundedReceiver<String>,
    _accept: tokio::task::JoinHandle<()>,
}

impl RawApp {
    async fn start() -> RawApp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, received) = tokio::sync::mpsc::unbounded_channel();
        let accept = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let Some(request) = read_request(&mut conn).await else {
                        return;
                    };
                    let _ = tx.send(request);
                    let _ = conn
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                        )
                        .await;
                });
            }
        });
        RawApp {
            addr,
            received,
            _accept: accept,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The next request that arrived whole, lower-cased (waits up to 10 s).
    async fn next(&mut self) -> String {
        tokio::time::timeout(Duration::from_secs(10), self.received.recv())
            .await
            .expect("a request at the app within 10 s")
            .expect("the app is running")
    }
}

/// Reads one request: its head, then a chunked body up to its end (last chunk,
/// trailers, blank line) or a `Content-Length` body. `None` if the peer went away.
async fn read_request(conn: &mut tokio::net::TcpStream) -> Option<String> {
    let mut bytes = Vec::new();
    let complete = |b: &[u8]| {
        let text = String::from_utf8_lossy(b).to_ascii_lowercase();
        let Some(end) = text.find("\r\n\r\n") else {
            return false;
        };
        let (head, body) = (&text[..end], &text[end + 4..]);
        if head.contains("transfer-encoding: chunked") {
            (body.starts_with("0\r\n") || body.contains("\r\n0\r\n")) && body.ends_with("\r\n\r\n")
        } else {
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|n| n.trim().parse::<usize>().ok())
                .unwrap_or(0);
            body.len() >= length
        }
    };
    while !complete(&bytes) {
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        bytes.extend_from_slice(&buf[..n]);
    }
    Some(String::from_utf8_lossy(&bytes).to_ascii_lowercase())
}

/// Whether a header name a server might read as session data: `_` folded into `-`,
/// case ignored, it starts with the prefix.
fn reads_as_session_header(name: &str) -> bool {
    name.to_ascii_lowercase()
        .replace('_', "-")
        .starts_with("x-session-")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_down_fail_refuses_visitors_without_a_cookie_too() {
    let mut redis = Server::redis();
    let app = TestApp::start("app").await;
    let (_sc, at) = inbound(
        &app.url(),
        &[
            "--session-store",
            &redis.url(),
            "--session-store-down",
            "fail",
        ],
    );
    assert_eq!(visit(at, "/", None, &[]).await.status, 200);

    redis.kill();
    let before = app.requests();
    for cookie in [None, Some("not-a-session-id")] {
        let reply = visit(at, "/", cookie, &[]).await;
        assert_eq!(reply.status, 503, "cookie {cookie:?}: {}", reply.text());
        let error = reply.json();
        assert_eq!(error["id"], "pillion.session", "{error}");
        assert_eq!(error["code"], 503, "{error}");
        assert_eq!(error["status"], "Service Unavailable", "{error}");
        let detail = error["detail"].as_str().unwrap();
        assert!(
            detail.contains("unavailable") && detail.contains(&redis.url()),
            "{detail}"
        );
    }
    assert_eq!(app.requests(), before, "nothing reached the app");

    redis.restart();
    assert!(
        common::eventually(Duration::from_secs(10), || async {
            visit(at, "/", None, &[]).await.status == 200
        })
        .await,
        "visitors without a cookie are served again once Redis is back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_write_after_redis_restarts_is_stored() {
    let mut redis = Server::redis();
    let app = TestApp::start("app").await;
    let (_sc, at) = inbound(&app.url(), &["--session-store", &redis.url()]);
    let first = visit(at, "/?h=X-Session-Set-User-Id:1", None, &[]).await;
    assert_eq!(first.status, 200, "{}", first.text());

    // A visitor without a cookie logs in: the new session is the first write.
    redis.kill();
    redis.restart();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let login = visit(at, "/?h=X-Session-Set-User-Id:42", None, &[]).await;
    assert_eq!(login.status, 200, "{}", login.text());
    let id = issued(&login).expect("a session cookie");
    assert_eq!(
        session_headers_seen(&visit(at, "/", Some(&id), &[]).await),
        [("x-session-user-id".into(), "42".into())]
    );

    // A visitor with a cookie changes the session: a load, then a write. (The test
    // Redis keeps nothing across a restart, so the session is a new one.)
    redis.kill();
    redis.restart();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let change = visit(at, "/?h=X-Session-Set-Role:admin", Some(&id), &[]).await;
    assert_eq!(change.status, 200, "{}", change.text());
    let id = issued(&change).unwrap_or(id);
    assert_eq!(
        session_headers_seen(&visit(at, "/", Some(&id), &[]).await),
        [("x-session-role".into(), "admin".into())]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_headers_in_any_spelling_never_reach_the_app() {
    let app = TestApp::start("app").await;
    let (_sc, at) = inbound(&app.url(), &[]);
    let id = issued(&visit(at, "/?h=X-Session-Set-User-Id:7", None, &[]).await).unwrap();
    let request = format!(
        "POST /upload HTTP/1.1\r\nHost: app\r\nCookie: session={id}\r\n\
         X_Session_User_Id: admin\r\nX-Session_Role: root\r\nx_session-foo: 1\r\n\
         X-SESSION-BAR: 2\r\nx-session-user-id: 0\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
         5\r\nhello\r\n0\r\n\r\n"
    );
    let answer = raw_exchange(at, request.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let echo: serde_json::Value =
        serde_json::from_str(&answer[answer.find("\r\n\r\n").unwrap() + 4..]).unwrap();
    assert_eq!(echo["body"], "hello");
    let forged: Vec<_> = echo["headers"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| reads_as_session_header(k))
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    assert_eq!(
        forged,
        ["x-session-user-id: \"7\""],
        "only the session's own data reaches the app"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_trailers_never_reach_the_app() {
    let mut app = RawApp::start().await;
    let (_sc, at) = inbound(&app.url(), &[]);
    let request = "POST /upload HTTP/1.1\r\nHost: app\r\nTrailer: X-Session-User-Id\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
         5\r\nhello\r\n0\r\nX-Session-User-Id: admin\r\nx_session_role: root\r\n\
         X-Checksum: 1\r\n\r\n";
    let answer = raw_exchange(at, request.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let seen = app.next().await;
    assert!(seen.contains("\r\n\r\n5\r\nhello\r\n"), "{seen}");
    let forged: Vec<_> = seen
        .lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(name, _)| reads_as_session_header(name))
        .collect();
    assert!(forged.is_empty(), "reached the app: {forged:?} in {seen}");
    assert!(
        seen.contains("\r\nx-checksum: 1\r\n"),
        "other trailers pass: {seen}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_visit_that_sets_nothing_stores_no_session() {
    let redis = Server::redis();
    let app = TestApp::start("app").await;
    let (sc, at) = inbound(
        &app.url(),
        &["--session-store", &redis.url(), "--session-rolling"],
    );
    let unknown = pillion_session::new_id();
    for cookie in [None, Some(unknown.as_str()), Some("malformed")] {
        let reply = visit(at, "/", cookie, &[]).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert!(
            reply.headers.get("set-cookie").is_none(),
            "cookie {cookie:?}: {:?}",
            reply.headers
        );
    }
    // Deleting a key or rotating the id of a session that does not exist keeps nothing.
    let reply = visit(
        at,
        "/?h=X-Session-Del-Cart:1&h=X-Session-Rotate:1",
        None,
        &[],
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(issued(&reply).is_none());
    no_control_headers(&reply);
    assert_eq!(redis_keys(redis.addr()).await, 0, "the store is empty");

    // The app sets a key: now there is a session, and its cookie.
    let reply = visit(at, "/?h=X-Session-Set-Cart:1", None, &[]).await;
    let id = issued(&reply).expect("a session cookie once the app sets a key");
    assert_eq!(redis_keys(redis.addr()).await, 1);
    assert_eq!(
        session_headers_seen(&visit(at, "/", Some(&id), &[]).await),
        [("x-session-cart".into(), "1".into())]
    );
    let metrics = pillion_testkit::http::get(&sc.url("/metrics"))
        .await
        .unwrap()
        .text();
    assert!(
        metrics.contains("pillion_session_created_total 1"),
        "{metrics}"
    );
}

/// HTTP/1.0 allows a request without Host; the app, spoken to in HTTP/1.1, still
/// gets one (its own address), as nginx would refuse it otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http10_request_without_host_reaches_the_app_with_one() {
    let app = TestApp::start("users").await;
    let (_sc, listen) = inbound(&app.url(), &[]);
    let mut s = tokio::net::TcpStream::connect(listen).await.unwrap();
    s.write_all(b"GET /who HTTP/1.0\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&answer);
    // RFC 9110 6.2: answered in the highest version the server speaks, 1.1 (hyper
    // said 1.0), without chunked framing and closing after the answer.
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let head = &text[..text.find("\r\n\r\n").unwrap()];
    assert!(
        !head.to_ascii_lowercase().contains("transfer-encoding"),
        "an HTTP/1.0 client cannot read chunked framing: {head}"
    );
    let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
    let seen: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(seen["headers"]["host"], app.addr().to_string(), "{seen}");
}

/// A Redis that cannot be reached when the sidecar starts is a warning at start (not
/// at the first visitor's request), shown by `/statusz`; its return is said too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_store_down_at_start_is_a_warning_at_start() {
    let mut redis = Server::redis();
    redis.kill();
    let app = TestApp::start("app").await;
    let (sc, log) = common::Sidecar::start_with_log(
        &[
            "--listen",
            "127.0.0.1:0",
            "--app",
            &app.url(),
            "--session-store",
            &redis.url(),
        ],
        &[],
    );
    let warned = |log: &common::Log| {
        log.text()
            .lines()
            .any(|l| l.contains("WARN") && l.contains("session store unavailable at start"))
    };
    assert!(
        common::eventually(Duration::from_secs(5), || async { warned(&log) }).await,
        "no warning at start: {}",
        log.text()
    );
    assert_eq!(app.requests(), 0, "the warning came before any request");
    let status = pillion_testkit::http::get(&sc.url("/statusz"))
        .await
        .unwrap()
        .json();
    let error = status["sessions"]["store_error"].as_str().unwrap_or("");
    assert!(error.contains(&redis.url()), "{status}");

    redis.restart();
    let at: SocketAddr = sc.ready["listen"].as_str().unwrap().parse().unwrap();
    assert!(
        common::eventually(Duration::from_secs(5), || async {
            // A login: the proxy writes to the store.
            let reply = visit(at, "/?h=X-Session-Set-User-Id:1", None, &[]).await;
            reply.status == 200 && log.text().contains("session store reachable again")
        })
        .await,
        "{}",
        log.text()
    );
}
