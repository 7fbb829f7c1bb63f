//! `netpulse analyze FILE|-`: a pcap or pcapng file (read by libpcap, any
//! link type `packet::Link` knows) through the same parse and service
//! classification as the live paths, reported per service, per
//! conversation, per address (top talkers) and per protocol. One thread,
//! one pass; a file that stops early is reported up to where it stopped.

use std::{
    io::Write,
    net::IpAddr,
    os::fd::{IntoRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use agent_ebpf::{
    DIR_EGRESS, DIR_INGRESS, DirCounters, FAMILY_V4, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP,
    PROTO_UDP, RESERVED_SLOTS, SlotCounters,
};
use rustc_hash::FxHashMap;
use serde::Serialize;

use crate::{
    config::{self, Endpoint, Proto, Service},
    packet::{self, Flow, Link, TCP_FIN, TCP_RST, TCP_SYN, Table},
    tcp_track::{self, Segment, Totals, Tracker},
};

/// Connections `analyze` follows at once for the TCP figures (a file can
/// hold millions; the oldest are dropped first, and counted).
const TCP_CONNECTIONS: usize = 1 << 18;

#[derive(Debug, thiserror::Error)]
pub enum AnalyzeError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Config(#[from] config::ConfigError),
    #[error("cannot read {what}: {message}")]
    Open { what: String, message: String },
    #[error(
        "{what}: link type {dlt} ({name}) is not supported; netpulse reads Ethernet, Linux cooked (SLL, SLL2), raw IP and BSD loopback captures"
    )]
    Link {
        what: String,
        dlt: i32,
        name: String,
    },
}

impl AnalyzeError {
    /// 2 for what the user must fix in the command line or config, 1 for
    /// files that cannot be read.
    pub fn exit_code(&self) -> u8 {
        match self {
            AnalyzeError::Usage(_) | AnalyzeError::Config(_) => 2,
            AnalyzeError::Open { .. } | AnalyzeError::Link { .. } => 1,
        }
    }
}

/// Where the packets come from.
#[derive(Debug, Clone)]
pub enum Input {
    File(PathBuf),
    Stdin,
}

impl Input {
    pub fn parse(arg: &str) -> Input {
        if arg == "-" {
            Input::Stdin
        } else {
            Input::File(PathBuf::from(arg))
        }
    }

    fn describe(&self) -> String {
        match self {
            Input::File(p) => p.display().to_string(),
            Input::Stdin => "<stdin>".into(),
        }
    }
}

/// A `--service NAME=PROTO/PORT` (or `NAME=PROTO/ADDR:PORT`, `NAME=icmp`,
/// `NAME=icmp/ADDR`) argument as a service.
pub fn service_arg(arg: &str) -> Result<Service, String> {
    let bad = |why: &str| {
        format!(
            "--service `{arg}`: {why} (expected NAME=PROTO/PORT, e.g. web=tcp/80, or NAME=PROTO/ADDR:PORT)"
        )
    };
    let (name, spec) = arg.split_once('=').ok_or_else(|| bad("no `=`"))?;
    if let Some(why) = config::bad_name(name) {
        return Err(bad(&why));
    }
    let (proto, rest) = match spec.split_once('/') {
        Some((p, r)) => (p, Some(r)),
        None => (spec, None),
    };
    let proto = match proto {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        "icmp" => Proto::Icmp,
        _ => return Err(bad("unknown protocol (tcp, udp or icmp)")),
    };
    let (addr, port): (Option<&str>, Option<&str>) = match (proto, rest) {
        (Proto::Icmp, None) => (None, None),
        (Proto::Icmp, Some(a)) => (Some(a), None),
        (_, None) => return Err(bad("tcp and udp need a port")),
        (_, Some(r)) => match r.rsplit_once(':') {
            Some((a, p)) => (
                Some(a.trim_start_matches('[').trim_end_matches(']')),
                Some(p),
            ),
            None => (None, Some(r)),
        },
    };
    let port = match port {
        None => 0,
        Some(p) => match p.parse::<u16>() {
            Ok(v) if v > 0 => v,
            _ => return Err(bad("the port must be 1-65535")),
        },
    };
    let addrs = match addr {
        None => Vec::new(),
        Some(a) => config::expand(a).map_err(|e| bad(&e))?,
    };
    Ok(Service {
        name: name.to_string(),
        remote: false,
        endpoints: vec![Endpoint {
            proto,
            wildcard: addrs.is_empty(),
            addrs,
            port,
        }],
    })
}

/// The services to classify by: the config's, then `--service` ones (an
/// argument naming a config service adds endpoints to it).
pub fn services(config: Option<&Path>, args: &[String]) -> Result<Vec<Service>, AnalyzeError> {
    let mut out = match config {
        Some(p) => config::load(Some(p))?.services,
        None => Vec::new(),
    };
    for a in args {
        let s = service_arg(a).map_err(AnalyzeError::Usage)?;
        match out.iter_mut().find(|o| o.name == s.name) {
            Some(o) => o.endpoints.extend(s.endpoints),
            None => out.push(s),
        }
    }
    Ok(out)
}

