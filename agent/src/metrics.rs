//! `/metrics`: Prometheus text built at scrape time straight from the probe's
//! maps, so a counter is never kept twice and is never older than the scrape.
//! Each subsystem is a collector ([`COLLECTORS`]); the series budget is
//! decided once per scrape ([`Budget`]). The names are listed in the README.

use agent_ebpf::{DIR_EGRESS, DIR_INGRESS, MAX_SLOTS, SlotCounters};
use prometheus::{
    Encoder, TextEncoder,
    proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType},
};

use crate::{
    identity::{ContainerMeta, ServiceMeta},
    probe::Counters,
    state::View,
};

const DIRECTIONS: [(usize, &str); 2] = [(DIR_INGRESS, "ingress"), (DIR_EGRESS, "egress")];

/// A metric with these labels, value to be set.
fn sample<'x>(labels: impl IntoIterator<Item = (&'x str, &'x str)>) -> Metric {
    let mut m = Metric::default();
    m.set_label(
        labels
            .into_iter()
            .map(|(k, v)| {
                let mut l = LabelPair::default();
                l.set_name(k.to_string());
                l.set_value(v.to_string());
                l
            })
            .collect(),
    );
    m
}

pub(crate) fn family(name: &str, help: &str, ty: MetricType) -> MetricFamily {
    let mut mf = MetricFamily::default();
    mf.set_name(name.to_string());
    mf.set_help(help.to_string());
    mf.set_field_type(ty);
    mf
}

pub(crate) fn gauge_sample(mf: &mut MetricFamily, labels: &[(&str, &str)], v: f64) {
    let mut m = sample(labels.iter().copied());
    let mut g = Gauge::default();
    g.set_value(v);
    m.set_gauge(g);
    mf.mut_metric().push(m);
}

/// The exposition text of `families`.
pub(crate) fn encode(families: &[MetricFamily]) -> Result<String, prometheus::Error> {
    let mut out = Vec::new();
    TextEncoder::new().encode(families, &mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// One metric family, filled sample by sample. The families are built
/// straight from their parts: each label set is written once per scrape,
/// so the registry machinery (hashing, per-child metrics) would only cost.
struct Fam<'a> {
    mf: MetricFamily,
    labels: &'a [&'a str],
    counter: bool,
}

impl<'a> Fam<'a> {
    fn new(name: &str, help: &str, labels: &'a [&'a str], counter: bool) -> Self {
        let ty = if counter {
            MetricType::COUNTER
        } else {
            MetricType::GAUGE
        };
        Fam {
            mf: family(name, help, ty),
            labels,
            counter,
        }
    }

    fn add(&mut self, values: &[&str], v: u64) {
        let mut m = sample(self.labels.iter().copied().zip(values.iter().copied()));
        if self.counter {
            let mut c = Counter::default();
            c.set_value(v as f64);
            m.set_counter(c);
        } else {
            let mut g = Gauge::default();
            g.set_value(v as f64);
            m.set_gauge(g);
        }
        self.mf.mut_metric().push(m);
    }
}

