//! Settings of the systems pillion replaces, read so that none is ignored without a
//! word: micro's underscore flags (`--server_name`) and `MICRO_*` variables, bailiff's
//! `BAILIFF_*` variables, and iaido's camelCase flags (`--bootstrapAddr`).
//!
//! Each old setting is either rewritten to pillion's own option before clap sees the
//! command line, with a one-line deprecation notice, or refused with a message that
//! names pillion's equivalent. [`migrate`] is a pure function of the command line and
//! the environment; `main` prints its notices and sets the variables it gives.
//!
//! [`migrate_file`] is `pillion migrate FILE`: iaido's YAML (read by [`crate::iaido`])
//! or bailiff's config file (its keys are its `BAILIFF_*` variables, nested), written
//! as pillion's TOML.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::Path;

/// What [`migrate`] made of the command line and the environment.
#[derive(Debug, Default, PartialEq)]
pub struct Migrated {
    /// The command line with every old spelling replaced.
    pub argv: Vec<OsString>,
    /// `PILLION_*` variables to set; none of them is set already.
    pub env: Vec<(String, String)>,
    /// One line per old setting accepted.
    pub notices: Vec<String>,
}

/// What one old micro or iaido flag becomes.
#[derive(Clone, Copy)]
enum Rule {
    /// The same option under pillion's name.
    Rename(&'static str),
    /// A whole number of seconds, to pillion's duration option.
    Seconds(&'static str),
    /// The flag takes no value and pillion always does what it asked for.
    AlwaysOn(&'static str),
    /// A value that pillion gives no option for: the notice says why.
    Dropped(&'static str),
    /// micro's `--registry NAME` (a name where pillion takes a URL).
    Registry,
    RegistryAddress,
    /// micro's `--broker NAME`.
    Broker,
    BrokerAddress,
    /// micro's CLI `--proxy_address HOST:PORT`: the sidecar the CLI talks through.
    Sidecar,
    /// micro's `--enable_tls`/`--enable_acme`: HTTPS on the API, which the flags
    /// named here give (an error when they are missing, as micro's was).
    Https(&'static str),
    Refuse(&'static str),
}

const TLS: &str = "the API's clients show the bearer token of --api-token, not a client \
    certificate; sidecars reach each other over mTLS with --mesh-ca-cert/--mesh-ca-key";
const TRANSPORT: &str = "pillion calls nodes over HTTP/1.1 or h2c (node metadata \
    protocol=h2c) and needs no transport, codec or client plugin";

/// micro's flags (go-micro's and the sidecar's) and iaido's, by their old names.
fn rule(name: &str) -> Option<Rule> {
    use Rule::*;
    Some(match name {
        "server_name" => Rename("server-name"),
        "server_address" => Rename("server-address"),
        "server_metadata" => Rename("server-metadata"),
        "healthcheck_url" => Rename("healthcheck-url"),
        "healthcheck_interval" => Seconds("healthcheck-interval"),
        "register_ttl" => Seconds("register-ttl"),
        "register_interval" => Dropped(
            "pillion refreshes a registration every third of --register-ttl",
        ),
        "sidecar_address" => Rename("address"),
        "client_retries" => Rename("retries"),
        "client_request_timeout" => Rename("timeout"),
        "client_pool_ttl" => Rename("pool-idle-timeout"),
        "enable_stats" => AlwaysOn("the stats are always on: /dashboard, /statusz and /metrics"),
        "registry" => Registry,
        "registry_address" => RegistryAddress,
        "broker" => Broker,
        "broker_address" => BrokerAddress,
        "proxy_address" => Sidecar,
        "server_version" => Refuse(
            "pillion registers the app without a version; register versioned services with POST /registry",
        ),
        "server_id" => Refuse("pillion names the app's node itself (NAME-<random>)"),
        "server_advertise" => {
            Refuse("give the address other services should use as --server-address HOST:PORT")
        }
        "client_pool_size" => Refuse(
            "pillion's pools grow as calls need; cap the calls in flight to one node with --max-pending N",
        ),
        "selector" => Refuse(
            "choose the balancer with --balancer (p2c-ewma, round-robin, random, least-request)",
        ),
        // micro served its own API over HTTPS: pillion's --address does too.
        "enable_tls" => Https("--api-tls-cert FILE --api-tls-key FILE"),
        "tls_cert_file" => Rename("api-tls-cert"),
        "tls_key_file" => Rename("api-tls-key"),
        "tls_client_ca_file" => Refuse(TLS),
        "enable_acme" => Https("--api-acme-domain NAME --acme-cache DIR"),
        "acme_hosts" => Rename("api-acme-domain"),
        "acme_provider" => Dropped(
            "pillion orders from the ACME CA of --acme-directory (Let's Encrypt by default)",
        ),
        "transport" | "transport_address" | "client" | "server" | "codec" => Refuse(TRANSPORT),
        // iaido
        "bootstrapAddr" => Rename("bootstrap-addr"),
        "reloadPeriod" => Rename("reload-period"),
        "check" => Refuse("check a config file with `pillion check FILE`"),
        // iaido's file keys, as flags: the options they are in its file.
        "diagAddr" => Rename("address"),
        "gracePeriod" => Rename("grace-period"),
        _ => return None,
    })
}

/// iaido's command line has no command (`iaido -c iaido.yaml`): when the first
/// argument is one of iaido's flags, the command it means: `check` for `--check`,
/// `bootstrap` when a binding is given, `run` otherwise.
fn iaido_command(argv: &[OsString]) -> Option<&'static str> {
    let name = |a: &OsString| {
        let text = a.to_str().unwrap_or("");
        text.split_once('=').map_or(text, |(n, _)| n).to_string()
    };
    let first = name(argv.get(1)?);
    let is_iaidos = matches!(
        first.as_str(),
        "--config"
            | "--bootstrap"
            | "-b"
            | "--bootstrapAddr"
            | "--reloadPeriod"
            | "--force"
            | "-f"
            | "--diagAddr"
            | "--gracePeriod"
    ) || (first.starts_with("-c") && !first.starts_with("--"));
    if !is_iaidos {
        return None;
    }
    let given = |flags: &[&str]| argv[1..].iter().any(|a| flags.contains(&name(a).as_str()));
    Some(if given(&["--check"]) {
        "check"
    } else if given(&["--bootstrap", "-b"]) {
        "bootstrap"
    } else {
        "run"
    })
}

/// The old micro flags that take no value.
fn is_switch(name: &str) -> bool {
    matches!(
        name,
        "enable_stats" | "enable_tls" | "enable_acme" | "check"
    )
}

/// micro's registries by name, as pillion's `--registry` URL. micro's etcd registry
/// is go-micro's, whose keys its Go services share: the URL keeps that layout.
fn registry_url(kind: &str, address: Option<&str>) -> Result<String, String> {
    match kind {
        "etcd" => Ok(format!(
            "etcd://{}?layout=go-micro",
            address.unwrap_or("127.0.0.1:2379")
        )),
        // go-micro's mDNS registry, which pillion speaks.
        "mdns" => Ok("mdns".into()),
        other => Err(format!(
            "micro's --registry {other}: pillion's registries are cluster (the default), \
             memory, mdns and etcd://HOST:PORT"
        )),
    }
}

fn broker_url(kind: &str, address: Option<&str>) -> Result<String, String> {
    match kind {
        "nats" => Ok(format!("nats://{}", address.unwrap_or("127.0.0.1:4222"))),
        "http" | "embedded" => Ok("embedded".into()),
        other => Err(format!(
            "micro's --broker {other}: pillion's brokers are embedded (the default) and nats://HOST:PORT"
        )),
    }
}

/// Whether a `--registry`/`--broker` value is pillion's own (a URL or a keyword it
/// takes) rather than a micro plugin name.
fn is_url(value: &str) -> bool {
    value.contains("://") || matches!(value, "cluster" | "memory" | "mdns" | "embedded")
}

/// An old spelling of one of pillion's own flags: `--foo_bar` or `--fooBar` for
/// `--foo-bar`.
fn kebab(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for c in name.chars() {
        match c {
            '_' => out.push('-'),
            c if c.is_ascii_uppercase() => {
                out.push('-');
                out.push(c.to_ascii_lowercase());
            }
            c => out.push(c),
        }
    }
    out
}

/// The long flags of every pillion command.
fn pillion_flags() -> BTreeSet<String> {
    fn walk(cmd: &clap::Command, out: &mut BTreeSet<String>) {
        out.extend(
            cmd.get_arguments()
                .filter_map(|a| a.get_long().map(str::to_string)),
        );
        for sub in cmd.get_subcommands() {
            walk(sub, out);
        }
    }
    let mut out = BTreeSet::new();
    walk(
        &<crate::cli::Cli as clap::CommandFactory>::command(),
        &mut out,
    );
    out
}

/// The flags (as `(flag, value)`) that the old ones in `old` stand for.
struct Translator {
    flags: BTreeSet<String>,
    out: Vec<(String, Option<String>)>,
    notices: Vec<String>,
    registry: Option<(String, String)>,
    registry_address: Option<String>,
    broker: Option<(String, String)>,
    broker_address: Option<String>,
    /// `--enable_tls`/`--enable_acme` as given, with the flags they need.
    https: Vec<(String, &'static str)>,
}

impl Translator {
    fn new() -> Translator {
        Translator {
            flags: pillion_flags(),
            out: Vec::new(),
            notices: Vec::new(),
            registry: None,
            registry_address: None,
            broker: None,
            broker_address: None,
            https: Vec::new(),
        }
    }

    /// Whether `name` is a setting this translator reads; `from` is how the user
    /// wrote it (`--server_name`, `MICRO_SERVER_NAME`), for messages.
    fn knows(&self, name: &str) -> bool {
        rule(name).is_some() || (name != kebab(name) && self.flags.contains(&kebab(name)))
    }

    fn take(&mut self, name: &str, from: &str, value: Option<String>) -> Result<(), String> {
        let need = |v: Option<String>| v.ok_or_else(|| format!("{from} needs a value"));
        let Some(rule) = rule(name) else {
            let flag = kebab(name);
            self.notices
                .push(format!("warning: {from} is an old spelling; use --{flag}"));
            self.out.push((flag, value));
            return Ok(());
        };
        match rule {
            Rule::Rename(flag) => {
                self.notices
                    .push(format!("warning: {from} is deprecated; use --{flag}"));
                self.out.push((flag.into(), value));
            }
            Rule::Seconds(flag) => {
                let v = need(value)?;
                let v = if v.chars().all(|c| c.is_ascii_digit()) {
                    format!("{v}s")
                } else {
                    v
                };
                self.notices
                    .push(format!("warning: {from} is deprecated; use --{flag} {v}"));
                self.out.push((flag.into(), Some(v)));
            }
            Rule::AlwaysOn(why) => {
                if matches!(value.as_deref(), Some("false")) {
                    return Err(format!("{from}=false cannot be had: {why}"));
                }
                self.notices
                    .push(format!("warning: {from} is not needed: {why}"));
            }
            Rule::Dropped(why) => {
                self.notices
                    .push(format!("warning: {from} has no effect: {why}"));
            }
            Rule::Registry => {
                let v = need(value)?;
                if is_url(&v) {
                    self.out.push(("registry".into(), Some(v)));
                } else {
                    self.registry = Some((from.to_string(), v));
                }
            }
            Rule::RegistryAddress => self.registry_address = Some(need(value)?),
            Rule::Broker => {
                let v = need(value)?;
                if is_url(&v) {
                    self.out.push(("broker".into(), Some(v)));
                } else {
                    self.broker = Some((from.to_string(), v));
                }
            }
            Rule::BrokerAddress => self.broker_address = Some(need(value)?),
            Rule::Sidecar => {
                let v = need(value)?;
                let url = if v.contains("://") {
                    v
                } else {
                    format!("http://{v}")
                };
                self.notices.push(format!(
                    "warning: {from} is deprecated; use --sidecar {url}"
                ));
                self.out.push(("sidecar".into(), Some(url)));
            }
            Rule::Https(needs) => {
                if matches!(value.as_deref(), Some("false")) {
                    return Ok(());
                }
                self.notices.push(format!(
                    "warning: {from} is not needed: the API (--address) is HTTPS when given {needs}"
                ));
                self.https.push((from.to_string(), needs));
            }
            Rule::Refuse(why) => return Err(format!("{from} is not supported: {why}")),
        }
        Ok(())
    }

    /// The registry and broker, once both halves of micro's pairs are known.
    fn finish(&mut self, prefix: &str) -> Result<(), String> {
        let pairs = [
            (
                "registry",
                self.registry.take(),
                self.registry_address.take(),
            ),
            ("broker", self.broker.take(), self.broker_address.take()),
        ];
        for (flag, kind, address) in pairs {
            let (kind, url) = match (kind, address) {
                (None, None) => continue,
                (Some((_, kind)), address) => {
                    let url = if flag == "registry" {
                        registry_url(&kind, address.as_deref())?
                    } else {
                        broker_url(&kind, address.as_deref())?
                    };
                    (kind, url)
                }
                (None, Some(_)) => {
                    return Err(format!(
                        "{prefix}{flag}_address needs {prefix}{flag} NAME; pillion's form is --{flag} {}",
                        if flag == "registry" { "etcd://HOST:PORT" } else { "nats://HOST:PORT" }
                    ))
                }
            };
            // micro's NATS broker is go-micro's: its messages are in go-micro's envelope.
            let format = (flag == "broker" && url.starts_with("nats://")).then_some("go-micro");
            self.notices.push(format!(
                "warning: {prefix}{flag} {kind} is micro's spelling; use --{flag} {url}{}",
                format.map_or(String::new(), |f| format!(" --broker-format {f}"))
            ));
            self.out.push((flag.into(), Some(url)));
            if let Some(format) = format {
                self.out.push(("broker-format".into(), Some(format.into())));
            }
        }
        Ok(())
    }
}

/// Rewrites micro's and iaido's flags in `argv` and reads `MICRO_*` and `BAILIFF_*`
/// from `env`; `is_set` says whether a `PILLION_*` variable is set already (it wins).
pub fn migrate(
    argv: Vec<OsString>,
    env: &[(String, String)],
    is_set: impl Fn(&str) -> bool,
) -> Result<Migrated, String> {
    let iaido = iaido_command(&argv);
    let mut args = argv.into_iter();
    let mut out: Vec<OsString> = args.next().into_iter().collect();
    let mut t = Translator::new();
    let mut iaido_notice = None;
    if let Some(command) = iaido {
        iaido_notice = Some(format!(
            "warning: pillion has commands; iaido's command line runs as `pillion {command} ...`"
        ));
        out.push(command.into());
    }
    // Old flags given before the command (micro's globals: `micro --enable_tls
    // sidecar`) are moved after it, where pillion's options belong.
    let mut before: Vec<OsString> = Vec::new();
    let mut command_at: Option<usize> = None;
    let mut rest = args.peekable();
    while let Some(arg) = rest.next() {
        let Some(text) = arg.to_str().map(str::to_string) else {
            out.push(arg);
            continue;
        };
        // iaido's `-c FILE --check` is the command `check` itself.
        if iaido == Some("check") && text == "--check" {
            continue;
        }
        if text == "--" {
            out.push(arg);
            out.extend(rest.by_ref());
            break;
        }
        let flag = text.strip_prefix("--").filter(|f| !f.is_empty());
        let Some((name, inline)) = flag.map(|f| match f.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (f.to_string(), None),
        }) else {
            if command_at.is_none() && !text.starts_with('-') {
                command_at = Some(out.len());
            }
            out.push(arg);
            continue;
        };
        if !t.knows(&name) {
            out.push(arg);
            continue;
        }
        let inline_given = inline.clone();
        let value = match inline {
            Some(v) => Some(v),
            None if is_switch(&name) => None,
            None => match rest.peek().and_then(|v| v.to_str()) {
                Some(v) if !v.starts_with("--") => {
                    let v = v.to_string();
                    rest.next();
                    Some(v)
                }
                _ => None,
            },
        };
        // pillion's own `--registry URL` and `--broker URL` stay as they were written.
        if matches!(name.as_str(), "registry" | "broker") && value.as_deref().is_some_and(is_url) {
            out.push(arg);
            if inline_given.is_none() {
                out.extend(value.map(OsString::from));
            }
            continue;
        }
        let start = t.out.len();
        t.take(&name, &format!("--{name}"), value)?;
        let made = t
            .out
            .drain(start..)
            .flat_map(|(flag, value)| as_args(&flag, value));
        if command_at.is_none() {
            before.extend(made);
        } else {
            out.extend(made);
        }
    }
    t.finish("--")?;
    let tail: Vec<OsString> = t.out.drain(..).flat_map(|(f, v)| as_args(&f, v)).collect();
    let at = command_at.map_or(out.len(), |i| i + 1);
    out.splice(at..at, before.into_iter().chain(tail));

    let mut migrated = Migrated {
        argv: out,
        env: Vec::new(),
        notices: iaido_notice
            .into_iter()
            .chain(t.notices.drain(..))
            .collect(),
    };
    micro_env(env, &mut t, &mut migrated)?;
    https_given(&t, &migrated, &is_set)?;
    bailiff_env(env, &mut migrated)?;
    migrated.env.retain(|(key, _)| {
        let set = is_set(key);
        if set {
            migrated.notices.push(format!(
                "warning: {key} is set, so it wins over the old setting that would set it"
            ));
        }
        !set
    });
    Ok(migrated)
}

fn as_args(flag: &str, value: Option<String>) -> Vec<OsString> {
    match value {
        Some(v) => vec![format!("--{flag}={v}").into()],
        None => vec![format!("--{flag}").into()],
    }
}

/// `PILLION_FOO_BAR` for the option `foo-bar`.
fn pillion_var(flag: &str) -> String {
    format!("PILLION_{}", flag.replace('-', "_").to_ascii_uppercase())
}

/// micro refused `--enable_tls` without its files (and `--enable_acme` without its
/// hosts): so does pillion, rather than serve the API in plain HTTP unasked.
fn https_given(
    t: &Translator,
    migrated: &Migrated,
    is_set: &impl Fn(&str) -> bool,
) -> Result<(), String> {
    for (from, needs) in &t.https {
        let flag = needs.split(' ').next().unwrap_or_default();
        let var = pillion_var(flag.trim_start_matches("--"));
        let given = migrated.argv.iter().any(|a| {
            a.to_str()
                .is_some_and(|a| a == flag || a.starts_with(&format!("{flag}=")))
        }) || migrated.env.iter().any(|(k, _)| *k == var)
            || is_set(&var);
        if !given {
            return Err(format!(
                "{from} asks for HTTPS on the API, which needs {needs} (micro's \
                 --tls_cert_file/--tls_key_file or --acme_hosts)"
            ));
        }
    }
    Ok(())
}

/// `MICRO_SERVER_NAME` is micro's `--server_name`, through the same rules.
fn micro_env(
    env: &[(String, String)],
    t: &mut Translator,
    migrated: &mut Migrated,
) -> Result<(), String> {
    for (key, value) in env {
        let Some(name) = key.strip_prefix("MICRO_") else {
            continue;
        };
        let name = name.to_ascii_lowercase();
        if rule(&name).is_none() {
            migrated.notices.push(format!(
                "warning: {key} is not a micro setting pillion knows; it has no effect"
            ));
            continue;
        }
        t.take(&name, key, Some(value.clone()))?;
    }
    t.finish("MICRO_")?;
    migrated.notices.append(&mut t.notices);
    for (flag, value) in t.out.drain(..) {
        match flag.as_str() {
            // A client setting, not one of `run`'s.
            "sidecar" => migrated
                .env
                .push(("PILLION_SIDECAR".into(), value.unwrap_or_default())),
            _ => migrated
                .env
                .push((pillion_var(&flag), value.unwrap_or_else(|| "true".into()))),
        }
    }
    Ok(())
}

/// `pillion migrate FILE`: pillion's TOML for iaido's YAML, or for bailiff's config
/// file (`config.{yaml,yml,json,toml}`); anything else is refused.
pub fn migrate_file(path: &Path, text: &str) -> Result<String, String> {
    let shown = path.display();
    let toml_name = path.extension().is_some_and(|e| e == "toml");
    let tree: Option<serde_json::Value> = if toml_name {
        toml::from_str(text).ok()
    } else {
        serde_yaml_ng::from_str(text).ok()
    };
    if let Some(tree) = tree.filter(is_bailiffs) {
        let mut flat = Vec::new();
        flatten("BAILIFF", &tree, &mut flat)?;
        let mut migrated = Migrated::default();
        bailiff_env(&flat, &mut migrated)?;
        let file = crate::config::FileConfig {
            options: migrated
                .env
                .into_iter()
                .map(|(var, value)| {
                    let id = var.trim_start_matches("PILLION_").to_ascii_lowercase();
                    (id, vec![value])
                })
                .collect(),
            tcp: Vec::new(),
            mesh: None,
            rate_limits: Vec::new(),
            notices: migrated.notices,
            lines: Default::default(),
        };
        return Ok(file.to_toml(&format!(
            "pillion's configuration, written by `pillion migrate {shown}` from bailiff's file."
        )));
    }
    if toml_name || !crate::iaido::is_iaido(path, text) {
        return Err(format!(
            "{shown} is neither iaido's YAML nor bailiff's config file; pillion's TOML \
             needs no migration (check it with `pillion check {shown}`)"
        ));
    }
    let file = crate::iaido::parse(text).map_err(|e| format!("config file {shown}: {e}"))?;
    Ok(file.to_toml(&format!(
        "pillion's configuration, written by `pillion migrate {shown}` from iaido's file."
    )))
}

/// bailiff's config file, and its settings as `BAILIFF_*` variables.
pub type BailiffFile = (std::path::PathBuf, Vec<(String, String)>);

/// bailiff's config file where bailiff (viper) looked for it: `config.yaml`, `.yml`,
/// `.json` or `.toml` in `/etc/bailiff/`, `$HOME/.bailiff/`, then the working
/// directory; the first found that is bailiff's, with its settings as the `BAILIFF_*`
/// variables they stand for. In the working directory, a file must name more than a
/// `port` to be taken for bailiff's (an app's own `config.yaml` often has one).
pub fn bailiff_file(dirs: &[std::path::PathBuf]) -> Result<Option<BailiffFile>, String> {
    for (i, dir) in dirs.iter().enumerate() {
        for ext in ["yaml", "yml", "json", "toml"] {
            let path = dir.join(format!("config.{ext}"));
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let tree: Option<serde_json::Value> = if ext == "toml" {
                toml::from_str(&text).ok()
            } else {
                serde_yaml_ng::from_str(&text).ok()
            };
            let Some(tree) = tree.filter(is_bailiffs) else {
                continue;
            };
            let only_port = tree
                .as_object()
                .is_some_and(|o| o.keys().all(|k| k.eq_ignore_ascii_case("port")));
            if i == dirs.len() - 1 && only_port {
                continue;
            }
            let mut flat = Vec::new();
            flatten("BAILIFF", &tree, &mut flat).map_err(|e| format!("{}: {e}", path.display()))?;
            return Ok(Some((path, flat)));
        }
    }
    Ok(None)
}

/// bailiff's file has only bailiff's top-level keys (viper: any case).
pub fn is_bailiffs(tree: &serde_json::Value) -> bool {
    tree.as_object().is_some_and(|o| {
        !o.is_empty()
            && o.keys().all(|k| {
                matches!(
                    k.to_ascii_lowercase().as_str(),
                    "port" | "proxy" | "rolling" | "cookie" | "headers" | "store"
                )
            })
    })
}

/// viper's nested keys as the variables that set them: `Cookie: {MaxAge: 60}` is
/// `BAILIFF_COOKIE_MAXAGE=60`.
fn flatten(
    prefix: &str,
    value: &serde_json::Value,
    out: &mut Vec<(String, String)>,
) -> Result<(), String> {
    use serde_json::Value;
    match value {
        Value::Object(o) => {
            for (k, v) in o {
                flatten(&format!("{prefix}_{}", k.to_ascii_uppercase()), v, out)?;
            }
        }
        Value::Null => {}
        Value::String(s) => out.push((prefix.to_string(), s.clone())),
        Value::Bool(_) | Value::Number(_) => out.push((prefix.to_string(), value.to_string())),
        Value::Array(_) => {
            return Err(format!(
                "{prefix} is a list; bailiff's settings each take one value"
            ))
        }
    }
    Ok(())
}

/// bailiff's configuration (viper, prefix `BAILIFF_`): `Port`, `Proxy`, `Rolling`,
/// `Cookie.*`, `Headers.*`, `Store.Redis.*`. Where bailiff's defaults differ from
/// pillion's (it listened on :80, proxied to port 8000 and kept sessions in Redis on
/// localhost:6379), a bailiff setup keeps bailiff's, each with its notice.
fn bailiff_env(env: &[(String, String)], migrated: &mut Migrated) -> Result<(), String> {
    if !env.iter().any(|(k, _)| k.starts_with("BAILIFF_")) {
        return Ok(());
    }
    let get = |k: &str| {
        env.iter()
            .find(|(key, _)| key.strip_prefix("BAILIFF_") == Some(k))
            .map(|(_, v)| v.as_str())
    };
    let mut notes = Vec::new();
    let mut set: Vec<(String, String)> = Vec::new();
    let mut used = BTreeSet::new();
    // One setting, given or defaulted: `shown` is its value as a notice may print it.
    let mut put = |old: &str, var: &str, value: String, shown: &str, given: bool| {
        let flag = var
            .trim_start_matches("PILLION_")
            .replace('_', "-")
            .to_ascii_lowercase();
        notes.push(if given {
            format!("warning: BAILIFF_{old} is deprecated; use --{flag} {shown} ({var})")
        } else {
            format!("warning: bailiff's default for {old} is kept: --{flag} {shown} ({var})")
        });
        set.push((var.to_string(), value));
    };
    let direct = [
        ("STORE_REDIS_KEYPREFIX", "session-bailiff-prefix"),
        ("ROLLING", "session-rolling"),
        ("COOKIE_NAME", "session-cookie"),
        ("COOKIE_PATH", "session-cookie-path"),
        ("COOKIE_DOMAIN", "session-cookie-domain"),
        ("COOKIE_MAXAGE", "session-max-age"),
        ("COOKIE_SECURE", "session-cookie-secure"),
        ("COOKIE_HTTPONLY", "session-cookie-http-only"),
        ("COOKIE_SAMESITE", "session-cookie-same-site"),
        ("HEADERS_VALUEPREFIX", "session-header-prefix"),
    ];
    for (old, flag) in direct {
        if let Some(v) = get(old) {
            used.insert(old);
            put(old, &pillion_var(flag), v.to_string(), v, true);
        }
    }
    let port = get("PORT");
    let port_text = port.unwrap_or("80");
    let listen = if is_port(port_text) {
        format!("0.0.0.0:{}", port_text.trim_start_matches(':'))
    } else {
        port_text.to_string()
    };
    put(
        "PORT",
        "PILLION_LISTEN",
        listen.clone(),
        &listen,
        port.is_some(),
    );
    let proxy = get("PROXY");
    let proxy_text = proxy.unwrap_or("8000");
    let app = if is_port(proxy_text) {
        format!("http://127.0.0.1:{}", proxy_text.trim_start_matches(':'))
    } else {
        proxy_text.to_string()
    };
    put("PROXY", "PILLION_APP", app.clone(), &app, proxy.is_some());
    let addr = get("STORE_REDIS_ADDR");
    let password = get("STORE_REDIS_PASSWORD").filter(|p| !p.is_empty());
    let db = get("STORE_REDIS_DB").filter(|d| !d.is_empty() && *d != "0");
    let auth = password.map(|p| format!(":{p}@")).unwrap_or_default();
    let at = addr.unwrap_or("localhost:6379");
    let db_path = db.map(|d| format!("/{d}")).unwrap_or_default();
    // The notice leaves the password out: no secret in a log line.
    let shown = format!(
        "redis://{}{at}{db_path}",
        if password.is_some() { ":***@" } else { "" }
    );
    let given = addr.is_some() || password.is_some() || db.is_some();
    put(
        "STORE_REDIS_ADDR",
        "PILLION_SESSION_STORE",
        format!("redis://{auth}{at}{db_path}"),
        &shown,
        given,
    );
    used.extend([
        "PORT",
        "PROXY",
        "STORE_REDIS_ADDR",
        "STORE_REDIS_PASSWORD",
        "STORE_REDIS_DB",
    ]);
    let prefix = get("HEADERS_VALUEPREFIX").unwrap_or("X-Session-");
    for (old, suffix) in [("HEADERS_SETPREFIX", "Set-"), ("HEADERS_DELPREFIX", "Del-")] {
        if let Some(v) = get(old) {
            used.insert(old);
            let derived = format!("{prefix}{suffix}");
            if !v.eq_ignore_ascii_case(&derived) {
                return Err(format!(
                    "BAILIFF_{old}={v} is not supported: pillion derives it from the session \
                     header prefix as {derived} (set --session-header-prefix)"
                ));
            }
            notes.push(format!(
                "warning: BAILIFF_{old} is not needed: pillion derives {derived} from the prefix"
            ));
        }
    }
    for (key, _) in env {
        let Some(name) = key.strip_prefix("BAILIFF_") else {
            continue;
        };
        if used.contains(name) {
            continue;
        }
        let why = match name {
            n if n.starts_with("STORE_REDIS_") => {
                "pillion's Redis connection takes only redis://[:password@]host:port[/db] (--session-store)"
            }
            _ => "it is not one of bailiff's settings; pillion's are listed by `pillion run --help`",
        };
        return Err(format!("{key} is not supported: {why}"));
    }
    migrated.notices.append(&mut notes);
    migrated.env.extend(set);
    Ok(())
}

/// Whether `port` is a bare port number, optionally after a colon (Go's `:80`).
fn is_port(port: &str) -> bool {
    let p = port.trim_start_matches(':');
    !p.is_empty() && p.chars().all(|c| c.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str], env: &[(&str, &str)]) -> Result<Migrated, String> {
        let argv = std::iter::once("pillion")
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        migrate(argv, &env, |_| false)
    }

    fn argv(m: &Migrated) -> Vec<String> {
        m.argv
            .iter()
            .skip(1)
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn pillion_spellings_pass_unchanged_with_no_notice() {
        let args = [
            "run",
            "--server-name",
            "a_b",
            "--registry",
            "etcd://x:1",
            "--",
            "--server_name",
        ];
        let m = run(&args, &[("PATH", "/bin")]).unwrap();
        assert_eq!(argv(&m), args);
        assert!(m.notices.is_empty() && m.env.is_empty(), "{m:?}");
    }

    #[test]
    fn micro_flags_become_pillion_flags_each_with_a_notice() {
        let cases: &[(&[&str], &[&str])] = &[
            (
                &["run", "--server_name", "foo"],
                &["run", "--server-name=foo"],
            ),
            (
                &["run", "--server_address=127.0.0.1:9090"],
                &["run", "--server-address=127.0.0.1:9090"],
            ),
            (
                &["run", "--healthcheck_url", "http://x/h"],
                &["run", "--healthcheck-url=http://x/h"],
            ),
            (
                &["run", "--register_ttl", "30"],
                &["run", "--register-ttl=30s"],
            ),
            (&["run", "--register_ttl=1m"], &["run", "--register-ttl=1m"]),
            (&["run", "--client_retries", "3"], &["run", "--retries=3"]),
            (
                &[
                    "run",
                    "--registry",
                    "etcd",
                    "--registry_address",
                    "10.0.0.1:2379",
                ],
                &["run", "--registry=etcd://10.0.0.1:2379?layout=go-micro"],
            ),
            (
                &["run", "--registry=etcd"],
                &["run", "--registry=etcd://127.0.0.1:2379?layout=go-micro"],
            ),
            (
                &["run", "--broker", "nats", "--broker_address=n:4222"],
                &["run", "--broker=nats://n:4222", "--broker-format=go-micro"],
            ),
            // micro's globals before the command move after it.
            (
                &["--server_name=foo", "run", "--address", "127.0.0.1:1"],
                &["run", "--server-name=foo", "--address", "127.0.0.1:1"],
            ),
            (
                &["run", "--enable_stats", "--address", "127.0.0.1:1"],
                &["run", "--address", "127.0.0.1:1"],
            ),
            // Any pillion flag in micro's or iaido's spelling.
            (
                &["run", "--session_max_age", "60"],
                &["run", "--session-max-age=60"],
            ),
            (
                &[
                    "bootstrap",
                    "--bootstrapAddr",
                    "127.0.0.2",
                    "--bootstrap",
                    "1:h:2",
                ],
                &[
                    "bootstrap",
                    "--bootstrap-addr=127.0.0.2",
                    "--bootstrap",
                    "1:h:2",
                ],
            ),
            // iaido's command line has no command.
            (&["-c", "iaido.yaml"], &["run", "-c", "iaido.yaml"]),
            (
                &["-c", "iaido.yaml", "--check"],
                &["check", "-c", "iaido.yaml"],
            ),
            (
                &["--config", "f.yaml", "--reloadPeriod", "2s"],
                &["run", "--config", "f.yaml", "--reload-period=2s"],
            ),
            (
                &[
                    "--config",
                    "f.toml",
                    "--bootstrapAddr",
                    "127.0.0.1",
                    "-b",
                    "1:h:2",
                ],
                &[
                    "bootstrap",
                    "--config",
                    "f.toml",
                    "--bootstrap-addr=127.0.0.1",
                    "-b",
                    "1:h:2",
                ],
            ),
            (
                &["services", "--proxy_address", "127.0.0.1:8081"],
                &["services", "--sidecar=http://127.0.0.1:8081"],
            ),
        ];
        for (given, expected) in cases {
            let m = run(given, &[]).unwrap();
            assert_eq!(argv(&m), *expected, "{given:?}");
            assert!(!m.notices.is_empty(), "{given:?}: no notice");
            for line in &m.notices {
                assert!(
                    line.starts_with("warning: ") && !line.contains('\n'),
                    "{line:?}"
                );
            }
        }
    }

    #[test]
    fn micro_flags_pillion_cannot_honour_are_refused_naming_its_equivalent() {
        let cases: &[(&[&str], &str)] = &[
            // HTTPS asked for, without what it needs (micro refused it too).
            (
                &["run", "--enable_tls"],
                "--api-tls-cert FILE --api-tls-key FILE",
            ),
            (&["--enable_acme", "run"], "--api-acme-domain NAME"),
            (&["run", "--tls_client_ca_file", "ca.pem"], "--api-token"),
            (&["run", "--registry", "consul"], "etcd://HOST:PORT"),
            (
                &["run", "--registry_address", "h:1"],
                "--registry etcd://HOST:PORT",
            ),
            (&["run", "--broker", "kafka"], "nats://HOST:PORT"),
            (&["run", "--selector", "random"], "--balancer"),
            (&["run", "--client_pool_size", "4"], "--max-pending"),
            (&["run", "--transport", "grpc"], "h2c"),
            (&["run", "--enable_stats=false"], "/dashboard"),
            (&["run", "--check"], "pillion check FILE"),
        ];
        for (given, names) in cases {
            let err = run(given, &[]).unwrap_err();
            assert!(err.contains(names), "{given:?}: {err}");
        }
    }

    #[test]
    fn micro_s_https_flags_serve_the_api_over_https() {
        let m = run(
            &[
                "--enable_tls",
                "--tls_cert_file",
                "c.pem",
                "--tls_key_file=k.pem",
                "run",
            ],
            &[],
        )
        .unwrap();
        assert_eq!(
            argv(&m),
            ["run", "--api-tls-cert=c.pem", "--api-tls-key=k.pem"]
        );
        assert!(m
            .notices
            .iter()
            .any(|n| n.contains("--enable_tls is not needed")));
        let m = run(
            &[
                "run",
                "--enable_acme",
                "--acme_hosts",
                "a.example,b.example",
            ],
            &[],
        )
        .unwrap();
        assert_eq!(argv(&m), ["run", "--api-acme-domain=a.example,b.example"]);
        // pillion's own flags, or its variables, satisfy micro's switch too.
        run(
            &["run", "--enable_tls", "--api-tls-cert=c", "--api-tls-key=k"],
            &[],
        )
        .unwrap();
        let m = run(
            &["run"],
            &[
                ("MICRO_ENABLE_TLS", "true"),
                ("MICRO_TLS_CERT_FILE", "c.pem"),
                ("MICRO_TLS_KEY_FILE", "k.pem"),
            ],
        )
        .unwrap();
        assert!(m
            .env
            .contains(&("PILLION_API_TLS_CERT".into(), "c.pem".into())));
        run(&["run"], &[("MICRO_ENABLE_TLS", "false")]).unwrap();
    }

    #[test]
    fn micro_variables_become_pillion_variables() {
        let m = run(
            &["run"],
            &[
                ("MICRO_SERVER_NAME", "foo"),
                ("MICRO_REGISTRY", "etcd"),
                ("MICRO_REGISTRY_ADDRESS", "e:2379"),
                ("MICRO_BROKER", "nats"),
                ("MICRO_FANCY", "1"),
            ],
        )
        .unwrap();
        assert_eq!(argv(&m), ["run"]);
        assert_eq!(
            m.env,
            [
                ("PILLION_SERVER_NAME".to_string(), "foo".to_string()),
                (
                    "PILLION_REGISTRY".into(),
                    "etcd://e:2379?layout=go-micro".into()
                ),
                ("PILLION_BROKER".into(), "nats://127.0.0.1:4222".into()),
                ("PILLION_BROKER_FORMAT".into(), "go-micro".into())
            ]
        );
        assert!(
            m.notices
                .iter()
                .any(|n| n.contains("MICRO_FANCY") && n.contains("no effect")),
            "{:?}",
            m.notices
        );
        assert!(run(&["run"], &[("MICRO_ENABLE_TLS", "true")])
            .unwrap_err()
            .contains("--api-tls-cert"));
    }

    #[test]
    fn bailiff_variables_become_pillion_variables_with_its_defaults() {
        let m = run(
            &["run"],
            &[
                ("BAILIFF_PROXY", "http://app"),
                ("BAILIFF_STORE_REDIS_ADDR", "redis:6379"),
                ("BAILIFF_STORE_REDIS_PASSWORD", "s3cret"),
                ("BAILIFF_STORE_REDIS_DB", "2"),
                ("BAILIFF_COOKIE_MAXAGE", "3600"),
                ("BAILIFF_HEADERS_SETPREFIX", "X-Session-Set-"),
            ],
        )
        .unwrap();
        let env: std::collections::BTreeMap<_, _> = m.env.iter().cloned().collect();
        assert_eq!(env["PILLION_APP"], "http://app");
        assert_eq!(env["PILLION_LISTEN"], "0.0.0.0:80");
        assert_eq!(env["PILLION_SESSION_STORE"], "redis://:s3cret@redis:6379/2");
        assert_eq!(env["PILLION_SESSION_MAX_AGE"], "3600");
        assert!(
            m.notices.iter().all(|n| !n.contains("s3cret")),
            "a notice shows the password: {:?}",
            m.notices
        );

        let m = run(
            &["run"],
            &[("BAILIFF_PORT", "8080"), ("BAILIFF_PROXY", "8000")],
        )
        .unwrap();
        let env: std::collections::BTreeMap<_, _> = m.env.iter().cloned().collect();
        assert_eq!(env["PILLION_LISTEN"], "0.0.0.0:8080");
        assert_eq!(env["PILLION_APP"], "http://127.0.0.1:8000");
        assert_eq!(env["PILLION_SESSION_STORE"], "redis://localhost:6379");
    }

    #[test]
    fn bailiff_settings_pillion_cannot_honour_are_refused() {
        for (key, value, names) in [
            ("BAILIFF_STORE_REDIS_POOLSIZE", "10", "--session-store"),
            ("BAILIFF_HEADERS_SETPREFIX", "X-Put-", "X-Session-Set-"),
            ("BAILIFF_COLOUR", "blue", "pillion run --help"),
        ] {
            let err = run(&["run"], &[(key, value)]).unwrap_err();
            assert!(err.contains(key) && err.contains(names), "{key}: {err}");
        }
    }

    #[test]
    fn a_pillion_variable_already_set_wins_over_the_old_one() {
        let env = vec![("BAILIFF_PROXY".to_string(), "http://old".to_string())];
        let m = migrate(vec!["pillion".into(), "run".into()], &env, |k| {
            k == "PILLION_APP"
        })
        .unwrap();
        assert!(m.env.iter().all(|(k, _)| k != "PILLION_APP"), "{:?}", m.env);
        assert!(
            m.notices.iter().any(|n| n.contains("PILLION_APP is set")),
            "{:?}",
            m.notices
        );
    }
}
