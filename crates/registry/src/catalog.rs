//! The read side of the registry: an immutable snapshot of every service, swapped in
//! atomically, so readers never lock.
//!
//! A change to one service must not cost a copy of every other: the snapshot is a
//! sorted sequence of entries (one per service name, each an `Arc` of its versions)
//! cut into chunks of at most [`MAX_CHUNK`] entries, each chunk behind an `Arc`.
//! [`Catalog::with_service`] copies the list of chunk pointers (one pointer per
//! [`MAX_CHUNK`] / 2 services or so) and the one chunk that holds the name, and shares
//! everything else with the snapshot it came from. Listing stays in name order with no
//! sorting, and a lookup is two binary searches.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use pillion_core::{Node, Service};

/// Entries per chunk before it is split in two. Small enough that copying one chunk
/// is a few hundred nanoseconds, large enough that the list of chunks stays short
/// (400 pointers for 50,000 services).
const MAX_CHUNK: usize = 128;
/// A chunk this small is merged into a neighbour when their sum fits in one chunk, so
/// removals cannot leave a long list of nearly empty chunks.
const MIN_CHUNK: usize = MAX_CHUNK / 4;

/// Every version of one service name: never empty, sorted by version, every version
/// with at least one node (sorted by id).
type Entry = Arc<[Service]>;

/// Every registered service, by name; one entry per version.
#[derive(Clone, Default)]
pub struct Catalog {
    /// Non-empty chunks of entries, the entries sorted by name across all chunks.
    chunks: Vec<Arc<Vec<Entry>>>,
    /// The number of names.
    len: usize,
}

fn name_of(entry: &Entry) -> &str {
    &entry[0].name
}

/// The versions of one service from its per-node registrations, merged as
/// [`Catalog::build`] documents. `None` when no registration has a node.
fn merge<'a>(registrations: impl IntoIterator<Item = &'a Service>) -> Option<Entry> {
    let mut by_version: BTreeMap<&str, (Service, BTreeMap<&str, &Node>)> = BTreeMap::new();
    for reg in registrations {
        let entry = by_version
            .entry(reg.version.as_str())
            .or_insert_with(|| (reg.without_nodes(), BTreeMap::new()));
        for node in &reg.nodes {
            entry.1.insert(node.id.as_str(), node);
        }
    }
    let versions: Vec<Service> = by_version
        .into_values()
        .filter(|(_, nodes)| !nodes.is_empty())
        .map(|(mut service, nodes)| {
            service.nodes = nodes.into_values().cloned().collect();
            service
        })
        .collect();
    (!versions.is_empty()).then(|| versions.into())
}

