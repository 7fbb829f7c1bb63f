//! The eBPF programs' parse-and-classify, in userspace, for frames libpcap
//! hands over: `netpulse analyze` (files) and the pcap backend (live). The
//! same reserved slots, the same service table (from `identity::desired`)
//! and the same counters ([`SlotCounters`]), so both paths give the same
//! answers for the same packets.

use agent_ebpf::{
    DIR_EGRESS, DIR_INGRESS, EndpointKey, FAMILY_V4, FAMILY_V6, FIRST_SERVICE_SLOT, PROTO_ICMP,
    PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, ROLE_LOCAL, ROLE_REMOTE, SLOT_FRAGMENT, SLOT_MALFORMED,
    SLOT_NO_MATCH, SLOT_NOT_IP, port_index,
};
use etherparse::{EtherType, LaxNetSlice, LaxSlicedPacket, err::Layer};
use rustc_hash::FxHashMap;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;

/// The link layers libpcap hands us, by the DLT_ value `pcap_datalink`
/// returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    Ethernet,
    /// Raw IP: version from the first nibble.
    Raw,
    Ipv4,
    Ipv6,
    /// Linux cooked capture v1 (16-byte header).
    Sll,
    /// Linux cooked capture v2 (20-byte header).
    Sll2,
    /// BSD loopback: a 4-byte address family in host or network order.
    Null,
}

impl Link {
    /// The link type of a DLT_ value (as `pcap_datalink` returns it).
    pub fn from_dlt(dlt: i32) -> Option<Link> {
        Some(match dlt {
            1 => Link::Ethernet,
            // DLT_RAW is 12 on most systems, 14 on some BSDs; 101 is the
            // LINKTYPE_ value libpcap may pass through.
            12 | 14 | 101 => Link::Raw,
            228 => Link::Ipv4,
            229 => Link::Ipv6,
            113 => Link::Sll,
            276 => Link::Sll2,
            0 | 108 => Link::Null,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Link::Ethernet => "ethernet",
            Link::Raw => "raw-ip",
            Link::Ipv4 => "ipv4",
            Link::Ipv6 => "ipv6",
            Link::Sll => "linux-sll",
            Link::Sll2 => "linux-sll2",
            Link::Null => "bsd-loopback",
        }
    }
}

/// What a frame says about itself, as far as it could be parsed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flow {
    /// 0 when the frame is not IP (or its IP header is broken).
    pub family: u8,
    pub proto: u8,
    /// Wire bytes; IPv4 uses the first 4.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
}

/// The parse's verdict: a flow to classify, or the reserved slot the frame
/// goes to. A fragment or a frame with a broken L4 header keeps its IP
/// addresses (`family != 0`) for the per-address tables.
pub type Parsed = Result<(), u32>;

const ETH_IPV4: u16 = 0x0800;
const ETH_IPV6: u16 = 0x86DD;

