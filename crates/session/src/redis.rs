//! The Redis session store. Each session is a hash, `pillion:session:{id}`, one field
//! per key (several values joined by a newline, which no header value can contain),
//! plus an `@created` field so that a session without keys still exists. A change is
//! one MULTI/EXEC of HSET, HDEL and EXPIRE: atomic, and it leaves other keys alone, so
//! concurrent responses that set different keys both survive.
//!
//! The connection is made lazily and re-made after a failure (redis-rs's connection
//! manager); every command has a deadline, so a Redis that hangs makes requests fail
//! fast instead of piling up. The manager learns that its connection died (Redis
//! restarted) only from a command that fails on it, so an operation that fails that
//! way is sent once more, on the new connection: every operation here is idempotent
//! (reads, HSET/HDEL/EXPIRE, RENAME then EXPIRE, DEL), so a replay of one that did
//! reach Redis changes nothing, and a visitor's change is not lost to a connection
//! that was already dead before it was sent.
//!
//! `rediss://` speaks TLS (rustls with the ring provider); the server certificate is
//! checked against the system's CAs, or the PEM file named by `SSL_CERT_FILE`.
//!
//! bailiff's sessions ([`Bailiff`]): an id of bailiff's shape (103 characters of
//! base32) is looked up where bailiff keeps it, `{prefix}{id}`, a string holding
//! Go's gob of the session ([`crate::gob`]). By default such a session is moved to
//! pillion's format at its first request (a new id, the old key deleted), so nobody
//! is logged out at the cutover; with `--session-format bailiff` sessions stay in
//! bailiff's format and ids (each change a read, then a write of the whole session,
//! as bailiff did), so bailiff and pillion can serve the same visitors side by side.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, RedisResult};

use crate::{redact, Change, SessionData, SessionStore, StoreError, CREATED_FIELD};

const KEY_PREFIX: &str = "pillion:session:";
/// Deadline of one Redis command (and of connecting).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(1);

pub struct RedisStore {
    conn: ConnectionManager,
    backend: String,
    bailiff: Bailiff,
}

/// How bailiff's stored sessions are met.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bailiff {
    /// bailiff's `store.redis.keyprefix` (empty, bailiff's default).
    pub prefix: String,
    /// Keep writing bailiff's format and ids (`--session-format bailiff`).
    pub keep: bool,
}

/// Go's `textproto.CanonicalMIMEHeaderKey`, which bailiff's keys went through:
/// `user-id` -> `User-Id`.
fn canonical_header_key(key: &str) -> String {
    let mut upper = true;
    key.chars()
        .map(|c| {
            let out = if upper {
                c.to_ascii_uppercase()
            } else {
                c.to_ascii_lowercase()
            };
            upper = c == '-';
            out
        })
        .collect()
}

/// Whether `id` has the shape of bailiff's ids: the unpadded base32 of 64 bytes.
pub fn is_bailiff_id(id: &str) -> bool {
    id.len() == 103
        && id
            .bytes()
            .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))
}

