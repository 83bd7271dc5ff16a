//! A minimal HTTP/1.1 client for tests: send a request, get status, headers and the
//! whole body back.

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::time::Duration;

/// What came back.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Asserts that this is an error of pillion's shape with `status`, whose `detail`
    /// says `want`; `request` names what was sent, for the failure message.
    pub fn assert_refused(&self, status: u16, want: &str, request: &str) {
        assert_eq!(self.status, status, "{request}: {}", self.text());
        let detail = self.json()["detail"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(detail.contains(want), "{request}: {detail}");
    }

    /// The body as JSON; panics with the body when it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text()))
    }
}

/// Sends one request with a 10 s limit. Errors (connection refused, timeout) come back
/// as `Err` with a message, so tests can assert on unreachability too.
pub async fn request(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Result<Reply, String> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(body.into()))
        .map_err(|e| format!("bad request: {e}"))?;
    let send = async {
        let res = client.request(req).await.map_err(|e| format!("{e:?}"))?;
        let (parts, body) = res.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("reading body: {e}"))?
            .to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    };
    tokio::time::timeout(Duration::from_secs(10), send)
        .await
        .map_err(|_| format!("no reply from {url} within 10s"))?
}

pub async fn get(url: &str) -> Result<Reply, String> {
    request(Method::GET, url, &[], Bytes::new()).await
}

pub async fn post_json(url: &str, body: &str) -> Result<Reply, String> {
    request(
        Method::POST,
        url,
        &[("content-type", "application/json")],
        body.to_string(),
    )
    .await
}

/// `POST` of an HTML form (`a=1&b=2`), as `curl -d` sends it.
pub async fn post_form(url: &str, form: &str) -> Result<Reply, String> {
    request(
        Method::POST,
        url,
        &[("content-type", "application/x-www-form-urlencoded")],
        form.to_string(),
    )
    .await
}

pub async fn delete_json(url: &str, body: &str) -> Result<Reply, String> {
    request(
        Method::DELETE,
        url,
        &[("content-type", "application/json")],
        body.to_string(),
    )
    .await
}
