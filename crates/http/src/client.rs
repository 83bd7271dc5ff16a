//! One-shot requests to a URL, over the same pools as calls to nodes: health checks
//! of the app, etcd's gateway, peer sidecars, a JWKS URL, an ACME CA. One [`Pool`]
//! per authority, made on first use. An answer read whole is read up to
//! [`MAX_ANSWER`] bytes: a server that sends more cannot fill the sidecar's memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, Uri};

use crate::pool::{Outgoing, Pool, PooledBody, Settings};
use crate::SendError;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0:?} is not an http:// URL (nor an https:// one this client may use)")]
    BadUrl(String),
    #[error(transparent)]
    Send(#[from] SendError),
    #[error("no answer within {}", pillion_core::duration::format(*.0))]
    Timeout(Duration),
    #[error("the answer is larger than {} bytes", MAX_ANSWER)]
    AnswerTooLarge,
}

/// The largest answer read whole. Health checks, peers' replies, etcd's answers, a
/// JWKS and an ACME CA's documents are far smaller.
pub const MAX_ANSWER: usize = 16 << 20;

/// Checks that `url` is an absolute `http://` or `https://` URL with a host.
pub fn check_url(url: &str) -> Result<Uri, String> {
    let uri: Uri = url.parse().map_err(|e| format!("{url:?}: {e}"))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(_)) => Ok(uri),
        _ => Err(format!(
            "{url:?}: give an http:// or https:// URL with a host"
        )),
    }
}

/// Reads a whole body of an answer, up to [`MAX_ANSWER`] bytes.
pub async fn read_answer<B>(body: B) -> Result<Bytes, ClientError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<crate::BoxError>,
{
    use http_body_util::BodyExt;
    match http_body_util::Limited::new(body, MAX_ANSWER)
        .collect()
        .await
    {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ClientError::AnswerTooLarge),
        Err(e) => {
            Err(SendError::Protocol(format!("reading the answer: {}", crate::describe(&*e))).into())
        }
    }
}

