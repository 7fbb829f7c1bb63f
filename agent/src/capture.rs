//! Captures on demand: `POST /api/v1/captures` queues a `capture` job
//! (an interface, a BPF filter or a service, limits in seconds, packets and
//! bytes); the job writes pcapng files under `<state_dir>/captures/`,
//! `<job id>-<part>.pcapng`, a new part past `capture.file_mb`, the oldest
//! files deleted to keep the folder under `capture.max_disk_mb`.
//! `GET /api/v1/captures` lists them, `GET /api/v1/captures/{id}/file`
//! serves one (token required; the path is built from numbers only). The
//! `netpulse capture` CLI talks to those endpoints.

use std::{
    collections::BTreeMap,
    io::{BufWriter, Write},
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use axum::{
    Json, Router,
    body::Body,
    extract::{Path as UrlPath, Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::{info, warn};

use crate::{
    store::Job,
    web::{Shared, lock},
};

pub mod ring;

/// Disk limits of the capture folder (`[capture]` in the config).
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// All capture files together, at most.
    pub max_disk_bytes: u64,
    /// One file, at most: a capture past it goes on in a new part.
    pub file_bytes: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_disk_bytes: 512 << 20,
            file_bytes: 64 << 20,
        }
    }
}

impl Settings {
    /// `[capture]`, validated by `config::validate`.
    pub fn from_config(c: &crate::config::CaptureConfig) -> Self {
        Settings {
            max_disk_bytes: c.max_disk_bytes(),
            file_bytes: c.file_bytes(),
        }
    }
}

/// Longest capture.
pub const MAX_SECONDS: f64 = 86_400.0;
/// A capture with no limit given stops after this long.
pub const DEFAULT_SECONDS: f64 = 10.0;
/// Bytes of each packet kept.
const SNAPLEN: i32 = 65_535;
/// Room made under the disk cap ahead of writing: two largest packets'
/// worth, so the cap holds between two checks.
const ROOM: u64 = 2 * (SNAPLEN as u64 + 32);

/// `POST /api/v1/captures`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// Default: `any` (every interface, Linux cooked headers).
    #[serde(default)]
    pub interface: Option<String>,
    /// A BPF filter (tcpdump syntax).
    #[serde(default)]
    pub filter: Option<String>,
    /// A service: its endpoints become the filter.
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub seconds: Option<f64>,
    #[serde(default)]
    pub packets: Option<u64>,
    #[serde(default)]
    pub bytes: Option<u64>,
}

/// A checked request: what the job runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub interface: String,
    pub filter: String,
    pub seconds: f64,
    pub packets: Option<u64>,
    pub bytes: Option<u64>,
}

/// The BPF filter of a service's endpoints (from the table the probes
/// classify by).
fn service_filter(keys: &[agent_ebpf::EndpointKey]) -> String {
    let mut parts: Vec<String> = keys
        .iter()
        .map(|k| {
            let proto = match k.proto {
                agent_ebpf::PROTO_TCP => "tcp",
                agent_ebpf::PROTO_UDP => "udp",
                agent_ebpf::PROTO_ICMP => "icmp",
                _ => "icmp6",
            };
            let mut p = if k.port != 0 {
                format!("{proto} port {}", k.port)
            } else {
                proto.to_string()
            };
            if k.addr != [0; 4] {
                let host = crate::packet::addr_string(k.family, &k.addr_bytes());
                p = format!("{p} and host {host}");
            }
            format!("({p})")
        })
        .collect();
    parts.sort();
    parts.dedup();
    parts.join(" or ")
}

