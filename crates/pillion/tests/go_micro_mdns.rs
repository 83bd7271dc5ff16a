//! go-micro's mDNS registry across hosts of a LAN (network namespaces this test
//! creates): a go-micro service announced on host 1 as go-micro v2's mdns registry
//! announces it (`tests/gomicro/mdns_peer.py`, its records made and read by
//! python-zeroconf) is found and called by name by a sidecar on host 0 with
//! `--registry mdns://IP`; the sidecar's registrations are found by go-micro's
//! `GetService` and `ListServices` on host 1; goodbyes and silent deaths take nodes
//! out. Needs root (CAP_NET_ADMIN), iproute2, curl, go and Python's zeroconf.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::{eventually, BIN};
use pillion_testkit::lan::Lan;
use pillion_testkit::{free_port, Daemon};
use serde_json::{json, Value};

const PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/gomicro/mdns_peer.py");
const JSONRPC_SERVER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/gomicro/jsonrpc_server.go"
);

/// A go-micro service node announced on host `i`: the peer in `serve` mode.
fn announce(lan: &Lan, i: usize, id: &str, address: &str) -> Daemon {
    let mut cmd = lan.exec(i, "python3");
    cmd.args([PEER, "serve", "--iface", &lan.addr(i)])
        .args(["--name", "go.micro.srv.greeter", "--id", id])
        .args(["--address", address, "--meta", "protocol=mucp"])
        .args(["--meta", "registry=mdns", "--meta", "server=mucp"]);
    Daemon::spawn("mdns_peer.py", cmd)
}

