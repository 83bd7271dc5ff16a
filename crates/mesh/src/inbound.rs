//! The mesh listener's side of a call: the caller's sidecar is known by its
//! certificate; in distributed JWT mode the token travelling with the call is
//! verified here; the rules decide ([`crate::policy`]), then the caller's rate
//! limits; the app gets `X-Pillion-Caller` and the request.
//!
//! The app gets the call's `traceparent` ([`trace::hop`]); with an exporter, the
//! listener records a server span `serve <service>`.
//!
//! HTTP/1.1 (websocket upgrades included) goes to the app as HTTP/1.1, h2 (gRPC) as
//! h2c, and a TCP tunnel as bytes to the app's port.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue, HOST};
use http::{Request, Response, StatusCode, Version};
use http_body::Body as _;
use pillion_core::trace::{self, Kind};
use pillion_core::ApiError;
use pillion_http::pool::{Outgoing, Pool};
use pillion_http::relay::{
    app_failure, is_upgrade, origin_form, outbound_headers, relay, reply, request_host, ProxyBody,
};
use pillion_http::server::RequestBody;
use pillion_http::server::TlsPeer;

use crate::jwt::Verifier;
use crate::policy::{Call, Limits, Rules};

/// [`pillion_core::CALLER_HEADER`].
pub const CALLER: HeaderName = HeaderName::from_static(pillion_core::CALLER_HEADER);

/// The id of the errors this module answers with.
pub const ID: &str = "pillion.mesh";

pub struct MeshInbound {
    /// This sidecar's service.
    pub service: String,
    /// The app's `host:port`.
    pub app: String,
    pool: Arc<Pool>,
    /// `--mesh-allow`: services that may call; empty: any service of the mesh.
    pub allow: Vec<String>,
    /// The `[mesh]` rules, `--mesh-allow`'s last.
    pub rules: Arc<Rules>,
    /// Rate limits per caller.
    pub limits: Arc<Limits>,
    /// Client certificates refused although the CA signed them.
    pub revoked: crate::identity::Revoked,
    pub jwt: Option<Arc<Verifier>>,
    pub app_timeout: Duration,
    pub connect_timeout: Duration,
    pub accepted: AtomicU64,
    pub refused: AtomicU64,
}

