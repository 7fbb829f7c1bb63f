//! Types shared by the kernel programs (`src/bin/netpulse.rs`) and the agent.
//!
//! Defined once here; the agent reads and writes the same bytes through aya
//! (the `user` feature adds the `aya::Pod` impls). Changing any layout below
//! means bumping [`LAYOUT_VERSION`], so a restart pins a fresh set of maps
//! instead of misreading old ones.
#![cfg_attr(target_arch = "bpf", no_std)]

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

/// Address groups per family; group 0 is never used.
pub const MAX_GROUPS: u32 = 16_384;

/// Up to four IPv4 addresses on one port and their slots (slot 0 = empty).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Group4 {
    pub addr: [u32; 4],
    pub slot: [u32; 4],
}

/// Up to two IPv6 addresses on one port and their slots (slot 0 = empty).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Group6 {
    pub addr: [[u32; 4]; 2],
    pub slot: [u32; 2],
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

/// Kernel key of the IPv6 table (20 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key6 {
    pub addr: [u32; 4],
    pub port: u16,
    pub proto: u8,
    pub role: u8,
}

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

impl Default for SlotName {
    fn default() -> Self {
        Self {
            len: 0,
            bytes: [0; NAME_LEN],
        }
    }
}

/// Map names, as pinned under the layout directory.
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
}

/// Program names in the object file.
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
}
