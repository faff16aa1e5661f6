//! `switchyard-bench`: each scenario runs a baseline and switchyard on the same broker, the same
//! messages and the same prefetch, interleaved over several rounds, and prints the median and
//! the spread of each, with their ratio. Absolute figures drift on a shared machine; the
//! ratio measured side by side is the figure to compare.
//!
//! Full run (the figures in BENCHMARKS.md):
//!   cargo run --release -p switchyard-bench
//! Smoke run (CI: small N, checks that every scenario still runs and counts right):
//!   cargo run -p switchyard-bench -- --smoke

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use clap::Parser;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use switchyard::config::{Config, PluginName};
use switchyard::db::Readers;
use switchyard::event::{Event, EventId, Millis};
use switchyard::router::Router;
use switchyard::runtime::{Instance, Overrides, Runtime};

#[derive(Parser)]
#[command(about = "switchyard benchmarks, each against its baseline in the same run")]
struct Args {
    /// Small N and one round: checks that the harness runs, not how fast.
    #[arg(long)]
    smoke: bool,
    /// Events per drain round.
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    /// Rounds per scenario (interleaved baseline / switchyard).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Consumer prefetch, the same for the baseline and switchyard.
    #[arg(long, default_value_t = 500)]
    prefetch: u16,
    /// RabbitMQ URL.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp: String,
}

/// One measured figure per round; the table shows the median and the spread.
#[derive(Default)]
struct Samples(Vec<f64>);

impl Samples {
    fn median(&self) -> f64 {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    }

    fn spread(&self) -> String {
        let min = self.0.iter().copied().fold(f64::INFINITY, f64::min);
        let max = self.0.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!("{min:.0}–{max:.0}")
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("bench/ has a parent").to_path_buf()
}

fn plugin(file: &str) -> anyhow::Result<PathBuf> {
    let path = repo().join("dist/plugins").join(file);
    ensure!(path.is_file(), "{} is missing: run ./scripts/build-plugins first", path.display());
    Ok(path)
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.smoke {
        args.events = 2_000;
        args.rounds = 1;
    }
    println!(
        "switchyard-bench: {} events per drain round, {} rounds, prefetch {}",
        args.events, args.rounds, args.prefetch
    );
    println!("| scenario | baseline (median, spread) | switchyard (median, spread) | ratio |");
    println!("| --- | --- | --- | --- |");

    let (mut bare, mut routed) = (Samples::default(), Samples::default());
    for _ in 0..args.rounds {
        bare.0.push(drain_bare(&args).await?);
        routed.0.push(drain_switchyard(&args, "noop", "noop.wasm", &noop_body).await?);
    }
    row("drain, no-op plugin (events/s)", &bare, &routed);

    let mut replica = Samples::default();
    for _ in 0..args.rounds {
        replica.0.push(drain_switchyard(&args, "user-replica", "user_replica.wasm", &user_updated).await?);
    }
    row("replica flow, 10,000 users (events/s)", &bare, &replica);

    let calls = if args.smoke { 2_000 } else { 100_000 };
    let (reuse, fresh) = wasm_overhead(calls).await?;
    println!("| Wasm call, reused instance (µs/event) | – | {:.2} | – |", reuse);
    println!("| Wasm call, fresh instance (µs/event) | – | {:.2} | – |", fresh);
    Ok(())
}

fn row(name: &str, baseline: &Samples, switchyard: &Samples) {
    println!(
        "| {name} | {:.0} ({}) | {:.0} ({}) | {:.2} |",
        baseline.median(),
        baseline.spread(),
        switchyard.median(),
        switchyard.spread(),
        switchyard.median() / baseline.median()
    );
}

/// A small JSON event for the no-op plugin, about 210 bytes like the measured baseline.
fn noop_body(i: usize) -> (String, Vec<u8>) {
    let body = serde_json::json!({
        "pattern": "bench.event",
        "data": { "n": i, "user_id": format!("u{}", i % 10_000), "padding": "x".repeat(120) },
    });
    ("bench.event".into(), body.to_string().into_bytes())
}

/// `user.updated` over 10,000 distinct users.
fn user_updated(i: usize) -> (String, Vec<u8>) {
    let id = format!("u{}", i % 10_000);
    let body = serde_json::json!({
        "pattern": "user.updated",
        "data": { "user": { "user_id": id, "name": format!("User {i}"), "email": format!("{id}@example.com") } },
    });
    ("user.updated".into(), body.to_string().into_bytes())
}

async fn connect(url: &str) -> anyhow::Result<(Connection, Channel)> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await.context("connecting to RabbitMQ")?;
    let channel = conn.create_channel().await?;
    Ok((conn, channel))
}

/// Declare `queue` bound to `exchange` for `pattern` and fill it with `n` persistent messages.
async fn fill(
    channel: &Channel,
    exchange: &str,
    queue: &str,
    pattern: &str,
    n: usize,
    body: &dyn Fn(usize) -> (String, Vec<u8>),
) -> anyhow::Result<()> {
    let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
    channel.exchange_declare(exchange.into(), ExchangeKind::Topic, durable, FieldTable::default()).await?;
    channel.queue_declare(queue.into(), QueueDeclareOptions::durable(), FieldTable::default()).await?;
    channel
        .queue_bind(queue.into(), exchange.into(), pattern.into(), QueueBindOptions::default(), FieldTable::default())
        .await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut confirms = Vec::with_capacity(1000);
    for i in 0..n {
        let (name, bytes) = body(i);
        let props = BasicProperties::default().with_delivery_mode(2).with_message_id(format!("m-{i}").as_str().into());
        let confirm = channel
            .basic_publish(exchange.into(), name.as_str().into(), BasicPublishOptions::default(), &bytes, props)
            .await?;
        confirms.push(confirm);
        if confirms.len() == 1000 {
            for c in confirms.drain(..) {
                ensure!(c.await?.is_ack(), "the broker refused a message");
            }
        }
    }
    for c in confirms {
        ensure!(c.await?.is_ack(), "the broker refused a message");
    }
    Ok(())
}

