//! One attempt of a call, in steps. Each step is a decision from its inputs, tested
//! without a socket as [`retry::decide`] is; [`crate::forward`] runs them in order:
//!
//! - [`Wire::to`]: how the call reaches the node chosen (HTTP/1.1 or h2c, as a
//!   JSON-RPC request to a go-micro node), or why it cannot;
//! - [`rules`]: whether the call may be sent again once a node may have seen it;
//! - [`Replay`], [`build`], [`readdress`]: the request an attempt sends (the
//!   caller's body the first time, a copy of a whole body after, a request handed
//!   back unsent, a JSON-RPC request made anew for each node), addressed to its node;
//! - [`try_limit`]: how long the attempt may take;
//! - [`unavailable`], [`Failure`] and [`Problem`]: what the attempt came to, and
//!   for a failed one whose fault it was ([`retry::Outcome`]);
//! - [`Feedback`]: what that tells the node's record (the balancer's peak-EWMA, the
//!   measured latency, the failures that eject it);
//! - [`Failures`]: what the caller is told when the call stops after failed attempts;
//! - [`backoff`]: how long to wait before the next attempt.

use std::fmt;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use pillion_core::ApiError;
use pillion_http::pool::Outgoing;
use pillion_http::{Blame, SendError};

use crate::endpoints::{Dialect, EjectionPolicy, NodeState, Protocol, ServiceSet};
use crate::forward::{error, Call};
use crate::jsonrpc;
use crate::retry::{self, Rules};

/// The latency a failed attempt counts as, so a node that fails fast looks slow to the
/// balancer.
pub const FAILURE_PENALTY: Duration = Duration::from_secs(1);

/// How an attempt reaches its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wire {
    /// Over HTTP/2 (h2c), not HTTP/1.1.
    pub h2: bool,
    /// As a JSON-RPC request in this dialect: a call by method to a go-micro node.
    pub go_micro: Option<Dialect>,
}

impl Wire {
    /// How `call` reaches `node`; a 502 that says why when it cannot (the node takes
    /// calls over the mesh only and this sidecar has no identity, or the node's
    /// protocol cannot carry the call).
    #[inline]
    pub fn to(node: &NodeState, call: &Call) -> Result<Wire, ApiError> {
        if node.needs_identity {
            return Err(error(
                StatusCode::BAD_GATEWAY,
                format!(
                    "node {} of service {:?} takes calls only over the mesh (mTLS), and this sidecar has no mesh identity: start it with --mesh-ca-cert and --mesh-ca-key",
                    node.id, call.service
                ),
            ));
        }
        let h2 = node.protocol.h2_for(call.grpc).map_err(|mismatch| {
            error(
                StatusCode::BAD_GATEWAY,
                format!(
                    "cannot call node {} of service {:?}: {mismatch}",
                    node.authority, call.service
                ),
            )
        })?;
        let go_micro = match node.protocol {
            Protocol::GoMicro(dialect) if call.rpc => Some(dialect),
            _ => None,
        };
        Ok(Wire { h2, go_micro })
    }
}

/// What a call allows: `retries` attempts after the first at most, and sending the
/// request again after a node may have seen it only when its body was read `whole`
/// and its method is idempotent (or the caller sent `X-Pillion-Retry: always`).
pub fn rules(retries: u32, whole: bool, method: &Method, retry_any_method: bool) -> Rules {
    Rules {
        retries,
        replayable: whole && (retry_any_method || pillion_http::idempotent(method)),
    }
}

/// What the attempts of a call send. The caller's body goes with the first; a whole
/// body goes again as a copy; a request that a node handed back unsent (it could not
/// connect) goes again as it is; a JSON-RPC request is made anew for each attempt.
pub struct Replay {
    /// The caller's body, until an attempt takes it.
    first: Option<Outgoing>,
    /// The caller's whole body, to send again; `None` when it streams (it goes once).
    whole: Option<Option<Bytes>>,
    /// A request that never left, whole for the next attempt.
    /// Boxed: rare, and large to keep in the future of every call.
    returned: Option<Box<Request<Outgoing>>>,
    /// Whether attempts after the first may need the call's headers.
    again: bool,
}