/// Parses `frame` of link type `link` into `flow` (which it resets).
pub fn parse(link: Link, frame: &[u8], flow: &mut Flow) -> Parsed {
    *flow = Flow::default();
    let sliced = match link {
        Link::Ethernet => LaxSlicedPacket::from_ethernet(frame).map_err(|_| SLOT_MALFORMED)?,
        Link::Raw => match frame.first().map(|b| b >> 4) {
            Some(4) => LaxSlicedPacket::from_ether_type(EtherType(ETH_IPV4), frame),
            Some(6) => LaxSlicedPacket::from_ether_type(EtherType(ETH_IPV6), frame),
            _ => return Err(SLOT_MALFORMED),
        },
        Link::Ipv4 => LaxSlicedPacket::from_ether_type(EtherType(ETH_IPV4), frame),
        Link::Ipv6 => LaxSlicedPacket::from_ether_type(EtherType(ETH_IPV6), frame),
        Link::Sll => {
            // Packet type, ARPHRD, address length, 8 address bytes, protocol.
            let hdr = frame.get(..16).ok_or(SLOT_MALFORMED)?;
            let proto = u16::from_be_bytes([hdr[14], hdr[15]]);
            LaxSlicedPacket::from_ether_type(EtherType(proto), &frame[16..])
        }
        Link::Sll2 => {
            // Protocol first, then reserved, ifindex, ARPHRD, packet type,
            // address length and 8 address bytes.
            let hdr = frame.get(..20).ok_or(SLOT_MALFORMED)?;
            let proto = u16::from_be_bytes([hdr[0], hdr[1]]);
            LaxSlicedPacket::from_ether_type(EtherType(proto), &frame[20..])
        }
        Link::Null => {
            let hdr = frame.get(..4).ok_or(SLOT_MALFORMED)?;
            let af = u32::from_ne_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
            // AF_INET is 2 everywhere; AF_INET6 is 10, 24, 28 or 30 by OS.
            let af = if af > 0xffff { af.swap_bytes() } else { af };
            let et = match af {
                2 => ETH_IPV4,
                10 | 24 | 28 | 30 => ETH_IPV6,
                _ => return Err(SLOT_NOT_IP),
            };
            LaxSlicedPacket::from_ether_type(EtherType(et), &frame[4..])
        }
    };
    let ip = match &sliced.net {
        Some(LaxNetSlice::Ipv4(v4)) => {
            let h = v4.header();
            flow.family = FAMILY_V4;
            flow.src[..4].copy_from_slice(&h.source());
            flow.dst[..4].copy_from_slice(&h.destination());
            flow.proto = h.protocol().0;
            if h.fragments_offset().value() != 0 {
                return Err(SLOT_FRAGMENT);
            }
            v4.payload()
        }
        Some(LaxNetSlice::Ipv6(v6)) => {
            let h = v6.header();
            flow.family = FAMILY_V6;
            flow.src = h.source();
            flow.dst = h.destination();
            let p = v6.payload();
            flow.proto = p.ip_number.0;
            if p.fragmented && later_fragment(h.next_header().0, v6.extensions().slice()) {
                return Err(SLOT_FRAGMENT);
            }
            p
        }
        Some(LaxNetSlice::Arp(_)) => return Err(SLOT_NOT_IP),
        None => {
            // An IP ethertype whose header did not parse, or a cut VLAN
            // tag, is malformed; anything else is simply not IP.
            let ip_type = sliced.ether_payload().is_some_and(|p| {
                p.ether_type == EtherType(ETH_IPV4) || p.ether_type == EtherType(ETH_IPV6)
            });
            let cut = matches!(
                sliced.stop_err,
                Some((
                    _,
                    Layer::VlanHeader
                        | Layer::MacsecHeader
                        | Layer::IpHeader
                        | Layer::Ipv4Header
                        | Layer::Ipv4Packet
                        | Layer::Ipv6Header
                        | Layer::Ipv6Packet
                ))
            );
            return Err(if ip_type || cut {
                SLOT_MALFORMED
            } else {
                SLOT_NOT_IP
            });
        }
    };
    let l4 = ip.payload;
    match flow.proto {
        PROTO_TCP => {
            let t = l4.get(..20).ok_or(SLOT_MALFORMED)?;
            if t[12] >> 4 < 5 {
                return Err(SLOT_MALFORMED);
            }
            flow.sport = u16::from_be_bytes([t[0], t[1]]);
            flow.dport = u16::from_be_bytes([t[2], t[3]]);
            flow.tcp_flags = t[13];
        }
        PROTO_UDP => {
            let u = l4.get(..8).ok_or(SLOT_MALFORMED)?;
            flow.sport = u16::from_be_bytes([u[0], u[1]]);
            flow.dport = u16::from_be_bytes([u[2], u[3]]);
        }
        PROTO_ICMP | PROTO_ICMPV6 if l4.len() < 4 => return Err(SLOT_MALFORMED),
        _ => {}
    }
    Ok(())
}

/// Whether an IPv6 extension header chain (`exts`, starting with header
/// `next`) has a fragment header with a non-zero offset. Walked by hand,
/// bounds-checked: etherparse 0.21's iterator over a lax-parsed chain reads
/// out of bounds on some inputs (found by the `packet` fuzz target).
fn later_fragment(mut next: u8, exts: &[u8]) -> bool {
    let mut off = 0usize;
    // The kernel programs follow at most 6 extension headers.
    for _ in 0..=6 {
        let Some(h) = exts.get(off..off + 2) else {
            return false;
        };
        match next {
            0 | 43 | 60 | 135 | 139 | 140 => {
                next = h[0];
                off += (usize::from(h[1]) + 1) * 8;
            }
            44 => {
                return exts
                    .get(off + 2..off + 4)
                    .is_some_and(|o| u16::from_be_bytes([o[0], o[1]]) & 0xfff8 != 0);
            }
            51 => {
                next = h[0];
                off += (usize::from(h[1]) + 2) * 4;
            }
            _ => return false,
        }
    }
    false
}

