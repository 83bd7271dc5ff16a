//! `/dashboard` as a person sees it: a real sidecar with services, calls by name
//! (answered, refused by the node, failed by the sidecar), broker subscribers, a
//! session and a TCP listener, rendered by headless Chromium; the DOM must show what
//! the test caused, and screenshots at desktop and phone widths stay under `target/`.
//! With `--api-token` the page asks for the token instead of showing nothing, and a
//! page whose sidecar went away says so.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{eventually, register, Sidecar};
use http::Method;
use pillion_testkit::app::{Mode, TestApp};
use pillion_testkit::tcp::{Reply as TcpReply, TcpBackend};
use pillion_testkit::{free_port, wait_for_port};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CHROMIUM: &str = "/usr/bin/chromium";
/// How long one Chromium run may take before it is killed and the test fails.
const CHROMIUM_LIMIT: Duration = Duration::from_secs(60);
const WINDOW_MS: u64 = 5000;

/// The workspace's `target/` (or `$CARGO_TARGET_DIR`), where screenshots stay.
/// Chromium without a window, a sandbox, a GPU or any traffic of its own.
const HEADLESS: [&str; 9] = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
];

fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"),
    }
}

/// Runs headless Chromium on `url` with `mode` (`--dump-dom` or `--screenshot=F`) at
/// `size`; returns what it printed. A fresh profile each time; killed after
/// [`CHROMIUM_LIMIT`]. Runs off the runtime, so the test's servers keep answering.
async fn chromium(url: String, size: &str, mode: String, extra: &[&str]) -> String {
    let size = size.to_string();
    let extra: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let profile = tempdir("chromium-profile");
        let out_file = profile.with_extension("out");
        let mut child = Command::new(CHROMIUM)
            .args(HEADLESS)
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(format!("--window-size={size}"))
            // One poll of the data (at load): the next would come at 2 s.
            .arg("--virtual-time-budget=1500")
            .args(&extra)
            .arg(&mode)
            .arg(&url)
            .stdout(std::fs::File::create(&out_file).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {CHROMIUM} (apt-get install chromium): {e}"));
        let deadline = Instant::now() + CHROMIUM_LIMIT;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "chromium {mode} {url} failed: {status}");
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("chromium {mode} {url} did not finish within {CHROMIUM_LIMIT:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = std::fs::read_to_string(&out_file).unwrap_or_default();
        let _ = std::fs::remove_dir_all(&profile);
        let _ = std::fs::remove_file(&out_file);
        out
    })
    .await
    .unwrap()
}

async fn dump_dom(url: String, size: &str) -> String {
    chromium(url, size, "--dump-dom".into(), &[]).await
}

async fn screenshot(url: String, size: &str, file: &Path) {
    let _ = std::fs::remove_file(file);
    chromium(url, size, format!("--screenshot={}", file.display()), &[]).await;
    let len = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    assert!(
        len > 10_000,
        "no screenshot at {} ({len} bytes)",
        file.display()
    );
}

/// A new directory, never one used before in this process: a Chromium that has just
/// exited may leave helper processes that still hold its profile's lock, and a
/// profile directory used again would then be "in use" (Chromium's exit status 21).
fn tempdir(name: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "pillion-dashboard-{}-{name}-{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The `<tr>` whose attribute `attr` is `value`, as Chromium serialised it.
fn row<'a>(dom: &'a str, attr: &str, value: &str) -> &'a str {
    let key = format!(" {attr}=\"{value}\"");
    let at = dom
        .find(&key)
        .unwrap_or_else(|| panic!("no row with{key} in the page:\n{dom}"));
    let start = dom[..at].rfind("<tr").expect("a row");
    let end = dom[start..].find("</tr>").map_or(dom.len(), |e| start + e);
    &dom[start..end]
}