impl Replay {
    /// Takes the call's body, and says what the call allows with `retries`.
    pub fn new(call: &mut Call, retries: u32) -> (Replay, Rules) {
        let whole = match &call.body {
            Outgoing::Full(b) => Some(b.clone()),
            Outgoing::Stream(..) => None,
        };
        let rules = rules(
            retries,
            whole.is_some(),
            &call.method,
            call.retry_any_method,
        );
        let replay = Replay {
            first: Some(std::mem::replace(&mut call.body, Outgoing::Full(None))),
            whole,
            returned: None,
            again: rules.replayable && rules.retries > 0,
        };
        (replay, rules)
    }

    /// The request a node handed back unsent, to go again as it is.
    pub fn returned(&mut self) -> Option<Box<Request<Outgoing>>> {
        self.returned.take()
    }

    /// The JSON-RPC request of an attempt to a go-micro node at `host`, with
    /// `time_left` until the call's deadline. A call by method is whole (read before
    /// it was sent): each attempt wraps it for its node.
    pub fn json_rpc(
        &mut self,
        call: &Call,
        dialect: Dialect,
        host: &HeaderValue,
        time_left: Duration,
    ) -> Result<Request<Outgoing>, ApiError> {
        let body = match &self.whole {
            Some(Some(body)) => body.clone(),
            _ => Default::default(),
        };
        let method = call.uri.path().trim_start_matches('/');
        let headers = call.headers.clone();
        let req = jsonrpc::request(&call.service, method, dialect, headers, &body, time_left)?;
        self.first = None;
        Ok(readdress(req, call, false, host))
    }

    /// The body and headers of the next attempt's request: the caller's body the
    /// first time, a copy of a whole one after; `None` when a streamed body went
    /// already.
    #[inline(always)] // on every call's path: see `forward::Calling`
    pub fn body(&mut self, call: &mut Call) -> Option<(Outgoing, HeaderMap)> {
        let body = match (self.first.take(), &self.whole) {
            (Some(first), _) => first,
            (None, Some(whole)) => Outgoing::Full(whole.clone()),
            (None, None) => return None,
        };
        // Keep the headers for later attempts only if there can be any. The original
        // goes (it has room for `Host`, which the node's address sets); the copy,
        // exactly as large as what it copies, stays.
        let headers = if self.again {
            let copy = call.headers.clone();
            std::mem::replace(&mut call.headers, copy)
        } else {
            std::mem::take(&mut call.headers)
        };
        Some((body, headers))
    }

    /// The request an attempt over `wire` got back unsent, for the next attempt. A
    /// JSON-RPC request is not kept: it is made anew for the next node.
    pub fn hand_back(&mut self, req: Option<Request<Outgoing>>, wire: Wire) {
        self.returned = req.filter(|_| wire.go_micro.is_none()).map(Box::new);
    }
}

