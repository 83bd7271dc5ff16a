//! The retry budget: retries may add at most ~20% to a service's load, plus a floor
//! of 10 per second so a quiet service can still retry. A failing service is then
//! not hammered by its callers' retries (a retry storm).
//!
//! Tokens are kept in thousandths in one atomic: each request deposits `percent`, each
//! retry withdraws one; time adds `min_per_sec`.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use crate::endpoints::clock;

pub struct RetryBudget {
    milli_tokens: AtomicI64,
    refilled_ms: AtomicU64,
    deposit: i64,
    per_sec: i64,
    cap: i64,
}

impl RetryBudget {
    pub fn new(percent: f64, min_per_sec: u32) -> RetryBudget {
        let per_sec = i64::from(min_per_sec) * 1000;
        RetryBudget {
            milli_tokens: AtomicI64::new(per_sec),
            refilled_ms: AtomicU64::new(clock().as_millis() as u64),
            deposit: (percent * 1000.0) as i64,
            per_sec,
            // At most ten seconds' worth of floor, or 100 retries, saved up.
            cap: (per_sec * 10).max(100_000),
        }
    }

    /// Called once per request (not per retry).
    pub fn deposit(&self) {
        let t = self.milli_tokens.fetch_add(self.deposit, Ordering::Relaxed);
        if t + self.deposit > self.cap {
            self.milli_tokens.fetch_sub(self.deposit, Ordering::Relaxed);
        }
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn withdraw(&self) -> bool {
        let now = clock().as_millis() as u64;
        let last = self.refilled_ms.load(Ordering::Relaxed);
        if now > last
            && self
                .refilled_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let add = (now - last) as i64 * self.per_sec / 1000;
            let t = self.milli_tokens.fetch_add(add, Ordering::Relaxed) + add;
            if t > self.cap {
                self.milli_tokens.fetch_sub(t - self.cap, Ordering::Relaxed);
            }
        }
        let mut t = self.milli_tokens.load(Ordering::Relaxed);
        loop {
            if t < 1000 {
                return false;
            }
            match self.milli_tokens.compare_exchange_weak(
                t,
                t - 1000,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(now) => t = now,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_about_a_fifth_of_requests_beyond_the_floor() {
        let b = RetryBudget::new(0.2, 0);
        for _ in 0..100 {
            b.deposit();
        }
        let allowed = (0..100).filter(|_| b.withdraw()).count();
        assert_eq!(allowed, 20);
    }

    #[test]
    fn the_floor_allows_a_few_retries_without_traffic() {
        let b = RetryBudget::new(0.2, 10);
        let allowed = (0..100).filter(|_| b.withdraw()).count();
        assert_eq!(allowed, 10);
    }
}
