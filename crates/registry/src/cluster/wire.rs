//! Gossip on the wire: chitchat's messages in pillion's own UDP datagrams.
//!
//! Every datagram starts with a small header, so a message too large for one
//! datagram (chitchat fills a datagram to the UDP limit; a sealed one is 28 bytes
//! larger) is sent in fragments and put back together here:
//!
//! ```text
//! "PLG1" | message id u32 | fragment index u8 | fragment count u8 | flags u8 | bytes
//! ```
//!
//! With a cluster key the reassembled message is `nonce (12) || ChaCha20-Poly1305
//! (chitchat message)`, the key derived from the secret with SHA-256. A datagram that
//! is not ours, a message that does not open with our key, or one that is sealed when
//! we have no key, is dropped and counted; it never stops the gossip loop.
//!
//! Every digest a peer sends (it opens each gossip round) says which version of each
//! sidecar's state that peer holds; the version it holds of this sidecar is noted in
//! [`GossipStats::held`], so that a sidecar can tell when its state stops reaching the
//! others ([`super::ClusterRegistry`] reports the stall).
//!
//! On loopback, a [`Rendezvous`] address (the well-known gossip port) is held by
//! whichever sidecar bound it first; the others send it their first gossip, and try
//! to take it over every second, so when its holder dies another takes its place.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chitchat::transport::{Socket, Transport};
use chitchat::{ChitchatId, ChitchatMessage, Deserializable, Serializable, Version};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use tokio::net::UdpSocket;
use tokio::time::Instant;

const MAGIC: &[u8; 4] = b"PLG1";
const HEADER: usize = 4 + 4 + 1 + 1 + 1;
/// The largest UDP payload over IPv4.
const MAX_DATAGRAM: usize = 65_507;
/// Bytes of message per fragment: a sealed full-size chitchat message takes two.
const FRAGMENT: usize = 48 * 1024;
/// More fragments than a message can need are refused outright.
const MAX_FRAGMENTS: u8 = 4;
/// Messages being reassembled at once, and how long a missing fragment is awaited.
const MAX_PARTIAL: usize = 64;
const PARTIAL_DEADLINE: Duration = Duration::from_secs(2);
const SEALED: u8 = 1;
const AAD: &[u8] = b"pillion gossip v1";
/// How often a sidecar that does not hold the rendezvous tries to bind it.
const RENDEZVOUS_RETRY: Duration = Duration::from_secs(1);

/// Counters a sidecar shows in `/statusz` and `/metrics`.
#[derive(Debug, Default)]
pub struct GossipStats {
    pub sent_bytes: AtomicU64,
    pub received_bytes: AtomicU64,
    /// Datagrams or messages thrown away: not ours, wrong key, truncated, stale.
    pub dropped: AtomicU64,
    /// 1 while this sidecar holds the local rendezvous address.
    pub rendezvous_held: AtomicU64,
    /// By peer gossip address: what its last digest said it holds of this sidecar.
    pub held: Mutex<HashMap<SocketAddr, Held>>,
}

/// The version of this sidecar's state a peer holds, as its digests say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    pub version: Version,
    /// When the last digest arrived.
    pub at: Instant,
    /// Since when the peer has held this version (when it last took a newer one).
    pub since: Instant,
}

impl GossipStats {
    /// What `from` said it holds of this sidecar.
    pub fn held_by(&self, from: &SocketAddr) -> Option<Held> {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(from)
            .copied()
    }
}

/// The version of node `me`'s state that a digest says its sender holds: 0 when the
/// sender does not know `me` yet; `None` when the digest does not read as chitchat
/// 0.10 writes it (`count u16`, then per node its id, heartbeat, last GC version and
/// max version). Chitchat keeps the digest's fields to itself, so its own encoding is
/// read back.
fn held_of(digest: &impl Serializable, me: &str) -> Option<Version> {
    let mut bytes = Vec::with_capacity(digest.serialized_len());
    digest.serialize(&mut bytes);
    let mut buf = &bytes[..];
    let count = u16::deserialize(&mut buf).ok()?;
    for _ in 0..count {
        let id = ChitchatId::deserialize(&mut buf).ok()?;
        let _heartbeat = u64::deserialize(&mut buf).ok()?;
        let _last_gc_version = u64::deserialize(&mut buf).ok()?;
        let max_version = u64::deserialize(&mut buf).ok()?;
        if id.node_id == me {
            return Some(max_version);
        }
    }
    buf.is_empty().then_some(0)
}

