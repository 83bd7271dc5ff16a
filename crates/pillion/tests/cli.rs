//! The client commands as a person or a script uses them: `pillion services`, `call`,
//! `publish`, `subscribe` and `status` run against a real sidecar (the built binary),
//! whose services are real HTTP apps; a sidecar that is not there; a sidecar that
//! wants a token. Every child process is killed if it outlives its deadline.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{register, Sidecar, BIN};
use pillion_testkit::{free_port, TestApp};

/// How long any one `pillion` command may run before the test kills it.
const LIMIT: Duration = Duration::from_secs(30);

const TOKEN: &str = "cli-test-token-8f3a2c71";

/// What a command left behind.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// A `pillion` child killed on drop, whatever became of the test.
struct Client(Child);

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `pillion ARGS` with the given environment (and nothing of the test's own
/// PILLION_SIDECAR or PILLION_API_TOKEN), stdout and stderr piped.
fn spawn(args: &[&str], env: &[(&str, &str)], stdin: bool) -> Client {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("PILLION_SIDECAR")
        .env_remove("PILLION_API_TOKEN")
        .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    Client(cmd.spawn().expect("starting pillion"))
}

/// Reads a pipe to its end on a thread of its own.
fn drain(pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = BufReader::new(pipe).read_to_string(&mut s);
        s
    })
}

/// Waits for the child within what is left of `deadline`; panics (killing it) past it.
fn finish(
    mut client: Client,
    stdout: std::thread::JoinHandle<String>,
    stderr: std::thread::JoinHandle<String>,
    deadline: Instant,
) -> Run {
    let code = loop {
        if let Some(status) = client.0.try_wait().expect("waiting for pillion") {
            break status.code().unwrap_or(-1);
        }
        assert!(
            Instant::now() < deadline,
            "pillion did not exit within {LIMIT:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        code,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// Runs `pillion ARGS` to its end (at most [`LIMIT`]), with `input` on its stdin.
fn pillion_with(args: &[&str], env: &[(&str, &str)], input: Option<&[u8]>) -> Run {
    let deadline = Instant::now() + LIMIT;
    let mut client = spawn(args, env, input.is_some());
    if let Some(input) = input {
        let mut stdin = client.0.stdin.take().unwrap();
        stdin.write_all(input).unwrap();
    }
    let out = drain(client.0.stdout.take().unwrap());
    let err = drain(client.0.stderr.take().unwrap());
    finish(client, out, err, deadline)
}

fn pillion(args: &[&str]) -> Run {
    pillion_with(args, &[], None)
}

/// Runs a command off the runtime's threads (the test's apps serve on them).
async fn pillion_async(args: Vec<String>, env: Vec<(String, String)>) -> Run {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        pillion_with(&args, &env, None)
    })
    .await
    .unwrap()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// A sidecar with a memory registry (nothing from other tests), and `extra` flags.
fn sidecar(extra: &[&str]) -> (Sidecar, String) {
    let mut all = vec!["--registry", "memory"];
    all.extend_from_slice(extra);
    let sc = Sidecar::start(&all);
    let url = format!("http://{}", sc.addr);
    (sc, url)
}

#[tokio::test(flavor = "multi_thread")]
async fn services_are_a_table_for_people_and_json_for_scripts() {
    let app = TestApp::start("greeter").await;
    let (sc, url) = sidecar(&[]);
    register(
        &sc,
        "greeter",
        "greeter-1",
        &app.addr().to_string(),
        &[("zone", "eu-1")],
    )
    .await;
    register(&sc, "billing", "billing-1", "127.0.0.1:9", &[]).await;
    // The embedded broker's own registration: plumbing, listed with --all only.
    register(&sc, "pillion.broker", "sidecar-1", "127.0.0.1:8", &[]).await;

    let everything = pillion_async(args(&["services", "--all", "--sidecar", &url]), vec![]).await;
    assert!(
        everything.stdout.contains("pillion.broker"),
        "{everything:?}"
    );
    let json = pillion_async(args(&["services", "--json", "--sidecar", &url]), vec![]).await;
    let parsed: serde_json::Value = serde_json::from_str(&json.stdout).expect("--json is JSON");
    assert_eq!(parsed.as_array().unwrap().len(), 2, "{json:?}");

    let all = pillion_async(args(&["services", "--sidecar", &url]), vec![]).await;
    assert_eq!(all.code, 0, "{all:?}");
    let lines: Vec<&str> = all.stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "NAME     VERSION  NODES",
            "billing  -        1",
            "greeter  -        1"
        ],
        "{all:?}"
    );

    let one = pillion_async(args(&["services", "greeter", "--sidecar", &url]), vec![]).await;
    assert_eq!(one.code, 0, "{one:?}");
    let lines: Vec<&str> = one.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{one:?}");
    assert!(lines[0].starts_with("VERSION  ID"), "{one:?}");
    let node: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        node,
        ["-", "greeter-1", &app.addr().to_string(), "zone=eu-1"],
        "{one:?}"
    );

    let json = pillion_async(
        args(&["services", "greeter", "--json", "--sidecar", &url]),
        vec![],
    )
    .await;
    assert_eq!(json.code, 0, "{json:?}");
    let parsed: serde_json::Value = serde_json::from_str(&json.stdout).expect("--json is JSON");
    assert_eq!(parsed[0]["name"], "greeter");
    assert_eq!(parsed[0]["nodes"][0]["id"], "greeter-1");
    assert_eq!(parsed[0]["nodes"][0]["metadata"]["zone"], "eu-1");

    // The environment names the sidecar as well as the flag does.
    let by_env = pillion_async(
        args(&["services", "--json"]),
        vec![("PILLION_SIDECAR".into(), url.clone())],
    )
    .await;
    assert_eq!(by_env.code, 0, "{by_env:?}");
    let parsed: serde_json::Value = serde_json::from_str(&by_env.stdout).unwrap();
    assert_eq!(parsed.as_array().unwrap().len(), 2);

    let missing = pillion_async(args(&["services", "nope", "--sidecar", &url]), vec![]).await;
    assert_eq!(missing.code, 1, "{missing:?}");
    assert_eq!(missing.stderr, "error: no service nope\n");
    assert_eq!(missing.stdout, "");
}

