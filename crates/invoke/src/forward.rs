//! One call to a service, across attempts: choose a node, send, and decide from the
//! outcome whether to answer or to try again.
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
//!   penalty, so a node that fails fast does not look fast). A caller whose upload
//!   breaks off gets 400 (413 over the limit) and the node's record is untouched; a
//!   sidecar out of sockets answers 503 and blames nobody else.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use pillion_core::ApiError;

use pillion_http::pool::{Outgoing, PooledBody};
use pillion_http::{Blame, SendError};

use crate::balance::{self, Strategy, Tried};
use crate::endpoints::{since_epoch, EjectionPolicy, NodeState, Protocol, ServiceSet};
use crate::jsonrpc;
use crate::metrics::AnsweredBy;
use crate::retry::{self, Decision, Rules};
use crate::Invoker;

pub const ID: &str = "pillion.invoke";

/// The latency a failed attempt counts as, so a node that fails fast looks slow to the
/// balancer.
const FAILURE_PENALTY: Duration = Duration::from_secs(1);

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

fn error(status: StatusCode, detail: String) -> ApiError {
    ApiError::new(ID, status, detail)
}

/// Decrements the service's waiting count when the call ends.
struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

enum Outcome {
    Answer(Response<PooledBody>),
    /// The node answered 502/503/504.
    BadGateway(Response<PooledBody>),
    Failed(SendError, Option<Request<Outgoing>>),
    TimedOut,
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
                None => Err(no_node_in_time(&call)),
            }
        })));
    }
    let Some(set) = set else {
        return Either::Left(ready(Err(error(
            StatusCode::NOT_FOUND,
            format!("service {:?} not found in the registry", call.service),
        ))));
    };
    Either::Right(Either::Left(Recorded {
        attempts: attempts(set, inv, call, started, tally),
        started,
    }))
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
        let deadline = started + call.timeout;
        let shared = &set.shared;
        if shared.pending.fetch_add(1, Ordering::Relaxed) >= policy.max_pending {
            shared.pending.fetch_sub(1, Ordering::Relaxed);
            return Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "too many calls waiting for service {:?} (limit {}); try again later",
                    call.service, policy.max_pending
                ),
            ));
        }
        let _waiting = Waiting(&shared.pending);
        shared.budget.deposit();

        let pinned = match &call.pin {
            None => None,
            Some(pin) => match set
                .nodes
                .iter()
                .position(|n| n.authority == *pin || n.id == *pin)
            {
                Some(i) => Some(i),
                None => {
                    return Err(error(
                        StatusCode::NOT_FOUND,
                        format!("service {:?} has no node {pin:?}", call.service),
                    ))
                }
            },
        };

        let full_body = match &call.body {
            Outgoing::Full(b) => Some(b.clone()),
            Outgoing::Stream(..) => None,
        };
        // Only a whole body can be sent again after the node may have seen it.
        let rules = Rules {
            retries: policy.retries,
            replayable: full_body.is_some()
                && (call.retry_any_method || pillion_http::idempotent(&call.method)),
        };
        let mut first_body = Some(std::mem::replace(&mut call.body, Outgoing::Full(None)));
        // A request that never left (connect failure) comes back whole for the next try.
        // Boxed: rare, and large to keep in the future of every call.
        let mut returned: Option<Box<Request<Outgoing>>> = None;
        let mut tried = Tried::default();
        let mut attempt = 0u32;
        let mut last_problem = String::new();
        let mut only_connect_failures = true;

        loop {
            // The first attempt starts with the call (one clock read fewer per call).
            let now = if attempt == 0 {
                started
            } else {
                Instant::now()
            };
            let clock_now = since_epoch(now);
            let pick = || balance::pick(set, policy.strategy, &tried, clock_now);
            let Some(index) = pinned.or_else(pick) else {
                return Err(error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("service {:?} has no node", call.service),
                ));
            };
            let node = balance::node(set, index).clone();
            if let Some(tally) = tally.as_deref_mut() {
                tally.node = Some(node.clone());
                tally.retries = attempt;
            }
            if node.needs_identity {
                return Err(error(
                    StatusCode::BAD_GATEWAY,
                    format!(
                        "node {} of service {:?} takes calls only over the mesh (mTLS), and this sidecar has no mesh identity: start it with --mesh-ca-cert and --mesh-ca-key",
                        node.id, call.service
                    ),
                ));
            }
            let h2 = match node.protocol.h2_for(call.grpc) {
                Ok(h2) => h2,
                Err(mismatch) => {
                    return Err(error(
                        StatusCode::BAD_GATEWAY,
                        format!(
                            "cannot call node {} of service {:?}: {mismatch}",
                            node.authority, call.service
                        ),
                    ))
                }
            };
            let go_micro = match node.protocol {
                Protocol::GoMicro(dialect) if call.rpc => Some(dialect),
                _ => None,
            };
            let req = match (go_micro, returned.take()) {
                // A call by method is whole (read before it was sent): each attempt
                // wraps it for its node.
                (Some(dialect), _) => {
                    let body = match &full_body {
                        Some(Some(body)) => body.clone(),
                        _ => Default::default(),
                    };
                    let method = call.uri.path().trim_start_matches('/');
                    let req = jsonrpc::request(
                        &call.service,
                        method,
                        dialect,
                        call.headers.clone(),
                        &body,
                        deadline.saturating_duration_since(now),
                    )?;
                    first_body = None;
                    readdress(req, &call, false, &node.host)
                }
                (None, Some(req)) => readdress(*req, &call, h2, &node.host),
                (None, None) => {
                    let body = match first_body.take() {
                        Some(b) => b,
                        None => match &full_body {
                            Some(b) => Outgoing::Full(b.clone()),
                            None => break, // a stream, already sent once
                        },
                    };
                    // Keep the headers for later attempts only if there can be any.
                    // The original goes (it has room for `Host`, which the node's
                    // address sets); the copy, exactly as large as what it copies,
                    // stays.
                    let headers = if rules.replayable && rules.retries > 0 {
                        let copy = call.headers.clone();
                        std::mem::replace(&mut call.headers, copy)
                    } else {
                        std::mem::take(&mut call.headers)
                    };
                    build(&call, headers, h2, &node.host, body)
                }
            };

            if now >= deadline {
                return Err(timeout_error(&call));
            }
            let try_limit = policy.per_try_timeout.min(deadline - now);
            let pending = node.start();
            let outcome = match tokio::time::timeout_at(
                (now + try_limit).into(),
                node.pool
                    .send(req, h2, policy.connect_timeout.min(try_limit)),
            )
            .await
            {
                Err(_) => Outcome::TimedOut,
                Ok(Ok(res)) if matches!(res.status().as_u16(), 502..=504) => {
                    Outcome::BadGateway(res)
                }
                Ok(Ok(res)) => Outcome::Answer(res),
                Ok(Err((failure, back))) => Outcome::Failed(failure, back),
            };
            drop(pending);
            let end = Instant::now();
            *ended = Some(end);
            let rtt = end - now;
            let clock_end = since_epoch(end);

            let verdict = match outcome {
                Outcome::Answer(mut res) => {
                    node.observe(rtt, clock_end);
                    if go_micro.is_some() {
                        res.extensions_mut().insert(jsonrpc::Enveloped { deadline });
                    }
                    if http_body::Body::is_end_stream(res.body()) {
                        node.record_success();
                        return Ok(res);
                    }
                    // Success is known at the body's end: a node that cuts its
                    // answer short after the headers has failed the call.
                    res.body_mut().on_end(set.clone(), index);
                    return Ok(res);
                }
                Outcome::BadGateway(res) => {
                    node.observe(FAILURE_PENALTY.max(rtt), clock_end);
                    set.record_failure(&node, &policy.ejection);
                    only_connect_failures = false;
                    last_problem = format!("node {} answered {}", node.authority, res.status());
                    let decision =
                        decide(retry::Outcome::Unavailable, attempt, rules, deadline, set);
                    if decision == Decision::Stop {
                        return Ok(res);
                    }
                    decision
                }
                Outcome::Failed(e, back) => match e.blame() {
                    Blame::Caller => {
                        return Err(error(
                            e.status(),
                            format!("the request was not sent whole: {e}"),
                        ))
                    }
                    Blame::Pillion => return Err(error(e.status(), e.to_string())),
                    Blame::Node => {
                        node.observe(FAILURE_PENALTY, clock_end);
                        set.record_failure(&node, &policy.ejection);
                        if e.may_have_reached_node() {
                            only_connect_failures = false;
                            last_problem = format!("node {} failed: {e}", node.authority);
                            decide(retry::Outcome::Failed, attempt, rules, deadline, set)
                        } else {
                            last_problem = e.to_string();
                            // A JSON-RPC request is wrapped anew for the next node.
                            returned = back.filter(|_| go_micro.is_none()).map(Box::new);
                            decide(retry::Outcome::NotSent, attempt, rules, deadline, set)
                        }
                    }
                },
                Outcome::TimedOut => {
                    node.observe(rtt, clock_end);
                    set.record_failure(&node, &policy.ejection);
                    if Instant::now() >= deadline {
                        return Err(timeout_error(&call));
                    }
                    only_connect_failures = false;
                    last_problem = format!(
                        "node {} did not answer within the per-try timeout {}",
                        node.authority,
                        pillion_core::duration::format(try_limit)
                    );
                    let decision = decide(retry::Outcome::TimedOut, attempt, rules, deadline, set);
                    if decision == Decision::Stop {
                        return Err(error(StatusCode::GATEWAY_TIMEOUT, last_problem));
                    }
                    decision
                }
            };
            if verdict == Decision::Stop {
                break;
            }
            tried.insert(index);
            attempt += 1;
            shared.metrics.retries.fetch_add(1, Ordering::Relaxed);
            let backoff = backoff(attempt).min(deadline.saturating_duration_since(Instant::now()));
            tokio::time::sleep(backoff).await;
            tracing::debug!(service = %call.service, attempt, problem = %last_problem, "retrying");
        }
        Err(if only_connect_failures {
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "no healthy node of service {:?}: {last_problem}",
                    call.service
                ),
            )
        } else {
            error(StatusCode::BAD_GATEWAY, last_problem)
        })
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

