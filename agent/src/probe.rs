//! Loads the kernel programs, attaches them to interfaces and is the only
//! door to their maps: the service table written by `identity`, the per-CPU
//! counters read by `metrics`, and the pinned slot names that let a restarted
//! agent continue where the last one stopped.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

use agent_ebpf::{
    EndpointKey, FAMILY_V4, FIRST_SERVICE_SLOT, Group4, Group6, Key4, Key6, LAYOUT_VERSION,
    MAX_ADDRS, MAX_ENDPOINTS, MAX_GROUPS, MAX_SLOTS, MAX_VETHS, NAME_LEN, PORT_INDEX_LEN,
    ServiceRef, SlotCounters, SlotName, VethSlot,
    layout::{self, GroupIds, Layout},
    maps, programs,
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuValues},
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode, tc::SchedClassifierLinkId, xdp::XdpLinkId,
    },
    util::nr_cpus,
};
use tracing::{info, warn};

/// The object built by agent/build.rs (empty under AYA_BUILD_SKIP=1).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netpulse"));

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(
        "this netpulse binary was built without its eBPF programs (AYA_BUILD_SKIP=1); rebuild without it"
    )]
    NoObject,
    #[error("bpffs is not mounted at {0}: mount it with `mount -t bpf bpf /sys/fs/bpf`")]
    NoBpffs(PathBuf),
    #[error("cannot create pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("map {0} is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("program {0} is missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("interface {name}: {message}")]
    Attach { name: String, message: String },
    #[error("counting CPUs: {0}")]
    Cpus(String),
    #[error("the pcap backend runs no eBPF programs")]
    NotKernel,
}

type Result<T> = std::result::Result<T, ProbeError>;

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> ProbeError {
    move |source| ProbeError::Map { name, source }
}

fn prog_err(name: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> ProbeError {
    move |source| ProbeError::Program { name, source }
}

/// The embedded eBPF object (empty when built with AYA_BUILD_SKIP=1).
pub fn object() -> &'static [u8] {
    OBJECT
}

/// Which program a test run goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// XDP, on the way in.
    Xdp,
    /// TC clsact egress, on the way out.
    Tc,
    /// TC ingress on a host interface without native XDP.
    TcIn,
    /// TC ingress on a container's host-side veth: what the container sends.
    CtFrom,
    /// TC egress on a container's host-side veth: what the container receives.
    CtTo,
}

impl Hook {
    fn program(self) -> &'static str {
        match self {
            Hook::Xdp => programs::XDP_INGRESS,
            Hook::Tc => programs::TC_EGRESS,
            Hook::TcIn => programs::TC_INGRESS,
            Hook::CtFrom => programs::CT_FROM,
            Hook::CtTo => programs::CT_TO,
        }
    }
}

pub use crate::interfaces::Zone;

/// Size of the kernel's `struct __sk_buff` and where `gso_segs` sits in it
/// (include/uapi/linux/bpf.h); BPF_PROG_TEST_RUN takes it as the context.
const SKB_CTX_LEN: usize = 192;
const SKB_CTX_GSO_SEGS: usize = 164;

/// One interface with its two programs.
#[derive(Debug)]
pub struct Attachment {
    pub ifindex: u32,
    pub zone: Zone,
    links: Links,
}

#[derive(Debug)]
enum Links {
    /// Native XDP in, TC out.
    Host {
        xdp: XdpLinkId,
        tc: SchedClassifierLinkId,
    },
    /// TC both ways, where the driver has no native XDP.
    HostTc {
        ingress: SchedClassifierLinkId,
        tc: SchedClassifierLinkId,
    },
    Container {
        from: SchedClassifierLinkId,
        to: SchedClassifierLinkId,
    },
    /// libpcap captures (the pcap backend).
    Pcap,
}

impl Attachment {
    /// (hook, mode) of each program on the interface, as exported in
    /// `netpulse_probe_attached`.
    pub fn hooks(&self) -> [(&'static str, &'static str); 2] {
        match &self.links {
            Links::Host { .. } => [("xdp", "native"), ("tc", "egress")],
            Links::HostTc { .. } | Links::Container { .. } => [("tc", "ingress"), ("tc", "egress")],
            Links::Pcap => [("pcap", "ingress"), ("pcap", "egress")],
        }
    }
}

/// Brings a kernel map from `written` (what it holds) to `want`: entries
/// that left go first (a look-up then misses, which is right for what is
/// leaving), then new and changed ones. `apply(key, None)` removes,
/// `apply(key, Some(value))` writes; `written` follows each step, so a
/// failure part-way leaves it true to the kernel. Returns how many entries
/// changed.
fn reconcile<K: Ord + Copy, V: PartialEq + Copy>(
    written: &mut BTreeMap<K, V>,
    want: &BTreeMap<K, V>,
    mut apply: impl FnMut(K, Option<V>) -> Result<()>,
) -> Result<usize> {
    let gone: Vec<K> = written
        .keys()
        .filter(|k| !want.contains_key(k))
        .copied()
        .collect();
    let mut changes = 0;
    for k in gone {
        apply(k, None)?;
        written.remove(&k);
        changes += 1;
    }
    for (k, v) in want {
        if written.get(k) != Some(v) {
            apply(*k, Some(*v))?;
            written.insert(*k, *v);
            changes += 1;
        }
    }
    Ok(changes)
}

/// A removal that found nothing to remove is done.
fn removed(
    r: std::result::Result<(), aya::maps::MapError>,
) -> std::result::Result<(), aya::maps::MapError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        r => r,
    }
}

/// Writes the groups of `want` that differ from `written`; returns how many.
fn write_groups<T: aya::Pod + PartialEq>(
    map: &mut Array<MapData, T>,
    written: &mut BTreeMap<u32, T>,
    want: &BTreeMap<u32, T>,
    name: &'static str,
) -> Result<usize> {
    let mut n = 0;
    for (g, grp) in want {
        if written.get(g) != Some(grp) {
            map.set(*g, *grp, 0).map_err(map_err(name))?;
            written.insert(*g, *grp);
            n += 1;
        }
    }
    Ok(n)
}

/// Empties the groups in `written` that `want` no longer has.
fn clear_groups<T: aya::Pod + Default>(
    map: &mut Array<MapData, T>,
    written: &mut BTreeMap<u32, T>,
    want: &BTreeMap<u32, T>,
    name: &'static str,
) -> Result<()> {
    let unused: Vec<u32> = written
        .keys()
        .filter(|g| !want.contains_key(g))
        .copied()
        .collect();
    for g in unused {
        map.set(g, T::default(), 0).map_err(map_err(name))?;
        written.remove(&g);
    }
    Ok(())
}

