//! The mesh's issuer (`pillion mesh serve`): the one place the CA key is kept. A
//! sidecar makes its key itself and sends a certification request; the issuer signs
//! a short-lived certificate for exactly the service its join token names (the first
//! time), or the service of the certificate it presents (a renewal, over mTLS).
//!
//! - A join token (`pillion mesh token`) is a JWT signed ES256 with the CA key:
//!   `{"sub": service, "aud": "pillion-mesh", "iat", "exp", "jti": id}`. Any issuer
//!   of the same CA checks it; its id can be revoked.
//! - The issuer's TLS certificate names `spiffe://pillion/issuer`, which no
//!   certification request can be granted, so a worker cannot pose as an issuer.
//! - Each issuance is one log line: service, identity, serial, expiry, token id.
//!
//! `POST /v1/certificate` with `{"csr": "<PEM>"}` (and `Authorization: Bearer TOKEN`
//! unless a mesh certificate is presented) answers `{"certificate": "<PEM chain>",
//! "serial", "not_after"}`; a refusal is micro's error JSON with 400, 401 or 403.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use pillion_core::error::ApiError;
use pillion_http::server::{RequestBody, TlsPeer};
use serde::{Deserialize, Serialize};

use crate::ca::{Authority, CaError, RequestKey};

/// The identity of an issuer's TLS certificate.
pub const ISSUER_URI: &str = "spiffe://pillion/issuer";
/// Where certificates are asked for.
pub const PATH: &str = "/v1/certificate";
/// Where sidecars read what is revoked: `{"revoked": [ids]}`.
pub const REVOKED_PATH: &str = "/v1/revoked";
/// A join token's audience.
const AUDIENCE: &str = "pillion-mesh";
/// The largest request read.
const MAX_REQUEST: usize = 64 * 1024;
/// The error id of the issuer's refusals.
const ERROR_ID: &str = "pillion.mesh.issuer";

/// ecdsa-with-SHA256 (1.2.840.10045.4.3.2).
const ECDSA_SHA256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02];

/// What a join token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The service the token admits.
    pub sub: String,
    pub aud: String,
    pub iat: u64,
    pub exp: u64,
    /// Its id, by which it is revoked.
    pub jti: String,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut buf)
        .expect("the system has randomness");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// A join token for `service`, valid for `ttl`.
pub fn mint(
    authority: &Authority,
    service: &str,
    ttl: Duration,
) -> Result<(String, Claims), CaError> {
    let iat = now_secs();
    let claims = Claims {
        sub: service.to_string(),
        aud: AUDIENCE.into(),
        iat,
        exp: iat + ttl.as_secs().max(1),
        jti: random_hex(12),
    };
    let header = B64.encode(br#"{"alg":"ES256","typ":"JWT"}"#);
    let body = B64.encode(serde_json::to_vec(&claims).expect("claims serialize"));
    let signed = format!("{header}.{body}");
    let signature = authority.sign_token(signed.as_bytes())?;
    Ok((format!("{signed}.{}", B64.encode(signature)), claims))
}

/// Why a token or a request is refused.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub detail: String,
}

fn refuse(status: StatusCode, detail: impl Into<String>) -> Refusal {
    Refusal {
        status,
        detail: detail.into(),
    }
}

/// The claims of `token` when the CA signed it, it has not expired and is not
/// revoked.
pub fn check_token(
    authority: &Authority,
    token: &str,
    revoked: &Revoked,
    now: u64,
) -> Result<Claims, Refusal> {
    let bad = |why: &str| refuse(StatusCode::UNAUTHORIZED, format!("the join token {why}"));
    let mut parts = token.trim().split('.');
    let (Some(header), Some(body), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("is not a token from `pillion mesh token`"));
    };
    let signature = B64
        .decode(signature)
        .map_err(|_| bad("is not a token from `pillion mesh token`"))?;
    let signed = &token.trim()[..header.len() + 1 + body.len()];
    if !authority.verify_token(signed.as_bytes(), &signature) {
        return Err(bad("is not signed by this mesh's CA"));
    }
    let claims: Claims = B64
        .decode(body)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| bad("has unreadable claims"))?;
    if claims.aud != AUDIENCE {
        return Err(bad("is not for the mesh"));
    }
    if claims.exp <= now {
        return Err(bad(&format!(
            "{} (for {}) has expired: make a new one with `pillion mesh token --service {}`",
            claims.jti, claims.sub, claims.sub
        )));
    }
    if revoked.contains(&claims.jti) {
        return Err(refuse(
            StatusCode::FORBIDDEN,
            format!(
                "the join token {} (for {}) is revoked",
                claims.jti, claims.sub
            ),
        ));
    }
    Ok(claims)
}

