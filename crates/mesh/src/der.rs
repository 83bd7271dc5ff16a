//! The mesh's identity in a certificate: a `spiffe://` URI in the subjectAltName
//! extension, read by [`pillion_http::x509`].
//!
//! Only certificates whose chain rustls has verified against the mesh CA are read
//! here, but anything unexpected is still "no identity".

use pillion_http::x509::uris;

/// The identity URI of a service: `spiffe://pillion/svc/<name>`.
pub const PREFIX: &str = "spiffe://pillion/svc/";

/// Where a certificate names the join token it was granted on.
pub const TOKEN_PREFIX: &str = "urn:pillion:token:";

/// The URI naming join token `id` in a certificate.
pub fn token_uri(id: &str) -> String {
    format!("{TOKEN_PREFIX}{id}")
}

/// An id as revocations compare it: lower case, without `:` and, for a serial,
/// without leading zeros, so that `0A:1B` (openssl's way) and `a1b` are one.
pub fn revocation_id(id: &str) -> String {
    let id: String = id
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    match id.trim_start_matches('0') {
        "" if !id.is_empty() => "0".into(),
        trimmed => trimmed.to_string(),
    }
}

/// What revokes a certificate (DER): its serial number, and the id of the join token
/// it was granted on, when it names one.
pub fn revocation_ids(cert: &[u8]) -> Vec<String> {
    let mut ids: Vec<String> = pillion_http::x509::serial(cert).into_iter().collect();
    ids.extend(token_of(cert));
    ids.iter().map(|id| revocation_id(id)).collect()
}

/// The id of the join token a certificate was granted on.
pub fn token_of(cert: &[u8]) -> Option<String> {
    uris(cert)?
        .into_iter()
        .find_map(|u| u.strip_prefix(TOKEN_PREFIX).map(str::to_string))
}

/// The identity of `service`.
pub fn identity(service: &str) -> String {
    format!("{PREFIX}{service}")
}

/// The service a certificate (DER) was issued to, from its first `spiffe://pillion/svc/`
/// URI; `None` when it has none.
pub fn service_of(cert: &[u8]) -> Option<String> {
    uris(cert)?
        .into_iter()
        .find_map(|uri| uri.strip_prefix(PREFIX).map(str::to_string))
        .filter(|name| !name.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn issued(uris: &[&str], dns: &[&str]) -> Vec<u8> {
        let mut params =
            rcgen::CertificateParams::new(dns.iter().map(|d| d.to_string()).collect::<Vec<_>>())
                .unwrap();
        for uri in uris {
            params.subject_alt_names.push(rcgen::SanType::URI(
                rcgen::string::Ia5String::try_from(*uri).unwrap(),
            ));
        }
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn reads_the_service_from_the_spiffe_uri() {
        let cert = issued(&["spiffe://pillion/svc/orders"], &["orders.local"]);
        assert_eq!(service_of(&cert).as_deref(), Some("orders"));
    }

    #[test]
    fn other_uris_and_dns_names_are_no_identity() {
        assert_eq!(service_of(&issued(&[], &["orders"])), None);
        assert_eq!(
            service_of(&issued(&["spiffe://other/svc/orders"], &[])),
            None
        );
        assert_eq!(service_of(&issued(&["spiffe://pillion/svc/"], &[])), None);
        let two = issued(
            &["https://example.com/", "spiffe://pillion/svc/billing"],
            &[],
        );
        assert_eq!(service_of(&two).as_deref(), Some("billing"));
    }

    #[test]
    fn a_certificate_cut_anywhere_is_no_identity() {
        let cert = issued(&["spiffe://pillion/svc/orders"], &[]);
        for len in 0..cert.len() {
            assert_eq!(service_of(&cert[..len]), None, "cut at {len}");
        }
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = service_of(&bytes);
        }

        #[test]
        fn a_flipped_byte_never_panics(at in 0usize..400, to in any::<u8>()) {
            let mut cert = issued(&["spiffe://pillion/svc/orders"], &[]);
            let at = at % cert.len();
            cert[at] = to;
            let _ = service_of(&cert);
        }
    }
}