/// The service table for `services`, built the way the agent builds the
/// kernel's.
pub fn table(services: &[Service]) -> Table {
    let d = crate::identity::desired(&crate::identity::Sources {
        config: services,
        listeners: &[],
        owners: &Default::default(),
        containers: &[],
        labels: &[],
    });
    Table::new(&d.endpoints)
}

/// One conversation: the lower (address, port) end is `a`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ConvKey {
    family: u8,
    proto: u8,
    pa: u16,
    pb: u16,
    a: [u8; 16],
    b: [u8; 16],
}

#[derive(Debug, Clone, Copy, Default)]
struct ConvStats {
    ab: (u64, u64),
    ba: (u64, u64),
    /// IP packets between the same addresses without ports to count them
    /// by (fragments, cut headers): for the per-address table only.
    other_ab: (u64, u64),
    other_ba: (u64, u64),
    syn: u64,
    fin: u64,
    rst: u64,
    slot: u32,
}

#[derive(Debug, Clone, Copy, Default)]
struct Talker {
    tx: (u64, u64),
    rx: (u64, u64),
}

/// Counts packets as they come; [`Analyzer::report`] sums up.
pub struct Analyzer {
    link: Link,
    table: Table,
    slots: Vec<SlotCounters>,
    convs: FxHashMap<ConvKey, ConvStats>,
    /// (packets, bytes) per (IPv4|IPv6, IP protocol).
    protos: Vec<(u64, u64)>,
    not_ip: (u64, u64),
    malformed: (u64, u64),
    packets: u64,
    bytes: u64,
    first_ts: Option<f64>,
    last_ts: f64,
    flow: Flow,
    tcp: Tracker,
    tcp_totals: Totals,
    /// Slots that had a TCP segment (they get a TCP row).
    tcp_seen: Vec<bool>,
}

impl Analyzer {
    pub fn new(link: Link, table: Table) -> Self {
        let mut convs = FxHashMap::default();
        convs.reserve(4096);
        Analyzer {
            link,
            slots: vec![SlotCounters::default(); table.slots()],
            tcp_seen: vec![false; table.slots()],
            table,
            convs,
            protos: vec![(0, 0); 512],
            not_ip: (0, 0),
            malformed: (0, 0),
            packets: 0,
            bytes: 0,
            first_ts: None,
            last_ts: 0.0,
            flow: Flow::default(),
            tcp: Tracker::new(TCP_CONNECTIONS),
            tcp_totals: Totals::default(),
        }
    }

    /// One frame: `data` as captured, `wire_len` as it was on the wire,
    /// at `ts` seconds (`ts_us` in µs, for the TCP figures).
    #[inline]
    pub fn add(&mut self, data: &[u8], wire_len: u32, ts: f64, ts_us: u64) {
        let len = u64::from(wire_len);
        self.packets += 1;
        self.bytes += len;
        if self.first_ts.is_none() {
            self.first_ts = Some(ts);
        }
        self.last_ts = ts;
        let res = packet::parse(self.link, data, &mut self.flow);
        let f = self.flow;
        if f.family == 0 {
            let slot = res.err().unwrap_or(agent_ebpf::SLOT_MALFORMED);
            add(&mut self.slots[slot as usize].dir[DIR_INGRESS], len, 0);
            let m = if slot == agent_ebpf::SLOT_NOT_IP {
                &mut self.not_ip
            } else {
                &mut self.malformed
            };
            m.0 += 1;
            m.1 += len;
            return;
        }
        let p = &mut self.protos[usize::from(f.family != FAMILY_V4) * 256 + usize::from(f.proto)];
        p.0 += 1;
        p.1 += len;
        // One table for conversations and addresses: an IP packet without
        // ports (a fragment, a cut L4 header) is keyed with ports 0 and
        // counted for its addresses only.
        let (ok, slot) = match res {
            Ok(()) => {
                let (slot, dir) = self.table.classify_file(&f);
                add(&mut self.slots[slot as usize].dir[dir], len, f.tcp_flags);
                if f.proto == PROTO_TCP && slot >= agent_ebpf::FIRST_SERVICE_SLOT {
                    self.tcp_segment(data, wire_len, ts_us, slot, dir);
                }
                (true, slot)
            }
            Err(slot) => {
                add(&mut self.slots[slot as usize].dir[DIR_INGRESS], len, 0);
                (false, slot)
            }
        };
        let (sport, dport) = if ok { (f.sport, f.dport) } else { (0, 0) };
        let fwd = (f.src, sport) <= (f.dst, dport);
        let key = if fwd {
            ConvKey {
                family: f.family,
                proto: f.proto,
                a: f.src,
                pa: sport,
                b: f.dst,
                pb: dport,
            }
        } else {
            ConvKey {
                family: f.family,
                proto: f.proto,
                a: f.dst,
                pa: dport,
                b: f.src,
                pb: sport,
            }
        };
        let c = self.convs.entry(key).or_default();
        if !ok {
            let d = if fwd {
                &mut c.other_ab
            } else {
                &mut c.other_ba
            };
            d.0 += 1;
            d.1 += len;
            return;
        }
        let d = if fwd { &mut c.ab } else { &mut c.ba };
        d.0 += 1;
        d.1 += len;
        if f.proto == PROTO_TCP {
            c.syn += u64::from(f.tcp_flags & TCP_SYN != 0);
            c.fin += u64::from(f.tcp_flags & TCP_FIN != 0);
            c.rst += u64::from(f.tcp_flags & TCP_RST != 0);
        }
        c.slot = slot;
    }

