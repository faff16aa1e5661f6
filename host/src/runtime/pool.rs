//! The engine's instance pool. wasmtime's pooling allocator maps memory, tables and stacks
//! for a fixed number of instances once, when the engine starts, and resets a slot when its
//! instance is dropped: a fresh instance then costs half of what mapping and unmapping its
//! memory did (BENCHMARKS.md). The price is a bound on live instances, so each plugin's lanes
//! reserve their slots (one instance each) when the plugin starts: a plugin that would not
//! fit is refused then, with the reason, instead of failing its events later. Loads take
//! one of a few slots of their own, waiting for one while all are in use.

use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime::PoolingAllocationConfig;

/// Slots beyond `max_instances` that no lane reserves: the one instance each plugin load
/// creates to ask the plugin for its metadata, for loads running at once.
const LOADING_SLOTS: u32 = 16;
/// Linear memories one component may have: every plugin in `plugins/` has one, and two leave
/// room for a component with a second. Each is 4 GiB of address space and a guard, so this
/// doubles the pool's.
const MEMORIES_PER_COMPONENT: u32 = 2;
/// Core instances and tables one component may have (every plugin in `plugins/` fits).
const CORE_INSTANCES_PER_COMPONENT: u32 = 32;
const TABLES_PER_COMPONENT: u32 = 32;

/// Lanes the pool cannot hold: those of running plugins hold `reserved` of its `capacity`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the instance pool is full: the plugin's lanes need {wanted} more (an instance each), and \
     {reserved} of router.max_instances = {capacity} are held by the lanes of running plugins; \
     raise router.max_instances or lower the plugin's concurrency"
)]
pub struct PoolFull {
    pub wanted: usize,
    pub reserved: usize,
    pub capacity: usize,
}

/// How many instances the lanes of running plugins hold, out of how many, and the loads'
/// slots beyond them.
#[derive(Debug)]
pub struct InstancePool {
    capacity: usize,
    reserved: Mutex<usize>,
    loading: Arc<Semaphore>,
}

impl InstancePool {
    pub fn new(max_instances: u32) -> Arc<Self> {
        Arc::new(InstancePool {
            capacity: max_instances as usize,
            reserved: Mutex::new(0),
            loading: Arc::new(Semaphore::new(LOADING_SLOTS as usize)),
        })
    }

    /// wasmtime's pool for `max_instances` instances and the loading slots, every per-kind
    /// total sized so that instances run out first. Each core module keeps wasmtime's limits:
    /// one memory, and one table of up to 20,000 entries.
    pub fn allocation(max_instances: u32) -> PoolingAllocationConfig {
        let instances = max_instances.saturating_add(LOADING_SLOTS);
        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(instances)
            .total_stacks(instances)
            .max_memories_per_component(MEMORIES_PER_COMPONENT)
            .total_memories(instances.saturating_mul(MEMORIES_PER_COMPONENT))
            .max_core_instances_per_component(CORE_INSTANCES_PER_COMPONENT)
            .total_core_instances(instances.saturating_mul(CORE_INSTANCES_PER_COMPONENT))
            .max_tables_per_component(TABLES_PER_COMPONENT)
            .total_tables(instances.saturating_mul(TABLES_PER_COMPONENT));
        // A freed slot's memory goes back to the kernel (`madvise`), so the next instance
        // starts from zeroed pages and the component's image. Keeping pages resident and
        // resetting them with `memset` is faster only with the pagemap scan, which skips a
        // written page that is swapped out: a fresh instance could read the last one's data.
        pool
    }

    /// Hold `lanes` instances until the returned [`Slots`] is dropped.
    pub fn reserve(self: &Arc<Self>, lanes: usize) -> Result<Slots, PoolFull> {
        let mut reserved = self.reserved.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if *reserved + lanes > self.capacity {
            return Err(PoolFull { wanted: lanes, reserved: *reserved, capacity: self.capacity });
        }
        *reserved += lanes;
        Ok(Slots { pool: self.clone(), lanes })
    }

    /// Instances it holds for lanes.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Instances the lanes of running plugins hold now.
    pub fn reserved(&self) -> usize {
        *self.reserved.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// One of the loading slots, for a load's metadata instance; waits while every one is
    /// taken, so that loads never take the instances lanes reserved.
    pub async fn loading(&self) -> LoadingSlot {
        // The semaphore is never closed, so the wait ends with a permit.
        LoadingSlot { _permit: self.loading.clone().acquire_owned().await.ok() }
    }
}

/// A loading slot, free again when dropped (after the load's instance).
#[derive(Debug)]
pub struct LoadingSlot {
    _permit: Option<OwnedSemaphorePermit>,
}

/// The instances one plugin's lanes hold; given back when dropped, after the last lane has
/// stopped and dropped its instance.
#[derive(Debug)]
pub struct Slots {
    pool: Arc<InstancePool>,
    lanes: usize,
}

impl Slots {
    /// How many instances: one per lane.
    pub fn lanes(&self) -> usize {
        self.lanes
    }
}

impl Drop for Slots {
    fn drop(&mut self) {
        let mut reserved = self.pool.reserved.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        *reserved -= self.lanes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_reserve_instances_until_their_slots_are_dropped() {
        let pool = InstancePool::new(10);
        let first = pool.reserve(8).unwrap();
        assert_eq!(pool.reserved(), 8);
        assert_eq!(pool.reserve(3).unwrap_err(), PoolFull { wanted: 3, reserved: 8, capacity: 10 });
        let second = pool.reserve(2).unwrap();
        assert_eq!(pool.reserve(1).unwrap_err(), PoolFull { wanted: 1, reserved: 10, capacity: 10 });
        drop(first);
        assert_eq!(pool.reserve(9).unwrap_err(), PoolFull { wanted: 9, reserved: 2, capacity: 10 });
        let third = pool.reserve(8).unwrap();
        drop((second, third));
        assert_eq!(pool.reserved(), 0);
        assert!(pool.reserve(10).is_ok());
    }

    #[test]
    fn loads_wait_for_a_loading_slot_when_all_are_taken() {
        use futures::FutureExt;
        let pool = InstancePool::new(1);
        let mut taken: Vec<LoadingSlot> =
            (0..LOADING_SLOTS).map(|_| pool.loading().now_or_never().expect("a free slot")).collect();
        let mut waiting = Box::pin(pool.loading());
        assert!((&mut waiting).now_or_never().is_none(), "a seventeenth load waits");
        assert!(pool.reserve(1).is_ok(), "lanes do not share the loading slots");
        drop(taken.pop());
        assert!(waiting.now_or_never().is_some(), "a freed slot goes to the waiting load");
    }
}
