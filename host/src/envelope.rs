//! Envelopes: how real producers wrap events on the wire, decoded into [`Event`]s and encoded
//! back for the outbox.
//!
//! Accepted, in this order of detection:
//! 1. CloudEvents 1.0 structured mode: content type `application/cloudevents+json`, or a JSON
//!    object with `specversion`, `id`, `type` and `source`;
//! 2. CloudEvents binary mode: `type` in a `cloudEvents:`, `cloudEvents_`, `ce-` or `ce_`
//!    header, the body is the data;
//! 3. NestJS `{"pattern": ..., "data": ...}` (optionally with `id`); an object pattern is named
//!    by its JSON text with sorted keys, as NestJS does;
//! 4. raw JSON, named by the `x-event-name` header or else the routing key.
//!
//! Bodies must be UTF-8 JSON: invalid UTF-8 or JSON is an error (dead-lettered), never
//! repaired. A duplicated object key keeps its last value, as Node's parser does.

use base64::Engine as _;
use serde_json::value::RawValue;
use std::borrow::{Borrow, Cow};
use std::collections::BTreeMap;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::event::{Event, EventId, Header, Millis};

/// The content type of a structured-mode CloudEvent.
pub const CLOUDEVENTS_JSON: &str = "application/cloudevents+json";
/// The content type of every payload the router decodes from JSON.
pub const JSON: &str = "application/json";
/// Header naming a raw JSON event when the routing key cannot (e.g. on an ingress queue).
pub const NAME_HEADER: &str = "x-event-name";
/// Header carrying an ordering key.
pub const KEY_HEADER: &str = "x-key";
/// Header carrying the correlation id when the transport has no property for it.
pub const CORRELATION_HEADER: &str = "x-correlation-id";
/// Header carrying the causation id.
pub const CAUSATION_HEADER: &str = "x-causation-id";
/// Header naming the producer when the envelope cannot (NestJS, raw JSON).
pub const SOURCE_HEADER: &str = "x-source";
/// Header carrying occurred-at in milliseconds, stamped by the router on ingress.
pub const OCCURRED_AT_HEADER: &str = "x-occurred-at";

/// A header value as a transport carries it.
#[derive(Debug, Clone, PartialEq)]
pub enum HeaderValue {
    Text(String),
    Integer(i64),
    /// An AMQP timestamp: seconds since the epoch.
    Timestamp(u64),
    Boolean(bool),
}

impl std::fmt::Display for HeaderValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.as_text())
    }
}

impl HeaderValue {
    /// A time as the router's own headers carry it ([`OCCURRED_AT_HEADER`]): milliseconds.
    pub fn time(at: Millis) -> HeaderValue {
        HeaderValue::Integer(at.saturating_i64())
    }

    fn as_text(&self) -> String {
        match self {
            HeaderValue::Text(s) => s.clone(),
            HeaderValue::Integer(i) => i.to_string(),
            HeaderValue::Timestamp(t) => t.to_string(),
            HeaderValue::Boolean(b) => b.to_string(),
        }
    }
}

/// What the envelope decoder needs to know about how a message travelled.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Transport {
    /// AMQP routing key, Redis channel or stream name.
    pub routing_key: String,
    /// Where the message came from, e.g. `amqp:switchyard.events`; the event's source
    /// unless the envelope names one.
    pub origin: String,
    pub content_type: Option<String>,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    /// AMQP `timestamp` property, in seconds.
    pub timestamp: Option<u64>,
    pub headers: Vec<(String, HeaderValue)>,
    /// When the router received the message; occurred-at when nothing better is known.
    pub received_at: Millis,
}

impl Transport {
    fn header(&self, name: &str) -> Option<&HeaderValue> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v)
    }

    fn header_text(&self, name: &str) -> Option<String> {
        self.header(name).map(HeaderValue::as_text).filter(|s| !s.is_empty())
    }
}

/// Why a message could not be decoded into an event. The message is dead-lettered with this
/// reason.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("body is not valid UTF-8 at byte {0}")]
    NotUtf8(usize),
    #[error("body is not JSON: {0}")]
    NotJson(String),
    #[error("CloudEvent is missing required attribute `{0}`")]
    MissingAttribute(&'static str),
    #[error("CloudEvent attribute `{attribute}` is invalid: {reason}")]
    InvalidAttribute { attribute: &'static str, reason: String },
    #[error("unsupported CloudEvents specversion {0:?} (1.0 is supported)")]
    SpecVersion(String),
    #[error("NestJS envelope has an invalid pattern: {0}")]
    InvalidPattern(String),
    #[error("raw JSON message has no event name: no `x-event-name` header and no routing key")]
    NoName,
}

/// A JSON object's members, their values unparsed. A repeated key keeps its last value.
type Members<'a> = BTreeMap<Key<'a>, &'a RawValue>;

/// A member's name: borrowed from the body unless it holds escapes, since every message
/// of a JSON envelope is looked up by its members' names.
#[derive(serde::Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(transparent)]
struct Key<'a>(#[serde(borrow)] Cow<'a, str>);

