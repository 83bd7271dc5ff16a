//! A Go program sending exactly what go-micro's `registry.Service` marshals to
//! (`tests/gomicro/register.go`, go-micro's types copied from its source): it registers
//! a v0 and a v1 node with every empty field `null`, reads them back into the same
//! types checking `Address` and `Port`, checks the app the sidecar registered the same
//! way, calls through `/rpc` with `endpoint`, and deregisters.
//!
//! Then go-micro's RPC to nodes, with the other side's real code: a JSON-RPC server on
//! Go's standard library (`tests/gomicro/jsonrpc_server.go`, `net/rpc/jsonrpc` over
//! HTTP) registered as go-micro v1's `mucp` and as `jsonrpc`, and micro's own Python
//! example server (`tests/gomicro/sidecar_server.py`, the `json-rpc` package).
//!
//! Needs `go` (Debian's `golang-go`) and Python's werkzeug, requests and json-rpc;
//! `scripts/test` installs them. No Go module is downloaded: the programs use the
//! standard library only.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::Sidecar;
use pillion_testkit::http::{post_json, Reply};
use pillion_testkit::process::{free_port, wait_for_port, Daemon};
use pillion_testkit::TestApp;
use serde_json::{json, Value};

const PROGRAM: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/gomicro/register.go");

use common::{go, go_dir};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_go_micro_app_registers_reads_back_and_calls_unchanged() {
    let dir = go_dir();
    let version = go(&dir).arg("version").output();
    assert!(
        version.as_ref().is_ok_and(|o| o.status.success()),
        "`go` is missing or broken ({version:?}): install Debian's golang-go \
         (`apt-get install -y golang-go`; scripts/test installs it)"
    );

    let node = TestApp::start("greeter").await;
    let app = TestApp::start("app").await;
    let app_address = app.addr().to_string();
    let sc = Sidecar::start(&[
        "--server-name",
        "go.micro.srv.app",
        "--server-address",
        &app_address,
    ]);
    assert!(
        common::eventually(std::time::Duration::from_secs(5), || async {
            common::node_ids(&sc, "go.micro.srv.app").await.len() == 1
        })
        .await,
        "the app was never registered"
    );

    let mut run = go(&dir);
    run.args(["run", PROGRAM, "-sidecar", &sc.url("")])
        .args(["-node", &node.addr().to_string()])
        .args(["-app", "go.micro.srv.app", "-app-address", &app_address]);
    let out = tokio::task::spawn_blocking(move || run.output())
        .await
        .unwrap()
        .expect("running go");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.trim() == "ok",
        "the go-micro program failed ({}):\n{stdout}{stderr}",
        out.status
    );
    assert_eq!(node.requests(), 1, "the /rpc call reached the node");
}

const JSONRPC_SERVER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/gomicro/jsonrpc_server.go"
);
const PYTHON_SERVER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/gomicro/sidecar_server.py"
);

/// The Go JSON-RPC server (`tests/gomicro/jsonrpc_server.go`), built and listening.
fn go_jsonrpc_server() -> (Daemon, SocketAddr) {
    let bin = common::go_build(JSONRPC_SERVER);
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut cmd = Command::new(&bin);
    cmd.arg(addr.to_string());
    let server = Daemon::spawn("jsonrpc_server", cmd);
    assert!(
        wait_for_port(addr, Duration::from_secs(10)),
        "the Go JSON-RPC server did not listen on {addr}"
    );
    (server, addr)
}

async fn rpc(sc: &Sidecar, service: &str, method: &str, request: Value) -> Reply {
    let body = json!({"service": service, "method": method, "request": request});
    post_json(&sc.url("/rpc"), &body.to_string()).await.unwrap()
}

/// Calls `Say.Hello` of `service` (the Go server) for John, and checks its answer.
async fn says_hello(sc: &Sidecar, service: &str) -> Reply {
    let hello = rpc(sc, service, "Say.Hello", json!({"name": "John"})).await;
    assert_eq!(hello.status, 200, "{}", hello.text());
    assert_eq!(hello.json(), json!({"msg": "Hello John"}));
    hello
}

