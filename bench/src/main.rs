//! `switchyard-bench`: each scenario runs a baseline and switchyard on the same broker, the same
//! messages and the same prefetch, interleaved over several rounds (each first in every other
//! round), and prints the median and the spread of each, with their ratio. Absolute figures
//! drift on a shared machine; the ratio measured side by side is the figure to compare.
//!
//! Full run (the figures in BENCHMARKS.md):
//!   cargo run --release -p switchyard-bench
//! Smoke run (CI: small N, checks that every scenario still runs and counts right):
//!   cargo run -p switchyard-bench -- --smoke

mod broker;
mod cpu;
mod redis_load;
mod routed;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use clap::Parser;
use switchyard::config::{PluginName, QueueType};
use switchyard::db::Readers;
use switchyard::event::{Event, EventId, Millis};
use switchyard::runtime::{Instance, Overrides, Runtime};

use broker::Body;
use cpu::{CpuClock, Drained};
use routed::{Entry, Latencies, Paced, Routed, Split};
use switchyard_bench::memory;

switchyard::global_allocator!();

#[derive(Parser)]
#[command(about = "switchyard benchmarks, each against its baseline in the same run")]
pub struct Args {
    /// Small N and one round: checks that the harness runs, not how fast.
    #[arg(long)]
    smoke: bool,
    /// Events per drain round.
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    /// Rounds per scenario (baseline and switchyard, each first in every other round).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Consumer prefetch, the same for the baseline and switchyard.
    #[arg(long, default_value_t = 500)]
    prefetch: u16,
    /// The replica plugin's own prefetch (`[[plugin]] prefetch`) in the replica flow's second
    /// row; the first runs at `--prefetch`.
    #[arg(long, default_value_t = 2000)]
    replica_prefetch: u16,
    /// Lanes per plugin (`concurrency`): events handled at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Seconds of paced load in the latency and hot-swap scenarios.
    #[arg(long, default_value_t = 20)]
    paced_secs: u64,
    /// RabbitMQ URL.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp: String,
    /// Redis URL.
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis: String,
    /// Only these scenarios, comma-separated: rss, drain, replica, streams, pubsub, latency,
    /// swap, fanout, wasm. Default: all.
    #[arg(long)]
    only: Option<String>,
    /// Events per second offered in the latency and hot-swap scenarios, instead of half of
    /// the `stamp` plugin's sustained peak (which is then not measured): to see the latency
    /// at a chosen load.
    #[arg(long)]
    offered: Option<f64>,
    /// Worker threads of the async runtime that hosts the routers (and the baselines), as
    /// `[router] worker_threads` sets them for the `switchyard` binary. Default: the router's
    /// default, one per core.
    #[arg(long)]
    worker_threads: Option<usize>,
    /// The type of every queue the run declares, the baselines' and the routers'
    /// (`[rabbitmq] queue_type`).
    #[arg(long, value_enum, default_value_t = QueueType::Classic)]
    queue_type: QueueType,
    /// Which side of the paired scenarios runs (drain, streams, pubsub, latency): one alone
    /// is for a profiler (`valgrind --tool=callgrind`, `perf record`), so that the other's
    /// work stays out of the profile.
    #[arg(long, value_enum, default_value_t = Side::Both)]
    side: Side,
}

/// The side of a paired scenario: the baseline, switchyard, or both in turn.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Side {
    Both,
    Baseline,
    Switchyard,
}

impl Side {
    fn baseline(self) -> bool {
        self != Side::Switchyard
    }

    fn switchyard(self) -> bool {
        self != Side::Baseline
    }
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

    /// Smallest and largest, NaN when no round measured anything.
    fn range(&self) -> (f64, f64) {
        let measured = || self.0.iter().copied().filter(|v| !v.is_nan());
        match (measured().reduce(f64::min), measured().reduce(f64::max)) {
            (Some(min), Some(max)) => (min, max),
            _ => (f64::NAN, f64::NAN),
        }
    }

    /// Smallest and largest, with `decimals` decimals.
    fn spread(&self, decimals: usize) -> String {
        let (min, max) = self.range();
        format!("{min:.decimals$}–{max:.decimals$}")
    }

    /// The table cell: median and spread, or a dash when the scenario did not run (a
    /// baseline left out by `--only`).
    fn cell(&self) -> String {
        or_dash(&[self], || format!("{:.0} ({})", self.median(), self.spread(0)))
    }
}

