//! Child processes owned by a test, and ports.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1. Another process could take it before the caller binds
/// it; tests that start servers retry with a new port when that happens.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0 for a free port")
}

/// A loopback port free for both TCP and UDP now (for gossip addresses).
pub fn free_udp_port() -> u16 {
    loop {
        let port = free_port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Waits until something accepts TCP connections on `addr`; false after `limit`.
pub fn wait_for_port(addr: SocketAddr, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    false
}

/// Waits until nothing accepts connections on `addr` any more (an aborted task
/// closes its listener a moment later, not at once); false after `limit`.
pub fn wait_until_refused(addr: SocketAddr, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// The tasks of an in-process test server (its accept loop and its connections), so
/// that a test can make it vanish at once, as a crashed process would.
#[derive(Default)]
pub struct Tasks(std::sync::Mutex<Vec<tokio::task::AbortHandle>>);

impl Tasks {
    pub fn add(&self, task: tokio::task::AbortHandle) {
        let mut tasks = self.0.lock().unwrap();
        tasks.retain(|t| !t.is_finished());
        tasks.push(task);
    }

    /// Aborts every task (the sockets close when the runtime drops them).
    pub fn abort(&self) {
        for t in self.0.lock().unwrap().drain(..) {
            t.abort();
        }
    }

    /// Aborts every task and waits until `addr` refuses connections, so a test never
    /// reaches a server it just killed. Needs a multi-thread runtime.
    pub fn kill(&self, addr: SocketAddr) {
        self.abort();
        wait_until_refused(addr, Duration::from_secs(2));
    }
}

/// Listens on `addr` again after a kill; the old socket may linger for a moment.
pub async fn rebind(addr: SocketAddr) -> tokio::net::TcpListener {
    for _ in 0..100 {
        if let Ok(l) = tokio::net::TcpListener::bind(addr).await {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("could not listen again on {addr}");
}

/// A child process that is killed when the test lets go of it.
pub struct Daemon {
    name: String,
    child: Option<Child>,
}

impl Daemon {
    /// Spawns `cmd` with stdin closed; stdout and stderr go to the test's output.
    pub fn spawn(name: &str, mut cmd: Command) -> Daemon {
        cmd.stdin(Stdio::null());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name} ({cmd:?}): {e}"));
        Daemon {
            name: name.to_string(),
            child: Some(child),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Sends a signal (`"TERM"`, `"INT"`, `"KILL"`, `"HUP"`) with kill(1).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("running kill(1)");
        assert!(status.success(), "kill -{signal} {} failed", self.name);
    }

    /// Waits up to `limit` for the process to exit and returns its exit code
    /// (`None` if it is still running or died from a signal).
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        let child = self.child.as_mut()?;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().expect("waiting for child") {
                self.child = None;
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Whether the process is still running (reaps it if it has exited).
    pub fn running(&mut self) -> bool {
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => true,
            Some(_) => {
                self.child = None;
                false
            }
            None => false,
        }
    }

    /// Kills the process at once and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}
