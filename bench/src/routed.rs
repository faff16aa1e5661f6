//! switchyard under the benchmarks: a router started on the bench's own RabbitMQ names, and
//! what the scenarios read back from it (counters, commit times).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use lapin::options::QueueDeleteOptions;
use lapin::{Channel, Connection};
use switchyard::config::{Config, QueueType, Secret};
use switchyard::event::Millis;
use switchyard::router::Router;
use switchyard::telemetry::CountersSnapshot;

use crate::broker::{self, Body};
use crate::cpu::Drained;
use crate::{Args, plugin, unique};

/// The admin token of the benchmark's routers (hot swaps go through the admin API).
const TOKEN: &str = "bench-admin-token";

/// A plugin of a benchmark router: name, component file, extra `[[plugin]]` settings.
pub struct Entry<'a> {
    pub name: &'a str,
    pub file: &'a str,
    pub extra: &'a str,
}

/// A router on names of its own: an exchange, a queue prefix and a data dir.
pub struct Routed {
    pub exchange: String,
    prefix: String,
    conn: Connection,
    pub channel: Channel,
    dir: tempfile::TempDir,
    router: Option<Router>,
    queues: Vec<String>,
    queue_type: QueueType,
}

impl Routed {
    pub async fn new(args: &Args) -> anyhow::Result<Routed> {
        let (conn, channel) = broker::connect(&args.amqp).await?;
        let exchange = unique("bench");
        broker::exchange(&channel, &exchange).await?;
        Ok(Routed {
            exchange,
            prefix: format!("{}.", unique("q")),
            conn,
            channel,
            dir: tempfile::tempdir()?,
            router: None,
            queues: Vec::new(),
            queue_type: args.queue_type,
        })
    }

    /// Fill plugin `name`'s queue, bound like its subscriptions, before the router starts.
    pub async fn prefill(&mut self, name: &str, patterns: &[&str], n: usize, body: &Body) -> anyhow::Result<()> {
        let queue = format!("{}{name}", self.prefix);
        broker::queue(&self.channel, &self.exchange, &queue, patterns, self.queue_type).await?;
        broker::publish(&self.channel, &self.exchange, "m", 0..n, body).await
    }

