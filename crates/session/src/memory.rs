//! The embedded session store: sessions live in this process only (the default), so
//! they are shared by nothing else and lost on restart. Use Redis to share them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;

use crate::{Change, SessionData, SessionStore, StoreError};

pub struct MemoryStore {
    sessions: Arc<Mutex<HashMap<String, (SessionData, Instant)>>>,
}

type Sessions = Mutex<HashMap<String, (SessionData, Instant)>>;

impl MemoryStore {
    /// Creates the store and a task that drops expired sessions every few seconds.
    /// Must be called within a tokio runtime.
    pub fn new() -> Self {
        let sessions: Arc<Sessions> = Arc::default();
        tokio::spawn(sweep(Arc::downgrade(&sessions)));
        MemoryStore { sessions }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (SessionData, Instant)>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

async fn sweep(sessions: Weak<Sessions>) {
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let Some(sessions) = sessions.upgrade() else {
            return;
        };
        let now = Instant::now();
        sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, (_, expires)| *expires > now);
    }
}

#[async_trait::async_trait]
impl SessionStore for MemoryStore {
    async fn load(&self, id: &str) -> Result<Option<SessionData>, StoreError> {
        let now = Instant::now();
        Ok(self
            .lock()
            .get(id)
            .filter(|(_, expires)| *expires > now)
            .map(|(data, _)| data.clone()))
    }

    async fn save(&self, id: &str, change: &Change, ttl: Duration) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut sessions = self.lock();
        let entry = sessions
            .entry(id.to_string())
            .or_insert_with(|| (SessionData::new(), now + ttl));
        if entry.1 <= now {
            entry.0.clear(); // expired: start afresh, as Redis would
        }
        entry.0 = change.apply(&entry.0);
        entry.1 = now + ttl;
        Ok(())
    }

    async fn rotate(
        &self,
        old: &str,
        new: &str,
        data: &SessionData,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let mut sessions = self.lock();
        let kept = sessions
            .remove(old)
            .map(|(d, _)| d)
            .unwrap_or_else(|| data.clone());
        sessions.insert(new.to_string(), (kept, Instant::now() + ttl));
        Ok(())
    }

    async fn destroy(&self, id: &str) -> Result<(), StoreError> {
        self.lock().remove(id);
        Ok(())
    }

    async fn ttl(&self, id: &str) -> Result<Option<Duration>, StoreError> {
        let now = Instant::now();
        Ok(self
            .lock()
            .get(id)
            .filter(|(_, expires)| *expires > now)
            .map(|(_, expires)| *expires - now))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn backend(&self) -> String {
        "memory".into()
    }
}
