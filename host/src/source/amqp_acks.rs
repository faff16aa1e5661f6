//! Acknowledgements on one RabbitMQ channel, sent in batches with `multiple`.
//!
//! The broker spends about as much on an ack frame as on a delivery, so acking each message
//! on its own halves what a consumer can drain. Lanes settle messages out of order; this
//! keeps every delivery of the channel until it is settled and, once the oldest ones are all
//! acked, sends one `basic.ack` with `multiple` for the newest of them. A `multiple` ack
//! covers every earlier tag, so it never passes a delivery that is not settled: a requeue
//! goes out on its own first, and a delivery dropped unsettled (its plugin is going away)
//! stays with the broker, after which acks go one by one. So that one slow event cannot hold
//! the prefetch window shut, the acks waiting behind it also go one by one once a quarter of
//! the window (at most [`HELD_BACK_MAX`]) waits.
//!
//! One task at a time sends a channel's frames, started by the first settlement while none
//! is sending, and takes whatever gathered while it sent; a message counts as in flight until
//! the frame that covers it is sent.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use lapin::Acker;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use tokio::sync::oneshot;

use super::SETTLE_TIMEOUT;

/// The most acks that wait behind a delivery still being handled before they are sent one by
/// one.
const HELD_BACK_MAX: usize = 64;

/// The deliveries of one channel not settled with the broker yet.
pub(crate) struct AckBatch {
    state: Mutex<State<Acker>>,
}

/// What is known of the channel's deliveries; generic over the acker for unit tests.
struct State<A> {
    /// By delivery tag, in the order the broker delivered them.
    open: BTreeMap<u64, Mark<A>>,
    /// Acks that may wait behind a delivery still being handled.
    held_back_limit: usize,
    /// A batch is being sent; whoever sends it also sends what gathers meanwhile.
    sending: bool,
}

impl<A> State<A> {
    fn new(prefetch: u16) -> Self {
        let held_back_limit = (usize::from(prefetch) / 4).clamp(1, HELD_BACK_MAX);
        State { open: BTreeMap::new(), held_back_limit, sending: false }
    }
}

/// Dropped once the frame that settles a message is sent: what it holds (a waiter, the
/// message's pending count) is released then.
pub(crate) type Done = Box<dyn Send>;

enum Mark<A> {
    /// Being handled.
    Open,
    /// Handled; the ack waits for every earlier delivery to be settled.
    Ack { acker: A, done: Done },
    /// To be given back to the broker.
    Requeue { acker: A, done: Done },
    /// Dropped unsettled: left to the broker, which redelivers it when the channel closes. No
    /// `multiple` ack may pass it any more.
    Left,
}

/// The frames to send next: requeues first, then one ack covering the settled prefix.
struct Batch<A> {
    requeue: Vec<A>,
    /// The newest delivery of the settled prefix, acked with `multiple`.
    ack: Option<A>,
    /// Acks held back too long behind a delivery being handled, each sent on its own.
    singles: Vec<A>,
    done: Vec<Done>,
}

impl<A> Batch<A> {
    fn is_empty(&self) -> bool {
        self.requeue.is_empty() && self.ack.is_none() && self.singles.is_empty()
    }
}

impl AckBatch {
    /// The acks of a channel whose consumer has this prefetch.
    pub(crate) fn new(prefetch: u16) -> Self {
        AckBatch { state: Mutex::new(State::new(prefetch)) }
    }

    /// A delivery has arrived.
    pub(crate) fn track(&self, tag: u64) {
        self.lock().open.insert(tag, Mark::Open);
    }

    /// The message's effects are committed: ack it once every earlier delivery is settled.
    /// `done` is dropped once the ack covering it is sent (or the channel has failed, in
    /// which case the broker redelivers the message).
    pub(crate) fn ack(self: &Arc<Self>, tag: u64, acker: Acker, done: Done) {
        self.lock().open.insert(tag, Mark::Ack { acker, done });
        self.kick();
    }

    /// Give the message back to the broker; returns once the nack is sent.
    pub(crate) async fn requeue(self: &Arc<Self>, tag: u64, acker: Acker) {
        let (done, sent) = oneshot::channel::<()>();
        self.lock().open.insert(tag, Mark::Requeue { acker, done: Box::new(done) });
        self.kick();
        // Dropping `done` ends the wait: the nack went out, or the channel failed.
        let _ = sent.await;
    }

