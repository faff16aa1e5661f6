//! Acknowledgements on one RabbitMQ channel, sent in batches with `multiple`.
//!
//! The broker spends about as much on an ack frame as on a delivery, so acking each message
//! on its own halves what a consumer can drain. Lanes settle messages out of order; this
//! keeps every delivery of the channel until it is settled and, once the oldest ones are all
//! acked, sends one `basic.ack` with `multiple` for the newest of them. A `multiple` ack
//! covers every earlier tag, so it never passes a delivery that is not settled: a requeue
//! goes out on its own first, and a delivery dropped unsettled (its plugin is going away)
//! stays with the broker, after which acks go one by one. So that one slow event cannot hold
//! the prefetch window shut, the acks waiting behind it also go one by one once half the
//! window waits.
//!
//! One task at a time sends a channel's frames, started by the first settlement while none
//! is sending. It lets settlements gather for [`ACK_LINGER`] before each frame, so that one
//! frame covers many messages, and takes whatever gathered while it sent; a message counts as
//! in flight until the frame that covers it is sent.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use lapin::Acker;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use tokio::sync::oneshot;

use super::{ACK_LINGER, Done, SETTLE_TIMEOUT};

/// The deliveries of one channel not settled with the broker yet.
pub(crate) struct AckBatch {
    state: Mutex<State<Acker>>,
}

/// What is known of the channel's deliveries; generic over the acker for unit tests.
struct State<A> {
    /// By delivery tag, oldest first. A channel's tags only grow, so a delivery joins at the
    /// back, a settlement finds its delivery by binary search, and the settled prefix leaves
    /// from the front.
    open: VecDeque<(u64, Mark<A>)>,
    /// How many of `open` are of each kind, so that nothing scans it to learn that.
    counts: Counts,
    /// Acks that may wait behind a delivery still being handled.
    held_back_limit: usize,
    /// A sender is gathering or sending; it also sends what gathers meanwhile.
    sending: bool,
}

#[derive(Default)]
struct Counts {
    acks: usize,
    requeues: usize,
    left: usize,
}

impl Counts {
    fn add<A>(&mut self, mark: &Mark<A>) {
        match mark {
            Mark::Ack { .. } => self.acks += 1,
            Mark::Requeue { .. } => self.requeues += 1,
            Mark::Left => self.left += 1,
            Mark::Open => {}
        }
    }

    fn remove<A>(&mut self, mark: &Mark<A>) {
        match mark {
            Mark::Ack { .. } => self.acks -= 1,
            Mark::Requeue { .. } => self.requeues -= 1,
            Mark::Left => self.left -= 1,
            Mark::Open => {}
        }
    }
}

impl<A> State<A> {
    fn new(prefetch: u16) -> Self {
        let held_back_limit = (usize::from(prefetch) / 2).max(1);
        State { open: VecDeque::new(), counts: Counts::default(), held_back_limit, sending: false }
    }

    fn set(&mut self, tag: u64, mark: Mark<A>) {
        self.counts.add(&mark);
        if self.open.back().is_none_or(|(last, _)| *last < tag) {
            self.open.push_back((tag, mark));
            return;
        }
        match self.open.binary_search_by_key(&tag, |(tag, _)| *tag) {
            Ok(at) => {
                let old = std::mem::replace(&mut self.open[at].1, mark);
                self.counts.remove(&old);
            }
            Err(at) => self.open.insert(at, (tag, mark)),
        }
    }

    /// The oldest delivery's mark, if it is an ack.
    fn pop_acked_front(&mut self) -> Option<(A, Done)> {
        if !matches!(self.open.front(), Some((_, Mark::Ack { .. }))) {
            return None;
        }
        let (_, mark) = self.open.pop_front()?;
        self.counts.remove(&mark);
        match mark {
            Mark::Ack { acker, done } => Some((acker, done)),
            _ => None,
        }
    }

    /// Take out every mark `of` picks, oldest first, keeping the others in order.
    fn take_marks(&mut self, of: impl Fn(&Mark<A>) -> bool) -> Vec<Mark<A>> {
        let mut taken = Vec::new();
        let mut kept = VecDeque::with_capacity(self.open.len());
        for (tag, mark) in self.open.drain(..) {
            if of(&mark) {
                self.counts.remove(&mark);
                taken.push(mark);
            } else {
                kept.push_back((tag, mark));
            }
        }
        self.open = kept;
        taken
    }

