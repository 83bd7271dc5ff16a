//! Keep-alive connections that wait for their next request, per listener.
//!
//! A connection between two requests holds a file descriptor and one of the
//! listener's connection slots while it does nothing. Each such wait has a clock
//! (`--idle-timeout`), and when the listener is full a new visitor is not left in
//! the kernel's backlog behind connections that are only waiting: the one that has
//! waited longest is closed to make room, as nginx and Envoy's overload manager do.
//!
//! A connection enters the [`Idlers`] of its listener when it starts waiting and
//! leaves when a request begins, at the cost of one uncontended lock each way; the
//! accept loop asks for the oldest to be closed only when it holds a connection it
//! has no slot for.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use futures_util::task::AtomicWaker;

/// The connections of one listener that wait for a request, oldest first.
#[derive(Default)]
pub(crate) struct Idlers {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    next: u64,
    waiting: BTreeMap<u64, Arc<Eviction>>,
}

/// How a waiting connection is told to close.
#[derive(Default)]
struct Eviction {
    evicted: AtomicBool,
    waker: AtomicWaker,
}

impl Idlers {
    pub(crate) fn new() -> Arc<Idlers> {
        Arc::new(Idlers::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tells the connection that has waited longest to close; whether there was one.
    pub(crate) fn evict_oldest(&self) -> bool {
        let Some((_, eviction)) = self.lock().waiting.pop_first() else {
            return false;
        };
        eviction.evicted.store(true, Ordering::Release);
        eviction.waker.wake();
        true
    }

    /// How many connections wait now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().waiting.len()
    }
}

/// One connection's place among its listener's [`Idlers`]; it leaves them when
/// dropped.
struct Waiting {
    idlers: Arc<Idlers>,
    key: Option<u64>,
    eviction: Arc<Eviction>,
}

impl Waiting {
    fn new(idlers: Arc<Idlers>) -> Waiting {
        Waiting {
            idlers,
            key: None,
            eviction: Arc::default(),
        }
    }

    /// The connection waits for a request (again a no-op while it already does):
    /// ready once the listener needs its slot for a new connection.
    fn poll_evicted(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.key.is_none() {
            let mut inner = self.idlers.lock();
            let key = inner.next;
            inner.next += 1;
            inner.waiting.insert(key, self.eviction.clone());
            self.key = Some(key);
        }
        self.eviction.waker.register(cx.waker());
        if self.eviction.evicted.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        Poll::Pending
    }

    /// A request began: the connection no longer waits.
    pub(crate) fn busy(&mut self) {
        if let Some(key) = self.key.take() {
            self.idlers.lock().waiting.remove(&key);
        }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.busy();
    }
}

/// A connection between two requests: how long it has waited, and its place among
/// the listener's waiting connections.
pub(crate) struct Keepalive {
    limit: Duration,
    /// Reset, not made anew, for each wait.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Whether the connection waits now (the timer runs).
    waiting: bool,
    place: Waiting,
}

impl Keepalive {
    pub(crate) fn new(limit: Duration, idlers: Arc<Idlers>) -> Keepalive {
        Keepalive {
            limit,
            timer: None,
            waiting: false,
            place: Waiting::new(idlers),
        }
    }

    /// The connection has nothing to read and no request begun: ready when it has
    /// waited `--idle-timeout`, or when the listener needs its slot.
    pub(crate) fn poll_wait(&mut self, cx: &mut Context<'_>) -> Poll<&'static str> {
        if !self.waiting {
            // The clock is read once per wait, not per poll.
            let deadline = Instant::now() + self.limit;
            match &mut self.timer {
                Some(timer) => timer.as_mut().reset(deadline),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
            self.waiting = true;
        }
        if self.place.poll_evicted(cx).is_ready() {
            return Poll::Ready("the listener is full; the connection waited longest");
        }
        let timer = self.timer.as_mut().expect("armed above");
        ready!(timer.as_mut().poll(cx));
        Poll::Ready("no request within --idle-timeout")
    }

    /// Bytes came: the connection no longer waits.
    pub(crate) fn busy(&mut self) {
        if self.waiting {
            self.waiting = false;
            self.place.busy();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    #[test]
    fn the_connection_that_waited_longest_is_evicted_first_and_a_busy_one_never() {
        let idlers = Idlers::new();
        let mut cx = Context::from_waker(Waker::noop());
        let mut first = Waiting::new(idlers.clone());
        let mut second = Waiting::new(idlers.clone());
        let mut third = Waiting::new(idlers.clone());
        assert!(first.poll_evicted(&mut cx).is_pending());
        assert!(second.poll_evicted(&mut cx).is_pending());
        assert!(third.poll_evicted(&mut cx).is_pending());
        first.busy();
        assert_eq!(idlers.len(), 2);
        assert!(idlers.evict_oldest());
        assert!(
            first.poll_evicted(&mut cx).is_pending(),
            "it waits again, newest"
        );
        assert!(second.poll_evicted(&mut cx).is_ready());
        assert!(third.poll_evicted(&mut cx).is_pending());
        drop(third);
        assert!(idlers.evict_oldest(), "the first, which waits again");
        assert!(first.poll_evicted(&mut cx).is_ready());
        assert!(!idlers.evict_oldest(), "no one waits");
    }
}