fn counter<'a>(name: &str, help: &str, labels: &'a [&'a str]) -> Fam<'a> {
    Fam::new(name, help, labels, true)
}

fn gauge<'a>(name: &str, help: &str, labels: &'a [&'a str]) -> Fam<'a> {
    Fam::new(name, help, labels, false)
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
/// Series a service with TCP figures adds: 6 connection results, the open
/// gauge, retransmits, and two histograms of 21 buckets, a sum and a count.
/// Its kernel drops add one series per (direction, reason) seen.
pub const TCP_SERIES_PER_SERVICE: usize = 6 + 1 + 1 + 2 * (agent_ebpf::HIST_BUCKETS + 2);
/// The label value that stands for services beyond the series budget.
pub const OTHER: &str = "~other";

/// Checks `agent.max_series` against the series a service adds: the budget
/// holds at least two services.
pub fn check_config(a: &crate::config::AgentConfig, d: &mut crate::config::Diagnostics) {
    let min_series = 2 * SERIES_PER_SERVICE;
    if !(min_series..=10_000_000).contains(a.max_series.get_ref()) {
        d.at(
            a.max_series.span(),
            format!(
                "max_series = {} is out of range {min_series}-10000000 (at least two services' series)",
                a.max_series.get_ref()
            ),
        );
    }
}

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

/// The Docker source as /metrics reports it.
pub struct DockerState<'a> {
    pub up: bool,
    /// Allow-listed container labels, exported as `label_<name>`.
    pub labels: &'a [String],
}

/// The values of `netpulse_service_info` beyond service and source:
/// container, image, compose project and service, then the allow-listed
/// labels. Replicas of one service are listed comma-separated, so the info
/// metric stays one series per service and joins one-to-one.
fn info_values(meta: Option<&ServiceMeta>, labels: &[String]) -> Vec<String> {
    let join = |f: &dyn Fn(&ContainerMeta) -> &str| meta.map_or(String::new(), |m| m.join(f));
    let mut out = vec![
        join(&|c| &c.name),
        join(&|c| &c.image),
        join(&|c| &c.compose_project),
        join(&|c| &c.compose_service),
    ];
    for l in labels {
        out.push(join(&|c| c.labels.get(l).map_or("", String::as_str)));
    }
    out
}

/// Seconds since the epoch, as exported.
pub(crate) fn epoch(t: std::time::SystemTime) -> f64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The `netpulse_check_*` families (README, "Metrics"), from the check engine.
pub fn check_families(engine: &crate::checks::engine::Engine) -> Vec<MetricFamily> {
    use crate::checks::engine::{BUCKETS, State};
    use prometheus::proto::{Bucket, Histogram};
    let mut up = family(
        "netpulse_check_up",
        "1 if the check is up (after thresholds and dependencies), else 0.",
        MetricType::GAUGE,
    );
    let mut state = family(
        "netpulse_check_state",
        "The check's state: 1 for the current one of up, down, blocked (a dependency is down) and unknown (not run yet).",
        MetricType::GAUGE,
    );
    let mut duration = family(
        "netpulse_check_duration_seconds",
        "Duration of check runs, retries included.",
        MetricType::HISTOGRAM,
    );
    let mut phases = family(
        "netpulse_check_phase_duration_seconds",
        "Duration of each phase of the last run (http: dns, connect, tls, first_byte, transfer; tcp: dns, connect).",
        MetricType::GAUGE,
    );
    let mut runs = family(
        "netpulse_check_runs_total",
        "Check runs, by result.",
        MetricType::COUNTER,
    );
    let mut last_success = family(
        "netpulse_check_last_success_timestamp_seconds",
        "When the check last succeeded.",
        MetricType::GAUGE,
    );
    let mut expiry = family(
        "netpulse_check_tls_cert_expiry_timestamp_seconds",
        "When the certificate an HTTPS check last saw expires.",
        MetricType::GAUGE,
    );
    let mut info = family(
        "netpulse_check_info",
        "Each check's kind, target and the service it watches; join on `check`.",
        MetricType::GAUGE,
    );
    let mut status_code = family(
        "netpulse_check_http_status_code",
        "The HTTP status of the last answer (after redirects).",
        MetricType::GAUGE,
    );
    for v in engine.view() {
        let (name, kind) = (v.spec.name.as_str(), v.spec.kind.as_str());
        gauge_sample(
            &mut info,
            &[
                ("check", name),
                ("kind", kind),
                ("service", v.spec.service.as_deref().unwrap_or("")),
                ("target", &v.spec.target()),
            ],
            1.0,
        );
        gauge_sample(
            &mut up,
            &[("check", name), ("kind", kind)],
            f64::from(u8::from(v.state == State::Up)),
        );
        for s in State::ALL {
            gauge_sample(
                &mut state,
                &[("check", name), ("state", s.as_str())],
                f64::from(u8::from(v.state == s)),
            );
        }
        let st = &v.status;
        let count = st.runs_ok + st.runs_failed;
        let mut h = Histogram::default();
        h.set_sample_count(count);
        h.set_sample_sum(st.duration_sum);
        h.set_bucket(
            BUCKETS
                .iter()
                .zip(st.buckets)
                .map(|(le, n)| {
                    let mut b = Bucket::default();
                    b.set_upper_bound(*le);
                    b.set_cumulative_count(n);
                    b
                })
                .collect(),
        );
        let mut m = sample([("check", name), ("kind", kind)]);
        m.set_histogram(h);
        duration.mut_metric().push(m);
        for (result, n) in [("success", st.runs_ok), ("failure", st.runs_failed)] {
            let mut m = sample([("check", name), ("result", result)]);
            let mut c = Counter::default();
            c.set_value(n as f64);
            m.set_counter(c);
            runs.mut_metric().push(m);
        }
        if let Some(t) = st.last_success {
            gauge_sample(&mut last_success, &[("check", name)], epoch(t));
        }
        if let Some(last) = &st.last {
            for (phase, d) in &last.phases {
                gauge_sample(
                    &mut phases,
                    &[("check", name), ("phase", phase)],
                    d.as_secs_f64(),
                );
            }
            if let Some(t) = last.cert_expiry {
                gauge_sample(&mut expiry, &[("check", name)], epoch(t));
            }
            if let Some(code) = last.http_status {
                gauge_sample(&mut status_code, &[("check", name)], f64::from(code));
            }
        }
    }
    let mut out = vec![
        up,
        info,
        state,
        duration,
        phases,
        runs,
        last_success,
        expiry,
        status_code,
    ];
    out.retain(|f| !f.get_metric().is_empty());
    out
}

/// What every collector reads in one scrape: the counters (live), the
/// datapath's published view, the settings, the check engine, and the
/// series budget, decided once per scrape for every per-service family.
pub struct Scrape<'a> {
    pub counters: &'a Counters,
    pub view: &'a View,
    /// None when the Docker source is off.
    pub docker: Option<DockerState<'a>>,
    pub checks: &'a crate::checks::engine::Engine,
    pub budget: Budget,
    /// The TCP figures, read once for the budget and the `tcp` collector.
    pub tcp: &'a TcpSnapshot,
}

/// The series budget of one scrape: which services keep their own series
/// and which are folded into `~other` (see [`fold`] for the order). Every
/// family with a `service` label takes its names from here.
pub struct Budget {
    pub max_series: usize,
    /// Services folded into `~other`; empty within the budget.
    folded: std::collections::HashSet<String>,
    /// Services whose TCP and drop series are folded into `~other` (the
    /// packet-folded ones, and those the budget has no room left for once
    /// every kept service's packet series are counted).
    tcp_folded: std::collections::HashSet<String>,
    /// Series left once every kept service's packet and TCP series are
    /// counted: the room of the service-peer series.
    peer_room: usize,
}

impl Budget {
    /// The budget for `view`, where `tcp_series` gives a service slot's TCP
    /// and drop series (0 for a service without TCP figures). Packet series
    /// come first: a service keeps its packet counters before any service
    /// keeps its histograms.
    pub fn new(view: &View, max_series: usize, tcp_series: impl Fn(u32) -> usize) -> Budget {
        let mut b = Budget::packets(view, max_series);
        let mut order: Vec<(&String, &crate::identity::Slotted)> = view.services.iter().collect();
        order.sort_by_key(|(_, s)| (source_of(s) != "config", s.slot));
        let kept = view.services.len() - b.folded.len() + usize::from(!b.folded.is_empty());
        let mut room = max_series.saturating_sub(kept * SERIES_PER_SERVICE);
        // Room for ~other's own TCP series, should anything fold into it.
        let reserve = TCP_SERIES_PER_SERVICE;
        let mut full = false;
        for (name, s) in order {
            if b.folded.contains(name.as_str()) {
                b.tcp_folded.insert(name.clone());
                continue;
            }
            let need = tcp_series(s.slot);
            if need == 0 {
                continue;
            }
            if !full && need + reserve <= room {
                room -= need;
            } else {
                full = true;
                b.tcp_folded.insert(name.clone());
            }
        }
        // ~other's TCP series, if anything folded into it.
        b.peer_room = if b.tcp_folded.is_empty() {
            room
        } else {
            room.saturating_sub(reserve)
        };
        b
    }

    /// Series the service-peer families may use.
    pub fn peer_room(&self) -> usize {
        self.peer_room
    }

    fn packets(view: &View, max_series: usize) -> Budget {
        let rows: Vec<Row> = view
            .services
            .iter()
            .map(|(name, s)| Row {
                name: name.clone(),
                source: source_of(s),
                slot: s.slot,
                counts: SlotCounters::default(),
            })
            .collect();
        let room = max_series / SERIES_PER_SERVICE;
        let folded = if rows.len() <= room {
            Default::default()
        } else {
            let (kept, _) = fold(rows.clone(), max_series);
            let kept: std::collections::HashSet<&str> =
                kept.iter().map(|r| r.name.as_str()).collect();
            rows.into_iter()
                .filter(|r| !kept.contains(r.name.as_str()))
                .map(|r| r.name)
                .collect()
        };
        Budget {
            max_series,
            folded,
            tcp_folded: Default::default(),
            peer_room: 0,
        }
    }

    /// The `service` label of `service`'s TCP and drop series.
    pub fn tcp_label<'s>(&self, service: &'s str) -> &'s str {
        if self.tcp_folded.contains(service) {
            OTHER
        } else {
            service
        }
    }

    /// The `service` label `service`'s series carry: its name, or `~other`.
    pub fn label<'s>(&self, service: &'s str) -> &'s str {
        if self.folded.contains(service) {
            OTHER
        } else {
            service
        }
    }

    pub fn folded(&self) -> usize {
        self.folded.len()
    }
}

