//! JSON request bodies, read strictly.
//!
//! serde_json keeps the last of two equal keys without a word, so
//! `{"name":"a","name":"b"}` would register `b` and leave the caller believing `a`
//! was. [`parse`] refuses an object that names a key twice, at any depth; and
//! [`fold_keys`] lower-cases the keys the API matches in any case (micro's clients
//! send `Name` or `name`), refusing two that differ only in case. Every API body that
//! is JSON goes through both, so the rule is the same on every endpoint.

use std::cell::RefCell;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    /// Not JSON at all, or cut short.
    #[error("malformed JSON: {0}")]
    Malformed(String),
    /// An object names `key` twice; `any_case` when the two differ only in case.
    #[error(
        "key {key:?} is given twice{}; each key may appear once{}",
        shown_path(path),
        if *any_case { " (keys are case-insensitive)" } else { "" }
    )]
    Duplicate {
        key: String,
        /// Where the object is (`nodes[0].metadata`), empty for the top level.
        path: String,
        any_case: bool,
    },
}

fn shown_path(path: &str) -> String {
    if path.is_empty() {
        String::new()
    } else {
        format!(" in {path}")
    }
}

/// Parses `body`, refusing any object that names a key twice.
pub fn parse(body: &[u8]) -> Result<Value, JsonError> {
    let duplicate = RefCell::new(None);
    let seed = Strict {
        path: String::new(),
        duplicate: &duplicate,
    };
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed = seed.deserialize(&mut de).and_then(|v| de.end().map(|()| v));
    match (parsed, duplicate.into_inner()) {
        (Ok(value), _) => Ok(value),
        (Err(_), Some(duplicate)) => Err(duplicate),
        (Err(e), None) => Err(JsonError::Malformed(e.to_string())),
    }
}

/// Lower-cases the keys of one object whose keys are matched in any case; `path`
/// names the object in the error.
pub fn fold_keys(
    entries: impl IntoIterator<Item = (String, Value)>,
    path: &str,
) -> Result<Map<String, Value>, JsonError> {
    let mut out = Map::new();
    for (key, value) in entries {
        let key = key.to_ascii_lowercase();
        if out.contains_key(&key) {
            return Err(JsonError::Duplicate {
                key,
                path: path.to_string(),
                any_case: true,
            });
        }
        out.insert(key, value);
    }
    Ok(out)
}

/// A JSON value whose objects are checked for repeated keys as they are read. The
/// first repeat is kept in `duplicate` (typed) and parsing stops there.
struct Strict<'a> {
    path: String,
    duplicate: &'a RefCell<Option<JsonError>>,
}

impl Strict<'_> {
    fn at(&self, segment: fmt::Arguments<'_>) -> Self {
        Strict {
            path: format!("{}{segment}", self.path),
            duplicate: self.duplicate,
        }
    }
}

impl<'de> DeserializeSeed<'de> for Strict<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(v.into())
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(v.into())
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(self.at(format_args!("[{}]", out.len())))? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                let error = JsonError::Duplicate {
                    key,
                    path: self.path.clone(),
                    any_case: false,
                };
                let message = error.to_string();
                *self.duplicate.borrow_mut() = Some(error);
                return Err(A::Error::custom(message));
            }
            let dot = if self.path.is_empty() { "" } else { "." };
            let value = map.next_value_seed(self.at(format_args!("{dot}{key}")))?;
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_given_twice_is_refused_wherever_it_is() {
        let cases: &[(&str, &str)] = &[
            (
                r#"{"name":"a","name":"b"}"#,
                r#"key "name" is given twice;"#,
            ),
            (
                r#"{"nodes":[{"id":"1"},{"id":"2","id":"3"}]}"#,
                r#"key "id" is given twice in nodes[1];"#,
            ),
            (
                r#"{"metadata":{"zone":"a","zone":"b"}}"#,
                r#"key "zone" is given twice in metadata;"#,
            ),
        ];
        for (body, want) in cases {
            let e = parse(body.as_bytes()).unwrap_err();
            assert!(
                matches!(
                    e,
                    JsonError::Duplicate {
                        any_case: false,
                        ..
                    }
                ),
                "{body}: {e:?}"
            );
            assert!(e.to_string().contains(want), "{body}: {e}");
        }
    }

    #[test]
    fn the_same_key_in_different_objects_or_case_is_not_a_repeat() {
        let v = parse(br#"{"a":{"x":1},"b":{"x":2.5},"A":[null,true,"s",-1]}"#).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"a":{"x":1},"b":{"x":2.5},"A":[null,true,"s",-1]})
        );
    }

    #[test]
    fn malformed_json_says_so() {
        for body in [&b"{"[..], b"{} {}", b"", b"{\"a\":}"] {
            assert!(
                matches!(parse(body), Err(JsonError::Malformed(_))),
                "{body:?}"
            );
        }
    }

    #[test]
    fn folded_keys_differing_only_in_case_are_a_repeat() {
        let v = parse(br#"{"Name":"a","name":"b"}"#).unwrap();
        let Value::Object(map) = v else { panic!() };
        let e = fold_keys(map, "").unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"key "name" is given twice; each key may appear once (keys are case-insensitive)"#
        );
        let folded = fold_keys([("Service".to_string(), Value::Null)], "").unwrap();
        assert!(folded.contains_key("service"));
    }
}
