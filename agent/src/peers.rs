//! Who talks to whom, the agent's half: which addresses are named peers
//! (written into the kernel's `NP_PEER_NAMES` when the service table
//! changes, see [`Writer`]), reading the per-peer counters back from their
//! pins ([`Reader`]), and turning them into the service map of
//! `GET /api/v1/map` ([`build`]): per service, every named peer, the top-K
//! unknown addresses, their /24 (/48) buckets, and `~other`.
//!
//! The kernel half is `agent-ebpf/src/bin/peers.rs`; `probe` loads it and
//! calls [`Writer::sync`]; `metrics` and `web` read through [`Reader`].

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use agent_ebpf::{
    EndpointKey, FAMILY_V4, MAX_PEER_BUCKETS, PEER_ADDR_SETS, PEER_BUCKET_BITS_V4,
    PEER_BUCKET_BITS_V6, PEER_META_BUCKETS_FULL, PEER_META_INSERTS, PEER_NAME_POSITIONS,
    PEER_NAME_PROBES, PEER_NAMED, PEER_SLOTS, PEER_UNBUCKETED, PeerBucket, PeerCounters, PeerKey,
    PeerName, PeerSet, PeerWay, ROLE_REMOTE, peer_maps, peer_name_position, peer_place,
};
use aya::maps::{Array, Map, MapData, PerCpuArray, PerCpuValues};
use tracing::warn;

use crate::api_types as t;

fn open(pin_dir: &Path, name: &str) -> Result<Map, String> {
    let data = MapData::from_pin(pin_dir.join(name)).map_err(|e| format!("{name}: {e}"))?;
    Map::from_map_data(data).map_err(|e| format!("{name}: {e}"))
}

fn words(a: &IpAddr) -> [u32; 4] {
    let mut k = EndpointKey::default();
    match a {
        IpAddr::V4(v4) => k.set_addr(&v4.octets()),
        IpAddr::V6(v6) => k.set_addr(&v6.octets()),
    }
    k.addr
}

fn addr_of(family: u8, w: &[u32; 4]) -> IpAddr {
    let k = EndpointKey {
        addr: *w,
        ..Default::default()
    };
    let b = k.addr_bytes();
    if family == FAMILY_V4 {
        IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(b))
    }
}

/// This host's addresses (every interface of the agent's namespace).
pub fn host_addrs() -> BTreeSet<IpAddr> {
    let mut out = BTreeSet::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut p = head;
    while !p.is_null() {
        // SAFETY: a node of the list getifaddrs returned.
        let ifa = unsafe { &*p };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points at a sockaddr of the family it says.
            match i32::from(unsafe { (*ifa.ifa_addr).sa_family }) {
                libc::AF_INET => {
                    let sa = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                    out.insert(IpAddr::V4(Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr))));
                }
                libc::AF_INET6 => {
                    let sa = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                    out.insert(IpAddr::V6(Ipv6Addr::from(sa.sin6_addr.s6_addr)));
                }
                _ => {}
            }
        }
        p = ifa.ifa_next;
    }
    // SAFETY: the list getifaddrs allocated.
    unsafe { libc::freeifaddrs(head) };
    out
}

/// What a node of the map is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Service,
    Container,
    Remote,
    Host,
    Address,
    Bucket,
    Other,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "service",
            Kind::Container => "container",
            Kind::Remote => "remote",
            Kind::Host => "host",
            Kind::Address => "address",
            Kind::Bucket => "bucket",
            Kind::Other => "other",
        }
    }

    /// A peer of this kind is a named service (it has metrics series).
    pub fn is_service(self) -> bool {
        matches!(self, Kind::Service | Kind::Container | Kind::Remote)
    }
}

/// A service with a counter slot, as the map shows it.
#[derive(Debug, Clone)]
pub struct Svc {
    pub name: String,
    pub slot: u32,
    pub kind: Kind,
}

/// The addresses the agent can name: containers' (by their service),
/// `remote` services' (by address), and this host's.
#[derive(Debug, Clone, Default)]
pub struct Naming {
    by_addr: BTreeMap<IpAddr, (Kind, String)>,
}

