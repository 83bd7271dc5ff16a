//! The broker as apps use it: micro's publish curl and websocket subscribe, across
//! sidecars, for both backends; queue groups; durable topics; NATS going away; push
//! delivery; and the requests that must be refused.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use base64::Engine;
use common::{eventually, Sidecar};
use futures_util::StreamExt;
use pillion_testkit::http::{get, request};
use pillion_testkit::{Mode, Server, TestApp};
use tokio_tungstenite::tungstenite::Message as Ws;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn subscribe(sc: &Sidecar, query: &str) -> Socket {
    let url = format!("ws://{}/broker?{query}", sc.addr);
    let (ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("websocket subscribe");
    ws
}

/// Text frames received until `n` arrived or `quiet` passed without one.
async fn receive(ws: &mut Socket, n: usize, quiet: Duration) -> Vec<serde_json::Value> {
    let mut got = Vec::new();
    while got.len() < n {
        match tokio::time::timeout(quiet, ws.next()).await {
            Ok(Some(Ok(Ws::Text(t)))) => got.push(serde_json::from_str(&t).unwrap()),
            Ok(Some(Ok(_))) => {}
            _ => break,
        }
    }
    got
}

fn body(frame: &serde_json::Value) -> String {
    let b64 = frame["Body"].as_str().unwrap();
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap(),
    )
    .unwrap()
}

