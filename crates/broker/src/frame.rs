//! The wire format between embedded brokers: what one sidecar sends another on the
//! stream of [`crate::link`], and what comes back.
//!
//! The stream starts as an HTTP/1.1 upgrade (`GET /broker/deliver`,
//! `Upgrade: pillion-broker/1`) on the receiver's API listener. After the `101`, the
//! sender writes frames, each a big-endian `u32` length then that many bytes:
//!
//! ```text
//! message: 0x01 | seq u64 | flags u8 (1: plain, 2: groups listed)
//!          | topic: u16 len, bytes | groups: u16 count, (u8 len, bytes)*
//!          | headers: u16 count, (u16 len, name, u32 len, value)* | body (the rest)
//! ping:    0x02
//! ```
//!
//! `seq` numbers the messages of one stream from 1, without gaps; the receiver skips a
//! message whose `seq` it has already handled (a resend after a reconnect). It answers
//! with unframed replies:
//!
//! ```text
//! ack:   0x01 | seq u64            every message up to seq is handled
//! error: 0x02 | u16 len, UTF-8     why the receiver closes the stream
//! ```
//!
//! Parsing is a trust boundary: any byte string either decodes or is refused with a
//! [`FrameError`], and a length over [`MAX_FRAME`] is refused before its bytes arrive
//! (nothing is allocated from a length read off the wire).

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::hub::Scope;
use crate::Message;

/// The `Upgrade` token of the stream.
pub const PROTOCOL: &str = "pillion-broker/1";
/// The longest frame either side sends or takes.
pub const MAX_FRAME: usize = 64 << 20;

const MESSAGE: u8 = 1;
const PING: u8 = 2;
const ACK: u8 = 1;
const ERROR: u8 = 2;
const PLAIN: u8 = 1;
const GROUPS: u8 = 2;
/// Where `seq` sits in an encoded message frame (after the length and the kind).
const SEQ_AT: usize = 5;
/// The longest error text a reply carries.
const MAX_ERROR: usize = 1024;

/// Why bytes from the other sidecar were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("a frame of {0} bytes is over the limit of {MAX_FRAME} bytes")]
    TooLong(usize),
    #[error("an empty frame")]
    Empty,
    #[error("unknown frame kind {0:#04x}")]
    Kind(u8),
    #[error("the frame ends inside its {0}")]
    Short(&'static str),
    #[error("the frame's {0} is not UTF-8")]
    NotUtf8(&'static str),
    #[error("a ping frame with {0} bytes after its kind")]
    LongPing(usize),
    #[error("unknown flags {0:#04x}")]
    Flags(u8),
    #[error("message sequence number 0 (they start at 1)")]
    SeqZero,
    #[error("bad topic: {0}")]
    Topic(String),
    #[error("bad queue group: {0}")]
    Group(String),
    #[error("header names out of order or repeated")]
    HeaderOrder,
}

/// What a sender's frame says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A message for the receiver's subscribers in `scope`.
    Message {
        seq: u64,
        topic: String,
        scope: Scope,
        message: Message,
    },
    /// "Still here": answered with an ack.
    Ping,
}

/// What a receiver answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Ack(u64),
    Error(String),
}

/// A message frame without its sequence number, which the queue it joins assigns.
pub struct Unsequenced(BytesMut);

impl Unsequenced {
    /// The frame's size on the wire.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn with_seq(mut self, seq: u64) -> Bytes {
        self.0[SEQ_AT..SEQ_AT + 8].copy_from_slice(&seq.to_be_bytes());
        self.0.freeze()
    }
}

/// Why a message cannot travel to another sidecar.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error(
        "the message is {0} bytes with its headers; sidecars pass at most {MAX_FRAME} between them"
    )]
    TooLong(usize),
    #[error("the message has {0} headers; at most 65535 travel between sidecars")]
    TooManyHeaders(usize),
    #[error("a header name of {0} bytes; at most 65535 travel between sidecars")]
    LongHeaderName(usize),
}

