//! The mesh's certificate authority: `pillion mesh init` makes it, and each sidecar
//! given its files issues itself short-lived certificates with it.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CaError(pub String);

/// How long a CA made by `pillion mesh init` is valid.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Certificates start this long before they are made, for clocks a little behind.
const BACKDATE: Duration = Duration::from_secs(300);

/// Writes a new CA as `ca.crt` and `ca.key` (mode 0600) in `dir`, made if missing.
/// Existing files are never overwritten: a CA replaced by mistake would cut every
/// sidecar that uses the old one off the mesh.
pub fn init(dir: &Path) -> Result<(PathBuf, PathBuf), CaError> {
    let (cert_file, key_file) = (dir.join("ca.crt"), dir.join("ca.key"));
    for f in [&cert_file, &key_file] {
        if f.exists() {
            return Err(CaError(format!(
                "{} exists; pillion mesh init never replaces a CA (remove it first, or choose another --out)",
                f.display()
            )));
        }
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| CaError(format!("cannot create {}: {e}", dir.display())))?;
    let key = KeyPair::generate().map_err(|e| CaError(format!("generating a key: {e}")))?;
    let mut params = ca_params();
    validity(
        &mut params,
        SystemTime::now() - BACKDATE,
        CA_VALIDITY + BACKDATE,
    );
    let cert = params
        .self_signed(&key)
        .map_err(|e| CaError(format!("signing the CA: {e}")))?;
    write_private(&key_file, key.serialize_pem().as_bytes())?;
    std::fs::write(&cert_file, cert.pem())
        .map_err(|e| CaError(format!("cannot write {}: {e}", cert_file.display())))?;
    Ok((cert_file, key_file))
}

/// What a CA made by `pillion mesh init` is, to issue with: certificates name their
/// issuer by the CA's subject, which is always this one.
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "pillion mesh CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn write_private(file: &Path, bytes: &[u8]) -> Result<(), CaError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(file)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(|e| CaError(format!("cannot write {}: {e}", file.display())))
}

/// Sets a certificate's validity from `from` for `length`, in rcgen's own time type.
fn validity(params: &mut CertificateParams, from: SystemTime, length: Duration) {
    let since = from
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    params.not_before = rcgen::date_time_ymd(1970, 1, 1) + since;
    params.not_after = params.not_before + length;
}

/// A CA loaded from its files, ready to issue.
pub struct Authority {
    /// The CA certificate, which every peer's chain must lead to.
    pub cert: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    /// The same key, for join tokens.
    token_key: ring::signature::EcdsaKeyPair,
}

/// A certificate issued to this sidecar.
pub struct Issued {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub not_after: SystemTime,
}

/// A certificate issued for a key the CA never saw (a certification request's).
pub struct Signed {
    /// The leaf, then the CA.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's serial number, in hex.
    pub serial: String,
    pub not_after: SystemTime,
}

/// The public key of a certification request: an uncompressed P-256 point.
#[derive(Debug)]
pub struct RequestKey(pub Vec<u8>);

impl rcgen::PublicKeyData for RequestKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// Every certificate of a PEM file: a CA, or a bundle of them (while a CA is
/// rotated, the old and the new).
pub fn bundle(file: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    use rustls::pki_types::pem::PemObject;
    let shown = || format!("--mesh-ca-cert {}", file.display());
    let pem = std::fs::read(file).map_err(|e| CaError(format!("{}: {e}", shown())))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaError(format!("{}: {e}", shown())))?;
    if certs.is_empty() {
        return Err(CaError(format!("{}: no PEM certificate", shown())));
    }
    Ok(certs)
}

/// The roots a sidecar trusts: every certificate of `file`.
pub fn roots(file: &Path) -> Result<rustls::RootCertStore, CaError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in bundle(file)? {
        roots
            .add(cert)
            .map_err(|e| CaError(format!("--mesh-ca-cert {}: {e}", file.display())))?;
    }
    Ok(roots)
}

impl Authority {
    /// The CA of `key_file`: its certificate is the one of `cert_file` (a bundle may
    /// hold others) that the key signs for.
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Authority, CaError> {
        let certs = bundle(cert_file)?;
        let key_pem = std::fs::read_to_string(key_file)
            .map_err(|e| CaError(format!("--mesh-ca-key {}: {e}", key_file.display())))?;
        let mut last = String::new();
        for cert in certs {
            let key = KeyPair::from_pem(&key_pem).map_err(|e| {
                CaError(format!(
                    "--mesh-ca-key {}: not a PEM private key: {e}",
                    key_file.display()
                ))
            })?;
            let token_key = ring::signature::EcdsaKeyPair::from_pkcs8(
                &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                &key.serialize_der(),
                &ring::rand::SystemRandom::new(),
            )
            .map_err(|e| {
                CaError(format!(
                    "--mesh-ca-key {}: not a P-256 key, as `pillion mesh init` makes: {e}",
                    key_file.display()
                ))
            })?;
            let authority = Authority {
                cert,
                issuer: Issuer::new(ca_params(), key),
                token_key,
            };
            // A key that is not the certificate's would issue certificates nobody trusts.
            match authority.check_pair() {
                Ok(()) => return Ok(authority),
                Err(e) => last = e,
            }
        }
        Err(CaError(format!(
            "--mesh-ca-key {} and --mesh-ca-cert {} are not a CA made by `pillion mesh init`: {last}",
            key_file.display(),
            cert_file.display()
        )))
    }

