//! The embedded SQLite database: schema, connections and the read queries. Writes go through
//! the single writer in [`crate::commit`]; reads use a small pool of WAL readers, and the
//! processed-marker and document look-ups a snapshot that the writer renews ([`Snapshot`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use rusqlite::types::{FromSql, FromSqlResult, ToSqlOutput, ValueRef};
use rusqlite::{Connection, OpenFlags, OptionalExtension, ToSql, params};

use crate::config::Synchronous;
use crate::event::Millis;
use crate::markers::MarkerFilter;

/// Database file name under the data dir.
pub const FILE_NAME: &str = "switchyard.db";

/// A database failure. Callers treat it as transient.
#[derive(Debug, thiserror::Error)]
#[error("database: {0}")]
pub struct DbError(#[from] pub rusqlite::Error);

/// A time is an `INTEGER` column. SQLite's integers are signed: a time past `i64::MAX` is
/// stored as `i64::MAX`, and a negative one (written by hand) reads as the epoch, so that a
/// comparison with a far-off time never wraps around.
impl ToSql for Millis {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.saturating_i64()))
    }
}

impl FromSql for Millis {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        i64::column_result(value).map(Millis::from_i64)
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS documents (
    plugin TEXT NOT NULL,
    collection TEXT NOT NULL,
    key TEXT NOT NULL,
    body TEXT,               -- NULL: a tombstone left by a versioned delete
    version INTEGER,         -- the `if-newer` version of the last write
    rev INTEGER NOT NULL,    -- bumped by every write; optimistic concurrency checks it
    PRIMARY KEY (plugin, collection, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS processed (
    plugin TEXT NOT NULL,
    event_id TEXT NOT NULL,
    processed_at INTEGER NOT NULL,
    PRIMARY KEY (event_id, plugin)  -- the id first: a look-up tells keys apart by their first column
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS processed_by_age ON processed (processed_at);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL,
    name TEXT NOT NULL,
    source TEXT NOT NULL,
    key TEXT,
    correlation_id TEXT,
    causation_id TEXT,
    headers TEXT NOT NULL,
    payload BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    deliver_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (deliver_at, seq);
CREATE TABLE IF NOT EXISTS dead_letters (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    plugin TEXT NOT NULL,
    event_id TEXT,
    name TEXT,
    reason TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    first_failed_at INTEGER NOT NULL,
    last_failed_at INTEGER NOT NULL,
    transport TEXT NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_plugin ON dead_letters (plugin, seq);
CREATE TABLE IF NOT EXISTS parked (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    plugin TEXT NOT NULL,
    event_id TEXT NOT NULL,
    ordering_key TEXT,       -- NULL: the event holds back no other
    attempt INTEGER NOT NULL, -- the attempt it runs as next
    first_failed_at INTEGER NOT NULL,
    deliver_at INTEGER NOT NULL,
    reason TEXT NOT NULL,
    transport TEXT NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS parked_due ON parked (plugin, deliver_at, seq);
CREATE INDEX IF NOT EXISTS parked_key ON parked (plugin, ordering_key, seq);
CREATE TABLE IF NOT EXISTS ingress_journal (
    id TEXT PRIMARY KEY,
    queue TEXT NOT NULL,
    digest TEXT NOT NULL,
    received_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS ingress_journal_digest ON ingress_journal (queue, digest);
";

/// A parked row `p` that may run when due: it has no ordering key, or it is the first of its key.
const PARKED_HEAD: &str = "(p.ordering_key IS NULL OR p.seq =
    (SELECT min(q.seq) FROM parked q WHERE q.plugin = p.plugin AND q.ordering_key = p.ordering_key))";

/// Open (creating if needed) the database under `data_dir` and apply the schema.
pub fn open_writer(data_dir: &Path, synchronous: Synchronous) -> Result<Connection, DbError> {
    std::fs::create_dir_all(data_dir).map_err(|e| {
        DbError(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
            Some(format!("cannot create data dir {}: {e}", data_dir.display())),
        ))
    })?;
    let conn = Connection::open(path(data_dir))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    let sync = match synchronous {
        Synchronous::Normal => "NORMAL",
        Synchronous::Full => "FULL",
    };
    conn.pragma_update(None, "synchronous", sync)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // Room for every statement the writer runs, so that none is prepared again per commit.
    conn.set_prepared_statement_cache_capacity(64);
    conn.pragma_update(None, "mmap_size", MMAP_SIZE)?;
    conn.execute_batch(SCHEMA)?;
    drop_shared_indexes(&conn)?;
    Ok(conn)
}

/// Bytes of the database file read through a memory map. Every commit invalidates the other
/// connections' page caches, so without it each read copies its pages in again with `pread`.
const MMAP_SIZE: i64 = 256 * 1024 * 1024;

/// The database file under a data dir.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE_NAME)
}

/// The index that serves `lookup` on one top-level field of one plugin's collection. It is
/// partial, holding that collection's live documents alone, so that no other plugin's or
/// collection's write maintains it, and it is keyed by the field's value, then the key.
#[derive(Debug, Clone, Copy)]
pub struct FieldIndex<'a> {
    pub plugin: &'a str,
    pub collection: &'a str,
    /// Validated by [`valid_field`].
    pub field: &'a str,
}

impl FieldIndex<'_> {
    /// The index's name, quoted for SQL.
    fn name(&self) -> String {
        identifier(&format!("documents:{}:{}:{}", self.plugin, self.collection, self.field))
    }

    /// The rows the index holds, as the condition a query repeats term for term to use it.
    fn rows(&self) -> String {
        let literal = |s: &str| format!("'{}'", s.replace('\'', "''"));
        format!("plugin = {} AND collection = {} AND body IS NOT NULL", literal(self.plugin), literal(self.collection))
    }

    fn value(&self) -> String {
        debug_assert!(valid_field(self.field));
        format!("json_extract(body, '$.{}')", self.field)
    }

    /// DDL that creates the index if it does not exist.
    pub fn ddl(&self) -> String {
        format!("CREATE INDEX IF NOT EXISTS {} ON documents ({}, key) WHERE {}", self.name(), self.value(), self.rows())
    }

    /// A page of the live documents whose field equals `?1`, key > `?2`, by key, at most `?3`.
    fn lookup(&self) -> String {
        format!(
            "SELECT key, body, version, rev FROM documents INDEXED BY {}
             WHERE {} AND {} = ?1 AND key > ?2 ORDER BY key LIMIT ?3",
            self.name(),
            self.rows(),
            self.value()
        )
    }
}

/// `name` quoted as an SQL identifier.
fn identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Drops the indexes of earlier versions, named `documents_by_<field>`: each served every
/// plugin's collections at once, so every document write maintained all of them. The plugins
/// create their own [`FieldIndex`]es as they load.
fn drop_shared_indexes(conn: &Connection) -> rusqlite::Result<()> {
    let shared: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_schema WHERE type = 'index' AND name GLOB 'documents_by_*'")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for name in shared {
        conn.execute_batch(&format!("DROP INDEX {}", identifier(&name)))?;
    }
    Ok(())
}

/// Whether `field` can be indexed (and safely named in SQL).
pub fn valid_field(field: &str) -> bool {
    !field.is_empty() && field.len() <= 64 && field.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// A stored document row, tombstones included.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    /// None for a tombstone.
    pub body: Option<String>,
    pub version: Option<u64>,
    pub rev: i64,
}

/// A live document, as listed by lookups and scans.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub key: String,
    pub body: String,
    pub version: Option<u64>,
    pub rev: i64,
}

