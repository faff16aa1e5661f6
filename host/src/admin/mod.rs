//! The admin HTTP API (axum): health and readiness, plugins and their counters; adding,
//! swapping, rolling back, pausing, resuming and removing plugins; read-only store
//! inspection; the HTTP event source; and Prometheus metrics.
//!
//! Every route but `GET /v1/health` requires `Authorization: Bearer <token>` when a token is
//! configured; without one the server binds to loopback only. Errors have one shape:
//! `{"error": {"code", "message"}}` (`/v1/ready`'s 503 adds the sources' readiness); 4xx
//! messages say why, 5xx are generic and logged.

mod dead_letters;
mod errors;
mod upload;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
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
use upload::Upload;
pub use upload::UploadSettings;

use crate::config::{PluginName, Secret};
use crate::db::{FieldIndex, FieldValue, Readers};
use crate::dispatch::{Dispatch, Inbound};
use crate::envelope::{self, HeaderValue, NAME_HEADER, Transport};
use crate::event::Millis;
use crate::plugins::{Change, Control, ControlError};
use crate::runtime::LoadError;
use crate::source::rabbitmq::RabbitMqSource;
use crate::source::{Ack, InFlight, Received, SourceHealth};
use crate::telemetry::{self, CountersSnapshot};

/// How long `POST /v1/events` waits for the plugins to settle the event.
const EVENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest event body accepted.
const MAX_EVENT_BYTES: usize = 1024 * 1024;
/// How long `DELETE /v1/plugins/{name}` waits for the plugin's events to settle.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest component accepted.
const MAX_COMPONENT_BYTES: usize = 64 * 1024 * 1024;

/// What the admin API reads and controls of a running router.
#[derive(Clone)]
pub struct AdminState {
    pub token: Option<Secret>,
    pub readers: Readers,
    /// Each source, and whether it is up.
    pub sources: Arc<Vec<SourceHealth>>,
    pub in_flight: Arc<InFlight>,
    pub control: Control,
}

impl AdminState {
    fn plugin(&self, name: &str) -> Result<Dispatch, AdminError> {
        self.control.plugins.get(name).ok_or_else(|| AdminError::NotFound(format!("no plugin named {name:?}")))
    }
}

impl From<ControlError> for AdminError {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::NotFound(name) => AdminError::NotFound(format!("no plugin named {name:?}")),
            ControlError::AlreadyRunning(e) => AdminError::Conflict(e.to_string()),
            ControlError::NoPrevious(_) => AdminError::Conflict(e.to_string()),
            ControlError::Load(LoadError::NotAComponent(_) | LoadError::Read { .. } | LoadError::MissingEnv { .. }) => {
                AdminError::BadRequest(e.to_string())
            }
            ControlError::Load(_) => AdminError::Unprocessable(e.to_string()),
            ControlError::Broker { .. } | ControlError::Redis(_) => AdminError::Unavailable(e.to_string()),
            ControlError::NothingLeft { .. } => AdminError::NotFound(e.to_string()),
            ControlError::PoolFull(_) | ControlError::NextStart { .. } => AdminError::Conflict(e.to_string()),
            ControlError::QueueInUse(_) | ControlError::IngressQueue(_) | ControlError::GroupInUse { .. } => {
                AdminError::Conflict(e.to_string())
            }
            ControlError::Registry(_) | ControlError::Index { .. } => AdminError::Internal(e.to_string()),
        }
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
        .routes(routes!(get_plugin, put_plugin, delete_plugin))
        .routes(routes!(rollback))
        .routes(routes!(pause))
        .routes(routes!(resume))
        .routes(routes!(list_documents))
        .routes(routes!(get_document))
        .routes(routes!(dead_letters::list, dead_letters::discard))
        .routes(routes!(dead_letters::replay))
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

