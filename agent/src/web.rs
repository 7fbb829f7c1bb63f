//! The HTTP side: `/metrics` and `/healthz` (axum). Handlers are thin: they
//! lock the agent state, read, and let go.

use std::sync::{Arc, Mutex};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};

use crate::run::Agent;

pub type Shared = Arc<Mutex<Agent>>;

pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(state)
}

async fn metrics(State(state): State<Shared>) -> Response {
    let body = tokio::task::spawn_blocking(move || {
        let agent = state
            .lock()
            .map_err(|_| "agent state poisoned".to_string())?;
        crate::metrics::render(&agent.probe, &agent.identity).map_err(|e| e.to_string())
    })
    .await;
    match body {
        Ok(Ok(text)) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Ok(Err(e)) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reading counters: {e}\n"),
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

async fn healthz(State(state): State<Shared>) -> Response {
    let attached = state
        .lock()
        .map(|a| a.probe.attachments().len())
        .unwrap_or(0);
    if attached > 0 {
        (
            StatusCode::OK,
            format!("ok: probes on {attached} interfaces\n"),
        )
            .into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "no interface has probes attached\n",
        )
            .into_response()
    }
}
