//! Test harness: real plugins built once per run, routers started in-process on a fresh data
//! dir, and RabbitMQ names unique to each test and deleted when it ends.

pub mod email;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, PublisherConfirm};
use switchyard::config::{Config, Secret};
use switchyard::router::Router;

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// Path of a built plugin component; builds all plugins once per test process (a no-op when
/// `scripts/test` already built them).
pub fn plugin(file: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let status =
            std::process::Command::new(repo().join("scripts/build-plugins")).status().expect("run build-plugins");
        assert!(status.success(), "scripts/build-plugins failed");
    });
    let path = repo().join("dist/plugins").join(file);
    assert!(path.is_file(), "{} was not built", path.display());
    path
}

/// The RabbitMQ URL tests use: `AMQP_URL`, or the local broker.
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A name no other test uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// Poll `check` until it returns `Some`, failing the test with `what` after `timeout`.
pub async fn eventually<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    eventually_async(what, timeout, async || check()).await
}

/// [`eventually`] for a check that awaits (a broker query, say).
pub async fn eventually_async<T>(what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The admin token of [`TestRouter::admin`].
pub const ADMIN_TOKEN: &str = "a-long-enough-admin-token";

/// A router under test with its own data dir.
pub struct TestRouter {
    pub router: Router,
    pub dir: tempfile::TempDir,
}

impl TestRouter {
    /// Start a router from a `router.toml` text; `{data_dir}` in it is replaced by a fresh dir.
    pub async fn start(toml: &str) -> TestRouter {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(toml, dir).await
    }

    /// Start a router on an existing data dir.
    pub async fn start_in(toml: &str, dir: tempfile::TempDir) -> TestRouter {
        let text = toml.replace("{data_dir}", &dir.path().display().to_string());
        let config = Config::from_toml(&text, &dir.path().join("router.toml"), &|n| std::env::var(n).ok())
            .unwrap_or_else(|e| panic!("test config is invalid: {e}"));
        let router = Router::start(config).await.unwrap_or_else(|e| panic!("router did not start: {e:#}"));
        TestRouter { router, dir }
    }

    /// A document of a plugin's store, parsed.
    pub fn doc(&self, plugin: &str, collection: &str, key: &str) -> Option<serde_json::Value> {
        let stored = self.router.readers.get(plugin, collection, key).expect("read store")?;
        stored.body.map(|b| serde_json::from_str(&b).expect("stored documents are JSON"))
    }

    /// The sum of a plugin's `tally` documents (`{"n": …}`): the misbehave fixture adds one per
    /// `chaos.tally` event, so an event applied twice or never shows in it.
    pub fn tally(&self, plugin: &str) -> u64 {
        let rows = self.router.readers.scan(plugin, "tally", "", 1000).expect("read store");
        rows.iter().filter_map(|r| serde_json::from_str::<serde_json::Value>(&r.body).ok()?["n"].as_u64()).sum()
    }

    /// Dead-letter reasons of a plugin by event name.
    pub fn dead_letters(&self, plugin: &str) -> Vec<(String, String)> {
        self.router
            .readers
            .dead_letters(plugin, 0, 1000)
            .expect("read dead letters")
            .into_iter()
            .map(|d| (d.name.unwrap_or_default(), d.reason))
            .collect()
    }

    /// Send a request to this router's admin API (configured with [`ADMIN_TOKEN`]); returns the
    /// status and the JSON body (or the text as a JSON string).
    pub async fn admin_request(&self, request: Request<Body>) -> (StatusCode, serde_json::Value) {
        use http_body_util::BodyExt;
        use tower::ServiceExt;
        let app = switchyard::admin::app(self.router.admin_state(Some(Secret::new(ADMIN_TOKEN))));
        let response = app.oneshot(request).await.expect("the admin API answers");
        let status = response.status();
        let bytes = response.into_body().collect().await.expect("a body").to_bytes();
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&bytes).into()));
        (status, value)
    }

    /// An authorized admin request with a body of `content_type`.
    pub async fn admin(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: impl Into<Body>,
    ) -> (StatusCode, serde_json::Value) {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", content_type)
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
            .body(body.into())
            .expect("a valid request");
        self.admin_request(request).await
    }

    /// Stop the router and keep its data dir for a restart.
    pub async fn stop(self) -> tempfile::TempDir {
        // The drain timeout (30 s by default) and the tasks' grace, with room to spare.
        bounded("the router's stop", SETTLE * 3, self.router.stop()).await;
        self.dir
    }
}