/// A table cell from `samples`, or a dash when any of them is empty: a side left out by
/// `--side`, a scenario by `--only`, a broker not on this machine.
fn or_dash(samples: &[&Samples], cell: impl FnOnce() -> String) -> String {
    if samples.iter().any(|s| s.0.is_empty()) { "–".into() } else { cell() }
}

/// The rounds of a latency scenario: each round's p50, p99 and p99.9, and its CPU per event.
#[derive(Default)]
struct LatencyRounds {
    p50: Samples,
    p99: Samples,
    p999: Samples,
    /// The p99s of the latency's parts (publish → received, received → committed), for a
    /// consumer that commits.
    received_p99: Samples,
    committed_p99: Samples,
    /// How far the publisher fell behind its schedule: p99 and worst.
    behind_p99: Samples,
    behind_max: Samples,
    cpu: Drains,
}

impl LatencyRounds {
    fn push(&mut self, paced: Paced) {
        self.p50.0.push(paced.latencies.quantile(0.5) as f64);
        self.p99.0.push(paced.latencies.quantile(0.99) as f64);
        self.p999.0.push(paced.latencies.quantile(0.999) as f64);
        if let Some(split) = paced.split {
            self.received_p99.0.push(split.received.quantile(0.99) as f64);
            self.committed_p99.0.push(split.committed.quantile(0.99) as f64);
        }
        self.behind_p99.0.push(paced.behind.quantile(0.99) as f64);
        self.behind_max.0.push(paced.behind.quantile(1.0) as f64);
        self.cpu.push(paced.cost);
    }

    /// The table cell: each percentile's median over the rounds, and the p99's spread (a dash
    /// for a side that did not run).
    fn cell(&self) -> String {
        or_dash(&[&self.p99], || {
            format!(
                "{:.0} / {:.0} / {:.0} ({})",
                self.p50.median(),
                self.p99.median(),
                self.p999.median(),
                self.p99.spread(0)
            )
        })
    }

    /// The p99s of the latency's parts, medians of the rounds.
    fn split_cell(&self) -> String {
        or_dash(&[&self.received_p99], || {
            format!("{:.0} / {:.0}", self.received_p99.median(), self.committed_p99.median())
        })
    }

    /// How far the publisher fell behind: medians of the rounds' p99 and worst.
    fn behind_cell(&self) -> String {
        or_dash(&[&self.behind_p99], || format!("{:.0} / {:.0}", self.behind_p99.median(), self.behind_max.median()))
    }

    /// The ratio of the p99s' medians, `self` over `baseline` (a dash when a side did not run).
    fn p99_ratio(&self, baseline: &LatencyRounds) -> String {
        or_dash(&[&self.p99, &baseline.p99], || format!("{:.2}", self.p99.median() / baseline.p99.median()))
    }
}

/// The rounds of a drain: rates, and the CPU per event of this process and of the broker.
#[derive(Default)]
struct Drains {
    rate: Samples,
    own_us: Samples,
    broker_us: Samples,
    /// Of each, the time in the kernel.
    own_system_us: Samples,
    broker_system_us: Samples,
    /// Each round's CPU per event of this process's threads.
    threads: Vec<Vec<(String, f64)>>,
    /// Each round's context switches per event of this process's threads.
    switches: Vec<Vec<(String, f64)>>,
}

impl Drains {
    fn push(&mut self, drained: Drained) {
        self.rate.0.push(drained.rate);
        self.own_us.0.push(drained.cpu.own_us);
        self.broker_us.0.extend(drained.cpu.broker_us);
        self.own_system_us.0.push(drained.cpu.own_system_us);
        self.broker_system_us.0.extend(drained.cpu.broker_system_us);
        self.threads.push(drained.cpu.threads);
        self.switches.push(drained.cpu.switches);
    }

    /// The round whose own CPU per event is the median.
    fn median_round(&self) -> Option<usize> {
        let mut rounds: Vec<usize> = (0..self.own_us.0.len()).collect();
        rounds.sort_by(|a, b| self.own_us.0[*a].total_cmp(&self.own_us.0[*b]));
        rounds.get(rounds.len() / 2).copied()
    }

    /// `by_thread`'s figures in the median round, each with `decimals`.
    fn median_round_cell(&self, by_thread: &[Vec<(String, f64)>], decimals: usize) -> String {
        let Some(median) = self.median_round() else { return "–".into() };
        by_thread[median].iter().map(|(name, n)| format!("{name} {n:.decimals$}")).collect::<Vec<_>>().join(", ")
    }

