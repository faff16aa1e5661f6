//! `router.toml`: the whole configuration as types, validated before anything starts.
//!
//! Every field's `///` doc is its user documentation; `router.toml` at the repository root
//! is the commented example. Unknown keys are errors; secrets may come from `SWITCHYARD_*`
//! environment variables or `{ env = "NAME" }` values, and are never printed.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::envelope::SinkFormat;
use crate::route::Pattern;

/// Environment variable that overrides (or supplies) `rabbitmq.url`.
pub const ENV_RABBITMQ_URL: &str = "SWITCHYARD_RABBITMQ_URL";
/// Environment variable that overrides (or supplies) `redis.url`.
pub const ENV_REDIS_URL: &str = "SWITCHYARD_REDIS_URL";
/// Environment variable that overrides (or supplies) `router.admin_token`.
pub const ENV_ADMIN_TOKEN: &str = "SWITCHYARD_ADMIN_TOKEN";
/// Environment variable that overrides `router.data_dir`.
pub const ENV_DATA_DIR: &str = "SWITCHYARD_DATA_DIR";

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Router-wide settings.
    #[serde(default)]
    pub router: RouterConfig,
    /// Consume from and publish to RabbitMQ.
    pub rabbitmq: Option<RabbitMqConfig>,
    /// Consume from and publish to Redis (pub/sub and Streams). With neither broker, the
    /// router runs on its in-process bus.
    pub redis: Option<RedisConfig>,
    /// The embedded SQLite store that holds plugin documents, the outbox and markers.
    #[serde(default)]
    pub store: StoreConfig,
    /// One table per plugin.
    #[serde(default, rename = "plugin")]
    pub plugins: Vec<PluginConfig>,
}

/// Router-wide settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterConfig {
    /// Directory for the SQLite database; relative paths are relative to the config file.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Log filter in `tracing` syntax, e.g. `info` or `switchyard=debug`; `RUST_LOG` wins.
    #[serde(default = "default_log")]
    pub log: String,
    /// Where plugins' published events go when both brokers are configured: `rabbitmq`
    /// (default) or `redis`. With one broker, that one; with none, the in-process bus.
    #[serde(default)]
    pub sink: SinkChoice,
    /// Address of the admin HTTP API, e.g. `127.0.0.1:7070`; absent: no admin API.
    pub admin_address: Option<String>,
    /// Bearer token every admin request but `GET /v1/health` must carry; prefer
    /// `SWITCHYARD_ADMIN_TOKEN`. Without one, the admin API binds to loopback only.
    pub admin_token: Option<Secret>,
    /// On SIGTERM/SIGINT: how long to let invocations under way finish and the outbox flush,
    /// in milliseconds, before exiting anyway (what is not finished is redelivered).
    #[serde(default = "default_drain_timeout_ms")]
    pub drain_timeout_ms: u64,
    /// How long the outbox relay waits for the sink to confirm a batch (RabbitMQ publisher
    /// confirms, Redis's reply), in milliseconds, before it drops the connection and sends the
    /// batch again on a new one. The rows stay in the outbox until confirmed.
    #[serde(default = "default_publish_timeout_ms")]
    pub publish_timeout_ms: u64,
    /// Threads that run the sources, the lanes and the plugins' calls (the async runtime's
    /// workers; the store's writer has its own). Default: one per core.
    pub worker_threads: Option<usize>,
    /// Plugin instances the engine's pool holds: each lane of each running plugin holds one,
    /// reserved when the plugin starts; a plugin whose lanes do not fit is refused.
    #[serde(default = "default_max_instances")]
    pub max_instances: u32,
}

impl RouterConfig {
    /// The worker threads to start: `worker_threads`, or one per core.
    pub fn worker_threads(&self) -> usize {
        self.worker_threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
    }
}

fn default_drain_timeout_ms() -> u64 {
    30_000
}

fn default_publish_timeout_ms() -> u64 {
    10_000
}

/// Which broker receives published events.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum SinkChoice {
    #[default]
    Rabbitmq,
    Redis,
}

fn default_max_instances() -> u32 {
    512
}

fn default_data_dir() -> PathBuf {
    PathBuf::from(".switchyard")
}

fn default_log() -> String {
    "info".into()
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            data_dir: default_data_dir(),
            log: default_log(),
            sink: SinkChoice::default(),
            admin_address: None,
            admin_token: None,
            drain_timeout_ms: default_drain_timeout_ms(),
            publish_timeout_ms: default_publish_timeout_ms(),
            worker_threads: None,
            max_instances: default_max_instances(),
        }
    }
}

