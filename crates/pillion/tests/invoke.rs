//! Calling services by name through the sidecar, with real nodes on loopback: the
//! micro README examples, node failures, timeouts, limits and the proxy handler.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::{eventually, register, Sidecar};
use pillion_testkit::http::{get, post_form, post_json, request};
use pillion_testkit::{free_port, Mode, TestApp};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn micro_readme_service_call_and_rpc_examples_work() {
    let app = TestApp::start("example").await;
    let sc = Sidecar::start(&["--namespace", "go.micro.srv"]);
    register(
        &sc,
        "go.micro.srv.example",
        "example-1",
        &app.addr().to_string(),
        &[],
    )
    .await;

    // curl -H 'Content-Type: application/json' -d '{"name": "John"}' http://127.0.0.1:8081/example/call
    let reply = request(
        http::Method::POST,
        &sc.url("/example/call"),
        &[
            ("content-type", "application/json"),
            ("x-request-id", "r-1"),
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "1"),
        ],
        r#"{"name": "John"}"#,
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = reply.json();
    assert_eq!(seen["method"], "POST");
    assert_eq!(seen["path"], "/Example.Call");
    assert_eq!(seen["body"], r#"{"name": "John"}"#);
    assert_eq!(seen["headers"]["content-type"], "application/json");
    assert_eq!(
        seen["headers"]["x-request-id"], "r-1",
        "caller headers travel"
    );
    assert!(
        seen["headers"].get("x-hop").is_none(),
        "hop-by-hop headers do not: {seen}"
    );
    assert_eq!(seen["headers"]["x-pillion-service"], "go.micro.srv.example");
    assert_eq!(seen["headers"]["x-pillion-method"], "Example.Call");

    // curl -d 'service=go.micro.srv.example' -d 'method=Example.Call' -d 'request={"name": "John"}' http://127.0.0.1:8081/rpc
    let form =
        "service=go.micro.srv.example&method=Example.Call&request=%7B%22name%22%3A+%22John%22%7D";
    let reply = post_form(&sc.url("/rpc"), form).await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = reply.json();
    assert_eq!(seen["path"], "/Example.Call");
    assert_eq!(seen["body"], r#"{"name": "John"}"#);
    assert_eq!(seen["headers"]["content-type"], "application/json");

    // JSON /rpc, with a request object and a pinned address.
    let body = format!(
        r#"{{"Service":"go.micro.srv.example","Method":"Example.Call","Request":{{"name":"Ann"}},"Address":"{}"}}"#,
        app.addr()
    );
    let reply = post_json(&sc.url("/rpc"), &body).await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["body"], r#"{"name":"Ann"}"#);

    let cases = [
        (
            r#"{"method":"Example.Call"}"#,
            400,
            "service and method (or endpoint) are required",
        ),
        (
            r#"{"service":"go.micro.srv.example""#,
            400,
            "malformed JSON",
        ),
        (
            r#"{"service":"go.micro.srv.example","method":"M","address":"10.9.9.9:1"}"#,
            404,
            "has no node",
        ),
        (
            r#"{"service":"nobody","method":"M"}"#,
            404,
            "not found in the registry",
        ),
    ];
    for (body, status, detail) in cases {
        let reply = post_json(&sc.url("/rpc"), body).await.unwrap();
        assert_eq!(reply.status, status, "{body}: {}", reply.text());
        assert!(
            reply.json()["detail"].as_str().unwrap().contains(detail),
            "{body}: {}",
            reply.text()
        );
    }
}

/// go-micro v1 names the method `endpoint`, and micro v1.0's `/rpc` read either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_takes_go_micro_s_endpoint_for_the_method_in_json_and_forms() {
    let app = TestApp::start("example").await;
    let sc = Sidecar::start(&[]);
    register(&sc, "example", "example-1", &app.addr().to_string(), &[]).await;

    let json = [
        r#"{"service":"example","endpoint":"Example.Call","request":{"name":"Ann"}}"#,
        r#"{"Service":"example","Endpoint":"Example.Call","Method":"Example.Call","Request":{"name":"Ann"}}"#,
    ];
    for body in json {
        let reply = post_json(&sc.url("/rpc"), body).await.unwrap();
        assert_eq!(reply.status, 200, "{body}: {}", reply.text());
        let seen = reply.json();
        assert_eq!(seen["path"], "/Example.Call", "{body}");
        assert_eq!(seen["headers"]["x-pillion-method"], "Example.Call");
        assert_eq!(seen["body"], r#"{"name":"Ann"}"#);
    }
    let form = "service=example&endpoint=Example.Call&request=%7B%22name%22%3A%22Ann%22%7D";
    let reply = post_form(&sc.url("/rpc"), form).await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["path"], "/Example.Call");

    let differ = r#"method "Example.Call" and endpoint "Example.Other" differ: endpoint is another name for method; give one of them"#;
    let body = r#"{"service":"example","method":"Example.Call","endpoint":"Example.Other"}"#;
    post_json(&sc.url("/rpc"), body)
        .await
        .unwrap()
        .assert_refused(400, differ, body);
    let form = "service=example&method=Example.Call&endpoint=Example.Other";
    post_form(&sc.url("/rpc"), form)
        .await
        .unwrap()
        .assert_refused(400, differ, form);
    let body = r#"{"service":"example"}"#;
    post_json(&sc.url("/rpc"), body)
        .await
        .unwrap()
        .assert_refused(400, "service and method (or endpoint) are required", body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_keys_given_twice_and_names_that_are_not_utf8_are_a_400() {
    let sc = Sidecar::start(&[]);
    let json = [
        (
            r#"{"service":"a","service":"b","method":"M"}"#,
            r#"key "service" is given twice"#,
        ),
        (
            r#"{"Service":"a","service":"b","method":"M"}"#,
            r#"key "service" is given twice; each key may appear once (keys are case-insensitive)"#,
        ),
        (
            r#"{"service":"a","method":"M","request":{"id":1,"id":2}}"#,
            r#"key "id" is given twice in request"#,
        ),
    ];
    for (body, want) in json {
        let reply = post_json(&sc.url("/rpc"), body).await.unwrap();
        reply.assert_refused(400, want, body);
    }
    let forms = [
        (
            "service=%ff&method=M",
            r#""%ff" is not UTF-8 once percent-decoded"#,
        ),
        (
            "service=a&Service=b&method=M",
            r#"key "service" is given twice"#,
        ),
    ];
    for (form, want) in forms {
        let reply = post_form(&sc.url("/rpc"), form).await.unwrap();
        reply.assert_refused(400, want, form);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_service_is_404_and_no_reachable_node_is_503_in_the_error_shape() {
    let sc = Sidecar::start(&[]);
    let reply = post_json(&sc.url("/ghost/call"), "{}").await.unwrap();
    assert_eq!(reply.status, 404);
    let err = reply.json();
    assert_eq!(err["id"], "pillion.invoke");
    assert_eq!(err["code"], 404);
    assert_eq!(err["status"], "Not Found");
    assert!(
        err["detail"].as_str().unwrap().contains("\"ghost\""),
        "{err}"
    );

    let dead = format!("127.0.0.1:{}", free_port());
    register(&sc, "dead", "dead-1", &dead, &[]).await;
    let reply = post_json(&sc.url("/dead/call"), "{}").await.unwrap();
    assert_eq!(reply.status, 503, "{}", reply.text());
    let detail = reply.json()["detail"].as_str().unwrap().to_string();
    assert!(
        detail.contains("no healthy node") && detail.contains(&dead),
        "{detail}"
    );

    let reply = request(http::Method::GET, &sc.url("/dead/call"), &[], "")
        .await
        .unwrap();
    assert_eq!(reply.status, 405, "the rpc handler takes POST");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_during_a_stream_of_gets_costs_the_caller_nothing() {
    let a = TestApp::start("a").await;
    let b = TestApp::start("b").await;
    // Round-robin, so the node about to die certainly has traffic when it does.
    let sc = Sidecar::start(&["--handler", "proxy", "--balancer", "round-robin"]);
    register(&sc, "catalog", "a", &a.addr().to_string(), &[]).await;
    register(&sc, "catalog", "b", &b.addr().to_string(), &[]).await;

    let mut failures = Vec::new();
    let mut apps = std::collections::BTreeMap::new();
    for i in 0..300 {
        if i == 100 {
            a.kill();
        }
        match get(&sc.url(&format!("/catalog/items/{i}"))).await {
            Ok(r) if r.status == 200 => {
                *apps
                    .entry(r.json()["app"].as_str().unwrap().to_string())
                    .or_insert(0) += 1
            }
            Ok(r) => failures.push(format!("{i}: {} {}", r.status, r.text())),
            Err(e) => failures.push(format!("{i}: {e}")),
        }
    }
    assert!(failures.is_empty(), "the caller saw failures: {failures:?}");
    assert!(
        apps.get("a").copied().unwrap_or(0) > 0,
        "a served before it died: {apps:?}"
    );
    assert!(apps["b"] >= 200, "b took over: {apps:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_answering_503_is_ejected_and_traffic_moves() {
    let bad = TestApp::start("bad").await;
    let good = TestApp::start("good").await;
    bad.set_mode(Mode::Status(503));
    // Round-robin keeps sending to the bad node until it is ejected; peak-EWMA would
    // mostly avoid it already (tested below).
    let sc = Sidecar::start(&["--handler", "proxy", "--balancer", "round-robin"]);
    register(&sc, "orders", "bad", &bad.addr().to_string(), &[]).await;
    register(&sc, "orders", "good", &good.addr().to_string(), &[]).await;

    for i in 0..40 {
        let r = get(&sc.url(&format!("/orders/{i}"))).await.unwrap();
        assert_eq!(
            r.status,
            200,
            "GET {i} was retried away from the 503 node: {}",
            r.text()
        );
    }
    let status = get(&sc.url("/statusz")).await.unwrap().json();
    let nodes = status["invoke"]["services"][0]["nodes"]
        .as_array()
        .unwrap()
        .clone();
    let bad_node = nodes.iter().find(|n| n["id"] == "bad").unwrap();
    assert_eq!(bad_node["ejected"], true, "{status}");
    let before = bad.requests();
    for i in 0..20 {
        assert_eq!(
            get(&sc.url(&format!("/orders/x{i}"))).await.unwrap().status,
            200
        );
    }
    assert_eq!(bad.requests(), before, "an ejected node gets no traffic");
    let metrics = get(&sc.url("/metrics")).await.unwrap().text();
    assert!(
        metrics.contains("pillion_invoke_ejections_total{service=\"orders\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("pillion_invoke_requests_total{service=\"orders\",class=\"2xx\"} 60"),
        "{metrics}"
    );
    assert!(
        metrics.contains("pillion_invoke_retries_total{service=\"orders\"} 5"),
        "{metrics}"
    );

    // Peak-EWMA counts a 503 as slow: the bad node is tried about once, then avoided.
    let bad2 = TestApp::start("bad2").await;
    let good2 = TestApp::start("good2").await;
    bad2.set_mode(Mode::Status(503));
    let sc = Sidecar::start(&["--handler", "proxy"]);
    register(&sc, "orders", "bad2", &bad2.addr().to_string(), &[]).await;
    register(&sc, "orders", "good2", &good2.addr().to_string(), &[]).await;
    for i in 0..40 {
        assert_eq!(
            get(&sc.url(&format!("/orders/{i}"))).await.unwrap().status,
            200
        );
    }
    assert!(
        bad2.requests() <= 3,
        "the failing node got {} of 40",
        bad2.requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_node_gives_504_within_the_deadline_without_a_retry_storm() {
    let hung = TestApp::start("hung").await;
    hung.set_mode(Mode::Hang);
    let sc = Sidecar::start(&["--per-try-timeout", "300ms"]);
    register(&sc, "slow", "hung", &hung.addr().to_string(), &[]).await;

    let start = Instant::now();
    let reply = request(
        http::Method::POST,
        &sc.url("/slow/call"),
        &[("x-pillion-timeout", "500ms")],
        "{}",
    )
    .await
    .unwrap();
    let took = start.elapsed();
    assert_eq!(reply.status, 504, "{}", reply.text());
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert!(
        reply.json()["detail"].as_str().unwrap().contains("300ms"),
        "{}",
        reply.text()
    );

    for _ in 0..4 {
        let r = post_json(&sc.url("/slow/call"), "{}").await.unwrap();
        assert_eq!(r.status, 504);
    }
    assert_eq!(
        hung.requests(),
        5,
        "POST is not idempotent: one attempt per call"
    );
    assert!(
        eventually(Duration::from_secs(2), || async { hung.cancelled() == 5 }).await,
        "abandoned attempts are cancelled upstream"
    );

    let bad = request(
        http::Method::POST,
        &sc.url("/slow/call"),
        &[("x-pillion-timeout", "soon")],
        "{}",
    )
    .await
    .unwrap();
    assert_eq!(bad.status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_limit_get_413() {
    let app = TestApp::start("upload").await;
    let rpc = Sidecar::start(&["--max-body-size", "1KiB"]);
    register(&rpc, "upload", "u1", &app.addr().to_string(), &[]).await;
    let big = "x".repeat(2048);
    let reply = post_json(&rpc.url("/upload/put"), &big).await.unwrap();
    assert_eq!(reply.status, 413, "{}", reply.text());
    assert!(reply.json()["detail"].as_str().unwrap().contains("1KiB"));
    assert_eq!(
        post_json(&rpc.url("/upload/put"), "small")
            .await
            .unwrap()
            .status,
        200
    );

    let proxy = Sidecar::start(&["--handler", "proxy", "--max-body-size", "1KiB"]);
    register(&proxy, "upload", "u1", &app.addr().to_string(), &[]).await;
    let reply = post_json(&proxy.url("/upload/file"), &big).await.unwrap();
    assert_eq!(reply.status, 413);
    // Chunked, with no length announced: cut off when it passes the limit.
    let mut s = std::net::TcpStream::connect(proxy.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let chunk = "y".repeat(600);
    let req = format!(
        "POST /upload/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{chunk}\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len(),
        chunk.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut got = vec![0u8; 4096];
    let n = s.read(&mut got).unwrap();
    let head = String::from_utf8_lossy(&got[..n]);
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_disconnects_cancels_the_upstream_request() {
    let app = TestApp::start("svc").await;
    // Deadlines far away: only the caller's going away can cancel the call.
    let sc = Sidecar::start(&[
        "--handler",
        "proxy",
        "--timeout",
        "60s",
        "--per-try-timeout",
        "60s",
    ]);
    register(&sc, "svc", "s1", &app.addr().to_string(), &[]).await;
    let mut s = std::net::TcpStream::connect(sc.addr).unwrap();
    s.write_all(b"GET /svc/hang HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    assert!(eventually(Duration::from_secs(5), || async { app.requests() == 1 }).await);
    drop(s);
    assert!(
        eventually(Duration::from_secs(5), || async { app.cancelled() == 1 }).await,
        "the node's request must be cancelled when the caller goes away"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nearer_zone_first_failover_to_the_region_and_failback() {
    let near = TestApp::start("near").await;
    let far = TestApp::start("far").await;
    let me = TestApp::start("me").await;
    let sc = Sidecar::start(&[
        "--handler",
        "proxy",
        "--server-name",
        "me",
        "--server-address",
        &me.addr().to_string(),
        "--server-metadata",
        "zone=eu-1a",
        "--server-metadata",
        "region=eu-1",
    ]);
    register(
        &sc,
        "geo",
        "near",
        &near.addr().to_string(),
        &[("zone", "eu-1a"), ("region", "eu-1")],
    )
    .await;
    register(
        &sc,
        "geo",
        "far",
        &far.addr().to_string(),
        &[("zone", "eu-1b"), ("region", "eu-1")],
    )
    .await;
    let served_by = |r: pillion_testkit::http::Reply| r.json()["app"].as_str().unwrap().to_string();

    for _ in 0..10 {
        assert_eq!(served_by(get(&sc.url("/geo/x")).await.unwrap()), "near");
    }
    near.kill();
    for _ in 0..10 {
        let r = get(&sc.url("/geo/x")).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(served_by(r), "far", "fails over to the region");
    }
    near.restart().await;
    // Back once the ejection (if any) lapses: at most the 10 s base ejection time.
    let back = eventually(Duration::from_secs(15), || async {
        get(&sc.url("/geo/x"))
            .await
            .map(served_by)
            .unwrap_or_default()
            == "near"
    })
    .await;
    assert!(back, "fails back to the zone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_evenly() {
    let a = TestApp::start("a").await;
    let b = TestApp::start("b").await;
    let sc = Sidecar::start(&["--balancer", "round-robin"]);
    register(&sc, "rr", "a", &a.addr().to_string(), &[]).await;
    register(&sc, "rr", "b", &b.addr().to_string(), &[]).await;
    for _ in 0..10 {
        assert_eq!(
            post_json(&sc.url("/rr/call"), "{}").await.unwrap().status,
            200
        );
    }
    assert_eq!((a.requests(), b.requests()), (5, 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_passes_methods_paths_upgrades_and_h2c_through() {
    let app = TestApp::start("web").await;
    let sc = Sidecar::start(&["--handler", "proxy"]);
    register(&sc, "web", "w1", &app.addr().to_string(), &[]).await;

    let reply = request(
        http::Method::PUT,
        &sc.url("/web/a/b?c=d"),
        &[("x-k", "v")],
        "payload",
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 200);
    let seen = reply.json();
    assert_eq!(
        (seen["method"].as_str(), seen["path"].as_str()),
        (Some("PUT"), Some("/web/a/b?c=d"))
    );
    assert_eq!(seen["body"], "payload");
    assert_eq!(seen["headers"]["x-k"], "v");

    // A large streamed body arrives whole.
    let big = "z".repeat(300_000);
    let reply = request(http::Method::POST, &sc.url("/web/big"), &[], big.clone())
        .await
        .unwrap();
    assert_eq!(reply.json()["body"].as_str().unwrap().len(), big.len());

    // Upgrade: the tunnel echoes bytes both ways.
    common::assert_upgrade_echoes(sc.addr, "/web/upgrade", b"ping through the tunnel");

    // h2c prior knowledge, as gRPC clients speak it.
    let (status, seen) = common::grpc_call(sc.addr, "/web/grpc.Svc/Call").await;
    assert_eq!(status, 200);
    assert_eq!(
        seen["version"], "HTTP/2.0",
        "the node is spoken to in HTTP/2: {seen}"
    );
    assert_eq!(seen["headers"]["te"], "trailers");
    assert_eq!(seen["path"], "/web/grpc.Svc/Call");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_beyond_max_pending_get_503_not_unbounded_queueing() {
    let hung = TestApp::start("hung").await;
    hung.set_mode(Mode::Hang);
    let sc = Sidecar::start(&["--handler", "proxy", "--max-pending", "2"]);
    register(&sc, "busy", "h1", &hung.addr().to_string(), &[]).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = std::net::TcpStream::connect(sc.addr).unwrap();
        s.write_all(b"GET /busy/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .unwrap();
        held.push(s);
    }
    assert!(eventually(Duration::from_secs(5), || async { hung.requests() == 2 }).await);
    let reply = get(&sc.url("/busy/y")).await.unwrap();
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert!(
        reply.json()["detail"].as_str().unwrap().contains("limit 2"),
        "{}",
        reply.text()
    );
    drop(held);
    hung.set_mode(Mode::Echo);
    assert!(
        eventually(Duration::from_secs(5), || async {
            get(&sc.url("/busy/z"))
                .await
                .map(|r| r.status == 200)
                .unwrap_or(false)
        })
        .await,
        "capacity comes back when the waiting calls end"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_callers_opens_at_most_128_connections_to_one_node() {
    let hung = TestApp::start("hung").await;
    hung.set_mode(Mode::Hang);
    // Long deadlines, so that no retry adds requests while the test looks.
    let sc = Sidecar::start(&[
        "--handler",
        "proxy",
        "--per-try-timeout",
        "1m",
        "--timeout",
        "1m",
    ]);
    register(&sc, "busy", "h1", &hung.addr().to_string(), &[]).await;
    let mut held = Vec::new();
    for _ in 0..150 {
        let mut s = std::net::TcpStream::connect(sc.addr).unwrap();
        s.write_all(b"GET /busy/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .unwrap();
        held.push(s);
    }
    assert!(
        eventually(Duration::from_secs(5), || async { hung.requests() == 128 }).await,
        "got {}",
        hung.requests()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        hung.requests(),
        128,
        "the other callers wait for a connection"
    );
    hung.set_mode(Mode::Echo);
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_is_retried_on_503_only_when_the_caller_opts_in() {
    let bad = TestApp::start("bad").await;
    let good = TestApp::start("good").await;
    bad.set_mode(Mode::Status(503));
    let sc = Sidecar::start(&["--balancer", "round-robin"]);
    register(&sc, "pay", "a-bad", &bad.addr().to_string(), &[]).await;
    register(&sc, "pay", "b-good", &good.addr().to_string(), &[]).await;

    // Round-robin starts with the bad node: without opting in, its 503 comes back.
    let reply = post_json(&sc.url("/pay/charge"), "{}").await.unwrap();
    assert_eq!(reply.status, 503, "a POST is not retried by default");
    let _ = post_json(&sc.url("/pay/charge"), "{}").await.unwrap(); // the good node's turn

    let reply = request(
        http::Method::POST,
        &sc.url("/pay/charge"),
        &[("x-pillion-retry", "always")],
        "{}",
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["app"], "good");
    assert!(
        reply.json()["headers"].get("x-pillion-retry").is_none(),
        "the control header does not travel"
    );

    let reply = request(
        http::Method::POST,
        &sc.url("/pay/charge"),
        &[("x-pillion-retry", "sometimes")],
        "{}",
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 400);
    assert!(reply.json()["detail"].as_str().unwrap().contains("always"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_calls_in_flight_finish_then_exits_without_waiting_out_the_grace() {
    let app = TestApp::start("slow").await;
    let mut sc = Sidecar::start(&["--handler", "proxy", "--grace-period", "30s"]);
    register(&sc, "slow", "s1", &app.addr().to_string(), &[]).await;

    // An idle keep-alive connection, held open by its client.
    let mut idle = std::net::TcpStream::connect(sc.addr).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    idle.write_all(b"GET /slow/idle HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = idle.read(&mut buf).unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));

    let url = sc.url("/slow/busy?delay=1000");
    let call = tokio::spawn(async move { pillion_testkit::http::get(&url).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    sc.process.signal("TERM");

    let reply = call.await.unwrap().unwrap();
    assert_eq!(reply.status, 200, "the call in flight is answered");
    assert_eq!(
        idle.read(&mut buf).unwrap(),
        0,
        "the idle connection is closed"
    );
    assert!(
        sc.process.wait_exit(Duration::from_secs(5)).is_some(),
        "pillion exits once its connections are done, not after the 30 s grace period"
    );
}

/// A call to a service that has no node yet (an app starting, a node restarting)
/// waits for one with `--wait-for-node` or `X-Pillion-Wait`, within its deadline,
/// instead of failing at once; without either it fails at once as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_waits_for_a_node_to_register_within_its_deadline() {
    let node = TestApp::start("late").await;
    let sc = Sidecar::start(&["--wait-for-node", "5s"]);
    let url = sc.url("/late/say/hello");
    let started = Instant::now();
    let waiting = tokio::spawn(async move { post_json(&url, "{}").await.unwrap() });
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!waiting.is_finished(), "the call waits for a node");
    register(&sc, "late", "late-1", &node.addr().to_string(), &[]).await;
    let reply = waiting.await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert_eq!(node.requests(), 1);

    // A service with no node within the call's own deadline: 503 naming the wait.
    let reply = request(
        http::Method::POST,
        &sc.url("/never/say/hello"),
        &[("x-pillion-timeout", "300ms")],
        "{}",
    )
    .await
    .unwrap();
    reply.assert_refused(
        503,
        "none registered within 300ms",
        "a wait past the deadline",
    );

    // Without a wait, at once; a wait per call; a wait that makes no sense.
    let quick = Sidecar::start(&[]);
    let started = Instant::now();
    let reply = post_json(&quick.url("/never/say/hello"), "{}")
        .await
        .unwrap();
    assert_eq!(reply.status, 404, "{}", reply.text());
    assert!(started.elapsed() < Duration::from_secs(2));
    let reply = request(
        http::Method::POST,
        &quick.url("/never/say/hello"),
        &[("x-pillion-wait", "200ms")],
        "{}",
    )
    .await
    .unwrap();
    reply.assert_refused(503, "within 200ms", "X-Pillion-Wait");
    let reply = request(
        http::Method::POST,
        &quick.url("/never/say/hello"),
        &[("x-pillion-wait", "soon")],
        "{}",
    )
    .await
    .unwrap();
    reply.assert_refused(400, "X-Pillion-Wait", "a wait that is not a duration");
}

/// A REST app called by name, the name out of the path: `/invoke/{service}/{path}`
/// (and Dapr's `/v1.0/invoke/{service}/method/{path}`), under the default handler,
/// any method, query and body kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invoke_calls_a_rest_app_by_name_with_its_own_paths() {
    let app = TestApp::start("users").await;
    let sc = Sidecar::start(&[]);
    register(&sc, "users", "users-1", &app.addr().to_string(), &[]).await;

    let got = get(&sc.url("/invoke/users/users/42?fields=name"))
        .await
        .unwrap();
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.json()["path"], "/users/42?fields=name");
    assert_eq!(got.json()["method"], "GET");

    let put = request(
        http::Method::PUT,
        &sc.url("/invoke/users/users/42"),
        &[("content-type", "application/json")],
        r#"{"name":"Ada"}"#,
    )
    .await
    .unwrap();
    assert_eq!(put.status, 200, "{}", put.text());
    assert_eq!(put.json()["method"], "PUT");
    assert_eq!(put.json()["body"], r#"{"name":"Ada"}"#);

    let dapr = get(&sc.url("/v1.0/invoke/users/method/users/7"))
        .await
        .unwrap();
    assert_eq!(dapr.json()["path"], "/users/7", "{}", dapr.text());

    get(&sc.url("/invoke/nobody/x"))
        .await
        .unwrap()
        .assert_refused(404, "\"nobody\"", "an unknown service");
    get(&sc.url("/invoke/")).await.unwrap().assert_refused(
        404,
        "name the service: /invoke/{service}/{path}",
        "no service named",
    );
}