impl Naming {
    /// From the services, the endpoint table and the container addresses
    /// (slot-valued, as the datapath holds them) and this host's addresses.
    pub fn new(
        services: &[Svc],
        table: &BTreeMap<EndpointKey, u32>,
        addrs: &BTreeMap<IpAddr, u32>,
        host: &BTreeSet<IpAddr>,
    ) -> Self {
        let by_slot: BTreeMap<u32, &Svc> = services.iter().map(|s| (s.slot, s)).collect();
        let mut by_addr = BTreeMap::new();
        for a in host {
            by_addr.insert(*a, (Kind::Host, "host".to_string()));
        }
        for (k, slot) in table {
            if k.role == ROLE_REMOTE
                && k.addr != [0; 4]
                && let Some(s) = by_slot.get(slot)
            {
                by_addr.insert(addr_of(k.family, &k.addr), (s.kind, s.name.clone()));
            }
        }
        for (a, slot) in addrs {
            if let Some(s) = by_slot.get(slot) {
                by_addr.insert(*a, (s.kind, s.name.clone()));
            }
        }
        Naming { by_addr }
    }

    pub fn get(&self, a: &IpAddr) -> Option<&(Kind, String)> {
        self.by_addr.get(a)
    }
}

/// The addresses to give named places in the kernel, most wanted first
/// (there are `PEER_NAMED - 1` places): `remote` services, containers,
/// then this host's.
pub fn named_addresses(
    table: &BTreeMap<EndpointKey, u32>,
    addrs: &BTreeMap<IpAddr, u32>,
    host: &BTreeSet<IpAddr>,
) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    let mut seen = BTreeSet::new();
    let remote = table
        .keys()
        .filter(|k| k.role == ROLE_REMOTE && k.addr != [0; 4])
        .map(|k| addr_of(k.family, &k.addr));
    for a in remote
        .chain(addrs.keys().copied())
        .chain(host.iter().copied())
    {
        if seen.insert(a) {
            out.push(a);
        }
    }
    out
}

/// The writer's handles: the name table and, to zero them, the counters.
pub struct Writer {
    names: Array<MapData, PeerName>,
    /// What the name table holds: address → (place, position).
    placed: BTreeMap<IpAddr, (u32, u32)>,
    named: PerCpuArray<MapData, PeerCounters>,
    addrs: PerCpuArray<MapData, PeerSet>,
    buckets: PerCpuArray<MapData, PeerBucket>,
    ncpus: usize,
}

fn family_of(a: &IpAddr) -> u8 {
    if a.is_ipv4() {
        FAMILY_V4
    } else {
        agent_ebpf::FAMILY_V6
    }
}

/// The named addresses in a name table: address → (place, position).
fn read_names(names: &Array<MapData, PeerName>) -> BTreeMap<IpAddr, (u32, u32)> {
    let mut out = BTreeMap::new();
    for pos in 0..PEER_NAME_POSITIONS {
        if let Ok(n) = names.get(&pos, 0)
            && n.family != 0
            && n.place != 0
        {
            out.insert(addr_of(n.family as u8, &n.addr), (n.place, pos));
        }
    }
    out
}

impl Writer {
    /// Opens the pinned maps; the names a previous agent placed are kept
    /// (each address keeps its place, and its counts).
    pub fn open(pin_dir: &Path, ncpus: usize) -> Result<Self, String> {
        let e = |e: aya::maps::MapError| e.to_string();
        let names: Array<MapData, PeerName> =
            Array::try_from(open(pin_dir, peer_maps::NAMES)?).map_err(e)?;
        Ok(Writer {
            placed: read_names(&names),
            names,
            named: PerCpuArray::try_from(open(pin_dir, peer_maps::NAMED)?).map_err(e)?,
            addrs: PerCpuArray::try_from(open(pin_dir, peer_maps::ADDRS)?).map_err(e)?,
            buckets: PerCpuArray::try_from(open(pin_dir, peer_maps::BUCKETS)?).map_err(e)?,
            ncpus,
        })
    }

