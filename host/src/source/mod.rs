//! Where events come from: one module per transport, each turning broker messages into
//! [`Delivery`]s that carry their bytes, transport metadata and how to acknowledge them.

pub mod bus;
pub mod rabbitmq;
pub mod redis;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::envelope::Transport;

/// A message as received, before or after decoding.
#[derive(Debug, Clone)]
pub struct Received {
    pub body: Vec<u8>,
    pub transport: Transport,
}

impl Received {
    /// The transport metadata as JSON, kept with dead letters.
    pub fn transport_json(&self) -> String {
        let t = &self.transport;
        let headers: Vec<(String, String)> = t.headers.iter().map(|(n, v)| (n.clone(), v.to_string())).collect();
        serde_json::json!({
            "routing_key": t.routing_key,
            "origin": t.origin,
            "content_type": t.content_type,
            "message_id": t.message_id,
            "headers": headers,
        })
        .to_string()
    }
}

/// Exponential backoff between reconnection attempts: 200 ms doubling up to 30 s.
pub(crate) struct Backoff(Duration);

impl Backoff {
    const MIN: Duration = Duration::from_millis(200);
    const MAX: Duration = Duration::from_secs(30);

    pub(crate) fn new() -> Self {
        Backoff(Self::MIN)
    }

    /// The wait before the next attempt.
    pub(crate) fn delay(&self) -> Duration {
        self.0
    }

    /// After a healthy connection, start again from the shortest wait.
    pub(crate) fn reset(&mut self) {
        self.0 = Self::MIN;
    }

    /// Wait, then lengthen the next wait; false if `shutdown` came first.
    pub(crate) async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = tokio::time::sleep(self.0) => {}
        }
        self.0 = (self.0 * 2).min(Self::MAX);
        true
    }
}

/// Messages taken from a source and not yet acknowledged, across all sources: the router is
/// idle when it is zero and the outbox is empty.
#[derive(Debug, Default)]
pub struct InFlight(AtomicU64);

impl InFlight {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// How to settle one message with its source. Dropping it unsettled leaves the message to be
/// redelivered (RabbitMQ requeues unacknowledged messages when the channel closes).
pub struct Ack {
    kind: AckKind,
    in_flight: Arc<InFlight>,
}

enum AckKind {
    Amqp(lapin::Acker),
    /// A Redis Streams entry, acknowledged with `XACK` on its group.
    RedisStream {
        conn: ::redis::aio::MultiplexedConnection,
        stream: String,
        group: String,
        id: String,
    },
    /// The in-process bus or Redis pub/sub: nothing to tell a broker.
    Local,
    /// An HTTP request waiting for the event to be settled.
    Notify(tokio::sync::oneshot::Sender<()>),
}

impl Ack {
    pub(crate) fn amqp(acker: lapin::Acker, in_flight: Arc<InFlight>) -> Self {
        in_flight.0.fetch_add(1, Ordering::SeqCst);
        Ack { kind: AckKind::Amqp(acker), in_flight }
    }

    pub(crate) fn redis_stream(
        conn: ::redis::aio::MultiplexedConnection,
        stream: String,
        group: String,
        id: String,
        in_flight: Arc<InFlight>,
    ) -> Self {
        in_flight.0.fetch_add(1, Ordering::SeqCst);
        Ack { kind: AckKind::RedisStream { conn, stream, group, id }, in_flight }
    }

    pub(crate) fn notify(settled: tokio::sync::oneshot::Sender<()>, in_flight: Arc<InFlight>) -> Self {
        in_flight.0.fetch_add(1, Ordering::SeqCst);
        Ack { kind: AckKind::Notify(settled), in_flight }
    }

    pub(crate) fn local(in_flight: Arc<InFlight>) -> Self {
        in_flight.0.fetch_add(1, Ordering::SeqCst);
        Ack { kind: AckKind::Local, in_flight }
    }

    /// The message's effects are committed (or it is dead-lettered): the source may forget it.
    pub async fn ack(mut self) {
        if let AckKind::Notify(_) = &self.kind
            && let AckKind::Notify(tx) = std::mem::replace(&mut self.kind, AckKind::Local)
        {
            let _ = tx.send(());
            return;
        }
        match &self.kind {
            AckKind::Amqp(acker) => {
                if let Err(e) = acker.ack(lapin::options::BasicAckOptions::default()).await {
                    // The channel is gone; the broker redelivers and the processed-marker dedups.
                    tracing::warn!(error = %e, "ack failed; the message will be redelivered");
                }
            }
            AckKind::RedisStream { conn, stream, group, id } => {
                let mut conn = conn.clone();
                let acked: ::redis::RedisResult<i64> =
                    ::redis::AsyncCommands::xack(&mut conn, stream, group, &[id]).await;
                if let Err(e) = acked {
                    tracing::warn!(error = %e, stream, id, "XACK failed; the entry will be claimed again");
                }
            }
            AckKind::Local | AckKind::Notify(_) => {}
        }
    }

    /// Give the message back to the broker now (e.g. on shutdown before handling it). A
    /// Redis Streams entry stays pending and is claimed again after the idle time.
    pub async fn requeue(self) {
        if let AckKind::Amqp(acker) = &self.kind {
            let options = lapin::options::BasicNackOptions { requeue: true, ..Default::default() };
            if let Err(e) = acker.nack(options).await {
                tracing::warn!(error = %e, "nack failed; the message will be redelivered");
            }
        }
    }
}

impl Drop for Ack {
    fn drop(&mut self) {
        self.in_flight.0.fetch_sub(1, Ordering::SeqCst);
    }
}
