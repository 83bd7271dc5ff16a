//! The files in `deploy/`, checked as far as this machine allows: every config they
//! ship passes `pillion check` (with the environment the manifest gives), the image's
//! config starts a sidecar that registers its app, the systemd unit passes
//! `systemd-analyze verify`, every `PILLION_*` variable they name is one of pillion's,
//! and the Dockerfile builds in stages and runs as a non-root user. No Docker engine or
//! Kubernetes API server runs here, so neither the image nor the manifest is applied.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{eventually, node_ids, run_to_end, Sidecar, BIN};
use pillion_testkit::TestApp;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

fn read(name: &str) -> String {
    std::fs::read_to_string(deploy().join(name)).unwrap_or_else(|e| panic!("deploy/{name}: {e}"))
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pillion-deploy-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The block scalar under `key: |` in `yaml`, dedented.
fn block(yaml: &str, key: &str) -> String {
    let mut lines = yaml.lines().skip_while(|l| l.trim() != format!("{key}: |"));
    let head = lines
        .next()
        .unwrap_or_else(|| panic!("no `{key}: |` block"));
    let outer = head.len() - head.trim_start().len();
    let body: Vec<&str> = lines
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > outer)
        .collect();
    let indent = body
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    body.iter()
        .map(|l| l.get(indent..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The pillion container's environment in the manifest: literal values with
/// `$(POD_IP)` given a pod's address, and a made-up secret for `secretKeyRef`.
fn manifest_env(yaml: &str) -> Vec<(String, String)> {
    let sidecar: Vec<&str> = yaml
        .lines()
        .skip_while(|l| l.trim() != "- name: pillion")
        .take_while(|l| !l.trim_start().starts_with("ports:"))
        .collect();
    let mut env = Vec::new();
    for (i, line) in sidecar.iter().enumerate() {
        let Some(name) = line
            .trim()
            .strip_prefix("- name: ")
            .filter(|n| n.starts_with("PILLION_"))
        else {
            continue;
        };
        let next = sidecar.get(i + 1).map(|l| l.trim()).unwrap_or("");
        let value = match next.strip_prefix("value: ") {
            Some(v) => v.trim_matches('"').replace("$(POD_IP)", "10.1.2.3"),
            None => {
                assert!(
                    next.starts_with("valueFrom:"),
                    "{name}: neither value nor valueFrom"
                );
                "a-secret-of-the-cluster-0123456789".to_string()
            }
        };
        env.push((name.to_string(), value));
    }
    env
}

#[test]
fn every_shipped_config_passes_pillion_check() {
    let mut checked = 0;
    for entry in std::fs::read_dir(deploy()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let (code, out, err) = run_to_end(&["check", "--config", path.to_str().unwrap()], &[]);
            assert_eq!(code, 0, "{}: {err}", path.display());
            assert!(out.ends_with(": ok\n"), "{out}");
            checked += 1;
        }
    }
    assert!(checked >= 1, "no config in deploy/");

    // The manifest's ConfigMap, with the environment its pillion container gets.
    let yaml = read("kubernetes.yaml");
    let file = scratch("k8s").join("pillion.toml");
    std::fs::write(&file, block(&yaml, "pillion.toml")).unwrap();
    let env = manifest_env(&yaml);
    assert!(
        env.iter().any(|(k, _)| k == "PILLION_API_TOKEN"),
        "the API listens on the pod's address, so the manifest must give it a token: {env:?}"
    );
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (code, _, err) = run_to_end(&["check", "--config", file.to_str().unwrap()], &env_refs);
    assert_eq!(code, 0, "the manifest's config: {err}");
    // Without the token the same config is refused, naming the flag.
    let without: Vec<(&str, &str)> = env_refs
        .iter()
        .copied()
        .filter(|(k, _)| *k != "PILLION_API_TOKEN")
        .collect();
    let (code, _, err) = run_to_end(&["check", "--config", file.to_str().unwrap()], &without);
    assert_ne!(code, 0);
    assert!(err.contains("--api-token"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_images_config_starts_a_sidecar_that_registers_its_app() {
    let app = TestApp::start("greeter").await;
    let config = deploy().join("pillion.toml");
    let address = app.addr().to_string();
    let health = format!("{}/health", app.url());
    // The file's own ports are fixed ones; the test moves them to free ones.
    let sc = Sidecar::start(&[
        "--config",
        config.to_str().unwrap(),
        "--server-address",
        &address,
        "--healthcheck-url",
        &health,
    ]);
    assert!(
        eventually(Duration::from_secs(15), || async {
            !node_ids(&sc, "greeter").await.is_empty()
        })
        .await,
        "the app named in deploy/pillion.toml was not registered"
    );
    let healthz = pillion_testkit::http::get(&sc.url("/healthz"))
        .await
        .unwrap();
    assert_eq!(healthz.status, 200, "{}", healthz.text());
}

/// The unit as shipped, and with its commented options for :443 and the mesh's
/// credentials turned on, passes `systemd-analyze verify`.
#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let unit = read("pillion.service");
    assert!(
        unit.contains("ExecStart=/usr/local/bin/pillion run --config /etc/pillion/pillion.toml")
    );
    let optional = [
        "#AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "#CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "#LoadCredential=mesh-token:",
        "#Environment=PILLION_MESH_TOKEN_FILE=%d/",
    ];
    for line in optional {
        assert!(unit.contains(line), "{line} is not in the unit");
    }
    let enabled = optional
        .iter()
        .fold(unit.clone(), |u, l| u.replace(l, &l[1..]));
    verify_unit(&unit, "shipped");
    verify_unit(&enabled, "enabled");
}

fn verify_unit(unit: &str, name: &str) {
    // verify checks that the command exists: this build's binary stands in for it.
    let dir = scratch(&format!("systemd-{name}"));
    let path = dir.join("pillion.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/pillion", BIN)).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .env("SYSTEMD_LOG_LEVEL", "warning")
        .output()
        .expect("systemd-analyze (Debian package systemd) is installed by scripts/test");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let about_unit: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("pillion.service"))
        .collect();
    assert!(out.status.success() && about_unit.is_empty(), "{stderr}");
}

#[test]
fn every_pillion_variable_named_in_deploy_is_an_option() {
    let (_, help, _) = run_to_end(&["run", "--help"], &[]);
    let known: Vec<&str> = help
        .split("[env: ")
        .skip(1)
        .filter_map(|s| s.split(['=', ']']).next())
        .collect();
    assert!(known.contains(&"PILLION_API_TOKEN"), "{known:?}");
    for name in [
        "kubernetes.yaml",
        "pillion.service",
        "Dockerfile",
        "pillion.toml",
    ] {
        let text = read(name);
        for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("PILLION_") {
                assert!(
                    known.contains(&word),
                    "deploy/{name} names {word}, which is no option"
                );
            }
        }
    }
}

#[test]
fn the_dockerfile_builds_in_stages_and_runs_as_a_non_root_user() {
    let text = read("Dockerfile");
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect();
    let stages: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.starts_with("FROM "))
        .map(|(i, _)| i)
        .collect();
    assert!(stages.len() >= 2, "not a multi-stage build");
    let last = &lines[*stages.last().unwrap()..];
    let user = last
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("the final stage sets USER");
    let uid = user.split(':').next().unwrap().trim();
    assert!(uid != "0" && uid != "root", "runs as root: USER {user}");
    assert!(
        uid.parse::<u32>().is_ok(),
        "a numeric uid, for runAsNonRoot: USER {user}"
    );
    assert!(last
        .iter()
        .any(|l| l.starts_with("ENTRYPOINT [\"/usr/local/bin/pillion\"]")));

    // The build image is at least the workspace's rust-version.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let cargo = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let wanted = cargo
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = \""))
        .and_then(|v| v.strip_suffix('"'))
        .unwrap();
    let image = lines[stages[0]]
        .split_whitespace()
        .nth(1)
        .and_then(|i| i.strip_prefix("rust:"))
        .expect("the build stage is FROM rust:<version>");
    let version =
        |v: &str| -> Vec<u32> { v.split(['.', '-']).filter_map(|p| p.parse().ok()).collect() };
    assert!(
        version(image) >= version(wanted),
        "rust:{image} is older than rust-version {wanted}"
    );

    // What it copies from the context exists, and the context leaves out target/.
    for line in &lines {
        if let Some(args) = line
            .strip_prefix("COPY ")
            .filter(|a| !a.starts_with("--from"))
        {
            let parts: Vec<&str> = args.split_whitespace().collect();
            for source in &parts[..parts.len() - 1] {
                assert!(
                    root.join(source).exists(),
                    "COPY {source}: not in the repository"
                );
            }
        }
    }
    let ignore = std::fs::read_to_string(root.join(".dockerignore")).expect(".dockerignore");
    assert!(
        ignore.lines().any(|l| l.trim() == "target"),
        "the build context would carry target/"
    );
}