    /// A certificate for `service`, valid from now for `validity`, usable as a TLS
    /// server and client, naming `spiffe://pillion/svc/<service>`, with a key made
    /// here.
    pub fn issue(&self, service: &str, lifetime: Duration) -> Result<Issued, CaError> {
        let key = KeyPair::generate().map_err(|e| CaError(format!("generating a key: {e}")))?;
        let signed = self.sign(&key, &crate::der::identity(service), None, lifetime)?;
        Ok(Issued {
            chain: signed.chain,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            not_after: signed.not_after,
        })
    }

    /// A certificate naming `uri` for `key`, valid from now for `lifetime`, usable as a
    /// TLS server and client; with `token`, it names the join token it was granted on
    /// too ([`crate::der::token_uri`]), so that revoking the token revokes it.
    pub fn sign(
        &self,
        key: &impl rcgen::PublicKeyData,
        uri: &str,
        token: Option<&str>,
        lifetime: Duration,
    ) -> Result<Signed, CaError> {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, uri.rsplit('/').next().unwrap_or(uri));
        let san = rcgen::string::Ia5String::try_from(uri)
            .map_err(|e| CaError(format!("{uri:?} in a certificate: {e}")))?;
        params.subject_alt_names = vec![SanType::URI(san)];
        if let Some(token) = token {
            let urn = rcgen::string::Ia5String::try_from(crate::der::token_uri(token))
                .map_err(|e| CaError(format!("token id {token:?} in a certificate: {e}")))?;
            params.subject_alt_names.push(SanType::URI(urn));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let mut serial = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut serial)
            .map_err(|_| CaError("no randomness for a serial number".into()))?;
        serial[0] &= 0x7f; // a positive INTEGER
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let now = SystemTime::now();
        validity(&mut params, now - BACKDATE, lifetime + BACKDATE);
        let cert = params
            .signed_by(key, &self.issuer)
            .map_err(|e| CaError(format!("issuing for {uri:?}: {e}")))?;
        Ok(Signed {
            chain: vec![cert.der().clone(), self.cert.clone()],
            serial: pillion_http::x509::serial(cert.der()).unwrap_or_default(),
            not_after: now + lifetime,
        })
    }

    /// Signs `message` (a join token) with the CA's key: ECDSA P-256 SHA-256, the
    /// fixed-length signature of JWT's ES256.
    pub fn sign_token(&self, message: &[u8]) -> Result<Vec<u8>, CaError> {
        self.token_key
            .sign(&ring::rand::SystemRandom::new(), message)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| CaError("signing a token failed".into()))
    }

    /// Whether `signature` is the CA key's ES256 signature of `message`.
    pub fn verify_token(&self, message: &[u8], signature: &[u8]) -> bool {
        use ring::signature::KeyPair as _;
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_FIXED,
            self.token_key.public_key().as_ref(),
        )
        .verify(message, signature)
        .is_ok()
    }

    fn check_pair(&self) -> Result<(), String> {
        let issued = self
            .issue("pillion-self-check", BACKDATE)
            .map_err(|e| e.0)?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.clone()).map_err(|e| e.to_string())?;
        let leaf = rustls::server::ParsedCertificate::try_from(&issued.chain[0])
            .map_err(|e| e.to_string())?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &leaf,
            &roots,
            &[],
            rustls::pki_types::UnixTime::now(),
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .all,
        )
        .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pillion-ca-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn init_writes_a_ca_that_issues_identities_and_never_overwrites() {
        let dir = temp("init");
        let (cert, key) = init(&dir).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the CA key is private");
        let again = init(&dir).unwrap_err().0;
        assert!(again.contains("never replaces a CA"), "{again}");

        let ca = Authority::load(&cert, &key).unwrap();
        let issued = ca.issue("orders", Duration::from_secs(3600)).unwrap();
        assert_eq!(
            crate::der::service_of(&issued.chain[0]).as_deref(),
            Some("orders")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_key_of_another_ca_is_refused() {
        let (one, two) = (temp("one"), temp("two"));
        let (cert, _) = init(&one).unwrap();
        let (_, other_key) = init(&two).unwrap();
        let e = Authority::load(&cert, &other_key).err().unwrap().0;
        assert!(
            e.contains("are not a CA made by `pillion mesh init`"),
            "{e}"
        );
        let e = Authority::load(&one.join("missing.crt"), &other_key)
            .err()
            .unwrap()
            .0;
        assert!(e.starts_with("--mesh-ca-cert"), "{e}");
        let _ = std::fs::remove_dir_all(&one);
        let _ = std::fs::remove_dir_all(&two);
    }
}
