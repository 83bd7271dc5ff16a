//! The sidecar's own API (`--address`) over HTTPS, as micro's sidecar served it:
//! from certificate files (h2 and HTTP/1.1 by ALPN, a renewal followed under a live
//! connection), micro's `--enable_tls` flags mapped onto it, the CLI reaching it with
//! `--ca-file` and naming a certificate problem plainly, and plain HTTP off loopback
//! only when `--api-plaintext` says it is meant. ACME on the API is in acme.rs.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{eventually, run_to_end, self_signed, tls_connector, Sidecar};
use pillion_testkit::{free_port, make_certificates, wait_for_port, Daemon};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pillion-api-https-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn loopback() -> SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().unwrap()
}

async fn connect(
    tls: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tls.connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// One keep-alive HTTP/1.1 GET: the status and the body (the API answers with a
/// content-length).
async fn get(stream: &mut TlsStream<TcpStream>, path: &str) -> (u16, String) {
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if body.len() >= length {
                return (text[9..12].parse().unwrap(), body.to_string());
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("an answer within 5 s")
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
}

fn served_cert(stream: &TlsStream<TcpStream>) -> Vec<u8> {
    stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// `pillion status` against `sidecar` with more flags: (exit code, stdout, stderr).
fn cli_status(sidecar: &str, flags: &[&str]) -> (i32, String, String) {
    let mut args = vec!["status", "--sidecar", sidecar, "--timeout", "5s"];
    args.extend(flags);
    run_to_end(&args, &[])
}

fn api_flags(dir: &Path) -> Vec<String> {
    vec![
        "--api-tls-cert".into(),
        dir.join("server.pem").display().to_string(),
        "--api-tls-key".into(),
        dir.join("server.key").display().to_string(),
    ]
}

fn start(addr: SocketAddr, flags: &[String]) -> Sidecar {
    let refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    Sidecar::start_at(addr, &refs, &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_serves_https_from_files_and_follows_a_renewal_under_a_live_connection() {
    let (one, two, live) = (temp("one"), temp("two"), temp("live"));
    make_certificates(&one);
    make_certificates(&two);
    for f in ["server.pem", "server.key"] {
        std::fs::copy(one.join(f), live.join(f)).unwrap();
    }
    let addr = loopback();
    let mut flags = api_flags(&live);
    flags.extend(["--reload-period".into(), "200ms".into()]);
    let _sc = start(addr, &flags);

    // HTTP/1.1 and h2 by ALPN.
    let tls = tls_connector(&[&one.join("ca.pem")], &[b"http/1.1"]);
    let mut held = connect(&tls, addr).await.expect("HTTPS on --address");
    assert_eq!(held.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (status, body) = get(&mut held, "/statusz").await;
    assert_eq!(status, 200, "{body}");
    let statusz: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        statusz["api_tls"]["files"].is_object(),
        "/statusz says where the API's certificate comes from: {statusz}"
    );
    let h2 = connect(
        &tls_connector(&[&one.join("ca.pem")], &[b"h2", b"http/1.1"]),
        addr,
    )
    .await
    .unwrap();
    assert_eq!(h2.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    // Plain HTTP on the HTTPS port is not served.
    let plain = pillion_testkit::http::get(&format!("http://{addr}/healthz")).await;
    assert!(
        plain.as_ref().map_or(true, |r| r.status != 200),
        "{plain:?}"
    );

    // The CLI over HTTPS: with the CA, and a plain word without it.
    let url = format!("https://localhost:{}", addr.port());
    let ca = one.join("ca.pem");
    let (code, out, err) = cli_status(&url, &["--ca-file", ca.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.is_empty());
    let (code, _, err) = cli_status(&url, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("unknown CA") && err.contains("--ca-file"),
        "{err}"
    );
    let (code, _, err) = run_to_end(
        &["status", "--sidecar", &url, "--ca-file", "/nonexistent.pem"],
        &[],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--ca-file /nonexistent.pem"), "{err}");

    // Renewed with another CA's certificate: new handshakes get it, the open
    // connection goes on.
    std::fs::copy(two.join("server.key"), live.join("server.key")).unwrap();
    std::fs::copy(two.join("server.pem"), live.join("server.pem")).unwrap();
    let renewed = CertificateDer::from_pem_file(two.join("server.pem"))
        .unwrap()
        .to_vec();
    let tls_two = tls_connector(&[&two.join("ca.pem")], &[b"http/1.1"]);
    assert!(
        eventually(Duration::from_secs(5), || async {
            connect(&tls_two, addr)
                .await
                .is_ok_and(|s| served_cert(&s) == renewed)
        })
        .await,
        "the renewed certificate was never served"
    );
    assert_eq!(
        get(&mut held, "/healthz").await.0,
        200,
        "the live connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_names_a_wrong_name_and_an_expired_certificate() {
    let (other, expired) = (temp("other-name"), temp("expired"));
    self_signed(&other, &["api.test"], (2024, 1, 1), (2099, 1, 1));
    self_signed(&expired, &["localhost"], (2020, 1, 1), (2021, 1, 1));
    let cases = [(&other, "wrong name"), (&expired, "expired")];
    for (dir, says) in cases {
        let addr = loopback();
        let _sc = start(addr, &api_flags(dir));
        let url = format!("https://localhost:{}", addr.port());
        let ca = dir.join("server.pem");
        let (code, _, err) = cli_status(&url, &["--ca-file", ca.to_str().unwrap()]);
        assert_eq!(code, 1, "{err}");
        assert!(err.contains(says), "{says}: {err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn micro_s_enable_tls_flags_serve_the_api_over_https() {
    let dir = temp("micro");
    make_certificates(&dir);
    let addr = loopback();
    let cert = dir.join("server.pem").display().to_string();
    let key = dir.join("server.key").display().to_string();
    let _sc = Sidecar::start_at(
        addr,
        &[
            "--enable_tls",
            "--tls_cert_file",
            &cert,
            "--tls_key_file",
            &key,
        ],
        &[],
    );
    let tls = tls_connector(&[&dir.join("ca.pem")], &[b"http/1.1"]);
    let mut s = connect(&tls, addr).await.expect("HTTPS as micro served it");
    assert_eq!(get(&mut s, "/healthz").await.0, 200);
}

const TOKEN: &str = "api-token-0123456789abcdef";

#[test]
fn an_api_off_loopback_is_https_unless_plaintext_is_said() {
    let port = free_port().to_string();
    let any = format!("0.0.0.0:{port}");
    let (code, _, err) = run_to_end(&["run", "--address", &any, "--api-token", TOKEN], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--api-plaintext") && err.contains("--api-tls-cert"),
        "{err}"
    );
    let dir = temp("refused");
    make_certificates(&dir);
    let cert = dir.join("server.pem").display().to_string();
    let key = dir.join("server.key").display().to_string();
    let cases: [(&[&str], &str); 5] = [
        (&["--api-acme-domain", "a.example"], "needs --acme-cache"),
        (
            &["--api-acme-domain", "a.example", "--api-tls-cert", &cert],
            "both give --address its certificate",
        ),
        (&["--api-tls-cert", &cert], "--api-tls-key"),
        (
            &["--api-tls-cert", &cert, "--api-tls-key", &cert],
            "--api-tls-key",
        ),
        (
            &[
                "--api-plaintext",
                "--api-tls-cert",
                &cert,
                "--api-tls-key",
                &key,
            ],
            "contradict",
        ),
    ];
    for (flags, says) in cases {
        let mut args = vec!["run", "--api-token", TOKEN];
        args.extend(flags);
        let (code, _, err) = run_to_end(&args, &[]);
        assert_eq!(code, 2, "{flags:?}: {err}");
        assert!(err.contains(says), "{flags:?}: {err}");
    }
}

#[test]
fn plain_http_off_loopback_starts_when_meant_and_the_log_says_so() {
    let dir = temp("plain");
    let log = dir.join("stderr");
    let addr: SocketAddr = format!("0.0.0.0:{}", free_port()).parse().unwrap();
    let mut cmd = std::process::Command::new(common::BIN);
    cmd.args(["run", "--address", &addr.to_string(), "--api-plaintext"])
        .env("PILLION_API_TOKEN", TOKEN)
        .env(
            "PILLION_CLUSTER_BIND",
            format!("127.0.0.1:{}", pillion_testkit::free_udp_port()),
        )
        .stderr(std::fs::File::create(&log).unwrap());
    let _pillion = Daemon::spawn("pillion", cmd);
    assert!(wait_for_port(
        format!("127.0.0.1:{}", addr.port()).parse().unwrap(),
        Duration::from_secs(10)
    ));
    // Said as it starts (the listener may accept a moment before the line is written).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut text = String::new();
    while std::time::Instant::now() < deadline {
        text = std::fs::read_to_string(&log).unwrap();
        if text.contains("plain HTTP off loopback") {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the start-up log does not say the API is plain:\n{text}");
}
