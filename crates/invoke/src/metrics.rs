//! Per-service counters for `/metrics` (Prometheus text format): requests by status
//! class, a latency histogram, retries and ejections; and, for the dashboard's
//! windows, the calls the sidecar answered itself and a finer latency histogram,
//! which a reader takes the difference of ([`ServiceMetrics::snapshot`]). Atomics
//! only: recording a request costs a few relaxed additions.
//!
//! A service's series are made when it is registered and called, and stay. Calls to
//! a name with no node (404 "not found in the registry") are counted too: under the
//! service's own name when it was known (it went), under the name itself for the
//! first [`UNREGISTERED_NAMES`](crate::endpoints::UNREGISTERED_NAMES) names never
//! registered, and under `service="(unknown)"`
//! ([`UNKNOWN_SERVICE`](crate::endpoints::UNKNOWN_SERVICE)) beyond them: made-up names
//! add a bounded number of series.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pillion_core::metrics::{escape, header, FineHistogram, Histogram, FINE_BUCKETS};

pub const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Who gave the caller its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnsweredBy {
    /// A node of the service (whatever its status).
    Node,
    /// The sidecar, with an error of its own: no healthy node, timeout, node
    /// unreachable, too many calls waiting.
    Sidecar,
}

#[derive(Default)]
pub struct ServiceMetrics {
    by_class: [AtomicU64; 5],
    by_sidecar: AtomicU64,
    latency: Histogram,
    fine: FineHistogram,
    pub retries: AtomicU64,
    pub ejections: AtomicU64,
}

/// The counters of one service at one moment; two of them make a window.
#[derive(Clone)]
pub struct Snapshot {
    /// Calls by status class, as [`CLASSES`].
    pub by_class: [u64; 5],
    /// Of those, the calls the sidecar answered with an error of its own.
    pub by_sidecar: u64,
    pub latency: [u64; FINE_BUCKETS],
}

impl Snapshot {
    /// What was counted since `earlier`.
    pub fn since(&self, earlier: &Snapshot) -> Snapshot {
        Snapshot {
            by_class: std::array::from_fn(|i| self.by_class[i].saturating_sub(earlier.by_class[i])),
            by_sidecar: self.by_sidecar.saturating_sub(earlier.by_sidecar),
            latency: std::array::from_fn(|i| self.latency[i].saturating_sub(earlier.latency[i])),
        }
    }

    pub fn calls(&self) -> u64 {
        self.by_class.iter().sum()
    }
}

impl ServiceMetrics {
    /// Records one call as the caller saw it: its final status, total latency, and
    /// who answered.
    pub fn record(&self, status: u16, latency: Duration, by: AnsweredBy) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.by_class[class].fetch_add(1, Ordering::Relaxed);
        if by == AnsweredBy::Sidecar {
            self.by_sidecar.fetch_add(1, Ordering::Relaxed);
        }
        self.latency.record(latency);
        self.fine.record(latency);
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            by_class: std::array::from_fn(|i| self.by_class[i].load(Ordering::Relaxed)),
            by_sidecar: self.by_sidecar.load(Ordering::Relaxed),
            latency: self.fine.snapshot(),
        }
    }

    pub fn requests(&self, class: &str) -> u64 {
        CLASSES
            .iter()
            .position(|c| *c == class)
            .map_or(0, |i| self.by_class[i].load(Ordering::Relaxed))
    }
}

/// Writes the metrics of every service in Prometheus text format.
pub fn render<'a>(
    out: &mut String,
    services: impl IntoIterator<Item = (&'a str, &'a ServiceMetrics)>,
) {
    let services: Vec<_> = services.into_iter().collect();
    header(
        out,
        "pillion_invoke_requests_total",
        "counter",
        "Calls to services through pillion, by final status class.",
    );
    for (name, m) in &services {
        for (i, class) in CLASSES.iter().enumerate() {
            let _ = writeln!(
                out,
                "pillion_invoke_requests_total{{service=\"{}\",class=\"{class}\"}} {}",
                escape(name),
                m.by_class[i].load(Ordering::Relaxed)
            );
        }
    }
    header(
        out,
        "pillion_invoke_request_duration_seconds",
        "histogram",
        "Latency of calls as the caller saw it, until the response headers.",
    );
    for (name, m) in &services {
        m.latency.render(
            out,
            "pillion_invoke_request_duration_seconds",
            &format!("service=\"{}\"", escape(name)),
        );
    }
    type Get = fn(&ServiceMetrics) -> u64;
    let counters: [(&str, &str, Get); 2] = [
        ("pillion_invoke_retries_total", "Retries sent.", |m| {
            m.retries.load(Ordering::Relaxed)
        }),
        (
            "pillion_invoke_ejections_total",
            "Nodes ejected as outliers.",
            |m| m.ejections.load(Ordering::Relaxed),
        ),
    ];
    for (metric, help, get) in counters {
        header(out, metric, "counter", help);
        for (name, m) in &services {
            let _ = writeln!(out, "{metric}{{service=\"{}\"}} {}", escape(name), get(m));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts_and_a_cumulative_histogram() {
        let m = ServiceMetrics::default();
        m.record(200, Duration::from_millis(3), AnsweredBy::Node);
        m.record(503, Duration::from_millis(30), AnsweredBy::Sidecar);
        m.retries.fetch_add(2, Ordering::Relaxed);
        let mut out = String::new();
        render(&mut out, [("greeter", &m)]);
        assert!(out.contains("pillion_invoke_requests_total{service=\"greeter\",class=\"2xx\"} 1"));
        assert!(out.contains("pillion_invoke_requests_total{service=\"greeter\",class=\"5xx\"} 1"));
        assert!(out.contains(
            "pillion_invoke_request_duration_seconds_bucket{service=\"greeter\",le=\"0.05\"} 2"
        ));
        assert!(
            out.contains("pillion_invoke_request_duration_seconds_count{service=\"greeter\"} 2")
        );
        assert!(out.contains("pillion_invoke_retries_total{service=\"greeter\"} 2"));
        assert_eq!(m.requests("5xx"), 1);
    }

    #[test]
    fn a_window_is_the_difference_of_two_snapshots() {
        let m = ServiceMetrics::default();
        m.record(200, Duration::from_millis(3), AnsweredBy::Node);
        let before = m.snapshot();
        m.record(200, Duration::from_millis(4), AnsweredBy::Node);
        m.record(404, Duration::from_millis(5), AnsweredBy::Node);
        m.record(503, Duration::from_millis(6), AnsweredBy::Sidecar);
        let window = m.snapshot().since(&before);
        assert_eq!(window.by_class, [0, 1, 0, 1, 1]);
        assert_eq!(window.by_sidecar, 1);
        assert_eq!(window.calls(), 3);
        assert_eq!(window.latency.iter().sum::<u64>(), 3);
    }
}