    /// A TCP segment of a service, for the TCP figures.
    fn tcp_segment(&mut self, data: &[u8], wire_len: u32, ts_us: u64, slot: u32, dir: usize) {
        if let Some(seen) = self.tcp_seen.get_mut(slot as usize) {
            *seen = true;
        }
        let Some(tcp) = packet::tcp_header(self.link, data, wire_len) else {
            return;
        };
        let seg = Segment::new(&self.flow, ts_us, slot, dir, tcp);
        self.tcp.segment(&seg, &mut self.tcp_totals);
    }

    pub fn packets(&self) -> u64 {
        self.packets
    }

    /// The report, with the `top` largest conversations and addresses (by
    /// bytes; 0 = all).
    pub fn report(self, input: &str, top: usize, stopped: Option<Stopped>) -> Report {
        let names = self.table.names().to_vec();
        let name = |slot: u32| self.table.name(slot).map(str::to_string);
        let mut services: Vec<ServiceRow> = names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let slot = agent_ebpf::FIRST_SERVICE_SLOT as usize + i;
                let c = self.slots[slot];
                ServiceRow {
                    service: n.clone(),
                    ingress: Dir::from(&c.dir[DIR_INGRESS]),
                    egress: Dir::from(&c.dir[DIR_EGRESS]),
                    tcp: self.tcp_seen[slot].then(|| {
                        TcpRow::from(
                            self.tcp_totals
                                .slots
                                .get(&(slot as u32))
                                .cloned()
                                .unwrap_or_default(),
                        )
                    }),
                }
            })
            .collect();
        services.sort_by(|a, b| a.service.cmp(&b.service));
        let unclassified = RESERVED_SLOTS
            .iter()
            .map(|(slot, reason)| {
                let mut c = self.slots[*slot as usize].dir[DIR_INGRESS];
                c.add(&self.slots[*slot as usize].dir[DIR_EGRESS]);
                Unclassified {
                    reason,
                    packets: c.packets,
                    bytes: c.bytes,
                }
            })
            .collect();
        let keep = |n: usize| if top == 0 { n } else { top.min(n) };
        // Addresses from the conversation table: every IP packet is in it.
        let mut by_addr: FxHashMap<(u8, [u8; 16]), Talker> = FxHashMap::default();
        for (k, c) in &self.convs {
            let ab = (c.ab.0 + c.other_ab.0, c.ab.1 + c.other_ab.1);
            let ba = (c.ba.0 + c.other_ba.0, c.ba.1 + c.other_ba.1);
            let a = by_addr.entry((k.family, k.a)).or_default();
            a.tx = (a.tx.0 + ab.0, a.tx.1 + ab.1);
            a.rx = (a.rx.0 + ba.0, a.rx.1 + ba.1);
            let b = by_addr.entry((k.family, k.b)).or_default();
            b.tx = (b.tx.0 + ba.0, b.tx.1 + ba.1);
            b.rx = (b.rx.0 + ab.0, b.rx.1 + ab.1);
        }
        let mut convs: Vec<(ConvKey, ConvStats)> = self
            .convs
            .into_iter()
            .filter(|(_, c)| c.ab.0 + c.ba.0 > 0)
            .collect();
        let conversations_total = convs.len();
        // Largest first; ties in a fixed order, so output is stable.
        convs.sort_unstable_by(|x, y| {
            (y.1.ab.1 + y.1.ba.1, y.1.ab.0 + y.1.ba.0)
                .cmp(&(x.1.ab.1 + x.1.ba.1, x.1.ab.0 + x.1.ba.0))
                .then_with(|| {
                    (x.0.family, x.0.proto, x.0.a, x.0.pa, x.0.b, x.0.pb)
                        .cmp(&(y.0.family, y.0.proto, y.0.a, y.0.pa, y.0.b, y.0.pb))
                })
        });
        convs.truncate(keep(convs.len()));
        let conversations = convs
            .iter()
            .map(|(k, s)| Conversation {
                proto: proto_name(k.family, k.proto),
                a: packet::addr_string(k.family, &k.a),
                a_port: k.pa,
                b: packet::addr_string(k.family, &k.b),
                b_port: k.pb,
                packets: s.ab.0 + s.ba.0,
                bytes: s.ab.1 + s.ba.1,
                a_to_b_packets: s.ab.0,
                a_to_b_bytes: s.ab.1,
                b_to_a_packets: s.ba.0,
                b_to_a_bytes: s.ba.1,
                syn: s.syn,
                fin: s.fin,
                rst: s.rst,
                service: name(s.slot),
            })
            .collect();
        let addresses_total = by_addr.len();
        let mut talkers: Vec<((u8, [u8; 16]), Talker)> = by_addr.into_iter().collect();
        talkers.sort_unstable_by(|x, y| {
            (y.1.tx.1 + y.1.rx.1, y.1.tx.0 + y.1.rx.0)
                .cmp(&(x.1.tx.1 + x.1.rx.1, x.1.tx.0 + x.1.rx.0))
                .then_with(|| x.0.cmp(&y.0))
        });
        talkers.truncate(keep(talkers.len()));
        let top_talkers = talkers
            .iter()
            .map(|((fam, a), t)| TalkerRow {
                address: packet::addr_string(*fam, a),
                packets: t.tx.0 + t.rx.0,
                bytes: t.tx.1 + t.rx.1,
                tx_packets: t.tx.0,
                tx_bytes: t.tx.1,
                rx_packets: t.rx.0,
                rx_bytes: t.rx.1,
            })
            .collect();
        let mut protocols: Vec<ProtoRow> = self
            .protos
            .iter()
            .enumerate()
            .filter(|(_, c)| c.0 > 0)
            .map(|(i, c)| ProtoRow {
                protocol: proto_mix_name(i),
                packets: c.0,
                bytes: c.1,
            })
            .collect();
        for (n, c) in [("non-ip", self.not_ip), ("malformed", self.malformed)] {
            if c.0 > 0 {
                protocols.push(ProtoRow {
                    protocol: n.to_string(),
                    packets: c.0,
                    bytes: c.1,
                });
            }
        }
        protocols.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.protocol.cmp(&b.protocol)));
        let first = self.first_ts.unwrap_or(0.0);
        let tcp = TcpSummary {
            available: tcp_track::AVAILABLE,
            unavailable: tcp_track::UNAVAILABLE,
            handshake_bounds_us: agent_ebpf::HIST_BOUNDS_US.to_vec(),
            connections_evicted: self.tcp.evicted(),
        };
        Report {
            input: input.to_string(),
            link_type: self.link.as_str(),
            packets: self.packets,
            bytes: self.bytes,
            first_timestamp: self.first_ts,
            duration_seconds: self.last_ts - first,
            complete: stopped.is_none(),
            stopped,
            services,
            unclassified,
            conversations_total,
            conversations,
            addresses_total,
            top_talkers,
            protocols,
            tcp,
        }
    }
}

