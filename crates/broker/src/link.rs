//! The sending side between embedded brokers: one [`Link`] per other sidecar, a
//! bounded queue of frames and the task that owns the stream to it.
//!
//! - A publish reserves room in the queue of every sidecar it goes to (waiting up to
//!   [`LinkSettings::publish_wait`], then refused: nothing is published), then appends
//!   one frame to each. Room is counted in bytes and given back when the receiver
//!   acknowledges the frame, so a sidecar that is slow or unreachable makes publishers
//!   wait, never the memory grow.
//! - The task writes every frame not yet written, as many as are waiting per write (no
//!   Nagle: the socket has `TCP_NODELAY`, and batching comes from taking the queue
//!   whole), and reads the receiver's cumulative acks. When the stream breaks it
//!   connects again and sends again from the first frame not acknowledged; the
//!   receiver skips what it had already handled, so a subscriber sees each message
//!   once, in the order it was published.
//! - A sidecar that answers that it is another node now (it restarted), or that has
//!   been out of the registry for [`LinkSettings::absent_grace`], has its queue
//!   dropped, with a log line and the `pillion_broker_peer_queues_dropped_total`
//!   counter ([`Links::sweep`]).
//!
//! Every wait on the network has a deadline: connecting and the upgrade answer
//! (`connect_timeout`), each write (`write_timeout`), and acknowledgements
//! (`ack_timeout`, with a ping after `ping_interval` of quiet so a dead stream is
//! noticed even when idle).
//!
//! Stopping is one [`CancellationToken`] per link (children of the [`Links`]' one),
//! and the tasks are tracked so the owner waits for them ([`Links::close`]). A task
//! that is told to stop while writing finishes that write (within `write_timeout`)
//! and closes its side of the stream cleanly: the receiver never sees half a frame.
//! Frames leave the queue only when acknowledged, so nothing a stopped task had in
//! hand is lost from the queue.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio::time::{timeout, timeout_at, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::frame::{self, FrameError, Reply, Unsequenced};
use crate::metrics::BrokerMetrics;

/// The clocks and bounds of the streams between sidecars (both sides), and how long
/// a subscription waits to be advertised to them.
#[derive(Debug, Clone)]
pub struct LinkSettings {
    /// Bytes of frames queued for one sidecar (sent or not, until acknowledged).
    pub queue_bytes: usize,
    /// How long a publish waits for room in a full queue before it is refused (503).
    pub publish_wait: Duration,
    /// Connecting, and the answer to the upgrade.
    pub connect_timeout: Duration,
    /// One write of frames (or of acks, on the receiving side).
    pub write_timeout: Duration,
    /// How long frames may wait for an acknowledgement before the stream is
    /// considered dead and opened again.
    pub ack_timeout: Duration,
    /// A quiet stream is pinged this often.
    pub ping_interval: Duration,
    /// The receiving side closes a stream on which nothing arrived for this long.
    pub idle_timeout: Duration,
    /// How long a sidecar may be missing from the registry before its queue is dropped.
    pub absent_grace: Duration,
    /// Bytes taken from the queue for one write.
    pub batch_bytes: usize,
    /// How long a subscribe waits for the registry to show this sidecar with the
    /// subscription (so other sidecars send it their messages) before it is refused.
    pub advertise_wait: Duration,
    /// The other sidecars' `--api-token` (the same in one cluster), sent with the
    /// upgrade.
    pub api_token: Option<String>,
}

impl Default for LinkSettings {
    fn default() -> Self {
        LinkSettings {
            queue_bytes: 16 << 20,
            publish_wait: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            write_timeout: Duration::from_secs(10),
            ack_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            absent_grace: Duration::from_secs(5),
            batch_bytes: 256 << 10,
            advertise_wait: Duration::from_secs(5),
            api_token: None,
        }
    }
}

/// What a queued frame costs beyond its bytes (its place in the queue).
const OVERHEAD: usize = 64;
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// The longest upgrade answer read.
const MAX_ANSWER: usize = 16 << 10;

