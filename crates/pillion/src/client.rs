//! The client commands: `services`, `call`, `publish`, `subscribe` and `status` talk
//! to a running sidecar through its HTTP API (`--address`), as an app would.
//!
//! - [`Sidecar`]: the API as these commands see it: one base URL, the API token,
//!   one deadline for connecting and for each answer, and the one way a failure of
//!   the sidecar becomes a [`Error`] a person can act on.
//! - one function per command, printing tables (or the API's JSON with `--json`) on
//!   stdout and a single `error: ...` line on stderr.
//!
//! The API's door refuses what a browser on a foreign page sends, so these commands
//! send what an app sends: no `Origin`, the sidecar's own address as `Host`, and
//! `Content-Type: application/json` on `/rpc`. The token is sent, never printed.
//!
//! Exit codes: 0 done, 1 the sidecar refused or could not be reached, 2 the command
//! line or its input was wrong (nothing was sent).

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::header::{self, HeaderValue};
use http::{Method, Request, StatusCode};
use pillion_core::{ApiError, Service};
use pillion_http::client::ClientError;
use pillion_http::pool::Outgoing;
use pillion_http::SendError;
use serde::Deserialize;
use tokio_tungstenite::tungstenite;

use crate::cli::{CallArgs, PublishArgs, ServicesArgs, SidecarArgs, StatusArgs, SubscribeArgs};

/// A client command, parsed.
pub enum Order {
    Services(ServicesArgs),
    Call(CallArgs),
    Publish(PublishArgs),
    Subscribe(SubscribeArgs),
    Status(StatusArgs),
    Members(StatusArgs),
}

/// Runs one client command on a current-thread runtime (one connection at a time
/// needs no more) and turns its outcome into the exit code.
pub fn run(order: Order) -> ExitCode {
    let runtime = match crate::start_runtime(tokio::runtime::Builder::new_current_thread()) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let outcome = runtime.block_on(async {
        match order {
            Order::Services(a) => services(a).await,
            Order::Call(a) => call(a).await,
            Order::Publish(a) => publish(a).await,
            Order::Subscribe(a) => subscribe(a).await,
            Order::Status(a) => status(a).await,
            Order::Members(a) => members(a).await,
        }
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        // `pillion services | head -1`: the reader is gone, nothing to say.
        Err(Error::Stdout(e)) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Why a client command failed. Each says what to do about it; none contains the
/// token.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Nothing at the address speaks HTTP (refused, unreachable, no connection in
    /// time, closed without an answer).
    #[error(
        "no sidecar answers at {sidecar} ({reason}); start one with 'pillion run' or set \
         --sidecar / PILLION_SIDECAR"
    )]
    Unreachable { sidecar: SidecarUrl, reason: String },
    /// The TLS handshake failed: something answers, but is not trusted as the sidecar.
    #[error("the sidecar at {sidecar} is not trusted: {reason}")]
    Untrusted { sidecar: SidecarUrl, reason: String },
    #[error("the sidecar at {sidecar} did not answer within {} (--timeout)", pillion_core::duration::format(*.after))]
    Timeout {
        sidecar: SidecarUrl,
        after: Duration,
    },
    #[error(
        "the sidecar at {sidecar} requires an API token: set --api-token or PILLION_API_TOKEN \
         to its --api-token"
    )]
    TokenMissing { sidecar: SidecarUrl },
    #[error(
        "the sidecar at {sidecar} refused the API token: --api-token / PILLION_API_TOKEN is \
         not its --api-token"
    )]
    TokenWrong { sidecar: SidecarUrl },
    /// The sidecar (or the service called) answered with an error.
    #[error("{0}")]
    Refused(Refusal),
    #[error("no service {0}")]
    NoService(String),
    /// The sidecar's answer is not what its API promises (another program on the
    /// port, or a version that speaks differently).
    #[error("the sidecar at {sidecar} answered {what}")]
    Unexpected { sidecar: SidecarUrl, what: String },
    /// The subscription ended from the sidecar's side.
    #[error("the sidecar at {sidecar} ended the subscription: {reason}")]
    Ended { sidecar: SidecarUrl, reason: String },
    /// `pillion status` as a probe: the sidecar answered, and is not well.
    #[error("{0}")]
    Unwell(String),
    /// The command line or its input: refused before anything was sent.
    #[error("{0}")]
    Usage(String),
    #[error("writing to stdout: {0}")]
    Stdout(io::Error),
}

