//! mTLS between sidecars: calls by name to a service with a mesh listener go over
//! mTLS with the caller's identity; the receiving sidecar checks the allow list, sets
//! X-Pillion-Caller and forwards HTTP/1.1, upgrades and h2c to its app; clients
//! without a mesh certificate are refused at the handshake, and a caller never
//! accepts a listener that is not the service it called.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{eventually, mesh_ca, mesh_caller, mesh_flags, mesh_receiver, register, run_to_end};
use pillion_testkit::http::{get, request};
use pillion_testkit::TestApp;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_by_name_crosses_the_mesh_with_the_callers_identity() {
    let ca = mesh_ca("cross");
    let app = TestApp::start("orders").await;
    let orders = mesh_receiver(&ca, "orders", app.addr(), &["--mesh-allow", "front"]);
    let front = mesh_caller(&orders, Some((&ca, "front")), "orders").await;

    // HTTP/1.1; a caller's own X-Pillion-Caller never reaches the app.
    let reply = request(
        http::Method::PUT,
        &front.url("/orders/a/b?c=d"),
        &[("x-pillion-caller", "admin"), ("x-k", "v")],
        "payload",
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = reply.json();
    assert_eq!(seen["headers"]["x-pillion-caller"], "front", "{seen}");
    assert_eq!(seen["headers"]["x-k"], "v");
    assert_eq!(seen["path"], "/orders/a/b?c=d");
    assert_eq!(seen["body"], "payload");

    // A large body, streamed through both sidecars.
    let big = "z".repeat(300_000);
    let reply = request(
        http::Method::POST,
        &front.url("/orders/big"),
        &[],
        big.clone(),
    )
    .await
    .unwrap();
    assert_eq!(reply.json()["body"].as_str().unwrap().len(), big.len());

    // An upgrade (websockets' way): a tunnel through the mesh.
    common::assert_upgrade_echoes(front.addr, "/orders/upgrade", b"ping through the mesh");

    // gRPC (h2c from the client): h2 over mTLS, then h2c to the app.
    let (status, seen) = common::grpc_call(front.addr, "/orders/grpc.Svc/Call").await;
    assert_eq!(status, 200);
    assert_eq!(seen["version"], "HTTP/2.0", "{seen}");
    assert_eq!(seen["headers"]["x-pillion-caller"], "front");

    let status = get(&orders.sidecar.url("/statusz")).await.unwrap().json();
    assert_eq!(status["mesh"]["identity"], "spiffe://pillion/svc/orders");
    assert!(status["mesh"]["listener"]["accepted"].as_u64().unwrap() >= 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_not_allowed_or_not_in_the_mesh_are_refused_with_a_reason() {
    let ca = mesh_ca("refused");
    let app = TestApp::start("orders").await;
    let orders = mesh_receiver(&ca, "orders", app.addr(), &["--mesh-allow", "front"]);

    let other = mesh_caller(&orders, Some((&ca, "reports")), "orders").await;
    let reply = get(&other.url("/orders/x")).await.unwrap();
    assert_eq!(reply.status, 403, "{}", reply.text());
    let e = reply.json();
    assert_eq!(e["id"], "pillion.mesh");
    assert!(
        e["detail"]
            .as_str()
            .unwrap()
            .contains("\"reports\" may not call \"orders\""),
        "{e}"
    );

    let outsider = mesh_caller(&orders, None, "orders").await;
    let reply = get(&outsider.url("/orders/x")).await.unwrap();
    assert_eq!(reply.status, 502, "{}", reply.text());
    assert!(
        reply.text().contains("takes calls only over the mesh"),
        "{}",
        reply.text()
    );
    assert_eq!(app.requests(), 0, "no refused call reached the app");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_accepts_only_the_service_it_called() {
    // "payments" registered at the mesh listener of "orders": the listener's
    // certificate names orders, so the caller refuses to send anything there.
    let ca = mesh_ca("impostor");
    let app = TestApp::start("orders").await;
    let orders = mesh_receiver(&ca, "orders", app.addr(), &[]);
    let front = mesh_caller(&orders, Some((&ca, "front")), "orders").await;
    let mesh = orders.mesh.to_string();
    register(&front, "payments", "p1", "127.0.0.1:9", &[("mesh", &mesh)]).await;
    let reply = get(&front.url("/payments/x")).await.unwrap();
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert!(
        reply
            .text()
            .contains("the peer is spiffe://pillion/svc/orders, not spiffe://pillion/svc/payments"),
        "{}",
        reply.text()
    );
    assert_eq!(app.requests(), 0);
}

/// A TLS client of a mesh listener, with an optional client certificate.
fn client(
    ca: &std::path::Path,
    cert: Option<pillion_mesh::ca::Issued>,
) -> tokio_rustls::TlsConnector {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(ca.join("ca.crt")).unwrap())
        .unwrap();
    // The listener's name is its spiffe identity, not a DNS name: this client only
    // checks the chain.
    let verifier = rustls::client::WebPkiServerVerifier::builder(Arc::new(roots))
        .build()
        .unwrap();
    let builder = rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ChainOnly(verifier)));
    let mut config = match cert {
        None => builder.with_no_client_auth(),
        Some(issued) => builder
            .with_client_auth_cert(issued.chain, issued.key)
            .unwrap(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl rustls::client::danger::ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _name: &ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        match self.0.verify_server_cert(
            end_entity,
            intermediates,
            &ServerName::try_from("mesh.pillion").unwrap(),
            ocsp,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            ))
            | Ok(_) => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            Err(e) => Err(e),
        }
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// A GET over a direct TLS connection to the mesh listener: the status, or the
/// error that ended it (a refused handshake surfaces at the first read in TLS 1.3).
async fn direct_get(
    tls: &tokio_rustls::TlsConnector,
    addr: std::net::SocketAddr,
) -> Result<u16, String> {
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let mut s = tls
            .connect(ServerName::try_from("mesh.pillion").unwrap(), tcp)
            .await
            .map_err(|e| e.to_string())?;
        s.write_all(b"GET /x HTTP/1.1\r\nHost: orders\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).await.map_err(|e| e.to_string())?;
        let head = String::from_utf8_lossy(&buf[..n]).to_string();
        head.get(9..12)
            .and_then(|c| c.parse().ok())
            .ok_or(format!("no HTTP answer: {head:?}"))
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| "no answer within 5 s".to_string())?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_listener_wants_a_certificate_from_the_mesh_ca() {
    let ca = mesh_ca("handshake");
    let foreign = mesh_ca("foreign");
    let app = TestApp::start("orders").await;
    let orders = mesh_receiver(&ca, "orders", app.addr(), &[]);

    let none = direct_get(&client(&ca, None), orders.mesh).await;
    assert!(none.is_err(), "no client certificate: {none:?}");
    let stranger =
        pillion_mesh::ca::Authority::load(&foreign.join("ca.crt"), &foreign.join("ca.key"))
            .unwrap()
            .issue("front", Duration::from_secs(3600))
            .unwrap();
    let other_ca = direct_get(&client(&ca, Some(stranger)), orders.mesh).await;
    assert!(
        other_ca.is_err(),
        "a certificate of another CA: {other_ca:?}"
    );
    assert_eq!(app.requests(), 0);

    // The same client with a certificate of this mesh gets through.
    let member = pillion_mesh::ca::Authority::load(&ca.join("ca.crt"), &ca.join("ca.key"))
        .unwrap()
        .issue("front", Duration::from_secs(3600))
        .unwrap();
    assert_eq!(
        direct_get(&client(&ca, Some(member)), orders.mesh).await,
        Ok(200)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_are_renewed_and_calls_go_on() {
    let ca = mesh_ca("renew");
    let app = TestApp::start("orders").await;
    let orders = mesh_receiver(&ca, "orders", app.addr(), &["--mesh-cert-lifetime", "3s"]);
    let front = mesh_caller(&orders, Some((&ca, "front")), "orders").await;
    assert_eq!(get(&front.url("/orders/x")).await.unwrap().status, 200);
    let renewed = eventually(Duration::from_secs(10), || async {
        let s = get(&orders.sidecar.url("/statusz")).await.unwrap().json();
        s["mesh"]["renewals"].as_u64().unwrap_or(0) >= 2
    })
    .await;
    assert!(
        renewed,
        "renewed at two thirds of a 3 s life, twice within 10 s"
    );
    // Past the first certificate's end: new connections get the renewed one.
    let reply = get(&front.url("/orders/y")).await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
}

/// A TCP tier that names a service: its nodes are reached through their sidecars'
/// mesh listeners over mTLS, with the same allow list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_to_a_service_goes_over_the_mesh() {
    use pillion_testkit::tcp::{Reply, TcpBackend};
    use tokio::io::AsyncBufReadExt;
    let ca = mesh_ca("tcp");
    let db = TcpBackend::start("db", Reply::Echo).await;
    let receiver = mesh_receiver(&ca, "db", db.addr(), &["--mesh-allow", "api"]);
    let config_for = |name: &str| {
        let listen: std::net::SocketAddr = format!("127.0.0.1:{}", pillion_testkit::free_port())
            .parse()
            .unwrap();
        let file = ca.join(format!("{name}.toml"));
        std::fs::write(
            &file,
            format!("[[tcp]]\nlisten = \"{listen}\"\n[[tcp.tiers]]\nservices = [\"db\"]\n"),
        )
        .unwrap();
        (listen, file.display().to_string())
    };
    let connect = |listen: std::net::SocketAddr| async move {
        let stream = tokio::net::TcpStream::connect(listen).await.unwrap();
        let mut reader = tokio::io::BufReader::new(stream);
        let mut line = String::new();
        let read = tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line))
            .await
            .expect("an answer or a close in time");
        (reader, read.map(|_| line.trim().to_string()))
    };

    let (listen, file) = config_for("api");
    let _api =
        common::mesh_caller_with(&receiver, Some((&ca, "api")), "db", &["--config", &file]).await;
    assert!(pillion_testkit::wait_for_port(
        listen,
        Duration::from_secs(5)
    ));
    // The registry reaches the TCP proxy within its next look (1 s).
    let mut greeted = None;
    for _ in 0..40 {
        let (reader, line) = connect(listen).await;
        if matches!(&line, Ok(l) if l == "db") {
            greeted = Some(reader);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut conn = greeted.expect("the database greets through the mesh");
    conn.get_mut().write_all(b"select 1\n").await.unwrap();
    let mut line = String::new();
    conn.read_line(&mut line).await.unwrap();
    assert_eq!(line.trim(), "select 1");
    let accepted = db.accepted();

    // A service the allow list does not name gets a closed connection, nothing else.
    let (listen, file) = config_for("intruder");
    let _intruder = common::mesh_caller_with(
        &receiver,
        Some((&ca, "intruder")),
        "db",
        &["--config", &file],
    )
    .await;
    assert!(pillion_testkit::wait_for_port(
        listen,
        Duration::from_secs(5)
    ));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for _ in 0..3 {
        let (_, line) = connect(listen).await;
        assert!(
            matches!(&line, Ok(l) if l.is_empty()) || line.is_err(),
            "refused: {line:?}"
        );
    }
    assert_eq!(
        db.accepted(),
        accepted,
        "no refused connection reached the database"
    );
    let status = get(&receiver.sidecar.url("/statusz")).await.unwrap().json();
    assert!(
        status["mesh"]["listener"]["refused"].as_u64().unwrap() >= 3,
        "{status}"
    );
}

#[test]
fn mesh_options_that_cannot_work_are_refused_at_start() {
    let ca = mesh_ca("options");
    let cert = ca.join("ca.crt").display().to_string();
    let key = ca.join("ca.key").display().to_string();
    let issuer = ["--mesh-issuer", "https://127.0.0.1:1"];
    let named = ["--mesh-ca-cert", &cert, "--server-name", "a"];
    let with = |more: &[&str]| -> Vec<String> {
        named.iter().chain(more).map(|s| s.to_string()).collect()
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--mesh-listen".into(), "127.0.0.1:1".into()],
            "--mesh-listen (mesh_listen) needs --mesh-ca-cert",
        ),
        (
            vec!["--mesh-issuer".into(), "https://x:1".into()],
            "--mesh-issuer (mesh_issuer) needs --mesh-ca-cert",
        ),
        (
            vec!["--mesh-ca-cert".into(), cert.clone()],
            "needs --server-name (server_name)",
        ),
        (
            with(&[]),
            "needs --mesh-issuer URL with --mesh-token TOKEN (certificates from the mesh's issuers), or --mesh-ca-key",
        ),
        (with(&issuer), "--mesh-issuer (mesh_issuer) needs --mesh-token"),
        (
            with(&["--mesh-token", "t"]),
            "--mesh-token (mesh_token) needs --mesh-issuer",
        ),
        (
            with(&["--mesh-issuer", "http://x:1", "--mesh-token", "t"]),
            "is not https://host:port",
        ),
        (
            with(&["--mesh-ca-key", &key, "--mesh-issuer", "https://x:1", "--mesh-token", "t"]),
            "two ways to get certificates",
        ),
        (
            with(&[issuer[0], issuer[1], "--mesh-token", "t", "--mesh-cert-lifetime", "1h"]),
            "the issuer's --mesh-cert-lifetime decides",
        ),
        (
            with(&["--mesh-local-ca"]),
            "--mesh-local-ca (mesh_local_ca) needs --mesh-ca-key",
        ),
        (
            with(&[
                "--mesh-ca-key",
                &key,
                "--server-address",
                "127.0.0.1:9",
                "--mesh-listen",
                "0.0.0.0:1",
            ]),
            "whoever holds the CA key can take any identity in the mesh",
        ),
        (
            with(&["--mesh-ca-key", &key, "--mesh-listen", "127.0.0.1:1"]),
            "--mesh-listen (mesh_listen) needs --server-address",
        ),
        (
            vec![
                "--mesh-ca-cert".into(),
                key.clone(),
                "--mesh-ca-key".into(),
                key.clone(),
                "--server-name".into(),
                "a".into(),
            ],
            "no PEM certificate",
        ),
    ];
    for (args, expected) in cases {
        let mut all = vec!["run"];
        all.extend(args.iter().map(String::as_str));
        let (code, _, err) = run_to_end(&all, &[]);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(expected), "{args:?}: {err}");
    }
    let mut args = vec!["run".to_string()];
    args.extend(mesh_flags(&ca, "a"));
    args.extend(["--mesh-allow".to_string(), "b".into()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, _, err) = run_to_end(&refs, &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("--mesh-allow (mesh_allow) needs --mesh-listen"),
        "{err}"
    );
}

#[test]
fn a_certificate_lifetime_too_short_to_renew_is_refused_at_start() {
    let ca = mesh_ca("lifetime");
    let mut pillion = std::process::Command::new(common::BIN)
        .args(["run", "--address", "127.0.0.1:0"])
        .args(mesh_flags(&ca, "orders"))
        .args(["--mesh-cert-lifetime", "1ms"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A sidecar that accepted it would run (renewing without pause): stop it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while pillion.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = pillion.kill();
            panic!("pillion started with --mesh-cert-lifetime 1ms");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = pillion.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("--mesh-cert-lifetime")
            && err.contains("1ms is too short")
            && err.contains("at least 3s"),
        "{err}"
    );
}
