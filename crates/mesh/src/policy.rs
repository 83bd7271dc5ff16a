//! Who may call the app, and how often: the `[mesh]` rules and the `[[rate_limits]]`
//! of the config file.
//!
//! **Rules** are tried in order on each call through `--mesh-listen`; the first that
//! matches the caller's identity (exact, or a prefix ending in `*`), the method, the
//! path (a prefix) and, for a call that carried a JWT (`--jwt-*`), its subject and
//! scopes, decides: allow or deny. Once any rule exists, a call no rule matches is
//! denied. `--mesh-allow A` is the short form of a last rule allowing the callers A.
//! In audit mode nothing is denied: what would have been is logged and counted. Each
//! denial is one log line naming the rule, and each rule counts what it denied.
//!
//! **Rate limits** are token buckets: per caller identity on `--mesh-listen`, per
//! client address on `--listen`, for every path or a path prefix. A call over the
//! limit gets 429 with `Retry-After`. (Envoy's local rate limit and Linkerd's
//! HTTPLocalRateLimitPolicy are the models.)

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;

/// The `[mesh]` table.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshPolicyConfig {
    /// Log and count what would be denied; deny nothing.
    #[serde(default)]
    pub audit: bool,
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// For logs and metrics (default `rule-N`, from 1).
    pub name: Option<String>,
    #[serde(default)]
    pub callers: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub subjects: Vec<String>,
    #[serde(default)]
    pub scopes: Vec<String>,
    pub action: Action,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

/// One `[[rate_limits]]` entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitConfig {
    /// For logs and metrics (default `limit-N`, from 1).
    pub name: Option<String>,
    /// `mesh`: a bucket per caller identity on `--mesh-listen`; `listen`: a bucket per
    /// client address on `--listen`.
    pub listener: Listener,
    /// Mesh only: the callers limited (exact, or a prefix ending in `*`); none: all.
    #[serde(default)]
    pub callers: Vec<String>,
    /// Path prefixes limited; none: every path.
    #[serde(default)]
    pub paths: Vec<String>,
    /// Requests a second, on average.
    pub rate: f64,
    /// How many may come at once (default: `rate`, at least 1).
    pub burst: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Listener {
    Mesh,
    Listen,
}

/// What a call is, as rules see it.
pub struct Call<'a> {
    pub caller: &'a str,
    /// `None` for a TCP tunnel, which only rules without methods and paths match.
    pub method: Option<&'a str>,
    pub path: Option<&'a str>,
    /// The JWT's subject and scopes, when the call carried one.
    pub subject: Option<&'a str>,
    pub scopes: &'a [String],
}

struct Rule {
    name: String,
    config: RuleConfig,
    denied: AtomicU64,
}

/// The rules of one mesh listener.
pub struct Rules {
    audit: bool,
    rules: Vec<Rule>,
    /// Calls no rule matched (denied by default).
    unmatched: AtomicU64,
}

/// A denial: the rule that decided (`None`: no rule matched) and why.
#[derive(Debug, PartialEq, Eq)]
pub struct Denial {
    pub rule: Option<String>,
    pub why: String,
    /// Audit mode: logged and counted, not denied.
    pub audited: bool,
}

/// A rule's or a limit's name, which labels a metric.
fn check_name(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b" _.:-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what}: name {name:?} must be 1 to 64 letters, digits, spaces or _ . : -"
        ))
    }
}

/// Whether `path` is under `prefix`: the same segments, not a longer word
/// (`/api` covers `/api` and `/api/x`, not `/apiary`).
fn under(path: &str, prefix: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with(['/', '?']),
        None => false,
    }
}

/// Whether `path` is written one way only, so that prefixes decide what it names: no
/// empty, `.` or `..` segment, no escaped `.`, `/` or `%`. A path that is not is
/// refused (400) where rules or limits look at paths, or `//admin`, `/./admin`,
/// `/public/../admin` or `/%61dmin`-like spellings would walk around them.
pub fn canonical(path: &str) -> bool {
    let path = path.split('?').next().unwrap_or(path);
    let escaped = path.as_bytes().windows(3).any(|w| {
        w[0] == b'%' && {
            let hex = [w[1].to_ascii_uppercase(), w[2].to_ascii_uppercase()];
            // Any escape of a character that needs none: letters, digits, . / % - _ ~
            let byte = u8::from_str_radix(std::str::from_utf8(&hex).unwrap_or("00"), 16);
            byte.is_ok_and(|b| b.is_ascii_alphanumeric() || b"./%-_~".contains(&b))
        }
    });
    if !path.starts_with('/') || escaped {
        return false;
    }
    let mut segments = path[1..].split('/').peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        if matches!(segment, "." | "..") || (segment.is_empty() && !last) {
            return false;
        }
    }
    true
}

