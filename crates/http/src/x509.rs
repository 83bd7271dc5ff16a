//! What pillion reads from a certificate it is handed: the names in the
//! subjectAltName extension (RFC 5280 4.2.1.6) and the validity period (4.1.2.5).
//! HTTPS listeners check a renewed certificate with it before serving it; the mesh
//! reads its identities with it, ACME its certificates.
//!
//! The reader treats its input as hostile, even a certificate whose chain rustls has
//! verified: every length is checked and anything unexpected is "nothing".

use std::time::SystemTime;

const SEQUENCE: u8 = 0x30;
const URI: u8 = 0x86; // [6] IMPLICIT IA5String in GeneralName
const DNS_NAME: u8 = 0x82; // [2] IMPLICIT IA5String in GeneralName
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;

/// The URIs in a certificate's subjectAltName extension.
pub fn uris(cert: &[u8]) -> Option<Vec<&str>> {
    alt_names(cert, URI)
}

/// The DNS names in a certificate's subjectAltName extension, in lower case.
pub fn dns_names(cert: &[u8]) -> Option<Vec<String>> {
    let names = alt_names(cert, DNS_NAME)?;
    Some(names.iter().map(|n| n.to_ascii_lowercase()).collect())
}

/// A certificate's serial number, in lower-case hex without leading zeros.
pub fn serial(cert: &[u8]) -> Option<String> {
    const INTEGER: u8 = 0x02;
    const VERSION: u8 = 0xa0; // [0] EXPLICIT, before the serial when present
    let (tag, certificate, _) = tlv(cert)?;
    expect(tag, SEQUENCE)?;
    let (tag, tbs, _) = tlv(certificate)?;
    expect(tag, SEQUENCE)?;
    let (mut tag, mut value, rest) = tlv(tbs)?;
    if tag == VERSION {
        (tag, value, _) = tlv(rest)?;
    }
    expect(tag, INTEGER)?;
    let hex: String = value.iter().map(|b| format!("{b:02x}")).collect();
    let trimmed = hex.trim_start_matches('0');
    Some(if trimmed.is_empty() {
        "0".into()
    } else {
        trimmed.into()
    })
}

/// When a certificate starts and stops being valid: the first SEQUENCE of
/// TBSCertificate that holds two times (the ones before are the algorithm and the
/// issuer, which hold an OID and SETs).
pub fn validity(cert: &[u8]) -> Option<(SystemTime, SystemTime)> {
    let (tag, certificate, _) = tlv(cert)?;
    expect(tag, SEQUENCE)?;
    let (tag, mut tbs, _) = tlv(certificate)?;
    expect(tag, SEQUENCE)?;
    while !tbs.is_empty() {
        let (tag, content, rest) = tlv(tbs)?;
        tbs = rest;
        let first = (tag == SEQUENCE).then(|| tlv(content)).flatten();
        let Some((first_tag, not_before, after)) = first else {
            continue;
        };
        if !matches!(first_tag, UTC_TIME | GENERALIZED_TIME) {
            continue;
        }
        let (second_tag, not_after, _) = tlv(after)?;
        return Some((time(first_tag, not_before)?, time(second_tag, not_after)?));
    }
    None
}

/// A UTCTime (`YYMMDDHHMMSSZ`, years 1950 to 2049) or GeneralizedTime
/// (`YYYYMMDDHHMMSSZ`), the two forms RFC 5280 allows.
fn time(tag: u8, text: &[u8]) -> Option<SystemTime> {
    let text = std::str::from_utf8(text).ok()?.strip_suffix('Z')?;
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (year, rest) = match tag {
        UTC_TIME if text.len() == 12 => {
            let yy: i64 = text[..2].parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &text[2..])
        }
        GENERALIZED_TIME if text.len() == 14 => (text[..4].parse().ok()?, &text[4..]),
        _ => return None,
    };
    let field = |at: usize| rest[at..at + 2].parse::<i64>().ok();
    let (month, day) = (field(0)?, field(2)?);
    let (hour, minute, second) = (field(4)?, field(6)?, field(8)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    let seconds = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second;
    let seconds = u64::try_from(seconds).ok()?;
    Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(seconds))
}

