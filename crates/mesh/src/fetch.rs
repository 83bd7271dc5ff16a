//! One small GET over HTTP or HTTPS (the system's roots), within a deadline and a
//! size limit: how a JWKS URL is read.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

/// The largest document read.
const MAX_BODY: usize = 1 << 20;

/// Checks that `url` is an absolute `http://` or `https://` URL with a host.
pub fn check_url(url: &str) -> Result<Uri, String> {
    let uri: Uri = url.parse().map_err(|e| format!("{url:?}: {e}"))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(_)) => Ok(uri),
        _ => Err(format!(
            "{url:?}: give an http:// or https:// URL with a host"
        )),
    }
}

/// GETs `url`; the body of a 2xx answer, or what went wrong.
pub async fn get(url: &str, deadline: Duration) -> Result<Vec<u8>, String> {
    tokio::time::timeout(deadline, get_now(url))
        .await
        .map_err(|_| format!("{url}: no answer within {deadline:?}"))?
}

async fn get_now(url: &str) -> Result<Vec<u8>, String> {
    let uri = check_url(url)?;
    let tls = uri.scheme_str() == Some("https");
    let host = uri
        .host()
        .expect("checked")
        .trim_matches(['[', ']'])
        .to_string();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let request = Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(
            http::header::HOST,
            uri.authority().expect("checked").as_str(),
        )
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = if tls {
        let name = ServerName::try_from(host.clone()).map_err(|e| format!("{url}: {e}"))?;
        let stream = connector()
            .connect(name, tcp)
            .await
            .map_err(|e| format!("{url}: TLS: {e}"))?;
        send(TokioIo::new(stream), request).await
    } else {
        send(TokioIo::new(tcp), request).await
    }
    .map_err(|e| format!("{url}: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("{url}: answered {}", response.status()));
    }
    let body = Limited::new(response.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    Ok(body.to_bytes().to_vec())
}

async fn send<IO>(
    io: IO,
    request: Request<Empty<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, hyper::Error>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(conn);
    sender.send_request(request).await
}

/// A TLS client trusting the system's roots.
fn connector() -> tokio_rustls::TlsConnector {
    tokio_rustls::TlsConnector::from(Arc::new(pillion_http::tls::system_client_config()))
}
