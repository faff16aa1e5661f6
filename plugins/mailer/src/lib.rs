//! Sends the email requests other plugins publish through a Resend-compatible API
//! (`POST {base_url}/emails`, bearer API key, JSON `from`, `to`, `subject`, `html`), one
//! template per notification type. A 5xx, a 429, a timeout or a failed connection is retried
//! with the router's backoff; any other answer outside 2xx dead-letters the request with the
//! API's answer. The event id goes
//! out as the `Idempotency-Key`, so an API that did send before failing does not send twice.
//!
//! Config: `base_url` and `api_key` (required; the key usually `{ env = "..." }`, never
//! logged), `from` (optional). The base URL's host must be in the plugin's `allowed_hosts`.

use flows::email::EmailRequest;
use serde::Serialize;
use serde_json::Value;
use switchyard_sdk::http::{HttpError, Request};
use switchyard_sdk::{Error, Event, Metadata, Plugin, Result, config, log};

/// Sender used when the config sets no `from`.
const DEFAULT_FROM: &str = "switchyard <notifications@example.com>";

/// What the email API receives.
#[derive(Debug, PartialEq, Serialize)]
struct Email {
    from: String,
    to: Vec<String>,
    subject: String,
    html: String,
}

/// Escape text for HTML.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The subject and HTML body of a request, from its template.
fn render(request: &EmailRequest) -> (String, String) {
    let text = |key: &str| request.data.get(key).and_then(Value::as_str).map(escape).unwrap_or_default();
    let hello = match &request.name {
        Some(name) => format!("<p>Hi {},</p>", escape(name)),
        None => "<p>Hi,</p>".to_string(),
    };
    let (subject, body) = match request.template.as_str() {
        "welcome" => (
            "Welcome aboard".to_string(),
            format!("<p>Your account <b>{}</b> is ready. Your music catalog is waiting for you.</p>", text("username")),
        ),
        "new_post" => ("Someone you follow posted".to_string(), format!("<p>{}</p>", text("message"))),
        "event_created" => ("A new event from someone you follow".to_string(), format!("<p>{}</p>", text("message"))),
        "event_updated" => ("An event you follow changed".to_string(), format!("<p>{}</p>", text("message"))),
        "event_cancelled" => ("An event you follow was cancelled".to_string(), format!("<p>{}</p>", text("message"))),
        _ => ("You have a new notification".to_string(), format!("<p>{}</p>", text("message"))),
    };
    (subject, format!("{hello}{body}"))
}

/// Send one email; the error says whether to retry.
fn send(email: &Email, idempotency_key: &str) -> Result<u16> {
    let base_url = config::require("base_url")?;
    let api_key = config::require("api_key")?;
    let url = format!("{}/emails", base_url.trim_end_matches('/'));
    let response = Request::post(&url)
        .bearer(&api_key)
        .header("idempotency-key", idempotency_key)
        .json(email)
        .and_then(Request::send)
        .map_err(|e| match e {
            HttpError::Timeout(_) | HttpError::Failed(_) => Error::retry(format!("email API: {e}")),
            HttpError::Denied(_) | HttpError::Invalid(_) => Error::reject(format!("email API: {e}")),
        })?;
    match response.status {
        200..=299 => Ok(response.status),
        429 | 500..=599 => Err(Error::retry(format!("email API answered {}: {}", response.status, response.text()))),
        status => Err(Error::reject(format!("email API refused the email with {status}: {}", response.text()))),
    }
}

struct Mailer;

impl Plugin for Mailer {
    fn metadata() -> Metadata {
        Metadata::new("mailer", env!("CARGO_PKG_VERSION")).subscribe([flows::email::EMAIL_REQUESTED])
    }

    fn handle(event: Event) -> Result<()> {
        let request: EmailRequest = event.json()?;
        if !request.to.contains('@') {
            return Err(Error::reject(format!("invalid recipient {:?}", request.to)));
        }
        let (subject, html) = render(&request);
        let from = config::get("from").unwrap_or_else(|| DEFAULT_FROM.to_string());
        let email = Email { from, to: vec![request.to.clone()], subject, html };
        let status = send(&email, &event.id)?;
        log::info!("{} email to {} accepted ({status})", request.template, request.to);
        Ok(())
    }
}

switchyard_sdk::plugin!(Mailer);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Map, json};

    fn request(template: &str, data: Value) -> EmailRequest {
        let Value::Object(data) = data else { panic!("data is an object") };
        EmailRequest { to: "a@example.com".into(), name: Some("Ana <3".into()), template: template.into(), data }
    }

    #[test]
    fn each_type_has_its_subject_and_text_is_escaped() {
        let (subject, html) = render(&request("new_post", json!({"message": "<script>x</script> & more"})));
        assert_eq!(subject, "Someone you follow posted");
        assert_eq!(html, "<p>Hi Ana &lt;3,</p><p>&lt;script&gt;x&lt;/script&gt; &amp; more</p>");
        let (subject, html) = render(&request("welcome", json!({"username": "john_doe"})));
        assert_eq!(subject, "Welcome aboard");
        assert!(html.contains("<b>john_doe</b>"), "{html}");
        assert_eq!(render(&request("event_cancelled", json!({}))).0, "An event you follow was cancelled");
        let unknown = EmailRequest { name: None, ..request("poke", Value::Object(Map::new())) };
        assert_eq!(render(&unknown), ("You have a new notification".into(), "<p>Hi,</p><p></p>".into()));
    }
}
