//! The session store contract, run against the embedded store and a real Redis.

use std::sync::Arc;
use std::time::Duration;

use pillion_session::{new_id, open, Change, SessionData, SessionStore, StoreError, StoreUrl};
use pillion_testkit::Server;

fn set(pairs: &[(&str, &[&str])]) -> Change {
    Change {
        set: pairs
            .iter()
            .map(|(k, vs)| (k.to_string(), vs.iter().map(|v| v.to_string()).collect()))
            .collect(),
        del: Vec::new(),
    }
}

fn data(pairs: &[(&str, &[&str])]) -> SessionData {
    set(pairs).apply(&SessionData::new())
}

async fn contract(store: Arc<dyn SessionStore>) {
    let hour = Duration::from_secs(3600);
    let id = new_id();
    assert_eq!(
        store.load(&id).await.unwrap(),
        None,
        "an unknown id has no session"
    );
    assert_eq!(store.ttl(&id).await.unwrap(), None);

    // A session without keys still exists once saved.
    store.save(&id, &Change::default(), hour).await.unwrap();
    assert_eq!(store.load(&id).await.unwrap(), Some(SessionData::new()));

    // Keys, several values, and a TTL equal to the max-age.
    store
        .save(
            &id,
            &set(&[("user-id", &["42"]), ("role", &["admin", "dev"])]),
            hour,
        )
        .await
        .unwrap();
    assert_eq!(
        store.load(&id).await.unwrap(),
        Some(data(&[("user-id", &["42"]), ("role", &["admin", "dev"])]))
    );
    let ttl = store.ttl(&id).await.unwrap().unwrap();
    assert!(ttl > Duration::from_secs(3590) && ttl <= hour, "{ttl:?}");

    // Two responses changing different keys at once: both survive.
    let add_cart = set(&[("cart", &["3 items"])]);
    let drop_role = Change {
        set: vec![],
        del: vec!["role".into()],
    };
    let (a, b) = tokio::join!(
        store.save(&id, &add_cart, hour),
        store.save(&id, &drop_role, hour),
    );
    a.unwrap();
    b.unwrap();
    assert_eq!(
        store.load(&id).await.unwrap(),
        Some(data(&[("user-id", &["42"]), ("cart", &["3 items"])]))
    );

    // Rotation keeps the data under a new id; the old one is gone.
    let current = store.load(&id).await.unwrap().unwrap();
    let rotated = new_id();
    store.rotate(&id, &rotated, &current, hour).await.unwrap();
    assert_eq!(store.load(&id).await.unwrap(), None);
    assert_eq!(store.load(&rotated).await.unwrap(), Some(current.clone()));
    // Rotating a session that vanished meanwhile recreates it from the data given.
    let ghost = new_id();
    let reborn = new_id();
    store.rotate(&ghost, &reborn, &current, hour).await.unwrap();
    assert_eq!(store.load(&reborn).await.unwrap(), Some(current));

    // Destroyed is gone.
    store.destroy(&rotated).await.unwrap();
    assert_eq!(store.load(&rotated).await.unwrap(), None);

    // Expiry.
    let brief = new_id();
    store
        .save(&brief, &set(&[("k", &["v"])]), Duration::from_secs(1))
        .await
        .unwrap();
    assert!(store.load(&brief).await.unwrap().is_some());
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(store.load(&brief).await.unwrap(), None, "expired");
}

#[tokio::test]
async fn memory_store_passes_the_contract() {
    contract(open(&StoreUrl::Memory, Default::default()).unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_passes_the_contract() {
    let redis = Server::redis();
    let store = open(&redis.url().parse().unwrap(), Default::default()).unwrap();
    assert_eq!(store.backend(), redis.url());
    contract(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_db_index_and_password_are_honoured_and_never_shown() {
    let redis = Server::redis();
    let store = open(
        &format!("{}/3", redis.url()).parse().unwrap(),
        Default::default(),
    )
    .unwrap();
    let id = new_id();
    store
        .save(&id, &set(&[("k", &["v"])]), Duration::from_secs(60))
        .await
        .unwrap();
    let other_db = open(
        &format!("{}/0", redis.url()).parse().unwrap(),
        Default::default(),
    )
    .unwrap();
    assert_eq!(
        other_db.load(&id).await.unwrap(),
        None,
        "db 3 and db 0 are apart"
    );

    let wrong = open(
        &format!("redis://:hunter2@{}", redis.addr())
            .parse()
            .unwrap(),
        Default::default(),
    )
    .unwrap();
    let err = wrong.load(&id).await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
    assert!(!err.to_string().contains("hunter2"), "{err}");
    assert!(!wrong.backend().contains("hunter2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_fails_fast_then_recovers_without_reopening() {
    let mut redis = Server::redis();
    let store = open(&redis.url().parse().unwrap(), Default::default()).unwrap();
    let id = new_id();
    store
        .save(&id, &set(&[("k", &["v"])]), Duration::from_secs(60))
        .await
        .unwrap();

    redis.kill();
    let started = std::time::Instant::now();
    let err = store.load(&id).await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "fails fast: {:?}",
        started.elapsed()
    );

    redis.restart(); // no persistence: the data is gone, the store works again
    let mut ok = false;
    for _ in 0..50 {
        if store
            .save(&id, &set(&[("k", &["again"])]), Duration::from_secs(60))
            .await
            .is_ok()
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "the store reconnects by itself");
    assert_eq!(
        store.load(&id).await.unwrap(),
        Some(data(&[("k", &["again"])]))
    );
}
