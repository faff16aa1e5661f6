//! The `config` import: the plugin's own `[plugin.config]` values, secrets included.

use crate::runtime::bindings::switchyard::plugin::config::Host;
use crate::runtime::state::HostState;

impl Host for HostState {
    fn get(&mut self, name: String) -> Option<String> {
        self.plugin.config.get(&name).map(|v| v.expose().to_string())
    }
}
