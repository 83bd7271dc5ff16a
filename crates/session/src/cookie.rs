//! The session cookie: found in the request's `Cookie` headers (and removed from them,
//! so the app never sees the id), and written back with `Set-Cookie`.

use std::time::Duration;

use http::header::{HeaderMap, HeaderValue, COOKIE};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SameSite {
    Strict,
    Lax,
    None,
}

impl std::str::FromStr for SameSite {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "strict" => Ok(SameSite::Strict),
            "lax" => Ok(SameSite::Lax),
            "none" => Ok(SameSite::None),
            _ => Err(format!("unknown SameSite {s:?}: use strict, lax or none")),
        }
    }
}

/// How the cookie is written.
#[derive(Debug, Clone)]
pub struct CookieConfig {
    pub name: String,
    pub path: String,
    pub domain: Option<String>,
    pub secure: bool,
    pub http_only: bool,
    pub same_site: Option<SameSite>,
    pub max_age: Duration,
}

impl Default for CookieConfig {
    fn default() -> Self {
        CookieConfig {
            name: "session".into(),
            path: "/".into(),
            domain: None,
            secure: false,
            http_only: true,
            same_site: Some(SameSite::Lax),
            max_age: Duration::from_secs(3600),
        }
    }
}

/// Whether `name` can be a cookie name (an HTTP token).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Takes the value of cookie `name` out of the request's `Cookie` headers, keeping
/// every other cookie. The first one wins when the client sent it twice.
pub fn take(headers: &mut HeaderMap, name: &str) -> Option<String> {
    if !headers.contains_key(COOKIE) {
        return None;
    }
    let mut found = None;
    let mut kept = Vec::new();
    for value in headers.get_all(COOKIE) {
        let Ok(text) = value.to_str() else {
            kept.push(value.clone());
            continue;
        };
        let mut others = Vec::new();
        for pair in text.split(';') {
            match pair.trim().split_once('=') {
                Some((k, v)) if k.trim() == name => {
                    if found.is_none() {
                        found = Some(v.trim().trim_matches('"').to_string());
                    }
                }
                _ if pair.trim().is_empty() => {}
                _ => others.push(pair.trim()),
            }
        }
        if !others.is_empty() {
            if let Ok(v) = HeaderValue::from_str(&others.join("; ")) {
                kept.push(v);
            }
        }
    }
    headers.remove(COOKIE);
    for v in kept {
        headers.append(COOKIE, v);
    }
    found
}

impl CookieConfig {
    /// `Set-Cookie` giving the client session `id`.
    pub fn set(&self, id: &str) -> HeaderValue {
        self.render(id, self.max_age.as_secs())
    }

    /// `Set-Cookie` that makes the client forget the session.
    pub fn clear(&self) -> HeaderValue {
        self.render("", 0)
    }

    fn render(&self, value: &str, max_age: u64) -> HeaderValue {
        let mut s = format!(
            "{}={value}; Path={}; Max-Age={max_age}",
            self.name, self.path
        );
        if let Some(domain) = &self.domain {
            s.push_str("; Domain=");
            s.push_str(domain);
        }
        if self.secure {
            s.push_str("; Secure");
        }
        if self.http_only {
            s.push_str("; HttpOnly");
        }
        match self.same_site {
            Some(SameSite::Strict) => s.push_str("; SameSite=Strict"),
            Some(SameSite::Lax) => s.push_str("; SameSite=Lax"),
            Some(SameSite::None) => s.push_str("; SameSite=None"),
            None => {}
        }
        HeaderValue::from_str(&s).unwrap_or_else(|_| HeaderValue::from_static("invalid=1"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_our_cookie_and_keeps_the_others() {
        let mut h = HeaderMap::new();
        h.append(
            COOKIE,
            HeaderValue::from_static("theme=dark; session=abc; lang=en"),
        );
        h.append(COOKIE, HeaderValue::from_static("session=second"));
        assert_eq!(take(&mut h, "session").as_deref(), Some("abc"));
        let rest: Vec<_> = h
            .get_all(COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(rest, ["theme=dark; lang=en"]);
        assert_eq!(take(&mut h, "session"), None);
    }

    #[test]
    fn set_cookie_carries_every_attribute() {
        let cfg = CookieConfig {
            domain: Some("example.com".into()),
            secure: true,
            same_site: Some(SameSite::Strict),
            ..CookieConfig::default()
        };
        assert_eq!(
            cfg.set("ID"),
            "session=ID; Path=/; Max-Age=3600; Domain=example.com; Secure; HttpOnly; SameSite=Strict"
        );
        assert!(cfg
            .clear()
            .to_str()
            .unwrap()
            .starts_with("session=; Path=/; Max-Age=0"));
        assert!(valid_name("sid") && !valid_name("a b") && !valid_name(""));
    }
}
