//! `/metrics`: Prometheus text built at scrape time straight from the probe's
//! maps, so a counter is never kept twice and is never older than the scrape.
//! Metric names follow DESIGN.md.

use agent_ebpf::{DIR_EGRESS, DIR_INGRESS, DirCounters, MAX_SLOTS, SlotCounters};
use prometheus::{
    Encoder, IntCounterVec, IntGaugeVec, Opts, TextEncoder, core::Collector, proto::MetricFamily,
};

use crate::{identity::Identity, probe::Probe};

const DIRECTIONS: [(usize, &str); 2] = [(DIR_INGRESS, "ingress"), (DIR_EGRESS, "egress")];

fn counter(name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntCounterVec> {
    IntCounterVec::new(Opts::new(name, help), labels)
}

fn gauge(name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntGaugeVec> {
    IntGaugeVec::new(Opts::new(name, help), labels)
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error(transparent)]
    Prometheus(#[from] prometheus::Error),
    #[error(transparent)]
    Probe(#[from] crate::probe::ProbeError),
}

/// Series each service adds: packets and bytes × 2 directions, TCP flags ×
/// 3 × 2, and its info series.
pub const SERIES_PER_SERVICE: usize = 2 + 2 + 6 + 1;
/// The label value that stands for services beyond the series budget.
pub const OTHER: &str = "~other";

/// One service as it is about to be exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub name: String,
    pub source: &'static str,
    pub slot: u32,
    pub counts: SlotCounters,
}

/// Applies the series budget: config services first, then the others in
/// slot order (older first, so membership is stable from scrape to scrape
/// and counters do not jump between a service and `~other`). Services past
/// the budget are summed into one `~other` row. Returns the rows to export
/// and how many services were folded.
pub fn fold(mut rows: Vec<Row>, max_series: usize) -> (Vec<Row>, usize) {
    let room = max_series / SERIES_PER_SERVICE;
    if rows.len() <= room {
        return (rows, 0);
    }
    rows.sort_by_key(|r| (r.source != "config", r.slot));
    // One place goes to ~other itself.
    let keep = room.saturating_sub(1);
    let folded = rows.split_off(keep);
    let mut other = Row {
        name: OTHER.to_string(),
        source: "folded",
        slot: 0,
        counts: SlotCounters::default(),
    };
    for r in &folded {
        other.counts.add(&r.counts);
    }
    let n = folded.len();
    if keep < room {
        rows.push(other);
    }
    (rows, n)
}

/// Renders the exposition text for the agent's current state.
pub fn render(
    probe: &Probe,
    identity: &Identity,
    max_series: usize,
) -> Result<String, MetricsError> {
    let packets = counter(
        "netpulse_service_packets_total",
        "Packets to (ingress) and from (egress) each service, as a wire carries them.",
        &["service", "direction"],
    )?;
    let bytes = counter(
        "netpulse_service_bytes_total",
        "Bytes to (ingress) and from (egress) each service, L2 headers included.",
        &["service", "direction"],
    )?;
    let flags = counter(
        "netpulse_service_tcp_flags_total",
        "TCP segments with SYN, FIN or RST set, per service and direction.",
        &["service", "direction", "flag"],
    )?;
    let info = gauge(
        "netpulse_service_info",
        "Metadata of each service; join on `service`.",
        &["service", "source", "container", "image", "compose_project"],
    )?;
    let unc_packets = counter(
        "netpulse_unclassified_packets_total",
        "Packets no service claimed, by hook direction and reason.",
        &["direction", "reason"],
    )?;
    let unc_bytes = counter(
        "netpulse_unclassified_bytes_total",
        "Bytes of packets no service claimed, by hook direction and reason.",
        &["direction", "reason"],
    )?;
    let attached = gauge(
        "netpulse_probe_attached",
        "1 for each interface and hook the probes are attached to.",
        &["interface", "hook", "mode"],
    )?;
    let entries = gauge(
        "netpulse_map_entries",
        "Entries in use in each eBPF map.",
        &["map"],
    )?;
    let capacity = gauge(
        "netpulse_map_max_entries",
        "Capacity of each eBPF map.",
        &["map"],
    )?;
    let build = gauge(
        "netpulse_build_info",
        "Build of the running agent.",
        &["version", "layout"],
    )?;

    let add_dir = |service: &str, dir: &str, c: &DirCounters| {
        packets.with_label_values(&[service, dir]).inc_by(c.packets);
        bytes.with_label_values(&[service, dir]).inc_by(c.bytes);
        for (flag, v) in [("syn", c.syn), ("fin", c.fin), ("rst", c.rst)] {
            flags.with_label_values(&[service, dir, flag]).inc_by(v);
        }
    };
    let mut rows = Vec::with_capacity(identity.services().len());
    for (name, s) in identity.services() {
        rows.push(Row {
            name: name.clone(),
            source: s.meta.as_ref().map_or("restored", |m| m.source.as_str()),
            slot: s.slot,
            counts: probe.counts(s.slot)?,
        });
    }
    let (rows, folded) = fold(rows, max_series);
    for r in &rows {
        for (i, dir) in DIRECTIONS {
            add_dir(&r.name, dir, &r.counts.dir[i]);
        }
        info.with_label_values(&[r.name.as_str(), r.source, "", "", ""])
            .set(1);
    }
    let budget = gauge(
        "netpulse_series_budget",
        "The most per-service series /metrics serves (agent.max_series).",
        &[],
    )?;
    budget.with_label_values::<&str>(&[]).set(max_series as i64);
    let dropped = gauge(
        "netpulse_series_dropped",
        "Services beyond the series budget, folded into service=\"~other\".",
        &[],
    )?;
    dropped.with_label_values::<&str>(&[]).set(folded as i64);
    let reasons = agent_ebpf::RESERVED_SLOTS;
    for (slot, xdp, tc) in probe.reserved_counts()? {
        let reason = reasons
            .iter()
            .find(|(s, _)| *s == slot)
            .map_or("unknown", |(_, r)| r);
        // Unclassified packets have no service view: the direction is the
        // hook's (XDP = ingress, TC = egress).
        for (hook, (i, dir)) in [(&xdp, DIRECTIONS[0]), (&tc, DIRECTIONS[1])] {
            unc_packets
                .with_label_values(&[dir, reason])
                .inc_by(hook.dir[i].packets);
            unc_bytes
                .with_label_values(&[dir, reason])
                .inc_by(hook.dir[i].bytes);
        }
    }
    for (ifname, a) in probe.attachments() {
        attached
            .with_label_values(&[ifname.as_str(), "xdp", a.xdp_mode.as_str()])
            .set(1);
        attached
            .with_label_values(&[ifname.as_str(), "tc", "egress"])
            .set(1);
    }
    for (map, used, max) in probe.table_sizes() {
        entries.with_label_values(&[map]).set(used as i64);
        capacity.with_label_values(&[map]).set(i64::from(max));
    }
    entries
        .with_label_values(&["slots"])
        .set(identity.services().len() as i64);
    capacity
        .with_label_values(&["slots"])
        .set(i64::from(MAX_SLOTS - agent_ebpf::FIRST_SERVICE_SLOT));
    build
        .with_label_values(&[
            env!("CARGO_PKG_VERSION"),
            &agent_ebpf::LAYOUT_VERSION.to_string(),
        ])
        .set(1);

    let mut families: Vec<MetricFamily> = Vec::new();
    families.extend(packets.collect());
    families.extend(bytes.collect());
    families.extend(flags.collect());
    families.extend(info.collect());
    families.extend(unc_packets.collect());
    families.extend(unc_bytes.collect());
    families.extend(attached.collect());
    families.extend(entries.collect());
    families.extend(capacity.collect());
    families.extend(build.collect());
    families.extend(budget.collect());
    families.extend(dropped.collect());
    families.retain(|f| !f.get_metric().is_empty());
    let mut out = Vec::new();
    TextEncoder::new().encode(&families, &mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, source: &'static str, slot: u32, packets: u64) -> Row {
        let mut counts = SlotCounters::default();
        counts.dir[0].packets = packets;
        Row {
            name: name.into(),
            source,
            slot,
            counts,
        }
    }

    #[test]
    fn within_the_budget_nothing_is_folded() {
        let rows = vec![row("a", "socket", 9, 1), row("b", "config", 8, 2)];
        let (out, folded) = fold(rows.clone(), 2 * SERIES_PER_SERVICE);
        assert_eq!((out, folded), (rows, 0));
    }

    #[test]
    fn past_the_budget_config_and_older_services_stay_and_the_rest_is_summed() {
        let rows = vec![
            row("new-socket", "socket", 20, 5),
            row("old-socket", "socket", 9, 7),
            row("declared", "config", 30, 11),
            row("newest", "socket", 21, 13),
        ];
        // Room for three services: two kept, one place for ~other.
        let (out, folded) = fold(rows, 3 * SERIES_PER_SERVICE + 5);
        assert_eq!(folded, 2);
        let names: Vec<&str> = out.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["declared", "old-socket", OTHER]);
        assert_eq!(out[2].counts.dir[0].packets, 5 + 13);
        assert!(out.len() * SERIES_PER_SERVICE <= 3 * SERIES_PER_SERVICE + 5);
    }
}
