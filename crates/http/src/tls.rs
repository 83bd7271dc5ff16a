//! HTTPS on a listener from certificate files that are read again when they change.
//!
//! [`CertFiles::watch`] loads a PEM certificate chain and key into a [`Certificates`]
//! resolver and polls the files; a change (a renewal by certbot, a Kubernetes secret
//! update) is loaded and used for the next handshakes, while connections already
//! made keep theirs. A file that does not load (half written, a key that does not
//! match), a certificate already expired, or one that no longer names every DNS name
//! of the certificate served at start, is refused: logged, shown by
//! [`Certificates::status`] (in `/statusz`), and the certificate in use stays. A bad
//! renewal never takes HTTPS down, nor goes unnoticed.
//!
//! The names a listener must keep serving are those of its first certificate: a
//! `--listen` address is an IP and pillion knows no host names of its own, so that
//! certificate is the operator's word on them. Serving other names takes a restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
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
    /// The flags that gave them, as messages name them: `--tls` (for `--tls-cert`,
    /// `--tls-key`) or `--api-tls`.
    pub flags: &'static str,
}

impl CertFiles {
    /// `--tls-cert FILE`, for messages.
    fn shown_cert(&self) -> String {
        format!("{}-cert {}", self.flags, self.cert.display())
    }

    /// `--tls-key FILE`, for messages.
    fn shown_key(&self) -> String {
        format!("{}-key {}", self.flags, self.key.display())
    }

