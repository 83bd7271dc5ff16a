//! In-process fan-out: subscribers by topic pattern, plain or in queue groups, each
//! with a bounded buffer.
//!
//! A message goes to every plain subscriber whose pattern matches and to one member
//! (round-robin) of each matching queue group. A subscriber whose buffer is full is
//! dropped from the hub and told why (slow consumer), so one slow reader can neither
//! stall the others nor grow memory.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use crate::{Delivery, Message, Subscription};

struct Member {
    id: u64,
    tx: mpsc::Sender<Delivery>,
    overflowed: Arc<AtomicBool>,
}

#[derive(Default)]
struct Group {
    members: Vec<Member>,
    cursor: usize,
}

#[derive(Default)]
struct PatternSubs {
    plain: Vec<Member>,
    groups: BTreeMap<String, Group>,
}

/// Which subscribers of a hub a delivery is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// Plain subscribers.
    pub plain: bool,
    /// These queue groups (one member each); `None`: every group.
    pub groups: Option<Vec<String>>,
}

impl Scope {
    pub fn all() -> Scope {
        Scope {
            plain: true,
            groups: None,
        }
    }
}

/// What one delivery did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub delivered: u64,
    /// Subscribers dropped because their buffer was full.
    pub dropped: u64,
}

#[derive(Default)]
pub struct Hub {
    patterns: Mutex<BTreeMap<String, PatternSubs>>,
    next_id: AtomicU64,
    /// Bumped on every subscribe and unsubscribe, for whoever advertises them.
    pub generation: tokio::sync::watch::Sender<u64>,
}

/// Unsubscribes when the subscription is dropped.
struct Leave {
    hub: Arc<Hub>,
    pattern: String,
    queue: Option<String>,
    id: u64,
}

impl Drop for Leave {
    fn drop(&mut self) {
        self.hub
            .remove(&self.pattern, self.queue.as_deref(), self.id);
    }
}

