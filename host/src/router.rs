//! Wiring: builds the running router from a [`Config`] — store writer, runtime, plugins (from
//! `router.toml` and the admin registry), lanes, sources and outbox relay — and stops it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminState};
use crate::commit::{self, Writer};
use crate::config::{Config, PluginConfig, PluginName, RouterConfig, Secret, SinkChoice};
use crate::db::{self, Readers};
use crate::dispatch::Dispatch;
use crate::outbox::{self, RabbitSink, RedisSink, Sink};
use crate::plugins::{Control, PluginSet};
use crate::runtime::registry::{Registry, Which};
use crate::runtime::{LoadedPlugin, Overrides, Runtime};
use crate::source::bus::Bus;
use crate::source::rabbitmq::RabbitMqSource;
use crate::source::redis::RedisSource;
use crate::source::{Health, InFlight, SourceHealth};
use crate::telemetry;

/// How long the tasks (sources and outbox relay) get to end after the shutdown signal before
/// they are aborted; each ends at its next await once signalled, so this only bounds a stuck one.
const TASK_STOP_GRACE: Duration = Duration::from_secs(5);

/// A running router.
pub struct Router {
    pub readers: Readers,
    /// The in-process bus, when no broker is configured.
    pub bus: Option<Arc<Bus>>,
    /// Each source's name and health.
    sources: Arc<Vec<SourceHealth>>,
    control: Control,
    /// Where the admin API listens, when configured.
    pub admin_address: Option<std::net::SocketAddr>,
    /// The running plugins; the admin API adds and removes them.
    pub plugins: PluginSet,
    in_flight: Arc<InFlight>,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
    drain_timeout: Duration,
    /// Held until the router is dropped.
    _data_dir: DataDirLock,
}

/// The lock a router holds on its data directory (`switchyard.lock` in it). Each router keeps
/// its own read snapshot and processed-marker filter, which follow its own writer only: a
/// second router on the same directory, in another process or this one, would miss the first
/// one's commits, so it is refused at start.
struct DataDirLock {
    _held: std::fs::File,
}

impl DataDirLock {
    fn take(data_dir: &Path) -> anyhow::Result<DataDirLock> {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("creating the data directory {}", data_dir.display()))?;
        let path = data_dir.join(LOCK_FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => Ok(DataDirLock { _held: file }),
            Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
                "the data directory {} is in use by another router (it holds {LOCK_FILE}); \
                 a data directory belongs to one router: give this one its own router.data_dir",
                data_dir.display()
            ),
            Err(std::fs::TryLockError::Error(e)) => Err(e).with_context(|| format!("locking {}", path.display())),
        }
    }
}

/// The lock file in a data directory.
const LOCK_FILE: &str = "switchyard.lock";

