//! The mesh across hosts of a LAN (network namespaces this test creates): an issuer
//! on one host, `orders` and `front` on two others, none of them with the CA key.
//! front calls orders by name over mTLS; orders' app, on loopback, cannot be reached
//! from front's host around the mesh; a plaintext orders node is refused; front's
//! host cannot get orders' identity with its own token, and once its token is
//! revoked, orders refuses it. Needs root (CAP_NET_ADMIN), iproute2, curl and python3.

mod common;

use std::time::Duration;

use common::{eventually, mesh_ca, run_to_end, BIN};
use pillion_testkit::lan::Lan;
use pillion_testkit::{free_port, Daemon};

const KEY: &str = "mesh-lan-cluster-key-0123";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issuer_and_two_workers_on_a_lan() {
    let lan = Lan::new(3);
    let ca = mesh_ca("lan");
    let cert = ca.join("ca.crt").display().to_string();
    let key = ca.join("ca.key").display().to_string();
    let issuer_url = format!("https://{}:7440", lan.addr(0));
    let revoked = ca.join("revoked");
    std::fs::write(&revoked, "").unwrap();
    let mut issuer = lan.exec(0, BIN);
    issuer
        .args([
            "mesh",
            "serve",
            "--listen",
            &format!("{}:7440", lan.addr(0)),
        ])
        .args(["--mesh-ca-cert", &cert, "--mesh-ca-key", &key])
        .args(["--revoked", revoked.to_str().unwrap()]);
    let _issuer = Daemon::spawn("pillion mesh serve", issuer);
    let token = |service: &str| {
        let (code, out, err) = run_to_end(
            &[
                "mesh",
                "token",
                "--mesh-ca-cert",
                &cert,
                "--mesh-ca-key",
                &key,
                "--service",
                service,
            ],
            &[],
        );
        assert_eq!(code, 0, "{err}");
        let id = err.split_whitespace().nth(2).unwrap().to_string();
        (out.trim().to_string(), id)
    };
    let ((orders_token, _), (front_token, front_id)) = (token("orders"), token("front"));

    // orders: its app on loopback (Python's http.server), mesh calls on the LAN.
    let app_port = free_port();
    let site = ca.join("site");
    std::fs::create_dir_all(site.join("orders")).unwrap();
    std::fs::write(site.join("orders/index.html"), "hello from orders\n").unwrap();
    let mut app = lan.exec(1, "python3");
    app.args(["-m", "http.server", "--bind", "127.0.0.1"])
        .args([&app_port.to_string(), "--directory", site.to_str().unwrap()]);
    let _app = Daemon::spawn("http.server", app);
    let worker = |host: usize, api: u16, service: &str, token: &str, more: &[String]| {
        let mut cmd = lan.exec(host, BIN);
        cmd.arg("run")
            .args([
                "--address",
                &format!("127.0.0.1:{api}"),
                "--handler",
                "proxy",
            ])
            .args(["--server-name", service, "--mesh-ca-cert", &cert])
            .args(["--mesh-issuer", &issuer_url, "--mesh-token", token])
            .args(["--cluster-bind", &format!("{}:7950", lan.addr(host))])
            .args(["--cluster-key", KEY])
            .args(more)
            .env("RUST_LOG", "info");
        Daemon::spawn("pillion", cmd)
    };
    let (orders_api, front_api) = (free_port(), free_port());
    let _orders = worker(
        1,
        orders_api,
        "orders",
        &orders_token,
        &[
            "--server-address".into(),
            format!("127.0.0.1:{app_port}"),
            "--mesh-listen".into(),
            "0.0.0.0:7443".into(),
            "--mesh-advertise".into(),
            format!("{}:7443", lan.addr(1)),
            "--mesh-allow".into(),
            "front".into(),
        ],
    );
    let _front = worker(
        2,
        front_api,
        "front",
        &front_token,
        &["--cluster-join".into(), format!("{}:7950", lan.addr(1))],
    );

    // front calls orders by name: over mTLS to orders' host, then its app.
    let call = format!("http://127.0.0.1:{front_api}/orders/");
    let answered = eventually(Duration::from_secs(20), || async {
        lan.curl(2, &[&call]).0 == 200
    })
    .await;
    assert!(
        answered,
        "front never reached orders: {:?}",
        lan.curl(2, &[&call])
    );
    assert_eq!(lan.curl(2, &[&call]).1, "hello from orders\n");

    // The app is not reachable from front's host around the mesh...
    let (code, _) = lan.curl(2, &[&format!("http://{}:{app_port}/", lan.addr(1))]);
    assert_eq!(code, 0, "orders' app answered another host directly");
    // ...nor the mesh listener without a certificate of the mesh.
    let (code, _) = lan.curl(2, &["-k", &format!("https://{}:7443/", lan.addr(1))]);
    assert_eq!(
        code, 0,
        "the mesh listener served a client without a certificate"
    );

    // A plaintext orders node, registered through front's sidecar: refused.
    let rogue = format!(
        r#"{{"name":"orders","nodes":[{{"id":"rogue","address":"{}:9"}}]}}"#,
        lan.addr(2)
    );
    let (code, body) = lan.curl(
        2,
        &[
            "-H",
            "Content-Type: application/json",
            "-d",
            &rogue,
            &format!("http://127.0.0.1:{front_api}/registry"),
        ],
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("has no mesh listener"), "{body}");

    // front's host, with front's token, cannot become orders.
    let out = lan
        .exec(2, BIN)
        .args(["run", "--address", "127.0.0.1:0", "--server-name", "orders"])
        .args(["--mesh-ca-cert", &cert, "--mesh-issuer", &issuer_url])
        .args(["--mesh-token", &front_token])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("only spiffe://pillion/svc/front can be issued"),
        "{err}"
    );

    // front's host is lost: its token is revoked on the issuer, and orders refuses
    // front within seconds.
    std::fs::write(&revoked, format!("{front_id}\n")).unwrap();
    let cut = eventually(Duration::from_secs(15), || async {
        lan.curl(2, &[&call]).0 == 403
    })
    .await;
    assert!(cut, "front was still served: {:?}", lan.curl(2, &[&call]));
}
