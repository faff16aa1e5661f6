//! RabbitMQ: a durable topic exchange, one durable queue per plugin (classic or quorum) bound to
//! its subscriptions, and ingress queues that NestJS services `emit` to.
//!
//! An ingress message is forwarded to the exchange under its event name, with publisher
//! confirms, and acked only after the broker confirmed the copy. A message that carries no id
//! gets one, written to the ingress journal before the copy is sent; if the router dies before
//! the ack, the redelivered message (same bytes, `redelivered` set) takes the journaled id
//! again, so the plugins' deduplication sees one event.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::task::JoinSet;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::commit::{JournalEntry, JournalOp, Writer};
use crate::config::{QueueType, RabbitMqConfig};
use crate::db::Readers;
use crate::dispatch::{Dispatch, Inbound, dead_letter_undecodable};
use crate::envelope::{self, HeaderValue, OCCURRED_AT_HEADER, Transport};
use crate::event::{EventId, Millis};
use crate::plugins::{Consumers, Following, PluginSet};
use crate::source::{Ack, AckBatch, Backoff, Health, InFlight, Received};

/// A session that lasted this long was healthy: the next reconnect starts from the minimum.
const HEALTHY_SESSION: Duration = Duration::from_secs(30);
/// Ingress messages forwarded per confirm round.
const INGRESS_BATCH: usize = 256;
/// How long the router waits for one answer of the broker where nothing else bounds the wait:
/// a close, and each step of a depth read. A link that silently stops carrying bytes never
/// answers, and a wait for it would hold up whoever asked: the session's reconnection, a
/// plugin's removal, an admin request, a `/metrics` scrape, a `--exit-when-idle` run.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// Wait for `closing` (a connection's or a channel's close) at most [`ANSWER_TIMEOUT`]. What
/// was closed is given up either way: a failed or unanswered close only leaves the broker to
/// notice the connection is gone.
async fn close_within(what: &str, closing: impl Future<Output = Result<(), lapin::Error>>) {
    match tokio::time::timeout(ANSWER_TIMEOUT, closing).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(what, error = %e, "closing failed"),
        Err(_) => tracing::warn!(what, timeout = ?ANSWER_TIMEOUT, "the broker did not answer the close; giving it up"),
    }
}

/// Why a connection to RabbitMQ ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionEnd {
    #[error("connection failed: {0}")]
    Connect(lapin::Error),
    #[error("declaring {what} failed: {error}")]
    Topology { what: String, error: lapin::Error },
    #[error(transparent)]
    PluginQueue(#[from] QueueError),
    #[error("consumer of {queue} ended: {reason}")]
    ConsumerEnded { queue: String, reason: String },
    #[error("forwarding from ingress queue {queue} failed: {reason}")]
    Forward { queue: String, reason: String },
}

/// The RabbitMQ source of one router.
pub struct RabbitMqSource {
    pub config: RabbitMqConfig,
    pub writer: Writer,
    pub readers: Readers,
    pub in_flight: Arc<InFlight>,
    /// Up while connected with every consumer running; partly up with the reason while a
    /// plugin's queue is refused; down with the reason while there is no session.
    pub health: Arc<Health>,
}

impl RabbitMqSource {
    /// The queue a plugin consumes.
    pub fn queue_name(config: &RabbitMqConfig, plugin: &str) -> String {
        format!("{}{plugin}", config.queue_prefix)
    }

