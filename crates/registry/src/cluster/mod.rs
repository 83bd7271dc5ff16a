//! The cluster registry (the default): sidecars find each other by gossip, with no
//! server to run.
//!
//! Membership, anti-entropy and failure detection come from chitchat (Quickwit's
//! scuttlebutt gossip with a phi-accrual failure detector): each sidecar is a node
//! whose key-value state holds its own registrations, one key per node of a service
//! (`s/{name}/{node id}` -> the registration as JSON). Gossip copies every sidecar's
//! keys to every other; a sidecar that dies stops heartbeating, the failure detector
//! declares it dead within seconds, and its registrations leave every catalog with
//! it. TTLs are kept by the sidecar that registered (it deletes the key when a TTL
//! lapses), so a renewal with the same content changes nothing on the wire.
//!
//! Discovery (see [`ClusterOptions`]):
//! - on loopback with no seeds, every sidecar tries to bind the well-known address
//!   (`--cluster-bind`, 127.0.0.1:7950 by default): the one that holds it is where
//!   newcomers send their first gossip, and when it dies the next sidecar to try
//!   takes the port over; each sidecar also gossips from a port of its own, so none
//!   is a single point of failure once it has met the others;
//! - with `--cluster-join` the listed seeds are gossiped to instead, and nothing is
//!   discovered automatically, so separate clusters stay apart;
//! - a non-loopback address needs `--cluster-key`: every message is then sealed with
//!   ChaCha20-Poly1305 ([`wire`]).
//!
//! The catalog is rebuilt incrementally: a change of one sidecar's keys rebuilds
//! only the services those keys name.
//!
//! Chitchat sends a value whole, in one message no larger than a UDP datagram, and a
//! value that does not fit holds back every later change of its sidecar. The API
//! refuses registrations over the limits of [`pillion_core::service`] (set for this),
//! and `watch_replication` reports a sidecar whose state its peers stop taking, in
//! [`Registry::status`] (so `/healthz`) and [`ClusterStatus`].

pub mod mdns;
pub mod wire;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use chitchat::{
    spawn_chitchat, Chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig,
    Version,
};
use pillion_core::Service;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::{deregisters, per_node, BackendStatus, Catalog, Registry, RegistryError};
use wire::{GossipStats, GossipTransport, Held, Rendezvous, Seal};

/// The local rendezvous address sidecars meet at when given no flag.
pub const DEFAULT_BIND: &str = "127.0.0.1:7950";
/// The shortest `--cluster-key` accepted.
pub const MIN_KEY_LEN: usize = 16;

const CLUSTER_ID: &str = "pillion";
/// Each round sends a digest of every node to 3 peers, so gossip bytes grow with
/// the cluster: 300 ms keeps a registration's spread and a death's detection within
/// a few seconds at 100 sidecars (bench/cluster-scale.sh).
const GOSSIP_INTERVAL: Duration = Duration::from_millis(300);
/// A peer is declared dead after about this many mean heartbeat intervals of silence.
const PHI_THRESHOLD: f64 = 9.0;
/// How long a dead peer's state and a deleted key's tombstone are remembered. Long,
/// so a peer cut off for a while is recognised when it comes back.
const FORGET_AFTER: Duration = Duration::from_secs(3600);
/// Peers told at once about a change made here (the others hear of it by gossip).
const PUSH_TO: usize = 3;
/// How long a graceful stop waits for its deletions to reach the peers.
const LEAVE_GRACE: Duration = Duration::from_millis(300);

/// How long a live peer may hold an older version of this sidecar's state than this
/// sidecar had that long ago, before the replication is reported stalled: 20 gossip
/// rounds, long enough for a burst of registrations to spread, short enough that an
/// operator hears of a registration no other sidecar sees.
const STALL_AFTER: Duration = Duration::from_millis(20 * 300);

const KEY_PREFIX: &str = "s/";
/// Keys of a sidecar's own description, shown by `pillion members`: its app's name,
/// its API address, and that it left on purpose.
const MEMBER_NAME: &str = "m/name";
const MEMBER_API: &str = "m/api";
const MEMBER_LEFT: &str = "m/left";

