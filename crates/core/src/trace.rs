//! Distributed tracing: W3C Trace Context (`traceparent`, `tracestate`) kept on every
//! hop, and the spans a sidecar records when an exporter is installed.
//!
//! Each place where a request passes through the sidecar (a call by name, the mesh
//! listener, the sessions proxy, push delivery) calls [`hop`] on the headers it
//! forwards. What it does depends on whether spans are exported (`--otlp-endpoint`):
//!
//! - **exporting** (Envoy's way): the sidecar's span is a child of the incoming
//!   `traceparent` (same trace id, a new span id, the caller's id as parent), and the
//!   request leaves with the sidecar's span as its parent. [`Hop::end`] queues the
//!   span for the exporter.
//! - **not exporting** (Linkerd's way): a valid incoming `traceparent` is passed on
//!   unchanged, since a span id of the sidecar's would name a span no collector ever
//!   receives and break the trace in two; nothing is allocated, nothing is recorded.
//!
//! Either way, a request without a valid `traceparent` (absent, malformed, two of
//! them, version `ff`, zero ids, upper-case hex) starts a new trace: a random trace
//! id, flagged sampled, and its `tracestate` is dropped with it. A `traceparent` of a
//! later version is read for its version-00 fields and sent on as version 00. An
//! incoming trace that is not sampled is passed on and not recorded.
//!
//! The queue is bounded and never waits: when it is full, the new span is dropped and
//! counted ([`Tracer::dropped`]), so a slow or dead collector costs the data path
//! nothing. There is one [`Tracer`] per process, like the log subscriber:
//! [`install`] it once at start; until then nothing is exported.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

use http::header::{HeaderMap, HeaderName, HeaderValue};

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// The length of a version-00 `traceparent`.
const LEN: usize = 55;

/// A parsed `traceparent`: whose child the next span is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub version: u8,
    pub trace_id: [u8; 16],
    /// The span that sent the request.
    pub parent_id: [u8; 8],
    pub flags: u8,
}

impl TraceParent {
    /// Reads a `traceparent` value by the W3C rules; `None` when it is not valid.
    pub fn parse(value: &[u8]) -> Option<TraceParent> {
        let v = value.trim_ascii();
        if v.len() < LEN {
            return None;
        }
        let version = hex_byte(&v[0..2])?;
        if version == 0xff || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
            return None;
        }
        // Version 00 is exactly 55 characters; a later version may append fields
        // after a dash.
        if (version == 0 && v.len() != LEN) || (v.len() > LEN && v[LEN] != b'-') {
            return None;
        }
        let mut trace_id = [0u8; 16];
        for (i, b) in trace_id.iter_mut().enumerate() {
            *b = hex_byte(&v[3 + 2 * i..5 + 2 * i])?;
        }
        let mut parent_id = [0u8; 8];
        for (i, b) in parent_id.iter_mut().enumerate() {
            *b = hex_byte(&v[36 + 2 * i..38 + 2 * i])?;
        }
        let flags = hex_byte(&v[53..55])?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(TraceParent {
            version,
            trace_id,
            parent_id,
            flags,
        })
    }

    /// The first value of `traceparent` in `headers`, if there is exactly one and it
    /// is valid.
    pub fn from_headers(headers: &HeaderMap) -> Option<TraceParent> {
        let mut all = headers.get_all(TRACEPARENT).iter();
        let first = all.next()?;
        if all.next().is_some() {
            return None;
        }
        TraceParent::parse(first.as_bytes())
    }

    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// `00-{trace_id}-{parent_id}-{flags}`, as a header value.
    pub fn to_header(&self) -> HeaderValue {
        let mut out = [0u8; LEN];
        out[..3].copy_from_slice(b"00-");
        hex_into(&self.trace_id, &mut out[3..35]);
        out[35] = b'-';
        hex_into(&self.parent_id, &mut out[36..52]);
        out[52] = b'-';
        hex_into(&[self.flags], &mut out[53..55]);
        // One small allocation. A per-thread block cut into values was tried and
        // measured slower (its atomic reference counts cost more than malloc).
        HeaderValue::from_bytes(&out).expect("hex is a header value")
    }
}

