//! What people look at: `/api/v1/services` (counters, rates, source,
//! containers and checks per service), `/api/v1/interfaces`, the OpenAPI
//! document, the status page at `/` and README badges at
//! `/badge/{service}.svg`. The page and its script are embedded in the
//! binary; nothing is fetched from elsewhere.

use std::{
    collections::HashMap,
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

use super::{ApiError, api::check_state};
use crate::{
    api_types::{self as t, ErrorBody},
    checks::engine::State as CheckState,
    history::{self, Totals},
    identity::Slotted,
    state::{AppState, Datapath, View},
    store::Store,
};

const PAGE: &str = include_str!("status/index.html");

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
pub fn service_state(checks: &[CheckState], retired: bool, source: &str) -> t::ServiceState {
    use t::ServiceState as S;
    let count = |s: CheckState| checks.iter().filter(|c| **c == s).count();
    let (up, down, blocked) = (
        count(CheckState::Up),
        count(CheckState::Down),
        count(CheckState::Blocked),
    );
    if checks.is_empty() {
        return match (retired, source) {
            (true, _) => S::Down,
            (false, "socket" | "container") => S::Up,
            _ => S::Unknown,
        };
    }
    let known = checks.len() - count(CheckState::Unknown);
    if down > 0 {
        if down + blocked == known {
            S::Down
        } else {
            S::Degraded
        }
    } else if blocked > 0 {
        S::Blocked
    } else if up > 0 {
        S::Up
    } else {
        S::Unknown
    }
}

/// One check of a service, as read from the engine.
struct CheckRow {
    name: String,
    kind: &'static str,
    state: CheckState,
    latency: Option<f64>,
}

/// One service, as read from the datapath's view (borrowed from it).
struct Row<'a> {
    name: &'a str,
    slot: &'a Slotted,
    counts: agent_ebpf::SlotCounters,
    rates: [Option<history::Rates>; 2],
    /// Received and sent bytes per second, oldest first.
    sparkline: [Vec<f64>; 2],
    checks: Vec<CheckRow>,
    tcp: Option<t::TcpHealth>,
}

/// A service's TCP health from the counters and the view: `None` before
/// its first connection and where nothing follows TCP.
fn tcp_health(
    state: &AppState,
    dp: &View,
    s: &Slotted,
    counts: &agent_ebpf::SlotCounters,
    drops: &HashMap<u32, std::collections::BTreeMap<String, u64>>,
) -> Option<t::TcpHealth> {
    use agent_ebpf::{DIR_EGRESS, DIR_INGRESS, TCP_RESULTS};
    let side = crate::metrics::side(s);
    let client = side == "client";
    let counters = state.datapath.counters();
    let c = counters.tcp(s.slot, client)?;
    let slot_drops = drops.get(&s.slot);
    if !crate::metrics::tcp_seen(&c) && slot_drops.is_none() {
        return None;
    }
    let mut unavailable: Vec<String> = counters
        .tcp_unavailable()
        .iter()
        .map(|u| u.to_string())
        .collect();
    for f in &dp.features {
        if f.error.is_some() {
            unavailable.push(f.name.to_string());
        }
    }
    let seed = dp.open_seed.get(&s.slot).copied().unwrap_or(0);
    let retransmits = crate::health::retransmits(&c);
    // What this host sent: a server's egress, a client's packets toward
    // the remote service (its ingress).
    let sent = counts.dir[if client { DIR_INGRESS } else { DIR_EGRESS }].packets;
    let mut rtt = c.rtt;
    rtt.add(&c.rtt_live);
    Some(t::TcpHealth {
        side: side.to_string(),
        connections: TCP_RESULTS
            .iter()
            .map(|(i, r)| (r.to_string(), c.counts[*i]))
            .collect(),
        open: (crate::health::open_counted(&c) + seed).max(0) as u64,
        handshake_p50_seconds: crate::health::quantile(&c.handshake, 0.5),
        handshake_p99_seconds: crate::health::quantile(&c.handshake, 0.99),
        rtt_p50_seconds: crate::health::quantile(&rtt, 0.5),
        rtt_p99_seconds: crate::health::quantile(&rtt, 0.99),
        retransmits,
        retransmit_ratio: (sent > 0).then(|| retransmits as f64 / sent as f64),
        drops: slot_drops.cloned().unwrap_or_default(),
        unavailable,
    })
}

/// Kernel drops by slot and reason name (directions summed).
fn drops_by_slot(
    state: &AppState,
    dp: &View,
) -> HashMap<u32, std::collections::BTreeMap<String, u64>> {
    let mut out: HashMap<u32, std::collections::BTreeMap<String, u64>> = HashMap::new();
    for (k, n) in state.datapath.counters().drops() {
        let reason = crate::health::reason_name(&dp.drop_reasons, k.reason);
        *out.entry(k.slot).or_default().entry(reason).or_default() += n;
    }
    out
}

