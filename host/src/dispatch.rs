//! Dispatch: each plugin's events spread over lanes, by ordering key, so that events with the
//! same key are handled one after another and different keys in parallel. A lane runs an
//! event through the plugin, commits the effects and only then acks; a failure that may be
//! retried is parked in the store (see [`crate::retry`]) and the lane goes on.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::commit::{DeadLetter, Outcome, Writer};
use crate::db::{ParkedRow, Readers};
use crate::event::{Event, Millis};
use crate::retry::{Origin, Parking, random_fraction};
use crate::runtime::{Instance, InvokeError, LoadedPlugin};
use crate::source::{Ack, Received};
use crate::telemetry::{Counters, Outcome as Counted};

/// Re-runs of one event after commit conflicts before it counts as a failed attempt.
const MAX_CONFLICT_RERUNS: u32 = 20;
/// Events waiting per lane; a full lane holds back the source (and so the broker's prefetch).
const LANE_DEPTH: usize = 64;

/// A decoded event on its way to one plugin.
pub struct Inbound {
    pub event: Event,
    pub received: Received,
    pub ack: Ack,
    /// The attempt this delivery is: 1, or more when the broker counted earlier deliveries or
    /// the event was parked for a retry.
    pub attempt: u32,
    /// Set when the event comes from the store's parked events.
    pub parked: Option<Origin>,
}

/// An event queued on its lane, with the ordering key that chose the lane (read from the
/// payload once, here, and handed to the plugin as the event's key).
struct Queued {
    inbound: Inbound,
    key: Option<String>,
    /// Counts the event as pending until it is dropped: settled, or lost with a cancelled
    /// submit or a stopped lane.
    _pending: Entered,
}

/// The current version of a plugin; replaced on swap, read by lanes before each event.
pub struct PluginSlot {
    current: RwLock<Arc<LoadedPlugin>>,
    running: watch::Sender<bool>,
    pub counters: Counters,
    pub loaded_at: Millis,
}

impl PluginSlot {
    pub fn new(plugin: LoadedPlugin) -> Self {
        PluginSlot {
            current: RwLock::new(Arc::new(plugin)),
            running: watch::Sender::new(true),
            counters: Counters::default(),
            loaded_at: Millis::now(),
        }
    }

    /// Pause (`false`) or resume (`true`). A paused plugin's lanes finish the invocation under
    /// way and then wait; events keep queueing at the broker (beyond the prefetch).
    pub fn set_running(&self, running: bool) {
        self.running.send_replace(running);
    }

    pub fn is_paused(&self) -> bool {
        !*self.running.borrow()
    }

    async fn wait_running(&self) {
        let mut running = self.running.subscribe();
        let _ = running.wait_for(|r| *r).await;
    }

    /// Make `plugin` the current version. Invocations under way finish on the old one; every
    /// event a lane starts afterwards runs on the new one. Returns the old version.
    pub fn swap(&self, plugin: LoadedPlugin) -> Arc<LoadedPlugin> {
        let new = Arc::new(plugin);
        match self.current.write() {
            Ok(mut current) => std::mem::replace(&mut *current, new),
            Err(poisoned) => std::mem::replace(&mut *poisoned.into_inner(), new),
        }
    }

    pub fn current(&self) -> Arc<LoadedPlugin> {
        match self.current.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

/// Events a plugin has taken and not settled yet, and whether it still takes new ones: what a
/// removal waits on.
#[derive(Default)]
struct Pending {
    count: AtomicU64,
    closed: AtomicBool,
    /// Cancelled with `closed`, to wake lanes waiting on a paused plugin.
    closing: CancellationToken,
    settled: Notify,
}

impl Pending {
    /// Count one more event, unless the plugin is closed.
    fn enter(self: &Arc<Self>) -> Option<Entered> {
        self.count.fetch_add(1, Ordering::SeqCst);
        let entered = Entered(self.clone());
        (!self.closed.load(Ordering::SeqCst)).then_some(entered)
    }

    fn leave(&self) {
        if self.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.settled.notify_waiters();
        }
    }
}

/// One pending event; dropping it settles the count.
struct Entered(Arc<Pending>);

impl Drop for Entered {
    fn drop(&mut self) {
        self.0.leave();
    }
}

/// The lanes of one plugin.
#[derive(Clone)]
pub struct Dispatch {
    name: Arc<str>,
    slot: Arc<PluginSlot>,
    lanes: Vec<mpsc::Sender<Queued>>,
    pending: Arc<Pending>,
    parking: Arc<Parking>,
}

impl Dispatch {
    /// Start the lanes of a plugin.
    pub fn start(slot: Arc<PluginSlot>, writer: Writer, readers: Readers) -> Self {
        let plugin = slot.current();
        let name: Arc<str> = Arc::from(plugin.name.as_str());
        let pending = Arc::new(Pending::default());
        let parking = Arc::new(Parking::load(&readers, &name));
        let lanes = (0..plugin.settings.concurrency.max(1))
            .map(|index| {
                let (tx, rx) = mpsc::channel(LANE_DEPTH);
                let lane = Lane {
                    slot: slot.clone(),
                    writer: writer.clone(),
                    readers: readers.clone(),
                    instance: None,
                    pending: pending.clone(),
                    parking: parking.clone(),
                };
                tokio::spawn(lane.run(rx).instrument(tracing::info_span!("lane", plugin = %name, index)));
                tx
            })
            .collect();
        Dispatch { name, slot, lanes, pending, parking }
    }

