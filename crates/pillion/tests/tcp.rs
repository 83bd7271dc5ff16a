//! The TCP proxy with real sockets on loopback: tiered failover and failback,
//! max_connections, DNS expansion, hot reload (and what it must not do: act on an
//! emptied file, log an unchanged one), a gigabyte through splice, half-close, more
//! connections than the inherited soft open-file limit, bootstrap and graceful
//! shutdown.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use common::{eventually, run_to_end, Sidecar, BIN};
use pillion_testkit::dns::DnsServer;
use pillion_testkit::http::get;
use pillion_testkit::tcp::{Checksum, Reply, TcpBackend};
use pillion_testkit::{free_port, Daemon};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

fn config_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pillion-tcp-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("pillion.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn listen_addr() -> SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().unwrap()
}

/// Connects through the proxy and returns the stream and the name of the backend
/// that greeted it.
async fn greet(addr: SocketAddr) -> (BufReader<TcpStream>, String) {
    let stream = TcpStream::connect(addr).await.expect("the proxy accepts");
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line))
        .await
        .expect("a greeting in time")
        .expect("a greeting");
    (reader, line.trim().to_string())
}

async fn echo(conn: &mut BufReader<TcpStream>, text: &str) -> String {
    conn.get_mut()
        .write_all(format!("{text}\n").as_bytes())
        .await
        .unwrap();
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(5), conn.read_line(&mut line))
        .await
        .unwrap()
        .unwrap();
    line.trim().to_string()
}

/// Waits until the listener at `listen` is up and its connections (the readiness
/// probe's included) are all closed, so that counts start from zero.
async fn ready(sc: &Sidecar, listen: SocketAddr) {
    assert!(pillion_testkit::wait_for_port(
        listen,
        Duration::from_secs(5)
    ));
    let idle = eventually(Duration::from_secs(5), || async {
        let s = get(&sc.url("/statusz")).await.unwrap().json();
        s["tcp"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["active"] == 0)
    })
    .await;
    assert!(idle, "connections did not settle");
}

/// A `pillion run` on `config` whose log (stderr) goes to a file the test reads, and
/// whose soft open-file limit is `soft_nofile` when given (set by the shell, as a
/// service manager would).
fn start_logged(
    config: &std::path::Path,
    args: &[&str],
    rust_log: &str,
    soft_nofile: Option<u32>,
) -> (Sidecar, PathBuf) {
    let addr = listen_addr();
    let log = config.with_file_name("pillion.log");
    let mut cmd = std::process::Command::new("sh");
    let limit = soft_nofile.map_or(String::new(), |n| format!("ulimit -S -n {n} && "));
    cmd.arg("-c")
        .arg(format!("{limit}exec \"$0\" \"$@\""))
        .arg(BIN)
        .args(["run", "--address", &addr.to_string(), "--config"])
        .arg(config)
        .args(args)
        .env("RUST_LOG", rust_log)
        .stderr(std::fs::File::create(&log).unwrap());
    let process = Daemon::spawn("pillion", cmd);
    assert!(
        pillion_testkit::wait_for_port(addr, Duration::from_secs(10)),
        "pillion did not listen on {addr}: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    (Sidecar::adopt(process, addr), log)
}

/// The lines of the log that contain `text`.
fn log_lines(log: &std::path::Path, text: &str) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(text))
        .map(str::to_string)
        .collect()
}