/// A scalar to match an indexed field against.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldValue {
    Text(String),
    Integer(i64),
    Boolean(bool),
}

impl FieldValue {
    /// Whether a JSON value equals this scalar the way SQLite's `json_extract` compares.
    pub fn matches(&self, json: &serde_json::Value) -> bool {
        match (self, json) {
            (FieldValue::Text(t), serde_json::Value::String(s)) => t == s,
            (FieldValue::Integer(i), serde_json::Value::Number(n)) => n.as_i64() == Some(*i),
            (FieldValue::Boolean(b), serde_json::Value::Bool(v)) => b == v,
            _ => false,
        }
    }

    fn to_sql(&self) -> rusqlite::types::Value {
        match self {
            FieldValue::Text(t) => rusqlite::types::Value::Text(t.clone()),
            FieldValue::Integer(i) => rusqlite::types::Value::Integer(*i),
            FieldValue::Boolean(b) => rusqlite::types::Value::Integer(i64::from(*b)),
        }
    }
}

pub(crate) fn open_reader(path: &Path) -> rusqlite::Result<Connection> {
    let c = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    c.busy_timeout(std::time::Duration::from_secs(5))?;
    c.set_prepared_statement_cache_capacity(64);
    c.pragma_update(None, "mmap_size", MMAP_SIZE)?;
    Ok(c)
}

