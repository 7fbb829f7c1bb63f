//! `/api/v1`: checks (read), jobs (read), and the endpoints that start
//! work (run a check, run the checks of a tag, a webhook for deploy
//! pipelines). Starting work needs `Authorization: Bearer <api.token>`,
//! compared in constant time; with no token configured those endpoints
//! are off and say so. Errors are JSON: `{"error": "..."}`
//! ([`ApiError`]); answers are the types of [`crate::api_types`].

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode, header},
    routing::{get, post},
};
use serde::Deserialize;
use subtle::ConstantTimeEq;

use super::ApiError;
use crate::{
    api_types::{self as t, ErrorBody},
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
        .route("/api/v1/map", get(map))
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

/// Ok if the request may start work; else the answer that refuses it.
pub(crate) fn allowed(settings: &Reloadable, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(token) = &settings.api_token else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "endpoints that start work are off: no api.token (or api.token_file) in the config",
        ));
    };
    if bearer_matches(headers, token) {
        return Ok(());
    }
    Err(ApiError::unauthorized(
        "a valid `Authorization: Bearer <token>` header is required",
        "Bearer",
    ))
}

fn no_store() -> ApiError {
    ApiError::unavailable("the job store is not available (see the agent's log)")
}

/// A queued job: 202, `Location` its URL, and its id.
pub(crate) type QueuedAnswer = (
    StatusCode,
    [(header::HeaderName, String); 1],
    Json<t::Queued>,
);

/// Queues a job and wakes the workers: 202 with its id.
pub(crate) fn queue(state: &AppState, kind: &str, arg: &str) -> Result<QueuedAnswer, ApiError> {
    let store = state.store.as_ref().ok_or_else(no_store)?;
    let id = store
        .enqueue(kind, arg)
        .ok_or_else(|| ApiError::unavailable("the job store cannot write (see the agent's log)"))?;
    state.jobs_wake.notify_one();
    let url = format!("/api/v1/jobs/{id}");
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, url.clone())],
        Json(t::Queued { job: id, url }),
    ))
}

/// The POSTs that start work: the token first, then whether `kind`
/// `arg` names anything, then the job.
fn start(
    state: &AppState,
    headers: &HeaderMap,
    kind: &str,
    arg: &str,
) -> Result<QueuedAnswer, ApiError> {
    let settings = state.settings();
    allowed(&settings, headers)?;
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
        Some(why) => Err(ApiError::not_found(why)),
        None => queue(state, kind, arg),
    }
}

/// Run one check now (a job).
#[utoipa::path(
    post,
    path = "/api/v1/checks/{name}/run",
    tag = "checks",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "The check's name.")),
    responses(
        (status = 202, description = "Queued; `Location` is the job's URL.", body = t::Queued),
        (status = 401, description = "Missing or wrong bearer token.", body = ErrorBody),
        (status = 403, description = "No api.token configured.", body = ErrorBody),
        (status = 404, description = "No such check.", body = ErrorBody),
        (status = 503, description = "No job store.", body = ErrorBody),
    )
)]
pub(crate) async fn run_check(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<QueuedAnswer, ApiError> {
    start(&state, &headers, "check", &name)
}

/// Run every check with a tag now (one job).
#[utoipa::path(
    post,
    path = "/api/v1/tags/{tag}/run",
    tag = "checks",
    security(("bearer" = [])),
    params(("tag" = String, Path, description = "A tag of one or more checks.")),
    responses(
        (status = 202, description = "Queued; `Location` is the job's URL.", body = t::Queued),
        (status = 401, description = "Missing or wrong bearer token.", body = ErrorBody),
        (status = 403, description = "No api.token configured.", body = ErrorBody),
        (status = 404, description = "No check has that tag.", body = ErrorBody),
        (status = 503, description = "No job store.", body = ErrorBody),
    )
)]
pub(crate) async fn run_tag(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(tag): Path<String>,
) -> Result<QueuedAnswer, ApiError> {
    start(&state, &headers, "tag", &tag)
}