/// Days from 1970-01-01 to a date of the proleptic Gregorian calendar (Howard
/// Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

const OID: u8 = 0x06;

/// The names of one kind (a GeneralName tag) in a certificate's subjectAltName
/// extension.
fn alt_names(cert: &[u8], kind: u8) -> Option<Vec<&str>> {
    const EXTENSIONS: u8 = 0xa3; // [3] EXPLICIT in TBSCertificate

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
    names_in_extensions(extensions?, kind)
}

/// The names of one kind in the subjectAltName of `extensions`, the DER of an
/// `Extensions` SEQUENCE (a certificate's, or the one a certification request asks
/// for).
fn names_in_extensions(extensions: &[u8], kind: u8) -> Option<Vec<&str>> {
    const BOOLEAN: u8 = 0x01;
    const OCTET_STRING: u8 = 0x04;
    const SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11]; // 2.5.29.17

    let (tag, mut list, _) = tlv(extensions)?;
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
            if tag == kind {
                found.push(std::str::from_utf8(name).ok()?);
            }
            names = rest;
        }
        return Some(found);
    }
    Some(Vec::new())
}

/// A PKCS#10 certification request (RFC 2986), as the mesh's issuer reads one.
#[derive(Debug, PartialEq, Eq)]
pub struct Request<'a> {
    /// The DER of `certificationRequestInfo`, which the signature covers.
    pub info: &'a [u8],
    /// The DER of `subjectPKInfo`.
    pub public_key_info: &'a [u8],
    /// The URIs of the subjectAltName it asks for.
    pub uris: Vec<&'a str>,
    /// The OID (content octets) of the signature's algorithm.
    pub signature_algorithm: &'a [u8],
    /// The signature.
    pub signature: &'a [u8],
}

