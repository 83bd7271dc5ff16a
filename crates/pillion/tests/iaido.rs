//! Coming from iaido: its YAML file and its command line work unchanged. A file as
//! iaido's users write it, and one with every key as `iaido --bootstrap` writes it,
//! run and proxy TCP with failover to tier 1 and a reload; `pillion check` reads
//! them and refuses what pillion cannot honour, naming the key and its line; and
//! `pillion migrate` writes pillion's TOML for them, which serves the same listeners.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{eventually, run_to_end, Sidecar, BIN};
use pillion_testkit::http::get;
use pillion_testkit::process::wait_until_refused;
use pillion_testkit::tcp::{Reply, TcpBackend};
use pillion_testkit::{free_port, wait_for_port, Daemon};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pillion-iaido-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn local() -> SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().unwrap()
}

/// `pillion ARGS` whose API is at `diag` (iaido's diagAddr in the file), its stderr
/// kept in `log`.
fn start(args: &[&str], diag: SocketAddr, log: &Path) -> Sidecar {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("RUST_LOG", "info")
        .env(
            "PILLION_CLUSTER_BIND",
            format!("127.0.0.1:{}", pillion_testkit::free_udp_port()),
        )
        .stderr(std::fs::File::create(log).unwrap());
    let process = Daemon::spawn("pillion", cmd);
    assert!(
        wait_for_port(diag, Duration::from_secs(10)),
        "pillion did not serve diagAddr {diag}: {}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
    Sidecar::adopt(process, diag)
}

/// The name of the backend that greets a connection through `addr`.
async fn greeter(addr: SocketAddr) -> String {
    let Ok(stream) = TcpStream::connect(addr).await else {
        return String::new();
    };
    let mut line = String::new();
    let read = tokio::time::timeout(
        Duration::from_secs(5),
        BufReader::new(stream).read_line(&mut line),
    )
    .await;
    assert!(matches!(read, Ok(Ok(_))), "no greeting through {addr}");
    line.trim().to_string()
}

/// A file as iaido's documentation shows it: only the keys one needs, defaults for
/// the rest, with the latency tiers off (`latencyBucket: -1ns`) so that the tiers as
/// written decide: every backend here is on loopback, where iaido would measure them
/// all into one tier.
fn minimal(diag: SocketAddr, listen: SocketAddr, tiers: &[SocketAddr]) -> String {
    let mut text = format!(
        "diagAddr: {diag}\nfrontends:\n  - bindAddress: {listen}\n    backendPool:\n      \
         latencyBucket: -1ns\n      tiers:\n"
    );
    for t in tiers {
        text.push_str(&format!(
            "        - dialFailureTimeout: 300ms\n          forcePromotionAfter: 1s\n          \
             targets:\n            - hosts: [{}]\n              port: {}\n",
            t.ip(),
            t.port()
        ));
    }
    text
}

/// What `iaido --bootstrapAddr 127.0.0.1 --bootstrap LISTEN:HOST:PORT` writes (every
/// key, yaml.v3's spelling of each default, latency tiers on).
fn bootstrapped(diag: SocketAddr, listen: SocketAddr, target: SocketAddr) -> String {
    format!(
        "diagAddr: {diag}
frontends:
  - backendPool:
      latencyBucket: 10ms
      maintenanceTime: 30s
      tiers:
        - dialFailureTimeout: 1s
          forcePromotionAfter: 0s
          maxBackendConnections: 0
          targets:
            - disabled: false
              hosts:
                - {}
              port: {}
              proto: TCP
    bindAddress: {listen}
    idleDuration: 1h0m0s
    rebalanceDuration: 10s
gracePeriod: 5s
",
        target.ip(),
        target.port()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_iaido_file_runs_fails_over_to_tier_1_and_reloads() {
    let near = TcpBackend::start("near", Reply::Echo).await;
    let far = TcpBackend::start("far", Reply::Echo).await;
    let third = TcpBackend::start("third", Reply::Echo).await;
    let (diag, listen) = (local(), local());
    let dir = scratch("run");
    let file = dir.join("iaido.yaml");
    std::fs::write(&file, minimal(diag, listen, &[near.addr(), far.addr()])).unwrap();
    let log = dir.join("stderr");
    let sc = start(
        &[
            "run",
            "--config",
            file.to_str().unwrap(),
            "--reloadPeriod",
            "100ms",
        ],
        diag,
        &log,
    );
    assert!(wait_for_port(listen, Duration::from_secs(5)));
    assert_eq!(greeter(listen).await, "near");

    near.kill();
    assert_eq!(greeter(listen).await, "far", "tier 1 when tier 0 is gone");

    // A reload of the YAML file, as of a TOML one.
    std::fs::write(&file, minimal(diag, listen, &[third.addr(), far.addr()])).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            greeter(listen).await == "third"
        })
        .await,
        "the reloaded targets are used"
    );
    // An invalid new file is reported; the running configuration stays.
    std::fs::write(&file, "frontends:\n  - bindAddres: x\n").unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(greeter(listen).await, "third");

    let status = get(&sc.url("/healthz")).await.unwrap();
    assert_eq!(status.status, 200, "diagAddr serves /healthz");
    let err = std::fs::read_to_string(&log).unwrap();
    let warned: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("pillion migrate"))
        .collect();
    assert_eq!(warned.len(), 1, "one warning, at start:\n{err}");
    assert!(warned[0].contains("iaido.yaml"), "{err}");
    assert!(
        err.contains("bindAddres"),
        "the invalid file is reported:\n{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iaidos_command_line_runs_a_bootstrapped_file_and_migrate_serves_the_same() {
    let backend = TcpBackend::start("backend", Reply::Echo).await;
    let (diag, listen) = (local(), local());
    let dir = scratch("bootstrapped");
    let file = dir.join("iaido.yaml");
    std::fs::write(&file, bootstrapped(diag, listen, backend.addr())).unwrap();

    let (code, out, err) = run_to_end(&["check", file.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok"), "{out}");
    // iaido's own spelling of it.
    let (code, out, err) = run_to_end(&["-c", file.to_str().unwrap(), "--check"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok"), "{out}");

    // iaido's own command line: no subcommand.
    let mut sc = start(&["-c", file.to_str().unwrap()], diag, &dir.join("stderr"));
    assert!(wait_for_port(listen, Duration::from_secs(5)));
    assert_eq!(greeter(listen).await, "backend");
    let served = get(&sc.url("/statusz")).await.unwrap().json()["tcp"].clone();
    let err = std::fs::read_to_string(dir.join("stderr")).unwrap();
    assert!(err.contains("`pillion run"), "the command is named:\n{err}");
    sc.process.kill();
    assert!(wait_until_refused(listen, Duration::from_secs(5)));

    let (code, toml, err) = run_to_end(&["migrate", file.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    let migrated = dir.join("pillion.toml");
    std::fs::write(&migrated, &toml).unwrap();
    let (code, _, err) = run_to_end(&["check", migrated.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}\n{toml}");
    assert!(
        !err.contains("pillion migrate"),
        "TOML needs no warning: {err}"
    );

    let sc = start(
        &["run", "--config", migrated.to_str().unwrap()],
        diag,
        &dir.join("stderr2"),
    );
    assert!(wait_for_port(listen, Duration::from_secs(5)));
    assert_eq!(greeter(listen).await, "backend");
    let listeners = |v: &serde_json::Value| {
        v.as_array()
            .unwrap()
            .iter()
            .map(|l| (l["listen"].clone(), l["tiers"].as_array().unwrap().len()))
            .collect::<Vec<_>>()
    };
    let now = get(&sc.url("/statusz")).await.unwrap().json()["tcp"].clone();
    assert_eq!(listeners(&now), listeners(&served), "{toml}");
}

#[test]
fn check_refuses_what_pillion_cannot_honour_naming_the_key_and_its_line() {
    let dir = scratch("check");
    let (diag, listen, target) = (local(), local(), local());
    let good = bootstrapped(diag, listen, target);
    let cases = [
        (
            good.replace("idleDuration", "idleDurration"),
            "line 17",
            "idleDurration",
        ),
        (
            good.replace("rebalanceDuration: 10s", "rebalanceDuration: -1s"),
            "line 18",
            "rebalanceDuration -1s",
        ),
        (
            good.replace("proto: TCP", "proto: udp"),
            "line 15",
            "TCP only",
        ),
    ];
    for (i, (text, line, names)) in cases.iter().enumerate() {
        let file = dir.join(format!("{i}.yml"));
        std::fs::write(&file, text).unwrap();
        let (code, _, err) = run_to_end(&["check", file.to_str().unwrap()], &[]);
        assert_eq!(code, 1, "{text}");
        assert!(err.contains(line) && err.contains(names), "{err}");
    }
}