/// Baseline: a bare lapin consumer, manual acks with `multiple` every 100, same prefetch.
async fn drain_bare(args: &Args) -> anyhow::Result<f64> {
    let (conn, channel) = connect(&args.amqp).await?;
    let (exchange, queue) = (unique("bench"), unique("bench-bare"));
    fill(&channel, &exchange, &queue, "bench.#", args.events, &noop_body).await?;
    let consumer_channel = conn.create_channel().await?;
    consumer_channel.basic_qos(args.prefetch, BasicQosOptions::default()).await?;
    let started = Instant::now();
    let mut consumer = consumer_channel
        .basic_consume(queue.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await?;
    let mut taken = 0;
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery?;
        taken += 1;
        if taken % 100 == 0 || taken == args.events {
            delivery.acker.ack(BasicAckOptions { multiple: true }).await?;
        }
        if taken == args.events {
            break;
        }
    }
    let rate = args.events as f64 / started.elapsed().as_secs_f64();
    channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await?;
    channel.exchange_delete(exchange.as_str().into(), Default::default()).await?;
    let _ = conn.close(200, "done".into()).await;
    Ok(rate)
}

/// switchyard: the plugin's queue filled first, then the router started and timed until every
/// event is committed and acknowledged.
async fn drain_switchyard(
    args: &Args,
    name: &str,
    file: &str,
    body: &dyn Fn(usize) -> (String, Vec<u8>),
) -> anyhow::Result<f64> {
    let (conn, channel) = connect(&args.amqp).await?;
    let exchange = unique("bench");
    let prefix = format!("{}.", unique("q"));
    let queue = format!("{prefix}{name}");
    let pattern = if name == "noop" { "bench.#" } else { "user.updated" };
    fill(&channel, &exchange, &queue, pattern, args.events, body).await?;
    let dir = tempfile::tempdir()?;
    let text = format!(
        "[router]\ndata_dir = \"{}\"\nlog = \"warn\"\n[rabbitmq]\nurl = \"{}\"\nexchange = \"{exchange}\"\nqueue_prefix = \"{prefix}\"\nprefetch = {}\n[[plugin]]\nname = \"{name}\"\npath = \"{}\"\n",
        dir.path().display(),
        args.amqp,
        args.prefetch,
        plugin(file)?.display()
    );
    let config = Config::from_toml(&text, &dir.path().join("router.toml"), &|_| None)?;
    // Compiling the plugin is start-up, not draining: the clock starts once the router runs.
    let router = Router::start(config).await?;
    let started = Instant::now();
    let slot = router.plugins.get(name).context("the plugin runs")?.slot().clone();
    loop {
        let c = slot.counters.snapshot();
        if c.succeeded + c.duplicates + c.dead_lettered >= args.events as u64 && router.in_flight() == 0 {
            break;
        }
        ensure!(started.elapsed() < Duration::from_secs(1800), "switchyard did not drain within 30 minutes");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = args.events as f64 / started.elapsed().as_secs_f64();
    let counters = slot.counters.snapshot();
    ensure!(counters.succeeded == args.events as u64, "every event committed once: {counters:?}");
    router.stop().await;
    channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await?;
    channel.exchange_delete(exchange.as_str().into(), Default::default()).await?;
    let _ = conn.close(200, "done".into()).await;
    Ok(rate)
}

/// The runtime alone: µs per event for a call on a reused instance, and for a fresh instance
/// plus the call, with the no-op plugin.
async fn wasm_overhead(calls: usize) -> anyhow::Result<(f64, f64)> {
    let dir = tempfile::tempdir()?;
    let readers = Readers::new(dir.path());
    switchyard::commit::Writer::start(dir.path(), &Default::default())?;
    let runtime = Runtime::new(readers)?;
    let bytes = std::fs::read(plugin("noop.wasm")?)?;
    let loaded = Arc::new(
        runtime.load(&PluginName::parse("noop").map_err(anyhow::Error::msg)?, &bytes, Overrides::defaults()).await?,
    );
    let event = Event {
        id: EventId("bench-1".into()),
        name: "bench.event".into(),
        source: "bench".into(),
        key: None,
        correlation_id: None,
        causation_id: None,
        occurred_at: Millis::now(),
        content_type: "application/json".into(),
        headers: Vec::new(),
        payload: noop_body(1).1,
    };
    let mut instance = Instance::new(loaded.clone()).await?;
    let started = Instant::now();
    for _ in 0..calls {
        instance.handle(&event, None, 1).await?;
    }
    let reuse = started.elapsed().as_secs_f64() * 1e6 / calls as f64;
    let fresh_calls = calls / 10;
    let started = Instant::now();
    for _ in 0..fresh_calls {
        let mut instance = Instance::new(loaded.clone()).await?;
        instance.handle(&event, None, 1).await?;
    }
    let fresh = started.elapsed().as_secs_f64() * 1e6 / fresh_calls as f64;
    Ok((reuse, fresh))
}
