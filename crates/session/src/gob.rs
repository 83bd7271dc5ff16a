//! bailiff's stored sessions: Go's `encoding/gob` of gorilla/sessions'
//! `map[interface{}]interface{}`, whose keys are strings (the header name after
//! `X-Session-Set-`) and whose values are `[]string`, as bailiff writes them through
//! redisstore (`gob.NewEncoder(buf).Encode(session.Values)`).
//!
//! Only that shape is read; anything else is an error, never a panic. The input is
//! hostile (whatever is in Redis under the cookie's id): every length is checked
//! against the bytes left before anything is allocated, and nothing recurses.
//!
//! The stream, as Go writes it (`encoder.go`): messages, each a length then bytes.
//! First the map's type (`-65`, a wireType with MapT{Key: interface, Elem:
//! interface}); then the value (`65`, a zero delta, the count, then each key and
//! value as an interface: the concrete type's name, its id, a byte count, the value).
//! The first `[]string` also defines its type (`-66`) in the middle of the value, and
//! Go flushes what it has of the value as a message there (`sendActualType` writes
//! the encoder state's buffer), so a message boundary falls inside the value; the
//! decoder (`decodeTypeSequence`) reads the next message there, and so does this one.

use crate::SessionData;

/// gob's predefined type ids.
const STRING: i64 = 6;
const INTERFACE: i64 = 8;
/// The first id of a type the stream defines.
const FIRST_USER_ID: i64 = 65;
/// A type name longer than this is refused (gob's own limit).
const MAX_NAME: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a bailiff session: {0}")]
pub struct GobError(String);

fn err<T>(what: impl Into<String>) -> Result<T, GobError> {
    Err(GobError(what.into()))
}

/// What the stream defined: which ids are `map[interface{}]interface{}` and which
/// are `[]string`.
#[derive(Default)]
struct Types {
    maps: Vec<i64>,
    string_slices: Vec<i64>,
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    /// Where the current message ends.
    end: usize,
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Result<u8, GobError> {
        if self.pos >= self.end {
            return err("truncated");
        }
        self.pos += 1;
        Ok(self.data[self.pos - 1])
    }

    /// gob's unsigned integer: one byte below 128, else a negated byte count and
    /// that many big-endian bytes (at most 8).
    fn uint(&mut self) -> Result<u64, GobError> {
        let first = self.byte()?;
        if first < 0x80 {
            return Ok(first as u64);
        }
        let n = (!first).wrapping_add(1) as usize;
        if n > 8 {
            return err(format!("an integer of {n} bytes"));
        }
        let mut v = 0u64;
        for _ in 0..n {
            v = (v << 8) | self.byte()? as u64;
        }
        Ok(v)
    }

    fn int(&mut self) -> Result<i64, GobError> {
        let u = self.uint()?;
        Ok(if u & 1 == 1 {
            !((u >> 1) as i64)
        } else {
            (u >> 1) as i64
        })
    }

    /// A length that fits in what is left of the message.
    fn len(&mut self) -> Result<usize, GobError> {
        let n = self.uint()?;
        if n > (self.end - self.pos) as u64 {
            return err(format!("a length of {n} past the end of the data"));
        }
        Ok(n as usize)
    }

