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

use crate::{deregisters, per_node, BackendStatus, Catalog, Registry, RegistryError};

/// (service name, node id) -> the node's registration and when it expires.
type Entries = HashMap<(String, String), (Service, Option<Instant>)>;

pub struct MemoryRegistry {
    inner: Arc<Inner>,
}

struct Inner {
    // The mutex serialises writers (registrations are rare); readers use `catalog`.
    entries: Mutex<Entries>,
    catalog: ArcSwap<Catalog>,
    changes: watch::Sender<u64>,
    expiry_changed: Notify,
}

impl MemoryRegistry {
    /// Creates the registry and its expiry task. Must be called within a tokio runtime.
    pub fn new() -> Self {
        let inner = Arc::new(Inner {
            entries: Mutex::new(HashMap::new()),
            catalog: ArcSwap::from_pointee(Catalog::default()),
            changes: watch::channel(0).0,
            expiry_changed: Notify::new(),
        });
        tokio::spawn(expire(Arc::downgrade(&inner)));
        MemoryRegistry { inner }
    }
}

impl Default for MemoryRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl Inner {
    fn entries(&self) -> std::sync::MutexGuard<'_, Entries> {
        // A panic while holding the lock leaves plain data behind, still usable.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, entries: &Entries) {
        self.catalog
            .store(Arc::new(Catalog::build(entries.values().map(|(s, _)| s))));
        self.changes.send_modify(|v| *v += 1);
    }
}

/// Removes registrations whose TTL lapsed, sleeping until the next one is due.
async fn expire(inner: Weak<Inner>) {
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let next = {
            let mut entries = strong.entries();
            let now = Instant::now();
            let before = entries.len();
            entries.retain(|_, (_, deadline)| deadline.is_none_or(|d| d > now));
            if entries.len() != before {
                strong.publish(&entries);
            }
            entries.values().filter_map(|(_, d)| *d).min()
        };
        let wake = strong.clone();
        drop(strong);
        crate::wait_for_expiry(next, &wake.expiry_changed).await;
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
        let mut entries = self.inner.entries();
        for reg in per_node(service) {
            let key = (reg.name.clone(), reg.nodes[0].id.clone());
            entries.insert(key, (reg, deadline));
        }
        self.inner.publish(&entries);
        drop(entries);
        self.inner.expiry_changed.notify_one();
        Ok(())
    }

    async fn deregister(&self, service: &Service) -> Result<usize, RegistryError> {
        let mut entries = self.inner.entries();
        let before = entries.len();
        entries.retain(|_, (reg, _)| !deregisters(service, reg));
        let removed = before - entries.len();
        if removed > 0 {
            self.inner.publish(&entries);
        }
        Ok(removed)
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
