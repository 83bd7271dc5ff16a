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
    /// Tier, limit and dial timeout change in place when the file is reloaded.
    pub tier: AtomicUsize,
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

    /// Applies a reloaded tier's settings.
    pub fn reconfigure(&self, tier: usize, max_connections: usize, dial_timeout: Duration) {
        self.tier.store(tier, Ordering::Relaxed);
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
        b.reconfigure(0, 0, Duration::from_secs(1));
        let unlimited: Vec<Slot> = (0..100).filter_map(|_| b.reserve()).collect();
        assert_eq!(unlimited.len(), 100, "0 is unlimited");
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