fn start(config: &std::path::Path) -> Sidecar {
    Sidecar::start(&[
        "--config",
        config.to_str().unwrap(),
        "--reload-period",
        "100ms",
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tier_failover_and_failback() {
    let near = TcpBackend::start("near", Reply::Echo).await;
    let far = TcpBackend::start("far", Reply::Echo).await;
    let listen = listen_addr();
    let config = config_file(
        "failover",
        &format!(
            "[[tcp]]\nlisten = \"{listen}\"\nfailback_after = \"1s\"\ndown_for = \"300ms\"\n\
         [[tcp.tiers]]\ntargets = [\"{}\"]\n[[tcp.tiers]]\ntargets = [\"{}\"]\n",
            near.addr(),
            far.addr()
        ),
    );
    let sc = start(&config);
    ready(&sc, listen).await;
    assert_eq!(greet(listen).await.1, "near");

    near.kill();
    // No client error while tier 1 is reachable.
    let (mut moved, name) = greet(listen).await;
    assert_eq!(name, "far");
    for _ in 0..5 {
        assert_eq!(greet(listen).await.1, "far");
    }
    assert_eq!(echo(&mut moved, "still here").await, "still here");

    near.restart().await;
    let back = eventually(Duration::from_secs(5), || async {
        greet(listen).await.1 == "near"
    })
    .await;
    assert!(back, "new connections return to tier 0");

    // failback_after: the old connection on tier 1 is closed gracefully (EOF).
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), moved.read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(_))),
        "the tier-1 connection was closed for failback"
    );
    let status = get(&sc.url("/statusz")).await.unwrap().json();
    assert_eq!(status["tcp"][0]["listen"], listen.to_string());
    assert_eq!(
        status["tcp"][0]["tiers"][1]["backends"][0]["address"],
        far.addr().to_string()
    );
    let metrics = get(&sc.url("/metrics")).await.unwrap().text();
    assert!(
        metrics.contains(&format!(
            "pillion_tcp_dial_failures_total{{listen=\"{listen}\",backend=\"{}\",tier=\"0\"}}",
            near.addr()
        )),
        "{metrics}"
    );
}

