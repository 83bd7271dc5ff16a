//! The API's own door (`--address`): what a request must show before the API or a
//! call by name serves it.
//!
//! A web page a developer opens can send requests to 127.0.0.1:8081 too, so even on
//! loopback the API refuses what only a browser on a foreign page sends:
//! - a `Host` that is not the API's address or a loopback name: 421 (a DNS
//!   rebinding page reaches 127.0.0.1 under its own name). With `--api-token` the
//!   token is the proof and any name is accepted;
//! - an `Origin` that is not the API's own: 403 (a cross-site request);
//! - a JSON route (`/registry`, `/rpc`) written with another content type: 415 (a
//!   `text/plain` POST needs no CORS preflight; `application/json` does);
//! - with `--api-token`, a request without `Pillion-Api-Token: <token>` (or, on the API's own routes, the deprecated `Authorization: Bearer <token>`): 401.
//!
//! `/healthz` is open to all, so probes need no secret. The dashboard's page (not its
//! data) needs no token, so that a browser can load it and then send the token it
//! asks for (see [`crate::dashboard`]).

use std::net::{IpAddr, SocketAddr};

use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use pillion_core::error::ApiError;

/// The `id` of the door's errors; `pillion call` and friends know a refused token by it.
pub const ID: &str = "pillion.api";

/// The DNS names the API's certificate is for, read when a request names a host that
/// is not an IP (the certificate may be renewed for other names).
pub type Names = std::sync::Arc<dyn Fn() -> Vec<String> + Send + Sync>;

#[derive(Clone)]
pub struct Door {
    token: Option<String>,
    listen: SocketAddr,
    names: Option<Names>,
}

impl Door {
    pub fn new(token: Option<String>, listen: SocketAddr) -> Door {
        Door {
            token,
            listen,
            names: None,
        }
    }

    /// Over HTTPS, the names of the API's certificate are its own too (a client
    /// reaches it by the name the certificate is for).
    pub fn with_names(self, names: Names) -> Door {
        Door {
            names: Some(names),
            ..self
        }
    }

    /// The error response that refuses the request, or `None` to serve it. `call`: a
    /// call to a service by name (not one of the API's own routes).
    pub fn refusal<B>(&self, req: &Request<B>, call: bool) -> Option<Response<String>> {
        let path = req.uri().path();
        if path == "/healthz" {
            return None;
        }
        let refuse = |status: StatusCode, detail: String| {
            Some(ApiError::new(ID, status, detail).into_response())
        };
        let headers = req.headers();
        if self.token.is_none() {
            if let Some(host) = host_of(req) {
                if !self.is_own_host(host) {
                    return refuse(
                        StatusCode::MISDIRECTED_REQUEST,
                        format!(
                            "Host {host:?} is not this sidecar's API address ({}) nor a \
                             loopback name; give --api-token to reach the API under other names",
                            self.listen
                        ),
                    );
                }
            }
        }
        if let Some(origin) = headers.get(header::ORIGIN) {
            let origin = origin.to_str().unwrap_or("");
            if !self.is_own_origin(origin) {
                return refuse(
                    StatusCode::FORBIDDEN,
                    format!(
                        "requests from web pages of other origins ({origin:?}) are refused: \
                         call the API from the app, not from a browser"
                    ),
                );
            }
        }
        if let Some(token) = &self.token {
            let shown = token_matches(headers, token) || (!call && bearer_matches(headers, token));
            if !shown && !crate::dashboard::is_page(path) {
                let mut res = ApiError::new(
                    ID,
                    StatusCode::UNAUTHORIZED,
                    if call {
                        "missing or wrong API token: send Pillion-Api-Token: <the --api-token> \
                         (a call by name keeps Authorization for the service called)"
                    } else {
                        "missing or wrong API token: send Pillion-Api-Token: <the --api-token>"
                    },
                )
                .into_response();
                res.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer"),
                );
                return Some(res);
            }
        }
        if writes(req.method()) {
            let form_ok = path == "/rpc";
            if (path == "/registry" || path == "/rpc") && !json_or_form(headers, form_ok) {
                let given = headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("none");
                let wanted = if form_ok {
                    "application/json or application/x-www-form-urlencoded"
                } else {
                    "application/json"
                };
                return refuse(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    format!("{path} takes Content-Type: {wanted}, not {given:?}"),
                );
            }
        }
        None
    }

    /// Takes what the door consumed off an admitted request: the token, which no
    /// service called and no subscriber of a published message may see. A caller's
    /// own `Authorization` travels on calls by name untouched; on the API's routes, an
    /// `Authorization: Bearer` that is the token (the old way) is taken too.
    pub fn admit<B>(&self, req: &mut Request<B>, call: bool) {
        let Some(token) = &self.token else {
            return;
        };
        let headers = req.headers_mut();
        headers.remove(TOKEN_HEADER);
        if !call && bearer_matches(headers, token) {
            headers.remove(header::AUTHORIZATION);
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!("a client sent the API token as Authorization: Bearer, which is deprecated (and refused on calls by name): send Pillion-Api-Token: <token>");
            });
        }
    }

    fn is_own_host(&self, host: &str) -> bool {
        let name = strip_port(host);
        if name.eq_ignore_ascii_case("localhost") {
            return true;
        }
        match name
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            Ok(ip) => ip.is_loopback() || ip == self.listen.ip(),
            Err(_) => self
                .names
                .as_ref()
                .is_some_and(|names| names().iter().any(|n| n.eq_ignore_ascii_case(name))),
        }
    }

    fn is_own_origin(&self, origin: &str) -> bool {
        let (rest, default_port) = if let Some(rest) = origin.strip_prefix("http://") {
            (rest, 80)
        } else if let Some(rest) = origin.strip_prefix("https://") {
            (rest, 443)
        } else {
            return false; // "null", file://, extensions
        };
        let port_ok = match rest.rsplit_once(':') {
            Some((_, port)) if !rest.ends_with(']') => port.parse() == Ok(self.listen.port()),
            _ => self.listen.port() == default_port,
        };
        port_ok && self.is_own_host(rest)
    }
}