impl Error {
    fn exit_code(&self) -> u8 {
        match self {
            Error::Usage(_) => 2,
            _ => 1,
        }
    }
}

/// An error answer: its status, and the `{"id","code","detail","status"}` of the
/// sidecar (or of a micro-style service) when the body is one.
#[derive(Debug)]
pub struct Refusal {
    status: StatusCode,
    error: Option<ApiError>,
    /// Who answered: "the sidecar", or "service greeter".
    from: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} answered {}", self.from, self.status)?;
        if let Some(e) = &self.error {
            write!(f, ": {} ({})", e.detail, e.id)?;
        }
        Ok(())
    }
}

/// `http://host:port` or `https://host:port` (port 80/443 when left out), without a
/// path: where a sidecar's API listens.
#[derive(Debug, Clone, PartialEq)]
pub struct SidecarUrl {
    https: bool,
    /// `host:port`, `[v6]:port`.
    authority: String,
}

impl FromStr for SidecarUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (https, rest) = if let Some(rest) = s.strip_prefix("http://") {
            (false, rest)
        } else if let Some(rest) = s.strip_prefix("https://") {
            (true, rest)
        } else {
            return Err(
                "give http://HOST:PORT or https://HOST:PORT (the sidecar's --address)".into(),
            );
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.is_empty() || rest.contains(['/', '?', '#', '@', ' ']) {
            return Err("give only scheme://HOST:PORT, without a path, query or user".into());
        }
        let has_port = match rest.rsplit_once(':') {
            Some((_, port)) if !rest.ends_with(']') => {
                port.parse::<u16>()
                    .map_err(|_| format!("{port:?} is not a port"))?;
                true
            }
            _ => false,
        };
        let authority = if has_port {
            rest.to_string()
        } else {
            format!("{rest}:{}", if https { 443 } else { 80 })
        };
        http::uri::Authority::from_str(&authority).map_err(|e| format!("{authority:?}: {e}"))?;
        Ok(SidecarUrl { https, authority })
    }
}

impl fmt::Display for SidecarUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.https { "https" } else { "http" };
        write!(f, "{scheme}://{}", self.authority)
    }
}

/// A running sidecar's API, as the client commands reach it.
struct Sidecar {
    url: SidecarUrl,
    /// The API token for `Pillion-Api-Token`, marked sensitive so that no debug
    /// output shows it.
    token: Option<HeaderValue>,
    timeout: Duration,
    http: pillion_http::Client,
    /// For an https:// sidecar.
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Sidecar {
    fn new(args: &SidecarArgs) -> Result<Sidecar, Error> {
        let token = match &args.api_token {
            None => None,
            Some(token) => {
                let mut v = HeaderValue::from_str(token.trim()).map_err(|_| {
                    Error::Usage(
                        "--api-token / PILLION_API_TOKEN holds characters a header cannot carry"
                            .into(),
                    )
                })?;
                v.set_sensitive(true);
                Some(v)
            }
        };
        let timeout = args.timeout.0;
        // Only an https:// sidecar needs the system's roots (reading them costs time).
        let tls = match args.sidecar.https {
            true => Some(Arc::new(client_tls(args)?)),
            false => None,
        };
        Ok(Sidecar {
            url: args.sidecar.clone(),
            token,
            timeout,
            http: pillion_http::Client::with_tls(Default::default(), timeout, tls.clone()),
            tls,
        })
    }

    /// Sends one request to `path` (with its query) and reads the whole answer; a
    /// failure to reach the sidecar, a timeout or a 401 from its door is an error
    /// here, any other answer is the caller's to judge.
    async fn send(
        &self,
        method: Method,
        path: &str,
        json_body: Option<Bytes>,
        raw_body: Option<Bytes>,
    ) -> Result<(StatusCode, Bytes), Error> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.url));
        if let Some(token) = &self.token {
            req = req.header(pillion_sidecar::door::TOKEN_HEADER, token.clone());
        }
        let body = match (json_body, raw_body) {
            (Some(json), _) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                Some(json)
            }
            (None, raw) => raw,
        };
        let req = req
            .body(Outgoing::Full(body))
            .map_err(|e| Error::Usage(format!("cannot make a request for {path:?}: {e}")))?;
        let (status, body) = self
            .http
            .fetch(req, self.timeout)
            .await
            .map_err(|e| self.failure(e))?;
        if is_door_refusal(status, &body) {
            return Err(self.unauthorized());
        }
        Ok((status, body))
    }

    async fn get(&self, path: &str) -> Result<(StatusCode, Bytes), Error> {
        self.send(Method::GET, path, None, None).await
    }

    fn unauthorized(&self) -> Error {
        let sidecar = self.url.clone();
        match self.token {
            None => Error::TokenMissing { sidecar },
            Some(_) => Error::TokenWrong { sidecar },
        }
    }

    fn failure(&self, e: ClientError) -> Error {
        let sidecar = self.url.clone();
        match e {
            ClientError::Timeout(after) => Error::Timeout { sidecar, after },
            ClientError::BadUrl(url) => Error::Usage(format!("cannot make a request to {url}")),
            ClientError::Send(e @ SendError::Tls { .. }) => Error::Untrusted {
                sidecar,
                reason: reason(&e),
            },
            ClientError::Send(e) => Error::Unreachable {
                sidecar,
                reason: reason(&e),
            },
            ClientError::AnswerTooLarge => Error::Unexpected {
                sidecar,
                what: format!(
                    "more than {} bytes, more than this client reads",
                    pillion_http::client::MAX_ANSWER
                ),
            },
        }
    }

    /// The error of a non-2xx answer from the API itself.
    fn refused(&self, status: StatusCode, body: &[u8]) -> Error {
        Error::Refused(Refusal {
            status,
            error: api_error(body),
            from: format!("the sidecar at {}", self.url),
        })
    }
}

