//! What a check does when it fails: after `after` consecutive failed runs
//! (once per run of failures), at most once per `cooldown`:
//!
//! - `webhook`: POST a JSON body describing the change to a URL;
//! - `restart_container`: restart a container through dockerd;
//! - `capture`: write the packets of the check's service (or a filter)
//!   from before the failure (a per-service ring in memory) and for
//!   `seconds` after it to a capture file (`capture::ring`).
//!
//! There is no `exec` action: an agent with these capabilities running
//! commands from its config would be a root shell by another name.

use std::{path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Uri, header};
use tracing::{info, warn};

#[derive(Debug, Clone)]
pub enum Do {
    Webhook { url: Uri },
    RestartContainer { container: String },
    Capture(crate::capture::ring::Spec),
}

#[derive(Debug, Clone)]
pub struct Action {
    pub what: Do,
    /// Consecutive failed runs before it fires.
    pub after: u32,
    /// Least time between two firings.
    pub cooldown: Duration,
}

impl Action {
    pub fn kind(&self) -> &'static str {
        match self.what {
            Do::Webhook { .. } => "webhook",
            Do::RestartContainer { .. } => "restart_container",
            Do::Capture(_) => "capture",
        }
    }
}

/// What the actions need from the agent.
#[derive(Debug, Clone, Default)]
pub struct Context {
    pub docker_socket: PathBuf,
    /// The pre-trigger rings of capture actions.
    pub rings: crate::capture::ring::Rings,
}

/// Fires `action` for `check` (in the background), with `event` as the
/// webhook's body.
pub fn fire(action: &Action, check: &str, event: serde_json::Value, ctx: &Arc<Context>) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let (action, check, ctx) = (action.clone(), check.to_string(), ctx.clone());
    rt.spawn(async move {
        let kind = action.kind();
        let r = match &action.what {
            Do::Webhook { url } => post_json(url, &event).await,
            Do::RestartContainer { container } => restart(&ctx.docker_socket, container).await,
            Do::Capture(spec) => ctx.rings.trigger(spec, &check),
        };
        match r {
            Ok(()) => info!(check = %check, action = kind, "action done"),
            Err(e) => warn!(check = %check, action = kind, error = %e, "action failed"),
        }
    });
}

/// POSTs `body` as JSON; a 2xx answer is success.
pub async fn post_json(url: &Uri, body: &serde_json::Value) -> Result<(), String> {
    let https = url.scheme_str() == Some("https");
    let host = url.host().ok_or("URL without a host")?.to_string();
    let port = url.port_u16().unwrap_or(if https { 443 } else { 80 });
    let fut = async {
        let tcp = tokio::net::TcpStream::connect((
            host.trim_start_matches('[').trim_end_matches(']'),
            port,
        ))
        .await
        .map_err(|e| format!("connecting to {host}:{port}: {e}"))?;
        let stream: Box<dyn super::kinds::Io> = if https {
            super::kinds::tls_wrap(&host, tcp, super::kinds::tls_config(None)?)
                .await?
                .0
        } else {
            Box::new(tcp)
        };
        let (mut sender, driver) = super::kinds::http1(stream).await?;
        let req = Request::post(url.path_and_query().map_or("/", |p| p.as_str()))
            .header(
                header::HOST,
                url.authority().map_or(host.clone(), |a| a.to_string()),
            )
            .header(header::CONTENT_TYPE, "application/json")
            .header(
                header::USER_AGENT,
                concat!("netpulse/", env!("CARGO_PKG_VERSION")),
            )
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let _ = resp.into_body().collect().await;
        driver.abort();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("{url} answered {status}"))
        }
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .map_err(|_| format!("{url}: no answer within 10 s"))?
}

async fn restart(socket: &std::path::Path, container: &str) -> Result<(), String> {
    let docker = bollard::Docker::connect_with_unix(
        &socket.to_string_lossy(),
        30,
        bollard::API_DEFAULT_VERSION,
    )
    .map_err(|e| crate::docker::describe(&e, socket))?
    .negotiate_version()
    .await
    .map_err(|e| crate::docker::describe(&e, socket))?;
    docker
        .restart_container(
            container,
            None::<bollard::query_parameters::RestartContainerOptions>,
        )
        .await
        .map_err(|e| format!("restarting container `{container}`: {e}"))
}
