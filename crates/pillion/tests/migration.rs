//! Coming from micro, bailiff or iaido: their settings work, each with a one-line
//! deprecation notice, or are refused with a message naming pillion's equivalent.
//! None is ignored without a word.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{eventually, node_ids, run_to_end, Sidecar, BIN};
use pillion_testkit::http::request;
use pillion_testkit::{free_port, wait_for_port, Daemon, Server, TestApp};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pillion-migration-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `pillion run ARGS` with `env` and its stderr kept in a file; killed on drop.
struct Logged {
    sidecar: Sidecar,
    stderr: PathBuf,
}

impl Logged {
    fn start(name: &str, args: &[&str], env: &[(&str, &str)]) -> Logged {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let stderr = scratch(name).join("stderr");
        let mut cmd = Command::new(BIN);
        cmd.arg("run")
            .arg("--address")
            .arg(addr.to_string())
            .args(args);
        cmd.env(
            "PILLION_CLUSTER_BIND",
            format!("127.0.0.1:{}", pillion_testkit::free_udp_port()),
        );
        cmd.envs(env.iter().copied());
        cmd.stderr(Stdio::from(std::fs::File::create(&stderr).unwrap()));
        let process = Daemon::spawn("pillion", cmd);
        assert!(
            wait_for_port(addr, Duration::from_secs(10)),
            "pillion did not listen on {addr}: {}",
            std::fs::read_to_string(&stderr).unwrap_or_default()
        );
        Logged {
            sidecar: Sidecar::adopt(process, addr),
            stderr,
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn micros_flags_register_the_app_with_a_notice_each() {
    let app = TestApp::start("greeter").await;
    let health = format!("{}/health", app.url());
    let address = app.addr().to_string();
    let sc = Logged::start(
        "micro-flags",
        &[
            "--server_name=greeter",
            "--server_address",
            &address,
            "--healthcheck_url",
            &health,
            "--register_ttl",
            "30",
        ],
        &[],
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            !node_ids(&sc.sidecar, "greeter").await.is_empty()
        })
        .await,
        "the app was not registered"
    );
    let status = pillion_testkit::http::get(&sc.sidecar.url("/statusz"))
        .await
        .unwrap()
        .json();
    assert_eq!(status["app"]["address"], address);
    let log = sc.stderr();
    for line in [
        "warning: --server_name is deprecated; use --server-name",
        "warning: --server_address is deprecated; use --server-address",
        "warning: --healthcheck_url is deprecated; use --healthcheck-url",
        "warning: --register_ttl is deprecated; use --register-ttl 30s",
    ] {
        assert_eq!(
            log.lines().filter(|l| *l == line).count(),
            1,
            "{line:?} not once in:\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn micros_environment_registers_the_app_too() {
    let app = TestApp::start("mailer").await;
    let address = app.addr().to_string();
    let sc = Logged::start(
        "micro-env",
        &[],
        &[
            ("MICRO_SERVER_NAME", "mailer"),
            ("MICRO_SERVER_ADDRESS", &address),
        ],
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            !node_ids(&sc.sidecar, "mailer").await.is_empty()
        })
        .await,
        "the app was not registered"
    );
    assert!(
        sc.stderr()
            .contains("warning: MICRO_SERVER_NAME is deprecated; use --server-name"),
        "{}",
        sc.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bailiffs_environment_runs_the_sessions_proxy_on_redis() {
    let redis = Server::redis();
    let app = TestApp::start("app").await;
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let redis_addr = redis.addr().to_string();
    let listen_text = listen.to_string();
    let sc = Logged::start(
        "bailiff-env",
        &[],
        &[
            ("BAILIFF_PORT", &listen_text),
            ("BAILIFF_PROXY", &app.url()),
            ("BAILIFF_STORE_REDIS_ADDR", &redis_addr),
            ("BAILIFF_COOKIE_MAXAGE", "120"),
        ],
    );
    assert!(wait_for_port(listen, Duration::from_secs(10)));

    let first = request(
        http::Method::GET,
        &format!("http://{listen}/?h=X-Session-Set-User-Id:7"),
        &[],
        "",
    )
    .await
    .unwrap();
    let cookie = first
        .headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| v.strip_prefix("session="))
        .expect("a session cookie")
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let again = request(
        http::Method::GET,
        &format!("http://{listen}/"),
        &[("cookie", &format!("session={cookie}"))],
        "",
    )
    .await
    .unwrap();
    assert_eq!(again.json()["headers"]["x-session-user-id"], "7");
    // Kept in bailiff's Redis, with bailiff's max-age as its TTL.
    let direct = pillion_session::open(&redis.url().parse().unwrap(), Default::default()).unwrap();
    let ttl = direct.ttl(&cookie).await.unwrap().expect("a TTL in Redis");
    assert!(
        ttl <= Duration::from_secs(120) && ttl > Duration::from_secs(100),
        "{ttl:?}"
    );

    let log = sc.stderr();
    assert!(
        log.contains("warning: BAILIFF_PROXY is deprecated; use --app"),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "warning: BAILIFF_STORE_REDIS_ADDR is deprecated; use --session-store redis://{redis_addr}"
        )),
        "{log}"
    );
    assert!(
        log.contains("warning: BAILIFF_COOKIE_MAXAGE is deprecated; use --session-max-age 120"),
        "{log}"
    );
}