/// A `[[plugin]]` table for a built plugin, with extra lines appended.
pub fn plugin_table(name: &str, file: &str, extra: &str) -> String {
    format!("[[plugin]]\nname = \"{name}\"\npath = \"{}\"\n{extra}\n", plugin(file).display())
}

/// Await `step`, or fail the test naming it once `within` has passed: a test that hangs
/// instead says where. (CI hung twice, idle, with every effect of the test's messages
/// committed; the steps its tests await on the broker or the router are bounded this way.)
pub async fn bounded<T>(step: &str, within: Duration, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(within, future).await.unwrap_or_else(|_| panic!("{step} did not finish within {within:?}"))
}

/// Whether the broker acked a published test message. A confirm that never comes fails the
/// test rather than hanging it: a run once hung idle with every effect of its messages
/// committed, and an unbounded confirm is one await that can do that.
async fn confirmed(confirm: PublisherConfirm) -> bool {
    bounded("a test message's publisher confirm", SETTLE, confirm).await.expect("confirm").is_ack()
}

/// RabbitMQ objects of one test: an exchange, queue prefix and ingress queue, all unique, and
/// deleted on drop.
pub struct Rabbit {
    pub exchange: String,
    pub prefix: String,
    pub ingress: String,
    queues: std::sync::Mutex<Vec<String>>,
    _conn: Connection,
    pub channel: Channel,
}

impl Rabbit {
    pub async fn new() -> Rabbit {
        let conn =
            Connection::connect(&amqp_url(), ConnectionProperties::default()).await.expect("connect to RabbitMQ");
        let channel = conn.create_channel().await.expect("channel");
        channel.confirm_select(Default::default()).await.expect("confirms");
        let id = unique("t");
        Rabbit {
            exchange: format!("{id}.events"),
            prefix: format!("{id}."),
            ingress: format!("{id}.ingress"),
            queues: std::sync::Mutex::new(Vec::new()),
            _conn: conn,
            channel,
        }
    }

    /// The `[rabbitmq]` section for this test's names.
    pub fn section(&self, with_ingress: bool) -> String {
        let ingress = if with_ingress { format!("ingress_queues = [\"{}\"]\n", self.ingress) } else { String::new() };
        format!(
            "[rabbitmq]\nurl = \"{}\"\nexchange = \"{}\"\nqueue_prefix = \"{}\"\nprefetch = 64\n{ingress}",
            amqp_url(),
            self.exchange,
            self.prefix
        )
    }

    /// Remember a plugin's queue for deletion.
    pub fn track_plugin(&self, plugin: &str) {
        self.queues.lock().unwrap().push(format!("{}{plugin}", self.prefix));
    }

    /// Publish exactly as a NestJS `ClientProxy.emit` over RMQ does: default exchange, routing
    /// key = queue, persistent, empty headers, no content type, no message id.
    pub async fn emit_nestjs(&self, pattern: &str, data: serde_json::Value) {
        let body = serde_json::json!({ "pattern": pattern, "data": data }).to_string();
        let props = BasicProperties::default().with_delivery_mode(2).with_headers(FieldTable::default());
        self.publish("", &self.ingress.clone(), body.as_bytes(), props).await;
    }

    /// Publish to the test's exchange.
    pub async fn publish_event(&self, routing_key: &str, body: &[u8], props: BasicProperties) {
        self.publish(&self.exchange.clone(), routing_key, body, props).await;
    }

    /// Publish many messages to the exchange, then wait for all the confirms.
    pub async fn publish_many(&self, messages: impl IntoIterator<Item = (String, Vec<u8>, BasicProperties)>) {
        let mut confirms = Vec::new();
        for (routing_key, body, props) in messages {
            confirms.push(self.send(&self.exchange, &routing_key, &body, props).await);
        }
        for confirm in confirms {
            assert!(confirmed(confirm).await, "broker refused a test message");
        }
    }

