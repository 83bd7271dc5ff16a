//! Traces and logs: W3C `traceparent`/`tracestate` kept on every hop (calls by name,
//! the mesh, the sessions proxy, push delivery), spans exported over OTLP/HTTP JSON
//! to a collector (a small recording HTTP server here: no OpenTelemetry collector is
//! installable on the test machines), and `--log-format json`.

mod common;

use std::io::BufRead;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{eventually, inbound, mesh_ca, mesh_caller_with, mesh_receiver, register, Sidecar};
use http_body_util::{BodyExt, Full};
use pillion_testkit::http::{get, request};
use pillion_testkit::{free_port, wait_for_port};
use serde_json::Value;

const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";
const STATE: &str = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7";

/// One request a [`Recorder`] received.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Seen {
    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    }

    fn traceparent(&self) -> Traceparent {
        let value = self.header("traceparent").expect("a traceparent");
        assert_eq!(
            self.headers.get_all("traceparent").iter().count(),
            1,
            "one traceparent"
        );
        Traceparent::parse(&value).unwrap_or_else(|| panic!("{value:?} is not valid"))
    }
}

/// An HTTP server on a free port that answers 200 (or the status it was started
/// with) to everything and keeps what it received: the app or node behind a sidecar,
/// and the OTLP collector.
struct Recorder {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Recorder {
    async fn start() -> Recorder {
        Recorder::answering(http::StatusCode::OK).await
    }

    async fn answering(status: http::StatusCode) -> Recorder {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let keep = seen.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let keep = keep.clone();
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let keep = keep.clone();
                            async move {
                                let (parts, body) = req.into_parts();
                                let body: Bytes = BodyExt::collect(body)
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                keep.lock().unwrap().push(Seen {
                                    path: parts.uri.path().to_string(),
                                    headers: parts.headers,
                                    body,
                                });
                                let mut res =
                                    http::Response::new(Full::new(Bytes::from_static(b"{}")));
                                *res.status_mut() = status;
                                Ok::<_, std::convert::Infallible>(res)
                            }
                        },
                    );
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
                });
            }
        });
        Recorder { addr, seen, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn clear(&self) {
        self.seen.lock().unwrap().clear();
    }

    /// The last request to `path`, waiting up to 10 s for one.
    async fn last(&self, path: &str) -> Seen {
        let found = eventually(Duration::from_secs(10), || async {
            self.seen().iter().any(|s| s.path == path)
        })
        .await;
        assert!(found, "nothing reached {path}: {:?}", self.seen());
        self.seen()
            .into_iter()
            .rev()
            .find(|s| s.path == path)
            .unwrap()
    }

    /// Every span exported to this collector so far, with its resource's service
    /// name.
    fn spans(&self) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        for post in self.seen().iter().filter(|s| s.path == "/v1/traces") {
            assert_eq!(
                post.header("content-type").as_deref(),
                Some("application/json")
            );
            let doc: Value = serde_json::from_slice(&post.body).expect("OTLP JSON");
            for rs in doc["resourceSpans"].as_array().expect("resourceSpans") {
                let service = rs["resource"]["attributes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|a| a["key"] == "service.name")
                    .and_then(|a| a["value"]["stringValue"].as_str())
                    .expect("service.name")
                    .to_string();
                for ss in rs["scopeSpans"].as_array().unwrap() {
                    for span in ss["spans"].as_array().unwrap() {
                        out.push((service.clone(), span.clone()));
                    }
                }
            }
        }
        out
    }

    /// The span called `name`, waiting up to 10 s for it to be exported.
    async fn span(&self, name: &str) -> (String, Value) {
        let found = eventually(Duration::from_secs(10), || async {
            self.spans().iter().any(|(_, s)| s["name"] == name)
        })
        .await;
        assert!(found, "no span {name:?} exported: {:?}", self.spans());
        self.spans()
            .into_iter()
            .rev()
            .find(|(_, s)| s["name"] == name)
            .unwrap()
    }
}

/// A `traceparent` as the test reads it, by the W3C rules, independently of pillion.
#[derive(Debug, PartialEq)]
struct Traceparent {
    trace_id: String,
    parent_id: String,
    flags: String,
}

