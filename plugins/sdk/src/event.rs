//! The event a handler receives, with its payload decoded on demand into the handler's types.

use serde::de::DeserializeOwned;

use crate::bindings::switchyard::plugin::types::Event as WitEvent;
use crate::error::{Error, Result};

/// One event, as the router hands it to the plugin (see `record event` in the WIT file).
#[derive(Debug, Clone)]
pub struct Event {
    /// Unique id; the router runs a handler at most once per id with committed effects.
    pub id: String,
    /// Event name, e.g. `post.created`.
    pub name: String,
    /// Who produced it: the CloudEvents source, a plugin's name, or the transport.
    pub source: String,
    /// The ordering key the router found in the payload, if any.
    pub key: Option<String>,
    pub correlation_id: Option<String>,
    pub causation_id: Option<String>,
    /// Milliseconds since the Unix epoch: when the event happened.
    pub occurred_at: u64,
    /// 1 on the first delivery, then one more on every retry.
    pub attempt: u32,
    /// Transport headers and envelope extensions, as (name, value).
    pub headers: Vec<(String, String)>,
    /// The JSON payload, UTF-8.
    pub payload: Vec<u8>,
}

impl Event {
    /// The payload decoded as `T`; a payload that does not fit rejects the event, naming it.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.payload).map_err(|e| Error::Reject(format!("invalid {} payload: {e}", self.name)))
    }

    /// The first header called `name` (ASCII case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

impl From<WitEvent> for Event {
    fn from(event: WitEvent) -> Self {
        Event {
            id: event.id,
            name: event.name,
            source: event.source,
            key: event.key,
            correlation_id: event.correlation_id,
            causation_id: event.causation_id,
            occurred_at: event.occurred_at,
            attempt: event.attempt,
            headers: event.headers.into_iter().map(|h| (h.name, h.value)).collect(),
            payload: event.payload,
        }
    }
}
