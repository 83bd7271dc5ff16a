//! go-micro's mDNS registry (`--registry mdns`): no server; every sidecar answers for
//! what it registered and browses the LAN for the rest, in the records go-micro's
//! mdns registry announces and reads, so go-micro services (whose default registry it
//! is from v2) and apps behind pillion find each other.
//!
//! It follows go-micro v2.9.1's `registry/mdns_registry.go` and `util/mdns` (zone.go,
//! server.go, client.go; unchanged in v5's `internal/util/mdns`):
//!
//! - the domain is `micro.`, not `local.`;
//! - node `id` of service `name` is the instance `{id}.{name}.micro.`: a PTR from
//!   `{name}.micro.` to it, its SRV (priority 10, weight 1, the node's port, the host
//!   name as target), the host's A or AAAA record, and its TXT: the JSON of
//!   `{"Service","Version","Endpoints","Metadata"}` (the node's metadata), zlib
//!   compressed, hex encoded and cut into strings of 255 characters;
//! - each service name also has a wildcard instance `{name}._services.micro.` (port
//!   9999, address 0.0.0.0, no TXT) so that a query for `_services.micro.` lists the
//!   names;
//! - an answer goes to the address the query came from, echoes the question (go-micro's
//!   client drops answers to other questions) and carries one node: go-micro's client
//!   takes one node from each packet;
//! - leaving is a multicast answer with TTL 0 (go-micro's `unregister`).
//!
//! What is heard is kept while it keeps answering: the names are asked for every
//! [`BROWSE_EVERY`], and a node not heard for [`FORGET_AFTER`] is dropped (at once on
//! its TTL-0 goodbye). This sidecar's own registrations are a [`MemoryRegistry`] (TTLs
//! honoured there), announced when they appear and said goodbye to when they go.
//!
//! Everything heard is untrusted: a TXT is read within [`MAX_TXT`] bytes, compressed
//! or not, and a node is taken only when it passes the API's validation; answers are
//! rate-limited ([`ANSWERS_PER_SECOND`]) so a flood of queries cannot make this sidecar
//! flood the LAN.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::rdata::{A, AAAA, PTR, SRV, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use pillion_core::Service;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cluster::mdns::{GROUP, PORT};
use crate::memory::MemoryRegistry;
use crate::{per_node, BackendStatus, Catalog, Registry, RegistryError, Tasks};

/// go-micro's mDNS domain (`mdnsDomain`).
pub const DOMAIN: &str = "micro";
/// go-micro's `defaultTTL`.
const TTL_SECS: u32 = 120;
/// How long close waits for the tasks to send what they have in hand.
const STOP_WAIT: Duration = Duration::from_secs(2);
/// The service of the wildcard instances that list the names.
const WILDCARD: &str = "_services";
const WILDCARD_PORT: u16 = 9999;
/// How often the LAN is asked for the names and their nodes.
pub const BROWSE_EVERY: Duration = Duration::from_secs(2);
/// A node not heard for this long (three rounds of asking) is dropped.
pub const FORGET_AFTER: Duration = Duration::from_millis(7_000);
/// The largest TXT read, hex encoded or inflated: go-micro's TXT of a service with
/// large endpoint descriptions fits many times over.
pub const MAX_TXT: usize = 64 * 1024;
/// At most this many queries are answered a second.
pub const ANSWERS_PER_SECOND: u32 = 50;
/// How long a node this sidecar stopped announcing is not taken back from an answer
/// still in flight.
const RETIRED_FOR: Duration = Duration::from_secs(3);

/// The TXT of a node, with go-micro's field names (`mdnsTxt`).
#[derive(Serialize, Deserialize)]
struct MdnsTxt {
    #[serde(rename = "Service", default)]
    service: String,
    #[serde(rename = "Version", default)]
    version: Value,
    #[serde(rename = "Endpoints", default)]
    endpoints: Value,
    #[serde(rename = "Metadata", default)]
    metadata: Value,
}

