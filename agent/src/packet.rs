//! The eBPF programs' parse-and-classify, in userspace, for frames libpcap
//! hands over: `netpulse analyze` (files) and the pcap backend (live). Not
//! a copy: the parser and the classifier are the kernel programs' own
//! (`agent_ebpf::parse`, `agent_ebpf::classify`), run over a byte slice and
//! over [`Table`], which holds the service table laid out as the kernel's
//! maps hold it (`agent_ebpf::layout`). The same reserved slots, the same
//! service table (from `identity::desired`) and the same counters
//! ([`SlotCounters`](agent_ebpf::SlotCounters)), so both paths give the
//! same answers for the same packets.

use agent_ebpf::{
    DIR_INGRESS, ETH_HLEN, ETH_P_IP, ETH_P_IPV6, EndpointKey, FAMILY_V4, FIRST_SERVICE_SLOT,
    Group4, Group6, Key4, Key6, SLOT_MALFORMED, SLOT_NOT_IP, classify,
    layout::{self, Fresh},
    parse::{self, Frame},
};
use rustc_hash::FxHashMap;

pub use agent_ebpf::{TCP_FIN, TCP_RST, TCP_SYN};

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

fn bytes(w: &[u32; 4]) -> [u8; 16] {
    let mut b = [0u8; 16];
    for (i, w) in w.iter().enumerate() {
        b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    b
}

fn words(b: &[u8; 16]) -> [u32; 4] {
    let mut w = [0u32; 4];
    for (i, w) in w.iter_mut().enumerate() {
        *w = u32::from_ne_bytes([b[i * 4], b[i * 4 + 1], b[i * 4 + 2], b[i * 4 + 3]]);
    }
    w
}

impl Flow {
    fn from_parsed(f: &parse::Flow) -> Flow {
        Flow {
            family: f.family,
            proto: f.proto,
            src: bytes(&f.src),
            dst: bytes(&f.dst),
            sport: f.sport,
            dport: f.dport,
            tcp_flags: f.tcp_flags,
        }
    }

    /// The flow as the shared classifier takes it.
    pub fn parsed(&self) -> parse::Flow {
        parse::Flow {
            family: self.family,
            proto: self.proto,
            src: words(&self.src),
            dst: words(&self.dst),
            sport: self.sport,
            dport: self.dport,
            tcp_flags: self.tcp_flags,
            hdr_len: 0,
        }
    }
}

/// The parse's verdict: a flow to classify, or the reserved slot the frame
/// goes to. A fragment or a frame with a broken L4 header keeps its IP
/// addresses (`family != 0`) for the per-address tables.
pub type Parsed = Result<(), u32>;

/// The network-layer bytes of a frame whose link header is not Ethernet,
/// placed where they would be behind an Ethernet header: header offsets
/// are the kernel's (its bound on them included) whatever the link type.
#[derive(Clone, Copy)]
struct AfterEthernet<'a>(&'a [u8]);

impl<'a> Frame for AfterEthernet<'a> {
    type Header = &'a [u8];
    #[inline(always)]
    fn header(self, off: usize, len: usize) -> Option<&'a [u8]> {
        self.0.header(off.checked_sub(ETH_HLEN)?, len)
    }
}

/// The kernel's parse from `ethertype` on, of a network layer starting at
/// `at` in `frame`.
#[inline]
fn parse_l3(frame: &[u8], at: usize, ethertype: u16, flow: &mut parse::Flow) -> Parsed {
    let l3 = frame.get(at..).ok_or(SLOT_MALFORMED)?;
    parse::parse_from(AfterEthernet(l3), ethertype, ETH_HLEN, flow)
}

/// Where the network layer of a frame starts: behind an Ethernet header
/// (the kernel's parse walks it, VLAN tags included), or at `at` with the
/// ethertype the link header names. `Err` is the reserved slot.
#[derive(Clone, Copy)]
enum Start {
    Ethernet,
    L3(usize, u16),
}

