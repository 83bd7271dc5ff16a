//! A slow link, for tests that need real network latency on a kernel without netem:
//! a network namespace of the test's own with a TUN device, `dl0` at 10.77.0.1/24,
//! whose packets a thread of the test holds for `delay` and writes back with their
//! source and destination addresses swapped.
//!
//! So a connection from inside the namespace to any other address of the /24
//! (10.77.0.2, ...) port P reaches whatever listens on 10.77.0.1:P (or 0.0.0.0:P)
//! there, every packet `delay` late each way: a dial (SYN, then SYN-ACK) takes
//! `2 × delay` more, as over a real link of that round trip. Swapping the two
//! addresses changes no checksum (one's complement sums do not depend on order), so
//! the kernel takes the packets as they are. Loopback inside the namespace stays
//! fast: the "near" side of a test listens on 127.0.0.1.
//!
//! Needs root (CAP_NET_ADMIN: `ip netns`, /dev/net/tun) and iproute2. Sockets made on
//! a [`DelayLine::run`] thread live in the namespace; a process runs there with
//! `ip netns exec` ([`DelayLine::netns`]). Dropping the line stops its threads, closes
//! the TUN device and deletes the namespace.
#![allow(unsafe_code)] // setns(2) and the TUNSETIFF ioctl

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::tcp::Place as _;

/// The namespace's end of the line: listen on it (or 0.0.0.0) for the far side.
pub const LOCAL: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);

/// A far host: connections to `10.77.0.{n}` (n from 2 to 254) cross the line.
pub fn far(n: u8) -> Ipv4Addr {
    assert!(
        (2..=254).contains(&n),
        "far hosts are 10.77.0.2 to 10.77.0.254"
    );
    Ipv4Addr::new(10, 77, 0, n)
}

pub struct DelayLine {
    ns: String,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

/// Runs `ip ARGS` (iproute2), panicking with its error when it fails: tests that
/// make network namespaces need root.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("running ip(8)");
    assert!(
        out.status.success(),
        "ip {}: {} (this test needs root and iproute2)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Moves the calling thread into network namespace `ns`.
pub(crate) fn enter(ns: &str) {
    let file = File::open(format!("/run/netns/{ns}"))
        .unwrap_or_else(|e| panic!("opening network namespace {ns}: {e}"));
    // SAFETY: setns(2) on a valid descriptor; it changes only this thread's namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "setns into {ns}: {}",
        std::io::Error::last_os_error()
    );
}

/// Opens TUN device `name` (plain IP packets, no header) in the calling thread's
/// namespace.
fn open_tun(name: &str) -> File {
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .expect("opening /dev/net/tun (the delay line needs the tun module)");
    // struct ifreq: the name (16 bytes), then the flags (a short), padded to 40.
    let mut ifr = [0u8; 40];
    ifr[..name.len()].copy_from_slice(name.as_bytes());
    let flags = (libc::IFF_TUN | libc::IFF_NO_PI) as i16;
    ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `ifr` is as large as.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, ifr.as_mut_ptr()) };
    assert_eq!(rc, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
    tun
}

/// Waits up to 100 ms for `file` to be readable.
fn readable(file: &File) -> bool {
    let mut pfd = libc::pollfd {
        fd: file.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, 100) > 0 }
}

impl DelayLine {
    /// A new namespace whose link to 10.77.0.0/24 delays every packet by `delay`.
    pub fn new(delay: Duration) -> DelayLine {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let ns = format!(
            "pldl{:x}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &ns]);
        let mut line = DelayLine {
            ns: ns.clone(),
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        };
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        let tun = line.run(|| open_tun("dl0"));
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{LOCAL}/24"),
            "dev",
            "dl0",
        ]);
        ip(&["-n", &ns, "link", "set", "dl0", "up"]);

        let mut reader = tun.try_clone().expect("dup of the TUN descriptor");
        let mut writer = tun;
        let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
        let stop = line.stop.clone();
        line.threads.push(std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                if !readable(&reader) {
                    continue;
                }
                let Ok(n) = reader.read(&mut buf) else { break };
                let packet = &buf[..n];
                // IPv4 only (the kernel's own IPv6 chatter on the device is dropped).
                if n < 20 || packet[0] >> 4 != 4 {
                    continue;
                }
                let mut swapped = packet.to_vec();
                swapped[12..16].copy_from_slice(&packet[16..20]);
                swapped[16..20].copy_from_slice(&packet[12..16]);
                if tx.send((Instant::now() + delay, swapped)).is_err() {
                    break;
                }
            }
        }));
        let stop = line.stop.clone();
        line.threads.push(std::thread::spawn(move || {
            // Every packet waits the same: they leave in the order they came.
            while !stop.load(Ordering::Relaxed) {
                let Ok((due, packet)) = rx.recv_timeout(Duration::from_millis(100)) else {
                    continue;
                };
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
                let _ = writer.write(&packet);
            }
        }));
        line
    }

    /// The namespace's name, for `ip netns exec NAME ...`.
    pub fn netns(&self) -> &str {
        &self.ns
    }

    /// Runs `f` on a thread inside the namespace: sockets it makes live there, and
    /// may be used from any thread afterwards.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        Namespace(self.ns.clone()).run(f)
    }

    /// The namespace as a place for [`crate::tcp::TcpBackend::start_in`].
    pub fn place(&self) -> Arc<dyn crate::tcp::Place> {
        Arc::new(Namespace(self.ns.clone()))
    }

    /// Connects from inside the namespace, within 5 s.
    pub fn connect(&self, addr: SocketAddr) -> std::io::Result<std::net::TcpStream> {
        Namespace(self.ns.clone()).connect(addr)
    }
}

/// A network namespace, by name.
struct Namespace(String);

impl Namespace {
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let ns = self.0.clone();
        std::thread::spawn(move || {
            enter(&ns);
            f()
        })
        .join()
        .expect("a thread in the delay line's namespace panicked")
    }
}

impl crate::tcp::Place for Namespace {
    fn bind(&self, addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
        self.run(move || std::net::TcpListener::bind(addr))
    }

    fn connect(&self, addr: SocketAddr) -> std::io::Result<std::net::TcpStream> {
        self.run(move || std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)))
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}
