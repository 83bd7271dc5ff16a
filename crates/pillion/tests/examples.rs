//! The newcomer's walkthrough, `examples/walkthrough.sh`, run as the examples README
//! says, on the binary under test: two apps (Python, Node) and a sidecar beside each,
//! then the registry, calls by name both ways, an event across sidecars and a session.
//! The script checks each step itself; this test checks that it passed and that its
//! output shows what a reader is told to expect. It needs bash, curl, python3 and node.
//! The script and everything it started are killed if it outlives its deadline.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long the walkthrough may run (it takes a few seconds) before it is killed.
const LIMIT: Duration = Duration::from_secs(120);

/// Reads a pipe to its end on a thread of its own.
fn drain(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Sends `signal` to every process of the group `pgid`.
fn kill_group(signal: &str, pgid: u32) {
    let _ = Command::new("kill")
        .args([signal, "--", &format!("-{pgid}")])
        .status();
}

#[test]
fn the_walkthrough_shows_both_services_calls_by_name_an_event_and_a_session() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/walkthrough.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(&script)
        .env("PILLION", env!("CARGO_BIN_EXE_pillion"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so that a deadline kills the apps and sidecars too.
        .process_group(0);
    // Only the script's own settings: none of the test runner's PILLION_* variables.
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("PILLION_") {
            cmd.env_remove(name);
        }
    }
    let mut child = cmd.spawn().expect("starting bash examples/walkthrough.sh");
    let stdout = drain(child.stdout.take().expect("stdout"));
    let stderr = drain(child.stderr.take().expect("stderr"));
    let deadline = Instant::now() + LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for the walkthrough") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            // TERM first, so that its trap stops what it started; then KILL the rest.
            kill_group("-TERM", child.id());
            std::thread::sleep(Duration::from_secs(3));
            kill_group("-KILL", child.id());
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = stdout.join().expect("stdout reader");
    let err = stderr.join().expect("stderr reader");
    let shown = format!("--- stdout\n{out}\n--- stderr\n{err}");
    let status = status.unwrap_or_else(|| panic!("the walkthrough ran over {LIMIT:?}\n{shown}"));
    assert!(
        status.success(),
        "the walkthrough failed: {status}\n{shown}"
    );

    let expected = [
        // 1. both services, listed by the todos sidecar
        ("users listed", "\nusers  -        1\n"),
        ("todos listed", "\ntodos  -        1\n"),
        // 2. users -> todos, and todos -> users, by name
        (
            "users' answer with todos from the todos service",
            r#""name": "Ada Lovelace", "todos": [{"id": 1, "user": 1, "title": "write the first program""#,
        ),
        (
            "todos' answer with its owner from the users service",
            r#""title":"break the enigma","done":true,"owner":{"id":2,"name":"Alan Turing"}"#,
        ),
        // 3. the subscriber on the users sidecar prints the todo published on the other
        (
            "the subscriber's line",
            "# the subscriber printed:\n{\"id\":4,\"user\":42,\"title\":\"try pillion\",\"done\":false,\"owner\":\"Grace Hopper\"}\n",
        ),
        // 4. the session
        ("the session cookie", "set-cookie: session="),
        (
            "/me with the cookie",
            "/me\n{\"logged_in\": {\"id\": 42, \"name\": \"Grace Hopper\"}}\n",
        ),
        ("/me without it", "HTTP/1.1 401 Unauthorized"),
        ("the end", "walkthrough: all 4 steps passed"),
    ];
    for (what, text) in expected {
        assert!(
            out.contains(text),
            "{what} ({text:?}) is not shown\n{shown}"
        );
    }
    // Each command is shown as the reader would type it.
    for command in [
        "$ pillion services --sidecar http://127.0.0.1:",
        "$ pillion subscribe todo.created --count 1 --sidecar http://127.0.0.1:",
        "$ curl -sS --max-time 10 -b ",
    ] {
        assert!(out.contains(command), "{command:?} is not shown\n{shown}");
    }
}
