//! The stream between two embedded brokers, in one process over real sockets: a cut
//! in the middle loses and repeats nothing, a full queue makes the publisher wait and
//! then refuses it, a sidecar that leaves the registry has its queue dropped. A
//! subscribe returns once other sidecars can find it (or is refused, saying why), and
//! a closed broker leaves no task behind.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pillion_broker::api::{ApiConfig, BrokerApi};
use pillion_broker::embedded::EmbeddedBroker;
use pillion_broker::link::LinkSettings;
use pillion_broker::metrics::BrokerMetrics;
use pillion_broker::{Broker, BrokerError, Message, Subscription};
use pillion_core::Service;
use pillion_registry::{BackendStatus, Catalog, Registry, RegistryError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn message(body: String) -> Message {
    Message {
        body: Bytes::from(body),
        ..Message::default()
    }
}

/// Serves `broker`'s API (where other sidecars open their streams) on `listener`.
fn serve(broker: Arc<EmbeddedBroker>, metrics: Arc<BrokerMetrics>, listener: TcpListener) {
    let api = Arc::new(BrokerApi {
        broker: broker.clone(),
        embedded: Some(broker),
        config: ApiConfig::default(),
        metrics,
        stopping: Default::default(),
        sockets: Default::default(),
    });
    let router = pillion_broker::api::router(api);
    tokio::spawn(async move { axum::serve(listener, router).await });
}

/// A broker advertising `advertise`, with its own metrics.
fn broker(
    registry: &Arc<dyn Registry>,
    advertise: SocketAddr,
    settings: LinkSettings,
) -> (Arc<EmbeddedBroker>, Arc<BrokerMetrics>) {
    let metrics = Arc::new(BrokerMetrics::default());
    let b = EmbeddedBroker::with_settings(
        registry.clone(),
        advertise.to_string(),
        metrics.clone(),
        settings,
    );
    (b, metrics)
}

/// Sidecar B serving its streams (registered through `b_registry`), and sidecar A
/// that publishes to it (through `a_registry`), with the default link settings.
async fn receiver_and_publisher(
    b_registry: &Arc<dyn Registry>,
    a_registry: &Arc<dyn Registry>,
) -> (Arc<EmbeddedBroker>, Arc<EmbeddedBroker>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (b, b_metrics) = broker(
        b_registry,
        listener.local_addr().unwrap(),
        LinkSettings::default(),
    );
    serve(b.clone(), b_metrics, listener);
    let (a, _) = broker(
        a_registry,
        "127.0.0.1:1".parse().unwrap(),
        LinkSettings::default(),
    );
    (b, a)
}

fn metric(metrics: &BrokerMetrics, line: &str) -> bool {
    let mut out = String::new();
    metrics.render(&mut out);
    out.lines().any(|l| l == line)
}

async fn eventually(limit: Duration, mut probe: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if probe() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    probe()
}

async fn receive(sub: &mut Subscription, n: usize, quiet: Duration) -> Vec<String> {
    let mut got = Vec::new();
    while got.len() < n {
        match tokio::time::timeout(quiet, sub.next()).await {
            Ok(Some(d)) => got.push(String::from_utf8_lossy(&d.message.body).into_owned()),
            _ => break,
        }
    }
    got
}

/// Every `p{k}-{i}` of `publishers` x `each`, once, and in order per publisher.
fn assert_complete_in_order(got: &[String], publishers: usize, each: usize) {
    let mut by_publisher: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for body in got {
        let (k, i) = body[1..].split_once('-').unwrap();
        by_publisher
            .entry(k.parse().unwrap())
            .or_default()
            .push(i.parse().unwrap());
    }
    for k in 0..publishers {
        let seen = by_publisher.remove(&k).unwrap_or_default();
        let want: Vec<usize> = (0..each).collect();
        assert!(
            seen == want,
            "publisher {k}: {} of {each} messages, first differences: {:?}",
            seen.len(),
            seen.iter()
                .zip(want.iter())
                .filter(|(a, b)| a != b)
                .take(5)
                .collect::<Vec<_>>()
        );
    }
}

/// A TCP relay that a test can cut: every connection through it is closed at once.
/// While `hold_replies` is set, what the far side answers is read and discarded.
struct Relay {
    addr: SocketAddr,
    forwarded: Arc<AtomicU64>,
    hold_replies: Arc<AtomicBool>,
    cut: tokio::sync::watch::Sender<u64>,
}

impl Relay {
    async fn start(to: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let forwarded = Arc::new(AtomicU64::new(0));
        let hold_replies = Arc::new(AtomicBool::new(false));
        let (cut, cuts) = tokio::sync::watch::channel(0u64);
        let (f, h) = (forwarded.clone(), hold_replies.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(to).await else {
                    continue;
                };
                let mut cuts = cuts.clone();
                cuts.borrow_and_update();
                let (f, h) = (f.clone(), h.clone());
                tokio::spawn(async move {
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = async {
                        let mut buf = vec![0u8; 16 << 10];
                        while let Ok(n) = cr.read(&mut buf).await {
                            if n == 0 || sw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                            f.fetch_add(n as u64, Ordering::SeqCst);
                        }
                    };
                    let down = async {
                        let mut buf = vec![0u8; 16 << 10];
                        // The upgrade answer always passes; what follows may be held.
                        let mut answered = false;
                        while let Ok(n) = sr.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                            if answered && h.load(Ordering::SeqCst) {
                                continue;
                            }
                            answered = true;
                            if cw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    };
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                        _ = cuts.changed() => {}
                    }
                });
            }
        });
        Relay {
            addr,
            forwarded,
            hold_replies,
            cut,
        }
    }

    fn cut(&self) {
        self.cut.send_modify(|n| *n += 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_mid_flight_is_resumed_without_loss_or_duplicates() {
    let registry = pillion_registry::open("memory", &Default::default())
        .await
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay = Relay::start(listener.local_addr().unwrap()).await;
    // The receiver is reached through the relay.
    let (b, b_metrics) = broker(&registry, relay.addr, LinkSettings::default());
    serve(b.clone(), b_metrics.clone(), listener);
    let (a, _) = broker(
        &registry,
        "127.0.0.1:1".parse().unwrap(),
        LinkSettings::default(),
    );
    let mut sub = b.subscribe("orders.new", None, 100_000).await.unwrap();

    // The receiver's acks do not reach the sender: everything it delivered before the
    // cut is sent again after it.
    relay.hold_replies.store(true, Ordering::SeqCst);
    let (publishers, each) = (4, 2000);
    let tasks: Vec<_> = (0..publishers)
        .map(|k| {
            let a = a.clone();
            tokio::spawn(async move {
                for i in 0..each {
                    a.publish("orders.new", message(format!("p{k}-{i}")))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    assert!(
        eventually(Duration::from_secs(10), || relay
            .forwarded
            .load(Ordering::SeqCst)
            > 50_000)
        .await,
        "frames flow through the relay"
    );
    relay.hold_replies.store(false, Ordering::SeqCst);
    relay.cut();
    for t in tasks {
        t.await.unwrap();
    }
    let got = receive(&mut sub, publishers * each, Duration::from_secs(10)).await;
    assert_complete_in_order(&got, publishers, each);
    assert!(
        receive(&mut sub, 1, Duration::from_millis(300))
            .await
            .is_empty(),
        "nothing more"
    );
    let mut out = String::new();
    b_metrics.render(&mut out);
    let skipped: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("pillion_broker_peer_duplicates_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        skipped > 0,
        "the resent messages were skipped by the receiver:\n{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_makes_the_publisher_wait_then_refuses_naming_the_sidecar() {
    let registry = pillion_registry::open("memory", &Default::default())
        .await
        .unwrap();
    // The receiver's address, where nothing listens yet.
    let spot = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let b_addr = spot.local_addr().unwrap();
    drop(spot);
    let (b, b_metrics) = broker(&registry, b_addr, LinkSettings::default());
    let mut sub = b.subscribe("orders.new", None, 1000).await.unwrap();
    let small = LinkSettings {
        queue_bytes: 4096,
        publish_wait: Duration::from_millis(300),
        ..LinkSettings::default()
    };
    let (a, _) = broker(&registry, "127.0.0.1:1".parse().unwrap(), small);

    let mut accepted = 0;
    let refusal = loop {
        let body = format!("{accepted:03}{}", "x".repeat(200));
        match a.publish("orders.new", message(body)).await {
            Ok(()) => accepted += 1,
            Err(e) => break e,
        }
        assert!(accepted < 100, "the queue of 4 KiB never filled");
    };
    let BrokerError::Unavailable { detail, .. } = &refusal else {
        panic!("{refusal:?}");
    };
    assert!(detail.contains(&b_addr.to_string()), "{detail}");
    assert!(detail.contains("nothing was published"), "{detail}");
    assert!(
        accepted > 5,
        "{accepted} accepted before the queue was full"
    );

    // The receiver comes up: everything accepted arrives, in order; the refused one
    // does not.
    let listener = pillion_testkit::process::rebind(b_addr).await;
    serve(b.clone(), b_metrics, listener);
    let got = receive(&mut sub, accepted + 1, Duration::from_secs(5)).await;
    let want: Vec<String> = (0..accepted).map(|i| format!("{i:03}")).collect();
    assert_eq!(
        got.iter().map(|b| b[..3].to_string()).collect::<Vec<_>>(),
        want
    );
    a.publish("orders.new", message("after".into()))
        .await
        .unwrap();
    assert_eq!(
        receive(&mut sub, 1, Duration::from_secs(5)).await,
        ["after"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_that_leaves_the_registry_has_its_queue_dropped_and_counted() {
    let registry = pillion_registry::open("memory", &Default::default())
        .await
        .unwrap();
    let spot = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let b_addr = spot.local_addr().unwrap();
    drop(spot);
    let (b, _) = broker(&registry, b_addr, LinkSettings::default());
    let sub = b.subscribe("orders.new", None, 1000).await.unwrap();
    let quick = LinkSettings {
        absent_grace: Duration::from_millis(200),
        ..LinkSettings::default()
    };
    let (a, a_metrics) = broker(&registry, "127.0.0.1:1".parse().unwrap(), quick);
    for i in 0..5 {
        a.publish("orders.new", message(format!("m{i}")))
            .await
            .unwrap();
    }
    // Its last subscriber leaves: it deregisters, with 5 messages queued for it.
    drop(sub);
    assert!(
        eventually(Duration::from_secs(5), || metric(
            &a_metrics,
            "pillion_broker_peer_queues_dropped_total 1"
        ))
        .await,
        "the queue was dropped"
    );
    assert!(metric(
        &a_metrics,
        "pillion_broker_dropped_total{topic=\"orders.new\"} 5"
    ));
}

/// A registry in front of another that takes a second to register (an etcd far
/// away), or that refuses every registration (an etcd down).
struct Distant {
    near: Arc<dyn Registry>,
    refuses: bool,
}

#[async_trait::async_trait]
impl Registry for Distant {
    async fn register(
        &self,
        service: &Service,
        ttl: Option<Duration>,
    ) -> Result<(), RegistryError> {
        if self.refuses {
            return Err(RegistryError::Unavailable {
                backend: "etcd://10.0.0.9:2379".into(),
                detail: "connection refused".into(),
            });
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        self.near.register(service, ttl).await
    }

    async fn deregister(&self, service: &Service) -> Result<usize, RegistryError> {
        self.near.deregister(service).await
    }

    fn catalog(&self) -> Arc<Catalog> {
        self.near.catalog()
    }

    fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.near.changes()
    }

    fn status(&self) -> BackendStatus {
        self.near.status()
    }

    async fn close(&self) {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_published_elsewhere_right_after_subscribe_returns_is_delivered() {
    let registry = pillion_registry::open("memory", &Default::default())
        .await
        .unwrap();
    let distant: Arc<dyn Registry> = Arc::new(Distant {
        near: registry.clone(),
        refuses: false,
    });
    let (b, a) = receiver_and_publisher(&distant, &registry).await;

    // B's registration takes a second; subscribe returns only once it is in.
    let mut sub = b.subscribe("orders.new", None, 100).await.unwrap();
    a.publish("orders.new", message("right after".into()))
        .await
        .unwrap();
    assert_eq!(
        receive(&mut sub, 1, Duration::from_secs(10)).await,
        ["right after"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_the_registry_never_shows_is_refused_saying_why() {
    let registry = pillion_registry::open("memory", &Default::default())
        .await
        .unwrap();
    let down: Arc<dyn Registry> = Arc::new(Distant {
        near: registry.clone(),
        refuses: true,
    });
    let settings = LinkSettings {
        advertise_wait: Duration::from_millis(300),
        ..LinkSettings::default()
    };
    let (b, b_metrics) = broker(&down, "127.0.0.1:1".parse().unwrap(), settings);
    let refusal = match b.subscribe("orders.new", Some("billing"), 100).await {
        Ok(_) => panic!("subscribed although the registry never showed it"),
        Err(e) => e,
    };
    let BrokerError::Unavailable { detail, .. } = &refusal else {
        panic!("{refusal:?}");
    };
    assert!(
        detail.contains("the registry did not show this sidecar's subscription to \"orders.new\" (queue group \"billing\")"),
        "{detail}"
    );
    assert!(detail.contains("connection refused"), "{detail}");
    assert!(detail.contains("nothing was subscribed"), "{detail}");
    // Nothing was subscribed: a local publish reaches no one.
    b.publish("orders.new", message("to no one".into()))
        .await
        .unwrap();
    assert!(metric(
        &b_metrics,
        "pillion_broker_delivered_total{topic=\"orders.new\"} 0"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_broker_leaves_no_task_running() {
    let registry = pillion_registry::open("memory", &Default::default())
        .await
        .unwrap();
    let (b, a) = receiver_and_publisher(&registry, &registry).await;
    let mut sub = b.subscribe("orders.new", None, 100).await.unwrap();
    for i in 0..10 {
        a.publish("orders.new", message(format!("m{i}")))
            .await
            .unwrap();
    }
    assert_eq!(
        receive(&mut sub, 10, Duration::from_secs(10)).await.len(),
        10
    );
    // The advertisers, the sweepers, A's link to B and B's stream from A.
    assert!(a.running_tasks() >= 3, "{}", a.running_tasks());
    assert!(b.running_tasks() >= 3, "{}", b.running_tasks());

    a.close().await;
    assert_eq!(a.running_tasks(), 0, "tasks of A run after its close");
    b.close().await;
    assert_eq!(b.running_tasks(), 0, "tasks of B run after its close");
    // B left the registry.
    assert!(registry
        .catalog()
        .get(pillion_broker::embedded::SERVICE)
        .unwrap_or_default()
        .is_empty());
}
