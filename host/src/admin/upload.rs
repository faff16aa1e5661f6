//! What `PUT /v1/plugins/{name}` carries: the component, and the settings it runs with. The
//! settings come as query parameters with an `application/wasm` body, or as a `settings` JSON
//! part next to a `component` part in `multipart/form-data`; only the JSON part can carry
//! config values (secrets do not belong in URLs, which proxies log).

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Query, Request};
use axum::http::header;
use serde::{Deserialize, Deserializer};
use utoipa::IntoParams;

use crate::admin::AdminError;
use crate::config::{AllowedHost, ConfigValue, InstancePolicy};
use crate::route::Pattern;
use crate::runtime::Overrides;

/// Settings of an upload that override the component's own metadata. What is not given keeps
/// the running version's value on a swap; a new plugin takes its `router.toml` entry's values
/// if it has one, else the defaults of an entry.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UploadSettings {
    /// Subscription patterns: comma-separated in the query, a list in JSON.
    #[serde(default, deserialize_with = "names")]
    #[param(value_type = Option<String>)]
    pub subscriptions: Option<Vec<String>>,
    /// Payload paths of the ordering key: comma-separated in the query, a list in JSON.
    #[serde(default, deserialize_with = "names")]
    #[param(value_type = Option<String>)]
    pub ordering_key: Option<Vec<String>>,
    /// Lanes: events handled at once.
    pub concurrency: Option<usize>,
    /// Unacknowledged messages of the plugin's RabbitMQ consumer.
    pub prefetch: Option<u16>,
    pub memory_mb: Option<u64>,
    pub timeout_ms: Option<u64>,
    pub instances: Option<InstancePolicy>,
    pub recycle_after: Option<u64>,
    /// Attempts in all before an event is dead-lettered.
    pub max_attempts: Option<u32>,
    pub initial_backoff_ms: Option<u64>,
    pub multiplier: Option<f64>,
    pub max_backoff_ms: Option<u64>,
    /// Fraction (0 to 1) of each backoff taken off at random.
    pub jitter: Option<f64>,
    /// Config values the plugin reads (JSON part only): text, or `{"env": "NAME"}` to read the
    /// router's environment; they replace the running version's values.
    #[param(ignore)]
    pub config: Option<BTreeMap<String, ConfigValue>>,
    /// Hosts the plugin may reach over HTTP (`host`, `host:port`, `*.domain`): comma-separated
    /// in the query, a list in JSON; they replace the running version's list.
    #[serde(default, deserialize_with = "names")]
    #[param(value_type = Option<String>)]
    pub allowed_hosts: Option<Vec<String>>,
    /// Event-name patterns the plugin may publish: comma-separated in the query, a list in
    /// JSON; they replace the running version's list.
    #[serde(default, deserialize_with = "names")]
    #[param(value_type = Option<String>)]
    pub publishes: Option<Vec<String>>,
}

/// A comma-separated string or a list of strings.
fn names<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Names {
        Text(String),
        List(Vec<String>),
    }
    Ok(Option::<Names>::deserialize(deserializer)?.map(|n| match n {
        Names::Text(text) => text.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect(),
        Names::List(list) => list,
    }))
}

/// A decoded upload.
pub struct Upload {
    pub component: Bytes,
    pub settings: UploadSettings,
}

/// Most a multipart upload may carry besides the component.
const MAX_SETTINGS_BYTES: usize = 64 * 1024;

impl Upload {
    /// Read an upload from the request, in either form.
    pub async fn read(request: Request) -> Result<Upload, AdminError> {
        let query = Query::<UploadSettings>::try_from_uri(request.uri())
            .map_err(|e| AdminError::BadRequest(format!("query: {}", e.body_text())))?
            .0;
        let multipart = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("multipart/form-data"));
        if !multipart {
            if query.config.is_some() {
                return Err(AdminError::BadRequest("config values go in the multipart settings part".into()));
            }
            let component = Bytes::from_request(request, &())
                .await
                .map_err(|e| AdminError::BadRequest(format!("body: {}", e.body_text())))?;
            return Ok(Upload { component, settings: query });
        }
        if request.uri().query().is_some_and(|q| !q.is_empty()) {
            return Err(AdminError::BadRequest(
                "give settings either as query parameters or as the settings part, not both".into(),
            ));
        }
        let mut form = Multipart::from_request(request, &())
            .await
            .map_err(|e| AdminError::BadRequest(format!("multipart: {}", e.body_text())))?;
        let (mut component, mut settings) = (None, UploadSettings::default());
        while let Some(field) = form.next_field().await.map_err(|e| AdminError::BadRequest(e.body_text()))? {
            match field.name() {
                Some("component") => {
                    component = Some(field.bytes().await.map_err(|e| AdminError::BadRequest(e.body_text()))?);
                }
                Some("settings") => {
                    let text = field.bytes().await.map_err(|e| AdminError::BadRequest(e.body_text()))?;
                    if text.len() > MAX_SETTINGS_BYTES {
                        return Err(AdminError::TooLarge(format!("settings are at most {MAX_SETTINGS_BYTES} bytes")));
                    }
                    settings = serde_json::from_slice(&text)
                        .map_err(|e| AdminError::BadRequest(format!("settings part: {e}")))?;
                }
                other => {
                    return Err(AdminError::BadRequest(format!(
                        "unexpected part {other:?}: the parts are `component` and `settings`"
                    )));
                }
            }
        }
        let component = component.ok_or_else(|| AdminError::BadRequest("the `component` part is missing".into()))?;
        Ok(Upload { component, settings })
    }
}

