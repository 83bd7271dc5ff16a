//! Moving bytes between the client's and the backend's sockets, both ways, until
//! both sides are done.
//!
//! On Linux each direction goes socket -> pipe -> socket with splice(2), so the bytes
//! never enter user space; elsewhere `tokio::io::copy_bidirectional` does the work.
//! Empty pipes are kept for the next connections.
//! Half-close is kept: when one side finishes sending, the other side's write half
//! is shut (it sees end-of-file) and the reverse direction goes on. This module is
//! the crate's only `unsafe` code: the splice, pipe and shutdown system calls.
#![allow(unsafe_code)]

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::net::TcpStream;

/// Where a connection's bytes are counted, and when the last one moved.
pub struct Traffic<'a> {
    /// Client to backend.
    pub up: &'a AtomicU64,
    /// Backend to client.
    pub down: &'a AtomicU64,
    /// Milliseconds (on [`crate::clock`]) when a byte last moved.
    pub last_ms: AtomicU64,
}

impl Traffic<'_> {
    fn moved(&self, up: bool, n: usize) {
        let counter = if up { self.up } else { self.down };
        counter.fetch_add(n as u64, Ordering::Relaxed);
        self.last_ms
            .store(crate::clock().as_millis() as u64, Ordering::Relaxed);
    }
}

/// Copies both ways until both directions reached end-of-file (or one failed).
pub async fn both_ways(
    client: &mut TcpStream,
    backend: &mut TcpStream,
    traffic: &Traffic<'_>,
) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let (c, b) = (&*client, &*backend);
        // A failure either way (a reset) ends both: try_join drops the other half.
        tokio::try_join!(
            splice::one_way(c, b, traffic, true),
            splice::one_way(b, c, traffic, false)
        )?;
        Ok(())
    }
    #[cfg(not(target_os = "linux"))]
    {
        let (up, down) = tokio::io::copy_bidirectional(client, backend).await?;
        traffic.moved(true, up as usize);
        traffic.moved(false, down as usize);
        Ok(())
    }
}

/// Shuts the write half of a socket: the peer reads end-of-file.
pub fn shutdown_write(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    shutdown_write_fd(stream.as_raw_fd());
}

/// [`shutdown_write`] by descriptor, for a socket another task is copying on.
pub fn shutdown_write_fd(fd: std::os::fd::RawFd) {
    // SAFETY: callers pass the descriptor of a socket owned by their own task and
    // not dropped yet, so it is open and refers to that socket; shutdown(2) neither
    // closes the descriptor nor touches memory.
    unsafe {
        libc::shutdown(fd, libc::SHUT_WR);
    }
}

#[cfg(target_os = "linux")]
mod splice {
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

    use tokio::io::Interest;
    use tokio::net::TcpStream;

    use super::Traffic;

    /// Asked for the pipe; the kernel may give less (then the default 64 KiB).
    const PIPE_SIZE: usize = 1 << 20;

    /// Empty pipes kept for the next connections: a new one costs four system calls
    /// (pipe2, fcntl, and two closes when done), a quarter of a short connection's.
    static SPARE: std::sync::Mutex<Vec<Pipe>> = std::sync::Mutex::new(Vec::new());
    const MAX_SPARE: usize = 64;

    struct Pipe {
        read: OwnedFd,
        write: OwnedFd,
        size: usize,
    }

    impl Pipe {
        /// A spare pipe, or a new one.
        fn take() -> io::Result<Pipe> {
            let spare = SPARE.lock().unwrap_or_else(|e| e.into_inner()).pop();
            match spare {
                Some(pipe) => Ok(pipe),
                None => Pipe::new(),
            }
        }

        /// Keeps an *empty* pipe for another connection (one with bytes left in it
        /// is dropped, and so closed, instead).
        fn give_back(self) {
            let mut spare = SPARE.lock().unwrap_or_else(|e| e.into_inner());
            if spare.len() < MAX_SPARE {
                spare.push(self);
            }
        }

        fn new() -> io::Result<Pipe> {
            let mut fds = [0 as RawFd; 2];
            // SAFETY: `fds` is a valid array of two ints for pipe2(2) to fill.
            let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: pipe2 succeeded, so both descriptors are open and ours alone;
            // OwnedFd closes each exactly once.
            let (read, write) =
                unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
            // SAFETY: fcntl(2) on a descriptor we own; failure only leaves the size.
            let size = unsafe {
                libc::fcntl(
                    write.as_raw_fd(),
                    libc::F_SETPIPE_SZ,
                    PIPE_SIZE as libc::c_int,
                )
            };
            let size = if size > 0 { size as usize } else { 64 * 1024 };
            Ok(Pipe { read, write, size })
        }
    }

    fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
        // SAFETY: both descriptors are open for the duration of the call (their
        // owners are borrowed by the caller); null offsets mean "current position",
        // as required for sockets and pipes; no user memory is passed.
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// `src` -> pipe -> `dst` until `src` ends; then shuts `dst`'s write half.
    pub async fn one_way(
        src: &TcpStream,
        dst: &TcpStream,
        traffic: &Traffic<'_>,
        up: bool,
    ) -> io::Result<()> {
        let pipe = Pipe::take()?;
        loop {
            // Fill the pipe from the source socket.
            let filled = loop {
                src.readable().await?;
                match src.try_io(Interest::READABLE, || {
                    splice(src.as_raw_fd(), pipe.write.as_raw_fd(), pipe.size)
                }) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            };
            if filled == 0 {
                // Everything spliced in was spliced out: the pipe is empty. (On an
                // error or a cancel it is dropped with whatever it holds.)
                pipe.give_back();
                super::shutdown_write(dst);
                return Ok(());
            }
            // Drain it into the destination socket.
            let mut left = filled;
            while left > 0 {
                dst.writable().await?;
                match dst.try_io(Interest::WRITABLE, || {
                    splice(pipe.read.as_raw_fd(), dst.as_raw_fd(), left)
                }) {
                    Ok(n) => {
                        left -= n;
                        traffic.moved(up, n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            }
        }
    }
}
