//! Frames built byte by byte, so a test states exactly what the kernel
//! programs are given, malformed ones included. Checksums are left zero:
//! the programs never look at them.

pub const ETH_IPV4: u16 = 0x0800;
pub const ETH_IPV6: u16 = 0x86DD;
pub const ETH_ARP: u16 = 0x0806;
pub const ETH_8021Q: u16 = 0x8100;
pub const ETH_8021AD: u16 = 0x88A8;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Ethernet header with optional VLAN tags (outermost first), then `inner`.
pub fn eth(vlans: &[u16], ethertype: u16, inner: &[u8]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
    for tpid in vlans {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&0x0064u16.to_be_bytes()); // VID 100
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(inner);
    f
}

/// IPv4 header with `opt_words` 4-byte option words (NOPs), then payload.
pub fn ipv4(
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    opt_words: u8,
    frag_off: u16,
    payload: &[u8],
) -> Vec<u8> {
    let ihl = 5 + opt_words;
    let total = (ihl as usize * 4 + payload.len()) as u16;
    let mut h = vec![0x40 | ihl, 0];
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&[0, 1]);
    h.extend_from_slice(&frag_off.to_be_bytes());
    h.extend_from_slice(&[64, proto, 0, 0]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h.extend(std::iter::repeat_n(1u8, opt_words as usize * 4));
    h.extend_from_slice(payload);
    h
}

/// An IPv6 extension header: (type, body) where the header is 8 bytes
/// plus `extra_words` × 8.
#[derive(Clone, Copy)]
pub enum Ext {
    HopByHop(u8),
    Routing(u8),
    DestOpts(u8),
    /// Fragment with this offset (in 8-byte units).
    Fragment(u16),
}

/// IPv6 header, extension headers in order, then payload of `proto`.
pub fn ipv6(src: [u8; 16], dst: [u8; 16], exts: &[Ext], proto: u8, payload: &[u8]) -> Vec<u8> {
    let code = |e: &Ext| match e {
        Ext::HopByHop(_) => 0u8,
        Ext::Routing(_) => 43,
        Ext::DestOpts(_) => 60,
        Ext::Fragment(_) => 44,
    };
    let mut body = Vec::new();
    for (i, e) in exts.iter().enumerate() {
        let next = exts.get(i + 1).map_or(proto, code);
        match e {
            Ext::Fragment(off) => {
                body.extend_from_slice(&[next, 0]);
                body.extend_from_slice(&(off << 3).to_be_bytes());
                body.extend_from_slice(&[0, 0, 0, 7]);
            }
            Ext::HopByHop(w) | Ext::Routing(w) | Ext::DestOpts(w) => {
                body.extend_from_slice(&[next, *w]);
                body.extend(std::iter::repeat_n(0u8, 6 + *w as usize * 8));
            }
        }
    }
    body.extend_from_slice(payload);
    let first = exts.first().map_or(proto, code);
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(body.len() as u16).to_be_bytes());
    h.extend_from_slice(&[first, 64]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h.extend_from_slice(&body);
    h
}

/// TCP header (data offset `doff` words; 5 = no options) and payload.
pub fn tcp(sport: u16, dport: u16, flags: u8, doff: u8, payload_len: usize) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0]);
    h.extend_from_slice(&[doff << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
    let opts = (doff.max(5) as usize - 5) * 4;
    h.extend(std::iter::repeat_n(1u8, opts));
    h.extend(std::iter::repeat_n(0xabu8, payload_len));
    h
}

pub fn udp(sport: u16, dport: u16, payload_len: usize) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&((8 + payload_len) as u16).to_be_bytes());
    h.extend_from_slice(&[0, 0]);
    h.extend(std::iter::repeat_n(0xcdu8, payload_len));
    h
}

/// ICMP / ICMPv6 echo request with `payload_len` bytes.
pub fn icmp_echo(v6: bool, payload_len: usize) -> Vec<u8> {
    let mut h = vec![if v6 { 128 } else { 8 }, 0, 0, 0, 0, 1, 0, 1];
    h.extend(std::iter::repeat_n(0x11u8, payload_len));
    h
}

pub fn v6(last: u8) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[0] = 0xfd;
    a[15] = last;
    a
}

/// The services the classification tests (kernel, parity) run frames
/// against: address-specific and wildcard, IPv6, UDP, ICMP and a remote
/// service.
pub const CLASSIFY_CONFIG: &str = r#"
[[service]]
name = "web"
endpoints = [{ proto = "tcp", port = 80, addr = "10.0.0.1" }]
[[service]]
name = "web-any"
endpoints = [{ proto = "tcp", port = 80 }]
[[service]]
name = "web6"
endpoints = [{ proto = "tcp", port = 443, addr = "fd00::1" }]
[[service]]
name = "dns"
endpoints = [{ proto = "udp", port = 53 }]
[[service]]
name = "ping"
endpoints = [{ proto = "icmp", addr = "10.0.0.1" }, { proto = "icmp", addr = "fd00::1" }]
[[service]]
name = "db"
remote = true
endpoints = [{ proto = "tcp", port = 5432, addr = "10.0.0.9" }]
"#;

