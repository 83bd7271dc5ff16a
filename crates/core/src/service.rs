//! A registered service and its nodes, as the micro sidecar's `/registry` API speaks
//! them.
//!
//! Input is lenient where micro clients differ (`"Name"` or `"name"`, an address with
//! its port or a separate `"port"`, `null` for an empty field) and strict where a
//! mistake would be silent: unknown keys, a node without an id or a port, two nodes
//! with one id. Output is always lower case, with `address` and `port` in the shape
//! they were registered in.
//!
//! go-micro's registry types, which Go apps marshal and send (go-micro
//! `registry/service.go`, identical from v0.1 to v1.9; v1.10 dropped `Port`):
//!
//! ```go
//! type Service struct {
//!     Name      string            `json:"name"`
//!     Version   string            `json:"version"`
//!     Metadata  map[string]string `json:"metadata"`
//!     Endpoints []*Endpoint       `json:"endpoints"`
//!     Nodes     []*Node           `json:"nodes"`
//! }
//! type Node struct {
//!     Id       string            `json:"id"`
//!     Address  string            `json:"address"`
//!     Port     int               `json:"port"`
//!     Metadata map[string]string `json:"metadata"`
//! }
//! ```
//!
//! `encoding/json` writes a nil map, slice or pointer as `null`, so an app with no
//! metadata sends `"metadata":null`; such a field is taken as absent (`drop_nulls`).

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

use crate::json::{fold_keys, JsonError};

/// A service: a name (and version) with the nodes that serve it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub version: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// micro's endpoint descriptions; kept as given and returned unchanged.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<Value>,
    #[serde(default)]
    pub nodes: Vec<Node>,
}

/// One instance of a service: where to reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Node {
    pub id: String,
    /// `host`, `host:port` or `[v6]:port`.
    pub address: String,
    /// The port when `address` has none; 0 when it is part of `address`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub port: u16,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

fn is_zero(p: &u16) -> bool {
    *p == 0
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    #[error("malformed JSON: {0}")]
    Json(String),
    #[error("invalid service: {0}")]
    Invalid(String),
}

impl Service {
    /// Decodes a service from micro-compatible JSON, with keys in any case, and
    /// validates it (see [`Service::validate`]).
    pub fn from_json(body: &[u8]) -> Result<Service, ServiceError> {
        let mut value = crate::json::parse(body)?;
        drop_nulls(&mut value);
        let value = lowercase_keys(value)?;
        let service: Service =
            serde_json::from_value(value).map_err(|e| ServiceError::Invalid(e.to_string()))?;
        service.validate()?;
        Ok(service)
    }

    /// Checks what the registry and the callers rely on: a name and node ids that are
    /// usable as key segments (see [`MAX_SEGMENT`]), an address with a port for every
    /// node, unique node ids, and a `protocol` the callers can speak.
    pub fn validate(&self) -> Result<(), ServiceError> {
        let invalid = |m: String| Err(ServiceError::Invalid(m));
        check_segment("name", &self.name)?;
        if self.version.contains('/') {
            return invalid(format!(
                "version {} must not contain '/'",
                shown(&self.version)
            ));
        }
        if self.version.len() > MAX_SEGMENT {
            return invalid(format!(
                "version {} is {} bytes long; at most {MAX_SEGMENT} are allowed",
                shown(&self.version),
                self.version.len()
            ));
        }
        check_protocol("metadata", &self.metadata)?;
        if self.nodes.len() > MAX_NODES {
            return invalid(format!(
                "{} nodes in one registration; at most {MAX_NODES} are allowed: register them in several requests",
                self.nodes.len()
            ));
        }
        self.check_sizes()?;
        let mut seen = std::collections::HashSet::new();
        for (i, node) in self.nodes.iter().enumerate() {
            check_segment(&format!("nodes[{i}].id"), &node.id)?;
            check_protocol(&format!("nodes[{i}].metadata"), &node.metadata)?;
            if !seen.insert(node.id.as_str()) {
                return invalid(format!(
                    "node id {:?} appears twice in one request; node ids must be unique",
                    node.id
                ));
            }
            if node.address.trim().is_empty() {
                return invalid(format!("nodes[{i}].address is missing"));
            }
            if node.port == 0 && split_host_port(&node.address).is_none() {
                return invalid(format!(
                    "nodes[{i}].address {:?} has no port: give \"host:port\" or a separate \"port\"",
                    node.address
                ));
            }
        }
        Ok(())
    }

