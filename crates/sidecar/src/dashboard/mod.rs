//! `/dashboard`: one page, embedded in the binary (HTML, CSS and vanilla JS; no build
//! step, nothing from a CDN), that polls `/dashboard/data` and shows services and
//! nodes, calls in 5-second windows, broker topics, sessions, TCP listeners and the
//! cluster.
//!
//! [`stats`] serves the same windows as micro's `/stats` JSON.
//!
//! The windows cost the data path nothing: calls are counted in the invoker's
//! cumulative atomics as before, and a [`Recorder`] task takes the difference every
//! 5 seconds (aligned to the wall clock), keeping the last [`WINDOWS`] of them. The
//! broker's rates come the same way from its per-topic counters.
//!
//! The page itself is public (it holds no data and no secret), so a browser can open
//! it when the API has `--api-token`; its script asks for the token, keeps it in the
//! tab's `sessionStorage` and sends it as `Authorization: Bearer` on every fetch of
//! the data, which the door checks like any other API request. The token never
//! travels in a URL, so it lands in no log, history or `Referer`.

pub mod stats;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::response::{IntoResponse, Response};
use http::header;
use pillion_broker::metrics::{BrokerMetrics, Counts};
use pillion_core::metrics::fine_quantile;
use pillion_invoke::metrics::{Snapshot, CLASSES};
use pillion_invoke::Invoker;
use pillion_registry::Catalog;
use serde_json::{json, Value};

/// The length of a window.
pub const WINDOW: Duration = Duration::from_secs(5);
/// Windows kept: one minute.
pub const WINDOWS: usize = 12;

/// The paths the page and its data are served on (the API listener routes them to
/// the API router).
pub const PATHS: [&str; 4] = [
    "/dashboard",
    "/dashboard/app.js",
    "/dashboard/style.css",
    "/dashboard/data",
];

/// Paths of the page itself, which the door serves without the token.
pub fn is_page(path: &str) -> bool {
    PATHS[..3].contains(&path)
}

const INDEX: &str = include_str!("index.html");
const SCRIPT: &str = include_str!("app.js");
const STYLE: &str = include_str!("style.css");

/// Only this page's own script, style and fetches; no framing (the token form must
/// not be clickjacked).
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                   connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
                   form-action 'none'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

pub async fn page() -> Response {
    asset("text/html; charset=utf-8", INDEX)
}

pub async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

pub async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

/// One closed window of one service's calls.
#[derive(Clone, Copy, Default)]
struct CallWindow {
    by_class: [u64; 5],
    by_sidecar: u64,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
}

impl CallWindow {
    fn of(delta: &Snapshot) -> CallWindow {
        let ms = |q| fine_quantile(&delta.latency, q).map(|d| d.as_secs_f64() * 1000.0);
        CallWindow {
            by_class: delta.by_class,
            by_sidecar: delta.by_sidecar,
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
        }
    }

    fn to_json(self, end_ms: u64) -> Value {
        let mut w = json!({
            "end_ms": end_ms,
            "calls": self.by_class.iter().sum::<u64>(),
            "sidecar": self.by_sidecar,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
        });
        for (class, n) in CLASSES.iter().zip(self.by_class) {
            w[*class] = json!(n);
        }
        w
    }
}

#[derive(Default)]
struct Windows {
    /// Whether the counts before the first window were taken.
    baseline: bool,
    /// Where each kept window ends (unix ms), oldest first.
    ends: VecDeque<u64>,
    /// Each service's windows, aligned with `ends`.
    calls: BTreeMap<String, VecDeque<CallWindow>>,
    last_calls: BTreeMap<String, Snapshot>,
    /// Each topic's counts in the last window.
    topics: BTreeMap<String, Counts>,
    /// Each topic's counts per window, aligned with `ends`.
    topic_windows: BTreeMap<String, VecDeque<Counts>>,
    last_topics: BTreeMap<String, Counts>,
}

