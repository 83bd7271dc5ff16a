//! A tiny authoritative DNS server on a loopback UDP port: answers A queries for the
//! names a test sets (TTL 1 s), NXDOMAIN for others, and no records for other types.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;

type Records = Arc<Mutex<HashMap<String, Vec<Ipv4Addr>>>>;

pub struct DnsServer {
    addr: SocketAddr,
    records: Records,
    task: tokio::task::JoinHandle<()>,
}

impl DnsServer {
    pub async fn start() -> DnsServer {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind dns");
        let addr = socket.local_addr().unwrap();
        let records: Records = Arc::default();
        let r = records.clone();
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
                if let Some(reply) = answer(&buf[..n], &r) {
                    let _ = socket.send_to(&reply, peer).await;
                }
            }
        });
        DnsServer {
            addr,
            records,
            task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sets the A records of `name` (no trailing dot).
    pub fn set(&self, name: &str, ips: &[Ipv4Addr]) {
        self.records.lock().unwrap().insert(
            name.trim_end_matches('.').to_ascii_lowercase(),
            ips.to_vec(),
        );
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn answer(query: &[u8], records: &Records) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    // The question: labels up to a zero byte, then type and class.
    let mut i = 12;
    let mut labels = Vec::new();
    while i < query.len() && query[i] != 0 {
        let len = query[i] as usize;
        labels.push(String::from_utf8_lossy(query.get(i + 1..i + 1 + len)?).to_ascii_lowercase());
        i += 1 + len;
    }
    let end = i + 5;
    let question = query.get(12..end)?;
    let qtype = u16::from_be_bytes([query[i + 1], query[i + 2]]);
    let name = labels.join(".");
    let known = records.lock().unwrap().get(&name).cloned();
    let ips = match (&known, qtype) {
        (Some(ips), 1) => ips.clone(),
        _ => Vec::new(),
    };
    let rcode = if known.is_some() { 0 } else { 3 };
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&query[0..2]);
    out.extend_from_slice(&[0x85, 0x80 | rcode]);
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&(ips.len() as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(question);
    for ip in ips {
        out.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 1, 0, 4]);
        out.extend_from_slice(&ip.octets());
    }
    Some(out)
}