fn source_of(s: &crate::identity::Slotted) -> &'static str {
    s.meta.as_ref().map_or("restored", |m| m.source.as_str())
}

/// Series each (service, named-service peer) pair adds: packets and
/// bytes × 2 directions.
pub const PEER_SERIES: usize = 4;

/// The services as the service map shows them (kind from their source).
pub fn peer_services(view: &View) -> Vec<crate::peers::Svc> {
    use crate::{identity::Source, peers::Kind};
    view.services
        .iter()
        .map(|(name, s)| crate::peers::Svc {
            name: name.clone(),
            slot: s.slot,
            kind: match &s.meta {
                Some(m) if m.source == Source::Container => Kind::Container,
                Some(m) if m.remote => Kind::Remote,
                _ => Kind::Service,
            },
        })
        .collect()
}

/// The addresses the map can name, from the published view and this
/// host's addresses.
pub fn peer_naming(view: &View, services: &[crate::peers::Svc]) -> crate::peers::Naming {
    crate::peers::Naming::new(services, &view.table, &view.addrs, &view.host_addrs)
}

/// The (service, peer) pairs that fit in `room` series, in order; when
/// they do not all fit, the rest summed into (`~other`, `~other`), whose
/// series are kept room for.
pub fn fold_peers(
    pairs: std::collections::BTreeMap<(String, String), agent_ebpf::PeerCounters>,
    room: usize,
) -> Vec<((String, String), agent_ebpf::PeerCounters)> {
    if pairs.len() * PEER_SERIES <= room {
        return pairs.into_iter().collect();
    }
    let mut left = room.saturating_sub(PEER_SERIES);
    let mut kept = Vec::new();
    let mut folded = agent_ebpf::PeerCounters::default();
    for (k, c) in pairs {
        if left >= PEER_SERIES {
            left -= PEER_SERIES;
            kept.push((k, c));
        } else {
            folded.add(&c);
        }
    }
    if room >= PEER_SERIES {
        kept.push(((OTHER.to_string(), OTHER.to_string()), folded));
    }
    kept
}