/// The cluster key, ready to seal and open messages.
#[derive(Clone)]
pub struct Seal {
    key: Arc<LessSafeKey>,
}

impl Seal {
    pub fn new(secret: &str) -> Seal {
        let mut material = AAD.to_vec();
        material.extend_from_slice(secret.as_bytes());
        let digest = ring::digest::digest(&ring::digest::SHA256, &material);
        let key = UnboundKey::new(&CHACHA20_POLY1305, digest.as_ref())
            .expect("a SHA-256 digest is a valid ChaCha20 key");
        Seal {
            key: Arc::new(LessSafeKey::new(key)),
        }
    }

    fn seal(&self, plain: &[u8]) -> Vec<u8> {
        let nonce: [u8; NONCE_LEN] = pillion_core::id::random_bytes();
        let mut out = nonce.to_vec();
        let mut body = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(AAD),
                &mut body,
            )
            .expect("a gossip message is far below ChaCha20-Poly1305's limit");
        out.extend_from_slice(&body);
        out
    }

    fn open(&self, sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < NONCE_LEN {
            return None;
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut body = body.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(AAD), &mut body)
            .ok()?;
        Some(plain.to_vec())
    }
}

/// Splits a message into datagrams, each with the header.
pub fn frame(id: u32, sealed: bool, message: &[u8]) -> Vec<Vec<u8>> {
    let chunks: Vec<&[u8]> = if message.is_empty() {
        vec![&[][..]]
    } else {
        message.chunks(FRAGMENT).collect()
    };
    let count = chunks.len() as u8;
    chunks
        .into_iter()
        .enumerate()
        .map(|(index, chunk)| {
            let mut datagram = Vec::with_capacity(HEADER + chunk.len());
            datagram.extend_from_slice(MAGIC);
            datagram.extend_from_slice(&id.to_be_bytes());
            datagram.push(index as u8);
            datagram.push(count);
            datagram.push(if sealed { SEALED } else { 0 });
            datagram.extend_from_slice(chunk);
            datagram
        })
        .collect()
}

/// Puts fragments back together, within bounds: at most [`MAX_PARTIAL`] messages in
/// progress, each complete within [`PARTIAL_DEADLINE`] or forgotten.
#[derive(Default)]
pub struct Assembler {
    partial: HashMap<(SocketAddr, u32), Partial>,
}

struct Partial {
    started: Instant,
    sealed: bool,
    parts: Vec<Option<Vec<u8>>>,
}

/// A whole message: whether it was sealed, and its bytes.
pub type Whole = (bool, Vec<u8>);

/// A datagram that is not a well-formed pillion gossip fragment (or one too many).
#[derive(Debug, PartialEq, Eq)]
pub struct NotGossip;

impl Assembler {
    /// Takes one datagram; returns the message it completes, or `Err` when the
    /// datagram is not a well-formed pillion gossip fragment.
    pub fn accept(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
    ) -> Result<Option<Whole>, NotGossip> {
        if datagram.len() < HEADER || &datagram[..4] != MAGIC {
            return Err(NotGossip);
        }
        let id = u32::from_be_bytes(datagram[4..8].try_into().expect("4 bytes"));
        let (index, count, flags) = (datagram[8], datagram[9], datagram[10]);
        if count == 0 || count > MAX_FRAGMENTS || index >= count || flags & !SEALED != 0 {
            return Err(NotGossip);
        }
        let sealed = flags & SEALED != 0;
        let body = &datagram[HEADER..];
        if count == 1 {
            return Ok(Some((sealed, body.to_vec())));
        }
        let now = Instant::now();
        self.partial
            .retain(|_, p| now.duration_since(p.started) < PARTIAL_DEADLINE);
        if self.partial.len() >= MAX_PARTIAL && !self.partial.contains_key(&(from, id)) {
            return Err(NotGossip);
        }
        let partial = self.partial.entry((from, id)).or_insert_with(|| Partial {
            started: now,
            sealed,
            parts: vec![None; count as usize],
        });
        if partial.parts.len() != count as usize || partial.sealed != sealed {
            self.partial.remove(&(from, id));
            return Err(NotGossip);
        }
        partial.parts[index as usize] = Some(body.to_vec());
        if partial.parts.iter().any(Option::is_none) {
            return Ok(None);
        }
        let partial = self.partial.remove(&(from, id)).expect("present");
        let whole = partial.parts.into_iter().flatten().flatten().collect();
        Ok(Some((partial.sealed, whole)))
    }
}