    /// Medians of this process's and the broker's CPU per event (a dash for what was not
    /// measured: a baseline left out by `--only`, a broker not on this machine).
    fn cpu_cell(&self) -> String {
        self.pair_cell(&self.own_us, &self.broker_us)
    }

    /// Medians of this process's and the broker's time in the kernel per event.
    fn system_cell(&self) -> String {
        self.pair_cell(&self.own_system_us, &self.broker_system_us)
    }

    /// The medians of `own` and `broker` as one cell.
    fn pair_cell(&self, own: &Samples, broker: &Samples) -> String {
        let median = |s: &Samples| or_dash(&[s], || format!("{:.1}", s.median()));
        or_dash(&[&self.rate], || format!("{} / {}", median(own), median(broker)))
    }
}

/// CPU per event of a drain next to the baseline's; the ratio is this process's.
fn cpu_row(name: &str, baseline: &Drains, switchyard: &Drains) {
    let ratio = or_dash(&[&baseline.rate, &switchyard.rate], || {
        format!("{:.2}", switchyard.own_us.median() / baseline.own_us.median())
    });
    println!("| {name} | {} | {} | {ratio} |", baseline.cpu_cell(), switchyard.cpu_cell());
    println!(
        "| … of it in the kernel (system time): this process / the broker (µs) | {} | {} | – |",
        baseline.system_cell(),
        switchyard.system_cell()
    );
    println!(
        "| … of this process, by thread, in the median round (µs) | {} | {} | – |",
        baseline.median_round_cell(&baseline.threads, 1),
        switchyard.median_round_cell(&switchyard.threads, 1)
    );
    println!(
        "| … context switches per event of this process's threads, the same round | {} | {} | – |",
        baseline.median_round_cell(&baseline.switches, 2),
        switchyard.median_round_cell(&switchyard.switches, 2)
    );
}

/// How far the paced publisher fell behind its schedule next to each consumer: where it is
/// far behind, the machine or the broker held the load back, and it went out in bursts.
fn behind_row(baseline: &LatencyRounds, switchyard: &LatencyRounds) {
    println!(
        "| … the publisher behind its schedule: p99 / worst, medians of the rounds (ms) | {} | {} | – |",
        baseline.behind_cell(),
        switchyard.behind_cell()
    );
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

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let router = switchyard::config::RouterConfig { worker_threads: args.worker_threads, ..Default::default() };
    // The routers log as the binary's do, so that they pay what it pays; to a file, so that
    // the table stays readable.
    let log = std::env::temp_dir().join("switchyard-bench.log");
    let file = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    switchyard::telemetry::init_with_writer(&router.log, std::sync::Mutex::new(file));
    println!("the routers log at `{}` (or RUST_LOG) to {}", router.log, log.display());
    let runtime = switchyard::router::runtime(&router).context("starting the async runtime")?;
    runtime.block_on(run(args, router.worker_threads()))
}

