//! The single SQLite writer: commits each invocation's effects (store writes, outbox rows and
//! the processed-marker) atomically, many invocations per transaction (group commit). An
//! invocation that is a duplicate or conflicts writes nothing, so that it never undoes
//! another's; a database error fails the whole batch, whose senders then retry.
//!
//! It runs on its own thread; callers send `Job`s and await the outcome, and only then
//! acknowledge the message to the broker.

use std::path::Path;
use std::sync::Arc;
use std::thread;

use rusqlite::{CachedStatement, Connection, OptionalExtension, params};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::StoreConfig;
use crate::db::{self, DbError, ParkedRow, Readers, Snapshot};
use crate::event::Millis;
use crate::markers::MarkerFilter;

/// One document write of an invocation, in the order the plugin made it.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    Put {
        collection: String,
        key: String,
        body: String,
        version: Option<u64>,
    },
    /// With a version, leaves a tombstone carrying it.
    Delete {
        collection: String,
        key: String,
        version: Option<u64>,
    },
}

/// A document the invocation read, with the revision it saw (0: absent). The commit fails with
/// [`Outcome::Conflict`] if any of them changed since.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadCheck {
    pub collection: String,
    pub key: String,
    pub rev: i64,
}

/// An event a plugin published, waiting in the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRow {
    pub id: String,
    pub name: String,
    pub source: String,
    pub key: Option<String>,
    pub correlation_id: Option<String>,
    pub causation_id: Option<String>,
    /// Headers as a JSON array of `[name, value]` pairs.
    pub headers: String,
    pub payload: Vec<u8>,
    pub delay_ms: u64,
}

/// Everything one successful invocation wants committed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Effects {
    pub reads: Vec<ReadCheck>,
    pub writes: Vec<Write>,
    pub outbox: Vec<OutboxRow>,
}

/// What became of a commit.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Committed,
    /// The (plugin, event id) marker already existed: nothing was applied.
    Duplicate,
    /// A document the invocation read changed concurrently: nothing was applied; run again.
    Conflict,
    /// The database failed: nothing was applied.
    Failed(String),
}

/// A message that could not be handled, kept with its reason.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub plugin: String,
    pub event_id: Option<String>,
    pub name: Option<String>,
    pub reason: String,
    pub attempts: u32,
    pub first_failed_at: Millis,
    /// The transport metadata as JSON (routing key, content type, headers).
    pub transport: String,
    /// The original bytes.
    pub body: Vec<u8>,
    /// Also write the processed-marker, so a redelivery is not handled again.
    pub mark_processed: bool,
}

/// Work for the writer thread.
#[derive(Debug)]
enum Job {
    Commit { plugin: Arc<str>, event_id: String, effects: Effects, reply: Reply<Outcome> },
    DeadLetter { letter: DeadLetter, reply: Reply<Result<(), String>> },
    OutboxSent { seqs: Vec<i64>, reply: Reply<Result<(), String>> },
    Journal { op: JournalOp, reply: Reply<Result<(), String>> },
    Execute { sql: String, reply: Reply<Result<(), String>> },
    Prune { before: Millis, reply: Reply<Result<u64, String>> },
    Park { row: ParkedRow, reply: Reply<Result<(), String>> },
    Unpark { seq: i64, reply: Reply<Result<u64, String>> },
    Replay { letters: Vec<Replayed>, reply: Reply<Result<Vec<i64>, String>> },
    Discard { plugin: String, seqs: Option<Vec<i64>>, reply: Reply<Result<u64, String>> },
}

impl Job {
    /// Send the job's answer, or `failure` if its transaction did not commit.
    fn settle(self, failure: Option<&str>) {
        match self {
            Job::Commit { reply, .. } => reply.send(failure),
            Job::DeadLetter { reply, .. }
            | Job::OutboxSent { reply, .. }
            | Job::Journal { reply, .. }
            | Job::Execute { reply, .. }
            | Job::Park { reply, .. } => reply.send(failure),
            Job::Prune { reply, .. } | Job::Unpark { reply, .. } | Job::Discard { reply, .. } => reply.send(failure),
            Job::Replay { reply, .. } => reply.send(failure),
        }
    }
}

/// A job's reply channel, and its answer once the job is applied; the answer is sent only
/// when the job's transaction has committed.
#[derive(Debug)]
struct Reply<T> {
    to: oneshot::Sender<T>,
    answer: Option<T>,
}

/// The answer a job's sender gets when its transaction failed.
trait Failure {
    fn failure(reason: &str) -> Self;
}

impl Failure for Outcome {
    fn failure(reason: &str) -> Self {
        Outcome::Failed(reason.into())
    }
}

impl<T> Failure for Result<T, String> {
    fn failure(reason: &str) -> Self {
        Err(reason.into())
    }
}

impl<T: Failure> Reply<T> {
    fn new(to: oneshot::Sender<T>) -> Self {
        Reply { to, answer: None }
    }

    fn answer(&mut self, answer: T) {
        self.answer = Some(answer);
    }

