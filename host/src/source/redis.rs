//! Redis: pub/sub channels as NestJS's Redis transport uses them, and Redis Streams with one
//! consumer group per plugin.
//!
//! Pub/sub is at most once: Redis keeps nothing for a subscriber that is not connected, so
//! what is published during a disconnection is gone (the router counts and logs each gap).
//! Streams are at least once: an entry is `XACK`ed only after the plugin's effects commit,
//! entries left pending by a dead consumer are claimed after `claim_idle_ms`, and the
//! processed-marker makes a redelivered entry apply once.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::streams::{StreamAutoClaimOptions, StreamId, StreamReadOptions, StreamReadReply};
use redis::{AsyncCommands, AsyncConnectionConfig, PushInfo, PushKind};
use tokio::sync::mpsc::error::TrySendError;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::commit::Writer;
use crate::config::{PubSubConfig, RedisConfig, StreamsConfig};
use crate::dispatch::{Dispatch, Inbound, dead_letter_undecodable};
use crate::envelope::{self, HeaderValue, Transport};
use crate::event::Millis;
use crate::plugins::{Consumers, PluginSet};
use crate::route::Pattern;
use crate::source::{Ack, Backoff, Health, InFlight, Received, StreamAcks, hand_to_subscribers};

/// How long one `XREADGROUP` waits for entries.
const BLOCK_MS: usize = 1000;
/// How long the reading connection waits for a reply: a blocking read's wait plus a margin.
/// (The client's default, 500 ms, is shorter than the wait: every idle read would time out
/// and restart the consumer.)
const READ_REPLY_TIMEOUT: Duration = Duration::from_millis(BLOCK_MS as u64 + 5000);
/// Stream entry field holding the envelope.
pub const EVENT_FIELD: &str = "event";
/// Stream entry field naming the event (optional).
pub const NAME_FIELD: &str = "name";
/// Stream entry field carrying the event id (optional).
pub const ID_FIELD: &str = "id";

/// The Redis source of one router.
pub struct RedisSource {
    pub config: RedisConfig,
    pub writer: Writer,
    pub in_flight: Arc<InFlight>,
    /// Up while every Redis consumer is connected; down with the reasons of those that are not.
    pub health: Arc<Health>,
}

impl RedisSource {
    /// Consume until `shutdown`, following the plugin set: a plugin added gets its stream
    /// consumers, a plugin removed loses them, and pub/sub subscribes to what the plugins
    /// subscribe to now.
    pub async fn run(self, plugins: PluginSet, shutdown: CancellationToken) {
        // The streams' client, and the same speaking RESP3 for pub/sub.
        let clients = redis::Client::open(self.config.url.expose()).and_then(|client| Ok((resp3(&client)?, client)));
        let (push_client, client) = match clients {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "invalid Redis URL; the Redis source is not running");
                self.health.down(format!("invalid Redis URL: {e}"));
                return;
            }
        };
        let mut tasks = JoinSet::new();
        let mut pubsub_health = None;
        if let Some(pubsub) = &self.config.pubsub {
            let health = Arc::new(Health::default());
            pubsub_health = Some(health.clone());
            let consumer = PubSubConsumer {
                client: push_client,
                config: pubsub.clone(),
                plugins: plugins.clone(),
                writer: self.writer.clone(),
                in_flight: self.in_flight.clone(),
                health,
                dropped: Arc::default(),
            };
            tasks.spawn(consumer.run(shutdown.clone()));
        }
        let mut consumers: Consumers<Vec<Arc<Health>>> = Consumers::default();
        let mut changes = plugins.subscribe();
        loop {
            if let Some(streams) = &self.config.streams {
                let current = changes.borrow_and_update().clone();
                self.follow(&client, streams, &current.plugins, &mut consumers, &mut tasks, &shutdown);
            }
            while tasks.try_join_next().is_some() {}
            self.health.gather(pubsub_health.iter().chain(consumers.kept().flatten()));
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = changes.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }

    /// Start stream consumers for plugins that have none; stop those of removed plugins.
    fn follow(
        &self,
        client: &redis::Client,
        streams: &StreamsConfig,
        plugins: &[Dispatch],
        consumers: &mut Consumers<Vec<Arc<Health>>>,
        tasks: &mut JoinSet<()>,
        shutdown: &CancellationToken,
    ) {
        let consumer_name = consumer_name(streams);
        for dispatch in consumers.follow(plugins).missing {
            let stop = shutdown.child_token();
            let mut healths = Vec::new();
            for stream in &streams.streams {
                let health = Arc::new(Health::default());
                healths.push(health.clone());
                let plugin = dispatch.name().to_string();
                let consumer = StreamConsumer {
                    client: client.clone(),
                    stream: stream.clone(),
                    group: group_name(streams, &plugin),
                    consumer: consumer_name.clone(),
                    config: streams.clone(),
                    plugin,
                    dispatch: dispatch.clone(),
                    writer: self.writer.clone(),
                    in_flight: self.in_flight.clone(),
                    health,
                };
                tasks.spawn(consumer.run(stop.clone()));
            }
            consumers.started(dispatch, stop, healths);
        }
    }
}

