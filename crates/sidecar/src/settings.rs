//! What a sidecar needs, resolved: [`Settings`] and the settings of each part. The
//! binary builds them from its flags, variables and config file; a test or an
//! embedding program may build them directly.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

/// Everything `pillion run` needs, resolved.
#[derive(Debug, Clone)]
pub struct Settings {
    pub address: SocketAddr,
    pub invoke: pillion_invoke::Config,
    /// This sidecar's zone and region (from the app's metadata), for locality.
    pub locality: pillion_invoke::Locality,
    pub registry: String,
    pub cluster: pillion_registry::cluster::ClusterOptions,
    pub app: Option<pillion_registry::health::AppConfig>,
    pub grace_period: Duration,
    /// Where to write the bound addresses once serving (`--ready-file`).
    pub ready_file: Option<PathBuf>,
    pub worker_threads: Option<usize>,
    pub inbound: Option<InboundSettings>,
    pub broker: BrokerSettings,
    /// The config file, re-read for [[tcp]] changes.
    pub config_file: Option<ConfigFile>,
    pub reload_period: Duration,
    pub dns_servers: Vec<SocketAddr>,
    pub tcp: Vec<pillion_tcp::ListenerConfig>,
    pub read_header_timeout: Duration,
    pub read_body_timeout: Duration,
    pub idle_timeout: Duration,
    pub listen_max_connections: usize,
    pub api_max_connections: usize,
    pub api_token: Option<String>,
    /// HTTPS on `address` from certificate files.
    pub api_tls: Option<pillion_http::tls::CertFiles>,
    /// HTTPS on `address` with certificates from an ACME CA (never with `api_tls`).
    pub api_acme: Option<pillion_mesh::acme::AcmeConfig>,
    pub mesh: Option<MeshSettings>,
    pub trace: TraceSettings,
}

impl Settings {
    /// `pillion run`'s defaults, on `127.0.0.1` port 0 with the `memory` registry
    /// (nothing shared with other sidecars) and the embedded broker: a sidecar a test
    /// or an embedding program starts in-process and changes field by field. The
    /// binary's test `local_settings_are_run_s_defaults` pins them to its options.
    pub fn local() -> Settings {
        Settings {
            address: SocketAddr::from(([127, 0, 0, 1], 0)),
            invoke: pillion_invoke::Config::default(),
            locality: Default::default(),
            registry: "memory".into(),
            cluster: Default::default(),
            app: None,
            grace_period: Duration::from_secs(10),
            ready_file: None,
            worker_threads: None,
            inbound: None,
            broker: BrokerSettings {
                url: "embedded".into(),
                nats: Default::default(),
                api: Default::default(),
                push: Vec::new(),
                push_to: None,
                push_queue: "push-app".into(),
                advertise: None,
            },
            config_file: None,
            reload_period: Duration::from_secs(1),
            dns_servers: Vec::new(),
            tcp: Vec::new(),
            read_header_timeout: Duration::from_secs(10),
            read_body_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            listen_max_connections: 10_000,
            api_max_connections: 1024,
            api_token: None,
            api_tls: None,
            api_acme: None,
            mesh: None,
            trace: TraceSettings {
                otlp_traces_url: None,
                service_name: "pillion".into(),
                log_format: LogFormat::Text,
            },
        }
    }
}

/// Spans and logs.
#[derive(Debug, Clone)]
pub struct TraceSettings {
    /// Where spans are posted (`…/v1/traces`); none: no span is recorded.
    pub otlp_traces_url: Option<String>,
    /// `service.name` of the spans: `--server-name`, else `pillion`.
    pub service_name: String,
    pub log_format: LogFormat,
}

/// The mesh: this sidecar's identity, and its mesh listener.
#[derive(Debug, Clone)]
pub struct MeshSettings {
    pub identity: pillion_mesh::identity::MeshConfig,
    pub listen: Option<MeshListen>,
}

#[derive(Debug, Clone)]
pub struct MeshListen {
    pub addr: SocketAddr,
    /// The app's `host:port`, where calls are forwarded.
    pub app: String,
    pub allow: Vec<String>,
    /// The `[mesh]` rules, `--mesh-allow`'s last.
    pub rules: Arc<pillion_mesh::policy::Rules>,
    /// `[[rate_limits]]` with `listener = "mesh"`: a bucket per caller.
    pub limits: Arc<pillion_mesh::policy::Limits>,
    /// Distributed JWT: tokens travelling with calls are verified here.
    pub jwt: Option<pillion_mesh::jwt::JwtConfig>,
}

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
    /// HTTPS on `listen`.
    pub tls: Option<pillion_http::tls::CertFiles>,
    /// HTTPS on `listen` with certificates from an ACME CA (never with `tls`).
    pub acme: Option<pillion_mesh::acme::AcmeConfig>,
    /// JWT verification on `listen`.
    pub jwt: Option<pillion_mesh::jwt::JwtConfig>,
    /// `[[rate_limits]]` with `listener = "listen"`: a bucket per client address.
    pub limits: Arc<pillion_mesh::policy::Limits>,
    pub store: pillion_session::StoreUrl,
    /// How sessions bailiff stored are met.
    pub bailiff: pillion_session::redis::Bailiff,
    pub proxy: pillion_session::inbound::Config,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("unknown log format {s:?}: use text or json")),
        }
    }
}

/// The config file the `[[tcp]]` listeners are reloaded from, and how its text is
/// read (the binary's parser: pillion's TOML, or iaido's YAML).
#[derive(Clone)]
pub struct ConfigFile {
    pub path: PathBuf,
    pub read_tcp: TcpReader,
}

/// Reads the `[[tcp]]` listeners from the config file's text; the error names the
/// line.
pub type TcpReader =
    Arc<dyn Fn(&str) -> Result<Vec<pillion_tcp::ListenerConfig>, String> + Send + Sync>;

impl std::fmt::Debug for ConfigFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigFile")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}
