//! JWT verification at the edge (`--jwt-jwks` on `--listen`, gateway mode).
//!
//! The keys come from a JWKS (a file, or an `http(s)://` URL), read again every
//! `--jwt-jwks-refresh` (or sooner, when the URL's `Cache-Control: max-age` says so),
//! so a key the identity provider removed stops being trusted without a restart. A
//! token whose `kid` is unknown makes the set be read at once (at most every
//! [`REFRESH_GAP`]), so a new key is trusted from its first token. Only RS256, ES256
//! and EdDSA are accepted, and a token's `alg` must be its key's: no algorithm
//! confusion.
//!
//! With `--jwt-secret`, tokens signed with a shared secret (HS256, HS384, HS512: what
//! Feathers' authentication issues, "all nodes must share the same secret") are
//! checked too; an HS token is never checked against the JWKS, nor an RS/ES/EdDSA one
//! against the secret.
//!
//! A valid token gives the app `X-Pillion-Subject: <claim>` (`sub` unless
//! `--jwt-subject-claim` names another; a number is written in decimal); pillion's
//! server removes a client's copy of that header from every request, so only pillion
//! can set it. A valid token without that claim passes without a subject, unless
//! `--jwt-require-subject`. A subject that cannot be a header value (a CR, an LF) is
//! refused, not passed without one.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{header, HeaderMap, HeaderValue, StatusCode};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use pillion_core::error::ApiError;
use tokio::time::Instant;

const ID: &str = "pillion.jwt";
/// The least time between two reads of the key set caused by unknown `kid`s.
pub const REFRESH_GAP: Duration = Duration::from_secs(10);
/// The shortest wait between two periodic reads, whatever `max-age` says (`max-age=0`
/// must not make pillion read the set in a loop).
const MIN_REFRESH: Duration = Duration::from_secs(1);
/// How long one read of a JWKS URL may take.
const READ_DEADLINE: Duration = Duration::from_secs(5);

/// Where the keys are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Jwks {
    File(PathBuf),
    Url(String),
}

impl std::str::FromStr for Jwks {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.starts_with("http://") || s.starts_with("https://") {
            pillion_http::client::check_url(s)?;
            Ok(Jwks::Url(s.to_string()))
        } else if s.contains("://") {
            Err(format!("{s:?}: give a file or an http(s):// URL"))
        } else {
            Ok(Jwks::File(PathBuf::from(s)))
        }
    }
}

impl std::fmt::Display for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Jwks::File(p) => write!(f, "{}", p.display()),
            Jwks::Url(u) => write!(f, "{u}"),
        }
    }
}

/// A shared HMAC secret: its bytes as given (Feathers uses its secret string as is).
/// Never shown: its `Debug` is `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct JwtSecret(pub Vec<u8>);

impl std::fmt::Debug for JwtSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JwtSecret(***)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtConfig {
    /// Public keys (RS256, ES256, EdDSA).
    pub jwks: Option<Jwks>,
    /// The shared secret (HS256, HS384, HS512).
    pub secret: Option<JwtSecret>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// Refuse requests without a token (else they pass, without a subject).
    pub required: bool,
    /// How often the key set is read again (`--jwt-jwks-refresh`).
    pub refresh: Duration,
    /// The claim that becomes `X-Pillion-Subject` (`sub`).
    pub subject_claim: String,
    /// Refuse a valid token without that claim (else it passes without a subject).
    pub subject_required: bool,
}

const HMAC: [Algorithm; 3] = [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];

#[derive(Default)]
struct Keys {
    by_kid: HashMap<String, (DecodingKey, Algorithm)>,
    /// Keys without a `kid`, tried in turn for tokens without one.
    unnamed: Vec<(DecodingKey, Algorithm)>,
}

pub struct Verifier {
    config: JwtConfig,
    /// The shared secret, for HS tokens.
    secret: Option<DecodingKey>,
    /// The checks of each accepted algorithm, made once (not per request).
    validations: Vec<(Algorithm, Validation)>,
    keys: ArcSwap<Keys>,
    last_read: Mutex<Option<Instant>>,
    reading: tokio::sync::Mutex<()>,
    /// Reads a JWKS URL (pillion's one HTTP client, which bounds the answer).
    client: pillion_http::Client,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("a bearer token is required (Authorization: Bearer <JWT>)")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("the signing keys ({0}) cannot be read: {1}")]
    KeysUnavailable(String, String),
}

