//! Event-Carried State Transfer replica of users: rebuilds `user_refs` from the events the auth
//! and user services publish, so user data is read locally instead of asked of those services.

wit_bindgen::generate!({ path: "../../wit" });

use exports::switchyard::plugin::handler::Guest;
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use switchyard::plugin::log::{self, Level};
use switchyard::plugin::store::{self, StoreError};
use switchyard::plugin::types::{Event, HandlerError, Index, Metadata};

/// Collection holding one document per user, keyed by `user_id`.
const COLLECTION: &str = "user_refs";

/// The user fields replicated from `auth.tokenGenerated` and `user.updated`.
#[derive(Debug, PartialEq, Deserialize, Serialize)]
struct User {
    #[serde(deserialize_with = "non_empty")]
    user_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    picture: Option<Value>,
}

/// Payload of `auth.tokenGenerated`.
#[derive(Deserialize)]
struct TokenGenerated {
    user: User,
    token: Option<String>,
}

/// Payload of `user.updated`.
#[derive(Deserialize)]
struct UserUpdated {
    user: User,
}

/// Payload of `user.deleted`.
#[derive(Deserialize)]
struct UserDeleted {
    #[serde(deserialize_with = "non_empty")]
    user_id: String,
}

/// A `user_refs` document.
#[derive(Debug, PartialEq, Serialize)]
struct UserDoc {
    #[serde(flatten)]
    user: User,
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<String>,
    /// The `occurred-at` of the event that wrote it.
    updated_at: u64,
}

/// The part of a stored document that a change without a token keeps.
#[derive(Deserialize)]
struct StoredToken {
    token: Option<String>,
}

/// What one event asks of `user_refs`.
#[derive(Debug, PartialEq)]
enum Change {
    /// Write this document, unless a newer version is stored.
    Upsert(UserDoc),
    /// Delete the user with this id, unless a newer version is stored.
    Delete(String),
}

/// Deserializes a user id, which must be a non-empty string.
fn non_empty<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    let id = String::deserialize(deserializer)?;
    if id.is_empty() {
        return Err(de::Error::invalid_value(de::Unexpected::Str(""), &"a non-empty user id"));
    }
    Ok(id)
}

/// Parses the JSON payload of event `name`; the error is the reason to reject the event.
fn parse<'a, T: Deserialize<'a>>(name: &str, payload: &'a [u8]) -> Result<T, String> {
    serde_json::from_slice(payload).map_err(|e| format!("invalid {name} payload: {e}"))
}

/// The change event `name` asks for; the error is the reason to reject the event.
fn change_for(name: &str, payload: &[u8], occurred_at: u64) -> Result<Change, String> {
    Ok(match name {
        "auth.tokenGenerated" => {
            let TokenGenerated { user, token } = parse(name, payload)?;
            Change::Upsert(UserDoc { user, token, updated_at: occurred_at })
        }
        "user.updated" => {
            let UserUpdated { user } = parse(name, payload)?;
            Change::Upsert(UserDoc { user, token: None, updated_at: occurred_at })
        }
        "user.deleted" => Change::Delete(parse::<UserDeleted>(name, payload)?.user_id),
        _ => return Err(format!("no handler for {name}")),
    })
}

/// The token of a stored `user_refs` document, if it has one.
fn stored_token(document: &str) -> Result<Option<String>, String> {
    serde_json::from_str::<StoredToken>(document)
        .map(|stored| stored.token)
        .map_err(|e| format!("stored {COLLECTION} document is not a user document: {e}"))
}

/// Retry while the database is unavailable; reject on any other store error, which would recur.
fn store_failure(op: &str, error: StoreError) -> HandlerError {
    match error {
        StoreError::Unavailable(why) => HandlerError::Retry(format!("store unavailable: {why}")),
        other => HandlerError::Reject(format!("store {op} failed: {other}")),
    }
}

/// Upserts `doc`, keeping the stored token when `doc` carries none; returns whether it was written.
fn upsert(mut doc: UserDoc) -> Result<bool, HandlerError> {
    let key = doc.user.user_id.clone();
    if doc.token.is_none()
        && let Some(entry) = store::get(COLLECTION, &key).map_err(|e| store_failure("get", e))?
    {
        doc.token = stored_token(&entry.document).map_err(HandlerError::Reject)?;
    }
    let document =
        serde_json::to_string(&doc).map_err(|e| HandlerError::Reject(format!("cannot encode user {key}: {e}")))?;
    store::put(COLLECTION, &key, &document, Some(doc.updated_at)).map_err(|e| store_failure("put", e))
}

