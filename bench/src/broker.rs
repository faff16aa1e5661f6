//! The broker side of the benchmarks: filling a queue, the bare lapin consumers of the
//! baselines (one that only acks, one that commits each message to SQLite first), and a
//! publisher that offers events at a fixed rate.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use futures::{FutureExt as _, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind, PublisherConfirm};
use rusqlite::Connection as Sqlite;
use switchyard::config::QueueType;
use switchyard::event::Millis;
use switchyard::source::rabbitmq::queue_arguments;

use crate::cpu::{CpuClock, Drained};
use crate::routed::{self, Latencies, Paced, Split};
use crate::{Args, unique};

/// A message: routing key (the event name) and body.
pub type Message = (String, Vec<u8>);

/// The `i`th message of a load.
pub type Body = dyn Fn(usize) -> Message;

pub async fn connect(url: &str) -> anyhow::Result<(Connection, Channel)> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await.context("connecting to RabbitMQ")?;
    let channel = conn.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok((conn, channel))
}

/// Declare the topic `exchange`.
pub async fn exchange(channel: &Channel, exchange: &str) -> anyhow::Result<()> {
    let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
    channel.exchange_declare(exchange.into(), ExchangeKind::Topic, durable, FieldTable::default()).await?;
    Ok(())
}

/// Declare a durable `queue` of `queue_type`, with the router's arguments for it, bound to
/// `exchange` for each pattern.
pub async fn queue(
    channel: &Channel,
    exchange: &str,
    queue: &str,
    patterns: &[&str],
    queue_type: QueueType,
) -> anyhow::Result<()> {
    self::exchange(channel, exchange).await?;
    channel.queue_declare(queue.into(), QueueDeclareOptions::durable(), queue_arguments(queue_type)).await?;
    for pattern in patterns {
        channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                (*pattern).into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

/// Publisher confirms, awaited a thousand at a time so that publishing never waits on each.
struct Confirms(Vec<PublisherConfirm>);

impl Confirms {
    fn new() -> Self {
        Confirms(Vec::with_capacity(1000))
    }

    async fn push(&mut self, confirm: PublisherConfirm) -> anyhow::Result<()> {
        self.0.push(confirm);
        if self.0.len() == 1000 {
            self.wait().await?;
        }
        Ok(())
    }

    /// Wait for every confirm pushed so far.
    async fn wait(&mut self) -> anyhow::Result<()> {
        for confirm in self.0.drain(..) {
            ensure!(confirm.await?.is_ack(), "the broker refused a message");
        }
        Ok(())
    }
}

/// Publish `message` to `exchange`, persistent, with message id `id`.
async fn send(channel: &Channel, exchange: &str, id: &str, message: &Message) -> anyhow::Result<PublisherConfirm> {
    let (name, bytes) = message;
    let props = BasicProperties::default().with_delivery_mode(2).with_message_id(id.into());
    Ok(channel
        .basic_publish(exchange.into(), name.as_str().into(), BasicPublishOptions::default(), bytes, props)
        .await?)
}

/// Publish messages `range` of `body` to `exchange`, persistent, with message ids
/// `<id_prefix>-<i>`, and wait for every confirm.
pub async fn publish(
    channel: &Channel,
    exchange: &str,
    id_prefix: &str,
    range: std::ops::Range<usize>,
    body: &Body,
) -> anyhow::Result<()> {
    let mut confirms = Confirms::new();
    for i in range {
        confirms.push(send(channel, exchange, &format!("{id_prefix}-{i}"), &body(i)).await?).await?;
    }
    confirms.wait().await
}

/// Offer events `0..n` at `rate` per second to `exchange`, with message ids `paced-<i>`.
///
/// The publisher has a thread, a runtime and a connection of its own, as a producer in another
/// process would, so that it never waits for its turn behind the tasks of the consumer it
/// measures. The messages are made before the first is due, and confirms are awaited beside
/// the publishing, so that neither holds the next publishes back. What is left to hold them
/// back is the machine (the cores it shares) and the broker's flow control:
/// [`Offered::behind`] says how far behind its schedule the publisher fell.
pub async fn paced(amqp: &str, exchange: &str, n: usize, rate: f64, body: &Body) -> anyhow::Result<Offered> {
    let messages: Vec<Message> = (0..n).map(body).collect();
    let (amqp, exchange) = (amqp.to_string(), exchange.to_string());
    publisher()?.spawn(async move { publish_paced(&amqp, &exchange, &messages, rate).await }).await?
}

/// The paced publisher's runtime: one worker thread, kept (with the connection in
/// [`publish_paced`]) for the whole run, so that their CPU shows in each load's thread rows.
fn publisher() -> anyhow::Result<&'static tokio::runtime::Runtime> {
    static RUNTIME: std::sync::OnceLock<std::io::Result<tokio::runtime::Runtime>> = std::sync::OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("paced-publisher")
                .enable_all()
                .build()
        })
        .as_ref()
        .map_err(|e| anyhow::anyhow!("starting the publisher's runtime: {e}"))
}

