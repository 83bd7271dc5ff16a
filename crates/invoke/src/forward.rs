//! One call to a service, across attempts: choose a node, send, and decide from the
//! outcome whether to answer or to try again. The call is admitted first (at most
//! `max_pending` calls wait for a service) and its pinned node found; each attempt
//! then runs [`crate::attempt`]'s steps, and [`retry::decide`] says whether another
//! follows.
//!
//! - Connect failures are retried on another node whatever the method: the node never
//!   saw the request. A streaming body is handed back by the pool, so it retries too.
//! - 502/503/504 answers, resets and per-try timeouts are retried only for idempotent
//!   methods (or with `X-Pillion-Retry: always`), and only when the body can be sent
//!   again (it was read whole).
//! - Every retry but those after connect failures spends from the service's
//!   [`RetryBudget`](crate::budget::RetryBudget); retries back off exponentially with
//!   jitter; the overall deadline bounds everything. [`retry::decide`] says which.
//! - Only the node's faults feed outlier ejection and the peak-EWMA (as a 1 s latency
//!   penalty, so a node that fails fast does not look fast); the node's measured
//!   latency, which `/statusz` and the dashboard show, is fed by its answers only. A
//!   caller whose upload breaks off gets 400 (413 over the limit) and the node's
//!   record is untouched; a sidecar out of sockets answers 503 and blames nobody
//!   else.
//! - A call to a service with no node to go to (not registered, or no longer) is
//!   answered 404 (503 after `X-Pillion-Wait`) and counted in that service's metrics
//!   all the same, so a service that died shows its callers' errors.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, Method, Response, StatusCode, Uri};
use pillion_core::ApiError;

use pillion_http::pool::{Outgoing, PooledBody};

use crate::attempt::{
    backoff, build, readdress, try_limit, unavailable, Failure, Failures, Feedback, Problem,
    Replay, Wire,
};
use crate::balance::{self, Strategy, Tried};
use crate::endpoints::{since_epoch, EjectionPolicy, NodeState, ServiceSet};
use crate::jsonrpc;
use crate::metrics::AnsweredBy;
use crate::retry::{self, Decision, Rules};
use crate::Invoker;

pub const ID: &str = "pillion.invoke";

/// How calls are made; from the sidecar's config.
#[derive(Debug, Clone)]
pub struct Policy {
    pub strategy: Strategy,
    pub connect_timeout: Duration,
    pub per_try_timeout: Duration,
    pub retries: u32,
    pub max_pending: usize,
    pub ejection: EjectionPolicy,
}

/// One call, as a handler prepared it.
pub struct Call {
    pub service: String,
    pub method: Method,
    /// Origin-form `/path?query` to send to the node.
    pub uri: Uri,
    /// Headers to send, hop-by-hop ones already removed.
    pub headers: HeaderMap,
    pub body: Outgoing,
    /// A gRPC call (it needs HTTP/2 to the node, whatever the caller spoke).
    pub grpc: bool,
    /// A call by service and method (`uri` is `/{Method}`): a go-micro RPC node gets
    /// it as a JSON-RPC request ([`crate::jsonrpc`]).
    pub rpc: bool,
    /// Send to the node with this address or id only.
    pub pin: Option<String>,
    /// Until the response headers arrive.
    pub timeout: Duration,
    /// How long to wait for a node when the service has none (within `timeout`).
    pub wait: Duration,
    /// Retry 5xx answers and resets even for a non-idempotent method.
    pub retry_any_method: bool,
}

/// What a traced call reports about its attempts, for its span.
#[derive(Default)]
pub struct Tally {
    /// Attempts after the first.
    pub retries: u32,
    /// The node of the last attempt.
    pub node: Option<Arc<NodeState>>,
}

pub(crate) fn error(status: StatusCode, detail: String) -> ApiError {
    ApiError::new(ID, status, detail)
}