/// Exponential backoff with full jitter: up to 10 ms, 20 ms, 40 ms, ... 200 ms.
fn backoff(attempt: u32) -> Duration {
    let cap = Duration::from_millis(10u64 << attempt.min(5)).min(Duration::from_millis(200));
    let jitter = pillion_core::id::fast_random() % (cap.as_micros() as u64 + 1);
    Duration::from_micros(jitter)
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

fn build(
    call: &Call,
    headers: HeaderMap,
    h2: bool,
    host: &HeaderValue,
    body: Outgoing,
) -> Request<Outgoing> {
    let mut req = Request::new(body);
    *req.method_mut() = call.method.clone();
    *req.uri_mut() = call.uri.clone();
    *req.headers_mut() = headers;
    readdress(req, call, h2, host)
}

/// Points a request at a node in the node's protocol: `Host` and HTTP/1.1, or an
/// absolute URI and HTTP/2 (whatever the caller spoke).
fn readdress(
    mut req: Request<Outgoing>,
    call: &Call,
    h2: bool,
    host: &HeaderValue,
) -> Request<Outgoing> {
    if h2 {
        let absolute = format!(
            "http://{}{}",
            host.to_str().unwrap_or("localhost"),
            call.uri.path_and_query().map_or("/", |p| p.as_str())
        );
        if let Ok(uri) = absolute.parse() {
            *req.uri_mut() = uri;
        }
        *req.version_mut() = http::Version::HTTP_2;
        req.headers_mut().remove(http::header::HOST);
    } else {
        *req.version_mut() = http::Version::HTTP_11;
        req.headers_mut().insert(http::header::HOST, host.clone());
    }
    req
}
