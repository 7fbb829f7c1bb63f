//! The agent's TOML configuration: parsing, defaults and validation.
//!
//! Every problem is reported with file:line:col, all at once, so one edit
//! fixes one round of mistakes. `identity` turns the services declared here
//! into service-table entries; `run` reads the `[agent]` table.

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    net::{IpAddr, SocketAddr},
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use toml::Spanned;

/// Where a config without a file (or without these keys) points.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9477";
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/netpulse";
pub const DEFAULT_PATH: &str = "/etc/netpulse/config.toml";
pub const DEFAULT_DOCKER_SOCKET: &str = "/var/run/docker.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/netpulse";
/// Largest CIDR a service endpoint may name: each address is one table entry.
pub const MAX_CIDR_ADDRESSES: u32 = 1024;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub agent: AgentConfig,
    #[serde(default)]
    pub docker: DockerConfig,
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceConfig>,
    #[serde(default, rename = "check")]
    pub checks: Vec<CheckConfig>,
    #[serde(default)]
    pub api: ApiConfig,
    #[serde(default, rename = "hook")]
    pub hooks: Vec<HookConfig>,
    #[serde(default)]
    pub web: WebConfig,
    #[serde(default)]
    pub capture: CaptureConfig,
}

/// `[web]`: TLS and basic auth on every endpoint, with the keys of
/// Prometheus exporter-toolkit's web-config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebConfig {
    pub tls_server_config: Option<TlsServerConfig>,
    /// User → bcrypt hash (`netpulse config hash-password`).
    pub basic_auth_users: BTreeMap<String, Spanned<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsServerConfig {
    pub cert_file: Spanned<PathBuf>,
    pub key_file: Spanned<PathBuf>,
    #[serde(default)]
    pub client_auth_type: Option<Spanned<String>>,
    #[serde(default)]
    pub client_ca_file: Option<Spanned<PathBuf>>,
    #[serde(default)]
    pub min_version: Option<Spanned<String>>,
}

/// `[capture]`: the capture folder (`<state_dir>/captures`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaptureConfig {
    /// All capture files together, at most (MB); the oldest go first.
    pub max_disk_mb: Spanned<f64>,
    /// One capture file, at most (MB); a capture past it starts a new part.
    pub file_mb: Spanned<f64>,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            max_disk_mb: Spanned::new(0..0, 512.0),
            file_mb: Spanned::new(0..0, 64.0),
        }
    }
}

impl CaptureConfig {
    /// Validated by `parse`.
    pub fn settings(&self) -> crate::capture::Settings {
        crate::capture::Settings {
            max_disk_bytes: (*self.max_disk_mb.get_ref() * 1e6) as u64,
            file_bytes: (*self.file_mb.get_ref() * 1e6) as u64,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Interfaces to attach to; empty = every interface that is up, `lo` included.
    pub interfaces: Vec<Spanned<String>>,
    /// Address of /metrics, /healthz and the API.
    pub listen: Spanned<String>,
    /// bpffs directory; maps are pinned in `<pin_dir>/v<layout>/`.
    pub pin_dir: PathBuf,
    /// Name services after the host's listening sockets.
    pub discover_sockets: bool,
    /// Seconds between refreshes of sockets and interfaces.
    pub refresh_seconds: Spanned<f64>,
    /// Seconds a service that disappeared stays in /metrics with its counts.
    pub retire_seconds: Spanned<f64>,
    /// Most per-service series /metrics serves; services beyond it are
    /// summed into `service="~other"`.
    pub max_series: Spanned<usize>,
    /// Where the store (check history, jobs) lives.
    pub state_dir: PathBuf,
    /// Days of check results kept.
    pub history_days: Spanned<f64>,
    /// What counts packets: `ebpf`, `pcap` (libpcap, no eBPF needed), or
    /// `auto`: eBPF, else pcap with the reason logged.
    pub backend: Spanned<String>,
}

/// `agent.backend` / `netpulse run --backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    Auto,
    Ebpf,
    Pcap,
}

impl AgentConfig {
    /// Validated by `parse`: finite and within bounds.
    pub fn refresh(&self) -> Duration {
        Duration::try_from_secs_f64(*self.refresh_seconds.get_ref())
            .unwrap_or(Duration::from_secs(1))
    }

    pub fn retire(&self) -> Duration {
        Duration::try_from_secs_f64(*self.retire_seconds.get_ref())
            .unwrap_or(Duration::from_secs(60))
    }

    pub fn history(&self) -> Duration {
        Duration::try_from_secs_f64(*self.history_days.get_ref() * 86400.0)
            .unwrap_or(Duration::from_secs(7 * 86400))
    }

    pub fn max_series(&self) -> usize {
        *self.max_series.get_ref()
    }

    /// Validated by `parse`.
    pub fn backend(&self) -> Backend {
        match self.backend.get_ref().as_str() {
            "ebpf" => Backend::Ebpf,
            "pcap" => Backend::Pcap,
            _ => Backend::Auto,
        }
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            interfaces: Vec::new(),
            listen: Spanned::new(0..0, DEFAULT_LISTEN.to_string()),
            pin_dir: PathBuf::from(DEFAULT_PIN_DIR),
            discover_sockets: true,
            refresh_seconds: Spanned::new(0..0, 1.0),
            retire_seconds: Spanned::new(0..0, 60.0),
            max_series: Spanned::new(0..0, 10_000),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            history_days: Spanned::new(0..0, 7.0),
            backend: Spanned::new(0..0, "auto".to_string()),
        }
    }
}

