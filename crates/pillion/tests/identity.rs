//! Identity an app can trust: `X-Pillion-Caller` and `X-Pillion-Subject` reach an app
//! only as pillion set them. A client's copies are removed on every way in: calls by
//! name (rpc and proxy handlers, `/rpc`), `--listen` with and without JWT, and
//! messages published to the broker.

mod common;

use std::time::Duration;

use common::{inbound, register, Sidecar};
use futures_util::StreamExt;
use pillion_testkit::http::request;
use pillion_testkit::TestApp;

/// A client's claims to be someone, in mixed case and twice over.
const FORGED: [(&str, &str); 4] = [
    ("X-Pillion-Subject", "root"),
    ("x-pillion-subject", "admin"),
    ("X-Pillion-Caller", "billing"),
    ("content-type", "application/json"),
];

/// Asserts that the test app's echo shows no identity header.
fn assert_no_identity(what: &str, status: u16, seen: &serde_json::Value) {
    assert_eq!(status, 200, "{what}: {seen}");
    for header in ["x-pillion-subject", "x-pillion-caller"] {
        assert!(
            seen["headers"][header].is_null(),
            "{what}: the app got the client's {header}: {seen}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_identity_headers_never_reach_the_app_on_calls_by_name() {
    let app = TestApp::start("orders").await;
    for handler in ["rpc", "proxy"] {
        let sc = Sidecar::start(&["--handler", handler]);
        register(&sc, "orders", "orders-1", &app.addr().to_string(), &[]).await;
        let reply = request(
            http::Method::POST,
            &sc.url("/orders/list"),
            &FORGED,
            "{}".to_string(),
        )
        .await
        .unwrap();
        assert_no_identity(handler, reply.status.as_u16(), &reply.json());
        if handler == "rpc" {
            let body = r#"{"service":"orders","method":"Orders.List","request":{}}"#;
            let reply = request(
                http::Method::POST,
                &sc.url("/rpc"),
                &FORGED,
                body.to_string(),
            )
            .await
            .unwrap();
            assert_no_identity("/rpc", reply.status.as_u16(), &reply.json());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_identity_headers_never_reach_the_app_behind_listen_without_jwt() {
    let app = TestApp::start("app").await;
    let (_sc, addr) = inbound(&app.url(), &[]);
    let reply = request(
        http::Method::GET,
        &format!("http://{addr}/orders"),
        &FORGED,
        String::new(),
    )
    .await
    .unwrap();
    assert_no_identity("--listen", reply.status.as_u16(), &reply.json());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publishers_identity_headers_are_not_passed_on_with_its_message() {
    let sc = Sidecar::start(&[]);
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/broker?topic=orders.new", sc.addr))
            .await
            .expect("websocket subscribe");
    // The embedded broker learns of the subscriber within milliseconds.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut headers = FORGED.to_vec();
    headers.push(("x-tenant", "acme"));
    let reply = request(
        http::Method::POST,
        &sc.url("/broker?topic=orders.new"),
        &headers,
        "order 1".to_string(),
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    let frame = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("a message within 5 s")
        .unwrap()
        .unwrap();
    let message: serde_json::Value = serde_json::from_str(frame.to_text().unwrap()).unwrap();
    let names: Vec<String> = message["Header"]
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.to_ascii_lowercase())
        .collect();
    assert!(names.contains(&"x-tenant".to_string()), "{message}");
    assert!(
        !names.iter().any(|n| n.starts_with("x-pillion-")),
        "{message}"
    );
}