/// `major.minor` of a Rust version (`1.89`, `1.88.0`).
fn rust_minor(version: &str) -> (u32, u32) {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// The Dockerfile's Rust and the workspace's `rust-version` are at least the highest
/// `rust-version` among the locked dependencies (`cargo metadata`): with less, the
/// image's `cargo build --locked` fails, and `rust-version` promises what is untrue.
#[test]
fn the_dockerfile_and_rust_version_are_new_enough_for_the_locked_dependencies() {
    let root = deploy().join("..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked"])
        .args(["--filter-platform", "x86_64-unknown-linux-gnu"])
        .current_dir(&root)
        .output()
        .expect("running cargo metadata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let resolved: std::collections::HashSet<&str> = meta["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    let (needed, by) = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| resolved.contains(p["id"].as_str().unwrap()))
        .filter_map(|p| Some((rust_minor(p["rust_version"].as_str()?), p["name"].as_str()?)))
        .max()
        .expect("some dependency declares a rust-version");

    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let declared = manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = \""))
        .map(|v| rust_minor(v.trim_end_matches('"')))
        .expect("the workspace declares rust-version");
    assert!(
        declared >= needed,
        "rust-version {declared:?} is below {by}'s {needed:?}"
    );

    let dockerfile = read("Dockerfile");
    let image = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("FROM rust:"))
        .map(|tag| rust_minor(tag.split(['-', ' ']).next().unwrap()))
        .expect("the Dockerfile builds FROM rust:X.Y");
    assert!(
        image >= needed,
        "the Dockerfile's rust:{image:?} is below {by}'s {needed:?}"
    );
}

