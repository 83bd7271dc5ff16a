//! The mesh with its CA key on an issuer only (`pillion mesh serve`): sidecars make
//! their keys, join with a token bound to one service, renew with their certificate;
//! a worker's token cannot buy another service's identity, an expired or revoked
//! token buys nothing, and a server that is not an issuer is not believed.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{eventually, mesh_ca, mesh_caller_with, mesh_receiver_as, run_to_end, BIN};
use pillion_testkit::http::{get, request};
use pillion_testkit::{free_port, wait_for_port, Daemon, TestApp};

/// `pillion mesh serve` on a free port; its log goes to the returned file.
fn issuer(ca: &Path, extra: &[&str]) -> (Daemon, String, PathBuf) {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    issuer_at(addr, &ca.join("ca.crt"), &ca.join("ca.key"), extra)
}

/// `pillion mesh serve` on `addr` with the CA of `key` (`cert` may be a bundle).
fn issuer_at(
    addr: SocketAddr,
    cert: &Path,
    key: &Path,
    extra: &[&str],
) -> (Daemon, String, PathBuf) {
    let log = key.with_file_name(format!("issuer-{}.log", addr.port()));
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(["mesh", "serve", "--listen", &addr.to_string()])
        .args(["--mesh-ca-cert", cert.to_str().unwrap()])
        .args(["--mesh-ca-key", key.to_str().unwrap()])
        .args(extra)
        .stderr(std::fs::File::create(&log).unwrap());
    let daemon = Daemon::spawn("pillion mesh serve", cmd);
    assert!(
        wait_for_port(addr, Duration::from_secs(10)),
        "the issuer did not listen"
    );
    (daemon, format!("https://{addr}"), log)
}

/// A join token for `service`.
fn token(ca: &Path, service: &str, ttl: &str) -> String {
    token_and_id(ca, service, ttl).0
}

