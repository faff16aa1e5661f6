//! The admin API through `app().oneshot(..)`, on a router running real plugins on the bus:
//! the auth matrix, errors of one shape, the HTTP event source, store inspection, pause and
//! resume, and metrics.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{Value, json};
use switchyard_tests::{
    ADMIN_TOKEN as TOKEN, Rabbit, TestRouter, config, error_message, eventually, eventually_async, plugin_table,
};

async fn router() -> TestRouter {
    let text = "[router]\ndata_dir = \"{data_dir}\"\nlog = \"warn\"\n".to_string()
        + &plugin_table("user-replica", "user_replica.wasm", "");
    TestRouter::start(&text).await
}

/// Send a request; returns the status and the JSON body (or the text as a JSON string).
async fn call(t: &TestRouter, method: &str, path: &str, token: Option<&str>, body: &str) -> (StatusCode, Value) {
    let mut request = Request::builder().method(method).uri(path).header("content-type", "application/json");
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    t.admin_request(request.body(Body::from(body.to_string())).unwrap()).await
}

fn login(id: &str, email: &str) -> String {
    json!({ "pattern": "auth.tokenGenerated", "data": { "user": { "user_id": id, "name": id, "email": email }, "token": "t" } }).to_string()
}

#[tokio::test]
async fn every_route_but_health_needs_the_token_and_errors_have_one_shape() {
    let t = router().await;
    assert_eq!(call(&t, "GET", "/v1/health", None, "").await.0, StatusCode::OK);
    for path in
        ["/v1/ready", "/v1/plugins", "/v1/plugins/user-replica", "/metrics", "/v1/plugins/user-replica/store/user_refs"]
    {
        for token in [None, Some("wrong-token-of-some-length")] {
            let (status, body) = call(&t, "GET", path, token, "").await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{path} with {token:?}");
            assert_eq!(body["error"]["code"], "unauthorized");
        }
        assert!(call(&t, "GET", path, Some(TOKEN), "").await.0.is_success(), "{path} with the token");
    }
    let (status, body) = call(&t, "GET", "/v1/plugins/nope", Some(TOKEN), "").await;
    assert_eq!((status, &body["error"]["code"]), (StatusCode::NOT_FOUND, &json!("not_found")));
    assert_eq!(error_message(&body), "no plugin named \"nope\"");
}

#[tokio::test]
async fn posted_events_are_handled_before_the_reply_and_the_store_can_be_inspected() {
    let t = router().await;
    for (id, email) in [("u1", "a@x.com"), ("u2", "b@x.com"), ("u3", "a@x.com")] {
        let (status, body) = call(&t, "POST", "/v1/events", Some(TOKEN), &login(id, email)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["plugins"], json!(["user-replica"]));
    }
    let (status, body) = call(&t, "GET", "/v1/plugins/user-replica/store/user_refs/u1", Some(TOKEN), "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["document"]["email"], "a@x.com");

    let page = "/v1/plugins/user-replica/store/user_refs?field=email&value=a@x.com&limit=1";
    let (_, first) = call(&t, "GET", page, Some(TOKEN), "").await;
    assert_eq!(first["documents"][0]["key"], "u1");
    let next = format!("{page}&cursor={}", first["next_cursor"].as_str().unwrap());
    let (_, second) = call(&t, "GET", &next, Some(TOKEN), "").await;
    assert_eq!(second["documents"][0]["key"], "u3");
    assert_eq!(second["next_cursor"], Value::Null);

    let (status, body) =
        call(&t, "GET", "/v1/plugins/user-replica/store/user_refs?field=name&value=u1", Some(TOKEN), "").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_message(&body), "user_refs.name is not an indexed field of plugin user-replica");
    let (status, body) = call(&t, "POST", "/v1/events", Some(TOKEN), "{\"pattern\":").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error_message(&body).starts_with("body is not JSON"), "{body}");
    let (status, _) = call(&t, "GET", "/v1/plugins/user-replica/store/user_refs/none", Some(TOKEN), "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = call(&t, "GET", "/v1/plugins/user-replica/store/user_refs?limit=many", Some(TOKEN), "").await;
    assert_eq!((status, &body["error"]["code"]), (StatusCode::BAD_REQUEST, &json!("bad_request")), "{body}");

    let (_, plugin) = call(&t, "GET", "/v1/plugins/user-replica", Some(TOKEN), "").await;
    assert_eq!(plugin["counters"]["succeeded"], 3);
    assert_eq!(plugin["state"], "running");
    assert_eq!(plugin["digest"].as_str().unwrap().len(), 64);
    let (_, metrics) = call(&t, "GET", "/metrics", Some(TOKEN), "").await;
    let metrics = metrics.as_str().unwrap().to_string();
    assert!(metrics.contains("switchyard_events_total{plugin=\"user-replica\",outcome=\"succeeded\"}"), "{metrics}");
    assert!(metrics.contains("switchyard_outbox_backlog"), "{metrics}");
}

#[tokio::test]
async fn a_paused_plugin_holds_its_events_and_resumes_where_it_stopped() {
    let t = router().await;
    let (status, body) = call(&t, "POST", "/v1/plugins/user-replica/pause", Some(TOKEN), "").await;
    assert_eq!((status, body["state"].as_str()), (StatusCode::OK, Some("paused")));
    let bus = t.router.bus.as_ref().unwrap();
    bus.publish_bytes(login("held", "h@x.com").into_bytes()).await;
    eventually("the event to wait in its lane", Duration::from_secs(10), || (t.router.in_flight() == 1).then_some(()))
        .await;
    let (_, plugin) = call(&t, "GET", "/v1/plugins/user-replica", Some(TOKEN), "").await;
    assert_eq!(plugin["counters"]["consumed"], 0, "a paused plugin does not start events");
    assert!(t.doc("user-replica", "user_refs", "held").is_none());

    let (_, body) = call(&t, "POST", "/v1/plugins/user-replica/resume", Some(TOKEN), "").await;
    assert_eq!(body["state"], "running");
    eventually("the held event", Duration::from_secs(10), || t.doc("user-replica", "user_refs", "held")).await;
}

/// One HTTP/1.1 request over a real socket; returns the status line and the body.
async fn raw(addr: std::net::SocketAddr, request: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response.lines().next().unwrap_or_default().to_string();
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
    (status, body)
}

