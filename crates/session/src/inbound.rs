//! The inbound proxy: every request on `--listen` goes to the app (`--app`), carrying
//! the visitor's session as headers; the app's answer may change the session.
//!
//! Per request: the `session` cookie is taken out of the request; an id the store
//! knows gives its data, any other (unknown, expired, malformed, absent) means no
//! session. Incoming `X-Session-*` headers (in any spelling, see [`Scheme::claims`])
//! are dropped and the session's own are added. The app's control headers are
//! applied to the store in one atomic write, then removed, and `Set-Cookie` is added
//! when the id is new, rotated, refreshed (`--session-rolling`) or destroyed.
//!
//! A session is created only when the app sets a key in it, under a fresh id (never
//! one the client offered): a visit that keeps nothing stores nothing, so crawlers
//! and load tests do not fill the store with empty sessions.
//!
//! The app gets the request's `traceparent` ([`trace::hop`]); with an exporter,
//! each request is a server span named after its method.
//!
//! When the store is unavailable, requests still reach the app without session
//! headers and with `X-Session-Error` (or get 503 with `--session-store-down fail`,
//! with or without a cookie: for a visitor without one the store is pinged); a change
//! the app asked for that could not be stored turns the response into a 503, so the
//! client knows and nothing is dropped silently.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, HOST, SET_COOKIE};
use http::{Request, Response, StatusCode, Version};
use http_body::Body as _;
use http_body_util::{Either, Full};
use pillion_core::trace::{self, Kind};
use pillion_core::ApiError;
use pillion_http::pool::{self, Outgoing, Pool, TrailerFilter};
use pillion_http::relay::{
    app_failure, is_upgrade, origin_form, outbound_headers, relay, request_host, ProxyBody,
};
use pillion_http::server::RequestBody;

use crate::codec::{check_limits, Limits, Scheme};
use crate::cookie::CookieConfig;
use crate::metrics::SessionMetrics;
use crate::{SessionData, SessionStore, StoreError};

const ID: &str = "pillion.session";

/// What to do with requests while the store cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StoreDown {
    /// Reach the app without session headers, with `X-Session-Error`.
    #[default]
    Pass,
    /// Answer 503.
    Fail,
}

impl std::str::FromStr for StoreDown {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pass" => Ok(StoreDown::Pass),
            "fail" => Ok(StoreDown::Fail),
            _ => Err(format!("unknown store-down policy {s:?}: use pass or fail")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    /// `http://host:port` of the app, for messages.
    pub app_url: String,
    /// `host:port` of the app.
    pub app: String,
    pub cookie: CookieConfig,
    pub scheme: Scheme,
    pub rolling: bool,
    pub store_down: StoreDown,
    pub limits: Limits,
    pub connect_timeout: Duration,
    /// How long the app may take to answer's headers (`--app-timeout`); then 504.
    pub app_timeout: Duration,
    /// The listener serves HTTPS: the app gets `X-Forwarded-Proto: https`.
    pub https: bool,
    /// How connections to the app are kept.
    pub pool: pool::Settings,
}

/// Parses `--app`: an `http://host:port` URL.
pub fn app_authority(url: &str) -> Result<String, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("--app {url:?} is not a URL: {e}"))?;
    match (uri.scheme_str(), uri.authority()) {
        (Some("http"), Some(a)) if a.port_u16().is_some() => Ok(a.to_string()),
        (Some("http"), Some(a)) => Ok(format!("{a}:80")),
        (Some("https"), _) => Err(format!(
            "--app {url:?}: https to the app is not supported; the app is local, use http://"
        )),
        _ => Err(format!(
            "--app {url:?} must look like http://127.0.0.1:3000"
        )),
    }
}

enum Loaded {
    /// A session the store knows.
    Known(String, SessionData),
    /// No usable session; one is made if the app sets a key.
    Fresh,
    /// The store could not be asked.
    Unavailable(String),
}

pub struct Inbound {
    cfg: Config,
    store: Arc<dyn SessionStore>,
    pool: Arc<Pool>,
    /// Takes the scheme's headers out of request trailers too: a server that reads
    /// trailers as headers would see them as session data.
    trailer_filter: TrailerFilter,
    pub metrics: SessionMetrics,
    last_store_error: Mutex<Option<String>>,
}

fn reply(status: StatusCode, detail: String) -> Response<ProxyBody> {
    ApiError::new(ID, status, detail)
        .into_response()
        .map(|s| Either::Right(Full::new(Bytes::from(s))))
}

impl Inbound {
    pub fn new(store: Arc<dyn SessionStore>, cfg: Config) -> Arc<Inbound> {
        Arc::new(Inbound {
            pool: Arc::new(Pool::with_settings(cfg.app.clone(), cfg.pool.clone())),
            trailer_filter: {
                let scheme = cfg.scheme.clone();
                TrailerFilter(Arc::new(move |trailers| scheme.strip(trailers)))
            },
            cfg,
            store,
            metrics: SessionMetrics::default(),
            last_store_error: Mutex::new(None),
        })
    }