/// A secret string: shown as `***` in logs and debug output.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// RabbitMQ source and sink.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitMqConfig {
    /// AMQP URL with credentials, e.g. `amqp://guest:guest@127.0.0.1:5672/%2f`.
    /// `SWITCHYARD_RABBITMQ_URL` overrides it.
    pub url: Secret,
    /// Durable topic exchange the router binds plugin queues to and publishes to; routing
    /// key = event name.
    #[serde(default = "default_exchange")]
    pub exchange: String,
    /// Each plugin consumes its own durable queue, named this prefix + the plugin name.
    #[serde(default = "default_queue_prefix")]
    pub queue_prefix: String,
    /// The type the plugins' queues are declared with. A queue keeps the type it was first
    /// declared with: the router does not convert one. A plugin whose queue exists with another
    /// type gets no consumer while the others run; the log and `/v1/ready` give the broker's
    /// reason, and the queue is tried again with backoff.
    #[serde(default)]
    pub queue_type: QueueType,
    /// Unacknowledged messages per consumer. Higher keeps the lanes busy while commits are
    /// pending and acks go back in batches; lower bounds redelivery after a crash.
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
    /// Queues that NestJS services `emit` to (e.g. `riff_queue`). The router forwards each
    /// message to the exchange under its event name, so every subscribed plugin gets it. One
    /// that exists is used as its producers declared it; a missing one is declared as a plain
    /// durable queue, as NestJS declares it by default.
    #[serde(default)]
    pub ingress_queues: Vec<String>,
    /// Envelope of the events plugins publish: `nestjs` (`{pattern, data}`) or `cloudevents`.
    #[serde(default)]
    pub sink_format: SinkFormat,
}

/// The RabbitMQ queue type of the plugins' queues (also a command-line value of the
/// benchmark harness, which declares its baselines' queues alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// A classic queue, declared without arguments: on one node.
    #[default]
    Classic,
    /// A quorum queue (`x-queue-type: quorum`): replicated over the cluster's nodes (Raft).
    Quorum,
}

impl fmt::Display for QueueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        })
    }
}

fn default_exchange() -> String {
    "switchyard.events".into()
}

fn default_queue_prefix() -> String {
    "switchyard.".into()
}

fn default_prefetch() -> u16 {
    256
}

/// Redis source and sink.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// Redis URL, e.g. `redis://127.0.0.1:6379`; `SWITCHYARD_REDIS_URL` overrides it.
    pub url: Secret,
    /// Subscribe to pub/sub channels, as NestJS's Redis transport publishes: at most once.
    pub pubsub: Option<PubSubConfig>,
    /// Consume Redis Streams with one consumer group per plugin: at least once.
    pub streams: Option<StreamsConfig>,
    /// How published events are written when Redis is the sink: `pubsub` (PUBLISH on a
    /// channel named prefix + event name, NestJS-compatible) or `stream` (XADD to `sink_stream`).
    #[serde(default)]
    pub sink_mode: RedisSinkMode,
    /// The stream published events are added to in `stream` mode.
    #[serde(default = "default_stream")]
    pub sink_stream: String,
    /// Envelope of published events: `nestjs` or `cloudevents`.
    #[serde(default)]
    pub sink_format: SinkFormat,
}

/// How events are written to Redis.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum RedisSinkMode {
    #[default]
    Pubsub,
    Stream,
}

fn default_stream() -> String {
    "switchyard.events".into()
}

/// Redis pub/sub source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PubSubConfig {
    /// Channels are named this prefix + the event name (NestJS uses none).
    #[serde(default)]
    pub channel_prefix: String,
    /// Messages received and not yet handed to a plugin. Redis sends at the publishers' pace:
    /// a message that finds this buffer full is dropped and counted.
    #[serde(default = "default_pubsub_buffer")]
    pub buffer: usize,
}

impl Default for PubSubConfig {
    fn default() -> Self {
        PubSubConfig { channel_prefix: String::new(), buffer: default_pubsub_buffer() }
    }
}

fn default_pubsub_buffer() -> usize {
    10_000
}

/// Redis Streams source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamsConfig {
    /// Streams to consume; every plugin reads every stream through its own consumer group
    /// and handles the entries its subscriptions match.
    #[serde(default = "default_streams")]
    pub streams: Vec<String>,
    /// Each plugin's consumer group is named this prefix + the plugin name.
    #[serde(default = "default_queue_prefix")]
    pub group_prefix: String,
    /// This router's consumer name in the groups; default: host name and process id. Routers
    /// sharing a group share its entries.
    pub consumer: Option<String>,
    /// Entries pending longer than this (a dead or stuck consumer) are claimed by this router.
    #[serde(default = "default_claim_idle_ms")]
    pub claim_idle_ms: u64,
    /// Entries read per call.
    #[serde(default = "default_stream_batch")]
    pub batch: usize,
    /// `MAXLEN ~` applied when the router adds to a stream (its sink).
    #[serde(default = "default_maxlen")]
    pub maxlen: usize,
}

