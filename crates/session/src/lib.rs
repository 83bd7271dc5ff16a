//! Distributed sessions: a cookie on the way in becomes the session's data in request
//! headers to the app, and the app's response headers change it, in one store shared
//! by every sidecar (bailiff's scheme, without its flaws).
//!
//! - [`SessionStore`] is the port: load a session, apply a change atomically, rotate
//!   its id, destroy it. [`memory`] is the embedded adapter (the default); [`redis`]
//!   keeps each session in a Redis hash, so two responses setting different keys of one
//!   session at once both survive.
//! - [`cookie`]: the session cookie in and out; [`codec`]: the `X-Session-*` header
//!   scheme; [`inbound`]: the proxy in front of the app that ties them together.
//!
//! It must never adopt a session id the store does not know (session fixation), never
//! let a client's own `X-Session-*` headers reach the app, never let the app's control
//! headers reach the client, and never drop a change the app asked for without telling
//! the client.
#![forbid(unsafe_code)]

pub mod codec;
pub mod cookie;
pub mod gob;
pub mod inbound;
pub mod memory;
pub mod metrics;
pub mod redis;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;

/// A session's data: key -> values (a key may hold several, sent as several headers).
pub type SessionData = BTreeMap<String, Vec<String>>;

/// Stored beside the data so that a session without keys still exists; its name is
/// not a valid header name, so no app key can collide with it.
pub const CREATED_FIELD: &str = "@created";

/// What one response asks to change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Change {
    pub set: Vec<(String, Vec<String>)>,
    pub del: Vec<String>,
}

impl Change {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.del.is_empty()
    }

    /// `data` with the change applied.
    pub fn apply(&self, data: &SessionData) -> SessionData {
        let mut out = data.clone();
        for key in &self.del {
            out.remove(key);
        }
        for (key, values) in &self.set {
            out.insert(key.clone(), values.clone());
        }
        out
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("session store {backend} is unavailable: {detail}")]
    Unavailable { backend: String, detail: String },
    #[error("{0}")]
    Invalid(String),
}

/// The session store port. Adapters pass the same contract suite
/// (`tests/contract.rs`).
#[async_trait::async_trait]
pub trait SessionStore: Send + Sync + 'static {
    /// The session's data, or `None` when the store does not know the id (never
    /// created, expired or destroyed).
    async fn load(&self, id: &str) -> Result<Option<SessionData>, StoreError>;

    /// Creates the session if needed, applies `change` atomically (other keys are
    /// untouched, whoever wrote them), and sets its TTL.
    async fn save(&self, id: &str, change: &Change, ttl: Duration) -> Result<(), StoreError>;

    /// Moves the session to a new id, keeping its data (`data` recreates it should it
    /// have vanished meanwhile); the old id is gone afterwards.
    async fn rotate(
        &self,
        old: &str,
        new: &str,
        data: &SessionData,
        ttl: Duration,
    ) -> Result<(), StoreError>;

    async fn destroy(&self, id: &str) -> Result<(), StoreError>;

    /// Time left before the session expires (`None` if it does not exist).
    async fn ttl(&self, id: &str) -> Result<Option<Duration>, StoreError>;

    /// Whether `id` is one this store may know (anything else is ignored without
    /// asking it).
    fn recognises(&self, id: &str) -> bool {
        is_valid_id(id)
    }

    /// Whether the session of `id` is in another system's format, to be moved to a
    /// new id of pillion's at its first request (bailiff's).
    fn is_foreign(&self, _id: &str) -> bool {
        false
    }

    /// An id for a new session.
    fn new_id(&self) -> String {
        new_id()
    }

    /// `memory` or `redis://host:port/db` (never with the password).
    fn backend(&self) -> String;

    /// Whether the store answers now (`/healthz`).
    async fn ping(&self) -> Result<(), StoreError>;
}

/// Opens the store named by `url`: `memory`, or `redis://[:password@]host:port[/db]`
/// (`rediss://` for TLS). A Redis that is down is not an error here: operations fail
/// until it is back.
pub fn open(url: &StoreUrl, bailiff: redis::Bailiff) -> Result<Arc<dyn SessionStore>, StoreError> {
    match url {
        StoreUrl::Redis(url) => Ok(Arc::new(redis::RedisStore::open(url, bailiff)?)),
        StoreUrl::Memory => Ok(Arc::new(memory::MemoryStore::new())),
    }
}

/// A session store, named by `--session-store`: checked once, when it is parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// `memory`: this sidecar's own (lost at restart, not shared).
    Memory,
    /// `redis://[:password@]host:port[/db]` or `rediss://...`, as given.
    Redis(String),
}

impl std::str::FromStr for StoreUrl {
    type Err = StoreError;

    fn from_str(url: &str) -> Result<StoreUrl, StoreError> {
        match url {
            "memory" | "memory://" => Ok(StoreUrl::Memory),
            u if u.starts_with("redis://") || u.starts_with("rediss://") => {
                redis::parse(u).map(|_| StoreUrl::Redis(u.to_string()))
            }
            _ => Err(StoreError::Invalid(format!(
                "unknown session store {:?}: use memory or redis[s]://[:password@]host:port[/db]",
                redact(url)
            ))),
        }
    }
}

impl std::fmt::Display for StoreUrl {
    /// The URL with its password hidden.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreUrl::Memory => f.write_str("memory"),
            StoreUrl::Redis(url) => f.write_str(&redact(url)),
        }
    }
}

/// Checks a store URL without connecting.
pub fn check_url(url: &str) -> Result<(), StoreError> {
    url.parse::<StoreUrl>().map(|_| ())
}

pub use pillion_core::secret::redact_url as redact;

/// A new session id: 256 bits from the OS CSPRNG, base64url (43 characters).
pub fn new_id() -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(pillion_core::id::random_bytes::<32>())
}

/// Whether `id` has the form of an id this sidecar issues (anything else is ignored
/// without asking the store).
pub fn is_valid_id(id: &str) -> bool {
    id.len() == 43
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_long_random_and_recognised() {
        let a = new_id();
        assert!(is_valid_id(&a), "{a}");
        assert_ne!(a, new_id());
        assert!(!is_valid_id("short"));
        assert!(!is_valid_id(&format!("{}!", &a[..42])));
    }

    #[test]
    fn passwords_never_show() {
        assert_eq!(
            redact("redis://:hunter2@10.0.0.1:6379/2"),
            "redis://***@10.0.0.1:6379/2"
        );
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        let err = check_url("nope://u:hunter2@x").unwrap_err().to_string();
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn a_change_applies_deletes_then_sets() {
        let mut data = SessionData::new();
        data.insert("a".into(), vec!["1".into()]);
        data.insert("b".into(), vec!["2".into()]);
        let change = Change {
            set: vec![("c".into(), vec!["3".into(), "4".into()])],
            del: vec!["a".into()],
        };
        let out = change.apply(&data);
        assert_eq!(out.keys().collect::<Vec<_>>(), ["b", "c"]);
        assert_eq!(out["c"], ["3", "4"]);
    }
}