/// Checks a request against what the agent knows: the interface exists,
/// the filter compiles, the service has endpoints; limits in range.
pub fn plan(shared: &Shared, req: &Request) -> Result<Plan, String> {
    let interface = req.interface.clone().unwrap_or_else(|| "any".into());
    if interface != "any" && crate::probe::ifindex(&interface).is_none() {
        return Err(format!("no interface named `{interface}`"));
    }
    let filter = match (&req.filter, &req.service) {
        (Some(_), Some(_)) => return Err("give a filter or a service, not both".into()),
        (Some(f), None) => f.clone(),
        (None, Some(s)) => {
            let a = lock(shared);
            let slot = a
                .identity
                .services()
                .get(s)
                .map(|x| x.slot)
                .ok_or_else(|| format!("no service named `{s}`"))?;
            let keys: Vec<agent_ebpf::EndpointKey> = a
                .probe
                .table()
                .iter()
                .filter(|(_, v)| **v == slot)
                .map(|(k, _)| *k)
                .collect();
            if keys.is_empty() {
                return Err(format!(
                    "service `{s}` has no endpoints to filter by (a container counted by address): give a filter"
                ));
            }
            service_filter(&keys)
        }
        (None, None) => String::new(),
    };
    // The filter must compile (for the link type the interface has; a
    // dead handle of Ethernet is close enough to find syntax errors).
    if !filter.is_empty() {
        let dead = pcap::Capture::dead(pcap::Linktype::ETHERNET).map_err(|e| e.to_string())?;
        dead.compile(&filter, true)
            .map_err(|e| format!("filter `{filter}`: {e}"))?;
    }
    let seconds = req
        .seconds
        .unwrap_or(if req.packets.is_none() && req.bytes.is_none() {
            DEFAULT_SECONDS
        } else {
            MAX_SECONDS
        });
    if !(seconds.is_finite() && seconds > 0.0 && seconds <= MAX_SECONDS) {
        return Err(format!("seconds must be in (0, {MAX_SECONDS}]"));
    }
    if req.packets == Some(0) || req.bytes == Some(0) {
        return Err("packets and bytes limits must be at least 1".into());
    }
    Ok(Plan {
        interface,
        filter,
        seconds,
        packets: req.packets,
        bytes: req.bytes,
    })
}

// --- pcapng ------------------------------------------------------------

/// A pcapng file: one section, one interface, enhanced packet blocks
/// (microsecond timestamps).
pub struct Pcapng {
    out: BufWriter<std::fs::File>,
    written: u64,
}

fn block(out: &mut impl Write, ty: u32, body: &[u8]) -> std::io::Result<u64> {
    let pad = body.len().next_multiple_of(4) - body.len();
    let total = (12 + body.len() + pad) as u32;
    out.write_all(&ty.to_le_bytes())?;
    out.write_all(&total.to_le_bytes())?;
    out.write_all(body)?;
    out.write_all(&[0u8; 3][..pad])?;
    out.write_all(&total.to_le_bytes())?;
    Ok(u64::from(total))
}

impl Pcapng {
    pub fn create(path: &Path, linktype: u16, snaplen: u32) -> std::io::Result<Pcapng> {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)?;
        let mut out = BufWriter::with_capacity(256 << 10, f);
        let mut shb = Vec::with_capacity(16);
        shb.extend_from_slice(&0x1a2b_3c4du32.to_le_bytes());
        shb.extend_from_slice(&1u16.to_le_bytes());
        shb.extend_from_slice(&0u16.to_le_bytes());
        shb.extend_from_slice(&(-1i64).to_le_bytes());
        let mut written = block(&mut out, 0x0a0d_0d0a, &shb)?;
        let mut idb = Vec::with_capacity(8);
        idb.extend_from_slice(&linktype.to_le_bytes());
        idb.extend_from_slice(&0u16.to_le_bytes());
        idb.extend_from_slice(&snaplen.to_le_bytes());
        written += block(&mut out, 1, &idb)?;
        Ok(Pcapng { out, written })
    }

    /// Bytes one packet adds.
    pub fn cost(caplen: usize) -> u64 {
        32 + caplen.next_multiple_of(4) as u64
    }

    pub fn packet(&mut self, ts_us: u64, data: &[u8], orig_len: u32) -> std::io::Result<()> {
        let mut epb = Vec::with_capacity(20 + data.len());
        epb.extend_from_slice(&0u32.to_le_bytes());
        epb.extend_from_slice(&((ts_us >> 32) as u32).to_le_bytes());
        epb.extend_from_slice(&(ts_us as u32).to_le_bytes());
        epb.extend_from_slice(&(data.len() as u32).to_le_bytes());
        epb.extend_from_slice(&orig_len.to_le_bytes());
        epb.extend_from_slice(data);
        self.written += block(&mut self.out, 6, &epb)?;
        Ok(())
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    pub fn finish(mut self) -> std::io::Result<()> {
        self.out.flush()?;
        self.out.get_ref().sync_data()
    }
}

// --- the capture folder ---------------------------------------------------

