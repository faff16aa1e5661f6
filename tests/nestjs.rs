//! Interop with real NestJS producers: `ClientProxy.emit` over the RMQ transport (to an
//! ingress queue) and over the Redis transport (pub/sub), into one router with both sources.
//! `scripts/test` installs the NestJS packages from npm into tests/nestjs.

use std::process::Command;
use std::time::Duration;

use serde_json::json;
use switchyard_tests::{Rabbit, TestRouter, eventually, plugin_table, repo, unique};

fn emit(transport: &str, url: &str, queue: &str, events: serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.json");
    std::fs::write(&file, events.to_string()).unwrap();
    let script = repo().join("tests/nestjs/emit.mjs");
    let output = Command::new("node").arg(&script).args([transport, url, queue]).arg(&file).output().expect("run node");
    assert!(
        output.status.success(),
        "NestJS emit over {transport} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn a_nestjs_client_over_rmq_and_over_redis_feeds_the_replica() {
    let rabbit = Rabbit::new().await;
    rabbit.track_plugin("user-replica");
    let redis_url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    // NestJS's Redis transport publishes on a channel named after the pattern, unprefixed.
    let text = format!(
        "[router]\ndata_dir = \"{{data_dir}}\"\nlog = \"warn\"\n{}[redis]\nurl = \"{redis_url}\"\n[redis.pubsub]\n{}",
        rabbit.section(true),
        plugin_table("user-replica", "user_replica.wasm", "")
    );
    let t = TestRouter::start(&text).await;
    eventually("both sources to connect", Duration::from_secs(30), || t.router.is_connected().then_some(())).await;

    let (via_rmq, via_redis) = (unique("rmq"), unique("redis"));
    let login = |id: &str| json!({ "pattern": "auth.tokenGenerated", "data": { "user": { "user_id": id, "name": id, "email": format!("{id}@mail.com") }, "token": "tok" } });
    let amqp = switchyard_tests::amqp_url().replace("%2f", "");
    emit(
        "rmq",
        &amqp,
        &rabbit.ingress,
        json!([login(&via_rmq), { "pattern": "user.updated", "data": { "user": { "user_id": via_rmq, "name": "updated" } } }]),
    );
    emit("redis", &redis_url, "-", json!([login(&via_redis)]));

    let doc = eventually("the RMQ user updated", Duration::from_secs(30), || {
        t.doc("user-replica", "user_refs", &via_rmq).filter(|d| d["name"] == "updated")
    })
    .await;
    assert_eq!(doc["token"], "tok");
    let doc =
        eventually("the Redis user", Duration::from_secs(30), || t.doc("user-replica", "user_refs", &via_redis)).await;
    assert_eq!(doc["email"], format!("{via_redis}@mail.com"));
}
