//! The one config loader: defaults, then the file (pillion's TOML, or iaido's YAML
//! read by [`crate::iaido`]), then `PILLION_*` environment variables, then flags, each
//! overriding the one before.
//!
//! Every option is declared once, in [`RunArgs`]: its flag, its environment variable
//! and its default (which `--help` shows). A key of the file is the flag with dashes
//! turned to underscores (`--healthcheck-interval` is `healthcheck_interval`), and its
//! value goes through the same parser as the flag's, so a bad value in the file is
//! reported with its line, and a key the loader does not know is an error rather
//! than silently ignored. The file's values are given to clap as flags placed
//! before the command line's, for the options that neither a flag nor the
//! environment set.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgAction, Args, Command, FromArgMatches};
use serde::Deserialize;

use crate::cli::RunArgs;

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

/// A config file, checked: the options it sets, as flags, and its `[[tcp]]`
/// listeners.
#[derive(Debug, Default)]
pub struct FileConfig {
    /// Option id (`healthcheck_interval`) and its values, each checked by the flag's
    /// parser.
    pub options: Vec<(String, Vec<String>)>,
    pub tcp: Vec<pillion_tcp::ListenerConfig>,
    /// The `[mesh]` table: rules for calls through `--mesh-listen`.
    pub mesh: Option<pillion_mesh::policy::MeshPolicyConfig>,
    /// The `[[rate_limits]]` of both listeners.
    pub rate_limits: Vec<pillion_mesh::policy::LimitConfig>,
    /// Warnings to print once at start (an iaido file: `pillion migrate` and what
    /// pillion does differently); a reload does not repeat them.
    pub notices: Vec<String>,
}

