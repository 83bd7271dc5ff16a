//! Node selection for one attempt: the nearest locality tier that has an available
//! node, then power-of-two-choices over peak-EWMA cost (default) or round-robin.
//!
//! "Available" means not ejected and not already tried by this request. When every
//! node was tried, tried ones are allowed again; when every node is ejected (which
//! ejection's 50% cap prevents except in races), ejected ones are used rather than
//! failing outright.

use std::cell::Cell;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::endpoints::{clock, NodeState, ServiceSet};

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

/// Picks a node for the next attempt, avoiding the indices set in the `tried` bit
/// mask (nodes past the 64th are never marked).
pub fn pick(set: &ServiceSet, strategy: Strategy, tried: u64) -> Option<usize> {
    if set.nodes.is_empty() {
        return None;
    }
    let now_ms = clock().as_millis() as u64;
    let filters: [Filter; 3] = [
        &|i, n| !n.is_ejected(now_ms) && (i >= 64 || tried & (1 << i) == 0),
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
                if set.nodes[a].cost() <= set.nodes[b].cost() {
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

/// A fast per-thread pseudo-random number (xorshift64*), seeded from the OS once.
pub fn random() -> u64 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new(u64::from_le_bytes(pillion_core::id::random_bytes::<8>()) | 1);
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
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
        }
    }

    #[test]
    fn p2c_prefers_the_faster_node() {
        let s = set(&[0, 0]);
        s.nodes[0].observe(Duration::from_millis(200));
        s.nodes[1].observe(Duration::from_millis(1));
        let fast = (0..100)
            .filter(|_| pick(&s, Strategy::PeakEwma, 0) == Some(1))
            .count();
        assert_eq!(fast, 100, "with two nodes p2c always compares both");
    }

    #[test]
    fn round_robin_cycles() {
        let s = set(&[0, 0, 0]);
        let picks: Vec<_> = (0..6)
            .map(|_| pick(&s, Strategy::RoundRobin, 0).unwrap())
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn nearest_tier_first_then_spill_and_tried_nodes_are_avoided() {
        let s = set(&[1, 0, 2]);
        assert_eq!(pick(&s, Strategy::PeakEwma, 0), Some(1));
        assert_eq!(pick(&s, Strategy::PeakEwma, 0b010), Some(0));
        assert_eq!(pick(&s, Strategy::PeakEwma, 0b011), Some(2));
        assert_eq!(
            pick(&s, Strategy::PeakEwma, 0b111),
            Some(1),
            "all tried: start over"
        );
        assert_eq!(pick(&set(&[]), Strategy::PeakEwma, 0), None);
    }
}
