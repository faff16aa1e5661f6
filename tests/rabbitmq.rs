//! Against the real RabbitMQ on loopback, with real plugin components: NestJS producers on an
//! ingress queue, every envelope on the topic exchange, dead letters, deduplication, the
//! outbox with confirms, and misbehaving plugins next to a well-behaved one.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use serde_json::json;
use switchyard::commit::{Effects, OutboxRow, Writer};
use switchyard::config::StoreConfig;
use switchyard::router;
use switchyard_tests::{
    Rabbit, SETTLE, TestRouter, amqp_url, config, connected, error_message, eventually, not_ready_reason, settle,
    stop_and_assert_acked,
};

/// A message for `publish_many`: event name, id and body.
fn message(name: &str, id: &str, body: Vec<u8>) -> (String, Vec<u8>, BasicProperties) {
    (name.to_string(), body, BasicProperties::default().with_message_id(id.into()))
}

fn user(id: &str, name: &str) -> serde_json::Value {
    json!({ "user_id": id, "name": name, "email": format!("{name}@mail.com"), "role": "user", "picture": "p.png" })
}

#[tokio::test]
async fn nestjs_events_on_an_ingress_queue_end_in_the_replica() {
    let rabbit = Rabbit::new().await;
    let t = TestRouter::start(&config(&rabbit, true, &[("user-replica", "user_replica.wasm", "")])).await;
    connected(&t).await;
    rabbit.emit_nestjs("auth.tokenGenerated", json!({ "user": user("u1", "juan"), "token": "tok-1" })).await;
    rabbit.emit_nestjs("auth.tokenGenerated", json!({ "user": user("u2", "ana"), "token": "tok-2" })).await;
    rabbit
        .emit_nestjs(
            "user.updated",
            json!({ "user": { "user_id": "u1", "name": "Juan Pérez", "email": "jp@mail.com" } }),
        )
        .await;
    rabbit.emit_nestjs("user.deleted", json!({ "user_id": "u2" })).await;

    let u1 = eventually("u1 to be updated", SETTLE, || {
        t.doc("user-replica", "user_refs", "u1").filter(|d| d["name"] == "Juan Pérez")
    })
    .await;
    assert_eq!(u1["email"], "jp@mail.com");
    assert_eq!(u1["token"], "tok-1", "an update without a token keeps the stored one");
    eventually("u2 to be deleted", SETTLE, || t.doc("user-replica", "user_refs", "u2").is_none().then_some(())).await;
    let queues = [rabbit.ingress.clone(), format!("{}user-replica", rabbit.prefix)];
    settle(&t, &queues).await;
    assert!(t.dead_letters("user-replica").is_empty());
    stop_and_assert_acked(t, &queues).await;
}

#[tokio::test]
async fn every_envelope_on_the_exchange_ends_in_the_replica() {
    let rabbit = Rabbit::new().await;
    let t = TestRouter::start(&config(&rabbit, false, &[("user-replica", "user_replica.wasm", "")])).await;
    connected(&t).await;
    // Raw JSON, named by the routing key.
    let raw = json!({ "user": user("raw", "raw"), "token": "t" }).to_string();
    rabbit.publish_event("auth.tokenGenerated", raw.as_bytes(), BasicProperties::default()).await;
    // CloudEvents, structured mode.
    let structured = json!({
        "specversion": "1.0", "id": "ce-1", "type": "user.updated", "source": "/users",
        "time": "2026-01-01T00:00:00Z", "data": { "user": user("structured", "ce") }
    })
    .to_string();
    let props = BasicProperties::default().with_content_type("application/cloudevents+json".into());
    rabbit.publish_event("user.updated", structured.as_bytes(), props).await;
    // CloudEvents, binary mode with the Python SDK's header convention.
    let mut headers = FieldTable::default();
    for (k, v) in [
        ("cloudEvents_specversion", "1.0"),
        ("cloudEvents_id", "bin-1"),
        ("cloudEvents_type", "user.updated"),
        ("cloudEvents_source", "/py"),
    ] {
        headers.insert(ShortString::from(k), AMQPValue::LongString(v.into()));
    }
    headers.insert(ShortString::from("cloudEvents_time"), AMQPValue::LongLongInt(1_767_225_600_000));
    let binary = json!({ "user": user("binary", "bin") }).to_string();
    rabbit.publish_event("user.updated", binary.as_bytes(), BasicProperties::default().with_headers(headers)).await;

    for (key, name) in [("raw", "raw"), ("structured", "ce"), ("binary", "bin")] {
        let doc = eventually(key, SETTLE, || t.doc("user-replica", "user_refs", key)).await;
        assert_eq!(doc["name"], name);
    }
    let stored = t.router.readers.get("user-replica", "user_refs", "structured").unwrap().unwrap();
    assert_eq!(stored.version, Some(1_767_225_600_000), "the CloudEvents time is the version");
}

