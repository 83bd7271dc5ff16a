//! Per-topic counters: published, delivered, dropped, redelivered. Topics are chosen
//! by callers, so at most [`MAX_TOPICS`] are counted apart; the rest add up under
//! `topic="_other"`.

use std::collections::BTreeMap;
use std::fmt::Write;
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
}

impl BrokerMetrics {
    fn add(&self, topic: &str, f: impl FnOnce(&mut Counts)) {
        let mut topics = self.topics.lock().unwrap_or_else(|e| e.into_inner());
        let key = if topics.contains_key(topic) || topics.len() < MAX_TOPICS {
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
                "Messages lost: slow subscribers, unreachable sidecars, failed push delivery.",
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
    }
}
