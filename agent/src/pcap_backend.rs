//! The pcap backend: the kernel programs' per-service counters, from
//! libpcap captures, for hosts where eBPF cannot load. One capture per
//! interface and direction (immediate mode, a sized buffer, headers only),
//! each on its own thread, parsed and classified by `packet` into the same
//! slots the kernel would use. `probe::Probe` drives it through the same
//! calls as the kernel programs, so identity, metrics and the API do not
//! know which backend counts.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::Path,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use agent_ebpf::{
    DIR_EGRESS, DIR_INGRESS, DirCounters, EndpointKey, FIRST_SERVICE_SLOT, Group4, Group6,
    HIST_BUCKETS, Key4, Key6, MAX_SLOTS, PROTO_TCP, SLOT_NO_MATCH, SlotCounters, TCP_COUNTS,
    TCP_SLOTS, TcpCounters,
    classify::{self, ContainerTables},
};
use rustc_hash::FxHashMap;
use tracing::{info, warn};

use crate::{
    interfaces::Zone,
    packet::{self, Flow, Link, TCP_FIN, TCP_RST, TCP_SYN, Table},
    tcp_track::{self, Segment, Tracker},
};

/// Bytes of each packet copied to us: headers only (the kernel programs
/// read no further than 512 bytes in either).
const SNAPLEN: i32 = 640;
/// Kernel buffer of a headers-only capture (the backend's: ~12,000
/// packets of `SNAPLEN`).
const BUFFER_BYTES: i32 = 8 << 20;
/// Kernel buffer of a whole-packet capture (on demand, pre-trigger rings).
pub const FULL_BUFFER_BYTES: i32 = 16 << 20;
/// Bytes kept of each packet by a whole-packet capture.
pub const FULL_SNAPLEN: i32 = 65_535;
/// How long a capture waits for a packet before it looks at its stop flag.
const POLL_MS: i32 = 100;

/// Opens a live capture on `interface` the one way the agent does: not
/// promiscuous, immediate delivery, a 100 ms read timeout; headers only
/// (`whole` false: the backend) or whole packets (captures and rings).
pub fn open_live(interface: &str, whole: bool) -> Result<pcap::Capture<pcap::Active>, pcap::Error> {
    let (snaplen, buffer) = if whole {
        (FULL_SNAPLEN, FULL_BUFFER_BYTES)
    } else {
        (SNAPLEN, BUFFER_BYTES)
    };
    pcap::Capture::from_device(interface).and_then(|c| {
        c.immediate_mode(true)
            .buffer_size(buffer)
            .snaplen(snaplen)
            .timeout(POLL_MS)
            .promisc(false)
            .open()
    })
}

#[derive(Default)]
struct Dir {
    packets: AtomicU64,
    bytes: AtomicU64,
    syn: AtomicU64,
    fin: AtomicU64,
    rst: AtomicU64,
}

impl Dir {
    #[inline]
    fn add(&self, bytes: u64, flags: u8) {
        self.packets.fetch_add(1, Relaxed);
        self.bytes.fetch_add(bytes, Relaxed);
        if flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0 {
            self.syn.fetch_add(u64::from(flags & TCP_SYN != 0), Relaxed);
            self.fin.fetch_add(u64::from(flags & TCP_FIN != 0), Relaxed);
            self.rst.fetch_add(u64::from(flags & TCP_RST != 0), Relaxed);
        }
    }

    fn load(&self) -> DirCounters {
        DirCounters {
            packets: self.packets.load(Relaxed),
            bytes: self.bytes.load(Relaxed),
            syn: self.syn.load(Relaxed),
            fin: self.fin.load(Relaxed),
            rst: self.rst.load(Relaxed),
        }
    }

    fn zero(&self) {
        for c in [&self.packets, &self.bytes, &self.syn, &self.fin, &self.rst] {
            c.store(0, Relaxed);
        }
    }
}

#[derive(Default)]
struct Slot {
    dir: [Dir; 2],
}

