//! The Feathers plugin (`clients/feathers`, the npm package `feathers-pillion`) with
//! real Feathers v5 apps (koa and express) across real sidecars: its own `node --test`
//! suite, run against this build's pillion binary.
//!
//! Needs Node.js 18+ and the package's dependencies (`npm ci` in clients/feathers);
//! `scripts/test` installs both.

mod common;

use std::path::Path;
use std::process::Command;

#[test]
fn feathers_apps_share_their_services_through_their_sidecars() {
    let package = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../clients/feathers");
    assert!(
        package.join("node_modules/@feathersjs/feathers").is_dir(),
        "clients/feathers has no node_modules: run `npm ci` there (scripts/test does)"
    );
    let out = Command::new("node")
        .args(["--test", "--test-concurrency=1", "test/"])
        .current_dir(&package)
        .env("PILLION_BIN", common::BIN)
        .output()
        .expect("running node (Debian's nodejs; scripts/test installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Vec<&str> = stdout
        .lines()
        .filter(|l| !l.contains(" INFO ") && !l.contains(" WARN "))
        .collect();
    assert!(
        out.status.success() && stdout.contains("# fail 0"),
        "the Feathers suite failed:\n{}\n{}",
        report.join("\n"),
        String::from_utf8_lossy(&out.stderr)
    );
}