/// A deploy webhook (`[hooks.<name>]`): runs its checks (a job).
#[utoipa::path(
    post,
    path = "/api/v1/hooks/{name}",
    tag = "checks",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "The hook's name.")),
    responses(
        (status = 202, description = "Queued; `Location` is the job's URL.", body = t::Queued),
        (status = 401, description = "Missing or wrong bearer token.", body = ErrorBody),
        (status = 403, description = "No api.token configured.", body = ErrorBody),
        (status = 404, description = "No such hook.", body = ErrorBody),
        (status = 503, description = "No job store.", body = ErrorBody),
    )
)]
pub(crate) async fn hook(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<QueuedAnswer, ApiError> {
    start(&state, &headers, "hook", &name)
}

#[derive(Debug, Deserialize)]
pub(crate) struct JobsQuery {
    limit: Option<String>,
}

/// The newest jobs (`?limit=`, 100 by default, 1000 at most).
#[utoipa::path(
    get,
    path = "/api/v1/jobs",
    tag = "jobs",
    params(("limit" = Option<u32>, Query, description = "How many, newest first (1 to 1000, default 100).", minimum = 1, maximum = 1000)),
    responses(
        (status = 200, description = "The newest jobs.", body = t::Jobs),
        (status = 400, description = "A bad `limit`.", body = ErrorBody),
        (status = 503, description = "No job store.", body = ErrorBody),
    )
)]
pub(crate) async fn jobs(
    State(store): State<Option<Arc<Store>>>,
    Query(q): Query<JobsQuery>,
) -> Result<Json<t::Jobs>, ApiError> {
    let limit = match q.limit.map(|l| l.parse::<usize>()) {
        None => 100,
        Some(Ok(n)) if (1..=1000).contains(&n) => n,
        Some(_) => {
            return Err(ApiError::bad_request(
                "`limit` must be a number from 1 to 1000",
            ));
        }
    };
    let store = store.ok_or_else(no_store)?;
    let jobs = tokio::task::spawn_blocking(move || store.jobs(limit)).await?;
    Ok(Json(t::Jobs { jobs }))
}

/// One job: its state and, once finished, its result.
#[utoipa::path(
    get,
    path = "/api/v1/jobs/{id}",
    tag = "jobs",
    params(("id" = String, Path, description = "The job's id, a number.")),
    responses(
        (status = 200, description = "The job.", body = t::Job),
        (status = 400, description = "Not a job id.", body = ErrorBody),
        (status = 404, description = "No such job.", body = ErrorBody),
        (status = 503, description = "No job store.", body = ErrorBody),
    )
)]
pub(crate) async fn job(
    State(store): State<Option<Arc<Store>>>,
    Path(id): Path<String>,
) -> Result<Json<t::Job>, ApiError> {
    let Ok(id) = id.parse::<i64>() else {
        return Err(ApiError::bad_request(format!("`{id}` is not a job id")));
    };
    let store = store.ok_or_else(no_store)?;
    match tokio::task::spawn_blocking(move || store.job(id)).await? {
        Some(j) => Ok(Json(j)),
        None => Err(ApiError::not_found(format!("no job {id}"))),
    }
}

/// The engine's state of a check, as the API says it.
pub fn check_state(s: CheckState) -> t::CheckState {
    match s {
        CheckState::Up => t::CheckState::Up,
        CheckState::Down => t::CheckState::Down,
        CheckState::Blocked => t::CheckState::Blocked,
        CheckState::Unknown => t::CheckState::Unknown,
    }
}