impl JwtError {
    /// The refusal in pillion's JSON error shape.
    pub fn to_api_error(&self) -> ApiError {
        let status = match self {
            JwtError::KeysUnavailable(..) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::UNAUTHORIZED,
        };
        ApiError::new(ID, status, self.to_string())
    }
}

/// Who a valid token speaks for: its subject and its scopes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub sub: String,
    /// OAuth 2's `scope` (space-separated), or `scp` (a list or a string).
    pub scopes: Vec<String>,
}

fn scopes(claims: &Claims) -> Vec<String> {
    let words = |v: &serde_json::Value| -> Vec<String> {
        match v {
            serde_json::Value::String(s) => s.split_whitespace().map(str::to_string).collect(),
            serde_json::Value::Array(items) => items
                .iter()
                .filter_map(|i| i.as_str().map(str::to_string))
                .collect(),
            _ => Vec::new(),
        }
    };
    let mut out = claims.get("scope").map(words).unwrap_or_default();
    out.extend(claims.get("scp").map(words).unwrap_or_default());
    out
}

impl Verifier {
    /// Reads the key set once: a file that does not load is an error now; a URL that
    /// does not answer is read again at the first token. Then reads it periodically,
    /// for as long as the verifier is used.
    pub async fn new(config: JwtConfig) -> Result<Arc<Verifier>, String> {
        let validations = [Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA]
            .into_iter()
            .chain(HMAC)
            .map(|alg| (alg, validation(&config, alg)))
            .collect();
        let tls = Arc::new(pillion_http::tls::system_client_config());
        let verifier = Arc::new(Verifier {
            validations,
            secret: config
                .secret
                .as_ref()
                .map(|s| DecodingKey::from_secret(&s.0)),
            config,
            keys: ArcSwap::from_pointee(Keys::default()),
            last_read: Mutex::new(None),
            reading: tokio::sync::Mutex::new(()),
            client: pillion_http::Client::with_tls(Default::default(), READ_DEADLINE, Some(tls)),
        });
        let Some(jwks) = verifier.config.jwks.clone() else {
            return Ok(verifier);
        };
        let first = verifier.read().await;
        let wait = verifier.next_read(&first);
        match (first, &jwks) {
            (Ok(_), _) => {}
            (Err(e), Jwks::File(_)) => return Err(format!("--jwt-jwks: {e}")),
            (Err(e), Jwks::Url(url)) => {
                tracing::warn!(jwks = %url, error = %e, "JWKS not read yet; retried at the first token")
            }
        }
        tokio::spawn(refresh(Arc::downgrade(&verifier), wait));
        Ok(verifier)
    }

    /// Checks the request's token: `Ok(Some(principal))` for a valid one, which sets
    /// `X-Pillion-Subject`, `Ok(None)` for no token when none is required.
    pub async fn admit(&self, headers: &mut HeaderMap) -> Result<Option<Principal>, JwtError> {
        let token = match bearer(headers) {
            Some(t) => t.to_string(),
            None if self.config.required => return Err(JwtError::Missing),
            None => return Ok(None),
        };
        let header =
            jsonwebtoken::decode_header(&token).map_err(|e| JwtError::Invalid(e.to_string()))?;
        let mut claims = self.verify(&token, &header);
        if matches!(&claims, Err(JwtError::Invalid(m)) if m.starts_with("unknown key")) {
            // The provider may have rotated its keys: read them again, then retry.
            if self.read_if_due().await? {
                claims = self.verify(&token, &header);
            }
        }
        let claim = &self.config.subject_claim;
        let mut claims = claims?;
        let scopes = scopes(&claims);
        let sub = match claims.remove(claim) {
            Some(serde_json::Value::String(s)) => s,
            Some(serde_json::Value::Number(n)) => n.to_string(),
            None | Some(serde_json::Value::Null) if !self.config.subject_required => {
                return Ok(None)
            }
            None | Some(serde_json::Value::Null) => {
                return Err(JwtError::Invalid(format!(
                    "it has no {claim:?} claim, which --jwt-require-subject requires"
                )))
            }
            Some(other) => {
                return Err(JwtError::Invalid(format!(
                    "its {claim:?} claim is {other}, not a string or a number"
                )))
            }
        };
        // A subject the app cannot be told is no subject: passing the call without one
        // would make a signed token look like an anonymous call.
        let value = HeaderValue::from_bytes(sub.as_bytes()).map_err(|_| {
            JwtError::Invalid(format!(
                "its {claim} {sub:?} holds a control character (CR, LF, NUL...) and cannot be passed to the app"
            ))
        })?;
        headers.insert(pillion_core::SUBJECT_HEADER, value);
        Ok(Some(Principal { sub, scopes }))
    }