/// go-micro's `encode`: JSON, zlib, hex, strings of at most 255 characters.
fn encode_txt(reg: &Service) -> Vec<String> {
    let node = &reg.nodes[0];
    let txt = MdnsTxt {
        service: reg.name.clone(),
        version: Value::String(reg.version.clone()),
        endpoints: if reg.endpoints.is_empty() {
            Value::Null
        } else {
            Value::Array(reg.endpoints.clone())
        },
        // go-micro's TXT has one metadata map: the service's, then the node's over it,
        // so that a service-wide `protocol` reaches the other side.
        metadata: serde_json::to_value(
            reg.metadata
                .iter()
                .chain(&node.metadata)
                .collect::<std::collections::BTreeMap<_, _>>(),
        )
        .expect("a map serializes"),
    };
    let json = serde_json::to_vec(&txt).expect("the TXT serializes");
    let packed = miniz_oxide::deflate::compress_to_vec_zlib(&json, 6);
    let hex: String = packed.iter().map(|b| format!("{b:02x}")).collect();
    hex.as_bytes()
        .chunks(255)
        .map(|c| String::from_utf8(c.to_vec()).expect("hex is ASCII"))
        .collect()
}

/// go-micro's `decode`, within [`MAX_TXT`].
fn decode_txt(strings: &[Box<[u8]>]) -> Option<MdnsTxt> {
    let hex: Vec<u8> = strings.iter().flat_map(|s| s.iter().copied()).collect();
    if hex.len() > 2 * MAX_TXT || !hex.len().is_multiple_of(2) {
        return None;
    }
    let packed: Vec<u8> = hex
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok())
        .collect::<Option<_>>()?;
    let json = miniz_oxide::inflate::decompress_to_vec_zlib_with_limit(&packed, MAX_TXT).ok()?;
    serde_json::from_slice(&json).ok()
}

/// The registration a node's TXT and address stand for, validated as the API
/// validates what it is given.
fn registration(txt: MdnsTxt, id: &str, address: String) -> Option<Service> {
    let value = serde_json::json!({
        "name": txt.service,
        "version": txt.version,
        "endpoints": txt.endpoints,
        "nodes": [{"id": id, "address": address, "metadata": txt.metadata}],
    });
    Service::from_json(value.to_string().as_bytes()).ok()
}

fn fqdn(text: &str) -> Option<Name> {
    Name::from_str(text).ok().filter(|n| n.is_fqdn())
}

/// What one answer says.
#[derive(Debug, Default, PartialEq)]
struct Heard {
    /// Nodes, by instance name.
    nodes: Vec<(String, Service)>,
    /// Instances that said goodbye (TTL 0).
    gone: Vec<String>,
    /// Service names listed by wildcard instances.
    names: Vec<String>,
}

/// Reads an answer the way go-micro's client and registry read one (`messageToEntry`,
/// `GetService`, `ListServices`): an instance's SRV, the A or AAAA of its target and
/// its TXT make a node; an SRV or TXT with TTL 0 is a goodbye.
fn hear(message: &Message, domain: &str) -> Heard {
    let mut out = Heard::default();
    let records: Vec<&Record> = message
        .answers()
        .iter()
        .chain(message.additionals())
        .collect();
    let wildcard = format!("{WILDCARD}.{domain}.");
    let wildcard_suffix = format!(".{wildcard}");
    let addresses = |host: &Name| -> Option<IpAddr> {
        let mut v6 = None;
        for r in &records {
            if r.name() != host || r.ttl() == 0 {
                continue;
            }
            match r.data() {
                RData::A(A(ip)) => return Some(IpAddr::V4(*ip)),
                RData::AAAA(AAAA(ip)) => v6 = v6.or(Some(IpAddr::V6(*ip))),
                _ => {}
            }
        }
        v6
    };
    for r in &records {
        let name = r.name().to_string();
        match r.data() {
            RData::PTR(PTR(target)) if name == wildcard && r.ttl() > 0 => {
                if let Some(service) = target.to_string().strip_suffix(&wildcard_suffix) {
                    out.names.push(service.to_string());
                }
            }
            RData::SRV(_) | RData::TXT(_) if r.ttl() == 0 && !out.gone.contains(&name) => {
                out.gone.push(name);
            }
            RData::SRV(_) | RData::TXT(_) if r.ttl() == 0 => {}
            RData::SRV(srv) if !name.ends_with(&wildcard_suffix) => {
                let txt = records.iter().find_map(|t| match t.data() {
                    RData::TXT(txt) if t.name() == r.name() => Some(txt),
                    _ => None,
                });
                let Some(txt) = txt.and_then(|t| decode_txt(t.txt_data())) else {
                    continue;
                };
                let Some(ip) = addresses(srv.target()) else {
                    continue;
                };
                let suffix = format!(".{}.{domain}.", txt.service);
                let Some(id) = name.strip_suffix(&suffix) else {
                    continue;
                };
                let address = SocketAddr::new(ip, srv.port()).to_string();
                if let Some(reg) = registration(txt, id, address) {
                    out.nodes.push((name, reg));
                }
            }
            _ => {}
        }
    }
    out
}

