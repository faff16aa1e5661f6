//! What a plugin may do, one module per import of the WIT world. Each capability works on
//! the [`Invocation`] under way; its effects are committed by [`crate::commit`] only if the
//! handler succeeds.

pub mod config;
pub mod http;
pub mod log;
pub mod publish;
pub mod store;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use crate::commit::{Effects, OutboxRow};
use crate::config::{AllowedHost, Secret};
use crate::db::Readers;
use crate::event::Event;
use crate::route::Subscriptions;

/// What stays the same for every invocation of one loaded plugin version.
pub struct PluginContext {
    pub name: Arc<str>,
    pub readers: Readers,
    /// (collection, field) pairs the plugin declared as indexed.
    pub indexes: HashSet<(String, String)>,
    pub config: BTreeMap<String, Secret>,
    /// Hosts the plugin may reach over `wasi:http`.
    pub allowed_hosts: Arc<[AllowedHost]>,
    /// Event names the plugin may publish.
    pub publishes: Subscriptions,
}

/// The capability state of one invocation: what the handler read, wrote and published.
pub struct Invocation {
    pub event_id: String,
    /// The event's name, for the plugin's log lines.
    pub event_name: String,
    /// The correlation id events published by this invocation carry.
    pub correlation_id: String,
    pub store: store::Session,
    pub outbox: Vec<OutboxRow>,
    /// Why a capability refused a call that fails the whole invocation (a publish outside
    /// the allow-list), whatever the handler returns.
    pub refused: Option<String>,
    /// Whether the handler called the store, `publish` or outbound HTTP. One that called
    /// none of them (logging and config aside) computed nothing but from the event: it has
    /// nothing to commit, not even a processed-marker.
    pub reached_out: bool,
}

impl Invocation {
    pub fn new(plugin: &PluginContext, event: &Event) -> Self {
        Invocation {
            event_id: event.id.0.clone(),
            event_name: event.name.clone(),
            // A flow's first event starts the correlation with its own id.
            correlation_id: event.correlation_id.clone().unwrap_or_else(|| event.id.0.clone()),
            store: store::Session::new(plugin.name.clone(), plugin.readers.clone()),
            outbox: Vec::new(),
            refused: None,
            reached_out: false,
        }
    }

    /// The effects to commit; `None` when the handler reached no capability with effects or
    /// state (see [`reached_out`](Self::reached_out)).
    pub fn into_effects(self) -> Option<Effects> {
        if !self.reached_out {
            return None;
        }
        let (reads, writes) = self.store.into_parts();
        Some(Effects { reads, writes, outbox: self.outbox })
    }
}