/// The well-known loopback address sidecars meet at when no seeds are given.
#[derive(Debug, Clone, Copy)]
pub struct Rendezvous(pub SocketAddr);

/// Opens [`GossipSocket`]s: chitchat asks for one with its listen address.
pub struct GossipTransport {
    /// This sidecar's node id, looked for in the peers' digests.
    pub me: String,
    pub seal: Option<Seal>,
    pub rendezvous: Option<Rendezvous>,
    pub stats: Arc<GossipStats>,
    /// A socket bound before chitchat started (so a busy port is reported at start).
    pub bound: std::sync::Mutex<Option<UdpSocket>>,
}

#[async_trait::async_trait]
impl Transport for GossipTransport {
    async fn open(&self, listen: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let bound = self.bound.lock().unwrap_or_else(|e| e.into_inner()).take();
        let main = match bound {
            Some(socket) => socket,
            None => UdpSocket::bind(listen).await?,
        };
        let rendezvous = self.rendezvous.map(|r| RendezvousSocket {
            addr: r.0,
            socket: None,
            next_try: Instant::now(),
        });
        Ok(Box::new(GossipSocket {
            me: self.me.clone(),
            main,
            rendezvous,
            seal: self.seal.clone(),
            stats: self.stats.clone(),
            assembler: Assembler::default(),
            next_id: rand_u32(),
            buf: vec![0; MAX_DATAGRAM].into_boxed_slice(),
            rendezvous_buf: vec![0; MAX_DATAGRAM].into_boxed_slice(),
            warned: std::collections::HashSet::new(),
        }))
    }
}

struct RendezvousSocket {
    addr: SocketAddr,
    socket: Option<UdpSocket>,
    next_try: Instant,
}

impl RendezvousSocket {
    /// Binds the rendezvous address if it is free now (its holder is gone).
    fn try_take(&mut self, stats: &GossipStats) {
        if self.socket.is_some() || Instant::now() < self.next_try {
            return;
        }
        self.next_try = Instant::now() + RENDEZVOUS_RETRY;
        // No SO_REUSEADDR: exactly one sidecar holds the port.
        if let Ok(socket) = std::net::UdpSocket::bind(self.addr)
            .and_then(|s| s.set_nonblocking(true).map(|()| s))
            .and_then(UdpSocket::from_std)
        {
            tracing::info!(rendezvous = %self.addr, "this sidecar now holds the local gossip rendezvous");
            stats.rendezvous_held.store(1, Ordering::Relaxed);
            self.socket = Some(socket);
        }
    }
}

pub struct GossipSocket {
    me: String,
    main: UdpSocket,
    rendezvous: Option<RendezvousSocket>,
    seal: Option<Seal>,
    stats: Arc<GossipStats>,
    assembler: Assembler,
    next_id: u32,
    buf: Box<[u8]>,
    rendezvous_buf: Box<[u8]>,
    /// Peers already warned about (a wrong key is logged once per address).
    warned: std::collections::HashSet<SocketAddr>,
}

fn rand_u32() -> u32 {
    u32::from_be_bytes(pillion_core::id::random_bytes())
}

impl GossipSocket {
    fn held_rendezvous(&self) -> Option<SocketAddr> {
        self.rendezvous
            .as_ref()
            .filter(|r| r.socket.is_some())
            .map(|r| r.addr)
    }