/// `[[check]]`: a health check. Keys beyond the common ones belong to one
/// kind (`body_contains` to http, `send` to tcp, ...); a key of another
/// kind is an error.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckConfig {
    pub name: Spanned<String>,
    /// http (http:// and https:// URLs), tcp, dns or icmp.
    pub kind: Spanned<String>,
    /// http: a URL; tcp: host:port; dns: the name to query; icmp: a host.
    pub target: Spanned<String>,
    #[serde(default)]
    pub service: Option<Spanned<String>>,
    #[serde(default)]
    pub interval_seconds: Option<Spanned<f64>>,
    #[serde(default)]
    pub timeout_seconds: Option<Spanned<f64>>,
    #[serde(default)]
    pub jitter_seconds: Option<Spanned<f64>>,
    #[serde(default)]
    pub retries: Option<Spanned<i64>>,
    #[serde(default)]
    pub retry_backoff_seconds: Option<Spanned<f64>>,
    #[serde(default)]
    pub failure_threshold: Option<Spanned<i64>>,
    #[serde(default)]
    pub success_threshold: Option<Spanned<i64>>,
    #[serde(default)]
    pub depends_on: Vec<Spanned<String>>,
    #[serde(default)]
    pub run_when_blocked: bool,
    #[serde(default)]
    pub tags: Vec<Spanned<String>>,
    #[serde(default)]
    pub actions: Vec<ActionConfig>,
    // http
    #[serde(default)]
    pub method: Option<Spanned<String>>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Status codes and ranges: `[200, 204]`, `["200-299", 301]`.
    #[serde(default)]
    pub expect_status: Vec<Spanned<toml::Value>>,
    #[serde(default)]
    pub body_contains: Option<Spanned<String>>,
    #[serde(default)]
    pub body_regex: Option<Spanned<String>>,
    #[serde(default)]
    pub max_latency_seconds: Option<Spanned<f64>>,
    #[serde(default)]
    pub max_redirects: Option<Spanned<i64>>,
    #[serde(default)]
    pub tls_ca_file: Option<Spanned<PathBuf>>,
    #[serde(default)]
    pub cert_min_valid_days: Option<Spanned<f64>>,
    // tcp
    #[serde(default)]
    pub send: Option<Spanned<String>>,
    /// tcp: a substring of the answer; dns: a substring of an answer record.
    #[serde(default)]
    pub expect: Option<Spanned<String>>,
    // dns
    #[serde(default)]
    pub query_type: Option<Spanned<String>>,
    /// An address (port 53) or address:port; absent: /etc/resolv.conf.
    #[serde(default)]
    pub server: Option<Spanned<String>>,
}

/// `actions = [{ kind = "webhook", url = "...", after = 3 }]` on a check.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionConfig {
    /// webhook, restart_container or capture.
    pub kind: Spanned<String>,
    #[serde(default)]
    pub url: Option<Spanned<String>>,
    #[serde(default)]
    pub container: Option<Spanned<String>>,
    /// Consecutive failed runs before it fires (default 1).
    #[serde(default)]
    pub after: Option<Spanned<i64>>,
    /// Least seconds between two firings (default 300).
    #[serde(default)]
    pub cooldown_seconds: Option<Spanned<f64>>,
    /// capture: seconds captured after the failure (default 10).
    #[serde(default)]
    pub seconds: Option<Spanned<f64>>,
    /// capture: a BPF filter (default: the check's service's endpoints).
    #[serde(default)]
    pub filter: Option<Spanned<String>>,
    /// capture: the interface (default: any).
    #[serde(default)]
    pub interface: Option<Spanned<String>>,
    /// capture: packets kept from before the failure (default 1000).
    #[serde(default)]
    pub ring_packets: Option<Spanned<i64>>,
    /// capture: seconds kept from before the failure (default 30).
    #[serde(default)]
    pub ring_seconds: Option<Spanned<f64>>,
}

/// `[api]`: who may start work through the API.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// The bearer token of the endpoints that start work; without one
    /// (here or in `token_file`) they are off.
    pub token: Option<Spanned<String>>,
    /// A file holding the token (first line), readable by the agent only.
    pub token_file: Option<Spanned<PathBuf>>,
}

/// `[[hook]]`: `POST /api/v1/hooks/<name>` runs these checks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookConfig {
    pub name: Spanned<String>,
    #[serde(default)]
    pub checks: Vec<Spanned<String>>,
    #[serde(default)]
    pub tags: Vec<Spanned<String>>,
}

/// A validated hook.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hook {
    pub checks: Vec<String>,
    pub tags: Vec<String>,
}

