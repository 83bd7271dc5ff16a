//! What only a shared, external registry can do: several sidecars on one etcd, etcd
//! going away and coming back, a sidecar dying.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pillion_core::{Node, Service};
use pillion_registry::{open, Registry, RegistryError};
use pillion_testkit::Server;

fn one_node(name: &str, id: &str, address: &str) -> Service {
    Service {
        name: name.into(),
        nodes: vec![Node {
            id: id.into(),
            address: address.into(),
            ..Node::default()
        }],
        ..Service::default()
    }
}

fn has(reg: &dyn Registry, name: &str, id: &str) -> bool {
    reg.catalog()
        .get(name)
        .is_some_and(|v| v.iter().any(|s| s.nodes.iter().any(|n| n.id == id)))
}

/// How long until `cond` holds, or None if it did not within `limit`.
async fn within(limit: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

async fn connected(url: &str) -> Arc<dyn Registry> {
    let reg = open(url, &Default::default()).await.unwrap();
    within(Duration::from_secs(5), || reg.status().healthy)
        .await
        .expect("registry connects to etcd");
    reg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sidecars_see_each_others_registrations_within_a_second() {
    let etcd = Server::etcd();
    let a = connected(&etcd.url()).await;
    let b = connected(&etcd.url()).await;

    a.register(&one_node("orders", "orders-1", "127.0.0.1:7001"), None)
        .await
        .unwrap();
    let seen = within(Duration::from_secs(1), || has(&*b, "orders", "orders-1")).await;
    assert!(seen.is_some(), "b did not see a's registration within 1s");

    b.register(&one_node("orders", "orders-2", "127.0.0.1:7002"), None)
        .await
        .unwrap();
    assert!(
        within(Duration::from_secs(1), || has(&*a, "orders", "orders-2"))
            .await
            .is_some()
    );

    b.deregister(&one_node("orders", "orders-1", "x:1"))
        .await
        .unwrap();
    assert!(
        within(Duration::from_secs(1), || !has(&*a, "orders", "orders-1"))
            .await
            .is_some()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_of_a_sidecar_vanish_when_it_dies_or_closes() {
    let etcd = Server::etcd();
    let observer = connected(&etcd.url()).await;

    let closing = connected(&etcd.url()).await;
    closing
        .register(&one_node("a", "a-1", "127.0.0.1:1"), None)
        .await
        .unwrap();
    assert!(
        within(Duration::from_secs(1), || has(&*observer, "a", "a-1"))
            .await
            .is_some()
    );
    closing.close().await;
    assert!(
        within(Duration::from_secs(1), || !has(&*observer, "a", "a-1"))
            .await
            .is_some(),
        "a graceful close must remove the sidecar's registrations at once"
    );

    let dying = connected(&etcd.url()).await;
    dying
        .register(&one_node("b", "b-1", "127.0.0.1:2"), None)
        .await
        .unwrap();
    assert!(
        within(Duration::from_secs(1), || has(&*observer, "b", "b-1"))
            .await
            .is_some()
    );
    drop(dying); // its keep-alive stops, as when the process is killed
    let gone = within(Duration::from_secs(20), || !has(&*observer, "b", "b-1")).await;
    assert!(
        gone.is_some(),
        "registrations of a dead sidecar must vanish after the session TTL"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_at_start_reports_unavailable_then_connects_when_it_comes_up() {
    let mut etcd = Server::etcd();
    etcd.kill();
    let reg = open(&etcd.url(), &Default::default()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = reg.status();
    assert!(!status.healthy);
    assert!(status.error.is_some(), "{status:?}");

    let err = reg
        .register(&one_node("early", "e-1", "127.0.0.1:1"), None)
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::Unavailable { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&etcd.url()),
        "the error names the backend: {err}"
    );
    assert!(
        !has(&*reg, "early", "e-1"),
        "a refused registration is not shown as done"
    );

    etcd.restart();
    assert!(
        within(Duration::from_secs(10), || reg.status().healthy)
            .await
            .is_some(),
        "the registry reconnects by itself"
    );
    reg.register(&one_node("early", "e-1", "127.0.0.1:1"), None)
        .await
        .unwrap();
    assert!(has(&*reg, "early", "e-1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_are_restored_after_etcd_is_replaced_by_an_empty_one() {
    let mut etcd = Server::etcd();
    let reg = connected(&etcd.url()).await;
    reg.register(&one_node("kept", "k-1", "127.0.0.1:1"), None)
        .await
        .unwrap();
    reg.register(
        &one_node("kept", "k-2", "127.0.0.1:2"),
        Some(Duration::from_secs(60)),
    )
    .await
    .unwrap();

    etcd.restart_empty();
    let observer = connected(&etcd.url()).await;
    let restored = within(Duration::from_secs(10), || {
        has(&*observer, "kept", "k-1") && has(&*observer, "kept", "k-2")
    })
    .await;
    assert!(
        restored.is_some(),
        "registrations must come back without restarting the sidecar"
    );
    assert!(within(Duration::from_secs(5), || reg.status().healthy)
        .await
        .is_some());
}

/// etcd's count of keys written since it started, from its `/metrics` on the client port.
async fn puts(etcd: &Server) -> u64 {
    let reply = pillion_testkit::http::get(&format!("http://{}/metrics", etcd.addr()))
        .await
        .expect("etcd /metrics");
    let text = reply.text();
    text.lines()
        .find_map(|l| l.strip_prefix("etcd_mvcc_put_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no etcd_mvcc_put_total in etcd's metrics:\n{text}")) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_of_ten_sidecars_write_nothing_to_etcd() {
    let etcd = Server::etcd();
    let mut sidecars = Vec::new();
    for _ in 0..10 {
        sidecars.push(connected(&etcd.url()).await);
    }
    let ttl = Some(Duration::from_secs(3));
    let apps: Vec<Service> = (0..10)
        .map(|i| {
            one_node(
                "app",
                &format!("app-{i}"),
                &format!("127.0.0.1:{}", 7000 + i),
            )
        })
        .collect();
    for (reg, app) in sidecars.iter().zip(&apps) {
        reg.register(app, ttl).await.unwrap();
    }
    let observer = &sidecars[0];
    assert!(
        within(Duration::from_secs(5), || {
            observer.catalog().get("app").map(|v| v[0].nodes.len()) == Some(10)
        })
        .await
        .is_some(),
        "every sidecar's app is registered"
    );

    // 20 s of calm: every app renewed every second, as the app registration does.
    let before = puts(&etcd).await;
    let calm = Instant::now();
    while calm.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        for (reg, app) in sidecars.iter().zip(&apps) {
            reg.register(app, ttl).await.unwrap();
        }
    }
    let written = puts(&etcd).await - before;
    eprintln!("puts to etcd during 20 s of renewals by 10 sidecars: {written}");
    assert!(
        written <= 5,
        "renewals must not rewrite keys: {written} puts in 20 s of calm"
    );
    assert_eq!(
        observer.catalog().get("app").map(|v| v[0].nodes.len()),
        Some(10),
        "the renewed registrations stayed"
    );
}

/// The lease that holds `key`, from etcd's JSON gateway.
async fn lease_of(etcd: &Server, key: &str) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let reply = pillion_testkit::http::post_json(
        &format!("http://{}/v3/kv/range", etcd.addr()),
        &serde_json::json!({ "key": b64.encode(key) }).to_string(),
    )
    .await
    .unwrap();
    reply.json()["kvs"][0]["lease"]
        .as_str()
        .unwrap_or_else(|| panic!("{key} has no lease: {}", reply.text()))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lease_is_replaced_and_the_sidecars_keys_written_again() {
    let etcd = Server::etcd();
    let reg = connected(&etcd.url()).await;
    let observer = connected(&etcd.url()).await;
    reg.register(&one_node("kept", "k-1", "127.0.0.1:1"), None)
        .await
        .unwrap();
    reg.register(
        &one_node("kept", "k-2", "127.0.0.1:2"),
        Some(Duration::from_secs(60)),
    )
    .await
    .unwrap();
    let lease = lease_of(&etcd, "/pillion/registry/kept/k-1").await;
    assert_eq!(
        lease,
        lease_of(&etcd, "/pillion/registry/kept/k-2").await,
        "one lease per sidecar, whatever the registration's TTL"
    );

    // What etcd does when a lease lapses while the sidecar is cut off: the lease and
    // its keys go.
    let revoked = pillion_testkit::http::post_json(
        &format!("http://{}/v3/lease/revoke", etcd.addr()),
        &serde_json::json!({ "ID": lease }).to_string(),
    )
    .await
    .unwrap();
    assert_eq!(revoked.status, 200, "{}", revoked.text());
    assert!(
        within(Duration::from_secs(5), || !has(&*observer, "kept", "k-1"))
            .await
            .is_some(),
        "the revoked lease took the keys"
    );
    let back = within(Duration::from_secs(10), || {
        has(&*observer, "kept", "k-1") && has(&*observer, "kept", "k-2")
    })
    .await;
    assert!(back.is_some(), "the sidecar must write its keys again");
    assert_ne!(
        lease_of(&etcd, "/pillion/registry/kept/k-1").await,
        lease,
        "under a new lease"
    );
}
