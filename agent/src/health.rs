//! TCP health and kernel drops, the agent's half: the kernel struct offsets
//! the tracing programs read at (from the running kernel's BTF), loading and
//! attaching those programs feature by feature, the namespaces they watch,
//! reading their per-CPU maps, and seeding the open-connection gauges from
//! the kernel's socket table.
//!
//! Every part is optional: a kernel without BTF or a tracepoint
//! loses that feature (named once in the log and in
//! `netpulse_feature_enabled`), and packet counting goes on.

use std::{collections::BTreeMap, net::IpAddr, path::Path};

use agent_ebpf::{
    DropKey, EndpointKey, NETNS_CONTAINER, NETNS_HOST, Offsets, PROTO_TCP, TCP_COUNTS, TCP_ENDED,
    TCP_ESTABLISHED, TCP_RETRANS, TCP_RETRANS_SYNACK, TCP_SLOTS, TcpCounters, maps, parse::Flow,
    programs,
};
use aya::{
    Btf, Ebpf,
    maps::{HashMap, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues},
    programs::BtfTracePoint,
};
use tracing::{info, warn};

use crate::btf;

/// The features, each a set of programs that only make sense together.
/// `(feature, [(program, tracepoint)])`. All are BTF tracepoints, attached
/// through bpf() links (not perf_event_open, which the unit's
/// `SystemCallFilter` denies).
pub const FEATURES: &[(&str, &[(&str, &str)])] = &[
    (
        "tcp_connections",
        &[
            (programs::SOCK_STATE, "inet_sock_set_state"),
            (programs::DESTROY_SOCK, "tcp_destroy_sock"),
            (programs::RECEIVE_RESET, "tcp_receive_reset"),
            (programs::SEND_RESET, "tcp_send_reset"),
        ],
    ),
    (
        "tcp_retransmits",
        &[
            (programs::RETRANSMIT, "tcp_retransmit_skb"),
            (programs::RETRANSMIT_SYNACK, "tcp_retransmit_synack"),
        ],
    ),
    ("tcp_rtt_live", &[(programs::TCP_PROBE, "tcp_probe")]),
    ("kernel_drops", &[(programs::KFREE_SKB, "kfree_skb")]),
];

/// The parameters each tracepoint must have (their BTF prototype) for the
/// programs' argument reads to be right.
const PROTOTYPES: &[(&str, &[&str])] = &[
    ("inet_sock_set_state", &["sock", "int", "int"]),
    ("tcp_destroy_sock", &["sock"]),
    ("tcp_receive_reset", &["sock"]),
    ("tcp_send_reset", &["sock", "sk_buff"]),
    ("tcp_retransmit_skb", &["sock", "sk_buff"]),
    ("tcp_retransmit_synack", &["sock", "request_sock"]),
    ("tcp_probe", &["sock", "sk_buff"]),
    ("kfree_skb", &["sk_buff", "", "skb_drop_reason"]),
];

/// What the kernel's BTF gave: the offsets (or why not) and the drop
/// reasons' names.
pub struct KernelTypes {
    pub offsets: Result<Offsets, String>,
    pub reasons: BTreeMap<u64, String>,
    pub prototypes_ok: BTreeMap<&'static str, Result<(), String>>,
}

