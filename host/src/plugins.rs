//! The live set of plugins. The router starts with the configured ones; the admin API adds,
//! swaps and removes plugins while events flow, and every source follows the set: it starts a
//! consumer for a plugin that appears, stops and drains the one of a plugin that goes, and
//! re-subscribes when subscriptions change.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::commit::Writer;
use crate::config::{PluginConfig, PluginName, RabbitMqConfig, RedisConfig};
use crate::db::{self, Readers};
use crate::dispatch::{Dispatch, PluginSlot};
use crate::retry::Retrier;
use crate::runtime::registry::{Registry, Which};
use crate::runtime::{LoadError, LoadedPlugin, Overrides, PoolFull, Runtime, Slots};
use crate::source::rabbitmq::{Deleted, RabbitMqSource, consumer_count, delete_unused_queue, rebind};
use crate::source::redis::{LeftGroups, destroy_groups, left_groups};
use crate::source::{Health, InFlight};

/// Every running plugin, in the order they were added. Cheap to clone; clones share the set.
#[derive(Clone)]
pub struct PluginSet {
    current: Arc<watch::Sender<Arc<Members>>>,
    followers: Arc<Mutex<Vec<Follower>>>,
}

/// The plugins at one moment; `generation` counts the changes so far.
pub struct Members {
    pub generation: u64,
    pub plugins: Vec<Dispatch>,
}

/// A source that follows the set, as [`PluginSet::settled`] sees it.
struct Follower {
    followed: watch::Receiver<u64>,
    /// A source that is down is not waited for: it starts from the newest set when it is back.
    health: Arc<Health>,
}

/// A source's handle to say which generation of the set it has applied.
pub struct Following(watch::Sender<u64>);

impl Following {
    /// Everything up to `generation` is applied: consumers started and stopped, channels
    /// subscribed.
    pub fn followed(&self, generation: u64) {
        self.0.send_replace(generation);
    }
}

/// A plugin of that name is already running.
#[derive(Debug, thiserror::Error)]
#[error("a plugin named {0:?} is already running")]
pub struct AlreadyRunning(pub String);

impl PluginSet {
    pub fn new(plugins: Vec<Dispatch>) -> Self {
        let members = Members { generation: 0, plugins };
        PluginSet { current: Arc::new(watch::Sender::new(Arc::new(members))), followers: Default::default() }
    }

    /// The plugins running now.
    pub fn snapshot(&self) -> Arc<Members> {
        self.current.borrow().clone()
    }

    /// The running plugin of that name.
    pub fn get(&self, name: &str) -> Option<Dispatch> {
        self.current.borrow().plugins.iter().find(|d| d.name() == name).cloned()
    }

    /// Change the set with `change`, which returns false to leave it as it is.
    fn change(&self, change: impl FnOnce(&mut Vec<Dispatch>) -> bool) {
        self.current.send_if_modified(|members| {
            let mut plugins = members.plugins.clone();
            if !change(&mut plugins) {
                return false;
            }
            *members = Arc::new(Members { generation: members.generation + 1, plugins });
            true
        });
    }

    /// Start delivering events to a new plugin.
    pub fn add(&self, dispatch: Dispatch) -> Result<(), AlreadyRunning> {
        let mut outcome = Ok(());
        self.change(|plugins| {
            if plugins.iter().any(|d| d.name() == dispatch.name()) {
                outcome = Err(AlreadyRunning(dispatch.name().to_string()));
                return false;
            }
            plugins.push(dispatch.clone());
            true
        });
        outcome
    }

    /// Take a plugin out of the set and close it: it accepts no more events, and the sources
    /// stop its consumers. Wait on [`Dispatch::drained`] for the events it already took.
    pub fn remove(&self, name: &str) -> Option<Dispatch> {
        let mut removed = None;
        self.change(|plugins| {
            let Some(index) = plugins.iter().position(|d| d.name() == name) else { return false };
            removed = Some(plugins.remove(index));
            true
        });
        if let Some(dispatch) = &removed {
            dispatch.close();
        }
        removed
    }