    /// Each node's metadata (its service's included) and its registration as stored
    /// against the limits every backend shares (see [`MAX_NODE_REGISTRATION`]).
    fn check_sizes(&self) -> Result<(), ServiceError> {
        let size = |m: &BTreeMap<String, String>| -> usize {
            m.iter().map(|(k, v)| k.len() + v.len()).sum()
        };
        let shared = serde_json::to_vec(&self.without_nodes()).map_or(0, |v| v.len());
        for (i, node) in self.nodes.iter().enumerate() {
            let keys = self.metadata.len() + node.metadata.len();
            if keys > MAX_METADATA_KEYS {
                return Err(ServiceError::Invalid(format!(
                    "nodes[{i}] carries {keys} metadata keys (its own and the service's); at most \
                     {MAX_METADATA_KEYS} are allowed per node"
                )));
            }
            let bytes = size(&self.metadata) + size(&node.metadata);
            if bytes > MAX_METADATA_BYTES {
                return Err(ServiceError::Invalid(format!(
                    "nodes[{i}] carries {bytes} bytes of metadata (keys and values, its own and \
                     the service's); at most {MAX_METADATA_BYTES} bytes (32 KiB) are allowed per node"
                )));
            }
            // The node's registration as a backend stores it: the service's fields and
            // endpoints, with this one node.
            let stored = shared + serde_json::to_vec(node).map_or(0, |v| v.len()) + 12;
            if stored > MAX_NODE_REGISTRATION {
                return Err(ServiceError::Invalid(format!(
                    "nodes[{i}]'s registration is {stored} bytes as stored (the service's \
                     metadata and endpoints with the node); at most {MAX_NODE_REGISTRATION} \
                     bytes (48 KiB) are allowed per node: make the endpoints or the metadata smaller"
                )));
            }
        }
        Ok(())
    }

    /// The same service without nodes: its identity and metadata.
    pub fn without_nodes(&self) -> Service {
        Service {
            nodes: Vec::new(),
            ..self.clone()
        }
    }
}

/// The node metadata key holding `host:port` of the node's mesh listener: calls to
/// such a node go there over mTLS instead of to its address.
pub const MESH_METADATA: &str = "mesh";

impl Node {
    /// A node at `host:port`, registered the way micro's sidecar registered its app
    /// (micro v0.7 `car/car.go`, `run`: split at the last `:`): the host in `address`,
    /// the port apart, so a client that reads `address` and `port` separately dials the
    /// right port. An address without a port is kept whole (and refused by
    /// [`Service::validate`]).
    pub fn at(id: String, host_port: &str, metadata: BTreeMap<String, String>) -> Node {
        let (address, port) = split_host_port(host_port).unwrap_or((host_port, 0));
        Node {
            id,
            address: address.to_string(),
            port,
            metadata,
        }
    }

    /// `host:port` of the node's mesh listener, when it has one.
    pub fn mesh(&self) -> Option<&str> {
        self.metadata.get(MESH_METADATA).map(String::as_str)
    }

