//! The header scheme between pillion and the app (bailiff's, prefix configurable):
//!
//! - to the app: every incoming `X-Session-*` header is removed (a client cannot
//!   forge session data), in any spelling a server could read as one (`_` for `-`,
//!   as CGI-style servers fold them), then `X-Session-<Key>: value` is added per
//!   stored value;
//! - from the app: `X-Session-Set-<Key>: v` sets a key (several headers: several
//!   values), `X-Session-Del-<Key>` deletes one, `X-Session-Destroy` ends the session,
//!   `X-Session-Rotate` gives it a new id; every `X-Session-*` header is removed before
//!   the response reaches the client.
//!
//! Keys are header names, so they are lower case (HTTP/2 lowers them anyway).

use http::header::{HeaderMap, HeaderName, HeaderValue};

use crate::{Change, SessionData};

/// What the app's response asked for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Controls {
    pub change: Change,
    pub destroy: bool,
    pub rotate: bool,
}

impl Controls {
    pub fn any(&self) -> bool {
        self.destroy || self.rotate || !self.change.is_empty()
    }
}

/// A change the app asked for that pillion refuses to store.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("session change refused: {0}")]
pub struct Refused(pub String);

/// Limits on what a session may hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_value: usize,
    pub max_size: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_value: 4 << 10,
            max_size: 64 << 10,
        }
    }
}

/// The header names, made once from the prefix.
#[derive(Debug, Clone)]
pub struct Scheme {
    prefix: String,
    set: String,
    del: String,
    destroy: String,
    rotate: String,
    error: HeaderName,
}

const MAX_KEY: usize = 128;

impl Scheme {
    /// `prefix` like `X-Session-`: a header-name token ending with `-`.
    pub fn new(prefix: &str) -> Result<Scheme, String> {
        let p = prefix.to_ascii_lowercase();
        if !p.ends_with('-') || HeaderName::from_bytes(p.as_bytes()).is_err() {
            return Err(format!(
                "session header prefix {prefix:?} must be a header name ending with '-', like X-Session-"
            ));
        }
        Ok(Scheme {
            set: format!("{p}set-"),
            del: format!("{p}del-"),
            destroy: format!("{p}destroy"),
            rotate: format!("{p}rotate"),
            error: HeaderName::from_bytes(format!("{p}error").as_bytes())
                .map_err(|e| e.to_string())?,
            prefix: p,
        })
    }

    /// `X-Session-Error`, added to requests reaching the app without their session.
    pub fn error_header(&self) -> &HeaderName {
        &self.error
    }

    /// Whether `name` (lower case, as a `HeaderName` is) belongs to the scheme in any
    /// spelling: servers that fold `_` into `-` read `X_Session_User_Id` as
    /// `X-Session-User-Id`.
    pub fn claims(&self, name: &str) -> bool {
        let fold = |b: u8| if b == b'_' { b'-' } else { b };
        name.len() >= self.prefix.len()
            && name
                .bytes()
                .zip(self.prefix.bytes())
                .all(|(n, p)| fold(n) == fold(p))
    }

    /// Removes every header of the scheme, in any spelling.
    pub fn strip(&self, headers: &mut HeaderMap) {
        // Most messages carry none: look before collecting.
        if !headers.keys().any(|k| self.claims(k.as_str())) {
            return;
        }
        let doomed: Vec<HeaderName> = headers
            .keys()
            .filter(|k| self.claims(k.as_str()))
            .cloned()
            .collect();
        for name in doomed {
            headers.remove(name);
        }
    }

    /// Adds `X-Session-<Key>` headers for the session's data.
    pub fn inject(&self, headers: &mut HeaderMap, data: &SessionData) {
        for (key, values) in data {
            let Ok(name) = HeaderName::from_bytes(format!("{}{key}", self.prefix).as_bytes())
            else {
                continue;
            };
            for v in values {
                if let Ok(v) = HeaderValue::from_str(v) {
                    headers.append(name.clone(), v);
                }
            }
        }
    }

