//! Whether a source is consuming, and if not, why. `/v1/ready` answers with it, the
//! `switchyard_source_connected` gauge shows it, and a plugin change waits only for the
//! sources that are up. The reason is the error that ended the source's last session or kept
//! the next from starting, or what keeps some of its consumers from running while the others
//! do, so that an operator sees a refused declaration or a wrong password without reading the
//! log. Each reason is kept apart, so that `/v1/ready` can list them for a program as well as
//! join them for a person.

use std::sync::{Arc, Mutex, MutexGuard};

/// The state of one source, or of one of its consumers.
#[derive(Debug, Default)]
pub struct Health(Mutex<State>);

#[derive(Debug, Default, Clone)]
enum State {
    /// The first attempt is under way.
    #[default]
    Connecting,
    /// Consuming: every consumer of the session running.
    Up,
    /// The session runs, but some consumers do not, for these reasons (one or more).
    PartlyUp(Vec<String>),
    /// Not consuming, for these reasons (one or more).
    Down(Vec<String>),
}

/// What [`Health::reasons`] says of a source whose first attempt is under way.
pub const CONNECTING: &str = "connecting";

impl Health {
    /// Consuming: every consumer of the session running.
    pub fn up(&self) {
        *self.state() = State::Up;
    }

    /// The session runs, but some consumers do not, each for one of `reasons`; up when there
    /// are none.
    pub fn partly_up(&self, reasons: Vec<String>) {
        *self.state() = if reasons.is_empty() { State::Up } else { State::PartlyUp(reasons) };
    }

    /// Not consuming, because of `why`.
    pub fn down(&self, why: impl ToString) {
        *self.state() = State::Down(vec![why.to_string()]);
    }

    /// Whether its session runs, whole or in part: a plugin change waits for it to follow.
    pub fn is_up(&self) -> bool {
        matches!(*self.state(), State::Up | State::PartlyUp(_))
    }

    /// Whether every consumer of it runs: what `/v1/ready` and the gauge call ready.
    pub fn is_ready(&self) -> bool {
        matches!(*self.state(), State::Up)
    }

    /// Why it is not ready (connecting, down, or up in part), one reason per entry; empty
    /// while every consumer runs.
    pub fn reasons(&self) -> Vec<String> {
        match &*self.state() {
            State::Connecting => vec![CONNECTING.to_string()],
            State::Up => Vec::new(),
            State::PartlyUp(reasons) | State::Down(reasons) => reasons.clone(),
        }
    }

    /// Ready when every part is; down otherwise, with every part's reasons (sorted, so that the
    /// answer does not change with the order the parts are kept in).
    pub fn gather<'a>(&self, parts: impl Iterator<Item = &'a Arc<Health>>) {
        let mut reasons: Vec<String> = parts.flat_map(|part| part.reasons()).collect();
        reasons.sort();
        reasons.dedup();
        *self.state() = if reasons.is_empty() { State::Up } else { State::Down(reasons) };
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The guarded value is replaced whole: a panic elsewhere cannot leave it half-written.
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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
        assert_eq!(health.reasons(), [CONNECTING], "before the first attempt ends");
        health.down("connection refused");
        assert!(!health.is_up());
        assert_eq!(health.reasons(), ["connection refused"]);
        health.up();
        assert!(health.is_up());
        assert!(health.reasons().is_empty());
        health.down("the broker closed the consumer");
        assert_eq!(health.reasons(), ["the broker closed the consumer"], "the newest reason only");
    }

    #[test]
    fn partly_up_is_up_for_plugin_changes_and_not_ready() {
        let health = Health::default();
        let refused = ["plugin a: its queue exists with other arguments", "plugin b: its queue is exclusive"];
        health.partly_up(refused.map(String::from).to_vec());
        assert!(health.is_up(), "its session runs: plugin changes wait for it");
        assert!(!health.is_ready());
        assert_eq!(health.reasons(), refused, "each refusal apart");
        health.partly_up(Vec::new());
        assert!(health.is_ready(), "nothing refused: up");
        assert!(health.reasons().is_empty());
    }

    #[test]
    fn a_source_of_parts_is_up_when_every_part_is() {
        let parts: Vec<Arc<Health>> = (0..3).map(|_| Arc::new(Health::default())).collect();
        let whole = Health::default();
        parts.iter().for_each(|p| p.up());
        whole.gather(parts.iter());
        assert!(whole.is_ready());
        assert!(whole.reasons().is_empty());
        parts[2].down("stream orders: WRONGTYPE");
        parts[1].down("pub/sub: connection refused");
        parts[0].down("pub/sub: connection refused");
        whole.gather(parts.iter());
        let every_part = ["pub/sub: connection refused", "stream orders: WRONGTYPE"];
        assert_eq!(whole.reasons(), every_part, "every part's reason, sorted, once each");
        assert!(!whole.is_up());
        whole.gather(std::iter::empty());
        assert!(whole.is_up(), "no parts: nothing to wait for");
    }
}