/// Encodes a message frame (its `seq` is filled in by [`Unsequenced::with_seq`]).
/// `topic` and the groups of `scope` are valid (checked when they were published and
/// subscribed).
pub fn encode_message(
    topic: &str,
    scope: &Scope,
    message: &Message,
) -> Result<Unsequenced, EncodeError> {
    let groups: &[String] = scope.groups.as_deref().unwrap_or_default();
    if message.header.len() > u16::MAX as usize {
        return Err(EncodeError::TooManyHeaders(message.header.len()));
    }
    let mut len = 1 + 8 + 1 + 2 + topic.len() + 2 + 2 + message.body.len();
    len += groups.iter().map(|g| 1 + g.len()).sum::<usize>();
    for (name, value) in &message.header {
        if name.len() > u16::MAX as usize {
            return Err(EncodeError::LongHeaderName(name.len()));
        }
        len += 2 + name.len() + 4 + value.len();
    }
    if len > MAX_FRAME {
        return Err(EncodeError::TooLong(len));
    }
    let mut out = BytesMut::with_capacity(4 + len);
    out.put_u32(len as u32);
    out.put_u8(MESSAGE);
    out.put_u64(0);
    let mut flags = 0;
    if scope.plain {
        flags |= PLAIN;
    }
    if scope.groups.is_some() {
        flags |= GROUPS;
    }
    out.put_u8(flags);
    out.put_u16(topic.len() as u16);
    out.put_slice(topic.as_bytes());
    out.put_u16(groups.len() as u16);
    for g in groups {
        out.put_u8(g.len() as u8);
        out.put_slice(g.as_bytes());
    }
    out.put_u16(message.header.len() as u16);
    for (name, value) in &message.header {
        out.put_u16(name.len() as u16);
        out.put_slice(name.as_bytes());
        out.put_u32(value.len() as u32);
        out.put_slice(value.as_bytes());
    }
    out.put_slice(&message.body);
    debug_assert_eq!(out.len(), 4 + len);
    Ok(Unsequenced(out))
}

/// A ping frame.
pub fn ping() -> &'static [u8] {
    &[0, 0, 0, 1, PING]
}

