//! The HTTP client instant-acme talks to the CA with: one HTTP/1.1 connection over
//! TLS per request (an order is a dozen requests, days apart), the system's roots
//! plus `--acme-ca-root`, and a deadline on each request, body included.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use instant_acme::{BodyWrapper, BytesResponse, HttpClient};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

/// How long one request to the CA may take, from connect to the end of the body.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(30);

/// The largest answer read (a certificate chain is a few kilobytes).
const MAX_BODY: usize = 1 << 20;

#[derive(Clone)]
pub struct Client {
    tls: tokio_rustls::TlsConnector,
}

impl Client {
    /// A client trusting the system's roots and `extra`.
    pub fn new(extra: Option<CertificateDer<'static>>) -> Client {
        let mut config = pillion_http::tls::client_config_trusting(extra.as_slice());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Client {
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
        }
    }
}

/// A failure of the client, as instant-acme carries it.
fn failed(message: String) -> instant_acme::Error {
    instant_acme::Error::Other(message.into())
}

impl HttpClient for Client {
    fn request(
        &self,
        req: Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let tls = self.tls.clone();
        Box::pin(async move {
            let url = req.uri().to_string();
            match tokio::time::timeout(REQUEST_DEADLINE, send(tls, req)).await {
                Ok(answer) => answer.map_err(|e| failed(format!("{url}: {e}"))),
                Err(_) => Err(failed(format!(
                    "{url}: no answer within {}",
                    pillion_core::duration::format(REQUEST_DEADLINE)
                ))),
            }
        })
    }
}

async fn send(
    tls: tokio_rustls::TlsConnector,
    req: Request<BodyWrapper<Bytes>>,
) -> Result<BytesResponse, String> {
    let (mut parts, body) = req.into_parts();
    let uri = parts.uri.clone();
    if uri.scheme_str() != Some("https") {
        return Err("an ACME directory is reached over https:// only".into());
    }
    let authority = uri.authority().ok_or("the URL has no host")?.clone();
    let host = authority.host().trim_matches(['[', ']']).to_string();
    let port = authority.port_u16().unwrap_or(443);
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from(host).map_err(|e| e.to_string())?;
    let stream = tls
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    // Ends when the answer is read and `sender` is dropped.
    tokio::spawn(conn);
    // HTTP/1.1 sends the path, and the authority as Host.
    parts.uri = uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .parse()
        .map_err(|e: http::uri::InvalidUri| e.to_string())?;
    parts.headers.insert(
        http::header::HOST,
        authority
            .as_str()
            .parse()
            .map_err(|e: http::header::InvalidHeaderValue| e.to_string())?,
    );
    let method = parts.method.clone();
    let answer = sender
        .send_request(Request::from_parts(parts, body))
        .await
        .map_err(|e| e.to_string())?;
    let (parts, body) = answer.into_parts();
    // The directory is the only plain GET; any other answer to it is no directory.
    // (Answers to POSTs that are not 2xx are problem documents instant-acme reads.)
    if method == http::Method::GET && !parts.status.is_success() {
        return Err(format!("answered {}, not an ACME directory", parts.status));
    }
    let body = Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?
        .to_bytes();
    Ok(BytesResponse::from(Response::from_parts(
        parts,
        Full::new(body),
    )))
}
