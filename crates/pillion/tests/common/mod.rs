//! Running the real `pillion` binary in tests.
#![allow(dead_code)] // each test file uses a different part

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use pillion_testkit::{free_port, wait_for_port, Daemon};

pub const BIN: &str = env!("CARGO_BIN_EXE_pillion");

/// A `pillion run`, killed on drop.
pub struct Sidecar {
    pub process: Daemon,
    pub addr: SocketAddr,
    /// What pillion wrote to its `--ready-file` (`address`, `listen`), when started
    /// on port 0; `null` from [`Sidecar::start_at`].
    pub ready: serde_json::Value,
}

/// A unique path in the temporary directory.
fn scratch_path(what: &str) -> std::path::PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!("pillion-test-{what}-{}-{n}", std::process::id()))
}

impl Sidecar {
    pub fn start(args: &[&str]) -> Sidecar {
        Self::start_with_env(args, &[])
    }

    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Sidecar {
        Self::start_logged(args, env, None)
    }

    /// [`Sidecar::start`] with its log (stderr) written to a file the test reads.
    pub fn start_with_log(args: &[&str], env: &[(&str, &str)]) -> (Sidecar, Log) {
        let log = Log(scratch_path("log"));
        (Self::start_logged(args, env, Some(&log)), log)
    }

