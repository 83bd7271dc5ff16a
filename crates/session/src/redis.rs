//! The Redis session store. Each session is a hash, `pillion:session:{id}`, one field
//! per key (several values joined by a newline, which no header value can contain),
//! plus an `@created` field so that a session without keys still exists. A change is
//! one MULTI/EXEC of HSET, HDEL and EXPIRE: atomic, and it leaves other keys alone, so
//! concurrent responses that set different keys both survive.
//!
//! The connection is made lazily and re-made after a failure (redis-rs's connection
//! manager); every command has a deadline, so a Redis that hangs makes requests fail
//! fast instead of piling up.
//!
//! `rediss://` speaks TLS (rustls with the ring provider); the server certificate is
//! checked against the system's CAs, or the PEM file named by `SSL_CERT_FILE`.

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::AsyncCommands;

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
        let mut conn = self.conn.clone();
        let fields: HashMap<String, String> =
            conn.hgetall(key(id)).await.map_err(|e| self.err(e))?;
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
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn)
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
        let mut conn = self.conn.clone();
        let moved = redis::pipe()
            .atomic()
            .rename(key(old), key(new))
            .ignore()
            .expire(key(new), ttl_secs(ttl))
            .ignore()
            .query_async::<()>(&mut conn)
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
        let mut conn = self.conn.clone();
        conn.del::<_, ()>(key(id)).await.map_err(|e| self.err(e))
    }

    async fn ttl(&self, id: &str) -> Result<Option<Duration>, StoreError> {
        let mut conn = self.conn.clone();
        let secs: i64 = conn.ttl(key(id)).await.map_err(|e| self.err(e))?;
        Ok((secs >= 0).then(|| Duration::from_secs(secs as u64)))
    }

    fn backend(&self) -> String {
        self.backend.clone()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map(|_| ())
            .map_err(|e| self.err(e))
    }
}