fn actions_from(
    c: &CheckConfig,
    at: &mut impl FnMut(Range<usize>, String),
) -> Vec<crate::checks::actions::Action> {
    use crate::checks::actions::{Action, Do};
    let mut out = Vec::new();
    for a in &c.actions {
        let kind = a.kind.get_ref().as_str();
        let what = match kind {
            "webhook" => match a
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
                    at(
                        u.span(),
                        format!("`{}` is not an http:// or https:// URL", u.get_ref()),
                    );
                    None
                }
                None => {
                    at(a.kind.span(), "a webhook action needs `url`".into());
                    None
                }
            },
            "restart_container" => match &a.container {
                Some(c) if !c.get_ref().is_empty() => Some(Do::RestartContainer {
                    container: c.get_ref().clone(),
                }),
                _ => {
                    at(
                        a.kind.span(),
                        "a restart_container action needs `container`".into(),
                    );
                    None
                }
            },
            "capture" => {
                let seconds = a.seconds.as_ref().map_or(10.0, |v| *v.get_ref());
                let ring_seconds = a.ring_seconds.as_ref().map_or(30.0, |v| *v.get_ref());
                let ring_packets = a.ring_packets.as_ref().map_or(1000, |v| *v.get_ref());
                let mut ok = true;
                for (what, v, x, hi) in [
                    ("seconds", &a.seconds, seconds, crate::capture::MAX_SECONDS),
                    ("ring_seconds", &a.ring_seconds, ring_seconds, 3600.0),
                ] {
                    if !(x.is_finite() && x > 0.0 && x <= hi) {
                        let span = v.as_ref().map_or(a.kind.span(), |v| v.span());
                        at(span, format!("{what} = {x} is out of range (0, {hi}]"));
                        ok = false;
                    }
                }
                if !(1..=100_000).contains(&ring_packets) {
                    let span = a.ring_packets.as_ref().map_or(a.kind.span(), |v| v.span());
                    at(
                        span,
                        format!("ring_packets = {ring_packets} is out of range 1-100000"),
                    );
                    ok = false;
                }
                let filter = a.filter.as_ref().map(|f| f.get_ref().clone());
                if let (Some(f), Some(span)) = (&filter, a.filter.as_ref().map(|f| f.span())) {
                    let compiles = pcap::Capture::dead(pcap::Linktype::ETHERNET)
                        .map_err(|e| e.to_string())
                        .and_then(|d| d.compile(f, true).map(|_| ()).map_err(|e| e.to_string()));
                    if let Err(e) = compiles {
                        at(span, format!("filter `{f}`: {e}"));
                        ok = false;
                    }
                }
                if filter.is_none() && c.service.is_none() {
                    at(
                        a.kind.span(),
                        "a capture action needs `filter`, or a `service` on its check".into(),
                    );
                    ok = false;
                }
                ok.then(|| {
                    Do::Capture(crate::capture::ring::Spec {
                        interface: a
                            .interface
                            .as_ref()
                            .map_or_else(|| "any".to_string(), |i| i.get_ref().clone()),
                        filter,
                        service: c.service.as_ref().map(|s| s.get_ref().clone()),
                        seconds,
                        ring_packets: ring_packets as usize,
                        ring_seconds,
                    })
                })
            }
            "exec" => {
                at(
                    a.kind.span(),
                    "there is no exec action: an agent with these capabilities running commands from its config would be a root shell by another name".into(),
                );
                None
            }
            other => {
                at(
                    a.kind.span(),
                    format!("action `{other}` is not one of webhook, restart_container, capture"),
                );
                None
            }
        };
        let after = match &a.after {
            None => 1,
            Some(v) if (1..=1000).contains(v.get_ref()) => *v.get_ref() as u32,
            Some(v) => {
                at(
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
                at(
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

/// Validates the `[[check]]` tables; problems go to `at`.
fn checks_from(
    raw: &[CheckConfig],
    text: &str,
    at: &mut impl FnMut(Range<usize>, String),
) -> Vec<crate::checks::Spec> {
    use crate::checks::{DnsSpec, HttpSpec, Kind, Spec, TcpSpec};
    let secs = |v: &Option<Spanned<f64>>,
                what: &str,
                default: f64,
                lo: f64,
                hi: f64,
                at: &mut dyn FnMut(Range<usize>, String)|
     -> Duration {
        let Some(v) = v else {
            return Duration::from_secs_f64(default);
        };
        let x = *v.get_ref();
        if !(x.is_finite() && (lo..=hi).contains(&x)) {
            at(v.span(), format!("{what} = {x} is out of range {lo}-{hi}"));
            return Duration::from_secs_f64(default);
        }
        Duration::from_secs_f64(x)
    };
    let count = |v: &Option<Spanned<i64>>,
                 what: &str,
                 default: u32,
                 lo: i64,
                 hi: i64,
                 at: &mut dyn FnMut(Range<usize>, String)|
     -> u32 {
        let Some(v) = v else { return default };
        let x = *v.get_ref();
        if !(lo..=hi).contains(&x) {
            at(v.span(), format!("{what} = {x} is out of range {lo}-{hi}"));
            return default;
        }
        x as u32
    };
    let mut names: BTreeMap<String, Range<usize>> = BTreeMap::new();
    for c in raw {
        let name = c.name.get_ref();
        if let Some(msg) = bad_name(name) {
            at(c.name.span(), msg.replace("service name", "check name"));
        } else if let Some(first) = names.get(name) {
            let (l, col) = line_col(text, first.start);
            at(
                c.name.span(),
                format!("duplicate check `{name}` (first defined at line {l}, column {col})"),
            );
        } else {
            names.insert(name.clone(), c.name.span());
        }
    }
    let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut out = Vec::new();
    for c in raw {
        let name = c.name.get_ref().clone();
        for d in &c.depends_on {
            if !names.contains_key(d.get_ref()) {
                at(
                    d.span(),
                    format!(
                        "check `{name}` depends on `{}`, which is not a check",
                        d.get_ref()
                    ),
                );
            }
        }
        deps.insert(
            name.clone(),
            c.depends_on.iter().map(|d| d.get_ref().clone()).collect(),
        );
        let kind_name = c.kind.get_ref().as_str();
        // Keys that belong to one kind only.
        let only: [(&str, bool, &[&str]); 12] = [
            ("method", c.method.is_some(), &["http"]),
            ("headers", !c.headers.is_empty(), &["http"]),
            ("expect_status", !c.expect_status.is_empty(), &["http"]),
            ("body_contains", c.body_contains.is_some(), &["http"]),
            ("body_regex", c.body_regex.is_some(), &["http"]),
            (
                "max_latency_seconds",
                c.max_latency_seconds.is_some(),
                &["http"],
            ),
            ("max_redirects", c.max_redirects.is_some(), &["http"]),
            ("tls_ca_file", c.tls_ca_file.is_some(), &["http"]),
            (
                "cert_min_valid_days",
                c.cert_min_valid_days.is_some(),
                &["http"],
            ),
            ("send", c.send.is_some(), &["tcp"]),
            ("expect", c.expect.is_some(), &["tcp", "dns"]),
            (
                "query_type",
                c.query_type.is_some() || c.server.is_some(),
                &["dns"],
            ),
        ];
        for (key, set, kinds) in only {
            if set && !kinds.contains(&kind_name) {
                at(
                    c.kind.span(),
                    format!(
                        "check `{name}`: `{key}` applies to kind {}, not {kind_name}",
                        kinds.join(" and ")
                    ),
                );
            }
        }
        let target = c.target.get_ref();
        let kind = match kind_name {
            "http" => {
                let url: Option<hyper::Uri> = match target.parse::<hyper::Uri>() {
                    Ok(u)
                        if matches!(u.scheme_str(), Some("http" | "https"))
                            && u.host().is_some() =>
                    {
                        Some(u)
                    }
                    _ => {
                        at(
                            c.target.span(),
                            format!("check `{name}`: `{target}` is not an http:// or https:// URL"),
                        );
                        None
                    }
                };
                let method = match &c.method {
                    None => Some(hyper::Method::GET),
                    Some(m) => match hyper::Method::from_bytes(m.get_ref().as_bytes()) {
                        Ok(m) => Some(m),
                        Err(_) => {
                            at(m.span(), format!("`{}` is not an HTTP method", m.get_ref()));
                            None
                        }
                    },
                };
                let mut expect_status = Vec::new();
                for v in &c.expect_status {
                    let range = match v.get_ref() {
                        toml::Value::Integer(i) => u16::try_from(*i).ok().map(|i| i..=i),
                        toml::Value::String(s) => s.split_once('-').and_then(|(a, b)| {
                            Some(a.trim().parse::<u16>().ok()?..=b.trim().parse::<u16>().ok()?)
                        }),
                        _ => None,
                    };
                    match range {
                        Some(r) if *r.start() >= 100 && *r.end() <= 599 && r.start() <= r.end() => {
                            expect_status.push(r)
                        }
                        _ => at(
                            v.span(),
                            "expect_status takes codes (200) and ranges (\"200-299\") within 100-599"
                                .to_string(),
                        ),
                    }
                }
                if expect_status.is_empty() {
                    expect_status.push(200..=299);
                }
                let body_regex = c.body_regex.as_ref().and_then(|r| {
                    regex::Regex::new(r.get_ref())
                        .map_err(|e| at(r.span(), format!("body_regex: {e}")))
                        .ok()
                });
                let ca_file = c.tls_ca_file.as_ref().map(|p| p.get_ref().clone());
                let tls = match crate::checks::kinds::tls_config(ca_file.as_deref()) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        let span = c.tls_ca_file.as_ref().map_or(c.kind.span(), |p| p.span());
                        at(span, format!("tls_ca_file: {e}"));
                        None
                    }
                };
                let max_latency = c.max_latency_seconds.as_ref().map(|_| {
                    secs(
                        &c.max_latency_seconds,
                        "max_latency_seconds",
                        1.0,
                        0.0,
                        3600.0,
                        at,
                    )
                });
                let cert_min_valid = c.cert_min_valid_days.as_ref().map(|_| {
                    secs(
                        &c.cert_min_valid_days,
                        "cert_min_valid_days",
                        0.0,
                        0.0,
                        3650.0,
                        at,
                    ) * 86400
                });
                match (url, method, tls) {
                    (Some(url), Some(method), Some(tls)) => Some(Kind::Http(HttpSpec {
                        url,
                        method,
                        headers: c.headers.clone(),
                        expect_status,
                        body_contains: c.body_contains.as_ref().map(|s| s.get_ref().clone()),
                        body_regex,
                        max_latency,
                        max_redirects: count(&c.max_redirects, "max_redirects", 5, 0, 20, at),
                        cert_min_valid,
                        tls,
                        ca_file,
                    })),
                    _ => None,
                }
            }
            "tcp" => match target
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
            {
                Some((host, port)) if !host.is_empty() && port != 0 => Some(Kind::Tcp(TcpSpec {
                    host: host
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_string(),
                    port,
                    send: c.send.as_ref().map(|s| s.get_ref().clone()),
                    expect: c.expect.as_ref().map(|s| s.get_ref().clone()),
                })),
                _ => {
                    at(
                        c.target.span(),
                        format!("check `{name}`: `{target}` is not host:port"),
                    );
                    None
                }
            },
            "dns" => {
                let record_type = match &c.query_type {
                    None => Some(hickory_proto::rr::RecordType::A),
                    Some(q) => match q.get_ref().to_ascii_uppercase().parse() {
                        Ok(t) => Some(t),
                        Err(_) => {
                            at(
                                q.span(),
                                format!("`{}` is not a DNS record type", q.get_ref()),
                            );
                            None
                        }
                    },
                };
                let server =
                    match &c.server {
                        None => Some(None),
                        Some(s) => {
                            let v = s.get_ref();
                            match v.parse::<SocketAddr>().ok().or_else(|| {
                                v.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53))
                            }) {
                                Some(a) => Some(Some(a)),
                                None => {
                                    at(
                                        s.span(),
                                        format!("server `{v}` is not an address or address:port"),
                                    );
                                    None
                                }
                            }
                        }
                    };
                if hickory_proto::rr::Name::from_ascii(target).is_err() || target.is_empty() {
                    at(
                        c.target.span(),
                        format!("check `{name}`: `{target}` is not a DNS name"),
                    );
                }
                match (record_type, server) {
                    (Some(record_type), Some(server)) => Some(Kind::Dns(DnsSpec {
                        name: target.clone(),
                        record_type,
                        server,
                        expect: c.expect.as_ref().map(|s| s.get_ref().clone()),
                    })),
                    _ => None,
                }
            }
            "icmp" => {
                if target.is_empty() {
                    at(c.target.span(), format!("check `{name}`: an empty host"));
                }
                Some(Kind::Icmp {
                    host: target.clone(),
                })
            }
            other => {
                at(
                    c.kind.span(),
                    format!("check `{name}`: kind `{other}` is not one of http, tcp, dns, icmp"),
                );
                None
            }
        };
        let interval = secs(
            &c.interval_seconds,
            "interval_seconds",
            30.0,
            0.05,
            86400.0,
            at,
        );
        let timeout = secs(
            &c.timeout_seconds,
            "timeout_seconds",
            10.0_f64.min(interval.as_secs_f64()),
            0.01,
            3600.0,
            at,
        );
        if timeout > interval {
            let span = c
                .timeout_seconds
                .as_ref()
                .map_or(c.name.span(), |t| t.span());
            at(
                span,
                format!(
                    "check `{name}`: timeout_seconds {} exceeds interval_seconds {}",
                    timeout.as_secs_f64(),
                    interval.as_secs_f64()
                ),
            );
        }
        if let Some(kind) = kind {
            out.push(Spec {
                name,
                kind,
                service: c.service.as_ref().map(|s| s.get_ref().clone()),
                interval,
                timeout,
                jitter: secs(
                    &c.jitter_seconds,
                    "jitter_seconds",
                    interval.as_secs_f64().min(86400.0) / 10.0,
                    0.0,
                    86400.0,
                    at,
                ),
                retries: count(&c.retries, "retries", 0, 0, 10, at),
                retry_backoff: secs(
                    &c.retry_backoff_seconds,
                    "retry_backoff_seconds",
                    1.0,
                    0.0,
                    600.0,
                    at,
                ),
                failure_threshold: count(&c.failure_threshold, "failure_threshold", 1, 1, 100, at),
                success_threshold: count(&c.success_threshold, "success_threshold", 1, 1, 100, at),
                depends_on: c.depends_on.iter().map(|d| d.get_ref().clone()).collect(),
                run_when_blocked: c.run_when_blocked,
                tags: c.tags.iter().map(|t| t.get_ref().clone()).collect(),
                actions: actions_from(c, at),
            });
        }
    }
    if let Some(cycle) = crate::checks::find_cycle(&deps)
        && let Some(first) = raw.iter().find(|c| c.name.get_ref() == &cycle[0])
    {
        at(
            first.name.span(),
            format!(
                "checks depend on each other in a cycle: {}",
                cycle.join(" -> ")
            ),
        );
    }
    out
}