async fn run(mut args: Args, worker_threads: usize) -> anyhow::Result<()> {
    if args.smoke {
        args.events = 2_000;
        args.rounds = 1;
        args.paced_secs = 2;
    }
    println!(
        "switchyard-bench: {} events per drain round, {} rounds, prefetch {}, concurrency {}, {worker_threads} worker thread(s), {} queues",
        args.events, args.rounds, args.prefetch, args.concurrency, args.queue_type
    );
    println!("the broker's schedulers: {}", cpu::broker_schedulers());
    println!("the broker's CPU weight: {}", cpu::broker_weight());
    println!("| scenario | baseline (median, spread) | switchyard (median, spread) | ratio |");
    println!("| --- | --- | --- | --- |");

    let runs = |scenario: &str| args.only.as_deref().is_none_or(|only| only.split(',').any(|s| s == scenario));
    if runs("rss") {
        let idle = idle_rss().await?;
        println!("| RSS of the `switchyard` process idle, the demo's 9 plugins loaded (MiB) | – | {idle:.0} | – |");
    }
    let (mut bare, mut routed) = (Drains::default(), Drains::default());
    if runs("drain") {
        for round in 0..args.rounds {
            let noop = Entry { name: "noop", file: "noop.wasm", extra: "" };
            let switchyard = drain(&args, noop, &["bench.#"], &noop_body);
            let (b, r) = in_turn(round, args.side, broker::drain_bare(&args, &noop_body), switchyard).await?;
            if let Some(b) = b {
                bare.push(b);
            }
            if let Some(r) = r {
                routed.push(r);
            }
        }
        row_paired("drain, no-op plugin (events/s)", &bare.rate, &routed.rate);
        cpu_row(
            "CPU per event of that drain: this process (bare consumer or router) / the broker (µs)",
            &bare,
            &routed,
        );
    }
    if runs("replica") {
        memory::reset_peak();
        let own = format!("prefetch = {}\n", args.replica_prefetch);
        for (extra, name) in [
            ("", "replica flow, 10,000 users (events/s)".to_string()),
            (own.as_str(), format!("replica flow, the plugin's own prefetch {} (events/s)", args.replica_prefetch)),
        ] {
            let mut replica = Drains::default();
            for _ in 0..args.rounds {
                let entry = Entry { name: "user-replica", file: "user_replica.wasm", extra };
                replica.push(drain(&args, entry, &["user.updated"], &user_updated).await?);
            }
            row(&name, &bare.rate, &replica.rate);
            cpu_row("CPU per event of that flow: this process / the broker (µs)", &bare, &replica);
        }
        let peak = memory::mib("VmHWM").unwrap_or(f64::NAN);
        println!("| peak RSS of the harness process during the replica flows (MiB) | – | {peak:.0} | – |");
    }
    if runs("streams") {
        streams(&args).await?;
    }
    if runs("pubsub") {
        pubsub(&args).await?;
    }
    // Half the peak of the plugin they run, publishing and consuming at once as they do: the
    // stamp plugin's sustained peak, measured here. Its drain of a filled queue is shown too;
    // it is faster, since the broker then only delivers.
    let (mut offered, mut load) = (f64::NAN, "50 % of its sustained peak");
    if let Some(rate) = args.offered.filter(|_| runs("latency") || runs("swap")) {
        (offered, load) = (rate, "the rate given (`--offered`)");
    } else if runs("latency") || runs("swap") {
        ensure!(
            args.side.switchyard(),
            "`--side baseline` measures no peak of switchyard's: give the rate with `--offered`"
        );
        let mut stamp = Samples::default();
        for _ in 0..args.rounds {
            stamp.0.push(drain(&args, STAMP, &["stamp.#"], &stamp_body).await?.rate);
        }
        row("drain, `stamp` plugin: a document per event, queue filled first (events/s)", &bare.rate, &stamp);
        let mut peak = Samples::default();
        for _ in 0..args.rounds {
            peak.0.push(sustained(&args).await?);
        }
        println!(
            "| stamp plugin's sustained peak, published while it consumes (events/s; half of it is offered below) | – | {:.0} ({}) | – |",
            peak.median(),
            peak.spread(0)
        );
        offered = (peak.median() / 2.0).max(100.0);
    }
    if runs("latency") {
        let (mut bare, mut durable, mut routed) =
            (LatencyRounds::default(), LatencyRounds::default(), LatencyRounds::default());
        // Each round runs the three in turn, each first in every third round.
        for round in 0..args.rounds {
            for turn in 0..3 {
                let (rounds, paced) = match (round + turn) % 3 {
                    0 if args.side.baseline() => (&mut bare, broker::latency_bare(&args, offered, &stamp_body).await?),
                    1 if args.side.baseline() => {
                        (&mut durable, broker::latency_durable(&args, offered, &stamp_body).await?)
                    }
                    2 if args.side.switchyard() => (&mut routed, latency(&args, offered).await?),
                    _ => continue,
                };
                rounds.push(paced);
            }
        }
        let name = format!("publish → commit, stamp plugin, at {offered:.0} events/s, {load}");
        let percentiles = "p50 / p99 / p99.9, medians of the rounds (ms), p99 spread";
        let cpu = "CPU per event of that load: this process (publisher and consumer, or publisher and router) / the broker (µs)";
        println!(
            "| {name}: {percentiles}; baseline: publish → delivered to the bare consumer | {} | {} | {} |",
            bare.cell(),
            routed.cell(),
            routed.p99_ratio(&bare)
        );
        cpu_row(cpu, &bare.cpu, &routed.cpu);
        behind_row(&bare, &routed);
        println!(
            "| {name}: {percentiles}; baseline: publish → committed by the bare consumer to SQLite (WAL, `synchronous = FULL`, group commit), then acked | {} | {} | {} |",
            durable.cell(),
            routed.cell(),
            routed.p99_ratio(&durable)
        );
        println!(
            "| … its parts: publish → received by the consumer (the broker's part) / received → committed (the consumer's): p99s, medians of the rounds (ms) | {} | {} | – |",
            durable.split_cell(),
            routed.split_cell()
        );
        cpu_row(cpu, &durable.cpu, &routed.cpu);
        behind_row(&durable, &routed);
    }
    if runs("swap") {
        let swap = hot_swap(&args, offered).await?;
        println!(
            "| two hot swaps of the stamp plugin at {offered:.0} events/s offered: throughput (events/s), p99 (ms), lost | – | {:.0}, {}, {} | – |",
            swap.rate,
            swap.latency.quantile(0.99),
            swap.lost
        );
    }
    if runs("fanout") {
        let (followers, posts, authors) = if args.smoke { (500, 10, 5) } else { (10_000, 1_000, 100) };
        let one = fan_out(&args, 1, followers, 1).await?;
        println!("| fan-out: 1 post to {followers} followers (notifications/s) | – | {one:.0} | – |");
        let many = fan_out(&args, authors, followers / authors, posts).await?;
        println!(
            "| fan-out: {posts} posts over {authors} authors × {} followers (notifications/s) | – | {many:.0} | – |",
            followers / authors
        );
    }
    if !runs("wasm") {
        return Ok(());
    }
    let calls = if args.smoke { 2_000 } else { 100_000 };
    let overhead = wasm_overhead(calls).await?;
    println!("| Wasm call, reused instance, no-op (µs/event) | – | {:.2} | – |", overhead.reuse);
    println!("| Wasm: fresh instance + call, no-op (µs/event) | – | {:.2} | – |", overhead.fresh);
    println!("| Wasm call, reused instance, JSON-parsing `user-replica` (µs/event) | – | {:.2} | – |", overhead.json);
    Ok(())
}

