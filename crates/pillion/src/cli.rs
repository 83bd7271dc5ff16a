//! The command line: `pillion run`, `pillion check`, `pillion migrate`, and the client commands that talk
//! to a running sidecar (`services`, `call`, `publish`, `subscribe`, `status`).

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use pillion_core::Dur;

use crate::config::{
    AcmeDirectory, AcmeDomain, AcmeEmail, AppUrl, BrokerUrl, CookieName, HealthUrl, HostPort,
    KeyValue, LogFormat, MaxAge, NonZeroDur, OtlpEndpoint, RegistryUrl, ServiceName,
    SessionStoreUrl,
};

/// A sidecar for microservices: run one beside each instance of your app and reach the
/// service registry and any registered service (by name, balanced, retried, within a
/// deadline) and a message broker over plain HTTP on localhost, put it behind an inbound
/// proxy that keeps each visitor's session in a store shared by every service, and
/// forward its TCP connections to the nearest healthy backend ([[tcp]] in the file).
///
/// Every option of `pillion run` can also be set as an environment variable
/// PILLION_<OPTION> (PILLION_REGISTRY=etcd://127.0.0.1:2379) or as a key of the TOML
/// file given with --config (registry = "etcd://127.0.0.1:2379").
/// Precedence: flag > environment > file > default.
///
/// iaido's files and command line work as they are: `pillion --config iaido.yaml`
/// runs the sidecar on iaido's YAML; `pillion migrate iaido.yaml` prints pillion's TOML.
#[derive(Debug, Parser)]
#[command(
    name = "pillion",
    version,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the sidecar.
    ///
    /// Examples:
    ///
    ///   pillion run
    ///
    ///   pillion run --registry etcd://127.0.0.1:2379 --server-name greeter \
    ///     --server-address 127.0.0.1:9090 --healthcheck-url http://127.0.0.1:9090/health
    ///
    ///   pillion run --listen 0.0.0.0:8080 --app http://127.0.0.1:3000 \
    ///     --session-store redis://127.0.0.1:6379 --session-max-age 3600
    ///
    ///   pillion run --broker nats://127.0.0.1:4222 --broker-durable 'orders.*'
    #[command(verbatim_doc_comment)]
    Run(Box<RunArgs>),
    /// Write a TCP proxy config file from LOCAL:HOST:PORT bindings, and print it.
    ///
    /// Example:
    ///
    ///   pillion bootstrap --config pillion.toml --bootstrap-addr 127.0.0.1 \
    ///     --bootstrap 26257:127.0.0.1:26258 --bootstrap 26257:127.0.0.1:26259 \
    ///     --bootstrap 8080:127.0.0.1:8181
    ///   pillion run --config pillion.toml
    #[command(verbatim_doc_comment)]
    Bootstrap {
        /// The file to write.
        #[arg(long, short = 'c', value_name = "FILE")]
        config: PathBuf,
        /// Address the listeners bind to.
        #[arg(long, value_name = "IP", default_value = "127.0.0.1")]
        bootstrap_addr: std::net::IpAddr,
        /// LOCAL:HOST:PORT (IPv6 hosts in brackets); repeat it. Bindings with the same
        /// local port become targets of one listener.
        #[arg(long, short = 'b', value_name = "LOCAL:HOST:PORT", required = true)]
        bootstrap: Vec<pillion_tcp::Binding>,
        /// Overwrite the file if it exists.
        #[arg(long, short = 'f')]
        force: bool,
    },
    /// The mesh's certificate authority.
    #[command(subcommand)]
    Mesh(MeshCommand),
    /// Check a config file and exit: 0 when it is valid, 1 with the errors otherwise.
    Check {
        /// The file to check: pillion's TOML, or iaido's YAML (.yaml, .yml).
        #[arg(
            value_name = "FILE",
            required_unless_present = "config",
            conflicts_with = "config"
        )]
        file: Option<PathBuf>,
        /// The same file, given as `run` takes it.
        #[arg(long, short = 'c', value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Print pillion's TOML for iaido's or bailiff's config file, to replace it.
    ///
    /// Every key of iaido's file becomes pillion's (frontends are [[tcp]] listeners,
    /// diagAddr is --address, gracePeriod is --grace-period); a key pillion cannot
    /// honour is an error that names it and its line. bailiff's config.{yaml,json,toml}
    /// (Port, Proxy, Cookie, Headers, Store) becomes --listen, --app and --session-*.
    ///
    /// Examples:
    ///
    ///   pillion migrate iaido.yaml > pillion.toml
    ///   pillion check pillion.toml && pillion run --config pillion.toml
    ///
    ///   pillion migrate /etc/bailiff/config.yaml > pillion.toml
    #[command(verbatim_doc_comment)]
    Migrate {
        /// iaido's config file (YAML), or bailiff's.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Print the reference of every `pillion run` option (flag, variable, file key,
    /// default and meaning) as Markdown: docs/config-reference.md is its output.
    ///
    /// Example:
    ///
    ///   pillion config-reference > docs/config-reference.md
    #[command(verbatim_doc_comment)]
    ConfigReference,
    /// List the services in a running sidecar's registry, or one service's nodes.
    ///
    /// Examples:
    ///
    ///   pillion services
    ///
    ///   pillion services greeter
    ///
    ///   pillion services --json --sidecar http://10.0.0.7:8081 | jq '.[].name'
    #[command(verbatim_doc_comment)]
    Services(ServicesArgs),
    /// Call a service through a running sidecar and print the answer's body: a method
    /// (POST /rpc), or a REST route of the app (/invoke/SERVICE/PATH).
    ///
    /// Examples:
    ///
    ///   pillion call greeter Say.Hello '{"name": "Ada"}'
    ///
    ///   echo '{"name": "Ada"}' | pillion call greeter Say.Hello -
    ///
    ///   pillion call users GET /users/42
    ///
    ///   pillion call users PUT /users/42 '{"name": "Ada"}'
    #[command(verbatim_doc_comment)]
    Call(CallArgs),
    /// Publish a message to a topic of a running sidecar's broker.
    ///
    /// Examples:
    ///
    ///   pillion publish orders.new '{"id": 42}'
    ///
    ///   pillion publish orders.new - < order.json
    #[command(verbatim_doc_comment)]
    Publish(PublishArgs),
    /// Print the messages of a topic as they arrive, one line each (the body as text
    /// when it is UTF-8, else base64); Ctrl-C stops.
    ///
    /// Examples:
    ///
    ///   pillion subscribe 'orders.*'
    ///
    ///   pillion subscribe orders.new --queue billing --count 1 --json
    #[command(verbatim_doc_comment)]
    Subscribe(SubscribeArgs),
    /// Summarise a running sidecar: version, uptime, registry, broker, services and
    /// the app's registration (/statusz and /healthz).
    ///
    /// Examples:
    ///
    ///   pillion status
    ///
    ///   PILLION_SIDECAR=http://10.0.0.7:8081 pillion status --json
    #[command(verbatim_doc_comment)]
    Status(StatusArgs),
    /// List the sidecars of the cluster a running sidecar is in: its app's name, API
    /// address, gossip address, state (alive, failed: stopped answering, left: stopped
    /// on purpose) and age. Failed and left members are listed for an hour.
    ///
    /// Examples:
    ///
    ///   pillion members
    ///
    ///   pillion members --json | jq '.[] | select(.state != "alive")'
    #[command(verbatim_doc_comment)]
    Members(StatusArgs),
}