/// Token ids and certificate serials that are refused: a file of one id per line
/// (`#` starts a comment), read again on every request.
#[derive(Debug, Default)]
pub struct Revoked(Vec<String>);

impl Revoked {
    pub fn read(file: Option<&PathBuf>) -> Result<Revoked, String> {
        let Some(file) = file else {
            return Ok(Revoked::default());
        };
        let text = std::fs::read_to_string(file)
            .map_err(|e| format!("--revoked {}: {e}", file.display()))?;
        Ok(Revoked(
            text.lines()
                .map(|l| l.split('#').next().unwrap_or("").trim().to_string())
                .filter(|l| !l.is_empty())
                .map(|l| crate::der::revocation_id(&l))
                .collect(),
        ))
    }

    pub fn contains(&self, id: &str) -> bool {
        let id = crate::der::revocation_id(id);
        self.0.contains(&id)
    }
}

/// The public key of a certification request for `uri`, once its signature is
/// checked: a P-256 key, the kind sidecars make.
pub fn check_request(der: &[u8], uri: &str) -> Result<RequestKey, Refusal> {
    let bad = |why: String| refuse(StatusCode::BAD_REQUEST, why);
    let request = pillion_http::x509::request(der).ok_or_else(|| {
        bad("the certificate request is not a PKCS#10 request (DER in PEM)".into())
    })?;
    if request.signature_algorithm != ECDSA_SHA256 {
        return Err(bad(
            "the certificate request is not signed ECDSA P-256 with SHA-256, as sidecars sign it"
                .into(),
        ));
    }
    let point = p256_point(request.public_key_info)
        .ok_or_else(|| bad("the certificate request's key is not a P-256 key".into()))?;
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, &point)
        .verify(request.info, request.signature)
        .map_err(|_| bad("the certificate request's signature does not match its key".into()))?;
    if request.uris != [uri] {
        return Err(refuse(
            StatusCode::FORBIDDEN,
            format!(
                "the certificate request asks for {}; only {uri} can be issued to this caller",
                if request.uris.is_empty() {
                    "no identity".to_string()
                } else {
                    request.uris.join(", ")
                }
            ),
        ));
    }
    Ok(RequestKey(point))
}

/// The uncompressed point of a P-256 SubjectPublicKeyInfo.
fn p256_point(spki: &[u8]) -> Option<Vec<u8>> {
    // SEQUENCE { SEQUENCE { id-ecPublicKey, prime256v1 }, BIT STRING 00 04 x y }
    const PREFIX: &[u8] = &[
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08,
        0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
    ];
    let point = spki.strip_prefix(PREFIX)?;
    (point.len() == 65 && point[0] == 0x04).then(|| point.to_vec())
}