    /// `host:port` to dial, whether the port was given inside `address` or apart.
    pub fn endpoint(&self) -> String {
        if self.port == 0 {
            return self.address.clone();
        }
        let host = self.address.trim_start_matches('[').trim_end_matches(']');
        if host.contains(':') {
            format!("[{host}]:{}", self.port)
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

/// The host and port of `host:port` / `[v6]:port` (the brackets kept, as micro kept
/// them), if there is a port.
fn split_host_port(address: &str) -> Option<(&str, u16)> {
    let (host, port) = address.rsplit_once(':')?;
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return None; // a bare IPv6 address: its last group is not a port
    }
    let port = port.parse::<u16>().ok().filter(|p| *p != 0)?;
    Some((host, port))
}

// Limits of one registration. They are the same on every registry backend, so that a
// registration one backend accepts, every one accepts; the cluster registry is what
// sets them. Each node's registration is one value in its sidecar's gossip state, and
// chitchat sends a value whole, in one message no larger than a UDP datagram (65,507
// bytes, less a digest of about 60 bytes per sidecar of the cluster). A larger value is
// never sent, and every later change of that sidecar waits behind it for good.

/// The most nodes one registration request may list.
pub const MAX_NODES: usize = 1000;
/// The most metadata keys a node carries, the service's included.
pub const MAX_METADATA_KEYS: usize = 256;
/// The most bytes of metadata keys and values a node carries, the service's included.
pub const MAX_METADATA_BYTES: usize = 32 * 1024;
/// The largest registration of one node as stored (JSON: the service's name, version,
/// metadata and endpoints, with the node). 48 KiB leaves room in a gossip message for
/// the digest of about 250 sidecars.
pub const MAX_NODE_REGISTRATION: usize = 48 * 1024;

/// The longest service name or node id, in bytes. Both are key segments in etcd
/// (`/pillion/registry/{name}/{id}`) and appear in every catalog copy and log line.
pub const MAX_SEGMENT: usize = 256;

/// The rule for service names and node ids, as error messages state it.
const SEGMENT_RULE: &str =
    "must be 1 to 256 printable ASCII characters without spaces or '/' (such as foo.bar-1)";

/// Service names and node ids: 1 to [`MAX_SEGMENT`] printable ASCII characters
/// (`!` to `~`) other than `/`. No whitespace, no control characters, no Unicode that
/// could look like another name in a log.
fn check_segment(what: &str, value: &str) -> Result<(), ServiceError> {
    if value.trim().is_empty() {
        return Err(ServiceError::Invalid(format!("{what} is missing")));
    }
    let allowed = |b: u8| b.is_ascii_graphic() && b != b'/';
    if value.len() > MAX_SEGMENT {
        return Err(ServiceError::Invalid(format!(
            "{what} {} is {} bytes long: it {SEGMENT_RULE}",
            shown(value),
            value.len()
        )));
    }
    if let Some(bad) = value
        .chars()
        .find(|c| u8::try_from(*c).map_or(true, |b| !allowed(b)))
    {
        return Err(ServiceError::Invalid(format!(
            "{what} {} contains {bad:?}: it {SEGMENT_RULE}",
            shown(value)
        )));
    }
    Ok(())
}

/// What a node speaks, as the `protocol` key of its (or its service's) metadata
/// declares it: pillion's values and go-micro's. How each is called is the invoker's
/// decision (`pillion_invoke::Protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeProtocol {
    /// pillion's: HTTP/1.1 only.
    Http1,
    /// pillion's: HTTP/2 with prior knowledge.
    H2c,
    /// go-micro's HTTP server (plain `net/http`).
    Http,
    /// go-micro v1's gRPC server (`server/grpc/grpc.go` registers `protocol=grpc`).
    Grpc,
    /// go-micro v1's RPC server (`server/rpc_server.go` registers `protocol=mucp`).
    Mucp,
    /// pillion's: a JSON-RPC server as micro's sidecar called nodes (micro's Python
    /// and Go examples: the `json-rpc` package, Go's `net/rpc/jsonrpc`).
    JsonRpc,
}

impl NodeProtocol {
    /// The accepted values, as error messages list them.
    pub const VALUES: &'static str = "http1, h2c, jsonrpc, http, grpc or mucp";