fn hex_byte(two: &[u8]) -> Option<u8> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None, // upper case is not valid either
    };
    Some(digit(two[0])? << 4 | digit(two[1])?)
}

fn hex_into(bytes: &[u8], out: &mut [u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = HEX[(b >> 4) as usize];
        out[2 * i + 1] = HEX[(b & 15) as usize];
    }
}

/// Lower-case hex of an id, for the exporter and logs.
pub fn hex(bytes: &[u8]) -> String {
    let mut out = vec![0u8; bytes.len() * 2];
    hex_into(bytes, &mut out);
    String::from_utf8(out).expect("hex is UTF-8")
}

/// Random, never all zero. Trace ids need to be unique, not secret: the per-thread
/// generator is enough.
fn random_id<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    for chunk in out.chunks_mut(8) {
        let r = crate::id::fast_random().to_le_bytes();
        chunk.copy_from_slice(&r[..chunk.len()]);
    }
    if out == [0; N] {
        out[N - 1] = 1;
    }
    out
}

/// OTLP's span kinds (the protobuf enum's numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Server = 2,
    Client = 3,
    Consumer = 5,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
}

impl From<&str> for Value {
    fn from(s: &str) -> Value {
        Value::Str(s.to_string())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Value {
        Value::Str(s)
    }
}

impl From<i64> for Value {
    fn from(n: i64) -> Value {
        Value::Int(n)
    }
}

/// A finished span, waiting for the exporter.
#[derive(Debug, Clone)]
pub struct Span {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_id: Option<[u8; 8]>,
    pub trace_state: Option<String>,
    pub name: String,
    pub kind: Kind,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(&'static str, Value)>,
    /// `Some(message)`: the span's status is ERROR.
    pub error: Option<String>,
}

/// The process's spans on their way to the exporter.
pub struct Tracer {
    exporting: bool,
    queue: Mutex<VecDeque<Span>>,
    capacity: usize,
    dropped: AtomicU64,
}

impl Tracer {
    /// A tracer whose spans an exporter drains; at most `capacity` wait.
    pub fn exporting(capacity: usize) -> Tracer {
        Tracer {
            exporting: true,
            queue: Mutex::new(VecDeque::with_capacity(capacity.min(4096))),
            capacity,
            dropped: AtomicU64::new(0),
        }
    }

    const fn off() -> Tracer {
        Tracer {
            exporting: false,
            queue: Mutex::new(VecDeque::new()),
            capacity: 0,
            dropped: AtomicU64::new(0),
        }
    }

    pub fn is_exporting(&self) -> bool {
        self.exporting
    }