/// The records go-micro's zone gives for node `reg` (one node) on `host`, or why it
/// cannot be announced.
fn node_records(reg: &Service, host: &Name, domain: &str, ttl: u32) -> Result<Vec<Record>, String> {
    let node = &reg.nodes[0];
    let endpoint = node.endpoint();
    let addr: SocketAddr = endpoint.parse().map_err(|_| {
        format!("its address {endpoint} is not IP:port, and mDNS announces an IP address")
    })?;
    let service = fqdn(&format!("{}.{domain}.", reg.name)).ok_or("its name is not a DNS name")?;
    let instance = fqdn(&format!("{}.{}.{domain}.", node.id, reg.name))
        .ok_or("its node id is not a DNS name")?;
    let txt = encode_txt(reg);
    Ok(vec![
        Record::from_rdata(service, ttl, RData::PTR(PTR(instance.clone()))),
        Record::from_rdata(
            instance.clone(),
            ttl,
            RData::SRV(SRV::new(10, 1, addr.port(), host.clone())),
        ),
        address_record(host, addr.ip(), ttl),
        Record::from_rdata(instance, ttl, RData::TXT(TXT::new(txt))),
    ])
}

fn address_record(host: &Name, ip: IpAddr, ttl: u32) -> Record {
    let data = match ip {
        IpAddr::V4(ip) => RData::A(A(ip)),
        IpAddr::V6(ip) => RData::AAAA(AAAA(ip)),
    };
    Record::from_rdata(host.clone(), ttl, data)
}

/// The wildcard instance of service `name`, which lists it under `_services`.
fn wildcard_records(name: &str, host: &Name, domain: &str) -> Option<Vec<Record>> {
    let list = fqdn(&format!("{WILDCARD}.{domain}."))?;
    let instance = fqdn(&format!("{name}.{WILDCARD}.{domain}."))?;
    Some(vec![
        Record::from_rdata(list, TTL_SECS, RData::PTR(PTR(instance.clone()))),
        Record::from_rdata(
            instance.clone(),
            TTL_SECS,
            RData::SRV(SRV::new(10, 1, WILDCARD_PORT, host.clone())),
        ),
        address_record(host, IpAddr::V4(Ipv4Addr::UNSPECIFIED), TTL_SECS),
        Record::from_rdata(instance, TTL_SECS, RData::TXT(TXT::new(Vec::new()))),
    ])
}

/// An answer: `records`, after the `question` it answers, if any.
fn answer(question: Option<&Query>, id: u16, records: Vec<Record>) -> Vec<u8> {
    let mut message = Message::new();
    message
        .set_id(id)
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .set_authoritative(true);
    if let Some(q) = question {
        message.add_query(q.clone());
    }
    for r in records {
        message.add_answer(r);
    }
    message.to_vec().unwrap_or_default()
}

fn query(name: &Name) -> Vec<u8> {
    let mut message = Message::new();
    message
        .set_message_type(MessageType::Query)
        .set_recursion_desired(false);
    message.add_query(Query::query(name.clone(), RecordType::PTR));
    message.to_vec().unwrap_or_default()
}

/// Where the registry joins the mDNS group: `mdns` (the default interface) or
/// `mdns://IPv4` (the interface that has that address).
pub fn parse_url(url: &str) -> Result<Ipv4Addr, RegistryError> {
    if url == "mdns" || url == "mdns://" {
        return Ok(Ipv4Addr::UNSPECIFIED);
    }
    url.strip_prefix("mdns://")
        .and_then(|ip| ip.trim_end_matches('/').parse::<Ipv4Addr>().ok())
        .ok_or_else(|| {
            RegistryError::Invalid(format!(
                "registry URL {url:?} is not mdns or mdns://IPv4 (the address of the LAN \
                 interface to announce and browse on)"
            ))
        })
}

