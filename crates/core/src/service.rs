//! A registered service and its nodes, as the micro sidecar's `/registry` API speaks
//! them.
//!
//! Input is lenient where micro clients differ (`"Name"` or `"name"`, an address with
//! its port or a separate `"port"`) and strict where a mistake would be silent: unknown
//! keys, a node without an id or a port, two nodes with one id. Output is always lower
//! case.

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
        let value = crate::json::parse(body)?;
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
            if node.port == 0 && split_port(&node.address).is_none() {
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

/// The port of `host:port` / `[v6]:port`, if there is one.
fn split_port(address: &str) -> Option<u16> {
    let (host, port) = address.rsplit_once(':')?;
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return None; // a bare IPv6 address: its last group is not a port
    }
    port.parse::<u16>().ok().filter(|p| *p != 0)
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

/// The values of the `protocol` metadata key that callers can speak to a node.
fn check_protocol(what: &str, metadata: &BTreeMap<String, String>) -> Result<(), ServiceError> {
    match metadata.get("protocol") {
        Some(p) if !p.eq_ignore_ascii_case("http1") && !p.eq_ignore_ascii_case("h2c") => {
            Err(ServiceError::Invalid(format!(
                "unknown protocol {} in {what}: use http1 or h2c",
                shown(p)
            )))
        }
        _ => Ok(()),
    }
}

/// A value quoted for an error message, cut short so a huge input is not echoed back.
fn shown(value: &str) -> String {
    const SHOWN: usize = 40;
    match value.char_indices().nth(SHOWN) {
        Some((end, _)) => format!("{:?}...", &value[..end]),
        None => format!("{value:?}"),
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
                "unknown protocol \"http3\" in nodes[0].metadata: use http1 or h2c",
            ),
            (
                br#"{"name":"a","metadata":{"protocol":"grpc"},"nodes":[]}"#,
                "unknown protocol \"grpc\" in metadata: use http1 or h2c",
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
    fn protocol_metadata_is_http1_or_h2c_in_any_case() {
        for p in ["http1", "HTTP1", "h2c", "H2C"] {
            let body = format!(
                r#"{{"name":"a","nodes":[{{"id":"1","address":"h:1","metadata":{{"protocol":"{p}"}}}}]}}"#
            );
            Service::from_json(body.as_bytes()).unwrap();
        }
    }
}
