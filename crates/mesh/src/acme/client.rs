//! The HTTP client instant-acme talks to the CA with: pillion's one HTTP client
//! (kept-alive connections, answers read up to its bound) over TLS trusting the
//! system's roots plus `--acme-ca-root`, and a deadline on each request, body
//! included.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use instant_acme::{BodyWrapper, BytesResponse, HttpClient};
use pillion_http::pool::Outgoing;
use rustls::pki_types::CertificateDer;

/// How long one request to the CA may take, from connect to the end of the body.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct Client {
    http: Arc<pillion_http::Client>,
}

impl Client {
    /// A client trusting the system's roots and `extra`.
    pub fn new(extra: Option<CertificateDer<'static>>) -> Client {
        let tls = pillion_http::tls::client_config_trusting(extra.as_slice());
        Client {
            http: Arc::new(pillion_http::Client::with_tls(
                Default::default(),
                REQUEST_DEADLINE,
                Some(Arc::new(tls)),
            )),
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
        let http = self.http.clone();
        Box::pin(async move {
            let url = req.uri().to_string();
            send(&http, req)
                .await
                .map_err(|e| failed(format!("{url}: {e}")))
        })
    }
}

async fn send(
    http: &pillion_http::Client,
    req: Request<BodyWrapper<Bytes>>,
) -> Result<BytesResponse, String> {
    if req.uri().scheme_str() != Some("https") {
        return Err("an ACME directory is reached over https:// only".into());
    }
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(never) => match never {},
    };
    let method = parts.method.clone();
    let answer = http
        .fetch_response(
            Request::from_parts(parts, Outgoing::full(body)),
            REQUEST_DEADLINE,
        )
        .await
        .map_err(|e| pillion_http::describe(&e))?;
    // The directory is the only plain GET; any other answer to it is no directory.
    // (Answers to POSTs that are not 2xx are problem documents instant-acme reads.)
    if method == http::Method::GET && !answer.status().is_success() {
        return Err(format!(
            "answered {}, not an ACME directory",
            answer.status()
        ));
    }
    Ok(BytesResponse::from(answer.map(Full::new)))
}