impl Catalog {
    /// Builds a catalog from per-node registrations (each a service with its nodes),
    /// merging nodes of the same name and version. The last registration of a node id
    /// wins; a version's own metadata is that of its first registration; nodes are
    /// sorted by id so the output is stable.
    pub fn build<'a>(registrations: impl IntoIterator<Item = &'a Service>) -> Catalog {
        let mut by_name: BTreeMap<&str, Vec<&Service>> = BTreeMap::new();
        for reg in registrations {
            by_name.entry(reg.name.as_str()).or_default().push(reg);
        }
        let entries: Vec<Entry> = by_name.into_values().filter_map(merge).collect();
        let len = entries.len();
        let chunks = entries
            .chunks(MAX_CHUNK / 2)
            .map(|c| Arc::new(c.to_vec()))
            .collect();
        Catalog { chunks, len }
    }

    /// This catalog with the entry of `name` rebuilt from `registrations` (the
    /// service's per-node registrations, merged as [`Catalog::build`] does; those of
    /// other names are ignored). No registration with a node removes the name. Every
    /// other service is shared with `self`, so the cost is that of one service.
    pub fn with_service<'a>(
        &self,
        name: &str,
        registrations: impl IntoIterator<Item = &'a Service>,
    ) -> Catalog {
        let entry = merge(registrations.into_iter().filter(|r| r.name == name));
        let mut next = self.clone();
        if next.chunks.is_empty() {
            if let Some(entry) = entry {
                next.chunks.push(Arc::new(vec![entry]));
                next.len = 1;
            }
            return next;
        }
        // The first chunk whose last name is not below `name`; a name above every
        // other goes at the end of the last chunk.
        let at = next
            .chunks
            .partition_point(|c| name_of(c.last().expect("chunks are non-empty")) < name)
            .min(next.chunks.len() - 1);
        let found = next.chunks[at].binary_search_by(|e| name_of(e).cmp(name));
        let chunk = match (found, entry) {
            (Ok(i), Some(entry)) => {
                Arc::make_mut(&mut next.chunks[at])[i] = entry;
                return next;
            }
            (Ok(i), None) => {
                next.len -= 1;
                let chunk = Arc::make_mut(&mut next.chunks[at]);
                chunk.remove(i);
                chunk
            }
            (Err(i), Some(entry)) => {
                next.len += 1;
                let chunk = Arc::make_mut(&mut next.chunks[at]);
                chunk.insert(i, entry);
                chunk
            }
            (Err(_), None) => return next,
        };
        if chunk.len() > MAX_CHUNK {
            let upper = chunk.split_off(chunk.len() / 2);
            next.chunks.insert(at + 1, Arc::new(upper));
        } else if chunk.is_empty() {
            next.chunks.remove(at);
        } else if chunk.len() < MIN_CHUNK {
            next.merge_small(at);
        }
        next
    }

    /// Merges the small chunk `at` with a neighbour when both fit in one chunk.
    fn merge_small(&mut self, at: usize) {
        let fits = |other: usize| {
            self.chunks
                .get(other)
                .is_some_and(|c| c.len() + self.chunks[at].len() <= MAX_CHUNK)
        };
        let (left, right) = if at > 0 && fits(at - 1) {
            (at - 1, at)
        } else if fits(at + 1) {
            (at, at + 1)
        } else {
            return;
        };
        let moved = self.chunks.remove(right);
        Arc::make_mut(&mut self.chunks[left]).extend(moved.iter().cloned());
    }

    /// Every version of the service `name`, if any node serves it.
    pub fn get(&self, name: &str) -> Option<&[Service]> {
        let at = self
            .chunks
            .partition_point(|c| name_of(c.last().expect("chunks are non-empty")) < name);
        let chunk = self.chunks.get(at)?;
        let i = chunk.binary_search_by(|e| name_of(e).cmp(name)).ok()?;
        Some(&chunk[i])
    }

    fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.chunks.iter().flat_map(|c| c.iter())
    }

    /// Every service, ordered by name then version.
    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.entries().flat_map(|e| e.iter())
    }

    /// Names of the services known, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries().map(name_of)
    }

    /// The number of service names.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Two catalogs are equal when they list the same services, however their chunks are
/// cut.
impl PartialEq for Catalog {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len
            && self
                .entries()
                .zip(other.entries())
                .all(|(a, b)| Arc::ptr_eq(a, b) || a == b)
    }
}

impl Eq for Catalog {}

impl fmt::Debug for Catalog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.entries().map(|e| (name_of(e), &e[..])))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(name: &str, id: &str) -> Service {
        Service {
            name: name.into(),
            nodes: vec![Node {
                id: id.into(),
                address: "127.0.0.1:1".into(),
                ..Node::default()
            }],
            ..Service::default()
        }
    }

    #[test]
    fn a_change_copies_one_chunk_and_shares_the_others() {
        let regs: Vec<Service> = (0..1000).map(|i| one(&format!("s{i:04}"), "n")).collect();
        let before = Catalog::build(&regs);
        let after = before.with_service("s0500", [&one("s0500", "m")]);
        let shared = before
            .chunks
            .iter()
            .zip(&after.chunks)
            .filter(|(a, b)| Arc::ptr_eq(a, b))
            .count();
        assert_eq!(shared, before.chunks.len() - 1, "only one chunk is copied");
        assert_eq!(after.get("s0500").unwrap()[0].nodes[0].id, "m");
        assert_eq!(before.get("s0500").unwrap()[0].nodes[0].id, "n");
    }

    #[test]
    fn chunks_split_when_full_and_merge_when_nearly_empty() {
        let regs: Vec<Service> = (0..2000).map(|i| one(&format!("s{i:04}"), "n")).collect();
        let mut c = Catalog::default();
        for r in &regs {
            c = c.with_service(&r.name, [r]);
        }
        assert!(c.chunks.iter().all(|ch| ch.len() <= MAX_CHUNK));
        assert!(c.chunks.len() >= 2000 / MAX_CHUNK);
        for r in regs.iter().skip(10) {
            c = c.with_service(&r.name, []);
        }
        assert_eq!(c.len(), 10);
        assert_eq!(c.chunks.len(), 1, "the survivors end up in one chunk");
        assert_eq!(c, Catalog::build(&regs[..10]));
    }
}
