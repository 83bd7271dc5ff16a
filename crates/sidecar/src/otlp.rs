//! The span exporter (`--otlp-endpoint`): OTLP/HTTP with the JSON encoding, posted
//! with pillion's own HTTP client.
//!
//! Not the opentelemetry crates: `opentelemetry-otlp` 0.31, even with only its
//! `http-json` feature, pulls in prost, tonic and reqwest (a second HTTP client), 14
//! crates this workspace does not have (ARCHITECTURE.md lists them), for what is one JSON document per batch. The
//! OTLP/HTTP JSON encoding is the protobuf JSON mapping of
//! `ExportTraceServiceRequest`: ids as hex, times as decimal strings of Unix
//! nanoseconds, enums as numbers.
//!
//! Spans wait in the [`Tracer`]'s bounded queue, which never blocks the data path
//! (full: the new span is dropped and counted). This task posts them every second,
//! or as soon as a batch is full, each post within [`POST_TIMEOUT`]. A collector that
//! fails or is not there loses that batch (counted), is logged once and then at most
//! once a minute, and never stops the sidecar.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::{header, Method, Request};
use pillion_core::trace::{hex, tracer, Span, Tracer, Value};
use pillion_http::pool::Outgoing;
use pillion_http::Client;
use serde_json::{json, Value as Json};

/// Spans that may wait for the exporter; more are dropped.
pub const QUEUE: usize = 8192;
/// Spans per post.
const BATCH: usize = 512;
/// A batch smaller than [`BATCH`] waits at most this long.
const PERIOD: Duration = Duration::from_secs(1);
/// How often the queue is looked at.
const POLL: Duration = Duration::from_millis(100);
const POST_TIMEOUT: Duration = Duration::from_secs(5);
const FINAL_FLUSH: Duration = Duration::from_secs(2);
const LOG_EVERY: Duration = Duration::from_secs(60);

#[derive(Default)]
pub struct ExportMetrics {
    exported: AtomicU64,
    failed: AtomicU64,
    failed_posts: AtomicU64,
}

impl ExportMetrics {
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let t = tracer();
        let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
        // Name, type, help, and each series: its labels and value.
        type Family<'a> = (&'a str, &'a str, &'a str, &'a [(&'a str, u64)]);
        let metrics: [Family; 4] = [
            (
                "pillion_trace_spans_exported_total",
                "counter",
                "Spans the collector accepted.",
                &[("", load(&self.exported))],
            ),
            (
                "pillion_trace_spans_dropped_total",
                "counter",
                "Spans lost: the queue was full (reason=queue_full) or the post failed (reason=export_failed).",
                &[
                    ("{reason=\"queue_full\"}", t.dropped()),
                    ("{reason=\"export_failed\"}", load(&self.failed)),
                ],
            ),
            (
                "pillion_trace_export_failures_total",
                "counter",
                "Posts to the collector that failed.",
                &[("", load(&self.failed_posts))],
            ),
            (
                "pillion_trace_spans_queued",
                "gauge",
                "Spans waiting for the exporter.",
                &[("", t.queued() as u64)],
            ),
        ];
        for (name, kind, help, values) in metrics {
            pillion_core::metrics::header(out, name, kind, help);
            for (labels, value) in values {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        }
    }
}

pub struct Exporter {
    url: String,
    service_name: String,
    client: Client,
    pub metrics: Arc<ExportMetrics>,
    /// When the last failure was logged, and failures since.
    quiet_until: Option<Instant>,
    unlogged: u64,
}

impl Exporter {
    /// Installs the process's exporting [`Tracer`]; spans are recorded from now on.
    pub fn install(url: String, service_name: String) -> Exporter {
        pillion_core::trace::install(Tracer::exporting(QUEUE));
        let tls = Arc::new(pillion_http::tls::system_client_config());
        Exporter {
            url,
            service_name,
            client: Client::with_tls(Default::default(), Duration::from_secs(1), Some(tls)),
            metrics: Arc::default(),
            quiet_until: None,
            unlogged: 0,
        }
    }

