//! The `publish` import: events go to the invocation's outbox rows, committed with its store
//! writes and sent by [`crate::outbox`] after the commit.

use serde_json::value::RawValue;

use crate::commit::OutboxRow;
use crate::event::EventId;
use crate::runtime::bindings::switchyard::plugin::publish::{Host, Outgoing, PublishError};
use crate::runtime::state::HostState;

impl Host for HostState {
    fn publish(&mut self, event: Outgoing) -> Result<String, PublishError> {
        let source = self.plugin.name.to_string();
        let Some(invocation) = self.invocation.as_mut() else {
            return Err(PublishError::Invalid("publish is only available while handling an event".into()));
        };
        invocation.reached_out = true;
        validate_name(&event.name).map_err(PublishError::Invalid)?;
        if !self.plugin.publishes.matches(&event.name) {
            let reason = format!(
                "plugin {source} may not publish {:?}: the name is not in its publish allow-list (`publishes` {:?})",
                event.name,
                self.plugin.publishes.0.iter().map(|p| p.as_str()).collect::<Vec<_>>()
            );
            invocation.refused.get_or_insert_with(|| reason.clone());
            return Err(PublishError::Invalid(reason));
        }
        let payload =
            std::str::from_utf8(&event.payload).map_err(|_| PublishError::Invalid("payload is not UTF-8".into()))?;
        serde_json::from_str::<&RawValue>(payload)
            .map_err(|e| PublishError::Invalid(format!("payload is not JSON: {e}")))?;
        let headers: Vec<[&str; 2]> = event.headers.iter().map(|h| [h.name.as_str(), h.value.as_str()]).collect();
        let id = EventId::generate().0;
        invocation.outbox.push(OutboxRow {
            id: id.clone(),
            name: event.name,
            source,
            key: event.key,
            correlation_id: Some(invocation.correlation_id.clone()),
            causation_id: Some(invocation.event_id.clone()),
            headers: serde_json::to_string(&headers).unwrap_or_else(|_| "[]".into()),
            payload: event.payload,
            delay_ms: event.delay_ms.unwrap_or(0),
        });
        Ok(id)
    }
}

/// An event name is a non-empty routing key without wildcards.
fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 255 {
        return Err(format!("event name must be 1 to 255 bytes, got {}", name.len()));
    }
    if name.contains(['*', '#']) {
        return Err(format!("event name {name:?} contains a wildcard"));
    }
    if name.split('.').any(str::is_empty) {
        return Err(format!("event name {name:?} has an empty word"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_are_routing_keys_without_wildcards() {
        assert!(super::validate_name("order.created").is_ok());
        assert!(super::validate_name("").is_err());
        assert!(super::validate_name("order.*").is_err());
        assert!(super::validate_name("order..x").is_err());
    }
}
