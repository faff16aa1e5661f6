//! The `switchyard` binary as an operator runs it, against the real RabbitMQ and Redis on
//! loopback: `kill -9` in the middle of a stream of 10,000 events, then a restart, applies
//! every event exactly once; SIGTERM lets the invocations under way finish and leaves the rest
//! queued. These live in the host package because only its tests get the binary's path.

use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use redis::AsyncCommands;
use switchyard::db::Readers;

const EVENTS: usize = 10_000;
const BUCKETS: usize = 16;
const SETTLE: Duration = Duration::from_secs(180);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("host/ has a parent").to_path_buf()
}

/// The misbehave fixture, built by `scripts/build-plugins` (which `scripts/test` runs first).
fn misbehave() -> PathBuf {
    let path = repo().join("dist/plugins/misbehave.wasm");
    if !path.is_file() {
        let status = Command::new(repo().join("scripts/build-plugins")).status().expect("run build-plugins");
        assert!(status.success(), "scripts/build-plugins failed");
    }
    path
}

fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// A data dir and a `router.toml` for one test, and the router processes run on them.
struct Deployment {
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Deployment {
    fn new(sections: &str, plugin_settings: &str) -> Deployment {
        let dir = tempfile::tempdir().expect("temp dir");
        let text = format!(
            "[router]\ndata_dir = \"{}\"\nlog = \"info\"\n{sections}\n[[plugin]]\nname = \"misbehave\"\npath = \"{}\"\n{plugin_settings}\n",
            dir.path().join("data").display(),
            misbehave().display()
        );
        let config = dir.path().join("router.toml");
        std::fs::write(&config, text).expect("write router.toml");
        Deployment { dir, config }
    }

    /// The same deployment logging at `level` instead of `info`.
    fn logging(self, level: &str) -> Deployment {
        let text = std::fs::read_to_string(&self.config).expect("read router.toml");
        let text = text.replacen("log = \"info\"", &format!("log = \"{level}\""), 1);
        std::fs::write(&self.config, text).expect("write router.toml");
        self
    }

    /// Start `switchyard run` with extra arguments; its output goes to `router-<n>.log`.
    fn start(&self, run: usize, extra: &[&str]) -> Router {
        let log = std::fs::File::create(self.dir.path().join(format!("router-{run}.log"))).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["run", "--config"])
            .arg(&self.config)
            .args(extra)
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("start switchyard");
        Router(child)
    }

    fn log(&self, run: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("router-{run}.log"))).unwrap_or_default()
    }

    /// Every line of run `run`'s log that contains `text`.
    fn lines_with(&self, run: usize, text: &str) -> Vec<String> {
        self.log(run).lines().filter(|l| l.contains(text)).map(str::to_string).collect()
    }

    /// The first line of run `run`'s log that contains `text`, once there is one.
    async fn line_with(&self, run: usize, text: &str) -> String {
        let found = async || !self.lines_with(run, text).is_empty();
        until(&format!("a log line with {text:?}"), SETTLE, || self.log(run), found).await;
        self.lines_with(run, text).into_iter().next().unwrap_or_default()
    }

    fn readers(&self) -> Readers {
        Readers::new(&self.dir.path().join("data"))
    }

    /// The sum of the tally documents: each `chaos.tally` event adds one, once.
    fn tally(&self) -> u64 {
        if !switchyard::router::has_database(&self.dir.path().join("data")) {
            return 0;
        }
        let rows = self.readers().scan("misbehave", "tally", "", 1000).unwrap_or_default();
        rows.iter()
            .filter_map(|r| serde_json::from_str::<serde_json::Value>(&r.body).ok())
            .filter_map(|d| d["n"].as_u64())
            .sum()
    }

    /// Events of ids `e-0..e-n` that have a processed-marker.
    fn processed(&self, n: usize) -> usize {
        let readers = self.readers();
        (0..n).filter(|i| readers.processed("misbehave", &format!("e-{i}")).unwrap_or(false)).count()
    }

    /// Events the misbehave plugin marked seen.
    fn seen(&self) -> usize {
        if !switchyard::router::has_database(&self.dir.path().join("data")) {
            return 0;
        }
        self.readers().scan("misbehave", "seen", "", 10_000).map(|r| r.len()).unwrap_or(0)
    }
}