/// Reads the running kernel's BTF once.
pub fn kernel_types() -> KernelTypes {
    let bytes = match std::fs::read(btf::VMLINUX) {
        Ok(b) => b,
        Err(e) => {
            let why = format!("{}: {e}", btf::VMLINUX);
            return KernelTypes {
                offsets: Err(why),
                reasons: BTreeMap::new(),
                prototypes_ok: BTreeMap::new(),
            };
        }
    };
    let (offsets, prototypes_ok, reasons) = match btf::Btf::parse(&bytes) {
        Ok(b) => {
            let values = b.enum_values("skb_drop_reason").unwrap_or_default();
            let consumed = values
                .iter()
                .find(|(_, n)| *n == "SKB_CONSUMED")
                .map(|(v, _)| *v);
            let reasons = btf::drop_reason_names(values);
            let protos = PROTOTYPES
                .iter()
                .map(|(tp, want)| {
                    let ok = match b.tracepoint_params(tp) {
                        None => Err(format!("the kernel has no tracepoint {tp}")),
                        Some(have)
                            if have.len() >= want.len()
                                && have.iter().zip(want.iter()).all(|(h, w)| h == w) =>
                        {
                            Ok(())
                        }
                        Some(have) => Err(format!(
                            "tracepoint {tp} has parameters {have:?}, netpulse reads {want:?}"
                        )),
                    };
                    (*tp, ok)
                })
                .collect();
            (
                offsets(&b, consumed.unwrap_or(1)).map_err(|e| e.to_string()),
                protos,
                reasons,
            )
        }
        Err(e) => (Err(e.to_string()), BTreeMap::new(), BTreeMap::new()),
    };
    KernelTypes {
        offsets,
        reasons,
        prototypes_ok,
    }
}

/// The offsets the tracing programs read at, from `btf`.
pub fn offsets(b: &btf::Btf, reason_consumed: u64) -> Result<Offsets, btf::BtfError> {
    let sc = |m: &str| b.offset("sock_common", m);
    // `possible_net_t` is a struct of one pointer (`net`, at 0) and
    // `struct net`'s inode number sits in its `ns_common`.
    let net_inum = b.offset("net", "ns")? + b.offset("ns_common", "inum")?;
    Ok(Offsets {
        skc_family: sc("skc_family")?,
        skc_state: sc("skc_state")?,
        skc_daddr: sc("skc_daddr")?,
        skc_rcv_saddr: sc("skc_rcv_saddr")?,
        skc_dport: sc("skc_dport")?,
        skc_num: sc("skc_num")?,
        skc_v6_daddr: sc("skc_v6_daddr")?,
        skc_v6_rcv_saddr: sc("skc_v6_rcv_saddr")?,
        skc_net: sc("skc_net")?,
        sk_protocol: b.offset("sock", "sk_protocol")?,
        sk_err: b.offset("sock", "sk_err")?,
        srtt_us: b.offset("tcp_sock", "srtt_us")?,
        net_inum,
        skb_head: b.offset("sk_buff", "head")?,
        skb_network_header: b.offset("sk_buff", "network_header")?,
        skb_protocol: b.offset("sk_buff", "protocol")?,
        skb_dev: b.offset("sk_buff", "dev")?,
        skb_sk: b.offset("sk_buff", "sk")?,
        skb_gso_segs: b.offset("sk_buff", "cb")? + b.offset("tcp_skb_cb", "tcp_gso_segs")?,
        dev_nd_net: b.offset("net_device", "nd_net")?,
        reason_consumed: reason_consumed as u32,
        skb_iif: b.offset("sk_buff", "skb_iif")?,
    })
}

/// One feature's state: on, or off and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Feature {
    pub name: &'static str,
    pub error: Option<String>,
}

/// Loads and attaches every feature's programs in `ebpf` (whose
/// `NP_OFFSETS` the loader set from `types`), each feature on its own: one
/// that fails is logged once and left off.
pub fn attach(ebpf: &mut Ebpf, types: &KernelTypes) -> Vec<Feature> {
    let btf = match &types.offsets {
        Ok(_) => Btf::from_sys_fs().map_err(|e| e.to_string()),
        Err(e) => Err(e.clone()),
    };
    let mut out = Vec::new();
    for (feature, progs) in FEATURES {
        let result = match &btf {
            Err(e) => Err(format!("kernel BTF: {e}")),
            Ok(btf) => progs.iter().try_for_each(|(prog, target)| {
                if let Some(Err(e)) = types.prototypes_ok.get(target) {
                    return Err(e.clone());
                }
                attach_one(ebpf, btf, prog, target)
            }),
        };
        match &result {
            Ok(()) => info!(feature, "TCP health: attached"),
            Err(e) => {
                warn!(feature, error = %e, "TCP health: this feature is off; packet counting goes on")
            }
        }
        out.push(Feature {
            name: feature,
            error: result.err(),
        });
    }
    out
}