impl Hub {
    pub fn new() -> Arc<Hub> {
        Arc::new(Hub::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, PatternSubs>> {
        self.patterns.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn subscribe(
        self: &Arc<Self>,
        pattern: &str,
        queue: Option<&str>,
        buffer: usize,
    ) -> Subscription {
        let (tx, rx) = mpsc::channel(buffer.max(1));
        let overflowed = Arc::new(AtomicBool::new(false));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let member = Member {
            id,
            tx,
            overflowed: overflowed.clone(),
        };
        {
            let mut patterns = self.lock();
            let subs = patterns.entry(pattern.to_string()).or_default();
            match queue {
                None => subs.plain.push(member),
                Some(q) => subs
                    .groups
                    .entry(q.to_string())
                    .or_default()
                    .members
                    .push(member),
            }
        }
        self.generation.send_modify(|g| *g += 1);
        let leave = Leave {
            hub: self.clone(),
            pattern: pattern.to_string(),
            queue: queue.map(str::to_string),
            id,
        };
        Subscription::new(rx, overflowed, buffer, Box::new(leave))
    }

    fn remove(&self, pattern: &str, queue: Option<&str>, id: u64) {
        {
            let mut patterns = self.lock();
            if let Some(subs) = patterns.get_mut(pattern) {
                match queue {
                    None => subs.plain.retain(|m| m.id != id),
                    Some(q) => {
                        if let Some(g) = subs.groups.get_mut(q) {
                            g.members.retain(|m| m.id != id);
                            if g.members.is_empty() {
                                subs.groups.remove(q);
                            }
                        }
                    }
                }
                if subs.plain.is_empty() && subs.groups.is_empty() {
                    patterns.remove(pattern);
                }
            }
        }
        self.generation.send_modify(|g| *g += 1);
    }

    /// Every (pattern, queue) subscribed here, for advertising to other sidecars.
    pub fn subscriptions(&self) -> Vec<(String, Option<String>)> {
        let patterns = self.lock();
        let mut out = Vec::new();
        for (pattern, subs) in patterns.iter() {
            if !subs.plain.is_empty() {
                out.push((pattern.clone(), None));
            }
            for q in subs.groups.keys() {
                out.push((pattern.clone(), Some(q.clone())));
            }
        }
        out
    }

    /// Queue groups here with a subscription matching `topic`.
    pub fn groups_for(&self, topic: &str) -> Vec<String> {
        let patterns = self.lock();
        let mut groups: Vec<String> = patterns
            .iter()
            .filter(|(p, _)| crate::topic::matches(p, topic))
            .flat_map(|(_, s)| s.groups.keys().cloned())
            .collect();
        groups.sort();
        groups.dedup();
        groups
    }

    /// Hands `message` to the subscribers in `scope` whose pattern matches `topic`.
    pub fn deliver(&self, topic: &str, message: &Message, scope: &Scope) -> Outcome {
        let mut outcome = Outcome::default();
        let mut overflowing: Vec<(String, Option<String>, u64)> = Vec::new();
        let mut groups_served: Vec<String> = Vec::new();
        {
            let mut patterns = self.lock();
            for (pattern, subs) in patterns.iter_mut() {
                if !crate::topic::matches(pattern, topic) {
                    continue;
                }
                if scope.plain {
                    for m in &subs.plain {
                        offer(
                            m,
                            topic,
                            message,
                            &mut outcome,
                            &mut overflowing,
                            pattern,
                            None,
                        );
                    }
                }
                for (name, group) in subs.groups.iter_mut() {
                    let wanted = scope.groups.as_ref().is_none_or(|g| g.contains(name));
                    // One member per group, even when several patterns of the group match.
                    if !wanted || groups_served.contains(name) || group.members.is_empty() {
                        continue;
                    }
                    groups_served.push(name.clone());
                    let m = &group.members[group.cursor % group.members.len()];
                    group.cursor = group.cursor.wrapping_add(1);
                    offer(
                        m,
                        topic,
                        message,
                        &mut outcome,
                        &mut overflowing,
                        pattern,
                        Some(name),
                    );
                }
            }
        }
        for (pattern, queue, id) in overflowing {
            self.remove(&pattern, queue.as_deref(), id);
        }
        outcome
    }
}

fn offer(
    m: &Member,
    topic: &str,
    message: &Message,
    outcome: &mut Outcome,
    overflowing: &mut Vec<(String, Option<String>, u64)>,
    pattern: &str,
    queue: Option<&String>,
) {
    match m
        .tx
        .try_send(Delivery::new(topic.to_string(), message.clone()))
    {
        Ok(()) => outcome.delivered += 1,
        Err(mpsc::error::TrySendError::Full(_)) => {
            m.overflowed.store(true, Ordering::Relaxed);
            outcome.dropped += 1;
            overflowing.push((pattern.to_string(), queue.cloned(), m.id));
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {
            overflowing.push((pattern.to_string(), queue.cloned(), m.id));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(body: &'static str) -> Message {
        Message {
            body: bytes::Bytes::from_static(body.as_bytes()),
            ..Message::default()
        }
    }

    #[tokio::test]
    async fn plain_subscribers_get_everything_and_a_group_shares() {
        let hub = Hub::new();
        let mut plain = hub.subscribe("orders.*", None, 16);
        let mut a = hub.subscribe("orders.new", Some("workers"), 16);
        let mut b = hub.subscribe("orders.new", Some("workers"), 16);
        for _ in 0..4 {
            let out = hub.deliver("orders.new", &msg("x"), &Scope::all());
            assert_eq!(out.delivered, 2);
        }
        let mut got = (0, 0, 0);
        while plain.rx.try_recv().is_ok() {
            got.0 += 1;
        }
        while a.rx.try_recv().is_ok() {
            got.1 += 1;
        }
        while b.rx.try_recv().is_ok() {
            got.2 += 1;
        }
        assert_eq!(got, (4, 2, 2));
        assert_eq!(hub.deliver("other", &msg("x"), &Scope::all()).delivered, 0);
    }

    #[tokio::test]
    async fn a_full_buffer_drops_the_slow_subscriber_with_a_reason() {
        let hub = Hub::new();
        let mut slow = hub.subscribe("t", None, 2);
        let _fast = hub.subscribe("t", None, 100);
        for _ in 0..3 {
            hub.deliver("t", &msg("x"), &Scope::all());
        }
        assert!(slow.next().await.is_some());
        assert!(slow.next().await.is_some());
        assert!(
            slow.next().await.is_none(),
            "dropped after its buffer filled"
        );
        assert!(slow.end_reason().unwrap().contains("slow consumer"));
        assert_eq!(
            hub.subscriptions(),
            [("t".to_string(), None)],
            "the fast one stays"
        );
    }

    #[tokio::test]
    async fn dropping_a_subscription_unsubscribes() {
        let hub = Hub::new();
        let s = hub.subscribe("t", Some("g"), 4);
        assert_eq!(hub.groups_for("t"), ["g"]);
        drop(s);
        assert!(hub.subscriptions().is_empty());
    }
}
