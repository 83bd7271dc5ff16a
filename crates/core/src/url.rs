//! Percent-encoding of URL query components (RFC 3986 2.1), for URLs pillion builds
//! from user-given names (topics, groups).

use std::fmt::Write;

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
}
