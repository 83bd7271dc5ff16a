//! Per-service counters for `/metrics` (Prometheus text format): requests by status
//! class, a latency histogram, retries and ejections. Atomics only: recording a
//! request costs a few relaxed additions.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pillion_core::metrics::{escape, header, Histogram};

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

#[derive(Default)]
pub struct ServiceMetrics {
    by_class: [AtomicU64; 5],
    latency: Histogram,
    pub retries: AtomicU64,
    pub ejections: AtomicU64,
}

impl ServiceMetrics {
    /// Records one call as the caller saw it: its final status and total latency.
    pub fn record(&self, status: u16, latency: Duration) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.by_class[class].fetch_add(1, Ordering::Relaxed);
        self.latency.record(latency);
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
        m.record(200, Duration::from_millis(3));
        m.record(503, Duration::from_millis(30));
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
}
