//! The `store` import: a plugin's own collections of JSON documents.
//!
//! Writes are buffered in the invocation's [`Session`] and committed by the writer; reads see
//! the session's pending writes over the committed data. Every document a `get`, or a
//! versioned `put`/`delete`, looked at is recorded with its revision, so the commit can refuse
//! (and the router re-run) an invocation whose reads went stale. A document is read from the
//! database once per invocation: later looks see what that read saw (or the session's own
//! writes), which the revision check makes safe.

use std::collections::BTreeMap;
use std::collections::hash_map::Entry as Slot;
use std::sync::Arc;

use foldhash::{HashMap, HashMapExt};
use serde_json::value::RawValue;

use crate::commit::{ReadCheck, Write};
use crate::db::{self, FieldValue, Readers, Row};
use crate::runtime::bindings::switchyard::plugin::store::{Entry, Host, Page, StoreError, Value};
use crate::runtime::state::HostState;

/// Most entries one lookup or scan page returns.
pub const MAX_PAGE: u32 = 1000;

/// The latest state of a document this invocation wrote.
#[derive(Debug, Clone, PartialEq)]
enum Pending {
    Doc { body: String, version: Option<u64> },
    Tombstone { version: u64 },
    Absent,
}

type DocKey = (String, String);

/// Reads committed rows after a key, at most n: a scan or a lookup.
type FetchRows<'a> = &'a dyn Fn(&str, usize) -> Result<Vec<Row>, db::DbError>;

/// One invocation's view of its plugin's store.
pub struct Session {
    plugin: Arc<str>,
    readers: Readers,
    pending: HashMap<DocKey, Pending>,
    writes: Vec<Write>,
    /// What the first read of each document saw.
    reads: HashMap<DocKey, Read>,
}

/// A committed document as an invocation first read it.
#[derive(Debug)]
struct Read {
    /// Its revision then (0: absent).
    rev: i64,
    body: Option<String>,
    version: Option<u64>,
}

/// What a key currently holds, in this session's view.
#[derive(Clone, Copy)]
struct Current<'a> {
    body: Option<&'a str>,
    version: Option<u64>,
}

impl Session {
    pub fn new(plugin: Arc<str>, readers: Readers) -> Self {
        Session { plugin, readers, pending: HashMap::new(), writes: Vec::new(), reads: HashMap::new() }
    }

    /// The read checks and writes to commit.
    pub fn into_parts(self) -> (Vec<ReadCheck>, Vec<Write>) {
        let reads = self
            .reads
            .into_iter()
            .map(|((collection, key), read)| ReadCheck { collection, key, rev: read.rev })
            .collect();
        (reads, self.writes)
    }