    /// Queues a finished span, or drops (and counts) it when the queue is full.
    pub fn record(&self, span: Span) {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if queue.len() >= self.capacity {
            drop(queue);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        queue.push_back(span);
    }

    /// Up to `max` queued spans, oldest first.
    pub fn take(&self, max: usize) -> Vec<Span> {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let n = queue.len().min(max);
        queue.drain(..n).collect()
    }

    pub fn queued(&self) -> usize {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Spans dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

static OFF: Tracer = Tracer::off();
static INSTALLED: OnceLock<Tracer> = OnceLock::new();

/// Makes `tracer` the process's tracer; only the first call has an effect (`false`
/// for the others).
pub fn install(tracer: Tracer) -> bool {
    INSTALLED.set(tracer).is_ok()
}

/// The process's tracer (one that records nothing until [`install`]).
pub fn tracer() -> &'static Tracer {
    INSTALLED.get().unwrap_or(&OFF)
}

/// The sidecar's span for one request, while it is under way.
#[derive(Debug)]
pub struct Hop {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    parent_id: Option<[u8; 8]>,
    /// The `tracestate` the request leaves with.
    trace_state: Option<String>,
    start: SystemTime,
    attributes: Vec<(&'static str, Value)>,
}

impl Hop {
    pub fn trace_id(&self) -> [u8; 16] {
        self.trace_id
    }

    pub fn span_id(&self) -> [u8; 8] {
        self.span_id
    }

    /// Adds an attribute to the span.
    pub fn set(&mut self, key: &'static str, value: impl Into<Value>) {
        self.attributes.push((key, value.into()));
    }

    /// [`Hop::end`] with what the caller gets: the answer's status, or the error the
    /// sidecar answers with.
    pub fn end_with<B>(
        self,
        name: String,
        kind: Kind,
        answer: &Result<http::Response<B>, crate::ApiError>,
    ) {
        match answer {
            Ok(res) => self.end(name, kind, res.status().as_u16(), None),
            Err(e) => self.end(name, kind, e.code, Some(e.detail.clone())),
        }
    }

    /// Ends the span with the status the caller saw: 5xx is an error, with `error`
    /// as its message when the sidecar made the answer itself.
    pub fn end(mut self, name: String, kind: Kind, status: u16, error: Option<String>) {
        self.attributes
            .push(("http.response.status_code", Value::Int(status as i64)));
        let error = match error {
            Some(e) => Some(e),
            None if status >= 500 => Some(format!("answered {status}")),
            None => None,
        };
        tracer().record(Span {
            trace_id: self.trace_id,
            span_id: self.span_id,
            parent_id: self.parent_id,
            trace_state: self.trace_state,
            name,
            kind,
            start: self.start,
            end: SystemTime::now(),
            attributes: self.attributes,
            error,
        });
    }
}

/// The trace context of a request this sidecar forwards, in `headers` (the ones that
/// leave): see the module's comment. `Some` when a span is to be recorded.
pub fn hop(headers: &mut HeaderMap) -> Option<Hop> {
    let incoming = TraceParent::from_headers(headers);
    let exporting = tracer().is_exporting();
    let (trace_id, parent_id, flags) = match incoming {
        Some(tp) if !exporting || !tp.sampled() => {
            if tp.version != 0 {
                headers.insert(TRACEPARENT, TraceParent { version: 0, ..tp }.to_header());
            }
            return None;
        }
        Some(tp) => (tp.trace_id, Some(tp.parent_id), tp.flags),
        None => {
            headers.remove(TRACESTATE);
            (random_id(), None, 1)
        }
    };
    let span_id = random_id();
    headers.insert(
        TRACEPARENT,
        TraceParent {
            version: 0,
            trace_id,
            parent_id: span_id,
            flags,
        }
        .to_header(),
    );
    exporting.then(|| Hop {
        trace_id,
        span_id,
        parent_id,
        trace_state: trace_state(headers),
        start: SystemTime::now(),
        attributes: Vec::with_capacity(6),
    })
}

/// The `tracestate` of `headers`, for a span (only while recording one).
fn trace_state(headers: &HeaderMap) -> Option<String> {
    let mut parts = headers
        .get_all(TRACESTATE)
        .iter()
        .filter_map(|v| v.to_str().ok());
    let first = parts.next()?.to_string();
    Some(parts.fold(first, |acc, p| acc + "," + p))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn valid_values_round_trip() {
        let tp = TraceParent::parse(GOOD.as_bytes()).unwrap();
        assert_eq!(hex(&tp.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex(&tp.parent_id), "00f067aa0ba902b7");
        assert!(tp.sampled());
        assert_eq!(tp.to_header(), GOOD);
        assert!(TraceParent::parse(format!(" {GOOD}\t").as_bytes()).is_some());
    }

    #[test]
    fn invalid_values_are_refused() {
        let cases = [
            "",
            "00",
            &GOOD[..54],
            &format!("{GOOD}0"),
            &format!("{GOOD}-extra"), // version 00 has no more fields
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00F067AA0BA902B7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7_01",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        ];
        for case in cases {
            assert_eq!(TraceParent::parse(case.as_bytes()), None, "{case:?}");
        }
    }

    #[test]
    fn later_versions_are_read_for_their_version_00_fields() {
        let tp = TraceParent::parse(
            b"cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-adds",
        )
        .unwrap();
        assert_eq!(tp.version, 0xcc);
        assert_eq!(TraceParent { version: 0, ..tp }.to_header(), GOOD);
        assert!(TraceParent::parse(&GOOD.replace("00-", "01-").into_bytes()).is_some());
    }

    #[test]
    fn without_an_exporter_a_valid_parent_passes_unchanged() {
        let mut headers = HeaderMap::new();
        headers.insert(TRACEPARENT, HeaderValue::from_static(GOOD));
        headers.insert(TRACESTATE, HeaderValue::from_static("congo=t61rcWkgMzE"));
        assert!(hop(&mut headers).is_none());
        assert_eq!(headers[TRACEPARENT], GOOD);
        assert_eq!(headers[TRACESTATE], "congo=t61rcWkgMzE");
    }

    #[test]
    fn an_invalid_or_missing_parent_starts_a_new_trace() {
        for bad in [
            None,
            Some("00-zz"),
            Some("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ] {
            let mut headers = HeaderMap::new();
            if let Some(bad) = bad {
                headers.insert(TRACEPARENT, HeaderValue::from_static(bad));
            }
            headers.insert(TRACESTATE, HeaderValue::from_static("congo=t61rcWkgMzE"));
            hop(&mut headers);
            let tp = TraceParent::from_headers(&headers).expect("a valid traceparent");
            assert!(tp.sampled());
            assert!(
                headers.get(TRACESTATE).is_none(),
                "a new trace has no state"
            );
        }
        let mut two = HeaderMap::new();
        two.append(TRACEPARENT, HeaderValue::from_static(GOOD));
        two.append(TRACEPARENT, HeaderValue::from_static(GOOD));
        hop(&mut two);
        assert_eq!(two.get_all(TRACEPARENT).iter().count(), 1);
        assert_ne!(two[TRACEPARENT], GOOD);
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let tracer = Tracer::exporting(1);
        let span = Span {
            trace_id: [1; 16],
            span_id: [1; 8],
            parent_id: None,
            trace_state: None,
            name: "x".into(),
            kind: Kind::Client,
            start: SystemTime::now(),
            end: SystemTime::now(),
            attributes: vec![],
            error: None,
        };
        tracer.record(span.clone());
        tracer.record(span);
        assert_eq!(tracer.dropped(), 1);
        assert_eq!(tracer.take(10).len(), 1);
        assert_eq!(tracer.queued(), 0);
    }
}
/// The price of [`hop`] without an exporter, per call:
/// `cargo test -p pillion-core --release --lib hop_cost -- --ignored --nocapture`.
#[cfg(test)]
mod cost {
    use super::*;

    #[test]
    #[ignore]
    fn hop_cost() {
        let n = 2_000_000u32;
        let mut base = HeaderMap::new();
        base.insert(http::header::HOST, HeaderValue::from_static("127.0.0.1:9"));
        let valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        for (label, incoming) in [("a valid traceparent", Some(valid)), ("none", None)] {
            let mut h = base.clone();
            if let Some(v) = incoming {
                h.insert(TRACEPARENT, HeaderValue::from_static(v));
            }
            let t = std::time::Instant::now();
            for _ in 0..n {
                let mut m = h.clone();
                std::hint::black_box(hop(&mut m));
                std::hint::black_box(&m);
            }
            let with_hop = t.elapsed();
            let t = std::time::Instant::now();
            for _ in 0..n {
                std::hint::black_box(h.clone());
            }
            let per = (with_hop.as_nanos() as f64 - t.elapsed().as_nanos() as f64) / n as f64;
            eprintln!("{label}: {per:.0} ns per hop");
        }
    }
}
