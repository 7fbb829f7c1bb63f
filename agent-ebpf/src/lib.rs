//! What the kernel programs (`src/bin/netpulse.rs`) and the agent share,
//! written once: the map layouts, the wire constants, the frame parser
//! ([`parse`]), the classifier ([`classify`]) and, for the agent, how the
//! service table is laid out in the maps ([`layout`]).
//!
//! The agent reads and writes the same bytes through aya (the `user`
//! feature adds the `aya::Pod` impls). Changing any layout below means
//! bumping [`LAYOUT_VERSION`], so a restart pins a fresh set of maps
//! instead of misreading old ones. Every `repr(C)` type is held to its size
//! and alignment at compile time (the asserts after each).
#![cfg_attr(target_arch = "bpf", no_std)]

pub mod classify;
#[cfg(not(target_arch = "bpf"))]
pub mod layout;
pub mod parse;

/// Asserts a shared type's size and alignment at compile time: a field
/// added, removed or reordered must be a deliberate layout change.
macro_rules! layout_assert {
    ($t:ty, $size:expr, $align:expr) => {
        const _: () = assert!(core::mem::size_of::<$t>() == $size);
        const _: () = assert!(core::mem::align_of::<$t>() == $align);
    };
}

// Wire constants, for the parser and for whatever else reads frames.

/// Ethernet header: two addresses and the ethertype.
pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
/// 802.1Q VLAN tag.
pub const ETH_P_8021Q: u16 = 0x8100;
/// 802.1ad (QinQ) outer tag.
pub const ETH_P_8021AD: u16 = 0x88A8;
/// Bytes of one 802.1Q/802.1ad tag.
pub const VLAN_TAG_LEN: usize = 4;
/// VLAN tags followed (802.1Q, or 802.1ad outer + 802.1Q inner).
pub const MAX_VLAN_TAGS: usize = 2;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// IPv6 extension headers (IANA protocol numbers).
pub const IPV6_HOPOPTS: u8 = 0;
pub const IPV6_ROUTING: u8 = 43;
pub const IPV6_FRAGMENT: u8 = 44;
/// Authentication header: its length is in 4-byte units, minus 2.
pub const IPV6_AH: u8 = 51;
pub const IPV6_DSTOPTS: u8 = 60;
pub const IPV6_MOBILITY: u8 = 135;
pub const IPV6_HIP: u8 = 139;
pub const IPV6_SHIM6: u8 = 140;
/// Every extension header the parser walks over.
pub const IPV6_EXT_HEADERS: [u8; 8] = [
    IPV6_HOPOPTS,
    IPV6_ROUTING,
    IPV6_FRAGMENT,
    IPV6_AH,
    IPV6_DSTOPTS,
    IPV6_MOBILITY,
    IPV6_HIP,
    IPV6_SHIM6,
];
/// IPv6 extension headers followed before the chain counts as malformed.
pub const MAX_IPV6_EXT: usize = 6;
/// Header offsets beyond this are never needed; a header further in counts
/// as malformed. Bounding the offset keeps the verifier's range tracking
/// simple.
pub const MAX_HDR_OFF: usize = 512;

/// Whether two strings are equal, in a const context (the kernel programs
/// check their map and program names against [`maps`] and [`programs`]).
pub const fn str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// The counters and slot names are pinned under
/// `/sys/fs/bpf/netpulse/v<LAYOUT_VERSION>/`; the service table and port
/// index are rebuilt by every agent start.
pub const LAYOUT_VERSION: u32 = 1;

/// Size of the service table (endpoint matchers), in entries.
pub const MAX_ENDPOINTS: u32 = 65_536;
/// Number of counter slots: reserved slots plus services.
pub const MAX_SLOTS: u32 = 8_192;

/// Counter slots below this index are reserved for packets no service claimed;
/// services are numbered from here.
pub const FIRST_SERVICE_SLOT: u32 = 8;
/// A parseable IP packet whose endpoints match no service.
pub const SLOT_NO_MATCH: u32 = 0;
/// Truncated or invalid headers (short frame, IHL < 5, TCP data offset < 5,
/// IPv6 extension header chain too long).
pub const SLOT_MALFORMED: u32 = 1;
/// Not IPv4/IPv6 (ARP, LLDP, ...).
pub const SLOT_NOT_IP: u32 = 2;
/// A non-first IP fragment: it carries no ports to classify by.
pub const SLOT_FRAGMENT: u32 = 3;
/// Names of the reserved slots, as exported in the `reason` label.
pub const RESERVED_SLOTS: [(u32, &str); 4] = [
    (SLOT_NO_MATCH, "no_match"),
    (SLOT_MALFORMED, "malformed"),
    (SLOT_NOT_IP, "not_ip"),
    (SLOT_FRAGMENT, "fragment"),
];

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

/// The endpoint is on this host: matched by the packet's local end
/// (destination on ingress, source on egress).
pub const ROLE_LOCAL: u8 = 0;
/// The endpoint is a peer this host talks to: matched by the packet's other end.
pub const ROLE_REMOTE: u8 = 1;

