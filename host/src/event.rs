//! The event as it travels through the router: decoded from an envelope, routed by name,
//! handed to plugins, and published from their outboxes.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Deserializer;
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

/// Milliseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Millis(pub u64);

impl Millis {
    /// The current wall-clock time.
    pub fn now() -> Self {
        let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        Millis(u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
    }

    /// As a signed integer, which is how SQLite and AMQP headers carry a time: a time past
    /// `i64::MAX` becomes `i64::MAX` instead of wrapping around to a negative one.
    pub fn saturating_i64(self) -> i64 {
        i64::try_from(self.0).unwrap_or(i64::MAX)
    }

    /// From a signed integer: a time before the epoch becomes the epoch.
    pub fn from_i64(ms: i64) -> Millis {
        Millis(u64::try_from(ms).unwrap_or(0))
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
        for path in paths {
            let mut parts = path.split('.');
            let Some(first) = parts.next().and_then(|part| member(&self.payload, part)) else { continue };
            let found = parts.try_fold(first, |raw, part| member(raw.get().as_bytes(), part));
            // Only the member found is parsed into a value, not the whole payload.
            match found.map(|raw| serde_json::from_str(raw.get())) {
                Some(Ok(serde_json::Value::String(s))) => return Some(s),
                Some(Ok(serde_json::Value::Number(n))) => return Some(n.to_string()),
                _ => {}
            }
        }
        self.key.clone()
    }
}

/// Member `name` of the JSON object `json`, unparsed: the last one if the name repeats, as a
/// parsed object would keep it. None if `json` is not a valid JSON object or has no such member.
fn member<'a>(json: &'a [u8], name: &str) -> Option<&'a RawValue> {
    let mut de = serde_json::Deserializer::from_slice(json);
    let found = de.deserialize_map(Member(name)).ok()?;
    de.end().ok()?;
    found
}

/// Finds one member of a JSON object while the others are skipped without being built.
struct Member<'n>(&'n str);

impl<'de> Visitor<'de> for Member<'_> {
    type Value = Option<&'de RawValue>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        while let Some(wanted) = map.next_key_seed(KeyIs(self.0))? {
            if wanted {
                found = Some(map.next_value()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }
}

/// Whether an object's key is the one wanted, compared without copying it.
struct KeyIs<'n>(&'n str);

impl<'de> DeserializeSeed<'de> for KeyIs<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyIs<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<bool, E> {
        Ok(key == self.0)
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
        assert_eq!(event(r#"{"user_id":-1.5e3}"#).ordering_key(&paths).as_deref(), Some("-1500.0"));
    }

    #[test]
    fn ordering_key_reads_the_payload_as_a_parsed_object_would() {
        let paths = vec!["a.b".to_string()];
        let key = |payload: &str| event(payload).ordering_key(&paths);
        assert_eq!(key(r#"{"x":[1,{"b":0}],"a":{"b":"k"}}"#).as_deref(), Some("k"), "other members skipped");
        assert_eq!(key(r#"{"a":{"b":"first"},"a":{"b":"last"}}"#).as_deref(), Some("last"), "repeated: the last");
        assert_eq!(key(r#"{"\u0061":{"b":"escaped"}}"#).as_deref(), Some("escaped"), "escaped keys");
        assert_eq!(key(r#"{"a":{"b":"s\"q"}}"#).as_deref(), Some("s\"q"), "escaped strings");
        assert_eq!(key(r#"{"a":{"b":"k"}} trailing"#).as_deref(), Some("envelope-key"), "invalid JSON");
        assert_eq!(key(r#"{"a":{"b":"k"},"c":[}"#).as_deref(), Some("envelope-key"), "invalid after it");
        assert_eq!(key(r#"{"a":{"b":{"c":1}}}"#).as_deref(), Some("envelope-key"), "an object is no key");
        assert_eq!(key(r#"{"a":{"b":null}}"#).as_deref(), Some("envelope-key"));
        assert_eq!(key(r#"{"a":[{"b":"k"}]}"#).as_deref(), Some("envelope-key"), "arrays are not walked");
        assert_eq!(key(r#"["a"]"#).as_deref(), Some("envelope-key"));
    }

    #[test]
    fn ordering_key_falls_back_to_the_envelope_key() {
        let paths = vec!["orderId".to_string()];
        assert_eq!(event(r#"{"other":1}"#).ordering_key(&paths).as_deref(), Some("envelope-key"));
        assert_eq!(event("not json").ordering_key(&paths).as_deref(), Some("envelope-key"));
        assert_eq!(event(r#"{"orderId":"o1"}"#).ordering_key(&[]).as_deref(), Some("envelope-key"));
    }
}