    fn current(&mut self, collection: &str, key: &str) -> Result<Current<'_>, StoreError> {
        let id = (collection.to_string(), key.to_string());
        if let Some(p) = self.pending.get(&id) {
            return Ok(match p {
                Pending::Doc { body, version } => Current { body: Some(body), version: *version },
                Pending::Tombstone { version } => Current { body: None, version: Some(*version) },
                Pending::Absent => Current { body: None, version: None },
            });
        }
        let read = match self.reads.entry(id) {
            Slot::Occupied(seen) => seen.into_mut(),
            Slot::Vacant(unseen) => {
                let stored = self.readers.get(&self.plugin, collection, key).map_err(unavailable)?;
                unseen.insert(match stored {
                    Some(s) => Read { rev: s.rev, body: s.body, version: s.version },
                    None => Read { rev: 0, body: None, version: None },
                })
            }
        };
        Ok(Current { body: read.body.as_deref(), version: read.version })
    }

    pub fn get(&mut self, collection: &str, key: &str) -> Result<Option<Entry>, StoreError> {
        check_names(collection, key)?;
        let current = self.current(collection, key)?;
        Ok(current.body.map(|document| Entry {
            key: key.to_string(),
            document: document.to_string(),
            version: current.version,
        }))
    }

    pub fn put(
        &mut self,
        collection: &str,
        key: &str,
        document: String,
        if_newer: Option<u64>,
    ) -> Result<bool, StoreError> {
        check_names(collection, key)?;
        check_object(&document)?;
        if let Some(v) = if_newer
            && self.current(collection, key)?.version.is_some_and(|stored| stored > v)
        {
            return Ok(false);
        }
        self.pending
            .insert((collection.into(), key.into()), Pending::Doc { body: document.clone(), version: if_newer });
        self.writes.push(Write::Put {
            collection: collection.into(),
            key: key.into(),
            body: document,
            version: if_newer,
        });
        Ok(true)
    }

    pub fn delete(&mut self, collection: &str, key: &str, if_newer: Option<u64>) -> Result<bool, StoreError> {
        check_names(collection, key)?;
        let Current { body, version } = self.current(collection, key)?;
        let existed = body.is_some();
        if let Some(v) = if_newer
            && version.is_some_and(|stored| stored > v)
        {
            return Ok(false);
        }
        let pending = match if_newer {
            Some(version) => Pending::Tombstone { version },
            None => Pending::Absent,
        };
        self.pending.insert((collection.into(), key.into()), pending);
        self.writes.push(Write::Delete { collection: collection.into(), key: key.into(), version: if_newer });
        Ok(existed)
    }

    /// Documents matching `filter` after `cursor`, merging pending writes over committed rows.
    fn page(
        &self,
        collection: &str,
        limit: u32,
        cursor: Option<String>,
        filter: &dyn Fn(&str) -> bool,
        fetch: FetchRows<'_>,
    ) -> Result<Page, StoreError> {
        if collection.is_empty() {
            return Err(StoreError::InvalidArgument("collection must not be empty".into()));
        }
        if limit == 0 {
            return Err(StoreError::InvalidArgument("limit must be at least 1".into()));
        }
        let limit = limit.min(MAX_PAGE) as usize;
        let after = cursor.unwrap_or_default();
        let pending: Vec<(&String, &Pending)> =
            self.pending.iter().filter(|((c, k), _)| c == collection && *k > after).map(|((_, k), p)| (k, p)).collect();
        // Enough committed rows that, after pending writes shadow some, a full page remains.
        let rows = fetch(&after, limit + pending.len() + 1).map_err(unavailable)?;
        let mut merged: BTreeMap<String, Entry> = rows
            .into_iter()
            .filter(|r| !self.pending.contains_key(&(collection.to_string(), r.key.clone())))
            .map(|r| (r.key.clone(), Entry { key: r.key, document: r.body, version: r.version }))
            .collect();
        for (key, p) in pending {
            if let Pending::Doc { body, version } = p
                && filter(body)
            {
                merged.insert(key.clone(), Entry { key: key.clone(), document: body.clone(), version: *version });
            }
        }
        let more = merged.len() > limit;
        let entries: Vec<Entry> = merged.into_values().take(limit).collect();
        let next_cursor = if more { entries.last().map(|e| e.key.clone()) } else { None };
        Ok(Page { entries, next_cursor })
    }

    pub fn scan(&self, collection: &str, limit: u32, cursor: Option<String>) -> Result<Page, StoreError> {
        let readers = &self.readers;
        let plugin = &self.plugin;
        self.page(collection, limit, cursor, &|_| true, &|after, n| readers.scan(plugin, collection, after, n))
    }

    pub fn lookup(
        &self,
        indexes: &std::collections::HashSet<(String, String)>,
        collection: &str,
        field: &str,
        value: FieldValue,
        limit: u32,
        cursor: Option<String>,
    ) -> Result<Page, StoreError> {
        if !indexes.contains(&(collection.to_string(), field.to_string())) {
            return Err(StoreError::NotIndexed(format!(
                "{collection}.{field} is not indexed: declare it in the plugin metadata's indexes"
            )));
        }
        let readers = &self.readers;
        let plugin = &self.plugin;
        let matches = |body: &str| {
            serde_json::from_str::<serde_json::Value>(body)
                .ok()
                .and_then(|doc| doc.get(field).map(|v| value.matches(v)))
                .unwrap_or(false)
        };
        self.page(collection, limit, cursor, &matches, &|after, n| {
            readers.lookup(db::FieldIndex { plugin, collection, field }, &value, after, n)
        })
    }
}