/// One round of a paired scenario: the baseline runs first in even rounds and switchyard
/// first in odd ones, so that neither always finds the broker as the other left it. A side
/// that `side` leaves out does not run.
async fn in_turn<B, R>(
    round: usize,
    side: Side,
    baseline: impl Future<Output = anyhow::Result<B>>,
    switchyard: impl Future<Output = anyhow::Result<R>>,
) -> anyhow::Result<(Option<B>, Option<R>)> {
    let baseline = async { if side.baseline() { baseline.await.map(Some) } else { Ok(None) } };
    let switchyard = async { if side.switchyard() { switchyard.await.map(Some) } else { Ok(None) } };
    if round.is_multiple_of(2) {
        let b = baseline.await?;
        Ok((b, switchyard.await?))
    } else {
        let r = switchyard.await?;
        Ok((baseline.await?, r))
    }
}

/// The replica flow over Redis Streams, next to a bare consumer-group reader.
async fn streams(args: &Args) -> anyhow::Result<()> {
    let (mut bare, mut replica) = (Samples::default(), Samples::default());
    for round in 0..args.rounds {
        let baseline = redis_load::streams_bare(args, args.events, &user_updated);
        let routed = redis_load::streams_routed(args, "user-replica", "user_replica.wasm", args.events, &user_updated);
        let (b, r) = in_turn(round, args.side, baseline, routed).await?;
        bare.0.extend(b);
        replica.0.extend(r);
    }
    row_paired("replica flow over Redis Streams (events/s; baseline: bare XREADGROUP + XACK)", &bare, &replica);
    Ok(())
}

/// A pub/sub drain with the no-op plugin, next to a bare subscriber; with the share delivered.
async fn pubsub(args: &Args) -> anyhow::Result<()> {
    let (mut bare, mut routed) = (Samples::default(), Samples::default());
    // The share delivered at worst, over the rounds each side ran.
    let (mut bare_share, mut routed_share) = (None::<f64>, None::<f64>);
    let worst =
        |share: Option<f64>, delivered: u64| Some(share.unwrap_or(1.0).min(delivered as f64 / args.events as f64));
    for round in 0..args.rounds {
        let baseline = redis_load::pubsub_bare(args, args.events, &noop_body);
        let (b, r) =
            in_turn(round, args.side, baseline, redis_load::pubsub_routed(args, args.events, &noop_body)).await?;
        if let Some(b) = b {
            bare_share = worst(bare_share, b.delivered);
            bare.0.push(b.rate);
        }
        if let Some(r) = r {
            routed_share = worst(routed_share, r.delivered);
            routed.0.push(r.rate);
        }
    }
    let percent = |share: Option<f64>| share.map_or("–".into(), |s| format!("{:.0} %", s * 100.0));
    let name = format!(
        "drain from Redis pub/sub, no-op plugin (events/s; delivered at worst: bare {}, switchyard {})",
        percent(bare_share),
        percent(routed_share)
    );
    row_paired(&name, &bare, &routed);
    Ok(())
}