/// `<state_dir>/captures`, next to the store.
pub fn dir(shared: &Shared) -> Option<PathBuf> {
    let store = lock(shared).store.clone()?;
    Some(store.path().parent()?.join("captures"))
}

/// A capture file's (job id, part) from its name; None for anything else.
fn parse_name(name: &str) -> Option<(i64, u32)> {
    let stem = name.strip_suffix(".pcapng")?;
    let (id, part) = stem.split_once('-')?;
    Some((id.parse().ok()?, part.parse().ok()?))
}

fn file_name(id: i64, part: u32) -> String {
    format!("{id}-{part}.pcapng")
}

/// Capture files in `dir`: (id, part) → size.
fn files(dir: &Path) -> BTreeMap<(i64, u32), u64> {
    let mut out = BTreeMap::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if let Some(k) = e.file_name().to_str().and_then(parse_name)
                && let Ok(m) = e.metadata()
            {
                out.insert(k, m.len());
            }
        }
    }
    out
}

/// Deletes the oldest capture files (lowest id, then part) other than
/// `keep`, the file being written (`keep_size` bytes so far, some still
/// buffered), until `need` more bytes fit under `cap`; false if they cannot.
fn make_room(dir: &Path, cap: u64, need: u64, keep: (i64, u32), keep_size: u64) -> bool {
    let mut all = files(dir);
    all.remove(&keep);
    let mut total: u64 = all.values().sum::<u64>() + keep_size;
    while total + need > cap {
        let Some((&k, &size)) = all.iter().next() else {
            return false;
        };
        if let Err(e) = std::fs::remove_file(dir.join(file_name(k.0, k.1))) {
            warn!(error = %e, "removing an old capture file");
            return false;
        }
        info!(
            capture = k.0,
            part = k.1,
            "disk cap: removed an old capture file"
        );
        all.remove(&k);
        total -= size;
    }
    true
}

/// What a finished capture reports as its job result.
#[derive(Debug, Default, Serialize)]
pub struct Outcome {
    pub packets: u64,
    pub bytes: u64,
    pub parts: Vec<u32>,
    pub stopped_by: &'static str,
    pub dropped: u64,
}

/// Runs a capture (blocking): until a limit is reached.
pub fn run(id: i64, plan: &Plan, dir: &Path, settings: Settings) -> Result<Outcome, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let mut cap = pcap::Capture::from_device(plan.interface.as_str())
        .and_then(|c| {
            c.immediate_mode(true)
                .snaplen(SNAPLEN)
                .buffer_size(16 << 20)
                .timeout(100)
                .promisc(false)
                .open()
        })
        .and_then(|c| c.setnonblock())
        .map_err(|e| format!("opening {}: {e}", plan.interface))?;
    // Non-blocking, polled with a timeout: libpcap in immediate mode may
    // block in poll(2) for good on an idle interface, past the deadline.
    let fd = std::os::fd::AsRawFd::as_raw_fd(&cap);
    if !plan.filter.is_empty() {
        cap.filter(&plan.filter, true)
            .map_err(|e| format!("filter `{}`: {e}", plan.filter))?;
    }
    let linktype = cap.get_datalink().0 as u16;
    let deadline = Instant::now() + Duration::from_secs_f64(plan.seconds);
    let mut out = Outcome {
        stopped_by: "seconds",
        ..Default::default()
    };
    let mut part = 0u32;
    let open_part = |part: u32| -> Result<Pcapng, String> {
        if !make_room(dir, settings.max_disk_bytes, ROOM, (id, part), 0) {
            return Err("the capture folder is at its disk cap".into());
        }
        Pcapng::create(&dir.join(file_name(id, part)), linktype, SNAPLEN as u32)
            .map_err(|e| format!("creating capture file: {e}"))
    };
    let mut file = Some(open_part(part)?);
    out.parts.push(part);
    let mut since_room = 0u64;
    while Instant::now() < deadline {
        let p = match cap.next_packet() {
            Ok(p) => p,
            Err(pcap::Error::TimeoutExpired) => {
                let left = deadline.saturating_duration_since(Instant::now());
                let ms = left.as_millis().clamp(1, 100) as i32;
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd; the descriptor is the capture's.
                unsafe { libc::poll(&mut pfd, 1, ms) };
                continue;
            }
            Err(e) => return Err(format!("capturing: {e}")),
        };
        let data = p.data;
        let cost = Pcapng::cost(data.len());
        if out.bytes.saturating_add(u64::from(p.header.len)) > plan.bytes.unwrap_or(u64::MAX) {
            out.stopped_by = "bytes";
            break;
        }
        let Some(f) = file.as_mut() else { break };
        if f.written() + cost > settings.file_bytes {
            if let Some(f) = file.take() {
                f.finish().map_err(|e| e.to_string())?;
            }
            part += 1;
            file = Some(open_part(part)?);
            out.parts.push(part);
            since_room = 0;
        }
        // The disk cap, checked as the file grows: room for the next
        // ROOM bytes is made before they are written.
        since_room += cost;
        if since_room >= ROOM / 2 {
            since_room = cost;
            let written = file.as_ref().map_or(0, Pcapng::written);
            if !make_room(dir, settings.max_disk_bytes, ROOM, (id, part), written) {
                out.stopped_by = "disk cap";
                break;
            }
        }
        let ts = p.header.ts.tv_sec as u64 * 1_000_000 + p.header.ts.tv_usec as u64;
        if let Some(f) = file.as_mut() {
            f.packet(ts, data, p.header.len)
                .map_err(|e| format!("writing capture file: {e}"))?;
        }
        out.packets += 1;
        out.bytes += u64::from(p.header.len);
        if Some(out.packets) == plan.packets {
            out.stopped_by = "packets";
            break;
        }
    }
    if let Ok(s) = cap.stats() {
        out.dropped = u64::from(s.dropped);
    }
    if let Some(f) = file.take() {
        f.finish().map_err(|e| e.to_string())?;
    }
    // Parts the disk cap took while this capture ran are gone.
    let left = files(dir);
    out.parts.retain(|p| left.contains_key(&(id, *p)));
    Ok(out)
}

