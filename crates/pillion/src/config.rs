//! The one config loader: defaults, then the TOML file, then `PILLION_*` environment
//! variables, then flags, each overriding the one before.
//!
//! Every flag of `pillion run` is a key of the file with dashes turned to underscores
//! (`--healthcheck-interval` is `healthcheck_interval`) and an environment variable
//! (`PILLION_HEALTHCHECK_INTERVAL`). Values check themselves when parsed, from a flag
//! or from the file alike, so a bad value in the file is reported with its line, and
//! a key the loader does not know is an error rather than silently ignored.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use pillion_core::Dur;
use serde::Deserialize;

use crate::cli::RunArgs;

pub const DEFAULT_ADDRESS: &str = "127.0.0.1:8081";
pub const DEFAULT_REGISTER_TTL: Duration = Duration::from_secs(30);
pub const DEFAULT_HEALTHCHECK_INTERVAL: Duration = Duration::from_secs(30);
pub const DEFAULT_HEALTHCHECK_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(10);
pub const DEFAULT_READ_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_APP_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
pub const DEFAULT_LISTEN_MAX_CONNECTIONS: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

/// The config file. Keys are the flags of `pillion run` with `_` for `-`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub address: Option<SocketAddr>,
    pub handler: Option<FromText<pillion_invoke::Handler>>,
    pub namespace: Option<String>,
    pub balancer: Option<FromText<pillion_invoke::Strategy>>,
    pub timeout: Option<NonZeroDur>,
    pub per_try_timeout: Option<NonZeroDur>,
    pub connect_timeout: Option<NonZeroDur>,
    pub retries: Option<u32>,
    pub max_pending: Option<NonZeroUsize>,
    pub max_body_size: Option<pillion_core::Size>,
    pub registry: Option<RegistryUrl>,
    pub register_ttl: Option<NonZeroDur>,
    pub server_name: Option<ServiceName>,
    pub server_address: Option<HostPort>,
    /// A table: `[server_metadata]` then `zone = "eu-1a"`.
    pub server_metadata: Option<BTreeMap<String, String>>,
    pub healthcheck_url: Option<HealthUrl>,
    pub healthcheck_interval: Option<NonZeroDur>,
    pub healthcheck_timeout: Option<NonZeroDur>,
    pub grace_period: Option<Dur>,
    pub read_header_timeout: Option<NonZeroDur>,
    pub pool_idle_timeout: Option<NonZeroDur>,
    pub app_timeout: Option<NonZeroDur>,
    pub listen_max_connections: Option<NonZeroUsize>,
    pub worker_threads: Option<NonZeroUsize>,
    pub listen: Option<SocketAddr>,
    pub app: Option<AppUrl>,
    pub session_store: Option<SessionStoreUrl>,
    pub session_max_age: Option<MaxAge>,
    pub session_rolling: Option<bool>,
    pub session_cookie: Option<CookieName>,
    pub session_cookie_path: Option<String>,
    pub session_cookie_domain: Option<String>,
    pub session_cookie_secure: Option<bool>,
    pub session_cookie_http_only: Option<bool>,
    pub session_cookie_same_site: Option<FromText<pillion_session::cookie::SameSite>>,
    pub session_header_prefix: Option<String>,
    pub session_store_down: Option<FromText<pillion_session::inbound::StoreDown>>,
    pub session_max_value_size: Option<pillion_core::Size>,
    pub session_max_size: Option<pillion_core::Size>,
    pub broker: Option<BrokerUrl>,
    pub broker_durable: Option<Vec<String>>,
    pub broker_max_deliver: Option<std::num::NonZeroU64>,
    pub broker_ack_wait: Option<NonZeroDur>,
    pub broker_dead_letter_prefix: Option<String>,
    pub broker_max_message_size: Option<pillion_core::Size>,
    pub broker_subscriber_buffer: Option<NonZeroUsize>,
    pub broker_push: Option<Vec<FromText<pillion_broker::push::PushRoute>>>,
    pub broker_advertise: Option<HostPort>,
    pub reload_period: Option<NonZeroDur>,
    pub dns_server: Option<Vec<SocketAddr>>,
    /// `[[tcp]]` listeners of the TCP proxy.
    pub tcp: Option<Vec<pillion_tcp::ListenerConfig>>,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let file = Self::parse(&text).map_err(|message| ConfigError::File {
            path: path.to_path_buf(),
            message,
        })?;
        pillion_tcp::config::validate(file.tcp.as_deref().unwrap_or_default()).map_err(
            |message| ConfigError::File {
                path: path.to_path_buf(),
                message,
            },
        )?;
        Ok(file)
    }

    /// Parses the file's text; the error names the line and the key.
    pub fn parse(text: &str) -> Result<FileConfig, String> {
        toml::from_str(text).map_err(|e| {
            let message = e.message().to_string();
            match e.span() {
                Some(span) => {
                    let line = text[..span.start].matches('\n').count() + 1;
                    let content = text.lines().nth(line - 1).unwrap_or("").trim();
                    format!("line {line}: {message}\n    {line} | {content}")
                }
                None => message,
            }
        })
    }
}