/// A (role, family, proto, port, address) key; an all-zero address is the
/// wildcard.
type Key = (u8, u8, u8, u16, [u8; 16]);

/// The service table as the kernel holds it, for userspace look-ups:
/// services numbered from [`FIRST_SERVICE_SLOT`] in `names` order.
#[derive(Debug, Default, Clone)]
pub struct Table {
    keys: FxHashMap<Key, u32>,
    /// Port-index positions (family, proto, port) some key uses, per role:
    /// most packets miss, and a miss costs one bit test.
    used: [Vec<u64>; 2],
    names: Vec<String>,
}

const INDEX_WORDS: usize = (agent_ebpf::PORT_INDEX_LEN as usize).div_ceil(64);

impl Table {
    /// The table of `endpoints` (endpoint → service name), as
    /// `identity::desired` builds it; services get slots from
    /// [`FIRST_SERVICE_SLOT`] on, in name order.
    pub fn new(endpoints: &std::collections::BTreeMap<EndpointKey, String>) -> Table {
        let mut names: Vec<String> = Vec::new();
        let mut slot_of: FxHashMap<&str, u32> = FxHashMap::default();
        let mut slotted = Vec::with_capacity(endpoints.len());
        for (k, name) in endpoints {
            let slot = *slot_of.entry(name.as_str()).or_insert_with(|| {
                names.push(name.clone());
                FIRST_SERVICE_SLOT + names.len() as u32 - 1
            });
            slotted.push((*k, slot));
        }
        let mut t = Table::with_slots(slotted);
        t.names = names;
        t
    }

    /// The table of endpoints whose slots are given (the agent's, as
    /// `Probe::sync_table` receives it); no names.
    pub fn with_slots(entries: impl IntoIterator<Item = (EndpointKey, u32)>) -> Table {
        let mut t = Table {
            keys: FxHashMap::default(),
            used: [vec![0; INDEX_WORDS], vec![0; INDEX_WORDS]],
            names: Vec::new(),
        };
        for (k, slot) in entries {
            let Some(i) = port_index(k.family, k.proto, k.port) else {
                continue;
            };
            let role = usize::from(k.role == ROLE_REMOTE);
            t.used[role][i as usize / 64] |= 1 << (i % 64);
            t.keys
                .insert((k.role, k.family, k.proto, k.port, k.addr_bytes()), slot);
        }
        t
    }

    /// Service names by slot - FIRST_SERVICE_SLOT.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The name of a service slot.
    pub fn name(&self, slot: u32) -> Option<&str> {
        let i = slot.checked_sub(FIRST_SERVICE_SLOT)?;
        self.names.get(i as usize).map(String::as_str)
    }

    /// Slots in use: reserved ones plus one per service.
    pub fn slots(&self) -> usize {
        FIRST_SERVICE_SLOT as usize + self.names.len()
    }

    #[inline]
    fn lookup(&self, role: u8, f: &Flow, port: u16, addr: &[u8; 16]) -> Option<u32> {
        let i = port_index(f.family, f.proto, port)? as usize;
        let r = usize::from(role == ROLE_REMOTE);
        if self.used[r][i / 64] & (1 << (i % 64)) == 0 {
            return None;
        }
        self.keys
            .get(&(role, f.family, f.proto, port, *addr))
            .or_else(|| self.keys.get(&(role, f.family, f.proto, port, [0; 16])))
            .copied()
    }

