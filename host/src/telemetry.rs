//! Logging and metrics: `tracing` to stderr, and per-plugin counters that also feed the
//! Prometheus exporter served on the admin API's `/metrics`.

use std::io::IsTerminal;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

/// Install the global subscriber, logging to stderr, in colour only when stderr is a terminal
/// (a file, journald or `docker logs` gets plain text); later calls are no-ops.
pub fn init(default_filter: &str) {
    install(default_filter, std::io::stderr, std::io::stderr().is_terminal());
}

/// Install the global subscriber the binary installs, logging to `writer` in plain text (the
/// benchmarks log to a file, so that the routers they run pay what the binary's routers pay).
pub fn init_with_writer<W>(default_filter: &str, writer: W)
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    install(default_filter, writer, false);
}

fn install<W>(default_filter: &str, writer: W, ansi: bool)
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer).with_ansi(ansi).try_init();
}

/// How often the histogram samples recorded since the last drain are folded into their
/// summaries. The exporter keeps each sample (about 20 bytes) until then, and only a scrape of
/// `/metrics` drains them otherwise: a router at 40,000 events/s that nobody scrapes grew by
/// about 2.5 GiB an hour.
const METRICS_UPKEEP: Duration = Duration::from_secs(5);

/// The process-wide Prometheus recorder, installed on first use with a thread that drains its
/// histograms every `METRICS_UPKEEP` (5 s).
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (an embedding application's): then
        // `/metrics` shows only what this handle saw, which is nothing; say so once.
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
        }
        let upkeep = handle.clone();
        let started = std::thread::Builder::new().name("switchyard-metrics".into()).spawn(move || {
            loop {
                std::thread::sleep(METRICS_UPKEEP);
                upkeep.run_upkeep();
            }
        });
        if let Err(e) = started {
            tracing::warn!(error = %e, "cannot start the metrics upkeep; histograms are drained only by scrapes");
        }
        handle
    })
}

/// What happened to one event in one plugin.
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    /// Taken from a source for this plugin.
    Consumed,
    /// Handled and committed, after this long in the handler.
    Succeeded(Duration),
    /// Its id was already processed: acknowledged without running.
    Duplicate,
    /// A failed attempt that will be retried.
    Retried,
    /// Rejected by the handler (dead-lettered at once).
    Rejected,
    /// Kept as a dead letter (after a reject or the last attempt).
    DeadLettered,
}

/// Running totals of one plugin, also exported as `switchyard_events_total{plugin, outcome}`.
#[derive(Debug, Default)]
pub struct Counters {
    consumed: AtomicU64,
    succeeded: AtomicU64,
    duplicates: AtomicU64,
    retried: AtomicU64,
    rejected: AtomicU64,
    dead_lettered: AtomicU64,
    /// The exported series, registered on first use so that no event pays for the lookup.
    exported: OnceLock<Exported>,
}

#[derive(Debug)]
struct Exported {
    consumed: metrics::Counter,
    succeeded: metrics::Counter,
    duplicates: metrics::Counter,
    retried: metrics::Counter,
    rejected: metrics::Counter,
    dead_lettered: metrics::Counter,
    invocation_seconds: metrics::Histogram,
}

impl Exported {
    fn new(plugin: &str) -> Self {
        let events = |outcome: &'static str| metrics::counter!("switchyard_events_total", "plugin" => plugin.to_string(), "outcome" => outcome);
        Exported {
            consumed: events("consumed"),
            succeeded: events("succeeded"),
            duplicates: events("duplicate"),
            retried: events("retried"),
            rejected: events("rejected"),
            dead_lettered: events("dead_lettered"),
            invocation_seconds: metrics::histogram!("switchyard_invocation_seconds", "plugin" => plugin.to_string()),
        }
    }
}

/// A copy of a plugin's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct CountersSnapshot {
    pub consumed: u64,
    pub succeeded: u64,
    pub duplicates: u64,
    pub retried: u64,
    pub rejected: u64,
    pub dead_lettered: u64,
}

impl Counters {
    /// Count an outcome of `plugin`, the plugin these counters belong to.
    pub fn record(&self, plugin: &str, outcome: Outcome) {
        let exported = self.exported.get_or_init(|| Exported::new(plugin));
        let (counter, series) = match outcome {
            Outcome::Consumed => (&self.consumed, &exported.consumed),
            Outcome::Succeeded(took) => {
                exported.invocation_seconds.record(took.as_secs_f64());
                (&self.succeeded, &exported.succeeded)
            }
            Outcome::Duplicate => (&self.duplicates, &exported.duplicates),
            Outcome::Retried => (&self.retried, &exported.retried),
            Outcome::Rejected => (&self.rejected, &exported.rejected),
            Outcome::DeadLettered => (&self.dead_lettered, &exported.dead_lettered),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        series.increment(1);
    }

    pub fn snapshot(&self) -> CountersSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CountersSnapshot {
            consumed: get(&self.consumed),
            succeeded: get(&self.succeeded),
            duplicates: get(&self.duplicates),
            retried: get(&self.retried),
            rejected: get(&self.rejected),
            dead_lettered: get(&self.dead_lettered),
        }
    }
}

/// Log capture for unit tests of what a line says.
#[cfg(test)]
pub(crate) mod capture {
    use std::sync::{Arc, Mutex};

    /// A log writer into a shared buffer.
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Capture {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Run `f` under a subscriber at `info`, without colour, and return what it logged.
    pub(crate) fn logged<T>(f: impl FnOnce() -> T) -> (T, String) {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let sink = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || Capture(sink.clone()))
            .with_ansi(false)
            .finish();
        let value = tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8(buffer.lock().unwrap().clone()).unwrap();
        (value, text)
    }
}
