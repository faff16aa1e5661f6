//! Where events come from: one module per transport, each turning broker messages into
//! [`Received`] messages (their bytes and transport metadata) with an [`Ack`] that says how to
//! acknowledge them.

mod amqp_acks;
pub mod bus;
pub mod health;
pub mod rabbitmq;
pub mod redis;
mod stream_acks;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::dispatch::Inbound;
use crate::envelope::{HeaderValue, Transport};
use crate::event::{Event, Millis};
use crate::plugins::PluginSet;
use crate::retry::Parking;
pub(crate) use amqp_acks::AckBatch;
pub use health::{Health, SourceHealth};
pub(crate) use stream_acks::StreamAcks;

/// A message as received, before or after decoding.
#[derive(Debug, Clone)]
pub struct Received {
    pub body: Vec<u8>,
    pub transport: Transport,
}

impl Received {
    /// The transport metadata as JSON, kept with dead letters and parked events so that the
    /// message can be decoded again as it was received.
    pub fn transport_json(&self) -> String {
        let t = &self.transport;
        let headers: Vec<(&str, serde_json::Value)> = t
            .headers
            .iter()
            .map(|(n, v)| {
                let value = match v {
                    HeaderValue::Text(s) => serde_json::Value::from(s.as_str()),
                    HeaderValue::Integer(i) => serde_json::Value::from(*i),
                    HeaderValue::Boolean(b) => serde_json::Value::from(*b),
                    HeaderValue::Timestamp(secs) => serde_json::json!({ "timestamp": secs }),
                };
                (n.as_str(), value)
            })
            .collect();
        serde_json::json!({
            "routing_key": t.routing_key,
            "origin": t.origin,
            "content_type": t.content_type,
            "message_id": t.message_id,
            "correlation_id": t.correlation_id,
            "timestamp": t.timestamp,
            "received_at": t.received_at.0,
            "headers": headers,
        })
        .to_string()
    }

