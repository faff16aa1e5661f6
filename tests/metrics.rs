//! The Prometheus exporter keeps every histogram sample until something drains it. A router
//! drains them itself, so that one whose `/metrics` nobody scrapes does not grow with every
//! event it handles. Its own test binary, so that no other test's memory moves the RSS it reads.

use std::time::{Duration, Instant};

use switchyard::telemetry::{Counters, Outcome};
use switchyard_bench::memory;

switchyard::global_allocator!();

/// This process's resident memory, in MiB.
fn rss_mib() -> f64 {
    memory::mib("VmRSS").expect("VmRSS in /proc/self/status")
}

#[test]
fn invocation_time_samples_are_drained_without_a_scrape() {
    switchyard::telemetry::prometheus();
    let counters = Counters::default();
    let succeeded = || counters.record("metrics-test", Outcome::Succeeded(Duration::from_micros(3)));
    succeeded();
    let before = rss_mib();
    for _ in 0..4_000_000 {
        succeeded();
    }
    let grown = rss_mib() - before;
    assert!(grown > 20.0, "4,000,000 samples are held until drained, yet the RSS grew by only {grown:.1} MiB");
    // A router goes on handling events meanwhile; so does this loop, a hundred a round.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        (0..100).for_each(|_| succeeded());
        let held = rss_mib() - before;
        if held < grown / 4.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{held:.1} of the {grown:.1} MiB the samples took are still held after a minute without a scrape"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