fn matches(patterns: &[String], value: &str) -> bool {
    patterns.is_empty()
        || patterns.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => value.starts_with(prefix),
            None => p == value,
        })
}

impl std::fmt::Debug for Rules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.rules.iter().map(|r| r.name.as_str()).collect();
        f.debug_struct("Rules")
            .field("audit", &self.audit)
            .field("rules", &names)
            .finish()
    }
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.limits.iter().map(|l| l.name.as_str()).collect();
        f.debug_struct("Limits").field("limits", &names).finish()
    }
}

impl Rules {
    /// The rules of the file, then `--mesh-allow`'s.
    pub fn new(config: &MeshPolicyConfig, allow: &[String]) -> Result<Rules, String> {
        let mut rules = Vec::new();
        for (i, rule) in config.rules.iter().enumerate() {
            for m in &rule.methods {
                if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
                    return Err(format!(
                        "[[mesh.rules]] {}: method {m:?} is not an HTTP method in capitals (GET, POST...)",
                        i + 1
                    ));
                }
            }
            if let Some(p) = rule.paths.iter().find(|p| !p.starts_with('/')) {
                return Err(format!(
                    "[[mesh.rules]] {}: path {p:?} does not start with '/'",
                    i + 1
                ));
            }
            let name = rule
                .name
                .clone()
                .unwrap_or_else(|| format!("rule-{}", i + 1));
            check_name(&format!("[[mesh.rules]] {}", i + 1), &name)?;
            rules.push(Rule {
                name,
                config: rule.clone(),
                denied: AtomicU64::new(0),
            });
        }
        if !allow.is_empty() {
            rules.push(Rule {
                name: "mesh-allow".into(),
                config: RuleConfig {
                    name: None,
                    callers: allow.to_vec(),
                    methods: Vec::new(),
                    paths: Vec::new(),
                    subjects: Vec::new(),
                    scopes: Vec::new(),
                    action: Action::Allow,
                },
                denied: AtomicU64::new(0),
            });
        }
        Ok(Rules {
            audit: config.audit,
            rules,
            unmatched: AtomicU64::new(0),
        })
    }

    /// Whether there is no rule: every call passes.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether `call` may go to the app; a denial says which rule decided.
    pub fn decide(&self, call: &Call<'_>) -> Result<(), Denial> {
        if self.rules.is_empty() {
            return Ok(());
        }
        let found = self.rules.iter().find(|r| {
            let c = &r.config;
            matches(&c.callers, call.caller)
                && (c.methods.is_empty()
                    || call
                        .method
                        .is_some_and(|m| c.methods.iter().any(|x| x == m)))
                && (c.paths.is_empty()
                    || call
                        .path
                        .is_some_and(|p| c.paths.iter().any(|x| under(p, x))))
                && (c.subjects.is_empty() || call.subject.is_some_and(|s| matches(&c.subjects, s)))
                && c.scopes.iter().all(|s| call.scopes.contains(s))
        });
        let (rule, why) = match found {
            Some(r) if r.config.action == Action::Allow => return Ok(()),
            Some(r) => {
                r.denied.fetch_add(1, Ordering::Relaxed);
                (Some(r.name.clone()), format!("rule {:?} denies it", r.name))
            }
            None => (
                None,
                format!(
                    "no rule allows it (rules: {})",
                    self.rules
                        .iter()
                        .map(|r| r.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
        };
        if rule.is_none() {
            self.unmatched.fetch_add(1, Ordering::Relaxed);
        }
        Err(Denial {
            rule,
            why,
            audited: self.audit,
        })
    }
}

/// A token bucket.
struct Bucket {
    tokens: f64,
    at: Instant,
}

struct Limit {
    name: String,
    config: LimitConfig,
    burst: f64,
    buckets: Mutex<Buckets>,
    limited: AtomicU64,
}

/// The rate limits of one listener.
pub struct Limits {
    limits: Vec<Limit>,
}

/// The buckets of one limit, by key.
#[derive(Default)]
struct Buckets {
    by_key: HashMap<String, Bucket>,
    /// When the full buckets were last forgotten.
    swept: Option<Instant>,
}

/// How many keys a limit tracks before it forgets the full buckets. Past it (a flood
/// of distinct clients), a new key is refused until a sweep makes room; sweeps run at
/// most once a second, so the flood cannot make every call scan the map.
const MAX_KEYS: usize = 100_000;

impl Limits {
    /// The `[[rate_limits]]` of `listener`.
    pub fn new(configs: &[LimitConfig], listener: Listener) -> Result<Limits, String> {
        let mut limits = Vec::new();
        for (i, c) in configs.iter().enumerate() {
            let at = || format!("[[rate_limits]] {}", i + 1);
            if !(c.rate.is_finite() && c.rate > 0.0) {
                return Err(format!(
                    "{}: rate {} must be a number of requests a second above 0",
                    at(),
                    c.rate
                ));
            }
            if c.burst.is_some_and(|b| !(b.is_finite() && b > 0.0)) {
                return Err(format!("{}: burst must be a number above 0", at()));
            }
            let burst = c.burst.unwrap_or(c.rate).max(1.0);
            if c.listener == Listener::Listen && !c.callers.is_empty() {
                return Err(format!(
                    "{}: callers are mesh identities; a limit on `listen` is per client address",
                    at()
                ));
            }
            if let Some(p) = c.paths.iter().find(|p| !p.starts_with('/')) {
                return Err(format!("{}: path {p:?} does not start with '/'", at()));
            }
            let name = c.name.clone().unwrap_or_else(|| format!("limit-{}", i + 1));
            check_name(&at(), &name)?;
            if c.listener != listener {
                continue;
            }
            limits.push(Limit {
                name,
                config: c.clone(),
                burst,
                buckets: Mutex::new(Buckets::default()),
                limited: AtomicU64::new(0),
            });
        }
        Ok(Limits { limits })
    }

    pub fn is_empty(&self) -> bool {
        self.limits.is_empty()
    }

    /// Takes a token for `key` (a caller, or a client address) calling `path`; when
    /// a limit has none left: its name and how long until it has one.
    pub fn take(&self, key: &str, path: &str) -> Result<(), (String, Duration)> {
        self.take_at(key, path, Instant::now())
    }

    fn take_at(&self, key: &str, path: &str, now: Instant) -> Result<(), (String, Duration)> {
        for limit in &self.limits {
            let c = &limit.config;
            if !matches(&c.callers, key)
                || !(c.paths.is_empty() || c.paths.iter().any(|p| under(path, p)))
            {
                continue;
            }
            let mut guard = limit.buckets.lock().unwrap_or_else(|e| e.into_inner());
            let buckets = &mut *guard;
            if !buckets.by_key.contains_key(key) {
                if buckets.by_key.len() >= MAX_KEYS {
                    let due = buckets
                        .swept
                        .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1));
                    if due {
                        // Forget the buckets that are full again: nothing to remember.
                        let (rate, burst) = (c.rate, limit.burst);
                        buckets.swept = Some(now);
                        buckets.by_key.retain(|_, b| {
                            b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst
                        });
                    }
                    if buckets.by_key.len() >= MAX_KEYS {
                        limit.limited.fetch_add(1, Ordering::Relaxed);
                        return Err((limit.name.clone(), Duration::from_secs(1)));
                    }
                }
                buckets.by_key.insert(
                    key.to_string(),
                    Bucket {
                        tokens: limit.burst,
                        at: now,
                    },
                );
            }
            let bucket = buckets.by_key.get_mut(key).expect("inserted above");
            let refill = now.duration_since(bucket.at).as_secs_f64() * c.rate;
            bucket.tokens = (bucket.tokens + refill).min(limit.burst);
            bucket.at = now;
            if bucket.tokens >= 1.0 {
                bucket.tokens -= 1.0;
                continue;
            }
            limit.limited.fetch_add(1, Ordering::Relaxed);
            let wait = Duration::from_secs_f64((1.0 - bucket.tokens) / c.rate);
            return Err((limit.name.clone(), wait));
        }
        Ok(())
    }

    /// `(name, calls limited)` per limit, for `/metrics`.
    pub fn counts(&self) -> Vec<(String, u64)> {
        self.limits
            .iter()
            .map(|l| (l.name.clone(), l.limited.load(Ordering::Relaxed)))
            .collect()
    }
}