/// deploy/etcd.yaml's etcd command line, run by this machine's etcd on free ports,
/// is a registry a sidecar registers its app in; its Service is the `etcd:2379` the
/// pods' config names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_etcd_manifest_runs_an_etcd_the_sidecars_register_in() {
    let yaml = read("etcd.yaml");
    let config = block(&read("kubernetes.yaml"), "pillion.toml");
    assert!(
        config.contains("registry = \"etcd://etcd:2379\""),
        "{config}"
    );
    assert!(
        yaml.contains("  name: etcd\n") && yaml.contains("port: 2379"),
        "{yaml}"
    );
    let command: Vec<String> = yaml
        .lines()
        .find_map(|l| l.trim().strip_prefix("command: "))
        .map(|list| serde_json::from_str(list).expect("command is a JSON-style list"))
        .expect("the etcd container has a command");
    assert_eq!(command[0], "etcd");

    let data = scratch("etcd-manifest");
    let client = pillion_testkit::free_port();
    let peer = pillion_testkit::free_port();
    let args: Vec<String> = command[1..]
        .iter()
        .map(|a| {
            a.replace("/var/lib/etcd", data.join("etcd").to_str().unwrap())
                .replace("0.0.0.0:2379", &format!("127.0.0.1:{client}"))
                .replace("etcd:2379", &format!("127.0.0.1:{client}"))
                .replace("127.0.0.1:2380", &format!("127.0.0.1:{peer}"))
        })
        .collect();
    let mut cmd = Command::new("etcd");
    cmd.args(&args);
    let _etcd = pillion_testkit::Daemon::spawn("etcd", cmd);
    let addr = format!("127.0.0.1:{client}").parse().unwrap();
    assert!(
        pillion_testkit::wait_for_port(addr, Duration::from_secs(15)),
        "etcd did not start"
    );

    let registry = format!("etcd://127.0.0.1:{client}");
    let sc = Sidecar::start(&["--registry", &registry]);
    common::register(&sc, "greeter", "greeter-1", "127.0.0.1:9090", &[]).await;
    assert_eq!(node_ids(&sc, "greeter").await, ["greeter-1"]);
}