/// Group ids and positions as last written, kept where they can be.
struct StableGroups<'a> {
    old: &'a Written,
    used: std::collections::BTreeSet<u32>,
}

impl<'a> StableGroups<'a> {
    fn new(old: &'a Written) -> Self {
        StableGroups {
            old,
            used: old.group_of.values().copied().collect(),
        }
    }
}

impl GroupIds for StableGroups<'_> {
    fn id(&mut self, index: u32) -> Option<u32> {
        self.old.group_of.get(&index).copied().or_else(|| {
            let g = (1..MAX_GROUPS).find(|g| !self.used.contains(g))?;
            self.used.insert(g);
            Some(g)
        })
    }

    fn previous(&self, g: u32, v6: bool) -> Option<Vec<Option<[u32; 4]>>> {
        if v6 {
            self.old.groups6.get(&g).map(layout::entries)
        } else {
            self.old.groups4.get(&g).map(layout::entries)
        }
    }
}

/// The classification tables as last written, by structure.
#[derive(Default)]
struct Written {
    /// The logical endpoint → slot table.
    table: BTreeMap<EndpointKey, u32>,
    /// Entries of the per-family hash tables.
    hash: BTreeMap<EndpointKey, u32>,
    ports: BTreeMap<u32, u64>,
    groups4: BTreeMap<u32, Group4>,
    groups6: BTreeMap<u32, Group6>,
    /// Port index → its address group id.
    group_of: BTreeMap<u32, u32>,
    /// Container addresses.
    addrs: BTreeMap<IpAddr, u32>,
    /// Container veths, by their position in `NP_VETHS`.
    veths: BTreeMap<u32, VethSlot>,
}

/// An address as the kernel programs compare it: the wire bytes as words.
fn addr4(a: std::net::Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

fn addr6(a: std::net::Ipv6Addr) -> [u32; 4] {
    let mut k = EndpointKey::default();
    k.set_addr(&a.octets());
    k.addr
}

fn addrs_map(a: &IpAddr) -> &'static str {
    if a.is_ipv4() {
        maps::ADDRS4
    } else {
        maps::ADDRS6
    }
}

/// The kernel programs and their maps.
pub struct Kernel {
    ebpf: Ebpf,
    services4: HashMap<MapData, Key4, ServiceRef>,
    services6: HashMap<MapData, Key6, ServiceRef>,
    counters_xdp: PerCpuArray<MapData, SlotCounters>,
    counters_tc: PerCpuArray<MapData, SlotCounters>,
    ports: Array<MapData, u64>,
    groups4: Array<MapData, Group4>,
    groups6: Array<MapData, Group6>,
    addrs4: HashMap<MapData, u32, ServiceRef>,
    addrs6: HashMap<MapData, [u32; 4], ServiceRef>,
    veths: Array<MapData, VethSlot>,
    /// What this agent wrote to the (unpinned) tables: they start empty with
    /// every load, so this copy is exact.
    written: Written,
    names: Array<MapData, SlotName>,
    ncpus: usize,
    pin_dir: PathBuf,
    attached: BTreeMap<String, Attachment>,
    /// TCP health: the features as they loaded, the namespaces watched,
    /// the kernel's drop reasons, and the open-connection seeds.
    health: Health,
    /// Who talks to whom: the named-peer table (see `peers`); None if its
    /// maps could not be opened (packet counting goes on).
    peers: Option<crate::peers::Writer>,
    /// This host's addresses as the last peer sync read them (readers use
    /// this copy: reading them costs a netlink dump, slow while links
    /// change).
    host_addrs: std::sync::Arc<std::collections::BTreeSet<std::net::IpAddr>>,
}

/// The TCP health part of [`Kernel`] (see `health`).
pub struct Health {
    pub features: Vec<crate::health::Feature>,
    netns: Option<crate::health::Netns>,
    pub reasons: std::sync::Arc<BTreeMap<u64, String>>,
    /// Per slot: the connections open at start (from the kernel's socket
    /// table) minus those the counters showed open then.
    pub open_seed: Option<std::sync::Arc<BTreeMap<u32, i64>>>,
}

/// Counters of one slot, summed over CPUs and over both hooks.
pub type Counts = SlotCounters;

/// One slot of a per-CPU counter array, summed over CPUs.
fn sum_cpus(
    map: &PerCpuArray<MapData, SlotCounters>,
    name: &'static str,
    slot: u32,
) -> Result<SlotCounters> {
    let mut sum = SlotCounters::default();
    for v in map.get(&slot, 0).map_err(map_err(name))?.iter() {
        sum.add(v);
    }
    Ok(sum)
}

/// A read-only handle on the counters, whichever backend counts: what
/// /metrics, the API and the history sampler read. It is separate from the
/// [`Probe`] (the writer), so reading never waits for a table update or an
/// interface attach.
pub enum Counters {
    /// The pinned per-CPU arrays: receive path (XDP, TC ingress) and
    /// transmit path (TC egress).
    Kernel(Box<KernelCounters>),
    Pcap(crate::pcap_backend::Reader),
}

pub struct KernelCounters {
    xdp: PerCpuArray<MapData, SlotCounters>,
    tc: PerCpuArray<MapData, SlotCounters>,
    health: Option<crate::health::Reader>,
    peers: Option<crate::peers::Reader>,
}

impl Counters {
    /// One slot, both paths summed.
    pub fn counts(&self, slot: u32) -> Result<Counts> {
        let (mut rx, tx) = self.paths(slot)?;
        rx.add(&tx);
        Ok(rx)
    }

    /// (receive path, transmit path) of one slot.
    fn paths(&self, slot: u32) -> Result<(SlotCounters, SlotCounters)> {
        match self {
            Counters::Kernel(k) => Ok((
                sum_cpus(&k.xdp, maps::COUNTERS_XDP, slot)?,
                sum_cpus(&k.tc, maps::COUNTERS_TC, slot)?,
            )),
            Counters::Pcap(r) => Ok(r.counts(slot)),
        }
    }

    /// The reserved slots: (slot, receive path, transmit path).
    pub fn reserved_counts(&self) -> Result<Vec<(u32, SlotCounters, SlotCounters)>> {
        agent_ebpf::RESERVED_SLOTS
            .iter()
            .map(|(slot, _)| {
                let (rx, tx) = self.paths(*slot)?;
                Ok((*slot, rx, tx))
            })
            .collect()
    }

