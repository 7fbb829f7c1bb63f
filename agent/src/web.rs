//! The HTTP side: `/metrics`, `/healthz` and blackbox_exporter's `/probe`
//! (axum). Handlers are thin: they
//! lock the agent state, read, and let go. `serve` is the connection loop,
//! with the limits a privileged agent on a production host needs: a bounded
//! number of connections, a deadline for request headers (slow clients
//! cannot hold connections open) and a cap on header size.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};

use crate::run::Agent;

pub type Shared = Arc<Mutex<Agent>>;

/// Locks the agent state. A panic while it was held (a bug) must not turn
/// the agent into one that serves errors forever: the state is plain data,
/// so carry on with it.
pub fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, Agent> {
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/probe", get(probe))
        .merge(crate::api::routes())
        .merge(crate::status::routes())
        .fallback(not_found)
        .with_state(state)
}

/// Anything else: a JSON 404 that names what was asked for.
async fn not_found(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    crate::status::error(
        StatusCode::NOT_FOUND,
        format!("no such endpoint: {method} {}", uri.path()),
    )
}

/// blackbox_exporter's `/probe?target=…&module=…` (see checks::blackbox).
/// As with blackbox_exporter, whoever reaches this endpoint can make the
/// agent connect to any target: keep it on loopback or behind a proxy.
async fn probe(
    State(state): State<Shared>,
    headers: axum::http::HeaderMap,
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Response {
    let text = |code: StatusCode, body: String| {
        (
            code,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            body,
        )
            .into_response()
    };
    let Some(target) = q.get("target").filter(|t| !t.is_empty()) else {
        return text(
            StatusCode::BAD_REQUEST,
            "Target parameter is missing\n".into(),
        );
    };
    let module = q.get("module").map_or("http_2xx", String::as_str);
    let specs = lock(&state).checks.specs();
    let mut spec = match crate::checks::blackbox::module(module, target, &specs) {
        Ok(s) => s,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    // Like blackbox_exporter: finish within Prometheus's scrape timeout.
    if let Some(t) = headers
        .get("X-Prometheus-Scrape-Timeout-Seconds")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|t| t.is_finite() && *t > 0.6)
    {
        spec.timeout = spec.timeout.min(Duration::from_secs_f64(t - 0.5));
    }
    let out = crate::checks::kinds::run(&spec).await;
    let mut resp = text(StatusCode::OK, crate::checks::blackbox::render(&spec, &out));
    if let Ok(v) = header::HeaderValue::from_str("text/plain; version=0.0.4; charset=utf-8") {
        resp.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    resp
}

async fn metrics(State(state): State<Shared>) -> Response {
    let body = tokio::task::spawn_blocking(move || {
        let agent = lock(&state);
        let up = crate::docker::lock(&agent.docker).up;
        let docker = agent.docker_enabled.then_some(crate::metrics::DockerState {
            up,
            labels: &agent.docker_labels,
        });
        crate::metrics::render(
            &agent.probe,
            &agent.identity,
            agent.max_series,
            docker,
            &agent.checks,
        )
        .map_err(|e| e.to_string())
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
    // Off the async workers: the lock may be held by a refresh.
    let attached = tokio::task::spawn_blocking(move || lock(&state).probe.attachments().len())
        .await
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

/// Connections served at once; more wait in the kernel's accept queue.
pub const MAX_CONNECTIONS: usize = 256;
/// A client has this long to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head accepted (hyper's minimum buffer is 8 KiB).
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Serves `app` on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    use hyper_util::{
        rt::{TokioIo, TokioTimer},
        service::TowerToHyperService,
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = stopped(&mut shutdown) => return,
        };
        let (stream, _peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => return,
        };
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_HEADER_BYTES);
            if let Err(e) = http.serve_connection(TokioIo::new(stream), service).await {
                tracing::debug!(error = %e, "connection closed");
            }
            drop(permit);
        });
    }
}

async fn stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    // The guard wait_for returns is not Send; drop it here.
    let _ = rx.wait_for(|v| *v).await;
}