/// The port index (`NP_PORTS`): one u64 per (family, protocol, port), so
/// classification is array look-ups in the common cases: a service on every
/// address (the wildcard slot), or up to a few address-specific services on
/// a port (a group, compared in place). Only ports with more
/// address-specific services than a group holds, and ports remote services
/// use, send packets to the hash tables.
pub const PORT_INDEX_LEN: u32 = 6 * 65_536;
/// Bits 0..24: the slot of the local wildcard-address service on this port.
pub const PORT_WILDCARD_MASK: u64 = 0x00ff_ffff;
/// Bits 32..56: the port's address group (0 = none) in `NP_GROUPS4` or
/// `NP_GROUPS6`, by the index's family.
pub const PORT_GROUP_SHIFT: u32 = 32;
pub const PORT_GROUP_MASK: u64 = 0x00ff_ffff;
/// The port has more address-specific local services than a group holds:
/// they are in the family's hash table.
pub const PORT_LOCAL_HASH: u64 = 1 << 63;
/// Some remote service uses this port (hash table).
pub const PORT_REMOTE: u64 = 1 << 62;

/// One word of the port index, read (the classifier) and written (the
/// agent's `layout`) through these, never by hand.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortEntry(pub u64);

impl PortEntry {
    /// The slot of the local wildcard-address service; 0 = none.
    #[inline(always)]
    pub fn wildcard(self) -> u32 {
        (self.0 & PORT_WILDCARD_MASK) as u32
    }
    /// The address group; 0 = none.
    #[inline(always)]
    pub fn group(self) -> u32 {
        ((self.0 >> PORT_GROUP_SHIFT) & PORT_GROUP_MASK) as u32
    }
    /// Address-specific local services in the hash table.
    #[inline(always)]
    pub fn local_hash(self) -> bool {
        self.0 & PORT_LOCAL_HASH != 0
    }
    /// Remote services on this port (hash table).
    #[inline(always)]
    pub fn remote(self) -> bool {
        self.0 & PORT_REMOTE != 0
    }
    pub fn set_wildcard(&mut self, slot: u32) {
        self.0 = (self.0 & !PORT_WILDCARD_MASK) | (u64::from(slot) & PORT_WILDCARD_MASK);
    }
    pub fn set_group(&mut self, g: u32) {
        self.0 = (self.0 & !(PORT_GROUP_MASK << PORT_GROUP_SHIFT))
            | ((u64::from(g) & PORT_GROUP_MASK) << PORT_GROUP_SHIFT);
    }
    pub fn set_local_hash(&mut self) {
        self.0 |= PORT_LOCAL_HASH;
    }
    pub fn set_remote(&mut self) {
        self.0 |= PORT_REMOTE;
    }
}

/// Container addresses (`NP_ADDRS4`/`NP_ADDRS6`): on a container's host-side
/// veth every packet of the container's address belongs to the container,
/// whatever the port (its server and its client traffic alike).
pub const MAX_ADDRS: u32 = 16_384;

/// Container veths (`NP_VETHS`): the container behind each host-side veth,
/// by ifindex (at `ifindex % MAX_VETHS`, the ifindex stored beside the
/// slot to tell collisions apart), so the veth programs find it with an
/// array look-up; the address table is the fallback.
pub const MAX_VETHS: u32 = 4096;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VethSlot {
    pub ifindex: u32,
    pub slot: u32,
}
layout_assert!(VethSlot, 8, 4);

impl VethSlot {
    /// Where the veth of `ifindex` is held in `NP_VETHS`.
    #[inline(always)]
    pub fn index(ifindex: u32) -> u32 {
        ifindex % MAX_VETHS
    }
    /// The container slot if this entry is `ifindex`'s.
    #[inline(always)]
    pub fn slot_of(&self, ifindex: u32) -> Option<u32> {
        (self.ifindex == ifindex && self.slot != 0).then_some(self.slot)
    }
}

/// Address groups per family; group 0 is never used.
pub const MAX_GROUPS: u32 = 16_384;

/// Up to four IPv4 addresses on one port and their slots (slot 0 = empty).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Group4 {
    pub addr: [u32; 4],
    pub slot: [u32; 4],
}
layout_assert!(Group4, 32, 4);

/// Up to two IPv6 addresses on one port and their slots (slot 0 = empty).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Group6 {
    pub addr: [[u32; 4]; 2],
    pub slot: [u32; 2],
}
layout_assert!(Group6, 40, 4);

/// An address group of either family: how its positions are read and
/// written. Addresses are the wire bytes as words (IPv4: the first word).
pub trait AddrGroup: Copy + Default {
    /// Positions in the group.
    const CAP: usize;
    /// The slot of `addr`, if the group holds it.
    fn find(&self, addr: &[u32; 4]) -> Option<u32>;
    /// The address at position `n`, if one is there.
    fn entry(&self, n: usize) -> Option<[u32; 4]>;
    /// Puts `addr` (slot `slot`) at position `n`.
    fn set(&mut self, n: usize, addr: &[u32; 4], slot: u32);
}

