//! What a plugin says about itself, built step by step instead of as a WIT record.

use crate::bindings::switchyard::plugin::types::{Index, Metadata as WitMetadata};

/// A plugin's metadata: name, version, subscriptions, ordering key and indexed fields.
/// `router.toml` and the admin API can override the subscriptions and the ordering key.
#[derive(Debug, Clone)]
pub struct Metadata {
    name: String,
    version: String,
    subscriptions: Vec<String>,
    ordering_key: Vec<String>,
    indexes: Vec<(String, String)>,
}

impl Metadata {
    /// `name`: lowercase ASCII letters, digits and `-`; `version`: usually
    /// `env!("CARGO_PKG_VERSION")`.
    pub fn new(name: &str, version: &str) -> Self {
        Metadata {
            name: name.into(),
            version: version.into(),
            subscriptions: Vec::new(),
            ordering_key: Vec::new(),
            indexes: Vec::new(),
        }
    }

    /// Event-name patterns to handle: `*` matches one word, `#` zero or more.
    pub fn subscribe<'a>(mut self, patterns: impl IntoIterator<Item = &'a str>) -> Self {
        self.subscriptions.extend(patterns.into_iter().map(String::from));
        self
    }

    /// Dotted payload paths tried in order for the ordering key; events with the same key
    /// are handled one at a time, in order.
    pub fn ordering_key<'a>(mut self, paths: impl IntoIterator<Item = &'a str>) -> Self {
        self.ordering_key.extend(paths.into_iter().map(String::from));
        self
    }

    /// Index the top-level `field` of `collection`'s documents, for
    /// [`Collection::find_by`](crate::Collection::find_by).
    pub fn index(mut self, collection: &str, field: &str) -> Self {
        self.indexes.push((collection.into(), field.into()));
        self
    }

    /// The WIT record this becomes.
    pub fn into_wit(self) -> WitMetadata {
        WitMetadata {
            name: self.name,
            version: self.version,
            subscriptions: self.subscriptions,
            ordering_key: self.ordering_key,
            indexes: self.indexes.into_iter().map(|(collection, field)| Index { collection, field }).collect(),
        }
    }
}
