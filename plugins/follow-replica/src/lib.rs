//! Event-Carried State Transfer replica of the social graph: keeps `follow_refs` (who follows
//! whom) from the social service's events, for any plugin or service reading it locally.

use flows::follows::{self, FOLLOW_REFS, FOLLOWED_ID};
use switchyard_sdk::{Event, Metadata, Plugin, Result, log};

struct FollowReplica;

impl Plugin for FollowReplica {
    fn metadata() -> Metadata {
        Metadata::new("follow-replica", env!("CARGO_PKG_VERSION"))
            .subscribe(["follow.created", "follow.removed"])
            .ordering_key(["followed_id"])
            .index(FOLLOW_REFS.name(), FOLLOWED_ID)
    }

    fn handle(event: Event) -> Result<()> {
        let line = follows::apply(&event)?;
        log::debug!("{}: {line}", event.name);
        Ok(())
    }
}

switchyard_sdk::plugin!(FollowReplica);
