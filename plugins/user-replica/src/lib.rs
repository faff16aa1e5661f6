//! Event-Carried State Transfer replica of users: rebuilds `user_refs` from the events the auth
//! and user services publish, so user data is read locally instead of asked of those services.

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use switchyard_sdk::{Collection, Error, Event, Metadata, Plugin, Result, log};

/// One document per user, keyed by `user_id`.
static USER_REFS: Collection<UserDoc> = Collection::new("user_refs");

/// The same documents, read for the one field an update without a token keeps: parsing the
/// whole stored document would cost as much as the event's own payload.
static USER_TOKENS: Collection<StoredToken> = Collection::new("user_refs");

/// The user fields replicated from `auth.tokenGenerated` and `user.updated`. The values are
/// copied as the event carries them, whatever their JSON type, not parsed into values and
/// written out again.
#[derive(Debug, Deserialize)]
struct User {
    #[serde(deserialize_with = "non_empty")]
    user_id: String,
    name: Option<Box<RawValue>>,
    email: Option<Box<RawValue>>,
    role: Option<Box<RawValue>>,
    picture: Option<Box<RawValue>>,
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

/// A `user_refs` document: the user's fields, its token and when it was written. Its fields
/// are spelled out rather than a flattened `User`, which serde would read through a buffer of
/// every member.
#[derive(Debug, Deserialize, Serialize)]
struct UserDoc {
    user_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    picture: Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<String>,
    /// The `occurred-at` of the event that wrote it.
    updated_at: u64,
}

impl UserDoc {
    fn new(user: User, token: Option<String>, updated_at: u64) -> Self {
        let User { user_id, name, email, role, picture } = user;
        UserDoc { user_id, name, email, role, picture, token, updated_at }
    }
}

/// The token of a stored `user_refs` document.
#[derive(Deserialize, Serialize)]
struct StoredToken {
    token: Option<String>,
}

/// What one event asks of `user_refs`.
#[derive(Debug)]
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

/// The change `event` asks for; an event that does not fit is rejected.
fn change_for(event: &Event) -> Result<Change> {
    Ok(match event.name.as_str() {
        "auth.tokenGenerated" => {
            let TokenGenerated { user, token } = event.json()?;
            Change::Upsert(UserDoc::new(user, token, event.occurred_at))
        }
        "user.updated" => {
            let UserUpdated { user } = event.json()?;
            Change::Upsert(UserDoc::new(user, None, event.occurred_at))
        }
        "user.deleted" => Change::Delete(event.json::<UserDeleted>()?.user_id),
        other => return Err(Error::reject(format!("no handler for {other}"))),
    })
}

/// Upserts `doc`, keeping the stored token when `doc` carries none; returns whether it was written.
fn upsert(doc: &mut UserDoc) -> Result<bool> {
    if doc.token.is_none()
        && let Some(stored) = USER_TOKENS.get(&doc.user_id)?
    {
        doc.token = stored.token;
    }
    USER_REFS.put_if_newer(&doc.user_id, doc, doc.updated_at)
}

/// The plugin.
struct UserReplica;

impl Plugin for UserReplica {
    fn metadata() -> Metadata {
        Metadata::new("user-replica", env!("CARGO_PKG_VERSION"))
            .subscribe(["auth.tokenGenerated", "user.updated", "user.deleted"])
            .ordering_key(["user.user_id", "user_id"])
            .index(USER_REFS.name(), "email")
    }

    fn handle(event: Event) -> Result<()> {
        let (key, outcome) = match change_for(&event)? {
            Change::Upsert(mut doc) => {
                let written = upsert(&mut doc)?;
                (doc.user_id, if written { "upserted" } else { "not upserted: a newer version is stored" })
            }
            Change::Delete(key) => {
                let deleted = USER_REFS.delete_if_newer(&key, event.occurred_at)?;
                (key, if deleted { "deleted" } else { "not deleted: absent or newer version stored" })
            }
        };
        log::debug!("{}: user_refs/{key} {outcome}", event.name);
        Ok(())
    }
}

switchyard_sdk::plugin!(UserReplica);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    /// The document `change_for` builds, as JSON, or the rejection reason.
    fn document(name: &str, payload: &str) -> Result<Value, String> {
        let event = Event {
            id: "e1".into(),
            name: name.into(),
            source: "test".into(),
            key: None,
            correlation_id: None,
            causation_id: None,
            occurred_at: 1_700,
            attempt: 1,
            headers: Vec::new(),
            payload: payload.as_bytes().to_vec(),
        };
        match change_for(&event).map_err(|e| match e {
            Error::Reject(reason) | Error::Retry(reason) => reason,
        })? {
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
}
