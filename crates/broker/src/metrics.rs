//! Per-topic counters: published, delivered, dropped, redelivered. Topics are chosen
//! by callers, so at most [`MAX_TOPICS`] are counted apart; the rest add up under
//! `topic="_other"`. The streams between sidecars add two plain counters. The
//! subscribers of this sidecar's API (websocket and SSE) are a gauge per pattern.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use pillion_core::metrics::{escape, header};

pub const MAX_TOPICS: usize = 1000;

/// The counters of one topic.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub published: u64,
    pub delivered: u64,
    pub dropped: u64,
    pub redelivered: u64,
}

#[derive(Default)]
pub struct BrokerMetrics {
    topics: Mutex<BTreeMap<String, Counts>>,
    subscribers: Arc<Mutex<BTreeMap<String, usize>>>,
    peer_queues_dropped: AtomicU64,
    peer_duplicates: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One subscriber counted in [`BrokerMetrics::subscribers`]; uncounted when dropped.
pub struct Subscriber {
    subscribers: Arc<Mutex<BTreeMap<String, usize>>>,
    pattern: String,
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let mut subscribers = lock(&self.subscribers);
        if let Some(n) = subscribers.get_mut(&self.pattern) {
            *n -= 1;
            if *n == 0 {
                subscribers.remove(&self.pattern);
            }
        }
    }
}

impl BrokerMetrics {
    fn add(&self, topic: &str, f: impl FnOnce(&mut Counts)) {
        let mut topics = lock(&self.topics);
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

    /// Counts a subscriber of `pattern` until the returned guard is dropped.
    pub fn subscriber(&self, pattern: &str) -> Subscriber {
        *lock(&self.subscribers)
            .entry(pattern.to_string())
            .or_default() += 1;
        Subscriber {
            subscribers: self.subscribers.clone(),
            pattern: pattern.to_string(),
        }
    }

    /// The subscribers of this sidecar's API now, by pattern.
    pub fn subscribers(&self) -> BTreeMap<String, usize> {
        lock(&self.subscribers).clone()
    }

    /// Every topic's counters so far.
    pub fn counts(&self) -> BTreeMap<String, Counts> {
        lock(&self.topics).clone()
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
        let topics = self.counts();
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
        header(
            out,
            "pillion_broker_subscribers",
            "gauge",
            "Websocket and SSE subscribers of this sidecar, by topic pattern.",
        );
        for (pattern, n) in self.subscribers() {
            let _ = writeln!(
                out,
                "pillion_broker_subscribers{{topic=\"{}\"}} {n}",
                escape(&pattern)
            );
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribers_are_counted_while_they_live() {
        let m = BrokerMetrics::default();
        let a = m.subscriber("orders");
        let b = m.subscriber("orders");
        let c = m.subscriber("events.>");
        assert_eq!(m.subscribers()["orders"], 2);
        drop(a);
        drop(c);
        assert_eq!(
            m.subscribers().into_iter().collect::<Vec<_>>(),
            [("orders".to_string(), 1)]
        );
        let mut out = String::new();
        m.render(&mut out);
        assert!(
            out.contains("pillion_broker_subscribers{topic=\"orders\"} 1"),
            "{out}"
        );
        drop(b);
        assert!(m.subscribers().is_empty());
    }
}
