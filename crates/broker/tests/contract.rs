//! The broker contract, run against the embedded broker and a real nats-server.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pillion_broker::metrics::BrokerMetrics;
use pillion_broker::{Broker, Message, NatsSettings, Subscription};
use pillion_testkit::Server;

fn message(body: String) -> Message {
    let mut m = Message {
        body: Bytes::from(body),
        ..Message::default()
    };
    m.header.insert("Timestamp".into(), "1499951537".into());
    m
}

async fn drain(sub: &mut Subscription, limit: Duration) -> Vec<String> {
    let mut got = Vec::new();
    while let Ok(Some(d)) = tokio::time::timeout(limit, sub.next()).await {
        got.push(String::from_utf8_lossy(&d.message.body).into_owned());
        d.ack().await;
    }
    got
}

async fn contract(broker: Arc<dyn Broker>) {
    broker
        .publish("nobody.listens", message("lost".into()))
        .await
        .unwrap();

    let mut plain_a = broker.subscribe("orders.new", None, 2000).await.unwrap();
    let mut plain_b = broker.subscribe("orders.*", None, 2000).await.unwrap();
    let mut worker_1 = broker
        .subscribe("orders.new", Some("workers"), 2000)
        .await
        .unwrap();
    let mut worker_2 = broker
        .subscribe("orders.new", Some("workers"), 2000)
        .await
        .unwrap();

    for i in 0..1000 {
        broker
            .publish("orders.new", message(format!("m{i}")))
            .await
            .unwrap();
    }
    broker
        .publish("orders.other", message("other".into()))
        .await
        .unwrap();

    let wait = Duration::from_millis(500);
    let a = drain(&mut plain_a, wait).await;
    let b = drain(&mut plain_b, wait).await;
    let w1 = drain(&mut worker_1, wait).await;
    let w2 = drain(&mut worker_2, wait).await;
    let expected: Vec<String> = (0..1000).map(|i| format!("m{i}")).collect();
    assert_eq!(
        a, expected,
        "a plain subscriber gets every message, in order"
    );
    assert_eq!(
        b.len(),
        1001,
        "a wildcard subscriber gets the other topic too"
    );
    assert_eq!(b.last().unwrap(), "other");
    assert_eq!(
        w1.len() + w2.len(),
        1000,
        "a queue group gets each message once in total"
    );
    let together: BTreeSet<&String> = w1.iter().chain(w2.iter()).collect();
    assert_eq!(together.len(), 1000, "no message twice");
    assert!(
        !w1.is_empty() && !w2.is_empty(),
        "both members get a share: {} / {}",
        w1.len(),
        w2.len()
    );

    // Headers travel with the message.
    let mut sub = broker.subscribe("headers.test", None, 10).await.unwrap();
    broker
        .publish("headers.test", message("h".into()))
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d.message.header["Timestamp"], "1499951537");
    assert_eq!(d.topic, "headers.test");

    // Many at once: one result each, delivered in order.
    let mut batch = broker.subscribe("batch.test", None, 1000).await.unwrap();
    let results = broker
        .publish_many(
            "batch.test",
            (0..300).map(|i| message(format!("b{i}"))).collect(),
        )
        .await;
    assert_eq!(results.len(), 300);
    assert!(
        results.iter().all(Result::is_ok),
        "{:?}",
        results.iter().find(|r| r.is_err())
    );
    let expected: Vec<String> = (0..300).map(|i| format!("b{i}")).collect();
    assert_eq!(drain(&mut batch, wait).await, expected);

    // Unsubscribing (dropping) stops delivery without disturbing others.
    drop(plain_a);
    broker
        .publish("orders.new", message("after".into()))
        .await
        .unwrap();
    assert_eq!(drain(&mut plain_b, wait).await, ["after"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_passes_the_contract() {
    let registry = pillion_registry::open("memory", &Default::default())
        .await
        .unwrap();
    let broker = pillion_broker::embedded::EmbeddedBroker::new(
        registry,
        "127.0.0.1:1".into(),
        Arc::new(BrokerMetrics::default()),
    );
    assert_eq!(broker.backend(), "embedded");
    contract(broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_broker_passes_the_contract() {
    let nats = Server::nats();
    let broker = pillion_broker::nats::NatsBroker::connect(
        &nats.url(),
        NatsSettings::default(),
        Arc::new(BrokerMetrics::default()),
    )
    .await
    .unwrap();
    contract(broker).await;
}

/// go-micro's envelope on NATS keeps every promise of the contract too, durable
/// topics included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_broker_in_go_micro_s_format_passes_the_contract() {
    let nats = Server::nats();
    let broker = pillion_broker::nats::NatsBroker::connect(
        &nats.url(),
        NatsSettings {
            go_micro: true,
            ..durable_settings(5)
        },
        Arc::new(BrokerMetrics::default()),
    )
    .await
    .unwrap();
    contract(broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_durable_messages_at_once_are_each_stored_in_order_or_each_refused() {
    let mut nats = Server::nats();
    let broker = pillion_broker::nats::NatsBroker::connect(
        &nats.url(),
        durable_settings(5),
        Arc::new(BrokerMetrics::default()),
    )
    .await
    .unwrap();
    let mut sub = broker
        .subscribe("orders.new", Some("workers"), 500)
        .await
        .unwrap();
    let results = broker
        .publish_many(
            "orders.new",
            (0..200).map(|i| message(format!("j{i}"))).collect(),
        )
        .await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let expected: Vec<String> = (0..200).map(|i| format!("j{i}")).collect();
    assert_eq!(drain(&mut sub, Duration::from_secs(2)).await, expected);

    nats.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let results = broker
        .publish_many("orders.new", vec![message("x".into()), message("y".into())])
        .await;
    assert_eq!(results.len(), 2);
    for r in results {
        let e = r.unwrap_err();
        assert!(e.to_string().contains("unavailable"), "{e}");
    }
}

fn durable_settings(max_deliver: u64) -> NatsSettings {
    NatsSettings {
        durable: vec!["orders.*".into()],
        max_deliver,
        ack_wait: Duration::from_secs(30),
        dead_letter_prefix: "dead-letter".into(),
        go_micro: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_queue_member_that_was_offline_gets_what_it_missed() {
    let nats = Server::nats();
    let broker = pillion_broker::nats::NatsBroker::connect(
        &nats.url(),
        durable_settings(5),
        Arc::new(BrokerMetrics::default()),
    )
    .await
    .unwrap();
    let first = broker
        .subscribe("orders.new", Some("workers"), 200)
        .await
        .unwrap();
    drop(first); // offline
    for i in 0..100 {
        broker
            .publish("orders.new", message(format!("d{i}")))
            .await
            .unwrap();
    }
    let mut back = broker
        .subscribe("orders.new", Some("workers"), 200)
        .await
        .unwrap();
    let got = drain(&mut back, Duration::from_secs(2)).await;
    let expected: Vec<String> = (0..100).map(|i| format!("d{i}")).collect();
    assert_eq!(got, expected);
    // Acknowledged: a later member does not get them again.
    drop(back);
    let mut again = broker
        .subscribe("orders.new", Some("workers"), 200)
        .await
        .unwrap();
    assert!(drain(&mut again, Duration::from_millis(700))
        .await
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unacknowledged_durable_message_is_redelivered_then_dead_lettered() {
    let nats = Server::nats();
    let metrics = Arc::new(BrokerMetrics::default());
    let broker = pillion_broker::nats::NatsBroker::connect(
        &nats.url(),
        durable_settings(3),
        metrics.clone(),
    )
    .await
    .unwrap();
    let mut dead = broker
        .subscribe("dead-letter.orders.new", None, 10)
        .await
        .unwrap();
    let mut worker = broker
        .subscribe("orders.new", Some("failing"), 10)
        .await
        .unwrap();
    broker
        .publish("orders.new", message("poison".into()))
        .await
        .unwrap();
    for attempt in 1..=3 {
        let d = tokio::time::timeout(Duration::from_secs(5), worker.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(d.attempt, attempt);
        d.retry_later(Duration::from_millis(50)).await;
    }
    let d = tokio::time::timeout(Duration::from_secs(5), dead.next())
        .await
        .expect("a dead letter")
        .unwrap();
    assert_eq!(d.message.body, "poison");
    assert_eq!(d.message.header["Pillion-Original-Topic"], "orders.new");
    assert!(
        tokio::time::timeout(Duration::from_millis(500), worker.next())
            .await
            .is_err(),
        "not delivered a 4th time"
    );
    let mut out = String::new();
    metrics.render(&mut out);
    assert!(
        out.contains("pillion_broker_redelivered_total{topic=\"orders.new\"} 2"),
        "{out}"
    );
}