impl Key<'_> {
    fn as_str(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for Key<'_> {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// Which envelope a message used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Envelope {
    CloudEventsStructured,
    CloudEventsBinary,
    NestJs,
    Raw,
}

/// A decoded message.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub envelope: Envelope,
    pub event: Event,
    /// False when the message carried no id and the event's is its [`content_id`].
    pub id_carried: bool,
}

/// Decode one message. A message that carries no id gets [`content_id`].
pub fn decode(body: &[u8], transport: &Transport) -> Result<Decoded, DecodeError> {
    let (envelope, event, id_carried) = decode_event(body, transport)?;
    Ok(Decoded { envelope, event, id_carried })
}

/// The envelope, the event, and whether the message carried the event's id.
fn decode_event(body: &[u8], transport: &Transport) -> Result<(Envelope, Event, bool), DecodeError> {
    let text = std::str::from_utf8(body).map_err(|e| DecodeError::NotUtf8(e.valid_up_to()))?;
    if let Some(ty) = binary_ce_attribute(transport, "type") {
        if ty.as_text().is_empty() {
            return Err(DecodeError::MissingAttribute("type"));
        }
        serde_json::from_str::<&RawValue>(text).map_err(|e| DecodeError::NotJson(e.to_string()))?;
        return decode_binary_cloudevent(ty, body, transport).map(|e| (Envelope::CloudEventsBinary, e, true));
    }
    let structured_ce = transport.content_type.as_deref().is_some_and(|ct| ct.starts_with(CLOUDEVENTS_JSON));
    let members = match serde_json::from_str::<Members>(text) {
        Ok(members) => Some(members),
        Err(_) => {
            // Not an object: either invalid JSON or a raw non-object payload.
            serde_json::from_str::<&RawValue>(text).map_err(|e| DecodeError::NotJson(e.to_string()))?;
            None
        }
    };
    match members {
        Some(m) if structured_ce || is_structured_cloudevent(&m) => {
            decode_structured_cloudevent(&m, transport).map(|e| (Envelope::CloudEventsStructured, e, true))
        }
        Some(m) if is_nestjs(&m) => {
            decode_nestjs(&m, body, transport).map(|(e, carried)| (Envelope::NestJs, e, carried))
        }
        _ => decode_raw(body, transport).map(|(e, carried)| (Envelope::Raw, e, carried)),
    }
}

/// The id given to a message that carries none: a digest of its name and bytes.
///
/// Byte-identical messages without ids are therefore one event to the deduplication. Producers
/// that send the same bytes twice meaning two events must give them ids (AMQP `message_id`,
/// an `id` member, CloudEvents `id`), or send them through an ingress queue, which assigns ids.
pub fn content_id(name: &str, body: &[u8]) -> EventId {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    hasher.update(name.as_bytes());
    hasher.update([0]);
    hasher.update(body);
    let digest = hasher.finalize();
    let mut first = [0u8; 16];
    first.copy_from_slice(&digest[..16]);
    // One number formatted, not sixteen bytes: this runs for every message without an id.
    EventId(format!("sha256:{:032x}", u128::from_be_bytes(first)))
}

fn is_structured_cloudevent(m: &Members) -> bool {
    ["specversion", "id", "type", "source"].iter().all(|k| m.contains_key(*k))
}

fn is_nestjs(m: &Members) -> bool {
    m.contains_key("pattern") && m.keys().all(|k| matches!(k.as_str(), "pattern" | "data" | "id"))
}

fn string_member(m: &Members, name: &'static str) -> Result<Option<String>, DecodeError> {
    match m.get(name) {
        None => Ok(None),
        Some(raw) if raw.get() == "null" => Ok(None),
        Some(raw) => serde_json::from_str::<String>(raw.get())
            .map(Some)
            .map_err(|_| DecodeError::InvalidAttribute { attribute: name, reason: "must be a string".into() }),
    }
}

fn required(m: &Members, name: &'static str) -> Result<String, DecodeError> {
    string_member(m, name)?.filter(|s| !s.is_empty()).ok_or(DecodeError::MissingAttribute(name))
}