pub struct MdnsRegistry {
    inner: Arc<Inner>,
    tasks: Tasks,
}

struct Inner {
    backend: String,
    domain: String,
    /// The SRV target of this sidecar's nodes, the name of their A records.
    host: Name,
    own: MemoryRegistry,
    state: Mutex<State>,
    catalog: ArcSwap<Catalog>,
    changes: watch::Sender<u64>,
    /// Joined to the group on port 5353: answers queries, hears announcements.
    responder: UdpSocket,
    /// On a port of its own: asks, and hears the answers.
    asker: UdpSocket,
    error: Mutex<Option<String>>,
}

#[derive(Default)]
struct State {
    /// Nodes heard, by instance name: the registration and when it was last heard.
    heard: HashMap<String, (Service, Instant)>,
    /// Names listed by wildcards, and when.
    names: HashMap<String, Instant>,
    /// This sidecar's nodes as announced: instance -> (registration, records).
    announced: HashMap<String, (Service, Vec<Record>)>,
    /// Instances this sidecar stopped announcing, and when.
    retired: HashMap<String, Instant>,
    /// When the current second of answers began, and how many were given in it.
    answered: Option<(Instant, u32)>,
}

impl MdnsRegistry {
    /// Joins the mDNS group and starts answering and browsing. Must be called within
    /// a tokio runtime.
    pub fn start(url: &str) -> Result<Self, RegistryError> {
        let interface = parse_url(url)?;
        let join_error = |e: std::io::Error| {
            RegistryError::Invalid(format!(
                "--registry {url}: cannot join the mDNS group on {}: {e}{}",
                if interface.is_unspecified() {
                    "the default interface".to_string()
                } else {
                    interface.to_string()
                },
                if interface.is_unspecified() {
                    "; name the LAN interface by its address: --registry mdns://10.0.0.5"
                } else {
                    ""
                }
            ))
        };
        let responder = crate::cluster::mdns::socket(interface).map_err(join_error)?;
        let asker = asker_socket(interface).map_err(join_error)?;
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "pillion".into());
        let host =
            fqdn(&format!("{hostname}.")).unwrap_or_else(|| fqdn("pillion.").expect("valid"));
        let inner = Arc::new(Inner {
            backend: if interface.is_unspecified() {
                "mdns".into()
            } else {
                format!("mdns://{interface}")
            },
            domain: DOMAIN.into(),
            host,
            own: MemoryRegistry::new(),
            state: Mutex::new(State::default()),
            catalog: ArcSwap::from_pointee(Catalog::default()),
            changes: watch::channel(0).0,
            responder,
            asker,
            error: Mutex::new(None),
        });
        let tasks = Tasks::default();
        tasks.spawn(respond(inner.clone(), tasks.token()));
        tasks.spawn(browse(inner.clone(), tasks.token()));
        tasks.spawn(follow_own(inner.clone(), tasks.token()));
        Ok(MdnsRegistry { inner, tasks })
    }
}

fn asker_socket(interface: Ipv4Addr) -> std::io::Result<UdpSocket> {
    let socket = std::net::UdpSocket::bind((interface, 0))?;
    socket.set_multicast_loop_v4(true)?;
    socket.set_multicast_ttl_v4(255)?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

fn group() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(GROUP, PORT))
}

impl Inner {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_error(&self, error: Option<String>) {
        *self.error.lock().unwrap_or_else(|e| e.into_inner()) = error;
    }

    async fn send(&self, socket: &UdpSocket, datagram: &[u8], to: SocketAddr) {
        match socket.send_to(datagram, to).await {
            Ok(_) => self.set_error(None),
            Err(e) => {
                tracing::debug!(error = %e, %to, "mDNS send failed");
                self.set_error(Some(format!("mDNS send to {to} failed: {e}")));
            }
        }
    }

    /// This sidecar's registrations, one node each.
    fn own_nodes(&self) -> Vec<Service> {
        let catalog = self.own.catalog();
        catalog.services().flat_map(per_node).collect()
    }