/// Why a send failed, in the words of the one-line error: the OS's reason for a
/// refused or unreachable connection, otherwise what happened.
fn reason(e: &SendError) -> String {
    match e {
        SendError::Connect { source, .. } if source.raw_os_error().is_some() => {
            source.kind().to_string()
        }
        SendError::Connect { source, .. } => source.to_string(),
        SendError::ConnectTimeout { after, .. } => format!(
            "no connection within {}",
            pillion_core::duration::format(*after)
        ),
        SendError::Tls { detail, .. } if detail.contains("unknown CA") => format!(
            "TLS handshake: {detail}; give the CA of its --api-tls-cert with --ca-file FILE \
             (or PILLION_CA_FILE)"
        ),
        SendError::Tls { detail, .. } => format!("TLS handshake: {detail}"),
        SendError::Closed => "it closed the connection without answering".into(),
        SendError::Protocol(detail) => format!("not an HTTP answer: {detail}"),
        other => other.to_string(),
    }
}

/// The TLS client config for an https:// sidecar: the system's roots, and the CA of
/// `--ca-file` when given.
fn client_tls(args: &SidecarArgs) -> Result<rustls::ClientConfig, Error> {
    let Some(file) = &args.ca_file else {
        return Ok(pillion_http::tls::system_client_config());
    };
    use rustls::pki_types::pem::PemObject;
    let roots: Vec<_> = rustls::pki_types::CertificateDer::pem_file_iter(file)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|e| Error::Usage(format!("--ca-file {}: {e}", file.display())))?;
    if roots.is_empty() {
        return Err(Error::Usage(format!(
            "--ca-file {}: no PEM certificate in it",
            file.display()
        )));
    }
    Ok(pillion_http::tls::client_config_trusting(&roots))
}

/// Whether the API's door refused the token (a 401 of a service called is the
/// service's own, and is shown as such).
fn is_door_refusal(status: StatusCode, body: &[u8]) -> bool {
    status == StatusCode::UNAUTHORIZED
        && api_error(body).is_some_and(|e| e.id == pillion_sidecar::door::ID)
}

/// The `{"id","code","detail","status"}` in `body`, if it is one.
fn api_error(body: &[u8]) -> Option<ApiError> {
    #[derive(Deserialize)]
    struct Shape {
        id: String,
        code: u16,
        detail: String,
    }
    let shape: Shape = serde_json::from_slice(body).ok()?;
    let status = StatusCode::from_u16(shape.code).ok()?;
    Some(ApiError::new(&shape.id, status, shape.detail))
}

/// Percent-encodes a query value (topic, queue, service name).
fn query_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~*>".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `arg`, or all of stdin when it is `-`.
fn arg_or_stdin(arg: &str, what: &str) -> Result<Vec<u8>, Error> {
    if arg != "-" {
        return Ok(arg.as_bytes().to_vec());
    }
    let mut buf = Vec::new();
    io::stdin()
        .read_to_end(&mut buf)
        .map_err(|e| Error::Usage(format!("reading the {what} from stdin: {e}")))?;
    Ok(buf)
}