#[tokio::test]
async fn the_configured_address_serves_the_api_and_no_token_means_loopback_only() {
    let text = format!(
        "[router]\ndata_dir = \"{{data_dir}}\"\nlog = \"warn\"\nadmin_address = \"127.0.0.1:0\"\nadmin_token = \"{TOKEN}\"\n"
    );
    let t = TestRouter::start(&text).await;
    let addr = t.router.admin_address.expect("admin API started");
    let (status, _) = raw(addr, "GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    let (status, body) = raw(addr, "GET /v1/plugins HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status, "HTTP/1.1 401 Unauthorized");
    assert!(body.contains("\"unauthorized\""), "{body}");
    let request =
        format!("GET /v1/ready HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n");
    assert_eq!(raw(addr, &request).await.0, "HTTP/1.1 200 OK");

    let open = "[router]\ndata_dir = \"{data_dir}\"\nlog = \"warn\"\nadmin_address = \"0.0.0.0:0\"\n";
    let t = TestRouter::start(open).await;
    assert!(
        t.router.admin_address.unwrap().ip().is_loopback(),
        "without a token the API must not listen beyond loopback"
    );
}

async fn put(t: &TestRouter, path: &str, bytes: Vec<u8>) -> (StatusCode, Value) {
    t.admin("PUT", path, "application/wasm", bytes).await
}

fn wasm(file: &str) -> Vec<u8> {
    std::fs::read(switchyard_tests::plugin(file)).unwrap()
}

fn stamp_router_toml(extra: &str) -> String {
    format!("[router]\ndata_dir = \"{{data_dir}}\"\nlog = \"warn\"\n{extra}")
        + &plugin_table("stamp", "stamp_v1.wasm", "concurrency = 8")
}