pub struct Client {
    /// By `authority` for http://, `https://authority` for https://.
    pools: Mutex<HashMap<String, Arc<Pool>>>,
    settings: Settings,
    connect_timeout: Duration,
    /// What https:// URLs are checked with; without it they are refused.
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Client {
    pub fn new(settings: Settings, connect_timeout: Duration) -> Client {
        Client::with_tls(settings, connect_timeout, None)
    }

    /// A client that also speaks https://, checking servers with `tls`.
    pub fn with_tls(
        settings: Settings,
        connect_timeout: Duration,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Client {
        Client {
            pools: Mutex::new(HashMap::new()),
            settings,
            connect_timeout,
            tls,
        }
    }

    /// The pool of one authority (plain), shared by every request to it.
    pub fn pool(&self, authority: &str) -> Arc<Pool> {
        self.pool_of(authority, false)
            .expect("a plain pool always exists")
    }

    /// The pool of one authority, over TLS when `https`; `None` for https without a
    /// TLS config.
    pub fn pool_of(&self, authority: &str, https: bool) -> Option<Arc<Pool>> {
        let tls = match (https, &self.tls) {
            (false, _) => None,
            (true, None) => return None,
            (true, Some(config)) => Some(config),
        };
        let key = if https {
            format!("https://{authority}")
        } else {
            authority.to_string()
        };
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pool) = pools.get(&key) {
            return Some(pool.clone());
        }
        let connector = match tls {
            None => None,
            Some(config) => {
                let host = authority
                    .rsplit_once(':')
                    .map_or(authority, |(h, _)| h)
                    .trim_start_matches('[')
                    .trim_end_matches(']');
                let name = rustls::pki_types::ServerName::try_from(host.to_string()).ok()?;
                Some(crate::stream::Connector::new((**config).clone(), name))
            }
        };
        let pool = Arc::new(Pool::with_tls(
            authority.to_string(),
            self.settings.clone(),
            connector,
        ));
        pools.insert(key, pool.clone());
        Some(pool)
    }

    /// Sends `req`, whose URI is absolute (`http://host:port/path`), and waits at most
    /// `timeout` for the answer's head. A request that fails on a pooled connection
    /// the node had closed meanwhile is sent again once on a new one when the node
    /// cannot have acted on it (it never saw it) or it is idempotent.
    pub async fn send(
        &self,
        mut req: Request<Outgoing>,
        timeout: Duration,
    ) -> Result<Response<PooledBody>, ClientError> {
        let uri = req.uri().clone();
        let (authority, https) = match (uri.scheme_str(), uri.authority()) {
            (Some("http"), Some(a)) => (a.as_str().to_string(), false),
            (Some("https"), Some(a)) if self.tls.is_some() => (a.as_str().to_string(), true),
            _ => return Err(ClientError::BadUrl(uri.to_string())),
        };
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        *req.uri_mut() = Uri::try_from(path).map_err(|_| ClientError::BadUrl(uri.to_string()))?;
        if let Ok(host) = HeaderValue::from_str(&authority) {
            req.headers_mut().entry(header::HOST).or_insert(host);
        }
        let pool = self
            .pool_of(&authority, https)
            .ok_or_else(|| ClientError::BadUrl(uri.to_string()))?;
        let again = replayable(&req);
        let first = tokio::time::timeout(timeout, pool.send(req, false, self.connect_timeout));
        let failure = match first.await {
            Err(_) => return Err(ClientError::Timeout(timeout)),
            Ok(Ok(res)) => return Ok(res),
            Ok(Err((e, _))) => e,
        };
        match again {
            Some(req) if stale_connection(&failure) => {
                let second =
                    tokio::time::timeout(timeout, pool.send(req, false, self.connect_timeout));
                match second.await {
                    Err(_) => Err(ClientError::Timeout(timeout)),
                    Ok(Ok(res)) => Ok(res),
                    Ok(Err((e, _))) => Err(e.into()),
                }
            }
            _ => Err(failure.into()),
        }
    }

    /// `GET url`, the whole answer read within `timeout`.
    pub async fn get(&self, url: &str, timeout: Duration) -> Result<Response<Bytes>, ClientError> {
        let req = Request::get(url)
            .header(header::USER_AGENT, "pillion")
            .body(Outgoing::Full(None))
            .map_err(|_| ClientError::BadUrl(url.to_string()))?;
        self.fetch_response(req, timeout).await
    }

    /// Sends `req` and reads the whole answer (see [`read_answer`]), both within
    /// `timeout`.
    pub async fn fetch(
        &self,
        req: Request<Outgoing>,
        timeout: Duration,
    ) -> Result<(http::StatusCode, Bytes), ClientError> {
        let res = self.fetch_response(req, timeout).await?;
        Ok((res.status(), res.into_body()))
    }

    /// [`Client::fetch`], with the answer's headers.
    pub async fn fetch_response(
        &self,
        req: Request<Outgoing>,
        timeout: Duration,
    ) -> Result<Response<Bytes>, ClientError> {
        let attempt = async {
            let (head, body) = self.send(req, timeout).await?.into_parts();
            Ok(Response::from_parts(head, read_answer(body).await?))
        };
        tokio::time::timeout(timeout, attempt)
            .await
            .map_err(|_| ClientError::Timeout(timeout))?
    }
}

/// A copy of an idempotent request with a whole body, to send again if a kept-alive
/// connection turns out to have been closed by the node.
fn replayable(req: &Request<Outgoing>) -> Option<Request<Outgoing>> {
    let Outgoing::Full(body) = req.body() else {
        return None;
    };
    if !crate::idempotent(req.method()) {
        return None;
    }
    let mut copy = Request::new(Outgoing::Full(body.clone()));
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.headers_mut() = req.headers().clone();
    Some(copy)
}

/// The failures of a connection the node closed while it sat in the pool.
fn stale_connection(e: &SendError) -> bool {
    matches!(
        e,
        SendError::Closed | SendError::Write(_) | SendError::Read(_)
    )
}
