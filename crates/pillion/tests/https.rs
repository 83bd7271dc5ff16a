//! HTTPS on --listen from certificate files: served over TLS (h2 and HTTP/1.1 by
//! ALPN), a renewed certificate used by the next handshakes without a restart, open
//! connections kept, and a broken, expired or misnamed renewal never taking HTTPS
//! down, and said so in /statusz.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{eventually, run_to_end, tls_connector as connector, Sidecar};
use pillion_testkit::{free_port, make_certificates, wait_for_port, TestApp};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pillion-https-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn der(pem: &Path) -> Vec<u8> {
    CertificateDer::from_pem_file(pem).unwrap().to_vec()
}

async fn connect(
    tls: &tokio_rustls::TlsConnector,
    port: u16,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    tls.connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// One keep-alive HTTP/1.1 request; the status line's code.
async fn get(stream: &mut TlsStream<TcpStream>, path: &str) -> u16 {
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = vec![0u8; 16 * 1024];
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("an answer within 5 s")
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    // The test app's bodies are small: read what follows the head too.
    let _ = tokio::time::timeout(Duration::from_millis(100), stream.read(&mut buf)).await;
    String::from_utf8_lossy(&got[9..12]).parse().unwrap()
}

fn served_cert(stream: &TlsStream<TcpStream>) -> Vec<u8> {
    stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// A sidecar serving HTTPS on --listen in front of `app` from `live`'s server.pem and
/// server.key, copied from `first`'s and looked at every 200 ms; its port.
fn https_from(first: &Path, live: &Path, app: &TestApp) -> (Sidecar, u16) {
    for f in ["server.pem", "server.key"] {
        std::fs::copy(first.join(f), live.join(f)).unwrap();
    }
    let listen = free_port();
    let sc = Sidecar::start(&[
        "--listen",
        &format!("127.0.0.1:{listen}"),
        "--app",
        &app.url(),
        "--tls-cert",
        live.join("server.pem").to_str().unwrap(),
        "--tls-key",
        live.join("server.key").to_str().unwrap(),
        "--reload-period",
        "200ms",
    ]);
    assert!(wait_for_port(
        format!("127.0.0.1:{listen}").parse().unwrap(),
        Duration::from_secs(10)
    ));
    (sc, listen)
}

/// Renews `live`'s files with `from`'s (the key first), then waits up to 5 s for new
/// handshakes on `port` to get the new certificate; whether they did.
async fn renewed_from(
    from: &Path,
    live: &Path,
    tls: &tokio_rustls::TlsConnector,
    port: u16,
) -> bool {
    std::fs::copy(from.join("server.key"), live.join("server.key")).unwrap();
    std::fs::copy(from.join("server.pem"), live.join("server.pem")).unwrap();
    let renewed = der(&from.join("server.pem"));
    eventually(Duration::from_secs(5), || async {
        connect(tls, port)
            .await
            .is_ok_and(|s| served_cert(&s) == renewed)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_on_listen_follows_its_certificate_files() {
    let (one, two) = (temp("one"), temp("two"));
    make_certificates(&one);
    make_certificates(&two);
    let live = temp("live");
    let app = TestApp::start("app").await;
    let (_sc, listen) = https_from(&one, &live, &app);
    let both = connector(&[&one.join("ca.pem"), &two.join("ca.pem")], &[b"http/1.1"]);

    let mut old = connect(&both, listen).await.unwrap();
    assert_eq!(served_cert(&old), der(&one.join("server.pem")));
    assert_eq!(get(&mut old, "/hello").await, 200);

    // h2 is offered by ALPN.
    let h2 = connect(
        &connector(&[&one.join("ca.pem")], &[b"h2", b"http/1.1"]),
        listen,
    )
    .await
    .unwrap();
    assert_eq!(h2.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(h2),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let answer = sender
        .send_request(
            http::Request::get("https://localhost/over-h2")
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        answer.status(),
        200,
        "an h2 request over TLS reaches the app"
    );
    let seen: serde_json::Value = serde_json::from_slice(
        &http_body_util::BodyExt::collect(answer.into_body())
            .await
            .unwrap()
            .to_bytes(),
    )
    .unwrap();
    assert_eq!(
        seen["headers"]["host"], "localhost",
        "the app (HTTP/1.1) gets the h2 request's :authority as Host: {seen}"
    );
    assert_eq!(seen["headers"]["x-forwarded-proto"], "https", "{seen}");

    // Plain HTTP on the HTTPS port gets no answer.
    let mut plain = TcpStream::connect(("127.0.0.1", listen)).await.unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), plain.read(&mut buf))
        .await
        .expect("closed within 5 s")
        .unwrap_or(0);
    assert!(!String::from_utf8_lossy(&buf[..n]).contains("HTTP/1.1 200"));

    // A renewal: the next handshakes get the new certificate, without a restart.
    assert!(
        renewed_from(&two, &live, &both, listen).await,
        "the renewed certificate was never served"
    );
    let renewed = der(&two.join("server.pem"));
    // The connection made before keeps working.
    assert_eq!(get(&mut old, "/again").await, 200);

    // A broken renewal (half-written file) leaves the working certificate in place.
    std::fs::write(
        live.join("server.pem"),
        "-----BEGIN CERTIFICATE-----\nnot base64\n",
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut after = connect(&both, listen).await.unwrap();
    assert_eq!(served_cert(&after), renewed);
    assert_eq!(get(&mut after, "/still").await, 200);
    for dir in [one, two, live] {
        let _ = std::fs::remove_dir_all(dir);
    }
}

use common::self_signed as renew_with;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_or_misnamed_renewal_is_refused_and_said_so() {
    let (one, two) = (temp("first"), temp("good-renewal"));
    make_certificates(&one);
    make_certificates(&two);
    let live = temp("refused");
    let app = TestApp::start("app").await;
    let (sc, listen) = https_from(&one, &live, &app);
    let both = connector(&[&one.join("ca.pem"), &two.join("ca.pem")], &[b"http/1.1"]);
    let first = der(&one.join("server.pem"));
    let tls_status = || async {
        pillion_testkit::http::get(&sc.url("/statusz"))
            .await
            .unwrap()
            .json()["tls"]
            .clone()
    };
    let status = tls_status().await;
    assert_eq!(
        status["names"],
        serde_json::json!(["localhost"]),
        "{status}"
    );
    assert!(status["last_error"].is_null(), "{status}");

    let cases = [
        (
            "expired",
            vec!["localhost"],
            ((2020, 1, 1), (2021, 1, 1)),
            "expired on",
        ),
        (
            "for other names",
            vec!["other.example"],
            ((2020, 1, 1), (2049, 1, 1)),
            "not for localhost",
        ),
    ];
    for (what, names, (from, to), said) in cases {
        renew_with(&live, &names, from, to);
        let refused = eventually(Duration::from_secs(5), || async {
            tls_status().await["last_error"]
                .as_str()
                .is_some_and(|e| e.contains(said))
        })
        .await;
        assert!(
            refused,
            "{what}: /statusz never said why: {}",
            tls_status().await
        );
        let mut stream = connect(&both, listen).await.unwrap();
        assert_eq!(
            served_cert(&stream),
            first,
            "{what}: the old certificate stays"
        );
        assert_eq!(get(&mut stream, "/still").await, 200, "{what}");
    }

    // A good renewal is served, and the refusal is forgotten.
    assert!(
        renewed_from(&two, &live, &both, listen).await,
        "the good renewal was never served"
    );
    assert!(tls_status().await["last_error"].is_null());
    for dir in [one, two, live] {
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn unusable_certificate_files_are_refused_at_start() {
    let dir = temp("bad");
    make_certificates(&dir);
    let other = temp("other");
    make_certificates(&other);
    let listen = format!("127.0.0.1:{}", free_port());
    let args = |cert: &Path, key: &Path| {
        vec![
            "run".to_string(),
            "--listen".into(),
            listen.clone(),
            "--app".into(),
            "http://127.0.0.1:9".into(),
            "--tls-cert".into(),
            cert.display().to_string(),
            "--tls-key".into(),
            key.display().to_string(),
        ]
    };
    let run = |a: Vec<String>| {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        run_to_end(&a, &[])
    };
    let (code, _, err) = run(args(&dir.join("missing.pem"), &dir.join("server.key")));
    assert_ne!(code, 0);
    assert!(
        err.contains("--tls-cert") && err.contains("missing.pem"),
        "{err}"
    );
    let (code, _, err) = run(args(&dir.join("server.pem"), &other.join("server.key")));
    assert_ne!(code, 0);
    assert!(err.contains("is not the key of --tls-cert"), "{err}");
    let (code, _, err) = run_to_end(&["run", "--tls-cert", "x.pem", "--tls-key", "x.key"], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("needs --listen and --app"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(other);
}
