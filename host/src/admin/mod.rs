//! The admin HTTP API (axum): health and readiness, plugins and their counters, pause and
//! resume, read-only store inspection, the HTTP event source, and Prometheus metrics.
//!
//! Every route but `GET /v1/health` requires `Authorization: Bearer <token>` when a token is
//! configured; without one the server binds to loopback only. Errors have one shape:
//! `{"error": {"code", "message"}}`; 4xx messages say why, 5xx are generic and logged.

mod errors;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Extension, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use utoipa::{IntoParams, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use errors::AdminError;

use crate::commit::Writer;
use crate::config::{InstancePolicy, PluginName, RabbitMqConfig, RedisConfig, Secret};
use crate::db::{FieldValue, Readers};
use crate::dispatch::{Dispatch, Inbound, PluginSlot};
use crate::envelope::{self, HeaderValue, NAME_HEADER, Transport};
use crate::event::Millis;
use crate::route::Pattern;
use crate::runtime::registry::Registry;
use crate::runtime::{LoadError, LoadedPlugin, Overrides, Runtime};
use crate::source::rabbitmq::{RabbitMqSource, rebind};
use crate::source::{Ack, InFlight, Received};
use crate::telemetry::{self, CountersSnapshot};

/// How long `POST /v1/events` waits for the plugins to settle the event.
const EVENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest event body accepted.
const MAX_EVENT_BYTES: usize = 1024 * 1024;
/// Largest component accepted.
const MAX_COMPONENT_BYTES: usize = 64 * 1024 * 1024;

/// What the admin API reads and controls of a running router.
#[derive(Clone)]
pub struct AdminState {
    pub token: Option<Secret>,
    pub readers: Readers,
    pub dispatches: Arc<Vec<Dispatch>>,
    /// Each source's name and whether it is connected.
    pub sources: Arc<Vec<(&'static str, Arc<std::sync::atomic::AtomicBool>)>>,
    pub in_flight: Arc<InFlight>,
    pub control: Control,
}

/// What swapping plugins needs: the runtime to compile them, the writer for their indexes,
/// the registry to keep them, and RabbitMQ to rebind their queues.
#[derive(Clone)]
pub struct Control {
    pub runtime: Arc<Runtime>,
    pub writer: Writer,
    pub registry: Registry,
    pub rabbitmq: Option<RabbitMqConfig>,
    pub redis: Option<RedisConfig>,
}

impl AdminState {
    fn slot(&self, name: &str) -> Result<&Arc<PluginSlot>, AdminError> {
        self.dispatches
            .iter()
            .map(Dispatch::slot)
            .find(|s| s.current().name.as_str() == name)
            .ok_or_else(|| AdminError::NotFound(format!("no plugin named {name:?}")))
    }
}

/// The OpenAPI description's root; the paths come from the handlers themselves.
#[derive(OpenApi)]
#[openapi(
    info(title = "switchyard admin API", description = "Plugins, store inspection, events and health of a switchyard router."),
    modifiers(&BearerAuth),
    tags((name = "admin"))
)]
struct ApiDoc;

/// Declares the bearer token every route but health needs.
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let scheme = SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build());
        openapi.components.get_or_insert_with(Default::default).add_security_scheme("bearer", scheme);
    }
}

/// The admin API's routes with their OpenAPI description, registered together so that they
/// cannot drift apart.
pub fn routes(state: AdminState) -> (axum::Router, utoipa::openapi::OpenApi) {
    let guarded = OpenApiRouter::new()
        .routes(routes!(ready))
        .routes(routes!(list_plugins))
        .routes(routes!(get_plugin, put_plugin))
        .routes(routes!(rollback))
        .routes(routes!(pause))
        .routes(routes!(resume))
        .routes(routes!(list_documents))
        .routes(routes!(get_document))
        .routes(routes!(post_event))
        .routes(routes!(metrics))
        .routes(routes!(openapi))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize));
    let (router, api) =
        OpenApiRouter::with_openapi(ApiDoc::openapi()).routes(routes!(health)).merge(guarded).split_for_parts();
    let router = router
        .fallback(|| async { AdminError::NotFound("no such route".into()) })
        .layer(DefaultBodyLimit::max(MAX_COMPONENT_BYTES))
        .layer(axum::Extension(Arc::new(api.clone())))
        .with_state(state);
    (router, api)
}

/// The admin API's routes, for serving or for `oneshot` in tests.
pub fn app(state: AdminState) -> axum::Router {
    routes(state).0
}