fn attach_one(ebpf: &mut Ebpf, btf: &Btf, prog: &str, target: &str) -> Result<(), String> {
    let p = ebpf
        .program_mut(prog)
        .ok_or_else(|| format!("program {prog} missing from the object"))?;
    let err = |what: &str, e: &dyn std::fmt::Display| format!("{what} {prog} on {target}: {e}");
    let p: &mut BtfTracePoint = p.try_into().map_err(|e| err("program type of", &e))?;
    p.load(target, btf).map_err(|e| err("loading", &e))?;
    p.attach().map_err(|e| err("attaching", &e))?;
    Ok(())
}

/// The inode number of a network namespace file (`/proc/<pid>/ns/net`).
pub fn netns_inum(path: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.ino() as u32)
}

/// The namespaces the tracing programs count in: this agent's (the host's)
/// and the known containers'.
pub struct Netns {
    map: HashMap<MapData, u32, u32>,
    written: BTreeMap<u32, u32>,
}

impl Netns {
    pub fn new(ebpf: &mut Ebpf) -> Option<Self> {
        let map = HashMap::try_from(ebpf.take_map(maps::NETNS)?).ok()?;
        let mut n = Netns {
            map,
            written: BTreeMap::new(),
        };
        n.sync(&Default::default());
        Some(n)
    }

    /// Sets the watched namespaces: this process's, and the containers'
    /// (their inode numbers).
    pub fn sync(&mut self, containers: &std::collections::BTreeSet<u32>) {
        let mut want: BTreeMap<u32, u32> =
            containers.iter().map(|i| (*i, NETNS_CONTAINER)).collect();
        if let Some(i) = netns_inum(Path::new("/proc/self/ns/net")) {
            want.insert(i, NETNS_HOST);
        }
        // How many containers: the programs' port pre-filter is off while
        // any is watched (containers are matched by address).
        want.insert(agent_ebpf::NETNS_CONTAINERS_KEY, containers.len() as u32);
        for k in self.written.keys() {
            if !want.contains_key(k) {
                let _ = self.map.remove(k);
            }
        }
        for (k, v) in &want {
            if self.written.get(k) != Some(v)
                && let Err(e) = self.map.insert(k, v, 0)
            {
                warn!(error = %e, "TCP health: cannot watch a network namespace");
            }
        }
        self.written = want;
    }
}

/// Read-only handles on the pinned TCP and drop maps.
pub struct Reader {
    tcp: PerCpuArray<MapData, TcpCounters>,
    drops: PerCpuHashMap<MapData, DropKey, u64>,
    meta: PerCpuArray<MapData, u64>,
}

impl Reader {
    pub fn open(pin_dir: &Path) -> Result<Self, String> {
        let data =
            |name: &str| MapData::from_pin(pin_dir.join(name)).map_err(|e| format!("{name}: {e}"));
        Ok(Reader {
            tcp: PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data(maps::TCP)?))
                .map_err(|e| e.to_string())?,
            drops: PerCpuHashMap::try_from(aya::maps::Map::PerCpuHashMap(data(maps::DROPS)?))
                .map_err(|e| e.to_string())?,
            meta: PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data(maps::TCP_META)?))
                .map_err(|e| e.to_string())?,
        })
    }

    /// One slot's figures, summed over CPUs; `None` past the TCP slots.
    pub fn tcp(&self, slot: u32) -> Option<TcpCounters> {
        if slot >= TCP_SLOTS {
            return None;
        }
        let mut sum = TcpCounters::default();
        for v in self.tcp.get(&slot, 0).ok()?.iter() {
            sum.add(v);
        }
        Some(sum)
    }

    /// Every (slot, direction, reason) with its drops, summed over CPUs.
    pub fn drops(&self) -> Vec<(DropKey, u64)> {
        self.drops
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (k, v.iter().fold(0u64, |a, b| a.wrapping_add(*b))))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// The programs' own counters (`META_*`), summed over CPUs.
    pub fn meta(&self, i: u32) -> u64 {
        self.meta
            .get(&i, 0)
            .map(|v| v.iter().fold(0u64, |a, b| a.wrapping_add(*b)))
            .unwrap_or(0)
    }
}

