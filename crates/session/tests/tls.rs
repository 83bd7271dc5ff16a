//! rediss://: the Redis store over TLS, the server certificate checked against a CA
//! given with SSL_CERT_FILE. Alone in its test binary because it sets that variable
//! for the whole process.

use std::time::Duration;

use pillion_session::{new_id, open, Change, StoreError};
use pillion_testkit::Server;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_stores_sessions_over_tls_and_refuses_an_untrusted_server() {
    let redis = Server::redis_tls();
    assert!(redis.url().starts_with("rediss://"));

    // Not trusting the test CA: the handshake fails, and says so.
    std::env::set_var("SSL_CERT_FILE", "/nonexistent-ca.pem");
    let untrusted = open(&redis.url().parse().unwrap(), Default::default()).unwrap();
    let err = untrusted.load(&new_id()).await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");

    std::env::set_var("SSL_CERT_FILE", redis.ca_file());
    let store = open(&redis.url().parse().unwrap(), Default::default()).unwrap();
    let id = new_id();
    let change = Change {
        set: vec![("user-id".into(), vec!["42".into()])],
        del: vec![],
    };
    store
        .save(&id, &change, Duration::from_secs(60))
        .await
        .unwrap();
    let data = store.load(&id).await.unwrap().unwrap();
    assert_eq!(data["user-id"], ["42"]);
}
