//! The welcome half of the welcome flow (seed 004): a created user gets a welcome email,
//! requested from `mailer`. `user-catalog` handles the same event independently.

use flows::email::{EMAIL_REQUESTED, EmailRequest};
use flows::users::{USER_CREATED, new_user};
use serde_json::{Map, Value};
use switchyard_sdk::{Error, Event, Metadata, Plugin, Result, log, publish};

struct Welcome;

impl Plugin for Welcome {
    fn metadata() -> Metadata {
        Metadata::new("welcome", env!("CARGO_PKG_VERSION")).subscribe(USER_CREATED)
    }

    fn handle(event: Event) -> Result<()> {
        let user = new_user(&event)?;
        if !user.email.contains('@') {
            return Err(Error::reject(format!("user {} has no valid email: {:?}", user.id, user.email)));
        }
        let mut data = Map::new();
        data.insert("username".into(), Value::String(user.username.clone()));
        let request = EmailRequest { to: user.email, name: Some(user.username), template: "welcome".into(), data };
        publish(EMAIL_REQUESTED, &request)?;
        log::debug!("welcome email requested for user {}", user.id);
        Ok(())
    }
}

switchyard_sdk::plugin!(Welcome);
