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
//!   re-assigns every backend to a tier by measured latency every
//!   `rebalanceDuration` (0 means 10s), ignoring the tiers as written; only a negative
//!   value turns it off (pillion's `latency_bucket`, `rebalance_every`). `dialFailureTimeout` is how long a
//!   backend is left alone after a failed dial; `maxBackendConnections` 0 is no limit;
//! - `pkg/frontend/frontend.go`, `frontend/tcp/tcp.go`: `bindAddress` binds every
//!   interface unless its host is an IP; `idleDuration` closes a connection after no
//!   byte moved; `forcePromotionAfter` closes a connection on a worse tier once a
//!   better one has been available that long; `maintenanceTime` is only the period of
//!   those checks (pillion's are continuous);
//! - `cmd/iaido/main.go`: `diagAddr` serves /healthz and /statusz; `gracePeriod`.
//!
//! What pillion cannot honour is refused with the key's name, its line and what to
//! write instead; nothing is dropped without a word.

use std::collections::{BTreeMap, BTreeSet};
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
    max_backend_connections: Option<i64>,
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

/// The file's text and the keys met so far, so that an error names the line of the
/// occurrence it is about among repeated keys (the YAML crate gives lines only for
/// its own errors).
struct Reader<'a> {
    text: &'a str,
    seen: BTreeMap<&'static str, usize>,
}

/// A key met: which occurrence of its name in the file it is.
#[derive(Clone, Copy)]
struct Key {
    name: &'static str,
    nth: usize,
}

impl<'a> Reader<'a> {
    /// Notes the key `name`, present or not, in the order the file has them.
    fn key(&mut self, name: &'static str, present: bool) -> Key {
        let count = self.seen.entry(name).or_default();
        let nth = *count;
        if present {
            *count += 1;
        }
        Key { name, nth }
    }

    /// `message`, with the line of `key` in the file shown before it.
    fn error(&self, key: Key, message: String) -> String {
        // Each place the key is written, block style (`key:`) or flow (`{a: 1, key: 2}`).
        let written = format!("{}:", key.name);
        let found = self
            .text
            .lines()
            .enumerate()
            .flat_map(|(i, l)| {
                l.match_indices(&written)
                    .filter(|(at, _)| {
                        l[..*at]
                            .chars()
                            .next_back()
                            .is_none_or(|c| matches!(c, ' ' | '{' | ',' | '-'))
                    })
                    .map(move |_| (i, l))
            })
            .nth(key.nth);
        match found {
            Some((i, l)) => format!("line {}: {message}\n    {} | {}", i + 1, i + 1, l.trim()),
            None => message,
        }
    }

    /// A Go duration that may be negative (`None`), as iaido's switches are.
    fn signed(
        &mut self,
        name: &'static str,
        value: Option<&str>,
    ) -> Result<Option<Duration>, String> {
        let key = self.key(name, value.is_some());
        let Some(v) = value else {
            return Ok(Some(Duration::ZERO));
        };
        go_duration(v).map_err(|e| self.error(key, format!("{name}: {e}")))
    }

    /// A Go duration where iaido's Validate turns 0 or absent into its default; a
    /// negative one is refused.
    fn duration(
        &mut self,
        name: &'static str,
        value: Option<&str>,
        here: &str,
    ) -> Result<Duration, String> {
        let default = match name {
            "gracePeriod" => Duration::from_secs(5),
            "idleDuration" => Duration::from_secs(3600),
            "dialFailureTimeout" => Duration::from_secs(1),
            _ => Duration::ZERO,
        };
        let key = self.key(name, false);
        match self.signed(name, value)? {
            Some(d) if d.is_zero() => Ok(default),
            Some(d) => Ok(d),
            None => Err(self.error(
                Key {
                    nth: key.nth,
                    ..key
                },
                format!(
                    "{here}.{name} {} is negative; write a duration like {}",
                    value.unwrap_or_default(),
                    pillion_core::duration::format(default.max(Duration::from_secs(1)))
                ),
            )),
        }
    }

