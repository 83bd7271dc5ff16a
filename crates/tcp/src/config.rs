//! The `[[tcp]]` sections of the config file: listeners, each with tiers of targets
//! in order of preference. Unknown keys are errors; values check themselves.
//!
//! ```toml
//! [[tcp]]
//! listen = "127.0.0.1:26257"
//! failback_after = "10s"          # move connections back to a better tier; 0 = never
//! latency_bucket = "0"            # "10ms": tiers by measured dial latency; 0 = as written
//! rebalance_every = "10s"         # how often latency is measured
//! [[tcp.tiers]]
//! targets = ["db-a.internal:26258", "127.0.0.1:26259"]   # names expand to every A/AAAA
//! max_connections = 0             # 0 = unlimited
//! dial_timeout = "1s"
//! [[tcp.tiers]]
//! targets = ["127.0.0.1:26260"]
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use pillion_core::Dur;
use serde::Deserialize;

/// One TCP listener.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub listen: SocketAddr,
    #[serde(default)]
    pub tiers: Vec<TierConfig>,
    /// After a better tier has been healthy this long, connections on worse tiers are
    /// closed so their clients reconnect to it. 0 keeps them.
    #[serde(default)]
    pub failback_after: Dur,
    /// Close a connection after no byte moved either way for this long. 0: never.
    #[serde(default)]
    pub idle_timeout: Dur,
    /// How long to look for a backend that accepts, across tiers, before giving up on
    /// a client connection.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Dur,
    /// How long a backend whose dial failed is left alone.
    #[serde(default = "default_down_for")]
    pub down_for: Dur,
    /// Tiers by measured latency (iaido's `latencyBucket`): every `rebalance_every`,
    /// each backend is dialed and the backends, fastest first, are put in tiers that
    /// each span less than this much dial time; the tiers as written then only give
    /// each backend its settings. 0: off, the tiers as written.
    #[serde(default)]
    pub latency_bucket: Dur,
    /// How often latency is measured, with `latency_bucket`.
    #[serde(default = "default_rebalance_every")]
    pub rebalance_every: Dur,
}

/// Backends of equal preference.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierConfig {
    /// `host:port` or `[v6]:port`; a host name expands to every address it resolves to.
    #[serde(default)]
    pub targets: Vec<String>,
    /// Registered services whose nodes are reached through their sidecars' mesh
    /// listeners, over mTLS (the sidecar needs --mesh-ca-cert).
    #[serde(default)]
    pub services: Vec<String>,
    /// Connections per backend before the next backend (or tier) is used. 0: no limit.
    #[serde(default)]
    pub max_connections: usize,
    #[serde(default = "default_dial_timeout")]
    pub dial_timeout: Dur,
    /// Dial every backend of the tier this often to know it is up before a client
    /// needs it. 0: only client connections tell.
    #[serde(default)]
    pub health_check: Dur,
}

/// How long a client connection waits for a backend when the file does not say.
pub fn default_connect_timeout() -> Dur {
    Dur(Duration::from_secs(5))
}

fn default_down_for() -> Dur {
    Dur(Duration::from_secs(2))
}

/// iaido's `rebalanceDuration` default.
pub fn default_rebalance_every() -> Dur {
    Dur(Duration::from_secs(10))
}

fn default_dial_timeout() -> Dur {
    Dur(Duration::from_secs(1))
}

/// Splits `host:port` / `[v6]:port` into the host and the port.
pub fn split_target(target: &str) -> Result<(String, u16), String> {
    let (host, port) = target
        .rsplit_once(':')
        .ok_or_else(|| format!("target {target:?} has no port: write host:port"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("target {target:?} has no valid port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("target {target:?} has no host"));
    }
    Ok((host.to_string(), port))
}

/// Checks what types alone cannot: at least one tier and target, valid targets, and
/// no two listeners on one address.
pub fn validate(listeners: &[ListenerConfig]) -> Result<(), String> {
    for (i, l) in listeners.iter().enumerate() {
        let at = format!("tcp listener {} ({})", i + 1, l.listen);
        if l.tiers.is_empty() {
            return Err(format!("{at} has no [[tcp.tiers]]"));
        }
        for (t, tier) in l.tiers.iter().enumerate() {
            if tier.targets.is_empty() && tier.services.is_empty() {
                return Err(format!(
                    "{at}, tier {}: give targets (host:port) or services (names in the registry)",
                    t + 1
                ));
            }
            for target in &tier.targets {
                split_target(target).map_err(|e| format!("{at}, tier {}: {e}", t + 1))?;
            }
            if tier.dial_timeout.0.is_zero() {
                return Err(format!(
                    "{at}, tier {}: dial_timeout must be more than 0",
                    t + 1
                ));
            }
        }
        if l.connect_timeout.0.is_zero() {
            return Err(format!("{at}: connect_timeout must be more than 0"));
        }
        if !l.latency_bucket.0.is_zero() && l.rebalance_every.0.is_zero() {
            return Err(format!(
                "{at}: rebalance_every must be more than 0 with latency_bucket"
            ));
        }
        if listeners[..i].iter().any(|o| o.listen == l.listen) {
            return Err(format!("{at}: another listener has the same address"));
        }
    }
    Ok(())
}

/// A `LOCAL:HOST:PORT` binding of `pillion bootstrap`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub local: u16,
    pub target: String,
}

impl std::str::FromStr for Binding {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (local, target) = s.split_once(':').ok_or_else(|| {
            format!("{s:?} is not LOCAL:HOST:PORT (for example 26257:127.0.0.1:26258)")
        })?;
        let local: u16 = local
            .parse()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("{s:?}: {local:?} is not a local port"))?;
        split_target(target).map_err(|e| format!("{s:?}: {e}"))?;
        Ok(Binding {
            local,
            target: target.to_string(),
        })
    }
}

