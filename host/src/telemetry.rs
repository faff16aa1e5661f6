//! Logging: `tracing` to stderr, filtered by `RUST_LOG` or the config's `router.log`.

use tracing_subscriber::EnvFilter;

/// Install the global subscriber; later calls are no-ops.
pub fn init(default_filter: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}
