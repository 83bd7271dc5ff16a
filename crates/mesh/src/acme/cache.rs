//! The cache directory (`--acme-cache`): the ACME account's credentials, and the
//! certificate with its key, kept across restarts so that a restart orders nothing.
//!
//! Each ACME directory has a subdirectory of its own, so a certificate from a
//! staging CA is never served once the production directory is configured, and
//! each CA keeps its own account. The directories are mode 0700, the account and
//! the key 0600; every file is written to a temporary name and renamed, so a crash
//! leaves the old file or the new one, never half of one.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use instant_acme::AccountCredentials;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use super::AcmeError;

const ACCOUNT: &str = "account.json";
const CERTIFICATE: &str = "certificate.pem";
const KEY: &str = "certificate.key";

pub struct Cache {
    dir: PathBuf,
}

/// A certificate from the CA, ready to serve.
pub struct Certificate {
    pub key: Arc<CertifiedKey>,
    /// Its DNS names, in lower case.
    pub names: Vec<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Certificate {
    /// A PEM chain (leaf first) and its PEM key.
    pub fn from_pem(chain: &[u8], key: &[u8]) -> Result<Certificate, String> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("the certificate chain: {e}"))?;
        let leaf = chain.first().ok_or("no PEM certificate in the chain")?;
        let (not_before, not_after) =
            pillion_http::x509::validity(leaf).ok_or("the certificate's validity is unreadable")?;
        let names =
            pillion_http::x509::dns_names(leaf).ok_or("the certificate's names are unreadable")?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| format!("the key: {e}"))?;
        Ok(Certificate {
            key: super::challenge::certified(chain, key)?,
            names,
            not_before,
            not_after,
        })
    }

    /// Whether it is valid for every one of `domains` (lower case).
    pub fn covers(&self, domains: &[String]) -> bool {
        domains.iter().all(|d| self.names.contains(d))
    }
}

impl Cache {
    /// The subdirectory of `root` for `directory`, made if missing.
    pub fn open(root: &Path, directory: &str) -> Result<Cache, AcmeError> {
        let dir = root.join(slug(directory));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| AcmeError::Cache {
                path: dir.clone(),
                source,
            })?;
        Ok(Cache { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The account's credentials, if an account was made before.
    pub fn account(&self) -> Result<Option<AccountCredentials>, AcmeError> {
        let path = self.dir.join(ACCOUNT);
        let Some(text) = self.read(&path)? else {
            return Ok(None);
        };
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|e| AcmeError::Cached {
                path,
                detail: format!("{e} (remove the file to make a new account)"),
            })
    }

    pub fn save_account(&self, credentials: &AccountCredentials) -> Result<(), AcmeError> {
        let json = serde_json::to_vec_pretty(credentials).map_err(|e| AcmeError::Cached {
            path: self.dir.join(ACCOUNT),
            detail: e.to_string(),
        })?;
        self.write(ACCOUNT, &json, 0o600)
    }

    /// The certificate kept by the last order, if any.
    pub fn certificate(&self) -> Result<Option<Certificate>, AcmeError> {
        let path = self.dir.join(CERTIFICATE);
        let (Some(chain), Some(key)) = (self.read(&path)?, self.read(&self.dir.join(KEY))?) else {
            return Ok(None);
        };
        Certificate::from_pem(&chain, &key)
            .map(Some)
            .map_err(|detail| AcmeError::Cached { path, detail })
    }

    pub fn save_certificate(&self, chain: &[u8], key: &[u8]) -> Result<(), AcmeError> {
        self.write(KEY, key, 0o600)?;
        self.write(CERTIFICATE, chain, 0o644)
    }

    fn read(&self, path: &Path) -> Result<Option<Vec<u8>>, AcmeError> {
        match std::fs::read(path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(AcmeError::Cache {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    fn write(&self, name: &str, bytes: &[u8], mode: u32) -> Result<(), AcmeError> {
        let (path, temporary) = (self.dir.join(name), self.dir.join(format!(".{name}.new")));
        // A leftover from a crash could have another mode, which `mode` does not change.
        let _ = std::fs::remove_file(&temporary);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&temporary)
            .and_then(|mut f| {
                f.write_all(bytes)?;
                f.sync_all()
            })
            .and_then(|()| std::fs::rename(&temporary, &path))
            .map_err(|source| AcmeError::Cache { path, source })
    }
}

/// A directory name for an ACME directory URL: its host, port and path.
fn slug(directory: &str) -> String {
    let rest = directory
        .split_once("://")
        .map_or(directory, |(_, rest)| rest);
    rest.trim_end_matches('/')
        .chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' => c,
            _ => '_',
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_directory_has_its_own_subdirectory() {
        assert_eq!(
            slug("https://acme-v02.api.letsencrypt.org/directory"),
            "acme-v02.api.letsencrypt.org_directory"
        );
        assert_eq!(slug("https://127.0.0.1:14000/dir"), "127.0.0.1_14000_dir");
        assert_eq!(slug("https://../../etc/"), ".._.._etc");
        assert_ne!(
            slug("https://acme-staging-v02.api.letsencrypt.org/directory"),
            slug("https://acme-v02.api.letsencrypt.org/directory")
        );
    }

    #[test]
    fn keys_are_written_private_and_read_back() {
        use std::os::unix::fs::PermissionsExt;
        let root = std::env::temp_dir().join(format!(
            "pillion-acme-cache-{}-{}",
            std::process::id(),
            pillion_core::id::uuid_v4()
        ));
        let cache = Cache::open(&root, "https://127.0.0.1:1/dir").unwrap();
        assert!(cache.certificate().unwrap().is_none(), "nothing yet");
        let params = rcgen::CertificateParams::new(vec!["Test.Example".to_string()]).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        cache
            .save_certificate(cert.pem().as_bytes(), key.serialize_pem().as_bytes())
            .unwrap();
        let mode = |name: &str| {
            std::fs::metadata(cache.dir().join(name))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode(KEY), 0o600);
        assert_eq!(
            std::fs::metadata(cache.dir()).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let loaded = cache.certificate().unwrap().unwrap();
        assert!(loaded.covers(&["test.example".to_string()]));
        assert!(!loaded.covers(&["test.example".to_string(), "www.test.example".to_string()]));
        // A key that is not the certificate's is refused, naming the file.
        let other = rcgen::KeyPair::generate().unwrap();
        cache
            .write(KEY, other.serialize_pem().as_bytes(), 0o600)
            .unwrap();
        let err = cache.certificate().err().unwrap().to_string();
        assert!(
            err.contains("certificate.pem") && err.contains("not the certificate's"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(root);
    }
}
