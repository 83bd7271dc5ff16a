//! Running the real `pillion` binary in tests.
#![allow(dead_code)] // each test file uses a different part

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use pillion_testkit::{free_port, wait_for_port, Daemon};

pub const BIN: &str = env!("CARGO_BIN_EXE_pillion");

/// A `pillion run` on a free port, killed on drop.
pub struct Sidecar {
    pub process: Daemon,
    pub addr: SocketAddr,
}

impl Sidecar {
    pub fn start(args: &[&str]) -> Sidecar {
        Self::start_with_env(args, &[])
    }

    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Sidecar {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut cmd = Command::new(BIN);
        cmd.arg("run")
            .arg("--address")
            .arg(addr.to_string())
            .args(args);
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
        let process = Daemon::spawn("pillion", cmd);
        assert!(
            wait_for_port(addr, Duration::from_secs(10)),
            "pillion did not listen on {addr}"
        );
        Sidecar { process, addr }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
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
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut all = vec![
        "--listen".to_string(),
        listen.to_string(),
        "--app".into(),
        app.to_string(),
    ];
    all.extend(args.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    let sc = Sidecar::start(&refs);
    assert!(
        wait_for_port(listen, Duration::from_secs(10)),
        "inbound proxy did not listen"
    );
    (sc, listen)
}