    /// What its lanes and its retrier share about its parked events.
    pub fn parking(&self) -> &Arc<Parking> {
        &self.parking
    }

    /// Cancelled when the plugin is removed.
    pub fn closing(&self) -> CancellationToken {
        self.pending.closing.clone()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn slot(&self) -> &Arc<PluginSlot> {
        &self.slot
    }

    /// Queue an event on the lane of its ordering key; waits while that lane is full. A closed
    /// plugin (removed) refuses it: the message is left unsettled, for the broker to keep.
    pub async fn submit(&self, inbound: Inbound) {
        let Some(entered) = self.pending.enter() else {
            tracing::debug!(plugin = %self.name, "plugin removed; the message stays with the broker");
            return;
        };
        let plugin = self.slot.current();
        let key = inbound.event.ordering_key(&plugin.settings.ordering_key);
        let mut hasher = DefaultHasher::new();
        key.as_ref().unwrap_or(&inbound.event.id.0).hash(&mut hasher);
        let lane = (hasher.finish() % self.lanes.len() as u64) as usize;
        if self.lanes[lane].send(Queued { inbound, key, _pending: entered }).await.is_err() {
            tracing::error!(plugin = %self.name, "lane stopped; the message will be redelivered");
        }
    }

    /// Take no more events, and start none of those queued: invocations under way finish,
    /// queued events go back to their source unhandled.
    pub fn close(&self) {
        self.pending.closed.store(true, Ordering::SeqCst);
        self.pending.closing.cancel();
    }

    /// Events taken and not settled yet.
    pub fn pending(&self) -> u64 {
        self.pending.count.load(Ordering::SeqCst)
    }

    /// Wait until every event this plugin took is settled (committed or dead-lettered and
    /// acked, or given back to the broker). Meant after [`close`](Self::close), after which
    /// only the invocations under way finish: queued events are given back unhandled.
    pub async fn drained(&self) {
        loop {
            let settled = self.pending.settled.notified();
            if self.pending() == 0 {
                return;
            }
            settled.await;
        }
    }
}

/// An event as the store parks it, due at `deliver_at` as attempt `attempt`.
fn parked_row(
    plugin: &LoadedPlugin,
    inbound: &Inbound,
    key: Option<String>,
    attempt: u32,
    deliver_at: Millis,
    reason: String,
) -> ParkedRow {
    ParkedRow {
        seq: None,
        plugin: plugin.name.to_string(),
        event_id: inbound.event.id.0.clone(),
        ordering_key: key,
        attempt,
        first_failed_at: inbound.parked.as_ref().map_or_else(Millis::now, |o| o.first_failed_at),
        deliver_at,
        reason,
        transport: inbound.received.transport_json(),
        body: inbound.received.body.clone(),
    }
}

/// Keep an undecodable message, then ack it: it can never be handled, and the reason is kept.
pub async fn dead_letter_undecodable(writer: &Writer, owner: &str, received: Received, ack: Ack, reason: String) {
    tracing::warn!(owner, reason = %reason, "undecodable message dead-lettered");
    let letter = DeadLetter {
        plugin: owner.to_string(),
        event_id: None,
        name: None,
        reason,
        attempts: 0,
        first_failed_at: Millis::now(),
        transport: received.transport_json(),
        body: received.body,
        mark_processed: false,
    };
    match writer.dead_letter(letter).await {
        Ok(Ok(())) => {
            ack.ack().await;
        }
        Ok(Err(e)) => {
            tracing::error!(owner, error = %e, "could not keep a dead letter; the message will be redelivered")
        }
        Err(e) => tracing::error!(owner, error = %e, "could not keep a dead letter; the message will be redelivered"),
    }
}

struct Lane {
    slot: Arc<PluginSlot>,
    writer: Writer,
    readers: Readers,
    instance: Option<Instance>,
    pending: Arc<Pending>,
    parking: Arc<Parking>,
}

/// How one event ended in a lane.
enum Settled {
    Committed,
    Duplicate,
    DeadLettered,
    /// Parked in the store for a later attempt (or behind an earlier event of its key).
    Parked,
    /// Left unacknowledged: the broker redelivers it.
    Abandoned,
}

impl Lane {
    async fn run(mut self, mut rx: mpsc::Receiver<Queued>) {
        while let Some(Queued { inbound, key, _pending }) = rx.recv().await {
            let closing = self.pending.closing.clone();
            let runs = !closing.is_cancelled()
                && tokio::select! {
                    biased;
                    _ = self.slot.wait_running() => true,
                    _ = closing.cancelled() => false,
                };
            if !runs {
                // Removed or stopping before it started: the event goes back to the broker
                // (or stays parked) unhandled; only invocations under way finish.
                inbound.ack.requeue().await;
                continue;
            }
            let span = tracing::info_span!(
                "event",
                event_id = %inbound.event.id,
                name = %inbound.event.name,
                correlation_id = inbound.event.correlation_id.as_deref().unwrap_or(""),
            );
            let held = inbound.parked.is_none() && key.as_deref().is_some_and(|k| self.parking.holds(k));
            let settled = if held {
                // An earlier event of this key is parked: this one waits behind it.
                let row = parked_row(
                    &self.slot.current(),
                    &inbound,
                    key.clone(),
                    inbound.attempt,
                    Millis(0),
                    "waiting behind an earlier event of its key".into(),
                );
                Self::park(&self.writer, &self.parking, row, inbound.parked.clone(), key.as_deref())
                    .instrument(span)
                    .await
            } else {
                self.handle(&inbound, key.clone()).instrument(span).await
            };
            match settled {
                Settled::Committed | Settled::Duplicate | Settled::DeadLettered if inbound.ack.is_broker_message() => {
                    // The effects are committed: the broker's ack needs no answer before the
                    // lane goes on. The event counts as pending until it is acked.
                    let ack = inbound.ack;
                    tokio::spawn(async move {
                        ack.ack().await;
                        drop(_pending);
                    });
                }
                Settled::Committed | Settled::Duplicate | Settled::DeadLettered => {
                    let origin = inbound.parked.clone();
                    // A parked row that went releases the key it was parked under.
                    if inbound.ack.ack().await
                        && let Some(key) = origin.and_then(|o| o.ordering_key)
                    {
                        self.parking.release(&key);
                    }
                }
                Settled::Parked => inbound.ack.parked().await,
                Settled::Abandoned => inbound.ack.requeue().await,
            }
        }
    }