#[test]
fn settings_pillion_cannot_honour_are_refused_at_start_naming_its_equivalent() {
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        (
            &["run", "--enable_tls"],
            &[],
            "--api-tls-cert FILE --api-tls-key FILE",
        ),
        (&["--enable_acme", "run"], &[], "--api-acme-domain NAME"),
        (&["run", "--registry", "consul"], &[], "etcd://HOST:PORT"),
        (
            &["run"],
            &[("BAILIFF_STORE_REDIS_POOLSIZE", "10")],
            "--session-store",
        ),
        (
            &["run"],
            &[("BAILIFF_HEADERS_SETPREFIX", "X-Put-")],
            "--session-header-prefix",
        ),
        (&["run", "--check"], &[], "pillion check FILE"),
    ];
    for (args, env, names) in cases {
        let (code, out, err) = run_to_end(args, env);
        assert_eq!(code, 2, "{args:?} {env:?}: {err}");
        assert!(out.is_empty(), "{out}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(
            err.starts_with("error: ") && err.contains(names),
            "{args:?} {env:?}: {err}"
        );
    }
}

#[test]
fn a_bailiff_password_never_reaches_the_log() {
    // A bad --address makes the sidecar stop at once, after its notices.
    let (code, _, err) = run_to_end(
        &["run", "--address", "not-an-address"],
        &[
            ("BAILIFF_PORT", "127.0.0.1:1"),
            ("BAILIFF_STORE_REDIS_ADDR", "127.0.0.1:1"),
            ("BAILIFF_STORE_REDIS_PASSWORD", "hunter2-secret"),
        ],
    );
    assert_ne!(code, 0);
    assert!(err.contains("redis://:***@127.0.0.1:1"), "{err}");
    assert!(
        !err.contains("hunter2-secret"),
        "the password was printed:\n{err}"
    );
}

#[test]
fn iaidos_bootstrap_flags_write_the_config() {
    let file = scratch("iaido").join("pillion.toml");
    let file_text = file.to_str().unwrap();
    let (code, _, err) = run_to_end(
        &[
            "bootstrap",
            "--config",
            file_text,
            "--bootstrapAddr",
            "127.0.0.2",
            "--bootstrap",
            "26257:127.0.0.1:26258",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("warning: --bootstrapAddr is deprecated; use --bootstrap-addr"),
        "{err}"
    );
    let written = std::fs::read_to_string(&file).unwrap();
    assert!(written.contains("127.0.0.2:26257"), "{written}");
    let (code, _, err) = run_to_end(&["check", "--config", file_text], &[]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn micros_proxy_address_names_the_sidecar_the_cli_talks_to() {
    let port = free_port();
    let (code, out, err) = run_to_end(
        &["services", "--proxy_address", &format!("127.0.0.1:{port}")],
        &[],
    );
    assert_eq!(code, 1, "{err}");
    assert!(out.is_empty(), "{out}");
    assert!(
        err.contains(&format!(
            "warning: --proxy_address is deprecated; use --sidecar http://127.0.0.1:{port}"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!("no sidecar answers at http://127.0.0.1:{port}")),
        "{err}"
    );
}

#[test]
fn bailiffs_config_file_migrates_to_toml_that_check_passes() {
    let dir = scratch("bailiff-file");
    let file = dir.join("config.yaml");
    std::fs::write(
        &file,
        "Port: 8080\nProxy: 3000\nRolling: true\nCookie:\n  MaxAge: 600\nStore:\n  Redis:\n    Addr: 127.0.0.1:6380\n",
    )
    .unwrap();
    let (code, _, err) = run_to_end(&["check", file.to_str().unwrap()], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("pillion migrate"), "{err}");

    let (code, toml, err) = run_to_end(&["migrate", file.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    for line in [
        "listen = \"0.0.0.0:8080\"",
        "app = \"http://127.0.0.1:3000\"",
        "session_store = \"redis://127.0.0.1:6380\"",
        "session_max_age = \"600\"",
        "session_rolling = \"true\"",
    ] {
        assert!(toml.contains(line), "{line} missing:\n{toml}");
    }
    let migrated = dir.join("pillion.toml");
    std::fs::write(&migrated, &toml).unwrap();
    let (code, _, err) = run_to_end(&["check", migrated.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}\n{toml}");

    std::fs::write(&file, "Port: 8080\nCookie:\n  Flavour: x\n").unwrap();
    let (code, _, err) = run_to_end(&["migrate", file.to_str().unwrap()], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("BAILIFF_COOKIE_FLAVOUR"), "{err}");
}

/// bailiff's config file where bailiff looked for it (`$HOME/.bailiff/config.yaml`),
/// read like its variables, which win over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bailiffs_config_file_is_read_where_bailiff_looked_for_it() {
    let redis = Server::redis();
    let app = TestApp::start("app").await;
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let home = scratch("bailiff-home");
    std::fs::create_dir_all(home.join(".bailiff")).unwrap();
    std::fs::write(
        home.join(".bailiff/config.yaml"),
        format!(
            "Port: {listen}\nProxy: {}\nCookie:\n  MaxAge: 300\nStore:\n  Redis:\n    Addr: {}\n",
            app.url(),
            redis.addr()
        ),
    )
    .unwrap();
    let home_text = home.display().to_string();
    let sc = Logged::start(
        "bailiff-file",
        &[],
        &[("HOME", &home_text), ("BAILIFF_COOKIE_MAXAGE", "120")],
    );
    assert!(
        wait_for_port(listen, Duration::from_secs(10)),
        "the file's Port: {}",
        sc.stderr()
    );
    let reply = request(
        http::Method::GET,
        &format!("http://{listen}/?h=X-Session-Set-User-Id:7"),
        &[],
        "",
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 200, "the file's Proxy: {}", reply.text());
    let log = sc.stderr();
    assert!(
        log.contains("reading bailiff's config file") && log.contains(".bailiff/config.yaml"),
        "{log}"
    );
    assert!(
        log.contains("--session-max-age 120"),
        "the variable wins over the file: {log}"
    );
}
