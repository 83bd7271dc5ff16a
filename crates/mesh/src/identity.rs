//! This sidecar's mesh identity: a short-lived certificate for
//! `spiffe://pillion/svc/<service>` issued by the mesh CA, renewed at two thirds of
//! its life, and the TLS configs that present it and check the peer's.
//!
//! The certificate comes from the mesh's issuers (`--mesh-issuer`, see
//! [`crate::issuer`]): the key is made here and never leaves; the first certificate
//! is granted on a join token, each renewal on the certificate it replaces. For one
//! host or development the sidecar may hold the CA key and issue itself
//! (`--mesh-ca-key`).
//!
//! Peers are checked against every root of `--mesh-ca-cert`, so a CA is rotated by
//! adding the new root to the bundle everywhere before the issuers switch to it.
//!
//! A mesh listener wants a client certificate from the mesh CA and names the caller
//! by its identity; a calling sidecar accepts a server certificate only when it
//! names the service it meant to call.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use pillion_http::stream::{Connector, TUNNEL_ALPN};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::ca::{Authority, CaError};
use crate::der;

/// What a sidecar needs to join the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshConfig {
    /// The roots it trusts (a bundle while a CA rotates).
    pub ca_cert: PathBuf,
    pub source: Source,
    /// The service this sidecar speaks for (`--server-name`).
    pub service: String,
    /// How long each certificate it issues itself lives (`--mesh-cert-lifetime`).
    pub lifetime: Duration,
}

/// Where the sidecar's certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// It holds the CA key and issues itself (`--mesh-ca-key`).
    LocalCa(PathBuf),
    /// The issuers (`--mesh-issuer`, tried in turn), with a join token for the first.
    Issuers { urls: Vec<String>, token: String },
}

/// How often a sidecar reads what the issuers revoked.
pub const REVOCATIONS_EVERY: Duration = Duration::from_secs(3);

/// Token ids and certificate serials revoked, as last read from the issuers.
pub type Revoked = Arc<ArcSwap<std::collections::HashSet<String>>>;

/// Why `cert` (DER) is refused, when its serial or its token is revoked.
pub fn revoked_by(revoked: &Revoked, cert: &[u8]) -> Option<String> {
    let revoked = revoked.load();
    if revoked.is_empty() {
        return None;
    }
    der::revocation_ids(cert)
        .into_iter()
        .find(|id| revoked.contains(id))
}

/// How long a sidecar waits for an issuer at start before giving up.
pub const FIRST_CERTIFICATE_WAIT: Duration = Duration::from_secs(30);

/// The default life of a sidecar's certificate.
pub const LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// The shortest life a certificate may be given. Each is renewed at two thirds of
/// its life, so a shorter one would have the sidecar issuing certificates instead of
/// serving (a `1ms` typo renewed thousands of times a second); this floor is for
/// tests, hours are usual.
pub const MIN_LIFETIME: Duration = Duration::from_secs(3);

/// A failed renewal is tried again after this long (the certificate in use stays).
const RETRY: Duration = Duration::from_secs(60);

pub struct Identity {
    pub service: String,
    source: Issuing,
    roots: Arc<RootCertStore>,
    /// What the issuers revoked (always empty with a local CA).
    revoked: Revoked,
    current: ArcSwap<CertifiedKey>,
    /// The current certificate's end, in seconds since the epoch.
    not_after: AtomicU64,
    renewals: AtomicU64,
    lifetime: Duration,
    /// Client configs per called service, made once.
    connectors: Mutex<HashMap<String, Connector>>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certified(issued: crate::ca::Issued) -> Result<Arc<CertifiedKey>, CaError> {
    let signer = rustls::crypto::ring::sign::any_supported_type(&issued.key)
        .map_err(|e| CaError(format!("the issued key: {e}")))?;
    Ok(Arc::new(CertifiedKey::new(issued.chain, signer)))
}

fn epoch_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Identity {
    /// Gets the first certificate (from the local CA, or from an issuer, waiting up
    /// to [`FIRST_CERTIFICATE_WAIT`]) and keeps renewing it. Must be called within a
    /// tokio runtime.
    pub async fn start(config: &MeshConfig) -> Result<Arc<Identity>, CaError> {
        let roots = Arc::new(crate::ca::roots(&config.ca_cert)?);
        let source =
            match &config.source {
                Source::LocalCa(key) => {
                    Issuing::Local(Box::new(Authority::load(&config.ca_cert, key)?))
                }
                Source::Issuers { urls, token } => Issuing::Remote(
                    crate::client::IssuerClient::new(urls.clone(), token.clone(), roots.clone()),
                ),
            };
        let issued = match &source {
            Issuing::Local(authority) => authority.issue(&config.service, config.lifetime)?,
            Issuing::Remote(client) => client.first(&config.service).await?,
        };
        let identity = Arc::new(Identity {
            service: config.service.clone(),
            not_after: AtomicU64::new(epoch_secs(issued.not_after)),
            current: ArcSwap::new(certified(issued)?),
            source,
            roots,
            revoked: Revoked::default(),
            renewals: AtomicU64::new(0),
            lifetime: config.lifetime,
            connectors: Mutex::new(HashMap::new()),
        });
        tokio::spawn(renew(Arc::downgrade(&identity)));
        if matches!(identity.source, Issuing::Remote(_)) {
            tokio::spawn(follow_revocations(Arc::downgrade(&identity)));
        }
        Ok(identity)
    }

    /// What the issuers revoked, as last read.
    pub fn revoked(&self) -> Revoked {
        self.revoked.clone()
    }

    /// The identity URI this sidecar presents.
    pub fn uri(&self) -> String {
        der::identity(&self.service)
    }

    /// The config of a mesh listener: a client certificate from the mesh CA is
    /// required; h2, HTTP/1.1 and TCP tunnels are offered.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, CaError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .map_err(|e| CaError(format!("client verifier: {e}")))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| CaError(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(Presented(self.clone())));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), TUNNEL_ALPN.to_vec()];
        Ok(Arc::new(config))
    }

