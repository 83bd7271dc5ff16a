//! LAN discovery by multicast DNS (`--cluster-mdns`): each sidecar announces its
//! gossip address as a `_pillion._udp.local.` service and browses for the others';
//! each address found is gossiped to, after which chitchat does the rest.
//!
//! mDNS only hands out seeds: what is then said on the gossip port is sealed with the
//! cluster key, so a stranger on the LAN cannot join by announcing itself. An
//! announced address is used only when it is the announcer's own source address, so
//! a forged packet cannot point sidecars at a third host.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::str::FromStr;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, Query};
use hickory_proto::rr::rdata::{PTR, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::net::UdpSocket;
use tokio::time::Instant;

pub(crate) const GROUP: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 251);
pub(crate) const PORT: u16 = 5353;
const SERVICE: &str = "_pillion._udp.local.";
const TTL_SECS: u32 = 120;
/// Queries and announcements: quickly at start, then at a calm pace.
const FIRST_ROUNDS: u32 = 5;
const EARLY_EVERY: Duration = Duration::from_secs(1);
const CALM_EVERY: Duration = Duration::from_secs(10);
/// Answers to others' queries are sent at most this often.
const ANSWER_GAP: Duration = Duration::from_millis(200);

/// This sidecar's announcement: who it is and where it gossips.
pub struct Announcement {
    pub node_id: String,
    pub gossip: SocketAddr,
}

/// Joins the mDNS group on the interface that has `ip` (0.0.0.0: the default one).
pub fn socket(ip: Ipv4Addr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    // Other mDNS responders (and other sidecars) share the port.
    socket.set_reuse_address(true)?;
    socket.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, PORT)).into())?;
    socket.join_multicast_v4(&GROUP, &ip)?;
    socket.set_multicast_if_v4(&ip)?;
    socket.set_multicast_loop_v4(true)?;
    socket.set_multicast_ttl_v4(255)?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket.into())
}

fn service() -> Name {
    Name::from_str(SERVICE).expect("a valid name")
}

/// A query for every sidecar on the LAN.
pub fn query() -> Vec<u8> {
    let mut message = Message::new();
    message.add_query(Query::query(service(), RecordType::PTR));
    message.to_vec().expect("a query encodes")
}

/// The answer that names this sidecar and its gossip address.
pub fn announcement(me: &Announcement) -> Vec<u8> {
    let instance = Name::from_str(&format!("{}.{SERVICE}", me.node_id))
        .unwrap_or_else(|_| Name::from_str(&format!("sidecar.{SERVICE}")).expect("valid"));
    let mut message = Message::new();
    message
        .set_message_type(MessageType::Response)
        .set_authoritative(true);
    message.add_answer(Record::from_rdata(
        service(),
        TTL_SECS,
        RData::PTR(PTR(instance.clone())),
    ));
    message.add_answer(Record::from_rdata(
        instance,
        TTL_SECS,
        RData::TXT(TXT::new(vec![format!("gossip={}", me.gossip)])),
    ));
    message.to_vec().expect("an announcement encodes")
}

/// What a datagram says: whether it asks for sidecars, and the gossip addresses it
/// announces that are its sender's own.
pub fn read(datagram: &[u8], from: IpAddr) -> (bool, Vec<SocketAddr>) {
    let Ok(message) = Message::from_vec(datagram) else {
        return (false, Vec::new());
    };
    let service = service();
    let asks = message.message_type() == MessageType::Query
        && message.queries().iter().any(|q| *q.name() == service);
    let mut found = Vec::new();
    for record in message.answers().iter().chain(message.additionals()) {
        if !service.zone_of(record.name()) {
            continue;
        }
        if let RData::TXT(txt) = record.data() {
            for entry in txt.txt_data() {
                let Some(addr) = std::str::from_utf8(entry)
                    .ok()
                    .and_then(|e| e.strip_prefix("gossip="))
                    .and_then(|a| a.parse::<SocketAddr>().ok())
                else {
                    continue;
                };
                if addr.ip() == from && addr.port() != 0 {
                    found.push(addr);
                }
            }
        }
    }
    (asks, found)
}

/// Announces and browses until the task is dropped; `found` is called with each
/// other sidecar's gossip address each time it is heard.
pub async fn run(socket: UdpSocket, me: Announcement, mut found: impl FnMut(SocketAddr)) {
    let group = SocketAddr::V4(SocketAddrV4::new(GROUP, PORT));
    let announce = announcement(&me);
    let ask = query();
    let mut buf = vec![0u8; 9000];
    let mut round = 0u32;
    let mut next_round = Instant::now();
    let mut last_answer = Instant::now() - ANSWER_GAP;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next_round) => {
                round += 1;
                next_round = Instant::now()
                    + if round < FIRST_ROUNDS { EARLY_EVERY } else { CALM_EVERY };
                for datagram in [&ask, &announce] {
                    if let Err(e) = socket.send_to(datagram, group).await {
                        tracing::debug!(error = %e, "mDNS send failed");
                    }
                }
            }
            received = socket.recv_from(&mut buf) => {
                let Ok((len, from)) = received else { continue };
                let (asks, addrs) = read(&buf[..len], from.ip());
                for addr in addrs.into_iter().filter(|a| *a != me.gossip) {
                    found(addr);
                }
                if asks && last_answer.elapsed() >= ANSWER_GAP {
                    last_answer = Instant::now();
                    let _ = socket.send_to(&announce, group).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn an_announcement_reads_back_only_from_its_own_address() {
        let me = Announcement {
            node_id: "sidecar-1234".into(),
            gossip: "10.9.0.2:7950".parse().unwrap(),
        };
        let datagram = announcement(&me);
        assert_eq!(read(&datagram, me.gossip.ip()), (false, vec![me.gossip]));
        // The same packet from another host points at a third party: ignored.
        assert_eq!(
            read(&datagram, "10.9.0.3".parse().unwrap()),
            (false, vec![])
        );
        assert_eq!(read(&query(), me.gossip.ip()), (true, vec![]));
    }

    proptest! {
        #[test]
        fn arbitrary_datagrams_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = read(&bytes, "10.0.0.1".parse().unwrap());
        }
    }
}