    fn send(self, failure: Option<&str>) {
        let answer = match failure {
            Some(reason) => T::failure(reason),
            None => self.answer.unwrap_or_else(|| T::failure("the writer did not apply this job")),
        };
        // The sender may have stopped waiting; nothing is owed to it then.
        let _ = self.to.send(answer);
    }
}

/// A dead letter to replay: it is deleted, its processed-marker too, and `row` parked in its
/// place, in one transaction.
#[derive(Debug, Clone)]
pub struct Replayed {
    pub dead_letter: i64,
    pub row: ParkedRow,
}

/// How often the writer drops expired processed-markers and ingress journal rows.
const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(600);
/// Rows deleted per pruning transaction, so one prune never holds the writer for long.
const PRUNE_BATCH: i64 = 10_000;

/// Ingress journal changes (see [`crate::source::rabbitmq`]).
#[derive(Debug)]
pub enum JournalOp {
    Insert(Vec<JournalEntry>),
    Delete(Vec<String>),
}

/// An id the router assigned to an ingress message that carried none.
#[derive(Debug, Clone)]
pub struct JournalEntry {
    pub id: String,
    pub queue: String,
    pub digest: String,
    pub received_at: Millis,
}

/// The writer's failure to accept work: it has stopped.
#[derive(Debug, thiserror::Error)]
#[error("the store writer has stopped")]
pub struct WriterGone;

/// Handle to the writer thread.
#[derive(Clone)]
pub struct Writer {
    jobs: mpsc::Sender<Job>,
    snapshot: Arc<Snapshot>,
    /// Signalled after every transaction that added outbox rows.
    pub outbox_ready: Arc<Notify>,
}

/// Drop the processed-markers and ingress journal rows older than `retention`, now and every
/// `PRUNE_EVERY` (10 minutes), until `shutdown` is cancelled or the writer stops. One of the
/// router's tasks, so that it ends with the router and lets go of its writer handle; a prune
/// under way when the signal comes stops between two of its transactions.
pub async fn prune_expired(writer: Writer, retention: std::time::Duration, shutdown: CancellationToken) {
    let retention = u64::try_from(retention.as_millis()).unwrap_or(u64::MAX);
    let pruning = async {
        loop {
            let before = Millis(Millis::now().0.saturating_sub(retention));
            match writer.prune(before).await {
                Err(WriterGone) => return,
                Ok(Err(e)) => tracing::warn!(error = %e, "could not prune expired processed-markers"),
                Ok(Ok(_)) => {}
            }
            tokio::time::sleep(PRUNE_EVERY).await;
        }
    };
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = pruning => {}
    }
}

impl Writer {
    /// Send the job `make` builds around its reply channel, and wait for the reply.
    async fn request<T: Failure>(&self, make: impl FnOnce(Reply<T>) -> Job) -> Result<T, WriterGone> {
        let (reply, rx) = oneshot::channel();
        self.jobs.send(make(Reply::new(reply))).await.map_err(|_| WriterGone)?;
        rx.await.map_err(|_| WriterGone)
    }

    /// Open the database and start the writer thread.
    pub fn start(data_dir: &Path, config: &StoreConfig) -> Result<Writer, DbError> {
        let conn = db::open_writer(data_dir, config.synchronous)?;
        let (jobs, rx) = mpsc::channel(config.batch_max * 4);
        let outbox_ready = Arc::new(Notify::new());
        let notify = outbox_ready.clone();
        let snapshot = Arc::new(Snapshot::new(data_dir));
        let committed = snapshot.clone();
        let batch_max = config.batch_max;
        // The first build of the marker filter starts before the writer thread, which starts
        // the later ones.
        snapshot.markers.rebuild_if_due();
        thread::Builder::new()
            .name("switchyard-writer".into())
            .spawn(move || run(conn, rx, batch_max, &notify, &committed))
            .map_err(|e| DbError(rusqlite::Error::ToSqlConversionFailure(Box::new(e))))?;
        Ok(Writer { jobs, snapshot, outbox_ready })
    }

    /// How many handles to this writer are left, read without keeping one: the writer thread
    /// ends when none is.
    #[cfg(test)]
    pub(crate) fn handles(&self) -> impl Fn() -> usize + use<> {
        let weak = self.jobs.downgrade();
        move || weak.strong_count()
    }

    /// Readers of this writer's database, whose processed-marker and document look-ups follow
    /// its commits.
    pub fn readers(&self) -> Readers {
        Readers::with_snapshot(self.snapshot.clone())
    }

    /// Commit an invocation's effects with its processed-marker.
    pub async fn commit(&self, plugin: Arc<str>, event_id: String, effects: Effects) -> Result<Outcome, WriterGone> {
        self.send_commit(plugin, event_id, effects).await?.outcome().await
    }