/// Reads that every event makes (its processed-marker before it runs, the documents its plugin
/// gets) in a read transaction kept open until the writer commits again: a WAL read
/// transaction takes file locks (`fcntl` system calls) to start and end, and a read inside one
/// is a B-tree search. The writer, which shares it, counts its commits and ends the
/// transaction after each, so that a read sees every commit made before it and an idle
/// snapshot never holds back a checkpoint. Scans and lookups, which read many rows, use the
/// pool instead, so that they do not hold up the reads of other lanes.
pub struct Snapshot {
    path: PathBuf,
    /// Which processed-markers may exist: a look-up it rules out reads nothing.
    pub(crate) markers: Arc<MarkerFilter>,
    /// Transactions the writer committed.
    commits: AtomicU64,
    reader: Mutex<Option<SnapshotReader>>,
}

struct SnapshotReader {
    conn: Connection,
    /// The writer's commit count when the open read transaction began; `None`: none is open.
    open_at: Option<u64>,
}

impl SnapshotReader {
    fn end(&mut self) -> rusqlite::Result<()> {
        if self.open_at.take().is_some() {
            self.conn.prepare_cached("COMMIT")?.execute([])?;
        }
        Ok(())
    }

    fn read<T>(&mut self, commits: u64, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> rusqlite::Result<T> {
        if self.open_at != Some(commits) {
            self.end()?;
            self.conn.prepare_cached("BEGIN")?.execute([])?;
            self.open_at = Some(commits);
        }
        f(&self.conn)
    }
}

impl Snapshot {
    /// The snapshot of the database under `data_dir`, for the writer that opened it.
    pub(crate) fn new(data_dir: &Path) -> Self {
        let path = path(data_dir);
        let markers = Arc::new(MarkerFilter::new(&path));
        Snapshot { path, markers, commits: AtomicU64::new(0), reader: Mutex::new(None) }
    }

    /// Runs `f` in a read transaction that holds at least every commit the writer had counted
    /// when it was called.
    fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, DbError> {
        let mut guard = self.reader.lock().unwrap_or_else(PoisonError::into_inner);
        let reader = match guard.as_mut() {
            Some(reader) => reader,
            None => guard.insert(SnapshotReader { conn: open_reader(&self.path)?, open_at: None }),
        };
        // Read before the transaction begins: its snapshot then holds at least these commits.
        let commits = self.commits.load(Ordering::SeqCst);
        let result = reader.read(commits, f);
        if result.is_err() {
            // Closing the connection ends whatever transaction it was in; the next read opens
            // another.
            *guard = None;
        }
        Ok(result?)
    }

