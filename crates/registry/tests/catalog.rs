//! `Catalog::with_service`, the incremental update both adapters use, against
//! `Catalog::build` from scratch: after any sequence of registrations and
//! deregistrations the two catalogs list the same services.

use std::collections::BTreeMap;

use pillion_core::{Node, Service};
use pillion_registry::Catalog;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Register {
        name: usize,
        version: usize,
        node: usize,
        port: u16,
    },
    Deregister {
        name: usize,
        node: usize,
    },
    /// Every node of the name goes: the name is removed.
    DeregisterAll {
        name: usize,
    },
}

fn op(names: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..names, 0..3usize, 0..4usize, 1..u16::MAX).prop_map(|(name, version, node, port)| {
            Op::Register { name, version, node, port }
        }),
        3 => (0..names, 0..4usize).prop_map(|(name, node)| Op::Deregister { name, node }),
        1 => (0..names).prop_map(|name| Op::DeregisterAll { name }),
    ]
}

fn name(i: usize) -> String {
    format!("svc-{i:04}")
}

/// What a registry stores: one registration per (name, node id).
type Model = BTreeMap<(String, String), Service>;

fn registrations<'a>(model: &'a Model, name: &'a str) -> impl Iterator<Item = &'a Service> {
    model
        .range((name.to_string(), String::new())..)
        .take_while(move |((n, _), _)| n == name)
        .map(|(_, reg)| reg)
}

fn apply(model: &mut Model, op: &Op) -> String {
    match *op {
        Op::Register {
            name: n,
            version,
            node,
            port,
        } => {
            let id = format!("{}-{node}", name(n));
            let reg = Service {
                name: name(n),
                version: ["", "1", "2"][version].into(),
                metadata: [("v".to_string(), version.to_string())].into(),
                nodes: vec![Node {
                    id: id.clone(),
                    address: format!("127.0.0.1:{port}"),
                    ..Node::default()
                }],
                ..Service::default()
            };
            model.insert((name(n), id), reg);
            name(n)
        }
        Op::Deregister { name: n, node } => {
            model.remove(&(name(n), format!("{}-{node}", name(n))));
            name(n)
        }
        Op::DeregisterAll { name: n } => {
            model.retain(|(m, _), _| *m != name(n));
            name(n)
        }
    }
}

fn assert_same(incremental: &Catalog, built: &Catalog) {
    assert_eq!(incremental, built);
    assert_eq!(incremental.len(), built.len());
    assert_eq!(incremental.is_empty(), built.is_empty());
    assert_eq!(
        incremental.names().collect::<Vec<_>>(),
        built.names().collect::<Vec<_>>()
    );
    assert_eq!(
        incremental.services().collect::<Vec<_>>(),
        built.services().collect::<Vec<_>>()
    );
    for name in built.names() {
        assert_eq!(incremental.get(name), built.get(name), "{name}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Few names, many changes to each: versions come and go, nodes move between them.
    #[test]
    fn with_service_equals_build_for_few_busy_services(ops in prop::collection::vec(op(6), 1..200)) {
        let mut model = Model::new();
        let mut catalog = Catalog::default();
        for op in &ops {
            let changed = apply(&mut model, op);
            catalog = catalog.with_service(&changed, registrations(&model, &changed));
            assert_same(&catalog, &Catalog::build(model.values()));
        }
    }

    /// Many names (hundreds, so the catalog's chunks split and merge), in any order.
    #[test]
    fn with_service_equals_build_for_many_services(ops in prop::collection::vec(op(700), 1..1500)) {
        let mut model = Model::new();
        let mut catalog = Catalog::default();
        for op in &ops {
            let changed = apply(&mut model, op);
            catalog = catalog.with_service(&changed, registrations(&model, &changed));
        }
        assert_same(&catalog, &Catalog::build(model.values()));
    }
}

#[test]
fn a_catalog_built_at_once_takes_changes_like_one_built_by_changes() {
    let regs: Vec<Service> = (0..3000)
        .map(|i| Service {
            name: name(i),
            nodes: vec![Node {
                id: format!("n{i}"),
                address: "127.0.0.1:1".into(),
                ..Node::default()
            }],
            ..Service::default()
        })
        .collect();
    let mut catalog = Catalog::build(&regs);
    for reg in regs.iter().step_by(3) {
        catalog = catalog.with_service(&reg.name, []);
    }
    let kept: Vec<&Service> = regs
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 3 != 0)
        .map(|(_, r)| r)
        .collect();
    assert_same(&catalog, &Catalog::build(kept.iter().copied()));
    assert!(catalog.get(&name(0)).is_none());
    assert_eq!(catalog.get(&name(1)).unwrap()[0].nodes[0].id, "n1");
    assert!(catalog.get("zzz").is_none() && catalog.get("").is_none());
}

#[test]
fn registrations_of_another_name_are_ignored() {
    let other = Service {
        name: "other".into(),
        nodes: vec![Node {
            id: "o".into(),
            address: "127.0.0.1:1".into(),
            ..Node::default()
        }],
        ..Service::default()
    };
    let catalog = Catalog::default().with_service("mine", [&other]);
    assert!(catalog.is_empty());
}
