//! The runtime against real plugin components on the in-process bus: limits, retries,
//! instance policies, publishing, deduplication, refused plugin files, a plugin of the contract's
//! first release, and plugins' log lines.

use std::sync::Mutex;
use std::time::Duration;

use switchyard::config::Config;
use switchyard::event::Millis;
use switchyard::router::Router;
use switchyard_tests::{TestRouter, eventually, plugin_table};
use tracing_subscriber::fmt::MakeWriter;

const SETTLE: Duration = Duration::from_secs(30);

fn config(plugins: &str) -> String {
    format!("[router]\ndata_dir = \"{{data_dir}}\"\nlog = \"warn\"\n{plugins}")
}

async fn publish(t: &TestRouter, line: &str) {
    t.router.bus.as_ref().expect("bus mode").publish_bytes(line.as_bytes().to_vec()).await;
}

async fn settle(t: &TestRouter) {
    eventually("the router to settle", SETTLE, || t.router.is_idle().then_some(())).await;
}

fn seen(t: &TestRouter, name: &str) -> Vec<serde_json::Value> {
    t.router
        .readers
        .scan("misbehave", "seen", "", 1000)
        .unwrap()
        .into_iter()
        .map(|r| serde_json::from_str::<serde_json::Value>(&r.body).unwrap())
        .filter(|d| d["name"] == name)
        .collect()
}