    /// The writer committed a transaction: later reads see a new snapshot. Called before the
    /// transaction's outcome is reported, so that whoever learns of a commit reads its effects.
    pub(crate) fn committed(&self) {
        self.commits.fetch_add(1, Ordering::SeqCst);
        // A read under way ends its own on its next call.
        if let Ok(mut guard) = self.reader.try_lock()
            && let Some(reader) = guard.as_mut()
            && let Err(e) = reader.end()
        {
            tracing::warn!(error = %e, "ending the read snapshot failed; it is reopened");
            *guard = None;
        }
    }
}

fn processed_in(c: &Connection, plugin: &str, event_id: &str) -> rusqlite::Result<bool> {
    c.prepare_cached("SELECT 1 FROM processed WHERE plugin = ?1 AND event_id = ?2")?
        .query_row(params![plugin, event_id], |_| Ok(()))
        .optional()
        .map(|r| r.is_some())
}

fn get_in(c: &Connection, plugin: &str, collection: &str, key: &str) -> rusqlite::Result<Option<Stored>> {
    c.prepare_cached("SELECT body, version, rev FROM documents WHERE plugin = ?1 AND collection = ?2 AND key = ?3")?
        .query_row(params![plugin, collection, key], |r| {
            Ok(Stored { body: r.get(0)?, version: r.get::<_, Option<i64>>(1)?.map(|v| v as u64), rev: r.get(2)? })
        })
        .optional()
}

/// A pool of read-only connections (WAL readers never block the writer).
#[derive(Clone)]
pub struct Readers {
    path: PathBuf,
    idle: Arc<Mutex<Vec<Connection>>>,
    /// The writer's snapshot, when the writer runs in this process.
    snapshot: Option<Arc<Snapshot>>,
}

impl Readers {
    /// Readers for the database under `data_dir`; it must exist (open the writer first). A
    /// process that runs the writer takes its readers from [`crate::commit::Writer::readers`].
    pub fn new(data_dir: &Path) -> Self {
        Readers { path: path(data_dir), idle: Arc::new(Mutex::new(Vec::new())), snapshot: None }
    }

