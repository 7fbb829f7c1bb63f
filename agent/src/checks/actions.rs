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
use hyper::Uri;
use tracing::{info, warn};

use crate::config::{ActionKind, CheckConfig, Choice, Diagnostics, Word};

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

/// The `actions` of check `c`; problems go to `d`.
pub fn from_config(c: &CheckConfig, d: &mut Diagnostics) -> Vec<Action> {
    let mut out = Vec::new();
    for a in &c.actions {
        let what = match a.kind.get_ref() {
            Choice::Known(ActionKind::Webhook) => match a
                .url
                .as_ref()
                .map(|u| (u, u.get_ref().parse::<hyper::Uri>()))
            {
                Some((_, Ok(url)))
                    if matches!(url.scheme_str(), Some("http" | "https"))
                        && url.host().is_some() =>
                {
                    Some(Do::Webhook { url })
                }
                Some((u, _)) => {
                    d.at(
                        u.span(),
                        format!("`{}` is not an http:// or https:// URL", u.get_ref()),
                    );
                    None
                }
                None => {
                    d.at(a.kind.span(), "a webhook action needs `url`");
                    None
                }
            },
            Choice::Known(ActionKind::RestartContainer) => match &a.container {
                Some(c) if !c.get_ref().is_empty() => Some(Do::RestartContainer {
                    container: c.get_ref().clone(),
                }),
                _ => {
                    d.at(
                        a.kind.span(),
                        "a restart_container action needs `container`",
                    );
                    None
                }
            },
            Choice::Known(ActionKind::Capture) => {
                crate::capture::ring::Spec::from_config(a, c.service.as_ref(), d).map(Do::Capture)
            }
            Choice::Unknown(w) if w == "exec" => {
                d.at(
                    a.kind.span(),
                    "there is no exec action: an agent with these capabilities running commands from its config would be a root shell by another name",
                );
                None
            }
            Choice::Unknown(other) => {
                d.at(
                    a.kind.span(),
                    format!("action `{other}` is not one of {}", ActionKind::list(", ")),
                );
                None
            }
        };
        let after = match &a.after {
            None => 1,
            Some(v) if (1..=1000).contains(v.get_ref()) => *v.get_ref() as u32,
            Some(v) => {
                d.at(
                    v.span(),
                    format!("after = {} is out of range 1-1000", v.get_ref()),
                );
                1
            }
        };
        let cooldown = match &a.cooldown_seconds {
            None => Duration::from_secs(300),
            Some(v) if v.get_ref().is_finite() && (0.0..=7.0 * 86400.0).contains(v.get_ref()) => {
                Duration::from_secs_f64(*v.get_ref())
            }
            Some(v) => {
                d.at(
                    v.span(),
                    format!(
                        "cooldown_seconds = {} is out of range 0-604800",
                        v.get_ref()
                    ),
                );
                Duration::from_secs(300)
            }
        };
        if let Some(what) = what {
            out.push(Action {
                what,
                after,
                cooldown,
            });
        }
    }
    out
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
            Do::Capture(spec) => ctx
                .rings
                .trigger(spec, &check, event["explanation"].as_str()),
        };
        match r {
            Ok(()) => info!(check = %check, action = kind, "action done"),
            Err(e) => warn!(check = %check, action = kind, error = %e, "action failed"),
        }
    });
}

/// POSTs `body` as JSON; a 2xx answer is success.
pub async fn post_json(url: &Uri, body: &serde_json::Value) -> Result<(), String> {
    let (status, _) = crate::client::request(
        hyper::Method::POST,
        url,
        &[],
        Some(("application/json", Bytes::from(body.to_string()))),
        Duration::from_secs(10),
    )
    .await
    .map_err(|e| format!("{url}: {e}"))?;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("{url} answered {status}"))
    }
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