fn print(text: &str) -> Result<(), Error> {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| {
            if text.ends_with('\n') || text.is_empty() {
                Ok(())
            } else {
                out.write_all(b"\n")
            }
        })
        .and_then(|()| out.flush())
        .map_err(Error::Stdout)
}

/// Columns padded to their widest cell, two spaces apart; no padding after the last.
fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let head: Vec<String> = head.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&head).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let pad = widths[i] - cell.chars().count();
                line.push_str(cell);
                line.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn metadata(m: &BTreeMap<String, String>) -> String {
    if m.is_empty() {
        return "-".into();
    }
    m.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn version(v: &str) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        v.to_string()
    }
}

async fn services(args: ServicesArgs) -> Result<(), Error> {
    let sidecar = Sidecar::new(&args.sidecar)?;
    let path = match &args.name {
        Some(name) => format!("/registry?service={}", query_value(name)),
        None => "/registry".to_string(),
    };
    let (status, body) = sidecar.get(&path).await?;
    if status == StatusCode::NOT_FOUND {
        if let Some(name) = args.name {
            return Err(Error::NoService(name));
        }
    }
    if !status.is_success() {
        return Err(sidecar.refused(status, &body));
    }
    let mut listed: Vec<Service> =
        serde_json::from_slice(&body).map_err(|e| Error::Unexpected {
            sidecar: sidecar.url.clone(),
            what: format!("a /registry that is not a list of services ({e})"),
        })?;
    // pillion's own services (the embedded broker's) are plumbing, not the user's.
    let hidden = args.name.is_none() && !args.all;
    if hidden {
        listed.retain(|s| !s.name.starts_with("pillion."));
    }
    if args.sidecar.json {
        if hidden {
            let json = serde_json::to_string(&listed).expect("services serialize");
            return print(&json);
        }
        return print(&String::from_utf8_lossy(&body));
    }
    listed.sort_by(|a, b| (&a.name, &a.version).cmp(&(&b.name, &b.version)));
    match args.name {
        None if listed.is_empty() => {
            eprintln!("no services in the registry of {}", sidecar.url);
            Ok(())
        }
        None => {
            let rows: Vec<Vec<String>> = listed
                .iter()
                .map(|s| {
                    vec![
                        s.name.clone(),
                        version(&s.version),
                        s.nodes.len().to_string(),
                    ]
                })
                .collect();
            print(&table(&["NAME", "VERSION", "NODES"], &rows))
        }
        Some(_) => {
            let mut rows = Vec::new();
            for s in &listed {
                for n in &s.nodes {
                    rows.push(vec![
                        version(&s.version),
                        n.id.clone(),
                        n.endpoint(),
                        metadata(&n.metadata),
                    ]);
                }
            }
            print(&table(&["VERSION", "ID", "ADDRESS", "METADATA"], &rows))
        }
    }
}

/// `call SERVICE GET /path [BODY]`: the app's own REST route, by name.
async fn rest(args: &CallArgs, method: Method) -> Result<(), Error> {
    let path = args.request.as_deref().unwrap_or("/");
    if !path.starts_with('/') {
        return Err(Error::Usage(format!(
            "{path:?} is not a path: write `pillion call {} {method} /users/42`",
            args.service
        )));
    }
    let body = match &args.body {
        Some(arg) => Some(Bytes::from(arg_or_stdin(arg, "body")?)),
        None => None,
    };
    let json = body
        .as_ref()
        .is_some_and(|b| serde_json::from_slice::<serde_json::Value>(b).is_ok());
    let sidecar = Sidecar::new(&args.sidecar)?;
    let target = format!("/invoke/{}{path}", args.service);
    let (status, answer) = match json {
        true => sidecar.send(method, &target, body, None).await?,
        false => sidecar.send(method, &target, None, body).await?,
    };
    answered(&sidecar, args, status, answer)
}

async fn call(args: CallArgs) -> Result<(), Error> {
    // An HTTP method in capitals: a REST call.
    if let Ok(method) = Method::from_bytes(args.method.as_bytes()) {
        if args.method.bytes().all(|b| b.is_ascii_uppercase()) {
            return rest(&args, method).await;
        }
    }
    if args.body.is_some() {
        return Err(Error::Usage(
            "a fourth argument is the body of a REST call: `pillion call SERVICE PUT /path BODY`"
                .into(),
        ));
    }
    let raw = match &args.request {
        Some(arg) => arg_or_stdin(arg, "request")?,
        None => b"{}".to_vec(),
    };
    // Refused here, so that a typo never reaches the service as a string.
    let request: serde_json::Value = serde_json::from_slice(&raw).map_err(|e| {
        Error::Usage(format!(
            "the request is not JSON ({e}); give it as '{{\"name\": \"Ada\"}}', or - to read \
             it from stdin"
        ))
    })?;
    let sidecar = Sidecar::new(&args.sidecar)?;
    let body = serde_json::json!({
        "service": args.service,
        "method": args.method,
        "request": request,
    });
    let (status, answer) = sidecar
        .send(
            Method::POST,
            "/rpc",
            Some(Bytes::from(body.to_string())),
            None,
        )
        .await?;
    answered(&sidecar, &args, status, answer)
}