impl AddrGroup for Group4 {
    const CAP: usize = 4;
    #[inline(always)]
    fn find(&self, addr: &[u32; 4]) -> Option<u32> {
        for i in 0..4 {
            if self.slot[i] != 0 && self.addr[i] == addr[0] {
                return Some(self.slot[i]);
            }
        }
        None
    }
    fn entry(&self, n: usize) -> Option<[u32; 4]> {
        (self.slot[n] != 0).then_some([self.addr[n], 0, 0, 0])
    }
    fn set(&mut self, n: usize, addr: &[u32; 4], slot: u32) {
        self.addr[n] = addr[0];
        self.slot[n] = slot;
    }
}

impl AddrGroup for Group6 {
    const CAP: usize = 2;
    #[inline(always)]
    fn find(&self, addr: &[u32; 4]) -> Option<u32> {
        for i in 0..2 {
            if self.slot[i] != 0 && self.addr[i] == *addr {
                return Some(self.slot[i]);
            }
        }
        None
    }
    fn entry(&self, n: usize) -> Option<[u32; 4]> {
        (self.slot[n] != 0).then_some(self.addr[n])
    }
    fn set(&mut self, n: usize, addr: &[u32; 4], slot: u32) {
        self.addr[n] = *addr;
        self.slot[n] = slot;
    }
}

/// Index into `NP_PORTS`; `None` for protocols services cannot name.
#[inline(always)]
pub fn port_index(family: u8, proto: u8, port: u16) -> Option<u32> {
    let f = if family == FAMILY_V6 { 1 } else { 0 };
    let p = match proto {
        PROTO_TCP => 0,
        PROTO_UDP => 1,
        PROTO_ICMP | PROTO_ICMPV6 => 2,
        _ => return None,
    };
    Some(((f * 3 + p) << 16) | port as u32)
}

/// An endpoint as the agent thinks of it. The kernel holds it in the port
/// index (local wildcard-address endpoints) or in the per-family tables
/// ([`Key4`], [`Key6`]). An all-zero `addr` is the wildcard address of its
/// family.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointKey {
    pub family: u8,
    pub proto: u8,
    /// Host byte order; 0 for protocols without ports (ICMP).
    pub port: u16,
    pub role: u8,
    pub _pad: [u8; 3],
    /// The address bytes as they are on the wire, held as four 32-bit words
    /// so the kernel side copies it from the packet with word loads. IPv4
    /// uses the first word. Use [`EndpointKey::set_addr`] /
    /// [`EndpointKey::addr_bytes`] from userspace.
    pub addr: [u32; 4],
}
layout_assert!(EndpointKey, 24, 4);

impl EndpointKey {
    /// Sets the address from its wire bytes (4 for IPv4, 16 for IPv6).
    pub fn set_addr(&mut self, bytes: &[u8]) {
        let mut b = [0u8; 16];
        let n = if bytes.len() < 16 { bytes.len() } else { 16 };
        b[..n].copy_from_slice(&bytes[..n]);
        for (i, w) in self.addr.iter_mut().enumerate() {
            *w = u32::from_ne_bytes([b[i * 4], b[i * 4 + 1], b[i * 4 + 2], b[i * 4 + 3]]);
        }
    }

    pub fn addr_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        for (i, w) in self.addr.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        b
    }
}

/// Kernel key of the IPv4 table: 8 bytes, so the hash over it is short.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key4 {
    /// Wire bytes of the address as one word; 0 = wildcard.
    pub addr: u32,
    /// Host byte order.
    pub port: u16,
    pub proto: u8,
    pub role: u8,
}
layout_assert!(Key4, 8, 4);

/// Kernel key of the IPv6 table (20 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key6 {
    pub addr: [u32; 4],
    pub port: u16,
    pub proto: u8,
    pub role: u8,
}
layout_assert!(Key6, 20, 4);

impl EndpointKey {
    pub fn key4(&self) -> Key4 {
        Key4 {
            addr: self.addr[0],
            port: self.port,
            proto: self.proto,
            role: self.role,
        }
    }

    pub fn key6(&self) -> Key6 {
        Key6 {
            addr: self.addr,
            port: self.port,
            proto: self.proto,
            role: self.role,
        }
    }
}

/// Value of the service table: which counter slot the endpoint feeds.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceRef {
    pub slot: u32,
    pub _pad: u32,
}
layout_assert!(ServiceRef, 8, 4);

/// Counters of one direction, in the service's view.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirCounters {
    pub packets: u64,
    pub bytes: u64,
    pub syn: u64,
    pub fin: u64,
    pub rst: u64,
}
layout_assert!(DirCounters, 40, 8);

impl DirCounters {
    pub fn add(&mut self, o: &DirCounters) {
        self.packets = self.packets.wrapping_add(o.packets);
        self.bytes = self.bytes.wrapping_add(o.bytes);
        self.syn = self.syn.wrapping_add(o.syn);
        self.fin = self.fin.wrapping_add(o.fin);
        self.rst = self.rst.wrapping_add(o.rst);
    }
}