    /// Consume until `shutdown`, reconnecting with backoff whenever the connection ends.
    pub async fn run(self, plugins: PluginSet, shutdown: CancellationToken) {
        let mut backoff = Backoff::new();
        let following = plugins.follower(self.health.clone());
        loop {
            let started = std::time::Instant::now();
            let session = self.session(&plugins, &following, &shutdown);
            let ended = tokio::select! {
                _ = shutdown.cancelled() => return,
                ended = session => ended,
            };
            if started.elapsed() >= HEALTHY_SESSION {
                backoff.reset();
            }
            match ended {
                Ok(()) => {
                    self.health.down("stopped");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff.delay(), "RabbitMQ session ended; reconnecting");
                    self.health.down(e);
                }
            }
            if !backoff.wait(&shutdown).await {
                return;
            }
        }
    }

    /// One connection: a consumer per plugin, started and stopped as the plugin set changes,
    /// and a forwarder per ingress queue.
    async fn session(
        &self,
        plugins: &PluginSet,
        following: &Following,
        shutdown: &CancellationToken,
    ) -> Result<(), SessionEnd> {
        let conn = Connection::connect(self.config.url.expose(), ConnectionProperties::default())
            .await
            .map_err(SessionEnd::Connect)?;
        let setup = conn.create_channel().await.map_err(SessionEnd::Connect)?;
        declare_exchange(&setup, &self.config.exchange).await?;
        let mut tasks = JoinSet::new();
        let mut changes = plugins.subscribe();
        let mut consumers = Consumers::default();
        let current = changes.borrow_and_update().clone();
        let mut refused = self.follow(&conn, &current.plugins, &mut consumers, &mut tasks).await?;
        following.followed(current.generation);
        for queue in &self.config.ingress_queues {
            let channel = open_ingress(&conn, queue).await?;
            channel
                .basic_qos(self.config.prefetch, BasicQosOptions::default())
                .await
                .map_err(|error| SessionEnd::Topology { what: format!("prefetch of {queue}"), error })?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(|error| SessionEnd::Topology { what: format!("confirms on {queue}"), error })?;
            let forwarder = Forwarder {
                queue: queue.clone(),
                exchange: self.config.exchange.clone(),
                writer: self.writer.clone(),
                readers: self.readers.clone(),
                in_flight: self.in_flight.clone(),
                acks: Arc::new(AckBatch::new(self.config.prefetch)),
                claimed: HashSet::new(),
            };
            tasks.spawn(async move { Some(forwarder.run(channel).await) });
        }
        refused.report(&self.health);
        tracing::info!(
            plugins = consumers.len(),
            refused = refused.0.len(),
            ingress = self.config.ingress_queues.len(),
            "consuming from RabbitMQ"
        );
        let mut retry = Backoff::new();
        let ended = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                changed = changes.changed() => if changed.is_err() {
                    break Ok(());
                },
                // A refused queue may have been moved away meanwhile: try its plugin again.
                retrying = retry.wait(shutdown), if !refused.0.is_empty() => if !retrying {
                    break Ok(());
                },
                first = tasks.join_next(), if !tasks.is_empty() => match first {
                    Some(Ok(Some(end))) => break Err(end),
                    Some(Err(join)) => {
                        break Err(SessionEnd::ConsumerEnded { queue: "?".into(), reason: join.to_string() });
                    }
                    // A consumer stopped because its plugin was removed.
                    Some(Ok(None)) | None => continue,
                },
            }
            let current = changes.borrow_and_update().clone();
            match self.follow(&conn, &current.plugins, &mut consumers, &mut tasks).await {
                Ok(now) => refused = now,
                Err(e) => break Err(e),
            }
            refused.report(&self.health);
            if refused.0.is_empty() {
                retry.reset();
            }
            following.followed(current.generation);
        };
        tasks.abort_all();
        close_within("the session's connection", conn.close(200, "switchyard session ends".into())).await;
        ended
    }

    /// Start a consumer for each plugin of `plugins` that has none, and stop the consumers of
    /// plugins no longer in it (each drains its plugin's events before closing its channel),
    /// returning once the broker has cancelled them: a removal that discards the queue then
    /// finds none of this router's consumers on it. A plugin whose queue the broker refuses
    /// gets no consumer and is returned: its events wait in its queue, and the other plugins'
    /// consumers run.
    async fn follow(
        &self,
        conn: &Connection,
        plugins: &[Dispatch],
        consumers: &mut Consumers<Detached>,
        tasks: &mut JoinSet<Option<SessionEnd>>,
    ) -> Result<Refused, SessionEnd> {
        let mut refused = Refused::default();
        let followed = consumers.follow(plugins);
        for dispatch in followed.missing {
            let plugin = dispatch.slot().current();
            let prefetch = plugin.settings.prefetch.unwrap_or(self.config.prefetch);
            let queue = Self::queue_name(&self.config, dispatch.name());
            let channel = conn.create_channel().await.map_err(SessionEnd::Connect)?;
            match declare_plugin_queue(&channel, &queue, self.config.queue_type).await {
                Ok(()) => {}
                Err(e @ QueueError::Mismatch { .. }) => {
                    tracing::warn!(plugin = %dispatch.name(), error = %e, "plugin queue refused: its events wait in it; the other plugins' consumers run");
                    refused.0.push(format!("plugin {}: {e}", dispatch.name()));
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
            for pattern in &plugin.settings.subscriptions.0 {
                channel
                    .queue_bind(
                        queue.as_str().into(),
                        self.config.exchange.as_str().into(),
                        pattern.as_str().into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(|error| SessionEnd::Topology { what: format!("binding {queue} to {pattern}"), error })?;
            }
            channel
                .basic_qos(prefetch, BasicQosOptions::default())
                .await
                .map_err(|error| SessionEnd::Topology { what: format!("prefetch of {queue}"), error })?;
            let (stop, detached) = (CancellationToken::new(), Detached::default());
            let consumer = PluginConsumer {
                queue,
                origin: format!("amqp:{}", self.config.exchange),
                dispatch: dispatch.clone(),
                writer: self.writer.clone(),
                in_flight: self.in_flight.clone(),
                prefetch,
                stop: stop.clone(),
                detached: detached.0.clone().drop_guard(),
            };
            tasks.spawn(consumer.run(channel));
            consumers.started(dispatch, stop, detached);
        }
        for detached in followed.stopped {
            if tokio::time::timeout(ANSWER_TIMEOUT, detached.0.cancelled()).await.is_err() {
                tracing::warn!("the broker has not cancelled a removed plugin's consumer yet");
            }
        }
        Ok(refused)
    }
}

/// Cancelled once a plugin's consumer is off its queue: the broker answered its cancel, or
/// its channel or connection is gone.
#[derive(Default)]
struct Detached(CancellationToken);

/// The plugins whose queue the broker refused, each with the reason.
#[derive(Default)]
struct Refused(Vec<String>);

impl Refused {
    /// The session is up, and ready unless a plugin's queue was refused.
    fn report(&self, health: &Health) {
        health.partly_up(self.0.clone());
    }
}

async fn declare_exchange(channel: &Channel, exchange: &str) -> Result<(), SessionEnd> {
    let options = ExchangeDeclareOptions { durable: true, ..Default::default() };
    channel
        .exchange_declare(exchange.into(), ExchangeKind::Topic, options, FieldTable::default())
        .await
        .map_err(|error| SessionEnd::Topology { what: format!("exchange {exchange}"), error })
}

/// A plugin's queue the broker would not declare.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The queue exists with another type or other arguments (406 PRECONDITION_FAILED). The
    /// broker's reason names the argument that differs.
    #[error(
        "queue {queue} exists with other arguments than rabbitmq.queue_type = \"{queue_type}\" declares, \
         and a queue keeps the type it was first declared with: {error}"
    )]
    Mismatch { queue: String, queue_type: QueueType, error: lapin::Error },
    #[error("declaring queue {queue} failed: {error}")]
    Failed { queue: String, error: lapin::Error },
}

