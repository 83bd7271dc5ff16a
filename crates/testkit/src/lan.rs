//! A LAN of network namespaces the test creates: a bridge in one namespace (multicast
//! snooping off, so mDNS floods), a veth into it from each "host" with an address of
//! 10.213.0.0/24. Removed on drop. Needs root (CAP_NET_ADMIN) and iproute2.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::delay::ip;

pub struct Lan {
    tag: String,
    hosts: Vec<String>,
}

impl Lan {
    pub fn new(hosts: usize) -> Lan {
        static MADE: AtomicU32 = AtomicU32::new(0);
        let tag = format!(
            "{:x}{}",
            std::process::id() % 0xfffff,
            MADE.fetch_add(1, Ordering::SeqCst)
        );
        let bridge = format!("plbr{tag}");
        ip(&["netns", "add", &bridge]);
        let mut lan = Lan {
            tag: tag.clone(),
            hosts: Vec::new(),
        };
        ip(&["-n", &bridge, "link", "add", "br0", "type", "bridge"]);
        ip(&[
            "-n",
            &bridge,
            "link",
            "set",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ]);
        ip(&["-n", &bridge, "link", "set", "br0", "up"]);
        for i in 0..hosts {
            let ns = format!("plh{i}{tag}");
            ip(&["netns", "add", &ns]);
            lan.hosts.push(ns.clone());
            let port = format!("p{i}");
            ip(&[
                "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns",
                &bridge,
            ]);
            ip(&["-n", &bridge, "link", "set", &port, "master", "br0", "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", lan.addr(i)),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        lan
    }

    /// The address of host `i` on the LAN.
    pub fn addr(&self, host: usize) -> String {
        format!("10.213.0.{}", host + 1)
    }

    /// `program` run inside host `i`.
    pub fn exec(&self, host: usize, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.hosts[host], program]);
        cmd
    }

    /// Moves the calling thread into host `i`: sockets it opens from then on are that
    /// host's. For a test on a current-thread runtime.
    pub fn enter(&self, host: usize) {
        crate::delay::enter(&self.hosts[host]);
    }

    /// curl inside host `i`: (status, body); 0 when nothing answered within 3 s.
    pub fn curl(&self, host: usize, args: &[&str]) -> (u16, String) {
        let out = self
            .exec(host, "curl")
            .args(["-s", "-m", "3", "-w", "\n%{http_code}"])
            .args(args)
            .output()
            .expect("running curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for ns in self.hosts.iter().chain([&format!("plbr{}", self.tag)]) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}