/// [`paced`]'s publishing, on the publisher's runtime and connection.
async fn publish_paced(amqp: &str, exchange: &str, messages: &[Message], rate: f64) -> anyhow::Result<Offered> {
    static CONNECTION: tokio::sync::OnceCell<Connection> = tokio::sync::OnceCell::const_new();
    let conn = CONNECTION
        .get_or_try_init(|| async { Connection::connect(amqp, ConnectionProperties::default()).await })
        .await
        .context("connecting the publisher to RabbitMQ")?;
    let channel = conn.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    let (confirms, mut pending) = tokio::sync::mpsc::unbounded_channel::<PublisherConfirm>();
    let confirmed = tokio::spawn(async move {
        while let Some(confirm) = pending.recv().await {
            ensure!(confirm.await?.is_ack(), "the broker refused a message");
        }
        anyhow::Ok(())
    });
    let mut sent_at = Vec::with_capacity(messages.len());
    let mut behind = Vec::with_capacity(messages.len());
    let started = Instant::now();
    for (i, message) in messages.iter().enumerate() {
        let due = started + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        behind.push(due.elapsed().as_millis() as u64);
        sent_at.push(Millis::now());
        if confirms.send(send(&channel, exchange, &routed::message_id(i), message).await?).is_err() {
            // The confirms' task stopped on an error, which it returns below.
            break;
        }
    }
    drop(confirms);
    confirmed.await??;
    let _ = channel.close(200, "published".into()).await;
    Ok(Offered { sent_at, behind: Latencies::sorted(behind) })
}

/// A paced load as it was published.
pub struct Offered {
    /// When each message was published (epoch ms), by index.
    pub sent_at: Vec<Millis>,
    /// How far each publish was behind its schedule (ms; the runtime's timer rounds up to
    /// the next). A load that falls behind sends what it owes in a burst.
    pub behind: Latencies,
}

/// The bare lapin consumer of the baselines, on an exchange and a queue of its own: the same
/// prefetch as the router, manual acks with `multiple` every 100.
struct Bare {
    conn: Connection,
    /// Publishes to `exchange`, with confirms.
    channel: Channel,
    exchange: String,
    queue: String,
}

impl Bare {
    /// Declare its exchange and its queue, bound with `pattern`.
    async fn new(args: &Args, pattern: &str) -> anyhow::Result<Bare> {
        let (conn, channel) = connect(&args.amqp).await?;
        let (exchange, queue) = (unique("bench"), unique("bench-bare"));
        self::queue(&channel, &exchange, &queue, &[pattern], args.queue_type).await?;
        Ok(Bare { conn, channel, exchange, queue })
    }

    async fn consume(&self, args: &Args) -> anyhow::Result<lapin::Consumer> {
        let channel = self.conn.create_channel().await?;
        channel.basic_qos(args.prefetch, BasicQosOptions::default()).await?;
        Ok(channel
            .basic_consume(self.queue.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await?)
    }

    /// Settle `delivery`, the `taken`th of `total`: an ack with `multiple` every 100 and at the last.
    async fn took(delivery: &Delivery, taken: usize, total: usize) -> anyhow::Result<()> {
        if taken.is_multiple_of(100) || taken == total {
            delivery.acker.ack(BasicAckOptions { multiple: true }).await?;
        }
        Ok(())
    }

    async fn delete(self) -> anyhow::Result<()> {
        self.channel.queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default()).await?;
        self.channel.exchange_delete(self.exchange.as_str().into(), Default::default()).await?;
        let _ = self.conn.close(200, "done".into()).await;
        Ok(())
    }
}

/// Baseline of the latency scenario: publish → delivered to the bare consumer at `rate` for
/// `args.paced_secs`: what the broker adds by itself.
pub async fn latency_bare(args: &Args, rate: f64, body: &Body) -> anyhow::Result<Paced> {
    paced_to_bare(args, rate, body, |mut consumer, n| async move {
        let mut received = HashMap::with_capacity(n);
        while received.len() < n {
            let delivery = consumer.next().await.context("the consumer ended")??;
            received.insert(paced_id(&delivery)?, Millis::now());
            Bare::took(&delivery, received.len(), n).await?;
        }
        Ok(Taken { received, committed: None })
    })
    .await
}