    /// iaido's per-tier `name` held in `slot`, where pillion has one per listener
    /// (`pillion_key`): every tier must give the same.
    fn same(
        &self,
        slot: &mut Option<Duration>,
        value: Duration,
        name: &'static str,
        here: &str,
        pillion_key: &str,
    ) -> Result<(), String> {
        match *slot {
            Some(before) if before != value => {
                let key = Key {
                    name,
                    nth: self.seen.get(name).map_or(0, |n| n.saturating_sub(1)),
                };
                Err(self.error(
                    key,
                    format!(
                        "{here}.{name} {}: pillion has one {pillion_key} per listener; give \
                         these tiers of the frontend the same {name} ({} before)",
                        pillion_core::duration::format(value),
                        pillion_core::duration::format(before)
                    ),
                ))
            }
            _ => {
                *slot = Some(value);
                Ok(())
            }
        }
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
    let mut r = Reader {
        text,
        seen: BTreeMap::new(),
    };
    let mut out = FileConfig::default();
    let mut notices = BTreeSet::new();

    if let Some(diag) = &config.diag_addr {
        let key = r.key("diagAddr", true);
        let addr =
            bind_address(diag).map_err(|e| r.error(key, format!("diagAddr {diag:?}: {e}")))?;
        out.options.push(("address".into(), vec![addr.to_string()]));
    }
    let grace = r.duration("gracePeriod", config.grace_period.as_deref(), "")?;
    out.options.push((
        "grace_period".into(),
        vec![pillion_core::duration::format(grace)],
    ));

    for (f, fe) in config.frontends.iter().enumerate() {
        let here = format!("frontends[{f}]");
        let key = r.key("bindAddress", fe.bind_address.is_some());
        let bind = fe.bind_address.as_deref().unwrap_or("");
        let listen = bind_address(bind)
            .map_err(|e| r.error(key, format!("{here}.bindAddress {bind:?}: {e}")))?;

        let pool = &fe.backend_pool;
        // iaido's Validate makes 0 (or no key) 10ms; only a negative value turns the
        // latency tiers off.
        let latency_bucket = match r.signed("latencyBucket", pool.latency_bucket.as_deref())? {
            Some(d) if d.is_zero() => Duration::from_millis(10),
            Some(d) => d,
            None => Duration::ZERO,
        };
        let key = r.key("rebalanceDuration", false);
        let rebalance = match r.signed("rebalanceDuration", fe.rebalance_duration.as_deref())? {
            Some(d) if d.is_zero() => Duration::from_secs(10),
            Some(d) => d,
            // Never measured again after the start: pillion measures on a period.
            None if !latency_bucket.is_zero() => {
                return Err(r.error(
                    key,
                    format!(
                        "{here}.rebalanceDuration {}: iaido would measure latency once, at \
                         the start; pillion measures it every rebalanceDuration: write a \
                         positive duration (10s is iaido's default)",
                        fe.rebalance_duration.as_deref().unwrap_or_default()
                    ),
                ))
            }
            None => Duration::from_secs(10),
        };
        if r.signed("maintenanceTime", pool.maintenance_time.as_deref())? != Some(Duration::ZERO) {
            notices.insert(
                "note: iaido's maintenanceTime is the period at which iaido checked each \
                 connection for idleness and promotion; pillion checks continuously, so \
                 idleDuration and forcePromotionAfter take effect on time, not up to two \
                 maintenanceTimes late"
                    .to_string(),
            );
        }
        let idle = r.duration("idleDuration", fe.idle_duration.as_deref(), &here)?;

        let mut tiers = Vec::new();
        let mut down_for = None;
        let mut failback = None;
        for (t, tier) in pool.tiers.iter().enumerate() {
            let here = format!("{here}.backendPool.tiers[{t}]");
            let down = r.duration(
                "dialFailureTimeout",
                tier.dial_failure_timeout.as_deref(),
                &here,
            )?;
            let promote = r.duration(
                "forcePromotionAfter",
                tier.force_promotion_after.as_deref(),
                &here,
            )?;
            let key = r.key(
                "maxBackendConnections",
                tier.max_backend_connections.is_some(),
            );
            let max = tier.max_backend_connections.unwrap_or(0);
            let max_connections = usize::try_from(max).map_err(|_| {
                r.error(
                    key,
                    format!("{here}.maxBackendConnections {max} is negative; 0 is no limit"),
                )
            })?;
            let mut targets = Vec::new();
            for (g, target) in tier.targets.iter().enumerate() {
                let here = format!("{here}.targets[{g}]");
                let key = r.key("proto", target.proto.is_some());
                match target
                    .proto
                    .as_deref()
                    .map(str::to_ascii_uppercase)
                    .as_deref()
                {
                    None | Some("TCP") => {}
                    Some("UDP") => {
                        return Err(r.error(
                            key,
                            format!(
                                "{here}.proto udp: pillion proxies TCP only (iaido never served \
                                 UDP either); remove this target or write proto: tcp"
                            ),
                        ))
                    }
                    Some(other) => {
                        return Err(r.error(key, format!("{here}.proto {other:?}: write tcp")))
                    }
                }
                if target.hosts.is_empty() || target.port == 0 {
                    return Err(format!("{here}: give hosts and port, as iaido requires"));
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
            // A tier whose targets are all disabled has no backend in iaido either, and
            // its times are never read.
            if !targets.is_empty() {
                r.same(&mut down_for, down, "dialFailureTimeout", &here, "down_for")?;
                // Tier 0 has no better tier: iaido never reads its value.
                if t > 0 {
                    r.same(
                        &mut failback,
                        promote,
                        "forcePromotionAfter",
                        &here,
                        "failback_after",
                    )?;
                }
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
                "{here} ({bind}) has no enabled target: give backendPool.tiers[].targets with \
                 hosts and port"
            ));
        }
        out.tcp.push(ListenerConfig {
            listen,
            tiers,
            failback_after: Dur(failback.unwrap_or_default()),
            idle_timeout: Dur(idle),
            connect_timeout: pillion_tcp::config::default_connect_timeout(),
            down_for: Dur(down_for.unwrap_or(Duration::from_secs(1))),
            latency_bucket: Dur(latency_bucket),
            rebalance_every: Dur(rebalance),
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

    /// Two tiers in YAML's flow style, which iaido's decoder reads too; the
    /// integration tests (tests/iaido.rs) run the block style iaido writes.
    fn two_tiers(first_down: &str) -> String {
        format!(
            "frontends:
  - bindAddress: ':7000'
    idleDuration: 2m
    backendPool:
      latencyBucket: -1s
      tiers:
        - {{dialFailureTimeout: {first_down}, maxBackendConnections: 4,
            targets: [{{hosts: [a.internal, '::1'], port: 7001}}, {{disabled: true, hosts: [b], port: 1}}]}}
        - {{forcePromotionAfter: 30s, targets: [{{hosts: [c], port: 7002, proto: tcp}}]}}
        - {{targets: [{{disabled: true, hosts: [d], port: 7003}}]}}
"
        )
    }

    #[test]
    fn tiers_targets_and_times_map_to_the_listener() {
        let f = parse(&two_tiers("1s")).unwrap();
        assert_eq!(
            f.options,
            [("grace_period".to_string(), vec!["5s".to_string()])]
        );
        let l = &f.tcp[0];
        assert_eq!(l.listen, "0.0.0.0:7000".parse().unwrap());
        assert_eq!(l.tiers.len(), 2, "the all-disabled tier is left out");
        assert_eq!(l.tiers[0].targets, ["a.internal:7001", "[::1]:7001"]);
        assert_eq!(l.tiers[0].max_connections, 4);
        assert_eq!(l.tiers[1].targets, ["c:7002"]);
        assert_eq!(l.failback_after.0, Duration::from_secs(30));
        assert_eq!(l.idle_timeout.0, Duration::from_secs(120));
        assert_eq!(l.down_for.0, Duration::from_secs(1), "iaido's default");
        assert!(f.notices.is_empty(), "{:?}", f.notices);
    }

    #[test]
    fn per_tier_values_pillion_keeps_per_listener_must_agree() {
        let e = parse(&two_tiers("3s")).unwrap_err();
        assert!(e.contains("down_for") && e.contains("(3s before)"), "{e}");
        let e = parse(&two_tiers("1s").replace("':7000'", "localhost:7000")).unwrap_err();
        assert!(
            e.starts_with("line 2: ") && e.contains("0.0.0.0:7000"),
            "{e}"
        );
        let e = parse(&two_tiers("1s").replace("Connections: 4", "Connections: -1")).unwrap_err();
        assert!(
            e.starts_with("line 7: ") && e.contains("0 is no limit"),
            "{e}"
        );
    }

    #[test]
    fn latency_tiers_are_on_by_default_as_in_iaido_and_off_only_when_negative() {
        let ms = Duration::from_millis;
        let listener = |text: &str| parse(text).map(|f| f.tcp[0].clone());
        let off = listener(&two_tiers("1s")).unwrap();
        assert_eq!(off.latency_bucket.0, Duration::ZERO);
        let on = two_tiers("1s").replace("      latencyBucket: -1s\n", "");
        let l = listener(&on).unwrap();
        assert_eq!(
            (l.latency_bucket.0, l.rebalance_every.0),
            (ms(10), ms(10_000))
        );
        let zero = two_tiers("1s").replace("latencyBucket: -1s", "latencyBucket: 0s");
        assert_eq!(listener(&zero).unwrap().latency_bucket.0, ms(10));
        let set = two_tiers("1s")
            .replace("latencyBucket: -1s", "latencyBucket: 25ms")
            .replace(
                "idleDuration: 2m",
                "idleDuration: 2m\n    rebalanceDuration: 3s",
            );
        let l = listener(&set).unwrap();
        assert_eq!(
            (l.latency_bucket.0, l.rebalance_every.0),
            (ms(25), ms(3000))
        );
        let once = set.replace("rebalanceDuration: 3s", "rebalanceDuration: -1s");
        let e = listener(&once).unwrap_err();
        assert!(
            e.starts_with("line 4: ") && e.contains("rebalanceDuration -1s"),
            "{e}"
        );
        // With the tiers as written, iaido never measures: any period goes.
        let l = listener(&once.replace("latencyBucket: 25ms", "latencyBucket: -1ns")).unwrap();
        assert_eq!(l.latency_bucket.0, Duration::ZERO);
    }

    #[test]
    fn yaml_is_told_by_name_or_by_its_first_key() {
        assert!(is_iaido(Path::new("a/iaido.yml"), ""));
        assert!(is_iaido(Path::new("conf"), "# x\nfrontends:\n"));
        assert!(!is_iaido(Path::new("pillion.toml"), "[[tcp]]\n"));
    }
}