#[inline]
fn start(link: Link, frame: &[u8]) -> Result<Start, u32> {
    Ok(match link {
        Link::Ethernet => Start::Ethernet,
        Link::Raw => match frame.first().map(|b| b >> 4) {
            Some(4) => Start::L3(0, ETH_P_IP),
            Some(6) => Start::L3(0, ETH_P_IPV6),
            _ => return Err(SLOT_MALFORMED),
        },
        Link::Ipv4 => Start::L3(0, ETH_P_IP),
        Link::Ipv6 => Start::L3(0, ETH_P_IPV6),
        // Packet type, ARPHRD, address length, 8 address bytes, protocol.
        Link::Sll => match frame.get(..16) {
            Some(h) => Start::L3(16, u16::from_be_bytes([h[14], h[15]])),
            None => return Err(SLOT_MALFORMED),
        },
        // Protocol first, then reserved, ifindex, ARPHRD, packet type,
        // address length and 8 address bytes.
        Link::Sll2 => match frame.get(..20) {
            Some(h) => Start::L3(20, u16::from_be_bytes([h[0], h[1]])),
            None => return Err(SLOT_MALFORMED),
        },
        Link::Null => match frame.get(..4) {
            Some(h) => {
                let af = u32::from_ne_bytes([h[0], h[1], h[2], h[3]]);
                // AF_INET is 2 everywhere; AF_INET6 is 10, 24, 28 or 30 by OS.
                let af = if af > 0xffff { af.swap_bytes() } else { af };
                match af {
                    2 => Start::L3(4, ETH_P_IP),
                    10 | 24 | 28 | 30 => Start::L3(4, ETH_P_IPV6),
                    _ => return Err(SLOT_NOT_IP),
                }
            }
            None => return Err(SLOT_MALFORMED),
        },
    })
}

/// Parses `frame` of link type `link` into `flow` (which it resets): the
/// kernel programs' parser, after the link header.
pub fn parse(link: Link, frame: &[u8], flow: &mut Flow) -> Parsed {
    let mut f = parse::Flow::default();
    let res = match start(link, frame) {
        Ok(Start::Ethernet) => parse::parse_ethernet(frame, &mut f),
        Ok(Start::L3(at, ethertype)) => parse_l3(frame, at, ethertype, &mut f),
        Err(slot) => Err(slot),
    };
    *flow = Flow::from_parsed(&f);
    res
}

/// The TCP fields the kernel's parser does not keep (its `Flow` is the
/// programs' hot-path struct): what the header-derived TCP tracker needs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpHeader {
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    /// The window field as sent (unscaled).
    pub window: u16,
    /// Payload bytes, from the IP length (not the captured length: a
    /// headers-only capture cuts the payload, Ethernet pads runts).
    pub payload: u32,
}

/// A [`Frame`] that notes where the parser read: the first header of 20
/// bytes or more is the IP header (Ethernet is 14, VLAN tags 4), the last
/// one the transport header.
#[derive(Clone, Copy)]
struct Spy<'a> {
    bytes: &'a [u8],
    /// Parse offsets minus this are offsets in `bytes`.
    shift: usize,
    ip: &'a std::cell::Cell<usize>,
    l4: &'a std::cell::Cell<usize>,
}

impl<'a> Frame for Spy<'a> {
    type Header = &'a [u8];
    #[inline(always)]
    fn header(self, off: usize, len: usize) -> Option<&'a [u8]> {
        let o = off.checked_sub(self.shift)?;
        if len >= 20 && self.ip.get() == usize::MAX {
            self.ip.set(o);
        }
        self.l4.set(o);
        self.bytes.header(o, len)
    }
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    let w = b.get(at..at + 4)?;
    Some(u32::from_be_bytes([w[0], w[1], w[2], w[3]]))
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    let w = b.get(at..at + 2)?;
    Some(u16::from_be_bytes([w[0], w[1]]))
}

