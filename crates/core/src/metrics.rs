//! The few metric types pillion's crates share, in Prometheus text format: atomic
//! counters and a fixed-bucket latency histogram. Recording costs a few relaxed
//! atomic additions and never allocates.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Histogram bucket bounds in seconds, from 1 ms to 10 s.
pub const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; 12],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn record(&self, latency: Duration) {
        let secs = latency.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(latency.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Writes `NAME_bucket`, `NAME_sum` and `NAME_count` lines; `labels` is either
    /// empty or `key="value",...` without braces.
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
            );
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let braces = |l: &str| {
            if l.is_empty() {
                String::new()
            } else {
                format!("{{{l}}}")
            }
        };
        let _ = writeln!(
            out,
            "{name}_sum{} {}",
            braces(labels),
            self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{} {count}", braces(labels));
    }
}

/// Buckets of [`FineHistogram`]: 8 exact ones for 0-7 µs, then 8 per power of two up
/// to 2^36 µs (19 hours; longer is counted there).
pub const FINE_BUCKETS: usize = 8 + 33 * 8;

/// A latency histogram fine enough for percentiles (each bucket at most 1/8 of its
/// value wide, so a percentile is within about 6%), for windows that a reader takes
/// the difference of. Recording is one relaxed addition; the bucket is found with a
/// few bit operations, not a search.
pub struct FineHistogram {
    buckets: [AtomicU64; FINE_BUCKETS],
}

impl Default for FineHistogram {
    fn default() -> Self {
        FineHistogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl FineHistogram {
    pub fn record(&self, latency: Duration) {
        let us = (latency.as_micros() as u64).min((1 << 36) - 1);
        self.buckets[fine_bucket(us)].fetch_add(1, Ordering::Relaxed);
    }

    /// The counts so far, bucket by bucket.
    pub fn snapshot(&self) -> [u64; FINE_BUCKETS] {
        std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed))
    }
}

fn fine_bucket(us: u64) -> usize {
    if us < 8 {
        return us as usize;
    }
    let exp = 63 - us.leading_zeros() as usize; // 3 or more
    let sub = ((us >> (exp - 3)) & 7) as usize;
    8 + (exp - 3) * 8 + sub
}

/// The smallest value, in µs, that falls in bucket `i`.
fn fine_floor(i: usize) -> u64 {
    if i < 8 {
        return i as u64;
    }
    let (exp, sub) = ((i - 8) / 8 + 3, (i - 8) % 8);
    (8 + sub as u64) << (exp - 3)
}

/// The `q`-quantile (0 < q <= 1) of the counts `buckets` (as from
/// [`FineHistogram::snapshot`], or a difference of two), the middle of its bucket;
/// `None` when nothing was counted.
pub fn fine_quantile(buckets: &[u64; FINE_BUCKETS], q: f64) -> Option<Duration> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
    let mut seen = 0;
    for (i, n) in buckets.iter().enumerate() {
        seen += n;
        if seen >= rank {
            let low = fine_floor(i);
            let high = if i + 1 < FINE_BUCKETS {
                fine_floor(i + 1)
            } else {
                low
            };
            return Some(Duration::from_nanos((low + high) * 500));
        }
    }
    None
}

/// `# HELP` and `# TYPE` lines of a metric.
pub fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A label value with `\`, `"` and newlines escaped.
pub fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let h = Histogram::default();
        h.record(Duration::from_millis(3));
        h.record(Duration::from_millis(30));
        let mut out = String::new();
        h.render(&mut out, "x_seconds", "service=\"a\"");
        assert!(
            out.contains("x_seconds_bucket{service=\"a\",le=\"0.005\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_bucket{service=\"a\",le=\"0.05\"} 2"),
            "{out}"
        );
        assert!(out.contains("x_seconds_count{service=\"a\"} 2"), "{out}");
        let mut plain = String::new();
        h.render(&mut plain, "y", "");
        assert!(
            plain.contains("y_bucket{le=\"+Inf\"} 2") && plain.contains("y_count 2"),
            "{plain}"
        );
    }

    #[test]
    fn fine_buckets_are_contiguous_and_quantiles_are_close() {
        for i in 0..FINE_BUCKETS - 1 {
            assert_eq!(fine_bucket(fine_floor(i)), i);
            assert_eq!(fine_bucket(fine_floor(i + 1) - 1), i, "bucket {i}");
        }
        let h = FineHistogram::default();
        for ms in 1..=100 {
            h.record(Duration::from_millis(ms));
        }
        let counts = h.snapshot();
        let p50 = fine_quantile(&counts, 0.5).unwrap().as_secs_f64() * 1000.0;
        let p99 = fine_quantile(&counts, 0.99).unwrap().as_secs_f64() * 1000.0;
        assert!((p50 - 50.0).abs() < 50.0 * 0.07, "p50 {p50}");
        assert!((p99 - 99.0).abs() < 99.0 * 0.07, "p99 {p99}");
        assert_eq!(fine_quantile(&[0; FINE_BUCKETS], 0.5), None);
        h.record(Duration::from_secs(1 << 40));
        assert_eq!(
            h.snapshot()[FINE_BUCKETS - 1],
            1,
            "the longest bucket takes the rest"
        );
    }
}