    /// Swaps in the catalog of what this sidecar registered and what it heard (its
    /// own registration winning over a node heard with the same name and id).
    fn publish(&self) {
        let own = self.own_nodes();
        let mine: HashSet<(&str, &str)> = own
            .iter()
            .map(|r| (r.name.as_str(), r.nodes[0].id.as_str()))
            .collect();
        let next = {
            let state = self.state();
            let heard = state
                .heard
                .values()
                .map(|(reg, _)| reg)
                .filter(|r| !mine.contains(&(r.name.as_str(), r.nodes[0].id.as_str())));
            Catalog::build(own.iter().chain(heard))
        };
        if **self.catalog.load() != next {
            self.catalog.store(Arc::new(next));
            self.changes.send_modify(|v| *v += 1);
        }
    }

    /// Takes in what an answer says; whether it changed what is heard.
    fn take(&self, heard: Heard) -> bool {
        let now = Instant::now();
        let mut state = self.state();
        state
            .retired
            .retain(|_, at| now.duration_since(*at) < RETIRED_FOR);
        let mut changed = false;
        for name in heard.names {
            state.names.insert(name, now);
        }
        for instance in heard.gone {
            changed |= state.heard.remove(&instance).is_some();
        }
        for (instance, reg) in heard.nodes {
            if state.announced.contains_key(&instance) || state.retired.contains_key(&instance) {
                continue; // this sidecar's own, heard back
            }
            state.names.insert(reg.name.clone(), now);
            match state.heard.insert(instance, (reg.clone(), now)) {
                Some((old, _)) if old == reg => {}
                _ => changed = true,
            }
        }
        changed
    }

    /// Drops what was not heard for [`FORGET_AFTER`]; whether anything went.
    fn forget(&self) -> bool {
        let now = Instant::now();
        let mut state = self.state();
        let before = state.heard.len();
        state
            .heard
            .retain(|_, (_, seen)| now.duration_since(*seen) < FORGET_AFTER);
        state
            .names
            .retain(|_, seen| now.duration_since(*seen) < FORGET_AFTER);
        state.heard.len() != before
    }

    /// The answers to `query` from this sidecar's registrations: one datagram per
    /// node, as go-micro's zone gives one node per server.
    fn answers(&self, query: &Message) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        if query.message_type() != MessageType::Query
            || query.op_code() != OpCode::Query
            || query.truncated()
        {
            return out;
        }
        let state = self.state();
        let list = format!("{WILDCARD}.{}.", self.domain);
        for q in query.queries() {
            let asked = q.name().to_string();
            let kind = q.query_type();
            // The top bit of the class asks for a unicast answer, which carries the
            // query's id (RFC 6762 18.1); go-micro answers the sender either way.
            let id = if u16::from(q.query_class()) & 0x8000 != 0 {
                query.id()
            } else {
                0
            };
            let ptr = matches!(kind, RecordType::PTR | RecordType::ANY);
            if asked == list && ptr {
                let names: BTreeSet<&str> = state
                    .announced
                    .values()
                    .map(|(reg, _)| reg.name.as_str())
                    .collect();
                for name in names {
                    if let Some(records) = wildcard_records(name, &self.host, &self.domain) {
                        out.push(answer(Some(q), id, records));
                    }
                }
                continue;
            }
            for (instance, (reg, records)) in &state.announced {
                let of_service = format!("{}.{}.", reg.name, self.domain);
                let records = if asked == of_service && ptr {
                    records.clone()
                } else if asked == *instance {
                    // A node-specific question: its SRV with the address, its TXT.
                    records
                        .iter()
                        .filter(|r| match r.data() {
                            RData::SRV(_) | RData::A(_) | RData::AAAA(_) => {
                                matches!(kind, RecordType::SRV | RecordType::ANY)
                            }
                            RData::TXT(_) => matches!(kind, RecordType::TXT | RecordType::ANY),
                            _ => false,
                        })
                        .cloned()
                        .collect()
                } else {
                    continue;
                };
                if !records.is_empty() {
                    out.push(answer(Some(q), id, records));
                }
            }
        }
        out
    }

    /// Whether another query may be answered this second.
    fn may_answer(&self) -> bool {
        let mut state = self.state();
        let now = Instant::now();
        let (since, count) = state.answered.get_or_insert((now, 0));
        if now.duration_since(*since) >= Duration::from_secs(1) {
            *since = now;
            *count = 0;
        }
        *count += 1;
        *count <= ANSWERS_PER_SECOND
    }

    /// Announces this sidecar's new or changed nodes and says goodbye to the ones that
    /// went, so that go-micro's watchers and other sidecars learn at once.
    async fn announce_changes(&self) {
        let own = self.own_nodes();
        let mut datagrams = Vec::new();
        {
            let mut state = self.state();
            let mut current = HashMap::new();
            for reg in own {
                let instance = format!("{}.{}.{}.", reg.nodes[0].id, reg.name, self.domain);
                let unchanged = state
                    .announced
                    .get(&instance)
                    .is_some_and(|(old, _)| *old == reg);
                if unchanged {
                    let kept = state.announced.remove(&instance).expect("checked above");
                    current.insert(instance, kept);
                    continue;
                }
                match node_records(&reg, &self.host, &self.domain, TTL_SECS) {
                    Ok(records) => {
                        let at = reg.nodes[0].endpoint();
                        if at
                            .parse::<SocketAddr>()
                            .is_ok_and(|a| a.ip().is_loopback() || a.ip().is_unspecified())
                        {
                            tracing::warn!(service = %reg.name, node = %reg.nodes[0].id, address = %at, "announced on mDNS at an address only this host reaches: register the app at its LAN address (--server-address) for other hosts to call it");
                        }
                        datagrams.push(answer(None, 0, records.clone()));
                        state.heard.remove(&instance);
                        current.insert(instance, (reg, records));
                    }
                    Err(why) => tracing::warn!(
                        service = %reg.name,
                        node = %reg.nodes[0].id,
                        "not announced on mDNS: {why}"
                    ),
                }
            }
            let now = Instant::now();
            for (instance, (_, records)) in std::mem::replace(&mut state.announced, current) {
                if !state.announced.contains_key(&instance) {
                    datagrams.push(goodbye(&records));
                    state.retired.insert(instance, now);
                }
            }
        }
        for datagram in datagrams {
            self.send(&self.responder, &datagram, group()).await;
        }
    }
}

