//! A backend: one address of a tier's target, with what the balancer and the
//! diagnostics need to know about it. Counters are atomics; the data path never locks.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::clock;

/// How a connection is asked to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    Open,
    /// Shut both write halves: clients see end-of-file and reconnect (failback).
    Graceful,
    /// Drop it (its backend was removed from the configuration).
    Now,
}

/// Whose fault a failed dial (or accept) is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// pillion ran out of file descriptors, socket buffers or memory: no backend was
    /// reached, so none is marked down, counted as failing or failed over from.
    Local,
    /// The backend refused, reset, did not answer in time, or is unreachable.
    Backend,
}

impl Blame {
    /// EMFILE, ENFILE, ENOBUFS and ENOMEM are this process's (or host's) exhaustion;
    /// every other error is the backend's or the network's.
    pub fn of(e: &io::Error) -> Blame {
        match e.raw_os_error() {
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => Blame::Local,
            _ if e.kind() == io::ErrorKind::OutOfMemory => Blame::Local,
            _ => Blame::Backend,
        }
    }
}

pub struct Backend {
    pub addr: SocketAddr,
    /// The target as configured (`db-a.internal:26258`).
    pub target: String,
    /// The tier connections are ordered by: the written one, or with latency tiers
    /// the one measured latency gave ([`assign_tiers`]).
    pub tier: AtomicUsize,
    /// The tier the file puts it in. Tier, limit and dial timeout change in place when
    /// the file is reloaded.
    pub written_tier: AtomicUsize,
    /// The last measured dial time, in µs (at least 1); 0: not measured.
    pub latency_us: AtomicU64,
    pub max_connections: AtomicUsize,
    pub dial_timeout_ms: AtomicU64,
    /// Connections open, and being dialed: a place is taken before the dial (see
    /// [`Backend::reserve`]).
    pub active: AtomicUsize,
    /// Down (not tried first) until this time, in ms on [`clock`]; 0: not down.
    pub down_until_ms: AtomicU64,
    /// Since when dials have succeeded, in ms on [`clock`]; 0: not known up.
    pub up_since_ms: AtomicU64,
    pub last_dial_us: AtomicU64,
    pub connections: AtomicU64,
    pub dial_failures: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    /// Gone from DNS: no new connections, the open ones go on.
    pub draining: AtomicBool,
    conns: Mutex<HashMap<u64, watch::Sender<Close>>>,
    next_conn: AtomicU64,
}

impl Backend {
    pub fn new(
        addr: SocketAddr,
        target: String,
        tier: usize,
        max_connections: usize,
        dial_timeout: Duration,
    ) -> Backend {
        Backend {
            addr,
            target,
            tier: AtomicUsize::new(tier),
            written_tier: AtomicUsize::new(tier),
            latency_us: AtomicU64::new(0),
            max_connections: AtomicUsize::new(max_connections),
            dial_timeout_ms: AtomicU64::new(dial_timeout.as_millis() as u64),
            active: AtomicUsize::new(0),
            down_until_ms: AtomicU64::new(0),
            up_since_ms: AtomicU64::new(0),
            last_dial_us: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            dial_failures: AtomicU64::new(0),
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(0),
        }
    }

    pub fn is_down(&self, now_ms: u64) -> bool {
        self.down_until_ms.load(Ordering::Relaxed) > now_ms
    }

    pub fn tier(&self) -> usize {
        self.tier.load(Ordering::Relaxed)
    }

    pub fn dial_timeout(&self) -> Duration {
        Duration::from_millis(self.dial_timeout_ms.load(Ordering::Relaxed))
    }

    /// The tier the file puts it in.
    pub fn written_tier(&self) -> usize {
        self.written_tier.load(Ordering::Relaxed)
    }

