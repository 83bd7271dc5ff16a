//! What the crate's unit tests share: well-formed requests of every framing, and a
//! peer that sends its bytes in any split.

use proptest::prelude::*;
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// A generated request, and what it is made of.
#[derive(Debug, Clone)]
pub(crate) struct Generated {
    pub bytes: Vec<u8>,
    pub method: &'static str,
    pub target: String,
    /// Its fields as sent (names in lower case), `host` and the framing included.
    pub fields: Vec<(String, String)>,
    /// The body, without its framing.
    pub body: Vec<u8>,
    pub trailers: Vec<(String, String)>,
}

/// A well-formed HTTP/1.1 request: any method, target and fields, and no body, a
/// `Content-Length` one, or a chunked one with extensions and maybe trailers.
pub(crate) fn request() -> impl Strategy<Value = Generated> {
    let method = prop::sample::select(vec!["GET", "POST", "PUT", "DELETE", "PATCH"]);
    let target = "/[a-z0-9/?=&.%-]{0,20}";
    let fields = prop::collection::vec(("x-[a-z]{1,8}", "[ -~]{0,20}"), 0..4);
    let body = prop_oneof![
        Just(None),
        prop::collection::vec(any::<u8>(), 0..300).prop_map(|b| Some((false, vec![b]))),
        prop::collection::vec(prop::collection::vec(any::<u8>(), 1..100), 0..4)
            .prop_map(|c| Some((true, c))),
    ];
    (method, target, fields, body, any::<bool>()).prop_map(
        |(method, target, fields, body, trailer)| {
            let mut fields: Vec<(String, String)> = fields
                .into_iter()
                .map(|(k, v)| (k, v.trim().to_string()))
                .collect();
            fields.push(("host".into(), "x".into()));
            let mut bytes = format!("{method} {target} HTTP/1.1\r\n").into_bytes();
            let mut data = Vec::new();
            let mut trailers = Vec::new();
            let mut tail = Vec::new();
            match body {
                None => {}
                Some((false, parts)) => {
                    data = parts[0].clone();
                    fields.push(("content-length".into(), data.len().to_string()));
                    tail = data.clone();
                }
                Some((true, chunks)) => {
                    fields.push(("transfer-encoding".into(), "chunked".into()));
                    for c in chunks {
                        tail.extend_from_slice(format!("{:x};ext=1\r\n", c.len()).as_bytes());
                        tail.extend_from_slice(&c);
                        tail.extend_from_slice(b"\r\n");
                        data.extend_from_slice(&c);
                    }
                    tail.extend_from_slice(b"0\r\n");
                    if trailer {
                        tail.extend_from_slice(b"x-sum: 1\r\n");
                        trailers.push(("x-sum".to_string(), "1".to_string()));
                    }
                    tail.extend_from_slice(b"\r\n");
                }
            }
            for (k, v) in &fields {
                bytes.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
            }
            bytes.extend_from_slice(b"\r\n");
            bytes.extend_from_slice(&tail);
            Generated {
                bytes,
                method,
                target,
                fields,
                body: data,
                trailers,
            }
        },
    )
}

/// Cases per property for the framing tests of the server and of `heads`: a fiftieth
/// of `H1_PROP_CASES` (which sizes the client's properties), at least 100; 1,000 by
/// default.
pub(crate) fn framing_cases() -> u32 {
    std::env::var("H1_PROP_CASES")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .map_or(1_000, |n| (n / 50).max(100))
}

/// Where `cuts` (any numbers) cut an input of `len` bytes: sorted offsets, the last
/// one `len`.
pub(crate) fn cut_points(len: usize, cuts: &[usize]) -> Vec<usize> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (len + 1)).collect();
    points.push(len);
    points.sort_unstable();
    points
}

/// Writes `input` in the pieces `cuts` makes, letting the reader run between them;
/// false if the reader went away first.
pub(crate) async fn write_in_pieces<W: AsyncWrite + Unpin>(
    to: &mut W,
    input: &[u8],
    cuts: &[usize],
) -> bool {
    let mut at = 0;
    for p in cut_points(input.len(), cuts) {
        if to.write_all(&input[at..p]).await.is_err() {
            return false;
        }
        at = p;
        tokio::task::yield_now().await;
    }
    true
}
