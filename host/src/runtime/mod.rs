//! The wasmtime side: one engine, plugins compiled and pre-instantiated once, and instances
//! that run one event at a time under hard limits.
//!
//! Lifecycle: [`Runtime::load`] compiles a component, links it against the capabilities,
//! calls its `metadata` and checks it; [`Instance`]s are created from the loaded plugin by the
//! dispatch lanes, reused or fresh per event as the plugin's [`InstancePolicy`] says.

pub mod bindings;
pub mod instance;
pub mod pool;
pub mod registry;
pub mod state;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, StoreLimits, StoreLimitsBuilder};

use crate::capability::PluginContext;
use crate::config::{AllowedHost, ConfigValue, InstancePolicy, Limits, PluginConfig, PluginName, RetryPolicy, Secret};
use crate::db::{self, Readers};
use crate::route::{Pattern, Subscriptions};

pub use instance::{Instance, InvokeError};
pub use pool::{InstancePool, LoadingSlot, PoolFull, Slots};
use state::HostState;

/// How often the engine's epoch advances: the granularity of timeouts and of yielding to
/// other tasks while a plugin computes.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Why a plugin could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("not a WebAssembly component: {0}")]
    NotAComponent(String),
    #[error("component does not fit the switchyard:plugin world: {0}")]
    Incompatible(String),
    /// The component could not be instantiated: its start trapped, or its initial memory is
    /// larger than the plugin's `memory_mb`.
    #[error("cannot instantiate the component: {0}")]
    Instantiate(String),
    #[error("the plugin's metadata call failed: {0}")]
    Metadata(String),
    #[error("invalid metadata: {0}")]
    InvalidMetadata(String),
    #[error("config names the plugin {configured:?} but the component says it is {reported:?}")]
    NameMismatch { configured: String, reported: String },
    #[error("config value {key}: environment variable {var} is not set")]
    MissingEnv { key: String, var: String },
}

/// Settings of a plugin as the router runs it: the component's metadata overridden by
/// configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub subscriptions: Subscriptions,
    pub ordering_key: Vec<String>,
    pub concurrency: usize,
    /// The RabbitMQ consumer's prefetch; `None`: the router-wide `rabbitmq.prefetch`.
    pub prefetch: Option<u16>,
    pub instances: InstancePolicy,
    pub recycle_after: u64,
    pub limits: Limits,
    pub retry: RetryPolicy,
    /// Config values, environment references resolved.
    pub config: BTreeMap<String, Secret>,
    /// Config values as given (`{ env = "NAME" }` kept as a reference), what the registry keeps.
    pub config_source: BTreeMap<String, ConfigValue>,
    /// Hosts the plugin may reach over `wasi:http`.
    pub allowed_hosts: Vec<AllowedHost>,
    /// Event names the plugin may publish.
    pub publishes: Vec<Pattern>,
}

/// What the caller overrides when loading; `None` keeps the component's own metadata.
#[derive(Debug, Clone)]
pub struct Overrides {
    pub subscriptions: Option<Vec<Pattern>>,
    pub ordering_key: Option<Vec<String>>,
    pub concurrency: usize,
    pub prefetch: Option<u16>,
    pub instances: InstancePolicy,
    pub recycle_after: u64,
    pub limits: Limits,
    pub retry: RetryPolicy,
    /// Config values, resolved from the environment when the plugin is loaded.
    pub config: BTreeMap<String, ConfigValue>,
    pub allowed_hosts: Vec<AllowedHost>,
    pub publishes: Vec<Pattern>,
}

impl Overrides {
    /// What a plugin that `router.toml` does not name starts from: the defaults of a
    /// `[[plugins]]` entry, and the component's own subscriptions and ordering key.
    pub fn defaults() -> Self {
        Overrides {
            subscriptions: None,
            ordering_key: None,
            concurrency: crate::config::default_concurrency(),
            prefetch: None,
            instances: InstancePolicy::default(),
            recycle_after: crate::config::default_recycle_after(),
            limits: Limits::default(),
            retry: RetryPolicy::default(),
            config: BTreeMap::new(),
            allowed_hosts: Vec::new(),
            publishes: Vec::new(),
        }
    }

