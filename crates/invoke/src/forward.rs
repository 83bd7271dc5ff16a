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
//!   jitter; the overall deadline bounds everything.
//! - Failures feed outlier ejection and the peak-EWMA (as a 1 s latency penalty, so a
//!   node that fails fast does not look fast).

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use pillion_core::ApiError;

use crate::balance::{self, Strategy};
use crate::endpoints::{EjectionPolicy, Endpoints, ServiceSet};
use crate::pool::{Outgoing, PooledBody, SendFailure};

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
    /// HTTP/2 prior knowledge to the node (when the caller spoke HTTP/2).
    pub h2: bool,
    /// Send to the node with this address or id only.
    pub pin: Option<String>,
    /// Until the response headers arrive.
    pub timeout: Duration,
    /// Retry 5xx answers and resets even for a non-idempotent method.
    pub retry_any_method: bool,
}

/// Retry failures that may have reached the node only for these methods.
fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
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
    Failed(SendFailure, Option<Request<Outgoing>>),
    TimedOut,
}

/// Makes the call and records it in the service's metrics (status as the caller
/// sees it, latency until the response headers).
#[allow(clippy::manual_async_fn)] // deliberate: see the comment inside
pub fn forward<'a>(
    endpoints: &'a Endpoints,
    policy: &'a Policy,
    call: Call,
) -> impl Future<Output = Result<Response<PooledBody>, ApiError>> + Send + 'a {
    // An async block rather than an async fn, here and in `attempts`: an async fn
    // keeps its arguments twice, and this future is the largest of a call.
    async move {
        let started = Instant::now();
        let set: Arc<ServiceSet> = match endpoints.load().services.get(&call.service) {
            Some(s) => s.clone(),
            None => {
                return Err(error(
                    StatusCode::NOT_FOUND,
                    format!("service {:?} not found in the registry", call.service),
                ))
            }
        };
        let result = attempts(&set, policy, call, started).await;
        let status = match &result {
            Ok(res) => res.status(),
            Err(e) => e.status_code(),
        };
        set.shared
            .metrics
            .record(status.as_u16(), started.elapsed());
        result
    }
}

#[allow(clippy::manual_async_fn)] // as `forward`
fn attempts<'a>(
    set: &'a ServiceSet,
    policy: &'a Policy,
    mut call: Call,
    started: Instant,
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
            Outgoing::Stream(_) => None,
        };
        // Only a whole body can be sent again after the node may have seen it.
        let may_retry_sent =
            full_body.is_some() && (call.retry_any_method || idempotent(&call.method));
        let mut first_body = Some(std::mem::replace(&mut call.body, Outgoing::Full(None)));
        // A request that never left (connect failure) comes back whole for the next try.
        let mut returned: Option<Request<Outgoing>> = None;
        let mut tried = 0u64;
        let mut attempt = 0u32;
        let mut last_problem = String::new();
        let mut only_connect_failures = true;

        loop {
            let Some(index) = pinned.or_else(|| balance::pick(set, policy.strategy, tried)) else {
                return Err(error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("service {:?} has no node", call.service),
                ));
            };
            tried |= 1u64.checked_shl(index as u32).unwrap_or(0);
            let node = balance::node(set, index).clone();
            let req = match returned.take() {
                Some(req) => readdress(req, &call, &node.host),
                None => {
                    let body = match first_body.take() {
                        Some(b) => b,
                        None => match &full_body {
                            Some(b) => Outgoing::Full(b.clone()),
                            None => break, // a stream, already sent once
                        },
                    };
                    // Keep the headers for later attempts only if there can be any.
                    let headers = if may_retry_sent {
                        call.headers.clone()
                    } else {
                        std::mem::take(&mut call.headers)
                    };
                    build(&call, headers, &node.host, body)
                }
            };

            // The first attempt starts with the call (one clock read fewer per call).
            let now = if attempt == 0 {
                started
            } else {
                Instant::now()
            };
            if now >= deadline {
                return Err(timeout_error(&call));
            }
            let try_limit = policy.per_try_timeout.min(deadline - now);
            let pending = node.start();
            let outcome = match tokio::time::timeout_at(
                (now + try_limit).into(),
                node.pool
                    .send(req, call.h2, policy.connect_timeout.min(try_limit)),
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
            let rtt = now.elapsed();

            match outcome {
                Outcome::Answer(res) => {
                    node.observe(rtt);
                    node.record_success();
                    return Ok(res);
                }
                Outcome::BadGateway(res) => {
                    node.observe(FAILURE_PENALTY.max(rtt));
                    set.record_failure(&node, &policy.ejection);
                    only_connect_failures = false;
                    if !may_retry_sent
                        || !can_retry(policy, attempt, deadline)
                        || !shared.budget.withdraw()
                    {
                        return Ok(res);
                    }
                    last_problem = format!("node {} answered {}", node.authority, res.status());
                }
                Outcome::Failed(SendFailure::Connect(e), back) => {
                    node.observe(FAILURE_PENALTY);
                    set.record_failure(&node, &policy.ejection);
                    last_problem = e;
                    returned = back;
                    // Not charged to the budget: the node never saw the request.
                    if !can_retry(policy, attempt, deadline) {
                        break;
                    }
                }
                Outcome::Failed(SendFailure::Sent(e), _) => {
                    if e.contains("length limit exceeded") {
                        return Err(error(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            format!("request body is larger than the limit: {e}"),
                        ));
                    }
                    node.observe(FAILURE_PENALTY);
                    set.record_failure(&node, &policy.ejection);
                    only_connect_failures = false;
                    last_problem = format!("node {} failed: {e}", node.authority);
                    if !may_retry_sent
                        || !can_retry(policy, attempt, deadline)
                        || !shared.budget.withdraw()
                    {
                        break;
                    }
                }
                Outcome::TimedOut => {
                    node.observe(rtt);
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
                    if !may_retry_sent
                        || !can_retry(policy, attempt, deadline)
                        || !shared.budget.withdraw()
                    {
                        return Err(error(StatusCode::GATEWAY_TIMEOUT, last_problem));
                    }
                }
            }
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

fn can_retry(policy: &Policy, attempt: u32, deadline: Instant) -> bool {
    attempt < policy.retries && Instant::now() < deadline
}

/// Exponential backoff with full jitter: up to 10 ms, 20 ms, 40 ms, ... 200 ms.
fn backoff(attempt: u32) -> Duration {
    let cap = Duration::from_millis(10u64 << attempt.min(5)).min(Duration::from_millis(200));
    let jitter = balance::random() % (cap.as_micros() as u64 + 1);
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

fn build(call: &Call, headers: HeaderMap, host: &HeaderValue, body: Outgoing) -> Request<Outgoing> {
    let mut req = Request::new(body);
    *req.method_mut() = call.method.clone();
    *req.uri_mut() = call.uri.clone();
    *req.headers_mut() = headers;
    readdress(req, call, host)
}

/// Points a request at a node: `Host` for HTTP/1.1, an absolute URI for HTTP/2.
fn readdress(mut req: Request<Outgoing>, call: &Call, host: &HeaderValue) -> Request<Outgoing> {
    if call.h2 {
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
        req.headers_mut().insert(http::header::HOST, host.clone());
    }
    req
}