/// One slot's TCP figures from headers (`tcp_track`), as atomics: the
/// trackers add, readers load. Written per connection event, not per
/// packet.
#[derive(Default)]
struct TcpSlot {
    counts: [AtomicU64; TCP_COUNTS],
    buckets: [AtomicU64; HIST_BUCKETS],
    sum_us: AtomicU64,
    /// Retransmissions by direction (service's view).
    retrans: [AtomicU64; 2],
}

impl TcpSlot {
    fn load(&self) -> TcpCounters {
        let mut t = TcpCounters::default();
        for (a, b) in t.counts.iter_mut().zip(&self.counts) {
            *a = b.load(Relaxed);
        }
        for (a, b) in t.handshake.buckets.iter_mut().zip(&self.buckets) {
            *a = b.load(Relaxed);
        }
        t.handshake.sum_us = self.sum_us.load(Relaxed);
        t
    }

    fn zero(&self) {
        let all = self.counts.iter().chain(&self.buckets).chain(&self.retrans);
        for c in all.chain([&self.sum_us]) {
            c.store(0, Relaxed);
        }
    }
}

/// The trackers' findings into the shared atomics.
struct TcpSink<'a>(&'a Shared);

impl tcp_track::Sink for TcpSink<'_> {
    fn count(&mut self, slot: u32, index: usize) {
        if let Some(c) = self
            .0
            .tcp
            .get(slot as usize)
            .and_then(|s| s.counts.get(index))
        {
            c.fetch_add(1, Relaxed);
        }
    }
    fn handshake(&mut self, slot: u32, us: u64) {
        if let Some(s) = self.0.tcp.get(slot as usize) {
            if let Some(b) = s.buckets.get(agent_ebpf::Hist::bucket(us)) {
                b.fetch_add(1, Relaxed);
            }
            s.sum_us.fetch_add(us, Relaxed);
        }
    }
    fn retransmit(&mut self, slot: u32, dir: usize) {
        if let Some(s) = self.0.tcp.get(slot as usize) {
            s.retrans[dir & 1].fetch_add(1, Relaxed);
        }
    }
    fn evicted(&mut self, n: u64) {
        self.0.tcp_evicted.fetch_add(n, Relaxed);
    }
}

/// What every capture reads: the tables and where it counts.
struct Tables {
    table: Table,
    /// Container addresses (`NP_ADDRS4`/`6`), wire bytes as words.
    addrs4: FxHashMap<u32, u32>,
    addrs6: FxHashMap<[u32; 4], u32>,
    veths: FxHashMap<u32, u32>,
}

/// The kernel's classifier reads these as it reads the maps.
impl classify::Tables for Tables {
    #[inline]
    fn port(&self, index: u32) -> u64 {
        self.table.port(index)
    }
    #[inline]
    fn group4(&self, g: u32) -> Option<&Group4> {
        self.table.group4(g)
    }
    #[inline]
    fn group6(&self, g: u32) -> Option<&Group6> {
        self.table.group6(g)
    }
    #[inline]
    fn service4(&self, key: &Key4) -> Option<u32> {
        self.table.service4(key)
    }
    #[inline]
    fn service6(&self, key: &Key6) -> Option<u32> {
        self.table.service6(key)
    }
}

impl ContainerTables for Tables {
    #[inline]
    fn veth(&self, ifindex: u32) -> Option<u32> {
        self.veths.get(&ifindex).copied()
    }
    #[inline]
    fn addr4(&self, addr: u32) -> Option<u32> {
        self.addrs4.get(&addr).copied()
    }
    #[inline]
    fn addr6(&self, addr: &[u32; 4]) -> Option<u32> {
        self.addrs6.get(addr).copied()
    }
}