impl Router {
    /// Start everything the config describes.
    pub async fn start(config: Config) -> anyhow::Result<Router> {
        let data_dir = &config.router.data_dir;
        let lock = DataDirLock::take(data_dir)?;
        let writer = Writer::start(data_dir, &config.store)
            .with_context(|| format!("opening the store under {}", data_dir.display()))?;
        let readers = writer.readers();
        let runtime = Arc::new(
            Runtime::new(readers.clone(), config.router.max_instances).context("starting the WebAssembly runtime")?,
        );
        let registry = Registry::new(data_dir);
        let in_flight = Arc::new(InFlight::default());
        let plugins = PluginSet::new(Vec::new());
        let control = Control {
            plugins: plugins.clone(),
            runtime: runtime.clone(),
            writer: writer.clone(),
            readers: readers.clone(),
            registry: registry.clone(),
            rabbitmq: config.rabbitmq.clone(),
            redis: config.redis.clone(),
            configured: Arc::new(config.plugins.clone()),
            in_flight: in_flight.clone(),
            changing: Default::default(),
        };
        // Made before anything is started, so that a start that fails half-way (a plugin that
        // does not load, a sink that does not connect) drops it, which ends what was started.
        let mut router = Router {
            control,
            readers: readers.clone(),
            bus: None,
            sources: Arc::default(),
            admin_address: None,
            plugins: plugins.clone(),
            in_flight: in_flight.clone(),
            shutdown: CancellationToken::new(),
            tasks: JoinSet::new(),
            drain_timeout: Duration::from_millis(config.router.drain_timeout_ms),
            _data_dir: lock,
        };
        let (control, shutdown) = (&router.control, router.shutdown.clone());

        for plugin_config in &config.plugins {
            let plugin = load(&runtime, &registry, plugin_config).await?;
            plugins.add(install(control, plugin).await?)?;
        }
        // Plugins added over the admin API that router.toml does not name.
        for name in registry.names().context("listing the plugin registry")? {
            if config.plugins.iter().any(|p| p.name == name) {
                continue;
            }
            let plugin = load_uploaded(&runtime, &registry, &name).await?;
            plugins.add(install(control, plugin).await?)?;
        }
        telemetry::prometheus();

        let mut sources = Vec::new();
        if let Some(rabbit) = &config.rabbitmq {
            let health = Arc::new(Health::default());
            sources.push(SourceHealth { source: "rabbitmq", health: health.clone() });
            let source = RabbitMqSource {
                config: rabbit.clone(),
                writer: writer.clone(),
                readers: readers.clone(),
                in_flight: in_flight.clone(),
                health,
            };
            router.tasks.spawn(source.run(plugins.clone(), shutdown.clone()));
        }
        if let Some(redis) = config.redis.as_ref().filter(|r| r.pubsub.is_some() || r.streams.is_some()) {
            let health = Arc::new(Health::default());
            sources.push(SourceHealth { source: "redis", health: health.clone() });
            let source =
                RedisSource { config: redis.clone(), writer: writer.clone(), in_flight: in_flight.clone(), health };
            router.tasks.spawn(source.run(plugins.clone(), shutdown.clone()));
        }
        router.sources = Arc::new(sources);
        let use_redis_sink =
            config.redis.is_some() && (config.rabbitmq.is_none() || config.router.sink == SinkChoice::Redis);
        let sink = match (&config.rabbitmq, &config.redis) {
            (_, Some(redis)) if use_redis_sink => {
                Sink::Redis(RedisSink::new(redis).context("connecting the Redis sink")?)
            }
            (Some(rabbit), _) => {
                Sink::RabbitMq(RabbitSink::new(rabbit.url.clone(), rabbit.exchange.clone(), rabbit.sink_format))
            }
            (None, _) => {
                let bus = Arc::new(Bus::new(plugins.clone(), writer.clone(), in_flight.clone()));
                tracing::info!("no broker configured: running on the in-process bus");
                router.bus = Some(bus.clone());
                Sink::Bus(bus)
            }
        };
        let publish_timeout = Duration::from_millis(config.router.publish_timeout_ms);
        router.tasks.spawn(commit::prune_expired(writer.clone(), config.store.processed_retention(), shutdown.clone()));
        router.tasks.spawn(outbox::relay(readers, writer, sink, publish_timeout, shutdown.clone()));
        if let Some(address) = &config.router.admin_address {
            let state = router.admin_state(config.router.admin_token.clone());
            let bound = admin::serve(address, state, shutdown)
                .await
                .with_context(|| format!("starting the admin API on {address}"))?;
            router.admin_address = Some(bound);
        }
        Ok(router)
    }

    /// The admin API's view of this router, guarded by `token`.
    pub fn admin_state(&self, token: Option<Secret>) -> AdminState {
        AdminState {
            token,
            readers: self.readers.clone(),
            sources: self.sources.clone(),
            in_flight: self.in_flight.clone(),
            control: self.control.clone(),
        }
    }

    /// Whether every source is connected with every consumer running (always, on the bus).
    pub fn is_connected(&self) -> bool {
        self.sources.iter().all(|s| s.health.is_ready())
    }