/// Poll `check` until it holds, failing with `what` and the router's log after `timeout`.
async fn until(what: &str, timeout: Duration, log: impl Fn() -> String, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}; router log:\n{}", log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A `switchyard run` process, killed when the test drops it: a test that fails half-way
/// leaves no router behind, consuming from the shared broker and declaring its queue again.
struct Router(Child);

impl Deref for Router {
    type Target = Child;

    fn deref(&self) -> &Child {
        &self.0
    }
}

impl DerefMut for Router {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        // Both fail only for a process already reaped, which is what they are for.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn exit_of(child: &mut Child, timeout: Duration) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("wait for switchyard") {
            return status;
        }
        assert!(Instant::now() < deadline, "switchyard did not exit within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The time of day of a log line, from its timestamp (`2026-12-06T00:58:23.874877Z ...`).
fn seconds_of_day(line: &str) -> Option<f64> {
    let time = line.split_whitespace().next()?.split('T').nth(1)?.trim_end_matches('Z');
    let mut parts = time.split(':').map(|p| p.parse::<f64>().ok());
    Some(parts.next()?? * 3600.0 + parts.next()?? * 60.0 + parts.next()??)
}

fn terminate(child: &Child) {
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("run kill");
    assert!(status.success(), "kill -TERM failed");
}

/// A router logging at `warn` with the misbehave plugin, started and consuming.
async fn running_at_warn() -> (Rabbit, Deployment, Router) {
    let rabbit = Rabbit::new();
    let deployment = Deployment::new(&rabbit.section(), "").logging("warn");
    let router = deployment.start(1, &[]);
    until("the router consuming", SETTLE, || deployment.log(1), async || rabbit.consumed().await).await;
    (rabbit, deployment, router)
}

/// A test's exchange and plugin queue on the shared RabbitMQ, deleted when it ends.
struct Rabbit {
    exchange: String,
    prefix: String,
}

impl Rabbit {
    fn new() -> Rabbit {
        let id = unique("p");
        Rabbit { exchange: format!("{id}.events"), prefix: format!("{id}.") }
    }

    fn section(&self) -> String {
        format!(
            "[rabbitmq]\nurl = \"{}\"\nexchange = \"{}\"\nqueue_prefix = \"{}\"\nprefetch = 256\n",
            amqp_url(),
            self.exchange,
            self.prefix
        )
    }

    fn queue(&self) -> String {
        format!("{}misbehave", self.prefix)
    }

    async fn depth(&self) -> Option<u32> {
        switchyard::router::queue_depth(&amqp_url(), &self.queue()).await
    }

    /// Whether the router consumes from its queue. The queue exists a moment before it is
    /// bound to the exchange, and events published in between are dropped as unroutable; the
    /// router starts its consumer only once the queue is bound.
    async fn consumed(&self) -> bool {
        let Ok(conn) = Connection::connect(&amqp_url(), ConnectionProperties::default()).await else { return false };
        let passive = QueueDeclareOptions { passive: true, ..Default::default() };
        let consumers = match conn.create_channel().await {
            Ok(channel) => channel
                .queue_declare(self.queue().as_str().into(), passive, FieldTable::default())
                .await
                .map_or(0, |q| q.consumer_count()),
            Err(_) => 0,
        };
        let _ = conn.close(200, "checked".into()).await;
        consumers > 0
    }

    /// Publish `(name, body, id)` messages to the exchange with confirms.
    async fn publish(&self, messages: impl IntoIterator<Item = (String, String, String)>) {
        self.publish_on(&self.exchange, messages).await;
    }

    /// Publish `(routing key, body, id)` messages to `exchange` with confirms.
    async fn publish_on(&self, exchange: &str, messages: impl IntoIterator<Item = (String, String, String)>) {
        let conn = Connection::connect(&amqp_url(), ConnectionProperties::default()).await.expect("connect");
        let channel = conn.create_channel().await.expect("channel");
        channel.confirm_select(ConfirmSelectOptions::default()).await.expect("confirms");
        let mut confirms = Vec::new();
        for (name, body, id) in messages {
            let props = BasicProperties::default().with_message_id(id.as_str().into()).with_delivery_mode(2);
            let confirm = channel
                .basic_publish(
                    exchange.into(),
                    name.as_str().into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    props,
                )
                .await
                .expect("publish");
            confirms.push(confirm);
        }
        for confirm in confirms {
            assert!(confirm.await.expect("confirm").is_ack(), "the broker refused a test message");
        }
        let _ = conn.close(200, "published".into()).await;
    }

    /// Declare the plugin's queue as a classic one, as a router before `queue_type` did, with
    /// one event waiting in it (sent through the default exchange, straight to the queue).
    async fn classic_queue_with_an_event(&self) {
        let conn = Connection::connect(&amqp_url(), ConnectionProperties::default()).await.expect("connect");
        let channel = conn.create_channel().await.expect("channel");
        let durable = QueueDeclareOptions::durable();
        channel.queue_declare(self.queue().as_str().into(), durable, Default::default()).await.expect("declare");
        let _ = conn.close(200, "declared".into()).await;
        let event = r#"{"pattern": "chaos.tally", "data": {"bucket": "b0"}}"#;
        self.publish_on("", [(self.queue(), event.to_string(), "e-waiting".to_string())]).await;
    }
}

impl Drop for Rabbit {
    fn drop(&mut self) {
        let (queue, exchange) = (self.queue(), self.exchange.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                let Ok(conn) = Connection::connect(&amqp_url(), ConnectionProperties::default()).await else { return };
                let Ok(ch) = conn.create_channel().await else { return };
                let _ = ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await;
                let _ = ch.exchange_delete(exchange.as_str().into(), Default::default()).await;
                let _ = conn.close(200, "test done".into()).await;
            });
        })
        .join();
    }
}