    /// The last measured dial time, when latency tiers have measured it.
    pub fn latency(&self) -> Option<Duration> {
        match self.latency_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// Applies a reloaded tier's settings. With latency tiers (`by_latency`), a
    /// backend already measured keeps the tier its latency gave; without, every
    /// backend is in its written tier.
    pub fn reconfigure(
        &self,
        tier: usize,
        max_connections: usize,
        dial_timeout: Duration,
        by_latency: bool,
    ) {
        self.written_tier.store(tier, Ordering::Relaxed);
        if !by_latency {
            self.latency_us.store(0, Ordering::Relaxed);
        }
        if self.latency().is_none() {
            self.tier.store(tier, Ordering::Relaxed);
        }
        self.max_connections
            .store(max_connections, Ordering::Relaxed);
        self.dial_timeout_ms
            .store(dial_timeout.as_millis() as u64, Ordering::Relaxed);
    }

    pub fn overloaded(&self) -> bool {
        let max = self.max_connections.load(Ordering::Relaxed);
        max > 0 && self.active.load(Ordering::Relaxed) >= max
    }

    pub fn dial_succeeded(&self, took: Duration) {
        let now = clock().as_millis() as u64;
        self.last_dial_us
            .store(took.as_micros() as u64, Ordering::Relaxed);
        self.down_until_ms.store(0, Ordering::Relaxed);
        let _ =
            self.up_since_ms
                .compare_exchange(0, now.max(1), Ordering::Relaxed, Ordering::Relaxed);
    }

    /// A dial the backend is to blame for ([`Blame::Backend`]): counted, and the
    /// backend is down for `down_for`.
    pub fn dial_failed(&self, down_for: Duration) {
        let now = clock().as_millis() as u64;
        self.dial_failures.fetch_add(1, Ordering::Relaxed);
        self.up_since_ms.store(0, Ordering::Relaxed);
        self.down_until_ms
            .store(now + down_for.as_millis() as u64, Ordering::Relaxed);
    }

    /// Takes a place for one connection, unless `max_connections` are open or being
    /// dialed already. Counting before the dial is what holds the limit when clients
    /// arrive together: counting once connected let every one of them see room for one
    /// more. The place is given back when the [`Slot`] is dropped (a failed dial, a
    /// closed connection).
    pub fn reserve(self: &Arc<Self>) -> Option<Slot> {
        let max = self.max_connections.load(Ordering::Relaxed);
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (max == 0 || n < max).then_some(n + 1)
            })
            .ok()?;
        Some(Slot(self.clone()))
    }

    /// Registers a connection that was dialed in `slot`; the receiver tells it when to
    /// close.
    pub fn open(&self, _slot: &Slot) -> (u64, watch::Receiver<Close>) {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(Close::Open);
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        self.connections.fetch_add(1, Ordering::Relaxed);
        (id, rx)
    }

    /// The connection `id` ended; its slot is given back when dropped.
    pub fn closed(&self, id: u64) {
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }

    /// Asks every open connection to close.
    pub fn close_all(&self, how: Close) {
        for tx in self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            let _ = tx.send(how);
        }
    }

    pub fn status(&self) -> serde_json::Value {
        let now = clock().as_millis() as u64;
        let down_until = self.down_until_ms.load(Ordering::Relaxed);
        serde_json::json!({
            "address": self.addr.to_string(),
            "target": self.target,
            "tier": self.tier(),
            "written_tier": self.written_tier(),
            "latency_ms": self.latency().map(|d| d.as_secs_f64() * 1000.0),
            "active": self.active.load(Ordering::Relaxed),
            "max_connections": self.max_connections.load(Ordering::Relaxed),
            "down_for_secs": (down_until > now).then(|| (down_until - now) as f64 / 1000.0),
            "last_dial_ms": self.last_dial_us.load(Ordering::Relaxed) as f64 / 1000.0,
            "draining": self.draining.load(Ordering::Relaxed),
            "connections_total": self.connections.load(Ordering::Relaxed),
            "dial_failures_total": self.dial_failures.load(Ordering::Relaxed),
            "bytes_up": self.bytes_up.load(Ordering::Relaxed),
            "bytes_down": self.bytes_down.load(Ordering::Relaxed),
        })
    }
}

/// Puts measured backends in tiers by dial latency, as iaido's `latencyBucket` does
/// (`pkg/balancer/latency.go`): fastest first, a new tier whenever a backend is slower
/// than its tier's start by at least `bucket`, the first tier starting at 0. Tiers are
/// numbered from 0 for the fastest that was measured (iaido counts an empty first tier
/// when even the fastest is slower than `bucket`; the order is the same).
pub fn assign_tiers(samples: &mut [(Arc<Backend>, Duration)], bucket: Duration) {
    samples.sort_by_key(|(_, latency)| *latency);
    let mut start = Duration::ZERO;
    let mut tier = 0usize;
    let mut first = None;
    for (backend, latency) in samples.iter() {
        if *latency >= start + bucket {
            start = *latency;
            tier += 1;
        }
        let base = *first.get_or_insert(tier);
        backend
            .latency_us
            .store((latency.as_micros() as u64).max(1), Ordering::Relaxed);
        backend.tier.store(tier - base, Ordering::Relaxed);
    }
}