/// `[docker]`: naming traffic after Docker containers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DockerConfig {
    /// Watch dockerd. Harmless where there is none: the source reports
    /// itself down and retries with backoff.
    pub enabled: bool,
    /// The Engine API socket.
    pub socket: PathBuf,
    /// Container labels exported on `netpulse_service_info` as
    /// `label_<name>` (dots and dashes become underscores). Only these:
    /// labels can hold anything, and environment variables are never read.
    pub labels: Vec<Spanned<String>>,
}

impl Default for DockerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            socket: PathBuf::from(DEFAULT_DOCKER_SOCKET),
            labels: Vec::new(),
        }
    }
}

/// `label_<name>` for a container label: a valid, distinct Prometheus
/// label name.
pub fn label_metric_name(label: &str) -> String {
    let mut s = String::from("label_");
    s.extend(
        label
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }),
    );
    s
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub name: Spanned<String>,
    /// A peer this host talks to (a database, an upstream), matched by the
    /// packet's other end, instead of a service on this host.
    #[serde(default)]
    pub remote: bool,
    pub endpoints: Vec<EndpointConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    pub proto: Spanned<String>,
    /// An address or CIDR; absent = any address (both families).
    #[serde(default)]
    pub addr: Option<Spanned<String>>,
    /// Required for tcp/udp, absent for icmp.
    #[serde(default)]
    pub port: Option<Spanned<i64>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
}

/// A validated endpoint matcher: one address (None = wildcard) or a CIDR
/// expanded to its addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub proto: Proto,
    pub addrs: Vec<IpAddr>,
    pub wildcard: bool,
    pub port: u16,
}

#[derive(Debug, Clone)]
pub struct Service {
    pub name: String,
    pub remote: bool,
    pub endpoints: Vec<Endpoint>,
}

