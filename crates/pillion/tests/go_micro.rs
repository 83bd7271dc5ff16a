//! A Go program sending exactly what go-micro's `registry.Service` marshals to
//! (`tests/gomicro/register.go`, go-micro's types copied from its source): it registers
//! a v0 and a v1 node with every empty field `null`, reads them back into the same
//! types checking `Address` and `Port`, checks the app the sidecar registered the same
//! way, calls through `/rpc` with `endpoint`, and deregisters.
//!
//! Needs `go` (Debian's `golang-go`; `scripts/test` installs it). No module is
//! downloaded: the program uses the standard library only.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::Sidecar;
use pillion_testkit::TestApp;

const PROGRAM: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/gomicro/register.go");

/// `go run` with its caches in the temp dir and no module lookups.
fn go(dir: &Path) -> Command {
    let mut cmd = Command::new("go");
    cmd.env("GOCACHE", dir.join("cache"))
        .env("GOPATH", dir.join("path"))
        .env("GO111MODULE", "off")
        .env("GOFLAGS", "")
        .env("GOPROXY", "off")
        .current_dir(dir);
    cmd
}

fn go_dir() -> PathBuf {
    // Shared by runs so the standard library is compiled once; go's cache is safe for
    // concurrent use.
    let dir = std::env::temp_dir().join("pillion-go-micro");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_go_micro_app_registers_reads_back_and_calls_unchanged() {
    let dir = go_dir();
    let version = go(&dir).arg("version").output();
    assert!(
        version.as_ref().is_ok_and(|o| o.status.success()),
        "`go` is missing or broken ({version:?}): install Debian's golang-go \
         (`apt-get install -y golang-go`; scripts/test installs it)"
    );

    let node = TestApp::start("greeter").await;
    let app = TestApp::start("app").await;
    let app_address = app.addr().to_string();
    let sc = Sidecar::start(&[
        "--server-name",
        "go.micro.srv.app",
        "--server-address",
        &app_address,
    ]);
    assert!(
        common::eventually(std::time::Duration::from_secs(5), || async {
            common::node_ids(&sc, "go.micro.srv.app").await.len() == 1
        })
        .await,
        "the app was never registered"
    );

    let mut run = go(&dir);
    run.args(["run", PROGRAM, "-sidecar", &sc.url("")])
        .args(["-node", &node.addr().to_string()])
        .args(["-app", "go.micro.srv.app", "-app-address", &app_address]);
    let out = tokio::task::spawn_blocking(move || run.output())
        .await
        .unwrap()
        .expect("running go");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.trim() == "ok",
        "the go-micro program failed ({}):\n{stdout}{stderr}",
        out.status
    );
    assert_eq!(node.requests(), 1, "the /rpc call reached the node");
}