/// Why a stream ended or could not be opened.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LinkError {
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("timed out {0}")]
    Timeout(&'static str),
    #[error("the sidecar did not take the stream: {0}")]
    Handshake(String),
    /// The address now has another node (the sidecar restarted): its queue is void.
    #[error("{0}")]
    Gone(String),
    #[error("the sidecar sent bytes that are not the protocol: {0}")]
    Protocol(FrameError),
    #[error("the sidecar acknowledged message {acked}, but only {sent} were sent")]
    AckAhead { acked: u64, sent: u64 },
    #[error("the sidecar closed the stream: {0}")]
    Refused(String),
    #[error("the sidecar closed the connection")]
    Closed,
    /// This sidecar stopped the stream (it is closing, or the link was dropped).
    #[error("stopped by this sidecar")]
    Stopped,
    #[error("{0}")]
    Io(std::io::Error),
}

/// Why a publish cannot go to a sidecar.
pub(crate) enum Refused {
    /// Its queue was dropped (it left): its subscribers went with it.
    Gone,
    /// No room within the deadline.
    Full,
}

struct Pending {
    seq: u64,
    frame: Bytes,
    _room: OwnedSemaphorePermit,
}

#[derive(Default)]
struct Queue {
    /// Frames not acknowledged, in `seq` order without gaps.
    frames: VecDeque<Pending>,
    bytes: usize,
    /// The `seq` of the last frame queued, written on the current stream, acknowledged.
    queued: u64,
    sent: u64,
    acked: u64,
    /// A ping is written and not answered.
    ping_pending: bool,
    /// Since when something written waits for an answer (reset on progress).
    waiting_since: Option<Instant>,
    /// Why the queue was dropped.
    gone: Option<String>,
}

