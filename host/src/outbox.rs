//! The outbox relay: publishes committed outbox rows to the configured sink and deletes each
//! row only after the sink confirmed it (RabbitMQ publisher confirms, or the in-process bus
//! accepting it). Rows survive restarts; a row may be sent twice if the router dies between
//! the confirm and the delete, and consumers deduplicate it by its id.

use std::sync::Arc;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio_util::sync::CancellationToken;

use crate::commit::Writer;
use crate::config::{RedisConfig, RedisSinkMode, Secret};
use crate::db::{OutboxEntry, Readers};
use crate::envelope::{
    self, CAUSATION_HEADER, CORRELATION_HEADER, HeaderValue, KEY_HEADER, OCCURRED_AT_HEADER, SOURCE_HEADER, SinkFormat,
    Transport,
};
use crate::event::{Event, EventId, Header, Millis};
use crate::source::Received;
use crate::source::bus::Bus;
use crate::source::rabbitmq::field_table;
use crate::source::redis as redis_source;

/// Rows sent per round.
const BATCH: usize = 256;
/// Longest wait after a failed send.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(10);

/// Where published events go.
pub enum Sink {
    Bus(Arc<Bus>),
    RabbitMq(RabbitSink),
    Redis(RedisSink),
}

/// Publishes to Redis: PUBLISH on the event's channel, or XADD to a stream; a batch is
/// confirmed by Redis's reply to its pipeline.
pub struct RedisSink {
    client: ::redis::Client,
    mode: RedisSinkMode,
    channel_prefix: String,
    stream: String,
    maxlen: usize,
    format: SinkFormat,
    conn: Option<::redis::aio::MultiplexedConnection>,
}

impl RedisSink {
    pub fn new(config: &RedisConfig) -> Result<Self, ::redis::RedisError> {
        Ok(RedisSink {
            client: ::redis::Client::open(config.url.expose())?,
            mode: config.sink_mode,
            channel_prefix: config.pubsub.as_ref().map(|p| p.channel_prefix.clone()).unwrap_or_default(),
            stream: config.sink_stream.clone(),
            maxlen: config.streams.as_ref().map(|s| s.maxlen).unwrap_or(1_000_000),
            format: config.sink_format,
            conn: None,
        })
    }

    async fn send(&mut self, events: &[Event]) -> Result<(), String> {
        let mut pipe = ::redis::pipe();
        for event in events {
            let body = envelope::encode(event, self.format).body;
            match self.mode {
                RedisSinkMode::Pubsub => {
                    pipe.publish(format!("{}{}", self.channel_prefix, event.name), body).ignore();
                }
                RedisSinkMode::Stream => {
                    // Entries carry what the envelope cannot as fields, like AMQP headers.
                    let headers: Vec<(String, String)> =
                        transport_headers(event).into_iter().map(|(n, v)| (n, v.to_string())).collect();
                    let mut fields: Vec<(&str, &[u8])> = vec![
                        (redis_source::EVENT_FIELD, &body),
                        (redis_source::NAME_FIELD, event.name.as_bytes()),
                        (redis_source::ID_FIELD, event.id.0.as_bytes()),
                    ];
                    fields.extend(headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes())));
                    pipe.xadd_maxlen(&self.stream, ::redis::streams::StreamMaxlen::Approx(self.maxlen), "*", &fields)
                        .ignore();
                }
            }
        }
        let conn = match &mut self.conn {
            Some(conn) => conn,
            none => none.insert(self.client.get_multiplexed_async_connection().await.map_err(|e| e.to_string())?),
        };
        let sent: ::redis::RedisResult<()> = pipe.query_async(conn).await;
        sent.map_err(|e| {
            self.conn = None;
            e.to_string()
        })
    }
}

/// Publishes to the topic exchange with confirms, reconnecting when needed.
pub struct RabbitSink {
    url: Secret,
    exchange: String,
    format: SinkFormat,
    channel: Option<(Connection, Channel)>,
}

impl RabbitSink {
    pub fn new(url: Secret, exchange: String, format: SinkFormat) -> Self {
        RabbitSink { url, exchange, format, channel: None }
    }

    async fn channel(&mut self) -> Result<&Channel, lapin::Error> {
        let open = match self.channel.take() {
            Some((conn, channel)) if conn.status().connected() => (conn, channel),
            _ => {
                let conn = Connection::connect(self.url.expose(), ConnectionProperties::default()).await?;
                let channel = conn.create_channel().await?;
                channel.confirm_select(ConfirmSelectOptions::default()).await?;
                let options = ExchangeDeclareOptions { durable: true, ..Default::default() };
                channel
                    .exchange_declare(
                        self.exchange.as_str().into(),
                        ExchangeKind::Topic,
                        options,
                        FieldTable::default(),
                    )
                    .await?;
                (conn, channel)
            }
        };
        Ok(&self.channel.insert(open).1)
    }

