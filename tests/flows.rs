//! The seed flows end to end over the real RabbitMQ, with the real plugins of `plugins/` and a
//! stand-in for the email API on loopback: follower replica, notification fan-out with email,
//! the order saga with its compensations, and the welcome flow. Each outcome is checked
//! document by document, and every email the API accepted is counted.

use std::collections::BTreeMap;
use std::time::Duration;

use lapin::BasicProperties;
use serde_json::{Value, json};
use switchyard_tests::email::EmailApi;
use switchyard_tests::{
    Rabbit, SETTLE, TestRouter, amqp_url, config, connected, eventually, settle, stop_and_assert_acked,
};

/// The API key the email stand-in accepts.
const KEY: &str = "re_test_key";

/// The `mailer` settings for `api`: allowed to reach it, with quick retries.
fn mailer(api: &EmailApi, allowed_host: &str, key: &str) -> String {
    format!(
        "allowed_hosts = [\"{allowed_host}\"]\n[plugin.config]\nbase_url = \"{}\"\napi_key = \"{key}\"\n\
         [plugin.retry]\nmax_attempts = 5\ninitial_backoff_ms = 50\nmultiplier = 2.0\nmax_backoff_ms = 500\n",
        api.base_url()
    )
}

/// The queues a test's router reads: its ingress queue and each plugin's own.
fn queues(rabbit: &Rabbit, plugins: &[&str]) -> Vec<String> {
    std::iter::once(rabbit.ingress.clone()).chain(plugins.iter().map(|p| format!("{}{p}", rabbit.prefix))).collect()
}

/// Every document of a plugin's collection, by key.
fn documents(t: &TestRouter, plugin: &str, collection: &str) -> BTreeMap<String, Value> {
    let mut all = BTreeMap::new();
    let mut after = String::new();
    loop {
        let rows = t.router.readers.scan(plugin, collection, &after, 1000).expect("read store");
        let Some(last) = rows.last() else { return all };
        after = last.key.clone();
        for row in rows {
            all.insert(row.key, serde_json::from_str(&row.body).expect("stored documents are JSON"));
        }
    }
}

fn follow(follower: &str, name: &str, followed: &str) -> Value {
    json!({ "follower_id": follower, "follower_email": format!("{follower}@mail.test"),
            "follower_name": name, "followed_id": followed })
}

#[tokio::test]
async fn a_post_reaches_each_current_follower_as_a_notification_and_exactly_one_email() {
    let rabbit = Rabbit::new().await;
    let api = EmailApi::start(KEY).await;
    let plugins = ["follow-replica", "notifier", "mailer"];
    let t = TestRouter::start(&config(
        &rabbit,
        true,
        &[
            ("follow-replica", "follow_replica.wasm", ""),
            ("notifier", "notifier.wasm", "publishes = [\"email.requested\"]\n"),
            ("mailer", "mailer.wasm", &mailer(&api, &api.host(), KEY)),
        ],
    ))
    .await;
    connected(&t).await;
    for (id, name) in [("f1", "Ana"), ("f2", "Luis"), ("f3", "Eva")] {
        rabbit.emit_nestjs("follow.created", follow(id, name, "author-1")).await;
    }
    rabbit.emit_nestjs("follow.created", follow("f9", "Otro", "author-2")).await;
    rabbit.emit_nestjs("follow.removed", json!({ "follower_id": "f3", "followed_id": "author-1" })).await;
    let post = json!({ "type": "new_post", "message": "Hola <a>", "userId": "author-1", "postId": 7 });
    rabbit.emit_nestjs("post.created", post).await;

    eventually("two emails", SETTLE, || (api.sent().len() >= 2).then_some(())).await;
    settle(&t, &queues(&rabbit, &plugins)).await;

    let replica = documents(&t, "follow-replica", "follow_refs");
    assert_eq!(replica.keys().collect::<Vec<_>>(), ["author-1:f1", "author-1:f2", "author-2:f9"]);
    assert_eq!(replica["author-1:f1"]["follower_email"], "f1@mail.test");
    assert_eq!(replica["author-1:f2"]["follower_name"], "Luis");
    assert_eq!(replica["author-2:f9"]["followed_id"], "author-2");

    let notifications = documents(&t, "notifier", "notifications");
    let receivers: Vec<&Value> = notifications.values().map(|n| &n["user_id_receiver"]).collect();
    assert_eq!(receivers, [&json!("f1"), &json!("f2")], "one notification per current follower of author-1");
    for n in notifications.values() {
        assert_eq!(
            (&n["type"], &n["message"], &n["author_id"]),
            (&json!("new_post"), &json!("Hola <a>"), &json!("author-1"))
        );
        assert!(n["created_at"].as_u64().is_some_and(|t| t > 0), "{n}");
    }

    let mut sent = api.sent();
    sent.sort_by(|a, b| a.to.cmp(&b.to));
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_eq!(sent[0].to, ["f1@mail.test"]);
    assert_eq!(sent[1].to, ["f2@mail.test"]);
    for email in &sent {
        assert_eq!(email.subject, "Someone you follow posted");
        assert!(email.html.contains("Hola &lt;a&gt;"), "the message is escaped: {}", email.html);
        assert!(email.idempotency_key.is_some(), "the event id goes out as the idempotency key");
    }
    assert_eq!(api.requests(), 2);
    for plugin in plugins {
        assert!(t.dead_letters(plugin).is_empty(), "{plugin}: {:?}", t.dead_letters(plugin));
    }
    stop_and_assert_acked(t, &queues(&rabbit, &plugins)).await;
}

