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
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
            ])
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
    let into_window = unix_ms() % WINDOW_MS;
    if !(200..2000).contains(&into_window) {
        tokio::time::sleep(Duration::from_millis(WINDOW_MS - into_window + 200)).await;
    }
    let window_end = (unix_ms() / WINDOW_MS + 1) * WINDOW_MS;
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
    assert!(
        health == "failing" || health.starts_with("ejected"),
        "{node}"
    );

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