/// Bind and serve until `shutdown`. Without a token, a non-loopback address is replaced by
/// loopback on the same port. Returns the address bound.
pub async fn serve(address: &str, state: AdminState, shutdown: CancellationToken) -> anyhow::Result<SocketAddr> {
    let mut addr: SocketAddr = address.parse()?;
    if state.token.is_none() {
        if !addr.ip().is_loopback() {
            tracing::warn!(requested = %addr, "no admin token configured: the admin API binds to loopback only");
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        } else {
            tracing::warn!("no admin token configured: the admin API is open to local processes");
        }
    }
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tracing::info!(address = %bound, "admin API listening");
    let app = app(state);
    tokio::spawn(async move {
        let served = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await;
        if let Err(e) = served {
            tracing::error!(error = %e, "admin API stopped");
        }
    });
    Ok(bound)
}

async fn authorize(State(state): State<AdminState>, request: Request, next: Next) -> Response {
    let Some(token) = &state.token else { return next.run(request).await };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(p) if constant_time_eq(p.as_bytes(), token.expose().as_bytes()) => next.run(request).await,
        presented => {
            // The presented token is never logged, right or wrong.
            tracing::warn!(method = %request.method(), path = %request.uri().path(), token_presented = presented.is_some(), "admin request refused");
            AdminError::Unauthorized.into_response()
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The error body every failing route answers with.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
struct ErrorDetail {
    /// Stable machine-readable code, e.g. `not_found`.
    code: String,
    /// What went wrong, in words.
    message: String,
}

/// Liveness: the router process answers.
#[utoipa::path(get, path = "/v1/health", tag = "admin", responses((status = 200, description = "alive")))]
async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

/// Readiness: every source connected.
#[utoipa::path(get, path = "/v1/ready", tag = "admin", security(("bearer" = [])), responses(
    (status = 200, description = "ready"),
    (status = 503, description = "a source is not connected", body = ErrorBody),
))]
async fn ready(State(state): State<AdminState>) -> Result<Json<serde_json::Value>, AdminError> {
    let down: Vec<&str> =
        state.sources.iter().filter(|(_, c)| !c.load(std::sync::atomic::Ordering::SeqCst)).map(|(n, _)| *n).collect();
    if !down.is_empty() {
        return Err(AdminError::NotReady(format!("not connected: {}", down.join(", "))));
    }
    Ok(Json(serde_json::json!({ "status": "ready", "plugins": state.dispatches.len() })))
}

/// A plugin as the API shows it.
#[derive(Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct PluginView {
    pub name: String,
    pub version: String,
    pub digest: String,
    pub subscriptions: Vec<String>,
    pub ordering_key: Vec<String>,
    pub concurrency: usize,
    pub instances: String,
    pub memory_mb: u64,
    pub timeout_ms: u64,
    pub state: String,
    pub loaded_at: u64,
    pub counters: CountersSnapshot,
}

fn view(slot: &PluginSlot) -> PluginView {
    let p = slot.current();
    let s = &p.settings;
    PluginView {
        name: p.name.to_string(),
        version: p.version.clone(),
        digest: p.digest.clone(),
        subscriptions: s.subscriptions.0.iter().map(|p| p.as_str().to_string()).collect(),
        ordering_key: s.ordering_key.clone(),
        concurrency: s.concurrency,
        instances: format!("{:?}", s.instances).to_lowercase(),
        memory_mb: s.limits.memory_mb,
        timeout_ms: s.limits.timeout_ms,
        state: if slot.is_paused() { "paused" } else { "running" }.into(),
        loaded_at: slot.loaded_at.0,
        counters: slot.counters.snapshot(),
    }
}

/// Every running plugin.
#[utoipa::path(get, path = "/v1/plugins", tag = "admin", security(("bearer" = [])), responses((status = 200, body = [PluginView])))]
async fn list_plugins(State(state): State<AdminState>) -> Json<Vec<PluginView>> {
    Json(state.dispatches.iter().map(|d| view(d.slot())).collect())
}

/// One plugin: version, digest, subscriptions, limits, state, counters.
#[utoipa::path(get, path = "/v1/plugins/{name}", tag = "admin", security(("bearer" = [])), params(("name" = String, Path)), responses(
    (status = 200, body = PluginView),
    (status = 404, body = ErrorBody),
))]
async fn get_plugin(State(state): State<AdminState>, Path(name): Path<String>) -> Result<Json<PluginView>, AdminError> {
    Ok(Json(view(state.slot(&name)?)))
}