struct Shared {
    /// The receive path (what the kernel counts at XDP / TC ingress) and
    /// the transmit path (TC egress), like the kernel's two arrays.
    rx: Vec<Slot>,
    tx: Vec<Slot>,
    /// TCP figures of the slots below `TCP_SLOTS`, as the kernel keeps them.
    tcp: Vec<TcpSlot>,
    /// Connections the trackers dropped from full tables.
    tcp_evicted: AtomicU64,
    tables: RwLock<Arc<Tables>>,
    /// Bumped on every table change; captures re-read `tables` when it moves.
    generation: AtomicU64,
    /// Packets libpcap dropped, by interface: what stopped captures dropped
    /// and the live captures' own counters. Its own small lock, taken when a
    /// capture starts or stops and when /metrics reads it.
    drops: std::sync::Mutex<BTreeMap<String, IfDrops>>,
}

#[derive(Default)]
struct IfDrops {
    retired: u64,
    live: Vec<Arc<AtomicU64>>,
}

impl Shared {
    fn dropped(&self) -> BTreeMap<String, u64> {
        let drops = self.drops.lock().unwrap_or_else(|p| p.into_inner());
        drops
            .iter()
            .map(|(name, d)| {
                (
                    name.clone(),
                    d.retired + d.live.iter().map(|x| x.load(Relaxed)).sum::<u64>(),
                )
            })
            .collect()
    }

    fn counts(&self, slot: u32) -> (SlotCounters, SlotCounters) {
        (Pcap::read(&self.rx, slot), Pcap::read(&self.tx, slot))
    }
}

/// A read-only handle on the backend's counters and drops: what /metrics
/// and the API read while the agent changes tables and captures.
#[derive(Clone)]
pub struct Reader {
    shared: Arc<Shared>,
}

impl Reader {
    /// (receive path, transmit path) counters of a slot.
    pub fn counts(&self, slot: u32) -> (SlotCounters, SlotCounters) {
        self.shared.counts(slot)
    }

    /// Packets libpcap dropped, by interface, since this agent started.
    pub fn dropped(&self) -> BTreeMap<String, u64> {
        self.shared.dropped()
    }

    /// The slot's TCP figures from packet headers (`tcp_track`), summed
    /// over interfaces; `None` for slots without TCP figures (from
    /// `TCP_SLOTS` on). What headers cannot tell (`tcp_track::UNAVAILABLE`:
    /// timeouts, aborts, RTT) stays zero. `counts[TCP_RETRANS]` is both
    /// directions: see [`Reader::tcp_retransmits`].
    pub fn tcp(&self, slot: u32) -> Option<TcpCounters> {
        self.shared.tcp.get(slot as usize).map(TcpSlot::load)
    }

    /// Retransmitted segments of the slot by direction in the service's
    /// view (`[toward it, from it]`); a local service's own are the
    /// second, a remote service's (this host as its client) the first.
    pub fn tcp_retransmits(&self, slot: u32) -> [u64; 2] {
        self.shared.tcp.get(slot as usize).map_or([0; 2], |s| {
            [s.retrans[0].load(Relaxed), s.retrans[1].load(Relaxed)]
        })
    }

    /// Connections the TCP trackers dropped because their table was full.
    pub fn tcp_evicted(&self) -> u64 {
        self.shared.tcp_evicted.load(Relaxed)
    }
}

/// Which way a capture sees packets, in kernel-hook terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hooks {
    /// Received packets (XDP / TC ingress).
    In,
    /// Sent packets (TC egress).
    Out,
    /// Loopback: libpcap shows each packet once, where the kernel runs
    /// both hooks on it.
    Both,
}

struct Running {
    stop: Arc<AtomicBool>,
    /// Wakes a capture blocked in poll(2) (libpcap's eventfd on Linux).
    wake: Vec<pcap::BreakLoop>,
    threads: Vec<JoinHandle<()>>,
    drops: Vec<Arc<AtomicU64>>,
}

impl Running {
    fn dropped(&self) -> u64 {
        self.drops.iter().map(|d| d.load(Relaxed)).sum()
    }
}

pub struct Pcap {
    shared: Arc<Shared>,
    captures: BTreeMap<String, Running>,
    table: BTreeMap<EndpointKey, u32>,
    addrs: BTreeMap<IpAddr, u32>,
    veths: BTreeMap<u32, u32>,
    names: BTreeMap<u32, String>,
}

