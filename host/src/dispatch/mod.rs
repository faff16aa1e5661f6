//! Dispatch: each plugin's events go to its lanes through one queue (see `queue`) that lets
//! only one event of an ordering key out at a time, so that events with the same key are
//! handled one after another and different keys in parallel. A lane runs an event through the
//! plugin, hands the effects to the writer and only acks once they are committed; while a
//! commit is pending it runs the next events of other keys. A failure that may be retried is
//! parked in the store (see [`crate::retry`]) and the lane goes on.

mod queue;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::future::{BoxFuture, OptionFuture};
use futures::stream::FuturesUnordered;
use futures::{FutureExt as _, StreamExt};

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::commit::{DeadLetter, Outcome, PendingCommit, Writer, WriterGone};
use crate::db::{ParkedRow, Readers};
use crate::event::{Event, Millis};
use crate::retry::{Origin, Parking, random_fraction};
use crate::runtime::{Instance, InvokeError, LoadedPlugin, Slots};
use crate::source::{Ack, Received};
use crate::telemetry::{Counters, Outcome as Counted};

use queue::{Claim, Ordered, Queue, Taken};

/// Re-runs of one event after commit conflicts before it counts as a failed attempt.
const MAX_CONFLICT_RERUNS: u32 = 20;
/// Events waiting per lane; a full queue holds back the source (and so the broker's prefetch).
const LANE_DEPTH: usize = 64;
/// Commits one lane may have pending with the writer while it runs the next events.
const PIPELINE_DEPTH: usize = 32;
/// How long a lane waits after handing an event back because the store failed: a store that
/// fails for one event (a full disk) fails for the next, and without a pause the event would
/// go round between the broker and the router as fast as they can pass it.
const STORE_FAILURE_PAUSE: Duration = Duration::from_secs(1);

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

/// An event in the plugin's queue, with its ordering key (read from the payload once, here,
/// and handed to the plugin as the event's key).
struct Waiting {
    /// Boxed: a lane moves its events through several futures, and an event is large.
    inbound: Box<Inbound>,
    key: Option<String>,
    /// Counts the event as pending until it is dropped: settled, or lost with a cancelled
    /// submit or a stopped lane.
    pending: Entered,
}

/// An event a lane took from the queue. Dropping it (settled, or given back) lets the next
/// event of its key out of the queue.
struct Queued {
    inbound: Box<Inbound>,
    key: Option<String>,
    _pending: Entered,
    _claim: Claim<Waiting>,
}

impl Ordered for Waiting {
    fn order(&self) -> &str {
        self.key.as_deref().unwrap_or(&self.inbound.event.id.0)
    }
}

impl From<Taken<Waiting>> for Queued {
    fn from(Taken { item, claim, .. }: Taken<Waiting>) -> Self {
        Queued { inbound: item.inbound, key: item.key, _pending: item.pending, _claim: claim }
    }
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