    /// Readers that read processed-markers and single documents through the writer's
    /// `snapshot`.
    pub(crate) fn with_snapshot(snapshot: Arc<Snapshot>) -> Self {
        Readers { path: snapshot.path.clone(), idle: Arc::default(), snapshot: Some(snapshot) }
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, DbError> {
        let pooled = self.idle.lock().map(|mut idle| idle.pop()).unwrap_or(None);
        let conn = match pooled {
            Some(c) => c,
            None => open_reader(&self.path)?,
        };
        let result = f(&conn);
        if let Ok(mut idle) = self.idle.lock()
            && idle.len() < 64
        {
            idle.push(conn);
        }
        result.map_err(DbError)
    }

    /// Runs `f` in the writer's snapshot if there is one, else on a pooled connection.
    fn with_latest<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, DbError> {
        match &self.snapshot {
            Some(snapshot) => snapshot.read(f),
            None => self.with(f),
        }
    }

    /// The row under a key, tombstones included.
    pub fn get(&self, plugin: &str, collection: &str, key: &str) -> Result<Option<Stored>, DbError> {
        self.with_latest(|c| get_in(c, plugin, collection, key))
    }

    /// Live documents of a collection with key > `after`, by key, at most `limit`.
    pub fn scan(&self, plugin: &str, collection: &str, after: &str, limit: usize) -> Result<Vec<Row>, DbError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT key, body, version, rev FROM documents
                 WHERE plugin = ?1 AND collection = ?2 AND key > ?3 AND body IS NOT NULL ORDER BY key LIMIT ?4",
            )?;
            let rows = stmt.query_map(params![plugin, collection, after, limit as i64], row)?;
            rows.collect()
        })
    }

    /// Live documents whose indexed field equals `value`, key > `after`, by key.
    pub fn lookup(
        &self,
        index: FieldIndex<'_>,
        value: &FieldValue,
        after: &str,
        limit: usize,
    ) -> Result<Vec<Row>, DbError> {
        let sql = index.lookup();
        self.with(|c| {
            let mut stmt = c.prepare_cached(&sql)?;
            let rows = stmt.query_map(params![value.to_sql(), after, limit as i64], row)?;
            rows.collect()
        })
    }

    /// Whether `plugin` has committed the effects of `event_id`. With the writer in this
    /// process, its marker filter rules out nearly every absent marker without a read.
    pub fn processed(&self, plugin: &str, event_id: &str) -> Result<bool, DbError> {
        if let Some(snapshot) = &self.snapshot
            && !snapshot.markers.may_hold(plugin, event_id)
        {
            return Ok(false);
        }
        self.with_latest(|c| processed_in(c, plugin, event_id))
    }

    /// Number of outbox rows not yet published.
    pub fn outbox_backlog(&self) -> Result<u64, DbError> {
        self.with(|c| c.query_row("SELECT count(*) FROM outbox", [], |r| r.get::<_, i64>(0)).map(|n| n as u64))
    }

    /// Ingress journal ids of a queue for a digest, oldest first.
    pub fn journal(&self, queue: &str, digest: &str) -> Result<Vec<(String, Millis)>, DbError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT id, received_at FROM ingress_journal WHERE queue = ?1 AND digest = ?2 ORDER BY received_at, id",
            )?;
            let rows = stmt.query_map(params![queue, digest], |r| Ok((r.get::<_, String>(0)?, r.get(1)?)))?;
            rows.collect()
        })
    }

    /// Outbox rows due at `now`, oldest first.
    pub fn due_outbox(&self, now: Millis, limit: usize) -> Result<Vec<OutboxEntry>, DbError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT seq, id, name, source, key, correlation_id, causation_id, headers, payload, created_at
                 FROM outbox WHERE deliver_at <= ?1 ORDER BY seq LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![now, limit as i64], |r| {
                Ok(OutboxEntry {
                    seq: r.get(0)?,
                    id: r.get(1)?,
                    name: r.get(2)?,
                    source: r.get(3)?,
                    key: r.get(4)?,
                    correlation_id: r.get(5)?,
                    causation_id: r.get(6)?,
                    headers: r.get(7)?,
                    payload: r.get(8)?,
                    created_at: r.get(9)?,
                })
            })?;
            rows.collect()
        })
    }

    /// When the next delayed outbox row falls due, if any.
    pub fn next_outbox_due(&self) -> Result<Option<Millis>, DbError> {
        self.with(|c| c.query_row("SELECT min(deliver_at) FROM outbox", [], |r| r.get::<_, Option<Millis>>(0)))
    }

    /// A page of a plugin's dead letters, oldest first, after `after` (a `seq`).
    pub fn dead_letters(&self, plugin: &str, after: i64, limit: usize) -> Result<Vec<DeadLetterRow>, DbError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT seq, event_id, name, reason, attempts, first_failed_at, last_failed_at, transport, body
                 FROM dead_letters WHERE plugin = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            )?;
            let rows = stmt.query_map(params![plugin, after, limit as i64], |r| {
                Ok(DeadLetterRow {
                    seq: r.get(0)?,
                    event_id: r.get(1)?,
                    name: r.get(2)?,
                    reason: r.get(3)?,
                    attempts: r.get(4)?,
                    first_failed_at: r.get(5)?,
                    last_failed_at: r.get(6)?,
                    transport: r.get(7)?,
                    body: r.get(8)?,
                })
            })?;
            rows.collect()
        })
    }

    /// How many dead letters each plugin has.
    pub fn dead_letter_counts(&self) -> Result<Vec<(String, u64)>, DbError> {
        self.counts_by_plugin("SELECT plugin, count(*) FROM dead_letters GROUP BY plugin")
    }

    /// The rows of a `SELECT plugin, count(*) … GROUP BY plugin` query.
    fn counts_by_plugin(&self, sql: &'static str) -> Result<Vec<(String, u64)>, DbError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(sql)?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?;
            rows.collect()
        })
    }

    /// Parked events of a plugin that may run now: due, and first of their ordering key.
    pub fn due_parked(&self, plugin: &str, now: Millis, limit: usize) -> Result<Vec<ParkedRow>, DbError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT p.seq, p.event_id, p.ordering_key, p.attempt, p.first_failed_at, p.deliver_at, p.reason, p.transport, p.body
                 FROM parked p WHERE p.plugin = ?1 AND p.deliver_at <= ?2 AND {PARKED_HEAD} ORDER BY p.seq LIMIT ?3"
            ))?;
            let rows = stmt.query_map(params![plugin, now, limit as i64], |r| {
                Ok(ParkedRow {
                    seq: Some(r.get(0)?),
                    plugin: plugin.to_string(),
                    event_id: r.get(1)?,
                    ordering_key: r.get(2)?,
                    attempt: r.get(3)?,
                    first_failed_at: r.get(4)?,
                    deliver_at: r.get(5)?,
                    reason: r.get(6)?,
                    transport: r.get(7)?,
                    body: r.get(8)?,
                })
            })?;
            rows.collect()
        })
    }

    /// Whether parked row `seq` still exists, is due and is first of its key: a row read a
    /// moment ago may have been settled or parked again since.
    pub fn parked_still_due(&self, seq: i64, now: Millis) -> Result<bool, DbError> {
        self.with(|c| {
            c.prepare_cached(&format!(
                "SELECT count(*) FROM parked p WHERE p.seq = ?1 AND p.deliver_at <= ?2 AND {PARKED_HEAD}"
            ))?
            .query_row(params![seq, now], |r| r.get::<_, i64>(0))
            .map(|n| n == 1)
        })
    }

    /// The newest dead letter of a plugin, if any.
    pub fn last_dead_letter(&self, plugin: &str) -> Result<Option<i64>, DbError> {
        self.with(|c| c.query_row("SELECT max(seq) FROM dead_letters WHERE plugin = ?1", [plugin], |r| r.get(0)))
    }

    /// When the next parked event of a plugin that is first of its key falls due after `now`,
    /// if any (the events parked behind another wait for it, not for a time).
    pub fn next_parked_due(&self, plugin: &str, now: Millis) -> Result<Option<Millis>, DbError> {
        self.with(|c| {
            c.prepare_cached(&format!(
                "SELECT min(p.deliver_at) FROM parked p WHERE p.plugin = ?1 AND p.deliver_at > ?2 AND {PARKED_HEAD}"
            ))?
            .query_row(params![plugin, now], |r| r.get::<_, Option<Millis>>(0))
        })
    }

    /// How many parked events each ordering key of a plugin has.
    pub fn parked_keys(&self, plugin: &str) -> Result<Vec<(String, u32)>, DbError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT ordering_key, count(*) FROM parked WHERE plugin = ?1 AND ordering_key IS NOT NULL GROUP BY ordering_key",
            )?;
            let rows = stmt.query_map([plugin], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })
    }

    /// How many events each plugin has parked.
    pub fn parked_counts(&self) -> Result<Vec<(String, u64)>, DbError> {
        self.counts_by_plugin("SELECT plugin, count(*) FROM parked GROUP BY plugin")
    }
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok(Row { key: r.get(0)?, body: r.get(1)?, version: r.get::<_, Option<i64>>(2)?.map(|v| v as u64), rev: r.get(3)? })
}