    /// Tell the sources that a plugin's settings changed (a swap or a rollback), so that they
    /// subscribe to what it subscribes to now.
    pub fn touch(&self) {
        self.change(|_| true);
    }

    /// Follow the set: the receiver sees every change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Members>> {
        self.current.subscribe()
    }

    /// Register a source that follows the set, as up or down as `health` says.
    pub fn follower(&self, health: Arc<Health>) -> Following {
        let (tx, rx) = watch::channel(0);
        if let Ok(mut followers) = self.followers.lock() {
            followers.push(Follower { followed: rx, health });
        }
        Following(tx)
    }

    /// Wait until every connected source has applied the set as it is now, for at most
    /// `timeout`; returns whether they all did.
    pub async fn settled(&self, timeout: Duration) -> bool {
        let target = self.current.borrow().generation;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let behind = match self.followers.lock() {
                Ok(followers) => followers.iter().any(|f| f.health.is_up() && *f.followed.borrow() < target),
                Err(_) => false,
            };
            if !behind {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The consumers a source runs for the plugins of the set, by plugin: what it starts when a
/// plugin appears and stops when the plugin goes. `T` is what the source keeps with them.
pub struct Consumers<T> {
    running: HashMap<String, Consumer<T>>,
}

/// What [`Consumers::follow`] changed.
pub struct Followed<'a, T> {
    /// The plugins that have no consumers yet: the source starts theirs.
    pub missing: Vec<&'a Dispatch>,
    /// What the source kept with the consumers it just stopped.
    pub stopped: Vec<T>,
}

struct Consumer<T> {
    /// Which plugin they feed: a plugin removed and added again under the same name is another.
    slot: Arc<PluginSlot>,
    stop: CancellationToken,
    kept: T,
}

impl<T> Default for Consumers<T> {
    fn default() -> Self {
        Consumers { running: HashMap::new() }
    }
}

impl<T> Consumers<T> {
    /// Stop the consumers of plugins no longer in `plugins`; returns what was kept with them,
    /// and the plugins of `plugins` that have no consumers yet.
    pub fn follow<'a>(&mut self, plugins: &'a [Dispatch]) -> Followed<'a, T> {
        let gone = self.running.extract_if(|name, consumer| {
            !plugins.iter().any(|d| d.name() == name && Arc::ptr_eq(d.slot(), &consumer.slot))
        });
        let stopped = gone
            .map(|(_, consumer)| {
                consumer.stop.cancel();
                consumer.kept
            })
            .collect();
        let missing = plugins.iter().filter(|d| !self.running.contains_key(d.name())).collect();
        Followed { missing, stopped }
    }

    /// Record the consumers started for `dispatch`, which `stop` ends.
    pub fn started(&mut self, dispatch: &Dispatch, stop: CancellationToken, kept: T) {
        let consumer = Consumer { slot: dispatch.slot().clone(), stop, kept };
        self.running.insert(dispatch.name().to_string(), consumer);
    }

    pub fn len(&self) -> usize {
        self.running.len()
    }

    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    /// What the source keeps with each plugin's consumers.
    pub fn kept(&self) -> impl Iterator<Item = &T> {
        self.running.values().map(|c| &c.kept)
    }
}

/// How long a change waits for the sources to apply it.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a plugin change waits for the broker to declare, bind, unbind or delete its queue
/// (and for Redis to look up or delete its consumer groups).
const BROKER_TIMEOUT: Duration = Duration::from_secs(10);

/// Changes to the running plugins, each made whole or not at all: what the admin API's
/// plugin routes do, and how the router installs its plugins at start.
#[derive(Clone)]
pub struct Control {
    pub plugins: PluginSet,
    pub runtime: Arc<Runtime>,
    pub writer: Writer,
    pub readers: Readers,
    pub registry: Registry,
    pub rabbitmq: Option<RabbitMqConfig>,
    pub redis: Option<RedisConfig>,
    /// The `[[plugin]]` entries of `router.toml`.
    pub configured: Arc<Vec<PluginConfig>>,
    pub in_flight: Arc<InFlight>,
    /// Held by each change, so that changes happen one at a time.
    pub changing: Arc<tokio::sync::Mutex<()>>,
}

