//! What `--listen` presents while ACME runs: the current certificate for every
//! handshake, and for a TLS-ALPN-01 validation (RFC 8737) the challenge certificate
//! of the name it asks for.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;
use pillion_http::tls::ACME_TLS_ALPN;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// The certificates handshakes on `--listen` get.
#[derive(Debug, Default)]
pub struct Presented {
    /// The certificate from the CA; none before the first one arrives, and then
    /// handshakes fail (a self-signed stand-in would only teach users to click
    /// through a warning).
    current: ArcSwapOption<CertifiedKey>,
    /// Challenge certificates by domain, while an order waits for validation. Locked
    /// only by validation handshakes and the order, never on the data path.
    challenges: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

impl Presented {
    pub fn set_current(&self, key: Arc<CertifiedKey>) {
        self.current.store(Some(key));
    }

    pub fn has_current(&self) -> bool {
        self.current.load().is_some()
    }

    /// Answers validations of `domain` with `key` until the returned guard is dropped.
    pub fn answer(self: &Arc<Self>, domain: &str, key: Arc<CertifiedKey>) -> Answering {
        let domain = domain.to_ascii_lowercase();
        self.pending().insert(domain.clone(), key);
        Answering {
            presented: self.clone(),
            domain,
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<CertifiedKey>>> {
        self.challenges.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ResolvesServerCert for Presented {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let validation = hello
            .alpn()
            .is_some_and(|mut offered| offered.any(|p| p == ACME_TLS_ALPN));
        if validation {
            // Only a name with a pending challenge gets an answer (RFC 8737 3).
            let name = hello.server_name()?.to_ascii_lowercase();
            return self.pending().get(&name).cloned();
        }
        self.current.load_full()
    }
}

/// A challenge being answered; dropping it (the order done, failed or cancelled)
/// stops the answer.
pub struct Answering {
    presented: Arc<Presented>,
    domain: String,
}

impl Drop for Answering {
    fn drop(&mut self) {
        self.presented.pending().remove(&self.domain);
    }
}

/// The TLS-ALPN-01 certificate of `domain` (RFC 8737 3): self-signed, the domain as
/// its only subjectAltName, and the critical acmeIdentifier extension holding
/// `digest`, the SHA-256 of the key authorization.
pub fn certificate(domain: &str, digest: &[u8]) -> Result<Arc<CertifiedKey>, String> {
    let mut params = rcgen::CertificateParams::new(vec![domain.to_string()])
        .map_err(|e| format!("the challenge certificate of {domain}: {e}"))?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let key = rcgen::KeyPair::generate().map_err(|e| format!("a challenge key: {e}"))?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| format!("the challenge certificate of {domain}: {e}"))?;
    // Not `certified`: its check parses the certificate with webpki, which refuses
    // the critical extension it does not know; the pair was just made anyway.
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| format!("a challenge key: {e}"))?;
    Ok(Arc::new(CertifiedKey::new(
        vec![cert.der().clone()],
        signer,
    )))
}

/// A chain and its key, ready for handshakes.
pub fn certified(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<CertifiedKey>, String> {
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| format!("the key: {e}"))?;
    let certified = CertifiedKey::new(chain, signer);
    certified
        .keys_match()
        .map_err(|e| format!("the key is not the certificate's: {e}"))?;
    Ok(Arc::new(certified))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Accepts any server certificate: what a validation sees is the point here, and
    /// webpki refuses the critical acmeIdentifier extension.
    #[derive(Debug)]
    struct AnyCertificate;

    impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }

        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }

    /// A TLS handshake with `addr` offering `alpn` for `name`: the stream, or why not.
    async fn handshake(
        addr: std::net::SocketAddr,
        name: &str,
        alpn: &[u8],
    ) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
        let mut config = rustls::ClientConfig::builder()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate))
            .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
        tokio::time::timeout(
            Duration::from_secs(5),
            tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp),
        )
        .await
        .map_err(|_| "no handshake within 5 s".to_string())?
        .map_err(|e| e.to_string())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_validation_gets_the_challenge_certificate_and_never_http() {
        let presented = Arc::new(Presented::default());
        let challenge = certificate("test.example", &[1; 32]).unwrap();
        let answering = presented.answer("Test.Example", challenge.clone());
        let mut config = (*pillion_http::tls::server_config(presented.clone())).clone();
        config.alpn_protocols.push(ACME_TLS_ALPN.to_vec());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = pillion_http::server::Limits {
            read_header_timeout: Duration::from_secs(5),
            read_body_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(5),
            max_connections: None,
            grace: Duration::ZERO,
            tls: Some(Arc::new(config)),
            identify: None,
            tunnel: None,
        };
        let served = Arc::new(AtomicUsize::new(0));
        let counted = served.clone();
        tokio::spawn(pillion_http::server::serve(
            listener,
            limits,
            std::future::pending(),
            move |_req, _peer| {
                counted.fetch_add(1, Ordering::Relaxed);
                std::future::ready(Ok::<_, std::convert::Infallible>(http::Response::new(
                    http_body_util::Empty::<bytes::Bytes>::new(),
                )))
            },
        ));

        let mut validation = handshake(addr, "test.example", ACME_TLS_ALPN)
            .await
            .unwrap();
        let (_, conn) = validation.get_ref();
        assert_eq!(conn.alpn_protocol(), Some(ACME_TLS_ALPN));
        assert_eq!(
            conn.peer_certificates().unwrap()[0],
            challenge.cert[0],
            "the challenge certificate"
        );
        // The listener closes the connection: a request sent anyway gets nothing.
        let _ = validation
            .write_all(b"GET / HTTP/1.1\r\nHost: test.example\r\n\r\n")
            .await;
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(5), validation.read(&mut buf))
            .await
            .expect("closed within 5 s");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        assert_eq!(served.load(Ordering::Relaxed), 0, "no request was served");

        // A name without a pending challenge gets no answer, and neither does a
        // client that wants HTTP before the first certificate arrives.
        assert!(handshake(addr, "other.example", ACME_TLS_ALPN)
            .await
            .is_err());
        assert!(handshake(addr, "test.example", b"http/1.1").await.is_err());
        // Once the order is over, the challenge is no longer answered.
        drop(answering);
        assert!(handshake(addr, "test.example", ACME_TLS_ALPN)
            .await
            .is_err());
    }

    #[test]
    fn the_challenge_certificate_names_the_domain_and_carries_the_digest() {
        let digest = [7u8; 32];
        let key = certificate("test.example", &digest).unwrap();
        let der = key.cert[0].as_ref();
        assert_eq!(
            pillion_http::x509::dns_names(der).unwrap(),
            ["test.example"],
            "the domain is the only name"
        );
        // id-pe-acmeIdentifier (1.3.6.1.5.5.7.1.31), critical, OCTET STRING of the
        // DER OCTET STRING of the digest.
        let oid = [0x06, 0x08, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x01, 0x1f];
        let mut extension = oid.to_vec();
        extension.extend([0x01, 0x01, 0xff, 0x04, 0x22, 0x04, 0x20]);
        extension.extend(digest);
        assert!(
            der.windows(extension.len()).any(|w| w == extension),
            "the acmeIdentifier extension is critical and holds the digest"
        );
    }
}
