//! Certificates for HTTPS on `--listen` from an ACME CA (RFC 8555, Let's Encrypt by
//! default), each name validated by TLS-ALPN-01 (RFC 8737) on that same listener:
//! no other port to open, no DNS API to give keys to.
//!
//! - [`Acme`] owns the lifecycle. At start it serves the cached certificate when it
//!   is valid for the domains. In the background, once the listener accepts (the CA
//!   must reach it), it orders one when there is none or the one served is due, and
//!   when an order fails the old certificate keeps serving while it retries with
//!   backoff. Its state is in `/statusz`.
//! - [`challenge`]: what handshakes on `--listen` get: the certificate, or a
//!   challenge certificate for a validation.
//! - [`cache`]: the account and the certificate on disk, across restarts.
//! - [`client`]: the HTTP client that talks to the CA, a deadline on each request.
//! - [`schedule`]: when to renew and when to retry, as pure functions.
//!
//! Using it agrees to the CA's terms of service on the operator's behalf, as the
//! account is made without asking.

pub mod cache;
pub mod challenge;
pub mod client;
pub mod schedule;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use instant_acme::{
    Account, AuthorizationStatus, ChallengeType, HttpClient, Identifier, NewAccount, NewOrder,
    Order, OrderStatus, RetryPolicy,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use cache::{Cache, Certificate};
use challenge::Presented;

/// Let's Encrypt's production directory, the default of `--acme-directory`.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// How long one order may take, from the directory to the certificate.
const ORDER_DEADLINE: Duration = Duration::from_secs(300);

/// How long the CA may take to validate the names, and then to issue.
const CA_DEADLINE: Duration = Duration::from_secs(120);

/// What `--acme-*` configure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeConfig {
    /// The names of the certificate, in lower case.
    pub domains: Vec<String>,
    pub directory: String,
    pub email: Option<String>,
    pub cache: PathBuf,
    /// A root trusted besides the system's for the directory (a test CA).
    pub ca_root: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    /// The cache directory or one of its files could not be read or written.
    #[error("--acme-cache {}: {source}", path.display())]
    Cache {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file of the cache holds something unusable.
    #[error("--acme-cache {}: {detail}", path.display())]
    Cached { path: PathBuf, detail: String },
    #[error("--acme-ca-root {}: {detail}", path.display())]
    CaRoot { path: PathBuf, detail: String },
    /// The CA could not be reached, or refused a request.
    #[error("{step}: {source}")]
    Ca {
        step: &'static str,
        source: instant_acme::Error,
    },
    /// The CA could not validate a name (is `--listen` reachable on port 443 of it?).
    #[error("the CA could not validate {domain}: {detail}")]
    Validation { domain: String, detail: String },
    /// Making a key, a CSR or a challenge certificate, or the certificate the CA sent.
    #[error("{0}")]
    Certificate(String),
    #[error("the order did not finish within {}", pillion_core::duration::format(*.0))]
    Timeout(Duration),
}

/// An instant-acme failure at `step`.
fn at(step: &'static str) -> impl FnOnce(instant_acme::Error) -> AcmeError {
    move |source| AcmeError::Ca { step, source }
}

/// Checks a `--acme-domain`: a DNS name (no IP address, no wildcard), in lower case.
pub fn check_domain(name: &str) -> Result<String, String> {
    let name = name.trim().trim_end_matches('.').to_ascii_lowercase();
    if name.starts_with("*.") {
        return Err(format!(
            "{name:?}: a wildcard needs the DNS-01 challenge, which pillion does not do; give each name"
        ));
    }
    match ServerName::try_from(name.clone()) {
        Ok(ServerName::DnsName(_)) => Ok(name),
        Ok(_) => Err(format!(
            "{name:?} is an IP address; give the DNS name the certificate is for"
        )),
        Err(_) => Err(format!(
            "{name:?} is not a DNS name (for example shop.example.com)"
        )),
    }
}

/// Checks a `--acme-directory`: an `https://` URL.
pub fn check_directory(url: &str) -> Result<String, String> {
    let uri = pillion_http::client::check_url(url)?;
    if uri.scheme_str() != Some("https") {
        return Err(format!(
            "{url:?}: an ACME directory is an https:// URL (such as {LETS_ENCRYPT})"
        ));
    }
    Ok(url.to_string())
}

/// Checks a `--acme-email`: an address, given to the CA as `mailto:`.
pub fn check_email(email: &str) -> Result<String, String> {
    let email = email.trim();
    let email = email.strip_prefix("mailto:").unwrap_or(email);
    match email.split_once('@') {
        Some((user, host))
            if !user.is_empty() && host.contains('.') && !email.contains(char::is_whitespace) =>
        {
            Ok(email.to_string())
        }
        _ => Err(format!(
            "{email:?} is not an email address (for example ops@example.com)"
        )),
    }
}

/// Reads `--acme-ca-root`: one PEM certificate.
pub fn load_root(path: &Path) -> Result<CertificateDer<'static>, AcmeError> {
    CertificateDer::from_pem_file(path).map_err(|e| AcmeError::CaRoot {
        path: path.to_path_buf(),
        detail: format!("{e} (give a PEM certificate)"),
    })
}