    /// Gives the first `PEER_NAMED - 1` of `want` named places: an address
    /// that stays keeps its place; one that leaves is removed first and its
    /// counts zeroed before the place is given again. An address whose
    /// positions in the table are all taken stays unnamed in the kernel
    /// (counted as unknown; the agent still names it). Returns how many
    /// names changed.
    pub fn sync(&mut self, want: &[IpAddr]) -> usize {
        let want: BTreeSet<IpAddr> = want.iter().copied().take(PEER_NAMED as usize - 1).collect();
        let gone: Vec<(IpAddr, (u32, u32))> = self
            .placed
            .iter()
            .filter(|(a, _)| !want.contains(a))
            .map(|(a, v)| (*a, *v))
            .collect();
        let mut changes = 0;
        for (a, (place, pos)) in gone {
            if let Err(e) = self.names.set(pos, PeerName::default(), 0) {
                warn!(error = %e, address = %a, "peers: cannot remove a named address");
                continue;
            }
            self.placed.remove(&a);
            self.zero_place(place);
            changes += 1;
        }
        let mut places: BTreeSet<u32> = self.placed.values().map(|v| v.0).collect();
        let mut positions: BTreeSet<u32> = self.placed.values().map(|v| v.1).collect();
        for a in want {
            if self.placed.contains_key(&a) {
                continue;
            }
            let Some(place) = (1..PEER_NAMED).find(|i| !places.contains(i)) else {
                break;
            };
            let (family, addr) = (family_of(&a), words(&a));
            let Some(pos) = (0..PEER_NAME_PROBES)
                .map(|p| peer_name_position(family, &addr, p))
                .find(|p| !positions.contains(p))
            else {
                continue;
            };
            let n = PeerName {
                addr,
                family: u32::from(family),
                place,
            };
            match self.names.set(pos, n, 0) {
                Ok(()) => {
                    places.insert(place);
                    positions.insert(pos);
                    self.placed.insert(a, (place, pos));
                    changes += 1;
                }
                Err(e) => warn!(error = %e, address = %a, "peers: cannot name an address"),
            }
        }
        changes
    }

    fn zeros(&self) -> Result<PerCpuValues<PeerCounters>, String> {
        PerCpuValues::try_from(vec![PeerCounters::default(); self.ncpus]).map_err(|e| e.to_string())
    }

    /// Zeroes named place `i` in every slot, on both paths.
    fn zero_place(&mut self, i: u32) {
        for path in 0..2 {
            for slot in 0..PEER_SLOTS {
                let Ok(z) = self.zeros() else { return };
                let _ = self.named.set(peer_place(path, slot, i), z, 0);
            }
        }
    }