#[tokio::test]
async fn undecodable_and_rejected_messages_are_dead_lettered_with_the_reason() {
    let rabbit = Rabbit::new().await;
    let t = TestRouter::start(&config(&rabbit, true, &[("user-replica", "user_replica.wasm", "")])).await;
    connected(&t).await;
    rabbit.publish_event("user.updated", b"{not json", BasicProperties::default()).await;
    rabbit.publish_event("user.updated", br#"{"user": {"name": "no id"}}"#, BasicProperties::default()).await;
    rabbit.publish("", &rabbit.ingress.clone(), b"\xff\xfe", BasicProperties::default()).await;
    rabbit.publish("", &rabbit.ingress.clone(), br#"{"user_id":"nameless"}"#, BasicProperties::default()).await;
    let letters = eventually("two dead letters", SETTLE, || {
        let l = t.dead_letters("user-replica");
        (l.len() == 2).then_some(l)
    })
    .await;
    assert!(letters.iter().any(|(_, r)| r.starts_with("body is not JSON")), "{letters:?}");
    assert!(letters.iter().any(|(n, r)| n == "user.updated" && r.contains("handler rejected")), "{letters:?}");
    let ingress = eventually("the ingress dead letters", SETTLE, || {
        let l = t.router.readers.dead_letters(&format!("ingress:{}", rabbit.ingress), 0, 10).unwrap();
        (l.len() == 2).then_some(l)
    })
    .await;
    assert_eq!(ingress[0].reason, "body is not valid UTF-8 at byte 0");
    assert_eq!(ingress[1].reason, "raw JSON on an ingress queue needs an `x-event-name` header naming the event");
    let queues = [rabbit.ingress.clone(), format!("{}user-replica", rabbit.prefix)];
    settle(&t, &queues).await;
    stop_and_assert_acked(t, &queues).await;
}

#[tokio::test]
async fn one_event_id_delivered_three_times_applies_once_and_publishes_once() {
    let rabbit = Rabbit::new().await;
    let tap = rabbit.tap("chaos.published").await;
    let t = TestRouter::start(&config(
        &rabbit,
        false,
        &[("misbehave", "misbehave.wasm", "publishes = [\"chaos.published\"]\n")],
    ))
    .await;
    connected(&t).await;
    let props = || BasicProperties::default().with_message_id("dup-1".into()).with_correlation_id("corr-9".into());
    for _ in 0..3 {
        rabbit.publish_event("chaos.publish", br#"{"n":1}"#, props()).await;
    }
    let queue = format!("{}misbehave", rabbit.prefix);
    let message = rabbit.next_message(&tap, SETTLE).await;
    settle(&t, std::slice::from_ref(&queue)).await;
    assert!(rabbit.get(&tap).await.is_none(), "the handler's effects must apply once");

    let body: serde_json::Value = serde_json::from_slice(&message.delivery.data).unwrap();
    assert_eq!(body, json!({ "pattern": "chaos.published", "data": { "from": "dup-1" } }), "NestJS envelope");
    let p = &message.delivery.properties;
    assert!(p.message_id().as_ref().is_some_and(|id| !id.as_str().is_empty() && id.as_str() != "dup-1"), "a fresh id");
    assert_eq!(p.correlation_id().as_ref().map(|c| c.as_str()), Some("corr-9"));
    let headers = p.headers().as_ref().unwrap().inner();
    let text = |k: &str| match headers.get(k) {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        other => panic!("header {k}: {other:?}"),
    };
    assert_eq!(text("x-causation-id"), "dup-1");
    assert_eq!(text("x-source"), "misbehave");
    assert!(matches!(headers.get("x-occurred-at"), Some(AMQPValue::LongLongInt(ms)) if *ms > 1_700_000_000_000));
    stop_and_assert_acked(t, &[queue]).await;
}

#[tokio::test]
async fn a_handler_that_calls_no_capability_commits_nothing_and_its_messages_are_acked() {
    let rabbit = Rabbit::new().await;
    let t = TestRouter::start(&config(&rabbit, false, &[("noop", "noop.wasm", "")])).await;
    connected(&t).await;
    let props = |id: &str| BasicProperties::default().with_message_id(id.into());
    for id in ["pure-1", "pure-2", "pure-1"] {
        rabbit.publish_event("bench.event", br#"{"n":1}"#, props(id)).await;
    }
    let queue = format!("{}noop", rabbit.prefix);
    let counters = || t.router.plugins.get("noop").expect("noop runs").slot().counters.snapshot();
    eventually("three invocations", SETTLE, || (counters().succeeded == 3).then_some(())).await;
    // Nothing to commit, so no processed-marker: the copy of pure-1 ran again, to the same
    // (empty) effect, and was not counted as a duplicate.
    assert_eq!(counters().duplicates, 0);
    for id in ["pure-1", "pure-2"] {
        assert!(!t.router.readers.processed("noop", id).unwrap(), "{id} left a marker");
    }
    stop_and_assert_acked(t, &[queue]).await;
}

#[tokio::test]
async fn outbox_rows_committed_before_a_restart_are_published_after_it() {
    let rabbit = Rabbit::new().await;
    let tap = rabbit.tap("order.#").await;
    let dir = tempfile::tempdir().unwrap();
    {
        let writer = Writer::start(dir.path(), &StoreConfig::default()).unwrap();
        let row = OutboxRow {
            id: "outbox-1".into(),
            name: "order.confirmed".into(),
            source: "order-saga".into(),
            key: Some("o1".into()),
            correlation_id: Some("c1".into()),
            causation_id: Some("e0".into()),
            headers: "[]".into(),
            payload: br#"{"orderId":"o1"}"#.to_vec(),
            delay_ms: 0,
        };
        let effects = Effects { outbox: vec![row], ..Default::default() };
        writer.commit("order-saga".into(), "e0".into(), effects).await.unwrap();
    }
    let t = TestRouter::start_in(&config(&rabbit, false, &[]), dir).await;
    let message = rabbit.next_message(&tap, SETTLE).await;
    assert_eq!(message.delivery.routing_key.as_str(), "order.confirmed");
    assert_eq!(message.delivery.properties.message_id().as_ref().map(|s| s.as_str()), Some("outbox-1"));
    eventually("the row to be deleted after the confirm", SETTLE, || {
        (t.router.readers.outbox_backlog().unwrap() == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn misbehaving_plugins_fail_only_their_invocation() {
    let rabbit = Rabbit::new().await;
    let limits =
        "concurrency = 1\n[plugin.limits]\nmemory_mb = 32\ntimeout_ms = 300\n[plugin.retry]\nmax_attempts = 1\n";
    let t = TestRouter::start(&config(
        &rabbit,
        false,
        &[("misbehave", "misbehave.wasm", limits), ("user-replica", "user_replica.wasm", "")],
    ))
    .await;
    connected(&t).await;
    for name in ["chaos.trap", "chaos.loop", "chaos.sleep", "chaos.hog"] {
        let props = BasicProperties::default().with_message_id(name.into());
        rabbit.publish_event(name, b"{}", props).await;
        rabbit
            .publish_event(
                "auth.tokenGenerated",
                json!({ "user": user(name, name), "token": "t" }).to_string().as_bytes(),
                BasicProperties::default(),
            )
            .await;
    }
    rabbit.publish_event("chaos.ok", b"{}", BasicProperties::default().with_message_id("after".into())).await;

    eventually("the plugin to keep working after a trap, two timeouts and an OOM", SETTLE, || {
        t.doc("misbehave", "seen", "after")
    })
    .await;
    for name in ["chaos.trap", "chaos.loop", "chaos.sleep", "chaos.hog"] {
        eventually(name, SETTLE, || t.doc("user-replica", "user_refs", name)).await;
    }
    let letters = t.dead_letters("misbehave");
    let reason = |name: &str| letters.iter().find(|(n, _)| n == name).map(|(_, r)| r.clone()).unwrap_or_default();
    assert!(
        reason("chaos.trap").starts_with("plugin trapped: wasm trap: wasm `unreachable` instruction executed ("),
        "{letters:?}"
    );
    assert!(
        reason("chaos.trap").contains("panicked at") && reason("chaos.trap").ends_with("asked to trap)"),
        "{letters:?}"
    );
    assert!(reason("chaos.loop").starts_with("timed out after 300ms"), "{letters:?}");
    assert!(reason("chaos.sleep").starts_with("timed out after 300ms"), "a plugin blocked in a host call: {letters:?}");
    assert!(reason("chaos.hog").starts_with("plugin trapped: forcing trap when growing memory"), "{letters:?}");
    assert!(t.dead_letters("user-replica").is_empty());
}

#[tokio::test]
async fn an_ingress_message_redelivered_after_a_crash_keeps_its_journaled_id() {
    use switchyard::commit::{JournalEntry, JournalOp};
    use switchyard::envelope::content_id;
    use switchyard::event::Millis;

    let rabbit = Rabbit::new().await;
    let dir = tempfile::tempdir().unwrap();
    let body = json!({ "pattern": "chaos.publish", "data": { "n": 1 } }).to_string();
    // A router journaled an id for this message and died before acking it.
    {
        let writer = Writer::start(dir.path(), &StoreConfig::default()).unwrap();
        let entry = JournalEntry {
            id: "journaled-id".into(),
            queue: rabbit.ingress.clone(),
            digest: content_id("chaos.publish", body.as_bytes()).0,
            received_at: Millis::now(),
        };
        writer.journal(JournalOp::Insert(vec![entry])).await.unwrap().unwrap();
    }
    // The broker still holds the message, and hands it out again flagged as redelivered.
    rabbit
        .channel
        .queue_declare(
            rabbit.ingress.as_str().into(),
            lapin::options::QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    rabbit.emit_nestjs("chaos.publish", json!({ "n": 1 })).await;
    let taken = rabbit.channel.basic_get(rabbit.ingress.as_str().into(), Default::default()).await.unwrap().unwrap();
    taken.delivery.acker.nack(lapin::options::BasicNackOptions { requeue: true, ..Default::default() }).await.unwrap();

    let t = TestRouter::start_in(
        &config(&rabbit, true, &[("misbehave", "misbehave.wasm", "publishes = [\"chaos.published\"]\n")]),
        dir,
    )
    .await;
    let seen =
        eventually("the event under its journaled id", SETTLE, || t.doc("misbehave", "seen", "journaled-id")).await;
    assert_eq!(seen["name"], "chaos.publish");
    settle(&t, &[rabbit.ingress.clone(), format!("{}misbehave", rabbit.prefix)]).await;
    let handled = t.router.readers.scan("misbehave", "seen", "", 100).unwrap();
    let publishes: Vec<_> = handled.iter().filter(|r| r.body.contains("\"chaos.publish\"")).collect();
    assert_eq!(publishes.len(), 1, "one event, under the journaled id: {handled:?}");
}

#[tokio::test]
async fn a_fresh_ingress_message_gets_an_assigned_id_and_its_journal_row_is_pruned() {
    let rabbit = Rabbit::new().await;
    let t = TestRouter::start(&config(
        &rabbit,
        true,
        &[("misbehave", "misbehave.wasm", ""), ("user-replica", "user_replica.wasm", "")],
    ))
    .await;
    connected(&t).await;
    rabbit.emit_nestjs("chaos.ok", json!({})).await;
    let ids = eventually("the event", SETTLE, || {
        let rows = t.router.readers.scan("misbehave", "seen", "", 10).unwrap();
        (!rows.is_empty()).then_some(rows)
    })
    .await;
    assert_eq!(ids.len(), 1);
    assert!(uuid::Uuid::parse_str(&ids[0].key).is_ok(), "an assigned UUID, not a digest: {}", ids[0].key);
    let digest = switchyard::envelope::content_id("chaos.ok", b"{}").0;
    eventually("the journal row to be pruned after the ack", SETTLE, || {
        t.router.readers.journal(&rabbit.ingress, &digest).unwrap().is_empty().then_some(())
    })
    .await;
}

#[tokio::test]
async fn the_source_reconnects_after_the_connection_drops_and_loses_nothing() {
    let rabbit = Rabbit::new().await;
    let proxy = switchyard_tests::Proxy::start("127.0.0.1:5672").await;
    let text = proxy.through(&config(&rabbit, false, &[("user-replica", "user_replica.wasm", "")]));
    let t = TestRouter::start(&text).await;
    connected(&t).await;
    let token = |id: &str| json!({ "user": user(id, id), "token": "t" }).to_string();
    rabbit.publish_event("auth.tokenGenerated", token("before").as_bytes(), BasicProperties::default()).await;
    eventually("the event before the outage", SETTLE, || t.doc("user-replica", "user_refs", "before")).await;

    proxy.cut();
    eventually("the router to notice the outage", SETTLE, || (!t.router.is_connected()).then_some(())).await;
    // Published while the router is disconnected: the durable queue keeps it.
    rabbit.publish_event("auth.tokenGenerated", token("during").as_bytes(), BasicProperties::default()).await;
    connected(&t).await;
    rabbit.publish_event("auth.tokenGenerated", token("after").as_bytes(), BasicProperties::default()).await;
    for id in ["during", "after"] {
        eventually(id, SETTLE, || t.doc("user-replica", "user_refs", id)).await;
    }
}

#[tokio::test]
async fn events_with_one_key_are_handled_in_order_while_keys_run_in_parallel() {
    let rabbit = Rabbit::new().await;
    let plugin = ("misbehave", "misbehave.wasm", "concurrency = 8\nordering_key = [\"key\"]\n");
    let t = TestRouter::start(&config(&rabbit, false, &[plugin])).await;
    connected(&t).await;
    let keys = ["k1", "k2", "k3"];
    let per_key = 200;
    let messages = (1..=per_key).flat_map(|seq| {
        keys.iter().map(move |key| {
            let body = json!({ "key": key, "seq": seq }).to_string().into_bytes();
            let props = BasicProperties::default().with_message_id(format!("{key}-{seq}").as_str().into());
            ("chaos.seq".to_string(), body, props)
        })
    });
    rabbit.publish_many(messages).await;
    for key in keys {
        eventually(key, SETTLE, || t.doc("misbehave", "seq", key).filter(|d| d["seq"] == per_key)).await;
    }
    assert!(
        t.dead_letters("misbehave").is_empty(),
        "an event was handled out of order: {:?}",
        t.dead_letters("misbehave")
    );
}

/// Acks go back in batches that never pass a message still being handled; acks kept waiting
/// behind one slow event must still go out, or the prefetch window (64 here) stays shut until
/// it ends. No fast event waits for the slow one: they have keys (ids) of their own, and the
/// other lanes take them.
#[tokio::test]
async fn a_slow_event_does_not_keep_the_prefetch_window_shut() {
    let rabbit = Rabbit::new().await;
    let plugin = ("misbehave", "misbehave.wasm", "concurrency = 8\n[plugin.limits]\ntimeout_ms = 30000\n");
    let t = TestRouter::start(&config(&rabbit, false, &[plugin])).await;
    connected(&t).await;
    let slow = json!({ "ms": 6000 }).to_string().into_bytes();
    let mut messages = vec![message("chaos.sleep", "slow", slow)];
    messages.extend((0..200).map(|i| message("chaos.ok", &format!("fast-{i}"), b"{}".to_vec())));
    rabbit.publish_many(messages).await;
    let seen = || (0..200).filter(|i| t.doc("misbehave", "seen", &format!("fast-{i}")).is_some()).count();
    eventually("every fast event, past the slow one", SETTLE, || (seen() == 200).then_some(())).await;
    assert!(
        t.doc("misbehave", "seen", "slow").is_none(),
        "the fast events must get through while the slow one runs, not after it"
    );
    eventually("the slow event", SETTLE, || t.doc("misbehave", "seen", "slow")).await;
    let queues = [format!("{}misbehave", rabbit.prefix)];
    settle(&t, &queues).await;
    stop_and_assert_acked(t, &queues).await;
}

/// One lane: the first event's commit is still pending when the second fails and is parked.
/// Acking the parked one waits for the first's ack, which only the same lane can settle, so
/// the lane must not wait for it.
#[tokio::test]
async fn a_lane_parks_an_event_while_an_earlier_commit_is_pending_and_goes_on() {
    let rabbit = Rabbit::new().await;
    let extra = "concurrency = 1\n[plugin.retry]\nmax_attempts = 2\ninitial_backoff_ms = 50\n";
    let t = TestRouter::start(&config(&rabbit, false, &[("misbehave", "misbehave.wasm", extra)])).await;
    connected(&t).await;
    let empty = |name: &str, id: &str| message(name, id, b"{}".to_vec());
    rabbit
        .publish_many([empty("chaos.ok", "first"), empty("chaos.retry", "failing"), empty("chaos.ok", "after")])
        .await;
    eventually("the event after the parked one", SETTLE, || t.doc("misbehave", "seen", "after")).await;
    eventually("the failing event, dead-lettered after its retry", SETTLE, || {
        t.dead_letters("misbehave").into_iter().find(|(name, _)| name == "chaos.retry")
    })
    .await;
    assert!(t.doc("misbehave", "seen", "first").is_some());
    let queues = [format!("{}misbehave", rabbit.prefix)];
    settle(&t, &queues).await;
    stop_and_assert_acked(t, &queues).await;
}

#[tokio::test]
async fn a_retrying_event_holds_back_only_its_own_key_and_runs_again_with_the_next_attempt() {
    let rabbit = Rabbit::new().await;
    // One lane: a retry that waited in the lane would hold back every other key.
    let settings = "concurrency = 1\nordering_key = [\"key\"]\n[plugin.retry]\nmax_attempts = 4\ninitial_backoff_ms = 1000\nmultiplier = 1.0\njitter = 0.0\n";
    let t = TestRouter::start(&config(&rabbit, false, &[("misbehave", "misbehave.wasm", settings)])).await;
    connected(&t).await;
    let event = |key: &str, seq: u32, fail_attempts: u32| {
        let body = json!({ "key": key, "seq": seq, "fail_attempts": fail_attempts }).to_string().into_bytes();
        let props = BasicProperties::default().with_message_id(format!("{key}-{seq}").as_str().into());
        ("chaos.seq".to_string(), body, props)
    };
    // slow-1 fails twice, then succeeds on its third attempt; everything else succeeds at once.
    let mut messages = vec![event("slow", 1, 2)];
    for seq in 2..=20 {
        messages.push(event("slow", seq, 0));
    }
    for seq in 1..=20 {
        messages.push(event("fast", seq, 0));
    }
    rabbit.publish_many(messages).await;
    let parked_slow = || {
        let keys = t.router.readers.parked_keys("misbehave").unwrap();
        keys.iter().find(|(k, _)| k == "slow").map(|(_, n)| *n)
    };
    let behind = eventually("the other key to finish while slow-1 waits for its retry", SETTLE, || {
        let fast_done = t.doc("misbehave", "seq", "fast").is_some_and(|d| d["seq"] == 20);
        parked_slow().filter(|_| fast_done)
    })
    .await;
    assert!(behind >= 1, "slow-1 is parked, with the later slow events behind it");
    assert!(t.doc("misbehave", "seq", "slow").is_none(), "no later event of its key overtook it");
    eventually("the slow key, in order, after the retries", SETTLE, || {
        t.doc("misbehave", "seq", "slow").filter(|d| d["seq"] == 20)
    })
    .await;
    assert!(
        t.dead_letters("misbehave").is_empty(),
        "out of order or out of attempts: {:?}",
        t.dead_letters("misbehave")
    );
    eventually("nothing parked and every message acknowledged", SETTLE, || {
        (parked_slow().is_none() && t.router.is_idle()).then_some(())
    })
    .await;
    let counters = t.router.plugins.get("misbehave").unwrap().slot().counters.snapshot();
    assert_eq!((counters.succeeded, counters.retried), (40, 2), "slow-1 ran three times, every other event once");
}

#[tokio::test]
async fn a_broker_outage_mid_stream_reports_not_ready_holds_the_outbox_and_loses_nothing() {
    let rabbit = Rabbit::new().await;
    let tap = rabbit.tap("chaos.published").await;
    let proxy = switchyard_tests::Proxy::start("127.0.0.1:5672").await;
    let plugin = (
        "misbehave",
        "misbehave.wasm",
        "publishes = [\"chaos.published\"]\nconcurrency = 4\nordering_key = [\"bucket\"]\n",
    );
    let text = proxy.through(&config(&rabbit, false, &[plugin]));
    let t = TestRouter::start(&text).await;
    connected(&t).await;
    let tally = || t.tally("misbehave");
    let events = 3000;
    let messages = (0..events).map(|i| {
        let props = BasicProperties::default().with_message_id(format!("e-{i}").as_str().into());
        ("chaos.tally".to_string(), json!({ "bucket": format!("b{}", i % 8) }).to_string().into_bytes(), props)
    });
    rabbit.publish_many(messages).await;
    eventually("the stream to be under way", SETTLE, || (tally() >= 300).then_some(())).await;

    proxy.down();
    eventually("the router to report the outage", SETTLE, || (!t.router.is_connected()).then_some(())).await;
    let (status, body) = t.admin("GET", "/v1/ready", "application/json", "").await;
    assert_eq!(status, axum::http::StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let message = error_message(&body);
    assert!(message.starts_with("not connected: rabbitmq ("), "{body}");
    assert_ne!(message, "not connected: rabbitmq (connecting)", "the outage's reason, not the first connection's");
    // Handled during the outage (through the HTTP source): its published event waits in the outbox.
    let cause = json!({ "pattern": "chaos.publish", "data": {}, "id": "during-outage" }).to_string();
    let (status, body) = t.admin("POST", "/v1/events", "application/json", cause).await;
    assert_eq!(status, axum::http::StatusCode::OK, "{body}");
    assert!(t.router.readers.outbox_backlog().unwrap() >= 1, "the outbox holds what cannot be published");
    assert_eq!(router::queue_depth(&amqp_url(), &tap).await, Some(0));

    proxy.up();
    connected(&t).await;
    eventually("every event after the outage", SETTLE, || (tally() >= events).then_some(())).await;
    settle(&t, &[format!("{}misbehave", rabbit.prefix)]).await;
    assert_eq!(tally(), events, "every event applied once across the outage");
    assert_eq!(t.router.readers.outbox_backlog().unwrap(), 0, "the outbox flushed after the outage");
    let published = rabbit.next_message(&tap, SETTLE).await;
    let body: serde_json::Value = serde_json::from_slice(&published.delivery.data).unwrap();
    assert_eq!(body["data"]["from"], "during-outage");
}

#[tokio::test]
async fn a_batch_the_broker_never_confirms_is_sent_again_on_a_new_connection() {
    let rabbit = Rabbit::new().await;
    let tap = rabbit.tap("chaos.published").await;
    let proxy = switchyard_tests::Proxy::start("127.0.0.1:5672").await;
    let plugin = ("misbehave", "misbehave.wasm", "publishes = [\"chaos.published\"]\n");
    let text = proxy.through(&config(&rabbit, false, &[plugin])).replacen(
        "[router]\n",
        "[router]\npublish_timeout_ms = 500\n",
        1,
    );
    let t = TestRouter::start(&text).await;
    connected(&t).await;
    // Handled through the HTTP source, so only the relay's publishing needs the link.
    let cause = async |from: &str| {
        let cause = json!({ "pattern": "chaos.publish", "data": {}, "id": from }).to_string();
        let (status, body) = t.admin("POST", "/v1/events", "application/json", cause).await;
        assert_eq!(status, axum::http::StatusCode::OK, "{body}");
    };
    let published_from = async || {
        let message = rabbit.next_message(&tap, SETTLE).await;
        let body: serde_json::Value = serde_json::from_slice(&message.delivery.data).unwrap();
        body["data"]["from"].clone()
    };
    let outbox_empty = async || {
        eventually("the outbox to empty", SETTLE, || (t.router.readers.outbox_backlog().ok() == Some(0)).then_some(()))
            .await
    };
    cause("before").await;
    assert_eq!(published_from().await, "before", "the relay's connection is open and confirming");
    // Its confirm too has reached the relay: a freeze now cannot catch it on the way (the
    // relay would then send it again, rightly, with the same message id).
    outbox_empty().await;

    // The relay's publish goes out on a link that carries nothing: no confirm ever comes.
    proxy.freeze();
    cause("frozen").await;
    assert_eq!(published_from().await, "frozen", "re-sent on a new connection after publish_timeout_ms");
    outbox_empty().await;
    drop(t.stop().await);
}

/// `router.toml` for the test's broker with `queue_type = "quorum"`.
fn quorum_config(rabbit: &Rabbit, ingress: bool, plugins: &[(&str, &str, &str)]) -> String {
    config(rabbit, ingress, plugins).replacen("[rabbitmq]\n", "[rabbitmq]\nqueue_type = \"quorum\"\n", 1)
}

/// Declare a durable queue with `arguments` on a connection of its own (a refusal closes the
/// channel), as another client of the broker would.
async fn declare_durable(queue: &str, arguments: FieldTable) -> Result<(), lapin::Error> {
    let conn = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    let declared = channel
        .queue_declare(queue.into(), lapin::options::QueueDeclareOptions::durable(), arguments)
        .await
        .map(|_| ());
    let _ = conn.close(200, "declared".into()).await;
    declared
}

async fn delete_queue(queue: &str) {
    let conn = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default()).await.unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel.queue_delete(queue.into(), lapin::options::QueueDeleteOptions::default()).await.expect("deleting");
    let _ = conn.close(200, "deleted".into()).await;
}

fn quorum() -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    arguments
}

#[tokio::test]
async fn plugin_queues_are_quorum_queues_when_asked_for_and_carry_events_as_classic_ones_do() {
    let rabbit = Rabbit::new().await;
    let t = TestRouter::start(&quorum_config(&rabbit, false, &[("user-replica", "user_replica.wasm", "")])).await;
    connected(&t).await;
    let queue = format!("{}user-replica", rabbit.prefix);
    let refused = declare_durable(&queue, FieldTable::default()).await.expect_err("a quorum queue is no classic one");
    assert!(refused.to_string().contains("inequivalent arg 'x-queue-type'"), "{refused}");
    declare_durable(&queue, quorum()).await.expect("the router declared a quorum queue");

    let login = json!({ "user": user("q1", "quinn"), "token": "tok-q" }).to_string();
    rabbit.publish_event("auth.tokenGenerated", login.as_bytes(), BasicProperties::default()).await;
    let stored = eventually("the replica row", SETTLE, || t.doc("user-replica", "user_refs", "q1")).await;
    assert_eq!(stored["token"], "tok-q");
    settle(&t, std::slice::from_ref(&queue)).await;
    stop_and_assert_acked(t, &[queue]).await;
}

#[tokio::test]
async fn a_plugin_queue_of_another_type_is_refused_with_the_reason_and_its_events_stay() {
    let rabbit = Rabbit::new().await;
    let t = TestRouter::start(&quorum_config(&rabbit, false, &[("user-replica", "user_replica.wasm", "")])).await;
    connected(&t).await;
    let queue = classic_stamp_queue_with_an_event(&rabbit).await;

    let component = std::fs::read(switchyard_tests::plugin("stamp_v1.wasm")).unwrap();
    let (status, body) = t.admin("PUT", "/v1/plugins/stamp", "application/wasm", component).await;
    assert_eq!(status, axum::http::StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let reason = body.to_string();
    assert!(reason.contains(&format!("queue {queue} exists with other arguments")), "{reason}");
    assert!(reason.contains("rabbitmq.queue_type = \\\"quorum\\\""), "{reason}");
    assert!(reason.contains("inequivalent arg 'x-queue-type'"), "the broker's reason: {reason}");
    let (status, _) = t.admin("GET", "/v1/plugins/stamp", "application/json", "").await;
    assert_eq!(status, axum::http::StatusCode::NOT_FOUND, "a plugin whose queue was refused is not added");
    assert_eq!(router::queue_depth(&amqp_url(), &queue).await, Some(1), "the waiting event stays in its queue");
    assert!(t.router.is_connected(), "the other plugins' consumers go on");
    drop(t.stop().await);
}

/// `stamp`'s queue as a router that declared classic queues left it, with an event in it;
/// returns its name.
async fn classic_stamp_queue_with_an_event(rabbit: &Rabbit) -> String {
    rabbit.track_plugin("stamp");
    let queue = format!("{}stamp", rabbit.prefix);
    declare_durable(&queue, FieldTable::default()).await.expect("a classic queue");
    rabbit.publish("", &queue, br#"{"pattern": "stamp.it", "data": {}}"#, BasicProperties::default()).await;
    queue
}

/// A router declaring quorum queues, with `stamp`'s classic queue left from an earlier one
/// (above) and `user-replica` consuming beside it. Returns once `/v1/ready` says why `stamp`
/// does not consume, with the queue's name.
async fn router_with_a_refused_queue(rabbit: &Rabbit) -> (TestRouter, String) {
    let queue = classic_stamp_queue_with_an_event(rabbit).await;
    let plugins = [("user-replica", "user_replica.wasm", ""), ("stamp", "stamp_v1.wasm", "")];
    let t = TestRouter::start(&quorum_config(rabbit, true, &plugins)).await;
    let not_ready = not_ready_reason(&t, "rabbitmq").await;
    let expected = format!("not connected: rabbitmq (plugin stamp: queue {queue} exists with other arguments");
    assert!(not_ready.starts_with(&expected), "names the source, the plugin and the queue: {not_ready}");
    assert!(not_ready.contains("rabbitmq.queue_type = \"quorum\""), "names the setting: {not_ready}");
    assert!(not_ready.contains("inequivalent arg 'x-queue-type'"), "gives the broker's reason: {not_ready}");
    (t, queue)
}

#[tokio::test]
async fn a_refused_plugin_queue_waits_with_its_events_while_the_other_plugins_consume() {
    let rabbit = Rabbit::new().await;
    let (t, queue) = router_with_a_refused_queue(&rabbit).await;
    rabbit.emit_nestjs("auth.tokenGenerated", json!({ "user": user("q1", "quinn"), "token": "tok-q" })).await;
    let stored = eventually("the other plugin's event", SETTLE, || t.doc("user-replica", "user_refs", "q1")).await;
    assert_eq!(stored["token"], "tok-q");
    assert_eq!(router::queue_depth(&amqp_url(), &queue).await, Some(1), "the refused queue's event stays");
    let (status, body) = t.admin("GET", "/v1/ready", "application/json", "").await;
    assert_eq!(status, axum::http::StatusCode::SERVICE_UNAVAILABLE, "still not ready: {body}");
    let sources = body["sources"].as_array().cloned().unwrap_or_default();
    assert_eq!(sources.len(), 1, "one source, listed for programs: {body}");
    assert_eq!((&sources[0]["name"], &sources[0]["ready"]), (&json!("rabbitmq"), &json!(false)), "{body}");
    let reasons = sources[0]["reasons"].as_array().cloned().unwrap_or_default();
    assert_eq!(reasons.len(), 1, "one refused queue, one reason: {body}");
    let reason = reasons[0].as_str().unwrap_or_default();
    assert!(reason.starts_with(&format!("plugin stamp: queue {queue} exists")), "the refusal alone: {body}");

    // The operator moves the old queue away: the router's next attempt starts its consumer.
    delete_queue(&queue).await;
    connected(&t).await;
    let (status, body) = t.admin("GET", "/v1/ready", "application/json", "").await;
    assert_eq!(status, axum::http::StatusCode::OK, "{body}");
    assert_eq!(body["sources"], json!([{ "name": "rabbitmq", "ready": true, "reasons": [] }]), "{body}");
    rabbit.publish("", &queue, br#"{"pattern": "stamp.it", "data": {}}"#, BasicProperties::default()).await;
    settle(&t, &[queue]).await;
    let stamped = t.router.plugins.get("stamp").unwrap().slot().counters.snapshot().succeeded;
    assert_eq!(stamped, 1, "the plugin consumes its queue once it is declared");
    drop(t.stop().await);
}

#[tokio::test]
async fn a_plugin_whose_queue_was_refused_can_be_removed_and_its_queue_keeps_its_events() {
    let rabbit = Rabbit::new().await;
    let (t, queue) = router_with_a_refused_queue(&rabbit).await;
    let (status, body) = t.admin("DELETE", "/v1/plugins/stamp", "application/json", "").await;
    assert_eq!(status, axum::http::StatusCode::OK, "{body}");
    connected(&t).await;
    let (status, body) = t.admin("GET", "/v1/ready", "application/json", "").await;
    assert_eq!(status, axum::http::StatusCode::OK, "ready without the removed plugin: {body}");
    assert_eq!(router::queue_depth(&amqp_url(), &queue).await, Some(1), "its queue keeps what is in it");
    drop(t.stop().await);
}

#[tokio::test]
async fn unbinding_from_a_plugin_queue_that_is_gone_unbinds_nothing_and_declares_nothing() {
    let rabbit = Rabbit::new().await;
    let dir = tempfile::tempdir().unwrap();
    let text = config(&rabbit, false, &[]).replace("{data_dir}", &dir.path().display().to_string());
    let parsed = switchyard::config::Config::from_toml(&text, &dir.path().join("router.toml"), &|_| None).unwrap();
    let settings = parsed.rabbitmq.expect("a [rabbitmq] table");
    rabbit.track_plugin("gone");
    let queue = format!("{}gone", rabbit.prefix);
    let removal = switchyard::source::rabbitmq::rebind(&settings, &queue, &[], &["gone.#".to_string()]).await;
    assert!(removal.is_ok(), "no queue is nothing to unbind: {:?}", removal.err());
    assert_eq!(router::queue_depth(&amqp_url(), &queue).await, None, "a removal declares no queue");
}

#[tokio::test]
async fn a_refused_login_says_why_in_the_readiness_answer_and_never_shows_the_password() {
    let rabbit = Rabbit::new().await;
    let password = "not-the-password-7f3a";
    let url = amqp_url();
    let (user, host) = url.split_once('@').expect("a broker URL with credentials");
    let (user, _) = user.rsplit_once(':').expect("a broker URL with a password");
    let text = config(&rabbit, false, &[("user-replica", "user_replica.wasm", "")])
        .replace(&url, &format!("{user}:{password}@{host}"));
    assert!(text.contains(password), "{text}");
    let t = TestRouter::start(&text).await;
    let not_ready = not_ready_reason(&t, "rabbitmq").await;
    assert!(not_ready.contains("ACCESS_REFUSED"), "gives the broker's reason: {not_ready}");
    assert!(!not_ready.contains(password), "{not_ready}");
    drop(t.stop().await);
}

#[tokio::test]
async fn an_ingress_queue_is_used_as_its_producers_declared_it() {
    let rabbit = Rabbit::new().await;
    // A NestJS service with `queueOptions: { arguments: { 'x-queue-type': 'quorum' } }`
    // declared it; the router's plugin queues stay classic.
    declare_durable(&rabbit.ingress, quorum()).await.expect("a quorum ingress queue");
    let t = TestRouter::start(&config(&rabbit, true, &[("user-replica", "user_replica.wasm", "")])).await;
    connected(&t).await;
    rabbit.emit_nestjs("auth.tokenGenerated", json!({ "user": user("n1", "nora"), "token": "tok-n" })).await;
    let stored = eventually("the replica row", SETTLE, || t.doc("user-replica", "user_refs", "n1")).await;
    assert_eq!(stored["token"], "tok-n");
    let plugin_queue = format!("{}user-replica", rabbit.prefix);
    declare_durable(&plugin_queue, FieldTable::default()).await.expect("the plugin's queue is a classic one");
    let queues = [rabbit.ingress.clone(), plugin_queue];
    settle(&t, &queues).await;
    stop_and_assert_acked(t, &queues).await;
}
