//! Retries that hold no consumer slot. A failed invocation that may be tried again is parked
//! in the store with the time it is due, and its message acknowledged (the store holds it
//! now); the retrier hands due events back to the plugin's lanes. A later event with the same
//! ordering key is parked behind it, so a key's events keep their order across retries while
//! the other keys go on. Replayed dead letters come back the same way, with their original id.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::commit::{Replayed, Writer};
use crate::db::{DeadLetterRow, ParkedRow, Readers};
use crate::dispatch::{Dispatch, Inbound, dead_letter_undecodable};
use crate::envelope;
use crate::event::{EventId, Millis};
use crate::source::{Ack, InFlight, Received};

/// Parked events handed to lanes per round.
const BATCH: usize = 256;
/// Longest sleep between looks at the store, should a wake-up be missed.
const MAX_IDLE: Duration = Duration::from_secs(1);

/// What a plugin's lanes and its retrier share about its parked events.
#[derive(Debug, Default)]
pub struct Parking {
    /// The plugin whose events these are, named on the lines logged about them.
    plugin: Arc<str>,
    /// Ordering keys with parked events, and how many each has.
    held: Mutex<HashMap<String, u32>>,
    /// Parked events handed to lanes and not settled yet.
    taken: Mutex<HashSet<i64>>,
    /// Signalled when an event is parked or settled: what is due may have changed.
    changed: Notify,
}

impl Parking {
    /// The parking of a plugin, with the keys its parked events hold.
    pub fn load(readers: &Readers, plugin: &str) -> Parking {
        let held = match readers.parked_keys(plugin) {
            Ok(keys) => keys.into_iter().collect(),
            Err(e) => {
                tracing::error!(plugin, error = %e, "cannot read the parked events' keys; their order may not hold");
                HashMap::new()
            }
        };
        Parking { plugin: Arc::from(plugin), held: Mutex::new(held), ..Default::default() }
    }

    /// The plugin whose events these are.
    pub fn plugin(&self) -> &str {
        &self.plugin
    }

    /// Whether `key` has parked events: a later event of it must wait behind them.
    pub fn holds(&self, key: &str) -> bool {
        self.held.lock().map(|h| h.contains_key(key)).unwrap_or(false)
    }

    /// A new parked event of `key`.
    pub fn hold(&self, key: &str) {
        if let Ok(mut held) = self.held.lock() {
            *held.entry(key.to_string()).or_default() += 1;
        }
        self.changed.notify_one();
    }

    /// A parked event of `key` is settled and its row deleted.
    pub fn release(&self, key: &str) {
        if let Ok(mut held) = self.held.lock()
            && let Some(count) = held.get_mut(key)
        {
            *count -= 1;
            if *count == 0 {
                held.remove(key);
            }
        }
    }

    /// Something parked without a key: the retrier should look again.
    pub fn poke(&self) {
        self.changed.notify_one();
    }

    fn take(&self, seq: i64) -> bool {
        self.taken.lock().map(|mut t| t.insert(seq)).unwrap_or(false)
    }

    /// A parked event handed to a lane is settled (or given back).
    pub(crate) fn untake(&self, seq: i64) {
        if let Ok(mut taken) = self.taken.lock() {
            taken.remove(&seq);
        }
        self.changed.notify_one();
    }
}

/// A random fraction in [0, 1), for jitter.
pub fn random_fraction() -> f64 {
    (uuid::Uuid::new_v4().as_u64_pair().0 >> 11) as f64 / (1u64 << 53) as f64
}

/// Hands a plugin's due parked events back to its lanes, until the plugin is removed.
pub struct Retrier {
    pub dispatch: Dispatch,
    pub readers: Readers,
    pub writer: Writer,
    pub in_flight: Arc<InFlight>,
}