/// Why a change to the plugins was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no plugin named {0:?} is running")]
    NotFound(String),
    #[error(transparent)]
    AlreadyRunning(#[from] AlreadyRunning),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("plugin {0} has no previous version to roll back to")]
    NoPrevious(String),
    #[error("the registry: {0}")]
    Registry(#[from] std::io::Error),
    #[error("indexing {collection}.{field}: {reason}")]
    Index { collection: String, field: String, reason: String },
    #[error("RabbitMQ queue {queue}: {reason}")]
    Broker { queue: String, reason: String },
    #[error("Redis: {0}")]
    Redis(String),
    #[error(transparent)]
    PoolFull(#[from] PoolFull),
    /// What the next start would reserve, were the change made.
    #[error(
        "at the next start the plugins would need {demand} instances, one per lane (router.toml's \
         plugins, running or not, and those added over the API, with this change), more than \
         router.max_instances = {capacity}; raise it or lower a concurrency"
    )]
    NextStart { demand: usize, capacity: usize },
    /// What a name that is not running could have left, and did not: `looked` says where.
    #[error("no plugin named {name:?} is running, and nothing is left by one: {looked}")]
    NothingLeft { name: String, looked: String },
    #[error(
        "queue {0} has a consumer of another router: a plugin of that name runs there with the \
         same rabbitmq.queue_prefix; nothing is removed or deleted"
    )]
    QueueInUse(String),
    #[error("queue {0} is one of rabbitmq.ingress_queues, not a plugin's; it is kept")]
    IngressQueue(String),
    #[error(
        "Redis consumer group {group} on stream {stream} is read by another router (a connection \
         of its is named for the group, or its consumer read in the last 30 s): a plugin of that \
         name runs there with the same redis.streams.group_prefix; nothing is removed or deleted"
    )]
    GroupInUse { group: String, stream: String },
}

/// Whether this router consumes from the queue a discard would delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Consuming {
    /// The plugin runs here: one consumer on its queue is this router's.
    Here,
    /// The plugin does not run here: any consumer on its queue is another router's, which
    /// the deletion itself refuses.
    Elsewhere,
}

/// A version change of a plugin: what runs now and what it replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub version: String,
    pub digest: String,
    /// The digest of the version replaced, `None` for a new plugin.
    pub previous_digest: Option<String>,
}

/// How a removal ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removal {
    /// Whether every event the plugin had taken settled, and its lanes stopped (their
    /// instances back in the pool), within the deadline; events that did not settle are still
    /// handled, or given back to the broker.
    pub drained: bool,
    /// Whether its queue (or consumer groups) and their events were discarded.
    pub discarded: bool,
    /// How many events the deleted RabbitMQ queue held; `None` when none was deleted.
    pub discarded_events: Option<u32>,
    /// How many Redis consumer groups were deleted, one per stream; `None` when Redis
    /// Streams are not configured or the groups could not be deleted.
    pub discarded_groups: Option<u32>,
}

impl Control {
    /// What a new version of plugin `name` starts from before its own settings: the running
    /// version's settings, else its `router.toml` entry, else the defaults of an entry.
    pub fn base_settings(&self, name: &str) -> Overrides {
        if let Some(running) = self.plugins.get(name) {
            return Overrides::of(&running.slot().current().settings);
        }
        match self.configured.iter().find(|p| p.name.as_str() == name) {
            Some(config) => Overrides::configured(config),
            None => Overrides::defaults(),
        }
    }