impl Rules {
    /// `(name, calls denied or, in audit mode, that would have been)` per rule, and
    /// the calls no rule matched as `default`, for `/metrics`.
    pub fn counts(&self) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = self
            .rules
            .iter()
            .map(|r| (r.name.clone(), r.denied.load(Ordering::Relaxed)))
            .collect();
        out.push(("default".into(), self.unmatched.load(Ordering::Relaxed)));
        out
    }

    pub fn audit(&self) -> bool {
        self.audit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call<'a>(caller: &'a str, method: &'a str, path: &'a str) -> Call<'a> {
        Call {
            caller,
            method: Some(method),
            path: Some(path),
            subject: None,
            scopes: &[],
        }
    }

    fn rules(toml_text: &str, allow: &[&str]) -> Rules {
        #[derive(Deserialize)]
        struct File {
            mesh: MeshPolicyConfig,
        }
        let file: File = toml::from_str(toml_text).unwrap();
        let allow: Vec<String> = allow.iter().map(|s| s.to_string()).collect();
        Rules::new(&file.mesh, &allow).unwrap()
    }

    #[test]
    fn the_first_matching_rule_decides_and_nothing_else_passes() {
        let r = rules(
            r#"
            [mesh]
            [[mesh.rules]]
            name = "no admin"
            paths = ["/admin/"]
            action = "deny"
            [[mesh.rules]]
            callers = ["front", "web-*"]
            methods = ["GET"]
            paths = ["/items/"]
            action = "allow"
            "#,
            &["billing"],
        );
        assert!(r.decide(&call("front", "GET", "/items/1")).is_ok());
        assert!(r.decide(&call("web-eu", "GET", "/items/1")).is_ok());
        assert!(
            r.decide(&call("billing", "POST", "/anything")).is_ok(),
            "--mesh-allow's rule"
        );
        let admin = r.decide(&call("front", "GET", "/admin/x")).unwrap_err();
        assert_eq!(admin.rule.as_deref(), Some("no admin"));
        let post = r.decide(&call("front", "POST", "/items/1")).unwrap_err();
        assert_eq!(post.rule, None);
        assert!(
            post.why
                .contains("no rule allows it (rules: no admin, rule-2, mesh-allow)"),
            "{}",
            post.why
        );
        assert!(
            r.decide(&call("webster", "GET", "/items/1")).is_err(),
            "web-* is a prefix, webster is not web-"
        );
        assert_eq!(
            r.counts(),
            [
                ("no admin".to_string(), 1),
                ("rule-2".into(), 0),
                ("mesh-allow".into(), 0),
                ("default".into(), 2)
            ]
        );
        // No rules at all: everything passes.
        assert!(rules("[mesh]", &[])
            .decide(&call("x", "DELETE", "/"))
            .is_ok());
    }

    #[test]
    fn a_path_written_two_ways_is_not_canonical_and_prefixes_stop_at_segments() {
        for ok in [
            "/",
            "/admin",
            "/admin/",
            "/a/b?x=1",
            "/a%20b",
            "/a/b/../"[..5].as_ref(),
        ] {
            assert!(canonical(ok), "{ok}");
        }
        for not in [
            "//admin",
            "/./admin",
            "/public/../admin",
            "/admin/.",
            "/%61dmin",
            "/a%2Fb",
            "/a%2e%2e/b",
            "/a%25",
            "admin",
            "/a//b",
        ] {
            assert!(!canonical(not), "{not}");
        }
        assert!(under("/api", "/api") && under("/api/x", "/api") && under("/api?x", "/api"));
        assert!(!under("/apiary", "/api"));
        assert!(under("/api/x", "/api/") && !under("/api", "/api/"));
    }

    #[test]
    fn jwt_subjects_and_scopes_and_tunnels() {
        let r = rules(
            r#"
            [mesh]
            [[mesh.rules]]
            subjects = ["user:*"]
            scopes = ["orders:write"]
            methods = ["POST"]
            action = "allow"
            [[mesh.rules]]
            callers = ["batch"]
            action = "allow"
            "#,
            &[],
        );
        let scopes = vec!["orders:read".to_string(), "orders:write".to_string()];
        let with = |subject, scopes: &'static [String]| Call {
            caller: "edge",
            method: Some("POST"),
            path: Some("/orders"),
            subject,
            scopes,
        };
        let scopes: &'static [String] = Box::leak(scopes.into_boxed_slice());
        assert!(r.decide(&with(Some("user:7"), scopes)).is_ok());
        assert!(r.decide(&with(Some("svc:7"), scopes)).is_err());
        assert!(r.decide(&with(None, scopes)).is_err());
        assert!(r.decide(&with(Some("user:7"), &scopes[..1])).is_err());
        // A tunnel has no method or path: only rules without them match it.
        let tunnel = |caller| Call {
            caller,
            method: None,
            path: None,
            subject: None,
            scopes: &[],
        };
        assert!(r.decide(&tunnel("batch")).is_ok());
        assert!(r.decide(&tunnel("edge")).is_err());
    }

    #[test]
    fn audit_mode_reports_what_it_would_deny() {
        let r = rules(
            "[mesh]\naudit = true\n[[mesh.rules]]\ncallers = [\"front\"]\naction = \"allow\"\n",
            &[],
        );
        let d = r.decide(&call("reports", "GET", "/")).unwrap_err();
        assert!(d.audited);
    }

    #[test]
    fn bad_rules_are_refused_naming_them() {
        #[derive(Deserialize)]
        struct File {
            #[allow(dead_code)]
            mesh: MeshPolicyConfig,
        }
        for (text, why) in [
            (
                "[mesh]\n[[mesh.rules]]\nmethods = [\"get\"]\naction = \"allow\"",
                "not an HTTP method in capitals",
            ),
            (
                "[mesh]\n[[mesh.rules]]\npaths = [\"items\"]\naction = \"allow\"",
                "does not start with '/'",
            ),
        ] {
            let file: MeshPolicyConfig = toml::from_str::<toml::Table>(text)
                .map(|t| t["mesh"].clone().try_into().unwrap())
                .unwrap();
            let err = Rules::new(&file, &[]).err().unwrap();
            assert!(err.contains(why), "{err}");
        }
        for text in [
            "[mesh]\n[[mesh.rules]]\naction = \"maybe\"",
            "[mesh]\n[[mesh.rules]]\ncaller = [\"x\"]\naction = \"allow\"",
            "[mesh]\nmode = \"audit\"",
        ] {
            assert!(toml::from_str::<File>(text).is_err(), "{text}");
        }
    }

    #[test]
    fn a_bucket_lets_the_burst_through_then_the_rate() {
        let config = LimitConfig {
            name: None,
            listener: Listener::Mesh,
            callers: vec!["front".into()],
            paths: vec!["/items/".into()],
            rate: 2.0,
            burst: Some(3.0),
        };
        let limits = Limits::new(&[config], Listener::Mesh).unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limits.take_at("front", "/items/1", t0).is_ok());
        }
        let (name, wait) = limits.take_at("front", "/items/1", t0).unwrap_err();
        assert_eq!(name, "limit-1");
        assert_eq!(wait, Duration::from_millis(500));
        // Other callers and other paths have their own buckets, or none.
        assert!(limits.take_at("reports", "/items/1", t0).is_ok());
        assert!(limits.take_at("front", "/other", t0).is_ok());
        // Half a second later, one more.
        let later = t0 + Duration::from_millis(500);
        assert!(limits.take_at("front", "/items/1", later).is_ok());
        assert!(limits.take_at("front", "/items/1", later).is_err());
        assert_eq!(limits.counts(), [("limit-1".to_string(), 2)]);
    }

    #[test]
    fn a_flood_of_distinct_keys_is_bounded_and_does_not_scan_on_every_call() {
        let config = LimitConfig {
            name: None,
            listener: Listener::Listen,
            callers: Vec::new(),
            paths: Vec::new(),
            rate: 1.0,
            burst: Some(2.0),
        };
        let limits = Limits::new(&[config], Listener::Listen).unwrap();
        let t0 = Instant::now();
        for i in 0..MAX_KEYS {
            // Each key spends a token: its bucket is not full, so it is remembered.
            assert!(limits.take_at(&format!("k{i}"), "/", t0).is_ok());
        }
        // The map is full of buckets still refilling: a new key is refused...
        assert!(limits.take_at("newcomer", "/", t0).is_err());
        // ...while a known one is served, and once they have refilled, a sweep makes
        // room.
        assert!(limits.take_at("k1", "/", t0).is_ok());
        assert!(limits
            .take_at("newcomer", "/", t0 + Duration::from_secs(3))
            .is_ok());
    }

    #[test]
    fn limits_that_cannot_work_are_refused() {
        let base = LimitConfig {
            name: None,
            listener: Listener::Listen,
            callers: Vec::new(),
            paths: Vec::new(),
            rate: 1.0,
            burst: None,
        };
        for (bad, why) in [
            (
                LimitConfig {
                    rate: 0.0,
                    ..base.clone()
                },
                "above 0",
            ),
            (
                LimitConfig {
                    rate: f64::NAN,
                    ..base.clone()
                },
                "above 0",
            ),
            (
                LimitConfig {
                    callers: vec!["x".into()],
                    ..base.clone()
                },
                "per client address",
            ),
            (
                LimitConfig {
                    paths: vec!["x".into()],
                    ..base.clone()
                },
                "does not start with '/'",
            ),
        ] {
            let err = Limits::new(&[bad], Listener::Listen).err().unwrap();
            assert!(err.contains(why), "{err}");
        }
    }
}
