//! iaido's config file (YAML), read as it is and turned into pillion's options and
//! `[[tcp]]` listeners ([`FileConfig`]), so `pillion run --config iaido.yaml` serves what iaido served
//! and `pillion migrate iaido.yaml` writes the same thing as pillion's TOML.
//!
//! It follows iaido's source (github.com/bobvawter/iaido, v0.1.4):
//! - `pkg/config/config.go`: the keys, their defaults (filled by `Validate`) and the
//!   decoder that refuses unknown keys;
//! - `pkg/config/target.go`: `targets` (`disabled`, `hosts`, `port`, `proto`, lower
//!   case because the struct has no tags) and `proto` read case-insensitively;
//! - `pkg/balancer/balancer.go`, `latency.go`: `latencyBucket` >= 0 (0 means 10ms)
//!   re-assigns every backend to a tier by measured latency, ignoring the tiers as
//!   written; only a negative value turns it off. `dialFailureTimeout` is how long a
//!   backend is left alone after a failed dial; `maxBackendConnections` 0 is no limit;
//! - `pkg/frontend/frontend.go`, `frontend/tcp/tcp.go`: `bindAddress` binds every
//!   interface unless its host is an IP; `idleDuration` closes a connection after no
//!   byte moved; `forcePromotionAfter` closes a connection on a worse tier once a
//!   better one has been available that long; `maintenanceTime` is only the period of
//!   those checks;
//! - `cmd/iaido/main.go`: `diagAddr` serves /healthz and /statusz; `gracePeriod`.
//!
//! What pillion cannot honour is refused with the key's name, its line and what to
//! write instead; nothing is dropped without a word.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use pillion_core::Dur;
use pillion_tcp::{ListenerConfig, TierConfig};

use crate::config::FileConfig;
use serde::Deserialize;