impl Default for Pcap {
    fn default() -> Self {
        Self::new()
    }
}

fn is_loopback(ifname: &str) -> bool {
    // IFF_LOOPBACK in the interface flags.
    std::fs::read_to_string(Path::new("/sys/class/net").join(ifname).join("flags"))
        .ok()
        .and_then(|s| u32::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok())
        .is_some_and(|f| f & 0x8 != 0)
}

impl Pcap {
    pub fn new() -> Pcap {
        let slots = || (0..MAX_SLOTS).map(|_| Slot::default()).collect();
        Pcap {
            shared: Arc::new(Shared {
                rx: slots(),
                tx: slots(),
                tcp: (0..TCP_SLOTS).map(|_| TcpSlot::default()).collect(),
                tcp_evicted: AtomicU64::new(0),
                tables: RwLock::new(Arc::new(Tables {
                    table: Table::default(),
                    addrs4: FxHashMap::default(),
                    addrs6: FxHashMap::default(),
                    veths: FxHashMap::default(),
                })),
                generation: AtomicU64::new(0),
                drops: Default::default(),
            }),
            captures: BTreeMap::new(),
            table: BTreeMap::new(),
            addrs: BTreeMap::new(),
            veths: BTreeMap::new(),
            names: BTreeMap::new(),
        }
    }

    /// Starts capturing on `ifname`: one capture per direction (one on
    /// loopback). Errors name what libpcap said.
    pub fn start(&mut self, ifname: &str, zone: Zone, ifindex: u32) -> Result<(), String> {
        self.stop(ifname);
        let hooks: &[Hooks] = if is_loopback(ifname) {
            &[Hooks::Both]
        } else {
            &[Hooks::In, Hooks::Out]
        };
        let mut caps = Vec::new();
        for h in hooks {
            let cap = open_live(ifname, false).map_err(|e| format!("libpcap: {e}"))?;
            match h {
                Hooks::In => cap.direction(pcap::Direction::In),
                Hooks::Out => cap.direction(pcap::Direction::Out),
                Hooks::Both => Ok(()),
            }
            .map_err(|e| format!("libpcap direction: {e}"))?;
            let dlt = cap.get_datalink().0;
            let link = Link::from_dlt(dlt)
                .ok_or_else(|| format!("link type {dlt} is not one netpulse parses"))?;
            caps.push((cap, link, *h));
        }
        let stop = Arc::new(AtomicBool::new(false));
        // One tracker per interface: its two captures see the two
        // directions of the same connections, each in order, the two
        // interleaved any way (one thread can fall a connection behind the
        // other; `tcp_track` copes). Loopback has one capture, each packet
        // once (libpcap drops the outgoing copy there).
        let tracker = Arc::new(Mutex::new(Tracker::new(tcp_track::DEFAULT_CAPACITY)));
        let mut running = Running {
            stop: stop.clone(),
            wake: Vec::new(),
            threads: Vec::new(),
            drops: Vec::new(),
        };
        for (mut cap, link, h) in caps {
            running.wake.push(cap.breakloop_handle());
            let drops = Arc::new(AtomicU64::new(0));
            running.drops.push(drops.clone());
            let tap = Tap {
                shared: self.shared.clone(),
                link,
                hooks: h,
                zone,
                ifindex,
                stop: stop.clone(),
                drops,
                ifname: ifname.to_string(),
                tracker: tracker.clone(),
            };
            let t = std::thread::Builder::new()
                .name(format!("pcap-{ifname}"))
                .spawn(move || tap.run(cap))
                .map_err(|e| format!("starting the capture thread: {e}"))?;
            running.threads.push(t);
        }
        info!(
            interface = ifname,
            zone = zone.as_str(),
            "capturing with libpcap"
        );
        self.shared
            .drops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(ifname.to_string())
            .or_default()
            .live = running.drops.clone();
        self.captures.insert(ifname.to_string(), running);
        Ok(())
    }

