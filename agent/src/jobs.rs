//! The job workers: a bounded pool that takes queued jobs from the store
//! (oldest first), runs them and stores the result. Jobs: `check` (one
//! check), `tag` (every check with the tag), `hook` (the checks a
//! `[[hook]]` names).

use std::{collections::BTreeMap, time::Duration};

use serde_json::json;
use tracing::{info, warn};

use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{state::AppState, store::Job};

/// Jobs running at once.
pub const WORKERS: usize = 4;

/// Starts the workers on `tasks`; each stops taking jobs once `stop` is
/// cancelled (a job already running finishes first).
pub fn spawn(state: AppState, tasks: &TaskTracker, stop: CancellationToken) {
    for _ in 0..WORKERS {
        let state = state.clone();
        let stop = stop.clone();
        tasks.spawn(async move {
            let Some(store) = state.store.clone() else {
                return;
            };
            let wake = state.jobs_wake.clone();
            while !stop.is_cancelled() {
                let next = {
                    let s = store.clone();
                    tokio::task::spawn_blocking(move || s.claim())
                        .await
                        .ok()
                        .flatten()
                };
                match next {
                    Some(job) => {
                        let (ok, result) = run(&state, &job).await;
                        let s = store.clone();
                        let _ = tokio::task::spawn_blocking(move || s.finish(job.id, ok, &result))
                            .await;
                    }
                    None => {
                        // Woken by a new job; the timeout also picks up
                        // jobs queued before a restart.
                        tokio::select! {
                            _ = tokio::time::timeout(Duration::from_secs(1), wake.notified()) => {}
                            _ = stop.cancelled() => {}
                        }
                    }
                }
            }
        });
    }
}

/// The checks a job runs.
fn targets(state: &AppState, job: &Job) -> Result<Vec<String>, String> {
    let settings = state.settings();
    let specs = state.checks().specs();
    let names: Vec<String> = match job.kind.as_str() {
        "check" => vec![job.arg.clone()],
        "tag" => specs
            .iter()
            .filter(|s| s.tags.contains(&job.arg))
            .map(|s| s.name.clone())
            .collect(),
        "hook" => {
            let hook = settings
                .hooks
                .get(&job.arg)
                .ok_or_else(|| format!("no hook named `{}`", job.arg))?;
            specs
                .iter()
                .filter(|s| {
                    hook.checks.contains(&s.name) || s.tags.iter().any(|t| hook.tags.contains(t))
                })
                .map(|s| s.name.clone())
                .collect()
        }
        other => return Err(format!("unknown job kind `{other}`")),
    };
    if names.is_empty() {
        return Err("no checks to run".into());
    }
    Ok(names)
}

async fn run(state: &AppState, job: &Job) -> (bool, serde_json::Value) {
    info!(job = job.id, kind = %job.kind, arg = %job.arg, "job started");
    if job.kind == "capture" {
        let settings = state.settings().capture;
        return crate::capture::job(state.store.as_deref(), settings, job).await;
    }
    let names = match targets(state, job) {
        Ok(n) => n,
        Err(e) => {
            warn!(job = job.id, error = %e, "job failed");
            return (false, json!({ "error": e }));
        }
    };
    let engine = state.checks();
    let mut tasks = Vec::new();
    for n in names {
        let e = engine.clone();
        tasks.push((n.clone(), tokio::spawn(async move { e.run_now(&n).await })));
    }
    let mut results = BTreeMap::new();
    let mut all_ok = true;
    for (name, t) in tasks {
        let r = match t.await {
            Ok(Some(o)) => {
                all_ok &= o.ok;
                json!({ "ok": o.ok, "error": o.error, "duration_seconds": o.duration.as_secs_f64(), "http_status": o.http_status })
            }
            Ok(None) => {
                all_ok = false;
                json!({ "ok": false, "error": "the check is gone (config reloaded)" })
            }
            Err(e) => {
                all_ok = false;
                json!({ "ok": false, "error": e.to_string() })
            }
        };
        results.insert(name, r);
    }
    info!(job = job.id, ok = all_ok, "job finished");
    (all_ok, json!({ "ok": all_ok, "checks": results }))
}