    /// Reads the app's control headers (the caller strips them afterwards).
    pub fn controls(&self, headers: &HeaderMap) -> Result<Controls, Refused> {
        let mut c = Controls::default();
        for name in headers.keys() {
            let n = name.as_str();
            if !n.starts_with(&self.prefix) {
                continue;
            }
            if n == self.destroy {
                c.destroy = true;
            } else if n == self.rotate {
                c.rotate = true;
            } else if let Some(key) = n.strip_prefix(&self.set) {
                self.check_key(key)?;
                let values = headers
                    .get_all(name)
                    .iter()
                    .map(|v| {
                        v.to_str()
                            .map(str::to_string)
                            .map_err(|_| Refused(format!("the value of key {key:?} is not text")))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                c.change.set.push((key.to_string(), values));
            } else if let Some(key) = n.strip_prefix(&self.del) {
                self.check_key(key)?;
                c.change.del.push(key.to_string());
            }
        }
        Ok(c)
    }

    fn check_key(&self, key: &str) -> Result<(), Refused> {
        if key.is_empty() || key.len() > MAX_KEY {
            return Err(Refused(format!(
                "a session key must have 1 to {MAX_KEY} characters, got {key:?}"
            )));
        }
        if key.starts_with("set-")
            || key.starts_with("del-")
            || ["destroy", "rotate", "error"].contains(&key)
        {
            return Err(Refused(format!(
                "{key:?} is reserved and cannot be a session key"
            )));
        }
        Ok(())
    }
}

/// Checks the session as it would be after the change against the limits.
pub fn check_limits(
    after: &SessionData,
    change: &crate::Change,
    limits: Limits,
) -> Result<(), Refused> {
    for (key, values) in &change.set {
        for v in values {
            if v.len() > limits.max_value {
                return Err(Refused(format!(
                    "the value of key {key:?} is {} bytes; the limit is {} (--session-max-value-size)",
                    v.len(),
                    limits.max_value
                )));
            }
        }
    }
    let size: usize = after
        .iter()
        .map(|(k, vs)| k.len() + vs.iter().map(|v| v.len() + 1).sum::<usize>())
        .sum();
    if size > limits.max_size {
        return Err(Refused(format!(
            "the session would hold {size} bytes; the limit is {} (--session-max-size)",
            limits.max_size
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn strips_and_injects() {
        let s = Scheme::new("X-Session-").unwrap();
        let mut h = map(&[
            ("x-session-user-id", "spoofed"),
            ("X-Session-Anything", "x"),
            ("X_Session_User_Id", "spoofed"),
            ("X-Session_Role", "root"),
            ("x_session-foo", "1"),
            ("x-session", "not the prefix"),
            ("x-sessions-id", "not the prefix"),
            ("accept", "*/*"),
        ]);
        s.strip(&mut h);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["accept", "x-session", "x-sessions-id"]);
        h.remove("x-session");
        h.remove("x-sessions-id");
        let mut data = SessionData::new();
        data.insert("user-id".into(), vec!["42".into()]);
        data.insert("role".into(), vec!["a".into(), "b".into()]);
        s.inject(&mut h, &data);
        assert_eq!(h["x-session-user-id"], "42");
        let roles: Vec<_> = h.get_all("x-session-role").iter().collect();
        assert_eq!(roles, ["a", "b"]);
    }

    #[test]
    fn reads_controls() {
        let s = Scheme::new("X-Session-").unwrap();
        let h = map(&[
            ("X-Session-Set-User-Id", "42"),
            ("X-Session-Set-Role", "a"),
            ("X-Session-Set-Role", "b"),
            ("X-Session-Del-Cart", "1"),
            ("X-Session-Rotate", "1"),
        ]);
        let c = s.controls(&h).unwrap();
        assert!(c.rotate && !c.destroy);
        assert!(c
            .change
            .set
            .contains(&("user-id".into(), vec!["42".into()])));
        assert!(c
            .change
            .set
            .contains(&("role".into(), vec!["a".into(), "b".into()])));
        assert_eq!(c.change.del, ["cart"]);
        assert!(
            s.controls(&map(&[("X-Session-Destroy", "")]))
                .unwrap()
                .destroy
        );
        assert!(s.controls(&map(&[("X-Session-Set-Set-X", "1")])).is_err());
        assert!(Scheme::new("X Session").is_err() && Scheme::new("X-Session").is_err());
    }

    #[test]
    fn limits_refuse_big_values_and_big_sessions() {
        let limits = Limits {
            max_value: 4,
            max_size: 10,
        };
        let change = Change {
            set: vec![("k".into(), vec!["12345".into()])],
            del: vec![],
        };
        let after = change.apply(&SessionData::new());
        assert!(check_limits(&after, &change, limits)
            .unwrap_err()
            .0
            .contains("5 bytes"));
        let change = Change {
            set: vec![
                ("key".into(), vec!["1234".into()]),
                ("k2".into(), vec!["1234".into()]),
            ],
            del: vec![],
        };
        let after = change.apply(&SessionData::new());
        assert!(check_limits(&after, &change, limits)
            .unwrap_err()
            .0
            .contains("would hold"));
    }
}
