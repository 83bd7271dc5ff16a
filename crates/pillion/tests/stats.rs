//! `/stats`, micro's stats JSON: calls by name show up in 5-second windows counted by
//! status class with micro's keys, and a browser is sent to the dashboard. (The API
//! token guards it like the rest of the API: `api_door.rs`.)

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{eventually, register, Sidecar};
use http::Method;
use pillion_testkit::http::request;
use pillion_testkit::{Mode, TestApp};
use serde_json::Value;

/// The calls counted in every window, by micro's status keys.
fn counted(stats: &Value) -> (u64, u64, u64) {
    let counters = stats["counters"].as_array().expect("counters");
    let sum = |key: &str| {
        counters
            .iter()
            .map(|c| c["status_codes"][key].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    let total = counters
        .iter()
        .map(|c| c["total_reqs"].as_u64().unwrap())
        .sum();
    (sum("20x") + sum("40x") + sum("50x"), sum("20x"), total)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_answers_micro_s_json_from_the_dashboard_s_windows() {
    let app = TestApp::start("greeter").await;
    let failing = TestApp::start("failing").await;
    failing.set_mode(Mode::Status(500));
    let sc = Sidecar::start(&[]);
    register(&sc, "greeter", "g1", &app.addr().to_string(), &[]).await;
    register(&sc, "failing", "f1", &failing.addr().to_string(), &[]).await;
    let call = |path: &'static str| {
        let url = sc.url(path);
        async move {
            request(
                Method::POST,
                &url,
                &[("content-type", "application/json")],
                "{}",
            )
            .await
            .unwrap()
            .status
        }
    };
    for _ in 0..3 {
        assert_eq!(call("/greeter/hello").await, 200);
    }
    assert_eq!(call("/failing/hello").await, 500);

    let stats_with = |headers: &'static [(&'static str, &'static str)]| {
        let url = sc.url("/stats");
        async move { request(Method::GET, &url, headers, "").await.unwrap() }
    };
    // micro's page polled /stats with this content type.
    let stats = || stats_with(&[("content-type", "application/json")]);
    assert!(
        eventually(Duration::from_secs(12), || async {
            counted(&stats().await.json()).0 == 4
        })
        .await,
        "the calls never reached a window: {}",
        stats().await.text()
    );
    let reply = stats().await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.headers["content-type"], "application/json");
    let body = reply.json();
    assert_eq!(counted(&body), (4, 3, 4), "{body}");
    let counters = body["counters"].as_array().unwrap();
    assert!(!counters.is_empty() && counters.len() <= 12, "{body}");
    for window in counters {
        // micro's keys, only for the classes seen in the window.
        for (class, n) in window["status_codes"].as_object().unwrap() {
            assert!(["20x", "50x"].contains(&class.as_str()), "{body}");
            assert!(n.as_u64().unwrap() > 0, "{body}");
        }
        // Stamped when the window opened, on the wall clock's 5-second marks.
        assert_eq!(window["timestamp"].as_u64().unwrap() % 5, 0, "{body}");
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let started = body["started"].as_u64().unwrap();
    assert!(started <= now && now - started < 60, "{body}");
    assert!(body["memory"].as_str().unwrap().ends_with("mb"), "{body}");
    assert!(body["threads"].as_u64().unwrap() > 0, "{body}");
    assert_eq!(body["gc_pause"], "0.000ms");

    // Without headers (curl): the same JSON.
    let reply = stats_with(&[]).await;
    assert_eq!(reply.status, 200);
    assert_eq!(counted(&reply.json()).0, 4);

    // A browser opening micro's stats page is sent to pillion's.
    let reply = stats_with(&[("accept", "text/html,application/xhtml+xml,*/*;q=0.8")]).await;
    assert_eq!(reply.status, 303, "{}", reply.text());
    assert_eq!(reply.headers["location"], "/dashboard");
}