    /// Packets libpcap dropped, by interface (the pcap backend only).
    pub fn capture_drops(&self) -> BTreeMap<String, u64> {
        match self {
            Counters::Kernel(_) => BTreeMap::new(),
            Counters::Pcap(r) => r.dropped(),
        }
    }

    /// A slot's TCP figures (`client`: its side is this host's client
    /// side); `None` when this backend or kernel has none. Retransmits are
    /// this host's own, as the kernel counts them: on the pcap backend, the
    /// direction this host sends in.
    pub fn tcp(&self, slot: u32, client: bool) -> Option<agent_ebpf::TcpCounters> {
        match self {
            Counters::Kernel(k) => k.health.as_ref()?.tcp(slot),
            Counters::Pcap(r) => {
                let mut c = r.tcp(slot)?;
                let [toward, from] = r.tcp_retransmits(slot);
                c.counts[agent_ebpf::TCP_RETRANS] = if client { toward } else { from };
                c.counts[agent_ebpf::TCP_RETRANS_SYNACK] = 0;
                Some(c)
            }
        }
    }

    /// Which TCP figures this backend cannot give (empty: all of them).
    pub fn tcp_unavailable(&self) -> &'static [&'static str] {
        match self {
            Counters::Kernel(_) => &[],
            Counters::Pcap(_) => crate::tcp_track::UNAVAILABLE,
        }
    }

    /// Kernel drops by (slot, direction, reason).
    pub fn drops(&self) -> Vec<(agent_ebpf::DropKey, u64)> {
        match self {
            Counters::Kernel(k) => k.health.as_ref().map(|h| h.drops()).unwrap_or_default(),
            Counters::Pcap(_) => Vec::new(),
        }
    }

    /// The per-peer counters (the eBPF backend only).
    pub fn peers(&self) -> Option<&crate::peers::Reader> {
        match self {
            Counters::Kernel(k) => k.peers.as_ref(),
            Counters::Pcap(_) => None,
        }
    }

    /// Drops the kernel programs could not record (their map was full).
    pub fn drops_unrecorded(&self) -> u64 {
        match self {
            Counters::Kernel(k) => k
                .health
                .as_ref()
                .map_or(0, |h| h.meta(agent_ebpf::META_DROPS_UNRECORDED)),
            Counters::Pcap(_) => 0,
        }
    }
}

impl Kernel {
    /// Loads both programs with their maps pinned under
    /// `<pin_root>/v<LAYOUT_VERSION>/` (reusing pinned maps if present).
    pub fn load(pin_root: &Path) -> Result<Self> {
        Self::load_object(OBJECT, pin_root)
    }