    fn bytes(&mut self) -> Result<&'a [u8], GobError> {
        let n = self.len()?;
        self.pos += n;
        Ok(&self.data[self.pos - n..self.pos])
    }

    fn string(&mut self) -> Result<String, GobError> {
        String::from_utf8(self.bytes()?.to_vec()).or_else(|_| err("a string that is not UTF-8"))
    }

    /// Starts the next message, when the current one is used up.
    fn next_message(&mut self) -> Result<(), GobError> {
        if self.pos < self.end {
            return Ok(());
        }
        self.end = self.data.len();
        let n = self.len()?;
        self.end = self.pos + n;
        Ok(())
    }

    /// A struct's next field number (deltas from -1), or `None` at its end.
    fn field(&mut self, last: &mut i64) -> Result<Option<i64>, GobError> {
        match self.uint()? {
            0 => Ok(None),
            d if d > 16 => err(format!("a field delta of {d}")),
            d => {
                *last += d as i64;
                Ok(Some(*last))
            }
        }
    }

    /// gob's `decodeTypeSequence`: type definitions until a value's type id.
    fn type_sequence(&mut self, types: &mut Types, interface: bool) -> Result<i64, GobError> {
        // A stream defines a handful of types; more is not bailiff's.
        for _ in 0..16 {
            self.next_message()?;
            let id = self.int()?;
            if id >= 0 {
                return Ok(id);
            }
            self.wire_type(-id, types)?;
            if self.pos < self.end {
                if !interface {
                    return err("extra data after a type definition");
                }
                self.uint()?;
            }
        }
        err("too many type definitions")
    }

    /// A `wireType` defining `id`: a map of interfaces or a slice of strings.
    fn wire_type(&mut self, id: i64, types: &mut Types) -> Result<(), GobError> {
        if id < FIRST_USER_ID {
            return err(format!("a definition of the predefined type {id}"));
        }
        let mut field = -1;
        let kind = self.field(&mut field)?;
        // Each: CommonType{Name, Id}, then Elem (slice) or Key and Elem (map).
        let (elems, list) = match kind {
            Some(1) => (1, &mut types.string_slices),
            Some(3) => (2, &mut types.maps),
            _ => return err(format!("type {id} is not a map or a slice")),
        };
        let mut inner = -1;
        let mut found = Vec::new();
        while let Some(f) = self.field(&mut inner)? {
            match f {
                0 => {
                    let mut common = -1;
                    while let Some(c) = self.field(&mut common)? {
                        match c {
                            0 => {
                                self.bytes()?;
                            }
                            1 => {
                                self.int()?;
                            }
                            _ => return err("an unknown field in a type's name and id"),
                        }
                    }
                }
                f if f <= elems => found.push(self.int()?),
                _ => return err("an unknown field in a type definition"),
            }
        }
        if self.field(&mut field)?.is_some() {
            return err("a type definition with two kinds");
        }
        let wanted: &[i64] = if elems == 1 {
            &[STRING]
        } else {
            &[INTERFACE, INTERFACE]
        };
        if found != wanted {
            return err(format!(
                "type {id} is not []string or map[interface{{}}]interface{{}}"
            ));
        }
        list.push(id);
        Ok(())
    }

    /// An interface value: its concrete type's name, id, byte count, then the value.
    fn interface(&mut self, types: &mut Types) -> Result<Value, GobError> {
        let name_len = self.len()?;
        if name_len == 0 {
            return err("a nil value");
        }
        if name_len > MAX_NAME {
            return err("a type name too long");
        }
        self.pos += name_len;
        let name = &self.data[self.pos - name_len..self.pos];
        let id = self.type_sequence(types, true)?;
        self.uint()?; // the value's byte count
        if self.uint()? != 0 {
            return err("a value that is not a singleton");
        }
        match (name, id) {
            (b"string", STRING) => Ok(Value::String(self.string()?)),
            (b"[]string", id) if types.string_slices.contains(&id) => {
                let n = self.uint()?;
                let mut values = Vec::new();
                for _ in 0..n {
                    // Each string takes one byte at least: a count past the data
                    // ends here, without allocating for it.
                    values.push(self.string()?);
                }
                Ok(Value::Strings(values))
            }
            _ => err(format!(
                "a value of type {:?} (bailiff stores strings and []string)",
                String::from_utf8_lossy(name)
            )),
        }
    }
}

enum Value {
    String(String),
    Strings(Vec<String>),
}

/// The session bailiff stored, as pillion's data.
pub fn decode(data: &[u8]) -> Result<SessionData, GobError> {
    let mut r = Reader {
        data,
        pos: 0,
        end: 0,
    };
    let mut types = Types::default();
    let id = r.type_sequence(&mut types, false)?;
    if !types.maps.contains(&id) {
        return err("the value is not a map[interface{}]interface{}");
    }
    if r.uint()? != 0 {
        return err("a value that is not a singleton");
    }
    let count = r.uint()?;
    let mut out = SessionData::new();
    for _ in 0..count {
        let key = match r.interface(&mut types)? {
            Value::String(k) => k,
            Value::Strings(_) => return err("a key that is not a string"),
        };
        let values = match r.interface(&mut types)? {
            Value::Strings(v) => v,
            Value::String(v) => vec![v],
        };
        out.insert(key, values);
    }
    if r.pos != data.len() {
        return err("data after the session");
    }
    Ok(out)
}

struct Writer(Vec<u8>);

impl Writer {
    fn uint(&mut self, v: u64) {
        if v < 0x80 {
            self.0.push(v as u8);
            return;
        }
        let bytes = v.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        self.0.push((-((8 - skip) as i8)) as u8);
        self.0.extend_from_slice(&bytes[skip..]);
    }

    fn int(&mut self, v: i64) {
        let u = if v < 0 {
            ((!v as u64) << 1) | 1
        } else {
            (v as u64) << 1
        };
        self.uint(u);
    }

