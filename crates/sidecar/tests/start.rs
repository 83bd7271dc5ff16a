//! A sidecar started in-process, on port 0, as a test of any capability can: it
//! serves its API, takes registrations and calls by name, and stops gracefully.

use std::time::Duration;

use pillion_sidecar::{sidecar, Settings};
use pillion_testkit::http::{get, post_json};
use pillion_testkit::TestApp;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_started_in_process_serves_calls_and_stops() {
    let running = sidecar::start(Settings::local()).await.expect("started");
    let api = format!("http://{}", running.local_addr());
    assert_ne!(
        running.local_addr().port(),
        0,
        "the kernel's port is reported"
    );
    assert_eq!(get(&format!("{api}/healthz")).await.unwrap().status, 200);

    let app = TestApp::start("greeter").await;
    let body = format!(
        r#"{{"name":"greeter","nodes":[{{"id":"g1","address":"{}"}}]}}"#,
        app.addr()
    );
    let reply = post_json(&format!("{api}/registry"), &body).await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    let call = post_json(&format!("{api}/greeter/Say.Hello"), "{}")
        .await
        .unwrap();
    assert_eq!(call.status, 200, "{}", call.text());
    assert_eq!(app.requests(), 1);

    let addr = running.local_addr();
    tokio::time::timeout(Duration::from_secs(15), running.shutdown())
        .await
        .expect("stopped within the grace period")
        .expect("a clean stop");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the API no longer listens"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_port_is_a_typed_error_naming_the_flag() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let settings = Settings {
        address: taken.local_addr().unwrap(),
        ..Settings::local()
    };
    match sidecar::start(settings).await {
        Err(sidecar::StartError::Bind { flag, addr, .. }) => {
            assert_eq!(flag, "--address");
            assert_eq!(addr, taken.local_addr().unwrap());
        }
        Err(other) => panic!("another error: {other}"),
        Ok(_) => panic!("started on a taken port"),
    }
}