    /// Stops the captures on `ifname`, if any.
    pub fn stop(&mut self, ifname: &str) {
        let Some(mut r) = self.captures.remove(ifname) else {
            return;
        };
        r.stop.store(true, Relaxed);
        for w in &r.wake {
            w.breakloop();
        }
        let threads = std::mem::take(&mut r.threads);
        for t in threads {
            let _ = t.join();
        }
        // The counter never goes back: what the stopped capture dropped
        // stays in the interface's total.
        let dropped = r.dropped();
        let mut drops = self.shared.drops.lock().unwrap_or_else(|p| p.into_inner());
        let d = drops.entry(ifname.to_string()).or_default();
        d.retired += dropped;
        d.live.clear();
    }

    /// The read-only handle on the counters (see [`Reader`]).
    pub fn reader(&self) -> Reader {
        Reader {
            shared: self.shared.clone(),
        }
    }

    /// Packets libpcap dropped (its buffer was full), by interface, since
    /// this agent started.
    pub fn dropped(&self) -> BTreeMap<String, u64> {
        self.shared.dropped()
    }

    fn publish(&self) {
        let mut tables = Tables {
            table: Table::with_slots(self.table.iter().map(|(k, s)| (*k, *s))),
            addrs4: FxHashMap::default(),
            addrs6: FxHashMap::default(),
            veths: self.veths.iter().map(|(i, s)| (*i, *s)).collect(),
        };
        for (a, s) in &self.addrs {
            let mut k = EndpointKey::default();
            match a {
                IpAddr::V4(v4) => {
                    k.set_addr(&v4.octets());
                    tables.addrs4.insert(k.addr[0], *s);
                }
                IpAddr::V6(v6) => {
                    k.set_addr(&v6.octets());
                    tables.addrs6.insert(k.addr, *s);
                }
            }
        }
        if let Ok(mut t) = self.shared.tables.write() {
            *t = Arc::new(tables);
        }
        self.shared.generation.fetch_add(1, Relaxed);
    }

    pub fn table(&self) -> &BTreeMap<EndpointKey, u32> {
        &self.table
    }

    pub fn sync_table(&mut self, want: BTreeMap<EndpointKey, u32>) -> usize {
        if want == self.table {
            return 0;
        }
        let changes = want
            .iter()
            .filter(|(k, v)| self.table.get(k) != Some(v))
            .count()
            + self.table.keys().filter(|k| !want.contains_key(k)).count();
        self.table = want;
        self.publish();
        changes
    }

    pub fn sync_addrs(&mut self, want: &BTreeMap<IpAddr, u32>) -> usize {
        if *want == self.addrs {
            return 0;
        }
        let changes = want.len().abs_diff(self.addrs.len()).max(1);
        self.addrs = want.clone();
        self.publish();
        changes
    }

    pub fn sync_veths(&mut self, want: &BTreeMap<u32, u32>) -> usize {
        if *want == self.veths {
            return 0;
        }
        let changes = want.len().abs_diff(self.veths.len()).max(1);
        self.veths = want.clone();
        self.publish();
        changes
    }

    pub fn addrs(&self) -> &BTreeMap<IpAddr, u32> {
        &self.addrs
    }

    pub fn addr_count(&self) -> (usize, usize) {
        let v4 = self.addrs.keys().filter(|a| a.is_ipv4()).count();
        (v4, self.addrs.len() - v4)
    }

    pub fn veth_count(&self) -> usize {
        self.veths.len()
    }

    fn read(path: &[Slot], slot: u32) -> SlotCounters {
        match path.get(slot as usize) {
            Some(s) => SlotCounters {
                dir: [s.dir[0].load(), s.dir[1].load()],
            },
            None => SlotCounters::default(),
        }
    }

    /// (receive path, transmit path) counters of a slot.
    pub fn counts(&self, slot: u32) -> (SlotCounters, SlotCounters) {
        self.shared.counts(slot)
    }