/// One problem in one place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: usize,
    pub col: usize,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", render(.path, .problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

fn render(path: &Path, problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("{}:{}:{}: {}", path.display(), p.line, p.col, p.message))
        .collect::<Vec<_>>()
        .join("\n")
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(before.chars().count(), |nl| {
        before[nl + 1..].chars().count()
    }) + 1;
    (line, col)
}

/// A config that parsed and validated.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub raw: Config,
    pub services: Vec<Service>,
    pub checks: Vec<crate::checks::Spec>,
    pub hooks: BTreeMap<String, Hook>,
    /// The API's bearer token, from `api.token` or `api.token_file`.
    pub api_token: Option<String>,
    /// `[web.tls_server_config]`, validated (its files loaded once).
    pub tls: Option<crate::websec::TlsSettings>,
    /// `[web.basic_auth_users]`: user → bcrypt hash.
    pub basic_auth_users: BTreeMap<String, String>,
    pub listen: SocketAddr,
    pub source: Option<PathBuf>,
}

impl Loaded {
    pub fn agent(&self) -> &AgentConfig {
        &self.raw.agent
    }
}

/// Reads and validates `path`; `None` runs the embedded defaults.
pub fn load(path: Option<&Path>) -> Result<Loaded, ConfigError> {
    match path {
        None => parse("", Path::new("<default>")).map(|mut l| {
            l.source = None;
            l
        }),
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.to_path_buf(),
                source,
            })?;
            parse(&text, p)
        }
    }
}