async fn publish(
    sc: &Sidecar,
    topic: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> pillion_testkit::http::Reply {
    request(
        http::Method::POST,
        &sc.url(&format!("/broker?topic={topic}")),
        headers,
        body.to_string(),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_that_is_not_utf8_once_decoded_is_a_400() {
    let sc = Sidecar::start(&[]);
    publish(&sc, "orders.%ff", "x", &[]).await.assert_refused(
        400,
        r#""orders.%ff" is not UTF-8 once percent-decoded"#,
        "POST /broker?topic=orders.%ff",
    );
    let reply = request(
        http::Method::GET,
        &sc.url("/broker?topic=%ff"),
        &[("accept", "text/event-stream")],
        "",
    )
    .await
    .unwrap();
    reply.assert_refused(400, "is not UTF-8", "GET /broker?topic=%ff");
    // Text percent-encoded as UTF-8 is a topic like any other.
    assert_eq!(publish(&sc, "caf%C3%A9", "x", &[]).await.status, 200);
}

/// Waits until `sc` sees, through the registry, `n` subscriptions to `topic` on the
/// embedded brokers of all sidecars (they propagate within milliseconds; a publish
/// before that is lost, as at-most-once allows).
async fn wait_advertised(sc: &Sidecar, topic: &str, n: usize) {
    let seen = eventually(Duration::from_secs(3), || async {
        let Ok(reply) = get(&sc.url("/registry?service=pillion.broker")).await else {
            return false;
        };
        if reply.status != 200 {
            return false;
        }
        let count: usize = reply.json()[0]["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|node| {
                let subs: Vec<(String, Option<String>)> = serde_json::from_str(
                    node["metadata"]["subscriptions"].as_str().unwrap_or("[]"),
                )
                .unwrap();
                subs.iter().filter(|(p, _)| p == topic).count()
            })
            .sum();
        count >= n
    })
    .await;
    assert!(seen, "subscriptions to {topic} were not advertised");
}

/// Two sidecars that share a backend: the embedded broker over a shared etcd, or NATS.
fn pair(backend: &str, registry: &str) -> (Sidecar, Sidecar) {
    let args: Vec<&str> = if backend == "embedded" {
        vec!["--registry", registry]
    } else {
        vec!["--broker", backend]
    };
    (Sidecar::start(&args), Sidecar::start(&args))
}

async fn published_on_one_sidecar_received_on_the_other(backend: &str, registry: &str) {
    let (a, b) = pair(backend, registry);
    let mut ws = subscribe(&b, "topic=foo").await;
    if backend == "embedded" {
        wait_advertised(&a, "foo", 1).await;
    }
    // curl -XPOST -H "Timestamp: 1499951537" -d "Hello World!" "http://localhost:8081/broker?topic=foo"
    let reply = publish(&a, "foo", "Hello World!", &[("Timestamp", "1499951537")]).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let got = receive(&mut ws, 1, Duration::from_secs(5)).await;
    assert_eq!(
        got.len(),
        1,
        "{backend}: nothing arrived on the other sidecar"
    );
    assert_eq!(body(&got[0]), "Hello World!");
    assert_eq!(got[0]["Header"]["Timestamp"], "1499951537");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_publish_on_a_receive_on_b() {
    let etcd = Server::etcd();
    published_on_one_sidecar_received_on_the_other("embedded", &etcd.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_publish_on_a_receive_on_b() {
    let nats = Server::nats();
    published_on_one_sidecar_received_on_the_other(&nats.url(), "").await;
}

async fn queue_group_and_plain_subscribers_across_sidecars(backend: &str, registry: &str) {
    let (a, b) = pair(backend, registry);
    let mut member_a = subscribe(&a, "topic=jobs&queue=group-1").await;
    let mut member_b = subscribe(&b, "topic=jobs&queue=group-1").await;
    let mut plain_a = subscribe(&a, "topic=jobs").await;
    let mut plain_b = subscribe(&b, "topic=jobs").await;
    if backend == "embedded" {
        // Each sidecar advertises a plain and a queue subscription to jobs.
        wait_advertised(&a, "jobs", 4).await;
    }
    for i in 0..1000 {
        let r = publish(&a, "jobs", &format!("j{i}"), &[]).await;
        assert_eq!(r.status, 200);
    }
    let quiet = Duration::from_secs(2);
    let (ma, mb, pa, pb) = tokio::join!(
        receive(&mut member_a, 1000, quiet),
        receive(&mut member_b, 1000, quiet),
        receive(&mut plain_a, 1000, quiet),
        receive(&mut plain_b, 1000, quiet),
    );
    let group: Vec<String> = ma.iter().chain(mb.iter()).map(body).collect();
    assert_eq!(
        group.len(),
        1000,
        "{backend}: the group got {} + {}",
        ma.len(),
        mb.len()
    );
    assert_eq!(
        group.iter().collect::<BTreeSet<_>>().len(),
        1000,
        "{backend}: a message went twice"
    );
    assert!(
        !ma.is_empty() && !mb.is_empty(),
        "{backend}: both members share"
    );
    let expected: Vec<String> = (0..1000).map(|i| format!("j{i}")).collect();
    assert_eq!(
        pa.iter().map(body).collect::<Vec<_>>(),
        expected,
        "{backend}: plain subscriber on a"
    );
    assert_eq!(
        pb.iter().map(body).collect::<Vec<_>>(),
        expected,
        "{backend}: plain subscriber on b"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_queue_group_gets_each_of_1000_once_and_plain_subscribers_all() {
    let etcd = Server::etcd();
    queue_group_and_plain_subscribers_across_sidecars("embedded", &etcd.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_queue_group_gets_each_of_1000_once_and_plain_subscribers_all() {
    let nats = Server::nats();
    queue_group_and_plain_subscribers_across_sidecars(&nats.url(), "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_queue_subscriber_offline_while_100_are_published_gets_all_100() {
    let nats = Server::nats();
    let sc = Sidecar::start(&["--broker", &nats.url(), "--broker-durable", "orders.*"]);
    let ws = subscribe(&sc, "topic=orders.new&queue=workers").await;
    drop(ws); // the worker goes offline
              // The acknowledgement says the message is stored (durable), another is not.
    let ack = publish(&sc, "orders.new", "o0", &[]).await.json();
    assert_eq!(ack["topic"], "orders.new");
    assert_eq!(ack["bytes"], 2);
    assert_eq!(ack["stored"], true, "{ack}");
    let plain = publish(&sc, "news", "n", &[]).await.json();
    assert_eq!(plain["stored"], false, "{plain}");
    for i in 1..100 {
        assert_eq!(
            publish(&sc, "orders.new", &format!("o{i}"), &[])
                .await
                .status,
            200
        );
    }
    let mut ws = subscribe(&sc, "topic=orders.new&queue=workers").await;
    let got: Vec<String> = receive(&mut ws, 100, Duration::from_secs(10))
        .await
        .iter()
        .map(body)
        .collect();
    let expected: Vec<String> = (0..100).map(|i| format!("o{i}")).collect();
    assert_eq!(got, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restarted_mid_stream_publishing_resumes_without_restarting_pillion() {
    let mut nats = Server::nats();
    let sc = Sidecar::start(&["--broker", &nats.url()]);
    let mut ws = subscribe(&sc, "topic=ticks").await;
    for i in 0..10 {
        assert_eq!(
            publish(&sc, "ticks", &format!("t{i}"), &[]).await.status,
            200
        );
    }
    assert_eq!(receive(&mut ws, 10, Duration::from_secs(3)).await.len(), 10);

    nats.kill();
    let reply = publish(&sc, "ticks", "during", &[]).await;
    assert_eq!(
        reply.status,
        503,
        "a publish NATS cannot take is refused: {}",
        reply.text()
    );
    assert!(reply.json()["detail"]
        .as_str()
        .unwrap()
        .contains("unavailable"));
    let status = get(&sc.url("/statusz")).await.unwrap().json();
    assert_eq!(status["broker"]["healthy"], false);

    nats.restart();
    let resumed = eventually(Duration::from_secs(15), || async {
        publish(&sc, "ticks", "after", &[]).await.status == 200
    })
    .await;
    assert!(resumed, "publishing resumes once NATS is back");
    // A publish refused while NATS was going away may still have reached NATS's
    // client buffer: it can arrive too (before "after"), but nothing else can.
    let got: Vec<String> = receive(&mut ws, 2, Duration::from_secs(3))
        .await
        .iter()
        .map(body)
        .collect();
    assert!(
        got == ["after"] || got == ["during", "after"],
        "the subscription survived the restart: {got:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_publishes_and_subscriptions_are_refused_with_clear_errors() {
    let sc = Sidecar::start(&["--broker-max-message-size", "1KiB"]);
    let reply = publish(&sc, "big", &"x".repeat(2048), &[]).await;
    assert_eq!(reply.status, 413);
    assert!(reply.json()["detail"].as_str().unwrap().contains("1KiB"));
    for (topic, want) in [
        ("", "topic is missing"),
        ("foo%20bar", "whitespace"),
        ("foo..bar", "empty token"),
        ("orders.*", "wildcards are for subscribing"),
    ] {
        let reply = publish(&sc, topic, "x", &[]).await;
        assert_eq!(reply.status, 400, "{topic}");
        let err = reply.json();
        assert_eq!(err["id"], "pillion.broker");
        assert!(
            err["detail"].as_str().unwrap().contains(want),
            "{topic}: {err}"
        );
    }
    let reply = get(&sc.url("/broker?topic=foo")).await.unwrap();
    assert_eq!(reply.status, 400, "a plain GET is told how to subscribe");
    let reply = get(&sc.url("/broker?topic=foo&queue=bad.queue"))
        .await
        .unwrap();
    assert_eq!(reply.status, 400);
    let (code, _, err) = common::run_to_end(&["run", "--broker-durable", "orders.*"], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("needs --broker nats://"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_subscribers_and_websocket_publishers() {
    let sc = Sidecar::start(&[]);
    // A websocket client's frames are published to its topic.
    let mut sender = subscribe(&sc, "topic=chat").await;
    let addr = sc.addr;
    let sse = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            b"GET /broker?topic=chat HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n",
        )
        .await
        .unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        while !String::from_utf8_lossy(&buf).contains("data: ") {
            let n = s.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        String::from_utf8_lossy(&buf).into_owned()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    use futures_util::SinkExt;
    sender
        .send(Ws::Text("hello from a socket".into()))
        .await
        .unwrap();
    let text = tokio::time::timeout(Duration::from_secs(5), sse)
        .await
        .unwrap()
        .unwrap();
    assert!(text.contains("content-type: text/event-stream"), "{text}");
    let data = text.split("data: ").nth(1).unwrap().lines().next().unwrap();
    let frame: serde_json::Value = serde_json::from_str(data).unwrap();
    assert_eq!(body(&frame), "hello from a socket");
    // The sender, subscribed to the same topic, gets its own message too.
    assert_eq!(
        receive(&mut sender, 1, Duration::from_secs(3)).await.len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_delivery_posts_to_the_app_and_gives_up_on_a_failing_one() {
    let app = TestApp::start("orders").await;
    let sc = Sidecar::start(&[
        "--server-name",
        "orders",
        "--server-address",
        &app.addr().to_string(),
        "--broker-push",
        "orders.new=/orders",
    ]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        publish(&sc, "orders.new", "order 1", &[("Timestamp", "1")])
            .await
            .status,
        200
    );
    assert!(
        eventually(Duration::from_secs(5), || async { app.requests() == 1 }).await,
        "the app got the message"
    );

    app.set_mode(Mode::Status(500));
    assert_eq!(publish(&sc, "orders.new", "order 2", &[]).await.status, 200);
    assert!(
        eventually(Duration::from_secs(5), || async { app.requests() == 4 }).await,
        "three attempts, got {}",
        app.requests()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(app.requests(), 4, "then no more");
    let metrics = get(&sc.url("/metrics")).await.unwrap().text();
    assert!(
        metrics.contains("pillion_broker_dropped_total{topic=\"orders.new\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("pillion_broker_published_total{topic=\"orders.new\"} 2"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_with_url_delimiters_crosses_sidecars_whole() {
    let etcd = Server::etcd();
    let (a, b) = pair("embedded", &etcd.url());
    // `&`, `=` and `#` would cut or add query parameters, `"` broke a handler.
    let topic = "orders&plain=false#x\"y";
    let encoded = pillion_core::url::encode_component(topic);
    let mut ws = subscribe(&b, &format!("topic={encoded}")).await;
    wait_advertised(&a, topic, 1).await;
    let reply = publish(&a, &encoded, "whole", &[]).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let got = receive(&mut ws, 1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1, "the message did not reach the other sidecar");
    assert_eq!(body(&got[0]), "whole");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_published_several_times_keeps_every_value() {
    let sc = Sidecar::start(&[]);
    let mut ws = subscribe(&sc, "topic=tags").await;
    let reply = publish(&sc, "tags", "x", &[("X-Tag", "a"), ("X-Tag", "b")]).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let got = receive(&mut ws, 1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["Header"]["X-Tag"], "a, b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_wildcard_topic_works_as_curl_sends_it() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sc = Sidecar::start(&[]);
    // curl 'http://.../broker?topic=events.>' sends the `>` raw.
    let mut sse = tokio::net::TcpStream::connect(sc.addr).await.unwrap();
    sse.write_all(
        b"GET /broker?topic=events.> HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n",
    )
    .await
    .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    // Wait for the subscription's response head before publishing.
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), sse.read(&mut buf))
            .await
            .expect("no answer to the subscription")
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&seen).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let reply = publish(&sc, "events.todos.created", "milk", &[]).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let encoded = base64::engine::general_purpose::STANDARD.encode("milk");
    while !String::from_utf8_lossy(&seen).contains(&encoded) {
        let n = tokio::time::timeout(Duration::from_secs(5), sse.read(&mut buf))
            .await
            .expect("the event did not arrive")
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
}

/// A `pillion run` on `addr` (a sidecar restarted where it was).
fn start_at(addr: std::net::SocketAddr, args: &[&str]) -> Sidecar {
    let mut cmd = std::process::Command::new(common::BIN);
    cmd.arg("run")
        .arg("--address")
        .arg(addr.to_string())
        .args(args)
        .env("RUST_LOG", "info");
    let process = pillion_testkit::Daemon::spawn("pillion", cmd);
    assert!(
        pillion_testkit::wait_for_port(addr, Duration::from_secs(10)),
        "pillion did not listen on {addr} again"
    );
    Sidecar::adopt(process, addr)
}

/// The broker node ids `sc` sees in the registry.
async fn broker_nodes(sc: &Sidecar) -> BTreeSet<String> {
    common::node_ids(sc, "pillion.broker")
        .await
        .into_iter()
        .collect()
}

/// `(publisher, index)` of a `p{k}-{i}` body.
fn numbered(frame: &serde_json::Value) -> (usize, usize) {
    let b = body(frame);
    let (k, i) = b[1..].split_once('-').unwrap();
    (k.parse().unwrap(), i.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_of_eight_publishers_all_cross_sidecars_in_per_publisher_order() {
    let etcd = Server::etcd();
    let (a, b) = pair("embedded", &etcd.url());
    let mut ws = subscribe(&b, "topic=orders.new").await;
    wait_advertised(&a, "orders.new", 1).await;
    let (publishers, each) = (8, 250);
    let sends: Vec<_> = (0..publishers)
        .map(|k| {
            let url = a.url("/broker?topic=orders.new");
            tokio::spawn(async move {
                for i in 0..each {
                    let reply = request(http::Method::POST, &url, &[], format!("p{k}-{i}"))
                        .await
                        .unwrap();
                    assert_eq!(reply.status, 200, "{}", reply.text());
                }
            })
        })
        .collect();
    let got = receive(&mut ws, publishers * each, Duration::from_secs(10)).await;
    for s in sends {
        s.await.unwrap();
    }
    let mut by_publisher = vec![Vec::new(); publishers];
    for frame in &got {
        let (k, i) = numbered(frame);
        by_publisher[k].push(i);
    }
    let want: Vec<usize> = (0..each).collect();
    for (k, seen) in by_publisher.iter().enumerate() {
        assert_eq!(seen, &want, "publisher {k}: all, once, in order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_restarted_mid_stream_gets_all_accepted_after_it_is_back_once_in_order() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    let etcd = Server::etcd();
    let args = ["--registry", &etcd.url()];
    let a = Sidecar::start(&args);
    let mut b = Sidecar::start(&args);
    let mut ws = subscribe(&b, "topic=ticks").await;
    wait_advertised(&a, "ticks", 1).await;
    let before = broker_nodes(&a).await;

    // Two publishers publish all along; each retries an index until it is accepted,
    // so what was accepted is 0..=last, per publisher.
    let stop = Arc::new(AtomicBool::new(false));
    let next: Arc<Vec<AtomicUsize>> = Arc::new((0..2).map(|_| AtomicUsize::new(0)).collect());
    let sends: Vec<_> = (0..2)
        .map(|k| {
            let (url, stop, next) = (a.url("/broker?topic=ticks"), stop.clone(), next.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let i = next[k].load(Ordering::SeqCst);
                    match request(http::Method::POST, &url, &[], format!("p{k}-{i}")).await {
                        Ok(r) if r.status == 200 => {
                            next[k].store(i + 1, Ordering::SeqCst);
                        }
                        _ => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
            })
        })
        .collect();
    assert_eq!(
        receive(&mut ws, 100, Duration::from_secs(5)).await.len(),
        100,
        "the stream flows before the restart"
    );

    b.process.kill();
    drop(ws);
    let addr = b.addr;
    b = start_at(addr, &args);
    let mut ws = subscribe(&b, "topic=ticks").await;
    // Once A sees the restarted sidecar's new node, every message it accepts is for it.
    let back = common::eventually(Duration::from_secs(10), || async {
        broker_nodes(&a).await.difference(&before).count() == 1
    })
    .await;
    assert!(back, "A never saw the restarted sidecar");
    let marks: Vec<usize> = next.iter().map(|n| n.load(Ordering::SeqCst)).collect();
    let moved_on = common::eventually(Duration::from_secs(20), || async {
        next.iter()
            .zip(&marks)
            .all(|(n, m)| n.load(Ordering::SeqCst) >= m + 200)
    })
    .await;
    assert!(moved_on, "publishing goes on");
    stop.store(true, Ordering::SeqCst);
    for s in sends {
        s.await.unwrap();
    }
    let last: Vec<usize> = next.iter().map(|n| n.load(Ordering::SeqCst)).collect();
    let want: usize = last.iter().zip(&marks).map(|(l, m)| l - m).sum();
    let got = receive(&mut ws, usize::MAX, Duration::from_secs(3)).await;
    assert!(got.len() >= want, "{} of at least {want}", got.len());
    let mut by_publisher = vec![Vec::new(); 2];
    for frame in &got {
        let (k, i) = numbered(frame);
        by_publisher[k].push(i);
    }
    for k in 0..2 {
        let seen = &by_publisher[k];
        // What the subscriber sees: one unbroken run of each publisher's messages, no
        // repeats, ending with the last accepted, starting no later than the first
        // accepted once A knew the new node.
        let first = seen[0];
        let run: Vec<usize> = (first..last[k]).collect();
        assert_eq!(seen, &run, "publisher {k}");
        assert!(
            first <= marks[k] + 1,
            "publisher {k} starts at {first}, mark {}",
            marks[k]
        );
    }
    // What was queued for the node that died is dropped, counted.
    let dropped = common::eventually(Duration::from_secs(15), || async {
        get(&a.url("/metrics"))
            .await
            .map(|r| {
                r.text()
                    .contains("pillion_broker_peer_queues_dropped_total 1")
            })
            .unwrap_or(false)
    })
    .await;
    assert!(dropped, "the dead node's queue is dropped and counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_and_sse_frames_name_the_topic_a_wildcard_matched() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let etcd = Server::etcd();
    let (a, b) = pair("embedded", &etcd.url());
    // websocat 'ws://B/broker?topic=events.todos.*'
    let mut ws = subscribe(&b, "topic=events.todos.*").await;
    // curl -N -H 'Accept: text/event-stream' 'http://B/broker?topic=events.>'
    let mut sse = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    sse.write_all(
        b"GET /broker?topic=events.> HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n",
    )
    .await
    .unwrap();
    wait_advertised(&a, "events.todos.*", 1).await;
    wait_advertised(&a, "events.>", 1).await;
    for (event, record) in [("created", r#"{"id":7}"#), ("removed", r#"{"id":7}"#)] {
        let reply = publish(&a, &format!("events.todos.{event}"), record, &[]).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    let got = receive(&mut ws, 2, Duration::from_secs(5)).await;
    let topics: Vec<&str> = got.iter().map(|f| f["Topic"].as_str().unwrap()).collect();
    assert_eq!(topics, ["events.todos.created", "events.todos.removed"]);
    assert_eq!(body(&got[0]), r#"{"id":7}"#);

    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while String::from_utf8_lossy(&seen).matches("data: ").count() < 2 {
        let n = tokio::time::timeout(Duration::from_secs(5), sse.read(&mut buf))
            .await
            .expect("the events did not arrive")
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&seen).to_string();
    let events: Vec<serde_json::Value> = text
        .split("data: ")
        .skip(1)
        .map(|d| serde_json::from_str(d.lines().next().unwrap()).unwrap())
        .collect();
    assert_eq!(events[0]["Topic"], "events.todos.created");
    assert_eq!(events[1]["Topic"], "events.todos.removed");
}

/// Opens a broker stream to `sc` by hand: the answer's head, and the connection.
async fn open_stream(sc: &Sidecar, node: &str, upgrade: bool) -> (String, tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(sc.addr).await.unwrap();
    let upgrade = if upgrade {
        "Connection: Upgrade\r\nUpgrade: pillion-broker/1\r\n"
    } else {
        ""
    };
    let head = format!(
        "GET /broker/deliver HTTP/1.1\r\nHost: 127.0.0.1\r\n{upgrade}Pillion-Broker-Node: {node}\r\nPillion-Broker-Stream: test.1\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 1];
    // Byte by byte, so nothing after the head is taken.
    while !seen.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
            .await
            .expect("no answer")
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&seen));
        seen.push(buf[0]);
    }
    (String::from_utf8(seen).unwrap(), tcp)
}

/// Everything the sidecar sends until it closes (within 5 s).
async fn read_to_close(tcp: &mut tokio::net::TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut out))
        .await
        .expect("the sidecar did not close the stream")
        .unwrap_or_default();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_peer_is_refused_and_the_sidecar_keeps_working() {
    use tokio::io::AsyncWriteExt;
    let sc = Sidecar::start(&[]);
    let mut ws = subscribe(&sc, "topic=foo").await;
    let node = common::node_ids(&sc, "pillion.broker").await.remove(0);

    // A stream for a node that is not this one (it restarted): 410, in the JSON shape.
    let (head, mut tcp) = open_stream(&sc, "broker-old", true).await;
    assert!(head.starts_with("HTTP/1.1 410"), "{head}");
    let _ = tcp.shutdown().await;
    // Without the upgrade: 426, saying what to send.
    let (head, _) = open_stream(&sc, &node, false).await;
    assert!(head.starts_with("HTTP/1.1 426"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("upgrade: pillion-broker/1"),
        "{head}"
    );

    // Garbage after the upgrade: an error reply naming the fault, then the close.
    let (head, mut tcp) = open_stream(&sc, &node, true).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    tcp.write_all(&[0, 0, 0, 3, 9, 9, 9]).await.unwrap();
    let reply = read_to_close(&mut tcp).await;
    assert_eq!(reply[0], 2, "an error reply: {reply:?}");
    assert!(
        String::from_utf8_lossy(&reply[3..]).contains("unknown frame kind 0x09"),
        "{}",
        String::from_utf8_lossy(&reply)
    );

    // A length over the limit is refused before its bytes arrive.
    let (_, mut tcp) = open_stream(&sc, &node, true).await;
    tcp.write_all(&[0xff, 0xff, 0xff, 0xff]).await.unwrap();
    let reply = read_to_close(&mut tcp).await;
    assert!(
        String::from_utf8_lossy(&reply).contains("over the limit"),
        "{}",
        String::from_utf8_lossy(&reply)
    );

    // A well-formed stream delivers and is acknowledged; the same message sent again
    // on a new connection of the same stream is skipped.
    let scope = pillion_broker::hub::Scope {
        plain: true,
        groups: Some(vec![]),
    };
    let message = pillion_broker::Message {
        body: bytes::Bytes::from_static(b"by hand"),
        ..Default::default()
    };
    let frame = pillion_broker::frame::encode_message("foo", &scope, &message)
        .unwrap()
        .with_seq(1);
    for _ in 0..2 {
        let (_, mut tcp) = open_stream(&sc, &node, true).await;
        tcp.write_all(&frame).await.unwrap();
        let mut ack = [0u8; 9];
        tokio::time::timeout(Duration::from_secs(5), {
            use tokio::io::AsyncReadExt;
            tcp.read_exact(&mut ack)
        })
        .await
        .expect("no ack")
        .unwrap();
        assert_eq!(ack, [1, 0, 0, 0, 0, 0, 0, 0, 1]);
    }
    let got = receive(&mut ws, 2, Duration::from_secs(2)).await;
    assert_eq!(got.len(), 1, "once: {got:?}");
    assert_eq!(body(&got[0]), "by hand");

    // The sidecar still publishes and delivers.
    assert_eq!(publish(&sc, "foo", "still here", &[]).await.status, 200);
    let got = receive(&mut ws, 1, Duration::from_secs(5)).await;
    assert_eq!(body(&got[0]), "still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_publish_on_a_receive_on_b_over_the_default_cluster_registry() {
    let bind = format!("127.0.0.1:{}", pillion_testkit::free_udp_port());
    let a = Sidecar::start(&["--cluster-bind", &bind]);
    let b = Sidecar::start(&["--cluster-bind", &bind]);
    let mut ws = subscribe(&b, "topic=gossiped").await;
    wait_advertised(&a, "gossiped", 1).await;
    let reply = publish(&a, "gossiped", "over gossip", &[]).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let got = receive(&mut ws, 1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1, "nothing crossed over the cluster registry");
    assert_eq!(body(&got[0]), "over gossip");
    assert_eq!(got[0]["Topic"], "gossiped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_with_an_api_token_stream_messages_to_each_other() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let token = "shared-api-token-0123456789";
    let auth = format!("Bearer {token}");
    let bind = format!("127.0.0.1:{}", pillion_testkit::free_udp_port());
    let args = ["--cluster-bind", bind.as_str(), "--api-token", token];
    let (a, b) = (Sidecar::start(&args), Sidecar::start(&args));
    let mut req = format!("ws://{}/broker?topic=secret", b.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", auth.parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    // Publish until the subscription is known on A (at-most-once before that).
    let mut got = Vec::new();
    for i in 0..50 {
        let reply = publish(&a, "secret", &format!("m{i}"), &[("authorization", &auth)]).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        got = receive(&mut ws, 1, Duration::from_millis(200)).await;
        if !got.is_empty() {
            break;
        }
    }
    assert_eq!(
        got.len(),
        1,
        "the stream between sidecars did not carry the token"
    );
    // Without the token, the stream's door stays shut to strangers.
    let stranger = request(
        http::Method::GET,
        &b.url("/broker/deliver"),
        &[("connection", "upgrade"), ("upgrade", "pillion-broker")],
        String::new(),
    )
    .await
    .unwrap();
    assert_eq!(stranger.status, 401, "{}", stranger.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_over_tls_carries_messages_and_an_unknown_ca_is_reported() {
    let nats = Server::nats_tls();
    assert!(nats.url().starts_with("tls://"), "{}", nats.url());
    let ca = nats.ca_file();
    let trusted = [("SSL_CERT_FILE", ca.to_str().unwrap())];
    let a = Sidecar::start_with_env(&["--broker", &nats.url()], &trusted);
    let b = Sidecar::start_with_env(&["--broker", &nats.url()], &trusted);
    let healthy = eventually(Duration::from_secs(10), || async {
        get(&a.url("/healthz")).await.unwrap().status == 200
    })
    .await;
    assert!(healthy, "the sidecar never connected to NATS over TLS");
    let mut ws = subscribe(&b, "topic=sealed").await;
    let mut got = Vec::new();
    for i in 0..50 {
        let reply = publish(&a, "sealed", &format!("m{i}"), &[]).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        got = receive(&mut ws, 1, Duration::from_millis(200)).await;
        if !got.is_empty() {
            break;
        }
    }
    assert_eq!(got.len(), 1, "nothing crossed NATS over TLS");
    // A sidecar that does not trust the server's CA never connects, and says so.
    let stranger = Sidecar::start(&["--broker", &nats.url()]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let health = get(&stranger.url("/healthz")).await.unwrap();
    assert_eq!(health.status, 503, "{}", health.text());
    assert!(health.text().contains("broker"), "{}", health.text());
}

/// A publishing websocket (`publish=1`) on `sc`, with `headers` on its upgrade.
async fn publisher(sc: &Sidecar, topic: &str, headers: &[(&str, &str)]) -> Socket {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{}/broker?topic={topic}&publish=1", sc.addr)
        .into_client_request()
        .unwrap();
    for (k, v) in headers {
        let name = http::HeaderName::from_bytes(k.as_bytes()).unwrap();
        req.headers_mut().insert(name, v.parse().unwrap());
    }
    let (ws, _) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_tungstenite::connect_async(req),
    )
    .await
    .expect("the upgrade within 5 s")
    .expect("a publishing websocket");
    ws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publishing_websocket_acknowledges_each_message_in_order() {
    use futures_util::SinkExt;
    let sc = Sidecar::start(&[]);
    let mut sub = subscribe(&sc, "topic=orders.new").await;
    let mut ws = publisher(&sc, "orders.new", &[("x-tenant", "acme")]).await;
    // 500 messages sent without waiting for any acknowledgement.
    for i in 0..500 {
        ws.feed(Ws::Text(format!("order {i}").into()))
            .await
            .unwrap();
    }
    ws.flush().await.unwrap();
    let acks = receive(&mut ws, 500, Duration::from_secs(10)).await;
    let seqs: Vec<u64> = acks.iter().map(|a| a["seq"].as_u64().unwrap()).collect();
    assert_eq!(
        seqs,
        (1..=500).collect::<Vec<_>>(),
        "one acknowledgement each, in order"
    );
    assert!(
        acks.iter().all(|a| a["status"] == 200),
        "{:?}",
        acks.iter().find(|a| a["status"] != 200)
    );
    // Each reached the subscriber, in the order sent, with the upgrade's headers.
    let got = receive(&mut sub, 500, Duration::from_secs(10)).await;
    let bodies: Vec<String> = got.iter().map(body).collect();
    assert_eq!(
        bodies,
        (0..500).map(|i| format!("order {i}")).collect::<Vec<_>>()
    );
    assert_eq!(got[0]["Header"]["X-Tenant"], "acme");
    assert!(
        got[0]["Header"].get("Sec-Websocket-Key").is_none(),
        "{}",
        got[0]["Header"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publishing_websocket_reports_what_it_could_not_take() {
    use futures_util::SinkExt;
    let mut nats = Server::nats();
    let sc = Sidecar::start(&["--broker", &nats.url(), "--broker-max-message-size", "1KiB"]);
    let mut sub = subscribe(&sc, "topic=ticks").await;

    // Refused before the upgrade: a wildcard topic, a bad flag value, no websocket.
    for (query, says) in [
        ("topic=ticks.*&publish=1", "wildcard"),
        ("topic=ticks&publish=maybe", "publish=1"),
    ] {
        let reply = get(&sc.url(&format!("/broker?{query}"))).await.unwrap();
        assert_eq!(reply.status, 400, "{query}: {}", reply.text());
        assert!(reply.text().contains(says), "{query}: {}", reply.text());
    }
    let reply = get(&sc.url("/broker?topic=ticks&publish=1")).await.unwrap();
    assert_eq!(reply.status, 400);
    assert!(
        reply.json()["detail"].as_str().unwrap().contains("POST"),
        "{}",
        reply.text()
    );

    // NATS away: that message is refused with 503, the connection stays, and the
    // next one after NATS is back is taken.
    let mut ws = publisher(&sc, "ticks", &[]).await;
    ws.send(Ws::Text("before".into())).await.unwrap();
    assert_eq!(
        receive(&mut ws, 1, Duration::from_secs(5)).await[0]["status"],
        200
    );
    // Core NATS is at most once: a 200 means NATS was handed the message, so it
    // must reach the subscriber before NATS is killed under it.
    let first = receive(&mut sub, 1, Duration::from_secs(5)).await;
    assert_eq!(first.iter().map(body).collect::<Vec<_>>(), ["before"]);
    nats.kill();
    ws.send(Ws::Text("during".into())).await.unwrap();
    let refused = &receive(&mut ws, 1, Duration::from_secs(10)).await[0];
    assert_eq!(
        (refused["seq"].as_u64(), refused["status"].as_u64()),
        (Some(2), Some(503)),
        "{refused}"
    );
    assert_eq!(refused["id"], "pillion.broker");
    assert!(
        refused["detail"].as_str().unwrap().contains("unavailable"),
        "{refused}"
    );
    nats.restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let mut taken = false;
    while !taken && std::time::Instant::now() < deadline {
        ws.send(Ws::Text("after".into())).await.unwrap();
        let ack = receive(&mut ws, 1, Duration::from_secs(5)).await;
        taken = ack.first().is_some_and(|a| a["status"] == 200);
        if !taken {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    assert!(
        taken,
        "publishing resumes on the same websocket once NATS is back"
    );
    let bodies: Vec<String> = receive(&mut sub, 2, Duration::from_secs(3))
        .await
        .iter()
        .map(body)
        .collect();
    assert!(
        bodies.ends_with(&["after".to_string()]) && !bodies.contains(&"during".to_string()),
        "{bodies:?}"
    );

    // Over --broker-max-message-size: refused by number, then the socket is closed;
    // what came before it was taken.
    let mut ws = publisher(&sc, "ticks", &[]).await;
    ws.send(Ws::Text("small".into())).await.unwrap();
    ws.send(Ws::Binary(vec![b'x'; 4096].into())).await.unwrap();
    let acks = receive(&mut ws, 2, Duration::from_secs(5)).await;
    assert_eq!(acks.len(), 2, "{acks:?}");
    assert_eq!(acks[0]["status"], 200);
    assert_eq!(
        (acks[1]["seq"].as_u64(), acks[1]["status"].as_u64()),
        (Some(2), Some(413)),
        "{}",
        acks[1]
    );
    assert!(
        acks[1]["detail"]
            .as_str()
            .unwrap()
            .contains("--broker-max-message-size"),
        "{}",
        acks[1]
    );
    let closed = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap();
    assert!(
        matches!(closed, Some(Ok(Ws::Close(_))) | None | Some(Err(_))),
        "{closed:?}"
    );
}

/// go-micro's `broker.Message` through Go's own encoding/json
/// (`tests/gomicro/broker_message.go`): `encode HEADER BODY` or `decode JSON`.
fn go_broker_message(args: &[&str]) -> String {
    const PROGRAM: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/gomicro/broker_message.go"
    );
    common::go_run(PROGRAM, args)
}

/// go-micro services on the same NATS (`--broker-format go-micro`): what pillion
/// publishes reaches a subscriber that reads go-micro's envelope, and what a go-micro
/// publisher sends reaches pillion's subscribers with its header and body. The
/// envelope is made and read by Go's encoding/json with go-micro's type
/// (`tests/gomicro/broker_message.go`), carried by nats-py (`tests/gomicro/nats_peer.py`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_micro_services_on_the_same_nats_share_topics_both_ways() {
    use std::io::BufRead;
    const PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/gomicro/nats_peer.py");
    let probe = std::process::Command::new("python3")
        .args(["-c", "import nats"])
        .output();
    assert!(
        probe.as_ref().is_ok_and(|o| o.status.success()),
        "python3 with nats-py is needed ({probe:?}): `python3 -m pip install nats-py` (scripts/test does it)"
    );
    let nats = Server::nats();
    let url = format!("nats://{}", nats.addr());
    let sc = Sidecar::start(&["--broker", &url, "--broker-format", "go-micro"]);

    // pillion -> a go-micro subscriber.
    let mut sub = std::process::Command::new("python3")
        .args([PEER, "sub", &url, "go.micro.topic.greeting"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(sub.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "subscribed");
    let reply = publish(
        &sc,
        "go.micro.topic.greeting",
        "hello go",
        &[("x-trace", "t1")],
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let payload = lines.next().unwrap().unwrap();
    let got: serde_json::Value =
        serde_json::from_str(&go_broker_message(&["decode", &payload])).unwrap();
    assert_eq!(got["Body"], "hello go", "{got}");
    assert_eq!(got["Header"]["X-Trace"], "t1", "{got}");
    let _ = sub.wait();

    // A go-micro publisher -> pillion's subscriber.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!(
        "ws://{}/broker?topic=go.micro.topic.reply",
        sc.addr
    ))
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let payload = go_broker_message(&["encode", r#"{"Micro-From":"go"}"#, "hi from go"]);
    let out = std::process::Command::new("python3")
        .args([PEER, "pub", &url, "go.micro.topic.reply", &payload])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = receive(&mut ws, 1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1, "nothing arrived from the go-micro publisher");
    assert_eq!(body(&got[0]), "hi from go");
    assert_eq!(got[0]["Header"]["Micro-From"], "go", "{}", got[0]);

    // Only with NATS.
    let (code, _, err) = common::run_to_end(&["run", "--broker-format", "go-micro"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("needs --broker nats://"), "{err}");
}