/// `netpulse_service_peer_{packets,bytes}_total`: each service's figures
/// of the peers that are named services (containers, `remote` services),
/// within the series budget: a folded service is `~other`, and pairs past
/// the budget's room sum into (`~other`, `~other`).
fn peers(s: &Scrape) -> Result<Vec<MetricFamily>, MetricsError> {
    let Some(reader) = s.counters.peers() else {
        return Ok(Vec::new());
    };
    let svcs = peer_services(s.view);
    let naming = peer_naming(s.view, &svcs);
    let slots = svcs.iter().map(|x| x.slot).collect();
    let snap = reader.read(&slots, false);
    let name_of: std::collections::BTreeMap<u32, &str> =
        svcs.iter().map(|x| (x.slot, x.name.as_str())).collect();
    let mut pairs: std::collections::BTreeMap<(String, String), agent_ebpf::PeerCounters> =
        Default::default();
    for ((slot, peer), c) in crate::peers::service_peers(&snap, &naming) {
        let Some(name) = name_of.get(&slot) else {
            continue;
        };
        pairs
            .entry((s.budget.label(name).to_string(), peer))
            .or_default()
            .add(&c);
    }
    let kept = fold_peers(pairs, s.budget.peer_room());
    let mut packets = counter(
        "netpulse_service_peer_packets_total",
        "Packets between each service and each of its peers that is a named service (ingress: toward the service).",
        &["service", "peer", "direction"],
    );
    let mut bytes = counter(
        "netpulse_service_peer_bytes_total",
        "Bytes between each service and each of its peers that is a named service, L2 headers included.",
        &["service", "peer", "direction"],
    );
    for ((service, peer), c) in &kept {
        for (d, dir) in DIRECTIONS {
            packets.add(&[service, peer, dir], c.packets[d]);
            bytes.add(&[service, peer, dir], c.bytes[d]);
        }
    }
    Ok(vec![packets.mf, bytes.mf])
}

/// One subsystem's families. A collector that fails is left out of the
/// scrape and reported by `netpulse_scrape_collector_success`, as
/// node_exporter does; the others are served.
type Collect = fn(&Scrape) -> Result<Vec<MetricFamily>, MetricsError>;

/// Every collector, by the name it is reported under.
pub const COLLECTORS: &[(&str, Collect)] = &[
    ("services", services),
    ("unclassified", unclassified),
    ("datapath", datapath),
    ("tcp", tcp),
    ("peers", peers),
    ("checks", checks),
    ("agent", agent),
];

/// Renders the exposition text: every collector's families, then the
/// collectors' own duration and success.
pub fn render(scrape: &Scrape) -> Result<String, MetricsError> {
    let mut families = Vec::new();
    let mut duration = family(
        "netpulse_scrape_collector_duration_seconds",
        "How long each collector took in this scrape.",
        MetricType::GAUGE,
    );
    let mut success = family(
        "netpulse_scrape_collector_success",
        "1 if the collector succeeded in this scrape, 0 if it failed (its families are left out).",
        MetricType::GAUGE,
    );
    for (name, collect) in COLLECTORS {
        let started = std::time::Instant::now();
        let ok = match collect(scrape) {
            Ok(f) => {
                families.extend(f);
                true
            }
            Err(e) => {
                tracing::warn!(collector = name, error = %e, "a /metrics collector failed");
                false
            }
        };
        gauge_sample(
            &mut duration,
            &[("collector", name)],
            started.elapsed().as_secs_f64(),
        );
        gauge_sample(
            &mut success,
            &[("collector", name)],
            f64::from(u8::from(ok)),
        );
    }
    families.push(duration);
    families.push(success);
    families.retain(|f| !f.get_metric().is_empty());
    Ok(encode(&families)?)
}