/// Declare a plugin's durable queue with the configured type.
async fn declare_plugin_queue(channel: &Channel, queue: &str, queue_type: QueueType) -> Result<(), QueueError> {
    match channel.queue_declare(queue.into(), QueueDeclareOptions::durable(), queue_arguments(queue_type)).await {
        Ok(_) => Ok(()),
        Err(error) if refused_with(&error, AMQPSoftError::PRECONDITIONFAILED) => {
            Err(QueueError::Mismatch { queue: queue.into(), queue_type, error })
        }
        Err(error) => Err(QueueError::Failed { queue: queue.into(), error }),
    }
}

/// The arguments a queue of `queue_type` is declared with: none for a classic one, as every
/// router before `queue_type` declared it.
pub fn queue_arguments(queue_type: QueueType) -> FieldTable {
    let mut arguments = FieldTable::default();
    if queue_type == QueueType::Quorum {
        arguments.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    }
    arguments
}

/// Whether the broker refused the request with this channel error.
fn refused_with(error: &lapin::Error, code: AMQPSoftError) -> bool {
    matches!(error.kind(), lapin::ErrorKind::ProtocolError(e) if *e.kind() == AMQPErrorKind::Soft(code))
}

/// A channel on an ingress queue. The queue belongs to the services that emit to it: one that
/// exists is used as they declared it, whatever its arguments (a quorum type, a dead-letter
/// exchange); a missing one is declared as a plain durable queue, as NestJS declares it by
/// default.
async fn open_ingress(conn: &Connection, queue: &str) -> Result<Channel, SessionEnd> {
    let topology = |error| SessionEnd::Topology { what: format!("queue {queue}"), error };
    let channel = conn.create_channel().await.map_err(SessionEnd::Connect)?;
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    match channel.queue_declare(queue.into(), passive, FieldTable::default()).await {
        Ok(_) => Ok(channel),
        Err(error) if refused_with(&error, AMQPSoftError::NOTFOUND) => {
            // The refusal closed that channel.
            let channel = conn.create_channel().await.map_err(SessionEnd::Connect)?;
            let declared = channel.queue_declare(queue.into(), QueueDeclareOptions::durable(), FieldTable::default());
            declared.await.map_err(topology)?;
            Ok(channel)
        }
        Err(error) => Err(topology(error)),
    }
}