    /// Create a loaded plugin's indexes and start its lanes, one per instance `slots` holds
    /// (see [`LoadedPlugin::reserve_lanes`]), and its retrier; it is not in the set yet.
    pub async fn install(&self, plugin: LoadedPlugin, slots: Slots) -> Result<Dispatch, ControlError> {
        self.create_indexes(&plugin).await?;
        tracing::info!(
            plugin = %plugin.name,
            version = %plugin.version,
            digest = %plugin.digest,
            subscriptions = ?plugin.settings.subscriptions.0.iter().map(|p| p.as_str()).collect::<Vec<_>>(),
            "plugin loaded"
        );
        let dispatch =
            Dispatch::start(Arc::new(PluginSlot::new(plugin)), slots, self.writer.clone(), self.readers.clone());
        let retrier = Retrier {
            dispatch: dispatch.clone(),
            readers: self.readers.clone(),
            writer: self.writer.clone(),
            in_flight: self.in_flight.clone(),
        };
        tokio::spawn(retrier.run());
        Ok(dispatch)
    }

    /// Whether the next start, which reserves every lane of the plugins it loads (those
    /// running, with their current settings, and `router.toml`'s that are not), fits the
    /// instance pool with `plugin` in place of its name's current version.
    fn fits_next_start(&self, plugin: &LoadedPlugin) -> Result<(), ControlError> {
        let name = plugin.name.as_str();
        let running = self.plugins.snapshot();
        let is_running = |other: &str| running.plugins.iter().any(|d| d.name() == other);
        let others_running = running.plugins.iter().filter(|d| d.name() != name).map(|d| d.slot().current().lanes());
        let configured_stopped = self
            .configured
            .iter()
            .filter(|c| c.name.as_str() != name && !is_running(c.name.as_str()))
            .map(PluginConfig::lanes);
        let demand = plugin.lanes() + others_running.sum::<usize>() + configured_stopped.sum::<usize>();
        let capacity = self.runtime.max_instances();
        if demand > capacity {
            return Err(ControlError::NextStart { demand, capacity });
        }
        Ok(())
    }

    async fn create_indexes(&self, plugin: &LoadedPlugin) -> Result<(), ControlError> {
        for (collection, field) in &plugin.indexes {
            let failed =
                |reason: String| ControlError::Index { collection: collection.clone(), field: field.clone(), reason };
            let index = db::FieldIndex { plugin: plugin.name.as_str(), collection, field };
            match self.writer.execute(index.ddl()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(failed(e)),
                Err(e) => return Err(failed(e.to_string())),
            }
        }
        Ok(())
    }

    /// Start a plugin that is not running: its queue is declared and bound first, so that no
    /// event published from now on misses it, then its indexes are created and its lanes
    /// started, and only then is it kept in the registry and added: a failed addition leaves
    /// no registry entry for the next start to load.
    pub async fn add(&self, plugin: LoadedPlugin) -> Result<Change, ControlError> {
        let _one_at_a_time = self.changing.lock().await;
        let name = plugin.name.to_string();
        if self.plugins.get(&name).is_some() {
            return Err(AlreadyRunning(name).into());
        }
        // Before anything is bound or kept: a plugin that does not fit the pool changes nothing.
        let slots = plugin.reserve_lanes()?;
        self.fits_next_start(&plugin)?;
        self.bind(&name, &pattern_names(&plugin), &[]).await?;
        let entry = plugin.entry();
        let change = Change { version: plugin.version.clone(), digest: plugin.digest.clone(), previous_digest: None };
        let dispatch = self.install(plugin, slots).await?;
        // A closed dispatch that took no event stops its lanes at once, giving their instances back.
        if let Err(e) = self.registry.save(&name, &entry, None) {
            dispatch.close();
            return Err(e.into());
        }
        if let Err(e) = self.plugins.add(dispatch.clone()) {
            dispatch.close();
            return Err(e.into());
        }
        self.settle(&name).await;
        tracing::info!(plugin = %name, version = %change.version, "plugin added");
        Ok(change)
    }

    /// Replace a running plugin's version: invocations under way finish on the old version,
    /// every event started afterwards runs the new one. New subscriptions are bound before
    /// the swap and old ones unbound after it, so no event falls between them. The registry
    /// keeps the replaced version for [`rollback`](Self::rollback).
    pub async fn swap(&self, plugin: LoadedPlugin) -> Result<Change, ControlError> {
        let _one_at_a_time = self.changing.lock().await;
        self.swap_now(plugin).await
    }