/// iaido's `config.Config`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Config {
    diag_addr: Option<String>,
    #[serde(default)]
    frontends: Vec<Frontend>,
    grace_period: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Frontend {
    backend_pool: BackendPool,
    bind_address: Option<String>,
    idle_duration: Option<String>,
    rebalance_duration: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct BackendPool {
    latency_bucket: Option<String>,
    maintenance_time: Option<String>,
    #[serde(default)]
    tiers: Vec<Tier>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Tier {
    dial_failure_timeout: Option<String>,
    force_promotion_after: Option<String>,
    #[serde(default)]
    max_backend_connections: i64,
    #[serde(default)]
    targets: Vec<Target>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Target {
    #[serde(default)]
    disabled: bool,
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    port: u16,
    proto: Option<String>,
}

/// Whether the file is iaido's: a `.yaml`/`.yml` name, or YAML that starts with
/// iaido's `frontends:` (comments aside).
pub fn is_iaido(path: &Path, text: &str) -> bool {
    let yaml_name = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"));
    yaml_name
        || text
            .lines()
            .map(str::trim_end)
            .find(|l| !l.is_empty() && !l.starts_with('#') && l != &"---")
            .is_some_and(|l| l.starts_with("frontends:") || l.starts_with("diagAddr:"))
}

/// A Go duration (`time.ParseDuration`): `None` when it is negative.
fn go_duration(text: &str) -> Result<Option<Duration>, String> {
    match text.trim().strip_prefix('-') {
        Some(rest) => pillion_core::duration::parse(rest)
            .map(|_| None)
            .map_err(|e| e.to_string()),
        None => pillion_core::duration::parse(text)
            .map(Some)
            .map_err(|e| e.to_string()),
    }
}

/// Where an error about the `nth` (0-based) `key:` of the file is: its line, shown.
fn at(text: &str, key: &str, nth: usize, message: String) -> String {
    let found = text
        .lines()
        .enumerate()
        .filter(|(_, l)| {
            l.trim_start()
                .trim_start_matches("- ")
                .trim_start()
                .starts_with(&format!("{key}:"))
        })
        .nth(nth);
    match found {
        Some((i, l)) => format!("line {}: {message}\n    {} | {}", i + 1, i + 1, l.trim()),
        None => message,
    }
}

/// Counts the keys met so far, so an error names the right line among repeated ones.
#[derive(Default)]
struct Seen(std::collections::BTreeMap<&'static str, usize>);

impl Seen {
    /// The index of this occurrence of `key`, when the file has it.
    fn next(&mut self, key: &'static str, present: bool) -> usize {
        let n = self.0.entry(key).or_default();
        let this = *n;
        if present {
            *n += 1;
        }
        this
    }
}

/// Reads iaido's YAML; an error names the key, its line and what to write instead.
pub fn parse(text: &str) -> Result<FileConfig, String> {
    let config: Config = serde_yaml_ng::from_str(text).map_err(|e| match e.location() {
        Some(l) => {
            let content = text.lines().nth(l.line() - 1).unwrap_or("").trim();
            format!("line {}: {e}\n    {} | {content}", l.line(), l.line())
        }
        None => e.to_string(),
    })?;
    let mut out = FileConfig::default();
    let mut notices = BTreeSet::new();
    let mut seen = Seen::default();
    let dur = |key: &'static str, value: &str, nth: usize| {
        go_duration(value).map_err(|e| at(text, key, nth, format!("{key}: {e}")))
    };

    if let Some(diag) = &config.diag_addr {
        let n = seen.next("diagAddr", true);
        let addr = bind_address(diag)
            .map_err(|e| at(text, "diagAddr", n, format!("diagAddr {diag:?}: {e}")))?;
        out.options.push(("address".into(), vec![addr.to_string()]));
    }
    // iaido's Validate: 0 or absent is 5s.
    let grace = match &config.grace_period {
        Some(g) => {
            let n = seen.next("gracePeriod", true);
            dur("gracePeriod", g, n)?.ok_or_else(|| {
                at(
                    text,
                    "gracePeriod",
                    n,
                    "gracePeriod is negative; write a duration like 5s".into(),
                )
            })?
        }
        None => Duration::ZERO,
    };
    let grace = if grace.is_zero() {
        Duration::from_secs(5)
    } else {
        grace
    };
    out.options.push((
        "grace_period".into(),
        vec![pillion_core::duration::format(grace)],
    ));

    for (f, fe) in config.frontends.iter().enumerate() {
        let here = format!("frontends[{f}]");
        let n = seen.next("bindAddress", fe.bind_address.is_some());
        let bind = fe.bind_address.as_deref().unwrap_or("");
        let listen = bind_address(bind).map_err(|e| {
            at(
                text,
                "bindAddress",
                n,
                format!("{here}.bindAddress {bind:?}: {e}"),
            )
        })?;

        let n = seen.next("latencyBucket", fe.backend_pool.latency_bucket.is_some());
        match &fe.backend_pool.latency_bucket {
            None => {
                notices.insert(
                    "warning: iaido's file has no latencyBucket, so iaido would re-assign its \
                     backends to tiers by measured latency (its default); pillion keeps the \
                     tiers as written (write latencyBucket: -1ns to say so)"
                        .to_string(),
                );
            }
            Some(v) => {
                if dur("latencyBucket", v, n)?.is_some() {
                    return Err(at(
                        text,
                        "latencyBucket",
                        n,
                        format!(
                            "{here}.backendPool.latencyBucket {v}: iaido's automatic tiers by \
                             measured latency are not in pillion yet; pillion keeps the tiers \
                             as written. Turn it off as iaido does, with latencyBucket: -1ns"
                        ),
                    ));
                }
            }
        }
        // Without latency tiers, rebalancing only re-sorts iaido's pool, which pillion
        // does on every connection: any value is honoured.
        let n = seen.next("rebalanceDuration", fe.rebalance_duration.is_some());
        if let Some(v) = &fe.rebalance_duration {
            dur("rebalanceDuration", v, n)?;
        }
        let n = seen.next(
            "maintenanceTime",
            fe.backend_pool.maintenance_time.is_some(),
        );
        if let Some(v) = &fe.backend_pool.maintenance_time {
            dur("maintenanceTime", v, n)?;
            notices.insert(
                "warning: iaido's maintenanceTime has no effect: pillion closes idle connections \
                 after exactly idleDuration and moves connections back once a better tier has \
                 been up for forcePromotionAfter, without a check period"
                    .to_string(),
            );
        }
        let n = seen.next("idleDuration", fe.idle_duration.is_some());
        let idle = match &fe.idle_duration {
            Some(v) => dur("idleDuration", v, n)?.ok_or_else(|| {
                at(
                    text,
                    "idleDuration",
                    n,
                    format!("{here}.idleDuration {v} is negative; write a duration like 1h"),
                )
            })?,
            None => Duration::ZERO,
        };
        // iaido's Validate: 0 or absent is an hour.
        let idle = if idle.is_zero() {
            Duration::from_secs(3600)
        } else {
            idle
        };

        let mut tiers = Vec::new();
        let mut down_for: Option<(Duration, usize)> = None;
        let mut failback: Option<(Duration, usize)> = None;
        for (t, tier) in fe.backend_pool.tiers.iter().enumerate() {
            let here = format!("{here}.backendPool.tiers[{t}]");
            let n = seen.next("dialFailureTimeout", tier.dial_failure_timeout.is_some());
            let down = match &tier.dial_failure_timeout {
                Some(v) => dur("dialFailureTimeout", v, n)?.ok_or_else(|| {
                    at(
                        text,
                        "dialFailureTimeout",
                        n,
                        format!(
                            "{here}.dialFailureTimeout {v} is negative; write a duration like 1s"
                        ),
                    )
                })?,
                None => Duration::ZERO,
            };
            let down = if down.is_zero() {
                Duration::from_secs(1)
            } else {
                down
            };
            match down_for {
                Some((d, _)) if d != down => {
                    return Err(at(
                        text,
                        "dialFailureTimeout",
                        n,
                        format!(
                            "{here}.dialFailureTimeout {}: pillion leaves a failed backend alone \
                             for one time per listener (down_for); give every tier of this \
                             frontend the same dialFailureTimeout ({} here before)",
                            pillion_core::duration::format(down),
                            pillion_core::duration::format(d)
                        ),
                    ))
                }
                _ => down_for = Some((down, t)),
            }
            let n = seen.next("forcePromotionAfter", tier.force_promotion_after.is_some());
            let promote = match &tier.force_promotion_after {
                Some(v) => dur("forcePromotionAfter", v, n)?.ok_or_else(|| {
                    at(text, "forcePromotionAfter", n, format!("{here}.forcePromotionAfter {v} is negative; write 0s to keep connections"))
                })?,
                None => Duration::ZERO,
            };
            // Tier 0 has no better tier: iaido never reads its value.
            if t > 0 {
                match failback {
                    Some((d, _)) if d != promote => {
                        return Err(at(
                            text,
                            "forcePromotionAfter",
                            n,
                            format!(
                                "{here}.forcePromotionAfter {}: pillion moves connections back \
                                 after one time per listener (failback_after); give every tier \
                                 but the first the same forcePromotionAfter ({} before)",
                                pillion_core::duration::format(promote),
                                pillion_core::duration::format(d)
                            ),
                        ))
                    }
                    _ => failback = Some((promote, t)),
                }
            }
            let n = seen.next("maxBackendConnections", true);
            let max_connections = usize::try_from(tier.max_backend_connections).map_err(|_| {
                at(
                    text,
                    "maxBackendConnections",
                    n,
                    format!(
                        "{here}.maxBackendConnections {} is negative; 0 is no limit",
                        tier.max_backend_connections
                    ),
                )
            })?;
            let mut targets = Vec::new();
            for (g, target) in tier.targets.iter().enumerate() {
                let here = format!("{here}.targets[{g}]");
                let n = seen.next("proto", target.proto.is_some());
                if let Some(p) = &target.proto {
                    match p.to_ascii_uppercase().as_str() {
                        "TCP" => {}
                        "UDP" => {
                            return Err(at(
                                text,
                                "proto",
                                n,
                                format!("{here}.proto udp: pillion proxies TCP only (as iaido does: it never served UDP); remove this target or write proto: tcp"),
                            ))
                        }
                        other => {
                            return Err(at(text, "proto", n, format!("{here}.proto {other:?}: write tcp")))
                        }
                    }
                }
                if target.hosts.is_empty() || target.port == 0 {
                    return Err(format!("{here}: iaido requires hosts and port"));
                }
                // iaido's `disabled: true` gives the target no connections.
                if target.disabled {
                    continue;
                }
                targets.extend(target.hosts.iter().map(|h| match h.parse::<IpAddr>() {
                    Ok(IpAddr::V6(v6)) => format!("[{v6}]:{}", target.port),
                    _ => format!("{h}:{}", target.port),
                }));
            }
            // A tier whose targets are all disabled has no backend in iaido either.
            if !targets.is_empty() {
                tiers.push(TierConfig {
                    targets,
                    services: Vec::new(),
                    max_connections,
                    dial_timeout: Dur(Duration::from_secs(1)),
                    health_check: Dur::default(),
                });
            }
        }
        if tiers.is_empty() {
            return Err(format!(
                "{here} ({bind}) has no enabled target: give backendPool.tiers[].targets with hosts and port"
            ));
        }
        out.tcp.push(ListenerConfig {
            listen,
            tiers,
            failback_after: Dur(failback.map_or(Duration::ZERO, |(d, _)| d)),
            idle_timeout: Dur(idle),
            connect_timeout: pillion_tcp::config::default_connect_timeout(),
            down_for: Dur(down_for.map_or(Duration::from_secs(1), |(d, _)| d)),
        });
    }
    pillion_tcp::config::validate(&out.tcp)?;
    out.notices = notices.into_iter().collect();
    Ok(out)
}

/// iaido's bind address: `host:port` (optionally `tcp:`), where a host that is not an
/// IP, or none, binds every interface.
fn bind_address(text: &str) -> Result<SocketAddr, String> {
    let lower = text.to_ascii_lowercase();
    if lower.starts_with("udp:") {
        return Err("pillion proxies TCP only".into());
    }
    let text = if lower.starts_with("tcp:") {
        &text[4..]
    } else {
        text
    };
    if text.is_empty() {
        return Err("give host:port (iaido would pick a random port)".into());
    }
    let (host, port) = text
        .rsplit_once(':')
        .ok_or_else(|| "write host:port".to_string())?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{port:?} is not a port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port));
    }
    match host.parse::<IpAddr>() {
        Ok(ip) => Ok(SocketAddr::new(ip, port)),
        Err(_) => Err(format!(
            "iaido binds every interface when the host is a name; write 0.0.0.0:{port} for \
             that, or the IP to listen on (127.0.0.1:{port})"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `iaido --bootstrapAddr 127.0.0.1 --bootstrap 26257:127.0.0.1:26258
    /// --bootstrap 26257:127.0.0.1:26259` writes (yaml.v3 after Validate), with
    /// latencyBucket turned off.
    const BOOTSTRAPPED: &str = "diagAddr: 127.0.0.1:13013
frontends:
  - backendPool:
      latencyBucket: -1ns
      maintenanceTime: 30s
      tiers:
        - dialFailureTimeout: 1s
          forcePromotionAfter: 0s
          maxBackendConnections: 0
          targets:
            - disabled: false
              hosts:
                - 127.0.0.1
              port: 26258
              proto: TCP
            - disabled: true
              hosts:
                - ::1
              port: 26259
              proto: TCP
    bindAddress: 127.0.0.1:26257
    idleDuration: 1h0m0s
    rebalanceDuration: 10s
gracePeriod: 5s
";

    #[test]
    fn every_key_iaido_writes_maps_to_pillions() {
        let t = parse(BOOTSTRAPPED).unwrap();
        assert_eq!(
            t.options,
            [
                ("address".to_string(), vec!["127.0.0.1:13013".to_string()]),
                ("grace_period".to_string(), vec!["5s".to_string()])
            ]
        );
        let l = &t.tcp[0];
        assert_eq!(l.listen, "127.0.0.1:26257".parse().unwrap());
        assert_eq!(l.tiers[0].targets, ["127.0.0.1:26258"]);
        assert_eq!(l.idle_timeout.0, Duration::from_secs(3600));
        assert_eq!(l.down_for.0, Duration::from_secs(1));
        assert_eq!(t.notices.len(), 1, "{:?}", t.notices);
    }

    #[test]
    fn what_pillion_cannot_honour_is_refused_with_its_line() {
        let on = BOOTSTRAPPED.replace("-1ns", "10ms");
        let e = parse(&on).unwrap_err();
        assert!(
            e.starts_with("line 4: ") && e.contains("latencyBucket: -1"),
            "{e}"
        );
        let udp = BOOTSTRAPPED.replacen("proto: TCP", "proto: udp", 1);
        let e = parse(&udp).unwrap_err();
        assert!(e.starts_with("line 15: ") && e.contains("TCP only"), "{e}");
        let unknown = BOOTSTRAPPED.replace("idleDuration", "idleDurration");
        let e = parse(&unknown).unwrap_err();
        assert!(
            e.starts_with("line 22") && e.contains("idleDurration"),
            "{e}"
        );
        let named = BOOTSTRAPPED.replace("bindAddress: 127.0.0.1", "bindAddress: localhost");
        assert!(parse(&named).unwrap_err().contains("0.0.0.0:26257"));
    }

    #[test]
    fn yaml_is_told_by_name_or_by_its_first_key() {
        assert!(is_iaido(Path::new("a/iaido.yml"), ""));
        assert!(is_iaido(Path::new("conf"), "# x\nfrontends:\n"));
        assert!(!is_iaido(Path::new("pillion.toml"), "[[tcp]]\n"));
    }
}