/// What `pillion mesh serve` needs.
#[derive(Debug, Clone)]
pub struct IssuerConfig {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub listen: SocketAddr,
    /// The life of each certificate issued.
    pub lifetime: Duration,
    pub revoked: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Ask {
    csr: String,
}

#[derive(Serialize, Deserialize)]
pub struct Answer {
    pub certificate: String,
    pub serial: String,
    pub not_after: u64,
}

/// A file's modification time and size.
type FileStamp = (SystemTime, u64);

struct Issuer {
    authority: Arc<Authority>,
    config: IssuerConfig,
    /// The revocation file as last read, and the modification time and size it was
    /// read at: read again only when it changed, not at every request.
    revoked: std::sync::Mutex<(Option<FileStamp>, Arc<Revoked>)>,
}

/// Serves the issuer until `shutdown`.
pub async fn serve(
    config: IssuerConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), CaError> {
    let authority = Arc::new(Authority::load(&config.ca_cert, &config.ca_key)?);
    Revoked::read(config.revoked.as_ref()).map_err(CaError)?;
    let tls = server_config(authority.clone(), &config)?;
    let issuer = Arc::new(Issuer {
        authority,
        config,
        revoked: std::sync::Mutex::new((None, Arc::new(Revoked::default()))),
    });
    let limits = pillion_http::server::Limits {
        read_header_timeout: Duration::from_secs(10),
        read_body_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(60),
        max_connections: Some(1024),
        grace: Duration::from_secs(5),
        tls: Some(tls),
        identify: Some(crate::identity::caller),
        tunnel: None,
    };
    pillion_http::server::serve(listener, limits, shutdown, move |req, peer| {
        let issuer = issuer.clone();
        async move { Ok::<_, std::convert::Infallible>(issuer.handle(req, peer).await) }
    })
    .await;
    Ok(())
}

/// The issuer's TLS: its own certificate (naming [`ISSUER_URI`], renewed as it
/// ages), a client certificate from the mesh optional (renewals present one).
fn server_config(
    authority: Arc<Authority>,
    config: &IssuerConfig,
) -> Result<Arc<rustls::ServerConfig>, CaError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = Arc::new(crate::ca::roots(&config.ca_cert)?);
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .allow_unauthenticated()
            .build()
            .map_err(|e| CaError(format!("client verifier: {e}")))?;
    let own = crate::identity::SelfIssued::new(authority, ISSUER_URI, config.lifetime)?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| CaError(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(own));
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(tls))
}

impl Issuer {
    /// What is revoked now: the file, read again when its modification time or size
    /// changed.
    fn revoked(&self) -> Result<Arc<Revoked>, String> {
        let Some(file) = &self.config.revoked else {
            return Ok(Arc::new(Revoked::default()));
        };
        let meta =
            std::fs::metadata(file).map_err(|e| format!("--revoked {}: {e}", file.display()))?;
        let stamp = (
            meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            meta.len(),
        );
        let mut cached = self.revoked.lock().unwrap_or_else(|e| e.into_inner());
        if cached.0 != Some(stamp) {
            *cached = (Some(stamp), Arc::new(Revoked::read(Some(file))?));
        }
        Ok(cached.1.clone())
    }

    async fn handle(&self, req: Request<RequestBody>, peer: SocketAddr) -> Response<String> {
        if req.uri().path() == REVOKED_PATH && req.method() == http::Method::GET {
            return match self.revoked() {
                Ok(revoked) => Response::builder()
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(serde_json::json!({ "revoked": revoked.0 }).to_string())
                    .expect("a valid response"),
                Err(e) => {
                    ApiError::new(ERROR_ID, StatusCode::INTERNAL_SERVER_ERROR, e).into_response()
                }
            };
        }
        match self.issue(req, peer).await {
            Ok(answer) => Response::builder()
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(serde_json::to_string(&answer).expect("the answer serializes"))
                .expect("a valid response"),
            Err(r) => {
                tracing::warn!(%peer, status = r.status.as_u16(), reason = %r.detail, "mesh certificate refused");
                ApiError::new(ERROR_ID, r.status, r.detail).into_response()
            }
        }
    }

