//! Real storage and messaging engines for tests: etcd, redis-server and nats-server
//! (with JetStream), each on free loopback ports in a temporary directory of its own.
//!
//! A test never depends on a server that happens to run on the machine: it starts its
//! own and the [`Server`] kills it and removes its directory on drop.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::process::free_port;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Etcd,
    /// etcd serving clients over TLS only, with a certificate from a CA made for the test.
    EtcdTls,
    Redis,
    /// redis-server speaking only TLS, with a certificate from a CA made for the test.
    RedisTls,
    Nats,
    /// nats-server requiring TLS, with a certificate from a CA made for the test.
    NatsTls,
}

impl Kind {
    fn binary(self) -> &'static str {
        match self {
            Kind::Etcd | Kind::EtcdTls => "etcd",
            Kind::Redis | Kind::RedisTls => "redis-server",
            Kind::Nats | Kind::NatsTls => "nats-server",
        }
    }

    fn package(self) -> &'static str {
        match self {
            Kind::Etcd | Kind::EtcdTls => "etcd-server",
            Kind::Redis | Kind::RedisTls => "redis-server",
            Kind::Nats | Kind::NatsTls => "nats-server",
        }
    }

    fn scheme(self) -> &'static str {
        match self {
            Kind::Etcd => "etcd",
            Kind::EtcdTls => "etcds",
            Kind::Redis => "redis",
            Kind::RedisTls => "rediss",
            Kind::Nats => "nats",
            Kind::NatsTls => "tls",
        }
    }
}

/// A running engine owned by one test.
pub struct Server {
    kind: Kind,
    binary: PathBuf,
    dir: PathBuf,
    port: u16,
    peer_port: u16,
    child: Option<Child>,
}

const READY_LIMIT: Duration = Duration::from_secs(20);

impl Server {
    /// etcd v3 (Debian package `etcd-server`), single member.
    pub fn etcd() -> Server {
        Server::start(Kind::Etcd)
    }

    /// redis-server (Debian package `redis-server`), no persistence.
    pub fn redis() -> Server {
        Server::start(Kind::Redis)
    }

    /// redis-server on a TLS-only port. Its certificate (for 127.0.0.1 and localhost)
    /// is signed by a CA made for this server, whose PEM file is [`Server::ca_file`].
    /// Needs the `openssl` command.
    pub fn etcd_tls() -> Server {
        Server::start(Kind::EtcdTls)
    }

    pub fn redis_tls() -> Server {
        Server::start(Kind::RedisTls)
    }

    /// nats-server that requires TLS (`tls://`); its CA is [`Server::ca_file`].
    pub fn nats_tls() -> Server {
        Server::start(Kind::NatsTls)
    }

    /// The CA certificate that signed a TLS server's certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// nats-server with JetStream (Debian package `nats-server`).
    pub fn nats() -> Server {
        Server::start(Kind::Nats)
    }

    fn start(kind: Kind) -> Server {
        let binary = find_binary(kind.binary()).unwrap_or_else(|| {
            panic!(
                "{} is not installed: install the Debian package {} (apt-get install -y {}), \
                 or run scripts/test, which installs everything the tests need",
                kind.binary(),
                kind.package(),
                kind.package()
            )
        });
        let dir = temp_dir(kind.binary());
        if matches!(kind, Kind::RedisTls | Kind::NatsTls | Kind::EtcdTls) {
            make_certificates(&dir);
        }
        // Ports are picked free, then bound by the child: if another process wins the
        // race, the start fails and is retried with new ports.
        let mut last_log = String::new();
        for _ in 0..3 {
            let mut server = Server {
                kind,
                binary: binary.clone(),
                dir: dir.clone(),
                port: free_port(),
                peer_port: free_port(),
                child: None,
            };
            match server.spawn_and_wait() {
                Ok(()) => return server,
                Err(log) => {
                    last_log = log;
                    server.kill();
                    std::mem::forget(server); // keep the directory for the retry
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        panic!(
            "{} did not become ready within {READY_LIMIT:?}; its log:\n{last_log}",
            kind.binary()
        );
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let log_path = self.dir.join("server.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("opening server log");
        let mut cmd = Command::new(&self.binary);
        cmd.current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log);
        let host = "127.0.0.1";
        match self.kind {
            Kind::Etcd | Kind::EtcdTls => {
                let scheme = if self.kind == Kind::EtcdTls {
                    "https"
                } else {
                    "http"
                };
                let client = format!("{scheme}://{host}:{}", self.port);
                let peer = format!("http://{host}:{}", self.peer_port);
                cmd.args(["--name", "default", "--data-dir"])
                    .arg(self.dir.join("data"))
                    .args(["--listen-client-urls", &client])
                    .args(["--advertise-client-urls", &client])
                    .args(["--listen-peer-urls", &peer])
                    .args(["--initial-advertise-peer-urls", &peer])
                    .args(["--initial-cluster", &format!("default={peer}")])
                    .args(["--log-level", "warn"]);
                if self.kind == Kind::EtcdTls {
                    cmd.args(["--cert-file", "server.pem", "--key-file", "server.key"]);
                }
            }
            Kind::Redis => {
                cmd.args(["--port", &self.port.to_string(), "--bind", host])
                    .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                    .arg("--dir")
                    .arg(&self.dir);
            }
            Kind::RedisTls => {
                cmd.args([
                    "--port",
                    "0",
                    "--tls-port",
                    &self.port.to_string(),
                    "--bind",
                    host,
                ])
                .args([
                    "--tls-cert-file",
                    "server.pem",
                    "--tls-key-file",
                    "server.key",
                ])
                .args(["--tls-ca-cert-file", "ca.pem", "--tls-auth-clients", "no"])
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .arg("--dir")
                .arg(&self.dir);
            }
            Kind::Nats => {
                cmd.args(["-a", host, "-p", &self.port.to_string(), "-js", "-sd"])
                    .arg(self.dir.join("jetstream"));
            }
            Kind::NatsTls => {
                cmd.args(["-a", host, "-p", &self.port.to_string(), "-js", "-sd"])
                    .arg(self.dir.join("jetstream"))
                    .arg("--tls")
                    .arg("--tlscert")
                    .arg(self.dir.join("server.pem"))
                    .arg("--tlskey")
                    .arg(self.dir.join("server.key"));
            }
        }
        self.child = Some(cmd.spawn().map_err(|e| format!("spawn failed: {e}"))?);
        let deadline = Instant::now() + READY_LIMIT;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!("exited with {status}\n{}", read_tail(&log_path)));
                }
            }
            if self.ready() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(read_tail(&log_path))
    }