pub const DIR_INGRESS: usize = 0;
pub const DIR_EGRESS: usize = 1;

/// One counter slot: `[ingress, egress]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotCounters {
    pub dir: [DirCounters; 2],
}
layout_assert!(SlotCounters, 80, 8);

impl SlotCounters {
    pub fn add(&mut self, o: &SlotCounters) {
        self.dir[0].add(&o.dir[0]);
        self.dir[1].add(&o.dir[1]);
    }
}

/// Name of a service slot, kept in a pinned map so a restarted agent gives
/// every service back the slot (and the counts) it had.
pub const NAME_LEN: usize = 64;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotName {
    /// 0 = slot free.
    pub len: u32,
    pub bytes: [u8; NAME_LEN],
}
layout_assert!(SlotName, 68, 4);

impl Default for SlotName {
    fn default() -> Self {
        Self {
            len: 0,
            bytes: [0; NAME_LEN],
        }
    }
}

// TCP health (the tracing programs): per-slot connection results,
// handshake and RTT histograms and retransmits; kernel drops by reason.

/// Slots with TCP figures: the per-CPU TCP array is this long (services on
/// higher slots have packet counters but no TCP figures).
pub const TCP_SLOTS: u32 = 1_024;
/// Sockets followed at once (handshake start, reset seen, last RTT sample);
/// an LRU map, so the oldest are forgotten first.
pub const MAX_SOCKS: u32 = 65_536;
/// (slot, direction, reason) combinations of kernel drops.
pub const MAX_DROP_KEYS: u32 = 8_192;

/// Upper bounds of the histogram buckets in microseconds (Prometheus `le`);
/// one more bucket past the last is +Inf. Veth and loopback RTTs are tens
/// of microseconds, a SYN retried until the connect gives up takes seconds.
pub const HIST_BOUNDS_US: [u64; 20] = [
    8, 16, 32, 64, 128, 256, 512, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000,
];
pub const HIST_BUCKETS: usize = HIST_BOUNDS_US.len() + 1;

/// A histogram: per-bucket counts (not cumulative) and the sum in µs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hist {
    pub buckets: [u64; HIST_BUCKETS],
    pub sum_us: u64,
}
layout_assert!(Hist, 176, 8);

impl Hist {
    /// The bucket `us` falls in.
    #[inline(always)]
    pub fn bucket(us: u64) -> usize {
        let mut i = 0;
        while i < HIST_BOUNDS_US.len() {
            if us <= HIST_BOUNDS_US[i] {
                return i;
            }
            i += 1;
        }
        HIST_BOUNDS_US.len()
    }

    pub fn count(&self) -> u64 {
        let mut n = 0u64;
        for b in self.buckets {
            n = n.wrapping_add(b);
        }
        n
    }

    pub fn add(&mut self, o: &Hist) {
        for (a, b) in self.buckets.iter_mut().zip(o.buckets.iter()) {
            *a = a.wrapping_add(*b);
        }
        self.sum_us = self.sum_us.wrapping_add(o.sum_us);
    }

    /// Records one value.
    #[inline(always)]
    pub fn record(&mut self, us: u64) {
        let b = Self::bucket(us);
        if b < HIST_BUCKETS {
            self.buckets[b] += 1;
        }
        self.sum_us += us;
    }
}

/// Indices of [`TcpCounters::counts`]. The results first, in the order of
/// [`TCP_RESULTS`].
pub const TCP_ESTABLISHED: usize = 0;
pub const TCP_REFUSED: usize = 1;
pub const TCP_TIMEOUT: usize = 2;
pub const TCP_ABORTED: usize = 3;
pub const TCP_RESET: usize = 4;
pub const TCP_CLOSED: usize = 5;
/// Established connections that left the established states (the open
/// gauge is established − ended, plus the count seeded at start).
pub const TCP_ENDED: usize = 6;
/// Segments retransmitted (SYN-ACKs included), as `TcpRetransSegs` counts.
pub const TCP_RETRANS: usize = 7;
/// SYN-ACKs sent again (their own counter: another program writes it, see
/// [`TcpCounters`]).
pub const TCP_RETRANS_SYNACK: usize = 8;
pub const TCP_COUNTS: usize = 9;
/// The `result` label of each result index.
pub const TCP_RESULTS: [(usize, &str); 6] = [
    (TCP_ESTABLISHED, "established"),
    (TCP_REFUSED, "refused"),
    (TCP_TIMEOUT, "timeout"),
    (TCP_ABORTED, "aborted"),
    (TCP_RESET, "reset"),
    (TCP_CLOSED, "closed"),
];

/// TCP figures of one slot. A slot has one side: a local service's
/// (or container's) are its server side, a `remote` service's this host's
/// client side.
///
/// Each field is written by one program only. Programs on one CPU can nest
/// (a softirq interrupting a process-context one) but a program never nests
/// into itself (the kernel skips and counts that), so per-CPU adds need no
/// atomics: hence the SYN-ACK retransmits and the RTT samples of open
/// connections have their own fields, summed by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpCounters {
    pub counts: [u64; TCP_COUNTS],
    pub handshake: Hist,
    /// RTT at close.
    pub rtt: Hist,
    /// RTT of open connections, sampled at most every few seconds.
    pub rtt_live: Hist,
}
layout_assert!(TcpCounters, 600, 8);

