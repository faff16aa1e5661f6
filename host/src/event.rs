//! The event as it travels through the router: decoded from an envelope, routed by name,
//! handed to plugins, and published from their outboxes.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Millis(pub u64);

impl Millis {
    /// The current wall-clock time.
    pub fn now() -> Self {
        let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        Millis(u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
    }
}

/// A text header carried with an event (AMQP headers, CloudEvents extensions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub value: String,
}

impl Header {
    pub fn new(name: impl Into<String>, value: impl Into<String>) -> Self {
        Header { name: name.into(), value: value.into() }
    }
}

/// An event id; the router deduplicates on (plugin, id).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventId(pub String);

impl EventId {
    /// A fresh, time-ordered id for an event the router creates.
    pub fn generate() -> Self {
        EventId(uuid::Uuid::now_v7().to_string())
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A decoded event, independent of the envelope and broker it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub id: EventId,
    /// Event name, e.g. `user.updated`; routing is by this name.
    pub name: String,
    pub source: String,
    /// An ordering key the envelope itself carried (CloudEvents `partitionkey`, `x-key`).
    pub key: Option<String>,
    pub correlation_id: Option<String>,
    pub causation_id: Option<String>,
    pub occurred_at: Millis,
    pub content_type: String,
    pub headers: Vec<Header>,
    /// The event's data; JSON unless `content_type` says otherwise.
    pub payload: Vec<u8>,
}

impl Event {
    /// The ordering key for a plugin: the first of `paths` (dotted, into the JSON payload)
    /// that holds a string or a number, else the key the envelope carried.
    pub fn ordering_key(&self, paths: &[String]) -> Option<String> {
        if !paths.is_empty()
            && let Ok(payload) = serde_json::from_slice::<serde_json::Value>(&self.payload)
        {
            for path in paths {
                let found = path.split('.').try_fold(&payload, |value, part| value.get(part));
                match found {
                    Some(serde_json::Value::String(s)) => return Some(s.clone()),
                    Some(serde_json::Value::Number(n)) => return Some(n.to_string()),
                    _ => {}
                }
            }
        }
        self.key.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(payload: &str) -> Event {
        Event {
            id: EventId("1".into()),
            name: "user.updated".into(),
            source: "test".into(),
            key: Some("envelope-key".into()),
            correlation_id: None,
            causation_id: None,
            occurred_at: Millis(0),
            content_type: "application/json".into(),
            headers: vec![],
            payload: payload.as_bytes().to_vec(),
        }
    }

    #[test]
    fn ordering_key_tries_paths_in_order() {
        let paths = vec!["user.user_id".to_string(), "user_id".to_string()];
        assert_eq!(event(r#"{"user":{"user_id":"u1"}}"#).ordering_key(&paths).as_deref(), Some("u1"));
        assert_eq!(event(r#"{"user_id":"u2"}"#).ordering_key(&paths).as_deref(), Some("u2"));
        assert_eq!(event(r#"{"user_id":42}"#).ordering_key(&paths).as_deref(), Some("42"));
    }

    #[test]
    fn ordering_key_falls_back_to_the_envelope_key() {
        let paths = vec!["orderId".to_string()];
        assert_eq!(event(r#"{"other":1}"#).ordering_key(&paths).as_deref(), Some("envelope-key"));
        assert_eq!(event("not json").ordering_key(&paths).as_deref(), Some("envelope-key"));
        assert_eq!(event(r#"{"orderId":"o1"}"#).ordering_key(&[]).as_deref(), Some("envelope-key"));
    }
}
