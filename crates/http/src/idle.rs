//! Keep-alive connections that wait for their next request, per listener.
//!
//! A connection between two requests holds a file descriptor and one of the
//! listener's connection slots while it does nothing. Each such wait has a clock
//! (`--idle-timeout`), and when the listener is full a new visitor is not left in
//! the kernel's backlog behind connections that are only waiting: the one that has
//! waited longest is closed to make room, as nginx and Envoy's overload manager do.
//!
//! Both are paid for per connection, not per request: a connection joins its
//! listener's [`Idlers`] once, and a wait costs one clock read and an atomic store
//! (when it began), a request one store (no longer waiting). The idle timer is not
//! reset for every wait: it fires at most once per idle timeout, and then looks at
//! when the current wait began. Only a full listener looks through the connections,
//! for the one that has waited longest.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use tokio::time::Instant;

/// The connections of one listener, each with when its wait began, if it waits.
pub(crate) struct Idlers {
    /// What wait times are counted from.
    epoch: Instant,
    next: AtomicU64,
    open: Mutex<BTreeMap<u64, Arc<Place>>>,
}

/// One connection's state as its listener sees it.
#[derive(Default)]
struct Place {
    /// When its wait began (nanoseconds after the epoch, plus one); 0: busy.
    waiting_since: AtomicU64,
    evicted: AtomicBool,
    waker: AtomicWaker,
}

impl Idlers {
    pub(crate) fn new() -> Arc<Idlers> {
        Arc::new(Idlers {
            epoch: Instant::now(),
            next: AtomicU64::new(0),
            open: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<Place>>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tells the connection that has waited longest to close; whether one waited.
    pub(crate) fn evict_oldest(&self) -> bool {
        let open = self.lock();
        let oldest = open
            .values()
            .filter(|p| !p.evicted.load(Ordering::Relaxed))
            .map(|p| (p.waiting_since.load(Ordering::Acquire), p))
            .filter(|(since, _)| *since != 0)
            .min_by_key(|(since, _)| *since);
        let Some((_, place)) = oldest else {
            return false;
        };
        place.evicted.store(true, Ordering::Release);
        place.waker.wake();
        true
    }

    /// How many connections wait now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock()
            .values()
            .filter(|p| {
                p.waiting_since.load(Ordering::Acquire) != 0 && !p.evicted.load(Ordering::Acquire)
            })
            .count()
    }
}

/// A connection's clock between requests, and its place among its listener's
/// connections (left when dropped).
pub(crate) struct Keepalive {
    limit: Duration,
    idlers: Arc<Idlers>,
    key: u64,
    place: Arc<Place>,
    /// When the current wait began, while the connection waits.
    since: Option<Instant>,
    /// Fires at the end of the earliest wait it was set for; looked at then.
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl Keepalive {
    pub(crate) fn new(limit: Duration, idlers: Arc<Idlers>) -> Keepalive {
        let key = idlers.next.fetch_add(1, Ordering::Relaxed);
        let place = Arc::new(Place::default());
        idlers.lock().insert(key, place.clone());
        Keepalive {
            limit,
            idlers,
            key,
            place,
            since: None,
            timer: Box::pin(tokio::time::sleep(limit)),
        }
    }

    /// The connection has nothing to do: ready when it has waited `--idle-timeout`,
    /// or when the listener needs its slot.
    pub(crate) fn poll_wait(&mut self, cx: &mut Context<'_>) -> Poll<&'static str> {
        let since = match self.since {
            Some(since) => since,
            None => {
                let now = Instant::now();
                let nanos = now.saturating_duration_since(self.idlers.epoch).as_nanos() as u64;
                self.place.waiting_since.store(nanos + 1, Ordering::Release);
                *self.since.insert(now)
            }
        };
        self.place.waker.register(cx.waker());
        if self.place.evicted.load(Ordering::Acquire) {
            return Poll::Ready("the listener is full; the connection waited longest");
        }
        loop {
            ready!(self.timer.as_mut().poll(cx));
            let end = since + self.limit;
            if self.timer.deadline() >= end {
                return Poll::Ready("no request within --idle-timeout");
            }
            // Set during an earlier wait: now for this one.
            self.timer.as_mut().reset(end);
        }
    }

    /// How long a wait may last.
    pub(crate) fn limit(&self) -> Duration {
        self.limit
    }

    /// A request began: the connection no longer waits.
    pub(crate) fn busy(&mut self) {
        if self.since.take().is_some() {
            self.place.waiting_since.store(0, Ordering::Release);
        }
    }
}

impl Drop for Keepalive {
    fn drop(&mut self) {
        self.idlers.lock().remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    #[tokio::test(start_paused = true)]
    async fn the_connection_that_waited_longest_is_evicted_first_and_a_busy_one_never() {
        let idlers = Idlers::new();
        let mut cx = Context::from_waker(Waker::noop());
        let limit = Duration::from_secs(60);
        let mut first = Keepalive::new(limit, idlers.clone());
        let mut second = Keepalive::new(limit, idlers.clone());
        let mut third = Keepalive::new(limit, idlers.clone());
        for k in [&mut first, &mut second, &mut third] {
            assert!(k.poll_wait(&mut cx).is_pending());
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        first.busy();
        assert_eq!(idlers.len(), 2);
        assert!(idlers.evict_oldest());
        assert!(second.poll_wait(&mut cx).is_ready());
        assert!(third.poll_wait(&mut cx).is_pending());
        assert!(
            first.poll_wait(&mut cx).is_pending(),
            "it waits again, newest"
        );
        drop(third);
        assert!(idlers.evict_oldest(), "the first, which waits again");
        assert!(first.poll_wait(&mut cx).is_ready());
        assert!(!idlers.evict_oldest(), "no one waits");
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_ends_its_full_timeout_after_it_began_however_late_the_timer_was_set() {
        let idlers = Idlers::new();
        let limit = Duration::from_secs(60);
        let mut k = Keepalive::new(limit, idlers);
        // Busy for 50 s, then waits: the timer set at the start fires at 60 s, and
        // the wait still lasts its whole minute.
        tokio::time::advance(Duration::from_secs(50)).await;
        let began = Instant::now();
        let why = std::future::poll_fn(|cx| k.poll_wait(cx)).await;
        assert_eq!(why, "no request within --idle-timeout");
        assert_eq!(began.elapsed(), limit);
    }
}
