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
}

/// A certificate issued to this sidecar.
pub struct Issued {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub not_after: SystemTime,
}

impl Authority {
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Authority, CaError> {
        let pem = std::fs::read_to_string(cert_file)
            .map_err(|e| CaError(format!("--mesh-ca-cert {}: {e}", cert_file.display())))?;
        let key_pem = std::fs::read_to_string(key_file)
            .map_err(|e| CaError(format!("--mesh-ca-key {}: {e}", key_file.display())))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| {
            CaError(format!(
                "--mesh-ca-key {}: not a PEM private key: {e}",
                key_file.display()
            ))
        })?;
        use rustls::pki_types::pem::PemObject;
        let cert = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| {
            CaError(format!(
                "--mesh-ca-cert {}: no PEM certificate: {e}",
                cert_file.display()
            ))
        })?;
        let authority = Authority {
            cert,
            issuer: Issuer::new(ca_params(), key),
        };
        // A key that is not the certificate's would issue certificates nobody trusts.
        authority.check_pair().map_err(|e| {
            CaError(format!(
                "--mesh-ca-key {} and --mesh-ca-cert {} are not a CA made by `pillion mesh init`: {e}",
                key_file.display(),
                cert_file.display()
            ))
        })?;
        Ok(authority)
    }

    /// A certificate for `service`, valid from now for `validity`, usable as a TLS
    /// server and client, naming `spiffe://pillion/svc/<service>`.
    pub fn issue(&self, service: &str, lifetime: Duration) -> Result<Issued, CaError> {
        let key = KeyPair::generate().map_err(|e| CaError(format!("generating a key: {e}")))?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, service);
        let uri = rcgen::string::Ia5String::try_from(crate::der::identity(service))
            .map_err(|e| CaError(format!("service name {service:?} in a URI: {e}")))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
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
        let now = SystemTime::now();
        validity(&mut params, now - BACKDATE, lifetime + BACKDATE);
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| CaError(format!("issuing for {service:?}: {e}")))?;
        Ok(Issued {
            chain: vec![cert.der().clone(), self.cert.clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            not_after: now + lifetime,
        })
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
