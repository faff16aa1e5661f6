//! Against the real Redis on loopback, with real plugin components: NestJS-format events over
//! pub/sub, Redis Streams with consumer groups (claiming what a dead consumer left), the
//! outbox publishing to Redis, malformed messages kept with their reason, and the consumer
//! groups a removed plugin leaves, discarded over the admin API.

use std::time::Duration;

use redis::AsyncCommands;
use serde_json::json;
use switchyard_tests::{
    TestRouter, error_message, eventually, eventually_async, not_ready_reason, plugin_table, unique,
};

const SETTLE: Duration = Duration::from_secs(30);

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

async fn redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_url()).unwrap().get_multiplexed_async_connection().await.expect("connect to Redis")
}

/// Deletes the test's streams when it ends.
struct Keys(Vec<String>);

impl Drop for Keys {
    fn drop(&mut self) {
        let keys = std::mem::take(&mut self.0);
        let _ = std::thread::spawn(move || {
            let mut conn = redis::Client::open(redis_url()).unwrap().get_connection().unwrap();
            let _: redis::RedisResult<()> = redis::cmd("DEL").arg(&keys).query(&mut conn);
        })
        .join();
    }
}

fn header(extra: &str) -> String {
    format!("[router]\ndata_dir = \"{{data_dir}}\"\nlog = \"warn\"\n[redis]\nurl = \"{}\"\n{extra}", redis_url())
}

/// [`header`] with Redis Streams on `stream`, and `extra` lines of `[redis.streams]`.
fn on_stream(stream: &str, extra: &str) -> String {
    header(&format!("[redis.streams]\nstreams = [\"{stream}\"]\n{extra}"))
}