impl Retrier {
    pub async fn run(self) {
        let parking = self.dispatch.parking().clone();
        let closing = self.dispatch.closing();
        while !closing.is_cancelled() {
            let changed = parking.changed.notified();
            let mut delivered = 0;
            match self.readers.due_parked(self.dispatch.name(), Millis::now(), BATCH) {
                Ok(rows) => {
                    for row in rows {
                        let Some(seq) = row.seq else { continue };
                        if !parking.take(seq) {
                            continue;
                        }
                        // Settled or parked again since it was read: not for now.
                        if !self.readers.parked_still_due(seq, Millis::now()).unwrap_or(false) {
                            parking.untake(seq);
                            continue;
                        }
                        self.deliver(seq, row).await;
                        delivered += 1;
                    }
                }
                Err(e) => tracing::warn!(plugin = %self.dispatch.name(), error = %e, "cannot read parked events"),
            }
            if delivered == BATCH {
                // There may be more due right now.
                tokio::task::yield_now().await;
                continue;
            }
            // What is due now was handed out, or is under way and signals `changed` when it
            // settles: wait for the next due time, a change, or MAX_IDLE.
            let now = Millis::now();
            let next = self.readers.next_parked_due(self.dispatch.name(), now).ok().flatten();
            let wait = next.map_or(MAX_IDLE, |due| Duration::from_millis(due.0.saturating_sub(now.0)));
            tokio::select! {
                _ = closing.cancelled() => return,
                _ = changed => {}
                _ = tokio::time::sleep(wait.min(MAX_IDLE)) => {}
            }
        }
    }

    async fn deliver(&self, seq: i64, row: ParkedRow) {
        let ack = Ack::parked_row(self.writer.clone(), seq, self.dispatch.parking().clone(), self.in_flight.clone());
        let received = Received::from_kept(&row.transport, row.body);
        match envelope::decode(&received.body, &received.transport) {
            Ok(decoded) => {
                let mut event = decoded.event;
                event.id = EventId(row.event_id);
                let parked = Some(Origin { seq, first_failed_at: row.first_failed_at, ordering_key: row.ordering_key });
                self.dispatch.submit(Inbound { event, received, ack, attempt: row.attempt, parked }).await;
            }
            Err(e) => {
                let reason = format!("a parked event no longer decodes: {e}");
                dead_letter_undecodable(&self.writer, self.dispatch.name(), received, ack, reason).await;
            }
        }
    }
}

/// Where a parked event handed back to a lane came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub seq: i64,
    pub first_failed_at: Millis,
    /// The key it was parked under (what it releases when it settles).
    pub ordering_key: Option<String>,
}

/// What a replay did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    pub replayed: u64,
    /// Dead letters left alone: messages that never decoded, which would fail the same way.
    pub skipped: Vec<i64>,
}

/// Put dead letters back in front of their (running) plugin: each is parked as a first
/// attempt with its original id, and its processed-marker is dropped so that it runs again.
pub async fn replay(writer: &Writer, dispatch: &Dispatch, letters: Vec<DeadLetterRow>) -> Result<Replay, String> {
    let plugin = dispatch.slot().current();
    let now = Millis::now();
    let (mut batch, mut skipped) = (Vec::new(), Vec::new());
    for letter in letters {
        let received = Received::from_kept(&letter.transport, letter.body);
        let decoded = envelope::decode(&received.body, &received.transport);
        let (Some(event_id), Ok(decoded)) = (letter.event_id, decoded) else {
            skipped.push(letter.seq);
            continue;
        };
        let row = ParkedRow {
            seq: None,
            plugin: plugin.name.to_string(),
            event_id,
            ordering_key: decoded.event.ordering_key(&plugin.settings.ordering_key),
            attempt: 1,
            first_failed_at: now,
            deliver_at: Millis(0),
            reason: "replayed from the dead letters".into(),
            transport: received.transport_json(),
            body: received.body,
        };
        batch.push(Replayed { dead_letter: letter.seq, row });
    }
    // Keys are held before the rows exist, so that no event of theirs can slip ahead of a
    // replayed one; those not replayed after all are released again.
    let parking = dispatch.parking();
    let keyed: Vec<(i64, String)> =
        batch.iter().filter_map(|r| r.row.ordering_key.clone().map(|k| (r.dead_letter, k))).collect();
    keyed.iter().for_each(|(_, key)| parking.hold(key));
    let outcome = writer.replay(batch).await.map_err(|e| e.to_string()).and_then(|r| r);
    let done: HashSet<i64> = outcome.as_ref().map(|d| d.iter().copied().collect()).unwrap_or_default();
    for (letter, key) in &keyed {
        if !done.contains(letter) {
            parking.release(key);
        }
    }
    parking.poke();
    let replayed = outcome?.len() as u64;
    Ok(Replay { replayed, skipped })
}