    pub fn load_object(object: &[u8], pin_root: &Path) -> Result<Self> {
        if object.is_empty() {
            return Err(ProbeError::NoObject);
        }
        check_bpffs(pin_root)?;
        let pin_dir = pin_root.join(format!("v{LAYOUT_VERSION}"));
        std::fs::create_dir_all(&pin_dir).map_err(|source| ProbeError::PinDir {
            path: pin_dir.clone(),
            source,
        })?;
        let types = crate::health::kernel_types();
        let offsets = types
            .offsets
            .clone()
            .unwrap_or(agent_ebpf::Offsets::UNKNOWN);
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pin_dir)
            .override_global(agent_ebpf::OFFSETS_GLOBAL, &offsets, true)
            .load(object)?;
        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or(ProbeError::MissingMap(name))
        };
        let services4 = HashMap::try_from(take(&mut ebpf, maps::SERVICES4)?)
            .map_err(map_err(maps::SERVICES4))?;
        let services6 = HashMap::try_from(take(&mut ebpf, maps::SERVICES6)?)
            .map_err(map_err(maps::SERVICES6))?;
        let counters_xdp = PerCpuArray::try_from(take(&mut ebpf, maps::COUNTERS_XDP)?)
            .map_err(map_err(maps::COUNTERS_XDP))?;
        let counters_tc = PerCpuArray::try_from(take(&mut ebpf, maps::COUNTERS_TC)?)
            .map_err(map_err(maps::COUNTERS_TC))?;
        let ports = Array::try_from(take(&mut ebpf, maps::PORTS)?).map_err(map_err(maps::PORTS))?;
        let groups4 =
            Array::try_from(take(&mut ebpf, maps::GROUPS4)?).map_err(map_err(maps::GROUPS4))?;
        let groups6 =
            Array::try_from(take(&mut ebpf, maps::GROUPS6)?).map_err(map_err(maps::GROUPS6))?;
        let names = Array::try_from(take(&mut ebpf, maps::SLOT_NAMES)?)
            .map_err(map_err(maps::SLOT_NAMES))?;
        let addrs4 =
            HashMap::try_from(take(&mut ebpf, maps::ADDRS4)?).map_err(map_err(maps::ADDRS4))?;
        let addrs6 =
            HashMap::try_from(take(&mut ebpf, maps::ADDRS6)?).map_err(map_err(maps::ADDRS6))?;
        let veths = Array::try_from(take(&mut ebpf, maps::VETHS)?).map_err(map_err(maps::VETHS))?;
        for name in [
            programs::XDP_INGRESS,
            programs::TC_EGRESS,
            programs::TC_INGRESS,
            programs::CT_FROM,
            programs::CT_TO,
        ] {
            let prog = ebpf
                .program_mut(name)
                .ok_or(ProbeError::MissingProgram(name))?;
            match name {
                programs::XDP_INGRESS => {
                    let p: &mut Xdp = prog.try_into().map_err(prog_err(name))?;
                    p.load().map_err(prog_err(name))?;
                }
                _ => {
                    let p: &mut SchedClassifier = prog.try_into().map_err(prog_err(name))?;
                    p.load().map_err(prog_err(name))?;
                }
            }
        }
        let ncpus = nr_cpus().map_err(|(what, e)| ProbeError::Cpus(format!("{what}: {e}")))?;
        let netns = crate::health::Netns::new(&mut ebpf);
        let features = crate::health::attach(&mut ebpf, &types);
        let reasons = std::sync::Arc::new(types.reasons);
        // The checks' watch list reports drops: only with their program on.
        if features
            .iter()
            .any(|f| f.name == "kernel_drops" && f.error.is_none())
            && let Err(e) = crate::health::Watch::install(&pin_dir, reasons.clone())
        {
            warn!(error = %e, "health checks: the kernel's view of their flows is off");
        }
        let health = Health {
            features,
            netns,
            reasons,
            open_seed: None,
        };
        let peers = match crate::peers::Writer::open(&pin_dir, ncpus) {
            Ok(w) => Some(w),
            Err(e) => {
                warn!(error = %e, "peers: cannot open their maps; the service map stays empty");
                None
            }
        };
        Ok(Self {
            ebpf,
            services4,
            services6,
            counters_xdp,
            counters_tc,
            ports,
            groups4,
            groups6,
            addrs4,
            addrs6,
            veths,
            written: Written::default(),
            names,
            ncpus,
            pin_dir,
            attached: BTreeMap::new(),
            health,
            peers,
            host_addrs: Default::default(),
        })
    }

    /// Names the peers the tables know (see `peers::named_addresses`):
    /// after each change of the service table or the container addresses.
    fn sync_peers(&mut self) {
        if let Some(p) = &mut self.peers {
            self.host_addrs = std::sync::Arc::new(crate::peers::host_addrs());
            let want = crate::peers::named_addresses(
                &self.written.table,
                &self.written.addrs,
                &self.host_addrs,
            );
            p.sync(&want);
        }
    }

    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Watches these containers' namespaces too (see `health::Netns`).
    pub fn sync_netns(&mut self, containers: &std::collections::BTreeSet<u32>) {
        if let Some(n) = &mut self.health.netns {
            n.sync(containers);
        }
    }

    /// Seeds the open-connection gauges once, from the kernel's socket
    /// table as the current service table attributes it.
    fn seed_open(&mut self, table: &BTreeMap<EndpointKey, u32>) {
        if self.health.open_seed.is_some() {
            return;
        }
        let Ok(reader) = crate::health::Reader::open(&self.pin_dir) else {
            return;
        };
        let now = crate::health::open_in_kernel(table);
        let mut seed = BTreeMap::new();
        for slot in table
            .values()
            .copied()
            .collect::<std::collections::BTreeSet<u32>>()
        {
            let counted = reader
                .tcp(slot)
                .map_or(0, |c| crate::health::open_counted(&c));
            let have = now.get(&slot).copied().unwrap_or(0);
            if have != counted {
                seed.insert(slot, have - counted);
            }
        }
        self.health.open_seed = Some(std::sync::Arc::new(seed));
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    fn xdp(&mut self) -> Result<&mut Xdp> {
        let name = programs::XDP_INGRESS;
        self.ebpf
            .program_mut(name)
            .ok_or(ProbeError::MissingProgram(name))?
            .try_into()
            .map_err(prog_err(name))
    }

    fn classifier(&mut self, name: &'static str) -> Result<&mut SchedClassifier> {
        self.ebpf
            .program_mut(name)
            .ok_or(ProbeError::MissingProgram(name))?
            .try_into()
            .map_err(prog_err(name))
    }

    /// Attaches to `ifname`: on a host interface XDP (native, else TC
    /// ingress) and TC egress, on a container veth TC both ways.
    pub fn attach(&mut self, ifname: &str, zone: Zone) -> Result<&Attachment> {
        let err = |message: String| ProbeError::Attach {
            name: ifname.to_string(),
            message,
        };
        let ifindex = ifindex(ifname).ok_or_else(|| err("no such interface".into()))?;
        if self
            .attached
            .get(ifname)
            .is_some_and(|a| a.ifindex != ifindex || a.zone != zone)
        {
            // Deleted and created again under the same name (the old links
            // went with the old device), or now in another zone.
            self.detach(ifname);
        }
        if self.attached.contains_key(ifname) {
            return self
                .attached
                .get(ifname)
                .ok_or_else(|| err("attachment vanished".into()));
        }
        let links = match zone {
            Zone::Host => self.attach_host(ifname)?,
            Zone::Container => {
                let from = self.attach_tc(ifname, programs::CT_FROM, TcAttachType::Ingress)?;
                match self.attach_tc(ifname, programs::CT_TO, TcAttachType::Egress) {
                    Ok(to) => Links::Container { from, to },
                    Err(e) => {
                        if let Ok(p) = self.classifier(programs::CT_FROM) {
                            let _ = p.detach(from);
                        }
                        return Err(e);
                    }
                }
            }
        };
        let a = Attachment {
            ifindex,
            zone,
            links,
        };
        let [(h0, m0), (h1, m1)] = a.hooks();
        info!(
            interface = ifname,
            ifindex,
            zone = zone.as_str(),
            "probes attached ({h0} {m0}, {h1} {m1})"
        );
        self.attached.insert(ifname.to_string(), a);
        self.attached
            .get(ifname)
            .ok_or_else(|| err("attachment vanished".into()))
    }

    fn attach_host(&mut self, ifname: &str) -> Result<Links> {
        let err = |message: String| ProbeError::Attach {
            name: ifname.to_string(),
            message,
        };
        // Native XDP, else TC ingress: generic (skb-mode) XDP would copy
        // every cloned skb (all of TCP's) to run, on lo for every local
        // connection. A veth's "native" XDP is no better: it moves the
        // device to NAPI mode and copies every skb a local socket sends
        // (less headroom than XDP wants) into a page before the program
        // runs; TC sees the skb as it is.
        let native = if crate::interfaces::driver(ifname).as_deref() == Some("veth") {
            Err(err(
                "a veth: its XDP would copy every skb from a local socket".into(),
            ))
        } else {
            self.xdp()?
                .attach(ifname, XdpMode::Driver)
                .map_err(|e| err(crate::error_chain(&e)))
        };
        let ingress = match native {
            Ok(l) => Ok(l),
            Err(native) => {
                let reason = crate::error_chain(&native);
                match self.attach_tc(ifname, programs::TC_INGRESS, TcAttachType::Ingress) {
                    Ok(l) => {
                        info!(
                            interface = ifname,
                            reason, "no native XDP; counting ingress with TC"
                        );
                        Err(l)
                    }
                    Err(e) => {
                        return Err(err(format!(
                            "attaching XDP ({reason}) or TC ingress: {}",
                            crate::error_chain(&e)
                        )));
                    }
                }
            }
        };
        let tc = self.attach_tc(ifname, programs::TC_EGRESS, TcAttachType::Egress);
        match (ingress, tc) {
            (Ok(xdp), Ok(tc)) => Ok(Links::Host { xdp, tc }),
            (Err(ingress), Ok(tc)) => Ok(Links::HostTc { ingress, tc }),
            (Ok(xdp), Err(e)) => {
                let _ = self.xdp()?.detach(xdp);
                Err(e)
            }
            (Err(ingress), Err(e)) => {
                let _ = self.classifier(programs::TC_INGRESS)?.detach(ingress);
                Err(e)
            }
        }
    }

    fn attach_tc(
        &mut self,
        ifname: &str,
        program: &'static str,
        at: TcAttachType,
    ) -> Result<SchedClassifierLinkId> {
        let tc = self.classifier(program)?;
        let link = match tc.attach(ifname, at) {
            Ok(l) => Ok(l),
            // Kernels before 6.6 attach through a clsact qdisc.
            Err(_) => {
                let _ = aya::programs::tc::qdisc_add_clsact(ifname);
                tc.attach(ifname, at)
            }
        };
        link.map_err(|e| ProbeError::Attach {
            name: ifname.to_string(),
            message: format!("attaching TC {at:?}: {}", crate::error_chain(&e)),
        })
    }

    /// Detaches from `ifname` (if the device still exists) and forgets it.
    pub fn detach(&mut self, ifname: &str) {
        let Some(a) = self.attached.remove(ifname) else {
            return;
        };
        // Errors here mean the device (and with it the links) is gone.
        match a.links {
            Links::Host { xdp, tc } => {
                if let Ok(x) = self.xdp() {
                    let _ = x.detach(xdp);
                }
                if let Ok(t) = self.classifier(programs::TC_EGRESS) {
                    let _ = t.detach(tc);
                }
            }
            Links::HostTc { ingress, tc } => {
                if let Ok(t) = self.classifier(programs::TC_INGRESS) {
                    let _ = t.detach(ingress);
                }
                if let Ok(t) = self.classifier(programs::TC_EGRESS) {
                    let _ = t.detach(tc);
                }
            }
            Links::Container { from, to } => {
                if let Ok(t) = self.classifier(programs::CT_FROM) {
                    let _ = t.detach(from);
                }
                if let Ok(t) = self.classifier(programs::CT_TO) {
                    let _ = t.detach(to);
                }
            }
            Links::Pcap => {}
        }
        info!(interface = ifname, "probes detached");
    }

    pub fn detach_all(&mut self) {
        let names: Vec<String> = self.attached.keys().cloned().collect();
        for n in names {
            self.detach(&n);
        }
    }

    pub fn attachments(&self) -> &BTreeMap<String, Attachment> {
        &self.attached
    }

    /// Runs one program on `frame` in the kernel (BPF_PROG_TEST_RUN),
    /// `repeat` times; returns the program's verdict and the kernel's mean
    /// time per run. For TC, `gso_segs` sets the skb's segment count.
    pub fn test_run(
        &mut self,
        hook: Hook,
        frame: &[u8],
        gso_segs: u32,
        repeat: u32,
    ) -> Result<(u32, std::time::Duration)> {
        use aya::programs::{TestRun, TestRunOptions};
        let mut ctx = [0u8; SKB_CTX_LEN];
        ctx[SKB_CTX_GSO_SEGS..SKB_CTX_GSO_SEGS + 4].copy_from_slice(&gso_segs.to_ne_bytes());
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.repeat = repeat.max(1);
        let r = match hook {
            Hook::Xdp => self.xdp()?.test_run(opts),
            _ => {
                opts.ctx_in = Some(&ctx);
                self.classifier(hook.program())?.test_run(opts)
            }
        }
        .map_err(prog_err(hook.program()))?;
        Ok((r.return_value, r.duration))
    }

    // --- service table -------------------------------------------------

    /// The endpoint → slot table as the kernel holds it.
    pub fn addrs(&self) -> &BTreeMap<IpAddr, u32> {
        &self.written.addrs
    }

    pub fn table(&self) -> &BTreeMap<EndpointKey, u32> {
        &self.written.table
    }

    /// Entries in use, by map name: the hash tables, the port index and
    /// the address groups.
    pub fn table_sizes(&self) -> [(&'static str, usize, u32); 8] {
        let w = &self.written;
        let v4 = w.hash.keys().filter(|k| k.family == FAMILY_V4).count();
        let a4 = w.addrs.keys().filter(|a| a.is_ipv4()).count();
        [
            (maps::ADDRS4, a4, MAX_ADDRS),
            (maps::ADDRS6, w.addrs.len() - a4, MAX_ADDRS),
            (maps::VETHS, w.veths.len(), MAX_VETHS),
            (maps::SERVICES4, v4, MAX_ENDPOINTS),
            (maps::SERVICES6, w.hash.len() - v4, MAX_ENDPOINTS),
            (maps::PORTS, w.ports.len(), PORT_INDEX_LEN),
            (maps::GROUPS4, w.groups4.len(), MAX_GROUPS - 1),
            (maps::GROUPS6, w.groups6.len(), MAX_GROUPS - 1),
        ]
    }

    /// Makes the kernel's port index, address groups and hash tables equal
    /// to `want`, touching only what differs. A local wildcard endpoint is a
    /// slot in the port index; a port's address-specific local endpoints go
    /// in its address group while they fit (four IPv4, two IPv6), else in
    /// the hash table; remote endpoints go in the hash table.
    pub fn sync_table(&mut self, want: BTreeMap<EndpointKey, u32>) -> Result<usize> {
        // Address groups, with stable ids: a port keeps its group while it
        // has one, so a packet in flight never reads another port's group;
        // an address keeps its position in the group while it stays, so an
        // update never shows a packet an address beside another address's
        // slot.
        let Layout {
            ports,
            hash,
            groups4,
            groups6,
            group_of,
        } = layout::layout(&want, &mut StableGroups::new(&self.written));

        // Order matters for packets in flight: entries leave the hash
        // tables first (a miss then falls through, which is right for an
        // endpoint that is leaving), new entries and groups are filled
        // before the port index points at them, and a group is cleared only
        // once nothing points at it. `self.written` follows each step, so a
        // failure part-way leaves it true to the kernel and the next refresh
        // finishes the job.
        let mut changes = reconcile(&mut self.written.hash, &hash, |k, slot| {
            let v4 = k.family == FAMILY_V4;
            let name = if v4 { maps::SERVICES4 } else { maps::SERVICES6 };
            let r = match slot {
                None if v4 => removed(self.services4.remove(&k.key4())),
                None => removed(self.services6.remove(&k.key6())),
                Some(slot) => {
                    let v = ServiceRef { slot, _pad: 0 };
                    if v4 {
                        self.services4.insert(k.key4(), v, 0)
                    } else {
                        self.services6.insert(k.key6(), v, 0)
                    }
                }
            };
            r.map_err(map_err(name))
        })?;
        changes += write_groups(
            &mut self.groups4,
            &mut self.written.groups4,
            &groups4,
            maps::GROUPS4,
        )?;
        changes += write_groups(
            &mut self.groups6,
            &mut self.written.groups6,
            &groups6,
            maps::GROUPS6,
        )?;
        let gone: Vec<u32> = self
            .written
            .ports
            .keys()
            .filter(|i| !ports.contains_key(i))
            .copied()
            .collect();
        for i in gone {
            self.ports.set(i, 0, 0).map_err(map_err(maps::PORTS))?;
            self.written.ports.remove(&i);
            self.written.group_of.remove(&i);
            changes += 1;
        }
        for (i, v) in &ports {
            if self.written.ports.get(i) != Some(v) {
                self.ports.set(*i, *v, 0).map_err(map_err(maps::PORTS))?;
                self.written.ports.insert(*i, *v);
                match group_of.get(i) {
                    Some(g) => self.written.group_of.insert(*i, *g),
                    None => self.written.group_of.remove(i),
                };
                changes += 1;
            }
        }
        clear_groups(
            &mut self.groups4,
            &mut self.written.groups4,
            &groups4,
            maps::GROUPS4,
        )?;
        clear_groups(
            &mut self.groups6,
            &mut self.written.groups6,
            &groups6,
            maps::GROUPS6,
        )?;
        self.written.table = want;
        Ok(changes)
    }

    /// Makes the container address table (`NP_ADDRS4`/`6`) equal to
    /// `want`, touching only what differs; returns how many entries changed.
    pub fn sync_addrs(&mut self, want: &BTreeMap<IpAddr, u32>) -> Result<usize> {
        reconcile(&mut self.written.addrs, want, |a, slot| {
            let r = match (a, slot) {
                (IpAddr::V4(v4), None) => removed(self.addrs4.remove(&addr4(v4))),
                (IpAddr::V6(v6), None) => removed(self.addrs6.remove(&addr6(v6))),
                (IpAddr::V4(v4), Some(slot)) => {
                    self.addrs4
                        .insert(addr4(v4), ServiceRef { slot, _pad: 0 }, 0)
                }
                (IpAddr::V6(v6), Some(slot)) => {
                    self.addrs6
                        .insert(addr6(v6), ServiceRef { slot, _pad: 0 }, 0)
                }
            };
            r.map_err(map_err(addrs_map(&a)))
        })
    }

    /// Makes the veth table (`NP_VETHS`) hold `want` (host-side veth
    /// ifindex → slot). Two ifindexes that share a position: the lower
    /// keeps it, the other's container is found by address. Returns how
    /// many positions changed.
    pub fn sync_veths(&mut self, want: &BTreeMap<u32, u32>) -> Result<usize> {
        let mut at: BTreeMap<u32, VethSlot> = BTreeMap::new();
        for (ifindex, slot) in want {
            at.entry(VethSlot::index(*ifindex)).or_insert(VethSlot {
                ifindex: *ifindex,
                slot: *slot,
            });
        }
        reconcile(&mut self.written.veths, &at, |i, v| {
            self.veths
                .set(i, v.unwrap_or_default(), 0)
                .map_err(map_err(maps::VETHS))
        })
    }

    // --- counters ------------------------------------------------------

    /// One slot, summed over CPUs and both hooks.
    pub fn counts(&self, slot: u32) -> Result<Counts> {
        let mut sum = self.hook_counts(Hook::Xdp, slot)?;
        sum.add(&self.hook_counts(Hook::Tc, slot)?);
        Ok(sum)
    }

    /// One slot of one hook's counters, summed over CPUs.
    fn hook_counts(&self, hook: Hook, slot: u32) -> Result<SlotCounters> {
        // The receive path (XDP, TC ingress on container veths) and the
        // transmit path each have their array.
        match hook {
            Hook::Xdp | Hook::TcIn | Hook::CtFrom => {
                sum_cpus(&self.counters_xdp, maps::COUNTERS_XDP, slot)
            }
            Hook::Tc | Hook::CtTo => sum_cpus(&self.counters_tc, maps::COUNTERS_TC, slot),
        }
    }

    /// A second, read-only handle on the two counter arrays, opened from
    /// their pins: readers never wait for the writer (see [`Counters`]).
    fn counters(&self) -> Result<Counters> {
        let open = |name: &'static str| -> Result<PerCpuArray<MapData, SlotCounters>> {
            let data = MapData::from_pin(self.pin_dir.join(name)).map_err(map_err(name))?;
            PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data)).map_err(map_err(name))
        };
        let health = match crate::health::Reader::open(&self.pin_dir) {
            Ok(r) => Some(r),
            Err(e) => {
                warn!(error = %e, "TCP health: cannot read its maps");
                None
            }
        };
        let peers = match crate::peers::Reader::open(&self.pin_dir) {
            Ok(r) => Some(r),
            Err(e) => {
                warn!(error = %e, "peers: cannot read their maps");
                None
            }
        };
        Ok(Counters::Kernel(Box::new(KernelCounters {
            xdp: open(maps::COUNTERS_XDP)?,
            tc: open(maps::COUNTERS_TC)?,
            health,
            peers,
        })))
    }

    /// The reserved (unclassified) slots, per hook: (slot, XDP, TC).
    pub fn reserved_counts(&self) -> Result<Vec<(u32, SlotCounters, SlotCounters)>> {
        agent_ebpf::RESERVED_SLOTS
            .iter()
            .map(|(slot, _)| {
                Ok((
                    *slot,
                    self.hook_counts(Hook::Xdp, *slot)?,
                    self.hook_counts(Hook::Tc, *slot)?,
                ))
            })
            .collect()
    }

    /// Zeroes a slot on every CPU, before it is given to another service.
    pub fn zero(&mut self, slot: u32) -> Result<()> {
        for (name, map) in [
            (maps::COUNTERS_XDP, &mut self.counters_xdp),
            (maps::COUNTERS_TC, &mut self.counters_tc),
        ] {
            let zeros = PerCpuValues::try_from(vec![SlotCounters::default(); self.ncpus])
                .map_err(|e| ProbeError::Cpus(e.to_string()))?;
            map.set(slot, zeros, 0).map_err(map_err(name))?;
        }
        if let Err(e) = crate::health::zero_slot(&self.pin_dir, slot, self.ncpus) {
            warn!(slot, error = %e, "TCP health: cannot zero a slot's figures");
        }
        if let Some(p) = &mut self.peers
            && let Err(e) = p.zero_slot(slot)
        {
            warn!(slot, error = %e, "peers: cannot zero a slot's peers");
        }
        Ok(())
    }

    // --- pinned slot names ----------------------------------------------

    /// Slot → name as pinned by the previous agent (or this one).
    pub fn slot_names(&self) -> Result<BTreeMap<u32, String>> {
        let mut out = BTreeMap::new();
        for slot in FIRST_SERVICE_SLOT..MAX_SLOTS {
            let n = self
                .names
                .get(&slot, 0)
                .map_err(map_err(maps::SLOT_NAMES))?;
            let len = (n.len as usize).min(NAME_LEN);
            if len > 0
                && let Ok(s) = std::str::from_utf8(&n.bytes[..len])
            {
                out.insert(slot, s.to_string());
            }
        }
        Ok(out)
    }

    pub fn set_slot_name(&mut self, slot: u32, name: Option<&str>) -> Result<()> {
        let mut v = SlotName::default();
        if let Some(name) = name {
            let b = name.as_bytes();
            let len = b.len().min(NAME_LEN);
            v.bytes[..len].copy_from_slice(&b[..len]);
            v.len = len as u32;
        }
        self.names
            .set(slot, v, 0)
            .map_err(map_err(maps::SLOT_NAMES))
    }
}