fn unavailable(e: db::DbError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn check_names(collection: &str, key: &str) -> Result<(), StoreError> {
    if collection.is_empty() || key.is_empty() {
        return Err(StoreError::InvalidArgument("collection and key must not be empty".into()));
    }
    Ok(())
}

fn check_object(document: &str) -> Result<(), StoreError> {
    let raw: &RawValue =
        serde_json::from_str(document).map_err(|e| StoreError::InvalidDocument(format!("not JSON: {e}")))?;
    if !raw.get().starts_with('{') {
        return Err(StoreError::InvalidDocument("must be a JSON object".into()));
    }
    Ok(())
}

impl HostState {
    fn session(&mut self) -> Result<&mut Session, StoreError> {
        let invocation = self
            .invocation
            .as_mut()
            .ok_or_else(|| StoreError::Unavailable("the store is only available while handling an event".into()))?;
        invocation.reached_out = true;
        Ok(&mut invocation.store)
    }
}

impl Host for HostState {
    fn get(&mut self, collection: String, key: String) -> Result<Option<Entry>, StoreError> {
        self.session()?.get(&collection, &key)
    }

    fn put(
        &mut self,
        collection: String,
        key: String,
        document: String,
        if_newer: Option<u64>,
    ) -> Result<bool, StoreError> {
        self.session()?.put(&collection, &key, document, if_newer)
    }

    fn delete(&mut self, collection: String, key: String, if_newer: Option<u64>) -> Result<bool, StoreError> {
        self.session()?.delete(&collection, &key, if_newer)
    }

    fn lookup(
        &mut self,
        collection: String,
        field: String,
        value: Value,
        limit: u32,
        cursor: Option<String>,
    ) -> Result<Page, StoreError> {
        let plugin = self.plugin.clone();
        let value = match value {
            Value::Text(t) => FieldValue::Text(t),
            Value::Integer(i) => FieldValue::Integer(i),
            Value::Boolean(b) => FieldValue::Boolean(b),
        };
        self.session()?.lookup(&plugin.indexes, &collection, &field, value, limit, cursor)
    }

    fn scan(&mut self, collection: String, limit: u32, cursor: Option<String>) -> Result<Page, StoreError> {
        self.session()?.scan(&collection, limit, cursor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commit::{Effects, Outcome, Writer};
    use crate::config::StoreConfig;
    use std::collections::HashSet;

    struct Fixture {
        _dir: tempfile::TempDir,
        writer: Writer,
        readers: Readers,
    }

    async fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let writer = Writer::start(dir.path(), &StoreConfig::default()).unwrap();
        let index = db::FieldIndex { plugin: "p", collection: "follows", field: "followed_id" };
        writer.execute(index.ddl()).await.unwrap().unwrap();
        let readers = Readers::new(dir.path());
        Fixture { _dir: dir, writer, readers }
    }

    impl Fixture {
        fn session(&self) -> Session {
            Session::new("p".into(), self.readers.clone())
        }

        async fn commit(&self, id: &str, session: Session) -> Outcome {
            let (reads, writes) = session.into_parts();
            self.writer.commit("p".into(), id.into(), Effects { reads, writes, outbox: vec![] }).await.unwrap()
        }
    }

    fn keys(page: &Page) -> Vec<&str> {
        page.entries.iter().map(|e| e.key.as_str()).collect()
    }

    #[tokio::test]
    async fn reads_see_pending_writes_and_deletes() {
        let f = fixture().await;
        let mut s = f.session();
        assert!(s.put("c", "a", r#"{"v":1}"#.into(), None).unwrap());
        assert_eq!(s.get("c", "a").unwrap().unwrap().document, r#"{"v":1}"#);
        assert!(s.delete("c", "a", None).unwrap());
        assert!(s.get("c", "a").unwrap().is_none());
        assert!(!s.delete("c", "a", None).unwrap(), "nothing left to delete");
    }

    #[tokio::test]
    async fn if_newer_refuses_older_versions_including_after_a_versioned_delete() {
        let f = fixture().await;
        let mut s = f.session();
        assert!(s.put("c", "u", "{}".into(), Some(10)).unwrap());
        assert!(!s.put("c", "u", r#"{"old":true}"#.into(), Some(9)).unwrap());
        assert!(s.put("c", "u", r#"{"same":true}"#.into(), Some(10)).unwrap(), "a tie goes to the later write");
        assert_eq!(f.commit("e1", s).await, Outcome::Committed);

        let mut s = f.session();
        assert!(s.delete("c", "u", Some(20)).unwrap());
        assert_eq!(f.commit("e2", s).await, Outcome::Committed);

        let mut s = f.session();
        assert!(!s.put("c", "u", r#"{"late":true}"#.into(), Some(15)).unwrap(), "an older update must not resurrect");
        assert!(s.get("c", "u").unwrap().is_none());
        assert!(s.put("c", "u", r#"{"new":true}"#.into(), Some(21)).unwrap());
    }

    #[tokio::test]
    async fn concurrent_read_modify_write_conflicts_instead_of_losing_an_update() {
        let f = fixture().await;
        let mut first = f.session();
        let mut second = f.session();
        assert!(first.get("c", "counter").unwrap().is_none());
        assert!(second.get("c", "counter").unwrap().is_none());
        first.put("c", "counter", r#"{"n":1}"#.into(), None).unwrap();
        second.put("c", "counter", r#"{"n":1}"#.into(), None).unwrap();
        assert_eq!(f.commit("e1", first).await, Outcome::Committed);
        assert_eq!(f.commit("e2", second).await, Outcome::Conflict);
    }

    #[tokio::test]
    async fn a_document_is_read_once_per_invocation_and_a_change_since_conflicts() {
        let f = fixture().await;
        let mut s = f.session();
        assert!(s.get("c", "k").unwrap().is_none());

        let mut other = f.session();
        other.put("c", "k", r#"{"by":"other"}"#.into(), Some(5)).unwrap();
        assert_eq!(f.commit("e1", other).await, Outcome::Committed);

        assert!(s.get("c", "k").unwrap().is_none(), "the second look sees what the first read saw");
        assert!(s.put("c", "k", r#"{"by":"s"}"#.into(), Some(1)).unwrap(), "nor the other's newer version");
        assert_eq!(f.commit("e2", s).await, Outcome::Conflict, "the re-run will see the other's write");

        let mut rerun = f.session();
        assert_eq!(rerun.get("c", "k").unwrap().unwrap().version, Some(5));
        assert!(!rerun.put("c", "k", r#"{"by":"s"}"#.into(), Some(1)).unwrap());
    }

    #[tokio::test]
    async fn lookup_pages_merge_pending_writes_and_need_an_index() {
        let f = fixture().await;
        let mut s = f.session();
        for i in 0..5 {
            s.put("follows", &format!("f{i}"), format!(r#"{{"followed_id":"a","n":{i}}}"#), None).unwrap();
        }
        s.put("follows", "x", r#"{"followed_id":"b"}"#.into(), None).unwrap();
        f.commit("e1", s).await;

        let mut s = f.session();
        s.delete("follows", "f1", None).unwrap();
        s.put("follows", "f9", r#"{"followed_id":"a"}"#.into(), None).unwrap();
        s.put("follows", "f3", r#"{"followed_id":"b"}"#.into(), None).unwrap();
        let indexes: HashSet<_> = [("follows".to_string(), "followed_id".to_string())].into();
        let a = FieldValue::Text("a".into());
        let first = s.lookup(&indexes, "follows", "followed_id", a.clone(), 2, None).unwrap();
        assert_eq!(keys(&first), ["f0", "f2"]);
        let second = s.lookup(&indexes, "follows", "followed_id", a.clone(), 2, first.next_cursor).unwrap();
        assert_eq!(keys(&second), ["f4", "f9"]);
        assert_eq!(second.next_cursor, None);

        let err = s.lookup(&indexes, "follows", "n", FieldValue::Integer(1), 2, None).unwrap_err();
        assert!(matches!(err, StoreError::NotIndexed(_)));
        let all = s.scan("follows", 100, None).unwrap();
        assert_eq!(keys(&all), ["f0", "f2", "f3", "f4", "f9", "x"]);
    }

    #[tokio::test]
    async fn invalid_arguments_are_errors_the_plugin_sees() {
        let f = fixture().await;
        let mut s = f.session();
        assert!(matches!(s.put("c", "k", "[1]".into(), None), Err(StoreError::InvalidDocument(_))));
        assert!(matches!(s.put("c", "k", "{".into(), None), Err(StoreError::InvalidDocument(_))));
        assert!(matches!(s.get("", "k"), Err(StoreError::InvalidArgument(_))));
        assert!(matches!(s.scan("c", 0, None), Err(StoreError::InvalidArgument(_))));
    }
}
