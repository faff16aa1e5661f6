//! The `switchyard` binary: run the router, feed it events, inspect its store.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use switchyard::config::{Config, ENV_RABBITMQ_URL, ENV_REDIS_URL};
use switchyard::db::Readers;
use switchyard::router::{self, Router};
use switchyard::source::rabbitmq::RabbitMqSource;

switchyard::global_allocator!();

#[derive(Parser)]
#[command(name = "switchyard", version, about = "An event router that hosts WebAssembly handler plugins")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the router.
    Run {
        /// The configuration file.
        #[arg(long, default_value = "router.toml")]
        config: PathBuf,
        /// Consume from this RabbitMQ instead of what the config says (e.g.
        /// amqp://guest:guest@127.0.0.1:5672/%2f); same as SWITCHYARD_RABBITMQ_URL.
        #[arg(long)]
        rabbitmq: Option<String>,
        /// Consume from this Redis over pub/sub instead of what the config says (e.g.
        /// redis://127.0.0.1:6379); same as SWITCHYARD_REDIS_URL.
        #[arg(long)]
        redis: Option<String>,
        /// Publish every line of this JSONL file (one envelope per line) once started: onto
        /// the in-process bus, to the RabbitMQ exchange under each event's name, or (with Redis
        /// only) to the first stream or the event's pub/sub channel.
        #[arg(long)]
        feed: Option<PathBuf>,
        /// Exit once every event (and every event they caused) has been handled.
        #[arg(long)]
        exit_when_idle: bool,
    },
    /// Print the documents of a plugin's collection as JSON lines.
    Store {
        #[arg(long, default_value = "router.toml")]
        config: PathBuf,
        plugin: String,
        collection: String,
    },
    /// Print a plugin's dead letters as JSON lines.
    DeadLetters {
        #[arg(long, default_value = "router.toml")]
        config: PathBuf,
        plugin: String,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config, rabbitmq, redis, feed, exit_when_idle } => {
            let env = |name: &str| match (&rabbitmq, &redis, name) {
                (Some(url), _, ENV_RABBITMQ_URL) | (_, Some(url), ENV_REDIS_URL) => Some(url.clone()),
                _ => std::env::var(name).ok(),
            };
            let config = Config::load_with_env(&config, &env)?;
            switchyard::telemetry::init(&config.router.log);
            let runtime = router::runtime(&config.router).context("cannot start the async runtime")?;
            runtime.block_on(serve(config, feed, exit_when_idle))
        }
        Command::Store { config, plugin, collection } => {
            let config = Config::load(&config)?;
            let readers = open_readers(&config)?;
            let mut cursor = String::new();
            loop {
                let rows = readers.scan(&plugin, &collection, &cursor, 1000)?;
                let Some(last) = rows.last() else { break };
                cursor = last.key.clone();
                for row in rows {
                    println!("{}", row.body);
                }
            }
            Ok(())
        }
        Command::DeadLetters { config, plugin } => {
            let config = Config::load(&config)?;
            let readers = open_readers(&config)?;
            for d in readers.dead_letters(&plugin, 0, 10_000)? {
                let line = serde_json::json!({
                    "seq": d.seq, "event_id": d.event_id, "name": d.name, "reason": d.reason, "attempts": d.attempts,
                });
                println!("{line}");
            }
            Ok(())
        }
    }
}

fn open_readers(config: &Config) -> anyhow::Result<Readers> {
    let dir = &config.router.data_dir;
    anyhow::ensure!(router::has_database(dir), "no database under {}: run the router first", dir.display());
    Ok(Readers::new(dir))
}

async fn serve(config: Config, feed: Option<PathBuf>, exit_when_idle: bool) -> anyhow::Result<()> {
    let rabbit = config.rabbitmq.clone();
    let redis = config.redis.clone();
    let router = Router::start(config).await?;
    if let Some(path) = &feed {
        // Queues must be declared and bound first, or the broker drops what it cannot route.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !router.is_connected() {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "a source was not ready within 60 s; the log says why"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let count = match (&router.bus, &rabbit) {
            (Some(bus), _) => bus.feed_jsonl(path).await.with_context(|| format!("feeding {}", path.display()))?,
            (None, Some(r)) => switchyard::source::rabbitmq::publish_jsonl(r, path)
                .await
                .with_context(|| format!("feeding {}", path.display()))?,
            (None, None) => match &redis {
                Some(r) => switchyard::source::redis::publish_jsonl(r, path)
                    .await
                    .with_context(|| format!("feeding {}", path.display()))?,
                None => 0,
            },
        };
        tracing::info!(count, file = %path.display(), "fed events");
    }
    if exit_when_idle {
        let queues: Vec<String> = match &rabbit {
            Some(r) => router
                .plugins
                .snapshot()
                .plugins
                .iter()
                .map(|p| RabbitMqSource::queue_name(r, p.name()))
                .chain(r.ingress_queues.iter().cloned())
                .collect(),
            None => Vec::new(),
        };
        let url = rabbit.as_ref().map(|r| r.url.expose().to_string()).unwrap_or_default();
        router
            .wait_idle(async || {
                for q in &queues {
                    if router::queue_depth(&url, q).await != Some(0) {
                        return false;
                    }
                }
                true
            })
            .await;
        tracing::info!("idle: every event handled");
    } else {
        shutdown_signal().await;
        tracing::info!("shutting down");
    }
    router.stop().await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