/// Subscribe to what is wanted and not subscribed yet, then drop what is no longer wanted, so
/// that no channel goes unheard in between.
async fn resubscribe(
    conn: &mut MultiplexedConnection,
    now: &BTreeSet<ChannelSub>,
    wanted: &BTreeSet<ChannelSub>,
) -> redis::RedisResult<()> {
    for sub in wanted.difference(now) {
        sub.subscribe(conn).await?;
    }
    for sub in now.difference(wanted) {
        sub.unsubscribe(conn).await?;
    }
    if wanted != now {
        tracing::info!(subscriptions = wanted.len(), "Redis pub/sub subscriptions changed");
    }
    Ok(())
}

/// This router's consumer name in every group: `consumer`, or the host's name and the process id.
fn consumer_name(streams: &StreamsConfig) -> String {
    streams.consumer.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
        format!("{}-{}", if host.is_empty() { "switchyard" } else { &host }, std::process::id())
    })
}

/// A Redis channel subscription: exact for a literal pattern, a glob otherwise.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum ChannelSub {
    Exact(String),
    Glob(String),
}

impl ChannelSub {
    /// The subscription that receives every channel `pattern` matches (and perhaps more:
    /// messages are filtered by the pattern afterwards).
    pub fn for_pattern(prefix: &str, pattern: &Pattern) -> ChannelSub {
        let text = pattern.as_str();
        if !text.split('.').any(|w| w == "*" || w == "#") {
            return ChannelSub::Exact(format!("{prefix}{text}"));
        }
        let mut glob = escape_glob(prefix);
        let words: Vec<&str> = text.split('.').collect();
        for (i, word) in words.iter().enumerate() {
            match *word {
                // `#` may match no word at all, so the dots around it are optional too.
                "#" => {
                    if !glob.ends_with('*') {
                        glob.push('*');
                    }
                }
                w => {
                    if i > 0 && words[i - 1] != "#" {
                        glob.push('.');
                    }
                    if w == "*" { glob.push('*') } else { glob.push_str(&escape_glob(w)) }
                }
            }
        }
        ChannelSub::Glob(glob)
    }

    async fn subscribe(&self, conn: &mut MultiplexedConnection) -> redis::RedisResult<()> {
        match self {
            ChannelSub::Exact(c) => conn.subscribe(c).await,
            ChannelSub::Glob(g) => conn.psubscribe(g).await,
        }
    }

    async fn unsubscribe(&self, conn: &mut MultiplexedConnection) -> redis::RedisResult<()> {
        match self {
            ChannelSub::Exact(c) => conn.unsubscribe(c).await,
            ChannelSub::Glob(g) => conn.punsubscribe(g).await,
        }
    }

    fn matches(&self, channel: &str) -> bool {
        match self {
            ChannelSub::Exact(c) => c == channel,
            ChannelSub::Glob(g) => glob_matches(g.as_bytes(), channel.as_bytes()),
        }
    }
}