// Two worker threads: the router under test shares the test's runtime, and 10,000 follows
// keep it busy for a while in a debug build.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_post_fans_out_to_ten_thousand_followers() {
    const FOLLOWERS: usize = 10_000;
    let rabbit = Rabbit::new().await;
    let plugins = ["notifier"];
    let settings = "publishes = [\"email.requested\"]\n[plugin.limits]\ntimeout_ms = 60000\n";
    let t = TestRouter::start(&config(&rabbit, true, &[("notifier", "notifier.wasm", settings)])).await;
    connected(&t).await;
    let emails = rabbit.tap("email.requested").await;
    let follows = (0..FOLLOWERS).map(|i| {
        let body = json!({ "pattern": "follow.created", "data": follow(&format!("u{i:05}"), "Fan", "star") });
        let props = BasicProperties::default().with_message_id(format!("follow-{i}").into());
        ("follow.created".to_string(), body.to_string().into_bytes(), props)
    });
    rabbit.publish_many(follows).await;
    // Counted, not read back: scanning 10,000 documents every 50 ms would slow the router.
    let succeeded = || t.router.plugins.get("notifier").unwrap().slot().counters.snapshot().succeeded;
    eventually("the follows to be committed", SETTLE * 6, || (succeeded() >= FOLLOWERS as u64).then_some(())).await;
    assert_eq!(documents(&t, "notifier", "follow_refs").len(), FOLLOWERS, "every follow replicated");
    let post = json!({ "type": "new_post", "message": "big news", "userId": "star" });
    rabbit.emit_nestjs("post.created", post).await;
    settle(&t, &queues(&rabbit, &plugins)).await;

    let notifications = documents(&t, "notifier", "notifications");
    assert_eq!(notifications.len(), FOLLOWERS);
    let receivers: std::collections::BTreeSet<&str> =
        notifications.values().filter_map(|n| n["user_id_receiver"].as_str()).collect();
    assert_eq!(receivers.len(), FOLLOWERS, "every follower exactly once");
    // The outbox is empty once settled: every request reached the broker, once.
    let published = switchyard::router::queue_depth(&amqp_url(), &emails).await;
    assert_eq!(published.map(|n| n as usize), Some(FOLLOWERS), "one email request per follower");
    assert!(t.dead_letters("notifier").is_empty(), "{:?}", t.dead_letters("notifier"));
    stop_and_assert_acked(t, &queues(&rabbit, &plugins)).await;
}

