//! The in-process registry: registrations live in this process only (`--registry
//! memory`); two sidecars do not see each other through it (the default, `cluster`,
//! and etcd are for that).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use pillion_core::Service;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{deregisters, per_node, BackendStatus, Catalog, Deadlines, Registry, RegistryError};

/// What the catalog does not show of the registrations, and their deadlines.
///
/// The catalog holds the registrations already: node n of version v was registered as
/// v's service (its name, version, metadata and endpoints) with node n. It cannot tell
/// them when nodes of one version were registered with different service metadata or
/// endpoints, as it keeps only the first one's: for those services alone the
/// registrations are kept here too, so that each registration is stored once in the
/// common case (this is most of the registry's memory at 50,000 services).
#[derive(Default)]
struct State {
    /// name -> its per-node registrations, sorted by node id, for the services whose
    /// catalog entry cannot reproduce them.
    unlike: HashMap<String, Vec<Service>>,
    /// (name, node id) of the registrations with a TTL.
    deadlines: Deadlines<(String, String)>,
}

pub struct MemoryRegistry {
    inner: Arc<Inner>,
    /// The expiry task, ended when the registry is dropped.
    _tasks: crate::Tasks,
}

struct Inner {
    // The mutex serialises writers; readers use `catalog`.
    state: Mutex<State>,
    catalog: ArcSwap<Catalog>,
    changes: watch::Sender<u64>,
    expiry_changed: Notify,
}

impl MemoryRegistry {
    /// Creates the registry and its expiry task. Must be called within a tokio runtime.
    pub fn new() -> Self {
        let inner = Arc::new(Inner {
            state: Mutex::new(State::default()),
            catalog: ArcSwap::from_pointee(Catalog::default()),
            changes: watch::channel(0).0,
            expiry_changed: Notify::new(),
        });
        let tasks = crate::Tasks::default();
        tasks.spawn(expire(Arc::downgrade(&inner), tasks.token()));
        MemoryRegistry {
            inner,
            _tasks: tasks,
        }
    }
}

impl Default for MemoryRegistry {
    fn default() -> Self {
        Self::new()
    }
}

fn node_id(reg: &Service) -> &str {
    &reg.nodes[0].id
}

/// Whether the catalog entry `versions` tells every one of `regs` as it was made.
fn reproduces(versions: Option<&[Service]>, regs: &[Service]) -> bool {
    let versions = versions.unwrap_or_default();
    regs.iter().all(|reg| {
        versions
            .iter()
            .find(|v| v.version == reg.version)
            .is_some_and(|v| v.metadata == reg.metadata && v.endpoints == reg.endpoints)
    })
}

impl Inner {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind, still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies `edit` to the per-node registrations of `name` (sorted by node id) and,
    /// when it reports a change, swaps in a catalog with that service rebuilt and
    /// every other shared. Called with the state locked, so writers never publish out
    /// of order.
    fn change<R>(
        &self,
        state: &mut State,
        name: &str,
        edit: impl FnOnce(&mut Vec<Service>) -> (bool, R),
    ) -> R {
        let current = self.catalog.load_full();
        let mut regs = match state.unlike.get(name) {
            Some(regs) => regs.clone(),
            None => {
                let mut regs: Vec<Service> = current
                    .get(name)
                    .into_iter()
                    .flatten()
                    .flat_map(per_node)
                    .collect();
                regs.sort_by(|a, b| node_id(a).cmp(node_id(b)));
                regs
            }
        };
        let (changed, result) = edit(&mut regs);
        if !changed {
            return result;
        }
        let next = current.with_service(name, &regs);
        if reproduces(next.get(name), &regs) {
            state.unlike.remove(name);
        } else {
            state.unlike.insert(name.to_string(), regs);
        }
        self.catalog.store(Arc::new(next));
        self.changes.send_modify(|v| *v += 1);
        result
    }
}

/// Removes the registrations of `ids` from `regs`; whether any was there.
fn remove_ids(regs: &mut Vec<Service>, ids: &[&str]) -> (bool, ()) {
    let before = regs.len();
    regs.retain(|r| !ids.contains(&node_id(r)));
    (regs.len() != before, ())
}

/// Removes registrations whose TTL lapsed, sleeping until the next one is due, until
/// `stop` (the registry is dropped).
async fn expire(inner: Weak<Inner>, stop: CancellationToken) {
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let next = {
            let mut state = strong.state();
            let mut lapsed = state.deadlines.lapsed(Instant::now());
            lapsed.sort_unstable();
            for group in lapsed.chunk_by(|a, b| a.0 == b.0) {
                let ids: Vec<&str> = group.iter().map(|(_, id)| id.as_str()).collect();
                strong.change(&mut state, &group[0].0, |regs| remove_ids(regs, &ids));
            }
            state.deadlines.next()
        };
        let wake = strong.clone();
        drop(strong);
        if !crate::wait_for_expiry(next, &wake.expiry_changed, &stop).await {
            return;
        }
    }
}

#[async_trait::async_trait]
impl Registry for MemoryRegistry {
    async fn register(
        &self,
        service: &Service,
        ttl: Option<Duration>,
    ) -> Result<(), RegistryError> {
        let deadline = ttl.map(|t| Instant::now() + t);
        let mut state = self.inner.state();
        self.inner.change(&mut state, &service.name, |regs| {
            for reg in per_node(service) {
                match regs.binary_search_by(|r| node_id(r).cmp(node_id(&reg))) {
                    Ok(i) => regs[i] = reg,
                    Err(i) => regs.insert(i, reg),
                }
            }
            (true, ())
        });
        for node in &service.nodes {
            state
                .deadlines
                .set(&(service.name.clone(), node.id.clone()), deadline);
        }
        drop(state);
        self.inner.expiry_changed.notify_one();
        Ok(())
    }

    async fn deregister(&self, service: &Service) -> Result<usize, RegistryError> {
        let mut state = self.inner.state();
        let removed: Vec<String> = self.inner.change(&mut state, &service.name, |regs| {
            let ids: Vec<String> = regs
                .iter()
                .filter(|reg| deregisters(service, reg))
                .map(|reg| node_id(reg).to_string())
                .collect();
            let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
            remove_ids(regs, &refs);
            (!ids.is_empty(), ids)
        });
        for id in &removed {
            state
                .deadlines
                .set(&(service.name.clone(), id.clone()), None);
        }
        Ok(removed.len())
    }

    fn catalog(&self) -> Arc<Catalog> {
        self.inner.catalog.load_full()
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    fn status(&self) -> BackendStatus {
        BackendStatus {
            backend: "memory".into(),
            healthy: true,
            error: None,
        }
    }

    async fn close(&self) {}
}