    async fn issue(&self, req: Request<RequestBody>, peer: SocketAddr) -> Result<Answer, Refusal> {
        if req.uri().path() != PATH {
            return Err(refuse(
                StatusCode::NOT_FOUND,
                format!("the issuer serves POST {PATH} and GET {REVOKED_PATH}"),
            ));
        }
        if req.method() != http::Method::POST {
            return Err(refuse(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{PATH} takes POST"),
            ));
        }
        let revoked = self
            .revoked()
            .map_err(|e| refuse(StatusCode::INTERNAL_SERVER_ERROR, e))?;
        let presented = req
            .extensions()
            .get::<TlsPeer>()
            .and_then(|p| Some((p.identity.clone()?, p.certificate.clone()?)));
        let bearer = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_string);
        let (service, token_id, renewal) = match (presented, bearer) {
            // A renewal: the service of the certificate presented, unless it, or the
            // token it was granted on, is revoked.
            (Some((service, cert)), _) => {
                let ids = crate::der::revocation_ids(&cert);
                if let Some(id) = ids.iter().find(|id| revoked.contains(id)) {
                    return Err(refuse(
                        StatusCode::FORBIDDEN,
                        format!("the certificate of {service} is revoked ({id})"),
                    ));
                }
                (service.to_string(), crate::der::token_of(&cert), true)
            }
            (None, Some(token)) => {
                let claims = check_token(&self.authority, &token, &revoked, now_secs())?;
                (claims.sub, Some(claims.jti), false)
            }
            (None, None) => {
                return Err(refuse(
                    StatusCode::UNAUTHORIZED,
                    "a join token (Authorization: Bearer, from `pillion mesh token`) or a mesh certificate is needed",
                ))
            }
        };
        let body = http_body_util::Limited::new(req.into_body(), MAX_REQUEST)
            .collect()
            .await
            .map_err(|e| refuse(StatusCode::BAD_REQUEST, format!("the request body: {e}")))?
            .to_bytes();
        let ask: Ask = serde_json::from_slice(&body).map_err(|e| {
            refuse(
                StatusCode::BAD_REQUEST,
                format!("the body is not {{\"csr\": \"<PEM>\"}}: {e}"),
            )
        })?;
        let der = csr_der(&ask.csr).ok_or_else(|| {
            refuse(
                StatusCode::BAD_REQUEST,
                "csr is not a PEM CERTIFICATE REQUEST",
            )
        })?;
        let uri = crate::der::identity(&service);
        let key = check_request(&der, &uri)?;
        let signed = self
            .authority
            .sign(&key, &uri, token_id.as_deref(), self.config.lifetime)
            .map_err(|e| refuse(StatusCode::INTERNAL_SERVER_ERROR, e.0))?;
        let not_after = signed
            .not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        tracing::info!(
            service = %service,
            identity = %uri,
            serial = %signed.serial,
            not_after,
            token = %token_id.as_deref().unwrap_or("-"),
            renewal,
            %peer,
            "mesh certificate issued"
        );
        Ok(Answer {
            certificate: signed.chain.iter().map(|c| pem("CERTIFICATE", c)).collect(),
            serial: signed.serial,
            not_after,
        })
    }
}

