//! The read side of the registry: an immutable snapshot of every service, rebuilt on
//! each change and swapped in atomically, so readers never lock.

use std::collections::BTreeMap;

use pillion_core::{Node, Service};

/// Every registered service, by name; one entry per version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Catalog {
    services: BTreeMap<String, Vec<Service>>,
}

impl Catalog {
    /// Builds a catalog from per-node registrations (each a service with its nodes),
    /// merging nodes of the same name and version. The last registration of a node id
    /// wins; nodes are sorted by id so the output is stable.
    pub fn build<'a>(registrations: impl IntoIterator<Item = &'a Service>) -> Catalog {
        let mut by_version: BTreeMap<(String, String), (Service, BTreeMap<String, Node>)> =
            BTreeMap::new();
        for reg in registrations {
            let entry = by_version
                .entry((reg.name.clone(), reg.version.clone()))
                .or_insert_with(|| (reg.without_nodes(), BTreeMap::new()));
            for node in &reg.nodes {
                entry.1.insert(node.id.clone(), node.clone());
            }
        }
        let mut services: BTreeMap<String, Vec<Service>> = BTreeMap::new();
        for ((name, _), (mut service, nodes)) in by_version {
            if nodes.is_empty() {
                continue;
            }
            service.nodes = nodes.into_values().collect();
            services.entry(name).or_default().push(service);
        }
        Catalog { services }
    }

    /// The same catalog with the entry of `name` rebuilt from its per-node
    /// `registrations` (none: the name is removed).
    pub fn with_service<'a>(
        &self,
        name: &str,
        registrations: impl IntoIterator<Item = &'a Service>,
    ) -> Catalog {
        let mut services = self.services.clone();
        services.remove(name);
        let rebuilt = Catalog::build(registrations.into_iter().filter(|r| r.name == name));
        services.extend(rebuilt.services);
        Catalog { services }
    }

    /// Every version of the service `name`, if any node serves it.
    pub fn get(&self, name: &str) -> Option<&[Service]> {
        self.services.get(name).map(Vec::as_slice)
    }

    /// Every service, ordered by name then version.
    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.services.values().flatten()
    }

    /// Names of the services known.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.services.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.services.len()
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }
}
