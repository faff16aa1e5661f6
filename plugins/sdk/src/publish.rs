//! Publishing typed events. What is published goes to the router's outbox in the same
//! transaction as the invocation's store writes, and out only after that commits.

use serde::Serialize;

use crate::bindings::switchyard::plugin::publish::{Outgoing as WitOutgoing, publish as publish_raw};
use crate::bindings::switchyard::plugin::types::Header;
use crate::error::{Error, Result};

/// Publish `payload` as event `name` after commit; returns the id the event will carry.
/// The name must be in the plugin's `publishes` allow-list.
pub fn publish<T: Serialize + ?Sized>(name: &str, payload: &T) -> Result<String> {
    Outgoing::new(name, payload)?.send()
}

/// An event to publish with more than a name and a payload.
#[derive(Debug, Clone)]
pub struct Outgoing {
    name: String,
    payload: Vec<u8>,
    key: Option<String>,
    headers: Vec<(String, String)>,
    delay_ms: Option<u64>,
}

impl Outgoing {
    pub fn new<T: Serialize + ?Sized>(name: &str, payload: &T) -> Result<Self> {
        let payload =
            serde_json::to_vec(payload).map_err(|e| Error::Reject(format!("cannot encode the {name} payload: {e}")))?;
        Ok(Outgoing { name: name.into(), payload, key: None, headers: Vec::new(), delay_ms: None })
    }

    /// The ordering key, carried as the `x-key` header.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Deliver no earlier than `ms` milliseconds after commit (timeouts, reminders).
    pub fn delay_ms(mut self, ms: u64) -> Self {
        self.delay_ms = Some(ms);
        self
    }

    /// Queue the event; returns the id it will carry.
    pub fn send(self) -> Result<String> {
        let event = WitOutgoing {
            name: self.name,
            payload: self.payload,
            key: self.key,
            headers: self.headers.into_iter().map(|(name, value)| Header { name, value }).collect(),
            delay_ms: self.delay_ms,
        };
        Ok(publish_raw(&event)?)
    }
}
