//! The cluster registry between hosts of a LAN, made of network namespaces this test
//! creates (a bridge in one, a veth into it from each "host"): sidecars with
//! `--cluster-mdns` find each other with no seed, sealed with their key; a sidecar
//! with another key is not let in. Needs root (CAP_NET_ADMIN) and iproute2.

mod common;

use std::time::Duration;

use common::{eventually, BIN};
use pillion_testkit::lan::Lan;
use pillion_testkit::{free_port, Daemon};

const KEY: &str = "lan-test-key-0123456789";

/// `pillion run` inside host `i` of `lan`, its API on that host's loopback.
fn sidecar(lan: &Lan, i: usize, key: &str) -> (Daemon, u16) {
    let api = free_port();
    let mut cmd = lan.exec(i, BIN);
    cmd.arg("run")
        .args(["--address", &format!("127.0.0.1:{api}")])
        .args(["--cluster-bind", &format!("{}:7950", lan.addr(i))])
        .args(["--cluster-mdns", "--cluster-key", key])
        .env("RUST_LOG", "info");
    (Daemon::spawn("pillion", cmd), api)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_on_a_lan_find_each_other_by_mdns_and_strangers_stay_out() {
    let lan = Lan::new(3);
    let (_a, api_a) = sidecar(&lan, 0, KEY);
    let (_b, api_b) = sidecar(&lan, 1, KEY);
    let (_c, api_c) = sidecar(&lan, 2, "a-different-key-9876543210");
    let ready = |i: usize, api: u16| {
        let lan = &lan;
        async move { lan.curl(i, &[&format!("http://127.0.0.1:{api}/healthz")]).0 == 200 }
    };
    for (i, api) in [(0, api_a), (1, api_b), (2, api_c)] {
        assert!(
            eventually(Duration::from_secs(10), || ready(i, api)).await,
            "sidecar in host {i} did not start"
        );
    }
    let body = |id: &str| {
        format!(r#"{{"name":"lan.greeter","nodes":[{{"id":"{id}","address":"10.213.0.1:9090"}}]}}"#)
    };
    for (i, api, body) in [(0, api_a, body("g1")), (2, api_c, body("g-stranger"))] {
        let (code, text) = lan.curl(
            i,
            &[
                "-H",
                "Content-Type: application/json",
                "-d",
                &body,
                &format!("http://127.0.0.1:{api}/registry"),
            ],
        );
        assert_eq!(code, 200, "{text}");
    }
    let lookup = format!("http://127.0.0.1:{api_b}/registry?service=lan.greeter");
    let found = eventually(Duration::from_secs(10), || async {
        let (code, text) = lan.curl(1, &[&lookup]);
        code == 200 && text.contains("\"g1\"")
    })
    .await;
    assert!(
        found,
        "host 1 never saw host 0's registration: {:?}",
        lan.curl(1, &[&lookup])
    );

    // Host 2 has another key: it heard the announcements but its gossip is dropped,
    // so it is not a peer and its registration is not listed by the others.
    let (_, status) = lan.curl(1, &[&format!("http://127.0.0.1:{api_b}/statusz")]);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(
        status["cluster"]["peers"],
        serde_json::json!(["10.213.0.1:7950"]),
        "{status}"
    );
    let (_, listed) = lan.curl(1, &[&lookup]);
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed[0]["nodes"].as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["nodes"][0]["id"], "g1", "{listed}");
    // The others' gossip reaches the stranger within a gossip round or two (it may
    // not have yet when host 1 has found host 0): wait for the first dropped one.
    let stranger_status = || {
        let (_, stranger) = lan.curl(2, &[&format!("http://127.0.0.1:{api_c}/statusz")]);
        serde_json::from_str::<serde_json::Value>(&stranger).unwrap()
    };
    eventually(Duration::from_secs(10), || async {
        stranger_status()["cluster"]["gossip_dropped"]
            .as_u64()
            .is_some_and(|n| n > 0)
    })
    .await;
    let stranger = stranger_status();
    assert_eq!(
        stranger["cluster"]["peers"],
        serde_json::json!([]),
        "{stranger}"
    );
    assert!(
        stranger["cluster"]["gossip_dropped"].as_u64().unwrap() > 0,
        "{stranger}"
    );
}