impl MeshInbound {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        service: String,
        app: String,
        allow: Vec<String>,
        rules: Arc<Rules>,
        limits: Arc<Limits>,
        revoked: crate::identity::Revoked,
        jwt: Option<Arc<Verifier>>,
        app_timeout: Duration,
        connect_timeout: Duration,
    ) -> Arc<MeshInbound> {
        Arc::new(MeshInbound {
            pool: Arc::new(Pool::new(app.clone())),
            service,
            app,
            allow,
            rules,
            limits,
            revoked,
            jwt,
            app_timeout,
            connect_timeout,
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        })
    }

    /// For `/statusz`.
    pub fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "app": self.app,
            "allow": self.allow,
            "accepted": self.accepted.load(Ordering::Relaxed),
            "refused": self.refused.load(Ordering::Relaxed),
        })
    }

    /// The caller, when its certificate names one and is not revoked.
    fn caller(&self, peer: Option<&TlsPeer>) -> Result<Arc<str>, String> {
        let caller = peer
            .and_then(|p| p.identity.clone())
            .ok_or_else(|| "the client certificate names no pillion service".to_string())?;
        let cert = peer.and_then(|p| p.certificate.as_ref());
        if let Some(id) = cert.and_then(|c| crate::identity::revoked_by(&self.revoked, c)) {
            return Err(format!("the certificate of {caller:?} is revoked ({id})"));
        }
        Ok(caller)
    }

    /// Whether `call` may reach the app, by the rules, and if not, why. A denial is
    /// logged (in audit mode too, where the call goes on).
    fn decide(&self, call: &Call<'_>, peer: SocketAddr) -> Result<(), String> {
        let Err(denial) = self.rules.decide(call) else {
            return Ok(());
        };
        let rule = denial.rule.as_deref().unwrap_or("default");
        let why = format!(
            "service {:?} may not call {:?}: {}",
            call.caller, self.service, denial.why
        );
        if denial.audited {
            tracing::warn!(%peer, caller = call.caller, method = call.method.unwrap_or("-"), path = call.path.unwrap_or("-"), rule, audit = true, "mesh call would be denied (audit mode): {why}");
            return Ok(());
        }
        tracing::info!(%peer, caller = call.caller, method = call.method.unwrap_or("-"), path = call.path.unwrap_or("-"), rule, "mesh call denied: {why}");
        Err(why)
    }

    fn refuse(&self, status: StatusCode, why: String) -> Response<ProxyBody> {
        self.refused.fetch_add(1, Ordering::Relaxed);
        reply(ApiError::new(ID, status, why))
    }

    pub async fn handle(
        self: Arc<Self>,
        mut req: Request<RequestBody>,
        peer: SocketAddr,
    ) -> Response<ProxyBody> {
        let caller = match self.caller(req.extensions().get::<TlsPeer>()) {
            Ok(caller) => caller,
            Err(why) => {
                tracing::info!(%peer, "mesh call refused: {why}");
                return self.refuse(StatusCode::FORBIDDEN, why);
            }
        };
        let principal = match &self.jwt {
            Some(jwt) => match jwt.admit(req.headers_mut()).await {
                Ok(p) => p,
                Err(e) => {
                    self.refused.fetch_add(1, Ordering::Relaxed);
                    return reply(e.to_api_error());
                }
            },
            None => None,
        };
        // Rules and limits match path prefixes: a path spelt another way is refused.
        let paths_matter = !self.rules.is_empty() || !self.limits.is_empty();
        if paths_matter && !crate::policy::canonical(req.uri().path()) {
            return self.refuse(
                StatusCode::BAD_REQUEST,
                format!(
                    "the path {:?} is not canonical (an empty, . or .. segment, or an escaped character that needs none)",
                    req.uri().path()
                ),
            );
        }
        let call = Call {
            caller: &caller,
            method: Some(req.method().as_str()),
            path: Some(req.uri().path()),
            subject: principal.as_ref().map(|p| p.sub.as_str()),
            scopes: principal.as_ref().map_or(&[], |p| &p.scopes),
        };
        if let Err(why) = self.decide(&call, peer) {
            return self.refuse(StatusCode::FORBIDDEN, why);
        }
        if let Err((limit, wait)) = self.limits.take(&caller, req.uri().path()) {
            tracing::info!(%peer, caller = %caller, limit = %limit, "mesh call over its rate limit");
            self.refused.fetch_add(1, Ordering::Relaxed);
            return too_many(
                &format!(
                    "service {caller:?} is over the rate limit {limit:?} of {:?}",
                    self.service
                ),
                wait,
            );
        }
        let h2 = req.version() == Version::HTTP_2;
        let upgrade = is_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
        let (parts, body) = req.into_parts();
        let host = request_host(&parts);
        // The server removed the client's identity headers; these are pillion's.
        let mut headers = outbound_headers(parts.headers, upgrade.is_some(), &[]);
        if let Ok(v) = HeaderValue::from_str(&caller) {
            headers.insert(CALLER, v);
        }
        let span = trace::hop(&mut headers).map(|mut span| {
            span.set("http.request.method", parts.method.as_str());
            span.set("url.path", parts.uri.path());
            span.set("pillion.service", self.service.as_str());
            span.set("pillion.caller", &*caller);
            span.set("server.address", self.app.as_str());
            span
        });
        let body = if body.is_end_stream() {
            Outgoing::Full(None)
        } else {
            Outgoing::Stream(http_body_util::Limited::new(body, usize::MAX), None)
        };
        let mut out = Request::new(body);
        *out.method_mut() = parts.method;
        *out.headers_mut() = headers;
        if h2 {
            let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            if let Ok(uri) = format!("http://{}{path}", self.app).parse() {
                *out.uri_mut() = uri;
            }
            *out.version_mut() = Version::HTTP_2;
        } else {
            *out.uri_mut() = origin_form(parts.uri);
            *out.version_mut() = Version::HTTP_11;
            let host = host.or_else(|| HeaderValue::from_str(&self.app).ok());
            if let Some(host) = host {
                out.headers_mut().insert(HOST, host);
            }
        }
        self.accepted.fetch_add(1, Ordering::Relaxed);
        let sent = tokio::time::timeout(
            self.app_timeout,
            self.pool.send(out, h2, self.connect_timeout),
        );
        let answer = match sent.await {
            Ok(Ok(res)) => Ok(res),
            Err(_) => Err(ApiError::new(
                ID,
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "the app at {} did not answer within {}",
                    self.app,
                    pillion_core::duration::format(self.app_timeout)
                ),
            )),
            Ok(Err((e, _))) => Err(ApiError::new(ID, e.status(), app_failure(&e, &self.app))),
        };
        if let Some(span) = span {
            span.end_with(format!("serve {}", self.service), Kind::Server, &answer);
        }
        match answer {
            Ok(res) => relay(res, upgrade),
            Err(e) => reply(e),
        }
    }

    /// A TCP tunnel: the allowed caller's bytes go to the app's port and back.
    pub async fn tunnel(
        self: Arc<Self>,
        mut tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        peer: SocketAddr,
        client: TlsPeer,
    ) {
        let caller = self.caller(Some(&client)).and_then(|caller| {
            let call = Call {
                caller: &caller,
                method: None,
                path: None,
                subject: None,
                scopes: &[],
            };
            self.decide(&call, peer)?;
            match self.limits.take(&caller, "") {
                Ok(()) => Ok(()),
                Err((limit, _)) => Err(format!("over the rate limit {limit:?}")),
            }
        });
        if let Err(why) = caller {
            self.refused.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%peer, "mesh tunnel refused: {why}");
            return;
        }
        let app = match tokio::time::timeout(
            self.connect_timeout,
            tokio::net::TcpStream::connect(&self.app),
        )
        .await
        {
            Ok(Ok(app)) => app,
            Ok(Err(e)) => {
                return tracing::warn!(app = %self.app, error = %e, "mesh tunnel: the app is unreachable")
            }
            Err(_) => {
                return tracing::warn!(app = %self.app, "mesh tunnel: connecting to the app timed out")
            }
        };
        self.accepted.fetch_add(1, Ordering::Relaxed);
        let _ = app.set_nodelay(true);
        let mut app = app;
        let _ = tokio::io::copy_bidirectional(&mut tls, &mut app).await;
    }
}

/// 429 with `Retry-After` (whole seconds, at least 1), as Envoy's local rate limit
/// answers.
pub fn too_many(why: &str, wait: Duration) -> Response<ProxyBody> {
    let mut res = reply(ApiError::new(ID, StatusCode::TOO_MANY_REQUESTS, why));
    let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
    res.headers_mut()
        .insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
    res
}