/// Where and how this sidecar gossips.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterOptions {
    /// The gossip address. On loopback without seeds: the rendezvous address.
    pub bind: SocketAddr,
    /// Seeds (`host:port`); when given, no automatic discovery.
    pub join: Vec<String>,
    /// The shared secret that seals gossip.
    pub key: Option<String>,
    /// Announce and browse on the LAN by mDNS (needs a LAN address and a key).
    pub mdns: bool,
    /// The name of this sidecar's app and its API address, shown to the peers'
    /// `pillion members`.
    pub member_name: Option<String>,
    pub member_api: Option<String>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            bind: DEFAULT_BIND.parse().expect("a valid address"),
            join: Vec::new(),
            key: None,
            mdns: false,
            member_name: None,
            member_api: None,
        }
    }
}

impl ClusterOptions {
    /// Refuses what would be unsafe or could not work, naming the flag to change.
    pub fn check(&self) -> Result<(), RegistryError> {
        let invalid = |m: String| Err(RegistryError::Invalid(m));
        let ip = self.bind.ip();
        if ip.is_unspecified() {
            return invalid(format!(
                "--cluster-bind {}: give the address other sidecars reach this one at \
                 (such as 10.0.0.5:7950), not an unspecified address",
                self.bind
            ));
        }
        if let Some(key) = &self.key {
            if key.len() < MIN_KEY_LEN {
                return invalid(format!(
                    "--cluster-key is {} characters long; use at least {MIN_KEY_LEN} \
                     (such as the output of `openssl rand -hex 16`)",
                    key.len()
                ));
            }
        } else if !ip.is_loopback() {
            return invalid(format!(
                "--cluster-bind {} is not a loopback address: gossip that leaves this host \
                 must be authenticated and encrypted; give --cluster-key SECRET (the same on \
                 every sidecar of the cluster)",
                self.bind
            ));
        }
        if self.mdns && (ip.is_loopback() || !ip.is_ipv4()) {
            return invalid(format!(
                "--cluster-mdns announces on the LAN, but --cluster-bind {} is not a LAN IPv4 \
                 address: give this host's address on the LAN (and --cluster-key)",
                self.bind
            ));
        }
        if self.local_discovery() && self.bind.port() == 0 {
            return invalid(
                "--cluster-bind with port 0 on loopback leaves nothing to meet at: give a port \
                 (the sidecars of this host share it), or seeds with --cluster-join"
                    .into(),
            );
        }
        Ok(())
    }

    /// Whether sidecars meet at the rendezvous address (loopback, no seeds).
    fn local_discovery(&self) -> bool {
        self.bind.ip().is_loopback() && self.join.is_empty()
    }
}

pub struct ClusterRegistry {
    inner: Arc<Inner>,
    /// Stopped when the registry is dropped.
    _tasks: crate::Tasks,
}

struct Inner {
    chitchat: Arc<tokio::sync::Mutex<Chitchat>>,
    handle: Mutex<Option<ChitchatHandle>>,
    me: ChitchatId,
    catalog: ArcSwap<Catalog>,
    changes: watch::Sender<u64>,
    /// Touched only while the chitchat lock is held (so in the order of changes).
    book: Mutex<Book>,
    expiry_changed: Notify,
    stats: Arc<GossipStats>,
    options: ClusterOptions,
    replication: Mutex<Replication>,
}

/// Whether this sidecar's state reaches its peers (see [`watch_replication`]).
#[derive(Default)]
struct Replication {
    /// This sidecar's state version at each look, oldest first, over the last few
    /// [`STALL_AFTER`]s.
    history: std::collections::VecDeque<(Instant, Version)>,
    /// The live peers that have not taken the version this sidecar had
    /// [`STALL_AFTER`] ago, and that version.
    lagging: Vec<SocketAddr>,
    lacking: Version,
    /// How many times the replication stalled.
    stalls: u64,
}

impl Replication {
    /// The version of this sidecar's state that a peer is stuck without, if it is:
    /// its last digest lacks the version this sidecar had [`STALL_AFTER`] before it,
    /// and it has taken nothing newer for [`STALL_AFTER`]. A peer still taking the
    /// state in (one that just met a sidecar with many registrations) makes progress,
    /// and is not stuck.
    fn lacked_by(&self, held: &Held) -> Option<Version> {
        if held.at.duration_since(held.since) < STALL_AFTER {
            return None;
        }
        let due = self.version_at(held.at.checked_sub(STALL_AFTER)?)?;
        (held.version < due).then_some(due)
    }

