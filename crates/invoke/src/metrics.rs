//! Per-service counters for `/metrics` (Prometheus text format): requests by status
//! class, a latency histogram, retries and ejections. Atomics only: recording a
//! request costs a few relaxed additions.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Histogram bucket bounds in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];
/// Status classes; index 0 counts answers pillion made itself without an upstream
/// response (it shows as the class of the error status, see `record`).
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

#[derive(Default)]
pub struct ServiceMetrics {
    by_class: [AtomicU64; 5],
    buckets: [AtomicU64; 12],
    count: AtomicU64,
    sum_us: AtomicU64,
    pub retries: AtomicU64,
    pub ejections: AtomicU64,
}

impl ServiceMetrics {
    /// Records one call as the caller saw it: its final status and total latency.
    pub fn record(&self, status: u16, latency: Duration) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.by_class[class].fetch_add(1, Ordering::Relaxed);
        let secs = latency.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(latency.as_micros() as u64, Ordering::Relaxed);
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
    let _ = writeln!(out, "# HELP pillion_invoke_requests_total Calls to services through pillion, by final status class.");
    let _ = writeln!(out, "# TYPE pillion_invoke_requests_total counter");
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
    let _ = writeln!(
        out,
        "# HELP pillion_invoke_request_duration_seconds Latency of calls as the caller saw it."
    );
    let _ = writeln!(
        out,
        "# TYPE pillion_invoke_request_duration_seconds histogram"
    );
    for (name, m) in &services {
        let name = escape(name);
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += m.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "pillion_invoke_request_duration_seconds_bucket{{service=\"{name}\",le=\"{bound}\"}} {cumulative}"
            );
        }
        let count = m.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "pillion_invoke_request_duration_seconds_bucket{{service=\"{name}\",le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "pillion_invoke_request_duration_seconds_sum{{service=\"{name}\"}} {}",
            m.sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "pillion_invoke_request_duration_seconds_count{{service=\"{name}\"}} {count}"
        );
    }
    for (metric, help, get) in [
        (
            "pillion_invoke_retries_total",
            "Retries sent.",
            (|m: &ServiceMetrics| m.retries.load(Ordering::Relaxed)) as fn(&ServiceMetrics) -> u64,
        ),
        (
            "pillion_invoke_ejections_total",
            "Nodes ejected as outliers.",
            |m| m.ejections.load(Ordering::Relaxed),
        ),
    ] {
        let _ = writeln!(out, "# HELP {metric} {help}");
        let _ = writeln!(out, "# TYPE {metric} counter");
        for (name, m) in &services {
            let _ = writeln!(out, "{metric}{{service=\"{}\"}} {}", escape(name), get(m));
        }
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
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
            "pillion_invoke_request_duration_seconds_bucket{service=\"greeter\",le=\"0.005\"} 1"
        ));
        assert!(out.contains(
            "pillion_invoke_request_duration_seconds_bucket{service=\"greeter\",le=\"0.05\"} 2"
        ));
        assert!(
            out.contains("pillion_invoke_request_duration_seconds_count{service=\"greeter\"} 2")
        );
        assert!(out.contains("pillion_invoke_retries_total{service=\"greeter\"} 2"));
    }
}
