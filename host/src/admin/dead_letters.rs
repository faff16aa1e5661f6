//! Dead letters over the admin API: list them with their reason and original bytes, replay
//! them through their plugin (with their original ids), or discard them.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::admin::{AdminError, AdminState, ErrorBody, query_of};
use crate::db::DeadLetterRow;
use crate::retry;

/// Most dead letters replayed per store transaction.
const REPLAY_PAGE: usize = 500;

/// A dead letter as the API shows it.
#[derive(Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct DeadLetterView {
    /// Its id among the dead letters: the cursor, and what replay and discard take.
    pub id: i64,
    /// The event's id; absent for a message that could not be decoded.
    pub event_id: Option<String>,
    pub name: Option<String>,
    pub reason: String,
    pub attempts: u32,
    /// Milliseconds since the epoch.
    pub first_failed_at: u64,
    pub last_failed_at: u64,
    /// Routing key, origin, content type, message id and headers as received.
    #[schema(value_type = Object)]
    pub transport: serde_json::Value,
    /// The original bytes as text, when they are UTF-8.
    pub body: Option<String>,
    /// The original bytes in hex, when they are not.
    pub body_hex: Option<String>,
}

impl From<DeadLetterRow> for DeadLetterView {
    fn from(row: DeadLetterRow) -> Self {
        let (body, body_hex) = match String::from_utf8(row.body) {
            Ok(text) => (Some(text), None),
            Err(e) => (None, Some(e.as_bytes().iter().map(|b| format!("{b:02x}")).collect())),
        };
        DeadLetterView {
            id: row.seq,
            event_id: row.event_id,
            name: row.name,
            reason: row.reason,
            attempts: row.attempts,
            first_failed_at: row.first_failed_at.0,
            last_failed_at: row.last_failed_at.0,
            transport: serde_json::from_str(&row.transport).unwrap_or(serde_json::Value::Null),
            body,
            body_hex,
        }
    }
}

/// A page of dead letters.
#[derive(Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct DeadLetterPage {
    pub dead_letters: Vec<DeadLetterView>,
    pub next_cursor: Option<i64>,
}

/// Query of `GET /v1/plugins/{name}/dead-letters`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// At most this many (1-1000, default 100).
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<i64>,
}

/// A plugin's dead letters, oldest first. Undecodable messages are kept under the name of
/// what received them (`ingress:<queue>`, `redis:pubsub`, `bus`) when no plugin was known.
#[utoipa::path(get, path = "/v1/plugins/{name}/dead-letters", tag = "admin", security(("bearer" = [])),
    params(("name" = String, Path), PageQuery),
    responses((status = 200, body = DeadLetterPage), (status = 400, body = ErrorBody)))]
pub async fn list(
    State(state): State<AdminState>,
    Path(name): Path<String>,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Json<DeadLetterPage>, AdminError> {
    let query = query_of(query)?;
    let limit = query.limit.unwrap_or(100).clamp(1, 1000) as usize;
    let rows = state
        .readers
        .dead_letters(&name, query.cursor.unwrap_or(0), limit + 1)
        .map_err(|e| AdminError::Internal(e.to_string()))?;
    let more = rows.len() > limit;
    let dead_letters: Vec<DeadLetterView> = rows.into_iter().take(limit).map(DeadLetterView::from).collect();
    let next_cursor = if more { dead_letters.last().map(|d| d.id) } else { None };
    Ok(Json(DeadLetterPage { dead_letters, next_cursor }))
}

/// Which dead letters a replay or a discard takes: `{"ids": [..]}`, or all without a body.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Selection {
    pub ids: Option<Vec<i64>>,
}

impl Selection {
    fn parse(body: &[u8]) -> Result<Selection, AdminError> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Selection::default());
        }
        serde_json::from_slice(body).map_err(|e| AdminError::BadRequest(format!("body: {e}")))
    }

    fn takes(&self, id: i64) -> bool {
        self.ids.as_ref().is_none_or(|ids| ids.contains(&id))
    }
}

/// Reply of a replay.
#[derive(Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Replayed {
    /// Dead letters given back to the plugin.
    pub replayed: u64,
    /// Ids left as they are: messages that never decoded.
    pub skipped: Vec<i64>,
}

/// Send dead letters through the plugin again, with their original ids: each is deleted and
/// its event parked as a first attempt (behind any parked event of its ordering key). They run
/// on the plugin's current version; one that fails again is dead-lettered again.
#[utoipa::path(post, path = "/v1/plugins/{name}/dead-letters/replay", tag = "admin", security(("bearer" = [])),
    params(("name" = String, Path)),
    request_body(content = Selection, description = "`{\"ids\": [..]}`; no body replays them all"),
    responses((status = 200, body = Replayed), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn replay(
    State(state): State<AdminState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<Replayed>, AdminError> {
    let selection = Selection::parse(&body)?;
    let dispatch = state.plugin(&name)?;
    // Only what is there now: a replayed event that fails again is a new dead letter.
    let last = state.readers.last_dead_letter(&name).map_err(|e| AdminError::Internal(e.to_string()))?;
    let (mut replayed, mut skipped, mut after) = (0, Vec::new(), 0);
    while let Some(last) = last.filter(|last| after < *last) {
        let page =
            state.readers.dead_letters(&name, after, REPLAY_PAGE).map_err(|e| AdminError::Internal(e.to_string()))?;
        let Some(newest) = page.last() else { break };
        after = newest.seq;
        let chosen: Vec<DeadLetterRow> = page.into_iter().filter(|l| l.seq <= last && selection.takes(l.seq)).collect();
        let done = retry::replay(&state.control.writer, &dispatch, chosen).await.map_err(AdminError::Internal)?;
        replayed += done.replayed;
        skipped.extend(done.skipped);
    }
    tracing::info!(plugin = %name, replayed, skipped = skipped.len(), "dead letters replayed");
    Ok(Json(Replayed { replayed, skipped }))
}

/// Reply of a discard.
#[derive(Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Discarded {
    pub discarded: u64,
}

/// Delete dead letters for good.
#[utoipa::path(delete, path = "/v1/plugins/{name}/dead-letters", tag = "admin", security(("bearer" = [])),
    params(("name" = String, Path)),
    request_body(content = Selection, description = "`{\"ids\": [..]}`; no body discards them all"),
    responses((status = 200, body = Discarded), (status = 400, body = ErrorBody)))]
pub async fn discard(
    State(state): State<AdminState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<Discarded>, AdminError> {
    let selection = Selection::parse(&body)?;
    let discarded = state
        .control
        .writer
        .discard(name.clone(), selection.ids)
        .await
        .map_err(|e| AdminError::Internal(e.to_string()))?
        .map_err(AdminError::Internal)?;
    tracing::info!(plugin = %name, discarded, "dead letters discarded");
    Ok(Json(Discarded { discarded }))
}