impl Drop for Kernel {
    fn drop(&mut self) {
        self.detach_all();
    }
}

/// The libpcap backend with the interfaces it captures on.
pub struct PcapProbe {
    pcap: crate::pcap_backend::Pcap,
    attached: BTreeMap<String, Attachment>,
}

/// What counts packets: the kernel programs, or libpcap captures where
/// eBPF cannot load (`pcap_backend`). The rest of the agent talks to this
/// and does not know which.
pub enum Probe {
    Kernel(Box<Kernel>),
    Pcap(PcapProbe),
}

impl Probe {
    /// Loads the kernel programs (see [`Kernel::load`]).
    pub fn load(pin_root: &Path) -> Result<Self> {
        Kernel::load(pin_root).map(|k| Probe::Kernel(Box::new(k)))
    }

    pub fn load_object(object: &[u8], pin_root: &Path) -> Result<Self> {
        Kernel::load_object(object, pin_root).map(|k| Probe::Kernel(Box::new(k)))
    }

    /// The pcap backend, capturing nowhere yet.
    pub fn pcap() -> Self {
        Probe::Pcap(PcapProbe {
            pcap: crate::pcap_backend::Pcap::new(),
            attached: BTreeMap::new(),
        })
    }

    /// `ebpf` or `pcap`.
    pub fn backend(&self) -> &'static str {
        match self {
            Probe::Kernel(_) => "ebpf",
            Probe::Pcap(_) => "pcap",
        }
    }

    /// Where the kernel's maps are pinned (None for pcap: its counters
    /// live in this process).
    pub fn pin_dir(&self) -> Option<&Path> {
        match self {
            Probe::Kernel(k) => Some(k.pin_dir()),
            Probe::Pcap(_) => None,
        }
    }

    pub fn attach(&mut self, ifname: &str, zone: Zone) -> Result<&Attachment> {
        match self {
            Probe::Kernel(k) => k.attach(ifname, zone),
            Probe::Pcap(p) => {
                let err = |message: String| ProbeError::Attach {
                    name: ifname.to_string(),
                    message,
                };
                let ifindex = ifindex(ifname).ok_or_else(|| err("no such interface".into()))?;
                if p.attached
                    .get(ifname)
                    .is_some_and(|a| a.ifindex != ifindex || a.zone != zone)
                {
                    p.pcap.stop(ifname);
                    p.attached.remove(ifname);
                }
                if !p.attached.contains_key(ifname) {
                    p.pcap.start(ifname, zone, ifindex).map_err(err)?;
                    p.attached.insert(
                        ifname.to_string(),
                        Attachment {
                            ifindex,
                            zone,
                            links: Links::Pcap,
                        },
                    );
                }
                p.attached
                    .get(ifname)
                    .ok_or_else(|| err("attachment vanished".into()))
            }
        }
    }

    pub fn detach(&mut self, ifname: &str) {
        match self {
            Probe::Kernel(k) => k.detach(ifname),
            Probe::Pcap(p) => {
                if p.attached.remove(ifname).is_some() {
                    p.pcap.stop(ifname);
                    info!(interface = ifname, "capture stopped");
                }
            }
        }
    }

    pub fn detach_all(&mut self) {
        match self {
            Probe::Kernel(k) => k.detach_all(),
            Probe::Pcap(p) => {
                p.pcap.stop_all();
                p.attached.clear();
            }
        }
    }

    pub fn attachments(&self) -> &BTreeMap<String, Attachment> {
        match self {
            Probe::Kernel(k) => k.attachments(),
            Probe::Pcap(p) => &p.attached,
        }
    }

    /// See [`Kernel::test_run`]; the pcap backend has no programs to run.
    pub fn test_run(
        &mut self,
        hook: Hook,
        frame: &[u8],
        gso_segs: u32,
        repeat: u32,
    ) -> Result<(u32, std::time::Duration)> {
        match self {
            Probe::Kernel(k) => k.test_run(hook, frame, gso_segs, repeat),
            Probe::Pcap(_) => Err(ProbeError::NotKernel),
        }
    }

    pub fn table(&self) -> &BTreeMap<EndpointKey, u32> {
        match self {
            Probe::Kernel(k) => k.table(),
            Probe::Pcap(p) => p.pcap.table(),
        }
    }

    /// Container addresses counted by address: address → slot.
    pub fn addrs(&self) -> &BTreeMap<IpAddr, u32> {
        match self {
            Probe::Kernel(k) => k.addrs(),
            Probe::Pcap(p) => p.pcap.addrs(),
        }
    }

    pub fn table_sizes(&self) -> [(&'static str, usize, u32); 8] {
        match self {
            Probe::Kernel(k) => k.table_sizes(),
            Probe::Pcap(p) => {
                // The same logical tables, held in userspace.
                let t = p.pcap.table();
                let v4 = t.keys().filter(|k| k.family == FAMILY_V4).count();
                let (a4, a6) = p.pcap.addr_count();
                [
                    (maps::ADDRS4, a4, MAX_ADDRS),
                    (maps::ADDRS6, a6, MAX_ADDRS),
                    (maps::VETHS, p.pcap.veth_count(), MAX_VETHS),
                    (maps::SERVICES4, v4, MAX_ENDPOINTS),
                    (maps::SERVICES6, t.len() - v4, MAX_ENDPOINTS),
                    (maps::PORTS, 0, PORT_INDEX_LEN),
                    (maps::GROUPS4, 0, MAX_GROUPS - 1),
                    (maps::GROUPS6, 0, MAX_GROUPS - 1),
                ]
            }
        }
    }

    pub fn sync_table(&mut self, want: BTreeMap<EndpointKey, u32>) -> Result<usize> {
        match self {
            Probe::Kernel(k) => {
                let n = k.sync_table(want)?;
                let t = k.table().clone();
                k.seed_open(&t);
                k.sync_peers();
                Ok(n)
            }
            Probe::Pcap(p) => Ok(p.pcap.sync_table(want)),
        }
    }

    pub fn sync_addrs(&mut self, want: &BTreeMap<IpAddr, u32>) -> Result<usize> {
        match self {
            Probe::Kernel(k) => {
                let n = k.sync_addrs(want)?;
                if n > 0 {
                    k.sync_peers();
                }
                Ok(n)
            }
            Probe::Pcap(p) => Ok(p.pcap.sync_addrs(want)),
        }
    }

    pub fn sync_veths(&mut self, want: &BTreeMap<u32, u32>) -> Result<usize> {
        match self {
            Probe::Kernel(k) => k.sync_veths(want),
            Probe::Pcap(p) => Ok(p.pcap.sync_veths(want)),
        }
    }

    /// The containers' namespaces the TCP health programs count in.
    pub fn sync_netns(&mut self, containers: &std::collections::BTreeSet<u32>) {
        if let Probe::Kernel(k) = self {
            k.sync_netns(containers);
        }
    }

    /// The TCP health features and whether each is on (none on the pcap
    /// backend, which derives its figures from headers).
    pub fn features(&self) -> Vec<crate::health::Feature> {
        match self {
            Probe::Kernel(k) => k.health().features.clone(),
            Probe::Pcap(_) => Vec::new(),
        }
    }

    /// The kernel's drop reasons by value.
    pub fn drop_reasons(&self) -> std::sync::Arc<BTreeMap<u64, String>> {
        match self {
            Probe::Kernel(k) => k.health().reasons.clone(),
            Probe::Pcap(_) => Default::default(),
        }
    }

    /// This host's addresses as the service map last named them.
    pub fn host_addrs(&self) -> std::sync::Arc<std::collections::BTreeSet<std::net::IpAddr>> {
        match self {
            Probe::Kernel(k) => k.host_addrs.clone(),
            Probe::Pcap(_) => Default::default(),
        }
    }

    /// The open-connection seeds (see [`Health::open_seed`]).
    pub fn open_seed(&self) -> std::sync::Arc<BTreeMap<u32, i64>> {
        match self {
            Probe::Kernel(k) => k.health().open_seed.clone().unwrap_or_default(),
            Probe::Pcap(_) => Default::default(),
        }
    }

    /// One slot, both directions of the hooks summed.
    pub fn counts(&self, slot: u32) -> Result<Counts> {
        match self {
            Probe::Kernel(k) => k.counts(slot),
            Probe::Pcap(p) => {
                let (mut rx, tx) = p.pcap.counts(slot);
                rx.add(&tx);
                Ok(rx)
            }
        }
    }

    /// The reserved slots: (slot, receive path, transmit path).
    pub fn reserved_counts(&self) -> Result<Vec<(u32, SlotCounters, SlotCounters)>> {
        match self {
            Probe::Kernel(k) => k.reserved_counts(),
            Probe::Pcap(p) => Ok(agent_ebpf::RESERVED_SLOTS
                .iter()
                .map(|(slot, _)| {
                    let (rx, tx) = p.pcap.counts(*slot);
                    (*slot, rx, tx)
                })
                .collect()),
        }
    }

    pub fn zero(&mut self, slot: u32) -> Result<()> {
        match self {
            Probe::Kernel(k) => k.zero(slot),
            Probe::Pcap(p) => {
                p.pcap.zero(slot);
                Ok(())
            }
        }
    }

    pub fn slot_names(&self) -> Result<BTreeMap<u32, String>> {
        match self {
            Probe::Kernel(k) => k.slot_names(),
            Probe::Pcap(p) => Ok(p.pcap.slot_names()),
        }
    }

    pub fn set_slot_name(&mut self, slot: u32, name: Option<&str>) -> Result<()> {
        match self {
            Probe::Kernel(k) => k.set_slot_name(slot, name),
            Probe::Pcap(p) => {
                p.pcap.set_slot_name(slot, name);
                Ok(())
            }
        }
    }

    /// The read-only handle on the counters (see [`Counters`]).
    pub fn counters(&self) -> Result<Counters> {
        match self {
            Probe::Kernel(k) => k.counters(),
            Probe::Pcap(p) => Ok(Counters::Pcap(p.pcap.reader())),
        }
    }

    /// Packets libpcap dropped, by interface (the pcap backend only).
    pub fn capture_drops(&self) -> BTreeMap<String, u64> {
        match self {
            Probe::Kernel(_) => BTreeMap::new(),
            Probe::Pcap(p) => p.pcap.dropped(),
        }
    }
}

