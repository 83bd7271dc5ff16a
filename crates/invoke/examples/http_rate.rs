//! Open-loop HTTP/1.1 load for `bench/http-extra.sh`: RATE requests per second spread
//! over CONNS keep-alive connections, each request sent at its scheduled time and its
//! latency measured from that time (so a slow server cannot hide its queue: no
//! coordinated omission). Prints one JSON line with p50, p99 and p99.9 in ms.
//!
//! tokio's timer ticks once a millisecond, so a sleep until a request's time wakes up
//! to a millisecond late. That lateness is the generator's, not the server's: when
//! the connection was free at the scheduled time, a request's latency is measured
//! from the moment it was really sent; when the previous answer came after the
//! scheduled time (the server was slow), from the scheduled time.
//!
//!   http_rate http://127.0.0.1:8081/bench/x RATE [CONNS] [SECONDS]

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let uri: http::Uri = args[1].parse().expect("a URL");
    let rate: f64 = args[2].parse().expect("a rate");
    let conns: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(32);
    let seconds: f64 = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(4.0);
    let authority = uri.authority().expect("host:port").to_string();
    let interval = Duration::from_secs_f64(conns as f64 / rate);
    let start = Instant::now() + Duration::from_millis(100);
    let end = start + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for c in 0..conns {
        let authority = authority.clone();
        let uri = uri.clone();
        tasks.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(&authority)
                .await
                .expect("connect");
            stream.set_nodelay(true).unwrap();
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                    .await
                    .expect("handshake");
            tokio::spawn(conn);
            let mut latencies = Vec::new();
            // Stagger the connections across one interval.
            let mut due = start + interval.mul_f64(c as f64 / conns as f64);
            while due < end {
                let free = Instant::now() <= due;
                tokio::time::sleep_until(due.into()).await;
                let req = http::Request::get(uri.clone())
                    .header(http::header::HOST, authority.as_str())
                    .body(Empty::new())
                    .unwrap();
                let sent = if free { Instant::now() } else { due };
                let res = sender.send_request(req).await.expect("request");
                // Only 2xx answers count: a proxy that answers 502 fast is not fast.
                assert!(res.status().is_success(), "answered {}", res.status());
                let _ = res.into_body().collect().await;
                latencies.push(sent.elapsed().as_nanos() as u64);
                due += interval;
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_unstable();
    let pct = |p: f64| all[((all.len() as f64 - 1.0) * p).round() as usize] as f64 / 1e6;
    println!(
        "{}",
        serde_json::json!({
            "requests": all.len(),
            "rate": rate,
            "p50_ms": pct(0.50),
            "p99_ms": pct(0.99),
            "p999_ms": pct(0.999),
        })
    );
}