    /// Messages taken from sources and not settled yet.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.get()
    }

    /// Whether nothing is in flight or parked for a retry, and the outbox is empty.
    pub fn is_idle(&self) -> bool {
        let parked = self.readers.parked_counts().map(|c| c.iter().map(|(_, n)| n).sum::<u64>());
        self.in_flight() == 0
            && parked.is_ok_and(|n| n == 0)
            && self.readers.outbox_backlog().map(|n| n == 0).unwrap_or(false)
    }

    /// Wait until the router has been idle for two checks in a row. With RabbitMQ this
    /// includes the broker's ready-message count of every queue given.
    pub async fn wait_idle(&self, queues_empty: impl AsyncFn() -> bool) {
        let mut quiet = 0;
        while quiet < 2 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if self.is_connected() && self.is_idle() && queues_empty().await {
                quiet += 1;
            } else {
                quiet = 0;
            }
        }
    }

    /// Stop gracefully: take no more messages (each plugin refuses new events, which stay
    /// with the broker), let the invocations under way finish and be acknowledged, give the
    /// outbox a chance to flush, all within `router.drain_timeout_ms`; then end every task,
    /// aborting those still running `TASK_STOP_GRACE` after the signal.
    /// Unsettled messages go back to the broker; parked events stay in the store.
    pub async fn stop(mut self) {
        let deadline = tokio::time::Instant::now() + self.drain_timeout;
        let plugins = self.plugins.snapshot();
        plugins.plugins.iter().for_each(Dispatch::close);
        let drained = futures::future::join_all(plugins.plugins.iter().map(Dispatch::drained));
        let drained = tokio::time::timeout_at(deadline, drained).await.is_ok();
        let flushed = tokio::time::timeout_at(deadline, async {
            while !self.readers.outbox_backlog().is_ok_and(|n| n == 0) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .is_ok();
        if drained && flushed {
            tracing::info!("drained: every event taken was settled and the outbox is empty");
        } else {
            tracing::warn!(
                drained,
                flushed,
                "stopping before everything settled; the rest is redelivered at the next start"
            );
        }
        self.shutdown.cancel();
        let ended = tokio::time::timeout(TASK_STOP_GRACE, async { while self.tasks.join_next().await.is_some() {} })
            .await
            .is_ok();
        if !ended {
            tracing::warn!(
                still_running = self.tasks.len(),
                grace = ?TASK_STOP_GRACE,
                "tasks did not end after the shutdown signal; aborting them"
            );
            self.tasks.shutdown().await;
        }
    }
}

/// A router dropped without [`Router::stop`] (an embedder's error path, a test that ends
/// early, a start that failed half-way) still ends what it started, without waiting for
/// anything: its tasks are aborted with their `JoinSet`, and the signal ends the admin API and
/// the plugins' lanes and retriers, which would otherwise hold the store's writer and the
/// admin port for the life of the runtime. What the lanes had taken and not settled goes back
/// to the broker, as after a crash.
impl Drop for Router {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.plugins.snapshot().plugins.iter().for_each(Dispatch::close);
    }
}

/// Start a plugin loaded at startup: its lanes' instances reserved, then its lanes.
async fn install(control: &Control, plugin: LoadedPlugin) -> anyhow::Result<Dispatch> {
    let name = plugin.name.to_string();
    let slots = plugin.reserve_lanes().with_context(|| format!("starting plugin {name}"))?;
    control.install(plugin, slots).await.with_context(|| format!("installing plugin {name}"))
}

/// Load a configured plugin: the version uploaded over the admin API if the registry has one
/// (it wins), else the file `router.toml` names.
async fn load(runtime: &Runtime, registry: &Registry, config: &PluginConfig) -> anyhow::Result<LoadedPlugin> {
    let mut overrides = Overrides::configured(config);
    let uploaded = registry
        .load(config.name.as_str(), Which::Current)
        .with_context(|| format!("reading the registry entry of {}", config.name))?;
    let (bytes, origin) = match uploaded {
        Some(entry) => {
            overrides.apply(&entry.settings).with_context(|| format!("registry settings of {}", config.name))?;
            (entry.bytes, "the admin registry".to_string())
        }
        None => {
            let bytes = std::fs::read(&config.path)
                .with_context(|| format!("reading plugin {} from {}", config.name, config.path.display()))?;
            (bytes, config.path.display().to_string())
        }
    };
    runtime
        .load(&config.name, &bytes, overrides)
        .await
        .with_context(|| format!("loading plugin {} from {origin}", config.name))
}

/// Load a plugin that only the registry knows (added over the admin API): the defaults of a
/// `[[plugins]]` entry with the settings it was uploaded with.
async fn load_uploaded(runtime: &Runtime, registry: &Registry, name: &PluginName) -> anyhow::Result<LoadedPlugin> {
    let entry = registry
        .load(name.as_str(), Which::Current)
        .with_context(|| format!("reading the registry entry of {name}"))?
        .with_context(|| format!("the registry entry of {name} disappeared"))?;
    let mut overrides = Overrides::defaults();
    overrides.apply(&entry.settings).with_context(|| format!("registry settings of {name}"))?;
    runtime
        .load(name, &entry.bytes, overrides)
        .await
        .with_context(|| format!("loading plugin {name} from the admin registry"))
}