/// A new id of bailiff's shape, from 64 bytes of the OS CSPRNG.
pub fn bailiff_id() -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let bytes = pillion_core::id::random_bytes::<64>();
    let mut out = String::with_capacity(103);
    let (mut acc, mut bits) = (0u32, 0u32);
    for b in bytes {
        acc = (acc << 8) | b as u32;
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((acc >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((acc << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// Parses a `redis://` URL (password and db index included) without connecting.
pub fn parse(url: &str) -> Result<redis::Client, StoreError> {
    redis::Client::open(url).map_err(|e| {
        StoreError::Invalid(format!(
            "session store URL {:?} is invalid: {e}; write redis[s]://[:password@]host:port[/db]",
            redact(url)
        ))
    })
}

impl RedisStore {
    pub fn open(url: &str, bailiff: Bailiff) -> Result<RedisStore, StoreError> {
        if url.starts_with("rediss://") {
            // rustls needs one process-wide crypto provider; another part of pillion
            // may have installed it already, which is as good.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let client = parse(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| StoreError::Invalid(format!("session store {}: {e}", redact(url))))?;
        Ok(RedisStore {
            conn,
            backend: redact(url),
            bailiff,
        })
    }

    fn bailiff_key(&self, id: &str) -> String {
        format!("{}{id}", self.bailiff.prefix)
    }

    /// A bailiff session's data, or `None` when Redis has none under its key. A value
    /// that is not one is logged (once per process) and counts as none.
    async fn load_bailiff(&self, id: &str) -> Result<Option<SessionData>, StoreError> {
        let k = self.bailiff_key(id);
        let raw: Option<Vec<u8>> = self
            .run(|mut conn| {
                let k = &k;
                async move { conn.get(k).await }
            })
            .await
            .map_err(|e| self.err(e))?;
        let Some(raw) = raw else {
            return Ok(None);
        };
        match crate::gob::decode(&raw) {
            // bailiff keeps Go's canonical header names (User-Id), pillion the names
            // as HTTP/2 and its codec write them (user-id).
            Ok(data) => Ok(Some(
                data.into_iter()
                    .map(|(k, v)| (k.to_ascii_lowercase(), v))
                    .collect(),
            )),
            Err(e) => {
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(|| {
                    tracing::warn!(store = %self.backend, error = %e, "a session under a bailiff id cannot be read; it is treated as absent (logged once)");
                });
                Ok(None)
            }
        }
    }

    /// Writes a whole session in bailiff's format, with its TTL.
    async fn store_bailiff(
        &self,
        id: &str,
        data: &SessionData,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let k = self.bailiff_key(id);
        let canonical: SessionData = data
            .iter()
            .map(|(k, v)| (canonical_header_key(k), v.clone()))
            .collect();
        let value = crate::gob::encode(&canonical);
        let secs = ttl_secs(ttl) as u64;
        self.run(|mut conn| {
            let (k, value) = (&k, &value);
            async move { conn.set_ex::<_, _, ()>(k, value, secs).await }
        })
        .await
        .map_err(|e| self.err(e))
    }

    /// Runs `op` on the connection, and once more when the connection turned out to
    /// be dead (see the module comment); `op` must be idempotent. A timeout is not
    /// replayed: a Redis that hangs should fail the request fast.
    async fn run<T, F, Fut>(&self, op: F) -> RedisResult<T>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        match op(self.conn.clone()).await {
            Err(e) if e.is_connection_dropped() && !e.is_timeout() => {
                tracing::debug!(store = %self.backend, error = %e, "redis connection lost; sending again");
                op(self.conn.clone()).await
            }
            done => done,
        }
    }

    fn err(&self, e: redis::RedisError) -> StoreError {
        StoreError::Unavailable {
            backend: self.backend.clone(),
            detail: e.to_string(),
        }
    }
}

fn key(id: &str) -> String {
    format!("{KEY_PREFIX}{id}")
}

fn ttl_secs(ttl: Duration) -> i64 {
    ttl.as_secs().max(1) as i64
}

fn join(values: &[String]) -> String {
    values.join("\n")
}

#[async_trait::async_trait]
impl SessionStore for RedisStore {
    fn recognises(&self, id: &str) -> bool {
        crate::is_valid_id(id) || is_bailiff_id(id)
    }

    fn is_foreign(&self, id: &str) -> bool {
        is_bailiff_id(id) && !self.bailiff.keep
    }

    fn new_id(&self) -> String {
        if self.bailiff.keep {
            bailiff_id()
        } else {
            crate::new_id()
        }
    }

    async fn load(&self, id: &str) -> Result<Option<SessionData>, StoreError> {
        if is_bailiff_id(id) {
            return self.load_bailiff(id).await;
        }
        let k = key(id);
        let fields: HashMap<String, String> = self
            .run(|mut conn| {
                let k = &k;
                async move { conn.hgetall(k).await }
            })
            .await
            .map_err(|e| self.err(e))?;
        if fields.is_empty() {
            return Ok(None);
        }
        Ok(Some(
            fields
                .into_iter()
                .filter(|(k, _)| !k.starts_with('@'))
                .map(|(k, v)| (k, v.split('\n').map(str::to_string).collect()))
                .collect(),
        ))
    }

    async fn save(&self, id: &str, change: &Change, ttl: Duration) -> Result<(), StoreError> {
        if is_bailiff_id(id) {
            // bailiff's format is one value: read, change, write (as bailiff did).
            let data = self.load_bailiff(id).await?.unwrap_or_default();
            return self.store_bailiff(id, &change.apply(&data), ttl).await;
        }
        let k = key(id);
        let mut pipe = redis::pipe();
        pipe.atomic();
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        pipe.hset_nx(&k, CREATED_FIELD, created).ignore();
        for (field, values) in &change.set {
            pipe.hset(&k, field, join(values)).ignore();
        }
        if !change.del.is_empty() {
            pipe.hdel(&k, &change.del).ignore();
        }
        pipe.expire(&k, ttl_secs(ttl)).ignore();
        let pipe = &pipe;
        self.run(|mut conn| async move { pipe.query_async::<()>(&mut conn).await })
            .await
            .map_err(|e| self.err(e))
    }

    async fn rotate(
        &self,
        old: &str,
        new: &str,
        data: &SessionData,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        if is_bailiff_id(old) || is_bailiff_id(new) {
            // Between formats, or within bailiff's: the session written whole under
            // the new id, then the old one deleted.
            if is_bailiff_id(new) {
                self.store_bailiff(new, data, ttl).await?;
            } else {
                let change = Change {
                    set: data.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                    del: Vec::new(),
                };
                self.save(new, &change, ttl).await?;
            }
            return self.destroy(old).await;
        }
        let mut pipe = redis::pipe();
        pipe.atomic()
            .rename(key(old), key(new))
            .ignore()
            .expire(key(new), ttl_secs(ttl))
            .ignore();
        let pipe = &pipe;
        // Replayed after a rename that did happen, RENAME finds no old key, and the
        // session is rewritten from `data` below: the same session under the new id.
        let moved = self
            .run(|mut conn| async move { pipe.query_async::<()>(&mut conn).await })
            .await;
        match moved {
            Ok(()) => Ok(()),
            // The old session expired meanwhile: recreate it under the new id.
            Err(e) if e.to_string().to_lowercase().contains("no such key") => {
                let change = Change {
                    set: data.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                    del: Vec::new(),
                };
                self.save(new, &change, ttl).await
            }
            Err(e) => Err(self.err(e)),
        }
    }

    async fn destroy(&self, id: &str) -> Result<(), StoreError> {
        let k = if is_bailiff_id(id) {
            self.bailiff_key(id)
        } else {
            key(id)
        };
        self.run(|mut conn| {
            let k = &k;
            async move { conn.del::<_, ()>(k).await }
        })
        .await
        .map_err(|e| self.err(e))
    }

    async fn ttl(&self, id: &str) -> Result<Option<Duration>, StoreError> {
        let k = if is_bailiff_id(id) {
            self.bailiff_key(id)
        } else {
            key(id)
        };
        let secs: i64 = self
            .run(|mut conn| {
                let k = &k;
                async move { conn.ttl(k).await }
            })
            .await
            .map_err(|e| self.err(e))?;
        Ok((secs >= 0).then(|| Duration::from_secs(secs as u64)))
    }

    fn backend(&self) -> String {
        self.backend.clone()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.run(
            |mut conn| async move { redis::cmd("PING").query_async::<String>(&mut conn).await },
        )
        .await
        .map(|_| ())
        .map_err(|e| self.err(e))
    }
}