    /// The version this sidecar's state had at `at`, if looked at by then.
    fn version_at(&self, at: Instant) -> Option<Version> {
        self.history
            .iter()
            .take_while(|(when, _)| *when <= at)
            .last()
            .map(|(_, v)| *v)
    }
}

#[derive(Default)]
struct Book {
    /// The peers the catalog was built from, with the state version it saw of each.
    seen: HashMap<ChitchatId, Version>,
    /// Keys of this sidecar's registrations that have a TTL, and when it lapses.
    deadlines: crate::Deadlines<String>,
}

/// How the cluster looks from here, for `/statusz`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ClusterStatus {
    /// This sidecar's gossip address.
    pub gossip: String,
    /// The other live sidecars' gossip addresses.
    pub peers: Vec<String>,
    pub gossip_sent_bytes: u64,
    pub gossip_received_bytes: u64,
    /// Datagrams thrown away (not pillion gossip, another key, malformed).
    pub gossip_dropped: u64,
    /// Whether this sidecar holds the local rendezvous address.
    pub rendezvous: bool,
    /// Whether some live peers have not taken this sidecar's state for 20 gossip
    /// rounds (its latest registrations are not seen there).
    pub replication_stalled: bool,
    /// Those peers' gossip addresses.
    pub lagging_peers: Vec<String>,
    /// How many times the replication stalled since the start.
    pub replication_stalls: u64,
    /// Every sidecar this one knows of, itself first, then by gossip address (filled
    /// by the caller of [`ClusterRegistry::members`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<Member>,
}

/// A sidecar of the cluster, as `consul members` shows one.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Member {
    /// Its app's `--server-name`, if it has one.
    pub name: Option<String>,
    /// Its API address (`--address`).
    pub api: Option<String>,
    pub gossip: String,
    /// `alive`; `failed` when it stopped answering; `left` when it stopped on purpose.
    pub state: &'static str,
    /// When it started (Unix seconds).
    pub since_unix: u64,
}

impl ClusterStatus {
    /// Prometheus text format.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(
            out,
            "# TYPE pillion_cluster_peers gauge\npillion_cluster_peers {}\n\
             # TYPE pillion_gossip_sent_bytes_total counter\npillion_gossip_sent_bytes_total {}\n\
             # TYPE pillion_gossip_received_bytes_total counter\npillion_gossip_received_bytes_total {}\n\
             # TYPE pillion_gossip_dropped_total counter\npillion_gossip_dropped_total {}\n\
             # HELP pillion_gossip_lagging_peers Live peers that have not taken this sidecar's state for 20 gossip rounds.\n\
             # TYPE pillion_gossip_lagging_peers gauge\npillion_gossip_lagging_peers {}\n\
             # TYPE pillion_gossip_replication_stalls_total counter\npillion_gossip_replication_stalls_total {}",
            self.peers.len(),
            self.gossip_sent_bytes,
            self.gossip_received_bytes,
            self.gossip_dropped,
            self.lagging_peers.len(),
            self.replication_stalls,
        );
    }
}