pub fn ifindex(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: c is a valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

fn check_bpffs(pin_root: &Path) -> Result<()> {
    // The pin root may not exist yet: check the nearest existing ancestor.
    let mut p = pin_root;
    while !p.exists() {
        match p.parent() {
            Some(parent) => p = parent,
            None => break,
        }
    }
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
        return Err(ProbeError::NoBpffs(pin_root.to_path_buf()));
    };
    // SAFETY: statfs writes into a zeroed struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    if rc == 0 && st.f_type as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    // Like systemd and Cilium: mount bpffs at its usual place if nobody has.
    let default = Path::new("/sys/fs/bpf");
    if pin_root.starts_with(default) && default.is_dir() {
        let target = c"/sys/fs/bpf";
        // SAFETY: static NUL-terminated strings; no data argument.
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                target.as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc == 0 {
            // In a private mount namespace this bpffs dies with us, and so
            // would the pins: say so, since a restart then starts from zero.
            warn!(
                "/sys/fs/bpf was not a bpffs; mounted one. Counters persist across restarts only if this mount is shared with the next run"
            );
            return Ok(());
        }
        warn!(error = %std::io::Error::last_os_error(), "mounting bpffs at /sys/fs/bpf");
    }
    Err(ProbeError::NoBpffs(p.to_path_buf()))
}