/// The `pillion run` options as clap sees them: a repeated single-valued flag
/// overrides the one before (the file's come first).
fn run_command() -> Command {
    RunArgs::augment_args(Command::new("pillion run").no_binary_name(true)).args_override_self(true)
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::read(path, &text).map_err(|message| ConfigError::File {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Parses `text`, read from `path`, as pillion's TOML or as iaido's YAML (see
    /// [`crate::iaido::is_iaido`]); the reload follows the file with this too.
    pub fn read(path: &Path, text: &str) -> Result<FileConfig, String> {
        if !crate::iaido::is_iaido(path, text) {
            return Self::parse(text);
        }
        let t = crate::iaido::parse(text).map_err(|e| {
            let bailiffs = serde_yaml_ng::from_str::<serde_json::Value>(text)
                .is_ok_and(|tree| crate::migration::is_bailiffs(&tree));
            if bailiffs {
                format!(
                    "this is bailiff's config file, not pillion's: write pillion's with \
                     `pillion migrate {}`",
                    path.display()
                )
            } else {
                e
            }
        })?;
        for (name, values) in &t.options {
            for v in values {
                check_value(name, v).map_err(|why| format!("{name} = {v:?}: {why}"))?;
            }
        }
        let shown = path.display();
        let mut notices = vec![format!(
            "warning: {shown} is iaido's YAML, read as it is; `pillion migrate {shown} > \
             pillion.toml` writes the same configuration as pillion's TOML"
        )];
        notices.extend(t.notices);
        Ok(FileConfig {
            options: t.options,
            tcp: t.tcp,
            mesh: None,
            rate_limits: Vec::new(),
            notices,
        })
    }

    /// Parses and checks the file's text; an error names the line and the key.
    pub fn parse(text: &str) -> Result<FileConfig, String> {
        type Spanned<T> = toml::Spanned<T>;
        let table: BTreeMap<Spanned<String>, Spanned<toml::Value>> =
            toml::from_str(text).map_err(|e| located(text, e.span(), e.message()))?;
        let cmd = run_command();
        let mut options = Vec::new();
        for (key, value) in &table {
            let name = key.get_ref().as_str();
            if matches!(name, "tcp" | "mesh" | "rate_limits") {
                continue;
            }
            let at = |message: String| located(text, Some(key.span()), &message);
            let arg = cmd
                .get_arguments()
                .find(|a| a.get_id() == name && name != "config")
                .ok_or_else(|| at(unknown_key(name, &cmd)))?;
            let repeatable = matches!(arg.get_action(), ArgAction::Append);
            let values = match value.get_ref() {
                toml::Value::Array(items) if repeatable => {
                    items.iter().map(scalar).collect::<Result<Vec<_>, _>>()
                }
                toml::Value::Table(t) if repeatable => t
                    .iter()
                    .map(|(k, v)| scalar(v).map(|v| format!("{k}={v}")))
                    .collect(),
                toml::Value::Array(_) | toml::Value::Table(_) => {
                    Err(format!("`{name}` takes one value, not a list or a table"))
                }
                v => scalar(v).map(|v| vec![v]),
            }
            .map_err(at)?;
            for v in &values {
                check_value(name, v).map_err(|why| {
                    located(text, Some(value.span()), &format!("{name} = {v:?}: {why}"))
                })?;
            }
            options.push((name.to_string(), values));
        }
        #[derive(Deserialize)]
        struct Tables {
            #[serde(default)]
            tcp: Vec<pillion_tcp::ListenerConfig>,
            mesh: Option<pillion_mesh::policy::MeshPolicyConfig>,
            #[serde(default)]
            rate_limits: Vec<pillion_mesh::policy::LimitConfig>,
        }
        let tables =
            toml::from_str::<Tables>(text).map_err(|e| located(text, e.span(), e.message()))?;
        pillion_tcp::config::validate(&tables.tcp)?;
        // Checked here (`pillion check` included), used when the sidecar resolves.
        use pillion_mesh::policy::{Limits, Listener, Rules};
        if let Some(mesh) = &tables.mesh {
            Rules::new(mesh, &[])?;
        }
        Limits::new(&tables.rate_limits, Listener::Mesh)?;
        Ok(FileConfig {
            options,
            tcp: tables.tcp,
            mesh: tables.mesh,
            rate_limits: tables.rate_limits,
            notices: Vec::new(),
        })
    }
}

impl FileConfig {
    /// The file as pillion's TOML, `header` first as comments, then each notice: what
    /// `pillion migrate` prints for another system's file.
    pub fn to_toml(&self, header: &str) -> String {
        let mut out = String::new();
        for line in header
            .lines()
            .chain(self.notices.iter().map(String::as_str))
        {
            out.push_str(&format!("# {line}\n"));
        }
        for (id, values) in &self.options {
            match values.as_slice() {
                [one] => out.push_str(&format!("{id} = {one:?}\n")),
                many => out.push_str(&format!("{id} = {many:?}\n")),
            }
        }
        let dur = |d: &pillion_core::Dur| pillion_core::duration::format(d.0);
        for l in &self.tcp {
            out.push_str(&format!(
                "\n[[tcp]]\nlisten = \"{}\"\nfailback_after = \"{}\"\nidle_timeout = \"{}\"\n\
                 connect_timeout = \"{}\"\ndown_for = \"{}\"\nlatency_bucket = \"{}\"\n\
                 rebalance_every = \"{}\"\n",
                l.listen,
                dur(&l.failback_after),
                dur(&l.idle_timeout),
                dur(&l.connect_timeout),
                dur(&l.down_for),
                dur(&l.latency_bucket),
                dur(&l.rebalance_every)
            ));
            for tier in &l.tiers {
                out.push_str(&format!(
                    "[[tcp.tiers]]\ntargets = {:?}\nservices = {:?}\nmax_connections = {}\n\
                     dial_timeout = \"{}\"\nhealth_check = \"{}\"\n",
                    tier.targets,
                    tier.services,
                    tier.max_connections,
                    dur(&tier.dial_timeout),
                    dur(&tier.health_check)
                ));
            }
        }
        out
    }
}

/// Checks one value of the option `name` with the flag's own parser: the value
/// alone, as a flag.
fn check_value(name: &str, value: &str) -> Result<(), String> {
    let flag = format!("--{}", name.replace('_', "-"));
    let alone = run_command().mut_args(|a| a.env(None::<&str>));
    alone
        .try_get_matches_from([format!("{flag}={value}")])
        .map(drop)
        .map_err(|e| {
            std::error::Error::source(&e)
                .map_or_else(|| first_line(&e.to_string()), |s| s.to_string())
        })
}

/// A TOML scalar as the text a flag would carry.
fn scalar(value: &toml::Value) -> Result<String, String> {
    match value {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        toml::Value::Datetime(d) => Ok(d.to_string()),
        toml::Value::Array(_) | toml::Value::Table(_) => {
            Err("a list or table where one value belongs".into())
        }
    }
}

fn first_line(message: &str) -> String {
    let line = message.lines().next().unwrap_or(message);
    line.strip_prefix("error: ").unwrap_or(line).to_string()
}

/// `message` prefixed with the line of `span` in `text`, and that line shown.
fn located(text: &str, span: Option<std::ops::Range<usize>>, message: &str) -> String {
    match span {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            let content = text.lines().nth(line - 1).unwrap_or("").trim();
            format!("line {line}: {message}\n    {line} | {content}")
        }
        None => message.to_string(),
    }
}

/// The error for a key that is no option, with the closest option's name.
fn unknown_key(name: &str, cmd: &Command) -> String {
    let closest = cmd
        .get_arguments()
        .map(|a| a.get_id().as_str())
        .filter(|id| *id != "config")
        .map(|id| (edit_distance(name, id), id))
        .min();
    match closest {
        Some((d, id)) if d <= 3 => format!("unknown key `{name}`; did you mean `{id}`?"),
        _ => format!(
            "unknown key `{name}`: the keys are the options of `pillion run --help` with '_' for '-'"
        ),
    }
}

/// A warning for each `PILLION_*` variable of `vars` that no command of pillion
/// reads (a typo such as `PILLION_REGSITRY` would otherwise be silently ignored),
/// with the closest one's name when it is near.
pub fn unknown_variables(vars: impl IntoIterator<Item = String>) -> Vec<String> {
    fn envs(cmd: &Command, into: &mut BTreeSet<String>) {
        into.extend(
            cmd.get_arguments()
                .filter_map(|a| a.get_env())
                .filter_map(|e| e.to_str().map(str::to_string)),
        );
        for sub in cmd.get_subcommands() {
            envs(sub, into);
        }
    }
    let mut known = BTreeSet::new();
    envs(
        &<crate::cli::Cli as clap::CommandFactory>::command(),
        &mut known,
    );
    envs(&run_command(), &mut known);
    vars.into_iter()
        .filter(|v| v.starts_with("PILLION_") && !known.contains(v))
        .map(|v| {
            let closest = known.iter().map(|k| (edit_distance(&v, k), k)).min();
            match closest {
                Some((d, k)) if d <= 3 => {
                    format!("warning: {v} is not a pillion setting and has no effect; did you mean {k}?")
                }
                _ => format!(
                    "warning: {v} is not a pillion setting and has no effect (the settings are PILLION_<OPTION> for the options of `pillion run --help`)"
                ),
            }
        })
        .collect()
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

/// `pillion run`'s options after merging, and which were given (by a flag, the
/// environment or the file) rather than defaulted.
pub struct Loaded {
    pub args: RunArgs,
    given: BTreeSet<String>,
    tcp: Vec<pillion_tcp::ListenerConfig>,
    mesh_policy: Option<pillion_mesh::policy::MeshPolicyConfig>,
    rate_limits: Vec<pillion_mesh::policy::LimitConfig>,
    /// The file's warnings, for the caller to print once.
    pub notices: Vec<String>,
}

impl Loaded {
    /// Merges `argv` (what follows `pillion run`) and the environment over the file
    /// named by `--config` (or `PILLION_CONFIG`) over the defaults.
    pub fn from_args(argv: Vec<OsString>) -> Result<Loaded, ConfigError> {
        let clap_error = |e: clap::Error| ConfigError::Invalid(first_line(&e.to_string()));
        let first = run_command()
            .try_get_matches_from(&argv)
            .map_err(clap_error)?;
        let mut merged: Vec<OsString> = Vec::new();
        let mut tcp = Vec::new();
        let mut mesh_policy = None;
        let mut rate_limits = Vec::new();
        let mut notices = Vec::new();
        if let Some(path) = first.get_one::<PathBuf>("config") {
            let file = FileConfig::load(path)?;
            for (id, values) in file.options {
                let set_elsewhere = matches!(
                    first.value_source(&id),
                    Some(ValueSource::CommandLine | ValueSource::EnvVariable)
                );
                if !set_elsewhere {
                    let flag = id.replace('_', "-");
                    merged.extend(values.iter().map(|v| format!("--{flag}={v}").into()));
                }
            }
            tcp = file.tcp;
            mesh_policy = file.mesh;
            rate_limits = file.rate_limits;
            notices = file.notices;
        }
        merged.extend(argv);
        notices.extend(unknown_variables(
            std::env::vars_os().filter_map(|(k, _)| k.into_string().ok()),
        ));
        let matches = run_command()
            .try_get_matches_from(merged)
            .map_err(clap_error)?;
        let given = run_command()
            .get_arguments()
            .map(|a| a.get_id().to_string())
            .filter(|id| {
                matches!(
                    matches.value_source(id),
                    Some(ValueSource::CommandLine | ValueSource::EnvVariable)
                )
            })
            .collect();
        let args = RunArgs::from_arg_matches(&matches).map_err(clap_error)?;
        Ok(Loaded {
            args,
            given,
            tcp,
            mesh_policy,
            rate_limits,
            notices,
        })
    }

    /// Whether the option `id` was set by a flag, the environment or the file.
    fn given(&self, id: &str) -> bool {
        self.given.contains(id)
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
    pub cluster: pillion_registry::cluster::ClusterOptions,
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

/// The mesh, from its flags; `app` gains the `mesh` metadata that advertises the
/// mesh listener.
fn resolve_mesh(
    loaded: &Loaded,
    app: Option<&mut pillion_registry::health::AppConfig>,
) -> Result<Option<MeshSettings>, ConfigError> {
    let args = &loaded.args;
    let invalid = |s: String| Err(ConfigError::Invalid(s));
    let Some(ca_cert) = args.mesh_ca_cert.clone() else {
        let given = [
            "mesh_issuer",
            "mesh_token",
            "mesh_token_file",
            "mesh_ca_key",
            "mesh_local_ca",
            "mesh_listen",
            "mesh_advertise",
            "mesh_allow",
            "mesh_cert_lifetime",
        ]
        .into_iter()
        .find(|id| loaded.given(id));
        if let Some(id) = given {
            return invalid(format!(
                "--{} ({id}) needs --mesh-ca-cert: the mesh's CA certificate (make the CA with `pillion mesh init --out DIR`)",
                id.replace('_', "-")
            ));
        }
        return Ok(None);
    };
    let Some(service) = args.server_name.clone() else {
        return invalid("--mesh-ca-cert (mesh_ca_cert) needs --server-name (server_name): the service this sidecar's mesh identity names".into());
    };
    // Refused at start (and by `pillion check`) rather than at the first call.
    pillion_mesh::ca::roots(&ca_cert).map_err(|e| ConfigError::Invalid(e.to_string()))?;
    let token = match (&args.mesh_token, &args.mesh_token_file) {
        (Some(_), Some(_)) => {
            return invalid(
                "--mesh-token (mesh_token) and --mesh-token-file (mesh_token_file) both give the join token: keep one".into(),
            )
        }
        (Some(t), None) => Some(t.trim().to_string()),
        (None, Some(file)) => Some(
            std::fs::read_to_string(file)
                .map_err(|e| {
                    ConfigError::Invalid(format!(
                        "--mesh-token-file (mesh_token_file) {}: {e}",
                        file.display()
                    ))
                })?
                .trim()
                .to_string(),
        ),
        (None, None) => None,
    };
    for url in &args.mesh_issuer {
        if !url.starts_with("https://") {
            return invalid(format!(
                "--mesh-issuer (mesh_issuer) {url:?} is not https://host:port (issuers serve HTTPS)"
            ));
        }
    }
    if args.mesh_local_ca && args.mesh_ca_key.is_none() {
        return invalid("--mesh-local-ca (mesh_local_ca) needs --mesh-ca-key (mesh_ca_key)".into());
    }
    use pillion_mesh::identity::Source;
    let source = match (args.mesh_ca_key.clone(), args.mesh_issuer.is_empty(), token) {
        (Some(_), false, _) => {
            return invalid("--mesh-ca-key (mesh_ca_key) and --mesh-issuer (mesh_issuer) are two ways to get certificates: with issuers, the CA key stays on their hosts".into())
        }
        (Some(_), true, Some(_)) | (None, true, Some(_)) => {
            return invalid("--mesh-token (mesh_token) needs --mesh-issuer (mesh_issuer): the issuer that takes it".into())
        }
        (Some(key), true, None) => {
            pillion_mesh::ca::Authority::load(&ca_cert, &key)
                .map_err(|e| ConfigError::Invalid(e.to_string()))?;
            if let Some(listen) = args.mesh_listen.filter(|l| !l.ip().is_loopback()) {
                if !args.mesh_local_ca {
                    return invalid(format!(
                        "--mesh-ca-key (mesh_ca_key) on a sidecar whose --mesh-listen {listen} other hosts reach: whoever holds the CA key can take any identity in the mesh. Keep the key on an issuer (`pillion mesh serve`) and start this sidecar with --mesh-issuer URL --mesh-token TOKEN, or say it is meant with --mesh-local-ca"
                    ));
                }
            }
            Source::LocalCa(key)
        }
        (None, false, Some(token)) => {
            if loaded.given("mesh_cert_lifetime") {
                return invalid("--mesh-cert-lifetime (mesh_cert_lifetime) is the life of the certificates a sidecar issues itself; with --mesh-issuer, the issuer's --mesh-cert-lifetime decides".into());
            }
            Source::Issuers {
                urls: args.mesh_issuer.clone(),
                token,
            }
        }
        (None, false, None) => {
            return invalid("--mesh-issuer (mesh_issuer) needs --mesh-token (or --mesh-token-file): a join token from `pillion mesh token --service NAME`".into())
        }
        (None, true, None) => {
            return invalid("--mesh-ca-cert (mesh_ca_cert) needs --mesh-issuer URL with --mesh-token TOKEN (certificates from the mesh's issuers), or --mesh-ca-key (this sidecar issues itself: one host, or development)".into())
        }
    };
    let lifetime = args.mesh_cert_lifetime.0;
    if lifetime < pillion_mesh::identity::MIN_LIFETIME {
        return invalid(format!(
            "--mesh-cert-lifetime (mesh_cert_lifetime) {} is too short: a mesh certificate is renewed at two thirds of its life, so it must live at least {} (hours are usual; the default is {})",
            pillion_core::duration::format(lifetime),
            pillion_core::duration::format(pillion_mesh::identity::MIN_LIFETIME),
            pillion_core::duration::format(pillion_mesh::identity::LIFETIME),
        ));
    }
    let identity = pillion_mesh::identity::MeshConfig {
        ca_cert,
        source,
        service: service.0,
        lifetime,
    };
    let Some(addr) = args.mesh_listen else {
        for id in ["mesh_advertise", "mesh_allow"] {
            if loaded.given(id) {
                return invalid(format!(
                    "--{} ({id}) needs --mesh-listen (mesh_listen)",
                    id.replace('_', "-")
                ));
            }
        }
        return Ok(Some(MeshSettings {
            identity,
            listen: None,
        }));
    };
    let Some(app) = app else {
        return invalid("--mesh-listen (mesh_listen) needs --server-address (server_address): the app that mesh calls are forwarded to".into());
    };
    let app_host = app
        .address
        .rsplit_once(':')
        .map_or(app.address.as_str(), |(h, _)| h);
    let app_local = app_host == "localhost"
        || app_host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !app_local && !args.mesh_permissive {
        return invalid(format!(
            "--server-address (server_address) {} is an address other hosts may reach: they could call the app directly, around --mesh-listen and its checks (a forged X-Pillion-Caller included). Bind the app to 127.0.0.1 and give --server-address 127.0.0.1:PORT: other hosts reach it through --mesh-listen. During a migration, --mesh-permissive allows it",
            app.address
        ));
    }
    let advertise = match &args.mesh_advertise {
        Some(a) => a.0.clone(),
        None if addr.ip().is_unspecified() && app_local => {
            return invalid(format!(
                "--mesh-listen (mesh_listen) {addr} needs --mesh-advertise (mesh_advertise) HOST:PORT: the address other hosts reach the mesh listener at"
            ));
        }
        None if addr.ip().is_unspecified() => format!("{app_host}:{}", addr.port()),
        None => addr.to_string(),
    };
    app.metadata
        .insert(pillion_core::service::MESH_METADATA.to_string(), advertise);
    let allow: Vec<String> = args.mesh_allow.iter().map(|s| s.0.clone()).collect();
    Ok(Some(MeshSettings {
        identity,
        listen: Some(MeshListen {
            addr,
            app: app.address.clone(),
            allow: allow.clone(),
            rules: Arc::new(
                pillion_mesh::policy::Rules::new(
                    &loaded.mesh_policy.clone().unwrap_or_default(),
                    &allow,
                )
                .map_err(ConfigError::Invalid)?,
            ),
            limits: Arc::new(rate_limits(loaded, pillion_mesh::policy::Listener::Mesh)?),
            jwt: resolve_jwt(loaded)?,
        }),
    }))
}

/// The `[[rate_limits]]` of `listener`.
fn rate_limits(
    loaded: &Loaded,
    listener: pillion_mesh::policy::Listener,
) -> Result<pillion_mesh::policy::Limits, ConfigError> {
    pillion_mesh::policy::Limits::new(&loaded.rate_limits, listener).map_err(ConfigError::Invalid)
}

/// `--jwt-*`, verified on --listen and --mesh-listen.
fn resolve_jwt(loaded: &Loaded) -> Result<Option<pillion_mesh::jwt::JwtConfig>, ConfigError> {
    let args = &loaded.args;
    let invalid = |s: String| Err(ConfigError::Invalid(s));
    let secret = match (&args.jwt_secret, &args.jwt_secret_file) {
        (Some(_), Some(_)) => {
            return invalid(
                "--jwt-secret (jwt_secret) and --jwt-secret-file (jwt_secret_file) both give \
                 the secret: keep one"
                    .into(),
            )
        }
        (Some(s), None) => Some(s.as_bytes().to_vec()),
        (None, Some(path)) => {
            let mut bytes = std::fs::read(path).map_err(|e| {
                ConfigError::Invalid(format!("--jwt-secret-file {}: {e}", path.display()))
            })?;
            while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                bytes.pop();
            }
            Some(bytes)
        }
        (None, None) => None,
    };
    if let Some(secret) = &secret {
        if secret.len() < 16 {
            return invalid(format!(
                "--jwt-secret is {} bytes long; a shared secret needs at least 16",
                secret.len()
            ));
        }
    }
    if args.jwt_jwks.is_none() && secret.is_none() {
        if let Some(id) = [
            "jwt_issuer",
            "jwt_audience",
            "jwt_required",
            "jwt_jwks_refresh",
            "jwt_subject_claim",
            "jwt_require_subject",
        ]
        .into_iter()
        .find(|id| loaded.given(id))
        {
            return invalid(format!(
                "--{} ({id}) needs --jwt-jwks (jwt_jwks) or --jwt-secret (jwt_secret): the \
                 keys tokens are checked with",
                id.replace('_', "-")
            ));
        }
        return Ok(None);
    }
    Ok(Some(pillion_mesh::jwt::JwtConfig {
        jwks: args.jwt_jwks.clone(),
        secret: secret.map(pillion_mesh::jwt::JwtSecret),
        issuer: args.jwt_issuer.clone(),
        audience: args.jwt_audience.clone(),
        required: args.jwt_required,
        refresh: args.jwt_jwks_refresh.0,
        subject_claim: args.jwt_subject_claim.clone(),
        subject_required: args.jwt_require_subject,
    }))
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
    pub store: String,
    /// How sessions bailiff stored are met.
    pub bailiff: pillion_session::redis::Bailiff,
    pub proxy: pillion_session::inbound::Config,
}

impl Settings {
    /// Checks what only makes sense together and builds the settings of each part.
    pub fn resolve(loaded: Loaded) -> Result<Settings, ConfigError> {
        let args = &loaded.args;
        let pool = pillion_http::pool::Settings {
            idle_timeout: args.pool_idle_timeout.0,
            ..Default::default()
        };
        if loaded.mesh_policy.is_some() && args.mesh_listen.is_none() {
            return Err(ConfigError::Invalid(
                "[mesh] rules are for calls through --mesh-listen (mesh_listen), which is not set"
                    .into(),
            ));
        }
        for limit in &loaded.rate_limits {
            use pillion_mesh::policy::Listener;
            let (set, flag) = match limit.listener {
                Listener::Mesh => (args.mesh_listen.is_some(), "--mesh-listen (mesh_listen)"),
                Listener::Listen => (args.listen.is_some(), "--listen (listen)"),
            };
            if !set {
                return Err(ConfigError::Invalid(format!(
                    "[[rate_limits]] {} is for {flag}, which is not set",
                    limit.name.as_deref().unwrap_or("(unnamed)")
                )));
            }
        }
        let inbound = resolve_inbound(&loaded, &pool)?;
        let broker = resolve_broker(args, inbound.as_ref())?;
        let metadata: BTreeMap<String, String> = args
            .server_metadata
            .iter()
            .map(|kv| (kv.0.clone(), kv.1.clone()))
            .collect();
        let locality = pillion_invoke::Locality {
            zone: metadata.get("zone").cloned(),
            region: metadata.get("region").cloned(),
        };
        let defaults = pillion_invoke::Config::default();
        let invoke = pillion_invoke::Config {
            mesh_permissive: args.mesh_permissive,
            handler: args.handler,
            rpc_codec: args.rpc_codec,
            namespace: args.namespace.clone().unwrap_or(defaults.namespace),
            timeout: args.timeout.0,
            wait_for_node: args.wait_for_node.0,
            max_body: args.max_body_size.0,
            policy: pillion_invoke::Policy {
                strategy: args.balancer,
                connect_timeout: args.connect_timeout.0,
                per_try_timeout: args.per_try_timeout.0,
                retries: args.retries,
                max_pending: args.max_pending.get(),
                ejection: defaults.policy.ejection,
            },
            pool,
        };
        let healthcheck_url = args.healthcheck_url.clone();
        let mut app = match (args.server_name.clone(), args.server_address.clone()) {
            (Some(name), Some(address)) => Some(pillion_registry::health::AppConfig {
                name: name.0,
                address: address.0,
                metadata,
                healthcheck_url: healthcheck_url.map(|u| u.0),
                healthcheck_interval: args.healthcheck_interval.0,
                healthcheck_timeout: args.healthcheck_timeout.0,
                register_ttl: args.register_ttl.0,
            }),
            // In the mesh, a sidecar without an app (a gateway) still has a name: its
            // identity.
            (Some(_), None) if args.mesh_ca_cert.is_some() => None,
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
        let mesh = resolve_mesh(&loaded, app.as_mut())?;
        if mesh.is_none() {
            let meshed = loaded
                .tcp
                .iter()
                .find(|l| l.tiers.iter().any(|t| !t.services.is_empty()));
            if let Some(listener) = meshed {
                return Err(ConfigError::Invalid(format!(
                    "[[tcp]] listen = \"{}\": a tier with services = [...] reaches them through their mesh listeners, which needs this sidecar in the mesh (--mesh-ca-cert with --mesh-issuer or --mesh-ca-key, and --server-name)",
                    listener.listen
                )));
            }
        }
        if let Some(app) = &app {
            check_app_registration(app)?;
        }
        let api_token = args.api_token.clone();
        match &api_token {
            Some(t) if t.len() < 16 => {
                return Err(ConfigError::Invalid(format!(
                    "--api-token (api_token) is {} characters long; use at least 16 \
                     (such as the output of `openssl rand -hex 16`)",
                    t.len()
                )))
            }
            None if !args.address.ip().is_loopback() => {
                return Err(ConfigError::Invalid(format!(
                    "--address {} is not a loopback address: anyone who reaches it could \
                     change the registry; give --api-token TOKEN (or PILLION_API_TOKEN)",
                    args.address
                )))
            }
            _ => {}
        }
        // ACME first: given with a file, the conflict is what to say.
        let api_acme = acme_config(&loaded, Served::Api)?;
        let api_tls = cert_files(&loaded, Served::Api)?;
        let api_https = api_tls.is_some() || api_acme.is_some();
        if api_https && args.api_plaintext {
            return Err(ConfigError::Invalid(
                "--api-plaintext (api_plaintext) and HTTPS on --address (--api-tls-cert or \
                 --api-acme-domain) contradict each other: keep one"
                    .into(),
            ));
        }
        if !api_https && !args.api_plaintext && !args.address.ip().is_loopback() {
            return Err(ConfigError::Invalid(format!(
                "--address {} is not a loopback address, and the API would be plain HTTP: \
                 its token and data would cross the network in clear. Serve it over HTTPS \
                 (--api-tls-cert FILE --api-tls-key FILE, or --api-acme-domain NAME), or \
                 give --api-plaintext (api_plaintext) to say plain HTTP is meant",
                args.address
            )));
        }
        let trace = TraceSettings {
            otlp_traces_url: args.otlp_endpoint.as_ref().map(|e| traces_url(&e.0)),
            service_name: args
                .server_name
                .as_ref()
                .map_or_else(|| "pillion".to_string(), |n| n.0.clone()),
            log_format: args.log_format,
        };
        Ok(Settings {
            trace,
            mesh,
            api_token,
            read_header_timeout: args.read_header_timeout.0,
            read_body_timeout: args.read_body_timeout.0,
            idle_timeout: args.idle_timeout.0,
            listen_max_connections: args.listen_max_connections.get(),
            api_max_connections: args.api_max_connections.get(),
            api_tls,
            api_acme,
            config_file: args.config.clone(),
            reload_period: args.reload_period.0,
            dns_servers: args.dns_server.clone(),
            tcp: loaded.tcp.clone(),
            broker,
            inbound,
            invoke,
            locality,
            address: args.address,
            registry: args.registry.0.clone(),
            cluster: resolve_cluster(&loaded)?,
            app,
            grace_period: args.grace_period.0,
            worker_threads: args.worker_threads.map(NonZeroUsize::get),
        })
    }
}

/// The OTLP/HTTP traces URL of an endpoint, as OpenTelemetry's exporters make it
/// from `OTEL_EXPORTER_OTLP_ENDPOINT`: `/v1/traces` appended, unless it is there.
fn traces_url(endpoint: &str) -> String {
    let base = endpoint.trim_end_matches('/');
    if base.ends_with("/v1/traces") {
        base.to_string()
    } else {
        format!("{base}/v1/traces")
    }
}

fn resolve_cluster(
    loaded: &Loaded,
) -> Result<pillion_registry::cluster::ClusterOptions, ConfigError> {
    let args = &loaded.args;
    let options = pillion_registry::cluster::ClusterOptions {
        bind: args.cluster_bind,
        join: args.cluster_join.iter().map(|h| h.0.clone()).collect(),
        key: args.cluster_key.clone(),
        mdns: args.cluster_mdns,
    };
    // The cluster options are checked only when they are used: a deployment may set
    // PILLION_CLUSTER_* for every sidecar and --registry etcd://... for some.
    if args.registry.0 != "cluster" {
        return Ok(options);
    }
    options
        .check()
        .map_err(|e| ConfigError::Invalid(e.to_string()))?;
    Ok(options)
}

fn resolve_broker(
    args: &RunArgs,
    inbound: Option<&InboundSettings>,
) -> Result<BrokerSettings, ConfigError> {
    use pillion_broker::{api::ApiConfig, topic, NatsSettings};
    let url = args.broker.0.clone();
    let durable = args.broker_durable.clone();
    for pattern in &durable {
        topic::check_pattern(pattern)
            .map_err(|e| ConfigError::Invalid(format!("--broker-durable (broker_durable): {e}")))?;
    }
    if !durable.is_empty() && !pillion_broker::nats::is_nats(&url) {
        return Err(ConfigError::Invalid(
            "--broker-durable (broker_durable) needs --broker nats://...: durable topics live in NATS JetStream".into(),
        ));
    }
    if args.broker_format == crate::cli::BrokerFormat::GoMicro
        && !pillion_broker::nats::is_nats(&url)
    {
        return Err(ConfigError::Invalid(
            "--broker-format go-micro (broker_format) needs --broker nats://...: it is how \
             go-micro's NATS broker writes messages"
                .into(),
        ));
    }
    let prefix = args.broker_dead_letter_prefix.clone();
    topic::check_publish(&prefix).map_err(|e| {
        ConfigError::Invalid(format!(
            "--broker-dead-letter-prefix (broker_dead_letter_prefix): {e}"
        ))
    })?;
    let push = args.broker_push.clone();
    let push_to = inbound
        .map(|i| i.proxy.app.clone())
        .or(args.server_address.clone().map(|a| a.0));
    if !push.is_empty() && push_to.is_none() {
        return Err(ConfigError::Invalid(
            "--broker-push (broker_push) needs the app's address: give --app or --server-address"
                .into(),
        ));
    }
    let api_defaults = ApiConfig::default();
    Ok(BrokerSettings {
        url,
        nats: NatsSettings {
            durable,
            max_deliver: args.broker_max_deliver.get(),
            ack_wait: args.broker_ack_wait.0,
            dead_letter_prefix: prefix,
            go_micro: args.broker_format == crate::cli::BrokerFormat::GoMicro,
        },
        api: ApiConfig {
            max_message: args.broker_max_message_size.0 as usize,
            buffer: args.broker_subscriber_buffer.get(),
            ping_interval: api_defaults.ping_interval,
        },
        push,
        push_to,
        push_queue: format!(
            "push-{}",
            args.server_name
                .as_ref()
                .map(|n| n
                    .0
                    .replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_"))
                .unwrap_or_else(|| "app".into())
        ),
        advertise: args.broker_advertise.clone().map(|a| a.0),
    })
}

/// The inbound proxy's settings, if `--listen` and `--app` are set; its options
/// without them are an error rather than silently unused.
fn resolve_inbound(
    loaded: &Loaded,
    pool: &pillion_http::pool::Settings,
) -> Result<Option<InboundSettings>, ConfigError> {
    use pillion_session::{codec, cookie, inbound};
    let args = &loaded.args;
    let (listen, app) = match (args.listen, args.app.clone()) {
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
            let inbound_only = run_command()
                .get_arguments()
                .map(|a| a.get_id().to_string())
                .find(|id| {
                    (id.starts_with("session_")
                        || id.starts_with("tls_")
                        // The CA's settings serve --api-acme-domain too.
                        || (id.starts_with("acme_")
                            && (id == "acme_domain" || args.api_acme_domain.is_empty()))
                        || (id.starts_with("jwt_") && args.mesh_listen.is_none())
                        || id == "app_timeout"
                        || (id == "listen_max_connections" && args.mesh_listen.is_none()))
                        && loaded.given(id)
                });
            if let Some(id) = inbound_only {
                return Err(ConfigError::Invalid(format!(
                    "--{} needs --listen and --app: it is an option of the inbound proxy",
                    id.replace('_', "-")
                )));
            }
            return Ok(None);
        }
    };
    let cookie = cookie::CookieConfig {
        name: args.session_cookie.0.clone(),
        path: args.session_cookie_path.clone(),
        domain: args.session_cookie_domain.clone(),
        secure: args.session_cookie_secure,
        http_only: args.session_cookie_http_only,
        same_site: Some(args.session_cookie_same_site),
        max_age: args.session_max_age.0,
    };
    if cookie.same_site == Some(cookie::SameSite::None) && !cookie.secure {
        return Err(ConfigError::Invalid(
            "--session-cookie-same-site none needs --session-cookie-secure: browsers drop SameSite=None cookies that are not Secure".into(),
        ));
    }
    let scheme = codec::Scheme::new(&args.session_header_prefix)
        .map_err(|e| ConfigError::Invalid(format!("--session-header-prefix: {e}")))?;
    let limits = codec::Limits {
        max_value: args.session_max_value_size.0 as usize,
        max_size: args.session_max_size.0 as usize,
    };
    let acme = resolve_acme(loaded)?;
    let tls = cert_files(loaded, Served::Listen)?;
    let jwt = resolve_jwt(loaded)?;
    let https = tls.is_some();
    Ok(Some(InboundSettings {
        listen,
        tls,
        acme,
        jwt,
        limits: Arc::new(rate_limits(loaded, pillion_mesh::policy::Listener::Listen)?),
        store: args.session_store.0.clone(),
        bailiff: pillion_session::redis::Bailiff {
            prefix: args.session_bailiff_prefix.clone().unwrap_or_default(),
            keep: args.session_format == crate::cli::SessionFormat::Bailiff,
        },
        proxy: inbound::Config {
            app: app.1,
            app_url: app.0,
            cookie,
            scheme,
            rolling: args.session_rolling,
            store_down: args.session_store_down,
            limits,
            connect_timeout: Duration::from_secs(1),
            app_timeout: args.app_timeout.0,
            pool: pool.clone(),
            https,
        },
    }))
}

/// `--acme-*`: certificates for `--listen` from an ACME CA, or none.
fn resolve_acme(loaded: &Loaded) -> Result<Option<pillion_mesh::acme::AcmeConfig>, ConfigError> {
    acme_config(loaded, Served::Listen)
}

/// Which listener a certificate is for: `--listen` (`--tls-*`, `--acme-domain`) or
/// the API's `--address` (`--api-tls-*`, `--api-acme-domain`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Served {
    Listen,
    Api,
}

impl Served {
    /// The ids of its ACME names, its certificate file and its key file.
    fn ids(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Served::Listen => ("acme_domain", "tls_cert", "tls_key"),
            Served::Api => ("api_acme_domain", "api_tls_cert", "api_tls_key"),
        }
    }

    fn listener(self) -> &'static str {
        match self {
            Served::Listen => "--listen",
            Served::Api => "--address",
        }
    }
}

fn flag(id: &str) -> String {
    format!("--{} ({id})", id.replace('_', "-"))
}

/// The ACME CA's settings, shared by both listeners, need names to order for.
fn check_acme_shared(loaded: &Loaded) -> Result<(), ConfigError> {
    let args = &loaded.args;
    if !args.acme_domain.is_empty() || !args.api_acme_domain.is_empty() {
        return Ok(());
    }
    let given = ["acme_directory", "acme_email", "acme_cache", "acme_ca_root"]
        .into_iter()
        .find(|id| loaded.given(id));
    match given {
        Some(id) => Err(ConfigError::Invalid(format!(
            "{} needs --acme-domain (acme_domain) or --api-acme-domain (api_acme_domain): \
             the name the certificate is for",
            flag(id)
        ))),
        None => Ok(()),
    }
}

/// Certificates from the ACME CA for one listener, or none.
fn acme_config(
    loaded: &Loaded,
    served: Served,
) -> Result<Option<pillion_mesh::acme::AcmeConfig>, ConfigError> {
    check_acme_shared(loaded)?;
    let args = &loaded.args;
    let invalid = |s: String| Err(ConfigError::Invalid(s));
    let (names_id, cert_id, key_id) = served.ids();
    let names = match served {
        Served::Listen => &args.acme_domain,
        Served::Api => &args.api_acme_domain,
    };
    if names.is_empty() {
        return Ok(None);
    }
    if let Some(id) = [cert_id, key_id].into_iter().find(|id| loaded.given(id)) {
        return invalid(format!(
            "{} and {} both give {} its certificate: keep {} for certificates from the \
             CA, or {} and {} for your own files",
            flag(names_id),
            flag(id),
            served.listener(),
            flag(names_id),
            flag(cert_id),
            flag(key_id),
        ));
    }
    let Some(cache) = args.acme_cache.clone() else {
        return invalid(format!(
            "{} needs --acme-cache DIR (acme_cache): where the account and the \
             certificate are kept across restarts (a directory on a persistent volume, \
             such as /var/lib/pillion/acme)",
            flag(names_id)
        ));
    };
    if let Some(root) = &args.acme_ca_root {
        // Refused at start rather than at the first order.
        pillion_mesh::acme::load_root(root).map_err(|e| ConfigError::Invalid(e.to_string()))?;
    }
    let mut domains: Vec<String> = Vec::new();
    for d in names {
        if !domains.contains(&d.0) {
            domains.push(d.0.clone());
        }
    }
    Ok(Some(pillion_mesh::acme::AcmeConfig {
        domains,
        directory: args.acme_directory.0.clone(),
        email: args.acme_email.clone().map(|e| e.0),
        // The API's certificate is kept apart from --listen's.
        cache: match served {
            Served::Listen => cache,
            Served::Api => cache.join("api"),
        },
        ca_root: args.acme_ca_root.clone(),
    }))
}

/// A listener's own certificate and key files (both or neither), checked now.
fn cert_files(
    loaded: &Loaded,
    served: Served,
) -> Result<Option<pillion_http::tls::CertFiles>, ConfigError> {
    let args = &loaded.args;
    let (_, cert_id, key_id) = served.ids();
    let (cert, key) = match served {
        Served::Listen => (args.tls_cert.clone(), args.tls_key.clone()),
        Served::Api => (args.api_tls_cert.clone(), args.api_tls_key.clone()),
    };
    match (cert, key) {
        (Some(cert), Some(key)) => {
            let files = pillion_http::tls::CertFiles {
                cert,
                key,
                flags: match served {
                    Served::Listen => "--tls",
                    Served::Api => "--api-tls",
                },
            };
            // Refused at start rather than at the first handshake.
            files
                .load()
                .map_err(|e| ConfigError::Invalid(e.to_string()))?;
            Ok(Some(files))
        }
        (None, None) => Ok(None),
        (Some(_), None) => Err(ConfigError::Invalid(format!(
            "{} needs {}",
            flag(cert_id),
            flag(key_id)
        ))),
        (None, Some(_)) => Err(ConfigError::Invalid(format!(
            "{} needs {}",
            flag(key_id),
            flag(cert_id)
        ))),
    }
}

/// A value type whose `FromStr` is one check, for a flag and the file alike.
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

/// Refuses at start an app registration that the registry would refuse through the
/// API (its limits are the same on every backend; see `pillion_core::service`), such
/// as `--server-metadata` larger than a gossip message carries.
fn check_app_registration(app: &pillion_registry::health::AppConfig) -> Result<(), ConfigError> {
    app.service().validate().map_err(|e| {
        ConfigError::Invalid(format!(
            "--server-metadata (server_metadata): the app's registration would be refused: {e}"
        ))
    })
}

checked_value!(
    /// `cluster`, `memory`, `mdns[://IPv4]` or `etcd://host:port[,host:port]`.
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
    /// An `http://` or `https://` URL of an OTLP/HTTP receiver, without credentials.
    OtlpEndpoint(String),
    |s| {
        let uri: http::Uri = s.parse().map_err(|e| format!("{s:?} is not a URL: {e}"))?;
        match (uri.scheme_str(), uri.authority()) {
            (_, Some(a)) if a.as_str().contains('@') => Err(
                "put no credentials in the URL: the collector must accept spans without them"
                    .to_string(),
            ),
            (Some("http" | "https"), Some(_)) if uri.query().is_none() => Ok(s.to_string()),
            _ => Err(format!(
                "{s:?} must look like http://127.0.0.1:4318 (spans go to its /v1/traces)"
            )),
        }
    }
);

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

checked_value!(
    /// `memory` or `redis://[:password@]host:port[/db]`.
    SessionStoreUrl(String),
    |s| pillion_session::check_url(s).map(|()| s.to_string()).map_err(|e| e.to_string())
);

checked_value!(
    /// `embedded`, `nats://host:port[,host:port]` or `tls://host:port[,host:port]`.
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

checked_value!(
    /// An `--acme-domain`: a DNS name, in lower case.
    AcmeDomain(String),
    pillion_mesh::acme::check_domain
);

checked_value!(
    /// An `--acme-directory`: an `https://` URL.
    AcmeDirectory(String),
    pillion_mesh::acme::check_directory
);

checked_value!(
    /// An `--acme-email`.
    AcmeEmail(String),
    pillion_mesh::acme::check_email
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
        let options: BTreeMap<_, _> = f.options.into_iter().collect();
        assert_eq!(options["register_ttl"], ["1m"]);
        assert_eq!(options["server_metadata"], ["zone=eu-1a"]);
        assert_eq!(options["worker_threads"], ["1"]);
        assert_eq!(options["session_rolling"], ["true"]);
        assert_eq!(options["broker_durable"], ["orders.*"]);
        assert_eq!(options.len(), 46, "every key is read: {:?}", options.keys());
    }

    /// Loads `argv` with `file` as the config file.
    fn load(argv: &[&str], file: Option<&str>) -> Result<Loaded, ConfigError> {
        let mut all: Vec<OsString> = argv.iter().map(OsString::from).collect();
        let path = file.map(|text| {
            let dir = std::env::temp_dir().join(format!(
                "pillion-config-unit-{}-{}",
                std::process::id(),
                pillion_core::id::uuid_v4()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("pillion.toml");
            std::fs::write(&path, text).unwrap();
            path
        });
        if let Some(p) = &path {
            all.extend(["--config".into(), p.into()]);
        }
        Loaded::from_args(all)
    }

    #[test]
    fn traces_and_logs_come_from_the_file_too() {
        let file = "otlp_endpoint = \"http://127.0.0.1:4318/\"\nlog_format = \"json\"\n";
        let s = Settings::resolve(
            load(
                &["--server-name", "front", "--server-address", "127.0.0.1:9"],
                Some(file),
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(
            s.trace.otlp_traces_url.as_deref(),
            Some("http://127.0.0.1:4318/v1/traces")
        );
        assert_eq!(s.trace.log_format, LogFormat::Json);
        assert_eq!(s.trace.service_name, "front");
        assert_eq!(traces_url("http://c/v1/traces"), "http://c/v1/traces");
        assert_eq!(
            traces_url("https://c:4318/otlp"),
            "https://c:4318/otlp/v1/traces"
        );
        let err = FileConfig::parse("log_format = \"xml\"\n").unwrap_err();
        assert!(
            err.contains("line 1") && err.contains("text or json"),
            "{err}"
        );
        for bad in [
            "127.0.0.1:4318",
            "ftp://c",
            "http://u:p@c:4318",
            "http://c?k=v",
        ] {
            assert!(bad.parse::<OtlpEndpoint>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_flag_beats_the_file_which_beats_the_default() {
        let file = "retries = 7\ntimeout = \"3s\"\nbroker_durable = [\"a.*\", \"b.*\"]\n";
        let l = load(&["--retries", "1"], Some(file)).unwrap();
        assert_eq!(l.args.retries, 1, "the flag wins");
        assert_eq!(
            l.args.timeout.0,
            Duration::from_secs(3),
            "the file beats the default"
        );
        assert_eq!(l.args.broker_durable, ["a.*", "b.*"]);
        assert_eq!(
            l.args.per_try_timeout.0,
            Duration::from_secs(5),
            "the default"
        );
        assert!(l.given("retries") && l.given("timeout") && !l.given("per_try_timeout"));
    }

    #[test]
    fn the_defaults_of_the_flags_are_the_libraries_defaults() {
        let s = Settings::resolve(
            load(
                &["--listen", "127.0.0.1:1", "--app", "http://127.0.0.1:2"],
                None,
            )
            .unwrap(),
        )
        .unwrap();
        let invoke = pillion_invoke::Config::default();
        assert_eq!(s.invoke.handler, invoke.handler);
        assert_eq!(s.invoke.timeout, invoke.timeout);
        assert_eq!(s.invoke.max_body, invoke.max_body);
        assert_eq!(s.invoke.policy.strategy, invoke.policy.strategy);
        assert_eq!(
            s.invoke.policy.connect_timeout,
            invoke.policy.connect_timeout
        );
        assert_eq!(
            s.invoke.policy.per_try_timeout,
            invoke.policy.per_try_timeout
        );
        assert_eq!(s.invoke.policy.retries, invoke.policy.retries);
        assert_eq!(s.invoke.policy.max_pending, invoke.policy.max_pending);
        assert_eq!(s.invoke.pool.idle_timeout, invoke.pool.idle_timeout);
        let inbound = s.inbound.unwrap().proxy;
        let cookie = pillion_session::cookie::CookieConfig::default();
        assert_eq!(
            (
                &inbound.cookie.name,
                &inbound.cookie.path,
                inbound.cookie.secure,
                inbound.cookie.http_only,
                inbound.cookie.same_site,
                inbound.cookie.max_age
            ),
            (
                &cookie.name,
                &cookie.path,
                cookie.secure,
                cookie.http_only,
                cookie.same_site,
                cookie.max_age
            )
        );
        let limits = pillion_session::codec::Limits::default();
        assert_eq!(
            (inbound.limits.max_value, inbound.limits.max_size),
            (limits.max_value, limits.max_size)
        );
        let nats = pillion_broker::NatsSettings::default();
        assert_eq!(s.broker.nats.max_deliver, nats.max_deliver);
        assert_eq!(s.broker.nats.ack_wait, nats.ack_wait);
        assert_eq!(s.broker.nats.dead_letter_prefix, nats.dead_letter_prefix);
        let api = pillion_broker::api::ApiConfig::default();
        assert_eq!(
            (s.broker.api.max_message, s.broker.api.buffer),
            (api.max_message, api.buffer)
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key_and_line() {
        let cases = [
            (
                "address = \"127.0.0.1:1\"\nadress = \"x\"\n",
                "line 2",
                "unknown key `adress`; did you mean `address`?",
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
                "memory, mdns or etcd://",
            ),
            ("server_address = \"nope\"\n", "line 1", "not host:port"),
            (
                "healthcheck_url = \"https://x/h\"\n",
                "line 1",
                "https health checks",
            ),
            ("worker_threads = 0\n", "line 1", "zero"),
            ("retries = [1, 2]\n", "line 1", "takes one value"),
            (
                "config = \"other.toml\"\n",
                "line 1",
                "unknown key `config`",
            ),
            (
                "[[tcp]]\nlisten = \"127.0.0.1:1\"\nbogus = 1\n",
                "line",
                "bogus",
            ),
            ("address = \n", "line 1", ""),
            ("handler = \"grpc\"\n", "line 1", "use rpc or proxy"),
            ("rpc_codec = \"proto\"\n", "line 1", "use http or jsonrpc"),
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
            ("broker = \"kafka://x:1\"\n", "line 1", "embedded, nats://"),
            ("broker_push = [\"orders\"]\n", "line 1", "TOPIC=/path"),
        ];
        for (text, line, want) in cases {
            let err = FileConfig::parse(text).unwrap_err();
            assert!(err.starts_with(line), "{text:?}: {err}");
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    /// README's option table lists every option with the default its declaration
    /// has (backticked; an option without a declared default shows none or a word).
    #[test]
    fn the_readme_table_lists_every_option_with_its_declared_default() {
        let readme = include_str!("../../../README.md");
        let (_, configuration) = readme.split_once("\n## Configuration\n").unwrap();
        let table = configuration.split("\n## ").next().unwrap();
        let rows: BTreeMap<String, String> = table
            .lines()
            .filter_map(|l| l.strip_prefix("| `--"))
            .map(|l| l.replace("\\|", "/"))
            .map(|l| {
                let flag = l.split([' ', '`']).next().unwrap().to_string();
                let default = l.split('|').nth(1).unwrap().trim().to_string();
                (flag, default)
            })
            .collect();
        for arg in run_command().get_arguments() {
            let flag = arg.get_long().unwrap();
            let row = rows
                .get(flag)
                .unwrap_or_else(|| panic!("--{flag} is missing from README's option table"));
            match arg.get_default_values() {
                [d] => assert_eq!(row, &format!("`{}`", d.to_string_lossy()), "--{flag}"),
                _ => assert!(
                    !row.starts_with('`') || row == "`--address`",
                    "--{flag}: {row}"
                ),
            }
        }
        assert_eq!(
            rows.len(),
            run_command().get_arguments().count(),
            "README lists options that do not exist"
        );
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
