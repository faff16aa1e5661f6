//! The `log` import: plugin log lines go to the router's log, tagged with plugin and event.

use crate::runtime::bindings::switchyard::plugin::log::{Host, Level};
use crate::runtime::state::HostState;

impl Host for HostState {
    fn log(&mut self, level: Level, message: String) {
        let plugin = &*self.plugin.name;
        let event_id = self.invocation.as_ref().map(|i| i.event_id.as_str()).unwrap_or("");
        match level {
            Level::Trace => tracing::trace!(target: "plugin", plugin, event_id, "{message}"),
            Level::Debug => tracing::debug!(target: "plugin", plugin, event_id, "{message}"),
            Level::Info => tracing::info!(target: "plugin", plugin, event_id, "{message}"),
            Level::Warn => tracing::warn!(target: "plugin", plugin, event_id, "{message}"),
            Level::Error => tracing::error!(target: "plugin", plugin, event_id, "{message}"),
        }
    }
}
