//! The micro sidecar README's registry examples, run against pillion unchanged except
//! for the port, and the mistakes a user can make with them.

mod common;

use common::{eventually, node_ids, Sidecar};
use pillion_testkit::http::{delete_json, get, post_json, request};
use std::time::{Duration, Instant};

const README_SERVICE: &str = r#"{
    "Name": "foo.bar",
    "Nodes": [{
        "Port": 9091,
        "Address": "127.0.0.1",
        "Id": "foo.bar-017da09a-734f-11e5-8136-68a86d0d36b6"
    }]
}"#;

#[tokio::test]
async fn keys_given_twice_and_names_that_are_not_utf8_are_a_400_and_change_nothing() {
    let sc = Sidecar::start(&[]);
    let node = r#""nodes":[{"id":"d1","address":"127.0.0.1:9"}]"#;
    let cases = [
        (
            format!(r#"{{"name":"a","name":"b",{node}}}"#),
            r#"key "name" is given twice; each key may appear once"#,
        ),
        (
            format!(r#"{{"Name":"a","name":"b",{node}}}"#),
            r#"key "name" is given twice; each key may appear once (keys are case-insensitive)"#,
        ),
        (
            r#"{"name":"a","nodes":[{"id":"d1","address":"127.0.0.1:9","metadata":{"zone":"x","zone":"y"}}]}"#.to_string(),
            r#"key "zone" is given twice in nodes[0].metadata"#,
        ),
    ];
    for (body, want) in &cases {
        for reply in [
            post_json(&sc.url("/registry"), body).await.unwrap(),
            delete_json(&sc.url("/registry"), body).await.unwrap(),
        ] {
            reply.assert_refused(400, want, body);
        }
    }
    assert!(node_ids(&sc, "a").await.is_empty());
    assert!(node_ids(&sc, "b").await.is_empty());

    let reply = get(&sc.url("/registry?service=%ff")).await.unwrap();
    assert_eq!(reply.status, 400, "{}", reply.text());
    assert!(
        reply
            .text()
            .contains(r#"\"%ff\" is not UTF-8 once percent-decoded"#),
        "{}",
        reply.text()
    );
}

#[tokio::test]
async fn micro_readme_register_get_and_deregister_work_unchanged() {
    let sc = Sidecar::start(&[]);

    let reply = post_json(&sc.url("/registry"), README_SERVICE)
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());

    let reply = get(&sc.url("/registry?service=foo.bar")).await.unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.json(),
        serde_json::json!([{"name":"foo.bar","nodes":[{
            "id":"foo.bar-017da09a-734f-11e5-8136-68a86d0d36b6","address":"127.0.0.1","port":9091
        }]}]),
        "keys come back in lower case"
    );

    let all = get(&sc.url("/registry")).await.unwrap().json();
    assert_eq!(all.as_array().unwrap().len(), 1);
    assert_eq!(all[0]["name"], "foo.bar");

    let reply = delete_json(&sc.url("/registry"), README_SERVICE)
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    let reply = get(&sc.url("/registry?service=foo.bar")).await.unwrap();
    assert_eq!(reply.status, 404);
    let err = reply.json();
    assert_eq!(err["code"], 404);
    assert_eq!(err["status"], "Not Found");
    assert!(err["detail"].as_str().unwrap().contains("foo.bar"), "{err}");
    assert_eq!(
        get(&sc.url("/registry")).await.unwrap().json(),
        serde_json::json!([])
    );
}

#[tokio::test]
async fn ttl_registrations_expire() {
    let sc = Sidecar::start(&[]);
    let body = r#"{"name":"brief","nodes":[{"id":"brief-1","address":"127.0.0.1:1"}]}"#;
    let start = Instant::now();
    let reply = post_json(&sc.url("/registry?ttl=1s"), body).await.unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(node_ids(&sc, "brief").await, ["brief-1"]);
    assert!(
        eventually(Duration::from_secs(5), || async {
            node_ids(&sc, "brief").await.is_empty()
        })
        .await
    );
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "expired before its TTL"
    );
}

