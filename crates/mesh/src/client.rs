//! A sidecar's side of the issuer ([`crate::issuer`]): it makes a key, sends a
//! certification request for its own identity and gets the certificate, from the
//! first issuer that answers. The first time it shows its join token; a renewal shows
//! the certificate it replaces instead, so an expired token stops nothing once a
//! sidecar has joined. An issuer is accepted only when its certificate chains to the
//! mesh's roots and names [`crate::issuer::ISSUER_URI`].

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::BodyExt;
use pillion_http::pool::Outgoing;
use pillion_http::{describe, Client};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;

use crate::ca::{CaError, Issued};
use crate::identity::PeerIs;
use crate::issuer::{Answer, ISSUER_URI, PATH};

/// Limit of one exchange with an issuer.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

pub struct IssuerClient {
    urls: Vec<String>,
    token: String,
    roots: Arc<RootCertStore>,
}

impl IssuerClient {
    pub fn new(urls: Vec<String>, token: String, roots: Arc<RootCertStore>) -> Self {
        IssuerClient { urls, token, roots }
    }

    /// The first certificate, on the join token; issuers are tried in turn, again and
    /// again with a growing pause, for up to
    /// [`crate::identity::FIRST_CERTIFICATE_WAIT`].
    pub async fn first(&self, service: &str) -> Result<Issued, CaError> {
        let deadline = tokio::time::Instant::now() + crate::identity::FIRST_CERTIFICATE_WAIT;
        let mut pause = Duration::from_millis(200);
        loop {
            match self.ask(service, None).await {
                Ok(issued) => return Ok(issued),
                // A refusal will not change by asking again.
                Err(Failure::Refused(e)) => return Err(e),
                Err(Failure::Unreachable(e)) if tokio::time::Instant::now() + pause >= deadline => {
                    return Err(e)
                }
                Err(Failure::Unreachable(e)) => {
                    tracing::warn!(error = %e, "no mesh issuer answered yet; trying again");
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }

    /// What the issuers revoked (token ids and certificate serials), from the first
    /// that answers.
    pub async fn revoked(&self) -> Result<Vec<String>, CaError> {
        let client = self.client(None, Arc::new(std::sync::Mutex::new(None)));
        let mut errors = Vec::new();
        for url in &self.urls {
            let req = http::Request::get(format!(
                "{}{}",
                url.trim_end_matches('/'),
                crate::issuer::REVOKED_PATH
            ))
            .body(Outgoing::Full(None))
            .map_err(|e| CaError(format!("--mesh-issuer {url}: {e}")))?;
            let answer = async {
                let res = client
                    .send(req, CALL_TIMEOUT)
                    .await
                    .map_err(|e| describe(&e))?;
                if !res.status().is_success() {
                    return Err(format!("{}", res.status()));
                }
                let bytes = res.into_body().collect().await.map_err(|e| e.to_string())?;
                let list: serde_json::Value =
                    serde_json::from_slice(&bytes.to_bytes()).map_err(|e| e.to_string())?;
                Ok(list["revoked"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect::<Vec<_>>())
            };
            match tokio::time::timeout(CALL_TIMEOUT, answer).await {
                Ok(Ok(list)) => return Ok(list),
                Ok(Err(e)) => errors.push(format!("{url}: {e}")),
                Err(_) => errors.push(format!("{url}: no answer")),
            }
        }
        Err(CaError(format!(
            "no mesh issuer gave its revocations: {}",
            errors.join("; ")
        )))
    }

    /// A new certificate, shown the current one.
    pub async fn renew(
        &self,
        service: &str,
        current: Arc<CertifiedKey>,
    ) -> Result<Issued, CaError> {
        self.ask(service, Some(current))
            .await
            .map_err(Failure::into_error)
    }

    async fn ask(
        &self,
        service: &str,
        current: Option<Arc<CertifiedKey>>,
    ) -> Result<Issued, Failure> {
        let key =
            rcgen::KeyPair::generate().map_err(|e| Failure::Refused(CaError(e.to_string())))?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
            .map_err(|e| Failure::Refused(CaError(e.to_string())))?;
        let uri = crate::der::identity(service);
        params.subject_alt_names = vec![rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from(uri.as_str())
                .map_err(|e| Failure::Refused(CaError(format!("{uri:?}: {e}"))))?,
        )];
        let csr = params
            .serialize_request(&key)
            .and_then(|r| r.pem())
            .map_err(|e| Failure::Refused(CaError(format!("a certificate request: {e}"))))?;
        let body = Bytes::from(serde_json::json!({ "csr": csr }).to_string());
        let rejected = Arc::new(std::sync::Mutex::new(None));
        let client = self.client(current.clone(), rejected.clone());
        let mut errors = Vec::new();
        for url in &self.urls {
            let mut req = http::Request::post(format!("{}{PATH}", url.trim_end_matches('/')))
                .header(http::header::CONTENT_TYPE, "application/json");
            if current.is_none() {
                req = req.header(
                    http::header::AUTHORIZATION,
                    format!("Bearer {}", self.token),
                );
            }
            let req = req
                .body(Outgoing::full(body.clone()))
                .map_err(|e| Failure::Refused(CaError(format!("--mesh-issuer {url}: {e}"))))?;
            let res = match client.send(req, CALL_TIMEOUT).await {
                Ok(res) => res,
                Err(e) => {
                    // Not an issuer of this mesh: asking again will not change that.
                    if let Some(why) = rejected.lock().unwrap_or_else(|e| e.into_inner()).take() {
                        return Err(Failure::Refused(CaError(format!(
                            "--mesh-issuer {url} is not an issuer of this mesh: {why}"
                        ))));
                    }
                    errors.push(format!("{url}: {}", describe(&e)));
                    continue;
                }
            };
            let status = res.status();
            let bytes = match tokio::time::timeout(CALL_TIMEOUT, res.into_body().collect()).await {
                Ok(Ok(b)) => b.to_bytes(),
                _ => {
                    errors.push(format!("{url}: the answer did not arrive"));
                    continue;
                }
            };
            if status.is_success() {
                return read_answer(&bytes, key).map_err(Failure::Refused);
            }
            let detail = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v["detail"].as_str().map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
            let e = CaError(format!("the mesh issuer {url} refused: {status}: {detail}"));
            // A 5xx is this issuer's trouble: another may answer.
            if status.is_server_error() {
                errors.push(e.0);
                continue;
            }
            return Err(Failure::Refused(e));
        }
        Err(Failure::Unreachable(CaError(format!(
            "no mesh issuer answered: {}",
            errors.join("; ")
        ))))
    }

    /// A client that accepts only an issuer, presenting `current` when given; why a
    /// server was not accepted goes to `rejected`.
    fn client(&self, current: Option<Arc<CertifiedKey>>, rejected: Rejected) -> Client {
        let verifier = Arc::new(IssuerIs {
            peer: PeerIs::new(ISSUER_URI.to_string(), self.roots.clone()),
            rejected,
        });
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(verifier);
        let mut config = match current {
            Some(current) => builder.with_client_cert_resolver(Arc::new(Presenting(current))),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Client::with_tls(Default::default(), CALL_TIMEOUT, Some(Arc::new(config)))
    }
}

enum Failure {
    /// No issuer could be asked.
    Unreachable(CaError),
    /// An issuer answered no (or the answer was unusable).
    Refused(CaError),
}

impl Failure {
    fn into_error(self) -> CaError {
        match self {
            Failure::Unreachable(e) | Failure::Refused(e) => e,
        }
    }
}

fn read_answer(bytes: &[u8], key: rcgen::KeyPair) -> Result<Issued, CaError> {
    let answer: Answer = serde_json::from_slice(bytes)
        .map_err(|e| CaError(format!("the mesh issuer's answer: {e}")))?;
    let chain = CertificateDer::pem_slice_iter(answer.certificate.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaError(format!("the mesh issuer's certificate: {e}")))?;
    if chain.is_empty() {
        return Err(CaError("the mesh issuer sent no certificate".into()));
    }
    Ok(Issued {
        chain,
        key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        not_after: SystemTime::UNIX_EPOCH + Duration::from_secs(answer.not_after),
    })
}

type Rejected = Arc<std::sync::Mutex<Option<String>>>;

/// [`PeerIs`] the issuer, remembering why a server was not.
#[derive(Debug)]
struct IssuerIs {
    peer: PeerIs,
    rejected: Rejected,
}

impl rustls::client::danger::ServerCertVerifier for IssuerIs {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.peer
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .inspect_err(|e| {
                *self.rejected.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.peer.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.peer.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.peer.supported_verify_schemes()
    }
}

/// Presents one certificate as a TLS client.
#[derive(Debug)]
struct Presenting(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for Presenting {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
