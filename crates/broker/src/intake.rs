//! The receiving side between embedded brokers: streams other sidecars open on
//! `GET /broker/deliver` (an HTTP/1.1 upgrade to [`crate::frame::PROTOCOL`]).
//!
//! Each stream names the sender's queue (`Pillion-Broker-Stream`); for each queue the
//! intake remembers the last sequence number it handed to the local subscribers, and
//! skips a frame at or below it (sent again after a reconnect, or still in flight on a
//! connection the sender gave up). The check and the delivery happen under that
//! queue's lock, so two connections of one queue can never reorder it. Acks are
//! cumulative and gathered: one per 512 messages or 2 ms, and one at once for a ping.
//!
//! A stream addressed to another node id (this sidecar restarted since the sender
//! looked) is refused with 410: the sender drops that queue. Bytes that are not the
//! protocol close the stream with an error reply naming the fault; the sidecar and its
//! other streams carry on.
//!
//! Each stream is a task tracked by the intake and stopped by its token: told to
//! stop, a stream first acknowledges what it delivered (so the sender does not send
//! it again elsewhere), then ends; [`Intake::close`] waits for that.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{timeout, timeout_at, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::frame::{self, Frame};
use crate::hub::Hub;
use crate::link::LinkSettings;
use crate::metrics::BrokerMetrics;

/// Sender queues remembered; past this, the least recently used idle one is forgotten
/// (a sender that comes back with it may have one message delivered twice).
const MAX_STREAMS: usize = 4096;
const MAX_STREAM_NAME: usize = 256;
/// How long an ack may wait to cover more messages, and how many it covers at most.
const ACK_DELAY: Duration = Duration::from_millis(2);
const ACK_EVERY: usize = 512;
pub(crate) const NODE_HEADER: &str = "pillion-broker-node";
pub(crate) const STREAM_HEADER: &str = "pillion-broker-stream";

/// A sender queue's last handled sequence number.
type Last = Arc<Mutex<u64>>;

#[derive(Default)]
struct Streams {
    by_name: HashMap<String, (Last, u64)>,
    tick: u64,
}

pub(crate) struct Intake {
    node: String,
    hub: Arc<Hub>,
    metrics: Arc<BrokerMetrics>,
    settings: LinkSettings,
    streams: Mutex<Streams>,
    /// One task per stream.
    tasks: TaskTracker,
    /// Cancelled to end every stream.
    stop: CancellationToken,
}

impl Intake {
    /// Takes streams addressed to node `node` until `stop` is cancelled.
    pub(crate) fn new(
        node: String,
        hub: Arc<Hub>,
        metrics: Arc<BrokerMetrics>,
        settings: LinkSettings,
        stop: CancellationToken,
    ) -> Intake {
        Intake {
            node,
            hub,
            metrics,
            settings,
            streams: Mutex::default(),
            tasks: TaskTracker::new(),
            stop,
        }
    }

    /// How many streams' tasks run.
    pub(crate) fn running(&self) -> usize {
        self.tasks.len()
    }