impl UploadSettings {
    /// The overrides of an upload: `base` changed by these settings. Subscriptions and the
    /// ordering key not given come from the component's metadata.
    pub fn overrides(self, mut base: Overrides) -> Result<Overrides, AdminError> {
        base.subscriptions = match &self.subscriptions {
            Some(list) => {
                let patterns = list.iter().map(|p| Pattern::parse(p)).collect::<Result<Vec<_>, _>>();
                Some(patterns.map_err(|e| AdminError::BadRequest(format!("subscriptions: {e}")))?)
            }
            None => None,
        };
        base.ordering_key = self.ordering_key;
        if self.concurrency == Some(0) {
            return Err(AdminError::BadRequest("concurrency must be at least 1".into()));
        }
        base.concurrency = self.concurrency.unwrap_or(base.concurrency);
        if self.prefetch == Some(0) {
            return Err(AdminError::BadRequest("prefetch must be at least 1".into()));
        }
        base.prefetch = self.prefetch.or(base.prefetch);
        base.limits.memory_mb = self.memory_mb.unwrap_or(base.limits.memory_mb);
        base.limits.timeout_ms = self.timeout_ms.unwrap_or(base.limits.timeout_ms);
        base.instances = self.instances.unwrap_or(base.instances);
        base.recycle_after = self.recycle_after.unwrap_or(base.recycle_after);
        let retry = &mut base.retry;
        retry.max_attempts = self.max_attempts.unwrap_or(retry.max_attempts);
        retry.initial_backoff_ms = self.initial_backoff_ms.unwrap_or(retry.initial_backoff_ms);
        retry.multiplier = self.multiplier.unwrap_or(retry.multiplier);
        retry.max_backoff_ms = self.max_backoff_ms.unwrap_or(retry.max_backoff_ms);
        retry.jitter = self.jitter.unwrap_or(retry.jitter);
        if retry.max_attempts == 0
            || !(retry.multiplier.is_finite() && retry.multiplier >= 1.0)
            || !(0.0..=1.0).contains(&retry.jitter)
        {
            return Err(AdminError::BadRequest(
                "max_attempts must be at least 1, multiplier at least 1.0 and jitter between 0 and 1".into(),
            ));
        }
        if let Some(config) = self.config {
            base.config = config;
        }
        if let Some(hosts) = &self.allowed_hosts {
            let hosts = hosts.iter().map(|h| AllowedHost::parse(h)).collect::<Result<Vec<_>, _>>();
            base.allowed_hosts = hosts.map_err(AdminError::BadRequest)?;
        }
        if let Some(names) = &self.publishes {
            let patterns = names.iter().map(|p| Pattern::parse(p)).collect::<Result<Vec<_>, _>>();
            base.publishes = patterns.map_err(|e| AdminError::BadRequest(format!("publishes: {e}")))?;
        }
        Ok(base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_are_comma_separated_in_the_query_and_arrays_in_json() {
        let uri = "/v1/plugins/x?subscriptions=a.b,%20c.*&ordering_key=k".parse().unwrap();
        let Query(query) = Query::<UploadSettings>::try_from_uri(&uri).unwrap();
        assert_eq!(query.subscriptions, Some(vec!["a.b".to_string(), "c.*".to_string()]));
        assert_eq!(query.ordering_key, Some(vec!["k".to_string()]));
        let json: UploadSettings =
            serde_json::from_str(r#"{"subscriptions":["a.b"],"config":{"url":"http://x","key":{"env":"K"}}}"#).unwrap();
        assert_eq!(json.subscriptions, Some(vec!["a.b".to_string()]));
        let config = json.config.unwrap();
        assert_eq!(config["key"], ConfigValue::Env { env: "K".into() });
        assert!(serde_json::from_str::<UploadSettings>(r#"{"colour":"blue"}"#).is_err());
    }

    #[test]
    fn bad_allowed_hosts_and_publish_patterns_are_refused_with_the_reason() {
        let bad_host = UploadSettings { allowed_hosts: Some(vec!["http://x".into()]), ..Default::default() };
        let e = bad_host.overrides(Overrides::defaults()).err().unwrap().to_string();
        assert!(e.contains("not a URL"), "{e}");
        let bad_name = UploadSettings { publishes: Some(vec!["a..b".into()]), ..Default::default() };
        let e = bad_name.overrides(Overrides::defaults()).err().unwrap().to_string();
        assert!(e.contains("publishes") && e.contains("empty word"), "{e}");
        let good = UploadSettings {
            allowed_hosts: Some(vec!["api.resend.com".into()]),
            publishes: Some(vec!["email.*".into()]),
            ..Default::default()
        };
        let o = good.overrides(Overrides::defaults()).unwrap();
        assert_eq!(o.allowed_hosts[0].as_str(), "api.resend.com");
        assert_eq!(o.publishes[0].as_str(), "email.*");
    }
}
