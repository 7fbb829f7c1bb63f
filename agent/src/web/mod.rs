//! The HTTP side (axum): `/metrics`, `/healthz` and blackbox_exporter's
//! `/probe` here; the API in [`api`], [`captures`] and [`status`] (which
//! also serves the page and the badges). Handlers take the handles they
//! need from [`AppState`]; none waits for the datapath's writer. `serve`
//! is the connection loop,
//! with the limits a privileged agent on a production host needs: a bounded
//! number of connections, a deadline for request headers (slow clients
//! cannot hold connections open) and a cap on header size.

use std::{sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};

use crate::state::{AppState, Datapath};

pub mod api;
pub mod blackbox;
pub mod captures;
pub mod openapi;
pub mod status;

/// Every error answer of the API: `{"error": "..."}` with its status
/// (and, for a missing credential, the `WWW-Authenticate` challenge).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    challenge: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            challenge: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    /// 401 with `WWW-Authenticate: <challenge>`.
    pub fn unauthorized(message: impl Into<String>, challenge: &'static str) -> Self {
        Self {
            challenge: Some(challenge),
            ..Self::new(StatusCode::UNAUTHORIZED, message)
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.status, self.message)
    }
}

impl std::error::Error for ApiError {}

/// A blocking task that panicked or was cancelled.
impl From<tokio::task::JoinError> for ApiError {
    fn from(e: tokio::task::JoinError) -> Self {
        Self::internal(e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            Json(crate::api_types::ErrorBody {
                error: self.message,
            }),
        )
            .into_response();
        if let Some(c) = self.challenge {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static(c),
            );
        }
        r
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/probe", get(probe))
        .merge(api::routes())
        .merge(captures::routes())
        .merge(status::routes())
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
    State(state): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let settings = state.settings();
    let (users, token) = (settings.web_users.clone(), settings.api_token.clone());
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
        .is_some_and(|t| api::bearer_matches(req.headers(), t))
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
    ApiError::unauthorized(
        "authentication required",
        "Basic realm=\"netpulse\", charset=\"UTF-8\"",
    )
    .into_response()
}

/// Anything else: a JSON 404 that names what was asked for.
async fn not_found(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("no such endpoint: {method} {}", uri.path()))
}

/// blackbox_exporter's `/probe?target=…&module=…` (see [`blackbox`]).
/// As with blackbox_exporter, whoever reaches this endpoint can make the
/// agent connect to any target: keep it on loopback or behind a proxy.
async fn probe(
    State(state): State<AppState>,
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
    let specs = state.checks().specs();
    let mut spec = match blackbox::module(module, target, &specs) {
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
    let mut resp = text(StatusCode::OK, blackbox::render(&spec, &out));
    if let Ok(v) = header::HeaderValue::from_str("text/plain; version=0.0.4; charset=utf-8") {
        resp.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    resp
}

async fn metrics(State(state): State<AppState>) -> Response {
    let body = tokio::task::spawn_blocking(move || {
        let settings = state.settings();
        let docker = settings
            .docker_enabled
            .then(|| crate::metrics::DockerState {
                up: crate::docker::lock(&state.docker).up,
                labels: &settings.docker_labels,
            });
        let view = state.datapath.view();
        let checks = state.checks();
        let tcp = crate::metrics::TcpSnapshot::read(state.datapath.counters(), &view);
        crate::metrics::render(&crate::metrics::Scrape {
            counters: state.datapath.counters(),
            budget: crate::metrics::Budget::new(&view, settings.max_series, |slot| {
                tcp.series(slot)
            }),
            tcp: &tcp,
            view: &view,
            docker,
            checks: &checks,
        })
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

async fn healthz(State(datapath): State<Arc<Datapath>>) -> Response {
    let attached = datapath.view().attachments.len();
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

/// Serves `app` on `listener` until `shutdown` is cancelled; over TLS
/// while `tls` holds a server config (it can change on a reload).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: tokio_util::sync::CancellationToken,
    tls: tokio::sync::watch::Receiver<Option<Arc<rustls::ServerConfig>>>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = shutdown.cancelled() => return,
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
            _ = shutdown.cancelled() => return,
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