/// The transport metadata of a delivery.
pub fn transport_of(delivery: &lapin::message::Delivery, origin: &str) -> Transport {
    let p = &delivery.properties;
    let headers = p
        .headers()
        .as_ref()
        .map(|t| t.inner().iter().filter_map(|(k, v)| header_value(v).map(|v| (k.as_str().to_string(), v))).collect())
        .unwrap_or_default();
    Transport {
        routing_key: delivery.routing_key.as_str().to_string(),
        origin: origin.to_string(),
        content_type: p.content_type().as_ref().map(|s| s.as_str().to_string()),
        message_id: p.message_id().as_ref().map(|s| s.as_str().to_string()),
        correlation_id: p.correlation_id().as_ref().map(|s| s.as_str().to_string()),
        timestamp: *p.timestamp(),
        headers,
        received_at: Millis::now(),
    }
}

fn header_value(v: &AMQPValue) -> Option<HeaderValue> {
    Some(match v {
        AMQPValue::Boolean(b) => HeaderValue::Boolean(*b),
        AMQPValue::ShortShortInt(i) => HeaderValue::Integer(i64::from(*i)),
        AMQPValue::ShortShortUInt(i) => HeaderValue::Integer(i64::from(*i)),
        AMQPValue::ShortInt(i) => HeaderValue::Integer(i64::from(*i)),
        AMQPValue::ShortUInt(i) => HeaderValue::Integer(i64::from(*i)),
        AMQPValue::LongInt(i) => HeaderValue::Integer(i64::from(*i)),
        AMQPValue::LongUInt(i) => HeaderValue::Integer(i64::from(*i)),
        AMQPValue::LongLongInt(i) => HeaderValue::Integer(*i),
        AMQPValue::Timestamp(t) => HeaderValue::Timestamp(*t),
        AMQPValue::ShortString(s) => HeaderValue::Text(s.as_str().to_string()),
        AMQPValue::LongString(s) => HeaderValue::Text(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        _ => return None,
    })
}

fn has_name_header(transport: &Transport) -> bool {
    transport.headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(envelope::NAME_HEADER))
}

