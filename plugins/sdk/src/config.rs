//! The plugin's configuration values (`[plugin.config]` in `router.toml`, or the upload's
//! settings), including secrets the router read from its environment.

use crate::bindings::switchyard::plugin::config::get as get_raw;
use crate::error::{Error, Result};

/// The value configured under `name`, or none.
pub fn get(name: &str) -> Option<String> {
    get_raw(name)
}

/// The value configured under `name`; its absence rejects the event, naming the key, so the
/// event waits in the dead letters until the configuration is fixed and it is replayed.
pub fn require(name: &str) -> Result<String> {
    get_raw(name).ok_or_else(|| Error::Reject(format!("config value {name:?} is not set for this plugin")))
}

/// The value configured under `name` parsed as `T` (a number, say), or `default` when it is
/// not set; a value that does not parse rejects the event, naming the key.
pub fn parse_or<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
    match get_raw(name) {
        None => Ok(default),
        Some(text) => text.trim().parse().map_err(|_| {
            Error::Reject(format!("config value {name:?} is {text:?}, not a {}", std::any::type_name::<T>()))
        }),
    }
}
