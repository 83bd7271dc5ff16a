//! `/stats`: micro's stats JSON, made from the dashboard's windows (no counters of its
//! own).
//!
//! micro's sidecar with `--enable_stats` (micro v0.7 to v1.0, `internal/stats/stats.go`)
//! answered a request with `Content-Type: application/json` (its page polled itself
//! that way) with
//!
//! ```json
//! {"started":1515150000,"memory":"3.10mb","threads":12,"gc_pause":"0.512ms",
//!  "counters":[{"timestamp":1515150005,"status_codes":{"20x":7,"50x":1},"total_reqs":8}]}
//! ```
//!
//! one counter per 5-second window, stamped when the window opened, with a key for each
//! status class seen in it; any other request got its HTML page. pillion answers that
//! JSON to every request but a browser's navigation (`Accept: text/html` without a
//! JSON `Content-Type`), which is sent to `/dashboard`, pillion's page of the same
//! numbers. What differs: the counts are the calls to services (by path, `/rpc`,
//! proxy), the dashboard's windows, not every request to the API; there are
//! [`super::WINDOWS`] of them (one minute) where micro kept 24; `memory` is the resident set
//! and `threads` the process's threads (Go's heap and goroutines in micro), and
//! `gc_pause` is always `"0.000ms"`: there is no garbage collector.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::response::{IntoResponse, Redirect, Response};
use axum::Json;
use http::header::{ACCEPT, CONTENT_TYPE};
use http::HeaderMap;
use pillion_invoke::metrics::CLASSES;
use serde_json::{json, Map, Value};

use super::{Recorder, WINDOW};

/// The answer to `GET /stats`; `uptime` is how long the sidecar has run.
pub fn answer(headers: &HeaderMap, uptime: Duration, recorder: &Recorder) -> Response {
    let wants = |name, what: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains(what))
    };
    if wants(ACCEPT, "text/html") && !wants(CONTENT_TYPE, "application/json") {
        return Redirect::to("/dashboard").into_response();
    }
    let started = SystemTime::now()
        .checked_sub(uptime)
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let process = Process::read();
    let window = WINDOW.as_secs();
    let counters: Vec<Value> = recorder
        .status_windows()
        .into_iter()
        .map(|(end_ms, by_class)| {
            let status_codes: Map<String, Value> = CLASSES
                .iter()
                .zip(by_class)
                .filter(|(_, n)| *n > 0)
                // micro's keys: "20x", not "2xx".
                .map(|(class, n)| (format!("{}0x", &class[..1]), json!(n)))
                .collect();
            json!({
                "timestamp": (end_ms / 1000).saturating_sub(window),
                "status_codes": status_codes,
                "total_reqs": by_class.iter().sum::<u64>(),
            })
        })
        .collect();
    Json(json!({
        "started": started,
        "memory": process.memory,
        "threads": process.threads,
        "gc_pause": "0.000ms",
        "counters": counters,
    }))
    .into_response()
}

/// What micro showed of its Go runtime, as this process has it.
struct Process {
    /// The resident set, as micro wrote its heap: `"12.34mb"`; empty where
    /// `/proc/self/status` cannot be read.
    memory: String,
    threads: u64,
}

impl Process {
    fn read() -> Process {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let field = |name: &str| -> Option<u64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        };
        Process {
            memory: field("VmRSS:")
                .map_or_else(String::new, |kib| format!("{:.2}mb", kib as f64 / 1024.0)),
            threads: field("Threads:").unwrap_or(0),
        }
    }
}