/// The classification corpus: frames both ways of every kind the kernel
/// tests cover, against [`CLASSIFY_CONFIG`]. The parity test runs it
/// through the kernel and userspace classifiers; the benchmark times it.
pub mod corpus {
    use agent_ebpf::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};

    use super::{
        Ext, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, eth, icmp_echo, ipv4, ipv6, tcp, udp, v6,
    };

    pub const LOCAL: [u8; 4] = [10, 0, 0, 1];
    pub const OTHER: [u8; 4] = [10, 0, 0, 2];
    pub const CLIENT: [u8; 4] = [192, 0, 2, 7];
    pub const DB: [u8; 4] = [10, 0, 0, 9];

    pub fn local6() -> [u8; 16] {
        let mut a = [0u8; 16];
        a[0] = 0xfd;
        a[15] = 1;
        a
    }

    /// Frames both ways of every kind the kernel tests cover: services by
    /// address, by wildcard, remote, ICMP, VLAN and QinQ, IPv6 extension
    /// headers, fragments, and the unclassifiable.
    pub fn frames() -> Vec<Vec<u8>> {
        let v4 = |vl: &[u16], s, d, proto, payload: &[u8]| {
            eth(vl, super::ETH_IPV4, &ipv4(s, d, proto, 0, 0, payload))
        };
        let mut out = Vec::new();
        for (a, b) in [
            (CLIENT, LOCAL),
            (LOCAL, CLIENT),
            (CLIENT, OTHER),
            (OTHER, CLIENT),
        ] {
            for vl in [
                &[][..],
                &[super::ETH_8021Q],
                &[super::ETH_8021AD, super::ETH_8021Q],
            ] {
                for flags in [TCP_SYN, TCP_ACK, TCP_FIN | TCP_ACK, TCP_RST] {
                    out.push(v4(vl, a, b, PROTO_TCP, &tcp(40000, 80, flags, 5, 10)));
                    out.push(v4(vl, b, a, PROTO_TCP, &tcp(80, 40000, flags, 8, 100)));
                }
                out.push(v4(vl, a, b, PROTO_UDP, &udp(5353, 53, 30)));
                out.push(v4(vl, b, a, PROTO_UDP, &udp(53, 5353, 300)));
                out.push(v4(vl, a, b, PROTO_ICMP, &icmp_echo(false, 56)));
            }
            // The remote database, from either end.
            out.push(v4(&[], a, DB, PROTO_TCP, &tcp(41000, 5432, TCP_SYN, 5, 0)));
            out.push(v4(&[], DB, a, PROTO_TCP, &tcp(5432, 41000, TCP_ACK, 5, 40)));
            // IPv4 options, a later fragment, a first fragment.
            out.push(eth(
                &[],
                super::ETH_IPV4,
                &ipv4(a, b, PROTO_TCP, 3, 0, &tcp(40000, 80, TCP_SYN, 5, 0)),
            ));
            out.push(eth(
                &[],
                super::ETH_IPV4,
                &ipv4(a, b, PROTO_UDP, 0, 185, &udp(53, 53, 8)),
            ));
            out.push(eth(
                &[],
                super::ETH_IPV4,
                &ipv4(a, b, PROTO_UDP, 0, 0x2000, &udp(5353, 53, 8)),
            ));
        }
        let (l6, c6) = (local6(), v6(7));
        for (a, b) in [(c6, l6), (l6, c6)] {
            for exts in [
                &[][..],
                &[Ext::HopByHop(0)],
                &[Ext::HopByHop(1), Ext::DestOpts(0), Ext::Routing(2)],
                &[Ext::HopByHop(0), Ext::Fragment(0), Ext::DestOpts(3)],
                &[Ext::Fragment(90)],
            ] {
                out.push(eth(
                    &[],
                    super::ETH_IPV6,
                    &ipv6(a, b, exts, PROTO_TCP, &tcp(40000, 443, TCP_SYN, 5, 20)),
                ));
                out.push(eth(
                    &[],
                    super::ETH_IPV6,
                    &ipv6(b, a, exts, PROTO_TCP, &tcp(443, 40000, TCP_ACK, 5, 20)),
                ));
                out.push(eth(
                    &[],
                    super::ETH_IPV6,
                    &ipv6(a, b, exts, PROTO_UDP, &udp(5353, 53, 40)),
                ));
                out.push(eth(
                    &[],
                    super::ETH_IPV6,
                    &ipv6(a, b, exts, PROTO_ICMPV6, &icmp_echo(true, 8)),
                ));
            }
        }
        // Unclassifiable: ARP, a cut TCP header, a TCP data offset below 5,
        // an IPv4 header length below 5, a cut IPv6 header.
        out.push(eth(&[], super::ETH_ARP, &[0; 28]));
        out.push(eth(
            &[],
            super::ETH_IPV4,
            &ipv4(CLIENT, LOCAL, PROTO_TCP, 0, 0, &tcp(1, 80, 0, 5, 0)[..12]),
        ));
        out.push(eth(
            &[],
            super::ETH_IPV4,
            &ipv4(CLIENT, LOCAL, PROTO_TCP, 0, 0, &tcp(1, 80, 0, 4, 0)),
        ));
        let mut bad_ihl = ipv4(CLIENT, LOCAL, PROTO_UDP, 0, 0, &udp(1, 53, 8));
        bad_ihl[0] = 0x44;
        out.push(eth(&[], super::ETH_IPV4, &bad_ihl));
        out.push(eth(&[], super::ETH_IPV6, &[0x60; 20]));
        out
    }
}
