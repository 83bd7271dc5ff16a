//! Load generator for `bench/broker.sh`: publishes timestamped messages with
//! `CONCURRENCY` publishers for `SECONDS` and one subscriber receives them; prints
//! messages/s received and publish-to-receive latency percentiles as one JSON line.
//!
//!   broker_load sidecar 127.0.0.1:8081 [CONCURRENCY] [SECONDS]
//!   broker_load nats nats://127.0.0.1:4222 [CONCURRENCY] [SECONDS]
//!   broker_load across A B[,B...] [CONCURRENCY] [SECONDS]
//!   broker_load ws 127.0.0.1:8081 [WINDOW] [SECONDS]
//!   broker_load nats-stream nats://127.0.0.1:4222 [WINDOW] [SECONDS]
//!
//! `ws` publishes over one websocket (`/broker?topic=T&publish=1`) with up to WINDOW
//! messages not yet acknowledged, counting a message once its acknowledgement says
//! 200; `nats-stream` is the same on one NATS connection, flushing every WINDOW
//! messages (as `nats bench` publishes).
//!
//! `across` publishes on sidecar A and subscribes on each sidecar B (embedded broker,
//! shared registry): it waits until A sees every B's subscription, and at the end
//! until every message arrived (or 5 s pass without one); `received` counts them over
//! all the subscribers, `expected` is `published` times their number.
//!
//! Each publisher waits for its publish to be accepted before the next (an HTTP
//! answer from the sidecar; a flush from nats-server when used directly), so both
//! paths carry the same closed-loop load.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::StreamExt;
use pillion_http::pool::Outgoing;

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1e6
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (mode, target) = (args[1].clone(), args[2].clone());
    let concurrency: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(8);
    let seconds: u64 = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(4);
    let topic = "bench.load";
    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));

    // The subscriber.
    let (lat_tx, mut lat_rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let nats = if mode.starts_with("nats") {
        Some(
            async_nats::connect(target.as_str())
                .await
                .expect("connect to nats"),
        )
    } else {
        None
    };
    let subscribe_on: Vec<String> = match mode.as_str() {
        "across" => args[2].split(',').map(str::to_string).collect(),
        _ => vec![target.clone()],
    };
    let (target, subscribe_on) = if mode == "across" {
        let mut all = subscribe_on;
        (all.remove(0), all)
    } else {
        (target, subscribe_on)
    };
    let mut subscribers = Vec::new();
    if let Some(client) = &nats {
        let mut sub = client.subscribe(topic).await.unwrap();
        client.flush().await.unwrap();
        subscribers.push(tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                let sent: u64 = std::str::from_utf8(&m.payload).unwrap().parse().unwrap();
                let _ = lat_tx.send(now_ns().saturating_sub(sent));
            }
        }));
    } else {
        for on in &subscribe_on {
            let url = format!("ws://{on}/broker?topic={topic}");
            let (mut ws, _) = tokio_tungstenite::connect_async(url)
                .await
                .expect("websocket");
            let lat_tx = lat_tx.clone();
            subscribers.push(tokio::spawn(async move {
                while let Some(frame) = ws.next().await {
                    let frame = match frame {
                        Ok(f) => f,
                        Err(e) => {
                            eprintln!("subscriber: {e}");
                            break;
                        }
                    };
                    if let tokio_tungstenite::tungstenite::Message::Close(c) = &frame {
                        eprintln!("subscriber closed: {c:?}");
                    }
                    if let tokio_tungstenite::tungstenite::Message::Text(t) = frame {
                        let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                        use base64::Engine;
                        let body = base64::engine::general_purpose::STANDARD
                            .decode(v["Body"].as_str().unwrap())
                            .unwrap();
                        let sent: u64 = std::str::from_utf8(&body).unwrap().parse().unwrap();
                        let _ = lat_tx.send(now_ns().saturating_sub(sent));
                    }
                }
            }));
        }
        drop(lat_tx);
    }
    if mode == "across" {
        wait_advertised(&target, topic, subscribe_on.len()).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The publishers.
    let started = Instant::now();
    let mut publishers = Vec::new();
    match mode.as_str() {
        "ws" => publishers.push(tokio::spawn(publish_over_websocket(
            target.clone(),
            topic,
            concurrency,
            stop.clone(),
            published.clone(),
            refused.clone(),
        ))),
        "nats-stream" => {
            let client = nats.clone().unwrap();
            let (stop, published) = (stop.clone(), published.clone());
            publishers.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..concurrency {
                        client
                            .publish(topic, Bytes::from(now_ns().to_string()))
                            .await
                            .unwrap();
                    }
                    client.flush().await.unwrap();
                    published.fetch_add(concurrency as u64, Ordering::Relaxed);
                }
            }));
        }
        _ => {}
    }
    let closed_loop = !matches!(mode.as_str(), "ws" | "nats-stream");
    for _ in 0..if closed_loop { concurrency } else { 0 } {
        let stop = stop.clone();
        let published = published.clone();
        let refused = refused.clone();
        let nats = nats.clone();
        let target = target.clone();
        publishers.push(tokio::spawn(async move {
            let client = pillion_http::Client::new(Default::default(), Duration::from_secs(1));
            let url: http::Uri = format!("http://{target}/broker?topic={topic}")
                .parse()
                .unwrap();
            while !stop.load(Ordering::Relaxed) {
                let body = Bytes::from(now_ns().to_string());
                match &nats {
                    Some(c) => {
                        c.publish(topic, body).await.unwrap();
                        c.flush().await.unwrap();
                    }
                    None => {
                        let req = http::Request::post(url.clone())
                            .body(Outgoing::full(body))
                            .unwrap();
                        let (status, body) = client
                            .fetch(req, Duration::from_secs(10))
                            .await
                            .expect("publish");
                        if !status.is_success() {
                            if refused.fetch_add(1, Ordering::Relaxed) == 0 {
                                eprintln!(
                                    "publish answered {status}: {}",
                                    String::from_utf8_lossy(&body)
                                );
                            }
                            continue;
                        }
                    }
                }
                published.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for p in publishers {
        let _ = p.await;
    }
    let elapsed = started.elapsed();
    let expected = published.load(Ordering::Relaxed) * subscribe_on.len().max(1) as u64;
    let mut latencies = Vec::new();
    // Until every message arrived, or none came for the quiet period.
    let quiet = if mode == "across" {
        Duration::from_secs(5)
    } else {
        Duration::from_millis(500)
    };
    while (latencies.len() as u64) < expected {
        match tokio::time::timeout(quiet, lat_rx.recv()).await {
            Ok(Some(l)) => latencies.push(l),
            _ => break,
        }
    }
    for s in subscribers {
        s.abort();
    }
    while let Ok(l) = lat_rx.try_recv() {
        latencies.push(l);
    }
    latencies.sort_unstable();
    let received = latencies.len() as f64;
    let accepted = published.load(Ordering::Relaxed) as f64;
    println!(
        "{}",
        serde_json::json!({
            "published": published.load(Ordering::Relaxed),
            "refused": refused.load(Ordering::Relaxed),
            "received": latencies.len(),
            "expected": expected,
            "accepted_per_sec": accepted / elapsed.as_secs_f64(),
            "msgs_per_sec": received / elapsed.as_secs_f64(),
            "p50_ms": percentile(&latencies, 0.50),
            "p99_ms": percentile(&latencies, 0.99),
        })
    );
}

/// One publishing websocket with up to `window` messages unacknowledged.
async fn publish_over_websocket(
    target: String,
    topic: &'static str,
    window: usize,
    stop: Arc<AtomicBool>,
    published: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
) {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message as Ws;
    let url = format!("ws://{target}/broker?topic={topic}&publish=1");
    let (ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("publishing websocket");
    let (mut tx, mut rx) = ws.split();
    let credit = Arc::new(tokio::sync::Semaphore::new(window));
    let acks = {
        let credit = credit.clone();
        tokio::spawn(async move {
            while let Some(Ok(frame)) = rx.next().await {
                let Ws::Text(t) = frame else { continue };
                let ack: serde_json::Value = serde_json::from_str(&t).unwrap();
                if ack["status"] == 200 {
                    published.fetch_add(1, Ordering::Relaxed);
                } else if refused.fetch_add(1, Ordering::Relaxed) == 0 {
                    eprintln!("publish refused: {t}");
                }
                credit.add_permits(1);
            }
        })
    };
    while !stop.load(Ordering::Relaxed) {
        let permit = match credit.try_acquire() {
            Ok(p) => p,
            Err(_) => {
                tx.flush().await.unwrap();
                credit.acquire().await.unwrap()
            }
        };
        permit.forget();
        tx.feed(Ws::Text(now_ns().to_string().into()))
            .await
            .unwrap();
    }
    tx.flush().await.unwrap();
    // The acknowledgements of what is in flight, for up to 5 s.
    let _ = tokio::time::timeout(Duration::from_secs(5), credit.acquire_many(window as u32)).await;
    acks.abort();
}

/// Waits until sidecar `at` shows `n` broker nodes subscribed to `topic`.
async fn wait_advertised(at: &str, topic: &str, n: usize) {
    let client = pillion_http::Client::new(Default::default(), Duration::from_secs(1));
    for _ in 0..200 {
        let req = http::Request::get(format!("http://{at}/registry?service=pillion.broker"))
            .body(Outgoing::full(Bytes::new()))
            .unwrap();
        if let Ok((status, body)) = client.fetch(req, Duration::from_secs(2)).await {
            if status.is_success() {
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                let seen = v[0]["nodes"]
                    .as_array()
                    .map(|nodes| {
                        nodes
                            .iter()
                            .filter(|n| {
                                n["metadata"]["subscriptions"]
                                    .as_str()
                                    .is_some_and(|s| s.contains(topic))
                            })
                            .count()
                    })
                    .unwrap_or(0);
                if seen >= n {
                    return;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{at} does not see {n} subscribers to {topic}");
}
