//! Which processed-markers may exist, known without reading the store. Every event's
//! `(plugin, event id)` marker is looked up before its handler runs, and nearly every look-up
//! finds none; reading SQLite for it cost about 1 µs of CPU per event, an eighth of what the
//! router's async workers spend on an event in a no-op drain (docs/benchmarks-log.md). A Bloom
//! filter over the markers answers "certainly none" from memory, so that only a "maybe" (a
//! marker, or a false positive in about 1 % of look-ups) reads the store.
//!
//! The filter has no false negatives because every marker is written by the writer thread,
//! which adds it here before the commit that holds it is reported. It is built in the
//! background from the table: when the writer starts, again once it holds as many markers as
//! it was sized for, and after SQL the writer ran for someone else (which may have written
//! markers). Markers deleted meanwhile (pruned, or dropped by a replay) stay in the filter until
//! the next build, as false positives. Until a build is done, every look-up reads the store.

use std::hash::BuildHasher;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

/// Bits per marker the filter is sized for: with [`HASHES`] bits set per marker, about 1 % of
/// look-ups of absent markers answer "maybe".
const BITS_PER_MARKER: u64 = 10;
/// Bits set per marker, all in one block.
const HASHES: u32 = 7;
/// Bits per block: one cache line, so that a look-up touches one line of memory.
const BLOCK_BITS: u64 = 512;
/// Markers the smallest filter is sized for (1.25 MiB).
const MIN_CAPACITY: u64 = 1 << 20;
/// Markers the largest filter is sized for (20 MiB). A table with more than half as many
/// markers gets no filter: every look-up reads the store, as without one. (A filter is sized for
/// twice the markers it starts with, so that the scan that builds the next one reads at most
/// one row for each marker added in between.)
const MAX_CAPACITY: u64 = 1 << 24;
/// How long after a build that failed, or found too many markers, the next one starts.
const RETRY_AFTER: Duration = Duration::from_secs(600);

/// The filter of one database's markers, shared by the writer that adds to it and the readers
/// that ask it.
pub struct MarkerFilter {
    path: PathBuf,
    /// The built filter; `None` until the first build is done, and after [`forget`](Self::forget).
    current: RwLock<Option<Arc<Bloom>>>,
    build: Mutex<Build>,
}

/// The state of the background builds.
#[derive(Default)]
struct Build {
    /// Numbers each build, so that one overtaken by [`MarkerFilter::forget`] is not installed.
    generation: u64,
    /// While a build runs: the markers added since it started, for it to take in before it is
    /// installed (its scan may have begun after they were committed).
    added: Option<Vec<u64>>,
    /// No build starts before this, after one that failed or found too many markers.
    not_before: Option<Instant>,
}

impl Build {
    /// No build runs now, and the next waits [`RETRY_AFTER`].
    fn wait(&mut self) {
        self.added = None;
        self.not_before = Some(Instant::now() + RETRY_AFTER);
    }
}

impl MarkerFilter {
    /// A filter of the markers in the database file at `path`, with nothing built yet.
    pub fn new(path: &Path) -> Self {
        MarkerFilter { path: path.to_path_buf(), current: RwLock::new(None), build: Mutex::default() }
    }

    /// Whether `plugin` may have a marker for `event_id`: `false` means certainly not.
    pub fn may_hold(&self, plugin: &str, event_id: &str) -> bool {
        match &*self.current.read().unwrap_or_else(PoisonError::into_inner) {
            Some(bloom) => bloom.may_hold(hash(plugin, event_id)),
            None => true,
        }
    }

    /// Whether a build is installed, so that look-ups of absent markers are answered here.
    #[cfg(test)]
    pub(crate) fn is_built(&self) -> bool {
        self.current.read().unwrap_or_else(PoisonError::into_inner).is_some()
    }

    /// A marker the writer is about to commit. Called on the writer thread, before the commit
    /// is reported to anyone.
    pub fn add(&self, plugin: &str, event_id: &str) {
        let h = hash(plugin, event_id);
        // Held while adding to the current filter, so that a build cannot be installed between
        // the two steps and miss the marker.
        let mut build = self.build.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(added) = &mut build.added {
            added.push(h);
        }
        if let Some(bloom) = &*self.current.read().unwrap_or_else(PoisonError::into_inner) {
            bloom.insert(h);
        }
    }