/// The request's host: the `Host` header, or the authority of an absolute URI (h2).
/// Borrowed: this runs on every call.
fn host_of<B>(req: &Request<B>) -> Option<&str> {
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host
            .split_once(']')
            .map_or(host, |(h, _)| h)
            .trim_start_matches('[');
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

fn writes(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

fn json_or_form(headers: &HeaderMap, form_ok: bool) -> bool {
    let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = ct.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
        || (form_ok && essence.eq_ignore_ascii_case("application/x-www-form-urlencoded"))
}

/// The header the API token travels in (Dapr's `dapr-api-token` is the same idea),
/// leaving `Authorization` to the app.
pub const TOKEN_HEADER: &str = "pillion-api-token";

/// `Pillion-Api-Token: TOKEN`.
fn token_matches(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get(TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|given| same(given.trim(), token))
}

/// `Authorization: Bearer TOKEN` (the old way, on the API's own routes only).
fn bearer_matches(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .is_some_and(|given| same(given.trim(), token))
}

/// Compares in constant time (a timing difference must not reveal how much of a
/// guess was right).
fn same(given: &str, token: &str) -> bool {
    let (a, b) = (given.as_bytes(), token.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: Method, path: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().method(method).uri(path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    fn status(door: &Door, r: Request<()>) -> u16 {
        let call = !crate::api::is_api(r.uri().path());
        door.refusal(&r, call)
            .map_or(200, |res| res.status().as_u16())
    }

    const JSON: (&str, &str) = ("content-type", "application/json");

    #[test]
    fn a_browser_on_a_foreign_page_is_refused_and_the_app_is_not() {
        let door = Door::new(None, "127.0.0.1:8081".parse().unwrap());
        let host = ("host", "127.0.0.1:8081");
        assert_eq!(
            status(&door, req(Method::POST, "/registry", &[host, JSON])),
            200
        );
        assert_eq!(
            status(
                &door,
                req(
                    Method::GET,
                    "/greeter/Say.Hello",
                    &[("host", "localhost:8081")]
                )
            ),
            200
        );
        // DNS rebinding: the attacker's name resolving to 127.0.0.1.
        assert_eq!(
            status(
                &door,
                req(Method::GET, "/registry", &[("host", "evil.example:8081")])
            ),
            421
        );
        // A cross-site POST, with or without a simple content type.
        let evil = ("origin", "https://evil.example");
        assert_eq!(
            status(&door, req(Method::POST, "/registry", &[host, evil, JSON])),
            403
        );
        assert_eq!(
            status(
                &door,
                req(Method::POST, "/registry", &[host, ("origin", "null")])
            ),
            403
        );
        assert_eq!(
            status(
                &door,
                req(
                    Method::POST,
                    "/registry",
                    &[host, ("origin", "http://127.0.0.1:8081"), JSON]
                )
            ),
            200
        );
        assert_eq!(
            status(
                &door,
                req(
                    Method::POST,
                    "/registry",
                    &[host, ("origin", "http://127.0.0.1:9999"), JSON]
                )
            ),
            403,
            "another port is another origin"
        );
        assert_eq!(
            status(
                &door,
                req(
                    Method::POST,
                    "/registry",
                    &[host, ("content-type", "text/plain")]
                )
            ),
            415
        );
        assert_eq!(
            status(&door, req(Method::DELETE, "/registry", &[host])),
            415
        );
        assert_eq!(
            status(
                &door,
                req(
                    Method::POST,
                    "/rpc",
                    &[host, ("content-type", "application/x-www-form-urlencoded")]
                )
            ),
            200
        );
        assert_eq!(
            status(
                &door,
                req(Method::GET, "/healthz", &[("host", "evil.example")])
            ),
            200
        );
    }

    #[test]
    fn the_token_is_required_everywhere_but_healthz() {
        let door = Door::new(
            Some("s3cret-token-0123".into()),
            "0.0.0.0:8081".parse().unwrap(),
        );
        let host = ("host", "sidecar.internal:8081");
        assert_eq!(status(&door, req(Method::GET, "/registry", &[host])), 401);
        assert_eq!(
            status(&door, req(Method::GET, "/greeter/Say.Hello", &[host])),
            401
        );
        assert_eq!(
            status(
                &door,
                req(
                    Method::GET,
                    "/registry",
                    &[host, ("authorization", "Bearer wrong-token-000000")]
                )
            ),
            401
        );
        assert_eq!(
            status(
                &door,
                req(
                    Method::GET,
                    "/registry",
                    &[host, ("authorization", "Bearer s3cret-token-0123")]
                )
            ),
            200
        );
        assert_eq!(status(&door, req(Method::GET, "/healthz", &[])), 200);
        assert_eq!(status(&door, req(Method::GET, "/dashboard", &[host])), 200);
        assert_eq!(
            status(&door, req(Method::GET, "/dashboard/data", &[host])),
            401
        );
        let mut admitted = req(
            Method::POST,
            "/broker?topic=t",
            &[host, ("authorization", "Bearer s3cret-token-0123")],
        );
        door.admit(&mut admitted, false);
        assert!(
            admitted.headers().get("authorization").is_none(),
            "the token goes no further than the door"
        );
    }

    #[test]
    fn the_token_has_its_own_header_and_the_app_s_authorization_travels_on_calls() {
        let door = Door::new(
            Some("s3cret-token-0123".into()),
            "0.0.0.0:8081".parse().unwrap(),
        );
        let own = ("pillion-api-token", "s3cret-token-0123");
        let app = ("authorization", "Bearer the-app-s-own-jwt");
        let old = ("authorization", "Bearer s3cret-token-0123");
        let call = |headers: &[(&str, &str)]| {
            status(&door, req(Method::POST, "/greeter/Say.Hello", headers))
        };
        assert_eq!(call(&[own, app]), 200);
        assert_eq!(call(&[old]), 401, "never the old way on calls by name");
        assert_eq!(call(&[app]), 401);
        let api = |headers: &[(&str, &str)]| status(&door, req(Method::GET, "/registry", headers));
        assert_eq!(api(&[own]), 200);
        assert_eq!(api(&[old]), 200, "the old way stays on the API's routes");
        assert_eq!(api(&[("pillion-api-token", "s3cret-token-0124")]), 401);

        let mut admitted = req(Method::POST, "/greeter/Say.Hello", &[own, app]);
        door.admit(&mut admitted, true);
        assert!(admitted.headers().get("pillion-api-token").is_none());
        assert_eq!(
            admitted.headers()["authorization"],
            "Bearer the-app-s-own-jwt",
            "the app's token goes on with the call"
        );
    }

    #[test]
    fn over_https_the_certificate_s_names_are_the_api_s_own() {
        let names: Names = std::sync::Arc::new(|| vec!["sidecar.example".to_string()]);
        let door = Door::new(None, "127.0.0.1:443".parse().unwrap()).with_names(names);
        let get = |headers: &[(&str, &str)]| status(&door, req(Method::GET, "/registry", headers));
        assert_eq!(get(&[("host", "sidecar.example")]), 200);
        assert_eq!(get(&[("host", "SIDECAR.example:443")]), 200);
        assert_eq!(get(&[("host", "evil.example")]), 421);
        // An https:// origin without a port is port 443.
        let own = [
            ("host", "sidecar.example"),
            ("origin", "https://sidecar.example"),
        ];
        assert_eq!(get(&own), 200);
        let plain = [
            ("host", "sidecar.example"),
            ("origin", "http://sidecar.example"),
        ];
        assert_eq!(get(&plain), 403);
    }

    #[test]
    fn hosts_and_ports_are_split_the_way_browsers_write_them() {
        assert_eq!(strip_port("[::1]:8081"), "::1");
        assert_eq!(strip_port("localhost"), "localhost");
        assert_eq!(strip_port("127.0.0.1:80"), "127.0.0.1");
        let door = Door::new(None, "[::1]:8081".parse().unwrap());
        assert!(door.is_own_origin("http://[::1]:8081"));
        assert!(!door.is_own_origin("http://[::1]:8082"));
    }
}