    /// Zeroes a slot's peers before the slot is given to another service.
    pub fn zero_slot(&mut self, slot: u32) -> Result<(), String> {
        if slot >= PEER_SLOTS {
            return Ok(());
        }
        for path in 0..2 {
            for i in 0..PEER_NAMED {
                let z = self.zeros()?;
                self.named
                    .set(peer_place(path, slot, i), z, 0)
                    .map_err(|e| e.to_string())?;
            }
        }
        // An LRU set holds its ways per CPU: free this slot's.
        for i in 0..2 * PEER_ADDR_SETS {
            let Ok(v) = self.addrs.get(&i, 0) else {
                continue;
            };
            let mine = |w: &PeerWay| w.key.family != 0 && w.key.slot == slot;
            if !v.iter().any(|set| set.ways.iter().any(mine)) {
                continue;
            }
            let freed: Vec<PeerSet> = v
                .iter()
                .map(|set| {
                    let mut set = *set;
                    for (n, w) in set.ways.iter_mut().enumerate() {
                        if mine(w) {
                            *w = PeerWay::default();
                            set.used &= !(1 << n);
                        }
                    }
                    set
                })
                .collect();
            let freed = PerCpuValues::try_from(freed).map_err(|e| e.to_string())?;
            self.addrs.set(i, freed, 0).map_err(|e| e.to_string())?;
        }
        // A bucket position holds one bucket per CPU: free this slot's.
        for i in 0..MAX_PEER_BUCKETS {
            let Ok(v) = self.buckets.get(&i, 0) else {
                continue;
            };
            if !v.iter().any(|b| b.key.family != 0 && b.key.slot == slot) {
                continue;
            }
            let freed: Vec<PeerBucket> = v
                .iter()
                .map(|b| {
                    if b.key.slot == slot {
                        PeerBucket::default()
                    } else {
                        *b
                    }
                })
                .collect();
            let freed = PerCpuValues::try_from(freed).map_err(|e| e.to_string())?;
            self.buckets.set(i, freed, 0).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Named places in use.
    pub fn len(&self) -> usize {
        self.placed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.placed.is_empty()
    }
}

/// Read-only handles on the pinned peer maps.
pub struct Reader {
    names: Array<MapData, PeerName>,
    named: PerCpuArray<MapData, PeerCounters>,
    addrs: PerCpuArray<MapData, PeerSet>,
    buckets: PerCpuArray<MapData, PeerBucket>,
    meta: PerCpuArray<MapData, u64>,
}

/// A prefix bucket: its network address and length.
pub type Bucket = (IpAddr, u8);

/// The peer counters of some slots, summed over CPUs and paths.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// (slot, named address) → figures.
    pub named: BTreeMap<(u32, IpAddr), PeerCounters>,
    /// Unknown peers no bucket had room for, by slot.
    pub unbucketed: BTreeMap<u32, PeerCounters>,
    /// (slot, unknown address) → figures, as long as the LRU keeps it
    /// (both paths, every CPU's way summed).
    pub addrs: BTreeMap<(u32, IpAddr), PeerCounters>,
    /// (slot, bucket) → figures of every unknown address in it.
    pub buckets: BTreeMap<(u32, Bucket), PeerCounters>,
    /// LRU inserts since the maps were created, and ways holding a peer
    /// now (per CPU and path).
    pub inserts: u64,
    pub live: u64,
    /// Packets of unknown peers that found the bucket table full.
    pub buckets_full: u64,
}

impl Snapshot {
    /// Unknown (slot, address) pairs the kernel's LRU forgot to make room.
    pub fn evictions(&self) -> u64 {
        self.inserts.saturating_sub(self.live)
    }
}

fn sum(v: &PerCpuValues<PeerCounters>) -> PeerCounters {
    let mut s = PeerCounters::default();
    for c in v.iter() {
        s.add(c);
    }
    s
}

fn bucket_of(k: &PeerKey) -> Bucket {
    let b = k.bucket();
    let bits = if k.family == FAMILY_V4 {
        PEER_BUCKET_BITS_V4
    } else {
        PEER_BUCKET_BITS_V6
    };
    (addr_of(k.family, &b.addr), bits)
}

/// The bucket an address falls in.
pub fn bucket(a: &IpAddr) -> Bucket {
    let k = PeerKey {
        family: if a.is_ipv4() {
            FAMILY_V4
        } else {
            agent_ebpf::FAMILY_V6
        },
        addr: words(a),
        ..Default::default()
    };
    bucket_of(&k)
}

impl Reader {
    pub fn open(pin_dir: &Path) -> Result<Self, String> {
        let e = |e: aya::maps::MapError| e.to_string();
        Ok(Reader {
            names: Array::try_from(open(pin_dir, peer_maps::NAMES)?).map_err(e)?,
            named: PerCpuArray::try_from(open(pin_dir, peer_maps::NAMED)?).map_err(e)?,
            addrs: PerCpuArray::try_from(open(pin_dir, peer_maps::ADDRS)?).map_err(e)?,
            buckets: PerCpuArray::try_from(open(pin_dir, peer_maps::BUCKETS)?).map_err(e)?,
            meta: PerCpuArray::try_from(open(pin_dir, peer_maps::META)?).map_err(e)?,
        })
    }

