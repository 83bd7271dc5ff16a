//! A stand-in for the user's application: an HTTP/1.1 and h2c server on a loopback
//! port, whose behaviour a test switches at will.
//!
//! - `GET /health` answers according to [`Health`].
//! - a path ending in `/hang` never answers; when the caller gives up, the app counts a
//!   cancellation.
//! - a path ending in `/upgrade` switches protocols (`Upgrade: echo`) and echoes every
//!   byte.
//! - Any other request is answered according to [`Mode`]: by default `200` with a JSON
//!   echo of what arrived (app name, method, path, version, headers, body), so a test
//!   sees exactly what reached the app. The query can ask for response headers
//!   (`?h=X-Session-Set-User-Id:42`, repeatable) and a late answer (`?delay=200`, ms).
//!
//! [`TestApp::kill`] drops the listener and every open connection at once, as a
//! crashed process would; [`TestApp::restart`] serves again on the same port.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};
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

/// How every other request is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// 200 with the JSON echo.
    Echo,
    /// This status, with the JSON echo as body.
    Status(u16),
    /// Never answers.
    Hang,
}

struct State {
    name: String,
    health: AtomicU8,
    mode: AtomicU16,
    health_checks: AtomicU64,
    requests: AtomicU64,
    cancelled: AtomicU64,
    tasks: crate::process::Tasks,
}

/// A running test app; it stops when dropped.
pub struct TestApp {
    addr: SocketAddr,
    state: Arc<State>,
}

const HANG: u16 = 1;
const ECHO: u16 = 0;

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
            mode: AtomicU16::new(ECHO),
            health_checks: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            tasks: crate::process::Tasks::default(),
        });
        serve(listener, state.clone());
        TestApp { addr, state }
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

    pub fn set_mode(&self, m: Mode) {
        let v = match m {
            Mode::Echo => ECHO,
            Mode::Hang => HANG,
            Mode::Status(s) => s,
        };
        self.state.mode.store(v, Ordering::SeqCst);
    }

    /// How many `GET /health` requests arrived.
    pub fn health_checks(&self) -> u64 {
        self.state.health_checks.load(Ordering::SeqCst)
    }

    /// How many other requests arrived.
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// How many requests were abandoned by the caller before the app answered.
    pub fn cancelled(&self) -> u64 {
        self.state.cancelled.load(Ordering::SeqCst)
    }

    /// Closes the listener and every connection at once, like a crash.
    pub fn kill(&self) {
        self.state.tasks.kill(self.addr);
    }

    /// Serves again on the same port after [`TestApp::kill`].
    pub async fn restart(&self) {
        serve(crate::process::rebind(self.addr).await, self.state.clone());
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.state.tasks.abort();
    }
}

fn serve(listener: TcpListener, st: Arc<State>) {
    let state = st.clone();
    let accept = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let st = state.clone();
            let conn = tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| handle(st.clone(), req));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .await;
            });
            state.tasks.add(conn.abort_handle());
        }
    });
    st.tasks.add(accept.abort_handle());
}

/// Counts a cancellation when a hanging handler is dropped by its caller.
struct CancelGuard(Arc<State>);

impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.0.cancelled.fetch_add(1, Ordering::SeqCst);
    }
}

fn respond(status: u16, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(body.into()));
    *res.status_mut() = hyper::StatusCode::from_u16(status).expect("status");
    res
}

async fn handle(
    st: Arc<State>,
    mut req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let path = req.uri().path().to_string();
    match path.as_str() {
        "/health" => {
            st.health_checks.fetch_add(1, Ordering::SeqCst);
            let status = match st.health.load(Ordering::SeqCst) {
                x if x == Health::Healthy as u8 => 200,
                x if x == Health::Failing as u8 => 500,
                _ => std::future::pending::<u16>().await,
            };
            return Ok(respond(status, "health\n"));
        }
        p if p.ends_with("/hang") => {
            st.requests.fetch_add(1, Ordering::SeqCst);
            let _guard = CancelGuard(st.clone());
            std::future::pending::<()>().await;
        }
        p if p.ends_with("/upgrade") => {
            st.requests.fetch_add(1, Ordering::SeqCst);
            let on_upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(upgraded) = on_upgrade.await {
                    let mut io = TokioIo::new(upgraded);
                    let (mut r, mut w) = tokio::io::split(&mut io);
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }
            });
            let mut res = respond(101, Bytes::new());
            res.headers_mut().insert("upgrade", "echo".parse().unwrap());
            res.headers_mut()
                .insert("connection", "upgrade".parse().unwrap());
            return Ok(res);
        }
        _ => {}
    }
    st.requests.fetch_add(1, Ordering::SeqCst);
    let status = match st.mode.load(Ordering::SeqCst) {
        ECHO => 200,
        HANG => {
            let _guard = CancelGuard(st.clone());
            std::future::pending::<u16>().await
        }
        s => s,
    };
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    // Test hooks in the query: `h=Name:Value` (repeatable) adds a response header,
    // `delay=MS` answers late.
    let mut reply_headers = Vec::new();
    for pair in parts.uri.query().unwrap_or("").split('&') {
        match pair.split_once('=') {
            Some(("h", nv)) => {
                if let Some((n, v)) = nv.split_once(':') {
                    reply_headers.push((n.to_string(), v.replace("%20", " ")));
                }
            }
            Some(("delay", ms)) => {
                let ms = ms.parse().unwrap_or(0);
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            }
            _ => {}
        }
    }
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
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
    });
    let mut res = respond(status, echo.to_string());
    res.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    for (n, v) in reply_headers {
        if let (Ok(n), Ok(v)) = (
            hyper::header::HeaderName::from_bytes(n.as_bytes()),
            hyper::header::HeaderValue::from_str(&v),
        ) {
            res.headers_mut().append(n, v);
        }
    }
    Ok(res)
}
