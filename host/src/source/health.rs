//! Whether a source is consuming, and if not, why. `/v1/ready` answers with it, the
//! `switchyard_source_connected` gauge shows it, and a plugin change waits only for the
//! sources that are up. The reason is the error that ended the source's last session or kept
//! the next from starting, or what keeps some of its consumers from running while the others
//! do, so that an operator sees a refused declaration or a wrong password without reading the
//! log.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// The state of one source, or of one of its consumers.
#[derive(Debug, Default)]
pub struct Health {
    /// Its session runs: a plugin change waits for it to follow.
    up: AtomicBool,
    /// Why it is not ready: why it is down, or, while it is up, why some of its consumers do
    /// not run. `None` before the first attempt has ended either way.
    why: Mutex<Option<String>>,
}

/// What [`Health::why_not_ready`] says of a source whose first attempt is under way.
pub const CONNECTING: &str = "connecting";

impl Health {
    /// Consuming: every consumer of the session running.
    pub fn up(&self) {
        self.up.store(true, Ordering::SeqCst);
        *self.reason() = None;
    }

    /// The session runs, but some consumers do not, because of `why`.
    pub fn partly_up(&self, why: impl ToString) {
        *self.reason() = Some(why.to_string());
        self.up.store(true, Ordering::SeqCst);
    }

    /// Not consuming, because of `why`.
    pub fn down(&self, why: impl ToString) {
        *self.reason() = Some(why.to_string());
        self.up.store(false, Ordering::SeqCst);
    }

    /// Whether its session runs, whole or in part.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }

    /// Why it is not ready (down, or up in part); `None` while every consumer runs.
    pub fn why_not_ready(&self) -> Option<String> {
        let why = self.reason().clone();
        why.or_else(|| (!self.is_up()).then(|| CONNECTING.to_string()))
    }

    /// Ready when every part is; down for the first part's reason otherwise.
    pub fn gather<'a>(&self, mut parts: impl Iterator<Item = &'a Arc<Health>>) {
        match parts.find_map(|part| part.why_not_ready()) {
            None => self.up(),
            Some(why) => self.down(why),
        }
    }

    fn reason(&self) -> MutexGuard<'_, Option<String>> {
        // The guarded value is a plain string: a panic elsewhere cannot leave it half-written.
        self.why.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A source of the router, by name.
#[derive(Debug, Clone)]
pub struct SourceHealth {
    pub source: &'static str,
    pub health: Arc<Health>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn down_says_why_until_up_again() {
        let health = Health::default();
        assert_eq!(health.why_not_ready().as_deref(), Some(CONNECTING), "before the first attempt ends");
        health.down("connection refused");
        assert!(!health.is_up());
        assert_eq!(health.why_not_ready().as_deref(), Some("connection refused"));
        health.up();
        assert!(health.is_up());
        assert_eq!(health.why_not_ready(), None);
        health.down("the broker closed the consumer");
        assert_eq!(health.why_not_ready().as_deref(), Some("the broker closed the consumer"), "the newest reason");
    }

    #[test]
    fn partly_up_is_up_for_plugin_changes_and_not_ready() {
        let health = Health::default();
        health.partly_up("plugin stamp: its queue exists with other arguments");
        assert!(health.is_up(), "its session runs: plugin changes wait for it");
        assert_eq!(health.why_not_ready().as_deref(), Some("plugin stamp: its queue exists with other arguments"));
        health.up();
        assert_eq!(health.why_not_ready(), None);
    }

    #[test]
    fn a_source_of_parts_is_up_when_every_part_is() {
        let parts: Vec<Arc<Health>> = (0..3).map(|_| Arc::new(Health::default())).collect();
        let whole = Health::default();
        parts.iter().for_each(|p| p.up());
        whole.gather(parts.iter());
        assert_eq!(whole.why_not_ready(), None);
        parts[1].down("stream orders: WRONGTYPE");
        parts[2].down("pub/sub: connection refused");
        whole.gather(parts.iter());
        assert_eq!(whole.why_not_ready().as_deref(), Some("stream orders: WRONGTYPE"), "the first part down");
        whole.gather(std::iter::empty());
        assert!(whole.is_up(), "no parts: nothing to wait for");
    }
}