    pub fn zero(&mut self, slot: u32) {
        if let Some(t) = self.shared.tcp.get(slot as usize) {
            t.zero();
        }
        for path in [&self.shared.rx, &self.shared.tx] {
            if let Some(s) = path.get(slot as usize) {
                s.dir[0].zero();
                s.dir[1].zero();
            }
        }
    }

    pub fn slot_names(&self) -> BTreeMap<u32, String> {
        self.names.clone()
    }

    pub fn set_slot_name(&mut self, slot: u32, name: Option<&str>) {
        match name {
            Some(n) => self.names.insert(slot, n.to_string()),
            None => self.names.remove(&slot),
        };
    }

    pub fn stop_all(&mut self) {
        let names: Vec<String> = self.captures.keys().cloned().collect();
        for n in names {
            self.stop(&n);
        }
    }
}

impl Drop for Pcap {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// One capture's view: where it counts and what it is.
struct Tap {
    shared: Arc<Shared>,
    link: Link,
    hooks: Hooks,
    zone: Zone,
    ifindex: u32,
    stop: Arc<AtomicBool>,
    drops: Arc<AtomicU64>,
    ifname: String,
    tracker: Arc<Mutex<Tracker>>,
}

impl Tap {
    /// A TCP segment of a service slot through the interface's tracker.
    #[inline]
    fn track(&self, data: &[u8], p: &pcap::PacketHeader, f: &Flow, slot: u32, dir: usize) {
        if !(FIRST_SERVICE_SLOT..TCP_SLOTS).contains(&slot) {
            return;
        }
        let Some(tcp) = packet::tcp_header(self.link, data, p.len) else {
            return;
        };
        let ts_us = (p.ts.tv_sec as u64)
            .wrapping_mul(1_000_000)
            .wrapping_add(p.ts.tv_usec as u64);
        let seg = Segment::new(f, ts_us, slot, dir, tcp);
        let mut t = self.tracker.lock().unwrap_or_else(|p| p.into_inner());
        t.segment(&seg, &mut TcpSink(&self.shared));
    }

    /// Counts one packet as the kernel hook of direction `hook_dir` would;
    /// its slot and direction (service's view).
    #[inline]
    fn count(
        &self,
        t: &Tables,
        parsed: packet::Parsed,
        f: &Flow,
        len: u64,
        hook_dir: usize,
    ) -> (u32, usize) {
        let path = if hook_dir == DIR_INGRESS {
            &self.shared.rx
        } else {
            &self.shared.tx
        };
        let (slot, dir, flags) = match parsed {
            Ok(()) => {
                let (slot, dir) = match self.zone {
                    Zone::Host => t.table.classify_hook(f, hook_dir),
                    // Ingress at the host-side veth is what the container sends.
                    // The kernel's `classify_container`.
                    Zone::Container => match classify::classify_container(
                        t,
                        &f.parsed(),
                        hook_dir ^ 1,
                        self.ifindex,
                    ) {
                        Some(s) => (s, hook_dir ^ 1),
                        None => (SLOT_NO_MATCH, hook_dir),
                    },
                };
                (slot, dir, f.tcp_flags)
            }
            Err(slot) => (slot, hook_dir, 0),
        };
        if let Some(s) = path.get(slot as usize) {
            s.dir[dir & 1].add(len, flags);
        }
        (slot, dir)
    }

