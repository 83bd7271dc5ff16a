//! The registry contract: every adapter must pass the same suite, run here against the
//! embedded memory registry and a real etcd.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pillion_core::{Node, Service};
use pillion_registry::cluster::ClusterOptions;
use pillion_registry::{open, Registry};
use pillion_testkit::{free_udp_port, Server};

fn service(name: &str, version: &str, nodes: &[(&str, &str)]) -> Service {
    Service {
        name: name.into(),
        version: version.into(),
        nodes: nodes
            .iter()
            .map(|(id, address)| Node {
                id: id.to_string(),
                address: address.to_string(),
                ..Node::default()
            })
            .collect(),
        ..Service::default()
    }
}

fn addresses(reg: &dyn Registry, name: &str) -> Vec<String> {
    reg.catalog()
        .get(name)
        .map(|versions| {
            versions
                .iter()
                .flat_map(|s| s.nodes.iter().map(|n| format!("{}={}", n.id, n.address)))
                .collect()
        })
        .unwrap_or_default()
}

async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cond()
}

async fn contract(reg: Arc<dyn Registry>) {
    let mut changes = reg.changes();
    changes.borrow_and_update();

    // Register two nodes; they show at once (read your writes) and sorted by id.
    reg.register(
        &service("greeter", "", &[("b", "127.0.0.1:2"), ("a", "127.0.0.1:1")]),
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        addresses(&*reg, "greeter"),
        ["a=127.0.0.1:1", "b=127.0.0.1:2"]
    );
    assert!(changes.has_changed().unwrap(), "a change must be signalled");
    assert_eq!(reg.catalog().names().collect::<Vec<_>>(), ["greeter"]);

    // The same node id again replaces the node instead of adding a second one.
    reg.register(&service("greeter", "", &[("a", "127.0.0.1:11")]), None)
        .await
        .unwrap();
    assert_eq!(
        addresses(&*reg, "greeter"),
        ["a=127.0.0.1:11", "b=127.0.0.1:2"]
    );

    // Another version is listed beside the first.
    reg.register(&service("greeter", "2", &[("c", "127.0.0.1:3")]), None)
        .await
        .unwrap();
    let versions: Vec<String> = reg
        .catalog()
        .get("greeter")
        .unwrap()
        .iter()
        .map(|s| s.version.clone())
        .collect();
    assert_eq!(versions, ["", "2"]);

    // Deregistering a listed node removes only it; an unknown node removes nothing.
    assert_eq!(
        reg.deregister(&service("greeter", "", &[("b", "x:1")]))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        addresses(&*reg, "greeter"),
        ["a=127.0.0.1:11", "c=127.0.0.1:3"]
    );
    assert_eq!(
        reg.deregister(&service("greeter", "", &[("zz", "x:1")]))
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        reg.deregister(&service("nobody", "", &[])).await.unwrap(),
        0
    );

    // Deregistering without nodes removes the whole version.
    assert_eq!(
        reg.deregister(&service("greeter", "2", &[])).await.unwrap(),
        1
    );
    assert_eq!(addresses(&*reg, "greeter"), ["a=127.0.0.1:11"]);
    assert_eq!(
        reg.deregister(&service("greeter", "", &[])).await.unwrap(),
        1
    );
    assert!(reg.catalog().get("greeter").is_none());
    assert!(reg.catalog().is_empty());

    // Nodes of one version registered with different service metadata: the version
    // shows the first node's (by id), and each registration is kept as it was made,
    // so the other's shows once the first is gone.
    let with_meta = |id: &str, tier: &str| Service {
        metadata: [("tier".to_string(), tier.to_string())].into(),
        ..service("meta", "", &[(id, "127.0.0.1:7")])
    };
    reg.register(&with_meta("m1", "gold"), None).await.unwrap();
    reg.register(&with_meta("m2", "silver"), None)
        .await
        .unwrap();
    let tier = |reg: &dyn Registry| {
        let versions = reg
            .catalog()
            .get("meta")
            .map(|v| v.to_vec())
            .unwrap_or_default();
        assert_eq!(versions.len(), 1);
        versions[0].metadata["tier"].clone()
    };
    assert_eq!(tier(&*reg), "gold");
    assert_eq!(addresses(&*reg, "meta").len(), 2);
    reg.deregister(&service("meta", "", &[("m1", "x:1")]))
        .await
        .unwrap();
    assert_eq!(tier(&*reg), "silver");
    reg.deregister(&service("meta", "", &[])).await.unwrap();
    assert!(reg.catalog().get("meta").is_none());

    // A TTL lapses unless the registration is renewed; the renewed one stays.
    let ttl = Duration::from_secs(2);
    reg.register(&service("short", "", &[("s1", "127.0.0.1:5")]), Some(ttl))
        .await
        .unwrap();
    reg.register(&service("short", "", &[("s2", "127.0.0.1:6")]), Some(ttl))
        .await
        .unwrap();
    assert_eq!(addresses(&*reg, "short").len(), 2);
    let registered = Instant::now();
    let renew = tokio::spawn({
        let reg = reg.clone();
        async move {
            for _ in 0..12 {
                tokio::time::sleep(Duration::from_millis(500)).await;
                reg.register(&service("short", "", &[("s2", "127.0.0.1:6")]), Some(ttl))
                    .await
                    .unwrap();
            }
        }
    });
    let gone = eventually(Duration::from_secs(8), || {
        addresses(&*reg, "short") == ["s2=127.0.0.1:6"]
    })
    .await;
    assert!(
        gone,
        "s1 should expire, got {:?}",
        addresses(&*reg, "short")
    );
    assert!(
        registered.elapsed() >= Duration::from_millis(1900),
        "expired too early"
    );
    renew.await.unwrap();
    assert_eq!(
        addresses(&*reg, "short"),
        ["s2=127.0.0.1:6"],
        "the renewed node must stay"
    );
    assert!(reg.status().healthy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_registry_passes_the_contract() {
    let reg = open("memory", &ClusterOptions::default()).await.unwrap();
    assert_eq!(reg.status().backend, "memory");
    contract(reg).await;
}

async fn etcd_contract(url: &str) {
    let reg = open(url, &ClusterOptions::default()).await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || reg.status().healthy).await,
        "{:?}",
        reg.status()
    );
    assert_eq!(reg.status().backend, url);
    contract(reg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_registry_passes_the_contract() {
    etcd_contract(&Server::etcd().url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_registry_in_go_micro_s_layout_passes_the_contract() {
    let etcd = Server::etcd();
    etcd_contract(&format!("{}?layout=go-micro", etcd.url())).await;
}

/// go-micro's mDNS registry, on a LAN of one host (a network namespace this test
/// creates): its own answers, heard back over the multicast loop, must not bring
/// back what was deregistered.
#[tokio::test(flavor = "current_thread")]
async fn mdns_registry_passes_the_contract() {
    let lan = pillion_testkit::lan::Lan::new(1);
    lan.enter(0);
    let url = format!("mdns://{}", lan.addr(0));
    let reg = open(&url, &ClusterOptions::default()).await.unwrap();
    assert_eq!(reg.status().backend, url);
    contract(reg.clone()).await;
    // Nothing deregistered comes back once the answers in flight have been heard.
    tokio::time::sleep(pillion_registry::mdns::BROWSE_EVERY * 2).await;
    assert!(reg.catalog().is_empty(), "{:?}", reg.catalog());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_registry_passes_the_contract() {
    let options = ClusterOptions {
        bind: format!("127.0.0.1:{}", free_udp_port()).parse().unwrap(),
        ..ClusterOptions::default()
    };
    let reg = open("cluster", &options).await.unwrap();
    // A second sidecar in the same cluster, so gossip runs while the contract does.
    let other = open("cluster", &options).await.unwrap();
    contract(reg.clone()).await;
    other.close().await;
}

#[tokio::test]
async fn unknown_registry_urls_are_refused_with_the_forms_that_work() {
    let err = open("consul://x:1", &ClusterOptions::default())
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("cluster, memory, mdns or etcd://host:port"),
        "{err}"
    );
}
