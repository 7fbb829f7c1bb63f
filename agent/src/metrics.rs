//! `/metrics`: Prometheus text built at scrape time straight from the probe's
//! maps, so a counter is never kept twice and is never older than the scrape.
//! Metric names follow DESIGN.md.

use agent_ebpf::{DIR_EGRESS, DIR_INGRESS, DirCounters, MAX_SLOTS};
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

/// Renders the exposition text for the agent's current state.
pub fn render(probe: &Probe, identity: &Identity) -> Result<String, MetricsError> {
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
    for (name, s) in identity.services() {
        let c = probe.counts(s.slot)?;
        for (i, dir) in DIRECTIONS {
            add_dir(name, dir, &c.dir[i]);
        }
        let source = s.meta.as_ref().map_or("restored", |m| m.source.as_str());
        info.with_label_values(&[name.as_str(), source, "", "", ""])
            .set(1);
    }
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
    families.retain(|f| !f.get_metric().is_empty());
    let mut out = Vec::new();
    TextEncoder::new().encode(&families, &mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}
