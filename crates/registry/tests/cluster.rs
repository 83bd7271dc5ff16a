//! The cluster registry between several sidecars in one test process: each gets its
//! own gossip socket, they meet at a rendezvous port the test picks (never the
//! default one), and what one registers the others see.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pillion_core::{Node, Service};
use pillion_registry::cluster::{ClusterOptions, ClusterRegistry};
use pillion_registry::{Registry, RegistryError};
use pillion_testkit::free_udp_port;

fn service(name: &str, id: &str, port: u16) -> Service {
    Service {
        name: name.into(),
        nodes: vec![Node {
            id: id.into(),
            address: format!("127.0.0.1:{port}"),
            ..Node::default()
        }],
        ..Service::default()
    }
}

fn ids(reg: &dyn Registry, name: &str) -> Vec<String> {
    reg.catalog()
        .get(name)
        .map(|vs| {
            vs.iter()
                .flat_map(|s| s.nodes.iter().map(|n| n.id.clone()))
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
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

fn local(port: u16) -> ClusterOptions {
    ClusterOptions {
        bind: SocketAddr::from(([127, 0, 0, 1], port)),
        ..ClusterOptions::default()
    }
}

async fn start(options: &ClusterOptions) -> Arc<ClusterRegistry> {
    Arc::new(ClusterRegistry::start(options.clone()).await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_on_one_host_find_each_other_and_see_each_others_registrations() {
    let options = local(free_udp_port());
    let a = start(&options).await;
    let b = start(&options).await;
    let c = start(&options).await;
    a.register(&service("greeter", "a1", 1), None)
        .await
        .unwrap();
    c.register(&service("greeter", "c1", 3), None)
        .await
        .unwrap();
    for reg in [&a, &b, &c] {
        assert!(
            eventually(Duration::from_secs(5), || ids(&**reg, "greeter")
                == ["a1", "c1"])
            .await,
            "got {:?}",
            ids(&**reg, "greeter")
        );
    }
    assert_eq!(
        a.cluster_status().peers.len(),
        2,
        "{:?}",
        a.cluster_status()
    );
    let holders = [&a, &b, &c]
        .iter()
        .filter(|r| r.cluster_status().rendezvous)
        .count();
    assert_eq!(holders, 1, "exactly one sidecar holds the rendezvous port");

    // A deregistration through its owner leaves everywhere.
    a.deregister(&service("greeter", "a1", 1)).await.unwrap();
    for reg in [&a, &b, &c] {
        assert!(
            eventually(Duration::from_secs(5), || ids(&**reg, "greeter") == ["c1"]).await,
            "got {:?}",
            ids(&**reg, "greeter")
        );
    }

    // Another sidecar's node cannot be taken out here; the error says where it lives.
    let err = b
        .deregister(&service("greeter", "c1", 3))
        .await
        .unwrap_err();
    let RegistryError::Invalid(msg) = err else {
        panic!("{err:?}")
    };
    assert!(msg.contains("registered through another sidecar"), "{msg}");
    assert!(msg.contains(&c.cluster_status().gossip), "{msg}");
    assert_eq!(ids(&*a, "greeter"), ["c1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_sidecars_registrations_leave_and_the_rendezvous_is_taken_over() {
    let options = local(free_udp_port());
    let first = start(&options).await;
    // The first sidecar holds the rendezvous port; the others meet through it.
    assert!(eventually(Duration::from_secs(3), || first.cluster_status().rendezvous).await);
    let b = start(&options).await;
    let c = start(&options).await;
    first
        .register(&service("doomed", "d1", 1), None)
        .await
        .unwrap();
    assert!(eventually(Duration::from_secs(5), || ids(&*b, "doomed") == ["d1"]).await);
    assert!(eventually(Duration::from_secs(5), || ids(&*c, "doomed") == ["d1"]).await);

    // The holder dies without a word (no close): its registration leaves the others.
    drop(first);
    let died = Instant::now();
    for reg in [&b, &c] {
        assert!(
            eventually(Duration::from_secs(10), || ids(&**reg, "doomed").is_empty()).await,
            "a dead sidecar's registration stayed"
        );
    }
    eprintln!(
        "dead sidecar's registration gone after {:?}",
        died.elapsed()
    );
    // Someone took the rendezvous over, so a newcomer still finds the cluster.
    assert!(
        eventually(Duration::from_secs(5), || {
            b.cluster_status().rendezvous || c.cluster_status().rendezvous
        })
        .await
    );
    b.register(&service("late", "l1", 2), None).await.unwrap();
    let newcomer = start(&options).await;
    assert!(
        eventually(Duration::from_secs(5), || ids(&*newcomer, "late") == ["l1"]).await,
        "a sidecar started after the holder died did not find the others"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_takes_its_registrations_out_at_once_and_ttls_lapse_everywhere() {
    let options = local(free_udp_port());
    let a = start(&options).await;
    let b = start(&options).await;
    a.register(&service("leaving", "x1", 1), None)
        .await
        .unwrap();
    a.register(&service("brief", "t1", 2), Some(Duration::from_secs(1)))
        .await
        .unwrap();
    assert!(eventually(Duration::from_secs(5), || ids(&*b, "leaving") == ["x1"]).await);
    assert!(eventually(Duration::from_secs(5), || ids(&*b, "brief") == ["t1"]).await);
    // The TTL is kept by the sidecar that registered: it lapses on both.
    assert!(eventually(Duration::from_secs(5), || ids(&*b, "brief").is_empty()).await);
    assert!(ids(&*a, "brief").is_empty());

    let stopped = Instant::now();
    a.close().await;
    assert!(
        eventually(Duration::from_secs(2), || ids(&*b, "leaving").is_empty()).await,
        "a closed sidecar's registration stayed"
    );
    eprintln!("gone {:?} after close began", stopped.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeds_keep_clusters_apart_and_keys_keep_strangers_out() {
    // Two clusters joined by seeds, each sealed with its own key.
    let seed_one = free_udp_port();
    let one = |port: u16| ClusterOptions {
        bind: SocketAddr::from(([127, 0, 0, 1], port)),
        join: vec![format!("127.0.0.1:{seed_one}")],
        key: Some("key-of-cluster-one-0123".into()),
        ..Default::default()
    };
    let a = start(&one(seed_one)).await;
    let b = start(&one(0)).await;
    let stranger = start(&ClusterOptions {
        key: Some("another-key-entirely-42".into()),
        ..one(0)
    })
    .await;
    let unsealed = start(&ClusterOptions {
        key: None,
        ..one(0)
    })
    .await;
    b.register(&service("inside", "i1", 1), None).await.unwrap();
    stranger
        .register(&service("outside", "o1", 2), None)
        .await
        .unwrap();
    unsealed
        .register(&service("outside", "o2", 3), None)
        .await
        .unwrap();
    assert!(eventually(Duration::from_secs(5), || ids(&*a, "inside") == ["i1"]).await);
    // Give gossip time to cross if it could.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(ids(&*a, "outside").is_empty(), "{:?}", ids(&*a, "outside"));
    assert!(ids(&*stranger, "inside").is_empty());
    assert!(ids(&*unsealed, "inside").is_empty());
    assert_eq!(a.cluster_status().peers, [b.cluster_status().gossip]);
    assert!(
        a.cluster_status().gossip_dropped > 0,
        "the strangers' gossip must be seen and dropped"
    );
}

#[tokio::test]
async fn unsafe_or_unusable_options_are_refused_naming_the_flag() {
    let refuse = |options: ClusterOptions| async move {
        match ClusterRegistry::start(options).await {
            Err(RegistryError::Invalid(msg)) => msg,
            Err(e) => panic!("{e:?}"),
            Ok(_) => panic!("accepted"),
        }
    };
    let lan = ClusterOptions {
        bind: "192.0.2.10:7950".parse().unwrap(),
        ..ClusterOptions::default()
    };
    let msg = refuse(lan.clone()).await;
    assert!(msg.contains("--cluster-key"), "{msg}");
    let msg = refuse(ClusterOptions {
        key: Some("short".into()),
        ..lan
    })
    .await;
    assert!(msg.contains("at least 16"), "{msg}");
    let msg = refuse(ClusterOptions {
        bind: "0.0.0.0:7950".parse().unwrap(),
        key: Some("0123456789abcdef".into()),
        ..ClusterOptions::default()
    })
    .await;
    assert!(msg.contains("--cluster-bind 0.0.0.0:7950"), "{msg}");
    // A gossip port another process holds, with seeds (so it must bind exactly it).
    let busy = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let msg = refuse(ClusterOptions {
        bind: busy.local_addr().unwrap(),
        join: vec!["127.0.0.1:9".into()],
        ..ClusterOptions::default()
    })
    .await;
    assert!(msg.contains("cannot bind the gossip address"), "{msg}");
}

/// A registration that the API would refuse (see `pillion_core::service`'s limits) put
/// straight into the adapter: chitchat never sends a value larger than a gossip message,
/// and every later change of the sidecar waits behind it. The sidecar must say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_too_large_for_gossip_is_reported_as_a_stall_until_it_goes() {
    let options = local(free_udp_port());
    let a = start(&options).await;
    let b = start(&options).await;
    let c = start(&options).await;
    a.register(&service("before", "x1", 1), None).await.unwrap();
    for reg in [&b, &c] {
        assert!(eventually(Duration::from_secs(5), || ids(&**reg, "before") == ["x1"]).await);
    }
    assert!(a.status().healthy);

    let mut big = service("big", "b1", 2);
    big.nodes[0]
        .metadata
        .insert("blob".into(), "x".repeat(70_000));
    a.register(&big, None).await.unwrap();
    a.register(&service("after", "y1", 3), None).await.unwrap();
    // Each peer is named once it has lagged long enough (on a busy machine one may
    // be named a round before the other).
    let peers = [b.cluster_status().gossip, c.cluster_status().gossip];
    let names_both = || {
        let error = a.status().error.unwrap_or_default();
        peers.iter().all(|p| error.contains(p.as_str()))
    };
    assert!(
        eventually(Duration::from_secs(15), names_both).await,
        "no stall reported naming both peers: {:?} {:?}",
        a.status(),
        a.cluster_status()
    );
    let status = a.status();
    assert!(!status.healthy);
    let error = status.error.unwrap_or_default();
    assert!(error.contains("gossip replication stalled"), "{error}");
    let cluster = a.cluster_status();
    assert!(cluster.replication_stalled);
    assert_eq!(cluster.lagging_peers.len(), 2, "{cluster:?}");
    assert_eq!(cluster.replication_stalls, 1);
    let mut metrics = String::new();
    cluster.render_metrics(&mut metrics);
    assert!(
        metrics.contains("pillion_gossip_lagging_peers 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("pillion_gossip_replication_stalls_total 1"),
        "{metrics}"
    );
    assert!(
        ids(&*b, "after").is_empty(),
        "the stall is not what chitchat does any more"
    );
    assert!(
        b.status().healthy,
        "only the sidecar whose state is stuck reports it"
    );

    // Once the value is gone, what waited behind it spreads, and the stall clears.
    a.deregister(&big).await.unwrap();
    for reg in [&b, &c] {
        assert!(eventually(Duration::from_secs(10), || ids(&**reg, "after") == ["y1"]).await);
    }
    assert!(
        eventually(Duration::from_secs(10), || a.status().healthy).await,
        "{:?}",
        a.status()
    );
    assert!(!a.cluster_status().replication_stalled);
}