/// The call's request with `body` and `headers`, addressed to the node at `host`.
pub fn build(
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
pub fn readdress(
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

/// How long an attempt that starts at `now` may take: the per-try timeout, within the
/// call's `deadline`; `None` when the deadline has passed.
pub fn try_limit(now: Instant, deadline: Instant, per_try: Duration) -> Option<Duration> {
    (now < deadline).then(|| per_try.min(deadline - now))
}

/// An attempt that got no answer for the caller, or one that another node may
/// answer better.
#[allow(clippy::large_enum_variant)] // made on a failure only: the request comes back in it
pub enum Failure {
    /// The node answered 502, 503 or 504.
    Unavailable(StatusCode),
    /// The send failed; a request that never left comes back.
    Send(SendError, Option<Request<Outgoing>>),
    /// No answer within the per-try timeout.
    TimedOut,
}

/// 502, 503 and 504: the node says it cannot answer now, and another one may.
pub fn unavailable(status: StatusCode) -> bool {
    matches!(status.as_u16(), 502..=504)
}

/// Why an attempt did not answer: what the retry decision takes, what a retry's log
/// line says, and what the caller is told when the call stops on it. A send error is
/// boxed: every call keeps room for a problem, and only a failed one fills it.
pub enum Problem<'a> {
    /// The node answered 502, 503 or 504.
    Unavailable(&'a NodeState, StatusCode),
    /// No connection could be made: the node never saw the request.
    NotSent(Box<SendError>),
    /// The node may have seen the request, then failed (reset, closed, bad answer).
    Failed(&'a NodeState, Box<SendError>),
    /// No answer within the per-try timeout, this long.
    TimedOut(&'a NodeState, Duration),
    /// The caller's fault (a broken upload) or pillion's (out of sockets).
    NotTheNodes(Box<SendError>),
}

impl<'a> Problem<'a> {
    /// A send to `node` that failed, by whose fault it was and whether the node may
    /// have seen the request.
    pub fn of(node: &'a NodeState, e: SendError) -> Problem<'a> {
        let e = Box::new(e);
        match e.blame() {
            Blame::Caller | Blame::Pillion => Problem::NotTheNodes(e),
            Blame::Node if e.may_have_reached_node() => Problem::Failed(node, e),
            Blame::Node => Problem::NotSent(e),
        }
    }

    /// As the retry decision sees it.
    pub fn outcome(&self) -> retry::Outcome {
        match self {
            Problem::Unavailable(..) => retry::Outcome::Unavailable,
            Problem::NotSent(_) => retry::Outcome::NotSent,
            Problem::Failed(..) => retry::Outcome::Failed,
            Problem::TimedOut(..) => retry::Outcome::TimedOut,
            Problem::NotTheNodes(_) => retry::Outcome::NotTheNodes,
        }
    }
}

impl fmt::Display for Problem<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Unavailable(node, status) => {
                write!(f, "node {} answered {status}", node.authority)
            }
            Problem::NotSent(e) | Problem::NotTheNodes(e) => write!(f, "{e}"),
            Problem::Failed(node, e) => write!(f, "node {} failed: {e}", node.authority),
            Problem::TimedOut(node, limit) => write!(
                f,
                "node {} did not answer within the per-try timeout {}",
                node.authority,
                pillion_core::duration::format(*limit)
            ),
        }
    }
}

/// What an attempt tells its node's record: the balancer's peak-EWMA, the node's
/// measured latency (which `/statusz` and the dashboard show), and its failures in
/// a row (which eject it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Feedback {
    /// Fed to the peak-EWMA ([`NodeState::observe`]).
    pub observe: Option<Duration>,
    /// Fed to the measured latency ([`NodeState::measure`]).
    pub measure: Option<Duration>,
    /// Counted towards ejection ([`ServiceSet::record_failure`]).
    pub failure: bool,
}

impl Feedback {
    /// An answer (not 502, 503 or 504) that took `rtt`. The node is credited with a
    /// success when its body ends whole.
    pub fn answer(rtt: Duration) -> Feedback {
        Feedback {
            observe: Some(rtt),
            measure: Some(rtt),
            failure: false,
        }
    }

    /// A failed attempt that took `rtt`. Only the node's faults count; the balancer
    /// takes them as [`FAILURE_PENALTY`] at least, so a node that fails fast does not
    /// look fast (a per-try timeout took its whole time already); a 502/503/504 is an
    /// answer all the same, and how long it took is measured.
    pub fn failure(outcome: retry::Outcome, rtt: Duration) -> Feedback {
        let (observe, measure, failure) = match outcome {
            retry::Outcome::Unavailable => (Some(FAILURE_PENALTY.max(rtt)), Some(rtt), true),
            retry::Outcome::NotSent | retry::Outcome::Failed => (Some(FAILURE_PENALTY), None, true),
            retry::Outcome::TimedOut => (Some(rtt), None, true),
            retry::Outcome::NotTheNodes => (None, None, false),
        };
        Feedback {
            observe,
            measure,
            failure,
        }
    }

    /// Records it on `node` of `set` at `at` ([`crate::endpoints::clock`]'s).
    #[inline(always)] // on every call's path: see `forward::Calling`
    pub fn record(
        self,
        set: &ServiceSet,
        node: &NodeState,
        at: Duration,
        ejection: &EjectionPolicy,
    ) {
        if let Some(rtt) = self.observe {
            node.observe(rtt, at);
        }
        if let Some(rtt) = self.measure {
            node.measure(rtt, at);
        }
        if self.failure {
            set.record_failure(node, ejection);
        }
    }
}

/// The failed attempts of a call so far, for a retry's log line (the last one) and
/// for what the caller is told when the call stops after them.
#[derive(Default)]
pub struct Failures<'a> {
    last: Option<Problem<'a>>,
    /// Whether a node may have seen the request in one of them.
    reached: bool,
}