    async fn swap_now(&self, plugin: LoadedPlugin) -> Result<Change, ControlError> {
        let name = plugin.name.to_string();
        let dispatch = self.plugins.get(&name).ok_or_else(|| ControlError::NotFound(name.clone()))?;
        // The lanes stay; a larger `concurrency` starts at the next start, which must not fail.
        self.fits_next_start(&plugin)?;
        let current = dispatch.slot().current();
        self.create_indexes(&plugin).await?;
        let (old, new) = (pattern_names(&current), pattern_names(&plugin));
        let added: Vec<String> = new.iter().filter(|s| !old.contains(s)).cloned().collect();
        let removed: Vec<String> = old.iter().filter(|s| !new.contains(s)).cloned().collect();
        self.bind(&name, &added, &[]).await?;
        self.registry.save(&name, &plugin.entry(), Some(&current.entry()))?;
        let change = Change {
            version: plugin.version.clone(),
            digest: plugin.digest.clone(),
            previous_digest: Some(current.digest.clone()),
        };
        dispatch.slot().swap(plugin);
        self.plugins.touch();
        self.settle(&name).await;
        tracing::info!(plugin = %name, version = %change.version, digest = %change.digest, "plugin swapped");
        if let Err(e) = self.bind(&name, &[], &removed).await {
            tracing::warn!(plugin = %name, error = %e, "could not unbind old subscriptions; the plugin may receive events it no longer subscribes to");
        }
        Ok(change)
    }

    /// Swap back to the version the current one replaced, as the registry kept it (so this
    /// works after a restart too); the replaced version becomes the one to roll back to.
    pub async fn rollback(&self, name: &str) -> Result<Change, ControlError> {
        let _one_at_a_time = self.changing.lock().await;
        let dispatch = self.plugins.get(name).ok_or_else(|| ControlError::NotFound(name.to_string()))?;
        let previous =
            self.registry.load(name, Which::Previous)?.ok_or_else(|| ControlError::NoPrevious(name.to_string()))?;
        let current = dispatch.slot().current();
        let mut overrides = Overrides::of(&current.settings);
        overrides.apply(&previous.settings).map_err(|e| LoadError::InvalidMetadata(e.to_string()))?;
        let plugin = self.runtime.load(&current.name, &previous.bytes, overrides).await?;
        self.swap_now(plugin).await
    }

    /// Remove a plugin: it takes no more events, its consumers stop, the invocations under way
    /// finish and are acknowledged and its lanes stop, giving their instances back to the pool
    /// (within `drain_timeout`), and the events it had queued but not started go back to the
    /// broker. Its queue is unbound but keeps what is in it, for when the plugin comes back,
    /// unless `discard` deletes the queue (and the Redis consumer groups) with their events:
    /// refused, with nothing changed, when another router consumes from the queue or reads
    /// the groups, or the queue is an ingress queue. The registry forgets it; a plugin that
    /// `router.toml` names comes back from there at the next start.
    ///
    /// For a name that is not running, `discard` deletes the RabbitMQ queue it left behind
    /// (kept at its removal, or declared and bound by a failed [`add`](Self::add)) and its
    /// Redis consumer groups, unless another router uses either.
    pub async fn remove(&self, name: &str, discard: bool, drain_timeout: Duration) -> Result<Removal, ControlError> {
        let _one_at_a_time = self.changing.lock().await;
        let Some(dispatch) = self.plugins.get(name) else {
            return if discard {
                self.discard_leftover(name).await
            } else {
                Err(ControlError::NotFound(name.to_string()))
            };
        };
        if discard {
            self.discardable(name, Consuming::Here).await?;
        }
        self.bind(name, &[], &pattern_names(&dispatch.slot().current())).await?;
        let Some(dispatch) = self.plugins.remove(name) else { return Err(ControlError::NotFound(name.to_string())) };
        // A closed plugin's lanes stop once every event it took is settled: when they have,
        // it is drained and its instances are back in the pool.
        let drained = tokio::time::timeout(drain_timeout, dispatch.stopped()).await.is_ok();
        if !drained {
            tracing::warn!(
                plugin = %name,
                pending = dispatch.pending(),
                "removed plugin still has events under way, or lanes finishing them"
            );
        }
        self.registry.remove(name)?;
        let removal = if discard {
            // Once the sources have followed the removal, this router's consumer is off the queue.
            self.settle(name).await;
            self.discard(name, drained).await?
        } else {
            Removal { drained, discarded: false, discarded_events: None, discarded_groups: None }
        };
        tracing::info!(plugin = %name, drained, discard, "plugin removed");
        Ok(removal)
    }