/// Per service: packets, bytes and TCP flags by direction, the info
/// series, and the budget's own gauges.
fn services(s: &Scrape) -> Result<Vec<MetricFamily>, MetricsError> {
    let mut packets = counter(
        "netpulse_service_packets_total",
        "Packets to (ingress) and from (egress) each service, as a wire carries them.",
        &["service", "direction"],
    );
    let mut bytes = counter(
        "netpulse_service_bytes_total",
        "Bytes to (ingress) and from (egress) each service, L2 headers included.",
        &["service", "direction"],
    );
    let mut flags = counter(
        "netpulse_service_tcp_flags_total",
        "TCP segments with SYN, FIN or RST set, per service and direction.",
        &["service", "direction", "flag"],
    );
    let labels = s.docker.as_ref().map_or(&[][..], |d| d.labels);
    let label_names: Vec<String> = labels
        .iter()
        .map(|l| crate::config::label_metric_name(l))
        .collect();
    let info_labels: Vec<&str> = [
        "service",
        "source",
        "container",
        "image",
        "compose_project",
        "compose_service",
    ]
    .into_iter()
    .chain(label_names.iter().map(String::as_str))
    .collect();
    let mut info = gauge(
        "netpulse_service_info",
        "Metadata of each service; join on `service`.",
        &info_labels,
    );
    // Each service's counts, under the name the budget gives it; the
    // folded ones summed into one ~other row.
    let mut rows: Vec<Row> = Vec::with_capacity(s.view.services.len());
    let mut other: Option<Row> = None;
    for (name, sl) in &s.view.services {
        let counts = s.counters.counts(sl.slot)?;
        if s.budget.label(name) == OTHER {
            other
                .get_or_insert_with(|| Row {
                    name: OTHER.to_string(),
                    source: "folded",
                    slot: 0,
                    counts: SlotCounters::default(),
                })
                .counts
                .add(&counts);
        } else {
            rows.push(Row {
                name: name.clone(),
                source: source_of(sl),
                slot: sl.slot,
                counts,
            });
        }
    }
    if other.is_some() {
        // As `fold` orders them: config services, then by slot.
        rows.sort_by_key(|r| (r.source != "config", r.slot));
    }
    rows.extend(other);
    for r in &rows {
        for (i, dir) in DIRECTIONS {
            let c = &r.counts.dir[i];
            packets.add(&[&r.name, dir], c.packets);
            bytes.add(&[&r.name, dir], c.bytes);
            for (flag, v) in [("syn", c.syn), ("fin", c.fin), ("rst", c.rst)] {
                flags.add(&[&r.name, dir, flag], v);
            }
        }
        let meta = s.view.services.get(&r.name).and_then(|x| x.meta.as_ref());
        let extra = info_values(meta, labels);
        let values: Vec<&str> = [r.name.as_str(), r.source]
            .into_iter()
            .chain(extra.iter().map(String::as_str))
            .collect();
        info.add(&values, 1);
    }
    let mut budget = gauge(
        "netpulse_series_budget",
        "The most per-service series /metrics serves (agent.max_series).",
        &[],
    );
    budget.add(&[], s.budget.max_series as u64);
    let mut dropped = gauge(
        "netpulse_series_dropped",
        "Services beyond the series budget, folded into service=\"~other\".",
        &[],
    );
    dropped.add(&[], s.budget.folded() as u64);
    Ok(vec![
        packets.mf, bytes.mf, flags.mf, info.mf, budget.mf, dropped.mf,
    ])
}

/// Packets no service claimed, by hook direction and reason.
fn unclassified(s: &Scrape) -> Result<Vec<MetricFamily>, MetricsError> {
    let mut unc_packets = counter(
        "netpulse_unclassified_packets_total",
        "Packets no service claimed, by hook direction and reason.",
        &["direction", "reason"],
    );
    let mut unc_bytes = counter(
        "netpulse_unclassified_bytes_total",
        "Bytes of packets no service claimed, by hook direction and reason.",
        &["direction", "reason"],
    );
    let reasons = agent_ebpf::RESERVED_SLOTS;
    for (slot, xdp, tc) in s.counters.reserved_counts()? {
        let reason = reasons
            .iter()
            .find(|(r, _)| *r == slot)
            .map_or("unknown", |(_, r)| r);
        // Unclassified packets have no service view: the direction is the
        // hook's (XDP = ingress, TC = egress).
        for (hook, (i, dir)) in [(&xdp, DIRECTIONS[0]), (&tc, DIRECTIONS[1])] {
            unc_packets.add(&[dir, reason], hook.dir[i].packets);
            unc_bytes.add(&[dir, reason], hook.dir[i].bytes);
        }
    }
    Ok(vec![unc_packets.mf, unc_bytes.mf])
}