    fn meta(&self, i: u32) -> u64 {
        [i, i + 1]
            .iter()
            .filter_map(|i| self.meta.get(i, 0).ok())
            .flat_map(|v| v.iter().copied().collect::<Vec<u64>>())
            .fold(0u64, u64::wrapping_add)
    }

    /// The named address of each place in use.
    fn places(&self) -> BTreeMap<u32, IpAddr> {
        read_names(&self.names)
            .into_iter()
            .map(|(a, (place, _))| (place, a))
            .collect()
    }

    /// The figures of `slots`: the named peers always; the unknown ones
    /// (LRU, buckets: a walk of both tables) if `unknown`.
    pub fn read(&self, slots: &BTreeSet<u32>, unknown: bool) -> Snapshot {
        let mut s = Snapshot::default();
        let places = self.places();
        for &slot in slots.iter().filter(|s| **s < PEER_SLOTS) {
            let mut places_here = vec![(PEER_UNBUCKETED, None)];
            places_here.extend(places.iter().map(|(i, a)| (*i, Some(*a))));
            for (i, a) in places_here {
                let mut c = PeerCounters::default();
                for path in 0..2 {
                    if let Ok(v) = self.named.get(&peer_place(path, slot, i), 0) {
                        c.add(&sum(&v));
                    }
                }
                if c.is_zero() {
                    continue;
                }
                match a {
                    Some(a) => {
                        s.named.insert((slot, a), c);
                    }
                    None => {
                        s.unbucketed.insert(slot, c);
                    }
                }
            }
        }
        s.inserts = self.meta(PEER_META_INSERTS);
        s.buckets_full = self.meta(PEER_META_BUCKETS_FULL);
        if !unknown {
            return s;
        }
        for i in 0..2 * PEER_ADDR_SETS {
            let Ok(v) = self.addrs.get(&i, 0) else {
                continue;
            };
            for w in v.iter().flat_map(|set| set.ways.iter()) {
                if w.key.family == 0 {
                    continue;
                }
                s.live += 1;
                if slots.contains(&w.key.slot) {
                    s.addrs
                        .entry((w.key.slot, addr_of(w.key.family, &w.key.addr)))
                        .or_default()
                        .add(&w.counters);
                }
            }
        }
        for i in 0..MAX_PEER_BUCKETS {
            let Ok(v) = self.buckets.get(&i, 0) else {
                continue;
            };
            for b in v.iter() {
                if b.key.family == 0 || !slots.contains(&b.key.slot) {
                    continue;
                }
                s.buckets
                    .entry((b.key.slot, bucket_of(&b.key)))
                    .or_default()
                    .add(&b.counters);
            }
        }
        s
    }
}

fn total(c: &PeerCounters) -> u64 {
    c.packets[0].wrapping_add(c.packets[1])
}

fn sub(a: &mut PeerCounters, b: &PeerCounters) {
    for d in 0..2 {
        a.packets[d] = a.packets[d].saturating_sub(b.packets[d]);
        a.bytes[d] = a.bytes[d].saturating_sub(b.bytes[d]);
    }
    a.conns = a.conns.saturating_sub(b.conns);
}

fn node_id(kind: Kind, name: &str) -> String {
    match kind {
        Kind::Host => "host".to_string(),
        _ => format!("{}:{name}", kind.as_str()),
    }
}

fn bucket_text((a, bits): &Bucket) -> String {
    format!("{a}/{bits}")
}

/// A service's TCP figures of one side: the handshake p50 (seconds) and
/// the retransmitted segments.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EdgeTcp {
    pub handshake_p50_seconds: Option<f64>,
    pub retransmits: u64,
}