/// A running listener whose first tier is a backend `small` with `max_connections`
/// = `max`, and whose second is a backend `spare`; `extra` is added to the
/// listener's settings.
async fn capped(
    name: &str,
    max: usize,
    extra: &str,
) -> (TcpBackend, TcpBackend, SocketAddr, Sidecar) {
    let small = TcpBackend::start("small", Reply::Echo).await;
    let spare = TcpBackend::start("spare", Reply::Echo).await;
    let listen = listen_addr();
    let config = config_file(
        name,
        &format!(
            "[[tcp]]\nlisten = \"{listen}\"\n{extra}[[tcp.tiers]]\ntargets = [\"{}\"]\n\
             max_connections = {max}\n[[tcp.tiers]]\ntargets = [\"{}\"]\n",
            small.addr(),
            spare.addr()
        ),
    );
    let sc = start(&config);
    ready(&sc, listen).await;
    (small, spare, listen, sc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_spills_to_the_next_tier() {
    let (_small, _spare, listen, _sc) = capped("spill", 1, "").await;
    let (first, a) = greet(listen).await;
    let (_second, b) = greet(listen).await;
    assert_eq!((a.as_str(), b.as_str()), ("small", "spare"));
    drop(first);
    assert!(
        eventually(Duration::from_secs(3), || async {
            greet(listen).await.1 == "small"
        })
        .await,
        "room again on tier 0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_holds_when_fifty_clients_arrive_together() {
    // No failback: its probe of a better tier that nothing proved up yet (small, while
    // the first dials to it are in flight and others spill to spare) is a connection
    // the backend would count.
    let (small, _spare, listen, sc) = capped("together", 2, "failback_after = \"0s\"\n").await;
    let before = small.accepted();
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..50 {
        clients.spawn(greet(listen));
    }
    let mut open = Vec::new();
    while let Some(client) = clients.join_next().await {
        open.push(client.expect("every client is greeted"));
    }
    let on_small = open.iter().filter(|(_, name)| name == "small").count();
    assert_eq!(open.len(), 50);
    assert!(
        (1..=2).contains(&on_small),
        "{on_small} connections on the backend with max_connections = 2"
    );
    assert!(
        small.accepted() - before <= 2,
        "the backend saw more than 2"
    );
    let status = get(&sc.url("/statusz")).await.unwrap().json();
    let small_active = status["tcp"][0]["tiers"][0]["backends"][0]["active"].clone();
    assert_eq!(small_active, on_small, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_listener_that_cannot_bind_makes_healthz_503_until_it_binds() {
    let backend = TcpBackend::start("one", Reply::Echo).await;
    let (good, busy) = (listen_addr(), listen_addr());
    let taken = std::net::TcpListener::bind(busy).unwrap();
    let listener = |at: SocketAddr| {
        format!(
            "[[tcp]]\nlisten = \"{at}\"\n[[tcp.tiers]]\ntargets = [\"{}\"]\n",
            backend.addr()
        )
    };
    let config = config_file("unbound", &listener(good));
    let sc = start(&config);
    ready(&sc, good).await;
    assert_eq!(get(&sc.url("/healthz")).await.unwrap().status, 200);

    std::fs::write(&config, listener(good) + &listener(busy)).unwrap();
    let unhealthy = eventually(Duration::from_secs(5), || async {
        get(&sc.url("/healthz")).await.unwrap().status == 503
    })
    .await;
    let health = get(&sc.url("/healthz")).await.unwrap();
    assert!(unhealthy, "{}", health.text());
    let error = health.json()["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        error.contains(&format!("tcp listener {busy}: cannot listen")),
        "{error}"
    );
    let status = get(&sc.url("/statusz")).await.unwrap().json();
    let entry = status["tcp"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["listen"] == busy.to_string())
        .cloned()
        .unwrap_or_default();
    assert!(
        entry["error"]
            .as_str()
            .is_some_and(|e| e.contains("cannot listen")),
        "{status}"
    );
    assert_eq!(greet(good).await.1, "one", "the other listener goes on");

    // Once the address is free, the next reload binds it and health comes back.
    drop(taken);
    sc.process.signal("HUP");
    assert!(
        eventually(Duration::from_secs(5), || async {
            get(&sc.url("/healthz")).await.unwrap().status == 200
        })
        .await,
        "{}",
        get(&sc.url("/healthz")).await.unwrap().text()
    );
    assert_eq!(greet(busy).await.1, "one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_with_two_addresses_is_two_backends_and_vanished_ones_drain() {
    let dns = DnsServer::start().await;
    let port = free_port();
    let a = TcpBackend::start_on(
        "a",
        Reply::Echo,
        format!("127.0.0.2:{port}").parse().unwrap(),
    )
    .await;
    let b = TcpBackend::start_on(
        "b",
        Reply::Echo,
        format!("127.0.0.3:{port}").parse().unwrap(),
    )
    .await;
    dns.set(
        "db.pillion.test",
        &["127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap()],
    );
    let listen = listen_addr();
    let config = config_file("dns", &format!(
        "dns_server = [\"{}\"]\n[[tcp]]\nlisten = \"{listen}\"\n[[tcp.tiers]]\ntargets = [\"db.pillion.test:{port}\"]\n",
        dns.addr()
    ));
    let sc = start(&config);
    ready(&sc, listen).await;
    let status = get(&sc.url("/statusz")).await.unwrap().json();
    let backends = status["tcp"][0]["tiers"][0]["backends"]
        .as_array()
        .unwrap()
        .clone();
    let addrs: Vec<&str> = backends
        .iter()
        .map(|b| b["address"].as_str().unwrap())
        .collect();
    assert_eq!(
        addrs,
        [format!("127.0.0.2:{port}"), format!("127.0.0.3:{port}")]
    );

    // Both get connections (fewest active, then round-robin).
    let first = greet(listen).await;
    let second = greet(listen).await;
    let mut names = [first.1.clone(), second.1.clone()];
    names.sort();
    assert_eq!(names, ["a", "b"]);
    let mut on_b = if first.1 == "b" { first.0 } else { second.0 };

    // b's address vanishes: no new connections to it, its open one goes on.
    dns.set("db.pillion.test", &["127.0.0.2".parse().unwrap()]);
    let drained = eventually(Duration::from_secs(5), || async {
        let s = get(&sc.url("/statusz")).await.unwrap().json();
        s["tcp"][0]["tiers"][0]["backends"]
            .as_array()
            .unwrap()
            .len()
            == 1
    })
    .await;
    assert!(drained, "the vanished address left the backend set");
    for _ in 0..4 {
        assert_eq!(greet(listen).await.1, "a");
    }
    assert_eq!(
        echo(&mut on_b, "drained, not cut").await,
        "drained, not cut"
    );
    drop((a, b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_a_listener_and_changes_tiers_without_harming_a_live_connection() {
    let one = TcpBackend::start("one", Reply::Echo).await;
    let two = TcpBackend::start("two", Reply::Echo).await;
    let (l1, l2) = (listen_addr(), listen_addr());
    let first = format!("[[tcp]]\nlisten = \"{l1}\"\n[[tcp.tiers]]\ntargets = [\"{}\"]\n[[tcp.tiers]]\ntargets = [\"{}\"]\n", one.addr(), two.addr());
    let config = config_file("reload", &first);
    let _sc = start(&config);
    assert!(pillion_testkit::wait_for_port(l1, Duration::from_secs(5)));
    let (mut live, name) = greet(l1).await;
    assert_eq!(name, "one");

    // Keep bytes flowing on the live connection while the file changes.
    let flow = tokio::spawn(async move {
        for i in 0..40 {
            assert_eq!(
                echo(&mut live, &format!("tick {i}")).await,
                format!("tick {i}")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        live
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Swap the tiers of l1 and add l2.
    let second = format!(
        "[[tcp]]\nlisten = \"{l1}\"\n[[tcp.tiers]]\ntargets = [\"{}\"]\n[[tcp.tiers]]\ntargets = [\"{}\"]\n\
         [[tcp]]\nlisten = \"{l2}\"\n[[tcp.tiers]]\ntargets = [\"{}\"]\n",
        two.addr(), one.addr(), one.addr()
    );
    std::fs::write(&config, second).unwrap();
    assert!(
        pillion_testkit::wait_for_port(l2, Duration::from_secs(5)),
        "the new listener starts"
    );
    assert_eq!(greet(l2).await.1, "one");
    assert!(
        eventually(Duration::from_secs(3), || async {
            greet(l1).await.1 == "two"
        })
        .await,
        "new connections follow the new tiers"
    );
    let mut live = flow.await.expect("the live connection kept flowing");
    assert_eq!(echo(&mut live, "after").await, "after");

    // An invalid file is reported and changes nothing.
    std::fs::write(&config, "[[tcp]]\nlisten = \"not an address\"\n").unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(greet(l2).await.1, "one", "the running configuration stays");
    assert_eq!(echo(&mut live, "still").await, "still");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gigabyte_arrives_byte_identical_and_half_close_works() {
    let echo_backend = TcpBackend::start("bulk", Reply::Echo).await;
    let counter = TcpBackend::start("counter", Reply::AfterEof).await;
    let (bulk, half) = (listen_addr(), listen_addr());
    let config = config_file(
        "bulk",
        &format!(
            "[[tcp]]\nlisten = \"{bulk}\"\n[[tcp.tiers]]\ntargets = [\"{}\"]\n\
         [[tcp]]\nlisten = \"{half}\"\n[[tcp.tiers]]\ntargets = [\"{}\"]\n",
            echo_backend.addr(),
            counter.addr()
        ),
    );
    let sc = start(&config);
    assert!(pillion_testkit::wait_for_port(bulk, Duration::from_secs(5)));

    // Half-close: the client shuts its write side and still reads the reply.
    let mut s = TcpStream::connect(half).await.unwrap();
    s.write_all(b"hello").await.unwrap();
    s.shutdown().await.unwrap();
    let mut reply = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply, "counter got 5 bytes\n");

    // 1 GiB up and echoed back down, checksummed both ways.
    const TOTAL: u64 = 1 << 30;
    let (reader, name) = greet(bulk).await;
    assert_eq!(name, "bulk");
    let stream = reader.into_inner();
    let (mut r, mut w) = stream.into_split();
    let writer = tokio::spawn(async move {
        let mut chunk = vec![0u8; 1 << 20];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut sum = Checksum::default();
        let mut sent = 0u64;
        while sent < TOTAL {
            for b in chunk.chunks_exact_mut(8) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                b.copy_from_slice(&seed.to_le_bytes());
            }
            sum.update(&chunk);
            w.write_all(&chunk).await.unwrap();
            sent += chunk.len() as u64;
        }
        w.shutdown().await.unwrap();
        sum.value()
    });
    let mut got = Checksum::default();
    let mut received = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(30), r.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        if n == 0 {
            break;
        }
        got.update(&buf[..n]);
        received += n as u64;
    }
    let sent_sum = writer.await.unwrap();
    assert_eq!(received, TOTAL);
    assert_eq!(got.value(), sent_sum, "the bytes came back identical");
    let metrics = get(&sc.url("/metrics")).await.unwrap().text();
    let line = format!(
        "pillion_tcp_received_bytes_total{{listen=\"{bulk}\",backend=\"{}\",tier=\"0\"}} ",
        echo_backend.addr()
    );
    let counted: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix(&line))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no byte count in {metrics}"));
    assert!(counted >= TOTAL, "bytes are counted per backend: {counted}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_writes_a_file_that_runs_and_refuses_to_overwrite() {
    let backend = TcpBackend::start("boot", Reply::Echo).await;
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("pillion-bootstrap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("pillion.toml");
    let _ = std::fs::remove_file(&file);
    let binding = format!("{port}:{}", backend.addr());
    let args = [
        "bootstrap",
        "--config",
        file.to_str().unwrap(),
        "--bootstrap-addr",
        "127.0.0.1",
        "--bootstrap",
        &binding,
    ];
    let (code, out, err) = run_to_end(&args, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("listen = \"127.0.0.1:{port}\"")),
        "{out}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), out);
    let (code, _, err) = run_to_end(&args, &[]);
    assert_ne!(code, 0);
    assert!(err.contains("--force"), "{err}");
    let (code, _, _) = run_to_end(&[&args[..], &["--force"]].concat(), &[]);
    assert_eq!(code, 0);
    let (code, out, _) = run_to_end(&["check", "--config", file.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{out}");

    let _sc = start(&file);
    let listen: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert!(pillion_testkit::wait_for_port(
        listen,
        Duration::from_secs(5)
    ));
    assert_eq!(greet(listen).await.1, "boot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_then_a_second_sigterm_exits_at_once() {
    let backend = TcpBackend::start("drain", Reply::Echo).await;
    let listen = listen_addr();
    let config = config_file(
        "drain",
        &format!(
            "[[tcp]]\nlisten = \"{listen}\"\n[[tcp.tiers]]\ntargets = [\"{}\"]\n",
            backend.addr()
        ),
    );
    let mut sc = Sidecar::start(&[
        "--config",
        config.to_str().unwrap(),
        "--grace-period",
        "30s",
    ]);
    assert!(pillion_testkit::wait_for_port(
        listen,
        Duration::from_secs(5)
    ));
    let (mut live, _) = greet(listen).await;

    sc.process.signal("TERM");
    let refused = eventually(Duration::from_secs(5), || async {
        TcpStream::connect(listen).await.is_err()
    })
    .await;
    assert!(refused, "no new connections once shutdown began");
    assert_eq!(
        echo(&mut live, "draining").await,
        "draining",
        "open connections go on"
    );
    assert_eq!(
        sc.process.wait_exit(Duration::from_millis(500)),
        None,
        "it waits for the connection"
    );

    sc.process.signal("TERM");
    let code = sc.process.wait_exit(Duration::from_secs(5));
    assert!(code.is_some(), "a second SIGTERM exits at once");
}

#[test]
fn invalid_tcp_sections_are_refused_at_start_with_the_reason() {
    let cases = [
        ("[[tcp]]\nlisten = \"127.0.0.1:1\"\n", "has no [[tcp.tiers]]"),
        ("[[tcp]]\nlisten = \"127.0.0.1:1\"\n[[tcp.tiers]]\ntargets = [\"nohost\"]\n", "has no port"),
        ("[[tcp]]\nlisten = \"127.0.0.1:1\"\n[[tcp.tiers]]\ntargets = [\"a:1\"]\nmax_conections = 3\n", "unknown field `max_conections`"),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let file = config_file(&format!("invalid{i}"), text);
        let (code, _, err) = run_to_end(&["check", "--config", file.to_str().unwrap()], &[]);
        assert_eq!(code, 1, "{text}");
        assert!(err.contains(want), "{text}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_at_once_and_idle_connections_are_closed() {
    let backend = TcpBackend::start("hup", Reply::Echo).await;
    let (l1, l2) = (listen_addr(), listen_addr());
    let listener = |addr: SocketAddr, extra: &str| {
        format!(
            "[[tcp]]\nlisten = \"{addr}\"\n{extra}[[tcp.tiers]]\ntargets = [\"{}\"]\n",
            backend.addr()
        )
    };
    let config = config_file("hup", &listener(l1, "idle_timeout = \"300ms\"\n"));
    // Polling once an hour: only SIGHUP can make it notice the change in time.
    let sc = Sidecar::start(&[
        "--config",
        config.to_str().unwrap(),
        "--reload-period",
        "1h",
    ]);
    ready(&sc, l1).await;

    let (mut idle, _) = greet(l1).await;
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(_))),
        "an idle connection is closed after idle_timeout"
    );

    std::fs::write(&config, format!("{}{}", listener(l1, ""), listener(l2, ""))).unwrap();
    sc.process.signal("HUP");
    assert!(
        pillion_testkit::wait_for_port(l2, Duration::from_secs(5)),
        "SIGHUP reloaded the file"
    );
    assert_eq!(greet(l2).await.1, "hup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_mark_a_dead_backend_down_before_any_client_needs_it() {
    let first = TcpBackend::start("first", Reply::Echo).await;
    let second = TcpBackend::start("second", Reply::Echo).await;
    let listen = listen_addr();
    let config = config_file("health", &format!(
        "[[tcp]]\nlisten = \"{listen}\"\ndown_for = \"10s\"\n[[tcp.tiers]]\ntargets = [\"{}\", \"{}\"]\nhealth_check = \"200ms\"\n",
        first.addr(), second.addr()
    ));
    let sc = start(&config);
    ready(&sc, listen).await;
    first.kill();
    let marked = eventually(Duration::from_secs(5), || async {
        let s = get(&sc.url("/statusz")).await.unwrap().json();
        s["tcp"][0]["tiers"][0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["address"] == first.addr().to_string() && !b["down_for_secs"].is_null())
    })
    .await;
    assert!(marked, "the probe found the dead backend");
    let before = first.accepted();
    for _ in 0..4 {
        assert_eq!(greet(listen).await.1, "second");
    }
    assert_eq!(first.accepted(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_cut_mid_transfer_leave_nothing_for_the_next_ones() {
    let backend = TcpBackend::start("cut", Reply::Echo).await;
    let listen = listen_addr();
    let config = config_file(
        "cut",
        &format!(
            "[[tcp]]\nlisten = \"{listen}\"\n[[tcp.tiers]]\ntargets = [\"{}\"]\n",
            backend.addr()
        ),
    );
    let sc = start(&config);
    ready(&sc, listen).await;
    // Clients that send megabytes to an echo and reset without reading: the
    // proxy's pipes still hold bytes when their connections fail.
    for _ in 0..4 {
        let (mut conn, _) = greet(listen).await;
        let junk = vec![b'j'; 4 << 20];
        let _ =
            tokio::time::timeout(Duration::from_millis(300), conn.get_mut().write_all(&junk)).await;
        conn.get_ref().set_zero_linger().unwrap();
        drop(conn);
    }
    // Pipes are reused for later connections: each must see exactly its own bytes.
    for i in 0..20 {
        let (mut conn, name) = greet(listen).await;
        assert_eq!(name, "cut");
        let text = format!("message {i}");
        assert_eq!(echo(&mut conn, &text).await, text);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emptied_config_file_keeps_the_running_listeners_until_a_valid_one_arrives() {
    let one = TcpBackend::start("one", Reply::Echo).await;
    let two = TcpBackend::start("two", Reply::Echo).await;
    let listen = listen_addr();
    let listener = |target: SocketAddr| {
        format!("[[tcp]]\nlisten = \"{listen}\"\n[[tcp.tiers]]\ntargets = [\"{target}\"]\n")
    };
    let config = config_file("emptied", &listener(one.addr()));
    let (sc, log) = start_logged(&config, &["--reload-period", "100ms"], "info", None);
    ready(&sc, listen).await;
    let (mut live, name) = greet(listen).await;
    assert_eq!(name, "one");

    // An editor's write in progress: the file has zero bytes.
    std::fs::File::create(&config).unwrap();
    let warned = eventually(Duration::from_secs(5), || async {
        !log_lines(&log, "config file is empty").is_empty()
    })
    .await;
    assert!(warned, "no warning about the empty file");
    let line = &log_lines(&log, "config file is empty")[0];
    assert!(
        line.contains("WARN") && line.contains("keeping the running configuration"),
        "{line}"
    );
    // Several reload periods later, everything still runs.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(greet(listen).await.1, "one", "the listener is still there");
    assert_eq!(
        echo(&mut live, "still").await,
        "still",
        "the live connection goes on"
    );

    // The write completes: the new file applies.
    std::fs::write(&config, listener(two.addr())).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            greet(listen).await.1 == "two"
        })
        .await,
        "the valid file was applied"
    );
    assert_eq!(log_lines(&log, "configuration reloaded").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_nothing_logs_nothing() {
    let backend = TcpBackend::start("same", Reply::Echo).await;
    let listen = listen_addr();
    let text = format!(
        "[[tcp]]\nlisten = \"{listen}\"\n[[tcp.tiers]]\ntargets = [\"{}\"]\n",
        backend.addr()
    );
    let config = config_file("unchanged", &text);
    // The debug line of the reload module tells the test when a reading was judged.
    let (sc, log) = start_logged(
        &config,
        &["--reload-period", "100ms"],
        "info,pillion_tcp::reload=debug",
        None,
    );
    ready(&sc, listen).await;
    let judged = |n: usize| {
        let log = log.clone();
        async move {
            eventually(Duration::from_secs(5), || async {
                log_lines(&log, "its tcp listeners are unchanged").len()
                    + log_lines(&log, "reloaded").len()
                    >= n
            })
            .await
        }
    };

    // The same bytes written again (a new mtime), then a SIGHUP.
    std::fs::write(&config, &text).unwrap();
    assert!(judged(1).await, "the rewritten file was not read");
    sc.process.signal("HUP");
    assert!(judged(2).await, "SIGHUP did not make pillion read the file");
    assert_eq!(
        log_lines(&log, "reloaded"),
        Vec::<String>::new(),
        "an unchanged file was logged as reloaded"
    );
    assert_eq!(greet(listen).await.1, "same");

    // A real change is still logged, once.
    std::fs::write(
        &config,
        text.replace("[[tcp.tiers]]", "idle_timeout = \"1h\"\n[[tcp.tiers]]"),
    )
    .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            log_lines(&log, "configuration reloaded").len() == 1
        })
        .await,
        "the change was not logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_connections_than_the_inherited_soft_open_file_limit_all_echo() {
    const SOFT_LIMIT: u32 = 256;
    const CONNECTIONS: usize = 400;
    let backend = TcpBackend::start("many", Reply::Echo).await;
    let listen = listen_addr();
    let config = config_file(
        "nofile",
        &format!(
            "[[tcp]]\nlisten = \"{listen}\"\n[[tcp.tiers]]\ntargets = [\"{}\"]\n",
            backend.addr()
        ),
    );
    let (sc, log) = start_logged(&config, &[], "info", Some(SOFT_LIMIT));
    ready(&sc, listen).await;

    // All open at once: each holds two sockets (and pipes) in pillion.
    let mut open = Vec::with_capacity(CONNECTIONS);
    for i in 0..CONNECTIONS {
        let stream = TcpStream::connect(listen).await.expect("the proxy accepts");
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        let greeted = tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line))
            .await
            .ok()
            .and_then(Result::ok);
        assert!(
            matches!(greeted, Some(n) if n > 0) && line.trim() == "many",
            "connection {i} (soft limit {SOFT_LIMIT}) got no greeting: {:?}; pillion's log:\n{}",
            line,
            log_lines(&log, "").join("\n")
        );
        open.push(reader);
    }
    for (i, conn) in open.iter_mut().enumerate() {
        let text = format!("conn {i}");
        assert_eq!(echo(conn, &text).await, text);
    }
    let status = get(&sc.url("/statusz")).await.unwrap().json();
    assert_eq!(status["tcp"][0]["active"], CONNECTIONS);
}