    /// The protocol a metadata value names, in any case.
    pub fn parse(value: &str) -> Option<NodeProtocol> {
        [
            ("http1", NodeProtocol::Http1),
            ("h2c", NodeProtocol::H2c),
            ("http", NodeProtocol::Http),
            ("grpc", NodeProtocol::Grpc),
            ("mucp", NodeProtocol::Mucp),
            ("jsonrpc", NodeProtocol::JsonRpc),
        ]
        .into_iter()
        .find(|(name, _)| value.eq_ignore_ascii_case(name))
        .map(|(_, protocol)| protocol)
    }
}

/// The `protocol` metadata key, when given, must name a [`NodeProtocol`].
fn check_protocol(what: &str, metadata: &BTreeMap<String, String>) -> Result<(), ServiceError> {
    match metadata.get("protocol") {
        Some(p) if NodeProtocol::parse(p).is_none() => Err(ServiceError::Invalid(format!(
            "unknown protocol {} in {what}: use {}",
            shown(p),
            NodeProtocol::VALUES
        ))),
        _ => Ok(()),
    }
}

/// A value quoted for an error message, cut short so a huge input is not echoed back.
fn shown(value: &str) -> String {
    crate::error::quoted(value, 40)
}

/// Removes every key whose value is `null`, in every object at every depth (the
/// service, its nodes, endpoints and metadata): go-micro's apps send `null` for an
/// empty field, and it means the field is absent. A `null` where a value is required
/// (`"name":null`) is then reported as missing; any other wrong type is still refused.
fn drop_nulls(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.retain(|_, v| !v.is_null());
            map.values_mut().for_each(drop_nulls);
        }
        Value::Array(items) => items.iter_mut().for_each(drop_nulls),
        _ => {}
    }
}

/// Lower-cases the keys micro defines (service and node fields), not user keys inside
/// `metadata`. Two keys that differ only in case are an error, not a silent pick.
fn lowercase_keys(value: Value) -> Result<Value, ServiceError> {
    let Value::Object(map) = value else {
        return Err(ServiceError::Invalid(
            "expected a JSON object like {\"name\":\"foo\",\"nodes\":[...]}".into(),
        ));
    };
    let mut map = fold_keys(map, "")?;
    if let Some(Value::Array(nodes)) = map.get_mut("nodes") {
        for (i, node) in nodes.iter_mut().enumerate() {
            if let Value::Object(n) = node {
                *n = fold_keys(std::mem::take(n), &format!("nodes[{i}]"))?;
            }
        }
    }
    Ok(Value::Object(map))
}

