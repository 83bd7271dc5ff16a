//! Connections to nodes carry TCP keep-alive, so a peer that vanished without a word
//! (a partition, a host that lost power) is noticed by an idle pooled connection or a
//! long-lived stream. Read from the kernel's socket table: an idle established socket
//! with keep-alive has its keep-alive timer armed (`tr` 2 in /proc/net/tcp).

use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::BodyExt;
use pillion_http::pool::{Outgoing, Pool};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// The timer of the socket from `local` to `remote` in /proc/net/tcp: its kind (`tr`)
/// and the jiffies until it fires.
fn timer(local: SocketAddr, remote: SocketAddr) -> Option<(u8, u64)> {
    let hex = |a: SocketAddr| match a {
        SocketAddr::V4(v4) => format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(v4.ip().octets()),
            v4.port()
        ),
        SocketAddr::V6(_) => unreachable!("the test binds IPv4"),
    };
    let (local, remote) = (hex(local), hex(remote));
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f[1] != local || f[2] != remote {
            return None;
        }
        let (kind, when) = f[5].split_once(':')?;
        Some((
            u8::from_str_radix(kind, 16).ok()?,
            u64::from_str_radix(when, 16).ok()?,
        ))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connections_to_a_node_keep_tcp_keepalive_armed() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let node = listener.local_addr().unwrap();
    let (peer_tx, peer_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, peer) = listener.accept().await.unwrap();
        let _ = peer_tx.send(peer);
        let mut buf = vec![0u8; 4096];
        let mut seen = Vec::new();
        while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0);
            seen.extend_from_slice(&buf[..n]);
        }
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            .await
            .unwrap();
        // Keep the connection open and silent.
        std::future::pending::<()>().await;
    });
    let pool = std::sync::Arc::new(Pool::with_settings(node.to_string(), Default::default()));
    let req = http::Request::get("/")
        .header(http::header::HOST, node.to_string())
        .body(Outgoing::Full(None))
        .unwrap();
    let res = tokio::time::timeout(
        Duration::from_secs(10),
        pool.send(req, false, Duration::from_secs(5)),
    )
    .await
    .expect("an answer within 10 s")
    .unwrap_or_else(|(e, _)| panic!("{e}"));
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "ok");
    assert_eq!(pool.idle(), 1, "the connection went back to the pool");
    let pillion_side = tokio::time::timeout(Duration::from_secs(5), peer_rx)
        .await
        .unwrap()
        .unwrap();
    // The node's side has no keep-alive: the check tells the two apart.
    let (node_kind, _) = timer(node, pillion_side).expect("the node's socket");
    assert_eq!(node_kind, 0, "the node's own socket has no timer armed");
    let (kind, when) = timer(pillion_side, node).expect("pillion's socket in /proc/net/tcp");
    assert_eq!(kind, 2, "keep-alive timer armed on the pooled connection");
    // Jiffies until the first probe: at most the configured 30 s (HZ is at most 1000).
    assert!(when <= 30 * 1000, "first probe in {when} jiffies");
}
