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
use serde_json::json;

use super::error;
use crate::{
    capture::{self, Request},
    state::AppState,
    store::Store,
};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/captures", get(list).post(start))
        .route("/api/v1/captures/{id}/file", get(file))
}

async fn start(State(state): State<AppState>, headers: HeaderMap, body: String) -> Response {
    if let Some(r) = super::api::refuse(&state.settings(), &headers) {
        return r;
    }
    let req: Request = match serde_json::from_str(if body.trim().is_empty() { "{}" } else { &body })
    {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("capture request: {e}")),
    };
    let view = state.datapath.view();
    let planned = tokio::task::spawn_blocking(move || {
        capture::plan(&view.services, &view.table, &view.addrs, &req)
    })
    .await;
    let plan = match planned {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return error(StatusCode::BAD_REQUEST, e),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let arg = serde_json::to_string(&plan).unwrap_or_default();
    super::api::queue(&state, "capture", &arg)
}

/// Every capture file, by capture, with the job's state where known.
async fn list(State(store): State<Option<Arc<Store>>>) -> Response {
    let Some(d) = store.as_deref().and_then(capture::dir) else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no store, so no capture folder",
        );
    };
    let rows = tokio::task::spawn_blocking(move || {
        let mut by_id: BTreeMap<i64, Vec<(u32, u64, Option<SystemTime>)>> = BTreeMap::new();
        for ((id, part), size) in capture::files(&d) {
            let mtime = std::fs::metadata(d.join(capture::file_name(id, part)))
                .and_then(|m| m.modified())
                .ok();
            by_id.entry(id).or_default().push((part, size, mtime));
        }
        by_id
            .into_iter()
            .map(|(id, parts)| {
                let job = store.as_ref().and_then(|s| s.job(id));
                json!({
                    "id": id,
                    "state": job.as_ref().map(|j| j.state),
                    "plan": job.as_ref().and_then(|j| serde_json::from_str::<serde_json::Value>(&j.arg).ok()),
                    "result": job.as_ref().and_then(|j| j.result.clone()),
                    "bytes": parts.iter().map(|p| p.1).sum::<u64>(),
                    "parts": parts.iter().map(|(part, size, mtime)| json!({
                        "part": part,
                        "bytes": size,
                        "modified": mtime.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok()).map(|d| d.as_secs()),
                        "url": format!("/api/v1/captures/{id}/file?part={part}"),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect::<Vec<_>>()
    })
    .await;
    match rows {
        Ok(r) => Json(json!({ "captures": r })).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[derive(Debug, Deserialize)]
struct PartQuery {
    part: Option<u32>,
}

/// One capture file. Only numbers reach the file name.
async fn file(
    State(state): State<AppState>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<PartQuery>,
) -> Response {
    if let Some(r) = super::api::refuse(&state.settings(), &headers) {
        return r;
    }
    let Ok(id) = id.parse::<i64>() else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("`{id}` is not a capture id"),
        );
    };
    let Some(d) = state.store.as_deref().and_then(capture::dir) else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no store, so no capture folder",
        );
    };
    let found = capture::files(&d);
    let part = match q.part {
        Some(p) => p,
        None => match found.keys().find(|(i, _)| *i == id) {
            Some((_, p)) => *p,
            None => return error(StatusCode::NOT_FOUND, format!("no capture {id}")),
        },
    };
    if !found.contains_key(&(id, part)) {
        return error(
            StatusCode::NOT_FOUND,
            format!("no capture {id} part {part}"),
        );
    }
    let path = d.join(capture::file_name(id, part));
    match tokio::task::spawn_blocking(move || std::fs::read(path)).await {
        Ok(Ok(bytes)) => (
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
            .into_response(),
        Ok(Err(e)) => error(StatusCode::NOT_FOUND, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}