fn decode_structured_cloudevent(m: &Members, transport: &Transport) -> Result<Event, DecodeError> {
    let spec = required(m, "specversion")?;
    if spec != "1.0" {
        return Err(DecodeError::SpecVersion(spec));
    }
    let occurred_at = match m.get("time") {
        Some(raw) if raw.get() != "null" => parse_time_json(raw.get())?,
        _ => fallback_time(transport),
    };
    let (payload, content_type) = if let Some(b64) = string_member(m, "data_base64")? {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64.as_bytes())
            .map_err(|e| DecodeError::InvalidAttribute { attribute: "data_base64", reason: e.to_string() })?;
        let ct = string_member(m, "datacontenttype")?.unwrap_or_else(|| "application/octet-stream".into());
        (bytes, ct)
    } else {
        let data = m.get("data").map(|raw| raw.get()).unwrap_or("null");
        (data.as_bytes().to_vec(), JSON.to_string())
    };
    let mut headers = Vec::new();
    for (name, raw) in m {
        let known = matches!(
            name.as_str(),
            "specversion"
                | "id"
                | "type"
                | "source"
                | "time"
                | "data"
                | "data_base64"
                | "datacontenttype"
                | "partitionkey"
                | "correlationid"
                | "causationid"
        );
        if !known && let Ok(value) = serde_json::from_str::<serde_json::Value>(raw.get()) {
            let text = match value {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            headers.push(Header::new(name.0.to_string(), text));
        }
    }
    Ok(Event {
        id: EventId(required(m, "id")?),
        name: required(m, "type")?,
        source: required(m, "source")?,
        key: string_member(m, "partitionkey")?.or_else(|| transport.header_text(KEY_HEADER)),
        correlation_id: string_member(m, "correlationid")?.or_else(|| transport_correlation(transport)),
        causation_id: string_member(m, "causationid")?.or_else(|| transport.header_text(CAUSATION_HEADER)),
        occurred_at,
        content_type,
        headers,
        payload,
    })
}

/// The header prefixes CloudEvents binary mode uses in the wild: the AMQP binding, the Python
/// SDK, and the Knative RabbitMQ binding (and its underscore variant).
const CE_PREFIXES: [&str; 4] = ["cloudEvents:", "cloudEvents_", "ce-", "ce_"];

fn binary_ce_attribute<'t>(transport: &'t Transport, attribute: &str) -> Option<&'t HeaderValue> {
    transport.headers.iter().find_map(|(name, value)| {
        CE_PREFIXES
            .iter()
            .any(|p| {
                name.len() == p.len() + attribute.len()
                    && name[..p.len()].eq_ignore_ascii_case(p)
                    && name[p.len()..].eq_ignore_ascii_case(attribute)
            })
            .then_some(value)
    })
}

fn binary_text(transport: &Transport, attribute: &'static str) -> Option<String> {
    binary_ce_attribute(transport, attribute).map(HeaderValue::as_text).filter(|s| !s.is_empty())
}

fn decode_binary_cloudevent(ty: &HeaderValue, body: &[u8], transport: &Transport) -> Result<Event, DecodeError> {
    if let Some(spec) = binary_text(transport, "specversion")
        && spec != "1.0"
    {
        return Err(DecodeError::SpecVersion(spec));
    }
    let occurred_at = match binary_ce_attribute(transport, "time") {
        Some(HeaderValue::Text(s)) => parse_rfc3339(s)?,
        // The Python SDK sends epoch milliseconds as an int64.
        Some(HeaderValue::Integer(ms)) => Millis::from_i64(*ms),
        Some(HeaderValue::Timestamp(secs)) => Millis(secs.saturating_mul(1000)),
        Some(HeaderValue::Boolean(_)) => {
            return Err(DecodeError::InvalidAttribute { attribute: "time", reason: "is a boolean".into() });
        }
        None => fallback_time(transport),
    };
    let headers = transport
        .headers
        .iter()
        .filter(|(name, _)| {
            !CE_PREFIXES.iter().any(|p| name.len() > p.len() && name[..p.len()].eq_ignore_ascii_case(p))
        })
        .map(|(name, value)| Header::new(name.clone(), value.as_text()))
        .collect();
    Ok(Event {
        id: EventId(binary_text(transport, "id").ok_or(DecodeError::MissingAttribute("id"))?),
        name: ty.as_text(),
        source: binary_text(transport, "source").ok_or(DecodeError::MissingAttribute("source"))?,
        key: binary_text(transport, "partitionkey").or_else(|| transport.header_text(KEY_HEADER)),
        correlation_id: binary_text(transport, "correlationid").or_else(|| transport_correlation(transport)),
        causation_id: binary_text(transport, "causationid").or_else(|| transport.header_text(CAUSATION_HEADER)),
        occurred_at,
        content_type: JSON.to_string(),
        headers,
        payload: body.to_vec(),
    })
}