/// A join token for `service`, and its id.
fn token_and_id(ca: &Path, service: &str, ttl: &str) -> (String, String) {
    let (code, out, err) = run_to_end(
        &[
            "mesh",
            "token",
            "--mesh-ca-cert",
            ca.join("ca.crt").to_str().unwrap(),
            "--mesh-ca-key",
            ca.join("ca.key").to_str().unwrap(),
            "--service",
            service,
            "--ttl",
            ttl,
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains(&format!("for {service}")), "{err}");
    let id = err.split_whitespace().nth(2).unwrap().to_string();
    (out.trim().to_string(), id)
}

/// The mesh flags of a worker: the roots only, an issuer, a token.
fn worker(ca: &Path, issuers: &[&str], token: &str, service: &str) -> Vec<String> {
    worker_trusting(&ca.join("ca.crt"), issuers, token, service)
}

/// [`worker`] trusting the roots of `roots`.
fn worker_trusting(roots: &Path, issuers: &[&str], token: &str, service: &str) -> Vec<String> {
    let mut flags = vec![
        "--mesh-ca-cert".to_string(),
        roots.display().to_string(),
        "--mesh-token".into(),
        token.into(),
        "--server-name".into(),
        service.into(),
    ];
    for url in issuers {
        flags.extend(["--mesh-issuer".to_string(), url.to_string()]);
    }
    flags
}

/// How a worker that cannot get its identity ends: its exit code and error.
fn refused_start(flags: &[String]) -> (i32, String) {
    let mut args = vec!["run", "--address", "127.0.0.1:0"];
    args.extend(flags.iter().map(String::as_str));
    let (code, _, err) = run_to_end(&args, &[]);
    (code, err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_without_the_ca_key_join_with_tokens_call_and_renew() {
    let ca = mesh_ca("issued");
    let (_issuer, url, log) = issuer(&ca, &["--mesh-cert-lifetime", "3s"]);
    let app = TestApp::start("orders").await;
    // A dead issuer first: the next one is asked.
    let dead = format!("https://127.0.0.1:{}", free_port());
    let orders = mesh_receiver_as(
        worker(&ca, &[&dead, &url], &token(&ca, "orders", "1h"), "orders"),
        app.addr(),
        &["--mesh-allow", "front"],
    );
    let front_flags = worker(&ca, &[&url], &token(&ca, "front", "1h"), "front");
    let refs: Vec<&str> = front_flags.iter().map(String::as_str).collect();
    let front = mesh_caller_with(&orders, None, "orders", &refs).await;

    let reply = request(http::Method::GET, &front.url("/orders/x"), &[], "")
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["headers"]["x-pillion-caller"], "front");

    // Each issuance is logged: service, identity, serial, expiry, token id.
    let text = std::fs::read_to_string(&log).unwrap();
    let issued: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("mesh certificate issued"))
        .collect();
    assert!(issued.len() >= 2, "{text}");
    let first = issued
        .iter()
        .find(|l| l.contains("service=orders"))
        .unwrap();
    for field in [
        "identity=spiffe://pillion/svc/orders",
        "serial=",
        "not_after=",
        "token=",
        "renewal=false",
    ] {
        assert!(first.contains(field), "{field} missing: {first}");
    }

    // Certificates live 3 s: both renew (over mTLS, no token), and calls go on.
    let renewed = eventually(Duration::from_secs(10), || async {
        let status = get(&orders.sidecar.url("/statusz")).await.unwrap().json();
        status["mesh"]["renewals"].as_u64().unwrap_or(0) >= 1
    })
    .await;
    assert!(renewed, "orders never renewed");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.lines()
            .any(|l| l.contains("mesh certificate issued") && l.contains("renewal=true")),
        "{text}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await; // past the first certificates' end
    let reply = request(http::Method::GET, &front.url("/orders/y"), &[], "")
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "after renewals: {}", reply.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_buys_its_own_service_and_nothing_else() {
    let ca = mesh_ca("tokens");
    let revoked = ca.join("revoked");
    std::fs::write(&revoked, "# revoked join tokens\n").unwrap();
    let (_issuer, url, log) = issuer(&ca, &["--revoked", revoked.to_str().unwrap()]);

    // The host of reports, with reports' token, asks to be front: refused.
    let reports = token(&ca, "reports", "1h");
    let (code, err) = refused_start(&worker(&ca, &[&url], &reports, "front"));
    assert_ne!(code, 0);
    assert!(
        err.contains(
            "asks for spiffe://pillion/svc/front; only spiffe://pillion/svc/reports can be issued"
        ),
        "{err}"
    );
    assert!(err.contains("403"), "{err}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("mesh certificate refused"), "{text}");
    assert!(!text.contains("mesh certificate issued"), "{text}");

    // An expired token.
    let short = token(&ca, "reports", "1s");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (code, err) = refused_start(&worker(&ca, &[&url], &short, "reports"));
    assert_ne!(code, 0);
    assert!(err.contains("has expired"), "{err}");

    // A revoked token: its id (printed when it was made) in the issuer's file.
    let (stolen, id) = token_and_id(&ca, "reports", "24h");
    std::fs::write(&revoked, format!("{id}  # the laptop that was stolen\n")).unwrap();
    let (code, err) = refused_start(&worker(&ca, &[&url], &stolen, "reports"));
    assert_ne!(code, 0);
    assert!(
        err.contains(&format!("the join token {id} (for reports) is revoked")),
        "{err}"
    );

    // A token of another mesh's CA.
    let other = mesh_ca("tokens-other");
    let foreign = token(&other, "reports", "1h");
    let (code, err) = refused_start(&worker(&ca, &[&url], &foreign, "reports"));
    assert_ne!(code, 0);
    assert!(err.contains("is not signed by this mesh's CA"), "{err}");

    // A server that is not an issuer (a sidecar's mesh listener, with a certificate
    // of the same CA) is not believed, and not asked again and again.
    let app = TestApp::start("any").await;
    let orders = common::mesh_receiver(&ca, "orders", app.addr(), &[]);
    let started = std::time::Instant::now();
    let (code, err) = refused_start(&worker(
        &ca,
        &[&format!("https://{}", orders.mesh)],
        &reports,
        "reports",
    ));
    assert_ne!(code, 0);
    assert!(
        err.contains("is not an issuer of this mesh")
            && err.contains("the peer is spiffe://pillion/svc/orders, not spiffe://pillion/issuer"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "retried a server that is no issuer"
    );
}

/// Whether `ca` signed the certificate the mesh listener at `addr` presents.
async fn signed_by(addr: SocketAddr, ca: &Path) -> bool {
    let connector = common::tls_connector(&[ca], &[b"http/1.1"]);
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("mesh.pillion").unwrap();
    match connector.connect(name, tcp).await {
        Ok(_) => true,
        // The chain is trusted, and only the name (a mesh identity, no host name) is
        // not; another CA's chain fails before the name is looked at.
        Err(e) => e.to_string().contains("certificate not valid for name"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_rotates_with_no_failed_call() {
    let (old, new) = (mesh_ca("rotate-old"), mesh_ca("rotate-new"));
    // Step 1: every sidecar trusts both roots.
    let bundle = old.join("bundle.crt");
    let both = std::fs::read_to_string(old.join("ca.crt")).unwrap()
        + &std::fs::read_to_string(new.join("ca.crt")).unwrap();
    std::fs::write(&bundle, both).unwrap();
    let addr = |_| -> SocketAddr { format!("127.0.0.1:{}", free_port()).parse().unwrap() };
    let (a, b) = (addr(0), addr(1));
    let urls = [format!("https://{a}"), format!("https://{b}")];
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let lifetime = ["--mesh-cert-lifetime", "6s"];
    let (issuer_old, _, _) = issuer_at(a, &bundle, &old.join("ca.key"), &lifetime);
    let app = TestApp::start("orders").await;
    let orders = mesh_receiver_as(
        worker_trusting(&bundle, &urls, &token(&old, "orders", "1h"), "orders"),
        app.addr(),
        &[],
    );
    let flags = worker_trusting(&bundle, &urls, &token(&old, "front", "1h"), "front");
    let refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    let front = mesh_caller_with(&orders, None, "orders", &refs).await;
    assert!(signed_by(orders.mesh, &old.join("ca.crt")).await);

    // Calls all along.
    let calling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let caller = tokio::spawn({
        let url = front.url("/orders/x");
        let calling = calling.clone();
        async move {
            let (mut ok, mut failed) = (0, Vec::new());
            while calling.load(std::sync::atomic::Ordering::SeqCst) {
                match request(http::Method::GET, &url, &[], "").await {
                    Ok(r) if r.status == 200 => ok += 1,
                    other => failed.push(format!("{other:?}")),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (ok, failed)
        }
    });

    // Step 2: the issuers switch to the new key (the new one starts, the old stops);
    // sidecars renew from it.
    let (_issuer_new, _, log) = issuer_at(b, &bundle, &new.join("ca.key"), &lifetime);
    drop(issuer_old);
    let renewed = eventually(Duration::from_secs(15), || async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        ["service=orders", "service=front"].iter().all(|s| {
            text.lines()
                .any(|l| l.contains("renewal=true") && l.contains(s))
        })
    })
    .await;
    assert!(
        renewed,
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(signed_by(orders.mesh, &new.join("ca.crt")).await);
    assert!(!signed_by(orders.mesh, &old.join("ca.crt")).await);

    // Step 3: a sidecar that trusts only the new root calls orders.
    let flags = worker(&new, &urls[1..], &token(&new, "reports", "1h"), "reports");
    let refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    let reports = mesh_caller_with(&orders, None, "orders", &refs).await;
    let reply = request(http::Method::GET, &reports.url("/orders/y"), &[], "")
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());

    tokio::time::sleep(Duration::from_secs(2)).await;
    calling.store(false, std::sync::atomic::Ordering::SeqCst);
    let (ok, failed) = caller.await.unwrap();
    assert!(ok > 20, "{ok} calls");
    assert!(
        failed.is_empty(),
        "{} of {} calls failed: {:?}",
        failed.len(),
        ok + failed.len(),
        failed.first()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_cuts_its_certificates_off_within_seconds() {
    let ca = mesh_ca("revoke");
    let revoked = ca.join("revoked");
    std::fs::write(&revoked, "").unwrap();
    let (_issuer, url, log) = issuer(&ca, &["--revoked", revoked.to_str().unwrap()]);
    let app = TestApp::start("orders").await;
    let orders = mesh_receiver_as(
        worker(&ca, &[&url], &token(&ca, "orders", "1h"), "orders"),
        app.addr(),
        &[],
    );
    let (front_token, front_id) = token_and_id(&ca, "front", "1h");
    let flags = worker(&ca, &[&url], &front_token, "front");
    let refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    let front = mesh_caller_with(&orders, None, "orders", &refs).await;
    let call = || async {
        request(http::Method::GET, &front.url("/orders/x"), &[], "")
            .await
            .unwrap()
    };
    assert_eq!(call().await.status, 200);
    // The certificate names the token it was granted on.
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains(&format!("token={front_id}")), "{text}");

    // front's host is lost: its token is revoked on the issuer; every sidecar reads
    // the revocations every few seconds, and orders refuses front's certificate.
    std::fs::write(&revoked, format!("{front_id}\n")).unwrap();
    let started = std::time::Instant::now();
    let cut = eventually(Duration::from_secs(15), || async {
        call().await.status == 403
    })
    .await;
    assert!(cut, "front's certificate was still accepted");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    call().await.assert_refused(
        403,
        "the certificate of \"front\" is revoked",
        "a revoked caller",
    );
}
