//! A connection to a node: plain TCP, or TLS over TCP (the mesh's mTLS, an etcd or
//! peer reached over `https://`).
//!
//! [`Connector`] says how a pool reaches its node: the client configs (one per ALPN
//! protocol: HTTP/1.1, h2, a raw TCP tunnel) and the name the node's certificate
//! must be valid for.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::TcpStream;

/// ALPN of a raw TCP tunnel through a mesh listener: after the handshake the bytes
/// are the app's own protocol (a database's, say).
pub const TUNNEL_ALPN: &[u8] = b"pillion-tcp/1";

/// How to wrap a pool's TCP connections in TLS.
#[derive(Clone)]
pub struct Connector {
    /// Offers `http/1.1`.
    pub h1: Arc<rustls::ClientConfig>,
    /// Offers `h2`.
    pub h2: Arc<rustls::ClientConfig>,
    /// Offers [`TUNNEL_ALPN`].
    pub tunnel: Arc<rustls::ClientConfig>,
    /// What the node's certificate is checked against (the verifier of a mesh
    /// config checks the service identity instead, and ignores it).
    pub server_name: ServerName<'static>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// What the connection will carry, which picks the ALPN offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carry {
    Http1,
    H2,
    Tunnel,
}

impl Connector {
    /// One config for all three uses, with its ALPN lists set.
    pub fn new(config: rustls::ClientConfig, server_name: ServerName<'static>) -> Connector {
        let with = |alpn: &[u8]| {
            let mut c = config.clone();
            c.alpn_protocols = vec![alpn.to_vec()];
            Arc::new(c)
        };
        Connector {
            h1: with(b"http/1.1"),
            h2: with(b"h2"),
            tunnel: with(TUNNEL_ALPN),
            server_name,
        }
    }

    /// The TLS handshake over `tcp`.
    pub async fn connect(&self, tcp: TcpStream, carry: Carry) -> io::Result<Stream> {
        let config = match carry {
            Carry::Http1 => &self.h1,
            Carry::H2 => &self.h2,
            Carry::Tunnel => &self.tunnel,
        };
        let tls = tokio_rustls::TlsConnector::from(config.clone())
            .connect(self.server_name.clone(), tcp)
            .await?;
        Ok(Stream::Tls(Box::new(tls)))
    }
}

/// An open connection to a node.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Stream {
    /// Whether an idle connection is still open with nothing unasked for waiting on
    /// it. Costs no system call unless the socket became readable.
    pub(crate) fn is_idle_open(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        // Out of tokio's cooperative budget, `poll_read_ready` says Pending whatever
        // the socket's state: then look at the socket itself.
        let readiness = if !tokio::task::coop::has_budget_remaining() {
            Poll::Ready(Ok(()))
        } else {
            self.tcp().poll_read_ready(&mut cx)
        };
        match readiness {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            // Readable: closed, reset, stray bytes, or readiness left over from the
            // last read. Only the last leaves nothing to read.
            Poll::Ready(Ok(())) => match self {
                Stream::Plain(tcp) => matches!(
                    tcp.try_read(&mut [0u8; 1]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock
                ),
                // TLS records that carry no data (a TLS 1.3 session ticket) are
                // consumed here; any application byte, the end, or an error means
                // the connection cannot take a request.
                Stream::Tls(tls) => {
                    let mut byte = [0u8; 1];
                    let mut buf = ReadBuf::new(&mut byte);
                    matches!(Pin::new(tls).poll_read(&mut cx, &mut buf), Poll::Pending)
                }
            },
        }
    }

    /// The socket under it (for shutdown(2) of its write side).
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.tcp().as_raw_fd()
    }

    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(tcp) => tcp,
            Stream::Tls(tls) => tls.get_ref().0,
        }
    }
}

impl From<TcpStream> for Stream {
    fn from(tcp: TcpStream) -> Stream {
        Stream::Plain(tcp)
    }
}

/// `AsyncRead` for an enum whose every variant holds something that reads, each
/// variant passing the call on.
macro_rules! delegate_read {
    ($ty:ident { $($(#[$attr:meta])* $variant:ident),+ $(,)? }) => {
        impl tokio::io::AsyncRead for $ty {
            fn poll_read(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                match self.get_mut() {
                    $($(#[$attr])* $ty::$variant(s) => std::pin::Pin::new(s).poll_read(cx, buf),)+
                }
            }
        }
    };
}

/// `AsyncWrite` for an enum whose every variant holds something that writes.
macro_rules! delegate_write {
    ($ty:ident { $($(#[$attr:meta])* $variant:ident),+ $(,)? }) => {
        impl tokio::io::AsyncWrite for $ty {
            fn poll_write(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                match self.get_mut() {
                    $($(#[$attr])* $ty::$variant(s) => std::pin::Pin::new(s).poll_write(cx, buf),)+
                }
            }

            fn poll_write_vectored(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                match self.get_mut() {
                    $($(#[$attr])* $ty::$variant(s) => std::pin::Pin::new(s).poll_write_vectored(cx, bufs),)+
                }
            }

            fn is_write_vectored(&self) -> bool {
                match self {
                    $($(#[$attr])* $ty::$variant(s) => s.is_write_vectored(),)+
                }
            }

            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                match self.get_mut() {
                    $($(#[$attr])* $ty::$variant(s) => std::pin::Pin::new(s).poll_flush(cx),)+
                }
            }

            fn poll_shutdown(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                match self.get_mut() {
                    $($(#[$attr])* $ty::$variant(s) => std::pin::Pin::new(s).poll_shutdown(cx),)+
                }
            }
        }
    };
}

pub(crate) use {delegate_read, delegate_write};

delegate_read!(Stream { Plain, Tls });
delegate_write!(Stream { Plain, Tls });
