//! Node selection for one attempt: the nearest locality tier that has an available
//! node, then power-of-two-choices over peak-EWMA cost (default) or round-robin.
//!
//! "Available" means not ejected and not already tried by this request. When every
//! node was tried, tried ones are allowed again; when every node is ejected (which
//! ejection's 50% cap prevents except in races), ejected ones are used rather than
//! failing outright.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use pillion_core::id::fast_random as random;

use std::time::Duration;

use crate::endpoints::{NodeState, ServiceSet};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    /// Power of two choices over peak-EWMA latency x outstanding requests.
    #[default]
    PeakEwma,
    RoundRobin,
}

impl std::str::FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "peak-ewma" | "p2c" => Ok(Strategy::PeakEwma),
            "round-robin" => Ok(Strategy::RoundRobin),
            _ => Err(format!(
                "unknown balancer {s:?}: use peak-ewma or round-robin"
            )),
        }
    }
}

/// Whether the node at an index may be chosen.
type Filter<'a> = &'a dyn Fn(usize, &NodeState) -> bool;

/// The nodes one call has tried, by index in its service's snapshot. A call tries a
/// few nodes at most, so a list is smaller and faster than a set, and empty (no
/// allocation) until the first attempt fails.
#[derive(Debug, Default)]
pub struct Tried(Vec<usize>);

impl Tried {
    pub fn insert(&mut self, index: usize) {
        if !self.0.contains(&index) {
            self.0.push(index);
        }
    }

    pub fn contains(&self, index: usize) -> bool {
        self.0.contains(&index)
    }
}

/// Picks a node for the next attempt, avoiding the `tried` ones while others are
/// available; `now` is [`crate::endpoints::clock`]'s.
pub fn pick(set: &ServiceSet, strategy: Strategy, tried: &Tried, now: Duration) -> Option<usize> {
    if set.nodes.is_empty() {
        return None;
    }
    let now_ms = now.as_millis() as u64;
    let filters: [Filter; 3] = [
        &|i, n| !n.is_ejected(now_ms) && !tried.contains(i),
        &|_, n| !n.is_ejected(now_ms),
        &|_, _| true,
    ];
    for ok in filters {
        let tier = set
            .nodes
            .iter()
            .enumerate()
            .filter(|(i, n)| ok(*i, n))
            .map(|(_, n)| n.tier)
            .min();
        let Some(tier) = tier else { continue };
        let candidates = || {
            set.nodes
                .iter()
                .enumerate()
                .filter(move |(i, n)| n.tier == tier && ok(*i, n))
                .map(|(i, _)| i)
        };
        let count = candidates().count();
        let nth = |k: usize| candidates().nth(k).expect("k < count");
        return Some(match (strategy, count) {
            (_, 1) => nth(0),
            (Strategy::RoundRobin, _) => {
                nth(set.shared.cursor.fetch_add(1, Ordering::Relaxed) % count)
            }
            (Strategy::PeakEwma, _) => {
                let a = random() as usize % count;
                let mut b = random() as usize % (count - 1);
                if b >= a {
                    b += 1;
                }
                let (a, b) = (nth(a), nth(b));
                if set.nodes[a].cost(now) <= set.nodes[b].cost(now) {
                    a
                } else {
                    b
                }
            }
        });
    }
    None
}

/// The node at `index`.
pub fn node(set: &ServiceSet, index: usize) -> &Arc<NodeState> {
    &set.nodes[index]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoints::clock;
    use crate::endpoints::{Locality, ServiceShared};
    use std::time::Duration;

    fn set(tiers: &[u8]) -> ServiceSet {
        let _ = Locality::default();
        ServiceSet {
            name: "s".into(),
            nodes: tiers
                .iter()
                .enumerate()
                .map(|(i, t)| Arc::new(NodeState::test(format!("n{i}"), *t)))
                .collect(),
            shared: Arc::new(ServiceShared::test()),
            ejection: Default::default(),
            skipped: Vec::new(),
        }
    }

    #[test]
    fn p2c_prefers_the_faster_node() {
        let s = set(&[0, 0]);
        s.nodes[0].observe(Duration::from_millis(200), clock());
        s.nodes[1].observe(Duration::from_millis(1), clock());
        let fast = (0..100)
            .filter(|_| pick(&s, Strategy::PeakEwma, &Tried::default(), clock()) == Some(1))
            .count();
        assert_eq!(fast, 100, "with two nodes p2c always compares both");
    }

    #[test]
    fn round_robin_cycles() {
        let s = set(&[0, 0, 0]);
        let picks: Vec<_> = (0..6)
            .map(|_| pick(&s, Strategy::RoundRobin, &Tried::default(), clock()).unwrap())
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn nearest_tier_first_then_spill_and_tried_nodes_are_avoided() {
        let tried = |indices: &[usize]| {
            let mut t = Tried::default();
            indices.iter().for_each(|&i| t.insert(i));
            t
        };
        let s = set(&[1, 0, 2]);
        assert_eq!(pick(&s, Strategy::PeakEwma, &tried(&[]), clock()), Some(1));
        assert_eq!(pick(&s, Strategy::PeakEwma, &tried(&[1]), clock()), Some(0));
        assert_eq!(
            pick(&s, Strategy::PeakEwma, &tried(&[0, 1]), clock()),
            Some(2)
        );
        assert_eq!(
            pick(&s, Strategy::PeakEwma, &tried(&[0, 1, 2]), clock()),
            Some(1),
            "all tried: start over"
        );
        assert_eq!(
            pick(&set(&[]), Strategy::PeakEwma, &tried(&[]), clock()),
            None
        );
    }

    #[test]
    fn tried_nodes_past_the_64th_are_avoided_too() {
        // 100 nodes in one tier; all but the last tried: the last is the only choice.
        let s = set(&[0; 100]);
        let all_but_last: Vec<usize> = (0..99).collect();
        let mut t = Tried::default();
        all_but_last.iter().for_each(|&i| t.insert(i));
        for _ in 0..20 {
            assert_eq!(pick(&s, Strategy::PeakEwma, &t, clock()), Some(99));
            assert_eq!(pick(&s, Strategy::RoundRobin, &t, clock()), Some(99));
        }
        t.insert(99);
        t.insert(98); // twice: no double entry
        assert!(
            pick(&s, Strategy::PeakEwma, &t, clock()).is_some(),
            "all tried: start over"
        );
    }
}