    /// How to reach a node of `service` through its mesh listener: presenting this
    /// identity, and accepting only a certificate that names `service`.
    pub fn connector(self: &Arc<Self>, service: &str) -> Connector {
        let mut connectors = self.connectors.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = connectors.get(service) {
            return c.clone();
        }
        let verifier = Arc::new(
            PeerIs::new(der::identity(service), self.roots.clone()).revoking(self.revoked.clone()),
        );
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(Presented(self.clone())));
        let connector = Connector::new(
            config,
            ServerName::try_from("mesh.pillion").expect("a valid DNS name"),
        );
        connectors.insert(service.to_string(), connector.clone());
        connector
    }

    /// How long the current certificate has left.
    fn remaining(&self) -> Duration {
        let end =
            SystemTime::UNIX_EPOCH + Duration::from_secs(self.not_after.load(Ordering::Relaxed));
        end.duration_since(SystemTime::now()).unwrap_or_default()
    }

    /// How long until the current certificate, just issued, is renewed: at two thirds
    /// of its life (whoever decided that life: this sidecar or its issuer).
    fn until_renewal(&self) -> Duration {
        (self.remaining() * 2 / 3).max(Duration::from_secs(1))
    }

    /// For `/statusz`.
    pub fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "identity": self.uri(),
            "not_after_unix": self.not_after.load(Ordering::Relaxed),
            "renewals": self.renewals.load(Ordering::Relaxed),
        })
    }

    async fn renew_now(&self) -> Result<(), CaError> {
        let issued = match &self.source {
            Issuing::Local(authority) => authority.issue(&self.service, self.lifetime)?,
            Issuing::Remote(client) => {
                client
                    .renew(&self.service, self.current.load_full())
                    .await?
            }
        };
        let not_after = epoch_secs(issued.not_after);
        self.current.store(certified(issued)?);
        self.not_after.store(not_after, Ordering::Relaxed);
        self.renewals.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Where an [`Identity`] gets its certificates.
enum Issuing {
    Local(Box<Authority>),
    Remote(crate::client::IssuerClient),
}

/// A certificate for one URI that a holder of the CA key issues itself, renewed at
/// two thirds of its life when it is next presented: the issuer's own.
pub struct SelfIssued {
    authority: Arc<Authority>,
    uri: String,
    lifetime: Duration,
    current: Mutex<(Arc<CertifiedKey>, SystemTime)>,
}

impl std::fmt::Debug for SelfIssued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SelfIssued")
            .field("uri", &self.uri)
            .finish()
    }
}

impl SelfIssued {
    pub fn new(authority: Arc<Authority>, uri: &str, lifetime: Duration) -> Result<Self, CaError> {
        let first = Self::issue(&authority, uri, lifetime)?;
        Ok(SelfIssued {
            authority,
            uri: uri.to_string(),
            lifetime,
            current: Mutex::new(first),
        })
    }