pub fn parse(text: &str, path: &Path) -> Result<Loaded, ConfigError> {
    let invalid = |problems| ConfigError::Invalid {
        path: path.to_path_buf(),
        problems,
    };
    let raw: Config = toml::from_str(text).map_err(|e| {
        let (line, col) = e.span().map_or((1, 1), |s| line_col(text, s.start));
        invalid(vec![Problem {
            line,
            col,
            message: e.message().trim().to_string(),
        }])
    })?;
    let mut problems = Vec::new();
    let mut at = |span: Range<usize>, message: String| {
        let (line, col) = line_col(text, span.start);
        problems.push(Problem { line, col, message });
    };

    let listen = match raw.agent.listen.get_ref().parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            at(
                raw.agent.listen.span(),
                format!(
                    "listen: `{}` is not an address:port such as {DEFAULT_LISTEN}",
                    raw.agent.listen.get_ref()
                ),
            );
            None
        }
    };
    let a = &raw.agent;
    for (what, v, lo, hi) in [
        ("refresh_seconds", &a.refresh_seconds, 0.05, 3600.0),
        ("retire_seconds", &a.retire_seconds, 0.0, 7.0 * 86400.0),
        ("history_days", &a.history_days, 0.0, 3650.0),
    ] {
        let x = *v.get_ref();
        if !(x.is_finite() && (lo..=hi).contains(&x)) {
            at(v.span(), format!("{what} = {x} is out of range {lo}-{hi}"));
        }
    }
    let min_series = 2 * crate::metrics::SERIES_PER_SERVICE;
    if !(min_series..=10_000_000).contains(a.max_series.get_ref()) {
        at(
            a.max_series.span(),
            format!(
                "max_series = {} is out of range {min_series}-10000000 (at least two services' series)",
                a.max_series.get_ref()
            ),
        );
    }
    for (what, v) in [
        ("max_disk_mb", &raw.capture.max_disk_mb),
        ("file_mb", &raw.capture.file_mb),
    ] {
        let x = *v.get_ref();
        if !(x.is_finite() && (0.01..=1e7).contains(&x)) {
            at(
                v.span(),
                format!("capture.{what} = {x} is out of range 0.01-10000000"),
            );
        }
    }
    if !matches!(a.backend.get_ref().as_str(), "auto" | "ebpf" | "pcap") {
        at(
            a.backend.span(),
            format!(
                "backend `{}` is not one of auto, ebpf, pcap",
                a.backend.get_ref()
            ),
        );
    }
    let mut seen_if = HashSet::new();
    for i in &raw.agent.interfaces {
        let name = i.get_ref();
        if name.is_empty() || name.len() > 15 || name.contains(['/', ' ']) {
            at(i.span(), format!("`{name}` is not a valid interface name"));
        } else if !seen_if.insert(name.clone()) {
            at(i.span(), format!("interface `{name}` is listed twice"));
        }
    }

    let mut seen_label: BTreeMap<String, String> = BTreeMap::new();
    for l in &raw.docker.labels {
        let name = l.get_ref();
        let metric = label_metric_name(name);
        if name.is_empty() {
            at(l.span(), "an empty label name".to_string());
        } else if let Some(other) = seen_label.insert(metric.clone(), name.clone()) {
            at(
                l.span(),
                format!("label `{name}` would be exported as `{metric}`, like `{other}`"),
            );
        }
    }

    let mut names: BTreeMap<String, Range<usize>> = BTreeMap::new();
    let mut claimed: BTreeMap<(bool, Proto, Option<IpAddr>, u16), String> = BTreeMap::new();
    let mut services = Vec::new();
    for s in &raw.services {
        let name = s.name.get_ref();
        if let Some(msg) = bad_name(name) {
            at(s.name.span(), msg);
        } else if let Some(first) = names.get(name) {
            let (l, c) = line_col(text, first.start);
            at(
                s.name.span(),
                format!("duplicate service `{name}` (first defined at line {l}, column {c})"),
            );
        } else {
            names.insert(name.clone(), s.name.span());
        }
        if s.endpoints.is_empty() {
            at(s.name.span(), format!("service `{name}` has no endpoints"));
        }
        let mut endpoints = Vec::new();
        for e in &s.endpoints {
            match endpoint(e) {
                Ok(ep) => {
                    let addrs: Vec<Option<IpAddr>> = if ep.wildcard {
                        vec![None]
                    } else {
                        ep.addrs.iter().copied().map(Some).collect()
                    };
                    for a in addrs {
                        let key = (s.remote, ep.proto, a, ep.port);
                        if let Some(other) = claimed.get(&key) {
                            if other != name {
                                at(
                                    e.proto.span(),
                                    format!(
                                        "endpoint {} is already claimed by service `{other}`",
                                        describe(&ep, a)
                                    ),
                                );
                                break;
                            }
                        } else {
                            claimed.insert(key, name.clone());
                        }
                    }
                    endpoints.push(ep);
                }
                Err((span, msg)) => at(span, msg),
            }
        }
        services.push(Service {
            name: name.clone(),
            remote: s.remote,
            endpoints,
        });
    }
    // Each address is one entry of a kernel table (a wildcard, two).
    let entries: usize = services
        .iter()
        .flat_map(|s| &s.endpoints)
        .map(|e| if e.wildcard { 2 } else { e.addrs.len() })
        .sum();
    let checks = checks_from(&raw.checks, text, &mut at);
    let mut hooks = BTreeMap::new();
    for h in &raw.hooks {
        let name = h.name.get_ref();
        if let Some(msg) = bad_name(name) {
            at(h.name.span(), msg.replace("service name", "hook name"));
        }
        for c in &h.checks {
            if !raw.checks.iter().any(|k| k.name.get_ref() == c.get_ref()) {
                at(
                    c.span(),
                    format!(
                        "hook `{name}` names `{}`, which is not a check",
                        c.get_ref()
                    ),
                );
            }
        }
        for t in &h.tags {
            if !raw
                .checks
                .iter()
                .any(|k| k.tags.iter().any(|x| x.get_ref() == t.get_ref()))
            {
                at(
                    t.span(),
                    format!(
                        "hook `{name}` names tag `{}`, which no check has",
                        t.get_ref()
                    ),
                );
            }
        }
        if h.checks.is_empty() && h.tags.is_empty() {
            at(
                h.name.span(),
                format!("hook `{name}` names no checks and no tags"),
            );
        }
        if hooks
            .insert(
                name.clone(),
                Hook {
                    checks: h.checks.iter().map(|c| c.get_ref().clone()).collect(),
                    tags: h.tags.iter().map(|t| t.get_ref().clone()).collect(),
                },
            )
            .is_some()
        {
            at(h.name.span(), format!("duplicate hook `{name}`"));
        }
    }
    let api_token = match (&raw.api.token, &raw.api.token_file) {
        (Some(t), Some(_)) => {
            at(t.span(), "set api.token or api.token_file, not both".into());
            None
        }
        (Some(t), None) if t.get_ref().len() < 16 => {
            at(t.span(), "api.token is shorter than 16 characters".into());
            None
        }
        (Some(t), None) => Some(t.get_ref().clone()),
        (None, Some(f)) => match std::fs::read_to_string(f.get_ref()) {
            Ok(text) => match text.lines().next().map(str::trim) {
                Some(t) if t.len() >= 16 => Some(t.to_string()),
                _ => {
                    at(
                        f.span(),
                        format!(
                            "{}: the token's first line is shorter than 16 characters",
                            f.get_ref().display()
                        ),
                    );
                    None
                }
            },
            Err(e) => {
                at(
                    f.span(),
                    format!("api.token_file {}: {e}", f.get_ref().display()),
                );
                None
            }
        },
        (None, None) => None,
    };
    let tls = raw.web.tls_server_config.as_ref().and_then(|t| {
        let kind = t
            .client_auth_type
            .as_ref()
            .map_or("NoClientCert", |k| k.get_ref().as_str());
        if let Some(k) = &t.client_auth_type
            && !crate::websec::CLIENT_AUTH_TYPES.contains(&k.get_ref().as_str())
        {
            at(
                k.span(),
                format!(
                    "client_auth_type `{}` is not one of {}",
                    k.get_ref(),
                    crate::websec::CLIENT_AUTH_TYPES.join(", ")
                ),
            );
            return None;
        }
        if kind != "NoClientCert" && t.client_ca_file.is_none() {
            let span = t.client_auth_type.as_ref().map_or(0..0, |k| k.span());
            at(
                span,
                format!("client_auth_type {kind} needs client_ca_file"),
            );
            return None;
        }
        let min = t
            .min_version
            .as_ref()
            .map_or("TLS12", |v| v.get_ref().as_str());
        if !["TLS12", "TLS13"].contains(&min) {
            let span = t.min_version.as_ref().map_or(0..0, |v| v.span());
            at(span, format!("min_version `{min}` is not TLS12 or TLS13"));
            return None;
        }
        let settings = crate::websec::TlsSettings {
            cert_file: t.cert_file.get_ref().clone(),
            key_file: t.key_file.get_ref().clone(),
            client_auth_type: kind.to_string(),
            client_ca_file: t.client_ca_file.as_ref().map(|f| f.get_ref().clone()),
            min_version: min.to_string(),
        };
        // Load it once now, so a bad file is a config error with a place.
        match crate::websec::server_config(&settings) {
            Ok(_) => Some(settings),
            Err(e) => {
                let file = |f: &Spanned<PathBuf>| e.contains(&f.get_ref().display().to_string());
                let span = if file(&t.key_file) && !file(&t.cert_file) {
                    t.key_file.span()
                } else if t.client_ca_file.as_ref().is_some_and(file) {
                    t.client_ca_file.as_ref().map_or(0..0, |f| f.span())
                } else {
                    t.cert_file.span()
                };
                at(span, format!("web.tls_server_config: {e}"));
                None
            }
        }
    });
    let mut basic_auth_users = BTreeMap::new();
    for (user, hash) in &raw.web.basic_auth_users {
        if crate::websec::valid_hash(hash.get_ref()) {
            basic_auth_users.insert(user.clone(), hash.get_ref().clone());
        } else {
            at(
                hash.span(),
                format!(
                    "basic_auth_users.{user}: not a bcrypt hash (make one with `netpulse config hash-password`)"
                ),
            );
        }
    }
    let max = agent_ebpf::MAX_ENDPOINTS as usize / 2;
    if entries > max {
        at(
            0..0,
            format!(
                "the services name {entries} endpoint addresses; at most {max} fit the kernel tables"
            ),
        );
    }
    if !problems.is_empty() {
        // In file order, as an editor would walk them.
        problems.sort_by_key(|p| (p.line, p.col));
        return Err(invalid(problems));
    }
    let listen = listen.ok_or_else(|| invalid(Vec::new()))?;
    Ok(Loaded {
        raw,
        services,
        checks,
        hooks,
        api_token,
        tls,
        basic_auth_users,
        listen,
        source: Some(path.to_path_buf()),
    })
}

fn describe(ep: &Endpoint, addr: Option<IpAddr>) -> String {
    let proto = match ep.proto {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
        Proto::Icmp => "icmp",
    };
    match (addr, ep.proto) {
        (None, Proto::Icmp) => format!("{proto}/*"),
        (Some(a), Proto::Icmp) => format!("{proto}/{a}"),
        (None, _) => format!("{proto}/*:{}", ep.port),
        (Some(a), _) => format!("{proto}/{}", SocketAddr::new(a, ep.port)),
    }
}

/// Service names become label values and pinned slot names.
pub fn bad_name(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("service name is empty".into());
    }
    if name.len() >= agent_ebpf::NAME_LEN {
        return Some(format!(
            "service name `{name}` is longer than {} bytes",
            agent_ebpf::NAME_LEN - 1
        ));
    }
    if name.starts_with('~') {
        return Some(format!(
            "service name `{name}`: names starting with `~` are reserved"
        ));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/'))
    {
        return Some(format!(
            "service name `{name}` may only contain letters, digits and - _ . : /"
        ));
    }
    None
}

