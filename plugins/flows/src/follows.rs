//! The follower replica: `follow.created` and `follow.removed` keep `follow_refs`, one document
//! per (follower, followed) pair, indexed by `followed_id` so an author's followers are found
//! without asking the social service.

use serde::{Deserialize, Serialize};
use switchyard_sdk::{Collection, Error, Event, Id, Result};

/// The replica: one document per pair, keyed `<followed_id>:<follower_id>` ([`key`]).
pub static FOLLOW_REFS: Collection<FollowRef> = Collection::new("follow_refs");

/// The indexed field of [`FOLLOW_REFS`] that finds an author's followers.
pub const FOLLOWED_ID: &str = "followed_id";

/// Payload of `follow.created`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FollowCreated {
    pub follower_id: Id,
    pub follower_email: String,
    #[serde(default)]
    pub follower_name: Option<String>,
    pub followed_id: Id,
}

/// Payload of `follow.removed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FollowRemoved {
    pub follower_id: Id,
    pub followed_id: Id,
}

/// A `follow_refs` document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FollowRef {
    pub follower_id: Id,
    pub follower_email: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub follower_name: Option<String>,
    pub followed_id: Id,
    /// The `occurred_at` of the event that wrote it.
    pub updated_at: u64,
}

/// The key of a pair's document.
pub fn key(followed_id: &Id, follower_id: &Id) -> String {
    crate::compound_key(&[followed_id.as_str(), follower_id.as_str()])
}

/// Apply `follow.created` or `follow.removed` to the replica. Versions are the events'
/// `occurred_at`, so a late, older event never undoes a newer one. Returns a log line.
pub fn apply(event: &Event) -> Result<String> {
    match event.name.as_str() {
        "follow.created" => {
            let f: FollowCreated = event.json()?;
            let key = key(&f.followed_id, &f.follower_id);
            let doc = FollowRef {
                follower_id: f.follower_id,
                follower_email: f.follower_email,
                follower_name: f.follower_name,
                followed_id: f.followed_id,
                updated_at: event.occurred_at,
            };
            let written = FOLLOW_REFS.put_if_newer(&key, &doc, event.occurred_at)?;
            Ok(format!("follow_refs/{key} {}", if written { "upserted" } else { "kept: a newer version is stored" }))
        }
        "follow.removed" => {
            let f: FollowRemoved = event.json()?;
            let key = key(&f.followed_id, &f.follower_id);
            let deleted = FOLLOW_REFS.delete_if_newer(&key, event.occurred_at)?;
            Ok(format!("follow_refs/{key} {}", if deleted { "deleted" } else { "absent or newer: not deleted" }))
        }
        other => Err(Error::reject(format!("not a follow event: {other}"))),
    }
}