/// Ready-message count of a queue, through a passive declare; `None` if it cannot be read.
pub async fn queue_depth(url: &str, queue: &str) -> Option<u32> {
    crate::source::rabbitmq::queue_depths(url, &[queue.to_string()]).await.pop().flatten()
}

/// Whether a data dir already holds a database.
pub fn has_database(data_dir: &Path) -> bool {
    db::path(data_dir).is_file()
}

/// The async runtime a router runs on: `router.worker_threads` workers.
pub fn runtime(config: &RouterConfig) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(config.worker_threads()).enable_all().build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Millis;
    use crate::testing::soon;

    /// A config whose data directory is `data` under `dir`, with `extra` lines of TOML: the
    /// `[router]` table's first, then other tables.
    fn config_in(dir: &Path, extra: &str) -> Config {
        let text = format!("[router]\ndata_dir = {:?}\n{extra}", dir.join("data"));
        Config::from_toml(&text, &dir.join("router.toml"), &|_| None).unwrap()
    }

    #[test]
    fn the_runtime_has_the_configured_workers_and_one_per_core_by_default() {
        let configured = RouterConfig { worker_threads: Some(3), ..Default::default() };
        assert_eq!(runtime(&configured).unwrap().metrics().num_workers(), 3);
        let cores = std::thread::available_parallelism().unwrap().get();
        assert_eq!(runtime(&RouterConfig::default()).unwrap().metrics().num_workers(), cores);
    }

    #[tokio::test]
    async fn a_second_router_on_a_data_directory_in_use_is_refused_until_the_first_stops() {
        let dir = tempfile::tempdir().unwrap();
        let config = || config_in(dir.path(), "");
        let first = Router::start(config()).await.unwrap();
        let refused = Router::start(config()).await.err().expect("a second router on the directory is refused");
        let message = format!("{refused:#}");
        assert!(message.contains("is in use by another router"), "{message}");
        assert!(message.contains("give this one its own router.data_dir"), "{message}");
        first.stop().await;
        let again = Router::start(config()).await.expect("the directory is free once the first router stopped");
        again.stop().await;
    }

    #[tokio::test]
    async fn a_router_dropped_without_stop_ends_what_it_started() {
        let dir = tempfile::tempdir().unwrap();
        let router = Router::start(config_in(dir.path(), "admin_address = \"127.0.0.1:0\"\n")).await.unwrap();
        let (handles, admin) = (router.control.writer.handles(), router.admin_address.unwrap());
        assert!(tokio::net::TcpStream::connect(admin).await.is_ok(), "the admin API listens");
        drop(router);
        assert!(soon(|| handles() == 0).await, "the admin API and every other task holding the writer end");
        assert!(tokio::net::TcpStream::connect(admin).await.is_err(), "the admin API no longer listens");
    }

    #[tokio::test]
    async fn a_stopped_router_lets_go_of_its_store_writer() {
        let dir = tempfile::tempdir().unwrap();
        let router = Router::start(config_in(dir.path(), "")).await.unwrap();
        let handles = router.control.writer.handles();
        assert!(handles() > 0);
        router.stop().await;
        assert!(soon(|| handles() == 0).await, "every task holding the writer ends, and so its thread");
    }

    #[tokio::test]
    async fn a_router_drops_processed_markers_older_than_its_retention_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let hour = 3_600_000;
        {
            let writer = Writer::start(&dir.path().join("data"), &Default::default()).unwrap();
            let now = Millis::now().0;
            writer
                .execute(format!(
                    "INSERT INTO processed (plugin, event_id, processed_at) \
                     VALUES ('p', 'two-hours-old', {}), ('p', 'half-an-hour-old', {})",
                    now - 2 * hour,
                    now - hour / 2
                ))
                .await
                .unwrap()
                .unwrap();
        }
        let router = Router::start(config_in(dir.path(), "[store]\nprocessed_retention_hours = 1\n")).await.unwrap();
        let pruned = soon(|| !router.readers.processed("p", "two-hours-old").unwrap()).await;
        assert!(pruned, "expired: pruned at start");
        assert!(router.readers.processed("p", "half-an-hour-old").unwrap(), "within the retention: kept");
        router.stop().await;
    }
}
