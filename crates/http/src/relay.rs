//! Relaying a message from one side to the other: hop-by-hop headers removed (RFC
//! 9110 7.6.1), and on `101 Switching Protocols` a tunnel between the caller's and the
//! node's upgraded connections.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{Either, Full};
use pillion_core::ApiError;

use crate::pool::PooledBody;

/// The id of errors this crate answers with itself.
pub const ID: &str = "pillion.http";

/// A response of the data path: the node's body, streamed, or one pillion made.
pub type ProxyBody = Either<PooledBody, Full<Bytes>>;

/// An error made by pillion, as a response of the data path.
pub fn reply(e: ApiError) -> Response<ProxyBody> {
    e.into_response()
        .map(|s| Either::Right(Full::new(Bytes::from(s))))
}

/// `res` as the caller gets it: for a gRPC call, an error pillion made is a
/// trailers-only gRPC answer ([`pillion_core::error::for_grpc`]).
pub fn to_caller(grpc: bool, res: Response<ProxyBody>) -> Response<ProxyBody> {
    if grpc {
        pillion_core::error::for_grpc(res, || Either::Right(Full::default()))
    } else {
        res
    }
}

fn bad(status: StatusCode, detail: impl Into<String>) -> Response<ProxyBody> {
    reply(ApiError::new(ID, status, detail))
}

/// Turns an upstream response into the caller's: hop-by-hop headers removed, and on
/// `101 Switching Protocols` a tunnel between the two upgraded connections.
pub fn relay(
    mut res: Response<PooledBody>,
    upgrade: Option<hyper::upgrade::OnUpgrade>,
) -> Response<ProxyBody> {
    if res.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client) = upgrade else {
            return bad(
                StatusCode::BAD_GATEWAY,
                "the node switched protocols without being asked to",
            );
        };
        let Some(node) = res.body_mut().take_upgrade() else {
            return bad(
                StatusCode::BAD_GATEWAY,
                "the node switched protocols before it had the whole request",
            );
        };
        tokio::spawn(tunnel(client, node));
        let (parts, _) = res.into_parts();
        return Response::from_parts(parts, Either::Right(Full::new(Bytes::new())));
    }
    let (mut parts, body) = res.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, Either::Left(body))
}

/// Copies bytes both ways between an upgraded client connection and node connection.
pub async fn tunnel(client: hyper::upgrade::OnUpgrade, node: crate::h1::Upgraded) {
    let client = match client.await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let mut client = hyper_util::rt::TokioIo::new(client);
    let crate::h1::Upgraded { mut io, read_ahead } = node;
    if tokio::io::AsyncWriteExt::write_all(&mut client, &read_ahead)
        .await
        .is_err()
    {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut io).await;
}

/// The request target as HTTP/1.1 sends it: `/path?query` (HTTP/2 requests arrive with
/// scheme and authority).
pub fn origin_form(uri: http::Uri) -> http::Uri {
    if uri.scheme().is_none() {
        return uri;
    }
    let pq = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    http::Uri::from(pq)
}

/// Why a request to the app failed, for its caller: whose fault, and whether the app
/// was reached at all, naming `app`.
pub fn app_failure(e: &crate::SendError, app: &str) -> String {
    use crate::Blame;
    match e.blame() {
        Blame::Caller => format!("the request was not sent whole: {e}"),
        Blame::Pillion => e.to_string(),
        Blame::Node if !e.may_have_reached_node() => {
            format!("the app at {app} is unreachable: {e}")
        }
        Blame::Node => format!("the app at {app} failed to answer: {e}"),
    }
}

/// The host a request names: its `Host`, or an h2 request's `:authority` (which an
/// HTTP/1.1 app needs as `Host`).
pub fn request_host(parts: &http::request::Parts) -> Option<HeaderValue> {
    parts.headers.get(header::HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    })
}

/// Whether a request asks to switch protocols (`Connection: upgrade` + `Upgrade`).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// The caller's headers minus hop-by-hop ones (RFC 9110 7.6.1), `Host`, and the
/// `controls` (headers meant for pillion itself). An upgrade keeps
/// `Connection: upgrade` and `Upgrade`.
pub fn outbound_headers(
    mut headers: HeaderMap,
    upgrade: bool,
    controls: &[HeaderName],
) -> HeaderMap {
    // One pass to see what is there: most requests carry none of what goes, and a
    // removal costs a hash lookup each.
    let (mut host, mut has_controls, mut te, mut has_upgrade) = (false, false, false, false);
    for name in headers.keys() {
        if name == header::HOST {
            host = true;
        } else if name == header::TE {
            te = true;
        } else if name == header::UPGRADE {
            has_upgrade = true;
        } else if controls.contains(name) {
            has_controls = true;
        }
    }
    let h2_trailers = te
        && headers
            .get(header::TE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    let upgrade_to = if has_upgrade {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    };
    strip_hop_by_hop(&mut headers);
    if host {
        headers.remove(header::HOST);
    }
    if has_controls {
        for name in controls {
            headers.remove(name);
        }
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if let Some(u) = upgrade_to {
            headers.insert(header::UPGRADE, u);
        }
    } else if has_upgrade {
        headers.remove(header::UPGRADE);
    }
    if h2_trailers {
        // gRPC needs `te: trailers`; it is the one TE value allowed end to end.
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    headers
}

/// Removes hop-by-hop headers, and those the `Connection` header lists.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Which of the fixed names are there, without allocating: most messages carry
    // one (`Connection: keep-alive`) or none.
    let mut present = 0u8;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return; // and so no Connection header listing others either
    }
    // Names the Connection header lists beyond the fixed ones (rare).
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| {
            !HOP_BY_HOP
                .iter()
                .any(|h| h.as_str().eq_ignore_ascii_case(t))
        })
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    for name in listed {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_do_not_travel() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8081"));
        h.insert("x-pillion-timeout", HeaderValue::from_static("2s"));
        h.insert("x-request-id", HeaderValue::from_static("abc"));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let out = outbound_headers(h, false, &[HeaderName::from_static("x-pillion-timeout")]);
        let names: Vec<_> = out.keys().map(|k| k.as_str()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(out.contains_key("x-request-id") && out.contains_key(header::CONTENT_TYPE));
    }
}