/// Stop taking events; the queue keeps filling.
#[utoipa::path(post, path = "/v1/plugins/{name}/pause", tag = "admin", security(("bearer" = [])), params(("name" = String, Path)), responses(
    (status = 200, body = PluginView),
    (status = 404, body = ErrorBody),
))]
async fn pause(State(state): State<AdminState>, Path(name): Path<String>) -> Result<Json<PluginView>, AdminError> {
    set_running(&state, &name, false)
}

/// Take events again, from where the plugin stopped.
#[utoipa::path(post, path = "/v1/plugins/{name}/resume", tag = "admin", security(("bearer" = [])), params(("name" = String, Path)), responses(
    (status = 200, body = PluginView),
    (status = 404, body = ErrorBody),
))]
async fn resume(State(state): State<AdminState>, Path(name): Path<String>) -> Result<Json<PluginView>, AdminError> {
    set_running(&state, &name, true)
}

fn set_running(state: &AdminState, name: &str, running: bool) -> Result<Json<PluginView>, AdminError> {
    let slot = state.slot(name)?;
    slot.set_running(running);
    tracing::info!(plugin = %name, running, "plugin state changed");
    Ok(Json(view(slot)))
}

/// Query of `PUT /v1/plugins/{name}`: settings that override the component's own metadata;
/// the rest keep the running version's values.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PutQuery {
    /// Comma-separated subscription patterns.
    pub subscriptions: Option<String>,
    /// Comma-separated payload paths of the ordering key.
    pub ordering_key: Option<String>,
    pub memory_mb: Option<u64>,
    pub timeout_ms: Option<u64>,
    pub instances: Option<InstancePolicy>,
    pub recycle_after: Option<u64>,
}

/// Reply of a swap or a rollback.
#[derive(Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Swapped {
    pub name: String,
    pub version: String,
    pub digest: String,
    pub previous_digest: String,
}

fn list(text: &str) -> Vec<String> {
    text.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect()
}

/// Load a new version of a plugin: compiled and checked before anything changes, then
/// swapped in atomically (invocations under way finish on the old version), kept in the
/// registry, and its queue rebound when its subscriptions changed.
#[utoipa::path(put, path = "/v1/plugins/{name}", tag = "admin", security(("bearer" = [])),
    params(("name" = String, Path), PutQuery),
    request_body(content = Vec<u8>, content_type = "application/wasm", description = "the component"),
    responses(
        (status = 200, description = "swapped", body = Swapped),
        (status = 400, description = "not a component, or bad settings", body = ErrorBody),
        (status = 422, description = "a component that does not fit the plugin world", body = ErrorBody),
        (status = 501, description = "the plugin is not running", body = ErrorBody),
))]
async fn put_plugin(
    State(state): State<AdminState>,
    Path(name): Path<String>,
    Query(query): Query<PutQuery>,
    body: Bytes,
) -> Result<Json<Swapped>, AdminError> {
    let plugin_name = PluginName::parse(&name).map_err(AdminError::BadRequest)?;
    let Ok(slot) = state.slot(&name) else {
        return Err(AdminError::NotImplemented(format!(
            "no plugin named {name:?} is running; adding plugins over the API is not supported yet: add it to router.toml"
        )));
    };
    let current = slot.current();
    let mut overrides = Overrides::of(&current.settings);
    overrides.subscriptions = None;
    overrides.ordering_key = None;
    if let Some(text) = &query.subscriptions {
        let patterns = list(text).iter().map(|p| Pattern::parse(p)).collect::<Result<Vec<_>, _>>();
        overrides.subscriptions = Some(patterns.map_err(|e| AdminError::BadRequest(format!("subscriptions: {e}")))?);
    }
    overrides.ordering_key = query.ordering_key.as_deref().map(list);
    overrides.limits.memory_mb = query.memory_mb.unwrap_or(overrides.limits.memory_mb);
    overrides.limits.timeout_ms = query.timeout_ms.unwrap_or(overrides.limits.timeout_ms);
    overrides.instances = query.instances.unwrap_or(overrides.instances);
    overrides.recycle_after = query.recycle_after.unwrap_or(overrides.recycle_after);
    let loaded = state.control.runtime.load(&plugin_name, &body, overrides).await.map_err(|e| match e {
        LoadError::NotAComponent(_) | LoadError::Read { .. } => AdminError::BadRequest(e.to_string()),
        other => AdminError::Unprocessable(other.to_string()),
    })?;
    for (collection, field) in &loaded.indexes {
        let indexed = state.control.writer.execute(crate::db::index_ddl(field)).await;
        if !matches!(indexed, Ok(Ok(()))) {
            return Err(AdminError::Internal(format!("cannot index {collection}.{field}")));
        }
    }
    let (added, removed) = subscription_changes(&current, &loaded);
    let queue = state.control.rabbitmq.as_ref().map(|r| (r, RabbitMqSource::queue_name(r, &name)));
    if let Some((rabbit, queue)) = &queue
        && !added.is_empty()
    {
        rebind(rabbit, queue, &added, &[]).await.map_err(|e| AdminError::Internal(format!("binding {queue}: {e}")))?;
    }
    state
        .control
        .registry
        .save(&name, &loaded.bytes, &loaded.settings.stored())
        .map_err(|e| AdminError::Internal(format!("saving {name} in the registry: {e}")))?;
    let reply = Swapped {
        name: name.clone(),
        version: loaded.version.clone(),
        digest: loaded.digest.clone(),
        previous_digest: current.digest.clone(),
    };
    slot.swap(loaded);
    tracing::info!(plugin = %name, version = %reply.version, digest = %reply.digest, "plugin swapped");
    // Old bindings go only after the new version runs, so no event falls between them.
    if let Some((rabbit, queue)) = &queue
        && !removed.is_empty()
        && let Err(e) = rebind(rabbit, queue, &[], &removed).await
    {
        tracing::warn!(plugin = %name, error = %e, "could not unbind old subscriptions; the plugin may receive events it no longer subscribes to");
    }
    Ok(Json(reply))
}

