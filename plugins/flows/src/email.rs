//! `email.requested`: what `notifier` and `welcome` ask of `mailer`.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The event name of an email request.
pub const EMAIL_REQUESTED: &str = "email.requested";

/// One email to send, rendered by `mailer` from the template named `template`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmailRequest {
    /// Recipient address.
    pub to: String,
    /// Recipient's display name, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Template: a notification type (`new_post`, `event_created`, ...) or `welcome`.
    pub template: String,
    /// Values the template shows (`message`, `username`, ...).
    #[serde(default)]
    pub data: Map<String, Value>,
}
