//! Notification fan-out (seed 001): when an author posts or changes an event, every follower
//! gets a `notifications` document and an email request, committed together. The followers
//! come from the plugin's own `follow_refs` replica, read a page at a time, so an author with
//! tens of thousands of followers needs no more plugin memory than one with ten.

use flows::email::{EMAIL_REQUESTED, EmailRequest};
use flows::follows::{self, FOLLOW_REFS, FOLLOWED_ID};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use switchyard_sdk::{Collection, Error, Event, Id, Metadata, Plugin, Result, log, publish};

/// One document per (event, follower), keyed `<event id>:<follower id>`.
static NOTIFICATIONS: Collection<Notification> = Collection::new("notifications");

/// Payload of `post.created`, `event.created`, `event.updated` and `event.cancelled`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Notice {
    #[serde(rename = "type")]
    kind: String,
    message: String,
    user_id: Id,
}

/// A `notifications` document.
#[derive(Debug, Serialize, Deserialize)]
struct Notification {
    user_id_receiver: Id,
    #[serde(rename = "type")]
    kind: String,
    message: String,
    /// The notice's `occurred_at`, in milliseconds since the Unix epoch.
    created_at: u64,
    /// Who caused it.
    author_id: Id,
}

/// Notify every follower of the notice's author; returns how many.
fn fan_out(event: &Event) -> Result<u64> {
    let notice: Notice = event.json()?;
    if notice.kind.is_empty() {
        return Err(Error::reject(format!("invalid {} payload: empty type", event.name)));
    }
    let mut notified = 0;
    for follower in FOLLOW_REFS.find_by(FOLLOWED_ID, notice.user_id.as_str()) {
        let follower = follower?.value;
        let notification = Notification {
            user_id_receiver: follower.follower_id.clone(),
            kind: notice.kind.clone(),
            message: notice.message.clone(),
            created_at: event.occurred_at,
            author_id: notice.user_id.clone(),
        };
        NOTIFICATIONS.put(&flows::compound_key(&[&event.id, follower.follower_id.as_str()]), &notification)?;
        let mut data = Map::new();
        data.insert("message".into(), Value::String(notice.message.clone()));
        data.insert("author_id".into(), Value::String(notice.user_id.to_string()));
        let email = EmailRequest {
            to: follower.follower_email,
            name: follower.follower_name,
            template: notice.kind.clone(),
            data,
        };
        publish(EMAIL_REQUESTED, &email)?;
        notified += 1;
    }
    Ok(notified)
}

struct Notifier;

impl Plugin for Notifier {
    fn metadata() -> Metadata {
        Metadata::new("notifier", env!("CARGO_PKG_VERSION"))
            .subscribe([
                "follow.created",
                "follow.removed",
                "post.created",
                "event.created",
                "event.updated",
                "event.cancelled",
            ])
            // An author's follows and notices in order: a notice reaches whoever followed before it.
            .ordering_key(["userId", "followed_id"])
            .index(FOLLOW_REFS.name(), FOLLOWED_ID)
            .index(NOTIFICATIONS.name(), "user_id_receiver")
    }

    fn handle(event: Event) -> Result<()> {
        let line = match event.name.as_str() {
            "follow.created" | "follow.removed" => follows::apply(&event)?,
            _ => format!("{} followers notified", fan_out(&event)?),
        };
        log::debug!("{}: {line}", event.name);
        Ok(())
    }
}

switchyard_sdk::plugin!(Notifier);