fn escape_glob(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Redis glob matching for the globs [`ChannelSub::for_pattern`] makes: `*` and `\` escapes.
fn glob_matches(glob: &[u8], text: &[u8]) -> bool {
    match glob.split_first() {
        None => text.is_empty(),
        Some((b'*', rest)) => (0..=text.len()).any(|skip| glob_matches(rest, &text[skip..])),
        Some((b'\\', rest)) => match rest.split_first() {
            Some((c, rest)) => text.first() == Some(c) && glob_matches(rest, &text[1..]),
            None => false,
        },
        Some((c, rest)) => text.first() == Some(c) && glob_matches(rest, &text[1..]),
    }
}

/// Subscribes to the channels of every plugin's subscriptions, and changes its subscriptions
/// as the plugin set changes without reconnecting.
///
/// Redis sends each message as it is published, whatever the subscriber's pace, so the
/// connection's reader hands messages over through a buffer of `buffer` messages: a message
/// that finds it full is dropped and counted, and the router's memory stays bounded.
struct PubSubConsumer {
    /// A client speaking RESP3, whose connections deliver messages as pushes.
    client: redis::Client,
    config: PubSubConfig,
    plugins: PluginSet,
    writer: Writer,
    in_flight: Arc<InFlight>,
    health: Arc<Health>,
    dropped: Arc<Dropped>,
}

/// A connection subscribed to the plugins' channels, and the messages it receives.
struct Session {
    conn: MultiplexedConnection,
    messages: tokio::sync::mpsc::Receiver<PushInfo>,
}

/// How often the log says that messages were dropped, while they are.
const DROPS_LOGGED_EVERY: Duration = Duration::from_secs(10);

/// Messages dropped because the buffer was full.
#[derive(Default)]
struct Dropped(AtomicU64);

impl Dropped {
    fn record(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("switchyard_pubsub_dropped_total").increment(1);
    }
}

/// What the log has said of the drops: how many, and when.
struct DropsLogged {
    count: u64,
    at: Option<Instant>,
}

impl DropsLogged {
    /// Log the drops since the last line, at most every [`DROPS_LOGGED_EVERY`].
    fn update(&mut self, dropped: &Dropped, buffer: usize) {
        let count = dropped.0.load(Ordering::Relaxed);
        if count > self.count && self.at.is_none_or(|at| at.elapsed() >= DROPS_LOGGED_EVERY) {
            tracing::warn!(
                dropped = count - self.count,
                buffer,
                "Redis pub/sub messages dropped: the router is slower than their publishers"
            );
            (self.count, self.at) = (count, Some(Instant::now()));
        }
    }
}

impl PubSubConsumer {
    fn subscriptions(&self, plugins: &[Dispatch]) -> BTreeSet<ChannelSub> {
        plugins
            .iter()
            .flat_map(|d| d.slot().current().settings.subscriptions.0.clone())
            .map(|p| ChannelSub::for_pattern(&self.config.channel_prefix, &p))
            .collect()
    }

    async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new();
        let mut connected_before = false;
        let mut changes = self.plugins.subscribe();
        let following = self.plugins.follower(self.health.clone());
        let mut drops_logged = DropsLogged { count: 0, at: None };
        loop {
            let current = changes.borrow_and_update().clone();
            let mut subs = self.subscriptions(&current.plugins);
            let why = match self.session(&subs).await {
                Ok(Session { mut conn, mut messages }) => {
                    backoff.reset();
                    connected_before = true;
                    following.followed(current.generation);
                    self.health.up();
                    loop {
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = changes.changed() => {
                                let current = changes.borrow_and_update().clone();
                                let wanted = self.subscriptions(&current.plugins);
                                match resubscribe(&mut conn, &subs, &wanted).await {
                                    Ok(()) => {
                                        subs = wanted;
                                        following.followed(current.generation);
                                    }
                                    Err(e) => {
                                        tracing::warn!(error = %e, "changing Redis subscriptions failed");
                                        break format!("changing the subscriptions failed: {e}");
                                    }
                                }
                            }
                            // The connection drops its sender when it closes: the messages
                            // still buffered are handled, then the session ends.
                            push = messages.recv() => match push {
                                Some(push) if push.kind == PushKind::Disconnection => break "disconnected".to_string(),
                                Some(push) => {
                                    if let Some(message) = redis::Msg::from_push_info(push) {
                                        self.handle(&subs, message).await;
                                    }
                                    drops_logged.update(&self.dropped, self.config.buffer);
                                }
                                None => break "the connection closed".to_string(),
                            },
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff.delay(), "Redis pub/sub connection failed");
                    e.to_string()
                }
            };
            self.health.down(format!("pub/sub: {why}"));
            if connected_before {
                // Each disconnection is a window whose messages are gone: count it as we log it.
                metrics::counter!("switchyard_pubsub_gaps_total").increment(1);
                tracing::warn!("Redis pub/sub connection lost: messages published until it is back are lost");
                connected_before = false;
            }
            if !backoff.wait(&shutdown).await {
                return;
            }
        }
    }

    async fn session(&self, subs: &BTreeSet<ChannelSub>) -> redis::RedisResult<Session> {
        let (sender, messages) = tokio::sync::mpsc::channel(self.config.buffer);
        let dropped = self.dropped.clone();
        // The connection's reader calls this for every push and must not wait.
        let push = move |info: PushInfo| match sender.try_send(info) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(info)) => {
                if matches!(info.kind, PushKind::Message | PushKind::PMessage) {
                    dropped.record();
                }
                Err(())
            }
            Err(TrySendError::Closed(_)) => Err(()),
        };
        let config = AsyncConnectionConfig::new().set_push_sender(push);
        let mut conn = self.client.get_multiplexed_async_connection_with_config(&config).await?;
        for sub in subs {
            sub.subscribe(&mut conn).await?;
        }
        Ok(Session { conn, messages })
    }

    async fn handle(&self, subs: &BTreeSet<ChannelSub>, message: redis::Msg) {
        let channel = message.get_channel_name();
        // Overlapping subscriptions deliver a message once per match: keep only the first.
        let delivered_by_first = match subs.iter().find(|s| s.matches(channel)) {
            Some(ChannelSub::Exact(exact)) => !message.from_pattern() && exact == channel,
            Some(ChannelSub::Glob(glob)) => message.get_pattern::<String>().is_ok_and(|p| p == *glob),
            None => false,
        };
        if !delivered_by_first {
            return;
        }
        let Some(name) = channel.strip_prefix(&self.config.channel_prefix) else { return };
        let transport = Transport {
            routing_key: name.to_string(),
            origin: "redis:pubsub".into(),
            received_at: Millis::now(),
            ..Default::default()
        };
        let received = Received { body: message.get_payload_bytes().to_vec(), transport };
        match envelope::decode(&received.body, &received.transport) {
            Ok(decoded) => {
                hand_to_subscribers(&self.plugins, decoded.event, received, &self.in_flight).await;
            }
            Err(e) => {
                let ack = Ack::local(self.in_flight.clone());
                dead_letter_undecodable(&self.writer, "redis:pubsub", received, ack, e.to_string()).await;
            }
        }
    }
}

/// The same client speaking RESP3 (Redis 6 or later), whose connections can deliver pub/sub
/// messages as pushes to a buffer of the router's choosing.
fn resp3(client: &redis::Client) -> redis::RedisResult<redis::Client> {
    let info = client.get_connection_info().clone();
    let settings = info.redis_settings().clone().set_protocol(redis::ProtocolVersion::RESP3);
    redis::Client::open(info.set_redis_settings(settings))
}

/// Whether entries read from a group were delivered before: their attempt is then the
/// group's delivery count, else 1.
#[derive(Clone, Copy)]
enum Delivered {
    /// New entries (`XREADGROUP >`): delivered for the first time.
    First,
    /// This consumer's pending entries, or entries claimed from another consumer.
    Before,
}

/// Reads one stream through one plugin's consumer group.
struct StreamConsumer {
    client: redis::Client,
    stream: String,
    group: String,
    consumer: String,
    config: StreamsConfig,
    plugin: String,
    dispatch: Dispatch,
    writer: Writer,
    in_flight: Arc<InFlight>,
    health: Arc<Health>,
}

impl StreamConsumer {
    async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new();
        loop {
            let started = Instant::now();
            let ended = tokio::select! {
                _ = shutdown.cancelled() => return,
                ended = self.session() => ended,
            };
            let e = match ended {
                Ok(never) => match never {},
                Err(e) => e,
            };
            self.health.down(format!("stream {} (group {}): {e}", self.stream, self.group));
            if started.elapsed() >= Duration::from_secs(30) {
                backoff.reset();
            }
            metrics::counter!("switchyard_stream_restarts_total", "stream" => self.stream.clone(), "group" => self.group.clone())
                .increment(1);
            tracing::warn!(stream = %self.stream, group = %self.group, error = %e, retry_in = ?backoff.delay(), "Redis stream consumer restarts");
            if !backoff.wait(&shutdown).await {
                return;
            }
        }
    }

    async fn session(&self) -> redis::RedisResult<std::convert::Infallible> {
        // Blocking reads get a connection of their own, so acks never wait behind them.
        let read_config = AsyncConnectionConfig::new().set_response_timeout(Some(READ_REPLY_TIMEOUT));
        let mut reads = self.client.get_multiplexed_async_connection_with_config(&read_config).await?;
        let name = reader_name(&self.group, &self.stream, &self.consumer);
        let named: redis::RedisResult<()> =
            redis::cmd("CLIENT").arg("SETNAME").arg(&name).query_async(&mut reads).await;
        if let Err(e) = named {
            tracing::warn!(stream = %self.stream, group = %self.group, error = %e, "could not name the reading connection; another router's discard_queue may not see this consumer");
        }
        let conn = self.client.get_multiplexed_async_connection().await?;
        let acks = Arc::new(StreamAcks::new(conn.clone(), self.stream.clone(), self.group.clone()));
        let created: redis::RedisResult<()> = reads.xgroup_create_mkstream(&self.stream, &self.group, "0").await;
        if let Err(e) = created
            && e.code() != Some("BUSYGROUP")
        {
            return Err(e);
        }
        self.health.up();
        // Entries this consumer read before a restart and never acknowledged.
        let mine = self.read(&mut reads, "0", None).await?;
        self.deliver(&conn, &acks, mine, Delivered::Before).await;
        let mut last_claim = Instant::now() - Duration::from_secs(3600);
        loop {
            let claim_every = Duration::from_millis((self.config.claim_idle_ms / 2).max(100));
            if last_claim.elapsed() >= claim_every {
                last_claim = Instant::now();
                let claimed = self.claim(&mut reads).await?;
                self.deliver(&conn, &acks, claimed, Delivered::Before).await;
            }
            let fresh = self.read(&mut reads, ">", Some(BLOCK_MS)).await?;
            self.deliver(&conn, &acks, fresh, Delivered::First).await;
        }
    }

    async fn read(
        &self,
        conn: &mut MultiplexedConnection,
        from: &str,
        block: Option<usize>,
    ) -> redis::RedisResult<Vec<StreamId>> {
        let mut options = StreamReadOptions::default().group(&self.group, &self.consumer).count(self.config.batch);
        if let Some(ms) = block {
            options = options.block(ms);
        }
        let reply: Option<StreamReadReply> = conn.xread_options(&[&self.stream], &[from], &options).await?;
        Ok(reply.map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect()).unwrap_or_default())
    }

    /// Take over entries another consumer left pending for longer than `claim_idle_ms`.
    async fn claim(&self, conn: &mut MultiplexedConnection) -> redis::RedisResult<Vec<StreamId>> {
        let options = StreamAutoClaimOptions::default().count(self.config.batch);
        let reply: redis::streams::StreamAutoClaimReply = conn
            .xautoclaim_options(&self.stream, &self.group, &self.consumer, self.config.claim_idle_ms, "0-0", options)
            .await?;
        if !reply.claimed.is_empty() {
            tracing::info!(stream = %self.stream, group = %self.group, count = reply.claimed.len(), "claimed entries of an idle consumer");
        }
        Ok(reply.claimed)
    }

    /// How often each entry was delivered, from the group's pending list.
    async fn delivery_counts(&self, conn: &MultiplexedConnection, ids: &[StreamId]) -> HashMap<String, u32> {
        let (Some(first), Some(last)) = (ids.first(), ids.last()) else { return HashMap::new() };
        let mut conn = conn.clone();
        let reply: redis::RedisResult<redis::streams::StreamPendingCountReply> =
            conn.xpending_count(&self.stream, &self.group, &first.id, &last.id, ids.len()).await;
        match reply {
            Ok(r) => r.ids.into_iter().map(|p| (p.id, u32::try_from(p.times_delivered).unwrap_or(u32::MAX))).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read delivery counts; attempts start at 1");
                HashMap::new()
            }
        }
    }

    async fn deliver(
        &self,
        conn: &MultiplexedConnection,
        acks: &Arc<StreamAcks>,
        entries: Vec<StreamId>,
        delivered: Delivered,
    ) {
        if entries.is_empty() {
            return;
        }
        let counts = match delivered {
            Delivered::First => HashMap::new(),
            Delivered::Before => self.delivery_counts(conn, &entries).await,
        };
        let subscriptions = self.dispatch.slot().current().settings.subscriptions.clone();
        for entry in entries {
            let ack = Ack::redis_stream(acks, entry.id.clone(), self.in_flight.clone());
            let text = |field: &str| entry.get::<String>(field).filter(|s| !s.is_empty());
            let body: Vec<u8> = entry.get::<Vec<u8>>(EVENT_FIELD).unwrap_or_default();
            // Fields other than the envelope, name and id are the entry's headers.
            let headers = entry
                .map
                .keys()
                .filter(|k| ![EVENT_FIELD, NAME_FIELD, ID_FIELD].contains(&k.as_str()))
                .filter_map(|k| text(k).map(|v| (k.clone(), HeaderValue::Text(v))))
                .collect();
            let transport = Transport {
                routing_key: text(NAME_FIELD).unwrap_or_else(|| self.stream.clone()),
                origin: format!("redis:{}", self.stream),
                message_id: text(ID_FIELD),
                headers,
                received_at: Millis::now(),
                ..Default::default()
            };
            let received = Received { body, transport };
            match envelope::decode(&received.body, &received.transport) {
                Ok(decoded) if subscriptions.matches(&decoded.event.name) => {
                    let attempt = counts.get(&entry.id).copied().unwrap_or(1).max(1);
                    self.dispatch.submit(Inbound { event: decoded.event, received, ack, attempt, parked: None }).await;
                }
                // Not for this plugin: its group moves past the entry.
                Ok(_) => ack.ack_detached(()),
                Err(e) => {
                    let reason = if entry.contains_key(EVENT_FIELD) {
                        e.to_string()
                    } else {
                        format!("stream entry has no `{EVENT_FIELD}` field")
                    };
                    dead_letter_undecodable(&self.writer, &self.plugin, received, ack, reason).await;
                }
            }
        }
    }
}

/// Entries of each (stream, plugin) consumer group not yet delivered (`lag`) and delivered but
/// not acknowledged (`pending`), from `XINFO GROUPS`.
pub async fn group_lag(config: &RedisConfig, plugins: &[String]) -> Vec<GroupLag> {
    let Some(streams) = &config.streams else { return Vec::new() };
    let Ok(client) = redis::Client::open(config.url.expose()) else { return Vec::new() };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else { return Vec::new() };
    let mut lags = Vec::new();
    for stream in &streams.streams {
        let info: redis::RedisResult<redis::streams::StreamInfoGroupsReply> = conn.xinfo_groups(stream).await;
        let Ok(info) = info else { continue };
        for plugin in plugins {
            let group = group_name(streams, plugin);
            if let Some(g) = info.groups.iter().find(|g| g.name == group) {
                lags.push(GroupLag { stream: stream.clone(), plugin: plugin.clone(), lag: g.lag, pending: g.pending });
            }
        }
    }
    lags
}

/// Delete a plugin's consumer group on every configured stream that has one (the entries stay
/// in the streams; what the group had not acknowledged is forgotten); returns how many groups
/// were deleted, or nothing when no streams are configured.
pub async fn destroy_groups(config: &RedisConfig, plugin: &str) -> redis::RedisResult<Option<u32>> {
    let Some(streams) = &config.streams else { return Ok(None) };
    let mut conn = redis::Client::open(config.url.expose())?.get_multiplexed_async_connection().await?;
    let mut destroyed = 0;
    for stream in &streams.streams {
        // XGROUP DESTROY fails on a stream that does not exist.
        if conn.exists(stream).await? && conn.xgroup_destroy(stream, group_name(streams, plugin)).await? {
            destroyed += 1;
        }
    }
    Ok(Some(destroyed))
}

/// A consumer that read from a group within this long is taken for a running one: a running
/// consumer reads every [`BLOCK_MS`] when idle, and between batches when busy. Redis reports
/// the time since a consumer's last read (`idle`) from 7.2 on; before, since its last read
/// that received entries, so an idle consumer of a quiet stream looks stopped there, and only
/// its connection's name ([`reader_name`]) shows it runs.
const GROUP_IN_USE_WITHIN_MS: usize = 30_000;

/// The name a stream consumer gives its reading connection (`CLIENT SETNAME`): its group,
/// stream and consumer, so that another router can see the group is read, even while the
/// reader waits on a quiet stream. Redis takes only printable ASCII without spaces in a name.
fn reader_name(group: &str, stream: &str, consumer: &str) -> String {
    format!("{group}@{stream}@{consumer}").chars().map(|c| if ('!'..='~').contains(&c) { c } else { '_' }).collect()
}

/// The names of the connections Redis has open (`CLIENT LIST`), empty when it refuses the
/// command (an ACL without it).
async fn client_names(conn: &mut MultiplexedConnection) -> BTreeSet<String> {
    let listed: redis::RedisResult<String> = redis::cmd("CLIENT").arg("LIST").query_async(conn).await;
    match listed {
        Ok(list) => list
            .lines()
            .filter_map(|line| line.split(' ').find_map(|field| field.strip_prefix("name=")))
            .filter(|name| !name.is_empty())
            .map(str::to_string)
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "CLIENT LIST refused: only consumers' recent reads show a group in use");
            BTreeSet::new()
        }
    }
}

/// A plugin's consumer group as the configured streams hold it, when the plugin does not run
/// on this router.
#[derive(Debug, Default)]
pub struct LeftGroups {
    /// The group's name: `group_prefix` and the plugin's name.
    pub group: String,
    /// The streams that have the group.
    pub streams: Vec<String>,
    /// A stream where another router reads the group: a connection of another consumer is
    /// named for it, or a consumer other than this router's read from it within 30 s (as Redis
    /// reports it). A plugin of that name runs there with the same `group_prefix`.
    pub read_elsewhere: Option<String>,
}

/// Where the configured streams have `plugin`'s consumer group, and whether another router
/// reads from it; nothing when no streams are configured.
pub async fn left_groups(config: &RedisConfig, plugin: &str) -> redis::RedisResult<Option<LeftGroups>> {
    let Some(streams) = &config.streams else { return Ok(None) };
    let mut conn = redis::Client::open(config.url.expose())?.get_multiplexed_async_connection().await?;
    let ours = consumer_name(streams);
    let connected = client_names(&mut conn).await;
    let mut left = LeftGroups { group: group_name(streams, plugin), ..Default::default() };
    for stream in &streams.streams {
        // XINFO fails on a stream that does not exist, and on a group it does not have.
        if !conn.exists(stream).await? {
            continue;
        }
        let groups: redis::streams::StreamInfoGroupsReply = conn.xinfo_groups(stream).await?;
        if !groups.groups.iter().any(|g| g.name == left.group) {
            continue;
        }
        let consumers: redis::streams::StreamInfoConsumersReply = conn.xinfo_consumers(stream, &left.group).await?;
        let (readers, mine) = (reader_name(&left.group, stream, ""), reader_name(&left.group, stream, &ours));
        let named_elsewhere = connected.iter().any(|n| n.starts_with(&readers) && *n != mine);
        if named_elsewhere || consumers.consumers.iter().any(|c| c.name != ours && c.idle < GROUP_IN_USE_WITHIN_MS) {
            left.read_elsewhere.get_or_insert_with(|| stream.clone());
        }
        left.streams.push(stream.clone());
    }
    Ok(Some(left))
}

/// A plugin's consumer group: the same name on every stream.
fn group_name(streams: &StreamsConfig, plugin: &str) -> String {
    format!("{}{plugin}", streams.group_prefix)
}

/// The backlog of one plugin's consumer group on one stream.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupLag {
    pub stream: String,
    pub plugin: String,
    /// Entries not delivered to the group yet; Redis may not know it (after deletions).
    pub lag: Option<usize>,
    pub pending: usize,
}

/// Publish every non-empty line of a JSONL file (one envelope per line) to Redis, on the
/// channel of its event name (pub/sub) or to the first configured stream; returns the count.
pub async fn publish_jsonl(config: &RedisConfig, path: &std::path::Path) -> anyhow::Result<usize> {
    let text = tokio::fs::read_to_string(path).await?;
    let mut conn = redis::Client::open(config.url.expose())?.get_multiplexed_async_connection().await?;
    let mut pipe = redis::pipe();
    let mut count = 0;
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let transport = Transport { origin: "feed".into(), received_at: Millis::now(), ..Default::default() };
        let decoded = envelope::decode(line.as_bytes(), &transport)
            .map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), n + 1))?;
        match (&config.pubsub, &config.streams) {
            (_, Some(streams)) if !streams.streams.is_empty() => {
                let fields = [(EVENT_FIELD, line), (NAME_FIELD, decoded.event.name.as_str())];
                pipe.xadd(&streams.streams[0], "*", &fields).ignore();
            }
            (Some(pubsub), _) => {
                pipe.publish(format!("{}{}", pubsub.channel_prefix, decoded.event.name), line).ignore();
            }
            _ => anyhow::bail!("redis: configure [redis.pubsub] or [redis.streams] to feed events"),
        }
        count += 1;
    }
    let () = pipe.query_async(&mut conn).await?;
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(pattern: &str) -> ChannelSub {
        ChannelSub::for_pattern("", &Pattern::parse(pattern).unwrap())
    }

    #[test]
    fn a_readers_connection_name_keeps_only_what_redis_accepts_in_a_name() {
        assert_eq!(reader_name("switchyard.a", "orders", "host-1"), "switchyard.a@orders@host-1");
        assert_eq!(reader_name("g", "my stream\n", "héllo"), "g@my_stream_@h_llo");
    }

    #[test]
    fn literal_patterns_subscribe_to_exact_channels() {
        assert_eq!(sub("user.updated"), ChannelSub::Exact("user.updated".into()));
        assert_eq!(
            ChannelSub::for_pattern("app:", &Pattern::parse("a.b").unwrap()),
            ChannelSub::Exact("app:a.b".into())
        );
    }

    #[test]
    fn wildcard_globs_receive_every_channel_the_pattern_matches() {
        let cases = [
            ("order.*", vec!["order.created", "order.x"]),
            ("user.#", vec!["user", "user.updated", "user.a.b"]),
            ("#.deleted", vec!["deleted", "user.deleted"]),
            ("a.#.z", vec!["a.z", "a.b.z"]),
            ("#", vec!["anything.at.all"]),
        ];
        for (pattern, channels) in cases {
            let s = sub(pattern);
            assert!(matches!(s, ChannelSub::Glob(_)));
            for channel in channels {
                assert!(s.matches(channel), "{pattern} → {s:?} must receive {channel}");
            }
        }
        assert!(!sub("order.*").matches("orders.created"));
    }

    #[test]
    fn glob_special_characters_in_literals_are_escaped() {
        let s = ChannelSub::for_pattern("", &Pattern::parse("weird?[x].*").unwrap());
        assert_eq!(s, ChannelSub::Glob("weird\\?\\[x\\].*".into()));
        assert!(s.matches("weird?[x].y"));
        assert!(!s.matches("weirdA[x].y"));
    }
}