fn subscription_changes(old: &LoadedPlugin, new: &LoadedPlugin) -> (Vec<String>, Vec<String>) {
    let names =
        |p: &LoadedPlugin| p.settings.subscriptions.0.iter().map(|s| s.as_str().to_string()).collect::<Vec<_>>();
    let (old, new) = (names(old), names(new));
    let added = new.iter().filter(|s| !old.contains(s)).cloned().collect();
    let removed = old.iter().filter(|s| !new.contains(s)).cloned().collect();
    (added, removed)
}

/// Swap back to the version before the last swap.
#[utoipa::path(post, path = "/v1/plugins/{name}/rollback", tag = "admin", security(("bearer" = [])), params(("name" = String, Path)), responses(
    (status = 200, body = Swapped),
    (status = 404, body = ErrorBody),
    (status = 409, description = "no previous version", body = ErrorBody),
))]
async fn rollback(State(state): State<AdminState>, Path(name): Path<String>) -> Result<Json<Swapped>, AdminError> {
    let slot = state.slot(&name)?;
    let before = slot.current();
    let Some(replaced) = slot.rollback() else {
        return Err(AdminError::Conflict(format!("plugin {name} has no previous version to roll back to")));
    };
    let now = slot.current();
    let (added, removed) = subscription_changes(&before, &now);
    if let Some(rabbit) = &state.control.rabbitmq {
        let queue = RabbitMqSource::queue_name(rabbit, &name);
        if let Err(e) = rebind(rabbit, &queue, &added, &removed).await {
            tracing::warn!(plugin = %name, error = %e, "could not rebind after rollback");
        }
    }
    if let Err(e) = state.control.registry.save(&name, &now.bytes, &now.settings.stored()) {
        tracing::warn!(plugin = %name, error = %e, "could not save the rolled-back version in the registry");
    }
    tracing::info!(plugin = %name, version = %now.version, "plugin rolled back");
    Ok(Json(Swapped {
        name,
        version: now.version.clone(),
        digest: now.digest.clone(),
        previous_digest: replaced.digest.clone(),
    }))
}

/// A stored document as the API shows it.
#[derive(Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct DocumentView {
    pub key: String,
    #[schema(value_type = Object)]
    pub document: serde_json::Value,
    pub version: Option<u64>,
}

fn document(key: String, body: &str, version: Option<u64>) -> Result<DocumentView, AdminError> {
    let document =
        serde_json::from_str(body).map_err(|e| AdminError::Internal(format!("stored document is not JSON: {e}")))?;
    Ok(DocumentView { key, document, version })
}

/// One document of a plugin's store.
#[utoipa::path(get, path = "/v1/plugins/{name}/store/{collection}/{key}", tag = "admin", security(("bearer" = [])),
    params(("name" = String, Path), ("collection" = String, Path), ("key" = String, Path)),
    responses((status = 200, body = DocumentView), (status = 404, body = ErrorBody)))]