/// The probes: where they are attached, the tables' fill, the backend and
/// what the pcap backend's captures lost.
fn datapath(s: &Scrape) -> Result<Vec<MetricFamily>, MetricsError> {
    let mut attached = gauge(
        "netpulse_probe_attached",
        "1 for each interface and hook the probes are attached to.",
        &["interface", "hook", "mode", "zone"],
    );
    let mut entries = gauge(
        "netpulse_map_entries",
        "Entries in use in each eBPF map.",
        &["map"],
    );
    let mut capacity = gauge(
        "netpulse_map_max_entries",
        "Capacity of each eBPF map.",
        &["map"],
    );
    for a in &s.view.attachments {
        for (hook, mode) in a.hooks {
            attached.add(&[a.name.as_str(), hook, mode, a.zone.as_str()], 1);
        }
    }
    for (map, used, max) in s.view.table_sizes {
        entries.add(&[map], used as u64);
        capacity.add(&[map], u64::from(max));
    }
    entries.add(&["slots"], s.view.services.len() as u64);
    capacity.add(
        &["slots"],
        u64::from(MAX_SLOTS - agent_ebpf::FIRST_SERVICE_SLOT),
    );
    let mut backend = gauge(
        "netpulse_backend_info",
        "What counts packets: ebpf (kernel programs) or pcap (libpcap captures).",
        &["backend"],
    );
    backend.add(&[s.view.backend], 1);
    let mut capture_dropped = counter(
        "netpulse_capture_dropped_packets_total",
        "Packets the pcap backend's captures lost because their buffer was full (libpcap's statistics).",
        &["interface"],
    );
    for (ifname, n) in s.counters.capture_drops() {
        capture_dropped.add(&[ifname.as_str()], n);
    }
    Ok(vec![
        attached.mf,
        entries.mf,
        capacity.mf,
        backend.mf,
        capture_dropped.mf,
    ])
}

/// A histogram sample from per-bucket counts in µs.
fn hist_sample(mf: &mut MetricFamily, labels: &[(&str, &str)], h: &agent_ebpf::Hist) {
    use prometheus::proto::{Bucket, Histogram};
    let mut out = Histogram::default();
    let mut cum = 0u64;
    let mut buckets = Vec::with_capacity(agent_ebpf::HIST_BOUNDS_US.len());
    for (i, n) in h.buckets.iter().enumerate() {
        cum = cum.wrapping_add(*n);
        if let Some(le) = agent_ebpf::HIST_BOUNDS_US.get(i) {
            let mut b = Bucket::default();
            b.set_upper_bound(*le as f64 / 1e6);
            b.set_cumulative_count(cum);
            buckets.push(b);
        }
    }
    out.set_bucket(buckets);
    out.set_sample_count(cum);
    out.set_sample_sum(h.sum_us as f64 / 1e6);
    let mut m = sample(labels.iter().copied());
    m.set_histogram(out);
    mf.mut_metric().push(m);
}

/// The side a slot's TCP figures are on: a `remote` service's are this
/// host's client side, every other service's its server side.
pub fn side(s: &crate::identity::Slotted) -> &'static str {
    if s.meta.as_ref().is_some_and(|m| m.remote) {
        "client"
    } else {
        "server"
    }
}

/// Whether a slot's TCP figures have anything to show: the histograms and
/// results appear once a service had a connection.
pub fn tcp_seen(c: &agent_ebpf::TcpCounters) -> bool {
    c.counts.iter().any(|n| *n != 0)
}

/// The TCP health figures of one scrape, read from the maps once: for the
/// [`Budget`] and for the `tcp` collector.
pub struct TcpSnapshot {
    /// Per service slot with anything to show ([`tcp_seen`]).
    pub slots: std::collections::HashMap<u32, agent_ebpf::TcpCounters>,
    pub drops: Vec<(agent_ebpf::DropKey, u64)>,
    pub unrecorded: u64,
    /// Drop series per slot.
    drop_series: std::collections::HashMap<u32, usize>,
}

impl TcpSnapshot {
    pub fn read(counters: &Counters, view: &View) -> Self {
        let slots = view
            .services
            .values()
            .filter_map(|s| {
                let c = counters.tcp(s.slot, side(s) == "client")?;
                tcp_seen(&c).then_some((s.slot, c))
            })
            .collect();
        let drops = counters.drops();
        let mut drop_series: std::collections::HashMap<u32, usize> = Default::default();
        for (k, _) in &drops {
            *drop_series.entry(k.slot).or_default() += 1;
        }
        TcpSnapshot {
            slots,
            drops,
            unrecorded: counters.drops_unrecorded(),
            drop_series,
        }
    }

    /// A slot's TCP and drop series (for the [`Budget`]).
    pub fn series(&self, slot: u32) -> usize {
        let tcp = if self.slots.contains_key(&slot) {
            TCP_SERIES_PER_SERVICE
        } else {
            0
        };
        tcp + self.drop_series.get(&slot).copied().unwrap_or(0)
    }
}