impl ClusterRegistry {
    /// Binds the gossip socket and starts gossiping. Must be called within a tokio
    /// runtime.
    pub async fn start(options: ClusterOptions) -> Result<ClusterRegistry, RegistryError> {
        options.check()?;
        let local = options.local_discovery();
        let listen = if local {
            SocketAddr::new(options.bind.ip(), 0)
        } else {
            options.bind
        };
        let socket = tokio::net::UdpSocket::bind(listen).await.map_err(|e| {
            RegistryError::Invalid(format!(
                "cannot bind the gossip address {listen} (--cluster-bind): {e}"
            ))
        })?;
        let advertise = socket
            .local_addr()
            .map_err(|e| RegistryError::Invalid(format!("gossip socket: {e}")))?;
        let stats = Arc::new(GossipStats::default());
        // Short: every digest carries every node's id.
        let node_id = pillion_core::id::random_bytes::<6>()
            .iter()
            .fold("p".to_string(), |id, b| id + &format!("{b:02x}"));
        let transport = GossipTransport {
            me: node_id.clone(),
            seal: options.key.as_deref().map(Seal::new),
            rendezvous: local.then_some(Rendezvous(options.bind)),
            stats: stats.clone(),
            bound: Mutex::new(Some(socket)),
        };
        let mdns = match (options.mdns, options.bind.ip()) {
            (true, std::net::IpAddr::V4(ip)) => Some(mdns::socket(ip).map_err(|e| {
                RegistryError::Invalid(format!(
                    "--cluster-mdns: cannot join the mDNS group on {ip}: {e}"
                ))
            })?),
            _ => None,
        };
        let seeds = if local {
            vec![options.bind.to_string()]
        } else {
            options.join.clone()
        };
        let me = ChitchatId::new(
            node_id,
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            advertise,
        );
        let config = ChitchatConfig {
            chitchat_id: me.clone(),
            cluster_id: CLUSTER_ID.into(),
            gossip_interval: GOSSIP_INTERVAL,
            listen_addr: advertise,
            seed_nodes: seeds,
            failure_detector_config: FailureDetectorConfig {
                phi_threshold: PHI_THRESHOLD,
                sampling_window_size: 100,
                max_interval: Duration::from_secs(10),
                initial_interval: GOSSIP_INTERVAL,
                dead_node_grace_period: FORGET_AFTER,
            },
            marked_for_deletion_grace_period: FORGET_AFTER,
            catchup_callback: None,
            // The live-nodes watcher is used only as a signal (the state is read under
            // the lock): keeping no node in its map spares a copy of every node's
            // state (50,000 registrations of this sidecar) at each change.
            extra_liveness_predicate: Some(Box::new(|_| false)),
        };
        let handle = spawn_chitchat(config, Vec::new(), &transport)
            .await
            .map_err(|e| RegistryError::Invalid(format!("starting gossip on {advertise}: {e}")))?;
        tracing::info!(
            gossip = %advertise,
            rendezvous = ?local.then_some(options.bind),
            seeds = ?options.join,
            sealed = options.key.is_some(),
            "cluster registry gossiping"
        );
        let chitchat = handle.chitchat();
        let watcher = {
            let mut cc = chitchat.lock().await;
            let state = cc.self_node_state();
            if let Some(name) = &options.member_name {
                state.set(MEMBER_NAME, name);
            }
            if let Some(api) = &options.member_api {
                state.set(MEMBER_API, api);
            }
            cc.live_nodes_watcher()
        };
        let inner = Arc::new(Inner {
            chitchat,
            handle: Mutex::new(Some(handle)),
            me,
            catalog: ArcSwap::from_pointee(Catalog::default()),
            changes: watch::channel(0).0,
            book: Mutex::new(Book::default()),
            expiry_changed: Notify::new(),
            stats,
            options,
            replication: Mutex::new(Replication::default()),
        });
        let tasks = crate::Tasks::default();
        tasks.spawn(follow(Arc::downgrade(&inner), watcher));
        tasks.spawn(expire(Arc::downgrade(&inner), tasks.token()));
        tasks.spawn(watch_replication(Arc::downgrade(&inner), tasks.token()));
        if let Some(socket) = mdns {
            let me = mdns::Announcement {
                node_id: inner.me.node_id.clone(),
                gossip: advertise,
            };
            let weak = Arc::downgrade(&inner);
            tasks.spawn(mdns::run(socket, me, move |peer| {
                if let Some(inner) = weak.upgrade() {
                    if let Some(handle) = inner.handle().as_ref() {
                        let _ = handle.gossip(peer);
                    }
                }
            }));
        }
        Ok(ClusterRegistry {
            inner,
            _tasks: tasks,
        })
    }