/// A place among the calls waiting for a service, given back when the call ends.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    /// Takes a place among `waiting`, unless `max` calls hold one already.
    fn admit(waiting: &'a AtomicUsize, max: usize) -> Option<Waiting<'a>> {
        if waiting.fetch_add(1, Ordering::Relaxed) >= max {
            waiting.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Waiting(waiting))
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Makes the call and records it in the service's metrics (status as the caller
/// sees it, latency until the response headers). `tally`, when given, learns the
/// node and the retries (a traced call).
pub fn forward<'a>(
    inv: Arc<Invoker>,
    call: Call,
    tally: Option<&'a mut Tally>,
) -> impl Future<Output = Result<Response<PooledBody>, ApiError>> + Send + 'a {
    use futures_util::future::{ready, Either};
    // Not an async block: that would keep `call` once more beside the attempts'
    // own copy, and this future is the largest of a call.
    let started = Instant::now();
    let set = inv.endpoints.service(&call.service);
    if !call.wait.is_zero() && set.as_ref().is_none_or(|s| s.nodes.is_empty()) {
        // Boxed: only a call that waits pays for it.
        return Either::Right(Either::Right(Box::pin(async move {
            let until = started + call.wait.min(call.timeout);
            match inv.endpoints.wait_for_node(&call.service, until).await {
                Some(set) => {
                    Recorded {
                        attempts: attempts(set, inv, call, started, tally),
                        started,
                    }
                    .await
                }
                None => Err(unrouted(
                    &inv,
                    &call.service,
                    started,
                    no_node_in_time(&call),
                )),
            }
        })));
    }
    let Some(set) = set else {
        let e = error(
            StatusCode::NOT_FOUND,
            format!("service {:?} not found in the registry", call.service),
        );
        return Either::Left(ready(Err(unrouted(&inv, &call.service, started, e))));
    };
    Either::Right(Either::Left(Recorded {
        attempts: attempts(set, inv, call, started, tally),
        started,
    }))
}

/// Counts a call to `service` that found no node to go to (it is not registered, or
/// no longer) in the service's metrics, as answered by the sidecar with `e`: the
/// calls to a service that died are its errors, not calls counted nowhere. The
/// metrics of names never registered are bounded ([`crate::endpoints::Endpoints::unrouted`]).
fn unrouted(inv: &Invoker, service: &str, started: Instant, e: ApiError) -> ApiError {
    let shared = match inv.endpoints.load().services.get(service) {
        Some(set) => set.shared.clone(),
        None => inv.endpoints.unrouted(service),
    };
    shared.metrics.record(
        e.status_code().as_u16(),
        started.elapsed(),
        AnsweredBy::Sidecar,
    );
    e
}

/// A call that waited for a node of its service, and none registered.
fn no_node_in_time(call: &Call) -> ApiError {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "service {:?} has no node, and none registered within {} (--wait-for-node, X-Pillion-Wait)",
            call.service,
            pillion_core::duration::format(call.wait.min(call.timeout))
        ),
    )
}

pin_project_lite::pin_project! {
    /// The attempts of a call, recorded in the service's metrics when they end.
    struct Recorded<F> {
        #[pin]
        attempts: F,
        started: Instant,
    }
}

/// What the attempts of a call come to: the result, the clock read at the end of
/// the last attempt (if any was made), and the service, for its metrics.
type Attempted = (
    Result<Response<PooledBody>, ApiError>,
    Option<Instant>,
    Arc<ServiceSet>,
);

impl<F: Future<Output = Attempted>> Future for Recorded<F> {
    type Output = Result<Response<PooledBody>, ApiError>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = self.project();
        let (result, ended, set) = std::task::ready!(this.attempts.poll(cx));
        let (status, by) = match &result {
            Ok(res) => (res.status(), AnsweredBy::Node),
            Err(e) => (e.status_code(), AnsweredBy::Sidecar),
        };
        let elapsed = ended.map_or_else(|| this.started.elapsed(), |end| end - *this.started);
        set.shared.metrics.record(status.as_u16(), elapsed, by);
        std::task::Poll::Ready(result)
    }
}

#[allow(clippy::manual_async_fn)] // an async fn keeps its arguments twice
fn attempts<'a>(
    set: Arc<ServiceSet>,
    inv: Arc<Invoker>,
    call: Call,
    started: Instant,
    tally: Option<&'a mut Tally>,
) -> impl Future<Output = Attempted> + Send + 'a {
    async move {
        let mut ended = None;
        let policy = &inv.config.policy;
        let result = attempt_all(&set, policy, call, started, tally, &mut ended).await;
        (result, ended, set)
    }
}