#[tokio::test]
async fn an_email_api_failing_twice_then_accepting_sends_exactly_one_email() {
    let rabbit = Rabbit::new().await;
    let api = EmailApi::start(KEY).await;
    api.fail_next(&[500, 503]);
    let t =
        TestRouter::start(&config(&rabbit, true, &[("mailer", "mailer.wasm", &mailer(&api, &api.host(), KEY))])).await;
    connected(&t).await;
    let request = json!({ "to": "ana@mail.test", "name": "Ana", "template": "event_cancelled",
                          "data": { "message": "The concert is off" } });
    rabbit.emit_nestjs("email.requested", request).await;
    eventually("the email to be accepted", SETTLE, || (!api.sent().is_empty()).then_some(())).await;
    settle(&t, &queues(&rabbit, &["mailer"])).await;
    let sent = api.sent();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].to, ["ana@mail.test"]);
    assert_eq!(sent[0].subject, "An event you follow was cancelled");
    assert_eq!(api.requests(), 3, "two failures, then the one that was accepted");
    let keys = api.request_keys();
    assert!(keys[0].is_some() && keys.iter().all(|k| *k == keys[0]), "every attempt carries one key: {keys:?}");
    assert!(t.dead_letters("mailer").is_empty(), "{:?}", t.dead_letters("mailer"));
    stop_and_assert_acked(t, &queues(&rabbit, &["mailer"])).await;
}

#[tokio::test]
async fn an_email_api_too_slow_to_answer_is_retried_and_sends_once() {
    let rabbit = Rabbit::new().await;
    let api = EmailApi::start(KEY).await;
    api.delay_next(&[Duration::from_secs(3)]);
    let settings = mailer(&api, &api.host(), KEY) + "[plugin.limits]\ntimeout_ms = 1000\n";
    let t = TestRouter::start(&config(&rabbit, true, &[("mailer", "mailer.wasm", &settings)])).await;
    connected(&t).await;
    rabbit.emit_nestjs("email.requested", json!({ "to": "ana@mail.test", "template": "welcome" })).await;
    eventually("the email to be accepted", SETTLE, || (!api.sent().is_empty()).then_some(())).await;
    settle(&t, &queues(&rabbit, &["mailer"])).await;
    let retried = t.router.plugins.get("mailer").expect("mailer runs").slot().counters.snapshot().retried;
    assert!(retried >= 1, "the slow attempt timed out and was retried");
    assert_eq!(api.sent().len(), 1);
    assert!(t.dead_letters("mailer").is_empty(), "{:?}", t.dead_letters("mailer"));
}

#[tokio::test]
async fn an_email_sent_whose_reply_was_lost_is_not_sent_again_and_large_bodies_go_out() {
    let rabbit = Rabbit::new().await;
    let api = EmailApi::start(KEY).await;
    api.fail_after_sending(&[500]);
    let t =
        TestRouter::start(&config(&rabbit, true, &[("mailer", "mailer.wasm", &mailer(&api, &api.host(), KEY))])).await;
    connected(&t).await;
    // Far more than the few KiB the host buffers of a request body before sending it.
    let message = "la ".repeat(10_000);
    let request = json!({ "to": "ana@mail.test", "template": "new_post", "data": { "message": message } });
    rabbit.emit_nestjs("email.requested", request).await;
    eventually("the retry after the lost reply", SETTLE, || (api.requests() >= 2).then_some(())).await;
    settle(&t, &queues(&rabbit, &["mailer"])).await;
    let sent = api.sent();
    assert_eq!(sent.len(), 1, "the API deduplicated the retry by its key");
    assert!(sent[0].html.contains(&message), "the whole {} byte body arrived", sent[0].html.len());
    assert_eq!(api.requests(), 2);
    let keys = api.request_keys();
    assert!(keys[0].is_some() && keys[0] == keys[1], "the retry carries the first attempt's key: {keys:?}");
    assert!(t.dead_letters("mailer").is_empty(), "{:?}", t.dead_letters("mailer"));
}

#[tokio::test]
async fn an_email_request_delivered_twice_sends_one_email() {
    let rabbit = Rabbit::new().await;
    let api = EmailApi::start(KEY).await;
    let t =
        TestRouter::start(&config(&rabbit, true, &[("mailer", "mailer.wasm", &mailer(&api, &api.host(), KEY))])).await;
    connected(&t).await;
    // The mailer keeps no document: only its outbound request makes the invocation one with
    // effects, and so one whose processed-marker makes the copy a duplicate.
    let request = json!({ "id": "email-1", "pattern": "email.requested",
                          "data": { "to": "ana@mail.test", "template": "welcome" } });
    for _ in 0..2 {
        rabbit.publish("", &rabbit.ingress.clone(), request.to_string().as_bytes(), BasicProperties::default()).await;
    }
    let counters = || t.router.plugins.get("mailer").expect("mailer runs").slot().counters.snapshot();
    eventually("the copy to be recognised", SETTLE, || (counters().duplicates == 1).then_some(())).await;
    settle(&t, &queues(&rabbit, &["mailer"])).await;
    assert_eq!(api.requests(), 1, "the copy sent nothing");
    assert_eq!(api.sent().len(), 1);
    assert!(t.router.readers.processed("mailer", "email-1").unwrap());
    stop_and_assert_acked(t, &queues(&rabbit, &["mailer"])).await;
}