    /// Every sidecar this one knows of (see [`Member`]); the failed and left are
    /// forgotten an hour after they went.
    pub async fn members(&self) -> Vec<Member> {
        let cc = self.inner.chitchat.lock().await;
        let member = |id: &ChitchatId, alive: bool| {
            let state = cc.node_state(id);
            let get = |key| state.and_then(|s| s.get(key)).map(str::to_string);
            Member {
                name: get(MEMBER_NAME),
                api: get(MEMBER_API),
                gossip: id.gossip_advertise_addr.to_string(),
                state: match (alive, get(MEMBER_LEFT).is_some()) {
                    (_, true) => "left",
                    (true, false) => "alive",
                    (false, false) => "failed",
                },
                since_unix: id.generation_id / 1000,
            }
        };
        let mut others: Vec<Member> = cc
            .live_nodes()
            .filter(|id| **id != self.inner.me)
            .map(|id| member(id, true))
            .chain(cc.dead_nodes().map(|id| member(id, false)))
            .collect();
        others.sort_by(|a, b| {
            a.gossip
                .cmp(&b.gossip)
                .then(b.since_unix.cmp(&a.since_unix))
        });
        let mut members = vec![member(&self.inner.me, true)];
        members.extend(others);
        members
    }

    /// The cluster as this sidecar sees it.
    pub fn cluster_status(&self) -> ClusterStatus {
        let peers = {
            let book = self.inner.book();
            let mut peers: Vec<String> = book
                .seen
                .keys()
                .map(|id| id.gossip_advertise_addr.to_string())
                .collect();
            peers.sort();
            peers
        };
        let stats = &self.inner.stats;
        let (lagging, stalls) = {
            let replication = self.inner.replication();
            (replication.lagging.clone(), replication.stalls)
        };
        ClusterStatus {
            replication_stalled: !lagging.is_empty(),
            lagging_peers: lagging.iter().map(SocketAddr::to_string).collect(),
            replication_stalls: stalls,
            gossip: self.inner.me.gossip_advertise_addr.to_string(),
            peers,
            gossip_sent_bytes: stats.sent_bytes.load(Ordering::Relaxed),
            gossip_received_bytes: stats.received_bytes.load(Ordering::Relaxed),
            gossip_dropped: stats.dropped.load(Ordering::Relaxed),
            rendezvous: stats.rendezvous_held.load(Ordering::Relaxed) == 1,
            members: Vec::new(),
        }
    }
}

impl Drop for ClusterRegistry {
    fn drop(&mut self) {
        if let Some(handle) = self.inner.handle().take() {
            handle.abort();
        }
    }
}

fn key(name: &str, id: &str) -> String {
    format!("{KEY_PREFIX}{name}/{id}")
}

/// The service a registration key belongs to.
fn name_of(key: &str) -> Option<&str> {
    key.strip_prefix(KEY_PREFIX)?
        .split_once('/')
        .map(|(name, _)| name)
}