    pub async fn publish(&self, exchange: &str, routing_key: &str, body: &[u8], props: BasicProperties) {
        let confirm = self.send(exchange, routing_key, body, props).await;
        assert!(confirmed(confirm).await, "broker refused a test message");
    }

    /// Publish one message; its confirm is the caller's to await.
    async fn send(&self, exchange: &str, routing_key: &str, body: &[u8], props: BasicProperties) -> PublisherConfirm {
        let publish = self.channel.basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            body,
            props,
        );
        bounded("a test message's publish", SETTLE, publish).await.expect("publish")
    }

    /// A queue bound to the exchange with `pattern`, to observe what the router publishes.
    pub async fn tap(&self, pattern: &str) -> String {
        let queue = unique("tap");
        let options = lapin::options::ExchangeDeclareOptions { durable: true, ..Default::default() };
        self.channel
            .exchange_declare(self.exchange.as_str().into(), lapin::ExchangeKind::Topic, options, FieldTable::default())
            .await
            .expect("declare exchange");
        self.channel
            .queue_declare(queue.as_str().into(), QueueDeclareOptions::default(), FieldTable::default())
            .await
            .expect("declare tap");
        self.channel
            .queue_bind(
                queue.as_str().into(),
                self.exchange.as_str().into(),
                pattern.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind tap");
        self.queues.lock().unwrap().push(queue.clone());
        queue
    }

    /// Wait for the next message on a queue, failing the test after `timeout`.
    pub async fn next_message(&self, queue: &str, timeout: Duration) -> lapin::message::BasicGetMessage {
        eventually_async(&format!("a message on {queue}"), timeout, async || self.get(queue).await).await
    }

    /// Take one message from a queue, if any.
    pub async fn get(&self, queue: &str) -> Option<lapin::message::BasicGetMessage> {
        self.channel.basic_get(queue.into(), BasicGetOptions { no_ack: true }).await.expect("basic.get")
    }
}

impl Drop for Rabbit {
    fn drop(&mut self) {
        let mut queues = self.queues.lock().map(|q| q.clone()).unwrap_or_default();
        queues.push(self.ingress.clone());
        let exchange = self.exchange.clone();
        // Delete on a thread of its own: Drop cannot await, and the test's runtime may be ending.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                let Ok(conn) = Connection::connect(&amqp_url(), ConnectionProperties::default()).await else { return };
                let Ok(ch) = conn.create_channel().await else { return };
                for q in queues {
                    let _ = ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await;
                }
                let _ = ch.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default()).await;
                let _ = conn.close(200, "test done".into()).await;
            });
        })
        .join();
    }
}