fn default_streams() -> Vec<String> {
    vec![default_stream()]
}

fn default_claim_idle_ms() -> u64 {
    30_000
}

fn default_stream_batch() -> usize {
    128
}

fn default_maxlen() -> usize {
    1_000_000
}

/// SQLite durability mode.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// Survives a crash of the router, may lose the last commits on power loss.
    Normal,
    /// Each group commit waits for fsync: survives power loss.
    #[default]
    Full,
}

/// The embedded store.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// SQLite `synchronous` mode: `full` (default) or `normal`.
    #[serde(default)]
    pub synchronous: Synchronous,
    /// Most invocations committed in one transaction (group commit).
    #[serde(default = "default_batch_max")]
    pub batch_max: usize,
    /// How long the (plugin, event id) processed-markers are kept, in hours. A redelivery
    /// within this window is recognised and not applied again; one after it would be.
    #[serde(default = "default_processed_retention_hours")]
    pub processed_retention_hours: u64,
}

fn default_processed_retention_hours() -> u64 {
    24 * 7
}

fn default_batch_max() -> usize {
    512
}

impl StoreConfig {
    /// How long processed-markers are kept.
    pub fn processed_retention(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.processed_retention_hours.saturating_mul(3600))
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            synchronous: Synchronous::default(),
            batch_max: default_batch_max(),
            processed_retention_hours: default_processed_retention_hours(),
        }
    }
}

/// A plugin name: lowercase ASCII letters, digits and `-`, 1 to 64 characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(into = "String")]
pub struct PluginName(String);

impl PluginName {
    pub fn parse(s: &str) -> Result<Self, String> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !s.starts_with('-');
        if ok {
            Ok(PluginName(s.into()))
        } else {
            Err(format!("invalid plugin name {s:?}: use 1-64 of a-z, 0-9 and `-`"))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PluginName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<PluginName> for String {
    fn from(n: PluginName) -> String {
        n.0
    }
}

impl<'de> Deserialize<'de> for PluginName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        PluginName::parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// How a plugin's instances are used across events.
#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize, PartialEq, Eq, Default, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum InstancePolicy {
    /// One instance per lane, reused for events until `recycle_after` events, a trap or a
    /// swap; ~20-50x cheaper than a fresh instance. Guest globals may survive between events.
    #[default]
    Reuse,
    /// A fresh instance for every event: nothing survives between events.
    Fresh,
}

/// One plugin.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// Must equal the name the component reports in its metadata.
    pub name: PluginName,
    /// The compiled component (`.wasm`); relative to the config file.
    pub path: PathBuf,
    /// Event-name patterns (`*` one word, `#` zero or more); default: the plugin's metadata.
    pub subscriptions: Option<Vec<Pattern>>,
    /// Dotted payload paths tried in order for the ordering key; default: the metadata.
    pub ordering_key: Option<Vec<String>>,
    /// Events of this plugin handled at once, each in its own lane; events with the same
    /// ordering key are handled one at a time, in order.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Unacknowledged messages of this plugin's RabbitMQ consumer; default:
    /// `rabbitmq.prefetch`. Like `concurrency`, it applies when the consumer starts.
    pub prefetch: Option<u16>,
    /// `reuse` (default) or `fresh`.
    #[serde(default)]
    pub instances: InstancePolicy,
    /// With `reuse`: replace an instance after this many events.
    #[serde(default = "default_recycle_after")]
    pub recycle_after: u64,
    /// Hard limits per invocation.
    #[serde(default)]
    pub limits: Limits,
    /// What happens when an invocation fails.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Values the plugin reads through the `config` import; `{ env = "NAME" }` reads the
    /// environment at start (for secrets).
    #[serde(default)]
    pub config: BTreeMap<String, ConfigValue>,
    /// Hosts the plugin may reach over `wasi:http`: `host` (any port), `host:port`,
    /// `*.example.com` (its subdomains) or an IP address (`[::1]:8025` for IPv6 with a port).
    /// Empty (the default): no outbound HTTP.
    #[serde(default)]
    pub allowed_hosts: Vec<AllowedHost>,
    /// Event names the plugin may publish (`*` one word, `#` zero or more). Empty (the
    /// default): the plugin may publish nothing.
    #[serde(default)]
    pub publishes: Vec<Pattern>,
}