    /// Closed with nothing left to settle: no event will come (an [`enter`](Self::enter)
    /// after the close sees it), so the lanes may stop.
    fn is_finished(&self) -> bool {
        self.closed.load(Ordering::SeqCst) && self.count.load(Ordering::SeqCst) == 0
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
    feeder: Arc<Feeder>,
    pending: Arc<Pending>,
    parking: Arc<Parking>,
    stopped: CancellationToken,
}

/// What the lanes of a plugin hold together: the engine's instances, given back when the last
/// lane has stopped (and dropped its instance), which then says it has.
struct Held {
    slots: Option<Slots>,
    stopped: CancellationToken,
}

impl Drop for Held {
    fn drop(&mut self) {
        drop(self.slots.take());
        self.stopped.cancel();
    }
}

/// What feeds the lanes; when the last [`Dispatch`] holding it is dropped, no more events
/// come and the lanes stop once every event is settled.
struct Feeder(Arc<Queue<Waiting>>);

impl Drop for Feeder {
    fn drop(&mut self) {
        self.0.finish();
    }
}

impl Dispatch {
    /// Start the lanes of a plugin, one per instance `slots` holds.
    pub fn start(slot: Arc<PluginSlot>, slots: Slots, writer: Writer, readers: Readers) -> Self {
        let plugin = slot.current();
        let name: Arc<str> = Arc::from(plugin.name.as_str());
        let pending = Arc::new(Pending::default());
        let parking = Arc::new(Parking::load(&readers, &name));
        let lanes = slots.lanes();
        let stopped = CancellationToken::new();
        let held = Arc::new(Held { slots: Some(slots), stopped: stopped.clone() });
        let queue = Arc::new(Queue::new(lanes, lanes * LANE_DEPTH));
        for index in 0..lanes {
            let lane = Lane {
                name: name.clone(),
                index,
                slot: slot.clone(),
                queue: queue.clone(),
                writer: writer.clone(),
                readers: readers.clone(),
                instance: None,
                pending: pending.clone(),
                parking: parking.clone(),
                _held: held.clone(),
            };
            // At `debug`, like the event's span (see `event_span`): a span enabled at `info`
            // is entered and left on every poll of the lane, which cost about 0.3 µs per event
            // in the no-op drain; the lines a lane logs at `info` and above name their plugin
            // themselves.
            let span = tracing::debug_span!("lane", plugin = %name, index);
            tokio::spawn(lane.run().instrument(span));
        }
        Dispatch { name, slot, feeder: Arc::new(Feeder(queue)), pending, parking, stopped }
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

    /// Queue an event for the lanes, behind the earlier events of its ordering key (of its
    /// id, when it has no key); waits while the queue is full. A closed plugin (removed)
    /// refuses it: the message is left unsettled, for the broker to keep.
    pub async fn submit(&self, inbound: Inbound) {
        let Some(pending) = self.pending.enter() else {
            tracing::debug!(plugin = %self.name, "plugin removed; the message stays with the broker");
            return;
        };
        let plugin = self.slot.current();
        let key = inbound.event.ordering_key(&plugin.settings.ordering_key);
        let queue = &self.feeder.0;
        queue.room().await;
        queue.push(Waiting { inbound: Box::new(inbound), key, pending });
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

    /// Wait until every lane has stopped and the plugin's instances are back in the engine's
    /// pool: meant after [`close`](Self::close), which the lanes follow once every event the
    /// plugin took is settled (a plugin that is not closed stops only when its last
    /// [`Dispatch`] is dropped).
    pub async fn stopped(&self) {
        self.stopped.cancelled().await;
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
        // Not waited for: a batched ack waits for the deliveries before it, which the caller
        // (a consumer loop) need not wait on.
        Ok(Ok(())) => ack.ack_detached(()),
        Ok(Err(e)) => {
            tracing::error!(owner, error = %e, "could not keep a dead letter; the message will be redelivered")
        }
        Err(e) => tracing::error!(owner, error = %e, "could not keep a dead letter; the message will be redelivered"),
    }
}

struct Lane {
    name: Arc<str>,
    /// Its number among the plugin's lanes.
    index: usize,
    slot: Arc<PluginSlot>,
    queue: Arc<Queue<Waiting>>,
    writer: Writer,
    readers: Readers,
    instance: Option<Instance>,
    pending: Arc<Pending>,
    parking: Arc<Parking>,
    /// The engine's instances the plugin's lanes hold; declared after `instance`, so given
    /// back after it is dropped.
    _held: Arc<Held>,
}

/// How one event ended in a lane.
enum Settled {
    Committed,
    Duplicate,
    DeadLettered,
    /// Parked in the store for a later attempt (or behind an earlier event of its key).
    Parked,
    /// Left unacknowledged: the broker redelivers it.
    Abandoned(Abandon),
}

/// Why a lane could not settle an event and left it to the broker. Logged once, with the
/// event, when the event is handed back.
#[derive(Debug, thiserror::Error)]
enum Abandon {
    #[error(transparent)]
    WriterStopped(#[from] WriterGone),
    #[error("could not park the event: {0}")]
    Park(String),
    #[error("could not keep the dead letter: {0}")]
    DeadLetter(String),
}

/// An event whose effects are with the writer, not committed yet.
struct Committing {
    queued: Queued,
    /// The version that handled it; a re-run after a conflict uses it again.
    plugin: Arc<LoadedPlugin>,
    attempt: u32,
    /// Re-runs after commit conflicts so far.
    conflicts: u32,
    /// How long the handler took.
    took: Duration,
    /// The event's tracing span, entered again for the outcome.
    span: tracing::Span,
}

/// Where a lane's work on an event stands after a step.
enum Step {
    /// The effects are with the writer.
    Committing(Committing, PendingCommit),
    /// The commit conflicted: run the event again once the lane's other commits are settled.
    Rerun(Committing),
    Settled(Queued, Settled),
}

type CommitWait = BoxFuture<'static, Committed>;

/// An event whose commit the writer has answered.
type Committed = (Committing, Result<Outcome, WriterGone>);

/// A lane's events past their handler: commits pending with the writer, and events to run
/// again after a conflict. Re-runs wait until no commit is pending and hold back new events,
/// so that events contending for one document go one at a time instead of conflicting again.
#[derive(Default)]
struct Pipeline {
    committing: FuturesUnordered<CommitWait>,
    reruns: VecDeque<Committing>,
}

impl Pipeline {
    /// Keep the event of a step that is not settled; hand back one that is.
    fn track(&mut self, step: Step) -> Option<(Queued, Settled)> {
        match step {
            Step::Committing(c, pending) => {
                self.committing.push(Box::pin(async move {
                    let outcome = pending.outcome().await;
                    (c, outcome)
                }));
                None
            }
            Step::Rerun(c) => {
                self.reruns.push_back(c);
                None
            }
            Step::Settled(queued, settled) => Some((queued, settled)),
        }
    }

    /// The next re-run, once no commit is pending.
    fn rerun(&mut self) -> Option<Committing> {
        if !self.committing.is_empty() {
            return None;
        }
        self.reruns.pop_front()
    }

    /// A commit the writer has answered already, without waiting for one.
    fn committed(&mut self) -> Option<Committed> {
        if self.committing.is_empty() {
            return None;
        }
        self.committing.next().now_or_never().flatten()
    }

    /// Whether the lane may start a new event.
    fn takes_more(&self) -> bool {
        self.reruns.is_empty() && self.committing.len() < PIPELINE_DEPTH
    }

    fn is_empty(&self) -> bool {
        self.committing.is_empty() && self.reruns.is_empty()
    }
}

/// The span an event runs in, at `debug`. At `info` and above no span is made per event: it
/// cost about 1 µs of CPU per event in a no-op drain (docs/benchmarks-log.md), as much as a
/// fifth of the router's own work, so the lines logged at `info` and above while an event runs
/// name the event themselves. At `debug` every line logged meanwhile gets the event's id, name and
/// correlation id from it.
fn event_span(event: &Event) -> tracing::Span {
    tracing::debug_span!(
        "event",
        event_id = %event.id,
        name = %event.name,
        correlation_id = event.correlation_id.as_deref().unwrap_or(""),
    )
}

impl Lane {
    /// Take events from the queue one by one, and while an event's commit is pending go on
    /// with the next events (up to [`PIPELINE_DEPTH`] commits): the writer then puts many
    /// events in each transaction, and the lane does not idle through its fsync. The queue
    /// lets out no event whose key has an event in a lane, so events of a key never overtake
    /// each other and each sees its predecessor's effects.
    async fn run(mut self) {
        let closing = self.pending.closing.clone();
        let mut pipeline = Pipeline::default();
        loop {
            if let Some(c) = pipeline.rerun() {
                let span = c.span.clone();
                let step = self.invoke(c).instrument(span).await;
                self.track(&mut pipeline, step).await;
                continue;
            }
            // Settled as soon as it is committed, before the lane takes more: its ack (and
            // the next event of its key) would otherwise wait until the queue is empty or the
            // pipeline full, and a full prefetch window holds the broker's deliveries back.
            if let Some(committed) = pipeline.committed() {
                self.finished(&mut pipeline, committed).await;
                continue;
            }
            let stopping = closing.is_cancelled();
            let paused = self.slot.is_paused();
            // Removed or stopping: what is still queued goes back to the broker (or stays
            // parked) unhandled; only invocations under way finish.
            let takes = stopping || (!paused && pipeline.takes_more());
            if !takes {
                self.queue.pass(self.index);
            } else if let Some(taken) = self.queue.take(self.index) {
                if taken.woke_another {
                    // The lane just woken would wait on this thread until this one yields
                    // (tokio runs a task woken this way next on the same thread, where no other
                    // thread may take it): yield, so that one of the two goes to another thread
                    // and the events left run in parallel with this one.
                    tokio::task::yield_now().await;
                }
                let queued = Queued::from(taken);
                if stopping {
                    queued.inbound.ack.requeue().await;
                } else {
                    let span = event_span(&queued.inbound.event);
                    let step = self.start(queued, span.clone()).instrument(span).await;
                    self.track(&mut pipeline, step).await;
                }
                continue;
            }
            // Created before the check, so that the last event settling after it wakes the lane.
            let settled = stopping.then(|| self.pending.settled.notified());
            if pipeline.is_empty() && (self.queue.is_done() || self.pending.is_finished()) {
                return;
            }
            tokio::select! {
                biased;
                Some(committed) = pipeline.committing.next(), if !pipeline.committing.is_empty() => {
                    self.finished(&mut pipeline, committed).await;
                }
                // Also while the lane takes nothing: it is woken to stop, when the plugin's
                // queue is done.
                _ = self.queue.woken(self.index) => {}
                _ = self.slot.wait_running(), if paused && !stopping => {}
                _ = closing.cancelled(), if !stopping => {}
                // Removed: the lanes stop once every event it took is settled.
                _ = OptionFuture::from(settled), if stopping => {}
            }
        }
    }

    /// Act on a commit the writer answered.
    async fn finished(&mut self, pipeline: &mut Pipeline, (c, outcome): Committed) {
        let span = c.span.clone();
        let step = self.finish(c, outcome).instrument(span).await;
        self.track(pipeline, step).await;
    }

    /// Keep a step's event in the pipeline, or settle it.
    async fn track(&mut self, pipeline: &mut Pipeline, step: Step) {
        if let Some((queued, settled)) = pipeline.track(step) {
            self.settle(queued, settled).await;
        }
    }

    /// Settle an event with its source.
    async fn settle(&mut self, queued: Queued, settled: Settled) {
        let Queued { inbound, _pending, .. } = queued;
        match settled {
            Settled::Committed | Settled::Duplicate | Settled::DeadLettered | Settled::Parked
                if inbound.ack.is_broker_message() =>
            {
                // The effects (or the parked row) are committed: the broker's ack needs no
                // answer before the lane goes on, and must not be waited for here, since a
                // batched ack may wait for an earlier delivery whose commit this lane has
                // pending. The event counts as pending until it is acked.
                inbound.ack.ack_detached(_pending);
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
            Settled::Abandoned(why) => {
                // Named on the line itself, like the failure warn (see `event_span`).
                tracing::error!(
                    plugin = %self.name,
                    event_id = %inbound.event.id,
                    name = %inbound.event.name,
                    error = %why,
                    "leaving the message to the broker"
                );
                inbound.ack.requeue().await;
                let closing = self.pending.closing.clone();
                tokio::select! {
                    _ = tokio::time::sleep(STORE_FAILURE_PAUSE) => {}
                    _ = closing.cancelled() => {}
                }
            }
        }
    }

    /// Start an event: park it behind an earlier event of its key, skip it if it was handled
    /// already, or run it and send its effects to the writer.
    async fn start(&mut self, queued: Queued, span: tracing::Span) -> Step {
        let inbound = &queued.inbound;
        let plugin = self.slot.current();
        if inbound.parked.is_none() && queued.key.as_deref().is_some_and(|k| self.parking.holds(k)) {
            // An earlier event of this key is parked: this one waits behind it.
            let row = parked_row(
                &plugin,
                inbound,
                queued.key.clone(),
                inbound.attempt,
                Millis(0),
                "waiting behind an earlier event of its key".into(),
            );
            let settled =
                Self::park(&self.writer, &self.parking, row, inbound.parked.clone(), queued.key.as_deref()).await;
            return Step::Settled(queued, settled);
        }
        self.slot.counters.record(&self.name, Counted::Consumed);
        match self.readers.processed(&self.name, &inbound.event.id.0) {
            Ok(true) => {
                tracing::debug!("already processed; acknowledged without running");
                self.slot.counters.record(&self.name, Counted::Duplicate);
                return Step::Settled(queued, Settled::Duplicate);
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(
                plugin = %self.name,
                event_id = %inbound.event.id,
                name = %inbound.event.name,
                error = %e,
                "cannot check the processed-marker; the commit will"
            ),
        }
        let attempt = inbound.attempt.max(1);
        self.invoke(Committing { queued, plugin, attempt, conflicts: 0, took: Duration::ZERO, span }).await
    }

    /// Run the handler and send its effects to the writer.
    async fn invoke(&mut self, mut c: Committing) -> Step {
        let started = std::time::Instant::now();
        let event = &c.queued.inbound.event;
        let result = match self.instance(&c.plugin).await {
            Ok(instance) => instance.handle(event, c.queued.key.as_deref(), c.attempt).await,
            Err(e) => Err(e),
        };
        c.took = started.elapsed();
        match result {
            Ok(Some(effects)) => match self.writer.send_commit(self.name.clone(), event.id.0.clone(), effects).await {
                Ok(pending) => Step::Committing(c, pending),
                Err(e) => Step::Settled(c.queued, Settled::Abandoned(e.into())),
            },
            // Nothing to commit and no marker to write: running it again would do nothing
            // either. It is settled as committed.
            Ok(None) => self.succeeded(c),
            Err(failure) => self.fail(c, failure).await,
        }
    }

    /// An event whose effects are committed (or that had none).
    fn succeeded(&self, c: Committing) -> Step {
        tracing::debug!(attempt = c.attempt, "committed");
        self.slot.counters.record(&self.name, Counted::Succeeded(c.took));
        Step::Settled(c.queued, Settled::Committed)
    }

    /// Act on a commit's outcome: settle the event, or run it again after a conflict.
    async fn finish(&mut self, mut c: Committing, outcome: Result<Outcome, WriterGone>) -> Step {
        let count = |outcome| self.slot.counters.record(&self.name, outcome);
        match outcome {
            Ok(Outcome::Committed) => self.succeeded(c),
            Ok(Outcome::Duplicate) => {
                count(Counted::Duplicate);
                Step::Settled(c.queued, Settled::Duplicate)
            }
            Ok(Outcome::Conflict) if c.conflicts < MAX_CONFLICT_RERUNS => {
                c.conflicts += 1;
                tracing::debug!(conflicts = c.conflicts, "read a document that changed meanwhile; running again");
                Step::Rerun(c)
            }
            Ok(Outcome::Conflict) => self.fail(c, InvokeError::Retry("too many concurrent conflicts".into())).await,
            Ok(Outcome::Failed(e)) => self.fail(c, InvokeError::Retry(format!("commit failed: {e}"))).await,
            Err(e) => Step::Settled(c.queued, Settled::Abandoned(e.into())),
        }
    }

    /// A failed attempt: park the event for the next one, or dead-letter it after the last.
    async fn fail(&mut self, c: Committing, failure: InvokeError) -> Step {
        let Committing { queued, plugin, attempt, .. } = c;
        let inbound = &queued.inbound;
        if failure.poisons_instance() {
            self.instance = None;
        }
        let count = |outcome| self.slot.counters.record(&self.name, outcome);
        let retry = plugin.settings.retry;
        let last = attempt >= retry.max_attempts || matches!(failure, InvokeError::Reject(_));
        // The event is named on the line itself: the event's span is at `debug` (see
        // `event_span`), and a collector may drop span fields.
        tracing::warn!(
            plugin = %plugin.name,
            event_id = %inbound.event.id,
            name = %inbound.event.name,
            attempt,
            error = %failure,
            will_retry = !last,
            "invocation failed"
        );
        if matches!(failure, InvokeError::Reject(_)) {
            count(Counted::Rejected);
        }
        let first_failed_at = inbound.parked.as_ref().map_or_else(Millis::now, |o| o.first_failed_at);
        if last {
            count(Counted::DeadLettered);
            let settled = Self::dead_letter(&self.writer, &plugin, inbound, &failure, attempt, first_failed_at).await;
            return Step::Settled(queued, settled);
        }
        count(Counted::Retried);
        let next = attempt + 1;
        let due = Millis(Millis::now().0.saturating_add(retry.jittered(next, random_fraction()).as_millis() as u64));
        let mut row = parked_row(&plugin, inbound, queued.key.clone(), next, due, failure.to_string());
        row.first_failed_at = first_failed_at;
        let settled = Self::park(&self.writer, &self.parking, row, inbound.parked.clone(), queued.key.as_deref()).await;
        Step::Settled(queued, settled)
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
            Ok(Err(e)) => Settled::Abandoned(Abandon::Park(e)),
            Err(e) => Settled::Abandoned(e.into()),
        }
    }

    /// An instance of the current plugin version, reusing the lane's when the policy allows.
    async fn instance(&mut self, plugin: &Arc<LoadedPlugin>) -> Result<&mut Instance, InvokeError> {
        let reusable = self.instance.as_ref().is_some_and(|i| {
            Arc::ptr_eq(i.plugin(), plugin)
                && plugin.settings.instances == crate::config::InstancePolicy::Reuse
                && i.uses < plugin.settings.recycle_after
        });
        // An instance not reused is dropped before the new one is made.
        let instance = match self.instance.take().filter(|_| reusable) {
            Some(instance) => instance,
            None => Instance::new(plugin.clone()).await?,
        };
        Ok(self.instance.insert(instance))
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
            Ok(Err(e)) => Settled::Abandoned(Abandon::DeadLetter(e)),
            Err(e) => Settled::Abandoned(e.into()),
        }
    }
}