    fn issue(
        authority: &Authority,
        uri: &str,
        lifetime: Duration,
    ) -> Result<(Arc<CertifiedKey>, SystemTime), CaError> {
        let key = rcgen::KeyPair::generate().map_err(|e| CaError(e.to_string()))?;
        let signed = authority.sign(&key, uri, None, lifetime)?;
        let renew_at = SystemTime::now() + lifetime * 2 / 3;
        let issued = crate::ca::Issued {
            chain: signed.chain,
            key: rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            not_after: signed.not_after,
        };
        Ok((certified(issued)?, renew_at))
    }
}

impl ResolvesServerCert for SelfIssued {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if SystemTime::now() >= current.1 {
            match Self::issue(&self.authority, &self.uri, self.lifetime) {
                Ok(next) => *current = next,
                Err(e) => {
                    tracing::warn!(error = %e, uri = %self.uri, "could not renew the certificate; the current one stays")
                }
            }
        }
        Some(current.0.clone())
    }
}

/// The name of the service a verified client chain was issued to; the mesh
/// listener's [`pillion_http::server::Identify`].
pub fn caller(chain: &[CertificateDer<'_>]) -> Option<Arc<str>> {
    chain
        .first()
        .and_then(|leaf| der::service_of(leaf))
        .map(Arc::from)
}

/// Renews at two thirds of each certificate's life, for as long as the identity is
/// used.
async fn renew(identity: std::sync::Weak<Identity>) {
    let mut wait = match identity.upgrade() {
        Some(i) => i.until_renewal(),
        None => return,
    };
    loop {
        tokio::time::sleep(wait).await;
        let Some(identity) = identity.upgrade() else {
            return;
        };
        wait = match identity.renew_now().await {
            Ok(()) => {
                tracing::info!(identity = %identity.uri(), "mesh certificate renewed");
                identity.until_renewal()
            }
            Err(e) => {
                tracing::warn!(error = %e, "mesh certificate not renewed; the current one stays");
                RETRY
                    .min(identity.remaining() / 3)
                    .max(Duration::from_secs(1))
            }
        };
    }
}

/// Reads what the issuers revoked every [`REVOCATIONS_EVERY`], for as long as the
/// identity is used; a failed read keeps the last list.
async fn follow_revocations(identity: std::sync::Weak<Identity>) {
    let mut warned = false;
    loop {
        let Some(identity) = identity.upgrade() else {
            return;
        };
        if let Issuing::Remote(client) = &identity.source {
            match client.revoked().await {
                Ok(list) => {
                    let list: std::collections::HashSet<String> =
                        list.iter().map(|id| der::revocation_id(id)).collect();
                    if **identity.revoked.load() != list {
                        tracing::info!(revoked = list.len(), "mesh revocations updated");
                        identity.revoked.store(Arc::new(list));
                    }
                    warned = false;
                }
                Err(e) if !warned => {
                    warned = true;
                    tracing::warn!(error = %e, "could not read the mesh's revocations; the last list stays");
                }
                Err(_) => {}
            }
        }
        drop(identity);
        tokio::time::sleep(REVOCATIONS_EVERY).await;
    }
}

/// Presents the current certificate, as a server and as a client.
#[derive(Debug)]
struct Presented(Arc<Identity>);

impl ResolvesServerCert for Presented {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current.load_full())
    }
}

impl ResolvesClientCert for Presented {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current.load_full())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Accepts a server certificate from the mesh CA that names one service.
#[derive(Debug)]
pub(crate) struct PeerIs {
    /// The identity URI the peer must have.
    uri: String,
    roots: Arc<RootCertStore>,
    /// Certificates refused although the CA signed them.
    revoked: Option<Revoked>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PeerIs {
    pub(crate) fn new(uri: String, roots: Arc<RootCertStore>) -> Self {
        PeerIs {
            uri,
            roots,
            revoked: None,
            algorithms: provider().signature_verification_algorithms,
        }
    }

    fn revoking(self, revoked: Revoked) -> Self {
        PeerIs {
            revoked: Some(revoked),
            ..self
        }
    }
}

impl ServerCertVerifier for PeerIs {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        if let Some(id) = self
            .revoked
            .as_ref()
            .and_then(|r| revoked_by(r, end_entity))
        {
            return Err(rustls::Error::General(format!(
                "the peer's certificate is revoked ({id})"
            )));
        }
        let uris = pillion_http::x509::uris(end_entity).unwrap_or_default();
        if uris.contains(&self.uri.as_str()) {
            return Ok(ServerCertVerified::assertion());
        }
        Err(rustls::Error::General(format!(
            "the peer is {}, not {}",
            uris.first().copied().unwrap_or("no pillion identity"),
            self.uri
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