/// The answer of a call: its body on stdout, or the error said as the sidecar or the
/// service said it.
fn answered(
    sidecar: &Sidecar,
    args: &CallArgs,
    status: StatusCode,
    answer: Bytes,
) -> Result<(), Error> {
    if status.is_success() {
        return print(&String::from_utf8_lossy(&answer));
    }
    let error = api_error(&answer);
    // The service's own error body (not the sidecar's shape) goes to stderr as it is.
    if error.is_none() || args.sidecar.json {
        let _ = io::stderr().write_all(&answer);
        if !answer.ends_with(b"\n") && !answer.is_empty() {
            eprintln!();
        }
    }
    let from = match &error {
        Some(e) if e.id.starts_with("pillion.") => format!("the sidecar at {}", sidecar.url),
        _ => format!("service {}", args.service),
    };
    Err(Error::Refused(Refusal {
        status,
        error,
        from,
    }))
}

async fn publish(args: PublishArgs) -> Result<(), Error> {
    let body = arg_or_stdin(&args.body, "message")?;
    let sidecar = Sidecar::new(&args.sidecar)?;
    let size = body.len();
    let path = format!("/broker?topic={}", query_value(&args.topic));
    // No Content-Type and no other header: the API makes every header a message
    // header, and the subscribers should see what the publisher meant.
    let (status, answer) = sidecar
        .send(Method::POST, &path, None, Some(Bytes::from(body)))
        .await?;
    if !status.is_success() {
        return Err(sidecar.refused(status, &answer));
    }
    if args.sidecar.json {
        return print(&String::from_utf8_lossy(&answer));
    }
    print(&format!("published {size} bytes to {}", args.topic))
}

/// One message as the websocket delivers it.
#[derive(Deserialize)]
struct Frame {
    #[serde(rename = "Body", default)]
    body: String,
}

/// After this long without a frame from the sidecar, it is pinged; no frame within
/// --timeout after that ends the subscription (the sidecar is gone).
const QUIET: Duration = Duration::from_secs(30);

async fn subscribe(args: SubscribeArgs) -> Result<(), Error> {
    let sidecar = Sidecar::new(&args.sidecar)?;
    let mut path = format!("/broker?topic={}", query_value(&args.topic));
    if let Some(q) = &args.queue {
        path.push_str(&format!("&queue={}", query_value(q)));
    }
    let mut ws = tokio::time::timeout(sidecar.timeout, open_websocket(&sidecar, &path))
        .await
        .map_err(|_| Error::Timeout {
            sidecar: sidecar.url.clone(),
            after: sidecar.timeout,
        })??;
    match args.count {
        Some(n) => eprintln!(
            "subscribed to {} at {}; {n} message(s) to go",
            args.topic, sidecar.url
        ),
        None => eprintln!(
            "subscribed to {} at {}; Ctrl-C stops",
            args.topic, sidecar.url
        ),
    }
    let ended = |reason: String| Error::Ended {
        sidecar: sidecar.url.clone(),
        reason,
    };
    let mut received = 0u64;
    let mut quiet_until = tokio::time::Instant::now() + QUIET;
    let mut pinged = false;
    let interrupt = tokio::signal::ctrl_c();
    tokio::pin!(interrupt);
    loop {
        let frame = tokio::select! {
            frame = ws.next() => frame,
            _ = &mut interrupt => {
                let _ = ws.close(None).await;
                return Ok(());
            }
            _ = tokio::time::sleep_until(quiet_until) => {
                if pinged {
                    return Err(ended(format!(
                        "no answer to a ping within {}",
                        pillion_core::duration::format(sidecar.timeout)
                    )));
                }
                let _ = ws.send(tungstenite::Message::Ping(Bytes::new())).await;
                pinged = true;
                quiet_until = tokio::time::Instant::now() + sidecar.timeout;
                continue;
            }
        };
        pinged = false;
        quiet_until = tokio::time::Instant::now() + QUIET;
        let text = match frame {
            Some(Ok(tungstenite::Message::Text(t))) => t,
            // The sidecar stops: the end of the subscription, not a failure.
            Some(Ok(tungstenite::Message::Close(Some(close))))
                if u16::from(close.code) == 1001
                    && close.reason.as_str() == pillion_broker::api::STOPPING =>
            {
                eprintln!(
                    "the sidecar at {} is stopping: the subscription ended",
                    sidecar.url
                );
                return Ok(());
            }
            Some(Ok(tungstenite::Message::Close(close))) => {
                let reason = close
                    .map(|c| format!("{} ({})", c.reason, u16::from(c.code)))
                    .unwrap_or_else(|| "closed".into());
                return Err(ended(reason));
            }
            Some(Ok(_)) => continue, // pings are answered by the library
            Some(Err(e)) => return Err(ended(e.to_string())),
            None => return Err(ended("the connection closed".into())),
        };
        if args.sidecar.json {
            print(text.as_str())?;
        } else {
            let frame: Frame =
                serde_json::from_str(text.as_str()).map_err(|e| Error::Unexpected {
                    sidecar: sidecar.url.clone(),
                    what: format!("a message frame that is not JSON ({e})"),
                })?;
            print(&message_line(&frame.body))?;
        }
        received += 1;
        if args.count.is_some_and(|n| received >= n.get()) {
            let _ = ws.close(None).await;
            return Ok(());
        }
    }
}