#[tokio::test]
async fn bad_uploads_are_refused_with_the_reason_and_the_old_version_keeps_running() {
    let t = TestRouter::start(&stamp_router_toml("")).await;
    let (_, before) = call(&t, "GET", "/v1/plugins/stamp", Some(TOKEN), "").await;
    let (status, body) = put(&t, "/v1/plugins/stamp", b"\0asm not really".to_vec()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(error_message(&body).starts_with("not a WebAssembly component"), "{body}");
    let (status, body) = put(&t, "/v1/plugins/stamp", wasm("misbehave.wasm")).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(error_message(&body), "config names the plugin \"stamp\" but the component says it is \"misbehave\"");
    let (status, body) = put(&t, "/v1/plugins/stamp", wasm("not_a_plugin.wasm")).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(error_message(&body).starts_with("component does not fit the switchyard:plugin world"), "{body}");
    let (status, body) = put(&t, "/v1/plugins/overreach", wasm("overreach.wasm")).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let message = error_message(&body);
    assert!(
        message.starts_with("component does not fit the switchyard:plugin world")
            && message.contains("fixture:overreach/escape"),
        "an import the host does not grant is named: {body}"
    );
    // Components larger than a slot of the instance pool: wasmtime's reason names the limit.
    for (memories, limit) in [(&[1, 1, 1][..], "3 Wasm linear memories"), (&[2][..], "memories count of 2")] {
        let (status, body) = put(&t, "/v1/plugins/stamp", component_with_memories(memories)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{memories:?}: {body}");
        assert!(error_message(&body).contains(limit), "{memories:?}: {body}");
    }
    for query in ["subscriptions=a..b", "concurrency=0", "prefetch=0", "multiplier=0.5", "colour=blue"] {
        let (status, body) = put(&t, &format!("/v1/plugins/stamp?{query}"), wasm("stamp_v2.wasm")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
    }
    let (status, body) = put(&t, "/v1/plugins/newcomer", wasm("stamp_v2.wasm")).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "a new name must match the component's: {body}");
    let (_, plugins) = call(&t, "GET", "/v1/plugins", Some(TOKEN), "").await;
    assert_eq!(plugins.as_array().unwrap().len(), 1, "no failed upload added a plugin: {plugins}");
    let (status, _) = call(&t, "POST", "/v1/plugins/stamp/rollback", Some(TOKEN), "").await;
    assert_eq!(status, StatusCode::CONFLICT, "nothing to roll back to");
    let (_, after) = call(&t, "GET", "/v1/plugins/stamp", Some(TOKEN), "").await;
    assert_eq!(after["digest"], before["digest"]);
    assert_eq!(after["version"], "1.0.0");
}

/// A component that instantiates one core module per entry of `memories`, each defining that
/// many linear memories: nothing else, so only the instance pool's limits can refuse it.
fn component_with_memories(memories: &[u32]) -> Vec<u8> {
    use wasm_encoder::{Component, InstanceSection, MemorySection, MemoryType, Module, ModuleArg, ModuleSection};
    let mut component = Component::new();
    let mut instances = InstanceSection::new();
    for (index, &count) in (0u32..).zip(memories) {
        let mut section = MemorySection::new();
        for _ in 0..count {
            section.memory(MemoryType {
                minimum: 1,
                maximum: None,
                memory64: false,
                shared: false,
                page_size_log2: None,
            });
        }
        let mut module = Module::new();
        module.section(&section);
        component.section(&ModuleSection(&module));
        instances.instantiate(index, Vec::<(&str, ModuleArg)>::new());
    }
    component.section(&instances);
    component.finish()
}

/// The build of the stamp plugin that handles a posted `stamp.it` event with this id.
async fn stamped_by(t: &TestRouter, id: &str) -> u64 {
    let event = json!({ "pattern": "stamp.it", "data": {}, "id": id }).to_string();
    let (status, body) = call(t, "POST", "/v1/events", Some(TOKEN), &event).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    t.doc("stamp", "stamped", id).unwrap()["build"].as_u64().unwrap()
}

#[tokio::test]
async fn an_uploaded_version_survives_a_restart_and_can_be_rolled_back_after_it() {
    let toml = stamp_router_toml("");
    let t = TestRouter::start(&toml).await;
    let (status, body) =
        put(&t, "/v1/plugins/stamp?timeout_ms=1234&concurrency=3&max_attempts=7", wasm("stamp_v2.wasm")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["version"], "2.0.0");
    assert_eq!(body["previous_digest"].as_str().map(str::len), Some(64));
    let dir = t.stop().await;

    let t = TestRouter::start_in(&toml, dir).await;
    let (_, plugin) = call(&t, "GET", "/v1/plugins/stamp", Some(TOKEN), "").await;
    assert_eq!(
        (plugin["version"].as_str(), plugin["timeout_ms"].as_u64()),
        (Some("2.0.0"), Some(1234)),
        "the registry wins over router.toml"
    );
    assert_eq!(plugin["concurrency"], 3);
    assert_eq!(stamped_by(&t, "after-restart").await, 2);

    // The version the upload replaced was kept too: roll back to it after the restart.
    let (status, body) = call(&t, "POST", "/v1/plugins/stamp/rollback", Some(TOKEN), "").await;
    assert_eq!((status, body["version"].as_str()), (StatusCode::OK, Some("1.0.0")), "{body}");
    assert_eq!(stamped_by(&t, "rolled-back").await, 1);
    let dir = t.stop().await;

    let t = TestRouter::start_in(&toml, dir).await;
    assert_eq!(stamped_by(&t, "after-second-restart").await, 1, "the rollback is kept across restarts");
    let (status, body) = call(&t, "POST", "/v1/plugins/stamp/rollback", Some(TOKEN), "").await;
    assert_eq!((status, body["version"].as_str()), (StatusCode::OK, Some("2.0.0")), "and rolls forward again");
    let (_, plugin) = call(&t, "GET", "/v1/plugins/stamp", Some(TOKEN), "").await;
    assert_eq!(plugin["timeout_ms"], 1234, "with the settings it was uploaded with");
}

#[tokio::test]
async fn a_plugin_added_over_the_api_runs_comes_back_after_a_restart_and_is_removed_by_delete() {
    let toml = "[router]\ndata_dir = \"{data_dir}\"\nlog = \"warn\"\n".to_string()
        + &plugin_table("user-replica", "user_replica.wasm", "");
    let t = TestRouter::start(&toml).await;
    let (status, body) = put(&t, "/v1/plugins/stamp?subscriptions=stamp.it,extra.*", wasm("stamp_v1.wasm")).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["previous_digest"], Value::Null);
    assert_eq!(stamped_by(&t, "added").await, 1);
    let (status, _) = put(&t, "/v1/plugins/stamp?subscriptions=stamp.it,extra.*", wasm("stamp_v1.wasm")).await;
    assert_eq!(status, StatusCode::OK, "the same name again is a swap");
    let dir = t.stop().await;

    let t = TestRouter::start_in(&toml, dir).await;
    let (_, plugin) = call(&t, "GET", "/v1/plugins/stamp", Some(TOKEN), "").await;
    assert_eq!(plugin["subscriptions"], json!(["stamp.it", "extra.*"]), "back from the registry: {plugin}");
    let event = json!({ "pattern": "extra.thing", "data": {}, "id": "extra-1" }).to_string();
    let (_, body) = call(&t, "POST", "/v1/events", Some(TOKEN), &event).await;
    assert_eq!(body["plugins"], json!(["stamp"]));

    let (status, body) = call(&t, "DELETE", "/v1/plugins/stamp", Some(TOKEN), "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["drained"], true);
    let (status, _) = call(&t, "GET", "/v1/plugins/stamp", Some(TOKEN), "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let event = json!({ "pattern": "stamp.it", "data": {}, "id": "after-delete" }).to_string();
    let (_, body) = call(&t, "POST", "/v1/events", Some(TOKEN), &event).await;
    assert_eq!(body["plugins"], json!([]), "a removed plugin takes no events");
    let (status, _) = call(&t, "DELETE", "/v1/plugins/stamp", Some(TOKEN), "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let dir = t.stop().await;

    let t = TestRouter::start_in(&toml, dir).await;
    let (_, plugins) = call(&t, "GET", "/v1/plugins", Some(TOKEN), "").await;
    let names: Vec<&str> = plugins.as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["user-replica"], "the registry forgot the removed plugin");
}

#[tokio::test]
async fn an_addition_that_fails_creating_its_index_is_not_kept_for_the_next_start() {
    let toml = stamp_router_toml("");
    let t = TestRouter::start(&toml).await;
    // A table by the name of the index `user-replica` declares: creating the index fails, as
    // it would on a store error.
    let drop_blocker = {
        let db = rusqlite::Connection::open(t.dir.path().join(switchyard::db::FILE_NAME)).unwrap();
        let blocker = "\"documents:user-replica:user_refs:email\"";
        db.execute_batch(&format!("CREATE TABLE {blocker} (x)")).unwrap();
        move || db.execute_batch(&format!("DROP TABLE {blocker}")).unwrap()
    };
    let (status, body) = put(&t, "/v1/plugins/user-replica", wasm("user_replica.wasm")).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert_eq!(error_message(&body), "internal error", "the reason goes to the router's log only: {body}");
    let (status, _) = call(&t, "GET", "/v1/plugins/user-replica", Some(TOKEN), "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let dir = t.stop().await;
    drop_blocker();

    let t = TestRouter::start_in(&toml, dir).await;
    let (_, plugins) = call(&t, "GET", "/v1/plugins", Some(TOKEN), "").await;
    let names: Vec<&str> = plugins.as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["stamp"], "the registry kept nothing of the failed addition");
    let (status, body) = put(&t, "/v1/plugins/user-replica", wasm("user_replica.wasm")).await;
    assert_eq!(status, StatusCode::CREATED, "once the index can be created, the addition works: {body}");
}

/// Wait until `/metrics` shows the instance pool's gauges at these values. Every router of this
/// process sets the same unlabelled gauges when it is scraped, so a scrape may show another
/// test's router's: asked again until this one's appear.
async fn pool_gauges(t: &TestRouter, reserved: usize, max: usize) {
    let wanted = [format!("switchyard_instances_reserved {reserved}\n"), format!("switchyard_instances_max {max}\n")];
    eventually_async("the instance pool's gauges", Duration::from_secs(10), async || {
        let (_, metrics) = call(t, "GET", "/metrics", Some(TOKEN), "").await;
        let text = metrics.as_str()?.to_string();
        wanted.iter().all(|line| text.contains(line.as_str())).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_plugin_whose_lanes_do_not_fit_the_instance_pool_is_refused_and_changes_nothing() {
    let toml = "[router]\ndata_dir = \"{data_dir}\"\nlog = \"warn\"\nmax_instances = 10\n".to_string()
        + &plugin_table("user-replica", "user_replica.wasm", "concurrency = 8");
    let t = TestRouter::start(&toml).await;
    pool_gauges(&t, 8, 10).await;
    let (status, body) = put(&t, "/v1/plugins/stamp?concurrency=3", wasm("stamp_v1.wasm")).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let message = error_message(&body);
    assert!(
        message.contains("the plugin's lanes need 3 more (an instance each), and 8 of router.max_instances = 10"),
        "{body}"
    );
    let (_, plugins) = call(&t, "GET", "/v1/plugins", Some(TOKEN), "").await;
    assert_eq!(plugins.as_array().unwrap().len(), 1, "not added: {plugins}");
    let event = json!({ "pattern": "stamp.it", "data": {}, "id": "refused" }).to_string();
    let (_, body) = call(&t, "POST", "/v1/events", Some(TOKEN), &event).await;
    assert_eq!(body["plugins"], json!([]), "nothing subscribed for it");

    let (status, body) = put(&t, "/v1/plugins/stamp?concurrency=2", wasm("stamp_v1.wasm")).await;
    assert_eq!(status, StatusCode::CREATED, "two lanes fit: {body}");
    assert_eq!(stamped_by(&t, "fits").await, 1);
    pool_gauges(&t, 10, 10).await;
    // Held the way a source holds the plugins it still drains: the lanes stop all the same.
    let still_held = t.router.plugins.get("user-replica").expect("running");
    let (status, body) = call(&t, "DELETE", "/v1/plugins/user-replica", Some(TOKEN), "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["drained"], true, "{body}");
    assert!(
        futures::FutureExt::now_or_never(still_held.stopped()).is_some(),
        "its lanes stopped before DELETE replied, though a source still holds the plugin"
    );
    // Its instances are back in the pool when DELETE replies; its router.toml entry still
    // counts, for it comes back at the next start.
    pool_gauges(&t, 2, 10).await;
    let (status, body) = put(&t, "/v1/plugins/welcome?concurrency=1", wasm("welcome.wasm")).await;
    drop(still_held);
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(error_message(&body).starts_with("at the next start the plugins would need 11 instances"), "{body}");
    let (status, body) = put(&t, "/v1/plugins/user-replica?concurrency=8", wasm("user_replica.wasm")).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = put(&t, "/v1/plugins/stamp?concurrency=3", wasm("stamp_v2.wasm")).await;
    assert_eq!(status, StatusCode::CONFLICT, "three lanes would not fit at the next start: {body}");
    assert!(error_message(&body).contains("would need 11 instances"), "{body}");
    assert_eq!(stamped_by(&t, "kept").await, 1, "the running version keeps running");
    let (status, body) = put(&t, "/v1/plugins/stamp?concurrency=1", wasm("stamp_v2.wasm")).await;
    assert_eq!(status, StatusCode::OK, "a swap keeps the lanes it has: {body}");
    assert_eq!(stamped_by(&t, "swapped").await, 2);
}

#[tokio::test]
async fn swapping_twice_under_load_loses_nothing_and_doubles_nothing() {
    use lapin::BasicProperties;
    let rabbit = Rabbit::new().await;
    rabbit.track_plugin("stamp");
    let t = TestRouter::start(&stamp_router_toml(&rabbit.section(false))).await;
    eventually("RabbitMQ", Duration::from_secs(30), || t.router.is_connected().then_some(())).await;
    let batch = |phase: &str, n: usize| {
        (0..n)
            .map(|i| {
                let id = format!("{phase}-{i}");
                (
                    "stamp.event".to_string(),
                    b"{}".to_vec(),
                    BasicProperties::default().with_message_id(id.as_str().into()),
                )
            })
            .collect::<Vec<_>>()
    };
    let succeeded = || t.router.plugins.get("stamp").unwrap().slot().counters.snapshot().succeeded;
    let wait_for =
        |n: u64| eventually("events to be handled", Duration::from_secs(120), move || (succeeded() >= n).then_some(()));

    rabbit.publish_many(batch("p1", 3000)).await;
    let (status, body) = put(&t, "/v1/plugins/stamp", wasm("stamp_v2.wasm")).await;
    assert_eq!(status, StatusCode::OK, "first swap, under load: {body}");
    rabbit.publish_many(batch("p2", 3000)).await;
    wait_for(6000).await;
    rabbit.publish_many(batch("p3", 2000)).await;
    let (status, body) = put(&t, "/v1/plugins/stamp", wasm("stamp_v1.wasm")).await;
    assert_eq!(status, StatusCode::OK, "second swap, under load: {body}");
    rabbit.publish_many(batch("p4", 2000)).await;
    wait_for(10_000).await;

    let build = |id: String| {
        t.doc("stamp", "stamped", &id).unwrap_or_else(|| panic!("{id} was lost"))["build"].as_u64().unwrap()
    };
    for i in 0..3000 {
        build(format!("p1-{i}"));
        assert_eq!(build(format!("p2-{i}")), 2, "published after the first swap");
    }
    for i in 0..2000 {
        build(format!("p3-{i}"));
        assert_eq!(build(format!("p4-{i}")), 1, "published after the second swap");
    }
    let counters = t.router.plugins.get("stamp").unwrap().slot().counters.snapshot();
    assert_eq!((counters.succeeded, counters.dead_lettered), (10_000, 0), "each event ran to commit exactly once");
    let (_, metrics) = call(&t, "GET", "/metrics", Some(TOKEN), "").await;
    assert!(
        metrics.as_str().unwrap().contains("switchyard_queue_ready{plugin=\"stamp\"} 0"),
        "consumer lag is exported"
    );
    let queue = format!("{}stamp", rabbit.prefix);
    drop(t.stop().await);
    assert_eq!(
        switchyard::router::queue_depth(&switchyard_tests::amqp_url(), &queue).await,
        Some(0),
        "everything acknowledged"
    );
}

#[tokio::test]
async fn the_openapi_description_matches_the_real_routes() {
    let t = router().await;
    let (status, spec) = call(&t, "GET", "/v1/openapi.json", Some(TOKEN), "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(spec["openapi"].as_str().unwrap().starts_with("3."), "{spec}");
    let paths = spec["paths"].as_object().expect("paths");
    let mut listed: Vec<&str> = paths.keys().map(String::as_str).collect();
    listed.sort();
    let mut expected = vec![
        "/metrics",
        "/v1/events",
        "/v1/health",
        "/v1/openapi.json",
        "/v1/plugins",
        "/v1/plugins/{name}",
        "/v1/plugins/{name}/dead-letters",
        "/v1/plugins/{name}/dead-letters/replay",
        "/v1/plugins/{name}/pause",
        "/v1/plugins/{name}/resume",
        "/v1/plugins/{name}/rollback",
        "/v1/plugins/{name}/store/{collection}",
        "/v1/plugins/{name}/store/{collection}/{key}",
        "/v1/ready",
    ];
    expected.sort();
    assert_eq!(listed, expected);
    // Every operation described is served: no fallback 404, no 405.
    for (path, item) in paths {
        let concrete =
            path.replace("{name}", "user-replica").replace("{collection}", "user_refs").replace("{key}", "nobody");
        for (method, operation) in item.as_object().unwrap() {
            let (status, body) = call(&t, &method.to_uppercase(), &concrete, Some(TOKEN), "").await;
            assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
            assert_ne!(error_message(&body), "no such route", "{method} {path} is described but not served");
            let secured = operation.get("security").is_some();
            assert_eq!(secured, path != "/v1/health", "{method} {path}: only health is open");
        }
    }
    // And a route that is not described is not served.
    let (status, body) = call(&t, "PATCH", "/v1/plugins/user-replica", Some(TOKEN), "").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{body}");
}

#[tokio::test]
async fn a_paused_plugins_lanes_let_go_of_their_events_when_the_router_is_dropped() {
    let rabbit = Rabbit::new().await;
    let queue = format!("{}stamp", rabbit.prefix);
    let t = TestRouter::start(&config(&rabbit, false, &[("stamp", "stamp_v1.wasm", "prefetch = 40\n")])).await;
    eventually("RabbitMQ", Duration::from_secs(30), || t.router.is_connected().then_some(())).await;
    let stamp = t.router.plugins.get("stamp").unwrap();
    stamp.slot().set_running(false);
    rabbit.publish_many(stamp_batch("held", 100)).await;
    assert_eq!(depth_reaching(&queue, 100 - 40).await, Some(100 - 40), "the paused plugin holds one prefetch");
    assert_eq!(stamp.pending(), 40);

    // Its lanes let go of the events they hold (they would wait for a resume that cannot
    // come), and the broker has them back.
    drop(t);
    eventually("the lanes to let go", Duration::from_secs(30), || (stamp.pending() == 0).then_some(())).await;
    assert_eq!(stamp.slot().counters.snapshot().consumed, 0, "none was handled");
    assert_eq!(depth_reaching(&queue, 100).await, Some(100), "what the dropped router held is back in the queue");
}

/// The ready count of `queue` once it is `want`, or the last one read within 10 s.
async fn depth_reaching(queue: &str, want: u32) -> Option<u32> {
    let url = switchyard_tests::amqp_url();
    let mut depth = None;
    for _ in 0..200 {
        depth = switchyard::router::queue_depth(&url, queue).await;
        if depth == Some(want) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    depth
}

/// `stamp.event` messages with ids `{phase}-{i}`.
fn stamp_batch(phase: &str, n: usize) -> Vec<(String, Vec<u8>, lapin::BasicProperties)> {
    (0..n)
        .map(|i| {
            let props = lapin::BasicProperties::default().with_message_id(format!("{phase}-{i}").as_str().into());
            ("stamp.event".to_string(), b"{}".to_vec(), props)
        })
        .collect()
}

#[tokio::test]
async fn over_rabbitmq_an_added_plugin_misses_nothing_and_pause_and_delete_keep_the_queues_events() {
    let rabbit = Rabbit::new().await;
    rabbit.track_plugin("stamp");
    let queue = format!("{}stamp", rabbit.prefix);
    let url = switchyard_tests::amqp_url();
    let depth = || switchyard::router::queue_depth(&url, &queue);
    let toml = config(&rabbit, false, &[("user-replica", "user_replica.wasm", "prefetch = 24\n")]);
    let t = TestRouter::start(&toml).await;
    eventually("RabbitMQ", Duration::from_secs(30), || t.router.is_connected().then_some(())).await;
    let (_, view) = call(&t, "GET", "/v1/plugins/user-replica", Some(TOKEN), "").await;
    assert_eq!(view["prefetch"], 24, "router.toml's prefetch of a plugin: {view}");
    let docs =
        |phase: &str, n: usize| (0..n).filter(|i| t.doc("stamp", "stamped", &format!("{phase}-{i}")).is_some()).count();

    // Added while running: its queue is bound before the reply, so what is published next reaches it.
    // With a prefetch of its own, smaller than the router-wide 64.
    let (status, body) = put(&t, "/v1/plugins/stamp?concurrency=4&prefetch=40", wasm("stamp_v1.wasm")).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (_, view) = call(&t, "GET", "/v1/plugins/stamp", Some(TOKEN), "").await;
    assert_eq!(view["prefetch"], 40, "{view}");
    rabbit.publish_many(stamp_batch("a", 200)).await;
    let stamp = t.router.plugins.get("stamp").unwrap();
    let succeeded = || stamp.slot().counters.snapshot().succeeded;
    eventually("the added plugin to handle its events", Duration::from_secs(60), || (succeeded() == 200).then_some(()))
        .await;

    // Paused: the consumer holds one prefetch (its 40) in its lanes and the queue keeps the rest.
    call(&t, "POST", "/v1/plugins/stamp/pause", Some(TOKEN), "").await;
    rabbit.publish_many(stamp_batch("b", 1000)).await;
    assert_eq!(depth_reaching(&queue, 1000 - 40).await, Some(1000 - 40), "a paused plugin's queue keeps filling");
    assert_eq!(stamp.slot().counters.snapshot().consumed, 200, "a paused plugin starts no event");
    call(&t, "POST", "/v1/plugins/stamp/resume", Some(TOKEN), "").await;
    eventually("the held events after resume", Duration::from_secs(60), || (succeeded() == 1200).then_some(())).await;
    assert_eq!(docs("b", 1000), 1000);

    // Deleted under load: what it took is handled and acknowledged; the rest stays in its queue.
    call(&t, "POST", "/v1/plugins/stamp/pause", Some(TOKEN), "").await;
    rabbit.publish_many(stamp_batch("c", 3000)).await;
    call(&t, "POST", "/v1/plugins/stamp/resume", Some(TOKEN), "").await;
    let (status, body) = call(&t, "DELETE", "/v1/plugins/stamp", Some(TOKEN), "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["drained"], true, "{body}");
    let handled = usize::try_from(succeeded() - 1200).unwrap();
    assert_eq!(docs("c", 3000), handled, "every event the removed plugin took was committed");
    assert_eq!(stamp.pending(), 0);
    let left = depth_reaching(&queue, u32::try_from(3000 - handled).unwrap()).await;
    assert_eq!(left, Some(u32::try_from(3000 - handled).unwrap()), "the queue keeps what was not handled");
    rabbit.publish_many(stamp_batch("d", 50)).await;
    assert_eq!(depth().await, left, "a removed plugin's queue is unbound");

    // Added again: it takes up the queue where the removed one stopped; nothing runs twice.
    let (status, body) = put(&t, "/v1/plugins/stamp", wasm("stamp_v2.wasm")).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let again = t.router.plugins.get("stamp").unwrap();
    eventually("the kept events", Duration::from_secs(60), || (docs("c", 3000) == 3000).then_some(())).await;
    eventually("the queue to drain", Duration::from_secs(30), || {
        (again.slot().counters.snapshot().succeeded == (3000 - handled) as u64).then_some(())
    })
    .await;
    assert_eq!(again.slot().counters.snapshot().duplicates, 0, "no event handled before was handled again");
    assert_eq!(docs("d", 50), 0, "events published while it was removed are not its");

    // Deleted with its queue: the queue goes, with what it held.
    let (status, body) = call(&t, "DELETE", "/v1/plugins/stamp?discard_queue=true", Some(TOKEN), "").await;
    assert_eq!((status, body["discarded_queue"].as_bool()), (StatusCode::OK, Some(true)), "{body}");
    assert!(body["discarded_events"].is_u64(), "the reply counts the events deleted with the queue: {body}");
    assert_eq!(depth().await, None, "the queue is deleted");
}

#[tokio::test]
async fn discard_queue_deletes_a_plugins_queue_unless_another_router_consumes_it_or_it_is_an_ingress_queue() {
    let rabbit = Rabbit::new().await;
    rabbit.track_plugin("leftover");
    rabbit.track_plugin("elsewhere");
    let url = switchyard_tests::amqp_url();
    let toml = config(&rabbit, true, &[("user-replica", "user_replica.wasm", "")]);
    let t = TestRouter::start(&toml).await;
    eventually("RabbitMQ", Duration::from_secs(30), || t.router.is_connected().then_some(())).await;
    let declare = async |plugin: &str| {
        let queue = format!("{}{plugin}", rabbit.prefix);
        let options = lapin::options::QueueDeclareOptions { durable: true, ..Default::default() };
        let (q, x) = (queue.as_str().into(), rabbit.exchange.as_str().into());
        rabbit.channel.queue_declare(q, options, Default::default()).await.expect("declare");
        let bound = rabbit.channel.queue_bind(
            queue.as_str().into(),
            x,
            format!("{plugin}.#").as_str().into(),
            Default::default(),
            Default::default(),
        );
        bound.await.expect("bind");
        queue
    };

    // What an addition the broker failed part-way leaves: the plugin's queue, bound and filling.
    let leftover = declare("leftover").await;
    let events = (0..3).map(|i| (format!("leftover.{i}"), b"{}".to_vec(), lapin::BasicProperties::default()));
    rabbit.publish_many(events).await;
    assert_eq!(depth_reaching(&leftover, 3).await, Some(3));
    let (status, body) = call(&t, "DELETE", "/v1/plugins/leftover", Some(TOKEN), "").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "without discard_queue a name not running is not found: {body}");
    assert_eq!(switchyard::router::queue_depth(&url, &leftover).await, Some(3), "and its queue is kept");
    let (status, body) = call(&t, "DELETE", "/v1/plugins/leftover?discard_queue=true", Some(TOKEN), "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!((body["discarded_queue"].as_bool(), body["discarded_events"].as_u64()), (Some(true), Some(3)), "{body}");
    assert_eq!(switchyard::router::queue_depth(&url, &leftover).await, None, "the leftover queue is deleted");
    let (status, body) = call(&t, "DELETE", "/v1/plugins/leftover?discard_queue=true", Some(TOKEN), "").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(error_message(&body).contains("has no queue"), "{body}");

    // Another router's consumer on a queue, and a discard that must be refused: its message.
    let other_router = async |queue: &str| {
        let consumer = rabbit.channel.basic_consume(queue.into(), "".into(), Default::default(), Default::default());
        consumer.await.expect("consume")
    };
    let refused = async |plugin: &str| {
        let (status, body) =
            call(&t, "DELETE", &format!("/v1/plugins/{plugin}?discard_queue=true"), Some(TOKEN), "").await;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        error_message(&body).to_string()
    };

    // A queue something consumes from may be a plugin of that name on another router: kept.
    let elsewhere = declare("elsewhere").await;
    let _consumer = other_router(&elsewhere).await;
    let message = refused("elsewhere").await;
    assert!(message.contains("has a consumer of another router"), "{message}");
    assert_eq!(switchyard::router::queue_depth(&url, &elsewhere).await, Some(0), "a consumed queue is kept");

    // A running plugin's queue: this router's consumer is one of its consumers; another's
    // refuses the discard, and the plugin keeps running.
    let replica = format!("{}user-replica", rabbit.prefix);
    let other_router = other_router(&replica).await;
    let message = refused("user-replica").await;
    assert!(message.contains("nothing is removed or deleted"), "{message}");
    assert!(t.router.plugins.get("user-replica").is_some(), "the plugin still runs");
    let passive = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
    let kept = rabbit.channel.queue_declare(replica.as_str().into(), passive, Default::default()).await;
    assert_eq!(kept.expect("the queue is kept").consumer_count(), 2, "this router's consumer and the other's");
    rabbit.channel.basic_cancel(other_router.tag(), Default::default()).await.expect("cancel");
    let (status, body) = call(&t, "DELETE", "/v1/plugins/user-replica?discard_queue=true", Some(TOKEN), "").await;
    assert_eq!((status, body["discarded_queue"].as_bool()), (StatusCode::OK, Some(true)), "{body}");
    assert_eq!(switchyard::router::queue_depth(&url, &replica).await, None, "alone on its queue, it is deleted");

    // The ingress queue is named like a plugin's queue here (`{prefix}ingress`), and is never
    // a plugin's to delete.
    assert_eq!(rabbit.ingress, format!("{}ingress", rabbit.prefix));
    let ingress = async || switchyard::router::queue_depth(&url, &rabbit.ingress).await;
    switchyard_tests::eventually_async("the ingress queue declared", Duration::from_secs(30), ingress).await;
    let message = refused("ingress").await;
    assert!(message.contains("ingress_queues"), "{message}");
    assert!(switchyard::router::queue_depth(&url, &rabbit.ingress).await.is_some(), "the ingress queue is kept");
    drop(t.stop().await);
}

#[tokio::test]
async fn a_queue_another_router_takes_up_while_its_plugin_is_removed_is_kept() {
    let rabbit = Rabbit::new().await;
    let limits = "[plugin.limits]\ntimeout_ms = 60000\n";
    let t = TestRouter::start(&config(&rabbit, false, &[("misbehave", "misbehave.wasm", limits)])).await;
    eventually("RabbitMQ", Duration::from_secs(30), || t.router.is_connected().then_some(())).await;
    let misbehave = t.router.plugins.get("misbehave").unwrap();
    // An invocation that waits 5 s in a host call holds the removal in its drain, after the
    // check that no other router consumes from the queue.
    let sleep = json!({ "pattern": "chaos.sleep", "data": { "ms": 5000 } }).to_string().into_bytes();
    rabbit.publish_many([("chaos.sleep".to_string(), sleep, lapin::BasicProperties::default())]).await;
    eventually("the invocation to start", Duration::from_secs(30), || (misbehave.pending() == 1).then_some(())).await;
    let queue = format!("{}misbehave", rabbit.prefix);
    let removal = call(&t, "DELETE", "/v1/plugins/misbehave?discard_queue=true", Some(TOKEN), "");
    let other_router = async {
        let removed = || t.router.plugins.get("misbehave").is_none().then_some(());
        eventually("the plugin to leave the set", Duration::from_secs(30), removed).await;
        assert_eq!(misbehave.pending(), 1, "the removal still drains the invocation");
        let consumer =
            rabbit.channel.basic_consume(queue.as_str().into(), "".into(), Default::default(), Default::default());
        consumer.await.expect("consume")
    };
    let ((status, body), _consumer) = tokio::join!(removal, other_router);
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!((body["drained"].as_bool(), body["discarded_queue"].as_bool()), (Some(true), Some(false)), "{body}");
    let url = switchyard_tests::amqp_url();
    assert_eq!(switchyard::router::queue_depth(&url, &queue).await, Some(0), "the other router's queue is kept");
}

/// A `multipart/form-data` body with a `component` part and, if given, a `settings` JSON part.
fn multipart(component: Vec<u8>, settings: Option<&str>) -> (String, Vec<u8>) {
    let boundary = "switchyard-test-boundary";
    let mut body = Vec::new();
    if let Some(settings) = settings {
        body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"settings\"\r\nContent-Type: application/json\r\n\r\n{settings}\r\n").as_bytes());
    }
    body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"component\"; filename=\"p.wasm\"\r\nContent-Type: application/wasm\r\n\r\n").as_bytes());
    body.extend_from_slice(&component);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

#[tokio::test]
async fn a_broker_that_stops_answering_fails_an_upload_with_the_reason_instead_of_hanging_it() {
    let rabbit = Rabbit::new().await;
    rabbit.track_plugin("stamp");
    let proxy = switchyard_tests::Proxy::start("127.0.0.1:5672").await;
    let toml = config(&rabbit, false, &[("user-replica", "user_replica.wasm", "")]);
    let t = TestRouter::start(&proxy.through(&toml)).await;
    eventually("RabbitMQ", Duration::from_secs(30), || t.router.is_connected().then_some(())).await;

    // Binding the new plugin's queue takes a connection of its own, which the broker accepts
    // and never answers on.
    proxy.stall();
    let upload = put(&t, "/v1/plugins/stamp", wasm("stamp_v1.wasm"));
    let (status, body) = switchyard_tests::bounded("the upload", Duration::from_secs(60), upload).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.to_string().contains("did not answer"), "{body}");
    let (status, _) = call(&t, "GET", "/v1/plugins/stamp", Some(TOKEN), "").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "a change the broker did not take is not made");
    assert!(t.router.is_connected(), "the session's own connection is untouched");
    drop(t.stop().await);
}

#[tokio::test]
async fn config_values_come_in_a_multipart_settings_part_and_secrets_stay_references() {
    let t = TestRouter::start(&stamp_router_toml("")).await;
    let settings = r#"{"subscriptions": ["stamp.#"], "timeout_ms": 2500, "config": {"label": "blue", "path": {"env": "PATH"}},
            "allowed_hosts": ["api.resend.com"], "publishes": ["stamp.done", "audit.#"]}"#;
    let (content_type, body) = multipart(wasm("stamp_v2.wasm"), Some(settings));
    let (status, reply) = t.admin("PUT", "/v1/plugins/stamp", &content_type, body).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    let (_, plugin) = call(&t, "GET", "/v1/plugins/stamp", Some(TOKEN), "").await;
    assert_eq!(plugin["timeout_ms"], 2500);
    assert_eq!(plugin["allowed_hosts"], json!(["api.resend.com"]));
    assert_eq!(plugin["publishes"], json!(["stamp.done", "audit.#"]));
    let event = json!({ "pattern": "stamp.it", "data": {}, "id": "configured" }).to_string();
    call(&t, "POST", "/v1/events", Some(TOKEN), &event).await;
    assert_eq!(t.doc("stamp", "stamped", "configured").unwrap()["label"], "blue");
    let stored = std::fs::read_to_string(t.dir.path().join("plugins/stamp.json")).unwrap();
    let path = std::env::var("PATH").unwrap();
    assert!(
        stored.contains("\"env\": \"PATH\"") && !stored.contains(&path),
        "the registry keeps the reference: {stored}"
    );

    // A swap without config values keeps the running ones.
    let (status, _) = put(&t, "/v1/plugins/stamp", wasm("stamp_v1.wasm")).await;
    assert_eq!(status, StatusCode::OK);
    let event = json!({ "pattern": "stamp.it", "data": {}, "id": "kept" }).to_string();
    call(&t, "POST", "/v1/events", Some(TOKEN), &event).await;
    assert_eq!(t.doc("stamp", "stamped", "kept").unwrap()["label"], "blue");
    let (_, plugin) = call(&t, "GET", "/v1/plugins/stamp", Some(TOKEN), "").await;
    assert_eq!(plugin["allowed_hosts"], json!(["api.resend.com"]), "a swap keeps the granted hosts");
    assert_eq!(plugin["publishes"], json!(["stamp.done", "audit.#"]), "a swap keeps the publish allow-list");

    let cases = [
        (
            Some(r#"{"config": {"key": {"env": "SWITCHYARD_SURELY_UNSET_VARIABLE"}}}"#),
            "config value key: environment variable SWITCHYARD_SURELY_UNSET_VARIABLE is not set",
        ),
        (Some(r#"{"colour": "blue"}"#), "settings part: unknown field `colour`"),
        (
            Some(r#"{"allowed_hosts": ["https://api.resend.com"]}"#),
            "allowed host \"https://api.resend.com\": give a host",
        ),
        (Some(r#"{"publishes": ["a..b"]}"#), "publishes: "),
        (Some("{not json"), "settings part: key must be a string"),
    ];
    for (settings, message) in cases {
        let (content_type, body) = multipart(wasm("stamp_v2.wasm"), settings);
        let (status, reply) = t.admin("PUT", "/v1/plugins/stamp", &content_type, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{reply}");
        let text = error_message(&reply);
        assert!(text.starts_with(message), "{text}");
    }
    let (status, reply) = t.admin("PUT", "/v1/plugins/stamp?config=x", "application/wasm", wasm("stamp_v2.wasm")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{reply}");
    assert_eq!(reply["error"]["code"], "bad_request", "query errors have the one error shape: {reply}");
    let (_, plugin) = call(&t, "GET", "/v1/plugins/stamp", Some(TOKEN), "").await;
    assert_eq!(plugin["version"], "1.0.0", "refused uploads changed nothing");
}

#[tokio::test]
async fn dead_letters_are_listed_replayed_with_their_ids_and_discarded() {
    let toml = "[router]\ndata_dir = \"{data_dir}\"\nlog = \"warn\"\n".to_string()
        + &plugin_table("misbehave", "misbehave.wasm", "ordering_key = [\"key\"]\n[plugin.retry]\nmax_attempts = 1\n");
    let t = TestRouter::start(&toml).await;
    let t = &t;
    let post = |body: Value| async move { call(t, "POST", "/v1/events", Some(TOKEN), &body.to_string()).await };
    let seq = |n: u32| json!({ "pattern": "chaos.seq", "data": { "key": "z", "seq": n }, "id": format!("z-{n}") });
    // z-2 arrives before z-1: rejected as out of order, and kept.
    assert_eq!(post(seq(2)).await.0, StatusCode::OK);
    assert_eq!(post(json!({ "pattern": "chaos.reject", "data": {}, "id": "r-1" })).await.0, StatusCode::OK);
    t.router.bus.as_ref().unwrap().publish_bytes(b"{broken".to_vec()).await;

    let (status, first) = call(t, "GET", "/v1/plugins/misbehave/dead-letters?limit=1", Some(TOKEN), "").await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let letter = &first["dead_letters"][0];
    assert_eq!((letter["event_id"].as_str(), letter["attempts"].as_u64()), (Some("z-2"), Some(1)));
    assert_eq!(letter["reason"], "handler rejected the event: out of order: z got 2 after 0");
    assert_eq!(serde_json::from_str::<Value>(letter["body"].as_str().unwrap()).unwrap(), seq(2));
    assert_eq!(letter["transport"]["origin"], "http");
    let next = format!("/v1/plugins/misbehave/dead-letters?limit=1&cursor={}", first["next_cursor"]);
    let (_, second) = call(t, "GET", &next, Some(TOKEN), "").await;
    assert_eq!(second["dead_letters"][0]["event_id"], "r-1");
    assert_eq!(second["next_cursor"], Value::Null);
    let (_, undecodable) = call(t, "GET", "/v1/plugins/bus/dead-letters", Some(TOKEN), "").await;
    assert_eq!(undecodable["dead_letters"][0]["body"], "{broken", "undecodable messages are kept under their source");
    assert_eq!(undecodable["dead_letters"][0]["event_id"], Value::Null);

    // Once z-1 is in, replaying z-2 succeeds, under its original id.
    assert_eq!(post(seq(1)).await.0, StatusCode::OK);
    let ids = json!({ "ids": [letter["id"]] }).to_string();
    let (status, replayed) = call(t, "POST", "/v1/plugins/misbehave/dead-letters/replay", Some(TOKEN), &ids).await;
    assert_eq!((status, replayed["replayed"].as_u64()), (StatusCode::OK, Some(1)), "{replayed}");
    eventually("the replayed event", Duration::from_secs(10), || {
        t.doc("misbehave", "seq", "z").filter(|d| d["seq"] == 2)
    })
    .await;
    assert!(t.router.readers.processed("misbehave", "z-2").unwrap(), "it ran as z-2");
    let (_, left) = call(t, "GET", "/v1/plugins/misbehave/dead-letters", Some(TOKEN), "").await;
    let left: Vec<&str> =
        left["dead_letters"].as_array().unwrap().iter().map(|l| l["event_id"].as_str().unwrap()).collect();
    assert_eq!(left, ["r-1"]);

    let (status, _) = call(t, "POST", "/v1/plugins/bus/dead-letters/replay", Some(TOKEN), "").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "only a running plugin replays");
    let (status, _) = call(t, "POST", "/v1/plugins/misbehave/dead-letters/replay", Some(TOKEN), "{\"ids\": 3}").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (_, metrics) = call(t, "GET", "/metrics", Some(TOKEN), "").await;
    assert!(metrics.as_str().unwrap().contains("switchyard_dead_letters{plugin=\"misbehave\"} 1"), "{metrics}");
    let (status, discarded) = call(t, "DELETE", "/v1/plugins/misbehave/dead-letters", Some(TOKEN), "").await;
    assert_eq!((status, discarded["discarded"].as_u64()), (StatusCode::OK, Some(1)));
    let (_, none) = call(t, "GET", "/v1/plugins/misbehave/dead-letters", Some(TOKEN), "").await;
    assert_eq!(none["dead_letters"], json!([]));
    let (_, metrics) = call(t, "GET", "/metrics", Some(TOKEN), "").await;
    assert!(metrics.as_str().unwrap().contains("switchyard_dead_letters{plugin=\"misbehave\"} 0"), "{metrics}");
}
