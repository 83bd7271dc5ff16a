//! A stand-in for the user's application: an HTTP server on a free loopback port.
//!
//! `GET /health` answers according to [`Health`], which the test switches at will;
//! every other request is answered `200` with a JSON echo of what arrived (method,
//! path, headers, body) and the app's name, so a test sees exactly what reached the app.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// What `GET /health` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// 200 OK.
    Healthy,
    /// 500 Internal Server Error.
    Failing,
    /// Never answers (the connection stays open).
    Hanging,
}

struct State {
    name: String,
    health: AtomicU8,
    health_checks: AtomicU64,
    requests: AtomicU64,
}

/// A running test app; it stops when dropped.
pub struct TestApp {
    addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl TestApp {
    /// Starts an app named `name` on 127.0.0.1 and a free port. Must be called inside a
    /// tokio runtime.
    pub async fn start(name: &str) -> TestApp {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind test app");
        let addr = listener.local_addr().expect("test app address");
        let state = Arc::new(State {
            name: name.to_string(),
            health: AtomicU8::new(Health::Healthy as u8),
            health_checks: AtomicU64::new(0),
            requests: AtomicU64::new(0),
        });
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| handle(st.clone(), req));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        TestApp { addr, state, task }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_health(&self, h: Health) {
        self.state.health.store(h as u8, Ordering::SeqCst);
    }

    /// How many `GET /health` requests arrived.
    pub fn health_checks(&self) -> u64 {
        self.state.health_checks.load(Ordering::SeqCst)
    }

    /// How many other requests arrived.
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(
    st: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    if req.uri().path() == "/health" {
        st.health_checks.fetch_add(1, Ordering::SeqCst);
        let status = match st.health.load(Ordering::SeqCst) {
            x if x == Health::Healthy as u8 => 200,
            x if x == Health::Failing as u8 => 500,
            _ => {
                std::future::pending::<()>().await;
                unreachable!()
            }
        };
        let mut res = Response::new(Full::new(Bytes::from_static(b"health\n")));
        *res.status_mut() = hyper::StatusCode::from_u16(status).expect("status");
        return Ok(res);
    }
    st.requests.fetch_add(1, Ordering::SeqCst);
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let headers: serde_json::Map<String, serde_json::Value> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                serde_json::Value::String(v.to_str().unwrap_or("").to_string()),
            )
        })
        .collect();
    let echo = serde_json::json!({
        "app": st.name,
        "method": parts.method.as_str(),
        "path": parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"),
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
    });
    let mut res = Response::new(Full::new(Bytes::from(echo.to_string())));
    res.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    Ok(res)
}
