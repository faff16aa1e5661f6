//! The durable registry: plugins loaded over the admin API, kept under the data dir (the
//! component's bytes and the settings it was loaded with) so they come back after a restart.
//! A registry entry wins over the `router.toml` entry of the same name.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{InstancePolicy, Limits};

/// Settings given with an upload, stored beside its bytes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StoredSettings {
    pub subscriptions: Option<Vec<String>>,
    pub ordering_key: Option<Vec<String>>,
    pub instances: InstancePolicy,
    pub recycle_after: u64,
    pub limits: Limits,
}

/// A registry entry.
pub struct Entry {
    pub bytes: Vec<u8>,
    pub settings: StoredSettings,
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

    fn paths(&self, name: &str) -> (PathBuf, PathBuf) {
        (self.dir.join(format!("{name}.wasm")), self.dir.join(format!("{name}.json")))
    }

    /// Keep a plugin's bytes and settings; written to temporary files and renamed, so a crash
    /// leaves the old entry or the new one, never half of one.
    pub fn save(&self, name: &str, bytes: &[u8], settings: &StoredSettings) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let (wasm, json) = self.paths(name);
        let text = serde_json::to_vec_pretty(settings).map_err(std::io::Error::other)?;
        for (path, content) in [(&wasm, bytes), (&json, text.as_slice())] {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, content)?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, path)?;
        }
        Ok(())
    }

    /// The entry of a plugin, if one was uploaded.
    pub fn load(&self, name: &str) -> std::io::Result<Option<Entry>> {
        let (wasm, json) = self.paths(name);
        if !wasm.is_file() || !json.is_file() {
            return Ok(None);
        }
        let settings = serde_json::from_slice(&std::fs::read(&json)?).map_err(std::io::Error::other)?;
        Ok(Some(Entry { bytes: std::fs::read(&wasm)?, settings }))
    }
}