/// Every check: state, the last result, uptime over 24 h and 7 d, recent
/// results and incidents.
#[utoipa::path(
    get,
    path = "/api/v1/checks",
    tag = "checks",
    responses((status = 200, description = "Every check.", body = t::Checks))
)]
pub(crate) async fn checks(State(state): State<AppState>) -> Result<Json<t::Checks>, ApiError> {
    let (view, store) = (state.checks().view(), state.store.clone());
    let checks = tokio::task::spawn_blocking(move || {
        view.iter()
            .map(|v| {
                let (summary, recent) = match &store {
                    Some(s) => (s.summary(&v.spec.name), s.recent(&v.spec.name, 20)),
                    None => (Default::default(), Vec::new()),
                };
                t::Check {
                    name: v.spec.name.clone(),
                    kind: v.spec.kind.as_str().to_string(),
                    target: v.spec.target(),
                    service: v.spec.service.clone(),
                    tags: v.spec.tags.clone(),
                    depends_on: v.spec.depends_on.clone(),
                    state: check_state(v.state),
                    blocked: v.state == CheckState::Blocked,
                    last: v.status.last.as_ref().map(|l| t::LastRun {
                        ok: l.ok,
                        error: l.error.clone(),
                        duration_seconds: l.duration.as_secs_f64(),
                        http_status: l.http_status,
                        phases: l
                            .phases
                            .iter()
                            .map(|(p, d)| (p.to_string(), d.as_secs_f64()))
                            .collect(),
                        explanation: l.explanation.clone(),
                        evidence: l.evidence.clone(),
                    }),
                    uptime: t::Uptime {
                        h24: summary.uptime_24h,
                        d7: summary.uptime_7d,
                    },
                    recent: recent
                        .into_iter()
                        .map(|r| t::RecentResult {
                            at_ms: r.at_ms,
                            ok: r.ok,
                            duration_ms: r.duration_ms,
                            error: r.error,
                            explanation: r.explanation,
                            cause: r.cause.as_deref().map(cause_of),
                        })
                        .collect(),
                    incidents: summary
                        .incidents
                        .into_iter()
                        .map(|i| t::Incident {
                            check: i.check,
                            start_ms: i.start_ms,
                            end_ms: i.end_ms,
                            error: i.error,
                            explanation: i.explanation,
                        })
                        .collect(),
                }
            })
            .collect()
    })
    .await?;
    Ok(Json(t::Checks { checks }))
}

/// A stored cause word as the API's enum (a word it does not know reads as
/// `unknown`).
fn cause_of(word: &str) -> t::Cause {
    serde_json::from_value(serde_json::Value::String(word.to_string())).unwrap_or_default()
}

/// Who talks to whom: per service, its peers (containers, `remote`
/// services and this host by name; other addresses up to
/// `agent.map_top_k` per service, then their /24 or /48 bucket, then
/// `~other`), with the service's packets, bytes and connections of each;
/// the edges from this host to `remote` services also carry the
/// handshake p50 and retransmits. Counted by the eBPF programs; with the
/// pcap backend the map has the services and no edges.
#[utoipa::path(
    get,
    path = "/api/v1/map",
    tag = "services",
    responses((status = 200, description = "The service map.", body = t::ServiceMap))
)]
pub(crate) async fn map(State(state): State<AppState>) -> Result<Json<t::ServiceMap>, ApiError> {
    let top_k = match state.settings().map_top_k {
        0 => crate::config::AgentConfig::default().map_top_k(),
        k => k,
    };
    let datapath = state.datapath.clone();
    // A walk of the kernel's peer tables: thousands of syscalls, off the
    // async workers.
    tokio::task::spawn_blocking(move || {
        let view = datapath.view();
        let svcs = crate::metrics::peer_services(&view);
        let naming = crate::metrics::peer_naming(&view, &svcs);
        let counters = datapath.counters();
        let snap = match counters.peers() {
            Some(r) => r.read(&svcs.iter().map(|s| s.slot).collect(), true),
            None => Default::default(),
        };
        // A remote service's client side is the edge from this host.
        let client_tcp = svcs
            .iter()
            .filter(|s| s.kind == crate::peers::Kind::Remote)
            .filter_map(|s| {
                let c = counters.tcp(s.slot, true)?;
                Some((
                    s.slot,
                    crate::peers::EdgeTcp {
                        handshake_p50_seconds: crate::health::quantile(&c.handshake, 0.5),
                        retransmits: crate::health::retransmits(&c),
                    },
                ))
            })
            .collect();
        Json(crate::peers::build(
            &snap,
            &naming,
            &svcs,
            top_k,
            &client_tcp,
        ))
    })
    .await
    .map_err(|e| ApiError::unavailable(format!("building the map: {e}")))
}