    /// One datagram in: a message when it completes one that opens and parses.
    fn take(&mut self, from: SocketAddr, len: usize, rendezvous: bool) -> Option<ChitchatMessage> {
        self.stats
            .received_bytes
            .fetch_add(len as u64, Ordering::Relaxed);
        let datagram = if rendezvous {
            &self.rendezvous_buf[..len]
        } else {
            &self.buf[..len]
        };
        let whole = match self.assembler.accept(from, datagram) {
            Ok(Some(whole)) => whole,
            Ok(None) => return None,
            Err(NotGossip) => return self.drop_from(from, "a datagram that is not pillion gossip"),
        };
        let plain = match (&self.seal, whole) {
            (Some(seal), (true, sealed)) => match seal.open(&sealed) {
                Some(plain) => plain,
                None => return self.drop_from(from, "gossip sealed with another --cluster-key"),
            },
            (None, (false, plain)) => plain,
            (Some(_), (false, _)) => {
                return self.drop_from(from, "unsealed gossip (this sidecar has a --cluster-key)")
            }
            (None, (true, _)) => {
                return self.drop_from(from, "sealed gossip (this sidecar has no --cluster-key)")
            }
        };
        match ChitchatMessage::deserialize(&mut &plain[..]) {
            Ok(message) => {
                self.note_held(from, &message);
                Some(message)
            }
            Err(_) => self.drop_from(from, "a gossip message that does not parse"),
        }
    }

    /// Notes the version of this sidecar's state that a digest from `from` says it holds.
    fn note_held(&self, from: SocketAddr, message: &ChitchatMessage) {
        let (ChitchatMessage::Syn { digest, .. } | ChitchatMessage::SynAck { digest, .. }) =
            message
        else {
            return;
        };
        if let Some(version) = held_of(digest, &self.me) {
            let now = Instant::now();
            let mut held = self.stats.held.lock().unwrap_or_else(|e| e.into_inner());
            let since = match held.get(&from) {
                Some(h) if h.version == version => h.since,
                _ => now,
            };
            held.insert(
                from,
                Held {
                    version,
                    at: now,
                    since,
                },
            );
        }
    }

    fn drop_from(&mut self, from: SocketAddr, what: &str) -> Option<ChitchatMessage> {
        self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        if self.warned.len() < 1024 && self.warned.insert(from) {
            tracing::warn!(peer = %from, "ignored {what}");
        } else {
            tracing::debug!(peer = %from, "ignored {what}");
        }
        None
    }
}

#[async_trait::async_trait]
impl Socket for GossipSocket {
    async fn send(&mut self, to: SocketAddr, message: ChitchatMessage) -> anyhow::Result<()> {
        if Some(to) == self.held_rendezvous() {
            return Ok(()); // that is this sidecar
        }
        let mut plain = Vec::with_capacity(message.serialized_len());
        message.serialize(&mut plain);
        let (sealed, bytes) = match &self.seal {
            Some(seal) => (true, seal.seal(&plain)),
            None => (false, plain),
        };
        self.next_id = self.next_id.wrapping_add(1);
        for datagram in frame(self.next_id, sealed, &bytes) {
            // A peer that is gone is the failure detector's business, not an error.
            match self.main.send_to(&datagram, to).await {
                Ok(n) => {
                    self.stats.sent_bytes.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) => tracing::debug!(peer = %to, error = %e, "gossip not sent"),
            }
        }
        Ok(())
    }