    /// Slot and direction (the service's view) of a parsed flow seen on a
    /// hook of direction `hook_dir`, as the kernel's `classify`: the local
    /// end (an address-specific service, then the wildcard one), then a
    /// remote service at the other end, whose view is the opposite.
    #[inline]
    pub fn classify_hook(&self, f: &Flow, hook_dir: usize) -> (u32, usize) {
        let (local, lport, remote, rport) = if hook_dir == DIR_INGRESS {
            (&f.dst, f.dport, &f.src, f.sport)
        } else {
            (&f.src, f.sport, &f.dst, f.dport)
        };
        if let Some(s) = self.lookup(ROLE_LOCAL, f, lport, local) {
            return (s, hook_dir);
        }
        if let Some(s) = self.lookup(ROLE_REMOTE, f, rport, remote) {
            return (s, hook_dir ^ 1);
        }
        (SLOT_NO_MATCH, hook_dir)
    }

    /// A local service at one end (`dir` ingress: the destination), as the
    /// kernel's container programs look first.
    #[inline]
    pub fn local(&self, f: &Flow, dir: usize) -> Option<u32> {
        if dir == DIR_INGRESS {
            self.lookup(ROLE_LOCAL, f, f.dport, &f.dst)
        } else {
            self.lookup(ROLE_LOCAL, f, f.sport, &f.src)
        }
    }

    /// Slot and direction of a flow read from a file, where no hook says
    /// which end is this host's: a service at the destination sees the
    /// packet come in, one at the source sees it go out.
    #[inline]
    pub fn classify_file(&self, f: &Flow) -> (u32, usize) {
        for role in [ROLE_LOCAL, ROLE_REMOTE] {
            if let Some(s) = self.lookup(role, f, f.dport, &f.dst) {
                return (s, DIR_INGRESS);
            }
            if let Some(s) = self.lookup(role, f, f.sport, &f.src) {
                return (s, DIR_EGRESS);
            }
        }
        (SLOT_NO_MATCH, DIR_INGRESS)
    }
}