    /// Markers may have been written without [`add`](Self::add) (SQL run for someone else):
    /// drop the filter, and any build under way, whose scan may have missed them. Called on the
    /// writer thread; the next [`rebuild_if_due`](Self::rebuild_if_due), once the SQL is
    /// committed, starts a build.
    pub fn forget(&self) {
        let mut build = self.build.lock().unwrap_or_else(PoisonError::into_inner);
        *build = Build { generation: build.generation + 1, added: None, not_before: None };
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// Start a build if none runs and the filter is missing or full. Called by the writer after
    /// each transaction.
    pub fn rebuild_if_due(self: &Arc<Self>) {
        let due = match &*self.current.read().unwrap_or_else(PoisonError::into_inner) {
            Some(bloom) => bloom.is_full(),
            None => true,
        };
        let idle = {
            let build = self.build.lock().unwrap_or_else(PoisonError::into_inner);
            build.added.is_none() && build.not_before.is_none_or(|t| Instant::now() >= t)
        };
        if due && idle {
            self.start_build();
        }
    }

    /// Scan the table on a thread of its own, then install what it found together with the
    /// markers added meanwhile.
    fn start_build(self: &Arc<Self>) {
        let generation = {
            let mut build = self.build.lock().unwrap_or_else(PoisonError::into_inner);
            build.generation += 1;
            // From now on every added marker is kept for this build: its scan begins later.
            build.added = Some(Vec::new());
            build.not_before = None;
            build.generation
        };
        let filter = self.clone();
        let spawned = std::thread::Builder::new().name("switchyard-markers".into()).spawn(move || {
            let started = Instant::now();
            let scanned = scan(&filter.path);
            filter.finish_build(generation, scanned, started);
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "could not start building the processed-marker filter");
            self.give_up(generation);
        }
    }

    fn finish_build(&self, generation: u64, scanned: rusqlite::Result<Option<Bloom>>, started: Instant) {
        let scanned = match scanned {
            Ok(scanned) => scanned,
            Err(e) => {
                tracing::warn!(error = %e, "could not build the processed-marker filter; markers are read from the store");
                return self.give_up(generation);
            }
        };
        let mut build = self.build.lock().unwrap_or_else(PoisonError::into_inner);
        if build.generation != generation {
            return;
        }
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        match scanned {
            Some(bloom) => {
                for h in build.added.take().unwrap_or_default() {
                    bloom.insert(h);
                }
                tracing::info!(
                    markers = bloom.held.load(Ordering::Relaxed),
                    capacity = bloom.capacity,
                    took_ms = started.elapsed().as_millis() as u64,
                    "processed-marker filter built"
                );
                *current = Some(Arc::new(bloom));
            }
            None => {
                tracing::info!(
                    max = MAX_CAPACITY / 2,
                    "more processed-markers than the filter holds; every event's marker is read from the store"
                );
                *current = None;
                build.wait();
            }
        }
    }

    /// A build that will not be installed: the filter stays as it is, and the next build waits.
    fn give_up(&self, generation: u64) {
        let mut build = self.build.lock().unwrap_or_else(PoisonError::into_inner);
        if build.generation == generation {
            build.wait();
        }
    }
}

/// Every marker of the table, in a filter sized for twice as many; `None` when there are more
/// than half of what the largest filter holds. Runs in one read transaction.
fn scan(path: &Path) -> rusqlite::Result<Option<Bloom>> {
    let conn = crate::db::open_reader(path)?;
    let tx = conn.unchecked_transaction()?;
    let count: u64 = tx.query_row("SELECT count(*) FROM processed", [], |r| r.get::<_, i64>(0))? as u64;
    if count > MAX_CAPACITY / 2 {
        return Ok(None);
    }
    let bloom = Bloom::with_capacity(count.saturating_mul(2).clamp(MIN_CAPACITY, MAX_CAPACITY));
    let mut stmt = tx.prepare("SELECT plugin, event_id FROM processed")?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        bloom.insert(hash(row.get_ref(0)?.as_str()?, row.get_ref(1)?.as_str()?));
    }
    Ok(Some(bloom))
}

/// The hash a marker is filed under: foldhash with its quality finish, since the filter takes
/// both its block and its bits from it. Markers are hashed on every event; SipHash cost
/// several times as much for ids this short, and the filter needs no keyed hash: a collision
/// costs a store read, not memory.
fn hash(plugin: &str, event_id: &str) -> u64 {
    foldhash::quality::FixedState::default().hash_one((plugin, event_id))
}

/// A blocked Bloom filter: each hash sets [`HASHES`] bits within one block of [`BLOCK_BITS`].
struct Bloom {
    words: Box<[AtomicU64]>,
    blocks: u64,
    /// Markers it is sized for.
    capacity: u64,
    /// Markers added so far.
    held: AtomicU64,
}

impl Bloom {
    fn with_capacity(capacity: u64) -> Self {
        let blocks = (capacity * BITS_PER_MARKER).div_ceil(BLOCK_BITS).max(1);
        let words = (0..blocks * BLOCK_BITS / 64).map(|_| AtomicU64::new(0)).collect();
        Bloom { words, blocks, capacity, held: AtomicU64::new(0) }
    }

    fn insert(&self, h: u64) {
        for (word, bit) in self.bits(h) {
            self.words[word].fetch_or(bit, Ordering::Relaxed);
        }
        self.held.fetch_add(1, Ordering::Relaxed);
    }