impl TcpCounters {
    pub fn add(&mut self, o: &TcpCounters) {
        for (a, b) in self.counts.iter_mut().zip(o.counts.iter()) {
            *a = a.wrapping_add(*b);
        }
        self.handshake.add(&o.handshake);
        self.rtt.add(&o.rtt);
        self.rtt_live.add(&o.rtt_live);
    }
}

/// Key of the drop map: a slot (or [`SLOT_NO_MATCH`] for drops no service
/// claims), the direction in the service's view, and the kernel's
/// `skb_drop_reason` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DropKey {
    pub slot: u32,
    pub reason: u32,
    pub dir: u32,
}
layout_assert!(DropKey, 12, 4);

/// What the tracing programs remember of one socket (keyed by its address).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockState {
    /// When the connect's SYN went out (client side), ns of CLOCK_MONOTONIC.
    pub start_ns: u64,
    /// Unused: the pinned map's value size stays 32 bytes.
    pub _reserved: u64,
    /// When the RTT was last sampled.
    pub rtt_ns: u64,
    pub slot: u32,
    /// `SOCK_*` bits.
    pub flags: u32,
}
layout_assert!(SockState, 32, 8);

pub const SOCK_CLIENT: u32 = 1;
pub const SOCK_SERVER: u32 = 2;
pub const SOCK_ESTABLISHED: u32 = 4;
pub const SOCK_RESET: u32 = 8;
/// Left the established states (counted in `TCP_ENDED`); the result is
/// counted when the socket is destroyed.
pub const SOCK_ENDED: u32 = 16;

/// Indices of the tracing programs' own per-CPU counters (`NP_TCP_META`).
pub const META_DROPS_UNRECORDED: u32 = 0;
pub const META_READ_ERRORS: u32 = 1;
pub const META_LEN: u32 = 4;

/// A connection's 4-tuple as the SYN to a local service carried it (the
/// client's end first), with when the ingress hook saw it: the server-side
/// handshake runs from there to the child socket's ESTABLISHED.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SynKey {
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    pub sport: u16,
    pub dport: u16,
}
layout_assert!(SynKey, 36, 4);

/// SYNs remembered at once (an LRU map).
pub const MAX_SYNS: u32 = 16_384;

/// A flow a health check makes, watched while the check runs: its local
/// port and its far end, as the check's socket sees them. Addresses are
/// wire bytes as words, IPv4 in the first word (as in `Flow`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct WatchKey {
    pub raddr: [u32; 4],
    pub family: u8,
    pub proto: u8,
    pub lport: u16,
    pub rport: u16,
    pub _pad: u16,
}
layout_assert!(WatchKey, 24, 4);

/// What the kernel saw of a watched flow: packets it dropped, by direction
/// (`WATCH_EGRESS`: the check's own, `WATCH_INGRESS`: its peer's), with the
/// last `skb_drop_reason` of each; resets the socket received. Per CPU, each
/// field written by one program only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WatchStats {
    pub drops: [u64; 2],
    pub reason: [u32; 2],
    pub resets: u32,
    /// Bit `1 << direction`: a drop of that direction was of a received
    /// packet (the input path: it came in on an interface, loopback
    /// included); without it, of one this host was sending (the output
    /// path).
    pub received: u32,
}
layout_assert!(WatchStats, 32, 8);

pub const WATCH_EGRESS: usize = 0;
pub const WATCH_INGRESS: usize = 1;
/// Flows watched at once: more than checks ever run at once.
pub const MAX_WATCH: u32 = 1_024;

/// Namespace kinds in `NP_NETNS` (keyed by the namespace's inode number).
pub const NETNS_HOST: u32 = 1;
pub const NETNS_CONTAINER: u32 = 2;
/// The key of `NP_NETNS` (no namespace has inode 0) whose value is how many
/// container namespaces are watched.
pub const NETNS_CONTAINERS_KEY: u32 = 0;

/// Kernel struct field offsets the tracing programs read at, found in the
/// running kernel's BTF by the agent and set as a global before loading.
/// An offset of `u32::MAX` is unknown.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offsets {
    // struct sock_common / sock / tcp_sock
    pub skc_family: u32,
    pub skc_state: u32,
    pub skc_daddr: u32,
    pub skc_rcv_saddr: u32,
    pub skc_dport: u32,
    pub skc_num: u32,
    pub skc_v6_daddr: u32,
    pub skc_v6_rcv_saddr: u32,
    pub skc_net: u32,
    pub sk_protocol: u32,
    pub sk_err: u32,
    pub srtt_us: u32,
    // struct net / ns_common
    pub net_inum: u32,
    // struct sk_buff
    pub skb_head: u32,
    pub skb_network_header: u32,
    pub skb_protocol: u32,
    pub skb_dev: u32,
    pub skb_sk: u32,
    /// `TCP_SKB_CB(skb)->tcp_gso_segs`: `cb` plus the member's offset.
    pub skb_gso_segs: u32,
    // struct net_device
    pub dev_nd_net: u32,
    /// `SKB_CONSUMED` in this kernel's `enum skb_drop_reason`.
    pub reason_consumed: u32,
    /// `sk_buff.skb_iif`: the interface a received packet came in on (0:
    /// sent by this host).
    pub skb_iif: u32,
}
layout_assert!(Offsets, 88, 4);