    /// Keep an event in the store for later: a new row, or its own row updated when it came
    /// from there (so it keeps its place before the later events of its key).
    async fn park(
        writer: &Writer,
        parking: &Parking,
        mut row: ParkedRow,
        origin: Option<Origin>,
        key: Option<&str>,
    ) -> Settled {
        row.seq = origin.as_ref().map(|o| o.seq);
        match writer.park(row).await {
            Ok(Ok(())) => {
                match (&origin, key) {
                    (None, Some(key)) => parking.hold(key),
                    _ => parking.poke(),
                }
                Settled::Parked
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "could not park the event; leaving the message to the broker");
                Settled::Abandoned
            }
            Err(e) => {
                tracing::error!(error = %e, "store writer stopped; leaving the message to the broker");
                Settled::Abandoned
            }
        }
    }

    /// An instance of the current plugin version, reusing the lane's when the policy allows.
    async fn instance(&mut self, plugin: &Arc<LoadedPlugin>) -> Result<&mut Instance, InvokeError> {
        let reusable = self.instance.as_ref().is_some_and(|i| {
            Arc::ptr_eq(i.plugin(), plugin)
                && plugin.settings.instances == crate::config::InstancePolicy::Reuse
                && i.uses < plugin.settings.recycle_after
        });
        if !reusable {
            self.instance = None;
            self.instance = Some(Instance::new(plugin.clone()).await?);
        }
        Ok(self.instance.as_mut().expect("instance was just set"))
    }

