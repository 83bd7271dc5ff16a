//! The cluster registry between real sidecar processes on loopback: they find each
//! other with nothing but a shared gossip address (the test's own, never the
//! well-known one), and a registration made through one is listed by all.

mod common;

use std::time::{Duration, Instant};

use common::{eventually, node_ids, register, run_to_end, Sidecar};
use pillion_testkit::free_udp_port;

fn cluster(n: usize) -> (String, Vec<Sidecar>) {
    let bind = format!("127.0.0.1:{}", free_udp_port());
    let sidecars = (0..n)
        .map(|_| Sidecar::start(&["--cluster-bind", &bind]))
        .collect();
    (bind, sidecars)
}

/// How long until every sidecar lists exactly `ids` for `service`; `None` past `limit`.
async fn converged(
    sidecars: &[&Sidecar],
    service: &str,
    ids: &[&str],
    limit: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    let mut pending: Vec<&Sidecar> = sidecars.to_vec();
    while !pending.is_empty() {
        let mut still = Vec::new();
        for sc in pending {
            if node_ids(sc, service).await != ids {
                still.push(sc);
            }
        }
        pending = still;
        if pending.is_empty() {
            break;
        }
        if start.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Some(start.elapsed())
}

/// Waits until every sidecar sees the other `n - 1` (so timing starts from a formed
/// cluster, as it would in production).
async fn formed(sidecars: &[Sidecar]) {
    let n = sidecars.len();
    for sc in sidecars {
        let ok = eventually(Duration::from_secs(20), || async {
            let status = pillion_testkit::http::get(&sc.url("/statusz"))
                .await
                .expect("statusz");
            status.json()["cluster"]["peers"]
                .as_array()
                .is_some_and(|p| p.len() == n - 1)
        })
        .await;
        assert!(ok, "sidecar {} did not meet the other {}", sc.addr, n - 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sidecars_see_a_registration_within_a_second() {
    let (_, sidecars) = cluster(3);
    formed(&sidecars).await;
    register(&sidecars[0], "greeter", "g1", "127.0.0.1:9001", &[]).await;
    let all: Vec<&Sidecar> = sidecars.iter().collect();
    let took = converged(&all, "greeter", &["g1"], Duration::from_secs(1)).await;
    assert!(took.is_some(), "not everywhere within 1 s");
    eprintln!("3 sidecars: registration everywhere after {took:?}");

    // /metrics shows the gossip the sidecar did.
    let metrics = pillion_testkit::http::get(&sidecars[1].url("/metrics"))
        .await
        .unwrap()
        .text();
    assert!(metrics.contains("pillion_cluster_peers 2"), "{metrics}");
    assert!(
        metrics.contains("pillion_gossip_sent_bytes_total "),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_sidecars_converge_forget_the_dead_and_welcome_the_restarted() {
    let (bind, mut sidecars) = cluster(30);
    formed(&sidecars).await;

    // A registration through one reaches the 29 others within 2 s.
    register(&sidecars[7], "orders", "o1", "127.0.0.1:9002", &[]).await;
    let all: Vec<&Sidecar> = sidecars.iter().collect();
    let took = converged(&all, "orders", &["o1"], Duration::from_secs(2)).await;
    assert!(took.is_some(), "not everywhere within 2 s");
    eprintln!("30 sidecars: registration everywhere after {took:?}");

    // SIGKILL: no goodbye; the others drop its registration within 5 s.
    sidecars[7].process.kill();
    let killed = Instant::now();
    let rest: Vec<&Sidecar> = sidecars
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 7)
        .map(|(_, s)| s)
        .collect();
    let gone = converged(&rest, "orders", &[], Duration::from_secs(5)).await;
    assert!(
        gone.is_some(),
        "a killed sidecar's registration stayed past 5 s"
    );
    eprintln!(
        "30 sidecars: killed sidecar's registration gone after {:?}",
        killed.elapsed()
    );

    // A sidecar started again sees what the others registered within 3 s.
    register(&sidecars[3], "billing", "b1", "127.0.0.1:9003", &[]).await;
    let started = Instant::now();
    let again = Sidecar::start(&["--cluster-bind", &bind]);
    let seen = converged(&[&again], "billing", &["b1"], Duration::from_secs(3)).await;
    assert!(
        seen.is_some(),
        "the restarted sidecar did not see the others within 3 s"
    );
    eprintln!(
        "30 sidecars: restarted sidecar saw them after {:?}",
        started.elapsed()
    );
}

/// A registration of one node whose metadata holds `bytes` bytes in one value.
fn with_metadata(service: &str, id: &str, bytes: usize) -> String {
    serde_json::json!({
        "name": service,
        "nodes": [{"id": id, "address": "127.0.0.1:9010", "metadata": {"blob": "x".repeat(bytes)}}],
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_too_large_for_gossip_is_refused_and_later_registrations_still_spread() {
    let (_, sidecars) = cluster(3);
    formed(&sidecars).await;
    let all: Vec<&Sidecar> = sidecars.iter().collect();
    for bytes in [70_000, 900_000] {
        let reply = pillion_testkit::http::post_json(
            &sidecars[0].url("/registry"),
            &with_metadata("big", "b1", bytes),
        )
        .await
        .unwrap();
        reply.assert_refused(
            400,
            "at most 32768 bytes (32 KiB) are allowed per node",
            &format!("{bytes} bytes of metadata"),
        );
    }
    // The registrations that follow, through the same sidecar, reach the others.
    register(&sidecars[0], "small", "s1", "127.0.0.1:9011", &[]).await;
    assert!(
        converged(&all, "small", &["s1"], Duration::from_secs(5))
            .await
            .is_some(),
        "a small registration did not spread after a refused large one"
    );
    // The largest metadata allowed spreads too, and nothing queues behind it.
    let largest = with_metadata("large", "l1", 32 * 1024 - "blob".len());
    let reply = pillion_testkit::http::post_json(&sidecars[0].url("/registry"), &largest)
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    register(&sidecars[0], "after", "a1", "127.0.0.1:9012", &[]).await;
    for (service, id) in [("large", "l1"), ("after", "a1")] {
        assert!(
            converged(&all, service, &[id], Duration::from_secs(5))
                .await
                .is_some(),
            "{service} did not spread"
        );
    }
    let status = pillion_testkit::http::get(&sidecars[0].url("/statusz"))
        .await
        .unwrap()
        .json();
    assert_eq!(status["cluster"]["replication_stalled"], false, "{status}");
    let health = pillion_testkit::http::get(&sidecars[0].url("/healthz"))
        .await
        .unwrap();
    assert_eq!(health.status, 200, "{}", health.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_deregisters_everywhere() {
    let (_, mut sidecars) = cluster(2);
    formed(&sidecars).await;
    register(&sidecars[0], "leaving", "l1", "127.0.0.1:9004", &[]).await;
    let all: Vec<&Sidecar> = sidecars.iter().collect();
    assert!(converged(&all, "leaving", &["l1"], Duration::from_secs(5))
        .await
        .is_some());
    sidecars[0].process.signal("TERM");
    assert!(
        converged(&[&sidecars[1]], "leaving", &[], Duration::from_secs(3))
            .await
            .is_some(),
        "a stopped sidecar's registration stayed"
    );
    assert_eq!(
        sidecars[0].process.wait_exit(Duration::from_secs(15)),
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn separate_seeds_make_separate_clusters() {
    let seed_a = free_udp_port();
    let seed_b = free_udp_port();
    let a1 = Sidecar::start(&[
        "--cluster-bind",
        &format!("127.0.0.1:{seed_a}"),
        "--cluster-join",
        &format!("127.0.0.1:{seed_a}"),
    ]);
    let a2 = Sidecar::start(&[
        "--cluster-bind",
        "127.0.0.1:0",
        "--cluster-join",
        &format!("127.0.0.1:{seed_a}"),
    ]);
    let b1 = Sidecar::start(&[
        "--cluster-bind",
        &format!("127.0.0.1:{seed_b}"),
        "--cluster-join",
        &format!("127.0.0.1:{seed_b}"),
    ]);
    register(&a1, "svc", "in-a", "127.0.0.1:9005", &[]).await;
    register(&b1, "svc", "in-b", "127.0.0.1:9006", &[]).await;
    assert!(converged(&[&a2], "svc", &["in-a"], Duration::from_secs(5))
        .await
        .is_some());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(node_ids(&a1, "svc").await, ["in-a"]);
    assert_eq!(node_ids(&b1, "svc").await, ["in-b"]);
}

#[test]
fn gossip_off_loopback_without_a_key_is_refused_naming_the_flag() {
    let (code, _, err) = run_to_end(
        &[
            "run",
            "--address",
            "127.0.0.1:0",
            "--cluster-bind",
            "192.0.2.1:7950",
        ],
        &[],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--cluster-key"), "{err}");
}