/// A TCP proxy on loopback in front of a server, whose connections a test can cut, and keep
/// refusing for a while, to simulate a broker outage without touching the shared server; or
/// freeze, to simulate a link that silently stops carrying bytes; or stall, to simulate a
/// server that accepts connections and never answers on them.
pub struct Proxy {
    pub port: u16,
    upstream: String,
    cut: tokio::sync::watch::Sender<u64>,
    freeze: tokio::sync::watch::Sender<u64>,
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stalled: std::sync::Arc<std::sync::atomic::AtomicBool>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: &str) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let (cut, cuts) = tokio::sync::watch::channel(0u64);
        let (freeze, freezes) = tokio::sync::watch::channel(0u64);
        let down = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let refusing = down.clone();
        let stalled = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stalling = stalled.clone();
        let target = upstream.to_string();
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if refusing.load(std::sync::atomic::Ordering::SeqCst) {
                    // The broker is "down": the connection closes at once.
                    continue;
                }
                if stalling.load(std::sync::atomic::Ordering::SeqCst) {
                    // Accepted, and held open carrying nothing until a cut.
                    let mut cuts = cuts.clone();
                    cuts.mark_unchanged();
                    tokio::spawn(async move {
                        let _held = client;
                        drop(cuts.changed().await);
                    });
                    continue;
                }
                let upstream = target.clone();
                let (mut cuts, mut freezes) = (cuts.clone(), freezes.clone());
                // Only cuts and freezes after this connection was made affect it.
                cuts.mark_unchanged();
                freezes.mark_unchanged();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cuts.changed() => {}
                        // Both sockets stay open and carry nothing more, until a cut.
                        _ = freezes.changed() => drop(cuts.changed().await),
                    }
                });
            }
        });
        Proxy { port, upstream: upstream.to_string(), cut, freeze, down, stalled, accept }
    }

    /// `text` (a config, a URL) with the upstream's address replaced by the proxy's.
    pub fn through(&self, text: &str) -> String {
        text.replace(&self.upstream, &format!("127.0.0.1:{}", self.port))
    }

    /// Close every connection open through the proxy; new ones are accepted again.
    pub fn cut(&self) {
        self.cut.send_modify(|n| *n += 1);
    }

    /// Stop forwarding on every connection open through the proxy, without closing them: what
    /// is sent on them is never answered. New connections are forwarded as usual.
    pub fn freeze(&self) {
        self.freeze.send_modify(|n| *n += 1);
    }

    /// Accept new connections and never forward them: what is sent on them is never answered.
    /// The connections open already carry on as usual.
    pub fn stall(&self) {
        self.stalled.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// An outage: close every connection and refuse new ones until [`up`](Self::up).
    pub fn down(&self) {
        self.down.store(true, std::sync::atomic::Ordering::SeqCst);
        self.cut();
    }

    /// The outage is over.
    pub fn up(&self) {
        self.down.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// How long a test waits for a router to handle what it was given.
pub const SETTLE: Duration = Duration::from_secs(30);

/// A `router.toml` on this test's RabbitMQ names with these `(name, file, extra)` plugins.
pub fn config(rabbit: &Rabbit, ingress: bool, plugins: &[(&str, &str, &str)]) -> String {
    let mut text = format!("[router]\ndata_dir = \"{{data_dir}}\"\nlog = \"warn\"\n{}", rabbit.section(ingress));
    for (name, file, extra) in plugins {
        rabbit.track_plugin(name);
        text.push_str(&plugin_table(name, file, extra));
    }
    text
}

/// Why `/v1/ready` says `source` is not connected, once it says more than that the first
/// connection is under way. Every answer meanwhile must be a 503.
pub async fn not_ready_reason(t: &TestRouter, source: &str) -> String {
    let connecting = format!("not connected: {source} (connecting)");
    eventually_async("the reason the source is not connected", SETTLE, async || {
        let (status, body) = t.admin("GET", "/v1/ready", "application/json", "").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        let message = body["error"]["message"].as_str()?.to_string();
        (message != connecting).then_some(message)
    })
    .await
}

/// Wait until the router has settled everything and the given queues are drained.
pub async fn settle(t: &TestRouter, queues: &[String]) {
    let deadline = Instant::now() + SETTLE;
    let mut quiet = 0;
    while quiet < 2 {
        assert!(Instant::now() < deadline, "router did not settle");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut empty = t.router.is_connected() && t.router.is_idle();
        for q in queues {
            empty &= switchyard::router::queue_depth(&amqp_url(), q).await == Some(0);
        }
        quiet = if empty { quiet + 1 } else { 0 };
    }
}

/// Stop the router and check that every message was acknowledged: the broker requeues what a
/// closing consumer left unacknowledged, so a missing ack shows up as a message in the queue.
pub async fn stop_and_assert_acked(t: TestRouter, queues: &[String]) {
    drop(t.stop().await);
    for q in queues {
        assert_eq!(switchyard::router::queue_depth(&amqp_url(), q).await, Some(0), "{q} has unacknowledged messages");
    }
}

/// Wait for the router's sources to connect.
pub async fn connected(t: &TestRouter) {
    eventually("the sources to connect", SETTLE, || t.router.is_connected().then_some(())).await;
}

/// The message of an admin error reply (`{"error": {"code", "message"}}`); empty for any
/// other body.
pub fn error_message(body: &serde_json::Value) -> &str {
    body["error"]["message"].as_str().unwrap_or_default()
}