    /// Posts spans until `stop` resolves, then what is left, once.
    pub async fn run(mut self, stop: impl std::future::Future<Output = ()>) {
        tracing::info!(
            url = %pillion_core::secret::redact_url(&self.url),
            service = %self.service_name,
            "exporting spans over OTLP/HTTP"
        );
        tokio::pin!(stop);
        let mut last = Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = &mut stop => break,
            }
            let queued = tracer().queued();
            if queued == 0 || (queued < BATCH && last.elapsed() < PERIOD) {
                continue;
            }
            last = Instant::now();
            self.flush().await;
        }
        // Bounded: a collector that does not answer must not hold up the shutdown.
        let _ = tokio::time::timeout(FINAL_FLUSH, self.flush()).await;
    }

    async fn flush(&mut self) {
        loop {
            let batch = tracer().take(BATCH);
            if batch.is_empty() {
                return;
            }
            let full = batch.len() == BATCH;
            self.post(batch).await;
            if !full {
                return;
            }
        }
    }

    async fn post(&mut self, batch: Vec<Span>) {
        let n = batch.len() as u64;
        let body = encode(&self.service_name, &batch).to_string();
        let req = Request::builder()
            .method(Method::POST)
            .uri(&self.url)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::USER_AGENT, "pillion")
            .body(Outgoing::full(body.into()));
        let result = match req {
            Err(e) => Err(e.to_string()),
            Ok(req) => match self.client.fetch(req, POST_TIMEOUT).await {
                Ok((status, _)) if status.is_success() => Ok(()),
                Ok((status, body)) => Err(format!(
                    "the collector answered {status}: {}",
                    String::from_utf8_lossy(&body[..body.len().min(200)])
                )),
                Err(e) => Err(pillion_http::describe(&e)),
            },
        };
        match result {
            Ok(()) => {
                self.metrics.exported.fetch_add(n, Ordering::Relaxed);
                if self.quiet_until.take().is_some() {
                    tracing::info!("the span collector accepts spans again");
                }
                self.unlogged = 0;
            }
            Err(e) => {
                self.metrics.failed.fetch_add(n, Ordering::Relaxed);
                self.metrics.failed_posts.fetch_add(1, Ordering::Relaxed);
                self.unlogged += 1;
                let now = Instant::now();
                if self.quiet_until.is_none_or(|until| now >= until) {
                    tracing::warn!(
                        url = %pillion_core::secret::redact_url(&self.url),
                        error = %e,
                        failed_posts = self.unlogged,
                        "exporting spans failed; those spans are dropped (logged at most once a minute)"
                    );
                    self.quiet_until = Some(now + LOG_EVERY);
                    self.unlogged = 0;
                }
            }
        }
    }
}

fn nanos(t: SystemTime) -> String {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
        .to_string()
}

fn attribute(key: &str, value: &Value) -> Json {
    let value = match value {
        Value::Str(s) => json!({ "stringValue": s }),
        Value::Int(n) => json!({ "intValue": n.to_string() }),
    };
    json!({ "key": key, "value": value })
}

/// An `ExportTraceServiceRequest` in the protobuf JSON mapping.
pub fn encode(service_name: &str, spans: &[Span]) -> Json {
    let spans: Vec<Json> = spans
        .iter()
        .map(|s| {
            let mut span = json!({
                "traceId": hex(&s.trace_id),
                "spanId": hex(&s.span_id),
                "name": s.name,
                "kind": s.kind as i32,
                "startTimeUnixNano": nanos(s.start),
                "endTimeUnixNano": nanos(s.end),
                "attributes": s.attributes.iter().map(|(k, v)| attribute(k, v)).collect::<Vec<_>>(),
                "status": match &s.error {
                    Some(message) => json!({ "code": 2, "message": message }),
                    None => json!({}),
                },
            });
            if let Some(parent) = s.parent_id {
                span["parentSpanId"] = json!(hex(&parent));
            }
            if let Some(state) = &s.trace_state {
                span["traceState"] = json!(state);
            }
            span
        })
        .collect();
    json!({
        "resourceSpans": [{
            "resource": {
                "attributes": [
                    attribute("service.name", &Value::Str(service_name.to_string())),
                    attribute("telemetry.sdk.name", &Value::Str("pillion".into())),
                    attribute("telemetry.sdk.version", &Value::Str(env!("CARGO_PKG_VERSION").into())),
                ]
            },
            "scopeSpans": [{
                "scope": { "name": "pillion", "version": env!("CARGO_PKG_VERSION") },
                "spans": spans,
            }]
        }]
    })
}
