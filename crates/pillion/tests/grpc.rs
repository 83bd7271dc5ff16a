//! gRPC under every handler, with a real gRPC client and server (grpcio,
//! `tests/grpc/peer.py`): a call keeps its path under the default rpc handler (the
//! micro path mapping never applies to it), and every error pillion itself gives a
//! gRPC caller is a trailers-only gRPC answer whose status and message name the
//! cause: no such service, no node, a node that speaks only HTTP/1.1, a timeout, a
//! missing API token, a mesh refusal.
//!
//! Needs Python's grpcio (`scripts/test` installs it).

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::Sidecar;
use pillion_testkit::process::{free_port, wait_for_port, Daemon};
use pillion_testkit::TestApp;
use serde_json::{json, Value};

const PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/grpc/peer.py");

fn grpcio_present() {
    let probe = Command::new("python3").args(["-c", "import grpc"]).output();
    assert!(
        probe.as_ref().is_ok_and(|o| o.status.success()),
        "python3 with grpcio is needed ({probe:?}): `python3 -m pip install grpcio` \
         (scripts/test does it)"
    );
}

/// A grpcio server answering every method, on a free port.
fn grpc_server() -> (Daemon, SocketAddr) {
    grpcio_present();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut cmd = Command::new("python3");
    cmd.args([PEER, "server", &addr.port().to_string()]);
    let server = Daemon::spawn("grpc server", cmd);
    assert!(
        wait_for_port(addr, Duration::from_secs(20)),
        "the grpcio server did not listen on {addr}"
    );
    (server, addr)
}

/// One unary call by grpcio's client through `addr`: `{"ok": answer}` or
/// `{"code": "NOT_FOUND", "details": "..."}`.
async fn grpc_call(addr: SocketAddr, path: &str, metadata: &[&str]) -> Value {
    grpcio_present();
    let mut cmd = Command::new("python3");
    cmd.args([PEER, "call", &addr.to_string(), path])
        .args(metadata);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .expect("running python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "the grpcio client printed no answer ({e}): {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn assert_grpc_error(got: &Value, code: &str, details: &str) {
    assert_eq!(got["code"], code, "{got}");
    assert!(
        got["details"].as_str().unwrap_or("").contains(details),
        "the message should say {details:?}: {got}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_keeps_its_path_under_the_rpc_handler_and_pillion_s_errors_are_grpc_statuses() {
    let (_server, node) = grpc_server();
    // The default handler (rpc) and micro's namespace: neither touches a gRPC path.
    let sc = Sidecar::start(&["--timeout", "1s"]);
    common::register(&sc, "helloworld.Greeter", "g1", &node.to_string(), &[]).await;
    common::register(&sc, "slow.Svc", "s1", &node.to_string(), &[]).await;

    let got = grpc_call(sc.addr, "/helloworld.Greeter/SayHello", &[]).await;
    assert_eq!(got, json!({"ok": "path=/helloworld.Greeter/SayHello;ping"}));

    // No such service.
    let got = grpc_call(sc.addr, "/nothing.Here/Call", &[]).await;
    assert_grpc_error(
        &got,
        "NOT_FOUND",
        "service \"nothing.Here\" not found in the registry",
    );

    // A node that is down.
    let closed = format!("127.0.0.1:{}", free_port());
    common::register(&sc, "down.Svc", "d1", &closed, &[]).await;
    let got = grpc_call(sc.addr, "/down.Svc/Call", &[]).await;
    assert_grpc_error(
        &got,
        "UNAVAILABLE",
        "no healthy node of service \"down.Svc\"",
    );

    // A node that speaks only HTTP/1.1.
    let web = TestApp::start("web").await;
    common::register(
        &sc,
        "web.Svc",
        "w1",
        &web.addr().to_string(),
        &[("protocol", "http1")],
    )
    .await;
    let got = grpc_call(sc.addr, "/web.Svc/Call", &[]).await;
    assert_grpc_error(&got, "UNAVAILABLE", "gRPC needs HTTP/2");
    assert_eq!(web.requests(), 0);

    // A node of go-micro RPC cannot take gRPC either.
    common::register(
        &sc,
        "rpc.Svc",
        "r1",
        &web.addr().to_string(),
        &[("protocol", "mucp")],
    )
    .await;
    let got = grpc_call(sc.addr, "/rpc.Svc/Call", &[]).await;
    assert_grpc_error(&got, "UNAVAILABLE", "go-micro RPC node");

    // The sidecar's deadline.
    let got = grpc_call(sc.addr, "/slow.Svc/Wait", &[]).await;
    assert_grpc_error(&got, "DEADLINE_EXCEEDED", "did not answer within 1s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_caller_without_the_api_token_is_unauthenticated() {
    let (_server, node) = grpc_server();
    let sc = Sidecar::start(&["--api-token", "s3cret-token-0123456789"]);
    let auth = "pillion-api-token=s3cret-token-0123456789";
    let body =
        json!({"name": "helloworld.Greeter", "nodes": [{"id": "g1", "address": node.to_string()}]});
    let reply = pillion_testkit::http::request(
        http::Method::POST,
        &sc.url("/registry"),
        &[
            ("content-type", "application/json"),
            ("authorization", "Bearer s3cret-token-0123456789"),
        ],
        body.to_string(),
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());

    let got = grpc_call(sc.addr, "/helloworld.Greeter/SayHello", &[]).await;
    assert_grpc_error(&got, "UNAUTHENTICATED", "missing or wrong API token");
    let got = grpc_call(sc.addr, "/helloworld.Greeter/SayHello", &[auth]).await;
    assert_eq!(got, json!({"ok": "path=/helloworld.Greeter/SayHello;ping"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_refusal_reaches_a_grpc_caller_as_permission_denied() {
    let (_server, node) = grpc_server();
    let ca = common::mesh_ca("grpc-refused");
    let orders = common::mesh_receiver(&ca, "orders", node, &["--mesh-allow", "front"]);
    let allowed = common::mesh_caller(&orders, Some((&ca, "front")), "orders").await;
    let other = common::mesh_caller(&orders, Some((&ca, "reports")), "orders").await;

    let got = grpc_call(allowed.addr, "/orders/Call", &[]).await;
    assert_eq!(got, json!({"ok": "path=/orders/Call;ping"}));
    let got = grpc_call(other.addr, "/orders/Call", &[]).await;
    assert_grpc_error(
        &got,
        "PERMISSION_DENIED",
        "\"reports\" may not call \"orders\"",
    );
}
