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
    pub fn open(url: &str) -> Result<RedisStore, StoreError> {
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
        })
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
    async fn load(&self, id: &str) -> Result<Option<SessionData>, StoreError> {
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
        let k = key(id);
        self.run(|mut conn| {
            let k = &k;
            async move { conn.del::<_, ()>(k).await }
        })
        .await
        .map_err(|e| self.err(e))
    }

    async fn ttl(&self, id: &str) -> Result<Option<Duration>, StoreError> {
        let k = key(id);
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
