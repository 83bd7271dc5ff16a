//! A registered service and its nodes, as the micro sidecar's `/registry` API speaks
//! them.
//!
//! Input is lenient where micro clients differ (`"Name"` or `"name"`, an address with
//! its port or a separate `"port"`) and strict where a mistake would be silent: unknown
//! keys, a node without an id or a port, two nodes with one id. Output is always lower
//! case.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

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
        let value: Value =
            serde_json::from_slice(body).map_err(|e| ServiceError::Json(e.to_string()))?;
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
    fn lower(map: Map<String, Value>, at: &str) -> Result<Map<String, Value>, ServiceError> {
        let mut out = Map::new();
        for (k, v) in map {
            let key = k.to_ascii_lowercase();
            if out.contains_key(&key) {
                return Err(ServiceError::Invalid(format!(
                    "key {key:?} is given twice{at} (keys are case-insensitive)"
                )));
            }
            out.insert(key, v);
        }
        Ok(out)
    }
    let Value::Object(map) = value else {
        return Err(ServiceError::Invalid(
            "expected a JSON object like {\"name\":\"foo\",\"nodes\":[...]}".into(),
        ));
    };
    let mut map = lower(map, "")?;
    if let Some(Value::Array(nodes)) = map.get_mut("nodes") {
        for (i, node) in nodes.iter_mut().enumerate() {
            if let Value::Object(n) = node {
                *n = lower(std::mem::take(n), &format!(" in nodes[{i}]"))?;
            }
        }
    }
    Ok(Value::Object(map))
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
    fn protocol_metadata_is_http1_or_h2c_in_any_case() {
        for p in ["http1", "HTTP1", "h2c", "H2C"] {
            let body = format!(
                r#"{{"name":"a","nodes":[{{"id":"1","address":"h:1","metadata":{{"protocol":"{p}"}}}}]}}"#
            );
            Service::from_json(body.as_bytes()).unwrap();
        }
    }
}
