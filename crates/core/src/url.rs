//! Percent-encoding of URL query components (RFC 3986 2.1): encoding for URLs pillion
//! builds from user-given names (topics, groups), and the one decoding of what callers
//! send (query strings, form bodies), which refuses bytes that are not UTF-8 instead
//! of replacing them: `?topic=%ff` must not become a topic named `\u{fffd}`.

use std::fmt::Write;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// `raw` (as sent) decodes to bytes that are not UTF-8.
    #[error(
        "{raw:?} is not UTF-8 once percent-decoded: send text as UTF-8, percent-encoded \
         byte by byte (é is %C3%A9)"
    )]
    NotUtf8 { raw: String },
    /// A query parameter given twice: which one counts would be a guess.
    #[error("query parameter {name:?} is given twice; give it once")]
    Repeated { name: String },
}

/// Decodes one `application/x-www-form-urlencoded` component: `+` is a space, `%XX`
/// a byte, and a `%` without two hex digits after it stays as it is. Bytes that are
/// not UTF-8 are an error, never replaced.
pub fn decode_component(raw: &str) -> Result<String, QueryError> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: Option<&u8>| b.and_then(|b| (*b as char).to_digit(16));
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => match (hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) {
                (Some(hi), Some(lo)) => {
                    out.push((hi * 16 + lo) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| QueryError::NotUtf8 {
        raw: raw.to_string(),
    })
}

/// The `name=value` pairs of a query string or a form body, in order, each decoded
/// with [`decode_component`].
pub fn decode_pairs(raw: &str) -> Result<Vec<(String, String)>, QueryError> {
    raw.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((decode_component(name)?, decode_component(value)?))
        })
        .collect()
}

/// The parameters of a request's query string, each given at most once.
#[derive(Debug, Default)]
pub struct Query {
    pairs: Vec<(String, String)>,
}

impl Query {
    /// Decodes `raw` (the part after `?`, if any).
    pub fn parse(raw: Option<&str>) -> Result<Query, QueryError> {
        let pairs = decode_pairs(raw.unwrap_or_default())?;
        for (i, (name, _)) in pairs.iter().enumerate() {
            if pairs[..i].iter().any(|(seen, _)| seen == name) {
                return Err(QueryError::Repeated { name: name.clone() });
            }
        }
        Ok(Query { pairs })
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Encodes every byte but the unreserved ones (`A-Z a-z 0-9 - . _ ~`), so the value
/// reads back whole as one query parameter whatever it holds (`&`, `=`, `#`, `"`,
/// spaces, non-ASCII).
pub fn encode_component(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_and_unsafe_bytes_are_encoded() {
        assert_eq!(encode_component("orders.created"), "orders.created");
        assert_eq!(encode_component("a&b=c#d"), "a%26b%3Dc%23d");
        assert_eq!(encode_component("x\" >"), "x%22%20%3E");
        assert_eq!(encode_component("é"), "%C3%A9");
        assert_eq!(encode_component("events.>"), "events.%3E");
    }

    #[test]
    fn components_decode_like_curl_sends_them_and_never_lossily() {
        assert_eq!(decode_component("a+b%20c").unwrap(), "a b c");
        assert_eq!(decode_component("%C3%A9%3d").unwrap(), "é=");
        assert_eq!(decode_component("%2").unwrap(), "%2");
        assert_eq!(decode_component("%zz%").unwrap(), "%zz%");
        assert_eq!(
            decode_component("%é").unwrap(),
            "%é",
            "no panic on non-ASCII after %"
        );
        for raw in ["%ff", "orders.%FF", "%C3", "%80abc"] {
            let e = decode_component(raw).unwrap_err();
            assert_eq!(e, QueryError::NotUtf8 { raw: raw.into() });
            assert!(
                e.to_string().contains("is not UTF-8 once percent-decoded"),
                "{e}"
            );
        }
        for raw in ["", "a", "%41", "é", "a b+c&d"] {
            assert_eq!(decode_component(&encode_component(raw)).unwrap(), raw);
        }
    }

    #[test]
    fn a_form_decodes_like_curl_sends_it() {
        let pairs = decode_pairs(
            "service=go.micro.srv.example&method=Example.Call&request=%7B%22name%22%3A+%22John%22%7D",
        )
        .unwrap();
        assert_eq!(
            pairs,
            [
                ("service".into(), "go.micro.srv.example".into()),
                ("method".into(), "Example.Call".into()),
                ("request".into(), "{\"name\": \"John\"}".into()),
            ]
        );
        assert!(decode_pairs("service=%ff&method=M").is_err());
    }

    #[test]
    fn a_query_names_each_parameter_once() {
        let q = Query::parse(Some("topic=a.b&queue=&publish")).unwrap();
        assert_eq!(q.get("topic"), Some("a.b"));
        assert_eq!(q.get("queue"), Some(""));
        assert_eq!(q.get("publish"), Some(""));
        assert_eq!(q.get("other"), None);
        assert!(Query::parse(None).unwrap().get("topic").is_none());
        assert_eq!(
            Query::parse(Some("topic=a&topic=b"))
                .unwrap_err()
                .to_string(),
            "query parameter \"topic\" is given twice; give it once"
        );
        assert!(matches!(
            Query::parse(Some("topic=%ff")),
            Err(QueryError::NotUtf8 { .. })
        ));
    }
}
