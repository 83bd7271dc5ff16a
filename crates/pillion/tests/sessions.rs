//! Distributed sessions through the inbound proxy, with real apps and a real Redis:
//! bailiff's login/todo/logout flow across two sidecars, and everything a client or
//! an app could get wrong.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{inbound, run_to_end};
use pillion_testkit::http::{request, Reply};
use pillion_testkit::{free_port, Server, TestApp};

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

/// The session id a response's Set-Cookie gives, if any.
fn issued(reply: &Reply) -> Option<String> {
    reply
        .headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| v.strip_prefix("session="))
        .map(|v| v.split(';').next().unwrap_or("").to_string())
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

    // First visit: a session is issued.
    let first = visit(users_at, "/", None, &[]).await;
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
        [("x-session-user-id".to_string(), "42".to_string())]
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
    let direct = pillion_session::open(&redis.url()).unwrap();
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
    assert!(session_headers_seen(&todos).is_empty());
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

    // An id the store does not know is replaced, never adopted.
    let offered = pillion_session::new_id();
    let reply = visit(at, "/", Some(&offered), &[]).await;
    let issued_id = issued(&reply).expect("a fresh id");
    assert_ne!(issued_id, offered);
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
    let reply = visit(at, "/", Some("../../etc/passwd"), &[]).await;
    assert!(issued(&reply).is_some());
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
    let direct = pillion_session::open(&redis.url()).unwrap();
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
    let id = issued(&visit(at, "/", None, &[]).await).unwrap();
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
            ("x-session-b".into(), "2".into())
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
    let id = issued(&reply).unwrap();
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

    // The app down: 502 with a message.
    app.kill();
    let reply = visit(at, "/", None, &[]).await;
    assert_eq!(reply.status, 502);
    assert!(
        reply.json()["detail"]
            .as_str()
            .unwrap()
            .contains("unreachable"),
        "{}",
        reply.text()
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
    let reply = visit(listen.parse().unwrap(), "/", None, &[]).await;
    assert!(issued(&reply).is_some());
    let status = pillion_testkit::http::get(&sc.url("/statusz"))
        .await
        .unwrap()
        .json();
    assert_eq!(status["sessions"]["store"], redis.url());
}