/// The plugin's exports.
struct UserReplica;

impl Guest for UserReplica {
    fn metadata() -> Metadata {
        Metadata {
            name: "user-replica".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            subscriptions: vec!["auth.tokenGenerated".into(), "user.updated".into(), "user.deleted".into()],
            ordering_key: vec!["user.user_id".into(), "user_id".into()],
            indexes: vec![Index { collection: COLLECTION.into(), field: "email".into() }],
        }
    }

    fn handle(event: Event) -> Result<(), HandlerError> {
        let change = change_for(&event.name, &event.payload, event.occurred_at).map_err(HandlerError::Reject)?;
        let line = match change {
            Change::Upsert(doc) => {
                let key = doc.user.user_id.clone();
                let outcome = if upsert(doc)? { "upserted" } else { "not upserted: a newer version is stored" };
                format!("{COLLECTION}/{key} {outcome}")
            }
            Change::Delete(key) => {
                let deleted =
                    store::delete(COLLECTION, &key, Some(event.occurred_at)).map_err(|e| store_failure("delete", e))?;
                let outcome = if deleted { "deleted" } else { "not deleted: absent or newer version stored" };
                format!("{COLLECTION}/{key} {outcome}")
            }
        };
        log::log(Level::Debug, &format!("{}: {line}", event.name));
        Ok(())
    }
}

export!(UserReplica);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The document `change_for` builds, as JSON, or the rejection reason.
    fn document(name: &str, payload: &str) -> Result<Value, String> {
        match change_for(name, payload.as_bytes(), 1_700)? {
            Change::Upsert(doc) => Ok(serde_json::to_value(doc).unwrap()),
            Change::Delete(key) => Ok(json!({ "deleted": key })),
        }
    }

    #[test]
    fn token_generated_stores_user_and_token() {
        let payload = r#"{"user":{"user_id":"u1","name":"Ada","email":"ada@example.com","role":"admin",
            "picture":"p.png","extra":1},"token":"t0k"}"#;
        let expected = json!({"user_id":"u1","name":"Ada","email":"ada@example.com","role":"admin",
            "picture":"p.png","token":"t0k","updated_at":1_700});
        assert_eq!(document("auth.tokenGenerated", payload), Ok(expected));
    }

    #[test]
    fn user_updated_omits_absent_fields_and_ignores_token() {
        let payload = r#"{"user":{"user_id":"u1","email":"new@example.com","picture":null},"token":"no"}"#;
        let expected = json!({"user_id":"u1","email":"new@example.com","updated_at":1_700});
        assert_eq!(document("user.updated", payload), Ok(expected));
    }

    #[test]
    fn user_deleted_names_the_user() {
        assert_eq!(document("user.deleted", r#"{"user_id":"u1"}"#), Ok(json!({"deleted":"u1"})));
    }

    #[test]
    fn rejects_bad_payloads_and_unknown_events() {
        for (name, payload) in [
            ("user.updated", "not json"),
            ("user.updated", r#"{"user":{"name":"Ada"}}"#),
            ("auth.tokenGenerated", r#"{"user":{"user_id":""}}"#),
            ("user.updated", r#"{"user_id":"u1"}"#),
            ("user.deleted", r#"{"user_id":7}"#),
            ("user.deleted", r#"{"user":{"user_id":"u1"}}"#),
        ] {
            let reason = document(name, payload).unwrap_err();
            assert!(reason.starts_with(&format!("invalid {name} payload: ")), "{reason}");
        }
        assert_eq!(document("user.created", "{}"), Err("no handler for user.created".into()));
    }

    #[test]
    fn reads_the_stored_token() {
        assert_eq!(stored_token(r#"{"user_id":"u1","token":"t0k"}"#), Ok(Some("t0k".into())));
        assert_eq!(stored_token(r#"{"user_id":"u1"}"#), Ok(None));
        assert!(stored_token("[]").is_err());
    }
}