/// The map for `services`: each service's named peers, its `top_k`
/// busiest unknown addresses, then its `top_k` busiest buckets (less the
/// addresses shown), and the rest as `~other`. Per service, named +
/// addresses + buckets + `~other` add up to every packet counted.
///
/// `client_tcp` holds, by slot, the client-side TCP figures of `remote`
/// services: this host is their only client (the TCP programs count a
/// remote service's connections from this host's namespace only), so
/// they are the figures of the edge `host` → the service. Other edges
/// have no per-edge TCP figures (null, 0).
pub fn build(
    snap: &Snapshot,
    naming: &Naming,
    services: &[Svc],
    top_k: usize,
    client_tcp: &BTreeMap<u32, EdgeTcp>,
) -> t::ServiceMap {
    let mut nodes: BTreeMap<String, t::MapNode> = BTreeMap::new();
    let mut edges = Vec::new();
    let mut node = |kind: Kind, name: &str, service: Option<&str>| {
        let id = node_id(kind, name);
        nodes.entry(id.clone()).or_insert_with(|| t::MapNode {
            id: id.clone(),
            kind: kind.as_str().to_string(),
            name: name.to_string(),
            service: service.map(str::to_string),
        });
        id
    };
    for svc in services {
        let target = node(svc.kind, &svc.name, Some(&svc.name));
        let host_tcp = client_tcp
            .get(&svc.slot)
            .filter(|_| svc.kind == Kind::Remote)
            .copied();
        let mut edge = |source: String, peer: String, c: &PeerCounters| {
            let tcp = host_tcp
                .filter(|_| source == node_id(Kind::Host, ""))
                .unwrap_or_default();
            edges.push(t::MapEdge {
                source,
                target: target.clone(),
                service: svc.name.clone(),
                peer,
                packets_in: c.packets[0],
                bytes_in: c.bytes[0],
                packets_out: c.packets[1],
                bytes_out: c.bytes[1],
                connections: c.conns,
                handshake_p50_seconds: tcp.handshake_p50_seconds,
                retransmits: tcp.retransmits,
            });
        };
        // Named peers: the kernel's named places, and addresses the LRU
        // holds that the agent can name (named past the kernel's places).
        let mut named: BTreeMap<(Kind, String), PeerCounters> = BTreeMap::new();
        // (address, figures, whether its bucket counts it too).
        let mut unknown: Vec<(IpAddr, PeerCounters, bool)> = Vec::new();
        for ((slot, a), c) in &snap.named {
            if *slot != svc.slot {
                continue;
            }
            match naming.get(a) {
                Some(n) => named.entry(n.clone()).or_default().add(c),
                // Named in the kernel, gone from the agent's view since.
                None => unknown.push((*a, *c, false)),
            }
        }
        let mut buckets: BTreeMap<Bucket, PeerCounters> = snap
            .buckets
            .iter()
            .filter(|((slot, _), _)| *slot == svc.slot)
            .map(|((_, b), c)| (*b, *c))
            .collect();
        // Unknown peers the bucket table had no room for.
        let mut other = snap.unbucketed.get(&svc.slot).copied().unwrap_or_default();
        for ((slot, a), c) in &snap.addrs {
            if *slot != svc.slot {
                continue;
            }
            // Counted in its bucket (or, that table full, in the
            // unbucketed) too: what is shown apart leaves it.
            match buckets.get_mut(&bucket(a)) {
                Some(b) => sub(b, c),
                None => sub(&mut other, c),
            }
            match naming.get(a) {
                Some(n) => named.entry(n.clone()).or_default().add(c),
                None => unknown.push((*a, *c, true)),
            }
        }
        for ((kind, name), c) in &named {
            let source = node(*kind, name, kind.is_service().then_some(name.as_str()));
            edge(source, name.clone(), c);
        }
        unknown.sort_by(|a, b| total(&b.1).cmp(&total(&a.1)).then(a.0.cmp(&b.0)));
        for (a, c, _) in unknown.iter().take(top_k) {
            let text = a.to_string();
            let source = node(Kind::Address, &text, None);
            edge(source, text, c);
        }
        // Addresses past the top-K go back where they were taken from.
        for (a, c, in_bucket) in unknown.iter().skip(top_k) {
            match buckets.get_mut(&bucket(a)) {
                Some(b) if *in_bucket => b.add(c),
                _ => other.add(c),
            }
        }
        let mut bs: Vec<(Bucket, PeerCounters)> =
            buckets.into_iter().filter(|(_, c)| !c.is_zero()).collect();
        bs.sort_by(|a, b| total(&b.1).cmp(&total(&a.1)).then(a.0.cmp(&b.0)));
        for (b, c) in bs.iter().take(top_k) {
            let text = bucket_text(b);
            let source = node(Kind::Bucket, &text, None);
            edge(source, text, c);
        }
        for (_, c) in bs.iter().skip(top_k) {
            other.add(c);
        }
        if !other.is_zero() {
            let source = node(Kind::Other, &svc.name, Some(&svc.name));
            edge(source, crate::api_types::MAP_OTHER.to_string(), &other);
        }
    }
    t::ServiceMap {
        nodes: nodes.into_values().collect(),
        edges,
        top_k: top_k as u64,
        evictions: snap.evictions(),
    }
}

