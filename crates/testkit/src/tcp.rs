//! A raw TCP backend for the TCP proxy's tests, on a chosen loopback address.
//!
//! [`Reply::Echo`]: greets each connection with its name and a newline, then echoes
//! every byte. [`Reply::AfterEof`]: reads until the client shuts its write side, then
//! answers `NAME got N bytes\n` and closes (to test half-close). [`TcpBackend::kill`]
//! closes the listener and every connection at once; [`TcpBackend::restart`] listens
//! again on the same address.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    Echo,
    AfterEof,
}

struct State {
    name: String,
    reply: Reply,
    accepted: AtomicU64,
    tasks: crate::process::Tasks,
}

impl State {
    fn new(name: &str, reply: Reply) -> Arc<State> {
        Arc::new(State {
            name: name.to_string(),
            reply,
            accepted: AtomicU64::new(0),
            tasks: crate::process::Tasks::default(),
        })
    }
}

/// Another network namespace than this process's (a [`crate::delay::DelayLine`]'s),
/// where a backend listens.
pub trait Place: Send + Sync {
    fn bind(&self, addr: SocketAddr) -> std::io::Result<std::net::TcpListener>;
    fn connect(&self, addr: SocketAddr) -> std::io::Result<std::net::TcpStream>;
}

pub struct TcpBackend {
    addr: SocketAddr,
    state: Arc<State>,
    place: Option<Arc<dyn Place>>,
}

impl TcpBackend {
    /// On 127.0.0.1 and a free port.
    pub async fn start(name: &str, reply: Reply) -> TcpBackend {
        Self::start_on(name, reply, "127.0.0.1:0".parse().unwrap()).await
    }

    /// On `addr` (any 127.x.y.z works on Linux; port 0 picks a free one).
    pub async fn start_on(name: &str, reply: Reply, addr: SocketAddr) -> TcpBackend {
        let listener = TcpListener::bind(addr).await.expect("bind tcp backend");
        let addr = listener.local_addr().unwrap();
        let state = State::new(name, reply);
        serve(listener, state.clone());
        TcpBackend {
            addr,
            state,
            place: None,
        }
    }

    /// On `addr` in `place` (a delay line's namespace, say); restarts listen there too.
    pub async fn start_in(
        place: Arc<dyn Place>,
        name: &str,
        reply: Reply,
        addr: SocketAddr,
    ) -> TcpBackend {
        let listener = listen_in(&*place, addr).await;
        let addr = listener.local_addr().unwrap();
        let state = State::new(name, reply);
        serve(listener, state.clone());
        TcpBackend {
            addr,
            state,
            place: Some(place),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::SeqCst)
    }

    /// Closes the listener and every connection, and returns once connections are
    /// refused.
    pub fn kill(&self) {
        match &self.place {
            None => self.state.tasks.kill(self.addr),
            Some(place) => {
                self.state.tasks.abort();
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
                while place.connect(self.addr).is_ok() && std::time::Instant::now() < deadline {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            }
        }
    }

    pub async fn restart(&self) {
        let listener = match &self.place {
            None => crate::process::rebind(self.addr).await,
            Some(place) => listen_in(&**place, self.addr).await,
        };
        serve(listener, self.state.clone());
    }
}

impl Drop for TcpBackend {
    fn drop(&mut self) {
        self.state.tasks.abort();
    }
}

/// Binds in `place`, retrying for 5 s (a port just closed may still be taken).
async fn listen_in(place: &dyn Place, addr: SocketAddr) -> TcpListener {
    for _ in 0..100 {
        if let Ok(l) = place.bind(addr) {
            l.set_nonblocking(true).expect("a non-blocking listener");
            return TcpListener::from_std(l).expect("a tokio listener");
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("could not listen on {addr}");
}

fn serve(listener: TcpListener, state: Arc<State>) {
    let st = state.clone();
    let accept = tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            st.accepted.fetch_add(1, Ordering::SeqCst);
            let st2 = st.clone();
            let task = tokio::spawn(async move {
                match st2.reply {
                    Reply::Echo => {
                        if conn
                            .write_all(format!("{}\n", st2.name).as_bytes())
                            .await
                            .is_err()
                        {
                            return;
                        }
                        let (mut r, mut w) = conn.split();
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                        let _ = w.shutdown().await;
                    }
                    Reply::AfterEof => {
                        let mut n = 0u64;
                        let mut buf = vec![0u8; 65536];
                        while let Ok(k) = conn.read(&mut buf).await {
                            if k == 0 {
                                break;
                            }
                            n += k as u64;
                        }
                        let _ = conn
                            .write_all(format!("{} got {n} bytes\n", st2.name).as_bytes())
                            .await;
                        let _ = conn.shutdown().await;
                    }
                }
            });
            st.tasks.add(task.abort_handle());
        }
    });
    state.tasks.add(accept.abort_handle());
}

/// An FNV-1a style hash over a byte stream, eight bytes at a time: cheap enough for a
/// gigabyte in a test, and the same however the stream was cut into reads.
#[derive(Clone, Copy)]
pub struct Checksum {
    hash: u64,
    pending: [u8; 8],
    filled: usize,
}

impl Default for Checksum {
    fn default() -> Self {
        Checksum {
            hash: 0xcbf2_9ce4_8422_2325,
            pending: [0; 8],
            filled: 0,
        }
    }
}

impl Checksum {
    fn word(&mut self, w: u64) {
        self.hash ^= w;
        self.hash = self.hash.wrapping_mul(0x0100_0000_01b3);
    }

    pub fn update(&mut self, mut data: &[u8]) {
        if self.filled > 0 {
            let take = (8 - self.filled).min(data.len());
            self.pending[self.filled..self.filled + take].copy_from_slice(&data[..take]);
            self.filled += take;
            data = &data[take..];
            if self.filled < 8 {
                return;
            }
            self.word(u64::from_le_bytes(self.pending));
            self.filled = 0;
        }
        let mut chunks = data.chunks_exact(8);
        for c in &mut chunks {
            self.word(u64::from_le_bytes(c.try_into().unwrap()));
        }
        let rest = chunks.remainder();
        self.pending[..rest.len()].copy_from_slice(rest);
        self.filled = rest.len();
    }

    /// The hash of everything so far (a partial last word included).
    pub fn value(&self) -> u64 {
        let mut tail = *self;
        if tail.filled > 0 {
            let mut last = [0u8; 8];
            last[..tail.filled].copy_from_slice(&tail.pending[..tail.filled]);
            tail.word(u64::from_le_bytes(last) ^ (tail.filled as u64) << 56);
        }
        tail.hash
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_ignores_how_the_stream_was_cut() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut whole = Checksum::default();
        whole.update(&data);
        let mut pieces = Checksum::default();
        for c in data.chunks(13) {
            pieces.update(c);
        }
        assert_eq!(whole.value(), pieces.value());
        let mut other = Checksum::default();
        other.update(&data[1..]);
        assert_ne!(whole.value(), other.value());
    }
}