/// The stream to one other sidecar's broker, and its queue.
pub(crate) struct Link {
    /// The other sidecar's node id in the registry.
    pub(crate) node: String,
    address: Mutex<String>,
    /// Names this queue to the receiver, for skipping what it already handled.
    stream: String,
    settings: LinkSettings,
    queue: Mutex<Queue>,
    room: Arc<Semaphore>,
    wake: Notify,
    /// Woken when the queue empties (all acknowledged) or is dropped.
    settled: Notify,
    stop: CancellationToken,
    metrics: Arc<BrokerMetrics>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Link {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn address(&self) -> String {
        self.address
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn cost(&self, len: usize) -> u32 {
        (len + OVERHEAD)
            .min(self.settings.queue_bytes)
            .min(u32::MAX as usize) as u32
    }

    /// Waits for room for a frame of `len` bytes, until `deadline`.
    pub(crate) async fn reserve(
        &self,
        len: usize,
        deadline: Instant,
    ) -> Result<OwnedSemaphorePermit, Refused> {
        let n = self.cost(len);
        match self.room.clone().try_acquire_many_owned(n) {
            Ok(permit) => return Ok(permit),
            Err(TryAcquireError::Closed) => return Err(Refused::Gone),
            Err(TryAcquireError::NoPermits) => {}
        }
        match timeout_at(deadline, self.room.clone().acquire_many_owned(n)).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => Err(Refused::Gone),
            Err(_) => Err(Refused::Full),
        }
    }

    /// Appends a frame for which room was reserved; false if the queue was dropped
    /// meanwhile.
    pub(crate) fn push(&self, frame: Unsequenced, room: OwnedSemaphorePermit) -> bool {
        {
            let mut q = self.lock();
            if q.gone.is_some() {
                return false;
            }
            q.queued += 1;
            let seq = q.queued;
            q.bytes += frame.len();
            q.frames.push_back(Pending {
                seq,
                frame: frame.with_seq(seq),
                _room: room,
            });
        }
        self.wake.notify_one();
        true
    }

    /// Why a publish found no room, for the publisher.
    pub(crate) fn full(&self) -> String {
        let (n, bytes) = {
            let q = self.lock();
            (q.frames.len(), q.bytes)
        };
        format!(
            "the sidecar at {} (node {}) has not taken messages for {}: {n} messages ({}) wait for it; nothing was published, try again later",
            self.address(),
            self.node,
            pillion_core::duration::format(self.settings.publish_wait),
            pillion_core::size::format(bytes as u64),
        )
    }

    pub(crate) fn is_gone(&self) -> bool {
        self.lock().gone.is_some()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.lock().frames.is_empty()
    }

    /// Drops the queue (the sidecar is gone): counted, logged, and every later
    /// publish skips this sidecar.
    pub(crate) fn drop_queue(&self, why: &str) {
        let frames = {
            let mut q = self.lock();
            if q.gone.is_some() {
                return;
            }
            q.gone = Some(why.to_string());
            q.bytes = 0;
            std::mem::take(&mut q.frames)
        };
        self.room.close();
        self.stop.cancel();
        self.settled.notify_waiters();
        for p in &frames {
            if let Some(topic) = frame::topic_of(&p.frame) {
                self.metrics.dropped(&topic, 1);
            }
        }
        self.metrics.peer_queue_dropped();
        if frames.is_empty() {
            tracing::info!(sidecar = %self.address(), node = %self.node, why, "closed the (empty) queue for another sidecar");
        } else {
            tracing::warn!(
                sidecar = %self.address(),
                node = %self.node,
                messages = frames.len(),
                why,
                "dropped the queue of messages for another sidecar; they are lost"
            );
        }
    }

    /// Waits until every frame queued is acknowledged or the queue is dropped; false
    /// if `deadline` passed first.
    async fn settle(&self, deadline: Instant) -> bool {
        loop {
            let settled = self.settled.notified();
            tokio::pin!(settled);
            // Registered before looking, so a wake between the look and the wait counts.
            settled.as_mut().enable();
            if self.is_empty() || self.is_gone() {
                return true;
            }
            if timeout_at(deadline, settled).await.is_err() {
                return false;
            }
        }
    }

    /// Stops the task (it finishes a write in hand) and waits for it.
    pub(crate) async fn stop(&self) {
        self.stop.cancel();
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    /// Opens the stream: connect, upgrade, and the bytes that came after the answer.
    async fn connect(&self) -> Result<(TcpStream, BytesMut), LinkError> {
        let address = self.address();
        let deadline = Instant::now() + self.settings.connect_timeout;
        let mut tcp = timeout_at(deadline, TcpStream::connect(&address))
            .await
            .map_err(|_| LinkError::Timeout("connecting"))?
            .map_err(LinkError::Connect)?;
        let _ = tcp.set_nodelay(true);
        let authorization = self
            .settings
            .api_token
            .as_ref()
            .map(|t| format!("Pillion-Api-Token: {t}\r\n"))
            .unwrap_or_default();
        let head = format!(
            "GET /broker/deliver HTTP/1.1\r\nHost: {address}\r\nConnection: Upgrade\r\nUpgrade: {}\r\nPillion-Broker-Node: {}\r\nPillion-Broker-Stream: {}\r\n{authorization}\r\n",
            frame::PROTOCOL,
            self.node,
            self.stream
        );
        timeout_at(deadline, tcp.write_all(head.as_bytes()))
            .await
            .map_err(|_| LinkError::Timeout("sending the upgrade"))?
            .map_err(LinkError::Io)?;
        let mut buf = BytesMut::with_capacity(4096);
        loop {
            if let Some(answer) = parse_answer(&buf)? {
                buf.advance(answer.head_len);
                if answer.status == 101 {
                    if !answer.upgrade {
                        return Err(LinkError::Handshake(format!(
                            "answered 101 without Upgrade: {}",
                            frame::PROTOCOL
                        )));
                    }
                    return Ok((tcp, buf));
                }
                let detail = read_detail(&mut tcp, &mut buf, answer.length, deadline).await;
                if answer.status == 410 {
                    return Err(LinkError::Gone(detail));
                }
                return Err(LinkError::Handshake(format!(
                    "answered {}: {detail}",
                    answer.status
                )));
            }
            if buf.len() > MAX_ANSWER {
                return Err(LinkError::Handshake("an answer head over 16 KiB".into()));
            }
            let n = timeout_at(deadline, tcp.read_buf(&mut buf))
                .await
                .map_err(|_| LinkError::Timeout("waiting for the upgrade answer"))?
                .map_err(LinkError::Io)?;
            if n == 0 {
                return Err(LinkError::Handshake("closed before answering".into()));
            }
        }
    }

    /// Carries frames on an open stream until it breaks or the link is stopped
    /// ([`LinkError::Stopped`]).
    async fn serve(&self, tcp: TcpStream, buf: BytesMut) -> LinkError {
        {
            // Everything not acknowledged is written again.
            let mut q = self.lock();
            q.sent = q.acked;
            q.ping_pending = false;
            q.waiting_since = None;
        }
        let (rd, wr) = tcp.into_split();
        tokio::select! {
            e = self.write_frames(wr) => e,
            e = self.read_acks(rd, buf) => e,
        }
    }

    /// Writes frames as they are queued. Told to stop, it finishes the write under
    /// way (never half a frame) and closes its side of the stream.
    async fn write_frames(&self, mut wr: OwnedWriteHalf) -> LinkError {
        let mut out = BytesMut::new();
        let mut batch: Vec<Bytes> = Vec::new();
        let mut quiet_since = Instant::now();
        loop {
            if self.stop.is_cancelled() {
                let _ = timeout(self.settings.write_timeout, wr.shutdown()).await;
                return LinkError::Stopped;
            }
            self.take_unsent(&mut batch);
            if batch.is_empty() {
                tokio::select! {
                    _ = self.wake.notified() => {
                        // Let the other publishers that are ready run first, so one
                        // write takes all their frames.
                        tokio::task::yield_now().await;
                        continue;
                    }
                    _ = self.stop.cancelled() => continue,
                    _ = tokio::time::sleep_until(quiet_since + self.settings.ping_interval) => {
                        out.extend_from_slice(frame::ping());
                        let mut q = self.lock();
                        q.ping_pending = true;
                        q.waiting_since.get_or_insert_with(Instant::now);
                    }
                }
            }
            for f in batch.drain(..) {
                out.extend_from_slice(&f);
            }
            match timeout(self.settings.write_timeout, wr.write_all(&out)).await {
                Err(_) => return LinkError::Timeout("writing frames"),
                Ok(Err(e)) => return LinkError::Io(e),
                Ok(Ok(())) => {}
            }
            out.clear();
            quiet_since = Instant::now();
        }
    }

    /// Moves the frames not yet written on this stream into `batch` (up to
    /// `batch_bytes`).
    fn take_unsent(&self, batch: &mut Vec<Bytes>) {
        let mut q = self.lock();
        let Some(first) = q.frames.front().map(|p| p.seq) else {
            return;
        };
        let skip = (q.sent + 1).saturating_sub(first) as usize;
        let mut bytes = 0;
        let mut last = None;
        for p in q.frames.iter().skip(skip) {
            batch.push(p.frame.clone());
            last = Some(p.seq);
            bytes += p.frame.len();
            if bytes >= self.settings.batch_bytes {
                break;
            }
        }
        if let Some(last) = last {
            q.sent = last;
            q.waiting_since.get_or_insert_with(Instant::now);
        }
    }

    async fn read_acks(&self, mut rd: OwnedReadHalf, mut buf: BytesMut) -> LinkError {
        loop {
            loop {
                match frame::decode_reply(&mut buf) {
                    Ok(Some(Reply::Ack(seq))) => {
                        if let Err(e) = self.acked(seq) {
                            return e;
                        }
                    }
                    Ok(Some(Reply::Error(text))) => return LinkError::Refused(text),
                    Ok(None) => break,
                    Err(e) => return LinkError::Protocol(e),
                }
            }
            let waiting = self.lock().waiting_since;
            let deadline = waiting.unwrap_or_else(Instant::now) + self.settings.ack_timeout;
            match timeout_at(deadline, rd.read_buf(&mut buf)).await {
                Err(_) => {
                    let waiting = self.lock().waiting_since;
                    if waiting.is_some_and(|t| t.elapsed() >= self.settings.ack_timeout) {
                        return LinkError::Timeout("waiting for an acknowledgement");
                    }
                }
                Ok(Ok(0)) => return LinkError::Closed,
                Ok(Err(e)) => return LinkError::Io(e),
                Ok(Ok(_)) => {}
            }
        }
    }

    /// The receiver handled every frame up to `seq`: their room is given back.
    fn acked(&self, seq: u64) -> Result<(), LinkError> {
        let mut q = self.lock();
        if seq > q.sent {
            return Err(LinkError::AckAhead {
                acked: seq,
                sent: q.sent,
            });
        }
        let progress = seq > q.acked || q.ping_pending;
        q.ping_pending = false;
        while q.frames.front().is_some_and(|p| p.seq <= seq) {
            if let Some(p) = q.frames.pop_front() {
                q.bytes -= p.frame.len();
            }
        }
        q.acked = q.acked.max(seq);
        if progress {
            q.waiting_since = (q.sent > q.acked).then(Instant::now);
        }
        let settled = q.frames.is_empty();
        drop(q);
        if settled {
            self.settled.notify_waiters();
        }
        Ok(())
    }
}

/// What an upgrade answer's head says.
struct Answer {
    status: u16,
    upgrade: bool,
    length: usize,
    head_len: usize,
}

fn parse_answer(buf: &[u8]) -> Result<Option<Answer>, LinkError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut res = httparse::Response::new(&mut headers);
    let head_len = match res.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(LinkError::Handshake(format!("an unreadable answer: {e}"))),
    };
    let header = |name: &str| {
        res.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_string())
    };
    Ok(Some(Answer {
        status: res.code.unwrap_or(0),
        upgrade: header("upgrade").is_some_and(|u| u.eq_ignore_ascii_case(frame::PROTOCOL)),
        length: header("content-length")
            .and_then(|l| l.parse().ok())
            .unwrap_or(0),
        head_len,
    }))
}