/// TCP health per service (connections by result, open connections,
/// handshake and RTT histograms, retransmits), the kernel's drops by
/// reason, and which of these features are on.
fn tcp(s: &Scrape) -> Result<Vec<MetricFamily>, MetricsError> {
    use agent_ebpf::{TCP_RESULTS, TcpCounters};
    let mut conns = counter(
        "netpulse_service_tcp_connections_total",
        "TCP connections per service and side (server: to a local service; client: this host to a remote service), by result: established, refused, timeout, aborted, reset, closed.",
        &["service", "side", "result"],
    );
    let mut open = gauge(
        "netpulse_service_tcp_open_connections",
        "TCP connections open now per service and side (seeded from the kernel's socket table at start).",
        &["service", "side"],
    );
    let mut retrans = counter(
        "netpulse_service_tcp_retransmits_total",
        "TCP segments retransmitted per service and side, SYN-ACKs included, counted as the kernel's TcpRetransSegs.",
        &["service", "side"],
    );
    let mut handshake = family(
        "netpulse_service_tcp_handshake_seconds",
        "TCP handshake time as the kernel saw it: SYN to established (client side), SYN-ACK sent to the final ACK (server side).",
        MetricType::HISTOGRAM,
    );
    let mut rtt = family(
        "netpulse_service_tcp_rtt_seconds",
        "The kernel's smoothed RTT of TCP connections, sampled at close and every 5 s while open.",
        MetricType::HISTOGRAM,
    );
    let mut drops = counter(
        "netpulse_service_kernel_drops_total",
        "Packets of each service the kernel dropped (kfree_skb), by direction in the service's view and the kernel's skb_drop_reason.",
        &["service", "direction", "drop_reason"],
    );
    let mut unattributed = counter(
        "netpulse_unattributed_kernel_drops_total",
        "Packets the kernel dropped in this host's namespace that no service claims, by skb_drop_reason.",
        &["drop_reason"],
    );
    let mut unrecorded = counter(
        "netpulse_kernel_drops_unrecorded_total",
        "Kernel drops not recorded because the drop map was full.",
        &[],
    );
    let mut features = gauge(
        "netpulse_feature_enabled",
        "1 if the kernel part is on, 0 if this kernel or the agent's privileges do not allow it (the log says why).",
        &["feature"],
    );
    for f in &s.view.features {
        features.add(&[f.name], u64::from(f.error.is_none()));
    }
    // Per (label, side): figures summed (the folded ones into ~other).
    let mut rows: std::collections::BTreeMap<(&str, &str), (TcpCounters, i64)> = Default::default();
    let mut slot_label: std::collections::HashMap<u32, &str> = Default::default();
    for (name, sl) in &s.view.services {
        let label = s.budget.tcp_label(name);
        slot_label.insert(sl.slot, label);
        let Some(c) = s.tcp.slots.get(&sl.slot) else {
            continue;
        };
        let seed = s.view.open_seed.get(&sl.slot).copied().unwrap_or(0);
        let e = rows.entry((label, side(sl))).or_default();
        e.0.add(c);
        e.1 += crate::health::open_counted(c) + seed;
    }
    for ((name, side), (c, open_n)) in &rows {
        for (i, result) in TCP_RESULTS {
            conns.add(&[name, side, result], c.counts[i]);
        }
        open.add(&[name, side], (*open_n).max(0) as u64);
        retrans.add(&[name, side], crate::health::retransmits(c));
        let labels = [("service", *name), ("side", *side)];
        hist_sample(&mut handshake, &labels, &c.handshake);
        let mut r = c.rtt;
        r.add(&c.rtt_live);
        hist_sample(&mut rtt, &labels, &r);
    }
    let reason_name = |v: u32| crate::health::reason_name(&s.view.drop_reasons, v);
    let mut by_service: std::collections::BTreeMap<(&str, &str, String), u64> = Default::default();
    let mut by_reason: std::collections::BTreeMap<String, u64> = Default::default();
    for &(k, n) in &s.tcp.drops {
        let reason = reason_name(k.reason);
        match slot_label.get(&k.slot) {
            Some(label) if k.slot >= agent_ebpf::FIRST_SERVICE_SLOT => {
                let dir = if k.dir as usize == DIR_EGRESS {
                    "egress"
                } else {
                    "ingress"
                };
                *by_service.entry((label, dir, reason)).or_default() += n;
            }
            _ => *by_reason.entry(reason).or_default() += n,
        }
    }
    for ((service, dir, reason), n) in &by_service {
        drops.add(&[service, dir, reason], *n);
    }
    for (reason, n) in &by_reason {
        unattributed.add(&[reason], *n);
    }
    if !s.view.features.is_empty() {
        unrecorded.add(&[], s.tcp.unrecorded);
    }
    Ok(vec![
        conns.mf,
        open.mf,
        handshake,
        rtt,
        retrans.mf,
        drops.mf,
        unattributed.mf,
        unrecorded.mf,
        features.mf,
    ])
}