    /// What a `[[plugin]]` entry of `router.toml` sets.
    pub fn configured(config: &PluginConfig) -> Self {
        Overrides {
            subscriptions: config.subscriptions.clone(),
            ordering_key: config.ordering_key.clone(),
            concurrency: config.concurrency,
            prefetch: config.prefetch,
            instances: config.instances,
            recycle_after: config.recycle_after,
            limits: config.limits,
            retry: config.retry,
            config: config.config.clone(),
            allowed_hosts: config.allowed_hosts.clone(),
            publishes: config.publishes.clone(),
        }
    }

    /// Apply the settings an upload was stored with.
    pub fn apply(&mut self, stored: &registry::StoredSettings) -> Result<(), registry::SettingsError> {
        if let Some(subscriptions) = &stored.subscriptions {
            self.subscriptions = Some(subscriptions.iter().map(|s| Pattern::parse(s)).collect::<Result<_, _>>()?);
        }
        if let Some(key) = &stored.ordering_key {
            self.ordering_key = Some(key.clone());
        }
        self.concurrency = stored.concurrency.unwrap_or(self.concurrency);
        self.prefetch = stored.prefetch.or(self.prefetch);
        self.instances = stored.instances;
        self.recycle_after = stored.recycle_after;
        self.limits = stored.limits;
        self.retry = stored.retry.unwrap_or(self.retry);
        if let Some(config) = &stored.config {
            self.config = config.clone();
        }
        if let Some(hosts) = &stored.allowed_hosts {
            self.allowed_hosts = hosts.iter().map(|h| AllowedHost::parse(h)).collect::<Result<_, _>>()?;
        }
        if let Some(names) = &stored.publishes {
            self.publishes = names.iter().map(|p| Pattern::parse(p)).collect::<Result<_, _>>()?;
        }
        Ok(())
    }

    /// The overrides that reproduce a loaded plugin's settings.
    pub fn of(settings: &Settings) -> Self {
        Overrides {
            subscriptions: Some(settings.subscriptions.0.clone()),
            ordering_key: Some(settings.ordering_key.clone()),
            concurrency: settings.concurrency,
            prefetch: settings.prefetch,
            instances: settings.instances,
            recycle_after: settings.recycle_after,
            limits: settings.limits,
            retry: settings.retry,
            config: settings.config_source.clone(),
            allowed_hosts: settings.allowed_hosts.clone(),
            publishes: settings.publishes.clone(),
        }
    }
}

impl Settings {
    /// What the registry keeps of these settings.
    pub fn stored(&self) -> registry::StoredSettings {
        registry::StoredSettings {
            subscriptions: Some(self.subscriptions.0.iter().map(|p| p.as_str().to_string()).collect()),
            ordering_key: Some(self.ordering_key.clone()),
            concurrency: Some(self.concurrency),
            prefetch: self.prefetch,
            instances: self.instances,
            recycle_after: self.recycle_after,
            limits: self.limits,
            retry: Some(self.retry),
            config: Some(self.config_source.clone()),
            allowed_hosts: Some(self.allowed_hosts.iter().map(|h| h.as_str().to_string()).collect()),
            publishes: Some(self.publishes.iter().map(|p| p.as_str().to_string()).collect()),
        }
    }
}

/// A compiled, checked and pre-instantiated plugin version.
pub struct LoadedPlugin {
    pub name: PluginName,
    /// The component's bytes, kept so the registry can persist the version in use.
    pub bytes: Arc<Vec<u8>>,
    pub version: String,
    /// sha256 of the component bytes, hex.
    pub digest: String,
    /// The version of the `switchyard:plugin` contract the component was built against (that
    /// of the `handler` it exports); `None` for an unversioned export.
    pub contract: Option<String>,
    pub settings: Settings,
    pub indexes: Vec<(String, String)>,
    pre: bindings::PluginPre<HostState>,
    context: Arc<PluginContext>,
    engine: Engine,
    pool: Arc<InstancePool>,
}