#[tokio::test]
async fn the_same_node_id_registered_twice_is_one_node_with_the_latest_address() {
    let sc = Sidecar::start(&[]);
    for port in [1, 2] {
        let body =
            format!(r#"{{"name":"dup","nodes":[{{"id":"dup-1","address":"127.0.0.1:{port}"}}]}}"#);
        assert_eq!(
            post_json(&sc.url("/registry"), &body).await.unwrap().status,
            200
        );
    }
    let svc = get(&sc.url("/registry?service=dup")).await.unwrap().json();
    let nodes = svc[0]["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0]["address"], "127.0.0.1:2");
}

#[tokio::test]
async fn mistakes_get_a_400_413_or_404_that_says_what_is_wrong_and_change_nothing() {
    let sc = Sidecar::start(&[]);
    let url = sc.url("/registry");
    let cases: &[(&str, &str, u16, &str)] = &[
        ("", r#"{"name": "x", "nodes": [}"#, 400, "malformed JSON"),
        ("", r#"["not an object"]"#, 400, "expected a JSON object"),
        (
            "",
            r#"{"name":"x","nodes":[{"id":"1","address":"127.0.0.1"}]}"#,
            400,
            "has no port",
        ),
        (
            "",
            r#"{"name":"x","nodes":[{"id":"1","address":"h:1"},{"id":"1","address":"h:2"}]}"#,
            400,
            "appears twice",
        ),
        (
            "",
            r#"{"name":"x","nodes":[{"id":"1","adress":"h:1"}]}"#,
            400,
            "unknown field `adress`",
        ),
        ("", r#"{"name":"x","nodes":[]}"#, 400, "at least one node"),
        (
            "?ttl=10",
            r#"{"name":"x","nodes":[{"id":"1","address":"h:1"}]}"#,
            400,
            "ttl: invalid duration",
        ),
        (
            "?ttl=0s",
            r#"{"name":"x","nodes":[{"id":"1","address":"h:1"}]}"#,
            400,
            "must be between 1s and 24h",
        ),
    ];
    for (query, body, status, detail) in cases {
        let reply = post_json(&format!("{url}{query}"), body).await.unwrap();
        assert_eq!(reply.status, *status, "{body}: {}", reply.text());
        let err = reply.json();
        assert_eq!(err["id"], "pillion.registry");
        assert!(
            err["detail"].as_str().unwrap().contains(detail),
            "{body}: {err}"
        );
    }
    let huge = format!(
        r#"{{"name":"x","metadata":{{"pad":"{}"}}}}"#,
        "a".repeat(2 << 20)
    );
    let reply = post_json(&url, &huge).await.unwrap();
    assert_eq!(reply.status, 413, "{}", reply.text());
    assert!(reply.json()["detail"]
        .as_str()
        .unwrap()
        .contains("larger than"));
    assert_eq!(
        get(&url).await.unwrap().json(),
        serde_json::json!([]),
        "nothing was registered"
    );

    let reply = delete_json(
        &url,
        r#"{"name":"ghost","nodes":[{"id":"g","address":"h:1"}]}"#,
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 404);

    let reply = request(http::Method::POST, &sc.url("/nowhere"), &[], "")
        .await
        .unwrap();
    assert_eq!(
        reply.status, 404,
        "an unknown path is a call to an unknown service"
    );
    assert_eq!(reply.json()["id"], "pillion.invoke");
}

#[tokio::test]
async fn names_ids_ttls_and_protocols_outside_the_rules_get_a_400_that_states_the_rule() {
    let sc = Sidecar::start(&[]);
    let url = sc.url("/registry");
    let node = |id: &str, meta: &str| {
        format!(
            r#"{{"name":"svc","nodes":[{{"id":"{id}","address":"127.0.0.1:1","metadata":{{{meta}}}}}]}}"#
        )
    };
    let huge_name = format!(
        r#"{{"name":"{}","nodes":[{{"id":"1","address":"127.0.0.1:1"}}]}}"#,
        "n".repeat(100_000)
    );
    let rule = "must be 1 to 256 printable ASCII characters without spaces or '/'";
    let cases: Vec<(&str, String, String)> = vec![
        ("", huge_name, format!("is 100000 bytes long: it {rule}")),
        ("", node(&"i".repeat(257), ""), "257 bytes long".into()),
        ("", node("has space", ""), format!("contains ' ': it {rule}")),
        ("", node("tab\\t", ""), rule.into()),
        ("?ttl=1ns", node("1", ""), "ttl 1ns is out of range: it must be between 1s and 24h".into()),
        ("?ttl=999ms", node("1", ""), "between 1s and 24h".into()),
        ("?ttl=25h", node("1", ""), "ttl 25h is out of range".into()),
        (
            "",
            node("1", r#""protocol":"http3""#),
            "unknown protocol \"http3\" in nodes[0].metadata: use http1, h2c, jsonrpc, http, grpc or mucp".into(),
        ),
        (
            "",
            r#"{"name":"svc","metadata":{"protocol":"thrift"},"nodes":[{"id":"1","address":"127.0.0.1:1"}]}"#.into(),
            "unknown protocol \"thrift\" in metadata: use http1, h2c, jsonrpc, http, grpc or mucp".into(),
        ),
    ];
    for (query, body, want) in &cases {
        let reply = post_json(&format!("{url}{query}"), body).await.unwrap();
        let shown: String = body.chars().take(80).collect();
        assert_eq!(reply.status, 400, "{query} {shown}: {}", reply.text());
        let err = reply.json();
        assert_eq!(err["id"], "pillion.registry");
        assert_eq!(err["code"], 400);
        assert_eq!(err["status"], "Bad Request");
        let detail = err["detail"].as_str().unwrap();
        assert!(detail.contains(want.as_str()), "{query} {shown}: {detail}");
        assert!(
            detail.len() < 300,
            "the input is echoed back whole: {detail}"
        );
    }
    assert_eq!(
        get(&url).await.unwrap().json(),
        serde_json::json!([]),
        "nothing was registered"
    );

    // The edges of each rule are accepted.
    let longest = "a".repeat(256);
    let ok = [
        ("?ttl=1s", node("edge-1", r#""protocol":"H2C""#)),
        ("?ttl=24h", node("edge-2", r#""protocol":"http1""#)),
        ("", node(&longest, "")),
        ("", node("~!#$%&*+-.:;<=>?@[]^_{|}", "")),
        // go-micro's values: v1's RPC and gRPC servers, and its HTTP server.
        ("", node("go-mucp", r#""protocol":"mucp""#)),
        ("", node("go-grpc", r#""protocol":"grpc""#)),
        ("", node("go-http", r#""protocol":"http""#)),
    ];
    for (query, body) in &ok {
        let reply = post_json(&format!("{url}{query}"), body).await.unwrap();
        assert_eq!(reply.status, 200, "{query} {body}: {}", reply.text());
    }
    let mut ids = node_ids(&sc, "svc").await;
    ids.sort();
    assert_eq!(ids.len(), 7, "{ids:?}");
    assert!(ids.contains(&longest));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_health_checks_every_node_and_names_the_failing_ones() {
    use pillion_testkit::{Health, TestApp};
    let sc = Sidecar::start(&[]);
    let app = TestApp::start("pay").await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_addr = closed.local_addr().unwrap().to_string();
    drop(closed); // nothing listens there any more

    // One node checked by its health path, one by a TCP connect.
    common::register(
        &sc,
        "pay",
        "pay-http",
        &app.addr().to_string(),
        &[("health", "/health")],
    )
    .await;
    common::register(&sc, "pay", "pay-tcp", &app.addr().to_string(), &[]).await;
    let reply = get(&sc.url("/health/pay")).await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        reply.json(),
        serde_json::json!({"service":"pay","nodes":[
            {"id":"pay-http","address":app.addr().to_string(),"healthy":true},
            {"id":"pay-tcp","address":app.addr().to_string(),"healthy":true},
        ]})
    );
    assert!(app.health_checks() >= 1, "the health path was fetched");

    // A node on a closed port, and the app's health path failing.
    common::register(&sc, "pay", "pay-gone", &closed_addr, &[]).await;
    app.set_health(Health::Failing);
    let reply = get(&sc.url("/health/pay")).await.unwrap();
    assert_eq!(reply.status, 503, "{}", reply.text());
    let body = reply.json();
    assert_eq!(
        body["unhealthy"],
        serde_json::json!(["pay-gone", "pay-http"])
    );
    let node = |id: &str| {
        body["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["id"] == id)
            .cloned()
            .unwrap()
    };
    assert_eq!(node("pay-tcp")["healthy"], true);
    assert_eq!(node("pay-gone")["healthy"], false);
    let why = node("pay-gone")["error"].as_str().unwrap().to_string();
    assert!(
        why.contains(&closed_addr) && why.contains("refused"),
        "{why}"
    );
    let why = node("pay-http")["error"].as_str().unwrap().to_string();
    assert!(why.contains("/health") && why.contains("500"), "{why}");
    assert!(
        body["detail"].as_str().unwrap().contains("2 of 3"),
        "{body}"
    );

    // A health path that never answers is a failure after the deadline, not a hang.
    app.set_health(Health::Hanging);
    let start = Instant::now();
    let reply = get(&sc.url("/health/pay")).await.unwrap();
    assert_eq!(reply.status, 503);
    let body = reply.json();
    let http = body["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == "pay-http")
        .cloned()
        .unwrap();
    assert!(
        http["error"]
            .as_str()
            .unwrap()
            .contains("no answer within 2s"),
        "{body}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "the checks have a deadline"
    );

    // An unknown service: 404 in the API's error shape.
    let reply = get(&sc.url("/health/nobody")).await.unwrap();
    assert_eq!(reply.status, 404);
    let err = reply.json();
    assert_eq!(err["code"], 404);
    assert_eq!(err["status"], "Not Found");
    assert!(err["detail"].as_str().unwrap().contains("nobody"), "{err}");
    assert!(err["id"].is_string(), "{err}");
    let reply = get(&sc.url("/health/")).await.unwrap();
    assert_eq!(reply.status, 400, "{}", reply.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_answer_larger_than_pillion_reads_is_a_failure() {
    let sc = Sidecar::start(&[]);
    let huge = vec![b'x'; pillion_http::client::MAX_ANSWER + 1];
    let node = common::Document::serve(&[], huge).await;
    common::register(
        &sc,
        "pay",
        "pay-huge",
        &node.addr.to_string(),
        &[("health", "/health")],
    )
    .await;
    let reply = get(&sc.url("/health/pay")).await.unwrap();
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert_eq!(reply.json()["unhealthy"], serde_json::json!(["pay-huge"]));
    assert!(reply.text().contains("larger than"), "{}", reply.text());
}
