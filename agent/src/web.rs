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
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authenticate,
        ))
        .with_state(state)
}

/// With `[web.basic_auth_users]`, every request needs a user's password
/// (`Authorization: Basic`) or the API token (`Authorization: Bearer`, the
/// stronger credential: a pipeline that may start work may also read).
async fn authenticate(
    State(state): State<Shared>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let (users, token) = {
        let a = lock(&state);
        (a.web_users.clone(), a.api_token.clone())
    };
    if users.is_empty() {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let ok = token
        .as_deref()
        .is_some_and(|t| crate::api::bearer_matches(req.headers(), t))
        || match crate::websec::basic_credentials(&given) {
            Some((user, password)) => {
                tokio::task::spawn_blocking(move || users.check(&user, &password))
                    .await
                    .unwrap_or(false)
            }
            None => false,
        };
    if ok {
        return next.run(req).await;
    }
    let mut r = crate::status::error(StatusCode::UNAUTHORIZED, "authentication required");
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Basic realm=\"netpulse\", charset=\"UTF-8\""),
    );
    r
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

/// A TLS client has this long to finish its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `app` on `listener` until `shutdown` turns true; over TLS while
/// `tls` holds a server config (it can change on a reload).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    tls: tokio::sync::watch::Receiver<Option<Arc<rustls::ServerConfig>>>,
) {
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
        let app = app.clone();
        let tls = tls.borrow().clone();
        tokio::spawn(async move {
            match tls {
                None => serve_io(stream, app).await,
                Some(cfg) => {
                    let accept = tokio_rustls::TlsAcceptor::from(cfg).accept(stream);
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
                        Ok(Ok(s)) => serve_io(s, app).await,
                        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                }
            }
            drop(permit);
        });
    }
}

/// HTTP/1 on one connection, with the header deadline and size cap.
async fn serve_io<I>(io: I, app: Router)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use hyper_util::{
        rt::{TokioIo, TokioTimer},
        service::TowerToHyperService,
    };
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES);
    if let Err(e) = http
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(app))
        .await
    {
        tracing::debug!(error = %e, "connection closed");
    }
}

async fn stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    // The guard wait_for returns is not Send; drop it here.
    let _ = rx.wait_for(|v| *v).await;
}