/// Takes the next whole frame off the front of `buf`: `Ok(None)` until one is there.
pub fn decode(buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > MAX_FRAME {
        return Err(FrameError::TooLong(len));
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    buf.advance(4);
    let mut body = Fields(buf.split_to(len).freeze());
    match body.u8("kind")? {
        PING if body.0.is_empty() => Ok(Some(Frame::Ping)),
        PING => Err(FrameError::LongPing(body.0.len())),
        MESSAGE => decode_message(body).map(Some),
        other => Err(FrameError::Kind(other)),
    }
}

fn decode_message(mut body: Fields) -> Result<Frame, FrameError> {
    let seq = body.u64("sequence number")?;
    if seq == 0 {
        return Err(FrameError::SeqZero);
    }
    let flags = body.u8("flags")?;
    if flags & !(PLAIN | GROUPS) != 0 {
        return Err(FrameError::Flags(flags));
    }
    let n = body.u16("topic length")? as usize;
    let topic = body.string(n, "topic")?;
    crate::topic::check_publish(&topic).map_err(FrameError::Topic)?;
    let count = body.u16("group count")?;
    let mut groups = Vec::with_capacity(count.min(64) as usize);
    for _ in 0..count {
        let n = body.u8("group length")? as usize;
        let group = body.string(n, "group")?;
        crate::topic::check_queue(&group).map_err(FrameError::Group)?;
        groups.push(group);
    }
    if flags & GROUPS == 0 && !groups.is_empty() {
        return Err(FrameError::Group(
            "groups listed in a frame for every group".into(),
        ));
    }
    let count = body.u16("header count")?;
    let mut message = Message::default();
    for _ in 0..count {
        let n = body.u16("header name length")? as usize;
        let name = body.string(n, "header name")?;
        let n = body.u32("header value length")? as usize;
        let value = body.string(n, "header value")?;
        // In the encoder's order, so one message has one encoding.
        if message
            .header
            .last_key_value()
            .is_some_and(|(last, _)| *last >= name)
        {
            return Err(FrameError::HeaderOrder);
        }
        message.header.insert(name, value);
    }
    message.body = body.0;
    Ok(Frame::Message {
        seq,
        topic,
        scope: Scope {
            plain: flags & PLAIN != 0,
            groups: (flags & GROUPS != 0).then_some(groups),
        },
        message,
    })
}

/// The fields of one frame, read from the front with bounds checks.
struct Fields(Bytes);

impl Fields {
    fn need(&self, n: usize, what: &'static str) -> Result<(), FrameError> {
        if self.0.len() < n {
            return Err(FrameError::Short(what));
        }
        Ok(())
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, FrameError> {
        self.need(1, what)?;
        Ok(self.0.get_u8())
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, FrameError> {
        self.need(2, what)?;
        Ok(self.0.get_u16())
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, FrameError> {
        self.need(4, what)?;
        Ok(self.0.get_u32())
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, FrameError> {
        self.need(8, what)?;
        Ok(self.0.get_u64())
    }

    fn string(&mut self, n: usize, what: &'static str) -> Result<String, FrameError> {
        self.need(n, what)?;
        let bytes = self.0.split_to(n);
        String::from_utf8(bytes.to_vec()).map_err(|_| FrameError::NotUtf8(what))
    }
}

/// Appends an ack of every message up to `seq`.
pub fn encode_ack(seq: u64, out: &mut BytesMut) {
    out.put_u8(ACK);
    out.put_u64(seq);
}

/// An error reply (cut to 1 KiB, at a character boundary).
pub fn encode_error(text: &str) -> Bytes {
    let mut end = text.len().min(MAX_ERROR);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = BytesMut::with_capacity(3 + end);
    out.put_u8(ERROR);
    out.put_u16(end as u16);
    out.put_slice(&text.as_bytes()[..end]);
    out.freeze()
}

/// Takes the next whole reply off the front of `buf`: `Ok(None)` until one is there.
pub fn decode_reply(buf: &mut BytesMut) -> Result<Option<Reply>, FrameError> {
    let Some(&kind) = buf.first() else {
        return Ok(None);
    };
    match kind {
        ACK => {
            if buf.len() < 9 {
                return Ok(None);
            }
            buf.advance(1);
            Ok(Some(Reply::Ack(buf.get_u64())))
        }
        ERROR => {
            if buf.len() < 3 {
                return Ok(None);
            }
            let n = u16::from_be_bytes([buf[1], buf[2]]) as usize;
            if n > MAX_ERROR {
                return Err(FrameError::TooLong(n));
            }
            if buf.len() < 3 + n {
                return Ok(None);
            }
            buf.advance(3);
            let text = buf.split_to(n);
            let text = std::str::from_utf8(&text).map_err(|_| FrameError::NotUtf8("error text"))?;
            Ok(Some(Reply::Error(text.to_string())))
        }
        other => Err(FrameError::Kind(other)),
    }
}

/// The topic of an encoded message frame, to count it when it is dropped.
pub fn topic_of(frame: &Bytes) -> Option<String> {
    let mut buf = BytesMut::from(&frame[..]);
    match decode(&mut buf) {
        Ok(Some(Frame::Message { topic, .. })) => Some(topic),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn message_frame(seq: u64, topic: &str, scope: Scope, message: Message) -> Frame {
        Frame::Message {
            seq,
            topic: topic.into(),
            scope,
            message,
        }
    }

    fn encode(frame: &Frame) -> Bytes {
        match frame {
            Frame::Ping => Bytes::from_static(ping()),
            Frame::Message {
                seq,
                topic,
                scope,
                message,
            } => encode_message(topic, scope, message)
                .unwrap()
                .with_seq(*seq),
        }
    }

    /// Decodes `input` fed in pieces cut at `cuts`: the frames, then the error if any.
    fn decode_in_pieces(input: &[u8], cuts: &[usize]) -> (Vec<Frame>, Option<FrameError>) {
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
        points.push(input.len());
        points.sort_unstable();
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        let mut at = 0;
        for p in points {
            buf.extend_from_slice(&input[at..p]);
            at = p;
            loop {
                match decode(&mut buf) {
                    Ok(Some(f)) => frames.push(f),
                    Ok(None) => break,
                    Err(e) => return (frames, Some(e)),
                }
            }
        }
        (frames, None)
    }

    fn topic() -> impl Strategy<Value = String> {
        proptest::collection::vec("[a-z0-9&=#\"_-]{1,8}", 1..4).prop_map(|t| t.join("."))
    }

    fn scope() -> impl Strategy<Value = Scope> {
        (
            any::<bool>(),
            proptest::option::of(proptest::collection::vec("[a-zA-Z0-9_-]{1,64}", 0..4)),
        )
            .prop_map(|(plain, groups)| Scope { plain, groups })
    }

    fn message() -> impl Strategy<Value = Message> {
        (
            proptest::collection::btree_map(".{0,20}", ".{0,40}", 0..6),
            proptest::collection::vec(any::<u8>(), 0..300),
        )
            .prop_map(|(header, body)| Message {
                header,
                body: Bytes::from(body),
            })
    }

    fn frame() -> impl Strategy<Value = Frame> {
        prop_oneof![
            1 => Just(Frame::Ping),
            6 => (1..u64::MAX, topic(), scope(), message())
                .prop_map(|(seq, t, s, m)| message_frame(seq, &t, s, m)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        /// Whatever the reads' sizes, the frames read back exactly as sent.
        #[test]
        fn frames_read_back_whole_however_the_stream_is_cut(
            frames in proptest::collection::vec(frame(), 1..8),
            cuts in proptest::collection::vec(any::<usize>(), 0..12),
        ) {
            let input: Vec<u8> = frames.iter().flat_map(|f| encode(f).to_vec()).collect();
            let (got, err) = decode_in_pieces(&input, &cuts);
            prop_assert_eq!(err, None);
            prop_assert_eq!(got, frames);
        }

        /// Arbitrary bytes never panic: they decode, or wait for more, or are refused.
        #[test]
        fn arbitrary_bytes_are_decoded_or_refused(
            input in proptest::collection::vec(any::<u8>(), 0..600),
            cuts in proptest::collection::vec(any::<usize>(), 0..6),
        ) {
            let (frames, _) = decode_in_pieces(&input, &cuts);
            // Each frame took at least its length field and kind.
            prop_assert!(frames.len() * 5 <= input.len());
        }

        /// A valid stream with one byte changed never panics and never yields a frame
        /// the encoder could not have made (every decoded frame encodes back to bytes
        /// of the input).
        #[test]
        fn a_corrupted_stream_is_read_or_refused_never_misread(
            frames in proptest::collection::vec(frame(), 1..4),
            at in any::<usize>(),
            byte in any::<u8>(),
        ) {
            let mut input: Vec<u8> = frames.iter().flat_map(|f| encode(f).to_vec()).collect();
            let i = at % input.len();
            input[i] = byte;
            let (got, _) = decode_in_pieces(&input, &[]);
            let mut at = 0;
            for f in got {
                let bytes = encode(&f);
                prop_assert_eq!(&input[at..at + bytes.len()], &bytes[..]);
                at += bytes.len();
            }
        }

        #[test]
        fn replies_read_back_whole_and_arbitrary_replies_never_panic(
            acks in proptest::collection::vec(any::<u64>(), 0..6),
            text in ".{0,40}",
            junk in proptest::collection::vec(any::<u8>(), 0..64),
            cut in any::<usize>(),
        ) {
            let mut wire = BytesMut::new();
            for a in &acks {
                encode_ack(*a, &mut wire);
            }
            wire.extend_from_slice(&encode_error(&text));
            let cut = cut % (wire.len() + 1);
            let mut buf = BytesMut::from(&wire[..cut]);
            let mut got = Vec::new();
            while let Some(r) = decode_reply(&mut buf).unwrap() {
                got.push(r);
            }
            buf.extend_from_slice(&wire[cut..]);
            while let Some(r) = decode_reply(&mut buf).unwrap() {
                got.push(r);
            }
            let mut want: Vec<Reply> = acks.iter().map(|a| Reply::Ack(*a)).collect();
            want.push(Reply::Error(text.clone()));
            prop_assert_eq!(got, want);
            let mut junk = BytesMut::from(&junk[..]);
            while let Ok(Some(_)) = decode_reply(&mut junk) {}
        }
    }

    #[test]
    fn an_oversized_length_is_refused_before_its_bytes_arrive() {
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xf0, MESSAGE][..]);
        assert_eq!(decode(&mut buf), Err(FrameError::TooLong(0xffff_fff0)));
        let mut buf = BytesMut::from(&[0, 0, 0, 0][..]);
        assert_eq!(decode(&mut buf), Err(FrameError::Empty));
    }

    #[test]
    fn invalid_fields_are_named() {
        let scope = Scope {
            plain: true,
            groups: Some(vec![]),
        };
        let good = encode_message("orders.new", &scope, &Message::default()).unwrap();
        let mut bytes = BytesMut::from(&good.with_seq(0)[..]);
        assert_eq!(decode(&mut bytes), Err(FrameError::SeqZero));
        let bad = encode_message("orders.*", &scope, &Message::default())
            .unwrap()
            .with_seq(1);
        let err = decode(&mut BytesMut::from(&bad[..])).unwrap_err();
        assert!(err.to_string().contains("wildcards"), "{err}");
        let mut ping = BytesMut::from(&[0, 0, 0, 2, PING, 0][..]);
        assert_eq!(decode(&mut ping), Err(FrameError::LongPing(1)));
        let mut kind = BytesMut::from(&[0, 0, 0, 1, 9][..]);
        assert_eq!(decode(&mut kind), Err(FrameError::Kind(9)));
    }

    #[test]
    fn an_error_reply_is_cut_at_a_character_boundary() {
        let long = "é".repeat(1000);
        let mut buf = BytesMut::from(&encode_error(&long)[..]);
        let Some(Reply::Error(text)) = decode_reply(&mut buf).unwrap() else {
            panic!("an error reply");
        };
        assert_eq!(text.len(), 1024);
        assert!(long.starts_with(&text));
    }
}