/// The named-service peers of each slot: (slot, peer name) → figures,
/// for the metrics.
pub fn service_peers(snap: &Snapshot, naming: &Naming) -> BTreeMap<(u32, String), PeerCounters> {
    let mut out: BTreeMap<(u32, String), PeerCounters> = BTreeMap::new();
    for ((slot, a), c) in &snap.named {
        if let Some((kind, name)) = naming.get(a)
            && kind.is_service()
        {
            out.entry((*slot, name.clone())).or_default().add(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(pin: u64, pout: u64) -> PeerCounters {
        PeerCounters {
            packets: [pin, pout],
            bytes: [pin * 100, pout * 100],
            conns: 0,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn buckets_mask_to_24_and_48() {
        assert_eq!(bucket(&ip("10.1.2.3")), (ip("10.1.2.0"), 24));
        assert_eq!(bucket(&ip("fd00:1:2:3::9")), (ip("fd00:1:2::"), 48));
    }

    #[test]
    fn top_k_named_buckets_and_other_add_up() {
        let svc = Svc {
            name: "web".into(),
            slot: 8,
            kind: Kind::Service,
        };
        let mut snap = Snapshot::default();
        let db = ip("10.9.0.2");
        snap.named.insert((8, db), c(5, 5));
        // Three unknown addresses in one /24, one in another; top-1.
        let addrs = [
            ("10.0.0.1", 10),
            ("10.0.0.2", 3),
            ("10.0.0.3", 1),
            ("10.7.0.1", 2),
        ];
        for (a, n) in addrs {
            snap.addrs.insert((8, ip(a)), c(n, 0));
        }
        snap.buckets.insert((8, (ip("10.0.0.0"), 24)), c(14 + 6, 0));
        snap.buckets.insert((8, (ip("10.7.0.0"), 24)), c(2, 0));
        snap.unbucketed.insert(8, c(1, 0));
        snap.inserts = 10;
        snap.live = 4;
        let naming = Naming {
            by_addr: BTreeMap::from([(db, (Kind::Container, "db".to_string()))]),
        };
        let m = build(
            &snap,
            &naming,
            std::slice::from_ref(&svc),
            1,
            &BTreeMap::new(),
        );
        let peers: Vec<(&str, u64)> = m
            .edges
            .iter()
            .map(|e| (e.peer.as_str(), e.packets_in))
            .collect();
        // db (named), 10.0.0.1 (top-1 address), the busiest bucket less
        // what is shown (10.0.0.0/24: 20 - 10), the rest ~other: the
        // other bucket (2) and the unbucketed (1).
        assert_eq!(
            peers,
            vec![
                ("db", 5),
                ("10.0.0.1", 10),
                ("10.0.0.0/24", 10),
                ("~other", 3)
            ]
        );
        let sum: u64 = m.edges.iter().map(|e| e.packets_in).sum();
        assert_eq!(sum, 5 + 20 + 2 + 1);
        assert_eq!(m.evictions, 6);
        assert!(m.edges.iter().all(|e| e.target == "service:web"));
        assert_eq!(m.edges[0].source, "container:db");
        assert!(
            m.nodes
                .iter()
                .any(|n| n.id == "other:web" && n.kind == "other")
        );
    }
}