impl Inner {
    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        // A panic while holding the lock leaves plain data behind, still usable.
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn replication(&self) -> std::sync::MutexGuard<'_, Replication> {
        self.replication.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn handle(&self) -> std::sync::MutexGuard<'_, Option<ChitchatHandle>> {
        self.handle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every live node's registrations of `name` (this sidecar's included).
    fn registrations(&self, cc: &Chitchat, name: &str) -> Vec<Service> {
        let prefix = key(name, "");
        let mut regs = Vec::new();
        for id in cc.live_nodes() {
            if let Some(state) = cc.node_state(id) {
                for (_, value) in state.iter_prefix(&prefix) {
                    regs.extend(decode(id, &value.value));
                }
            }
        }
        regs
    }

    /// Rebuilds the catalog entries of `names` from the live nodes' state, and tells.
    fn rebuild<'a>(&self, cc: &Chitchat, names: impl IntoIterator<Item = &'a str>) {
        let mut catalog = self.catalog.load_full();
        for name in names {
            let regs = self.registrations(cc, name);
            catalog = Arc::new(catalog.with_service(name, &regs));
        }
        self.catalog.store(catalog);
        self.changes.send_modify(|v| *v += 1);
    }

    /// Brings the catalog up to date with the peers' state: the services named by
    /// the keys that changed since the last look, of peers that joined, and of peers
    /// that left.
    fn follow_peers(&self, cc: &Chitchat) {
        let peers: HashMap<ChitchatId, Version> = cc
            .live_nodes()
            .filter(|id| **id != self.me)
            .filter_map(|id| Some((id.clone(), cc.node_state(id)?.max_version())))
            .collect();
        let mut book = self.book();
        let mut names: BTreeSet<String> = BTreeSet::new();
        let mut names_since = |id: &ChitchatId, since: Option<Version>| -> bool {
            let Some(state) = cc.node_state(id) else {
                return false;
            };
            if let Some(since) = since {
                if state.max_version() < since || state.last_gc_version() > since {
                    return false; // its state was reset: what changed is unknown
                }
            }
            for (key, value) in state.key_values_including_deleted() {
                if since.is_none_or(|s| value.version > s) {
                    names.extend(name_of(key).map(str::to_string));
                }
            }
            true
        };
        let mut known = true;
        for (id, version) in &peers {
            match book.seen.get(id) {
                Some(seen) if seen == version => {}
                seen => known &= names_since(id, seen.copied()),
            }
        }
        for id in book.seen.keys().filter(|id| !peers.contains_key(*id)) {
            known &= names_since(id, None);
        }
        if book.seen.len() != peers.len() || book.seen.keys().any(|id| !peers.contains_key(id)) {
            let joined = peers
                .keys()
                .filter(|id| !book.seen.contains_key(*id))
                .count();
            let left = book
                .seen
                .keys()
                .filter(|id| !peers.contains_key(*id))
                .count();
            tracing::info!(
                joined,
                left,
                peers = peers.len(),
                "cluster membership changed"
            );
        }
        book.seen = peers;
        drop(book);
        if !known {
            let all: BTreeSet<String> = cc
                .live_nodes()
                .filter_map(|id| cc.node_state(id))
                .flat_map(|s| s.iter_prefix(KEY_PREFIX))
                .filter_map(|(k, _)| name_of(k).map(str::to_string))
                .chain(self.catalog.load().names().map(str::to_string))
                .collect();
            self.rebuild(cc, all.iter().map(String::as_str));
        } else if !names.is_empty() {
            self.rebuild(cc, names.iter().map(String::as_str));
        }
    }

    /// The live peers' gossip addresses.
    fn peers(&self, cc: &Chitchat) -> Vec<SocketAddr> {
        cc.live_nodes()
            .filter(|id| **id != self.me)
            .map(|id| id.gossip_advertise_addr)
            .collect()
    }

    /// Tells `count` peers (at random) now about a change made here.
    fn push(&self, cc: &Chitchat, count: usize) {
        let peers = self.peers(cc);
        if let Some(handle) = self.handle().as_ref() {
            let start = pillion_core::id::fast_random() as usize;
            for i in 0..peers.len().min(count) {
                let _ = handle.gossip(peers[(start + i) % peers.len()]);
            }
        }
    }
}

fn decode(from: &ChitchatId, value: &str) -> Option<Service> {
    match serde_json::from_str::<Service>(value) {
        Ok(reg) => Some(reg),
        Err(e) => {
            tracing::debug!(peer = %from.node_id, error = %e, "unreadable registration in gossip");
            None
        }
    }
}

/// Follows the peers: each time chitchat reports a change of membership or of a
/// peer's state, the catalog catches up.
async fn follow(
    inner: Weak<Inner>,
    mut watcher: watch::Receiver<std::collections::BTreeMap<ChitchatId, chitchat::NodeState>>,
) {
    while watcher.changed().await.is_ok() {
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let cc = inner.chitchat.lock().await;
        inner.follow_peers(&cc);
    }
}

