//! `/api/v1`: checks (read), jobs (read), and the endpoints that start
//! work (run a check, run the checks of a tag, a webhook for deploy
//! pipelines). Starting work needs `Authorization: Bearer <api.token>`,
//! compared in constant time; with no token configured those endpoints
//! are off and say so. Errors are JSON: `{"error": "..."}`.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Path, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde_json::json;
use subtle::ConstantTimeEq;

use super::error;
use crate::{
    checks::engine::State as CheckState,
    state::{AppState, Reloadable},
    store::Store,
};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/checks", get(checks))
        .route("/api/v1/checks/{name}/run", post(run_check))
        .route("/api/v1/tags/{tag}/run", post(run_tag))
        .route("/api/v1/hooks/{name}", post(hook))
        .route("/api/v1/jobs", get(jobs))
        .route("/api/v1/jobs/{id}", get(job))
}

/// Whether the request carries `Authorization: Bearer <token>`, compared
/// in constant time.
pub(crate) fn bearer_matches(headers: &HeaderMap, token: &str) -> bool {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    bool::from(given.as_bytes().ct_eq(token.as_bytes()))
}

/// None if the request may start work; else the answer that refuses it.
pub(crate) fn refuse(settings: &Reloadable, headers: &HeaderMap) -> Option<Response> {
    let Some(token) = &settings.api_token else {
        return Some(error(
            StatusCode::FORBIDDEN,
            "endpoints that start work are off: no api.token (or api.token_file) in the config",
        ));
    };
    if bearer_matches(headers, token) {
        return None;
    }
    let mut r = error(
        StatusCode::UNAUTHORIZED,
        "a valid `Authorization: Bearer <token>` header is required",
    );
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    Some(r)
}

fn no_store() -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "the job store is not available (see the agent's log)",
    )
}

/// Queues a job and wakes the workers: 202 with its id.
pub(crate) fn queue(state: &AppState, kind: &str, arg: &str) -> Response {
    let Some(store) = &state.store else {
        return no_store();
    };
    match store.enqueue(kind, arg) {
        Some(id) => {
            state.jobs_wake.notify_one();
            (
                StatusCode::ACCEPTED,
                [(header::LOCATION, format!("/api/v1/jobs/{id}"))],
                Json(json!({ "job": id, "url": format!("/api/v1/jobs/{id}") })),
            )
                .into_response()
        }
        None => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the job store cannot write (see the agent's log)",
        ),
    }
}

/// The POSTs that start work: the token first, then whether `kind`
/// `arg` names anything, then the job.
fn start(state: &AppState, headers: &HeaderMap, kind: &str, arg: &str) -> Response {
    let settings = state.settings();
    if let Some(r) = refuse(&settings, headers) {
        return r;
    }
    let missing = {
        let specs = state.checks().specs();
        match kind {
            "check" => {
                (!specs.iter().any(|s| s.name == arg)).then(|| format!("no check named `{arg}`"))
            }
            "tag" => (!specs.iter().any(|s| s.tags.iter().any(|t| t == arg)))
                .then(|| format!("no check has tag `{arg}`")),
            _ => (!settings.hooks.contains_key(arg)).then(|| format!("no hook named `{arg}`")),
        }
    };
    match missing {
        Some(why) => error(StatusCode::NOT_FOUND, why),
        None => queue(state, kind, arg),
    }
}

async fn run_check(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    start(&state, &headers, "check", &name)
}

async fn run_tag(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(tag): Path<String>,
) -> Response {
    start(&state, &headers, "tag", &tag)
}

async fn hook(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    start(&state, &headers, "hook", &name)
}

/// The newest jobs (`?limit=`, 100 by default, 1000 at most).
async fn jobs(
    State(store): State<Option<Arc<Store>>>,
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Response {
    let limit = match q.get("limit").map(|l| l.parse::<usize>()) {
        None => 100,
        Some(Ok(n)) if (1..=1000).contains(&n) => n,
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "`limit` must be a number from 1 to 1000",
            );
        }
    };
    let Some(store) = store else {
        return no_store();
    };
    match tokio::task::spawn_blocking(move || store.jobs(limit)).await {
        Ok(j) => Json(json!({ "jobs": j })).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn job(State(store): State<Option<Arc<Store>>>, Path(id): Path<String>) -> Response {
    let Ok(id) = id.parse::<i64>() else {
        return error(StatusCode::BAD_REQUEST, format!("`{id}` is not a job id"));
    };
    let Some(store) = store else {
        return no_store();
    };
    match tokio::task::spawn_blocking(move || store.job(id)).await {
        Ok(Some(j)) => Json(j).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no job {id}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Every check: state, the last result, uptime over 24 h and 7 d, recent
/// results and incidents.
async fn checks(State(state): State<AppState>) -> Response {
    let (view, store) = (state.checks().view(), state.store.clone());
    let body = tokio::task::spawn_blocking(move || {
        view.iter()
            .map(|v| {
                let last = v.status.last.as_ref();
                let (summary, recent) = match &store {
                    Some(s) => (s.summary(&v.spec.name), s.recent(&v.spec.name, 20)),
                    None => (Default::default(), Vec::new()),
                };
                json!({
                    "name": v.spec.name,
                    "kind": v.spec.kind.as_str(),
                    "target": v.spec.target(),
                    "service": v.spec.service,
                    "tags": v.spec.tags,
                    "depends_on": v.spec.depends_on,
                    "state": v.state.as_str(),
                    "blocked": v.state == CheckState::Blocked,
                    "last": last.map(|l| json!({
                        "ok": l.ok,
                        "error": l.error,
                        "duration_seconds": l.duration.as_secs_f64(),
                        "http_status": l.http_status,
                        "phases": l.phases.iter().map(|(p, d)| (p.to_string(), d.as_secs_f64())).collect::<std::collections::BTreeMap<_, _>>(),
                    })),
                    "uptime": { "24h": summary.uptime_24h, "7d": summary.uptime_7d },
                    "recent": recent,
                    "incidents": summary.incidents,
                })
            })
            .collect::<Vec<_>>()
    })
    .await;
    match body {
        Ok(rows) => Json(json!({ "checks": rows })).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}
