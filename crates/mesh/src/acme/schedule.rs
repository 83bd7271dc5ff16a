//! When to renew a certificate and when to try again after a failure: pure
//! functions of the certificate's validity and the clock, so the rules have tests.

use std::time::{Duration, SystemTime};

/// A certificate is renewed this long before its notAfter (at most a third of its
/// life before, so a short-lived certificate is not renewed as soon as it arrives).
pub const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);

/// How often a certificate that is not due yet is looked at again: a long sleep is
/// not trusted across a suspended machine or a clock that was set.
pub const CHECK_EVERY: Duration = Duration::from_secs(12 * 3600);

/// The wait after the first failed order; it doubles with each further failure.
pub const FIRST_RETRY: Duration = Duration::from_secs(60);

/// The longest wait between failed orders (the CA's rate limits count failures per
/// hour).
pub const MAX_RETRY: Duration = Duration::from_secs(3600);

/// When a certificate valid from `not_before` to `not_after` is due for renewal.
pub fn renew_after(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    let life = not_after.duration_since(not_before).unwrap_or_default();
    let early = RENEW_BEFORE.min(life / 3);
    not_after.checked_sub(early).unwrap_or(not_before)
}

/// How long to wait before looking at the certificate again; `None` when it is due
/// now.
pub fn next_check(now: SystemTime, renew_after: SystemTime) -> Option<Duration> {
    match renew_after.duration_since(now) {
        Ok(left) if !left.is_zero() => Some(left.min(CHECK_EVERY)),
        _ => None,
    }
}

/// The wait after the `failures`-th failed order in a row (1 for the first).
pub fn retry_after(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    FIRST_RETRY.saturating_mul(1 << doublings).min(MAX_RETRY)
}

/// Whether a certificate ending at `not_after` is still worth serving at `now`.
pub fn usable(now: SystemTime, not_after: SystemTime) -> bool {
    now < not_after
}

#[cfg(test)]
mod tests {
    use super::*;

    fn days(n: u32) -> Duration {
        Duration::from_secs(24 * 3600) * n
    }

    fn at(day: u32) -> SystemTime {
        SystemTime::UNIX_EPOCH + days(20_000) + days(day)
    }

    #[test]
    fn a_90_day_certificate_is_renewed_30_days_before_it_ends() {
        let (issued, ends) = (at(0), at(90));
        assert_eq!(renew_after(issued, ends), at(60));
        // Looked at every 12 h until then, and due from day 60.
        assert_eq!(next_check(at(1), at(60)), Some(CHECK_EVERY));
        assert_eq!(
            next_check(at(60) - Duration::from_secs(60), at(60)),
            Some(Duration::from_secs(60))
        );
        assert_eq!(next_check(at(60), at(60)), None);
        assert_eq!(next_check(at(75), at(60)), None);
    }

    #[test]
    fn pebbles_five_year_certificate_is_not_due_for_years() {
        let (issued, ends) = (at(0), at(5 * 365));
        let due = renew_after(issued, ends);
        assert_eq!(due, at(5 * 365 - 30));
        assert_eq!(next_check(at(0), due), Some(CHECK_EVERY));
    }

    #[test]
    fn a_cached_certificate_within_30_days_of_its_end_is_due_at_once() {
        let due = renew_after(at(0), at(90));
        assert_eq!(next_check(at(61), due), None);
        assert!(usable(at(61), at(90)), "it still serves while renewed");
        assert!(!usable(at(90), at(90)));
    }

    #[test]
    fn a_short_lived_certificate_is_renewed_at_two_thirds_of_its_life() {
        // Six days (Let's Encrypt's short-lived profile): renewed after four.
        assert_eq!(renew_after(at(0), at(6)), at(4));
        assert_eq!(next_check(at(0), at(4)), Some(CHECK_EVERY));
        // A certificate that ends before it starts is due at once.
        assert_eq!(next_check(at(5), renew_after(at(5), at(4))), None);
    }

    #[test]
    fn failures_back_off_from_a_minute_to_an_hour() {
        let waits: Vec<u64> = (1..=9).map(|n| retry_after(n).as_secs()).collect();
        assert_eq!(waits, [60, 120, 240, 480, 960, 1920, 3600, 3600, 3600]);
        assert_eq!(retry_after(u32::MAX), MAX_RETRY);
    }
}