/// Reads a certification request (DER); `None` for anything else.
pub fn request(der: &[u8]) -> Option<Request<'_>> {
    const INTEGER: u8 = 0x02;
    const ATTRIBUTES: u8 = 0xa0; // [0] IMPLICIT SET OF Attribute
    const SET: u8 = 0x31;
    const BIT_STRING: u8 = 0x03;
    const EXTENSION_REQUEST: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x0e];

    let (tag, body, rest) = tlv(der)?;
    expect(tag, SEQUENCE)?;
    if !rest.is_empty() {
        return None;
    }
    let (tag, info_content, after_info) = tlv(body)?;
    expect(tag, SEQUENCE)?;
    let info = &body[..body.len() - after_info.len()];

    let (tag, _version, fields) = tlv(info_content)?;
    expect(tag, INTEGER)?;
    let (tag, _subject, fields) = tlv(fields)?;
    expect(tag, SEQUENCE)?;
    let (tag, _, after_key) = tlv(fields)?;
    expect(tag, SEQUENCE)?;
    let public_key_info = &fields[..fields.len() - after_key.len()];
    let mut uris = Vec::new();
    if !after_key.is_empty() {
        let (tag, mut attributes, _) = tlv(after_key)?;
        expect(tag, ATTRIBUTES)?;
        while !attributes.is_empty() {
            let (tag, attribute, rest) = tlv(attributes)?;
            expect(tag, SEQUENCE)?;
            attributes = rest;
            let (tag, oid, values) = tlv(attribute)?;
            expect(tag, OID)?;
            if oid != EXTENSION_REQUEST {
                continue;
            }
            let (tag, extensions, _) = tlv(values)?;
            expect(tag, SET)?;
            uris.extend(names_in_extensions(extensions, URI)?);
        }
    }

    let (tag, algorithm, after_algorithm) = tlv(after_info)?;
    expect(tag, SEQUENCE)?;
    let (tag, signature_algorithm, _) = tlv(algorithm)?;
    expect(tag, OID)?;
    let (tag, bits, _) = tlv(after_algorithm)?;
    expect(tag, BIT_STRING)?;
    let (&unused, signature) = bits.split_first()?;
    (unused == 0).then_some(())?;
    Some(Request {
        info,
        public_key_info,
        uris,
        signature_algorithm,
        signature,
    })
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

    fn issued(dns: &[&str]) -> Vec<u8> {
        let params =
            rcgen::CertificateParams::new(dns.iter().map(|d| d.to_string()).collect::<Vec<_>>())
                .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn reads_the_dns_names_and_the_validity() {
        // 2049 is written as a UTCTime, 2050 as a GeneralizedTime.
        for (from, to) in [
            ((2024, 2, 29), (2049, 12, 31)),
            ((1999, 3, 1), (2050, 1, 1)),
        ] {
            let mut params = rcgen::CertificateParams::new(vec![
                "Test.Example".to_string(),
                "www.test.example".to_string(),
            ])
            .unwrap();
            params.not_before = rcgen::date_time_ymd(from.0, from.1, from.2);
            params.not_after = rcgen::date_time_ymd(to.0, to.1, to.2);
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap().der().to_vec();
            let unix =
                |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64;
            let (not_before, not_after) = validity(&cert).unwrap();
            assert_eq!(unix(not_before), params.not_before.unix_timestamp());
            assert_eq!(unix(not_after), params.not_after.unix_timestamp());
            assert_eq!(
                dns_names(&cert).unwrap(),
                ["test.example", "www.test.example"]
            );
        }
    }

    #[test]
    fn a_certificate_cut_anywhere_has_no_validity() {
        let cert = issued(&["test.example"]);
        assert!(validity(&cert).is_some());
        for len in 0..cert.len() {
            assert_eq!(validity(&cert[..len]), None, "cut at {len}");
        }
    }

    fn csr(uris: &[&str]) -> (Vec<u8>, rcgen::KeyPair) {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        for uri in uris {
            params.subject_alt_names.push(rcgen::SanType::URI(
                rcgen::string::Ia5String::try_from(*uri).unwrap(),
            ));
        }
        let key = rcgen::KeyPair::generate().unwrap();
        let request = params.serialize_request(&key).unwrap();
        (request.der().to_vec(), key)
    }

    #[test]
    fn a_certification_request_reads_as_made() {
        use rcgen::PublicKeyData;
        let (der, key) = csr(&["spiffe://pillion/svc/orders", "https://x/"]);
        let request = request(&der).unwrap();
        assert_eq!(request.uris, ["spiffe://pillion/svc/orders", "https://x/"]);
        assert_eq!(request.public_key_info, key.subject_public_key_info());
        // ecdsa-with-SHA256, rcgen's default key.
        assert_eq!(
            request.signature_algorithm,
            [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02]
        );
        let public = ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_ASN1,
            key.public_key_raw(),
        );
        assert!(public.verify(request.info, request.signature).is_ok());
        // No names asked for: none read.
        assert!(super::request(&csr(&[]).0).unwrap().uris.is_empty());
        // A certificate is not a request.
        assert!(super::request(&issued(&["orders.local"])).is_none());
    }

    #[test]
    fn a_request_cut_anywhere_or_with_more_after_it_is_nothing() {
        let (der, _) = csr(&["spiffe://pillion/svc/orders"]);
        for len in 0..der.len() {
            assert_eq!(request(&der[..len]), None, "cut at {len}");
        }
        let mut longer = der.clone();
        longer.push(0);
        assert_eq!(request(&longer), None);
    }

    proptest! {
        #[test]
        fn garbage_is_no_request(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = request(&bytes);
        }

        #[test]
        fn a_request_with_a_flipped_byte_never_panics(at in 0usize..400, to in any::<u8>()) {
            let (mut der, _) = csr(&["spiffe://pillion/svc/orders"]);
            let at = at % der.len();
            der[at] = to;
            let _ = request(&der);
        }

        #[test]
        fn garbage_has_no_validity(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = validity(&bytes);
            let _ = dns_names(&bytes);
            let _ = uris(&bytes);
        }
    }
}