    /// Whether the session store answers within `limit` (`/healthz`); the error
    /// says why not.
    pub async fn check_store(&self, limit: Duration) -> Result<(), String> {
        match tokio::time::timeout(limit, self.store.ping()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "session store {} did not answer within {}",
                self.store.backend(),
                pillion_core::duration::format(limit)
            )),
        }
    }

    /// Pings the store once, as the sidecar starts: a store that cannot be reached is
    /// a warning now, not at the first visitor's request (and `/statusz` shows it).
    pub async fn check_store_at_start(&self, limit: Duration) {
        let Err(e) = self.check_store(limit).await else {
            return;
        };
        self.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            error = %e,
            "session store unavailable at start; requests reach the app without session \
             headers (or get 503 with --session-store-down fail) until it is back"
        );
        // The first failing request does not warn again; the recovery is logged.
        *self
            .last_store_error
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(e);
    }

    /// For `/statusz`.
    pub fn status(&self) -> serde_json::Value {
        let error = self
            .last_store_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        serde_json::json!({
            "app": self.cfg.app_url,
            "store": self.store.backend(),
            "store_healthy": error.is_none(),
            "store_error": error,
            "cookie": self.cfg.cookie.name,
            "max_age_secs": self.cfg.cookie.max_age.as_secs(),
            "rolling": self.cfg.rolling,
        })
    }

    /// Runs a store operation, measuring it and remembering whether the store works.
    async fn store<T>(
        &self,
        op: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let result = op.await;
        self.metrics.store_latency.record(started.elapsed());
        let mut last = self
            .last_store_error
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match &result {
            Ok(_) => {
                if last.take().is_some() {
                    tracing::info!(store = %self.store.backend(), "session store reachable again");
                }
            }
            Err(e) => {
                self.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
                if last.is_none() {
                    tracing::warn!(error = %e, "session store unavailable");
                }
                *last = Some(e.to_string());
            }
        }
        result
    }

    pub async fn handle(
        self: Arc<Self>,
        mut req: Request<RequestBody>,
        peer: SocketAddr,
    ) -> Response<ProxyBody> {
        let Some(mut span) = trace::hop(req.headers_mut()) else {
            return self.proxy(req, peer).await;
        };
        span.set("http.request.method", req.method().as_str());
        span.set("url.path", req.uri().path());
        span.set("server.address", self.cfg.app.as_str());
        let name = req.method().to_string();
        let res = self.proxy(req, peer).await;
        span.end(name, Kind::Server, res.status().as_u16(), None);
        res
    }

    async fn proxy(&self, mut req: Request<RequestBody>, peer: SocketAddr) -> Response<ProxyBody> {
        let cfg = &self.cfg;
        let offered = crate::cookie::take(req.headers_mut(), &cfg.cookie.name);
        let loaded = match offered.filter(|id| self.store.recognises(id)) {
            Some(id) => match self.store(self.store.load(&id)).await {
                Ok(Some(data)) => Loaded::Known(id, data),
                Ok(None) => Loaded::Fresh,
                Err(e) => Loaded::Unavailable(e.to_string()),
            },
            // Nothing to load, but `fail` promises that no request is served while the
            // store is down: ask it.
            None if cfg.store_down == StoreDown::Fail => {
                match self.store(self.store.ping()).await {
                    Ok(()) => Loaded::Fresh,
                    Err(e) => Loaded::Unavailable(e.to_string()),
                }
            }
            None => Loaded::Fresh,
        };
        if let (Loaded::Unavailable(e), StoreDown::Fail) = (&loaded, cfg.store_down) {
            return reply(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{e}; try again later"),
            );
        }

        let upgrade = is_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
        let (parts, body) = req.into_parts();
        let host = request_host(&parts);
        // A client's identity headers were removed by the server; the JWT verifier in
        // front of this may have set the subject since.
        let mut headers = outbound_headers(parts.headers, upgrade.is_some(), &[]);
        cfg.scheme.strip(&mut headers);
        match &loaded {
            Loaded::Known(_, data) => cfg.scheme.inject(&mut headers, data),
            Loaded::Unavailable(e) => {
                if let Ok(v) = HeaderValue::from_str(e) {
                    headers.insert(cfg.scheme.error_header().clone(), v);
                }
            }
            Loaded::Fresh => {}
        }
        forwarded(&mut headers, peer, host.as_ref(), cfg.https);
        // HTTP/1.0 allows a request without a Host; the HTTP/1.1 the app gets does not.
        match host.or_else(|| HeaderValue::from_str(&cfg.app).ok()) {
            Some(host) => headers.insert(HOST, host),
            None => None,
        };
        let body = if body.is_end_stream() {
            Outgoing::Full(None)
        } else {
            Outgoing::Stream(
                http_body_util::Limited::new(body, usize::MAX),
                Some(self.trailer_filter.clone()),
            )
        };
        let mut out = Request::new(body);
        *out.method_mut() = parts.method;
        *out.uri_mut() = origin_form(parts.uri);
        *out.version_mut() = Version::HTTP_11;
        *out.headers_mut() = headers;

        let sent = tokio::time::timeout(
            cfg.app_timeout,
            self.pool.send(out, false, cfg.connect_timeout),
        );
        let mut res = match sent.await {
            Ok(Ok(res)) => res,
            Err(_) => {
                return reply(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "the app at {} did not answer within {} (--app-timeout)",
                        cfg.app_url,
                        pillion_core::duration::format(cfg.app_timeout)
                    ),
                )
            }
            Ok(Err((e, _))) => {
                let detail = app_failure(&e, &cfg.app_url);
                return reply(e.status(), detail);
            }
        };

        let controls = cfg.scheme.controls(res.headers());
        cfg.scheme.strip(res.headers_mut());
        let controls = match controls {
            Ok(c) => c,
            Err(refused) => return self.refuse(refused.to_string()),
        };
        let ttl = cfg.cookie.max_age;
        match loaded {
            Loaded::Unavailable(e) => {
                if controls.any() {
                    return reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("the app changed the session, but nothing could be stored: {e}"),
                    );
                }
            }
            Loaded::Known(id, _) if controls.destroy => {
                if let Err(e) = self.store(self.store.destroy(&id)).await {
                    return unstored(e);
                }
                self.metrics.destroyed.fetch_add(1, Ordering::Relaxed);
                res.headers_mut().append(SET_COOKIE, cfg.cookie.clear());
            }
            Loaded::Fresh if controls.destroy => {
                res.headers_mut().append(SET_COOKIE, cfg.cookie.clear());
            }
            Loaded::Known(mut id, data) => {
                let after = controls.change.apply(&data);
                if let Err(refused) = check_limits(&after, &controls.change, cfg.limits) {
                    return self.refuse(refused.to_string());
                }
                let mut cookie = cfg.rolling;
                // A session of another system's format moves to pillion's at once.
                if controls.rotate || self.store.is_foreign(&id) {
                    let new = self.store.new_id();
                    if let Err(e) = self.store(self.store.rotate(&id, &new, &data, ttl)).await {
                        return unstored(e);
                    }
                    self.metrics.rotated.fetch_add(1, Ordering::Relaxed);
                    id = new;
                    cookie = true;
                }
                if !controls.change.is_empty() || cfg.rolling {
                    if let Err(e) = self
                        .store(self.store.save(&id, &controls.change, ttl))
                        .await
                    {
                        return unstored(e);
                    }
                }
                if cookie {
                    res.headers_mut().append(SET_COOKIE, cfg.cookie.set(&id));
                }
            }
            // Deleting keys of, or rotating, a session that does not exist keeps
            // nothing either: there is no session until the app sets a key.
            Loaded::Fresh if controls.change.set.is_empty() => {}
            Loaded::Fresh => {
                let after = controls.change.apply(&SessionData::new());
                if let Err(refused) = check_limits(&after, &controls.change, cfg.limits) {
                    return self.refuse(refused.to_string());
                }
                let id = self.store.new_id();
                if let Err(e) = self
                    .store(self.store.save(&id, &controls.change, ttl))
                    .await
                {
                    return unstored(e);
                }
                self.metrics.created.fetch_add(1, Ordering::Relaxed);
                res.headers_mut().append(SET_COOKIE, cfg.cookie.set(&id));
            }
        }

        relay(res, upgrade)
    }

    fn refuse(&self, why: String) -> Response<ProxyBody> {
        self.metrics.refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(app = %self.cfg.app_url, "{why}");
        reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the app's {why}"),
        )
    }
}

fn unstored(e: StoreError) -> Response<ProxyBody> {
    reply(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("the session change the app asked for could not be stored: {e}; try again"),
    )
}

/// `X-Forwarded-For` (appended), `-Proto` and `-Host`.
fn forwarded(
    headers: &mut http::HeaderMap,
    peer: SocketAddr,
    host: Option<&HeaderValue>,
    https: bool,
) {
    let xff = HeaderName::from_static("x-forwarded-for");
    let ip = peer.ip().to_string();
    let value = match headers.get(&xff).and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {ip}"),
        None => ip,
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(xff, v);
    }
    headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static(if https { "https" } else { "http" }),
    );
    if let Some(host) = host {
        headers.insert(HeaderName::from_static("x-forwarded-host"), host.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_urls() {
        assert_eq!(
            app_authority("http://127.0.0.1:3000").unwrap(),
            "127.0.0.1:3000"
        );
        assert_eq!(app_authority("http://app").unwrap(), "app:80");
        assert!(app_authority("https://x:1").unwrap_err().contains("https"));
        assert!(app_authority("127.0.0.1:3000").is_err());
    }
}