/// Reads every service of `dp` (or the one named): counters live from
/// the maps, rates against the history ring, checks from the engine.
fn read<'a>(state: &AppState, dp: &'a View, only: Option<&str>) -> Vec<Row<'a>> {
    let now = Instant::now();
    let views = state.checks().view();
    // The checks by service, once: not a scan of every check per service.
    let mut by_service: HashMap<&str, Vec<CheckRow>> = HashMap::new();
    for v in views.iter() {
        if let Some(s) = v.spec.service.as_deref()
            && only.is_none_or(|o| o == s)
        {
            by_service.entry(s).or_default().push(CheckRow {
                name: v.spec.name.clone(),
                kind: v.spec.kind.as_str(),
                state: v.state,
                latency: v.status.last.as_ref().map(|l| l.duration.as_secs_f64()),
            });
        }
    }
    let selected: Vec<(&'a String, &'a Slotted)> = match only {
        None => dp.services.iter().collect(),
        Some(o) => dp.services.get_key_value(o).into_iter().collect(),
    };
    let drops = drops_by_slot(state, dp);
    let history = state.history.lock().unwrap_or_else(|p| p.into_inner());
    selected
        .into_iter()
        .map(|(name, s)| {
            let counts = state.datapath.counters().counts(s.slot).unwrap_or_default();
            let totals = Totals::from(&counts);
            let rate = |w| history.rate(name, &totals, now, Duration::from_secs(w));
            let sparkline = history.sparkline(name);
            Row {
                name,
                slot: s,
                counts,
                rates: [rate(60), rate(300)],
                sparkline: [
                    sparkline.iter().map(|x| x.rx_bytes_per_second).collect(),
                    sparkline.iter().map(|x| x.tx_bytes_per_second).collect(),
                ],
                checks: by_service.remove(name.as_str()).unwrap_or_default(),
                tcp: tcp_health(state, dp, s, &counts, &drops),
            }
        })
        .collect()
}

fn direction(d: &agent_ebpf::DirCounters) -> t::Direction {
    t::Direction {
        packets: d.packets,
        bytes: d.bytes,
        syn: d.syn,
        fin: d.fin,
        rst: d.rst,
    }
}

fn rates(r: history::Rates) -> t::Rates {
    t::Rates {
        rx_packets_per_second: r.rx_packets_per_second,
        rx_bytes_per_second: r.rx_bytes_per_second,
        tx_packets_per_second: r.tx_packets_per_second,
        tx_bytes_per_second: r.tx_bytes_per_second,
    }
}