    fn string(&mut self, s: &str) {
        self.uint(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
    }
}

/// Appends `body` to `out` as one message (its length, then it).
fn message(out: &mut Writer, body: &Writer) {
    out.uint(body.0.len() as u64);
    out.0.extend_from_slice(&body.0);
}

/// A session as bailiff stores it, byte for byte what Go's encoder writes for the
/// same map (keys in order).
pub fn encode(data: &SessionData) -> Vec<u8> {
    const MAP: i64 = FIRST_USER_ID;
    const SLICE: i64 = FIRST_USER_ID + 1;
    let mut out = Writer(Vec::new());
    // type 65: wireType{MapT: {CommonType{Id: 65}, Key: interface, Elem: interface}}
    let mut def = Writer(Vec::new());
    def.int(-MAP);
    def.0.extend_from_slice(&[0x04, 0x01, 0x02]);
    def.int(MAP);
    def.0.extend_from_slice(&[0x00, 0x01]);
    def.int(INTERFACE);
    def.uint(1);
    def.int(INTERFACE);
    def.0.extend_from_slice(&[0x00, 0x00]);
    message(&mut out, &def);

    let mut value = Writer(Vec::new());
    value.int(MAP);
    value.uint(0);
    value.uint(data.len() as u64);
    let mut slice_defined = false;
    for (key, values) in data {
        value.string("string");
        value.int(STRING);
        let mut k = Writer(Vec::new());
        k.uint(0);
        k.string(key);
        value.uint(k.0.len() as u64);
        value.0.extend_from_slice(&k.0);

        value.string("[]string");
        if !slice_defined {
            // Go flushes the value so far with the definition, as one message.
            value.int(-SLICE);
            value.0.extend_from_slice(&[0x02, 0x01, 0x02]);
            value.int(SLICE);
            value.0.extend_from_slice(&[0x00, 0x01]);
            value.int(STRING);
            value.0.extend_from_slice(&[0x00, 0x00]);
            message(&mut out, &value);
            value = Writer(Vec::new());
            slice_defined = true;
        }
        value.int(SLICE);
        let mut v = Writer(Vec::new());
        v.uint(0);
        v.uint(values.len() as u64);
        for s in values {
            v.string(s);
        }
        value.uint(v.0.len() as u64);
        value.0.extend_from_slice(&v.0);
    }
    message(&mut out, &value);
    out.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What Go 1.19's encoder wrote for {"Roles": ["a","b"], "User-Id": ["42"]} (its
    /// map order happened to be User-Id first).
    const FROM_GO: &str = "0eff81040102ff82000110011000002bff82000206737472696e670c090007557365722d4964085b5d737472696e67ff83020102ff8400010c00002aff8405000102343206737472696e670c070005526f6c6573085b5d737472696e67ff8406000201610162";

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn session(pairs: &[(&str, &[&str])]) -> SessionData {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect()))
            .collect()
    }

    #[test]
    fn what_go_wrote_is_read() {
        let got = decode(&hex(FROM_GO)).unwrap();
        assert_eq!(
            got,
            session(&[("Roles", &["a", "b"]), ("User-Id", &["42"])])
        );
        // An empty session, as Go writes it.
        assert_eq!(
            decode(&hex("0eff81040102ff820001100110000004ff820000")).unwrap(),
            SessionData::new()
        );
    }

    #[test]
    fn what_pillion_writes_has_go_s_shape() {
        // Go wrote User-Id first (its map order is random), pillion writes in key
        // order: the same messages, each as long. Go reads them in tests/bailiff.rs.
        let expected = hex(FROM_GO);
        let written = encode(&session(&[("Roles", &["a", "b"]), ("User-Id", &["42"])]));
        assert_eq!(decode(&written).unwrap(), decode(&expected).unwrap());
        assert_eq!(written.len(), expected.len());
        assert_eq!(
            written[..15],
            expected[..15],
            "the map's type, byte for byte"
        );
        assert_eq!(
            encode(&SessionData::new()),
            hex("0eff81040102ff820001100110000004ff820000")
        );
    }

    #[test]
    fn hostile_input_is_an_error_not_a_panic() {
        let good = hex(FROM_GO);
        for cut in 0..good.len() {
            assert!(decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        let cases: &[&[u8]] = &[
            b"",
            &[0xf8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            &[0x80],
            // A map count of 2^62 with nothing after it.
            &hex("0eff81040102ff82000110011000000cff8200f84000000000000000"),
            // An int (type 2) where a map was defined.
            &hex("03040002"),
        ];
        for case in cases {
            assert!(decode(case).is_err(), "{case:?}");
        }
    }

    proptest! {
        #[test]
        fn written_sessions_read_back(
            data in proptest::collection::btree_map(
                "[A-Za-z-]{1,20}",
                proptest::collection::vec(".{0,40}", 0..4),
                0..8,
            )
        ) {
            prop_assert_eq!(decode(&encode(&data)).unwrap(), data);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn flipped_bytes_never_panic(at in 0usize..102, to in any::<u8>()) {
            let mut b = hex(FROM_GO);
            b[at] = to;
            let _ = decode(&b);
        }
    }
}
