//! Typed collections over the plugin's document store: each document is a `T` stored as a
//! JSON object, read and written by key, found by an indexed field a page at a time.

use std::marker::PhantomData;

use serde::Serialize;
use serde::de::DeserializeOwned;

pub use crate::bindings::switchyard::plugin::store::Value;
use crate::bindings::switchyard::plugin::store::{self, Entry};
use crate::error::{Error, Result};

/// Documents fetched per page by [`Collection::find_by`] and [`Collection::scan`]: what one
/// handler holds in memory at a time, however many documents match.
const PAGE: u32 = 500;

/// A collection of the plugin's store whose documents are `T`.
pub struct Collection<T> {
    name: &'static str,
    documents: PhantomData<fn() -> T>,
}

/// A stored document with its key and the version given to the `put` that wrote it.
#[derive(Debug, Clone, PartialEq)]
pub struct Document<T> {
    pub key: String,
    pub value: T,
    pub version: Option<u64>,
}

impl<T: Serialize + DeserializeOwned> Collection<T> {
    pub const fn new(name: &'static str) -> Self {
        Collection { name, documents: PhantomData }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The document under `key`, or none.
    pub fn get(&self, key: &str) -> Result<Option<T>> {
        Ok(self.get_document(key)?.map(|d| d.value))
    }

    /// The document under `key` with its version, or none.
    pub fn get_document(&self, key: &str) -> Result<Option<Document<T>>> {
        store::get(self.name, key)?.map(|entry| self.decode(entry)).transpose()
    }

    /// Insert or replace the document under `key`.
    pub fn put(&self, key: &str, value: &T) -> Result<()> {
        store::put(self.name, key, &self.encode(key, value)?, None)?;
        Ok(())
    }

    /// Write the document unless one (or a deletion) with a greater version is stored;
    /// returns whether it was written. The event's `occurred_at` is the usual version.
    pub fn put_if_newer(&self, key: &str, value: &T, version: u64) -> Result<bool> {
        Ok(store::put(self.name, key, &self.encode(key, value)?, Some(version))?)
    }

    /// Delete the document under `key`; returns whether there was one.
    pub fn delete(&self, key: &str) -> Result<bool> {
        Ok(store::delete(self.name, key, None)?)
    }

    /// Delete unless a greater version is stored, leaving a tombstone so that an older write
    /// arriving later cannot bring the document back; returns whether one was deleted.
    pub fn delete_if_newer(&self, key: &str, version: u64) -> Result<bool> {
        Ok(store::delete(self.name, key, Some(version))?)
    }

    /// Every document whose top-level `field` equals `value`, by key, fetched a page at a
    /// time. The field must be declared with [`Metadata::index`](crate::Metadata::index).
    pub fn find_by(&self, field: &str, value: impl Into<Value>) -> Pages<'_, T> {
        Pages::new(self, Query::Lookup { field: field.into(), value: value.into() })
    }

    /// Every document of the collection, by key, fetched a page at a time.
    pub fn scan(&self) -> Pages<'_, T> {
        Pages::new(self, Query::Scan)
    }

    fn encode(&self, key: &str, value: &T) -> Result<String> {
        serde_json::to_string(value).map_err(|e| Error::Reject(format!("cannot encode {}/{key}: {e}", self.name)))
    }

    fn decode(&self, entry: Entry) -> Result<Document<T>> {
        let value = serde_json::from_str(&entry.document)
            .map_err(|e| Error::Reject(format!("stored document {}/{} does not decode: {e}", self.name, entry.key)))?;
        Ok(Document { key: entry.key, value, version: entry.version })
    }
}

impl From<&str> for Value {
    fn from(text: &str) -> Self {
        Value::Text(text.into())
    }
}

impl From<String> for Value {
    fn from(text: String) -> Self {
        Value::Text(text)
    }
}

impl From<i64> for Value {
    fn from(n: i64) -> Self {
        Value::Integer(n)
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Boolean(b)
    }
}

enum Query {
    Lookup { field: String, value: Value },
    Scan,
}

/// The documents of a lookup or scan, fetched a page at a time as the iterator advances.
pub struct Pages<'a, T> {
    collection: &'a Collection<T>,
    query: Query,
    page: std::vec::IntoIter<Entry>,
    /// The cursor of the next page; `None` once the last page was fetched.
    next: Option<Option<String>>,
}

impl<'a, T: Serialize + DeserializeOwned> Pages<'a, T> {
    fn new(collection: &'a Collection<T>, query: Query) -> Self {
        Pages { collection, query, page: Vec::new().into_iter(), next: Some(None) }
    }

    fn fetch(&mut self, cursor: Option<String>) -> Result<()> {
        let name = self.collection.name;
        let page = match &self.query {
            Query::Lookup { field, value } => store::lookup(name, field, value, PAGE, cursor.as_deref())?,
            Query::Scan => store::scan(name, PAGE, cursor.as_deref())?,
        };
        self.page = page.entries.into_iter();
        self.next = page.next_cursor.map(Some);
        Ok(())
    }
}

impl<T: Serialize + DeserializeOwned> Iterator for Pages<'_, T> {
    type Item = Result<Document<T>>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(entry) = self.page.next() {
                return Some(self.collection.decode(entry));
            }
            let cursor = self.next.take()?;
            if let Err(e) = self.fetch(cursor) {
                return Some(Err(e));
            }
        }
    }
}
