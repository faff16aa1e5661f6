//! `user.created`, the accounts service's integration event, in the two shapes producers
//! send: the bare user, or the seed's `IntegrationEvent` wrapper `{service, name, payload}`.

use serde::Deserialize;
use switchyard_sdk::{Event, Id, Result};

/// Event-name patterns of a created user: the short name and the seed's long integration
/// names (`com.<org>.accounts.users.integration.user-created`).
pub const USER_CREATED: [&str; 2] = ["user.created", "#.integration.user-created"];

/// A created user.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct NewUser {
    pub id: Id,
    pub username: String,
    pub email: String,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Shape {
    Wrapped { payload: NewUser },
    Bare(NewUser),
}

/// The user a `user.created` event carries, in either shape.
pub fn new_user(event: &Event) -> Result<NewUser> {
    Ok(match event.json::<Shape>()? {
        Shape::Wrapped { payload } | Shape::Bare(payload) => payload,
    })
}