/// The health checks (see [`check_families`]).
fn checks(s: &Scrape) -> Result<Vec<MetricFamily>, MetricsError> {
    Ok(check_families(s.checks))
}

/// The agent itself: its build and its sources.
fn agent(s: &Scrape) -> Result<Vec<MetricFamily>, MetricsError> {
    let mut build = gauge(
        "netpulse_build_info",
        "Build of the running agent.",
        &["version", "layout"],
    );
    build.add(
        &[
            env!("CARGO_PKG_VERSION"),
            &agent_ebpf::LAYOUT_VERSION.to_string(),
        ],
        1,
    );
    let mut source_up = gauge(
        "netpulse_source_up",
        "1 while a service source answers (docker: dockerd's API and event stream).",
        &["source"],
    );
    if let Some(d) = &s.docker {
        source_up.add(&["docker"], u64::from(d.up));
    }
    Ok(vec![build.mf, source_up.mf])
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

    /// A view of `n` config services on slots 8.. (for the budget).
    fn view(n: u32) -> View {
        View {
            backend: "ebpf",
            services: (0..n)
                .map(|i| {
                    (
                        format!("s{i:03}"),
                        crate::identity::Slotted {
                            slot: agent_ebpf::FIRST_SERVICE_SLOT + i,
                            meta: None,
                            retired_at: None,
                        },
                    )
                })
                .collect(),
            table: Default::default(),
            addrs: Default::default(),
            attachments: Vec::new(),
            table_sizes: [("", 0, 0); 8],
            features: Vec::new(),
            drop_reasons: Default::default(),
            open_seed: Default::default(),
            host_addrs: Default::default(),
        }
    }

    #[test]
    fn packet_series_come_before_any_services_tcp_series() {
        let tcp = |_slot: u32| TCP_SERIES_PER_SERVICE + 2;
        // Room for every service's packets and TCP: nothing folds.
        let b = Budget::new(
            &view(10),
            10 * (SERIES_PER_SERVICE + TCP_SERIES_PER_SERVICE + 2) + TCP_SERIES_PER_SERVICE,
            tcp,
        );
        assert_eq!((b.folded(), b.tcp_folded.len()), (0, 0));
        // Room for all packet series and three services' TCP series (plus
        // ~other's): the first three keep theirs, in budget order.
        let max =
            10 * SERIES_PER_SERVICE + 3 * (TCP_SERIES_PER_SERVICE + 2) + TCP_SERIES_PER_SERVICE;
        let b = Budget::new(&view(10), max, tcp);
        assert_eq!(b.folded(), 0, "no service loses its packet counters");
        for i in 0..10 {
            let name = format!("s{i:03}");
            let want = if i < 3 { name.as_str() } else { OTHER };
            assert_eq!(b.tcp_label(&name), want, "{name}");
            assert_eq!(b.label(&name), name.as_str());
        }
        // Too few for every packet series: packets fold first, and the
        // folded services' TCP series go with them.
        let b = Budget::new(&view(10), 5 * SERIES_PER_SERVICE, tcp);
        assert_eq!(b.folded(), 6);
        assert_eq!(b.tcp_label("s009"), OTHER);
        // A service without TCP figures costs no TCP series.
        let b = Budget::new(
            &view(10),
            10 * SERIES_PER_SERVICE + TCP_SERIES_PER_SERVICE,
            |_| 0,
        );
        assert_eq!((b.folded(), b.tcp_folded.len()), (0, 0));
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

    #[test]
    fn peer_pairs_past_the_room_fold_into_other() {
        let c = |n: u64| agent_ebpf::PeerCounters {
            packets: [n, n],
            bytes: [n, n],
            conns: 0,
        };
        let pairs: std::collections::BTreeMap<(String, String), agent_ebpf::PeerCounters> =
            [("a", 1), ("b", 2), ("c", 4)]
                .into_iter()
                .map(|(s, n)| ((s.to_string(), "db".to_string()), c(n)))
                .collect();
        let names = |v: &[((String, String), agent_ebpf::PeerCounters)]| -> Vec<String> {
            v.iter().map(|((s, _), _)| s.clone()).collect()
        };
        // All fit: all kept, nothing folded.
        let all = fold_peers(pairs.clone(), 3 * PEER_SERIES);
        assert_eq!(names(&all), ["a", "b", "c"]);
        // Room for two groups: one pair, then ~other with the rest.
        let two = fold_peers(pairs.clone(), 2 * PEER_SERIES + 3);
        assert_eq!(names(&two), ["a", OTHER]);
        assert_eq!(two[1].0.1, OTHER);
        assert_eq!(two[1].1.packets, [6, 6]);
        // No room at all: nothing.
        assert!(fold_peers(pairs, 3).is_empty());
    }
}