/// The attempts of `call` on nodes of `set`, until one answers or the call stops;
/// `ended` learns when the last attempt ended.
#[allow(clippy::manual_async_fn)] // as `attempts`
fn attempt_all<'a>(
    set: &'a Arc<ServiceSet>,
    policy: &'a Policy,
    mut call: Call,
    started: Instant,
    mut tally: Option<&'a mut Tally>,
    ended: &'a mut Option<Instant>,
) -> impl Future<Output = Result<Response<PooledBody>, ApiError>> + Send + 'a {
    async move {
        let mut calling = Calling::admit(set, policy, &mut call, started)?;
        loop {
            // The first attempt starts with the call (one clock read fewer per call).
            let now = if calling.attempt == 0 {
                started
            } else {
                Instant::now()
            };
            let (index, node, wire) = calling.choose(&call, now, tally.as_deref_mut())?;
            // Built here, where it is sent: a request is large, and moved once.
            let host = &node.host;
            let req = match (wire.go_micro, calling.replay.returned()) {
                (Some(dialect), _) => {
                    let time_left = calling.deadline.saturating_duration_since(now);
                    calling.replay.json_rpc(&call, dialect, host, time_left)?
                }
                (None, Some(req)) => readdress(*req, &call, wire.h2, host),
                (None, None) => match calling.replay.body(&mut call) {
                    Some((body, headers)) => build(&call, headers, wire.h2, host, body),
                    None => break,
                },
            };
            let Some(limit) = try_limit(now, calling.deadline, policy.per_try_timeout) else {
                return Err(timeout_error(&call));
            };
            let attempt = Attempt {
                index,
                node,
                wire,
                start: now,
                limit,
            };
            let pending = node.start();
            let sending = node
                .pool
                .send(req, wire.h2, policy.connect_timeout.min(limit));
            let sent = tokio::time::timeout_at((now + limit).into(), sending).await;
            drop(pending);
            let end = Instant::now();
            *ended = Some(end);
            // The answer is taken where it lands and moved once, to the caller: moving
            // it through the steps would cost more than the steps.
            match sent {
                Ok(Ok(mut res)) if !unavailable(res.status()) => {
                    calling.answered(&mut res, &attempt, end);
                    return Ok(res);
                }
                // A 502/503/504 is the caller's answer when the call stops on it.
                Ok(Ok(res)) => {
                    let failure = Failure::Unavailable(res.status());
                    if calling.settle(&call, &attempt, failure, end)? == Decision::Stop {
                        return Ok(res);
                    }
                }
                Ok(Err((e, back))) => {
                    calling.settle(&call, &attempt, Failure::Send(e, back), end)?;
                }
                Err(_) => {
                    calling.settle(&call, &attempt, Failure::TimedOut, end)?;
                }
            }
            tokio::time::sleep(calling.next(&attempt)).await;
            tracing::debug!(service = %call.service, attempt = calling.attempt, problem = %calling.failures, "retrying");
        }
        Err(calling.failures.error(&call.service))
    }
}

/// A call across its attempts: what it allows, what is left to send, the nodes it
/// tried and what went wrong so far.
struct Calling<'a> {
    set: &'a Arc<ServiceSet>,
    policy: &'a Policy,
    deadline: Instant,
    rules: Rules,
    /// The node the call is pinned to.
    pinned: Option<usize>,
    replay: Replay,
    tried: Tried,
    /// The attempt under way, counted from 0.
    attempt: u32,
    failures: Failures<'a>,
    _waiting: Waiting<'a>,
}

/// One attempt: its node, how it reaches it, when it started and how long it may take.
struct Attempt<'a> {
    index: usize,
    node: &'a Arc<NodeState>,
    wire: Wire,
    start: Instant,
    limit: Duration,
}