/// Zeroes a slot's TCP figures and drops before the slot is given to
/// another service.
pub fn zero_slot(pin_dir: &Path, slot: u32, ncpus: usize) -> Result<(), String> {
    if slot >= TCP_SLOTS {
        return Ok(());
    }
    let data = MapData::from_pin(pin_dir.join(maps::TCP)).map_err(|e| e.to_string())?;
    let mut tcp: PerCpuArray<MapData, TcpCounters> =
        PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data)).map_err(|e| e.to_string())?;
    let zeros =
        PerCpuValues::try_from(vec![TcpCounters::default(); ncpus]).map_err(|e| e.to_string())?;
    tcp.set(slot, zeros, 0).map_err(|e| e.to_string())?;
    let data = MapData::from_pin(pin_dir.join(maps::DROPS)).map_err(|e| e.to_string())?;
    let mut drops: PerCpuHashMap<MapData, DropKey, u64> =
        PerCpuHashMap::try_from(aya::maps::Map::PerCpuHashMap(data)).map_err(|e| e.to_string())?;
    let keys: Vec<DropKey> = drops
        .keys()
        .filter_map(Result::ok)
        .filter(|k| k.slot == slot)
        .collect();
    for k in keys {
        let _ = drops.remove(&k);
    }
    Ok(())
}

/// The `q` quantile of a histogram, interpolated within its bucket as
/// Prometheus' `histogram_quantile` does (the +Inf bucket answers its lower
/// bound); `None` when it is empty.
pub fn quantile(h: &agent_ebpf::Hist, q: f64) -> Option<f64> {
    let total = h.count();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut below = 0u64;
    for (i, n) in h.buckets.iter().enumerate() {
        let upto = below + n;
        if (upto as f64) >= rank && *n > 0 {
            let lo = if i == 0 {
                0.0
            } else {
                agent_ebpf::HIST_BOUNDS_US[i - 1] as f64
            };
            let Some(hi) = agent_ebpf::HIST_BOUNDS_US.get(i) else {
                return Some(lo / 1e6);
            };
            let frac = (rank - below as f64) / *n as f64;
            return Some((lo + (*hi as f64 - lo) * frac) / 1e6);
        }
        below = upto;
    }
    None
}

/// Retransmitted segments of a slot (data segments and SYN-ACKs).
pub fn retransmits(c: &TcpCounters) -> u64 {
    c.counts[TCP_RETRANS].wrapping_add(c.counts[TCP_RETRANS_SYNACK])
}

/// The established connections counted so far minus those that ended:
/// the open gauge before its seed.
pub fn open_counted(c: &TcpCounters) -> i64 {
    c.counts[TCP_ESTABLISHED].wrapping_sub(c.counts[TCP_ENDED]) as i64
}

const _: () = assert!(TCP_COUNTS > TCP_RETRANS_SYNACK);

/// Connections in the kernel's table now (`/proc/net/tcp` and `tcp6` of
/// this namespace) in ESTABLISHED (what the programs count as open), per
/// slot, as the tracing programs
/// attribute them: a local service at the local end, else a remote one at
/// the other.
pub fn open_in_kernel(table: &BTreeMap<EndpointKey, u32>) -> BTreeMap<u32, i64> {
    let t = crate::packet::Table::with_slots(table.iter().map(|(k, v)| (*k, *v)));
    let mut out = BTreeMap::new();
    for (path, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        let Ok(text) = std::fs::read_to_string(path) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 4 {
                continue;
            }
            let Ok(state) = u8::from_str_radix(f[3], 16) else {
                continue;
            };
            if state != 1 {
                continue;
            }
            let (Some(l), Some(r)) = (proc_addr(f[1], v6), proc_addr(f[2], v6)) else {
                continue;
            };
            let mut flow = Flow {
                proto: PROTO_TCP,
                ..Flow::default()
            };
            set_ends(&mut flow, l, r);
            // As if it arrived: the local end is the destination; a local
            // service there, else a remote one at the source.
            let (slot, _) = agent_ebpf::classify::classify(&t, &flow, agent_ebpf::DIR_INGRESS);
            if slot >= agent_ebpf::FIRST_SERVICE_SLOT {
                *out.entry(slot).or_insert(0) += 1;
            }
        }
    }
    out
}