impl<'a> Failures<'a> {
    pub fn push(&mut self, problem: Problem<'a>) {
        self.reached |= matches!(
            problem.outcome(),
            retry::Outcome::Unavailable | retry::Outcome::Failed | retry::Outcome::TimedOut
        );
        self.last = Some(problem);
    }

    /// The caller's error: 504 after a per-try timeout; the caller's or pillion's
    /// own failure as its status says; 503 "no healthy node" when no node could be
    /// reached at all; 502 otherwise.
    pub fn error(&self, service: &str) -> ApiError {
        match &self.last {
            Some(Problem::TimedOut(..)) => error(StatusCode::GATEWAY_TIMEOUT, self.to_string()),
            Some(Problem::NotTheNodes(e)) if e.blame() == Blame::Caller => {
                error(e.status(), format!("the request was not sent whole: {e}"))
            }
            Some(Problem::NotTheNodes(e)) => error(e.status(), e.to_string()),
            _ if self.reached => error(StatusCode::BAD_GATEWAY, self.to_string()),
            _ => error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("no healthy node of service {service:?}: {self}"),
            ),
        }
    }
}

/// The last failure.
impl fmt::Display for Failures<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.last {
            Some(problem) => problem.fmt(f),
            None => Ok(()),
        }
    }
}

/// The longest wait before attempt `attempt` (the first is 0): 20 ms before the first
/// retry, then 40, 80 and 160 ms, then 200 ms.
pub fn backoff_cap(attempt: u32) -> Duration {
    Duration::from_millis(10u64 << attempt.min(5)).min(Duration::from_millis(200))
}