/// The `capture` job: the plan is the job's argument.
pub async fn job(shared: &Shared, job: &Job) -> (bool, serde_json::Value) {
    let plan: Plan = match serde_json::from_str(&job.arg) {
        Ok(p) => p,
        Err(e) => return (false, json!({ "error": format!("bad capture job: {e}") })),
    };
    let Some(dir) = dir(shared) else {
        return (false, json!({ "error": "no store, so no capture folder" }));
    };
    let settings = lock(shared).capture;
    let id = job.id;
    info!(job = id, interface = %plan.interface, filter = %plan.filter, "capture started");
    let r = tokio::task::spawn_blocking(move || run(id, &plan, &dir, settings)).await;
    match r {
        Ok(Ok(o)) => {
            info!(job = id, packets = o.packets, "capture finished");
            (true, json!(o))
        }
        Ok(Err(e)) => {
            warn!(job = id, error = %e, "capture failed");
            (false, json!({ "error": e }))
        }
        Err(e) => (false, json!({ "error": e.to_string() })),
    }
}

// --- HTTP ----------------------------------------------------------------

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/api/v1/captures", get(list).post(start))
        .route("/api/v1/captures/{id}/file", get(file))
}

use crate::status::error;

async fn start(State(shared): State<Shared>, headers: HeaderMap, body: String) -> Response {
    if let Some(r) = crate::api::refuse(&shared, &headers) {
        return r;
    }
    let req: Request = match serde_json::from_str(if body.trim().is_empty() { "{}" } else { &body })
    {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("capture request: {e}")),
    };
    let s = shared.clone();
    let planned = tokio::task::spawn_blocking(move || plan(&s, &req)).await;
    let plan = match planned {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return error(StatusCode::BAD_REQUEST, e),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let arg = serde_json::to_string(&plan).unwrap_or_default();
    crate::api::queue(&shared, "capture", &arg)
}