/// go-micro's `unregister`: the node's records with TTL 0.
fn goodbye(records: &[Record]) -> Vec<u8> {
    let gone = records
        .iter()
        .filter(|r| !matches!(r.data(), RData::PTR(_)))
        .map(|r| {
            let mut r = r.clone();
            r.set_ttl(0);
            r
        })
        .collect();
    answer(None, 0, gone)
}

/// Answers queries and hears announcements on the group, until `stop` (the answers
/// to a query in hand are sent first).
async fn respond(inner: Arc<Inner>, stop: CancellationToken) {
    let mut buf = vec![0u8; 65536];
    loop {
        let received = tokio::select! {
            r = inner.responder.recv_from(&mut buf) => r,
            _ = stop.cancelled() => return,
        };
        let Ok((len, from)) = received else {
            continue;
        };
        let Ok(message) = Message::from_vec(&buf[..len]) else {
            continue;
        };
        if message.message_type() == MessageType::Response {
            if inner.take(hear(&message, &inner.domain)) {
                inner.publish();
            }
            continue;
        }
        let answers = inner.answers(&message);
        if !answers.is_empty() && inner.may_answer() {
            for datagram in answers {
                inner.send(&inner.responder, &datagram, from).await;
            }
        }
    }
}

/// Asks for the names and their nodes every [`BROWSE_EVERY`], hears the answers, and
/// forgets what stopped answering.
async fn browse(inner: Arc<Inner>, stop: CancellationToken) {
    let list = fqdn(&format!("{WILDCARD}.{}.", inner.domain)).expect("a valid name");
    let mut buf = vec![0u8; 65536];
    let mut next = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {
                next = Instant::now() + BROWSE_EVERY;
                if inner.forget() {
                    inner.publish();
                }
                let names: Vec<String> = inner.state().names.keys().cloned().collect();
                inner.send(&inner.asker, &query(&list), group()).await;
                for name in names {
                    if let Some(service) = fqdn(&format!("{name}.{}.", inner.domain)) {
                        inner.send(&inner.asker, &query(&service), group()).await;
                    }
                }
            }
            received = inner.asker.recv_from(&mut buf) => {
                let Ok((len, _)) = received else { continue };
                let Ok(message) = Message::from_vec(&buf[..len]) else { continue };
                if message.message_type() != MessageType::Response {
                    continue;
                }
                let heard = hear(&message, &inner.domain);
                let new_names: Vec<String> = {
                    let state = inner.state();
                    heard.names.iter().filter(|n| !state.names.contains_key(*n)).cloned().collect()
                };
                if inner.take(heard) {
                    inner.publish();
                }
                // A name heard for the first time is asked for at once.
                for name in new_names {
                    if let Some(service) = fqdn(&format!("{name}.{}.", inner.domain)) {
                        inner.send(&inner.asker, &query(&service), group()).await;
                    }
                }
            }
            _ = stop.cancelled() => return,
        }
    }
}