#[tokio::test]
async fn retry_errors_are_retried_with_the_attempt_then_dead_lettered() {
    let t = TestRouter::start(&config(&plugin_table(
        "misbehave",
        "misbehave.wasm",
        "[plugin.retry]\nmax_attempts = 3\ninitial_backoff_ms = 5\n",
    )))
    .await;
    publish(&t, r#"{"pattern":"chaos.retry","data":{}}"#).await;
    publish(&t, r#"{"pattern":"chaos.reject","data":{}}"#).await;
    settle(&t).await;
    let letters = t.router.readers.dead_letters("misbehave", 0, 10).unwrap();
    let retry = letters.iter().find(|d| d.name.as_deref() == Some("chaos.retry")).expect("retry dead-lettered");
    assert_eq!(retry.attempts, 3);
    assert!(retry.reason.contains("asked to retry"), "{}", retry.reason);
    let reject = letters.iter().find(|d| d.name.as_deref() == Some("chaos.reject")).expect("reject dead-lettered");
    assert_eq!(reject.attempts, 1, "a reject is not retried");
    assert!(reject.reason.contains("asked to reject"), "{}", reject.reason);
}

async fn counts(policy: &str) -> Vec<u64> {
    let extra = format!("concurrency = 1\ninstances = \"{policy}\"\n");
    let t = TestRouter::start(&config(&plugin_table("misbehave", "misbehave.wasm", &extra))).await;
    let mut counts = Vec::new();
    for i in 0..3 {
        publish(&t, &format!(r#"{{"pattern":"chaos.count","data":{{}},"id":"count-{i}"}}"#)).await;
        settle(&t).await;
        counts.push(t.doc("misbehave", "seen", &format!("count-{i}")).expect("counted")["count"].as_u64().unwrap());
    }
    counts
}

#[tokio::test]
async fn instance_policy_decides_what_survives_between_events() {
    assert_eq!(counts("reuse").await, [1, 2, 3], "a reused instance keeps its globals");
    assert_eq!(counts("fresh").await, [1, 1, 1], "a fresh instance per event keeps nothing");
}

#[tokio::test]
async fn published_events_carry_causation_correlation_and_source() {
    let t =
        TestRouter::start(&config(&plugin_table("misbehave", "misbehave.wasm", "publishes = [\"chaos.published\"]\n")))
            .await;
    publish(&t, r#"{"pattern":"chaos.publish","data":{},"id":"cause-1"}"#).await;
    settle(&t).await;
    let published = seen(&t, "chaos.published");
    assert_eq!(published.len(), 1, "{published:?}");
    assert_eq!(published[0]["causation_id"], "cause-1");
    assert_eq!(published[0]["correlation_id"], "cause-1", "a flow's first event starts the correlation");
    assert_eq!(published[0]["source"], "misbehave");
}

#[tokio::test]
async fn a_refused_publish_fails_the_invocation_even_when_the_handler_ignores_it() {
    let t =
        TestRouter::start(&config(&plugin_table("misbehave", "misbehave.wasm", "publishes = [\"chaos.published\"]\n")))
            .await;
    publish(&t, r#"{"pattern":"chaos.sneak","data":{},"id":"sneak-1"}"#).await;
    settle(&t).await;
    let letters = t.router.readers.dead_letters("misbehave", 0, 10).unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert!(
        letters[0].reason.contains("may not publish \"chaos.forbidden\"")
            && letters[0].reason.contains("[\"chaos.published\"]"),
        "{}",
        letters[0].reason
    );
    assert!(t.doc("misbehave", "seen", "sneak-1").is_none(), "nothing of the invocation committed");
    assert!(seen(&t, "chaos.published").is_empty(), "not even the allowed publish");
    assert_eq!(t.router.readers.outbox_backlog().unwrap(), 0);
}

#[tokio::test]
async fn a_repeated_event_id_runs_the_handler_once() {
    let t = TestRouter::start(&config(&plugin_table(
        "misbehave",
        "misbehave.wasm",
        "publishes = [\"chaos.published\"]\nconcurrency = 4\n",
    )))
    .await;
    for _ in 0..3 {
        publish(&t, r#"{"pattern":"chaos.publish","data":{},"id":"same-id"}"#).await;
        settle(&t).await;
    }
    assert_eq!(seen(&t, "chaos.publish").len(), 1);
    assert_eq!(seen(&t, "chaos.published").len(), 1, "effects (the published event) applied once");
}

#[tokio::test]
async fn a_start_that_fails_half_way_leaves_a_parked_event_to_the_next_start() {
    let retry = "[plugin.retry]\nmax_attempts = 3\ninitial_backoff_ms = 8000\nmultiplier = 1.0\njitter = 0.0\n";
    let misbehave = plugin_table("misbehave", "misbehave.wasm", retry);
    let t = TestRouter::start(&config(&misbehave)).await;
    publish(&t, r#"{"pattern":"chaos.seq","data":{"key":"k","seq":1,"fail_attempts":1},"id":"parked"}"#).await;
    let parked = |readers: &switchyard::db::Readers| readers.due_parked("misbehave", Millis(u64::MAX), 10).unwrap();
    let due = eventually("the event to be parked", SETTLE, || parked(&t.router.readers).pop()).await.deliver_at;
    let dir = t.stop().await;

    // The next start installs misbehave, then fails on a file that is not a component, before
    // the parked event is due.
    let not_wasm = dir.path().join("not.wasm");
    std::fs::write(&not_wasm, b"definitely not wasm").unwrap();
    let broken = format!("[[plugin]]\nname = \"broken\"\npath = \"{}\"\n", not_wasm.display());
    let text = config(&format!("{misbehave}{broken}")).replace("{data_dir}", &dir.path().display().to_string());
    let cfg = Config::from_toml(&text, &dir.path().join("router.toml"), &|_| None).unwrap();
    let err = format!("{:#}", Router::start(cfg).await.err().expect("must fail"));
    assert!(err.contains("loading plugin broken"), "{err}");
    assert!(Millis::now().0 < due.0, "the failed start must end before the event is due; raise the backoff");

    // Past its due time nothing ran it: the plugin that start installed ended with it.
    tokio::time::sleep(Duration::from_millis(due.0.saturating_sub(Millis::now().0) + 2_000)).await;
    let readers = switchyard::commit::Writer::start(dir.path(), &Default::default()).unwrap().readers();
    assert_eq!(parked(&readers).len(), 1, "still parked");
    assert!(readers.get("misbehave", "seq", "k").unwrap().is_none(), "not handled");
    drop(readers);

    let t = TestRouter::start_in(&config(&misbehave), dir).await;
    eventually("the next start to handle it", SETTLE, || t.doc("misbehave", "seq", "k")).await;
    settle(&t).await;
    assert!(parked(&t.router.readers).is_empty());
}

#[tokio::test]
async fn plugin_files_that_cannot_run_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let not_wasm = dir.path().join("not.wasm");
    std::fs::write(&not_wasm, b"definitely not wasm").unwrap();
    let toml = format!(
        "[router]\ndata_dir = \"{}\"\n[[plugin]]\nname = \"broken\"\npath = \"{}\"\n",
        dir.path().display(),
        not_wasm.display()
    );
    let cfg = Config::from_toml(&toml, &dir.path().join("router.toml"), &|_| None).unwrap();
    let err = format!("{:#}", Router::start(cfg).await.err().expect("must fail"));
    assert!(err.contains("loading plugin broken") && err.contains("not a WebAssembly component"), "{err}");

    let toml = config(&plugin_table("wrong-name", "misbehave.wasm", ""))
        .replace("{data_dir}", &dir.path().display().to_string());
    let cfg = Config::from_toml(&toml, &dir.path().join("router.toml"), &|_| None).unwrap();
    let err = format!("{:#}", Router::start(cfg).await.err().expect("must fail"));
    assert!(err.contains("\"wrong-name\" but the component says it is \"misbehave\""), "{err}");
}

#[tokio::test]
async fn a_plugin_built_against_the_first_contract_release_still_runs() {
    let plugins = plugin_table("contract-0-1-0", "contract_0_1_0.wasm", "") + &plugin_table("noop", "noop.wasm", "");
    let t = TestRouter::start(&config(&plugins)).await;
    publish(&t, r#"{"pattern":"compat.ping","data":{},"id":"old-1"}"#).await;
    settle(&t).await;
    let stored = t.doc("contract-0-1-0", "seen", "old-1").expect("a 0.1.0 plugin's store write committed");
    assert_eq!(stored["name"], "compat.ping");
    assert!(t.router.readers.dead_letters("contract-0-1-0", 0, 10).unwrap().is_empty());
    // The admin API tells which contract each plugin was built against.
    let contract = async |name: &str| t.admin("GET", &format!("/v1/plugins/{name}"), "application/json", "").await;
    let (status, old) = contract("contract-0-1-0").await;
    assert_eq!((status, old["contract"].as_str()), (axum::http::StatusCode::OK, Some("0.1.0")), "{old}");
    let (_, current) = contract("noop").await;
    assert_eq!(current["contract"], "0.1.1", "noop is built against wit/: {current}");
}

/// The router's log in this process, kept in memory, filtered as a router logging at `warn`
/// with plugins' lines at `info` (installed once: the subscriber is the process's).
fn plugin_log() -> String {
    static LOG: Mutex<Vec<u8>> = Mutex::new(Vec::new());
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| switchyard::telemetry::init_with_writer("warn,plugin=info", || LOG.make_writer()));
    String::from_utf8_lossy(&LOG.lock().unwrap()).into_owned()
}

#[tokio::test]
async fn the_sdks_log_macros_write_the_lines_the_routers_filter_lets_through() {
    plugin_log(); // the first call installs the subscriber
    let t = TestRouter::start(&config(&plugin_table("user-catalog", "user_catalog.wasm", ""))).await;
    // The first event logs `catalogs/log-41 created` at debug; the second, the same user
    // again, `catalog of user log-41 exists: kept` at info.
    for id in ["log-1", "log-2"] {
        let event = format!(
            r#"{{"pattern":"user.created","data":{{"id":"log-41","username":"ana","email":"ana@mail.test"}},"id":"{id}"}}"#
        );
        publish(&t, &event).await;
        settle(&t).await;
    }
    assert!(t.doc("user-catalog", "catalogs", "log-41").is_some(), "the catalog was created");
    let lines = plugin_log();
    let kept: Vec<&str> = lines.lines().filter(|l| l.contains("catalog of user log-41 exists: kept")).collect();
    assert_eq!(kept.len(), 1, "{lines}");
    assert!(kept[0].contains("INFO") && kept[0].contains("event_id=\"log-2\""), "{}", kept[0]);
    assert!(!lines.contains("catalogs/log-41 created"), "a debug line below the filter: {lines}");
}
