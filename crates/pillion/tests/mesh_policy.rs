//! Rules per route and rate limits, from the config file: `[[mesh.rules]]` (caller x
//! method x path -> allow or deny, in order, default deny once any exists, an audit
//! mode) on `--mesh-listen`, and `[[rate_limits]]` per caller identity (mesh) and per
//! client address (`--listen`), answering 429 with `Retry-After`; all counted in
//! `/metrics`.

mod common;

use std::path::PathBuf;

use common::{inbound, mesh_ca, mesh_caller, mesh_receiver, run_to_end};
use pillion_testkit::http::{get, request};
use pillion_testkit::TestApp;

fn config(name: &str, text: &str) -> PathBuf {
    let file =
        std::env::temp_dir().join(format!("pillion-policy-{}-{name}.toml", std::process::id()));
    std::fs::write(&file, text).unwrap();
    file
}

const RULES: &str = r#"
[[mesh.rules]]
name = "no admin"
paths = ["/orders/admin"]
action = "deny"

[[mesh.rules]]
name = "front reads"
callers = ["front"]
methods = ["GET", "HEAD"]
action = "allow"
"#;

async fn call(
    sidecar: &common::Sidecar,
    method: http::Method,
    path: &str,
) -> pillion_testkit::http::Reply {
    request(method, &sidecar.url(path), &[], "").await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_decide_per_caller_method_and_path_and_count_each_denial() {
    let ca = mesh_ca("rules");
    let app = TestApp::start("orders").await;
    let file = config("rules", RULES);
    let orders = mesh_receiver(
        &ca,
        "orders",
        app.addr(),
        &["--config", file.to_str().unwrap()],
    );
    let front = mesh_caller(&orders, Some((&ca, "front")), "orders").await;
    let reports = mesh_caller(&orders, Some((&ca, "reports")), "orders").await;

    assert_eq!(
        call(&front, http::Method::GET, "/orders/items/1")
            .await
            .status,
        200
    );
    call(&front, http::Method::POST, "/orders/items")
        .await
        .assert_refused(
            403,
            "\"front\" may not call \"orders\": no rule allows it (rules: no admin, front reads)",
            "a POST",
        );
    call(&front, http::Method::GET, "/orders/admin/users")
        .await
        .assert_refused(403, "rule \"no admin\" denies it", "the admin path");
    call(&reports, http::Method::GET, "/orders/items/1")
        .await
        .assert_refused(403, "\"reports\" may not call \"orders\"", "another caller");
    assert_eq!(app.requests(), 1, "only the allowed call reached the app");

    let metrics = get(&orders.sidecar.url("/metrics")).await.unwrap().text();
    for line in [
        "pillion_mesh_denied_total{rule=\"no admin\",audit=\"false\"} 1",
        "pillion_mesh_denied_total{rule=\"front reads\",audit=\"false\"} 0",
        "pillion_mesh_denied_total{rule=\"default\",audit=\"false\"} 2",
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }
    // A path spelt another way does not walk around the rule, and a prefix stops at a
    // segment.
    call(&front, http::Method::GET, "/orders//admin/users")
        .await
        .assert_refused(400, "is not canonical", "a doubled slash");
    assert_eq!(
        call(&front, http::Method::GET, "/orders/administrators")
            .await
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_mode_denies_nothing_and_counts_what_it_would() {
    let ca = mesh_ca("audit");
    let app = TestApp::start("orders").await;
    let file = config("audit", &format!("[mesh]\naudit = true\n{RULES}"));
    let orders = mesh_receiver(
        &ca,
        "orders",
        app.addr(),
        &["--config", file.to_str().unwrap()],
    );
    let reports = mesh_caller(&orders, Some((&ca, "reports")), "orders").await;
    assert_eq!(
        call(&reports, http::Method::DELETE, "/orders/items/1")
            .await
            .status,
        200
    );
    let metrics = get(&orders.sidecar.url("/metrics")).await.unwrap().text();
    assert!(
        metrics.contains("pillion_mesh_denied_total{rule=\"default\",audit=\"true\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_over_its_rate_limit_gets_429_with_retry_after() {
    let ca = mesh_ca("rate");
    let app = TestApp::start("orders").await;
    let file = config(
        "rate",
        r#"
[[rate_limits]]
name = "front items"
listener = "mesh"
callers = ["front"]
paths = ["/orders/items"]
rate = 0.1
burst = 2
"#,
    );
    let orders = mesh_receiver(
        &ca,
        "orders",
        app.addr(),
        &["--config", file.to_str().unwrap()],
    );
    let front = mesh_caller(&orders, Some((&ca, "front")), "orders").await;
    let reports = mesh_caller(&orders, Some((&ca, "reports")), "orders").await;
    for _ in 0..2 {
        assert_eq!(
            call(&front, http::Method::GET, "/orders/items/1")
                .await
                .status,
            200
        );
    }
    let over = call(&front, http::Method::GET, "/orders/items/1").await;
    over.assert_refused(
        429,
        "over the rate limit \"front items\"",
        "a third call at once",
    );
    let retry: u64 = over.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // A token every 10 s: the next one is at most 10 s away.
    assert!((1..=10).contains(&retry), "Retry-After: {retry}");
    // Other paths and other callers are not limited by it.
    assert_eq!(
        call(&front, http::Method::GET, "/orders/other")
            .await
            .status,
        200
    );
    for _ in 0..3 {
        assert_eq!(
            call(&reports, http::Method::GET, "/orders/items/1")
                .await
                .status,
            200
        );
    }
    let metrics = get(&orders.sidecar.url("/metrics")).await.unwrap().text();
    assert!(
        metrics.contains("pillion_rate_limited_total{listener=\"mesh\",limit=\"front items\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_address_over_its_rate_limit_on_listen_gets_429() {
    let app = TestApp::start("web").await;
    let file = config(
        "listen",
        "[[rate_limits]]\nlistener = \"listen\"\nrate = 0.1\nburst = 2\n",
    );
    let (sidecar, listen) = inbound(&app.url(), &["--config", file.to_str().unwrap()]);
    let url = format!("http://{listen}/page");
    for _ in 0..2 {
        assert_eq!(get(&url).await.unwrap().status, 200);
    }
    let over = get(&url).await.unwrap();
    over.assert_refused(
        429,
        "127.0.0.1 is over the rate limit \"limit-1\"",
        "a third call at once",
    );
    let retry: u64 = over.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=10).contains(&retry), "Retry-After: {retry}");
    let metrics = get(&sidecar.url("/metrics")).await.unwrap().text();
    assert!(
        metrics.contains("pillion_rate_limited_total{listener=\"listen\",limit=\"limit-1\"} 1"),
        "{metrics}"
    );
}

#[test]
fn rules_and_limits_that_cannot_work_are_refused_at_start() {
    for (text, why) in [
        (
            "[[mesh.rules]]\naction = \"allow\"\n",
            "[mesh] rules are for calls through --mesh-listen",
        ),
        (
            "[[rate_limits]]\nlistener = \"listen\"\nrate = 1\n",
            "is for --listen (listen), which is not set",
        ),
        (
            "[[mesh.rules]]\nmethods = [\"get\"]\naction = \"allow\"\n",
            "not an HTTP method in capitals",
        ),
        (
            "[[mesh.rules]]\naction = \"permit\"\n",
            "unknown variant `permit`",
        ),
        (
            "[[mesh.rules]]\ncaller = [\"x\"]\naction = \"allow\"\n",
            "unknown field `caller`",
        ),
        (
            "[[rate_limits]]\nlistener = \"mesh\"\nrate = -1\n",
            "above 0",
        ),
        (
            "[[rate_limits]]\nname = \"a\\\"b\"\nlistener = \"mesh\"\nrate = 1\n",
            "must be 1 to 64 letters",
        ),
    ] {
        let file = config("bad", text);
        let (code, _, err) = run_to_end(&["check", file.to_str().unwrap()], &[]);
        let (run_code, _, run_err) = run_to_end(&["run", "--config", file.to_str().unwrap()], &[]);
        assert!(
            (code == 1 && err.contains(why)) || (run_code == 2 && run_err.contains(why)),
            "{text}: check: {err} run: {run_err}"
        );
    }
}