    /// Refuse to discard what `name` has on the brokers when it may not be its alone: its
    /// RabbitMQ queue is an ingress queue (an empty `queue_prefix` can make a plugin's queue
    /// name one) or, for a plugin running here, has a consumer besides this router's, or
    /// another router reads its Redis consumer groups (a plugin of that name runs there).
    /// Returns its groups.
    async fn discardable(&self, name: &str, consuming: Consuming) -> Result<Option<LeftGroups>, ControlError> {
        let groups = match &self.redis {
            Some(redis) => on_redis(left_groups(redis, name)).await?,
            None => None,
        };
        if let Some(LeftGroups { group, read_elsewhere: Some(stream), .. }) = &groups {
            return Err(ControlError::GroupInUse { group: group.clone(), stream: stream.clone() });
        }
        if let Some(rabbit) = &self.rabbitmq {
            let queue = RabbitMqSource::queue_name(rabbit, name);
            if rabbit.ingress_queues.contains(&queue) {
                return Err(ControlError::IngressQueue(queue));
            }
            // A running plugin's queue has this router's one consumer, which the deletion's
            // `if_unused` cannot tell from another router's: count them first. A leftover
            // queue's deletion refuses any consumer by itself.
            if consuming == Consuming::Here
                && on_broker(&queue, consumer_count(rabbit, &queue)).await?.is_some_and(|n| n > 1)
            {
                return Err(ControlError::QueueInUse(queue));
            }
        }
        Ok(groups)
    }

    /// Delete what `name` left behind (kept at its removal, or left by a failed addition): its
    /// RabbitMQ queue with its events and its Redis consumer groups, unless another router
    /// uses either. Both are checked before either is deleted.
    async fn discard_leftover(&self, name: &str) -> Result<Removal, ControlError> {
        let not_found = || ControlError::NotFound(name.to_string());
        PluginName::parse(name).map_err(|_| not_found())?;
        let groups = self.discardable(name, Consuming::Elsewhere).await?;
        if self.rabbitmq.is_none() && groups.is_none() {
            return Err(not_found());
        }
        let mut looked = Vec::new();
        let mut discarded_events = None;
        if let Some(rabbit) = &self.rabbitmq {
            let queue = RabbitMqSource::queue_name(rabbit, name);
            match on_broker(&queue, delete_unused_queue(rabbit, &queue)).await? {
                Deleted::Messages(events) => discarded_events = Some(events),
                Deleted::Missing => looked.push(format!("RabbitMQ has no queue {queue}")),
                Deleted::InUse => return Err(ControlError::QueueInUse(queue)),
            }
        }
        let mut discarded_groups = None;
        if let (Some(redis), Some(groups)) = (&self.redis, groups) {
            if groups.streams.is_empty() {
                looked.push(format!("Redis has no consumer group {} on its streams", groups.group));
            } else {
                discarded_groups = on_redis(destroy_groups(redis, name)).await?;
            }
        }
        if discarded_events.is_none() && discarded_groups.is_none() {
            return Err(ControlError::NothingLeft { name: name.to_string(), looked: looked.join("; ") });
        }
        tracing::info!(plugin = %name, ?discarded_events, ?discarded_groups, "discarded what a plugin that is not running left");
        Ok(Removal { drained: true, discarded: true, discarded_events, discarded_groups })
    }

    /// Wait for the sources to apply a change (consumers started, channels subscribed), so that
    /// what is published after the reply reaches the plugin, even over Redis pub/sub.
    async fn settle(&self, name: &str) {
        if !self.plugins.settled(SETTLE_TIMEOUT).await {
            tracing::warn!(plugin = %name, "a source has not applied the change yet; it will");
        }
    }

