//! Per-topic counters: published, delivered, dropped, redelivered. Topics are chosen
//! by callers, so at most [`MAX_TOPICS`] are counted apart; the rest add up under
//! `topic="_other"`. The streams between sidecars add two plain counters.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use pillion_core::metrics::{escape, header};

pub const MAX_TOPICS: usize = 1000;

#[derive(Default, Clone, Copy)]
struct Counts {
    published: u64,
    delivered: u64,
    dropped: u64,
    redelivered: u64,
}

#[derive(Default)]
pub struct BrokerMetrics {
    topics: Mutex<BTreeMap<String, Counts>>,
    peer_queues_dropped: AtomicU64,
    peer_duplicates: AtomicU64,
}

impl BrokerMetrics {
    fn add(&self, topic: &str, f: impl FnOnce(&mut Counts)) {
        let mut topics = self.topics.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = topics.get_mut(topic) {
            return f(c);
        }
        let key = if topics.len() < MAX_TOPICS {
            topic
        } else {
            "_other"
        };
        f(topics.entry(key.to_string()).or_default());
    }

    pub fn published(&self, topic: &str) {
        self.add(topic, |c| c.published += 1);
    }

    pub fn delivered(&self, topic: &str, n: u64) {
        if n > 0 {
            self.add(topic, |c| c.delivered += n);
        }
    }

    pub fn dropped(&self, topic: &str, n: u64) {
        if n > 0 {
            self.add(topic, |c| c.dropped += n);
        }
    }

    pub fn redelivered(&self, topic: &str) {
        self.add(topic, |c| c.redelivered += 1);
    }

    /// Another sidecar's queue was dropped (it left, or restarted as a new node).
    pub fn peer_queue_dropped(&self) {
        self.peer_queues_dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// A message another sidecar sent again was skipped: it had been delivered.
    pub fn peer_duplicate(&self) {
        self.peer_duplicates.fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self, out: &mut String) {
        let topics = self
            .topics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        type Get = fn(&Counts) -> u64;
        let metrics: [(&str, &str, Get); 4] = [
            (
                "pillion_broker_published_total",
                "Messages published through this sidecar.",
                |c| c.published,
            ),
            (
                "pillion_broker_delivered_total",
                "Messages handed to subscribers of this sidecar.",
                |c| c.delivered,
            ),
            (
                "pillion_broker_dropped_total",
                "Messages lost: slow subscribers, sidecars that left with messages queued for them, failed push delivery.",
                |c| c.dropped,
            ),
            (
                "pillion_broker_redelivered_total",
                "Durable messages delivered again.",
                |c| c.redelivered,
            ),
        ];
        for (name, help, get) in metrics {
            header(out, name, "counter", help);
            for (topic, c) in &topics {
                let _ = writeln!(out, "{name}{{topic=\"{}\"}} {}", escape(topic), get(c));
            }
        }
        let plain = [
            (
                "pillion_broker_peer_queues_dropped_total",
                "Queues of messages for another sidecar dropped because it left the registry or restarted.",
                &self.peer_queues_dropped,
            ),
            (
                "pillion_broker_peer_duplicates_total",
                "Messages another sidecar sent again after a reconnect, skipped because they had been delivered.",
                &self.peer_duplicates,
            ),
        ];
        for (name, help, count) in plain {
            header(out, name, "counter", help);
            let _ = writeln!(out, "{name} {}", count.load(Ordering::Relaxed));
        }
    }
}