impl PluginConfig {
    /// The lanes the plugin starts with, each holding an instance of the engine's pool.
    pub fn lanes(&self) -> usize {
        self.concurrency.max(1)
    }
}

/// One entry of a plugin's `allowed_hosts`: a host name or IP, optionally with a port; a
/// leading `*.` matches any subdomain (not the domain itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedHost {
    text: String,
    host: String,
    port: Option<u16>,
}

impl AllowedHost {
    pub fn parse(text: &str) -> Result<Self, String> {
        let invalid = |why: &str| Err(format!("allowed host {text:?}: {why}"));
        let port_of = |port: &str| port.parse::<u16>().map_err(|_| ());
        if text.contains("://") || text.contains('/') {
            return invalid("give a host or host:port, not a URL");
        }
        if text.contains('@') {
            return invalid("credentials do not belong in an allowed host");
        }
        let (host, port) = if let Some(rest) = text.strip_prefix('[') {
            let Some((address, after)) = rest.split_once(']') else {
                return invalid("an IPv6 address in brackets needs its closing `]`");
            };
            if address.parse::<std::net::Ipv6Addr>().is_err() {
                return invalid("the brackets must hold an IPv6 address");
            }
            match after {
                "" => (address, None),
                _ => match after.strip_prefix(':').map(port_of) {
                    Some(Ok(port)) => (address, Some(port)),
                    _ => return invalid("the port must be a number from 0 to 65535"),
                },
            }
        } else if text.matches(':').count() > 1 {
            if text.parse::<std::net::Ipv6Addr>().is_err() {
                return invalid("an IPv6 address with a port goes in brackets, e.g. [::1]:8025");
            }
            (text, None)
        } else {
            match text.split_once(':') {
                Some((host, port)) => match port_of(port) {
                    Ok(port) => (host, Some(port)),
                    Err(()) => return invalid("the port must be a number from 0 to 65535"),
                },
                None => (text, None),
            }
        };
        let wildcard = host.strip_prefix("*.");
        let name = wildcard.unwrap_or(host);
        let is_ip = name.parse::<std::net::IpAddr>().is_ok();
        let is_dns_name = !name.is_empty()
            && !name.starts_with('.')
            && !name.ends_with('.')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
        if !(is_dns_name || is_ip) || (wildcard.is_some() && is_ip) {
            return invalid("the host must be a DNS name or an IP address; `*.` may only start a DNS name");
        }
        Ok(AllowedHost { text: text.to_string(), host: canonical_host(host), port })
    }

    /// Whether a request to `host` (a name, an IP address, or an IPv6 address in brackets)
    /// on `port` is allowed by this entry.
    pub fn allows(&self, host: &str, port: u16) -> bool {
        let host = canonical_host(host.trim_start_matches('[').trim_end_matches(']'));
        let host_matches = match self.host.strip_prefix("*.") {
            Some(domain) => host.strip_suffix(domain).is_some_and(|sub| sub.len() > 1 && sub.ends_with('.')),
            None => host == self.host,
        };
        host_matches && self.port.is_none_or(|p| p == port)
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// One spelling per host: an IP address in its canonical form, a name in lowercase.
fn canonical_host(host: &str) -> String {
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.to_string(),
        Err(_) => host.to_ascii_lowercase(),
    }
}

impl<'de> Deserialize<'de> for AllowedHost {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        AllowedHost::parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for AllowedHost {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

pub(crate) fn default_concurrency() -> usize {
    8
}

pub(crate) fn default_recycle_after() -> u64 {
    10_000
}

/// Hard limits per invocation.
#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Linear memory a plugin instance may grow to, in MiB; growing past it traps.
    #[serde(default = "default_memory_mb")]
    pub memory_mb: u64,
    /// Wall time one invocation may take, in milliseconds; past it the invocation traps.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_memory_mb() -> u64 {
    64
}

fn default_timeout_ms() -> u64 {
    5_000
}

impl Default for Limits {
    fn default() -> Self {
        Limits { memory_mb: default_memory_mb(), timeout_ms: default_timeout_ms() }
    }
}

/// Retries of failed invocations (a `retry` error, a trap, a timeout). A `reject` error is
/// dead-lettered at once.
#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; after the last the event is dead-lettered.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Wait before the second attempt, in milliseconds.
    #[serde(default = "default_initial_backoff_ms")]
    pub initial_backoff_ms: u64,
    /// Each further wait is the previous one times this.
    #[serde(default = "default_multiplier")]
    pub multiplier: f64,
    /// Longest wait, in milliseconds.
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
    /// Each wait is shortened by a random part of up to this fraction (0 to 1), so that
    /// events that failed together do not all come back together.
    #[serde(default = "default_jitter")]
    pub jitter: f64,
}

fn default_jitter() -> f64 {
    0.2
}

fn default_max_attempts() -> u32 {
    3
}

fn default_initial_backoff_ms() -> u64 {
    200
}

fn default_multiplier() -> f64 {
    2.0
}

fn default_max_backoff_ms() -> u64 {
    10_000
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: default_max_attempts(),
            initial_backoff_ms: default_initial_backoff_ms(),
            multiplier: default_multiplier(),
            max_backoff_ms: default_max_backoff_ms(),
            jitter: default_jitter(),
        }
    }
}