impl From<JsonError> for ServiceError {
    fn from(e: JsonError) -> ServiceError {
        match e {
            JsonError::Malformed(m) => ServiceError::Json(m),
            JsonError::Duplicate { .. } => ServiceError::Invalid(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_micro_readme_json_with_capitalised_keys() {
        let body =
            br#"{"Name":"foo.bar","Nodes":[{"Port":9091,"Address":"127.0.0.1","Id":"foo.bar-1"}]}"#;
        let s = Service::from_json(body).unwrap();
        assert_eq!(s.name, "foo.bar");
        assert_eq!(s.nodes[0].endpoint(), "127.0.0.1:9091");
        let out = serde_json::to_value(&s).unwrap();
        assert_eq!(
            out,
            serde_json::json!({"name":"foo.bar","nodes":[{"id":"foo.bar-1","address":"127.0.0.1","port":9091}]})
        );
    }

    #[test]
    fn metadata_keys_keep_their_case() {
        let body = br#"{"name":"a","Metadata":{"Zone":"z1"},"nodes":[{"id":"1","address":"h:1","METADATA":{"Region":"r"}}]}"#;
        let s = Service::from_json(body).unwrap();
        assert_eq!(s.metadata["Zone"], "z1");
        assert_eq!(s.nodes[0].metadata["Region"], "r");
    }

    #[test]
    fn endpoints_for_every_address_form() {
        let n = |address: &str, port| Node {
            id: "x".into(),
            address: address.into(),
            port,
            ..Node::default()
        };
        assert_eq!(n("10.0.0.1:80", 0).endpoint(), "10.0.0.1:80");
        assert_eq!(n("::1", 8080).endpoint(), "[::1]:8080");
        assert_eq!(n("[::]", 60728).endpoint(), "[::]:60728");
        assert_eq!(n("[::1]:9", 0).endpoint(), "[::1]:9");
        assert_eq!(n("svc.local", 9).endpoint(), "svc.local:9");
    }

    #[test]
    fn rejects_mistakes_with_a_message() {
        let cases: &[(&[u8], &str)] = &[
            (b"{", "malformed JSON"),
            (b"[]", "expected a JSON object"),
            (br#"{"nodes":[]}"#, "missing field `name`"),
            (br#"{"name":" "}"#, "name is missing"),
            (br#"{"name":"a/b"}"#, "contains '/'"),
            (br#"{"name":"a b"}"#, "contains ' ': it must be 1 to 256 printable ASCII"),
            (br#"{"name":"caf\u00e9"}"#, "contains 'é'"),
            (br#"{"name":"a\u0000"}"#, "contains '\\0'"),
            (
                br#"{"name":"a","nodes":[{"id":"n\tx","address":"h:1"}]}"#,
                "nodes[0].id \"n\\tx\" contains '\\t'",
            ),
            (
                br#"{"name":"a","nodes":[{"id":"1","address":"h:1","metadata":{"protocol":"http3"}}]}"#,
                "unknown protocol \"http3\" in nodes[0].metadata: use http1, h2c, jsonrpc, http, grpc or mucp",
            ),
            (
                br#"{"name":"a","metadata":{"protocol":"jsonrpc2"},"nodes":[]}"#,
                "unknown protocol \"jsonrpc2\" in metadata: use http1, h2c, jsonrpc, http, grpc or mucp",
            ),
            (
                br#"{"name":"a","nodes":[{"id":"1","address":"h"}]}"#,
                "has no port",
            ),
            (
                br#"{"name":"a","nodes":[{"id":"1","address":"::1"}]}"#,
                "has no port",
            ),
            (
                br#"{"name":"a","nodes":[{"address":"h:1"}]}"#,
                "missing field `id`",
            ),
            (
                br#"{"name":"a","nodes":[{"id":"1","adress":"h:1"}]}"#,
                "unknown field `adress`",
            ),
            (br#"{"name":"a","Name":"b"}"#, "given twice"),
            (br#"{"name":"a","name":"b"}"#, "key \"name\" is given twice"),
            (
                br#"{"name":"a","nodes":[{"id":"1","address":"h:1","metadata":{"k":"1","k":"2"}}]}"#,
                "key \"k\" is given twice in nodes[0].metadata",
            ),
            (
                br#"{"name":"a","nodes":[{"id":"1","ID":"2","address":"h:1"}]}"#,
                "key \"id\" is given twice in nodes[0]; each key may appear once (keys are case-insensitive)",
            ),
            (
                br#"{"name":"a","nodes":[{"id":"1","address":"h:1"},{"id":"1","address":"h:2"}]}"#,
                "appears twice",
            ),
            (
                br#"{"name":"a","nodes":[{"id":"1","address":"h:1","port":70000}]}"#,
                "invalid value",
            ),
            // null is an absent field: missing where one is required; other wrong
            // types are still refused.
            (br#"{"name":null}"#, "missing field `name`"),
            (
                br#"{"name":"a","nodes":[{"id":null,"address":"h:1"}]}"#,
                "missing field `id`",
            ),
            (br#"{"name":"a","nodes":[null]}"#, "invalid type: null"),
            (br#"{"name":"a","metadata":[]}"#, "invalid type: sequence"),
            (br#"{"name":"a","metadata":{"k":1}}"#, "invalid type: integer"),
            (
                br#"{"name":"a","nodes":[{"id":"1","address":"h","port":"80"}]}"#,
                "invalid type: string",
            ),
            (br#"{"name":"a","endpoints":{}}"#, "invalid type: map"),
        ];
        for (body, want) in cases {
            let err = Service::from_json(body).unwrap_err().to_string();
            assert!(
                err.contains(want),
                "{}: got {err:?}, want {want:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn names_and_ids_are_bounded_and_the_error_does_not_echo_them() {
        let long = "a".repeat(MAX_SEGMENT + 1);
        for body in [
            format!(r#"{{"name":"{long}"}}"#),
            format!(r#"{{"name":"a","nodes":[{{"id":"{long}","address":"h:1"}}]}}"#),
        ] {
            let err = Service::from_json(body.as_bytes()).unwrap_err().to_string();
            assert!(err.contains("257 bytes long"), "{err}");
            assert!(err.contains("1 to 256 printable ASCII"), "{err}");
            assert!(err.len() < 200, "the whole value was echoed: {err}");
        }
        let longest = "a".repeat(MAX_SEGMENT);
        let body =
            format!(r#"{{"name":"{longest}","nodes":[{{"id":"{longest}","address":"h:1"}}]}}"#);
        Service::from_json(body.as_bytes()).unwrap();
    }

    #[test]
    fn every_backend_s_limits_are_named_when_exceeded() {
        let node = |id: usize, metadata: &str| {
            format!(r#"{{"id":"n{id}","address":"h:1","metadata":{{{metadata}}}}}"#)
        };
        let big = |bytes: usize| format!(r#""k":"{}""#, "v".repeat(bytes));
        let service = |metadata: &str, nodes: Vec<String>| {
            format!(
                r#"{{"name":"a","metadata":{{{metadata}}},"nodes":[{}]}}"#,
                nodes.join(",")
            )
        };
        let keys = |n: usize| {
            (0..n)
                .map(|i| format!(r#""k{i}":"v""#))
                .collect::<Vec<_>>()
                .join(",")
        };
        let cases = [
            (
                service("", vec![node(0, &big(70_000))]),
                "nodes[0] carries 70001 bytes of metadata (keys and values, its own and the service's); at most 32768 bytes (32 KiB) are allowed per node",
            ),
            (
                service(&big(20_000), vec![node(0, &big(20_000).replace("\"k\"", "\"j\""))]),
                "nodes[0] carries 40002 bytes of metadata",
            ),
            (
                service(&keys(200), vec![node(0, &keys(57).replace('k', "j"))]),
                "nodes[0] carries 257 metadata keys (its own and the service's); at most 256",
            ),
            (
                service("", (0..=MAX_NODES).map(|i| node(i, "")).collect()),
                "1001 nodes in one registration; at most 1000 are allowed",
            ),
            (
                format!(
                    r#"{{"name":"a","endpoints":[{{"name":"{}"}}],"nodes":[{}]}}"#,
                    "e".repeat(MAX_NODE_REGISTRATION),
                    node(0, "")
                ),
                "at most 49152 bytes (48 KiB) are allowed per node",
            ),
        ];
        for (body, want) in &cases {
            let err = Service::from_json(body.as_bytes()).unwrap_err().to_string();
            assert!(err.contains(want), "got {err:?}, want {want:?}");
        }
        // Exactly at every limit: accepted.
        let mut at_the_limits = Service {
            name: "a".into(),
            metadata: (0..128).map(|i| (format!("k{i}"), "v".into())).collect(),
            nodes: vec![Node {
                id: "n".into(),
                address: "h:1".into(),
                metadata: (0..127).map(|i| (format!("j{i}"), "v".into())).collect(),
                ..Node::default()
            }],
            ..Service::default()
        };
        let used: usize = at_the_limits
            .metadata
            .iter()
            .chain(&at_the_limits.nodes[0].metadata)
            .map(|(k, v)| k.len() + v.len())
            .sum();
        at_the_limits.nodes[0]
            .metadata
            .insert("big".into(), "v".repeat(MAX_METADATA_BYTES - used - 3));
        at_the_limits.validate().unwrap();
    }

    #[test]
    fn protocol_metadata_is_pillion_s_or_go_micro_s_in_any_case() {
        let cases = [
            ("http1", NodeProtocol::Http1),
            ("HTTP1", NodeProtocol::Http1),
            ("h2c", NodeProtocol::H2c),
            ("H2C", NodeProtocol::H2c),
            ("http", NodeProtocol::Http),
            ("grpc", NodeProtocol::Grpc),
            ("mucp", NodeProtocol::Mucp),
            ("MUCP", NodeProtocol::Mucp),
            ("jsonrpc", NodeProtocol::JsonRpc),
            ("JSONRPC", NodeProtocol::JsonRpc),
        ];
        for (p, want) in cases {
            let body = format!(
                r#"{{"name":"a","metadata":{{"protocol":"{p}"}},"nodes":[{{"id":"1","address":"h:1","metadata":{{"protocol":"{p}"}}}}]}}"#
            );
            Service::from_json(body.as_bytes()).unwrap();
            assert_eq!(NodeProtocol::parse(p), Some(want), "{p}");
        }
        assert_eq!(NodeProtocol::parse("http2"), None);
    }

    /// What go-micro v0.x/v1.x's `json.Marshal(&registry.Service{...})` sends for a
    /// service with one node and nothing else set.
    #[test]
    fn go_micro_s_nulls_are_absent_fields_at_every_level() {
        let body = br#"{"name":"go.micro.srv.greeter","version":"","metadata":null,
            "endpoints":[{"name":"Say.Hello","request":null,"response":{"name":"Response","type":"Response","values":null},"metadata":null}],
            "nodes":[{"id":"greeter-1","address":"10.0.0.1","port":9090,"metadata":null}]}"#;
        let s = Service::from_json(body).unwrap();
        assert!(s.metadata.is_empty());
        assert_eq!(s.nodes[0].endpoint(), "10.0.0.1:9090");
        assert!(s.nodes[0].metadata.is_empty());
        assert_eq!(
            serde_json::to_value(&s).unwrap(),
            serde_json::json!({"name":"go.micro.srv.greeter",
                "endpoints":[{"name":"Say.Hello","response":{"name":"Response","type":"Response"}}],
                "nodes":[{"id":"greeter-1","address":"10.0.0.1","port":9090}]})
        );
        let all_null = br#"{"Name":"a","Version":null,"Metadata":null,"Endpoints":null,
            "Nodes":[{"Id":"1","Address":"h:1","Port":null,"Metadata":{"zone":null,"region":"r"}}]}"#;
        let s = Service::from_json(all_null).unwrap();
        assert_eq!(s.nodes[0].endpoint(), "h:1");
        assert_eq!(
            s.nodes[0].metadata,
            BTreeMap::from([("region".into(), "r".into())])
        );
        Service::from_json(br#"{"name":"a","nodes":null}"#).unwrap();
    }

    #[test]
    fn a_node_at_host_port_is_registered_as_micro_registered_it() {
        let at = |hp: &str| Node::at("n".into(), hp, BTreeMap::new());
        let cases = [
            ("127.0.0.1:9090", "127.0.0.1", 9090),
            ("svc.local:80", "svc.local", 80),
            ("[::1]:9090", "[::1]", 9090),
            ("::1", "::1", 0),
            ("h", "h", 0),
        ];
        for (hp, address, port) in cases {
            let node = at(hp);
            assert_eq!((node.address.as_str(), node.port), (address, port), "{hp}");
        }
        assert_eq!(at("[::1]:9090").endpoint(), "[::1]:9090");
        assert_eq!(at("127.0.0.1:9090").endpoint(), "127.0.0.1:9090");
    }
}