/// One place among a backend's `max_connections`, held from before the dial until the
/// connection closes.
pub struct Slot(Arc<Backend>);

impl Slot {
    pub fn backend(&self) -> &Arc<Backend> {
        &self.0
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_counted_before_the_dial_and_given_back() {
        let b = Arc::new(Backend::new(
            "127.0.0.1:1".parse().unwrap(),
            "t".into(),
            0,
            2,
            Duration::from_secs(1),
        ));
        let first = b.reserve().expect("room");
        let second = b.reserve().expect("room");
        assert!(
            b.reserve().is_none(),
            "a third place past max_connections = 2"
        );
        assert!(b.overloaded());
        drop(first);
        let third = b.reserve().expect("a place given back is free again");
        drop((second, third));
        assert_eq!(b.active.load(Ordering::Relaxed), 0);
        b.reconfigure(0, 0, Duration::from_secs(1), false);
        let unlimited: Vec<Slot> = (0..100).filter_map(|_| b.reserve()).collect();
        assert_eq!(unlimited.len(), 100, "0 is unlimited");
    }

    fn backend(tier: usize) -> Arc<Backend> {
        Arc::new(Backend::new(
            "127.0.0.1:1".parse().unwrap(),
            "t".into(),
            tier,
            0,
            Duration::from_secs(1),
        ))
    }

    #[test]
    fn latency_tiers_span_less_than_a_bucket_each_as_iaido_s() {
        let ms = Duration::from_millis;
        let cases: [(&[u64], &[usize]); 4] = [
            // iaido's tier 0 spans [0, bucket): 5 and 9 together, 12 starts the next.
            (&[12, 5, 9, 31, 21], &[1, 0, 0, 2, 1]),
            // All slower than the bucket: the fastest is tier 0 all the same.
            (&[40, 45, 80], &[0, 0, 1]),
            (&[1, 1, 1], &[0, 0, 0]),
            (&[3, 100, 200, 205], &[0, 1, 2, 2]),
        ];
        for (latencies, want) in cases {
            let backends: Vec<_> = latencies.iter().map(|_| backend(5)).collect();
            let mut samples: Vec<_> = backends
                .iter()
                .zip(latencies)
                .map(|(b, l)| (b.clone(), ms(*l)))
                .collect();
            assign_tiers(&mut samples, ms(10));
            let got: Vec<usize> = backends.iter().map(|b| b.tier()).collect();
            assert_eq!(got, want, "{latencies:?}");
            assert!(backends.iter().all(|b| b.written_tier() == 5));
        }
    }

    #[test]
    fn a_reload_keeps_a_measured_tier_and_turning_latency_off_restores_the_written_one() {
        let b = backend(1);
        assign_tiers(
            &mut [(b.clone(), Duration::from_millis(2))],
            Duration::from_millis(10),
        );
        assert_eq!((b.tier(), b.written_tier()), (0, 1));
        b.reconfigure(2, 0, Duration::from_secs(1), true);
        assert_eq!((b.tier(), b.written_tier()), (0, 2));
        assert_eq!(b.latency(), Some(Duration::from_millis(2)));
        b.reconfigure(2, 0, Duration::from_secs(1), false);
        assert_eq!((b.tier(), b.latency()), (2, None));
    }

    #[test]
    fn running_out_of_descriptors_or_memory_is_blamed_on_pillion() {
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            let e = io::Error::from_raw_os_error(errno);
            assert_eq!(Blame::of(&e), Blame::Local, "{e}");
        }
        assert_eq!(Blame::of(&io::ErrorKind::OutOfMemory.into()), Blame::Local);
        for errno in [
            libc::ECONNREFUSED,
            libc::ECONNRESET,
            libc::ETIMEDOUT,
            libc::EHOSTUNREACH,
            libc::ENETUNREACH,
            libc::EADDRNOTAVAIL,
        ] {
            let e = io::Error::from_raw_os_error(errno);
            assert_eq!(Blame::of(&e), Blame::Backend, "{e}");
        }
    }
}
