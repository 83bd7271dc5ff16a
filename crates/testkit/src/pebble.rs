//! pebble, Let's Encrypt's test ACME CA (Debian package `pebble`), on free loopback
//! ports in a temporary directory of its own, killed and removed on drop.
//!
//! Its directory is served over HTTPS with a certificate from [`make_certificates`]
//! (trust [`Pebble::ca_file`]); it validates TLS-ALPN-01 on the port given to
//! [`Pebble::start`], every name resolving to 127.0.0.1 through a
//! `pebble-challtestsrv` DNS server of its own. Validations happen at once
//! (`PEBBLE_VA_NOSLEEP=1`), and pebble still refuses 5% of good nonces, as it does
//! by default, so clients must retry them as RFC 8555 wants.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::process::{free_port, free_udp_port, wait_for_port, Daemon};
use crate::server::{find_binary, make_certificates, read_tail, temp_dir};

/// How long pebble and its DNS server may take to listen.
const READY_LIMIT: Duration = Duration::from_secs(20);

pub struct Pebble {
    dir: PathBuf,
    /// The ACME directory's port (`https://127.0.0.1:{port}/dir`).
    pub port: u16,
    /// The management interface's port (HTTPS too): `/roots/0` is the root that
    /// issued certificates chain to, made anew at each start.
    pub management_port: u16,
    pebble: Option<Daemon>,
    dns: Option<Daemon>,
}

fn binary(name: &str) -> PathBuf {
    find_binary(name).unwrap_or_else(|| {
        panic!(
            "{name} is not installed: install the Debian package pebble (apt-get install -y \
             pebble), or run scripts/test, which installs everything the tests need"
        )
    })
}

impl Pebble {
    /// Starts pebble, validating TLS-ALPN-01 challenges on `tls_port` of 127.0.0.1
    /// (where the client under test listens). Needs the `openssl` command.
    pub fn start(tls_port: u16) -> Pebble {
        let (pebble_bin, dns_bin) = (binary("pebble"), binary("pebble-challtestsrv"));
        let dir = temp_dir("pebble");
        make_certificates(&dir);
        let log = |name: &str| {
            std::fs::File::create(dir.join(name))
                .expect("creating a log file in the pebble directory")
        };

        let (dns_port, dns_management) = (free_udp_port(), free_port());
        let dns_log = log("dns.log");
        let mut dns = Command::new(dns_bin);
        dns.current_dir(&dir)
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .args(["-dns01", &format!("127.0.0.1:{dns_port}")])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-management", &format!("127.0.0.1:{dns_management}")])
            .stdout(dns_log.try_clone().expect("a log handle"))
            .stderr(dns_log);
        let dns = Daemon::spawn("pebble-challtestsrv", dns);

        let (port, management_port) = (free_port(), free_port());
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{port}"),
                "managementListenAddress": format!("127.0.0.1:{management_port}"),
                "certificate": "server.pem",
                "privateKey": "server.key",
                // HTTP-01 is not used; a port nothing listens on.
                "httpPort": free_port(),
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
            }
        });
        std::fs::write(dir.join("pebble.json"), config.to_string()).expect("writing pebble.json");
        let pebble_log = log("pebble.log");
        let mut cmd = Command::new(pebble_bin);
        cmd.current_dir(&dir)
            .args(["-config", "pebble.json", "-strict=false"])
            .args(["-dnsserver", &format!("127.0.0.1:{dns_port}")])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env_remove("PEBBLE_WFE_NONCEREJECT")
            .stdout(pebble_log.try_clone().expect("a log handle"))
            .stderr(pebble_log);
        let pebble = Daemon::spawn("pebble", cmd);
        let mut started = Pebble {
            dir,
            port,
            management_port,
            pebble: Some(pebble),
            dns: Some(dns),
        };
        for p in [port, management_port, dns_management] {
            let addr = format!("127.0.0.1:{p}").parse().unwrap();
            if !wait_for_port(addr, READY_LIMIT) {
                let log = started.log();
                started.kill();
                panic!("pebble did not listen on {addr} within {READY_LIMIT:?}; its logs:\n{log}");
            }
        }
        started
    }

    /// The ACME directory URL.
    pub fn directory(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.port)
    }

    /// The CA of the certificate pebble serves its directory and management
    /// interface with (not the CA that issues ACME certificates).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The end of pebble's and its DNS server's logs, for a failing test to show.
    pub fn log(&self) -> String {
        let tail = |name: &str| read_tail(&self.dir.join(name));
        format!(
            "--- pebble\n{}\n--- pebble-challtestsrv\n{}",
            tail("pebble.log"),
            tail("dns.log")
        )
    }

    /// Kills pebble and its DNS server at once (the directory stays until drop).
    pub fn kill(&mut self) {
        self.pebble.take();
        self.dns.take();
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