/// Follows this sidecar's own registrations (TTL expiries included): announces and
/// says goodbye as they change; until `stop`, once the announcements under way are
/// sent (so close's goodbyes come after them and cover them).
async fn follow_own(inner: Arc<Inner>, stop: CancellationToken) {
    let mut changes = inner.own.changes();
    loop {
        inner.announce_changes().await;
        inner.publish();
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            _ = stop.cancelled() => return,
        }
    }
}

#[async_trait::async_trait]
impl Registry for MdnsRegistry {
    // Announcements and goodbyes are sent by `follow_own` alone, in the order the
    // changes happened; here the catalog follows at once (read your writes).
    async fn register(
        &self,
        service: &Service,
        ttl: Option<Duration>,
    ) -> Result<(), RegistryError> {
        self.inner.own.register(service, ttl).await?;
        self.inner.publish();
        Ok(())
    }

    async fn deregister(&self, service: &Service) -> Result<usize, RegistryError> {
        let removed = self.inner.own.deregister(service).await?;
        self.inner.publish();
        Ok(removed)
    }

    fn catalog(&self) -> Arc<Catalog> {
        self.inner.catalog.load_full()
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    fn status(&self) -> BackendStatus {
        let error = self
            .inner
            .error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        BackendStatus {
            backend: self.inner.backend.clone(),
            healthy: error.is_none(),
            error,
        }
    }

    /// Stops the tasks (announcements under way are sent first), then says goodbye
    /// for everything announced.
    async fn close(&self) {
        self.tasks.stop(STOP_WAIT).await;
        let goodbyes: Vec<Vec<u8>> = {
            let mut state = self.inner.state();
            state
                .announced
                .drain()
                .map(|(_, (_, records))| goodbye(&records))
                .collect()
        };
        for datagram in goodbyes {
            self.inner
                .send(&self.inner.responder, &datagram, group())
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pillion_core::Node;
    use proptest::prelude::*;

    fn node(id: &str, address: &str, metadata: &[(&str, &str)]) -> Node {
        Node {
            id: id.into(),
            address: address.into(),
            metadata: metadata
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Node::default()
        }
    }

    fn greeter() -> Service {
        Service {
            name: "go.micro.srv.greeter".into(),
            version: "latest".into(),
            nodes: vec![node(
                "go.micro.srv.greeter-4f1c",
                "10.0.0.7:41234",
                &[("protocol", "mucp")],
            )],
            endpoints: vec![serde_json::json!({"name": "Say.Hello", "request": null})],
            ..Service::default()
        }
    }

    fn host() -> Name {
        fqdn("box.").unwrap()
    }

    #[test]
    fn a_node_announced_reads_back_as_the_same_registration() {
        let reg = greeter();
        let records = node_records(&reg, &host(), DOMAIN, TTL_SECS).unwrap();
        let datagram = answer(None, 0, records);
        let heard = hear(&Message::from_vec(&datagram).unwrap(), DOMAIN);
        let mut expected = reg.clone();
        // A null in an endpoint is an absent field, as the API reads it.
        expected.endpoints = vec![serde_json::json!({"name": "Say.Hello"})];
        assert_eq!(
            heard.nodes,
            vec![(
                "go.micro.srv.greeter-4f1c.go.micro.srv.greeter.micro.".to_string(),
                expected
            )]
        );
        // Its goodbye names the instance.
        let records = node_records(&reg, &host(), DOMAIN, TTL_SECS).unwrap();
        let bye = hear(&Message::from_vec(&goodbye(&records)).unwrap(), DOMAIN);
        assert_eq!(
            bye.gone,
            vec!["go.micro.srv.greeter-4f1c.go.micro.srv.greeter.micro."]
        );
        assert!(bye.nodes.is_empty());
        // A wildcard lists the name.
        let list = answer(
            None,
            0,
            wildcard_records("go.micro.srv.greeter", &host(), DOMAIN).unwrap(),
        );
        let heard = hear(&Message::from_vec(&list).unwrap(), DOMAIN);
        assert_eq!(heard.names, vec!["go.micro.srv.greeter"]);
        assert!(heard.nodes.is_empty(), "{heard:?}");
    }

    #[test]
    fn txt_is_go_micro_s_zlib_hex_in_strings_of_255() {
        let mut reg = greeter();
        // Metadata that does not compress, so the TXT needs several strings.
        let noise: String = (0..900u32)
            .map(|i| char::from(b'a' + ((i * 7919 + i / 3) % 26) as u8))
            .collect();
        reg.nodes[0].metadata.insert("noise".into(), noise);
        let strings = encode_txt(&reg);
        assert!(strings.len() > 1);
        assert!(strings[..strings.len() - 1].iter().all(|s| s.len() == 255));
        assert!(strings
            .iter()
            .all(|s| s.bytes().all(|b| b.is_ascii_hexdigit())));
        let boxed: Vec<Box<[u8]>> = strings.iter().map(|s| s.as_bytes().into()).collect();
        let txt = decode_txt(&boxed).unwrap();
        assert_eq!(txt.service, "go.micro.srv.greeter");
        assert_eq!(txt.metadata["noise"].as_str().unwrap().len(), 900);
        // zlib's header, as Go's compress/zlib writes it at the default level.
        assert!(strings[0].starts_with("78"), "{}", strings[0]);
    }

    #[test]
    fn hostile_txts_are_refused_not_inflated() {
        let boxed = |s: &[u8]| vec![Box::<[u8]>::from(s)];
        assert!(decode_txt(&boxed(b"zz")).is_none());
        assert!(decode_txt(&boxed(b"abc")).is_none());
        assert!(decode_txt(&boxed(b"78da")).is_none());
        // A zlib bomb: 10 MB of zeros compress to a few KB; it is not inflated past
        // MAX_TXT.
        let bomb = miniz_oxide::deflate::compress_to_vec_zlib(&vec![b' '; 10 << 20], 9);
        let hex: String = bomb.iter().map(|b| format!("{b:02x}")).collect();
        assert!(hex.len() < 2 * MAX_TXT);
        assert!(decode_txt(&boxed(hex.as_bytes())).is_none());
    }

    #[test]
    fn a_node_that_fails_validation_is_not_taken() {
        let mut reg = greeter();
        reg.nodes[0]
            .metadata
            .insert("protocol".into(), "smoke-signals".into());
        let records = node_records(&reg, &host(), DOMAIN, TTL_SECS).unwrap();
        let heard = hear(
            &Message::from_vec(&answer(None, 0, records)).unwrap(),
            DOMAIN,
        );
        assert!(heard.nodes.is_empty(), "{heard:?}");
    }

    #[test]
    fn only_ip_addresses_are_announced() {
        let mut reg = greeter();
        reg.nodes[0].address = "orders.internal:80".into();
        let err = node_records(&reg, &host(), DOMAIN, TTL_SECS).unwrap_err();
        assert!(err.contains("not IP:port"), "{err}");
    }

    #[test]
    fn urls() {
        assert_eq!(parse_url("mdns").unwrap(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(
            parse_url("mdns://10.1.2.3").unwrap(),
            Ipv4Addr::new(10, 1, 2, 3)
        );
        for bad in ["mdns://x", "mdns://::1", "mdns:10.0.0.1"] {
            let err = parse_url(bad).unwrap_err().to_string();
            assert!(err.contains("mdns://IPv4"), "{bad}: {err}");
        }
    }

    proptest! {
        #[test]
        fn arbitrary_datagrams_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..900)) {
            if let Ok(message) = Message::from_vec(&bytes) {
                let _ = hear(&message, DOMAIN);
            }
        }

        #[test]
        fn arbitrary_txts_never_panic(strings in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..4)) {
            let boxed: Vec<Box<[u8]>> = strings.into_iter().map(Into::into).collect();
            let _ = decode_txt(&boxed);
        }
    }
}
