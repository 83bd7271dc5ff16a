//! Test support shared by pillion's crates. Tests use real parts, never mocks:
//!
//! - [`server`]: starts a real etcd, redis-server or nats-server on free loopback ports
//!   in its own temporary directory, waits until it answers, and kills it on drop. It
//!   can kill and restart the server on the same port and data, for failure tests.
//! - [`process`]: any other child process (a `pillion` under test) that is killed on
//!   drop, and waiting for a port to accept connections.
//! - [`app`]: a small HTTP app on a free port whose health answer a test switches
//!   between healthy, failing and hanging, and which counts the requests it gets.
//! - [`http`]: a minimal async HTTP client for asserting what a user would see.
//! - [`tcp`]: raw TCP backends (greet-and-echo, reply-after-EOF) and a fast checksum.
//! - [`dns`]: a small DNS server whose A records a test sets.
//! - [`pebble`]: Let's Encrypt's test ACME CA, validating on a port the test gives.
//! - [`lan`]: hosts on one LAN, as network namespaces on a bridge.
//! - [`delay`]: a slow link (a TUN delay line in a network namespace), for real
//!   latency on a kernel without netem.
#![deny(unsafe_code)]

pub mod app;
pub mod delay;
pub mod dns;
pub mod http;
pub mod lan;
pub mod pebble;
pub mod process;
pub mod server;
pub mod tcp;

pub use app::{Health, Mode, TestApp};
pub use pebble::Pebble;
pub use process::{free_port, free_udp_port, wait_for_port, Daemon};
pub use server::{make_certificates, Server};