/// One service as the API answers it. Runs the store's uptime queries:
/// call it off the async threads.
fn service_type(r: Row<'_>, store: Option<&Store>) -> t::Service {
    use agent_ebpf::{DIR_EGRESS, DIR_INGRESS};
    let meta = r.slot.meta.as_ref();
    let source = meta.map_or("restored", |m| m.source.as_str());
    let join = |f: &dyn Fn(&crate::identity::ContainerMeta) -> &str| {
        meta.map_or(String::new(), |m| m.join(f))
    };
    let [rx, tx] = r.sparkline;
    let states: Vec<CheckState> = r.checks.iter().map(|c| c.state).collect();
    let retired = r.slot.retired_at.is_some();
    let mut worst: [Option<f64>; 2] = [None, None];
    let latency = r
        .checks
        .iter()
        .filter_map(|c| c.latency)
        .fold(None, |m: Option<f64>, l| Some(m.map_or(l, |m| m.max(l))));
    let checks = r
        .checks
        .into_iter()
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
            t::ServiceCheck {
                name: c.name,
                kind: c.kind.to_string(),
                state: check_state(c.state),
                latency_seconds: c.latency,
                uptime: t::Uptime {
                    h24: up[0],
                    d7: up[1],
                },
            }
        })
        .collect();
    t::Service {
        state: service_state(&states, retired, source),
        source: source.to_string(),
        name: r.name.to_string(),
        retired,
        remote: meta.is_some_and(|m| m.remote),
        compose_project: join(&|c| &c.compose_project),
        compose_service: join(&|c| &c.compose_service),
        containers: meta
            .map(|m| {
                m.containers
                    .iter()
                    .map(|c| t::Container {
                        id: c.id.get(..12).unwrap_or(&c.id).to_string(),
                        name: c.name.clone(),
                        image: c.image.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        counters: t::Counters {
            ingress: direction(&r.counts.dir[DIR_INGRESS]),
            egress: direction(&r.counts.dir[DIR_EGRESS]),
        },
        rates: t::RateWindows {
            m1: r.rates[0].map(rates),
            m5: r.rates[1].map(rates),
        },
        sparkline: t::Sparkline {
            interval_seconds: history::INTERVAL.as_secs(),
            rx_bytes_per_second: rx,
            tx_bytes_per_second: tx,
        },
        checks,
        latency_seconds: latency,
        tcp: r.tcp,
        uptime: t::Uptime {
            h24: worst[0],
            d7: worst[1],
        },
    }
}

/// Every service, or the one named (empty if there is no such service).
async fn read_services(state: AppState, only: Option<String>) -> Result<Vec<t::Service>, ApiError> {
    Ok(tokio::task::spawn_blocking(move || {
        let dp = state.datapath.view();
        read(&state, &dp, only.as_deref())
            .into_iter()
            .map(|r| service_type(r, state.store.as_deref()))
            .collect()
    })
    .await?)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

fn generated_at() -> f64 {
    crate::metrics::epoch(std::time::SystemTime::now())
}

/// Every service: counters, 1m/5m rates, the 15-minute sparkline, source,
/// containers and checks.
#[utoipa::path(
    get,
    path = "/api/v1/services",
    tag = "services",
    responses((status = 200, description = "The services.", body = t::Services))
)]
pub(crate) async fn services(State(state): State<AppState>) -> Result<Json<t::Services>, ApiError> {
    let services = read_services(state, None).await?;
    Ok(Json(t::Services {
        generated_at: generated_at(),
        host: hostname(),
        services,
    }))
}

/// One service, as in the list.
#[utoipa::path(
    get,
    path = "/api/v1/services/{name}",
    tag = "services",
    params(("name" = String, Path, description = "The service's name.")),
    responses(
        (status = 200, description = "The service.", body = t::Service),
        (status = 404, description = "No such service.", body = ErrorBody),
    )
)]
pub(crate) async fn service(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<t::Service>, ApiError> {
    read_services(state, Some(name.clone()))
        .await?
        .pop()
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no service named `{name}`")))
}

/// The kernel's counters of an interface (/sys/class/net/<if>/statistics).
fn if_stats(name: &str) -> t::InterfaceCounters {
    let dir = std::path::Path::new("/sys/class/net")
        .join(name)
        .join("statistics");
    let read = |f: &str| {
        std::fs::read_to_string(dir.join(f))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
    };
    t::InterfaceCounters {
        rx_bytes: read("rx_bytes"),
        rx_dropped: read("rx_dropped"),
        rx_packets: read("rx_packets"),
        tx_bytes: read("tx_bytes"),
        tx_dropped: read("tx_dropped"),
        tx_packets: read("tx_packets"),
    }
}

/// The interfaces with probes: hooks, modes and the kernel's counters.
#[utoipa::path(
    get,
    path = "/api/v1/interfaces",
    tag = "services",
    responses((status = 200, description = "The interfaces with probes.", body = t::Interfaces))
)]
pub(crate) async fn interfaces(
    State(datapath): State<Arc<Datapath>>,
) -> Result<Json<t::Interfaces>, ApiError> {
    let view = datapath.view();
    // The kernel's interface counters, off the async workers.
    let interfaces = tokio::task::spawn_blocking(move || {
        view.attachments
            .iter()
            .map(|at| t::Interface {
                name: at.name.clone(),
                ifindex: at.ifindex,
                zone: at.zone.as_str().to_string(),
                hooks: at
                    .hooks
                    .iter()
                    .map(|(h, m)| t::Hook {
                        hook: h.to_string(),
                        mode: m.to_string(),
                    })
                    .collect(),
                counters: if_stats(&at.name),
            })
            .collect()
    })
    .await?;
    Ok(Json(t::Interfaces { interfaces }))
}

/// This document.
#[utoipa::path(
    get,
    path = "/api/v1/openapi.json",
    tag = "meta",
    responses((status = 200, description = "The OpenAPI document of this API.", content_type = "application/json", body = Object))
)]
pub(crate) async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        super::openapi::json(),
    )
        .into_response()
}

/// The status page (HTML; everything it needs is inline).
#[utoipa::path(
    get,
    path = "/",
    tag = "page",
    responses((status = 200, description = "The status page.", content_type = "text/html", body = String))
)]
pub(crate) async fn page() -> Response {
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

/// A README badge: the service's state as a flat SVG.
#[utoipa::path(
    get,
    path = "/badge/{file}",
    tag = "page",
    params(("file" = String, Path, description = "`<service>.svg`.")),
    responses(
        (status = 200, description = "The badge.", content_type = "image/svg+xml", body = String),
        (status = 404, description = "No such service (an SVG that says so), or not a `.svg` name (JSON).", content((String = "image/svg+xml"), (ErrorBody = "application/json"))),
    )
)]
pub(crate) async fn badge(
    State(state): State<AppState>,
    Path(file): Path<String>,
) -> Result<Response, ApiError> {
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
        return Err(ApiError::not_found(format!(
            "badges are at /badge/<service>.svg, not /badge/{file}"
        )));
    };
    Ok(
        match read_services(state, Some(name.to_string())).await?.first() {
            Some(s) => svg(StatusCode::OK, badge_svg(name, s.state.as_str())),
            None => svg(StatusCode::NOT_FOUND, badge_svg(name, "not found")),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use CheckState::*;

    #[test]
    fn service_state_from_checks_and_source() {
        let service_state = |c: &[CheckState], r, s| super::service_state(c, r, s).as_str();
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