fn decode_nestjs(m: &Members, body: &[u8], transport: &Transport) -> Result<(Event, bool), DecodeError> {
    let pattern = m.get("pattern").map(|raw| raw.get()).unwrap_or("null");
    // Most patterns are strings: they are read as one before anything else is tried.
    let name = match serde_json::from_str::<String>(pattern) {
        Ok(s) if !s.is_empty() => s,
        // NestJS routes object patterns by their JSON text with keys sorted.
        Err(_) if let Ok(v @ serde_json::Value::Object(_)) = serde_json::from_str(pattern) => v.to_string(),
        _ => {
            return Err(DecodeError::InvalidPattern(format!(
                "expected a non-empty string or an object, got {pattern}"
            )));
        }
    };
    let data = m.get("data").map(|raw| raw.get()).unwrap_or("null");
    let carried = transport
        .message_id
        .clone()
        .filter(|s| !s.is_empty())
        .or(string_member(m, "id").ok().flatten().filter(|s| !s.is_empty()));
    let (id, carried) = carried_or_content_id(carried, &name, body);
    Ok((event_from_transport(id, name, data.as_bytes().to_vec(), transport), carried))
}

fn decode_raw(body: &[u8], transport: &Transport) -> Result<(Event, bool), DecodeError> {
    let name = transport
        .header_text(NAME_HEADER)
        .or_else(|| Some(transport.routing_key.clone()).filter(|k| !k.is_empty()))
        .ok_or(DecodeError::NoName)?;
    let (id, carried) = carried_or_content_id(transport.message_id.clone().filter(|s| !s.is_empty()), &name, body);
    Ok((event_from_transport(id, name, body.to_vec(), transport), carried))
}

/// The id the message carried, or else its [`content_id`]; and whether it was carried.
fn carried_or_content_id(carried: Option<String>, name: &str, body: &[u8]) -> (EventId, bool) {
    match carried {
        Some(id) => (EventId(id), true),
        None => (content_id(name, body), false),
    }
}

fn event_from_transport(id: EventId, name: String, payload: Vec<u8>, transport: &Transport) -> Event {
    Event {
        id,
        name,
        source: transport.header_text(SOURCE_HEADER).unwrap_or_else(|| transport.origin.clone()),
        key: transport.header_text(KEY_HEADER),
        correlation_id: transport_correlation(transport),
        causation_id: transport.header_text(CAUSATION_HEADER),
        occurred_at: fallback_time(transport),
        content_type: JSON.to_string(),
        headers: transport.headers.iter().map(|(n, v)| Header::new(n.clone(), v.as_text())).collect(),
        payload,
    }
}

fn transport_correlation(transport: &Transport) -> Option<String> {
    transport.correlation_id.clone().filter(|s| !s.is_empty()).or_else(|| transport.header_text(CORRELATION_HEADER))
}

/// Occurred-at when the envelope has no time: the router's ingress stamp, the AMQP timestamp,
/// or the moment of receipt.
fn fallback_time(transport: &Transport) -> Millis {
    match transport.header(OCCURRED_AT_HEADER) {
        Some(HeaderValue::Integer(ms)) if *ms >= 0 => return Millis(*ms as u64),
        Some(HeaderValue::Text(s)) => {
            if let Ok(ms) = s.parse::<u64>() {
                return Millis(ms);
            }
        }
        _ => {}
    }
    transport.timestamp.map(|s| Millis(s.saturating_mul(1000))).unwrap_or(transport.received_at)
}

fn parse_time_json(raw: &str) -> Result<Millis, DecodeError> {
    match serde_json::from_str::<serde_json::Value>(raw) {
        Ok(serde_json::Value::String(s)) => parse_rfc3339(&s),
        Ok(serde_json::Value::Number(n)) if n.as_u64().is_some() => Ok(Millis(n.as_u64().unwrap_or(0))),
        _ => Err(DecodeError::InvalidAttribute {
            attribute: "time",
            reason: format!("expected an RFC 3339 string, got {raw}"),
        }),
    }
}

fn parse_rfc3339(s: &str) -> Result<Millis, DecodeError> {
    let t = OffsetDateTime::parse(s, &Rfc3339)
        .map_err(|e| DecodeError::InvalidAttribute { attribute: "time", reason: format!("{s:?}: {e}") })?;
    let ms = t.unix_timestamp_nanos() / 1_000_000;
    Ok(Millis(u64::try_from(ms).unwrap_or(0)))
}

/// Format milliseconds since the epoch as RFC 3339 (CloudEvents `time`).
pub fn format_rfc3339(at: Millis) -> String {
    let nanos = i128::from(at.0) * 1_000_000;
    OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".into())
}