    /// Queue an invocation's effects for commit without waiting for the transaction: the
    /// caller may go on, and learns the outcome from the returned [`PendingCommit`]. Commits
    /// sent by one task are applied in the order it sent them.
    pub async fn send_commit(
        &self,
        plugin: Arc<str>,
        event_id: String,
        effects: Effects,
    ) -> Result<PendingCommit, WriterGone> {
        let (reply, rx) = oneshot::channel();
        let reply = Reply::new(reply);
        self.jobs.send(Job::Commit { plugin, event_id, effects, reply }).await.map_err(|_| WriterGone)?;
        Ok(PendingCommit(rx))
    }

    /// Keep a message that could not be handled.
    pub async fn dead_letter(&self, letter: DeadLetter) -> Result<Result<(), String>, WriterGone> {
        self.request(|reply| Job::DeadLetter { letter, reply }).await
    }

    /// Delete outbox rows the broker confirmed, and wait until that is committed.
    pub async fn outbox_sent(&self, seqs: Vec<i64>) -> Result<Result<(), String>, WriterGone> {
        self.request(|reply| Job::OutboxSent { seqs, reply }).await
    }

    /// Change the ingress journal and wait until it is durable.
    pub async fn journal(&self, op: JournalOp) -> Result<Result<(), String>, WriterGone> {
        self.request(|reply| Job::Journal { op, reply }).await
    }

    /// Drop all processed-markers and ingress journal rows older than `before`; returns how
    /// many markers went. Each transaction deletes at most `PRUNE_BATCH` markers, so commits
    /// get the writer between two of them however far behind pruning is.
    pub async fn prune(&self, before: Millis) -> Result<Result<u64, String>, WriterGone> {
        let mut pruned = 0;
        loop {
            match self.request(|reply| Job::Prune { before, reply }).await? {
                Ok(deleted) => {
                    pruned += deleted;
                    if deleted < PRUNE_BATCH as u64 {
                        return Ok(Ok(pruned));
                    }
                }
                Err(e) => return Ok(Err(e)),
            }
        }
    }

    /// Park an event until it is due: a new row, or (with `seq`) the same row with its next
    /// attempt, so it keeps its place before the later events of its key.
    pub async fn park(&self, row: ParkedRow) -> Result<Result<(), String>, WriterGone> {
        self.request(|reply| Job::Park { row, reply }).await
    }

    /// Forget a parked event: it was handled (or dead-lettered). Returns how many rows went
    /// (0 if it was gone already).
    pub async fn unpark(&self, seq: i64) -> Result<Result<u64, String>, WriterGone> {
        self.request(|reply| Job::Unpark { seq, reply }).await
    }

    /// Replay dead letters: each goes back to its plugin as a parked event; returns the dead
    /// letters replayed (one discarded meanwhile is not).
    pub async fn replay(&self, letters: Vec<Replayed>) -> Result<Result<Vec<i64>, String>, WriterGone> {
        self.request(|reply| Job::Replay { letters, reply }).await
    }

    /// Delete a plugin's dead letters, those of `seqs` or all; returns how many.
    pub async fn discard(&self, plugin: String, seqs: Option<Vec<i64>>) -> Result<Result<u64, String>, WriterGone> {
        self.request(|reply| Job::Discard { plugin, seqs, reply }).await
    }

    /// Run DDL (index creation) on the writer connection.
    pub async fn execute(&self, sql: String) -> Result<Result<(), String>, WriterGone> {
        self.request(|reply| Job::Execute { sql, reply }).await
    }
}

/// A commit the writer has been given and not decided yet.
pub struct PendingCommit(oneshot::Receiver<Outcome>);

impl PendingCommit {
    /// Wait for the transaction that holds the commit.
    pub async fn outcome(self) -> Result<Outcome, WriterGone> {
        self.0.await.map_err(|_| WriterGone)
    }
}

fn run(
    mut conn: Connection,
    mut rx: mpsc::Receiver<Job>,
    batch_max: usize,
    outbox_ready: &Notify,
    snapshot: &Snapshot,
) {
    let mut batch = Vec::with_capacity(batch_max);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < batch_max {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let mut outbox_added = false;
        let failure = match apply_batch(&mut conn, &mut batch, &mut outbox_added, &snapshot.markers) {
            Ok(()) => {
                snapshot.committed();
                None
            }
            Err(e) => {
                tracing::error!(error = %e, jobs = batch.len(), "store transaction failed; the batch is retried by its senders");
                outbox_added = false;
                Some(e.to_string())
            }
        };
        snapshot.markers.rebuild_if_due();
        for job in batch.drain(..) {
            job.settle(failure.as_deref());
        }
        if outbox_added {
            outbox_ready.notify_one();
        }
    }
}