/// The TCP header of a frame the parser took for TCP: the kernel's parse
/// again (so VLAN tags, IPv6 extension headers and every link type are
/// walked the same way), noting where the IP and TCP headers are. Run
/// only for TCP segments of a service, so the common path parses once.
/// `wire_len` stands in for an IP length of 0 (a TSO/GSO packet).
pub fn tcp_header(link: Link, frame: &[u8], wire_len: u32) -> Option<TcpHeader> {
    let (ip, l4) = (
        std::cell::Cell::new(usize::MAX),
        std::cell::Cell::new(usize::MAX),
    );
    let mut f = parse::Flow::default();
    let (bytes, at) = match start(link, frame).ok()? {
        Start::Ethernet => {
            let spy = Spy {
                bytes: frame,
                shift: 0,
                ip: &ip,
                l4: &l4,
            };
            parse::parse_ethernet(spy, &mut f).ok()?;
            (frame, 0)
        }
        Start::L3(at, ethertype) => {
            let bytes = frame.get(at..)?;
            let spy = Spy {
                bytes,
                shift: ETH_HLEN,
                ip: &ip,
                l4: &l4,
            };
            parse::parse_from(spy, ethertype, ETH_HLEN, &mut f).ok()?;
            (bytes, at)
        }
    };
    if f.proto != agent_ebpf::PROTO_TCP {
        return None;
    }
    let (ip, l4) = (ip.get(), l4.get());
    let doff = usize::from(*bytes.get(l4 + 12)? >> 4) * 4;
    let ip_len = if f.family == FAMILY_V4 {
        usize::from(be16(bytes, ip + 2)?)
    } else {
        match be16(bytes, ip + 4)? {
            0 => 0,
            n => 40 + usize::from(n),
        }
    };
    let ip_end = if ip_len == 0 {
        (wire_len as usize).saturating_sub(at)
    } else {
        ip + ip_len
    };
    Some(TcpHeader {
        seq: be32(bytes, l4 + 4)?,
        ack: be32(bytes, l4 + 8)?,
        flags: *bytes.get(l4 + 13)?,
        window: be16(bytes, l4 + 14)?,
        payload: ip_end.saturating_sub(l4 + doff) as u32,
    })
}

/// The service table as the kernel holds it, for userspace look-ups:
/// services numbered from [`FIRST_SERVICE_SLOT`] in `names` order, laid out
/// by `agent_ebpf::layout` like the kernel's maps, and read by the kernel's
/// classifier ([`classify::Tables`]).
#[derive(Debug, Default, Clone)]
pub struct Table {
    /// The port index words in use (`NP_PORTS`).
    ports: FxHashMap<u32, u64>,
    /// A bit per port index with a word: most packets miss, and a miss
    /// costs one bit test.
    used: Vec<u64>,
    /// Address groups by id (`NP_GROUPS4`/`6`).
    groups4: Vec<Group4>,
    groups6: Vec<Group6>,
    /// The hash tables (`NP_SERVICES4`/`6`).
    services4: FxHashMap<Key4, u32>,
    services6: FxHashMap<Key6, u32>,
    names: Vec<String>,
}

const INDEX_WORDS: usize = (agent_ebpf::PORT_INDEX_LEN as usize).div_ceil(64);

fn by_id<G: Copy + Default>(groups: &std::collections::BTreeMap<u32, G>) -> Vec<G> {
    let len = groups.keys().next_back().map_or(0, |g| *g as usize + 1);
    let mut v = vec![G::default(); len];
    for (g, grp) in groups {
        v[*g as usize] = *grp;
    }
    v
}

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
        let want: std::collections::BTreeMap<EndpointKey, u32> = entries.into_iter().collect();
        let l = layout::layout(&want, &mut Fresh::default());
        let mut used = vec![0; INDEX_WORDS];
        for i in l.ports.keys() {
            used[*i as usize / 64] |= 1 << (i % 64);
        }
        let (mut services4, mut services6) = (FxHashMap::default(), FxHashMap::default());
        for (k, slot) in &l.hash {
            if k.family == FAMILY_V4 {
                services4.insert(k.key4(), *slot);
            } else {
                services6.insert(k.key6(), *slot);
            }
        }
        Table {
            ports: l.ports.into_iter().collect(),
            used,
            groups4: by_id(&l.groups4),
            groups6: by_id(&l.groups6),
            services4,
            services6,
            names: Vec::new(),
        }
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

    /// Slot and direction (the service's view) of a parsed flow seen on a
    /// hook of direction `hook_dir`: the kernel's `classify`.
    #[inline]
    pub fn classify_hook(&self, f: &Flow, hook_dir: usize) -> (u32, usize) {
        classify::classify(self, &f.parsed(), hook_dir)
    }

    /// A local service at one end (`dir` ingress: the destination), an
    /// address-specific one first, then the wildcard one.
    #[inline]
    pub fn local(&self, f: &Flow, dir: usize) -> Option<u32> {
        let p = f.parsed();
        let (port, addr) = if dir == DIR_INGRESS {
            (p.dport, &p.dst)
        } else {
            (p.sport, &p.src)
        };
        classify::local(self, p.family, p.proto, port, addr)
    }

    /// Slot and direction of a flow read from a file, where no hook says
    /// which end is this host's: a service at the destination sees the
    /// packet come in, one at the source sees it go out.
    #[inline]
    pub fn classify_file(&self, f: &Flow) -> (u32, usize) {
        classify::classify_file(self, &f.parsed())
    }
}

