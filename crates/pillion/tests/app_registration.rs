//! `--server-name` with `--healthcheck-url`: the app is registered, taken out while its
//! health check fails or hangs, put back when it recovers, and removed on SIGTERM.

mod common;

use common::{eventually, node_ids, Sidecar};
use pillion_testkit::{http::get, Health, Server, TestApp};
use std::time::Duration;

fn app_args(app: &TestApp, name: &str) -> Vec<String> {
    vec![
        "--server-name".into(),
        name.into(),
        "--server-address".into(),
        app.addr().to_string(),
        "--healthcheck-url".into(),
        format!("{}/health", app.url()),
        "--healthcheck-interval".into(),
        "200ms".into(),
        "--healthcheck-timeout".into(),
        "300ms".into(),
        "--server-metadata".into(),
        "zone=z1".into(),
        "--server-metadata".into(),
        "region=r1".into(),
    ]
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_cycle_is_visible_through_the_registry() {
    let app = TestApp::start("greeter").await;
    let args = app_args(&app, "greeter");
    let sc = Sidecar::start(&strs(&args));

    // Healthy: registered as NAME-<uuid> with its address and metadata.
    assert!(
        eventually(Duration::from_secs(5), || async {
            node_ids(&sc, "greeter").await.len() == 1
        })
        .await
    );
    let svc = get(&sc.url("/registry?service=greeter"))
        .await
        .unwrap()
        .json();
    let node = &svc[0]["nodes"][0];
    let id = node["id"].as_str().unwrap();
    assert!(
        id.starts_with("greeter-") && id.len() == "greeter-".len() + 36,
        "{id}"
    );
    // Host and port apart, as micro's sidecar registered its app.
    assert_eq!(node["address"], app.addr().ip().to_string());
    assert_eq!(node["port"], app.addr().port());
    assert_eq!(
        node["metadata"],
        serde_json::json!({"region":"r1","zone":"z1"})
    );

    // Failing (500): taken out; /statusz says why.
    app.set_health(Health::Failing);
    assert!(
        eventually(Duration::from_secs(5), || async {
            node_ids(&sc, "greeter").await.is_empty()
        })
        .await
    );
    let status = get(&sc.url("/statusz")).await.unwrap().json();
    assert_eq!(status["app"]["registered"], false, "{status}");
    assert_eq!(status["app"]["last_health_check"]["healthy"], false);
    assert!(
        status["app"]["last_health_check"]["detail"]
            .as_str()
            .unwrap()
            .contains("500"),
        "{status}"
    );

    // Healthy again: back, with the same node id.
    app.set_health(Health::Healthy);
    assert!(
        eventually(Duration::from_secs(5), || async {
            node_ids(&sc, "greeter").await == [id]
        })
        .await
    );

    // Hanging: the timeout counts as a failure.
    app.set_health(Health::Hanging);
    assert!(
        eventually(Duration::from_secs(5), || async {
            node_ids(&sc, "greeter").await.is_empty()
        })
        .await
    );
    let status = get(&sc.url("/statusz")).await.unwrap().json();
    let detail = status["app"]["last_health_check"]["detail"]
        .as_str()
        .unwrap();
    assert!(detail.contains("no answer within 300ms"), "{detail}");
    assert!(app.health_checks() >= 4, "the URL was really polled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_deregisters_the_app_before_exiting() {
    let etcd = Server::etcd();
    let app = TestApp::start("billing").await;
    let mut args = app_args(&app, "billing");
    args.extend([
        "--registry".to_string(),
        etcd.url(),
        "--register-ttl".into(),
        "1m".into(),
    ]);
    let mut owner = Sidecar::start(&strs(&args));
    let observer = Sidecar::start(&["--registry", &etcd.url()]);
    assert!(
        eventually(Duration::from_secs(5), || async {
            node_ids(&observer, "billing").await.len() == 1
        })
        .await
    );

    owner.process.signal("TERM");
    assert_eq!(
        owner.process.wait_exit(Duration::from_secs(10)),
        Some(0),
        "graceful exit"
    );
    // Gone at once, long before the 1m TTL would lapse.
    assert!(
        node_ids(&observer, "billing").await.is_empty()
            || eventually(Duration::from_secs(1), || async {
                node_ids(&observer, "billing").await.is_empty()
            })
            .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_without_health_url_stays_registered_past_its_ttl() {
    let app = TestApp::start("plain").await;
    let sc = Sidecar::start(&[
        "--server-name",
        "plain",
        "--server-address",
        &app.addr().to_string(),
        "--register-ttl",
        "1s",
    ]);
    assert!(
        eventually(Duration::from_secs(5), || async {
            node_ids(&sc, "plain").await.len() == 1
        })
        .await
    );
    // Renewed every third of the TTL, so it never lapses.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            node_ids(&sc, "plain").await.len(),
            1,
            "the registration lapsed"
        );
    }
}

/// An app failing its health check from the first try (not up yet, a wrong URL) is
/// said at once, each change of reason once, and the recovery too; not every check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_check_failing_from_the_first_try_is_logged_once_per_reason() {
    let app = TestApp::start("late").await;
    app.set_health(Health::Failing);
    let args = app_args(&app, "late");
    let (_sidecar, log) = common::Sidecar::start_with_log(&strs(&args), &[]);
    let failures = || {
        log.text()
            .lines()
            .filter(|l| l.contains("app health check failed"))
            .count()
    };
    assert!(
        eventually(Duration::from_secs(5), || async { failures() == 1 }).await,
        "the first failure was not logged: {}",
        log.text()
    );
    // Five more failing checks (200 ms apart), the same reason: no more lines.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(failures(), 1, "{}", log.text());
    app.set_health(Health::Healthy);
    assert!(
        eventually(Duration::from_secs(5), || async {
            log.text().contains("app health check passes again")
        })
        .await
    );
}
