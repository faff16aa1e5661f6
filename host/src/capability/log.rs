//! The `log` import: plugin log lines go to the router's log, tagged with the plugin and the
//! event (its id, name and correlation id), since at `info` no span names the event.

use crate::runtime::bindings::switchyard::plugin::log::{Host, Level};
use crate::runtime::state::HostState;

impl Host for HostState {
    fn log(&mut self, level: Level, message: String) {
        let plugin = &*self.plugin.name;
        let (event_id, name, correlation_id) = self
            .invocation
            .as_ref()
            .map_or(("", "", ""), |i| (i.event_id.as_str(), i.event_name.as_str(), i.correlation_id.as_str()));
        match level {
            Level::Trace => tracing::trace!(target: "plugin", plugin, event_id, name, correlation_id, "{message}"),
            Level::Debug => tracing::debug!(target: "plugin", plugin, event_id, name, correlation_id, "{message}"),
            Level::Info => tracing::info!(target: "plugin", plugin, event_id, name, correlation_id, "{message}"),
            Level::Warn => tracing::warn!(target: "plugin", plugin, event_id, name, correlation_id, "{message}"),
            Level::Error => tracing::error!(target: "plugin", plugin, event_id, name, correlation_id, "{message}"),
        }
    }

    fn enabled(&mut self, level: Level) -> bool {
        match level {
            Level::Trace => tracing::enabled!(target: "plugin", tracing::Level::TRACE),
            Level::Debug => tracing::enabled!(target: "plugin", tracing::Level::DEBUG),
            Level::Info => tracing::enabled!(target: "plugin", tracing::Level::INFO),
            Level::Warn => tracing::enabled!(target: "plugin", tracing::Level::WARN),
            Level::Error => tracing::enabled!(target: "plugin", tracing::Level::ERROR),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashSet};
    use std::sync::Arc;

    use super::*;
    use crate::capability::{Invocation, PluginContext};
    use crate::db::Readers;
    use crate::event::{Event, EventId, Millis};
    use crate::route::Subscriptions;
    use crate::telemetry::capture::logged;

    fn state(dir: &std::path::Path) -> HostState {
        let context = Arc::new(PluginContext {
            name: Arc::from("p"),
            readers: Readers::new(dir),
            indexes: HashSet::new(),
            config: BTreeMap::new(),
            allowed_hosts: Arc::from([]),
            publishes: Subscriptions::default(),
        });
        HostState::new(context, wasmtime::StoreLimits::default())
    }

    fn event(correlation_id: Option<&str>) -> Event {
        Event {
            id: EventId("e-7".into()),
            name: "user.updated".into(),
            source: "test".into(),
            key: None,
            correlation_id: correlation_id.map(str::to_string),
            causation_id: None,
            occurred_at: Millis(0),
            content_type: "application/json".into(),
            headers: vec![],
            payload: b"{}".to_vec(),
        }
    }

    #[test]
    fn a_plugin_line_names_its_plugin_and_event_without_a_span() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = state(dir.path());
        state.invocation = Some(Invocation::new(&state.plugin, &event(Some("c-3"))));
        let ((), log) = logged(|| state.log(Level::Info, "replica updated".into()));
        assert!(log.contains("replica updated") && log.contains("plugin=\"p\""), "{log}");
        assert!(log.contains("event_id=\"e-7\"") && log.contains("name=\"user.updated\""), "{log}");
        assert!(log.contains("correlation_id=\"c-3\""), "{log}");
        let ((), below) = logged(|| state.log(Level::Debug, "not at info".into()));
        assert!(below.is_empty(), "the capture is at info: {below}");
    }

    #[test]
    fn a_plugin_is_told_which_levels_the_router_writes() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = state(dir.path());
        let (levels, _) = logged(|| {
            [Level::Trace, Level::Debug, Level::Info, Level::Warn, Level::Error].map(|level| state.enabled(level))
        });
        assert_eq!(levels, [false, false, true, true, true], "the capture is at info");
    }
}