/// A query string that does not parse gets the one error shape, saying why.
pub(crate) fn query_of<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, AdminError> {
    query.map(|Query(q)| q).map_err(|e| AdminError::BadRequest(format!("query: {}", e.body_text())))
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

/// Readiness: every source connected with every consumer running. A source that is not says
/// why: the error that ended its last session or kept the next from starting, the refusal of a
/// plugin's queue while the other plugins consume, or `connecting` while its first session is
/// under way. The answer lists each source with its reasons apart, for dashboards; the 503's
/// message joins them for people.
#[utoipa::path(get, path = "/v1/ready", tag = "admin", security(("bearer" = [])), responses(
    (status = 200, description = "every source ready", body = Ready),
    (status = 503, description = "a source is not connected, or not every consumer of it runs: \
        the message says `not connected: <source> (<why>)` for each such source, and `sources` \
        lists every source with its reasons", body = NotReady),
))]
async fn ready(State(state): State<AdminState>) -> Response {
    let sources: Vec<SourceReadiness> = state
        .sources
        .iter()
        .map(|s| {
            let reasons = s.health.reasons();
            SourceReadiness { name: s.source.to_string(), ready: reasons.is_empty(), reasons }
        })
        .collect();
    let down: Vec<String> =
        sources.iter().filter(|s| !s.ready).map(|s| format!("{} ({})", s.name, s.reasons.join("; "))).collect();
    if down.is_empty() {
        let plugins = state.control.plugins.snapshot().plugins.len();
        return Json(Ready { status: "ready".to_string(), plugins, sources }).into_response();
    }
    let error = ErrorDetail { code: "not_ready".to_string(), message: format!("not connected: {}", down.join("; ")) };
    (StatusCode::SERVICE_UNAVAILABLE, Json(NotReady { error, sources })).into_response()
}

/// `GET /v1/ready` when every source is ready.
#[derive(Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Ready {
    /// `ready`.
    pub status: String,
    /// Plugins loaded.
    pub plugins: usize,
    pub sources: Vec<SourceReadiness>,
}

/// `GET /v1/ready`'s 503: the usual error, and every source's readiness.
#[derive(Serialize, ToSchema)]
pub struct NotReady {
    error: ErrorDetail,
    sources: Vec<SourceReadiness>,
}

/// One source's readiness.
#[derive(Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct SourceReadiness {
    /// `rabbitmq` or `redis`.
    pub name: String,
    /// Connected, with every consumer running.
    pub ready: bool,
    /// Why not, one entry per cause: the error that ended its last session or kept the next
    /// from starting, each refused plugin queue or stream consumer that cannot start, or
    /// `connecting`. Empty when ready.
    pub reasons: Vec<String>,
}

/// A plugin as the API shows it.
#[derive(Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct PluginView {
    pub name: String,
    pub version: String,
    pub digest: String,
    /// The `switchyard:plugin` contract version the component was built against, e.g.
    /// `0.1.0` (docs/plugins.md: which versions a router loads).
    pub contract: Option<String>,
    pub subscriptions: Vec<String>,
    pub ordering_key: Vec<String>,
    pub concurrency: usize,
    /// The RabbitMQ consumer's prefetch, when the plugin sets its own.
    pub prefetch: Option<u16>,
    pub instances: String,
    pub memory_mb: u64,
    pub timeout_ms: u64,
    /// Hosts the plugin may reach over HTTP.
    pub allowed_hosts: Vec<String>,
    /// Event-name patterns the plugin may publish.
    pub publishes: Vec<String>,
    pub state: String,
    pub loaded_at: u64,
    pub counters: CountersSnapshot,
}

fn view(dispatch: &Dispatch) -> PluginView {
    let slot = dispatch.slot();
    let p = slot.current();
    let s = &p.settings;
    PluginView {
        name: p.name.to_string(),
        version: p.version.clone(),
        digest: p.digest.clone(),
        contract: p.contract.clone(),
        subscriptions: s.subscriptions.0.iter().map(|p| p.as_str().to_string()).collect(),
        ordering_key: s.ordering_key.clone(),
        concurrency: s.concurrency,
        prefetch: s.prefetch,
        instances: format!("{:?}", s.instances).to_lowercase(),
        memory_mb: s.limits.memory_mb,
        timeout_ms: s.limits.timeout_ms,
        allowed_hosts: s.allowed_hosts.iter().map(|h| h.as_str().to_string()).collect(),
        publishes: s.publishes.iter().map(|p| p.as_str().to_string()).collect(),
        state: if slot.is_paused() { "paused" } else { "running" }.into(),
        loaded_at: slot.loaded_at.0,
        counters: slot.counters.snapshot(),
    }
}

/// Every running plugin.
#[utoipa::path(get, path = "/v1/plugins", tag = "admin", security(("bearer" = [])), responses((status = 200, body = [PluginView])))]
async fn list_plugins(State(state): State<AdminState>) -> Json<Vec<PluginView>> {
    Json(state.control.plugins.snapshot().plugins.iter().map(view).collect())
}

