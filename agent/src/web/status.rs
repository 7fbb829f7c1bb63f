//! What people look at: `/api/v1/services` (counters, rates, source,
//! containers and checks per service), `/api/v1/interfaces`, the OpenAPI
//! document, the status page at `/` and README badges at
//! `/badge/{service}.svg`. The page and its script are embedded in the
//! binary; nothing is fetched from elsewhere.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    extract::{Path, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use serde_json::{Value, json};

use super::error;
use crate::{
    checks::engine::State as CheckState,
    history::{self, Totals},
    identity::Slotted,
    state::{AppState, Datapath},
    store::Store,
};

const PAGE: &str = include_str!("status/index.html");
const OPENAPI: &str = include_str!("status/openapi.json");

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(page))
        .route("/api/v1/services", get(services))
        .route("/api/v1/services/{name}", get(service))
        .route("/api/v1/interfaces", get(interfaces))
        .route("/api/v1/openapi.json", get(openapi))
        .route("/badge/{file}", get(badge))
}

/// A service's state on the page, from its checks (those that have not run
/// yet do not count); without checks, from whether its source still sees
/// it.
pub fn service_state(checks: &[CheckState], retired: bool, source: &str) -> &'static str {
    let count = |s: CheckState| checks.iter().filter(|c| **c == s).count();
    let (up, down, blocked) = (
        count(CheckState::Up),
        count(CheckState::Down),
        count(CheckState::Blocked),
    );
    if checks.is_empty() {
        return match (retired, source) {
            (true, _) => "down",
            (false, "socket" | "container") => "up",
            _ => "unknown",
        };
    }
    let known = checks.len() - count(CheckState::Unknown);
    if down > 0 {
        if down + blocked == known {
            "down"
        } else {
            "degraded"
        }
    } else if blocked > 0 {
        "blocked"
    } else if up > 0 {
        "up"
    } else {
        "unknown"
    }
}

/// One check of a service, as read under the agent lock.
struct CheckRow {
    name: String,
    kind: &'static str,
    state: CheckState,
    latency: Option<f64>,
}

/// One service, as read under the agent lock.
struct Row {
    name: String,
    slot: Slotted,
    counts: agent_ebpf::SlotCounters,
    rates: [Option<history::Rates>; 2],
    sparkline: Vec<history::Rates>,
    checks: Vec<CheckRow>,
}

/// Reads every service (or the one named): counters live from the maps,
/// rates against the history ring, checks from the engine.
fn read(state: &AppState, only: Option<&str>) -> Vec<Row> {
    let now = Instant::now();
    let views = state.checks().view();
    let dp = state.datapath.view();
    let history = state.history.lock().unwrap_or_else(|p| p.into_inner());
    dp.services
        .iter()
        .filter(|(name, _)| only.is_none_or(|o| o == name.as_str()))
        .map(|(name, s)| {
            let counts = state.datapath.counters().counts(s.slot).unwrap_or_default();
            let totals = Totals::from(&counts);
            let rate = |w| history.rate(name, &totals, now, Duration::from_secs(w));
            Row {
                name: name.clone(),
                slot: s.clone(),
                counts,
                rates: [rate(60), rate(300)],
                sparkline: history.sparkline(name),
                checks: views
                    .iter()
                    .filter(|v| v.spec.service.as_deref() == Some(name.as_str()))
                    .map(|v| CheckRow {
                        name: v.spec.name.clone(),
                        kind: v.spec.kind.as_str(),
                        state: v.state,
                        latency: v.status.last.as_ref().map(|l| l.duration.as_secs_f64()),
                    })
                    .collect(),
            }
        })
        .collect()
}

fn dir_json(d: &agent_ebpf::DirCounters) -> Value {
    json!({ "packets": d.packets, "bytes": d.bytes, "syn": d.syn, "fin": d.fin, "rst": d.rst })
}