/// Exponential backoff with full jitter: up to [`backoff_cap`].
pub fn backoff(attempt: u32) -> Duration {
    let cap = backoff_cap(attempt);
    let jitter = pillion_core::id::fast_random() % (cap.as_micros() as u64 + 1);
    Duration::from_micros(jitter)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::sync::Arc;

    use http::Uri;
    use retry::Outcome::{Failed, NotSent, NotTheNodes, TimedOut, Unavailable};

    use crate::endpoints::clock;

    fn call(method: Method, body: &'static str) -> Call {
        let mut headers = HeaderMap::new();
        headers.insert("x-caller", HeaderValue::from_static("app"));
        Call {
            service: "todos".into(),
            method,
            uri: Uri::from_static("/todos/1?x=1"),
            headers,
            body: Outgoing::full(Bytes::from_static(body.as_bytes())),
            grpc: false,
            rpc: false,
            pin: None,
            timeout: Duration::from_secs(2),
            wait: Duration::ZERO,
            retry_any_method: false,
        }
    }

    fn node(protocol: Protocol) -> NodeState {
        NodeState::test_at("todos-1", "127.0.0.1:7", protocol)
    }

    fn body(req: &Request<Outgoing>) -> &[u8] {
        match req.body() {
            Outgoing::Full(b) => b.as_deref().unwrap_or_default(),
            Outgoing::Stream(..) => panic!("a stream"),
        }
    }

    fn refused() -> SendError {
        SendError::Connect {
            authority: "127.0.0.1:7".into(),
            source: io::Error::from_raw_os_error(111),
        }
    }

    const HTTP1: Wire = Wire {
        h2: false,
        go_micro: None,
    };
    const HOST: HeaderValue = HeaderValue::from_static("127.0.0.1:7");

    #[test]
    fn the_wire_follows_the_node_s_protocol_and_the_mesh() {
        use crate::endpoints::Dialect::{JsonRpc, Mucp};
        let h2 = |h2| Ok((h2, None));
        // (node's protocol, gRPC call, call by method, wire or the error's start)
        let table = [
            (Protocol::Unset, false, false, h2(false)),
            (Protocol::Unset, true, false, h2(true)),
            (Protocol::H2c, false, false, h2(true)),
            (Protocol::Http1, false, true, h2(false)),
            (
                Protocol::GoMicro(JsonRpc),
                false,
                true,
                Ok((false, Some(JsonRpc))),
            ),
            (
                Protocol::GoMicro(Mucp),
                false,
                true,
                Ok((false, Some(Mucp))),
            ),
            (Protocol::GoMicro(Mucp), false, false, h2(false)),
            (
                Protocol::Http1,
                true,
                false,
                Err("cannot call node 127.0.0.1:7 of service \"todos\": gRPC needs HTTP/2"),
            ),
            (
                Protocol::GoMicro(JsonRpc),
                true,
                false,
                Err("cannot call node 127.0.0.1:7 of service \"todos\": gRPC cannot be carried"),
            ),
        ];
        for (protocol, grpc, rpc, want) in table {
            let mut c = call(Method::POST, "");
            (c.grpc, c.rpc) = (grpc, rpc);
            let got = Wire::to(&node(protocol), &c);
            match (got, want) {
                (Ok(wire), Ok((h2, go_micro))) => {
                    assert_eq!(wire, Wire { h2, go_micro }, "{protocol:?} {grpc} {rpc}")
                }
                (Err(e), Err(start)) => {
                    assert_eq!(e.code, 502);
                    assert!(e.detail.starts_with(start), "{}", e.detail);
                }
                (got, _) => panic!("{protocol:?} {grpc} {rpc}: {:?}", got.map_err(|e| e.detail)),
            }
        }
        // A node in the mesh, and this sidecar without an identity: whatever it speaks.
        let mut meshed = node(Protocol::H2c);
        meshed.needs_identity = true;
        let e = Wire::to(&meshed, &call(Method::GET, "")).unwrap_err();
        assert_eq!(e.code, 502);
        assert!(
            e.detail
                .starts_with("node todos-1 of service \"todos\" takes calls only over the mesh")
                && e.detail.contains("--mesh-ca-cert"),
            "{}",
            e.detail
        );
    }

    #[test]
    fn a_request_is_sent_again_only_whole_and_idempotent_or_when_asked() {
        // (body read whole, method, X-Pillion-Retry: always, replayable)
        let table = [
            (true, Method::GET, false, true),
            (true, Method::PUT, false, true),
            (true, Method::DELETE, false, true),
            (true, Method::POST, false, false),
            (true, Method::PATCH, false, false),
            (true, Method::POST, true, true),
            (false, Method::GET, false, false),
            (false, Method::POST, true, false),
        ];
        for (whole, method, always, replayable) in table {
            let r = rules(2, whole, &method, always);
            assert_eq!(r.replayable, replayable, "{whole} {method} {always}");
            assert_eq!(r.retries, 2);
        }
    }

    /// What `replay` gives for the next attempt over plain HTTP, built as the
    /// attempts build it.
    fn next(
        replay: &mut Replay,
        c: &mut Call,
        h2: bool,
        host: &HeaderValue,
    ) -> Option<Request<Outgoing>> {
        if let Some(req) = replay.returned() {
            return Some(readdress(*req, c, h2, host));
        }
        let (body, headers) = replay.body(c)?;
        Some(build(c, headers, h2, host, body))
    }

    #[test]
    fn a_whole_body_goes_with_every_attempt_and_the_headers_stay_for_retries() {
        let mut c = call(Method::GET, "hello");
        let (mut replay, rules) = Replay::new(&mut c, 2);
        assert!(rules.replayable);
        let first = next(&mut replay, &mut c, false, &HOST).unwrap();
        let second = next(&mut replay, &mut c, false, &HOST).unwrap();
        for req in [&first, &second] {
            assert_eq!(body(req), b"hello");
            assert_eq!(req.method(), Method::GET);
            assert_eq!(req.uri(), "/todos/1?x=1");
            assert_eq!(req.version(), http::Version::HTTP_11);
            assert_eq!(req.headers()["host"], "127.0.0.1:7");
            assert_eq!(req.headers()["x-caller"], "app");
        }

        // Sent once: the headers go with the first attempt, no copy is kept.
        let mut c = call(Method::POST, "hello");
        let (mut replay, rules) = Replay::new(&mut c, 2);
        assert!(!rules.replayable);
        let (_, headers) = replay.body(&mut c).unwrap();
        assert_eq!(headers["x-caller"], "app");
        assert!(c.headers.is_empty(), "taken, not copied");
        let mut c = call(Method::GET, "hello");
        let (mut replay, _) = Replay::new(&mut c, 0);
        replay.body(&mut c).unwrap();
        assert!(c.headers.is_empty(), "no retries: taken, not copied");
    }

    #[test]
    fn a_request_handed_back_unsent_goes_again_as_it_is_to_the_next_node() {
        let mut c = call(Method::POST, "hello");
        let (mut replay, _) = Replay::new(&mut c, 2);
        let mut first = next(&mut replay, &mut c, false, &HOST).unwrap();
        first
            .headers_mut()
            .insert("x-mark", HeaderValue::from_static("1"));
        replay.hand_back(Some(first), HTTP1);
        // The next node speaks h2c: the same request, addressed to it.
        let other = HeaderValue::from_static("127.0.0.1:8");
        let again = next(&mut replay, &mut c, true, &other).unwrap();
        assert_eq!(again.headers()["x-mark"], "1");
        assert_eq!(body(&again), b"hello");
        assert_eq!(again.version(), http::Version::HTTP_2);
        assert_eq!(again.uri(), "http://127.0.0.1:8/todos/1?x=1");
        assert!(again.headers().get("host").is_none());
        // Nothing handed back: the copy of the whole body. (Whether a request a node
        // may have seen goes again is the retry decision's, from the rules.)
        let last = next(&mut replay, &mut c, false, &HOST).unwrap();
        assert_eq!(body(&last), b"hello");
    }

    #[test]
    fn a_streamed_body_goes_once_unless_handed_back() {
        // After the first attempt took the stream.
        let mut replay = Replay {
            first: None,
            whole: None,
            returned: None,
            again: false,
        };
        let mut c = call(Method::POST, "");
        assert!(next(&mut replay, &mut c, false, &HOST).is_none());
        replay.hand_back(Some(Request::new(Outgoing::Full(None))), HTTP1);
        assert!(next(&mut replay, &mut c, false, &HOST).is_some());
        // A request handed back by a JSON-RPC attempt is not kept.
        let go_micro = Wire {
            h2: false,
            go_micro: Some(Dialect::JsonRpc),
        };
        replay.hand_back(Some(Request::new(Outgoing::Full(None))), go_micro);
        assert!(next(&mut replay, &mut c, false, &HOST).is_none());
    }

    #[test]
    fn a_call_by_method_to_a_go_micro_node_is_a_json_rpc_request_each_time() {
        let mut c = call(Method::POST, r#"{"name":"John"}"#);
        c.uri = Uri::from_static("/Say.Hello");
        c.rpc = true;
        let (mut replay, _) = Replay::new(&mut c, 2);
        let time_left = Duration::from_millis(1500);
        for _ in 0..2 {
            let req = replay
                .json_rpc(&c, Dialect::Mucp, &HOST, time_left)
                .unwrap();
            assert_eq!(req.uri(), "/");
            assert_eq!(req.method(), Method::POST);
            assert_eq!(req.version(), http::Version::HTTP_11);
            assert_eq!(req.headers()["micro-endpoint"], "Say.Hello");
            assert_eq!(req.headers()["timeout"], "1500000000");
            assert_eq!(req.headers()["host"], "127.0.0.1:7");
            assert_eq!(req.headers()["x-caller"], "app");
            let sent: serde_json::Value = serde_json::from_slice(body(&req)).unwrap();
            assert_eq!(sent["params"], serde_json::json!([{"name":"John"}]));
        }
        // The next node speaks plain HTTP: the caller's body, as it came.
        let plain = next(&mut replay, &mut c, false, &HOST).unwrap();
        assert_eq!(plain.uri(), "/Say.Hello");
        assert_eq!(body(&plain), br#"{"name":"John"}"#);
        // A body the node's JSON-RPC cannot take is the caller's error.
        let mut c = call(Method::POST, "not json");
        c.rpc = true;
        let (mut replay, _) = Replay::new(&mut c, 2);
        let Err(e) = replay.json_rpc(&c, Dialect::JsonRpc, &HOST, time_left) else {
            panic!("not JSON, sent");
        };
        assert_eq!(e.code, 400);
    }

    #[test]
    fn an_attempt_gets_the_per_try_timeout_within_the_deadline() {
        let now = Instant::now();
        let s = Duration::from_secs;
        // (deadline after now, per-try timeout, limit)
        let table = [
            (Some(s(10)), s(5), Some(s(5))),
            (Some(s(2)), s(5), Some(s(2))),
            (
                Some(Duration::from_nanos(1)),
                s(5),
                Some(Duration::from_nanos(1)),
            ),
            (Some(s(0)), s(5), None),
            (None, s(5), None),
        ];
        for (after, per_try, want) in table {
            let deadline = match after {
                Some(d) => now + d,
                None => now - s(1),
            };
            assert_eq!(
                try_limit(now, deadline, per_try),
                want,
                "{after:?} {per_try:?}"
            );
        }
    }

    #[test]
    fn only_502_503_and_504_say_another_node_may_answer() {
        for (status, want) in [
            (200, false),
            (404, false),
            (500, false),
            (501, false),
            (502, true),
            (503, true),
            (504, true),
            (505, false),
        ] {
            assert_eq!(
                unavailable(StatusCode::from_u16(status).unwrap()),
                want,
                "{status}"
            );
        }
    }

    #[test]
    fn a_failed_send_is_judged_by_whose_fault_it_was_and_whether_it_left() {
        let n = node(Protocol::Unset);
        let table = [
            (refused(), NotSent),
            (
                SendError::ConnectTimeout {
                    authority: "127.0.0.1:7".into(),
                    after: Duration::from_secs(1),
                },
                NotSent,
            ),
            (
                SendError::Tls {
                    authority: "127.0.0.1:7".into(),
                    detail: "untrusted".into(),
                },
                NotSent,
            ),
            (SendError::Closed, Failed),
            (SendError::Write(io::ErrorKind::BrokenPipe.into()), Failed),
            (SendError::Protocol("not HTTP".into()), Failed),
            (SendError::CallerBody("cut".into()), NotTheNodes),
            (SendError::BodyTooLarge, NotTheNodes),
            (
                SendError::Local {
                    authority: "127.0.0.1:7".into(),
                    source: io::Error::from_raw_os_error(24),
                },
                NotTheNodes,
            ),
        ];
        for (e, want) in table {
            let shown = e.to_string();
            assert_eq!(Problem::of(&n, e).outcome(), want, "{shown}");
        }
    }

    #[test]
    fn only_the_node_s_faults_reach_its_record() {
        let ms = Duration::from_millis;
        let fed = |observe: u64, measure: Option<u64>| Feedback {
            observe: Some(ms(observe)),
            measure: measure.map(ms),
            failure: true,
        };
        // (outcome, time it took, feedback)
        let table = [
            (Unavailable, ms(5), fed(1000, Some(5))),
            (Unavailable, ms(3000), fed(3000, Some(3000))),
            (NotSent, ms(5), fed(1000, None)),
            (Failed, ms(5), fed(1000, None)),
            (Failed, ms(3000), fed(1000, None)),
            (TimedOut, ms(5000), fed(5000, None)),
            (
                NotTheNodes,
                ms(5),
                Feedback {
                    observe: None,
                    measure: None,
                    failure: false,
                },
            ),
        ];
        for (outcome, rtt, want) in table {
            assert_eq!(Feedback::failure(outcome, rtt), want, "{outcome:?} {rtt:?}");
        }
        assert_eq!(
            Feedback::answer(ms(7)),
            Feedback {
                observe: Some(ms(7)),
                measure: Some(ms(7)),
                failure: false,
            }
        );

        let set = ServiceSet::test(vec![Arc::new(node(Protocol::Unset))]);
        let n = &set.nodes[0];
        let ejection = EjectionPolicy::default();
        Feedback::failure(NotTheNodes, ms(5)).record(&set, n, clock(), &ejection);
        assert_eq!(n.consecutive_failures(), 0);
        assert_eq!(n.latency(), None);
        assert_eq!(
            n.ewma(),
            ms(30),
            "the balancer's first assumption, untouched"
        );
        Feedback::failure(Unavailable, ms(5)).record(&set, n, clock(), &ejection);
        assert_eq!(n.consecutive_failures(), 1);
        assert_eq!(n.latency(), Some(ms(5)));
        assert_eq!(n.ewma(), ms(1000));
    }

    #[test]
    fn the_caller_is_told_what_the_last_attempt_came_to() {
        let n = node(Protocol::Unset);
        let status = StatusCode::SERVICE_UNAVAILABLE;
        let per_try = Duration::from_millis(250);
        let connect = "connect to 127.0.0.1:7: Connection refused (os error 111)";
        let not_sent = || Problem::NotSent(Box::new(refused()));
        // (the problems in order, status, detail)
        let table: Vec<(Vec<Problem>, u16, String)> = vec![
            (
                vec![not_sent()],
                503,
                format!("no healthy node of service \"todos\": {connect}"),
            ),
            (
                vec![not_sent(), not_sent()],
                503,
                format!("no healthy node of service \"todos\": {connect}"),
            ),
            // A node may have seen the request before: not "no healthy node".
            (
                vec![Problem::Unavailable(&n, status), not_sent()],
                502,
                connect.to_string(),
            ),
            (
                vec![Problem::Failed(&n, Box::new(SendError::Closed))],
                502,
                "node 127.0.0.1:7 failed: the node closed the connection before answering".into(),
            ),
            (
                vec![Problem::Unavailable(&n, status)],
                502,
                "node 127.0.0.1:7 answered 503 Service Unavailable".into(),
            ),
            (
                vec![not_sent(), Problem::TimedOut(&n, per_try)],
                504,
                "node 127.0.0.1:7 did not answer within the per-try timeout 250ms".into(),
            ),
            (
                vec![Problem::NotTheNodes(Box::new(SendError::BodyTooLarge))],
                413,
                "the request was not sent whole: the request body is larger than the limit (--max-body)"
                    .into(),
            ),
            (
                vec![
                    not_sent(),
                    Problem::NotTheNodes(Box::new(SendError::BodyLength {
                        declared: 5,
                        written: 3,
                    })),
                ],
                400,
                "the request was not sent whole: the request body had 3 bytes or more, not the 5 it declared"
                    .into(),
            ),
            (
                vec![Problem::NotTheNodes(Box::new(SendError::Local {
                    authority: "127.0.0.1:7".into(),
                    source: io::Error::from_raw_os_error(24),
                }))],
                503,
                "no socket for 127.0.0.1:7: Too many open files (os error 24) (pillion is out of resources)"
                    .into(),
            ),
        ];
        for (problems, code, detail) in table {
            let mut failures = Failures::default();
            for p in problems {
                failures.push(p);
            }
            let e = failures.error("todos");
            assert_eq!((e.code, e.detail.as_str()), (code, detail.as_str()));
            assert_eq!(e.id, crate::forward::ID);
        }
    }

    #[test]
    fn backoff_doubles_up_to_200_ms_with_full_jitter() {
        let ms = Duration::from_millis;
        let caps = [
            ms(10),
            ms(20),
            ms(40),
            ms(80),
            ms(160),
            ms(200),
            ms(200),
            ms(200),
        ];
        for (attempt, cap) in caps.into_iter().enumerate() {
            assert_eq!(backoff_cap(attempt as u32), cap, "attempt {attempt}");
        }
        assert_eq!(backoff_cap(u32::MAX), ms(200));
        let waits: Vec<_> = (0..200).map(|_| backoff(1)).collect();
        assert!(waits.iter().all(|w| *w <= ms(20)), "{waits:?}");
        assert!(waits.iter().any(|w| *w < ms(10)), "jittered: {waits:?}");
    }
}