/// Everything `pillion run` needs, resolved.
#[derive(Debug, Clone)]
pub struct Settings {
    pub address: SocketAddr,
    pub invoke: pillion_invoke::Config,
    /// This sidecar's zone and region (from the app's metadata), for locality.
    pub locality: pillion_invoke::Locality,
    pub registry: String,
    pub app: Option<pillion_registry::health::AppConfig>,
    pub grace_period: Duration,
    pub worker_threads: Option<usize>,
    pub inbound: Option<InboundSettings>,
    pub broker: BrokerSettings,
    /// The config file, re-read for [[tcp]] changes.
    pub config_file: Option<PathBuf>,
    pub reload_period: Duration,
    pub dns_servers: Vec<SocketAddr>,
    pub tcp: Vec<pillion_tcp::ListenerConfig>,
    pub read_header_timeout: Duration,
    pub listen_max_connections: usize,
}

pub const DEFAULT_RELOAD_PERIOD: Duration = Duration::from_secs(1);

/// The message broker.
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    pub url: String,
    pub nats: pillion_broker::NatsSettings,
    pub api: pillion_broker::api::ApiConfig,
    pub push: Vec<pillion_broker::push::PushRoute>,
    /// `host:port` of the app that push delivery posts to.
    pub push_to: Option<String>,
    /// Queue group of push subscriptions.
    pub push_queue: String,
    pub advertise: Option<String>,
}

/// The inbound (session) proxy.
#[derive(Debug, Clone)]
pub struct InboundSettings {
    pub listen: SocketAddr,
    pub store: String,
    pub proxy: pillion_session::inbound::Config,
}

pub const DEFAULT_SESSION_MAX_AGE: Duration = Duration::from_secs(3600);

