//! A plugin's queue: the events waiting for one of its lanes, and the ordering keys taken.
//!
//! Any lane may run any event, but only one event of an ordering key (or, without a key, of an
//! id) is out of the queue at a time: the next one waits here until the one before it is
//! settled. So the events of a key run one after another and in order, and an event waiting
//! for its key holds back no other key.
//!
//! A lane with nothing to do waits to be woken. A new event wakes an idle lane only when no
//! lane woken before has come for work yet, and a lane that takes an event and leaves more
//! behind wakes the next (and yields, so that the two can run on two threads). A trickle of
//! events is then run by one lane after another, instead of waking a lane of its own for each,
//! while a backlog still spreads over every lane.

use std::collections::VecDeque;
use std::collections::hash_map::Entry;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use foldhash::{HashMap, HashMapExt};
use tokio::sync::{Notify, Semaphore};

/// What the queue orders an event by: its ordering key, or its id when it has none.
pub(super) trait Ordered {
    fn order(&self) -> &str;
}

/// The events waiting for a plugin's lanes. Lanes are numbered from 0.
pub(super) struct Queue<T> {
    state: Mutex<State<T>>,
    /// Free places: a full queue holds back the source (and so the broker's prefetch).
    room: Semaphore,
    /// One per lane.
    wake: Box<[Notify]>,
}

struct State<T> {
    /// Events a lane may take, each the only one of its key out of `taken`'s lists.
    ready: VecDeque<Ready<T>>,
    /// The keys with an event ready or in a lane, and the events waiting behind it, oldest
    /// first.
    taken: HashMap<Arc<str>, VecDeque<T>>,
    /// Lanes waiting for work, the latest last. While events are ready, a lane is woken for
    /// them or none is idle: every change below keeps that.
    idle: Vec<usize>,
    /// A lane woken for work that has not come for it yet.
    woken: Option<usize>,
    /// No more events will come: lanes stop once everything is settled.
    finished: bool,
}

impl<T> State<T> {
    /// `lane` came back: it is neither idle nor still to come for work it was woken for.
    fn came(&mut self, lane: usize) {
        if self.woken == Some(lane) {
            self.woken = None;
        }
        if let Some(at) = self.idle.iter().position(|&l| l == lane) {
            self.idle.swap_remove(at);
        }
    }
}

struct Ready<T> {
    key: Arc<str>,
    item: T,
}

/// An event a lane took, and the hold on its key that lets the next event of the key out
/// when it is dropped.
pub(super) struct Taken<T> {
    pub item: T,
    pub claim: Claim<T>,
    /// It left events ready and woke an idle lane for them.
    pub woke_another: bool,
}

/// Holds an event's key while the event is in a lane; dropped when the event is settled (or
/// given back), which lets the key's next event out.
pub(super) struct Claim<T> {
    queue: Arc<Queue<T>>,
    key: Arc<str>,
}