impl RetryPolicy {
    /// The wait before attempt `next` (2 for the first retry), before jitter.
    pub fn backoff(&self, next: u32) -> std::time::Duration {
        let exp = i32::try_from(next.saturating_sub(2)).unwrap_or(i32::MAX);
        let ms = (self.initial_backoff_ms as f64) * self.multiplier.powi(exp);
        std::time::Duration::from_millis(ms.min(self.max_backoff_ms as f64) as u64)
    }

    /// The wait before attempt `next` with jitter: `random` (0 to 1) takes off up to the
    /// `jitter` fraction.
    pub fn jittered(&self, next: u32, random: f64) -> std::time::Duration {
        self.backoff(next).mul_f64(1.0 - self.jitter * random.clamp(0.0, 1.0))
    }
}

/// A plugin config value: text, or the name of an environment variable holding it.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(untagged, deny_unknown_fields)]
pub enum ConfigValue {
    Text(String),
    Env { env: String },
}

/// Why a config could not be used. Every problem found is listed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {key}: {message}")]
    Parse { path: PathBuf, key: String, message: String },
    #[error("{path}:\n{}", problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid { path: PathBuf, problems: Vec<String> },
}

impl Config {
    /// Read, parse and validate a config file, applying environment overrides.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_with_env(path, &|name| std::env::var(name).ok())
    }

    /// Like [`Config::load`], with `env` looking up the environment (command-line overrides).
    pub fn load_with_env(path: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        Config::from_toml(&text, path, env)
    }

    /// Parse and validate `text` as if read from `path`; `env` looks up environment variables.
    pub fn from_toml(text: &str, path: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let deserializer = toml::Deserializer::parse(text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            key: "(syntax)".into(),
            message: e.to_string().trim().to_string(),
        })?;
        let mut config: Config = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let key = e.path().to_string();
            ConfigError::Parse { path: path.into(), key, message: e.into_inner().message().trim().to_string() }
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        config.apply_env(env);
        config.resolve_paths(&base);
        let problems = config.problems(env);
        if problems.is_empty() { Ok(config) } else { Err(ConfigError::Invalid { path: path.into(), problems }) }
    }

    fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<String>) {
        if let Some(url) = env(ENV_RABBITMQ_URL).filter(|u| !u.is_empty()) {
            match &mut self.rabbitmq {
                Some(r) => r.url = Secret(url),
                None => {
                    self.rabbitmq = Some(RabbitMqConfig {
                        url: Secret(url),
                        exchange: default_exchange(),
                        queue_prefix: default_queue_prefix(),
                        queue_type: QueueType::default(),
                        prefetch: default_prefetch(),
                        ingress_queues: vec![],
                        sink_format: SinkFormat::default(),
                    })
                }
            }
        }
        if let Some(url) = env(ENV_REDIS_URL).filter(|u| !u.is_empty()) {
            match &mut self.redis {
                Some(r) => r.url = Secret(url),
                None => {
                    self.redis = Some(RedisConfig {
                        url: Secret(url),
                        pubsub: Some(PubSubConfig::default()),
                        streams: None,
                        sink_mode: RedisSinkMode::default(),
                        sink_stream: default_stream(),
                        sink_format: SinkFormat::default(),
                    })
                }
            }
        }
        if let Some(token) = env(ENV_ADMIN_TOKEN).filter(|t| !t.is_empty()) {
            self.router.admin_token = Some(Secret(token));
        }
        if let Some(dir) = env(ENV_DATA_DIR).filter(|d| !d.is_empty()) {
            self.router.data_dir = PathBuf::from(dir);
        }
    }

    fn resolve_paths(&mut self, base: &Path) {
        if self.router.data_dir.is_relative() {
            self.router.data_dir = base.join(&self.router.data_dir);
        }
        for plugin in &mut self.plugins {
            if plugin.path.is_relative() {
                plugin.path = base.join(&plugin.path);
            }
        }
    }

    /// Every cross-field problem, each naming its key.
    fn problems(&self, env: &dyn Fn(&str) -> Option<String>) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(r) = &self.rabbitmq {
            if !r.url.expose().starts_with("amqp://") && !r.url.expose().starts_with("amqps://") {
                problems.push("rabbitmq.url: must start with amqp:// or amqps://".into());
            }
            if r.exchange.is_empty() {
                problems.push("rabbitmq.exchange: must not be empty".into());
            }
            if r.prefetch == 0 {
                problems.push("rabbitmq.prefetch: must be at least 1".into());
            }
        }
        if let Some(r) = &self.redis {
            if !r.url.expose().starts_with("redis://") && !r.url.expose().starts_with("rediss://") {
                problems.push("redis.url: must start with redis:// or rediss://".into());
            }
            if r.pubsub.is_none() && r.streams.is_none() && self.router.sink != SinkChoice::Redis {
                problems
                    .push("redis: configure [redis.pubsub] or [redis.streams] (or use Redis as router.sink)".into());
            }
            if r.pubsub.as_ref().is_some_and(|p| p.buffer == 0) {
                problems.push("redis.pubsub.buffer: must be at least 1".into());
            }
            if let Some(s) = &r.streams {
                if s.streams.is_empty() {
                    problems.push("redis.streams.streams: name at least one stream".into());
                }
                if s.batch == 0 {
                    problems.push("redis.streams.batch: must be at least 1".into());
                }
            }
        }
        if self.router.sink == SinkChoice::Redis && self.redis.is_none() {
            problems.push("router.sink: \"redis\" needs a [redis] section".into());
        }
        if let Some(address) = &self.router.admin_address
            && address.parse::<std::net::SocketAddr>().is_err()
        {
            problems
                .push(format!("router.admin_address: {address:?} is not an IP address and port, e.g. 127.0.0.1:7070"));
        }
        if self.router.admin_token.as_ref().is_some_and(|t| t.expose().len() < 16) {
            problems.push("router.admin_token: must be at least 16 characters".into());
        }
        if self.router.worker_threads.is_some_and(|n| !(1..=1024).contains(&n)) {
            problems.push("router.worker_threads: must be between 1 and 1024".into());
        }
        let lanes: usize = self.plugins.iter().map(PluginConfig::lanes).sum();
        if !(1..=4096).contains(&self.router.max_instances) {
            problems.push("router.max_instances: must be between 1 and 4096".into());
        } else if lanes > self.router.max_instances as usize {
            problems.push(format!(
                "router.max_instances: the plugins configured have {lanes} lanes in all, each holding an \
                 instance, more than the {} the pool holds",
                self.router.max_instances
            ));
        }
        if self.router.publish_timeout_ms == 0 {
            problems.push("router.publish_timeout_ms: must be at least 1".into());
        }
        if self.store.processed_retention_hours == 0 {
            problems.push("store.processed_retention_hours: must be at least 1".into());
        }
        if self.store.batch_max == 0 {
            problems.push("store.batch_max: must be at least 1".into());
        }
        let mut seen = std::collections::HashSet::new();
        for (i, p) in self.plugins.iter().enumerate() {
            let at = format!("plugin[{i}] ({})", p.name);
            if !seen.insert(&p.name) {
                problems.push(format!("{at}.name: another plugin has the same name"));
            }
            if !p.path.is_file() {
                problems.push(format!("{at}.path: no file at {}", p.path.display()));
            }
            if p.concurrency == 0 || p.concurrency > 1024 {
                problems.push(format!("{at}.concurrency: must be between 1 and 1024"));
            }
            if p.prefetch == Some(0) {
                problems.push(format!("{at}.prefetch: must be at least 1"));
            }
            if p.recycle_after == 0 {
                problems.push(format!("{at}.recycle_after: must be at least 1"));
            }
            if p.limits.memory_mb == 0 || p.limits.memory_mb > 4096 {
                problems.push(format!("{at}.limits.memory_mb: must be between 1 and 4096"));
            }
            if p.limits.timeout_ms == 0 {
                problems.push(format!("{at}.limits.timeout_ms: must be at least 1"));
            }
            if p.retry.max_attempts == 0 {
                problems.push(format!("{at}.retry.max_attempts: must be at least 1"));
            }
            if !(p.retry.multiplier >= 1.0 && p.retry.multiplier.is_finite()) {
                problems.push(format!("{at}.retry.multiplier: must be a finite number >= 1"));
            }
            if !(0.0..=1.0).contains(&p.retry.jitter) {
                problems.push(format!("{at}.retry.jitter: must be between 0 and 1"));
            }
            for (key, value) in &p.config {
                if let ConfigValue::Env { env: var } = value
                    && env(var).is_none()
                {
                    problems.push(format!("{at}.config.{key}: environment variable {var} is not set"));
                }
            }
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        parse_env(text, &|_| None)
    }

    fn parse_env(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("/etc/switchyard/router.toml"), env)
    }

    fn error(text: &str) -> String {
        parse(text).expect_err("should fail").to_string()
    }

    #[test]
    fn an_empty_file_runs_on_the_bus_with_defaults() {
        let c = parse("").unwrap();
        assert!(c.rabbitmq.is_none());
        assert_eq!(c.router.data_dir, PathBuf::from("/etc/switchyard/.switchyard"));
        assert_eq!(c.store.synchronous, Synchronous::Full);
    }

    #[test]
    fn unknown_keys_are_named_with_their_path() {
        let e = error("[router]\ndata_dir = \"d\"\nadmin_adress = \"x\"\n");
        assert!(e.starts_with("/etc/switchyard/router.toml: router.admin_adress: unknown field `admin_adress`"), "{e}");
    }

    #[test]
    fn wrong_types_are_named_with_their_path() {
        let e = error("[rabbitmq]\nurl = \"amqp://x\"\nprefetch = \"lots\"\n");
        assert!(e.starts_with("/etc/switchyard/router.toml: rabbitmq.prefetch: invalid type: string \"lots\""), "{e}");
    }

    #[test]
    fn the_queue_type_is_classic_unless_quorum_is_asked_for() {
        let classic = parse("[rabbitmq]\nurl = \"amqp://x\"\n").unwrap();
        assert_eq!(classic.rabbitmq.unwrap().queue_type, QueueType::Classic);
        let quorum = parse("[rabbitmq]\nurl = \"amqp://x\"\nqueue_type = \"quorum\"\n").unwrap();
        assert_eq!(quorum.rabbitmq.unwrap().queue_type, QueueType::Quorum);
        let e = error("[rabbitmq]\nurl = \"amqp://x\"\nqueue_type = \"stream\"\n");
        assert!(e.starts_with("/etc/switchyard/router.toml: rabbitmq.queue_type: unknown variant `stream`"), "{e}");
        assert!(e.contains("`classic`") && e.contains("`quorum`"), "{e}");
    }

    #[test]
    fn syntax_errors_name_the_file_and_line() {
        let e = error("[router\n");
        assert!(e.contains("/etc/switchyard/router.toml: (syntax)") && e.contains("line 1"), "{e}");
    }

    #[test]
    fn allowed_hosts_match_name_port_and_subdomains() {
        let exact = AllowedHost::parse("api.resend.com").unwrap();
        assert!(exact.allows("api.resend.com", 443) && exact.allows("API.Resend.com", 80));
        assert!(!exact.allows("evil.com", 443) && !exact.allows("api.resend.com.evil.com", 443));
        let port = AllowedHost::parse("127.0.0.1:8025").unwrap();
        assert!(port.allows("127.0.0.1", 8025) && !port.allows("127.0.0.1", 8026));
        let wild = AllowedHost::parse("*.example.com").unwrap();
        assert!(wild.allows("a.example.com", 443) && wild.allows("a.b.example.com", 443));
        assert!(!wild.allows("example.com", 443) && !wild.allows("badexample.com", 443));
        let v6 = AllowedHost::parse("[::1]:8025").unwrap();
        assert!(v6.allows("[::1]", 8025) && v6.allows("0:0:0:0:0:0:0:1", 8025) && !v6.allows("::1", 8026));
        let any_port = AllowedHost::parse("::1").unwrap();
        assert!(any_port.allows("[::1]", 1) && !any_port.allows("127.0.0.1", 1));
        for bad in [
            "https://x.com",
            "x.com/path",
            "*",
            "a.*.com",
            "x.com:http",
            "",
            "user:pw@x.com",
            "x.com.",
            "[::1",
            "[::1]8025",
            "[x]:80",
            "*.10.0.0.1",
            "::1::2",
        ] {
            assert!(AllowedHost::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_allowed_hosts_and_publish_patterns_are_named() {
        let e = error("[[plugin]]\nname = \"p\"\npath = \"p.wasm\"\nallowed_hosts = [\"https://x.com\"]\n");
        assert!(e.contains("plugin[0].allowed_hosts[0]") && e.contains("not a URL"), "{e}");
        let e = error("[[plugin]]\nname = \"p\"\npath = \"p.wasm\"\npublishes = [\"a..b\"]\n");
        assert!(e.contains("plugin[0].publishes[0]") && e.contains("empty word"), "{e}");
    }

    #[test]
    fn plugins_whose_lanes_outnumber_the_instance_pool_are_refused() {
        let plugin = |name: &str, lanes: usize| {
            format!("[[plugin]]\nname = \"{name}\"\npath = \"p.wasm\"\nconcurrency = {lanes}\n")
        };
        let e = error(&format!("[router]\nmax_instances = 20\n{}{}", plugin("a", 8), plugin("b", 13)));
        assert!(e.contains("router.max_instances: the plugins configured have 21 lanes in all"), "{e}");
        let e = error(&format!("[router]\nmax_instances = 21\n{}{}", plugin("a", 8), plugin("b", 13)));
        assert!(!e.contains("max_instances"), "{e}");
    }

    #[test]
    fn invalid_patterns_and_names_are_refused_on_parse() {
        let e = error("[[plugin]]\nname = \"p\"\npath = \"p.wasm\"\nsubscriptions = [\"a..b\"]\n");
        assert!(e.contains("plugin[0].subscriptions[0]") && e.contains("empty word"), "{e}");
        let e = error("[[plugin]]\nname = \"Bad_Name\"\npath = \"p.wasm\"\n");
        assert!(e.contains("plugin[0].name") && e.contains("invalid plugin name"), "{e}");
    }

    #[test]
    fn all_cross_field_problems_are_reported_at_once() {
        let text = "[router]\npublish_timeout_ms = 0\nworker_threads = 0\nmax_instances = 0\n[rabbitmq]\nurl = \"http://x\"\nprefetch = 0\n\
            [redis]\nurl = \"redis://x\"\n[redis.pubsub]\nbuffer = 0\n\
            [[plugin]]\nname = \"a\"\npath = \"missing.wasm\"\nconcurrency = 0\nprefetch = 0\n[plugin.config]\nkey = { env = \"NOPE\" }\n\
            [[plugin]]\nname = \"a\"\npath = \"missing.wasm\"\n";
        let e = error(text);
        for expected in [
            "router.publish_timeout_ms: must be at least 1",
            "router.worker_threads: must be between 1 and 1024",
            "router.max_instances: must be between 1 and 4096",
            "rabbitmq.url: must start with amqp://",
            "rabbitmq.prefetch: must be at least 1",
            "redis.pubsub.buffer: must be at least 1",
            "plugin[0] (a).path: no file at /etc/switchyard/missing.wasm",
            "plugin[0] (a).concurrency",
            "plugin[0] (a).prefetch: must be at least 1",
            "plugin[0] (a).config.key: environment variable NOPE is not set",
            "plugin[1] (a).name: another plugin has the same name",
        ] {
            assert!(e.contains(expected), "missing {expected:?} in:\n{e}");
        }
    }

    #[test]
    fn environment_supplies_the_broker_url_and_secrets_never_print() {
        let env = |name: &str| (name == ENV_RABBITMQ_URL).then(|| "amqp://user:hunter2@h:5672/%2f".to_string());
        let c = parse_env("", &env).unwrap();
        let r = c.rabbitmq.expect("env enables RabbitMQ");
        assert_eq!(r.url.expose(), "amqp://user:hunter2@h:5672/%2f");
        assert!(!format!("{r:?}").contains("hunter2"));
    }

    #[test]
    fn the_admin_token_comes_from_the_environment_and_must_be_long_enough() {
        let env = |name: &str| (name == ENV_ADMIN_TOKEN).then(|| "from-the-environment-1234".to_string());
        let c = parse_env("[router]\nadmin_token = \"short-but-overridden\"\n", &env).unwrap();
        assert_eq!(c.router.admin_token.unwrap().expose(), "from-the-environment-1234");
        let e = error("[router]\nadmin_token = \"short\"\nadmin_address = \"localhost\"\n");
        assert!(e.contains("router.admin_token: must be at least 16 characters"), "{e}");
        assert!(e.contains("router.admin_address: \"localhost\" is not an IP address and port"), "{e}");
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p =
            RetryPolicy { max_attempts: 5, initial_backoff_ms: 100, multiplier: 2.0, max_backoff_ms: 300, jitter: 0.5 };
        assert_eq!(p.backoff(2).as_millis(), 100);
        assert_eq!(p.backoff(3).as_millis(), 200);
        assert_eq!(p.backoff(4).as_millis(), 300);
        assert_eq!(p.jittered(3, 0.0).as_millis(), 200);
        assert_eq!(p.jittered(3, 1.0).as_millis(), 100, "at most half off");
        assert_eq!(p.jittered(3, 7.0).as_millis(), 100, "random is clamped");
    }
}