/// How the client commands reach a running sidecar; every one of them takes these.
#[derive(Debug, Clone, Args)]
pub struct SidecarArgs {
    /// The sidecar's API (its --address), http:// or https://.
    #[arg(
        long,
        default_value = "http://127.0.0.1:8081",
        env = "PILLION_SIDECAR",
        value_name = "URL"
    )]
    pub sidecar: crate::client::SidecarUrl,

    /// The sidecar's --api-token, sent as Pillion-Api-Token.
    #[arg(
        long,
        env = "PILLION_API_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub api_token: Option<String>,

    /// A PEM CA certificate (or several) trusted, besides the system's, for an
    /// https:// --sidecar: the CA of its --api-tls-cert.
    #[arg(long, env = "PILLION_CA_FILE", value_name = "FILE")]
    pub ca_file: Option<PathBuf>,

    /// Print JSON (the API's own) instead of text for people.
    #[arg(long)]
    pub json: bool,

    /// Deadline for connecting to the sidecar and for each of its answers (not for
    /// the wait between messages of `subscribe`). No PILLION_TIMEOUT: that one is
    /// `run --timeout`.
    #[arg(long, default_value = "10s", value_name = "DUR")]
    pub timeout: NonZeroDur,
}

#[derive(Debug, Args)]
pub struct ServicesArgs {
    /// Show this service's nodes (id, address, metadata); every service without it.
    #[arg(value_name = "NAME")]
    pub name: Option<String>,
    /// List pillion's own services too (pillion.broker: the embedded broker's
    /// sidecars).
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub sidecar: SidecarArgs,
}

#[derive(Debug, Args)]
pub struct CallArgs {
    /// The service, as registered.
    #[arg(value_name = "SERVICE")]
    pub service: String,
    /// The method, such as Say.Hello (the node gets POST /Say.Hello); or an HTTP
    /// method (GET, POST, PUT, PATCH, DELETE...) followed by the app's PATH: a REST
    /// call through /invoke/SERVICE/PATH.
    #[arg(value_name = "METHOD")]
    pub method: String,
    /// The request as JSON; `-` reads it from stdin. [default: {}] With an HTTP
    /// method: the PATH (/users/42).
    #[arg(value_name = "JSON|PATH")]
    pub request: Option<String>,
    /// With an HTTP method: the body, sent as given (JSON is sent as
    /// application/json); `-` reads it from stdin.
    #[arg(value_name = "BODY")]
    pub body: Option<String>,
    #[command(flatten)]
    pub sidecar: SidecarArgs,
}

#[derive(Debug, Args)]
pub struct PublishArgs {
    /// The topic, such as orders.new.
    #[arg(value_name = "TOPIC")]
    pub topic: String,
    /// The message body, sent as given; `-` reads it from stdin.
    #[arg(value_name = "BODY")]
    pub body: String,
    #[command(flatten)]
    pub sidecar: SidecarArgs,
}

#[derive(Debug, Args)]
pub struct SubscribeArgs {
    /// The topic, or a pattern: `*` matches one segment, `>` the rest (orders.*).
    #[arg(value_name = "TOPIC")]
    pub topic: String,
    /// Share the messages with the other subscribers of this queue group (each
    /// message to one of them).
    #[arg(long, value_name = "Q")]
    pub queue: Option<String>,
    /// Exit after N messages. [default: until Ctrl-C]
    #[arg(long, value_name = "N")]
    pub count: Option<std::num::NonZeroU64>,
    #[command(flatten)]
    pub sidecar: SidecarArgs,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub sidecar: SidecarArgs,
}