/// Every capture file, by capture, with the job's state where known.
async fn list(State(shared): State<Shared>) -> Response {
    let Some(d) = dir(&shared) else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no store, so no capture folder",
        );
    };
    let store = lock(&shared).store.clone();
    let rows = tokio::task::spawn_blocking(move || {
        let mut by_id: BTreeMap<i64, Vec<(u32, u64, Option<SystemTime>)>> = BTreeMap::new();
        for ((id, part), size) in files(&d) {
            let mtime = std::fs::metadata(d.join(file_name(id, part)))
                .and_then(|m| m.modified())
                .ok();
            by_id.entry(id).or_default().push((part, size, mtime));
        }
        by_id
            .into_iter()
            .map(|(id, parts)| {
                let job = store.as_ref().and_then(|s| s.job(id));
                json!({
                    "id": id,
                    "state": job.as_ref().map(|j| j.state),
                    "plan": job.as_ref().and_then(|j| serde_json::from_str::<serde_json::Value>(&j.arg).ok()),
                    "result": job.as_ref().and_then(|j| j.result.clone()),
                    "bytes": parts.iter().map(|p| p.1).sum::<u64>(),
                    "parts": parts.iter().map(|(part, size, mtime)| json!({
                        "part": part,
                        "bytes": size,
                        "modified": mtime.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok()).map(|d| d.as_secs()),
                        "url": format!("/api/v1/captures/{id}/file?part={part}"),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect::<Vec<_>>()
    })
    .await;
    match rows {
        Ok(r) => Json(json!({ "captures": r })).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[derive(Debug, Deserialize)]
struct PartQuery {
    part: Option<u32>,
}

/// One capture file. Only numbers reach the file name.
async fn file(
    State(shared): State<Shared>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<PartQuery>,
) -> Response {
    if let Some(r) = crate::api::refuse(&shared, &headers) {
        return r;
    }
    let Ok(id) = id.parse::<i64>() else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("`{id}` is not a capture id"),
        );
    };
    let Some(d) = dir(&shared) else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no store, so no capture folder",
        );
    };
    let found = files(&d);
    let part = match q.part {
        Some(p) => p,
        None => match found.keys().find(|(i, _)| *i == id) {
            Some((_, p)) => *p,
            None => return error(StatusCode::NOT_FOUND, format!("no capture {id}")),
        },
    };
    if !found.contains_key(&(id, part)) {
        return error(
            StatusCode::NOT_FOUND,
            format!("no capture {id} part {part}"),
        );
    }
    let path = d.join(file_name(id, part));
    match tokio::task::spawn_blocking(move || std::fs::read(path)).await {
        Ok(Ok(bytes)) => (
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, "application/x-pcapng".to_string()),
                (
                    header::CONTENT_DISPOSITION,
                    format!("attachment; filename=\"netpulse-{}\"", file_name(id, part)),
                ),
            ],
            Body::from(bytes),
        )
            .into_response(),
        Ok(Err(e)) => error(StatusCode::NOT_FOUND, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

// --- the CLI's HTTP client -------------------------------------------------

/// A response: status and body.
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

/// One request to the agent at `base` (`http://host:port`, or https),
/// through the agent's HTTP client.
pub fn http(
    base: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Result<Answer, String> {
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let uri: hyper::Uri = url.parse().map_err(|e| format!("`{url}`: {e}"))?;
    let method = hyper::Method::from_bytes(method.as_bytes()).map_err(|e| e.to_string())?;
    let headers: Vec<(hyper::header::HeaderName, String)> = token
        .map(|t| (hyper::header::AUTHORIZATION, format!("Bearer {t}")))
        .into_iter()
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let (status, body) = rt.block_on(crate::client::request(
        method,
        &uri,
        &headers,
        body.map(|b| ("application/json", bytes::Bytes::from(b.to_string()))),
        Duration::from_secs(120),
    ))?;
    Ok(Answer {
        status: status.as_u16(),
        body: body.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_numbers_only() {
        assert_eq!(parse_name("12-0.pcapng"), Some((12, 0)));
        assert_eq!(parse_name("12-3.pcapng"), Some((12, 3)));
        for bad in [
            "../1-0.pcapng",
            "x-0.pcapng",
            "1-0.pcap",
            "1.pcapng",
            "1-0-1.pcapng",
        ] {
            assert_eq!(parse_name(bad), None, "{bad}");
        }
        assert_eq!(file_name(7, 2), "7-2.pcapng");
    }

    #[test]
    fn service_filters() {
        let mut k = agent_ebpf::EndpointKey {
            family: agent_ebpf::FAMILY_V4,
            proto: agent_ebpf::PROTO_TCP,
            port: 80,
            ..Default::default()
        };
        let wild = k;
        k.set_addr(&[10, 0, 0, 1]);
        k.proto = agent_ebpf::PROTO_UDP;
        k.port = 53;
        assert_eq!(
            service_filter(&[wild, k]),
            "(tcp port 80) or (udp port 53 and host 10.0.0.1)"
        );
    }
}

/// `netpulse capture start|list|get`: the API from the command line.
/// Errors carry the exit code: 2 for what the user must fix, 1 otherwise.
// Everything printed goes through `crate::cli::out`: `print!` panics when
// the reader has gone (`netpulse capture list | head`).
#[deny(clippy::print_stdout)]
pub mod cli {
    use clap::Subcommand;

    use super::{Request, file_name, http};
    use crate::cli::{Output, Printed};

    pub type Result = std::result::Result<(), (u8, String)>;

    #[derive(clap::Args)]
    pub struct Args {
        #[command(subcommand)]
        command: Command,
        /// The agent's address.
        #[arg(
            long,
            global = true,
            env = "NETPULSE_URL",
            default_value = "http://127.0.0.1:9477"
        )]
        url: String,
        /// The API token.
        #[arg(long, global = true, env = "NETPULSE_TOKEN", hide_env_values = true)]
        token: Option<String>,
    }

    #[derive(Subcommand)]
    enum Command {
        /// Start a capture: an interface (default: any), a BPF filter or a
        /// service, and limits (default: 10 seconds).
        Start {
            #[arg(long, short)]
            interface: Option<String>,
            #[arg(long, short, conflicts_with = "service")]
            filter: Option<String>,
            #[arg(long, short)]
            service: Option<String>,
            #[arg(long)]
            seconds: Option<f64>,
            #[arg(long)]
            packets: Option<u64>,
            #[arg(long)]
            bytes: Option<u64>,
            /// Wait for the capture to finish and print its result.
            #[arg(long)]
            wait: bool,
        },
        /// List the captures on disk.
        List {
            /// A table, or the API's JSON document.
            #[arg(long, short, value_enum, default_value_t = Output::Table)]
            output: Output,
            /// The old spelling of `--output json`.
            #[arg(long, hide = true, conflicts_with = "output")]
            json: bool,
        },
        /// Download a capture file (to stdout unless --file or -O).
        Get {
            id: i64,
            /// The part, for captures that rotated (default: the first left).
            #[arg(long)]
            part: Option<u32>,
            /// Where to write it; `-` for stdout.
            #[arg(long, short, value_name = "FILE", conflicts_with = "remote_name")]
            file: Option<String>,
            /// Write it to the file the agent names it,
            /// `netpulse-ID-PART.pcapng`, in the current directory (as
            /// curl -O does).
            #[arg(short = 'O', long)]
            remote_name: bool,
        },
    }

    /// Runs a `netpulse capture` command; the exit code.
    pub fn run(args: Args) -> u8 {
        let (url, token) = (args.url.as_str(), args.token.as_deref());
        let r = match args.command {
            Command::Start {
                interface,
                filter,
                service,
                seconds,
                packets,
                bytes,
                wait,
            } => start(
                url,
                token,
                &Request {
                    interface,
                    filter,
                    service,
                    seconds,
                    packets,
                    bytes,
                },
                wait,
            ),
            Command::List { output, json } => list(url, if json { Output::Json } else { output }),
            Command::Get {
                id,
                part,
                file,
                remote_name,
            } => {
                if remote_name {
                    get_named(url, token, id, part)
                } else {
                    get(url, token, id, part, file.as_deref().unwrap_or("-"))
                }
            }
        };
        match r {
            Ok(()) => 0,
            Err((code, msg)) => {
                eprintln!("netpulse capture: {msg}");
                code
            }
        }
    }

    fn api_error(status: u16, body: &[u8]) -> (u8, String) {
        let msg = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
        // A request the agent refused as wrong is the user's to fix.
        let code = if (400..500).contains(&status) { 2 } else { 1 };
        (code, format!("HTTP {status}: {msg}"))
    }

    /// Queues a capture; with `wait`, polls its job and prints the result.
    pub fn start(url: &str, token: Option<&str>, req: &Request, wait: bool) -> Result {
        let body = serde_json::to_string(req).map_err(|e| (1, e.to_string()))?;
        let a = http(url, "POST", "/api/v1/captures", token, Some(&body)).map_err(|e| (1, e))?;
        if a.status != 202 {
            return Err(api_error(a.status, &a.body));
        }
        let v: serde_json::Value =
            serde_json::from_slice(&a.body).map_err(|e| (1, e.to_string()))?;
        let id = v["job"]
            .as_i64()
            .ok_or((1, "no job id in the answer".to_string()))?;
        if !wait {
            return print(format!(
                "capture {id} queued: netpulse capture get {id} -O once it is done\n"
            ));
        }
        loop {
            std::thread::sleep(std::time::Duration::from_millis(250));
            let a =
                http(url, "GET", &format!("/api/v1/jobs/{id}"), token, None).map_err(|e| (1, e))?;
            if a.status != 200 {
                return Err(api_error(a.status, &a.body));
            }
            let j: serde_json::Value =
                serde_json::from_slice(&a.body).map_err(|e| (1, e.to_string()))?;
            match j["state"].as_str() {
                Some("done") => {
                    let r = &j["result"];
                    return print(format!(
                        "capture {id}: {} packets, {} bytes, stopped by {}, parts {}\n",
                        r["packets"], r["bytes"], r["stopped_by"], r["parts"]
                    ));
                }
                Some("failed") => {
                    return Err((1, format!("capture {id} failed: {}", j["result"]["error"])));
                }
                _ => {}
            }
        }
    }

    /// Writes to stdout; a closed pipe (`| head`) is not a failure.
    fn print(bytes: impl AsRef<[u8]>) -> Result {
        crate::cli::out(bytes)
            .map(|_: Printed| ())
            .map_err(|e| (1, format!("writing to stdout: {e}")))
    }

    /// `GET /api/v1/captures`, parsed.
    fn captures(url: &str) -> std::result::Result<serde_json::Value, (u8, String)> {
        let a = http(url, "GET", "/api/v1/captures", None, None).map_err(|e| (1, e))?;
        if a.status != 200 {
            return Err(api_error(a.status, &a.body));
        }
        serde_json::from_slice(&a.body).map_err(|e| (1, e.to_string()))
    }

    pub fn list(url: &str, output: Output) -> Result {
        let v = captures(url)?;
        if output == Output::Json {
            return print(format!(
                "{}\n",
                serde_json::to_string_pretty(&v).unwrap_or_default()
            ));
        }
        let rows: Vec<Vec<String>> = v["captures"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                vec![
                    c["id"].to_string(),
                    c["state"].as_str().unwrap_or("-").to_string(),
                    c["result"]["packets"]
                        .as_u64()
                        .map_or("-".into(), |n| n.to_string()),
                    c["bytes"].to_string(),
                    c["parts"].as_array().map_or(0, Vec::len).to_string(),
                    c["plan"]["filter"].as_str().unwrap_or("").to_string(),
                ]
            })
            .collect();
        print(crate::cli::table(
            &["ID", "STATE", "PACKETS", "BYTES ON DISK", "PARTS", "FILTER"],
            &rows,
            &[0, 2, 3, 4],
            Some(1),
            crate::cli::color(),
        ))
    }

    /// Downloads a capture file to `out` (`-`: stdout).
    pub fn get(url: &str, token: Option<&str>, id: i64, part: Option<u32>, out: &str) -> Result {
        let path = match part {
            Some(p) => format!("/api/v1/captures/{id}/file?part={p}"),
            None => format!("/api/v1/captures/{id}/file"),
        };
        let a = http(url, "GET", &path, token, None).map_err(|e| (1, e))?;
        if a.status != 200 {
            return Err(api_error(a.status, &a.body));
        }
        if out == "-" {
            print(&a.body)
        } else {
            std::fs::write(out, &a.body).map_err(|e| (1, format!("writing {out}: {e}")))?;
            eprintln!("{out}: {} bytes", a.body.len());
            Ok(())
        }
    }

    /// `get -O`: to `netpulse-ID-PART.pcapng`, the name the agent gives the
    /// file (Content-Disposition). Without `part`, the first part left,
    /// looked up first so that the name and the bytes agree.
    pub fn get_named(url: &str, token: Option<&str>, id: i64, part: Option<u32>) -> Result {
        let part = match part {
            Some(p) => p,
            None => captures(url)?["captures"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["id"].as_i64() == Some(id))
                .and_then(|c| c["parts"][0]["part"].as_u64())
                .and_then(|p| u32::try_from(p).ok())
                .ok_or((2, format!("no capture {id}")))?,
        };
        let name = format!("netpulse-{}", file_name(id, part));
        get(url, token, id, Some(part), &name)
    }
}
