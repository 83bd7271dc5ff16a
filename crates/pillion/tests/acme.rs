//! HTTPS on --listen with certificates from an ACME CA, against a real pebble: the
//! names validated by TLS-ALPN-01 on --listen itself, the certificate served and
//! kept in --acme-cache so a restart orders nothing (even with the CA gone), and a
//! CA that cannot be reached or cannot validate reported in /statusz while the
//! sidecar keeps running. Flags that cannot work are refused at start.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::{run_to_end, Sidecar};
use http_body_util::BodyExt;
use pillion_testkit::{free_port, wait_for_port, Pebble, TestApp};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

const DOMAIN: &str = "test.example";

/// How long pebble may take to issue (it validates at once with PEBBLE_VA_NOSLEEP).
const ISSUE_LIMIT: Duration = Duration::from_secs(60);

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pillion-acme-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// What one HTTPS GET saw: the status, the body and the server's leaf certificate.
struct Seen {
    status: u16,
    body: Vec<u8>,
    leaf: Vec<u8>,
}

/// GETs `path` over HTTPS from 127.0.0.1:`port`, asking for `name` (SNI and Host)
/// and trusting only `roots`.
async fn https_get(
    port: u16,
    name: &str,
    roots: &[CertificateDer<'static>],
    path: &str,
) -> Result<Seen, String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        store.add(root.clone()).map_err(|e| e.to_string())?;
    }
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(store)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let exchange = async {
        let tcp = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let server_name = ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
        let tls = connector
            .connect(server_name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let request = http::Request::get(path)
            .header(http::header::HOST, name)
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let answer = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = answer.status().as_u16();
        let body = answer
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes()
            .to_vec();
        Ok(Seen { status, body, leaf })
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| "no answer within 10 s".to_string())?
}

/// The root pebble issues certificates under, from its management interface.
async fn issuing_root(pebble: &Pebble) -> CertificateDer<'static> {
    let directory_ca = CertificateDer::from_pem_file(pebble.ca_file()).unwrap();
    let seen = https_get(
        pebble.management_port,
        "127.0.0.1",
        &[directory_ca],
        "/roots/0",
    )
    .await
    .expect("pebble's /roots/0");
    assert_eq!(seen.status, 200);
    CertificateDer::from_pem_slice(&seen.body).expect("a PEM root")
}

/// The sidecar's `acme` part of /statusz.
async fn acme_status(sidecar: &Sidecar) -> serde_json::Value {
    let reply = pillion_testkit::http::get(&sidecar.url("/statusz"))
        .await
        .expect("GET /statusz");
    reply.json()["acme"].clone()
}

