//! Many callers over few pooled connections to a node that frames its answers every
//! way it may (length, chunked in pieces with extensions) after varying delays: every
//! caller gets the answer to its own request, never a neighbour's.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use pillion_http::pool::{Outgoing, Pool, Settings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Answers `GET /id/N` with a body naming N, framed and delayed by N.
async fn node() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            // Each answer goes in two writes: without this, Nagle holds the second
            // until the first is acknowledged.
            let _ = s.set_nodelay(true);
            tokio::spawn(serve(s));
        }
    });
    addr
}

fn expected(id: u64) -> String {
    format!("answer to {id} {}", "x".repeat((id % 97) as usize))
}

async fn serve(mut s: TcpStream) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        buf.drain(..end);
        let id: u64 = head
            .split(' ')
            .nth(1)
            .and_then(|p| p.strip_prefix("/id/"))
            .and_then(|n| n.parse().ok())
            .unwrap_or(u64::MAX);
        let body = expected(id);
        if id.is_multiple_of(3) {
            tokio::time::sleep(Duration::from_micros(id % 1500)).await;
        }
        let out = if id.is_multiple_of(2) {
            format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
        } else {
            let (a, b) = body.split_at(body.len() / 3);
            format!(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x};i={id}\r\n{b}\r\n0\r\n\r\n",
                a.len(),
                b.len()
            )
        };
        // Written in two pieces, so a head and its body may arrive apart.
        let (first, second) = out.as_bytes().split_at(out.len() / 2);
        if s.write_all(first).await.is_err() {
            return;
        }
        tokio::task::yield_now().await;
        if s.write_all(second).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_caller_gets_its_own_answer_over_shared_connections() {
    let addr = node().await;
    let pool = Arc::new(Pool::with_settings(
        addr.clone(),
        Settings {
            max_open: 4,
            ..Settings::default()
        },
    ));
    let (callers, each) = (64u64, 40u64);
    let mut tasks = Vec::new();
    for c in 0..callers {
        let pool = pool.clone();
        let addr = addr.clone();
        tasks.push(tokio::spawn(async move {
            for r in 0..each {
                let id = c * each + r;
                let req = http::Request::get(format!("/id/{id}"))
                    .header(http::header::HOST, addr.as_str())
                    .body(Outgoing::Full(None))
                    .unwrap();
                let sent = tokio::time::timeout(
                    Duration::from_secs(30),
                    pool.send(req, false, Duration::from_secs(5)),
                )
                .await
                .expect("no answer within 30 s");
                let res = sent.unwrap_or_else(|(e, _)| panic!("request {id}: {e}"));
                let body = res.into_body().collect().await.unwrap().to_bytes();
                assert_eq!(String::from_utf8_lossy(&body), expected(id), "request {id}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(
        pool.idle() <= 4,
        "more connections than the pool's limit: {}",
        pool.idle()
    );
}