/// One plugin: version, digest, subscriptions, limits, state, counters.
#[utoipa::path(get, path = "/v1/plugins/{name}", tag = "admin", security(("bearer" = [])), params(("name" = String, Path)), responses(
    (status = 200, body = PluginView),
    (status = 404, body = ErrorBody),
))]
async fn get_plugin(State(state): State<AdminState>, Path(name): Path<String>) -> Result<Json<PluginView>, AdminError> {
    Ok(Json(view(&state.plugin(&name)?)))
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
    let plugin = state.plugin(name)?;
    plugin.slot().set_running(running);
    tracing::info!(plugin = %name, running, "plugin state changed");
    Ok(Json(view(&plugin)))
}

/// Reply of an upload, a rollback or a removal.
#[derive(Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Changed {
    pub name: String,
    pub version: String,
    pub digest: String,
    /// The version replaced; absent for a new plugin.
    pub previous_digest: Option<String>,
}

impl Changed {
    fn new(name: String, change: Change) -> Self {
        Changed { name, version: change.version, digest: change.digest, previous_digest: change.previous_digest }
    }
}

/// Load a plugin: compiled and checked before anything changes. A new name starts a new
/// plugin (its queue bound before it is added, so it misses nothing published from then on);
/// a running one is swapped atomically (invocations under way finish on the old version) and
/// its queue rebound when its subscriptions changed. Either way it is kept in the registry.
#[utoipa::path(put, path = "/v1/plugins/{name}", tag = "admin", security(("bearer" = [])),
    params(("name" = String, Path), UploadSettings),
    request_body(
        description = "`application/wasm`: the component, with settings as query parameters; or `multipart/form-data`: a `component` part and a `settings` JSON part with the query's fields (lists as arrays) and `config` (name: text or {\"env\": NAME})",
        content((Vec<u8> = "application/wasm"), (Object = "multipart/form-data")),
    ),
    responses(
        (status = 200, description = "swapped", body = Changed),
        (status = 201, description = "added", body = Changed),
        (status = 400, description = "not a component, or bad settings", body = ErrorBody),
        (status = 409, description = "its lanes do not fit the instance pool (router.max_instances)", body = ErrorBody),
        (status = 422, description = "a component that does not fit the plugin world", body = ErrorBody),
        (status = 503, description = "the broker could not bind the plugin's queue", body = ErrorBody),
))]
async fn put_plugin(
    State(state): State<AdminState>,
    Path(name): Path<String>,
    request: Request,
) -> Result<(StatusCode, Json<Changed>), AdminError> {
    let plugin_name = PluginName::parse(&name).map_err(AdminError::BadRequest)?;
    let upload = Upload::read(request).await?;
    let running = state.control.plugins.get(&name).is_some();
    let overrides = upload.settings.overrides(state.control.base_settings(&name))?;
    let loaded =
        state.control.runtime.load(&plugin_name, &upload.component, overrides).await.map_err(ControlError::from)?;
    if running {
        Ok((StatusCode::OK, Json(Changed::new(name, state.control.swap(loaded).await?))))
    } else {
        Ok((StatusCode::CREATED, Json(Changed::new(name, state.control.add(loaded).await?))))
    }
}

/// Query of `DELETE /v1/plugins/{name}`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeleteQuery {
    /// Also delete the plugin's queue (and Redis consumer groups) with the events in it,
    /// unless another router uses them; by default they are kept for when the plugin comes
    /// back. For a name that is not running: delete the RabbitMQ queue and the Redis consumer
    /// groups it left behind (kept at its removal, or left by a failed addition), unless
    /// another router uses them.
    #[serde(default)]
    pub discard_queue: bool,
}

/// Reply of a removal.
#[derive(Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Removed {
    pub name: String,
    /// Whether every event the plugin had taken was handled, and its lanes stopped (their
    /// instances back in the pool), before the reply.
    pub drained: bool,
    /// Whether its queue and the events in it were deleted: false without `discard_queue`,
    /// and when another router took up the queue or the consumer groups during the removal
    /// (both are then kept).
    pub discarded_queue: bool,
    /// How many events the deleted RabbitMQ queue held (absent when none was deleted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discarded_events: Option<u32>,
    /// How many Redis consumer groups were deleted, one per stream (absent without Redis
    /// Streams, or when they could not be deleted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discarded_groups: Option<u32>,
}