    /// A delivery dropped unsettled stays with the broker: no `multiple` ack covers it, and
    /// the acks waiting behind it go one by one. (Requeueing it instead would have the broker
    /// hand it straight back to a consumer that is refusing events while its plugin drains.)
    pub(crate) fn abandon(self: &Arc<Self>, tag: u64) {
        self.lock().open.insert(tag, Mark::Left);
        self.kick();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<Acker>> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Start sending what is ready, unless a batch is being sent (its sender takes the rest
    /// when it is done) or there is no runtime left to send it (the process is ending; the
    /// broker redelivers).
    fn kick(self: &Arc<Self>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let batch = {
            let mut state = self.lock();
            if state.sending {
                return;
            }
            let batch = state.take();
            if batch.is_empty() {
                return;
            }
            state.sending = true;
            batch
        };
        runtime.spawn(self.clone().send(batch));
    }

    /// Send `batch`, then every batch that gathered meanwhile.
    async fn send(self: Arc<Self>, mut batch: Batch<Acker>) {
        while !batch.is_empty() {
            for acker in batch.requeue.drain(..) {
                let options = BasicNackOptions { requeue: true, ..Default::default() };
                match tokio::time::timeout(SETTLE_TIMEOUT, acker.nack(options)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "nack failed; the message will be redelivered"),
                    Err(_) => tracing::warn!("nack timed out; the message will be redelivered"),
                }
            }
            let multiple = batch.ack.take().map(|a| (a, true));
            for (acker, multiple) in multiple.into_iter().chain(batch.singles.drain(..).map(|a| (a, false))) {
                match tokio::time::timeout(SETTLE_TIMEOUT, acker.ack(BasicAckOptions { multiple })).await {
                    Ok(Ok(_)) => {}
                    // The channel is gone; the broker redelivers and the processed-markers dedup.
                    Ok(Err(e)) => tracing::warn!(error = %e, "ack failed; the messages will be redelivered"),
                    Err(_) => tracing::warn!("ack timed out; the messages will be redelivered"),
                }
            }
            batch.done.clear();
            let mut state = self.lock();
            batch = state.take();
            state.sending = !batch.is_empty();
        }
    }
}

impl<A> State<A> {
    /// Take every requeue, the acks of the oldest deliveries up to the first one still being
    /// handled (or left to the broker), and the acks waiting behind it when too many wait or
    /// it will never be settled.
    fn take(&mut self) -> Batch<A> {
        let mut batch = Batch { requeue: Vec::new(), ack: None, singles: Vec::new(), done: Vec::new() };
        let requeued: Vec<u64> =
            self.open.iter().filter(|(_, m)| matches!(m, Mark::Requeue { .. })).map(|(tag, _)| *tag).collect();
        for tag in requeued {
            if let Some(Mark::Requeue { acker, done }) = self.open.remove(&tag) {
                batch.requeue.push(acker);
                batch.done.push(done);
            }
        }
        while let Some(entry) = self.open.first_entry() {
            if matches!(entry.get(), Mark::Open | Mark::Left) {
                break;
            }
            if let Mark::Ack { acker, done } = entry.remove() {
                batch.ack = Some(acker);
                batch.done.push(done);
            }
        }
        let waiting: Vec<u64> =
            self.open.iter().filter(|(_, m)| matches!(m, Mark::Ack { .. })).map(|(tag, _)| *tag).collect();
        let left = self.open.values().any(|m| matches!(m, Mark::Left));
        if !waiting.is_empty() && (left || waiting.len() >= self.held_back_limit) {
            for tag in waiting {
                if let Some(Mark::Ack { acker, done }) = self.open.remove(&tag) {
                    batch.singles.push(acker);
                    batch.done.push(done);
                }
            }
        }
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(marks: &[(u64, &str)]) -> State<u64> {
        let mut state = State::new(256);
        for (tag, mark) in marks {
            let mark = match *mark {
                "open" => Mark::Open,
                "ack" => Mark::Ack { acker: *tag, done: Box::new(()) },
                "left" => Mark::Left,
                _ => Mark::Requeue { acker: *tag, done: Box::new(()) },
            };
            state.open.insert(*tag, mark);
        }
        state
    }

    #[test]
    fn an_ack_waits_for_every_earlier_delivery() {
        let mut s = state(&[(1, "ack"), (2, "ack"), (3, "open"), (4, "ack")]);
        let batch = s.take();
        assert_eq!((batch.ack, batch.done.len(), batch.requeue.len()), (Some(2), 2, 0));
        assert_eq!(s.open.keys().copied().collect::<Vec<_>>(), vec![3, 4], "tag 4 waits behind 3");
        assert!(s.take().is_empty());
    }

    #[test]
    fn a_requeue_goes_out_first_and_never_blocks_later_acks() {
        let mut s = state(&[(1, "requeue"), (2, "ack"), (3, "open"), (4, "requeue")]);
        let batch = s.take();
        assert_eq!((batch.requeue, batch.ack, batch.done.len()), (vec![1, 4], Some(2), 3));
        assert_eq!(s.open.keys().copied().collect::<Vec<_>>(), vec![3]);
    }

    #[test]
    fn acks_held_back_too_long_go_one_by_one() {
        let mut marks = vec![(1, "open")];
        marks.extend((2..65).map(|tag| (tag, "ack")));
        let mut s = state(&marks);
        assert!(s.take().is_empty(), "63 acks may wait behind a delivery, with prefetch 256");
        s.open.insert(65, Mark::Ack { acker: 65, done: Box::new(()) });
        let batch = s.take();
        assert_eq!(batch.ack, None, "nothing may cover the delivery being handled");
        assert_eq!(batch.singles, (2..66).collect::<Vec<_>>());
        assert_eq!(s.open.keys().copied().collect::<Vec<_>>(), vec![1]);
        let mut small = State::new(4);
        small.open.insert(1, Mark::Open);
        small.open.insert(2, Mark::Ack { acker: 2, done: Box::new(()) });
        assert_eq!(small.take().singles, vec![2], "with prefetch 4, one ack waits at most");
    }

    #[test]
    fn a_delivery_left_to_the_broker_is_never_covered() {
        let mut s = state(&[(1, "ack"), (2, "left"), (3, "ack"), (4, "open"), (5, "ack")]);
        let batch = s.take();
        assert_eq!((batch.ack, batch.singles), (Some(1), vec![3, 5]));
        assert_eq!(s.open.keys().copied().collect::<Vec<_>>(), vec![2, 4]);
    }

    #[test]
    fn nothing_is_sent_while_the_oldest_is_handled() {
        let mut s = state(&[(1, "open"), (2, "ack")]);
        assert!(s.take().is_empty());
        assert_eq!(s.open.len(), 2);
    }
}