async fn get_document(
    State(state): State<AdminState>,
    Path((name, collection, key)): Path<(String, String, String)>,
) -> Result<Json<DocumentView>, AdminError> {
    state.slot(&name)?;
    let stored = state.readers.get(&name, &collection, &key).map_err(|e| AdminError::Internal(e.to_string()))?;
    match stored.and_then(|s| s.body.map(|b| (b, s.version))) {
        Some((body, version)) => Ok(Json(document(key, &body, version)?)),
        None => Err(AdminError::NotFound(format!("no document {collection}/{key} in plugin {name}"))),
    }
}

/// Query of `GET /v1/plugins/{name}/store/{collection}`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// An indexed top-level field to match; without it, every document.
    pub field: Option<String>,
    pub value: Option<String>,
    /// How `value` is read: `text` (default), `integer` or `boolean`.
    #[serde(rename = "type")]
    pub value_type: Option<String>,
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

/// A page of documents.
#[derive(Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct PageView {
    pub documents: Vec<DocumentView>,
    pub next_cursor: Option<String>,
}

/// Documents by an indexed field, or all of them; paged by key.
#[utoipa::path(get, path = "/v1/plugins/{name}/store/{collection}", tag = "admin", security(("bearer" = [])),
    params(("name" = String, Path), ("collection" = String, Path), ListQuery),
    responses((status = 200, body = PageView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn list_documents(
    State(state): State<AdminState>,
    Path((name, collection)): Path<(String, String)>,
    Query(query): Query<ListQuery>,
) -> Result<Json<PageView>, AdminError> {
    let plugin = state.slot(&name)?.current();
    let limit = query.limit.unwrap_or(100).clamp(1, 1000) as usize;
    let after = query.cursor.unwrap_or_default();
    let rows = match (&query.field, &query.value) {
        (None, None) => state.readers.scan(&name, &collection, &after, limit + 1),
        (Some(field), Some(value)) => {
            if !plugin.indexes.iter().any(|(c, f)| c == &collection && f == field) {
                return Err(AdminError::BadRequest(format!(
                    "{collection}.{field} is not an indexed field of plugin {name}"
                )));
            }
            let value = match query.value_type.as_deref().unwrap_or("text") {
                "text" => FieldValue::Text(value.clone()),
                "integer" => FieldValue::Integer(
                    value.parse().map_err(|_| AdminError::BadRequest(format!("value {value:?} is not an integer")))?,
                ),
                "boolean" => FieldValue::Boolean(
                    value
                        .parse()
                        .map_err(|_| AdminError::BadRequest(format!("value {value:?} is not true or false")))?,
                ),
                other => {
                    return Err(AdminError::BadRequest(format!(
                        "type must be text, integer or boolean, not {other:?}"
                    )));
                }
            };
            state.readers.lookup(&name, &collection, field, &value, &after, limit + 1)
        }
        _ => return Err(AdminError::BadRequest("field and value go together".into())),
    }
    .map_err(|e| AdminError::Internal(e.to_string()))?;
    let more = rows.len() > limit;
    let documents =
        rows.into_iter().take(limit).map(|r| document(r.key, &r.body, r.version)).collect::<Result<Vec<_>, _>>()?;
    let next_cursor = if more { documents.last().map(|d| d.key.clone()) } else { None };
    Ok(Json(PageView { documents, next_cursor }))
}

/// Reply of `POST /v1/events`.
#[derive(Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct EventAccepted {
    pub id: String,
    pub name: String,
    /// Plugins that handled it (committed, already processed, or dead-lettered).
    pub plugins: Vec<String>,
}

/// The HTTP source: decode the body like a broker message, hand it to every subscribed plugin,
/// and answer once each has settled it (its effects committed, or dead-lettered).
#[utoipa::path(post, path = "/v1/events", tag = "admin", security(("bearer" = [])),
    request_body(content = Object, description = "an envelope: NestJS {pattern, data}, CloudEvents, or raw JSON named by x-event-name"),
    responses(
        (status = 200, description = "committed (or dead-lettered) by every subscribed plugin", body = EventAccepted),
        (status = 400, description = "not a decodable event", body = ErrorBody),
        (status = 413, description = "larger than 1 MiB", body = ErrorBody),
        (status = 503, description = "not settled", body = ErrorBody),
))]
async fn post_event(
    State(state): State<AdminState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<EventAccepted>, AdminError> {
    if body.len() > MAX_EVENT_BYTES {
        return Err(AdminError::TooLarge(format!("events are at most {MAX_EVENT_BYTES} bytes")));
    }
    let text_header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let mut transport = Transport {
        origin: "http".into(),
        content_type: text_header(header::CONTENT_TYPE.as_str()),
        received_at: Millis::now(),
        ..Default::default()
    };
    if let Some(name) = text_header(NAME_HEADER) {
        transport.headers.push((NAME_HEADER.into(), HeaderValue::Text(name)));
    }
    let decoded = envelope::decode(&body, &transport).map_err(|e| AdminError::BadRequest(e.to_string()))?;
    let event = decoded.event;
    let received = Received { body: body.to_vec(), transport };
    let mut plugins = Vec::new();
    let mut settled = Vec::new();
    for dispatch in state.dispatches.iter() {
        let plugin = dispatch.slot().current();
        if plugin.settings.subscriptions.matches(&event.name) {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let ack = Ack::notify(tx, state.in_flight.clone());
            dispatch.submit(Inbound { event: event.clone(), received: received.clone(), ack, attempt: 1 }).await;
            plugins.push(plugin.name.to_string());
            settled.push(rx);
        }
    }
    let all = futures::future::join_all(settled);
    match tokio::time::timeout(EVENT_TIMEOUT, all).await {
        Ok(results) if results.iter().all(Result::is_ok) => {
            Ok(Json(EventAccepted { id: event.id.0, name: event.name, plugins }))
        }
        Ok(_) => Err(AdminError::Unavailable("a plugin could not settle the event; send it again".into())),
        Err(_) => {
            Err(AdminError::Unavailable(format!("not settled within {EVENT_TIMEOUT:?}; it may still be handled")))
        }
    }
}

/// Prometheus text exposition.
#[utoipa::path(get, path = "/metrics", tag = "admin", security(("bearer" = [])), responses((status = 200, content_type = "text/plain", body = String)))]
async fn metrics(State(state): State<AdminState>) -> Response {
    if let Ok(backlog) = state.readers.outbox_backlog() {
        metrics::gauge!("switchyard_outbox_backlog").set(backlog as f64);
    }
    for (name, connected) in state.sources.iter() {
        let up = if connected.load(std::sync::atomic::Ordering::SeqCst) { 1.0 } else { 0.0 };
        metrics::gauge!("switchyard_source_connected", "source" => *name).set(up);
    }
    metrics::gauge!("switchyard_in_flight").set(state.in_flight.get() as f64);
    // Consumer lag, where the broker tells it.
    let plugins: Vec<String> = state.dispatches.iter().map(|d| d.slot().current().name.to_string()).collect();
    if let Some(rabbit) = &state.control.rabbitmq {
        let queues: Vec<String> = plugins.iter().map(|p| RabbitMqSource::queue_name(rabbit, p)).collect();
        let depths = crate::source::rabbitmq::queue_depths(rabbit.url.expose(), &queues).await;
        for (plugin, depth) in plugins.iter().zip(depths) {
            if let Some(depth) = depth {
                metrics::gauge!("switchyard_queue_ready", "plugin" => plugin.clone()).set(f64::from(depth));
            }
        }
    }
    if let Some(redis) = &state.control.redis {
        for g in crate::source::redis::group_lag(redis, &plugins).await {
            let labels = [("plugin", g.plugin.clone()), ("stream", g.stream.clone())];
            if let Some(lag) = g.lag {
                metrics::gauge!("switchyard_stream_lag", &labels).set(lag as f64);
            }
            metrics::gauge!("switchyard_stream_pending", &labels).set(g.pending as f64);
        }
    }
    let body = telemetry::prometheus().render();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// This API's OpenAPI 3 description.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "admin", security(("bearer" = [])), responses((status = 200, body = Object)))]
async fn openapi(Extension(api): Extension<Arc<utoipa::openapi::OpenApi>>) -> Json<utoipa::openapi::OpenApi> {
    Json((*api).clone())
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let message = match &self {
            AdminError::Internal(detail) => {
                tracing::error!(error = %detail, "admin request failed");
                "internal error".to_string()
            }
            other => other.to_string(),
        };
        (status, Json(serde_json::json!({ "error": { "code": code, "message": message } }))).into_response()
    }
}

impl AdminError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            AdminError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            AdminError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            AdminError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            AdminError::NotReady(_) => (StatusCode::SERVICE_UNAVAILABLE, "not_ready"),
            AdminError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            AdminError::Unprocessable(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_plugin"),
            AdminError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            AdminError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            AdminError::NotImplemented(_) => (StatusCode::NOT_IMPLEMENTED, "not_implemented"),
            AdminError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}
