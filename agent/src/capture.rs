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
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::{info, warn};

use crate::store::{Job, Store};

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
/// Bytes of each packet kept (the one capture opener's whole-packet size).
const SNAPLEN: i32 = crate::pcap_backend::FULL_SNAPLEN;
/// Room made under the disk cap ahead of writing: two largest packets'
/// worth, so the cap holds between two checks.
const ROOM: u64 = 2 * (SNAPLEN as u64 + 32);

/// `POST /api/v1/captures` (an API type: the CLI sends it, the agent
/// reads it).
pub use crate::api_types::CaptureRequest as Request;

/// A checked request: what the job runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub interface: String,
    pub filter: String,
    pub seconds: f64,
    pub packets: Option<u64>,
    pub bytes: Option<u64>,
}

/// The BPF filter that selects a service's packets, from what the probes
/// classify by: its endpoints in the table and the container addresses
/// counted for it. The one builder for captures on demand and on failure,
/// so both work for config, socket and Docker services alike.
pub fn service_filter(keys: &[agent_ebpf::EndpointKey], addrs: &[std::net::IpAddr]) -> String {
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
        .chain(addrs.iter().map(|a| format!("(host {a})")))
        .collect();
    parts.sort();
    parts.dedup();
    parts.join(" or ")
}

/// The filter of the service `name`, from the datapath: which slot it has
/// (`services`), the endpoints (`table`) and container addresses (`addrs`)
/// that count for that slot.
pub fn filter_for(
    services: &BTreeMap<String, crate::identity::Slotted>,
    table: &BTreeMap<agent_ebpf::EndpointKey, u32>,
    addrs: &BTreeMap<std::net::IpAddr, u32>,
    name: &str,
) -> Result<String, String> {
    let slot = services
        .get(name)
        .map(|x| x.slot)
        .ok_or_else(|| format!("no service named `{name}`"))?;
    let keys: Vec<agent_ebpf::EndpointKey> = table
        .iter()
        .filter(|(_, v)| **v == slot)
        .map(|(k, _)| *k)
        .collect();
    let hosts: Vec<std::net::IpAddr> = addrs
        .iter()
        .filter(|(_, v)| **v == slot)
        .map(|(a, _)| *a)
        .collect();
    if keys.is_empty() && hosts.is_empty() {
        return Err(format!(
            "service `{name}` has no endpoints or addresses to filter by: give a filter"
        ));
    }
    Ok(service_filter(&keys, &hosts))
}

/// Checks a request against what the agent knows: the interface exists,
/// the filter compiles, the service has endpoints; limits in range.
///
/// `services`, `table` and `addrs` are the datapath's (see [`filter_for`]).
pub fn plan(
    services: &BTreeMap<String, crate::identity::Slotted>,
    table: &BTreeMap<agent_ebpf::EndpointKey, u32>,
    addrs: &BTreeMap<std::net::IpAddr, u32>,
    req: &Request,
) -> Result<Plan, String> {
    let interface = req.interface.clone().unwrap_or_else(|| "any".into());
    if interface != "any" && crate::probe::ifindex(&interface).is_none() {
        return Err(format!("no interface named `{interface}`"));
    }
    let filter = match (&req.filter, &req.service) {
        (Some(_), Some(_)) => return Err("give a filter or a service, not both".into()),
        (Some(f), None) => f.clone(),
        (None, Some(s)) => filter_for(services, table, addrs, s)?,
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
    /// A new file; `comment`, if any, is the section's `opt_comment`
    /// (`capinfos` shows it as the file comment).
    pub fn create(
        path: &Path,
        linktype: u16,
        snaplen: u32,
        comment: Option<&str>,
    ) -> std::io::Result<Pcapng> {
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
        if let Some(c) = comment.filter(|c| !c.is_empty()) {
            // An option's length is a u16: a longer comment is cut.
            let c = &c.as_bytes()[..c.len().min(60_000)];
            shb.extend_from_slice(&1u16.to_le_bytes());
            shb.extend_from_slice(&(c.len() as u16).to_le_bytes());
            shb.extend_from_slice(c);
            shb.resize(shb.len().next_multiple_of(4), 0);
            shb.extend_from_slice(&[0u8; 4]);
        }
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
pub fn dir(store: &Store) -> Option<PathBuf> {
    Some(store.path().parent()?.join("captures"))
}

/// A capture file's (job id, part) from its name; None for anything else.
fn parse_name(name: &str) -> Option<(i64, u32)> {
    let stem = name.strip_suffix(".pcapng")?;
    let (id, part) = stem.split_once('-')?;
    Some((id.parse().ok()?, part.parse().ok()?))
}

pub fn file_name(id: i64, part: u32) -> String {
    format!("{id}-{part}.pcapng")
}

/// Capture files in `dir`: (id, part) → size.
pub fn files(dir: &Path) -> BTreeMap<(i64, u32), u64> {
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
    let mut cap = crate::pcap_backend::open_live(&plan.interface, true)
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
        Pcapng::create(
            &dir.join(file_name(id, part)),
            linktype,
            SNAPLEN as u32,
            None,
        )
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
pub async fn job(
    store: Option<&Store>,
    settings: Settings,
    job: &Job,
) -> (bool, serde_json::Value) {
    let plan: Plan = match serde_json::from_str(&job.arg) {
        Ok(p) => p,
        Err(e) => return (false, json!({ "error": format!("bad capture job: {e}") })),
    };
    let Some(dir) = store.and_then(dir) else {
        return (false, json!({ "error": "no store, so no capture folder" }));
    };
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
            service_filter(&[wild, k], &[]),
            "(tcp port 80) or (udp port 53 and host 10.0.0.1)"
        );
        // A container counted by its address.
        assert_eq!(
            service_filter(&[], &["172.17.0.2".parse().unwrap()]),
            "(host 172.17.0.2)"
        );
    }
}