/// Apply a batch in one transaction. Each job's answer is kept in it and sent only once the
/// transaction has committed; when any statement fails, the whole batch is rolled back and
/// every job gets the error.
/// Every marker written is added to `markers` first.
fn apply_batch(
    conn: &mut Connection,
    batch: &mut [Job],
    outbox_added: &mut bool,
    markers: &MarkerFilter,
) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let now = Millis::now();
    let mut commits = None;
    for job in batch.iter_mut() {
        match job {
            Job::Commit { plugin, event_id, effects, reply } => {
                let statements = match &mut commits {
                    Some(statements) => statements,
                    None => commits.insert(CommitStatements::prepare(&tx)?),
                };
                let outcome = statements.commit_one(plugin, event_id, effects, now)?;
                if outcome == Outcome::Committed {
                    markers.add(plugin, event_id);
                }
                *outbox_added |= !effects.outbox.is_empty() && outcome == Outcome::Committed;
                reply.answer(outcome);
            }
            Job::DeadLetter { letter, reply } => {
                insert_dead_letter(&tx, letter, now, markers)?;
                reply.answer(Ok(()));
            }
            Job::OutboxSent { seqs, reply } => {
                let mut stmt = tx.prepare_cached("DELETE FROM outbox WHERE seq = ?1")?;
                for seq in seqs.iter() {
                    stmt.execute([seq])?;
                }
                reply.answer(Ok(()));
            }
            Job::Journal { op, reply } => {
                match op {
                    JournalOp::Insert(entries) => {
                        let mut stmt = tx.prepare_cached(
                            "INSERT OR REPLACE INTO ingress_journal (id, queue, digest, received_at) VALUES (?1, ?2, ?3, ?4)",
                        )?;
                        for e in entries.iter() {
                            stmt.execute(params![e.id, e.queue, e.digest, e.received_at])?;
                        }
                    }
                    JournalOp::Delete(ids) => {
                        let mut stmt = tx.prepare_cached("DELETE FROM ingress_journal WHERE id = ?1")?;
                        for id in ids.iter() {
                            stmt.execute([id])?;
                        }
                    }
                }
                reply.answer(Ok(()));
            }
            Job::Prune { before, reply } => {
                let deleted = tx
                    .prepare_cached(
                        "DELETE FROM processed WHERE (plugin, event_id) IN
                     (SELECT plugin, event_id FROM processed WHERE processed_at < ?1 LIMIT ?2)",
                    )?
                    .execute(params![*before, PRUNE_BATCH])?;
                tx.prepare_cached("DELETE FROM ingress_journal WHERE received_at < ?1")?.execute([*before])?;
                reply.answer(Ok(deleted as u64));
            }
            Job::Execute { sql, reply } => {
                markers.forget();
                reply.answer(tx.execute_batch(sql).map_err(|e| e.to_string()))
            }
            Job::Park { row, reply } => {
                park(&tx, row)?;
                reply.answer(Ok(()));
            }
            Job::Unpark { seq, reply } => {
                let deleted = tx.prepare_cached("DELETE FROM parked WHERE seq = ?1")?.execute([*seq])?;
                reply.answer(Ok(deleted as u64));
            }
            Job::Replay { letters, reply } => {
                let mut replayed = Vec::new();
                for Replayed { dead_letter, row } in letters.iter() {
                    let deleted =
                        tx.prepare_cached("DELETE FROM dead_letters WHERE seq = ?1")?.execute([dead_letter])?;
                    if deleted == 0 {
                        continue;
                    }
                    tx.prepare_cached(UNMARK)?.execute(params![row.plugin, row.event_id])?;
                    park(&tx, row)?;
                    replayed.push(*dead_letter);
                }
                reply.answer(Ok(replayed));
            }
            Job::Discard { plugin, seqs, reply } => {
                let deleted = match seqs {
                    None => tx.prepare_cached("DELETE FROM dead_letters WHERE plugin = ?1")?.execute([&*plugin])?,
                    Some(seqs) => {
                        let mut stmt = tx.prepare_cached("DELETE FROM dead_letters WHERE plugin = ?1 AND seq = ?2")?;
                        let mut n = 0;
                        for seq in seqs.iter() {
                            n += stmt.execute(params![&*plugin, seq])?;
                        }
                        n
                    }
                };
                reply.answer(Ok(deleted as u64));
            }
        }
    }
    drop(commits);
    tx.commit()
}

/// The statements a batch's commits run, taken from the connection's statement cache once per
/// batch rather than once per invocation: taking one out and putting it back cost about as
/// much as the statement's own work on a small document.
struct CommitStatements<'c> {
    mark: CachedStatement<'c>,
    unmark: CachedStatement<'c>,
    rev: CachedStatement<'c>,
    put: CachedStatement<'c>,
    /// A put of a document read as absent: writes nothing if it exists now.
    put_new: CachedStatement<'c>,
    /// A put of a document read at a revision: writes nothing if it has another now.
    put_at: CachedStatement<'c>,
    tombstone: CachedStatement<'c>,
    delete: CachedStatement<'c>,
    outbox: CachedStatement<'c>,
}