fn endpoint(e: &EndpointConfig) -> Result<Endpoint, (Range<usize>, String)> {
    let proto = match e.proto.get_ref().as_str() {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        "icmp" => Proto::Icmp,
        other => {
            return Err((
                e.proto.span(),
                format!("unknown proto `{other}` (expected tcp, udp or icmp)"),
            ));
        }
    };
    let port = match (proto, &e.port) {
        (Proto::Icmp, None) => 0,
        (Proto::Icmp, Some(p)) => {
            return Err((p.span(), "icmp endpoints take no port".into()));
        }
        (_, None) => {
            return Err((e.proto.span(), "tcp and udp endpoints need a port".into()));
        }
        (_, Some(p)) => match u16::try_from(*p.get_ref()) {
            Ok(v) if v > 0 => v,
            _ => {
                return Err((
                    p.span(),
                    format!("port {} is out of range 1-65535", p.get_ref()),
                ));
            }
        },
    };
    let (addrs, wildcard) = match &e.addr {
        None => (Vec::new(), true),
        Some(a) => (expand(a.get_ref()).map_err(|m| (a.span(), m))?, false),
    };
    Ok(Endpoint {
        proto,
        addrs,
        wildcard,
        port,
    })
}

/// An address, or a CIDR expanded into its addresses (at most
/// [`MAX_CIDR_ADDRESSES`]). Host bits set in a CIDR are an error: they are
/// almost always a typo for a different network.
pub fn expand(s: &str) -> Result<Vec<IpAddr>, String> {
    let addrs = expand_raw(s)?;
    // "Any address" is said by leaving `addr` out; an unspecified address
    // here would silently become the wildcard.
    if addrs.iter().any(IpAddr::is_unspecified) {
        return Err(format!(
            "`{s}` is or contains the unspecified address; leave `addr` out to match any address"
        ));
    }
    // An IPv4-mapped IPv6 address is the IPv4 address on the wire.
    Ok(addrs.into_iter().map(|a| a.to_canonical()).collect())
}