impl LoadedPlugin {
    /// This version as the registry keeps it.
    pub fn entry(&self) -> registry::Entry {
        registry::Entry { bytes: self.bytes.as_ref().clone(), settings: self.settings.stored() }
    }

    /// An instance of the engine's pool for each of the lanes this version starts with.
    pub fn reserve_lanes(&self) -> Result<Slots, PoolFull> {
        self.pool.reserve(self.lanes())
    }

    /// The lanes this version starts with: its `concurrency`.
    pub fn lanes(&self) -> usize {
        self.settings.concurrency.max(1)
    }

    fn store_limits(&self) -> StoreLimits {
        store_limits(self.settings.limits)
    }
}

/// A store's limits under a plugin's `limits`: its memory capped at `memory_mb`, a growth past
/// it a trap.
fn store_limits(limits: Limits) -> StoreLimits {
    let bytes = usize::try_from(limits.memory_mb.saturating_mul(1024 * 1024)).unwrap_or(usize::MAX);
    StoreLimitsBuilder::new().memory_size(bytes).trap_on_grow_failure(true).build()
}

/// The wasmtime engine shared by every plugin, with its epoch ticker.
pub struct Runtime {
    engine: Engine,
    linker: Linker<HostState>,
    readers: Readers,
    ticking: Arc<AtomicBool>,
    pool: Arc<InstancePool>,
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.ticking.store(false, Ordering::Relaxed);
    }
}