#[tokio::test]
async fn an_email_api_refusing_with_a_4xx_dead_letters_the_request_at_once() {
    let rabbit = Rabbit::new().await;
    let api = EmailApi::start(KEY).await;
    let settings = mailer(&api, &api.host(), "a-wrong-key");
    let t = TestRouter::start(&config(&rabbit, true, &[("mailer", "mailer.wasm", &settings)])).await;
    connected(&t).await;
    rabbit.emit_nestjs("email.requested", json!({ "to": "ana@mail.test", "template": "welcome" })).await;
    let letters =
        eventually("a dead letter", SETTLE, || Some(t.dead_letters("mailer")).filter(|d| !d.is_empty())).await;
    assert_eq!(letters.len(), 1);
    assert!(letters[0].1.contains("refused the email with 401"), "{letters:?}");
    assert!(!letters[0].1.contains("a-wrong-key"), "the API key never shows in a reason");
    assert_eq!(api.requests(), 1, "a 4xx is not retried");
    assert!(api.sent().is_empty());
}

#[tokio::test]
async fn a_plugin_calling_a_host_off_its_allow_list_is_refused() {
    let rabbit = Rabbit::new().await;
    let api = EmailApi::start(KEY).await;
    // Allowed: the stand-in's host on another port. Requested: the stand-in itself.
    let elsewhere = format!("{}:{}", api.addr.ip(), api.addr.port().wrapping_add(1));
    let t =
        TestRouter::start(&config(&rabbit, true, &[("mailer", "mailer.wasm", &mailer(&api, &elsewhere, KEY))])).await;
    connected(&t).await;
    rabbit.emit_nestjs("email.requested", json!({ "to": "ana@mail.test", "template": "welcome" })).await;
    let letters =
        eventually("a dead letter", SETTLE, || Some(t.dead_letters("mailer")).filter(|d| !d.is_empty())).await;
    let reason = &letters[0].1;
    assert!(
        reason.contains(&format!("request to {} denied", api.host())) && reason.contains("allowed_hosts"),
        "{reason}"
    );
    assert_eq!(api.requests(), 0, "nothing reached the host");
}

#[tokio::test]
async fn a_created_user_gets_a_welcome_email_and_a_catalog_from_two_independent_plugins() {
    let rabbit = Rabbit::new().await;
    let api = EmailApi::start(KEY).await;
    let plugins = ["welcome", "user-catalog", "mailer"];
    let t = TestRouter::start(&config(
        &rabbit,
        true,
        &[
            ("welcome", "welcome.wasm", "publishes = [\"email.requested\"]\n"),
            ("user-catalog", "user_catalog.wasm", ""),
            ("mailer", "mailer.wasm", &mailer(&api, &api.host(), KEY)),
        ],
    ))
    .await;
    connected(&t).await;
    rabbit.emit_nestjs("user.created", json!({ "id": 41, "username": "ana", "email": "ana@mail.test" })).await;
    // The seed's integration event: a long name, the user wrapped in `payload`.
    let wrapped = json!({ "service": "accounts-ms", "name": "com.clonespotify.accounts.users.integration.user-created",
                          "payload": { "id": "u-42", "username": "john_doe", "email": "john.doe@example.com" } });
    rabbit.emit_nestjs("com.clonespotify.accounts.users.integration.user-created", wrapped).await;
    eventually("two welcome emails", SETTLE, || (api.sent().len() >= 2).then_some(())).await;
    settle(&t, &queues(&rabbit, &plugins)).await;
    let first = t.doc("user-catalog", "catalogs", "41").expect("catalog of user 41");
    // A producer's retry of the same user: the catalog stays as it was.
    rabbit
        .emit_nestjs("user.created", json!({ "id": 41, "username": "ana", "email": "ana@mail.test", "retry": 1 }))
        .await;
    settle(&t, &queues(&rabbit, &plugins)).await;

    let catalogs = documents(&t, "user-catalog", "catalogs");
    assert_eq!(catalogs.keys().collect::<Vec<_>>(), ["41", "u-42"]);
    assert_eq!(catalogs["41"], first, "a repeated user.created keeps the catalog");
    assert_eq!(catalogs["u-42"]["user"], json!({ "id": "u-42", "username": "john_doe" }));
    assert_eq!(catalogs["u-42"]["playlists"], json!([]));
    let mut sent = api.sent();
    sent.sort_by(|a, b| a.to.cmp(&b.to));
    let to: Vec<&str> = sent.iter().map(|e| e.to[0].as_str()).collect();
    assert_eq!(to, ["ana@mail.test", "ana@mail.test", "john.doe@example.com"], "one email per user.created event");
    assert!(sent.iter().all(|e| e.subject == "Welcome aboard"));
    assert!(sent[2].html.contains("<b>john_doe</b>"), "{}", sent[2].html);
    for plugin in plugins {
        assert!(t.dead_letters(plugin).is_empty(), "{plugin}: {:?}", t.dead_letters(plugin));
    }
}