/// A committed outbox row.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxEntry {
    pub seq: i64,
    pub id: String,
    pub name: String,
    pub source: String,
    pub key: Option<String>,
    pub correlation_id: Option<String>,
    pub causation_id: Option<String>,
    /// JSON array of `[name, value]` pairs.
    pub headers: String,
    pub payload: Vec<u8>,
    /// Commit time: the published event's occurred-at.
    pub created_at: Millis,
}

/// A dead letter, as kept.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetterRow {
    pub seq: i64,
    /// None for a message that could not be decoded.
    pub event_id: Option<String>,
    pub name: Option<String>,
    pub reason: String,
    pub attempts: u32,
    pub first_failed_at: Millis,
    pub last_failed_at: Millis,
    /// The transport metadata as JSON.
    pub transport: String,
    /// The original bytes.
    pub body: Vec<u8>,
}

/// An event parked until it is due: a retry waiting for its backoff, an event waiting behind
/// an earlier one of its ordering key, or a replayed dead letter.
#[derive(Debug, Clone, PartialEq)]
pub struct ParkedRow {
    /// None until it is stored.
    pub seq: Option<i64>,
    pub plugin: String,
    pub event_id: String,
    pub ordering_key: Option<String>,
    /// The attempt it runs as next.
    pub attempt: u32,
    pub first_failed_at: Millis,
    /// 0: as soon as it is first of its key.
    pub deliver_at: Millis,
    /// Why it is parked (the last failure).
    pub reason: String,
    pub transport: String,
    pub body: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_after_a_commit_whose_snapshot_it_could_not_end_sees_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let writer = open_writer(dir.path(), Synchronous::Full).unwrap();
        let snapshot = Snapshot::new(dir.path());
        let processed = |event_id: &str| snapshot.read(|c| processed_in(c, "p", event_id)).unwrap();
        assert!(!processed("e"), "the read leaves its snapshot open");
        writer.execute("INSERT INTO processed (plugin, event_id, processed_at) VALUES ('p', 'e', 0)", []).unwrap();
        {
            // A read under way holds the reader: the writer cannot end its snapshot.
            let _reading = snapshot.reader.lock().unwrap();
            snapshot.committed();
        }
        assert!(processed("e"), "committed before this read");
    }

    #[test]
    fn a_field_index_serves_one_plugins_collection_and_replaces_the_shared_ones_of_earlier_versions() {
        let dir = tempfile::tempdir().unwrap();
        let writer = open_writer(dir.path(), Synchronous::Full).unwrap();
        writer
            .execute_batch(
                "CREATE INDEX documents_by_email ON documents (plugin, collection, json_extract(body, '$.email'), key)
                 WHERE body IS NOT NULL",
            )
            .unwrap();
        let users = FieldIndex { plugin: "it's", collection: "user \"refs\"", field: "email" };
        writer.execute_batch(&users.ddl()).unwrap();
        let documents = [
            (users.plugin, users.collection, "a", Some(r#"{"email":"x@y"}"#)),
            (users.plugin, users.collection, "b", Some(r#"{"email":"z@y"}"#)),
            (users.plugin, users.collection, "c", None),
            (users.plugin, "other", "d", Some(r#"{"email":"x@y"}"#)),
            ("other", users.collection, "e", Some(r#"{"email":"x@y"}"#)),
            (users.plugin, users.collection, "f", Some(r#"{"email":"x@y"}"#)),
        ];
        for (plugin, collection, key, body) in documents {
            writer
                .execute(
                    "INSERT INTO documents (plugin, collection, key, body, rev) VALUES (?1, ?2, ?3, ?4, 1)",
                    params![plugin, collection, key, body],
                )
                .unwrap();
        }
        let readers = Readers::new(dir.path());
        let x = FieldValue::Text("x@y".into());
        let keys = |rows: Vec<Row>| rows.into_iter().map(|r| r.key).collect::<Vec<_>>();
        assert_eq!(keys(readers.lookup(users, &x, "", 10).unwrap()), ["a", "f"]);
        assert_eq!(keys(readers.lookup(users, &x, "a", 10).unwrap()), ["f"]);
        let others = FieldIndex { plugin: "other", ..users };
        let err = writer.prepare(&others.lookup().replacen(&others.name(), &users.name(), 1)).unwrap_err();
        assert!(err.to_string().contains("no query solution"), "another plugin's documents are not in it: {err}");

        drop(writer);
        let writer = open_writer(dir.path(), Synchronous::Full).unwrap();
        let indexes: Vec<String> = writer
            .prepare(
                "SELECT name FROM sqlite_schema WHERE type = 'index' AND tbl_name = 'documents' AND sql IS NOT NULL",
            )
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(indexes, ["documents:it's:user \"refs\":email"], "the shared index is dropped as the store opens");
    }

    #[test]
    fn a_time_past_what_sqlite_holds_is_stored_as_the_largest_and_a_negative_one_reads_as_the_epoch() {
        let c = Connection::open_in_memory().unwrap();
        let stored: i64 = c.query_row("SELECT ?1", [Millis(u64::MAX)], |r| r.get(0)).unwrap();
        assert_eq!(stored, i64::MAX);
        let read: Millis = c.query_row("SELECT ?1", [1_700_000_000_000_i64], |r| r.get(0)).unwrap();
        assert_eq!(read, Millis(1_700_000_000_000));
        let read: Millis = c.query_row("SELECT -5", [], |r| r.get(0)).unwrap();
        assert_eq!(read, Millis(0));
    }
}