/// A message body for a terminal: the text when it is UTF-8 (without its final
/// newline, so one message is one line), else its base64 as delivered.
fn message_line(base64_body: &str) -> String {
    match base64::engine::general_purpose::STANDARD.decode(base64_body) {
        Ok(bytes) => match String::from_utf8(bytes) {
            Ok(text) => text.strip_suffix('\n').unwrap_or(&text).to_string(),
            Err(_) => base64_body.to_string(),
        },
        Err(_) => base64_body.to_string(),
    }
}

type Socket = tokio_tungstenite::WebSocketStream<pillion_http::stream::Stream>;

/// The websocket of a subscription: TCP, TLS for https://, then the upgrade with the
/// token. A refusal of the upgrade is the API's error answer.
async fn open_websocket(sidecar: &Sidecar, path: &str) -> Result<Socket, Error> {
    use tungstenite::client::IntoClientRequest;
    let url = &sidecar.url;
    let unreachable = |reason: String| Error::Unreachable {
        sidecar: url.clone(),
        reason,
    };
    let tcp = tokio::net::TcpStream::connect(&url.authority)
        .await
        .map_err(|e| {
            unreachable(if e.raw_os_error().is_some() {
                e.kind().to_string()
            } else {
                e.to_string()
            })
        })?;
    let _ = tcp.set_nodelay(true);
    let stream = if url.https {
        let host = url
            .authority
            .rsplit_once(':')
            .map_or(url.authority.as_str(), |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']');
        let name = rustls::pki_types::ServerName::try_from(host.to_string())
            .map_err(|e| Error::Usage(format!("--sidecar {url}: {e}")))?;
        let tls = sidecar
            .tls
            .as_deref()
            .cloned()
            .unwrap_or_else(pillion_http::tls::system_client_config);
        pillion_http::stream::Connector::new(tls, name)
            .connect(tcp, pillion_http::stream::Carry::Http1)
            .await
            .map_err(|e| {
                let detail =
                    pillion_http::tls::certificate_problem(&e).unwrap_or_else(|| e.to_string());
                Error::Untrusted {
                    sidecar: url.clone(),
                    reason: reason(&SendError::Tls {
                        authority: url.authority.clone(),
                        detail,
                    }),
                }
            })?
    } else {
        pillion_http::stream::Stream::Plain(tcp)
    };
    let scheme = if url.https { "wss" } else { "ws" };
    let mut req = format!("{scheme}://{}{path}", url.authority)
        .into_client_request()
        .map_err(|e| Error::Usage(format!("cannot make a websocket request for {path:?}: {e}")))?;
    if let Some(token) = &sidecar.token {
        req.headers_mut()
            .insert(pillion_sidecar::door::TOKEN_HEADER, token.clone());
    }
    match tokio_tungstenite::client_async(req, stream).await {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(res)) => {
            let body = res.body().as_deref().unwrap_or_default();
            if is_door_refusal(res.status(), body) {
                return Err(sidecar.unauthorized());
            }
            Err(sidecar.refused(res.status(), body))
        }
        Err(e) => Err(unreachable(format!("websocket handshake: {e}"))),
    }
}