/// Puts local end `l` at the destination and remote end `r` at the source,
/// IPv4-mapped IPv6 addresses as IPv4.
fn set_ends(flow: &mut Flow, l: (IpAddr, u16), r: (IpAddr, u16)) {
    let canon = |a: IpAddr| match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(a, IpAddr::V4),
        v4 => v4,
    };
    let (la, ra) = (canon(l.0), canon(r.0));
    let words = |a: IpAddr| -> [u32; 4] {
        let mut k = EndpointKey::default();
        match a {
            IpAddr::V4(v) => k.set_addr(&v.octets()),
            IpAddr::V6(v) => k.set_addr(&v.octets()),
        }
        k.addr
    };
    flow.family = if la.is_ipv4() {
        agent_ebpf::FAMILY_V4
    } else {
        agent_ebpf::FAMILY_V6
    };
    flow.dst = words(la);
    flow.src = words(ra);
    flow.dport = l.1;
    flow.sport = r.1;
}

/// An address of `/proc/net/tcp*`: hex words in host byte order, `:port`.
fn proc_addr(s: &str, v6: bool) -> Option<(IpAddr, u16)> {
    let (a, p) = s.split_once(':')?;
    let port = u16::from_str_radix(p, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        Some(
            u32::from_str_radix(a.get(i * 8..i * 8 + 8)?, 16)
                .ok()?
                .to_ne_bytes(),
        )
    };
    let addr = if v6 {
        let mut b = [0u8; 16];
        for i in 0..4 {
            b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
        }
        IpAddr::from(b)
    } else {
        IpAddr::from(word(0)?)
    };
    Some((addr, port))
}

/// The health checks' watch list (`NP_WATCH`): each check's flows while it
/// runs, on which the drop and reset programs report. One per process, like
/// the kernel map it stands for; set once the `kernel_drops` programs are
/// attached (without them no check can say "nothing dropped here").
pub struct Watch {
    map: std::sync::Mutex<WatchMap>,
    ncpus: usize,
    reasons: std::sync::Arc<BTreeMap<u64, String>>,
}

type WatchMap = PerCpuHashMap<MapData, agent_ebpf::WatchKey, agent_ebpf::WatchStats>;

static WATCH: std::sync::OnceLock<Watch> = std::sync::OnceLock::new();

/// The watch list, if the kernel's drop view is on in this process.
pub fn watch() -> Option<&'static Watch> {
    WATCH.get()
}

impl Watch {
    /// Opens the pinned watch list and makes it this process's.
    pub fn install(
        pin_dir: &Path,
        reasons: std::sync::Arc<BTreeMap<u64, String>>,
    ) -> Result<(), String> {
        let data = MapData::from_pin(pin_dir.join(maps::WATCH))
            .map_err(|e| format!("{}: {e}", maps::WATCH))?;
        let mut map: WatchMap = PerCpuHashMap::try_from(aya::maps::Map::PerCpuHashMap(data))
            .map_err(|e| e.to_string())?;
        let ncpus = aya::util::nr_cpus().map_err(|(what, e)| format!("{what}: {e}"))?;
        // Flows of a previous agent's checks that it never took back.
        let stale: Vec<_> = map.keys().filter_map(Result::ok).collect();
        for k in stale {
            let _ = map.remove(&k);
        }
        let _ = WATCH.set(Watch {
            map: std::sync::Mutex::new(map),
            ncpus,
            reasons,
        });
        Ok(())
    }

    fn map(&self) -> std::sync::MutexGuard<'_, WatchMap> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts watching a flow; false if the list is full.
    pub fn add(&self, key: &agent_ebpf::WatchKey) -> bool {
        let Ok(zeros) = PerCpuValues::try_from(vec![agent_ebpf::WatchStats::default(); self.ncpus])
        else {
            return false;
        };
        self.map().insert(key, zeros, 0).is_ok()
    }