impl<'c> CommitStatements<'c> {
    fn prepare(c: &'c Connection) -> rusqlite::Result<Self> {
        Ok(CommitStatements {
            mark: c.prepare_cached(MARK)?,
            unmark: c.prepare_cached(UNMARK)?,
            rev: c.prepare_cached("SELECT rev FROM documents WHERE plugin = ?1 AND collection = ?2 AND key = ?3")?,
            put: c.prepare_cached(
                "INSERT INTO documents (plugin, collection, key, body, version, rev) VALUES (?1, ?2, ?3, ?4, ?5, 1)
                 ON CONFLICT (plugin, collection, key) DO UPDATE SET body = excluded.body, version = excluded.version, rev = rev + 1",
            )?,
            put_new: c.prepare_cached(
                "INSERT INTO documents (plugin, collection, key, body, version, rev) VALUES (?1, ?2, ?3, ?4, ?5, 1)
                 ON CONFLICT (plugin, collection, key) DO NOTHING",
            )?,
            put_at: c.prepare_cached(
                "UPDATE documents SET body = ?4, version = ?5, rev = rev + 1
                 WHERE plugin = ?1 AND collection = ?2 AND key = ?3 AND rev = ?6",
            )?,
            tombstone: c.prepare_cached(
                "INSERT INTO documents (plugin, collection, key, body, version, rev) VALUES (?1, ?2, ?3, NULL, ?4, 1)
                 ON CONFLICT (plugin, collection, key) DO UPDATE SET body = NULL, version = excluded.version, rev = rev + 1",
            )?,
            delete: c.prepare_cached("DELETE FROM documents WHERE plugin = ?1 AND collection = ?2 AND key = ?3")?,
            outbox: c.prepare_cached(
                "INSERT INTO outbox (id, name, source, key, correlation_id, causation_id, headers, payload, created_at, deliver_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?,
        })
    }

    /// Apply one invocation's effects, or nothing: a duplicate is known before anything is
    /// written, and a conflict before anything but the marker, which it deletes again.
    ///
    /// When the first write puts a document the invocation read (a replica's read-modify-write),
    /// that read is checked by the write itself, which applies only at the revision read: one
    /// statement and one look-up instead of two of each.
    fn commit_one(
        &mut self,
        plugin: &str,
        event_id: &str,
        effects: &Effects,
        now: Millis,
    ) -> rusqlite::Result<Outcome> {
        if self.mark.execute(params![plugin, event_id, now])? == 0 {
            return Ok(Outcome::Duplicate);
        }
        let checked_by_first_write = match effects.writes.first() {
            Some(Write::Put { collection, key, .. }) => {
                effects.reads.iter().position(|r| r.collection == *collection && r.key == *key)
            }
            _ => None,
        };
        for (i, read) in effects.reads.iter().enumerate() {
            if Some(i) == checked_by_first_write {
                continue;
            }
            let current: i64 =
                self.rev.query_row(params![plugin, read.collection, read.key], |r| r.get(0)).optional()?.unwrap_or(0);
            if current != read.rev {
                return self.conflict(plugin, event_id);
            }
        }
        for (i, write) in effects.writes.iter().enumerate() {
            match write {
                Write::Put { collection, key, body, version } => {
                    let version = version.map(|v| v as i64);
                    let at = checked_by_first_write.filter(|_| i == 0).map(|r| effects.reads[r].rev);
                    let written = match at {
                        None => self.put.execute(params![plugin, collection, key, body, version])?,
                        Some(0) => self.put_new.execute(params![plugin, collection, key, body, version])?,
                        Some(rev) => self.put_at.execute(params![plugin, collection, key, body, version, rev])?,
                    };
                    if written == 0 {
                        return self.conflict(plugin, event_id);
                    }
                }
                Write::Delete { collection, key, version: Some(v) } => {
                    self.tombstone.execute(params![plugin, collection, key, *v as i64])?;
                }
                Write::Delete { collection, key, version: None } => {
                    self.delete.execute(params![plugin, collection, key])?;
                }
            }
        }
        for row in &effects.outbox {
            self.outbox.execute(params![
                row.id,
                row.name,
                row.source,
                row.key,
                row.correlation_id,
                row.causation_id,
                row.headers,
                row.payload,
                now,
                Millis(now.0.saturating_add(row.delay_ms))
            ])?;
        }
        Ok(Outcome::Committed)
    }

    /// Undo the marker of an invocation whose reads went stale; it wrote nothing else.
    fn conflict(&mut self, plugin: &str, event_id: &str) -> rusqlite::Result<Outcome> {
        self.unmark.execute(params![plugin, event_id])?;
        Ok(Outcome::Conflict)
    }
}

/// Writes a processed-marker, unless the (plugin, event id) has one.
const MARK: &str = "INSERT OR IGNORE INTO processed (plugin, event_id, processed_at) VALUES (?1, ?2, ?3)";
/// Deletes a processed-marker.
const UNMARK: &str = "DELETE FROM processed WHERE plugin = ?1 AND event_id = ?2";

fn park(c: &Connection, row: &ParkedRow) -> rusqlite::Result<()> {
    match row.seq {
        Some(seq) => {
            c.prepare_cached("UPDATE parked SET attempt = ?2, deliver_at = ?3, reason = ?4 WHERE seq = ?1")?
                .execute(params![seq, row.attempt, row.deliver_at, row.reason])?;
        }
        None => {
            c.prepare_cached(
                "INSERT INTO parked (plugin, event_id, ordering_key, attempt, first_failed_at, deliver_at, reason, transport, body)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?
            .execute(params![
                row.plugin,
                row.event_id,
                row.ordering_key,
                row.attempt,
                row.first_failed_at,
                row.deliver_at,
                row.reason,
                row.transport,
                row.body
            ])?;
        }
    }
    Ok(())
}

/// Keep a dead letter, with its processed-marker when asked (added to `markers` too).
fn insert_dead_letter(
    c: &Connection,
    letter: &DeadLetter,
    now: Millis,
    markers: &MarkerFilter,
) -> rusqlite::Result<()> {
    c.prepare_cached(
        "INSERT INTO dead_letters (plugin, event_id, name, reason, attempts, first_failed_at, last_failed_at, transport, body)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
        letter.plugin,
        letter.event_id,
        letter.name,
        letter.reason,
        letter.attempts,
        letter.first_failed_at,
        now,
        letter.transport,
        letter.body
    ])?;
    if letter.mark_processed
        && let Some(id) = &letter.event_id
    {
        markers.add(&letter.plugin, id);
        c.prepare_cached(MARK)?.execute(params![letter.plugin, id, now])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::soon;

    fn writer() -> (tempfile::TempDir, Writer, Readers) {
        let dir = tempfile::tempdir().unwrap();
        let w = Writer::start(dir.path(), &StoreConfig::default()).unwrap();
        let r = w.readers();
        (dir, w, r)
    }

    fn put(key: &str, body: &str) -> Write {
        Write::Put { collection: "c".into(), key: key.into(), body: body.into(), version: None }
    }

    #[tokio::test]
    async fn effects_and_marker_commit_together_and_duplicates_apply_nothing() {
        let (_d, w, r) = writer();
        let p: Arc<str> = "p".into();
        let effects = Effects { writes: vec![put("k", r#"{"n":1}"#)], ..Default::default() };
        assert_eq!(w.commit(p.clone(), "e1".into(), effects).await.unwrap(), Outcome::Committed);
        assert!(r.processed("p", "e1").unwrap());
        let again = Effects { writes: vec![put("k", r#"{"n":2}"#)], ..Default::default() };
        assert_eq!(w.commit(p, "e1".into(), again).await.unwrap(), Outcome::Duplicate);
        assert_eq!(r.get("p", "c", "k").unwrap().unwrap().body.as_deref(), Some(r#"{"n":1}"#));
    }

    #[tokio::test]
    async fn a_failed_transaction_answers_with_its_reason_and_the_writer_goes_on() {
        let (_d, w, r) = writer();
        let refuse =
            "CREATE TRIGGER refuse BEFORE INSERT ON dead_letters BEGIN SELECT RAISE(ABORT, 'the disk said no'); END;";
        w.execute(refuse.into()).await.unwrap().unwrap();
        let letter = marking_letter("e1");
        let refused = w.dead_letter(letter.clone()).await.expect("the writer answers, it has not stopped");
        assert!(refused.as_ref().is_err_and(|e| e.contains("the disk said no")), "{refused:?}");
        assert!(!r.processed("p", "e1").unwrap(), "the failed transaction left no marker");
        let p: Arc<str> = "p".into();
        assert_eq!(w.commit(p, "e2".into(), Effects::default()).await.unwrap(), Outcome::Committed);
        w.execute("DROP TRIGGER refuse;".into()).await.unwrap().unwrap();
        assert_eq!(w.dead_letter(letter).await.unwrap(), Ok(()));
        assert!(r.processed("p", "e1").unwrap());
    }

    #[tokio::test]
    async fn a_stale_read_conflicts_and_rolls_back_only_that_invocation() {
        let (_d, w, r) = writer();
        let p: Arc<str> = "p".into();
        w.commit(p.clone(), "e1".into(), Effects { writes: vec![put("k", "{}")], ..Default::default() }).await.unwrap();
        let stale = Effects {
            reads: vec![ReadCheck { collection: "c".into(), key: "k".into(), rev: 0 }],
            writes: vec![put("other", "{}")],
            outbox: vec![],
        };
        assert_eq!(w.commit(p.clone(), "e2".into(), stale).await.unwrap(), Outcome::Conflict);
        assert!(!r.processed("p", "e2").unwrap(), "a conflict leaves no marker");
        assert!(r.get("p", "c", "other").unwrap().is_none(), "and no write");
        let fresh = Effects {
            reads: vec![ReadCheck { collection: "c".into(), key: "k".into(), rev: 1 }],
            ..Default::default()
        };
        assert_eq!(w.commit(p, "e2".into(), fresh).await.unwrap(), Outcome::Committed);
    }

    #[tokio::test]
    async fn a_put_of_a_document_read_applies_only_at_the_revision_read() {
        let (_d, w, r) = writer();
        let p: Arc<str> = "p".into();
        let read_then_put = |rev: i64, body: &str| Effects {
            reads: vec![ReadCheck { collection: "c".into(), key: "k".into(), rev }],
            writes: vec![put("k", body), put("after", body)],
            outbox: vec![],
        };
        let body = |key: &str| r.get("p", "c", key).unwrap().and_then(|s| s.body);
        let refused = |outcome: Outcome, event_id: &str| {
            assert_eq!(outcome, Outcome::Conflict, "{event_id}");
            assert!(!r.processed("p", event_id).unwrap(), "{event_id} leaves no marker");
            assert!(body("after").is_none(), "{event_id} applies none of its writes");
        };

        w.commit(p.clone(), "create".into(), Effects { writes: vec![put("k", "1")], ..Default::default() })
            .await
            .unwrap();
        refused(w.commit(p.clone(), "read-absent".into(), read_then_put(0, "0")).await.unwrap(), "read-absent");
        w.commit(p.clone(), "update".into(), Effects { writes: vec![put("k", "2")], ..Default::default() })
            .await
            .unwrap();
        refused(w.commit(p.clone(), "read-rev-1".into(), read_then_put(1, "x")).await.unwrap(), "read-rev-1");
        assert_eq!(body("k").as_deref(), Some("2"), "a refused put leaves the document as it was");

        let outcome = w.commit(p.clone(), "read-rev-2".into(), read_then_put(2, "3")).await.unwrap();
        assert_eq!(outcome, Outcome::Committed);
        assert_eq!(r.get("p", "c", "k").unwrap().map(|s| (s.body, s.rev)), Some((Some("3".into()), 3)));
        assert_eq!(body("after").as_deref(), Some("3"));

        let delete = Write::Delete { collection: "c".into(), key: "k".into(), version: None };
        w.commit(p.clone(), "delete".into(), Effects { writes: vec![delete], ..Default::default() }).await.unwrap();
        w.commit(
            p.clone(),
            "clear".into(),
            Effects {
                writes: vec![Write::Delete { collection: "c".into(), key: "after".into(), version: None }],
                ..Default::default()
            },
        )
        .await
        .unwrap();
        refused(w.commit(p.clone(), "read-deleted".into(), read_then_put(3, "x")).await.unwrap(), "read-deleted");
        assert!(body("k").is_none(), "a document deleted since it was read is not written back");
        let outcome = w.commit(p, "read-absent-again".into(), read_then_put(0, "4")).await.unwrap();
        assert_eq!(outcome, Outcome::Committed);
        assert_eq!(r.get("p", "c", "k").unwrap().map(|s| (s.body, s.rev)), Some((Some("4".into()), 1)));
    }

    #[tokio::test]
    async fn expired_markers_are_pruned_and_recent_ones_kept() {
        let (_d, w, r) = writer();
        let p: Arc<str> = "p".into();
        w.commit(p.clone(), "old".into(), Effects::default()).await.unwrap();
        let cutoff = Millis(Millis::now().0 + 1);
        std::thread::sleep(std::time::Duration::from_millis(5));
        w.commit(p, "new".into(), Effects::default()).await.unwrap();
        assert_eq!(w.prune(cutoff).await.unwrap().unwrap(), 1);
        assert!(!r.processed("p", "old").unwrap(), "older than the cutoff: dropped");
        assert!(r.processed("p", "new").unwrap(), "younger: kept");
    }

    #[tokio::test]
    async fn pruning_drops_every_expired_marker_however_many_batches_they_take() {
        let (_d, w, r) = writer();
        let expired = 2 * PRUNE_BATCH + 7;
        // A second old: expired for the cutoff below.
        let old = Millis::now().0 - 1_000;
        w.execute(format!(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {expired})
             INSERT INTO processed (plugin, event_id, processed_at) SELECT 'p', 'old-' || i, {old} FROM n"
        ))
        .await
        .unwrap()
        .unwrap();
        assert!(r.processed("p", "old-1").unwrap(), "markers written by SQL are found, filter or not");
        w.commit("p".into(), "new".into(), Effects::default()).await.unwrap();
        built(&w).await;
        assert!(w.snapshot.markers.may_hold("p", "old-1"), "the filter built again holds them");
        assert_eq!(w.prune(Millis(old + 1)).await.unwrap().unwrap(), expired as u64);
        assert!(!r.processed("p", &format!("old-{expired}")).unwrap(), "the last batch went too");
        assert!(r.processed("p", "new").unwrap(), "younger: kept");
    }

    #[tokio::test]
    async fn the_pruner_drops_expired_markers_at_once_and_ends_with_the_shutdown_signal() {
        let (_d, w, r) = writer();
        let p: Arc<str> = "p".into();
        w.commit(p, "old".into(), Effects::default()).await.unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let shutdown = CancellationToken::new();
        let pruner = tokio::spawn(prune_expired(w.clone(), std::time::Duration::from_millis(10), shutdown.clone()));
        assert!(soon(|| !r.processed("p", "old").unwrap()).await, "the first prune runs at start");
        assert!(!pruner.is_finished(), "it waits for the next round");
        shutdown.cancel();
        tokio::time::timeout(std::time::Duration::from_secs(10), pruner)
            .await
            .expect("the pruner ends once the shutdown signal is given")
            .unwrap();
    }

    /// A dead letter of plugin `p` that also marks `event_id` processed.
    fn marking_letter(event_id: &str) -> DeadLetter {
        DeadLetter {
            plugin: "p".into(),
            event_id: Some(event_id.into()),
            name: None,
            reason: "rejected".into(),
            attempts: 1,
            first_failed_at: Millis(0),
            transport: "{}".into(),
            body: b"{}".to_vec(),
            mark_processed: true,
        }
    }

    /// Wait until the writer's marker filter is built.
    async fn built(w: &Writer) {
        assert!(soon(|| w.snapshot.markers.is_built()).await, "the marker filter was not built within 10 s");
    }

    #[tokio::test]
    async fn the_marker_filter_holds_the_markers_of_an_earlier_run_and_every_commit_since() {
        let dir = tempfile::tempdir().unwrap();
        let earlier = Writer::start(dir.path(), &StoreConfig::default()).unwrap();
        earlier.commit("p".into(), "e1".into(), Effects::default()).await.unwrap();
        drop(earlier);
        let w = Writer::start(dir.path(), &StoreConfig::default()).unwrap();
        let r = w.readers();
        built(&w).await;
        let markers = &w.snapshot.markers;
        assert!(markers.may_hold("p", "e1"), "a marker of the earlier run");
        assert!(!markers.may_hold("p", "e2"), "an absent marker is ruled out without a read");
        assert!(!r.processed("p", "e2").unwrap());
        w.commit("p".into(), "e2".into(), Effects::default()).await.unwrap();
        assert!(markers.may_hold("p", "e2") && r.processed("p", "e2").unwrap(), "a commit since");
        w.dead_letter(marking_letter("e3")).await.unwrap().unwrap();
        assert!(r.processed("p", "e3").unwrap(), "a dead letter's marker");
    }

    #[tokio::test]
    async fn a_snapshot_read_sees_every_commit_made_before_it() {
        let (d, w, r) = writer();
        let p: Arc<str> = "p".into();
        assert!(!r.processed("p", "e1").unwrap(), "nothing committed yet");
        assert_eq!(r.get("p", "c", "k").unwrap(), None);
        // The reads left their snapshot open; the commit must not be hidden by it.
        let effects = Effects { writes: vec![put("k", r#"{"n":1}"#)], ..Default::default() };
        w.commit(p.clone(), "e1".into(), effects).await.unwrap();
        assert!(r.processed("p", "e1").unwrap(), "committed before the look-up");
        let first = r.get("p", "c", "k").unwrap().expect("committed before the read");
        assert_eq!(first.body.as_deref(), Some(r#"{"n":1}"#));
        let effects = Effects { writes: vec![put("k", r#"{"n":2}"#)], ..Default::default() };
        w.commit(p.clone(), "e3".into(), effects).await.unwrap();
        let second = r.get("p", "c", "k").unwrap().expect("still there");
        assert_eq!((second.body.as_deref(), second.rev), (Some(r#"{"n":2}"#), first.rev + 1));
        assert!(!r.processed("p", "e2").unwrap());
        w.dead_letter(marking_letter("e2")).await.unwrap().unwrap();
        assert!(r.processed("p", "e2").unwrap(), "a dead letter's marker is seen too");
        assert!(!Readers::new(d.path()).processed("q", "e1").unwrap(), "markers are per plugin");
    }

    #[tokio::test]
    async fn the_read_snapshot_does_not_hold_back_checkpoints() {
        let (d, w, r) = writer();
        let p: Arc<str> = "p".into();
        let body = format!(r#"{{"pad":"{}"}}"#, "x".repeat(64 * 1024));
        w.commit(p.clone(), "first".into(), Effects::default()).await.unwrap();
        assert!(r.processed("p", "first").unwrap());
        // 300 commits of 64 KiB, about 19 MiB of WAL frames: a snapshot kept open over them
        // would keep every checkpoint from reaching the end of the WAL, and so from starting
        // it again from the beginning.
        for i in 0..300 {
            let effects = Effects { writes: vec![put(&format!("k{i}"), &body)], ..Default::default() };
            assert_eq!(w.commit(p.clone(), format!("e{i}"), effects).await.unwrap(), Outcome::Committed);
        }
        let wal = std::fs::metadata(d.path().join(format!("{}-wal", db::FILE_NAME))).unwrap().len();
        assert!(wal < 12 * 1024 * 1024, "the WAL grew to {wal} bytes");
    }

    #[tokio::test]
    async fn versioned_delete_leaves_a_tombstone() {
        let (_d, w, r) = writer();
        let p: Arc<str> = "p".into();
        let del = Write::Delete { collection: "c".into(), key: "k".into(), version: Some(7) };
        w.commit(p, "e".into(), Effects { writes: vec![put("k", "{}"), del], ..Default::default() }).await.unwrap();
        assert_eq!(r.get("p", "c", "k").unwrap(), Some(db::Stored { body: None, version: Some(7), rev: 2 }));
        assert!(r.scan("p", "c", "", 10).unwrap().is_empty());
    }
}