    /// Start the router with these plugins, `args.concurrency` lanes each.
    pub async fn start(&mut self, args: &Args, plugins: &[Entry<'_>]) -> anyhow::Result<&Router> {
        let mut text = format!(
            "[router]\ndata_dir = \"{}\"\n[rabbitmq]\nurl = \"{}\"\nexchange = \"{}\"\nqueue_prefix = \"{}\"\nprefetch = {}\nqueue_type = \"{}\"\n",
            self.dir.path().display(),
            args.amqp,
            self.exchange,
            self.prefix,
            args.prefetch,
            args.queue_type,
        );
        for p in plugins {
            text.push_str(&format!(
                "[[plugin]]\nname = \"{}\"\npath = \"{}\"\nconcurrency = {}\n{}\n",
                p.name,
                plugin(p.file)?.display(),
                args.concurrency,
                p.extra
            ));
            self.queues.push(format!("{}{}", self.prefix, p.name));
        }
        let router = start_router(&text, self.dir.path()).await?;
        Ok(self.router.insert(router))
    }

    pub fn router(&self) -> &Router {
        self.router.as_ref().expect("started")
    }

    fn counters(&self, name: &str) -> anyhow::Result<CountersSnapshot> {
        Ok(self.router().plugins.get(name).context("the plugin runs")?.slot().counters.snapshot())
    }

    /// Fail unless plugin `name` committed exactly `n` events, each once.
    pub fn committed_once(&self, name: &str, n: u64) -> anyhow::Result<()> {
        let counters = self.counters(name)?;
        ensure!(counters.succeeded == n, "every event committed once: {counters:?}");
        Ok(())
    }

    /// Wait until plugin `name` has settled `n` events in all; returns how long that took.
    pub async fn settled(&self, name: &str, n: u64, started: Instant) -> anyhow::Result<Duration> {
        loop {
            if settled_count(self.router(), name)? >= n && self.router().in_flight() == 0 {
                return Ok(started.elapsed());
            }
            ensure!(
                started.elapsed() < Duration::from_secs(1800),
                "{name} did not settle {n} events within 30 minutes"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// When the router received each event the `stamp` plugin stored, by event id: the
    /// `occurred-at` it stored, which for a message carrying no time is its receipt.
    pub fn stamped_received(&self) -> anyhow::Result<HashMap<String, Millis>> {
        let db = rusqlite::Connection::open(switchyard::db::path(self.dir.path()))?;
        let mut stamped =
            db.prepare("SELECT key, body FROM documents WHERE plugin = 'stamp' AND collection = 'stamped'")?;
        let rows = stamped.query_map([], |row| Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?)))?;
        let mut received = HashMap::new();
        for row in rows {
            let (id, body) = row?;
            let body: serde_json::Value = serde_json::from_str(&body)?;
            let at = body["occurred_at"].as_u64().with_context(|| format!("{id}'s stamp has no occurred_at"))?;
            received.insert(id, Millis(at));
        }
        Ok(received)
    }

    /// Start noting when each event of plugin `name` commits (the router runs).
    pub fn watch_commits(&self, name: &str) -> anyhow::Result<CommitWatch> {
        CommitWatch::start(switchyard::db::path(self.dir.path()), name.to_string())
    }

    /// Upload `file` as plugin `name` over the admin API: a hot swap when it runs.
    pub async fn upload(&self, name: &str, file: &str) -> anyhow::Result<()> {
        use tower::ServiceExt;
        let bytes = std::fs::read(plugin(file)?)?;
        let app = switchyard::admin::app(self.router().admin_state(Some(Secret::new(TOKEN))));
        let request = axum::http::Request::put(format!("/v1/plugins/{name}"))
            .header("authorization", format!("Bearer {TOKEN}"))
            .header("content-type", "application/wasm")
            .body(axum::body::Body::from(bytes))?;
        let status = app.oneshot(request).await?.status();
        ensure!(status.is_success(), "the upload of {file} answered {status}");
        Ok(())
    }

    /// Stop the router and delete the benchmark's queues and exchange.
    pub async fn finish(mut self) -> anyhow::Result<()> {
        if let Some(router) = self.router.take() {
            router.stop().await;
        }
        for queue in &self.queues {
            self.channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await?;
        }
        self.channel.exchange_delete(self.exchange.as_str().into(), Default::default()).await?;
        let _ = self.conn.close(200, "done".into()).await;
        Ok(())
    }
}

/// Start a router from a `router.toml` text and wait until its sources are connected.
pub async fn start_router(text: &str, dir: &std::path::Path) -> anyhow::Result<Router> {
    let config = Config::from_toml(text, &dir.join("router.toml"), &|_| None)?;
    let router = Router::start(config).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !router.is_connected() {
        ensure!(Instant::now() < deadline, "the router did not connect within 60 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(router)
}

/// Events plugin `name` of `router` has settled (committed, duplicate or dead-lettered).
pub fn settled_count(router: &Router, name: &str) -> anyhow::Result<u64> {
    let c = router.plugins.get(name).context("the plugin runs")?.slot().counters.snapshot();
    Ok(c.succeeded + c.duplicates + c.dead_lettered)
}

/// When each event of one plugin committed, as a reader sees it: a thread of the harness polls
/// the processed-markers every millisecond and notes when each first appears. A marker's own
/// `processed_at` is when its transaction began, before the writes and the fsync; an event
/// is committed once its transaction is durable, which is when readers see it.
pub struct CommitWatch {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<anyhow::Result<HashMap<String, Millis>>>,
}

impl CommitWatch {
    /// How often the markers are read: the bound on how late a commit is noted.
    const POLL: Duration = Duration::from_millis(1);

    /// Start the watching thread, named `commit-watch` so that the CPU rows show it apart.
    fn start(db: PathBuf, plugin: String) -> anyhow::Result<CommitWatch> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new().name("commit-watch".into()).spawn(move || {
            let db = rusqlite::Connection::open(db)?;
            // Transactions commit one after another, none with an earlier `processed_at` than
            // the one before: what has not been seen yet is at or after the latest seen. (Left
            // to choose, SQLite takes the primary key and reads every marker of the plugin.)
            let mut newer = db.prepare(
                "SELECT event_id, processed_at FROM processed INDEXED BY processed_by_age
                 WHERE processed_at >= ?2 AND plugin = ?1",
            )?;
            let (mut committed, mut latest) = (HashMap::new(), 0i64);
            loop {
                let last_look = stopping.load(Ordering::SeqCst);
                let seen_at = Millis::now();
                let mut rows = newer.query(rusqlite::params![plugin, latest])?;
                while let Some(row) = rows.next()? {
                    latest = latest.max(row.get(1)?);
                    committed.entry(row.get::<_, String>(0)?).or_insert(seen_at);
                }
                if last_look {
                    return Ok(committed);
                }
                std::thread::sleep(Self::POLL);
            }
        })?;
        Ok(CommitWatch { stop, thread })
    }

    /// Stop watching (after the events settled); returns when each committed, by event id.
    pub fn finish(self) -> anyhow::Result<HashMap<String, Millis>> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().map_err(|_| anyhow::anyhow!("the commit watch panicked"))?
    }
}

/// A paced load's latencies, how far its publisher fell behind, and its CPU per event from
/// its first publish to its last commit.
pub struct Paced {
    pub latencies: Latencies,
    /// The latencies' two parts, for a consumer that commits.
    pub split: Option<Split>,
    pub behind: Latencies,
    pub cost: Drained,
}

/// Where a committed event's latency went: publish → received by the consumer (the broker's
/// part, with the client library's), and received → committed (the consumer's).
pub struct Split {
    pub received: Latencies,
    pub committed: Latencies,
}

impl Split {
    /// From when each paced event was published (by index), and when it was received and
    /// committed (by message id).
    pub fn of(
        sent_at: &[Millis],
        received: &HashMap<String, Millis>,
        committed: &HashMap<String, Millis>,
    ) -> anyhow::Result<Split> {
        let mut received_at = Vec::with_capacity(sent_at.len());
        for i in 0..sent_at.len() {
            let id = message_id(i);
            received_at.push(*received.get(&id).with_context(|| format!("{id} was not received"))?);
        }
        Ok(Split { received: Latencies::of(sent_at, received)?, committed: Latencies::of(&received_at, committed)? })
    }
}

/// The message id of the `i`th paced event.
pub fn message_id(i: usize) -> String {
    format!("paced-{i}")
}

/// Latency percentiles, in milliseconds: of publish → commit, or of a publisher's lag.
pub struct Latencies(Vec<u64>);

impl Latencies {
    pub fn sorted(mut ms: Vec<u64>) -> Latencies {
        ms.sort_unstable();
        Latencies(ms)
    }

    /// Each paced event's commit (or delivery) time minus its publish (or receipt) time.
    pub fn of(sent_at: &[Millis], committed: &HashMap<String, Millis>) -> anyhow::Result<Latencies> {
        let mut ms = Vec::with_capacity(sent_at.len());
        for (i, sent) in sent_at.iter().enumerate() {
            let id = message_id(i);
            let at = committed.get(&id).with_context(|| format!("{id} was not committed"))?;
            ms.push(at.0.saturating_sub(sent.0));
        }
        Ok(Latencies::sorted(ms))
    }

    /// The `q` quantile (0 to 1).
    pub fn quantile(&self, q: f64) -> u64 {
        let at = ((self.0.len() as f64 - 1.0) * q).round() as usize;
        self.0.get(at).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(times: &[(usize, u64)]) -> HashMap<String, Millis> {
        times.iter().map(|(i, ms)| (message_id(*i), Millis(*ms))).collect()
    }

    #[test]
    fn a_split_measures_each_part_from_the_end_of_the_one_before() {
        let sent = [Millis(1_000), Millis(2_000)];
        let split = Split::of(&sent, &at(&[(0, 1_010), (1, 2_060)]), &at(&[(0, 1_015), (1, 2_100)])).unwrap();
        assert_eq!((split.received.quantile(0.0), split.received.quantile(1.0)), (10, 60));
        assert_eq!((split.committed.quantile(0.0), split.committed.quantile(1.0)), (5, 40));
    }

    #[test]
    fn a_split_names_the_event_it_has_no_receipt_for() {
        let sent = [Millis(1_000), Millis(2_000)];
        let missing = Split::of(&sent, &at(&[(0, 1_010)]), &at(&[(0, 1_015), (1, 2_100)])).err().unwrap();
        assert_eq!(missing.to_string(), "paced-1 was not received");
    }
}
