//! Configuration as a user meets it: `pillion check`, flag > env > file > default,
//! and errors that name the flag, key and line.

mod common;

use common::{run_to_end, Sidecar};
use pillion_testkit::{free_port, http::get};

fn write(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("pillion-config-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("pillion.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn check_accepts_a_valid_file() {
    let path = write(
        "valid",
        "address = \"127.0.0.1:8181\"\nregistry = \"memory\"\nhealthcheck_interval = \"10s\"\n",
    );
    let (code, out, err) = run_to_end(&["check", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(": ok"), "{out}");
}

#[test]
fn a_tcp_tier_of_services_without_the_mesh_is_refused() {
    let path = write(
        "tcp-services",
        "[[tcp]]\nlisten = \"127.0.0.1:1\"\n[[tcp.tiers]]\nservices = [\"orders\"]\n",
    );
    let (code, _, err) = run_to_end(&["check", path.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("a tier with services = [...] reaches them through their mesh listeners, which needs this sidecar in the mesh"),
        "{err}"
    );
}

#[test]
fn a_misspelt_variable_is_warned_about_with_the_one_meant() {
    let path = write("variables", "address = \"127.0.0.1:1\"\n");
    let (code, _, err) = run_to_end(
        &["check", path.to_str().unwrap()],
        &[
            ("PILLION_REGSITRY", "etcd://127.0.0.1:2379"),
            ("PILLION_TOTALLY_UNKNOWN", "1"),
            ("PILLION_SIDECAR", "http://127.0.0.1:8081"),
            ("PILLION_RETRIES", "3"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("warning: PILLION_REGSITRY is not a pillion setting and has no effect; did you mean PILLION_REGISTRY?"),
        "{err}"
    );
    assert!(
        err.contains("warning: PILLION_TOTALLY_UNKNOWN is not a pillion setting"),
        "{err}"
    );
    // The CLI's variables and run's are settings.
    assert!(
        !err.contains("PILLION_SIDECAR") && !err.contains("PILLION_RETRIES"),
        "{err}"
    );
}

#[test]
fn check_rejects_unknown_keys_and_bad_values_naming_key_and_line() {
    let cases = [
        (
            "unknown",
            "address = \"127.0.0.1:1\"\n\nhealthcheck_intervall = \"1s\"\n",
            "line 3",
            "healthcheck_intervall",
        ),
        (
            "baddur",
            "register_ttl = \"ten seconds\"\n",
            "line 1",
            "invalid duration",
        ),
        ("badaddr", "address = \"localhost\"\n", "line 1", "address"),
    ];
    // Options that only make sense together are checked as `run` checks them.
    let alone = write("combination", "session_store = \"memory\"\n");
    let (code, _, err) = run_to_end(&["check", "--config", alone.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("--session-store needs --listen and --app"),
        "{err}"
    );
    for (name, text, line, key) in cases {
        let path = write(name, text);
        let (code, _, err) = run_to_end(&["check", "--config", path.to_str().unwrap()], &[]);
        assert_eq!(code, 1, "{name}: {err}");
        assert!(err.contains(line) && err.contains(key), "{name}: {err}");
        assert!(
            err.contains(path.to_str().unwrap()),
            "names the file: {err}"
        );
    }
    let (code, _, err) = run_to_end(&["check", "--config", "/nonexistent/pillion.toml"], &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("cannot read config file /nonexistent/pillion.toml"),
        "{err}"
    );
}

#[test]
fn run_refuses_bad_flags_env_and_combinations_before_starting() {
    let app_with = |metadata| {
        [
            "run",
            "--server-name",
            "a",
            "--server-address",
            "h:1",
            "--server-metadata",
            metadata,
        ]
    };
    // Over the registry's limit of metadata per node, the same on every backend.
    let big_metadata = format!("blob={}", "x".repeat(40_001));
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        (
            &["run", "--healthcheck-interval", "30"],
            &[],
            "--healthcheck-interval",
        ),
        (
            &["run"],
            &[("PILLION_REGISTER_TTL", "soon")],
            "--register-ttl",
        ),
        (
            &["run", "--registry", "zookeeper://x:1"],
            &[],
            "memory, mdns or etcd://",
        ),
        (
            &["run", "--server-name", "a"],
            &[],
            "needs --server-address",
        ),
        (
            &["run", "--healthcheck-url", "http://127.0.0.1:1/h"],
            &[],
            "needs --server-name",
        ),
        (&app_with("oops"), &[], "not key=value"),
        (
            &app_with(&big_metadata),
            &[],
            "--server-metadata (server_metadata): the app's registration would be refused: \
             invalid service: nodes[0] carries 40005 bytes of metadata",
        ),
    ];
    for (args, env, want) in cases {
        let (code, _, err) = run_to_end(args, env);
        assert_ne!(code, 0, "{args:?} should fail");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn a_taken_port_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, _, err) = run_to_end(&["run", "--address", &addr], &[]);
    assert_eq!(code, 1);
    assert!(err.contains(&format!("cannot listen on {addr}")), "{err}");
}

#[tokio::test]
async fn flag_beats_env_beats_file() {
    let (p_file, p_env) = (free_port(), free_port());
    let path = write(
        "precedence",
        &format!("address = \"127.0.0.1:{p_file}\"\nregistry = \"memory\"\n"),
    );
    let config = path.to_str().unwrap();
    let env_addr = format!("127.0.0.1:{p_env}");

    // The sidecar helper always passes --address: the flag wins over env and file.
    let sc = Sidecar::start_with_env(&["--config", config], &[("PILLION_ADDRESS", &env_addr)]);
    let status = get(&sc.url("/statusz")).await.unwrap().json();
    assert_eq!(status["address"], sc.addr.to_string());
    drop(sc);

    // Without the flag: env beats the file.
    let mut cmd = std::process::Command::new(common::BIN);
    cmd.args(["run", "--config", config])
        .env("PILLION_ADDRESS", &env_addr);
    let _env_run = pillion_testkit::Daemon::spawn("pillion", cmd);
    let env_sock = env_addr.parse().unwrap();
    assert!(pillion_testkit::wait_for_port(
        env_sock,
        std::time::Duration::from_secs(10)
    ));
    let status = get(&format!("http://{env_addr}/statusz"))
        .await
        .unwrap()
        .json();
    assert_eq!(status["address"], env_addr);

    // Without flag or env: the file.
    let mut cmd = std::process::Command::new(common::BIN);
    cmd.args(["run", "--config", config])
        .env_remove("PILLION_ADDRESS");
    let _file_run = pillion_testkit::Daemon::spawn("pillion", cmd);
    let file_addr = format!("127.0.0.1:{p_file}");
    assert!(pillion_testkit::wait_for_port(
        file_addr.parse().unwrap(),
        std::time::Duration::from_secs(10)
    ));
    let status = get(&format!("http://{file_addr}/statusz"))
        .await
        .unwrap()
        .json();
    assert_eq!(status["address"], file_addr);
}

/// An error about a value or a combination says where each option came from: the
/// variable (not a flag nobody typed), or the file and its line.
#[test]
fn errors_name_the_variable_or_the_file_line_that_set_the_option() {
    let (code, _, err) = run_to_end(
        &["run", "--registry", "memory"],
        &[("PILLION_RETRIES", "abc")],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("'abc' for PILLION_RETRIES"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    // The same value typed as a flag is the flag's.
    let (code, _, err) = run_to_end(&["run", "--registry", "memory", "--retries", "abc"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        !err.contains("PILLION_RETRIES") && err.contains("'--retries <N>'"),
        "{err}"
    );

    let path = write(
        "cross-key",
        "# the session store, without the inbound proxy\nsession_store = \"redis://127.0.0.1:6379\"\n",
    );
    let (code, _, err) = run_to_end(
        &[
            "run",
            "--registry",
            "memory",
            "--config",
            path.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!("(--session-store: {}, line 2)", path.display())),
        "{err}"
    );
    let (code, _, err) = run_to_end(
        &["run", "--registry", "memory"],
        &[("PILLION_SESSION_STORE", "redis://127.0.0.1:6379")],
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("(--session-store: PILLION_SESSION_STORE)"),
        "{err}"
    );
}

/// `--ready-file` names the ports a sidecar started on port 0 got (every test's
/// sidecar is started so); one that cannot be written stops the start, named.
#[test]
fn the_ready_file_names_the_bound_ports_or_stops_the_start() {
    let sc = Sidecar::start(&[
        "--registry",
        "memory",
        "--listen",
        "127.0.0.1:0",
        "--app",
        "http://127.0.0.1:9",
    ]);
    assert_ne!(sc.addr.port(), 0);
    let listen: std::net::SocketAddr = sc.ready["listen"].as_str().unwrap().parse().unwrap();
    assert_ne!(listen.port(), 0);
    assert!(std::net::TcpStream::connect(listen).is_ok());

    let (code, _, err) = run_to_end(
        &[
            "run",
            "--registry",
            "memory",
            "--address",
            "127.0.0.1:0",
            "--ready-file",
            "/nonexistent-dir/ready",
        ],
        &[],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("cannot write --ready-file /nonexistent-dir/ready"),
        "{err}"
    );
}