fn expand_raw(s: &str) -> Result<Vec<IpAddr>, String> {
    let Some((addr, len)) = s.split_once('/') else {
        return s
            .parse::<IpAddr>()
            .map(|a| vec![a])
            .map_err(|_| format!("`{s}` is not an IP address or CIDR"));
    };
    let bad = || format!("`{s}` is not a valid CIDR");
    let ip: IpAddr = addr.parse().map_err(|_| bad())?;
    let len: u32 = len.parse().map_err(|_| bad())?;
    let bits = if ip.is_ipv4() { 32 } else { 128 };
    if len > bits {
        return Err(bad());
    }
    let host_bits = bits - len;
    if host_bits > MAX_CIDR_ADDRESSES.ilog2() {
        return Err(format!(
            "CIDR `{s}` covers more than {MAX_CIDR_ADDRESSES} addresses; name a smaller range"
        ));
    }
    let n = 1u128 << host_bits;
    let base: u128 = match ip {
        IpAddr::V4(v) => u32::from(v).into(),
        IpAddr::V6(v) => u128::from(v),
    };
    if base & (n - 1) != 0 {
        return Err(format!("CIDR `{s}` has host bits set"));
    }
    Ok((0..n)
        .map(|i| match ip {
            IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::from((base + i) as u32)),
            IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::from(base + i)),
        })
        .collect())
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errs(text: &str) -> Vec<String> {
        match parse(text, Path::new("c.toml")) {
            Ok(_) => Vec::new(),
            Err(e) => e.to_string().lines().map(str::to_string).collect(),
        }
    }

    #[test]
    fn empty_config_is_the_documented_default() {
        let l = parse("", Path::new("c.toml")).unwrap();
        assert_eq!(l.listen, DEFAULT_LISTEN.parse().unwrap());
        assert!(l.agent().interfaces.is_empty());
        assert!(l.agent().discover_sockets);
        assert_eq!(l.agent().pin_dir, PathBuf::from(DEFAULT_PIN_DIR));
    }

    #[test]
    fn checks_parse_with_defaults() {
        let l = parse(
            r#"
[[check]]
name = "web"
kind = "http"
target = "https://example.invalid:8443/healthz"
expect_status = [200, "300-399"]
body_contains = "ok"
[[check]]
name = "db"
kind = "tcp"
target = "[::1]:5432"
interval_seconds = 5
[[check]]
name = "dns"
kind = "dns"
target = "example.invalid"
query_type = "aaaa"
server = "127.0.0.1:5353"
depends_on = ["db"]
"#,
            Path::new("c.toml"),
        )
        .unwrap();
        assert_eq!(l.checks.len(), 3);
        let web = &l.checks[0];
        assert_eq!(web.interval, Duration::from_secs(30));
        assert_eq!(web.timeout, Duration::from_secs(10));
        match &web.kind {
            crate::checks::Kind::Http(h) => {
                assert_eq!(h.expect_status, vec![200..=200, 300..=399]);
                assert_eq!(h.max_redirects, 5);
            }
            k => panic!("{k:?}"),
        }
        let db = &l.checks[1];
        assert_eq!(
            db.timeout,
            Duration::from_secs(5),
            "timeout defaults to at most the interval"
        );
        assert_eq!(db.target(), "::1:5432");
        assert_eq!(l.checks[2].depends_on, ["db"]);
    }

    #[test]
    fn check_mistakes_are_named_with_their_place() {
        let e = errs(
            r#"
[[check]]
name = "a"
kind = "http"
target = "ftp://x/"
send = "PING"
[[check]]
name = "b"
kind = "tcp"
target = "nohost"
depends_on = ["nope"]
[[check]]
name = "c"
kind = "smtp"
target = "x"
"#,
        );
        assert_eq!(e.len(), 5, "{e:?}");
        assert!(
            e.iter()
                .any(|l| l.starts_with("c.toml:5:10:")
                    && l.contains("not an http:// or https:// URL")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|l| l.starts_with("c.toml:4:8:") && l.contains("`send` applies to kind tcp")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|l| l.starts_with("c.toml:10:10:") && l.contains("not host:port")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|l| l.starts_with("c.toml:11:15:") && l.contains("depends on `nope`")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|l| l.starts_with("c.toml:14:8:") && l.contains("kind `smtp`")),
            "{e:?}"
        );
    }

    #[test]
    fn a_dependency_cycle_is_refused_and_named() {
        let e = errs(
            r#"
[[check]]
name = "a"
kind = "tcp"
target = "h:1"
depends_on = ["b"]
[[check]]
name = "b"
kind = "tcp"
target = "h:2"
depends_on = ["a"]
"#,
        );
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("c.toml:3:8:"), "{e:?}");
        assert!(e[0].contains("cycle: a -> b -> a"), "{e:?}");
    }

    #[test]
    fn hooks_actions_and_the_token_are_checked() {
        let e = errs(
            r#"
[api]
token = "short"
[[check]]
name = "a"
kind = "tcp"
target = "h:1"
actions = [{ kind = "exec" }, { kind = "webhook", url = "ftp://x" }, { kind = "restart_container", container = "c", after = 0 }]
[[hook]]
name = "deploy"
checks = ["a", "b"]
"#,
        );
        assert_eq!(e.len(), 5, "{e:?}");
        assert!(e[0].contains("api.token is shorter than 16"), "{e:?}");
        assert!(
            e.iter().any(|l| l.contains("there is no exec action")),
            "{e:?}"
        );
        assert!(
            e.iter().any(|l| l.contains("`ftp://x` is not an http")),
            "{e:?}"
        );
        assert!(
            e.iter().any(|l| l.contains("after = 0 is out of range")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|l| l.contains("hook `deploy` names `b`, which is not a check")),
            "{e:?}"
        );
    }

    #[test]
    fn docker_defaults_and_label_names() {
        let l = parse("", Path::new("c.toml")).unwrap();
        assert!(l.raw.docker.enabled);
        assert_eq!(l.raw.docker.socket, PathBuf::from(DEFAULT_DOCKER_SOCKET));
        assert_eq!(
            label_metric_name("com.example.team-name"),
            "label_com_example_team_name"
        );
        // Two labels that would export under one name are refused.
        let e = errs("[docker]\nlabels = [\"team.name\", \"team-name\"]\n");
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("c.toml:2:24:"), "{e:?}");
        assert!(e[0].contains("label_team_name"), "{e:?}");
    }

    #[test]
    fn shipped_example_parses() {
        let text = include_str!("../../systemd/config.toml");
        let l = parse(text, Path::new("systemd/config.toml")).unwrap();
        assert_eq!(l.listen, DEFAULT_LISTEN.parse().unwrap());
    }

    #[test]
    fn unknown_key_names_line_and_column() {
        let e = errs("[agent]\nlisten = \"127.0.0.1:1\"\nbogus = 1\n");
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("c.toml:3:1:"), "{e:?}");
        assert!(e[0].contains("bogus"), "{e:?}");
    }

    #[test]
    fn bad_port_cidr_and_duplicate_are_all_reported() {
        let text = r#"
[[service]]
name = "a"
endpoints = [{ proto = "tcp", port = 70000 }]

[[service]]
name = "b"
endpoints = [{ proto = "udp", port = 53, addr = "10.0.0.0/33" }]

[[service]]
name = "a"
endpoints = [{ proto = "tcp", port = 80 }]
"#;
        let e = errs(text);
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(
            e[0].starts_with("c.toml:4:38:") && e[0].contains("70000"),
            "{e:?}"
        );
        assert!(
            e[1].starts_with("c.toml:8:49:") && e[1].contains("CIDR"),
            "{e:?}"
        );
        assert!(
            e[2].starts_with("c.toml:11:8:") && e[2].contains("duplicate service `a`"),
            "{e:?}"
        );
    }

    #[test]
    fn same_endpoint_in_two_services_is_an_error() {
        let text = r#"
[[service]]
name = "a"
endpoints = [{ proto = "tcp", port = 80 }]
[[service]]
name = "b"
endpoints = [{ proto = "tcp", port = 80 }]
"#;
        let e = errs(text);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].contains("already claimed by service `a`"), "{e:?}");
    }

    #[test]
    fn cidr_expands_and_rejects_host_bits_and_huge_ranges() {
        assert_eq!(expand("10.0.0.0/30").unwrap().len(), 4);
        assert_eq!(expand("fd00::/126").unwrap().len(), 4);
        assert!(expand("10.0.0.1/30").unwrap_err().contains("host bits"));
        assert!(expand("10.0.0.0/8").unwrap_err().contains("more than"));
        assert!(expand("10.0.0.0/x").is_err());
        assert!(expand("nonsense").is_err());
    }

    #[test]
    fn aliases_of_one_address_are_one_endpoint() {
        let e = errs(
            "[[service]]\nname=\"a\"\nendpoints=[{proto=\"tcp\",port=1,addr=\"10.0.0.1\"}]\n[[service]]\nname=\"b\"\nendpoints=[{proto=\"tcp\",port=1,addr=\"::ffff:10.0.0.1\"}]\n",
        );
        assert!(
            e.len() == 1 && e[0].contains("already claimed by service `a`"),
            "{e:?}"
        );
        for any in ["0.0.0.0", "::", "0.0.0.0/30"] {
            let e = errs(&format!(
                "[[service]]\nname=\"a\"\nendpoints=[{{proto=\"tcp\",port=1,addr=\"{any}\"}}]\n"
            ));
            assert!(e.len() == 1 && e[0].contains("unspecified"), "{any}: {e:?}");
        }
    }

    #[test]
    fn icmp_takes_no_port_and_tcp_needs_one() {
        assert!(
            errs("[[service]]\nname=\"p\"\nendpoints=[{proto=\"icmp\",port=1}]")[0]
                .contains("no port")
        );
        assert!(
            errs("[[service]]\nname=\"p\"\nendpoints=[{proto=\"tcp\"}]")[0].contains("need a port")
        );
        assert!(
            errs("[[service]]\nname=\"p\"\nendpoints=[{proto=\"sctp\",port=1}]")[0]
                .contains("unknown proto")
        );
    }

    /// The fuzz seeds (and any crash input kept as a regression) parse to
    /// Ok or to located errors, without panicking.
    #[test]
    fn fuzz_corpus_replays() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/config");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let bytes = std::fs::read(e.path()).unwrap();
            if let Ok(text) = std::str::from_utf8(&bytes) {
                let _ = parse(text, &e.path());
                n += 1;
            }
        }
        assert!(n >= 3, "seed corpus missing in {}", dir.display());
    }

    #[test]
    fn out_of_range_durations_and_budget_are_located() {
        let e = errs("[agent]\nrefresh_seconds = 1e-10\nretire_seconds = inf\nmax_series = 3\n");
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(
            e[0].starts_with("c.toml:2:19:") && e[0].contains("refresh_seconds"),
            "{e:?}"
        );
        assert!(
            e[1].starts_with("c.toml:3:18:") && e[1].contains("retire_seconds"),
            "{e:?}"
        );
        assert!(
            e[2].starts_with("c.toml:4:14:") && e[2].contains("max_series"),
            "{e:?}"
        );
    }

    #[test]
    fn bad_listen_and_names() {
        assert!(errs("[agent]\nlisten = \"nope\"")[0].starts_with("c.toml:2:10:"));
        assert!(
            errs("[[service]]\nname=\"~x\"\nendpoints=[{proto=\"tcp\",port=1}]")[0]
                .contains("reserved")
        );
    }
}
