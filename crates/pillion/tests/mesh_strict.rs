//! Strict mTLS: a sidecar in the mesh never calls a meshed service's node in clear
//! text. A node without a mesh listener is refused at registration for a service
//! that has meshed nodes, and left out by callers if it is registered anyway (by a
//! `--mesh-permissive` sidecar); an app other hosts reach directly is refused behind
//! `--mesh-listen`. `--mesh-permissive` is the explicit way around, for migrations.

mod common;

use std::time::Duration;

use common::{
    eventually, mesh_ca, mesh_caller, mesh_caller_with, mesh_flags, mesh_receiver, node_ids,
    run_to_end, Sidecar,
};
use pillion_testkit::http::{post_json, request};
use pillion_testkit::TestApp;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_node_of_a_meshed_service_is_refused_and_never_called() {
    let ca = mesh_ca("strict");
    let app = TestApp::start("orders").await;
    let rogue = TestApp::start("rogue").await;
    let orders = mesh_receiver(&ca, "orders", app.addr(), &[]);
    let front = mesh_caller(&orders, Some((&ca, "front")), "orders").await;
    let rogue_node = format!(
        r#"{{"name":"orders","nodes":[{{"id":"rogue-1","address":"{}"}}]}}"#,
        rogue.addr()
    );

    // Refused by a sidecar in the mesh and by one outside it, naming why.
    let plain = Sidecar::start(&["--cluster-join", &format!("127.0.0.1:{}", orders.gossip)]);
    assert!(
        eventually(Duration::from_secs(10), || async {
            !node_ids(&plain, "orders").await.is_empty()
        })
        .await
    );
    for sidecar in [&front, &plain] {
        post_json(&sidecar.url("/registry"), &rogue_node)
            .await
            .unwrap()
            .assert_refused(
                400,
                "has no mesh listener",
                "a plaintext node beside the mesh",
            );
    }

    // Registered anyway, by a sidecar that allows it: callers in the mesh leave it out.
    let permissive = Sidecar::start(&[
        "--cluster-join",
        &format!("127.0.0.1:{}", orders.gossip),
        "--mesh-permissive",
    ]);
    let reply = post_json(&permissive.url("/registry"), &rogue_node)
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(
        eventually(Duration::from_secs(10), || async {
            node_ids(&front, "orders").await.len() == 2
        })
        .await,
        "front never saw the plaintext node"
    );
    for _ in 0..12 {
        let reply = request(http::Method::GET, &front.url("/orders/x"), &[], "")
            .await
            .unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.json()["app"], "orders");
        assert_eq!(reply.json()["headers"]["x-pillion-caller"], "front");
    }
    assert_eq!(rogue.requests(), 0, "a call went to the plaintext node");

    // A caller that allows clear text (a migration) does reach it.
    let migrating = mesh_caller_with(
        &orders,
        Some((&ca, "front")),
        "orders",
        &["--mesh-permissive"],
    )
    .await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            node_ids(&migrating, "orders").await.len() == 2
        })
        .await
    );
    for _ in 0..20 {
        let _ = request(http::Method::GET, &migrating.url("/orders/x"), &[], "").await;
    }
    assert!(
        rogue.requests() > 0,
        "--mesh-permissive never used the plaintext node"
    );

    // The meshed node goes (its sidecar stops): the service stays meshed for front,
    // and the plaintext node left is still never called in clear text.
    let before = rogue.requests();
    drop(orders);
    assert!(
        eventually(Duration::from_secs(30), || async {
            node_ids(&front, "orders").await == ["rogue-1"]
        })
        .await,
        "front never saw the meshed node go: {:?}",
        node_ids(&front, "orders").await
    );
    for _ in 0..5 {
        let reply = request(http::Method::GET, &front.url("/orders/x"), &[], "")
            .await
            .unwrap();
        assert_ne!(reply.status, 200, "{}", reply.text());
    }
    assert_eq!(
        rogue.requests(),
        before,
        "the plaintext node was called once the meshed one went"
    );
}

#[test]
fn an_app_other_hosts_reach_is_refused_behind_the_mesh_listener() {
    let ca = mesh_ca("bypass");
    let mut flags = vec!["run".to_string()];
    flags.extend(mesh_flags(&ca, "orders"));
    let run = |more: &[&str]| {
        let mut args: Vec<&str> = flags.iter().map(String::as_str).collect();
        args.extend(more);
        run_to_end(&args, &[])
    };
    // The layout an attacker on the LAN exploits: the app on a routable address.
    let (code, _, err) = run(&[
        "--server-address",
        "10.1.2.3:9090",
        "--mesh-listen",
        "127.0.0.1:1",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("10.1.2.3:9090 is an address other hosts may reach")
            && err.contains("--server-address 127.0.0.1:PORT"),
        "{err}"
    );
    // The app on loopback, the mesh listener on every address: it must be advertised.
    let (code, _, err) = run(&[
        "--server-address",
        "127.0.0.1:9090",
        "--mesh-listen",
        "0.0.0.0:1",
        "--mesh-local-ca",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("needs --mesh-advertise (mesh_advertise) HOST:PORT"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_permissive_lets_a_reachable_app_start() {
    let ca = mesh_ca("bypass-permissive");
    let mesh = format!("127.0.0.1:{}", pillion_testkit::free_port());
    let mut args = mesh_flags(&ca, "orders");
    args.extend(
        [
            "--server-address",
            "10.1.2.3:9090",
            "--mesh-listen",
            &mesh,
            "--mesh-permissive",
        ]
        .map(String::from),
    );
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let sidecar = Sidecar::start(&refs);
    let ids = node_ids(&sidecar, "orders").await;
    assert_eq!(ids.len(), 1, "{ids:?}");
}
