//! Session counters for `/metrics`.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use pillion_core::metrics::{header, Histogram};

#[derive(Default)]
pub struct SessionMetrics {
    pub created: AtomicU64,
    pub destroyed: AtomicU64,
    pub rotated: AtomicU64,
    pub refused: AtomicU64,
    pub store_errors: AtomicU64,
    pub store_latency: Histogram,
}

impl SessionMetrics {
    pub fn render(&self, out: &mut String) {
        let counters = [
            (
                "pillion_session_created_total",
                "Sessions created.",
                &self.created,
            ),
            (
                "pillion_session_destroyed_total",
                "Sessions destroyed by the app.",
                &self.destroyed,
            ),
            (
                "pillion_session_rotated_total",
                "Session ids rotated by the app.",
                &self.rotated,
            ),
            (
                "pillion_session_refused_total",
                "Session changes refused (bad key, too large).",
                &self.refused,
            ),
            (
                "pillion_session_store_errors_total",
                "Session store operations that failed.",
                &self.store_errors,
            ),
        ];
        for (name, help, value) in counters {
            header(out, name, "counter", help);
            let _ = writeln!(out, "{name} {}", value.load(Ordering::Relaxed));
        }
        header(
            out,
            "pillion_session_store_duration_seconds",
            "histogram",
            "Latency of session store operations.",
        );
        self.store_latency
            .render(out, "pillion_session_store_duration_seconds", "");
    }
}