impl Settings {
    /// Merges flags and environment (already merged by clap) over the file over the
    /// defaults, then checks what only makes sense together.
    pub fn resolve(args: RunArgs) -> Result<Settings, ConfigError> {
        let file = match &args.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        let pool = pillion_http::pool::Settings {
            idle_timeout: args
                .pool_idle_timeout
                .clone()
                .or(file.pool_idle_timeout.clone())
                .map_or(DEFAULT_POOL_IDLE_TIMEOUT, |d| d.0),
            ..Default::default()
        };
        let inbound = resolve_inbound(&args, &file, &pool)?;
        let broker = resolve_broker(&args, &file, inbound.as_ref())?;
        let server_name = args.server_name.or(file.server_name);
        let server_address = args.server_address.or(file.server_address);
        let healthcheck_url = args.healthcheck_url.or(file.healthcheck_url);
        let mut metadata = file.server_metadata.unwrap_or_default();
        if !args.server_metadata.is_empty() {
            // Flags replace the file's table as a whole, like any other key.
            metadata = args
                .server_metadata
                .into_iter()
                .map(|kv| (kv.0, kv.1))
                .collect();
        }
        let register_ttl = args
            .register_ttl
            .or(file.register_ttl)
            .map_or(DEFAULT_REGISTER_TTL, |d| d.0);
        let healthcheck_interval = args
            .healthcheck_interval
            .or(file.healthcheck_interval)
            .map_or(DEFAULT_HEALTHCHECK_INTERVAL, |d| d.0);
        let healthcheck_timeout = args
            .healthcheck_timeout
            .or(file.healthcheck_timeout)
            .map_or(DEFAULT_HEALTHCHECK_TIMEOUT, |d| d.0);

        let locality = pillion_invoke::Locality {
            zone: metadata.get("zone").cloned(),
            region: metadata.get("region").cloned(),
        };
        let defaults = pillion_invoke::Config::default();
        let invoke = pillion_invoke::Config {
            handler: args
                .handler
                .or(file.handler.map(|h| h.0))
                .unwrap_or(defaults.handler),
            namespace: args
                .namespace
                .or(file.namespace)
                .unwrap_or(defaults.namespace),
            timeout: args
                .timeout
                .or(file.timeout)
                .map_or(defaults.timeout, |d| d.0),
            max_body: args
                .max_body_size
                .or(file.max_body_size)
                .map_or(defaults.max_body, |s| s.0),
            policy: pillion_invoke::Policy {
                strategy: args
                    .balancer
                    .or(file.balancer.map(|b| b.0))
                    .unwrap_or(defaults.policy.strategy),
                connect_timeout: args
                    .connect_timeout
                    .or(file.connect_timeout)
                    .map_or(defaults.policy.connect_timeout, |d| d.0),
                per_try_timeout: args
                    .per_try_timeout
                    .or(file.per_try_timeout)
                    .map_or(defaults.policy.per_try_timeout, |d| d.0),
                retries: args
                    .retries
                    .or(file.retries)
                    .unwrap_or(defaults.policy.retries),
                max_pending: args
                    .max_pending
                    .or(file.max_pending)
                    .map_or(defaults.policy.max_pending, NonZeroUsize::get),
                ejection: defaults.policy.ejection,
            },
            pool,
        };
        let app = match (server_name, server_address) {
            (Some(name), Some(address)) => Some(pillion_registry::health::AppConfig {
                name: name.0,
                address: address.0,
                metadata,
                healthcheck_url: healthcheck_url.map(|u| u.0),
                healthcheck_interval,
                healthcheck_timeout,
                register_ttl,
            }),
            (Some(_), None) => {
                return Err(ConfigError::Invalid(
                    "--server-name (server_name) needs --server-address (server_address): \
                     the host:port other services use to reach the app"
                        .into(),
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError::Invalid(
                    "--server-address (server_address) needs --server-name (server_name)".into(),
                ))
            }
            (None, None) if healthcheck_url.is_some() => {
                return Err(ConfigError::Invalid(
                    "--healthcheck-url (healthcheck_url) needs --server-name and \
                     --server-address: it checks the app registered under that name"
                        .into(),
                ))
            }
            (None, None) if !metadata.is_empty() => {
                return Err(ConfigError::Invalid(
                    "--server-metadata (server_metadata) needs --server-name and --server-address"
                        .into(),
                ))
            }
            (None, None) => None,
        };
        Ok(Settings {
            read_header_timeout: args
                .read_header_timeout
                .clone()
                .or(file.read_header_timeout.clone())
                .map_or(DEFAULT_READ_HEADER_TIMEOUT, |d| d.0),
            listen_max_connections: args
                .listen_max_connections
                .or(file.listen_max_connections)
                .map_or(DEFAULT_LISTEN_MAX_CONNECTIONS, NonZeroUsize::get),
            config_file: args.config.clone(),
            reload_period: args
                .reload_period
                .clone()
                .or(file.reload_period.clone())
                .map_or(DEFAULT_RELOAD_PERIOD, |d| d.0),
            dns_servers: if args.dns_server.is_empty() {
                file.dns_server.clone().unwrap_or_default()
            } else {
                args.dns_server.clone()
            },
            tcp: file.tcp.clone().unwrap_or_default(),
            broker,
            inbound,
            invoke,
            locality,
            address: args
                .address
                .or(file.address)
                .unwrap_or_else(|| DEFAULT_ADDRESS.parse().expect("default address")),
            registry: args
                .registry
                .or(file.registry)
                .map_or_else(|| "memory".to_string(), |r| r.0),
            app,
            grace_period: args
                .grace_period
                .or(file.grace_period)
                .map_or(DEFAULT_GRACE_PERIOD, |d| d.0),
            worker_threads: args
                .worker_threads
                .or(file.worker_threads)
                .map(NonZeroUsize::get),
        })
    }
}

fn resolve_broker(
    args: &RunArgs,
    file: &FileConfig,
    inbound: Option<&InboundSettings>,
) -> Result<BrokerSettings, ConfigError> {
    use pillion_broker::{api::ApiConfig, topic, NatsSettings};
    let url = args
        .broker
        .clone()
        .or(file.broker.clone())
        .map_or_else(|| "embedded".to_string(), |b| b.0);
    let durable = if args.broker_durable.is_empty() {
        file.broker_durable.clone().unwrap_or_default()
    } else {
        args.broker_durable.clone()
    };
    for pattern in &durable {
        topic::check_pattern(pattern)
            .map_err(|e| ConfigError::Invalid(format!("--broker-durable (broker_durable): {e}")))?;
    }
    if !durable.is_empty() && !url.starts_with("nats://") {
        return Err(ConfigError::Invalid(
            "--broker-durable (broker_durable) needs --broker nats://...: durable topics live in NATS JetStream".into(),
        ));
    }
    let defaults = NatsSettings::default();
    let prefix = args
        .broker_dead_letter_prefix
        .clone()
        .or(file.broker_dead_letter_prefix.clone())
        .unwrap_or(defaults.dead_letter_prefix);
    topic::check_publish(&prefix).map_err(|e| {
        ConfigError::Invalid(format!(
            "--broker-dead-letter-prefix (broker_dead_letter_prefix): {e}"
        ))
    })?;
    let push: Vec<_> = if args.broker_push.is_empty() {
        file.broker_push
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|p| p.0)
            .collect()
    } else {
        args.broker_push.clone()
    };
    let server_address = args.server_address.clone().or(file.server_address.clone());
    let push_to = inbound
        .map(|i| i.proxy.app.clone())
        .or(server_address.map(|a| a.0));
    if !push.is_empty() && push_to.is_none() {
        return Err(ConfigError::Invalid(
            "--broker-push (broker_push) needs the app's address: give --app or --server-address"
                .into(),
        ));
    }
    let server_name = args.server_name.clone().or(file.server_name.clone());
    let api_defaults = ApiConfig::default();
    Ok(BrokerSettings {
        url,
        nats: NatsSettings {
            durable,
            max_deliver: args
                .broker_max_deliver
                .or(file.broker_max_deliver)
                .map_or(defaults.max_deliver, |n| n.get()),
            ack_wait: args
                .broker_ack_wait
                .clone()
                .or(file.broker_ack_wait.clone())
                .map_or(defaults.ack_wait, |d| d.0),
            dead_letter_prefix: prefix,
        },
        api: ApiConfig {
            max_message: args
                .broker_max_message_size
                .or(file.broker_max_message_size)
                .map_or(api_defaults.max_message, |s| s.0 as usize),
            buffer: args
                .broker_subscriber_buffer
                .or(file.broker_subscriber_buffer)
                .map_or(api_defaults.buffer, NonZeroUsize::get),
            ping_interval: api_defaults.ping_interval,
        },
        push,
        push_to,
        push_queue: format!(
            "push-{}",
            server_name
                .map(|n| n
                    .0
                    .replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_"))
                .unwrap_or_else(|| "app".into())
        ),
        advertise: args
            .broker_advertise
            .clone()
            .or(file.broker_advertise.clone())
            .map(|a| a.0),
    })
}

/// The inbound proxy's settings, if `--listen` and `--app` are set; session options
/// without them are an error rather than silently unused.
fn resolve_inbound(
    args: &RunArgs,
    file: &FileConfig,
    pool: &pillion_http::pool::Settings,
) -> Result<Option<InboundSettings>, ConfigError> {
    use pillion_session::{codec, cookie, inbound};
    let listen = args.listen.or(file.listen);
    let app = args.app.clone().or(file.app.clone());
    let session_flags = [
        (
            "--session-store",
            args.session_store.is_some() || file.session_store.is_some(),
        ),
        (
            "--session-max-age",
            args.session_max_age.is_some() || file.session_max_age.is_some(),
        ),
        (
            "--session-rolling",
            args.session_rolling.is_some() || file.session_rolling.is_some(),
        ),
        (
            "--session-cookie",
            args.session_cookie.is_some() || file.session_cookie.is_some(),
        ),
        (
            "--session-header-prefix",
            args.session_header_prefix.is_some() || file.session_header_prefix.is_some(),
        ),
        (
            "--session-store-down",
            args.session_store_down.is_some() || file.session_store_down.is_some(),
        ),
        (
            "--app-timeout",
            args.app_timeout.is_some() || file.app_timeout.is_some(),
        ),
        (
            "--listen-max-connections",
            args.listen_max_connections.is_some() || file.listen_max_connections.is_some(),
        ),
    ];
    let (listen, app) = match (listen, app) {
        (Some(l), Some(a)) => (l, a),
        (Some(_), None) => return Err(ConfigError::Invalid(
            "--listen (listen) needs --app (app): the http://host:port of the app behind the proxy"
                .into(),
        )),
        (None, Some(_)) => {
            return Err(ConfigError::Invalid(
                "--app (app) needs --listen (listen): the address the inbound proxy listens on"
                    .into(),
            ))
        }
        (None, None) => {
            if let Some((flag, _)) = session_flags.iter().find(|(_, set)| *set) {
                return Err(ConfigError::Invalid(format!(
                    "{flag} needs --listen and --app: it is an option of the inbound proxy"
                )));
            }
            return Ok(None);
        }
    };
    let defaults = cookie::CookieConfig::default();
    let cookie = cookie::CookieConfig {
        name: args
            .session_cookie
            .clone()
            .or(file.session_cookie.clone())
            .map_or(defaults.name, |c| c.0),
        path: args
            .session_cookie_path
            .clone()
            .or(file.session_cookie_path.clone())
            .unwrap_or(defaults.path),
        domain: args
            .session_cookie_domain
            .clone()
            .or(file.session_cookie_domain.clone()),
        secure: args
            .session_cookie_secure
            .or(file.session_cookie_secure)
            .unwrap_or(defaults.secure),
        http_only: args
            .session_cookie_http_only
            .or(file.session_cookie_http_only)
            .unwrap_or(defaults.http_only),
        same_site: Some(
            args.session_cookie_same_site
                .or(file.session_cookie_same_site.as_ref().map(|s| s.0))
                .unwrap_or(cookie::SameSite::Lax),
        ),
        max_age: args
            .session_max_age
            .clone()
            .or(file.session_max_age.clone())
            .map_or(DEFAULT_SESSION_MAX_AGE, |m| m.0),
    };
    if cookie.same_site == Some(cookie::SameSite::None) && !cookie.secure {
        return Err(ConfigError::Invalid(
            "--session-cookie-same-site none needs --session-cookie-secure: browsers drop SameSite=None cookies that are not Secure".into(),
        ));
    }
    let prefix = args
        .session_header_prefix
        .clone()
        .or(file.session_header_prefix.clone())
        .unwrap_or_else(|| "X-Session-".into());
    let scheme = codec::Scheme::new(&prefix)
        .map_err(|e| ConfigError::Invalid(format!("--session-header-prefix: {e}")))?;
    let limit_defaults = codec::Limits::default();
    let limits = codec::Limits {
        max_value: args
            .session_max_value_size
            .or(file.session_max_value_size)
            .map_or(limit_defaults.max_value, |s| s.0 as usize),
        max_size: args
            .session_max_size
            .or(file.session_max_size)
            .map_or(limit_defaults.max_size, |s| s.0 as usize),
    };
    Ok(Some(InboundSettings {
        listen,
        store: args
            .session_store
            .clone()
            .or(file.session_store.clone())
            .map_or_else(|| "memory".to_string(), |s| s.0),
        proxy: inbound::Config {
            app: app.1,
            app_url: app.0,
            cookie,
            scheme,
            rolling: args
                .session_rolling
                .or(file.session_rolling)
                .unwrap_or(false),
            store_down: args
                .session_store_down
                .or(file.session_store_down.as_ref().map(|s| s.0))
                .unwrap_or_default(),
            limits,
            connect_timeout: Duration::from_secs(1),
            app_timeout: args
                .app_timeout
                .clone()
                .or(file.app_timeout.clone())
                .map_or(DEFAULT_APP_TIMEOUT, |d| d.0),
            pool: pool.clone(),
        },
    }))
}

/// Implements `FromStr` (for flags) and `Deserialize` (for the file) from one check.
macro_rules! checked_value {
    ($(#[$doc:meta])* $name:ident($inner:ty), $check:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq)]
        pub struct $name(pub $inner);

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                let check: fn(&str) -> Result<$inner, String> = $check;
                check(s).map($name)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

checked_value!(
    /// A duration greater than zero.
    NonZeroDur(Duration),
    |s| match pillion_core::duration::parse(s) {
        Ok(d) if d.is_zero() => Err("must be more than 0".to_string()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
);

checked_value!(
    /// `memory` or `etcd://host:port[,host:port]`.
    RegistryUrl(String),
    |s| pillion_registry::check_url(s).map(|()| s.to_string()).map_err(|e| e.to_string())
);

checked_value!(
    /// A service name: not empty, no `/`.
    ServiceName(String),
    |s| {
        let svc = pillion_core::Service { name: s.to_string(), ..Default::default() };
        svc.validate().map(|()| s.to_string()).map_err(|e| e.to_string())
    }
);

checked_value!(
    /// `host:port`, the address registered for the app.
    HostPort(String),
    |s| {
        let ok = s
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
        if ok {
            Ok(s.to_string())
        } else {
            Err(format!("{s:?} is not host:port (for example 127.0.0.1:9090)"))
        }
    }
);

checked_value!(
    /// An `http://` URL to GET for the app's health.
    HealthUrl(String),
    |s| pillion_registry::health::validate_health_url(s).map(|()| s.to_string())
);

checked_value!(
    /// `memory` or `redis://[:password@]host:port[/db]`.
    SessionStoreUrl(String),
    |s| pillion_session::check_url(s).map(|()| s.to_string()).map_err(|e| e.to_string())
);

checked_value!(
    /// `embedded` or `nats://host:port[,host:port]`.
    BrokerUrl(String),
    |s| pillion_broker::check_url(s).map(|()| s.to_string()).map_err(|e| e.to_string())
);

checked_value!(
    /// A session lifetime: whole seconds (`3600`) or a duration (`1h`), more than 0.
    MaxAge(Duration),
    |s| {
        let d = match s.trim().parse::<i64>() {
            Ok(n) if n <= 0 => return Err(format!(
                "{n} would disable sessions; give a lifetime of more than 0 seconds, like 3600"
            )),
            Ok(n) => Duration::from_secs(n as u64),
            Err(_) => pillion_core::duration::parse(s).map_err(|e| e.to_string())?,
        };
        if d < Duration::from_secs(1) {
            return Err("must be at least 1 second".into());
        }
        Ok(d)
    }
);

checked_value!(
    /// A cookie name.
    CookieName(String),
    |s| if pillion_session::cookie::valid_name(s) {
        Ok(s.to_string())
    } else {
        Err(format!("{s:?} is not a valid cookie name"))
    }
);

/// `--app`: the URL as given and its `host:port`.
#[derive(Debug, Clone, PartialEq)]
pub struct AppUrl(pub String, pub String);

impl FromStr for AppUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        pillion_session::inbound::app_authority(s).map(|a| AppUrl(s.to_string(), a))
    }
}

impl<'de> Deserialize<'de> for AppUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Any value read from text by its `FromStr`, in the config file.
#[derive(Debug, Clone, PartialEq)]
pub struct FromText<T>(pub T);

impl<'de, T> Deserialize<'de> for FromText<T>
where
    T: FromStr,
    T::Err: std::fmt::Display,
{
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map(FromText).map_err(serde::de::Error::custom)
    }
}

/// `key=value`, one entry of `--server-metadata`.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyValue(pub String, pub String);

impl FromStr for KeyValue {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok(KeyValue(k.trim().into(), v.into())),
            _ => Err(format!("{s:?} is not key=value (for example zone=eu-1a)")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_file_parses() {
        let f = FileConfig::parse(
            r#"
address = "127.0.0.1:9000"
registry = "etcd://127.0.0.1:2379"
register_ttl = "1m"
server_name = "greeter"
server_address = "127.0.0.1:9090"
healthcheck_url = "http://127.0.0.1:9090/health"
healthcheck_interval = "10s"
healthcheck_timeout = "2s"
grace_period = "0"
worker_threads = 1
handler = "proxy"
namespace = "go.micro.srv"
balancer = "round-robin"
timeout = "2s"
per_try_timeout = "1s"
connect_timeout = "250ms"
retries = 3
max_pending = 10
max_body_size = "1MiB"
listen = "127.0.0.1:8080"
app = "http://127.0.0.1:3000"
session_store = "redis://127.0.0.1:6379/1"
session_max_age = "1h"
session_rolling = true
session_cookie = "sid"
session_cookie_path = "/app"
session_cookie_domain = "example.com"
session_cookie_secure = true
session_cookie_http_only = false
session_cookie_same_site = "strict"
session_header_prefix = "X-Sess-"
session_store_down = "fail"
session_max_value_size = "8KiB"
session_max_size = "128KiB"
broker = "nats://127.0.0.1:4222"
broker_durable = ["orders.*"]
broker_max_deliver = 3
broker_ack_wait = "10s"
broker_dead_letter_prefix = "dlq"
broker_max_message_size = "2MiB"
broker_subscriber_buffer = 64
broker_push = ["orders.new=/orders"]
broker_advertise = "10.0.0.5:8081"
reload_period = "2s"
dns_server = ["127.0.0.1:53"]
[server_metadata]
zone = "eu-1a"
"#,
        )
        .unwrap();
        assert_eq!(f.register_ttl, Some(NonZeroDur(Duration::from_secs(60))));
        assert_eq!(f.server_metadata.unwrap()["zone"], "eu-1a");
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key_and_line() {
        let cases = [
            (
                "address = \"127.0.0.1:1\"\nadress = \"x\"\n",
                "line 2",
                "unknown field `adress`",
            ),
            (
                "healthcheck_interval = \"30\"\n",
                "line 1",
                "unit is missing",
            ),
            (
                "healthcheck_interval = \"0s\"\n",
                "line 1",
                "must be more than 0",
            ),
            (
                "\n\nregistry = \"consul://x\"\n",
                "line 3",
                "memory or etcd://",
            ),
            ("server_address = \"nope\"\n", "line 1", "not host:port"),
            (
                "healthcheck_url = \"https://x/h\"\n",
                "line 1",
                "https health checks",
            ),
            ("worker_threads = 0\n", "line 1", "nonzero"),
            ("address = \n", "line 1", ""),
            ("handler = \"grpc\"\n", "line 1", "use rpc or proxy"),
            (
                "balancer = \"random\"\n",
                "line 1",
                "peak-ewma or round-robin",
            ),
            ("max_body_size = \"lots\"\n", "line 1", "invalid size"),
            ("retries = -1\n", "line 1", ""),
            (
                "session_max_age = \"0\"\n",
                "line 1",
                "would disable sessions",
            ),
            (
                "session_max_age = \"-5\"\n",
                "line 1",
                "would disable sessions",
            ),
            (
                "session_store = \"mongodb://x:1\"\n",
                "line 1",
                "memory or redis[s]://",
            ),
            ("app = \"https://x:1\"\n", "line 1", "https"),
            (
                "session_cookie = \"a b\"\n",
                "line 1",
                "not a valid cookie name",
            ),
            ("session_store_down = \"retry\"\n", "line 1", "pass or fail"),
            (
                "broker = \"kafka://x:1\"\n",
                "line 1",
                "embedded or nats://",
            ),
            ("broker_push = [\"orders\"]\n", "line 1", "TOPIC=/path"),
        ];
        for (text, line, want) in cases {
            let err = FileConfig::parse(text).unwrap_err();
            assert!(err.starts_with(line), "{text:?}: {err}");
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn metadata_flags_parse_as_key_value() {
        assert_eq!(
            "zone=a=b".parse::<KeyValue>().unwrap(),
            KeyValue("zone".into(), "a=b".into())
        );
        assert!("zone".parse::<KeyValue>().is_err());
        assert!("=x".parse::<KeyValue>().is_err());
    }
}