    async fn handle(&mut self, inbound: &Inbound, key: Option<String>) -> Settled {
        let event = &inbound.event;
        let plugin = self.slot.current();
        let name: Arc<str> = Arc::from(plugin.name.as_str());
        let count = |outcome| self.slot.counters.record(&name, outcome);
        count(Counted::Consumed);
        match self.readers.processed(&name, &event.id.0) {
            Ok(true) => {
                tracing::debug!("already processed; acknowledged without running");
                count(Counted::Duplicate);
                return Settled::Duplicate;
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "cannot check the processed-marker; the commit will"),
        }
        let retry = plugin.settings.retry;
        let attempt = inbound.attempt.max(1);
        let mut conflicts = 0;
        let failure = loop {
            let started = std::time::Instant::now();
            let result = match self.instance(&plugin).await {
                Ok(instance) => instance.handle(event, key.clone(), attempt).await,
                Err(e) => Err(e),
            };
            let took = started.elapsed();
            let count = |outcome| self.slot.counters.record(&name, outcome);
            match result {
                Ok(effects) => match self.writer.commit(name.clone(), event.id.0.clone(), effects).await {
                    Ok(Outcome::Committed) => {
                        tracing::debug!(attempt, "committed");
                        count(Counted::Succeeded(took));
                        return Settled::Committed;
                    }
                    Ok(Outcome::Duplicate) => {
                        count(Counted::Duplicate);
                        return Settled::Duplicate;
                    }
                    Ok(Outcome::Conflict) if conflicts < MAX_CONFLICT_RERUNS => {
                        conflicts += 1;
                        tracing::debug!(conflicts, "read a document that changed meanwhile; running again");
                        continue;
                    }
                    Ok(Outcome::Conflict) => break InvokeError::Retry("too many concurrent conflicts".into()),
                    Ok(Outcome::Failed(e)) => break InvokeError::Retry(format!("commit failed: {e}")),
                    Err(e) => {
                        tracing::error!(error = %e, "store writer stopped; leaving the message to the broker");
                        return Settled::Abandoned;
                    }
                },
                Err(e) => break e,
            }
        };
        if failure.poisons_instance() {
            self.instance = None;
        }
        let count = |outcome| self.slot.counters.record(&name, outcome);
        let last = attempt >= retry.max_attempts || matches!(failure, InvokeError::Reject(_));
        tracing::warn!(plugin = %plugin.name, attempt, error = %failure, will_retry = !last, "invocation failed");
        if matches!(failure, InvokeError::Reject(_)) {
            count(Counted::Rejected);
        }
        let first_failed_at = inbound.parked.as_ref().map_or_else(Millis::now, |o| o.first_failed_at);
        if last {
            count(Counted::DeadLettered);
            return Self::dead_letter(&self.writer, &plugin, inbound, &failure, attempt, first_failed_at).await;
        }
        count(Counted::Retried);
        let next = attempt + 1;
        let due = Millis(Millis::now().0.saturating_add(retry.jittered(next, random_fraction()).as_millis() as u64));
        let mut row = parked_row(&plugin, inbound, key.clone(), next, due, failure.to_string());
        row.first_failed_at = first_failed_at;
        Self::park(&self.writer, &self.parking, row, inbound.parked.clone(), key.as_deref()).await
    }

    async fn dead_letter(
        writer: &Writer,
        plugin: &LoadedPlugin,
        inbound: &Inbound,
        failure: &InvokeError,
        attempts: u32,
        first_failed_at: Millis,
    ) -> Settled {
        let (event, received) = (&inbound.event, &inbound.received);
        let letter = DeadLetter {
            plugin: plugin.name.to_string(),
            event_id: Some(event.id.0.clone()),
            name: Some(event.name.clone()),
            reason: failure.to_string(),
            attempts,
            first_failed_at,
            transport: received.transport_json(),
            body: received.body.clone(),
            mark_processed: true,
        };
        match writer.dead_letter(letter).await {
            Ok(Ok(())) => Settled::DeadLettered,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "could not keep the dead letter; leaving the message to the broker");
                Settled::Abandoned
            }
            Err(e) => {
                tracing::error!(error = %e, "store writer stopped; leaving the message to the broker");
                Settled::Abandoned
            }
        }
    }
}