// The steps on every call's path are inlined into the attempts' future: called, they
// cost a call about 150 instructions more (callgrind), against some 1,300 for the
// attempts' own code.
impl<'a> Calling<'a> {
    /// Admits `call` among the calls waiting for its service (the retry budget gets
    /// its share of it), with the node it is pinned to, and takes its body.
    #[inline(always)]
    fn admit(
        set: &'a Arc<ServiceSet>,
        policy: &'a Policy,
        call: &mut Call,
        started: Instant,
    ) -> Result<Calling<'a>, ApiError> {
        let shared = &set.shared;
        let Some(waiting) = Waiting::admit(&shared.pending, policy.max_pending) else {
            return Err(crowded(&call.service, policy.max_pending));
        };
        shared.budget.deposit();
        let pinned = pinned(&set.nodes, call)?;
        let (replay, rules) = Replay::new(call, policy.retries);
        Ok(Calling {
            set,
            policy,
            deadline: started + call.timeout,
            rules,
            pinned,
            replay,
            tried: Tried::default(),
            attempt: 0,
            failures: Failures::default(),
            _waiting: waiting,
        })
    }

    /// The node of the attempt starting at `now`, and how the call reaches it.
    /// `tally` learns the node.
    #[inline(always)]
    fn choose(
        &self,
        call: &Call,
        now: Instant,
        tally: Option<&mut Tally>,
    ) -> Result<(usize, &'a Arc<NodeState>, Wire), ApiError> {
        let set = self.set;
        let pick = || balance::pick(set, self.policy.strategy, &self.tried, since_epoch(now));
        let Some(index) = self.pinned.or_else(pick) else {
            return Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("service {:?} has no node", call.service),
            ));
        };
        let node = balance::node(set, index);
        if let Some(tally) = tally {
            tally.node = Some(node.clone());
            tally.retries = self.attempt;
        }
        Ok((index, node, Wire::to(node, call)?))
    }

    /// What the call does after `attempt` failed at `end`: [`Decision::Retry`], or
    /// stop. A call stops with the caller's error, or, after a 502/503/504
    /// ([`Decision::Stop`]), with the node's answer. The node's record learns what
    /// the failure says about it.
    fn settle(
        &mut self,
        call: &Call,
        attempt: &Attempt<'a>,
        failure: Failure,
        end: Instant,
    ) -> Result<Decision, ApiError> {
        let problem = match failure {
            Failure::Unavailable(status) => Problem::Unavailable(attempt.node, status),
            Failure::Send(e, back) => {
                let problem = Problem::of(attempt.node, e);
                if problem.outcome() == retry::Outcome::NotSent {
                    self.replay.hand_back(back, attempt.wire);
                }
                problem
            }
            Failure::TimedOut => Problem::TimedOut(attempt.node, attempt.limit),
        };
        let came = problem.outcome();
        let feedback = Feedback::failure(came, end - attempt.start);
        feedback.record(
            self.set,
            attempt.node,
            since_epoch(end),
            &self.policy.ejection,
        );
        if came == retry::Outcome::TimedOut && Instant::now() >= self.deadline {
            return Err(timeout_error(call));
        }
        self.failures.push(problem);
        let decision = decide(came, self.attempt, self.rules, self.deadline, self.set);
        if decision == Decision::Stop && came != retry::Outcome::Unavailable {
            return Err(self.failures.error(&call.service));
        }
        Ok(decision)
    }

    /// Makes the node's answer (not 502, 503 or 504), which came at `end`, the call's.
    #[inline(always)]
    fn answered(&self, res: &mut Response<PooledBody>, attempt: &Attempt<'a>, end: Instant) {
        let node = attempt.node;
        let feedback = Feedback::answer(end - attempt.start);
        feedback.record(self.set, node, since_epoch(end), &self.policy.ejection);
        if attempt.wire.go_micro.is_some() {
            res.extensions_mut().insert(jsonrpc::Enveloped {
                deadline: self.deadline,
            });
        }
        if http_body::Body::is_end_stream(res.body()) {
            node.record_success();
        } else {
            // Success is known at the body's end: a node that cuts its answer short
            // after the headers has failed the call.
            res.body_mut().on_end(self.set.clone(), attempt.index);
        }
    }

    /// Counts a retry after `attempt` and avoids its node while others are
    /// available; how long to wait before the next attempt.
    fn next(&mut self, attempt: &Attempt) -> Duration {
        self.tried.insert(attempt.index);
        self.attempt += 1;
        self.set
            .shared
            .metrics
            .retries
            .fetch_add(1, Ordering::Relaxed);
        backoff(self.attempt).min(self.deadline.saturating_duration_since(Instant::now()))
    }
}

/// The node `call` is pinned to among `nodes`, by address or id; `None` when it is
/// not pinned, 404 when no node has that address or id.
fn pinned(nodes: &[Arc<NodeState>], call: &Call) -> Result<Option<usize>, ApiError> {
    let Some(pin) = &call.pin else {
        return Ok(None);
    };
    match nodes
        .iter()
        .position(|n| n.authority == *pin || n.id == *pin)
    {
        Some(i) => Ok(Some(i)),
        None => Err(error(
            StatusCode::NOT_FOUND,
            format!("service {:?} has no node {pin:?}", call.service),
        )),
    }
}

/// [`retry::decide`] with this call's clock and its service's budget.
fn decide(
    outcome: retry::Outcome,
    attempt: u32,
    rules: Rules,
    deadline: Instant,
    set: &ServiceSet,
) -> Decision {
    retry::decide(outcome, attempt, rules, Instant::now() < deadline, || {
        set.shared.budget.withdraw()
    })
}

/// A call refused because `max` calls wait for its service already.
fn crowded(service: &str, max: usize) -> ApiError {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("too many calls waiting for service {service:?} (limit {max}); try again later"),
    )
}