fn tally_event(i: usize) -> String {
    serde_json::json!({ "bucket": format!("b{}", i % BUCKETS) }).to_string()
}

#[tokio::test]
async fn kill_9_in_a_rabbitmq_stream_then_a_restart_applies_every_event_exactly_once() {
    let rabbit = Rabbit::new();
    let deployment = Deployment::new(&rabbit.section(), "concurrency = 8\nordering_key = [\"bucket\"]\n");
    let mut router = deployment.start(1, &[]);
    until("the router consuming", SETTLE, || deployment.log(1), async || rabbit.consumed().await).await;
    rabbit.publish((0..EVENTS).map(|i| ("chaos.tally".to_string(), tally_event(i), format!("e-{i}")))).await;
    until("a fifth of the stream", SETTLE, || deployment.log(1), async || deployment.tally() >= 2_000).await;
    router.kill().expect("kill -9");
    router.wait().expect("reap");
    let at_kill = deployment.tally();
    assert!(at_kill < EVENTS as u64, "the kill must land in the middle of the stream (tally {at_kill})");

    let mut restarted = deployment.start(2, &["--exit-when-idle"]);
    let status = exit_of(&mut restarted, SETTLE).await;
    assert!(status.success(), "the restarted router failed: {}", deployment.log(2));
    assert_eq!(deployment.tally(), EVENTS as u64, "every event applied once: none lost, none doubled");
    assert_eq!(deployment.processed(EVENTS), EVENTS);
    assert_eq!(rabbit.depth().await, Some(0), "every message acknowledged");
}

