//! The API's own door: a token when one is set, and no way in for a web page of
//! another origin, a rebinding DNS name or a text/plain write; no secret in any log.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{run_to_end, Sidecar, BIN};
use pillion_testkit::http::{get, post_json, request};
use pillion_testkit::{free_port, free_udp_port, wait_for_port, Daemon};

const TOKEN: &str = "api-token-0123456789abcdef";

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[tokio::test]
async fn with_a_token_every_route_but_healthz_needs_it() {
    let sc = Sidecar::start(&["--api-token", TOKEN]);
    let reply = get(&sc.url("/registry")).await.unwrap();
    assert_eq!(reply.status, 401, "{}", reply.text());
    assert_eq!(reply.json()["id"], "pillion.api");
    assert_eq!(reply.headers.get("www-authenticate").unwrap(), "Bearer");
    for path in ["/greeter/Say.Hello", "/stats"] {
        let reply = get(&sc.url(path)).await.unwrap();
        assert_eq!(reply.status, 401, "{path}: calls by name and /stats too");
    }
    let wrong = request(
        http::Method::GET,
        &sc.url("/registry"),
        &[("authorization", &bearer("api-token-0123456789abcdeX"))],
        String::new(),
    )
    .await
    .unwrap();
    assert_eq!(wrong.status, 401);
    let body = r#"{"name":"greeter","nodes":[{"id":"g1","address":"127.0.0.1:9"}]}"#;
    let auth = bearer(TOKEN);
    let ok = request(
        http::Method::POST,
        &sc.url("/registry"),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        body.to_string(),
    )
    .await
    .unwrap();
    assert_eq!(ok.status, 200, "{}", ok.text());
    for path in ["/registry?service=greeter", "/stats"] {
        let read = request(
            http::Method::GET,
            &sc.url(path),
            &[("authorization", &auth)],
            String::new(),
        )
        .await
        .unwrap();
        assert_eq!(read.status, 200, "{path}: {}", read.text());
    }
    assert_eq!(get(&sc.url("/healthz")).await.unwrap().status, 200);
}

#[test]
fn an_api_off_loopback_without_a_token_is_refused_naming_the_flag() {
    let (code, _, err) = run_to_end(&["run", "--address", "0.0.0.0:0"], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("--api-token"), "{err}");
    let (code, _, err) = run_to_end(&["run", "--api-token", "short"], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("at least 16"), "{err}");
}

#[tokio::test]
async fn a_foreign_web_page_cannot_write_the_registry() {
    let sc = Sidecar::start(&[]);
    let body = r#"{"name":"victim","nodes":[{"id":"v1","address":"127.0.0.1:9"}]}"#;
    // The POST a page can send without a CORS preflight.
    let plain = request(
        http::Method::POST,
        &sc.url("/registry"),
        &[("content-type", "text/plain")],
        body.to_string(),
    )
    .await
    .unwrap();
    assert_eq!(plain.status, 415, "{}", plain.text());
    assert!(plain.json()["detail"]
        .as_str()
        .unwrap()
        .contains("application/json"));
    let cross = request(
        http::Method::POST,
        &sc.url("/registry"),
        &[
            ("content-type", "application/json"),
            ("origin", "https://evil.example"),
        ],
        body.to_string(),
    )
    .await
    .unwrap();
    assert_eq!(cross.status, 403, "{}", cross.text());
    let rebound = request(
        http::Method::GET,
        &sc.url("/registry"),
        &[("host", &format!("evil.example:{}", sc.addr.port()))],
        String::new(),
    )
    .await
    .unwrap();
    assert_eq!(rebound.status, 421, "{}", rebound.text());
    // Nothing was registered; the app's own JSON request is served.
    assert_eq!(
        get(&sc.url("/registry?service=victim"))
            .await
            .unwrap()
            .status,
        404
    );
    assert_eq!(
        post_json(&sc.url("/registry"), body).await.unwrap().status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_appears_in_the_logs() {
    let cluster_key = "cluster-key-never-logged-42";
    let redis_password = "redis-password-never-logged";
    let app = pillion_testkit::TestApp::start("app").await;
    let api = free_port();
    let listen = free_port();
    let log = std::env::temp_dir().join(format!("pillion-secrets-{}.log", std::process::id()));
    let mut cmd = Command::new(BIN);
    cmd.args(["run", "--address", &format!("127.0.0.1:{api}")])
        .args(["--api-token", TOKEN, "--cluster-key", cluster_key])
        .args(["--cluster-bind", &format!("127.0.0.1:{}", free_udp_port())])
        .args(["--listen", &format!("127.0.0.1:{listen}")])
        .args(["--app", &format!("http://{}", app.addr())])
        .args([
            "--session-store",
            &format!("redis://:{redis_password}@127.0.0.1:1"),
        ])
        .env("RUST_LOG", "debug")
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()));
    let sidecar = Daemon::spawn("pillion", cmd);
    assert!(wait_for_port(
        format!("127.0.0.1:{api}").parse().unwrap(),
        Duration::from_secs(10)
    ));
    let base = format!("http://127.0.0.1:{api}");
    for auth in [
        bearer(TOKEN),
        bearer("a-wrong-token-0000000000"),
        String::new(),
    ] {
        let _ = request(
            http::Method::GET,
            &format!("{base}/statusz"),
            &[("authorization", &auth)],
            String::new(),
        )
        .await;
    }
    let _ = get(&format!("http://127.0.0.1:{listen}/page")).await;
    let _ = request(
        http::Method::GET,
        &format!("{base}/healthz"),
        &[],
        String::new(),
    )
    .await;
    sidecar.signal("TERM");
    drop(sidecar);
    let text = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    assert!(
        text.contains("pillion listening"),
        "the log was captured: {text}"
    );
    for secret in [TOKEN, cluster_key, redis_password] {
        assert!(
            !text.contains(secret),
            "{secret} appears in the log:\n{text}"
        );
    }
}
