//! The one thing the mesh reads from a certificate: its `spiffe://` identity, a URI
//! in the subjectAltName extension (RFC 5280 4.2.1.6).
//!
//! Only certificates whose chain rustls has verified against the mesh CA are read
//! here, but the reader still treats its input as hostile: every length is checked
//! and anything unexpected is "no identity".

/// The identity URI of a service: `spiffe://pillion/svc/<name>`.
pub const PREFIX: &str = "spiffe://pillion/svc/";

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

/// The URIs in a certificate's subjectAltName extension.
fn uris(cert: &[u8]) -> Option<Vec<&str>> {
    const SEQUENCE: u8 = 0x30;
    const EXTENSIONS: u8 = 0xa3; // [3] EXPLICIT in TBSCertificate
    const OID: u8 = 0x06;
    const BOOLEAN: u8 = 0x01;
    const OCTET_STRING: u8 = 0x04;
    const URI: u8 = 0x86; // [6] IMPLICIT IA5String in GeneralName
    const SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11]; // 2.5.29.17

    let (tag, certificate, _) = tlv(cert)?;
    expect(tag, SEQUENCE)?;
    let (tag, mut tbs, _) = tlv(certificate)?;
    expect(tag, SEQUENCE)?;
    let mut extensions = None;
    while !tbs.is_empty() {
        let (tag, content, rest) = tlv(tbs)?;
        if tag == EXTENSIONS {
            extensions = Some(content);
        }
        tbs = rest;
    }
    let (tag, mut list, _) = tlv(extensions?)?;
    expect(tag, SEQUENCE)?;
    while !list.is_empty() {
        let (tag, extension, rest) = tlv(list)?;
        expect(tag, SEQUENCE)?;
        list = rest;
        let (tag, oid, mut fields) = tlv(extension)?;
        expect(tag, OID)?;
        if oid != SUBJECT_ALT_NAME {
            continue;
        }
        let (mut tag, mut value, after) = tlv(fields)?;
        if tag == BOOLEAN {
            fields = after;
            (tag, value, _) = tlv(fields)?;
        }
        expect(tag, OCTET_STRING)?;
        let (tag, mut names, _) = tlv(value)?;
        expect(tag, SEQUENCE)?;
        let mut found = Vec::new();
        while !names.is_empty() {
            let (tag, name, rest) = tlv(names)?;
            if tag == URI {
                found.push(std::str::from_utf8(name).ok()?);
            }
            names = rest;
        }
        return Some(found);
    }
    Some(Vec::new())
}

fn expect(tag: u8, wanted: u8) -> Option<()> {
    (tag == wanted).then_some(())
}

/// One DER element: its tag, its content and what follows it. Only single-byte tags
/// and definite lengths of up to four bytes, which is all a certificate uses.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None; // a multi-byte tag
    }
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        first as usize
    } else {
        let bytes = (first & 0x7f) as usize;
        if bytes == 0 || bytes > 4 || rest.len() < bytes {
            return None;
        }
        let (len, after) = rest.split_at(bytes);
        rest = after;
        len.iter().fold(0usize, |n, &b| (n << 8) | b as usize)
    };
    if rest.len() < len {
        return None;
    }
    let (content, after) = rest.split_at(len);
    Some((tag, content, after))
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