    /// Bind and unbind the plugin's RabbitMQ queue, declaring it first; nothing without RabbitMQ.
    async fn bind(&self, name: &str, bind: &[String], unbind: &[String]) -> Result<(), ControlError> {
        let Some(rabbit) = &self.rabbitmq else { return Ok(()) };
        if bind.is_empty() && unbind.is_empty() {
            return Ok(());
        }
        let queue = RabbitMqSource::queue_name(rabbit, name);
        on_broker(&queue, rebind(rabbit, &queue, bind, unbind)).await
    }

    /// Delete a removed plugin's queue and consumer groups with the events they hold; the
    /// removal says how many events its RabbitMQ queue held and how many groups were deleted.
    /// Another router may have taken either up since [`discardable`](Self::discardable)
    /// checked them (this router's consumer is off the queue once the sources followed the
    /// removal): then both are kept, and the removal says nothing was discarded.
    async fn discard(&self, name: &str, drained: bool) -> Result<Removal, ControlError> {
        let kept = Removal { drained, discarded: false, discarded_events: None, discarded_groups: None };
        if let Some(redis) = &self.redis {
            match left_groups(redis, name).await {
                Ok(Some(LeftGroups { group, read_elsewhere: Some(stream), .. })) => {
                    tracing::warn!(plugin = %name, %group, %stream, "another router reads the removed plugin's consumer group: the groups and the queue are kept");
                    return Ok(kept);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(plugin = %name, error = %e, "could not look up the removed plugin's consumer groups: the groups and the queue are kept");
                    return Ok(kept);
                }
            }
        }
        let mut events = None;
        if let Some(rabbit) = &self.rabbitmq {
            let queue = RabbitMqSource::queue_name(rabbit, name);
            match on_broker(&queue, delete_unused_queue(rabbit, &queue)).await? {
                Deleted::Messages(n) => events = Some(n),
                Deleted::Missing => {}
                Deleted::InUse => {
                    tracing::warn!(plugin = %name, %queue, "another router consumes from the removed plugin's queue: the queue and the consumer groups are kept");
                    return Ok(kept);
                }
            }
        }
        let mut groups = None;
        if let Some(redis) = &self.redis {
            match destroy_groups(redis, name).await {
                Ok(n) => groups = n,
                Err(e) => {
                    tracing::warn!(plugin = %name, error = %e, "could not delete the plugin's Redis consumer groups")
                }
            }
        }
        Ok(Removal { drained, discarded: true, discarded_events: events, discarded_groups: groups })
    }
}

/// Run a change of `queue` on the broker, given up after [`BROKER_TIMEOUT`]: a broker that
/// accepts connections and stops answering fails the admin request that asked, instead of
/// hanging it (and every change queued behind it).
async fn on_broker<T, E: std::fmt::Display>(
    queue: &str,
    change: impl Future<Output = Result<T, E>>,
) -> Result<T, ControlError> {
    bounded(change, |reason| ControlError::Broker { queue: queue.to_string(), reason }).await
}

/// [`on_broker`] for Redis.
async fn on_redis<T>(change: impl Future<Output = redis::RedisResult<T>>) -> Result<T, ControlError> {
    bounded(change, ControlError::Redis).await
}

/// `change`, given up after [`BROKER_TIMEOUT`]; a failure is made an error by `failed`.
async fn bounded<T, E: std::fmt::Display>(
    change: impl Future<Output = Result<T, E>>,
    failed: impl Fn(String) -> ControlError,
) -> Result<T, ControlError> {
    match tokio::time::timeout(BROKER_TIMEOUT, change).await {
        Ok(result) => result.map_err(|e| failed(e.to_string())),
        Err(_) => Err(failed(format!("the broker did not answer within {} s", BROKER_TIMEOUT.as_secs()))),
    }
}

fn pattern_names(plugin: &LoadedPlugin) -> Vec<String> {
    plugin.settings.subscriptions.0.iter().map(|p| p.as_str().to_string()).collect()
}