    fn ready(&self) -> bool {
        let Ok(mut s) = TcpStream::connect_timeout(&self.addr(), Duration::from_millis(200)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let (probe, want): (&[u8], &str) = match self.kind {
            // The TLS handshake is the client's business: an open port will do.
            Kind::RedisTls | Kind::EtcdTls => return true,
            Kind::Etcd => (
                b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n",
                "\"health\":\"true\"",
            ),
            Kind::Redis => (b"PING\r\n", "+PONG"),
            Kind::Nats | Kind::NatsTls => (b"", "INFO "),
        };
        if s.write_all(probe).is_err() {
            return false;
        }
        let mut buf = vec![0u8; 4096];
        let mut got = String::new();
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            got.push_str(&String::from_utf8_lossy(&buf[..n]));
            if got.contains(want) {
                return true;
            }
        }
        false
    }

    /// `etcd://127.0.0.1:PORT`, `redis://127.0.0.1:PORT` or `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("{}://{}", self.kind.scheme(), self.addr())
    }

    /// The client address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The server's data directory (etcd, nats) or working directory (redis).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port with the same data, and waits until it
    /// answers.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + READY_LIMIT;
        loop {
            match self.spawn_and_wait() {
                Ok(()) => return,
                // The old socket may linger for a moment; try again until the limit.
                Err(log) if Instant::now() > deadline => {
                    panic!("{} did not restart: {log}", self.kind.binary())
                }
                Err(_) => {
                    self.kill();
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }
}

impl Server {
    /// Kills the server, deletes its data, and starts it empty on the same port: a
    /// server replaced by a new one, as after a disk loss.
    pub fn restart_empty(&mut self) {
        self.kill();
        for sub in ["data", "jetstream"] {
            let _ = std::fs::remove_dir_all(self.dir.join(sub));
        }
        self.restart();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A CA and a server certificate for 127.0.0.1 and localhost, made with openssl(1),
/// in `dir`: `ca.pem`, `server.pem` (the certificate) and `server.key`.
pub fn make_certificates(dir: &Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap_or_else(|e| {
                panic!("openssl is needed for TLS tests (apt-get install -y openssl): {e}")
            });
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .expect("writing ext.cnf");
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=pillion-test-ca",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
}

pub(crate) fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/usr/local/bin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

pub(crate) fn temp_dir(kind: &str) -> PathBuf {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "pillion-test-{kind}-{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("creating a temporary directory");
    dir
}

pub(crate) fn read_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(addr: SocketAddr, send: &[u8], want: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(send).unwrap();
        let mut got = String::new();
        let mut buf = [0u8; 1024];
        while !got.contains(want) {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            got.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        got
    }

    #[test]
    fn redis_starts_answers_and_restarts_on_the_same_port() {
        let mut redis = Server::redis();
        assert!(redis.url().starts_with("redis://127.0.0.1:"));
        let got = roundtrip(redis.addr(), b"SET k v\r\nGET k\r\n", "$1\r\nv");
        assert!(got.contains("$1\r\nv"), "{got}");
        let addr = redis.addr();
        redis.kill();
        assert!(
            TcpStream::connect(addr).is_err(),
            "redis still up after kill"
        );
        redis.restart();
        assert_eq!(redis.addr(), addr);
        assert!(roundtrip(addr, b"PING\r\n", "+PONG").contains("+PONG"));
    }

    #[test]
    fn etcd_starts_and_keeps_its_data_across_restart() {
        let mut etcd = Server::etcd();
        let put = b"POST /v3/kv/put HTTP/1.0\r\nContent-Length: 34\r\n\r\n{\"key\":\"Zm9v\",\"value\":\"YmFy\"}    ";
        roundtrip(etcd.addr(), put, "revision");
        etcd.restart();
        let get = b"POST /v3/kv/range HTTP/1.0\r\nContent-Length: 14\r\n\r\n{\"key\":\"Zm9v\"}";
        let got = roundtrip(etcd.addr(), get, "YmFy");
        assert!(got.contains("\"value\":\"YmFy\""), "{got}");
    }

    #[test]
    fn nats_starts_with_jetstream() {
        let nats = Server::nats();
        let got = roundtrip(nats.addr(), b"", "INFO ");
        assert!(got.contains("\"jetstream\":true"), "{got}");
    }
}