    async fn send(&mut self, events: &[Event]) -> Result<(), String> {
        let format = self.format;
        let exchange = self.exchange.clone();
        let channel = self.channel().await.map_err(|e| e.to_string())?;
        let mut confirms = Vec::with_capacity(events.len());
        for event in events {
            let encoded = envelope::encode(event, format);
            let mut props = BasicProperties::default()
                .with_message_id(event.id.0.as_str().into())
                .with_content_type(encoded.content_type.into())
                .with_delivery_mode(2)
                .with_timestamp(event.occurred_at.0 / 1000)
                .with_app_id(event.source.as_str().into())
                .with_headers(field_table(&transport_headers(event)));
            if let Some(c) = &event.correlation_id {
                props = props.with_correlation_id(c.as_str().into());
            }
            let confirm = channel
                .basic_publish(
                    exchange.as_str().into(),
                    event.name.as_str().into(),
                    BasicPublishOptions::default(),
                    &encoded.body,
                    props,
                )
                .await
                .map_err(|e| e.to_string())?;
            confirms.push(confirm);
        }
        for confirm in confirms {
            if !confirm.await.map_err(|e| e.to_string())?.is_ack() {
                return Err("the broker refused an event (nack)".into());
            }
        }
        Ok(())
    }
}

/// Headers that carry what NestJS's `{pattern, data}` cannot: id, source, time, causation.
fn transport_headers(event: &Event) -> Vec<(String, HeaderValue)> {
    let mut headers: Vec<(String, HeaderValue)> =
        event.headers.iter().map(|h| (h.name.clone(), HeaderValue::Text(h.value.clone()))).collect();
    headers.push((SOURCE_HEADER.into(), HeaderValue::Text(event.source.clone())));
    headers.push((OCCURRED_AT_HEADER.into(), HeaderValue::time(event.occurred_at)));
    if let Some(c) = &event.correlation_id {
        headers.push((CORRELATION_HEADER.into(), HeaderValue::Text(c.clone())));
    }
    if let Some(c) = &event.causation_id {
        headers.push((CAUSATION_HEADER.into(), HeaderValue::Text(c.clone())));
    }
    if let Some(k) = &event.key {
        headers.push((KEY_HEADER.into(), HeaderValue::Text(k.clone())));
    }
    headers
}

impl Sink {
    /// Drop the broker connection, so the next send opens a new one: after a send that got
    /// no answer in time, the old one cannot be trusted.
    fn reconnect(&mut self) {
        match self {
            Sink::RabbitMq(sink) => sink.channel = None,
            Sink::Redis(sink) => sink.conn = None,
            Sink::Bus(_) => {}
        }
    }

    async fn send(&mut self, events: Vec<Event>) -> Result<(), String> {
        match self {
            Sink::RabbitMq(sink) => sink.send(&events).await,
            Sink::Redis(sink) => sink.send(&events).await,
            Sink::Bus(bus) => {
                for event in events {
                    let body = envelope::encode(&event, SinkFormat::Nestjs).body;
                    let transport = Transport {
                        routing_key: event.name.clone(),
                        origin: event.source.clone(),
                        message_id: Some(event.id.0.clone()),
                        received_at: Millis::now(),
                        headers: transport_headers(&event),
                        ..Default::default()
                    };
                    bus.publish(event, Received { body, transport }).await;
                }
                Ok(())
            }
        }
    }
}

/// The event an outbox row publishes.
fn event_of(row: OutboxEntry) -> Event {
    let headers: Vec<(String, String)> = serde_json::from_str(&row.headers).unwrap_or_default();
    Event {
        id: EventId(row.id),
        name: row.name,
        source: row.source,
        key: row.key,
        correlation_id: row.correlation_id,
        causation_id: row.causation_id,
        occurred_at: row.created_at,
        content_type: envelope::JSON.into(),
        headers: headers.into_iter().map(|(n, v)| Header::new(n, v)).collect(),
        payload: row.payload,
    }
}

/// Relay until `shutdown`. A batch the sink does not confirm within `publish_timeout` is sent
/// again on a new connection.
pub async fn relay(
    readers: Readers,
    writer: Writer,
    mut sink: Sink,
    publish_timeout: Duration,
    shutdown: CancellationToken,
) {
    let mut delay = Duration::from_millis(100);
    loop {
        let due = match readers.due_outbox(Millis::now(), BATCH) {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the outbox");
                Vec::new()
            }
        };
        if due.is_empty() {
            let wait = match readers.next_outbox_due() {
                Ok(Some(at)) => Duration::from_millis(at.0.saturating_sub(Millis::now().0).max(1)),
                _ => Duration::from_secs(1),
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = writer.outbox_ready.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
            continue;
        }
        let seqs: Vec<i64> = due.iter().map(|r| r.seq).collect();
        let events: Vec<Event> = due.into_iter().map(event_of).collect();
        let sent = tokio::select! {
            _ = shutdown.cancelled() => return,
            sent = tokio::time::timeout(publish_timeout, sink.send(events)) => sent,
        };
        let sent = sent.unwrap_or_else(|_| {
            sink.reconnect();
            Err(format!("no confirm from the broker within {} ms", publish_timeout.as_millis()))
        });
        match sent {
            Ok(()) => {
                delay = Duration::from_millis(100);
                match writer.outbox_sent(seqs).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "could not delete sent outbox rows; they will be sent again")
                    }
                    Err(_) => return,
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?delay, "outbox relay could not publish; rows are kept");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(MAX_RETRY_DELAY);
            }
        }
    }
}