#[tokio::test]
async fn kill_9_in_a_redis_stream_then_a_restart_applies_every_event_exactly_once() {
    let stream = unique("stream");
    let sections = format!(
        "[redis]\nurl = \"{}\"\n[redis.streams]\nstreams = [\"{stream}\"]\nclaim_idle_ms = 500\nbatch = 256\n",
        redis_url()
    );
    let deployment = Deployment::new(&sections, "concurrency = 8\nordering_key = [\"bucket\"]\n");
    let mut conn =
        redis::Client::open(redis_url()).unwrap().get_multiplexed_async_connection().await.expect("connect to Redis");
    let mut router = deployment.start(1, &[]);
    let mut pipe = redis::pipe();
    for i in 0..EVENTS {
        let body = serde_json::json!({ "pattern": "chaos.tally", "data": { "bucket": format!("b{}", i % BUCKETS) } });
        pipe.xadd(&stream, "*", &[("event", body.to_string()), ("id", format!("e-{i}"))]).ignore();
    }
    let () = pipe.query_async(&mut conn).await.expect("XADD");
    until("a fifth of the stream", SETTLE, || deployment.log(1), async || deployment.tally() >= 2_000).await;
    router.kill().expect("kill -9");
    router.wait().expect("reap");
    let at_kill = deployment.tally();
    assert!(at_kill < EVENTS as u64, "the kill must land in the middle of the stream (tally {at_kill})");

    // The restarted router is another consumer: it claims what the dead one left pending.
    let mut restarted = deployment.start(2, &[]);
    until("every event", SETTLE, || deployment.log(2), async || deployment.tally() >= EVENTS as u64).await;
    let settled = async || {
        let info: redis::streams::StreamInfoGroupsReply =
            conn.clone().xinfo_groups(&stream).await.expect("XINFO GROUPS");
        info.groups.iter().all(|g| g.pending == 0 && g.lag == Some(0))
    };
    until("every entry acknowledged", SETTLE, || deployment.log(2), settled).await;
    terminate(&restarted);
    assert!(exit_of(&mut restarted, SETTLE).await.success(), "{}", deployment.log(2));
    assert_eq!(deployment.tally(), EVENTS as u64, "every event applied once: none lost, none doubled");
    assert_eq!(deployment.processed(EVENTS), EVENTS);
    let _: redis::RedisResult<()> = conn.del(&stream).await;
}