/// The commented TOML that `pillion bootstrap` writes: one listener per local port on
/// `addr`, its targets in one tier.
pub fn bootstrap(addr: std::net::IpAddr, bindings: &[Binding]) -> String {
    let mut out = String::from(
        "# pillion TCP proxy configuration, written by `pillion bootstrap`.\n\
         # pillion re-reads this file when it changes (and on SIGHUP); an invalid\n\
         # file is reported and the running configuration stays.\n",
    );
    let mut ports: Vec<u16> = bindings.iter().map(|b| b.local).collect();
    ports.dedup();
    ports.sort_unstable();
    ports.dedup();
    for port in ports {
        let listen = SocketAddr::new(addr, port);
        let targets: Vec<String> = bindings
            .iter()
            .filter(|b| b.local == port)
            .map(|b| format!("{:?}", b.target))
            .collect();
        out.push_str(&format!(
            "\n[[tcp]]\nlisten = \"{listen}\"\n\
             # failback_after = \"10s\"   # move connections back to a better tier; 0 = never\n\
             # idle_timeout = \"0\"       # close connections idle this long; 0 = never\n\
             [[tcp.tiers]]               # tiers in order of preference; add more below\n\
             targets = [{}]               # host names expand to every A/AAAA record\n\
             max_connections = 0         # per backend; 0 = unlimited\n\
             dial_timeout = \"1s\"\n",
            targets.join(", ")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        tcp: Vec<ListenerConfig>,
    }

    #[test]
    fn the_documented_example_parses_with_defaults() {
        let f: File = toml::from_str(
            r#"
[[tcp]]
listen = "127.0.0.1:26257"
failback_after = "10s"
[[tcp.tiers]]
targets = ["db-a.internal:26258", "127.0.0.1:26259"]
max_connections = 0
dial_timeout = "1s"
[[tcp.tiers]]
targets = ["[::1]:26260"]
health_check = "2s"
"#,
        )
        .unwrap();
        assert_eq!(f.tcp[0].tiers.len(), 2);
        assert_eq!(f.tcp[0].connect_timeout.0, Duration::from_secs(5));
        assert_eq!(f.tcp[0].tiers[1].dial_timeout.0, Duration::from_secs(1));
        validate(&f.tcp).unwrap();
        assert_eq!(
            split_target("[::1]:26260").unwrap(),
            ("::1".to_string(), 26260)
        );
    }

    #[test]
    fn mistakes_are_named() {
        let no_port = vec![ListenerConfig {
            listen: "127.0.0.1:1".parse().unwrap(),
            tiers: vec![TierConfig {
                targets: vec!["db".into()],
                services: vec![],
                max_connections: 0,
                dial_timeout: default_dial_timeout(),
                health_check: Dur::default(),
            }],
            failback_after: Dur::default(),
            idle_timeout: Dur::default(),
            connect_timeout: default_connect_timeout(),
            down_for: default_down_for(),
            latency_bucket: Dur::default(),
            rebalance_every: default_rebalance_every(),
        }];
        assert!(validate(&no_port).unwrap_err().contains("has no port"));
        let mut never = no_port.clone();
        never[0].tiers[0].targets = vec!["db:1".into()];
        never[0].latency_bucket = Dur(Duration::from_millis(10));
        never[0].rebalance_every = Dur::default();
        assert!(validate(&never).unwrap_err().contains("rebalance_every"));
        assert!("26257".parse::<Binding>().is_err());
        assert!("x:127.0.0.1:1".parse::<Binding>().is_err());
        assert_eq!(
            "26257:[::1]:26258".parse::<Binding>().unwrap(),
            Binding {
                local: 26257,
                target: "[::1]:26258".into()
            }
        );
    }

    #[test]
    fn bootstrap_writes_a_valid_file() {
        let bindings: Vec<Binding> = [
            "26257:127.0.0.1:26258",
            "26257:127.0.0.1:26259",
            "8080:127.0.0.1:8181",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let text = bootstrap("127.0.0.1".parse().unwrap(), &bindings);
        let f: File = toml::from_str(&text).unwrap();
        assert_eq!(f.tcp.len(), 2);
        assert_eq!(
            f.tcp[1].tiers[0].targets,
            ["127.0.0.1:26258", "127.0.0.1:26259"]
        );
        assert_eq!(f.tcp[0].listen, "127.0.0.1:8080".parse().unwrap());
    }
}