/// A row whose baseline and switchyard rounds ran in pairs, one right after the other: the
/// ratio is the median of the rounds' own ratios, with their spread, so that a drift of the
/// machine between rounds moves both sides of a ratio instead of the ratio.
fn row_paired(name: &str, baseline: &Samples, switchyard: &Samples) {
    let ratios = Samples(switchyard.0.iter().zip(&baseline.0).map(|(s, b)| s / b).collect());
    let ratio = or_dash(&[&ratios], || format!("{:.2} ({})", ratios.median(), ratios.spread(2)));
    print_row(name, baseline, switchyard, &ratio);
}

/// A row whose switchyard rounds have no baseline rounds of their own: the ratio of medians
/// (none when the baseline's scenario did not run).
fn row(name: &str, baseline: &Samples, switchyard: &Samples) {
    let ratio = or_dash(&[baseline, switchyard], || format!("{:.2}", switchyard.median() / baseline.median()));
    print_row(name, baseline, switchyard, &ratio);
}

fn print_row(name: &str, baseline: &Samples, switchyard: &Samples, ratio: &str) {
    println!("| {name} | {} | {} | {ratio} |", baseline.cell(), switchyard.cell());
}

/// A small JSON event named `name`, about 210 bytes like the measured baseline.
fn small_event(name: &str, i: usize) -> (String, Vec<u8>) {
    let body = serde_json::json!({
        "pattern": name,
        "data": { "n": i, "user_id": format!("u{}", i % 10_000), "padding": "x".repeat(120) },
    });
    (name.into(), body.to_string().into_bytes())
}

/// The no-op plugin's event.
fn noop_body(i: usize) -> (String, Vec<u8>) {
    small_event("bench.event", i)
}

