//! Whether to try a call again: a pure decision from what the attempt came to, how
//! many retries were made, and whether the request can be sent again.
//!
//! - A request that never reached a node (no connection) is tried on another node
//!   whatever its method or body, and costs nothing from the budget.
//! - After the node may have seen it (502/503/504, a reset, a bad answer, a per-try
//!   timeout), only a replayable request is tried again (its body was read whole,
//!   and its method is idempotent or the caller sent `X-Pillion-Retry: always`), and
//!   each such retry is paid from the service's retry budget.
//! - A failure that is the caller's or pillion's own is never retried: another node
//!   would fare no better.

/// What one attempt came to, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// No connection could be made: the node never saw the request.
    NotSent,
    /// The node answered 502, 503 or 504.
    Unavailable,
    /// The node may have seen the request, then failed (reset, closed, bad answer).
    Failed,
    /// No answer within the per-try timeout.
    TimedOut,
    /// The caller's fault (a broken upload) or pillion's (out of sockets).
    NotTheNodes,
}

/// What the call allows.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    /// Retries after the first attempt, at most.
    pub retries: u32,
    /// Whether the request may be sent again after a node may have seen it.
    pub replayable: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Retry,
    Stop,
}

/// `attempt` counts from 0 (the first try). `time_left` says whether the call's
/// deadline has not passed. `budget` withdraws one retry from the service's budget;
/// it is called only for a retry the budget pays for.
pub fn decide(
    outcome: Outcome,
    attempt: u32,
    rules: Rules,
    time_left: bool,
    budget: impl FnOnce() -> bool,
) -> Decision {
    if attempt >= rules.retries || !time_left {
        return Decision::Stop;
    }
    match outcome {
        Outcome::NotTheNodes => Decision::Stop,
        Outcome::NotSent => Decision::Retry,
        Outcome::Unavailable | Outcome::Failed | Outcome::TimedOut => {
            if rules.replayable && budget() {
                Decision::Retry
            } else {
                Decision::Stop
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Decision::{Retry, Stop};
    use Outcome::*;

    #[test]
    fn the_decision_table() {
        let replayable = Rules {
            retries: 2,
            replayable: true,
        };
        let once_only = Rules {
            retries: 2,
            replayable: false,
        };
        // (outcome, attempt, rules, time left, budget has a token, decision, budget asked)
        let table = [
            (NotSent, 0, once_only, true, false, Retry, false),
            (NotSent, 1, once_only, true, false, Retry, false),
            (NotSent, 2, once_only, true, true, Stop, false),
            (NotSent, 0, once_only, false, true, Stop, false),
            (Unavailable, 0, replayable, true, true, Retry, true),
            (Unavailable, 0, replayable, true, false, Stop, true),
            (Unavailable, 0, once_only, true, true, Stop, false),
            (Failed, 1, replayable, true, true, Retry, true),
            (Failed, 0, once_only, true, true, Stop, false),
            (TimedOut, 0, replayable, true, true, Retry, true),
            (TimedOut, 0, replayable, false, true, Stop, false),
            (TimedOut, 2, replayable, true, true, Stop, false),
            (NotTheNodes, 0, replayable, true, true, Stop, false),
        ];
        for (outcome, attempt, rules, time_left, token, want, asks) in table {
            let mut asked = false;
            let got = decide(outcome, attempt, rules, time_left, || {
                asked = true;
                token
            });
            assert_eq!(got, want, "{outcome:?} attempt {attempt} {rules:?}");
            assert_eq!(
                asked, asks,
                "budget asked for {outcome:?} attempt {attempt}"
            );
        }
    }
}