impl Offsets {
    pub const UNKNOWN: Offsets = Offsets {
        skc_family: u32::MAX,
        skc_state: u32::MAX,
        skc_daddr: u32::MAX,
        skc_rcv_saddr: u32::MAX,
        skc_dport: u32::MAX,
        skc_num: u32::MAX,
        skc_v6_daddr: u32::MAX,
        skc_v6_rcv_saddr: u32::MAX,
        skc_net: u32::MAX,
        sk_protocol: u32::MAX,
        sk_err: u32::MAX,
        srtt_us: u32::MAX,
        net_inum: u32::MAX,
        skb_head: u32::MAX,
        skb_network_header: u32::MAX,
        skb_protocol: u32::MAX,
        skb_dev: u32::MAX,
        skb_sk: u32::MAX,
        skb_gso_segs: u32::MAX,
        dev_nd_net: u32::MAX,
        reason_consumed: 1,
        skb_iif: u32::MAX,
    };
}

/// Map names, as pinned under the layout directory. The kernel programs'
/// map statics are named after these and checked against them at compile
/// time.
pub mod maps {
    pub const SERVICES4: &str = "NP_SERVICES4";
    pub const SERVICES6: &str = "NP_SERVICES6";
    pub const COUNTERS_XDP: &str = "NP_COUNTERS_XDP";
    pub const COUNTERS_TC: &str = "NP_COUNTERS_TC";
    pub const PORTS: &str = "NP_PORTS";
    pub const GROUPS4: &str = "NP_GROUPS4";
    pub const GROUPS6: &str = "NP_GROUPS6";
    pub const SLOT_NAMES: &str = "NP_SLOT_NAMES";
    pub const ADDRS4: &str = "NP_ADDRS4";
    pub const ADDRS6: &str = "NP_ADDRS6";
    pub const VETHS: &str = "NP_VETHS";
    pub const TCP: &str = "NP_TCP";
    pub const DROPS: &str = "NP_DROPS";
    pub const SOCKS: &str = "NP_SOCKS";
    pub const NETNS: &str = "NP_NETNS";
    pub const TCP_META: &str = "NP_TCP_META";
    pub const SYNS: &str = "NP_SYNS";
    pub const WATCH: &str = "NP_WATCH";
}

/// The global the agent sets before loading (see [`Offsets`]).
pub const OFFSETS_GLOBAL: &str = "NP_OFFSETS";

/// Program names in the object file (checked at compile time, like
/// [`maps`]).
pub mod programs {
    pub const XDP_INGRESS: &str = "netpulse_xdp";
    pub const TC_EGRESS: &str = "netpulse_tc";
    /// Ingress on host interfaces without native XDP (lo, some virtual
    /// NICs): TC, because generic (skb-mode) XDP copies every cloned skb
    /// (all of TCP's) to run at all.
    pub const TC_INGRESS: &str = "netpulse_tc_in";
    /// On a container's host-side veth (TC both ways; XDP on veth would
    /// change the container's datapath): ingress there is what the container
    /// sends, egress what it receives.
    pub const CT_FROM: &str = "netpulse_ct_from";
    pub const CT_TO: &str = "netpulse_ct_to";
    /// Empty XDP_PASS / TC_ACT_UNSPEC programs, the benchmark's baseline.
    pub const BASELINE_XDP: &str = "netpulse_baseline_xdp";
    pub const BASELINE_TC: &str = "netpulse_baseline_tc";
    /// TCP health: BTF tracepoints and fexit (attached through bpf() links,
    /// not perf_event_open).
    pub const SOCK_STATE: &str = "netpulse_sock_state";
    pub const RETRANSMIT: &str = "netpulse_retransmit";
    pub const RETRANSMIT_SYNACK: &str = "netpulse_retransmit_synack";
    pub const RECEIVE_RESET: &str = "netpulse_receive_reset";
    pub const SEND_RESET: &str = "netpulse_send_reset";
    pub const DESTROY_SOCK: &str = "netpulse_destroy_sock";
    pub const TCP_PROBE: &str = "netpulse_tcp_probe";
    pub const KFREE_SKB: &str = "netpulse_kfree_skb";
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, with explicit padding fields,
    // so every bit pattern is valid and there are no implicit holes.
    unsafe impl aya::Pod for Key4 {}
    unsafe impl aya::Pod for Group4 {}
    unsafe impl aya::Pod for Group6 {}
    unsafe impl aya::Pod for Key6 {}
    unsafe impl aya::Pod for ServiceRef {}
    unsafe impl aya::Pod for DirCounters {}
    unsafe impl aya::Pod for SlotCounters {}
    unsafe impl aya::Pod for SlotName {}
    unsafe impl aya::Pod for VethSlot {}
    unsafe impl aya::Pod for WatchKey {}
    unsafe impl aya::Pod for WatchStats {}
    unsafe impl aya::Pod for Hist {}
    unsafe impl aya::Pod for TcpCounters {}
    unsafe impl aya::Pod for DropKey {}
    unsafe impl aya::Pod for SockState {}
    unsafe impl aya::Pod for Offsets {}
    unsafe impl aya::Pod for SynKey {}
}