    /// `pillion run --address 127.0.0.1:0 ARGS`: the API on a port the kernel picks
    /// (no other test can take it first), learnt from the `--ready-file` pillion
    /// writes once it serves. ARGS may name `--address` and `--listen` themselves
    /// (port 0 too).
    fn start_logged(args: &[&str], env: &[(&str, &str)], log: Option<&Log>) -> Sidecar {
        let ready = scratch_path("ready");
        let ready_arg = ready.to_str().unwrap().to_string();
        let mut all = vec!["--address", "127.0.0.1:0", "--ready-file", &ready_arg];
        all.extend_from_slice(args);
        let mut process = Self::spawn(&all, env, log);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(text) = std::fs::read_to_string(&ready) {
                let _ = std::fs::remove_file(&ready);
                let ready: serde_json::Value =
                    serde_json::from_str(&text).expect("the ready file is JSON");
                let addr = ready["address"]
                    .as_str()
                    .and_then(|a| a.parse().ok())
                    .expect("the ready file names the address");
                return Sidecar {
                    process,
                    addr,
                    ready,
                };
            }
            assert!(
                process.running(),
                "pillion exited at start: see its log above"
            );
            assert!(
                Instant::now() < deadline,
                "pillion was not serving within 15 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `pillion run --address addr ARGS` (`addr` may be off loopback, or served over
    /// HTTPS: then [`Sidecar::url`]'s http:// does not reach it).
    pub fn start_at(addr: SocketAddr, args: &[&str], env: &[(&str, &str)]) -> Sidecar {
        let addr_arg = addr.to_string();
        let mut all = vec!["--address", &addr_arg];
        all.extend_from_slice(args);
        let mut process = Self::spawn(&all, env, None);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            assert!(
                process.running(),
                "pillion exited before listening on {addr}: see its log above"
            );
            if wait_for_port(addr, Duration::from_millis(50)) {
                return Sidecar {
                    process,
                    addr,
                    ready: serde_json::Value::Null,
                };
            }
        }
        panic!("pillion did not listen on {addr} within 10 s");
    }

    /// A sidecar the test started itself, listening on `addr`.
    pub fn adopt(process: Daemon, addr: SocketAddr) -> Sidecar {
        Sidecar {
            process,
            addr,
            ready: serde_json::Value::Null,
        }
    }

    fn spawn(args: &[&str], env: &[(&str, &str)], log: Option<&Log>) -> Daemon {
        let mut cmd = Command::new(BIN);
        cmd.arg("run").args(args);
        cmd.env("RUST_LOG", "info");
        // Each sidecar its own cluster unless the test says otherwise: never the
        // well-known gossip port, never another test's sidecars.
        cmd.env(
            "PILLION_CLUSTER_BIND",
            format!("127.0.0.1:{}", pillion_testkit::free_udp_port()),
        );
        for (k, v) in env {
            cmd.env(k, v);
        }
        if let Some(log) = log {
            cmd.stderr(std::fs::File::create(&log.0).expect("creating the log file"));
        }
        Daemon::spawn("pillion", cmd)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

/// A sidecar's log file, removed on drop.
pub struct Log(pub std::path::PathBuf);

impl Log {
    pub fn text(&self) -> String {
        std::fs::read_to_string(&self.0).unwrap_or_default()
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs `pillion` with `args` to completion: (exit code, stdout, stderr).
pub fn run_to_end(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("running pillion");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Polls `probe` until it returns true or `limit` passes; returns whether it did.
pub async fn eventually<F, Fut>(limit: Duration, mut probe: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if probe().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The node ids registered for `service`, as `GET /registry?service=` shows them.
pub async fn node_ids(sidecar: &Sidecar, service: &str) -> Vec<String> {
    let reply = pillion_testkit::http::get(&sidecar.url(&format!("/registry?service={service}")))
        .await
        .expect("GET /registry");
    if reply.status == 404 {
        return Vec::new();
    }
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply
        .json()
        .as_array()
        .expect("an array of services")
        .iter()
        .flat_map(|s| s["nodes"].as_array().cloned().unwrap_or_default())
        .map(|n| n["id"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Registers a node of `service` at `address` through the sidecar's API, with
/// optional node metadata.
pub async fn register(
    sidecar: &Sidecar,
    service: &str,
    id: &str,
    address: &str,
    metadata: &[(&str, &str)],
) {
    let meta: serde_json::Map<String, serde_json::Value> = metadata
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string())))
        .collect();
    let body = serde_json::json!({
        "name": service,
        "nodes": [{"id": id, "address": address, "metadata": meta}],
    });
    let reply = pillion_testkit::http::post_json(&sidecar.url("/registry"), &body.to_string())
        .await
        .expect("POST /registry");
    assert_eq!(reply.status, 200, "{}", reply.text());
}

/// A `pillion run` with an inbound proxy on a free port in front of `app`, plus the
/// given flags; returns the sidecar and the inbound address.
pub fn inbound(app: &str, args: &[&str]) -> (Sidecar, SocketAddr) {
    let mut all = vec!["--listen", "127.0.0.1:0", "--app", app];
    all.extend_from_slice(args);
    let sc = Sidecar::start(&all);
    let listen = sc.ready["listen"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .expect("the ready file names the inbound proxy's address");
    (sc, listen)
}

/// A new mesh CA, made by `pillion mesh init` in a directory of its own; returns the
/// directory (with `ca.crt` and `ca.key`).
pub fn mesh_ca(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("pillion-mesh-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (code, _, err) = run_to_end(&["mesh", "init", "--out", dir.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    dir
}

/// The flags that put a sidecar in the mesh of `ca` as `service`.
pub fn mesh_flags(ca: &std::path::Path, service: &str) -> Vec<String> {
    vec![
        "--mesh-ca-cert".into(),
        ca.join("ca.crt").display().to_string(),
        "--mesh-ca-key".into(),
        ca.join("ca.key").display().to_string(),
        "--server-name".into(),
        service.into(),
    ]
}

/// A sidecar whose app `service` at `app` takes mesh calls on a free port, in a
/// cluster of its own others join at `gossip`.
pub struct MeshReceiver {
    pub sidecar: Sidecar,
    pub gossip: u16,
    pub mesh: SocketAddr,
}

pub fn mesh_receiver(
    ca: &std::path::Path,
    service: &str,
    app: SocketAddr,
    extra: &[&str],
) -> MeshReceiver {
    mesh_receiver_as(mesh_flags(ca, service), app, extra)
}

/// [`mesh_receiver`] with its identity given by `identity` (the mesh flags).
pub fn mesh_receiver_as(identity: Vec<String>, app: SocketAddr, extra: &[&str]) -> MeshReceiver {
    let mesh: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let gossip = pillion_testkit::free_udp_port();
    let mut args = identity;
    args.extend([
        "--handler".into(),
        "proxy".into(),
        "--server-address".into(),
        app.to_string(),
        "--mesh-listen".into(),
        mesh.to_string(),
    ]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let bind = format!("127.0.0.1:{gossip}");
    let sidecar = Sidecar::start_with_env(&refs, &[("PILLION_CLUSTER_BIND", &bind)]);
    assert!(wait_for_port(mesh, Duration::from_secs(10)));
    MeshReceiver {
        sidecar,
        gossip,
        mesh,
    }
}

/// A calling sidecar (`--handler proxy`) joined to `receiver`'s cluster, in the mesh
/// as `service` when `ca` is given; returns once it sees `target` registered.
pub async fn mesh_caller(
    receiver: &MeshReceiver,
    ca: Option<(&std::path::Path, &str)>,
    target: &str,
) -> Sidecar {
    mesh_caller_with(receiver, ca, target, &[]).await
}

/// [`mesh_caller`] with more flags.
pub async fn mesh_caller_with(
    receiver: &MeshReceiver,
    ca: Option<(&std::path::Path, &str)>,
    target: &str,
    extra: &[&str],
) -> Sidecar {
    let mut args = vec![
        "--handler".to_string(),
        "proxy".into(),
        "--cluster-join".into(),
        format!("127.0.0.1:{}", receiver.gossip),
    ];
    if let Some((ca, service)) = ca {
        args.extend(mesh_flags(ca, service));
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let caller = Sidecar::start(&refs);
    assert!(
        eventually(Duration::from_secs(10), || async {
            !node_ids(&caller, target).await.is_empty()
        })
        .await,
        "the caller never saw {target} registered"
    );
    caller
}

/// Asks `addr` to switch protocols on `path` (the test app's `Upgrade: echo`) and
/// checks that bytes come back through the tunnel.
pub fn assert_upgrade_echoes(addr: SocketAddr, path: &str, payload: &[u8]) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n"
    )
    .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = s.read(&mut buf).unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s.write_all(payload).unwrap();
    let mut echoed = vec![0u8; payload.len()];
    s.read_exact(&mut echoed).unwrap();
    assert_eq!(echoed, payload);
}

/// A gRPC-shaped call (h2c prior knowledge) to `addr` on `path`: the status and the
/// test app's JSON echo.
pub async fn grpc_call(addr: SocketAddr, path: &str) -> (http::StatusCode, serde_json::Value) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake::<_, http_body_util::Full<bytes::Bytes>>(hyper_util::rt::TokioIo::new(
                stream,
            ))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post(format!("http://{addr}{path}"))
        .header("te", "trailers")
        .header("content-type", "application/grpc")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            b"\0\0\0\0\0",
        )))
        .unwrap();
    let res = sender.send_request(req).await.unwrap();
    let status = res.status();
    let body = http_body_util::BodyExt::collect(res.into_body())
        .await
        .unwrap()
        .to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or_default())
}

/// The node's `consecutive_failures` in `/statusz`.
pub async fn failures(sc: &Sidecar, service: &str) -> u64 {
    let status = pillion_testkit::http::get(&sc.url("/statusz"))
        .await
        .unwrap()
        .json();
    let svc = status["invoke"]["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == service)
        .cloned()
        .unwrap_or_else(|| panic!("{service} not in /statusz: {status}"));
    svc["nodes"][0]["consecutive_failures"].as_u64().unwrap()
}

/// The statuses of every answer in `raw`, in order.
pub fn statuses(raw: &str) -> Vec<&str> {
    raw.match_indices("HTTP/1.1 ")
        .map(|(i, _)| &raw[i + 9..i + 12])
        .filter(|code| code.bytes().all(|b| b.is_ascii_digit()))
        .collect()
}

/// An HTTP server on a loopback port that answers every request with one document,
/// whose headers and body the test changes at will: a JWKS URL, a health path.
pub struct Document {
    pub addr: SocketAddr,
    content: std::sync::Arc<std::sync::Mutex<Content>>,
    task: tokio::task::JoinHandle<()>,
}

/// What a [`Document`] answers.
#[derive(Clone, Default)]
struct Content {
    headers: Vec<(String, String)>,
    body: bytes::Bytes,
}

impl Document {
    pub async fn serve(headers: &[(&str, &str)], body: impl Into<bytes::Bytes>) -> Document {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let content = std::sync::Arc::new(std::sync::Mutex::new(Content::default()));
        let served = content.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let served = served.clone();
                let answer = hyper::service::service_fn(move |_req| {
                    let Content { headers, body } = served.lock().unwrap().clone();
                    let mut res = http::Response::new(http_body_util::Full::new(body));
                    for (k, v) in headers {
                        res.headers_mut().append(
                            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                            v.parse().unwrap(),
                        );
                    }
                    async move { Ok::<_, std::convert::Infallible>(res) }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), answer),
                );
            }
        });
        let document = Document {
            addr,
            content,
            task,
        };
        document.set(headers, body);
        document
    }

    /// What the next requests get.
    pub fn set(&self, headers: &[(&str, &str)], body: impl Into<bytes::Bytes>) {
        let headers = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        *self.content.lock().unwrap() = Content {
            headers,
            body: body.into(),
        };
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Document {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The test app reachable both ways a client meets pillion's HTTP: called by name on
/// the API (`--handler proxy`, service `app`) and through `--listen`.
pub struct BothListeners {
    pub app: pillion_testkit::TestApp,
    pub sc: Sidecar,
    pub listen: SocketAddr,
}

impl BothListeners {
    pub async fn start() -> BothListeners {
        let app = pillion_testkit::TestApp::start("app").await;
        let (sc, listen) = inbound(&app.url(), &["--handler", "proxy"]);
        register(&sc, "app", "app-1", &app.addr().to_string(), &[]).await;
        BothListeners { app, sc, listen }
    }

    /// Each listener with the path that reaches the app's `/x` through it.
    pub fn paths(&self) -> [(SocketAddr, &'static str); 2] {
        [(self.sc.addr, "/app/x"), (self.listen, "/x")]
    }
}

/// A self-signed certificate for `names` valid from `from` to `to` (UTC dates),
/// written over `dir`'s server.pem and server.key, key first.
pub fn self_signed(dir: &std::path::Path, names: &[&str], from: (i32, u8, u8), to: (i32, u8, u8)) {
    let mut params =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    params.not_before = rcgen::date_time_ymd(from.0, from.1, from.2);
    params.not_after = rcgen::date_time_ymd(to.0, to.1, to.2);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
    std::fs::write(dir.join("server.pem"), cert.pem()).unwrap();
}

/// `go` with its caches in `dir` and no module lookups (the programs use the
/// standard library only; Debian's golang-go, which scripts/test installs).
pub fn go(dir: &std::path::Path) -> Command {
    let mut cmd = Command::new("go");
    cmd.env("GOCACHE", dir.join("cache"))
        .env("GOPATH", dir.join("path"))
        .env("GO111MODULE", "off")
        .env("GOFLAGS", "")
        .env("GOPROXY", "off")
        .current_dir(dir);
    cmd
}

/// The program at `source` (standard library only), built once per test process;
/// the path of its binary.
#[allow(dead_code)]
pub fn go_build(source: &str) -> std::path::PathBuf {
    let dir = go_dir();
    let stem = std::path::Path::new(source)
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("program");
    let bin = dir.join(format!("{stem}-{}", std::process::id()));
    let out = go(&dir)
        .args(["build", "-o"])
        .arg(&bin)
        .arg(source)
        .output()
        .expect("running go build (Debian's golang-go; scripts/test installs it)");
    assert!(
        out.status.success(),
        "go build {source} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    bin
}

/// Where [`go`] keeps its caches: shared by runs so the standard library is compiled
/// once (go's cache is safe for concurrent use).
pub fn go_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join("pillion-go-micro");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The session id a response's Set-Cookie gives, if any.
pub fn issued(reply: &pillion_testkit::http::Reply) -> Option<String> {
    reply
        .headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| v.strip_prefix("session="))
        .map(|v| v.split(';').next().unwrap_or("").to_string())
}

/// A TLS client trusting the given CAs (PEM files), offering `alpn`.
pub fn tls_connector(cas: &[&std::path::Path], alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::pem::PemObject;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        roots
            .add(rustls::pki_types::CertificateDer::from_pem_file(ca).unwrap())
            .unwrap();
    }
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
}

/// `go run PROGRAM ARGS` (standard library only): its output, trimmed.
pub fn go_run(program: &str, args: &[&str]) -> String {
    let out = go(&go_dir())
        .args(["run", program])
        .args(args)
        .output()
        .expect("running go (Debian's golang-go; scripts/test installs it)");
    assert!(
        out.status.success(),
        "go run {program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}