async fn metrics_text(t: &TestRouter) -> String {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let request = axum::http::Request::get("/metrics").body(axum::body::Body::empty()).unwrap();
    let response = switchyard::admin::app(t.router.admin_state(None)).oneshot(request).await.unwrap();
    String::from_utf8(response.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

async fn connected(t: &TestRouter) {
    eventually("the Redis source to connect", SETTLE, || t.router.is_connected().then_some(())).await;
}

#[tokio::test]
async fn nestjs_events_over_pubsub_reach_the_replica_and_published_events_come_back() {
    let prefix = format!("{}:", unique("t"));
    // NestJS's {pattern, data} has no room for ids over pub/sub (no headers): CloudEvents keeps them.
    let text = header(&format!("sink_format = \"cloudevents\"\n[redis.pubsub]\nchannel_prefix = \"{prefix}\"\n"))
        + &plugin_table("user-replica", "user_replica.wasm", "")
        + &plugin_table("misbehave", "misbehave.wasm", "publishes = [\"chaos.published\"]\n")
        + &plugin_table("stamp", "stamp_v1.wasm", "subscriptions = [\"auth.tokenGenerated\"]\n");
    let t = TestRouter::start(&text).await;
    connected(&t).await;
    let mut conn = redis().await;
    // Exactly what NestJS's Redis transport sends for ClientProxy.emit(pattern, data).
    let login = json!({ "pattern": "auth.tokenGenerated", "data": { "user": { "user_id": "r1", "name": "Rosa" }, "token": "tok" } });
    let _: () = conn.publish(format!("{prefix}auth.tokenGenerated"), login.to_string()).await.unwrap();
    let doc = eventually("the replica", SETTLE, || t.doc("user-replica", "user_refs", "r1")).await;
    assert_eq!((doc["name"].as_str(), doc["token"].as_str()), (Some("Rosa"), Some("tok")));
    // Every plugin subscribed gets the message, as the same event: stamp keys its document by
    // the event's id, here the content id of the id-less NestJS message.
    let id = switchyard::envelope::content_id("auth.tokenGenerated", login.to_string().as_bytes());
    let stamped = eventually("stamp's document", SETTLE, || t.doc("stamp", "stamped", &id.0)).await;
    assert_eq!(stamped["name"], "auth.tokenGenerated");

    // The pub/sub sink publishes on <prefix><name>; the router hears its own event.
    let cause = json!({ "pattern": "chaos.publish", "data": {}, "id": "ps-1" });
    let _: () = conn.publish(format!("{prefix}chaos.publish"), cause.to_string()).await.unwrap();
    let published = eventually("the published event to come back", SETTLE, || {
        let rows = t.router.readers.scan("misbehave", "seen", "", 100).unwrap();
        rows.into_iter()
            .map(|r| serde_json::from_str::<serde_json::Value>(&r.body).unwrap())
            .find(|d| d["name"] == "chaos.published")
    })
    .await;
    assert_eq!(published["causation_id"], "ps-1");
    assert_eq!(published["source"], "misbehave");

    let _: () = conn.publish(format!("{prefix}user.updated"), "{broken").await.unwrap();
    let letters = eventually("the pub/sub dead letter", SETTLE, || {
        let l = t.router.readers.dead_letters("redis:pubsub", 0, 10).unwrap();
        (!l.is_empty()).then_some(l)
    })
    .await;
    assert!(letters[0].reason.starts_with("body is not JSON"), "{letters:?}");
}

#[tokio::test]
async fn stream_entries_apply_once_and_entries_of_a_dead_consumer_are_claimed() {
    let stream = unique("stream");
    let out = unique("out");
    let _keys = Keys(vec![stream.clone(), out.clone()]);
    let group_prefix = format!("{}.", unique("g"));
    let group = format!("{group_prefix}misbehave");
    let mut conn = redis().await;
    let add = |id: &str, name: &str| {
        let body = json!({ "pattern": name, "data": {} }).to_string();
        (id.to_string(), name.to_string(), body)
    };
    // Two entries read by a consumer that then died without acknowledging them.
    let _: () = conn.xgroup_create_mkstream(&stream, &group, "0").await.unwrap();
    for (id, name, body) in [add("dead-1", "chaos.ok"), add("dead-2", "chaos.publish")] {
        let _: String = conn
            .xadd(&stream, "*", &[("event", body.as_str()), ("id", id.as_str()), ("name", name.as_str())])
            .await
            .unwrap();
    }
    let opts = redis::streams::StreamReadOptions::default().group(&group, "dead-consumer").count(10);
    let taken: redis::streams::StreamReadReply = conn.xread_options(&[&stream], &[">"], &opts).await.unwrap();
    assert_eq!(taken.keys[0].ids.len(), 2);

    let text = header(&format!(
        "sink_mode = \"stream\"\nsink_stream = \"{out}\"\n[redis.streams]\nstreams = [\"{stream}\"]\ngroup_prefix = \"{group_prefix}\"\nconsumer = \"router-a\"\nclaim_idle_ms = 200\n"
    )) + &plugin_table("misbehave", "misbehave.wasm", "publishes = [\"chaos.published\"]\n");
    let t = TestRouter::start(&text).await;
    connected(&t).await;
    for (id, name, body) in [add("new-1", "chaos.ok"), add("new-1", "chaos.ok"), add("new-2", "chaos.ok")] {
        let _: String = conn
            .xadd(&stream, "*", &[("event", body.as_str()), ("id", id.as_str()), ("name", name.as_str())])
            .await
            .unwrap();
    }
    let _: String = conn.xadd(&stream, "*", &[("id", "no-event")]).await.unwrap();

    for id in ["dead-1", "dead-2", "new-1", "new-2"] {
        eventually(id, SETTLE, || t.doc("misbehave", "seen", id)).await;
    }
    let claimed = t.doc("misbehave", "seen", "dead-1").unwrap();
    assert_eq!(claimed["attempt"], 2, "the delivery count becomes the attempt");
    assert_eq!(t.doc("misbehave", "seen", "new-2").unwrap()["attempt"], 1);
    let letters = eventually("the malformed entry's dead letter", SETTLE, || {
        let l = t.dead_letters("misbehave");
        (!l.is_empty()).then_some(l)
    })
    .await;
    assert_eq!(letters[0].1, "stream entry has no `event` field");

    // Every entry acknowledged; the duplicate id applied once.
    eventually("no pending entries", SETTLE, || {
        let mut sync = redis::Client::open(redis_url()).unwrap().get_connection().unwrap();
        let pending: redis::streams::StreamPendingReply =
            redis::Commands::xpending(&mut sync, &stream, &group).unwrap();
        (pending.count() == 0).then_some(())
    })
    .await;
    let seen = t.router.readers.scan("misbehave", "seen", "", 100).unwrap();
    assert_eq!(seen.iter().filter(|r| r.body.contains("\"chaos.ok\"")).count(), 3, "dead-1, new-1 once, new-2");

    // The consumer lag Redis reports is exported: nothing left to deliver or to acknowledge.
    let metrics = metrics_text(&t).await;
    for gauge in ["switchyard_stream_lag", "switchyard_stream_pending"] {
        let line = format!("{gauge}{{plugin=\"misbehave\",stream=\"{stream}\"}} 0");
        assert!(metrics.contains(&line), "{line} missing from:\n{metrics}");
    }

    // The outbox added the event chaos.publish published to the sink stream.
    let entries: redis::streams::StreamRangeReply = conn.xrange_all(&out).await.unwrap();
    assert_eq!(entries.ids.len(), 1);
    let entry = &entries.ids[0];
    assert_eq!(entry.get::<String>("name").as_deref(), Some("chaos.published"));
    let body: serde_json::Value = serde_json::from_str(&entry.get::<String>("event").unwrap()).unwrap();
    assert_eq!(body, json!({ "pattern": "chaos.published", "data": { "from": "dead-2" } }));
    assert_eq!(entry.get::<String>("x-causation-id").as_deref(), Some("dead-2"), "metadata travels as entry fields");
    assert_eq!(entry.get::<String>("x-source").as_deref(), Some("misbehave"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_reconnects_resubscribes_and_counts_the_gap() {
    let proxy = switchyard_tests::Proxy::start("127.0.0.1:6379").await;
    let prefix = format!("{}:", unique("gap"));
    let text = format!(
        "[router]\ndata_dir = \"{{data_dir}}\"\nlog = \"warn\"\n[redis]\nurl = \"redis://127.0.0.1:{}\"\n[redis.pubsub]\nchannel_prefix = \"{prefix}\"\n",
        proxy.port
    ) + &plugin_table("user-replica", "user_replica.wasm", "");
    let t = TestRouter::start(&text).await;
    connected(&t).await;
    let gaps_before = gap_count(&metrics_text(&t).await);
    let mut conn = redis().await;
    let login = |id: &str| {
        json!({ "pattern": "auth.tokenGenerated", "data": { "user": { "user_id": id }, "token": "t" } }).to_string()
    };
    let _: () = conn.publish(format!("{prefix}auth.tokenGenerated"), login("before")).await.unwrap();
    eventually("the event before the cut", SETTLE, || t.doc("user-replica", "user_refs", "before")).await;

    proxy.cut();
    eventually("the gap to be counted", SETTLE, || (gap_count(&metrics_text_blocking(&t)) > gaps_before).then_some(()))
        .await;
    connected(&t).await;
    // Re-subscribed: an event published now arrives. (What was published during the gap is
    // lost by design; that is what the counter says.)
    eventually_async("an event after the reconnection", SETTLE, async || {
        let arrived = t.doc("user-replica", "user_refs", "after");
        if arrived.is_none() {
            let _: () = conn.publish(format!("{prefix}auth.tokenGenerated"), login("after")).await.unwrap();
        }
        arrived
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_slower_than_its_publishers_drops_what_its_buffer_cannot_hold_and_counts_it() {
    const SENT: u64 = 300;
    let prefix = format!("{}:", unique("slow"));
    // One lane taking 2 ms an event, and a buffer of 4: 300 messages published at once cannot
    // all be held.
    let text = header(&format!("[redis.pubsub]\nchannel_prefix = \"{prefix}\"\nbuffer = 4\n"))
        + &plugin_table("misbehave", "misbehave.wasm", "concurrency = 1\n");
    let t = TestRouter::start(&text).await;
    connected(&t).await;
    let dropped_before = dropped_count(&metrics_text(&t).await);
    let handled = || t.router.plugins.get("misbehave").unwrap().slot().counters.snapshot().succeeded;
    let mut conn = redis().await;
    let sleep = |n: u64| json!({ "pattern": "chaos.sleep", "data": { "ms": 2, "n": n } }).to_string();
    let mut pipe = redis::pipe();
    for n in 0..SENT {
        pipe.publish(format!("{prefix}chaos.sleep"), sleep(n)).ignore();
    }
    let () = pipe.query_async(&mut conn).await.unwrap();
    let dropped = || dropped_count(&metrics_text_blocking(&t)) - dropped_before;
    eventually("every message to be handled or dropped", SETTLE, || {
        (handled() + dropped() >= SENT && t.router.is_idle()).then_some(())
    })
    .await;
    let (handled_now, dropped_now) = (handled(), dropped());
    assert_eq!(handled_now + dropped_now, SENT, "each message handled or counted as dropped, once");
    assert!(dropped_now > 0 && handled_now > 0, "{handled_now} handled, {dropped_now} dropped");
    // Dropping costs the subscription nothing: the next message is handled.
    let _: () = conn.publish(format!("{prefix}chaos.sleep"), sleep(SENT)).await.unwrap();
    eventually("the message after the drops", SETTLE, || (handled() > handled_now).then_some(())).await;
    assert_eq!(dropped(), dropped_now);
}

fn dropped_count(metrics: &str) -> u64 {
    counter(metrics, "switchyard_pubsub_dropped_total", "")
}

/// `XADD` a `chaos.ok` event with this id, which `misbehave` records in its `seen` collection.
async fn add_ok(conn: &mut redis::aio::MultiplexedConnection, stream: &str, id: &str) {
    let body = json!({ "pattern": "chaos.ok", "data": {} }).to_string();
    let _: String = conn.xadd(stream, "*", &[("event", body.as_str()), ("id", id)]).await.unwrap();
}

fn gap_count(metrics: &str) -> u64 {
    counter(metrics, "switchyard_pubsub_gaps_total", "")
}

/// How often the consumer of `stream` restarted (0 before its first restart).
fn stream_restarts(metrics: &str, stream: &str) -> u64 {
    counter(metrics, "switchyard_stream_restarts_total", &format!("stream=\"{stream}\""))
}

/// The value of the first sample of `name` whose line contains `label`.
fn counter(metrics: &str, name: &str, label: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.starts_with(name) && l.contains(label))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or(0)
}

/// `/metrics` from a synchronous polling closure.
fn metrics_text_blocking(t: &TestRouter) -> String {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(metrics_text(t)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routers_sharing_a_consumer_group_share_the_entries() {
    let stream = unique("shared");
    let _keys = Keys(vec![stream.clone()]);
    let group_prefix = format!("{}.", unique("g"));
    let router = |consumer: &str| {
        header(&format!(
            "[redis.streams]\nstreams = [\"{stream}\"]\ngroup_prefix = \"{group_prefix}\"\nconsumer = \"{consumer}\"\nbatch = 4\n"
        )) + &plugin_table("misbehave", "misbehave.wasm", "publishes = [\"chaos.published\"]\n")
    };
    let a = TestRouter::start(&router("a")).await;
    let b = TestRouter::start(&router("b")).await;
    connected(&a).await;
    connected(&b).await;
    let mut conn = redis().await;
    // A consumer joins its group with its first read: until both have read, one of them could
    // take every entry.
    let group = format!("{group_prefix}misbehave");
    let joined = std::time::Instant::now() + SETTLE;
    loop {
        let info: redis::RedisResult<redis::streams::StreamInfoConsumersReply> =
            conn.xinfo_consumers(&stream, &group).await;
        if info.is_ok_and(|i| i.consumers.len() == 2) {
            break;
        }
        assert!(std::time::Instant::now() < joined, "both consumers must join {group} within {SETTLE:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let total = 400;
    for i in 0..total {
        add_ok(&mut conn, &stream, &format!("e{i}")).await;
    }
    let count = |t: &TestRouter| t.router.readers.scan("misbehave", "seen", "", 10_000).unwrap().len();
    eventually("every entry handled", SETTLE, || (count(&a) + count(&b) == total).then_some(())).await;
    assert!(count(&a) > 0 && count(&b) > 0, "both routers took a share: {} and {}", count(&a), count(&b));
    for i in 0..total {
        let id = format!("e{i}");
        assert!(
            a.doc("misbehave", "seen", &id).is_some() != b.doc("misbehave", "seen", &id).is_some(),
            "{id} handled by exactly one router"
        );
    }
}

#[tokio::test]
async fn pubsub_and_streams_follow_plugins_added_swapped_and_removed_over_the_admin_api() {
    let prefix = format!("{}:", unique("t"));
    let stream = unique("stream");
    let _keys = Keys(vec![stream.clone()]);
    let text =
        header(&format!("[redis.pubsub]\nchannel_prefix = \"{prefix}\"\n[redis.streams]\nstreams = [\"{stream}\"]\n"))
            + &plugin_table("user-replica", "user_replica.wasm", "");
    let t = TestRouter::start(&text).await;
    connected(&t).await;
    let mut conn = redis().await;
    let stamp = std::fs::read(switchyard_tests::plugin("stamp_v1.wasm")).unwrap();
    let stamped = |id: &str| t.doc("stamp", "stamped", id);
    let event = |name: &str, id: &str| json!({ "pattern": name, "data": {}, "id": id }).to_string();

    // Added while running: pub/sub subscribes to its channel and its stream consumer group starts.
    let (status, body) = t
        .admin("PUT", "/v1/plugins/stamp?subscriptions=stamp.one&concurrency=1", "application/wasm", stamp.clone())
        .await;
    assert_eq!(status, axum::http::StatusCode::CREATED, "{body}");
    let _: () = conn.publish(format!("{prefix}stamp.one"), event("stamp.one", "ps-1")).await.unwrap();
    let _: String = conn.xadd(&stream, "*", &[("event", event("stamp.one", "st-1"))]).await.unwrap();
    eventually("the pub/sub event", SETTLE, || stamped("ps-1")).await;
    eventually("the stream entry", SETTLE, || stamped("st-1")).await;

    // Swapped to other subscriptions: pub/sub re-subscribes on the same connection.
    let (status, body) =
        t.admin("PUT", "/v1/plugins/stamp?subscriptions=stamp.two", "application/wasm", stamp.clone()).await;
    assert_eq!(status, axum::http::StatusCode::OK, "{body}");
    // One lane, and Redis delivers one publisher's messages in order: when `ps-2` is handled,
    // `ps-old` would have been handled before it.
    let _: () = conn.publish(format!("{prefix}stamp.one"), event("stamp.one", "ps-old")).await.unwrap();
    let _: () = conn.publish(format!("{prefix}stamp.two"), event("stamp.two", "ps-2")).await.unwrap();
    eventually("the event of the new subscription", SETTLE, || stamped("ps-2")).await;
    assert!(stamped("ps-old").is_none(), "the old subscription is dropped");
    // and dropped at Redis too, not merely filtered out by the router.
    eventually_async("Redis to drop the old channel's subscriber", SETTLE, async || {
        let (_, subscribers): (String, u64) =
            redis::cmd("PUBSUB").arg("NUMSUB").arg(format!("{prefix}stamp.one")).query_async(&mut conn).await.unwrap();
        (subscribers == 0).then_some(())
    })
    .await;

    // Removed: its consumer group stays where it stopped and picks up again when it is back.
    let (status, body) = t.admin("DELETE", "/v1/plugins/stamp", "application/json", "").await;
    assert_eq!((status, body["drained"].as_bool()), (axum::http::StatusCode::OK, Some(true)), "{body}");
    let _: String = conn.xadd(&stream, "*", &[("event", event("stamp.two", "st-2"))]).await.unwrap();
    let (status, body) = t.admin("PUT", "/v1/plugins/stamp?subscriptions=stamp.two", "application/wasm", stamp).await;
    assert_eq!(status, axum::http::StatusCode::CREATED, "{body}");
    eventually("the entry added while it was removed", SETTLE, || stamped("st-2")).await;
}

#[tokio::test]
async fn discard_queue_deletes_a_plugins_consumer_groups_running_or_left_behind_unless_another_router_reads_them() {
    let stream = unique("stream");
    let _keys = Keys(vec![stream.clone()]);
    let text = on_stream(&stream, "") + &plugin_table("user-replica", "user_replica.wasm", "");
    let t = TestRouter::start(&text).await;
    connected(&t).await;
    let mut conn = redis().await;
    let groups = async |conn: &mut redis::aio::MultiplexedConnection| -> Vec<String> {
        let info: redis::streams::StreamInfoGroupsReply = conn.xinfo_groups(&stream).await.unwrap();
        info.groups.into_iter().map(|g| g.name).collect()
    };
    let stamp = std::fs::read(switchyard_tests::plugin("stamp_v1.wasm")).unwrap();
    let add = async |conn: &mut redis::aio::MultiplexedConnection| {
        let (status, body) =
            t.admin("PUT", "/v1/plugins/stamp?subscriptions=stamp.one", "application/wasm", stamp.clone()).await;
        assert_eq!(status, axum::http::StatusCode::CREATED, "{body}");
        eventually_async("the plugin's consumer group", SETTLE, async || {
            groups(conn).await.contains(&"switchyard.stamp".to_string()).then_some(())
        })
        .await;
    };

    // Removed while running with discard_queue: its group goes.
    add(&mut conn).await;
    let (status, body) = t.admin("DELETE", "/v1/plugins/stamp?discard_queue=true", "application/json", "").await;
    assert_eq!(status, axum::http::StatusCode::OK, "{body}");
    assert_eq!((body["discarded_queue"].as_bool(), body["discarded_groups"].as_u64()), (Some(true), Some(1)), "{body}");
    assert!(!groups(&mut conn).await.contains(&"switchyard.stamp".to_string()), "the group is deleted");

    // Removed, its group is kept; deleted with discard_queue right after (this router's own
    // consumer read from it a moment ago: not another router's), the group goes.
    add(&mut conn).await;
    let (status, body) = t.admin("DELETE", "/v1/plugins/stamp", "application/json", "").await;
    assert_eq!(status, axum::http::StatusCode::OK, "{body}");
    assert!(groups(&mut conn).await.contains(&"switchyard.stamp".to_string()), "a removed plugin's group is kept");
    let (status, body) = t.admin("DELETE", "/v1/plugins/stamp?discard_queue=true", "application/json", "").await;
    assert_eq!(status, axum::http::StatusCode::OK, "{body}");
    assert_eq!((body["discarded_queue"].as_bool(), body["discarded_groups"].as_u64()), (Some(true), Some(1)), "{body}");
    assert!(!groups(&mut conn).await.contains(&"switchyard.stamp".to_string()), "the group is deleted");
    let (status, body) = t.admin("DELETE", "/v1/plugins/stamp?discard_queue=true", "application/json", "").await;
    assert_eq!(status, axum::http::StatusCode::NOT_FOUND, "{body}");
    let message = error_message(&body);
    assert!(message.contains("Redis has no consumer group switchyard.stamp"), "{body}");

    // A group another router's consumer reads from is that router's plugin: kept. (Before
    // Redis 7.2 a read counts only when it receives entries: the consumer takes one.)
    let _: () = conn.xgroup_create(&stream, "switchyard.elsewhere", "$").await.unwrap();
    let _: String = conn.xadd(&stream, "*", &[("event", r#"{"pattern":"elsewhere.one","data":{}}"#)]).await.unwrap();
    let options = redis::streams::StreamReadOptions::default().group("switchyard.elsewhere", "another-router");
    let _: redis::streams::StreamReadReply = conn.xread_options(&[&stream], &[">"], &options).await.unwrap();
    let (status, body) = t.admin("DELETE", "/v1/plugins/elsewhere?discard_queue=true", "application/json", "").await;
    assert_eq!(status, axum::http::StatusCode::CONFLICT, "{body}");
    assert!(error_message(&body).contains("is read by another router"), "{body}");
    assert!(groups(&mut conn).await.contains(&"switchyard.elsewhere".to_string()), "a group in use is kept");

    // Another router runs a plugin of the name on the stream: its reading connection is named
    // for the group, which shows it even where Redis (before 7.2) does not count its blocking
    // reads of a quiet stream as reads.
    let other = on_stream(&stream, "consumer = \"router-b\"\n") + &plugin_table("stamp", "stamp_v1.wasm", "");
    let b = TestRouter::start(&other).await;
    connected(&b).await;
    let reader = format!("switchyard.stamp@{stream}@router-b");
    let named = async |conn: &mut redis::aio::MultiplexedConnection, name: &str| {
        let list: String = redis::cmd("CLIENT").arg("LIST").query_async(conn).await.unwrap();
        list.lines().any(|l| l.split(' ').any(|f| f == format!("name={name}")))
    };
    eventually_async("router b's named reader", SETTLE, async || named(&mut conn, &reader).await.then_some(())).await;
    let (status, body) = t.admin("DELETE", "/v1/plugins/stamp?discard_queue=true", "application/json", "").await;
    assert_eq!(status, axum::http::StatusCode::CONFLICT, "{body}");
    assert!(groups(&mut conn).await.contains(&"switchyard.stamp".to_string()), "router b's group is kept");
    // Running on both routers: the discard is refused, and the plugin keeps running here.
    add(&mut conn).await;
    let (status, body) = t.admin("DELETE", "/v1/plugins/stamp?discard_queue=true", "application/json", "").await;
    assert_eq!(status, axum::http::StatusCode::CONFLICT, "{body}");
    assert!(error_message(&body).contains("nothing is removed or deleted"), "{body}");
    assert!(t.router.plugins.get("stamp").is_some(), "the plugin still runs");
    let (status, body) = t.admin("DELETE", "/v1/plugins/stamp", "application/json", "").await;
    assert_eq!(status, axum::http::StatusCode::OK, "{body}");
    drop(b.stop().await);

    // The name alone shows a reader: a group no consumer has joined, with a connection named
    // for it, is kept until that connection closes.
    let _: () = conn.xgroup_create(&stream, "switchyard.quiet", "$").await.unwrap();
    let quiet = format!("switchyard.quiet@{stream}@router-c");
    let mut reader_c = redis().await;
    let _: () = redis::cmd("CLIENT").arg("SETNAME").arg(&quiet).query_async(&mut reader_c).await.unwrap();
    let (status, body) = t.admin("DELETE", "/v1/plugins/quiet?discard_queue=true", "application/json", "").await;
    assert_eq!(status, axum::http::StatusCode::CONFLICT, "{body}");
    drop(reader_c);
    eventually_async("the reader's connection to close", SETTLE, async || {
        (!named(&mut conn, &quiet).await).then_some(())
    })
    .await;
    let (status, body) = t.admin("DELETE", "/v1/plugins/quiet?discard_queue=true", "application/json", "").await;
    assert_eq!((status, body["discarded_groups"].as_u64()), (axum::http::StatusCode::OK, Some(1)), "{body}");
}

#[tokio::test]
async fn a_consumer_group_another_router_takes_up_while_its_plugin_is_removed_is_kept() {
    let stream = unique("stream");
    let _keys = Keys(vec![stream.clone()]);
    let text =
        on_stream(&stream, "") + &plugin_table("misbehave", "misbehave.wasm", "[plugin.limits]\ntimeout_ms = 60000\n");
    let t = TestRouter::start(&text).await;
    connected(&t).await;
    let mut conn = redis().await;
    let misbehave = t.router.plugins.get("misbehave").unwrap();
    // An invocation that waits 5 s in a host call holds the removal in its drain, after the
    // check that no other router reads the group.
    let sleep = json!({ "pattern": "chaos.sleep", "data": { "ms": 5000 } }).to_string();
    let _: String = conn.xadd(&stream, "*", &[("event", sleep.as_str())]).await.unwrap();
    eventually("the invocation to start", SETTLE, || (misbehave.pending() == 1).then_some(())).await;
    let removal = t.admin("DELETE", "/v1/plugins/misbehave?discard_queue=true", "application/json", "");
    let other_router = async {
        eventually("the plugin to leave the set", SETTLE, || t.router.plugins.get("misbehave").is_none().then_some(()))
            .await;
        assert_eq!(misbehave.pending(), 1, "the removal still drains the invocation");
        let mut reader = redis().await;
        let name = format!("switchyard.misbehave@{stream}@router-b");
        let () = redis::cmd("CLIENT").arg("SETNAME").arg(&name).query_async(&mut reader).await.unwrap();
        reader
    };
    let ((status, body), _reader) = tokio::join!(removal, other_router);
    assert_eq!(status, axum::http::StatusCode::OK, "{body}");
    assert_eq!((body["drained"].as_bool(), body["discarded_queue"].as_bool()), (Some(true), Some(false)), "{body}");
    assert!(body["discarded_groups"].is_null(), "{body}");
    let info: redis::streams::StreamInfoGroupsReply = conn.xinfo_groups(&stream).await.unwrap();
    assert!(info.groups.iter().any(|g| g.name == "switchyard.misbehave"), "router b's group is kept");
}

#[tokio::test]
async fn a_redis_outage_mid_stream_reports_not_ready_and_loses_nothing() {
    let stream = unique("stream");
    let _keys = Keys(vec![stream.clone()]);
    let proxy = switchyard_tests::Proxy::start("127.0.0.1:6379").await;
    let text = proxy.through(&on_stream(&stream, "claim_idle_ms = 500\n"))
        + &plugin_table(
            "misbehave",
            "misbehave.wasm",
            "publishes = [\"chaos.published\"]\nconcurrency = 4\nordering_key = [\"bucket\"]\n",
        );
    let t = TestRouter::start(&text).await;
    connected(&t).await;
    let tally = || t.tally("misbehave");
    let events = 3000;
    let mut conn = redis().await;
    let mut pipe = redis::pipe();
    for i in 0..events {
        let body = json!({ "pattern": "chaos.tally", "data": { "bucket": format!("b{}", i % 8) } }).to_string();
        pipe.xadd(&stream, "*", &[("event", body), ("id", format!("e-{i}"))]).ignore();
    }
    let () = pipe.query_async(&mut conn).await.unwrap();
    eventually("the stream to be under way", SETTLE, || (tally() >= 300).then_some(())).await;

    proxy.down();
    eventually("the router to report the outage", SETTLE, || (!t.router.is_connected()).then_some(())).await;
    let (status, body) = t.admin("GET", "/v1/ready", "application/json", "").await;
    assert_eq!(status, axum::http::StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let message = error_message(&body);
    assert!(message.starts_with(&format!("not connected: redis (stream {stream} (group ")), "{body}");

    proxy.up();
    connected(&t).await;
    eventually("every entry after the outage", SETTLE, || (tally() >= events).then_some(())).await;
    let mut acked = false;
    for _ in 0..200 {
        let info: redis::streams::StreamInfoGroupsReply = conn.xinfo_groups(&stream).await.unwrap();
        if info.groups.iter().all(|g| g.pending == 0 && g.lag == Some(0)) {
            acked = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(acked, "every entry acknowledged after the outage");
    assert_eq!(tally(), events, "every entry applied once across the outage");
    assert!(stream_restarts(&metrics_text(&t).await, &stream) >= 1, "the outage restarted the stream consumer");
}

#[tokio::test]
async fn a_stream_consumer_that_cannot_start_says_why_in_the_readiness_answer_until_it_starts() {
    let stream = unique("wrongtype");
    let _keys = Keys(vec![stream.clone()]);
    let mut conn = redis().await;
    // A key of another type under the stream's name: the consumer group cannot be created.
    let () = conn.set(&stream, "not a stream").await.unwrap();
    let text =
        on_stream(&stream, "") + &plugin_table("misbehave", "misbehave.wasm", "publishes = [\"chaos.published\"]\n");
    let t = TestRouter::start(&text).await;
    let not_ready = not_ready_reason(&t, "redis").await;
    let expected = format!("not connected: redis (stream {stream} (group switchyard.misbehave): \"WRONGTYPE\"");
    assert!(not_ready.starts_with(&expected), "names the stream, the group and Redis's reason: {not_ready}");
    let (status, body) = t.admin("GET", "/v1/ready", "application/json", "").await;
    assert_eq!(status, axum::http::StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["sources"].as_array().map(Vec::len), Some(1), "the router's one source: {body}");
    let redis_source = &body["sources"][0];
    assert_eq!((&redis_source["name"], &redis_source["ready"]), (&json!("redis"), &json!(false)), "{body}");
    let reasons = redis_source["reasons"].as_array().cloned().unwrap_or_default();
    assert_eq!(reasons.len(), 1, "the one stream consumer that cannot start: {body}");
    let reason = reasons[0].as_str().unwrap_or_default();
    assert!(reason.starts_with(&format!("stream {stream} (group switchyard.misbehave)")), "{body}");

    let () = conn.del(&stream).await.unwrap();
    connected(&t).await;
    let (status, body) = t.admin("GET", "/v1/ready", "application/json", "").await;
    assert_eq!(status, axum::http::StatusCode::OK, "{body}");
    add_ok(&mut conn, &stream, "after").await;
    eventually("an entry once the stream exists", SETTLE, || t.doc("misbehave", "seen", "after")).await;
}

#[tokio::test]
async fn an_idle_stream_consumer_keeps_its_connection() {
    let stream = unique("idle");
    let _keys = Keys(vec![stream.clone()]);
    let text =
        on_stream(&stream, "") + &plugin_table("misbehave", "misbehave.wasm", "publishes = [\"chaos.published\"]\n");
    let t = TestRouter::start(&text).await;
    connected(&t).await;
    let mut conn = redis().await;
    add_ok(&mut conn, &stream, "before").await;
    eventually("the first entry", SETTLE, || t.doc("misbehave", "seen", "before")).await;
    // Three blocking reads' worth of an empty stream: each read waits BLOCK_MS (1 s) and ends
    // empty, which is no reason to reconnect.
    tokio::time::sleep(Duration::from_millis(3_200)).await;
    assert_eq!(stream_restarts(&metrics_text(&t).await, &stream), 0, "idle reads restarted the consumer");
    add_ok(&mut conn, &stream, "after").await;
    eventually("an entry after the idle time", SETTLE, || t.doc("misbehave", "seen", "after")).await;
    assert_eq!(stream_restarts(&metrics_text(&t).await, &stream), 0);
}