/// The ACME side of HTTPS on `--listen`.
pub struct Acme {
    config: AcmeConfig,
    presented: Arc<Presented>,
    cache: Cache,
    client: client::Client,
    state: Mutex<State>,
}

/// What `/statusz` shows.
#[derive(Debug, Default)]
struct State {
    /// The served certificate's notBefore and notAfter.
    validity: Option<(SystemTime, SystemTime)>,
    ordering: bool,
    /// Orders this process began.
    orders: u64,
    last_error: Option<String>,
    retry_at: Option<SystemTime>,
}

fn epoch_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Acme {
    /// Opens the cache and serves the certificate kept there if it is still good for
    /// the domains. Nothing is ordered before [`Acme::run`].
    pub fn new(config: AcmeConfig) -> Result<Arc<Acme>, AcmeError> {
        let root = config.ca_root.as_deref().map(load_root).transpose()?;
        let cache = Cache::open(&config.cache, &config.directory)?;
        let acme = Arc::new(Acme {
            presented: Arc::default(),
            client: client::Client::new(root),
            state: Mutex::default(),
            cache,
            config,
        });
        let domains = &acme.config.domains;
        match acme.cache.certificate() {
            Ok(Some(cert))
                if cert.covers(domains) && schedule::usable(SystemTime::now(), cert.not_after) =>
            {
                tracing::info!(
                    ?domains,
                    not_after_unix = epoch_secs(cert.not_after),
                    cache = %acme.cache.dir().display(),
                    "ACME certificate from the cache"
                );
                acme.install(cert);
            }
            Ok(Some(cert)) => tracing::info!(
                ?domains,
                names = ?cert.names,
                "the cached ACME certificate has expired or is for other names; a new one is ordered"
            ),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "the cached ACME certificate is not used; a new one is ordered")
            }
        }
        Ok(acme)
    }

    /// The server config of `--listen`: h2 and HTTP/1.1, and `acme-tls/1` for
    /// validations (which the listener closes after the handshake).
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let mut config = (*pillion_http::tls::server_config(self.presented.clone())).clone();
        config
            .alpn_protocols
            .push(pillion_http::tls::ACME_TLS_ALPN.to_vec());
        Arc::new(config)
    }

    /// Orders and renews until `shutdown`. Start it once the listener accepts.
    pub async fn run(self: Arc<Self>, shutdown: impl Future<Output = ()>) {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut account = None;
        let mut failures = 0;
        let mut wait = Duration::ZERO;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = &mut shutdown => return,
            }
            let due = self
                .state()
                .validity
                .map(|(from, to)| schedule::renew_after(from, to));
            if let Some(left) = due.and_then(|due| schedule::next_check(SystemTime::now(), due)) {
                wait = left;
                continue;
            }
            {
                let mut state = self.state();
                state.ordering = true;
                state.orders += 1;
                state.retry_at = None;
            }
            let order = tokio::time::timeout(ORDER_DEADLINE, self.order(&mut account));
            let outcome = tokio::select! {
                outcome = order => outcome.unwrap_or(Err(AcmeError::Timeout(ORDER_DEADLINE))),
                _ = &mut shutdown => return,
            };
            wait = match outcome {
                Ok(issued) => {
                    failures = 0;
                    self.issued(issued);
                    Duration::ZERO
                }
                Err(e) => {
                    failures += 1;
                    // Read again at the next attempt: the CA may have changed.
                    account = None;
                    self.failed(e, schedule::retry_after(failures))
                }
            };
        }
    }

    /// For `/statusz`: `state` is `valid` while a certificate serves, `pending` until
    /// the first one arrives, `failed` when the last order failed and none serves.
    pub fn status(&self) -> serde_json::Value {
        let state = self.state();
        let serving = state
            .validity
            .is_some_and(|(_, to)| schedule::usable(SystemTime::now(), to));
        let summary = match (serving, &state.last_error, state.ordering) {
            (true, _, _) => "valid",
            (false, Some(_), false) => "failed",
            _ => "pending",
        };
        serde_json::json!({
            "domains": self.config.domains,
            "directory": self.config.directory,
            "state": summary,
            "not_after_unix": state.validity.map(|(_, to)| epoch_secs(to)),
            "renew_after_unix": state
                .validity
                .map(|(from, to)| epoch_secs(schedule::renew_after(from, to))),
            "orders": state.orders,
            "last_error": state.last_error,
            "retry_at_unix": state.retry_at.map(epoch_secs),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn install(&self, cert: Certificate) {
        self.presented.set_current(cert.key);
        self.state().validity = Some((cert.not_before, cert.not_after));
    }

    fn issued(&self, issued: Issued) {
        tracing::info!(
            domains = ?self.config.domains,
            not_after_unix = epoch_secs(issued.cert.not_after),
            "ACME certificate issued; new handshakes on --listen get it"
        );
        // It serves even if it cannot be kept: ordering again would not help, and
        // the CA limits duplicate certificates. The error shows until the next order.
        let kept = self
            .cache
            .save_certificate(issued.chain.as_bytes(), issued.key.as_bytes());
        if let Err(e) = &kept {
            tracing::warn!(error = %e, "the ACME certificate serves but a restart will order again");
        }
        self.install(issued.cert);
        let mut state = self.state();
        state.ordering = false;
        state.last_error = kept.err().map(|e| e.to_string());
    }

    /// Records a failed order; returns the wait before the next one.
    fn failed(&self, error: AcmeError, retry: Duration) -> Duration {
        let serving = if self.presented.has_current() {
            "the current certificate keeps serving"
        } else {
            "--listen has no certificate until one is issued"
        };
        tracing::warn!(
            error = %error,
            domains = ?self.config.domains,
            directory = %self.config.directory,
            retry_in = %pillion_core::duration::format(retry),
            "ACME order failed; {serving}"
        );
        let mut state = self.state();
        state.ordering = false;
        state.last_error = Some(error.to_string());
        state.retry_at = Some(SystemTime::now() + retry);
        retry
    }

    /// The account, from the cache or made now (and kept there).
    async fn account(&self) -> Result<Account, AcmeError> {
        let http = || Box::new(self.client.clone()) as Box<dyn HttpClient>;
        if let Some(credentials) = self.cache.account()? {
            return Account::builder_with_http(http())
                .from_credentials(credentials)
                .await
                .map_err(at("reading the ACME directory"));
        }
        let contact = self.config.email.as_ref().map(|e| format!("mailto:{e}"));
        let contact: Vec<&str> = contact.iter().map(String::as_str).collect();
        let (account, credentials) = Account::builder_with_http(http())
            .create(
                &NewAccount {
                    contact: &contact,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                self.config.directory.clone(),
                None,
            )
            .await
            .map_err(at("creating the ACME account"))?;
        self.cache.save_account(&credentials)?;
        tracing::info!(directory = %self.config.directory, "ACME account created");
        Ok(account)
    }

    /// One order: challenges answered on `--listen`, a new key, the certificate.
    async fn order(&self, account: &mut Option<Account>) -> Result<Issued, AcmeError> {
        if account.is_none() {
            *account = Some(self.account().await?);
        }
        let account = account.as_ref().expect("set above");
        let identifiers: Vec<Identifier> = self
            .config
            .domains
            .iter()
            .map(|d| Identifier::Dns(d.clone()))
            .collect();
        let mut order = account
            .new_order(&NewOrder::new(&identifiers))
            .await
            .map_err(at("placing the order"))?;
        // Each challenge is answered until this is dropped, however the order ends.
        let mut answering = Vec::new();
        let mut authorizations = order.authorizations();
        while let Some(authorization) = authorizations.next().await {
            let mut authorization = authorization.map_err(at("reading an authorization"))?;
            let domain = authorization.identifier().to_string();
            match authorization.status {
                AuthorizationStatus::Valid => continue,
                AuthorizationStatus::Pending => {}
                other => {
                    return Err(AcmeError::Validation {
                        domain,
                        detail: format!("its authorization is {other:?}"),
                    })
                }
            }
            let mut challenge = authorization
                .challenge(ChallengeType::TlsAlpn01)
                .ok_or_else(|| AcmeError::Validation {
                    domain: domain.clone(),
                    detail: "the CA offers no tls-alpn-01 challenge for it".into(),
                })?;
            let key =
                challenge::certificate(&domain, challenge.key_authorization().digest().as_ref())
                    .map_err(AcmeError::Certificate)?;
            answering.push(self.presented.answer(&domain, key));
            challenge
                .set_ready()
                .await
                .map_err(at("answering the challenge"))?;
        }
        let ready = order
            .poll_ready(&RetryPolicy::new().timeout(CA_DEADLINE))
            .await;
        if !matches!(ready, Ok(OrderStatus::Ready)) {
            if let Some(why) = why_invalid(&mut order).await {
                return Err(why);
            }
            return Err(match ready {
                Err(source) => AcmeError::Ca {
                    step: "waiting for validation",
                    source,
                },
                Ok(status) => AcmeError::Validation {
                    domain: self.config.domains.join(", "),
                    detail: format!("the order is {status:?}"),
                },
            });
        }
        drop(answering);

        let key = rcgen::KeyPair::generate()
            .map_err(|e| AcmeError::Certificate(format!("generating a key: {e}")))?;
        let mut params = rcgen::CertificateParams::new(self.config.domains.clone())
            .map_err(|e| AcmeError::Certificate(format!("the CSR: {e}")))?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        let csr = params
            .serialize_request(&key)
            .map_err(|e| AcmeError::Certificate(format!("the CSR: {e}")))?;
        order
            .finalize_csr(csr.der())
            .await
            .map_err(at("finalizing the order"))?;
        let chain = order
            .poll_certificate(&RetryPolicy::new().timeout(CA_DEADLINE))
            .await
            .map_err(at("downloading the certificate"))?;
        let key = key.serialize_pem();
        let cert = Certificate::from_pem(chain.as_bytes(), key.as_bytes())
            .map_err(|e| AcmeError::Certificate(format!("the CA's certificate: {e}")))?;
        if !cert.covers(&self.config.domains) {
            return Err(AcmeError::Certificate(format!(
                "the CA's certificate is for {:?}, not {:?}",
                cert.names, self.config.domains
            )));
        }
        Ok(Issued { cert, chain, key })
    }
}

/// What an order brings: the certificate, and the PEM chain and key to keep.
struct Issued {
    cert: Certificate,
    chain: String,
    key: String,
}

/// The first challenge error the CA reports for the order's names.
async fn why_invalid(order: &mut Order) -> Option<AcmeError> {
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authorization)) = authorizations.next().await {
        let domain = authorization.identifier().to_string();
        let Ok(state) = authorization.refresh().await else {
            continue;
        };
        if let Some(problem) = state.challenges.iter().find_map(|c| c.error.as_ref()) {
            return Some(AcmeError::Validation {
                domain,
                detail: problem.to_string(),
            });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_values_are_checked() {
        assert_eq!(
            check_domain("Shop.Example.COM.").unwrap(),
            "shop.example.com"
        );
        assert!(check_domain("*.example.com")
            .unwrap_err()
            .contains("DNS-01"));
        assert!(check_domain("10.0.0.1").unwrap_err().contains("IP address"));
        assert!(check_domain("not a name")
            .unwrap_err()
            .contains("not a DNS name"));
        assert_eq!(check_directory(LETS_ENCRYPT).unwrap(), LETS_ENCRYPT);
        assert!(check_directory("http://ca.example/dir")
            .unwrap_err()
            .contains("https://"));
        assert!(check_directory("nope").is_err());
        assert_eq!(
            check_email("mailto:ops@example.com").unwrap(),
            "ops@example.com"
        );
        assert!(check_email("ops")
            .unwrap_err()
            .contains("not an email address"));
    }
}