/// Watches whether this sidecar's state reaches its peers, once a gossip round.
///
/// Chitchat sends a state value whole, in one message: a value larger than a message
/// (a registration over the limits of [`pillion_core::service`], say) is never sent,
/// and every later change of this sidecar waits behind it, with no error anywhere.
/// Each peer's digest says which version of this state it holds ([`wire`] notes it);
/// a live peer stuck without a version this sidecar had long enough ago
/// ([`Replication::lacked_by`]) is lagging; while any is, the registry reports itself
/// unhealthy, naming them. Until `stop` (the registry is dropped).
async fn watch_replication(inner: Weak<Inner>, stop: tokio_util::sync::CancellationToken) {
    let mut rounds = tokio::time::interval_at(
        tokio::time::Instant::now() + GOSSIP_INTERVAL,
        GOSSIP_INTERVAL,
    );
    rounds.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = rounds.tick() => {}
            _ = stop.cancelled() => return,
        }
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let (mine, peers) = {
            let cc = inner.chitchat.lock().await;
            let mine = cc.node_state(&inner.me).map_or(0, |s| s.max_version());
            (mine, inner.peers(&cc))
        };
        let now = Instant::now();
        // Digests of peers long gone are forgotten.
        inner
            .stats
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|peer, held| {
                peers.contains(peer) || now.duration_since(held.at) < 3 * STALL_AFTER
            });
        let mut replication = inner.replication();
        replication.history.push_back((now, mine));
        while replication
            .history
            .get(1)
            .is_some_and(|(at, _)| now.duration_since(*at) > 3 * STALL_AFTER)
        {
            replication.history.pop_front();
        }
        let mut lacking = 0;
        let lagging: Vec<SocketAddr> = peers
            .into_iter()
            .filter(|peer| {
                let Some(held) = inner.stats.held_by(peer) else {
                    return false; // not heard from directly: nothing to judge by
                };
                let Some(due) = replication.lacked_by(&held) else {
                    return false;
                };
                lacking = lacking.max(due);
                true
            })
            .collect();
        let was_stalled = !replication.lagging.is_empty();
        if !lagging.is_empty() && !was_stalled {
            replication.stalls += 1;
            tracing::warn!(
                lagging = ?lagging,
                version = lacking,
                "gossip replication stalled: these peers have not taken this sidecar's state for {}; \
                 its latest registrations are not seen there",
                pillion_core::duration::format(STALL_AFTER)
            );
        } else if lagging.is_empty() && was_stalled {
            tracing::info!(
                "gossip replication resumed: every live peer holds this sidecar's state"
            );
        }
        replication.lagging = lagging;
        replication.lacking = lacking;
    }
}

/// Deletes this sidecar's registrations whose TTL lapsed, until `stop` (the registry
/// is dropped).
async fn expire(inner: Weak<Inner>, stop: tokio_util::sync::CancellationToken) {
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let next = {
            let mut cc = strong.chitchat.lock().await;
            let now = Instant::now();
            let lapsed = strong.book().deadlines.lapsed(now);
            if !lapsed.is_empty() {
                let state = cc.self_node_state();
                for k in &lapsed {
                    state.delete(k);
                }
                strong.rebuild(&cc, lapsed.iter().filter_map(|k| name_of(k)));
                strong.push(&cc, PUSH_TO);
            }
            strong.book().deadlines.next()
        };
        let wake = strong.clone();
        drop(strong);
        if !crate::wait_for_expiry(next, &wake.expiry_changed, &stop).await {
            return;
        }
    }
}

#[async_trait::async_trait]
impl Registry for ClusterRegistry {
    async fn register(
        &self,
        service: &Service,
        ttl: Option<Duration>,
    ) -> Result<(), RegistryError> {
        let inner = &self.inner;
        let mut cc = inner.chitchat.lock().await;
        let deadline = ttl.map(|t| Instant::now() + t);
        {
            let mut book = inner.book();
            let state = cc.self_node_state();
            for reg in per_node(service) {
                let k = key(&reg.name, &reg.nodes[0].id);
                let value = serde_json::to_string(&reg).expect("a service serialises");
                // The same content again changes nothing: no new version to gossip.
                state.set(k.clone(), value);
                book.deadlines.set(&k, deadline);
            }
        }
        inner.rebuild(&cc, [service.name.as_str()]);
        inner.push(&cc, PUSH_TO);
        drop(cc);
        inner.expiry_changed.notify_one();
        Ok(())
    }