/// How the outbox relay writes events for the services around the router.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SinkFormat {
    /// `{"pattern": name, "data": payload}`, consumed unchanged by NestJS services.
    #[default]
    Nestjs,
    /// CloudEvents 1.0 structured mode (`application/cloudevents+json`).
    Cloudevents,
}

/// An event encoded for a broker: the body and its content type. Ids, correlation and
/// causation also travel as transport properties and headers (see [`crate::outbox`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub body: Vec<u8>,
    pub content_type: &'static str,
}

/// Encode an event the router publishes. The payload must be JSON (checked at publish time);
/// it is copied into the envelope byte for byte, never parsed and re-printed.
pub fn encode(event: &Event, format: SinkFormat) -> Encoded {
    let data = std::str::from_utf8(&event.payload).ok().and_then(|s| serde_json::from_str::<&RawValue>(s).ok());
    let data = data.unwrap_or(RawValue::NULL);
    let body = match format {
        SinkFormat::Nestjs => serde_json::to_vec(&NestJsOut { pattern: &event.name, data }),
        SinkFormat::Cloudevents => serde_json::to_vec(&CloudEventOut {
            specversion: "1.0",
            id: &event.id.0,
            ty: &event.name,
            source: &event.source,
            time: format_rfc3339(event.occurred_at),
            datacontenttype: JSON,
            data,
            correlationid: event.correlation_id.as_deref(),
            causationid: event.causation_id.as_deref(),
            partitionkey: event.key.as_deref(),
        }),
    };
    let content_type = match format {
        SinkFormat::Nestjs => JSON,
        SinkFormat::Cloudevents => CLOUDEVENTS_JSON,
    };
    Encoded { body: body.expect("an envelope of strings and valid JSON serializes"), content_type }
}

/// NestJS's `{pattern, data}`.
#[derive(serde::Serialize)]
struct NestJsOut<'a> {
    pattern: &'a str,
    data: &'a RawValue,
}