impl Runtime {
    /// An engine with epoch interruption and a pool of `max_instances` instances for the
    /// plugins' lanes, and a linker offering exactly the plugin world's imports plus the WASI
    /// interfaces Rust's standard library needs (sandboxed by [`HostState`]).
    pub fn new(readers: Readers, max_instances: u32) -> anyhow::Result<Self> {
        let mut config = Config::new();
        config.wasm_component_model(true).epoch_interruption(true);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(InstancePool::allocation(max_instances)));
        let engine = Engine::new(&config)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
        bindings::Plugin::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)?;
        let ticking = Arc::new(AtomicBool::new(true));
        let weak = engine.weak();
        let running = ticking.clone();
        thread::Builder::new().name("switchyard-epoch".into()).spawn(move || {
            while running.load(Ordering::Relaxed) {
                thread::sleep(EPOCH_TICK);
                match weak.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => break,
                }
            }
        })?;
        Ok(Runtime { engine, linker, readers, ticking, pool: InstancePool::new(max_instances) })
    }

    /// Instances the pool holds for the plugins' lanes: `router.max_instances`.
    pub fn max_instances(&self) -> usize {
        self.pool.capacity()
    }

    /// Instances the lanes of running plugins hold now, of [`max_instances`](Self::max_instances).
    pub fn instances_reserved(&self) -> usize {
        self.pool.reserved()
    }

    /// Compile, link and describe a plugin; nothing of the running router changes.
    pub async fn load(&self, name: &PluginName, bytes: &[u8], overrides: Overrides) -> Result<LoadedPlugin, LoadError> {
        let mut config = BTreeMap::new();
        for (key, value) in &overrides.config {
            let resolved = match value {
                ConfigValue::Text(text) => text.clone(),
                ConfigValue::Env { env } => {
                    std::env::var(env).map_err(|_| LoadError::MissingEnv { key: key.clone(), var: env.clone() })?
                }
            };
            config.insert(key.clone(), Secret::new(resolved));
        }
        let component = Component::new(&self.engine, bytes).map_err(|e| LoadError::NotAComponent(format!("{e:#}")))?;
        let pre = self.linker.instantiate_pre(&component).map_err(|e| LoadError::Incompatible(format!("{e:#}")))?;
        let pre = bindings::PluginPre::new(pre).map_err(|e| LoadError::Incompatible(format!("{e:#}")))?;
        let context = Arc::new(PluginContext {
            name: Arc::from(name.as_str()),
            readers: self.readers.clone(),
            indexes: HashSet::new(),
            config: config.clone(),
            allowed_hosts: overrides.allowed_hosts.iter().cloned().collect(),
            publishes: Subscriptions(overrides.publishes.clone()),
        });
        let loading = self.pool.loading().await;
        let metadata = describe(&self.engine, &pre, context.clone(), overrides.limits, loading).await?;
        if metadata.name != name.as_str() {
            return Err(LoadError::NameMismatch { configured: name.to_string(), reported: metadata.name });
        }
        let own_subscriptions = metadata
            .subscriptions
            .iter()
            .map(|s| Pattern::parse(s).map_err(|e| LoadError::InvalidMetadata(format!("subscription: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let mut indexes = Vec::new();
        for index in &metadata.indexes {
            if index.collection.is_empty() || index.collection.contains('\0') || !db::valid_field(&index.field) {
                return Err(LoadError::InvalidMetadata(format!(
                    "index {}.{}: the collection must be non-empty without NUL, and the field 1-64 of [A-Za-z0-9_]",
                    index.collection, index.field
                )));
            }
            indexes.push((index.collection.clone(), index.field.clone()));
        }
        let context = Arc::new(PluginContext {
            name: context.name.clone(),
            readers: self.readers.clone(),
            indexes: indexes.iter().cloned().collect(),
            config: config.clone(),
            allowed_hosts: context.allowed_hosts.clone(),
            publishes: context.publishes.clone(),
        });
        let settings = Settings {
            subscriptions: Subscriptions(overrides.subscriptions.unwrap_or(own_subscriptions)),
            ordering_key: overrides.ordering_key.unwrap_or(metadata.ordering_key),
            concurrency: overrides.concurrency,
            prefetch: overrides.prefetch,
            instances: overrides.instances,
            recycle_after: overrides.recycle_after,
            limits: overrides.limits,
            retry: overrides.retry,
            config,
            config_source: overrides.config,
            allowed_hosts: overrides.allowed_hosts,
            publishes: overrides.publishes,
        };
        Ok(LoadedPlugin {
            name: name.clone(),
            bytes: Arc::new(bytes.to_vec()),
            version: metadata.version,
            digest: Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect(),
            contract: contract_of(&component, &self.engine),
            settings,
            indexes,
            pre,
            context,
            engine: self.engine.clone(),
            pool: self.pool.clone(),
        })
    }
}

/// The contract version a component was built against: that of the `handler` it exports
/// (`switchyard:plugin/handler@0.1.0` → `0.1.0`).
fn contract_of(component: &Component, engine: &Engine) -> Option<String> {
    let ty = component.component_type();
    ty.exports(engine).find_map(|(name, _)| name.strip_prefix("switchyard:plugin/handler@").map(str::to_string))
}

/// Instantiate once, in a loading slot of the pool (held until the instance is dropped), and
/// ask the plugin who it is.
async fn describe(
    engine: &Engine,
    pre: &bindings::PluginPre<HostState>,
    context: Arc<PluginContext>,
    limits: Limits,
    _loading: LoadingSlot,
) -> Result<bindings::Metadata, LoadError> {
    let mut store = instance::new_store(engine, HostState::new(context, store_limits(limits)), limits.timeout_ms);
    // Bounded like an invocation, also while the plugin waits in a host call.
    let timeout = Duration::from_millis(limits.timeout_ms) + EPOCH_TICK;
    let describe = async {
        let plugin = pre.instantiate_async(&mut store).await.map_err(|e| LoadError::Instantiate(format!("{e:#}")))?;
        plugin
            .switchyard_plugin_handler()
            .call_metadata(&mut store)
            .await
            .map_err(|e| LoadError::Metadata(format!("{e:#}")))
    };
    match tokio::time::timeout(timeout, describe).await {
        Ok(result) => result,
        Err(_) => Err(LoadError::Metadata(format!("no answer within {} ms", limits.timeout_ms))),
    }
}
