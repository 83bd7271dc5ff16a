//! Several pillion processes sharing one etcd, and etcd failing under them.

mod common;

use common::{eventually, node_ids, Sidecar};
use pillion_testkit::http::{get, post_json};
use pillion_testkit::Server;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sidecars_on_one_etcd_see_each_others_services_within_a_second() {
    let etcd = Server::etcd();
    let a = Sidecar::start(&["--registry", &etcd.url()]);
    let b = Sidecar::start_with_env(&[], &[("PILLION_REGISTRY", &etcd.url())]);
    assert!(
        eventually(Duration::from_secs(5), || async {
            get(&b.url("/healthz"))
                .await
                .map(|r| r.status == 200)
                .unwrap_or(false)
        })
        .await
    );

    let body = r#"{"name":"greeter","nodes":[{"id":"greeter-1","address":"127.0.0.1:9090"}]}"#;
    let reply = post_json(&a.url("/registry"), body).await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    let start = Instant::now();
    assert!(
        eventually(Duration::from_secs(1), || async {
            node_ids(&b, "greeter").await == ["greeter-1"]
        })
        .await
    );
    assert!(start.elapsed() < Duration::from_secs(1));

    let status = get(&b.url("/statusz")).await.unwrap().json();
    assert_eq!(status["registry"]["backend"], etcd.url());
    assert_eq!(status["registry"]["healthy"], true);
    assert_eq!(status["services"][0]["name"], "greeter");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_outage_is_reported_and_registrations_come_back_without_a_restart() {
    let mut etcd = Server::etcd();
    let sc = Sidecar::start(&["--registry", &etcd.url()]);
    assert!(
        eventually(Duration::from_secs(5), || async {
            get(&sc.url("/healthz"))
                .await
                .map(|r| r.status == 200)
                .unwrap_or(false)
        })
        .await
    );
    let body = r#"{"name":"ledger","nodes":[{"id":"ledger-1","address":"127.0.0.1:9191"}]}"#;
    assert_eq!(
        post_json(&sc.url("/registry"), body).await.unwrap().status,
        200
    );

    etcd.kill();
    assert!(
        eventually(Duration::from_secs(5), || async {
            get(&sc.url("/healthz"))
                .await
                .map(|r| r.status == 503)
                .unwrap_or(false)
        })
        .await,
        "healthz must report the registry down"
    );
    // The readiness probe of deploy/kubernetes.yaml leaves the registry out: the
    // sidecar still calls from the registrations it saw, and the pod stays ready.
    let ready = get(&sc.url("/healthz?exclude=registry")).await.unwrap();
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert_eq!(ready.json()["registry"]["healthy"], false);
    assert_eq!(ready.json()["excluded"], serde_json::json!(["registry"]));
    for bad in ["/healthz?exclude=etcd", "/healthz?ready=1"] {
        let reply = get(&sc.url(bad)).await.unwrap();
        assert_eq!(reply.status, 400, "{bad}: {}", reply.text());
        assert!(
            reply.text().contains("registry,broker,session_store,tcp"),
            "{}",
            reply.text()
        );
    }
    let reply = post_json(&sc.url("/registry"), body).await.unwrap();
    assert_eq!(
        reply.status, 503,
        "a write while etcd is down is refused, not dropped"
    );
    assert!(reply.json()["detail"]
        .as_str()
        .unwrap()
        .contains("unreachable"));

    etcd.restart_empty(); // a new, empty etcd on the same address
    let other = Sidecar::start(&["--registry", &etcd.url()]);
    assert!(
        eventually(Duration::from_secs(10), || async {
            node_ids(&other, "ledger").await == ["ledger-1"]
        })
        .await,
        "the registration must be restored by the sidecar that owns it"
    );
    assert_eq!(get(&sc.url("/healthz")).await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_sidecars_app_leaves_the_registry_within_10s_whatever_its_ttl() {
    let etcd = Server::etcd();
    let app = pillion_testkit::TestApp::start("ledger").await;
    let address = app.addr().to_string();
    let mut owner = Sidecar::start(&[
        "--registry",
        &etcd.url(),
        "--server-name",
        "ledger",
        "--server-address",
        &address,
        "--register-ttl",
        "1h",
    ]);
    let observer = Sidecar::start(&["--registry", &etcd.url()]);
    assert!(
        eventually(Duration::from_secs(10), || async {
            node_ids(&observer, "ledger").await.len() == 1
        })
        .await,
        "the observer sees the app"
    );

    owner.process.signal("KILL");
    let killed = Instant::now();
    assert!(
        eventually(Duration::from_secs(10), || async {
            node_ids(&observer, "ledger").await.is_empty()
        })
        .await,
        "a dead sidecar's app must leave the registry within 10 s, not when its 1h TTL lapses"
    );
    eprintln!("gone {:?} after the SIGKILL", killed.elapsed());
    owner.process.kill();
}

/// etcds://: the registry over TLS to etcd, its certificate checked against
/// SSL_CERT_FILE; a sidecar that does not trust the CA says so in /healthz.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_reaches_etcd_over_tls() {
    let etcd = Server::etcd_tls();
    assert!(etcd.url().starts_with("etcds://"), "{}", etcd.url());
    let ca = etcd.ca_file().display().to_string();
    let a = Sidecar::start_with_env(&["--registry", &etcd.url()], &[("SSL_CERT_FILE", &ca)]);
    let b = Sidecar::start_with_env(&["--registry", &etcd.url()], &[("SSL_CERT_FILE", &ca)]);
    let body = r#"{"name":"secure","nodes":[{"id":"s1","address":"127.0.0.1:9"}]}"#;
    let registered = eventually(Duration::from_secs(10), || async {
        post_json(&a.url("/registry"), body)
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await;
    assert!(registered, "registered over TLS");
    assert!(
        eventually(Duration::from_secs(5), || async {
            node_ids(&b, "secure").await == ["s1"]
        })
        .await,
        "seen through etcd by the other sidecar"
    );
    let health = get(&a.url("/healthz")).await.unwrap();
    assert_eq!(health.status, 200, "{}", health.text());

    // Without the CA: the certificate is not trusted, and /healthz says why.
    let untrusting = Sidecar::start(&["--registry", &etcd.url()]);
    let said = eventually(Duration::from_secs(10), || async {
        let h = get(&untrusting.url("/healthz")).await.unwrap();
        h.status == 503 && h.text().contains("certificate")
    })
    .await;
    assert!(
        said,
        "{}",
        get(&untrusting.url("/healthz")).await.unwrap().text()
    );
}