impl Traceparent {
    fn parse(v: &str) -> Option<Traceparent> {
        let v = v.trim_matches([' ', '\t']);
        let parts: Vec<&str> = v.split('-').collect();
        let lower_hex = |s: &str, n: usize| {
            s.len() == n
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if parts.len() < 4 || !lower_hex(parts[0], 2) || parts[0] == "ff" {
            return None;
        }
        if parts[0] == "00" && parts.len() != 4 {
            return None;
        }
        let (t, p, f) = (parts[1], parts[2], parts[3]);
        if !lower_hex(t, 32) || !lower_hex(p, 16) || !lower_hex(f, 2) {
            return None;
        }
        if t.bytes().all(|b| b == b'0') || p.bytes().all(|b| b == b'0') {
            return None;
        }
        Some(Traceparent {
            trace_id: t.into(),
            parent_id: p.into(),
            flags: f.into(),
        })
    }
}

fn attr(span: &Value, key: &str) -> Value {
    let a = span["attributes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["key"] == key)
        .unwrap_or_else(|| panic!("no attribute {key} in {span}"));
    let v = &a["value"];
    if let Some(s) = v["stringValue"].as_str() {
        return Value::String(s.into());
    }
    match &v["intValue"] {
        Value::String(s) => Value::from(s.parse::<i64>().unwrap()),
        n => n.clone(),
    }
}

async fn call(sc: &Sidecar, path: &str, headers: &[(&str, &str)]) -> u16 {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    request(http::Method::POST, &sc.url(path), &all, "{}")
        .await
        .unwrap()
        .status
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_by_name_is_a_span_child_of_the_callers_and_parent_of_the_nodes() {
    let node = Recorder::start().await;
    let collector = Recorder::start().await;
    let sc = Sidecar::start(&[
        "--otlp-endpoint",
        &collector.url(),
        "--server-name",
        "front",
        "--server-address",
        "127.0.0.1:1",
    ]);
    register(&sc, "greeter", "g1", &node.addr.to_string(), &[]).await;

    let status = call(
        &sc,
        "/greeter/hello",
        &[("traceparent", PARENT), ("tracestate", STATE)],
    )
    .await;
    assert_eq!(status, 200);
    let seen = node.last("/Greeter.Hello").await;
    let tp = seen.traceparent();
    assert_eq!(tp.trace_id, TRACE_ID, "the caller's trace");
    assert_ne!(tp.parent_id, PARENT_ID, "the sidecar's span is the parent");
    assert_eq!(tp.flags, "01");
    assert_eq!(seen.header("tracestate").as_deref(), Some(STATE));

    // The exported span: a client span between the caller's and the node's.
    let (service, span) = collector.span("call greeter").await;
    assert_eq!(service, "front", "service.name is --server-name");
    assert_eq!(span["traceId"], TRACE_ID);
    assert_eq!(span["parentSpanId"], PARENT_ID);
    assert_eq!(span["spanId"], tp.parent_id.as_str());
    assert_eq!(span["traceState"], STATE);
    assert_eq!(span["kind"], 3, "CLIENT");
    assert_eq!(span["status"], serde_json::json!({}), "not an error");
    assert_eq!(attr(&span, "http.request.method"), "POST");
    assert_eq!(attr(&span, "http.response.status_code"), 200);
    assert_eq!(attr(&span, "pillion.service"), "greeter");
    assert_eq!(
        attr(&span, "server.address"),
        node.addr.to_string().as_str()
    );
    assert_eq!(attr(&span, "pillion.retries"), 0);
    let start: u128 = span["startTimeUnixNano"].as_str().unwrap().parse().unwrap();
    let end: u128 = span["endTimeUnixNano"].as_str().unwrap().parse().unwrap();
    assert!(start > 1_600_000_000_000_000_000 && end >= start, "{span}");

    // Without a traceparent: a new trace, sampled, and its root span.
    node.clear();
    assert_eq!(
        call(&sc, "/greeter/hello", &[("tracestate", STATE)]).await,
        200
    );
    let seen = node.last("/Greeter.Hello").await;
    let tp = seen.traceparent();
    assert_ne!(tp.trace_id, TRACE_ID);
    assert_eq!(tp.flags, "01");
    assert_eq!(seen.header("tracestate"), None, "a new trace has no state");
    let found = eventually(Duration::from_secs(10), || async {
        collector
            .spans()
            .iter()
            .any(|(_, s)| s["traceId"] == tp.trace_id.as_str())
    })
    .await;
    assert!(found, "the new trace's span is exported");
    let spans = collector.spans();
    let (_, root) = spans
        .iter()
        .find(|(_, s)| s["traceId"] == tp.trace_id.as_str())
        .unwrap();
    assert!(root.get("parentSpanId").is_none(), "a root span: {root}");

    // A call the sidecar fails (its only node refuses connections): an error span.
    let dead = free_port();
    register(&sc, "down", "d1", &format!("127.0.0.1:{dead}"), &[]).await;
    assert_eq!(call(&sc, "/down/x", &[("traceparent", PARENT)]).await, 503);
    let (_, span) = collector.span("call down").await;
    assert_eq!(span["status"]["code"], 2, "ERROR: {span}");
    assert!(
        span["status"]["message"]
            .as_str()
            .unwrap()
            .contains("no healthy node"),
        "{span}"
    );
    assert_eq!(attr(&span, "http.response.status_code"), 503);

    let metrics = get(&sc.url("/metrics")).await.unwrap().text();
    assert!(
        metrics.contains("pillion_trace_spans_dropped_total{reason=\"queue_full\"} 0"),
        "{metrics}"
    );
    assert!(metrics.contains("pillion_trace_spans_exported_total"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_exporter_the_callers_traceparent_passes_unchanged() {
    let node = Recorder::start().await;
    let sc = Sidecar::start(&[]);
    register(&sc, "greeter", "g1", &node.addr.to_string(), &[]).await;
    assert_eq!(
        call(
            &sc,
            "/greeter/hello",
            &[("traceparent", PARENT), ("tracestate", STATE)]
        )
        .await,
        200
    );
    let seen = node.last("/Greeter.Hello").await;
    assert_eq!(seen.header("traceparent").as_deref(), Some(PARENT));
    assert_eq!(seen.header("tracestate").as_deref(), Some(STATE));

    // `/rpc` too; without a traceparent the node still gets a valid one.
    node.clear();
    let body = r#"{"service":"greeter","method":"Greeter.Hello","request":{}}"#;
    let reply = request(
        http::Method::POST,
        &sc.url("/rpc"),
        &[("content-type", "application/json")],
        body,
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    let tp = node.last("/Greeter.Hello").await.traceparent();
    assert_eq!(tp.flags, "01");

    // A later version is read for its version-00 fields and sent on as version 00.
    node.clear();
    let future = format!("cc-{TRACE_ID}-{PARENT_ID}-01-more-fields");
    assert_eq!(
        call(&sc, "/greeter/hello", &[("traceparent", &future)]).await,
        200
    );
    let seen = node.last("/Greeter.Hello").await;
    assert_eq!(seen.header("traceparent").as_deref(), Some(PARENT));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trace_crosses_the_mesh() {
    let app = Recorder::start().await;
    let collector = Recorder::start().await;
    let ca = mesh_ca("trace");
    let otlp = ["--otlp-endpoint", &collector.url()];
    let orders = mesh_receiver(&ca, "orders", app.addr, &otlp);
    let front = mesh_caller_with(&orders, Some((&ca, "front")), "orders", &otlp).await;

    let reply = request(
        http::Method::GET,
        &front.url("/orders/list"),
        &[("traceparent", PARENT), ("tracestate", STATE)],
        "",
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = app.last("/orders/list").await;
    let tp = seen.traceparent();
    assert_eq!(tp.trace_id, TRACE_ID);
    assert_ne!(tp.parent_id, PARENT_ID);
    assert_eq!(seen.header("tracestate").as_deref(), Some(STATE));

    // caller's span -> front's client span -> orders' server span -> the app.
    let (front_service, client) = collector.span("call orders").await;
    let (orders_service, server) = collector.span("serve orders").await;
    assert_eq!(front_service, "front");
    assert_eq!(orders_service, "orders");
    assert_eq!(client["parentSpanId"], PARENT_ID);
    assert_eq!(server["parentSpanId"], client["spanId"]);
    assert_eq!(server["spanId"], tp.parent_id.as_str());
    assert_eq!(server["traceId"], TRACE_ID);
    assert_eq!(server["kind"], 2, "SERVER");
    assert_eq!(attr(&server, "pillion.caller"), "front");
    assert_eq!(attr(&server, "http.response.status_code"), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sessions_proxy_keeps_the_trace() {
    let app = Recorder::start().await;
    let collector = Recorder::start().await;
    let (_sc, listen) = inbound(&app.url(), &["--otlp-endpoint", &collector.url()]);
    let reply = request(
        http::Method::GET,
        &format!("http://{listen}/page"),
        &[("traceparent", PARENT), ("tracestate", STATE)],
        "",
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 200);
    let seen = app.last("/page").await;
    let tp = seen.traceparent();
    assert_eq!(tp.trace_id, TRACE_ID);
    assert_ne!(tp.parent_id, PARENT_ID);
    assert_eq!(seen.header("tracestate").as_deref(), Some(STATE));
    let (service, span) = collector.span("GET").await;
    assert_eq!(service, "pillion", "no --server-name: pillion");
    assert_eq!(span["kind"], 2, "SERVER");
    assert_eq!(span["parentSpanId"], PARENT_ID);
    assert_eq!(span["spanId"], tp.parent_id.as_str());
    assert_eq!(attr(&span, "url.path"), "/page");

    // Without an exporter: unchanged.
    let (_plain, listen) = inbound(&app.url(), &[]);
    app.clear();
    request(
        http::Method::GET,
        &format!("http://{listen}/other"),
        &[("traceparent", PARENT)],
        "",
    )
    .await
    .unwrap();
    let seen = app.last("/other").await;
    assert_eq!(seen.header("traceparent").as_deref(), Some(PARENT));
}

/// Publishes until the app has been pushed a message (the push subscription starts
/// with the sidecar, a plain topic keeps nothing for later).
async fn publish_until_pushed(sc: &Sidecar, app: &Recorder, headers: &[(&str, &str)]) -> Seen {
    let pushed = eventually(Duration::from_secs(10), || async {
        let reply = request(
            http::Method::POST,
            &sc.url("/broker?topic=orders.new"),
            headers,
            "order",
        )
        .await
        .unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text());
        tokio::time::sleep(Duration::from_millis(100)).await;
        app.seen().iter().any(|s| s.path == "/orders")
    })
    .await;
    assert!(pushed, "no message was pushed");
    app.last("/orders").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_delivery_carries_the_publishers_trace() {
    let app = Recorder::start().await;
    let collector = Recorder::start().await;
    let sc = Sidecar::start(&[
        "--server-name",
        "orders",
        "--server-address",
        &app.addr.to_string(),
        "--broker-push",
        "orders.new=/orders",
        "--otlp-endpoint",
        &collector.url(),
    ]);
    let seen =
        publish_until_pushed(&sc, &app, &[("traceparent", PARENT), ("tracestate", STATE)]).await;
    let tp = seen.traceparent();
    assert_eq!(tp.trace_id, TRACE_ID);
    assert_ne!(tp.parent_id, PARENT_ID);
    assert_eq!(seen.header("tracestate").as_deref(), Some(STATE));
    let (_, span) = collector.span("push orders.new").await;
    assert_eq!(span["kind"], 5, "CONSUMER");
    assert_eq!(span["parentSpanId"], PARENT_ID);
    assert_eq!(attr(&span, "messaging.destination.name"), "orders.new");

    // Without an exporter the message's traceparent reaches the app as published;
    // without one at all, the app still gets a valid one.
    let app = Recorder::start().await;
    let plain = Sidecar::start(&[
        "--server-name",
        "orders",
        "--server-address",
        &app.addr.to_string(),
        "--broker-push",
        "orders.new=/orders",
    ]);
    let seen = publish_until_pushed(&plain, &app, &[("traceparent", PARENT)]).await;
    assert_eq!(seen.header("traceparent").as_deref(), Some(PARENT));
    app.clear();
    let seen = publish_until_pushed(&plain, &app, &[]).await;
    assert_eq!(seen.traceparent().flags, "01");
}

/// Sends `value` as the traceparent of a call and checks what the node got: the
/// same trace when the test's own reading says the value is valid, else a new valid
/// trace (never the value itself) without the tracestate.
async fn check_value(sc: &Sidecar, node: &Recorder, value: &str) {
    node.clear();
    let status = call(
        sc,
        "/greeter/hello",
        &[("traceparent", value), ("tracestate", STATE)],
    )
    .await;
    assert_eq!(status, 200, "{value:?}");
    let seen = node.last("/Greeter.Hello").await;
    let got = seen.header("traceparent").unwrap();
    let tp = seen.traceparent();
    match Traceparent::parse(value) {
        Some(sent) => {
            assert_eq!(tp.trace_id, sent.trace_id, "{value:?}");
            assert_eq!(seen.header("tracestate").as_deref(), Some(STATE));
        }
        None => {
            assert_ne!(got, value, "{value:?} forwarded verbatim");
            assert_eq!(seen.header("tracestate"), None, "{value:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_traceparent_starts_a_new_trace() {
    let node = Recorder::start().await;
    let sc = Sidecar::start(&[]);
    register(&sc, "greeter", "g1", &node.addr.to_string(), &[]).await;
    let long = format!("{PARENT}0");
    let cases = [
        "",
        "00",
        &PARENT[..54],
        &long,
        &format!("{PARENT}-x"), // version 00 has exactly four fields
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e473z-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902bz-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0z",
        "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e47-3600f067aa0ba902b7-01",
        "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        "garbage",
    ];
    for value in cases {
        assert_eq!(Traceparent::parse(value), None, "a bad case: {value:?}");
        check_value(&sc, &node, value).await;
    }
    // Two traceparent headers: neither is believed.
    node.clear();
    let two = [("traceparent", PARENT), ("traceparent", PARENT)];
    assert_eq!(call(&sc, "/greeter/hello", &two).await, 200);
    let seen = node.last("/Greeter.Hello").await;
    assert_ne!(seen.traceparent().trace_id, TRACE_ID);
}

/// Random header values (printable ASCII, and mutations of a valid value): the node
/// always gets one valid traceparent, and the sidecar keeps serving.
#[test]
fn random_traceparents_never_break_a_call() {
    use proptest::prelude::*;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (node, sc) = rt.block_on(async {
        let node = Recorder::start().await;
        let sc = Sidecar::start(&[]);
        register(&sc, "greeter", "g1", &node.addr.to_string(), &[]).await;
        (node, sc)
    });
    let mutated = (0..PARENT.len(), proptest::char::range(' ', '~')).prop_map(|(i, c)| {
        let mut s: Vec<char> = PARENT.chars().collect();
        s[i] = c;
        s.into_iter().collect::<String>()
    });
    let values = prop_oneof!["[ -~]{0,80}", mutated];
    let config = ProptestConfig {
        cases: 96,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(value in values)| {
        // A header value cannot end in whitespace on the wire; hyper trims it.
        let value = value.trim_matches([' ', '\t']).to_string();
        rt.block_on(check_value(&sc, &node, &value));
    });
    let health = rt.block_on(get(&sc.url("/healthz"))).unwrap();
    assert_eq!(health.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_collector_costs_the_calls_nothing() {
    let node = Recorder::start().await;
    let nothing = free_port();
    let mut sc = Sidecar::start(&["--otlp-endpoint", &format!("http://127.0.0.1:{nothing}")]);
    register(&sc, "greeter", "g1", &node.addr.to_string(), &[]).await;
    for _ in 0..50 {
        assert_eq!(
            call(&sc, "/greeter/hello", &[("traceparent", PARENT)]).await,
            200
        );
    }
    let failed = eventually(Duration::from_secs(10), || async {
        let metrics = get(&sc.url("/metrics")).await.unwrap().text();
        metrics
            .lines()
            .any(|l| l.starts_with("pillion_trace_export_failures_total ") && !l.ends_with(" 0"))
    })
    .await;
    assert!(failed, "the failed export is counted");
    assert_eq!(
        call(&sc, "/greeter/hello", &[("traceparent", PARENT)]).await,
        200
    );
    assert_eq!(get(&sc.url("/healthz")).await.unwrap().status, 200);
    assert_eq!(sc.process.wait_exit(Duration::ZERO), None, "still running");
}

/// The sidecar's stderr, line by line, killed on drop.
struct Captured {
    child: std::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Captured {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A collector that refuses what it is sent: every span is counted as lost, none as
/// exported, and the calls go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_a_collector_refuses_are_counted_as_lost() {
    let node = Recorder::start().await;
    let collector = Recorder::answering(http::StatusCode::SERVICE_UNAVAILABLE).await;
    let sc = Sidecar::start(&["--otlp-endpoint", &collector.url()]);
    register(&sc, "greeter", "g1", &node.addr.to_string(), &[]).await;
    for _ in 0..5 {
        assert_eq!(
            call(&sc, "/greeter/hello", &[("traceparent", PARENT)]).await,
            200
        );
    }
    let metric = |text: &str, name: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    };
    let lost = eventually(Duration::from_secs(10), || async {
        let text = get(&sc.url("/metrics")).await.unwrap().text();
        metric(
            &text,
            "pillion_trace_spans_dropped_total{reason=\"export_failed\"}",
        ) == Some(5)
    })
    .await;
    assert!(lost, "the five spans are counted as lost");
    let text = get(&sc.url("/metrics")).await.unwrap().text();
    assert_eq!(metric(&text, "pillion_trace_spans_exported_total"), Some(0));
    assert!(metric(&text, "pillion_trace_export_failures_total").unwrap() >= 1);
    assert!(
        collector.seen().iter().any(|s| s.path == "/v1/traces"),
        "the collector was asked"
    );
    assert_eq!(
        call(&sc, "/greeter/hello", &[("traceparent", PARENT)]).await,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line() {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut child = Command::new(common::BIN)
        .args([
            "run",
            "--address",
            &addr.to_string(),
            "--log-format",
            "json",
        ])
        .args(["--registry", "memory"])
        .env("RUST_LOG", "debug")
        .env(
            "PILLION_CLUSTER_BIND",
            format!("127.0.0.1:{}", pillion_testkit::free_udp_port()),
        )
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let lines: Arc<Mutex<Vec<String>>> = Arc::default();
    let keep = lines.clone();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            keep.lock().unwrap().push(line);
        }
    });
    let mut run = Captured {
        child,
        lines,
        reader: Some(reader),
    };
    assert!(wait_for_port(addr, Duration::from_secs(10)));
    // Some work to log: a call to nothing, a registration.
    let _ = get(&format!("http://{addr}/nothing/here")).await;
    let _ = get(&format!("http://{addr}/healthz")).await;
    let status = std::process::Command::new("kill")
        .args(["-TERM", &run.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exited = eventually(Duration::from_secs(15), || {
        let done = run.child.try_wait().unwrap().is_some();
        async move { done }
    })
    .await;
    assert!(exited, "the sidecar stopped on SIGTERM");
    run.reader.take().unwrap().join().unwrap();
    let lines = run.lines.lock().unwrap().clone();
    assert!(lines.len() >= 2, "{lines:?}");
    for line in &lines {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        assert!(v["level"].is_string(), "{line}");
        assert!(v["message"].is_string(), "{line}");
        assert!(v["timestamp"].is_string(), "{line}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("\"message\":\"pillion listening\"")
                && l.contains(&format!("\"address\":\"{addr}\""))),
        "fields beside the message: {lines:?}"
    );
}

#[test]
fn an_unknown_log_format_is_refused_at_start() {
    let (code, _, err) = common::run_to_end(&["run", "--log-format", "xml"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--log-format"), "{err}");
    assert!(err.contains("text") && err.contains("json"), "{err}");
    let (code, _, err) = common::run_to_end(&["run"], &[("PILLION_LOG_FORMAT", "xml")]);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("text or json"), "{err}");
    let (code, _, err) = common::run_to_end(&["run", "--otlp-endpoint", "127.0.0.1:4318"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--otlp-endpoint"), "{err}");
}