    /// A message as [`transport_json`](Self::transport_json) kept it. Metadata that cannot be
    /// read is left out: the body still decodes, with less context.
    pub fn from_kept(transport_json: &str, body: Vec<u8>) -> Received {
        let kept: serde_json::Value = serde_json::from_str(transport_json).unwrap_or_default();
        let text = |key: &str| kept.get(key).and_then(|v| v.as_str()).map(str::to_string);
        let headers = kept
            .get("headers")
            .and_then(|h| h.as_array())
            .map(|pairs| {
                pairs
                    .iter()
                    .filter_map(|pair| {
                        let name = pair.get(0)?.as_str()?.to_string();
                        let value = match pair.get(1)? {
                            serde_json::Value::String(s) => HeaderValue::Text(s.clone()),
                            serde_json::Value::Bool(b) => HeaderValue::Boolean(*b),
                            serde_json::Value::Number(n) => HeaderValue::Integer(n.as_i64()?),
                            other => HeaderValue::Timestamp(other.get("timestamp")?.as_u64()?),
                        };
                        Some((name, value))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let transport = Transport {
            routing_key: text("routing_key").unwrap_or_default(),
            origin: text("origin").unwrap_or_default(),
            content_type: text("content_type"),
            message_id: text("message_id"),
            correlation_id: text("correlation_id"),
            timestamp: kept.get("timestamp").and_then(|v| v.as_u64()),
            headers,
            received_at: kept.get("received_at").and_then(|v| v.as_u64()).map(Millis).unwrap_or_else(Millis::now),
        };
        Received { body, transport }
    }
}

/// Hand an event that no broker keeps (the in-process bus, Redis pub/sub) to every plugin
/// subscribed to its name, each with an ack of its own; returns how many. The last plugin
/// takes the event and message themselves, the others copies.
pub(crate) async fn hand_to_subscribers(
    plugins: &PluginSet,
    event: Event,
    received: Received,
    in_flight: &Arc<InFlight>,
) -> usize {
    let members = plugins.snapshot();
    let targets: Vec<_> =
        members.plugins.iter().filter(|d| d.slot().current().settings.subscriptions.matches(&event.name)).collect();
    let Some((last, others)) = targets.split_last() else {
        tracing::debug!(name = %event.name, "no plugin subscribes to this event");
        return 0;
    };
    let inbound =
        |event, received| Inbound { event, received, ack: Ack::local(in_flight.clone()), attempt: 1, parked: None };
    for dispatch in others {
        dispatch.submit(inbound(event.clone(), received.clone())).await;
    }
    last.submit(inbound(event, received)).await;
    targets.len()
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

/// Longest wait for a broker to take an ack or a nack: a connection that died without the
/// client noticing must not hold a lane (the message is redelivered either way).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long settlements gather before a batched ack (RabbitMQ `basic.ack`, Redis `XACK`) goes
/// out. At the broker's pace (some 20,000 messages a second) one ack then covers dozens of
/// messages; a quieter consumer's acks wait this much longer, which holds no event back: its
/// effects are committed already.
const ACK_LINGER: Duration = Duration::from_millis(2);

/// Dropped once the ack that settles a message is sent: what it holds (a waiter, the
/// message's pending count) is released then.
type Done = Box<dyn Send>;

/// A message settled through its channel's or group's batched acks, taken out of its [`Ack`].
enum Batched {
    Amqp { tag: u64, acker: lapin::Acker, batch: Arc<AckBatch> },
    Stream { acks: Arc<StreamAcks>, id: String },
}

/// How to settle one message with its source. Dropping it unsettled leaves the message to be
/// redelivered (RabbitMQ requeues unacknowledged messages when the channel closes).
pub struct Ack {
    kind: AckKind,
    in_flight: Arc<InFlight>,
}

enum AckKind {
    /// A RabbitMQ delivery, acked in batches with the other deliveries of its channel; the
    /// acker is taken when the message is settled.
    Amqp { tag: u64, acker: Option<lapin::Acker>, batch: Arc<AckBatch> },
    /// A Redis Streams entry, acknowledged with `XACK` on its group, in batches with the
    /// group's other entries.
    RedisStream { acks: Arc<StreamAcks>, id: String },
    /// The in-process bus or Redis pub/sub: nothing to tell a broker.
    Local,
    /// An event parked in the store: settling it deletes the row.
    Parked { writer: crate::commit::Writer, seq: i64, parking: Arc<Parking> },
    /// An HTTP request waiting for the event to be settled.
    Notify(tokio::sync::oneshot::Sender<()>),
}

impl Ack {
    pub(crate) fn amqp(tag: u64, acker: lapin::Acker, batch: &Arc<AckBatch>, in_flight: Arc<InFlight>) -> Self {
        in_flight.0.fetch_add(1, Ordering::SeqCst);
        batch.track(tag);
        Ack { kind: AckKind::Amqp { tag, acker: Some(acker), batch: batch.clone() }, in_flight }
    }

    pub(crate) fn redis_stream(acks: &Arc<StreamAcks>, id: String, in_flight: Arc<InFlight>) -> Self {
        in_flight.0.fetch_add(1, Ordering::SeqCst);
        Ack { kind: AckKind::RedisStream { acks: acks.clone(), id }, in_flight }
    }

    pub(crate) fn notify(settled: tokio::sync::oneshot::Sender<()>, in_flight: Arc<InFlight>) -> Self {
        in_flight.0.fetch_add(1, Ordering::SeqCst);
        Ack { kind: AckKind::Notify(settled), in_flight }
    }

    pub(crate) fn parked_row(
        writer: crate::commit::Writer,
        seq: i64,
        parking: Arc<Parking>,
        in_flight: Arc<InFlight>,
    ) -> Self {
        in_flight.0.fetch_add(1, Ordering::SeqCst);
        Ack { kind: AckKind::Parked { writer, seq, parking }, in_flight }
    }

    pub(crate) fn local(in_flight: Arc<InFlight>) -> Self {
        in_flight.0.fetch_add(1, Ordering::SeqCst);
        Ack { kind: AckKind::Local, in_flight }
    }

    /// Whether this settles a message a broker holds (RabbitMQ, Redis Streams), as opposed to
    /// a parked row, an HTTP request or a message nobody keeps.
    pub(crate) fn is_broker_message(&self) -> bool {
        matches!(self.kind, AckKind::Amqp { .. } | AckKind::RedisStream { .. })
    }

    /// The message's effects are committed (or it is dead-lettered): the source may forget it.
    /// Returns false only for a parked event whose row was gone already (settled before).
    pub async fn ack(mut self) -> bool {
        if let AckKind::Notify(_) = &self.kind
            && let AckKind::Notify(tx) = std::mem::replace(&mut self.kind, AckKind::Local)
        {
            let _ = tx.send(());
            return true;
        }
        match &mut self.kind {
            AckKind::Amqp { tag, acker, batch } => {
                if let Some(acker) = acker.take() {
                    let (done, sent) = tokio::sync::oneshot::channel::<()>();
                    batch.ack(*tag, acker, Box::new(done));
                    // Dropping `done` ends the wait: the ack went out, or the channel failed.
                    let _ = sent.await;
                }
            }
            AckKind::RedisStream { acks, id } => acks.ack_and_wait(std::mem::take(id)).await,
            AckKind::Parked { writer, seq, parking } => {
                let error = match writer.unpark(*seq).await {
                    Ok(Ok(deleted)) => return deleted == 1,
                    Ok(Err(e)) => e.to_string(),
                    Err(e) => e.to_string(),
                };
                tracing::warn!(
                    plugin = parking.plugin(),
                    error,
                    seq,
                    "could not delete a parked event; it will run again and be deduplicated"
                );
                return false;
            }
            AckKind::Local | AckKind::Notify(_) => {}
        }
        true
    }

    /// Like [`ack`](Self::ack), without waiting for the broker: `guard` is dropped, and the
    /// message stops counting as in flight, once the broker has the ack.
    pub fn ack_detached(mut self, guard: impl Send + 'static) {
        let batched = match &mut self.kind {
            AckKind::Amqp { tag, acker, batch } => {
                acker.take().map(|acker| Batched::Amqp { tag: *tag, acker, batch: batch.clone() })
            }
            AckKind::RedisStream { acks, id } => Some(Batched::Stream { acks: acks.clone(), id: std::mem::take(id) }),
            _ => None,
        };
        // The batch keeps the message (and so its in-flight count) until its ack is sent.
        match batched {
            Some(Batched::Amqp { tag, acker, batch }) => batch.ack(tag, acker, Box::new((guard, self))),
            Some(Batched::Stream { acks, id }) => acks.ack(id, Box::new((guard, self))),
            None => {
                tokio::spawn(async move {
                    self.ack().await;
                    drop(guard);
                });
            }
        }
    }

    /// The event was parked for a later attempt: the broker may forget the message, now that
    /// the store holds it; an event that already was parked keeps its (updated) row.
    pub async fn parked(self) {
        if !matches!(self.kind, AckKind::Parked { .. }) {
            self.ack().await;
        }
    }

    /// Give the message back to the broker now (e.g. on shutdown before handling it). A
    /// Redis Streams entry stays pending and is claimed again after the idle time.
    pub async fn requeue(mut self) {
        if let AckKind::Amqp { tag, acker, batch } = &mut self.kind
            && let Some(acker) = acker.take()
        {
            batch.requeue(*tag, acker).await;
        }
    }
}

impl Drop for Ack {
    fn drop(&mut self) {
        self.in_flight.0.fetch_sub(1, Ordering::SeqCst);
        match &mut self.kind {
            AckKind::Parked { seq, parking, .. } => parking.untake(*seq),
            // Never settled: left to the broker, and no batched ack of a later delivery covers it.
            AckKind::Amqp { tag, acker: Some(_), batch } => batch.abandon(*tag),
            _ => {}
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_message_decodes_as_it_was_received() {
        let transport = Transport {
            routing_key: "user.updated".into(),
            origin: "amqp:x".into(),
            content_type: Some("application/json".into()),
            message_id: Some("m-1".into()),
            correlation_id: Some("c-1".into()),
            timestamp: Some(1_700_000_000),
            headers: vec![
                ("x-text".into(), HeaderValue::Text("t".into())),
                ("x-int".into(), HeaderValue::Integer(-4)),
                ("x-bool".into(), HeaderValue::Boolean(true)),
                ("x-time".into(), HeaderValue::Timestamp(1_700_000_001)),
            ],
            received_at: Millis(1_700_000_000_123),
        };
        let received = Received { body: b"{}".to_vec(), transport };
        let kept = Received::from_kept(&received.transport_json(), received.body.clone());
        assert_eq!(kept.transport, received.transport);
        assert_eq!(kept.body, received.body);
        let unreadable = Received::from_kept("not json", b"x".to_vec());
        assert_eq!((unreadable.transport.routing_key.as_str(), unreadable.body), ("", b"x".to_vec()));
    }
}