    fn verify(&self, token: &str, header: &jsonwebtoken::Header) -> Result<Claims, JwtError> {
        if HMAC.contains(&header.alg) {
            let Some(secret) = &self.secret else {
                return Err(JwtError::Invalid(format!(
                    "alg {:?} is a shared-secret signature, and this sidecar has no --jwt-secret",
                    header.alg
                )));
            };
            return self.decode(token, secret, header.alg);
        }
        if self.config.jwks.is_none() {
            return Err(JwtError::Invalid(format!(
                "alg {:?} needs a public key, and this sidecar has only --jwt-secret (HS256, HS384, HS512)",
                header.alg
            )));
        }
        let keys = self.keys.load();
        let kid = header.kid.as_deref();
        let candidates: Vec<&(DecodingKey, Algorithm)> = match kid {
            Some(kid) => keys.by_kid.get(kid).into_iter().collect(),
            None => keys.unnamed.iter().collect(),
        };
        if candidates.is_empty() {
            return Err(JwtError::Invalid(format!(
                "unknown key {:?} (not in the JWKS)",
                kid.unwrap_or("without kid")
            )));
        }
        let mut last = String::new();
        for (key, alg) in candidates {
            if header.alg != *alg {
                last = format!("alg {:?} is not its key's ({alg:?})", header.alg);
                continue;
            }
            match self.decode(token, key, *alg) {
                Ok(claims) => return Ok(claims),
                Err(JwtError::Invalid(e)) => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(JwtError::Invalid(last))
    }

    /// The claims of `token`, checked with `key` for `alg`.
    fn decode(&self, token: &str, key: &DecodingKey, alg: Algorithm) -> Result<Claims, JwtError> {
        let (_, validation) = self
            .validations
            .iter()
            .find(|(a, _)| *a == alg)
            .expect("a validation for every accepted algorithm");
        jsonwebtoken::decode::<Claims>(token, key, validation)
            .map(|data| data.claims)
            .map_err(|e| JwtError::Invalid(e.to_string()))
    }

    /// Reads the key set again unless it was read within [`REFRESH_GAP`]; whether it
    /// did.
    async fn read_if_due(&self) -> Result<bool, JwtError> {
        let _one = self.reading.lock().await;
        let due = self
            .last_read
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none_or(|t| t.elapsed() >= REFRESH_GAP);
        if !due {
            return Ok(false);
        }
        self.read().await.map_err(|e| {
            let jwks = self.config.jwks.as_ref().map(Jwks::to_string);
            JwtError::KeysUnavailable(jwks.unwrap_or_default(), e)
        })?;
        Ok(true)
    }

    /// Reads the key set and trusts only its keys from now on; how soon the URL said
    /// the set goes stale (`Cache-Control: max-age`), if it did.
    async fn read(&self) -> Result<Option<Duration>, String> {
        *self.last_read.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        let Some(jwks) = &self.config.jwks else {
            return Ok(None);
        };
        let (bytes, fresh_for) = match jwks {
            Jwks::File(path) => {
                let bytes = tokio::fs::read(path)
                    .await
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                (bytes::Bytes::from(bytes), None)
            }
            Jwks::Url(url) => {
                let answer = self
                    .client
                    .get(url, READ_DEADLINE)
                    .await
                    .map_err(|e| format!("{url}: {}", pillion_http::describe(&e)))?;
                if !answer.status().is_success() {
                    return Err(format!("{url}: answered {}", answer.status()));
                }
                let fresh_for = max_age(answer.headers());
                (answer.into_body(), fresh_for)
            }
        };
        let keys = parse(&bytes)?;
        tracing::info!(%jwks, keys = keys.by_kid.len() + keys.unnamed.len(), "JWKS read");
        self.keys.store(Arc::new(keys));
        Ok(fresh_for)
    }

    /// How long until the next periodic read, after a read that ended so.
    fn next_read(&self, read: &Result<Option<Duration>, String>) -> Duration {
        match read {
            Ok(Some(max_age)) => self.config.refresh.min(*max_age).max(MIN_REFRESH),
            Ok(None) => self.config.refresh,
            // The keys read before stay trusted meanwhile: an unreachable provider
            // must not take every call down.
            Err(_) => self.config.refresh.min(REFRESH_GAP),
        }
    }
}

/// Reads the key set again after each `wait`, until the verifier is dropped.
async fn refresh(verifier: Weak<Verifier>, mut wait: Duration) {
    loop {
        tokio::time::sleep(wait).await;
        let Some(verifier) = verifier.upgrade() else {
            return;
        };
        let read = {
            let _one = verifier.reading.lock().await;
            verifier.read().await
        };
        if let Err(e) = &read {
            tracing::warn!(jwks = ?verifier.config.jwks, error = %e, "JWKS not read again; the keys read before stay");
        }
        wait = verifier.next_read(&read);
    }
}

/// The `max-age` of a `Cache-Control` header.
fn max_age(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|directive| {
            let (name, value) = directive.trim().split_once('=')?;
            name.eq_ignore_ascii_case("max-age")
                .then(|| value.trim_matches('"').parse().ok())
                .flatten()
                .map(Duration::from_secs)
        })
}

/// What a token signed with `alg` must satisfy: a 30 s leeway on `exp` and `nbf`,
/// the claims pillion relies on, and the issuer and audience when they are
/// configured: then the token must have them (jsonwebtoken checks only the ones a
/// token has, so a token without `iss` would pass `--jwt-issuer`).
fn validation(config: &JwtConfig, alg: Algorithm) -> Validation {
    let mut validation = Validation::new(alg);
    validation.leeway = 30;
    validation.validate_nbf = true;
    let mut required = vec!["exp"];
    match &config.issuer {
        Some(iss) => {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        None => validation.iss = None,
    }
    match &config.audience {
        Some(aud) => {
            validation.set_audience(&[aud]);
            required.push("aud");
        }
        None => validation.validate_aud = false,
    }
    validation.set_required_spec_claims(&required);
    validation
}

/// A token's claims, the subject among them (under a configurable name).
type Claims = serde_json::Map<String, serde_json::Value>;

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The usable keys of a JWKS document: RSA (RS256), P-256 (ES256) and Ed25519
/// (EdDSA); others are skipped.
fn parse(bytes: &[u8]) -> Result<Keys, String> {
    let set: JwkSet = serde_json::from_slice(bytes).map_err(|e| format!("not a JWKS: {e}"))?;
    let mut keys = Keys::default();
    for jwk in &set.keys {
        let alg = match (&jwk.algorithm, jwk.common.key_algorithm) {
            (AlgorithmParameters::RSA(_), None | Some(KeyAlgorithm::RS256)) => Algorithm::RS256,
            (AlgorithmParameters::EllipticCurve(ec), None | Some(KeyAlgorithm::ES256))
                if ec.curve == EllipticCurve::P256 =>
            {
                Algorithm::ES256
            }
            (AlgorithmParameters::OctetKeyPair(okp), None | Some(KeyAlgorithm::EdDSA))
                if okp.curve == EllipticCurve::Ed25519 =>
            {
                Algorithm::EdDSA
            }
            _ => continue,
        };
        let Ok(key) = DecodingKey::from_jwk(jwk) else {
            continue;
        };
        match &jwk.common.key_id {
            Some(kid) => {
                keys.by_kid.insert(kid.clone(), (key, alg));
            }
            None => keys.unnamed.push((key, alg)),
        }
    }
    if keys.by_kid.is_empty() && keys.unnamed.is_empty() {
        return Err("no RS256, ES256 or EdDSA key in the JWKS".into());
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_age_is_read_from_any_cache_control_directive() {
        let with = |values: &[&str]| {
            let mut headers = HeaderMap::new();
            for v in values {
                headers.append(header::CACHE_CONTROL, HeaderValue::from_str(v).unwrap());
            }
            max_age(&headers)
        };
        assert_eq!(with(&["max-age=60"]), Some(Duration::from_secs(60)));
        assert_eq!(
            with(&["public, Max-Age=\"30\", must-revalidate"]),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            with(&["no-cache", "max-age=5"]),
            Some(Duration::from_secs(5))
        );
        assert_eq!(with(&["s-maxage=60"]), None);
        assert_eq!(with(&["max-age=soon"]), None);
        assert_eq!(with(&[]), None);
    }
}
