//! iaido's automatic latency tiers, over a real slow link: a delay line (a TUN device
//! in a network namespace this test creates, `pillion_testkit::delay`) puts a far
//! backend 2 × 25 ms of dial time away, while a near one is on the namespace's
//! loopback. pillion runs inside the namespace on an iaido file as iaido's bootstrap
//! writes it (every key, `latencyBucket: 10ms`), with the far backend written in the
//! first tier: the measured latency, not the file's order, decides. Needs root and
//! iproute2, as the LAN test does.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use common::{eventually, BIN};
use pillion_testkit::delay::{self, DelayLine};
use pillion_testkit::tcp::{Reply, TcpBackend};
use pillion_testkit::{free_port, Daemon};
use serde_json::Value;

/// Each way: a dial across the line takes at least twice this.
const DELAY: Duration = Duration::from_millis(25);

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port)
}

/// `GET path` from inside the namespace: (status, body).
fn get(line: &DelayLine, api: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = line.connect(api).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {api}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

fn status(line: &DelayLine, api: SocketAddr) -> Value {
    let (code, body) = get(line, api, "/statusz").expect("GET /statusz");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// A connection through the proxy and the name of the backend that greeted it.
fn greeting(line: &DelayLine, listen: SocketAddr) -> (String, TcpStream) {
    let s = line.connect(listen).expect("connecting to the proxy");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut name = String::new();
    BufReader::new(&s)
        .read_line(&mut name)
        .expect("a greeting through the proxy");
    (name.trim().to_string(), s)
}

/// The backends of each tier, as /statusz lists them: [[address, ...], ...].
fn tiers(listener: &Value) -> Vec<Vec<String>> {
    listener["tiers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            t["backends"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b["address"].as_str().unwrap().to_string())
                .collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_near_backend_takes_every_connection_the_far_one_takes_over_then_hands_back() {
    let line = DelayLine::new(DELAY);
    let near = TcpBackend::start_in(line.place(), "near", Reply::Echo, loopback(0)).await;
    let far = TcpBackend::start_in(
        line.place(),
        "far",
        Reply::Echo,
        SocketAddr::new(delay::LOCAL.into(), 0),
    )
    .await;
    let far_target = SocketAddr::new(delay::far(2).into(), far.addr().port());
    let (api, listen) = (loopback(free_port()), loopback(free_port()));

    // What `iaido --bootstrap` writes, but the far backend in the first tier.
    let yaml = format!(
        "diagAddr: {api}
frontends:
  - backendPool:
      latencyBucket: 10ms
      maintenanceTime: 30s
      tiers:
        - dialFailureTimeout: 1s
          forcePromotionAfter: 1s
          maxBackendConnections: 0
          targets:
            - disabled: false
              hosts:
                - {far_ip}
              port: {far_port}
              proto: TCP
        - dialFailureTimeout: 1s
          forcePromotionAfter: 1s
          maxBackendConnections: 0
          targets:
            - disabled: false
              hosts:
                - 127.0.0.1
              port: {near_port}
              proto: TCP
    bindAddress: {listen}
    idleDuration: 1h0m0s
    rebalanceDuration: 1s
gracePeriod: 5s
",
        far_ip = far_target.ip(),
        far_port = far_target.port(),
        near_port = near.addr().port(),
    );
    let dir = std::env::temp_dir().join(format!("pillion-latency-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("iaido.yaml");
    std::fs::write(&file, &yaml).unwrap();

    // `pillion migrate` keeps the latency tiers in pillion's TOML.
    let (code, toml, err) = common::run_to_end(&["migrate", file.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        toml.contains("latency_bucket = \"10ms\"") && toml.contains("rebalance_every = \"1s\""),
        "{toml}"
    );

    // iaido's own command line, inside the namespace.
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", line.netns(), BIN, "-c"])
        .arg(&file)
        .env("RUST_LOG", "info");
    let _pillion = Daemon::spawn("pillion", cmd);
    assert!(
        eventually(Duration::from_secs(10), || async {
            get(&line, api, "/healthz").is_some_and(|(code, _)| code == 200)
        })
        .await,
        "pillion did not serve {api} inside the namespace"
    );

    // Measured: the near backend is tier 0, the far one behind it.
    let want = vec![vec![near.addr().to_string()], vec![far_target.to_string()]];
    assert!(
        eventually(Duration::from_secs(10), || async {
            tiers(&status(&line, api)["tcp"][0]) == want
        })
        .await,
        "the backends were never put in tiers by latency: {}",
        status(&line, api)["tcp"][0]
    );
    let listener = status(&line, api)["tcp"][0].clone();
    assert_eq!(listener["latency_bucket"], "10ms", "{listener}");
    let far_ms = listener["tiers"][1]["backends"][0]["latency_ms"]
        .as_f64()
        .unwrap();
    let near_ms = listener["tiers"][0]["backends"][0]["latency_ms"]
        .as_f64()
        .unwrap();
    assert!(far_ms >= 50.0, "far: {far_ms} ms, over a 2 x 25 ms link");
    assert!(
        near_ms < far_ms - 10.0,
        "near: {near_ms} ms, far: {far_ms} ms"
    );
    assert_eq!(listener["tiers"][1]["backends"][0]["written_tier"], 0);

    let (_, metrics) = get(&line, api, "/metrics").unwrap();
    let far_metric = format!(
        "pillion_tcp_backend_latency_seconds{{listen=\"{listen}\",backend=\"{far_target}\",tier=\"1\"}}"
    );
    assert!(metrics.contains(&far_metric), "{far_metric} in:\n{metrics}");

    // Every new connection goes to the near backend.
    let mut open = Vec::new();
    for _ in 0..4 {
        let (who, conn) = greeting(&line, listen);
        assert_eq!(who, "near");
        open.push(conn);
    }

    // The near one dies: the far one takes the connections.
    near.kill();
    drop(open);
    let (who, mut held) = greeting(&line, listen);
    assert_eq!(who, "far", "failover across the slow link");

    // It comes back: once up for forcePromotionAfter, the far connection is closed
    // (its client sees the end of the stream) and new ones go near again.
    near.restart().await;
    held.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut rest = Vec::new();
    let end = held.read_to_end(&mut rest);
    assert!(
        end.is_ok(),
        "the far connection was not handed back: {end:?}"
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            greeting(&line, listen).0 == "near"
        })
        .await,
        "new connections did not go back to the near backend"
    );
}
