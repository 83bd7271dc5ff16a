//! Graceful draining of open HTTP connections, at no cost per request.
//!
//! hyper-util's `GracefulShutdown` polls a watch channel each time a connection is
//! polled, which takes a lock; on a sidecar answering small requests that was 2% of
//! its CPU. Here a connection registers its waker once (again only if the task's
//! waker changes) and otherwise reads one atomic flag per poll.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

#[derive(Default)]
pub struct Drain {
    draining: AtomicBool,
    next_id: AtomicU64,
    /// Connections being served.
    open: AtomicUsize,
    /// The waker of each connection's task, once polled.
    wakers: Mutex<HashMap<u64, Waker>>,
    closed: tokio::sync::Notify,
}

impl Drain {
    pub fn new() -> Arc<Drain> {
        Arc::new(Drain::default())
    }

    /// Serves `conn` until it ends; once [`Drain::drain`] is called, `finish` is
    /// called on it (to finish the request in flight and close).
    pub fn watch<C: Future>(self: &Arc<Self>, conn: C, finish: fn(Pin<&mut C>)) -> Watched<C> {
        self.open.fetch_add(1, Ordering::SeqCst);
        Watched {
            conn: Box::pin(conn),
            finish,
            drain: self.clone(),
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            waker: None,
            asked: false,
        }
    }

    /// Asks every connection to finish, and waits until all have closed.
    pub async fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        let wakers: Vec<Waker> = self.lock().values().cloned().collect();
        wakers.into_iter().for_each(Waker::wake);
        loop {
            let closed = self.closed.notified();
            tokio::pin!(closed);
            closed.as_mut().enable();
            if self.open.load(Ordering::SeqCst) == 0 {
                return;
            }
            closed.await;
        }
    }

    /// Whether draining has begun: a connection that serves its requests itself
    /// (rather than through [`Drain::watch`]'s `finish`) closes when idle.
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Waker>> {
        self.wakers.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct Watched<C> {
    conn: Pin<Box<C>>,
    finish: fn(Pin<&mut C>),
    drain: Arc<Drain>,
    id: u64,
    waker: Option<Waker>,
    asked: bool,
}

impl<C: Future> Future for Watched<C> {
    type Output = C::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if !this.asked {
            if !this.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                this.drain.lock().insert(this.id, cx.waker().clone());
                this.waker = Some(cx.waker().clone());
            }
            // Checked after registering, so a drain that starts meanwhile is seen
            // now or wakes this task.
            if this.drain.draining.load(Ordering::SeqCst) {
                this.asked = true;
                (this.finish)(this.conn.as_mut());
            }
        }
        this.conn.as_mut().poll(cx)
    }
}

impl<C> Drop for Watched<C> {
    fn drop(&mut self) {
        if self.waker.is_some() {
            self.drain.lock().remove(&self.id);
        }
        if self.drain.open.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.drain.closed.notify_waiters();
        }
    }
}