/// Waits until /statusz says the ACME state is `state`; the last status seen.
async fn wait_for_state(
    sidecar: &Sidecar,
    state: &str,
    limit: Duration,
) -> Result<serde_json::Value, serde_json::Value> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let last = acme_status(sidecar).await;
        if last["state"] == state {
            return Ok(last);
        }
        if std::time::Instant::now() > deadline {
            return Err(last);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `pillion run` flags for HTTPS on `listen` in front of `app` with a certificate
/// for DOMAIN from `directory`.
fn acme_flags(
    listen: u16,
    app: &str,
    directory: &str,
    ca_root: &Path,
    cache: &Path,
) -> Vec<String> {
    [
        "--listen",
        &format!("127.0.0.1:{listen}"),
        "--app",
        app,
        "--acme-domain",
        DOMAIN,
        "--acme-directory",
        directory,
        "--acme-ca-root",
        ca_root.to_str().unwrap(),
        "--acme-cache",
        cache.to_str().unwrap(),
        "--acme-email",
        "ops@test.example",
    ]
    .map(String::from)
    .to_vec()
}

fn start(flags: &[String]) -> Sidecar {
    let refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    Sidecar::start(&refs)
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_is_ordered_served_and_kept_across_restarts() {
    let app = TestApp::start("app").await;
    let listen = free_port();
    let mut pebble = Pebble::start(listen);
    let cache = temp("kept");
    let flags = acme_flags(
        listen,
        &app.url(),
        &pebble.directory(),
        &pebble.ca_file(),
        &cache,
    );

    let sidecar = start(&flags);
    assert!(wait_for_port(
        format!("127.0.0.1:{listen}").parse().unwrap(),
        Duration::from_secs(10)
    ));
    let status = match wait_for_state(&sidecar, "valid", ISSUE_LIMIT).await {
        Ok(status) => status,
        Err(last) => panic!(
            "no certificate within {ISSUE_LIMIT:?}; /statusz acme: {last}\n{}",
            pebble.log()
        ),
    };
    assert_eq!(status["domains"], serde_json::json!([DOMAIN]));
    assert_eq!(status["orders"], 1, "{status}");
    assert!(status["last_error"].is_null(), "{status}");
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(status["not_after_unix"].as_u64().unwrap() > now, "{status}");
    assert!(
        status["renew_after_unix"].as_u64().unwrap() < status["not_after_unix"].as_u64().unwrap(),
        "{status}"
    );

    // A client trusting pebble's issuing root reaches the app over HTTPS, and the
    // certificate is valid for the name (the client checks it).
    let root = issuing_root(&pebble).await;
    let first = https_get(listen, DOMAIN, std::slice::from_ref(&root), "/over-acme")
        .await
        .expect("HTTPS with the ACME certificate");
    assert_eq!(first.status, 200);
    let echo: serde_json::Value = serde_json::from_slice(&first.body).unwrap();
    assert_eq!(
        echo["path"], "/over-acme",
        "the app got the request: {echo}"
    );

    // The account and the key are kept private in the cache.
    let kept = cache.join(format!("127.0.0.1_{}_dir", pebble.port));
    assert_eq!(mode(&kept.join("account.json")), 0o600);
    assert_eq!(mode(&kept.join("certificate.key")), 0o600);
    assert!(kept.join("certificate.pem").is_file());

    // Restarted with the CA gone: the cached certificate serves, nothing is ordered.
    drop(sidecar);
    pebble.kill();
    let again = start(&flags);
    assert!(wait_for_port(
        format!("127.0.0.1:{listen}").parse().unwrap(),
        Duration::from_secs(10)
    ));
    let second = https_get(listen, DOMAIN, &[root], "/after-restart")
        .await
        .expect("HTTPS with the cached certificate, the CA being down");
    assert_eq!(second.status, 200);
    assert_eq!(second.leaf, first.leaf, "the same certificate");
    let status = acme_status(&again).await;
    assert_eq!(status["state"], "valid", "{status}");
    assert_eq!(status["orders"], 0, "nothing was ordered: {status}");
    let _ = std::fs::remove_dir_all(cache);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_directory_is_reported_and_the_sidecar_keeps_running() {
    let app = TestApp::start("app").await;
    let listen = free_port();
    let cache = temp("unreachable");
    let root_dir = temp("unreachable-root");
    pillion_testkit::make_certificates(&root_dir);
    let directory = format!("https://127.0.0.1:{}/dir", free_port());
    let sidecar = start(&acme_flags(
        listen,
        &app.url(),
        &directory,
        &root_dir.join("ca.pem"),
        &cache,
    ));
    let status = wait_for_state(&sidecar, "failed", Duration::from_secs(20))
        .await
        .unwrap_or_else(|last| panic!("the failure never showed: {last}"));
    let error = status["last_error"].as_str().unwrap();
    assert!(
        error.contains(&directory) && error.to_lowercase().contains("connection refused"),
        "the error names the directory and why: {error}"
    );
    assert!(
        status["retry_at_unix"].is_u64(),
        "a retry is planned: {status}"
    );

    // The sidecar keeps running: the API answers; --listen has no certificate yet,
    // so a handshake fails rather than presenting something untrusted.
    let health = pillion_testkit::http::get(&sidecar.url("/healthz"))
        .await
        .unwrap();
    assert_eq!(health.status, 200, "{}", health.text());
    let refused = https_get(listen, DOMAIN, &[], "/").await;
    assert!(
        refused.is_err(),
        "no certificate is served before one is issued"
    );
    let _ = std::fs::remove_dir_all(cache);
    let _ = std::fs::remove_dir_all(root_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_the_ca_cannot_validate_is_reported_with_the_cas_reason() {
    let app = TestApp::start("app").await;
    let listen = free_port();
    // pebble validates on a port where nothing listens, not on --listen.
    let pebble = Pebble::start(free_port());
    let cache = temp("invalid");
    let sidecar = start(&acme_flags(
        listen,
        &app.url(),
        &pebble.directory(),
        &pebble.ca_file(),
        &cache,
    ));
    let status = wait_for_state(&sidecar, "failed", ISSUE_LIMIT)
        .await
        .unwrap_or_else(|last| panic!("the failure never showed: {last}\n{}", pebble.log()));
    let error = status["last_error"].as_str().unwrap();
    assert!(
        error.contains(&format!("the CA could not validate {DOMAIN}")),
        "{error}"
    );
    assert!(
        error.contains("urn:ietf:params:acme:error:"),
        "the CA's problem: {error}"
    );
    let _ = std::fs::remove_dir_all(cache);
}

#[test]
fn acme_flags_that_cannot_work_are_refused_at_start() {
    let cache = temp("refused");
    let cache = cache.to_str().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let inbound = ["--listen", &listen, "--app", "http://127.0.0.1:9"];
    let refused = |args: &[String], env: &[(&str, &str)], want: &str| {
        let mut all = vec!["run"];
        all.extend(args.iter().map(String::as_str));
        let (code, _, err) = run_to_end(&all, env);
        assert_ne!(code, 0, "{args:?} was accepted");
        assert!(err.contains(want), "{args:?}: {err}");
    };
    let with = |more: &[&str]| -> Vec<String> {
        inbound.iter().chain(more).map(|s| s.to_string()).collect()
    };
    refused(
        &with(&[
            "--acme-domain",
            DOMAIN,
            "--acme-cache",
            "/tmp/x",
            "--tls-cert",
            "x.pem",
            "--tls-key",
            "x.key",
        ]),
        &[],
        "--acme-domain (acme_domain) and --tls-cert (tls_cert) both give --listen its certificate",
    );
    // The same from the environment.
    refused(
        &with(&["--tls-cert", "x.pem", "--tls-key", "x.key"]),
        &[
            ("PILLION_ACME_DOMAIN", DOMAIN),
            ("PILLION_ACME_CACHE", "/tmp/x"),
        ],
        "both give --listen its certificate",
    );
    refused(
        &["--acme-domain", DOMAIN, "--acme-cache", cache].map(String::from),
        &[],
        "--acme-domain needs --listen and --app",
    );
    refused(
        &with(&["--acme-domain", DOMAIN]),
        &[],
        "needs --acme-cache DIR",
    );
    refused(
        &with(&["--acme-email", "ops@test.example"]),
        &[],
        "--acme-email (acme_email) needs --acme-domain",
    );
    refused(&with(&["--acme-domain", "*.test.example"]), &[], "DNS-01");
    refused(
        &with(&[
            "--acme-domain",
            DOMAIN,
            "--acme-directory",
            "http://127.0.0.1:1/dir",
        ]),
        &[],
        "an ACME directory is an https:// URL",
    );
    refused(
        &with(&[
            "--acme-domain",
            DOMAIN,
            "--acme-cache",
            cache,
            "--acme-ca-root",
            "/nonexistent.pem",
        ]),
        &[],
        "--acme-ca-root /nonexistent.pem",
    );

    // The config file takes the same keys, and refuses a misspelt one.
    let dir = temp("file");
    let file = dir.join("pillion.toml");
    std::fs::write(
        &file,
        format!(
            "listen = \"{listen}\"\napp = \"http://127.0.0.1:9\"\nacme_domain = [\"{DOMAIN}\", \"www.{DOMAIN}\"]\nacme_cache = \"{cache}\"\nacme_email = \"ops@test.example\"\n"
        ),
    )
    .unwrap();
    let (code, _, err) = run_to_end(&["check", "--config", file.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    std::fs::write(&file, format!("acme_domains = [\"{DOMAIN}\"]\n")).unwrap();
    let (code, _, err) = run_to_end(&["check", "--config", file.to_str().unwrap()], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("did you mean `acme_domain`?"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

/// micro's `--enable_acme --acme_hosts NAME`: the API itself (`--address`) gets a
/// certificate, validated by TLS-ALPN-01 on its own port, kept apart from
/// `--listen`'s in the cache; a client reaches the API by the certificate's name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_gets_its_own_certificate_from_acme() {
    let api = free_port();
    let pebble = Pebble::start(api);
    let cache = temp("api");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{api}").parse().unwrap();
    let (directory, ca_root) = (pebble.directory(), pebble.ca_file());
    let _sidecar = Sidecar::start_at(
        addr,
        &[
            "--enable_acme",
            "--acme_hosts",
            DOMAIN,
            "--acme-directory",
            &directory,
            "--acme-ca-root",
            ca_root.to_str().unwrap(),
            "--acme-cache",
            cache.to_str().unwrap(),
        ],
        &[],
    );
    let root = issuing_root(&pebble).await;
    let deadline = std::time::Instant::now() + ISSUE_LIMIT;
    let seen = loop {
        match https_get(api, DOMAIN, std::slice::from_ref(&root), "/statusz").await {
            Ok(seen) => break seen,
            Err(e) if std::time::Instant::now() > deadline => {
                panic!(
                    "the API never served an ACME certificate: {e}\n{}",
                    pebble.log()
                )
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    assert_eq!(seen.status, 200, "{}", String::from_utf8_lossy(&seen.body));
    let status: serde_json::Value = serde_json::from_slice(&seen.body).unwrap();
    let acme = &status["api_tls"]["acme"];
    assert_eq!(acme["state"], "valid", "{status}");
    assert_eq!(acme["domains"], serde_json::json!([DOMAIN]));
    assert!(status["acme"].is_null(), "--listen has no ACME: {status}");
    let kept = cache
        .join("api")
        .join(format!("127.0.0.1_{}_dir", pebble.port));
    assert!(kept.join("certificate.pem").is_file(), "{}", kept.display());
    let _ = std::fs::remove_dir_all(cache);
}
