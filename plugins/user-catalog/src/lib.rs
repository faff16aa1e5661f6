//! The catalog half of the welcome flow (seed 004): a created user gets an empty music
//! catalog. A repeated `user.created` for the same user (a producer's retry with a new event
//! id) leaves the existing catalog as it is.

use flows::users::{USER_CREATED, new_user};
use serde::{Deserialize, Serialize};
use switchyard_sdk::{Collection, Event, Id, Metadata, Plugin, Result, log};

/// One catalog per user, keyed by user id.
static CATALOGS: Collection<Catalog> = Collection::new("catalogs");

#[derive(Debug, Serialize, Deserialize)]
struct Owner {
    id: Id,
    username: String,
}

/// A user's music catalog.
#[derive(Debug, Serialize, Deserialize)]
struct Catalog {
    user: Owner,
    playlists: Vec<serde_json::Value>,
    favorite_artists: Vec<serde_json::Value>,
    favorite_songs: Vec<serde_json::Value>,
    created_at: u64,
}

struct UserCatalog;

impl Plugin for UserCatalog {
    fn metadata() -> Metadata {
        Metadata::new("user-catalog", env!("CARGO_PKG_VERSION"))
            .subscribe(USER_CREATED)
            .ordering_key(["id", "payload.id"])
    }

    fn handle(event: Event) -> Result<()> {
        let user = new_user(&event)?;
        if CATALOGS.get(user.id.as_str())?.is_some() {
            log::info!("catalog of user {} exists: kept", user.id);
            return Ok(());
        }
        let key = user.id.to_string();
        let catalog = Catalog {
            user: Owner { id: user.id, username: user.username },
            playlists: Vec::new(),
            favorite_artists: Vec::new(),
            favorite_songs: Vec::new(),
            created_at: event.occurred_at,
        };
        CATALOGS.put(&key, &catalog)?;
        log::debug!("catalogs/{key} created");
        Ok(())
    }
}

switchyard_sdk::plugin!(UserCatalog);
