//! `/api/v1/captures`: start a capture (a job; token required), list the
//! capture files, download one (token required). The captures themselves
//! are `crate::capture`'s.

use std::{collections::BTreeMap, sync::Arc, time::SystemTime};

use axum::{
    Json, Router,
    body::Body,
    extract::{Path as UrlPath, Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use serde::Deserialize;

use super::{
    ApiError,
    api::{QueuedAnswer, allowed, queue},
};
use crate::{
    api_types::{self as t, ErrorBody},
    capture::{self, Request},
    state::AppState,
    store::Store,
};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/captures", get(list).post(start))
        .route("/api/v1/captures/{id}/file", get(file))
}

fn no_folder() -> ApiError {
    ApiError::unavailable("no store, so no capture folder")
}

/// Start a packet capture (a job): an interface, a BPF filter or a
/// service, and limits.
#[utoipa::path(
    post,
    path = "/api/v1/captures",
    tag = "captures",
    security(("bearer" = [])),
    request_body(content = t::CaptureRequest, description = "What to capture (an empty body: 10 seconds of every interface)."),
    responses(
        (status = 202, description = "Queued; `Location` is the job's URL.", body = t::Queued),
        (status = 400, description = "A bad request: unknown field, bad filter, unknown service or interface.", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token.", body = ErrorBody),
        (status = 403, description = "No api.token configured.", body = ErrorBody),
        (status = 503, description = "No job store.", body = ErrorBody),
    )
)]
pub(crate) async fn start(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: String,
) -> Result<QueuedAnswer, ApiError> {
    allowed(&state.settings(), &headers)?;
    let req: Request = serde_json::from_str(if body.trim().is_empty() { "{}" } else { &body })
        .map_err(|e| ApiError::bad_request(format!("capture request: {e}")))?;
    let view = state.datapath.view();
    let plan = tokio::task::spawn_blocking(move || {
        capture::plan(&view.services, &view.table, &view.addrs, &req)
    })
    .await?
    .map_err(ApiError::bad_request)?;
    let arg = serde_json::to_string(&plan).map_err(|e| ApiError::internal(e.to_string()))?;
    queue(&state, "capture", &arg)
}

/// Every capture file, by capture, with the job's state where known.
#[utoipa::path(
    get,
    path = "/api/v1/captures",
    tag = "captures",
    responses(
        (status = 200, description = "The captures on disk.", body = t::Captures),
        (status = 503, description = "No store, so no capture folder.", body = ErrorBody),
    )
)]
pub(crate) async fn list(
    State(store): State<Option<Arc<Store>>>,
) -> Result<Json<t::Captures>, ApiError> {
    let d = store
        .as_deref()
        .and_then(capture::dir)
        .ok_or_else(no_folder)?;
    let captures = tokio::task::spawn_blocking(move || {
        let mut by_id: BTreeMap<i64, Vec<t::CapturePart>> = BTreeMap::new();
        for ((id, part), size) in capture::files(&d) {
            let modified = std::fs::metadata(d.join(capture::file_name(id, part)))
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| d.as_secs());
            by_id.entry(id).or_default().push(t::CapturePart {
                part,
                bytes: size,
                modified,
                url: format!("/api/v1/captures/{id}/file?part={part}"),
            });
        }
        by_id
            .into_iter()
            .map(|(id, parts)| {
                let job = store.as_ref().and_then(|s| s.job(id));
                t::Capture {
                    id,
                    state: job.as_ref().map(|j| j.state),
                    plan: job.as_ref().and_then(|j| serde_json::from_str(&j.arg).ok()),
                    result: job.and_then(|j| j.result),
                    bytes: parts.iter().map(|p| p.bytes).sum(),
                    parts,
                }
            })
            .collect()
    })
    .await?;
    Ok(Json(t::Captures { captures }))
}

#[derive(Debug, Deserialize)]
pub(crate) struct PartQuery {
    part: Option<u32>,
}

/// One capture file. Only numbers reach the file name.
#[utoipa::path(
    get,
    path = "/api/v1/captures/{id}/file",
    tag = "captures",
    security(("bearer" = [])),
    params(
        ("id" = String, Path, description = "The capture's (job's) id, a number."),
        ("part" = Option<u32>, Query, description = "The part (default: the first on disk)."),
    ),
    responses(
        (status = 200, description = "The pcapng file.", content_type = "application/x-pcapng", body = super::openapi::Pcapng),
        (status = 400, description = "Not a capture id.", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token.", body = ErrorBody),
        (status = 403, description = "No api.token configured.", body = ErrorBody),
        (status = 404, description = "No such capture or part.", body = ErrorBody),
        (status = 503, description = "No store, so no capture folder.", body = ErrorBody),
    )
)]
pub(crate) async fn file(
    State(state): State<AppState>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<PartQuery>,
) -> Result<Response, ApiError> {
    allowed(&state.settings(), &headers)?;
    let Ok(id) = id.parse::<i64>() else {
        return Err(ApiError::bad_request(format!("`{id}` is not a capture id")));
    };
    let d = state
        .store
        .as_deref()
        .and_then(capture::dir)
        .ok_or_else(no_folder)?;
    let found = capture::files(&d);
    let part = match q.part {
        Some(p) => p,
        None => match found.keys().find(|(i, _)| *i == id) {
            Some((_, p)) => *p,
            None => return Err(ApiError::not_found(format!("no capture {id}"))),
        },
    };
    if !found.contains_key(&(id, part)) {
        return Err(ApiError::not_found(format!("no capture {id} part {part}")));
    }
    let path = d.join(capture::file_name(id, part));
    let bytes = tokio::task::spawn_blocking(move || std::fs::read(path))
        .await?
        .map_err(|e| ApiError::not_found(e.to_string()))?;
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/x-pcapng".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!(
                    "attachment; filename=\"netpulse-{}\"",
                    capture::file_name(id, part)
                ),
            ),
        ],
        Body::from(bytes),
    )
        .into_response())
}