/// Keeps the last [`WINDOWS`] windows of calls and broker traffic.
pub struct Recorder {
    windows: Mutex<Windows>,
    invoker: Arc<Invoker>,
    broker: Arc<BrokerMetrics>,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Recorder {
    /// Starts closing a window every [`WINDOW`]; the task ends with the recorder.
    pub fn start(invoker: Arc<Invoker>, broker: Arc<BrokerMetrics>) -> Arc<Recorder> {
        let recorder = Arc::new(Recorder {
            windows: Mutex::new(Windows::default()),
            invoker,
            broker,
        });
        recorder.close_window(unix_ms()); // the baseline: what came before the first window
        tokio::spawn(tick(Arc::downgrade(&recorder)));
        recorder
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Windows> {
        self.windows.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ends the current window at `end_ms`.
    fn close_window(&self, end_ms: u64) {
        let snapshots = self.invoker.call_snapshots();
        let topics = self.broker.counts();
        let mut w = self.lock();
        let first = !std::mem::replace(&mut w.baseline, true);
        for (name, now, _) in snapshots {
            let window = match w.last_calls.get(&name) {
                Some(before) => CallWindow::of(&now.since(before)),
                // A service first called in this window (or before the recorder).
                None if first => CallWindow::default(),
                None => CallWindow::of(&now),
            };
            let kept = w.ends.len();
            let ring = w.calls.entry(name.clone()).or_default();
            while ring.len() < kept {
                ring.push_front(CallWindow::default());
            }
            ring.push_back(window);
            w.last_calls.insert(name, now);
        }
        let delta: BTreeMap<String, Counts> = topics
            .iter()
            .map(|(topic, now)| {
                let before = w.last_topics.get(topic).copied().unwrap_or_default();
                let d = Counts {
                    published: now.published.saturating_sub(before.published),
                    delivered: now.delivered.saturating_sub(before.delivered),
                    dropped: now.dropped.saturating_sub(before.dropped),
                    redelivered: now.redelivered.saturating_sub(before.redelivered),
                };
                (topic.clone(), if first { Counts::default() } else { d })
            })
            .collect();
        w.last_topics = topics;
        if first {
            w.topics = delta;
            return; // a baseline, not a window
        }
        let kept = w.ends.len();
        for (topic, counts) in &delta {
            let ring = w.topic_windows.entry(topic.clone()).or_default();
            while ring.len() < kept {
                ring.push_front(Counts::default());
            }
            ring.push_back(*counts);
        }
        w.topics = delta;
        w.ends.push_back(end_ms);
        let kept = w.ends.len();
        for ring in w.calls.values_mut() {
            while ring.len() < kept {
                ring.push_back(CallWindow::default());
            }
        }
        for ring in w.topic_windows.values_mut() {
            while ring.len() < kept {
                ring.push_back(Counts::default());
            }
        }
        if w.ends.len() > WINDOWS {
            w.ends.pop_front();
            for ring in w.calls.values_mut() {
                ring.pop_front();
            }
            for ring in w.topic_windows.values_mut() {
                ring.pop_front();
            }
        }
    }

    /// The calls to every service together, by status class ([`CLASSES`]), in each
    /// kept window, oldest first: (where the window ends in unix ms, counts).
    pub fn status_windows(&self) -> Vec<(u64, [u64; 5])> {
        let w = self.lock();
        w.ends
            .iter()
            .enumerate()
            .map(|(i, end)| {
                let mut sum = [0; 5];
                for window in w.calls.values().filter_map(|ring| ring.get(i)) {
                    for (total, n) in sum.iter_mut().zip(window.by_class) {
                        *total += n;
                    }
                }
                (*end, sum)
            })
            .collect()
    }

    /// The dashboard's view of calls and topics, with the catalog's services and the
    /// invoker's node states.
    pub fn data(&self, catalog: &Catalog) -> Value {
        let invoke = self.invoker.status();
        let node_states: BTreeMap<&str, &Vec<Value>> = invoke["services"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| Some((s["name"].as_str()?, s["nodes"].as_array()?)))
            .collect();
        let snapshots: BTreeMap<String, (Snapshot, usize)> = self
            .invoker
            .call_snapshots()
            .into_iter()
            .map(|(name, snap, pending)| (name, (snap, pending)))
            .collect();
        let subscribers = self.broker.subscribers();
        let totals = self.broker.counts();
        let w = self.lock();

        let mut names: BTreeSet<&str> = catalog.names().collect();
        names.extend(snapshots.keys().map(String::as_str));
        let services: Vec<Value> = names
            .into_iter()
            .map(|name| {
                let versions = catalog.get(name).unwrap_or_default();
                let states = node_states.get(name);
                let nodes: Vec<Value> = versions
                    .iter()
                    .flat_map(|v| v.nodes.iter().map(move |n| (v, n)))
                    .map(|(v, n)| {
                        let state = states
                            .and_then(|s| s.iter().find(|s| s["id"] == n.id.as_str()))
                            .cloned()
                            .unwrap_or(Value::Null);
                        json!({
                            "id": n.id,
                            "address": n.endpoint(),
                            "version": v.version,
                            "zone": n.metadata.get("zone"),
                            "region": n.metadata.get("region"),
                            "mesh": n.mesh(),
                            "state": state,
                        })
                    })
                    .collect();
                let windows: Vec<Value> = w
                    .calls
                    .get(name)
                    .map(|ring| {
                        ring.iter()
                            .zip(&w.ends)
                            .map(|(c, end)| c.to_json(*end))
                            .collect()
                    })
                    .unwrap_or_default();
                let (total, pending) = match snapshots.get(name) {
                    Some((snap, pending)) => {
                        let mut t = json!({ "calls": snap.calls(), "sidecar": snap.by_sidecar });
                        for (class, n) in CLASSES.iter().zip(snap.by_class) {
                            t[*class] = json!(n);
                        }
                        (t, *pending)
                    }
                    None => (Value::Null, 0),
                };
                json!({
                    "name": name,
                    "registered": !versions.is_empty(),
                    "versions": versions.iter().map(|s| s.version.as_str()).collect::<Vec<_>>(),
                    "nodes": nodes,
                    "pending": pending,
                    "windows": windows,
                    "total": total,
                })
            })
            .collect();

        let mut topic_names: BTreeSet<&str> = totals.keys().map(String::as_str).collect();
        topic_names.extend(subscribers.keys().map(String::as_str));
        let secs = WINDOW.as_secs_f64();
        let topics: Vec<Value> = topic_names
            .into_iter()
            .map(|topic| {
                let total = totals.get(topic).copied().unwrap_or_default();
                let last = w.topics.get(topic).copied().unwrap_or_default();
                let windows: Vec<Value> = w
                    .topic_windows
                    .get(topic)
                    .map(|ring| {
                        ring.iter()
                            .zip(&w.ends)
                            .map(|(c, end)| {
                                json!({
                                    "end_ms": end,
                                    "published": c.published,
                                    "delivered": c.delivered,
                                    "dropped": c.dropped,
                                })
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                json!({
                    "windows": windows,
                    "topic": topic,
                    "subscribers": subscribers.get(topic).copied().unwrap_or(0),
                    "published": total.published,
                    "delivered": total.delivered,
                    "dropped": total.dropped,
                    "redelivered": total.redelivered,
                    "published_per_sec": last.published as f64 / secs,
                    "delivered_per_sec": last.delivered as f64 / secs,
                    "dropped_per_sec": last.dropped as f64 / secs,
                })
            })
            .collect();
        json!({
            "now_ms": unix_ms(),
            "window_secs": WINDOW.as_secs(),
            "last_window_end_ms": w.ends.back(),
            "services": services,
            "topics": topics,
        })
    }
}

/// Closes a window at every multiple of [`WINDOW`] of the wall clock, so windows read
/// as `12:00:05-12:00:10` and sidecars agree on them.
async fn tick(recorder: Weak<Recorder>) {
    let step = WINDOW.as_millis() as u64;
    loop {
        let now = unix_ms();
        let end = (now / step + 1) * step;
        tokio::time::sleep(Duration::from_millis(end - now)).await;
        let Some(recorder) = recorder.upgrade() else {
            return;
        };
        recorder.close_window(end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_page_is_served_without_the_token() {
        assert!(is_page("/dashboard"));
        assert!(is_page("/dashboard/app.js"));
        assert!(!is_page("/dashboard/data"));
        assert!(!is_page("/dashboard/other"));
    }
}
