//! bailiff's stored sessions at the cutover, with sessions written and read by Go's
//! own `encoding/gob` (`tests/bailiff/session.go`, the standard library only) in a
//! real Redis: a visitor logged in under bailiff stays logged in behind pillion (the
//! session moved to pillion's format, the old key gone), and with
//! `--session-format bailiff` pillion keeps bailiff's format, which Go reads back.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::{inbound, issued};
use pillion_testkit::http::{request, Reply};
use pillion_testkit::{Server, TestApp};

const PROGRAM: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/bailiff/session.go");

fn run_go(args: &[&str]) -> String {
    common::go_run(PROGRAM, args)
}

/// One Redis command over RESP: the reply's payload (a bulk string's bytes, or the
/// line of a simple reply; `None` for a null bulk).
fn redis(addr: SocketAddr, args: &[&[u8]]) -> Option<Vec<u8>> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut cmd = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        cmd.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        cmd.extend_from_slice(a);
        cmd.extend_from_slice(b"\r\n");
    }
    s.write_all(&cmd).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "redis closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
        let Some(eol) = got.windows(2).position(|w| w == b"\r\n") else {
            continue;
        };
        let line = String::from_utf8_lossy(&got[1..eol]).to_string();
        match got[0] {
            b'$' if line == "-1" => return None,
            b'$' => {
                let len: usize = line.parse().unwrap();
                if got.len() >= eol + 2 + len + 2 {
                    return Some(got[eol + 2..eol + 2 + len].to_vec());
                }
            }
            b'-' => panic!("redis: {line}"),
            _ => return Some(line.into_bytes()),
        }
    }
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A session bailiff wrote: its id, stored under `prefix` + id for an hour.
fn bailiff_session(redis_at: SocketAddr, prefix: &str) -> String {
    let line = run_go(&["new"]);
    let (id, gob) = line.split_once(' ').unwrap();
    let key = format!("{prefix}{id}");
    redis(
        redis_at,
        &[b"SET", key.as_bytes(), &unhex(gob), b"EX", b"3600"],
    );
    id.to_string()
}

async fn visit(at: SocketAddr, path: &str, id: &str) -> Reply {
    let cookie = format!("session={id}");
    request(
        http::Method::GET,
        &format!("http://{at}{path}"),
        &[("cookie", &cookie)],
        "",
    )
    .await
    .unwrap()
}

fn seen(reply: &Reply, header: &str) -> String {
    reply.json()["headers"][header]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_visitor_logged_in_under_bailiff_stays_logged_in_and_moves_to_pillion_s_format() {
    let store = Server::redis();
    let app = TestApp::start("app").await;
    let id = bailiff_session(store.addr(), "");
    let (_sc, at) = inbound(&app.url(), &["--session-store", &store.url()]);

    let first = visit(at, "/todo", &id).await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(seen(&first, "x-session-user-id"), "42", "{}", first.text());
    let moved = issued(&first).expect("the session moves to a pillion id");
    assert_eq!(moved.len(), 43, "{moved}");
    // Both values of Roles, in pillion's hash (one field, values one per line).
    let roles = redis(
        store.addr(),
        &[
            b"HGET",
            format!("pillion:session:{moved}").as_bytes(),
            b"roles",
        ],
    );
    assert_eq!(roles.as_deref(), Some(&b"admin\nops"[..]));
    assert!(
        redis(store.addr(), &[b"EXISTS", id.as_bytes()]) == Some(b"0".to_vec()),
        "bailiff's key is gone once moved"
    );

    let again = visit(at, "/todo", &moved).await;
    assert_eq!(seen(&again, "x-session-user-id"), "42", "still logged in");
    assert!(issued(&again).is_none());
    // The old id is no session any more.
    let stale = visit(at, "/todo", &id).await;
    assert_eq!(seen(&stale, "x-session-user-id"), "");

    // What is not a session bailiff could have written is no session, and no error.
    let junk = "A".repeat(103);
    redis(store.addr(), &[b"SET", junk.as_bytes(), b"not gob at all"]);
    let reply = visit(at, "/todo", &junk).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(seen(&reply, "x-session-user-id"), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_session_format_bailiff_pillion_writes_what_bailiff_reads() {
    let store = Server::redis();
    let app = TestApp::start("app").await;
    let id = bailiff_session(store.addr(), "app:");
    let (_sc, at) = inbound(
        &app.url(),
        &[
            "--session-store",
            &store.url(),
            "--session-format",
            "bailiff",
            "--session-bailiff-prefix",
            "app:",
        ],
    );
    // The app adds a key: it is written in bailiff's format, under bailiff's id.
    let reply = visit(at, "/cart?h=X-Session-Set-Cart:3%20apples", &id).await;
    assert_eq!(seen(&reply, "x-session-user-id"), "42", "{}", reply.text());
    assert!(issued(&reply).is_none(), "the id stays bailiff's");
    let key = format!("app:{id}");
    let stored = redis(store.addr(), &[b"GET", key.as_bytes()]).expect("the session");
    let read: serde_json::Value = serde_json::from_str(&run_go(&["read", &hex(&stored)])).unwrap();
    assert_eq!(
        read,
        serde_json::json!({"User-Id": ["42"], "Roles": ["admin", "ops"], "Cart": ["3 apples"]}),
        "Go's gob decoder reads what pillion wrote"
    );
    let ttl = redis(store.addr(), &[b"TTL", key.as_bytes()]).unwrap();
    let ttl: i64 = String::from_utf8(ttl).unwrap().parse().unwrap();
    assert!(ttl > 0, "the key keeps a TTL (the cookie's max-age)");

    // A new visitor gets a bailiff id, stored in bailiff's format.
    let login = request(
        http::Method::GET,
        &format!("http://{at}/login?h=X-Session-Set-User-Id:7"),
        &[],
        "",
    )
    .await
    .unwrap();
    let new = issued(&login).expect("a new session");
    assert_eq!(new.len(), 103, "bailiff's id shape: {new}");
    let stored = redis(store.addr(), &[b"GET", format!("app:{new}").as_bytes()]).unwrap();
    let read: serde_json::Value = serde_json::from_str(&run_go(&["read", &hex(&stored)])).unwrap();
    assert_eq!(read, serde_json::json!({"User-Id": ["7"]}));
}