#[tokio::test]
async fn sigterm_lets_the_invocations_under_way_finish_and_leaves_the_rest_queued() {
    let rabbit = Rabbit::new();
    let deployment = Deployment::new(&rabbit.section(), "concurrency = 4\n");
    let mut router = deployment.start(1, &[]);
    until("the router consuming", SETTLE, || deployment.log(1), async || rabbit.consumed().await).await;
    let total = 40;
    let slow = serde_json::json!({ "ms": 300 }).to_string();
    rabbit.publish((0..total).map(|i| ("chaos.slow".to_string(), slow.clone(), format!("e-{i}")))).await;
    // Four lanes each take 300 ms per event: once four are seen, four more are under way.
    until("the first events", SETTLE, || deployment.log(1), async || deployment.seen() >= 4).await;
    terminate(&router);
    let status = exit_of(&mut router, Duration::from_secs(30)).await;
    assert!(status.success(), "SIGTERM exits 0: {}", deployment.log(1));
    assert!(deployment.log(1).contains("drained"), "{}", deployment.log(1));
    assert!(!deployment.log(1).contains('\x1b'), "a log written to a file carries no colour codes");
    let handled = deployment.seen();
    assert!(handled < total, "SIGTERM must land in the middle ({handled} handled)");
    let mut left = None;
    for _ in 0..100 {
        left = rabbit.depth().await;
        if left == Some((total - handled) as u32) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(left, Some((total - handled) as u32), "what was handled was acknowledged, what was not is still queued");

    let mut restarted = deployment.start(2, &["--exit-when-idle"]);
    assert!(exit_of(&mut restarted, SETTLE).await.success(), "{}", deployment.log(2));
    assert_eq!(deployment.processed(total), total);
}

#[tokio::test]
async fn logging_at_warn_a_failed_invocation_still_names_its_event() {
    let (rabbit, deployment, mut router) = running_at_warn().await;
    rabbit.publish([("chaos.reject".to_string(), "{}".to_string(), "e-rejected".to_string())]).await;
    let line = deployment.line_with(1, "invocation failed").await;
    assert!(line.contains("event_id=e-rejected") && line.contains("name=chaos.reject"), "{line}");
    assert!(!deployment.log(1).contains(" INFO "), "the filter is warn: {}", deployment.log(1));
    terminate(&router);
    assert!(exit_of(&mut router, SETTLE).await.success(), "{}", deployment.log(1));
}

#[tokio::test]
async fn a_store_that_refuses_a_dead_letter_leaves_the_event_to_the_broker_and_names_it() {
    let (rabbit, deployment, mut router) = running_at_warn().await;
    let store = rusqlite::Connection::open(deployment.dir.path().join("data").join(switchyard::db::FILE_NAME))
        .expect("open the router's store");
    store.busy_timeout(Duration::from_secs(10)).expect("busy timeout");
    store
        .execute_batch(
            "CREATE TRIGGER refuse BEFORE INSERT ON dead_letters BEGIN SELECT RAISE(ABORT, 'the disk said no'); END;",
        )
        .expect("add the trigger");
    rabbit.publish([("chaos.reject".to_string(), "{}".to_string(), "e-refused".to_string())]).await;
    let line = deployment.line_with(1, "leaving the message to the broker").await;
    assert!(
        line.contains("ERROR") && line.contains("event_id=e-refused") && line.contains("name=chaos.reject"),
        "{line}"
    );
    assert!(line.contains("the disk said no"), "the store's reason is on the line: {line}");
    // Handed back again after the lane's pause, not at once: the two lines are a second apart.
    let handed_back = || -> Vec<f64> {
        deployment.lines_with(1, "leaving the message to the broker").iter().filter_map(|l| seconds_of_day(l)).collect()
    };
    until("the event handed back twice", SETTLE, || deployment.log(1), async || handed_back().len() >= 2).await;
    let times = handed_back();
    let gap = (times[1] - times[0]).rem_euclid(86_400.0);
    assert!(gap >= 0.9, "handed back again {gap:.3} s later; the lane pauses 1 s after a store failure");
    // Handed back, not lost: once the store takes dead letters again, the redelivered event is kept.
    store.execute_batch("DROP TRIGGER refuse;").expect("drop the trigger");
    let kept = || -> bool {
        store
            .query_row("SELECT count(*) FROM dead_letters WHERE event_id = 'e-refused'", [], |r| r.get::<_, i64>(0))
            .is_ok_and(|n| n == 1)
    };
    until("the dead letter kept", SETTLE, || deployment.log(1), async || kept()).await;
    terminate(&router);
    assert!(exit_of(&mut router, SETTLE).await.success(), "{}", deployment.log(1));
}

#[tokio::test]
async fn a_plugin_queue_of_another_type_is_refused_and_the_log_says_why() {
    let rabbit = Rabbit::new();
    rabbit.classic_queue_with_an_event().await;
    let deployment = Deployment::new(&(rabbit.section() + "queue_type = \"quorum\"\n"), "").logging("warn");
    let mut router = deployment.start(1, &[]);
    let line = deployment.line_with(1, "exists with other arguments").await;
    assert!(line.contains("plugin queue refused: its events wait in it"), "{line}");
    assert!(line.contains("plugin=misbehave"), "names the plugin: {line}");
    assert!(line.contains(&format!("queue {}", rabbit.queue())), "names the queue: {line}");
    assert!(line.contains("rabbitmq.queue_type = \"quorum\""), "names the setting: {line}");
    assert!(line.contains("inequivalent arg 'x-queue-type'"), "gives the broker's reason: {line}");
    assert_eq!(rabbit.depth().await, Some(1), "the waiting event stays in its queue");
    terminate(&router);
    assert!(exit_of(&mut router, SETTLE).await.success(), "{}", deployment.log(1));
}