// Who talks to whom (`src/bin/peers.rs`, the agent's `peers`): per service
// slot and peer, packets, bytes and connections, counted on the packet
// path. Named peers (addresses the agent knows) have preallocated places per
// slot, so no flood of unknown addresses can push them out; unknown ones go
// to a bounded LRU and to prefix buckets that keep their totals.

/// Service slots with peer figures (services on higher slots have none).
pub const PEER_SLOTS: u32 = 256;
/// Places per slot in `NP_PEERS`: [`PEER_UNBUCKETED`], then one per named
/// address (index 1..PEER_NAMED), the same index in every slot.
pub const PEER_NAMED: u32 = 64;
/// Entries of `NP_PEERS`: a row per slot on each path (receive, transmit),
/// so the two paths, which may nest on a CPU, never add to the same value.
pub const PEER_PLACES: u32 = 2 * PEER_SLOTS * PEER_NAMED;

/// Where `NP_PEERS` holds named place `i` of `slot` on `path` (0: the
/// receive path, 1: the transmit path).
#[inline(always)]
pub fn peer_place(path: usize, slot: u32, i: u32) -> u32 {
    ((path as u32 & 1) * PEER_SLOTS + slot) * PEER_NAMED + i
}
/// The place of unknown peers that found no room in the bucket table.
pub const PEER_UNBUCKETED: u32 = 0;
/// Positions of the named-address table (a power of two): an address is
/// at one of the [`PEER_NAME_PROBES`] positions it hashes to.
pub const PEER_NAME_POSITIONS: u32 = 1_024;
pub const PEER_NAME_PROBES: u32 = 4;

/// A named address and its place (1..PEER_NAMED) in each slot's row;
/// family 0: a free position. An array, not a hash map: finding an address
/// is a few array loads (a hash look-up cost ~40 ns a packet here).
///
/// The agent only ever writes a free position (all zero) or frees one,
/// the place after the address: a packet read during the write sees at
/// worst a free position.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerName {
    pub addr: [u32; 4],
    pub family: u32,
    pub place: u32,
}
layout_assert!(PeerName, 24, 4);

/// A multiplicative hash of an address's words, for the positions of the
/// name and bucket tables.
#[inline(always)]
pub fn peer_hash(seed: u32, addr: &[u32; 4]) -> u32 {
    let mut h = seed.wrapping_mul(0x9e37_79b1);
    let mut i = 0;
    while i < 4 {
        h = (h ^ addr[i]).wrapping_mul(0x85eb_ca6b);
        h ^= h >> 15;
        i += 1;
    }
    h
}

/// Position `probe` (0..PEER_NAME_PROBES) of an address in the name table.
#[inline(always)]
pub fn peer_name_position(family: u8, addr: &[u32; 4], probe: u32) -> u32 {
    peer_hash(u32::from(family), addr).wrapping_add(probe) & (PEER_NAME_POSITIONS - 1)
}
/// Unknown (slot, address, path) entries followed at once: an LRU of
/// sets of [`PEER_WAYS`] ways (see [`PeerSet`]), [`PEER_ADDR_SETS`] for
/// each path (the receive path's first), so the two paths, which may nest
/// on a CPU, never write the same set.
pub const MAX_PEER_ADDRS: u32 = 16_384;
pub const PEER_WAYS: usize = 4;
pub const PEER_ADDR_SETS: u32 = MAX_PEER_ADDRS / PEER_WAYS as u32 / 2;
/// Positions of the bucket table (a power of two): (slot, prefix, path)
/// buckets of unknown peers, each at one of [`PEER_BUCKET_PROBES`]
/// positions its key hashes to; when those are taken by other buckets,
/// its peers count at [`PEER_UNBUCKETED`].
pub const MAX_PEER_BUCKETS: u32 = 8_192;
pub const PEER_BUCKET_PROBES: u32 = 2;
/// Bucket prefixes: /24 for IPv4, /48 for IPv6.
pub const PEER_BUCKET_BITS_V4: u8 = 24;
pub const PEER_BUCKET_BITS_V6: u8 = 48;

/// One peer's figures, in the service's view: `[ingress, egress]` (toward
/// the service, from it), and the connections it opened (SYNs without ACK
/// toward the service).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerCounters {
    pub packets: [u64; 2],
    pub bytes: [u64; 2],
    pub conns: u64,
}
layout_assert!(PeerCounters, 40, 8);

