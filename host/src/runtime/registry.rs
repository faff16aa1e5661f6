//! The durable registry: plugins loaded over the admin API, kept under the data dir (the
//! component's bytes and the settings it was loaded with) so they come back after a restart,
//! with the version each one replaced, so that a rollback works after a restart too.
//! A registry entry wins over the `router.toml` entry of the same name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{ConfigValue, InstancePolicy, Limits, PluginName, RetryPolicy};

/// Settings given with an upload, stored beside its bytes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StoredSettings {
    pub subscriptions: Option<Vec<String>>,
    pub ordering_key: Option<Vec<String>>,
    /// Absent in entries written before it was kept: the configured value stays.
    #[serde(default)]
    pub concurrency: Option<usize>,
    /// Absent: the configured prefetch (or the router-wide one) stays.
    #[serde(default)]
    pub prefetch: Option<u16>,
    pub instances: InstancePolicy,
    pub recycle_after: u64,
    pub limits: Limits,
    #[serde(default)]
    pub retry: Option<RetryPolicy>,
    /// Config values as given: `{ "env": "NAME" }` is kept as the reference, never the secret.
    #[serde(default)]
    pub config: Option<BTreeMap<String, ConfigValue>>,
    #[serde(default)]
    pub allowed_hosts: Option<Vec<String>>,
    #[serde(default)]
    pub publishes: Option<Vec<String>>,
}

/// A kept or uploaded setting that does not parse.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error(transparent)]
    Pattern(#[from] crate::route::PatternError),
    #[error("{0}")]
    Host(String),
}

impl From<String> for SettingsError {
    fn from(why: String) -> Self {
        SettingsError::Host(why)
    }
}

/// One version of a plugin as the registry keeps it.
pub struct Entry {
    pub bytes: Vec<u8>,
    pub settings: StoredSettings,
}

/// Which of a plugin's kept versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    /// The version that runs.
    Current,
    /// The version the current one replaced, for rollback.
    Previous,
}

/// The registry directory.
#[derive(Clone)]
pub struct Registry {
    dir: PathBuf,
}

impl Registry {
    pub fn new(data_dir: &Path) -> Self {
        Registry { dir: data_dir.join("plugins") }
    }

    fn paths(&self, name: &str, which: Which) -> (PathBuf, PathBuf) {
        // Plugin names have no `.`, so `x.previous` never collides with a name.
        let stem = match which {
            Which::Current => name.to_string(),
            Which::Previous => format!("{name}.previous"),
        };
        (self.dir.join(format!("{stem}.wasm")), self.dir.join(format!("{stem}.json")))
    }

    /// Keep `current` as the running version of a plugin and `previous` as the one it
    /// replaced. Each file is written to a temporary file and renamed, so a crash leaves the
    /// old file or the new one, never half of one.
    pub fn save(&self, name: &str, current: &Entry, previous: Option<&Entry>) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        if let Some(previous) = previous {
            self.write(name, Which::Previous, previous)?;
        }
        self.write(name, Which::Current, current)
    }

    fn write(&self, name: &str, which: Which, entry: &Entry) -> std::io::Result<()> {
        let (wasm, json) = self.paths(name, which);
        let text = serde_json::to_vec_pretty(&entry.settings).map_err(std::io::Error::other)?;
        for (path, content) in [(&wasm, entry.bytes.as_slice()), (&json, text.as_slice())] {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, content)?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, path)?;
        }
        Ok(())
    }

    /// A kept version of a plugin, if there is one.
    pub fn load(&self, name: &str, which: Which) -> std::io::Result<Option<Entry>> {
        let (wasm, json) = self.paths(name, which);
        if !wasm.is_file() || !json.is_file() {
            return Ok(None);
        }
        let settings = serde_json::from_slice(&std::fs::read(&json)?).map_err(std::io::Error::other)?;
        Ok(Some(Entry { bytes: std::fs::read(&wasm)?, settings }))
    }

    /// Forget a plugin, both versions.
    pub fn remove(&self, name: &str) -> std::io::Result<()> {
        for which in [Which::Current, Which::Previous] {
            for path in <[PathBuf; 2]>::from(self.paths(name, which)) {
                match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// The plugins with a running version in the registry, by name.
    pub fn names(&self) -> std::io::Result<Vec<PluginName>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut names = Vec::new();
        for entry in entries {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "wasm")
                && let Some(stem) = path.file_stem().and_then(|s| s.to_str())
                && let Ok(name) = PluginName::parse(stem)
                && self.paths(name.as_str(), Which::Current).1.is_file()
            {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(bytes: &[u8]) -> Entry {
        let settings = StoredSettings {
            subscriptions: Some(vec!["a.b".into()]),
            ordering_key: None,
            concurrency: Some(2),
            prefetch: Some(32),
            instances: InstancePolicy::Reuse,
            recycle_after: 10,
            limits: Limits::default(),
            retry: None,
            config: None,
            allowed_hosts: None,
            publishes: None,
        };
        Entry { bytes: bytes.to_vec(), settings }
    }

    #[test]
    fn keeps_the_running_and_the_replaced_version_and_forgets_both() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::new(dir.path());
        assert!(registry.names().unwrap().is_empty());
        registry.save("alpha", &entry(b"v1"), None).unwrap();
        registry.save("alpha", &entry(b"v2"), Some(&entry(b"v1"))).unwrap();
        registry.save("beta", &entry(b"b1"), None).unwrap();
        let names: Vec<String> = registry.names().unwrap().iter().map(|n| n.to_string()).collect();
        assert_eq!(names, ["alpha", "beta"]);
        assert_eq!(registry.load("alpha", Which::Current).unwrap().unwrap().bytes, b"v2");
        assert_eq!(registry.load("alpha", Which::Previous).unwrap().unwrap().bytes, b"v1");
        assert!(registry.load("beta", Which::Previous).unwrap().is_none());
        registry.remove("alpha").unwrap();
        assert!(registry.load("alpha", Which::Current).unwrap().is_none());
        assert!(registry.load("alpha", Which::Previous).unwrap().is_none());
        assert_eq!(registry.names().unwrap().len(), 1);
    }

    #[test]
    fn entries_written_before_concurrency_retry_and_prefetch_were_kept_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::new(dir.path());
        std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
        std::fs::write(dir.path().join("plugins/old.wasm"), b"x").unwrap();
        let old = r#"{"subscriptions":null,"ordering_key":null,"instances":"reuse","recycle_after":5,"limits":{"memory_mb":8,"timeout_ms":100}}"#;
        std::fs::write(dir.path().join("plugins/old.json"), old).unwrap();
        let loaded = registry.load("old", Which::Current).unwrap().unwrap();
        let s = &loaded.settings;
        assert_eq!((s.concurrency, s.retry, s.config.as_ref(), s.prefetch), (None, None, None, None));
    }
}