/// What `/statusz` says that `status` shows; the rest is in `--json`.
#[derive(Deserialize, Default)]
#[serde(default)]
struct Statusz {
    version: String,
    uptime_secs: u64,
    address: String,
    registry: Backend,
    broker: Backend,
    cluster: Option<serde_json::Value>,
    services: Vec<StatuszService>,
    app: Option<AppStatus>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Backend {
    backend: String,
    healthy: bool,
    error: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct StatuszService {
    nodes: u64,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct AppStatus {
    name: String,
    node_id: String,
    address: String,
    registered: bool,
    last_health_check: Option<Check>,
    last_registry_error: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Check {
    detail: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Healthz {
    status: String,
    error: Option<String>,
    session_store: Option<Backend>,
}

async fn status(args: StatusArgs) -> Result<(), Error> {
    let sidecar = Sidecar::new(&args.sidecar)?;
    let (code, body) = sidecar.get("/statusz").await?;
    if !code.is_success() {
        return Err(sidecar.refused(code, &body));
    }
    let unexpected = |what: &str, e: serde_json::Error| Error::Unexpected {
        sidecar: sidecar.url.clone(),
        what: format!("a {what} that is not its JSON ({e})"),
    };
    let s: Statusz = serde_json::from_slice(&body).map_err(|e| unexpected("/statusz", e))?;
    // 503 is an answer too: it names what is down.
    let (_, health) = sidecar.get("/healthz").await?;
    let h: Healthz = serde_json::from_slice(&health).map_err(|e| unexpected("/healthz", e))?;
    if args.sidecar.json {
        print(&String::from_utf8_lossy(&body))?;
    } else {
        print(&status_text(&sidecar.url, &s, &h))?;
    }
    // A probe: the exit code says whether the sidecar is well, and its app registered.
    match unwell(&s, &h) {
        Some(why) => Err(Error::Unwell(format!(
            "the sidecar at {}: {why}",
            sidecar.url
        ))),
        None => Ok(()),
    }
}

/// A sidecar of the cluster, as `/statusz` lists it.
#[derive(Deserialize, serde::Serialize)]
struct Member {
    name: Option<String>,
    api: Option<String>,
    gossip: String,
    state: String,
    since_unix: u64,
}

async fn members(args: StatusArgs) -> Result<(), Error> {
    let sidecar = Sidecar::new(&args.sidecar)?;
    let (code, body) = sidecar.get("/statusz").await?;
    if !code.is_success() {
        return Err(sidecar.refused(code, &body));
    }
    let unexpected = |what: String| Error::Unexpected {
        sidecar: sidecar.url.clone(),
        what,
    };
    let s: Statusz = serde_json::from_slice(&body)
        .map_err(|e| unexpected(format!("a /statusz that is not its JSON ({e})")))?;
    let Some(cluster) = s.cluster else {
        return Err(Error::Usage(format!(
            "the sidecar at {} keeps its registry in {}, not in a cluster of sidecars: it has \
             no members (its services: pillion services)",
            sidecar.url, s.registry.backend
        )));
    };
    let members: Vec<Member> = serde_json::from_value(cluster["members"].clone())
        .map_err(|e| unexpected(format!("cluster members that are not a list ({e})")))?;
    if args.sidecar.json {
        return print(&serde_json::to_string(&members).expect("members serialize"));
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let rows: Vec<Vec<String>> = members
        .iter()
        .map(|m| {
            vec![
                m.name.clone().unwrap_or_else(|| "-".into()),
                m.api.clone().unwrap_or_else(|| "-".into()),
                m.gossip.clone(),
                m.state.clone(),
                pillion_core::duration::format(Duration::from_secs(
                    now.saturating_sub(m.since_unix),
                )),
            ]
        })
        .collect();
    print(&table(&["NAME", "API", "GOSSIP", "STATE", "AGE"], &rows))
}

/// Why a sidecar that answered is not well: `/healthz` is not ok, or the app it
/// registers is not registered.
fn unwell(s: &Statusz, h: &Healthz) -> Option<String> {
    if h.status != "ok" {
        return Some(match &h.error {
            Some(e) => format!("unhealthy: {e}"),
            None => format!("health {}", h.status),
        });
    }
    match &s.app {
        Some(app) if !app.registered => Some(format!(
            "its app {} is not registered{}",
            app.name,
            app.last_health_check
                .as_ref()
                .map(|c| format!(" (last health check {})", c.detail))
                .unwrap_or_default()
        )),
        _ => None,
    }
}

fn status_text(url: &SidecarUrl, s: &Statusz, h: &Healthz) -> String {
    let backend = |b: &Backend| {
        let mut text = format!(
            "{}, {}",
            b.backend,
            if b.healthy { "healthy" } else { "unhealthy" }
        );
        if let Some(e) = &b.error {
            text.push_str(&format!(": {e}"));
        }
        text
    };
    let mut rows: Vec<(&str, String)> = vec![
        (
            "sidecar",
            if s.address == url.authority || s.address.is_empty() {
                url.to_string()
            } else {
                format!("{url} (its --address is {})", s.address)
            },
        ),
        ("version", format!("pillion {}", s.version)),
        (
            "uptime",
            pillion_core::duration::format(Duration::from_secs(s.uptime_secs)),
        ),
        (
            "health",
            match (&h.error, &s.app) {
                (Some(e), _) => format!("{}: {e}", h.status),
                (None, Some(app)) if !app.registered => {
                    format!("{}, but its app {} is not registered", h.status, app.name)
                }
                (None, _) => h.status.clone(),
            },
        ),
        ("registry", {
            let mut text = backend(&s.registry);
            if let Some(cluster) = &s.cluster {
                let peers = cluster["peers"].as_array().map_or(0, Vec::len);
                text.push_str(&format!(
                    " ({peers} peer{})",
                    if peers == 1 { "" } else { "s" }
                ));
            }
            text
        }),
        ("broker", backend(&s.broker)),
    ];
    if let Some(store) = &h.session_store {
        rows.push((
            "sessions",
            if store.healthy {
                "store healthy".into()
            } else {
                format!("store unhealthy: {}", store.error.as_deref().unwrap_or("?"))
            },
        ));
    }
    let nodes: u64 = s.services.iter().map(|x| x.nodes).sum();
    rows.push((
        "services",
        format!(
            "{} ({nodes} node{})",
            s.services.len(),
            if nodes == 1 { "" } else { "s" }
        ),
    ));
    rows.push((
        "app",
        match &s.app {
            None => "none registered by this sidecar (--server-name)".into(),
            Some(app) => {
                let mut text = format!(
                    "{} (node {} at {}): {}",
                    app.name,
                    app.node_id,
                    app.address,
                    if app.registered {
                        "registered"
                    } else {
                        "not registered"
                    }
                );
                if let Some(check) = &app.last_health_check {
                    text.push_str(&format!(", last health check {}", check.detail));
                }
                if let Some(e) = &app.last_registry_error {
                    text.push_str(&format!(", registry error: {e}"));
                }
                text
            }
        },
    ));
    rows.iter().map(|(k, v)| format!("{k:<10}{v}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sidecar_urls_get_their_default_port_and_refuse_paths() {
        let u: SidecarUrl = "http://127.0.0.1:8081/".parse().unwrap();
        assert_eq!(u.to_string(), "http://127.0.0.1:8081");
        let u: SidecarUrl = "https://sidecar.internal".parse().unwrap();
        assert_eq!(u.to_string(), "https://sidecar.internal:443");
        let u: SidecarUrl = "http://[::1]".parse().unwrap();
        assert_eq!(u.to_string(), "http://[::1]:80");
        assert!("127.0.0.1:8081".parse::<SidecarUrl>().is_err());
        assert!("http://127.0.0.1:8081/api".parse::<SidecarUrl>().is_err());
        assert!("http://127.0.0.1:99999".parse::<SidecarUrl>().is_err());
    }

    #[test]
    fn tables_pad_every_column_but_the_last() {
        let t = table(
            &["NAME", "VERSION", "NODES"],
            &[
                vec!["greeter".into(), "1.0".into(), "2".into()],
                vec!["db".into(), "-".into(), "10".into()],
            ],
        );
        assert_eq!(
            t,
            "NAME     VERSION  NODES\ngreeter  1.0      2\ndb       -        10\n"
        );
    }

    #[test]
    fn bodies_print_as_text_or_base64() {
        assert_eq!(message_line("aGkK"), "hi");
        assert_eq!(message_line("/wA="), "/wA=");
    }

    #[test]
    fn query_values_are_escaped() {
        assert_eq!(query_value("orders.*"), "orders.*");
        assert_eq!(query_value("a b&c"), "a%20b%26c");
    }
}