/// Remove a plugin: it stops taking events, the events it took are handled and acknowledged,
/// its queue is unbound (and kept, with its events, unless `discard_queue`), and the registry
/// forgets it. A plugin `router.toml` names comes back at the next start. With `discard_queue`,
/// a name that is not running has the RabbitMQ queue and the Redis consumer groups it left
/// behind deleted (kept at its removal, or left by a failed addition). Whether the name runs
/// or not, `discard_queue` is refused with 409, and nothing is removed or deleted, when
/// another router consumes from the queue (a consumer that is not this router's), when it is
/// an ingress queue, or when another router reads the groups (a connection of its is named
/// for them, or its consumer read in the last 30 s).
#[utoipa::path(delete, path = "/v1/plugins/{name}", tag = "admin", security(("bearer" = [])),
    params(("name" = String, Path), DeleteQuery),
    responses(
        (status = 200, body = Removed),
        (status = 404, body = ErrorBody),
        (status = 409, description = "the queue to discard has another router's consumer or is an ingress queue, or another router reads from the consumer groups", body = ErrorBody),
        (status = 503, description = "the broker could not unbind the plugin's queue, or Redis did not answer", body = ErrorBody),
))]
async fn delete_plugin(
    State(state): State<AdminState>,
    Path(name): Path<String>,
    query: Result<Query<DeleteQuery>, QueryRejection>,
) -> Result<Json<Removed>, AdminError> {
    let query = query_of(query)?;
    let removal = state.control.remove(&name, query.discard_queue, DRAIN_TIMEOUT).await?;
    Ok(Json(Removed {
        name,
        drained: removal.drained,
        discarded_queue: removal.discarded,
        discarded_events: removal.discarded_events,
        discarded_groups: removal.discarded_groups,
    }))
}

/// Swap back to the version the last swap replaced (kept by the registry, across restarts).
#[utoipa::path(post, path = "/v1/plugins/{name}/rollback", tag = "admin", security(("bearer" = [])), params(("name" = String, Path)), responses(
    (status = 200, body = Changed),
    (status = 404, body = ErrorBody),
    (status = 409, description = "no previous version, or its lanes do not fit the instance pool", body = ErrorBody),
))]
async fn rollback(State(state): State<AdminState>, Path(name): Path<String>) -> Result<Json<Changed>, AdminError> {
    let change = state.control.rollback(&name).await?;
    tracing::info!(plugin = %name, version = %change.version, "plugin rolled back");
    Ok(Json(Changed::new(name, change)))
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
    state.plugin(&name)?;
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
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<PageView>, AdminError> {
    let query = query_of(query)?;
    let plugin = state.plugin(&name)?.slot().current();
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
            let index = FieldIndex { plugin: &name, collection: &collection, field };
            state.readers.lookup(index, &value, &after, limit + 1)
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
    for dispatch in state.control.plugins.snapshot().plugins.iter() {
        let plugin = dispatch.slot().current();
        if plugin.settings.subscriptions.matches(&event.name) {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let ack = Ack::notify(tx, state.in_flight.clone());
            dispatch
                .submit(Inbound { event: event.clone(), received: received.clone(), ack, attempt: 1, parked: None })
                .await;
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
    let plugins: Vec<String> = state.control.plugins.snapshot().plugins.iter().map(|d| d.name().to_string()).collect();
    // Every running plugin has both gauges, 0 when the store has no rows for it.
    for (gauge, counts) in [
        ("switchyard_dead_letters", state.readers.dead_letter_counts()),
        ("switchyard_parked", state.readers.parked_counts()),
    ] {
        let mut counts: std::collections::BTreeMap<String, u64> = counts.unwrap_or_default().into_iter().collect();
        for plugin in &plugins {
            counts.entry(plugin.clone()).or_insert(0);
        }
        for (plugin, count) in counts {
            metrics::gauge!(gauge, "plugin" => plugin).set(count as f64);
        }
    }
    for s in state.sources.iter() {
        let up = if s.health.is_ready() { 1.0 } else { 0.0 };
        metrics::gauge!("switchyard_source_connected", "source" => s.source).set(up);
    }
    metrics::gauge!("switchyard_in_flight").set(state.in_flight.get() as f64);
    // How full the instance pool is: an addition whose lanes do not fit gets 409.
    let runtime = &state.control.runtime;
    metrics::gauge!("switchyard_instances_reserved").set(runtime.instances_reserved() as f64);
    metrics::gauge!("switchyard_instances_max").set(runtime.max_instances() as f64);
    // Consumer lag, where the broker tells it.
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
            AdminError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            AdminError::Unprocessable(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_plugin"),
            AdminError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            AdminError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            AdminError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}