    async fn recv(&mut self) -> anyhow::Result<(SocketAddr, ChitchatMessage)> {
        loop {
            if let Some(r) = self.rendezvous.as_mut() {
                r.try_take(&self.stats);
            }
            let retry = tokio::time::sleep(RENDEZVOUS_RETRY);
            let (received, rendezvous) = {
                let rendezvous = self.rendezvous.as_ref().and_then(|r| r.socket.as_ref());
                tokio::select! {
                    r = self.main.recv_from(&mut self.buf) => (Some(r), false),
                    r = async { rendezvous.expect("guarded").recv_from(&mut self.rendezvous_buf).await },
                        if rendezvous.is_some() => (Some(r), true),
                    // Only to retry taking the rendezvous over.
                    _ = retry, if self.rendezvous.as_ref().is_some_and(|r| r.socket.is_none()) => (None, false),
                }
            };
            match received {
                None => {}
                Some(Ok((len, from))) => {
                    if let Some(message) = self.take(from, len, rendezvous) {
                        return Ok((from, message));
                    }
                }
                // Errors on an unconnected UDP socket are transient (an ICMP report
                // of a peer that left, buffers full): gossip goes on.
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "gossip receive error");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addr() -> SocketAddr {
        "127.0.0.1:9".parse().unwrap()
    }

    fn reassemble(datagrams: &[Vec<u8>]) -> Option<Whole> {
        let mut assembler = Assembler::default();
        let mut out = None;
        for d in datagrams {
            if let Some(w) = assembler.accept(addr(), d).expect("well formed") {
                out = Some(w);
            }
        }
        out
    }

    #[test]
    fn a_full_size_sealed_message_crosses_in_fragments() {
        let seal = Seal::new("s3cret");
        let message: Vec<u8> = (0..MAX_DATAGRAM).map(|i| i as u8).collect();
        let datagrams = frame(7, true, &seal.seal(&message));
        assert_eq!(datagrams.len(), 2);
        assert!(datagrams.iter().all(|d| d.len() <= MAX_DATAGRAM));
        let (sealed, bytes) = reassemble(&datagrams).unwrap();
        assert!(sealed);
        assert_eq!(seal.open(&bytes).unwrap(), message);
        assert!(
            Seal::new("other").open(&bytes).is_none(),
            "another key must not open it"
        );
    }

    #[test]
    fn a_tampered_message_does_not_open() {
        let seal = Seal::new("k");
        let mut sealed = seal.seal(b"hello");
        let last = sealed.len() - 1;
        sealed[last] ^= 1;
        assert!(seal.open(&sealed).is_none());
        assert!(seal.open(b"short").is_none());
    }

    #[test]
    fn malformed_headers_are_refused() {
        let mut a = Assembler::default();
        assert!(a.accept(addr(), b"PLG1").is_err());
        assert!(a.accept(addr(), b"XXXX\0\0\0\0\0\x01\0body").is_err());
        // index beyond count, zero count, too many fragments, unknown flags
        assert!(a.accept(addr(), b"PLG1\0\0\0\x01\x02\x02\0x").is_err());
        assert!(a.accept(addr(), b"PLG1\0\0\0\x01\0\0\0x").is_err());
        assert!(a.accept(addr(), b"PLG1\0\0\0\x01\0\x09\0x").is_err());
        assert!(a.accept(addr(), b"PLG1\0\0\0\x01\0\x01\x80x").is_err());
    }

    #[test]
    fn partial_messages_are_bounded() {
        let mut a = Assembler::default();
        for id in 0..MAX_PARTIAL as u32 {
            let first = &frame(id, false, &vec![0; FRAGMENT + 1])[0];
            assert_eq!(a.accept(addr(), first), Ok(None));
        }
        let first = &frame(9999, false, &vec![0; FRAGMENT + 1])[0];
        assert!(
            a.accept(addr(), first).is_err(),
            "a 65th message in progress is refused"
        );
        assert_eq!(a.partial.len(), MAX_PARTIAL);
    }

    proptest! {
        #[test]
        fn any_message_survives_framing_in_any_order(
            message in proptest::collection::vec(any::<u8>(), 0..150_000),
            reverse in any::<bool>(),
        ) {
            let mut datagrams = frame(1, false, &message);
            if reverse {
                datagrams.reverse();
            }
            let (sealed, bytes) = reassemble(&datagrams).unwrap();
            prop_assert!(!sealed);
            prop_assert_eq!(bytes, message);
        }

        #[test]
        fn arbitrary_datagrams_never_panic(datagrams in proptest::collection::vec(
            proptest::collection::vec(any::<u8>(), 0..64), 0..32)
        ) {
            let mut a = Assembler::default();
            for d in &datagrams {
                let mut d = d.clone();
                if d.len() > 4 { d[..4].copy_from_slice(MAGIC); }
                let _ = a.accept(addr(), &d);
            }
            prop_assert!(a.partial.len() <= MAX_PARTIAL);
        }
    }
}