/// What go-micro's registry on host `i` answers: `get NAME` or `list`.
fn go_micro(lan: &Lan, i: usize, args: &[&str]) -> Value {
    let out = lan
        .exec(i, "python3")
        .args([PEER])
        .args(args)
        .args(["--iface", &lan.addr(i)])
        .output()
        .expect("running python3");
    assert!(
        out.status.success(),
        "mdns_peer.py {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn node_ids(listed: &Value) -> Vec<String> {
    let mut ids: Vec<String> = listed
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["nodes"].as_array().cloned().unwrap_or_default())
        .map(|n| n["id"].as_str().unwrap_or_default().to_string())
        .collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_micro_services_and_sidecars_find_each_other_by_go_micro_s_mdns() {
    let python = Command::new("python3")
        .args(["-c", "import zeroconf"])
        .output();
    assert!(
        python.as_ref().is_ok_and(|o| o.status.success()),
        "python3 with zeroconf is needed ({python:?}): `python3 -m pip install zeroconf` \
         (scripts/test does it)"
    );
    let lan = Lan::new(2);

    // Host 1: a go-micro-era JSON-RPC server and two announced nodes of it.
    let bin = common::go_build(JSONRPC_SERVER);
    let go_node: SocketAddr = format!("{}:{}", lan.addr(1), free_port()).parse().unwrap();
    let mut server = lan.exec(1, bin.to_str().unwrap());
    server.arg(go_node.to_string());
    let _server = Daemon::spawn("jsonrpc_server", server);
    let mut node_a = announce(&lan, 1, "go.micro.srv.greeter-a", &go_node.to_string());
    let mut node_b = announce(&lan, 1, "go.micro.srv.greeter-b", &go_node.to_string());

    // Host 0: a sidecar on go-micro's mDNS registry, with an app.
    let api = free_port();
    let app_address = format!("{}:9090", lan.addr(0));
    let mut sidecar = lan.exec(0, BIN);
    sidecar
        .arg("run")
        .args(["--address", &format!("127.0.0.1:{api}")])
        .args(["--registry", &format!("mdns://{}", lan.addr(0))])
        .args(["--server-name", "py.app", "--server-address", &app_address])
        .env("RUST_LOG", "info");
    let mut sidecar = Daemon::spawn("pillion", sidecar);
    let url = |path: &str| format!("http://127.0.0.1:{api}{path}");
    let greeters = || lan.curl(0, &[&url("/registry?service=go.micro.srv.greeter")]);

    // The go-micro service is found, both nodes, at their address...
    let found = eventually(Duration::from_secs(15), || async {
        let (code, text) = greeters();
        code == 200
            && node_ids(&serde_json::from_str(&text).unwrap_or(Value::Null))
                == ["go.micro.srv.greeter-a", "go.micro.srv.greeter-b"]
    })
    .await;
    assert!(
        found,
        "the go-micro service was never found: {:?}",
        greeters()
    );
    let (_, text) = greeters();
    let listed: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        listed[0]["nodes"][0]["address"],
        go_node.to_string(),
        "{listed}"
    );
    assert_eq!(listed[0]["nodes"][0]["metadata"]["protocol"], "mucp");
    assert_eq!(listed[0]["version"], "latest");
    assert_eq!(listed[0]["endpoints"][0]["name"], "Say.Hello");

    // ...and called by name with go-micro's RPC.
    let (code, body) = lan.curl(
        0,
        &[
            "-H",
            "Content-Type: application/json",
            "-d",
            r#"{"service":"go.micro.srv.greeter","method":"Say.Hello","request":{"name":"John"}}"#,
            &url("/rpc"),
        ],
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"msg": "Hello John"})
    );

    // go-micro on host 1 finds the sidecar's app, and a registration made through the
    // API (its port apart), and lists both names.
    let apps = eventually(Duration::from_secs(10), || async {
        go_micro(&lan, 1, &["get", "--name", "py.app"])
            .as_array()
            .is_some_and(|s| s.len() == 1)
    })
    .await;
    assert!(apps, "go-micro never found py.app");
    let services = go_micro(&lan, 1, &["get", "--name", "py.app"]);
    assert_eq!(
        services[0]["nodes"][0]["address"], app_address,
        "{services}"
    );
    assert!(
        services[0]["nodes"][0]["id"]
            .as_str()
            .unwrap()
            .starts_with("py.app-"),
        "{services}"
    );
    let (code, text) = lan.curl(
        0,
        &[
            "-H",
            "Content-Type: application/json",
            "-d",
            &json!({"name": "py.orders", "version": "2", "nodes": [{"id": "orders-1",
                "address": lan.addr(0), "port": 7001, "metadata": {"team": "shop"}}]})
            .to_string(),
            &url("/registry"),
        ],
    );
    assert_eq!(code, 200, "{text}");
    let orders = go_micro(&lan, 1, &["get", "--name", "py.orders"]);
    assert_eq!(
        orders,
        json!([{"name": "py.orders", "version": "2", "endpoints": null, "nodes": [
            {"id": "orders-1", "address": format!("{}:7001", lan.addr(0)), "metadata": {"team": "shop"}}
        ]}])
    );
    let names = go_micro(&lan, 1, &["list"]);
    for name in ["py.app", "py.orders"] {
        assert!(names.as_array().unwrap().contains(&json!(name)), "{names}");
    }

    // A deregistration: go-micro no longer finds it.
    let (code, text) = lan.curl(
        0,
        &[
            "-X",
            "DELETE",
            "-H",
            "Content-Type: application/json",
            "-d",
            r#"{"name":"py.orders","version":"2"}"#,
            &url("/registry"),
        ],
    );
    assert_eq!(code, 200, "{text}");
    assert_eq!(
        go_micro(&lan, 1, &["get", "--name", "py.orders"]),
        json!([])
    );

    // A node that stops says goodbye: gone at once. One that dies silently: gone once
    // it stops answering.
    node_a.signal("TERM");
    assert!(node_a.wait_exit(Duration::from_secs(5)).is_some());
    let said_goodbye = eventually(Duration::from_secs(3), || async {
        node_ids(&serde_json::from_str(&greeters().1).unwrap_or(Value::Null))
            == ["go.micro.srv.greeter-b"]
    })
    .await;
    assert!(
        said_goodbye,
        "a goodbye did not take the node out: {:?}",
        greeters()
    );
    node_b.kill();
    let forgotten = eventually(Duration::from_secs(15), || async {
        let (code, _) = greeters();
        code == 404
    })
    .await;
    assert!(forgotten, "a silent node stayed: {:?}", greeters());
    let (code, body) = lan.curl(
        0,
        &[
            "-H",
            "Content-Type: application/json",
            "-d",
            r#"{"service":"go.micro.srv.greeter","method":"Say.Hello","request":{}}"#,
            &url("/rpc"),
        ],
    );
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("go.micro.srv.greeter"), "{body}");

    // The sidecar stops: go-micro no longer finds its app.
    sidecar.signal("TERM");
    assert!(sidecar.wait_exit(Duration::from_secs(15)).is_some());
    assert_eq!(go_micro(&lan, 1, &["get", "--name", "py.app"]), json!([]));
}