#[tokio::test]
async fn a_publish_outside_the_plugins_allow_list_fails_its_invocation_and_nothing_else() {
    let rabbit = Rabbit::new().await;
    let plugins = ["welcome", "user-catalog"];
    let t = TestRouter::start(&config(
        &rabbit,
        true,
        &[("welcome", "welcome.wasm", "publishes = [\"email.sent\"]\n"), ("user-catalog", "user_catalog.wasm", "")],
    ))
    .await;
    connected(&t).await;
    let emails = rabbit.tap("email.#").await;
    rabbit.emit_nestjs("user.created", json!({ "id": "u1", "username": "ana", "email": "ana@mail.test" })).await;
    let letters =
        eventually("a dead letter", SETTLE, || Some(t.dead_letters("welcome")).filter(|d| !d.is_empty())).await;
    assert!(
        letters[0].1.contains("may not publish \"email.requested\"") && letters[0].1.contains("publish allow-list"),
        "{letters:?}"
    );
    settle(&t, &queues(&rabbit, &plugins)).await;
    assert!(t.doc("user-catalog", "catalogs", "u1").is_some(), "the other plugin handled the event");
    assert_eq!(switchyard::router::queue_depth(&amqp_url(), &emails).await, Some(0), "nothing was published");
}

#[tokio::test]
async fn the_order_saga_confirms_paid_orders_and_compensates_failed_refused_and_expired_ones() {
    let rabbit = Rabbit::new().await;
    let plugins = ["order-saga", "inventory", "payment"];
    // Margins for a loaded 2-core machine: the paid and declined orders have 4 s for their
    // round trips before the payment timeout; the late payment comes 4 s after it.
    let saga = "publishes = [\"inventory.*\", \"payment.initiate\", \"payment.refund\", \"order.confirmed\", \
                \"order.cancelled\", \"order.payment-timeout\"]\n[plugin.config]\npayment_timeout_ms = \"4000\"\n";
    let inventory = "publishes = [\"stock.*\"]\n[plugin.config]\ninitial_stock = \"10\"\n";
    let payment = "publishes = [\"payment.succeeded\", \"payment.failed\", \"payment.refunded\"]\n\
                   [plugin.config]\nlimit = \"1000\"\nslow_over = \"500\"\nslow_delay_ms = \"8000\"\n";
    let t = TestRouter::start(&config(
        &rabbit,
        true,
        &[
            ("order-saga", "order_saga.wasm", saga),
            ("inventory", "inventory.wasm", inventory),
            ("payment", "payment.wasm", payment),
        ],
    ))
    .await;
    connected(&t).await;
    let outcomes = rabbit.tap("order.*").await;
    let order = |id: &str, amount: u64, sku: &str, quantity: u32| json!({ "orderId": id, "amount": amount, "items": [{ "sku": sku, "quantity": quantity }] });
    rabbit.emit_nestjs("order.created", order("o-paid", 300, "A", 2)).await;
    rabbit.emit_nestjs("order.created", order("o-declined", 5000, "A", 1)).await;
    rabbit.emit_nestjs("order.created", order("o-late", 800, "A", 3)).await;
    rabbit.emit_nestjs("order.created", order("o-short", 100, "B", 11)).await;
    // A producer's retry of an order, with a new event id: the saga is not started twice.
    let mut again = order("o-paid", 300, "A", 2);
    again["retry"] = json!(1);
    rabbit.emit_nestjs("order.created", again).await;
    let queues = queues(&rabbit, &plugins);
    eventually("o-late to be refunded", SETTLE, || {
        t.doc("payment", "payments", "o-late").filter(|p| p["outcome"] == "refunded")
    })
    .await;
    settle(&t, &queues).await;
    // A stray, duplicate reply after the saga ended changes nothing.
    rabbit.emit_nestjs("stock.reserved", json!({ "orderId": "o-paid" })).await;
    settle(&t, &queues).await;

    let sagas = documents(&t, "order-saga", "sagas");
    let path = |id: &str| sagas[id]["path"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect::<Vec<_>>();
    assert_eq!(sagas["o-paid"]["step"], "confirmed");
    assert_eq!(
        path("o-paid"),
        ["order.created -> reserving", "stock.reserved -> paying", "payment.succeeded -> confirmed"]
    );
    assert_eq!(sagas["o-declined"]["step"], "cancelled");
    assert_eq!(sagas["o-declined"]["reason"], "payment failed: amount 5000 is over the limit of 1000");
    assert_eq!(
        path("o-declined"),
        [
            "order.created -> reserving",
            "stock.reserved -> paying",
            "payment.failed -> compensating",
            "stock.released -> cancelled"
        ]
    );
    assert_eq!(sagas["o-late"]["step"], "cancelled");
    assert_eq!(sagas["o-late"]["reason"], "reservation expired unpaid");
    assert_eq!(sagas["o-late"]["refunded"], true);
    assert_eq!(
        path("o-late"),
        [
            "order.created -> reserving",
            "stock.reserved -> paying",
            "order.payment-timeout -> compensating",
            "stock.released -> cancelled",
            "payment.succeeded -> refund"
        ]
    );
    assert_eq!(sagas["o-short"]["step"], "cancelled");
    assert_eq!(sagas["o-short"]["reason"], "insufficient stock: B has fewer than 11 units");

    // Only the paid order's stock stays taken; compensations gave the rest back.
    assert_eq!(t.doc("inventory", "stock", "A").unwrap()["available"], 8);
    assert!(t.doc("inventory", "stock", "B").is_none(), "a refused reservation takes nothing");
    let held: Vec<(String, Value)> =
        documents(&t, "inventory", "reservations").into_iter().map(|(k, v)| (k, v["state"].clone())).collect();
    let expected = [("o-declined", "released"), ("o-late", "released"), ("o-paid", "reserved"), ("o-short", "refused")];
    assert_eq!(held, expected.map(|(k, s)| (k.to_string(), json!(s))));
    let payments: Vec<(String, Value)> =
        documents(&t, "payment", "payments").into_iter().map(|(k, v)| (k, v["outcome"].clone())).collect();
    let expected = [("o-declined", "failed"), ("o-late", "refunded"), ("o-paid", "succeeded")];
    assert_eq!(payments, expected.map(|(k, s)| (k.to_string(), json!(s))));

    // What the services around see: one outcome per order.
    let mut seen = Vec::new();
    while let Some(message) = rabbit.get(&outcomes).await {
        let body: Value = serde_json::from_slice(&message.delivery.data).unwrap();
        if body["pattern"] != "order.created" && body["pattern"] != "order.payment-timeout" {
            seen.push(format!("{} {}", body["pattern"].as_str().unwrap(), body["data"]["orderId"].as_str().unwrap()));
        }
    }
    seen.sort();
    assert_eq!(
        seen,
        ["order.cancelled o-declined", "order.cancelled o-late", "order.cancelled o-short", "order.confirmed o-paid"]
    );
    for plugin in plugins {
        assert!(t.dead_letters(plugin).is_empty(), "{plugin}: {:?}", t.dead_letters(plugin));
    }
    stop_and_assert_acked(t, &queues).await;
}