/// A structured-mode CloudEvent.
#[derive(serde::Serialize)]
struct CloudEventOut<'a> {
    specversion: &'static str,
    id: &'a str,
    #[serde(rename = "type")]
    ty: &'a str,
    source: &'a str,
    time: String,
    datacontenttype: &'static str,
    data: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    correlationid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    causationid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    partitionkey: Option<&'a str>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transport(routing_key: &str) -> Transport {
        Transport {
            routing_key: routing_key.into(),
            origin: "amqp:test".into(),
            received_at: Millis(1_700_000_000_000),
            ..Default::default()
        }
    }

    fn decoded(body: &str, t: &Transport) -> (Envelope, Event) {
        let d = decode(body.as_bytes(), t).expect("decodes");
        (d.envelope, d.event)
    }

    #[test]
    fn nestjs_envelope_names_by_pattern_and_carries_data() {
        let (kind, e) =
            decoded(r#"{"pattern":"user.updated","data":{"user":{"user_id":"u1"}}}"#, &transport("riff_queue"));
        assert_eq!(kind, Envelope::NestJs);
        assert_eq!(e.name, "user.updated");
        assert_eq!(e.payload, br#"{"user":{"user_id":"u1"}}"#);
        assert_eq!(e.source, "amqp:test");
        assert_eq!(e.occurred_at, Millis(1_700_000_000_000));
        assert!(e.id.0.starts_with("sha256:"));
        assert!(!decode(br#"{"pattern":"a","data":1}"#, &transport("q")).unwrap().id_carried);
        assert!(decode(br#"{"pattern":"a","data":1,"id":"x"}"#, &transport("q")).unwrap().id_carried);
        assert!(decode(br#"{"pattern":"a","data":1,"id":"sha256:x"}"#, &transport("q")).unwrap().id_carried);
    }

    #[test]
    fn a_content_id_is_the_same_in_every_release() {
        // Markers of events without ids are keyed by this value: changing it would run again,
        // after an upgrade, every such message the broker redelivers.
        let id = content_id("user.updated", br#"{"id":7}"#);
        assert_eq!(id.0, "sha256:3536b97aa7404f1726421f8cf2109957");
    }

    #[test]
    fn nestjs_object_pattern_is_named_by_sorted_json() {
        let (_, e) = decoded(r#"{"pattern":{"cmd":"sum","b":1},"data":null}"#, &transport("q"));
        assert_eq!(e.name, r#"{"b":1,"cmd":"sum"}"#);
        assert_eq!(e.payload, b"null");
    }

    #[test]
    fn nestjs_id_comes_from_message_id_then_envelope() {
        let mut t = transport("q");
        let (_, e) = decoded(r#"{"pattern":"a","data":1,"id":"env-id"}"#, &t);
        assert_eq!(e.id, EventId("env-id".into()));
        t.message_id = Some("amqp-id".into());
        let (_, e) = decoded(r#"{"pattern":"a","data":1,"id":"env-id"}"#, &t);
        assert_eq!(e.id, EventId("amqp-id".into()));
    }

    #[test]
    fn nestjs_rejects_an_empty_or_numeric_pattern() {
        for body in [r#"{"pattern":"","data":1}"#, r#"{"pattern":5,"data":1}"#] {
            assert!(matches!(decode(body.as_bytes(), &transport("q")), Err(DecodeError::InvalidPattern(_))), "{body}");
        }
    }

    #[test]
    fn structured_cloudevent_is_decoded_with_extensions() {
        let body = r#"{"specversion":"1.0","id":"ce-1","type":"order.created","source":"/orders",
            "time":"2024-05-01T10:00:00.250Z","data":{"orderId":"o1"},"correlationid":"c-9","partitionkey":"o1","tenant":"acme"}"#;
        let (kind, e) = decoded(body, &transport("ignored"));
        assert_eq!(kind, Envelope::CloudEventsStructured);
        assert_eq!(e.id, EventId("ce-1".into()));
        assert_eq!(e.name, "order.created");
        assert_eq!(e.source, "/orders");
        assert_eq!(e.occurred_at, Millis(1_714_557_600_250));
        assert_eq!(e.payload, br#"{"orderId":"o1"}"#);
        assert_eq!(e.correlation_id.as_deref(), Some("c-9"));
        assert_eq!(e.key.as_deref(), Some("o1"));
        assert!(e.headers.contains(&Header::new("tenant", "acme")));
    }

    #[test]
    fn structured_cloudevent_with_base64_data() {
        let mut t = transport("x");
        t.content_type = Some(CLOUDEVENTS_JSON.into());
        let body = r#"{"specversion":"1.0","id":"1","type":"blob","source":"s","data_base64":"aGk=","datacontenttype":"text/plain"}"#;
        let (_, e) = decoded(body, &t);
        assert_eq!(e.payload, b"hi");
        assert_eq!(e.content_type, "text/plain");
    }

    #[test]
    fn structured_cloudevent_errors_name_the_attribute() {
        let mut t = transport("x");
        t.content_type = Some(CLOUDEVENTS_JSON.into());
        let missing = r#"{"specversion":"1.0","type":"a","source":"s"}"#;
        assert_eq!(decode(missing.as_bytes(), &t).unwrap_err(), DecodeError::MissingAttribute("id"));
        let version = r#"{"specversion":"0.3","id":"1","type":"a","source":"s"}"#;
        assert_eq!(decode(version.as_bytes(), &t).unwrap_err(), DecodeError::SpecVersion("0.3".into()));
        let time = r#"{"specversion":"1.0","id":"1","type":"a","source":"s","time":"yesterday"}"#;
        assert!(matches!(decode(time.as_bytes(), &t), Err(DecodeError::InvalidAttribute { attribute: "time", .. })));
    }

    #[test]
    fn binary_cloudevents_in_all_three_header_conventions() {
        let conventions: [(&str, HeaderValue, u64); 3] = [
            ("cloudEvents:", HeaderValue::Text("2024-05-01T10:00:00Z".into()), 1_714_557_600_000),
            ("cloudEvents_", HeaderValue::Integer(1_714_557_600_123), 1_714_557_600_123),
            ("ce-", HeaderValue::Timestamp(1_714_557_600), 1_714_557_600_000),
        ];
        for (prefix, time, expected) in conventions {
            let mut t = transport("rk");
            t.headers = vec![
                (format!("{prefix}specversion"), HeaderValue::Text("1.0".into())),
                (format!("{prefix}id"), HeaderValue::Text("b-1".into())),
                (format!("{prefix}type"), HeaderValue::Text("user.updated".into())),
                (format!("{prefix}source"), HeaderValue::Text("/users".into())),
                (format!("{prefix}time"), time),
                ("other".into(), HeaderValue::Integer(7)),
            ];
            let (kind, e) = decoded(r#"{"user_id":"u"}"#, &t);
            assert_eq!(kind, Envelope::CloudEventsBinary, "{prefix}");
            assert_eq!((e.id.0.as_str(), e.name.as_str(), e.source.as_str()), ("b-1", "user.updated", "/users"));
            assert_eq!(e.occurred_at, Millis(expected), "{prefix}");
            assert_eq!(e.headers, vec![Header::new("other", "7")]);
            assert_eq!(e.payload, br#"{"user_id":"u"}"#);
        }
    }

    #[test]
    fn empty_names_and_ids_are_never_accepted() {
        let mut t = transport("rk");
        t.headers = vec![
            ("ce-type".into(), HeaderValue::Text(String::new())),
            ("ce-id".into(), HeaderValue::Text("1".into())),
            ("ce-source".into(), HeaderValue::Text("s".into())),
        ];
        assert_eq!(decode(b"{}", &t).unwrap_err(), DecodeError::MissingAttribute("type"));
        let (_, e) = decoded(r#"{"pattern":"a","data":1,"id":""}"#, &transport("q"));
        assert!(e.id.0.starts_with("sha256:"), "an empty id is no id: {}", e.id);
    }

    #[test]
    fn raw_json_is_named_by_header_then_routing_key() {
        let (kind, e) = decoded(r#"{"user_id":"u1"}"#, &transport("user.deleted"));
        assert_eq!((kind, e.name.as_str()), (Envelope::Raw, "user.deleted"));
        let mut t = transport("ingress");
        t.headers.push((NAME_HEADER.into(), HeaderValue::Text("user.updated".into())));
        assert_eq!(decoded("[1,2]", &t).1.name, "user.updated");
        assert_eq!(decode(b"{}", &transport("")).unwrap_err(), DecodeError::NoName);
    }

    #[test]
    fn raw_id_is_message_id_or_a_content_digest() {
        let mut t = transport("a.b");
        let first = decoded(r#"{"x":1}"#, &t).1.id;
        assert_eq!(first, decoded(r#"{"x":1}"#, &t).1.id, "same bytes, same id");
        assert_ne!(first, decoded(r#"{"x":2}"#, &t).1.id);
        t.message_id = Some("m-1".into());
        assert_eq!(decoded(r#"{"x":1}"#, &t).1.id, EventId("m-1".into()));
    }

    #[test]
    fn occurred_at_prefers_router_stamp_then_amqp_timestamp() {
        let mut t = transport("a");
        t.timestamp = Some(1_600_000_000);
        assert_eq!(decoded("{}", &t).1.occurred_at, Millis(1_600_000_000_000));
        t.headers.push((OCCURRED_AT_HEADER.into(), HeaderValue::Integer(1_650_000_000_001)));
        assert_eq!(decoded("{}", &t).1.occurred_at, Millis(1_650_000_000_001));
    }

    #[test]
    fn a_time_too_large_for_a_header_is_stamped_as_the_largest_and_read_back_as_itself() {
        let far = Millis(u64::MAX);
        assert_eq!(HeaderValue::time(far), HeaderValue::Integer(i64::MAX));
        let mut t = transport("a");
        t.timestamp = Some(1_600_000_000);
        t.headers.push((OCCURRED_AT_HEADER.into(), HeaderValue::time(far)));
        assert_eq!(decoded("{}", &t).1.occurred_at, Millis(i64::MAX as u64), "not the AMQP timestamp");
    }

    #[test]
    fn invalid_bodies_are_errors_not_repairs() {
        assert_eq!(decode(b"{\"a\":\"\xff\"}", &transport("a")).unwrap_err(), DecodeError::NotUtf8(6));
        assert!(matches!(decode(b"{\"pattern\":", &transport("a")), Err(DecodeError::NotJson(_))));
        assert!(matches!(decode(b"", &transport("a")), Err(DecodeError::NotJson(_))));
    }

    #[test]
    fn duplicated_keys_keep_the_last_value() {
        let (_, e) = decoded(r#"{"pattern":"first","pattern":"second","data":1}"#, &transport("q"));
        assert_eq!(e.name, "second");
    }

    #[test]
    fn member_names_with_escapes_are_the_names_they_spell() {
        let (kind, e) = decoded(r#"{"pat\u0074ern":"user.updated","d\u0061ta":{"id":1}}"#, &transport("q"));
        assert_eq!(
            (kind, e.name.as_str(), e.payload.as_slice()),
            (Envelope::NestJs, "user.updated", &br#"{"id":1}"#[..])
        );
        let body = r#"{"specversion":"1.0","id":"1","type":"t","source":"s","ten\"ant":"acme","\u00e9t\u00e9":"oui"}"#;
        let (_, e) = decoded(body, &transport("q"));
        assert!(e.headers.contains(&Header::new("ten\"ant", "acme")), "{:?}", e.headers);
        assert!(e.headers.contains(&Header::new("été", "oui")), "{:?}", e.headers);
    }

    #[test]
    fn encode_then_decode_round_trips_in_both_formats() {
        let event = Event {
            id: EventId("e-1".into()),
            name: "stock.reserved".into(),
            source: "inventory".into(),
            key: Some("o1".into()),
            correlation_id: Some("c-1".into()),
            causation_id: Some("cause".into()),
            occurred_at: Millis(1_714_557_600_250),
            content_type: JSON.into(),
            headers: vec![],
            payload: br#"{"orderId":"o1"}"#.to_vec(),
        };
        let ce = encode(&event, SinkFormat::Cloudevents);
        let mut t = transport("stock.reserved");
        t.content_type = Some(ce.content_type.into());
        let (_, back) = decoded(std::str::from_utf8(&ce.body).unwrap(), &t);
        assert_eq!(back, event);

        let nest = encode(&event, SinkFormat::Nestjs);
        assert_eq!(nest.body, br#"{"pattern":"stock.reserved","data":{"orderId":"o1"}}"#);
    }
}

/// Property tests: whatever bytes and headers a broker hands over, decoding returns an event or
/// an error, never a panic; and what the outbox encodes decodes back to the same event.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    fn header_value() -> impl Strategy<Value = HeaderValue> {
        prop_oneof![
            any::<String>().prop_map(HeaderValue::Text),
            any::<i64>().prop_map(HeaderValue::Integer),
            any::<u64>().prop_map(HeaderValue::Timestamp),
            any::<bool>().prop_map(HeaderValue::Boolean),
        ]
    }

    fn header_name() -> impl Strategy<Value = String> {
        let prefixes =
            prop_oneof![Just(""), Just("ce-"), Just("ce_"), Just("cloudEvents:"), Just("cloudEvents_"), Just("x-")];
        let attrs = prop_oneof![
            Just("id".to_string()),
            Just("type".to_string()),
            Just("source".to_string()),
            Just("time".to_string()),
            Just("specversion".to_string()),
            Just("event-name".to_string()),
            Just("occurred-at".to_string()),
            "[a-z]{0,8}",
        ];
        (prefixes, attrs).prop_map(|(p, a)| format!("{p}{a}"))
    }

    fn transport() -> impl Strategy<Value = Transport> {
        (
            any::<String>(),
            proptest::option::of(prop_oneof![Just(CLOUDEVENTS_JSON.to_string()), any::<String>()]),
            proptest::option::of(any::<String>()),
            proptest::option::of(any::<u64>()),
            proptest::collection::vec((header_name(), header_value()), 0..6),
        )
            .prop_map(|(routing_key, content_type, message_id, timestamp, headers)| Transport {
                routing_key,
                origin: "fuzz".into(),
                content_type,
                message_id,
                correlation_id: None,
                timestamp,
                headers,
                received_at: Millis(1),
            })
    }

    /// JSON bodies shaped like the envelopes, with members of any type.
    fn json_body() -> impl Strategy<Value = Vec<u8>> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::Bool),
            any::<i64>().prop_map(|i| serde_json::json!(i)),
            any::<f64>().prop_map(|f| serde_json::json!(f)),
            any::<String>().prop_map(serde_json::Value::String),
        ];
        let value = leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
                proptest::collection::btree_map("[a-z_]{0,12}", inner, 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        });
        let key = prop_oneof![
            Just("pattern"),
            Just("data"),
            Just("id"),
            Just("specversion"),
            Just("type"),
            Just("source"),
            Just("time"),
            Just("data_base64"),
            Just("datacontenttype"),
        ];
        proptest::collection::vec((key, value), 0..6).prop_map(|members| {
            let object: serde_json::Map<String, serde_json::Value> =
                members.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            serde_json::Value::Object(object).to_string().into_bytes()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..256), t in transport()) {
            let _ = decode(&body, &t);
        }

        #[test]
        fn envelope_shaped_json_never_panics(body in json_body(), t in transport()) {
            if let Ok(decoded) = decode(&body, &t) {
                prop_assert!(!decoded.event.name.is_empty());
                prop_assert!(!decoded.event.id.0.is_empty());
                // The lane reads the ordering key from the same bytes.
                let _ = decoded.event.ordering_key(&["id".into(), "data.pattern".into(), "type".into()]);
            }
        }

        #[test]
        fn what_the_outbox_encodes_decodes_back(
            name in "[a-z]{1,8}(\\.[a-z]{1,8}){0,3}",
            id in "[a-zA-Z0-9-]{1,36}",
            data in json_body(),
            at in 0u64..4_102_444_800_000,
        ) {
            let event = Event {
                id: EventId(id),
                name: name.clone(),
                source: "plugin".into(),
                key: None,
                correlation_id: Some("c".into()),
                causation_id: Some("cause".into()),
                occurred_at: Millis(at),
                content_type: JSON.into(),
                headers: vec![],
                payload: data,
            };
            let encoded = encode(&event, SinkFormat::Cloudevents);
            let t = Transport { routing_key: name, content_type: Some(encoded.content_type.into()), ..Transport::default() };
            let back = decode(&encoded.body, &t).expect("our own encoding decodes").event;
            prop_assert_eq!(back, event);
        }
    }
}