    /// Reads and checks both files.
    pub fn load(&self) -> Result<Arc<CertifiedKey>, TlsError> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&self.cert)
            .and_then(|certs| certs.collect::<Result<_, _>>())
            .map_err(|e| TlsError(format!("{}: {e}", self.shown_cert())))?;
        if chain.is_empty() {
            return Err(TlsError(format!(
                "{}: no PEM certificate in it",
                self.shown_cert()
            )));
        }
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .map_err(|e| TlsError(format!("{}: {e}", self.shown_key())))?;
        let signer = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| TlsError(format!("{}: {e}", self.shown_key())))?;
        let certified = CertifiedKey::new(chain, signer);
        certified.keys_match().map_err(|e| {
            TlsError(format!(
                "{} is not the key of {}: {e}",
                self.shown_key(),
                self.shown_cert()
            ))
        })?;
        Ok(Arc::new(certified))
    }

    /// Loads the files and keeps following them every `period`, for as long as the
    /// returned resolver is used. Must be called within a tokio runtime.
    pub fn watch(&self, period: Duration) -> Result<Arc<Certificates>, TlsError> {
        let key = self.load()?;
        let current = Arc::new(Certificates {
            names: leaf_names(&key),
            key: ArcSwap::new(key),
            files: self.clone(),
            refused: Mutex::new(None),
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
                match files.load().map_err(Refusal::Unloadable).and_then(|key| {
                    current.check(&key, SystemTime::now())?;
                    Ok(key)
                }) {
                    Ok(key) => {
                        current.key.store(key);
                        current.set_refused(None);
                        seen = stamp;
                        tracing::info!(cert = %files.cert.display(), "TLS certificate reloaded");
                    }
                    Err(refusal) => {
                        tracing::warn!(error = %refusal, "TLS certificate not reloaded; the previous one stays");
                        // Half-written files are looked at again; a whole certificate
                        // that is wrong only when the files change again.
                        if !matches!(refusal, Refusal::Unloadable(_)) {
                            seen = stamp;
                        }
                        current.set_refused(Some(refusal.to_string()));
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

/// Why a renewed certificate is not served.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error(transparent)]
    Unloadable(TlsError),
    #[error("{cert}: {detail}")]
    Unreadable { cert: String, detail: &'static str },
    #[error("{cert}: expired on {}", httpdate::fmt_http_date(*not_after))]
    Expired { cert: String, not_after: SystemTime },
    #[error("{cert}: not for {} (it names {}); the listener serves the names of the certificate it started with (restart pillion to change them)", missing.join(", "), if names.is_empty() { "no DNS name".to_string() } else { names.join(", ") })]
    OtherNames {
        cert: String,
        missing: Vec<String>,
        names: Vec<String>,
    },
}

/// The certificate handshakes use now, and the files it comes from.
#[derive(Debug)]
pub struct Certificates {
    key: ArcSwap<CertifiedKey>,
    files: CertFiles,
    /// The DNS names of the certificate served at start: every renewal must keep them.
    names: Vec<String>,
    /// Why the files on disk are not what is served, while they are not.
    refused: Mutex<Option<String>>,
}

/// What [`Certificates::status`] says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateStatus {
    pub cert: PathBuf,
    /// The DNS names of the certificate served.
    pub names: Vec<String>,
    /// When the certificate served expires, if that can be read.
    pub not_after: Option<SystemTime>,
    /// Why the files' current content is not served, if it is not.
    pub refused: Option<String>,
}

impl Certificates {
    /// What is served, and why a renewal was refused.
    pub fn status(&self) -> CertificateStatus {
        let key = self.key.load();
        CertificateStatus {
            cert: self.files.cert.clone(),
            names: leaf_names(&key),
            not_after: key
                .end_entity_cert()
                .ok()
                .and_then(|leaf| crate::x509::validity(leaf))
                .map(|(_, not_after)| not_after),
            refused: self
                .refused
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }

    /// Whether a renewed `key` may replace the one served, at `now`.
    fn check(&self, key: &CertifiedKey, now: SystemTime) -> Result<(), Refusal> {
        let cert = self.files.shown_cert();
        let leaf = key.end_entity_cert().map_err(|_| Refusal::Unreadable {
            cert: cert.clone(),
            detail: "no certificate in it",
        })?;
        let (_, not_after) = crate::x509::validity(leaf).ok_or(Refusal::Unreadable {
            cert: cert.clone(),
            detail: "its validity cannot be read",
        })?;
        if not_after <= now {
            return Err(Refusal::Expired { cert, not_after });
        }
        let names = crate::x509::dns_names(leaf).ok_or(Refusal::Unreadable {
            cert: cert.clone(),
            detail: "its names cannot be read",
        })?;
        let missing: Vec<String> = self
            .names
            .iter()
            .filter(|n| !names.contains(n))
            .cloned()
            .collect();
        if !missing.is_empty() {
            return Err(Refusal::OtherNames {
                cert,
                missing,
                names,
            });
        }
        Ok(())
    }

    fn set_refused(&self, why: Option<String>) {
        *self.refused.lock().unwrap_or_else(|e| e.into_inner()) = why;
    }
}

/// The DNS names of a certificate's leaf; none when they cannot be read.
fn leaf_names(key: &CertifiedKey) -> Vec<String> {
    key.end_entity_cert()
        .ok()
        .and_then(|leaf| crate::x509::dns_names(leaf))
        .unwrap_or_default()
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

/// A failed handshake in plain words when the peer's certificate is the cause: not
/// signed by a trusted CA, not for the name dialled, expired or not valid yet.
/// `None` for every other failure.
pub fn certificate_problem(e: &std::io::Error) -> Option<String> {
    use rustls::CertificateError as C;
    let rustls::Error::InvalidCertificate(problem) =
        e.get_ref()?.downcast_ref::<rustls::Error>()?
    else {
        return None;
    };
    Some(match problem {
        C::UnknownIssuer => {
            "its certificate is signed by a CA this side does not trust (unknown CA)".into()
        }
        C::NotValidForName | C::NotValidForNameContext { .. } => {
            format!("its certificate is not for the name dialled (wrong name: {problem})")
        }
        C::Expired | C::ExpiredContext { .. } => {
            format!("its certificate has expired ({problem})")
        }
        C::NotValidYet | C::NotValidYetContext { .. } => {
            format!("its certificate is not valid yet ({problem})")
        }
        other => format!("its certificate was refused: {other}"),
    })
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