/// The text of the cell marked `data-k="k"` (a `<td>` or `<dd>`) in `html`.
fn cell<'a>(html: &'a str, k: &str) -> &'a str {
    let key = format!("data-k=\"{k}\"");
    let at = html
        .find(&key)
        .unwrap_or_else(|| panic!("no cell {key} in:\n{html}"));
    let open = at + html[at..].find('>').unwrap() + 1;
    let close = open + html[open..].find("</").unwrap();
    &html[open..close]
}

async fn call(sc: &Sidecar, path: &str) -> u16 {
    pillion_testkit::http::request(
        Method::POST,
        &sc.url(path),
        &[("content-type", "application/json")],
        "{}",
    )
    .await
    .expect("a call by name")
    .status
    .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dashboard_shows_what_the_sidecar_did() {
    let greeter = TestApp::start("greeter").await;
    let orders = TestApp::start("orders").await;
    orders.set_mode(Mode::Status(404));
    let web = TestApp::start("web").await;
    let db = TcpBackend::start("db", TcpReply::Echo).await;
    let tcp_listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let inbound: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let dir = tempdir("config");
    let config = dir.join("pillion.toml");
    std::fs::write(
        &config,
        format!(
            "[[tcp]]\nlisten = \"{tcp_listen}\"\n[[tcp.tiers]]\ntargets = [\"{}\"]\n",
            db.addr()
        ),
    )
    .unwrap();
    let sc = Sidecar::start(&[
        "--config",
        config.to_str().unwrap(),
        "--listen",
        &inbound.to_string(),
        "--app",
        &web.url(),
    ]);
    assert!(wait_for_port(tcp_listen, Duration::from_secs(10)));
    assert!(wait_for_port(inbound, Duration::from_secs(10)));

    register(
        &sc,
        "greeter",
        "greeter-1",
        &greeter.addr().to_string(),
        &[("zone", "eu-1a")],
    )
    .await;
    register(&sc, "orders", "orders-1", &orders.addr().to_string(), &[]).await;
    // A node nobody listens on: the sidecar answers those calls itself.
    let gone = format!("127.0.0.1:{}", free_port());
    register(&sc, "ghost", "ghost-1", &gone, &[]).await;

    // Two subscribers (they get four messages in the window, below).
    let url = format!("ws://{}/broker?topic=events.orders", sc.addr);
    let (_sub1, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let (_sub2, _) = tokio_tungstenite::connect_async(&url).await.unwrap();

    // One connection through the TCP listener, one session through --listen.
    let mut conn = tokio::net::TcpStream::connect(tcp_listen).await.unwrap();
    let mut greeting = [0u8; 3];
    conn.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting, b"db\n");
    drop(conn);
    let reply = pillion_testkit::http::get(&format!("http://{inbound}/?h=X-Session-Set-User:42"))
        .await
        .unwrap();
    assert_eq!(reply.status, 200);

    // The calls, all inside one 5-second window of the wall clock.
    let window_end = start_of_a_window().await;
    for _ in 0..7 {
        assert_eq!(call(&sc, "/greeter/Say.Hello").await, 200);
    }
    for _ in 0..3 {
        assert_eq!(call(&sc, "/orders/Orders.Get").await, 404);
    }
    for _ in 0..2 {
        let status = call(&sc, "/ghost/Ghost.Haunt").await;
        assert!(status >= 500, "{status}");
    }
    let haunted = Instant::now();
    for i in 0..4 {
        let reply = pillion_testkit::http::request(
            Method::POST,
            &sc.url("/broker?topic=events.orders"),
            &[],
            format!("order {i}"),
        )
        .await
        .unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    window_closed(&sc, window_end).await;

    // The page pinned to the calls' window (kept for a minute), as a click on its bar
    // does, so however long Chromium takes to start, it shows these calls.
    let page = sc.url(&format!("/dashboard?window={window_end}"));
    let shots = target_dir();
    std::fs::create_dir_all(&shots).unwrap();
    let (desktop, phone) = (
        shots.join("dashboard-1280.png"),
        shots.join("dashboard-390.png"),
    );
    let (dom, (), ()) = tokio::join!(
        dump_dom(page.clone(), "1280,900"),
        screenshot(page.clone(), "1280,900", &desktop),
        screenshot(page, "390,844", &phone),
    );
    assert!(dom.contains("data-state=\"live\""), "{dom}");
    assert!(
        dom.contains(&format!("data-end=\"{window_end}\"")) && dom.contains("(pinned"),
        "the calls table shows the pinned window: {dom}"
    );

    let calls = row(&dom, "data-service", "greeter");
    assert_eq!(cell(calls, "2xx"), "7");
    assert_eq!(cell(calls, "4xx"), "0");
    assert_eq!(cell(calls, "total"), "7");
    assert!(cell(calls, "p50").ends_with(" ms"), "{calls}");
    assert!(cell(calls, "p99").ends_with(" ms"), "{calls}");
    let calls = row(&dom, "data-service", "orders");
    assert_eq!(cell(calls, "4xx"), "3");
    assert_eq!(cell(calls, "2xx"), "0");
    assert_eq!(cell(calls, "sidecar"), "0", "the node answered 404 itself");
    let calls = row(&dom, "data-service", "ghost");
    assert_eq!(cell(calls, "5xx"), "2");
    assert_eq!(
        cell(calls, "sidecar"),
        "2",
        "no node answered: the sidecar did"
    );

    let node = row(&dom, "data-node", "greeter-1");
    assert_eq!(cell(node, "address"), greeter.addr().to_string());
    assert_eq!(cell(node, "health"), "ok");
    assert_eq!(cell(node, "tier"), "0");
    assert_eq!(cell(node, "zone"), "eu-1a");
    assert!(cell(node, "latency").ends_with(" ms"), "{node}");
    let node = row(&dom, "data-node", "ghost-1");
    assert_eq!(cell(node, "address"), gone);
    let health = cell(node, "health");
    // Its six failed attempts ejected it for 10 s: after those, with no attempt since,
    // the balancer has it as healthy again.
    assert!(
        health == "failing"
            || health.starts_with("ejected")
            || (health == "ok" && haunted.elapsed() > Duration::from_secs(9)),
        "{node}"
    );
    assert_eq!(cell(node, "latency"), "–", "it never answered: {node}");

    let topic = row(&dom, "data-topic", "events.orders");
    assert_eq!(cell(topic, "subscribers"), "2");
    assert_eq!(cell(topic, "published"), "4");
    assert_eq!(
        cell(topic, "delivered"),
        "8",
        "four messages to each of two"
    );
    assert_eq!(cell(topic, "published_per_sec"), "0.8", "four in 5 s");
    assert_eq!(cell(topic, "delivered_per_sec"), "1.6");

    let tcp = row(&dom, "data-listen", &tcp_listen.to_string());
    assert_eq!(cell(tcp, "backend"), db.addr().to_string());
    assert_eq!(cell(tcp, "tier"), "0");
    assert_eq!(cell(tcp, "state"), "up");
    assert_eq!(
        cell(tcp, "connections"),
        db.accepted().to_string(),
        "every connection the backend took came through the listener"
    );

    assert_eq!(cell(&dom, "store"), "memory");
    assert_eq!(cell(&dom, "store health"), "healthy");
    assert_eq!(cell(&dom, "sessions created"), "1");

    let statusz = pillion_testkit::http::get(&sc.url("/statusz"))
        .await
        .unwrap()
        .json();
    let gossip = statusz["cluster"]["gossip"].as_str().unwrap();
    let member = row(&dom, "data-member", gossip);
    assert!(cell(member, "role").starts_with("this sidecar"), "{member}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_the_page_asks_for_it_and_the_data_needs_it() {
    let token = "dash-token-0123456789";
    let sc = Sidecar::start(&["--api-token", token]);
    let page = pillion_testkit::http::get(&sc.url("/dashboard"))
        .await
        .unwrap();
    assert_eq!(page.status, 200, "the page holds no data: no token needed");
    let csp = page.headers["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    let data = pillion_testkit::http::get(&sc.url("/dashboard/data"))
        .await
        .unwrap();
    assert_eq!(data.status, 401, "{}", data.text());
    let bearer = format!("Bearer {token}");
    let data = pillion_testkit::http::request(
        Method::GET,
        &sc.url("/dashboard/data"),
        &[("authorization", &bearer)],
        "",
    )
    .await
    .unwrap();
    assert_eq!(data.status, 200, "{}", data.text());
    assert!(data.json()["dashboard"]["services"].is_array());

    let dom = dump_dom(sc.url("/dashboard"), "1280,900").await;
    assert!(
        dom.contains("<form id=\"login\">"),
        "the token form shows:\n{dom}"
    );
    assert!(dom.contains("data-state=\"locked\">token needed<"), "{dom}");
    assert!(
        dom.contains("<main id=\"content\" hidden"),
        "no empty tables:\n{dom}"
    );
}

/// The API over HTTPS (`--api-tls-cert`): the page, its script and its data load under
/// the same CSP, and the page is live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_works_over_https() {
    let dir = tempdir("dashboard-https");
    std::fs::create_dir_all(&dir).unwrap();
    pillion_testkit::make_certificates(&dir);
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let (cert, key) = (dir.join("server.pem"), dir.join("server.key"));
    let _sc = Sidecar::start_at(
        addr,
        &[
            "--api-tls-cert",
            cert.to_str().unwrap(),
            "--api-tls-key",
            key.to_str().unwrap(),
            "--server-name",
            "secure-web",
            "--server-address",
            "127.0.0.1:9",
        ],
        &[],
    );
    let url = format!("https://localhost:{}/dashboard", addr.port());
    // The test's own CA is not the system's: Chromium is told to take it.
    let dom = chromium(
        url,
        "1280,900",
        "--dump-dom".into(),
        &["--ignore-certificate-errors"],
    )
    .await;
    assert!(
        dom.contains("data-state=\"live\""),
        "the page is live over HTTPS:\n{dom}"
    );
    assert!(
        dom.contains("data-service=\"secure-web\""),
        "the registered app shows:\n{dom}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Serves the page's three files as the sidecar did, then fails every fetch of the
/// data the way a sidecar that went away does (the connection closes unanswered).
async fn serve_page_without_sidecar(assets: Vec<(String, String, Vec<u8>)>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let assets = assets.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head);
                let path = head.split(' ').nth(1).unwrap_or("");
                let Some((_, kind, body)) = assets.iter().find(|(p, _, _)| p == path) else {
                    return; // the data: no answer
                };
                let res = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: {kind}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = conn.write_all(res.as_bytes()).await;
                let _ = conn.write_all(body).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_whose_sidecar_went_away_says_disconnected() {
    let sc = Sidecar::start(&[]);
    let mut assets = Vec::new();
    for path in ["/dashboard", "/dashboard/app.js", "/dashboard/style.css"] {
        let reply = pillion_testkit::http::get(&sc.url(path)).await.unwrap();
        assert_eq!(reply.status, 200, "{path}");
        let kind = reply.headers["content-type"].to_str().unwrap().to_string();
        assets.push((path.to_string(), kind, reply.body.to_vec()));
    }
    drop(sc);
    let addr = serve_page_without_sidecar(assets).await;
    let dom = dump_dom(format!("http://{addr}/dashboard"), "1280,900").await;
    assert!(dom.contains("data-state=\"down\">disconnected<"), "{dom}");
    assert!(dom.contains("retrying every 2 s"), "{dom}");
}

/// A Chromium at `size` showing `url`, driven through the DevTools protocol; killed
/// (and its profile removed) on drop.
struct Browser {
    child: std::process::Child,
    profile: PathBuf,
    port: u16,
}

impl Browser {
    fn open(url: &str, size: &str) -> Browser {
        let profile = tempdir("chromium-cdp");
        let child = Command::new(CHROMIUM)
            .args(HEADLESS)
            .args([
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(format!("--window-size={size}"))
            .arg(url)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {CHROMIUM} (apt-get install chromium): {e}"));
        let mut browser = Browser {
            child,
            profile,
            port: 0,
        };
        // Chromium writes the port it took once it listens.
        let active = browser.profile.join("DevToolsActivePort");
        let deadline = Instant::now() + CHROMIUM_LIMIT;
        while browser.port == 0 {
            let text = std::fs::read_to_string(&active).unwrap_or_default();
            if let Some(port) = text.lines().next().and_then(|l| l.trim().parse().ok()) {
                browser.port = port;
            } else if Instant::now() > deadline {
                panic!(
                    "chromium never listened for DevTools ({})",
                    active.display()
                );
            } else if let Some(status) = browser.child.try_wait().unwrap() {
                panic!("chromium exited: {status}");
            } else {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        browser
    }

    /// The value of `expression` (which may be a promise) in the page showing a path
    /// that starts with `path`, as JSON, after the DevTools `commands` (method,
    /// params); retried until the page is there.
    async fn evaluate(
        &self,
        path: &str,
        commands: &[(&str, serde_json::Value)],
        expression: &str,
    ) -> serde_json::Value {
        use futures_util::{SinkExt, StreamExt};
        let deadline = Instant::now() + CHROMIUM_LIMIT;
        let mut last = String::new();
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let list = format!("http://127.0.0.1:{}/json/list", self.port);
            let Ok(reply) = pillion_testkit::http::get(&list).await else {
                continue;
            };
            let targets = reply.json();
            let Some(ws) = targets.as_array().into_iter().flatten().find_map(|t| {
                let url = t["url"].as_str()?;
                let at = url.find("://")? + 3;
                let shown = &url[at + url[at..].find('/')?..];
                (t["type"] == "page" && shown.starts_with(path))
                    .then(|| t["webSocketDebuggerUrl"].as_str())
                    .flatten()
            }) else {
                last = format!("no page at {path} yet: {targets}");
                continue;
            };
            let Ok((mut socket, _)) = tokio_tungstenite::connect_async(ws).await else {
                continue;
            };
            let evaluate = serde_json::json!({
                "expression": expression, "awaitPromise": true, "returnByValue": true,
            });
            let all = commands
                .iter()
                .cloned()
                .chain([("Runtime.evaluate", evaluate)]);
            let mut answer = serde_json::Value::Null;
            for (id, (method, params)) in all.enumerate() {
                let ask = serde_json::json!({ "id": id, "method": method, "params": params });
                if socket.send(ask.to_string().into()).await.is_err() {
                    break;
                }
                answer = serde_json::Value::Null;
                while let Some(Ok(msg)) = socket.next().await {
                    let Ok(text) = msg.to_text() else { continue };
                    let got: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
                    if got["id"] == id {
                        answer = got;
                        break;
                    }
                }
                if !answer["error"].is_null() {
                    break;
                }
            }
            let value = &answer["result"]["result"]["value"];
            if answer["result"]["exceptionDetails"].is_null() && !value.is_null() {
                return value.clone();
            }
            last = answer.to_string();
        }
        panic!("no answer to {expression} in chromium: {last}");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// Waits until 200 ms into a 5-second window of the wall clock, so calls made now fall
/// in one window; returns where the window ends (unix ms).
async fn start_of_a_window() -> u64 {
    let into_window = unix_ms() % WINDOW_MS;
    if !(200..2000).contains(&into_window) {
        tokio::time::sleep(Duration::from_millis(WINDOW_MS - into_window + 200)).await;
    }
    (unix_ms() / WINDOW_MS + 1) * WINDOW_MS
}

/// Waits until the dashboard's data has closed the window ending at `window_end`.
async fn window_closed(sc: &Sidecar, window_end: u64) {
    assert!(
        unix_ms() < window_end,
        "the calls took longer than their window; the machine is too slow for this test"
    );
    let data_url = sc.url("/dashboard/data");
    assert!(
        eventually(Duration::from_secs(12), || async {
            let data = pillion_testkit::http::get(&data_url).await.unwrap().json();
            data["dashboard"]["last_window_end_ms"].as_u64() >= Some(window_end)
        })
        .await,
        "the window of the calls never closed"
    );
}

/// The value of `pillion_invoke_requests_total` for `service` and `class` in
/// `/metrics` (0 when the series is not there).
async fn requests_total(sc: &Sidecar, service: &str, class: &str) -> u64 {
    let metrics = pillion_testkit::http::get(&sc.url("/metrics"))
        .await
        .unwrap()
        .text();
    let series =
        format!("pillion_invoke_requests_total{{service=\"{service}\",class=\"{class}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0, |n| n.trim().parse().unwrap())
}

async fn deregister(sc: &Sidecar, service: &str, id: &str, address: &str) {
    let body = serde_json::json!({ "name": service, "nodes": [{ "id": id, "address": address }] });
    let reply = pillion_testkit::http::request(
        Method::DELETE,
        &sc.url("/registry"),
        &[("content-type", "application/json")],
        body.to_string(),
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
}

/// Issue 28, item 3.1: calls to a service whose last node went are answered 404 by
/// the sidecar, and those are its errors, in `/metrics` and on its row, which stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_whose_last_node_went_keeps_its_row_with_its_errors() {
    let todos = TestApp::start("todos").await;
    let sc = Sidecar::start(&[]);
    register(&sc, "todos", "todos-1", &todos.addr().to_string(), &[]).await;

    let window_end = start_of_a_window().await;
    for _ in 0..2 {
        assert_eq!(call(&sc, "/todos/Todos.List").await, 200);
    }
    deregister(&sc, "todos", "todos-1", &todos.addr().to_string()).await;
    drop(todos);
    for _ in 0..3 {
        assert_eq!(call(&sc, "/todos/Todos.List").await, 404);
    }
    window_closed(&sc, window_end).await;

    assert_eq!(requests_total(&sc, "todos", "2xx").await, 2);
    assert_eq!(
        requests_total(&sc, "todos", "4xx").await,
        3,
        "the sidecar's 404s are the service's calls"
    );

    let dom = dump_dom(
        sc.url(&format!("/dashboard?window={window_end}")),
        "1280,900",
    )
    .await;
    let calls = row(&dom, "data-service", "todos");
    assert!(calls.contains("data-registered=\"false\""), "{calls}");
    assert_eq!(cell(calls, "unregistered"), "not registered");
    assert_eq!(cell(calls, "2xx"), "2");
    assert_eq!(cell(calls, "4xx"), "3");
    assert_eq!(cell(calls, "sidecar"), "3", "the sidecar answered the 404s");
    // The same numbers as /metrics.
    let total: u64 = cell(calls, "total").parse().unwrap();
    let mut in_metrics = 0;
    for class in ["1xx", "2xx", "3xx", "4xx", "5xx"] {
        in_metrics += requests_total(&sc, "todos", class).await;
    }
    assert_eq!(total, in_metrics);
    assert_eq!(total, 5);
    // Among the services and nodes: called, with no node.
    let node = row(&dom, "data-node", "");
    assert!(node.contains("data-service=\"todos\""), "{node}");
    assert_eq!(cell(node, "health"), "no node registered");
}

/// Issue 28, item 3.2: while `/healthz` is 503 the page says so in a red banner that
/// names each problem, and its badge is no green "live".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_names_each_problem_healthz_names() {
    let mut redis = pillion_testkit::Server::redis();
    let app = TestApp::start("web").await;
    let (sc, _listen) = common::inbound(&app.url(), &["--session-store", &redis.url()]);
    let dom = dump_dom(sc.url("/dashboard"), "1280,900").await;
    assert!(dom.contains("data-state=\"live\""), "{dom}");
    assert!(
        dom.contains("<div id=\"health\" class=\"banner\" role=\"alert\" hidden"),
        "no banner while healthy: {dom}"
    );

    redis.kill();
    let healthz = sc.url("/healthz");
    assert!(
        eventually(Duration::from_secs(10), || async {
            pillion_testkit::http::get(&healthz).await.unwrap().status == 503
        })
        .await,
        "/healthz never said the store is down"
    );
    let reply = pillion_testkit::http::get(&healthz).await.unwrap();
    let error = reply.json()["error"].as_str().unwrap().to_string();
    assert!(error.starts_with("session store: "), "{error}");
    let data = pillion_testkit::http::get(&sc.url("/dashboard/data"))
        .await
        .unwrap()
        .json();
    assert_eq!(data["health"]["code"], 503, "{}", data["health"]);
    assert_eq!(data["health"]["status"], "unavailable");
    let problems: Vec<&str> = data["health"]["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(problems.join("; "), error, "the problems /healthz names");

    let shot = target_dir().join("dashboard-unhealthy.png");
    let (dom, ()) = tokio::join!(
        dump_dom(sc.url("/dashboard"), "1280,900"),
        screenshot(sc.url("/dashboard"), "1280,900", &shot),
    );
    assert!(
        dom.contains("data-state=\"unhealthy\">unhealthy<"),
        "the badge is not a green live: {dom}"
    );
    let at = dom.find("<div id=\"health\"").expect("the banner");
    let banner = &dom[at..at + dom[at..].find("</div>").unwrap()];
    assert!(!banner.contains(" hidden"), "the banner shows: {banner}");
    assert!(banner.contains("/healthz answers 503"), "{banner}");
    assert!(banner.contains("<li>session store: "), "{banner}");
    assert!(
        cell(&dom, "store health").starts_with("unreachable: "),
        "the sessions say the same: {dom}"
    );
}

/// Issue 28, item 3.3: every member of the cluster with its name, API and gossip
/// addresses, state and age; a killed one stays, marked failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_member_stays_in_the_list_as_failed() {
    let rendezvous = format!("127.0.0.1:{}", pillion_testkit::free_udp_port());
    let env = [("PILLION_CLUSTER_BIND", rendezvous.as_str())];
    let start = |name: &str| {
        Sidecar::start_with_env(
            &["--server-name", name, "--server-address", "127.0.0.1:9"],
            &env,
        )
    };
    let users = start("users");
    let mut todos = start("todos");
    let statusz = |sc: &Sidecar| {
        let url = sc.url("/statusz");
        async move { pillion_testkit::http::get(&url).await.unwrap().json() }
    };
    let gossip = statusz(&todos).await["cluster"]["gossip"]
        .as_str()
        .unwrap()
        .to_string();
    let state_of_todos = || async {
        statusz(&users).await["cluster"]["members"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["gossip"] == gossip.as_str())
            .map(|m| m["state"].as_str().unwrap_or("").to_string())
    };
    assert!(
        eventually(Duration::from_secs(10), || async {
            state_of_todos().await.as_deref() == Some("alive")
        })
        .await,
        "the two sidecars never met"
    );

    todos.process.kill();
    assert!(
        eventually(Duration::from_secs(30), || async {
            state_of_todos().await.as_deref() == Some("failed")
        })
        .await,
        "users never had todos failed: {:?}",
        state_of_todos().await
    );
    let shot = target_dir().join("dashboard-members.png");
    let (dom, ()) = tokio::join!(
        dump_dom(users.url("/dashboard"), "1280,900"),
        screenshot(users.url("/dashboard"), "1280,900", &shot),
    );
    let member = row(&dom, "data-member", &gossip);
    assert_eq!(cell(member, "state"), "failed", "{member}");
    assert!(member.contains("class=\"gone\""), "marked: {member}");
    assert_eq!(cell(member, "name"), "todos");
    assert_eq!(cell(member, "api"), todos.addr.to_string());
    assert_eq!(cell(member, "member"), gossip);
    assert_eq!(cell(member, "role"), "peer");
    let age = cell(member, "age");
    assert!(age.ends_with(" s") || age.ends_with(" min"), "{member}");

    let me = statusz(&users).await["cluster"]["gossip"]
        .as_str()
        .unwrap()
        .to_string();
    let member = row(&dom, "data-member", &me);
    assert_eq!(cell(member, "state"), "alive");
    assert_eq!(cell(member, "name"), "users");
    assert_eq!(cell(member, "api"), users.addr.to_string());
    assert!(cell(member, "role").starts_with("this sidecar"), "{member}");
}

/// Issue 28, item 3.4: a node that refuses has no latency to show (the balancer's
/// 1 s penalty is no measurement), and is healthy again once it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_node_shows_no_latency_and_is_ok_once_it_answers() {
    let flaky = TestApp::start("flaky").await;
    let sc = Sidecar::start(&[]);
    register(&sc, "flaky", "flaky-1", &flaky.addr().to_string(), &[]).await;
    flaky.kill();
    assert_eq!(call(&sc, "/flaky/Flaky.Do").await, 503);

    let page = sc.url("/dashboard");
    let dom = dump_dom(page.clone(), "1280,900").await;
    let node = row(&dom, "data-node", "flaky-1");
    assert_eq!(cell(node, "latency"), "–", "nothing measured: {node}");
    assert_eq!(cell(node, "health"), "failing", "{node}");

    flaky.restart().await;
    assert_eq!(call(&sc, "/flaky/Flaky.Do").await, 200);
    let dom = dump_dom(page, "1280,900").await;
    let node = row(&dom, "data-node", "flaky-1");
    assert_eq!(cell(node, "health"), "ok", "it answered: {node}");
    assert_eq!(cell(node, "failures"), "0", "{node}");
    let latency = cell(node, "latency");
    let ms: f64 = latency
        .strip_suffix(" ms")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("a latency in ms: {node}"));
    assert!(
        ms < 500.0,
        "its answer on loopback, not the penalty of its refusal: {latency}"
    );
}

/// Issue 28, item 3.5: at phone width (390 px) the Health cell of a node is within
/// the viewport, measured in the page by Chromium.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_phone_width_a_node_s_health_is_on_screen() {
    let greeter = TestApp::start("greeter").await;
    let sc = Sidecar::start(&[]);
    // go-micro's node ids: the name and a UUID.
    let id = "greeter-4f9c2a1e-8d3b-4c6a-9e2f-7b1d0a5c3e88";
    register(
        &sc,
        "greeter",
        id,
        &greeter.addr().to_string(),
        &[("zone", "eu-1a")],
    )
    .await;
    assert_eq!(call(&sc, "/greeter/Say.Hello").await, 200);

    let browser = Browser::open(&sc.url("/dashboard"), "390,844");
    let measure = format!(
        r#"new Promise((resolve) => {{
          const deadline = Date.now() + 20000;
          (function look() {{
            const cell = document.querySelector('tr[data-node="{id}"] [data-k="health"]');
            if (cell && cell.textContent) {{
              const r = cell.getBoundingClientRect();
              resolve({{ left: r.left, right: r.right, width: r.width, text: cell.textContent,
                viewport: window.innerWidth,
                page: document.documentElement.scrollWidth }});
            }} else if (Date.now() > deadline) resolve(null);
            else setTimeout(look, 100);
          }})();
        }})"#
    );
    // A phone's screen, whatever size Chromium's headless window may take.
    let phone = (
        "Emulation.setDeviceMetricsOverride",
        serde_json::json!({ "width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": true }),
    );
    let at = browser.evaluate("/dashboard", &[phone], &measure).await;
    drop(browser);
    let n = |k: &str| at[k].as_f64().unwrap_or_else(|| panic!("{k} in {at}"));
    assert_eq!(at["text"], "ok", "{at}");
    assert_eq!(n("viewport"), 390.0, "a phone's width: {at}");
    assert!(n("width") > 0.0, "{at}");
    assert!(
        n("left") >= 0.0 && n("right") <= n("viewport"),
        "the health cell is on screen: {at}"
    );
    assert!(
        n("page") <= n("viewport"),
        "the page does not scroll sideways: {at}"
    );
}