#[derive(Debug, Subcommand)]
pub enum MeshCommand {
    /// Make a new mesh CA: DIR/ca.crt and DIR/ca.key (mode 0600). ca.key stays on the
    /// issuers' hosts (`pillion mesh serve`); every sidecar gets ca.crt only. Existing
    /// files are never overwritten.
    ///
    /// Example:
    ///
    ///   pillion mesh init --out /etc/pillion/mesh
    #[command(verbatim_doc_comment)]
    Init {
        /// The directory to write to (made if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Run an issuer: it grants a sidecar's certificate request for the service its
    /// join token names, or, for a renewal, the service of the certificate it shows.
    /// Several may run with the same CA, for availability.
    ///
    /// Example:
    ///
    ///   pillion mesh serve --mesh-ca-cert ca.crt --mesh-ca-key ca.key --listen 0.0.0.0:7440
    #[command(verbatim_doc_comment)]
    Serve(MeshServeArgs),
    /// Print a join token for one service: a sidecar started with it
    /// (--mesh-token) gets that service's identity from an issuer, and no other.
    ///
    /// Example:
    ///
    ///   pillion mesh token --mesh-ca-cert ca.crt --mesh-ca-key ca.key --service orders --ttl 1h
    #[command(verbatim_doc_comment)]
    Token {
        #[command(flatten)]
        ca: MeshCaArgs,
        /// The service the token admits.
        #[arg(long, value_name = "NAME")]
        service: ServiceName,
        /// How long the token may be used to join (renewals need no token).
        #[arg(long, default_value = "24h", value_name = "DUR")]
        ttl: NonZeroDur,
    },
}

/// The CA's two files, for the commands that sign.
#[derive(Debug, Args)]
pub struct MeshCaArgs {
    /// The CA certificate (a bundle may hold others: the one the key signs for is used).
    #[arg(long, env = "PILLION_MESH_CA_CERT", value_name = "FILE")]
    pub mesh_ca_cert: PathBuf,
    /// The CA's private key.
    #[arg(long, env = "PILLION_MESH_CA_KEY", value_name = "FILE")]
    pub mesh_ca_key: PathBuf,
}

#[derive(Debug, Args)]
pub struct MeshServeArgs {
    #[command(flatten)]
    pub ca: MeshCaArgs,
    /// Where sidecars reach the issuer (HTTPS).
    #[arg(long, env = "PILLION_MESH_ISSUER_LISTEN", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// How long each certificate issued lives; sidecars renew at two thirds of it.
    #[arg(
        long,
        default_value = "24h",
        env = "PILLION_MESH_CERT_LIFETIME",
        value_name = "DUR"
    )]
    pub mesh_cert_lifetime: NonZeroDur,
    /// Token ids and certificate serials refused: one per line, `#` comments; read
    /// again when it changes. Serials may be written as openssl prints them (0A:1B...).
    #[arg(long, env = "PILLION_MESH_REVOKED", value_name = "FILE")]
    pub revoked: Option<PathBuf>,
    /// Logs as text or as JSON lines.
    #[arg(
        long,
        default_value = "text",
        env = "PILLION_LOG_FORMAT",
        value_name = "FORMAT"
    )]
    pub log_format: crate::config::LogFormat,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// TOML config file; its keys are these options with '_' for '-'.
    #[arg(long, short = 'c', env = "PILLION_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Address of the HTTP API (/registry, /rpc, /{service}/..., /healthz, /statusz,
    /// /metrics).
    #[arg(
        long,
        default_value = "127.0.0.1:8081",
        env = "PILLION_ADDRESS",
        value_name = "ADDR"
    )]
    pub address: SocketAddr,

    /// Token every API request but /healthz must carry as Pillion-Api-Token: TOKEN
    /// (the API's own routes also take the old Authorization: Bearer TOKEN; calls by
    /// name do not, so the app's Authorization reaches the service), 16+ characters;
    /// required when --address is not loopback.
    #[arg(
        long,
        env = "PILLION_API_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub api_token: Option<String>,

    /// HTTPS on --address (the sidecar's own API): the PEM certificate chain (needs
    /// --api-tls-key). Read again when it changes (checked every --reload-period).
    #[arg(long, env = "PILLION_API_TLS_CERT", value_name = "FILE")]
    pub api_tls_cert: Option<PathBuf>,

    /// The PEM private key of --api-tls-cert.
    #[arg(long, env = "PILLION_API_TLS_KEY", value_name = "FILE")]
    pub api_tls_key: Option<PathBuf>,

    /// HTTPS on --address with a certificate for NAME from the ACME CA, as
    /// --acme-domain does for --listen (and with the same --acme-directory,
    /// --acme-email, --acme-cache and --acme-ca-root); repeat it for more names. The
    /// CA checks each name by TLS-ALPN-01 on --address: it must be reachable at
    /// NAME:443. Not with --api-tls-cert.
    #[arg(
        long,
        env = "PILLION_API_ACME_DOMAIN",
        value_name = "NAME",
        value_delimiter = ','
    )]
    pub api_acme_domain: Vec<AcmeDomain>,

    /// Serve the API as plain HTTP on an --address that is not loopback, on purpose:
    /// its token and data then cross the network in clear. Without it, such an
    /// --address needs --api-tls-cert or --api-acme-domain.
    #[arg(long, default_value = "false", action = clap::ArgAction::Set, env = "PILLION_API_PLAINTEXT", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub api_plaintext: bool,

    /// How /{service}/... is handled: `rpc` maps POST /{service}/{method} to
    /// POST http://{node}/{Method} (micro's table); `proxy` passes any method and path
    /// through to a node of /{service}, streaming.
    #[arg(
        long,
        default_value = "rpc",
        env = "PILLION_HANDLER",
        value_name = "rpc|proxy"
    )]
    pub handler: pillion_invoke::Handler,

    /// How a call by service and method reaches a node whose metadata names no
    /// `protocol`: `http` posts the body to /{Method}; `jsonrpc` sends go-micro's
    /// JSON-RPC request to / and answers its result, as micro's sidecar did (for
    /// micro's Python and Go example servers). Nodes with protocol=jsonrpc or mucp
    /// get JSON-RPC whatever this says.
    #[arg(
        long,
        default_value = "http",
        env = "PILLION_RPC_CODEC",
        value_name = "http|jsonrpc"
    )]
    pub rpc_codec: pillion_invoke::RpcCodec,

    /// Prefix of service names in path mapping: with `go.micro.srv`, /foo/bar calls
    /// service go.micro.srv.foo. [default: none]
    #[arg(long, env = "PILLION_NAMESPACE", value_name = "NS")]
    pub namespace: Option<String>,

    /// Node selection: `peak-ewma` (power of two choices over latency x load) or
    /// `round-robin`. Nodes in this sidecar's zone are preferred, then its region
    /// (zone and region come from --server-metadata).
    #[arg(
        long,
        default_value = "peak-ewma",
        env = "PILLION_BALANCER",
        value_name = "NAME"
    )]
    pub balancer: pillion_invoke::Strategy,

    /// Deadline for a call's answer (its headers); X-Pillion-Timeout overrides it per
    /// request. Past it the caller gets 504.
    #[arg(
        long,
        default_value = "15s",
        env = "PILLION_TIMEOUT",
        value_name = "DUR"
    )]
    pub timeout: NonZeroDur,

    /// How long a call by name to a service with no node right now waits for one to
    /// register (a node restarting, an app starting), within --timeout; 0 answers at
    /// once (404 or 503). X-Pillion-Wait overrides it per request.
    #[arg(
        long,
        default_value = "0",
        env = "PILLION_WAIT_FOR_NODE",
        value_name = "DUR"
    )]
    pub wait_for_node: pillion_core::Dur,

    /// Deadline of one attempt; a slower node is given up and, for idempotent calls,
    /// another is tried.
    #[arg(
        long,
        default_value = "5s",
        env = "PILLION_PER_TRY_TIMEOUT",
        value_name = "DUR"
    )]
    pub per_try_timeout: NonZeroDur,

    /// Deadline for connecting to a node.
    #[arg(
        long,
        default_value = "1s",
        env = "PILLION_CONNECT_TIMEOUT",
        value_name = "DUR"
    )]
    pub connect_timeout: NonZeroDur,

    /// Retries after a failed attempt (connect failures always; 502/503/504 and resets
    /// for idempotent methods or with X-Pillion-Retry: always), within a budget of 20%
    /// of requests plus 10/s.
    #[arg(long, default_value = "2", env = "PILLION_RETRIES", value_name = "N")]
    pub retries: u32,

    /// Calls waiting for one service at once; more get 503.
    #[arg(
        long,
        default_value = "1024",
        env = "PILLION_MAX_PENDING",
        value_name = "N"
    )]
    pub max_pending: NonZeroUsize,

    /// Largest request body a call may carry; larger ones get 413.
    #[arg(
        long,
        default_value = "10MiB",
        env = "PILLION_MAX_BODY_SIZE",
        value_name = "SIZE"
    )]
    pub max_body_size: pillion_core::Size,

    /// Service registry: `cluster` (sidecars find each other by gossip, no server),
    /// `memory` (this process only), `mdns` or mdns://IPv4 (go-micro's mDNS registry
    /// on the LAN, shared with go-micro services; the address names the interface) or
    /// etcd://host:port[,host:port] (shared by every
    /// sidecar on that etcd; etcds:// for TLS, its CA from the system or
    /// SSL_CERT_FILE; ?layout=go-micro for go-micro's keys, shared with its Go
    /// services).
    #[arg(
        long,
        default_value = "cluster",
        env = "PILLION_REGISTRY",
        value_name = "URL"
    )]
    pub registry: RegistryUrl,

    /// Gossip address of the cluster registry. On loopback without --cluster-join it
    /// is where this host's sidecars meet: the first to start binds it, the others
    /// join through it, and another takes it over when its holder stops.
    #[arg(
        long,
        default_value = pillion_registry::cluster::DEFAULT_BIND,
        env = "PILLION_CLUSTER_BIND",
        value_name = "ADDR"
    )]
    pub cluster_bind: SocketAddr,

    /// Seeds of the cluster registry, host:port (repeatable, or comma-separated).
    /// With seeds nothing is discovered automatically, so separate clusters stay
    /// apart.
    #[arg(
        long,
        env = "PILLION_CLUSTER_JOIN",
        value_name = "HOST:PORT",
        value_delimiter = ','
    )]
    pub cluster_join: Vec<HostPort>,

    /// Shared secret (16+ characters, the same on every sidecar) that authenticates
    /// and encrypts gossip; required when --cluster-bind is not a loopback address.
    #[arg(
        long,
        env = "PILLION_CLUSTER_KEY",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub cluster_key: Option<String>,

    /// Announce this sidecar and browse for others on the LAN by mDNS (UDP 5353);
    /// needs --cluster-bind with this host's LAN address, and --cluster-key.
    #[arg(long, default_value = "false", action = clap::ArgAction::Set, env = "PILLION_CLUSTER_MDNS", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub cluster_mdns: bool,

    /// TTL of the app's registration; it is renewed every third of it.
    #[arg(
        long,
        default_value = "30s",
        env = "PILLION_REGISTER_TTL",
        value_name = "DUR"
    )]
    pub register_ttl: NonZeroDur,

    /// Register the local app under this service name (needs --server-address).
    #[arg(long, env = "PILLION_SERVER_NAME", value_name = "NAME")]
    pub server_name: Option<ServiceName>,

    /// host:port at which other services reach the local app.
    #[arg(long, env = "PILLION_SERVER_ADDRESS", value_name = "HOST:PORT")]
    pub server_address: Option<HostPort>,

    /// Metadata of the app's node, key=value; repeat the flag for more
    /// (PILLION_SERVER_METADATA takes a comma-separated list).
    #[arg(
        long,
        env = "PILLION_SERVER_METADATA",
        value_name = "K=V",
        value_delimiter = ','
    )]
    pub server_metadata: Vec<KeyValue>,

    /// GET this http:// URL every interval; an error, a timeout or a non-2xx answer
    /// deregisters the app, the next success registers it again.
    #[arg(long, env = "PILLION_HEALTHCHECK_URL", value_name = "URL")]
    pub healthcheck_url: Option<HealthUrl>,

    /// How often the health URL is checked.
    #[arg(
        long,
        default_value = "30s",
        env = "PILLION_HEALTHCHECK_INTERVAL",
        value_name = "DUR"
    )]
    pub healthcheck_interval: NonZeroDur,

    /// How long one health check may take before it counts as a failure.
    #[arg(
        long,
        default_value = "5s",
        env = "PILLION_HEALTHCHECK_TIMEOUT",
        value_name = "DUR"
    )]
    pub healthcheck_timeout: NonZeroDur,

    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish before the
    /// sidecar exits; a second signal exits at once.
    #[arg(
        long,
        default_value = "10s",
        env = "PILLION_GRACE_PERIOD",
        value_name = "DUR"
    )]
    pub grace_period: Dur,

    /// Once every listener is bound and serving, write their addresses to FILE as
    /// JSON (`{"address":"127.0.0.1:43121","listen":null}`, replaced atomically), so a
    /// supervisor or a test that starts pillion on port 0 learns the ports.
    #[arg(long, env = "PILLION_READY_FILE", value_name = "FILE")]
    pub ready_file: Option<PathBuf>,

    /// How long a client may take to send a request's head, on every listener; a
    /// slower one is disconnected (slowloris).
    #[arg(
        long,
        default_value = "10s",
        env = "PILLION_READ_HEADER_TIMEOUT",
        value_name = "DUR"
    )]
    pub read_header_timeout: NonZeroDur,

    /// How long a request body may stall between two reads, on every listener; a
    /// client slower than that is disconnected and its call ends with a 400.
    #[arg(
        long,
        default_value = "60s",
        env = "PILLION_READ_BODY_TIMEOUT",
        value_name = "DUR"
    )]
    pub read_body_timeout: NonZeroDur,

    /// How long a keep-alive connection may wait for its next request, on every
    /// listener (HTTP/1.1; HTTP/2 with no stream open, then GOAWAY); then it is
    /// closed. A full listener closes its longest-waiting connection first.
    #[arg(
        long,
        default_value = "60s",
        env = "PILLION_IDLE_TIMEOUT",
        value_name = "DUR"
    )]
    pub idle_timeout: NonZeroDur,

    /// How long idle keep-alive connections to nodes and the app are kept.
    #[arg(
        long,
        default_value = "90s",
        env = "PILLION_POOL_IDLE_TIMEOUT",
        value_name = "DUR"
    )]
    pub pool_idle_timeout: NonZeroDur,

    /// Inbound proxy: listen here and pass every request to --app, with the visitor's
    /// session as X-Session-* headers (needs --app).
    #[arg(long, env = "PILLION_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,

    /// The app behind the inbound proxy: http://host:port (needs --listen).
    #[arg(long, env = "PILLION_APP", value_name = "URL")]
    pub app: Option<AppUrl>,

    /// HTTPS on --listen: the PEM certificate chain (needs --tls-key). Read again
    /// when it changes (checked every --reload-period).
    #[arg(long, env = "PILLION_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,

    /// The PEM private key of --tls-cert.
    #[arg(long, env = "PILLION_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,

    /// HTTPS on --listen with a certificate for NAME from an ACME CA (Let's Encrypt
    /// unless --acme-directory says otherwise), ordered in the background, kept in
    /// --acme-cache and renewed 30 days before it ends; repeat it for more names on
    /// the certificate (PILLION_ACME_DOMAIN takes a comma-separated list). The CA
    /// checks each name by TLS-ALPN-01: --listen must be reachable at NAME:443.
    /// Until the first certificate arrives, HTTPS handshakes fail. Needs --listen and
    /// --acme-cache; not with --tls-cert. Ordering agrees to the CA's terms of
    /// service.
    #[arg(
        long,
        env = "PILLION_ACME_DOMAIN",
        value_name = "NAME",
        value_delimiter = ','
    )]
    pub acme_domain: Vec<AcmeDomain>,

    /// The ACME CA's directory URL; for tests, Let's Encrypt's staging CA is
    /// https://acme-staging-v02.api.letsencrypt.org/directory.
    #[arg(
        long,
        default_value = pillion_mesh::acme::LETS_ENCRYPT,
        env = "PILLION_ACME_DIRECTORY",
        value_name = "URL"
    )]
    pub acme_directory: AcmeDirectory,

    /// Contact address of the ACME account (the CA's expiry and policy notices).
    #[arg(long, env = "PILLION_ACME_EMAIL", value_name = "EMAIL")]
    pub acme_email: Option<AcmeEmail>,

    /// Directory where the ACME account key, the certificate and its key are kept
    /// (keys mode 0600; one subdirectory per --acme-directory), so that a restart
    /// orders nothing. Required with --acme-domain: keep it on a persistent volume,
    /// or every restart orders again and soon meets the CA's rate limits.
    #[arg(long, env = "PILLION_ACME_CACHE", value_name = "DIR")]
    pub acme_cache: Option<PathBuf>,

    /// A PEM root certificate trusted, besides the system's, for the ACME directory
    /// (a test CA such as pebble).
    #[arg(long, env = "PILLION_ACME_CA_ROOT", value_name = "FILE")]
    pub acme_ca_root: Option<PathBuf>,

    /// The mesh's CA certificate, the roots every peer must chain to (a bundle of
    /// several while a CA rotates; from `pillion mesh init`). With --mesh-issuer and
    /// --mesh-token (or --mesh-ca-key) and --server-name, the sidecar gets a
    /// certificate for spiffe://pillion/svc/<server-name>, and calls services whose
    /// nodes have a mesh listener over mTLS.
    #[arg(long, env = "PILLION_MESH_CA_CERT", value_name = "FILE")]
    pub mesh_ca_cert: Option<PathBuf>,

    /// An issuer's https://host:port (`pillion mesh serve`); repeat it: they are tried
    /// in turn. The sidecar's key is made here and never leaves.
    #[arg(
        long,
        env = "PILLION_MESH_ISSUER",
        value_name = "URL",
        value_delimiter = ','
    )]
    pub mesh_issuer: Vec<String>,

    /// The join token from `pillion mesh token --service <server-name>`, for the first
    /// certificate (renewals show the current certificate instead).
    #[arg(
        long,
        env = "PILLION_MESH_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub mesh_token: Option<String>,

    /// A file holding the join token (instead of --mesh-token).
    #[arg(long, env = "PILLION_MESH_TOKEN_FILE", value_name = "FILE")]
    pub mesh_token_file: Option<PathBuf>,

    /// The mesh CA's private key, to issue itself certificates without an issuer:
    /// for one host or development. Whoever holds it can take any identity, so with
    /// a --mesh-listen off loopback it is refused unless --mesh-local-ca says so.
    #[arg(long, env = "PILLION_MESH_CA_KEY", value_name = "FILE")]
    pub mesh_ca_key: Option<PathBuf>,

    /// Hold the CA key (--mesh-ca-key) on a sidecar whose mesh listener is reachable
    /// from other hosts: every host so started can take any identity.
    #[arg(long, default_value = "false", action = clap::ArgAction::Set, env = "PILLION_MESH_LOCAL_CA", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub mesh_local_ca: bool,

    /// Receive mTLS calls for the app here, from other sidecars of the mesh (needs
    /// --mesh-ca-cert and --server-address); the app's registration advertises it.
    #[arg(long, env = "PILLION_MESH_LISTEN", value_name = "ADDR")]
    pub mesh_listen: Option<SocketAddr>,

    /// host:port other sidecars reach --mesh-listen at (default: --mesh-listen, or the
    /// host of --server-address with its port when it listens on 0.0.0.0 or [::]).
    #[arg(long, env = "PILLION_MESH_ADVERTISE", value_name = "HOST:PORT")]
    pub mesh_advertise: Option<HostPort>,

    /// A service that may call the app through --mesh-listen; repeat it (none: any
    /// service of the mesh). Others get 403.
    #[arg(
        long,
        env = "PILLION_MESH_ALLOW",
        value_name = "SERVICE",
        value_delimiter = ','
    )]
    pub mesh_allow: Vec<ServiceName>,

    /// Allow clear text beside the mesh, for a migration: calls to a meshed service
    /// may go to its nodes without a mesh listener, the API registers such nodes, and
    /// --mesh-listen may front an app other hosts reach directly. Logged at start.
    #[arg(long, default_value = "false", action = clap::ArgAction::Set, env = "PILLION_MESH_PERMISSIVE", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub mesh_permissive: bool,

    /// How long each mesh certificate lives; it is renewed at two thirds of it.
    #[arg(
        long,
        default_value = "24h",
        env = "PILLION_MESH_CERT_LIFETIME",
        value_name = "DUR"
    )]
    pub mesh_cert_lifetime: NonZeroDur,

    /// Verify bearer JWTs on --listen (and on --mesh-listen) against this JWKS: a file or an http(s) URL
    /// (read again periodically and on an unknown kid). RS256, ES256 and EdDSA.
    #[arg(long, env = "PILLION_JWT_JWKS", value_name = "FILE|URL")]
    pub jwt_jwks: Option<pillion_mesh::jwt::Jwks>,

    /// Verify bearer JWTs signed with this shared secret too (HS256, HS384, HS512:
    /// Feathers' authentication, whose apps share one secret), 16+ bytes, used as
    /// given. Never logged; prefer PILLION_JWT_SECRET or --jwt-secret-file.
    #[arg(
        long,
        env = "PILLION_JWT_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub jwt_secret: Option<String>,

    /// --jwt-secret read from a file (its content, without a final newline).
    #[arg(long, env = "PILLION_JWT_SECRET_FILE", value_name = "FILE")]
    pub jwt_secret_file: Option<PathBuf>,

    /// The claim of a valid token that becomes X-Pillion-Subject.
    #[arg(
        long,
        default_value = "sub",
        env = "PILLION_JWT_SUBJECT_CLAIM",
        value_name = "NAME"
    )]
    pub jwt_subject_claim: String,

    /// Refuse a valid token without --jwt-subject-claim (401); otherwise it passes
    /// without a subject.
    #[arg(long, default_value = "false", action = clap::ArgAction::Set, env = "PILLION_JWT_REQUIRE_SUBJECT", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub jwt_require_subject: bool,

    /// How often the JWKS is read again, or sooner when the URL answers with a shorter
    /// `Cache-Control: max-age`: a key removed from it stops being trusted then.
    #[arg(
        long,
        default_value = "5m",
        env = "PILLION_JWT_JWKS_REFRESH",
        value_name = "DUR"
    )]
    pub jwt_jwks_refresh: NonZeroDur,

    /// The `iss` tokens must have (needs --jwt-jwks or --jwt-secret).
    #[arg(long, env = "PILLION_JWT_ISSUER", value_name = "ISSUER")]
    pub jwt_issuer: Option<String>,

    /// The `aud` tokens must include (needs --jwt-jwks or --jwt-secret).
    #[arg(long, env = "PILLION_JWT_AUDIENCE", value_name = "AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// Refuse requests without a token (401); otherwise they pass without a subject.
    #[arg(long, default_value = "false", action = clap::ArgAction::Set, env = "PILLION_JWT_REQUIRED", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub jwt_required: bool,

    /// How long the app behind --listen may take to answer (its headers); then the
    /// client gets 504 with a JSON error.
    #[arg(
        long,
        default_value = "30s",
        env = "PILLION_APP_TIMEOUT",
        value_name = "DUR"
    )]
    pub app_timeout: NonZeroDur,

    /// Connections open at once on --listen; more wait to be accepted.
    #[arg(
        long,
        default_value = "10000",
        env = "PILLION_LISTEN_MAX_CONNECTIONS",
        value_name = "N"
    )]
    pub listen_max_connections: NonZeroUsize,

    /// Connections open at once on the API listener (--address); more wait to be
    /// accepted. Kept well under the open-file limit, so that no client of the API
    /// can starve the other listeners and the calls to nodes of file descriptors.
    #[arg(
        long,
        default_value = "1024",
        env = "PILLION_API_MAX_CONNECTIONS",
        value_name = "N"
    )]
    pub api_max_connections: NonZeroUsize,

    /// Session store shared by every sidecar that uses it: `memory` (this process
    /// only) or redis://[:password@]host:port[/db] (rediss:// for TLS; CAs from the
    /// system or SSL_CERT_FILE).
    #[arg(
        long,
        default_value = "memory",
        env = "PILLION_SESSION_STORE",
        value_name = "URL"
    )]
    pub session_store: SessionStoreUrl,

    /// Sessions bailiff stored (in the same Redis): `pillion` reads a session under a
    /// bailiff id and moves it to pillion's format at its first request (nobody is
    /// logged out at the cutover); `bailiff` keeps writing bailiff's format and ids,
    /// so bailiff and pillion sidecars can serve the same visitors during a rolling
    /// migration.
    #[arg(
        long,
        default_value = "pillion",
        env = "PILLION_SESSION_FORMAT",
        value_name = "pillion|bailiff"
    )]
    pub session_format: SessionFormat,

    /// The prefix of bailiff's session keys in Redis (its store.redis.keyprefix).
    /// [default: none, bailiff's]
    #[arg(long, env = "PILLION_SESSION_BAILIFF_PREFIX", value_name = "PREFIX")]
    pub session_bailiff_prefix: Option<String>,

    /// Session lifetime, in seconds or as a duration (3600, 1h): the cookie's
    /// Max-Age and the store's TTL. Must be more than 0.
    #[arg(
        default_value = "3600",
        long,
        env = "PILLION_SESSION_MAX_AGE",
        value_name = "SECS",
        allow_hyphen_values = true
    )]
    pub session_max_age: MaxAge,

    /// Refresh the session's TTL and cookie on every response.
    #[arg(long, default_value = "false", action = clap::ArgAction::Set, env = "PILLION_SESSION_ROLLING", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub session_rolling: bool,

    /// Name of the session cookie.
    #[arg(
        long,
        default_value = "session",
        env = "PILLION_SESSION_COOKIE",
        value_name = "NAME"
    )]
    pub session_cookie: CookieName,

    /// Path attribute of the cookie.
    #[arg(
        long,
        default_value = "/",
        env = "PILLION_SESSION_COOKIE_PATH",
        value_name = "PATH"
    )]
    pub session_cookie_path: String,

    /// Domain attribute of the cookie. [default: none, the request's host]
    #[arg(long, env = "PILLION_SESSION_COOKIE_DOMAIN", value_name = "DOMAIN")]
    pub session_cookie_domain: Option<String>,

    /// Secure attribute of the cookie (send it over HTTPS only).
    #[arg(long, default_value = "false", action = clap::ArgAction::Set, env = "PILLION_SESSION_COOKIE_SECURE", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub session_cookie_secure: bool,

    /// HttpOnly attribute of the cookie (hidden from scripts).
    #[arg(long, default_value = "true", action = clap::ArgAction::Set, env = "PILLION_SESSION_COOKIE_HTTP_ONLY", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub session_cookie_http_only: bool,

    /// SameSite attribute of the cookie: strict, lax or none (none needs
    /// --session-cookie-secure).
    #[arg(
        long,
        default_value = "lax",
        env = "PILLION_SESSION_COOKIE_SAME_SITE",
        value_name = "MODE"
    )]
    pub session_cookie_same_site: pillion_session::cookie::SameSite,

    /// Prefix of the session headers between pillion and the app.
    #[arg(
        long,
        default_value = "X-Session-",
        env = "PILLION_SESSION_HEADER_PREFIX",
        value_name = "PREFIX"
    )]
    pub session_header_prefix: String,

    /// While the session store is unreachable: `pass` requests to the app without
    /// session headers and with X-Session-Error, or `fail` them with 503. A change the
    /// app asks for that cannot be stored is always a 503.
    #[arg(
        long,
        default_value = "pass",
        env = "PILLION_SESSION_STORE_DOWN",
        value_name = "pass|fail"
    )]
    pub session_store_down: pillion_session::inbound::StoreDown,

    /// Largest value of one session key; a larger one is refused.
    #[arg(
        long,
        default_value = "4KiB",
        env = "PILLION_SESSION_MAX_VALUE_SIZE",
        value_name = "SIZE"
    )]
    pub session_max_value_size: pillion_core::Size,

    /// Largest total size of a session; a change beyond it is refused.
    #[arg(
        long,
        default_value = "64KiB",
        env = "PILLION_SESSION_MAX_SIZE",
        value_name = "SIZE"
    )]
    pub session_max_size: pillion_core::Size,

    /// Message broker: `embedded` (in process, and to other sidecars found through the
    /// registry; at-most-once) or nats://host:port[,host:port] (tls://... for a NATS
    /// that requires TLS; its CA from the system or SSL_CERT_FILE).
    #[arg(
        long,
        default_value = "embedded",
        env = "PILLION_BROKER",
        value_name = "URL"
    )]
    pub broker: BrokerUrl,

    /// Topics kept in NATS JetStream (at-least-once: acknowledged, redelivered,
    /// dead-lettered), as subject patterns like 'orders.*'; repeatable
    /// (PILLION_BROKER_DURABLE takes a comma-separated list). Needs a nats:// broker.
    #[arg(
        long,
        env = "PILLION_BROKER_DURABLE",
        value_name = "PATTERN",
        value_delimiter = ','
    )]
    pub broker_durable: Vec<String>,

    /// Deliveries of a durable message before it goes to the dead-letter subject.
    #[arg(
        long,
        default_value = "5",
        env = "PILLION_BROKER_MAX_DELIVER",
        value_name = "N"
    )]
    pub broker_max_deliver: std::num::NonZeroU64,

    /// How long a durable message may stay unacknowledged before it is delivered
    /// again.
    #[arg(
        long,
        default_value = "30s",
        env = "PILLION_BROKER_ACK_WAIT",
        value_name = "DUR"
    )]
    pub broker_ack_wait: NonZeroDur,

    /// Dead letters of topic T are published to PREFIX.T.
    #[arg(
        long,
        default_value = "dead-letter",
        env = "PILLION_BROKER_DEAD_LETTER_PREFIX",
        value_name = "PREFIX"
    )]
    pub broker_dead_letter_prefix: String,

    /// How messages look on NATS: `pillion` (NATS headers and the bare body) or
    /// `go-micro` (the JSON of go-micro's broker.Message, as its NATS broker sends it),
    /// so go-micro services publish to and subscribe from the same topics.
    #[arg(
        long,
        default_value = "pillion",
        env = "PILLION_BROKER_FORMAT",
        value_name = "pillion|go-micro"
    )]
    pub broker_format: BrokerFormat,

    /// Largest message; larger publishes get 413.
    #[arg(
        long,
        default_value = "1MiB",
        env = "PILLION_BROKER_MAX_MESSAGE_SIZE",
        value_name = "SIZE"
    )]
    pub broker_max_message_size: pillion_core::Size,

    /// Messages one subscriber may have waiting; a slower one is disconnected with
    /// the reason.
    #[arg(
        long,
        default_value = "1024",
        env = "PILLION_BROKER_SUBSCRIBER_BUFFER",
        value_name = "N"
    )]
    pub broker_subscriber_buffer: NonZeroUsize,

    /// Push messages of TOPIC to the app: TOPIC=/path, repeatable. pillion POSTs each
    /// message to the app (--app, else --server-address); 2xx acknowledges it.
    #[arg(
        long,
        env = "PILLION_BROKER_PUSH",
        value_name = "TOPIC=/PATH",
        value_delimiter = ','
    )]
    pub broker_push: Vec<pillion_broker::push::PushRoute>,

    /// host:port at which other sidecars reach this one's API, for the embedded
    /// broker across sidecars. [default: --address]
    #[arg(long, env = "PILLION_BROKER_ADVERTISE", value_name = "HOST:PORT")]
    pub broker_advertise: Option<HostPort>,

    /// How often the config file and the --tls-cert/--tls-key files are checked for
    /// changes; [[tcp]] listeners and certificates are reloaded from them (SIGHUP
    /// checks the config file at once).
    #[arg(
        long,
        default_value = "1s",
        env = "PILLION_RELOAD_PERIOD",
        value_name = "DUR"
    )]
    pub reload_period: NonZeroDur,

    /// DNS server for the TCP proxy's target names, host:port; repeatable.
    /// [default: the system's resolv.conf and hosts file]
    #[arg(
        long,
        env = "PILLION_DNS_SERVER",
        value_name = "ADDR",
        value_delimiter = ','
    )]
    pub dns_server: Vec<SocketAddr>,

    /// Export a span per call over OTLP/HTTP (JSON) to URL/v1/traces, for example
    /// http://127.0.0.1:4318 (an OpenTelemetry collector, Jaeger, Tempo). Without it
    /// traceparent is still passed on, and no span is recorded.
    #[arg(long, env = "PILLION_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<OtlpEndpoint>,

    /// Log lines on stderr as text, or as JSON objects, one per line (timestamp,
    /// level, message, fields).
    #[arg(
        long,
        default_value = "text",
        env = "PILLION_LOG_FORMAT",
        value_name = "text|json"
    )]
    pub log_format: LogFormat,

    /// Runtime worker threads, to cap the sidecar's CPU. [default: number of cores]
    #[arg(long, env = "PILLION_WORKER_THREADS", value_name = "N")]
    pub worker_threads: Option<NonZeroUsize>,
}

/// `--session-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionFormat {
    Pillion,
    Bailiff,
}

impl std::str::FromStr for SessionFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pillion" => Ok(SessionFormat::Pillion),
            "bailiff" => Ok(SessionFormat::Bailiff),
            _ => Err(format!(
                "unknown session format {s:?}: use pillion or bailiff"
            )),
        }
    }
}

/// `--broker-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerFormat {
    Pillion,
    GoMicro,
}

impl std::str::FromStr for BrokerFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pillion" => Ok(BrokerFormat::Pillion),
            "go-micro" => Ok(BrokerFormat::GoMicro),
            _ => Err(format!(
                "unknown broker format {s:?}: use pillion or go-micro"
            )),
        }
    }
}