/// `der` as PEM.
pub fn pem(label: &str, der: &[u8]) -> String {
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The DER of the first CERTIFICATE REQUEST block of `text`.
fn csr_der(text: &str) -> Option<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(text.as_bytes())
        .ok()
        .map(|der| der.as_ref().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authority(name: &str) -> (Authority, PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("pillion-issuer-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (cert, key) = crate::ca::init(&dir).unwrap();
        (Authority::load(&cert, &key).unwrap(), dir)
    }

    fn csr(uris: &[&str]) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        for uri in uris {
            params.subject_alt_names.push(rcgen::SanType::URI(
                rcgen::string::Ia5String::try_from(*uri).unwrap(),
            ));
        }
        let key = rcgen::KeyPair::generate().unwrap();
        params.serialize_request(&key).unwrap().der().to_vec()
    }

    #[test]
    fn a_token_admits_its_service_until_it_expires_or_is_revoked() {
        let (ca, dir) = authority("token");
        let (token, claims) = mint(&ca, "reports", Duration::from_secs(60)).unwrap();
        let none = Revoked::default();
        assert_eq!(check_token(&ca, &token, &none, now_secs()).unwrap(), claims);
        let late = check_token(&ca, &token, &none, claims.exp).unwrap_err();
        assert_eq!(late.status, StatusCode::UNAUTHORIZED);
        assert!(late.detail.contains("has expired"), "{}", late.detail);
        let revoked = Revoked(vec![claims.jti.clone()]);
        let refused = check_token(&ca, &token, &revoked, now_secs()).unwrap_err();
        assert_eq!(refused.status, StatusCode::FORBIDDEN);
        assert!(refused.detail.contains("is revoked"), "{}", refused.detail);

        // Claims changed after signing, another CA's token, garbage.
        let mut parts: Vec<&str> = token.split('.').collect();
        let forged = B64
            .encode(br#"{"sub":"front","aud":"pillion-mesh","iat":0,"exp":99999999999,"jti":"x"}"#);
        parts[1] = &forged;
        let err = check_token(&ca, &parts.join("."), &none, now_secs()).unwrap_err();
        assert!(
            err.detail.contains("not signed by this mesh's CA"),
            "{}",
            err.detail
        );
        let (other, other_dir) = authority("other");
        let (foreign, _) = mint(&other, "front", Duration::from_secs(60)).unwrap();
        assert!(check_token(&ca, &foreign, &none, now_secs()).is_err());
        for junk in ["", "a.b", "a.b.c.d", "...", "eyJ.eyJ.!!"] {
            assert_eq!(
                check_token(&ca, junk, &none, now_secs())
                    .unwrap_err()
                    .status,
                StatusCode::UNAUTHORIZED,
                "{junk}"
            );
        }
        let _ = std::fs::remove_dir_all(dir);
        let _ = std::fs::remove_dir_all(other_dir);
    }

    #[test]
    fn a_request_is_granted_only_the_identity_it_is_for() {
        let uri = "spiffe://pillion/svc/reports";
        assert!(check_request(&csr(&[uri]), uri).is_ok());
        let other = check_request(&csr(&["spiffe://pillion/svc/front"]), uri).unwrap_err();
        assert_eq!(other.status, StatusCode::FORBIDDEN);
        assert!(
            other.detail.contains("asks for spiffe://pillion/svc/front"),
            "{}",
            other.detail
        );
        let two = check_request(&csr(&[uri, "spiffe://pillion/svc/front"]), uri).unwrap_err();
        assert_eq!(two.status, StatusCode::FORBIDDEN);
        assert_eq!(
            check_request(&csr(&[]), uri).unwrap_err().status,
            StatusCode::FORBIDDEN
        );
        // The issuer's own identity is never granted: no service is named so.
        assert!(check_request(&csr(&[ISSUER_URI]), uri).is_err());
        // A signature that does not match.
        let mut tampered = csr(&[uri]);
        let at = tampered.len() - 3;
        tampered[at] ^= 0x55;
        assert_eq!(
            check_request(&tampered, uri).unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            check_request(b"junk", uri).unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn pem_round_trips() {
        let der = csr(&["spiffe://pillion/svc/a"]);
        assert_eq!(csr_der(&pem("CERTIFICATE REQUEST", &der)).unwrap(), der);
        assert_eq!(csr_der("nothing"), None);
    }

    #[test]
    fn the_revocation_file_takes_ids_and_comments() {
        let file = std::env::temp_dir().join(format!("pillion-revoked-{}", std::process::id()));
        std::fs::write(
            &file,
            "# stolen laptop\nABC123  # token of reports\n\n7f00\n",
        )
        .unwrap();
        let revoked = Revoked::read(Some(&file)).unwrap();
        assert!(revoked.contains("abc123") && revoked.contains("7F00"));
        // A serial as openssl prints it, leading zero and colons, is the same id.
        std::fs::write(&file, "0A:1B:2C\n").unwrap();
        let revoked = Revoked::read(Some(&file)).unwrap();
        assert!(revoked.contains("a1b2c") && revoked.contains("0a1b2c"));
        assert!(!revoked.contains("stolen"));
        let _ = std::fs::remove_file(file);
        assert!(Revoked::read(Some(&PathBuf::from("/nonexistent/x"))).is_err());
    }
}