    /// What the kernel saw of a flow (summed over CPUs), and stops watching
    /// it.
    pub fn take(&self, key: &agent_ebpf::WatchKey) -> Option<agent_ebpf::WatchStats> {
        let mut map = self.map();
        let per_cpu = map.get(key, 0).ok();
        let _ = map.remove(key);
        let mut sum = agent_ebpf::WatchStats::default();
        for v in per_cpu?.iter() {
            for d in 0..2 {
                sum.drops[d] += v.drops[d];
                if v.reason[d] != 0 {
                    sum.reason[d] = v.reason[d];
                }
            }
            sum.resets += v.resets;
            sum.received |= v.received;
        }
        Some(sum)
    }

    /// A drop reason's name (see [`reason_name`]).
    pub fn reason(&self, r: u32) -> String {
        reason_name(&self.reasons, r)
    }
}

/// A drop reason's name in lower case, without `SKB_DROP_REASON_`, from the
/// kernel's names (`reason_<n>` for a number the kernel's BTF did not name).
pub fn reason_name(reasons: &BTreeMap<u64, String>, r: u32) -> String {
    reasons
        .get(&u64::from(r))
        .cloned()
        .unwrap_or_else(|| format!("reason_{r}"))
}

/// The watch-list key of a flow from local port `lport` to `remote`.
pub fn watch_key(proto: u8, lport: u16, remote: std::net::SocketAddr) -> agent_ebpf::WatchKey {
    let (family, raddr) = match remote.ip() {
        IpAddr::V4(a) => (
            agent_ebpf::FAMILY_V4,
            [u32::from_ne_bytes(a.octets()), 0, 0, 0],
        ),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => (
                agent_ebpf::FAMILY_V4,
                [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
            ),
            None => {
                let o = a.octets();
                let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                (agent_ebpf::FAMILY_V6, [w(0), w(4), w(8), w(12)])
            }
        },
    };
    agent_ebpf::WatchKey {
        raddr,
        family,
        proto,
        lport,
        rport: remote.port(),
        _pad: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_within_the_bucket_like_prometheus() {
        let mut h = agent_ebpf::Hist::default();
        assert_eq!(quantile(&h, 0.5), None);
        // 10 values in (8, 16] µs, 10 in (16, 32] µs.
        for _ in 0..10 {
            h.record(12);
            h.record(20);
        }
        let p50 = quantile(&h, 0.5).unwrap();
        assert!((p50 - 16e-6).abs() < 1e-12, "{p50}");
        let p99 = quantile(&h, 0.99).unwrap();
        assert!((p99 - (16.0 + 16.0 * 0.98) * 1e-6).abs() < 1e-12, "{p99}");
        // Past the last bound: its lower bound.
        let mut big = agent_ebpf::Hist::default();
        big.record(60_000_000);
        assert_eq!(quantile(&big, 0.99), Some(10.0));
    }

    #[test]
    fn proc_net_tcp_addresses_read_as_the_kernel_writes_them() {
        // 127.0.0.1:8080 as /proc/net/tcp prints it on little-endian hosts.
        let (a, p) = proc_addr("0100007F:1F90", false).unwrap();
        assert_eq!((a, p), ("127.0.0.1".parse().unwrap(), 8080));
        let (a, _) = proc_addr("0000000000000000FFFF00000100007F:0050", true).unwrap();
        assert_eq!(a, "::ffff:127.0.0.1".parse::<IpAddr>().unwrap());
        assert!(proc_addr("zz:1", false).is_none());
    }

    #[test]
    fn the_running_kernel_has_every_offset_and_prototype() {
        let t = kernel_types();
        assert!(t.offsets.is_ok(), "{:?}", t.offsets);
        for (tp, ok) in &t.prototypes_ok {
            assert!(ok.is_ok(), "{tp}: {ok:?}");
        }
        assert_eq!(t.prototypes_ok.len(), PROTOTYPES.len());
    }
}