/// The JSON of one service. Runs the store's uptime queries: call it off
/// the async threads.
fn service_json(r: &Row, store: Option<&Store>) -> Value {
    use agent_ebpf::{DIR_EGRESS, DIR_INGRESS};
    let meta = r.slot.meta.as_ref();
    let source = meta.map_or("restored", |m| m.source.as_str());
    let containers = meta.map_or(&[][..], |m| &m.containers[..]);
    let join = |f: &dyn Fn(&crate::identity::ContainerMeta) -> &str| {
        meta.map_or(String::new(), |m| m.join(f))
    };
    let states: Vec<CheckState> = r.checks.iter().map(|c| c.state).collect();
    let retired = r.slot.retired_at.is_some();
    let mut worst: [Option<f64>; 2] = [None, None];
    let checks: Vec<Value> = r
        .checks
        .iter()
        .map(|c| {
            let up = store.map_or([None, None], |s| {
                let sum = s.summary(&c.name);
                [sum.uptime_24h, sum.uptime_7d]
            });
            for (w, u) in worst.iter_mut().zip(up) {
                if let Some(u) = u {
                    *w = Some(w.map_or(u, |x: f64| x.min(u)));
                }
            }
            json!({
                "name": c.name,
                "kind": c.kind,
                "state": c.state.as_str(),
                "latency_seconds": c.latency,
                "uptime": { "24h": up[0], "7d": up[1] },
            })
        })
        .collect();
    let latency = r
        .checks
        .iter()
        .filter_map(|c| c.latency)
        .fold(None, |m: Option<f64>, l| Some(m.map_or(l, |m| m.max(l))));
    json!({
        "name": r.name,
        "source": source,
        "state": service_state(&states, retired, source),
        "retired": retired,
        "remote": meta.is_some_and(|m| m.remote),
        "compose_project": join(&|c| &c.compose_project),
        "compose_service": join(&|c| &c.compose_service),
        "containers": containers.iter().map(|c| json!({
            "id": c.id.get(..12).unwrap_or(&c.id),
            "name": c.name,
            "image": c.image,
        })).collect::<Vec<_>>(),
        "counters": {
            "ingress": dir_json(&r.counts.dir[DIR_INGRESS]),
            "egress": dir_json(&r.counts.dir[DIR_EGRESS]),
        },
        "rates": { "1m": r.rates[0], "5m": r.rates[1] },
        "sparkline": {
            "interval_seconds": history::INTERVAL.as_secs(),
            "rx_bytes_per_second": r.sparkline.iter().map(|x| x.rx_bytes_per_second).collect::<Vec<_>>(),
            "tx_bytes_per_second": r.sparkline.iter().map(|x| x.tx_bytes_per_second).collect::<Vec<_>>(),
        },
        "checks": checks,
        "latency_seconds": latency,
        "uptime": { "24h": worst[0], "7d": worst[1] },
    })
}