/// The stamp plugin's event.
fn stamp_body(i: usize) -> (String, Vec<u8>) {
    small_event("stamp.event", i)
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

/// switchyard: the plugin's queue filled first, then the router started and timed until every
/// event is committed and acknowledged.
async fn drain(args: &Args, entry: Entry<'_>, patterns: &[&str], body: &Body) -> anyhow::Result<Drained> {
    let name = entry.name;
    let mut r = Routed::new(args).await?;
    r.prefill(name, patterns, args.events, body).await?;
    // Compiling the plugin is start-up, not draining: the clock starts once the router runs.
    // The router starts draining before its start returns: the events settled by then are
    // not counted either.
    r.start(args, &[entry]).await?;
    let (started, cpu) = (Instant::now(), CpuClock::now());
    let early = routed::settled_count(r.router(), name)? as usize;
    r.settled(name, args.events as u64, started).await?;
    let drained = Drained::of(args.events.saturating_sub(early), started, &cpu);
    r.committed_once(name, args.events as u64)?;
    r.finish().await?;
    Ok(drained)
}

/// The plugin of the latency and hot-swap scenarios: one document write per event, so that
/// each event has a commit (the no-op plugin has nothing to commit).
const STAMP: Entry = Entry { name: "stamp", file: "stamp_v1.wasm", extra: "" };

/// The stamp plugin's sustained peak: `args.events` published as fast as the broker takes
/// them while the router consumes, timed from the first publish to the last commit.
async fn sustained(args: &Args) -> anyhow::Result<f64> {
    let mut r = Routed::new(args).await?;
    r.start(args, &[STAMP]).await?;
    let started = Instant::now();
    broker::paced(&args.amqp, &r.exchange, args.events, f64::INFINITY, &stamp_body).await?;
    let took = r.settled(STAMP.name, args.events as u64, started).await?;
    r.committed_once(STAMP.name, args.events as u64)?;
    r.finish().await?;
    Ok(args.events as f64 / took.as_secs_f64())
}

/// Publish → commit latency of the stamp plugin under a steady `rate`, and its CPU per event
/// once the router runs (the commit watch's thread included).
async fn latency(args: &Args, rate: f64) -> anyhow::Result<Paced> {
    let mut r = Routed::new(args).await?;
    r.start(args, &[STAMP]).await?;
    let watch = r.watch_commits(STAMP.name)?;
    let n = (rate * args.paced_secs as f64) as usize;
    let (started, cpu) = (Instant::now(), CpuClock::now());
    let offered = broker::paced(&args.amqp, &r.exchange, n, rate, &stamp_body).await?;
    r.settled(STAMP.name, n as u64, Instant::now()).await?;
    let cost = Drained::of(n, started, &cpu);
    let committed = watch.finish()?;
    let latencies = Latencies::of(&offered.sent_at, &committed)?;
    let split = Split::of(&offered.sent_at, &r.stamped_received()?, &committed)?;
    r.finish().await?;
    Ok(Paced { latencies, split: Some(split), behind: offered.behind, cost })
}

/// What a steady load sees while the plugin is swapped twice.
struct Swapped {
    rate: f64,
    latency: Latencies,
    lost: u64,
}

/// The stamp plugin under a steady `rate`, swapped to its second build at one third of the
/// run and back to the first at two thirds.
async fn hot_swap(args: &Args, rate: f64) -> anyhow::Result<Swapped> {
    let mut r = Routed::new(args).await?;
    r.start(args, &[STAMP]).await?;
    let watch = r.watch_commits(STAMP.name)?;
    let n = (rate * args.paced_secs as f64) as usize;
    let third = Duration::from_secs_f64(args.paced_secs as f64 / 3.0);
    let swaps = async {
        for file in ["stamp_v2.wasm", "stamp_v1.wasm"] {
            tokio::time::sleep(third).await;
            r.upload(STAMP.name, file).await?;
        }
        anyhow::Ok(())
    };
    let (offered, swapped) = tokio::join!(broker::paced(&args.amqp, &r.exchange, n, rate, &stamp_body), swaps);
    let (sent, ()) = (offered?.sent_at, swapped?);
    let settle = r.settled(STAMP.name, n as u64, Instant::now());
    tokio::time::timeout(Duration::from_secs(120), settle).await.context("events lost: the run did not settle")??;
    let committed = watch.finish()?;
    let lost = (0..n).filter(|i| !committed.contains_key(&routed::message_id(*i))).count() as u64;
    ensure!(lost == 0, "{lost} events lost across the swaps");
    let first = sent.first().map_or(0, |m| m.0);
    let last = committed.values().map(|m| m.0).max().unwrap_or(first);
    let latency = Latencies::of(&sent, &committed)?;
    r.finish().await?;
    Ok(Swapped { rate: n as f64 * 1000.0 / (last.saturating_sub(first).max(1)) as f64, latency, lost })
}

/// `posts` posts spread over `authors`, each followed by `followers`: notifications (a
/// document and an email request each) committed per second, once the follows are replicated.
async fn fan_out(args: &Args, authors: usize, followers: usize, posts: usize) -> anyhow::Result<f64> {
    let follows = authors * followers;
    let follow = move |i: usize| {
        let body = serde_json::json!({ "pattern": "follow.created", "data": {
            "follower_id": format!("f{i}"), "follower_email": format!("f{i}@mail.test"),
            "follower_name": "Fan", "followed_id": format!("author-{}", i % authors) } });
        ("follow.created".to_string(), body.to_string().into_bytes())
    };
    let post = move |i: usize| {
        let body = serde_json::json!({ "pattern": "post.created", "data": {
            "type": "new_post", "message": format!("post {i}"), "userId": format!("author-{}", i % authors) } });
        ("post.created".to_string(), body.to_string().into_bytes())
    };
    let mut r = Routed::new(args).await?;
    r.prefill("notifier", &["follow.*", "post.created"], follows, &follow).await?;
    let extra = "publishes = [\"email.requested\"]\n[plugin.limits]\ntimeout_ms = 120000\n";
    r.start(args, &[Entry { name: "notifier", file: "notifier.wasm", extra }]).await?;
    r.settled("notifier", follows as u64, Instant::now()).await?;
    let started = Instant::now();
    broker::publish(&r.channel, &r.exchange, "post", 0..posts, &post).await?;
    let took = r.settled("notifier", (follows + posts) as u64, started).await?;
    r.committed_once("notifier", (follows + posts) as u64)?;
    r.finish().await?;
    Ok((posts * followers) as f64 / took.as_secs_f64())
}

/// RSS of the `switchyard` binary (the one built next to this harness) idle on the in-process
/// bus with every plugin of the demo loaded, in MiB.
async fn idle_rss() -> anyhow::Result<f64> {
    let exe = std::env::current_exe()?;
    let binary = exe.with_file_name("switchyard");
    ensure!(
        binary.is_file(),
        "{} is missing: build it first (cargo build [--release] -p switchyard)",
        binary.display()
    );
    let dir = tempfile::tempdir()?;
    let mut text = format!("[router]\ndata_dir = \"{}\"\nlog = \"info\"\n", dir.path().display());
    let plugins = [
        ("user-replica", "user_replica.wasm"),
        ("follow-replica", "follow_replica.wasm"),
        ("notifier", "notifier.wasm"),
        ("mailer", "mailer.wasm"),
        ("welcome", "welcome.wasm"),
        ("user-catalog", "user_catalog.wasm"),
        ("order-saga", "order_saga.wasm"),
        ("inventory", "inventory.wasm"),
        ("payment", "payment.wasm"),
    ];
    for (name, file) in plugins {
        text.push_str(&format!("[[plugin]]\nname = \"{name}\"\npath = \"{}\"\n", plugin(file)?.display()));
    }
    let config = dir.path().join("router.toml");
    std::fs::write(&config, text)?;
    let log = std::fs::File::create(dir.path().join("router.log"))?;
    let mut child = tokio::process::Command::new(&binary)
        .args(["run", "--config"])
        .arg(&config)
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().context("the router runs")?;
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(dir.path().join("router.log")).unwrap_or_default();
        if text.matches("plugin loaded").count() == plugins.len() {
            break;
        }
        ensure!(child.try_wait()?.is_none(), "the router exited: {text}");
        ensure!(started.elapsed() < Duration::from_secs(300), "the router did not load its plugins: {text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Idle: every plugin loaded, nothing to do.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = memory::mib_of(&format!("/proc/{pid}/status"), "VmRSS").context("reading the router's RSS")?;
    child.kill().await?;
    Ok(rss)
}

/// The runtime alone, in µs per event.
struct Overhead {
    /// A call on a reused instance of the no-op plugin.
    reuse: f64,
    /// A fresh instance of the no-op plugin, and the call.
    fresh: f64,
    /// A call on a reused instance of `user-replica`: JSON parsing, a store read and a write.
    json: f64,
}

/// The runtime alone: no broker, no commit.
async fn wasm_overhead(calls: usize) -> anyhow::Result<Overhead> {
    let dir = tempfile::tempdir()?;
    let readers = Readers::new(dir.path());
    switchyard::commit::Writer::start(dir.path(), &Default::default())?;
    let runtime = Runtime::new(readers, switchyard::config::RouterConfig::default().max_instances)?;
    let load = async |name: &str, file: &str| -> anyhow::Result<Arc<switchyard::runtime::LoadedPlugin>> {
        let bytes = std::fs::read(plugin(file)?)?;
        let name = PluginName::parse(name).map_err(anyhow::Error::msg)?;
        Ok(Arc::new(runtime.load(&name, &bytes, Overrides::defaults()).await?))
    };
    let event = |name: &str, payload: Vec<u8>| Event {
        id: EventId("bench-1".into()),
        name: name.into(),
        source: "bench".into(),
        key: None,
        correlation_id: None,
        causation_id: None,
        occurred_at: Millis::now(),
        content_type: "application/json".into(),
        headers: Vec::new(),
        payload,
    };
    let per_call = async |plugin: &Arc<switchyard::runtime::LoadedPlugin>, event: &Event| -> anyhow::Result<f64> {
        let mut instance = Instance::new(plugin.clone()).await?;
        let started = Instant::now();
        for _ in 0..calls {
            instance.handle(event, None, 1).await?;
        }
        Ok(started.elapsed().as_secs_f64() * 1e6 / calls as f64)
    };
    let noop = load("noop", "noop.wasm").await?;
    let noop_event = event("bench.event", noop_body(1).1);
    let reuse = per_call(&noop, &noop_event).await?;
    let fresh_calls = calls / 10;
    let started = Instant::now();
    for _ in 0..fresh_calls {
        let mut instance = Instance::new(noop.clone()).await?;
        instance.handle(&noop_event, None, 1).await?;
    }
    let fresh = started.elapsed().as_secs_f64() * 1e6 / fresh_calls as f64;
    let replica = load("user-replica", "user_replica.wasm").await?;
    let update = serde_json::from_slice::<serde_json::Value>(&user_updated(1).1)?["data"].to_string();
    let json = per_call(&replica, &event("user.updated", update.into_bytes())).await?;
    Ok(Overhead { reuse, fresh, json })
}