/// The address of a flow end as text.
pub fn addr_string(family: u8, a: &[u8; 16]) -> String {
    if family == FAMILY_V4 {
        std::net::Ipv4Addr::new(a[0], a[1], a[2], a[3]).to_string()
    } else {
        std::net::Ipv6Addr::from(*a).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eth(ethertype: u16, inner: &[u8]) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(inner);
        f
    }

    fn ipv4(proto: u8, frag: u16, payload: &[u8]) -> Vec<u8> {
        let total = (20 + payload.len()) as u16;
        let mut h = vec![0x45, 0];
        h.extend_from_slice(&total.to_be_bytes());
        h.extend_from_slice(&[0, 1]);
        h.extend_from_slice(&frag.to_be_bytes());
        h.extend_from_slice(&[64, proto, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
        h.extend_from_slice(payload);
        h
    }

    fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
        let mut t = Vec::new();
        t.extend_from_slice(&sport.to_be_bytes());
        t.extend_from_slice(&dport.to_be_bytes());
        t.extend_from_slice(&[0; 8]);
        t.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
        t
    }

    #[test]
    fn parses_like_the_kernel() {
        let mut f = Flow::default();
        let frame = eth(0x0800, &ipv4(6, 0, &tcp(1234, 80, TCP_SYN)));
        assert_eq!(parse(Link::Ethernet, &frame, &mut f), Ok(()));
        assert_eq!((f.family, f.proto, f.sport, f.dport), (4, 6, 1234, 80));
        assert_eq!(f.tcp_flags, TCP_SYN);
        assert_eq!(&f.dst[..4], &[10, 0, 0, 2]);
        // Cut TCP header: malformed, addresses kept.
        let frame = eth(0x0800, &ipv4(6, 0, &tcp(1, 2, 0)[..10]));
        assert_eq!(parse(Link::Ethernet, &frame, &mut f), Err(SLOT_MALFORMED));
        assert_eq!(f.family, 4);
        // A later fragment.
        let frame = eth(0x0800, &ipv4(17, 100, &[0; 8]));
        assert_eq!(parse(Link::Ethernet, &frame, &mut f), Err(SLOT_FRAGMENT));
        // ARP, a runt, a broken IP header.
        assert_eq!(
            parse(Link::Ethernet, &eth(0x0806, &[0; 28]), &mut f),
            Err(SLOT_NOT_IP)
        );
        assert_eq!(parse(Link::Ethernet, &[0; 10], &mut f), Err(SLOT_MALFORMED));
        assert_eq!(
            parse(Link::Ethernet, &eth(0x0800, &[0x46, 0, 0]), &mut f),
            Err(SLOT_MALFORMED)
        );
        // IPv6 fragments: the first (offset 0, more to come) has ports.
        let v6 = |frag_off: u16| {
            let mut h = vec![0x60, 0, 0, 0, 0, 16, 44, 64];
            h.extend_from_slice(&[0xfd; 16]);
            h.extend_from_slice(&[0xfe; 16]);
            h.extend_from_slice(&[17, 0]);
            h.extend_from_slice(&(frag_off << 3 | 1).to_be_bytes());
            h.extend_from_slice(&[0, 0, 0, 9]);
            h.extend_from_slice(&[0, 53, 0, 54, 0, 8, 0, 0]);
            eth(0x86DD, &h)
        };
        assert_eq!(parse(Link::Ethernet, &v6(0), &mut f), Ok(()));
        assert_eq!((f.proto, f.sport, f.dport), (17, 53, 54));
        assert_eq!(parse(Link::Ethernet, &v6(100), &mut f), Err(SLOT_FRAGMENT));
        // Raw IP and SLL2 reach the same flow.
        let ip = ipv4(17, 0, &[0, 53, 0x30, 0x39, 0, 8, 0, 0]);
        assert_eq!(parse(Link::Raw, &ip, &mut f), Ok(()));
        assert_eq!((f.sport, f.dport), (53, 12345));
        let mut sll2 = vec![
            0x08, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0, 6, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        sll2.extend_from_slice(&ip);
        assert_eq!(parse(Link::Sll2, &sll2, &mut f), Ok(()));
        assert_eq!((f.sport, f.dport), (53, 12345));
    }

    /// The fuzz target's seeds (agent/fuzz/corpus/packet): the first
    /// byte picks the link type, as in the target.
    #[test]
    fn fuzz_corpus_replays() {
        let links = [
            Link::Ethernet,
            Link::Raw,
            Link::Ipv4,
            Link::Ipv6,
            Link::Sll,
            Link::Sll2,
            Link::Null,
        ];
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/packet");
        let (mut seeds, mut parsed) = (0, 0);
        for e in std::fs::read_dir(&dir).unwrap() {
            let data = std::fs::read(e.unwrap().path()).unwrap();
            let Some((sel, frame)) = data.split_first() else {
                continue;
            };
            let mut f = Flow::default();
            seeds += 1;
            if parse(links[usize::from(*sel) % links.len()], frame, &mut f).is_ok() {
                assert_ne!(f.family, 0);
                parsed += 1;
            }
        }
        assert!(
            seeds >= 10 && parsed >= 8,
            "seed corpus missing in {}",
            dir.display()
        );
    }

    #[test]
    fn classifies_by_either_end_in_files() {
        let mut eps = std::collections::BTreeMap::new();
        let mut k = EndpointKey {
            family: FAMILY_V4,
            proto: PROTO_TCP,
            port: 80,
            role: ROLE_LOCAL,
            ..Default::default()
        };
        eps.insert(k, "web".to_string());
        k.port = 5432;
        k.set_addr(&[10, 0, 0, 9]);
        eps.insert(k, "db".to_string());
        let t = Table::new(&eps);
        let mut f = Flow::default();
        parse(
            Link::Ethernet,
            &eth(0x0800, &ipv4(6, 0, &tcp(40000, 80, 0))),
            &mut f,
        )
        .unwrap();
        let web = t.names().iter().position(|n| n == "web").unwrap() as u32 + FIRST_SERVICE_SLOT;
        assert_eq!(t.classify_file(&f), (web, DIR_INGRESS));
        assert_eq!(t.classify_hook(&f, DIR_INGRESS), (web, DIR_INGRESS));
        assert_eq!(t.classify_hook(&f, DIR_EGRESS).0, SLOT_NO_MATCH);
        std::mem::swap(&mut f.sport, &mut f.dport);
        std::mem::swap(&mut f.src, &mut f.dst);
        assert_eq!(t.classify_file(&f), (web, DIR_EGRESS));
        // 5432 only at 10.0.0.9.
        f.sport = 5432;
        assert_eq!(t.classify_file(&f).0, SLOT_NO_MATCH);
        f.src[..4].copy_from_slice(&[10, 0, 0, 9]);
        assert_eq!(t.name(t.classify_file(&f).0), Some("db"));
    }
}
