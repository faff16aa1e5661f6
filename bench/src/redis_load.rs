//! The Redis side of the benchmarks: Streams (the replica flow, next to a bare consumer-group
//! reader) and pub/sub (a drain, next to a bare subscriber). Pub/sub is at most once: what a
//! subscriber cannot keep up with, Redis drops with the subscriber's connection, so its figures
//! are what was delivered, and how much of it.

use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use futures::StreamExt;
use redis::AsyncCommands;
use redis::streams::{StreamReadOptions, StreamReadReply};

use crate::broker::Body;
use crate::routed::{settled_count, start_router};
use crate::{Args, plugin, unique};

/// How long without progress ends a pub/sub run.
const STALL: Duration = Duration::from_secs(3);

/// Events delivered by pub/sub, and at what rate.
pub struct Delivered {
    pub rate: f64,
    pub delivered: u64,
}

async fn connection(args: &Args) -> anyhow::Result<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(args.redis.as_str())?;
    client.get_multiplexed_async_connection().await.context("connecting to Redis")
}

/// `XADD` events `0..n` to `stream`, in pipelines of 1,000.
async fn fill_stream(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    n: usize,
    body: &Body,
) -> anyhow::Result<()> {
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let mut pipe = redis::pipe();
        for &i in chunk {
            let (_, bytes) = body(i);
            pipe.cmd("XADD").arg(stream).arg("*").arg("id").arg(format!("s-{i}")).arg("event").arg(bytes).ignore();
        }
        pipe.query_async::<()>(conn).await?;
    }
    Ok(())
}

/// Baseline: a bare consumer-group reader, 500 entries a call, each batch `XACK`ed.
pub async fn streams_bare(args: &Args, n: usize, body: &Body) -> anyhow::Result<f64> {
    let mut conn = connection(args).await?;
    let stream = unique("bench-stream");
    fill_stream(&mut conn, &stream, n, body).await?;
    let _: () = conn.xgroup_create(&stream, "bare", "0").await?;
    let options = StreamReadOptions::default().group("bare", "bench").count(500);
    let started = Instant::now();
    let mut taken = 0;
    while taken < n {
        let reply: StreamReadReply = conn.xread_options(&[&stream], &[">"], &options).await?;
        let ids: Vec<String> = reply.keys.into_iter().flat_map(|k| k.ids).map(|e| e.id).collect();
        ensure!(!ids.is_empty(), "the stream ran dry after {taken} of {n} entries");
        taken += ids.len();
        let _: u64 = conn.xack(&stream, "bare", &ids).await?;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    let _: () = conn.del(&stream).await?;
    Ok(rate)
}

/// switchyard reading the stream through its consumer group into `file`'s plugin `name`.
pub async fn streams_routed(args: &Args, name: &str, file: &str, n: usize, body: &Body) -> anyhow::Result<f64> {
    let mut conn = connection(args).await?;
    let stream = unique("bench-stream");
    fill_stream(&mut conn, &stream, n, body).await?;
    let dir = tempfile::tempdir()?;
    let text = format!(
        "[router]\ndata_dir = \"{}\"\n[redis]\nurl = \"{}\"\n[redis.streams]\nstreams = [\"{stream}\"]\n\
         group_prefix = \"{}.\"\nbatch = {}\n[[plugin]]\nname = \"{name}\"\npath = \"{}\"\nconcurrency = {}\n",
        dir.path().display(),
        args.redis,
        unique("g"),
        args.prefetch,
        plugin(file)?.display(),
        args.concurrency,
    );
    let router = start_router(&text, dir.path()).await?;
    // The router starts draining before its start returns: what it settled by then is not
    // counted.
    let started = Instant::now();
    let early = settled_count(&router, name)? as usize;
    while settled_count(&router, name)? < n as u64 || router.in_flight() > 0 {
        ensure!(started.elapsed() < Duration::from_secs(1800), "switchyard did not drain the stream in 30 minutes");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let rate = crate::cpu::rate(n.saturating_sub(early), started);
    router.stop().await;
    let _: () = conn.del(&stream).await?;
    Ok(rate)
}

/// `PUBLISH` events `0..n` on `<prefix><name>`, in pipelines of 1,000.
async fn publish_all(args: &Args, prefix: &str, n: usize, body: &Body) -> anyhow::Result<()> {
    let mut conn = connection(args).await?;
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let mut pipe = redis::pipe();
        for &i in chunk {
            let (name, bytes) = body(i);
            pipe.cmd("PUBLISH").arg(format!("{prefix}{name}")).arg(bytes).ignore();
        }
        pipe.query_async::<()>(&mut conn).await?;
    }
    Ok(())
}

/// Wait until `count` reaches `n` or stops moving; the rate is over the time it moved.
async fn delivered(n: u64, started: Instant, count: impl Fn() -> anyhow::Result<u64>) -> anyhow::Result<Delivered> {
    let (mut last, mut moved_at) = (0, started);
    loop {
        let now = count()?;
        if now != last {
            (last, moved_at) = (now, Instant::now());
        }
        if now >= n || moved_at.elapsed() > STALL {
            let secs = moved_at.duration_since(started).as_secs_f64().max(1e-3);
            return Ok(Delivered { rate: now as f64 / secs, delivered: now });
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Baseline: a bare subscriber counting what arrives.
pub async fn pubsub_bare(args: &Args, n: usize, body: &Body) -> anyhow::Result<Delivered> {
    let prefix = format!("{}:", unique("bench"));
    let client = redis::Client::open(args.redis.as_str())?;
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.psubscribe(format!("{prefix}*")).await?;
    let count = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = count.clone();
    let task = tokio::spawn(async move {
        let mut messages = pubsub.on_message();
        while messages.next().await.is_some() {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    });
    let started = Instant::now();
    publish_all(args, &prefix, n, body).await?;
    let result = delivered(n as u64, started, || Ok(count.load(std::sync::atomic::Ordering::Relaxed))).await;
    task.abort();
    result
}

/// switchyard subscribed with the no-op plugin. Its buffer holds the whole burst: the router
/// drains it after the publisher stops, and this measures that drain, not what a smaller
/// buffer would drop.
pub async fn pubsub_routed(args: &Args, n: usize, body: &Body) -> anyhow::Result<Delivered> {
    let prefix = format!("{}:", unique("bench"));
    let dir = tempfile::tempdir()?;
    let text = format!(
        "[router]\ndata_dir = \"{}\"\n[redis]\nurl = \"{}\"\n[redis.pubsub]\nchannel_prefix = \"{prefix}\"\nbuffer = {n}\n\
         [[plugin]]\nname = \"noop\"\npath = \"{}\"\nconcurrency = {}\n",
        dir.path().display(),
        args.redis,
        plugin("noop.wasm")?.display(),
        args.concurrency,
    );
    let router = start_router(&text, dir.path()).await?;
    let started = Instant::now();
    publish_all(args, &prefix, n, body).await?;
    let result = delivered(n as u64, started, || settled_count(&router, "noop")).await;
    router.stop().await;
    result
}