/// `pillion call SERVICE GET /path [BODY]`: the app's REST routes, by name.
#[tokio::test(flavor = "multi_thread")]
async fn call_takes_an_http_method_and_a_path_for_a_rest_app() {
    let app = TestApp::start("users").await;
    let (sc, url) = sidecar(&[]);
    register(&sc, "users", "users-1", &app.addr().to_string(), &[]).await;

    let got = pillion_async(
        args(&["call", "users", "GET", "/users/42?x=1", "--sidecar", &url]),
        vec![],
    )
    .await;
    assert_eq!(got.code, 0, "{got:?}");
    let seen: serde_json::Value = serde_json::from_str(&got.stdout).unwrap();
    assert_eq!(
        (seen["method"].as_str(), seen["path"].as_str()),
        (Some("GET"), Some("/users/42?x=1"))
    );

    let put = pillion_async(
        args(&[
            "call",
            "users",
            "PUT",
            "/users/42",
            r#"{"name":"Ada"}"#,
            "--sidecar",
            &url,
        ]),
        vec![],
    )
    .await;
    assert_eq!(put.code, 0, "{put:?}");
    let seen: serde_json::Value = serde_json::from_str(&put.stdout).unwrap();
    assert_eq!(seen["body"], r#"{"name":"Ada"}"#);
    assert_eq!(seen["headers"]["content-type"], "application/json");

    let missing = pillion_async(
        args(&["call", "nobody", "GET", "/x", "--sidecar", &url]),
        vec![],
    )
    .await;
    assert_eq!(missing.code, 1, "{missing:?}");
    assert!(missing.stderr.contains("404"), "{missing:?}");
    let bad = pillion_async(
        args(&["call", "users", "GET", "users/42", "--sidecar", &url]),
        vec![],
    )
    .await;
    assert_eq!(bad.code, 2, "{bad:?}");
    assert!(bad.stderr.contains("is not a path"), "{bad:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn call_prints_the_answer_and_shows_the_sidecars_error() {
    let app = TestApp::start("greeter").await;
    let (sc, url) = sidecar(&[]);
    register(&sc, "greeter", "greeter-1", &app.addr().to_string(), &[]).await;

    let ok = pillion_async(
        args(&[
            "call",
            "greeter",
            "Say.Hello",
            r#"{"name": "Ada"}"#,
            "--sidecar",
            &url,
        ]),
        vec![],
    )
    .await;
    assert_eq!(ok.code, 0, "{ok:?}");
    let echo: serde_json::Value = serde_json::from_str(&ok.stdout).expect("the app's JSON");
    assert_eq!(echo["app"], "greeter");
    assert_eq!(echo["path"], "/Say.Hello");
    let sent: serde_json::Value = serde_json::from_str(echo["body"].as_str().unwrap()).unwrap();
    assert_eq!(sent, serde_json::json!({"name": "Ada"}));

    // `-` reads the request from stdin.
    let url2 = url.clone();
    let piped = tokio::task::spawn_blocking(move || {
        pillion_with(
            &["call", "greeter", "Say.Hello", "-", "--sidecar", &url2],
            &[],
            Some(br#"{"name": "Grace"}"#),
        )
    })
    .await
    .unwrap();
    assert_eq!(piped.code, 0, "{piped:?}");
    assert!(piped.stdout.contains(r#"\"name\":\"Grace\""#), "{piped:?}");

    let unknown = pillion_async(
        args(&["call", "nope", "Say.Hello", "{}", "--sidecar", &url]),
        vec![],
    )
    .await;
    assert_eq!(unknown.code, 1, "{unknown:?}");
    assert_eq!(unknown.stdout, "");
    assert_eq!(
        unknown.stderr,
        format!(
            "error: the sidecar at {url} answered 404 Not Found: service \"nope\" not found in \
             the registry (pillion.invoke)\n"
        )
    );

    // The service's own error: its body on stderr, its status named.
    app.set_mode(pillion_testkit::Mode::Status(500));
    let failing = pillion_async(
        args(&["call", "greeter", "Say.Hello", "{}", "--sidecar", &url]),
        vec![],
    )
    .await;
    assert_eq!(failing.code, 1, "{failing:?}");
    assert!(failing.stderr.contains(r#""app":"greeter""#), "{failing:?}");
    assert!(
        failing
            .stderr
            .ends_with("error: service greeter answered 500 Internal Server Error\n"),
        "{failing:?}"
    );
}

#[test]
fn malformed_json_is_refused_before_anything_is_sent() {
    // Something listens where the sidecar would be; it must see no connection.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let run = pillion(&[
        "call",
        "greeter",
        "Say.Hello",
        "{name: Ada}",
        "--sidecar",
        &url,
    ]);
    assert_eq!(run.code, 2, "{run:?}");
    assert_eq!(run.stdout, "");
    assert!(
        run.stderr.starts_with("error: the request is not JSON ("),
        "{run:?}"
    );
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
    assert!(
        matches!(listener.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the command connected to the sidecar"
    );
}

/// `pillion subscribe ARGS`, returned once it says it is subscribed; the rest of its
/// stderr comes on the channel when it exits.
fn subscribed(
    args: &[&str],
    env: &[(&str, &str)],
) -> (
    Client,
    std::thread::JoinHandle<String>,
    mpsc::Receiver<String>,
) {
    let mut client = spawn(args, env, false);
    let out = drain(client.0.stdout.take().unwrap());
    let mut err = BufReader::new(client.0.stderr.take().unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = err.read_line(&mut line);
        let _ = tx.send(line);
        let mut rest = String::new();
        let _ = err.read_to_string(&mut rest);
        let _ = tx.send(rest);
    });
    let line = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("subscribe said nothing within 10 s");
    assert!(line.starts_with("subscribed to "), "{line}");
    (client, out, rx)
}

/// Waits for a subscriber to exit on its own within [`LIMIT`]; its code and stdout.
fn exits(mut client: Client, out: std::thread::JoinHandle<String>) -> (i32, String) {
    let deadline = Instant::now() + LIMIT;
    let code = loop {
        if let Some(status) = client.0.try_wait().unwrap() {
            break status.code().unwrap_or(-1);
        }
        assert!(Instant::now() < deadline, "subscribe did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    (code, out.join().unwrap())
}

#[test]
fn publish_and_subscribe_a_line_per_message() {
    let (_sc, url) = sidecar(&[]);
    let (sub, out, _) = subscribed(
        &["subscribe", "orders.*", "--count", "2", "--sidecar", &url],
        &[],
    );

    let first = pillion(&["publish", "orders.new", "first order", "--sidecar", &url]);
    assert_eq!(first.code, 0, "{first:?}");
    assert_eq!(first.stdout, "published 11 bytes to orders.new\n");
    // Not UTF-8: printed as base64.
    let second = pillion_with(
        &["publish", "orders.paid", "-", "--sidecar", &url],
        &[],
        Some(&[0xff, 0x00]),
    );
    assert_eq!(second.code, 0, "{second:?}");
    // --json: the sidecar's acknowledgement (published after the two counted).
    let (code, stdout) = exits(sub, out);
    let ack = pillion(&["publish", "news", "hi", "--json", "--sidecar", &url]);
    assert_eq!(ack.code, 0, "{ack:?}");
    let ack: serde_json::Value = serde_json::from_str(&ack.stdout).unwrap();
    assert_eq!(
        ack,
        serde_json::json!({"topic": "news", "bytes": 2, "backend": "embedded", "stored": false})
    );

    assert_eq!(code, 0);
    assert_eq!(stdout, "first order\n/wA=\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn status_summarises_the_sidecar() {
    let app = TestApp::start("greeter").await;
    let health = format!("{}/health", app.url());
    let (_sc, url) = sidecar(&[
        "--server-name",
        "greeter",
        "--server-address",
        &app.addr().to_string(),
        "--healthcheck-url",
        &health,
        "--healthcheck-interval",
        "1s",
    ]);
    // The app is registered once its first health check passes.
    let registered = common::eventually(Duration::from_secs(10), || {
        let url = url.clone();
        async move {
            let run = pillion_async(args(&["status", "--sidecar", &url]), vec![]).await;
            run.stdout.contains(": registered")
        }
    })
    .await;
    assert!(registered, "the app was never shown registered");

    let run = pillion_async(args(&["status", "--sidecar", &url]), vec![]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let lines: Vec<&str> = run.stdout.lines().collect();
    let line = |key: &str| -> String {
        lines
            .iter()
            .find(|l| l.split_whitespace().next() == Some(key))
            .unwrap_or_else(|| panic!("no {key} line in {run:?}"))
            .to_string()
    };
    assert_eq!(line("sidecar"), format!("sidecar   {url}"));
    assert_eq!(
        line("version"),
        format!("version   pillion {}", env!("CARGO_PKG_VERSION"))
    );
    assert!(line("uptime").starts_with("uptime    "));
    assert_eq!(line("health"), "health    ok");
    assert_eq!(line("registry"), "registry  memory, healthy");
    assert_eq!(line("broker"), "broker    embedded, healthy");
    assert_eq!(line("services"), "services  1 (1 node)");
    let app_line = line("app");
    assert!(
        app_line.starts_with("app       greeter (node greeter-"),
        "{app_line}"
    );
    assert!(
        app_line.contains(&format!("at {}): registered", app.addr())),
        "{app_line}"
    );

    let json = pillion_async(args(&["status", "--json", "--sidecar", &url]), vec![]).await;
    assert_eq!(json.code, 0, "{json:?}");
    let parsed: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(parsed["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(parsed["app"]["registered"], true);
}

/// `pillion status` as a probe: exit 1 while the app is not registered (its health
/// check fails), and never "health ok" alone then.
#[tokio::test(flavor = "multi_thread")]
async fn status_exits_1_while_the_app_is_not_registered() {
    let app = TestApp::start("late").await;
    app.set_health(pillion_testkit::Health::Failing);
    let health = format!("{}/health", app.url());
    let (_sc, url) = sidecar(&[
        "--server-name",
        "late",
        "--server-address",
        &app.addr().to_string(),
        "--healthcheck-url",
        &health,
        "--healthcheck-interval",
        "200ms",
    ]);
    let unwell = common::eventually(Duration::from_secs(10), || {
        let url = url.clone();
        async move {
            let run = pillion_async(args(&["status", "--sidecar", &url]), vec![]).await;
            run.code == 1 && run.stderr.contains("last health check")
        }
    })
    .await;
    assert!(unwell, "status never said the app was not registered");
    let run = pillion_async(args(&["status", "--sidecar", &url]), vec![]).await;
    assert!(
        run.stdout
            .contains("health    ok, but its app late is not registered"),
        "{run:?}"
    );
    assert!(
        run.stderr.starts_with(&format!(
            "error: the sidecar at {url}: its app late is not registered"
        )),
        "{run:?}"
    );
    let json = pillion_async(args(&["status", "--json", "--sidecar", &url]), vec![]).await;
    assert_eq!(json.code, 1, "{json:?}");
    let parsed: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(parsed["app"]["registered"], false);

    // Healthy again: registered, exit 0.
    app.set_health(pillion_testkit::Health::Healthy);
    let well = common::eventually(Duration::from_secs(10), || {
        let url = url.clone();
        async move {
            pillion_async(args(&["status", "--sidecar", &url]), vec![])
                .await
                .code
                == 0
        }
    })
    .await;
    assert!(well);
}

#[test]
fn a_sidecar_that_does_not_answer_is_one_line_and_exit_1() {
    // A port nobody listens on (bound, then let go).
    let url = format!("http://127.0.0.1:{}", free_port());
    let expected = format!(
        "error: no sidecar answers at {url} (connection refused); start one with 'pillion \
         run' or set --sidecar / PILLION_SIDECAR\n"
    );
    for command in [
        vec!["services"],
        vec!["services", "greeter"],
        vec!["call", "greeter", "Say.Hello"],
        vec!["publish", "orders.new", "x"],
        vec!["subscribe", "orders.new"],
        vec!["status", "--json"],
    ] {
        let mut all = command.clone();
        all.extend(["--sidecar", &url]);
        let run = pillion(&all);
        assert_eq!(run.code, 1, "{command:?}: {run:?}");
        assert_eq!(run.stderr, expected, "{command:?}");
        assert_eq!(run.stdout, "", "{command:?}");
    }
    // The default address is the one named when no --sidecar is given; the test
    // cannot know that nothing listens on 8081, so it only checks the name.
    let run = pillion_with(
        &["status"],
        &[("PILLION_SIDECAR", &url), ("PILLION_TIMEOUT", "0")],
        None,
    );
    assert_eq!(
        run.stderr, expected,
        "PILLION_TIMEOUT belongs to `run` and is ignored"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_token_is_required_sent_and_never_shown() {
    let app = TestApp::start("greeter").await;
    let (sc, url) = sidecar(&["--api-token", TOKEN]);
    let bearer = format!("Bearer {TOKEN}");
    let body = serde_json::json!({
        "name": "greeter",
        "nodes": [{"id": "greeter-1", "address": app.addr().to_string()}],
    });
    let reply = pillion_testkit::http::request(
        http::Method::POST,
        &sc.url("/registry"),
        &[
            ("content-type", "application/json"),
            ("authorization", &bearer),
        ],
        body.to_string(),
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());

    let missing = pillion_async(args(&["services", "--sidecar", &url]), vec![]).await;
    assert_eq!(missing.code, 1, "{missing:?}");
    assert_eq!(
        missing.stderr,
        format!(
            "error: the sidecar at {url} requires an API token: set --api-token or \
             PILLION_API_TOKEN to its --api-token\n"
        )
    );
    let wrong = pillion_async(
        args(&[
            "status",
            "--sidecar",
            &url,
            "--api-token",
            "not-the-token-0000",
        ]),
        vec![],
    )
    .await;
    assert_eq!(wrong.code, 1, "{wrong:?}");
    assert_eq!(
        wrong.stderr,
        format!(
            "error: the sidecar at {url} refused the API token: --api-token / \
             PILLION_API_TOKEN is not its --api-token\n"
        )
    );
    let no_sub = pillion_async(args(&["subscribe", "t", "--sidecar", &url]), vec![]).await;
    assert_eq!(no_sub.code, 1, "{no_sub:?}");
    assert!(
        no_sub.stderr.contains("requires an API token"),
        "{no_sub:?}"
    );

    let env = vec![("PILLION_API_TOKEN".to_string(), TOKEN.to_string())];
    let mut shown = Vec::new();
    for command in [
        vec!["services"],
        vec!["services", "greeter", "--json"],
        vec!["status"],
        vec!["call", "greeter", "Say.Hello", "{}"],
    ] {
        let mut all = command.clone();
        all.extend(["--sidecar", &url]);
        let run = pillion_async(args(&all), env.clone()).await;
        assert_eq!(run.code, 0, "{command:?}: {run:?}");
        shown.push(run);
    }
    // The token is the door's: the service called does not get it.
    let echo: serde_json::Value = serde_json::from_str(&shown[3].stdout).unwrap();
    assert!(
        echo["headers"].get("authorization").is_none(),
        "{}",
        shown[3].stdout
    );

    // Nor do the subscribers of a message published with it.
    let envs = [("PILLION_API_TOKEN", TOKEN)];
    let sub_url = url.clone();
    let (code, frames) = tokio::task::spawn_blocking(move || {
        let (sub, out, _) = subscribed(
            &[
                "subscribe",
                "t",
                "--json",
                "--count",
                "1",
                "--sidecar",
                &sub_url,
            ],
            &envs,
        );
        let published = pillion_with(&["publish", "t", "hi", "--sidecar", &sub_url], &envs, None);
        assert_eq!(published.code, 0, "{published:?}");
        exits(sub, out)
    })
    .await
    .unwrap();
    assert_eq!(code, 0);
    let frame: serde_json::Value = serde_json::from_str(frames.trim_end()).unwrap();
    assert_eq!(frame["Topic"], "t");
    assert_eq!(frame["Body"], "aGk=");
    assert_eq!(frame["Header"], serde_json::json!({}), "{frames}");

    for run in shown.iter().chain([&missing, &wrong]) {
        assert!(
            !run.stdout.contains(TOKEN) && !run.stderr.contains(TOKEN),
            "the token was printed: {run:?}"
        );
    }
    assert!(!frames.contains(TOKEN));
}

#[test]
fn every_client_command_has_an_example_in_its_help() {
    for (command, example) in [
        ("services", "pillion services greeter"),
        (
            "call",
            "pillion call greeter Say.Hello '{\"name\": \"Ada\"}'",
        ),
        ("publish", "pillion publish orders.new '{\"id\": 42}'"),
        ("subscribe", "pillion subscribe 'orders.*'"),
        ("status", "pillion status"),
    ] {
        let run = pillion(&[command, "--help"]);
        assert_eq!(run.code, 0, "{run:?}");
        assert!(run.stdout.contains(example), "{command}: {}", run.stdout);
        for flag in ["--sidecar", "--api-token", "--json", "--timeout"] {
            assert!(run.stdout.contains(flag), "{command} --help lacks {flag}");
        }
    }
}

/// `pillion members` lists the sidecars of the cluster with their app's name and API
/// address; a killed one shows `failed`, one stopped on purpose `left`.
#[tokio::test(flavor = "multi_thread")]
async fn members_lists_the_cluster_with_each_sidecars_state() {
    let rendezvous = format!("127.0.0.1:{}", pillion_testkit::free_udp_port());
    let env = [("PILLION_CLUSTER_BIND", rendezvous.as_str())];
    let start = |name: Option<&str>| {
        let mut args = vec![];
        if let Some(name) = name {
            args.extend(["--server-name", name, "--server-address", "127.0.0.1:9"]);
        }
        Sidecar::start_with_env(&args, &env)
    };
    let users = start(Some("users"));
    let mut todos = start(Some("todos"));
    let mut unnamed = start(None);
    let url = format!("http://{}", users.addr);
    let members = |url: String| async move {
        let run = pillion_async(args(&["members", "--json", "--sidecar", &url]), vec![]).await;
        assert_eq!(run.code, 0, "{run:?}");
        let list: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
        list.as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["api"].as_str().unwrap_or("").to_string(),
                    (
                        m["name"].as_str().unwrap_or("-").to_string(),
                        m["state"].as_str().unwrap().to_string(),
                    ),
                )
            })
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let state = |name: &str, state: &str, addr: std::net::SocketAddr| {
        (addr.to_string(), (name.to_string(), state.to_string()))
    };
    let all_alive = [
        state("users", "alive", users.addr),
        state("todos", "alive", todos.addr),
        state("-", "alive", unnamed.addr),
    ]
    .into_iter()
    .collect();
    assert!(
        common::eventually(Duration::from_secs(10), || {
            let url = url.clone();
            let want = &all_alive;
            async move { members(url).await == *want }
        })
        .await,
        "never all three alive: {:?}",
        members(url.clone()).await
    );

    // The table for people: a header, this sidecar first.
    let run = pillion_async(args(&["members", "--sidecar", &url]), vec![]).await;
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["NAME", "API", "GOSSIP", "STATE", "AGE"]
    );
    assert!(lines[1].starts_with("users "), "{}", run.stdout);
    assert_eq!(lines.len(), 4, "{}", run.stdout);

    todos.process.kill();
    unnamed.process.signal("TERM");
    assert_eq!(unnamed.process.wait_exit(Duration::from_secs(15)), Some(0));
    let gone = [
        state("users", "alive", users.addr),
        state("todos", "failed", todos.addr),
        state("-", "left", unnamed.addr),
    ]
    .into_iter()
    .collect();
    assert!(
        common::eventually(Duration::from_secs(20), || {
            let url = url.clone();
            let want = &gone;
            async move { members(url).await == *want }
        })
        .await,
        "never failed and left: {:?}",
        members(url.clone()).await
    );
}

#[test]
fn members_of_a_sidecar_without_a_cluster_say_so() {
    let (_sc, url) = sidecar(&[]);
    let run = pillion(&["members", "--sidecar", &url]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr
            .contains("keeps its registry in memory, not in a cluster of sidecars"),
        "{run:?}"
    );
}

/// A sidecar that stops ends its subscriptions with a close frame: `subscribe` says
/// so and exits 0, as when it has its count.
#[test]
fn subscribe_ends_cleanly_when_the_sidecar_stops() {
    let (sc, url) = sidecar(&[]);
    let (sub, out, stderr) = subscribed(&["subscribe", "orders.*", "--sidecar", &url], &[]);
    sc.process.signal("TERM");
    let (code, stdout) = exits(sub, out);
    let stderr = stderr.recv_timeout(LIMIT).unwrap();
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout, "");
    assert_eq!(
        stderr,
        format!("the sidecar at {url} is stopping: the subscription ended\n")
    );
}
