//! `pillion`: the binary. It parses the command line, loads the config, builds the
//! runtime and hands over to [`pillion_sidecar::sidecar::run`]; the sidecar itself
//! is the `pillion-sidecar` library.
//!
//! - [`cli`]: the commands and flags (clap), each flag also a `PILLION_*` variable.
//! - [`config`]: the one loader that merges defaults, file, environment and flags
//!   into the library's `Settings`.
//! - [`migration`]: micro's, bailiff's and iaido's settings, rewritten or refused.
//! - [`iaido`]: iaido's YAML config file, read as pillion's options and listeners,
//!   and written as pillion's TOML by `pillion migrate`.
//! - [`client`]: `services`, `call`, `publish`, `subscribe`, `status`, `members`:
//!   commands that talk to a running sidecar through its API.
#![forbid(unsafe_code)]

mod cli;
mod client;
mod config;
mod iaido;
mod migration;

use pillion_sidecar::sidecar;

use clap::Parser;
use std::process::ExitCode;

use crate::cli::{Cli, Command};
use crate::config::{Loaded, Settings};

fn main() -> ExitCode {
    // The old systems' settings first, while this is the only thread: a variable set
    // here is read by clap like one the user set.
    let mut old_env: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, _)| k.starts_with("MICRO_") || k.starts_with("BAILIFF_"))
        .collect();
    // bailiff's config file, read as bailiff read it for its proxy (its variables win).
    if std::env::args_os().nth(1).is_some_and(|c| c == "run") {
        let mut dirs = vec![std::path::PathBuf::from("/etc/bailiff")];
        if let Some(home) = std::env::var_os("HOME") {
            dirs.push(std::path::Path::new(&home).join(".bailiff"));
        }
        dirs.push(std::path::PathBuf::from("."));
        match migration::bailiff_file(&dirs) {
            Ok(Some((path, settings))) => {
                eprintln!(
                    "warning: reading bailiff's config file {} as its BAILIFF_* variables; \
                     `pillion migrate {0}` writes the same as pillion's TOML",
                    path.display()
                );
                for (k, v) in settings {
                    if !old_env.iter().any(|(key, _)| *key == k) {
                        old_env.push((k, v));
                    }
                }
            }
            Ok(None) => {}
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let migrated = match migration::migrate(std::env::args_os().collect(), &old_env, |k| {
        std::env::var_os(k).is_some()
    }) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    for notice in &migrated.notices {
        eprintln!("{notice}");
    }
    for (key, value) in &migrated.env {
        std::env::set_var(key, value);
    }
    let cli = match Cli::try_parse_from(&migrated.argv) {
        Ok(cli) => cli,
        // A bad value of `run`'s option from the environment names its variable.
        Err(e)
            if e.kind() == clap::error::ErrorKind::ValueValidation
                && migrated.argv.get(1).is_some_and(|a| a == "run") =>
        {
            eprintln!("error: {}", config::from_where(&e, &migrated.argv));
            return ExitCode::from(2);
        }
        Err(e) => e.exit(),
    };
    match cli.command {
        Command::Bootstrap {
            config,
            bootstrap_addr,
            bootstrap,
            force,
        } => {
            if crate::iaido::is_iaido(&config, "") {
                eprintln!(
                    "error: {}: pillion writes its configuration as TOML; give a file named \
                     like pillion.toml (an iaido file is read as it is: `pillion run --config \
                     iaido.yaml`)",
                    config.display()
                );
                return ExitCode::FAILURE;
            }
            if config.exists() && !force {
                eprintln!(
                    "error: {} exists; add --force to overwrite it",
                    config.display()
                );
                return ExitCode::FAILURE;
            }
            let text = pillion_tcp::config::bootstrap(bootstrap_addr, &bootstrap);
            if let Err(e) = std::fs::write(&config, &text) {
                eprintln!("error: cannot write {}: {e}", config.display());
                return ExitCode::FAILURE;
            }
            print!("{text}");
            eprintln!(
                "wrote bootstrapped configuration file to {}",
                config.display()
            );
            ExitCode::SUCCESS
        }
        // The file as `run --config FILE` would take it: its keys, values and the
        // combinations of options (with the environment's PILLION_* as `run` would).
        Command::Mesh(crate::cli::MeshCommand::Init { out }) => {
            match pillion_mesh::ca::init(&out) {
                Ok((cert, key)) => {
                    println!("{}\n{}", cert.display(), key.display());
                    eprintln!(
                        "wrote the mesh CA; start each sidecar with --mesh-ca-cert {} --mesh-ca-key {}",
                        cert.display(),
                        key.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Mesh(crate::cli::MeshCommand::Token { ca, service, ttl }) => {
            let minted = pillion_mesh::ca::Authority::load(&ca.mesh_ca_cert, &ca.mesh_ca_key)
                .and_then(|authority| pillion_mesh::issuer::mint(&authority, &service.0, ttl.0));
            match minted {
                Ok((token, claims)) => {
                    println!("{token}");
                    eprintln!(
                        "join token {} for {}, usable for {}; start the sidecar with \
                         --server-name {} --mesh-token TOKEN (revoke it by adding {} to the \
                         issuers' --revoked file)",
                        claims.jti,
                        claims.sub,
                        pillion_core::duration::format(ttl.0),
                        claims.sub,
                        claims.jti
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Mesh(crate::cli::MeshCommand::Serve(args)) => {
            if args.mesh_cert_lifetime.0 < pillion_mesh::identity::MIN_LIFETIME {
                eprintln!(
                    "error: --mesh-cert-lifetime must be at least {}: sidecars renew at two thirds of it",
                    pillion_core::duration::format(pillion_mesh::identity::MIN_LIFETIME)
                );
                return ExitCode::from(2);
            }
            init_logging(args.log_format);
            let config = pillion_mesh::issuer::IssuerConfig {
                ca_cert: args.ca.mesh_ca_cert,
                ca_key: args.ca.mesh_ca_key,
                listen: args.listen,
                lifetime: args.mesh_cert_lifetime.0,
                revoked: args.revoked,
            };
            let runtime = match start_runtime(tokio::runtime::Builder::new_multi_thread()) {
                Ok(r) => r,
                Err(code) => return code,
            };
            match runtime.block_on(sidecar::mesh_issuer(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::ConfigReference => {
            print!("{}", config::reference());
            ExitCode::SUCCESS
        }
        Command::Services(args) => client::run(client::Order::Services(args)),
        Command::Call(args) => client::run(client::Order::Call(args)),
        Command::Publish(args) => client::run(client::Order::Publish(args)),
        Command::Subscribe(args) => client::run(client::Order::Subscribe(args)),
        Command::Status(args) => client::run(client::Order::Status(args)),
        Command::Members(args) => client::run(client::Order::Members(args)),
        Command::Check { file, config } => {
            let Some(config) = file.or(config) else {
                unreachable!("clap requires FILE or --config");
            };
            match Loaded::from_args(vec!["--config".into(), config.clone().into()])
                .and_then(resolve_telling)
            {
                Ok(_) => {
                    println!("{}: ok", config.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Migrate { file } => {
            let written = std::fs::read_to_string(&file)
                .map_err(|e| format!("cannot read {}: {e}", file.display()))
                .and_then(|text| migration::migrate_file(&file, &text));
            match written {
                Ok(toml) => {
                    print!("{toml}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run(args) => {
            // Parsed again with the file's values in place, from what follows `run`.
            drop(args);
            let argv: Vec<std::ffi::OsString> = migrated
                .argv
                .iter()
                .cloned()
                .skip_while(|a| a != "run")
                .skip(1)
                .collect();
            let settings = match Loaded::from_args(argv).and_then(resolve_telling) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            init_logging(settings.trace.log_format);
            // One worker: a current-thread runtime, which needs no cross-thread
            // wake-ups or work stealing (measured faster per request than a
            // multi-thread runtime with one worker; see bench/README.md).
            let runtime = match settings.worker_threads {
                Some(1) => tokio::runtime::Builder::new_current_thread(),
                Some(n) => {
                    let mut b = tokio::runtime::Builder::new_multi_thread();
                    b.worker_threads(n);
                    b
                }
                None => tokio::runtime::Builder::new_multi_thread(),
            };
            let runtime = match start_runtime(runtime) {
                Ok(r) => r,
                Err(code) => return code,
            };
            match runtime.block_on(sidecar::run(settings)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// The runtime `builder` makes, with every driver; a failure is said and is the exit
/// code.
pub(crate) fn start_runtime(
    mut builder: tokio::runtime::Builder,
) -> Result<tokio::runtime::Runtime, ExitCode> {
    builder.enable_all().build().map_err(|e| {
        eprintln!("error: cannot start the runtime: {e}");
        ExitCode::FAILURE
    })
}

/// Prints the file's warnings (once, at start), then resolves the settings.
fn resolve_telling(loaded: Loaded) -> Result<Settings, config::ConfigError> {
    for notice in &loaded.notices {
        eprintln!("{notice}");
    }
    // An error about options says where each was set (a variable, the file's line).
    let sources = loaded.sources();
    config::resolve(loaded).map_err(|e| match e {
        config::ConfigError::Invalid(message) => {
            config::ConfigError::Invalid(sources.explain(&message))
        }
        other => other,
    })
}

/// Logs go to stderr, filtered by RUST_LOG (default `info`): text, or with
/// `--log-format json` one JSON object per line (`timestamp`, `level`, `message` and
/// the event's fields beside it).
fn init_logging(format: crate::config::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match format {
        crate::config::LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        crate::config::LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
}