/// The `detail` of a refusal's JSON body (at most 4 KiB of it, within `deadline`).
async fn read_detail(
    tcp: &mut TcpStream,
    buf: &mut BytesMut,
    length: usize,
    deadline: Instant,
) -> String {
    let want = length.min(4096);
    while buf.len() < want {
        match timeout_at(deadline, tcp.read_buf(buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => break,
        }
    }
    let body = &buf[..buf.len().min(want)];
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["detail"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned())
}

/// Keeps a link's stream open, opening it again after each break, until the link's
/// token is cancelled: a connection being made is given up at once, a write under
/// way is finished first.
async fn run(link: Arc<Link>) {
    let stop = link.stop.clone();
    let mut backoff = MIN_BACKOFF;
    let mut failures = 0u32;
    loop {
        let opened = tokio::select! {
            r = link.connect() => r,
            _ = stop.cancelled() => return,
        };
        match opened {
            Ok((tcp, buf)) => {
                if failures > 0 {
                    tracing::info!(sidecar = %link.address(), node = %link.node, "broker stream to another sidecar open again");
                }
                failures = 0;
                backoff = MIN_BACKOFF;
                let broke = link.serve(tcp, buf).await;
                if stop.is_cancelled() {
                    return;
                }
                tracing::warn!(sidecar = %link.address(), node = %link.node, error = %broke, "broker stream to another sidecar broke; opening it again, unacknowledged messages are sent again");
            }
            Err(LinkError::Gone(detail)) => {
                link.drop_queue(&format!("the sidecar there is another node now: {detail}"));
                return;
            }
            Err(e) => {
                failures += 1;
                // Once, then now and then: a sidecar that is down is retried all along.
                if failures == 1 || failures.is_multiple_of(30) {
                    tracing::warn!(sidecar = %link.address(), node = %link.node, error = %e, failures, "cannot open the broker stream to another sidecar; retrying, its messages wait in the queue");
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.cancelled() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Another sidecar's broker, as the registry shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Peer {
    pub(crate) node: String,
    pub(crate) address: String,
    pub(crate) subs: Vec<(String, Option<String>)>,
}

struct Entry {
    link: Arc<Link>,
    /// Since when the sidecar is missing from the registry.
    absent_since: Option<Instant>,
}

/// Every link of this sidecar, by the other sidecar's node id.
pub(crate) struct Links {
    /// This sidecar's node id, the first part of each stream's name.
    origin: String,
    settings: LinkSettings,
    metrics: Arc<BrokerMetrics>,
    next: AtomicU64,
    by_node: Mutex<BTreeMap<String, Entry>>,
    /// Cancelled to stop every link; each link's own token is a child of it.
    stop: CancellationToken,
    /// The links' tasks, waited for by [`Links::close`].
    tasks: TaskTracker,
}

impl Links {
    /// No links yet; cancelling `stop` stops every link made later.
    pub(crate) fn new(
        origin: String,
        settings: LinkSettings,
        metrics: Arc<BrokerMetrics>,
        stop: CancellationToken,
    ) -> Links {
        Links {
            origin,
            settings,
            metrics,
            next: AtomicU64::new(1),
            by_node: Mutex::new(BTreeMap::new()),
            stop,
            tasks: TaskTracker::new(),
        }
    }

    /// How many link tasks run.
    pub(crate) fn running(&self) -> usize {
        self.tasks.len()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Entry>> {
        self.by_node.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The link to `peer`, started on first use. `None` for a node id that cannot be
    /// sent in a header (not one a pillion registered), and once the links are
    /// stopped (this sidecar is closing).
    pub(crate) fn get(&self, peer: &Peer) -> Option<Arc<Link>> {
        let mut links = self.lock();
        if let Some(entry) = links.get(&peer.node) {
            return Some(entry.link.clone());
        }
        if self.stop.is_cancelled() {
            return None;
        }
        if peer.node.is_empty() || !peer.node.bytes().all(|b| b.is_ascii_graphic()) {
            tracing::warn!(node = ?peer.node, "ignoring a pillion.broker node whose id is not printable ASCII");
            return None;
        }
        let link = Arc::new(Link {
            node: peer.node.clone(),
            address: Mutex::new(peer.address.clone()),
            stream: format!(
                "{}.{}",
                self.origin,
                self.next.fetch_add(1, Ordering::Relaxed)
            ),
            settings: self.settings.clone(),
            queue: Mutex::new(Queue::default()),
            room: Arc::new(Semaphore::new(self.settings.queue_bytes)),
            wake: Notify::new(),
            settled: Notify::new(),
            stop: self.stop.child_token(),
            metrics: self.metrics.clone(),
            task: Mutex::new(None),
        });
        let task = self.tasks.spawn(run(link.clone()));
        *link.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        links.insert(
            peer.node.clone(),
            Entry {
                link: link.clone(),
                absent_since: None,
            },
        );
        Some(link)
    }

    /// Follows the registry: a link whose sidecar is listed follows its address; one
    /// missing for `absent_grace` (or at once, if its queue was already dropped) is
    /// dropped and its task joined. Returns when the grace of a sidecar still missing
    /// lapses first: the registry may not change by then, and the sweep is due.
    pub(crate) async fn sweep(&self, present: &BTreeMap<String, String>) -> Option<Instant> {
        let mut removed = Vec::new();
        let mut due: Option<Instant> = None;
        {
            let now = Instant::now();
            let mut links = self.lock();
            links.retain(|node, entry| {
                if let Some(address) = present.get(node) {
                    entry.absent_since = None;
                    *entry.link.address.lock().unwrap_or_else(|e| e.into_inner()) = address.clone();
                    return true;
                }
                let since = *entry.absent_since.get_or_insert(now);
                if entry.link.is_gone() || now.duration_since(since) >= self.settings.absent_grace {
                    removed.push(entry.link.clone());
                    return false;
                }
                let lapses = since + self.settings.absent_grace;
                due = Some(due.map_or(lapses, |d| d.min(lapses)));
                true
            });
        }
        for link in removed {
            link.drop_queue(&format!(
                "it left the registry ({} ago at least)",
                pillion_core::duration::format(self.settings.absent_grace)
            ));
            link.stop().await;
        }
        due
    }

    /// Waits until every queue is acknowledged or `drain_by`, drops what is left
    /// (counted and logged), then stops every link and waits for their tasks, at most
    /// `stop_within`: a task writing frames finishes that write first.
    pub(crate) async fn close(&self, drain_by: Instant, stop_within: Duration) {
        let links: Vec<Arc<Link>> = self.lock().values().map(|e| e.link.clone()).collect();
        for link in &links {
            if !link.settle(drain_by).await {
                break;
            }
        }
        for link in &links {
            if !link.is_empty() {
                link.drop_queue("this sidecar is shutting down");
            }
        }
        self.stop.cancel();
        self.tasks.close();
        if timeout(stop_within, self.tasks.wait()).await.is_err() {
            tracing::warn!(
                streams = self.tasks.len(),
                "broker streams to other sidecars still finishing a write after {}; they end at their write deadline",
                pillion_core::duration::format(stop_within)
            );
        }
        self.lock().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::Scope;
    use crate::Message;
    use tokio::net::TcpListener;

    /// A sidecar that takes the upgrade and then reads nothing until told to.
    async fn deaf_receiver() -> (String, tokio::task::JoinHandle<TcpStream>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let accepted = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                head.push(tcp.read_u8().await.unwrap());
            }
            let answer = format!(
                "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: {}\r\n\r\n",
                frame::PROTOCOL
            );
            tcp.write_all(answer.as_bytes()).await.unwrap();
            tcp
        });
        (address, accepted)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_link_stopped_mid_write_finishes_the_frame_and_close_waits_for_it() {
        // A frame far larger than the sockets' buffers: its write cannot complete
        // while the receiver reads nothing.
        const BODY: usize = 32 << 20;
        let settings = LinkSettings {
            queue_bytes: 2 * BODY,
            ..LinkSettings::default()
        };
        let links = Links::new(
            "origin".into(),
            settings,
            Arc::new(BrokerMetrics::default()),
            CancellationToken::new(),
        );
        let (address, accepted) = deaf_receiver().await;
        let link = links
            .get(&Peer {
                node: "receiver".into(),
                address,
                subs: vec![],
            })
            .unwrap();
        let message = Message {
            body: Bytes::from(vec![b'x'; BODY]),
            ..Message::default()
        };
        let frame = frame::encode_message("orders.new", &Scope::all(), &message).unwrap();
        let room = link
            .reserve(frame.len(), Instant::now() + Duration::from_secs(30))
            .await
            .ok()
            .expect("room for the frame");
        assert!(link.push(frame, room));
        let mut receiver = accepted.await.unwrap();
        // The write has begun (the frame is taken as sent) and cannot have ended.
        let deadline = Instant::now() + Duration::from_secs(30);
        while link.lock().sent < 1 {
            assert!(Instant::now() < deadline, "the frame was never written");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }

        // Close with no time to drain: the queue is dropped and the link told to stop
        // while its write is under way.
        let links = Arc::new(links);
        let closing = tokio::spawn({
            let links = links.clone();
            async move { links.close(Instant::now(), Duration::from_secs(60)).await }
        });
        link.stop.cancelled().await;

        // The receiver reads on: the whole frame arrives, then the end of the stream,
        // with nothing cut.
        let mut got = BytesMut::new();
        while receiver.read_buf(&mut got).await.unwrap() > 0 {}
        match frame::decode(&mut got) {
            Ok(Some(frame::Frame::Message { seq, message, .. })) => {
                assert_eq!(seq, 1);
                assert_eq!(message.body.len(), BODY);
            }
            other => panic!(
                "not one whole frame ({} bytes left): {:?}",
                got.len(),
                other.map(|f| f.is_some())
            ),
        }
        assert!(got.is_empty(), "{} bytes after the frame", got.len());
        closing.await.unwrap();
        assert_eq!(links.running(), 0, "a link task still runs after close");
    }
}