/// What the Go server saw of the request before the last one.
async fn seen_by_go(sc: &Sidecar, service: &str) -> Value {
    let reply = rpc(sc, service, "Say.Seen", json!({})).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_go_json_rpc_server_is_called_as_go_micro_s_client_called_it() {
    let (_server, addr) = go_jsonrpc_server();
    let sc = Sidecar::start(&[]);
    let node = addr.to_string();
    common::register(
        &sc,
        "go.micro.srv.greeter",
        "g1",
        &node,
        &[("protocol", "mucp")],
    )
    .await;
    common::register(
        &sc,
        "jsonrpc.greeter",
        "j1",
        &node,
        &[("protocol", "jsonrpc")],
    )
    .await;

    // The result, unwrapped.
    let hello = says_hello(&sc, "go.micro.srv.greeter").await;
    assert_eq!(hello.headers["content-type"], "application/json");

    // On the wire, as go-micro's HTTP transport and JSON-RPC codec sent it.
    let seen = seen_by_go(&sc, "go.micro.srv.greeter").await;
    assert_eq!(
        (seen["method"].as_str(), seen["path"].as_str()),
        (Some("POST"), Some("/"))
    );
    let headers = &seen["headers"];
    assert_eq!(headers["Content-Type"], "application/json-rpc", "{seen}");
    assert_eq!(headers["Micro-Service"], "go.micro.srv.greeter", "{seen}");
    assert_eq!(headers["Micro-Endpoint"], "Say.Hello", "{seen}");
    assert!(
        headers["Timeout"].as_str().unwrap().parse::<u64>().unwrap() > 1_000_000_000,
        "go-micro's Timeout header is in nanoseconds: {seen}"
    );
    let envelope: Value = serde_json::from_str(seen["body"].as_str().unwrap()).unwrap();
    assert_eq!(envelope["method"], "Say.Hello");
    assert_eq!(envelope["params"], json!([{"name": "John"}]));

    // protocol=jsonrpc: micro's sidecar's content type, no go-micro v1 headers.
    let hello = rpc(&sc, "jsonrpc.greeter", "Say.Hello", json!({"name": "Ann"})).await;
    assert_eq!(hello.json(), json!({"msg": "Hello Ann"}));
    let seen = seen_by_go(&sc, "jsonrpc.greeter").await;
    assert_eq!(
        seen["headers"]["Content-Type"], "application/json",
        "{seen}"
    );
    assert!(seen["headers"].get("Micro-Service").is_none(), "{seen}");

    // By path, as micro's API mapped it: /{service}/{method} with the body as request.
    let sc_ns = Sidecar::start(&["--namespace", "go.micro.srv"]);
    common::register(
        &sc_ns,
        "go.micro.srv.greeter",
        "g1",
        &node,
        &[("protocol", "mucp")],
    )
    .await;
    let by_path = post_json(&sc_ns.url("/greeter/say/hello"), r#"{"name":"Bo"}"#)
        .await
        .unwrap();
    assert_eq!(
        by_path.json(),
        json!({"msg": "Hello Bo"}),
        "{}",
        by_path.text()
    );

    // A go-micro error keeps its code and body; any other error is micro's 500.
    let not_found = rpc(
        &sc,
        "go.micro.srv.greeter",
        "Say.NotFound",
        json!({"name": "Zed"}),
    )
    .await;
    assert_eq!(not_found.status, 404, "{}", not_found.text());
    assert_eq!(
        not_found.json(),
        json!({"id": "go.micro.srv.greeter", "code": 404, "detail": "no user Zed", "status": "Not Found"})
    );
    rpc(&sc, "go.micro.srv.greeter", "Say.Missing", json!({}))
        .await
        .assert_refused(
            500,
            "error during request: rpc: can't find method Say.Missing",
            "Say.Missing",
        );

    // What cannot be sent as JSON-RPC is refused before it leaves.
    let proto = pillion_testkit::http::request(
        http::Method::POST,
        &sc_ns.url("/greeter/say/hello"),
        &[("content-type", "application/protobuf")],
        &b"\x0a\x04John"[..],
    )
    .await
    .unwrap();
    proto.assert_refused(415, "application/json", "a proto-rpc call");
    post_json(&sc_ns.url("/greeter/say/hello"), "{\"name\":")
        .await
        .unwrap()
        .assert_refused(400, "not JSON", "a broken JSON body");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn micro_s_python_example_server_works_with_rpc_codec_jsonrpc() {
    let python = Command::new("python3")
        .args(["-c", "import werkzeug, requests, jsonrpc"])
        .output();
    assert!(
        python.as_ref().is_ok_and(|o| o.status.success()),
        "python3 with werkzeug, requests and json-rpc is needed ({python:?}): \
         `python3 -m pip install werkzeug requests json-rpc` (scripts/test does it)"
    );
    let sc = Sidecar::start(&["--rpc-codec", "jsonrpc", "--namespace", "go.micro.srv"]);
    let port = free_port();
    let mut cmd = Command::new("python3");
    cmd.arg(PYTHON_SERVER)
        .arg(sc.addr.to_string())
        .arg(port.to_string());
    let _server = Daemon::spawn("sidecar_server.py", cmd);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert!(
        wait_for_port(addr, Duration::from_secs(20)),
        "micro's example server did not listen on {addr}"
    );
    // It registers itself with the sidecar, as it registered with micro's.
    assert!(
        common::eventually(Duration::from_secs(10), || async {
            common::node_ids(&sc, "go.micro.srv.greeter").await.len() == 1
        })
        .await,
        "the example server never registered"
    );

    // micro's example client's call, in JSON and as a form.
    let hello = rpc(
        &sc,
        "go.micro.srv.greeter",
        "Say.Hello",
        json!({"name": "John"}),
    )
    .await;
    assert_eq!(
        (hello.status.as_u16(), hello.json()),
        (200, json!("hello John")),
        "{}",
        hello.text()
    );
    let form = pillion_testkit::http::post_form(
        &sc.url("/rpc"),
        "service=go.micro.srv.greeter&method=Say.Hello&request=%7B%22name%22%3A%22Jo%22%7D",
    )
    .await
    .unwrap();
    assert_eq!(form.json(), json!("hello Jo"), "{}", form.text());
    // By path.
    let by_path = post_json(&sc.url("/greeter/say/hello"), r#"{"name":"Al"}"#)
        .await
        .unwrap();
    assert_eq!(by_path.json(), json!("hello Al"), "{}", by_path.text());

    // JSON types and every digit reach the server and come back.
    let request = r#"{"n":2,"big":123456789012345678901234567890,"list":[true,null,"x"]}"#;
    let echo = post_json(&sc.url("/greeter/say/echo"), request)
        .await
        .unwrap();
    assert_eq!(echo.status, 200, "{}", echo.text());
    assert!(
        echo.text().contains("123456789012345678901234567890"),
        "{}",
        echo.text()
    );
    assert_eq!(echo.json()["list"], json!([true, null, "x"]));
    assert_eq!(echo.json()["n"], 2);

    // The package's JSON-RPC errors, mapped.
    rpc(&sc, "go.micro.srv.greeter", "Say.Nope", json!({}))
        .await
        .assert_refused(404, "Method not found", "an unknown method");
    rpc(
        &sc,
        "go.micro.srv.greeter",
        "Say.Fail",
        json!({"name": "Kim"}),
    )
    .await
    .assert_refused(500, "no greeting for Kim", "a method that raises");
}

const ETCD_REGISTRY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/gomicro/etcd_registry.go"
);

/// etcd's own client, `etcdctl` (Debian's `etcd-client`), against `etcd`.
fn etcdctl(etcd: &pillion_testkit::Server, args: &[&str]) -> String {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints=http://{}", etcd.addr()))
        .args(args)
        .output()
        .expect("running etcdctl (Debian's etcd-client; scripts/test installs it)");
    assert!(
        out.status.success(),
        "etcdctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// What go-micro's `GetService(name)` returns from the etcd registry, through
/// `tests/gomicro/etcd_registry.go` reading etcdctl's dump of the service's keys.
fn go_micro_get_service(etcd: &pillion_testkit::Server, name: &str) -> Value {
    let dump = etcdctl(
        etcd,
        &[
            "get",
            "--prefix",
            &format!("/micro/registry/{name}/"),
            "-w",
            "json",
        ],
    );
    let file = tempfile_path(&format!("etcd-dump-{name}"));
    std::fs::write(&file, dump).unwrap();
    let out = common::go_run(
        ETCD_REGISTRY,
        &["get", "-name", name, "-from", file.to_str().unwrap()],
    );
    serde_json::from_str(&out).unwrap()
}

fn tempfile_path(name: &str) -> std::path::PathBuf {
    common::go_dir().join(format!("{name}-{}", std::process::id()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_micro_services_and_pillion_apps_share_go_micro_s_etcd_registry() {
    let etcd = pillion_testkit::Server::etcd();
    let (_server, go_node) = go_jsonrpc_server();
    let app = TestApp::start("app").await;
    let sc = Sidecar::start(&[
        "--registry",
        &format!("{}?layout=go-micro", etcd.url()),
        "--server-name",
        "go.micro.srv.app",
        "--server-address",
        &app.addr().to_string(),
    ]);

    // A go-micro service registers as go-micro's etcd registry does: its node's key
    // and value (encoded by go-micro's code), under a lease of its own.
    let encoded = common::go_run(
        ETCD_REGISTRY,
        &[
            "encode",
            "-name",
            "go.micro.srv.greeter",
            "-id",
            "go.micro.srv.greeter-4f1c",
            "-address",
            &go_node.to_string(),
            "-meta",
            "protocol=mucp,server=mucp,transport=http,broker=http,registry=etcd",
        ],
    );
    let (key, value) = encoded.split_once('\n').unwrap();
    assert_eq!(
        key,
        "/micro/registry/go.micro.srv.greeter/go.micro.srv.greeter-4f1c"
    );
    let lease = etcdctl(&etcd, &["lease", "grant", "30"]);
    let lease = lease.split_whitespace().nth(1).unwrap().to_string();
    etcdctl(&etcd, &["put", &format!("--lease={lease}"), key, value]);
    // A key another program left under the prefix that is no registration.
    etcdctl(&etcd, &["put", "/micro/registry/broken/x", "not json"]);

    assert!(
        common::eventually(Duration::from_secs(10), || async {
            common::node_ids(&sc, "go.micro.srv.greeter").await == ["go.micro.srv.greeter-4f1c"]
        })
        .await,
        "the go-micro service never appeared in GET /registry"
    );
    let listed = pillion_testkit::http::get(&sc.url("/registry?service=go.micro.srv.greeter"))
        .await
        .unwrap();
    let node = &listed.json()[0]["nodes"][0];
    assert_eq!(node["address"], go_node.to_string(), "{}", listed.text());
    assert_eq!(node["metadata"]["protocol"], "mucp");
    assert_eq!(listed.json()[0]["endpoints"][0]["name"], "Say.Hello");
    assert!(common::node_ids(&sc, "broken").await.is_empty());

    // Called by name, with go-micro's RPC.
    says_hello(&sc, "go.micro.srv.greeter").await;

    // The sidecar's app, and a registration through the API, as go-micro reads them.
    assert!(
        common::eventually(Duration::from_secs(5), || async {
            !common::node_ids(&sc, "go.micro.srv.app").await.is_empty()
        })
        .await,
        "the app was never registered"
    );
    let services = go_micro_get_service(&etcd, "go.micro.srv.app");
    assert_eq!(services.as_array().unwrap().len(), 1, "{services}");
    let nodes = &services[0]["nodes"];
    assert_eq!(nodes.as_array().unwrap().len(), 1, "{services}");
    assert_eq!(nodes[0]["address"], app.addr().to_string(), "{services}");
    assert_eq!(services[0]["name"], "go.micro.srv.app");
    // A node registered with its port apart reaches go-micro with it in address.
    let body = json!({"name": "py.orders", "version": "2",
        "nodes": [{"id": "orders-1", "address": "127.0.0.1", "port": 7001}]});
    let reply = post_json(&sc.url("/registry"), &body.to_string())
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    let services = go_micro_get_service(&etcd, "py.orders");
    assert_eq!(
        (&services[0]["version"], &services[0]["nodes"][0]["address"]),
        (&json!("2"), &json!("127.0.0.1:7001")),
        "{services}"
    );
    // Deregistered through the API: go-micro no longer finds it.
    let gone = pillion_testkit::http::request(
        http::Method::DELETE,
        &sc.url("/registry"),
        &[("content-type", "application/json")],
        r#"{"name":"py.orders","version":"2"}"#,
    )
    .await
    .unwrap();
    assert_eq!(gone.status, 200, "{}", gone.text());
    assert_eq!(go_micro_get_service(&etcd, "py.orders"), json!([]));
    // Nothing went to pillion's own layout.
    assert_eq!(
        etcdctl(&etcd, &["get", "--prefix", "/pillion/", "--keys-only"]).trim(),
        ""
    );

    // The go-micro service stops (its lease is revoked): gone from the sidecar, and a
    // call by name says so.
    etcdctl(&etcd, &["lease", "revoke", &lease]);
    assert!(
        common::eventually(Duration::from_secs(10), || async {
            common::node_ids(&sc, "go.micro.srv.greeter")
                .await
                .is_empty()
        })
        .await,
        "the stopped go-micro service stayed in the registry"
    );
    rpc(
        &sc,
        "go.micro.srv.greeter",
        "Say.Hello",
        json!({"name": "J"}),
    )
    .await
    .assert_refused(404, "go.micro.srv.greeter", "a call to a service that left");

    // The sidecar stops: go-micro no longer finds its app.
    drop(sc);
    assert!(
        common::eventually(Duration::from_secs(10), || async {
            go_micro_get_service(&etcd, "go.micro.srv.app")
                .as_array()
                .unwrap()
                .is_empty()
        })
        .await,
        "the stopped sidecar's app stayed in go-micro's registry"
    );
}