impl<T> Queue<T> {
    /// A queue for `lanes` lanes, holding at most `room` events.
    pub fn new(lanes: usize, room: usize) -> Self {
        Queue {
            state: Mutex::new(State {
                ready: VecDeque::new(),
                taken: HashMap::new(),
                idle: Vec::new(),
                woken: None,
                finished: false,
            }),
            room: Semaphore::new(room),
            wake: (0..lanes).map(|_| Notify::new()).collect(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wait until the queue has room for one more event: call before [`push`](Self::push).
    /// The place is given back when a lane takes the event.
    pub async fn room(&self) {
        // The semaphore is never closed, so the wait ends with a permit.
        if let Ok(permit) = self.room.acquire().await {
            permit.forget();
        }
    }

    /// The next ready event for `lane`, or `None`, after which the lane counts as idle until
    /// it comes again or [`pass`](Self::pass)es.
    pub fn take(self: &Arc<Self>, lane: usize) -> Option<Taken<T>> {
        let mut state = self.state();
        state.came(lane);
        let Some(Ready { key, item }) = state.ready.pop_front() else {
            state.idle.push(lane);
            return None;
        };
        let woke_another = self.wake_idle(state);
        self.room.add_permits(1);
        Some(Taken { item, claim: Claim { queue: self.clone(), key }, woke_another })
    }

    /// `lane` takes nothing for now (paused, or its commits are many): it stops counting as
    /// idle, and an idle lane is woken for the ready work it leaves, unless one already is.
    pub fn pass(&self, lane: usize) {
        let mut state = self.state();
        state.came(lane);
        self.wake_idle(state);
    }

    /// Wait until `lane` is woken: for work, or to stop.
    pub async fn woken(&self, lane: usize) {
        self.wake[lane].notified().await;
    }

    /// No more events will be pushed.
    pub fn finish(&self) {
        self.state().finished = true;
        self.wake_all();
    }

    /// Finished, with every event taken and settled: the lanes may stop.
    pub fn is_done(&self) -> bool {
        let state = self.state();
        state.finished && state.taken.is_empty()
    }

    /// Wake an idle lane if there is ready work and no lane woken for it yet; whether one was.
    fn wake_idle(&self, mut state: MutexGuard<'_, State<T>>) -> bool {
        if state.ready.is_empty() || state.woken.is_some() {
            return false;
        }
        let Some(lane) = state.idle.pop() else { return false };
        state.woken = Some(lane);
        drop(state);
        self.wake[lane].notify_one();
        true
    }

    fn wake_all(&self) {
        for wake in &self.wake {
            wake.notify_one();
        }
    }
}

impl<T: Ordered> Queue<T> {
    /// Queue an event under its ordering key: behind the key's event that is out, if one is.
    pub fn push(&self, item: T) {
        let mut state = self.state();
        if let Some(behind) = state.taken.get_mut(item.order()) {
            behind.push_back(item);
            return;
        }
        let key: Arc<str> = Arc::from(item.order());
        state.taken.insert(key.clone(), VecDeque::new());
        state.ready.push_back(Ready { key, item });
        self.wake_idle(state);
    }
}

impl<T> Drop for Claim<T> {
    fn drop(&mut self) {
        let queue = &self.queue;
        let mut state = queue.state();
        // One look-up: the key's entry is there while its claim is.
        let Entry::Occupied(mut behind) = state.taken.entry(self.key.clone()) else { return };
        match behind.get_mut().pop_front() {
            Some(item) => {
                state.ready.push_back(Ready { key: self.key.clone(), item });
                queue.wake_idle(state);
            }
            None => {
                behind.remove();
                let done = state.finished && state.taken.is_empty();
                drop(state);
                if done {
                    queue.wake_all();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An event of the tests: its key and a number.
    struct Item(&'static str, u32);

    impl Ordered for Item {
        fn order(&self) -> &str {
            self.0
        }
    }

    fn taken(queue: &Arc<Queue<Item>>, lane: usize) -> Option<(u32, Claim<Item>)> {
        queue.take(lane).map(|t| (t.item.1, t.claim))
    }

    fn push(queue: &Queue<Item>, key: &'static str, n: u32) {
        queue.push(Item(key, n));
    }

    #[test]
    fn an_event_waits_for_the_one_before_it_of_its_key_and_holds_back_no_other_key() {
        let queue = Arc::new(Queue::new(2, 16));
        push(&queue, "a", 1);
        push(&queue, "a", 2);
        push(&queue, "b", 3);
        push(&queue, "a", 4);
        let (first, claim_a) = taken(&queue, 0).unwrap();
        assert_eq!(first, 1);
        let (other, claim_b) = taken(&queue, 1).unwrap();
        assert_eq!(other, 3, "b goes past a's waiting events");
        assert!(taken(&queue, 1).is_none(), "a's next event waits while a's first is out");
        drop(claim_b);
        assert!(taken(&queue, 1).is_none());
        drop(claim_a);
        let (second, claim_a) = taken(&queue, 1).unwrap();
        assert_eq!(second, 2);
        assert!(taken(&queue, 0).is_none());
        drop(claim_a);
        let (last, _claim) = taken(&queue, 0).unwrap();
        assert_eq!(last, 4);
    }

    #[tokio::test]
    async fn a_burst_wakes_one_idle_lane_which_wakes_the_next_when_it_leaves_work_behind() {
        let queue = Arc::new(Queue::new(3, 16));
        for lane in 0..3 {
            assert!(taken(&queue, lane).is_none());
        }
        push(&queue, "a", 1);
        push(&queue, "b", 2);
        push(&queue, "c", 3);
        let woken: Vec<usize> = (0..3).filter(|&l| woke(&queue, l)).collect();
        assert_eq!(woken, [2], "three events, one lane woken: the latest idle");
        let first = queue.take(2).unwrap();
        assert!(first.woke_another);
        let woken: Vec<usize> = (0..3).filter(|&l| woke(&queue, l)).collect();
        assert_eq!(woken, [1], "the lane that took one event left two: it wakes the next");
        let second = queue.take(2).unwrap();
        assert!(!second.woke_another, "lane 1 is woken already");
        let (_, _c) = taken(&queue, 2).unwrap();
        assert!(taken(&queue, 1).is_none(), "the woken lane came too late: nothing left");
        assert!((0..3).all(|l| !woke(&queue, l)), "nothing left to wake a lane for");
    }

    #[tokio::test]
    async fn a_woken_lane_that_passes_hands_the_work_to_another_idle_lane() {
        let queue = Arc::new(Queue::new(2, 16));
        assert!(taken(&queue, 0).is_none());
        assert!(taken(&queue, 1).is_none());
        push(&queue, "a", 1);
        assert!(woke(&queue, 1));
        queue.pass(1);
        assert!(woke(&queue, 0), "lane 1 passed: lane 0 is woken instead");
        assert_eq!(taken(&queue, 0).unwrap().0, 1);
    }

    #[tokio::test]
    async fn a_full_queue_makes_room_when_a_lane_takes_an_event() {
        let queue = Arc::new(Queue::new(1, 2));
        queue.room().await;
        push(&queue, "a", 1);
        queue.room().await;
        push(&queue, "b", 2);
        let mut third = std::pin::pin!(queue.room());
        assert!(futures::poll!(third.as_mut()).is_pending(), "two places, both used");
        let (_, _claim) = taken(&queue, 0).unwrap();
        assert!(futures::poll!(third.as_mut()).is_ready());
    }

    #[test]
    fn a_finished_queue_is_done_once_every_taken_event_is_settled() {
        let queue = Arc::new(Queue::new(1, 4));
        push(&queue, "a", 1);
        push(&queue, "a", 2);
        queue.finish();
        let (_, claim) = taken(&queue, 0).unwrap();
        assert!(!queue.is_done());
        drop(claim);
        assert!(!queue.is_done(), "the key's second event is ready");
        let (_, claim) = taken(&queue, 0).unwrap();
        drop(claim);
        assert!(queue.is_done());
    }

    /// Whether `lane` was woken (consuming the wake-up).
    fn woke(queue: &Queue<Item>, lane: usize) -> bool {
        let mut woken = std::pin::pin!(queue.woken(lane));
        futures::FutureExt::now_or_never(woken.as_mut()).is_some()
    }
}