    fn tables(&self) -> Arc<Tables> {
        match self.shared.tables.read() {
            Ok(t) => t.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Reads packets until told to stop or the interface goes away.
    fn run(self, mut cap: pcap::Capture<pcap::Active>) {
        let mut flow = Flow::default();
        let mut seen = self.shared.generation.load(Relaxed);
        let mut tables = self.tables();
        let mut last_stats = Instant::now();
        while !self.stop.load(Relaxed) {
            match cap.next_packet() {
                Ok(p) => {
                    // The tables as they are now, not as they were when
                    // this capture went to sleep.
                    let g = self.shared.generation.load(Relaxed);
                    if g != seen {
                        seen = g;
                        tables = self.tables();
                    }
                    let len = u64::from(p.header.len);
                    let parsed = packet::parse(self.link, p.data, &mut flow);
                    let (slot, dir) = match self.hooks {
                        Hooks::In => self.count(&tables, parsed, &flow, len, DIR_INGRESS),
                        Hooks::Out => self.count(&tables, parsed, &flow, len, DIR_EGRESS),
                        Hooks::Both => {
                            let out = self.count(&tables, parsed, &flow, len, DIR_EGRESS);
                            let inn = self.count(&tables, parsed, &flow, len, DIR_INGRESS);
                            // Both ends are here: the service at either.
                            if inn.0 >= FIRST_SERVICE_SLOT {
                                inn
                            } else {
                                out
                            }
                        }
                    };
                    if parsed.is_ok() && flow.proto == PROTO_TCP {
                        self.track(p.data, p.header, &flow, slot, dir);
                    }
                }
                Err(pcap::Error::TimeoutExpired) => {}
                // pcap_breakloop: `stop` is set.
                Err(pcap::Error::NoMorePackets) => {}
                Err(e) => {
                    // The interface went away; the refresh loop notices
                    // and stops or restarts this capture.
                    warn!(interface = %self.ifname, error = %e, "capture stopped");
                    break;
                }
            }
            if last_stats.elapsed() >= Duration::from_secs(1) {
                last_stats = Instant::now();
                if let Ok(s) = cap.stats() {
                    self.drops.store(u64::from(s.dropped), Relaxed);
                }
            }
        }
        if let Ok(s) = cap.stats() {
            self.drops.store(u64::from(s.dropped), Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::TcpHeader;
    use agent_ebpf::{TCP_CLOSED, TCP_ESTABLISHED, TCP_RETRANS};

    #[test]
    fn the_trackers_findings_reach_the_reader_and_zero_clears_them() {
        let mut p = Pcap::new();
        let r = p.reader();
        let slot = FIRST_SERVICE_SLOT + 1;
        let mut t = Tracker::new(16);
        let seg = |ts_us, to: bool, flags, seq, ack, payload| {
            let (a, b) = ([10; 16], [20; 16]);
            Segment {
                ts_us,
                slot,
                dir: if to { DIR_INGRESS } else { DIR_EGRESS },
                family: 4,
                src: if to { a } else { b },
                dst: if to { b } else { a },
                sport: if to { 5000 } else { 80 },
                dport: if to { 80 } else { 5000 },
                tcp: TcpHeader {
                    seq,
                    ack,
                    flags,
                    window: 100,
                    payload,
                },
            }
        };
        let (s, a, f) = (TCP_SYN, 0x10, TCP_FIN);
        for g in [
            seg(1_000, true, s, 1, 0, 0),
            seg(1_030, false, s | a, 9, 2, 0),
            seg(1_050, true, a, 2, 10, 0),
            seg(2_000, true, a, 2, 10, 100),
            seg(300_000, true, a, 2, 10, 100),
            seg(400_000, true, f | a, 102, 10, 0),
            seg(400_010, false, f | a, 10, 103, 0),
        ] {
            t.segment(&g, &mut TcpSink(&p.shared));
        }
        let c = r.tcp(slot).unwrap_or_default();
        assert_eq!(c.counts[TCP_ESTABLISHED], 1);
        assert_eq!(c.counts[TCP_CLOSED], 1);
        assert_eq!(c.counts[TCP_RETRANS], 1);
        assert_eq!((c.handshake.count(), c.handshake.sum_us), (1, 50));
        assert_eq!(r.tcp_retransmits(slot), [1, 0]);
        assert_eq!(r.tcp(TCP_SLOTS), None);
        p.zero(slot);
        assert_eq!(r.tcp(slot), Some(TcpCounters::default()));
        assert_eq!(r.tcp_retransmits(slot), [0, 0]);
    }
}
