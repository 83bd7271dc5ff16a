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
//!   penalty, so a node that fails fast does not look fast); the node's measured
//!   latency, which `/statusz` and the dashboard show, is fed by its answers only. A caller whose upload
//!   breaks off gets 400 (413 over the limit) and the node's record is untouched; a
//!   sidecar out of sockets answers 503 and blames nobody else.
//! - A call to a service with no node to go to (not registered, or no longer) is
//!   answered 404 (503 after `X-Pillion-Wait`) and counted in that service's metrics
//!   all the same, so a service that died shows its callers' errors.

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
                    node.measure(rtt, clock_end);
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
                    // An answer all the same: how long it took is measured.
                    node.measure(rtt, clock_end);
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
}