/// Every service, or the one named (None if there is no such service).
async fn services_json(state: AppState, only: Option<String>) -> Result<Vec<Value>, Response> {
    tokio::task::spawn_blocking(move || {
        let rows = read(&state, only.as_deref());
        rows.iter()
            .map(|r| service_json(r, state.store.as_deref()))
            .collect()
    })
    .await
    .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

fn generated_at() -> f64 {
    crate::metrics::epoch(std::time::SystemTime::now())
}

async fn services(State(state): State<AppState>) -> Response {
    match services_json(state, None).await {
        Ok(v) => Json(json!({
            "generated_at": generated_at(),
            "host": hostname(),
            "services": v,
        }))
        .into_response(),
        Err(r) => r,
    }
}

async fn service(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    match services_json(state, Some(name.clone())).await {
        Ok(mut v) if !v.is_empty() => Json(v.swap_remove(0)).into_response(),
        Ok(_) => error(StatusCode::NOT_FOUND, format!("no service named `{name}`")),
        Err(r) => r,
    }
}

/// The kernel's counters of an interface (/sys/class/net/<if>/statistics).
fn if_stats(name: &str) -> Value {
    let dir = std::path::Path::new("/sys/class/net")
        .join(name)
        .join("statistics");
    let read = |f: &str| {
        std::fs::read_to_string(dir.join(f))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
    };
    let keys = [
        "rx_packets",
        "rx_bytes",
        "rx_dropped",
        "tx_packets",
        "tx_bytes",
        "tx_dropped",
    ];
    Value::Object(
        keys.iter()
            .map(|k| (k.to_string(), json!(read(k))))
            .collect(),
    )
}

async fn interfaces(State(datapath): State<Arc<Datapath>>) -> Response {
    let list: Vec<Value> = {
        datapath
            .view()
            .attachments
            .iter()
            .map(|at| {
                json!({
                    "name": at.name,
                    "ifindex": at.ifindex,
                    "zone": at.zone.as_str(),
                    "hooks": at.hooks.iter().map(|(h, m)| json!({ "hook": h, "mode": m })).collect::<Vec<_>>(),
                })
            })
            .collect()
    };
    // The kernel's interface counters, off the async workers.
    let rows = tokio::task::spawn_blocking(move || {
        list.into_iter()
            .map(|mut i| {
                let stats = if_stats(i["name"].as_str().unwrap_or_default());
                i["counters"] = stats;
                i
            })
            .collect::<Vec<_>>()
    })
    .await;
    match rows {
        Ok(rows) => Json(json!({ "interfaces": rows })).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // Everything the page needs comes from here.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:",
            ),
        ],
        PAGE,
    )
        .into_response()
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A flat two-part badge (label | state), as shields.io draws them.
pub fn badge_svg(label: &str, value: &str) -> String {
    let color = match value {
        "up" => "#2e9e4f",
        "down" => "#d73a49",
        "degraded" | "blocked" => "#dba617",
        _ => "#8a8f98",
    };
    // Verdana 11px averages ~6.5 px a character.
    let w = |s: &str| 10 + (s.chars().count() as u32 * 13).div_ceil(2);
    let (lw, vw) = (w(label), w(value));
    let (label, value) = (xml_escape(label), xml_escape(value));
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{tw}" height="20" role="img" aria-label="{label}: {value}"><title>{label}: {value}</title><linearGradient id="s" x2="0" y2="100%"><stop offset="0" stop-color="#bbb" stop-opacity=".1"/><stop offset="1" stop-opacity=".1"/></linearGradient><clipPath id="r"><rect width="{tw}" height="20" rx="3" fill="#fff"/></clipPath><g clip-path="url(#r)"><rect width="{lw}" height="20" fill="#555"/><rect x="{lw}" width="{vw}" height="20" fill="{color}"/><rect width="{tw}" height="20" fill="url(#s)"/></g><g fill="#fff" text-anchor="middle" font-family="Verdana,Geneva,DejaVu Sans,sans-serif" font-size="11"><text x="{lx}" y="14">{label}</text><text x="{vx}" y="14">{value}</text></g></svg>"##,
        tw = lw + vw,
        lx = lw / 2,
        vx = lw + vw / 2,
    )
}

async fn badge(State(state): State<AppState>, Path(file): Path<String>) -> Response {
    let svg = |code: StatusCode, body: String| {
        (
            code,
            [
                (header::CONTENT_TYPE, "image/svg+xml"),
                (header::CACHE_CONTROL, "no-cache, max-age=0"),
            ],
            body,
        )
            .into_response()
    };
    let Some(name) = file.strip_suffix(".svg") else {
        return error(
            StatusCode::NOT_FOUND,
            format!("badges are at /badge/<service>.svg, not /badge/{file}"),
        );
    };
    match services_json(state, Some(name.to_string())).await {
        Ok(v) => match v.first() {
            Some(s) => svg(
                StatusCode::OK,
                badge_svg(name, s["state"].as_str().unwrap_or("unknown")),
            ),
            None => svg(StatusCode::NOT_FOUND, badge_svg(name, "not found")),
        },
        Err(r) => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use CheckState::*;

    #[test]
    fn service_state_from_checks_and_source() {
        assert_eq!(service_state(&[Up, Up], false, "config"), "up");
        assert_eq!(service_state(&[Up, Down], false, "config"), "degraded");
        assert_eq!(service_state(&[Down, Blocked], false, "config"), "down");
        assert_eq!(service_state(&[Up, Blocked], false, "config"), "blocked");
        assert_eq!(service_state(&[Unknown], false, "config"), "unknown");
        assert_eq!(service_state(&[Down, Unknown], false, "config"), "down");
        assert_eq!(service_state(&[Up, Unknown], false, "config"), "up");
        assert_eq!(service_state(&[], false, "socket"), "up");
        assert_eq!(service_state(&[], true, "container"), "down");
        assert_eq!(service_state(&[], false, "config"), "unknown");
    }

    #[test]
    fn badges_escape_names_and_color_states() {
        let b = badge_svg("a<b>&c", "down");
        assert!(b.contains("a&lt;b&gt;&amp;c"));
        assert!(b.contains("#d73a49"));
        assert!(b.starts_with("<svg"));
    }
}