#[inline]
fn add(d: &mut DirCounters, len: u64, flags: u8) {
    d.packets += 1;
    d.bytes += len;
    d.syn += u64::from(flags & TCP_SYN != 0);
    d.fin += u64::from(flags & TCP_FIN != 0);
    d.rst += u64::from(flags & TCP_RST != 0);
}

fn proto_name(family: u8, proto: u8) -> String {
    match (family, proto) {
        (_, PROTO_TCP) => "tcp".into(),
        (_, PROTO_UDP) => "udp".into(),
        (FAMILY_V4, PROTO_ICMP) => "icmp".into(),
        (_, PROTO_ICMPV6) => "icmpv6".into(),
        (_, p) => format!("ip-proto-{p}"),
    }
}

fn proto_mix_name(i: usize) -> String {
    let (fam, proto) = if i < 256 {
        ("ipv4", FAMILY_V4)
    } else {
        ("ipv6", agent_ebpf::FAMILY_V6)
    };
    format!("{fam}/{}", proto_name(proto, (i % 256) as u8))
}

/// Where and why reading stopped before the end of the file.
#[derive(Debug, Clone, Serialize)]
pub struct Stopped {
    /// Packets read before the failure.
    pub after_packets: u64,
    /// Byte offset of the record that failed (classic pcap only: pcapng
    /// blocks are not sized from what libpcap returns).
    pub offset: Option<u64>,
    pub error: String,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Dir {
    pub packets: u64,
    pub bytes: u64,
    pub syn: u64,
    pub fin: u64,
    pub rst: u64,
}

impl From<&DirCounters> for Dir {
    fn from(d: &DirCounters) -> Self {
        Dir {
            packets: d.packets,
            bytes: d.bytes,
            syn: d.syn,
            fin: d.fin,
            rst: d.rst,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ServiceRow {
    pub service: String,
    pub ingress: Dir,
    pub egress: Dir,
    /// TCP figures from the headers; `None` for a service without TCP
    /// segments.
    pub tcp: Option<TcpRow>,
}

/// A service's TCP figures, from headers (`tcp_track`): connections by
/// result, handshakes (SYN to the first ACK, as Wireshark's
/// `tcp.analysis.initial_rtt`) and retransmitted segments (as its
/// `tcp.analysis.retransmission`), by direction in the service's view.
#[derive(Debug, Clone, Serialize)]
pub struct TcpRow {
    pub established: u64,
    pub refused: u64,
    pub reset: u64,
    pub closed: u64,
    /// Established and not yet ended when the file ended.
    pub open: u64,
    pub retransmits: u64,
    pub retransmits_ingress: u64,
    pub retransmits_egress: u64,
    pub handshakes: u64,
    pub handshake_sum_us: u64,
    pub handshake_p50_us: Option<u32>,
    pub handshake_p99_us: Option<u32>,
    /// Per-bucket counts over `tcp.handshake_bounds_us`, then +Inf.
    pub handshake_buckets: Vec<u64>,
}

impl From<tcp_track::SlotTcp> for TcpRow {
    fn from(mut s: tcp_track::SlotTcp) -> TcpRow {
        use agent_ebpf::{
            TCP_CLOSED, TCP_ENDED, TCP_ESTABLISHED, TCP_REFUSED, TCP_RESET, TCP_RETRANS,
        };
        s.handshakes.sort_unstable();
        let c = &s.tcp.counts;
        TcpRow {
            established: c[TCP_ESTABLISHED],
            refused: c[TCP_REFUSED],
            reset: c[TCP_RESET],
            closed: c[TCP_CLOSED],
            open: c[TCP_ESTABLISHED].saturating_sub(c[TCP_ENDED]),
            retransmits: c[TCP_RETRANS],
            retransmits_ingress: s.retrans[DIR_INGRESS],
            retransmits_egress: s.retrans[DIR_EGRESS],
            handshakes: s.tcp.handshake.count(),
            handshake_sum_us: s.tcp.handshake.sum_us,
            handshake_p50_us: tcp_track::quantile(&s.handshakes, 0.5),
            handshake_p99_us: tcp_track::quantile(&s.handshakes, 0.99),
            handshake_buckets: s.tcp.handshake.buckets.to_vec(),
        }
    }
}

/// What the TCP figures of a capture can and cannot say.
#[derive(Debug, Clone, Serialize)]
pub struct TcpSummary {
    pub available: &'static [&'static str],
    /// Only the eBPF backend's tracing programs have these.
    pub unavailable: &'static [&'static str],
    pub handshake_bounds_us: Vec<u64>,
    /// Connections dropped from the tracker's table when it was full.
    pub connections_evicted: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Unclassified {
    pub reason: &'static str,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Conversation {
    pub proto: String,
    pub a: String,
    pub a_port: u16,
    pub b: String,
    pub b_port: u16,
    pub packets: u64,
    pub bytes: u64,
    pub a_to_b_packets: u64,
    pub a_to_b_bytes: u64,
    pub b_to_a_packets: u64,
    pub b_to_a_bytes: u64,
    pub syn: u64,
    pub fin: u64,
    pub rst: u64,
    pub service: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TalkerRow {
    pub address: String,
    pub packets: u64,
    pub bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProtoRow {
    pub protocol: String,
    pub packets: u64,
    pub bytes: u64,
}

/// What `netpulse analyze` prints (`--output json` is this, serialized).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub input: String,
    pub link_type: &'static str,
    pub packets: u64,
    /// On-the-wire bytes (each record's original length).
    pub bytes: u64,
    pub first_timestamp: Option<f64>,
    pub duration_seconds: f64,
    /// False if the file stopped early (see `stopped`).
    pub complete: bool,
    pub stopped: Option<Stopped>,
    pub services: Vec<ServiceRow>,
    pub unclassified: Vec<Unclassified>,
    pub conversations_total: usize,
    pub conversations: Vec<Conversation>,
    pub addresses_total: usize,
    pub top_talkers: Vec<TalkerRow>,
    pub protocols: Vec<ProtoRow>,
    pub tcp: TcpSummary,
}

/// Files larger than this get a progress bar (on a terminal).
const PROGRESS_MIN_BYTES: u64 = 4 << 20;
/// Packets between progress updates.
const PROGRESS_EVERY: u64 = 1 << 16;

/// Opens `input` with libpcap. Returns the capture, the file's size (for
/// progress) and whether it is a classic pcap (whose offsets we can count).
fn open(input: &Input) -> Result<(Reader, Option<u64>, bool), AnalyzeError> {
    use std::os::unix::fs::FileExt;
    let what = input.describe();
    let open_err = |message: String| AnalyzeError::Open {
        what: what.clone(),
        message,
    };
    let (fd, size, classic): (OwnedFd, Option<u64>, bool) = match input {
        Input::File(p) => {
            let f = std::fs::File::open(p).map_err(|e| open_err(e.to_string()))?;
            let meta = f.metadata().map_err(|e| open_err(e.to_string()))?;
            if meta.is_dir() {
                return Err(open_err("is a directory".into()));
            }
            let mut magic = [0u8; 4];
            let classic = f.read_at(&mut magic, 0).is_ok_and(|n| n == 4)
                && matches!(
                    u32::from_le_bytes(magic),
                    0xa1b2c3d4 | 0xd4c3b2a1 | 0xa1b23c4d | 0x4d3cb2a1
                );
            (f.into(), Some(meta.len()), classic)
        }
        Input::Stdin => {
            let fd = std::os::fd::AsFd::as_fd(&std::io::stdin())
                .try_clone_to_owned()
                .map_err(|e| open_err(e.to_string()))?;
            (fd, None, false)
        }
    };
    let reader = fopen_offline(fd).map_err(open_err)?;
    Ok((reader, size, classic))
}

unsafe extern "C" {
    /// libpcap's reader on a stdio stream we opened (the pcap crate opens
    /// one with stdio's default 4 KiB buffer, a read(2) per 4 KiB).
    fn pcap_fopen_offline(fp: *mut libc::FILE, errbuf: *mut libc::c_char) -> *mut libc::c_void;
}

/// stdio buffer for capture files: 64 KiB reads. Larger is slower: a
/// 1 MiB buffer falls out of the L2 cache between the kernel's copy into it
/// and libpcap's reads from it (`cargo xtask bench --only analyze` shows
/// bare read loops with 64 KiB and 1 MiB buffers side by side).
const READ_BUFFER: usize = 1 << 16;

/// A libpcap offline capture and the stdio buffer its stream reads into.
/// Fields drop in order: the capture (closing the stream) before the buffer.
struct Reader {
    cap: pcap::Capture<pcap::Offline>,
    _buf: Vec<u8>,
}

/// `fd` as a libpcap offline capture, read through a 64 KiB stdio buffer.
fn fopen_offline(fd: OwnedFd) -> Result<Reader, String> {
    let raw = fd.into_raw_fd();
    // SAFETY: `raw` is an open descriptor we own; fdopen takes it over
    // (fclose, through pcap_close, closes it). setvbuf comes before any
    // I/O on the stream, as it must; stdio allocates the buffer.
    let file = unsafe { libc::fdopen(raw, c"r".as_ptr()) };
    if file.is_null() {
        let e = std::io::Error::last_os_error();
        // SAFETY: fdopen failed, so the descriptor is still ours to close.
        unsafe { libc::close(raw) };
        return Err(e.to_string());
    }
    // Our own buffer: given none, glibc sizes it by st_blksize (4 KiB),
    // whatever size is asked for.
    let mut buf = vec![0u8; READ_BUFFER];
    // SAFETY: a fresh stream; `buf` outlives it (see `Reader`).
    unsafe { libc::setvbuf(file, buf.as_mut_ptr().cast(), libc::_IOFBF, READ_BUFFER) };
    let mut err = [0 as libc::c_char; 257];
    // SAFETY: `file` is a valid read stream, `err` is PCAP_ERRBUF_SIZE
    // (256) bytes and more; on success libpcap owns the stream.
    let p = unsafe { pcap_fopen_offline(file, err.as_mut_ptr()) };
    match std::ptr::NonNull::new(p) {
        Some(p) => Ok(Reader {
            cap: pcap::Capture::from(p.cast()),
            _buf: buf,
        }),
        None => {
            // SAFETY: libpcap did not take the stream; `err` is
            // NUL-terminated by libpcap (and by our zeroed last byte).
            unsafe { libc::fclose(file) };
            let msg = unsafe { std::ffi::CStr::from_ptr(err.as_ptr()) };
            Err(msg.to_string_lossy().into_owned())
        }
    }
}

/// Reads all of `input` into a report. A read error part-way is not an
/// `Err`: the report says where it stopped.
pub fn analyze(input: &Input, table: Table, top: usize) -> Result<Report, AnalyzeError> {
    let what = input.describe();
    let (mut reader, size, classic) = open(input)?;
    let cap = &mut reader.cap;
    let dlt = cap.get_datalink();
    let link = Link::from_dlt(dlt.0).ok_or_else(|| AnalyzeError::Link {
        what: what.clone(),
        dlt: dlt.0,
        name: dlt.get_name().unwrap_or_else(|_| "unknown".into()),
    })?;
    let bar = match size {
        Some(n)
            if n > PROGRESS_MIN_BYTES && std::io::IsTerminal::is_terminal(&std::io::stderr()) =>
        {
            let b = indicatif::ProgressBar::new(n);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            Some(b)
        }
        _ => None,
    };
    let mut a = Analyzer::new(link, table);
    // Classic pcap: a 24-byte file header, then 16 bytes before each record.
    let mut offset: u64 = 24;
    let mut stopped = None;
    loop {
        match cap.next_packet() {
            Ok(p) => {
                let h = p.header;
                let ts = h.ts.tv_sec as f64 + h.ts.tv_usec as f64 * 1e-6;
                let ts_us = (h.ts.tv_sec as u64)
                    .wrapping_mul(1_000_000)
                    .wrapping_add(h.ts.tv_usec as u64);
                offset += 16 + u64::from(h.caplen);
                a.add(p.data, h.len, ts, ts_us);
                if let Some(b) = &bar
                    && a.packets().is_multiple_of(PROGRESS_EVERY)
                {
                    b.set_position(offset.min(size.unwrap_or(offset)));
                }
            }
            Err(pcap::Error::NoMorePackets) => break,
            Err(e) => {
                stopped = Some(Stopped {
                    after_packets: a.packets(),
                    offset: classic.then_some(offset),
                    error: match e {
                        pcap::Error::PcapError(s) => s,
                        other => other.to_string(),
                    },
                });
                break;
            }
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(a.report(&what, top, stopped))
}

/// `--output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
    Csv,
}

pub fn print(r: &Report, format: Format, out: &mut dyn Write) -> std::io::Result<()> {
    match format {
        Format::Json => {
            serde_json::to_writer_pretty(&mut *out, r).map_err(std::io::Error::other)?;
            writeln!(out)
        }
        Format::Csv => csv(r, out),
        Format::Table => table_text(r, out),
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// One CSV table for every section: `fwd`/`rev` are ingress/egress for a
/// service, a→b/b→a for a conversation, tx/rx for an address.
fn csv(r: &Report, out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(
        out,
        "section,name,proto,a,a_port,b,b_port,packets,bytes,fwd_packets,fwd_bytes,rev_packets,rev_bytes,syn,fin,rst"
    )?;
    for s in &r.services {
        let (i, e) = (&s.ingress, &s.egress);
        writeln!(
            out,
            "service,{},,,,,,{},{},{},{},{},{},{},{},{}",
            csv_field(&s.service),
            i.packets + e.packets,
            i.bytes + e.bytes,
            i.packets,
            i.bytes,
            e.packets,
            e.bytes,
            i.syn + e.syn,
            i.fin + e.fin,
            i.rst + e.rst
        )?;
    }
    for u in &r.unclassified {
        writeln!(
            out,
            "unclassified,{},,,,,,{},{},,,,,,,",
            u.reason, u.packets, u.bytes
        )?;
    }
    for c in &r.conversations {
        writeln!(
            out,
            "conversation,{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            csv_field(c.service.as_deref().unwrap_or("")),
            c.proto,
            c.a,
            c.a_port,
            c.b,
            c.b_port,
            c.packets,
            c.bytes,
            c.a_to_b_packets,
            c.a_to_b_bytes,
            c.b_to_a_packets,
            c.b_to_a_bytes,
            c.syn,
            c.fin,
            c.rst
        )?;
    }
    for t in &r.top_talkers {
        writeln!(
            out,
            "address,{},,,,,,{},{},{},{},{},{},,,",
            t.address, t.packets, t.bytes, t.tx_packets, t.tx_bytes, t.rx_packets, t.rx_bytes
        )?;
    }
    for p in &r.protocols {
        writeln!(
            out,
            "protocol,{},,,,,,{},{},,,,,,,",
            p.protocol, p.packets, p.bytes
        )?;
    }
    Ok(())
}

/// Columns padded to their widest cell; numbers right-aligned.
/// The CLI's one table renderer, uncoloured; columns of numbers (or `-`)
/// are right-aligned.
fn grid(out: &mut dyn Write, head: &[&str], rows: &[Vec<String>]) -> std::io::Result<()> {
    let right: Vec<usize> = (0..head.len())
        .filter(|&i| {
            !rows.is_empty()
                && rows.iter().all(|r| {
                    r[i].is_empty() || r[i] == "-" || r[i].chars().all(|c| c.is_ascii_digit())
                })
        })
        .collect();
    out.write_all(crate::cli::table(head, rows, &right, None, false).as_bytes())
}

fn endpoint(addr: &str, port: u16, proto: &str) -> String {
    if proto != "tcp" && proto != "udp" {
        return addr.to_string();
    }
    match addr.parse::<IpAddr>() {
        Ok(IpAddr::V6(_)) => format!("[{addr}]:{port}"),
        _ => format!("{addr}:{port}"),
    }
}

/// The services' TCP figures, when any service had TCP segments.
fn tcp_text(r: &Report, out: &mut dyn Write) -> std::io::Result<()> {
    let us = |v: Option<u32>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
    let rows: Vec<Vec<String>> = r
        .services
        .iter()
        .filter_map(|s| s.tcp.as_ref().map(|t| (s, t)))
        .map(|(s, t)| {
            vec![
                s.service.clone(),
                t.established.to_string(),
                t.refused.to_string(),
                t.reset.to_string(),
                t.closed.to_string(),
                t.open.to_string(),
                t.retransmits.to_string(),
                us(t.handshake_p50_us),
                us(t.handshake_p99_us),
            ]
        })
        .collect();
    if rows.is_empty() {
        return Ok(());
    }
    writeln!(
        out,
        "\nTCP (from headers; handshake = SYN to first ACK, in µs; not in a capture: {})",
        r.tcp.unavailable.join(", ")
    )?;
    grid(
        out,
        &[
            "SERVICE",
            "ESTABLISHED",
            "REFUSED",
            "RESET",
            "CLOSED",
            "OPEN",
            "RETRANS",
            "HANDSHAKE P50",
            "HANDSHAKE P99",
        ],
        &rows,
    )
}

fn table_text(r: &Report, out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(
        out,
        "{}: {} packets, {} bytes, {:.3} s, link type {}",
        r.input, r.packets, r.bytes, r.duration_seconds, r.link_type
    )?;
    if let Some(s) = &r.stopped {
        writeln!(
            out,
            "INCOMPLETE: stopped after packet {}{}: {}",
            s.after_packets,
            s.offset
                .map_or(String::new(), |o| format!(" (byte offset {o})")),
            s.error
        )?;
    }
    writeln!(out, "\nSERVICES")?;
    let mut rows: Vec<Vec<String>> = r
        .services
        .iter()
        .map(|s| {
            let (i, e) = (&s.ingress, &s.egress);
            vec![
                s.service.clone(),
                i.packets.to_string(),
                i.bytes.to_string(),
                e.packets.to_string(),
                e.bytes.to_string(),
                (i.syn + e.syn).to_string(),
                (i.fin + e.fin).to_string(),
                (i.rst + e.rst).to_string(),
            ]
        })
        .collect();
    for u in r.unclassified.iter().filter(|u| u.packets > 0) {
        rows.push(vec![
            format!("({})", u.reason),
            u.packets.to_string(),
            u.bytes.to_string(),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
        ]);
    }
    grid(
        out,
        &[
            "SERVICE",
            "PKTS IN",
            "BYTES IN",
            "PKTS OUT",
            "BYTES OUT",
            "SYN",
            "FIN",
            "RST",
        ],
        &rows,
    )?;
    tcp_text(r, out)?;
    writeln!(
        out,
        "\nCONVERSATIONS ({} of {}, by bytes)",
        r.conversations.len(),
        r.conversations_total
    )?;
    let rows: Vec<Vec<String>> = r
        .conversations
        .iter()
        .map(|c| {
            vec![
                c.proto.clone(),
                endpoint(&c.a, c.a_port, &c.proto),
                endpoint(&c.b, c.b_port, &c.proto),
                c.packets.to_string(),
                c.bytes.to_string(),
                c.a_to_b_packets.to_string(),
                c.b_to_a_packets.to_string(),
                format!("{}/{}/{}", c.syn, c.fin, c.rst),
                c.service.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    grid(
        out,
        &[
            "PROTO",
            "A",
            "B",
            "PKTS",
            "BYTES",
            "A>B",
            "B>A",
            "SYN/FIN/RST",
            "SERVICE",
        ],
        &rows,
    )?;
    writeln!(
        out,
        "\nTOP TALKERS ({} of {}, by bytes)",
        r.top_talkers.len(),
        r.addresses_total
    )?;
    let rows: Vec<Vec<String>> = r
        .top_talkers
        .iter()
        .map(|t| {
            vec![
                t.address.clone(),
                t.packets.to_string(),
                t.bytes.to_string(),
                t.tx_packets.to_string(),
                t.tx_bytes.to_string(),
                t.rx_packets.to_string(),
                t.rx_bytes.to_string(),
            ]
        })
        .collect();
    grid(
        out,
        &[
            "ADDRESS", "PKTS", "BYTES", "TX PKTS", "TX BYTES", "RX PKTS", "RX BYTES",
        ],
        &rows,
    )?;
    writeln!(out, "\nPROTOCOLS")?;
    let rows: Vec<Vec<String>> = r
        .protocols
        .iter()
        .map(|p| {
            vec![
                p.protocol.clone(),
                p.packets.to_string(),
                p.bytes.to_string(),
                format!("{:.1}%", 100.0 * p.bytes as f64 / r.bytes.max(1) as f64),
            ]
        })
        .collect();
    grid(out, &["PROTOCOL", "PKTS", "BYTES", "SHARE"], &rows)
}

/// `netpulse analyze`: the arguments and the command.
pub mod cli {
    use std::path::PathBuf;

    use super::{AnalyzeError, Format, Input};

    #[derive(clap::Args)]
    pub struct Args {
        /// The capture file; `-` reads stdin.
        file: String,
        /// Take services from this config file's `[[service]]` tables.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// A service: NAME=PROTO/PORT (web=tcp/80), NAME=PROTO/ADDR:PORT or
        /// NAME=icmp. Repeatable.
        #[arg(long = "service", short = 's', value_name = "NAME=PROTO/PORT")]
        services: Vec<String>,
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
        /// Conversations and addresses to list, largest first (0 = all).
        #[arg(long, default_value_t = 20)]
        top: usize,
    }

    #[derive(Clone, Copy, clap::ValueEnum)]
    enum Output {
        Table,
        Json,
        Csv,
    }

    /// The report on stdout, problems on stderr; the exit code.
    pub fn run(args: Args) -> u8 {
        let fail = |e: AnalyzeError| {
            eprintln!("netpulse analyze: {e}");
            e.exit_code()
        };
        let services = match super::services(args.config.as_deref(), &args.services) {
            Ok(s) => s,
            Err(e) => return fail(e),
        };
        let input = Input::parse(&args.file);
        let report = match super::analyze(&input, super::table(&services), args.top) {
            Ok(r) => r,
            Err(e) => return fail(e),
        };
        let format = match args.output {
            Output::Table => Format::Table,
            Output::Json => Format::Json,
            Output::Csv => Format::Csv,
        };
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        if let Err(e) =
            super::print(&report, format, &mut out).and_then(|()| std::io::Write::flush(&mut out))
        {
            // A closed pipe (`| head`) is the reader's choice, not a failure.
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                eprintln!("netpulse analyze: writing the report: {e}");
                return 1;
            }
        }
        match &report.stopped {
            Some(s) => {
                eprintln!(
                    "netpulse analyze: {}: stopped after packet {}{}: {}",
                    report.input,
                    s.after_packets,
                    s.offset
                        .map_or(String::new(), |o| format!(" at byte offset {o}")),
                    s.error
                );
                1
            }
            None => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_args() {
        let s = service_arg("web=tcp/80").unwrap();
        assert_eq!(s.name, "web");
        assert_eq!(s.endpoints[0].port, 80);
        assert!(s.endpoints[0].wildcard);
        let s = service_arg("dns=udp/10.0.0.1:53").unwrap();
        assert_eq!(
            s.endpoints[0].addrs,
            vec!["10.0.0.1".parse::<IpAddr>().unwrap()]
        );
        let s = service_arg("v6=tcp/[fd00::1]:443").unwrap();
        assert_eq!(
            s.endpoints[0].addrs,
            vec!["fd00::1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(service_arg("ping=icmp").unwrap().endpoints[0].port, 0);
        for bad in [
            "web",
            "web=tcp",
            "web=sctp/1",
            "web=tcp/0",
            "web=tcp/x",
            "~x=tcp/1",
            "=tcp/1",
        ] {
            assert!(service_arg(bad).is_err(), "{bad}");
        }
    }
}