    fn may_hold(&self, h: u64) -> bool {
        self.bits(h).all(|(word, bit)| self.words[word].load(Ordering::Relaxed) & bit != 0)
    }

    /// Whether it holds as many markers as it was sized for: past that, false positives grow.
    fn is_full(&self) -> bool {
        self.held.load(Ordering::Relaxed) >= self.capacity
    }

    /// The words and bits a hash sets: its block from its high bits (a multiply-shift onto the
    /// block count), the bits within the block from a remix of it, nine bits each.
    fn bits(&self, h: u64) -> impl Iterator<Item = (usize, u64)> {
        let block = ((u128::from(h) * u128::from(self.blocks)) >> 64) as u64;
        let first_word = block * BLOCK_BITS / 64;
        let mix = remix(h);
        (0..HASHES).map(move |i| {
            let bit = (mix >> (9 * i)) & (BLOCK_BITS - 1);
            ((first_word + bit / 64) as usize, 1u64 << (bit % 64))
        })
    }
}

/// splitmix64's finaliser: bits that do not follow the high bits that chose the block.
fn remix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filled_filter_has_no_false_negatives_and_few_false_positives() {
        let bloom = Bloom::with_capacity(100_000);
        for i in 0..100_000 {
            bloom.insert(hash("p", &format!("e{i}")));
        }
        assert!((0..100_000).all(|i| bloom.may_hold(hash("p", &format!("e{i}")))), "every added marker is found");
        let positives = (0..100_000).filter(|i| bloom.may_hold(hash("p", &format!("other{i}")))).count();
        assert!(positives < 2_000, "{positives} false positives in 100,000 look-ups, at capacity");
        assert!(bloom.is_full());
        let other_plugin = (0..100_000).filter(|i| bloom.may_hold(hash("q", &format!("e{i}")))).count();
        assert!(other_plugin < 2_000, "another plugin's ids are other markers: {other_plugin} false positives");
    }

    #[test]
    fn the_plugin_and_the_id_are_not_run_together() {
        assert_ne!(hash("ab", "c"), hash("a", "bc"));
    }

    #[test]
    fn an_empty_filter_holds_nothing() {
        let bloom = Bloom::with_capacity(MIN_CAPACITY);
        assert!(!bloom.may_hold(hash("p", "e")));
        assert!(!bloom.is_full());
        assert_eq!(bloom.words.len() as u64 * 64, MIN_CAPACITY * BITS_PER_MARKER);
    }

    #[test]
    fn a_filter_with_nothing_built_answers_maybe() {
        let filter = MarkerFilter::new(Path::new("/nonexistent"));
        assert!(!filter.is_built());
        assert!(filter.may_hold("p", "e"));
    }

    /// A database with one marker, `("p", "before")`, and a filter of it between the steps of
    /// a build: begun (as `start_build` leaves it), with its scan still to come.
    fn begun_build() -> (tempfile::TempDir, Arc<MarkerFilter>) {
        let dir = tempfile::tempdir().unwrap();
        let conn = crate::db::open_writer(dir.path(), crate::config::Synchronous::Full).unwrap();
        conn.execute("INSERT INTO processed (plugin, event_id, processed_at) VALUES ('p', 'before', 0)", []).unwrap();
        let filter = Arc::new(MarkerFilter::new(&crate::db::path(dir.path())));
        let mut build = filter.build.lock().unwrap();
        build.generation = 1;
        build.added = Some(Vec::new());
        drop(build);
        (dir, filter)
    }

    #[test]
    fn a_build_holds_the_table_and_the_markers_added_while_it_ran() {
        let (_dir, filter) = begun_build();
        filter.add("p", "during");
        filter.finish_build(1, scan(&filter.path), Instant::now());
        assert!(filter.is_built());
        assert!(filter.may_hold("p", "before"), "scanned from the table");
        assert!(filter.may_hold("p", "during"), "added while the build ran");
        assert!(!filter.may_hold("p", "absent"));
        filter.add("p", "after");
        assert!(filter.may_hold("p", "after"), "added to the installed filter");
        assert!(filter.build.lock().unwrap().added.is_none(), "no log is kept once it is installed");
    }

    #[test]
    fn a_build_overtaken_by_forget_is_not_installed() {
        let (_dir, filter) = begun_build();
        filter.forget();
        filter.finish_build(1, scan(&filter.path), Instant::now());
        assert!(!filter.is_built(), "its scan may have missed markers written by the SQL");
        assert!(filter.may_hold("p", "absent"), "without a filter every look-up reads the store");
    }

    #[test]
    fn a_build_that_fails_leaves_the_store_read_and_waits_before_the_next() {
        let (_dir, filter) = begun_build();
        filter.finish_build(1, Err(rusqlite::Error::InvalidQuery), Instant::now());
        assert!(!filter.is_built());
        let build = filter.build.lock().unwrap();
        assert!(build.added.is_none());
        assert!(build.not_before.is_some_and(|t| t > Instant::now()));
    }
}
