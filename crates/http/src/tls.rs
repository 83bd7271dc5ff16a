//! HTTPS on a listener from certificate files that are read again when they change.
//!
//! [`CertFiles::watch`] loads a PEM certificate chain and key into a [`Certificates`]
//! resolver and polls the files; a change (a renewal by certbot, a Kubernetes secret
//! update) is loaded and used for the next handshakes, while connections already
//! made keep theirs. A file that does not load (half written, a key that does not
//! match) is logged and the certificate in use stays: a bad renewal never takes
//! HTTPS down.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(pub String);

/// A certificate chain and its key, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertFiles {
    /// Reads and checks both files.
    pub fn load(&self) -> Result<Arc<CertifiedKey>, TlsError> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&self.cert)
            .and_then(|certs| certs.collect::<Result<_, _>>())
            .map_err(|e| TlsError(format!("--tls-cert {}: {e}", self.cert.display())))?;
        if chain.is_empty() {
            return Err(TlsError(format!(
                "--tls-cert {}: no PEM certificate in it",
                self.cert.display()
            )));
        }
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .map_err(|e| TlsError(format!("--tls-key {}: {e}", self.key.display())))?;
        let signer = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| TlsError(format!("--tls-key {}: {e}", self.key.display())))?;
        let certified = CertifiedKey::new(chain, signer);
        certified.keys_match().map_err(|e| {
            TlsError(format!(
                "--tls-key {} is not the key of --tls-cert {}: {e}",
                self.key.display(),
                self.cert.display()
            ))
        })?;
        Ok(Arc::new(certified))
    }

    /// Loads the files and keeps following them every `period`, for as long as the
    /// returned resolver is used. Must be called within a tokio runtime.
    pub fn watch(&self, period: Duration) -> Result<Arc<Certificates>, TlsError> {
        let current = Arc::new(Certificates {
            key: ArcSwap::new(self.load()?),
        });
        let files = self.clone();
        let weak = Arc::downgrade(&current);
        tokio::spawn(async move {
            let mut seen = files.stamp();
            loop {
                tokio::time::sleep(period).await;
                let Some(current) = weak.upgrade() else {
                    return;
                };
                let stamp = files.stamp();
                if stamp == seen {
                    continue;
                }
                match files.load() {
                    Ok(key) => {
                        current.key.store(key);
                        seen = stamp;
                        tracing::info!(cert = %files.cert.display(), "TLS certificate reloaded");
                    }
                    // Retried at the next look: the files may be half written.
                    Err(e) => {
                        tracing::warn!(error = %e, "TLS certificate not reloaded; the previous one stays")
                    }
                }
            }
        });
        Ok(current)
    }

    /// What changes when either file is replaced or rewritten.
    fn stamp(&self) -> [Option<(SystemTime, u64)>; 2] {
        let of = |p: &Path| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        };
        [of(&self.cert), of(&self.key)]
    }
}

/// The certificate handshakes use now.
#[derive(Debug)]
pub struct Certificates {
    key: ArcSwap<CertifiedKey>,
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.key.load_full())
    }
}

/// ALPN of a TLS-ALPN-01 validation (RFC 8737): the handshake is all the ACME server
/// wants, and the listener closes the connection after it.
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// A server config for HTTPS with `certificates` (files, or ACME's), offering h2 and
/// HTTP/1.1.
pub fn server_config(certificates: Arc<dyn ResolvesServerCert>) -> Arc<rustls::ServerConfig> {
    // One process-wide crypto provider; another part of pillion may have set it.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_cert_resolver(certificates);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}

/// A TLS client config trusting the system's roots, or the PEM file named by
/// `SSL_CERT_FILE` (the engines reached over TLS: etcd, a JWKS URL).
pub fn system_client_config() -> rustls::ClientConfig {
    client_config_trusting(&[])
}

/// [`system_client_config`] that also trusts `extra` (a test CA's root).
pub fn client_config_trusting(extra: &[CertificateDer<'static>]) -> rustls::ClientConfig {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    for cert in extra {
        let _ = roots.add(cert.clone());
    }
    rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth()
}