impl classify::Tables for Table {
    #[inline]
    fn port(&self, index: u32) -> u64 {
        let i = index as usize;
        if self
            .used
            .get(i / 64)
            .is_none_or(|w| w & (1 << (i % 64)) == 0)
        {
            return 0;
        }
        self.ports.get(&index).copied().unwrap_or(0)
    }
    #[inline]
    fn group4(&self, g: u32) -> Option<&Group4> {
        self.groups4.get(g as usize)
    }
    #[inline]
    fn group6(&self, g: u32) -> Option<&Group6> {
        self.groups6.get(g as usize)
    }
    #[inline]
    fn service4(&self, key: &Key4) -> Option<u32> {
        self.services4.get(key).copied()
    }
    #[inline]
    fn service6(&self, key: &Key6) -> Option<u32> {
        self.services6.get(key).copied()
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
    use agent_ebpf::{DIR_EGRESS, PROTO_TCP, ROLE_LOCAL, SLOT_FRAGMENT, SLOT_NO_MATCH};

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
    fn tcp_header_fields_and_payload_from_the_ip_length() {
        // seq 7, ack 9, 12 bytes of options, 30 bytes of payload.
        let mut t = tcp(1234, 80, TCP_SYN | 0x10);
        t[4..8].copy_from_slice(&7u32.to_be_bytes());
        t[8..12].copy_from_slice(&9u32.to_be_bytes());
        t[12] = 0x80;
        t[14..16].copy_from_slice(&321u16.to_be_bytes());
        t.extend_from_slice(&[1; 12]);
        t.extend_from_slice(&[0xaa; 30]);
        let want = TcpHeader {
            seq: 7,
            ack: 9,
            flags: TCP_SYN | 0x10,
            window: 321,
            payload: 30,
        };
        let v4 = ipv4(6, 0, &t);
        let frame = eth(0x0800, &v4);
        assert_eq!(tcp_header(Link::Ethernet, &frame, 0), Some(want));
        // Cut by the snaplen: the IP length still says 30.
        assert_eq!(tcp_header(Link::Ethernet, &frame[..80], 0), Some(want));
        // Behind a VLAN tag; as raw IP.
        let mut tagged = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x81, 0, 0, 5, 0x08, 0];
        tagged.extend_from_slice(&v4);
        assert_eq!(tcp_header(Link::Ethernet, &tagged, 0), Some(want));
        assert_eq!(tcp_header(Link::Raw, &v4, 0), Some(want));
        // IPv6 behind a hop-by-hop header.
        let mut v6 = vec![0x60, 0, 0, 0];
        v6.extend_from_slice(&((8 + t.len()) as u16).to_be_bytes());
        v6.extend_from_slice(&[0, 64]);
        v6.extend_from_slice(&[0xfd; 32]);
        v6.extend_from_slice(&[6, 0, 0, 0, 0, 0, 0, 0]);
        v6.extend_from_slice(&t);
        assert_eq!(tcp_header(Link::Ethernet, &eth(0x86dd, &v6), 0), Some(want));
        // Not TCP.
        assert_eq!(
            tcp_header(Link::Ethernet, &eth(0x0800, &ipv4(17, 0, &[0; 8])), 0),
            None
        );
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