    async fn deregister(&self, service: &Service) -> Result<usize, RegistryError> {
        let inner = &self.inner;
        let mut cc = inner.chitchat.lock().await;
        let prefix = key(&service.name, "");
        let state = cc.self_node_state();
        let mine: Vec<String> = state
            .iter_prefix(&prefix)
            .filter(|(_, v)| decode(&inner.me, &v.value).is_some_and(|r| deregisters(service, &r)))
            .map(|(k, _)| k.to_string())
            .collect();
        for k in &mine {
            state.delete(k);
        }
        if mine.is_empty() {
            // Only the sidecar that registered a node can take it out: say which.
            let owners: Vec<String> = cc
                .live_nodes()
                .filter(|id| **id != inner.me)
                .filter(|id| {
                    cc.node_state(id).is_some_and(|s| {
                        s.iter_prefix(&prefix)
                            .filter_map(|(_, v)| decode(id, &v.value))
                            .any(|r| deregisters(service, &r))
                    })
                })
                .map(|id| id.gossip_advertise_addr.to_string())
                .collect();
            if !owners.is_empty() {
                return Err(RegistryError::Invalid(format!(
                    "service {:?}: the nodes named were registered through another sidecar \
                     (gossip address {}); deregister them there, or they leave with it",
                    service.name,
                    owners.join(", ")
                )));
            }
            return Ok(0);
        }
        {
            let mut book = inner.book();
            for k in &mine {
                book.deadlines.set(k, None);
            }
        }
        inner.rebuild(&cc, [service.name.as_str()]);
        inner.push(&cc, PUSH_TO);
        Ok(mine.len())
    }

    fn catalog(&self) -> Arc<Catalog> {
        self.inner.catalog.load_full()
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    fn cluster(&self) -> Option<ClusterStatus> {
        Some(self.cluster_status())
    }

    async fn members(&self) -> Vec<Member> {
        ClusterRegistry::members(self).await
    }

    fn status(&self) -> BackendStatus {
        let replication = self.inner.replication();
        let error = (!replication.lagging.is_empty()).then(|| {
            let peers: Vec<String> = replication
                .lagging
                .iter()
                .map(SocketAddr::to_string)
                .collect();
            format!(
                "gossip replication stalled: peers {} have not taken this sidecar's state \
                 (version {}) for {}, so its latest registrations are not seen there \
                 (a value too large for a gossip message holds back every later one)",
                peers.join(", "),
                replication.lacking,
                pillion_core::duration::format(STALL_AFTER)
            )
        });
        BackendStatus {
            backend: format!("cluster ({})", self.inner.options.bind),
            healthy: error.is_none(),
            error,
        }
    }

    /// Deletes this sidecar's registrations, tells the peers, and stops gossiping.
    async fn close(&self) {
        let inner = &self.inner;
        {
            let mut cc = inner.chitchat.lock().await;
            let state = cc.self_node_state();
            let mine: Vec<String> = state
                .iter_prefix(KEY_PREFIX)
                .map(|(k, _)| k.to_string())
                .collect();
            for k in &mine {
                state.delete(k);
            }
            state.set(MEMBER_LEFT, "1");
            inner.book().deadlines = Default::default();
            if !mine.is_empty() {
                inner.rebuild(&cc, mine.iter().filter_map(|k| name_of(k)));
            }
            inner.push(&cc, usize::MAX);
        }
        tokio::time::sleep(LEAVE_GRACE).await;
        let handle = inner.handle().take();
        if let Some(handle) = handle {
            let _ = handle.shutdown().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_is_stuck_only_without_an_old_version_and_without_progress() {
        let t0 = Instant::now();
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        // This sidecar had version 5 from t0, then 9 from t0 + 10 s.
        let replication = Replication {
            history: [(s(0), 5), (s(10), 9)].into(),
            ..Replication::default()
        };
        let held = |version, since, at| Held {
            version,
            since: s(since),
            at: s(at),
        };
        let cases = [
            // (what the peer holds, since, digest at) -> the version it is stuck without
            (held(5, 0, 12), None),    // 9 is only 2 s old: not due yet
            (held(5, 0, 17), Some(9)), // 9 is 7 s old, and 5 held for 17 s
            (held(9, 0, 17), None),    // it has 9
            (held(7, 14, 17), None),   // it took 7 at 14 s: catching up
            (held(7, 10, 17), Some(9)),
            (held(5, 0, 3), None), // nothing looked at 6 s before
        ];
        for (peer, want) in cases {
            assert_eq!(replication.lacked_by(&peer), want, "{peer:?}");
        }
    }
}