    /// Whether [`take`](Self::take) would find something to send.
    fn ready(&self) -> bool {
        self.counts.requeues > 0
            || matches!(self.open.front(), Some((_, Mark::Ack { .. })))
            || self.releases_held_back()
    }

    /// Whether the acks waiting behind a delivery being handled go out one by one now: too
    /// many wait, or a delivery left to the broker means no `multiple` ack will cover them.
    fn releases_held_back(&self) -> bool {
        self.counts.acks > 0 && (self.counts.left > 0 || self.counts.acks >= self.held_back_limit)
    }
}

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
        self.lock().set(tag, Mark::Open);
    }

    /// The message's effects are committed: ack it once every earlier delivery is settled.
    /// `done` is dropped once the ack covering it is sent (or the channel has failed, in
    /// which case the broker redelivers the message).
    pub(crate) fn ack(self: &Arc<Self>, tag: u64, acker: Acker, done: Done) {
        self.lock().set(tag, Mark::Ack { acker, done });
        self.kick();
    }

    /// Give the message back to the broker; returns once the nack is sent.
    pub(crate) async fn requeue(self: &Arc<Self>, tag: u64, acker: Acker) {
        let (done, sent) = oneshot::channel::<()>();
        self.lock().set(tag, Mark::Requeue { acker, done: Box::new(done) });
        self.kick();
        // Dropping `done` ends the wait: the nack went out, or the channel failed.
        let _ = sent.await;
    }

    /// A delivery dropped unsettled stays with the broker: no `multiple` ack covers it, and
    /// the acks waiting behind it go one by one. (Requeueing it instead would have the broker
    /// hand it straight back to a consumer that is refusing events while its plugin drains.)
    pub(crate) fn abandon(self: &Arc<Self>, tag: u64) {
        self.lock().set(tag, Mark::Left);
        self.kick();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<Acker>> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Start a sender if there is something to send and none is running (a running one sends
    /// it too), and a runtime is left to run it (else the process is ending: the broker
    /// redelivers).
    fn kick(self: &Arc<Self>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        {
            let mut state = self.lock();
            if state.sending || !state.ready() {
                return;
            }
            state.sending = true;
        }
        runtime.spawn(self.clone().send());
    }

    /// Let settlements gather, send them, and go on while more gather.
    async fn send(self: Arc<Self>) {
        loop {
            tokio::time::sleep(ACK_LINGER).await;
            let mut batch = {
                let mut state = self.lock();
                let batch = state.take();
                state.sending = !batch.is_empty();
                if batch.is_empty() {
                    return;
                }
                batch
            };
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
        }
    }
}

impl<A> State<A> {
    /// Take every requeue, the acks of the oldest deliveries up to the first one still being
    /// handled (or left to the broker), and the acks waiting behind it when too many wait or
    /// it will never be settled.
    fn take(&mut self) -> Batch<A> {
        let mut batch = Batch { requeue: Vec::new(), ack: None, singles: Vec::new(), done: Vec::new() };
        if self.counts.requeues > 0 {
            for mark in self.take_marks(|m| matches!(m, Mark::Requeue { .. })) {
                if let Mark::Requeue { acker, done } = mark {
                    batch.requeue.push(acker);
                    batch.done.push(done);
                }
            }
        }
        while let Some((acker, done)) = self.pop_acked_front() {
            batch.ack = Some(acker);
            batch.done.push(done);
        }
        if self.releases_held_back() {
            for mark in self.take_marks(|m| matches!(m, Mark::Ack { .. })) {
                if let Mark::Ack { acker, done } = mark {
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

    impl State<u64> {
        fn tags(&self) -> Vec<u64> {
            self.open.iter().map(|(tag, _)| *tag).collect()
        }
    }

    fn state(marks: &[(u64, &str)]) -> State<u64> {
        let mut state = State::new(256);
        for (tag, mark) in marks {
            let mark = match *mark {
                "open" => Mark::Open,
                "ack" => Mark::Ack { acker: *tag, done: Box::new(()) },
                "left" => Mark::Left,
                _ => Mark::Requeue { acker: *tag, done: Box::new(()) },
            };
            state.set(*tag, mark);
        }
        state
    }

    #[test]
    fn an_ack_waits_for_every_earlier_delivery() {
        let mut s = state(&[(1, "ack"), (2, "ack"), (3, "open"), (4, "ack")]);
        let batch = s.take();
        assert_eq!((batch.ack, batch.done.len(), batch.requeue.len()), (Some(2), 2, 0));
        assert_eq!(s.tags(), vec![3, 4], "tag 4 waits behind 3");
        assert!(s.take().is_empty());
    }

    #[test]
    fn a_requeue_goes_out_first_and_never_blocks_later_acks() {
        let mut s = state(&[(1, "requeue"), (2, "ack"), (3, "open"), (4, "requeue")]);
        let batch = s.take();
        assert_eq!((batch.requeue, batch.ack, batch.done.len()), (vec![1, 4], Some(2), 3));
        assert_eq!(s.tags(), vec![3]);
    }

    #[test]
    fn acks_held_back_too_long_go_one_by_one() {
        let mut marks = vec![(1, "open")];
        marks.extend((2..129).map(|tag| (tag, "ack")));
        let mut s = state(&marks);
        assert!(!s.ready());
        assert!(s.take().is_empty(), "127 acks may wait behind a delivery, with prefetch 256");
        s.set(129, Mark::Ack { acker: 129, done: Box::new(()) });
        assert!(s.ready(), "half the window waits");
        let batch = s.take();
        assert_eq!(batch.ack, None, "nothing may cover the delivery being handled");
        assert_eq!(batch.singles, (2..130).collect::<Vec<_>>());
        assert_eq!(s.tags(), vec![1]);
        assert!(!s.ready());
        let mut small = State::new(4);
        small.set(1, Mark::Open);
        small.set(2, Mark::Ack { acker: 2, done: Box::new(()) });
        assert!(small.take().is_empty(), "with prefetch 4, one ack may wait");
        small.set(3, Mark::Ack { acker: 3, done: Box::new(()) });
        assert_eq!(small.take().singles, vec![2, 3], "and two go one by one");
    }

    #[test]
    fn ready_tells_whether_take_finds_something() {
        let cases: [&[(u64, &str)]; 6] = [
            &[],
            &[(1, "open"), (2, "ack")],
            &[(1, "ack"), (2, "open")],
            &[(1, "open"), (2, "requeue")],
            &[(1, "left"), (2, "open")],
            &[(1, "open"), (2, "left"), (3, "ack")],
        ];
        for marks in cases {
            let mut s = state(marks);
            let ready = s.ready();
            assert_eq!(ready, !s.take().is_empty(), "{marks:?}");
            assert!(!s.ready(), "{marks:?}: nothing is left to send once taken");
        }
        let mut s = state(&[(1, "open")]);
        s.set(1, Mark::Ack { acker: 1, done: Box::new(()) });
        assert_eq!((s.counts.acks, s.ready()), (1, true), "a mark replaced is counted once");
    }

    #[test]
    fn a_delivery_left_to_the_broker_is_never_covered() {
        let mut s = state(&[(1, "ack"), (2, "left"), (3, "ack"), (4, "open"), (5, "ack")]);
        let batch = s.take();
        assert_eq!((batch.ack, batch.singles), (Some(1), vec![3, 5]));
        assert_eq!(s.tags(), vec![2, 4]);
    }

    #[test]
    fn deliveries_stay_in_tag_order_whatever_order_they_are_marked_in() {
        let mut s = state(&[(5, "open"), (2, "open"), (9, "open"), (7, "ack")]);
        assert_eq!(s.tags(), vec![2, 5, 7, 9]);
        s.set(2, Mark::Ack { acker: 2, done: Box::new(()) });
        s.set(5, Mark::Ack { acker: 5, done: Box::new(()) });
        let batch = s.take();
        assert_eq!((batch.ack, batch.done.len()), (Some(7), 3), "2, 5 and 7 are covered by one ack");
        assert_eq!((s.tags(), s.counts.acks), (vec![9], 0));
    }

    #[test]
    fn nothing_is_sent_while_the_oldest_is_handled() {
        let mut s = state(&[(1, "open"), (2, "ack")]);
        assert!(s.take().is_empty());
        assert_eq!(s.open.len(), 2);
    }
}