    /// Takes the upgrade of a stream from another sidecar, or says why not (the
    /// status and detail of the error answer). On `Ok`, answer 101.
    pub(crate) fn open<B>(
        self: &Arc<Self>,
        req: &mut http::Request<B>,
    ) -> Result<(), (StatusCode, String)> {
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
        };
        if self.stop.is_cancelled() {
            return Err((
                StatusCode::SERVICE_UNAVAILABLE,
                "this sidecar's broker is shutting down".into(),
            ));
        }
        let upgrade = header("upgrade").unwrap_or_default();
        if !upgrade.eq_ignore_ascii_case(frame::PROTOCOL) {
            return Err((
                StatusCode::UPGRADE_REQUIRED,
                format!(
                    "this is where other sidecars' embedded brokers open their stream: send Connection: Upgrade and Upgrade: {}",
                    frame::PROTOCOL
                ),
            ));
        }
        let node = header(NODE_HEADER).unwrap_or_default();
        if node != self.node {
            return Err((
                StatusCode::GONE,
                format!(
                    "this sidecar's broker is node {}, not {node:?} (it restarted, or the registry is stale); messages queued for {node:?} are void",
                    self.node
                ),
            ));
        }
        let stream = header(STREAM_HEADER).unwrap_or_default().to_string();
        if stream.is_empty() || stream.len() > MAX_STREAM_NAME {
            return Err((
                StatusCode::BAD_REQUEST,
                format!("{STREAM_HEADER} must name the sender's queue (1 to {MAX_STREAM_NAME} characters)"),
            ));
        }
        let Some(upgrading) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
            return Err((
                StatusCode::UPGRADE_REQUIRED,
                "the stream needs an HTTP/1.1 connection that can be upgraded".into(),
            ));
        };
        let last = self.last(&stream);
        let intake = self.clone();
        self.tasks.spawn(async move {
            let upgrading = timeout(intake.settings.connect_timeout, upgrading);
            let upgraded = match tokio::select! {
                u = upgrading => u,
                _ = intake.stop.cancelled() => return,
            } {
                Ok(Ok(u)) => u,
                Ok(Err(e)) => {
                    tracing::debug!(stream, error = %e, "a broker stream's upgrade failed");
                    return;
                }
                Err(_) => return,
            };
            intake
                .serve(hyper_util::rt::TokioIo::new(upgraded), last, &stream)
                .await;
        });
        Ok(())
    }

    /// The state of sender queue `name`, remembered from earlier connections.
    fn last(&self, name: &str) -> Last {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        streams.tick += 1;
        let tick = streams.tick;
        if let Some((last, used)) = streams.by_name.get_mut(name) {
            *used = tick;
            return last.clone();
        }
        if streams.by_name.len() >= MAX_STREAMS {
            // Forget the least recently opened queue that no connection holds.
            let idle = streams
                .by_name
                .iter()
                .filter(|(_, (last, _))| Arc::strong_count(last) == 1)
                .min_by_key(|(_, (_, used))| *used)
                .map(|(name, _)| name.clone());
            if let Some(idle) = idle {
                streams.by_name.remove(&idle);
            }
        }
        let last = Last::default();
        streams
            .by_name
            .insert(name.to_string(), (last.clone(), tick));
        last
    }

    async fn serve<T>(&self, io: T, last: Last, stream: &str)
    where
        T: tokio::io::AsyncRead + AsyncWrite + Unpin,
    {
        let (mut rd, mut wr) = tokio::io::split(io);
        let mut buf = BytesMut::with_capacity(64 << 10);
        let mut out = BytesMut::new();
        // The last sequence number read on this connection, and how many messages
        // since the last ack; the ack is due by `ack_at`.
        let mut seen = 0u64;
        let mut unacked = 0usize;
        let mut ack_at: Option<Instant> = None;
        let mut idle_at = Instant::now() + self.settings.idle_timeout;
        loop {
            if buf.capacity() - buf.len() < 16 << 10 {
                buf.reserve(64 << 10);
            }
            let mut ack_now = false;
            let read = tokio::select! {
                read = timeout_at(idle_at, rd.read_buf(&mut buf)) => Some(read),
                _ = tokio::time::sleep_until(ack_at.unwrap_or(idle_at)), if ack_at.is_some() => None,
                _ = self.stop.cancelled() => {
                    // What was delivered is acknowledged before the stream ends.
                    if unacked > 0 {
                        frame::encode_ack(seen, &mut out);
                        let _ = timeout(self.settings.write_timeout, wr.write_all(&out)).await;
                    }
                    return;
                }
            };
            match read {
                None => ack_now = true,
                Some(Err(_)) => {
                    let why = format!(
                        "nothing arrived for {}",
                        pillion_core::duration::format(self.settings.idle_timeout)
                    );
                    self.refuse(&mut wr, stream, &why).await;
                    return;
                }
                Some(Ok(Ok(0)) | Ok(Err(_))) => return,
                Some(Ok(Ok(_))) => idle_at = Instant::now() + self.settings.idle_timeout,
            }
            let fault = {
                let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    match frame::decode(&mut buf) {
                        Ok(Some(Frame::Message {
                            seq,
                            topic,
                            scope,
                            message,
                        })) => {
                            if seq > *last {
                                *last = seq;
                                let out = self.hub.deliver(&topic, &message, &scope);
                                self.metrics.delivered(&topic, out.delivered);
                                self.metrics.dropped(&topic, out.dropped);
                            } else {
                                self.metrics.peer_duplicate();
                            }
                            seen = seq;
                            unacked += 1;
                        }
                        Ok(Some(Frame::Ping)) => ack_now = true,
                        Ok(None) => break None,
                        Err(e) => break Some(e),
                    }
                }
            };
            // Acks are gathered (up to ACK_DELAY or ACK_EVERY messages): one write
            // here and one read at the sender for many messages.
            if unacked >= ACK_EVERY || (unacked > 0 && fault.is_some()) {
                ack_now = true;
            }
            if unacked > 0 && !ack_now {
                ack_at.get_or_insert_with(|| Instant::now() + ACK_DELAY);
            }
            if ack_now {
                frame::encode_ack(seen, &mut out);
                if !matches!(
                    timeout(self.settings.write_timeout, wr.write_all(&out)).await,
                    Ok(Ok(()))
                ) {
                    return;
                }
                out.clear();
                unacked = 0;
                ack_at = None;
            }
            if let Some(e) = fault {
                let why = format!("{e}; closing the stream");
                tracing::warn!(stream, error = %e, "closed a broker stream from another sidecar: it sent bytes that are not the protocol");
                self.refuse(&mut wr, stream, &why).await;
                return;
            }
        }
    }

    /// Sends an error reply and closes (within the write deadline).
    async fn refuse<W: AsyncWrite + Unpin>(&self, wr: &mut W, stream: &str, why: &str) {
        tracing::debug!(stream, why, "closing a broker stream");
        let reply = frame::encode_error(why);
        let _ = timeout(self.settings.write_timeout, async {
            wr.write_all(&reply).await?;
            wr.shutdown().await
        })
        .await;
    }

    /// Ends every stream (each acknowledges what it delivered first) and waits for
    /// their tasks, at most `grace`.
    pub(crate) async fn close(&self, grace: Duration) {
        self.stop.cancel();
        self.tasks.close();
        if timeout(grace, self.tasks.wait()).await.is_err() {
            tracing::warn!(
                streams = self.tasks.len(),
                "broker streams from other sidecars still finishing a write after {}; they end at their write deadline",
                pillion_core::duration::format(grace)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::Scope;
    use crate::Message;
    use bytes::Bytes;

    // On a paused clock, the ack delay cannot lapse before the close: only the close
    // can make the ack go.
    #[tokio::test(start_paused = true)]
    async fn a_closing_stream_acknowledges_what_it_delivered_then_ends() {
        let hub = Hub::new();
        let mut sub = hub.subscribe("orders.new", None, 10);
        let intake = Arc::new(Intake::new(
            "me".into(),
            hub.clone(),
            Arc::new(BrokerMetrics::default()),
            LinkSettings::default(),
            CancellationToken::new(),
        ));
        let (near, mut far) = tokio::io::duplex(64 << 10);
        let last = intake.last("origin.1");
        let serving = intake.clone();
        intake
            .tasks
            .spawn(async move { serving.serve(near, last, "origin.1").await });
        let message = Message {
            body: Bytes::from_static(b"first"),
            ..Message::default()
        };
        let frame = frame::encode_message("orders.new", &Scope::all(), &message).unwrap();
        far.write_all(&frame.with_seq(1)).await.unwrap();
        let delivered = sub.next().await.unwrap();
        assert_eq!(&delivered.message.body[..], b"first");

        intake.close(Duration::from_secs(30)).await;
        assert_eq!(intake.running(), 0, "the stream's task runs after close");
        let mut replies = BytesMut::new();
        while far.read_buf(&mut replies).await.unwrap() > 0 {}
        assert_eq!(
            frame::decode_reply(&mut replies).unwrap(),
            Some(frame::Reply::Ack(1))
        );
        assert!(replies.is_empty(), "{} bytes after the ack", replies.len());
    }
}