/// Second baseline of the latency scenario: publish → committed by the bare consumer at `rate`
/// for `args.paced_secs`, where the consumer commits each message to SQLite before its ack, as
/// the router does: WAL, `synchronous = FULL`, one transaction for all the deliveries at hand
/// (group commit), then one ack with `multiple`. It writes the rows the `stamp` plugin's
/// events cost the router (a document and a processed-marker, keyed by the message id) and
/// nothing else: no routing, lanes or Wasm. So it is the floor that a durable consumer of
/// these events on this disk and broker does not go under.
pub async fn latency_durable(args: &Args, rate: f64, body: &Body) -> anyhow::Result<Paced> {
    let dir = tempfile::tempdir()?;
    let mut db = durable_store(&dir.path().join("baseline.db"))?;
    paced_to_bare(args, rate, body, |mut consumer, n| async move {
        let (mut received, mut committed) = (HashMap::with_capacity(n), HashMap::with_capacity(n));
        while committed.len() < n {
            let mut batch = vec![consumer.next().await.context("the consumer ended")??];
            while let Some(next) = consumer.next().now_or_never() {
                batch.push(next.context("the consumer ended")??);
            }
            // All but the first were already waiting: the batch was received at once.
            let taken_at = Millis::now();
            let rows =
                batch.iter().map(|d| Ok((paced_id(d)?, d.data.as_slice()))).collect::<anyhow::Result<Vec<_>>>()?;
            received.extend(rows.iter().map(|(id, _)| (id.clone(), taken_at)));
            tokio::task::block_in_place(|| commit_rows(&mut db, &rows))?;
            let now = Millis::now();
            committed.extend(rows.into_iter().map(|(id, _)| (id, now)));
            let last = batch.last().context("a batch has a delivery")?;
            last.acker.ack(BasicAckOptions { multiple: true }).await?;
        }
        Ok(Taken { received, committed: Some(committed) })
    })
    .await
}

/// When a baseline consumer took each paced message, by message id.
struct Taken {
    /// When the consumer received it from the client library.
    received: HashMap<String, Millis>,
    /// When its commit was done, for a consumer that commits.
    committed: Option<HashMap<String, Millis>>,
}

/// Offer `args.paced_secs` of `rate` to a bare consumer of its own, which `consume` runs on
/// the consumer and the number of messages and which returns when it took each; with the CPU
/// per event from the first publish to the last message taken.
async fn paced_to_bare<C, F>(args: &Args, rate: f64, body: &Body, consume: C) -> anyhow::Result<Paced>
where
    C: FnOnce(lapin::Consumer, usize) -> F,
    F: Future<Output = anyhow::Result<Taken>> + Send + 'static,
{
    let bare = Bare::new(args, "#").await?;
    let n = (rate * args.paced_secs as f64) as usize;
    let taken = tokio::spawn(consume(bare.consume(args).await?, n));
    let (started, cpu) = (Instant::now(), CpuClock::now());
    let offered = paced(&args.amqp, &bare.exchange, n, rate, body).await?;
    let taken = taken.await??;
    let cost = Drained::of(n, started, &cpu);
    bare.delete().await?;
    let (latencies, split) = match &taken.committed {
        Some(committed) => (
            Latencies::of(&offered.sent_at, committed)?,
            Some(Split::of(&offered.sent_at, &taken.received, committed)?),
        ),
        None => (Latencies::of(&offered.sent_at, &taken.received)?, None),
    };
    Ok(Paced { latencies, split, behind: offered.behind, cost })
}

/// The id of a paced message (`paced-<i>`).
fn paced_id(delivery: &Delivery) -> anyhow::Result<String> {
    let id = delivery.properties.message_id().as_ref().context("a paced message has an id")?;
    Ok(id.as_str().to_string())
}

/// The durable baseline's store: documents and processed-markers by message id, set up as the
/// router's are.
fn durable_store(path: &std::path::Path) -> anyhow::Result<Sqlite> {
    let conn = Sqlite::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.execute_batch(
        "CREATE TABLE documents (key TEXT PRIMARY KEY, body BLOB NOT NULL) WITHOUT ROWID;
         CREATE TABLE processed (id TEXT PRIMARY KEY, at INTEGER NOT NULL) WITHOUT ROWID;",
    )?;
    Ok(conn)
}

/// Store `rows` (id, body), a document and a marker each, in one transaction.
fn commit_rows(conn: &mut Sqlite, rows: &[(String, &[u8])]) -> anyhow::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut document = tx.prepare_cached("INSERT INTO documents (key, body) VALUES (?1, ?2)")?;
        let mut marker = tx.prepare_cached("INSERT INTO processed (id, at) VALUES (?1, ?2)")?;
        let now = Millis::now();
        for (id, body) in rows {
            document.execute((id, body))?;
            marker.execute((id, now))?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// Baseline of the drains: the bare consumer drains `args.events` queued first.
pub async fn drain_bare(args: &Args, body: &Body) -> anyhow::Result<Drained> {
    let bare = Bare::new(args, "bench.#").await?;
    publish(&bare.channel, &bare.exchange, "m", 0..args.events, body).await?;
    let (started, cpu) = (Instant::now(), CpuClock::now());
    let mut consumer = bare.consume(args).await?;
    for taken in 1..=args.events {
        let delivery = consumer.next().await.context("the consumer ended")??;
        Bare::took(&delivery, taken, args.events).await?;
    }
    let drained = Drained::of(args.events, started, &cpu);
    bare.delete().await?;
    Ok(drained)
}
