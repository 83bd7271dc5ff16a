//! This sidecar's mesh identity: a short-lived certificate for
//! `spiffe://pillion/svc/<service>` issued by the mesh CA, renewed at two thirds of
//! its life, and the TLS configs that present it and check the peer's.
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
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    /// The service this sidecar speaks for (`--server-name`).
    pub service: String,
    /// How long each certificate it issues itself lives (`--mesh-cert-lifetime`).
    pub lifetime: Duration,
}

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
    authority: Authority,
    roots: Arc<RootCertStore>,
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
    /// Loads the CA, issues the first certificate and keeps renewing it. Must be
    /// called within a tokio runtime.
    pub fn start(config: &MeshConfig) -> Result<Arc<Identity>, CaError> {
        let authority = Authority::load(&config.ca_cert, &config.ca_key)?;
        let issued = authority.issue(&config.service, config.lifetime)?;
        let mut roots = RootCertStore::empty();
        roots
            .add(authority.cert.clone())
            .map_err(|e| CaError(format!("--mesh-ca-cert: {e}")))?;
        let identity = Arc::new(Identity {
            service: config.service.clone(),
            not_after: AtomicU64::new(epoch_secs(issued.not_after)),
            current: ArcSwap::new(certified(issued)?),
            authority,
            roots: Arc::new(roots),
            renewals: AtomicU64::new(0),
            lifetime: config.lifetime,
            connectors: Mutex::new(HashMap::new()),
        });
        tokio::spawn(renew(Arc::downgrade(&identity)));
        Ok(identity)
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
        let verifier = Arc::new(PeerIs {
            service: service.to_string(),
            roots: self.roots.clone(),
            algorithms: provider().signature_verification_algorithms,
        });
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

    /// For `/statusz`.
    pub fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "identity": self.uri(),
            "not_after_unix": self.not_after.load(Ordering::Relaxed),
            "renewals": self.renewals.load(Ordering::Relaxed),
        })
    }

    fn renew_now(&self) -> Result<(), CaError> {
        let issued = self.authority.issue(&self.service, self.lifetime)?;
        let not_after = epoch_secs(issued.not_after);
        self.current.store(certified(issued)?);
        self.not_after.store(not_after, Ordering::Relaxed);
        self.renewals.fetch_add(1, Ordering::Relaxed);
        Ok(())
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
        Some(i) => i.lifetime * 2 / 3,
        None => return,
    };
    loop {
        tokio::time::sleep(wait).await;
        let Some(identity) = identity.upgrade() else {
            return;
        };
        wait = match identity.renew_now() {
            Ok(()) => {
                tracing::info!(identity = %identity.uri(), "mesh certificate renewed");
                identity.lifetime * 2 / 3
            }
            Err(e) => {
                tracing::warn!(error = %e, "mesh certificate not renewed; the current one stays");
                RETRY.min(identity.lifetime / 3)
            }
        };
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
struct PeerIs {
    service: String,
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
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
        match der::service_of(end_entity) {
            Some(s) if s == self.service => Ok(ServerCertVerified::assertion()),
            found => Err(rustls::Error::General(format!(
                "the peer is {}, not {}",
                found.map_or("no pillion service".to_string(), |s| der::identity(&s)),
                der::identity(&self.service)
            ))),
        }
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