fn timeout_error(call: &Call) -> ApiError {
    error(
        StatusCode::GATEWAY_TIMEOUT,
        format!(
            "service {:?} did not answer within {} (set X-Pillion-Timeout to change it)",
            call.service,
            pillion_core::duration::format(call.timeout)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoints::{UNKNOWN_SERVICE, UNREGISTERED_NAMES};
    use pillion_registry::Registry;

    fn call(service: &str) -> Call {
        Call {
            service: service.to_string(),
            method: Method::POST,
            uri: Uri::from_static("/Say.Hello"),
            headers: HeaderMap::new(),
            body: Outgoing::full(Default::default()),
            grpc: false,
            rpc: true,
            pin: None,
            timeout: Duration::from_secs(2),
            wait: Duration::ZERO,
            retry_any_method: false,
        }
    }

    fn invoker() -> (Arc<dyn Registry>, Arc<Invoker>) {
        let registry: Arc<dyn Registry> = Arc::new(pillion_registry::memory::MemoryRegistry::new());
        let inv = Invoker::new(
            registry.clone(),
            Default::default(),
            Default::default(),
            None,
        );
        (registry, inv)
    }

    /// The error `forward` answers a call with (none of these reach a node).
    async fn refused(inv: &Arc<Invoker>, call: Call) -> ApiError {
        match forward(inv.clone(), call, None).await {
            Ok(res) => panic!("an answer: {}", res.status()),
            Err(e) => e,
        }
    }

    fn metrics(inv: &Invoker) -> String {
        let mut out = String::new();
        inv.render_metrics(&mut out);
        out
    }

    /// The `pillion_invoke_requests_total` series of `class` in `out`.
    fn series(out: &str, class: &str) -> Vec<String> {
        let class = format!(",class=\"{class}\"}}");
        out.lines()
            .filter(|l| l.starts_with("pillion_invoke_requests_total{") && l.contains(&class))
            .map(str::to_string)
            .collect()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn calls_to_a_service_that_went_are_its_errors() {
        let (registry, inv) = invoker();
        let todos = pillion_core::service::Service::from_json(
            br#"{"name":"todos","nodes":[{"id":"todos-1","address":"127.0.0.1:9"}]}"#,
        )
        .unwrap();
        registry.register(&todos, None).await.unwrap();
        // Its node refuses: 503 by the sidecar, counted as before.
        let e = refused(&inv, call("todos")).await;
        assert_eq!(e.status_code(), StatusCode::SERVICE_UNAVAILABLE);
        registry.deregister(&todos).await.unwrap();
        for _ in 0..100 {
            if !inv.endpoints.load().services.contains_key("todos") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for _ in 0..3 {
            let e = refused(&inv, call("todos")).await;
            assert_eq!(e.status_code(), StatusCode::NOT_FOUND, "{e:?}");
        }
        let out = metrics(&inv);
        assert!(
            out.contains("pillion_invoke_requests_total{service=\"todos\",class=\"4xx\"} 3"),
            "{out}"
        );
        assert!(
            out.contains("pillion_invoke_requests_total{service=\"todos\",class=\"5xx\"} 1"),
            "{out}"
        );
        let snapshot = inv
            .call_snapshots()
            .into_iter()
            .find(|(name, _, _)| name == "todos")
            .unwrap()
            .1;
        assert_eq!(snapshot.by_sidecar, 4, "the sidecar answered every one");

        // A name never registered is counted under its own name too, and a call that
        // waited for a node in vain as what it got (503).
        let mut waiting = call("nobody");
        waiting.wait = Duration::from_millis(20);
        let e = refused(&inv, waiting).await;
        assert_eq!(e.status_code(), StatusCode::SERVICE_UNAVAILABLE);
        refused(&inv, call("nobody")).await;
        let out = metrics(&inv);
        assert!(
            out.contains("pillion_invoke_requests_total{service=\"nobody\",class=\"4xx\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("pillion_invoke_requests_total{service=\"nobody\",class=\"5xx\"} 1"),
            "{out}"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn made_up_names_add_a_bounded_number_of_series() {
        let (_registry, inv) = invoker();
        let flood = UNREGISTERED_NAMES + 500;
        for i in 0..flood {
            let e = refused(&inv, call(&format!("made-up-{i}"))).await;
            assert_eq!(e.status_code(), StatusCode::NOT_FOUND);
        }
        // Again, the first names: still their own series.
        refused(&inv, call("made-up-0")).await;
        let out = metrics(&inv);
        let series = series(&out, "4xx");
        assert_eq!(
            series.len(),
            UNREGISTERED_NAMES + 1,
            "one per name up to the bound, then one for the rest"
        );
        assert!(
            series.contains(
                &"pillion_invoke_requests_total{service=\"made-up-0\",class=\"4xx\"} 2".to_string()
            ),
            "{series:?}"
        );
        let unknown = format!(
            "pillion_invoke_requests_total{{service=\"{UNKNOWN_SERVICE}\",class=\"4xx\"}} {}",
            flood - UNREGISTERED_NAMES
        );
        assert!(series.contains(&unknown), "{series:?}");
        // Every call is counted once.
        let total: u64 = series
            .iter()
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum();
        assert_eq!(total, flood as u64 + 1);
        assert_eq!(inv.call_snapshots().len(), UNREGISTERED_NAMES + 1);
    }

    #[test]
    fn calls_beyond_the_limit_are_refused_and_hold_no_place() {
        let waiting = AtomicUsize::new(0);
        let a = Waiting::admit(&waiting, 2).unwrap();
        let b = Waiting::admit(&waiting, 2).unwrap();
        assert!(Waiting::admit(&waiting, 2).is_none());
        assert_eq!(
            waiting.load(Ordering::Relaxed),
            2,
            "the refused call holds none"
        );
        drop(a);
        let c = Waiting::admit(&waiting, 2).expect("a place given back");
        drop((b, c));
        assert_eq!(waiting.load(Ordering::Relaxed), 0);
        assert!(Waiting::admit(&waiting, 0).is_none());
        let e = crowded("todos", 2);
        assert_eq!(
            (e.code, e.detail.as_str()),
            (
                503,
                "too many calls waiting for service \"todos\" (limit 2); try again later"
            )
        );
    }

    fn nodes(n: usize) -> Arc<ServiceSet> {
        let nodes = (0..n)
            .map(|i| {
                let (id, at) = (format!("todos-{i}"), format!("127.0.0.1:{}", 7 + i));
                Arc::new(NodeState::test_at(&id, &at, Protocol::Unset))
            })
            .collect();
        Arc::new(ServiceSet::test(nodes))
    }

    /// A call to `todos` by `method`, with no body.
    fn rest(method: Method) -> Call {
        Call {
            method,
            rpc: false,
            ..call("todos")
        }
    }

    #[test]
    fn a_pinned_call_goes_to_the_node_with_that_address_or_id() {
        let set = nodes(2);
        let pin = |pin: Option<&str>| {
            let mut c = rest(Method::GET);
            c.pin = pin.map(str::to_string);
            pinned(&set.nodes, &c)
        };
        assert_eq!(pin(None).unwrap(), None);
        assert_eq!(pin(Some("todos-1")).unwrap(), Some(1));
        assert_eq!(pin(Some("127.0.0.1:7")).unwrap(), Some(0));
        let e = pin(Some("todos-2")).unwrap_err();
        assert_eq!(
            (e.code, e.detail.as_str()),
            (404, "service \"todos\" has no node \"todos-2\"")
        );
    }

    use crate::endpoints::Protocol;
    use pillion_http::SendError;

    fn connect_refused(at: &str) -> SendError {
        SendError::Connect {
            authority: at.into(),
            source: std::io::Error::from_raw_os_error(111),
        }
    }

    /// The error a failed attempt stopped the call with.
    fn stopped(settled: Result<Decision, ApiError>) -> (u16, String) {
        match settled {
            Err(e) => (e.code, e.detail),
            Ok(decision) => panic!("{decision:?}"),
        }
    }

    /// The attempt starting at `now` and its request, made as the attempts make them.
    fn attempt<'a>(
        calling: &mut Calling<'a>,
        c: &mut Call,
        now: Instant,
        tally: Option<&mut Tally>,
    ) -> (Attempt<'a>, http::Request<Outgoing>) {
        let (index, node, wire) = calling.choose(c, now, tally).unwrap();
        let req = match calling.replay.returned() {
            Some(req) => readdress(*req, c, wire.h2, &node.host),
            None => {
                let (body, headers) = calling.replay.body(c).unwrap();
                build(c, headers, wire.h2, &node.host, body)
            }
        };
        let limit = try_limit(now, calling.deadline, calling.policy.per_try_timeout).unwrap();
        let attempt = Attempt {
            index,
            node,
            wire,
            start: now,
            limit,
        };
        (attempt, req)
    }

    #[test]
    fn the_node_of_an_attempt_is_chosen_or_the_call_refused_with_why() {
        let policy = crate::Config::default().policy;
        let set = nodes(1);
        let mut c = rest(Method::GET);
        let now = Instant::now();
        let mut calling = Calling::admit(&set, &policy, &mut c, now).unwrap();
        let mut tally = Tally::default();
        let (first, req) = attempt(&mut calling, &mut c, now, Some(&mut tally));
        assert_eq!(
            first.limit, c.timeout,
            "the per-try timeout, within the call's"
        );
        assert_eq!(req.headers()["host"], "127.0.0.1:7");
        assert_eq!(tally.node.unwrap().id, "todos-0");
        assert_eq!(set.shared.pending.load(Ordering::Relaxed), 1);
        drop(calling);
        assert_eq!(set.shared.pending.load(Ordering::Relaxed), 0);

        // No node left in the service.
        let empty = nodes(0);
        let mut c = rest(Method::GET);
        let calling = Calling::admit(&empty, &policy, &mut c, now).unwrap();
        let Err(e) = calling.choose(&c, now, None) else {
            panic!("a node chosen")
        };
        assert_eq!(
            (e.code, e.detail.as_str()),
            (503, "service \"todos\" has no node")
        );

        // A node in the mesh, and this sidecar without an identity.
        let mut meshed = NodeState::test_at("todos-0", "127.0.0.1:7", Protocol::Unset);
        meshed.needs_identity = true;
        let meshed = Arc::new(ServiceSet::test(vec![Arc::new(meshed)]));
        let calling = Calling::admit(&meshed, &policy, &mut c, now).unwrap();
        let Err(e) = calling.choose(&c, now, None) else {
            panic!("a node chosen")
        };
        assert_eq!(e.code, 502);
        assert!(e.detail.contains("--mesh-ca-cert"), "{}", e.detail);

        // Too many waiting already, or pinned to no node of the service.
        let crowded = Policy {
            max_pending: 0,
            ..policy.clone()
        };
        let Err(e) = Calling::admit(&set, &crowded, &mut rest(Method::GET), now) else {
            panic!("admitted")
        };
        assert_eq!(e.code, 503);
        let mut pinned = rest(Method::GET);
        pinned.pin = Some("todos-9".into());
        let Err(e) = Calling::admit(&set, &policy, &mut pinned, now) else {
            panic!("admitted")
        };
        assert_eq!(e.code, 404);
        assert_eq!(set.shared.pending.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_connect_failure_goes_again_to_another_node_then_ends_in_503() {
        let policy = crate::Config::default().policy;
        let set = nodes(2);
        // A POST: sent once to a node that may see it, but a connect failure is not that.
        let mut c = rest(Method::POST);
        let now = Instant::now();
        let mut calling = Calling::admit(&set, &policy, &mut c, now).unwrap();
        let (first, mut req) = attempt(&mut calling, &mut c, now, None);
        req.headers_mut()
            .insert("x-mark", http::HeaderValue::from_static("1"));
        let failed = Failure::Send(connect_refused(&first.node.authority), Some(req));
        let settled = calling.settle(&c, &first, failed, Instant::now());
        assert_eq!(settled.unwrap(), Decision::Retry);
        assert_eq!(first.node.consecutive_failures(), 1);
        assert_eq!(first.node.ewma(), Duration::from_secs(1), "the penalty");
        assert!(calling.next(&first) <= Duration::from_millis(20));
        assert_eq!(set.shared.metrics.retries.load(Ordering::Relaxed), 1);

        let (second, req) = attempt(&mut calling, &mut c, Instant::now(), None);
        assert_ne!(second.index, first.index, "the node tried is avoided");
        assert_eq!(req.headers()["x-mark"], "1", "the request handed back");
        let failed = Failure::Send(connect_refused(&second.node.authority), None);
        let settled = calling.settle(&c, &second, failed, Instant::now());
        assert_eq!(settled.unwrap(), Decision::Retry);
        calling.next(&second);

        let (third, _) = attempt(&mut calling, &mut c, Instant::now(), None);
        let failed = Failure::Send(connect_refused(&third.node.authority), None);
        let (code, detail) = stopped(calling.settle(&c, &third, failed, Instant::now()));
        assert_eq!(code, 503);
        assert_eq!(
            detail,
            format!(
                "no healthy node of service \"todos\": connect to {}: Connection refused (os error 111)",
                third.node.authority
            )
        );
    }

    #[test]
    fn failures_that_are_not_the_node_s_stop_at_once_and_leave_it_alone() {
        let policy = crate::Config::default().policy;
        let set = nodes(2);
        let cases = [
            (
                SendError::CallerBody("cut".into()),
                400,
                "the request was not sent whole: reading the request body: cut",
            ),
            (
                SendError::Local {
                    authority: "127.0.0.1:7".into(),
                    source: std::io::Error::from_raw_os_error(24),
                },
                503,
                "no socket for 127.0.0.1:7: Too many open files (os error 24) (pillion is out of resources)",
            ),
        ];
        for (e, code, detail) in cases {
            let mut c = rest(Method::GET);
            let now = Instant::now();
            let mut calling = Calling::admit(&set, &policy, &mut c, now).unwrap();
            let (first, _) = attempt(&mut calling, &mut c, now, None);
            let settled = calling.settle(&c, &first, Failure::Send(e, None), Instant::now());
            assert_eq!(stopped(settled), (code, detail.to_string()));
            assert_eq!(first.node.consecutive_failures(), 0);
            assert_eq!(first.node.ewma(), Duration::from_millis(30));
        }
        assert_eq!(set.shared.metrics.retries.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_502_to_503_answer_is_passed_on_unless_another_node_may_take_the_call() {
        let policy = crate::Config::default().policy;
        let set = nodes(2);
        let now = Instant::now();
        let unavailable = Failure::Unavailable(StatusCode::SERVICE_UNAVAILABLE);
        let mut c = rest(Method::POST);
        let mut calling = Calling::admit(&set, &policy, &mut c, now).unwrap();
        let (first, _) = attempt(&mut calling, &mut c, now, None);
        let settled = calling.settle(&c, &first, unavailable, Instant::now());
        assert_eq!(
            settled.unwrap(),
            Decision::Stop,
            "the node's answer, passed on"
        );
        assert_eq!(first.node.consecutive_failures(), 1);
        assert!(
            first.node.latency().is_some(),
            "an answer all the same: measured"
        );

        let mut c = rest(Method::GET);
        let mut calling = Calling::admit(&set, &policy, &mut c, now).unwrap();
        let (first, _) = attempt(&mut calling, &mut c, now, None);
        let unavailable = Failure::Unavailable(StatusCode::BAD_GATEWAY);
        let settled = calling.settle(&c, &first, unavailable, Instant::now());
        assert_eq!(settled.unwrap(), Decision::Retry);
    }

    #[test]
    fn a_node_that_fails_a_request_it_may_have_seen_is_retried_only_if_it_can_be() {
        let policy = crate::Config::default().policy;
        let set = nodes(2);
        let now = Instant::now();
        // A reset of a POST: the node's 502.
        let mut c = rest(Method::POST);
        let mut calling = Calling::admit(&set, &policy, &mut c, now).unwrap();
        let (first, _) = attempt(&mut calling, &mut c, now, None);
        let reset = Failure::Send(SendError::Closed, None);
        let (code, detail) = stopped(calling.settle(&c, &first, reset, Instant::now()));
        assert_eq!(code, 502);
        assert_eq!(
            detail,
            format!(
                "node {} failed: the node closed the connection before answering",
                first.node.authority
            )
        );
        assert_eq!(first.node.consecutive_failures(), 1);

        // A per-try timeout of a GET goes again; of a POST it is the call's 504.
        let mut c = rest(Method::GET);
        let mut calling = Calling::admit(&set, &policy, &mut c, now).unwrap();
        let (first, _) = attempt(&mut calling, &mut c, now, None);
        let settled = calling.settle(&c, &first, Failure::TimedOut, Instant::now());
        assert_eq!(settled.unwrap(), Decision::Retry);
        let mut c = rest(Method::POST);
        let mut calling = Calling::admit(&set, &policy, &mut c, now).unwrap();
        let (first, _) = attempt(&mut calling, &mut c, now, None);
        let settled = calling.settle(&c, &first, Failure::TimedOut, Instant::now());
        assert_eq!(
            stopped(settled),
            (
                504,
                format!(
                    "node {} did not answer within the per-try timeout 2s",
                    first.node.authority
                )
            ),
            "the per-try timeout, cut to the call's 2 s"
        );

        // Past the call's deadline, a per-try timeout is the call's.
        let mut c = rest(Method::GET);
        let long_ago = now - c.timeout;
        let mut calling = Calling::admit(&set, &policy, &mut c, long_ago).unwrap();
        let (late, _) = attempt(&mut calling, &mut c, long_ago, None);
        let (code, detail) = stopped(calling.settle(&c, &late, Failure::TimedOut, now));
        assert_eq!(code, 504);
        assert_eq!(
            detail,
            "service \"todos\" did not answer within 2s (set X-Pillion-Timeout to change it)"
        );
    }
}