/// AMQP headers for the router's own header values.
pub fn field_table(headers: &[(String, HeaderValue)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (name, value) in headers {
        let v = match value {
            HeaderValue::Text(s) => AMQPValue::LongString(s.as_str().into()),
            HeaderValue::Integer(i) => AMQPValue::LongLongInt(*i),
            HeaderValue::Timestamp(t) => AMQPValue::Timestamp(*t),
            HeaderValue::Boolean(b) => AMQPValue::Boolean(*b),
        };
        table.insert(ShortString::from(name.as_str()), v);
    }
    table
}

/// Consumes one plugin's queue into its lanes.
struct PluginConsumer {
    queue: String,
    origin: String,
    dispatch: Dispatch,
    writer: Writer,
    in_flight: Arc<InFlight>,
    /// The channel's prefetch, which sizes its ack batches.
    prefetch: u16,
    /// Cancelled when the plugin is removed.
    stop: CancellationToken,
    /// Dropped once the consumer is off the queue.
    detached: DropGuard,
}

impl PluginConsumer {
    /// Consume until the plugin is removed (`None`) or the consumer fails (the session ends).
    async fn run(self, channel: Channel) -> Option<SessionEnd> {
        let ended = |reason: String| Some(SessionEnd::ConsumerEnded { queue: self.queue.clone(), reason });
        let consumer = channel
            .basic_consume(self.queue.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await;
        let mut consumer = match consumer {
            Ok(c) => c,
            Err(e) => return ended(e.to_string()),
        };
        let acks = Arc::new(AckBatch::new(self.prefetch));
        loop {
            let delivery = tokio::select! {
                _ = self.stop.cancelled() => break,
                delivery = consumer.next() => delivery,
            };
            let delivery = match delivery {
                Some(Ok(d)) => d,
                Some(Err(e)) => return ended(e.to_string()),
                None => return ended("the broker closed the consumer".into()),
            };
            let transport = transport_of(&delivery, &self.origin);
            let ack = Ack::amqp(delivery.delivery_tag, delivery.acker, &acks, self.in_flight.clone());
            let received = Received { body: delivery.data, transport };
            match envelope::decode(&received.body, &received.transport) {
                Ok(decoded) => {
                    self.dispatch
                        .submit(Inbound { event: decoded.event, received, ack, attempt: 1, parked: None })
                        .await
                }
                Err(e) => {
                    dead_letter_undecodable(&self.writer, self.dispatch.name(), received, ack, e.to_string()).await
                }
            }
        }
        // Removed: no more deliveries; the events already taken settle on this channel, and
        // closing it then gives back what was delivered but never taken.
        if let Err(e) = channel.basic_cancel(consumer.tag(), BasicCancelOptions::default()).await {
            tracing::warn!(queue = %self.queue, error = %e, "cancelling the consumer failed");
        }
        drop(self.detached);
        self.dispatch.drained().await;
        close_within("a removed plugin's channel", channel.close(200, "plugin removed".into())).await;
        tracing::info!(queue = %self.queue, "consumer stopped: plugin removed");
        None
    }
}

/// Forwards one ingress queue to the exchange.
struct Forwarder {
    queue: String,
    exchange: String,
    writer: Writer,
    readers: Readers,
    in_flight: Arc<InFlight>,
    /// The acks of this forwarder's channel.
    acks: Arc<AckBatch>,
    /// Journal ids taken by messages of this session that are not acked yet.
    claimed: HashSet<String>,
}

/// An ingress message ready to forward.
struct Forward {
    received: Received,
    ack: Ack,
    name: String,
    id: EventId,
    occurred_at: Millis,
}

impl Forwarder {
    fn end(&self, reason: impl ToString) -> SessionEnd {
        SessionEnd::Forward { queue: self.queue.clone(), reason: reason.to_string() }
    }

    async fn run(mut self, channel: Channel) -> SessionEnd {
        let consumer = channel
            .basic_consume(self.queue.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await;
        let mut consumer = match consumer {
            Ok(c) => c,
            Err(e) => return self.end(e),
        };
        loop {
            let mut batch = Vec::new();
            match consumer.next().await {
                Some(Ok(d)) => batch.push(d),
                Some(Err(e)) => return self.end(e),
                None => return self.end("the broker closed the consumer"),
            }
            while batch.len() < INGRESS_BATCH {
                match consumer.next().now_or_never() {
                    Some(Some(Ok(d))) => batch.push(d),
                    Some(Some(Err(e))) => return self.end(e),
                    Some(None) => return self.end("the broker closed the consumer"),
                    None => break,
                }
            }
            if let Err(e) = self.forward(&channel, batch).await {
                return e;
            }
        }
    }

    async fn forward(&mut self, channel: &Channel, batch: Vec<lapin::message::Delivery>) -> Result<(), SessionEnd> {
        let origin = format!("amqp:{}", self.queue);
        let mut ready = Vec::with_capacity(batch.len());
        let mut new_entries = Vec::new();
        for delivery in batch {
            let redelivered = delivery.redelivered;
            let transport = transport_of(&delivery, &origin);
            let ack = Ack::amqp(delivery.delivery_tag, delivery.acker, &self.acks, self.in_flight.clone());
            let received = Received { body: delivery.data, transport };
            let decoded = match envelope::decode(&received.body, &received.transport) {
                Ok(d) => d,
                Err(e) => {
                    let owner = format!("ingress:{}", self.queue);
                    dead_letter_undecodable(&self.writer, &owner, received, ack, e.to_string()).await;
                    continue;
                }
            };
            if decoded.envelope == envelope::Envelope::Raw && !has_name_header(&received.transport) {
                let owner = format!("ingress:{}", self.queue);
                let reason = format!(
                    "raw JSON on an ingress queue needs an `{}` header naming the event",
                    envelope::NAME_HEADER
                );
                dead_letter_undecodable(&self.writer, &owner, received, ack, reason).await;
                continue;
            }
            let event = decoded.event;
            let (id, occurred_at) = if decoded.id_carried {
                (event.id, event.occurred_at)
            } else {
                let digest = event.id.0.clone();
                let journaled = if redelivered { self.unclaimed_journal_entry(&digest) } else { None };
                match journaled {
                    Some((id, at)) => (EventId(id), at),
                    None => {
                        let id = EventId::generate();
                        new_entries.push(JournalEntry {
                            id: id.0.clone(),
                            queue: self.queue.clone(),
                            digest,
                            received_at: event.occurred_at,
                        });
                        (id, event.occurred_at)
                    }
                }
            };
            self.claimed.insert(id.0.clone());
            ready.push(Forward { received, ack, name: event.name, id, occurred_at });
        }
        if !new_entries.is_empty() {
            match self.writer.journal(JournalOp::Insert(new_entries)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(self.end(format!("journal: {e}"))),
                Err(e) => return Err(self.end(e)),
            }
        }
        let mut confirms = Vec::with_capacity(ready.len());
        for f in &ready {
            let mut headers = f.received.transport.headers.clone();
            headers.retain(|(n, _)| !n.eq_ignore_ascii_case(OCCURRED_AT_HEADER));
            headers.push((OCCURRED_AT_HEADER.into(), HeaderValue::time(f.occurred_at)));
            let mut props = BasicProperties::default()
                .with_message_id(f.id.0.as_str().into())
                .with_delivery_mode(2)
                .with_headers(field_table(&headers));
            if let Some(ct) = &f.received.transport.content_type {
                props = props.with_content_type(ct.as_str().into());
            }
            if let Some(c) = &f.received.transport.correlation_id {
                props = props.with_correlation_id(c.as_str().into());
            }
            let confirm = channel
                .basic_publish(
                    self.exchange.as_str().into(),
                    f.name.as_str().into(),
                    BasicPublishOptions::default(),
                    &f.received.body,
                    props,
                )
                .await
                .map_err(|e| self.end(e))?;
            confirms.push(confirm);
        }
        for confirm in confirms {
            let confirmation = confirm.await.map_err(|e| self.end(e))?;
            if !confirmation.is_ack() {
                return Err(self.end("the broker refused a forwarded copy (nack)"));
            }
        }
        let mut done = Vec::with_capacity(ready.len());
        for f in ready {
            f.ack.ack().await;
            self.claimed.remove(&f.id.0);
            done.push(f.id.0);
        }
        // Dropping a journal row late is harmless; its only use is a redelivery before the ack.
        let writer = self.writer.clone();
        tokio::spawn(async move {
            if let Ok(Err(e)) = writer.journal(JournalOp::Delete(done)).await {
                tracing::warn!(error = %e, "could not prune the ingress journal");
            }
        });
        Ok(())
    }

    fn unclaimed_journal_entry(&self, digest: &str) -> Option<(String, Millis)> {
        match self.readers.journal(&self.queue, digest) {
            Ok(rows) => rows.into_iter().find(|(id, _)| !self.claimed.contains(id)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the ingress journal; assigning a new id");
                None
            }
        }
    }
}

/// Ready-message counts of queues, each through a passive declare on one connection; `None`
/// for a queue that cannot be read, or whose count the broker did not give within
/// `ANSWER_TIMEOUT` (5 s; depths are best effort).
pub async fn queue_depths(url: &str, queues: &[String]) -> Vec<Option<u32>> {
    let connect = Connection::connect(url, ConnectionProperties::default());
    let Ok(Ok(conn)) = tokio::time::timeout(ANSWER_TIMEOUT, connect).await else {
        return vec![None; queues.len()];
    };
    let mut depths = Vec::with_capacity(queues.len());
    for queue in queues {
        // A failed passive declare closes the channel: one channel per queue.
        let depth = match tokio::time::timeout(ANSWER_TIMEOUT, conn.create_channel()).await {
            Ok(Ok(channel)) => {
                let options = QueueDeclareOptions { passive: true, ..Default::default() };
                let declared = channel.queue_declare(queue.as_str().into(), options, FieldTable::default());
                match tokio::time::timeout(ANSWER_TIMEOUT, declared).await {
                    Ok(Ok(q)) => Some(q.message_count()),
                    _ => None,
                }
            }
            _ => None,
        };
        depths.push(depth);
    }
    close_within("a depth read's connection", conn.close(200, "measured".into())).await;
    depths
}

/// Declare a plugin's queue and bind it to new patterns, or unbind old ones, on a short
/// connection of its own (bindings belong to the queue, not to a channel), closed whether the
/// change succeeded or not. Only binding declares the queue: a removal unbinds from the queue
/// of whatever type it is (the broker answers an unbind from a missing queue with success).
pub async fn rebind(
    config: &RabbitMqConfig,
    queue: &str,
    bind: &[String],
    unbind: &[String],
) -> Result<(), RebindError> {
    on_own_connection(config, "a rebind's connection", async |channel| {
        if !bind.is_empty() {
            declare_plugin_queue(channel, queue, config.queue_type).await?;
        }
        for pattern in bind {
            let (q, x) = (queue.into(), config.exchange.as_str().into());
            channel
                .queue_bind(q, x, pattern.as_str().into(), QueueBindOptions::default(), FieldTable::default())
                .await?;
        }
        for pattern in unbind {
            let (q, x) = (queue.into(), config.exchange.as_str().into());
            channel.queue_unbind(q, x, pattern.as_str().into(), FieldTable::default()).await?;
        }
        Ok(())
    })
    .await
}

/// Run `work` on a channel of a short connection of its own, closed whether the work
/// succeeded or not; `what` names the connection in the log if its close fails.
async fn on_own_connection<T, E: From<lapin::Error>>(
    config: &RabbitMqConfig,
    what: &str,
    work: impl AsyncFnOnce(&Channel) -> Result<T, E>,
) -> Result<T, E> {
    let conn = Connection::connect(config.url.expose(), ConnectionProperties::default()).await?;
    let done = async { work(&conn.create_channel().await?).await }.await;
    close_within(what, conn.close(200, "done".into())).await;
    done
}

/// The queue as the broker has it, `None` when it has no such queue.
async fn look_up_queue(channel: &Channel, queue: &str) -> Result<Option<lapin::Queue>, lapin::Error> {
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    match channel.queue_declare(queue.into(), passive, FieldTable::default()).await {
        Ok(found) => Ok(Some(found)),
        Err(error) if refused_with(&error, AMQPSoftError::NOTFOUND) => Ok(None),
        Err(error) => Err(error),
    }
}

/// How many consumers `queue` has, `None` when the broker has no such queue.
pub async fn consumer_count(config: &RabbitMqConfig, queue: &str) -> Result<Option<u32>, lapin::Error> {
    on_own_connection(config, "a queue look-up's connection", async |channel| {
        Ok(look_up_queue(channel, queue).await?.map(|q| q.consumer_count()))
    })
    .await
}

/// Why a plugin's queue could not be declared or (un)bound.
#[derive(Debug, thiserror::Error)]
pub enum RebindError {
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error(transparent)]
    Broker(#[from] lapin::Error),
}

/// What a queue deletion did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deleted {
    /// Deleted with this many messages in it.
    Messages(u32),
    /// Not deleted: the broker has no such queue.
    Missing,
    /// Not deleted: something consumes from it.
    InUse,
}

/// Delete a queue with the messages in it, on a short connection of its own, unless something
/// consumes from it: a plugin of that name on another router may.
pub async fn delete_unused_queue(config: &RabbitMqConfig, queue: &str) -> Result<Deleted, lapin::Error> {
    on_own_connection(config, "a queue deletion's connection", async |channel| {
        // The broker answers the deletion of a missing queue with success: ask first.
        if look_up_queue(channel, queue).await?.is_none() {
            return Ok(Deleted::Missing);
        }
        // `if_unused`: the broker refuses to delete a queue something consumes from.
        let options = QueueDeleteOptions { if_unused: true, ..Default::default() };
        match channel.queue_delete(queue.into(), options).await {
            Ok(messages) => Ok(Deleted::Messages(messages)),
            Err(error) if refused_with(&error, AMQPSoftError::PRECONDITIONFAILED) => Ok(Deleted::InUse),
            Err(error) => Err(error),
        }
    })
    .await
}

/// Publish every non-empty line of a JSONL file (one envelope per line) to the exchange,
/// routed by the event name it decodes to, with confirms; returns the count.
pub async fn publish_jsonl(config: &RabbitMqConfig, path: &std::path::Path) -> anyhow::Result<usize> {
    let text = tokio::fs::read_to_string(path).await?;
    let conn = Connection::connect(config.url.expose(), ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    declare_exchange(&channel, &config.exchange).await?;
    let mut confirms = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let transport = Transport { origin: "feed".into(), received_at: Millis::now(), ..Default::default() };
        let decoded = envelope::decode(line.as_bytes(), &transport)
            .map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), n + 1))?;
        let props = BasicProperties::default().with_delivery_mode(2).with_content_type("application/json".into());
        let confirm = channel
            .basic_publish(
                config.exchange.as_str().into(),
                decoded.event.name.as_str().into(),
                BasicPublishOptions::default(),
                line.as_bytes(),
                props,
            )
            .await?;
        confirms.push(confirm);
    }
    let count = confirms.len();
    for confirm in confirms {
        anyhow::ensure!(confirm.await?.is_ack(), "the broker refused an event");
    }
    close_within("the feed's connection", conn.close(200, "fed".into())).await;
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_broker_that_never_answers_gives_unknown_depths_instead_of_a_hang() {
        // Accepts connections and never speaks AMQP.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("amqp://guest:guest@{}/%2f", silent.local_addr().unwrap());
        let held = tokio::spawn(async move {
            let mut sockets = Vec::new();
            while let Ok((socket, _)) = silent.accept().await {
                sockets.push(socket);
            }
        });
        let queues = ["a".to_string(), "b".to_string()];
        let depths = tokio::time::timeout(ANSWER_TIMEOUT * 3, queue_depths(&url, &queues)).await;
        assert_eq!(depths.expect("queue_depths gave up on its own"), vec![None, None]);
        held.abort();
    }

    /// The loopback broker's address, from `AMQP_URL` as the integration tests take it.
    fn broker_address() -> String {
        let url = std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
        let uri: lapin::uri::AMQPUri = url.parse().expect("AMQP_URL is an AMQP URL");
        format!("{}:{}", uri.authority.host, uri.authority.port)
    }

    #[tokio::test]
    async fn a_close_on_a_link_that_stopped_carrying_bytes_gives_up_instead_of_hanging() {
        // A relay to the broker that, once frozen, holds both sockets open and forwards nothing.
        let relay = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("amqp://guest:guest@{}/%2f", relay.local_addr().unwrap());
        let frozen = CancellationToken::new();
        let freeze = frozen.clone();
        let broker = broker_address();
        let relayed = tokio::spawn(async move {
            let (mut client, _) = relay.accept().await.unwrap();
            let mut server = tokio::net::TcpStream::connect(broker).await.unwrap();
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                _ = freeze.cancelled() => std::future::pending::<()>().await,
            }
        });
        let conn = Connection::connect(&url, ConnectionProperties::default()).await.expect("connect through the relay");
        frozen.cancel();
        let closing = close_within("a frozen connection", conn.close(200, "test".into()));
        let closed = tokio::time::timeout(ANSWER_TIMEOUT * 3, closing).await;
        assert!(closed.is_ok(), "closing waited for an answer that never comes");
        relayed.abort();
    }
}