impl PeerCounters {
    pub fn add(&mut self, o: &PeerCounters) {
        for d in 0..2 {
            self.packets[d] = self.packets[d].wrapping_add(o.packets[d]);
            self.bytes[d] = self.bytes[d].wrapping_add(o.bytes[d]);
        }
        self.conns = self.conns.wrapping_add(o.conns);
    }

    pub fn is_zero(&self) -> bool {
        *self == PeerCounters::default()
    }
}

/// Key of the unknown-peer LRU (an address) and of the bucket table (the
/// address masked to its prefix, [`PeerKey::bucket`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerKey {
    pub slot: u32,
    pub family: u8,
    /// The path that counted it (0: receive, 1: transmit): the paths may
    /// nest on a CPU, so each adds to its own per-CPU entry.
    pub path: u8,
    pub _pad: [u8; 2],
    /// Wire bytes as words, as in [`EndpointKey`]; IPv4 uses the first.
    pub addr: [u32; 4],
}
layout_assert!(PeerKey, 24, 4);

impl PeerKey {
    /// The key of this address's bucket: /24 (IPv4) or /48 (IPv6).
    #[inline(always)]
    pub fn bucket(&self) -> PeerKey {
        let mut k = *self;
        if self.family == FAMILY_V4 {
            k.addr[0] &= u32::from_ne_bytes([0xff, 0xff, 0xff, 0]);
        } else {
            k.addr[1] &= u32::from_ne_bytes([0xff, 0xff, 0, 0]);
            k.addr[2] = 0;
            k.addr[3] = 0;
        }
        k
    }
}

/// One position of the bucket table: the bucket it holds (family 0: none
/// yet) and its figures. Per CPU: each CPU's copy names its own bucket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerBucket {
    pub key: PeerKey,
    pub counters: PeerCounters,
}
layout_assert!(PeerBucket, 64, 8);

impl PeerKey {
    /// The position of this (bucket) key in the bucket table, try `probe`
    /// (0..PEER_BUCKET_PROBES): a multiplicative hash of its words.
    #[inline(always)]
    pub fn bucket_position(&self, probe: u32) -> u32 {
        let seed = (self.slot << 16) ^ (u32::from(self.path) << 8) ^ u32::from(self.family);
        peer_hash(seed, &self.addr).wrapping_add(probe) & (MAX_PEER_BUCKETS - 1)
    }
}

/// One way of a [`PeerSet`]: an unknown peer (family 0: none) and its
/// figures.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerWay {
    pub key: PeerKey,
    pub counters: PeerCounters,
}
layout_assert!(PeerWay, 64, 8);

/// A set of the unknown-peer LRU: an address is looked for in the ways of
/// the set its key hashes to (one array look-up, a few compares: a hash
/// map look-up costs ~45 ns a packet here). A miss takes the way the
/// clock hand finds first without its recently-used bit, clearing bits as
/// it passes (CLOCK, an approximate LRU); a way taken from another peer is
/// an eviction. Per CPU: each CPU's copy holds its own peers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerSet {
    pub ways: [PeerWay; PEER_WAYS],
    /// Recently-used bits, one per way.
    pub used: u32,
    /// The clock hand: the way a miss looks at first.
    pub hand: u32,
}
layout_assert!(PeerSet, 264, 8);

impl PeerKey {
    /// The set of this (address) key in the unknown-peer LRU: among its
    /// path's sets.
    #[inline(always)]
    pub fn addr_set(&self) -> u32 {
        let seed = (self.slot << 16) ^ u32::from(self.family) ^ 0x5bd1_e995;
        u32::from(self.path & 1) * PEER_ADDR_SETS
            + (peer_hash(seed, &self.addr) & (PEER_ADDR_SETS - 1))
    }
}

/// Indices of the peer programs' own per-CPU counters (`NP_PEER_META`),
/// each followed by its transmit-path twin (index + 1).
pub const PEER_META_INSERTS: u32 = 0;
pub const PEER_META_BUCKETS_FULL: u32 = 2;
pub const PEER_META_LEN: u32 = 4;

/// Map names of the peer figures (all pinned: the name table too, so a
/// restarted agent keeps each address's place and its counts).
pub mod peer_maps {
    pub const NAMES: &str = "NP_PEER_NAMES";
    pub const NAMED: &str = "NP_PEERS";
    pub const ADDRS: &str = "NP_PEER_ADDRS";
    pub const BUCKETS: &str = "NP_PEER_BUCKETS";
    pub const META: &str = "NP_PEER_META";
}

#[cfg(feature = "user")]
mod user_peers {
    use super::*;
    // SAFETY: repr(C), Copy, explicit padding: every bit pattern is valid.
    unsafe impl aya::Pod for PeerCounters {}
    unsafe impl aya::Pod for PeerKey {}
    unsafe impl aya::Pod for PeerBucket {}
    unsafe impl aya::Pod for PeerName {}
    unsafe impl aya::Pod for PeerWay {}
    unsafe impl aya::Pod for PeerSet {}
}
